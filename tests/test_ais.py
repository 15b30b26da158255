"""AIS and its HMC kernel against exact answers (tolerances from Monte Carlo standard errors)."""

import dataclasses
import math

import pyro.distributions as dist
import pytest
import torch

from pvae import annealing
from conftest import part, requires_cuda
from pvae.annealing import AISSettings, HMCInfo, HMCState, ais, hmc_kernel, schedule
from pvae.config import RunConfig, build_vae
from pvae.errors import UsageError, UsageTypeError
from pvae.estimators import naive_prior_estimate
from pvae.priors import PRIORS
from pvae.testing import exact_log_marginal, linear_gaussian_vae, mc_tolerance


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    """The models here are tiny: a gradient evaluation is a few matrix products of a handful of
    rows, which a multi-threaded BLAS only slows down (measured on 2 shared cores: 10-20 ms per
    gradient evaluation with 2 threads, 0.6 ms with 1). The numbers do not depend on it (checked:
    the same AIS estimates with 1 and 2 threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def model():
    return linear_gaussian_vae(data_dim=5, latent_dim=2, noise_scale=0.5, seed=0)


def _generator(seed):
    return torch.Generator().manual_seed(seed)


def _correlated_gaussian(validate_args=None):
    cov = torch.tensor([[1.0, 0.8], [0.8, 1.0]], dtype=torch.float64)  # eigenvalues 1.8 and 0.2
    return dist.MultivariateNormal(torch.zeros(2, dtype=torch.float64), cov, validate_args=validate_args)


def _run_hmc(log_density_fn, position, step_size, num_leapfrog, num_transitions, generator):
    """``num_transitions`` kernel transitions from ``position``; the final state and the infos."""
    state = HMCState.init(position, log_density_fn)
    infos = []
    for _ in range(num_transitions):
        state, info = hmc_kernel(state, log_density_fn, step_size, num_leapfrog, generator)
        infos.append(info)
    return state, infos


# ------------------------------------------------------------------------- exact answers
def test_two_point_schedule_is_importance_sampling_from_the_prior(model):
    x = model.sample(7, seed=1, mean=False).detach()
    a = ais(model, x, num_chains=64, betas=[0.0, 1.0], seed=3)
    b = naive_prior_estimate(model, x, 64, chunk_size=64, seed=3)
    torch.testing.assert_close(a.values, b.values, atol=1e-10, rtol=0)


def test_ais_is_unbiased_for_p_x(model):
    """E[p_hat / p(x)] = 1: replicate AIS independently and check the mean ratio. The 40
    replicates run as one batch of 40 copies of the data (each datapoint's chains and step size
    are its own, so the copies are independent replicates)."""
    x = model.sample(4, seed=2, mean=False).detach()
    log_px = exact_log_marginal(model, x).detach()
    estimate = ais(model, x.repeat(40, 1), num_chains=4, num_steps=30, batch_size=160, seed=0)
    reps = (estimate.values.reshape(40, 4) - log_px).exp()  # (40, 4)
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
    target = _correlated_gaussian()
    n = 20000
    z = target.sample((n,))
    state, infos = _run_hmc(target.log_prob, z, torch.tensor(0.3, dtype=torch.float64), 5, 5, _generator(0))
    z = state.position
    assert infos[-1].acceptance_prob.mean() > 0.5
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
    replicates = 10  # run as one batch of copies of the data (independent: every datapoint's chains are its own)
    out = bdmc(model, x.repeat(replicates, 1), z.repeat(replicates, 1), num_chains=8, num_steps=50, seed=0)
    err = torch.stack([(bound.values.reshape(replicates, -1) - log_px).mean(1) for bound in (out.lower, out.upper)],
                      dim=1)  # (R, 2): lower - exact, upper - exact, each averaged over the datapoints
    se = err.std(0) / math.sqrt(replicates)
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
    target = _correlated_gaussian()
    n = 20000
    z = target.sample((n,))
    eps = torch.tensor(0.7, dtype=torch.float64)  # omega = 1 / sqrt(0.2) = 2.24
    state, infos = _run_hmc(target.log_prob, z, eps, 3, 20, _generator(1))
    z = state.position
    accept = [info.acceptance_prob.mean() for info in infos]
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
    gaps 6.3 (2 steps), 1.6 (10) and 0.55 nats (40) on ten simulated datapoints; each must be
    below the previous one by more than the Monte Carlo tolerance of the difference (R = 32
    independent replicates). A reverse chain that does not run the schedule backwards, or an
    HMC kernel that does not move, keeps the gap from closing.

    The replicates run as one batch of R copies of the data (each datapoint's chains and step
    size are its own, so the copies are independent replicates). With R = 8 the test had little
    power: the gap difference from 10 to 40 steps is 1.05 nats with a replicate spread of 0.68,
    against a tolerance of 5.03 * 0.68 / sqrt(R) = 1.2 nats, so a correct kernel passed about a
    quarter of the time (the draws of the old kernel happened to pass); with R = 32 the tolerance
    is 0.6 and a correct kernel fails about once in 10^4."""
    from pvae.annealing import bdmc

    torch.manual_seed(5)
    z = model.prior().sample((10,)).double()
    x = model.likelihood(model.decoder(z)).sample().detach()
    replicates = 32
    tol = mc_tolerance(1.0, 1e-6 / 2)
    stats = []
    for steps in (2, 10, 40):
        out = bdmc(model, x.repeat(replicates, 1), z.repeat(replicates, 1), num_chains=4, num_steps=steps, seed=steps)
        gaps = out.gap.reshape(replicates, -1).mean(1)  # each replicate's mean gap over the ten datapoints
        stats.append((gaps.mean(), gaps.std() / math.sqrt(replicates)))
    for (gap_short, se_short), (gap_long, se_long) in zip(stats, stats[1:]):
        assert gap_short - gap_long > tol * math.sqrt(se_short ** 2 + se_long ** 2), stats
    assert stats[-1][0] < 1.0


def _quadrature_log_marginal(vae, x, half_width=8.0, points=201):
    r""":math:`\log p(x) = \log \int p(x|z) p(z) dz` for a 2-d latent by the midpoint rule on a
    ``points`` x ``points`` grid over ``[-half_width, half_width]^2``, from the model's closed-form
    joint density (not the path AIS evaluates it by), and :math:`\log \int p(z) dz` on the same grid
    (0 when the grid holds the prior's mass)."""
    axis = torch.linspace(-half_width, half_width, points, dtype=torch.float64)
    grid = torch.cartesian_prod(axis, axis).to(x.dtype)  # (G, 2)
    log_cell = 2 * math.log(axis[1] - axis[0])
    with torch.no_grad():
        log_joint = vae.log_joint(x, grid[:, None, :].expand(-1, x.shape[0], -1)).double()  # (G, B)
        log_prior = vae.log_prior(grid).double()
    return torch.logsumexp(log_joint, 0) + log_cell, float(torch.logsumexp(log_prior, 0) + log_cell)


@pytest.mark.parametrize("prior", PRIORS.names())
def test_ais_finds_the_exact_log_marginal_for_every_prior(prior):
    """For every prior (a mixture's several modes, a flow's non-Gaussian density), AIS from the
    prior sits at the exact log p(x) of a model with a 2-d latent, computed by quadrature (the grid's
    error, below 1e-4 nats here, is negligible): the mean error over 16 datapoints lies within the
    Monte Carlo tolerance of its delta-method standard error (AIS's downward bias, about half the
    variance of each estimate, is below a tenth of that standard error at this size; measured over
    four seeds per prior: errors of -0.03 ± 0.98 standard errors). The decoder is sharpened so that
    the posterior is narrow and the chains must move: a kernel whose accept step uses the wrong
    energy (a flipped kinetic term: mean errors of +1.2 nats against a tolerance of 0.1) or that
    skips the Metropolis correction (-0.6 against 0.25) fails."""
    torch.manual_seed(0)
    config = RunConfig(latent_dim=2, net={"hidden": (16,)}, likelihood={"name": "gaussian", "scale": 0.2},
                       prior=part("prior", prior, num_components=3, pseudo_inputs=4))
    vae = build_vae(config, 4)
    with torch.no_grad():  # a decoder four times steeper: each datapoint pins z down
        [layer for layer in vae.decoder.modules() if isinstance(layer, torch.nn.Linear)][-1].weight.mul_(4.0)
    x = vae.sample(16, seed=1, mean=False).detach()
    exact, log_prior_mass = _quadrature_log_marginal(vae, x)
    assert abs(log_prior_mass) < 1e-4  # the grid holds the prior: the quadrature is the exact answer
    est = ais(vae, x, num_chains=64, num_steps=20, step_size=0.2, seed=0)
    error = est.values - exact
    assert abs(float(error.mean())) < mc_tolerance(est.mc_stderr_of_mean, 1e-6), (error.mean(), est.mc_stderr_of_mean)


# ------------------------------------------------------------------------- the HMC kernel
def test_hmc_kernel_evaluates_the_density_once_per_leapfrog_step():
    """The start point's density and gradient come from the state: a transition evaluates the
    density exactly ``num_leapfrog`` times (the kernel before the state carried them: one more)."""
    target = _correlated_gaussian()
    calls = []

    def log_density(position):
        calls.append(position.requires_grad)
        return target.log_prob(position)

    state = HMCState.init(torch.zeros(10, 2, dtype=torch.float64), log_density)
    assert calls == [True]
    generator = _generator(0)
    for num_leapfrog in (1, 3, 7):
        calls.clear()
        state, info = hmc_kernel(state, log_density, 0.3, num_leapfrog, generator)
        assert len(calls) == num_leapfrog and all(calls)
        assert info.num_leapfrog == num_leapfrog


def test_ais_evaluates_the_densities_num_leapfrog_plus_one_times_per_transition(model, monkeypatch):
    """Per transition: one gradient evaluation at the new temperature (it also gives the weight
    increment) and ``num_leapfrog`` in the kernel; the last temperature needs the weight only
    (before the kernel carried its state: one more gradient evaluation and one more weight
    evaluation per transition)."""
    grad_calls, plain_calls = [], []
    densities = annealing._Chains.densities

    def counted(self, state):
        (grad_calls if state.requires_grad else plain_calls).append(1)
        return densities(self, state)

    monkeypatch.setattr(annealing._Chains, "densities", counted)
    x = model.sample(3, seed=1, mean=False).detach()
    for num_steps, num_leapfrog in ((5, 4), (9, 2)):
        grad_calls.clear(), plain_calls.clear()
        ais(model, x, num_chains=2, num_steps=num_steps, num_leapfrog=num_leapfrog)
        assert len(grad_calls) == (num_steps - 1) * (num_leapfrog + 1)
        assert len(plain_calls) == 1


def test_hmc_kernel_draws_from_its_generator_only():
    """The momenta and the accept/reject uniforms come from the generator passed in: the same
    generator seed gives the same transition whatever the global RNG, which is left untouched;
    another seed gives another."""
    target = _correlated_gaussian()
    state = HMCState.init(target.sample((500,)), target.log_prob)

    def transition(generator_seed, global_seed):
        torch.manual_seed(global_seed)
        global_before = torch.get_rng_state()
        new_state, info = hmc_kernel(state, target.log_prob, 0.7, 3, _generator(generator_seed))
        assert torch.equal(torch.get_rng_state(), global_before)
        return new_state, info

    (a, info_a), (b, info_b), (c, _) = transition(7, 0), transition(7, 1), transition(8, 0)
    assert torch.equal(a.position, b.position) and torch.equal(info_a.is_accepted, info_b.is_accepted)
    assert not torch.equal(a.position, c.position)
    with pytest.raises(UsageTypeError, match="torch.Generator"):
        hmc_kernel(state, target.log_prob, 0.7, 3, 7)


def test_the_info_record_and_the_carried_state_describe_the_transition():
    """HMCInfo: acceptance probabilities in [0, 1], falling as the step grows (0, not NaN, for
    proposals whose energy overflows), the chains that moved exactly those accepted, the step size
    and leapfrog count used; the new state carries the log-density and gradient at its position."""
    target = _correlated_gaussian(validate_args=False)  # it is evaluated at overflowed (NaN) proposals
    state0 = HMCState.init(target.sample((2000,)), target.log_prob)
    mean_accept = []
    for step_size in (0.05, 0.9, 1e200):  # energy error tiny, large, infinite
        state, info = hmc_kernel(state0, target.log_prob, step_size, 3, _generator(0))
        assert isinstance(info, HMCInfo) and info.num_leapfrog == 3 and float(info.step_size) == step_size
        assert info.acceptance_prob.shape == (2000,) and info.is_accepted.dtype == torch.bool
        assert bool(((info.acceptance_prob >= 0) & (info.acceptance_prob <= 1)).all())
        moved = (state.position != state0.position).any(-1)
        assert torch.equal(moved, info.is_accepted)
        expected = HMCState.init(state.position, target.log_prob)
        torch.testing.assert_close(state.log_density, expected.log_density, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(state.log_density_grad, expected.log_density_grad, rtol=1e-12, atol=1e-12)
        mean_accept.append(float(info.acceptance_prob.mean()))
    assert mean_accept[0] > 0.95 and mean_accept[0] > mean_accept[1] > mean_accept[2] == 0.0


@requires_cuda
def test_hmc_kernel_draws_on_the_chains_device():
    target = dist.Normal(torch.zeros(2, device="cuda"), 1.0).to_event(1)
    state = HMCState.init(torch.zeros(4, 2, device="cuda"), target.log_prob)
    new, _ = hmc_kernel(state, target.log_prob, 0.3, 2, torch.Generator(device="cuda").manual_seed(0))
    assert new.position.device.type == "cuda"
    with pytest.raises(UsageError, match="generator is on cpu"):
        hmc_kernel(state, target.log_prob, 0.3, 2, _generator(0))


# ------------------------------------------------------------------------- seeds and settings
def test_ais_is_a_function_of_its_seed_and_leaves_the_global_rng_alone(model):
    x = model.sample(6, seed=1, mean=False).detach()
    before = torch.get_rng_state()
    a = ais(model, x, num_chains=4, num_steps=6, batch_size=4, seed=11)
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(123)  # another global state changes nothing
    b = ais(model, x, num_chains=4, num_steps=6, batch_size=4, seed=11)
    c = ais(model, x, num_chains=4, num_steps=6, batch_size=4, seed=12)
    assert torch.equal(a.values, b.values) and torch.equal(a.extra["accept_rate"], b.extra["accept_rate"])
    assert not torch.equal(a.values, c.values)
    # seed=None draws from (and advances) the global stream
    torch.manual_seed(0)
    d = ais(model, x, num_chains=4, num_steps=6, seed=None)
    assert not torch.equal(torch.get_rng_state(), before)
    e = ais(model, x, num_chains=4, num_steps=6, seed=None)
    assert not torch.equal(d.values, e.values)


def test_the_kernel_generator_is_seeded_per_minibatch_apart_from_the_start_draws(model, monkeypatch):
    """Minibatch i's kernel draws from a generator made from the minibatch's seed
    ``batch_seed(seed, i)`` (so a sharded or resumed evaluation draws the same), in a stream of its
    own: not the stream the start states are drawn from under that seed. BDMC's reverse chains
    draw from ``seed + 1``."""
    from pvae.annealing import bdmc
    from pvae.distributed import batch_seed

    seeds = []
    make_generator = annealing._kernel_generator

    def recorded(seed, device):
        seeds.append(seed)
        return make_generator(seed, device)

    monkeypatch.setattr(annealing, "_kernel_generator", recorded)
    x = model.sample(5, seed=1, mean=False).detach()
    ais(model, x, num_chains=2, num_steps=3, batch_size=2, seed=11)
    assert seeds == [batch_seed(11, i) for i in range(3)]
    for seed in seeds:
        kernel_draws = torch.randn(8, generator=make_generator(seed, "cpu"))
        start_draws = torch.randn(8, generator=torch.Generator().manual_seed(seed))
        assert not torch.equal(kernel_draws, start_draws)
    seeds.clear()
    bdmc(model, x, torch.zeros(5, 2, dtype=torch.float64), num_chains=2, num_steps=3, seed=11)
    assert seeds == [11, 12]


def test_ais_adapts_the_step_size_towards_the_target_acceptance(model):
    """A step too large (mean acceptance below the target) shrinks, one far too small
    (acceptance near 1) grows, each datapoint's on its own; without adaptation the step size
    stays."""
    x = model.sample(4, seed=1, mean=False).detach()
    options = {"num_chains": 8, "num_steps": 15, "target_accept": 0.65, "seed": 0}
    large = ais(model, x, step_size=1.5, **options).extra
    small = ais(model, x, step_size=1e-3, **options).extra
    fixed = ais(model, x, step_size=1.5, adapt_step_size=False, **options).extra
    assert bool((large["accept_rate"] < 0.65).all()) and bool((large["step_size"] < 1.5).all())
    assert bool((small["accept_rate"] > 0.65).all()) and bool((small["step_size"] > 1e-3).all())
    assert bool((fixed["step_size"] == 1.5).all())
    for extra in (large, small, fixed):
        assert bool(((extra["accept_rate"] >= 0) & (extra["accept_rate"] <= 1)).all())


def test_ais_settings_hold_the_defaults_and_take_keyword_overrides(model):
    s = AISSettings()
    assert s.to_dict() == {"num_chains": 16, "num_steps": 100, "betas": "sigmoid", "start": "prior",
                           "num_leapfrog": 10, "step_size": 0.05, "target_accept": 0.65, "adapt_step_size": True}
    assert AISSettings(**s.to_dict()) == s
    custom = AISSettings(num_chains=3, betas=torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64))
    assert custom.betas == (0.0, 0.3, 1.0) and custom.to_dict()["betas"] == [0.0, 0.3, 1.0]
    assert AISSettings(**custom.to_dict()) == custom
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.num_chains = 3
    x = model.sample(3, seed=1, mean=False).detach()
    by_keyword = ais(model, x, num_chains=3, num_steps=4, num_leapfrog=2)
    by_settings = ais(model, x, AISSettings(num_chains=3, num_steps=4, num_leapfrog=2))
    overridden = ais(model, x, AISSettings(num_chains=5, num_steps=4, num_leapfrog=2), num_chains=3)
    assert torch.equal(by_keyword.values, by_settings.values) and torch.equal(by_keyword.values, overridden.values)


@pytest.mark.parametrize("field, value", [
    ("num_chains", 0), ("num_chains", 2.5), ("num_steps", -1), ("num_leapfrog", True), ("betas", "cosine"),
    ("betas", [0.0, 0.5]), ("betas", [0.0, 0.6, 0.4, 1.0]), ("start", "posterior"), ("step_size", 0.0),
    ("step_size", float("nan")), ("target_accept", 1.0), ("target_accept", "high"), ("adapt_step_size", "yes"),
])
def test_ais_settings_name_the_bad_field(field, value):
    with pytest.raises(UsageError, match=f"AISSettings.{field}"):
        AISSettings(**{field: value})


def test_unknown_or_misplaced_ais_options_are_usage_errors(model):
    x = torch.zeros(2, 5, dtype=torch.float64)
    with pytest.raises(UsageTypeError, match=r"unknown option\(s\) \['chains'\]; valid: num_chains, num_steps, betas"):
        ais(model, x, chains=4)
    with pytest.raises(UsageTypeError, match="num_chains=..."):
        ais(model, x, 4)  # num_chains, the old third positional argument
    with pytest.raises(UsageTypeError, match=r"unknown option\(s\) \['leapfrog'\]"):
        AISSettings().replace(leapfrog=3)


def test_every_public_name_is_documented():
    assert set(annealing.__all__) == {"AISSettings", "BDMCBounds", "HMCInfo", "HMCState", "ais", "bdmc",
                                      "hmc_kernel", "schedule"}
    for name in annealing.__all__:
        assert (getattr(annealing, name).__doc__ or "").strip(), name
    for method in (HMCState.init, AISSettings.to_dict, AISSettings.replace, AISSettings.temperatures,
                   AISSettings.field_names):
        assert (method.__doc__ or "").strip(), method
