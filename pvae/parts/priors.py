"""Priors p(z).

A prior is an :class:`torch.nn.Module` whose ``forward()`` returns a
:mod:`pyro.distributions` distribution with ``event_shape == (latent_dim,)`` and empty
batch shape; :class:`~pvae.model.VAE` expands it over the ``"data"`` plate. Constants are
buffers, so the prior follows ``.to(device)`` with the rest of the model.
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
from pyro.distributions.transforms.utils import clamp_preserve_gradients
from pyro.nn import AutoRegressiveNN
from torch import nn
from torch.distributions import constraints

from pvae.inference.engine import _check_positive_int
from pvae.errors import UsageError
from pvae.registry import Registry

__all__ = [
    "PRIORS", "Prior", "StandardNormalPrior", "LearnedDiagonalPrior", "MixtureOfGaussiansPrior",
    "VampPrior", "FlowPrior", "DiagonalGaussianMixture",
]

PRIORS: Registry = Registry("prior", context=("latent_dim", "guide"), doc="""
Priors p(z) by name (``"standard-normal"``, ``"learned-diagonal"``, ``"mog"``, ``"vamp"``,
``"flow"``); ``PRIORS.options("vamp")`` lists a prior's options, and a config's ``prior``
section names one (:func:`pvae.build_vae` builds it).""")


class Prior(nn.Module):
    """Base class: ``forward() -> Distribution`` with event shape ``(latent_dim,)``."""

    def __init__(self, latent_dim: int):
        super().__init__()
        if latent_dim < 1:
            raise UsageError(f"latent_dim must be positive, got {latent_dim}")
        self.latent_dim = int(latent_dim)



class DiagonalGaussianMixture(dist.TorchDistribution):
    r"""A mixture of K diagonal Gaussians :math:`\sum_k \pi_k \mathcal{N}(z; m_k, \operatorname{diag}
    s_k^2)`, the density of the mixture priors (MoG, VampPrior), with empty batch shape.

    ``log_prob`` is the same as :class:`pyro.distributions.MixtureSameFamily`'s over
    ``Normal(loc, scale).to_event(1)`` components, computed by expanding the squares into two
    matrix products, :math:`\sum_d (z_d - m_{kd})^2 / s_{kd}^2 = z^2 \cdot s_k^{-2} - 2 z \cdot
    (m_k s_k^{-2}) + m_k^2 \cdot s_k^{-2}`, in float64 (the expansion cancels large terms; float64
    keeps it exact to ~1e-10 nats). MixtureSameFamily broadcasts an ``(N, K, D)`` tensor instead:
    with 500 components (the VampPrior) that made L_5000 cost 3 s per image on one CPU core, over
    ten times the decoder's cost. Samples are not reparametrized (generation only).

    :param logits: ``(K,)`` unnormalized log mixture weights.
    :param loc: ``(K, D)`` component means.
    :param scale: ``(K, D)`` component standard deviations.
    """

    arg_constraints = {"logits": constraints.real_vector, "loc": constraints.real, "scale": constraints.positive}
    support = constraints.real_vector
    has_rsample = False

    def __init__(self, logits: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor, validate_args=None):
        if loc.dim() != 2 or scale.shape != loc.shape or logits.shape != loc.shape[:1]:
            raise UsageError(f"a diagonal Gaussian mixture needs logits (K,), loc and scale (K, D); got "
                             f"{tuple(logits.shape)}, {tuple(loc.shape)}, {tuple(scale.shape)}")
        self.logits, self.loc, self.scale = logits, loc, scale
        super().__init__(torch.Size(), loc.shape[-1:], validate_args=validate_args)

    @property
    def weights(self) -> torch.Tensor:
        return torch.softmax(self.logits, -1)

    @property
    def mean(self) -> torch.Tensor:
        return self.weights @ self.loc

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        d = self.loc.shape[-1]
        z = value.reshape(-1, d).double()
        precision = self.scale.double().pow(-2)                       # (K, D)
        loc = self.loc.double()
        squares = z.pow(2) @ precision.T - 2 * z @ (loc * precision).T + (loc.pow(2) * precision).sum(-1)
        log_norm = self.scale.double().log().sum(-1) + 0.5 * d * math.log(2 * math.pi)
        log_components = -0.5 * squares.clamp_min(0) - log_norm   # (N, K)
        out = torch.logsumexp(log_components + torch.log_softmax(self.logits.double(), -1), -1)
        return out.to(value.dtype).reshape(value.shape[:-1])

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        with torch.no_grad():
            k = dist.Categorical(logits=self.logits).sample(sample_shape)
            return torch.normal(self.loc[k], self.scale[k])


@PRIORS.register("standard-normal")
class StandardNormalPrior(Prior):
    r"""The standard normal prior :math:`p(z) = \mathcal{N}(0, I)` of Kingma & Welling (2013)."""

    def __init__(self, latent_dim: int):
        super().__init__(latent_dim)
        self.register_buffer("loc", torch.zeros(self.latent_dim))
        self.register_buffer("scale", torch.ones(self.latent_dim))

    def forward(self) -> dist.Distribution:
        return dist.Normal(self.loc, self.scale).to_event(1)


@PRIORS.register("learned-diagonal")
class LearnedDiagonalPrior(Prior):
    r""":math:`p(z) = \mathcal{N}(m, \operatorname{diag} s^2)` with learned ``m`` and ``log s``
    (initialised at the standard normal)."""

    def __init__(self, latent_dim: int):
        super().__init__(latent_dim)
        self.loc = nn.Parameter(torch.zeros(self.latent_dim))
        self.log_scale = nn.Parameter(torch.zeros(self.latent_dim))

    def forward(self) -> dist.Distribution:
        return dist.Normal(self.loc, self.log_scale.exp()).to_event(1)


@PRIORS.register("mog")
class MixtureOfGaussiansPrior(Prior):
    r"""Mixture of diagonal Gaussians :math:`p(z) = \sum_k \pi_k \mathcal{N}(z; m_k,
    \operatorname{diag}s_k^2)` with learned weights (softmax of logits), means and scales.
    The log-density is exact (log-sum-exp over components); samples are not reparametrized
    (they are only needed for generation).

    :param int num_components: number of mixture components.
    """

    def __init__(self, latent_dim: int, num_components: int = 10):
        super().__init__(latent_dim)
        num_components = _check_positive_int("num_components", num_components)
        self.num_components = int(num_components)
        self.logits = nn.Parameter(torch.zeros(self.num_components))
        self.locs = nn.Parameter(torch.randn(self.num_components, self.latent_dim))
        self.log_scales = nn.Parameter(torch.zeros(self.num_components, self.latent_dim))

    def forward(self) -> dist.Distribution:
        return DiagonalGaussianMixture(self.logits, self.locs, self.log_scales.exp())


@PRIORS.register("vamp")
class VampPrior(Prior):
    r"""VampPrior (Tomczak & Welling, 2018): :math:`p(z) = \frac1K \sum_k q_0(z|u_k)`, the
    guide's Gaussian evaluated at K learned pseudo-inputs :math:`u_k`.

    The guide is held by reference (it is the VAE's guide, not a copy, and its parameters are
    registered by the VAE). For flow guides the mixture uses the flow's Gaussian base
    (:meth:`pvae.guides.Guide.base`), because the density of a planar or Sylvester flow at an
    arbitrary point has no closed form. Pseudo-inputs start at :math:`0.05 + 0.01\,\epsilon`.

    :param int pseudo_inputs: number of learned pseudo-inputs K (mixture components).
    """


    def __init__(self, latent_dim: int, guide: nn.Module, pseudo_inputs: int = 50):
        super().__init__(latent_dim)
        if not getattr(guide, "has_density", True):
            raise UsageError("the VampPrior needs a guide with a density (not 'delta')")
        pseudo_inputs = _check_positive_int("pseudo_inputs", pseudo_inputs)
        self.num_components = int(pseudo_inputs)
        object.__setattr__(self, "_guide", guide)  # reference, not a submodule
        self.pseudo_inputs = nn.Parameter(0.05 + 0.01 * torch.randn(self.num_components, guide.data_dim))

    def forward(self) -> dist.Distribution:
        components = self._guide.base(self.pseudo_inputs)
        logits = torch.zeros(self.num_components, dtype=self.pseudo_inputs.dtype,
                             device=self.pseudo_inputs.device)
        normal = getattr(components, "base_dist", None)
        if isinstance(normal, dist.Normal) and getattr(components, "reinterpreted_batch_ndims", 0) == 1:
            return DiagonalGaussianMixture(logits, normal.loc, normal.scale)
        return dist.MixtureSameFamily(dist.Categorical(logits=logits), components)


class _AffineAutoregressive(T.AffineAutoregressive):
    """Pyro's affine autoregressive transform, with an inverse (the flow prior's sampling direction)
    that starts from zeros of its input's dtype and device: Pyro's starts from zeros of the default
    dtype, so a float64 flow prior could score points but not draw them (a dtype error)."""

    def _inverse(self, y):
        x = [y.new_zeros(y.shape[:-1])] * y.size(-1)
        for idx in self.arn.permutation:  # as Pyro's: one autoregressive pass per coordinate
            mean, log_scale = self.arn(torch.stack(x, dim=-1))
            log_scale = clamp_preserve_gradients(log_scale, min=self.log_scale_min_clip, max=self.log_scale_max_clip)
            x[idx] = (y[..., idx] - mean[..., idx]) * torch.exp(-log_scale[..., idx])
        self._cached_log_scale = log_scale
        return torch.stack(x, dim=-1)


@PRIORS.register("flow")
class FlowPrior(Prior):
    r"""A normalizing-flow prior: :math:`z = g(u)`, :math:`u \sim \mathcal{N}(0, I)`, with
    :math:`g^{-1}` a stack of affine autoregressive transforms (a masked autoregressive flow,
    Papamakarios et al., 2017), so that :math:`\log p(z) = \log \mathcal{N}(g^{-1}(z)) +
    \log|\det \partial g^{-1}/\partial z|` costs one network pass; drawing samples inverts it
    (``latent_dim`` passes). Log-determinants are Pyro's.

    :param int num_flows: number of autoregressive transforms.
    :param int hidden_width: width of each transform's two hidden layers (0: max(2 latent_dim, 32)).
    """


    def __init__(self, latent_dim: int, num_flows: int = 2, hidden_width: int = 0):
        super().__init__(latent_dim)
        num_flows = _check_positive_int("num_flows", num_flows)
        if hidden_width < 0:
            raise UsageError(f"hidden_width must be >= 0, got {hidden_width!r}")
        width = hidden_width or max(2 * self.latent_dim, 32)
        self.register_buffer("loc", torch.zeros(self.latent_dim))
        self.register_buffer("scale", torch.ones(self.latent_dim))
        self.flows = nn.ModuleList(
            _AffineAutoregressive(AutoRegressiveNN(self.latent_dim, [width, width])) for _ in range(num_flows)
        )

    def forward(self) -> dist.Distribution:
        base = dist.Normal(self.loc, self.scale).to_event(1)
        # density direction = the modules' forward pass: z -> u through flows, reversed order
        return dist.TransformedDistribution(base, [f.inv for f in reversed(self.flows)])
