"""Priors p(z).

A prior is an :class:`torch.nn.Module` whose ``forward()`` returns a
:mod:`pyro.distributions` distribution with ``event_shape == (latent_dim,)`` and empty
batch shape; :class:`~pvae.model.VAE` expands it over the ``"data"`` plate. Constants are
buffers, so the prior follows ``.to(device)`` with the rest of the model.
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
from torch import nn

from .engine import _check_positive_int
from .errors import UsageError
from .registry import Registry

PRIORS: Registry = Registry("prior", context=("latent_dim", "guide"))


class Prior(nn.Module):
    """Base class: ``forward() -> Distribution`` with event shape ``(latent_dim,)``."""

    def __init__(self, latent_dim: int):
        super().__init__()
        if latent_dim < 1:
            raise UsageError(f"latent_dim must be positive, got {latent_dim}")
        self.latent_dim = int(latent_dim)



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
        components = dist.Normal(self.locs, self.log_scales.exp()).to_event(1)
        return dist.MixtureSameFamily(dist.Categorical(logits=self.logits), components)


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
        return dist.MixtureSameFamily(dist.Categorical(logits=logits), components)


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
        import pyro.distributions.transforms as T

        num_flows = _check_positive_int("num_flows", num_flows)
        if hidden_width < 0:
            raise UsageError(f"hidden_width must be >= 0, got {hidden_width!r}")
        width = hidden_width or max(2 * self.latent_dim, 32)
        self.register_buffer("loc", torch.zeros(self.latent_dim))
        self.register_buffer("scale", torch.ones(self.latent_dim))
        self.flows = nn.ModuleList(
            T.affine_autoregressive(self.latent_dim, hidden_dims=[width, width]) for _ in range(num_flows)
        )

    def forward(self) -> dist.Distribution:
        base = dist.Normal(self.loc, self.scale).to_event(1)
        # density direction = the modules' forward pass: z -> u through flows, reversed order
        return dist.TransformedDistribution(base, [f.inv for f in reversed(self.flows)])
