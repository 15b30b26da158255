"""Data-parallel training and sharded evaluation on :mod:`torch.distributed`.

Launch with PyTorch's own launcher; every process runs the same command::

    torchrun --standalone --nproc_per_node=2 -m pvae train --dataset digits --epochs 3
    torchrun --standalone --nproc_per_node=2 -m pvae evaluate RUN --estimators iwae,ais

:func:`init_from_env` (called by the command line) joins the process group that ``torchrun``
describes in the environment (``gloo`` on CPUs, ``nccl`` on GPUs, one GPU per local rank). In
Python, initialise the group yourself (``torch.distributed.init_process_group``) and call
:func:`pvae.fit` / :func:`pvae.evaluate_bounds` in every process: they see the group.

**Training** (:func:`pvae.fit`): the model is wrapped in
:class:`~torch.nn.parallel.DistributedDataParallel` through :class:`LossModule` (a module whose
``forward`` is the objective, as DDP needs: DESIGN.md §5). Every process draws the same seeded
permutation of the data; the global minibatch ``b`` of ``batch_size`` datapoints is split
between the processes (:func:`shard`), and each process's loss is weighted by its share so that
the averaged gradient is the gradient of the global minibatch's mean loss — the step of one
process with the same global batch. Sampling noise differs (each process draws its own), so
parameters agree with a one-process run exactly for deterministic objectives and in
distribution otherwise. Only rank 0 writes checkpoints, metrics and figures and shows progress
bars; a checkpoint holds every process's random state, so a resumed run continues each stream.

**Evaluation**: the datapoints are processed in minibatches, and minibatch ``i`` draws its
samples from a seed derived from ``(seed, i)`` (:func:`batch_seed`). The minibatches are dealt
out to the processes (``i % world_size``) and the per-datapoint values gathered, so a sharded
evaluation is the one-process evaluation, value for value.
"""

from __future__ import annotations

import gc
import os
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from pvae.errors import UsageError

__all__ = [
    "init_from_env", "shutdown_if_ours", "active", "rank", "world_size", "is_main", "barrier",
    "broadcast", "gather", "agree", "shard", "batch_seed", "my_batches", "gather_batches",
    "LossModule", "wrap",
]


def active() -> bool:
    """Whether this process is one of several in an initialised process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank in the group (0 outside one)."""
    return dist.get_rank() if active() else 0


def world_size() -> int:
    """The number of processes in the group (1 outside one)."""
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0 (or the only process): the one that writes files and shows progress."""
    return rank() == 0


def init_from_env(device: Optional[str] = None) -> Optional[str]:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE`` > 1 in the environment);
    returns the device this process should use (``cuda:<LOCAL_RANK>`` for CUDA), or None when not
    launched as several processes."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1 or active():
        return None
    cuda = device is not None and str(device).startswith("cuda") or (device in (None, "auto") and torch.cuda.is_available())
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    global _OURS
    _OURS = True
    return f"cuda:{local_rank}" if cuda else "cpu"


_OURS = False  # whether init_from_env created the process group


def shutdown_if_ours(wait: bool = True) -> None:
    """Leave the process group if :func:`init_from_env` joined it.

    The group is destroyed while the interpreter is fully alive, after what still holds it is
    freed: a :class:`~torch.nn.parallel.DistributedDataParallel` wrapper that became cyclic garbage
    (the training step keeps it) holds the gloo backend, and a backend destroyed only at
    interpreter exit, with its worker threads running, aborts the process ("terminate called
    without an active exception": one rank of a finished ``torchrun`` run exits with SIGABRT).
    ``wait``: first wait for every process to get here (a clean exit), so that no process tears
    the group down while another still talks to it; pass False after a failure (a process that
    stopped would never arrive)."""
    global _OURS
    if not (_OURS and dist.is_initialized()):
        _OURS = False
        return
    try:
        if wait and active():
            dist.barrier()
    except RuntimeError:  # a peer left without waiting (it failed, in code only it runs): leave all the same
        # (gloo and nccl report a broken barrier as torch.distributed.DistError, a RuntimeError)
        pass
    finally:
        _OURS = False
        gc.collect()  # free cyclic holders of the backend now, not at interpreter exit
        dist.destroy_process_group()


def barrier() -> None:
    """Wait until every process of the group gets here (nothing outside a group)."""
    if active():
        dist.barrier()


def broadcast(obj):
    """Rank 0's ``obj`` in every process."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj) -> List:
    """Every process's ``obj``, in rank order, in every process."""
    if not active():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def agree(error: Optional[BaseException]) -> None:
    """Raise in every process if any process failed a check (so that none waits forever in a
    collective for a process that has stopped). Call it with the local failure or None."""
    if not active():
        if error is not None:
            raise error
        return
    failures = gather(None if error is None else (type(error).__name__, str(error)))
    if error is not None:
        raise error
    first = next((f for f in failures if f is not None), None)
    if first is not None:
        raise UsageError(f"another process failed: {first[0]}: {first[1]}")


def shard(idx: torch.Tensor) -> Tuple[torch.Tensor, float]:
    """This process's part of a global minibatch ``idx`` and the weight of its mean loss,
    ``len(part) * world_size / len(idx)``: averaged over the processes (as DDP averages
    gradients), the weighted means are the global minibatch's mean."""
    if not active():
        return idx, 1.0
    part = idx.tensor_split(world_size())[rank()]
    return part, part.numel() * world_size() / idx.numel()


def batch_seed(seed: Optional[int], index: int) -> Optional[int]:
    """The seed of evaluation minibatch ``index``: ``seed`` itself for the first, a
    :class:`numpy.random.SeedSequence` of ``(seed, index)`` for the others (independent streams
    that do not depend on which process evaluates the minibatch)."""
    if seed is None or index == 0:
        return seed
    return int(np.random.SeedSequence([int(seed) % 2**63, index]).generate_state(1, np.uint64)[0] % 2**63)


def my_batches(num_batches: int) -> range:
    """The evaluation minibatches this process computes: ``rank, rank + world_size, ...``."""
    return range(rank(), num_batches, world_size())


def gather_batches(local: Dict[int, Dict[str, torch.Tensor]], num_batches: int) -> Dict[int, Dict[str, torch.Tensor]]:
    """The per-minibatch results of every process, as CPU tensors, keyed by minibatch index."""
    if not active():
        return local
    merged: Dict[int, Dict[str, torch.Tensor]] = {}
    for part in gather({i: {k: v.cpu() for k, v in d.items()} for i, d in local.items()}):
        merged.update(part)
    missing = sorted(set(range(num_batches)) - set(merged))
    if missing:
        raise RuntimeError(f"sharded evaluation lost minibatches {missing[:5]}")
    return merged


class LossModule(nn.Module):
    """The objective as a module: ``forward(x, index, kl_weight, weight)`` returns the weighted
    loss and the objective's value, so that :class:`~torch.nn.parallel.DistributedDataParallel`
    sees the VAE's parameters being used (a bound method such as ``vae.model`` would hide them)."""

    def __init__(self, vae, objective):
        super().__init__()
        self.vae = vae
        self.objective = objective

    def forward(self, x, index=None, kl_weight=1.0, weight=1.0):
        from pvae.training.objectives import call_objective

        loss, value = call_objective(self.objective, self.vae, x, index, kl_weight)
        return loss * weight, value


def wrap(vae, objective, x=None, index=None, kl_weight=1.0):
    """``LossModule(vae, objective)`` inside DDP (on the VAE's device). With an example minibatch
    ``x``, one probe step (its random draws and gradients undone) finds whether every parameter
    receives a gradient; only if not does DDP search the graph for unused ones every step."""
    module = LossModule(vae, objective)
    device = vae.device
    kwargs = {"device_ids": [device.index]} if device.type == "cuda" else {}
    find_unused = True
    if x is not None:
        params = [p for p in module.parameters() if p.requires_grad]
        devices = [device.index if device.index is not None else torch.cuda.current_device()] \
            if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            loss, _ = module(x, index, kl_weight)
            loss.backward()
        find_unused = any(p.grad is None for p in params)
        for p in params:
            p.grad = None
    return nn.parallel.DistributedDataParallel(module, find_unused_parameters=find_unused, **kwargs)
