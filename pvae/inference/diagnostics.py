r"""Diagnostics of a trained VAE. Pure functions: no printing, no plotting.

* :func:`psis_khat` — Pareto-smoothed importance sampling shape :math:`\hat k` per datapoint
  (Vehtari et al., 2024; Yao et al., 2018): is :math:`q(z|x)` good enough as a proposal for
  :math:`p(z|x)`? :math:`\hat k < 0.5` good, :math:`0.5 \le \hat k < 0.7` usable,
  :math:`\hat k \ge 0.7` the importance estimate is unreliable. Computed by ArviZ 0.x
  (``arviz.psislw``, pinned below 1.0, whose API moved).
* :func:`active_units` — Burda et al. (2015): unit :math:`u` is active when
  :math:`\operatorname{Cov}_x(E_q[z_u|x]) > 0.01`.
* :func:`kl_per_dimension` — :math:`E_x KL(q(z_d|x) \| p(z_d))` per latent dimension
  (factorized Gaussian guide and prior); near-zero entries are collapsed units.
"""

from __future__ import annotations

import math
import warnings
from typing import Dict, Optional

import pyro.distributions as dist
import torch

from pvae.inference import engine
from pvae._rng import seeded
from pvae.errors import DivergenceError, UsageError, rows_phrase
from pvae.inference.estimators import (
    DEFAULT_CHUNK_SIZE,
    check_data,
    importance_ess,
    log_importance_weights,
)

__all__ = [
    "importance_diagnostics", "psis_khat", "active_units", "kl_per_dimension", "latent_diagnostics",
    "inference_gaps", "to_inference_data",
]


def psis_khat(log_weights: torch.Tensor) -> torch.Tensor:
    """PSIS :math:`\\hat k` per datapoint from log importance weights of shape ``(K, B)``
    (samples first, as :func:`pvae.estimators.log_importance_weights` yields them).

    :returns: ``(B,)`` float64 tensor.
    """
    try:
        from arviz import psislw
    except ImportError as exc:  # arviz >= 1 moved it; pvae pins arviz < 1
        raise ImportError("pvae.diagnostics needs arviz 0.x (arviz.psislw); pip install 'arviz<1'") from exc
    if log_weights.dim() != 2:
        raise UsageError(f"log_weights must have shape (K, B), got {tuple(log_weights.shape)}")
    _, khat = psislw(log_weights.detach().T.double().cpu().numpy())
    return torch.as_tensor(khat, dtype=torch.float64).reshape(-1)


def importance_diagnostics(
    vae, x: torch.Tensor, num_samples: int = 1000, chunk_size: Optional[int] = DEFAULT_CHUNK_SIZE,
    seed: Optional[int] = 0,
) -> Dict[str, torch.Tensor]:
    """PSIS :math:`\\hat k` and the importance-sampling ESS per datapoint for the guide as
    proposal, from ``num_samples`` draws (memory ``num_samples * B``; batch ``x`` yourself).

    :returns: ``{"khat": (B,), "ess": (B,)}``.
    :raises UsageError: for a guide with a point-mass site (pvae's ``"delta"`` guide, or a
        ``Delta`` site in a user's program), which has no density: its "weights" would read as a
        perfect proposal (k-hat = -inf, ESS = K) while measuring nothing. The site is named.
    """
    with torch.no_grad(), seeded(seed, x.device):
        lw = torch.cat(list(log_importance_weights(vae, x, num_samples, chunk_size))).double()
    return {"khat": psis_khat(lw), "ess": importance_ess(lw).cpu()}


def _codes(vae, x) -> Dict[str, torch.Tensor]:
    """:math:`E_q[z|x]` per continuous latent site, each ``(B, L_site)`` float64."""
    means = engine.guide_mean(vae, x)
    out = {name: m.reshape(x.shape[0], -1).double() for name, m in means.items() if m.is_floating_point()}
    if not out:
        raise UsageError(f"active units need a continuous latent site; the guide has {sorted(means)}")
    return out


def _activity(means: torch.Tensor, threshold: float) -> Dict[str, torch.Tensor]:
    activity = means.var(0, unbiased=True).cpu()
    active = activity > threshold
    return {"activity": activity, "active": active, "count": active.sum()}


def active_units(vae, x: torch.Tensor, threshold: float = 0.01) -> Dict[str, torch.Tensor]:
    r"""Burda et al.'s activity :math:`A_u = \operatorname{Var}_x(E_q[z_u|x])` per latent unit,
    over the datapoints ``x``; ``"active"`` is the boolean mask :math:`A_u > ` ``threshold``
    and ``"count"`` its sum. :math:`E_q[z|x]` comes from the guide program
    (:func:`pvae.engine.guide_mean`): the units of every continuous latent site, concatenated in
    the guide's order; with several sites ``"per_site"`` gives each site's (a hierarchy's
    levels) ``{"activity", "active", "count"}``."""
    with torch.no_grad():
        codes = _codes(vae, x)
    out = _activity(torch.cat(list(codes.values()), -1), threshold)
    if len(codes) > 1:
        out["per_site"] = {name: _activity(c, threshold) for name, c in codes.items()}
    return out


def kl_per_dimension(vae, x: torch.Tensor, per_site: bool = False, seed: Optional[int] = 0):
    r""":math:`\frac1N\sum_n KL(q(z_d|x_n) \| p(z_d))` per latent dimension (nats), in
    closed form per site; needs diagonal Gaussian guide and prior sites (otherwise the KL does
    not split over dimensions). With several latent sites (a hierarchy), a lower level's KL is
    :math:`KL(q(z_1|x, z_2)\|p(z_1|z_2))` at one draw of the levels above it per datapoint (a
    Monte Carlo average over those levels, drawn under ``seed``; ``None`` draws from the global
    RNG). Returns the dimensions of every site concatenated in the program's order, or with
    ``per_site`` a dict site -> ``(L_site,)``."""
    with torch.no_grad(), seeded(seed, x.device):
        pairs, reason = _diagonal_gaussians(vae, x)
        if reason is not None:
            raise UsageError(reason)
        out = {}
        for name, (qb, pb) in pairs.items():
            kl = torch.distributions.kl_divergence(qb, pb).double()
            out[name] = kl.reshape(-1, kl.shape[-1]).mean(0).cpu()
    if per_site:
        return out
    return torch.cat(list(out.values())) if len(out) > 1 else next(iter(out.values()))


def _diagonal_gaussians(vae, x):
    """Per latent site, the guide's and prior's diagonal-Gaussian distributions at ``x``, or a
    reason why the KL does not split over latent dimensions: ``({site: (q, p)}, None)`` or
    ``(None, reason)``."""
    samples = engine.log_weights(vae, x, 1, enumerate=False)  # the guide's and prior's site distributions
    if not samples.latents:
        return None, "kl_per_dimension needs a latent site; the program has none"
    out = {}
    for site in samples.latents:
        q, p = samples.guide_dists[site], samples.prior_dists[site]
        qb = q.base_dist if isinstance(q, dist.Independent) else q
        pb = p.base_dist if isinstance(p, dist.Independent) else p
        if not (isinstance(qb, dist.Normal) and isinstance(pb, dist.Normal)):
            return None, ("kl_per_dimension needs diagonal Gaussian guide and prior sites; at site "
                          f"{site!r} got {type(qb).__name__} and {type(pb).__name__}")
        out[site] = (qb, pb)
    return out, None


def to_inference_data(vae, x: torch.Tensor, num_samples: int = 100, seed: Optional[int] = 0):
    r"""Export guide samples :math:`z_k \sim q(z|x)` and their log importance weights
    :math:`\log p(x, z_k) - \log q(z_k|x)` to :class:`arviz.InferenceData`.

    One posterior variable per latent site the guide samples (its discrete sites drawn, not
    enumerated): ``posterior[site]`` has dims ``(chain=1, draw=num_samples, datapoint,
    <site>_dim_0, ...)``; ``sample_stats["log_weight"]`` has dims ``(chain, draw, datapoint)``
    (nats; sites the model alone enumerates are summed out inside it). The draws are
    independent samples from the guide (not MCMC), so use the importance weights, not the raw
    draws, for anything about the true posterior.
    """
    import arviz

    with torch.no_grad(), seeded(seed, x.device):
        check_data(vae, x)
        samples = engine.log_weights(vae, x, num_samples, enumerate=False)
        samples.require_density("to_inference_data's importance weights")
        latents = dict(samples.latents)
        log_w = samples.log_weight
    n = x.shape[0]
    posterior, dims, coords = {}, {"log_weight": ["datapoint"]}, {"datapoint": list(range(n))}
    for name, z in latents.items():
        z = z.expand(num_samples, n, *z.shape[2:])
        posterior[name] = z.double().cpu().numpy()[None] if z.is_floating_point() else z.cpu().numpy()[None]
        event = [f"{name}_dim_{i}" for i in range(z.dim() - 2)]
        if len(latents) == 1 and len(event) == 1:  # one site: the historic name of its dimension
            event = ["latent"]
        dims[name] = ["datapoint", *event]
        for d, size in zip(event, z.shape[2:]):
            coords[d] = list(range(size))
    return arviz.from_dict(
        posterior=posterior,
        sample_stats={"log_weight": log_w.double().cpu().numpy()[None]},
        coords=coords,
        dims=dims,
    )


def latent_diagnostics(vae, x: torch.Tensor, threshold: float = 0.01, batch_size: int = 1000) -> dict:
    """Active units (Burda et al.), KL per latent dimension where it splits (diagonal Gaussian
    guide and prior; else ``None``), and a posterior-collapse warning: units whose activity is
    at most ``threshold`` carry (almost) no information about x. Returns plain Python values
    (JSON-ready) and issues a :class:`UserWarning` when some units are inactive."""
    with torch.no_grad():
        parts = [_codes(vae, xb) for xb in x.split(batch_size)]
        codes = {name: torch.cat([p[name] for p in parts]) for name in parts[0]}
        means = torch.cat(list(codes.values()), -1)
        bad = ~torch.isfinite(means).all(-1)
        if bool(bad.any()):
            raise DivergenceError(
                f"the guide's mean E_q[z|x] is NaN or infinite for {rows_phrase(bad.nonzero().flatten())} "
                f"of {x.shape[0]}; the model's parameters or these inputs are "
                "broken, so no latent diagnostic can be measured"
            )
        splits = _diagonal_gaussians(vae, x[:2])[1] is None  # the KL splits over dimensions
    activity = means.var(0, unbiased=True).cpu()
    active = activity > threshold
    kl_list, kl_sites = None, None
    if splits:
        per = [kl_per_dimension(vae, xb, per_site=True) for xb in x.split(batch_size)]
        sizes = [xb.shape[0] for xb in x.split(batch_size)]
        kl_sites = {name: (sum(p[name] * m for p, m in zip(per, sizes)) / x.shape[0]) for name in per[0]}
        kl_list = torch.cat(list(kl_sites.values())).tolist()
    count, latent = int(active.sum()), int(activity.numel())
    collapse = None
    if count < latent:
        collapse = (f"posterior collapse in {latent - count} of {latent} latent units: their posterior "
                    f"mean varies over x with variance <= {threshold}")
        warnings.warn(collapse, stacklevel=2)
    out = {
        "active_units": count,
        "latent_dim": latent,
        "activity_threshold": threshold,
        "activity": activity.tolist(),
        "kl_per_dimension": kl_list,
        "kl_total": None if kl_list is None else float(sum(kl_list)),
        "posterior_collapse": collapse,
    }
    if len(codes) > 1:  # several latent sites (a hierarchy's levels): each one's share
        if kl_sites is not None:
            site_kl, how = {name: float(kl_sites[name].sum()) for name in codes}, "closed form"
        else:  # no closed form somewhere (a VampPrior on the top level): E_q[log q - log p] per site
            site_kl, how = _sampled_site_kl(vae, x, list(codes), batch_size), f"Monte Carlo, {SITE_KL_DRAWS} draws"
        out["per_site"] = {
            name: {"active_units": int((c.var(0, unbiased=True) > threshold).sum()), "latent_dim": int(c.shape[-1]),
                   "kl_total": site_kl.get(name), "kl_estimator": how}
            for name, c in codes.items()}
    return out


#: draws per datapoint of the sampled per-site KL (sites without a closed-form KL)
SITE_KL_DRAWS = 64


def _sampled_site_kl(vae, x, names, batch_size: int, seed: int = 0) -> Dict[str, float]:
    r"""Per latent site, :math:`E_x E_q[\log q(z_s|\cdot) - \log p(z_s|\cdot)]` from
    :data:`SITE_KL_DRAWS` draws per datapoint (the site's share of the sampled KL; for a lower
    level, its conditional KL averaged over the levels above)."""
    totals = {name: 0.0 for name in names}
    with torch.no_grad(), seeded(seed, x.device):
        for xb in x.split(batch_size):
            terms = engine.log_weights(vae, xb, SITE_KL_DRAWS, enumerate=False).site_terms
            for name in names:
                if name in terms:
                    log_p, log_q = terms[name]
                    totals[name] += float((log_q - log_p).double().mean(0).sum())
    return {name: total / x.shape[0] for name, total in totals.items()}


def inference_gaps(
    vae,
    x: torch.Tensor,
    num_samples: int = 1000,
    refine_steps: int = 500,
    lr: float = 1e-2,
    num_particles: int = 10,
    batch_size: int = 100,
    seed: Optional[int] = 0,
    log_marginal: Optional[torch.Tensor] = None,
    progress: bool = False,
) -> dict:
    r"""Split the inference gap :math:`\log p(x) - \mathrm{ELBO}[q_\phi]` (Cremer, Li &
    Duvenaud, 2018) per datapoint into

    * the **approximation gap** :math:`\log p(x) - \mathrm{ELBO}[q^*]`, where :math:`q^*` is the
      best distribution of the guide's family for that datapoint alone, and
    * the **amortization gap** :math:`\mathrm{ELBO}[q^*] - \mathrm{ELBO}[q_\phi]`, the price of
      predicting q from x with one encoder.

    :math:`q^*` is found by refinement: a :class:`~pvae.guides.NonAmortizedGuide` started at the
    encoder's output is optimized alone (Adam, ``refine_steps`` full-batch steps per batch of
    ``batch_size`` datapoints, ``num_particles`` reparametrized samples and the KL in closed
    form where Pyro knows it (:class:`pyro.infer.TraceMeanField_ELBO`), learning rate decaying
    linearly from ``lr`` to ``lr/100``); the decoder and prior are held fixed and their
    ``.grad`` left untouched. The family is the diagonal Gaussian, so the guide must be one.
    ``log_marginal`` (per datapoint, e.g. AIS values) is used if given; otherwise
    :math:`\log p(x)` is estimated by :math:`\mathcal{L}_K` with :math:`q^*` as proposal (a
    better proposal than the encoder's, hence a tighter bound). Both ELBOs are estimated from
    ``num_samples`` draws.

    :returns: ``{"elbo_amortized": Estimate, "elbo_refined": Estimate, "log_marginal": Estimate
        or the given tensor, "approximation_gap": (N,), "amortization_gap": (N,),
        "settings": dict}`` (nats per datapoint). Parameters, gradients and the train/eval
        mode of ``vae`` (and of its parts) are left as they were, and so is the global RNG unless
        ``seed`` is None (then the draws come from it).
    """
    from pvae.inference.estimators import Estimate, _check_positive_int, evaluate_bounds
    from pvae.parts.guides import DiagonalGaussianGuide, NonAmortizedGuide
    from pvae.model import VAE
    from pvae.training.objectives import make_objective

    if not isinstance(vae.guide_net, DiagonalGaussianGuide):
        raise UsageError(
            "inference_gaps refines within the diagonal Gaussian family, so it needs a "
            f"DiagonalGaussianGuide; this VAE has {type(vae.guide_net).__name__}"
        )
    for name, value in (("refine_steps", refine_steps), ("num_particles", num_particles),
                        ("batch_size", batch_size)):
        _check_positive_int(name, value)
    vae.check_data(x)
    if log_marginal is not None and log_marginal.shape != x.shape[:1]:
        raise UsageError(f"log_marginal must have shape ({x.shape[0]},), got {tuple(log_marginal.shape)}")
    amortized = evaluate_bounds(vae, x, num_samples, seed=seed)
    objective = make_objective("elbo-analytic-kl", num_particles)  # Monte Carlo KL where none is known
    modes = {module: module.training for module in vae.modules()}
    vae.eval()
    bar = None
    if progress:
        from pvae._progress import progress_bar_class

        tqdm = progress_bar_class()

        bar = tqdm(total=refine_steps * math.ceil(x.shape[0] / batch_size), desc="refine q*", leave=False)
    locs, pre_scales = [], []
    try:
        with seeded(seed, x.device):
            for xb in x.split(batch_size):
                local = NonAmortizedGuide.from_guide(vae.guide_net, xb)
                refined = VAE(vae.prior, vae.decoder, vae.likelihood, local)
                index = torch.arange(xb.shape[0], device=x.device)
                params = list(local.parameters())
                opt = torch.optim.Adam(params, lr=lr)
                sched = torch.optim.lr_scheduler.LambdaLR(
                    opt, lambda t: 1.0 - 0.99 * t / max(refine_steps - 1, 1))
                for _ in range(refine_steps):
                    loss = objective.surrogate_loss(refined, xb, index)
                    grads = torch.autograd.grad(loss, params)
                    for p, g in zip(params, grads):
                        p.grad = g
                    opt.step()
                    sched.step()
                    if bar is not None:
                        bar.update(1)
                locs.append(local.loc.detach())
                pre_scales.append(local.pre_scale.detach())
    finally:
        if bar is not None:
            bar.close()
        for module, mode in modes.items():
            module.training = mode
    local = NonAmortizedGuide(vae.data_dim, vae.latent_dim, x.shape[0]).to(x.device, x.dtype)
    with torch.no_grad():
        local.loc.copy_(torch.cat(locs))
        local.pre_scale.copy_(torch.cat(pre_scales))
    refined = VAE(vae.prior, vae.decoder, vae.likelihood, local)
    best = evaluate_bounds(refined, x, num_samples, seed=None if seed is None else seed + 1,
                           index=torch.arange(x.shape[0], device=x.device))
    if log_marginal is None:
        log_px = best["iwae"]
    else:
        log_px = log_marginal.detach().double().cpu()
    log_px_values = log_px.values if isinstance(log_px, Estimate) else log_px
    return {
        "elbo_amortized": amortized["elbo"],
        "elbo_refined": best["elbo"],
        "log_marginal": log_px,
        "approximation_gap": log_px_values - best["elbo"].values,
        "amortization_gap": best["elbo"].values - amortized["elbo"].values,
        "refined_guide": local,
        "settings": {"num_samples": int(num_samples), "refine_steps": int(refine_steps), "lr": float(lr),
                     "num_particles": int(num_particles), "batch_size": int(batch_size),
                     "log_marginal": "given" if log_marginal is not None else f"L_{num_samples} under q*"},
    }
