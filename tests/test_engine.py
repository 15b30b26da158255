"""One engine: the Pyro programs are the definition; pvae works from Pyro as Pyro users work.

* The classic ``SVI`` loop, the module form ``Trace_ELBO()(vae.model, vae.guide)``, Pyro's other
  ELBOs, ``Predictive`` and ``poutine`` handlers work on the pair, and two VAEs never share
  parameters (nothing goes through Pyro's global parameter store).
* Every estimator, objective, AIS and diagnostic follows an edited program (a Laplace prior
  written inside an overridden ``VAE.model``), checked against direct computations.
* The fast path equals the trace path on the same noise, for every registered part, and is
  never taken for a program it was not built from.
* pvae's ELBO objectives equal Pyro's ``Trace_ELBO`` / ``TraceMeanField_ELBO`` (value and
  gradient) on the same noise.
"""

import itertools
import math

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import SVI, Predictive, RenyiELBO, Trace_ELBO, TraceMeanField_ELBO

import pvae
from conftest import part
from pvae import engine
from pvae._rng import seeded
from pvae.config import RunConfig, build_vae
from pvae.guides import GUIDES
from pvae.likelihoods import LIKELIHOODS
from pvae.priors import PRIORS
from pvae.testing import linear_gaussian_vae, mc_tolerance


def digits_vae(data, latent=4, hidden=(32,)):
    return pvae.VAE(pvae.StandardNormalPrior(latent), pvae.MLP(latent, data.data_dim, hidden=hidden),
                    pvae.BernoulliLikelihood(data.data_dim), pvae.DiagonalGaussianGuide(data.data_dim, latent, hidden=hidden))


def snapshot(vae):
    return [p.detach().clone() for p in vae.parameters()]


# ----------------------------------------------------------------------------- Pyro usage
def test_classic_svi_loop_trains_the_vae_and_leaves_the_param_store_empty(digits):
    vae, x = digits_vae(digits), digits.train[:200]
    before = snapshot(vae)
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    losses = [svi.step(x) for _ in range(150)]
    moved = [not torch.equal(a, b) for a, b in zip(before, vae.parameters())]
    assert all(moved), "SVI left some parameters untouched"
    assert sum(losses[-10:]) / 10 < 0.7 * sum(losses[:10]) / 10
    assert len(pyro.get_param_store()) == 0


@pytest.mark.parametrize("order", ["a-then-b", "b-then-a"])
def test_two_vaes_trained_with_svi_never_share_parameters(digits, order):
    a, b = digits_vae(digits), digits_vae(digits)
    x = digits.train[:100]
    first, second = (a, b) if order == "a-then-b" else (b, a)
    SVI(first.model, first.guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO()).step(x)
    first_after = snapshot(first)
    second_before = snapshot(second)
    svi = SVI(second.model, second.guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    for _ in range(3):
        svi.step(x)
    assert all(torch.equal(p, q) for p, q in zip(first_after, first.parameters())), "training one changed the other"
    assert not any(torch.equal(p, q) for p, q in zip(second_before, second.parameters()))
    assert not any(p is q for p, q in zip(a.parameters(), b.parameters()))


def test_module_form_exposes_the_parameters_and_trains(digits):
    vae, x = digits_vae(digits), digits.train[:100]
    loss_fn = Trace_ELBO()(vae.model, vae.guide)
    assert {id(p) for p in loss_fn.parameters()} == {id(p) for p in vae.parameters()}
    opt = torch.optim.Adam(loss_fn.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = loss_fn(x)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_other_pyro_elbos_predictive_and_handlers_work_on_the_pair(digits):
    vae, x = digits_vae(digits), digits.train[:30]
    for elbo in (TraceMeanField_ELBO(), RenyiELBO(alpha=0, num_particles=3)):
        before = snapshot(vae)
        loss = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-2}), elbo).step(x)
        assert math.isfinite(loss) and not torch.equal(before[0], next(vae.parameters()))
    samples = Predictive(vae.model, guide=vae.guide, num_samples=5, return_sites=("z", "x"))(x)
    assert samples["z"].shape == (5, 30, 4) and samples["x"].shape == (5, 30, digits.data_dim)
    generated = Predictive(vae.model, num_samples=2, return_sites=("x",))(None, num_datapoints=3)
    assert generated["x"].shape == (2, 3, digits.data_dim)
    z = torch.zeros(30, 4)
    trace = poutine.trace(poutine.condition(vae.model, data={"z": z})).get_trace(x)
    torch.testing.assert_close(trace.log_prob_sum(), vae.log_joint(x, z).sum())
    params = poutine.trace(vae.guide, param_only=True).get_trace(x)
    assert {site["value"].unconstrained() for site in params.nodes.values()} >= set(vae.guide_net.parameters())


# ----------------------------------------------------------------------------- edited programs
class LaplaceVAE(pvae.VAE):
    """The user's edit: a Laplace prior written inside the model program."""

    laplace_scale = 1.0

    def model(self, x, index=None):
        with pyro.plate("data", x.shape[0], dim=-1):
            scale = self.laplace_scale * torch.ones(self.latent_dim)
            z = pyro.sample("z", dist.Laplace(torch.zeros(self.latent_dim), scale).to_event(1))
            pyro.sample("x", self.likelihood(self.decoder(z)), obs=x)
        return z


def direct_log_weights(vae, x, z):
    """log p(x, z) - log q(z|x) of the edited model, written out by hand."""
    log_prior = dist.Laplace(0.0, 1.0).log_prob(z).sum(-1)
    return log_prior + vae.likelihood(vae.decoder(z)).log_prob(x) - vae.guide_distribution(x).log_prob(z)


def test_an_overridden_model_changes_every_estimate(digits):
    base = digits_vae(digits)
    vae = LaplaceVAE(base.prior, base.decoder, base.likelihood, base.guide_net)
    assert base.programs_are_builtin() and not vae.programs_are_builtin()
    x, k = digits.test[:20], 64
    with seeded(3):
        q = vae.guide_distribution(x)
        z = q.rsample((k,))
    with torch.no_grad():
        lw = direct_log_weights(vae, x, z)
    expected_elbo = lw.mean(0).double()
    expected_iwae = (torch.logsumexp(lw, 0) - math.log(k)).double()
    bounds = pvae.evaluate_bounds(vae, x, k, seed=3)
    torch.testing.assert_close(bounds["elbo"].values, expected_elbo, atol=1e-4, rtol=0)
    torch.testing.assert_close(bounds["iwae"].values, expected_iwae, atol=1e-4, rtol=0)
    # the built-in model gives other numbers on the same draws
    assert (pvae.evaluate_bounds(base, x, k, seed=3)["elbo"].values - expected_elbo).abs().mean() > 0.1
    # naive estimate: prior draws from the Laplace site
    with seeded(5):
        zp = dist.Laplace(torch.zeros(4), torch.ones(4)).to_event(1).expand((k, 20)).sample()
    with torch.no_grad():
        naive = torch.logsumexp(vae.likelihood(vae.decoder(zp)).log_prob(x), 0) - math.log(k)
    torch.testing.assert_close(pvae.naive_prior_estimate(vae, x, k, seed=5).values, naive.double(), atol=1e-4, rtol=0)
    # objectives follow it: the ELBO objective's value on the same draws
    with seeded(3):
        _, value = pvae.make_objective("elbo", k).loss_and_value(vae, x)
    torch.testing.assert_close(value, lw.mean(), atol=1e-4, rtol=0)
    with seeded(3):
        _, value = pvae.make_objective("iwae", k).loss_and_value(vae, x)
    torch.testing.assert_close(value, expected_iwae.float().mean(), atol=1e-4, rtol=0)
    # AIS with the two-point schedule is importance sampling from the start distribution
    ais = pvae.ais(vae, x, num_chains=k, betas=[0.0, 1.0], start="guide", seed=3)
    torch.testing.assert_close(ais.values, expected_iwae, atol=1e-4, rtol=0)
    # diagnostics: the exported log-weights are the edited model's
    idata = pvae.to_inference_data(vae, x, num_samples=k, seed=3)
    torch.testing.assert_close(torch.as_tensor(idata.sample_stats["log_weight"].values[0]), lw.double(),
                               atol=1e-4, rtol=0)


class WidePriorLG(pvae.VAE):
    """A linear-Gaussian VAE whose edited model has the prior N(0, 2^2 I): log p(x) is
    N(x; b, 4 W W^T + s^2 I) in closed form."""

    def model(self, x, index=None):
        with pyro.plate("data", x.shape[0], dim=-1):
            z = pyro.sample("z", dist.Normal(torch.zeros(self.latent_dim, dtype=x.dtype), 2.0).to_event(1))
            pyro.sample("x", self.likelihood(self.decoder(z)), obs=x)
        return z


def test_ais_on_an_overridden_model_is_unbiased_for_its_exact_marginal():
    """exp(AIS - log p(x)) has mean 1 for the edited program's exact log p(x) (over 40
    independent runs, MCSE tolerance), and clearly not for the unedited model's. The 40 runs are
    one AIS call on the 6 datapoints repeated 40 times (chains, start states, HMC noise and step
    size adaptation are per datapoint, so the copies are independent runs; the edited program
    takes the trace path, whose cost is per call, not per datapoint)."""
    lg = linear_gaussian_vae()
    vae = WidePriorLG(lg.prior, lg.decoder, lg.likelihood, lg.guide_net)
    x = lg.sample(6, mean=False, seed=1)
    w, b, var = lg.decoder.weight, lg.decoder.bias, lg.likelihood.scale.pow(2)
    cov = 4 * w @ w.T + var * torch.eye(w.shape[0], dtype=w.dtype)
    log_px = dist.MultivariateNormal(b, covariance_matrix=cov).log_prob(x).detach()
    log_px_unedited = pvae.testing.exact_log_marginal(lg, x).detach()
    assert (log_px - log_px_unedited).abs().min() > 0.3
    copies = x.repeat(40, 1)  # row r * 6 + i is datapoint i in run r
    reps = pvae.ais(vae, copies, num_chains=4, num_steps=30, batch_size=copies.shape[0]).values.reshape(40, 6)
    for target, should_hold in ((log_px, True), (log_px_unedited, False)):
        ratio = (reps - target).exp()
        se = ratio.std(0) / math.sqrt(reps.shape[0])
        ok = bool(((ratio.mean(0) - 1).abs() < mc_tolerance(1, 1e-6 / 6) * se).all())
        assert ok == should_hold


def test_a_handler_wrapped_program_is_followed_and_never_takes_the_fast_path(digits):
    vae, x = digits_vae(digits), digits.test[:15]
    builtin = pvae.evaluate_bounds(vae, x, 32, seed=0)["elbo"].values
    vae.model = poutine.scale(vae.model, scale=2.0)   # the user wraps the program in a handler
    assert not vae.programs_are_builtin() and not engine.use_fast_path(vae)
    with seeded(0):
        w = engine.log_weights(vae, x, 32)
    assert w.path == "trace"
    with seeded(0):
        plain = engine.log_weights(digits_vae(digits), x, 1)  # shapes only
    assert plain.path == "fast"
    expected = w.log_weight.detach().mean(0)  # the trace path under the handler
    scaled = pvae.evaluate_bounds(vae, x, 32, seed=0)["elbo"].values
    torch.testing.assert_close(scaled, expected.double(), atol=1e-4, rtol=0)
    # scale 2 doubles log p(x, z): the estimate is 2 log p - log q, not the built-in value
    with seeded(0), torch.no_grad():
        q = vae.guide_distribution(x)
        z = q.rsample((32,))
        manual = (2 * vae.log_joint(x, z) - q.log_prob(z)).mean(0).double()
    torch.testing.assert_close(scaled, manual, atol=1e-3, rtol=0)
    assert (scaled - builtin).abs().mean() > 1.0
    with pytest.raises(ValueError, match="path='trace'"):
        engine.log_weights(vae, x, 2, path="fast")


def test_a_site_outside_the_data_plate_is_a_clear_error(digits):
    class Global(pvae.VAE):
        def model(self, x, index=None):
            pyro.sample("w", dist.Normal(0.0, 1.0))
            return pvae.VAE.model.fn(self, x, index)

    base = digits_vae(digits)
    vae = Global(base.prior, base.decoder, base.likelihood, base.guide_net)
    with pytest.raises(ValueError, match="'w' is outside the data plate"):
        pvae.evaluate_bounds(vae, digits.test[:4], 3)


def test_a_model_guide_pair_of_the_users_own(digits):
    """A plain Pyro pair (no VAE class) gets the estimators, checked on the exact model."""
    lg = linear_gaussian_vae()
    x = lg.sample(50, mean=False)
    exact = pvae.testing.exact_log_marginal(lg, x).double()
    exact_guide = pvae.testing.with_exact_guide(lg)

    def model(x, index=None):
        with pyro.plate("data", x.shape[0], dim=-1):
            z = pyro.sample("z", dist.Normal(torch.zeros(lg.latent_dim, dtype=x.dtype), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(lg.decoder(z), lg.likelihood.scale).to_event(1), obs=x)

    def guide(x, index=None):
        with pyro.plate("data", x.shape[0], dim=-1):
            pyro.sample("z", exact_guide.guide_distribution(x))

    pair = engine.ModelGuidePair(model, guide, module=lg)
    with torch.no_grad():
        bounds = pvae.evaluate_bounds(pair, x, 10)
    torch.testing.assert_close(bounds["iwae"].values, exact, atol=1e-6, rtol=0)
    torch.testing.assert_close(bounds["elbo"].values, exact, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- fast == trace
def _conformance_vaes():
    for prior, guide in itertools.product(PRIORS.names(), GUIDES.names()):
        if (prior, guide) == ("vamp", "delta") or GUIDES.get(guide).needs_index:
            continue
        yield f"{prior}-{guide}-bernoulli", RunConfig(guide=guide, latent_dim=3, net={'hidden': (8,)}, prior=part("prior", prior, num_components=3, pseudo_inputs=4))
    for likelihood in LIKELIHOODS.names():
        yield f"standard-normal-diagonal-{likelihood}", RunConfig(latent_dim=3, net={'hidden': (8,)}, likelihood=part("likelihood", likelihood, scale_mode="per-dim"))


CONFORMANCE = dict(_conformance_vaes())


def _data_for(vae, n=6):
    name = type(vae.likelihood).__name__.lower()
    if "poisson" in name:
        return torch.poisson(torch.full((n, vae.data_dim), 2.0))
    if "gaussian" in name:
        return torch.randn(n, vae.data_dim)
    if "continuous" in name:
        return torch.rand(n, vae.data_dim)
    return (torch.rand(n, vae.data_dim) < 0.4).float()


@pytest.mark.parametrize("name", sorted(CONFORMANCE))
@pytest.mark.parametrize("proposal", ["guide", "prior"])
def test_fast_path_equals_trace_path_on_the_same_noise(name, proposal):
    vae = build_vae(CONFORMANCE[name], 10)
    if proposal == "guide" and not vae.guide_net.has_density:
        pytest.skip("a point mass has no importance weights")
    x = _data_for(vae)
    results = {}
    for path in ("fast", "trace"):
        vae.zero_grad(set_to_none=True)
        with seeded(7):
            w = engine.log_weights(vae, x, 5, proposal=proposal, path=path)
        assert w.path == path and w.log_weight.shape == (5, 6)
        w.log_weight.sum().backward()
        grads = [p.grad.clone() if p.grad is not None else None for p in vae.parameters()]
        results[path] = (w, grads)
    (wf, gf), (wt, gt) = results["fast"], results["trace"]
    for term in ("log_likelihood", "log_prior", "log_guide"):
        torch.testing.assert_close(getattr(wf, term), getattr(wt, term), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(wf.latents["z"], wt.latents["z"])
    for a, b in zip(gf, gt):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_conformance_covers_every_registered_part():
    names = " ".join(CONFORMANCE)
    for registry in (PRIORS, GUIDES, LIKELIHOODS):
        for part in registry.names():
            if part == "non-amortized":
                continue
            assert part in names, f"{part} is not in the fast-vs-trace conformance suite"


def test_density_fast_path_equals_the_conditioned_program():
    vae = build_vae(RunConfig(latent_dim=3, net={'hidden': (8,)}, prior={'name': 'mog', 'num_components': 3}), 10)
    x, z = _data_for(vae), torch.randn(4, 6, 3)
    fast = engine.log_density(vae, x, {"z": z}, path="fast")
    trace = engine.log_density(vae, x, {"z": z}, path="trace")
    for a, b in zip(fast, trace):
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------- equals Pyro's ELBOs
@pytest.mark.parametrize("name, pyro_elbo", [("elbo", Trace_ELBO), ("elbo-analytic-kl", TraceMeanField_ELBO)])
@pytest.mark.parametrize("particles", [1, 3])
def test_objective_equals_pyros_elbo_on_the_same_noise(digits, name, pyro_elbo, particles):
    vae, x = digits_vae(digits), digits.train[:40]
    objective = pvae.make_objective(name, particles)
    with seeded(11):
        loss, value = objective.loss_and_value(vae, x)
    loss.backward()
    ours = [p.grad.clone() for p in vae.parameters()]
    vae.zero_grad(set_to_none=True)
    elbo = pyro_elbo(num_particles=particles, vectorize_particles=True, max_plate_nesting=1)
    with seeded(11):
        reference = elbo.differentiable_loss(vae.model, vae.guide, x) / x.shape[0]
    reference.backward()
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(value, -reference.detach(), rtol=1e-5, atol=1e-4)
    for a, p in zip(ours, vae.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-5)


def test_train_step_equals_a_pyro_trace_elbo_step(digits):
    """One pvae TrainStep and one hand-rolled step with Pyro's Trace_ELBO (same noise, same
    Adam) leave the same parameters."""
    a, x = digits_vae(digits), digits.train[:50]
    b = digits_vae(digits)
    b.load_state_dict(a.state_dict())
    opt_a = pvae.train._optimizer(a, 1e-2)
    step = pvae.train.TrainStep(a, pvae.make_objective("elbo"), opt_a, "eager")
    opt_b = torch.optim.Adam(b.parameters(), lr=1e-2)
    elbo = Trace_ELBO(vectorize_particles=True, max_plate_nesting=1)
    for i in range(3):
        with seeded(i):
            step(x)
        with seeded(i):
            opt_b.zero_grad()
            (elbo.differentiable_loss(b.model, b.guide, x) / x.shape[0]).backward()
            opt_b.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


class ShiftedGuideVAE(pvae.VAE):
    """The user's edit of the guide: q(z|x) shifted by +1 in every latent dimension."""

    def guide(self, x, index=None, **kwargs):
        q = self.guide_distribution(x)
        with pyro.plate("data", x.shape[0], dim=-1):
            return pyro.sample("z", dist.Normal(q.mean + 1.0, q.stddev).to_event(1))


def test_reconstruction_and_active_units_follow_an_overridden_guide(digits):
    base = digits_vae(digits)
    vae = ShiftedGuideVAE(base.prior, base.decoder, base.likelihood, base.guide_net)
    x = digits.test[:40]
    with torch.no_grad():
        code = base.encode(x) + 1.0
        expected = base.likelihood(base.decoder(code)).log_prob(x).double()
    rec = pvae.reconstruction_error(vae, x)["reconstruction"].values
    torch.testing.assert_close(rec, expected, atol=1e-4, rtol=0)
    assert (pvae.reconstruction_error(base, x)["reconstruction"].values - expected).abs().max() > 1e-2
    torch.testing.assert_close(engine.guide_mean(vae, x)["z"], code, atol=1e-5, rtol=0)


@pytest.mark.parametrize("prior", PRIORS.names())
def test_naive_estimate_and_ais_run_for_every_prior(prior, digits):
    """The naive estimator draws from the model's prior site as the program does (a mixture
    has no rsample and needs none there); AIS starts from the prior or the guide."""
    config = RunConfig(latent_dim=2, net={'hidden': (16,)}, prior=part("prior", prior, num_components=3, pseudo_inputs=4))
    vae = build_vae(config, digits.data_dim)
    x = digits.test[:6]
    assert math.isfinite(pvae.naive_prior_estimate(vae, x, 20).mean)
    for start in ("prior", "guide"):
        assert math.isfinite(pvae.ais(vae, x, num_chains=3, num_steps=4, start=start).mean)
