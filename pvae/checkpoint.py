"""Safe persistence: atomic writes and ``weights_only`` loads.

Files are written to a temporary file in the target's folder and renamed over the target,
so an interrupted write never leaves a truncated or half-written file behind. Checkpoints
hold only tensors, numbers, strings, lists and dicts, so they load with
``torch.load(..., weights_only=True)``, and they are mapped to the CPU on load (a checkpoint
saved on a GPU loads on a machine without one).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: os.PathLike, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Call ``write(file_object)`` on a temp file next to ``path``, then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name, suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the usual permissions
        with os.fdopen(fd, mode) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_checkpoint(state: dict, path: os.PathLike) -> None:
    """Atomically ``torch.save`` a checkpoint dict."""
    atomic_write(path, lambda fh: torch.save(state, fh))


def load_checkpoint(path: os.PathLike) -> dict:
    """Load a checkpoint with ``weights_only=True``, mapping every tensor to the CPU."""
    return torch.load(path, map_location="cpu", weights_only=True)


def write_json(obj: Any, path: os.PathLike) -> None:
    """Atomically write ``obj`` as indented JSON."""
    atomic_write(path, lambda fh: fh.write(json.dumps(obj, indent=2, sort_keys=True) + "\n"), "w")


def write_jsonl(rows: list, path: os.PathLike) -> None:
    """Atomically write rows as JSON lines (one object per line)."""
    atomic_write(path, lambda fh: fh.write("".join(json.dumps(r) + "\n" for r in rows)), "w")
