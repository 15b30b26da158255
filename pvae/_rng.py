"""Explicit randomness: run a block under its own seed without touching the caller's RNG."""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch


@contextlib.contextmanager
def seeded(seed: Optional[int], device: Optional[torch.device] = None) -> Iterator[None]:
    """Run the block with torch's RNG seeded by ``seed`` and restore the caller's RNG after.

    With ``seed=None`` the block draws from (and advances) the global RNG as usual.
    ``device`` names the CUDA device whose generator is forked too (CPU is always forked).
    """
    if seed is None:
        yield
        return
    devices = []
    if device is not None and torch.device(device).type == "cuda":
        index = torch.device(device).index
        devices = [index if index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(seed))
        yield
