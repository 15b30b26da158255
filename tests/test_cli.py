"""The command line, as a user runs it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pvae
from pvae.checkpoint import load_checkpoint
from pvae.cli import main
from pvae.runs import FIGURES

from conftest import requires_mnist

FAST = ["--latent-dim", "2", "--hidden", "32", "--no-progress"]


def test_train_writes_a_complete_run_directory_and_evaluate_reads_it(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--epochs", "3", "--run-dir", str(run), *FAST]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["epochs"] == 3
    for name in ("config.json", "env.json", "metrics.jsonl", "checkpoint.pt", *FIGURES):
        assert (run / name).is_file(), name
    config = json.loads((run / "config.json").read_text())
    assert config["version"] == pvae.CONFIG_VERSION
    assert config["latent_dim"] == 2 and config["net"]["hidden"] == [32] and config["dataset"] == {"name": "digits"}
    env = json.loads((run / "env.json").read_text())
    assert env["seed"] == 0 and env["device"] == "cpu" and "torch" in env and "pyro" in env
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3

    checkpoint_bytes = (run / "checkpoint.pt").read_bytes()
    assert main(["evaluate", str(run), "--num-samples", "7", "--chunk-size", "3", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "iwae (K=7)" in out and "elbo (K=7)" in out
    report = json.loads((run / "evaluation-test-K7.json").read_text())
    assert report["version"] == pvae.REPORT_VERSION
    assert report["num_datapoints"] == 300
    # the report names where and with what it was computed (CUDA and CPU draw differently)
    assert report["environment"]["device"] == "cpu" and report["environment"]["pvae"] == pvae.__version__
    assert "torch" in report["environment"] and "evaluated" in report["environment"]
    # digits are labelled: per-label means, which average back to the overall mean
    by_label = report["by_label"]
    assert sum(r["num_datapoints"] for r in by_label.values()) == 300 and len(by_label) == 10
    overall = sum(r["num_datapoints"] * r["iwae"]["mean"] for r in by_label.values()) / 300
    assert overall == pytest.approx(report["estimates"]["iwae"]["mean"], rel=1e-9)
    assert report["chunk_size"] == 3
    assert report["estimates"]["iwae"]["num_samples"] == 7
    assert report["estimates"]["iwae"]["mean"] >= report["estimates"]["elbo"]["mean"]
    assert (run / "checkpoint.pt").read_bytes() == checkpoint_bytes  # evaluation changes nothing


def test_compare_pairs_two_evaluations_written_by_evaluate(tmp_path, capsys):
    """``pvae evaluate`` writes each report's per-datapoint values; ``pvae compare`` pairs two reports
    of the same test images (here two K of one run) and refuses a report of other data."""
    run = tmp_path / "run"
    assert main(["train", "--epochs", "1", "--run-dir", str(run), *FAST]) == 0
    for k in ("5", "50"):
        assert main(["evaluate", str(run), "--num-samples", k, "--no-progress"]) == 0
        assert (run / f"evaluation-test-K{k}.per-datapoint.csv").is_file()
    capsys.readouterr()
    assert main(["compare", str(run / "evaluation-test-K50.json"), str(run / "evaluation-test-K5.json"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["num_samples"] == {"a": 50, "b": 5} and result["num_datapoints"] == 300
    assert result["mean_difference"] > 0  # L_50 above L_5 on average: the bound tightens with K
    assert main(["evaluate", str(run), "--split", "valid", "--num-samples", "5", "--no-progress"]) == 0
    assert main(["compare", str(run / "evaluation-test-K5.json"), str(run / "evaluation-valid-K5.json")]) == 2
    assert "other data: split 'test' (a) vs 'valid' (b)" in capsys.readouterr().err


def test_resume_from_the_command_line(tmp_path, capsys):
    run = str(tmp_path / "run")
    assert main(["train", "--epochs", "2", "--run-dir", run, *FAST]) == 0
    assert main(["train", "--epochs", "3", "--run-dir", run, *FAST]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["train", "--epochs", "3", "--run-dir", run, "--resume", *FAST]) == 0
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["epoch"] == 3
    assert main(["train", "--epochs", "4", "--run-dir", run, "--resume", "--lr", "0.1", *FAST]) == 2
    assert "differs from this config in training.lr" in capsys.readouterr().err


def test_config_file_with_flag_overrides(tmp_path, capsys):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"latent_dim": 3, "hidden": [16], "epochs": 1}))
    run = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--seed", "5", "--run-dir", str(run), "--no-progress"]) == 0
    saved = json.loads((run / "config.json").read_text())
    assert saved["latent_dim"] == 3 and saved["training"]["seed"] == 5 and saved["training"]["epochs"] == 1
    assert saved["net"]["hidden"] == [16]  # a flat (version 1) config file is translated


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prior", "vampire"], "unknown prior 'vampire'; valid choices: flow, learned-diagonal, mog, standard-normal, vamp"),
        (["--dataset", "mnist-typo"], "unknown dataset 'mnist-typo'; valid choices: binarized-mnist"),
        (["--dataset", "digits-grey"], "Bernoulli likelihood needs binary data"),
        (["--latent-dim", "0"], "latent_dim must be a positive integer"),
        (["--objective", "iwae", "--particles", "5", "--beta", "4"], "objective 'iwae' does not take beta; it takes num_particles, dreg, kl_warmup, kl_schedule"),
        (["--dreg"], "objective 'elbo-analytic-kl' does not take dreg"),
        (["--objective", "infovae", "--info-alpha", "3"], "alpha must be <= 1"),
    ],
)
def test_bad_requests_fail_clearly_and_write_nothing(tmp_path, capsys, args, message):
    run = tmp_path / "run"
    assert main(["train", "--run-dir", str(run), "--no-progress", *args]) == 2
    assert message in capsys.readouterr().err
    assert not run.exists()


def test_unknown_config_key_lists_the_valid_keys(tmp_path, capsys):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"latent_dims": 3}))
    assert main(["train", "--config", str(cfg), "--run-dir", str(tmp_path / "r")]) == 2
    assert "unknown config key(s) ['latent_dims']; valid keys: dataset, model, latent_dim" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_request_without_cuda_is_a_clear_error(tmp_path, capsys):
    assert main(["train", "--device", "cuda", "--run-dir", str(tmp_path / "r"), *FAST]) == 2
    assert "CUDA is not available" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_evaluate_rejects_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path)]) == 2
    assert "not a pvae run directory" in capsys.readouterr().err


def test_installed_entry_point():
    script = Path(sys.executable).parent / "pvae"  # the console script installed beside python
    out = subprocess.run([str(script), "train", "--help"], capture_output=True, text=True, check=True).stdout
    assert "--latent-dim" in out and "--device" in out


@requires_mnist
def test_train_on_binarized_mnist_smoke(tmp_path, capsys):
    run = tmp_path / "mnist"
    args = ["train", "--dataset", "binarized-mnist", "--latent-dim", "5", "--hidden", "20",
            "--epochs", "1", "--batch-size", "500", "--run-dir", str(run), "--no-progress"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["validation_metric"] == "val_elbo" and -300 < summary["best_val"] < -100
    assert (run / "samples.png").is_file()


def test_plain_autoencoder_from_the_command_line(tmp_path, capsys):
    run = tmp_path / "ae"
    args = ["train", "--model", "autoencoder", "--code-size", "4", "--layers", "1", "--units", "32",
            "--loss", "mse", "--dataset", "digits-grey", "--epochs", "3", "--run-dir", str(run), "--no-progress"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["validation_metric"] == "val_reconstruction"
    config = json.loads((run / "config.json").read_text())
    assert (config["model"]["name"], config["guide"]["name"], config["objective"]["name"], config["likelihood"]["name"]) == (
        "autoencoder", "delta", "reconstruction", "gaussian")
    assert config["latent_dim"] == 4 and config["net"]["hidden"] == [32]
    assert main(["evaluate", str(run), "--no-progress"]) == 0
    report = json.loads((run / "evaluation-test-K1000.json").read_text())
    vae = pvae.load_run(run).vae
    assert report["chunk_size"] == pvae.estimators.auto_chunk_size(vae, 100, 1000)  # the default: from memory
    assert set(report["estimates"]) == {"reconstruction", "squared-error"}  # no bounds for a point mass
    assert set(report["skipped"]) == {"elbo", "iwae"}
    assert report["estimates"]["squared-error"]["mean"] > 0
    assert main(["evaluate", str(run), "--num-samples", "5", "--estimators", "ais", "--ais-start", "guide", "--no-progress"]) == 0
    report = json.loads((run / "evaluation-test-K5.json").read_text())
    assert "needs a guide with a density" in report["skipped"]["ais"]
    for name in FIGURES:
        assert (run / name).is_file()


def test_autoencoder_flags_are_checked(tmp_path, capsys):
    assert main(["train", "--loss", "mse", "--run-dir", str(tmp_path / "r"), *FAST]) == 2
    assert "--model autoencoder" in capsys.readouterr().err
    assert main(["train", "--layers", "2", "--run-dir", str(tmp_path / "r"), "--no-progress"]) == 2
    assert "--layers and --units go together" in capsys.readouterr().err
    assert main(["train", "--model", "autoencoder", "--guide", "diagonal", "--run-dir", str(tmp_path / "r"),
                 "--no-progress"]) == 2
    assert "conflicts with --guide diagonal" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("extra, parts", [
    (["--net", "conv", "--channels", "4,8"], {"net": {"name": "conv", "channels": [4, 8]}}),
    (["--prior", "vamp", "--guide", "iaf", "--pseudo-inputs", "5"],
     {"prior": {"name": "vamp", "pseudo_inputs": 5}, "guide": {"name": "iaf"}}),
    (["--prior", "mog", "--guide", "planar", "--flows", "1", "--prior-num-components", "3"],
     {"prior": {"name": "mog", "num_components": 3}, "guide": {"name": "planar", "num_flows": 1}}),
    (["--prior", "flow", "--guide", "full-rank"], {"prior": {"name": "flow"}, "guide": {"name": "full-rank"}}),
])
def test_swapping_parts_from_the_command_line(tmp_path, capsys, extra, parts):
    """A part named by a flag is the part the run uses: the run's config.json records it with
    the options given, the trained checkpoint's weights fit exactly (strict load) the model that
    config rebuilds, and that model is made of the named classes with those sizes (pseudo-inputs,
    mixture components, flow steps, conv channels); the run then evaluates. Fails if the CLI drops a
    part flag or one of its options, or trains a part other than the one it records."""
    from torch import nn

    from pvae.parts.nets import ConvDecoder, ConvEncoder
    from pvae.guides import GUIDES
    from pvae.priors import PRIORS

    run = tmp_path / "run"
    base = ["--latent-dim", "2", "--no-progress"] if "conv" in extra else FAST  # conv nets take no --hidden
    assert main(["train", "--epochs", "1", "--run-dir", str(run), *base, *extra]) == 0
    saved = json.loads((run / "config.json").read_text())
    names = {"prior": "standard-normal", "guide": "diagonal", "net": "mlp"}  # the defaults, where no flag
    names.update({section: options["name"] for section, options in parts.items()})
    for section, options in parts.items():
        assert {k: saved[section].get(k) for k in options} == options, (section, saved[section])
    assert {section: saved[section]["name"] for section in names} == names
    weights = load_checkpoint(run / "checkpoint.pt")["model"]
    vae = pvae.load_run(run).vae  # rebuilt from config.json; load_state_dict is strict
    assert set(vae.state_dict()) == set(weights)
    assert isinstance(vae.prior, PRIORS.get(names["prior"])) and isinstance(vae.guide_net, GUIDES.get(names["guide"]))
    if "net" in parts:
        assert isinstance(vae.decoder, ConvDecoder) and isinstance(vae.guide_net.encoder, ConvEncoder)
        convs = [m.out_channels for m in vae.guide_net.encoder.modules() if isinstance(m, nn.Conv2d)]
        assert convs == parts["net"]["channels"]
    prior, guide = parts.get("prior", {}), parts.get("guide", {})
    if "pseudo_inputs" in prior:
        assert weights["prior.pseudo_inputs"].shape == (prior["pseudo_inputs"], 64)
    if "num_components" in prior:
        assert weights["prior.locs"].shape == (prior["num_components"], 2)
    if "num_flows" in guide:
        assert len(vae.guide_net.flows) == guide["num_flows"]
    assert main(["evaluate", str(run), "--num-samples", "4", "--no-progress"]) == 0
    report = json.loads((run / "evaluation-test-K4.json").read_text())
    assert report["estimates"]["iwae"]["num_samples"] == 4


@pytest.mark.parametrize("extra, options", [
    (["--objective", "iwae", "--particles", "5"], {"name": "iwae", "num_particles": 5}),
    (["--objective", "iwae", "--K", "5"], {"name": "iwae", "num_particles": 5}),  # deprecated alias
    (["--objective", "iwae", "--objective-num-particles", "3", "--dreg"], {"name": "iwae", "dreg": True}),
    (["--beta", "4", "--kl-warmup", "1", "--kl-schedule", "cyclical"], {"beta": 4.0, "kl_schedule": "cyclical"}),
    (["--objective", "infovae", "--info-alpha", "1", "--mmd-lambda", "100"],
     {"name": "infovae", "info_alpha": 1.0, "mmd_lambda": 100.0}),
    (["--objective", "elbo-analytic-kl", "--free-bits", "0.25"], {"name": "elbo-analytic-kl", "free_bits": 0.25}),
])
def test_objectives_from_the_command_line(tmp_path, capsys, extra, options):
    run = tmp_path / "run"
    assert main(["train", "--epochs", "2", "--run-dir", str(run), *FAST, *extra]) == 0
    saved = json.loads((run / "config.json").read_text())
    assert {k: saved["objective"][k] for k in options} == options
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["objective"] == options.get("name", "elbo-analytic-kl")  # the default
    assert main(["evaluate", str(run), "--num-samples", "4", "--no-progress"]) == 0


def test_evaluate_with_every_estimator(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--epochs", "2", "--run-dir", str(run), *FAST]) == 0
    args = ["evaluate", str(run), "--num-samples", "100", "--estimators", "elbo,iwae,naive,ais",
            "--chains", "3", "--ais-steps", "4", "--ais-start", "guide", "--ais-schedule", "linear",
            "--psis-datapoints", "40", "--no-progress"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "ais (chains=3)" in out and "naive-prior-mc (K=100)" in out and "active units:" in out
    report = json.loads((run / "evaluation-test-K100.json").read_text())
    assert set(report["estimates"]) == {"elbo", "iwae", "naive", "ais", "reconstruction", "squared-error"}
    assert report["ais_settings"] == {"num_chains": 3, "num_steps": 4, "betas": "linear", "start": "guide",
                                      "num_leapfrog": 10, "step_size": 0.05, "target_accept": 0.65,
                                      "adapt_step_size": True}
    assert report["spec"]["ais"] == report["ais_settings"] and report["spec"]["num_samples"] == 100
    assert report["psis"]["datapoints"] == 40 and 0 <= report["psis"]["fraction_above_0.7"] <= 1
    assert report["latent"]["latent_dim"] == 2
    assert (run / report["figure"]).stat().st_size > 0
    assert main(["evaluate", str(run), "--estimators", "elbo,psis"]) == 2
    assert "unknown estimator(s) ['psis']; valid choices: elbo, iwae, naive, ais" in capsys.readouterr().err


def test_config_of_an_earlier_version_loads_with_its_legacy_key_translated():
    from pvae import RunConfig

    gaussian = {"likelihood": "gaussian"}
    assert RunConfig.from_dict({**gaussian, "learn_scale": False}).likelihood["scale_mode"] == "fixed"
    assert RunConfig.from_dict({**gaussian, "learn_scale": True}).likelihood["scale_mode"] == "global"
    with pytest.raises(ValueError, match="legacy key 'learn_scale'"):
        RunConfig.from_dict({**gaussian, "learn_scale": True, "gaussian_scale": "per-dim"})
    with pytest.raises(ValueError, match="config version 7 is not known"):
        RunConfig.from_dict({"version": 7})


def test_a_run_directory_of_pvae_0_1_loads_evaluates_and_resumes(tmp_path, digits):
    """tests/data/run-0.1 was written by pvae 0.1 (commit 90a7d19): a flat config.json and an
    unsealed checkpoint of a VampPrior/IAF model. It loads under the nested config with the same
    weights in the same places (the guide mean and decoder output that 0.1 computed), evaluates,
    and resumes training."""
    import shutil

    run_dir = tmp_path / "run-0.1"
    shutil.copytree(Path(__file__).parent / "data" / "run-0.1", run_dir)
    reference = json.loads((run_dir / "reference.json").read_text())
    run = pvae.load_run(run_dir)
    assert run.config.prior == pvae.Part("vamp", pseudo_inputs=5)
    assert run.config.guide == pvae.Part("iaf", num_flows=1, context_dim=None)
    assert run.config.objective["beta"] == 0.5 and run.config.net["hidden"] == (16,)
    assert len(run.history.records) == 2
    x = digits.test[:8]
    with torch.no_grad():
        mean = run.vae.guide_net.mean(x)
        torch.testing.assert_close(mean, torch.tensor(reference["guide_mean"]), rtol=1e-5, atol=1e-6)
        assert float(run.vae.decoder(mean).sum()) == pytest.approx(reference["decoder_out_sum"], rel=1e-5)
    report = pvae.evaluate_run(run_dir, num_samples=5, progress=False)
    assert report.estimates["iwae"].num_samples == 5
    resumed = pvae.train_run(run.config.replace(training={"epochs": 3}), run_dir, resume=True, progress=False)
    assert len(resumed.history.records) == 3
    assert json.loads((run_dir / "config.json").read_text())["version"] == pvae.CONFIG_VERSION


def test_a_run_on_data_passed_in_python_is_never_evaluated_on_the_registry_data(tmp_path, digits):
    """train_run(dataset=...) with the registry's name but other data: evaluate_run refuses to
    load the registry data set, evaluates the data it is given, and says whether they are the
    training data."""
    import dataclasses

    mine = dataclasses.replace(digits, train=digits.train[:300], valid=digits.valid[:50], test=digits.test[:40],
                               labels=None)
    config = pvae.RunConfig(latent_dim=2, net={'hidden': (16,)}, training={'epochs': 1})
    pvae.train_run(config, tmp_path / "run", progress=False, dataset=mine)
    with pytest.raises(ValueError, match="passed in Python .* differ from the registry"):
        pvae.evaluate_run(tmp_path / "run", num_samples=3, progress=False, write=False)
    report = pvae.evaluate_run(tmp_path / "run", num_samples=3, progress=False, write=False, dataset=mine)
    assert report.num_datapoints == 40 and report.data["training_data"] is True
    report = pvae.evaluate_run(tmp_path / "run", num_samples=3, progress=False, write=False, dataset=digits)
    assert report.num_datapoints == digits.test.shape[0] and report.data["training_data"] is False


def test_old_flag_spellings_still_work_and_say_they_are_deprecated(tmp_path, capsys, digits):
    run = tmp_path / "run"
    assert main(["train", "--latent-dim", "2", "--hidden", "16", "--epochs", "1", "--objective", "iwae",
                 "--K", "2", "--run-dir", str(run), "--no-progress"]) == 0
    assert "--K is deprecated" in capsys.readouterr().err
    assert json.loads((run / "config.json").read_text())["objective"]["num_particles"] == 2
    assert main(["evaluate", str(run), "--K", "3", "--estimators", "ais", "--ais-chains", "2", "--ais-steps", "3",
                 "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "--K is deprecated" in err and "use --num-samples" in err and "--ais-chains is deprecated" in err
    report = json.loads((run / "evaluation-test-K3.json").read_text())
    assert report["ais_settings"]["num_chains"] == 2 and report["estimates"]["ais"]["num_samples"] == 2


def test_a_bug_is_not_reported_as_a_usage_error(tmp_path, capsys, monkeypatch):
    """A UsageError: one line, exit 2. Anything else: the traceback, a request for a report, exit 1."""
    import pvae.runs

    def broken(*args, **kwargs):
        raise RuntimeError("an internal invariant failed")

    monkeypatch.setattr(pvae.runs, "train_run", broken)
    assert main(["train", "--run-dir", str(tmp_path / "r"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "an internal invariant failed" in err and "please report it" in err
    assert main(["train", "--config", str(tmp_path / "missing.json")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "cannot read the config file" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "bad.json").write_text("{not json")
    assert main(["train", "--config", str(tmp_path / "bad.json")]) == 2
    assert "is not valid JSON" in capsys.readouterr().err


def test_a_run_file_that_cannot_be_read_is_a_usage_error_not_a_bug(tmp_path, capsys):
    """A checkpoint replaced by a folder (an OSError, not damaged bytes): one line naming the
    problem and the file, exit 2, no traceback and no 'internal error'."""
    run = tmp_path / "run"
    assert main(["train", "--epochs", "1", "--run-dir", str(run), *FAST]) == 0
    capsys.readouterr()
    (run / "checkpoint.pt").unlink()
    (run / "checkpoint.pt").mkdir()
    assert main(["evaluate", str(run), "--num-samples", "3", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "checkpoint.pt" in err and "internal error" not in err and "Traceback" not in err


def test_env_json_records_the_code_commit_and_keeps_earlier_sittings(tmp_path):
    """Provenance of a trained model: the commit of the code that trained it (a git checkout, as
    in CI and in the experiments), each sitting of a resumed run kept."""
    run = tmp_path / "run"
    argv = ["train", "--dataset", "digits", "--latent-dim", "2", "--hidden", "8", "--run-dir", str(run), "--no-progress"]
    assert main([*argv, "--epochs", "1"]) == 0
    first = json.loads((run / "env.json").read_text())
    assert len(first["git_commit"].split("-")[0]) == 40 and "earlier_sittings" not in first
    assert main([*argv, "--epochs", "2", "--resume"]) == 0
    second = json.loads((run / "env.json").read_text())
    assert second["earlier_sittings"] == [{k: first[k] for k in ("started", "git_commit", "device", "world_size",
                                                                   "command", "cpu_flush_denormal")}]
    assert main(["evaluate", str(run), "--num-samples", "2", "--no-progress"]) == 0
    report = json.loads((run / "evaluation-test-K2.json").read_text())
    assert report["environment"]["git_commit"] == second["git_commit"]


_DENORMAL_PROBE = """
import sys, torch
from pvae.cli import configure_cpu
from pvae.runs import cpu_flushes_denormals
print(configure_cpu(), cpu_flushes_denormals(),
      # a parallel operation: the thread pool, started after configure_cpu, flushes too
      float((torch.full((4_000_000,), 1e-30) * 1e-10).sum()) == 0.0, torch.get_num_threads())
"""


@pytest.mark.parametrize("keep", ["", "1"])
def test_the_pvae_command_flushes_subnormal_floats_in_every_cpu_thread(keep, tmp_path):
    """Subnormal floats make x86 matrix products several times slower (gated MLPs in training:
    benchmarks/bench_denormal.py); the command flushes them in the main thread and in the thread
    pool its threads start afterwards, unless PVAE_KEEP_DENORMALS=1, and the run records it."""
    env = {**__import__("os").environ, "PVAE_KEEP_DENORMALS": keep, "OMP_NUM_THREADS": "2"}
    out = subprocess.run([sys.executable, "-c", _DENORMAL_PROBE], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    if not keep and out[0] == "False":
        pytest.skip("this CPU cannot flush subnormal floats (torch.set_flush_denormal returned False)")
    flushed = keep != "1"
    assert out[:3] == [str(flushed)] * 3, out
    run = tmp_path / "run"  # the command itself, as a user runs it
    subprocess.run([sys.executable, "-m", "pvae", "train", "--dataset", "digits", "--latent-dim", "2", "--hidden", "8",
                    "--epochs", "1", "--run-dir", str(run), "--no-progress"], env=env, check=True, capture_output=True)
    assert json.loads((run / "env.json").read_text())["cpu_flush_denormal"] is flushed


def test_cli_main_gives_an_in_process_caller_its_floating_point_mode_back(tmp_path):
    from pvae.runs import thread_flushes_denormals

    before = thread_flushes_denormals()
    assert main(["compare", str(tmp_path / "missing.json"), str(tmp_path / "missing.json")]) == 2
    assert thread_flushes_denormals() == before
