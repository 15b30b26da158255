r"""Per-datapoint estimates of :math:`\log p_\theta(x)` from importance weights.

Everything here is computed from one function, :func:`pvae.engine.log_weights`, which returns
:math:`\log w_k = \log p_\theta(x, z_k) - \log q_\phi(z_k|x)`, :math:`z_k \sim q_\phi(z|x)`,
per datapoint and sample (shape ``(K, B)``), derived from the traces of the model and guide
programs (so an edited program changes every estimate). Unlike
:func:`pyro.infer.importance.vectorized_importance_weights`, which sums over the whole data
batch, these are kept per datapoint. ``vae`` may be a :class:`~pvae.model.VAE` or a
:class:`~pvae.engine.ModelGuidePair` of the user's own.

Each estimate is returned as an :class:`Estimate` carrying the estimator's name, the number
of samples ``K`` (honoured exactly; chunking never rounds it), the per-datapoint values, their
mean, and standard errors. All values are in nats.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, Optional

import pyro
import torch

from pvae import distributed

from pvae.inference import engine
from pvae._rng import seeded
from pvae.checkpoint import TORCH_LOAD_ERRORS, atomic_write
from pvae.errors import DiskFullError, UsageError
from pvae.data.streaming import is_streamed

__all__ = [
    "Estimate", "evaluate_bounds", "bounds_by_k", "elbo", "iwae_bound", "naive_prior_estimate",
    "reconstruction_error", "log_importance_weights", "importance_ess", "auto_chunk_size",
    "BatchCache",
]

#: ``chunk_size=None`` (the default) picks the samples per chunk from this memory budget:
#: a quarter of the free memory on a CUDA device, this many bytes on a CPU
CPU_CHUNK_BUDGET_BYTES = 512 * 2**20
DEFAULT_CHUNK_SIZE = None


def auto_chunk_size(vae, batch_size: int, num_samples: int, device=None, dtype=torch.float32,
                    data_dim: Optional[int] = None) -> int:
    """Samples per chunk so that one chunk's activations fit the memory budget: a quarter of
    the free memory of a CUDA device (``torch.cuda.mem_get_info``), or
    :data:`CPU_CHUNK_BUDGET_BYTES` on a CPU (where small chunks stay in cache).

    The bytes per sample and datapoint are estimated from the decoder's widths: the
    decoder's activations (twice each Linear layer's outputs) plus six copies of the data
    dimension (logits, the expanded data, the log-probabilities and their temporaries) and four
    of the latent dimension. Never more than ``num_samples``, never less than 1.

    For a user's :class:`~pvae.engine.ModelGuidePair` (no decoder or data_dim of pvae's), the
    widths are those of every ``Linear`` layer of its module (encoder and decoder alike: an
    overestimate, so a chunk stays within budget) and the data dimension is ``data_dim`` (the
    size of a datapoint, which the estimators pass)."""
    device = torch.device(device) if device is not None else getattr(vae, "device", torch.device("cpu"))
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = free // 4
    else:
        budget = CPU_CHUNK_BUDGET_BYTES
    data_dim = int(getattr(vae, "data_dim", 0) or data_dim or 0)
    latent_dim = int(getattr(vae, "latent_dim", 0) or 0)
    decoder = getattr(vae, "decoder", None)
    if decoder is None:  # a user's pair: every Linear layer of its module
        decoder = getattr(vae, "module", None)
    widths = sum(m.out_features for m in decoder.modules() if isinstance(m, torch.nn.Linear)) if decoder else 0
    per_sample = max(6 * data_dim + 2 * widths + 4 * latent_dim, 1) * torch.tensor([], dtype=dtype).element_size()
    return int(max(1, min(num_samples, budget // (per_sample * max(int(batch_size), 1)))))


@dataclass(frozen=True)
class Estimate:
    """A per-datapoint estimate of :math:`\\log p(x)` or a bound on it.

    :ivar str estimator: e.g. ``"elbo"`` or ``"iwae"``.
    :ivar int num_samples: importance samples per datapoint (K).
    :ivar torch.Tensor values: per-datapoint values, shape ``(N,)``, nats.
    :ivar torch.Tensor mc_stderr_per_datapoint: per-datapoint Monte Carlo standard error (see
        the producing function for how it is computed), shape ``(N,)``.

    Three error bars, three names: :attr:`stderr` (of the mean over the datapoints, data spread
    included: the error bar of a data-set average), :attr:`mc_stderr_of_mean` (Monte Carlo noise
    only, for these datapoints) and ``mc_stderr_per_datapoint`` (Monte Carlo noise, per datapoint).
    :ivar dict extra: further per-datapoint diagnostics (e.g. ``"ess"``).
    """

    estimator: str
    num_samples: int
    values: torch.Tensor
    mc_stderr_per_datapoint: torch.Tensor
    extra: Dict[str, torch.Tensor] = field(default_factory=dict)
    units: str = "nats per datapoint"

    @property
    def num_datapoints(self) -> int:
        return int(self.values.numel())

    @property
    def mean(self) -> float:
        """Mean over datapoints (nats per datapoint)."""
        return float(self.values.double().mean())

    @property
    def stderr(self) -> float:
        """Standard error of :attr:`mean` over the datapoints, ``std(values) / sqrt(N)``:
        it includes the spread between datapoints as well as Monte Carlo noise (the error
        bar of the data-set average, treating the datapoints as a sample)."""
        n = self.num_datapoints
        if n < 2:
            return float("nan")
        return float(self.values.double().std(unbiased=True) / math.sqrt(n))

    @property
    def mc_stderr_of_mean(self) -> float:
        """Monte Carlo standard error of :attr:`mean` for this fixed set of datapoints:
        ``sqrt(sum(mc_stderr_per_datapoint**2)) / N``."""
        return float(self.mc_stderr_per_datapoint.double().pow(2).sum().sqrt() / self.num_datapoints)

    @property
    def mc_stderr(self) -> torch.Tensor:
        """Deprecated alias of :attr:`mc_stderr_per_datapoint` (pvae 0.1's name)."""
        return self.mc_stderr_per_datapoint

    def bits_per_dim(self, data_dim: int) -> float:
        """:math:`-\\text{mean} / (D \\log 2)`: negative value in bits per data dimension."""
        return -self.mean / (data_dim * math.log(2.0))

    def to_dict(self) -> dict:
        out = {
            "estimator": self.estimator,
            "num_samples": self.num_samples,
            "num_datapoints": self.num_datapoints,
            "mean": self.mean,
            "stderr": self.stderr,
            "mc_stderr_of_mean": self.mc_stderr_of_mean,
            "units": self.units,
        }
        for key, value in self.extra.items():
            out[f"{key}_mean"] = float(value.double().mean())
        return out


_check_positive_int = engine._check_positive_int


def log_importance_weights(
    vae,
    x: torch.Tensor,
    num_samples: int,
    chunk_size: Optional[int] = DEFAULT_CHUNK_SIZE,
    proposal: str = "guide",
    index: Optional[torch.Tensor] = None,
) -> Iterator[torch.Tensor]:
    """Yield chunks of log importance weights :math:`\\log w_k = \\log p(x, z_k) - \\log r(z_k)`,
    :math:`z_k \\sim r`, where the proposal ``r`` is the guide :math:`q(z|x)` (``"guide"``)
    or the prior :math:`p(z)` (``"prior"``, for which :math:`\\log w_k = \\log p(x|z_k)`).

    :param vae: a :class:`~pvae.model.VAE`.
    :param x: data, ``(B, D)``.
    :param int num_samples: total K; the chunks' sizes add up to exactly K.
    :param chunk_size: samples per chunk; memory is ``O(chunk_size * B * D)``; ``None``:
        :func:`auto_chunk_size`.
    :param index: positions of ``x`` in the data set of a non-amortized guide.
    :yields: tensors of shape ``(k, B)`` with ``k <= chunk_size``, nats.

    Each chunk is :func:`pvae.engine.log_weights` (the programs' traces, or the tested fast
    path); the programs run once per chunk. Draws from the global torch RNG (wrap in
    :func:`pvae._rng.seeded` to fix it).
    """
    for samples in _weighted_chunks(vae, x, num_samples, chunk_size, proposal, index):
        yield samples.log_weight


def _datapoint_size(x) -> int:
    """Numbers per datapoint of data ``x`` (its tensor, with covariates)."""
    tensor, _ = engine.unpack(x)
    return int(math.prod(tensor.shape[1:]))


def _weighted_chunks(vae, x, num_samples, chunk_size, proposal="guide", index=None):
    """:func:`pvae.engine.log_weights` in chunks of at most ``chunk_size`` samples adding up to
    exactly ``num_samples``; a point-mass proposal is refused (its weights measure nothing)."""
    num_samples = _check_positive_int("num_samples", num_samples)
    if chunk_size is None:
        chunk_size = auto_chunk_size(vae, x.shape[0], num_samples, x.device, x.dtype, _datapoint_size(x))
    chunk_size = _check_positive_int("chunk_size", chunk_size)
    done = 0
    while done < num_samples:
        k = min(chunk_size, num_samples - done)
        samples = engine.log_weights(vae, x, k, index, proposal)
        samples.require_density("importance weights (the ELBO, L_K, importance sampling)")
        yield samples
        done += k


@contextlib.contextmanager
def _evaluating(vae):
    """No gradients and eval mode inside; the caller's train/eval modes restored after.

    Distribution argument validation is switched off inside (callers check the data once with
    :meth:`~pvae.model.VAE.check_data`; re-checking every chunk of samples costs ~5% of an
    IWAE evaluation) and restored after."""
    modes = {module: module.training for module in vae.modules()}
    for module in modes:
        module.training = False
    try:
        with torch.no_grad(), pyro.validation_enabled(False):
            yield
    finally:  # every submodule's own mode (parts may be shared with another VAE in another mode)
        for module, mode in modes.items():
            module.training = mode


def _device_of(vae) -> torch.device:
    """Where ``vae``'s parameters live (the CPU for a model without any)."""
    device = getattr(vae, "device", None)
    if device is not None:
        return torch.device(device)
    first = next(iter(vae.parameters()), None) if hasattr(vae, "parameters") else None
    return first.device if first is not None else torch.device("cpu")


def check_data(vae, x: torch.Tensor, what: str = "data") -> None:
    """The model's own data check (:meth:`pvae.model.VAE.check_data`) where it has one; for a
    user's model/guide pair, that ``x`` is a finite floating-point ``(B, ...)`` tensor."""
    if is_streamed(x):  # read on demand: checked a chunk at a time
        if len(x) == 0:
            raise UsageError(f"{what} hold no datapoints")
        for chunk in x.chunks():
            check_data(vae, chunk, what)
        return
    check = getattr(vae, "check_data", None)
    if check is not None:
        check(x, what)
        return
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1 or x.shape[0] < 1:
        raise UsageError(f"{what} must be a non-empty floating-point tensor (batch first)")
    if not bool(torch.isfinite(x).all()):
        raise UsageError(f"{what} contain NaN or infinite values; clean or drop those rows")


def _batches(x: torch.Tensor, batch_size: int, device=None):
    """Yield ``(start, x[start:start + batch_size])`` (a streamed split's rows read and moved to
    ``device``)."""
    for start in range(0, x.shape[0], batch_size):
        xb = x[start : start + batch_size]
        yield start, (xb.to(device) if device is not None else xb)


def _weight_statistics(
    vae, x, num_samples, batch_size, chunk_size, seed, proposal, progress, desc, index=None, cache=None
) -> Dict[str, torch.Tensor]:
    """Stream the log-weights of every datapoint once and keep, per datapoint: the
    log-mean-exp of the weights, the ESS, and the mean and variance of the log-weights.
    Memory is bounded by ``batch_size * chunk_size``; parameters and the caller's RNG and
    train/eval mode are left as they were."""
    num_samples = _check_positive_int("num_samples", num_samples)
    batch_size = _check_positive_int("batch_size", batch_size)
    check_data(vae, x)
    bar = None
    if progress and distributed.is_main():
        from pvae._progress import progress_bar_class

        tqdm = progress_bar_class()

        mine = distributed.my_batches(math.ceil(x.shape[0] / batch_size))  # this process's share
        bar = tqdm(total=sum(min(batch_size, x.shape[0] - i * batch_size) for i in mine), desc=desc, unit="x",
                   leave=False)
        if cache is not None:  # resumed minibatches
            bar.update(sum(len(b["mean_lw"]) for b in cache.batches.values()))
    k = num_samples
    device = _device_of(vae) if is_streamed(x) else x.device
    if chunk_size is None and distributed.active():  # one chunking (hence one set of draws) for every process
        chunk_size = distributed.broadcast(auto_chunk_size(vae, min(batch_size, x.shape[0]), k, device,
                                                           data_dim=_datapoint_size(x)))

    def statistics(start, xb):
        ib = None if index is None else index[start : start + xb.shape[0]]
        lse = torch.full((xb.shape[0],), -math.inf, dtype=xb.dtype, device=device)
        lse2 = lse.clone()
        total = torch.zeros(xb.shape[0], dtype=torch.float64, device=device)
        total_sq = torch.zeros_like(total)
        for samples in _weighted_chunks(vae, xb, k, chunk_size, proposal, ib):
            lw = samples.log_weight
            lse = torch.logaddexp(lse, torch.logsumexp(lw, 0))
            lse2 = torch.logaddexp(lse2, torch.logsumexp(2 * lw, 0))
            lw64 = samples.elbo_term.double()  # the ELBO's integrand (= lw unless sites are enumerated)
            total += lw64.sum(0)
            total_sq += lw64.pow(2).sum(0)
        mean_lw = total / k
        if bar is not None:
            bar.update(xb.shape[0])
        return {"mean_lw": mean_lw,
                "var_lw": (total_sq / k - mean_lw.pow(2)).clamp_min(0) * (k / max(k - 1, 1)),
                "log_mean_w": lse.double() - math.log(k),
                "ess": (2 * lse - lse2).double().exp()}

    try:
        with _evaluating(vae):
            parts = per_batch(x, batch_size, seed, device, statistics, cache)
    finally:
        if bar is not None:
            bar.close()
    return {name: torch.cat([p[name] for p in parts]).cpu() for name in ("log_mean_w", "ess", "mean_lw", "var_lw")}


class BatchCache:
    """The finished minibatches of a long evaluation, kept in a file so that an interrupted
    evaluation resumes where it stopped instead of starting over.

    ``key`` (a dict of plain values) says what is being computed: the estimator, K, the seed,
    the batch and chunk sizes, the data and the checkpoint. A file written under another key, or
    one that cannot be read, is set aside (the evaluation starts afresh and overwrites it); it is
    only a cache of unfinished work; ``set_aside`` says why. Every :meth:`put` rewrites the file
    atomically (on a full disk the evaluation goes on without it, with a warning). With a seed,
    minibatch ``i`` draws from its own seed ``(seed, i)`` (:func:`per_batch`), so a resumed
    evaluation returns exactly the values of an uninterrupted one.
    """

    def __init__(self, path, key: dict):
        self.path, self.key, self.batches = Path(path), dict(key), {}
        self.set_aside, self.full = None, False
        if self.path.exists():
            try:
                saved = torch.load(self.path, map_location="cpu", weights_only=True)
                matches = isinstance(saved, dict) and saved.get("key") == self.key
            except (OSError, *TORCH_LOAD_ERRORS) as exc:  # unreadable, truncated or not ours: start afresh
                saved, matches = None, False
                self.set_aside = f"unreadable ({type(exc).__name__})"
            if matches:
                self.batches = dict(saved["batches"])
            elif self.set_aside is None:
                self.set_aside = "written for other settings"
        self.resumed = len(self.batches)

    def __contains__(self, i: int) -> bool:
        return i in self.batches

    def __getitem__(self, i: int) -> dict:
        return self.batches[i]

    def put(self, i: int, value: dict) -> None:
        self.batches[i] = {k: v.detach().cpu() for k, v in value.items()}
        if self.full:
            return
        state = {"key": self.key, "batches": self.batches}
        try:
            atomic_write(self.path, lambda fh: torch.save(state, fh))
        except DiskFullError as exc:  # the evaluation itself can go on; only resuming it is lost
            self.full = True
            warnings.warn(f"{exc.args[0].split(';')[0]}: the evaluation goes on without keeping its finished "
                          "minibatches (if it is interrupted, it starts afresh)", RuntimeWarning, stacklevel=2)

    def discard(self) -> None:
        """Remove the file (the evaluation it served has finished)."""
        self.path.unlink(missing_ok=True)


def per_batch(x, batch_size: int, seed: Optional[int], device, compute, cache: Optional[BatchCache] = None) -> list:
    """``compute(start, xb)`` (a dict of per-datapoint tensors) for every minibatch of ``x``, in
    order. Minibatch ``i`` runs under its own seed :func:`pvae.distributed.batch_seed` ``(seed, i)``
    (``seed=None``: the global stream), so the values do not depend on which process computes it:
    under :mod:`torch.distributed` the minibatches are dealt out to the processes and gathered, and
    every process returns all of them, the same as one process would. ``cache``
    (:class:`BatchCache`, one process only): minibatches found there are not recomputed, and each
    computed one is added to it."""
    if cache is not None and distributed.active():
        raise UsageError("a BatchCache serves one process; a sharded evaluation cannot resume from one")
    if cache is not None and seed is None:
        raise UsageError("resuming an evaluation needs a seed (seed=None draws from the global stream)")
    num_batches = math.ceil(x.shape[0] / batch_size)
    streamed = is_streamed(x)
    local = {}
    for i in distributed.my_batches(num_batches):
        if cache is not None and i in cache:
            local[i] = {k: v.to(device) for k, v in cache[i].items()}
            continue
        start = i * batch_size
        xb = x[start : start + batch_size]
        if streamed:
            xb = xb.to(device)
        with seeded(distributed.batch_seed(seed, i), device):
            local[i] = compute(start, xb)
        if cache is not None:
            cache.put(i, local[i])
    merged = distributed.gather_batches(local, num_batches)
    return [{k: v.to(device) for k, v in merged[i].items()} if distributed.active() else merged[i]
            for i in range(num_batches)]


def importance_ess(log_weights: torch.Tensor) -> torch.Tensor:
    """Effective sample size :math:`(\\sum_k w_k)^2 / \\sum_k w_k^2` over dim 0 of
    ``log_weights`` (samples first), computed in the log domain."""
    return torch.exp(2 * torch.logsumexp(log_weights, 0) - torch.logsumexp(2 * log_weights, 0))


def _importance_estimate(name: str, stats: Dict[str, torch.Tensor], k: int) -> Estimate:
    # delta method: Var[log mean w] ~ Var[w] / (K E[w]^2) = 1/ESS - 1/K per datapoint
    mc_stderr = (1.0 / stats["ess"] - 1.0 / k).clamp_min(0).sqrt()
    extra = {"ess": stats["ess"], **{key: v for key, v in stats.items() if key not in ("ess", "log_mean_w")}}
    return Estimate(name, k, stats["log_mean_w"], mc_stderr, extra)


def evaluate_bounds(
    vae,
    x: torch.Tensor,
    num_samples: int,
    batch_size: int = 100,
    chunk_size: Optional[int] = DEFAULT_CHUNK_SIZE,
    seed: Optional[int] = 0,
    progress: bool = False,
    index: Optional[torch.Tensor] = None,
    cache: Optional[BatchCache] = None,
) -> Dict[str, Estimate]:
    r"""ELBO and importance-weighted bound :math:`\mathcal{L}_K` from the same K samples.

    * ``"elbo"``: :math:`\frac1K\sum_k \log w_k`, an unbiased estimate of the ELBO
      :math:`E_q[\log p(x,z) - \log q(z|x)] \le \log p(x)`. Monte Carlo standard error
      ``std(log w) / sqrt(K)`` per datapoint. With discrete sites summed out (enumerated), the
      mean of the enumerated ELBO integrand (:attr:`pvae.engine.WeightedSamples.elbo_term`:
      the guide's enumerated sites in expectation, as :class:`pyro.infer.TraceEnum_ELBO`).
    * ``"iwae"``: :math:`\mathcal{L}_K = \log \frac1K \sum_k w_k` (Burda et al., 2015); its
      expectation is a lower bound on :math:`\log p(x)` that tightens as K grows, and it is a
      consistent estimate of :math:`\log p(x)` as :math:`K\to\infty`. Per-datapoint Monte
      Carlo standard error by the delta method, :math:`\sqrt{1/\mathrm{ESS} - 1/K}`, with the
      importance-sampling effective sample size
      :math:`\mathrm{ESS} = (\sum w)^2 / \sum w^2` reported in ``extra["ess"]``.

    Cost: one encoder pass per chunk and K decoder passes per datapoint, in chunks of
    ``chunk_size`` samples (default: from the memory budget, :func:`auto_chunk_size`) over data
    batches of ``batch_size`` (memory bounded by both). Parameters are not
    changed and no gradients are kept. ``seed`` fixes the samples without touching the global
    RNG (``None`` draws from it). ``index``: positions of ``x`` in the data set of a
    non-amortized guide. ``cache``: a :class:`BatchCache` to resume an interrupted evaluation
    from (the minibatches it holds are not recomputed; each new one is added).

    :returns: ``{"elbo": Estimate, "iwae": Estimate}``, values in nats per datapoint.
    """
    stats = _weight_statistics(
        vae, x, num_samples, batch_size, chunk_size, seed, "guide", progress, f"L_{num_samples}", index, cache
    )
    k = int(num_samples)
    return {
        "elbo": Estimate("elbo", k, stats["mean_lw"], (stats["var_lw"] / k).sqrt()),
        "iwae": _importance_estimate("iwae", stats, k),
    }


def bounds_by_k(vae, x: torch.Tensor, ks, seed: Optional[int] = 0, **kwargs) -> Dict[int, Dict[str, Estimate]]:
    """:func:`evaluate_bounds` for each K in ``ks`` (independent draws for each K: seed
    ``seed + i``), on the same datapoints: ``{K: {"elbo": Estimate, "iwae": Estimate}}``, for
    plotting the bounds as K grows (:func:`pvae.plots.bounds_versus_k`). Cost: sum(ks) samples
    per datapoint."""
    out = {}
    for i, k in enumerate(ks):
        k = _check_positive_int("K", k)
        if k in out:
            raise UsageError(f"K={k} appears twice in ks")
        out[k] = evaluate_bounds(vae, x, k, seed=None if seed is None else seed + i, **kwargs)
    return out


def elbo(vae, x: torch.Tensor, num_samples: int = 1, **kwargs) -> Estimate:
    """Unbiased Monte Carlo ELBO per datapoint from ``num_samples`` samples of q; see
    :func:`evaluate_bounds`."""
    return evaluate_bounds(vae, x, num_samples, **kwargs)["elbo"]


def iwae_bound(vae, x: torch.Tensor, num_samples: int, **kwargs) -> Estimate:
    """Importance-weighted bound :math:`\\mathcal{L}_K` per datapoint; see
    :func:`evaluate_bounds`."""
    return evaluate_bounds(vae, x, num_samples, **kwargs)["iwae"]


def naive_prior_estimate(
    vae,
    x: torch.Tensor,
    num_samples: int,
    batch_size: int = 100,
    chunk_size: Optional[int] = DEFAULT_CHUNK_SIZE,
    seed: Optional[int] = 0,
    progress: bool = False,
    cache: Optional[BatchCache] = None,
) -> Estimate:
    r"""The naive Monte Carlo estimate :math:`p(x) \approx \frac1n \sum_i p(x|z_i)`,
    :math:`z_i \sim p(z)` — importance sampling with the prior as proposal.

    Returns :math:`\log \frac1n \sum_i p(x|z_i)` per datapoint. :math:`\hat p(x)` is unbiased,
    so its log is biased *downwards* (Jensen) and in high dimension almost all prior draws
    explain ``x`` badly: the effective sample size ``extra["ess"]`` collapses towards 1 and
    the estimate falls far below :math:`\log p(x)`. Per-datapoint Monte Carlo standard error
    by the delta method, :math:`\sqrt{1/\mathrm{ESS} - 1/n}`. Cost: n decoder passes per
    datapoint; the guide is not used. ``seed`` and ``cache`` as in :func:`evaluate_bounds`.
    """
    stats = _weight_statistics(
        vae, x, num_samples, batch_size, chunk_size, seed, "prior", progress, f"naive n={num_samples}", cache=cache
    )
    return _importance_estimate("naive-prior-mc", stats, int(num_samples))


def reconstruction_error(
    vae, x: torch.Tensor, batch_size: int = 1000, index: Optional[torch.Tensor] = None
) -> Dict[str, Estimate]:
    r"""Deterministic reconstruction quality at the code :math:`\hat z = E_q[z|x]`
    (the encoder output of an autoencoder):

    * ``"reconstruction"``: :math:`\log p_\theta(x|\hat z)` per datapoint (nats; minus the
      binary cross-entropy under a Bernoulli likelihood),
    * ``"squared-error"``: :math:`\|x - E[x|\hat z]\|^2` per datapoint (data units squared).

    No sampling (``num_samples`` is reported as 1 and the Monte Carlo errors are 0). The code
    and the density come from the guide and model programs (:func:`pvae.engine.guide_mean`,
    :func:`pvae.engine.reconstruction`).
    """
    batch_size = _check_positive_int("batch_size", batch_size)
    check_data(vae, x)
    loglik, sq = [], []
    with _evaluating(vae):
        for start, xb in _batches(x, batch_size, _device_of(vae) if is_streamed(x) else None):
            ib = None if index is None else index[start : start + xb.shape[0]]
            log_lik, mean = engine.reconstruction(vae, xb, engine.guide_mean(vae, xb, ib), ib)
            loglik.append(log_lik.double())
            sq.append((xb - mean).pow(2).sum(-1).double())
    loglik, sq = torch.cat(loglik).cpu(), torch.cat(sq).cpu()
    return {
        "reconstruction": Estimate("reconstruction-log-likelihood", 1, loglik, torch.zeros_like(loglik)),
        "squared-error": Estimate(
            "squared-error", 1, sq, torch.zeros_like(sq), units="squared data units per datapoint"
        ),
    }
