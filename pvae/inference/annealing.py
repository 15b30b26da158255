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

:func:`bdmc` runs the schedule backwards from exact posterior samples of simulated data for an
upper bound (Grosse et al., 2015).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple, Union

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
    raise UsageError(f"unknown schedule {kind!r}; valid choices: linear, sigmoid")


def hmc_step(
    z: torch.Tensor,
    log_prob: Callable[[torch.Tensor], torch.Tensor],
    step_size: torch.Tensor,
    num_leapfrog: int = 10,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """One HMC transition for a batch of independent chains, leaving ``log_prob`` invariant.

    :param z: states ``(..., L)``; ``log_prob(z)`` has shape ``z.shape[:-1]``.
    :param step_size: leapfrog step size, broadcastable to ``z.shape[:-1]``.
    :returns: ``(new_z, accept_prob)`` with ``accept_prob`` of shape ``z.shape[:-1]``.
    Unit mass matrix; Metropolis correction per chain. Uses the global torch RNG.
    """
    eps = step_size.unsqueeze(-1)

    def grad_and_logp(state):
        with torch.enable_grad():
            state = state.detach().requires_grad_(True)
            lp = log_prob(state)
            (grad,) = torch.autograd.grad(lp.sum(), state)
        return grad.detach(), lp.detach()

    p0 = torch.randn_like(z)
    g, lp0 = grad_and_logp(z)
    q, p = z.detach(), p0 + 0.5 * eps * g
    for i in range(num_leapfrog):
        q = q + eps * p
        g, lp = grad_and_logp(q)
        if i < num_leapfrog - 1:
            p = p + eps * g
    p = p + 0.5 * eps * g
    log_accept = (lp - 0.5 * p.pow(2).sum(-1)) - (lp0 - 0.5 * p0.pow(2).sum(-1))
    log_accept = torch.nan_to_num(log_accept, nan=-math.inf)
    accept_prob = log_accept.clamp(max=0).exp()
    accept = torch.rand_like(accept_prob) < accept_prob
    return torch.where(accept.unsqueeze(-1), q, z), accept_prob


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


def _anneal(chains, z, betas, num_leapfrog, step_size, target_accept, adapt_step_size, bar=None):
    """Run chains ``z`` (C, B, L) along ``betas`` (increasing for AIS, decreasing for reverse
    AIS); return the accumulated log-weights (C, B) and the mean acceptance per datapoint."""
    xb = chains.xb

    def log_ratio(state):  # log p(x, z) - log r(z), shape (C, B)
        log_joint, log_r = chains.densities(state)
        return log_joint - log_r

    def target(beta):
        def log_f(state):  # log r(z) + beta [log p(x, z) - log r(z)]
            log_joint, log_r = chains.densities(state)
            return log_r + beta * (log_joint - log_r)

        return log_f

    log_w = torch.zeros(z.shape[:-1], dtype=torch.float64, device=xb.device)
    eps = torch.full((xb.shape[0],), float(step_size), dtype=xb.dtype, device=xb.device)
    accepts = []
    for t in range(1, betas.numel()):
        log_w += (betas[t] - betas[t - 1]).item() * log_ratio(z).double()
        if t == betas.numel() - 1:
            break  # the last transition would not change the weights
        z, acc = hmc_step(z, target(betas[t].item()), eps, num_leapfrog)
        accepts.append(acc.mean(0))
        if bar is not None:
            bar.update(1)
        if adapt_step_size:
            eps = eps * torch.exp(0.1 * (acc.mean(0) - target_accept))
    accept = (torch.stack(accepts).mean(0).double() if accepts
              else torch.full((xb.shape[0],), float("nan"), dtype=torch.float64, device=xb.device))
    return log_w, accept


def _betas(betas, num_steps) -> torch.Tensor:
    if isinstance(betas, str):
        betas = schedule(num_steps, betas)
    betas = torch.as_tensor(betas, dtype=torch.float64)
    if betas.dim() != 1 or betas.numel() < 2 or betas[0] != 0 or betas[-1] != 1 or bool((betas.diff() <= 0).any()):
        raise UsageError("betas must increase strictly from 0 to 1")
    return betas


def _start(vae, xb, start, num_chains):
    """The chains (:class:`_Chains`: which sites move, the densities along the path) and their
    initial states ``(C, B, L)`` drawn from the start distribution."""
    if start not in ("prior", "guide"):
        raise UsageError(f"unknown start {start!r}; valid choices: prior, guide")
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


def _estimate(name, log_w_parts, accept_parts, num_chains, reciprocal=False) -> Estimate:
    """log-mean-exp of the weights over chains; with ``reciprocal`` the weights estimate
    1/p(x) (reverse AIS) and the value is minus their log-mean-exp."""
    log_w = torch.cat(log_w_parts, dim=1).cpu()
    values = (torch.logsumexp(log_w, 0) - math.log(num_chains)) * (-1.0 if reciprocal else 1.0)
    stats = {"log_mean_w": values, "ess": importance_ess(log_w), "accept_rate": torch.cat(accept_parts).cpu()}
    return _importance_estimate(name, stats, num_chains)


def ais(
    vae,
    x: torch.Tensor,
    num_chains: int = 16,
    num_steps: int = 100,
    betas: Union[str, Sequence[float], torch.Tensor] = "sigmoid",
    start: str = "prior",
    num_leapfrog: int = 10,
    step_size: float = 0.05,
    target_accept: float = 0.65,
    adapt_step_size: bool = True,
    batch_size: int = 100,
    seed: Optional[int] = 0,
    progress: bool = False,
    cache=None,
) -> Estimate:
    """AIS estimate of :math:`\\log p(x)` per datapoint (nats).

    :param int num_chains: independent chains per datapoint (the estimate's ``num_samples``).
    :param int num_steps: number of intermediate distributions T (ignored if ``betas`` is a
        sequence).
    :param betas: ``"sigmoid"``, ``"linear"``, or an explicit increasing sequence from 0 to 1.
    :param str start: ``"prior"`` or ``"guide"`` (q(z|x)) as the initial distribution r.
    :param float step_size: initial HMC step size; with ``adapt_step_size`` it is adapted per
        datapoint after every transition, multiplying by ``exp(0.1 (a - target_accept))``
        where ``a`` is the mean acceptance probability over that datapoint's chains.
    :returns: :class:`~pvae.estimators.Estimate` named ``"ais"`` with ``extra["ess"]`` (over
        chains) and ``extra["accept_rate"]``; Monte Carlo standard error by the delta method.

    Cost: ``(T - 1) * (num_leapfrog + 1)`` gradient evaluations of log p(x, z) per chain.
    Parameters are not changed; ``seed`` fixes the draws without touching the global RNG.
    ``progress`` shows a tqdm bar over batches and transitions. ``cache``: a
    :class:`~pvae.estimators.BatchCache` to resume an interrupted run from.
    """
    num_chains = _check_positive_int("num_chains", num_chains)
    batch_size = _check_positive_int("batch_size", batch_size)
    betas = _betas(betas, num_steps)
    check_data(vae, x)
    bar = None
    if progress and distributed.is_main():
        from tqdm.auto import tqdm

        mine = len(distributed.my_batches(math.ceil(x.shape[0] / batch_size)))
        bar = tqdm(total=mine * (betas.numel() - 2), desc=f"AIS {num_chains} chains", unit="step", leave=False)
        if cache is not None:  # resumed minibatches
            bar.update(len(cache.batches) * (betas.numel() - 2))

    def chains(_, xb):
        runner, z0 = _start(vae, xb, start, num_chains)
        lw, acc = _anneal(runner, z0, betas, num_leapfrog, step_size, target_accept, adapt_step_size, bar)
        return {"log_w": lw, "accept": acc}

    try:
        with _evaluating(vae):  # minibatch by minibatch, each under its own seed (shardable)
            parts = per_batch(x, batch_size, seed, _device_of(vae) if is_streamed(x) else x.device, chains, cache)
    finally:
        if bar is not None:
            bar.close()
    return _estimate("ais", [p["log_w"] for p in parts], [p["accept"] for p in parts], num_chains)


#: the annealing settings of :func:`ais` and their defaults (shared by :func:`bdmc`)
_ANNEALING_DEFAULTS = {
    name: p.default for name, p in inspect.signature(ais).parameters.items()
    if name not in ("vae", "x", "batch_size", "seed", "progress", "cache")
}


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


def bdmc(vae, x: torch.Tensor, z_exact: torch.Tensor, seed: Optional[int] = 0, **ais_options) -> BDMCBounds:
    r"""Bidirectional Monte Carlo (Grosse et al., 2015) on data simulated from the model.

    For :math:`z^* \sim p(z)`, :math:`x \sim p(x|z^*)`, :math:`z^*` is an exact posterior
    sample for :math:`x`. Forward AIS from ``start`` gives a stochastic lower bound on
    :math:`\log p(x)`; reverse AIS from :math:`z^*` (the schedule run from 1 to 0) gives an
    unbiased estimate of :math:`1/p(x)`, hence a stochastic upper bound. The gap bounds the
    error of both.

    :param z_exact: ``(B, L)`` the latent codes the data were simulated from (every reverse
        chain starts there), or for a program with several continuous latent sites a dict
        site -> ``(B, ...)``.
    :param ais_options: the annealing settings of :func:`ais` (``num_chains``, ``num_steps``,
        ``betas``, ``start``, ``num_leapfrog``, ``step_size``, ``target_accept``,
        ``adapt_step_size``; its defaults), used by both directions.
    :returns: :class:`BDMCBounds` (``lower``, ``upper``, ``gap``).
    """
    if not isinstance(z_exact, dict) and (z_exact.dim() != 2 or z_exact.shape[0] != x.shape[0]):
        raise UsageError(f"z_exact must have shape ({x.shape[0]}, latent_dim), got {tuple(z_exact.shape)}")
    unknown = sorted(set(ais_options) - set(_ANNEALING_DEFAULTS))
    if unknown:
        raise UsageTypeError(f"bdmc got unknown option(s) {unknown}; valid: {', '.join(_ANNEALING_DEFAULTS)}")
    o = {**_ANNEALING_DEFAULTS, **ais_options}
    lower = ais(vae, x, batch_size=x.shape[0], seed=seed, **o)
    forward = _betas(o["betas"], o["num_steps"])
    with _evaluating(vae), seeded(None if seed is None else seed + 1, x.device):
        runner, z0 = _start(vae, x, o["start"], o["num_chains"])
        if isinstance(z_exact, dict):
            names = [name for name, _, _ in runner.layout]
            if sorted(z_exact) != sorted(names):
                raise UsageError(f"z_exact must give the continuous latent sites {names}, got {sorted(z_exact)}")
            z_exact = runner.flatten({k: v[None] for k, v in z_exact.items()})[0]
        if z0.shape[1:] != z_exact.shape:
            raise UsageError(f"z_exact must have shape {tuple(z0.shape[1:])}, got {tuple(z_exact.shape)}")
        z = z_exact.expand(o["num_chains"], *z_exact.shape).clone()
        lw, acc = _anneal(runner, z, forward.flip(0), o["num_leapfrog"], o["step_size"], o["target_accept"],
                          o["adapt_step_size"])
    upper = _estimate("reverse-ais", [lw], [acc], o["num_chains"], reciprocal=True)
    return BDMCBounds(lower, upper)
