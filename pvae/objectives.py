"""Training objectives: thin factories over Pyro's ELBOs.

An :class:`Objective` returns two things for a minibatch: the differentiable *surrogate loss*
whose gradient is followed, and the *value* of the objective it estimates (per datapoint,
nats). For the reparametrized ELBO the surrogate is exactly minus the Monte Carlo ELBO, but
the two are kept separate so that objectives whose surrogate differs from their value (e.g.
DReG estimators) log the true value.

Registered objectives (:data:`OBJECTIVES`):

* ``"elbo"`` — :class:`pyro.infer.Trace_ELBO`: Monte Carlo estimate of
  :math:`E_q[\\log p(x,z) - \\log q(z|x)]`, KL term sampled.
* ``"elbo-analytic-kl"`` — :class:`pyro.infer.TraceMeanField_ELBO`: the same bound with
  :math:`KL(q(z|x)\\|p(z))` in closed form where Pyro knows it (lower variance).
* ``"reconstruction"`` — :math:`E_q[\\log p(x|z)]` only: the ELBO with the latent site's
  log-densities scaled by 0 (the plain autoencoder's loss with a ``"delta"`` guide: binary
  cross-entropy under a Bernoulli likelihood, squared error under a Gaussian one).

Particles are vectorized (``vectorize_particles=True``, ``max_plate_nesting=1``).
"""

from __future__ import annotations

from typing import Optional, Tuple

import pyro.infer
import torch
from pyro.poutine.messenger import Messenger

from .model import LATENT_SITE
from .registry import Registry


class ScaleSite(Messenger):
    """Multiply the log-density of one sample site by ``scale`` (which may be 0), leaving all
    other sites alone — a site-restricted :func:`pyro.poutine.scale`."""

    def __init__(self, site: str, scale: float):
        super().__init__()
        self.site = site
        self.scale = float(scale)

    def _process_message(self, msg):
        if msg["type"] == "sample" and msg["name"] == self.site:
            msg["scale"] = msg["scale"] * self.scale

OBJECTIVES: Registry = Registry("objective")


class Objective:
    """A training objective for a :class:`~pvae.model.VAE`.

    :param pyro.infer.ELBO elbo: the Pyro ELBO that builds the surrogate.
    :param str name: registry name, kept for logs.
    """

    def __init__(self, elbo: pyro.infer.ELBO, name: str, latent_scale: float = 1.0):
        self.elbo = elbo
        self.name = name
        self.num_particles = elbo.num_particles
        self.latent_scale = float(latent_scale)

    def surrogate_loss(self, vae, x: torch.Tensor, index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Differentiable surrogate: minus the objective, averaged over the batch (nats).
        ``index`` (positions in the data set) is passed to the guide for non-amortized guides."""
        model, guide = vae.model, vae.guide
        if self.latent_scale != 1.0:
            model = ScaleSite(LATENT_SITE, self.latent_scale)(model)
            guide = ScaleSite(LATENT_SITE, self.latent_scale)(guide)
        return self.elbo.differentiable_loss(model, guide, x, index) / x.shape[0]

    def loss_and_value(
        self, vae, x: torch.Tensor, index: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Return ``(surrogate_loss, value)``: the loss to differentiate and the detached
        Monte Carlo estimate of the objective per datapoint (nats, higher is better)."""
        loss = self.surrogate_loss(vae, x, index)
        # For fully reparametrized ELBOs Pyro's surrogate equals minus the ELBO estimate.
        return loss, -loss.detach()

    def __repr__(self) -> str:
        return f"Objective({self.name!r}, num_particles={self.num_particles})"


def _vectorized(elbo_class, num_particles: int) -> pyro.infer.ELBO:
    """A Pyro ELBO with particles vectorized over one extra plate dimension."""
    return elbo_class(num_particles=num_particles, vectorize_particles=True, max_plate_nesting=1)


@OBJECTIVES.register("elbo")
def trace_elbo(num_particles: int = 1) -> Objective:
    """ELBO with a Monte Carlo KL term (:class:`pyro.infer.Trace_ELBO`)."""
    return Objective(_vectorized(pyro.infer.Trace_ELBO, num_particles), "elbo")


@OBJECTIVES.register("elbo-analytic-kl")
def mean_field_elbo(num_particles: int = 1) -> Objective:
    """ELBO with an analytic KL term (:class:`pyro.infer.TraceMeanField_ELBO`)."""
    return Objective(_vectorized(pyro.infer.TraceMeanField_ELBO, num_particles), "elbo-analytic-kl")


@OBJECTIVES.register("reconstruction")
def reconstruction(num_particles: int = 1) -> Objective:
    """Expected reconstruction log-likelihood :math:`E_q[\\log p(x|z)]` (no prior, no entropy)."""
    return Objective(_vectorized(pyro.infer.Trace_ELBO, num_particles), "reconstruction", latent_scale=0.0)


def make_objective(name: str = "elbo", num_particles: int = 1) -> Objective:
    """Build a registered objective by name."""
    if int(num_particles) != num_particles or num_particles < 1:
        raise ValueError(f"num_particles must be a positive integer, got {num_particles}")
    return OBJECTIVES.get(name)(num_particles=int(num_particles))
