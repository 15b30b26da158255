"""The variational autoencoder as a Pyro model/guide pair.

:class:`VAE` composes four parts — a prior p(z), a decoder network, a likelihood p(x|z) and a
guide q(z|x) — into the two Pyro programs :meth:`VAE.model` and :meth:`VAE.guide`, whose
sites are named by the constants :data:`LATENT_SITE`, :data:`OBSERVED_SITE` and
:data:`DATA_PLATE`. **The programs are the definition** of p(x, z) and q(z|x): every estimator,
objective and diagnostic derives its log-weights from their traces
(:func:`pvae.engine.log_weights`). :meth:`VAE._fast_log_weights` computes the same numbers
without tracing, and is used only while the programs are pvae's own (tested equal, part by part).

Pyro sees the parameters, yet they stay local to the module:

* ``vae.model`` and ``vae.guide`` are :class:`torch.nn.Module` s (:class:`Program`), so Pyro's
  module form ``Trace_ELBO()(vae.model, vae.guide)`` exposes ``vae.parameters()``;
* when run under a Pyro handler, the programs announce every parameter as a ``param`` site
  (as :class:`~pyro.nn.PyroModule` does with ``module_local_params``), so the classic
  ``SVI(vae.model, vae.guide, pyro.optim.Adam(...), Trace_ELBO())`` optimizes them;
* nothing is written to Pyro's global parameter store, so VAEs in one process never share or
  overwrite parameters, whatever the order they are trained in.

Subclasses may override ``model`` / ``guide`` with their own Pyro programs (same signature
``(x, index=None)``); they are wrapped as :class:`Program` s too, and everything pvae computes
then follows the new program.
"""

from __future__ import annotations

import warnings

import functools
import weakref
from typing import Callable, Optional

import pyro
import torch
from pyro.distributions import constraints
from pyro.poutine.runtime import am_i_wrapped, effectful
from torch import nn

from pvae._rng import seeded
from pvae.inference.engine import WeightedSamples, is_point_mass, params_quiet
from pvae.errors import UsageError, UsageTypeError, rows_phrase
from pvae.parts.guides import Guide
from pvae.parts.likelihoods import Likelihood
from pvae.parts.priors import Prior

__all__ = ["VAE", "Program", "program", "check_data_tensor", "LATENT_SITE", "OBSERVED_SITE", "DATA_PLATE"]

LATENT_SITE = "z"
OBSERVED_SITE = "x"
DATA_PLATE = "data"

def check_data_tensor(x, data_dim: int, what: str = "data") -> None:
    """That ``x`` is a non-empty, finite floating-point tensor of shape ``(batch, data_dim)``
    (the checks every pvae model makes before its likelihood checks the support)."""
    if not isinstance(x, torch.Tensor):
        raise UsageTypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise UsageTypeError(f"{what} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() != 2 or x.shape[-1] != data_dim:
        raise UsageError(
            f"{what} must have shape (batch, {data_dim}), got {tuple(x.shape)}; "
            "flatten images to vectors of the model's data_dim"
        )
    if x.shape[0] == 0:
        raise UsageError(f"{what} hold no datapoints (shape {tuple(x.shape)}); pass at least one row")
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        rows = (~finite).any(-1).nonzero().flatten()
        raise UsageError(
            f"{what} contain NaN or infinite values in {rows_phrase(rows)}; clean or drop those rows"
        )


def _announce(module: nn.Module, prefix: str) -> None:
    """Emit a Pyro ``param`` site for every parameter of ``module``, named
    ``<prefix>$$$<name>``, with a value that Pyro's SVI maps back to the parameter itself
    (``value.unconstrained()``), without touching the global parameter store."""
    param = effectful(type="param")
    for name, p in module.named_parameters():
        full = f"{prefix}$$${name}"
        value = p.detach()  # a fresh alias per call: nothing is attached to the parameter
        value.unconstrained = weakref.ref(p)
        param(lambda *_, _v=value, **__: _v)(full, value, constraint=constraints.real, event_dim=None, name=full)


def _draw(d):
    """What ``pyro.sample`` draws from ``d``: reparametrized where it can be."""
    return d.rsample() if d.has_rsample else d.sample()


class Program(nn.Module):
    """A VAE's Pyro program (``vae.model`` or ``vae.guide``) as a :class:`torch.nn.Module`.

    Calling it runs the program; its parameters are the VAE's (``Program.vae``). Under a Pyro
    handler it first announces the parameters as ``param`` sites (see the module docstring).
    """

    def __init__(self, vae: "VAE", fn: Callable, name: str):
        super().__init__()
        self.vae = vae
        object.__setattr__(self, "fn", fn)
        object.__setattr__(self, "program_name", name)

    def forward(self, *args, **kwargs):
        if am_i_wrapped() and not params_quiet():
            _announce(self.vae, f"pvae_{id(self.vae):x}")
        return self.fn(self.vae, *args, **kwargs)

    def __repr__(self):
        return f"Program({type(self.vae).__name__}.{self.program_name})"


class program:
    """Descriptor: ``vae.model`` / ``vae.guide`` return the instance's :class:`Program`
    (created once per instance and kept out of ``state_dict``)."""

    def __init__(self, fn: Callable):
        self.fn = fn
        functools.update_wrapper(self, fn)

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, instance, owner=None):
        if instance is None:
            return self
        override = instance.__dict__.get("_program_overrides", {}).get(self.name)
        if override is not None:
            return override
        cache = instance.__dict__.setdefault("_programs", {})
        bound = cache.get(self.name)
        if bound is None or bound.fn is not self.fn:
            bound = cache[self.name] = Program(instance, self.fn, self.name)
        return bound


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
            raise UsageError(
                f"prior latent_dim {prior.latent_dim} != guide latent_dim {guide.latent_dim}"
            )
        if guide.data_dim != likelihood.data_dim:
            raise UsageError(
                f"guide data_dim {guide.data_dim} != likelihood data_dim {likelihood.data_dim}"
            )
        out = getattr(decoder, "out_features", None)
        if out is not None and out != likelihood.param_dim:
            raise UsageError(
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
        check_data_tensor(x, self.data_dim, what)
        self.likelihood.check_data(x)

    # ------------------------------------------------------------------ densities (fast path)
    # The closed-form densities of pvae's own programs, for the fast path only: equal to the
    # programs' traces (tests), never used for an overridden program (pvae.engine.use_fast_path).
    def log_prior(self, z: torch.Tensor) -> torch.Tensor:
        """:math:`\\log p(z)` in nats, shape ``z.shape[:-1]``."""
        return self.prior().log_prob(z)

    def log_likelihood(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """:math:`\\log p_\\theta(x|z)` in nats; ``z: (..., B, L)``, ``x: (B, D)`` → ``(..., B)``."""
        return self.likelihood(self.decoder(z)).log_prob(x)

    def log_joint(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """:math:`\\log p_\\theta(x, z) = \\log p(z) + \\log p_\\theta(x|z)` per datapoint, in
        closed form for pvae's own model (what :func:`pvae.engine.log_density` computes from
        the program). Shapes: ``z: (..., B, L)``, ``x: (B, D)`` → ``(..., B)``; nats."""
        return self.log_prior(z) + self.log_likelihood(x, z)

    # ------------------------------------------------------------------ Pyro programs
    #: plates the programs nest (the data plate); samples are vectorized just outside
    max_plate_nesting = 1
    #: the plate over datapoints
    data_plate = DATA_PLATE

    @program
    def model(self, x: Optional[torch.Tensor], index: Optional[torch.Tensor] = None,
              num_datapoints: Optional[int] = None) -> torch.Tensor:
        """Generative program: ``z ~ p(z)``, ``x ~ p(x|z)`` (observed), in plate ``"data"``.
        With ``x=None`` it generates ``num_datapoints`` new datapoints (site ``"x"`` sampled).
        ``index`` (the datapoints' positions in the data set) is accepted for symmetry with
        :meth:`guide` and not used."""
        size = x.shape[0] if x is not None else num_datapoints
        if size is None:
            raise UsageError("model(None) generates data: pass num_datapoints=")
        with pyro.plate(DATA_PLATE, size, dim=-1):
            z = pyro.sample(LATENT_SITE, self.prior())
            pyro.sample(OBSERVED_SITE, self.likelihood(self.decoder(z)), obs=x)
        return z

    @program
    def guide(self, x: torch.Tensor, index: Optional[torch.Tensor] = None, **kwargs) -> torch.Tensor:
        """Guide program: ``z ~ q(z|x)`` in plate ``"data"``."""
        with pyro.plate(DATA_PLATE, x.shape[0], dim=-1):
            return pyro.sample(LATENT_SITE, self.guide_distribution(x, index))

    def __init_subclass__(cls, **kwargs):
        """A subclass's own ``model`` / ``guide`` become :class:`Program` s too."""
        super().__init_subclass__(**kwargs)
        for name in ("model", "guide"):
            fn = cls.__dict__.get(name)
            if fn is not None and not isinstance(fn, program):
                p = program(fn)
                p.__set_name__(cls, name)
                setattr(cls, name, p)

    def __setattr__(self, name, value):
        if name in ("model", "guide"):  # an instance-level program (e.g. wrapped in a handler)
            self.__dict__.setdefault("_program_overrides", {})[name] = value
            return
        super().__setattr__(name, value)

    def programs_are_builtin(self) -> bool:
        """Whether :attr:`model` and :attr:`guide` are pvae's own programs (not overridden in a
        subclass or on the instance): only then may the fast path replace the trace."""
        cls = type(self)
        return (not self.__dict__.get("_program_overrides")
                and getattr(cls.model, "fn", None) is VAE.model.fn
                and getattr(cls.guide, "fn", None) is VAE.guide.fn)

    def _fast_log_weights(self, x: torch.Tensor, num_samples: int, index=None, proposal="guide") -> WeightedSamples:
        """:func:`pvae.engine.log_weights` for pvae's own programs, without tracing: the same
        distributions, expanded to ``(K, B)`` as the plates expand them and sampled the same
        way, so the draws and values equal the trace path's on the same RNG state."""
        shape = (num_samples, x.shape[0])
        prior = self.prior().expand(shape)
        if proposal == "guide":
            q = self.guide_distribution(x, index).expand(shape)
            z = _draw(q)
            log_q = q.log_prob(z)
        else:
            q = prior
            z = _draw(prior)
        log_p = prior.log_prob(z)
        if proposal == "prior":
            log_q = log_p
        log_lik = self.log_likelihood(x, z)
        return WeightedSamples(log_lik, log_p, log_q, {LATENT_SITE: z}, {LATENT_SITE: q},
                               {LATENT_SITE: prior}, "fast", {LATENT_SITE: (log_p, log_q)},
                               point_masses=(LATENT_SITE,) if is_point_mass(q) else (),
                               not_reparametrized=() if q.has_rsample else (LATENT_SITE,))

    def guide_distribution(self, x: torch.Tensor, index: Optional[torch.Tensor] = None):
        """The guide's distribution q(z|x) (the approximate posterior), batch shape ``(B,)``.
        Non-amortized guides need ``index``, the datapoints' positions in the data set they
        were built for."""
        if self.guide_net.needs_index:
            return self.guide_net(x, index)
        return self.guide_net(x)

    def posterior(self, x: torch.Tensor, index: Optional[torch.Tensor] = None):
        """Deprecated (pvae 0.1's name; it is q(z|x), not the posterior): use :meth:`guide_distribution`."""
        warnings.warn("VAE.posterior is deprecated: it returns q(z|x); use VAE.guide_distribution",
                      DeprecationWarning, stacklevel=2)
        return self.guide_distribution(x, index)

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
