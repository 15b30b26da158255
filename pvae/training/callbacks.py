"""Callbacks: what :func:`pvae.fit` does around its epoch loop, one small object each.

The loop (:func:`pvae.training.loop.fit`) runs the steps, validates, and fires named events on
its callbacks, in their ``order`` (lower first):

==================  ===========================================================================
``on_fit_start``    before the first epoch of this call (after a resume: of what is left)
``on_epoch_start``  before an epoch's first step
``on_step_end``     after each step, with the step's value and non-finite flag as *device*
                    tensors (reading them is a host synchronisation: do it rarely)
``on_epoch_end``    after validation, with the epoch's record (a dict a callback may add to);
                    decisions are made here (:meth:`FitLoop.stop`)
``on_checkpoint``   after every callback's ``on_epoch_end``, once the stop decision is known
``on_fit_end``      when the call ends, also by an exception
==================  ===========================================================================

A callback with a ``state_key`` is resumable: its :meth:`Callback.state_dict` is saved in the
checkpoint under that key and handed back to :meth:`Callback.load_state_dict` on resume.

Built in (``fit`` adds them from its :class:`~pvae.config.Training` settings): :class:`Checkpoint`
(write and resume ``checkpoint.pt``), :class:`LRScheduler`, :class:`EarlyStopping`,
:class:`TimeLimit`, :class:`NonFiniteGuard`, :class:`Trackers` and :class:`ProgressBar`. A user's
own callback is a subclass that overrides an event::

    class StopWhenGood(pvae.Callback):
        def on_epoch_end(self, loop, record):
            record["kl_weight_x10"] = 10 * loop.objective.kl_weight   # logged like any metric
            if record.get("val_elbo", -float("inf")) > -100:
                loop.stop("validation ELBO above -100 nats")

    pvae.fit(vae, train, valid, epochs=50, callbacks=[StopWhenGood()])
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from pvae import distributed
from pvae.errors import DivergenceError, RunExistsError, UsageError

__all__ = [
    "Callback", "FitLoop", "Checkpoint", "LRScheduler", "EarlyStopping", "TimeLimit", "NonFiniteGuard",
    "Trackers", "ProgressBar",
]

#: checkpoint keys the loop itself writes (a callback's ``state_key`` must be another)
RESERVED_KEYS = frozenset({"format", "epoch", "model", "optimizer", "rng", "history", "best_epoch", "best_model",
                           "stopped_early", "fit", "callbacks"})


class Callback:
    """Base class: override the events you need (each does nothing by default).

    :cvar order: callbacks run in increasing ``order`` at every event (built-ins: checkpoint 0,
        learning rate 10, non-finite guard 15, early stopping 20, time limit 30, trackers 40,
        progress bar 50; a user's callback defaults to 60).
    :cvar state_key: checkpoint key of :meth:`state_dict` (None: nothing to resume).
    """

    order: int = 60
    state_key: Optional[str] = None

    def on_fit_start(self, loop: "FitLoop") -> None:
        """Before the first epoch of this call."""

    def on_epoch_start(self, loop: "FitLoop") -> None:
        """Before the epoch ``loop.epoch``'s first step."""

    def on_step_end(self, loop: "FitLoop", step: int, value: torch.Tensor, nonfinite: torch.Tensor) -> None:
        """After step ``step`` (0-based within the epoch): ``value`` the step's objective and
        ``nonfinite`` 1.0 if its loss or gradient was NaN/inf (update skipped), as device tensors."""

    def on_epoch_end(self, loop: "FitLoop", record: dict) -> None:
        """After the epoch's validation: ``record`` is the epoch's (add keys to log them)."""

    def on_checkpoint(self, loop: "FitLoop") -> None:
        """After every callback's ``on_epoch_end``: ``loop.stopping`` says whether this is the last epoch."""

    def on_fit_end(self, loop: "FitLoop") -> None:
        """When the call ends (normally or by an exception)."""

    def state_dict(self) -> dict:
        """What a resumed run needs to continue (saved under ``state_key``)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a checkpoint's ``state_dict()``."""


class FitLoop:
    """What callbacks see of a running :func:`~pvae.fit`.

    :ivar program: the model being trained (a ``VAE`` or a ``ModelGuidePair``).
    :ivar objective: the :class:`~pvae.training.objectives.Objective`.
    :ivar optimizer: the torch optimizer.
    :ivar training: the :class:`~pvae.config.Training` settings.
    :ivar history: the :class:`~pvae.training.loop.History` so far.
    :ivar int epoch: the current epoch (1-based); ``start_epoch``: the last epoch done before this call.
    :ivar int steps_per_epoch: minibatches per epoch.
    :ivar stop_reason: why the loop stops after this epoch (None: it goes on).
    :ivar epoch_nonfinite: ``(skipped steps, first skipped step or -1)`` of this epoch so far, device
        tensors the epoch loop keeps (reading them is a host synchronisation).
    """

    def __init__(self, program, objective, optimizer, training, history, device, steps_per_epoch, callbacks):
        self.program, self.objective, self.optimizer, self.training = program, objective, optimizer, training
        self.history, self.device, self.steps_per_epoch = history, device, steps_per_epoch
        self.callbacks = sorted(callbacks, key=lambda c: c.order)
        keys = [c.state_key for c in self.callbacks if c.state_key is not None]
        clash = sorted({k for k in keys if keys.count(k) > 1 or k in RESERVED_KEYS})
        if clash:
            raise UsageError(f"callback state_key(s) {clash} are used twice or by the loop itself; choose another")
        self.epoch = self.start_epoch = 0
        self.stop_reason: Optional[str] = None
        self.best_state = None
        self.generator = None
        self.resumed_rng = None
        self.epoch_nonfinite = None

    @property
    def epochs(self) -> int:
        return self.training.epochs

    @property
    def stopping(self) -> bool:
        """Whether this epoch is the last of this call (a stop was asked, or the run is done)."""
        return self.stop_reason is not None or self.epoch >= self.training.epochs

    def stop(self, reason: str) -> None:
        """Stop after the current epoch (it is still checkpointed) for ``reason``."""
        if self.stop_reason is None:
            self.stop_reason = reason

    def fire(self, event: str, *args) -> None:
        for callback in self.callbacks:
            getattr(callback, event)(self, *args)


class Checkpoint(Callback):
    """Write ``run_dir/checkpoint.pt`` (model, optimizer, random states, history, every resumable
    callback's state) and ``metrics.jsonl`` every ``every`` epochs and after the last; with
    ``resume``, continue from an existing checkpoint (the same trajectory as an uninterrupted run),
    without it refuse to overwrite one."""

    order = 0  # resumes before the others start

    def __init__(self, run_dir, every: int = 1, resume: bool = False, fit_args: Optional[dict] = None):
        from pvae.training.loop import CHECKPOINT_FILE

        self.path = Path(run_dir) / CHECKPOINT_FILE
        self.every, self.resume, self.fit_args = int(every), bool(resume), dict(fit_args or {})

    def on_fit_start(self, loop):
        from pvae.training.loop import _resume

        if not self.path.exists():
            return
        if not self.resume:
            raise RunExistsError(f"{self.path} already exists; pass resume=True to continue that run or "
                                 "choose a new run directory (nothing was overwritten)")
        _resume(self.path, self.fit_args, loop)

    def on_checkpoint(self, loop):
        from pvae.training.loop import _checkpoint

        if loop.stopping or loop.epoch % self.every == 0:  # (under torch.distributed rank 0 writes)
            _checkpoint(self.path, loop, self.fit_args)


class LRScheduler(Callback):
    """Set the learning rate after each epoch from a :class:`~pvae.training.controls.LRSchedule`
    (the epoch's rate is in its record as ``lr``)."""

    order = 10
    state_key = "lr_schedule"

    def __init__(self, schedule):
        self.schedule = schedule

    def on_epoch_end(self, loop, record):
        from pvae.training.controls import set_lr

        record["lr"] = self.schedule.state["lr"]  # this epoch's
        metric = record.get(record["val_metric"]) if record.get("val_metric") else None
        set_lr(loop.optimizer, self.schedule.after_epoch(loop.epoch, metric))

    def state_dict(self):
        return dict(self.schedule.state)

    def load_state_dict(self, state):
        self.schedule.state = dict(state)

    def on_fit_start(self, loop):
        from pvae.training.controls import set_lr

        set_lr(loop.optimizer, self.schedule.state["lr"])  # where a resumed schedule was


class EarlyStopping(Callback):
    """Stop when the validation metric has not improved for ``patience`` epochs."""

    order = 20

    def __init__(self, patience: int):
        self.patience = int(patience)

    def on_epoch_end(self, loop, record):
        best = loop.history.best_epoch
        if best is not None and loop.epoch - best >= self.patience:
            loop.history.stopped_early = True
            loop.stop(f"early stopping: no better {record.get('val_metric')} for {self.patience} epochs "
                      f"(best epoch {best})")


class TimeLimit(Callback):
    """Stop after the epoch in which ``seconds`` of this call have passed; the run is not finished
    (``History.time_limit_reached``) and ``resume=True`` continues it."""

    order = 30

    def __init__(self, seconds: float, started: Optional[float] = None):
        self.seconds, self.started = float(seconds), started

    def on_fit_start(self, loop):
        if self.started is None:
            self.started = time.perf_counter()

    def on_epoch_end(self, loop, record):
        out = time.perf_counter() - self.started >= self.seconds and loop.epoch < loop.epochs
        if distributed.broadcast(out):  # every process stops after the same epoch
            loop.history.time_limit_reached = True
            loop.stop(f"time limit of {self.seconds:g} s reached")


class NonFiniteGuard(Callback):
    """What to do when a step's loss or gradient is NaN/inf (the update is always skipped, on the
    device): ``policy="raise"`` raises :class:`~pvae.errors.DivergenceError` at the next check
    (every ``check_every`` steps, and at the end of each epoch, before it is checkpointed);
    ``policy="skip"`` goes on, counting the skipped steps in the epoch's record, but raises once
    ``max_consecutive`` steps in a row were skipped (a run that only skips would never end),
    naming the first of them. Counting runs on the device; a check reads it (one host
    synchronisation), at most every ``min(check_every, max_consecutive)`` steps."""

    order = 15
    state_key = "nonfinite"

    def __init__(self, policy: str = "raise", check_every: Optional[int] = None, max_consecutive: int = 100,
                 checkpoint_path=None):
        if policy not in ("raise", "skip"):
            raise UsageError(f"nonfinite must be 'raise' or 'skip', got {policy!r}")
        self.policy, self.check_every, self.max_consecutive = policy, check_every, int(max_consecutive)
        self.checkpoint_path = checkpoint_path
        self.run = self.run_start = self.global_step = None
        self._resumed = {"run": 0, "run_start": -1, "global_step": 0}

    def on_fit_start(self, loop):
        zero = torch.zeros((), device=loop.device)
        self.run = zero + self._resumed["run"]  # consecutive skipped steps so far
        self.run_start = zero + self._resumed["run_start"]  # global step (1-based) where that run began
        self.global_step = int(self._resumed["global_step"])

    def on_step_end(self, loop, step, value, nonfinite):
        self.global_step += 1
        bad = nonfinite > 0
        self.run_start = torch.where(bad & (self.run == 0), float(self.global_step), self.run_start)
        self.run = torch.where(bad, self.run + 1, torch.zeros_like(self.run))
        every = self.check_every if self.policy == "raise" else min(self.check_every or self.max_consecutive,
                                                                  self.max_consecutive)
        if every is not None and (step + 1) % every == 0:
            self._check(loop, step + 1)

    def _check(self, loop, steps) -> None:
        if self.policy == "raise":
            skipped, first_bad = loop.epoch_nonfinite  # (counted by the epoch loop)
            n = int(skipped)
            if n:
                raise DivergenceError(self._message(loop, n, steps, int(first_bad)))
        elif int(self.run) >= self.max_consecutive:
            raise DivergenceError(
                f"{int(self.run)} consecutive training steps were NaN/inf and skipped (from step "
                f"{int(self.run_start)} of the run, epoch {loop.epoch}); with nonfinite='skip' the run stops after "
                f"{self.max_consecutive} in a row. The parameters never held a non-finite value"
                + (f" and {self.checkpoint_path} holds the last checkpoint" if self.checkpoint_path else "")
                + "; try a lower learning rate or gradient clipping")

    def _message(self, loop, n, steps, first):
        return (f"the training loss or gradient was NaN/inf at epoch {loop.epoch}, step {first} "
                f"({n} of the first {steps} steps of the epoch); those updates were skipped, so the "
                "parameters never held a non-finite value"
                + (f", and {self.checkpoint_path} still holds epoch {loop.epoch - 1}" if self.checkpoint_path else "")
                + "; try a lower learning rate, or fit(..., nonfinite='skip') to skip such steps and go on")

    def on_epoch_end(self, loop, record):
        n = record.get("nonfinite_steps", 0)  # (summed over every process by the epoch)
        if self.policy == "raise" and n:
            raise DivergenceError(self._message(loop, n, loop.steps_per_epoch, record["first_nonfinite_step"]))
        self._check(loop, loop.steps_per_epoch)

    def state_dict(self):
        return {"run": int(self.run), "run_start": int(self.run_start), "global_step": self.global_step}

    def load_state_dict(self, state):
        self._resumed = dict(state)


class Trackers(Callback):
    """Pass each epoch's record to experiment trackers (:mod:`pvae.training.tracking`: their
    ``log_epoch``), in the main process only."""

    order = 40

    def __init__(self, loggers: Sequence):
        self.loggers = list(loggers)

    def on_epoch_end(self, loop, record):
        if distributed.is_main():
            for logger in self.loggers:
                logger.log_epoch(record)


class ProgressBar(Callback):
    """A tqdm bar over the steps of this call, with the epoch's objective and validation metric;
    it ends at 100% when the run stops early."""

    order = 50

    def __init__(self, desc: str = "pvae fit"):
        self.desc, self.bar = desc, None

    def on_fit_start(self, loop):
        if distributed.is_main():
            from pvae._progress import progress_bar_class

            tqdm = progress_bar_class()

            total = max(loop.epochs - loop.start_epoch, 0) * loop.steps_per_epoch
            self.bar = tqdm(total=total, desc=self.desc, unit="step", dynamic_ncols=True)

    def on_step_end(self, loop, step, value, nonfinite):
        if self.bar is not None:
            self.bar.update(1)

    def on_epoch_end(self, loop, record):
        if self.bar is None:
            return
        postfix = {"epoch": loop.epoch, "train": f"{record['train_objective']:.2f}"}
        if record.get("val_metric") is not None:
            postfix[record["val_metric"]] = f"{record[record['val_metric']]:.2f}"
        self.bar.set_postfix(postfix)

    def on_fit_end(self, loop):
        if self.bar is None:
            return
        if loop.stop_reason is not None and self.bar.n < self.bar.total:  # stopped early: the bar ends full
            self.bar.total = self.bar.n
            self.bar.refresh()
        self.bar.close()
