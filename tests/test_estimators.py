"""ELBO and importance-weighted bounds against the exact linear-Gaussian log p(x).

Tolerances are Monte Carlo standard errors times the normal quantile of a stated failure
rate (1e-6 per check, see pvae.testing.mc_tolerance), never tuned to a seed.
"""

import math

import pyro
import pytest
import torch

import pvae
from pvae.estimators import evaluate_bounds, log_importance_weights
from pvae.testing import (
    exact_elbo,
    exact_log_marginal,
    linear_gaussian_vae,
    mc_tolerance,
    with_exact_guide,
)


@pytest.fixture
def model():
    return linear_gaussian_vae(data_dim=5, latent_dim=2, noise_scale=0.5)


@pytest.fixture
def x(model):
    # data simulated from the model itself
    return model.sample(40, seed=3, mean=False).detach()


@pytest.mark.parametrize("num_samples, chunk_size", [(1, 100), (37, 10), (100, 7)])
def test_exact_posterior_guide_gives_log_marginal(model, x, num_samples, chunk_size):
    """With q = p(z|x) every log-weight equals log p(x): all estimators are exact."""
    exact = exact_log_marginal(model, x).detach()
    est = evaluate_bounds(with_exact_guide(model), x, num_samples, chunk_size=chunk_size, batch_size=16)
    for name in ("elbo", "iwae"):
        assert est[name].num_samples == num_samples
        assert est[name].num_datapoints == x.shape[0]
        torch.testing.assert_close(est[name].values, exact, atol=1e-8, rtol=0)
    torch.testing.assert_close(est["iwae"].extra["ess"], torch.full((40,), float(num_samples), dtype=torch.float64))


def test_chunks_add_up_to_exactly_k(model, x):
    sizes = [lw.shape[0] for lw in log_importance_weights(model, x, 250, chunk_size=64)]
    assert sizes == [64, 64, 64, 58]
    with pytest.raises(ValueError, match="num_samples"):
        evaluate_bounds(model, x, 0)
    with pytest.raises(ValueError, match="num_samples"):
        evaluate_bounds(model, x, 2.5)


def test_elbo_estimate_is_unbiased_for_closed_form_elbo(model, x):
    est = evaluate_bounds(model, x, 4000, seed=1)["elbo"]
    exact = exact_elbo(model, x).detach()
    err = (est.values - exact).abs()
    # 40 independent checks: Bonferroni, overall failure rate 1e-6
    assert bool((err < mc_tolerance(1, 1e-6 / 40) * est.mc_stderr_per_datapoint).all())


def test_bounds_are_ordered_with_a_poor_guide(model, x):
    """E[ELBO] <= E[L_K] <= E[L_K'] <= log p(x) for K < K'. Expectations are estimated by
    averaging R independent replicates of the data-set mean; each inequality is checked up
    to the Monte Carlo standard error of the difference."""
    exact = exact_log_marginal(model, x).detach().mean()
    replicates = 60
    rows = []
    for r in range(replicates):
        elbo_1 = evaluate_bounds(model, x, 1, seed=10_000 + r)["elbo"].mean
        l_5 = evaluate_bounds(model, x, 5, seed=20_000 + r)["iwae"].mean
        l_50 = evaluate_bounds(model, x, 50, seed=30_000 + r)["iwae"].mean
        rows.append([elbo_1, l_5, l_50])
    values = torch.tensor(rows, dtype=torch.float64)
    means = values.mean(0)
    tol = mc_tolerance(1.0, 1e-6 / 3)
    for lo, hi in ((0, 1), (1, 2)):
        diff = values[:, hi] - values[:, lo]
        assert diff.mean() > -tol * diff.std() / math.sqrt(replicates)
    se_top = values[:, 2].std() / math.sqrt(replicates)
    assert means[2] < exact + tol * se_top
    # the guide is poor: the ordering is strict by many standard errors, not a tie
    assert means[1] - means[0] > 10 * (values[:, 1] - values[:, 0]).std() / math.sqrt(replicates)


def test_importance_estimate_of_p_x_is_unbiased():
    """E_q[p(x,z)/q(z|x)] = p(x). A guide wider than the posterior keeps Var[w] finite."""
    model = linear_gaussian_vae(data_dim=3, latent_dim=2, noise_scale=1.0, seed=1)
    x = model.sample(4, seed=2, mean=False).detach()
    with torch.no_grad():
        model.guide_net.encoder[0].weight.zero_()
        model.guide_net.encoder[0].bias.zero_()  # q(z|x) = N(0, softplus(0)^2) ~ N(0, 0.69^2)
    k = 200_000
    torch.manual_seed(0)
    lw = torch.cat(list(log_importance_weights(model, x, k, chunk_size=20_000))).detach()
    log_px = exact_log_marginal(model, x).detach()
    ratio = (lw - log_px).exp()  # w / p(x): mean 1 if unbiased
    se = ratio.std(0) / math.sqrt(k)
    assert bool(((ratio.mean(0) - 1).abs() < mc_tolerance(1, 1e-6 / 4) * se).all())


def test_evaluation_changes_no_parameters_and_no_global_rng(model, x):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    evaluate_bounds(model, x, 20, seed=0)
    assert torch.equal(rng, torch.get_rng_state())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert model.training  # the caller's mode is restored


def test_seeded_estimates_are_reproducible(model, x):
    a = evaluate_bounds(model, x, 30, seed=4)["iwae"].values
    b = evaluate_bounds(model, x, 30, seed=4)["iwae"].values
    assert torch.equal(a, b)


def test_estimate_report_and_bits_per_dim(model, x):
    est = evaluate_bounds(model, x, 10)["iwae"]
    report = est.to_dict()
    assert report["estimator"] == "iwae" and report["num_samples"] == 10
    assert report["units"] == "nats per datapoint"
    assert est.bits_per_dim(5) == pytest.approx(-est.mean / (5 * math.log(2)))
    assert est.stderr == pytest.approx(float(est.values.std() / math.sqrt(40)))


def test_estimators_reject_bad_data(model):
    with pytest.raises(ValueError, match="NaN"):
        evaluate_bounds(model, torch.full((3, 5), float("nan"), dtype=torch.float64), 5)
    with pytest.raises(ValueError, match="shape"):
        pvae.iwae_bound(model, torch.zeros(3, 4, dtype=torch.float64), 5)


def test_naive_prior_estimate_is_unbiased_for_p_x_and_collapses_in_high_dimension():
    from pvae.estimators import naive_prior_estimate

    model = linear_gaussian_vae(data_dim=3, latent_dim=2, noise_scale=1.0, seed=1)
    x = model.sample(4, seed=2, mean=False).detach()
    log_px = exact_log_marginal(model, x).detach()
    # exp of the estimate is unbiased for p(x): average p_hat / p(x) over 400 replicates, scored as
    # 400 stacked copies of x in one call (each row draws its own prior samples)
    copies = x.repeat(400, 1)  # row r * 4 + i is datapoint i in replicate r
    estimate = naive_prior_estimate(model, copies, 50, batch_size=copies.shape[0])
    reps = (estimate.values.reshape(400, 4) - log_px).exp()
    se = reps.std(0) / math.sqrt(400)
    assert bool(((reps.mean(0) - 1).abs() < mc_tolerance(1, 1e-6 / 4) * se).all())
    # in 60 dimensions with a sharp likelihood, prior samples almost never explain x
    big = linear_gaussian_vae(data_dim=60, latent_dim=10, noise_scale=0.3, seed=0)
    xb = big.sample(5, seed=1, mean=False).detach()
    est = naive_prior_estimate(big, xb, 1000)
    assert est.estimator == "naive-prior-mc" and est.num_samples == 1000
    assert bool((est.extra["ess"] < 5).all())
    assert bool((est.values < exact_log_marginal(big, xb).detach() - 5).all())


class _InflatedPosteriorGuide(pvae.Guide):
    """The exact posterior of a linear-Gaussian VAE with its covariance times ``inflation``:
    a guide close to (not equal to) the posterior, so bounds are tight and errors visible."""

    def __init__(self, vae, inflation=1.3):
        super().__init__(vae.data_dim, vae.latent_dim)
        object.__setattr__(self, "_vae", vae)
        self.inflation = inflation

    def forward(self, x):
        post = pvae.testing.exact_posterior(self._vae, x)
        return pyro.distributions.MultivariateNormal(post.mean, covariance_matrix=post.covariance_matrix * self.inflation)


def _near_posterior_vae(model):
    near = pvae.VAE(model.prior, model.decoder, model.likelihood, _InflatedPosteriorGuide(model))
    return near


def test_monte_carlo_standard_errors_cover_the_exact_values(model, x):
    """With a guide close to the posterior, L_K (K=200, in 7 chunks) is within ~1e-3 nats of
    log p(x) in expectation, so about 95% of the intervals L_K ± 2 s.e. (delta method) must
    contain the exact log p(x), and about 95% of ELBO ± 2 s.e. the closed-form ELBO: 5 seeds x
    40 datapoints = 200 intervals each. The band [0.90, 0.99] is 3 binomial standard deviations
    around 0.954. A dropped -log K, or a standard error off by a factor of 2, fails it."""
    near = _near_posterior_vae(model)
    exact = exact_log_marginal(model, x).detach().double()
    exact_el = exact_elbo(near, x).detach().double()
    hits = {"iwae": [], "elbo": []}
    for seed in range(5):
        est = evaluate_bounds(near, x, 200, chunk_size=30, seed=seed)
        hits["iwae"].append((est["iwae"].values - exact).abs() <= 2 * est["iwae"].mc_stderr_per_datapoint)
        hits["elbo"].append((est["elbo"].values - exact_el).abs() <= 2 * est["elbo"].mc_stderr_per_datapoint)
        assert bool((est["iwae"].mc_stderr_per_datapoint > 0).all())
    for name, h in hits.items():
        coverage = torch.cat(h).double().mean().item()
        assert 0.90 <= coverage <= 0.99, f"{name}: {coverage:.3f} of the ±2 s.e. intervals hold the exact value"
