"""Pretrained models (issue 26 item 1): export a run, load it back bit for bit, verify every file,
refuse tampered or unlisted files, download from a URL into the cache, evaluate through the CLI;
and the bundled converged models: their manifests, their provenance, and a fresh evaluation of a
subset of the test images against their reference evaluation (the paper's Table 9 row), within
Monte Carlo error."""

from __future__ import annotations

import functools
import http.server
import json
import math
import re
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
import torch

import pvae
from pvae import pretrained
from pvae.cli import main as cli
from pvae.errors import UsageError

from conftest import requires_mnist

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, digits):
    """A two-epoch run on the digits, its evaluation, and its export."""
    base = tmp_path_factory.mktemp("pretrained")
    config = pvae.RunConfig(dataset="digits", latent_dim=2, net={"hidden": (16,)}, training={"epochs": 2})
    run_dir = base / "run"
    pvae.train_run(config, run_dir, progress=False)
    report = pvae.evaluate_run(run_dir, num_samples=20, progress=False)
    out = pretrained.export(run_dir, base / "tiny-digits", description="two epochs on the digits",
                            evaluation=run_dir / f"{report.stem}.json")
    return run_dir, out


def test_an_exported_run_loads_the_best_weights_and_history_of_the_run(exported):
    run_dir, out = exported
    original, loaded = pvae.load_run(run_dir), pretrained.load_run(out)
    assert original.vae.state_dict().keys() == loaded.vae.state_dict().keys()
    for key, value in original.vae.state_dict().items():
        assert torch.equal(value, loaded.vae.state_dict()[key]), key
    assert loaded.history.records == original.history.records
    assert loaded.history.best_epoch == original.history.best_epoch
    assert loaded.config == original.config
    assert not loaded.vae.training
    manifest = json.loads((out / pretrained.MANIFEST_FILE).read_text())
    assert manifest["checkpoint_sha256"] == pvae.data.files.file_sha256(run_dir / "checkpoint.pt")
    values = json.loads((out / pretrained.REFERENCE_FILE).read_text())["per_datapoint"]["file"]
    assert set(manifest["files"]) == {*pretrained.REQUIRED_FILES, pretrained.REFERENCE_FILE, values}
    assert manifest["dtype"] == "float32"
    assert manifest["evaluation"]["num_samples"] == 20
    assert "per_example" not in manifest["evaluation"]["estimates"]["iwae"]
    assert manifest["trained_with"]["git_commit"] == json.loads((run_dir / "env.json").read_text())["git_commit"]
    assert manifest["name"] == "tiny-digits" and manifest["training"]["epochs_run"] == 2
    # nothing in the folder is a pickle: the weights are safetensors
    assert (out / pretrained.WEIGHTS_FILE).read_bytes()[8:9] == b"{"


def test_a_hierarchical_vampprior_run_exports_and_loads_back_with_the_same_estimates(tmp_path):
    """The hierarchical run of Table 9 (issue 26 item 1) is a family's model, not a VAE: its two
    levels, its pseudo-inputs and its config must come back from the safetensors export unchanged, so
    that the bundled model estimates what the run estimated, draw for draw."""
    config = pvae.RunConfig(dataset="digits", latent_dim=3, net={"hidden": (16,)}, training={"epochs": 1},
                            model={"name": "hvae", "levels": 2}, prior={"name": "vamp", "pseudo_inputs": 5})
    run_dir = tmp_path / "run"
    pvae.train_run(config, run_dir, progress=False)
    out = pretrained.export(run_dir, tmp_path / "tiny-hvae", description="one epoch of a two-level HVAE")
    original, loaded = pvae.load_run(run_dir), pretrained.load_run(out)
    assert type(loaded.vae) is type(original.vae) and loaded.config == original.config
    assert original.vae.state_dict().keys() == loaded.vae.state_dict().keys()
    assert any("pseudo_inputs" in key for key in loaded.vae.state_dict())
    for key, value in original.vae.state_dict().items():
        assert torch.equal(value, loaded.vae.state_dict()[key]), key
    x = pvae.load_dataset("digits").test[:20]
    spec = pvae.EvaluationSpec(estimators=("elbo", "iwae"), num_samples=10, seed=3, psis_datapoints=0)
    before, after = pvae.evaluate(original.vae, x, spec), pvae.evaluate(loaded.vae, x, spec)
    for name in ("elbo", "iwae"):
        assert after.estimates[name].mean == before.estimates[name].mean, name


def test_a_float16_export_is_half_the_weights_and_loads_the_rounded_values(exported, tmp_path):
    """float16 storage (for a model over the 8 MB budget): the weights file halves, the model loads the
    float16-rounded values into its float32 parameters, and a weight beyond float16's range is refused."""
    run_dir, out = exported
    half = pretrained.export(run_dir, tmp_path / "half", description="float16", dtype="float16")
    manifest = json.loads((half / pretrained.MANIFEST_FILE).read_text())
    assert manifest["dtype"] == "float16"
    full_size, half_size = ((f / pretrained.WEIGHTS_FILE).stat().st_size for f in (out, half))
    assert half_size < 0.6 * full_size
    original, loaded = pvae.load_run(run_dir).vae, pretrained.load(half)
    for key, value in original.state_dict().items():
        got = loaded.state_dict()[key]
        assert got.dtype == value.dtype, key
        expected = value.half().float() if value.is_floating_point() else value
        assert torch.equal(got, expected), key
    x = pvae.load_dataset("digits").test[:20]
    assert pvae.evaluate(loaded, x, num_samples=5, psis_datapoints=0).estimates["iwae"].mean == pytest.approx(
        pvae.evaluate(original, x, num_samples=5, psis_datapoints=0).estimates["iwae"].mean, abs=0.05)
    with pytest.raises(UsageError, match="beyond torch.float16's range"):
        pretrained._stored_weights({"w": torch.tensor([1.0, 1e6])}, torch.float16)
    with pytest.raises(UsageError, match="choose float32 or float16"):
        pretrained.export(run_dir, tmp_path / "bf16", description="x", dtype="bfloat16")
    assert not (tmp_path / "bf16").exists()


def test_export_refuses_an_existing_folder_and_leaves_nothing_behind(exported, tmp_path):
    run_dir, out = exported
    with pytest.raises(UsageError, match="exists"):
        pretrained.export(run_dir, out, description="again")
    (tmp_path / "x").mkdir()
    with pytest.raises(FileNotFoundError):
        pretrained.export(tmp_path / "x", tmp_path / "y", description="not a run")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]  # no staging folder left


def _copy(out: Path, tmp_path: Path) -> Path:
    target = tmp_path / out.name
    shutil.copytree(out, target)
    return target


def test_a_changed_byte_in_any_file_is_refused_before_loading(exported, tmp_path):
    _, out = exported
    for name in pretrained.REQUIRED_FILES:
        copy = _copy(out, tmp_path / name)
        data = bytearray((copy / name).read_bytes())
        data[len(data) // 2] ^= 1
        (copy / name).write_bytes(bytes(data))
        with pytest.raises(pretrained.PretrainedChecksumError, match=re.escape(name) + ".*SHA-256"):
            pretrained.load(copy)


def test_a_manifest_that_names_files_outside_its_folder_or_lacks_the_weights_is_refused(exported, tmp_path):
    _, out = exported
    copy = _copy(out, tmp_path)
    manifest = json.loads((copy / pretrained.MANIFEST_FILE).read_text())
    for files, message in (({**manifest["files"], "../escape": "0" * 64}, "plain file names"),
                           ({k: v for k, v in manifest["files"].items() if k != pretrained.WEIGHTS_FILE},
                            "does not list model.safetensors")):
        (copy / pretrained.MANIFEST_FILE).write_text(json.dumps({**manifest, "files": files}))
        with pytest.raises(UsageError, match=message):
            pretrained.load(copy)


def test_a_pinned_manifest_hash_that_differs_is_refused(exported):
    _, out = exported
    with pytest.raises(pretrained.PretrainedChecksumError, match="pinned"):
        pretrained.load(out, sha256="0" * 64)
    pinned = pvae.data.files.file_sha256(out / pretrained.MANIFEST_FILE)
    assert pretrained.load(out, sha256=pinned) is not None


def test_an_unknown_name_lists_the_bundled_models():
    with pytest.raises(UsageError, match="unknown pretrained model 'no-such-model'"):
        pretrained.load("no-such-model")


@pytest.fixture()
def served(exported, tmp_path):
    """The exported folder served over HTTP from a local server; yields (url, folder served)."""
    _, out = exported
    root = tmp_path / "www"
    served = _copy(out, root)
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/{out.name}/", served
    server.shutdown()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_a_model_published_at_a_url_is_downloaded_into_the_cache_verified_and_reused(served, exported, tmp_path):
    url, folder = served
    cache = tmp_path / "cache"
    vae = pretrained.load(url, cache=cache)
    reference = pretrained.load(exported[1])
    for key, value in reference.state_dict().items():
        assert torch.equal(value, vae.state_dict()[key])
    (downloaded,) = cache.iterdir()
    assert downloaded.name.startswith("tiny-digits-")
    pretrained.verify(downloaded)
    # the server now serves other weights: the cached, verified copy is used, nothing is downloaded
    (folder / pretrained.WEIGHTS_FILE).write_bytes(b"not the model")
    assert pretrained.load(url, cache=cache) is not None
    # a fresh cache: the tampered weights fail their checksum and nothing lands in the cache
    with pytest.raises(pretrained.PretrainedChecksumError, match="model.safetensors"):
        pretrained.load(url, cache=tmp_path / "cache2")
    assert list((tmp_path / "cache2").iterdir()) == []
    with pytest.raises(UsageError, match="could not download"):
        pretrained.load(url.replace("tiny-digits", "absent"), cache=tmp_path / "cache3")


def test_pvae_evaluate_pretrained_writes_its_report_in_a_copy_not_the_bundled_folder(exported, tmp_path,
                                                                                    monkeypatch, capsys):
    _, out = exported
    models = tmp_path / "models"
    shutil.copytree(out, models / out.name)
    monkeypatch.setattr(pretrained, "MODELS_DIR", models)
    monkeypatch.setenv(pretrained.CACHE_ENV, str(tmp_path / "cache"))
    assert list(pretrained.available()) == ["tiny-digits"]
    before = sorted(p.name for p in (models / out.name).iterdir())
    assert cli(["evaluate", "pretrained:tiny-digits", "--num-samples", "7", "--no-progress",
                "--psis-datapoints", "0"]) == 0
    assert "tiny-digits" in capsys.readouterr().out
    assert sorted(p.name for p in (models / out.name).iterdir()) == before
    report = json.loads((tmp_path / "cache" / "tiny-digits" / "evaluation-test-K7.json").read_text())
    assert report["estimates"]["iwae"]["num_samples"] == 7
    # the copy is verified again on the next call; a damaged copy is replaced, not used
    (tmp_path / "cache" / "tiny-digits" / pretrained.WEIGHTS_FILE).write_bytes(b"damaged")
    assert cli(["evaluate", "pretrained:tiny-digits", "--num-samples", "7", "--no-progress",
                "--psis-datapoints", "0"]) == 0
    pretrained.verify(tmp_path / "cache" / "tiny-digits")
    assert cli(["evaluate", "pretrained:nothing-like-it", "--no-progress"]) == 2


def test_evaluating_a_bundle_at_its_reference_settings_keeps_its_reference_values_and_pairs_with_them(
        exported, tmp_path, monkeypatch, capsys):
    """The bundle's per-datapoint reference values have their own name: ``pvae evaluate pretrained:X`` at
    the reference's own K and seed writes the run's report names beside them without touching them, the
    copy still verifies, and a second seed's report pairs with the reference image by image."""
    from pvae.inference.paired import paired_difference

    _, out = exported
    models = tmp_path / "models"
    shutil.copytree(out, models / out.name)
    monkeypatch.setattr(pretrained, "MODELS_DIR", models)
    monkeypatch.setenv(pretrained.CACHE_ENV, str(tmp_path / "cache"))
    copy = tmp_path / "cache" / out.name
    for seed in ("0", "1"):  # 0: the reference's K and seed, so its file names (in other minibatches: other draws)
        assert cli(["evaluate", f"pretrained:{out.name}", "--num-samples", "20", "--seed", seed, "--no-progress",
                    "--batch-size", "50" if seed == "0" else "100"]) == 0
    capsys.readouterr()
    pretrained.verify(copy)
    assert (copy / "evaluation-test-K20.json").is_file() and (copy / "evaluation-test-K20-seed1.json").is_file()
    same_seed = paired_difference(copy / "evaluation-test-K20.json", copy / pretrained.REFERENCE_FILE)
    assert same_seed.seeds == {"a": 0, "b": 0} and same_seed.mean_difference != 0
    other = paired_difference(copy / "evaluation-test-K20-seed1.json", copy / pretrained.REFERENCE_FILE)
    assert other.seeds == {"a": 1, "b": 0} and other.z is not None and abs(other.z) < 4.5


def test_an_export_refuses_a_reference_whose_per_datapoint_file_changed(exported, tmp_path):
    run_dir, _ = exported
    report = json.loads((run_dir / "evaluation-test-K20.json").read_text())
    values = run_dir / report["per_datapoint"]["file"]
    original = values.read_text()
    try:
        values.write_text(original.replace("\n0,", "\n0,1", 1))
        with pytest.raises(UsageError, match="SHA-256 differs"):
            pretrained.export(run_dir, tmp_path / "stale", description="x", evaluation=run_dir / "evaluation-test-K20.json")
        assert not (tmp_path / "stale").exists()
    finally:
        values.write_text(original)


# ------------------------------------------------------------------- the bundled converged models
BUNDLED = sorted(pretrained.available())
#: what every bundled model must reproduce: the runs of the paper's Table 9
REPRODUCE = ROOT / "experiments" / "results" / "reproduce.json"


def test_models_are_bundled_and_packaged():
    assert BUNDLED, "no pretrained model is bundled"
    toml = (ROOT / "pyproject.toml").read_text()
    assert '"pvae.pretrained"' in toml and "models/*/*" in toml


@pytest.mark.parametrize("name", BUNDLED)
def test_a_bundled_model_records_where_it_came_from_and_is_its_table_9_row(name):
    folder = pretrained.MODELS_DIR / name
    manifest = pretrained.verify(folder)
    for file in manifest["files"]:
        assert (folder / file).stat().st_size <= 8 * 2 ** 20, f"{file} is over 8 MB"
    commit = manifest["trained_with"]["git_commit"]
    # a resumed run: every sitting ran committed code that is in this repository's history
    for sitting in (commit, *(s.get("git_commit") for s in manifest["trained_with"].get("earlier_sittings") or ())):
        assert re.fullmatch(r"[0-9a-f]{40}", sitting or ""), f"trained from {sitting!r}, not a committed tree"
        if (ROOT / ".git").exists():
            subprocess.run(["git", "cat-file", "-e", f"{sitting}^{{commit}}"], cwd=ROOT, check=True)
    assert re.fullmatch(r"[0-9a-f]{64}", manifest["checkpoint_sha256"])
    evaluation = manifest["evaluation"]
    assert evaluation["num_samples"] == 5000 and evaluation["num_datapoints"] == 10000
    row = json.loads(REPRODUCE.read_text())["runs"][manifest["reproduces"]]
    assert row["test_iwae"]["mean"] == evaluation["estimates"]["iwae"]["mean"]
    assert row["test_elbo"]["mean"] == evaluation["estimates"]["elbo"]["mean"]
    assert row["trained_with"]["git_commit"] == commit
    earlier = manifest["trained_with"].get("earlier_sittings") or []
    assert [s["git_commit"] for s in earlier] == [s["git_commit"] for s in row["trained_with"].get("earlier_sittings") or []]
    assert not any("command" in s for s in earlier), "a sitting's command line (the trainer's paths) is shipped"
    assert row.get("checkpoint_sha256") == manifest["checkpoint_sha256"]


@requires_mnist
@pytest.mark.parametrize("name", BUNDLED)
def test_a_fresh_evaluation_of_a_bundled_model_matches_its_reference_within_monte_carlo_error(name):
    """L_5000 on the first test images, from another seed, against the manifest's reference
    estimate of the same images (written when the model was exported): the difference of two
    independent Monte Carlo estimates of the same number, within 4.5 of its standard errors."""
    run = pretrained.load_run(name)
    check = json.loads((pretrained.MODELS_DIR / name / pretrained.MANIFEST_FILE).read_text())["reference_subset"]
    x = pvae.load_dataset(run.config.dataset).test[:check["num_datapoints"]]
    spec = pvae.EvaluationSpec(estimators=("iwae",), num_samples=check["num_samples"], seed=check["seed"] + 1,
                               psis_datapoints=0)
    fresh = pvae.evaluate(run.vae, x, spec).estimates["iwae"]
    assert fresh.num_samples == 5000 and 0 < fresh.mc_stderr_of_mean < 0.2
    tolerance = 4.5 * math.hypot(fresh.mc_stderr_of_mean, check["mc_stderr_of_mean"])
    assert abs(fresh.mean - check["mean"]) <= tolerance, (fresh.mean, check["mean"], tolerance)


def test_the_readme_quotes_table_9_as_its_result_file_has_it():
    """README's only result numbers (the default objective's evidence) are Table 9's rows of the
    two ELBO estimators, as the committed result file holds them."""
    readme = (ROOT / "README.md").read_text()
    quoted = re.search(r"ends with test L_5000 −(\d+\.\d+) ± (\d+\.\d+) and −(\d+\.\d+) ± (\d+\.\d+)", readme)
    assert quoted, "README no longer quotes the two runs"
    runs = json.loads(REPRODUCE.read_text())["runs"]
    expected = [f"{value:.2f}" for name in ("vae-standard-analytic", "vae-standard-trace")
                for value in (-runs[name]["test_iwae"]["mean"], runs[name]["test_iwae"]["stderr"])]
    assert list(quoted.groups()) == expected
