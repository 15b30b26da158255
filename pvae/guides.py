r"""Guides q(z|x).

A guide is an :class:`torch.nn.Module` whose ``forward(x)`` returns a
:mod:`pyro.distributions` distribution over ``z`` with ``batch_shape == x.shape[:-1]`` and
``event_shape == (latent_dim,)``; sampling must be reparametrized (``has_rsample``) so that
Pyro's ELBOs use the pathwise gradient :math:`z = \mu + \sigma \odot \epsilon`,
:math:`\epsilon \sim \mathcal{N}(0, I)` (Kingma & Welling, 2013).
"""

from __future__ import annotations

from typing import Sequence

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import nn

from .nets import MLP
from .registry import Registry

GUIDES: Registry = Registry("guide")


class Guide(nn.Module):
    """Base class: ``forward(x) -> Distribution`` and ``mean(x) -> E_q[z]``."""

    def __init__(self, data_dim: int, latent_dim: int):
        super().__init__()
        self.data_dim = int(data_dim)
        self.latent_dim = int(latent_dim)

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        """Posterior mean :math:`E_q[z]`, shape ``(..., latent_dim)``."""
        return self(x).mean


@GUIDES.register("diagonal")
class DiagonalGaussianGuide(Guide):
    r"""Amortized diagonal Gaussian :math:`q_\phi(z|x) = \mathcal{N}(\mu_\phi(x),
    \operatorname{diag}\sigma^2_\phi(x))`, the encoder of Kingma & Welling (2013).

    The encoder network outputs ``2 * latent_dim`` numbers: the mean and a pre-activation
    mapped to a positive scale by ``softplus(.) + min_scale``.

    :param int data_dim: input size.
    :param int latent_dim: size of z.
    :param hidden: hidden widths of the encoder MLP.
    :param str activation: encoder activation.
    :param float min_scale: floor on the standard deviation (numerical safety).
    """

    def __init__(
        self,
        data_dim: int,
        latent_dim: int,
        hidden: Sequence[int] = (500, 500),
        activation: str = "softplus",
        min_scale: float = 1e-4,
    ):
        super().__init__(data_dim, latent_dim)
        self.encoder = MLP(data_dim, 2 * latent_dim, hidden, activation)
        self.min_scale = float(min_scale)

    def loc_scale(self, x: torch.Tensor):
        h = self.encoder(x)
        loc, pre_scale = h.split(self.latent_dim, dim=-1)
        return loc, F.softplus(pre_scale) + self.min_scale

    def forward(self, x: torch.Tensor) -> dist.Distribution:
        loc, scale = self.loc_scale(x)
        return dist.Normal(loc, scale).to_event(1)

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        return self.loc_scale(x)[0]
