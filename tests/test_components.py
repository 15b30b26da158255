"""Conformance suite: every registered prior, guide, likelihood and net obeys one contract.

Statistical checks use tolerances from Monte Carlo standard errors (pvae.testing.mc_tolerance,
failure rate 1e-6 per check), never tuned seeds.
"""

import itertools
import math

import pyro.distributions as dist
import pytest
import torch

import pvae
from conftest import part
from pvae.config import RunConfig, build_vae
from pvae.nets import NETS
from pvae.guides import GUIDES
from pvae.likelihoods import LIKELIHOODS
from pvae.priors import PRIORS
from pvae.testing import mc_tolerance

LATENT, DATA = 2, 6


def make_guide(name, data_dim=DATA, latent_dim=LATENT):
    return GUIDES.get(name)(data_dim, latent_dim, hidden=(8,))


def make_prior(name, latent_dim=LATENT):
    return PRIORS.build(part("prior", name, num_components=3, pseudo_inputs=4), latent_dim=latent_dim,
                        guide=make_guide("diagonal", latent_dim=latent_dim))


def importance_check(log_prob, sample, dim, n=100_000):
    """Sampling agrees with log_prob: with a wide Gaussian proposal r, E_r[p/r] = 1 and
    E_r[(p/r) f(z)] = E_p[f(z)] for f(z) = z and z**2; the right-hand side from samples."""
    r = dist.Normal(torch.zeros(dim), 3 * torch.ones(dim)).to_event(1)
    zr = r.sample((n,))
    w = (log_prob(zr) - r.log_prob(zr)).exp()
    zp = sample(n)
    tol = mc_tolerance(1.0, 1e-6 / 5)
    assert abs(w.mean() - 1) < tol * w.std() / math.sqrt(n), "log_prob does not integrate to 1"
    for f in (lambda z: z, lambda z: z**2):
        lhs, rhs = (w[:, None] * f(zr)), f(zp)
        se = (lhs.var(0) / n + rhs.var(0) / n).sqrt()
        assert ((lhs.mean(0) - rhs.mean(0)).abs() < tol * se).all(), "samples disagree with log_prob"


# ------------------------------------------------------------------------------- priors
@pytest.mark.parametrize("name", PRIORS.names())
def test_prior_shapes_and_finite_log_prob(name):
    p = make_prior(name)()
    assert p.batch_shape == () and p.event_shape == (LATENT,)
    z = torch.randn(3, 5, LATENT)
    lp = p.log_prob(z)
    assert lp.shape == (3, 5) and torch.isfinite(lp).all()
    assert p.sample((3, 5)).shape == (3, 5, LATENT)
    assert p.expand([5]).batch_shape == (5,)


@pytest.mark.parametrize("name", PRIORS.names())
def test_prior_sampling_agrees_with_log_prob(name):
    torch.manual_seed(1)
    prior = make_prior(name)
    with torch.no_grad():
        importance_check(lambda z: prior().log_prob(z), lambda n: prior().sample((n,)), LATENT)


@pytest.mark.parametrize("name", PRIORS.names())
def test_prior_gradients_reach_its_parameters(name):
    prior = make_prior(name)
    if not list(prior.parameters()):
        pytest.skip(f"{name} has no parameters")
    prior().log_prob(torch.randn(7, LATENT)).sum().backward()
    for pname, param in prior.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, pname
    if name == "vamp":  # the pseudo-inputs' gradients flow through the guide
        assert prior.pseudo_inputs.grad.abs().sum() > 0


@pytest.mark.parametrize("name", PRIORS.names())
def test_prior_state_dict_round_trip_and_dtype_move(name):
    a, b = make_prior(name), make_prior(name)
    if name == "vamp":
        object.__setattr__(b, "_guide", a._guide)  # the guide belongs to the VAE, shared here
    b.load_state_dict(a.state_dict())
    z = torch.randn(4, LATENT)
    torch.testing.assert_close(a().log_prob(z), b().log_prob(z))
    a.double()
    if name == "vamp":
        a._guide.double()
    assert a().log_prob(z.double()).dtype == torch.float64


# ------------------------------------------------------------------------------- guides
@pytest.mark.parametrize("name", GUIDES.names())
def test_guide_shapes_reparametrized_gradients(name):
    guide = make_guide(name)
    x = torch.rand(5, DATA)
    q = guide(x)
    assert q.batch_shape == (5,) and q.event_shape == (LATENT,) and q.has_rsample
    z = q.rsample((3,))
    assert z.shape == (3, 5, LATENT)
    lp = q.log_prob(z)
    assert lp.shape == (3, 5) and torch.isfinite(lp).all()
    assert guide.mean(x).shape == (5, LATENT)
    z.pow(2).sum().backward()  # the pathwise gradient reaches every parameter
    for pname, param in guide.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", [n for n in GUIDES.names() if GUIDES.get(n).has_density])
def test_guide_sampling_agrees_with_log_prob(name):
    torch.manual_seed(2)
    guide = make_guide(name)
    x = torch.rand(1, DATA)
    with torch.no_grad():
        q = guide(x)

        def log_prob(z):  # evaluate at points the guide did not draw: flows must invert (IAF),
            if name in ("planar", "sylvester"):  # no inverse: checked through the log-det test
                pytest.skip(f"{name} flows have no inverse; their density is checked by test_flow_log_det")
            return q.log_prob(z[:, None, :])[:, 0]

        importance_check(log_prob, lambda n: q.sample((n,))[:, 0], LATENT)


def test_delta_guide_is_a_point_mass():
    guide = make_guide("delta")
    x = torch.rand(4, DATA)
    q = guide(x)
    torch.testing.assert_close(q.rsample((3,)), guide.mean(x).expand(3, 4, LATENT))
    assert not guide.has_density


FLOW_GUIDES = [n for n in GUIDES.names() if issubclass(GUIDES.get(n), pvae.guides.FlowGuide)]


def test_flow_guides_are_all_checked():
    assert set(FLOW_GUIDES) == {"iaf", "planar", "sylvester"}


@pytest.mark.parametrize("name", FLOW_GUIDES)
def test_flow_log_det_matches_autograd_jacobian(name):
    torch.manual_seed(3)
    guide = make_guide(name, latent_dim=3)
    with torch.no_grad():  # move away from the near-identity initialisation
        for p in guide.flows.parameters():
            p.normal_(0, 0.5)
    x = torch.rand(1, DATA)
    _, _, context = guide._split(x)
    for flow in guide.flows:
        t = flow.condition(context[0])
        z0 = torch.randn(3)
        jac = torch.autograd.functional.jacobian(t, z0)
        expected = torch.linalg.slogdet(jac)[1]
        torch.testing.assert_close(t.log_abs_det_jacobian(z0, t(z0)), expected, rtol=1e-4, atol=1e-5)


def test_flow_prior_log_det_matches_autograd_jacobian():
    torch.manual_seed(4)
    prior = make_prior("flow")
    for flow in prior.flows:
        z = torch.randn(LATENT)
        expected = torch.linalg.slogdet(torch.autograd.functional.jacobian(flow, z))[1]
        torch.testing.assert_close(flow.log_abs_det_jacobian(z, flow(z)), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", GUIDES.names())
def test_guide_state_dict_round_trip(name):
    a, b = make_guide(name), make_guide(name)
    b.load_state_dict(a.state_dict())
    x = torch.rand(3, DATA)
    torch.testing.assert_close(a.mean(x), b.mean(x))


# ------------------------------------------------------------------------------- likelihoods
def _likelihood(name, d):
    return LIKELIHOODS.build(part("likelihood", name, scale_mode="per-dim", scale=0.7), data_dim=d)


@pytest.mark.parametrize("name", LIKELIHOODS.names())
def test_likelihood_shapes_and_support(name):
    lik = _likelihood(name, 5)
    params = torch.randn(3, 4, lik.param_dim)
    p = lik(params)
    assert p.batch_shape == (3, 4) and p.event_shape == (5,)
    x = p.sample()
    lik.check_data(x.reshape(-1, 5))
    assert torch.isfinite(p.log_prob(x)).all()
    assert lik.mean(params).shape == (3, 4, 5)


@pytest.mark.parametrize("name", LIKELIHOODS.names())
def test_likelihood_is_normalised(name):
    """Sum/integrate p(x|params) over the support of one dimension: it must be 1."""
    lik = _likelihood(name, 1)
    params = torch.randn(4, lik.param_dim).clamp(-2, 2)
    if name == "bernoulli":
        grid, weight = torch.tensor([[0.0], [1.0]]), 1.0
    elif name == "poisson":
        grid, weight = torch.arange(0, 200.0)[:, None], 1.0
    elif name == "discretized-logistic":  # a mass on each of the 256 values k / 255
        grid, weight = (torch.arange(256.0) / 255)[:, None], 1.0
    elif name == "continuous-bernoulli":
        grid = ((torch.arange(20000) + 0.5) / 20000)[:, None]
        weight = 1 / 20000
    else:
        grid = torch.linspace(-15, 15, 30001)[:, None]
        weight = 30 / 30000
    dens = lik(params[:, None, :]).log_prob(grid[None]).exp()  # (4, n)
    torch.testing.assert_close(dens.sum(-1) * weight, torch.ones(4), atol=2e-3, rtol=0)


def test_support_mismatch_errors_name_the_problem():
    with pytest.raises(ValueError, match="binary"):
        _likelihood("bernoulli", 3).check_data(torch.full((2, 3), 0.5))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        _likelihood("continuous-bernoulli", 3).check_data(torch.full((2, 3), 1.5))
    with pytest.raises(ValueError, match="non-negative integers"):
        _likelihood("poisson", 3).check_data(torch.full((2, 3), 0.5))
    with pytest.raises(ValueError, match="scale_mode"):
        pvae.GaussianLikelihood(3, scale_mode="per-pixel")


# ------------------------------------------------------------------------------- compositions
COMBOS = [(p, g) for p, g in itertools.product(PRIORS.names(), GUIDES.names()) if (p, g) != ("vamp", "delta")]


def _normal_log_prob(z, loc, scale):
    return (-0.5 * ((z - loc) / scale) ** 2 - scale.log() - 0.5 * math.log(2 * math.pi)).sum(-1)


def _prior_log_prob_by_hand(vae, name, z):
    """log p(z) of the VAE's prior written from its parameters, not from the prior's own
    distribution object: closed forms, the mixture log-sum-exp (the VampPrior's components are the
    VAE's own guide's Gaussian at the pseudo-inputs, uniformly weighted), and for the flow prior
    the change of variables through the modules' forward pass z -> u with the log-determinant from
    an autograd Jacobian (differentiable, so gradients can be compared too)."""
    prior, d = vae.prior, z.shape[-1]
    if name == "standard-normal":
        return _normal_log_prob(z, torch.zeros(d), torch.ones(d))
    if name == "learned-diagonal":
        return _normal_log_prob(z, prior.loc, prior.log_scale.exp())
    if name in ("mog", "vamp"):
        if name == "mog":
            log_w, comps = torch.log_softmax(prior.logits, -1), dist.Normal(prior.locs, prior.log_scales.exp()).to_event(1)
        else:
            comps = vae.guide_net.base(prior.pseudo_inputs)  # batch (K,): the trained guide, not a copy
            log_w = torch.full((prior.pseudo_inputs.shape[0],), -math.log(prior.pseudo_inputs.shape[0]))
        return torch.logsumexp(comps.log_prob(z.unsqueeze(-2)) + log_w, -1)
    assert name == "flow", name
    flat = z.reshape(-1, d)
    u = flat
    for flow in prior.flows:
        u = flow(u)
    jac = torch.stack([torch.autograd.grad(u[:, j].sum(), flat, create_graph=True)[0] for j in range(d)], -2)
    log_p = _normal_log_prob(u, torch.zeros(d), torch.ones(d)) + torch.linalg.slogdet(jac)[1]
    return log_p.reshape(z.shape[:-1])


def _elbo_by_hand(vae, prior_name, x, num_samples):
    """log p(x|z) + log p(z) - log q(z|x), z ~ q(z|x): (num_samples, B), from the parts."""
    q = vae.guide_net(x)
    z = q.rsample((num_samples,))
    return vae.likelihood(vae.decoder(z)).log_prob(x) + _prior_log_prob_by_hand(vae, prior_name, z) - q.log_prob(z)


@pytest.mark.parametrize("prior, guide", COMBOS)
def test_every_prior_guide_combination_trains_on_digits(prior, guide, digits):
    """Each of the 29 prior/guide compositions is made of the parts it names and trains them:
    the VAE holds the registered classes; after a short fit the ELBO that fit follows has, on
    the same draws, the value and gradient of log p(x|z) + log p(z) - log q(z|x) written here
    with log p(z) computed from the prior's parameters by hand (the VampPrior from the VAE's own
    trained guide); every parameter of prior, guide and decoder moved; and the hand-written
    ELBO of the training data rose by more than its Monte Carlo tolerance (common random
    numbers, paired over datapoints). Fails if a composition drops a part, a prior's density is
    off (a constant included), a part is left out of training, or the VampPrior keeps a stale
    guide."""
    config = RunConfig(guide=guide, latent_dim=3, net={'hidden': (32,)},
                       prior=part("prior", prior, num_components=3, pseudo_inputs=5))
    vae = build_vae(config, digits.data_dim)
    assert isinstance(vae.prior, PRIORS.get(prior)) and isinstance(vae.guide_net, GUIDES.get(guide))
    x = digits.train[:200]
    before = {k: v.detach().clone() for k, v in vae.named_parameters()}
    with pvae._rng.seeded(1):
        elbo_before = _elbo_by_hand(vae, prior, x, 4).mean(0).detach()
    history = pvae.fit(vae, x, epochs=1, batch_size=50, lr=1e-2, objective="elbo", num_particles=2,
                       progress=False)
    assert len(history.train_objective) == 1 and all(math.isfinite(v) for v in history.train_objective)
    unmoved = [k for k, v in vae.named_parameters() if torch.equal(v.detach(), before[k])]
    assert not unmoved, f"not trained: {unmoved}"

    xb, params = x[:40], list(vae.parameters())
    with pvae._rng.seeded(2):
        loss, value = pvae.make_objective("elbo", 2).loss_and_value(vae, xb)
    with pvae._rng.seeded(2):
        by_hand = _elbo_by_hand(vae, prior, xb, 2).mean()
    torch.testing.assert_close(value, by_hand.detach(), rtol=1e-5, atol=1e-4)
    for g, e in zip(torch.autograd.grad(-loss, params), torch.autograd.grad(by_hand, params)):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)

    with pvae._rng.seeded(1):
        gain = _elbo_by_hand(vae, prior, x, 4).mean(0).detach() - elbo_before  # (B,)
    assert gain.mean() > mc_tolerance(gain.std() / math.sqrt(len(gain))), float(gain.mean())


@pytest.mark.parametrize("net", NETS.names())
def test_nets_build_for_digits_and_mnist_shapes(net):
    for data_dim, dataset in ((64, "digits"), (784, "binarized-mnist")):
        vae = build_vae(RunConfig(dataset=dataset, latent_dim=3, net=part("net", net, hidden=(16,), channels=(4, 8))), data_dim)
        x = (torch.rand(5, data_dim) < 0.3).float()
        loss, _ = pvae.make_objective("elbo", 2).loss_and_value(vae, x)
        assert torch.isfinite(loss)
        assert vae.reconstruct(x).shape == (5, data_dim)


def test_vamp_iaf_run_rebuilds_from_config_and_evaluates(tmp_path, digits):
    config = RunConfig(guide='iaf', latent_dim=3, net={'hidden': (32,)}, training={'epochs': 2}, prior={'name': 'vamp', 'pseudo_inputs': 5})
    vae = pvae.train_run(config, tmp_path / "run", progress=False, dataset=digits).vae
    run = pvae.load_run(tmp_path / "run")
    saved, loaded = run.config, run.vae
    assert saved == config
    assert type(loaded.prior).__name__ == "VampPrior" and type(loaded.guide_net).__name__ == "IAFGuide"
    x = digits.test[:20]
    vae.eval()
    torch.testing.assert_close(loaded.log_joint(x, loaded.encode(x)), vae.log_joint(x, vae.encode(x)))
    report = pvae.evaluate_run(tmp_path / "run", num_samples=5, progress=False, write=False)
    assert report.estimates["iwae"].mean >= report.estimates["elbo"].mean


# ------------------------------------------------------------------------------- non-amortized
def test_non_amortized_guide_trains_per_datapoint_parameters(digits):
    config = RunConfig(latent_dim=3, net={'hidden': (32,)})
    vae = build_vae(config, digits.data_dim)
    x = digits.train[:300]
    guide = pvae.NonAmortizedGuide(digits.data_dim, 3, num_datapoints=x.shape[0])
    model = pvae.VAE(vae.prior, vae.decoder, vae.likelihood, guide)
    before = pvae.evaluate_bounds(model, x, 5, index=torch.arange(300))["elbo"].mean
    history = pvae.fit(model, x, epochs=20, batch_size=50, lr=1e-2, progress=False)
    after = pvae.evaluate_bounds(model, x, 5, index=torch.arange(300))["elbo"].mean
    assert after > before + 5 and history.train_objective[-1] > history.train_objective[0]
    # each datapoint has its own posterior: permuting the index permutes the means
    perm = torch.randperm(300)
    torch.testing.assert_close(model.encode(x[perm], perm), model.encode(x, torch.arange(300))[perm])


def test_non_amortized_guide_refines_an_encoder_and_needs_indices(digits):
    vae = build_vae(RunConfig(latent_dim=3, net={'hidden': (32,)}), digits.data_dim)
    x = digits.test[:50]
    refined = pvae.NonAmortizedGuide.from_guide(vae.guide_net, x)
    torch.testing.assert_close(refined.mean(x, torch.arange(50)), vae.encode(x))
    torch.testing.assert_close(refined(x, torch.arange(50)).base_dist.scale, vae.guide_net(x).base_dist.scale)
    model = pvae.VAE(vae.prior, vae.decoder, vae.likelihood, refined)
    with pytest.raises(ValueError, match="needs the datapoints' indices"):
        pvae.evaluate_bounds(model, x, 3)
    with pytest.raises(ValueError, match="cannot score validation data"):
        pvae.fit(model, x, digits.valid, epochs=1, progress=False)
    with pytest.raises(ValueError, match="built for 50 datapoints"):
        pvae.fit(model, digits.test[:60], epochs=1, progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("prior, guide", COMBOS)
def test_every_combination_moves_to_cuda(prior, guide):
    config = RunConfig(guide=guide, latent_dim=3, net={'hidden': (16,)}, prior=part("prior", prior, num_components=3, pseudo_inputs=4))
    vae = build_vae(config, 64).cuda()
    x = (torch.rand(5, 64, device="cuda") < 0.3).float()
    loss, _ = pvae.make_objective("elbo", 2).loss_and_value(vae, x)
    loss.backward()
    assert loss.device.type == "cuda" and vae.sample(3, seed=0).device.type == "cuda"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", LIKELIHOODS.names())
def test_likelihoods_move_to_cuda(name):
    lik = _likelihood(name, 5).cuda()
    p = lik(torch.randn(3, lik.param_dim, device="cuda"))
    assert p.log_prob(p.sample()).device.type == "cuda"


def test_independent_bernoulli_equals_pyros_bernoulli_in_value_and_gradient():
    from pvae.likelihoods import IndependentBernoulli

    logits = torch.randn(4, 6, 9, requires_grad=True)
    x = (torch.rand(6, 9) < 0.3).float()
    ours = IndependentBernoulli(dist.Bernoulli(logits=logits), 1)
    ref = dist.Bernoulli(logits=logits).to_event(1)
    (g_ours,) = torch.autograd.grad(ours.log_prob(x).sum(), logits)
    (g_ref,) = torch.autograd.grad(ref.log_prob(x).sum(), logits)
    torch.testing.assert_close(ours.log_prob(x), ref.log_prob(x))
    torch.testing.assert_close(g_ours, g_ref)
    expanded = ours.expand((2, 4, 6))
    assert isinstance(expanded, IndependentBernoulli) and expanded.log_prob(x).shape == (2, 4, 6)


def test_gated_mlp_is_the_vampprior_papers_gated_dense_layer():
    from pvae.nets import MLP, GatedLinear

    torch.manual_seed(0)
    net = MLP(6, 3, hidden=(5, 4), activation="gated")
    assert [type(m) for m in net] == [GatedLinear, GatedLinear, torch.nn.Linear]
    x = torch.randn(2, 7, 6)
    layer = net[0]
    w, b = layer.linear.weight, layer.linear.bias
    expected = (x @ w[:5].T + b[:5]) * torch.sigmoid(x @ w[5:].T + b[5:])  # h(x) * sigmoid(g(x))
    torch.testing.assert_close(layer(x), expected)
    assert net(x).shape == (2, 7, 3)
    with pytest.raises(pvae.UsageError, match="gated dense layer, for MLPs only"):
        pvae.RunConfig(dataset='binarized-mnist', net={'name': 'conv', 'activation': 'gated'})
    config = pvae.RunConfig(dataset='binarized-mnist', latent_dim=40, net={'hidden': (300, 300), 'activation': 'gated'})
    vae = pvae.build_vae(config, 784)
    assert sum(isinstance(m, GatedLinear) for m in vae.modules()) == 4  # two in the encoder, two in the decoder


def test_diagonal_gaussian_mixture_is_mixture_same_family_exactly():
    """The mixture priors' log-density by matrix products equals Pyro's MixtureSameFamily (float64,
    components with scales from 0.01 to 10, points near and far from the means), with the same
    gradients; sampling draws component k with probability softmax(logits)_k."""
    import pyro.distributions as dist
    from pvae.priors import DiagonalGaussianMixture

    g = torch.Generator().manual_seed(0)
    k, d = 7, 5
    logits = torch.randn(k, generator=g, dtype=torch.float64).requires_grad_()
    loc = (3 * torch.randn(k, d, generator=g, dtype=torch.float64)).requires_grad_()
    scale = torch.exp(torch.empty(k, d, dtype=torch.float64).uniform_(-4.6, 2.3, generator=g)).requires_grad_()
    z = torch.cat([loc.detach()[:3] + 1e-3, 4 * torch.randn(6, 2, d, generator=g, dtype=torch.float64).reshape(-1, d)])
    z = z.reshape(5, 3, d).requires_grad_()
    fast = DiagonalGaussianMixture(logits, loc, scale).log_prob(z)
    ref = dist.MixtureSameFamily(dist.Categorical(logits=logits), dist.Normal(loc, scale).to_event(1)).log_prob(z)
    assert fast.shape == (5, 3)
    torch.testing.assert_close(fast, ref, rtol=0, atol=1e-9)
    grads = torch.autograd.grad(fast.sum(), (logits, loc, scale, z))
    grads_ref = torch.autograd.grad(ref.sum(), (logits, loc, scale, z))
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)
    mixture = DiagonalGaussianMixture(logits.detach(), loc.detach(), 1e-6 * torch.ones(k, d, dtype=torch.float64))
    draws = mixture.sample((20000,))
    assigned = torch.cdist(draws, loc.detach()).argmin(-1)
    freq = torch.bincount(assigned, minlength=k).double() / 20000
    p = torch.softmax(logits.detach(), -1)
    assert ((freq - p).abs() < 5 * (p * (1 - p) / 20000).sqrt() + 1e-12).all()


def test_mixture_priors_use_the_matrix_product_density():
    from pvae.priors import DiagonalGaussianMixture

    for prior in ({"name": "vamp", "pseudo_inputs": 6}, {"name": "mog", "num_components": 4}):
        vae = pvae.build_vae(RunConfig(latent_dim=3, net={"hidden": (8,)}, prior=prior), 10, None)
        assert isinstance(vae.prior(), DiagonalGaussianMixture)
