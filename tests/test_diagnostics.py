"""Diagnostics against ArviZ on fixed inputs and against exact answers."""

import json

import numpy as np
import pytest
import torch

import pvae
from pvae.diagnostics import active_units, importance_diagnostics, kl_per_dimension, psis_khat
from pvae.testing import linear_gaussian_vae, with_exact_guide


def test_psis_khat_is_arviz_per_datapoint():
    import arviz

    g = torch.Generator().manual_seed(0)
    k = 4000
    light = torch.randn(k, generator=g, dtype=torch.float64)  # log-normal weights: light tail
    u = torch.rand(k, generator=g, dtype=torch.float64)
    heavy = torch.log((u.pow(-0.9) - 1) / 0.9)  # log of generalized Pareto(xi=0.9) draws
    lw = torch.stack([light, heavy], dim=1)  # (K, B=2)
    khat = psis_khat(lw)
    _, expected = arviz.psislw(lw.T.numpy())
    np.testing.assert_allclose(khat.numpy(), expected)
    assert khat[0] < 0.5 < 0.7 < khat[1]


def test_exact_guide_has_perfect_importance_diagnostics():
    model = with_exact_guide(linear_gaussian_vae())
    x = model.sample(6, seed=1, mean=False).detach()
    d = importance_diagnostics(model, x, num_samples=500)
    torch.testing.assert_close(d["ess"], torch.full((6,), 500.0, dtype=torch.float64))
    assert d["khat"].shape == (6,)


def test_active_units_and_kl_per_dimension():
    vae = pvae.VAE(
        pvae.StandardNormalPrior(3), pvae.MLP(3, 5, ()), pvae.GaussianLikelihood(5),
        pvae.DiagonalGaussianGuide(5, 3, hidden=()),
    )
    with torch.no_grad():
        w = vae.guide_net.encoder[0].weight  # rows 0-2: means, rows 3-5: scales
        w[1].zero_()
        w[2].mul_(0.01)
    x = torch.randn(2000, 5)
    au = active_units(vae, x)
    assert au["active"].tolist() == [True, False, False] and int(au["count"]) == 1
    kl = kl_per_dimension(vae, x)
    q = vae.guide_net(x)
    total = torch.distributions.kl_divergence(q, vae.prior().expand([2000])).double().mean()
    torch.testing.assert_close(kl.sum(), total.detach())
    assert kl.shape == (3,) and bool((kl >= 0).all())


def test_kl_per_dimension_refuses_non_factorized_parts():
    vae = pvae.build_vae(pvae.RunConfig(guide='full-rank', latent_dim=2, net={'hidden': (8,)}), 64)
    with pytest.raises(ValueError, match="diagonal Gaussian"):
        kl_per_dimension(vae, torch.zeros(3, 64))


def test_export_to_inference_data():
    from pvae.diagnostics import to_inference_data

    model = linear_gaussian_vae()
    x = model.sample(4, seed=1, mean=False).detach()
    idata = to_inference_data(model, x, num_samples=50)
    assert idata.posterior["z"].shape == (1, 50, 4, 2)
    assert idata.sample_stats["log_weight"].shape == (1, 50, 4)
    # the exported weights are the estimator module's log-weights for the same seed
    with torch.no_grad():
        from pvae._rng import seeded
        from pvae.estimators import log_importance_weights

        with seeded(0):
            lw = next(log_importance_weights(model, x, 50, chunk_size=50))
    np.testing.assert_allclose(idata.sample_stats["log_weight"].values[0], lw.numpy())


def test_latent_diagnostics_report_active_units_kl_and_collapse():
    vae = linear_gaussian_vae(data_dim=5, latent_dim=3)
    x = torch.randn(200, 5, dtype=torch.float64)
    linear = [m for m in vae.guide_net.encoder.modules() if isinstance(m, torch.nn.Linear)][0]
    with torch.no_grad():  # unit 2's posterior mean ignores x: collapsed
        linear.weight[2].zero_()
    with pytest.warns(UserWarning, match="posterior collapse in 1 of 3"):
        report = pvae.diagnostics.latent_diagnostics(vae, x)
    assert report["active_units"] == 2 and report["activity"][2] == 0.0
    assert report["kl_total"] == pytest.approx(float(pvae.kl_per_dimension(vae, x).sum()))
    json.dumps(report)  # JSON-ready


def test_inference_gaps_against_the_closed_form_on_the_linear_gaussian_model():
    """The best diagonal Gaussian for a Gaussian posterior N(m, S) has mean m and variances
    1/diag(S^-1); the approximation gap is then KL(q*||p(z|x)) exactly, and the amortization
    gap is ELBO[q*] - ELBO[q_phi] in closed form."""
    from pvae.testing import exact_elbo, exact_log_marginal, exact_posterior, mc_tolerance

    vae = linear_gaussian_vae(data_dim=5, latent_dim=2, noise_scale=0.7, seed=3)
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads_before = [p.grad for p in vae.parameters()]
    state = {k: v.clone() for k, v in vae.state_dict().items()}
    rng = torch.get_rng_state()
    gaps = pvae.diagnostics.inference_gaps(vae, x, num_samples=4000, refine_steps=1500, lr=0.02,
                                           num_particles=50, log_marginal=exact_log_marginal(vae, x))
    post = exact_posterior(vae, x)
    best_scale = post.precision_matrix.diagonal(dim1=-2, dim2=-1).rsqrt()
    q_star = gaps["refined_guide"]
    index = torch.arange(4)
    loc, scale = q_star.loc.detach(), torch.nn.functional.softplus(q_star.pre_scale.detach()) + q_star.min_scale
    torch.testing.assert_close(loc, post.mean, atol=2e-2, rtol=0)  # stochastic optimization: ~5e-3 typical
    torch.testing.assert_close(scale, best_scale, atol=2e-2, rtol=0)
    refined = pvae.VAE(vae.prior, vae.decoder, vae.likelihood, q_star)
    elbo_star = exact_elbo(refined, x, index=index).detach()
    optimal_gap = torch.distributions.kl_divergence(
        torch.distributions.MultivariateNormal(post.mean, scale_tril=torch.diag_embed(best_scale)), post)
    # the refined q* is optimal up to second order in its parameter error (< 1e-2)
    assert ((exact_log_marginal(vae, x).detach() - elbo_star) - optimal_gap).abs().max() < 1e-3
    # the Monte Carlo estimates agree with the closed forms within their standard errors
    se = gaps["elbo_refined"].mc_stderr_per_datapoint
    assert ((gaps["approximation_gap"] - (exact_log_marginal(vae, x).detach() - elbo_star)).abs()
            < torch.tensor([mc_tolerance(s, 1e-6 / 4) for s in se])).all()
    exact_amortization = elbo_star - exact_elbo(vae, x).detach()
    se2 = (gaps["elbo_refined"].mc_stderr_per_datapoint ** 2 + gaps["elbo_amortized"].mc_stderr_per_datapoint ** 2).sqrt()
    assert ((gaps["amortization_gap"] - exact_amortization).abs()
            < torch.tensor([mc_tolerance(s, 1e-6 / 4) for s in se2])).all()
    assert (gaps["amortization_gap"] > 0).all()  # the untrained encoder is far from q*
    # evaluation changed nothing
    assert all(torch.equal(v, state[k]) for k, v in vae.state_dict().items())
    assert [p.grad for p in vae.parameters()] == grads_before
    assert torch.equal(rng, torch.get_rng_state())
    vae.eval()  # a loaded model is in eval mode: every part stays there
    pvae.diagnostics.inference_gaps(vae, x, num_samples=10, refine_steps=2)
    assert not any(m.training for m in vae.modules())


def test_inference_gaps_need_a_diagonal_gaussian_guide():
    vae = pvae.build_vae(pvae.RunConfig(latent_dim=2, guide='iaf', net={'hidden': (8,)}), 6)
    with pytest.raises(ValueError, match="needs a DiagonalGaussianGuide"):
        pvae.diagnostics.inference_gaps(vae, (torch.rand(3, 6) < 0.5).float())


def test_diagnostics_refuse_what_they_cannot_measure(digits):
    """A NaN in the encoder is an error, not 'posterior collapse'; a point-mass guide gets no
    k-hat/ESS (it would read as a perfect proposal) and cannot be trained with the IWAE bound."""
    import pvae

    vae = pvae.build_vae(pvae.RunConfig(latent_dim=2, net={'hidden': (16,)}), digits.data_dim)
    with torch.no_grad():
        next(vae.guide_net.parameters()).fill_(float("nan"))
    with pytest.raises(pvae.DivergenceError, match="NaN or infinite"):
        pvae.latent_diagnostics(vae, digits.test[:20])
    ae = pvae.build_vae(pvae.autoencoder_config(code_size=2, layers=1, units=16), digits.data_dim)
    with pytest.raises(pvae.UsageError, match="point mass"):
        pvae.importance_diagnostics(ae, digits.test[:5], num_samples=10)
    with pytest.raises(pvae.UsageError, match="point mass"):
        pvae.fit(ae, digits.train[:100], epochs=1, objective="iwae", num_particles=3, progress=False)
