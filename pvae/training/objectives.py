r"""Training objectives: the ELBO family through Pyro's ELBOs, and the information-autoencoding
family (β-VAE, KL warm-up, IWAE, InfoVAE/MMD) by composition.

An :class:`Objective` returns two things for a minibatch: the differentiable *surrogate loss*
whose gradient is followed, and the *value* of the objective it estimates (per datapoint,
nats, averaged over the batch; what training logs). For reparametrized ELBOs the surrogate is
exactly minus the value; for the doubly reparametrized IWAE gradient (DReG) it is not, and the
value logged is still :math:`\mathcal{L}_K` itself.

Registered objectives (:data:`OBJECTIVES`; build with :func:`make_objective`):

* ``"elbo"`` — :class:`pyro.infer.Trace_ELBO`:
  :math:`E_q[\log p(x|z)] - \beta_t\,E_q[\log q(z|x) - \log p(z)]`, KL term sampled.
* ``"elbo-analytic-kl"`` — :class:`pyro.infer.TraceMeanField_ELBO`: the same with
  :math:`KL(q(z|x)\|p(z))` in closed form where Pyro knows it (lower variance); with
  ``free_bits`` λ > 0, the free-bits ELBO (:class:`FreeBitsObjective`).
* ``"reconstruction"`` — :math:`E_q[\log p(x|z)]` only (:math:`\beta = 0`): the plain
  autoencoder's loss with a ``"delta"`` guide (binary cross-entropy under a Bernoulli
  likelihood, squared error under a Gaussian one).
* ``"iwae"`` — :math:`\mathcal{L}_K = \log \frac1K\sum_k p(x,z_k)/q(z_k|x)` per datapoint
  (Burda et al., 2015), optionally with the DReG guide gradient (Tucker et al., 2018) and a
  warm-up of the weights' prior term, :math:`\log\frac1K\sum_k p(x|z_k)[p(z_k)/q(z_k|x)]^{\beta_t}`.
* ``"infovae"`` — InfoVAE (Zhao et al., 2019):
  :math:`E_q[\log p(x|z)] - (1-\alpha)\,\beta_t\,KL - (\alpha+\lambda-1)\,\mathrm{MMD}^2(q(z), p(z))`.

The KL weight :math:`\beta_t` is :math:`\beta` times a :class:`KLSchedule` (constant, linear
warm-up, cyclical: :data:`KL_SCHEDULES`). It multiplies :math:`\log p(z) - \log q(z|x)` (or the
analytic KL) and nothing else: computed from the log-weights' terms, or, for Pyro's own ELBOs, with
:class:`ScaleLatents` — :func:`pyro.poutine.scale` restricted to the latent sites of both
model and guide. For IWAE it multiplies the same term inside each importance weight. The training loop
tells the objective how far training has got (:meth:`Objective.set_progress`, in epochs).

Particles are vectorized (``vectorize_particles=True``, ``max_plate_nesting=1``).
"""

from __future__ import annotations

import inspect
import math
from typing import Literal, Optional, Tuple

import pyro.distributions as dist
import pyro.infer
import torch
from pyro.poutine.messenger import Messenger

from pvae.inference import engine
from pvae.errors import UsageError
from pvae.model import LATENT_SITE
from pvae.options import Part
from pvae.registry import Registry

__all__ = [
    "OBJECTIVES", "make_objective", "Objective", "ElboObjective", "FreeBitsObjective",
    "IWAEObjective", "InfoVAEObjective", "KLSchedule", "KL_SCHEDULES", "trace_elbo",
    "mean_field_elbo", "reconstruction", "iwae", "infovae", "ScaleLatents", "ScaleSite",
    "mmd_squared", "gaussian_kernel",
]


class ScaleLatents(Messenger):
    """Multiply the log-density of every latent (unobserved) sample site by ``scale`` — the KL
    weight of Pyro's own ELBOs for a program with any number of latent sites: in the model the
    guide's replayed sites are latent, in the guide every site is."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = float(scale)

    def _process_message(self, msg):
        if msg["type"] == "sample" and not msg["is_observed"]:
            msg["scale"] = msg["scale"] * self.scale


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


OBJECTIVES: Registry = Registry("objective", doc="""
Training objectives by name (``"elbo"``, ``"elbo-analytic-kl"``, ``"reconstruction"``, ``"iwae"``,
``"infovae"``; see the module doc); build one with :func:`make_objective`.""")

KL_SCHEDULES = ("constant", "linear", "cyclical")


class KLSchedule:
    r"""Weight :math:`\beta_t` of the KL term as training progresses (``t`` in epochs, a float).

    * ``"constant"``: :math:`\beta` throughout (β-VAE, Higgins et al., 2017; β = 1 is the ELBO).
    * ``"linear"`` warm-up (Bowman et al., 2016; Sønderby et al., 2016):
      :math:`\beta\min(1, t / W)` over ``warmup`` = W epochs, then β.
    * ``"cyclical"`` (Fu et al., 2019): cycles of W epochs, each ramping linearly from 0 to β
      over its first half and holding β over its second half.

    ``warmup = 0`` means constant.
    """

    def __init__(self, beta: float = 1.0, warmup: float = 0.0, kind: str = "linear"):
        beta, warmup = float(beta), float(warmup)
        if not (math.isfinite(beta) and beta >= 0):
            raise UsageError(f"beta must be finite and >= 0, got {beta!r}")
        if not (math.isfinite(warmup) and warmup >= 0):
            raise UsageError(f"kl warm-up must be a number of epochs >= 0, got {warmup!r}")
        if kind not in KL_SCHEDULES:
            raise UsageError(f"unknown KL schedule {kind!r}; valid choices: {', '.join(KL_SCHEDULES)}")
        self.beta, self.warmup = beta, warmup
        self.kind = "constant" if warmup == 0 else kind

    def __call__(self, progress: float) -> float:
        if self.kind == "constant" or math.isinf(progress):  # outside training: full weight
            return self.beta
        if self.kind == "linear":
            return self.beta * min(1.0, progress / self.warmup)
        phase = (progress % self.warmup) / self.warmup
        return self.beta * min(1.0, 2.0 * phase)

    @property
    def is_identity(self) -> bool:
        return self.kind == "constant" and self.beta == 1.0

    def __repr__(self) -> str:
        return f"KLSchedule(beta={self.beta}, warmup={self.warmup}, kind={self.kind!r})"


class Objective:
    """Base class: subclasses implement :meth:`loss_and_value`.

    **The contract** (what :func:`pvae.fit`, the data-parallel wrapper and the step modes rely
    on; a user's subclass that follows it trains like pvae's own):

    * ``loss_and_value(self, pair, x, index=None)`` returns ``(loss, value)``: a 0-d
      differentiable surrogate whose gradient is followed, and the detached Monte Carlo estimate
      of the objective per datapoint averaged over the minibatch (nats, higher is better).
      ``pair`` is a :class:`~pvae.model.VAE` or :class:`~pvae.engine.ModelGuidePair`, ``x`` a
      minibatch (a tensor, or :class:`~pvae.engine.WithCovariates`), ``index`` the datapoints'
      positions (or ``None``). Compute from :func:`pvae.engine.log_weights` to follow the programs.
    * Optionally a keyword ``kl_weight`` (a float, or a 0-d tensor inside a CUDA graph): the KL
      weight :math:`\beta_t` to use instead of :attr:`kl_weight`. A subclass without it reads
      :attr:`kl_weight` itself (the loop calls :meth:`set_progress` before every step); its steps
      then run eagerly.
    * Optionally :meth:`check` (refuse a pair before training), :attr:`min_batch_size`,
      :attr:`per_datapoint`, :attr:`has_kl_term` and :meth:`options` (saved in checkpoints).

    :ivar str name: registry name, kept in logs and checkpoints.
    :ivar int num_particles: samples per datapoint (K for IWAE).
    :ivar KLSchedule kl_schedule: weight of the KL term (ELBO family and InfoVAE; for IWAE, of
        the prior ratio inside the weights).
    """

    def __init__(self, name: str, num_particles: int = 1, kl_schedule: Optional[KLSchedule] = None,
                 fixed_schedule: bool = False):
        self.name = name
        self._fixed_schedule = fixed_schedule  # part of the objective's definition, not an option
        self.num_particles = engine._check_positive_int("num_particles", num_particles)
        self.kl_schedule = kl_schedule if kl_schedule is not None else KLSchedule()
        self.progress = math.inf  # outside a training loop every schedule is at full weight

    #: whether the objective has a KL term that :attr:`kl_weight` scales
    has_kl_term: bool = True
    #: fewest datapoints a minibatch may have
    min_batch_size: int = 1
    #: the loss is a mean of per-datapoint terms (so data-parallel shards, weighted by their sizes,
    #: average to the global minibatch's loss); False for minibatch statistics (MMD, free bits)
    per_datapoint: bool = True

    def check(self, vae, x: torch.Tensor) -> None:
        """Raise a clear error if this objective cannot train ``vae`` (called by
        :func:`pvae.fit` on two datapoints before anything is trained or written)."""

    def set_progress(self, epochs: float) -> None:
        """Tell the objective how far training has got (in epochs; fractional within one)."""
        self.progress = float(epochs)

    @property
    def kl_weight(self) -> float:
        """The KL weight :math:`\\beta_t` at the current progress."""
        return self.kl_schedule(self.progress)

    def options(self) -> dict:
        """Settings beyond name and particles that change the objective (for checkpoints)."""
        out = {}
        if not self.kl_schedule.is_identity and not self._fixed_schedule:
            out.update(beta=self.kl_schedule.beta, kl_warmup=self.kl_schedule.warmup,
                       kl_schedule=self.kl_schedule.kind)
        return out

    def surrogate_loss(self, vae, x: torch.Tensor, index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Differentiable surrogate, averaged over the batch (nats); its gradient is the
        objective's gradient estimator. ``index``: positions in the data set, for
        non-amortized guides."""
        return self.loss_and_value(vae, x, index)[0]

    def loss_and_value(
        self, vae, x: torch.Tensor, index: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Return ``(surrogate_loss, value)``: the loss to differentiate and the detached
        Monte Carlo estimate of the objective, averaged over the batch (nats, higher is better)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        opts = "".join(f", {k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({self.name!r}, num_particles={self.num_particles}{opts})"


def takes_kl_weight(objective) -> bool:
    """Whether ``objective.loss_and_value`` accepts the ``kl_weight`` keyword (see the contract
    of :class:`Objective`)."""
    try:
        params = inspect.signature(objective.loss_and_value).parameters
    except (TypeError, ValueError):
        return False
    return "kl_weight" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def call_objective(objective, pair, x, index=None, kl_weight=None):
    """``objective.loss_and_value(pair, x, index)``, passing ``kl_weight`` only to an objective
    that takes it (:func:`takes_kl_weight`); the one way the training loop calls an objective."""
    if kl_weight is not None and takes_kl_weight(objective):
        return objective.loss_and_value(pair, x, index, kl_weight=kl_weight)
    return objective.loss_and_value(pair, x, index)


def _reparametrized(samples) -> bool:
    return not samples.not_reparametrized


def _analytic_kl(samples) -> torch.Tensor:
    r""":math:`KL(q\|p)` per ``(K, B)``, summed over latent sites: in closed form where
    :func:`torch.distributions.kl_divergence` knows the pair (as
    :class:`pyro.infer.TraceMeanField_ELBO` does), else the sampled ``log q - log p``."""
    shape = samples.log_likelihood.shape
    total = torch.zeros(shape, dtype=samples.log_likelihood.dtype, device=samples.log_likelihood.device)
    for name, (log_p, log_q) in samples.site_terms.items():
        try:
            kl = torch.distributions.kl_divergence(samples.guide_dists[name], samples.prior_dists[name])
        except NotImplementedError:
            kl = log_q - log_p
        total = total + kl.expand(shape)
    return total


class ElboObjective(Objective):
    r"""The (KL-weighted) ELBO, per datapoint averaged over the batch, computed from
    :func:`pvae.engine.log_weights` (the programs' traces, or the tested fast path):
    :math:`E_q[\log p(x|z)] - \beta_t\,KL`, the KL sampled (``analytic_kl=False``, what
    :class:`pyro.infer.Trace_ELBO` computes) or in closed form where known (what
    :class:`pyro.infer.TraceMeanField_ELBO` computes). With reparametrized guide sites the
    surrogate is minus the value, as in Pyro; a guide with a non-reparametrizable site falls
    back to Pyro's own ``elbo.differentiable_loss`` (score-function gradient) with the KL weight
    applied by :class:`ScaleSite`. Tests check the value and gradient equal Pyro's ELBOs on the
    same noise."""

    def __init__(self, elbo: pyro.infer.ELBO, name: str, kl_schedule: Optional[KLSchedule] = None,
                 fixed_schedule: bool = False, analytic_kl: bool = False):
        super().__init__(name, elbo.num_particles, kl_schedule, fixed_schedule)
        self.elbo = elbo
        self.analytic_kl = bool(analytic_kl)

    def loss_and_value(self, vae, x, index=None, kl_weight=None):
        weight = self.kl_weight if kl_weight is None else kl_weight
        samples = engine.log_weights(vae, x, self.num_particles, index)
        if not _reparametrized(samples):
            return self._pyro_loss_and_value(vae, x, index, float(weight), samples.data_scale,
                                             bool(samples.enumerated))
        if samples.enumerated:  # discrete sites summed out: the enumerated ELBO (TraceEnum_ELBO's value)
            if not (isinstance(weight, (int, float)) and weight == 1.0):
                samples.require_decomposition("a KL weight (beta, warm-up)")
            value = samples.elbo_term.mean()
            return -value, value.detach()
        if not self.analytic_kl and isinstance(weight, (int, float)) and weight == 1.0:
            value = samples.log_weight.mean()  # the plain ELBO: fewer ops in the hot loop
        else:
            kl = _analytic_kl(samples) if self.analytic_kl else -samples.log_ratio
            value = (samples.log_likelihood - weight * kl).mean()
        return -value, value.detach()

    def _pyro_loss_and_value(self, vae, x, index, weight, data_scale=1.0, enumerated=False):
        """Pyro's own ELBO (score-function terms for non-reparametrized sites; the KL sampled, as
        :class:`pyro.infer.Trace_ELBO` computes it, even for ``elbo-analytic-kl``), per datapoint:
        Pyro's loss estimates the sum over the data set (a subsampled plate scales the minibatch's
        sum by N/B), so it is divided by the data set's size."""
        model, guide = vae.model, vae.guide
        if weight != 1.0:
            model = ScaleLatents(weight)(model)
            guide = ScaleLatents(weight)(guide)
        elbo = self.elbo
        nesting = int(getattr(vae, "max_plate_nesting", 1))
        kind = type(elbo)
        if kind is pyro.infer.TraceMeanField_ELBO:  # (it needs a reparametrized guide): the KL sampled
            kind = pyro.infer.Trace_ELBO
        if enumerated:  # sampled and enumerated discrete sites together
            kind = pyro.infer.TraceEnum_ELBO
        if nesting != 1 or kind is not type(elbo):
            elbo = kind(num_particles=elbo.num_particles, vectorize_particles=True, max_plate_nesting=nesting)
        (xt, idx), covariates = engine._call_args(x, index)
        loss = elbo.differentiable_loss(model, guide, xt, idx, **covariates) / (xt.shape[0] * data_scale)
        return loss, -loss.detach()


def _factorized_normal(d: dist.Distribution, what: str) -> dist.Normal:
    base = d.base_dist if isinstance(d, dist.Independent) else d
    if not isinstance(base, dist.Normal):
        raise UsageError(
            f"free bits need the KL per latent dimension, which exists in closed form for a diagonal "
            f"Gaussian {what}; got {type(base).__name__}. Use a diagonal guide and a standard-normal or "
            "learned-diagonal prior, or free_bits=0"
        )
    return base


class FreeBitsObjective(Objective):
    r"""The ELBO with free bits (Kingma et al., 2016):

    .. math::

        E_q[\log p(x|z)] - \beta_t \sum_{d=1}^{L} \max\big(\lambda,\ \overline{KL}_d\big),
        \qquad \overline{KL}_d = \frac1B\sum_b KL\big(q(z_d|x_b)\,\|\,p(z_d)\big),

    per datapoint averaged over the minibatch: a latent dimension whose minibatch-average KL is
    below λ nats is not pushed further toward the prior, which counters posterior collapse. The
    KL per dimension is in closed form, so the guide and the prior must be diagonal Gaussians.
    It is computed directly from the parts (:meth:`~pvae.model.VAE.log_likelihood`, the guide's
    and prior's distributions) because Pyro's ELBOs sum the KL over dimensions before any
    clamp could act. With λ = 0 it is ``elbo-analytic-kl``. With several latent sites (a
    hierarchy) every site's dimensions are clamped, a lower level's KL taken given the levels
    sampled above it (free bits per group, Kingma et al. 2016).
    """

    per_datapoint = False  # the clamp acts on the minibatch's average KL per dimension

    def __init__(self, num_particles: int, free_bits: float, kl_schedule: Optional[KLSchedule] = None):
        super().__init__("elbo-analytic-kl", num_particles, kl_schedule)
        free_bits = float(free_bits)
        if not (math.isfinite(free_bits) and free_bits >= 0):
            raise UsageError(f"free_bits must be a number of nats >= 0, got {free_bits!r}")
        self.free_bits = free_bits

    def options(self) -> dict:
        return {**super().options(), "free_bits": self.free_bits}

    def check(self, vae, x):
        with torch.no_grad():
            self._kl_per_dim(engine.log_weights(vae, x, 1))

    @staticmethod
    def _kl_per_dim(samples) -> torch.Tensor:
        """The minibatch-average KL per latent dimension of every latent site, concatenated in
        the program's order (for a hierarchy, each level's KL given the levels sampled above it,
        as free bits per group of Kingma et al. 2016)."""
        samples.require_decomposition("free bits (KL per latent dimension)")
        parts = []
        for name in samples.latents:
            q = _factorized_normal(samples.guide_dists[name], f"guide at site {name!r}")
            p = _factorized_normal(samples.prior_dists[name], f"prior at site {name!r}")
            kl = torch.distributions.kl_divergence(q, p)  # (K, B, L) or broadcastable
            parts.append(kl.reshape(-1, kl.shape[-1]).mean(0) if kl.dim() > 1 else kl)
        if not parts:
            raise UsageError("free bits need a latent site; the program has none")
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def loss_and_value(self, vae, x, index=None, kl_weight=None):
        weight = self.kl_weight if kl_weight is None else kl_weight
        samples = engine.log_weights(vae, x, self.num_particles, index)
        kl_per_dim = self._kl_per_dim(samples)  # (L,), minibatch (and particle) average
        value = samples.log_likelihood.mean() - weight * kl_per_dim.clamp(min=self.free_bits).sum()
        return -value, value.detach()


def _stop_gradient(q: dist.Distribution) -> dist.Distribution:
    """The same distribution with its parameters detached (for DReG's log q term)."""
    if isinstance(q, dist.Independent):
        return _stop_gradient(q.base_dist).to_event(q.reinterpreted_batch_ndims)
    if isinstance(q, dist.Normal):
        return dist.Normal(q.loc.detach(), q.scale.detach())
    if isinstance(q, dist.MultivariateNormal):
        return dist.MultivariateNormal(q.loc.detach(), scale_tril=q.scale_tril.detach())
    raise UsageError(
        f"the DReG gradient needs log q(z|x) with the guide's parameters held fixed, which pvae "
        f"provides for Gaussian guides (diagonal, full-rank), not for {type(q).__name__}; "
        "train this guide with dreg=False"
    )


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; the gradient multiplied by ``scale`` backward."""

    @staticmethod
    def forward(ctx, value, scale):
        ctx.save_for_backward(scale)
        return value.view_as(value)

    @staticmethod
    def backward(ctx, grad):
        (scale,) = ctx.saved_tensors
        return grad * scale, None


class _GuideDensity(torch.nn.Module):
    """``log q(z|x)`` of a pair's guide at given latents, as a module (for
    :func:`torch.func.functional_call` with the parameters held fixed)."""

    def __init__(self, pair):
        super().__init__()
        self.pair = pair

    def forward(self, x, latents, index):
        return engine.guide_log_density(self.pair, x, latents, index)


class IWAEObjective(Objective):
    r"""The importance-weighted bound :math:`\mathcal{L}_K` per datapoint (Burda et al., 2015):
    for each datapoint separately, :math:`\log\frac1K\sum_k w_k` with
    :math:`w_k = p(x, z_k)/q(z_k|x)`, :math:`z_k \sim q(z|x)` reparametrized, averaged over the
    batch. The log-weights come from :func:`pvae.engine.log_weights` — the same function as
    :func:`pvae.estimators.log_importance_weights`, so the
    logged value equals the estimator's :math:`\mathcal{L}_K` on the same samples.

    Why not :class:`pyro.infer.RenyiELBO` (α = 0)? Its log-mean-exp is per datapoint only for
    plates shared by *every* sample site (since Pyro 1.3; a site outside the data plate turns
    it into a bound on the whole batch, :math:`\log\frac1K\sum_k\prod_b w_{kb}`, pyro issue
    #3104). For pvae's model its value agrees with this objective's (tested), but it has no
    ``differentiable_loss``, so it cannot train module parameters outside Pyro's parameter
    store, and it has no DReG.

    With ``dreg=True`` the guide's gradient is the doubly reparametrized estimator (Tucker et
    al., 2018): :math:`\sum_k \tilde w_k^2\,\partial \log w_k/\partial z_k\,\partial z_k/\partial\phi`
    with :math:`\log q` evaluated at stopped guide parameters and normalized weights
    :math:`\tilde w_k`; the model's gradient stays :math:`\sum_k \tilde w_k \nabla_\theta\log p(x,z_k)`.
    Both are unbiased for the gradient of :math:`E[\mathcal{L}_K]`; DReG's variance does not
    grow with K. Implemented with one decoder pass: a gradient hook on ``z`` multiplies the
    gradient reaching it by :math:`\tilde w_k`.

    With a warm-up (``kl_schedule`` not constant) training follows the tempered bound
    :math:`\log\frac1K\sum_k p(x|z_k)\,[p(z_k)/q(z_k|x)]^{\beta_t}`, which is
    :math:`\mathcal{L}_K` once :math:`\beta_t = 1` and the warmed-up ELBO at K = 1; DReG's
    hook then multiplies by :math:`(1-\beta_t) + \beta_t\tilde w_k` (the score term
    :math:`-\beta_t\,\tilde w_k\,\partial\log q/\partial\phi` rewritten as a path term).
    """

    def __init__(self, num_particles: int, dreg: bool = False, kl_schedule: Optional[KLSchedule] = None):
        super().__init__("iwae", num_particles, kl_schedule)
        if self.kl_schedule.beta != 1.0:
            raise UsageError(f"the IWAE bound's prior term is only annealed toward 1 (kl_warmup, kl_schedule); "
                             f"a constant weight beta={self.kl_schedule.beta} is not an IWAE objective")
        self.dreg = bool(dreg)

    @property
    def has_kl_term(self) -> bool:
        """Whether the weights' prior term is annealed (then the KL weight is logged per epoch)."""
        return not self.kl_schedule.is_identity

    def check(self, vae, x):
        with torch.no_grad():
            samples = engine.log_weights(vae, x, 1)
        self._check_samples(samples)
        if self.dreg:
            for d in samples.guide_dists.values():
                _stop_gradient(d)

    def _check_samples(self, samples):
        samples.require_density("the IWAE bound (importance weights p(x, z) / q(z|x))")
        samples.require_reparametrized("the IWAE objective")
        if self.dreg:
            samples.require_decomposition("the DReG gradient (log q at stopped parameters)")
        if not self.kl_schedule.is_identity:
            samples.require_decomposition("a warm-up of the weights' prior term")

    def options(self) -> dict:
        out = {"dreg": True} if self.dreg else {}
        if not self.kl_schedule.is_identity:
            out.update(kl_warmup=self.kl_schedule.warmup, kl_schedule=self.kl_schedule.kind)
        return out

    def loss_and_value(self, vae, x, index=None, kl_weight=None):
        k = self.num_particles
        annealed = not self.kl_schedule.is_identity  # (decided by the schedule, not the weight's value:
        weight = self.kl_weight if kl_weight is None else kl_weight  # a CUDA graph passes a tensor)
        samples = engine.log_weights(vae, x, k, index)
        self._check_samples(samples)
        if not self.dreg:
            log_w = samples.log_likelihood + weight * samples.log_ratio if annealed else samples.log_weight
            value = engine.log_mean_exp(log_w, 0)  # (B,)
            return -value.mean(), value.mean().detach()
        if len(samples.latents) > 1:
            return self._dreg_several_sites(vae, x, index, samples, weight, annealed)
        shape = samples.log_joint.shape
        log_q_stopped = sum(_stop_gradient(samples.guide_dists[name]).log_prob(z).expand(shape)
                            for name, z in samples.latents.items())
        log_w = (samples.log_likelihood + weight * (samples.log_prior - log_q_stopped) if annealed
                 else samples.log_joint - log_q_stopped)
        value = engine.log_mean_exp(log_w.detach(), 0)
        normalized = torch.softmax(log_w.detach(), 0)  # (K, B)
        # the score term's share of the path gradient: w~ (so w~^2 in all) at beta_t = 1; with the
        # tempered weight log p(x|z) + beta_t (log p(z) - log q(z|x)), (1 - beta_t) + beta_t w~
        multiplier = (1 - weight) + weight * normalized if annealed else normalized
        for z in samples.latents.values():
            if z.requires_grad:
                extra = z.dim() - multiplier.dim()
                z.register_hook(lambda grad, w=multiplier.reshape(multiplier.shape + (1,) * extra): grad * w)
        loss = -(normalized * log_w).sum(0).mean()
        return loss, value.mean()

    def _dreg_several_sites(self, vae, x, index, samples, weight, annealed):
        r"""DReG for a guide with several latent sites (a hierarchy): a lower site's sample
        depends on the upper ones (:math:`z_1 = f(z_2, \epsilon_1)`), so a hook on every sample
        would scale a path through two sites twice, and detaching the guide's distribution
        parameters would cut the path :math:`z_2 	o q(z_1|x, z_2)`. Instead the log-densities are
        recomputed at copies of the samples whose gradient is scaled by the multiplier once (each
        path from the guide's parameters enters the weight through exactly one copy): the model
        conditioned on them, and the guide conditioned on them with its parameters held fixed
        (:func:`torch.func.functional_call` with detached parameters), so :math:`\log q` keeps
        its dependence on the upper samples. Costs one more pass of each program."""
        log_w_sampled = samples.log_likelihood + weight * samples.log_ratio if annealed else samples.log_weight
        normalized = torch.softmax(log_w_sampled.detach(), 0)
        multiplier = (1 - weight) + weight * normalized if annealed else normalized
        scaled = {}
        for name, z in samples.latents.items():
            extra = z.dim() - multiplier.dim()
            scaled[name] = _ScaleGradient.apply(z, multiplier.reshape(multiplier.shape + (1,) * extra))
        log_lik, log_prior = engine.log_density(vae, x, scaled, index, path="trace")
        stopped = {name: p.detach() for name, p in vae.named_parameters()}
        log_q_stopped = torch.func.functional_call(_GuideDensity(vae), {f"pair.{k}": v for k, v in stopped.items()},
                                                   (x, scaled, index), strict=False)
        log_w = log_lik + weight * (log_prior - log_q_stopped) if annealed else log_lik + log_prior - log_q_stopped
        value = engine.log_mean_exp(log_w_sampled.detach(), 0)
        loss = -(normalized * log_w).sum(0).mean()
        return loss, value.mean()


def gaussian_kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """:math:`k(a, b) = \\exp(-\\|a - b\\|^2 / L^2)` for all pairs (``(n, L), (m, L) -> (n, m)``),
    i.e. :math:`\\exp(-\\mathrm{mean}_d (a_d - b_d)^2 / L)` as in Zhao et al.'s reference code
    (``compute_kernel`` of their MMD-VAE)."""
    dim = a.shape[-1]
    return torch.exp(-torch.cdist(a, b).pow(2) / (dim * dim))


def mmd_squared(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    r"""Unbiased estimate of :math:`\mathrm{MMD}^2(P, Q)` from samples ``a ~ P`` ``(n, L)`` and
    ``b ~ Q`` ``(m, L)`` with :func:`gaussian_kernel` (Gretton et al., 2012, the U-statistic):
    :math:`\frac{1}{n(n-1)}\sum_{i\ne j}k(a_i,a_j) + \frac{1}{m(m-1)}\sum_{i\ne j}k(b_i,b_j)
    - \frac{2}{nm}\sum_{i,j}k(a_i,b_j)`. Needs n, m >= 2."""
    n, m = a.shape[0], b.shape[0]
    if n < 2 or m < 2:
        raise UsageError(f"the MMD estimate needs at least 2 samples on each side, got {n} and {m}")
    k_aa, k_bb, k_ab = gaussian_kernel(a, a), gaussian_kernel(b, b), gaussian_kernel(a, b)
    return ((k_aa.sum() - k_aa.diagonal().sum()) / (n * (n - 1))
            + (k_bb.sum() - k_bb.diagonal().sum()) / (m * (m - 1))
            - 2 * k_ab.mean())


class InfoVAEObjective(Objective):
    r"""InfoVAE (Zhao, Song & Ermon, 2019), per datapoint averaged over the batch:

    .. math::

        E_q[\log p(x|z)] - (1-\alpha)\,\beta_t\,E_q[\log q(z|x) - \log p(z)]
        - (\alpha + \lambda - 1)\,\mathrm{MMD}^2\big(q(z), p(z)\big),

    where :math:`q(z) = E_{p_D}[q(z|x)]` is the aggregate posterior, estimated on the minibatch
    by one guide sample per datapoint per particle against as many prior samples, with
    :func:`mmd_squared` (:func:`gaussian_kernel`). α = 1 removes the KL term (the MMD-VAE);
    α = 0, λ = 1 is the ELBO. The prior samples are drawn from :meth:`VAE.prior`; priors with
    reparametrized sampling (standard normal, learned diagonal, flow) receive the MMD's gradient,
    mixtures (MoG, VampPrior) are sampled without it. With several latent sites (a hierarchy) the
    codes of all sites are concatenated and the prior's are drawn jointly by running the model
    (a lower level's prior given the upper level's prior draw, not the guide's). Needs minibatches of at least 2
    (:func:`pvae.fit` checks the last one before training).
    """

    min_batch_size = 2
    per_datapoint = False  # the MMD is a U-statistic over the minibatch's codes

    def __init__(self, num_particles: int = 1, info_alpha: float = 0.0, mmd_lambda: float = 1000.0,
                 kl_schedule: Optional[KLSchedule] = None):
        super().__init__("infovae", num_particles, kl_schedule)
        alpha, lam = float(info_alpha), float(mmd_lambda)  # (the one name of each: the config's and the flags')
        if not (math.isfinite(alpha) and alpha <= 1):
            raise UsageError(f"InfoVAE info_alpha must be <= 1 (1 - info_alpha weights the KL), got {alpha!r}")
        if not (math.isfinite(lam) and alpha + lam - 1 >= 0):
            raise UsageError(
                f"InfoVAE needs info_alpha + mmd_lambda - 1 >= 0 (the weight of the MMD term), got "
                f"info_alpha={alpha}, mmd_lambda={lam}"
            )
        self.info_alpha, self.mmd_lambda = alpha, lam

    def options(self) -> dict:
        return {**super().options(), "info_alpha": self.info_alpha, "mmd_lambda": self.mmd_lambda}

    def loss_and_value(self, vae, x, index=None, kl_weight=None):
        weight = self.kl_weight if kl_weight is None else kl_weight
        if x.shape[0] < 2:
            raise UsageError("the InfoVAE objective estimates MMD over the minibatch and needs at least 2 "
                             f"datapoints per batch, got {x.shape[0]}")
        samples = engine.log_weights(vae, x, self.num_particles, index)
        samples.require_reparametrized("the InfoVAE objective")
        samples.require_decomposition("InfoVAE's KL and MMD terms")
        expected_loglik = samples.log_likelihood.mean(0)
        kl = (-samples.log_ratio).mean(0)
        # the aggregate posterior's samples against as many draws from the model's prior site(s)
        z_q, z_p = [], []
        joint = None
        if len(samples.latents) > 1:  # a hierarchy: draw the prior's levels jointly (the model proposes)
            joint = engine.log_weights(vae, x, self.num_particles, index, proposal="prior", enumerate=False).latents
        for name, z in samples.latents.items():
            if joint is not None:
                draw = joint[name]
            else:
                prior = samples.prior_dists[name]  # batch (P, B), as the plates expanded it
                draw = prior.rsample() if prior.has_rsample else prior.sample()  # mixtures: no pathwise gradient
            z_q.append(z.reshape(z.shape[0], z.shape[1], -1))
            z_p.append(draw.reshape(z.shape[0], z.shape[1], -1))
        z_q, z_p = torch.cat(z_q, -1), torch.cat(z_p, -1)  # (P, B, L)
        mmd = torch.stack([mmd_squared(a, b) for a, b in zip(z_q, z_p)]).mean()
        value = ((expected_loglik - (1 - self.info_alpha) * weight * kl).mean()
                 - (self.info_alpha + self.mmd_lambda - 1) * mmd)
        return -value, value.detach()


def _vectorized(elbo_class, num_particles: int) -> pyro.infer.ELBO:
    """A Pyro ELBO with particles vectorized over one extra plate dimension."""
    return elbo_class(num_particles=num_particles, vectorize_particles=True, max_plate_nesting=1)


_KL_OPTIONS_DOC = """
    :param int num_particles: samples of z per datapoint (vectorized).
    :param float beta: weight of the KL term (beta-VAE; 1 is the ELBO).
    :param float kl_warmup: length in epochs of the KL weight's warm-up (or of one cycle); 0 = none.
    :param str kl_schedule: the KL weight's schedule over kl_warmup."""


@OBJECTIVES.register("elbo")
def trace_elbo(num_particles: int = 1, beta: float = 1.0, kl_warmup: float = 0.0,
               kl_schedule: Literal["linear", "cyclical"] = "linear") -> Objective:
    return ElboObjective(_vectorized(pyro.infer.Trace_ELBO, num_particles), "elbo",
                         KLSchedule(beta, kl_warmup, kl_schedule))


trace_elbo.__doc__ = """ELBO with a Monte Carlo KL term (:class:`pyro.infer.Trace_ELBO`), KL weighted by
    ``beta`` and a warm-up schedule.
""" + _KL_OPTIONS_DOC


@OBJECTIVES.register("elbo-analytic-kl")
def mean_field_elbo(num_particles: int = 1, beta: float = 1.0, kl_warmup: float = 0.0,
                    kl_schedule: Literal["linear", "cyclical"] = "linear", free_bits: float = 0.0) -> Objective:
    if free_bits:
        return FreeBitsObjective(num_particles, free_bits, KLSchedule(beta, kl_warmup, kl_schedule))
    return ElboObjective(_vectorized(pyro.infer.TraceMeanField_ELBO, num_particles), "elbo-analytic-kl",
                         KLSchedule(beta, kl_warmup, kl_schedule), analytic_kl=True)


mean_field_elbo.__doc__ = """ELBO with an analytic KL term (:class:`pyro.infer.TraceMeanField_ELBO`); with
    ``free_bits`` > 0 nats per latent dimension, the free-bits ELBO (:class:`FreeBitsObjective`).
""" + _KL_OPTIONS_DOC + """
    :param float free_bits: nats per latent dimension below which the KL is not penalized
        (Kingma et al. 2016); 0 = off."""


@OBJECTIVES.register("reconstruction")
def reconstruction(num_particles: int = 1) -> Objective:
    """Expected reconstruction log-likelihood :math:`E_q[\\log p(x|z)]` (no prior, no entropy):
    the plain autoencoder's objective with the ``delta`` guide.

    :param int num_particles: samples of z per datapoint (vectorized)."""
    return ElboObjective(_vectorized(pyro.infer.Trace_ELBO, num_particles), "reconstruction",
                         KLSchedule(beta=0.0), fixed_schedule=True)


@OBJECTIVES.register("iwae")
def iwae(num_particles: int = 1, dreg: bool = False, kl_warmup: float = 0.0,
         kl_schedule: Literal["linear", "cyclical"] = "linear") -> Objective:
    r"""Importance-weighted bound L_K (Burda et al. 2016).

    :param int num_particles: K, the importance samples per datapoint.
    :param bool dreg: doubly reparametrized guide gradient (Tucker et al. 2019).
    :param float kl_warmup: epochs over which the weights' prior term is annealed: training
        follows :math:`\log\frac1K\sum_k p(x|z_k)\,[p(z_k)/q(z_k|x)]^{\beta_t}`, the IWAE
        counterpart of the ELBO's KL warm-up (at K = 1 the warmed-up ELBO's value, and its
        gradient without DReG); 0 = none.
    :param str kl_schedule: the schedule of :math:`\beta_t` over kl_warmup."""
    return IWAEObjective(num_particles, dreg, KLSchedule(1.0, kl_warmup, kl_schedule))


@OBJECTIVES.register("infovae")
def infovae(num_particles: int = 1, info_alpha: float = 0.0, mmd_lambda: float = 1000.0,
            beta: float = 1.0, kl_warmup: float = 0.0,
            kl_schedule: Literal["linear", "cyclical"] = "linear") -> Objective:
    return InfoVAEObjective(num_particles, info_alpha, mmd_lambda, KLSchedule(beta, kl_warmup, kl_schedule))


infovae.__doc__ = """InfoVAE / MMD-VAE (Zhao et al. 2019).
""" + _KL_OPTIONS_DOC + """
    :param float info_alpha: alpha; the KL term is weighted by 1 - alpha.
    :param float mmd_lambda: lambda; the MMD term is weighted by alpha + lambda - 1."""


def make_objective(name: str = "elbo", num_particles: int = 1, **options) -> Objective:
    """Build a registered objective by name with its options (those its factory declares, see
    ``pvae.OBJECTIVES.options(name)``); an option the objective does not take is an error."""
    return OBJECTIVES.build(Part(name, num_particles=num_particles, **options))
