r"""Test helpers shipped with the library: an exactly solvable VAE and Monte Carlo tolerances.

The linear-Gaussian VAE

.. math::

    z \sim \mathcal{N}(0, I_L), \qquad x \mid z \sim \mathcal{N}(Wz + b, \sigma^2 I_D)

has the marginal :math:`p(x) = \mathcal{N}(b, WW^\top + \sigma^2 I)` and the Gaussian
posterior :math:`p(z|x) = \mathcal{N}(\Sigma W^\top (x - b)/\sigma^2, \Sigma)` with
:math:`\Sigma = (I + W^\top W/\sigma^2)^{-1}`. With a Gaussian guide the ELBO is also in
closed form. These are the ground truths that estimators and objectives are tested against.
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Optional

import pyro.distributions as dist
import torch
from torch import nn

from .guides import DiagonalGaussianGuide, Guide
from .likelihoods import GaussianLikelihood
from .model import VAE
from .priors import StandardNormalPrior


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
