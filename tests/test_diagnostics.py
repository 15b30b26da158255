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
    vae = pvae.build_vae(pvae.RunConfig(guide="full-rank", latent_dim=2, hidden=(8,)), 64)
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
