r"""Annealed importance sampling (Neal, 2001) for :math:`\log p_\theta(x)`, per datapoint,
with Hamiltonian Monte Carlo transitions (as in Wu et al., 2017).

The geometric path from a tractable start :math:`r(z)` — the prior, or the guide
:math:`q(z|x)` — to the posterior is

.. math::

    \log f_\beta(z) = \log r(z) + \beta\,[\log p_\theta(x, z) - \log r(z)],
    \qquad 0 = \beta_0 < \beta_1 < \dots < \beta_T = 1 .

Each chain starts at :math:`z_0 \sim r`, accumulates
:math:`\log w = \sum_t (\beta_t - \beta_{t-1})[\log p(x, z_{t-1}) - \log r(z_{t-1})]` and moves
:math:`z_{t-1} \to z_t` by HMC leaving :math:`f_{\beta_t}` invariant. :math:`w` is an unbiased
estimate of :math:`p(x)`; the log-mean-exp over chains is therefore a stochastic lower bound
(biased down by Jensen), tight when the chains' weights agree. With the two-point schedule
``[0, 1]`` AIS is plain importance sampling from ``r``. The joint density comes from the
model program conditioned on the chains' states (:func:`pvae.engine.log_density`), and the
start distribution from the prior site of the model or the latent site of the guide program
(:func:`pvae.engine.log_weights`), so AIS follows an edited program. HMC moves every continuous
latent site of the program jointly (a hierarchy's levels together); discrete latent sites are
summed out exactly inside both densities (:func:`pvae.engine.log_density`,
:func:`pvae.engine.guide_log_density`).

The HMC transition is a kernel in the style of BlackJAX: :func:`hmc_kernel` maps an
:class:`HMCState` (position, log-density and its gradient) to the next state and an
:class:`HMCInfo` record, drawing its momenta and accept/reject uniforms from an explicit
:class:`torch.Generator`; the accepted proposal's log-density and gradient are carried into the
next transition, so an HMC step costs exactly ``num_leapfrog`` gradient evaluations. Along the
annealing path the target changes with the temperature, so the state is re-scored once per
temperature (one evaluation that also gives the weight increment). :class:`AISSettings` holds
the annealing settings and their defaults in one place.

:func:`bdmc` runs the schedule backwards from exact posterior samples of simulated data for an
upper bound (Grosse et al., 2015).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import asdict, dataclass, fields
from typing import Callable, NamedTuple, Optional, Tuple, Union

import numpy as np
import torch
from pyro.distributions import constraints

from pvae import distributed

from pvae.inference import engine
from pvae._rng import seeded
from pvae.errors import UsageError, UsageTypeError
from pvae.inference.estimators import (
    Estimate,
    _check_positive_int,
    _device_of,
    _evaluating,
    _importance_estimate,
    check_data,
    importance_ess,
    per_batch,
)
from pvae.data.streaming import is_streamed

__all__ = [
    "AISSettings",
    "BDMCBounds",
    "HMCInfo",
    "HMCState",
    "ais",
    "bdmc",
    "hmc_kernel",
    "schedule",
]

#: the temperature schedules :func:`schedule` knows
SCHEDULES = ("linear", "sigmoid")
#: the start distributions AIS can anneal from
STARTS = ("prior", "guide")


def schedule(num_steps: int, kind: str = "sigmoid", sharpness: float = 4.0) -> torch.Tensor:
    """Inverse temperatures :math:`\\beta_0 = 0 < \\dots < \\beta_T = 1` (``num_steps + 1``
    values): ``"linear"`` or ``"sigmoid"`` (denser at both ends; Grosse et al., 2015)."""
    num_steps = _check_positive_int("num_steps", num_steps)
    t = torch.linspace(0, 1, num_steps + 1, dtype=torch.float64)
    if kind == "linear":
        return t
    if kind == "sigmoid":
        s = torch.sigmoid(sharpness * (2 * t - 1))
        return (s - s[0]) / (s[-1] - s[0])
    raise UsageError(f"unknown schedule {kind!r}; valid choices: {', '.join(SCHEDULES)}")


# ---------------------------------------------------------------------------------- settings
def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or int(value) != value or value < 1:
        raise UsageError(f"AISSettings.{name} must be a positive integer, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class AISSettings:
    """The settings of an annealing run (:func:`ais`, both directions of :func:`bdmc`) and
    their defaults, in one place. Every field is checked on construction; a bad value raises
    :class:`~pvae.errors.UsageError` naming the field.

    :ivar int num_chains: independent chains per datapoint (the estimate's ``num_samples``).
    :ivar int num_steps: number of intermediate distributions T (ignored when ``betas`` is a
        sequence).
    :ivar betas: the temperature schedule: ``"sigmoid"`` or ``"linear"`` (:func:`schedule`
        with ``num_steps``), or an explicit sequence increasing strictly from 0 to 1 (stored as
        a tuple of floats).
    :ivar str start: the start distribution r: ``"prior"`` or ``"guide"`` (q(z|x)).
    :ivar int num_leapfrog: leapfrog steps per HMC transition.
    :ivar float step_size: the initial leapfrog step size.
    :ivar float target_accept: the mean acceptance probability the step size is adapted towards,
        in (0, 1).
    :ivar bool adapt_step_size: adapt the step size per datapoint after every transition,
        multiplying it by ``exp(0.1 (a - target_accept))`` where ``a`` is the mean acceptance
        probability over that datapoint's chains.
    """

    num_chains: int = 16
    num_steps: int = 100
    betas: Union[str, Tuple[float, ...]] = "sigmoid"
    start: str = "prior"
    num_leapfrog: int = 10
    step_size: float = 0.05
    target_accept: float = 0.65
    adapt_step_size: bool = True

    def __post_init__(self):
        def set_field(name, value):  # the dataclass is frozen
            object.__setattr__(self, name, value)

        for name in ("num_chains", "num_steps", "num_leapfrog", "step_size", "target_accept"):
            value = getattr(self, name)
            if isinstance(value, torch.Tensor) and value.numel() == 1 and value.dtype != torch.bool:
                set_field(name, value.item())  # a one-element tensor counts as its number
        for name in ("num_chains", "num_steps", "num_leapfrog"):
            set_field(name, _positive_int(name, getattr(self, name)))
        if isinstance(self.betas, str):
            if self.betas not in SCHEDULES:
                raise UsageError(f"AISSettings.betas: unknown schedule {self.betas!r}; valid choices: "
                                 f"{', '.join(SCHEDULES)} (or a sequence increasing from 0 to 1)")
        else:
            try:
                betas = torch.as_tensor(self.betas, dtype=torch.float64)
            except (TypeError, ValueError, RuntimeError) as exc:
                raise UsageError(f"AISSettings.betas must be a schedule name or a sequence of numbers, "
                                 f"got {self.betas!r}") from exc
            if (betas.dim() != 1 or betas.numel() < 2 or betas[0] != 0 or betas[-1] != 1
                    or bool((betas.diff() <= 0).any())):
                raise UsageError(f"AISSettings.betas must increase strictly from 0 to 1, got {betas.tolist()}")
            set_field("betas", tuple(betas.tolist()))
        if self.start not in STARTS:
            raise UsageError(f"AISSettings.start: unknown start {self.start!r}; valid choices: {', '.join(STARTS)}")
        if (isinstance(self.step_size, bool) or not isinstance(self.step_size, numbers.Real)
                or not math.isfinite(self.step_size) or self.step_size <= 0):
            raise UsageError(f"AISSettings.step_size must be a finite positive number, got {self.step_size!r}")
        set_field("step_size", float(self.step_size))
        if (isinstance(self.target_accept, bool) or not isinstance(self.target_accept, numbers.Real)
                or not 0 < self.target_accept < 1):
            raise UsageError(f"AISSettings.target_accept must be a probability in (0, 1), got {self.target_accept!r}")
        set_field("target_accept", float(self.target_accept))
        if not isinstance(self.adapt_step_size, (bool, np.bool_)):
            raise UsageError(f"AISSettings.adapt_step_size must be True or False, got {self.adapt_step_size!r}")
        set_field("adapt_step_size", bool(self.adapt_step_size))

    @classmethod
    def field_names(cls) -> Tuple[str, ...]:
        """The names of the settings, in order (the keywords :func:`ais` and :func:`bdmc` take)."""
        return tuple(f.name for f in fields(cls))

    def replace(self, **overrides) -> AISSettings:
        """A copy with ``overrides`` (field names) changed and checked; an unknown name raises
        :class:`~pvae.errors.UsageTypeError` naming it and listing the valid ones."""
        _check_setting_names("AISSettings.replace", overrides)
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict:
        """The settings as plain values (``betas`` a name or a list of floats), e.g. for a
        report or a JSON file; ``AISSettings(**d)`` rebuilds them."""
        out = asdict(self)
        if not isinstance(out["betas"], str):
            out["betas"] = list(out["betas"])
        return out

    def temperatures(self) -> torch.Tensor:
        """The inverse temperatures :math:`\\beta_0 = 0 < \\dots < \\beta_T = 1`, float64."""
        if isinstance(self.betas, str):
            return schedule(self.num_steps, self.betas)
        return torch.tensor(self.betas, dtype=torch.float64)


def _settings(caller: str, settings: Optional[AISSettings], overrides: dict) -> AISSettings:
    """``settings`` (default :class:`AISSettings`) with the keyword ``overrides`` applied."""
    if settings is None:
        settings = AISSettings()
    elif not isinstance(settings, AISSettings):
        was = {"ais": "num_chains", "bdmc": "seed"}.get(caller)  # the argument that used to stand there
        hint = (f" ({was}, which used to stand there, is a keyword now: {was}=...)"
                if was and isinstance(settings, numbers.Number) else "")
        raise UsageTypeError(f"{caller}: settings must be an AISSettings or None, got "
                             f"{type(settings).__name__} {settings!r}{hint}")
    _check_setting_names(caller, overrides)
    return dataclasses.replace(settings, **overrides) if overrides else settings


def _check_setting_names(caller: str, overrides: dict) -> None:
    unknown = sorted(set(overrides) - set(AISSettings.field_names()))
    if unknown:
        raise UsageTypeError(f"{caller} got unknown option(s) {unknown}; valid: {', '.join(AISSettings.field_names())}")


# ---------------------------------------------------------------------------------- HMC kernel
class HMCState(NamedTuple):
    """The state of a batch of independent HMC chains: what a transition needs of the current
    point, so that nothing is recomputed there.

    :ivar torch.Tensor position: ``(..., L)``, one point per chain.
    :ivar torch.Tensor log_density: the target's log-density at ``position``, ``(...)``.
    :ivar torch.Tensor log_density_grad: its gradient in ``position``, ``(..., L)``.
    """

    position: torch.Tensor
    log_density: torch.Tensor
    log_density_grad: torch.Tensor

    @classmethod
    def init(cls, position: torch.Tensor, log_density_fn: Callable[[torch.Tensor], torch.Tensor]) -> HMCState:
        """The state at ``position`` under ``log_density_fn`` (one gradient evaluation)."""
        log_density, log_density_grad = _log_density_and_grad(log_density_fn, position)
        return cls(position.detach(), log_density, log_density_grad)


class HMCInfo(NamedTuple):
    """What one :func:`hmc_kernel` transition did.

    :ivar torch.Tensor acceptance_prob: the Metropolis acceptance probability
        :math:`\\min(1, e^{-\\Delta H})` per chain, ``(...)``, in [0, 1] (0 for a proposal whose
        energy is not a number).
    :ivar torch.Tensor is_accepted: whether each chain moved to its proposal, bool ``(...)``.
    :ivar torch.Tensor step_size: the leapfrog step size used (as passed, broadcastable to the
        chains' shape).
    :ivar int num_leapfrog: leapfrog steps taken (= gradient evaluations of the transition).
    """

    acceptance_prob: torch.Tensor
    is_accepted: torch.Tensor
    step_size: torch.Tensor
    num_leapfrog: int


def _log_density_and_grad(log_density_fn, position: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``log_density_fn(position)`` ``(...)`` and its gradient in ``position`` ``(..., L)``, detached."""
    with torch.enable_grad():
        position = position.detach().requires_grad_(True)
        log_density = log_density_fn(position)
        (log_density_grad,) = torch.autograd.grad(log_density.sum(), position)
    return log_density.detach(), log_density_grad.detach()


def _kinetic_energy(momentum: torch.Tensor) -> torch.Tensor:
    """:math:`\\frac12 |p|^2` per chain (unit mass matrix)."""
    return 0.5 * momentum.pow(2).sum(-1)


def hmc_kernel(
    state: HMCState,
    log_density_fn: Callable[[torch.Tensor], torch.Tensor],
    step_size: Union[float, torch.Tensor],
    num_leapfrog: int,
    generator: torch.Generator,
) -> Tuple[HMCState, HMCInfo]:
    """One HMC transition for a batch of independent chains, leaving ``log_density_fn``
    invariant (unit mass matrix, leapfrog integrator, a Metropolis correction per chain).

    :param state: the chains' :class:`HMCState`; its ``log_density`` and ``log_density_grad``
        must be those of ``log_density_fn`` at ``state.position`` (:meth:`HMCState.init`).
    :param log_density_fn: ``(..., L) -> (...)``, differentiable in its argument.
    :param step_size: leapfrog step size, a number or a tensor broadcastable to the chains'
        shape ``state.position.shape[:-1]`` (e.g. one per datapoint).
    :param int num_leapfrog: leapfrog steps; the transition evaluates ``log_density_fn`` and
        its gradient exactly this many times (at the proposal's points; the start point's come
        from ``state``).
    :param generator: the :class:`torch.Generator` (on ``state.position``'s device) that the
        momenta and the accept/reject uniforms are drawn from; the global RNG is not used.
    :returns: ``(new_state, info)``: each chain's proposal where accepted, else its old state
        (position, log-density and gradient together), and the :class:`HMCInfo`.
    """
    num_leapfrog = _check_positive_int("num_leapfrog", num_leapfrog)
    position0 = state.position
    if not isinstance(generator, torch.Generator):
        raise UsageTypeError(f"hmc_kernel draws from an explicit torch.Generator; got {type(generator).__name__}")
    if generator.device.type != position0.device.type:
        raise UsageError(f"hmc_kernel: the generator is on {generator.device} but the chains are on "
                         f"{position0.device}; create it with torch.Generator(device=position.device)")
    step_size = torch.as_tensor(step_size, dtype=position0.dtype, device=position0.device)
    eps = step_size.unsqueeze(-1)  # broadcast over the coordinates
    momentum0 = torch.randn(position0.shape, generator=generator, dtype=position0.dtype, device=position0.device)
    position = position0
    momentum = momentum0 + 0.5 * eps * state.log_density_grad
    for i in range(num_leapfrog):
        position = position + eps * momentum
        log_density, log_density_grad = _log_density_and_grad(log_density_fn, position)
        if i < num_leapfrog - 1:
            momentum = momentum + eps * log_density_grad
    momentum = momentum + 0.5 * eps * log_density_grad
    # log of exp(-H(proposal)) / exp(-H(start)), H = -log density + kinetic energy
    log_accept = (log_density - _kinetic_energy(momentum)) - (state.log_density - _kinetic_energy(momentum0))
    log_accept = torch.nan_to_num(log_accept, nan=-math.inf)
    acceptance_prob = log_accept.clamp(max=0).exp()
    uniform = torch.rand(acceptance_prob.shape, generator=generator, dtype=acceptance_prob.dtype,
                         device=acceptance_prob.device)
    is_accepted = uniform < acceptance_prob
    moved = is_accepted.unsqueeze(-1)
    new_state = HMCState(
        position=torch.where(moved, position, position0),
        log_density=torch.where(is_accepted, log_density, state.log_density),
        log_density_grad=torch.where(moved, log_density_grad, state.log_density_grad),
    )
    return new_state, HMCInfo(acceptance_prob, is_accepted, step_size, num_leapfrog)


#: mixed into a minibatch's seed for the kernel's generator, so that its momenta and uniforms
#: are a stream of their own: seeded with the minibatch's seed itself, the kernel's first momenta
#: would repeat the noise the start states were drawn with (for a standard normal prior, equal
#: them), which biases the estimate (tests/test_ais.py's every-prior test fails so)
_KERNEL_STREAM = 0x484D43  # "HMC"


def _kernel_generator(seed: Optional[int], device) -> torch.Generator:
    """The explicit generator of the HMC kernel for one minibatch, on ``device``: seeded from
    :class:`numpy.random.SeedSequence` ``(seed, _KERNEL_STREAM)`` for the minibatch's seed
    ``seed`` (:func:`pvae.distributed.batch_seed`), so the draws are deterministic and do not
    depend on which process computes the minibatch; with ``seed=None`` from one draw of the
    global stream (which it advances, like the rest of an unseeded run)."""
    if seed is None:
        kernel_seed = int(torch.randint(0, 2**63 - 1, (1,)).item())
    else:
        sequence = np.random.SeedSequence([int(seed) % 2**63, _KERNEL_STREAM])
        kernel_seed = int(sequence.generate_state(1, np.uint64)[0] % 2**63)
    generator = torch.Generator(device=device)
    generator.manual_seed(kernel_seed)
    return generator


# ---------------------------------------------------------------------------------- annealing
class _Chains:
    r"""The continuous latent sites that AIS moves, as one flat state per chain ``(C, B, L)``
    (every continuous site of the program, concatenated in the proposal's order), and the two
    log-densities along the path: :math:`\log p(x, z)` (discrete latent sites summed out
    exactly) and the start density :math:`\log r(z)` (the prior :math:`p(z)`, or the guide
    :math:`q(z|x)`, discrete sites summed out likewise)."""

    def __init__(self, vae, xb, start, samples):
        self.vae, self.xb, self.start = vae, xb, start
        self.layout = []
        for name, value in samples.latents.items():
            d = samples.guide_dists[name]
            if getattr(d, "has_enumerate_support", False) or not value.is_floating_point():
                continue  # a discrete site: summed out inside the densities
            support = d.support
            while hasattr(support, "base_constraint"):  # independent(...), mixtures of real components
                support = support.base_constraint
            if support is not constraints.real:
                raise UsageError(f"AIS's HMC moves real-valued latents; site {name!r} has support {d.support}")
            event = tuple(value.shape[2:])
            self.layout.append((name, event, math.prod(event)))
        if not self.layout:
            raise UsageError("AIS moves continuous latent sites; this program has none "
                             f"(latent sites: {sorted(samples.latents)})")
        self.fast = engine.use_fast_path(vae) and len(self.layout) == 1
        self.r = samples.guide_dists[self.layout[0][0]] if self.fast else None
        self.site = self.layout[0][0]

    def flatten(self, latents) -> torch.Tensor:
        parts = [latents[name].reshape(*latents[name].shape[:2], -1) for name, _, _ in self.layout]
        return parts[0] if len(parts) == 1 else torch.cat(parts, -1)

    def unflatten(self, state) -> dict:
        out, at = {}, 0
        for name, event, size in self.layout:
            out[name] = state[..., at : at + size].reshape(*state.shape[:-1], *event)
            at += size
        return out

    def densities(self, state):
        """``(log p(x, z), log r(z))`` at ``state``, each ``(C, B)``."""
        latents = self.unflatten(state)
        log_lik, log_prior = engine.log_density(self.vae, self.xb, latents)
        if self.start == "prior":
            return log_lik + log_prior, log_prior
        if self.fast:
            return log_lik + log_prior, self.r.log_prob(state)
        return log_lik + log_prior, engine.guide_log_density(self.vae, self.xb, latents)

    def log_target(self, beta: float) -> Callable[[torch.Tensor], torch.Tensor]:
        r"""The intermediate target :math:`\log f_\beta(z) = \log r(z) + \beta[\log p(x, z) -
        \log r(z)]` as a function of the state, ``(C, B, L) -> (C, B)``."""

        def log_density(state):
            log_joint, log_start = self.densities(state)
            return log_start + beta * (log_joint - log_start)

        return log_density

    def rescore(self, position, beta: Optional[float]) -> Tuple[torch.Tensor, Optional[HMCState]]:
        r"""One evaluation of the densities at ``position``: the log-ratio :math:`\log p(x, z) -
        \log r(z)` ``(C, B)`` (the weight increment per unit of temperature) and, unless ``beta``
        is None, the :class:`HMCState` under the target at temperature ``beta`` (the same value
        :meth:`log_target` gives, and its gradient)."""
        if beta is None:
            log_joint, log_start = self.densities(position)
            return (log_joint - log_start).detach(), None
        with torch.enable_grad():
            position = position.detach().requires_grad_(True)
            log_joint, log_start = self.densities(position)
            log_ratio = log_joint - log_start
            log_density = log_start + beta * log_ratio
            (log_density_grad,) = torch.autograd.grad(log_density.sum(), position)
        return log_ratio.detach(), HMCState(position.detach(), log_density.detach(), log_density_grad.detach())


def _anneal(chains: _Chains, position: torch.Tensor, betas: torch.Tensor, settings: AISSettings,
            generator: torch.Generator, bar=None):
    """Run the chains from ``position`` (C, B, L) along ``betas`` (increasing for AIS,
    decreasing for reverse AIS), the HMC kernel drawing from ``generator``. Returns the
    accumulated log-weights (C, B, float64), the mean acceptance probability per datapoint over
    the transitions (NaN without any) and the step size of the last transition per datapoint.

    Per transition: one evaluation of the densities at the current point (the weight increment
    and, the target having changed with the temperature, the state under the new target), then
    the kernel's ``num_leapfrog``; the last temperature needs the weight only."""
    xb = chains.xb
    log_w = torch.zeros(position.shape[:-1], dtype=torch.float64, device=xb.device)
    step_size = torch.full((xb.shape[0],), settings.step_size, dtype=xb.dtype, device=xb.device)
    acceptance = []
    for t in range(1, betas.numel()):
        last = t == betas.numel() - 1  # the last transition would not change the weights
        beta = betas[t].item()
        log_ratio, state = chains.rescore(position, None if last else beta)
        log_w += (betas[t] - betas[t - 1]).item() * log_ratio.double()
        if last:
            break
        state, info = hmc_kernel(state, chains.log_target(beta), step_size, settings.num_leapfrog, generator)
        position = state.position
        mean_accept = info.acceptance_prob.mean(0)  # per datapoint, over its chains
        acceptance.append(mean_accept)
        if bar is not None:
            bar.update(1)
        if settings.adapt_step_size:
            step_size = step_size * torch.exp(0.1 * (mean_accept - settings.target_accept))
    nan = torch.full((xb.shape[0],), float("nan"), dtype=torch.float64, device=xb.device)
    accept_rate = torch.stack(acceptance).mean(0).double() if acceptance else nan
    last_step_size = info.step_size.double() if acceptance else nan
    return log_w, accept_rate, last_step_size


def _start(vae, xb, start, num_chains):
    """The chains (:class:`_Chains`: which sites move, the densities along the path) and their
    initial states ``(C, B, L)`` drawn from the start distribution (global RNG: the caller
    seeds it)."""
    if start not in STARTS:
        raise UsageError(f"unknown start {start!r}; valid choices: {', '.join(STARTS)}")
    guide_net = getattr(vae, "guide_net", None)
    if start == "guide" and not getattr(guide_net, "scores_any_point", True):
        raise UsageError(
            f"AIS from the guide evaluates q(z|x) at the chains' moved states, and the "
            f"{type(guide_net).__name__} can only score its own samples (a flow without an analytic "
            "inverse); use start='prior' (--ais-start prior)"
        )
    samples = engine.log_weights(vae, xb, num_chains, proposal="guide" if start == "guide" else "prior",
                                 enumerate=False)
    if start == "guide":
        samples.require_density("AIS from the guide")
    chains = _Chains(vae, xb, start, samples)
    return chains, chains.flatten(samples.latents).detach()


def _estimate(name, parts, num_chains, reciprocal=False) -> Estimate:
    """log-mean-exp of the weights over chains; with ``reciprocal`` the weights estimate
    1/p(x) (reverse AIS) and the value is minus their log-mean-exp. ``parts``: the minibatches'
    ``{"log_w", "accept", "step_size"}``."""
    log_w = torch.cat([p["log_w"] for p in parts], dim=1).cpu()
    values = (torch.logsumexp(log_w, 0) - math.log(num_chains)) * (-1.0 if reciprocal else 1.0)
    # (a minibatch cached by an older version has no step size)
    step_size = [p.get("step_size", torch.full_like(p["accept"], float("nan"))) for p in parts]
    stats = {"log_mean_w": values, "ess": importance_ess(log_w),
             "accept_rate": torch.cat([p["accept"] for p in parts]).cpu(), "step_size": torch.cat(step_size).cpu()}
    return _importance_estimate(name, stats, num_chains)


def ais(
    program,
    x: torch.Tensor,
    settings: Optional[AISSettings] = None,
    *,
    batch_size: int = 100,
    seed: Optional[int] = 0,
    progress: bool = False,
    cache=None,
    **overrides,
) -> Estimate:
    """AIS estimate of :math:`\\log p(x)` per datapoint (nats).

    :param program: a :class:`~pvae.model.VAE` or a :class:`~pvae.engine.ModelGuidePair`.
    :param settings: the :class:`AISSettings` (default: its defaults: 16 chains, 100 steps on
        the sigmoid schedule from the prior, 10 leapfrog steps of initial size 0.05 adapted
        towards acceptance 0.65).
    :param overrides: fields of :class:`AISSettings` that replace those of ``settings``
        (``num_chains=..., num_steps=..., betas=..., start=..., num_leapfrog=..., step_size=...,
        target_accept=..., adapt_step_size=...``); another name is an error that lists them.
    :param int batch_size: datapoints annealed together.
    :param seed: minibatch ``i`` runs under the seed :func:`pvae.distributed.batch_seed`
        ``(seed, i)``: the start states are drawn from the global RNG seeded with it (forked, so the
        caller's RNG is untouched), and the HMC kernel draws from its own
        :class:`torch.Generator` on the data's device, seeded from ``(that seed, a fixed stream
        tag)``. The same seed gives the same estimate. ``seed=None`` draws from (and advances) the
        global stream instead.
    :returns: :class:`~pvae.estimators.Estimate` named ``"ais"`` with ``extra["ess"]`` (over
        chains), ``extra["accept_rate"]`` (mean acceptance probability) and
        ``extra["step_size"]`` (the step size the last transition used, per datapoint: with
        ``adapt_step_size``, where the adaptation had taken it);
        Monte Carlo standard error by the delta method.

    Cost per chain: ``(T - 1) * (num_leapfrog + 1)`` gradient evaluations of the densities
    (``num_leapfrog`` per HMC transition, one per temperature) and one more evaluation without
    gradient. Parameters are not changed. ``progress`` shows a tqdm bar over batches and
    transitions. ``cache``: a :class:`~pvae.estimators.BatchCache` to resume an interrupted run
    from.
    """
    settings = _settings("ais", settings, overrides)
    batch_size = _check_positive_int("batch_size", batch_size)
    betas = settings.temperatures()
    check_data(program, x)
    bar = None
    if progress and distributed.is_main():
        from pvae._progress import progress_bar_class

        tqdm = progress_bar_class()

        mine = len(distributed.my_batches(math.ceil(x.shape[0] / batch_size)))
        bar = tqdm(total=mine * (betas.numel() - 2), desc=f"AIS {settings.num_chains} chains", unit="step",
                   leave=False)
        if cache is not None:  # resumed minibatches
            bar.update(len(cache.batches) * (betas.numel() - 2))

    def minibatch(start, xb):  # runs under the minibatch's seed (per_batch)
        chains, position = _start(program, xb, settings.start, settings.num_chains)
        generator = _kernel_generator(distributed.batch_seed(seed, start // batch_size), position.device)
        log_w, accept, step_size = _anneal(chains, position, betas, settings, generator, bar)
        return {"log_w": log_w, "accept": accept, "step_size": step_size}

    try:
        with _evaluating(program):  # minibatch by minibatch, each under its own seed (shardable)
            parts = per_batch(x, batch_size, seed, _device_of(program) if is_streamed(x) else x.device, minibatch, cache)
    finally:
        if bar is not None:
            bar.close()
    return _estimate("ais", parts, settings.num_chains)


@dataclass(frozen=True)
class BDMCBounds:
    """The sandwich of :func:`bdmc`: ``lower`` (forward AIS) and ``upper`` (reverse AIS)
    estimates of log p(x), each an :class:`~pvae.estimators.Estimate`."""

    lower: Estimate
    upper: Estimate

    @property
    def gap(self) -> torch.Tensor:
        """Per datapoint upper minus lower bound (nats): it bounds the error of both."""
        return self.upper.values - self.lower.values


def bdmc(program, x: torch.Tensor, z_exact, settings: Optional[AISSettings] = None, *,
         seed: Optional[int] = 0, **overrides) -> BDMCBounds:
    r"""Bidirectional Monte Carlo (Grosse et al., 2015) on data simulated from the model.

    For :math:`z^* \sim p(z)`, :math:`x \sim p(x|z^*)`, :math:`z^*` is an exact posterior
    sample for :math:`x`. Forward AIS from ``start`` gives a stochastic lower bound on
    :math:`\log p(x)`; reverse AIS from :math:`z^*` (the schedule run from 1 to 0) gives an
    unbiased estimate of :math:`1/p(x)`, hence a stochastic upper bound. The gap bounds the
    error of both.

    :param z_exact: ``(B, L)`` the latent codes the data were simulated from (every reverse
        chain starts there), or for a program with several continuous latent sites a dict
        site -> ``(B, ...)``.
    :param settings: the :class:`AISSettings` of both directions (default: its defaults);
        ``overrides`` (its field names, as for :func:`ais`) replace fields of it.
    :param seed: the forward run is :func:`ais` with ``seed`` (all datapoints in one
        minibatch); the reverse run's draws come from ``seed + 1`` (its kernel's generator is
        made from it as for a minibatch of :func:`ais`). ``None``: the global stream.
    :returns: :class:`BDMCBounds` (``lower``, ``upper``, ``gap``).
    """
    settings = _settings("bdmc", settings, overrides)
    if not isinstance(z_exact, dict) and (z_exact.dim() != 2 or z_exact.shape[0] != x.shape[0]):
        raise UsageError(f"z_exact must have shape ({x.shape[0]}, latent_dim), got {tuple(z_exact.shape)}")
    lower = ais(program, x, settings, batch_size=x.shape[0], seed=seed)
    forward = settings.temperatures()
    reverse_seed = None if seed is None else seed + 1
    with _evaluating(program), seeded(reverse_seed, x.device):
        chains, position0 = _start(program, x, settings.start, settings.num_chains)
        if isinstance(z_exact, dict):
            names = [name for name, _, _ in chains.layout]
            if sorted(z_exact) != sorted(names):
                raise UsageError(f"z_exact must give the continuous latent sites {names}, got {sorted(z_exact)}")
            z_exact = chains.flatten({k: v[None] for k, v in z_exact.items()})[0]
        if position0.shape[1:] != z_exact.shape:
            raise UsageError(f"z_exact must have shape {tuple(position0.shape[1:])}, got {tuple(z_exact.shape)}")
        position = z_exact.expand(settings.num_chains, *z_exact.shape).clone()
        generator = _kernel_generator(reverse_seed, position.device)
        log_w, accept, step_size = _anneal(chains, position, forward.flip(0), settings, generator)
    upper = _estimate("reverse-ais", [{"log_w": log_w, "accept": accept, "step_size": step_size}],
                      settings.num_chains, reciprocal=True)
    return BDMCBounds(lower, upper)
