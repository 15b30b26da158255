"""The training loop: minibatch stochastic variational inference on a Pyro model/guide pair.

:class:`TrainStep` is one step — the objective's surrogate loss (by default the ELBO of
``vae.model``/``vae.guide``, equal to Pyro's ``Trace_ELBO`` on the same noise), backward, and
a fused Adam update over ``vae.parameters()`` (the module form of Pyro's ELBOs: parameters stay
in the model, not in Pyro's global parameter store) — with no host synchronisation, so it can
be compiled or captured in a CUDA graph. :func:`fit` is the epoch loop around it: data order,
KL schedules, device-side accumulation read back once per epoch, validation ELBO, early
stopping, and an atomic checkpoint with model, optimizer and RNG states each epoch, so that
``fit(..., resume=True)`` continues the same trajectory. No printing and no plotting here; the
progress bar (tqdm) can be switched off.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Union

import pyro
import torch

from pvae import distributed
from pvae.training.controls import LRSchedule, make_optimizer, set_lr, use_precision
from pvae._rng import seeded
from pvae.checkpoint import load_checkpoint, save_checkpoint, write_jsonl
from pvae.errors import DivergenceError, RunExistsError, UsageError, UsageTypeError
from pvae.inference.estimators import check_data, evaluate_bounds, reconstruction_error
from pvae.training.objectives import Objective, call_objective, make_objective, takes_kl_weight
from pvae.data.streaming import is_streamed
from pvae.data.streaming import loader as stream_loader

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


def _check_finite(nonfinite, skipped, first_bad, epoch, steps, ckpt_path) -> None:
    """Read the device-side counters (one host synchronisation) and raise if asked to."""
    if nonfinite != "raise":
        return
    n = int(skipped)
    if n:
        raise DivergenceError(
            f"the training loss or gradient was NaN/inf at epoch {epoch}, step {int(first_bad)} "
            f"({n} of the first {steps} steps of the epoch); those updates were skipped, so the "
            "parameters never held a non-finite value"
            + (f", and {ckpt_path} still holds epoch {epoch - 1}" if ckpt_path else "")
            + "; try a lower learning rate, or fit(..., nonfinite='skip') to skip such steps and go on"
        )


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
        raise UsageError(f"{what} to binarize dynamically must be probabilities in [0, 1], but {rows.numel()} "
                         f"row(s) are not (first: {rows[:5].tolist()})")


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


def fit(
    vae,
    train_data: torch.Tensor,
    valid_data: Optional[torch.Tensor] = None,
    *,
    epochs: int = 10,
    batch_size: int = 100,
    lr: float = 1e-3,
    objective: Union[str, Objective] = "elbo-analytic-kl",
    num_particles: int = 1,
    patience: Optional[int] = None,
    seed: int = 0,
    device: Optional[Union[str, torch.device]] = None,
    run_dir: Optional[Union[str, Path]] = None,
    resume: bool = False,
    val_num_samples: int = 1,
    restore_best: bool = True,
    progress: bool = True,
    step: str = "auto",
    nonfinite: str = "raise",
    check_every: Optional[int] = None,
    max_time: Optional[float] = None,
    checkpoint_every: int = 1,
    val_bound: str = "elbo",
    dynamic_binarization: bool = False,
    loader_workers: Optional[int] = None,
    optimizer: str = "adam",
    weight_decay: float = 0.0,
    momentum: float = 0.0,
    lr_schedule: str = "constant",
    lr_gamma: Optional[float] = None,
    lr_step: int = 100,
    lr_min: float = 0.0,
    clip_grad_norm: Optional[float] = None,
    precision: str = "fp32",
    loggers: Sequence = (),
) -> History:
    """Train ``vae`` by minibatch SVI (auto-encoding variational Bayes).

    :param vae: a :class:`~pvae.model.VAE`, or a :class:`~pvae.engine.ModelGuidePair` of the
        user's own (any Pyro program the engine scores: several latent sites, enumerated discrete
        sites, covariates, a subsampled plate); trained in place.
    :param train_data: ``(N, D)`` float tensor, :class:`~pvae.engine.WithCovariates` (data with
        the covariates the programs read), or a :class:`~pvae.streaming.StreamedSplit`.
    :param valid_data: optional ``(M, D)`` tensor for the per-epoch validation ELBO, early
        stopping and best-model selection.
    :param int epochs: total number of epochs (a resumed run continues up to this number).
    :param int batch_size: minibatch size; the last minibatch of an epoch may be smaller.
    :param float lr: Adam learning rate.
    :param objective: an :class:`~pvae.objectives.Objective` or a registered name.
    :param int num_particles: vectorized particles per datapoint (when ``objective`` is a name).
    :param patience: stop after this many epochs without a better validation ELBO.
    :param int seed: seeds the data order and the sampling; the caller's global RNG is
        restored afterwards.
    :param device: move the model and data there (default: where the model is).
    :param run_dir: if given, write ``checkpoint.pt`` and ``metrics.jsonl`` there each epoch.
    :param bool resume: continue from ``run_dir/checkpoint.pt`` (same trajectory as an
        uninterrupted run). Without it, an existing checkpoint is an error, never overwritten.
    :param int val_num_samples: samples per datapoint for the validation ELBO (fixed seed,
        so epochs are compared on common random numbers; training draws are unaffected).
    :param bool restore_best: at the end, load the parameters of the best validation epoch.
    :param bool progress: show a tqdm progress bar.
    :param str step: :class:`TrainStep` mode: ``"auto"`` (a CUDA graph on CUDA, eager
        elsewhere), ``"eager"``, ``"compile"``, ``"cuda-graph"``.
    :param str nonfinite: what to do when a step's loss or gradient is NaN/inf. Such an update
        is never applied (it is skipped on the device). ``"raise"``: at the next check, raise
        :class:`FloatingPointError` naming the epoch and the first bad step, before that epoch
        is checkpointed; ``"skip"``: count the skipped steps in the epoch's record
        (``nonfinite_steps``, ``first_nonfinite_step``) and go on.
    :param check_every: read the device-side counters every this many steps (each read is a
        host synchronisation); default once per epoch.
    :param max_time: wall-clock seconds for this call: after the epoch in which they run out,
        stop (that epoch is checkpointed; ``History.time_limit_reached`` is set) so that a
        later ``resume=True`` call continues the same trajectory. Default: no limit.
    :param int checkpoint_every: with ``run_dir``, write the checkpoint every this many epochs
        (and always after the last epoch of the call); ``metrics.jsonl`` is written with it.
        A resumed run restarts from the last checkpoint, so a crash loses at most this many
        epochs. Raise it when an epoch takes less time than writing the checkpoint (a GPU).
    :param str val_bound: the validation metric for early stopping and best-model selection:
        ``"elbo"`` or ``"iwae"`` (L_K with K = ``val_num_samples``: for models trained on L_K,
        whose ELBO falls while their bound still rises).
    :param bool dynamic_binarization: ``train_data`` are probabilities in [0, 1] and every
        minibatch is a fresh Bernoulli draw of them (dynamically binarized MNIST and Omniglot);
        the draws come from the seeded training stream, so a resumed run draws the same bits.
    :param loader_workers: for streamed data (:class:`~pvae.streaming.StreamedSplit`, data bigger
        than memory), the DataLoader's worker processes (default: up to 4). Streamed data are read
        in the same seeded order as in-memory data, so the run is the same.
    :param str optimizer: adam, adamw, sgd or adamax (:func:`pvae.controls.make_optimizer`), with
        ``weight_decay`` and (sgd) ``momentum``.
    :param str lr_schedule: constant, step, exponential, cosine, plateau or iwae, with ``lr_gamma``
        (decay factor), ``lr_step`` (epochs) and ``lr_min`` (:class:`pvae.controls.LRSchedule`);
        the epoch's learning rate is in its record (``lr``).
    :param clip_grad_norm: clip the gradient's global norm to this value (default: no clipping).
    :param str precision: fp32, or bf16 (the networks under autocast, every density in float32;
        :func:`pvae.controls.use_precision`).
    :param loggers: experiment trackers (:mod:`pvae.tracking`): each epoch's record is passed to
        their ``log_epoch`` (rank 0 only under torch.distributed).
    :returns: :class:`History`.
    :raises FloatingPointError: with ``nonfinite="raise"`` (the parameters never hold a
        non-finite update and the last checkpoint is the previous epoch's).
    """
    if isinstance(objective, str):
        objective = make_objective(objective, num_particles)
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if isinstance(value, bool) or int(value) != value or value < 1:
            raise UsageError(f"{name} must be a positive integer, got {value!r}")
    if not (lr > 0 and math.isfinite(lr)):
        raise UsageError(f"lr must be positive and finite, got {lr!r}")
    if patience is not None and patience < 1:
        raise UsageError(f"patience must be a positive integer or None, got {patience!r}")
    if nonfinite not in ("raise", "skip"):
        raise UsageError(f"nonfinite must be 'raise' or 'skip', got {nonfinite!r}")
    if check_every is not None and (isinstance(check_every, bool) or int(check_every) != check_every or check_every < 1):
        raise UsageError(f"check_every must be a positive integer or None, got {check_every!r}")
    if val_bound not in ("elbo", "iwae"):
        raise UsageError(f"val_bound must be 'elbo' or 'iwae', got {val_bound!r}")
    if clip_grad_norm is not None and not (clip_grad_norm > 0 and math.isfinite(clip_grad_norm)):
        raise UsageError(f"clip_grad_norm must be a positive number or None, got {clip_grad_norm!r}")
    schedule = LRSchedule(lr_schedule, lr, lr_gamma, lr_step, lr_min, epochs)
    if max_time is not None and not (isinstance(max_time, (int, float)) and max_time > 0):
        raise UsageError(f"max_time must be a positive number of seconds or None, got {max_time!r}")
    if isinstance(checkpoint_every, bool) or int(checkpoint_every) != checkpoint_every or checkpoint_every < 1:
        raise UsageError(f"checkpoint_every must be a positive integer, got {checkpoint_every!r}")
    t_start = time.perf_counter()
    if distributed.active():
        _check_distributed(objective, batch_size, train_data.shape[0], run_dir, epochs, checkpoint_every, patience)
    device = torch.device(device) if device is not None else vae.device
    vae.to(device)
    for chunk in (train_data.chunks() if is_streamed(train_data) else [train_data]):
        if dynamic_binarization:
            check_probabilities(chunk, "training data")
            vae.check_data(binary_view(chunk), "dynamically binarized training data")
        else:
            vae.check_data(chunk, "training data")
    indexed = _needs_index(vae)
    if valid_data is not None:
        check_data(vae, valid_data, "validation data")
        if indexed:
            raise UsageError(
                "a non-amortized guide has parameters only for the training datapoints, so it "
                "cannot score validation data; pass valid_data=None (or refine a guide on the "
                "validation data separately)"
            )
    if indexed and getattr(getattr(vae, "guide_net", None), "num_datapoints", train_data.shape[0]) != train_data.shape[0]:
        raise UsageError(
            f"the non-amortized guide was built for {vae.guide_net.num_datapoints} datapoints, "
            f"but the training data have {train_data.shape[0]}"
        )
    # in memory: the data move to the device once; streamed splits are read as they are used
    train_data = train_data if is_streamed(train_data) else train_data.to(device)
    valid_data = valid_data.to(device) if valid_data is not None and not is_streamed(valid_data) else valid_data
    head = train_data[:2].to(device)
    check_objective(objective, vae, binary_view(head) if dynamic_binarization else head, batch_size,
                    num_datapoints=train_data.shape[0])

    use_precision(vae, precision)
    optimizer_name = optimizer
    optimizer = _optimizer(vae, lr, optimizer_name, weight_decay, momentum,
                           tensor_lr=device.type == "cuda" and lr_schedule != "constant")
    generator = torch.Generator().manual_seed(int(seed))
    history = History()
    best_state = None
    start_epoch = 0
    ckpt_path = Path(run_dir) / CHECKPOINT_FILE if run_dir is not None else None
    fit_args = {
        "batch_size": int(batch_size),
        "lr": float(lr),
        "objective": objective.name,
        "num_particles": objective.num_particles,
        "seed": int(seed),
        "num_train": int(train_data.shape[0]),
        "data_dim": int(train_data.shape[1]),
    }
    options = objective.options() if hasattr(objective, "options") else {}
    if options:  # beta, warm-up, DReG, InfoVAE weights: resuming with others is an error
        fit_args["objective_options"] = options
    if val_bound != "elbo":  # early stopping on another metric is another run
        fit_args["val_bound"] = val_bound
    if dynamic_binarization:  # other training data
        fit_args["dynamic_binarization"] = True
    # (recorded only when not the defaults, so that runs of earlier versions resume)
    if optimizer_name != "adam" or weight_decay or momentum:
        fit_args["optimizer"] = {"name": optimizer_name, "weight_decay": float(weight_decay), "momentum": float(momentum)}
    if lr_schedule != "constant":
        fit_args["lr_schedule"] = schedule.options()
    if clip_grad_norm is not None:
        fit_args["clip_grad_norm"] = float(clip_grad_norm)
    if precision != "fp32":
        fit_args["precision"] = precision
    resumed_rng = None
    if ckpt_path is not None and ckpt_path.exists():
        if not resume:
            raise RunExistsError(
                f"{ckpt_path} already exists; pass resume=True to continue that run or "
                "choose a new run directory (nothing was overwritten)"
            )
        history, best_state, start_epoch, resumed_rng = _resume(ckpt_path, fit_args, vae, optimizer, schedule)

    steps_per_epoch = math.ceil(train_data.shape[0] / batch_size)
    train_step = TrainStep(vae, objective, optimizer, step, clip_grad_norm=clip_grad_norm)  # the one step
    bar = None
    if progress and distributed.is_main():
        from tqdm.auto import tqdm

        bar = tqdm(
            total=max(epochs - start_epoch, 0) * steps_per_epoch,
            desc="pvae fit",
            unit="step",
            dynamic_ncols=True,
        )
    vae.train()
    try:
        # each process draws its own noise (rank 0 the one-process stream); all share the data order
        with seeded(distributed.batch_seed(seed, distributed.rank()), device):
            if resumed_rng is not None:
                _set_rng_state(resumed_rng, generator, device)
            for epoch in range(start_epoch + 1, epochs + 1):
                if history.stopped_early:
                    break
                t0 = time.perf_counter()
                order = torch.randperm(train_data.shape[0], generator=generator).to(device)
                stats = train_epoch(train_step, objective, train_data, order, batch_size, epoch, indexed, bar,
                                    nonfinite, check_every, ckpt_path, dynamic_binarization, loader_workers)
                record = {
                    "epoch": epoch,
                    **stats,
                    "objective": objective.name,
                    "num_particles": objective.num_particles,
                    # the KL weight at the epoch's last step
                    **({"kl_weight": objective.kl_weight} if getattr(objective, "has_kl_term", False) else {}),
                    "val_metric": None,
                }
                if valid_data is not None:
                    metric, est = _validate(vae, valid_data, val_num_samples, seed, val_bound)
                    record.update({
                        "val_metric": metric,
                        metric: est.mean,
                        f"{metric}_stderr": est.stderr,
                        "val_num_samples": est.num_samples,
                    })
                    if history.best_epoch is None or est.mean > history.best_val:
                        history.best_epoch = epoch
                        best_state = {k: v.detach().clone() for k, v in vae.state_dict().items()}
                record["lr"] = schedule.state["lr"]  # this epoch's
                set_lr(optimizer, schedule.after_epoch(epoch, record.get(record["val_metric"]) if record["val_metric"] else None))
                record["seconds"] = time.perf_counter() - t0
                record["device"] = str(device)  # a resumed run may continue elsewhere
                history.records.append(record)
                if distributed.is_main():
                    for logger in loggers:
                        logger.log_epoch(record)
                if patience is not None and history.best_epoch is not None:
                    history.stopped_early = epoch - history.best_epoch >= patience
                if bar is not None:
                    postfix = {"epoch": epoch, "train": f"{record['train_objective']:.2f}"}
                    if record["val_metric"] is not None:
                        postfix[record["val_metric"]] = f"{record[record['val_metric']]:.2f}"
                    bar.set_postfix(postfix)
                out_of_time = max_time is not None and time.perf_counter() - t_start >= max_time and epoch < epochs
                out_of_time = distributed.broadcast(out_of_time)  # every process stops after the same epoch
                last = out_of_time or history.stopped_early or epoch == epochs
                if ckpt_path is not None and (last or epoch % checkpoint_every == 0):  # (rank 0 writes)
                    _checkpoint(ckpt_path, epoch, vae, optimizer, generator, device, history, best_state, fit_args,
                                schedule)
                if out_of_time:
                    history.time_limit_reached = True
                    break
    finally:
        train_step.release()  # (its DDP wrapper holds the process group: free it now, not at exit)
        if bar is not None:
            bar.close()
        if hasattr(objective, "set_progress"):
            objective.set_progress(math.inf)  # outside training, schedules are at full weight
    if restore_best and best_state is not None:
        vae.load_state_dict(best_state)
    return history


def train_epoch(train_step, objective, data, order, batch_size, epoch, indexed=False, bar=None,
                nonfinite="raise", check_every=None, ckpt_path=None, dynamic_binarization=False,
                loader_workers=None) -> dict:
    """One pass of ``train_step`` over ``data[order]`` in minibatches, with no host
    synchronisation except the non-finite checks (once at the end, or every ``check_every``
    steps). Returns the epoch's ``train_objective`` (mean value over the datapoints of the
    applied steps) and, if any step was skipped, ``nonfinite_steps`` and
    ``first_nonfinite_step`` (1-based)."""
    device = order.device
    steps = math.ceil(order.numel() / batch_size)
    sharded = distributed.active()
    if sharded:  # this process's share of every global minibatch (all processes see the same order)
        steps = sum(1 for idx in order.split(batch_size) if idx.numel() >= distributed.world_size())
        shares = [distributed.shard(idx) for idx in order.split(batch_size) if idx.numel() >= distributed.world_size()]
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
    step_no = torch.zeros((), device=device)
    # (the step runs without distribution validation: fit checks the data once)
    for step, (idx, xb) in enumerate(batches):
        if dynamic_binarization:  # a fresh draw from the seeded training stream
            xb = torch.bernoulli(xb)
        weight = 1.0
        if hasattr(objective, "set_progress"):  # KL schedules run on epochs done
            objective.set_progress(epoch - 1 + step / steps)
            weight = objective.kl_weight
        # a non-amortized guide is addressed by the datapoints' positions
        value, found_inf = train_step(xb, idx if indexed else None, weight, weights[step]) if sharded else \
            train_step(xb, idx if indexed else None, weight)
        step_no += 1
        first_bad = torch.where((first_bad < 0) & (found_inf > 0), step_no, first_bad)
        skipped += found_inf
        total += torch.where(found_inf > 0, 0.0, value.double()) * xb.shape[0]
        applied += (1 - found_inf.double()) * xb.shape[0]
        if bar is not None:
            bar.update(1)
        if check_every is not None and (step + 1) % check_every == 0:
            _check_finite(nonfinite, skipped, first_bad, epoch, step + 1, ckpt_path)
    if sharded:  # the epoch's totals over every process (one collective per epoch)
        totals = torch.stack([total, applied, skipped.double(), first_bad.double()]).cpu()
        gathered = torch.stack(distributed.gather(totals))
        total, applied = gathered[:, 0].sum(), gathered[:, 1].sum()
        skipped = gathered[:, 2].max()
        bad = gathered[:, 3][gathered[:, 3] > 0]
        first_bad = bad.min() if bad.numel() else torch.tensor(-1.0)
    _check_finite(nonfinite, skipped, first_bad, epoch, steps, ckpt_path)
    num_skipped = int(skipped)
    stats = {"train_objective": float(total / applied) if num_skipped < steps else math.nan}
    if num_skipped:
        stats.update(nonfinite_steps=num_skipped, first_nonfinite_step=int(first_bad))
    return stats


def _resume(ckpt_path, fit_args, vae, optimizer, schedule=None):
    """Load a run's checkpoint into ``vae`` and ``optimizer`` after checking it was trained
    with the same settings; returns ``(history, best_state, epoch, rng_state)``."""
    ckpt = load_checkpoint(ckpt_path)
    if ckpt.get("fit") != fit_args:
        raise UsageError(
            f"cannot resume {ckpt_path}: it was trained with {ckpt.get('fit')}, "
            f"but this call uses {fit_args}"
        )
    vae.load_state_dict(ckpt["model"])
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
    history = History(ckpt["history"], ckpt["best_epoch"], ckpt["stopped_early"])
    if schedule is not None and ckpt.get("lr_schedule") is not None:  # where the schedule was
        schedule.state = dict(ckpt["lr_schedule"])
        set_lr(optimizer, schedule.state["lr"])
    return history, ckpt["best_model"], int(ckpt["epoch"]), ckpt["rng"]


def _checkpoint(ckpt_path, epoch, vae, optimizer, generator, device, history, best_state, fit_args,
                schedule=None) -> None:
    """Atomically write the epoch's checkpoint (model, optimizer, RNG, history) and the log.
    Under torch.distributed every process calls it (to hand over its random state) and rank 0
    writes."""
    rng = _rng_state(generator, device)
    if distributed.active():
        states = distributed.gather({k: v.cpu() for k, v in rng.items()})
        if not distributed.is_main():
            return
        rng = {"ranks": states}
    save_checkpoint(
        {
            "format": CHECKPOINT_FORMAT,
            "epoch": epoch,
            "model": vae.state_dict(),
            "optimizer": optimizer.state_dict(),
            "rng": rng,
            "history": history.records,
            "best_epoch": history.best_epoch,
            "best_model": best_state,
            "stopped_early": history.stopped_early,
            "fit": fit_args,
            "lr_schedule": schedule.state if schedule is not None else None,
        },
        ckpt_path,
    )
    write_jsonl(history.records, ckpt_path.parent / METRICS_FILE)
