"""A new user's first hour with the command line (issue 27): `pvae --version`; help grouped by
config section with every flag's default; errors that name the flag typed; the line a finished
`pvae train` ends with; no `.lock` left in a run directory; bits/dim only for discrete data."""

import argparse
import json
import re

import pyro
import pytest
import torch

import pvae
from pvae.checkpoint import RunLockedError, run_lock
from pvae.cli import _finished_line, _parser, main
from pvae.testing import linear_gaussian_vae
from pvae.training.loop import History

FAST = ["--latent-dim", "2", "--hidden", "32", "--no-progress"]


def _subparser(name):
    return _parser()._subparsers._group_actions[0].choices[name]


def _one_line(text):
    """argparse's help wrapped over lines, as one line."""
    return " ".join(text.split())


def test_version_prints_pvae_torch_and_pyro_versions_and_exits_0(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith(f"pvae {pvae.__version__} ")
    assert f"torch {torch.__version__}" in out and f"pyro {pyro.__version__}" in out


def test_train_help_groups_the_flags_by_config_section():
    train = _subparser("train")
    groups = {group.title: {s for a in group._group_actions for s in a.option_strings}
              for group in train._action_groups}
    for title in ("dataset", "net", "prior", "guide", "likelihood", "objective", "training", "training: optimizer",
                  "training: learning-rate schedule", "run directory and progress"):
        assert title in groups, title
    assert {"--prior", "--prior-pseudo-inputs", "--prior-num-components", "--prior-num-flows"} <= groups["prior"]
    assert {"--guide", "--guide-num-flows"} <= groups["guide"]
    assert {"--dataset", "--data", "--binarize"} <= groups["dataset"]
    assert {"--net", "--hidden", "--layers", "--units"} <= groups["net"]
    assert {"--epochs", "--lr", "--patience", "--compile"} <= groups["training"]
    assert {"--optimizer", "--optimizer-momentum"} <= groups["training: optimizer"]
    assert {"--lr-schedule", "--lr-schedule-gamma"} <= groups["training: learning-rate schedule"]
    assert {"--run-dir", "--resume", "--no-progress"} <= groups["run directory and progress"]
    text = train.format_help()
    assert text.index("\nprior:\n") < text.index("\n  --prior-pseudo-inputs") < text.index("\nguide:\n")


@pytest.mark.parametrize("command", ["train", "evaluate"])
def test_every_flag_help_ends_with_its_default(command):
    parser = _subparser(command)
    for action in parser._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS or "-h" in action.option_strings:
            continue
        assert re.search(r"\(default: [^()]*(\([^()]*\)[^()]*)*\)$", _one_line(action.help)), action.option_strings


def _help_of(command, flag):
    """The help of ``flag`` of ``pvae <command>``, as one line."""
    action = next(a for a in _subparser(command)._actions if flag in a.option_strings)
    return _one_line(action.help % vars(action))


def test_train_help_gives_each_parts_default_and_trainings_defaults():
    for flag, default in (("--prior-pseudo-inputs", "50 for vamp"), ("--prior-num-components", "10 for mog"),
                          ("--lr-schedule-gamma", "0.99 for exponential; 0.5 for plateau; 0.1 for step"),
                          ("--guide-num-flows", "2 for iaf, planar, sylvester"), ("--dreg", "off for iwae"),
                          ("--activation", "softplus"),  # every net takes it, with one default
                          ("--latent-dim", str(pvae.RunConfig().latent_dim)), ("--prior", "standard-normal"),
                          ("--optimizer", "adam"), ("--lr-schedule", "constant")):
        assert _help_of("train", flag).endswith(f"(default: {default})"), (flag, _help_of("train", flag))
    defaults = pvae.Training()
    for flag, default in (("--epochs", defaults.epochs), ("--lr", defaults.lr), ("--patience", defaults.patience),
                          ("--batch-size", defaults.batch_size), ("--max-time", "none"), ("--device", "cpu")):
        assert _help_of("train", flag).endswith(f"(default: {default})"), flag
    # the defaults are only shown: argparse applies none, the config's own values stand
    args = _parser().parse_args(["train"])
    assert args.options == [] and args.latent_dim is None and args.prior is None


def test_evaluate_help_gives_the_evaluation_spec_and_ais_defaults():
    spec, ais = pvae.EvaluationSpec(), pvae.AISSettings()
    for flag, default in (("--num-samples", spec.num_samples), ("--batch-size", spec.batch_size),
                          ("--psis-datapoints", spec.psis_datapoints), ("--estimators", ",".join(spec.estimators)),
                          ("--seed", spec.seed), ("--chains", ais.num_chains), ("--ais-steps", ais.num_steps),
                          ("--ais-start", ais.start), ("--ais-schedule", ais.betas)):
        assert _help_of("evaluate", flag).endswith(f"(default: {default})"), flag
    args = _parser().parse_args(["evaluate", "run"])  # and they are the values used
    assert (args.num_samples, args.batch_size, args.psis_datapoints, args.seed, args.num_chains, args.ais_steps,
            args.ais_start, args.ais_schedule) == (spec.num_samples, spec.batch_size, spec.psis_datapoints, spec.seed,
                                                   ais.num_chains, ais.num_steps, ais.start, ais.betas)


@pytest.mark.parametrize("flags, named, not_named", [
    (["--prior", "mog", "--prior-num-components", "0"], "--prior-num-components 0", None),  # the part's own check
    (["--prior", "vamp", "--prior-pseudo-inputs", "abc"], "--prior-pseudo-inputs abc", None),  # its type
    (["--guide", "iaf", "--guide-num-flows", "0", "--prior", "flow", "--prior-num-flows", "2"],
     "--guide-num-flows 0", "--prior-num-flows"),  # one option name, two sections: the guide's
    (["--lr-schedule", "step", "--lr-schedule-gamma", "2"], "--lr-schedule-gamma 2", None),
    (["--lr-schedule", "cosine", "--lr-schedule-min-lr", "5"], "--lr-schedule-min-lr 5", None),  # "lr_min ..."
    (["--hidden", "0"], "--hidden 0", "--hidden 32"),  # checked as the net builds the decoder; FAST's
    # earlier --hidden 32 is not the value applied
    (["--optimizer", "sgd", "--optimizer-momentum", "2"], "--optimizer-momentum 2", "--optimizer sgd"),
    (["--patience", "-3"], "--patience -3", None),
])
def test_an_invalid_value_is_an_error_naming_the_flag_typed(flags, named, not_named, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--epochs", "1", "--run-dir", str(run), *FAST, *flags]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and f"error: {named}: " in err, err
    if not_named:
        assert not_named not in err
    assert not run.exists()


def test_a_value_from_a_config_file_names_no_flag(tmp_path, capsys):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"version": 2, "prior": {"name": "mog", "num_components": 0}}))
    assert main(["train", "--config", str(config), "--prior-num-components", "0", "--run-dir",
                 str(tmp_path / "a"), *FAST]) == 2
    assert "--prior-num-components 0: num_components must be a positive integer" in capsys.readouterr().err
    assert main(["train", "--config", str(config), "--run-dir", str(tmp_path / "b"), *FAST]) == 2
    err = capsys.readouterr().err
    assert "num_components must be a positive integer" in err and "--" not in err


def test_evaluate_names_its_flag_too(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path), "--num-samples", "0"]) == 2
    assert "error: --num-samples 0: " in capsys.readouterr().err


def test_a_run_ends_with_a_summary_line_and_leaves_no_lock(tmp_path, capsys):
    run = tmp_path / "tmp"
    assert main(["train", "--epochs", "1", "--latent-dim", "2", "--hidden", "32", "--no-progress",
                 "--run-dir", str(run)]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)  # stdout: the JSON summary, as before, with the stop reason
    assert summary["epochs"] == 1 and summary["stop_reason"] is None
    line = captured.err.strip().splitlines()[-1]
    assert line.startswith("pvae train: best val_elbo ") and "at epoch 1;" in line
    assert f"{summary['best_val']:.3f}" in line and "trained all 1 epoch;" in line
    assert f"the run is in {run};" in line and line.endswith(f"next: pvae evaluate {run}")
    assert (run / "checkpoint.pt").is_file() and not (run / ".lock").exists()

    assert main(["evaluate", str(run), "--num-samples", "5", "--psis-datapoints", "0", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "bits/dim" in out  # digits under a Bernoulli likelihood: discrete data
    assert not (run / ".lock").exists()


def test_the_summary_line_says_why_training_stopped_and_what_to_run_next(tmp_path):
    records = [{"epoch": e, "val_metric": "val_elbo", "val_elbo": -30.0 + e} for e in (1, 2, 3)]
    timed = History(records, best_epoch=3, time_limit_reached=True, stop_reason="time limit of 60 s reached")
    line = _finished_line(timed, tmp_path / "my run", 10)
    assert "best val_elbo -27.000 at epoch 3" in line and "after epoch 3 of 10: time limit of 60 s reached" in line
    assert line.endswith(f"continue: pvae train --run-dir '{tmp_path / 'my run'}' --resume")
    early = History(records, best_epoch=1, stopped_early=True,
                    stop_reason="early stopping: no better val_elbo for 2 epochs (best epoch 1)")
    line = _finished_line(early, tmp_path, 10)
    assert "at epoch 1;" in line and "early stopping: no better val_elbo" in line
    assert line.endswith(f"next: pvae evaluate {tmp_path}") and "\n" not in line


def test_the_lock_file_exists_only_while_the_lock_is_held(tmp_path):
    with run_lock(tmp_path / "run"):
        assert (tmp_path / "run" / ".lock").is_file()
        with pytest.raises(RunLockedError):
            with run_lock(tmp_path / "run"):
                pass
        assert (tmp_path / "run" / ".lock").is_file()  # the refused process removes nothing
    assert not (tmp_path / "run" / ".lock").exists()


def test_a_process_that_opened_the_lock_file_before_its_holder_removed_it_locks_the_new_file(tmp_path, monkeypatch):
    """B opens .lock while A holds it; A removes it and releases; B's flock then succeeds on the
    removed file: B must notice and lock the file the path names, so that a third process C is
    refused (else B and C would both 'hold' the run directory)."""
    fcntl = pytest.importorskip("fcntl")
    real_flock = fcntl.flock
    a = run_lock(tmp_path)
    a.__enter__()
    calls = []

    def flock(fd, operation):
        if not calls:  # B has opened the file; A finishes before B's flock
            calls.append(fd)
            a.__exit__(None, None, None)
        return real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", flock)
    with run_lock(tmp_path):  # B
        assert (tmp_path / ".lock").is_file()
        with pytest.raises(RunLockedError):
            with run_lock(tmp_path):  # C
                pass
    assert calls and not (tmp_path / ".lock").exists()


def test_bits_per_dim_only_for_discrete_data():
    gaussian = linear_gaussian_vae(data_dim=5, latent_dim=2, seed=0)
    x = torch.randn(20, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    report = pvae.evaluate(gaussian, x, num_samples=5, psis_datapoints=0)
    assert report.discrete is False
    summary = report.summary()
    assert "-log p(x)" in summary and "bits/dim" not in summary

    bernoulli = pvae.build_vae(pvae.RunConfig(latent_dim=2, net={"hidden": (8,)}), 6)
    binary = (torch.rand(20, 6, generator=torch.Generator().manual_seed(2)) > 0.5).float()
    report = pvae.evaluate(bernoulli, binary, num_samples=5, psis_datapoints=0)
    assert report.discrete is True and "bits/dim" in report.summary()

    report.discrete = None  # unknown (a report filled by hand): not shown
    assert "-log p(x)" in report.summary() and "bits/dim" not in report.summary()


@pytest.mark.parametrize("name, discrete", [("bernoulli", True), ("poisson", True), ("discretized-logistic", True),
                                            ("gaussian", False), ("continuous-bernoulli", False)])
def test_which_likelihoods_give_bits_per_dim(name, discrete):
    from types import SimpleNamespace

    from pvae.inference.evaluation import _likelihood_is_discrete

    program = SimpleNamespace(likelihood=pvae.LIKELIHOODS.build(name, data_dim=3))
    assert _likelihood_is_discrete(program, torch.device("cpu")) is discrete
    assert _likelihood_is_discrete(SimpleNamespace(), torch.device("cpu")) is None  # not pvae's VAE: unknown
