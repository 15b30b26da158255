"""Data sets behind one protocol, with download + checksum + cache.

:func:`load_dataset` returns a :class:`Dataset`: float tensors of flattened examples for the
``train``/``valid``/``test`` splits, optional labels, the image shape (for plots) and whether
the data are binary.

Downloads land in a cache directory: ``$PVAE_DATA_DIR`` if set, else ``~/.cache/pvae``
(:func:`data_dir`). A cache that already holds the files is only read, never written, so a
read-only directory of pre-downloaded files works (tests and CI point ``PVAE_DATA_DIR`` at
such a folder). Every downloaded or cached file is verified against its SHA-256 before use.

Registered data sets (:data:`DATASETS`):

* ``"digits"`` — scikit-learn's 8x8 handwritten digits (1,797 images, shipped inside
  scikit-learn, no download), statically binarized at half intensity (pixel >= 8 of 16);
  a fixed seeded split into 1,197 train / 300 valid / 300 test, with labels.
* ``"digits-grey"`` — the same images as grey levels in [0, 1].
* ``"binarized-mnist"`` — the static binarization of MNIST of Larochelle & Murray (2011):
  50,000 / 10,000 / 10,000 images of 28x28 in {0, 1}, no labels.
* ``"mnist"``, ``"fashion-mnist"`` — grey levels in [0, 1] from the published IDX files (checked
  against their published MD5 and SHA-256), 50,000 / 10,000 (the last 10,000 training images) /
  10,000, with labels. For a Bernoulli likelihood binarize them (``--binarize`` is for files;
  use ``continuous-bernoulli`` or ``gaussian`` here).
* ``"file"`` — your own data (:func:`pvae.files.load_file`).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Tuple

import numpy as np
import torch

from .errors import UsageError
from .files import load_file
from .registry import Registry

DATASETS: Registry = Registry("dataset", context=("cache_dir",))
SPLITS = ("train", "valid", "test")
DATA_DIR_ENV = "PVAE_DATA_DIR"


class DataUnavailableError(UsageError, FileNotFoundError):
    """A data file is missing from the cache and could not be downloaded."""


class ChecksumError(UsageError):
    """A data file's contents do not match the published checksum."""


@dataclass(frozen=True)
class Dataset:
    """Three splits of flattened examples.

    :ivar str name: registry name.
    :ivar train, valid, test: float tensors ``(N, D)``.
    :ivar labels: dict split -> int64 tensor ``(N,)``, or None when unlabelled.
    :ivar image_shape: ``(H, W)`` for image data (for plots), else None.
    :ivar bool binary: all values are 0 or 1.
    :ivar source: where the data came from, for a user's file (path, size, SHA-256, split), else None.
    """

    name: str
    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor
    labels: Optional[dict] = None
    image_shape: Optional[Tuple[int, ...]] = None
    binary: bool = False
    source: Optional[dict] = None

    @property
    def data_dim(self) -> int:
        return int(self.train.shape[-1])

    def split(self, name: str) -> torch.Tensor:
        if name not in SPLITS:
            raise UsageError(f"unknown split {name!r}; valid choices: {', '.join(SPLITS)}")
        return getattr(self, name)

    def fingerprint(self) -> str:
        """SHA-256 over the three splits' shapes and float32 values: which data a run saw."""
        h = hashlib.sha256()
        for name in SPLITS:
            t = self.split(name).detach().to("cpu", torch.float32).contiguous()
            h.update(f"{name}{tuple(t.shape)}".encode())
            h.update(t.numpy().tobytes())
        return h.hexdigest()

    def split_labels(self, name: str) -> Optional[torch.Tensor]:
        self.split(name)
        return None if self.labels is None else self.labels.get(name)


def _image_shape(shape):
    """Record a data set's image shape on its loader (read by convolutional networks
    without loading the data)."""

    def decorate(loader):
        loader.image_shape = shape
        return loader

    return decorate


def image_shape_of(name) -> Optional[Tuple[int, ...]]:
    """The image shape ``(H, W)`` of a registered data set (a name or a part), or None for
    non-image data and for files (whose shape is known once they are read)."""
    name = getattr(name, "name", name)
    return getattr(DATASETS.get(name), "image_shape", None)


def data_dir() -> Path:
    """The cache directory: ``$PVAE_DATA_DIR`` or ``~/.cache/pvae``."""
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "pvae"


def load_dataset(name, cache_dir: Optional[os.PathLike] = None) -> Dataset:
    """Load a data set: a registered name (downloading into the cache if needed), a
    :class:`~pvae.options.Part` such as ``Part("file", path="my.npy", split=(0.8, 0.1, 0.1))``,
    or a mapping ``{"name": "file", "path": ...}``."""
    return DATASETS.build(name, cache_dir=Path(cache_dir) if cache_dir is not None else data_dir())


# your own data: the file loader's keyword arguments are the data set's options
DATASETS.register("file")(load_file)


# ---------------------------------------------------------------------------- digits
def _digits_split(images: np.ndarray, labels: np.ndarray, name: str, binary: bool) -> Dataset:
    perm = np.random.RandomState(0).permutation(len(images))
    parts = {"test": perm[:300], "valid": perm[300:600], "train": perm[600:]}
    tensors = {k: torch.as_tensor(images[v], dtype=torch.float32) for k, v in parts.items()}
    labs = {k: torch.as_tensor(labels[v], dtype=torch.int64) for k, v in parts.items()}
    return Dataset(name, labels=labs, image_shape=(8, 8), binary=binary, **tensors)


@DATASETS.register("digits")
@_image_shape((8, 8))
def _load_digits(cache_dir: Path) -> Dataset:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.data >= 8).astype(np.float32)
    return _digits_split(images, digits.target, "digits", binary=True)


@DATASETS.register("digits-grey")
@_image_shape((8, 8))
def _load_digits_grey(cache_dir: Path) -> Dataset:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return _digits_split((digits.data / 16.0).astype(np.float32), digits.target, "digits-grey", False)


# ---------------------------------------------------------------------------- binarized MNIST
_BMNIST_URL = "http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/"
_BMNIST_SHA256 = {
    "train": "ad693b29f94c14277b095f5238ddefbbdaaae0939789dd2f4f0205278cee3e4d",
    "valid": "1de3d397c40fe8eeb33dafd4099a1f665ec01e96d9be234aaeeac8a34930e2e2",
    "test": "e6687bfea3f820c174f33b7865140b2a2dd2930ef786f35d45795fc193b5ab2c",
}
_BMNIST_ROWS = {"train": 50000, "valid": 10000, "test": 10000}


def _read_text(path: Path) -> bytes:
    if path.suffix == ".gz":
        with gzip.open(path, "rb") as fh:
            return fh.read()
    return path.read_bytes()


def _verified(text: bytes, sha256: str, path: Path) -> bytes:
    digest = hashlib.sha256(text).hexdigest()
    if digest != sha256:
        raise ChecksumError(
            f"{path} is corrupt or not the expected file: SHA-256 of its text is {digest}, "
            f"expected {sha256}; delete it so that it is downloaded again"
        )
    return text


def _download(url: str, target: Path) -> None:
    """Download ``url`` to ``target`` atomically (temp file in the same folder + rename)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.name, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            while True:
                block = response.read(1 << 20)
                if not block:
                    break
                out.write(block)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _parse_amat(text: bytes, rows: int, path: Path) -> np.ndarray:
    """Parse the ``.amat`` text of binary pixels into a ``(rows, 784)`` uint8 array."""
    width = 784 * 2  # "v v ... v\n": one character and one separator per value
    if len(text) == rows * width:
        chars = np.frombuffer(text, dtype=np.uint8).reshape(rows, width)
        values = chars[:, 0::2] - ord("0")
        if np.all(chars[:, 1::2][:, :-1] == ord(" ")) and np.all(values <= 1):
            return values
    values = np.loadtxt(text.decode("ascii").splitlines(), dtype=np.float32)
    if values.shape != (rows, 784):
        raise UsageError(f"{path}: expected {rows} rows of 784 values, got {values.shape}")
    return values.astype(np.uint8)


def binarized_mnist_split(split: str, cache_dir: Path, download: bool = True) -> np.ndarray:
    """Load one split of binarized MNIST as a ``(N, 784)`` uint8 array.

    Looks for ``binarized_mnist_{split}.amat`` or ``.amat.gz`` under
    ``cache_dir/binarized_mnist/``; downloads the canonical ``.amat`` if neither exists.
    The text is checked against the published SHA-256 before parsing.
    """
    folder = Path(cache_dir) / "binarized_mnist"
    stem = f"binarized_mnist_{split}.amat"
    candidates = [folder / stem, folder / (stem + ".gz")]
    path = next((p for p in candidates if p.exists()), None)
    if path is None:
        url = _BMNIST_URL + stem
        if not download:
            raise DataUnavailableError(f"{candidates[0]} is missing and download=False")
        try:
            _download(url, candidates[0])
        except OSError as exc:
            raise DataUnavailableError(
                f"binarized MNIST {split} split is not in the cache ({folder}) and could not be "
                f"downloaded from {url} ({exc}). Download it on a connected machine and place "
                f"it at {candidates[0]} (or .amat.gz), or set {DATA_DIR_ENV} to a folder "
                "that holds binarized_mnist/"
            ) from exc
        path, downloaded = candidates[0], True
    else:
        downloaded = False
    try:
        text = _verified(_read_text(path), _BMNIST_SHA256[split], path)
    except ChecksumError:
        if downloaded:
            path.unlink()  # never leave a bad download in the cache
        raise
    return _parse_amat(text, _BMNIST_ROWS[split], path)


@DATASETS.register("binarized-mnist")
@_image_shape((28, 28))
def _load_binarized_mnist(cache_dir: Path) -> Dataset:
    arrays = {s: binarized_mnist_split(s, cache_dir) for s in SPLITS}
    tensors = {s: torch.from_numpy(a).to(torch.float32) for s, a in arrays.items()}
    return Dataset("binarized-mnist", image_shape=(28, 28), binary=True, **tensors)


# ---------------------------------------------------------------------------- MNIST-format (IDX) sets
#: IDX files: data set -> (mirrors, {file: (published MD5 of the .gz, published SHA-256 of the .gz)}).
#: MD5s as torchvision 0.29.1 (datasets/mnist.py) and the data sets' own pages publish them;
#: SHA-256s from TensorFlow Datasets' url_checksums.
IDX_SOURCES = {
    "mnist": (
        ["https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"],
        {
            "train-images-idx3-ubyte.gz": ("f68b3c2dcbeaaa9fbdd348bbdeb94873",
                                           "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"),
            "train-labels-idx1-ubyte.gz": ("d53e105ee54ea40749a09fcbcd1e9432",
                                           "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"),
            "t10k-images-idx3-ubyte.gz": ("9fb629c4189551a2d022fa330f9573f3",
                                          "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"),
            "t10k-labels-idx1-ubyte.gz": ("ec29112dd5afa0611ce80d1b7f02629c",
                                          "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"),
        },
    ),
    "fashion-mnist": (
        ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
        {
            "train-images-idx3-ubyte.gz": ("8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                                           "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84"),
            "train-labels-idx1-ubyte.gz": ("25c81989df183df01b3e8a0aad5dffbe",
                                           "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845"),
            "t10k-images-idx3-ubyte.gz": ("bef4ecab320f06d8554ea6380940ec79",
                                          "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073"),
            "t10k-labels-idx1-ubyte.gz": ("bb300cfdad3c16e7a12a480ee83cd310",
                                          "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5"),
        },
    ),
}


def _parse_idx(raw: bytes, path: Path) -> np.ndarray:
    """An IDX array (a big-endian header of magic number and sizes, then uint8 values)."""
    if len(raw) < 8 or raw[0] != 0 or raw[1] != 0 or raw[2] != 8:
        raise UsageError(f"{path} is not an IDX file of unsigned bytes")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    if len(raw) != offset + int(np.prod(dims)):
        raise UsageError(f"{path}: the IDX header says {dims}, but the file has {len(raw) - offset} values")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims)


def idx_file(name: str, file: str, cache_dir: Path, download: bool = True) -> np.ndarray:
    """One IDX file of a registered MNIST-format data set, from ``cache_dir/<name>/`` (downloaded
    from the published mirrors if missing), checked against its published MD5 and SHA-256."""
    mirrors, files = IDX_SOURCES[name]
    md5, sha256 = files[file]
    path = Path(cache_dir) / name / file
    downloaded = False
    if not path.exists():
        if not download:
            raise DataUnavailableError(f"{path} is missing and download=False")
        errors = []
        for mirror in mirrors:
            try:
                _download(mirror + file, path)
                downloaded = True
                break
            except OSError as exc:
                errors.append(f"{mirror}: {exc}")
        if not downloaded:
            raise DataUnavailableError(
                f"{name} file {file} is not in the cache ({path.parent}) and could not be downloaded "
                f"({'; '.join(errors)}). Download it on a connected machine and place it at {path}, or "
                f"set {DATA_DIR_ENV} to a folder that holds {name}/")
    packed = path.read_bytes()
    if hashlib.md5(packed).hexdigest() != md5 or hashlib.sha256(packed).hexdigest() != sha256:
        if downloaded:
            path.unlink()  # never leave a bad download in the cache
        raise ChecksumError(f"{path} is corrupt or not the published file (its MD5/SHA-256 differ from "
                            f"{md5} / {sha256[:16]}...); delete it so that it is downloaded again")
    return _parse_idx(gzip.decompress(packed), path)


def _idx_dataset(name: str, cache_dir: Path) -> Dataset:
    """The 60,000 training images split as in the VAE literature (VampPrior): the first 50,000 to
    train, the last 10,000 to validate; the 10,000 test images; grey levels in [0, 1]; labels."""
    images = {s: idx_file(name, f"{s}-images-idx3-ubyte.gz", cache_dir) for s in ("train", "t10k")}
    labels = {s: idx_file(name, f"{s}-labels-idx1-ubyte.gz", cache_dir) for s in ("train", "t10k")}
    x = {s: torch.from_numpy(a.reshape(a.shape[0], -1).astype(np.float32) / 255.0) for s, a in images.items()}
    y = {s: torch.from_numpy(a.astype(np.int64)) for s, a in labels.items()}
    n_train = x["train"].shape[0] - 10000
    return Dataset(name, train=x["train"][:n_train], valid=x["train"][n_train:], test=x["t10k"],
                   labels={"train": y["train"][:n_train], "valid": y["train"][n_train:], "test": y["t10k"]},
                   image_shape=(28, 28), binary=False)


@DATASETS.register("mnist")
@_image_shape((28, 28))
def _load_mnist(cache_dir: Path) -> Dataset:
    return _idx_dataset("mnist", cache_dir)


@DATASETS.register("fashion-mnist")
@_image_shape((28, 28))
def _load_fashion_mnist(cache_dir: Path) -> Dataset:
    return _idx_dataset("fashion-mnist", cache_dir)
