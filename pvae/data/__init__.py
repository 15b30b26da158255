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
  10,000, with labels. Option ``binarize`` (of these, ``omniglot`` and ``file``): ``"none"`` (grey
  levels), ``"threshold"`` (x > 0.5), ``"static"`` (one seeded Bernoulli draw of every split) or
  ``"dynamic"`` (see below).
* ``"dynamic-mnist"`` — dynamically binarized MNIST (Burda et al. 2016; Tomczak & Welling 2018):
  ``"mnist"`` with ``binarize="dynamic"``: every training minibatch is a fresh Bernoulli draw of
  the grey levels (:attr:`Dataset.dynamic_binarization`); validation and test are one fixed seeded
  draw each (NumPy ``RandomState`` seeds 2 and 3, stable across versions), so every run is scored on
  the same bits.
* ``"omniglot"`` — the 28x28 Omniglot of Burda et al. (2016) (``chardata.mat`` of the IWAE code):
  24,345 training images (a seeded 23,000 / 1,345 train/valid split, the VampPrior code's sizes)
  and 8,070 test images, alphabet labels; dynamically binarized by default.
* ``"caltech101-silhouettes"`` — Caltech-101 Silhouettes 28x28 (Marlin et al. 2010, split 1):
  4,100 / 2,264 / 2,307 binary images with class labels, the published split.
* ``"frey-faces"`` — Brendan Frey's 1,965 faces of 28x20 8-bit grey levels in [0, 1]; a seeded
  1,565 / 200 / 200 split. For ``gaussian``, ``continuous-bernoulli`` or ``discretized-logistic``.
* ``"cifar10"`` — CIFAR-10 (Krizhevsky 2009): 32x32 colour images as 8-bit values scaled to
  [0, 1] (channels first), 40,000 / 10,000 (the fifth training batch) / 10,000, labels. Scored in
  bits/dim under the ``discretized-logistic`` likelihood.
* ``"file"`` — your own data (:func:`pvae.files.load_file`).

The canonical addresses and published checksums are in :data:`REMOTES` (and
:data:`IDX_SOURCES`). Omniglot's and Frey Faces' files have no published checksum: they are
checked by their structure (keys, shapes, value range), their SHA-256 goes into the data set's
``source`` and the run's ``data.json``, and a run is only evaluated on data with the same
fingerprint.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import http.client
import os
import pickle
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Literal, Optional, Sequence, Tuple

import numpy as np
import torch

from pvae.errors import UsageError
from pvae.data.dataset import (  # noqa: F401  (re-exported: pvae.data.Dataset is public)
    BINARIZE_MODES,
    SPLITS,
    Binarize,
    Dataset,
    _binarize_option,
    binarized,
    fixed_binarization,
)
from pvae.data.files import load_file
from pvae.registry import Registry
from pvae.data.streaming import is_streamed

__all__ = [
    "DATASETS", "Dataset", "load_dataset", "data_dir", "fetch", "REMOTES", "Remote",
    "DataUnavailableError", "ChecksumError",
]

DATASETS: Registry = Registry("dataset", context=("cache_dir",), doc="""
Data sets by name (the module doc lists them, ``"file"`` reads your own); :func:`load_dataset`
loads one, ``DATASETS.options(name)`` lists its options.""")
DATA_DIR_ENV = "PVAE_DATA_DIR"


class DataUnavailableError(UsageError, FileNotFoundError):
    """A data file is missing from the cache and could not be downloaded."""


class ChecksumError(UsageError):
    """A data file's contents do not match the published checksum."""


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
    except BaseException:  # deliberately every exception (Ctrl-C too): remove the partial file, re-raise
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
    remote = Remote(name, file, tuple(mirror + file for mirror in mirrors), md5=md5, sha256=sha256)
    path, _ = _fetch(remote, cache_dir, download, name)
    packed = path.read_bytes()
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
def _load_mnist(cache_dir: Path, binarize: Binarize = "none") -> Dataset:
    """MNIST from the published IDX files.

    :param str binarize: none (grey levels in [0, 1]), threshold (x > 0.5), static (one fixed
        seeded Bernoulli draw of every split) or dynamic (a fresh draw of every training minibatch;
        fixed draws to validate and test).
    """
    return binarized(_idx_dataset("mnist", cache_dir), binarize)


@DATASETS.register("dynamic-mnist")
@_image_shape((28, 28))
def _load_dynamic_mnist(cache_dir: Path) -> Dataset:
    return dataclasses.replace(binarized(_idx_dataset("mnist", cache_dir), "dynamic"), name="dynamic-mnist")


@DATASETS.register("fashion-mnist")
@_image_shape((28, 28))
def _load_fashion_mnist(cache_dir: Path, binarize: Binarize = "none") -> Dataset:
    """Fashion-MNIST from the published IDX files.

    :param str binarize: none (grey levels in [0, 1]), threshold (x > 0.5), static (one fixed
        seeded Bernoulli draw of every split) or dynamic (a fresh draw of every training minibatch;
        fixed draws to validate and test).
    """
    return binarized(_idx_dataset("fashion-mnist", cache_dir), binarize)


# ---------------------------------------------------------------------------- other published files
@dataclass(frozen=True)
class Remote:
    """A published data file: its name in ``cache_dir/<folder>/``, its download addresses (tried
    in order) and its published checksums (None where the publisher gives none)."""

    folder: str
    file: str
    urls: Tuple[str, ...]
    md5: Optional[str] = None
    sha256: Optional[str] = None


#: data set -> its published file. Checksums: CIFAR-10's MD5 from its page (and torchvision), its
#: SHA-256 as Keras pins it; Caltech-101 Silhouettes' MD5 as dataset managers pin it. Omniglot's and
#: Frey Faces' files have none published (checked by structure; their SHA-256 is recorded per run).
REMOTES: Dict[str, Remote] = {
    "omniglot": Remote("omniglot", "chardata.mat", (
        "https://github.com/yburda/iwae/raw/master/datasets/OMNIGLOT/chardata.mat",
        "https://raw.githubusercontent.com/yburda/iwae/master/datasets/OMNIGLOT/chardata.mat")),
    "caltech101-silhouettes": Remote("caltech101_silhouettes", "caltech101_silhouettes_28_split1.mat", (
        "https://people.cs.umass.edu/~marlin/data/caltech101_silhouettes_28_split1.mat",),
        md5="4483e9c14b188fd09937f9ea6f9ea777"),
    "frey-faces": Remote("frey_faces", "frey_rawface.mat", (
        "https://cs.nyu.edu/~roweis/data/frey_rawface.mat",)),
    "cifar10": Remote("cifar10", "cifar-10-python.tar.gz", (
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",),
        md5="c58f30108f718f92721af3b95e74349a",
        sha256="6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"),
}


def _file_digests(path: Path) -> Tuple[str, str]:
    md5, sha = hashlib.md5(), hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            md5.update(block)
            sha.update(block)
    return md5.hexdigest(), sha.hexdigest()


def fetch(name: str, cache_dir: Path, download: bool = True) -> Tuple[Path, str]:
    """The published file of data set ``name`` (:data:`REMOTES`) from ``cache_dir/<folder>/``,
    downloaded from its addresses if missing, checked against its published checksums. Returns the
    path and the file's SHA-256. A bad download is deleted; a bad cached file is named."""
    return _fetch(REMOTES[name], cache_dir, download, name)


def _fetch(remote: "Remote", cache_dir: Path, download: bool, name: str) -> Tuple[Path, str]:
    path = Path(cache_dir) / remote.folder / remote.file
    downloaded = False
    if not path.exists():
        if not download:
            raise DataUnavailableError(f"{path} is missing and download=False")
        errors = []
        for url in remote.urls:
            try:
                _download(url, path)
                downloaded = True
                break
            except (OSError, http.client.HTTPException) as exc:  # (IncompleteRead is not an OSError)
                errors.append(f"{url}: {exc}")
        if not downloaded:
            raise DataUnavailableError(
                f"{name} file {remote.file} is not in the cache ({path.parent}) and could not be downloaded "
                f"({'; '.join(errors)}). Download it on a connected machine and place it at {path}, or set "
                f"{DATA_DIR_ENV} to a folder that holds {remote.folder}/")
    if downloaded:
        _DOWNLOADED.add(path)  # a structure error found while parsing it deletes it too
    md5, sha256 = _file_digests(path)
    if (remote.md5 and md5 != remote.md5) or (remote.sha256 and sha256 != remote.sha256):
        if downloaded:
            path.unlink()  # never leave a bad download in the cache
        published = " / ".join(c for c in (remote.md5, remote.sha256) if c)
        raise ChecksumError(f"{path} is corrupt or not the published file (its checksum differs from {published}); "
                            "delete it so that it is downloaded again")
    return path, sha256


#: files downloaded by this process (a file without a published checksum that fails its structure
#: check is then deleted, as a bad download of a checksummed file is)
_DOWNLOADED: set = set()


def _structure_error(path: Path, problem: str) -> UsageError:
    if path in _DOWNLOADED:
        _DOWNLOADED.discard(path)
        path.unlink(missing_ok=True)
        return ChecksumError(f"the file downloaded to {path} is not the published file: {problem}; it was deleted")
    return ChecksumError(f"{path} is not the published file: {problem}; delete it so that it is downloaded again")


def _loadmat(path: Path, keys: Sequence[str]) -> dict:
    from scipy.io import loadmat

    try:
        mat = loadmat(str(path))
    except Exception as exc:  # deliberately broad: a truncated download, an HTML page ... make scipy's
        # MATLAB reader raise almost any type (ValueError, TypeError, OSError, IndexError, KeyError,
        # zlib.error, MatReadError, NotImplementedError, ZeroDivisionError, UnboundLocalError were seen
        # on damaged files), and each means the same here: not the published file
        raise _structure_error(path, f"it cannot be read as a MATLAB file ({type(exc).__name__}: {exc})") from None
    missing = [k for k in keys if k not in mat]
    if missing:
        raise _structure_error(path, f"it lacks the arrays {missing}")
    return mat


def _check_array(path: Path, key: str, array: np.ndarray, shape: Tuple[int, ...], low=0.0, high=1.0) -> np.ndarray:
    if array.ndim != len(shape) or any(s is not None and a != s for a, s in zip(array.shape, shape)):
        raise _structure_error(path, f"its array {key!r} has shape {array.shape}, expected {shape}")
    if array.size and not (np.isfinite(array).all() and array.min() >= low and array.max() <= high):
        raise _structure_error(path, f"its array {key!r} has values outside [{low}, {high}]")
    return array


def _transposed_images(columns: np.ndarray, h: int, w: int) -> np.ndarray:
    """Images stored as columns in Fortran order (the MATLAB files of Omniglot and Caltech-101
    Silhouettes) as rows of row-major images: ``x.reshape(-1, h, w).reshape(-1, h*w, order='F')``
    as the IWAE and VampPrior code read them."""
    return np.ascontiguousarray(columns.reshape(-1, h, w).transpose(0, 2, 1).reshape(-1, h * w))


def _tensors(**arrays) -> dict:
    return {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in arrays.items()}


def _source(name: str, path: Path, sha256: str) -> dict:
    remote = REMOTES[name]
    return {"benchmark": name, "file": remote.file, "url": remote.urls[0], "sha256": sha256,
            "published_checksum": bool(remote.md5 or remote.sha256)}


@DATASETS.register("omniglot")
@_image_shape((28, 28))
def _load_omniglot(cache_dir: Path, binarize: Binarize = "dynamic") -> Dataset:
    """Omniglot 28x28 as in Burda et al. (2016).

    :param str binarize: dynamic (the papers' protocol), static, threshold or none (grey levels).
    """
    binarize = _binarize_option(binarize)
    path, sha256 = fetch("omniglot", cache_dir)
    mat = _loadmat(path, ("data", "testdata", "target", "testtarget"))
    train = _check_array(path, "data", mat["data"], (784, None)).T
    test = _check_array(path, "testdata", mat["testdata"], (784, None)).T
    train, test = _transposed_images(train, 28, 28), _transposed_images(test, 28, 28)
    labels_train = _check_array(path, "target", mat["target"], (None, train.shape[0])).argmax(0)
    labels_test = _check_array(path, "testtarget", mat["testtarget"], (None, test.shape[0])).argmax(0)
    n_valid = 1345 if train.shape[0] > 2 * 1345 else max(1, train.shape[0] // 10)
    perm = np.random.RandomState(0).permutation(train.shape[0])
    tr, va = perm[:-n_valid], perm[-n_valid:]
    data = Dataset("omniglot", **_tensors(train=train[tr], valid=train[va], test=test),
                   labels={"train": torch.from_numpy(labels_train[tr].astype(np.int64)),
                           "valid": torch.from_numpy(labels_train[va].astype(np.int64)),
                           "test": torch.from_numpy(labels_test.astype(np.int64))},
                   image_shape=(28, 28), source=_source("omniglot", path, sha256))
    return binarized(data, binarize)


@DATASETS.register("caltech101-silhouettes")
@_image_shape((28, 28))
def _load_caltech_silhouettes(cache_dir: Path) -> Dataset:
    path, sha256 = fetch("caltech101-silhouettes", cache_dir)
    keys = [f"{s}_{k}" for s in ("train", "val", "test") for k in ("data", "labels")]
    mat = _loadmat(path, keys)
    splits, labels = {}, {}
    for ours, theirs in (("train", "train"), ("valid", "val"), ("test", "test")):
        x = _check_array(path, f"{theirs}_data", mat[f"{theirs}_data"], (None, 784))
        if not np.isin(x, (0, 1)).all():
            raise _structure_error(path, f"its array '{theirs}_data' is not binary")
        # as the VampPrior code reads it: Fortran-ordered images, the silhouette as ones
        splits[ours] = 1.0 - _transposed_images(x, 28, 28)
        y = np.asarray(mat[f"{theirs}_labels"]).reshape(-1)
        if y.shape[0] != x.shape[0]:
            raise _structure_error(path, f"'{theirs}_labels' has {y.shape[0]} labels for {x.shape[0]} images")
        labels[ours] = torch.from_numpy(y.astype(np.int64) - 1)  # classes 1..101 -> 0..100
    return Dataset("caltech101-silhouettes", **_tensors(**splits), labels=labels, image_shape=(28, 28),
                   binary=True, source=_source("caltech101-silhouettes", path, sha256))


@DATASETS.register("frey-faces")
@_image_shape((28, 20))
def _load_frey_faces(cache_dir: Path) -> Dataset:
    path, sha256 = fetch("frey-faces", cache_dir)
    ff = _loadmat(path, ("ff",))["ff"]
    if ff.dtype != np.uint8:
        raise _structure_error(path, f"its array 'ff' has dtype {ff.dtype}, expected 8-bit grey levels")
    images = _check_array(path, "ff", ff, (560, None), high=255).T.astype(np.float32) / 255.0
    n = images.shape[0]
    n_hold = 200 if n > 600 else max(1, n // 10)
    perm = np.random.RandomState(0).permutation(n)
    parts = {"test": perm[:n_hold], "valid": perm[n_hold:2 * n_hold], "train": perm[2 * n_hold:]}
    return Dataset("frey-faces", **_tensors(**{k: images[v] for k, v in parts.items()}), image_shape=(28, 20),
                   source=_source("frey-faces", path, sha256))


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles NumPy arrays, lists, dicts and strings only (CIFAR-10's batches): a file that
    passed its checksum cannot run code, and one that did not is never opened."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")
        return super().find_class(module, name)


@DATASETS.register("cifar10")
@_image_shape((3, 32, 32))
def _load_cifar10(cache_dir: Path) -> Dataset:
    path, sha256 = fetch("cifar10", cache_dir)
    batches = {}
    try:
        with tarfile.open(path, "r:gz") as tar:
            for member in tar.getmembers():
                base = member.name.rsplit("/", 1)[-1]
                if member.isfile() and (base.startswith("data_batch_") or base == "test_batch"):
                    batch = _ArrayUnpickler(tar.extractfile(member), encoding="bytes").load()
                    batches[base] = (np.asarray(batch[b"data"], dtype=np.uint8),
                                     np.asarray(batch[b"labels"], dtype=np.int64))
    except (tarfile.TarError, pickle.UnpicklingError, KeyError, EOFError, OSError) as exc:
        raise _structure_error(path, f"it cannot be read as CIFAR-10's archive ({type(exc).__name__}: {exc})") from None
    expected = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    if sorted(batches) != sorted(expected):
        raise _structure_error(path, f"it holds the batches {sorted(batches)}, expected {expected}")
    for key, (x, y) in batches.items():
        if x.ndim != 2 or x.shape[1] != 3072 or y.shape[0] != x.shape[0]:
            raise _structure_error(path, f"its batch {key} has images {x.shape} and labels {y.shape}")

    def join(keys):
        return (np.concatenate([batches[k][0] for k in keys]).astype(np.float32) / 255.0,
                torch.from_numpy(np.concatenate([batches[k][1] for k in keys])))

    (train, y_train), (valid, y_valid), (test, y_test) = (
        join(expected[:4]), join(expected[4:5]), join(expected[5:]))
    return Dataset("cifar10", **_tensors(train=train, valid=valid, test=test),
                   labels={"train": y_train, "valid": y_valid, "test": y_test}, image_shape=(3, 32, 32),
                   source=_source("cifar10", path, sha256))
