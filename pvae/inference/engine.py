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

Any program whose sample sites sit in the data plate is scored this way (DESIGN rule 11): several
latent sites (a hierarchy, the guide in any order); discrete sites marked for parallel
enumeration summed out exactly inside the weight (Pyro's ``config_enumerate`` semantics, with
masked enumeration for partially observed sites); observed covariates passed to both programs
(:class:`WithCovariates`); subsampled data plates, whose subsample scale :math:`N/B` is divided
out before the per-datapoint weights are formed (a user's own :func:`pyro.poutine.scale` keeps
its meaning). Guards come from the trace, not from class names: point-mass proposal sites and
non-reparametrized ones are recorded (:attr:`WeightedSamples.point_masses`,
:attr:`WeightedSamples.not_reparametrized`) for every estimator and objective to refuse by name.

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
from typing import Callable, Dict, Optional, Tuple

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.poutine.broadcast_messenger import BroadcastMessenger
from pyro.poutine.enum_messenger import EnumMessenger
from pyro.poutine.indep_messenger import IndepMessenger
from pyro.poutine.runtime import _PYRO_STACK
from pyro.poutine.util import site_is_subsample

from pvae.errors import UsageError, rows_phrase

__all__ = [
    "ModelGuidePair", "WithCovariates", "WeightedSamples", "log_weights", "log_density",
    "guide_log_density", "guide_mean", "reconstruction", "log_mean_exp", "use_fast_path",
    "PARTICLE_PLATE",
]

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
    :ivar site_terms: site name -> ``(log p, log q)`` of that latent site, each ``(K, B)``.
    :ivar enumerated: names of the discrete sites summed out exactly (parallel enumeration).
        With any, the weight does not split into likelihood, prior and proposal terms:
        ``log_likelihood``, ``log_prior`` and ``log_guide`` are ``None`` (see
        :meth:`require_decomposition`), :attr:`log_weight` is the enumerated weight and
        :attr:`elbo_term` the enumerated ELBO integrand.
    :ivar guide_enumerated: the enumerated sites that the guide enumerates (the rest are
        enumerated in the model only).
    :ivar point_masses: the proposal's sites that are point masses (no density).
    :ivar not_reparametrized: the proposal's sampled sites drawn without a reparametrized
        sampler (discrete sites that are not enumerated): their gradient needs a score term.
    :ivar data_scale: the data plate's subsample scale :math:`N/B` (1 without subsampling),
        divided out of every per-datapoint term; multiply a sum over the minibatch by it for an
        estimate of the sum over the data set.
    """

    log_likelihood: Optional[torch.Tensor]
    log_prior: Optional[torch.Tensor]
    log_guide: Optional[torch.Tensor]
    latents: Dict[str, torch.Tensor]
    guide_dists: Dict[str, object] = field(default_factory=dict)
    prior_dists: Dict[str, object] = field(default_factory=dict)
    path: str = "trace"
    site_terms: Dict[str, tuple] = field(default_factory=dict)
    enumerated: Tuple[str, ...] = ()
    guide_enumerated: Tuple[str, ...] = ()
    point_masses: Tuple[str, ...] = ()
    not_reparametrized: Tuple[str, ...] = ()
    data_scale: float = 1.0
    enumerated_log_weight: Optional[torch.Tensor] = None
    enumerated_elbo_term: Optional[torch.Tensor] = None

    @property
    def log_weight(self) -> torch.Tensor:
        """:math:`\\log p(x, z_k) - \\log r(z_k)`, ``(K, B)``. With enumerated discrete sites
        ``y``, the enumerated weight :math:`\\log\\sum_y p(x, y, z_k^y) / r(z_k^y | y)`: unbiased
        for :math:`p(x)` like any importance weight (the guide's :math:`q(y|x)` cancels)."""
        if self.enumerated_log_weight is not None:
            return self.enumerated_log_weight
        return self.log_likelihood + self.log_prior - self.log_guide

    @property
    def elbo_term(self) -> torch.Tensor:
        r"""The ELBO's integrand per sample, ``(K, B)``: :attr:`log_weight` without enumerated
        sites; with them, :math:`\sum_y q(y|x)[\log\sum_{y'} p(x, y, y', z^y) - \log q(y|x)
        - \log q(z^y|x, y)]` (guide-enumerated ``y`` in expectation, as
        :class:`pyro.infer.TraceEnum_ELBO` computes; model-only ``y'`` summed inside)."""
        if self.enumerated_elbo_term is not None:
            return self.enumerated_elbo_term
        return self.log_weight

    @property
    def log_joint(self) -> torch.Tensor:
        """:math:`\\log p(x, z_k)`, ``(K, B)``."""
        self.require_decomposition("log p(x, z)")
        return self.log_likelihood + self.log_prior

    @property
    def log_ratio(self) -> torch.Tensor:
        """:math:`\\log p(z_k) - \\log q(z_k|x)` (minus the single-sample KL term), ``(K, B)``."""
        self.require_decomposition("log p(z) - log q(z|x)")
        return self.log_prior - self.log_guide

    def require_density(self, what: str) -> None:
        """Raise a :class:`~pvae.errors.UsageError` naming the proposal's point-mass sites:
        importance weights (and everything built on them) are undefined there."""
        if self.point_masses:
            sites = ", ".join(repr(s) for s in self.point_masses)
            raise UsageError(
                f"{what} needs the guide's density, and its site(s) {sites} are point masses (Delta) "
                "without one: the weights would read as a perfect proposal while measuring nothing. "
                "Use a guide with a density, or pvae.reconstruction_error / the naive prior estimate"
            )

    def require_decomposition(self, what: str) -> None:
        """Raise a :class:`~pvae.errors.UsageError` when enumerated sites make ``what`` (a term
        of the weight on its own) undefined."""
        if self.enumerated:
            raise UsageError(
                f"{what} is not defined on its own when discrete sites are summed out "
                f"(enumerated: {sorted(self.enumerated)}); use the enumerated weight or ELBO "
                "(objective 'elbo' or 'iwae' without KL weighting, analytic KL, DReG or free bits)"
            )

    def require_reparametrized(self, what: str) -> None:
        """Raise a :class:`~pvae.errors.UsageError` naming the proposal's sites sampled without
        a reparametrized sampler, for objectives that have no score-function term."""
        if self.not_reparametrized:
            sites = ", ".join(repr(s) for s in self.not_reparametrized)
            raise UsageError(
                f"{what} has no score-function gradient, and the guide samples site(s) {sites} without a "
                "reparametrized sampler (as pyro.infer.RenyiELBO, it refuses them). Enumerate a discrete site "
                "exactly (infer={'enumerate': 'parallel'}, or pyro.infer.config_enumerate on the guide), "
                "or train with the 'elbo' objective (score-function gradient)"
            )


class WithCovariates:
    """Data ``x`` (``(N, ...)``) with covariates that the programs read: the engine calls
    ``model(x, index, **covariates)`` and ``guide(x, index, **covariates)`` with each covariate
    sliced like ``x`` (every covariate has ``N`` rows). Slicing, ``len``, ``.shape``,
    ``.device``, ``.dtype`` and ``.to`` follow ``x``, so estimators, objectives and
    :func:`pvae.fit` take it wherever they take a tensor of data.

    A covariate may also carry a partially observed site: e.g. ``y`` (labels, any value where
    unknown) and ``observed`` (a boolean mask) for ``pyro.sample("y", ..., obs=y,
    obs_mask=observed)`` in the model (Pyro's idiom; the guide samples ``"y_unobserved"``).
    """

    def __init__(self, x: torch.Tensor, **covariates: torch.Tensor):
        if not covariates:
            raise UsageError("WithCovariates needs at least one covariate (name=tensor); pass x alone otherwise")
        for name, c in covariates.items():
            if not isinstance(c, torch.Tensor):
                raise UsageError(f"covariate {name!r} must be a torch.Tensor, got {type(c).__name__}")
            if c.dim() < 1 or c.shape[0] != x.shape[0]:
                raise UsageError(f"covariate {name!r} has {tuple(c.shape)[:1] or 'no'} rows; x has {x.shape[0]}: "
                                 "every covariate needs one row per datapoint")
        self.x = x
        self.covariates = dict(covariates)

    def __getitem__(self, item) -> "WithCovariates":
        return WithCovariates(self.x[item], **{k: v[item] for k, v in self.covariates.items()})

    def __len__(self) -> int:
        return self.x.shape[0]

    @property
    def shape(self):
        return self.x.shape

    @property
    def device(self):
        return self.x.device

    @property
    def dtype(self):
        return self.x.dtype

    def dim(self) -> int:
        return self.x.dim()

    def to(self, *args, **kwargs) -> "WithCovariates":
        x = self.x.to(*args, **kwargs)
        device = x.device
        return WithCovariates(x, **{k: v.to(device) for k, v in self.covariates.items()})

    def split(self, size: int):
        return [self[i : i + size] for i in range(0, len(self), size)]

    def __repr__(self) -> str:
        covs = ", ".join(f"{k}={tuple(v.shape)}" for k, v in self.covariates.items())
        return f"WithCovariates(x={tuple(self.x.shape)}, {covs})"


def unpack(x):
    """``(tensor, covariates)`` of data ``x`` (a tensor or :class:`WithCovariates`)."""
    if isinstance(x, WithCovariates):
        return x.x, x.covariates
    return x, {}


def _call_args(x, index):
    """The programs' arguments for data ``x``: ``(x, index)`` plus covariates as keywords."""
    tensor, covariates = unpack(x)
    return (tensor, index), covariates


class ModelGuidePair(torch.nn.Module):
    """A model/guide pair of the user's own, for pvae's estimators, objectives, diagnostics and
    :func:`pvae.fit`.

    :param model: a Pyro program ``model(x, index=None, **covariates)`` whose datapoints are
        indexed by the plate named ``data_plate`` (every sample site inside it; plates nested
        inside it are allowed), with observed sites carrying ``obs=x``. Any number of latent
        sites; discrete sites are summed out exactly where marked for parallel enumeration
        (``infer={"enumerate": "parallel"}`` or :func:`pyro.infer.config_enumerate`), as
        :class:`pyro.infer.TraceEnum_ELBO` does; the plate may be subsampled
        (``pyro.plate("data", N, subsample=index)``).
    :param guide: a Pyro program with the same arguments sampling every latent site of the
        model that the model does not enumerate, inside the same plate.
    :param int max_plate_nesting: the number of plates the programs nest (pvae's: 1);
        samples are vectorized in a plate just outside them, enumerated values further left.
    :param str data_plate: the name of the plate over datapoints.
    :param module: optional, the ``torch.nn.Module`` whose parameters the programs use; it
        becomes a submodule, so ``pair.parameters()``, ``.to()``, ``.train()`` and
        ``state_dict()`` are its.
    :param bool needs_index: the guide reads ``index`` (positions in the data set) instead of
        only ``x`` (a non-amortized guide); :func:`pvae.fit` then passes them.
    """

    max_plate_nesting: int
    data_plate: str

    def __init__(self, model: Callable, guide: Callable, max_plate_nesting: int = 1,
                 data_plate: str = "data", module: Optional[torch.nn.Module] = None,
                 needs_index: bool = False):
        super().__init__()
        object.__setattr__(self, "model", model)  # plain attributes: never a submodule twice
        object.__setattr__(self, "guide", guide)
        self.max_plate_nesting = int(max_plate_nesting)
        self.data_plate = data_plate
        self.module = module
        self.needs_index = bool(needs_index)

    def programs_are_builtin(self) -> bool:
        return False

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        for b in self.buffers():
            return b.device
        return torch.device("cpu")

    def check_data(self, x, what: str = "data") -> None:
        """That ``x`` (or its tensor, with covariates) is a non-empty, finite floating-point
        tensor, batch first; the programs check the rest (their distributions' supports)."""
        tensor, covariates = unpack(x)
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point() or tensor.dim() < 1 \
                or tensor.shape[0] < 1:
            raise UsageError(f"{what} must be a non-empty floating-point tensor (batch first)")
        if not bool(torch.isfinite(tensor).all()):
            rows = (~torch.isfinite(tensor)).reshape(tensor.shape[0], -1).any(-1).nonzero().flatten()
            raise UsageError(f"{what} contain NaN or infinite values in {rows_phrase(rows)}; "
                             "clean or drop those rows")
        for name, c in covariates.items():
            if c.is_floating_point() and not bool(torch.isfinite(c).all()):
                raise UsageError(f"covariate {name!r} of the {what} contains NaN or infinite values")

    def forward(self, x, index=None, **covariates):  # pragma: no cover - a pair is not called
        raise UsageError("a ModelGuidePair is not called; pass it to pvae's estimators, objectives or fit")


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


def _data_frame(site, data_plate: str):
    for frame in site["cond_indep_stack"]:
        if frame.name == data_plate:
            return frame
    raise UsageError(
        f"sample site {site['name']!r} is outside the data plate {data_plate!r}: per-datapoint "
        "log-weights need every sample site inside the plate over datapoints (a site outside it "
        "couples all datapoints of a batch)"
    )


def _data_dim(site, data_plate: str) -> int:
    return _data_frame(site, data_plate).dim


def subsample_scale(site, data_plate: str) -> float:
    """The data plate's subsample scale :math:`N/B` at ``site`` (1 for a full plate): the factor
    :class:`pyro.plate` multiplies into ``site["scale"]`` so that a sum over the minibatch
    estimates the sum over the data set."""
    frame = _data_frame(site, data_plate)
    if frame.full_size is None:
        return 1.0
    return float(frame.full_size) / float(frame.size)


def _reduce(log_prob: torch.Tensor, site, data_plate: str, particle_dim: int, enum_dims=frozenset()) -> torch.Tensor:
    """Sum a site's log-prob over its plate dimensions other than the particle and data-plate
    ones, keeping the enumeration dimensions (left of the particle dimension):
    ``(*enum, K or 1, B or 1)``."""
    data_dim = _data_dim(site, data_plate)
    if log_prob.dim() == 2 and particle_dim == -2 and data_dim == -1:  # (K or 1, B): already per datapoint
        return log_prob
    n = max(log_prob.dim(), -particle_dim)
    log_prob = log_prob.reshape((1,) * (n - log_prob.dim()) + tuple(log_prob.shape))
    for d in range(-n, particle_dim):
        if log_prob.shape[d] != 1 and d not in enum_dims:
            raise UsageError(
                f"site {site['name']!r} has a log-probability of shape {tuple(log_prob.shape)} with batch "
                f"dimension {d} outside its plates; declare event dimensions with .to_event(), or the "
                "dimension with a pyro.plate"
            )
    drop = [d for d in range(particle_dim + 1, 0) if d != data_dim]
    if drop:
        log_prob = log_prob.sum(drop, keepdim=True)
    lead = tuple(log_prob.shape[: n + particle_dim])
    return log_prob.reshape(lead + (log_prob.shape[particle_dim], log_prob.shape[data_dim]))


def per_datapoint(log_prob: torch.Tensor, site, data_plate: str, particle_dim: int, shape) -> torch.Tensor:
    """Sum a site's log-prob (or KL) over every dimension except the particle and data-plate
    dimensions and broadcast it to ``shape = (K, B)``."""
    return _reduce(log_prob, site, data_plate, particle_dim).expand(shape)


def _site_log_prob(site, data_plate: Optional[str] = None) -> torch.Tensor:
    """The site's log-prob, scaled and masked as Pyro's ``Trace.compute_log_prob`` does, with
    the data plate's subsample scale divided out (a per-datapoint term stays per datapoint; a
    user's own :func:`pyro.poutine.scale` keeps its meaning)."""
    log_p = site["fn"].log_prob(site["value"], *site["args"], **site["kwargs"])
    scale = site["scale"]
    if data_plate is not None:
        factor = subsample_scale(site, data_plate)
        if factor != 1.0:
            scale = scale / factor
    return scale_and_mask(log_p, scale, site["mask"])


def _sample_sites(trace):
    return [s for s in trace.nodes.values() if s["type"] == "sample" and not site_is_subsample(s)
            and not s["infer"].get("_deterministic")]


class _ParticlePlate(IndepMessenger):
    """The plate that vectorizes samples: :class:`pyro.plate`'s broadcasting and independence
    frame without its subsampling machinery (a plate records a subsample site on every entry;
    this one is entered twice per call of :func:`log_weights`, so that is a measurable share of
    a small model's step)."""

    def _process_message(self, msg):
        super()._process_message(msg)
        BroadcastMessenger._pyro_sample(msg)


def _particles(fn: Callable, num_samples: int, dim: int) -> Callable:
    def vectorized(*args, **kwargs):
        with _ParticlePlate(PARTICLE_PLATE, num_samples, dim=dim):
            return fn(*args, **kwargs)

    return vectorized


def _plates(pair):
    """The pair's data-plate name and the dimension of the particle plate just outside its plates."""
    return getattr(pair, "data_plate", "data"), -1 - int(getattr(pair, "max_plate_nesting", 1))


def is_point_mass(fn) -> bool:
    """Whether a site's distribution is a point mass (:class:`pyro.distributions.Delta`, also
    inside ``Independent``, masked or expanded wrappers)."""
    while True:
        if isinstance(fn, dist.Delta):
            return True
        inner = getattr(fn, "base_dist", None)
        if inner is None or inner is fn:
            return False
        fn = inner


def _enum_dim(site) -> Optional[int]:
    return site["infer"].get("_enumerate_dim")


def _collapse(site, data_plate: str, particle_dim: int, dtype, device) -> Optional[torch.Tensor]:
    """For an enumerated site masked off for some datapoints (a partially observed site:
    ``obs_mask``), the terms of those datapoints do not depend on the enumerated value, so the
    sum over values must count one: ``0`` where the site is live or the value is the first, else
    ``-inf``; ``None`` when the site has no mask."""
    mask = site["mask"]
    if mask is None or mask is True or not isinstance(mask, torch.Tensor):
        return None
    dim = _enum_dim(site)
    size = site["value"].shape[dim] if site["value"].dim() >= -dim else 1
    first = torch.arange(size, device=device).reshape((size,) + (1,) * (-dim - 1)) == 0
    live = mask.to(torch.bool)
    keep = torch.where(live | first, torch.zeros((), dtype=dtype, device=device),
                       torch.full((), -math.inf, dtype=dtype, device=device))
    # a datapoint whose mask is off everywhere in its nested plates is collapsed
    keep = keep.expand(torch.broadcast_shapes(keep.shape, (1,) * (-particle_dim)))
    data_dim = _data_dim(site, data_plate)
    n = keep.dim()
    reduce = [d for d in range(particle_dim + 1, 0) if d != data_dim and keep.shape[d] != 1]
    if reduce:
        keep = keep.amax(reduce, keepdim=True)
    lead = tuple(keep.shape[: n + particle_dim])
    return keep.reshape(lead + (keep.shape[particle_dim], keep.shape[data_dim]))


@quiet_params()
def _sum_out(terms: torch.Tensor) -> torch.Tensor:
    """Log-sum-exp over the enumeration dimensions (every dimension left of ``(K, B)``)."""
    return torch.logsumexp(terms, tuple(range(terms.dim() - 2))) if terms.dim() > 2 else terms


def _marks_enumeration(*traces) -> bool:
    """Whether a latent site of the traces is marked for parallel enumeration."""
    return any(site["type"] == "sample" and not site["is_observed"] and site["infer"].get("enumerate") == "parallel"
               for trace in traces for site in trace.nodes.values())


def _run_programs(pair, xt, idx, covariates, num_samples, proposal, enumerate_guide, particle_dim, enum):
    """Trace the proposal and the model (replayed on the guide's draws), vectorized over samples;
    with ``enum``, under Pyro's enumeration handlers as :class:`pyro.infer.TraceEnum_ELBO` runs
    them (the guide's enumerated dims first, the model's further left). Returns
    ``(guide_trace or None, model_trace)``."""
    first_enum = particle_dim - 1
    model = _particles(pair.model, num_samples, particle_dim)
    if proposal == "guide":
        guide = _particles(pair.guide, num_samples, particle_dim)
        if enum and enumerate_guide:
            guide = EnumMessenger(first_available_dim=first_enum)(guide)
            model = EnumMessenger()(model)
        elif enum:
            model = EnumMessenger(first_available_dim=first_enum)(model)
        guide_trace = poutine.trace(guide).get_trace(xt, idx, **covariates)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(xt, idx, **covariates)
        return guide_trace, model_trace
    # the model proposes: its discrete sites enumerated (stratified) or, without enumerate, drawn
    if enum and enumerate_guide:
        model = EnumMessenger(first_available_dim=first_enum)(model)
    return None, poutine.trace(model).get_trace(xt, idx, **covariates)


def _trace_log_weights(pair, x, num_samples, index, proposal, enumerate_guide=True) -> WeightedSamples:
    data_plate, particle_dim = _plates(pair)
    (xt, idx), covariates = _call_args(x, index)
    shape = (num_samples, xt.shape[0])
    # Pyro's enumeration handlers cost a little on every site of every step; a pair whose programs
    # were seen to mark no site for enumeration runs without them (they draw nothing, so the draws
    # are the same), and is rerun with them if a marked site ever appears.
    enum = pair.__dict__.get("_pvae_enumerates", True)
    guide_trace, model_trace = _run_programs(pair, xt, idx, covariates, num_samples, proposal, enumerate_guide,
                                             particle_dim, enum)
    marked = _marks_enumeration(model_trace, *([guide_trace] if guide_trace is not None else []))
    if marked and not enum:
        guide_trace, model_trace = _run_programs(pair, xt, idx, covariates, num_samples, proposal, enumerate_guide,
                                                 particle_dim, True)
    pair.__dict__["_pvae_enumerates"] = marked
    proposal_sites = None if guide_trace is None else [s for s in _sample_sites(guide_trace) if not s["is_observed"]]
    model_sites = _sample_sites(model_trace)
    enum_sites = {}  # name -> site (the guide's where it enumerates it)
    for site in (proposal_sites or []) + model_sites:
        if _enum_dim(site) is not None:
            enum_sites.setdefault(site["name"], site)
    enum_dims = frozenset(_enum_dim(s) for s in enum_sites.values())

    def term(site):
        return _reduce(_site_log_prob(site, data_plate), site, data_plate, particle_dim, enum_dims)

    data_scale = 1.0
    for site in model_sites:
        data_scale = max(data_scale, subsample_scale(site, data_plate))
    guide_terms, guide_dists, guide_names = {}, {}, set()
    point_masses, not_reparam = [], []
    guide_enumerated = []
    if proposal_sites is not None:
        for site in proposal_sites:
            guide_names.add(site["name"])
            guide_dists[site["name"]] = site["fn"]
            if _enum_dim(site) is not None:
                guide_enumerated.append(site["name"])
                guide_terms[site["name"]] = term(site)
                continue
            if is_point_mass(site["fn"]):
                point_masses.append(site["name"])
            elif not getattr(site["fn"], "has_rsample", False):
                not_reparam.append(site["name"])
            guide_terms[site["name"]] = term(site)
    observed_terms, latent_terms = [], {}
    latents, prior_dists = {}, {}
    for site in model_sites:
        t = term(site)
        if site["is_observed"]:
            observed_terms.append(t)
            continue
        name = site["name"]
        if proposal == "guide" and name not in guide_names and _enum_dim(site) is None:
            enumerable = getattr(site["fn"], "has_enumerate_support", False)
            raise UsageError(
                f"the model's latent site {name!r} is not sampled by the guide; every latent site needs a "
                "guide site of the same name for importance weights"
                + (", or, being discrete, to be summed out in the model: mark it "
                   "infer={'enumerate': 'parallel'} (or wrap the model in pyro.infer.config_enumerate)"
                   if enumerable else "")
            )
        latent_terms[name] = t
        if _enum_dim(site) is None:
            latents[name] = site["value"]
        prior_dists[name] = site["fn"]
        if proposal == "prior" and _enum_dim(site) is None:
            if is_point_mass(site["fn"]):
                point_masses.append(name)
            elif not getattr(site["fn"], "has_rsample", False):
                not_reparam.append(name)
    extra = guide_names - set(latent_terms)
    if extra:
        raise UsageError(f"the guide samples site(s) {sorted(extra)} that the model does not have")
    zero = torch.zeros(shape, dtype=xt.dtype, device=xt.device)
    if proposal == "prior":  # the model's sampled latents propose themselves
        guide_terms = {n: t for n, t in latent_terms.items() if n not in enum_sites}
        guide_dists = {n: prior_dists[n] for n in guide_terms}
    sampled_guide = {n: t for n, t in guide_terms.items() if n not in enum_sites}
    common = dict(latents=latents, guide_dists=guide_dists, prior_dists=prior_dists, path="trace",
                  point_masses=tuple(point_masses), not_reparametrized=tuple(not_reparam), data_scale=data_scale)
    if not enum_sites:
        log_likelihood = _total(observed_terms, zero)
        log_prior = _total(latent_terms.values(), zero)
        log_guide = _total(guide_terms.values(), zero)
        site_terms = {n: (t.expand(shape), guide_terms.get(n, t).expand(shape)) for n, t in latent_terms.items()}
        return WeightedSamples(log_likelihood, log_prior, log_guide, site_terms=site_terms, **common)
    # enumerated: the weight per joint value of the enumerated sites, then summed out
    total = sum(observed_terms, zero) + sum(latent_terms.values(), zero) - sum(sampled_guide.values(), zero)
    collapse = {name: _collapse(site, data_plate, particle_dim, xt.dtype, xt.device)
                for name, site in enum_sites.items()}
    for c in collapse.values():
        if c is not None:
            total = total + c
    log_weight = _sum_out(total)
    guide_enum_dims = sorted({_enum_dim(enum_sites[n]) for n in guide_enumerated})
    model_only = [d for d in range(-total.dim(), -2) if d not in guide_enum_dims]
    inner = torch.logsumexp(total, model_only, keepdim=True) if model_only else total
    if guide_enum_dims:
        log_q = sum((guide_terms[n] for n in guide_enumerated), zero)
        for n in guide_enumerated:
            if collapse[n] is not None:
                log_q = log_q + collapse[n]
        log_q = log_q.expand(inner.shape)
        weight = log_q.exp()
        integrand = torch.where(weight > 0, weight * (inner - log_q), torch.zeros((), dtype=xt.dtype,
                                                                                 device=xt.device))
        elbo_term = integrand.sum(tuple(range(integrand.dim() - 2)))
    else:
        elbo_term = inner.reshape(inner.shape[-2:]) if inner.dim() > 2 else inner
    return WeightedSamples(None, None, None, enumerated=tuple(sorted(enum_sites)),
                           guide_enumerated=tuple(guide_enumerated),
                           enumerated_log_weight=log_weight.expand(shape), enumerated_elbo_term=elbo_term.expand(shape),
                           **common)


def _total(terms, zero: torch.Tensor) -> torch.Tensor:
    """The sum of ``(K or 1, B or 1)`` terms, broadcast to ``zero``'s ``(K, B)`` (no extra op for
    one term: the engine runs in every training step)."""
    total = None
    for t in terms:
        total = t if total is None else total + t
    return zero if total is None else total.expand(zero.shape)


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value or value < 1:
        raise UsageError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def log_weights(pair, x, num_samples: int, index: Optional[torch.Tensor] = None,
                proposal: str = "guide", path: str = "auto", enumerate: bool = True) -> WeightedSamples:
    r"""``num_samples`` samples per datapoint from the proposal and their log-weights, per
    datapoint: the one function every estimator, objective and diagnostic calls.

    :param pair: a :class:`~pvae.model.VAE` or a :class:`ModelGuidePair`.
    :param x: data ``(B, ...)``, or :class:`WithCovariates`; passed to the programs as
        ``model(x, index, **covariates)``, ``guide(x, index, **covariates)``.
    :param int num_samples: K, vectorized in the plate :data:`PARTICLE_PLATE`.
    :param index: positions of ``x`` in the data set (non-amortized guides, subsampled plates).
    :param str proposal: ``"guide"`` (:math:`z \sim q(z|x)`, model replayed on it) or
        ``"prior"`` (the model samples its own latents: :math:`\log w = \log p(x|z)`).
    :param str path: ``"auto"`` (the fast path where it is exactly the program), ``"trace"``,
        ``"fast"``; see :func:`use_fast_path`.
    :param bool enumerate: sum out the proposal's discrete sites marked for parallel
        enumeration (default); ``False`` draws them instead (diagnostics and AIS, which want one
        value per sample). With the guide as proposal, sites the model alone enumerates are
        always summed out (nothing proposes them).
    :returns: :class:`WeightedSamples` with ``(K, B)`` terms, per datapoint: each site's
        log-prob summed over its non-plate dimensions and its plates nested in the data plate,
        with the data plate's subsample scale divided out (``data_scale`` records it).
        Gradients flow (reparametrized samples) unless the caller disables them. Draws from the
        global torch RNG.
    """
    num_samples = _check_positive_int("num_samples", num_samples)
    if proposal not in ("guide", "prior"):
        raise UsageError(f"unknown proposal {proposal!r}; valid choices: guide, prior")
    if isinstance(x, WithCovariates):
        if path == "fast":
            raise UsageError("the fast path computes pvae's built-in model, which reads no covariates")
    elif use_fast_path(pair, path):
        return pair._fast_log_weights(x, num_samples, index, proposal)
    return _trace_log_weights(pair, x, num_samples, index, proposal, enumerate)


def _enumerated_model(pair, num, particle_dim, latents):
    """The model conditioned on ``latents``, vectorized over ``num`` chains, with every discrete
    latent site it has left summed out (parallel enumeration)."""
    from pyro.infer import config_enumerate

    model = poutine.condition(pair.model, data=latents)
    return EnumMessenger(first_available_dim=particle_dim - 1)(
        config_enumerate(_particles(model, num, particle_dim), default="parallel"))


def _split_density(trace, pair, x, latents, particle_dim, what):
    """From a trace conditioned on ``latents`` (each ``(C, B, ...)``), the per-datapoint
    :math:`\\log p(x, z)` and :math:`\\log p(z)` (``(C, B)``) with enumerated sites summed out."""
    data_plate, _ = _plates(pair)
    xt, _ = unpack(x)
    num = next(iter(latents.values())).shape[0]
    shape = (num, xt.shape[0])
    sites = _sample_sites(trace)
    enum_sites = [s for s in sites if _enum_dim(s) is not None]
    enum_dims = frozenset(_enum_dim(s) for s in enum_sites)
    zero = torch.zeros(shape, dtype=xt.dtype, device=xt.device)
    joint, prior, seen = zero, zero, set()
    for site in sites:
        t = _reduce(_site_log_prob(site, data_plate), site, data_plate, particle_dim, enum_dims)
        if site["name"] in latents:
            seen.add(site["name"])
            prior = prior + t
        elif _enum_dim(site) is not None:
            prior = prior + t
        elif not site["is_observed"]:
            raise UsageError(f"latent site {site['name']!r} of the model has no value; pass it in {what}")
        joint = joint + t
    for site in enum_sites:
        c = _collapse(site, data_plate, particle_dim, xt.dtype, xt.device)
        if c is not None:
            joint, prior = joint + c, prior + c
    missing = set(latents) - seen
    if missing:
        raise UsageError(f"the model has no latent site(s) {sorted(missing)}")
    return _sum_out(joint).expand(shape), _sum_out(prior).expand(shape)


def log_density(pair, x, latents: Dict[str, torch.Tensor], index: Optional[torch.Tensor] = None,
                path: str = "auto"):
    r"""The model's :math:`(\log p(x|z), \log p(z))` per datapoint at given values ``latents``
    of its continuous latent sites (site -> ``(C, B, ...)``, C chains or samples), from the model
    program conditioned on them (or the fast path); discrete latent sites the values leave open
    are summed out exactly (:math:`\log p(z) = \log\sum_y p(y, z)`, :math:`\log p(x|z) =
    \log\sum_y p(x, y, z) - \log p(z)`). Differentiable in the latents (for HMC).
    Returns two ``(C, B)`` tensors."""
    if not isinstance(x, WithCovariates) and use_fast_path(pair, path):
        (z,) = latents.values()
        return pair.log_likelihood(x, z), pair.log_prior(z)
    _, particle_dim = _plates(pair)
    num = next(iter(latents.values())).shape[0]
    (xt, idx), covariates = _call_args(x, index)
    with quiet_params():
        trace = poutine.trace(_enumerated_model(pair, num, particle_dim, latents)).get_trace(xt, idx, **covariates)
    joint, prior = _split_density(trace, pair, x, latents, particle_dim, "latents")
    return joint - prior, prior


def guide_log_density(pair, x, latents: Dict[str, torch.Tensor], index: Optional[torch.Tensor] = None):
    r""":math:`\log q(z|x)` per datapoint at given values ``latents`` of the guide's continuous
    sites (site -> ``(C, B, ...)``), from the guide program conditioned on them, its discrete
    sites summed out (:math:`\log\sum_y q(y|x) q(z|x, y)`). Needs a guide that can score any
    point (not a flow without an analytic inverse). Returns ``(C, B)``."""
    data_plate, particle_dim = _plates(pair)
    num = next(iter(latents.values())).shape[0]
    (xt, idx), covariates = _call_args(x, index)
    from pyro.infer import config_enumerate

    guide = EnumMessenger(first_available_dim=particle_dim - 1)(
        config_enumerate(_particles(poutine.condition(pair.guide, data=latents), num, particle_dim),
                         default="parallel"))
    with quiet_params():
        trace = poutine.trace(guide).get_trace(xt, idx, **covariates)
    sites = [s for s in _sample_sites(trace) if not s["is_observed"] or s["name"] in latents]
    for site in sites:
        if site["name"] not in latents and _enum_dim(site) is None:
            raise UsageError(f"the guide's latent site {site['name']!r} has no value; pass it in latents")
    enum_dims = frozenset(_enum_dim(s) for s in sites if _enum_dim(s) is not None)
    shape = (num, xt.shape[0])
    total = torch.zeros(shape, dtype=xt.dtype, device=xt.device)
    for site in sites:
        total = total + _reduce(_site_log_prob(site, data_plate), site, data_plate, particle_dim, enum_dims)
    for site in sites:
        if _enum_dim(site) is not None:
            c = _collapse(site, data_plate, particle_dim, xt.dtype, xt.device)
            if c is not None:
                total = total + c
    return _sum_out(total).expand(shape)


def guide_mean(pair, x, index: Optional[torch.Tensor] = None, num_samples: int = 256,
               path: str = "auto") -> Dict[str, torch.Tensor]:
    """:math:`E_q[z|x]` per continuous latent site, ``(B, ...)``: the guide site's distribution's
    mean where it has one in closed form (and the site does not depend on another latent site),
    else the average of ``num_samples`` draws (flows, lower levels of a hierarchy, sites below a
    discrete one); the fast path reads the guide network's mean (:meth:`pvae.model.VAE.encode`).
    Discrete sites are drawn, not enumerated, here, and have no entry (a label's mean is no code)."""
    if not isinstance(x, WithCovariates) and use_fast_path(pair, path):
        return {"z": pair.encode(x, index)}
    samples = log_weights(pair, x, 1, index, path="trace", enumerate=False)
    means, need_draws = {}, []
    names = [n for n in samples.guide_dists if n in samples.latents  # in the guide's order, continuous sites
             and samples.latents[n].is_floating_point()
             and not getattr(samples.guide_dists[n], "has_enumerate_support", False)]
    for position, name in enumerate(names):
        if position > 0:  # may depend on the sites drawn before it: averaged over draws
            need_draws.append(name)
            continue
        try:
            means[name] = samples.guide_dists[name].mean.expand(samples.latents[name].shape)[0]
        except NotImplementedError:  # no closed-form mean (flows)
            need_draws.append(name)
    if need_draws:
        draws = log_weights(pair, x, num_samples, index, path="trace", enumerate=False).latents
        for name in need_draws:
            means[name] = draws[name].mean(0)
    return {name: means[name] for name in names}


def reconstruction(pair, x, latents: Dict[str, torch.Tensor], index: Optional[torch.Tensor] = None,
                   path: str = "auto"):
    r"""At the codes ``latents`` (site -> ``(B, ...)``): :math:`\log p(x|\hat z)` per datapoint and
    the mean :math:`E[x|\hat z]` of the observed site (one observed site), from the model program
    conditioned on the codes (or the fast path). Returns ``(log_lik (B,), mean (B, D))``."""
    if not isinstance(x, WithCovariates) and use_fast_path(pair, path):
        (z,) = latents.values()
        params = pair.decoder(z)
        return pair.likelihood(params).log_prob(x), pair.likelihood.mean(params)
    data_plate, particle_dim = _plates(pair)
    (xt, idx), covariates = _call_args(x, index)
    model = _particles(poutine.condition(pair.model, data={k: v[None] for k, v in latents.items()}), 1, particle_dim)
    with quiet_params():
        trace = poutine.trace(model).get_trace(xt, idx, **covariates)
    shape = (1, xt.shape[0])
    observed = [s for s in _sample_sites(trace) if s["is_observed"] and s["name"] not in latents]
    if len(observed) != 1:
        raise UsageError(f"reconstruction needs one observed site; the model has {[s['name'] for s in observed]}")
    (site,) = observed
    log_lik = per_datapoint(_site_log_prob(site, data_plate), site, data_plate, particle_dim, shape)[0]
    return log_lik, site["fn"].mean.reshape(xt.shape)


def log_mean_exp(log_w: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """:math:`\\log \\frac1K \\sum_k e^{w_k}` along ``dim``."""
    return torch.logsumexp(log_w, dim) - math.log(log_w.shape[dim])
