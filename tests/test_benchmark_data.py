"""The named benchmarks of the VAE literature, loaded from a cache holding generated files in
each canonical format (the real files cannot be downloaded here), checked against the
published checksums (the table pointed at the generated files) or, where none is published,
by structure; dynamic binarization; the discretized logistic likelihood behind bits/dim."""

import hashlib
import io
import math
import pickle
import tarfile

import numpy as np
import pytest
import torch
from scipy.io import savemat

import pvae
import pvae.data as data_module
from pvae.data import ChecksumError, DataUnavailableError, Remote


def _vae(data_dim, latent_dim=2, likelihood="bernoulli", image_shape=None):
    config = pvae.RunConfig(latent_dim=latent_dim, net={"hidden": (8,)}, likelihood={"name": likelihood})
    return pvae.build_vae(config, data_dim, image_shape)


def _pin(monkeypatch, name, path, published=True):
    """Point the checksum table at a generated file (as if it were the published one)."""
    raw = path.read_bytes()
    remote = data_module.REMOTES[name]
    assert remote.file == path.name and path.parent.name == remote.folder  # the canonical place
    if published:
        remote = Remote(remote.folder, remote.file, remote.urls,
                        md5=hashlib.md5(raw).hexdigest() if remote.md5 else None,
                        sha256=hashlib.sha256(raw).hexdigest() if remote.sha256 else None)
    monkeypatch.setitem(data_module.REMOTES, name, remote)


def _offline(monkeypatch):
    def offline(url, target):
        raise OSError("no network")

    monkeypatch.setattr(data_module, "_download", offline)


def _damage(path):
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


def _omniglot(tmp_path, n_train=40, n_test=7):
    rng = np.random.RandomState(1)
    folder = tmp_path / "omniglot"
    folder.mkdir(parents=True)
    images = rng.rand(n_train, 28, 28)
    # stored as in chardata.mat: one Fortran-ordered image per column
    columns = images.transpose(0, 2, 1).reshape(n_train, 784).T
    target = np.eye(50)[:, np.arange(n_train) % 50]
    test = rng.rand(n_test, 784).T
    savemat(folder / "chardata.mat", {"data": columns, "testdata": test, "target": target,
                                      "testtarget": np.eye(50)[:, np.arange(n_test)]})
    return folder / "chardata.mat", images


def test_omniglot_reads_the_iwae_file_layout_with_a_seeded_split_and_dynamic_binarization(tmp_path, monkeypatch):
    path, images = _omniglot(tmp_path)
    _pin(monkeypatch, "omniglot", path)
    data = pvae.load_dataset("omniglot", cache_dir=tmp_path)
    assert (data.train.shape[0], data.valid.shape[0], data.test.shape[0]) == (36, 4, 7)
    assert data.dynamic_binarization and data.binary and data.image_shape == (28, 28)
    # the training split holds the grey levels, images row-major as the IWAE code reads them
    perm = np.random.RandomState(0).permutation(40)
    assert np.allclose(data.train[0].numpy(), images[perm[0]].reshape(-1), atol=1e-6)
    assert data.labels["train"][0] == perm[0] % 50
    for split in ("valid", "test", "train"):  # evaluation sees fixed binary draws
        x = data.split(split)
        assert set(x.unique().tolist()) <= {0.0, 1.0}
        assert torch.equal(x, pvae.load_dataset("omniglot", cache_dir=tmp_path).split(split))
    assert data.source["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert not data.source["published_checksum"]
    grey = pvae.load_dataset({"name": "omniglot", "binarize": "none"}, cache_dir=tmp_path)
    assert not grey.binary and not grey.dynamic_binarization and not torch.equal(grey.test, data.test)


def test_a_file_without_published_checksum_is_checked_by_structure(tmp_path, monkeypatch):
    folder = tmp_path / "omniglot"
    folder.mkdir()
    savemat(folder / "chardata.mat", {"data": np.zeros((100, 3))})  # not the published layout
    with pytest.raises(ChecksumError, match="lacks the arrays"):
        pvae.load_dataset("omniglot", cache_dir=tmp_path)
    (folder / "chardata.mat").write_bytes(b"<html>moved</html>")
    with pytest.raises(ChecksumError, match="cannot be read"):
        pvae.load_dataset("omniglot", cache_dir=tmp_path)


def test_caltech_silhouettes_published_split_checksum_and_labels(tmp_path, monkeypatch):
    folder = tmp_path / "caltech101_silhouettes"
    folder.mkdir()
    rng = np.random.RandomState(2)
    arrays = {}
    for split, n in (("train", 9), ("val", 4), ("test", 5)):
        arrays[f"{split}_data"] = (rng.rand(n, 784) < 0.3).astype(np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 101 + 1).reshape(-1, 1)
    path = folder / "caltech101_silhouettes_28_split1.mat"
    savemat(path, arrays)
    _pin(monkeypatch, "caltech101-silhouettes", path)
    data = pvae.load_dataset("caltech101-silhouettes", cache_dir=tmp_path)
    assert (data.train.shape, data.valid.shape, data.test.shape) == ((9, 784), (4, 784), (5, 784))
    assert data.binary and data.labels["valid"].tolist() == [0, 1, 2, 3]
    # Fortran-ordered images, ones for the silhouette (as the VampPrior code reads the file)
    first = arrays["train_data"][0].reshape(28, 28).T.reshape(-1)
    assert np.array_equal(data.train[0].numpy(), 1.0 - first)
    assert data.source["published_checksum"]
    _damage(path)
    with pytest.raises(ChecksumError, match="caltech101_silhouettes_28_split1.mat"):
        pvae.load_dataset("caltech101-silhouettes", cache_dir=tmp_path)


def test_frey_faces_8bit_grey_levels_split_and_the_discretized_likelihood_accepts_them(tmp_path, monkeypatch):
    folder = tmp_path / "frey_faces"
    folder.mkdir()
    ff = np.random.RandomState(3).randint(0, 256, size=(560, 50)).astype(np.uint8)
    savemat(folder / "frey_rawface.mat", {"ff": ff})
    data = pvae.load_dataset("frey-faces", cache_dir=tmp_path)
    assert (data.train.shape[0], data.valid.shape[0], data.test.shape[0]) == (40, 5, 5)
    assert data.image_shape == (28, 20) and not data.binary
    assert set((torch.cat([data.train, data.valid, data.test]) * 255).round().unique().tolist()) <= set(range(256))
    rows = sorted(torch.cat([data.train, data.valid, data.test]).mul(255).round().to(torch.uint8).tolist())
    assert rows == sorted(ff.T.tolist())  # every face once, none changed
    vae = _vae(data.data_dim, 4, "discretized-logistic", data.image_shape)
    vae.check_data(data.train)
    savemat(folder / "frey_rawface.mat", {"ff": ff.astype(np.float64)})
    with pytest.raises(ChecksumError, match="8-bit"):
        pvae.load_dataset("frey-faces", cache_dir=tmp_path)


def _cifar_archive(path, per_batch=6):
    rng = np.random.RandomState(4)
    batches = {}
    with tarfile.open(path, "w:gz") as tar:
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            x = rng.randint(0, 256, size=(per_batch, 3072)).astype(np.uint8)
            y = list(rng.randint(0, 10, size=per_batch))
            batches[name] = (x, y)
            raw = pickle.dumps({b"batch_label": name.encode(), b"labels": [int(v) for v in y], b"data": x},
                               protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return batches


def test_cifar10_archive_splits_40k_10k_10k_style_in_channels_first_8bit_values(tmp_path, monkeypatch):
    folder = tmp_path / "cifar10"
    folder.mkdir()
    path = folder / "cifar-10-python.tar.gz"
    batches = _cifar_archive(path)
    _pin(monkeypatch, "cifar10", path)
    data = pvae.load_dataset("cifar10", cache_dir=tmp_path)
    assert (data.train.shape, data.valid.shape, data.test.shape) == ((24, 3072), (6, 3072), (6, 3072))
    assert data.image_shape == (3, 32, 32)
    assert torch.equal(data.valid, torch.from_numpy(batches["data_batch_5"][0].astype(np.float32) / 255))
    assert data.labels["test"].tolist() == [int(v) for v in batches["test_batch"][1]]
    _damage(path)
    with pytest.raises(ChecksumError, match="cifar-10-python.tar.gz"):
        pvae.load_dataset("cifar10", cache_dir=tmp_path)


def test_cifar10_batches_that_would_run_code_are_refused(tmp_path, monkeypatch):
    """The archive is unpickled only after its checksum passed, and then only arrays and plain
    containers: a pickle that names any other callable is refused."""
    folder = tmp_path / "cifar10"
    folder.mkdir()
    path = folder / "cifar-10-python.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        raw = pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [0], b"evil": print}, protocol=2)
        info = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
        info.size = len(raw)
        tar.addfile(info, io.BytesIO(raw))
    _pin(monkeypatch, "cifar10", path)
    with pytest.raises(ChecksumError, match="refusing to load .*print"):
        pvae.load_dataset("cifar10", cache_dir=tmp_path)


@pytest.mark.parametrize("name", sorted(data_module.REMOTES))
def test_a_missing_benchmark_file_offline_says_where_to_put_it_and_leaves_nothing(name, tmp_path, monkeypatch):
    _offline(monkeypatch)
    with pytest.raises(DataUnavailableError, match="place it at"):
        pvae.load_dataset(name, cache_dir=tmp_path)
    assert not any(p.is_file() for p in tmp_path.rglob("*"))


def test_a_bad_download_of_a_published_file_is_deleted(tmp_path, monkeypatch):
    def serve(url, target):
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"<html>moved</html>")

    monkeypatch.setattr(data_module, "_download", serve)
    with pytest.raises(ChecksumError):
        pvae.load_dataset("cifar10", cache_dir=tmp_path)
    assert not (tmp_path / "cifar10" / "cifar-10-python.tar.gz").exists()


# ---------------------------------------------------------------------------- dynamic binarization
def test_fit_draws_a_fresh_binarization_of_every_minibatch_from_the_seeded_stream(monkeypatch):
    """The minibatches the step sees are binary, differ between epochs for the same images, are
    Bernoulli(p) draws (mean within 5 standard errors), and are the same for the same seed."""
    from pvae import train as train_module

    p = torch.rand(20, 16) * 0.8 + 0.1
    seen = []
    original = train_module.TrainStep.__call__

    def spy(self, x, index=None, kl_weight=1.0):
        seen.append(x.clone())
        return original(self, x, index, kl_weight)

    monkeypatch.setattr(train_module.TrainStep, "__call__", spy)

    def run():
        seen.clear()
        vae = _vae(16)
        pvae.fit(vae, p, epochs=60, batch_size=20, progress=False, seed=3, dynamic_binarization=True)
        return torch.stack(seen)

    draws = run()  # full batches: every step sees all 20 images, in the epoch's order
    assert set(draws.unique().tolist()) == {0.0, 1.0}
    assert not torch.equal(draws[0], draws[1])
    # under the permutation, each image's pixels over 60 epochs average to p
    totals = draws.sum((0, 1))
    expected, stderr = p.sum(0) * 60, (p * (1 - p)).sum(0).mul(60).sqrt()
    assert ((totals - expected).abs() < 5 * stderr).all()
    assert torch.equal(draws, run())


def test_fit_refuses_non_probabilities_to_binarize_and_grey_training_data_without_it():
    vae = _vae(4)
    x = torch.rand(10, 4)
    with pytest.raises(pvae.UsageError, match="binarize"):
        pvae.fit(vae, x, epochs=1, progress=False)
    x[3, 1] = 1.5
    with pytest.raises(pvae.UsageError, match=r"probabilities in \[0, 1\].*row index 3, counting from 0"):
        pvae.fit(vae, x, epochs=1, progress=False, dynamic_binarization=True)


def test_a_resumed_dynamically_binarized_run_draws_the_same_bits(tmp_path):
    p = torch.rand(30, 8)
    vae_a = _vae(8)
    state = {k: v.clone() for k, v in vae_a.state_dict().items()}
    pvae.fit(vae_a, p, epochs=4, batch_size=10, progress=False, dynamic_binarization=True, restore_best=False)
    vae_b = _vae(8)
    vae_b.load_state_dict(state)
    pvae.fit(vae_b, p, epochs=2, batch_size=10, progress=False, dynamic_binarization=True, run_dir=tmp_path,
             restore_best=False)
    pvae.fit(vae_b, p, epochs=4, batch_size=10, progress=False, dynamic_binarization=True, run_dir=tmp_path,
             resume=True, restore_best=False)
    for k, v in vae_a.state_dict().items():
        assert torch.equal(v, vae_b.state_dict()[k]), k


# ---------------------------------------------------------------------------- discretized logistic
def test_discretized_logistic_masses_sum_to_one_and_match_the_logistic_cdf():
    from pvae.likelihoods import DiscretizedLogistic

    loc = torch.tensor([0.5, 0.1, 0.9, 0.3, -0.2], dtype=torch.float64)
    log_scale = torch.tensor([-2.0, -4.0, -1.0, -7.0, 0.0], dtype=torch.float64)
    grid = torch.arange(256, dtype=torch.float64) / 255
    d = DiscretizedLogistic(loc[:, None].expand(5, 256), log_scale[:, None].expand(5, 256))
    log_p = d.log_prob(grid.expand(5, 256))
    assert torch.allclose(log_p.logsumexp(-1), torch.zeros(5, dtype=torch.float64), atol=1e-9)
    # an inner bin's mass is the logistic CDF's increment over it
    cdf = lambda t: torch.sigmoid((t - loc) / log_scale.exp())  # noqa: E731
    k = 100
    want = (cdf(torch.tensor((k + 0.5) / 255)) - cdf(torch.tensor((k - 0.5) / 255))).log()
    finite = want > -20
    assert torch.allclose(log_p[:, k][finite], want[finite], atol=1e-6)
    # samples land on the grid with the bins' frequencies
    torch.manual_seed(0)
    s = DiscretizedLogistic(torch.tensor([0.4]), torch.tensor([-3.0])).sample((20000,))
    assert torch.equal(s, (s * 255).round() / 255)
    p_bin = DiscretizedLogistic(torch.tensor([0.4]), torch.tensor([-3.0])).log_prob(torch.tensor([102 / 255])).exp()
    freq = (s == 102 / 255).double().mean()
    assert abs(float(freq - p_bin)) < 5 * math.sqrt(float(p_bin * (1 - p_bin)) / 20000)


def test_discretized_logistic_refuses_values_off_the_8bit_grid():
    vae = _vae(6, likelihood="discretized-logistic")
    vae.check_data(torch.tensor([[0, 1, 2, 3, 254, 255]], dtype=torch.float32) / 255)
    with pytest.raises(pvae.UsageError, match="grid k / 255"):
        vae.check_data(torch.full((1, 6), 0.5))


def test_a_vae_with_the_discretized_logistic_codes_8bit_images_in_fewer_than_8_bits_per_dim():
    """Coding 8-bit values uniformly costs 8 bits/dim; two kinds of image (dark and bright, a few
    grey levels of noise) are learnt to far fewer. Fails if the likelihood's masses are not
    log-masses of the 256 bins (e.g. a density, or a wrong sign)."""
    g = torch.Generator().manual_seed(0)
    kind = torch.randint(0, 2, (200, 1), generator=g)
    x = (kind * 180 + 30 + torch.randint(0, 4, (200, 12), generator=g)).float() / 255
    vae = _vae(12, likelihood="discretized-logistic")
    untrained = pvae.iwae_bound(vae, x, num_samples=8).bits_per_dim(12)
    pvae.fit(vae, x, epochs=150, batch_size=50, lr=1e-2, progress=False)
    trained = pvae.iwae_bound(vae, x, num_samples=8).bits_per_dim(12)
    assert untrained > 8 > 5 > trained  # measured: 10.3 before, 4.35 after
    # and no code beats the data's empirical entropy (200 distinct images: log2(200) bits per image);
    # a log-density in place of the bins' log-masses would (sharp densities exceed 1)
    assert trained > math.log2(200) / 12


def test_a_run_on_a_named_benchmark_records_its_file_and_evaluates_from_the_cache(tmp_path, monkeypatch):
    """Omniglot from a generated chardata.mat: train from the command line, data.json names the file
    and its SHA-256, and evaluation reloads the same data (same fingerprint) from the cache; a cache
    whose file changed is refused."""
    import json

    from pvae.cli import main

    path, _ = _omniglot(tmp_path / "cache", n_train=60)
    monkeypatch.setenv("PVAE_DATA_DIR", str(tmp_path / "cache"))
    run = tmp_path / "run"
    assert main(["train", "--dataset", "omniglot", "--latent-dim", "2", "--hidden", "8", "--epochs", "2",
                 "--batch-size", "20", "--no-progress", "--run-dir", str(run)]) == 0
    record = json.loads((run / "data.json").read_text())
    assert record["source"] == "registry" and record["file"] is None
    assert record["benchmark"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert main(["evaluate", str(run), "--num-samples", "3", "--no-progress"]) == 0
    report = json.loads((run / "evaluation-test-K3.json").read_text())
    assert report["data"]["training_data"] is True and report["num_datapoints"] == 7
    _omniglot(tmp_path / "other", n_train=60, n_test=9)
    path.write_bytes((tmp_path / "other" / "omniglot" / "chardata.mat").read_bytes())
    assert main(["evaluate", str(run), "--num-samples", "3", "--no-progress"]) == 2


def test_a_bad_download_without_published_checksum_is_deleted_by_its_structure_check(tmp_path, monkeypatch):
    def serve(url, target):
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"<html>moved</html>")

    monkeypatch.setattr(data_module, "_download", serve)
    with pytest.raises(ChecksumError, match="it was deleted"):
        pvae.load_dataset("frey-faces", cache_dir=tmp_path)
    assert not (tmp_path / "frey_faces" / "frey_rawface.mat").exists()
