"""Data loading: the cache protocol, checksums, downloads and clear failures."""

import gzip
import io
import math
import os
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

import pvae
from pvae.data import ChecksumError, DataUnavailableError, binarized_mnist_split
from pvae.registry import UnknownNameError

from conftest import requires_mnist


def cache():
    return Path(os.environ["PVAE_DATA_DIR"])


def test_digits_are_binary_labelled_and_split_deterministically(digits):
    assert digits.train.shape == (1197, 64) and digits.valid.shape == (300, 64)
    assert digits.test.shape == (300, 64) and digits.image_shape == (8, 8)
    assert digits.binary and set(digits.train.unique().tolist()) == {0.0, 1.0}
    assert digits.split_labels("test").shape == (300,)
    again = pvae.load_dataset("digits")
    assert torch.equal(again.test, digits.test)
    grey = pvae.load_dataset("digits-grey")
    assert grey.train.min() >= 0 and grey.train.max() <= 1 and not grey.binary


def test_unknown_dataset_and_split_name_the_choices(digits):
    with pytest.raises(UnknownNameError, match="valid choices: binarized-mnist, caltech101-silhouettes, cifar10, digits"):
        pvae.load_dataset("mnist-typo")
    with pytest.raises(ValueError, match="valid choices: train, valid, test"):
        digits.split("validation")


@requires_mnist
def test_binarized_mnist_from_the_cache():
    data = pvae.load_dataset("binarized-mnist")
    assert data.train.shape == (50000, 784)
    assert data.valid.shape == (10000, 784) and data.test.shape == (10000, 784)
    assert data.train.dtype == torch.float32 and data.binary
    assert data.train.mean().item() == pytest.approx(0.1306, abs=5e-5)  # published means
    assert data.test.mean().item() == pytest.approx(0.1325, abs=5e-5)


def _plain_text(split):
    folder = cache() / "binarized_mnist"
    for name in (f"binarized_mnist_{split}.amat", f"binarized_mnist_{split}.amat.gz"):
        if (folder / name).exists():
            raw = (folder / name).read_bytes()
            return gzip.decompress(raw) if name.endswith(".gz") else raw


@requires_mnist
def test_plain_amat_is_accepted_as_well_as_gzip(tmp_path):
    folder = tmp_path / "binarized_mnist"
    folder.mkdir()
    (folder / "binarized_mnist_test.amat").write_bytes(_plain_text("test"))
    plain = binarized_mnist_split("test", tmp_path, download=False)
    assert plain.shape == (10000, 784)
    assert (plain == binarized_mnist_split("test", cache(), download=False)).all()


@requires_mnist
def test_corrupt_file_is_named_and_rejected(tmp_path):
    folder = tmp_path / "binarized_mnist"
    folder.mkdir()
    text = bytearray(_plain_text("test"))
    text[0] = ord("1") if text[0] == ord("0") else ord("0")  # one flipped pixel
    (folder / "binarized_mnist_test.amat").write_bytes(bytes(text))
    with pytest.raises(ChecksumError, match="binarized_mnist_test.amat is corrupt.*delete it"):
        binarized_mnist_split("test", tmp_path)


def test_missing_file_offline_is_a_clear_error_and_leaves_no_partial_file(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    monkeypatch.setenv("PVAE_DATA_DIR", str(tmp_path))
    with pytest.raises(DataUnavailableError, match="could not be downloaded.*PVAE_DATA_DIR"):
        pvae.load_dataset("binarized-mnist")
    leftovers = list(tmp_path.rglob("*.amat*"))
    assert leftovers == []


class _FakeResponse(io.BytesIO):
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@requires_mnist
def test_download_is_verified_and_cached(tmp_path, monkeypatch):
    text = _plain_text("valid")
    urls = []

    def serve(url, timeout=None):
        urls.append(url)
        return _FakeResponse(text)

    monkeypatch.setattr(urllib.request, "urlopen", serve)
    arr = binarized_mnist_split("valid", tmp_path)
    assert urls == [
        "http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/binarized_mnist_valid.amat"
    ]
    assert arr.shape == (10000, 784)
    assert (tmp_path / "binarized_mnist" / "binarized_mnist_valid.amat").read_bytes() == text
    binarized_mnist_split("valid", tmp_path)  # second load: from the cache, no download
    assert len(urls) == 1


def test_a_bad_download_is_not_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: _FakeResponse(b"<html>moved</html>"))
    with pytest.raises(ChecksumError):
        binarized_mnist_split("test", tmp_path)
    assert list((tmp_path / "binarized_mnist").iterdir()) == []


def _write_idx(path, array):
    import gzip
    import struct

    header = bytes([0, 0, 8, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes(), mtime=0))


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_mnist_format_sets_load_from_a_cache_of_idx_files_checked_against_their_checksums(name, tmp_path, monkeypatch):
    """Generated files in the canonical IDX format, with the checksum table pointed at them: the
    loader parses, scales to [0, 1], splits 50k/10k-style (the last 10,000 training images
    validate) and keeps labels; a damaged file is a ChecksumError; a missing one that cannot be
    downloaded is a DataUnavailableError that says where to put it."""
    import hashlib

    import pvae.data as data_module

    folder = tmp_path / name
    folder.mkdir()
    rng = np.random.RandomState(0)
    train = (rng.rand(10012, 28, 28) < 0.02) * 255
    files = {"train-images-idx3-ubyte.gz": train, "train-labels-idx1-ubyte.gz": np.arange(10012) % 10,
             "t10k-images-idx3-ubyte.gz": (rng.rand(5, 28, 28) < 0.5) * 255, "t10k-labels-idx1-ubyte.gz": np.arange(5)}
    table = {}
    for file, array in files.items():
        _write_idx(folder / file, array)
        packed = (folder / file).read_bytes()
        table[file] = (hashlib.md5(packed).hexdigest(), hashlib.sha256(packed).hexdigest())
    mirrors, published = data_module.IDX_SOURCES[name]
    assert set(published) == set(table)  # the same four files as published
    monkeypatch.setitem(data_module.IDX_SOURCES, name, (mirrors, table))
    data = pvae.load_dataset(name, cache_dir=tmp_path)
    assert (data.train.shape, data.valid.shape, data.test.shape) == ((12, 784), (10000, 784), (5, 784))
    assert data.image_shape == (28, 28) and not data.binary and float(data.train.max()) == 1.0
    assert torch.equal(data.valid[0], torch.from_numpy(train[12].reshape(-1) / 255.0).float())
    assert data.labels["valid"][0] == 12 % 10 and data.labels["test"].tolist() == list(range(5))
    damaged = bytearray((folder / "t10k-labels-idx1-ubyte.gz").read_bytes())
    damaged[-5] ^= 0xFF
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(bytes(damaged))
    with pytest.raises(data_module.ChecksumError, match="t10k-labels"):
        pvae.load_dataset(name, cache_dir=tmp_path)
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()

    def offline(url, target):
        raise OSError("no network")

    monkeypatch.setattr(data_module, "_download", offline)
    with pytest.raises(data_module.DataUnavailableError, match="place it at"):
        pvae.load_dataset(name, cache_dir=tmp_path)


def test_dynamic_mnist_is_mnist_with_fresh_training_draws_and_fixed_evaluation_draws(tmp_path, monkeypatch):
    import hashlib

    import pvae.data as data_module

    folder = tmp_path / "mnist"
    folder.mkdir()
    rng = np.random.RandomState(0)
    files = {"train-images-idx3-ubyte.gz": rng.randint(0, 256, (10010, 28, 28)),
             "train-labels-idx1-ubyte.gz": np.arange(10010) % 10,
             "t10k-images-idx3-ubyte.gz": rng.randint(0, 256, (6, 28, 28)), "t10k-labels-idx1-ubyte.gz": np.arange(6)}
    table = {}
    for file, array in files.items():
        _write_idx(folder / file, array)
        packed = (folder / file).read_bytes()
        table[file] = (hashlib.md5(packed).hexdigest(), hashlib.sha256(packed).hexdigest())
    monkeypatch.setitem(data_module.IDX_SOURCES, "mnist", (data_module.IDX_SOURCES["mnist"][0], table))
    grey = pvae.load_dataset("mnist", cache_dir=tmp_path)
    dynamic = pvae.load_dataset("dynamic-mnist", cache_dir=tmp_path)
    assert dynamic.name == "dynamic-mnist" and dynamic.dynamic_binarization and dynamic.binary
    assert torch.equal(dynamic.train, grey.train)  # probabilities, drawn afresh by fit
    for split in ("valid", "test"):
        x = dynamic.split(split)
        assert set(x.unique().tolist()) == {0.0, 1.0}
        # a Bernoulli draw of the grey levels: the mean within 5 standard errors
        p = grey.split(split)
        assert abs(float(x.mean() - p.mean())) < 5 * float((p * (1 - p)).mean().sqrt()) / math.sqrt(p.numel())
    assert torch.equal(dynamic.test, pvae.load_dataset("dynamic-mnist", cache_dir=tmp_path).test)
    static = pvae.load_dataset({"name": "mnist", "binarize": "static"}, cache_dir=tmp_path)
    assert not static.dynamic_binarization and set(static.train.unique().tolist()) == {0.0, 1.0}
