"""The variational autoencoder as a Pyro model/guide pair.

:class:`VAE` composes four parts — a prior p(z), a decoder network, a likelihood p(x|z) and a
guide q(z|x) — into the two Pyro programs :meth:`VAE.model` and :meth:`VAE.guide`, whose
sites are named by the constants :data:`LATENT_SITE`, :data:`OBSERVED_SITE` and
:data:`DATA_PLATE`. :meth:`VAE.log_joint` is the one place where log p(x, z) is computed
outside a Pyro trace; estimators and objectives call it (a test checks it against the trace
of :meth:`VAE.model`).

Parameters live in the module (``vae.parameters()``), never in Pyro's global parameter
store, so several VAEs in one process are independent. Train with a Pyro ELBO's
``differentiable_loss(vae.model, vae.guide, x)`` and a :mod:`torch.optim` optimizer (see
:func:`pvae.train.fit`).
"""

from __future__ import annotations

from typing import Optional

import pyro
import torch
from torch import nn

from ._rng import seeded
from .guides import Guide
from .likelihoods import Likelihood
from .priors import Prior

LATENT_SITE = "z"
OBSERVED_SITE = "x"
DATA_PLATE = "data"


class VAE(nn.Module):
    r"""A VAE :math:`p_\theta(x|z)p(z)` with amortized guide :math:`q_\phi(z|x)`.

    :param Prior prior: ``prior() -> Distribution`` over z, event shape ``(latent_dim,)``.
    :param torch.nn.Module decoder: maps ``(..., latent_dim)`` to ``(..., likelihood.param_dim)``.
    :param Likelihood likelihood: maps decoder output to a distribution over x.
    :param Guide guide: ``guide(x) -> Distribution`` over z with batch shape ``x.shape[:-1]``.

    Data are 2-D float tensors ``(batch, data_dim)``; images are flattened.
    """

    def __init__(self, prior: Prior, decoder: nn.Module, likelihood: Likelihood, guide: Guide):
        super().__init__()
        if prior.latent_dim != guide.latent_dim:
            raise ValueError(
                f"prior latent_dim {prior.latent_dim} != guide latent_dim {guide.latent_dim}"
            )
        if guide.data_dim != likelihood.data_dim:
            raise ValueError(
                f"guide data_dim {guide.data_dim} != likelihood data_dim {likelihood.data_dim}"
            )
        out = getattr(decoder, "out_features", None)
        if out is not None and out != likelihood.param_dim:
            raise ValueError(
                f"decoder outputs {out} numbers but the likelihood needs {likelihood.param_dim}"
            )
        self.prior = prior
        self.decoder = decoder
        self.likelihood = likelihood
        self.guide_net = guide

    @property
    def latent_dim(self) -> int:
        return self.prior.latent_dim

    @property
    def data_dim(self) -> int:
        return self.likelihood.data_dim

    @property
    def device(self) -> torch.device:
        for t in self.parameters():
            return t.device
        for t in self.buffers():
            return t.device
        return torch.device("cpu")

    # ------------------------------------------------------------------ input checks
    def check_data(self, x: torch.Tensor, what: str = "data") -> None:
        """Raise a :class:`ValueError` naming the problem if ``x`` is not valid data.

        Checks: a floating-point tensor of shape ``(batch, data_dim)``, finite, and inside
        the likelihood's support.
        """
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{what} must be a floating-point tensor, got dtype {x.dtype}")
        if x.dim() != 2 or x.shape[-1] != self.data_dim:
            raise ValueError(
                f"{what} must have shape (batch, {self.data_dim}), got {tuple(x.shape)}; "
                "flatten images to vectors of the model's data_dim"
            )
        finite = torch.isfinite(x)
        if not bool(finite.all()):
            rows = (~finite).any(-1).nonzero().flatten()
            raise ValueError(
                f"{what} contain NaN or infinite values in {rows.numel()} row(s) "
                f"(first: {rows[:5].tolist()}); clean or drop those rows"
            )
        self.likelihood.check_data(x)

    # ------------------------------------------------------------------ densities
    def log_prior(self, z: torch.Tensor) -> torch.Tensor:
        """:math:`\\log p(z)` in nats, shape ``z.shape[:-1]``."""
        return self.prior().log_prob(z)

    def log_likelihood(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """:math:`\\log p_\\theta(x|z)` in nats; ``z: (..., B, L)``, ``x: (B, D)`` → ``(..., B)``."""
        return self.likelihood(self.decoder(z)).log_prob(x)

    def log_joint(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """:math:`\\log p_\\theta(x, z) = \\log p(z) + \\log p_\\theta(x|z)`, per datapoint.

        The single source of the joint density for estimators and objectives.
        Shapes: ``z: (..., B, L)``, ``x: (B, D)`` → ``(..., B)``; nats.
        """
        return self.log_prior(z) + self.log_likelihood(x, z)

    # ------------------------------------------------------------------ Pyro programs
    def model(self, x: torch.Tensor, index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Generative program: ``z ~ p(z)``, ``x ~ p(x|z)`` (observed), in plate ``"data"``.
        ``index`` (the datapoints' positions in the data set) is accepted for symmetry with
        :meth:`guide` and not used."""
        with pyro.plate(DATA_PLATE, x.shape[0], dim=-1):
            z = pyro.sample(LATENT_SITE, self.prior())
            pyro.sample(OBSERVED_SITE, self.likelihood(self.decoder(z)), obs=x)
        return z

    def guide(self, x: torch.Tensor, index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Guide program: ``z ~ q(z|x)`` in plate ``"data"``."""
        with pyro.plate(DATA_PLATE, x.shape[0], dim=-1):
            return pyro.sample(LATENT_SITE, self.posterior(x, index))

    def posterior(self, x: torch.Tensor, index: Optional[torch.Tensor] = None):
        """The guide's distribution q(z|x), batch shape ``(B,)``. Non-amortized guides need
        ``index``, the datapoints' positions in the data set they were built for."""
        if self.guide_net.needs_index:
            return self.guide_net(x, index)
        return self.guide_net(x)

    # ------------------------------------------------------------------ conveniences
    @torch.no_grad()
    def encode(self, x: torch.Tensor, index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Posterior means :math:`E_q[z|x]`, shape ``(B, latent_dim)``."""
        if self.guide_net.needs_index:
            return self.guide_net.mean(x, index)
        return self.guide_net.mean(x)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Likelihood means :math:`E[x|z]`, shape ``(..., data_dim)``."""
        return self.likelihood.mean(self.decoder(z))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """:math:`E[x | z = E_q[z|x]]`: decode the posterior mean."""
        return self.decode(self.encode(x, index))

    @torch.no_grad()
    def sample(
        self, num_samples: int, seed: Optional[int] = None, mean: bool = True
    ) -> torch.Tensor:
        """Draw ``num_samples`` images from the model: ``z ~ p(z)`` then ``E[x|z]`` (``mean``)
        or ``x ~ p(x|z)``. Shape ``(num_samples, data_dim)``. ``seed`` fixes the draw without
        touching the global RNG."""
        with seeded(seed, self.device):
            z = self.prior().sample((num_samples,))
            if mean:
                return self.decode(z)
            return self.likelihood(self.decoder(z)).sample()
