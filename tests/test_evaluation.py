"""evaluate(program, data, spec): one spec (EvaluationSpec, with AISSettings) for Python, runs and
the command line; the same numbers as the estimators called one by one; any program."""

import math

import pytest
import torch

import pvae
from pvae.testing import LinearGaussianHierarchy, linear_gaussian_vae


@pytest.fixture(scope="module")
def exact_vae():
    vae = linear_gaussian_vae(data_dim=5, latent_dim=2, seed=0)
    x = torch.randn(40, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2
    return vae, x


def test_evaluate_gives_what_the_estimators_give_one_by_one(exact_vae):
    """Same spec, same seed: evaluate's ELBO, L_K, naive and AIS estimates are the estimators'
    own (bit for bit), and the report records the spec that ran."""
    vae, x = exact_vae
    spec = pvae.EvaluationSpec(estimators=("elbo", "iwae", "naive", "ais"), num_samples=50, batch_size=20,
                               chunk_size=25, seed=3, psis_datapoints=0,
                               ais=pvae.AISSettings(num_chains=4, num_steps=10))
    report = pvae.evaluate(vae, x, spec)
    bounds = pvae.evaluate_bounds(vae, x, 50, batch_size=20, chunk_size=25, seed=3)
    naive = pvae.naive_prior_estimate(vae, x, 50, batch_size=20, chunk_size=25, seed=3)
    ais = pvae.ais(vae, x, spec.ais, batch_size=20, seed=3)
    for name, est in (("elbo", bounds["elbo"]), ("iwae", bounds["iwae"]), ("naive", naive), ("ais", ais)):
        assert torch.equal(report.estimates[name].values, est.values), name
    assert report.spec == spec.to_dict() and report.ais_settings == spec.ais.to_dict()
    assert report.num_samples == 50 and report.num_datapoints == 40 and report.chunk_size == 25
    assert "reconstruction" in report.estimates and report.latent["latent_dim"] == 2
    assert "40 datapoints" in report.summary()


def test_the_bounds_of_evaluate_bracket_the_exact_marginal(exact_vae):
    """ELBO <= log p(x) and L_K within Monte Carlo error of it from below (exact linear-Gaussian)."""
    vae, x = exact_vae
    report = pvae.evaluate(vae, x, num_samples=200, seed=0, psis_datapoints=0)
    exact = float(pvae.testing.exact_log_marginal(vae, x).detach().mean())
    iwae, elbo = report.estimates["iwae"], report.estimates["elbo"]
    assert elbo.mean <= iwae.mean <= exact + 4 * iwae.mc_stderr_of_mean + 1e-6


def test_evaluate_scores_a_users_program_with_several_sites():
    """A two-level hierarchy as a user's ModelGuidePair: every estimator runs, AIS over both sites
    lands within Monte Carlo error of the exact log p(x), no reconstruction (no encoder)."""
    ref = LinearGaussianHierarchy(guide="poor")
    x, _ = ref.simulate(10)
    spec = pvae.EvaluationSpec(estimators=("elbo", "iwae", "naive", "ais"), num_samples=200, psis_datapoints=0,
                               ais=pvae.AISSettings(num_chains=32, num_steps=60))
    report = pvae.evaluate(ref.pair(), x, spec)
    assert set(report.estimates) == {"elbo", "iwae", "naive", "ais"}
    exact = float(ref.exact_log_marginal(x).detach().mean())
    est = report.estimates["ais"]
    bias_allowance = 0.5 * est.mc_stderr_per_datapoint.pow(2).mean()  # log of an unbiased estimate
    assert abs(est.mean - exact + bias_allowance) <= 4 * est.mc_stderr_of_mean + 1e-3
    assert report.estimates["elbo"].mean <= report.estimates["iwae"].mean


def test_the_spec_checks_its_fields_and_takes_pvae_02_names():
    with pytest.raises(pvae.UsageError, match="unknown estimator"):
        pvae.EvaluationSpec(estimators=("elbo", "psis"))
    with pytest.raises(pvae.UsageError, match="num_samples"):
        pvae.EvaluationSpec(num_samples=0)
    with pytest.raises(pvae.UsageError, match="unknown evaluation setting.*bogus"):
        pvae.EvaluationSpec.of(bogus=1)
    spec = pvae.EvaluationSpec.of(num_samples=20, num_chains=3, ais_steps=7, ais_start="guide",
                                  ais_schedule="linear")
    assert spec.num_samples == 20
    assert spec.ais == pvae.AISSettings(num_chains=3, num_steps=7, start="guide", betas="linear")
    assert pvae.EvaluationSpec(ais={"num_chains": 2}).ais.num_chains == 2
    assert pvae.EvaluationSpec(**{**spec.to_dict(), "estimators": tuple(spec.estimators)}) == spec
    assert math.isclose(pvae.EvaluationSpec().ais.step_size, pvae.AISSettings().step_size)  # one set of defaults


def test_the_summary_warns_that_the_monte_carlo_error_of_l_k_is_understated_only_where_k_hat_says_so(exact_vae):
    """PSIS k-hat > 0.7 makes the delta-method Monte Carlo error of L_K too small (the paper's §5,
    two seeds of each shipped model): the summary says so then, and not when no datapoint is above
    0.7 or no importance-sampling estimate was reported."""
    vae, x = exact_vae
    report = pvae.evaluate(vae, x, num_samples=100, psis_datapoints=20, seed=0)
    warning = "Monte Carlo part of L_K is a delta-method error"
    report.psis = {**report.psis, "fraction_above_0.7": 0.9}
    assert warning in report.summary()
    report.psis = {**report.psis, "fraction_above_0.7": 0.0}
    assert warning not in report.summary()
    report.psis = {**report.psis, "fraction_above_0.7": 0.9}
    report.estimates = {k: v for k, v in report.estimates.items() if k != "iwae"}
    assert warning not in report.summary()
