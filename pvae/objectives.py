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

Particles are vectorized (``vectorize_particles=True``, ``max_plate_nesting=1``).
"""

from __future__ import annotations

from typing import Tuple

import pyro.infer
import torch

from .registry import Registry

OBJECTIVES: Registry = Registry("objective")


class Objective:
    """A training objective for a :class:`~pvae.model.VAE`.

    :param pyro.infer.ELBO elbo: the Pyro ELBO that builds the surrogate.
    :param str name: registry name, kept for logs.
    """

    def __init__(self, elbo: pyro.infer.ELBO, name: str):
        self.elbo = elbo
        self.name = name
        self.num_particles = elbo.num_particles

    def surrogate_loss(self, vae, x: torch.Tensor) -> torch.Tensor:
        """Differentiable surrogate: minus the objective, averaged over the batch (nats)."""
        return self.elbo.differentiable_loss(vae.model, vae.guide, x) / x.shape[0]

    def loss_and_value(self, vae, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Return ``(surrogate_loss, value)``: the loss to differentiate and the detached
        Monte Carlo estimate of the objective per datapoint (nats, higher is better)."""
        loss = self.surrogate_loss(vae, x)
        # For fully reparametrized ELBOs Pyro's surrogate equals minus the ELBO estimate.
        return loss, -loss.detach()

    def __repr__(self) -> str:
        return f"Objective({self.name!r}, num_particles={self.num_particles})"


@OBJECTIVES.register("elbo")
def trace_elbo(num_particles: int = 1) -> Objective:
    """ELBO with a Monte Carlo KL term (:class:`pyro.infer.Trace_ELBO`)."""
    return Objective(
        pyro.infer.Trace_ELBO(
            num_particles=num_particles, vectorize_particles=True, max_plate_nesting=1
        ),
        "elbo",
    )


@OBJECTIVES.register("elbo-analytic-kl")
def mean_field_elbo(num_particles: int = 1) -> Objective:
    """ELBO with an analytic KL term (:class:`pyro.infer.TraceMeanField_ELBO`)."""
    return Objective(
        pyro.infer.TraceMeanField_ELBO(
            num_particles=num_particles, vectorize_particles=True, max_plate_nesting=1
        ),
        "elbo-analytic-kl",
    )


def make_objective(name: str = "elbo", num_particles: int = 1) -> Objective:
    """Build a registered objective by name."""
    if int(num_particles) != num_particles or num_particles < 1:
        raise ValueError(f"num_particles must be a positive integer, got {num_particles}")
    return OBJECTIVES.get(name)(num_particles=int(num_particles))
