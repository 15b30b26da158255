"""An interrupted evaluation resumes from its finished minibatches (pvae.estimators.BatchCache).

Each test counts the minibatches computed after the restart: because minibatch i always draws
from seed (seed, i), recomputing everything would give the same numbers, so equal reports alone
could not show that anything was resumed.
"""

import json

import pytest
import torch

import pvae
import pvae.annealing
import pvae.estimators
from pvae.cli import main

BATCH = 50


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("resume") / "run"
    config = pvae.RunConfig(dataset="digits", latent_dim=3, net={"hidden": (32,)}, training={"epochs": 2})
    pvae.train_run(config, run_dir, progress=False)
    return run_dir


class Interrupt(KeyboardInterrupt):
    """Ctrl-C (or a kill) in the middle of a minibatch."""


def _count_batches(monkeypatch, module, name, fail_at=None):
    """Wrap ``module.name`` (called once per minibatch); raise on call number ``fail_at``."""
    original, calls = getattr(module, name), []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if fail_at is not None and len(calls) == fail_at:
            raise Interrupt("killed")
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)
    return calls


# estimator -> (the function called once per minibatch, evaluate_run options)
ESTIMATORS = {
    "iwae": ((pvae.estimators, "_weighted_chunks"), {"estimators": ("elbo", "iwae")}),
    "naive": ((pvae.estimators, "_weighted_chunks"), {"estimators": ("naive",)}),
    "ais": ((pvae.annealing, "_start"), {"estimators": ("ais",), "num_chains": 2, "ais_steps": 4}),
}


def _evaluate(run_dir, **kwargs):
    kwargs = {"chunk_size": 20, **kwargs}
    return pvae.evaluate_run(run_dir, num_samples=20, batch_size=BATCH, progress=False, psis_datapoints=0, **kwargs)


@pytest.mark.parametrize("estimator", sorted(ESTIMATORS))
def test_interrupted_evaluation_resumes_to_the_uninterrupted_report(run_dir, monkeypatch, estimator):
    (module, name), options = ESTIMATORS[estimator]
    whole = _evaluate(run_dir, **options)
    num_batches = -(-whole.num_datapoints // BATCH)
    assert num_batches >= 3
    partials = lambda: sorted(p.name for p in run_dir.glob("*.partial.pt"))  # noqa: E731
    assert partials() == []  # a finished evaluation leaves no partial file

    with monkeypatch.context() as m:
        _count_batches(m, module, name, fail_at=3)  # killed in the third minibatch
        with pytest.raises(Interrupt):
            _evaluate(run_dir, **options)
    assert len(partials()) == 1
    with monkeypatch.context() as m:
        calls = _count_batches(m, module, name)
        resumed = _evaluate(run_dir, **options)
    assert len(calls) == num_batches - 2  # the two finished minibatches were not recomputed
    assert partials() == []
    key = options["estimators"][-1]
    assert torch.equal(resumed.estimates[key].values, whole.estimates[key].values)
    assert resumed.to_dict()["estimates"] == whole.to_dict()["estimates"]


def test_other_settings_a_damaged_file_or_restart_start_afresh(run_dir, monkeypatch):
    module, name = pvae.estimators, "_weighted_chunks"
    with monkeypatch.context() as m:
        _count_batches(m, module, name, fail_at=3)
        with pytest.raises(Interrupt):
            _evaluate(run_dir, seed=0)
    (partial,) = run_dir.glob("*.partial.pt")
    fresh = _evaluate(run_dir, chunk_size=10, write=False)
    num_batches = -(-fresh.num_datapoints // BATCH)
    with monkeypatch.context() as m, pytest.warns(UserWarning, match="written for other settings"):
        calls = _count_batches(m, module, name)  # another chunk size: the minibatches drawn in 20s are not used
        other = _evaluate(run_dir, chunk_size=10)
    assert len(calls) == num_batches
    assert torch.equal(other.estimates["iwae"].values, fresh.estimates["iwae"].values)
    # another seed has a report (and partial files) of its own name: it neither uses nor removes these
    with monkeypatch.context() as m:
        _count_batches(m, module, name, fail_at=3)
        with pytest.raises(Interrupt):
            _evaluate(run_dir, seed=0)
    _evaluate(run_dir, seed=1)
    assert partial.exists() and (run_dir / "evaluation-test-K20-seed1.json").exists()

    with monkeypatch.context() as m:
        _count_batches(m, module, name, fail_at=3)
        with pytest.raises(Interrupt):
            _evaluate(run_dir)
    assert partial.exists()
    with monkeypatch.context() as m:  # resume=False discards it
        calls = _count_batches(m, module, name)
        _evaluate(run_dir, resume=False)
    assert len(calls) == num_batches

    partial.write_bytes(b"not a torch file")  # a damaged partial file is set aside, not trusted
    with monkeypatch.context() as m, pytest.warns(UserWarning, match="unreadable"):
        calls = _count_batches(m, module, name)
        _evaluate(run_dir)
    assert len(calls) == num_batches and not partial.exists()


def test_write_false_keeps_no_partial_file(run_dir, monkeypatch):
    with monkeypatch.context() as m:
        _count_batches(m, pvae.estimators, "_weighted_chunks", fail_at=2)
        with pytest.raises(Interrupt):
            _evaluate(run_dir, write=False)
    assert list(run_dir.glob("*.partial.pt")) == []


def test_cli_evaluate_resumes_and_restart_discards(run_dir, monkeypatch, capsys):
    args = ["evaluate", str(run_dir), "--num-samples", "20", "--batch-size", str(BATCH), "--chunk-size", "20",
            "--psis-datapoints", "0"]
    with monkeypatch.context() as m:
        _count_batches(m, pvae.estimators, "_weighted_chunks", fail_at=2)
        assert main(args + ["--no-progress"]) == 130
    assert "the same command resumes" in capsys.readouterr().err
    assert len(list(run_dir.glob("*.partial.pt"))) == 1
    assert main(args) == 0  # with progress: says it resumes
    assert "resuming bounds: 1 minibatch(es)" in capsys.readouterr().err
    report = json.loads((run_dir / "evaluation-test-K20.json").read_text())
    assert report["estimates"]["iwae"]["num_samples"] == 20
    with monkeypatch.context() as m:
        _count_batches(m, pvae.estimators, "_weighted_chunks", fail_at=2)
        assert main(args + ["--no-progress"]) == 130
    with monkeypatch.context() as m:
        calls = _count_batches(m, pvae.estimators, "_weighted_chunks")
        assert main(args + ["--no-progress", "--restart"]) == 0
    assert len(calls) == -(-report["num_datapoints"] // BATCH)


def test_progress_bar_of_a_resumed_evaluation_counts_the_resumed_minibatches(run_dir, monkeypatch, capsys):
    import pvae._progress

    bars = []

    class Bar:  # records what the bar is told
        def __init__(self, total, **kwargs):
            self.total, self.n = total, 0
            bars.append(self)

        def update(self, n):
            self.n += n

        def close(self):
            pass

    with monkeypatch.context() as m:
        _count_batches(m, pvae.estimators, "_weighted_chunks", fail_at=3)
        with pytest.raises(Interrupt):
            _evaluate(run_dir)
    capsys.readouterr()
    monkeypatch.setattr(pvae._progress, "progress_bar_class", lambda: Bar)  # the bar pvae draws
    report = pvae.evaluate_run(run_dir, num_samples=20, batch_size=BATCH, chunk_size=20, progress=True,
                               psis_datapoints=0)
    assert "resuming bounds: 2 minibatch(es)" in capsys.readouterr().err
    (bar,) = bars
    assert bar.total == bar.n == report.num_datapoints


def _interrupt(run_dir, monkeypatch, module=None, name="_weighted_chunks", **kwargs):
    with monkeypatch.context() as m:
        _count_batches(m, module or pvae.estimators, name, fail_at=3)
        with pytest.raises(Interrupt):
            _evaluate(run_dir, **kwargs)
    assert len(list(run_dir.glob("*.partial.pt"))) == 1


@pytest.mark.parametrize("change", ["chunk_size", "checkpoint", "ais_steps"])
def test_a_partial_file_of_other_settings_is_replaced_with_a_warning(run_dir, tmp_path, monkeypatch, change):
    """Every input that changes the draws or the model is part of the key: the minibatches of an
    evaluation interrupted under the old value are all recomputed under the new one."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    module, name, before, after = pvae.estimators, "_weighted_chunks", {}, {}
    if change == "chunk_size":
        before, after = {"chunk_size": 20}, {"chunk_size": 10}
    elif change == "ais_steps":
        module, name = pvae.annealing, "_start"
        before = {"estimators": ("ais",), "num_chains": 2, "ais_steps": 4}
        after = {**before, "ais_steps": 5}
    _interrupt(run, monkeypatch, module, name, **before)
    if change == "checkpoint":  # one more epoch of training
        config = pvae.load_run(run).config
        pvae.train_run(config.replace(training={"epochs": 3}), run, resume=True, progress=False)
    with monkeypatch.context() as m, pytest.warns(UserWarning, match="written for other settings"):
        calls = _count_batches(m, module, name)
        report = _evaluate(run, **after)
    assert len(calls) == -(-report.num_datapoints // BATCH)
    assert list(run.glob("*.partial.pt")) == []


def test_automatic_chunk_size_resumes_with_the_interrupted_one(run_dir, tmp_path, monkeypatch):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    _interrupt(run, monkeypatch, chunk_size=7)
    with monkeypatch.context() as m:
        calls = _count_batches(m, pvae.estimators, "_weighted_chunks")
        report = pvae.evaluate_run(run, num_samples=20, batch_size=BATCH, chunk_size=None, progress=False,
                                   psis_datapoints=0)
    assert report.chunk_size == 7
    assert len(calls) == -(-report.num_datapoints // BATCH) - 2
