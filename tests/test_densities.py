"""The density every registered guide and prior reports is the density of the samples it draws.

Planar and Sylvester flows cannot score a point they did not draw (no analytic inverse), so the
importance check of test_components (a wide proposal scoring arbitrary points) skips them, and
its "log-det matches autograd" tests check each transform on its own, not the density the guide
reports. Here every part with a density (every registered guide but the point mass, every
registered prior, the VampPrior over every such guide) is built in float64 with its parameters
moved away from their initialisation (flows far from the identity, so log-determinants matter),
and checked three ways:

* ``test_a_flows_density_is_the_change_of_variables_of_its_sampling_map`` (every part whose
  distribution is a normalizing flow): the reported log-density at the part's own samples equals
  ``log base(eps) - log|det J|`` with ``J`` the autograd Jacobian of the whole sampling map
  ``eps -> z`` (exact to round-off); ``J`` is also block diagonal over datapoints (each
  datapoint's z moves with its own noise only). Parts that can score any point are also scored at
  a copy of the samples (no cache: the inverse path).
* ``test_reweighting_its_own_samples_by_r_over_the_density_recovers_r`` (every part): for any
  normalized density r, E_{z~q}[r(z)/q(z)] = 1 and E_q[(r/q) f(z)] = E_r[f(z)] (here f = z_j and
  z_j**2, exact for r); r is a mixture of narrow Gaussians centred on independent draws of q (so r
  lives where q does). This uses only the part's own samples and the densities it reports at them,
  so it applies to flows that cannot invert, and it fails when the reported density is not the
  density of the samples (E_p[r/q] = E_r[p/q] for samples from p).
* ``test_the_density_is_normalized_and_matches_the_samples`` (every part that can score any
  point): with a wide Gaussian r around the part's samples, E_r[q/r] = 1 and
  E_r[(q/r) f(z)] = E_q[f(z)] for f(z) = z_j and z_j**2, the right-hand side from samples.
* ``test_a_float64_part_draws_and_scores_in_float64``: the parts work in the dtype the checks use.

Tolerances are :func:`pvae.testing.mc_tolerance` of the estimated Monte Carlo standard errors
(a correct part fails a test with probability about 1e-6, shared between the test's checks); each
statistical test also asserts that it has the power to see a 5% error in the normalization. Seeds
only fix the draws: over 60 seeds of parameters and draws per part, the z-scores of E_q[r/q] had
standard deviations 0.88-1.05 and those of the reweighted moments 0.93-1.00, and no z-score of
any check here exceeded 3.9 in absolute value (the tolerances are 4.9-5.3 standard errors).

Break-it record (each break monkeypatched in a scratch process, this file run whole):

* ``_TriangularSylvester.log_abs_det_jacobian`` negated: the Sylvester guide fails the change of
  variables (off by up to 0.72 nats) and E_q[r/q] = 0.548 +- 0.001;
* Pyro's ``ConditionedPlanar.log_abs_det_jacobian`` negated: the planar guide fails the change of
  variables (off by up to 3.1 nats) and E_q[r/q] = 6.31 +- 0.02;
* Pyro's ``AffineAutoregressive.log_abs_det_jacobian`` negated: the IAF guide and the flow prior
  fail all three statistical and exact tests;
* tanh' dropped from the Sylvester log-det: change of variables, and E_q[r/q] = 1.042 +- 0.002;
* a mixture that draws its components uniformly instead of by its weights (density unchanged):
  the MoG prior fails E_q[(r/q) z_0] and E_r[(q/r) z_0];
* a mixture density 5% too high: the MoG prior and the VampPriors on diagonal bases fail
  E_q[r/q] (0.95) and E_r[q/r] (1.05);
* the flow prior's inverse as Pyro's (float32 zeros): its four tests fail with a dtype error.
"""

import inspect
import math

import pyro.distributions as dist
import pytest
import torch

from conftest import part
from pvae.guides import GUIDES
from pvae.priors import PRIORS
from pvae.testing import mc_tolerance

LATENT, DATA = 2, 6
FAILURE_RATE = 1e-6  # per test, shared between its checks
F64 = torch.float64


def _guide(name, seed=0):
    torch.manual_seed(seed)
    guide = GUIDES.get(name)(DATA, LATENT, hidden=(8,)).double()
    with torch.no_grad():
        for p in getattr(guide, "flows", torch.nn.ModuleList()).parameters():
            p.normal_(0, 0.3)  # flows far enough from the identity that their log-dets matter
    return guide


def _takes_guide(prior_name):
    return "guide" in inspect.signature(PRIORS.get(prior_name)).parameters


DENSITY_GUIDES = [n for n in GUIDES.names() if GUIDES.get(n).has_density]
# (kind, name, guide the prior is built on): a prior that reads a guide (the VampPrior) is
# checked over every guide with a density (their bases take different code paths)
PARTS = [("guide", n, None) for n in DENSITY_GUIDES] + [
    ("prior", n, g) for n in PRIORS.names() for g in (DENSITY_GUIDES if _takes_guide(n) else [None])
]


def _part_id(p):
    kind, name, guide = p
    return f"{kind}-{name}" + (f"-on-{guide}" if guide else "")


def build(kind, name, guide_name=None, batch=1, seed=0):
    """``(distribution, scores_any_point)``: the part's distribution over z (a guide's at ``batch``
    random datapoints, batch shape ``(batch,)``; a prior's, batch shape ``()``), in float64."""
    if kind == "guide":
        guide = _guide(name, seed)
        x = torch.rand(batch, DATA, dtype=F64)
        with torch.no_grad():
            return guide(x), guide.scores_any_point
    guide = _guide(guide_name, seed) if guide_name else None
    torch.manual_seed(seed)
    prior = PRIORS.build(part("prior", name, num_components=3, pseudo_inputs=4), latent_dim=LATENT, guide=guide)
    with torch.no_grad():
        for pname, p in prior.named_parameters():  # away from the initialisation (standard normal,
            # near-identity flows), the flows less: a MAF's scales compound into z's range
            p.add_((0.1 if "flows" in pname else 0.5) * torch.randn_like(p))
        return prior.double()(), True


def _is_flow(p):
    with torch.random.fork_rng():
        return isinstance(build(*p)[0], dist.TransformedDistribution)


FLOW_PARTS = [p for p in PARTS if _is_flow(p)]
ANY_POINT_PARTS = [p for p in PARTS if (p[0] == "prior" or GUIDES.get(p[1]).scores_any_point)]


def _flat(z):
    return z.reshape(z.shape[0], LATENT)


# --------------------------------------------------------------------- float64
@pytest.mark.parametrize("kind, name, guide_name", PARTS, ids=[_part_id(p) for p in PARTS])
def test_a_float64_part_draws_and_scores_in_float64(kind, name, guide_name):
    """Regression: the flow prior drew samples through Pyro's autoregressive inverse, which starts
    from zeros of the default dtype (float32), so a float64 flow prior failed to draw."""
    q, _ = build(kind, name, guide_name)
    with torch.no_grad():
        z = q.sample((3,))
        assert z.dtype == F64 and q.log_prob(z).dtype == F64
        if (kind, name, guide_name) in ANY_POINT_PARTS:
            assert q.log_prob(z.clone()).dtype == F64


# --------------------------------------------------------------------- change of variables
@pytest.mark.parametrize("kind, name, guide_name", FLOW_PARTS, ids=[_part_id(p) for p in FLOW_PARTS])
def test_a_flows_density_is_the_change_of_variables_of_its_sampling_map(kind, name, guide_name):
    batch = 2 if kind == "guide" else 1
    q, scores_any_point = build(kind, name, guide_name, batch=batch)
    num = 6
    with torch.no_grad():
        eps = q.base_dist.sample((num,))  # (num, *batch_shape, L)
    nb = q.batch_shape.numel()

    def sampling_map(e):  # the part's own map eps -> z, through its transforms in order
        for t in q.transforms:
            e = t(e)
        return e

    expected = []
    for e in eps:
        jac = torch.autograd.functional.jacobian(sampling_map, e).reshape(nb, LATENT, nb, LATENT)
        for b in range(nb):
            for c in range(nb):
                if b != c:
                    assert (jac[b, :, c, :] == 0).all(), f"datapoint {b}'s z depends on datapoint {c}'s noise"
        blocks = torch.stack([jac[b, :, b, :] for b in range(nb)])
        expected.append(q.base_dist.log_prob(e).reshape(nb) - torch.linalg.slogdet(blocks)[1])
    expected = torch.stack(expected)
    with torch.no_grad():
        z = sampling_map(eps)  # each transform caches its input: what the ELBO scores
        reported = q.log_prob(z).reshape(num, nb)
        log_det = q.base_dist.log_prob(eps).reshape(num, nb) - reported
    torch.testing.assert_close(reported, expected, rtol=0, atol=1e-8)
    assert float(log_det.abs().mean()) > 0.1, f"the flow barely moves the density ({log_det}): no power"
    if scores_any_point:
        with torch.no_grad():  # a copy misses the caches: scored through the inverse
            torch.testing.assert_close(q.log_prob(z.clone()).reshape(num, nb), expected, rtol=0, atol=1e-8)


# --------------------------------------------------------------------- E_q[r/q] = 1
def reverse_checks(q, num=200_000, centres=64, bandwidth=0.15):
    """``([(name, estimate, expected, standard error)], largest share of the sum)`` over ``num``
    draws z of q: E_q[r/q] against 1 and E_q[(r/q) f] against E_r[f] for f = z_j, z_j**2 (exact,
    r being a Gaussian mixture), where r is a mixture of ``centres`` Gaussians of scale
    ``bandwidth`` times q's marginal standard deviations, centred on the half of ``2 centres``
    independent draws of q where q is highest. These hold whenever q reports the density of its
    samples. (r may be chosen from anything but the scored draws. A centre in q's tail would be
    reached by a handful of the scored draws, which makes the means skewed and their standard
    errors unreliable: over 60 seeds of parameters and draws, the IAF guide's z-scores for
    E_q[r/q] had a standard deviation of 1.3 with all draws as centres, 1.0 with the upper half.)"""
    with torch.no_grad():
        pilot = q.sample((2 * centres,))
        densest = q.log_prob(pilot).reshape(-1).argsort(descending=True)[:centres]
        pilot = _flat(pilot)
        loc, scale = pilot[densest], bandwidth * pilot.std(0)
        r = dist.MixtureSameFamily(dist.Categorical(logits=torch.zeros(centres, dtype=F64)),
                                   dist.Normal(loc, scale).to_event(1))
        z = q.sample((num,))  # scored as drawn: flows without an inverse read their caches
        ratio = (r.log_prob(_flat(z)) - q.log_prob(z).reshape(num)).exp()
        z = _flat(z)
    checks = [("E_q[r/q]", ratio, torch.tensor(1.0, dtype=F64))]
    for j in range(LATENT):
        checks.append((f"E_q[(r/q) z_{j}]", ratio * z[:, j], loc[:, j].mean()))
        checks.append((f"E_q[(r/q) z_{j}**2]", ratio * z[:, j] ** 2, (loc[:, j] ** 2 + scale[j] ** 2).mean()))
    return ([(n, float(v.mean()), float(e), float(v.std() / math.sqrt(num))) for n, v, e in checks],
            float(ratio.max() / ratio.sum()))


@pytest.mark.parametrize("kind, name, guide_name", PARTS, ids=[_part_id(p) for p in PARTS])
def test_reweighting_its_own_samples_by_r_over_the_density_recovers_r(kind, name, guide_name):
    q, _ = build(kind, name, guide_name)
    checks, largest = reverse_checks(q)
    for label, estimate, expected, stderr in checks:
        tol = mc_tolerance(stderr, FAILURE_RATE / len(checks))
        assert abs(estimate - expected) < tol, (
            f"{label} = {estimate:.4f} +- {stderr:.4f} (tolerance {tol:.4f}), expected {expected:.4f}")
    # a correct density gives r/q a small spread here (the largest share was at most 0.3% over the
    # 60 seeds above); a wrong one can give it a heavy tail
    tol = mc_tolerance(checks[0][3], FAILURE_RATE / len(checks))
    assert tol < 0.05 and largest < 0.01, (
        f"E_q[r/q] = {checks[0][1]:.4f} +- {checks[0][3]:.4f}, largest ratio {largest:.2%} of the sum: too "
        "little power (a 5% error would pass), or r/q has a heavy tail because q is not the density of its samples")


# --------------------------------------------------------------------- E_r[q/r] = 1
def forward_checks(q, num=200_000, pilot=2_000, widen=3.0):
    """``([(name, estimate, reference, standard error of the difference)], largest weight's share
    of the sum)``: with r a Gaussian of ``widen`` times q's marginal standard deviations around q's
    mean (both from ``pilot`` draws), E_r[q/r] against 1 and E_r[(q/r) f] against E_q[f] for
    f = z_j, z_j**2 (from q's own samples)."""
    with torch.no_grad():
        p = _flat(q.sample((pilot,)))
        r = dist.Normal(p.mean(0), widen * p.std(0)).to_event(1)
        zr = r.sample((num,))
        shape = (num,) + q.batch_shape + q.event_shape
        w = (q.log_prob(zr.reshape(shape)).reshape(num) - r.log_prob(zr)).exp()
        zq = _flat(q.sample((num,)))
    checks = [("E_r[q/r]", w.mean(), torch.tensor(1.0, dtype=F64), w.std() / math.sqrt(num))]
    for label, f in (("z", lambda z: z), ("z**2", lambda z: z**2)):
        lhs, rhs = w[:, None] * f(zr), f(zq)
        se = (lhs.var(0) / num + rhs.var(0) / num).sqrt()
        for j in range(LATENT):
            checks.append((f"E_q[{label}_{j}]", lhs[:, j].mean(), rhs[:, j].mean(), se[j]))
    return [(n, float(a), float(b), float(s)) for n, a, b, s in checks], float(w.max() / w.sum())


@pytest.mark.parametrize("kind, name, guide_name", ANY_POINT_PARTS, ids=[_part_id(p) for p in ANY_POINT_PARTS])
def test_the_density_is_normalized_and_matches_the_samples(kind, name, guide_name):
    q, _ = build(kind, name, guide_name)
    checks, largest_weight = forward_checks(q)
    for label, estimate, reference, stderr in checks:
        tol = mc_tolerance(stderr, FAILURE_RATE / len(checks))
        assert abs(estimate - reference) < tol, (
            f"{label}: {estimate:.4f} by importance sampling from r, {reference:.4f} expected "
            f"(s.e. {stderr:.4f}, tolerance {tol:.4f})")
    normalization_tol = mc_tolerance(checks[0][3], FAILURE_RATE / len(checks))
    assert normalization_tol < 0.05, f"too little power: a 5% error would pass (s.e. {checks[0][3]:.4f})"
    # the normal approximation behind the tolerances needs many comparable weights
    assert largest_weight < 1e-3, f"one importance weight carries {largest_weight:.2%} of the sum"
