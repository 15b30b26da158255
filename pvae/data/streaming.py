"""Data bigger than memory: splits read on demand.

A :class:`StreamedSplit` stands where a ``(N, D)`` tensor would: it has ``shape``, ``len``,
slicing (``split[a:b]`` is a float tensor) and fancy indexing, and it is a
:class:`torch.utils.data.Dataset` whose ``__getitems__`` reads a whole minibatch at once. Its
rows come from a *source*: a memory-mapped ``.npy`` file (:class:`MemmapSource`) or a folder of
images decoded on demand (:class:`ImageFolderSource`). A row is converted exactly as the
in-memory path converts the whole array (same NumPy operations on the same values), so a
streamed run and an in-memory run with the same seed see the same numbers.

:func:`pvae.fit` trains on a streamed split through a :class:`~torch.utils.data.DataLoader`
over the same seeded permutation as the in-memory path (workers, pinned memory and
non-blocking copies on a GPU); the estimators read streamed splits in minibatches.
:func:`pvae.files.load_file` streams automatically when the data would exceed the memory
budget (:func:`memory_budget_bytes`).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Tuple

import numpy as np
import torch

from pvae.errors import UsageError

__all__ = ["StreamedSplit", "MemmapSource", "ImageFolderSource", "memory_budget_bytes", "is_streamed"]

#: environment variable: the memory budget in GiB for data held in memory
MEMORY_BUDGET_ENV = "PVAE_MEMORY_BUDGET_GB"


def memory_budget_bytes() -> int:
    """Bytes of data :func:`~pvae.files.load_file` holds in memory before it streams:
    ``$PVAE_MEMORY_BUDGET_GB`` if set, else a quarter of the machine's physical memory."""
    env = os.environ.get(MEMORY_BUDGET_ENV)
    if env:
        try:
            value = float(env)
        except ValueError:
            raise UsageError(f"{MEMORY_BUDGET_ENV} must be a number of GiB, got {env!r}") from None
        if not value > 0:
            raise UsageError(f"{MEMORY_BUDGET_ENV} must be positive, got {env!r}")
        return int(value * 2**30)
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: assume 8 GiB
        physical = 8 * 2**30
    return int(physical // 4)


class MemmapSource:
    """Rows of a ``.npy`` file, memory-mapped (read from disk as they are indexed).

    :param path: the file.
    :param convert: ``(rows as stored) -> float32 (n, D)``, the in-memory path's shaping and conversion.
    """

    def __init__(self, path: Path, convert: Callable[[np.ndarray], np.ndarray]):
        self.path = Path(path)
        self.array = np.load(self.path, mmap_mode="r", allow_pickle=False)
        self.convert = convert

    def __len__(self) -> int:
        return int(self.array.shape[0])

    def read(self, rows: np.ndarray) -> np.ndarray:
        order = np.argsort(rows, kind="stable")  # read the file forwards, return in the asked order
        block = np.asarray(self.array[rows[order]])
        out = np.empty_like(block)
        out[order] = block
        return self.convert(out)

    def __getstate__(self):  # DataLoader workers reopen the map instead of pickling pages
        state = dict(self.__dict__)
        state.pop("array")
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.array = np.load(self.path, mmap_mode="r", allow_pickle=False)


class ImageFolderSource:
    """Images of a folder, decoded (and resized) as they are indexed.

    :param files: the image files, in the data set's order.
    :param mode: PIL mode to convert to (``"L"`` or ``"RGB"``).
    :param size: PIL ``(width, height)`` to resize to, or None.
    :param convert: ``uint8 (n, H, W[, C]) -> float32 (n, D)``, the in-memory path's conversion.
    """

    def __init__(self, files: Sequence[Path], mode: str, size: Optional[Tuple[int, int]],
                 convert: Callable[[np.ndarray], np.ndarray]):
        self.files, self.mode, self.size, self.convert = list(files), mode, size, convert

    def __len__(self) -> int:
        return len(self.files)

    def decode(self, i: int) -> np.ndarray:
        from PIL import Image

        with Image.open(self.files[i]) as im:
            im = im.convert(self.mode)
            if self.size is not None:
                im = im.resize(self.size, Image.BILINEAR)
            return np.asarray(im)

    def read(self, rows: np.ndarray) -> np.ndarray:
        return self.convert(np.stack([self.decode(int(i)) for i in rows]))


class StreamedSplit(torch.utils.data.Dataset):
    """The rows ``rows`` of ``source`` as a float32 ``(len(rows), data_dim)`` split read on demand."""

    def __init__(self, source, rows: np.ndarray, data_dim: int):
        self.source = source
        self.rows = np.asarray(rows, dtype=np.int64)
        self.data_dim = int(data_dim)

    # the tensor-like surface -------------------------------------------------------------
    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.rows), self.data_dim))

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def dim(self) -> int:
        return 2

    def is_floating_point(self) -> bool:
        return True

    def __len__(self) -> int:
        return len(self.rows)

    def _positions(self, index) -> np.ndarray:
        if isinstance(index, slice):
            return np.arange(len(self.rows))[index]
        if isinstance(index, torch.Tensor):
            index = index.cpu().numpy()
        return np.asarray(index, dtype=np.int64).reshape(-1)

    def __getitem__(self, index):
        if isinstance(index, (int, np.integer)):
            return torch.from_numpy(self.source.read(self.rows[[int(index)]]))[0]
        return self.__getitems__(self._positions(index))

    def __getitems__(self, positions) -> torch.Tensor:
        """A whole minibatch in one read (the DataLoader calls this with the batch's positions)."""
        positions = np.asarray(positions, dtype=np.int64)
        if positions.size == 0:
            return torch.empty(0, self.data_dim)
        return torch.from_numpy(np.ascontiguousarray(self.source.read(self.rows[positions]), dtype=np.float32))

    def chunks(self, size: int = 4096) -> Iterator[torch.Tensor]:
        """The split in order, ``size`` rows at a time."""
        for start in range(0, len(self.rows), size):
            yield self.__getitems__(np.arange(start, min(start + size, len(self.rows))))

    def to(self, device=None, dtype=None, non_blocking: bool = False) -> torch.Tensor:
        """The whole split in memory, as a tensor on ``device`` (for what needs it all at once)."""
        out = torch.cat(list(self.chunks())) if len(self.rows) else torch.empty(0, self.data_dim)
        return out.to(device=device, dtype=dtype, non_blocking=non_blocking)

    def update_hash(self, h: "hashlib._Hash") -> None:
        """Feed the split's float32 values to ``h`` in order (as the in-memory tensor's bytes)."""
        for chunk in self.chunks():
            h.update(chunk.numpy().tobytes())

    def __repr__(self) -> str:
        return f"StreamedSplit({len(self.rows)} x {self.data_dim} from {type(self.source).__name__})"


def is_streamed(x) -> bool:
    """Whether ``x`` is a :class:`StreamedSplit` (read on demand) rather than a tensor."""
    return isinstance(x, StreamedSplit)


def _identity(batch):
    return batch


def loader(split: StreamedSplit, order: torch.Tensor, batch_size: int, device: torch.device,
           num_workers: Optional[int] = None) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(positions, batch on device)`` for the minibatches ``order.split(batch_size)``,
    read by a :class:`~torch.utils.data.DataLoader` (``num_workers`` processes, default up to 4;
    pinned memory and non-blocking copies when ``device`` is a GPU)."""
    batches = [b.tolist() for b in order.cpu().split(batch_size)]
    if num_workers is None:
        num_workers = min(4, max(0, (os.cpu_count() or 1) - 1))
    cuda = device.type == "cuda"
    # its own generator: a DataLoader otherwise draws its workers' base seed from the global RNG,
    # which would shift every later sampling draw of the (seeded) training run
    data = torch.utils.data.DataLoader(split, batch_sampler=batches, collate_fn=_identity,
                                       num_workers=num_workers, pin_memory=cuda,
                                       prefetch_factor=4 if num_workers else None,
                                       generator=torch.Generator().manual_seed(0))
    for positions, xb in zip(batches, data):
        yield torch.as_tensor(positions, device=device), xb.to(device, non_blocking=cuda)
