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

from .registry import Registry

PRIORS: Registry = Registry("prior")


class Prior(nn.Module):
    """Base class: ``forward() -> Distribution`` with event shape ``(latent_dim,)``."""

    def __init__(self, latent_dim: int):
        super().__init__()
        if latent_dim < 1:
            raise ValueError(f"latent_dim must be positive, got {latent_dim}")
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
