"""A user's own data: one file or a folder of images, as a :class:`~pvae.data.Dataset`.

Formats (by suffix): ``.npy`` (one array), ``.npz`` (arrays ``train``/``valid``/``test``, or one
array; labels as ``<split>_labels`` or ``labels``), ``.pt`` (a tensor, or a dict like ``.npz``),
``.csv``/``.tsv`` (numeric columns, an optional header row, an optional label column), and a
folder of PNG/JPEG/BMP images (greyscale or colour; in class subfolders, the folder names are
the labels); :data:`ARRAY_SUFFIXES` and :data:`IMAGE_SUFFIXES` list the suffixes read. Arrays of
shape ``(N, H, W)``, ``(N, H, W, C)`` or ``(N, C, H, W)`` are images: their shape is inferred and
kept for conv nets and image figures; 8-bit images are scaled to [0, 1].
Without splits in the file, a seeded random split (``split`` fractions, ``split_seed``) is made.

The data set records its source (path, size, SHA-256 of the file or of the folder's files, how
it was split), so that a run is evaluated on exactly the data it was trained on and a file that
changed since is refused. Bad data are refused before anything is written, naming the rows or
files at fault.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import math
import os
import tokenize
import zipfile
import zlib
from pathlib import Path
from typing import Dict, List, Literal, Optional, Tuple

import numpy as np
import torch

from pvae.checkpoint import TORCH_LOAD_ERRORS
from pvae.data.dataset import Dataset, _binarize_option, binarized
from pvae.errors import UsageError, rows_phrase

__all__ = ["load_file", "write_examples", "file_sha256", "DataFileError", "ARRAY_SUFFIXES", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff")
ARRAY_SUFFIXES = (".npy", ".npz", ".pt", ".csv", ".tsv")
_SPLIT_ALIASES = {"train": ("train",), "valid": ("valid", "validation", "val"), "test": ("test",)}

# What each reader raises for a file it cannot use (besides OSError: missing, no permission, a
# folder): found by reading files of each format truncated, bit-flipped, with bytes inserted or
# deleted. NumPy parses the .npy header as a Python literal; an .npz is a zip archive of .npy files.
_NPY_ERRORS = (OSError, EOFError, ValueError, TypeError, SyntaxError, tokenize.TokenError)
_READ_ERRORS = {
    ".npy": _NPY_ERRORS,
    ".npz": (*_NPY_ERRORS, zipfile.BadZipFile, zlib.error, NotImplementedError, RuntimeError),
    ".pt": (OSError, *TORCH_LOAD_ERRORS),
    ".csv": (OSError, UnicodeDecodeError, csv.Error),
    ".tsv": (OSError, UnicodeDecodeError, csv.Error),
}


def _image_errors() -> tuple:
    """What Pillow raises for an image file it cannot decode: OSError (UnidentifiedImageError,
    truncated or broken data streams), SyntaxError and ValueError (malformed chunks and headers),
    and DecompressionBombError (absurd declared sizes)."""
    from PIL import Image

    return (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class DataFileError(UsageError):
    """A data file that cannot be used as it is; the message names the file and the fix."""


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, or of a folder's files (relative names and bytes, sorted)."""
    h = hashlib.sha256()
    if path.is_dir():
        for p in sorted(q for q in path.rglob("*") if q.is_file()):
            h.update(str(p.relative_to(path)).encode() + b"\0")
            h.update(hashlib.sha256(p.read_bytes()).digest())
    else:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(q.stat().st_size for q in path.rglob("*") if q.is_file())
    return path.stat().st_size


# ------------------------------------------------------------------------------ readers
def _named_arrays(mapping, path) -> Dict[str, np.ndarray]:
    """train/valid/test (+ labels) from a mapping of arrays, or {"all": the one array}."""
    keys = list(mapping.keys())
    out = {}
    for split, aliases in _SPLIT_ALIASES.items():
        for alias in aliases:
            if alias in mapping:
                out[split] = np.asarray(mapping[alias])
                for label_key in (f"{alias}_labels", f"{alias}_y", f"y_{alias}"):
                    if label_key in mapping:
                        out[f"{split}_labels"] = np.asarray(mapping[label_key])
                break
    if out:
        missing = [s for s in _SPLIT_ALIASES if s not in out]
        if missing:
            raise DataFileError(f"{path} names the splits {sorted(k for k in out if '_' not in k)} but not "
                                f"{missing}; give all of train, valid and test, or one array to be split")
        return out
    arrays = [k for k in keys if k not in ("labels", "y")]
    if len(arrays) != 1:
        raise DataFileError(f"{path} holds arrays {keys}; name them train/valid/test (with optional "
                            "<split>_labels), or store one array (and optionally 'labels')")
    out = {"all": np.asarray(mapping[arrays[0]])}
    for label_key in ("labels", "y"):
        if label_key in mapping:
            out["all_labels"] = np.asarray(mapping[label_key])
    return out


def _read_csv(path: Path, label_column: Optional[str], covariate_columns=()) -> Dict[str, np.ndarray]:
    """A numeric table, an optional header and one optional label column. Every error names
    the file's *line* (counted from 1, as an editor shows it, blank lines included) and the
    column (by its header name where there is one, else its number counted from 1)."""
    delimiter = "\t" if path.suffix == ".tsv" else ","
    with open(path, newline="") as fh:
        reader = csv.reader(fh, delimiter=delimiter)
        numbered = []  # (line where the row starts, cells); blank lines are skipped, not renumbered
        line = 1
        for row in reader:
            if row and any(c.strip() for c in row):
                numbered.append((line, row))
            line = reader.line_num + 1
    if not numbered:
        raise DataFileError(f"{path} holds no rows")

    def numeric(cell):
        try:
            float(cell)
            return True
        except ValueError:
            return False

    header = None
    if not all(numeric(c) for c in numbered[0][1]):
        header, numbered = [c.strip() for c in numbered[0][1]], numbered[1:]
        if not numbered:
            raise DataFileError(f"{path} holds a header ({', '.join(header)}) but no rows")
    width = len(header) if header else len(numbered[0][1])
    for line, row in numbered:
        if len(row) != width:
            raise DataFileError(f"{path}: line {line} has {len(row)} columns, expected {width} "
                                "(ragged rows); fix the file so that every row has the same columns")

    def column(j):
        return f"column {header[j]!r}" if header and header[j] else f"column {j + 1}"

    def index_of(name, what):
        if header and name in header:
            return header.index(name)
        if name.lstrip("-").isdigit() and -width <= int(name) < width:
            return int(name) % width
        raise DataFileError(f"{path}: no {what} {name!r}"
                            + (f"; columns: {', '.join(header)}" if header else " (the file has no header; give a column index)"))

    label_index = None if label_column is None else index_of(label_column, "label column")
    covariate_index = [index_of(str(c), "covariate column") for c in covariate_columns]
    if label_index is not None and label_index in covariate_index:
        raise DataFileError(f"{path}: {column(label_index)} is both the label column and a covariate column")
    kept = [j for j in range(width) if j != label_index and j not in covariate_index]
    if not kept:
        raise DataFileError(f"{path}: no column is left to model once the label and covariate columns are set apart")
    values, labels = [], []
    for line, row in numbered:
        numbers = []
        for j in kept + covariate_index:
            cell = row[j]
            try:
                number = float(cell)
            except ValueError:
                if not cell.strip():
                    raise DataFileError(f"{path}: line {line}, {column(j)} is empty (a missing value); fill it "
                                        "in or drop the row: pvae models complete rows only") from None
                hint = (f"; if {column(j)} holds labels, pass --label-column {header[j] if header else j}"
                        if label_index is None else "")
                raise DataFileError(f"{path}: line {line}, {column(j)} holds the non-numeric value {cell!r}; only "
                                    f"numeric columns (and one --label-column) can be modelled{hint}") from None
            if not math.isfinite(number):
                raise DataFileError(f"{path}: line {line}, {column(j)} holds {cell.strip()!r} (not a finite "
                                    "number); fill it in or drop the row: pvae models complete rows only")
            numbers.append(number)
        values.append(numbers)
        if label_index is not None:
            label = row[label_index].strip()
            if not label:
                raise DataFileError(f"{path}: line {line}, label {column(label_index)} is empty; every row "
                                    "needs a label (or leave --label-column out)")
            labels.append(label)
    table = np.asarray(values, dtype=np.float64).reshape(len(values), len(kept) + len(covariate_index))
    out = {"all": table[:, : len(kept)]}
    if covariate_index:
        out["all_covariates"] = table[:, len(kept):]
        out["covariate_names"] = np.asarray([header[j] if header else str(j) for j in covariate_index], dtype=object)
    if labels:
        names = _label_order(set(labels))
        out["all_labels"] = np.asarray([names.index(v) for v in labels])
        out["label_names"] = np.asarray(names, dtype=object)
    return out


def _label_order(names) -> List[str]:
    """Label values in a stable order: numerically when they are all integers, else as text."""
    names = list(names)
    if all(n.lstrip("-").isdigit() for n in names):
        return sorted(names, key=int)
    return sorted(names)


def _read_images(folder: Path, image_size: Optional[Tuple[int, ...]]) -> Dict[str, np.ndarray]:
    from PIL import Image

    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataFileError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    images = []
    for p in files:
        try:
            with Image.open(p) as im:
                im.load()
                images.append(im.copy())
        except _image_errors() as exc:  # PIL raises several kinds for a damaged or foreign file
            raise DataFileError(f"{p} is not a readable image ({type(exc).__name__}: {exc}); "
                                "remove or replace it") from None
    colour = any(im.mode not in ("1", "L", "LA", "I", "I;16", "F") for im in images)
    mode = "RGB" if colour else "L"
    if image_size is not None:
        if len(image_size) != 2:
            raise DataFileError(f"image_size must be height,width, got {image_size}")
        size = (int(image_size[1]), int(image_size[0]))  # PIL takes (width, height)
        images = [im.convert(mode).resize(size, Image.BILINEAR) for im in images]
    else:
        images = [im.convert(mode) for im in images]
        first = images[0].size
        for p, im in zip(files, images):
            if im.size != first:
                raise DataFileError(f"{p} is {im.size[0]}x{im.size[1]} but {files[0].name} is {first[0]}x{first[1]}; "
                                    "give --image-size H,W to resize them all")
    array = np.stack([np.asarray(im) for im in images])  # (N, H, W) or (N, H, W, 3), uint8
    out = {"all": array}
    classes = sorted({p.parent.relative_to(folder).parts[0] for p in files if p.parent != folder})
    if classes and all(p.parent != folder for p in files):
        out["all_labels"] = np.asarray([classes.index(p.relative_to(folder).parts[0]) for p in files])
        out["label_names"] = np.asarray(classes, dtype=object)  # the class folders' names
    return out


def _read(path: Path, label_column: Optional[str], image_size, covariate_columns=()) -> Dict[str, np.ndarray]:
    suffix = path.suffix.lower()
    if covariate_columns and (path.is_dir() or suffix not in (".csv", ".tsv")):
        raise DataFileError(f"{path}: covariate columns are read from tables (.csv or .tsv); this is "
                            + ("a folder of images" if path.is_dir() else f"a {suffix} file"))
    if path.is_dir():
        return _read_images(path, image_size)
    if suffix not in _READ_ERRORS:
        raise DataFileError(f"{path}: unknown data format {suffix!r}; use one of {', '.join(ARRAY_SUFFIXES)} "
                            "or a folder of images")
    stored = None
    try:  # the readers only: what they raise for a damaged or foreign file is named as such
        if suffix == ".npy":
            return {"all": np.load(path, allow_pickle=False)}
        if suffix in (".csv", ".tsv"):
            return _read_csv(path, label_column, covariate_columns)
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                stored = {k: npz[k] for k in npz.files}
        else:  # .pt (tensors of a dtype NumPy lacks, such as bfloat16, raise a TypeError in .numpy())
            obj = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(obj, torch.Tensor):
                return {"all": obj.numpy()}
            if isinstance(obj, dict):
                stored = {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in obj.items()}
    except _READ_ERRORS[suffix] as exc:
        raise DataFileError(f"{path} could not be read as {suffix} ({type(exc).__name__}: {exc})") from None
    if stored is None:
        raise DataFileError(f"{path} holds a {type(obj).__name__}; store a tensor or a dict of tensors")
    return _named_arrays(stored, path)


# ------------------------------------------------------------------------------ shaping
def _layout(array_shape, path, image_shape) -> Tuple[Optional[Tuple[int, ...]], bool, int]:
    """For an array of ``array_shape``: its image shape ``(H, W)`` or ``(C, H, W)`` (or None),
    whether it stores channels last (``(N, H, W, C)``), and the values per datapoint."""
    if len(array_shape) == 0 or array_shape[0] == 0:
        raise DataFileError(f"{path} holds no datapoints (shape {tuple(array_shape)})")
    shape, channels_last = None, False
    if len(array_shape) == 3:
        shape = tuple(array_shape[1:])
    elif len(array_shape) == 4:
        channels_last = array_shape[-1] in (1, 3, 4) and array_shape[1] not in (1, 3, 4)  # (N, H, W, C)
        shape = (array_shape[3], *array_shape[1:3]) if channels_last else tuple(array_shape[1:])
        if shape[0] == 1:
            shape = shape[1:]
    elif len(array_shape) != 2:
        raise DataFileError(f"{path}: arrays of shape {tuple(array_shape)} are not supported; use (N, D), "
                            "(N, H, W), (N, H, W, C) or (N, C, H, W)")
    dim = math.prod(array_shape[1:])
    if image_shape is not None:
        if math.prod(image_shape) != dim:
            raise DataFileError(f"image_shape {tuple(image_shape)} has {math.prod(image_shape)} pixels but "
                                f"the data have {dim} values per row")
        shape = tuple(int(s) for s in image_shape)
    return shape, channels_last, dim


def _rows(array: np.ndarray, channels_last: bool) -> np.ndarray:
    """Datapoints as flat rows (channels first for images)."""
    if channels_last:
        array = np.moveaxis(array, -1, 1)
    return array.reshape(array.shape[0], -1)


def _as_images(array: np.ndarray, path, image_shape) -> Tuple[np.ndarray, Optional[Tuple[int, ...]]]:
    """Flatten to ``(N, D)``; return the image shape ``(H, W)`` or ``(C, H, W)`` when there is one."""
    shape, channels_last, _ = _layout(array.shape, path, image_shape)
    return _rows(array, channels_last), shape


def _eight_bit(dtype, is_image: bool, low, high) -> bool:
    """Whether values of ``dtype`` ranging over ``low..high`` are 8-bit images to scale by 1/255."""
    if dtype == np.bool_:
        return False
    if not np.issubdtype(dtype, np.number):
        raise DataFileError(f"data of dtype {dtype} are not numeric")
    if np.issubdtype(dtype, np.integer) and is_image and high is not None and high > 1:
        if low < 0 or high > 255:
            raise DataFileError(f"integer images must hold 0..255 (8-bit), got {low}..{high}")
        return True
    return False


def _as_float(array: np.ndarray, eight_bit: bool) -> np.ndarray:
    """The one conversion of stored values (in memory and streamed alike)."""
    if eight_bit:
        return array.astype(np.float32) / 255.0  # 8-bit images: [0, 1]
    return array.astype(np.float32)


def _to_float(array: np.ndarray, is_image: bool) -> np.ndarray:
    low, high = (array.min(), array.max()) if array.size else (None, None)
    return _as_float(array, _eight_bit(array.dtype, is_image, low, high))


def _check_finite(array: np.ndarray, path, split: str) -> None:
    bad = ~np.isfinite(array).all(axis=1)
    if bad.any():
        rows = np.flatnonzero(bad)
        raise DataFileError(f"{path}: {split} has NaN or infinite values in {rows_phrase(rows)}; "
                            "clean or drop those rows")


def _split(n: int, fractions, seed: int, path) -> Dict[str, np.ndarray]:
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
        raise DataFileError(f"split must be three fractions train,valid,test that add up to 1, got {fractions}")
    counts = [int(round(f * n)) for f in fractions[:2]]
    counts.append(n - sum(counts))
    empty = [name for name, c in zip(_SPLIT_ALIASES, counts) if c < 1]
    if empty:
        raise DataFileError(f"{path}: {n} datapoints split {fractions} leave the {', '.join(empty)} split empty; "
                            "give more data or other fractions")
    order = np.random.RandomState(seed).permutation(n)
    bounds = np.cumsum([0] + counts)
    return {name: order[bounds[i]:bounds[i + 1]] for i, name in enumerate(_SPLIT_ALIASES)}


def load_file(
    path: str = "",
    split: Tuple[float, ...] = (0.8, 0.1, 0.1),
    split_seed: int = 0,
    image_size: Optional[Tuple[int, ...]] = None,
    image_shape: Optional[Tuple[int, ...]] = None,
    label_column: Optional[str] = None,
    binarize: Literal["none", "threshold", "static", "dynamic"] = "none",
    stream: Literal["auto", "never", "always"] = "auto",
    standardize: Literal["auto", "on", "off"] = "auto",
    covariate_columns: Tuple[str, ...] = (),
):
    """Read a data file or image folder into a :class:`~pvae.data.Dataset` (see the module doc).

    :param str path: a .npy, .npz, .pt, .csv or .tsv file, or a folder of images.
    :param split: train,valid,test fractions for data without splits in the file.
    :param int split_seed: seed of that split's random permutation.
    :param image_size: resize a folder's images to height,width (default: they must all be the same size).
    :param image_shape: the image shape of flat rows (e.g. 28,28 for 784 columns), for conv nets and figures.
    :param label_column: a CSV column (name or index) holding labels rather than data.
    :param str binarize: for a Bernoulli likelihood: threshold (x > 0.5), static (one seeded
        Bernoulli draw of values in [0, 1]) or dynamic (a fresh draw of every training minibatch).
    :param str stream: read a .npy file or an image folder on demand instead of into memory:
        auto (when the data would exceed the memory budget, $PVAE_MEMORY_BUDGET_GB or a quarter of
        the machine's memory), never, or always.
    :param str standardize: shift and scale every column by the training split's mean and standard
        deviation (:meth:`~pvae.data.Dataset.standardized`; the statistics are recorded in the run
        and applied to every split and to data evaluated later): on, off, or auto (a run decides:
        on for a CSV/TSV table under a Gaussian likelihood, whose single noise scale cannot fit
        columns in different units; off when the file is loaded on its own).
    :param covariate_columns: CSV/TSV columns (names or indices) read as covariates, not modelled:
        what a conditional VAE conditions on (``--model cvae --condition COLUMN,...`` sets them).
        They are standardized with the data when standardize is on.
    """

    if not path:
        raise UsageError("data set 'file' needs a path (pvae train --data PATH)")
    path = Path(os.path.expanduser(str(path))).resolve()
    if not path.exists():
        raise DataFileError(f"data file {path} does not exist")
    if stream not in ("auto", "never", "always"):
        raise UsageError(f"unknown stream mode {stream!r}; valid choices: auto, never, always")
    if standardize not in ("auto", "on", "off"):
        raise UsageError(f"unknown standardize mode {standardize!r}; valid choices: auto, on, off")
    if standardize == "on" and _binarize_option(binarize) != "none":
        raise UsageError("standardize and binarize exclude each other: standardized columns are not in [0, 1]")
    if _should_stream(path, stream, image_size):
        if standardize == "on":
            raise UsageError(f"{path} is read on demand (bigger than memory); standardize is not supported for "
                             "streamed data: standardize the file before, or pass --dataset-stream never")
        return _load_streamed(path, split, split_seed, image_size, image_shape, binarize)
    covariate_columns = tuple(str(c) for c in covariate_columns)
    if covariate_columns and _should_stream(path, stream, image_size):
        raise UsageError(f"{path}: covariate columns need the table in memory; pass --dataset-stream never")
    arrays = _read(path, label_column, image_size, covariate_columns)
    labels, covariates = None, None
    if "all" in arrays:
        flat, shape = _as_images(arrays["all"], path, image_shape)
        flat = _to_float(flat, shape is not None)
        _check_finite(flat, path, "the data")
        parts = _split(flat.shape[0], split, split_seed, path)
        tensors = {name: torch.from_numpy(np.ascontiguousarray(flat[idx])) for name, idx in parts.items()}
        if "all_covariates" in arrays:
            cov = arrays["all_covariates"].astype(np.float32)
            covariates = {name: torch.from_numpy(np.ascontiguousarray(cov[idx])) for name, idx in parts.items()}
        if "all_labels" in arrays:
            lab = np.asarray(arrays["all_labels"]).reshape(-1)
            if lab.shape[0] != flat.shape[0]:
                raise DataFileError(f"{path}: {lab.shape[0]} labels for {flat.shape[0]} datapoints")
            labels = {name: torch.as_tensor(lab[idx].astype(np.int64)) for name, idx in parts.items()}
        how = {"split": list(split), "split_seed": int(split_seed)}
    else:
        tensors, shape, labels = {}, None, {}
        for name in _SPLIT_ALIASES:
            flat, shape_s = _as_images(arrays[name], f"{path} [{name}]", image_shape)
            if shape is not None and shape_s != shape or tensors and flat.shape[1] != next(iter(tensors.values())).shape[1]:
                raise DataFileError(f"{path}: the splits have different shapes; every split needs the same columns")
            shape = shape_s
            flat = _to_float(flat, shape is not None)
            _check_finite(flat, path, f"split {name!r}")
            tensors[name] = torch.from_numpy(np.ascontiguousarray(flat))
            if f"{name}_labels" in arrays:
                lab = np.asarray(arrays[f"{name}_labels"]).reshape(-1)
                if lab.shape[0] != flat.shape[0]:
                    raise DataFileError(f"{path}: {lab.shape[0]} {name} labels for {flat.shape[0]} {name} datapoints")
                labels[name] = torch.as_tensor(lab.astype(np.int64))
        labels = labels or None
        how = {"split": "from the file"}
    binarize = _binarize_option(binarize)
    binary = all(bool(((t == 0) | (t == 1)).all()) for t in tensors.values())
    source = {"path": str(path), "bytes": _size(path), "sha256": file_sha256(path), **how,
              "binarize": binarize, "image_shape": list(shape) if shape else None}
    names = tuple(str(n) for n in arrays["label_names"]) if "label_names" in arrays and labels else None
    covariate_names = tuple(str(n) for n in arrays["covariate_names"]) if covariates else None
    data = Dataset(path.name, labels=labels, image_shape=shape, binary=binary, source=source, label_names=names,
                   covariates=covariates, covariate_names=covariate_names, **tensors)
    data = binarized(data, binarize)
    return data.standardized() if standardize == "on" else data


# ------------------------------------------------------------------------------ streaming
def _image_files(folder: Path) -> List[Path]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataFileError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def _folder_labels(folder: Path, files: List[Path]) -> Optional[np.ndarray]:
    classes = sorted({p.parent.relative_to(folder).parts[0] for p in files if p.parent != folder})
    if classes and all(p.parent != folder for p in files):
        return np.asarray([classes.index(p.relative_to(folder).parts[0]) for p in files])
    return None


def _should_stream(path: Path, stream: str, image_size) -> bool:
    from pvae.data.streaming import memory_budget_bytes

    streamable = path.is_dir() or path.suffix.lower() == ".npy"
    if stream == "never":
        return False
    if stream == "always":
        if not streamable:
            raise DataFileError(f"{path}: only .npy files and folders of images can be streamed; save the "
                                "array with numpy.save(...) to stream it")
        return True
    if not streamable:
        return False
    if path.is_dir():
        from PIL import Image

        files = _image_files(path)
        try:
            with Image.open(files[0]) as im:
                w, h = im.size
                channels = 1 if im.mode in ("1", "L", "LA", "I", "I;16", "F") else 3
        except _image_errors():
            return False  # the in-memory reader names the unreadable file
        if image_size is not None and len(image_size) == 2:
            h, w = int(image_size[0]), int(image_size[1])
        values = len(files) * h * w * channels
    else:
        try:
            values = math.prod(np.load(path, mmap_mode="r", allow_pickle=False).shape)
        except _NPY_ERRORS:
            return False  # the in-memory reader names the problem
    return 4 * values > memory_budget_bytes()


def _load_streamed(path: Path, split, split_seed, image_size, image_shape, binarize):
    """A data set whose splits are :class:`~pvae.streaming.StreamedSplit` views of the file: one
    pass checks every row (NaN/inf rows named, value range, unreadable images) without keeping
    it; the rows are then read, and converted exactly as in memory, as they are used."""
    from pvae.data.streaming import ImageFolderSource, MemmapSource, StreamedSplit

    if _binarize_option(binarize) != "none":
        raise DataFileError(f"{path}: binarize={binarize!r} is not available for streamed data; binarize the "
                            "file beforehand, or load it in memory (stream='never')")
    chunk = 4096
    labels_all = None
    if path.is_dir():
        from PIL import Image

        files = _image_files(path)
        modes, sizes = [], []
        for p in files:
            try:
                with Image.open(p) as im:
                    modes.append(im.mode)
                    sizes.append(im.size)
            except _image_errors() as exc:
                raise DataFileError(f"{p} is not a readable image ({type(exc).__name__}: {exc}); "
                                    "remove or replace it") from None
        mode = "RGB" if any(m not in ("1", "L", "LA", "I", "I;16", "F") for m in modes) else "L"
        if image_size is not None:
            if len(image_size) != 2:
                raise DataFileError(f"image_size must be height,width, got {image_size}")
            size = (int(image_size[1]), int(image_size[0]))
        else:
            size = None
            for p, s in zip(files, sizes):
                if s != sizes[0]:
                    raise DataFileError(f"{p} is {s[0]}x{s[1]} but {files[0].name} is {sizes[0][0]}x{sizes[0][1]}; "
                                        "give --image-size H,W to resize them all")
        w, h = size or sizes[0]
        array_shape = (len(files), h, w, 3) if mode == "RGB" else (len(files), h, w)
        shape, channels_last, dim = _layout(array_shape, path, image_shape)
        probe = ImageFolderSource(files, mode, size, lambda a: a)
        low, high = 255, 0
        for start in range(0, len(files), 256):  # every image decodes (a damaged one is named now)
            for i in range(start, min(start + 256, len(files))):
                try:
                    img = probe.decode(i)
                except _image_errors() as exc:
                    raise DataFileError(f"{files[i]} is not a readable image ({type(exc).__name__}: {exc}); "
                                        "remove or replace it") from None
                low, high = min(low, int(img.min())), max(high, int(img.max()))
        eight_bit = _eight_bit(np.dtype(np.uint8), True, low, high)
        source = ImageFolderSource(files, mode, size, functools.partial(_stored_to_float, channels_last=channels_last,
                                                                         eight_bit=eight_bit))
        labels_all = _folder_labels(path, files)
    else:
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except _NPY_ERRORS as exc:  # truncated, object arrays, not an .npy
            raise DataFileError(f"{path} could not be read as .npy ({type(exc).__name__}: {exc})") from None
        shape, channels_last, dim = _layout(array.shape, path, image_shape)
        low = high = None
        bad_rows = []
        for start in range(0, array.shape[0], chunk):
            block = _rows(np.asarray(array[start:start + chunk]), channels_last)
            if not np.issubdtype(block.dtype, np.number) and block.dtype != np.bool_:
                raise DataFileError(f"data of dtype {block.dtype} are not numeric")
            if np.issubdtype(block.dtype, np.floating):  # as the model will see them: in float32
                with np.errstate(over="ignore"):
                    finite = np.isfinite(block.astype(np.float32)).all(axis=1)
                bad_rows.extend((start + np.flatnonzero(~finite)).tolist())
            if block.size and block.dtype != np.bool_:
                lo, hi = block.min(), block.max()
                low = lo if low is None else min(low, lo)
                high = hi if high is None else max(high, hi)
        if bad_rows:
            raise DataFileError(f"{path}: the data has NaN or infinite values in {rows_phrase(bad_rows)}; "
                                "clean or drop those rows")
        eight_bit = _eight_bit(array.dtype, shape is not None, low, high)
        source = MemmapSource(path, functools.partial(_stored_to_float, channels_last=channels_last,
                                                      eight_bit=eight_bit))
    n = len(source)
    parts = _split(n, split, split_seed, path)
    tensors = {name: StreamedSplit(source, idx, dim) for name, idx in parts.items()}
    labels = None
    if labels_all is not None:
        labels = {name: torch.as_tensor(labels_all[idx].astype(np.int64)) for name, idx in parts.items()}
    binary = _only_zeros_and_ones(source)
    source_info = {"path": str(path), "bytes": _size(path), "sha256": file_sha256(path), "split": list(split),
                   "split_seed": int(split_seed), "binarize": "none", "image_shape": list(shape) if shape else None,
                   "streamed": True}
    return Dataset(path.name, labels=labels, image_shape=shape, binary=binary, source=source_info, **tensors)


def _stored_to_float(array: np.ndarray, channels_last: bool, eight_bit: bool) -> np.ndarray:
    """Stored rows as the model's float32 rows (a module-level function: DataLoader workers started
    by spawn or forkserver pickle it)."""
    return _as_float(_rows(array, channels_last), eight_bit)


def _only_zeros_and_ones(source) -> bool:
    n = len(source)
    for start in range(0, n, 4096):
        x = source.read(np.arange(start, min(start + 4096, n)))
        if not ((x == 0) | (x == 1)).all():
            return False
    return True


def write_examples(folder) -> List[Path]:
    """Small example files in every supported format (for the README's examples and tests)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(0)
    images = (rng.rand(60, 8, 8) < 0.3).astype(np.uint8) * 255
    np.save(folder / "images.npy", images)
    table = io.StringIO()
    table.write("a,b,c,kind\n")
    for i in range(50):
        table.write(f"{rng.randn():.4f},{rng.randn():.4f},{rng.randn():.4f},{'xy'[i % 2]}\n")
    (folder / "table.csv").write_text(table.getvalue())
    from PIL import Image

    for i in range(30):
        sub = folder / "pngs" / ("even" if i % 2 == 0 else "odd")
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i]).save(sub / f"{i:03d}.png")
    return [folder / "images.npy", folder / "table.csv", folder / "pngs"]
