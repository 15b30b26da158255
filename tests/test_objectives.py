"""Training objectives: identities between them, unbiasedness against closed forms on the
linear-Gaussian model (tolerances from Monte Carlo standard errors), logged values equal to the
estimators', schedules, and configuration errors."""

import math

import pyro
import pytest
import torch

import pvae
from conftest import t_tolerance
from pvae.objectives import KLSchedule, gaussian_kernel, mmd_squared
from pvae.testing import (
    exact_elbo,
    exact_log_marginal,
    linear_gaussian_vae,
    mc_tolerance,
    with_exact_guide,
)


def lg_data(n=4, seed=1):
    return torch.randn(n, 5, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def value_and_grads(objective, vae, x, seed):
    vae.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss, value = objective.loss_and_value(vae, x)
    loss.backward()
    return value, [p.grad.clone() for p in vae.parameters()]


def assert_same(a, b):
    (va, ga), (vb, gb) = a, b
    torch.testing.assert_close(va, vb)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y)


def test_iwae_with_one_sample_is_the_elbo_value_and_gradient():
    vae, x = linear_gaussian_vae(), lg_data()
    assert_same(value_and_grads(pvae.make_objective("iwae", 1), vae, x, 3),
                value_and_grads(pvae.make_objective("elbo", 1), vae, x, 3))


@pytest.mark.parametrize("dreg", [False, True])
def test_annealed_iwae_with_one_sample_is_the_warmed_up_elbo(dreg):
    """K = 1: log p(x|z) + beta_t (log p(z) - log q(z|x)) is the warmed-up ELBO's sampled
    estimate, value and gradient on the same noise, at every point of the warm-up. (With DReG
    the guide's gradient at K = 1 is the path derivative alone, without the zero-mean score term,
    so only the value and the model's gradient are compared.) Fails if the weight is ignored or
    applied to the likelihood."""
    vae, x = linear_gaussian_vae(), lg_data()
    guide_ids = {id(p) for p in vae.guide_net.parameters()}
    compared = [i for i, p in enumerate(vae.parameters()) if not (dreg and id(p) in guide_ids)]
    for progress in (0.0, 3.0, 10.0):
        iwae = pvae.make_objective("iwae", 1, dreg=dreg, kl_warmup=10)
        elbo = pvae.make_objective("elbo", 1, kl_warmup=10)
        iwae.set_progress(progress), elbo.set_progress(progress)
        assert iwae.kl_weight == elbo.kl_weight == progress / 10
        (v_iwae, g_iwae), (v_elbo, g_elbo) = value_and_grads(iwae, vae, x, 3), value_and_grads(elbo, vae, x, 3)
        assert_same((v_iwae, [g_iwae[i] for i in compared]), (v_elbo, [g_elbo[i] for i in compared]))


def test_annealed_iwae_after_its_warmup_is_the_iwae_bound():
    vae, x = linear_gaussian_vae(), lg_data()
    for dreg in (False, True):
        warm = pvae.make_objective("iwae", 5, dreg=dreg, kl_warmup=4, kl_schedule="linear")
        warm.set_progress(4.0)
        assert warm.has_kl_term and warm.options()["kl_warmup"] == 4.0
        plain = pvae.make_objective("iwae", 5, dreg=dreg)
        assert not plain.has_kl_term and "kl_warmup" not in plain.options()
        assert_same(value_and_grads(warm, vae, x, 3), value_and_grads(plain, vae, x, 3))


def pyro_value_and_grads(elbo_class, vae, x, seed):
    """Pyro's own ELBO of the VAE's programs (4 vectorized particles): the independent reference."""
    vae.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with pyro.poutine.trace(param_only=True):
        loss = elbo_class(num_particles=1, vectorize_particles=True, max_plate_nesting=1).differentiable_loss(
            vae.model, vae.guide, x)
    loss.backward()
    return -loss.detach() / x.shape[0], [p.grad.clone() / x.shape[0] for p in vae.parameters()]


@pytest.mark.parametrize("name, elbo_class", [("elbo", pyro.infer.Trace_ELBO),
                                              ("elbo-analytic-kl", pyro.infer.TraceMeanField_ELBO)])
def test_beta_one_and_finished_warmup_are_the_elbo(name, elbo_class):
    """beta = 1 and a finished warm-up (linear, cyclical) give Pyro's own ELBO on the same noise, in
    value and gradient (per datapoint): a KL weight left at 0.999, or applied to the wrong site,
    fails."""
    vae, x = linear_gaussian_vae(), lg_data()
    plain = pyro_value_and_grads(elbo_class, vae, x, 4)
    assert_same(value_and_grads(pvae.make_objective(name, beta=1.0), vae, x, 4), plain)
    for kind in ("linear", "cyclical"):
        warm = pvae.make_objective(name, kl_warmup=10, kl_schedule=kind)
        warm.set_progress(10.0 if kind == "linear" else 7.5)  # full weight
        assert warm.kl_weight == 1.0
        assert_same(value_and_grads(warm, vae, x, 4), plain)


def test_warmup_at_its_start_is_the_reconstruction_objective():
    vae, x = linear_gaussian_vae(), lg_data()
    warm = pvae.make_objective("elbo", kl_warmup=5)
    warm.set_progress(0.0)
    assert_same(value_and_grads(warm, vae, x, 2), value_and_grads(pvae.make_objective("reconstruction"), vae, x, 2))


def test_kl_schedules():
    linear = KLSchedule(beta=2.0, warmup=4, kind="linear")
    assert [linear(t) for t in (0, 1, 4, 9)] == [0.0, 0.5, 2.0, 2.0]
    cyc = KLSchedule(beta=1.0, warmup=4, kind="cyclical")
    assert [cyc(t) for t in (0, 1, 2, 3, 4, 5)] == [0.0, 0.5, 1.0, 1.0, 0.0, 0.5]
    assert KLSchedule(beta=3.0)(0.0) == 3.0
    assert cyc(math.inf) == linear(math.inf) / 2.0 == 1.0  # outside training: full weight
    for bad in ({"beta": -1}, {"warmup": -2}, {"warmup": 1, "kind": "cosine"}):
        with pytest.raises(ValueError):
            KLSchedule(**bad)


def _gradient_check(objective, vae, x, exact_fn, groups=200, copies=20):
    """Mean of the objective's value and gradient over groups * copies = 4000 independent
    replicates vs the autograd gradient of the closed form; each coordinate within its MCSE
    tolerance (Bonferroni over coordinates). A call scores ``copies`` copies of ``x`` stacked in
    one batch (value and gradient are batch means, so a call is the mean of ``copies``
    replicates); the standard errors come from the ``groups`` calls (Student's t tolerance)."""
    params = list(vae.parameters())
    vae.zero_grad(set_to_none=True)
    exact = exact_fn(vae, x).mean()
    exact_grads = torch.autograd.grad(exact, params)
    stacked = x.repeat(copies, 1)
    values, grads = [], []
    torch.manual_seed(0)
    for _ in range(groups):
        loss, value = objective.loss_and_value(vae, stacked)
        g = torch.autograd.grad(loss, params)
        values.append(value)
        grads.append(-torch.cat([t.flatten() for t in g]))
    values, grads = torch.stack(values), torch.stack(grads)
    target = torch.cat([t.flatten() for t in exact_grads])
    n_coords = target.numel() + 1
    se = values.std() / math.sqrt(groups)
    assert abs(values.mean() - exact) < t_tolerance(se, groups - 1, 1e-6 / n_coords)
    g_se = grads.std(0) / math.sqrt(groups)
    tol = t_tolerance(g_se, groups - 1, 1e-6 / n_coords) + 1e-10
    assert bool(((grads.mean(0) - target).abs() < tol).all()), (grads.mean(0) - target)


@pytest.mark.parametrize("name", ["elbo", "elbo-analytic-kl"])
@pytest.mark.parametrize("beta", [1.0, 4.0])
def test_beta_elbo_value_and_gradient_are_unbiased_for_the_closed_form(name, beta):
    vae, x = linear_gaussian_vae(), lg_data(3)
    _gradient_check(pvae.make_objective(name, beta=beta), vae, x, lambda v, d: exact_elbo(v, d, beta))


def test_iwae_with_the_exact_posterior_is_log_px_and_its_gradient():
    vae = with_exact_guide(linear_gaussian_vae())
    x = lg_data()
    loss, value = pvae.make_objective("iwae", 7).loss_and_value(vae, x)
    exact = exact_log_marginal(vae, x).mean()
    torch.testing.assert_close(value, exact.detach(), rtol=0, atol=1e-8)
    params = list(vae.decoder.parameters())
    for g, e in zip(torch.autograd.grad(-loss, params), torch.autograd.grad(exact, params)):
        torch.testing.assert_close(g, e, rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize("progress", [math.inf, 3.0])
def test_dreg_and_iwae_gradients_have_the_same_expectation(progress):
    """Both are unbiased for the gradient of E[L_K]; DReG's guide gradient has lower variance.
    Also 30% of the way through a warm-up of the weights' prior term (beta_t = 0.3), where DReG's
    multiplier is (1 - beta_t) + beta_t w~ rather than w~. The two estimators are drawn on the
    same noise, so the test is on the mean of paired differences (their shared noise cancels):
    it fails for the multiplier w~, for none, or for beta_t + (1 - beta_t) w~. The 3000 draws are
    100 calls on 30 stacked copies of the data (a call's gradient is the mean of 30 draws)."""
    vae, x = linear_gaussian_vae(), lg_data(3)
    params = list(vae.parameters())
    objectives = {}
    for dreg in (False, True):
        objectives[dreg] = pvae.make_objective("iwae", 5, dreg=dreg, kl_warmup=10)
        objectives[dreg].set_progress(progress)

    def gradient(dreg, seed):  # the mean gradient over 30 copies of x, one call
        torch.manual_seed(seed)
        loss = objectives[dreg].loss_and_value(vae, stacked)[0]
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])

    groups, copies = 100, 30  # 3000 replicates, as 100 group means
    stacked = x.repeat(copies, 1)
    out = {dreg: torch.stack([gradient(dreg, seed) for seed in range(groups)]) for dreg in (False, True)}
    paired = out[True] - out[False]
    diff, se = paired.mean(0), (paired.var(0) / groups).sqrt()
    tol = t_tolerance(se, groups - 1, 1e-6 / diff.numel()) + 1e-10
    assert bool((diff.abs() < tol).all()), diff
    guide_ids = {id(p) for p in vae.guide_net.parameters()}
    is_guide = torch.cat([torch.full((p.numel(),), id(p) in guide_ids) for p in params])
    assert out[True][:, is_guide].var(0).sum() < out[False][:, is_guide].var(0).sum()


def _hand_log_weights(vae, x, chunks):
    """log p(x|z) + log p(z) - log q(z|x) for z ~ q drawn chunk by chunk, written out with the
    parts' distributions only (no pvae estimator, engine or objective code)."""
    q = vae.guide_net(x)
    out = []
    for k in chunks:
        z = q.rsample((k,))
        out.append(vae.likelihood(vae.decoder(z)).log_prob(x) + vae.prior().log_prob(z) - q.log_prob(z))
    return torch.cat(out)  # (K, B)


def test_logged_iwae_value_and_multi_chunk_bound_against_an_independent_computation():
    """The objective's logged L_K (one chunk) and the estimator's L_K and ELBO over four chunks
    (4 + 4 + 4 + 1 = 13 samples, two batches) equal log-mean-exp / mean of log-weights written by
    hand from the same draws. Fails when chunks are merged wrongly (a chunk dropped, log K
    replaced by the chunk's size, a batch's draws reused or drawn from another seed)."""
    vae, x = linear_gaussian_vae(), lg_data(6)
    for dreg in (False, True):
        with pvae._rng.seeded(9):
            _, value = pvae.make_objective("iwae", 13, dreg=dreg).loss_and_value(vae, x)
        with pvae._rng.seeded(9), torch.no_grad():
            lw = _hand_log_weights(vae, x, [13])
        torch.testing.assert_close(value, (torch.logsumexp(lw, 0) - math.log(13)).mean())
    bounds = pvae.evaluate_bounds(vae, x, 13, batch_size=4, chunk_size=4, seed=9)
    parts = []  # minibatch i draws from the seed (9, i) (what makes sharded evaluation exact)
    for i, xb in enumerate(x.split(4)):
        with pvae._rng.seeded(pvae.distributed.batch_seed(9, i)), torch.no_grad():
            parts.append(_hand_log_weights(vae, xb, [4, 4, 4, 1]))
    lw = torch.cat(parts, dim=1)
    torch.testing.assert_close(bounds["iwae"].values, (torch.logsumexp(lw, 0) - math.log(13)).double())
    torch.testing.assert_close(bounds["elbo"].values, lw.double().mean(0))
    assert bounds["iwae"].num_samples == bounds["elbo"].num_samples == 13


def test_pyro_renyi_elbo_agrees_with_the_per_datapoint_bound_for_this_plate_structure():
    """Cross-check against Pyro (pyro#3104): RenyiELBO(alpha=0) keeps the plates shared by all
    sites, so with every site in the "data" plate its value is the sum of per-datapoint L_K on
    the same draws — not the bound on the batch's joint likelihood. (pvae still computes L_K
    itself: RenyiELBO has no differentiable_loss for module parameters, and no DReG.)"""
    vae, x = linear_gaussian_vae(), lg_data(4)
    k = 6
    renyi = pyro.infer.RenyiELBO(alpha=0, num_particles=k, vectorize_particles=True, max_plate_nesting=1)
    torch.manual_seed(1)
    renyi_value = -renyi.loss(vae.model, vae.guide, x)
    torch.manual_seed(1)
    lw = next(pvae.log_importance_weights(vae, x, k)).detach()
    per_datapoint = float((torch.logsumexp(lw, 0) - math.log(k)).sum())
    batch_bound = float(torch.logsumexp(lw.sum(1), 0) - math.log(k))
    assert renyi_value == pytest.approx(per_datapoint, rel=1e-9)
    assert per_datapoint > batch_bound + 1e-3  # the two readings differ on these draws


def _expected_kernel(mean_a, var_a, mean_b, var_b, dim):
    h = dim * dim / 2.0  # exp(-|a-b|^2 / L^2) = exp(-|a-b|^2 / (2h))
    s = h + var_a + var_b
    return (h / s) ** (dim / 2) * math.exp(-((mean_a - mean_b) ** 2) * dim / (2 * s))


def test_mmd_estimate_is_unbiased_for_the_closed_form():
    dim, shift, n = 3, 0.7, 8
    exact = (_expected_kernel(0, 1, 0, 1, dim) + _expected_kernel(shift, 1, shift, 1, dim)
             - 2 * _expected_kernel(0, 1, shift, 1, dim))
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([
        mmd_squared(torch.randn(n, dim, generator=g, dtype=torch.float64),
                    shift + torch.randn(n, dim, generator=g, dtype=torch.float64))
        for _ in range(4000)
    ])
    assert abs(draws.mean() - exact) < mc_tolerance(draws.std() / math.sqrt(len(draws)))
    same = torch.stack([mmd_squared(torch.randn(n, dim, generator=g), torch.randn(n, dim, generator=g))
                        for _ in range(4000)])
    assert abs(same.mean()) < mc_tolerance(same.std() / math.sqrt(len(same)))  # 0 for P = Q
    assert torch.allclose(gaussian_kernel(torch.zeros(1, 2), torch.ones(1, 2)), torch.tensor([[math.exp(-0.5)]]))
    with pytest.raises(ValueError, match="at least 2"):
        mmd_squared(torch.zeros(1, 2), torch.zeros(3, 2))


def test_infovae_with_alpha_0_lambda_1_is_the_elbo_on_the_same_samples():
    vae, x = linear_gaussian_vae(), lg_data(5)
    with pvae._rng.seeded(2):
        _, value = pvae.make_objective("infovae", info_alpha=0.0, mmd_lambda=1.0).loss_and_value(vae, x)
    with pvae._rng.seeded(2):
        lw = next(pvae.log_importance_weights(vae, x, 1))
    torch.testing.assert_close(value, lw.mean())


def test_infovae_value_is_its_formula_on_the_same_draws_and_trains_every_part():
    """value = E[log p(x|z)] - (1-a) KL - (a+l-1) MMD^2, recomputed by hand from the same draws;
    with alpha = 1 the KL is absent and the MMD term alone pulls the guide."""
    vae, x = linear_gaussian_vae(), lg_data(6)
    objective = pvae.make_objective("infovae", 2, info_alpha=0.5, mmd_lambda=10.0)
    with pvae._rng.seeded(4):
        _, value = objective.loss_and_value(vae, x)
    with pvae._rng.seeded(4), torch.no_grad():
        q = vae.guide_distribution(x)
        z = q.rsample((2,))
        prior_draws = vae.prior().expand((2, 6)).rsample()  # (particles, batch, L), drawn after z
        loglik = vae.log_likelihood(x, z).mean(0)
        kl = (q.log_prob(z) - vae.log_prior(z)).mean(0)
        mmd = torch.stack([mmd_squared(z[i], prior_draws[i]) for i in range(2)]).mean()
    torch.testing.assert_close(value, (loglik - 0.5 * kl).mean() - 9.5 * mmd)
    loss, value = objective.loss_and_value(vae, x)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in vae.parameters())
    mmd_only = pvae.make_objective("infovae", info_alpha=1.0, mmd_lambda=5.0)
    vae.zero_grad(set_to_none=True)
    mmd_only.loss_and_value(vae, x)[0].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in vae.guide_net.parameters())


def test_infovae_with_a_mixture_prior_and_its_batch_size_check(tmp_path):
    vae = pvae.build_vae(pvae.RunConfig(latent_dim=2, prior='mog', net={'hidden': (8,)}), 6)
    x = (torch.rand(5, 6) < 0.5).float()
    loss, _ = pvae.make_objective("infovae").loss_and_value(vae, x)
    loss.backward()  # mixtures are sampled without a pathwise gradient; the rest trains
    data = (torch.rand(201, 6) < 0.5).float()
    with pytest.raises(ValueError, match="at least 2 datapoints.*last batch of 1"):
        pvae.fit(vae, data, epochs=1, objective="infovae", run_dir=tmp_path, progress=False)
    assert not any(tmp_path.iterdir())


def test_dreg_with_a_flow_guide_is_refused_before_training(tmp_path):
    vae = pvae.build_vae(pvae.RunConfig(latent_dim=2, guide='iaf', net={'hidden': (8,)}), 6)
    with pytest.raises(ValueError, match="DReG"):
        pvae.fit(vae, (torch.rand(20, 6) < 0.5).float(), epochs=1,
                 objective=pvae.make_objective("iwae", 3, dreg=True), run_dir=tmp_path, progress=False)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("name, options, match", [
    ("iwae", {"beta": 2.0}, "'iwae' does not take beta"),
    ("elbo", {"dreg": True}, "'elbo' does not take dreg"),
    ("infovae", {"info_alpha": 2.0}, "alpha must be <= 1"),
    ("infovae", {"info_alpha": 0.0, "mmd_lambda": 0.5}, "info_alpha \\+ mmd_lambda - 1 >= 0"),
    ("elbo", {"momentum": 1}, "'elbo' does not take momentum; it takes num_particles, beta"),
    ("elbo", {"kl_warmup": -1.0}, "warm-up"),
])
def test_bad_objective_options_are_named(name, options, match):
    with pytest.raises(ValueError, match=match):
        pvae.make_objective(name, 2, **options)
    with pytest.raises(ValueError, match=match):  # the config validates the same way
        pvae.RunConfig(objective={"name": name, "num_particles": 2, **options})


def test_dreg_refuses_a_guide_without_a_stopped_density():
    vae = pvae.build_vae(pvae.RunConfig(latent_dim=2, guide='planar', net={'hidden': (8,)}), 6)
    x = (torch.rand(3, 6) < 0.5).float()
    with pytest.raises(ValueError, match="DReG.*Gaussian guides"):
        pvae.make_objective("iwae", 2, dreg=True).loss_and_value(vae, x)


@pytest.mark.parametrize("name, options", [("elbo", {}), ("iwae", {"num_particles": 3})])
def test_fit_follows_the_warmup_and_refuses_to_resume_with_other_options(tmp_path, name, options):
    torch.manual_seed(0)
    data = (torch.rand(200, 6) < 0.4).float()
    vae = pvae.build_vae(pvae.RunConfig(latent_dim=2, net={'hidden': (8,)}), 6)
    objective = pvae.make_objective(name, kl_warmup=4, **options)
    history = pvae.fit(vae, data, epochs=3, objective=objective, run_dir=tmp_path, progress=False)
    weights = [r["kl_weight"] for r in history.records]
    steps = 2  # 200 / 100
    assert weights == pytest.approx([(e + (steps - 1) / steps) / 4 for e in range(3)])
    assert objective.kl_weight == 1.0  # outside training: full weight
    with pytest.raises(ValueError, match="cannot resume"):
        pvae.fit(vae, data, epochs=4, objective=pvae.make_objective(name, kl_warmup=8, **options),
                 run_dir=tmp_path, resume=True, progress=False)
    with pytest.raises(ValueError, match="cannot resume"):  # nor without the warm-up it started with
        pvae.fit(vae, data, epochs=4, objective=pvae.make_objective(name, **options),
                 run_dir=tmp_path, resume=True, progress=False)
    pvae.fit(vae, data, epochs=4, objective=pvae.make_objective(name, kl_warmup=4, **options),
             run_dir=tmp_path, resume=True, progress=False)


def test_free_bits_zero_is_the_analytic_kl_elbo_and_its_formula_otherwise():
    """FreeBitsObjective itself at lambda = 0 (make_objective returns the plain analytic-KL ELBO
    for free_bits=0, so the class is built directly) equals the analytic-KL ELBO, a separate
    code path, in value and gradient on the same draws."""
    from pvae.objectives import FreeBitsObjective

    vae, x = linear_gaussian_vae(), lg_data(5)
    assert type(pvae.make_objective("elbo-analytic-kl", 2, free_bits=0.0)).__name__ == "ElboObjective"
    assert_same(value_and_grads(FreeBitsObjective(2, 0.0), vae, x, 6),
                value_and_grads(pvae.make_objective("elbo-analytic-kl", 2), vae, x, 6))
    objective = pvae.make_objective("elbo-analytic-kl", 2, free_bits=0.3, beta=2.0)
    with pvae._rng.seeded(7):
        _, value = objective.loss_and_value(vae, x)
    with pvae._rng.seeded(7), torch.no_grad():
        q = vae.guide_distribution(x)
        loglik = vae.log_likelihood(x, q.rsample((2,))).mean()
        kl = torch.distributions.kl_divergence(q.base_dist, vae.prior().base_dist).mean(0)
    torch.testing.assert_close(value, loglik - 2.0 * kl.clamp(min=0.3).sum())


def test_free_bits_stop_the_kl_gradient_below_the_threshold():
    """Every dimension's KL below lambda: the guide's gradient comes from the likelihood alone."""
    vae, x = linear_gaussian_vae(), lg_data(5)
    params = list(vae.guide_net.parameters())
    torch.manual_seed(3)
    free = torch.autograd.grad(pvae.make_objective("elbo-analytic-kl", free_bits=1e6).loss_and_value(vae, x)[0], params)
    torch.manual_seed(3)
    recon = torch.autograd.grad(pvae.make_objective("reconstruction").loss_and_value(vae, x)[0], params)
    for a, b in zip(free, recon):
        torch.testing.assert_close(a, b)
    flow = pvae.build_vae(pvae.RunConfig(latent_dim=2, guide='planar', net={'hidden': (8,)}), 6)
    with pytest.raises(ValueError, match="free bits need the KL per latent dimension"):
        pvae.fit(flow, (torch.rand(20, 6) < 0.5).float(), epochs=1,
                 objective=pvae.make_objective("elbo-analytic-kl", free_bits=0.5), progress=False)
    with pytest.raises(ValueError, match="'elbo' does not take free_bits"):
        pvae.make_objective("elbo", free_bits=0.5)
