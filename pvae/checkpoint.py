"""Safe persistence: atomic writes and ``weights_only`` loads.

Files are written to a temporary file in the target's folder and renamed over the target,
so an interrupted write never leaves a truncated or half-written file behind. Checkpoints
hold only tensors, numbers, strings, lists and dicts, so they load with
``torch.load(..., weights_only=True)``, and they are mapped to the CPU on load (a checkpoint
saved on a GPU loads on a machine without one).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import pickle
import struct
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from pvae.errors import DiskFullError, UsageError

__all__ = [
    "save_checkpoint", "load_checkpoint", "atomic_write", "write_json", "write_jsonl", "run_lock",
    "CorruptCheckpointError", "RunLockedError",
]

SEALED_FORMAT = "pvae-sealed-1"

#: What ``torch.load(..., weights_only=True)`` raises for damaged or foreign bytes (a file that
#: cannot be opened raises an :class:`OSError` instead): the zip reader's ``RuntimeError``, the
#: restricted unpickler's ``UnpicklingError``, and what decoding garbled pickle data meets on the
#: way (found by loading saved checkpoints truncated, bit-flipped, with bytes inserted or deleted).
TORCH_LOAD_ERRORS = (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError,
                     AttributeError, AssertionError, struct.error)


class CorruptCheckpointError(UsageError):
    """A checkpoint file is truncated, cannot be decoded or fails its checksum."""


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
    except BaseException as exc:  # deliberately every exception (Ctrl-C too): remove the temp file, re-raise
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(
                f"no space left on the device holding {path} while writing it ({exc.strerror}); "
                f"{'the previous ' + path.name + ' is intact' if path.exists() else 'nothing was written'}: "
                "free some space and run again (pvae train --resume continues a run)"
            ) from exc
        raise


def save_checkpoint(state: dict, path: os.PathLike) -> None:
    """Atomically ``torch.save`` a checkpoint dict, sealed with its SHA-256: the file holds
    ``{"format": "pvae-sealed-1", "sha256": ..., "payload": uint8 tensor}`` where ``payload``
    holds the bytes of ``torch.save(state)``, so a truncated or altered file is detected on load.
    (A uint8 tensor is stored as raw bytes; Python ``bytes`` inside ``torch.save`` are pickled
    as latin-1 text, which made files half as large again.)"""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    sealed = {"format": SEALED_FORMAT, "sha256": hashlib.sha256(payload).hexdigest(),
              "payload": torch.frombuffer(bytearray(payload), dtype=torch.uint8)}
    buffer = io.BytesIO()
    torch.save(sealed, buffer)  # in memory: a full disk then fails a plain write (an OSError), not
    # torch's zip writer half-way (a RuntimeError that says nothing of the disk)
    atomic_write(path, lambda fh: fh.write(buffer.getbuffer()))


def load_checkpoint(path: os.PathLike) -> dict:
    """Load a checkpoint with ``weights_only=True``, mapping every tensor to the CPU, after
    checking its SHA-256 (checkpoints written before sealing load unchecked).

    :raises CorruptCheckpointError: when the file is truncated, undecodable or altered.
    :raises OSError: when it cannot be opened or read (missing, no permission, ...): as raised."""
    try:
        outer = torch.load(path, map_location="cpu", weights_only=True)
    except TORCH_LOAD_ERRORS as exc:  # truncated zip, garbage bytes, ...
        raise CorruptCheckpointError(
            f"{path} is not a readable checkpoint ({type(exc).__name__}: {exc}); it is truncated or "
            "corrupted: restore it from a copy or start the run anew"
        ) from exc
    if not (isinstance(outer, dict) and outer.get("format") == SEALED_FORMAT):
        return outer
    payload = outer["payload"]
    if isinstance(payload, torch.Tensor):
        payload = payload.numpy().tobytes()
    if hashlib.sha256(payload).hexdigest() != outer["sha256"]:
        raise CorruptCheckpointError(
            f"{path} fails its SHA-256 check: the file was altered or damaged after it was written; "
            "restore it from a copy or start the run anew"
        )
    return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)


@contextlib.contextmanager
def run_lock(run_dir: os.PathLike):
    """Hold an exclusive lock on ``run_dir`` (``run_dir/.lock``, ``fcntl.flock``) while training
    writes there; a second process is refused with a :class:`RunLockedError`. The holder removes
    the file when it releases the lock, so a finished run directory holds no ``.lock``; the
    operating system releases the lock when the process ends, however it ends (a killed run
    leaves at most an unlocked file, which the next run takes over).

    The removal is safe against a second process that opened the file before it was removed:
    after taking the lock, a process checks that the path still names the file it locked (the
    same inode) and otherwise opens the path anew, so two processes never hold locks on two
    different files for one run directory."""
    path = Path(run_dir)
    path.mkdir(parents=True, exist_ok=True)
    lock = path / ".lock"
    try:
        import fcntl
    except ImportError:  # no flock (Windows): no protection, as before
        fcntl = None
    while True:
        fh = open(lock, "a+")
        if fcntl is None:
            break
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            fh.seek(0)
            owner = fh.read().strip() or "unknown"
            fh.close()
            raise RunLockedError(
                f"{path} is in use by another pvae process (pid {owner}); wait for it to finish or "
                "choose another --run-dir"
            ) from exc
        if _same_file(lock, fh):
            break
        fh.close()  # the holder removed (and maybe someone recreated) the file meanwhile: lock the path's file
    try:
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        yield
    finally:
        if fcntl is None:  # Windows: no lock, and an open file cannot be removed
            fh.close()
        # only the holder removes the file, before it releases the lock (closes the file): a process
        # that opened the file meanwhile then finds the path gone or naming another file, and retries
        try:
            if fcntl is None or _same_file(lock, fh):
                os.unlink(lock)
        except OSError:  # the folder was removed or is not writable: nothing left to tidy
            pass
        if fcntl is not None:
            fh.close()


def _same_file(path: Path, fh) -> bool:
    """Whether ``path`` names the file open as ``fh``."""
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fh.fileno())
    return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)


class RunLockedError(UsageError):
    """Another process is training into the same run directory."""


def write_json(obj: Any, path: os.PathLike) -> None:
    """Atomically write ``obj`` as indented JSON."""
    atomic_write(path, lambda fh: fh.write(json.dumps(obj, indent=2, sort_keys=True) + "\n"), "w")


def write_jsonl(rows: list, path: os.PathLike) -> None:
    """Atomically write rows as JSON lines (one object per line)."""
    atomic_write(path, lambda fh: fh.write("".join(json.dumps(r) + "\n" for r in rows)), "w")
