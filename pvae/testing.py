r"""Test helpers shipped with the library: an exactly solvable VAE and Monte Carlo tolerances.

The linear-Gaussian VAE

.. math::

    z \sim \mathcal{N}(0, I_L), \qquad x \mid z \sim \mathcal{N}(Wz + b, \sigma^2 I_D)

has the marginal :math:`p(x) = \mathcal{N}(b, WW^\top + \sigma^2 I)` and the Gaussian
posterior :math:`p(z|x) = \mathcal{N}(\Sigma W^\top (x - b)/\sigma^2, \Sigma)` with
:math:`\Sigma = (I + W^\top W/\sigma^2)^{-1}`. With a Gaussian guide the ELBO is also in
closed form. These are the ground truths that estimators and objectives are tested against.

For programs of any shape there are Pyro model/guide pairs with closed-form :math:`\log p(x)`
(:class:`LinearGaussianHierarchy`: two latent levels; :class:`GaussianMixtureLatent`: a discrete
latent summed in the model, enumerated or sampled in the guide, optionally partially observed;
:class:`ConditionalLinearGaussian`: covariates), each with an exact or a poor guide and an
optionally subsampled data plate.
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Optional

import pyro.distributions as dist
import torch
from torch import nn

from pvae.parts.guides import DiagonalGaussianGuide, Guide
from pvae.parts.likelihoods import GaussianLikelihood
from pvae.model import VAE
from pvae.parts.priors import StandardNormalPrior

__all__ = [
    "linear_gaussian_vae", "exact_log_marginal", "exact_posterior", "exact_elbo",
    "exact_elbo_terms", "with_exact_guide", "ExactPosteriorGuide", "LinearDecoder", "mc_tolerance",
    "normal_quantile", "LinearGaussianHierarchy", "GaussianMixtureLatent",
    "ConditionalLinearGaussian",
]


class LinearDecoder(nn.Module):
    """``z -> W z + b`` with ``W: (D, L)``; shapes ``(..., L) -> (..., D)``."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight.clone())
        self.bias = nn.Parameter(bias.clone())
        self.out_features = weight.shape[0]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.weight.T + self.bias


def linear_gaussian_vae(
    data_dim: int = 5,
    latent_dim: int = 2,
    noise_scale: float = 0.5,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    guide: Optional[Guide] = None,
) -> VAE:
    """A linear-Gaussian VAE with random ``W`` and ``b`` (seeded) and, unless ``guide`` is
    given, a diagonal Gaussian guide with a linear encoder (untrained: a poor guide)."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(data_dim, latent_dim, generator=g, dtype=dtype)
    bias = torch.randn(data_dim, generator=g, dtype=dtype)
    decoder = LinearDecoder(weight, bias)
    likelihood = GaussianLikelihood(data_dim, scale=noise_scale)
    if guide is None:
        guide = DiagonalGaussianGuide(data_dim, latent_dim, hidden=())
    vae = VAE(StandardNormalPrior(latent_dim), decoder, likelihood, guide)
    return vae.to(dtype)


def _parts(vae: VAE):
    w, b = vae.decoder.weight, vae.decoder.bias
    var = vae.likelihood.scale.pow(2)
    return w, b, var


def exact_log_marginal(vae: VAE, x: torch.Tensor) -> torch.Tensor:
    """:math:`\\log p(x) = \\log \\mathcal{N}(x; b, WW^\\top + \\sigma^2 I)`, shape ``(B,)``."""
    w, b, var = _parts(vae)
    cov = w @ w.T + var * torch.eye(w.shape[0], dtype=w.dtype, device=w.device)
    return dist.MultivariateNormal(b, covariance_matrix=cov).log_prob(x)


def exact_posterior(vae: VAE, x: torch.Tensor) -> dist.MultivariateNormal:
    """:math:`p(z|x)` as a MultivariateNormal with batch shape ``(B,)``."""
    w, b, var = _parts(vae)
    eye = torch.eye(w.shape[1], dtype=w.dtype, device=w.device)
    cov = torch.linalg.inv(eye + w.T @ w / var)
    mean = (x - b) @ w @ cov.T / var
    return dist.MultivariateNormal(mean, covariance_matrix=cov.expand(x.shape[0], -1, -1))


def exact_elbo(vae: VAE, x: torch.Tensor, beta: float = 1.0, index: Optional[torch.Tensor] = None) -> torch.Tensor:
    r"""Closed-form (β-weighted) ELBO per datapoint for a Gaussian guide (diagonal or full
    covariance), differentiable in the VAE's parameters:

    .. math::

        E_q[\log p(x|z)] - \beta\,KL(q\|p), \quad
        E_q[\log p(x|z)] = -\tfrac{D}{2}\log 2\pi\sigma^2
        - \frac{\|x - W\mu - b\|^2 + \operatorname{tr}(W S W^\top)}{2\sigma^2}.
    """
    expected_loglik, kl = exact_elbo_terms(vae, x, index)
    return expected_loglik - beta * kl


def exact_elbo_terms(vae: VAE, x: torch.Tensor, index: Optional[torch.Tensor] = None):
    """``(E_q[log p(x|z)], KL(q(z|x) || p(z)))`` per datapoint in closed form; see
    :func:`exact_elbo` (``index`` for a non-amortized guide)."""
    w, b, var = _parts(vae)
    q = vae.guide_distribution(x, index)
    mu = q.mean
    base = q.base_dist if isinstance(q, dist.Independent) else q
    if isinstance(base, dist.Normal):
        cov = torch.diag_embed(base.scale.pow(2))
    else:
        cov = base.covariance_matrix
    d = x.shape[-1]
    resid = x - mu @ w.T - b
    trace = torch.einsum("ij,bjk,ik->b", w, cov, w)
    expected_loglik = -0.5 * d * torch.log(2 * math.pi * var) - (resid.pow(2).sum(-1) + trace) / (2 * var)
    latent = mu.shape[-1]
    prior = dist.MultivariateNormal(
        torch.zeros(latent, dtype=x.dtype), torch.eye(latent, dtype=x.dtype)
    )
    kl = torch.distributions.kl_divergence(dist.MultivariateNormal(mu, cov), prior)
    return expected_loglik, kl


class ExactPosteriorGuide(Guide):
    """The exact posterior of a linear-Gaussian :class:`VAE` as a guide (full covariance).

    It reads the VAE's decoder and likelihood at call time (not copies), so it stays exact
    when they change. Attach with :func:`with_exact_guide`.
    """

    def __init__(self, data_dim: int, latent_dim: int):
        super().__init__(data_dim, latent_dim)
        self._vae = None

    def forward(self, x: torch.Tensor) -> dist.Distribution:
        if self._vae is None:
            raise RuntimeError("ExactPosteriorGuide is not attached to a VAE")
        return exact_posterior(self._vae, x)


def with_exact_guide(vae: VAE) -> VAE:
    """Return a VAE sharing ``vae``'s prior, decoder and likelihood, guided by the exact
    posterior."""
    guide = ExactPosteriorGuide(vae.data_dim, vae.latent_dim)
    exact = VAE(vae.prior, vae.decoder, vae.likelihood, guide)
    object.__setattr__(guide, "_vae", exact)  # a back-reference, not a submodule
    return exact


def normal_quantile(failure_rate: float) -> float:
    """Two-sided z such that a normal deviation exceeds ``z`` standard errors with
    probability ``failure_rate``."""
    return NormalDist().inv_cdf(1.0 - failure_rate / 2.0)


def mc_tolerance(stderr: float, failure_rate: float = 1e-6) -> float:
    """Tolerance for a Monte Carlo estimate with standard error ``stderr``: a correct
    estimator fails the check with probability about ``failure_rate`` (normal approximation)."""
    return normal_quantile(failure_rate) * float(stderr)


# ----------------------------------------------------------------------------- exact programs
# Pyro programs of the user's kind (several latent sites, a discrete site, covariates, a
# subsampled data plate), each with log p(x) in closed form: the references every estimator is
# tested against. Each is a module whose ``pair()`` is a :class:`~pvae.engine.ModelGuidePair`;
# ``guide="exact"`` is the exact posterior (every estimator then returns log p(x) exactly),
# ``guide="poor"`` the exact posterior with its means shifted and its scales inflated (a fixed,
# valid but imperfect proposal).


def _data_plate(num_data: Optional[int], batch: int, index: Optional[torch.Tensor]):
    """The plate over datapoints: full, or subsampled from ``num_data`` (Pyro's idiom:
    ``pyro.plate("data", N, subsample=index)``; the subsample scale is N / B)."""
    import pyro

    if num_data is None:
        return pyro.plate("data", batch, dim=-1)
    if index is None:
        index = torch.arange(batch)
    return pyro.plate("data", num_data, subsample=index, dim=-1)


def _gaussian_conditional(mean: torch.Tensor, cov: torch.Tensor, first: int):
    """For a Gaussian ``N(mean, cov)`` over ``(u, v)`` with ``u`` its first ``first`` coordinates:
    ``(mean_u, cov_u, gain, cov_v|u)`` with ``E[v|u] = mean_v + (u - mean_u) @ gain.T``."""
    cov_u, cov_uv, cov_v = cov[:first, :first], cov[:first, first:], cov[first:, first:]
    gain = torch.linalg.solve(cov_u, cov_uv).T  # (dim v, dim u)
    return mean[..., :first], cov_u, gain, cov_v - gain @ cov_uv, mean[..., first:]


class _Reference(nn.Module):
    def __init__(self, guide: str, num_data: Optional[int], shift: float, inflate: float):
        super().__init__()
        if guide not in ("exact", "poor"):
            raise ValueError(f"guide must be 'exact' or 'poor', got {guide!r}")
        self.guide_kind = guide
        self.num_data = num_data
        self.shift = shift if guide == "poor" else 0.0
        self.inflate = inflate if guide == "poor" else 1.0

    def _q(self, mean: torch.Tensor, cov: torch.Tensor) -> dist.MultivariateNormal:
        return dist.MultivariateNormal(mean + self.shift, covariance_matrix=cov * self.inflate ** 2)

    def pair(self):
        from pvae.inference.engine import ModelGuidePair

        return ModelGuidePair(self.model, self.guide, module=self)


class LinearGaussianHierarchy(_Reference):
    r"""Two latent levels, :math:`z_2 \sim \mathcal N(0, I)`, :math:`z_1 | z_2 \sim \mathcal N(A z_2 + a,
    s^2 I)`, :math:`x | z_1 \sim \mathcal N(W z_1 + b, \sigma^2 I)` (sites ``"z2"``, ``"z1"``,
    ``"x"``): :math:`p(x) = \mathcal N(W a + b,\ W(AA^\top + s^2 I)W^\top + \sigma^2 I)` and the
    posterior over :math:`(z_2, z_1)` is Gaussian. The guide samples ``order`` (``"top-down"``:
    :math:`q(z_2|x)\,q(z_1|x, z_2)`; ``"bottom-up"``: :math:`q(z_1|x)\,q(z_2|x, z_1)`), each factor the
    exact posterior's marginal or conditional (``guide="exact"``) or a shifted, inflated one
    (``"poor"``). ``num_data``: subsample the data plate from that many datapoints."""

    def __init__(self, data_dim: int = 4, top_dim: int = 2, bottom_dim: int = 3, noise_scale: float = 0.5,
                 level_scale: float = 0.7, guide: str = "exact", order: str = "top-down",
                 num_data: Optional[int] = None, seed: int = 0, shift: float = 0.3, inflate: float = 1.3):
        super().__init__(guide, num_data, shift, inflate)
        if order not in ("top-down", "bottom-up"):
            raise ValueError(f"order must be 'top-down' or 'bottom-up', got {order!r}")
        g = torch.Generator().manual_seed(seed)
        f64 = torch.float64
        self.order = order
        self.A = nn.Parameter(torch.randn(bottom_dim, top_dim, generator=g, dtype=f64))
        self.a = nn.Parameter(torch.randn(bottom_dim, generator=g, dtype=f64))
        self.W = nn.Parameter(torch.randn(data_dim, bottom_dim, generator=g, dtype=f64))
        self.b = nn.Parameter(torch.randn(data_dim, generator=g, dtype=f64))
        self.level_scale, self.noise_scale = float(level_scale), float(noise_scale)
        self.top_dim, self.bottom_dim, self.data_dim = top_dim, bottom_dim, data_dim

    def _joint(self):
        """Mean and covariance of ``(z2, z1)`` under the prior."""
        f = self.A.dtype
        eye2, eye1 = torch.eye(self.top_dim, dtype=f), torch.eye(self.bottom_dim, dtype=f)
        mean = torch.cat([torch.zeros(self.top_dim, dtype=f), self.a])
        cov = torch.cat([torch.cat([eye2, self.A.T], 1),
                         torch.cat([self.A, self.A @ self.A.T + self.level_scale ** 2 * eye1], 1)], 0)
        return mean, cov

    def exact_log_marginal(self, x: torch.Tensor) -> torch.Tensor:
        cov = self.W @ (self.A @ self.A.T + self.level_scale ** 2 * torch.eye(self.bottom_dim, dtype=x.dtype)) @ self.W.T
        cov = cov + self.noise_scale ** 2 * torch.eye(self.data_dim, dtype=x.dtype)
        return dist.MultivariateNormal(self.W @ self.a + self.b, covariance_matrix=cov).log_prob(x)

    def exact_posterior(self, x: torch.Tensor):
        """Mean ``(B, L2 + L1)`` and covariance of ``(z2, z1) | x``."""
        mean, cov = self._joint()
        h = torch.cat([torch.zeros(self.data_dim, self.top_dim, dtype=x.dtype), self.W], 1)
        precision = torch.linalg.inv(cov) + h.T @ h / self.noise_scale ** 2
        post_cov = torch.linalg.inv(precision)
        post_mean = (torch.linalg.solve(cov, mean) + (x - self.b) @ h / self.noise_scale ** 2) @ post_cov.T
        return post_mean, post_cov

    def simulate(self, num: int, seed: int = 1):
        """``(x, {"z2": ..., "z1": ...})``: data and the latents they were drawn from."""
        g = torch.Generator().manual_seed(seed)
        f = self.A.dtype
        with torch.no_grad():
            z2 = torch.randn(num, self.top_dim, generator=g, dtype=f)
            z1 = z2 @ self.A.T + self.a + self.level_scale * torch.randn(num, self.bottom_dim, generator=g, dtype=f)
            x = z1 @ self.W.T + self.b + self.noise_scale * torch.randn(num, self.data_dim, generator=g, dtype=f)
        return x, {"z2": z2, "z1": z1}

    def model(self, x, index=None):
        import pyro

        with _data_plate(self.num_data, x.shape[0], index):
            z2 = pyro.sample("z2", dist.Normal(torch.zeros(self.top_dim, dtype=x.dtype), 1.0).to_event(1))
            z1 = pyro.sample("z1", dist.Normal(z2 @ self.A.T + self.a, self.level_scale).to_event(1))
            pyro.sample("x", dist.Normal(z1 @ self.W.T + self.b, self.noise_scale).to_event(1), obs=x)

    def guide(self, x, index=None):
        import pyro

        mean, cov = self.exact_posterior(x)
        l2 = self.top_dim
        if self.order == "bottom-up":  # reorder to (z1, z2)
            perm = torch.cat([torch.arange(l2, l2 + self.bottom_dim), torch.arange(l2)])
            mean, cov = mean[..., perm], cov[perm][:, perm]
            names, first = ("z1", "z2"), self.bottom_dim
        else:
            names, first = ("z2", "z1"), l2
        mean_u, cov_u, gain, cov_v, mean_v = _gaussian_conditional(mean, cov, first)
        with _data_plate(self.num_data, x.shape[0], index):
            u = pyro.sample(names[0], self._q(mean_u, cov_u))
            pyro.sample(names[1], self._q(mean_v + (u - mean_u) @ gain.T, cov_v))


class GaussianMixtureLatent(_Reference):
    r"""A discrete latent: :math:`y \sim \mathrm{Cat}(\pi)` (``K`` components), :math:`z | y \sim
    \mathcal N(\mu_y, I)`, :math:`x | z \sim \mathcal N(Wz + b, \sigma^2 I)` (sites ``"y"``, ``"z"``,
    ``"x"``): :math:`p(x) = \sum_k \pi_k \mathcal N(x; W\mu_k + b, WW^\top + \sigma^2 I)`.

    ``discrete``: how the program treats ``y`` — ``"model"`` (summed out in the model, marked for
    enumeration; the guide proposes ``z`` from a Gaussian moment-matched to the exact posterior's
    mixture, so even ``guide="exact"`` is not exact), ``"guide"`` (the guide enumerates
    :math:`q(y|x)` and proposes :math:`q(z|x, y)`, Kingma et al.'s M2 form), ``"sampled"`` (the
    guide samples ``y``, not reparametrized). With ``"guide"`` and ``"model"`` a partially
    observed label is supported: pass covariates ``y`` (labels, any value where unknown) and
    ``observed`` (boolean) and the model uses ``obs_mask`` (sites ``"y_observed"`` and
    ``"y_unobserved"``), whose exact value is :meth:`exact_log_marginal` with the labels."""

    def __init__(self, data_dim: int = 3, latent_dim: int = 2, num_components: int = 3, noise_scale: float = 0.5,
                 guide: str = "exact", discrete: str = "guide", num_data: Optional[int] = None, seed: int = 0,
                 shift: float = 0.3, inflate: float = 1.3):
        super().__init__(guide, num_data, shift, inflate)
        if discrete not in ("model", "guide", "sampled"):
            raise ValueError(f"discrete must be 'model', 'guide' or 'sampled', got {discrete!r}")
        g = torch.Generator().manual_seed(seed)
        f64 = torch.float64
        self.discrete = discrete
        self.logits = nn.Parameter(torch.randn(num_components, generator=g, dtype=f64) * 0.5)
        self.mu = nn.Parameter(2.0 * torch.randn(num_components, latent_dim, generator=g, dtype=f64))
        self.W = nn.Parameter(torch.randn(data_dim, latent_dim, generator=g, dtype=f64))
        self.b = nn.Parameter(torch.randn(data_dim, generator=g, dtype=f64))
        self.noise_scale = float(noise_scale)
        self.data_dim, self.latent_dim, self.num_components = data_dim, latent_dim, num_components

    def _marginal_cov(self, dtype):
        return self.W @ self.W.T + self.noise_scale ** 2 * torch.eye(self.data_dim, dtype=dtype)

    def log_joint_label(self, x: torch.Tensor) -> torch.Tensor:
        """:math:`\\log p(x, y=k)` for every k, ``(B, K)``."""
        means = self.mu @ self.W.T + self.b  # (K, D)
        comp = dist.MultivariateNormal(means, covariance_matrix=self._marginal_cov(x.dtype))
        return comp.log_prob(x[:, None, :]) + torch.log_softmax(self.logits, -1)

    def exact_log_marginal(self, x: torch.Tensor, y: Optional[torch.Tensor] = None,
                           observed: Optional[torch.Tensor] = None) -> torch.Tensor:
        """:math:`\\log p(x)`, or with labels ``y`` where ``observed``, :math:`\\log p(x, y)` there."""
        joint = self.log_joint_label(x)
        out = torch.logsumexp(joint, -1)
        if observed is not None:
            out = torch.where(observed, joint.gather(-1, y.long().clamp(0, self.num_components - 1)[:, None])[:, 0], out)
        return out

    def _posterior_z(self, x: torch.Tensor, y: torch.Tensor):
        """Mean and covariance of :math:`p(z | x, y)` (``y`` broadcast against the batch)."""
        eye = torch.eye(self.latent_dim, dtype=x.dtype)
        cov = torch.linalg.inv(eye + self.W.T @ self.W / self.noise_scale ** 2)
        mean = ((x - self.b) @ self.W / self.noise_scale ** 2 + self.mu[y]) @ cov.T
        return mean, cov

    def simulate(self, num: int, seed: int = 1):
        g = torch.Generator().manual_seed(seed)
        f = self.W.dtype
        with torch.no_grad():
            y = torch.multinomial(torch.softmax(self.logits, -1), num, replacement=True, generator=g)
            z = self.mu[y] + torch.randn(num, self.latent_dim, generator=g, dtype=f)
            x = z @ self.W.T + self.b + self.noise_scale * torch.randn(num, self.data_dim, generator=g, dtype=f)
        return x, {"y": y, "z": z}

    def _label(self, name, fn, y, observed, infer):
        import pyro

        from pyro import poutine

        if observed is None:
            return pyro.sample(name, fn, infer=infer)
        # (pyro.sample's obs_mask does not pass infer= on to the "_unobserved" site it creates)
        with poutine.infer_config(config_fn=lambda site: dict(infer) if site["name"] == f"{name}_unobserved" else {}):
            return pyro.sample(name, fn, obs=y, obs_mask=observed)

    def model(self, x, index=None, y=None, observed=None):
        import pyro

        infer = {"enumerate": "parallel"} if self.discrete == "model" else {}
        with _data_plate(self.num_data, x.shape[0], index):
            label = self._label("y", dist.Categorical(logits=self.logits), y, observed, infer)
            z = pyro.sample("z", dist.Normal(self.mu[label], 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ self.W.T + self.b, self.noise_scale).to_event(1), obs=x)

    def guide(self, x, index=None, y=None, observed=None):
        import pyro
        from pyro import poutine

        with _data_plate(self.num_data, x.shape[0], index):
            if self.discrete == "model":  # a Gaussian moment-matched to p(z|x) (a mixture)
                post_y = torch.softmax(self.log_joint_label(x), -1)  # (B, K)
                if observed is not None:
                    post_y = torch.where(observed[:, None], torch.nn.functional.one_hot(
                        y.long().clamp(0, self.num_components - 1), self.num_components).to(x.dtype), post_y)
                means, cov = self._posterior_z(x[:, None, :], torch.arange(self.num_components))  # (B, K, L)
                mean = (post_y[..., None] * means).sum(1)
                spread = ((means - mean[:, None]) ** 2 * post_y[..., None]).sum(1)
                q_cov = cov + torch.diag_embed(spread)
                pyro.sample("z", self._q(mean, q_cov))
                return
            log_post = torch.log_softmax(self.log_joint_label(x), -1)
            if self.guide_kind == "poor":
                log_post = torch.log_softmax(0.5 * log_post, -1)  # flattened toward uniform
            infer = {"enumerate": "parallel"} if self.discrete == "guide" else {}
            fn = dist.Categorical(logits=log_post)
            if observed is None:
                label = pyro.sample("y", fn, infer=infer)
            else:
                with poutine.mask(mask=~observed):
                    free = pyro.sample("y_unobserved", fn, infer=infer)
                label = torch.where(observed, y.long(), free)
            mean, cov = self._posterior_z(x, label)
            pyro.sample("z", self._q(mean, cov))


class ConditionalLinearGaussian(_Reference):
    r"""Covariates ``c`` (read by both programs as ``model(x, index, c=c)``): :math:`z | c \sim
    \mathcal N(Mc, I)`, :math:`x | z, c \sim \mathcal N(Wz + Vc + b, \sigma^2 I)`, so
    :math:`p(x|c) = \mathcal N(WMc + Vc + b, WW^\top + \sigma^2 I)`; the exact guide is
    :math:`p(z|x, c)`. Pass the data as ``pvae.WithCovariates(x, c=c)``."""

    def __init__(self, data_dim: int = 4, latent_dim: int = 2, covariate_dim: int = 2, noise_scale: float = 0.5,
                 guide: str = "exact", num_data: Optional[int] = None, seed: int = 0, shift: float = 0.3,
                 inflate: float = 1.3):
        super().__init__(guide, num_data, shift, inflate)
        g = torch.Generator().manual_seed(seed)
        f64 = torch.float64
        self.M = nn.Parameter(torch.randn(latent_dim, covariate_dim, generator=g, dtype=f64))
        self.V = nn.Parameter(torch.randn(data_dim, covariate_dim, generator=g, dtype=f64))
        self.W = nn.Parameter(torch.randn(data_dim, latent_dim, generator=g, dtype=f64))
        self.b = nn.Parameter(torch.randn(data_dim, generator=g, dtype=f64))
        self.noise_scale = float(noise_scale)
        self.data_dim, self.latent_dim, self.covariate_dim = data_dim, latent_dim, covariate_dim

    def exact_log_marginal(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        cov = self.W @ self.W.T + self.noise_scale ** 2 * torch.eye(self.data_dim, dtype=x.dtype)
        mean = c @ (self.W @ self.M + self.V).T + self.b
        return dist.MultivariateNormal(mean, covariance_matrix=cov).log_prob(x)

    def simulate(self, num: int, seed: int = 1):
        g = torch.Generator().manual_seed(seed)
        f = self.W.dtype
        with torch.no_grad():
            c = torch.randn(num, self.covariate_dim, generator=g, dtype=f)
            z = c @ self.M.T + torch.randn(num, self.latent_dim, generator=g, dtype=f)
            x = z @ self.W.T + c @ self.V.T + self.b + self.noise_scale * torch.randn(num, self.data_dim, generator=g,
                                                                                      dtype=f)
        return x, c, {"z": z}

    def model(self, x, index=None, c=None):
        import pyro

        with _data_plate(self.num_data, x.shape[0], index):
            z = pyro.sample("z", dist.Normal(c @ self.M.T, 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ self.W.T + c @ self.V.T + self.b, self.noise_scale).to_event(1), obs=x)

    def guide(self, x, index=None, c=None):
        import pyro

        eye = torch.eye(self.latent_dim, dtype=x.dtype)
        cov = torch.linalg.inv(eye + self.W.T @ self.W / self.noise_scale ** 2)
        mean = ((x - c @ self.V.T - self.b) @ self.W / self.noise_scale ** 2 + c @ self.M.T) @ cov.T
        with _data_plate(self.num_data, x.shape[0], index):
            pyro.sample("z", self._q(mean, cov))
