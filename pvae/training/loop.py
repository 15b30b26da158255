"""The training loop: minibatch stochastic variational inference on a Pyro model/guide pair.

:class:`TrainStep` is one step — the objective's surrogate loss (by default the ELBO of
``vae.model``/``vae.guide``, equal to Pyro's ``Trace_ELBO`` on the same noise), backward, and
the optimizer's update over ``vae.parameters()`` (the module form of Pyro's ELBOs: parameters stay
in the model, not in Pyro's global parameter store) — with no host synchronisation, so it can be
compiled or captured in a CUDA graph. :func:`fit` is a short epoch loop around it (data order,
KL schedules, device-side accumulation, the validation metric and the best model) that fires
named events on callbacks (:mod:`pvae.training.callbacks`) for everything else: checkpoint and
resume, learning-rate schedule, non-finite guard, early stopping, time limit, trackers, progress
bar. Its settings are one :class:`~pvae.config.Training`; without one, :data:`FIT_DEFAULTS`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional, Sequence, Tuple, Union

import pyro
import torch

from pvae import distributed
from pvae.training.controls import (
    LEGACY_TRAINING_KEYS,
    OPTIMIZERS,
    SCHEDULES,
    TRAINING_PARTS,
    make_optimizer,
    use_precision,
)
from pvae._rng import seeded
from pvae.checkpoint import load_checkpoint, save_checkpoint, write_jsonl
from pvae.errors import UsageError, UsageTypeError, rows_phrase
from pvae.inference.estimators import check_data, evaluate_bounds, reconstruction_error
from pvae.training.callbacks import (
    Callback,
    Checkpoint,
    EarlyStopping,
    FitLoop,
    LRScheduler,
    NonFiniteGuard,
    ProgressBar,
    TimeLimit,
    Trackers,
)
from pvae.training.objectives import Objective, call_objective, make_objective, takes_kl_weight
from pvae.data.streaming import is_streamed
from pvae.data.streaming import loader as stream_loader

if TYPE_CHECKING:
    from pvae.config import Training

__all__ = ["fit", "History", "TrainStep", "train_epoch", "FIT_DEFAULTS"]

CHECKPOINT_FILE = "checkpoint.pt"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_FORMAT = 1


@dataclass
class History:
    """What :func:`fit` did, one record per epoch.

    Record keys: ``epoch`` (1-based), ``train_objective`` (mean training objective over the
    epoch's minibatches, nats per datapoint, as the parameters moved), ``val_metric`` (the
    name of the validation metric), its value and ``<name>_stderr``, and ``seconds``. The
    validation metric is ``val_elbo`` (ELBO on the validation data at the end of the epoch,
    ``val_num_samples`` samples per datapoint, nats per datapoint; ``val_iwae``, L_K with
    K = ``val_num_samples``, when fit's ``val_bound="iwae"``) when the guide has a density, else ``val_reconstruction`` (:math:`\\log p(x|\\hat z)` at the encoder's code).
    """

    records: List[dict] = field(default_factory=list)
    best_epoch: Optional[int] = None
    stopped_early: bool = False
    #: True when this call of :func:`fit` stopped at its ``max_time``; the run is not finished
    #: (``fit(..., resume=True)`` continues it), unlike ``stopped_early``.
    time_limit_reached: bool = False
    #: why this call of :func:`fit` stopped before its last epoch (None: it ran them all)
    stop_reason: Optional[str] = None

    @property
    def train_objective(self) -> List[float]:
        return [r["train_objective"] for r in self.records]

    @property
    def val_elbo(self) -> List[float]:
        return [r["val_elbo"] for r in self.records if r.get("val_elbo") is not None]

    @property
    def val_metric(self) -> Optional[str]:
        """Name of the validation metric (``"val_elbo"`` or ``"val_reconstruction"``)."""
        return self.records[0].get("val_metric") if self.records else None

    @property
    def best_val(self) -> Optional[float]:
        """Best value of the validation metric (higher is better)."""
        if self.best_epoch is None:
            return None
        return self.records[self.best_epoch - 1][self.val_metric]

    @property
    def best_val_elbo(self) -> Optional[float]:
        return self.best_val if self.val_metric == "val_elbo" else None


def _rng_state(generator: torch.Generator, device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "data_order": generator.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, generator: torch.Generator, device: torch.device) -> None:
    ranks = state.get("ranks")
    if ranks is not None:  # a data-parallel run: every process's own streams
        if len(ranks) != distributed.world_size():
            raise UsageError(f"this checkpoint was written by {len(ranks)} processes; resume it with as many "
                             f"(this launch has {distributed.world_size()})")
        state = ranks[distributed.rank()]
    elif distributed.active():
        raise UsageError("this checkpoint was written by one process; resume it with one process")
    torch.set_rng_state(state["torch"])
    generator.set_state(state["data_order"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _needs_index(vae) -> bool:
    """Whether the guide is addressed by the datapoints' positions (a non-amortized guide)."""
    guide_net = getattr(vae, "guide_net", None)
    return bool(getattr(guide_net, "needs_index", False) if guide_net is not None else getattr(vae, "needs_index", False))


def _has_density(vae, x) -> bool:
    """Whether the guide has a density: pvae's guides say so; a user's program is asked by
    tracing it on two datapoints (a point-mass site has none)."""
    guide_net = getattr(vae, "guide_net", None)
    if guide_net is not None:
        return bool(guide_net.has_density)
    from pvae.inference import engine

    with torch.no_grad(), pyro.validation_enabled(False):
        return not engine.log_weights(vae, x[:2], 1, enumerate=False).point_masses


def _validate(vae, valid_data, num_samples, seed, bound="elbo"):
    """The validation metric: the ELBO (or, with ``bound="iwae"``, L_K with K = ``num_samples``)
    if the guide has a density, else the reconstruction log-likelihood at the encoder's code.
    Runs under its own seed (training draws unchanged)."""
    if _has_density(vae, valid_data[:2].to(vae.device) if is_streamed(valid_data) else valid_data):
        return f"val_{bound}", evaluate_bounds(vae, valid_data, num_samples, seed=seed)[bound]
    if is_streamed(valid_data):
        valid_data = valid_data.to(vae.device)
    return "val_reconstruction", reconstruction_error(vae, valid_data)["reconstruction"]


STEP_MODES = ("auto", "eager", "compile", "cuda-graph")


class TrainStep:
    """One training step — surrogate loss, backward, Adam update — with no host synchronisation.

    The update is never applied with a non-finite loss or gradient: after ``backward`` a
    device-side flag ``found_inf`` (``torch._amp_foreach_non_finite_check_and_unscale_`` over the
    gradients, or-ed with a non-finite loss) is handed to fused Adam, whose kernel skips the
    update (parameters, moments and step count) when it is set — the mechanism
    :class:`torch.amp.GradScaler` uses, without a ``.item()``. The step returns the objective's
    value and the flag as device tensors; :func:`fit` accumulates them on the device and reads
    them back once per epoch (or every ``check_every`` steps).

    Modes: ``"eager"``; ``"compile"`` (:func:`torch.compile` of the loss-and-backward);
    ``"cuda-graph"`` (CUDA only: the whole step for minibatches of one size captured in a CUDA
    graph after three warm-up steps whose effects are undone; other sizes, such as an epoch's
    last partial minibatch, run eagerly on the same optimizer); ``"auto"`` is ``"cuda-graph"`` on
    CUDA for pvae's own programs and ``"eager"`` elsewhere. Every mode computes the same
    objective (tests check the eager step against Pyro's ``Trace_ELBO`` on the same noise).
    """

    def __init__(self, vae, objective, optimizer, mode: str = "auto", index_arg: bool = False,
                 clip_grad_norm: Optional[float] = None):
        if mode not in STEP_MODES:
            raise UsageError(f"unknown step mode {mode!r}; valid choices: {', '.join(STEP_MODES)}")
        device = vae.device
        self.ddp = None
        if distributed.active():  # data-parallel: the objective as a DDP module, eager steps
            if mode not in ("auto", "eager"):
                raise UsageError(f"step mode {mode!r} is not available under torch.distributed; use 'eager' "
                                 "(the default there)")
            mode = "eager"
            self.ddp = False  # wrapped at the first minibatch (distributed.wrap probes it)
        graphable = bool(optimizer.defaults.get("fused")) and bool(optimizer.defaults.get("capturable"))
        weighted = takes_kl_weight(objective)  # a graph replays the KL weight it is given, so it must take one
        if mode == "auto":  # (an optimizer without the fused, capturable kernel reads found_inf on the host)
            mode = "cuda-graph" if (device.type == "cuda" and vae.programs_are_builtin() and graphable
                                    and weighted) else "eager"
        if mode == "cuda-graph" and not weighted:
            raise UsageError(f"step mode 'cuda-graph' replays the KL weight it is passed, and "
                             f"{type(objective).__name__}.loss_and_value takes no kl_weight keyword; use step 'eager'")
        if mode == "cuda-graph" and device.type != "cuda":
            raise UsageError("step mode 'cuda-graph' needs the model on a CUDA device; use 'eager' or 'compile'")
        if mode == "cuda-graph" and not graphable:
            raise UsageError(f"step mode 'cuda-graph' needs an optimizer with a fused, capturable kernel (adam, "
                             f"adamw); {type(optimizer).__name__} updates outside a graph: use step 'eager'")
        self.vae, self.objective, self.optimizer, self.mode = vae, objective, optimizer, mode
        self.clip_grad_norm = clip_grad_norm
        self.params = [p for p in vae.parameters() if p.requires_grad]
        self.one = torch.ones((), device=device)
        self._loss_backward = self._eager_loss_backward
        if mode == "compile":
            self._loss_backward = torch.compile(self._eager_loss_backward)
        self._graph = None  # (batch_size, graph, static tensors)

    def _eager_loss_backward(self, x, index, kl_weight, weight=1.0):
        if self.ddp is not None:  # gradients averaged over the processes in backward
            if self.ddp is False:
                self.ddp = distributed.wrap(self.vae, self.objective, x, index, kl_weight)
            loss, value = self.ddp(x, index, kl_weight, weight)
        else:
            loss, value = call_objective(self.objective, self.vae, x, index, kl_weight)
        loss.backward()
        return loss.detach(), value.detach()

    def _eager(self, x, index, kl_weight, static_grads=False, weight=1.0):
        if static_grads:  # a CUDA graph replays into the same gradient buffers every step
            grads = [p.grad for p in self.params if p.grad is not None]
            if grads:
                torch._foreach_zero_(grads)
        else:
            for p in self.params:
                p.grad = None
        loss, value = self._loss_backward(x, index, kl_weight, weight) if self.ddp is not None else \
            self._loss_backward(x, index, kl_weight)
        grads = [p.grad for p in self.params if p.grad is not None]
        if self.clip_grad_norm is not None and grads:  # (a non-finite norm makes the gradients NaN: skipped below)
            torch.nn.utils.clip_grad_norm_([p for p in self.params if p.grad is not None], self.clip_grad_norm,
                                           foreach=True)
        found_inf = (~torch.isfinite(loss)).float().reshape(())
        if grads:
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, self.one)
        _guarded_step(self.optimizer, found_inf)
        return value, found_inf

    def release(self) -> None:
        """Drop the DDP wrapper and the captured CUDA graph (training is over). The step keeps a
        bound method of itself (a reference cycle), so without this they would live until the
        cyclic garbage collector runs, which may be after the process group is destroyed. The step
        cannot be called afterwards."""
        self.ddp = None
        self._graph = None
        self._loss_backward = None

    def __call__(self, x, index=None, kl_weight=1.0, weight=1.0):
        """Run one step on minibatch ``x``; returns ``(value, found_inf)``, 0-d device tensors.
        Distribution argument validation is off inside the step (it reads tensors back to the
        host); :func:`fit` checks the data once before training. ``weight`` scales this
        process's loss under torch.distributed (its share of the global minibatch)."""
        with pyro.validation_enabled(False):
            if self.ddp is not None:
                return self._eager(x, index, kl_weight, weight=weight)
            return self._step(x, index, kl_weight)

    def _step(self, x, index, kl_weight):
        if self.mode != "cuda-graph" or index is not None:
            return self._eager(x, index, kl_weight)
        if self._graph is None:
            self._capture(x)
        batch, graph, static_x, static_w, static_out = self._graph
        if x.shape[0] != batch:
            return self._eager(x, None, kl_weight)
        static_x.copy_(x)
        static_w.fill_(float(kl_weight))
        graph.replay()
        return static_out[0].clone(), static_out[1].clone()

    def _capture(self, x):
        """Warm up on a side stream, undo the warm-up in place (parameters, optimizer state and
        the CUDA random state, so that a resumed run continues its trajectory), capture the step."""
        device = x.device
        static_x, static_w = x.clone(), torch.ones((), device=device)
        saved_params = [p.detach().clone() for p in self.params]
        saved_state = {p: {k: v.clone() if torch.is_tensor(v) else v for k, v in state.items()}
                       for p, state in self.optimizer.state.items()}
        saved_rng = torch.cuda.get_rng_state(device)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                self._eager(static_x, None, static_w, static_grads=True)
        torch.cuda.current_stream().wait_stream(stream)
        with torch.no_grad():  # back to the state before the warm-up, in the same storage
            for p, saved in zip(self.params, saved_params):
                p.copy_(saved)
            for p, state in self.optimizer.state.items():
                for key, value in state.items():
                    if not torch.is_tensor(value):
                        continue
                    if p in saved_state:  # a resumed optimizer: its moments and step count
                        value.copy_(saved_state[p][key])
                    else:  # created by the warm-up: a fresh Adam has zero moments and steps
                        value.zero_()
        torch.cuda.set_rng_state(saved_rng, device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = self._eager(static_x, None, static_w, static_grads=True)
        self._graph = (x.shape[0], graph, static_x, static_w, static_out)


def _optimizer(vae, lr: float, name: str = "adam", weight_decay: float = 0.0, momentum: float = 0.0,
               tensor_lr: bool = False):
    """The optimizer by name (:func:`pvae.controls.make_optimizer`; Adam: fused, on the device)."""
    return make_optimizer(vae.parameters(), name, lr, weight_decay, momentum, vae.device, tensor_lr)


def _guarded_step(optimizer, found_inf):
    """Apply the update unless ``found_inf``: on the device for fused Adam; with one host read
    for an optimizer without the fused kernel (correctness over speed)."""
    if optimizer.defaults.get("fused"):
        optimizer.found_inf, optimizer.grad_scale = found_inf, None
        optimizer.step()
    elif not bool(found_inf):
        optimizer.step()


def data_parallel_problem(objective, batch_size: int, num_train: int) -> Optional[UsageError]:
    """Why ``objective`` cannot be trained data-parallel over this process group in minibatches of
    ``batch_size`` (None when it can, or when not data-parallel)."""
    world = distributed.world_size()
    error = None
    if world <= 1:
        return None
    if batch_size < world:
        error = UsageError(f"batch_size {batch_size} is smaller than the {world} processes: every process needs "
                           "a share of each minibatch")
    elif not getattr(objective, "per_datapoint", True):
        error = UsageError(f"objective {objective.name!r} is not a mean over datapoints (a minibatch statistic), so "
                           "the processes' shares would optimise another objective; train it in one process")
    else:
        min_batch = getattr(objective, "min_batch_size", 1)
        last = num_train % batch_size or batch_size
        smallest = min(batch_size // world, last // world if last >= world else batch_size // world)
        if smallest < min_batch:
            error = UsageError(f"objective {objective.name!r} needs at least {min_batch} datapoints per process and "
                               f"minibatch, but batch_size {batch_size} over {world} processes leaves {smallest}")
    return error


def _check_distributed(objective, batch_size, num_train, run_dir, epochs, checkpoint_every, patience) -> None:
    """What data-parallel training needs, checked in every process before any collective."""
    distributed.agree(data_parallel_problem(objective, batch_size, num_train))
    # the run's shape must be the same in every process (collectives at the same epochs)
    mine = (str(run_dir) if run_dir is not None else None, int(epochs), int(checkpoint_every), patience, int(num_train))
    if any(other != mine for other in distributed.gather(mine)):
        raise UsageError("fit was called with different run_dir/epochs/checkpoint_every/patience or data in "
                         "different processes; call it identically in every process")


def check_probabilities(x: torch.Tensor, what: str) -> None:
    """Dynamic binarization draws Bernoulli(x): ``x`` must be finite values in [0, 1]."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise UsageTypeError(f"{what} must be a floating-point tensor of probabilities")
    bad = ~((x >= 0) & (x <= 1))  # NaN is bad too
    if bool(bad.any()):
        rows = bad.reshape(x.shape[0], -1).any(-1).nonzero().flatten()
        raise UsageError(f"{what} to binarize dynamically must be probabilities in [0, 1], but "
                         f"{rows_phrase(rows)} are not")


def binary_view(x: torch.Tensor) -> torch.Tensor:
    """A binary tensor of ``x``'s shape (for checks of data that are binarized when used)."""
    return (x >= 0.5).to(x.dtype)


def check_objective(objective, vae, train_data: torch.Tensor, batch_size: int,
                    num_datapoints: Optional[int] = None) -> None:
    """Raise a clear error, before anything is trained or written, when ``objective`` cannot
    train ``vae`` on ``train_data`` (``num_datapoints`` of them, default all its rows) in
    minibatches of ``batch_size`` (e.g. the DReG gradient with a flow guide, or InfoVAE with a
    last minibatch of one datapoint)."""
    min_batch = getattr(objective, "min_batch_size", 1)
    n = train_data.shape[0] if num_datapoints is None else int(num_datapoints)
    last_batch = n % batch_size or batch_size
    if min(last_batch, batch_size) < min_batch:
        raise UsageError(
            f"objective {objective.name!r} needs minibatches of at least {min_batch} datapoints, but "
            f"{n} training datapoints in batches of {batch_size} leave a last batch of "
            f"{last_batch}; choose another batch size"
        )
    if hasattr(objective, "check") and not _needs_index(vae):
        objective.check(vae, train_data[:2].to(vae.device))


#: ``fit``'s keyword arguments that are not :class:`~pvae.config.Training` settings
FIT_EXTRAS = ("num_particles", "dynamic_binarization", "loader_workers", "loggers")
#: without ``training``, ``fit`` is a quick first look: 10 epochs, no early stopping, on the model's device
FIT_DEFAULTS = {"epochs": 10, "patience": None, "device": None}


def fit(program, train_data, valid_data=None, training: Optional["Training"] = None, *,
        objective: Union[str, Objective] = "elbo-analytic-kl", callbacks: Sequence[Callback] = (),
        run_dir=None, resume: bool = False, progress: bool = True, **settings) -> History:
    """Train ``program`` by minibatch SVI (auto-encoding variational Bayes): :class:`TrainStep`
    over the shuffled training data each epoch, the validation metric after it, and named events
    on ``callbacks`` (:mod:`pvae.training.callbacks`) for everything else.

    :param program: a :class:`~pvae.model.VAE`, or a :class:`~pvae.inference.engine.ModelGuidePair`
        of the user's own (any Pyro program the engine scores); trained in place.
    :param train_data: ``(N, D)`` float tensor, :class:`~pvae.inference.engine.WithCovariates`, or a
        :class:`~pvae.data.streaming.StreamedSplit`.
    :param valid_data: optional ``(M, D)`` data for the per-epoch validation metric, early stopping
        and best-model selection.
    :param training: a :class:`~pvae.config.Training` (every setting: epochs, batch size, optimizer,
        learning-rate schedule, patience, time limit, non-finite policy, ...). Its fields may also
        be given as keywords (``fit(vae, train, valid, epochs=50, lr=3e-4)``), which override it.
        Without ``training``, fit trains 10 epochs without early stopping on the model's device
        (:data:`FIT_DEFAULTS`); ``Training()``'s own defaults are the command line's.
    :param objective: an :class:`~pvae.training.objectives.Objective` or a registered name
        (with keyword ``num_particles``).
    :param callbacks: the user's own :class:`~pvae.training.callbacks.Callback` objects, run with
        the built-in ones that ``training`` asks for.
    :param run_dir: write ``checkpoint.pt`` and ``metrics.jsonl`` there
        (:class:`~pvae.training.callbacks.Checkpoint`); with ``resume``, continue from it (the same
        trajectory as an uninterrupted run); without, an existing checkpoint is an error.
    :param bool progress: a tqdm progress bar.
    :param settings: Training fields, and ``dynamic_binarization`` (``train_data`` are
        probabilities in [0, 1]; every minibatch is a fresh seeded Bernoulli draw),
        ``loader_workers`` (DataLoader workers for streamed data), ``loggers`` (experiment trackers,
        :mod:`pvae.training.tracking`).
    :returns: :class:`History`.
    :raises ~pvae.errors.DivergenceError: with ``nonfinite="raise"`` at a non-finite step (the
        parameters never hold a non-finite update and the last checkpoint is the previous epoch's);
        with ``"skip"`` after ``max_skipped_steps`` skipped steps in a row.
    """
    loop, data = _prepare(program, train_data, valid_data, training, objective, callbacks, run_dir, resume,
                          progress, settings)
    training, device = loop.training, loop.device
    train_data, valid_data = data["train"], data["valid"]
    try:
        # each process draws its own noise (rank 0 the one-process stream); all share the data order
        with seeded(distributed.batch_seed(training.seed, distributed.rank()), device):
            loop.fire("on_fit_start")
            if loop.resumed_rng is not None:
                _set_rng_state(loop.resumed_rng, loop.generator, device)
            for epoch in range(loop.start_epoch + 1, training.epochs + 1):
                if loop.history.stopped_early:
                    break
                loop.epoch = epoch
                loop.fire("on_epoch_start")
                t0 = time.perf_counter()
                order = torch.randperm(train_data.shape[0], generator=loop.generator).to(device)
                record = {"epoch": epoch, **train_epoch(loop, train_data, order, **data["epoch_options"]),
                          "objective": loop.objective.name, "num_particles": loop.objective.num_particles}
                if getattr(loop.objective, "has_kl_term", False):  # the KL weight at the epoch's last step
                    record["kl_weight"] = loop.objective.kl_weight
                record["val_metric"] = None
                if valid_data is not None:
                    metric, est = _validate(program, valid_data, training.val_num_samples, training.seed,
                                            training.val_bound)
                    record.update({"val_metric": metric, metric: est.mean, f"{metric}_stderr": est.stderr,
                                   "val_num_samples": est.num_samples})
                    if loop.history.best_epoch is None or est.mean > loop.history.best_val:
                        loop.history.best_epoch = epoch
                        loop.best_state = {k: v.detach().clone() for k, v in program.state_dict().items()}
                record["seconds"] = time.perf_counter() - t0
                record["device"] = str(device)  # a resumed run may continue elsewhere
                loop.history.records.append(record)
                loop.fire("on_epoch_end", record)
                loop.fire("on_checkpoint")
                if loop.stop_reason is not None:
                    break
    finally:
        loop.fire("on_fit_end")
        loop.train_step.release()  # (its DDP wrapper holds the process group: free it now, not at exit)
        if hasattr(loop.objective, "set_progress"):
            loop.objective.set_progress(math.inf)  # outside training, schedules are at full weight
    loop.history.stop_reason = loop.stop_reason or ("stopped early" if loop.history.stopped_early else None)
    if training.restore_best and loop.best_state is not None:
        program.load_state_dict(loop.best_state)
    return loop.history


def _training_of(training, settings) -> Tuple["Training", dict]:
    """``fit``'s Training (``training`` with keyword settings applied) and its extra keywords."""
    from pvae.config import Training

    extras = {k: settings.pop(k) for k in FIT_EXTRAS if k in settings}
    if isinstance(settings.get("device"), torch.device):  # (fit's device= took a torch.device)
        settings["device"] = str(settings["device"])
    known = {*Training.options(), *TRAINING_PARTS, *LEGACY_TRAINING_KEYS}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise UsageError(f"fit does not take {', '.join(unknown)}; it takes the Training settings "
                         f"({', '.join(sorted(known - set(LEGACY_TRAINING_KEYS)))}) and {', '.join(FIT_EXTRAS)}")
    if training is None:
        return Training.parse({**FIT_DEFAULTS, **settings}), extras
    return Training.parse(training).replace(**settings), extras


def _prepare(program, train_data, valid_data, training, objective, callbacks, run_dir, resume, progress, settings):
    """Check everything before anything is trained or written; build the optimizer, the step, the
    built-in callbacks and the loop state."""
    started = time.perf_counter()
    training, extras = _training_of(training, settings)
    dynamic = bool(extras.get("dynamic_binarization", False))
    if isinstance(objective, str):
        objective = make_objective(objective, extras.get("num_particles", 1))
    elif "num_particles" in extras:
        raise UsageError("num_particles is an option of an objective given by name; this objective has its own")
    if distributed.active():
        _check_distributed(objective, training.batch_size, train_data.shape[0], run_dir, training.epochs,
                           training.checkpoint_every, training.patience)
    device = torch.device(training.device) if training.device is not None else program.device
    program.to(device)
    train_data, valid_data = _checked_data(program, train_data, valid_data, device, dynamic)
    head = train_data[:2].to(device)
    check_objective(objective, program, binary_view(head) if dynamic else head, training.batch_size,
                    num_datapoints=train_data.shape[0])
    use_precision(program, training.precision)
    optimizer = OPTIMIZERS.build(training.optimizer, params=list(program.parameters()), lr=training.lr,
                                 device=device, tensor_lr=device.type == "cuda" and training.lr_schedule.name != "constant")
    schedule = SCHEDULES.build(training.lr_schedule, lr=training.lr, epochs=training.epochs)
    steps_per_epoch = math.ceil(train_data.shape[0] / training.batch_size)
    ckpt_path = Path(run_dir) / CHECKPOINT_FILE if run_dir is not None else None
    builtin = [LRScheduler(schedule), NonFiniteGuard(training.nonfinite, training.check_every,
                                                     training.max_skipped_steps, ckpt_path)]
    if run_dir is not None:
        builtin.append(Checkpoint(run_dir, training.checkpoint_every, resume,
                                  _fit_args(training, objective, train_data, schedule, dynamic)))
    if training.patience is not None:
        builtin.append(EarlyStopping(training.patience))
    if training.max_time is not None:
        builtin.append(TimeLimit(training.max_time, started))
    if extras.get("loggers"):
        builtin.append(Trackers(extras["loggers"]))
    if progress:
        builtin.append(ProgressBar())
    for callback in callbacks:
        if not isinstance(callback, Callback):
            raise UsageTypeError(f"callbacks must be pvae.Callback objects, got {type(callback).__name__}")
    loop = FitLoop(program, objective, optimizer, training, History(), device, steps_per_epoch,
                   [*builtin, *callbacks])
    loop.generator = torch.Generator().manual_seed(int(training.seed))
    loop.train_step = TrainStep(program, objective, optimizer, training.step, clip_grad_norm=training.clip_grad_norm)
    program.train()
    epoch_options = {"indexed": _needs_index(program), "dynamic_binarization": dynamic,
                     "loader_workers": extras.get("loader_workers")}
    return loop, {"train": train_data, "valid": valid_data, "epoch_options": epoch_options}


def _checked_data(program, train_data, valid_data, device, dynamic):
    """Check the data against the program once (the steps run without validation) and move
    in-memory data to the device (streamed splits are read as they are used)."""
    for chunk in (train_data.chunks() if is_streamed(train_data) else [train_data]):
        if dynamic:
            check_probabilities(chunk, "training data")
            program.check_data(binary_view(chunk), "dynamically binarized training data")
        else:
            program.check_data(chunk, "training data")
    indexed = _needs_index(program)
    if valid_data is not None:
        check_data(program, valid_data, "validation data")
        if indexed:
            raise UsageError(
                "a non-amortized guide has parameters only for the training datapoints, so it "
                "cannot score validation data; pass valid_data=None (or refine a guide on the "
                "validation data separately)"
            )
    num_datapoints = getattr(getattr(program, "guide_net", None), "num_datapoints", train_data.shape[0])
    if indexed and num_datapoints != train_data.shape[0]:
        raise UsageError(f"the non-amortized guide was built for {num_datapoints} datapoints, "
                         f"but the training data have {train_data.shape[0]}")
    train_data = train_data if is_streamed(train_data) else train_data.to(device)
    valid_data = valid_data.to(device) if valid_data is not None and not is_streamed(valid_data) else valid_data
    return train_data, valid_data


def _fit_args(training, objective, train_data, schedule, dynamic) -> dict:
    """What must be the same to resume a run (recorded in its checkpoint). Settings are recorded
    only when not their defaults, so that runs of earlier versions resume."""
    fit_args = {"batch_size": int(training.batch_size), "lr": float(training.lr), "objective": objective.name,
                "num_particles": objective.num_particles, "seed": int(training.seed),
                "num_train": int(train_data.shape[0]), "data_dim": int(train_data.shape[1])}
    options = objective.options() if hasattr(objective, "options") else {}
    if options:  # beta, warm-up, DReG, InfoVAE weights: resuming with others is an error
        fit_args["objective_options"] = options
    if training.val_bound != "elbo":  # early stopping on another metric is another run
        fit_args["val_bound"] = training.val_bound
    if dynamic:  # other training data
        fit_args["dynamic_binarization"] = True
    optimizer = dict(training.optimizer.kwargs)
    if training.optimizer.name != "adam" or any(optimizer.values()):
        fit_args["optimizer"] = {"name": training.optimizer.name, "weight_decay": float(optimizer.get("weight_decay", 0.0)),
                                 "momentum": float(optimizer.get("momentum", 0.0))}
    if training.lr_schedule.name != "constant":
        fit_args["lr_schedule"] = schedule.options()
    if training.clip_grad_norm is not None:
        fit_args["clip_grad_norm"] = float(training.clip_grad_norm)
    if training.precision != "fp32":
        fit_args["precision"] = training.precision
    return fit_args


def train_epoch(loop, data, order, indexed=False, dynamic_binarization=False, loader_workers=None) -> dict:
    """One pass of the loop's :class:`TrainStep` over ``data[order]`` in minibatches, with no host
    synchronisation (callbacks receive each step's value and non-finite flag as device tensors).
    Returns the epoch's ``train_objective`` (mean value over the datapoints of the applied steps)
    and, if any step was skipped, ``nonfinite_steps`` and ``first_nonfinite_step`` (1-based)."""
    objective, batch_size, epoch = loop.objective, loop.training.batch_size, loop.epoch
    device = order.device
    steps = math.ceil(order.numel() / batch_size)
    sharded = distributed.active()
    if sharded:  # this process's share of every global minibatch (all processes see the same order)
        shares = [distributed.shard(idx) for idx in order.split(batch_size) if idx.numel() >= distributed.world_size()]
        steps = len(shares)
        order = torch.cat([part for part, _ in shares]) if shares else order[:0]
        weights = [w for _, w in shares]
        sizes = [part.numel() for part, _ in shares]
    else:
        sizes = [idx.numel() for idx in order.split(batch_size)]
        weights = [1.0] * len(sizes)
    if is_streamed(data):  # the same minibatches, read by a DataLoader
        batches = stream_loader(data, order, sizes, device, loader_workers)
    else:
        batches = ((idx, data[idx]) for idx in order.split(sizes))
    total = torch.zeros((), dtype=torch.float64, device=device)
    applied = torch.zeros((), dtype=torch.float64, device=device)
    skipped = torch.zeros((), device=device)
    first_bad = torch.full((), -1.0, device=device)
    # (the step runs without distribution validation: fit checks the data once)
    for step, (idx, xb) in enumerate(batches):
        if dynamic_binarization:  # a fresh draw from the seeded training stream
            xb = torch.bernoulli(xb)
        weight = 1.0
        if hasattr(objective, "set_progress"):  # KL schedules run on epochs done
            objective.set_progress(epoch - 1 + step / steps)
            weight = objective.kl_weight
        # a non-amortized guide is addressed by the datapoints' positions
        value, found_inf = loop.train_step(xb, idx if indexed else None, weight, weights[step]) if sharded else \
            loop.train_step(xb, idx if indexed else None, weight)
        first_bad = torch.where((first_bad < 0) & (found_inf > 0), float(step + 1), first_bad)
        skipped += found_inf
        loop.epoch_nonfinite = (skipped, first_bad)  # this process's counts so far (device tensors)
        total += torch.where(found_inf > 0, 0.0, value.double()) * xb.shape[0]
        applied += (1 - found_inf.double()) * xb.shape[0]
        loop.fire("on_step_end", step, value, found_inf)
    if sharded:  # the epoch's totals over every process (one collective per epoch)
        totals = torch.stack([total, applied, skipped.double(), first_bad.double()]).cpu()
        gathered = torch.stack(distributed.gather(totals))
        total, applied = gathered[:, 0].sum(), gathered[:, 1].sum()
        skipped = gathered[:, 2].max()
        bad = gathered[:, 3][gathered[:, 3] > 0]
        first_bad = bad.min() if bad.numel() else torch.tensor(-1.0)
    num_skipped = int(skipped)
    stats = {"train_objective": float(total / applied) if num_skipped < steps else math.nan}
    if num_skipped:
        stats.update(nonfinite_steps=num_skipped, first_nonfinite_step=int(first_bad))
    return stats


def _resume(ckpt_path, fit_args, loop) -> None:
    """Load a run's checkpoint into the loop (model, optimizer, history, best model, epoch, random
    states, every resumable callback's state) after checking it was trained with the same settings."""
    ckpt = load_checkpoint(ckpt_path)
    if ckpt.get("fit") != fit_args:
        raise UsageError(
            f"cannot resume {ckpt_path}: it was trained with {ckpt.get('fit')}, "
            f"but this call uses {fit_args}"
        )
    loop.program.load_state_dict(ckpt["model"])
    optimizer = loop.optimizer
    # the moments and step counts come from the checkpoint; how the update runs (fused kernel,
    # capturable) is this optimizer's: a checkpoint of pvae 0.1's plain Adam or from another
    # device must not switch it
    how = [{k: g[k] for k in ("fused", "foreach", "capturable") if k in g} for g in optimizer.param_groups]
    lrs = [g["lr"] for g in optimizer.param_groups]  # a device tensor that a CUDA graph reads stays that tensor
    optimizer.load_state_dict(ckpt["optimizer"])
    for group, settings, lr in zip(optimizer.param_groups, how, lrs):
        group.update(settings)
        if torch.is_tensor(lr):
            lr.fill_(float(group["lr"]))
            group["lr"] = lr
    device = next(iter(optimizer.param_groups[0]["params"])).device
    for state in optimizer.state.values():  # fused Adam keeps its step count on the device
        if torch.is_tensor(state.get("step")) and state["step"].device != device:
            state["step"] = state["step"].to(device)
    loop.history = History(ckpt["history"], ckpt["best_epoch"], ckpt["stopped_early"])
    loop.best_state, loop.start_epoch, loop.resumed_rng = ckpt["best_model"], int(ckpt["epoch"]), ckpt["rng"]
    loop.epoch = loop.start_epoch
    for callback in loop.callbacks:
        if callback.state_key is not None and ckpt.get(callback.state_key) is not None:
            callback.load_state_dict(ckpt[callback.state_key])


def _checkpoint(ckpt_path, loop, fit_args) -> None:
    """Atomically write the epoch's checkpoint (model, optimizer, random states, history, every
    resumable callback's state) and the log. Under torch.distributed every process calls it (to
    hand over its random state) and rank 0 writes."""
    rng = _rng_state(loop.generator, loop.device)
    if distributed.active():
        states = distributed.gather({k: v.cpu() for k, v in rng.items()})
        if not distributed.is_main():
            return
        rng = {"ranks": states}
    state = {
        "format": CHECKPOINT_FORMAT,
        "epoch": loop.epoch,
        "model": loop.program.state_dict(),
        "optimizer": loop.optimizer.state_dict(),
        "rng": rng,
        "history": loop.history.records,
        "best_epoch": loop.history.best_epoch,
        "best_model": loop.best_state,
        "stopped_early": loop.history.stopped_early,
        "fit": fit_args,
    }
    for callback in loop.callbacks:
        if callback.state_key is not None:
            state[callback.state_key] = callback.state_dict()
    save_checkpoint(state, ckpt_path)
    write_jsonl(loop.history.records, ckpt_path.parent / METRICS_FILE)
