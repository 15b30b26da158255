r"""The conditional VAE: every distribution reads an observed covariate ``c``.

:math:`p(z|c)\,p(x|z, c)` with guide :math:`q(z|x, c)` (Sohn et al. 2015): the prior a diagonal
Gaussian from an MLP of ``c`` (``conditional_prior=False``: :math:`\mathcal N(0, I)`), the decoder
and the encoder MLPs of the concatenations. ``c`` is a float vector per datapoint (a one-hot
label, or numeric columns of a table), passed as ``pvae.WithCovariates(x, c=c)``; every estimate
is then of :math:`\log p(x | c)`.
"""

from __future__ import annotations

from typing import Optional, Sequence

import pyro
import pyro.distributions as dist
import torch

from pvae.errors import UsageError
from pvae.families.base import FamilyModel, cat_broadcast, diagonal_normal
from pvae.model import DATA_PLATE, OBSERVED_SITE
from pvae.parts.nets import MLP

__all__ = ["ConditionalVAE"]

class ConditionalVAE(FamilyModel):
    """A VAE conditioned on a covariate vector ``c`` of ``covariate_dim`` numbers.

    :param likelihood: the :class:`~pvae.parts.likelihoods.Likelihood` of x.
    :param int covariate_dim: size of ``c``.
    :param int latent_dim: size of ``z``.
    :param hidden: hidden widths of the encoder and (reversed) the decoder.
    :param str activation: a name in :data:`~pvae.parts.nets.ACTIVATIONS`.
    :param bool conditional_prior: :math:`p(z|c)` learned (else :math:`\\mathcal N(0, I)`).
    """

    covariates = ("c",)
    required_covariates = ("c",)

    def __init__(self, likelihood, covariate_dim: int, latent_dim: int, hidden: Sequence[int] = (500,),
                 activation: str = "softplus", conditional_prior: bool = True):
        super().__init__()
        if int(covariate_dim) < 1:
            raise UsageError(f"a conditional VAE needs a covariate of positive size, got {covariate_dim}")
        self.likelihood = likelihood
        self.covariate_dim, self.latent_dim = int(covariate_dim), int(latent_dim)
        D, C, L = likelihood.data_dim, self.covariate_dim, self.latent_dim
        hidden = tuple(int(h) for h in hidden)
        self.encoder = MLP(D + C, 2 * L, hidden, activation)
        self.decoder = MLP(L + C, likelihood.param_dim, hidden[::-1], activation)
        self.prior_net = MLP(C, 2 * L, hidden[-1:], activation) if conditional_prior else None

    def check_covariates(self, covariates, what):
        c = covariates["c"]
        if not c.is_floating_point() or c.dim() != 2 or c.shape[-1] != self.covariate_dim:
            raise UsageError(f"covariate 'c' of the {what} must be a float tensor (batch, {self.covariate_dim}), "
                             f"got {tuple(c.shape)} of dtype {c.dtype}")

    def prior(self, c: torch.Tensor) -> dist.Distribution:
        """:math:`p(z|c)`."""
        if self.prior_net is None:
            zeros = torch.zeros(self.latent_dim, dtype=c.dtype, device=c.device)
            return dist.Normal(zeros, 1.0).to_event(1)
        return diagonal_normal(self.prior_net(c), self.latent_dim)

    def _need(self, c):
        if c is None:
            raise UsageError("the conditional VAE needs its covariate: pass pvae.WithCovariates(x, c=...)")
        return c

    def model(self, x: Optional[torch.Tensor], index: Optional[torch.Tensor] = None, c=None,
              num_datapoints: Optional[int] = None):
        """``z ~ p(z|c)``, ``x ~ p(x|z, c)`` (observed)."""
        c = self._need(c)
        with pyro.plate(DATA_PLATE, self._size(x, num_datapoints), dim=-1):
            z = pyro.sample("z", self.prior(c))
            pyro.sample(OBSERVED_SITE, self.likelihood(self.decoder(cat_broadcast(z, c))), obs=x)

    def guide(self, x: torch.Tensor, index: Optional[torch.Tensor] = None, c=None):
        """``z ~ q(z|x, c)``."""
        c = self._need(c)
        with pyro.plate(DATA_PLATE, x.shape[0], dim=-1):
            pyro.sample("z", diagonal_normal(self.encoder(cat_broadcast(x, c)), self.latent_dim))

    @torch.no_grad()
    def encode(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """:math:`E_q[z|x, c]`, ``(B, latent_dim)``."""
        return self.encoder(cat_broadcast(x, c))[..., : self.latent_dim]

    @torch.no_grad()
    def sample(self, c: torch.Tensor, seed: Optional[int] = None, mean: bool = True) -> torch.Tensor:
        """One new datapoint per row of ``c``: ``z ~ p(z|c)``, then :math:`E[x|z, c]` (``mean``) or a draw."""
        from pvae._rng import seeded

        c = self._need(c).to(self.device)
        with seeded(seed, self.device):
            z = self.prior(c).sample() if self.prior_net is not None else self.prior(c).expand((c.shape[0],)).sample()
            params = self.decoder(cat_broadcast(z, c))
            return self.likelihood.mean(params) if mean else self.likelihood(params).sample()

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """:math:`E[x | z = E_q[z|x, c], c]`."""
        return self.likelihood.mean(self.decoder(cat_broadcast(self.encode(x, c), c)))
