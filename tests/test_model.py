"""The VAE as a Pyro model/guide pair: sites, shapes, densities, gradients."""

import pyro
import pyro.poutine as poutine
import pytest
import torch

import pvae
from pvae import DATA_PLATE, LATENT_SITE, OBSERVED_SITE
from pvae._rng import seeded
from conftest import t_tolerance
from pvae.testing import exact_elbo, linear_gaussian_vae


def small_vae(data_dim=64, latent_dim=3):
    config = pvae.RunConfig(latent_dim=latent_dim, net={'hidden': (16,)})
    return pvae.build_vae(config, data_dim)


def binary_batch(n=7, d=64):
    return (torch.rand(n, d) < 0.3).float()


def test_model_and_guide_sites():
    vae = small_vae()
    x = binary_batch()
    guide_trace = poutine.trace(vae.guide).get_trace(x)
    model_trace = poutine.trace(poutine.replay(vae.model, trace=guide_trace)).get_trace(x)
    z_site = model_trace.nodes[LATENT_SITE]
    x_site = model_trace.nodes[OBSERVED_SITE]
    assert x_site["is_observed"] and torch.equal(x_site["value"], x)
    assert z_site["value"].shape == (7, 3)
    assert [f.name for f in z_site["cond_indep_stack"]] == [DATA_PLATE]
    assert z_site["fn"].event_shape == (3,) and x_site["fn"].event_shape == (64,)
    assert guide_trace.nodes[LATENT_SITE]["fn"].has_rsample  # pathwise (reparametrized) gradients


def test_log_joint_is_the_model_trace_density():
    vae = small_vae()
    x = binary_batch()
    z = torch.randn(7, 3)
    trace = poutine.trace(poutine.condition(vae.model, {LATENT_SITE: z})).get_trace(x)
    trace.compute_log_prob()
    per_datapoint = trace.nodes[LATENT_SITE]["log_prob"] + trace.nodes[OBSERVED_SITE]["log_prob"]
    torch.testing.assert_close(vae.log_joint(x, z), per_datapoint)


def test_log_joint_broadcasts_over_samples():
    vae = small_vae()
    x = binary_batch()
    z = torch.randn(4, 7, 3)
    lj = vae.log_joint(x, z)
    assert lj.shape == (4, 7)
    torch.testing.assert_close(lj[2], vae.log_joint(x, z[2]))


def test_conveniences_shapes_and_ranges():
    vae = small_vae()
    x = binary_batch()
    assert vae.encode(x).shape == (7, 3)
    recon = vae.reconstruct(x)
    assert recon.shape == (7, 64) and recon.min() >= 0 and recon.max() <= 1
    s = vae.sample(5, seed=1)
    assert s.shape == (5, 64)
    torch.testing.assert_close(s, vae.sample(5, seed=1))
    draws = vae.sample(5, seed=1, mean=False)
    assert set(draws.unique().tolist()) <= {0.0, 1.0}


def test_sample_with_seed_leaves_global_rng_alone():
    vae = small_vae()
    state = torch.get_rng_state()
    vae.sample(3, seed=123)
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize("name", ["elbo", "elbo-analytic-kl"])
@pytest.mark.parametrize("particles", [1, 4])
def test_objectives_run_with_vectorized_particles_and_reach_parameters(name, particles):
    vae = small_vae()
    objective = pvae.make_objective(name, particles)
    loss, value = objective.loss_and_value(vae, binary_batch())
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(value)
    grads = [p.grad for p in vae.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(g.abs().sum() > 0 for g in grads)
    assert len(pyro.get_param_store().keys()) == 0  # nothing in Pyro's global store


@pytest.mark.parametrize("name", ["elbo", "elbo-analytic-kl"])
def test_objective_value_matches_closed_form_elbo(name):
    """On the linear-Gaussian model the objective's value is an unbiased estimate of the
    closed-form ELBO (tolerance from the Monte Carlo standard error). The 2000 replicates are 100
    calls on 20 stacked copies of x (the value is a batch mean: one call is the mean of 20)."""
    vae = linear_gaussian_vae()
    x = torch.randn(3, 5, dtype=torch.float64)
    objective = pvae.make_objective(name, num_particles=1)
    groups, copies = 100, 20
    values = torch.stack([objective.loss_and_value(vae, x.repeat(copies, 1))[1] for _ in range(groups)])
    exact = exact_elbo(vae, x).mean().detach()
    se = values.std() / groups ** 0.5
    assert abs(values.mean() - exact) < t_tolerance(se, groups - 1)


def test_logged_objective_and_estimator_weights_are_the_elbo_written_from_the_parts():
    """What training logs is the ELBO itself, and training follows its gradient: on the same
    draws z ~ q(z|x) (3 particles), log p(x|z) + log p(z) - log q(z|x) written out here from the
    parts' own distributions (likelihood(decoder(z)), prior(), guide_net(x); no pvae engine,
    estimator or objective code) equals, per particle and datapoint, the estimator module's log
    importance weights, its mean equals the objective's logged value, and its gradient equals minus
    the loss's gradient in every parameter. Fails if the engine drops or mis-signs a term, or the
    loss is not the logged ELBO."""
    vae = small_vae()
    x = binary_batch()
    params = list(vae.parameters())
    with seeded(5):
        loss, logged = pvae.make_objective("elbo", 3).loss_and_value(vae, x)
    with seeded(5):
        q = vae.guide_net(x)
        z = q.rsample((3,))
        by_hand = vae.likelihood(vae.decoder(z)).log_prob(x) + vae.prior().log_prob(z) - q.log_prob(z)
    assert by_hand.shape == (3, 7)
    torch.testing.assert_close(logged, by_hand.mean().detach())
    for g, e in zip(torch.autograd.grad(-loss, params), torch.autograd.grad(by_hand.mean(), params)):
        torch.testing.assert_close(g, e)
    with seeded(5), torch.no_grad():
        lw = next(pvae.log_importance_weights(vae, x, 3))
    torch.testing.assert_close(lw, by_hand.detach())


def test_mismatched_parts_are_rejected():
    with pytest.raises(ValueError, match="latent_dim"):
        pvae.VAE(
            pvae.StandardNormalPrior(3), pvae.MLP(3, 10, ()), pvae.BernoulliLikelihood(10),
            pvae.DiagonalGaussianGuide(10, 4, ()),
        )
    with pytest.raises(ValueError, match="decoder outputs"):
        pvae.VAE(
            pvae.StandardNormalPrior(3), pvae.MLP(3, 11, ()), pvae.BernoulliLikelihood(10),
            pvae.DiagonalGaussianGuide(10, 3, ()),
        )


@pytest.mark.parametrize(
    "bad, message",
    [
        (torch.full((4, 64), float("nan")), "NaN or infinite"),
        (torch.ones(4, 63), r"shape \(batch, 64\)"),
        (torch.ones(2, 4, 64), r"shape \(batch, 64\)"),
        (torch.full((4, 64), 0.5), "binary"),
        (torch.ones(4, 64, dtype=torch.int64), "floating-point"),
    ],
)
def test_bad_data_gets_a_clear_error(bad, message):
    vae = small_vae()
    with pytest.raises((ValueError, TypeError), match=message):
        vae.check_data(bad)


def test_gaussian_learned_scale_is_trained():
    lik = pvae.GaussianLikelihood(4, scale=0.3, scale_mode="global")
    assert any(p is lik.log_scale for p in lik.parameters())
    torch.testing.assert_close(lik.scale, torch.tensor(0.3))
    fixed = pvae.GaussianLikelihood(4, scale=0.3)
    assert list(fixed.parameters()) == []
    with pytest.raises(ValueError, match="positive"):
        pvae.GaussianLikelihood(4, scale=0.0)


def test_unknown_component_names_list_choices():
    with pytest.raises(KeyError, match="valid choices: .*standard-normal, vamp"):
        pvae.RunConfig(prior="vampire")
    with pytest.raises(KeyError, match="valid choices"):
        pvae.RunConfig(likelihood="poissonish")
    with pytest.raises(ValueError, match="unknown config key"):
        pvae.RunConfig.from_dict({"latent_dims": 3})
