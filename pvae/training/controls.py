"""Training controls: optimizers and learning-rate schedules as parts, mixed precision.

The optimizer and the schedule are the training section's parts (:data:`TRAINING_PARTS`): the
registries :data:`OPTIMIZERS` and :data:`SCHEDULES` hold factories whose keyword parameters are
their options (declared once: the config's nested section, the flags ``--optimizer-<option>`` and
``--lr-schedule-<option>``, and the errors follow from them); :func:`nest_legacy_training` reads
pvae 0.2's flat keys. :data:`PRECISIONS` are the precisions :func:`use_precision` takes.

* :func:`make_optimizer` — ``adam`` (fused, on the device), ``adamw``, ``sgd`` (with momentum),
  ``adamax`` (Burda et al. 2016 trained the IWAE with Adam; Kingma & Ba's Adamax is its
  infinity-norm variant), each with ``weight_decay``.
* :class:`LRSchedule` — ``constant``; ``step`` (times ``gamma`` every ``step`` epochs);
  ``exponential`` (times ``gamma`` every epoch); ``cosine`` (from ``lr`` to ``min_lr`` over the
  run's epochs); ``plateau`` (times ``gamma`` after ``step`` epochs without a better validation
  metric, ``patience`` in the part); ``iwae`` (Burda et al. 2016: stage i = 0..7 lasts 3^i epochs at ``lr * 10^(-i/7)``).
  The schedule is a function of the epochs done (and, for ``plateau``, of the validation record),
  so a resumed run continues it exactly; its state is in the checkpoint.
* :func:`use_precision` — ``bf16``: the encoder's and decoder's forward passes run under
  :func:`torch.autocast` and their outputs are cast back to float32, so that every
  log-density, log-weight and KL is computed in float32 (the networks are where the time goes;
  the densities are where the precision matters).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from pvae.errors import UsageError
from pvae.options import Part
from pvae.registry import Registry

__all__ = ["make_optimizer", "set_lr", "LRSchedule", "use_precision", "OPTIMIZERS", "SCHEDULES", "PRECISIONS",
           "TRAINING_PARTS", "nest_legacy_training"]

_OPTIMIZER_NAMES = ("adam", "adamw", "sgd", "adamax")
_SCHEDULE_NAMES = ("constant", "step", "exponential", "cosine", "plateau", "iwae")
PRECISIONS = ("fp32", "bf16")
#: each schedule's decay factor when ``gamma`` is not given
DEFAULT_GAMMA = {"step": 0.1, "exponential": 0.99, "plateau": 0.5}


def make_optimizer(params, name: str = "adam", lr: float = 1e-3, weight_decay: float = 0.0,
                   momentum: float = 0.0, device: Optional[torch.device] = None, tensor_lr: bool = False):
    """An optimizer by name. Adam and AdamW use the fused kernel (which skips updates flagged
    non-finite on the device, without a host synchronisation) where the device has one, and are
    capturable in a CUDA graph on CUDA; ``tensor_lr`` keeps the learning rate in a device tensor so
    that a schedule can change it under a CUDA graph."""
    if name not in _OPTIMIZER_NAMES:
        raise UsageError(f"unknown optimizer {name!r}; valid choices: {', '.join(_OPTIMIZER_NAMES)}")
    if not weight_decay >= 0:
        raise UsageError(f"weight_decay must be >= 0, got {weight_decay!r}")
    if not momentum >= 0 or momentum >= 1:
        raise UsageError(f"momentum must be in [0, 1), got {momentum!r}")
    if momentum and name != "sgd":
        raise UsageError(f"momentum is an option of the sgd optimizer, not of {name}")
    params = list(params)
    cuda = device is not None and torch.device(device).type == "cuda"
    value = torch.tensor(float(lr), device=device) if tensor_lr and cuda else float(lr)
    if name in ("adam", "adamw"):
        cls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
        try:
            return cls(params, lr=value, weight_decay=weight_decay, fused=True, capturable=cuda)
        except (RuntimeError, TypeError):  # a device or dtype without a fused kernel
            return cls(params, lr=float(lr), weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=float(lr), momentum=momentum, weight_decay=weight_decay)
    return torch.optim.Adamax(params, lr=float(lr), weight_decay=weight_decay)


def set_lr(optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group of ``optimizer`` (in place where it is a
    device tensor, so that a captured CUDA graph sees it)."""
    for group in optimizer.param_groups:
        if torch.is_tensor(group["lr"]):
            group["lr"].fill_(lr)  # in place: a captured CUDA graph reads this tensor
        else:
            group["lr"] = lr


class LRSchedule:
    """The learning rate after each epoch (see the module doc).

    :param str kind: a name in :data:`SCHEDULES`.
    :param float lr: the initial learning rate.
    :param gamma: the decay factor (default per schedule, :data:`DEFAULT_GAMMA`).
    :param int step: epochs between decays (``step``) or without improvement (``plateau``).
    :param float min_lr: the floor of ``cosine``.
    :param int epochs: the run's epochs (the length of ``cosine``).
    """

    def __init__(self, kind: str = "constant", lr: float = 1e-3, gamma: Optional[float] = None, step: int = 100,
                 min_lr: float = 0.0, epochs: int = 1):
        if kind not in _SCHEDULE_NAMES:
            raise UsageError(f"unknown lr_schedule {kind!r}; valid choices: {', '.join(_SCHEDULE_NAMES)}")
        if gamma is not None and not 0 < gamma <= 1:
            raise UsageError(f"lr_gamma must be in (0, 1], got {gamma!r}")
        if isinstance(step, bool) or int(step) != step or step < 1:
            raise UsageError(f"lr_step must be a positive integer, got {step!r}")
        if not 0 <= min_lr <= lr:
            raise UsageError(f"lr_min must be in [0, lr], got {min_lr!r}")
        self.kind, self.lr, self.step, self.min_lr, self.epochs = kind, float(lr), int(step), float(min_lr), int(epochs)
        self.gamma = float(gamma if gamma is not None else DEFAULT_GAMMA.get(kind, 1.0))
        self.state = {"lr": self.lr, "best": None, "bad_epochs": 0}

    def options(self) -> dict:
        """What defines the schedule (a resumed run must use the same)."""
        return {"kind": self.kind, "lr": self.lr, "gamma": self.gamma, "step": self.step, "min_lr": self.min_lr,
                **({"epochs": self.epochs} if self.kind == "cosine" else {})}

    def after_epoch(self, epoch: int, metric: Optional[float] = None) -> float:
        """The learning rate for epoch ``epoch + 1``, given ``epoch`` epochs done and that
        epoch's validation ``metric`` (higher is better)."""
        kind = self.kind
        if kind == "constant":
            lr = self.lr
        elif kind == "step":
            lr = self.lr * self.gamma ** (epoch // self.step)
        elif kind == "exponential":
            lr = self.lr * self.gamma ** epoch
        elif kind == "cosine":
            t = min(epoch / max(self.epochs, 1), 1.0)
            lr = self.min_lr + 0.5 * (self.lr - self.min_lr) * (1 + math.cos(math.pi * t))
        elif kind == "iwae":  # epoch e+1 is in stage i when (3^i - 1)/2 < e + 1 <= (3^(i+1) - 1)/2
            stage = 0
            while stage < 7 and epoch + 1 > (3 ** (stage + 1) - 1) // 2:
                stage += 1
            lr = self.lr * 10 ** (-stage / 7)
        else:  # plateau
            lr = self.state["lr"]
            if metric is not None and math.isfinite(metric):
                if self.state["best"] is None or metric > self.state["best"]:
                    self.state["best"], self.state["bad_epochs"] = metric, 0
                else:
                    self.state["bad_epochs"] += 1
                    if self.state["bad_epochs"] >= self.step:
                        lr, self.state["bad_epochs"] = lr * self.gamma, 0
        self.state["lr"] = lr
        return lr


def use_precision(vae, precision: str = "fp32") -> None:
    """Run ``vae``'s encoder and decoder under autocast (``"bf16"``) or not (``"fp32"``); their
    outputs are float32 either way, so every density downstream is computed in float32."""
    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision {precision!r}; valid choices: {', '.join(PRECISIONS)}")
    if not hasattr(vae, "decoder"):  # a user's program: its networks are its own
        if precision != "fp32":
            raise UsageError(f"precision {precision!r} applies autocast to pvae's own encoder and decoder; for a "
                             "model/guide pair of your own, use torch.autocast inside your networks")
        vae.precision = precision
        return
    nets = [vae.decoder, getattr(getattr(vae, "guide_net", None), "encoder", None)]
    for net in nets:
        if net is None:
            continue
        for handle in getattr(net, "_pvae_precision_hooks", ()):
            handle.remove()
        net._pvae_precision_hooks = ()
        if precision == "bf16":
            net._pvae_precision_hooks = (net.register_forward_pre_hook(_enter_autocast),
                                         net.register_forward_hook(_leave_autocast, always_call=True))
    vae.precision = precision


def _enter_autocast(module, args):
    device = next((a.device.type for a in args if torch.is_tensor(a)), "cpu")
    # no cast cache: a cached bf16 copy of a weight would be stale inside a replayed CUDA graph
    # (PyTorch's advice for autocast with CUDA graphs) and across optimizer steps it saves little
    context = torch.autocast(device, dtype=torch.bfloat16, cache_enabled=False)
    context.__enter__()
    module.__dict__.setdefault("_pvae_autocast", []).append(context)


def _leave_autocast(module, args, output):
    module.__dict__["_pvae_autocast"].pop().__exit__(None, None, None)
    if torch.is_tensor(output):
        return output.float()
    if isinstance(output, tuple):
        return tuple(o.float() if torch.is_tensor(o) and o.is_floating_point() else o for o in output)
    return output


# ----------------------------------------------------------------------------- optimizers and
# schedules as parts: registered once, their options declared by the factories' keyword parameters
# (the training section's ``optimizer`` and ``lr_schedule``, flags --optimizer-<option> and
# --lr-schedule-<option>)
OPTIMIZERS: Registry = Registry("optimizer", context=("params", "lr", "device", "tensor_lr"), doc="""\
Optimizers by name (the ``optimizer`` part of a run's training section): ``adam`` (fused, on the
device), ``adamw``, ``sgd``, ``adamax``; each factory's keyword parameters are its options.""")
SCHEDULES: Registry = Registry("lr_schedule", context=("lr", "epochs"), doc="""\
Learning-rate schedules by name (the ``lr_schedule`` part of a run's training section): constant,
step, exponential, cosine, plateau, iwae; each returns an :class:`LRSchedule`.""")


@OPTIMIZERS.register("adam")
def adam(params, lr, device=None, tensor_lr=False, weight_decay: float = 0.0):
    """Adam (Kingma & Ba 2015), the fused kernel on the device where it has one.

    :param float weight_decay: L2 penalty added to the gradient (>= 0).
    """
    return make_optimizer(params, "adam", lr, weight_decay, 0.0, device, tensor_lr)


@OPTIMIZERS.register("adamw")
def adamw(params, lr, device=None, tensor_lr=False, weight_decay: float = 0.0):
    """AdamW (Loshchilov & Hutter 2019): Adam with decoupled weight decay.

    :param float weight_decay: decoupled weight decay (>= 0).
    """
    return make_optimizer(params, "adamw", lr, weight_decay, 0.0, device, tensor_lr)


@OPTIMIZERS.register("sgd")
def sgd(params, lr, device=None, tensor_lr=False, momentum: float = 0.0, weight_decay: float = 0.0):
    """Stochastic gradient descent.

    :param float momentum: heavy-ball momentum in [0, 1).
    :param float weight_decay: L2 penalty added to the gradient (>= 0).
    """
    return make_optimizer(params, "sgd", lr, weight_decay, momentum, device, tensor_lr)


@OPTIMIZERS.register("adamax")
def adamax(params, lr, device=None, tensor_lr=False, weight_decay: float = 0.0):
    """Adamax (Kingma & Ba 2015): Adam's infinity-norm variant.

    :param float weight_decay: L2 penalty added to the gradient (>= 0).
    """
    return make_optimizer(params, "adamax", lr, weight_decay, 0.0, device, tensor_lr)


@SCHEDULES.register("constant")
def constant(lr, epochs=1):
    """The learning rate stays ``lr``."""
    return LRSchedule("constant", lr, epochs=epochs)


@SCHEDULES.register("step")
def step(lr, epochs=1, gamma: float = 0.1, step: int = 100):
    """Times ``gamma`` every ``step`` epochs.

    :param float gamma: the decay factor, in (0, 1].
    :param int step: epochs between decays.
    """
    return LRSchedule("step", lr, gamma, step, epochs=epochs)


@SCHEDULES.register("exponential")
def exponential(lr, epochs=1, gamma: float = 0.99):
    """Times ``gamma`` every epoch.

    :param float gamma: the decay factor per epoch, in (0, 1].
    """
    return LRSchedule("exponential", lr, gamma, epochs=epochs)


@SCHEDULES.register("cosine")
def cosine(lr, epochs=1, min_lr: float = 0.0):
    """From ``lr`` to ``min_lr`` along a half cosine over the run's epochs.

    :param float min_lr: the final learning rate, in [0, lr].
    """
    return LRSchedule("cosine", lr, min_lr=min_lr, epochs=epochs)


@SCHEDULES.register("plateau")
def plateau(lr, epochs=1, gamma: float = 0.5, patience: int = 100):
    """Times ``gamma`` after ``patience`` epochs without a better validation metric.

    :param float gamma: the decay factor, in (0, 1].
    :param int patience: epochs without improvement before a decay.
    """
    return LRSchedule("plateau", lr, gamma, patience, epochs=epochs)


@SCHEDULES.register("iwae")
def iwae(lr, epochs=1):
    """Burda et al. 2016: stage i = 0..7 lasts 3^i epochs at ``lr * 10^(-i/7)``."""
    return LRSchedule("iwae", lr, epochs=epochs)


#: the training section's parts: field -> registry
TRAINING_PARTS = {"optimizer": OPTIMIZERS, "lr_schedule": SCHEDULES}
#: pvae 0.2's flat training keys -> (part field, option(s) of that part), with their defaults then
LEGACY_TRAINING_KEYS = {
    "weight_decay": ("optimizer", ("weight_decay",), 0.0),
    "momentum": ("optimizer", ("momentum",), 0.0),
    "lr_gamma": ("lr_schedule", ("gamma",), None),
    "lr_step": ("lr_schedule", ("step", "patience"), 100),
    "lr_min": ("lr_schedule", ("min_lr",), 0.0),
}


def nest_legacy_training(values: dict) -> dict:
    """A training mapping of pvae 0.2 (flat ``weight_decay``, ``lr_gamma``, ...) with those keys
    moved into its ``optimizer`` and ``lr_schedule`` parts. A flat key the chosen part does not
    take is dropped when it holds pvae 0.2's default (it had no effect then), else an error."""
    values = dict(values)
    for key, (field, options, default) in LEGACY_TRAINING_KEYS.items():
        if key not in values:
            continue
        value = values.pop(key)
        part = values.get(field, TRAINING_PART_DEFAULTS[field])
        part = {"name": part} if isinstance(part, str) else (part.to_dict() if isinstance(part, Part) else dict(part))
        takes = [o for o in options if o in TRAINING_PARTS[field].options(part["name"])]
        if takes:
            if value is not None:
                part[takes[0]] = value
        elif value != default:
            raise UsageError(f"training: {key} is not an option of the {field} {part['name']!r} "
                             f"(its options: {', '.join(TRAINING_PARTS[field].options(part['name'])) or 'none'})")
        values[field] = part
    return values


TRAINING_PART_DEFAULTS = {"optimizer": "adam", "lr_schedule": "constant"}
