"""AIS and its HMC kernel against exact answers (tolerances from Monte Carlo standard errors)."""

import math

import pyro.distributions as dist
import pytest
import torch

from pvae.annealing import ais, hmc_step, schedule
from pvae.estimators import naive_prior_estimate
from pvae.testing import exact_log_marginal, linear_gaussian_vae, mc_tolerance


@pytest.fixture
def model():
    return linear_gaussian_vae(data_dim=5, latent_dim=2, noise_scale=0.5, seed=0)


def test_two_point_schedule_is_importance_sampling_from_the_prior(model):
    x = model.sample(7, seed=1, mean=False).detach()
    a = ais(model, x, num_chains=64, betas=[0.0, 1.0], seed=3)
    b = naive_prior_estimate(model, x, 64, chunk_size=64, seed=3)
    torch.testing.assert_close(a.values, b.values, atol=1e-10, rtol=0)


def test_ais_is_unbiased_for_p_x(model):
    """E[p_hat / p(x)] = 1: replicate AIS with independent seeds and check the mean ratio."""
    x = model.sample(4, seed=2, mean=False).detach()
    log_px = exact_log_marginal(model, x).detach()
    reps = torch.stack([
        (ais(model, x, num_chains=4, num_steps=30, seed=s).values - log_px).exp() for s in range(40)
    ])  # (40, 4)
    se = reps.std(0) / math.sqrt(40)
    assert bool(((reps.mean(0) - 1).abs() < mc_tolerance(1, 1e-6 / 4) * se).all())


def test_ais_beats_naive_prior_sampling_at_equal_chains(model):
    x = model.sample(10, seed=4, mean=False).detach()
    log_px = exact_log_marginal(model, x).detach()
    a = ais(model, x, num_chains=8, num_steps=50, seed=0)
    naive = naive_prior_estimate(model, x, 8, seed=0)
    assert (log_px - a.values).abs().mean() < (log_px - naive.values).abs().mean()
    assert bool((a.extra["accept_rate"] > 0.3).all())


def test_hmc_leaves_a_correlated_gaussian_invariant():
    torch.manual_seed(0)
    cov = torch.tensor([[1.0, 0.8], [0.8, 1.0]], dtype=torch.float64)
    target = dist.MultivariateNormal(torch.zeros(2, dtype=torch.float64), cov)
    n = 20000
    z = target.sample((n,))
    for _ in range(5):
        z, acc = hmc_step(z, target.log_prob, torch.tensor(0.3, dtype=torch.float64), num_leapfrog=5)
    assert acc.mean() > 0.5
    tol = mc_tolerance(1.0, 1e-6 / 5)
    assert bool((z.mean(0).abs() < tol * z.std(0) / math.sqrt(n)).all())
    # second moments: E[z1^2], E[z2^2], E[z1 z2] against the target's
    for f, expected in ((z[:, 0] ** 2, 1.0), (z[:, 1] ** 2, 1.0), (z[:, 0] * z[:, 1], 0.8)):
        assert abs(f.mean() - expected) < tol * f.std() / math.sqrt(n)


def test_schedules_and_bad_arguments(model):
    for kind in ("linear", "sigmoid"):
        b = schedule(10, kind)
        assert b[0] == 0 and b[-1] == 1 and bool((b.diff() > 0).all())
    with pytest.raises(ValueError, match="valid choices: linear, sigmoid"):
        schedule(10, "cosine")
    x = torch.zeros(2, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match="from 0 to 1"):
        ais(model, x, betas=[0.0, 0.5])


def test_bdmc_sandwiches_the_exact_log_marginal(model):
    """Forward AIS is a lower bound and reverse AIS an upper bound in expectation: over R
    independent replicates, the mean errors (averaged over datapoints) have the right signs
    up to their Monte Carlo standard errors, and the sandwich is narrow."""
    from pvae.annealing import bdmc

    torch.manual_seed(5)
    z = model.prior().sample((6,)).double()
    x = model.likelihood(model.decoder(z)).sample().detach()  # z is an exact posterior sample
    log_px = exact_log_marginal(model, x).detach()
    rows = []
    for seed in range(10):
        out = bdmc(model, x, z, num_chains=8, num_steps=50, seed=100 * seed)
        rows.append([(out.lower.values - log_px).mean(), (out.upper.values - log_px).mean()])
    err = torch.tensor(rows, dtype=torch.float64)  # (R, 2): lower - exact, upper - exact
    se = err.std(0) / math.sqrt(len(rows))
    tol = mc_tolerance(1.0, 1e-6 / 2)
    assert err[:, 0].mean() < tol * se[0]   # E[lower] <= log p(x)
    assert err[:, 1].mean() > -tol * se[1]  # E[upper] >= log p(x)
    # measured: gap 0.38 ± 0.10 nats with 50 steps; 1 nat is 6 s.e. away, and a broken
    # reverse chain gives gaps of ~10 nats (a sign error did exactly that while writing this)
    assert (err[:, 1] - err[:, 0]).mean() < 1.0
    with pytest.raises(TypeError, match="unknown option.*'chains'"):
        bdmc(model, x, z, chains=8)


def test_progress_bar_changes_no_number(model, capsys):
    vae = model
    x = torch.randn(5, 5, dtype=torch.float64)
    quiet = ais(vae, x, num_chains=3, num_steps=5, batch_size=2)
    shown = ais(vae, x, num_chains=3, num_steps=5, batch_size=2, progress=True)
    assert torch.equal(quiet.values, shown.values)
    assert "AIS 3 chains" in capsys.readouterr().err


def test_hmc_with_large_steps_keeps_the_target_only_through_the_accept_step():
    """Leapfrog with eps * omega = 1.57 on the stiff direction of a correlated Gaussian (stable
    but with a large energy error): without the Metropolis correction the chain's variance along
    that direction grows by about 1 / (1 - 1.57^2 / 4) = 2.6, so checking the second moments
    after 20 transitions from exact draws fails for a kernel that skips the accept step."""
    torch.manual_seed(1)
    cov = torch.tensor([[1.0, 0.8], [0.8, 1.0]], dtype=torch.float64)  # eigenvalues 1.8 and 0.2
    target = dist.MultivariateNormal(torch.zeros(2, dtype=torch.float64), cov)
    n = 20000
    z = target.sample((n,))
    eps = torch.tensor(0.7, dtype=torch.float64)  # omega = 1 / sqrt(0.2) = 2.24
    accept = []
    for _ in range(20):
        z, acc = hmc_step(z, target.log_prob, eps, num_leapfrog=3)
        accept.append(acc.mean())
    assert 0.05 < float(torch.stack(accept).mean()) < 0.95  # the correction is doing work
    tol = mc_tolerance(1.0, 1e-6 / 3)
    stiff = (z[:, 0] - z[:, 1]) / math.sqrt(2)  # the eigenvector of eigenvalue 0.2
    for f, expected in ((z[:, 0] ** 2, 1.0), (z[:, 1] ** 2, 1.0), (stiff ** 2, 0.2)):
        assert abs(f.mean() - expected) < tol * f.std() / math.sqrt(n)


def test_ais_accuracy_grows_with_the_number_of_steps():
    """AIS from the prior: with 300 transitions the 20 per-datapoint estimates sit at the exact
    log p(x) (mean error within its Monte Carlo tolerance, mean absolute error below 0.3 nats,
    against 0.84 for a kernel that never moves, whose estimate stays importance sampling from
    the prior however many steps it takes), and far closer than with 3 transitions."""
    model = linear_gaussian_vae(data_dim=5, latent_dim=2, noise_scale=0.5)
    x = model.sample(20, seed=5, mean=False).detach()
    exact = exact_log_marginal(model, x).detach()
    few = ais(model, x, num_chains=32, num_steps=3, start="prior", seed=1)
    many = ais(model, x, num_chains=32, num_steps=300, start="prior", seed=1)
    err_few, err_many = (few.values - exact), (many.values - exact)
    assert abs(err_many.mean()) < mc_tolerance(many.mc_stderr_of_mean, 1e-6)
    assert err_many.abs().mean() < 0.3
    assert err_many.abs().mean() < 0.5 * err_few.abs().mean()


def test_the_bdmc_gap_shrinks_as_the_annealing_lengthens(model):
    """The BDMC sandwich (reverse minus forward AIS) closes with more transitions: measured mean
    gaps 6.2 (2 steps), 1.5 (10) and 0.5 nats (40) on ten simulated datapoints; each must be
    below the previous one by more than the Monte Carlo tolerance of the difference (eight
    independent replicates). A reverse chain that does not run the schedule backwards, or an
    HMC kernel that does not move, keeps the gap from closing."""
    from pvae.annealing import bdmc

    torch.manual_seed(5)
    z = model.prior().sample((10,)).double()
    x = model.likelihood(model.decoder(z)).sample().detach()
    tol = mc_tolerance(1.0, 1e-6 / 2)
    stats = []
    for steps in (2, 10, 40):
        gaps = torch.stack([bdmc(model, x, z, num_chains=4, num_steps=steps, seed=100 * r).gap.mean()
                            for r in range(8)])
        stats.append((gaps.mean(), gaps.std() / math.sqrt(len(gaps))))
    for (gap_short, se_short), (gap_long, se_long) in zip(stats, stats[1:]):
        assert gap_short - gap_long > tol * math.sqrt(se_short ** 2 + se_long ** 2), stats
    assert stats[-1][0] < 1.0
