r"""One engine: per-datapoint log-weights derived from the model and guide programs.

Everything pvae computes about a model — training objectives, the ELBO, importance-weighted
bounds, the naive prior Monte Carlo estimate, AIS end points, diagnostics — starts from
:func:`log_weights`: draw ``K`` samples per datapoint from a proposal (the guide program, or
the model's own prior), replay the model on them, and keep, per datapoint and sample,

.. math::

    \log w_k = \underbrace{\textstyle\sum_{\text{observed}} \log p}_{\text{log\_likelihood}}
    + \underbrace{\textstyle\sum_{\text{latent}} \log p}_{\text{log\_prior}}
    - \underbrace{\textstyle\sum_{\text{guide}} \log q}_{\text{log\_guide}},

each site's log-probability summed over its non-plate dimensions (as Pyro's ``RenyiELBO``
does), the ``K`` samples vectorized in an outer plate :data:`PARTICLE_PLATE`. Unlike
:func:`pyro.infer.importance.vectorized_importance_weights`, which sums over the whole batch,
the result keeps one weight per datapoint: shape ``(K, B)``.

The *programs are the definition*: a user who overrides ``VAE.model`` / ``VAE.guide``, adds a
site, wraps a program in a :mod:`pyro.poutine` handler, or brings a model/guide pair of their
own (:class:`ModelGuidePair`) changes every number pvae reports. A closed-form fast path
(:meth:`pvae.model.VAE._fast_log_weights`, the same arithmetic without tracing) is taken only
for a :class:`~pvae.model.VAE` whose programs are pvae's own, outside any Pyro handler; the
conformance tests check it equals the trace path on the same noise for every registered part.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

import pyro
import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.poutine.runtime import _PYRO_STACK
from pyro.poutine.util import site_is_subsample

from .errors import UsageError

_QUIET = [0]  # > 0 while the engine runs programs for densities (no param sites needed there)


@contextlib.contextmanager
def quiet_params():
    """Inside, programs do not announce their parameters to Pyro (pvae's engine traces the
    programs for densities only; announcing would cost a message per parameter)."""
    _QUIET[0] += 1
    try:
        yield
    finally:
        _QUIET[0] -= 1


def params_quiet() -> bool:
    return _QUIET[0] > 0


#: the outer plate (dim ``-1 - max_plate_nesting``) that vectorizes samples per datapoint
PARTICLE_PLATE = "_pvae_particles"


@dataclass
class WeightedSamples:
    """``K`` samples per datapoint from a proposal and their log-density terms, each ``(K, B)``
    in nats. ``log_weight`` is :math:`\\log p(x, z) - \\log r(z)` for the proposal ``r``.

    :ivar log_likelihood: sum of the model's observed sites' log-probs.
    :ivar log_prior: sum of the model's latent sites' log-probs.
    :ivar log_guide: sum of the proposal's log-probs (the guide's sites; for the prior
        proposal it equals ``log_prior``).
    :ivar latents: site name -> sampled value, ``(K, B, ...)``.
    :ivar guide_dists: site name -> the proposal's distribution at that site (batch
        broadcastable to ``(K, B)``), for closed-form KLs and stopped-gradient densities.
    :ivar prior_dists: site name -> the model's distribution at that latent site.
    :ivar path: ``"trace"`` or ``"fast"``.
    """

    log_likelihood: torch.Tensor
    log_prior: torch.Tensor
    log_guide: torch.Tensor
    latents: Dict[str, torch.Tensor]
    guide_dists: Dict[str, object] = field(default_factory=dict)
    prior_dists: Dict[str, object] = field(default_factory=dict)
    path: str = "trace"
    #: site name -> (log p, log q) of that latent site, each ``(K, B)``
    site_terms: Dict[str, tuple] = field(default_factory=dict)

    @property
    def log_weight(self) -> torch.Tensor:
        """:math:`\\log p(x, z_k) - \\log r(z_k)`, ``(K, B)``."""
        return self.log_likelihood + self.log_prior - self.log_guide

    @property
    def log_joint(self) -> torch.Tensor:
        """:math:`\\log p(x, z_k)`, ``(K, B)``."""
        return self.log_likelihood + self.log_prior

    @property
    def log_ratio(self) -> torch.Tensor:
        """:math:`\\log p(z_k) - \\log q(z_k|x)` (minus the single-sample KL term), ``(K, B)``."""
        return self.log_prior - self.log_guide


class ModelGuidePair:
    """A model/guide pair of the user's own, for pvae's estimators, objectives and diagnostics.

    :param model: a Pyro program ``model(x, index=None)`` whose datapoints are indexed by
        the plate named ``data_plate`` (every sample site inside it), with observed sites
        carrying ``obs=x``.
    :param guide: a Pyro program ``guide(x, index=None)`` sampling every latent site of the
        model, inside the same plate.
    :param int max_plate_nesting: the number of plates the programs nest (pvae's: 1);
        samples are vectorized in a plate just outside them.
    :param str data_plate: the name of the plate over datapoints.
    :param module: optional, the ``torch.nn.Module`` whose parameters the programs use
        (for training and for eval-mode switching).
    """

    def __init__(self, model: Callable, guide: Callable, max_plate_nesting: int = 1,
                 data_plate: str = "data", module: Optional[torch.nn.Module] = None):
        self.model = model
        self.guide = guide
        self.max_plate_nesting = int(max_plate_nesting)
        self.data_plate = data_plate
        self.module = module

    def parameters(self):
        return self.module.parameters() if self.module is not None else iter(())

    def modules(self):
        return self.module.modules() if self.module is not None else iter(())

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        return torch.device("cpu")


def handlers_active() -> bool:
    """Whether some Pyro handler (condition, scale, trace, ...) is on the stack: a fast path
    that bypasses the programs would ignore it."""
    return len(_PYRO_STACK) > 0


def use_fast_path(pair, path: str = "auto") -> bool:
    """Decide the computation path. ``"auto"`` takes the fast path only where it is exactly the
    program: a :class:`~pvae.model.VAE` whose ``model``/``guide`` are pvae's own (not overridden
    in a subclass or on the instance) and no Pyro handler active. ``"trace"`` never takes it;
    ``"fast"`` insists (an error where it does not apply)."""
    if path not in ("auto", "trace", "fast"):
        raise UsageError(f"unknown path {path!r}; valid choices: auto, trace, fast")
    if path == "trace":
        return False
    ok = bool(getattr(pair, "programs_are_builtin", lambda: False)()) and not handlers_active()
    if path == "fast" and not ok:
        raise UsageError(
            "the fast path computes pvae's built-in model and guide; this pair's programs are "
            "overridden or run under a Pyro handler, so only path='trace' computes them"
        )
    return ok


def _data_dim(site, data_plate: str) -> int:
    for frame in site["cond_indep_stack"]:
        if frame.name == data_plate:
            return frame.dim
    raise UsageError(
        f"sample site {site['name']!r} is outside the data plate {data_plate!r}: per-datapoint "
        "log-weights need every sample site inside the plate over datapoints (a site outside it "
        "couples all datapoints of a batch)"
    )


def per_datapoint(log_prob: torch.Tensor, site, data_plate: str, particle_dim: int, shape) -> torch.Tensor:
    """Sum a site's log-prob (or KL) over every dimension except the particle and data-plate
    dimensions and broadcast it to ``shape = (K, B)``."""
    data_dim = _data_dim(site, data_plate)
    n = max(log_prob.dim(), -particle_dim)
    log_prob = log_prob.reshape((1,) * (n - log_prob.dim()) + tuple(log_prob.shape))
    drop = [d for d in range(-n, 0) if d not in (particle_dim, data_dim)]
    if drop:
        log_prob = log_prob.sum(drop, keepdim=True)
    return log_prob.reshape(log_prob.shape[particle_dim], log_prob.shape[data_dim]).expand(shape)


def _site_log_prob(site) -> torch.Tensor:
    """The site's log-prob, scaled and masked as Pyro's ``Trace.compute_log_prob`` does."""
    log_p = site["fn"].log_prob(site["value"], *site["args"], **site["kwargs"])
    return scale_and_mask(log_p, site["scale"], site["mask"])


def _sample_sites(trace):
    return [s for s in trace.nodes.values() if s["type"] == "sample" and not site_is_subsample(s)]


def _particles(fn: Callable, num_samples: int, dim: int) -> Callable:
    def vectorized(*args, **kwargs):
        with pyro.plate(PARTICLE_PLATE, num_samples, dim=dim):
            return fn(*args, **kwargs)

    return vectorized


def _plates(pair):
    """The pair's data-plate name and the dimension of the particle plate just outside its plates."""
    return getattr(pair, "data_plate", "data"), -1 - int(getattr(pair, "max_plate_nesting", 1))


@quiet_params()
def _trace_log_weights(pair, x, num_samples, index, proposal) -> WeightedSamples:
    data_plate, particle_dim = _plates(pair)
    shape = (num_samples, x.shape[0])
    model = _particles(pair.model, num_samples, particle_dim)
    zero = torch.zeros(shape, dtype=x.dtype, device=x.device)
    log_guide = zero
    guide_dists: Dict[str, object] = {}
    guide_terms: Dict[str, torch.Tensor] = {}
    if proposal == "guide":
        guide = _particles(pair.guide, num_samples, particle_dim)
        guide_trace = poutine.trace(guide).get_trace(x, index)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x, index)
        guide_sites = _sample_sites(guide_trace)
        for site in guide_sites:
            if site["is_observed"]:
                continue
            term = per_datapoint(_site_log_prob(site), site, data_plate, particle_dim, shape)
            log_guide = log_guide + term
            guide_dists[site["name"]] = site["fn"]
            guide_terms[site["name"]] = term
    else:
        model_trace = poutine.trace(model).get_trace(x, index)
        guide_sites = []
    log_likelihood, log_prior = zero, zero
    latents, prior_dists, site_terms = {}, {}, {}
    guide_names = {s["name"] for s in guide_sites if not s["is_observed"]}
    for site in _sample_sites(model_trace):
        term = per_datapoint(_site_log_prob(site), site, data_plate, particle_dim, shape)
        if site["is_observed"]:
            log_likelihood = log_likelihood + term
            continue
        if proposal == "guide" and site["name"] not in guide_names:
            raise UsageError(
                f"the model's latent site {site['name']!r} is not sampled by the guide; every latent "
                "site needs a guide site of the same name for importance weights"
            )
        log_prior = log_prior + term
        latents[site["name"]] = site["value"]
        prior_dists[site["name"]] = site["fn"]
        site_terms[site["name"]] = (term, guide_terms.get(site["name"], term))
    extra = guide_names - set(latents)
    if extra:
        raise UsageError(f"the guide samples site(s) {sorted(extra)} that the model does not have")
    if proposal == "prior":
        log_guide, guide_dists = log_prior, dict(prior_dists)
    return WeightedSamples(log_likelihood, log_prior, log_guide, latents, guide_dists, prior_dists, "trace",
                           site_terms)


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value or value < 1:
        raise UsageError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def log_weights(pair, x: torch.Tensor, num_samples: int, index: Optional[torch.Tensor] = None,
                proposal: str = "guide", path: str = "auto") -> WeightedSamples:
    r"""``num_samples`` samples per datapoint from the proposal and their log-weights, per
    datapoint: the one function every estimator, objective and diagnostic calls.

    :param pair: a :class:`~pvae.model.VAE` or a :class:`ModelGuidePair`.
    :param x: data ``(B, D)``, passed to the programs as ``model(x, index)``, ``guide(x, index)``.
    :param int num_samples: K, vectorized in the plate :data:`PARTICLE_PLATE`.
    :param index: positions of ``x`` in the data set (non-amortized guides).
    :param str proposal: ``"guide"`` (:math:`z \sim q(z|x)`, model replayed on it) or
        ``"prior"`` (the model samples its own latents: :math:`\log w = \log p(x|z)`).
    :param str path: ``"auto"`` (the fast path where it is exactly the program), ``"trace"``,
        ``"fast"``; see :func:`use_fast_path`.
    :returns: :class:`WeightedSamples` with ``(K, B)`` terms. Gradients flow (reparametrized
        samples) unless the caller disables them. Draws from the global torch RNG.
    """
    num_samples = _check_positive_int("num_samples", num_samples)
    if proposal not in ("guide", "prior"):
        raise UsageError(f"unknown proposal {proposal!r}; valid choices: guide, prior")
    if use_fast_path(pair, path):
        return pair._fast_log_weights(x, num_samples, index, proposal)
    return _trace_log_weights(pair, x, num_samples, index, proposal)


def _conditioned_trace(pair, x, latents, index):
    _, particle_dim = _plates(pair)
    num = next(iter(latents.values())).shape[0]
    model = _particles(poutine.condition(pair.model, data=latents), num, particle_dim)
    with quiet_params():
        trace = poutine.trace(model).get_trace(x, index)
    return trace, particle_dim, (num, x.shape[0])


def log_density(pair, x: torch.Tensor, latents: Dict[str, torch.Tensor], index: Optional[torch.Tensor] = None,
                path: str = "auto"):
    r"""The model's :math:`(\log p(x|z), \log p(z))` per datapoint at given latent values
    ``latents`` (site -> ``(C, B, ...)``, C chains or samples), from the model program
    conditioned on them (or the fast path). Differentiable in the latents (for HMC).
    Returns two ``(C, B)`` tensors."""
    if use_fast_path(pair, path):
        (z,) = latents.values()
        return pair.log_likelihood(x, z), pair.log_prior(z)
    trace, particle_dim, shape = _conditioned_trace(pair, x, latents, index)
    data_plate, _ = _plates(pair)
    log_likelihood = torch.zeros(shape, dtype=x.dtype, device=x.device)
    log_prior = log_likelihood
    seen = set()
    for site in _sample_sites(trace):
        term = per_datapoint(_site_log_prob(site), site, data_plate, particle_dim, shape)
        if site["name"] in latents:
            log_prior = log_prior + term
            seen.add(site["name"])
        elif site["is_observed"]:
            log_likelihood = log_likelihood + term
        else:
            raise UsageError(f"latent site {site['name']!r} of the model has no value; pass it in latents")
    missing = set(latents) - seen
    if missing:
        raise UsageError(f"the model has no latent site(s) {sorted(missing)}")
    return log_likelihood, log_prior


def guide_mean(pair, x: torch.Tensor, index: Optional[torch.Tensor] = None, num_samples: int = 256,
               path: str = "auto") -> Dict[str, torch.Tensor]:
    """:math:`E_q[z|x]` per latent site, ``(B, ...)``: the guide site's distribution's mean
    where it has one in closed form, else the average of ``num_samples`` draws (flows); the
    fast path reads the guide network's mean (:meth:`pvae.model.VAE.encode`)."""
    if use_fast_path(pair, path):
        return {"z": pair.encode(x, index)}
    samples = log_weights(pair, x, 1, index, path="trace")
    means = {}
    for name, d in samples.guide_dists.items():
        try:
            means[name] = d.mean[0]
        except NotImplementedError:
            means[name] = log_weights(pair, x, num_samples, index, path="trace").latents[name].mean(0)
    return means


def reconstruction(pair, x: torch.Tensor, latents: Dict[str, torch.Tensor], index: Optional[torch.Tensor] = None,
                   path: str = "auto"):
    r"""At the codes ``latents`` (site -> ``(B, ...)``): :math:`\log p(x|\hat z)` per datapoint and
    the mean :math:`E[x|\hat z]` of the observed site (one observed site), from the model program
    conditioned on the codes (or the fast path). Returns ``(log_lik (B,), mean (B, D))``."""
    if use_fast_path(pair, path):
        (z,) = latents.values()
        params = pair.decoder(z)
        return pair.likelihood(params).log_prob(x), pair.likelihood.mean(params)
    trace, particle_dim, shape = _conditioned_trace(pair, x, {k: v[None] for k, v in latents.items()}, index)
    data_plate, _ = _plates(pair)
    observed = [s for s in _sample_sites(trace) if s["is_observed"] and s["name"] not in latents]
    if len(observed) != 1:
        raise UsageError(f"reconstruction needs one observed site; the model has {[s['name'] for s in observed]}")
    (site,) = observed
    log_lik = per_datapoint(_site_log_prob(site), site, data_plate, particle_dim, shape)[0]
    return log_lik, site["fn"].mean.reshape(x.shape)


def log_mean_exp(log_w: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """:math:`\\log \\frac1K \\sum_k e^{w_k}` along ``dim``."""
    return torch.logsumexp(log_w, dim) - math.log(log_w.shape[dim])
