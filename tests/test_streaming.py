"""Data bigger than memory: memory-mapped .npy files and image folders read on demand through a
DataLoader give the same data, the same checks and the same run as the in-memory path."""

import json

import numpy as np
import pytest
import torch

import pvae
from pvae.cli import main
from pvae.files import DataFileError, load_file, write_examples
from pvae.streaming import MEMORY_BUDGET_ENV, StreamedSplit, memory_budget_bytes

CONFIG = pvae.RunConfig(latent_dim=2, net={"hidden": (16,)}, likelihood={"name": "continuous-bernoulli"})


@pytest.fixture
def grey_npy(tmp_path):
    rng = np.random.RandomState(0)
    images = (rng.rand(300, 6, 6) * 255).astype(np.uint8)
    np.save(tmp_path / "grey.npy", images)
    return tmp_path / "grey.npy"


def _train(data, workers=None, epochs=3):
    torch.manual_seed(0)
    vae = pvae.build_vae(CONFIG, data.data_dim, data.image_shape)
    history = pvae.fit(vae, data.train, data.valid, epochs=epochs, batch_size=32, progress=False,
                       loader_workers=workers)
    return vae, history


def test_a_streamed_file_holds_the_same_values_split_and_fingerprint(grey_npy):
    memory = load_file(grey_npy, stream="never")
    streamed = load_file(grey_npy, stream="always")
    assert isinstance(streamed.train, StreamedSplit) and streamed.streamed and not memory.streamed
    for split in ("train", "valid", "test"):
        assert torch.equal(streamed.split(split).to(), memory.split(split))
    assert torch.equal(streamed.train[[5, 1, 7]], memory.train[[5, 1, 7]])  # any order of rows
    assert torch.equal(streamed.valid[2:9], memory.valid[2:9])
    assert streamed.fingerprint() == memory.fingerprint()
    assert (streamed.image_shape, streamed.binary, streamed.data_dim) == (memory.image_shape, memory.binary, 36)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_streamed_run_is_the_in_memory_run(grey_npy, workers):
    """Same seed, same minibatches in the same order, same draws: bitwise the same parameters
    and validation record, with or without DataLoader worker processes."""
    vae_memory, history_memory = _train(load_file(grey_npy, stream="never"))
    vae_streamed, history_streamed = _train(load_file(grey_npy, stream="always"), workers)
    assert history_streamed.val_elbo == history_memory.val_elbo
    for name, value in vae_memory.state_dict().items():
        assert torch.equal(value, vae_streamed.state_dict()[name]), name


def test_an_image_folder_streams_with_its_labels(tmp_path):
    folder = write_examples(tmp_path / "data")[2]
    memory = load_file(folder, stream="never")
    streamed = load_file(folder, stream="always")
    assert streamed.streamed and streamed.fingerprint() == memory.fingerprint()
    assert torch.equal(streamed.test.to(), memory.test)
    assert torch.equal(streamed.labels["train"], memory.labels["train"])
    resized = load_file(folder, stream="always", image_size=(4, 4))
    assert resized.image_shape == (4, 4) and torch.equal(resized.train.to(), load_file(folder, image_size=(4, 4)).train)


def test_the_memory_budget_decides(grey_npy, monkeypatch):
    monkeypatch.setenv(MEMORY_BUDGET_ENV, "1e-6")  # about 1 kB: the 43 kB of floats do not fit
    assert memory_budget_bytes() == int(1e-6 * 2**30)
    assert load_file(grey_npy).streamed
    monkeypatch.setenv(MEMORY_BUDGET_ENV, "1")
    assert not load_file(grey_npy).streamed
    monkeypatch.setenv(MEMORY_BUDGET_ENV, "lots")
    with pytest.raises(pvae.UsageError, match="number of GiB"):
        load_file(grey_npy)


def test_streamed_bad_data_are_named_before_anything_is_read_into_memory(tmp_path):
    x = np.random.RandomState(0).rand(5000, 3).astype(np.float32)
    x[4500, 1] = np.nan  # past the first chunk: the row number is the file's
    np.save(tmp_path / "nan.npy", x)
    with pytest.raises(DataFileError, match=r"1 row\(s\) \(row index 4500, counting from 0\)"):
        load_file(tmp_path / "nan.npy", stream="always")
    np.savetxt(tmp_path / "t.csv", x[:10], delimiter=",")
    with pytest.raises(DataFileError, match="only .npy files and folders of images can be streamed"):
        load_file(tmp_path / "t.csv", stream="always")
    np.save(tmp_path / "ok.npy", x[:100])
    with pytest.raises(DataFileError, match="not available for streamed data"):
        load_file(tmp_path / "ok.npy", stream="always", binarize="threshold")
    folder = write_examples(tmp_path / "data")[2]
    (folder / "even" / "000.png").write_bytes(b"not a png")
    with pytest.raises(DataFileError, match="000.png is not a readable image"):
        load_file(folder, stream="always")


def test_the_command_line_streams_on_request_and_evaluates_the_same(grey_npy, tmp_path, capsys):
    common = ["--data", str(grey_npy), "--likelihood", "continuous-bernoulli", "--latent-dim", "2",
              "--hidden", "16", "--epochs", "2", "--no-progress"]
    reports = []
    for stream in ("never", "always"):
        run = tmp_path / stream
        assert main(["train", *common, "--stream", stream, "--run-dir", str(run)]) == 0
        assert json.loads((run / "data.json").read_text())["file"].get("streamed", False) == (stream == "always")
        assert main(["evaluate", str(run), "--num-samples", "4", "--no-progress"]) == 0
        reports.append(json.loads((run / "evaluation-test-K4.json").read_text()))
    assert reports[0]["estimates"]["iwae"]["mean"] == reports[1]["estimates"]["iwae"]["mean"]
    assert reports[0]["data"]["fingerprint"] == reports[1]["data"]["fingerprint"]


def test_bounds_read_a_streamed_split_in_minibatches(grey_npy):
    memory, streamed = load_file(grey_npy, stream="never"), load_file(grey_npy, stream="always")
    vae, _ = _train(memory, epochs=1)
    a = pvae.iwae_bound(vae, memory.test, num_samples=5, batch_size=7, seed=1)
    b = pvae.iwae_bound(vae, streamed.test, num_samples=5, batch_size=7, seed=1)
    assert torch.equal(a.values, b.values)
