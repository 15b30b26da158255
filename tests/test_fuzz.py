"""Fuzz the surface: every combination the registries accept either trains and evaluates to
finite numbers or is refused with a UsageError that names the problem; bad inputs get a
UsageError, never a bare traceback or a silent number. Hypothesis draws the combinations
(derandomized, so CI sees the same ones every run); PVAE_FUZZ_EXAMPLES raises the count for a
longer profile on demand."""

import math
import os
import warnings

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import pvae
from conftest import part
from pvae.config import NETS, RunConfig, build_vae
from pvae.guides import GUIDES
from pvae.likelihoods import LIKELIHOODS
from pvae.objectives import OBJECTIVES
from pvae.priors import PRIORS

EXAMPLES = int(os.environ.get("PVAE_FUZZ_EXAMPLES", "30"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

amortized_guides = [g for g in GUIDES.names() if not GUIDES.get(g).needs_index]


def _data(digits, likelihood):
    split = {"train": digits.train[:120], "valid": digits.valid[:40], "test": digits.test[:20]}
    if likelihood == "poisson":
        split = {k: v * 3 for k, v in split.items()}  # counts
    return split


def _finite(value) -> bool:
    return value is not None and math.isfinite(value)


@FUZZ
@given(prior=st.sampled_from(PRIORS.names()), guide=st.sampled_from(amortized_guides),
       likelihood=st.sampled_from(LIKELIHOODS.names()), net=st.sampled_from(NETS.names()),
       objective=st.sampled_from(OBJECTIVES.names()), particles=st.integers(1, 3),
       latent=st.integers(1, 3))
def test_every_accepted_combination_trains_and_evaluates_or_is_refused_clearly(
        digits, prior, guide, likelihood, net, objective, particles, latent):
    data = _data(digits, likelihood)
    try:
        config = RunConfig(latent_dim=latent, net=part("net", net, hidden=(16,), channels=(4, 8)),
                           objective={"name": objective, "num_particles": particles},
                           prior=part("prior", prior, num_components=2, pseudo_inputs=3),
                           likelihood=part("likelihood", likelihood, scale_mode="per-dim"),
                           guide=part("guide", guide, num_flows=1))
        vae = build_vae(config, digits.data_dim)
        history = pvae.fit(vae, data["train"], data["valid"], epochs=1, batch_size=40,
                           objective=config.build_objective(), progress=False)
    except pvae.UsageError as exc:
        assert len(str(exc)) > 20, f"a refusal must say why: {exc!r}"
        event("refused with a UsageError")
        return
    event("trained")
    assert all(_finite(v) for v in history.train_objective)
    assert all(torch.isfinite(p).all() for p in vae.parameters())
    x = data["test"]
    rec = pvae.reconstruction_error(vae, x)
    assert _finite(rec["reconstruction"].mean) and _finite(rec["squared-error"].mean)
    if vae.guide_net.has_density:
        bounds = pvae.evaluate_bounds(vae, x, 5)
        assert _finite(bounds["elbo"].mean) and _finite(bounds["iwae"].mean)
        assert bool((bounds["iwae"].values >= bounds["elbo"].values - 1e-4).all())  # same draws: Jensen
        if vae.guide_net.scores_any_point:
            assert _finite(pvae.ais(vae, x, num_chains=2, num_steps=3, start="guide").mean)
        else:
            with pytest.raises(pvae.UsageError, match="only score its own samples"):
                pvae.ais(vae, x, num_chains=2, num_steps=3, start="guide")
    else:
        with pytest.raises(pvae.UsageError, match="point mass"):
            pvae.evaluate_bounds(vae, x, 5)
    assert _finite(pvae.ais(vae, x, num_chains=2, num_steps=3, start="prior").mean)
    assert _finite(pvae.naive_prior_estimate(vae, x, 5).mean)
    pvae.latent_diagnostics(vae, x)


BAD_DATA = {
    "integer dtype": lambda d: d.train[:10].long(),
    "wrong width": lambda d: d.train[:10, :-1],
    "one dimension": lambda d: d.train[0],
    "a NaN": lambda d: torch.where(torch.arange(d.train[:10].numel()).reshape(10, -1) == 7, float("nan"), d.train[:10]),
    "an inf": lambda d: torch.where(torch.arange(d.train[:10].numel()).reshape(10, -1) == 3, float("inf"), d.train[:10]),
    "grey levels under a Bernoulli likelihood": lambda d: d.train[:10] * 0.5,
    "huge values": lambda d: d.train[:10] * 1e30,
    "empty": lambda d: d.train[:0],
    "not a tensor": lambda d: d.train[:10].numpy(),
}


@pytest.mark.parametrize("what", sorted(BAD_DATA))
def test_bad_data_gets_a_usage_error_everywhere(digits, what):
    vae = build_vae(RunConfig(latent_dim=2, net={'hidden': (8,)}), digits.data_dim)
    bad = BAD_DATA[what](digits)
    for call in (lambda: pvae.fit(vae, bad, epochs=1, progress=False),
                 lambda: pvae.evaluate_bounds(vae, bad, 3),
                 lambda: pvae.naive_prior_estimate(vae, bad, 3),
                 lambda: pvae.ais(vae, bad, num_chains=2, num_steps=2),
                 lambda: pvae.reconstruction_error(vae, bad)):
        with pytest.raises(pvae.UsageError):
            call()


@FUZZ
@given(name=st.text(min_size=1, max_size=12).filter(lambda s: s not in PRIORS.names()))
def test_unknown_names_are_usage_errors_that_list_the_choices(name):
    with pytest.raises(pvae.UsageError, match="standard-normal"):
        RunConfig(prior=name)


@pytest.mark.parametrize("argv", [
    ["train", "--prior", "nope"],
    ["train", "--latent-dim", "0"],
    ["train", "--objective", "iwae", "--beta", "4"],
    ["train", "--model", "autoencoder", "--guide", "diagonal"],
    ["train", "--device", "cuda:9"] if not torch.cuda.is_available() else ["train", "--device", "tpu"],
    ["evaluate", "/nonexistent/run"],
])
def test_bad_command_lines_are_one_line_usage_errors(argv, capsys, tmp_path):
    from pvae.cli import main

    if argv[0] == "train":
        argv = argv + ["--run-dir", str(tmp_path / "r"), "--epochs", "1", "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("pvae ") and len(err.strip().splitlines()) == 1


def _train_flags():
    from pvae.cli import _parser

    train = _parser()._subparsers._group_actions[0].choices["train"]
    skip = {"-h", "--help", "--config", "--run-dir", "--resume", "--no-progress", "--device", "--epochs",
            "--dataset", "--max-time", "--checkpoint-every", "--batch-size", "--compile", "--step"}
    return sorted(s for a in train._actions for s in a.option_strings if s not in skip and not s.startswith("--no-"))


_NAMES = sorted(set(PRIORS.names()) | set(GUIDES.names()) | set(LIKELIHOODS.names()) | set(NETS.names())
                | set(OBJECTIVES.names()) | {"gated", "relu", "global", "cyclical", "bce", "mse", "autoencoder"})
_VALUES = st.one_of(st.sampled_from(_NAMES), st.integers(-2, 4).map(str), st.sampled_from(
    ["0.5", "1e9", "nan", "-inf", "none", "8,8", "", "x", "4,0"]))


@settings(max_examples=max(EXAMPLES // 2, 10), deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(flags=st.lists(st.tuples(st.sampled_from(_train_flags()), _VALUES), max_size=4))
def test_any_command_line_trains_or_is_refused_in_one_line_and_writes_nothing(flags):
    """Drawn `pvae train` command lines (every generated flag, valid and invalid values): the run
    trains (exit 0, a checkpoint) or is refused (exit 2: one line, or argparse's usage message for
    an unparsable value) and nothing is written; never exit 1 (a bug) or a traceback."""
    import contextlib
    import io
    import tempfile
    from pathlib import Path

    from pvae.cli import main

    argv = ["train", "--dataset", "digits", "--latent-dim", "2", "--hidden", "8", "--epochs", "1",
            "--no-progress"]
    for flag, value in flags:
        argv += [flag] if flag in ("--dreg",) else [flag, value]
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = main(argv + ["--run-dir", str(run)])
            except SystemExit as exc:  # argparse: a value of the wrong type or an unknown choice
                code = exc.code
        message = err.getvalue()
        assert code in (0, 2), f"exit {code} for {argv}:\n{message}"
        assert "Traceback" not in message, argv
        if code == 0:
            event("trained")
            assert (run / "checkpoint.pt").exists()
        else:
            event("refused")
            assert not (run / "checkpoint.pt").exists() and not (run / "config.json").exists(), argv


@FUZZ
@given(family=st.sampled_from(["hvae", "cvae", "m2", "mixture"]), levels=st.integers(2, 3),
       variant=st.sampled_from(["tomczak", "ladder"]),
       prior=st.one_of(st.just("standard-normal"), st.sampled_from(PRIORS.names())),  # (only hvae takes others)
       likelihood=st.sampled_from(["bernoulli", "continuous-bernoulli", "gaussian"]),
       objective=st.sampled_from(["elbo", "elbo-analytic-kl", "iwae"]), relaxed=st.booleans(),
       latent=st.integers(1, 3))
def test_every_model_family_trains_and_evaluates_or_is_refused_clearly(
        digits, family, levels, variant, prior, likelihood, objective, relaxed, latent):
    """The families of issue 25 through the same surface: every combination trains and yields
    finite bounds (L_K >= ELBO on the same draws), AIS from the prior and the latent diagnostics,
    or is refused with a UsageError that says why (a prior other than the family's own, ...)."""
    from pvae.families import build_program, model_data, resolve

    options = {"hvae": {"levels": levels, "variant": variant}, "m2": {"labelled": 100},
               "mixture": {"components": 3, "relaxed": relaxed}, "cvae": {}}[family]
    try:
        config = RunConfig(dataset="digits", model={"name": family, **options}, latent_dim=latent,
                           net={"hidden": (16,)}, objective={"name": objective, "num_particles": 2},
                           prior=part("prior", prior, num_components=2, pseudo_inputs=3),
                           likelihood=part("likelihood", likelihood, scale_mode="per-dim"))
        config = resolve(config, digits)
        program = build_program(config, digits.data_dim)
        train = model_data(config, digits, "train", training=True)[:200]
        history = pvae.fit(program, train, model_data(config, digits, "valid")[:40], epochs=1, batch_size=50,
                           objective=config.build_objective(), progress=False)
    except pvae.UsageError as exc:
        assert len(str(exc)) > 20, f"a refusal must say why: {exc!r}"
        event("refused with a UsageError")
        return
    event(f"trained {family}")
    assert all(_finite(v) for v in history.train_objective)
    x = model_data(config, digits, "test")[:20]
    bounds = pvae.evaluate_bounds(program, x, 5)
    assert _finite(bounds["elbo"].mean) and _finite(bounds["iwae"].mean)
    assert bool((bounds["iwae"].values >= bounds["elbo"].values - 1e-4).all())
    assert _finite(pvae.naive_prior_estimate(program, x, 5).mean)
    if family != "cvae":
        assert _finite(pvae.ais(program, x, num_chains=2, num_steps=3, start="prior").mean)
    with warnings.catch_warnings():  # one epoch on 200 digits: collapsed units are expected
        warnings.filterwarnings("ignore", message="posterior collapse")
        latent = pvae.latent_diagnostics(program, x)
    assert 0 <= latent["active_units"] <= latent["latent_dim"]
