"""Matplotlib figures for notebooks and run directories.

Functions return :class:`matplotlib.figure.Figure` objects built without pyplot, so they work
with any backend (or none) and never open windows; save with ``fig.savefig(path)`` or show in
Jupyter with ``display(fig)``.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import matplotlib
from matplotlib.figure import Figure

__all__ = [
    "elbo_curves", "reconstructions", "samples", "latent_scatter", "image_grid", "bounds_versus_k",
    "estimator_comparison", "khat_histogram", "evaluation_figure",
]


def elbo_curves(records: Sequence[dict]) -> Figure:
    """Training objective and the validation metric (ELBO, or the reconstruction
    log-likelihood for a point-mass guide) per epoch (nats per datapoint)."""
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.add_subplot()
    epochs = [r["epoch"] for r in records]
    if records:
        name = records[0].get("objective", "objective")
        ax.plot(epochs, [r["train_objective"] for r in records], label=f"train {name} (running)")
    metric = records[0].get("val_metric", "val_elbo") if records else None
    val = [(r["epoch"], r[metric], r.get(f"{metric}_stderr") or 0.0) for r in records
           if r.get(metric) is not None]
    if val:
        e, v, s = (torch.tensor(c, dtype=torch.float64) for c in zip(*val))
        label = {"val_elbo": "validation ELBO", "val_iwae": "validation L_K", "val_reconstruction": "validation log p(x|code)"}.get(metric, metric)
        (line,) = ax.plot(e, v, label=f"{label} (± s.e.)")
        ax.fill_between(e, v - s, v + s, alpha=0.3, color=line.get_color())
    ax.set_xlabel("epoch")
    ax.set_ylabel("nats per datapoint")
    ax.set_title("training curves")
    ax.legend()
    return fig


def image_grid(
    images: torch.Tensor,
    image_shape: Tuple[int, int],
    ncols: int = 10,
    title: Optional[str] = None,
    row_labels: Optional[Sequence[str]] = None,
) -> Figure:
    """Show ``images`` (``(N, H*W)``, values in [0, 1]) in a grid of ``ncols`` columns."""
    images = images.detach().cpu().reshape(-1, *image_shape)
    n = images.shape[0]
    nrows = max(1, math.ceil(n / ncols))
    fig = Figure(figsize=(ncols * 0.8, nrows * 0.8 + (0.4 if title else 0)), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if i < n:
            ax.imshow(images[i].numpy(), cmap="gray", vmin=0, vmax=1)
        else:
            ax.axis("off")
    if row_labels:
        for r, label in enumerate(row_labels[:nrows]):
            axes[r, 0].set_ylabel(label, fontsize=8)
    if title:
        fig.suptitle(title)
    return fig


def reconstructions(vae, x: torch.Tensor, image_shape: Tuple[int, int], n: int = 10) -> Figure:
    """Originals (top row) above their reconstructions E[x | z = E_q[z|x]] (bottom row)."""
    x = x[:n]
    recon = vae.reconstruct(x)
    return image_grid(
        torch.cat([x, recon]), image_shape, ncols=x.shape[0], title="data / reconstruction",
        row_labels=["data", "reconstruction"],
    )


def samples(vae, image_shape: Tuple[int, int], n: int = 50, seed: int = 0) -> Figure:
    """Means E[x|z] of the likelihood at ``n`` draws z ~ p(z) (seeded)."""
    return image_grid(vae.sample(n, seed=seed), image_shape, ncols=10, title="samples E[x|z], z ~ p(z)")


#: up to this many classes, labels are drawn as categories with a legend (more: a colour bar)
MAX_LEGEND_CLASSES = 20


def latent_scatter(
    z: torch.Tensor, labels: Optional[torch.Tensor] = None, title: str = "latent means E_q[z|x]",
    label_names: Optional[Sequence[str]] = None,
) -> Figure:
    """Scatter of 2-D latent codes, coloured by label; higher-dimensional codes are projected
    on their first two principal components (the axis labels say which); a 1-D code is drawn
    against the datapoint's position. Up to :data:`MAX_LEGEND_CLASSES` classes are categories with
    a legend (``label_names``, or the label values); more get a colour bar."""
    z = z.detach().cpu().double()
    if z.shape[-1] == 1:
        xy, axis = torch.stack([z[:, 0], torch.arange(z.shape[0], dtype=z.dtype)], 1), ("z1", "datapoint")
    elif z.shape[-1] == 2:
        xy, axis = z, ("z1", "z2")
    else:
        centred = z - z.mean(0)
        _, _, v = torch.linalg.svd(centred, full_matrices=False)
        xy, axis = centred @ v[:2].T, ("PC 1 of z", "PC 2 of z")
    fig = Figure(figsize=(5, 4.5), layout="constrained")
    ax = fig.add_subplot()
    kwargs = {"s": 6, "alpha": 0.7}
    values = labels.cpu().numpy() if labels is not None else None
    classes = sorted(set(values.tolist())) if values is not None else []
    if values is not None and len(classes) <= MAX_LEGEND_CLASSES:
        palette = matplotlib.colormaps["tab10" if len(classes) <= 10 else "tab20"]
        for i, value in enumerate(classes):
            chosen = torch.from_numpy(values == value)
            name = label_names[value] if label_names is not None and 0 <= value < len(label_names) else str(value)
            ax.scatter(xy[chosen, 0], xy[chosen, 1], color=palette(i), label=name, **kwargs)
        ax.legend(title="label", markerscale=2, fontsize="small", loc="best")
    elif values is not None:
        sc = ax.scatter(xy[:, 0], xy[:, 1], c=values, cmap="viridis", **kwargs)
        fig.colorbar(sc, ax=ax, label="label")
    else:
        ax.scatter(xy[:, 0], xy[:, 1], **kwargs)
    ax.set_xlabel(axis[0])
    ax.set_ylabel(axis[1])
    ax.set_title(title)
    return fig


def _mean_and_stderr(estimate, which: str = "stderr") -> Tuple[float, float]:
    """(mean, error) from an :class:`~pvae.estimators.Estimate` or its ``to_dict()``."""
    if isinstance(estimate, dict):
        return float(estimate["mean"]), float(estimate[which])
    return estimate.mean, float(getattr(estimate, which))


def bounds_versus_k(
    bounds_by_k: dict, references: Optional[dict] = None, ax=None, title: str = "importance-weighted bounds",
    elbo_label: str = "ELBO (mean of K log-weights)",
) -> Figure:
    """:math:`\\mathcal{L}_K` and the ELBO against K (log axis), from
    :func:`pvae.estimators.bounds_by_k` (``{K: {"elbo": Estimate, "iwae": Estimate}}``).

    Error bars are the *Monte Carlo* standard errors of the means (the same datapoints are used
    for every K, so the spread between datapoints is common to all points and left out).
    ``references``: name -> value, Estimate or dict, drawn as horizontal lines (e.g. AIS, or
    the exact log p(x)). ``elbo_label`` names the ELBO series."""
    fig = ax.figure if ax is not None else Figure(figsize=(6, 4), layout="constrained")
    ax = ax if ax is not None else fig.add_subplot()
    ks = sorted(bounds_by_k)
    for name, label in (("iwae", "$\\mathcal{L}_K$"), ("elbo", elbo_label)):
        points = [_mean_and_stderr(bounds_by_k[k][name], "mc_stderr_of_mean") for k in ks]
        ax.errorbar(ks, [m for m, _ in points], yerr=[s for _, s in points], marker="o", capsize=3, label=label)
    for i, (name, ref) in enumerate((references or {}).items()):
        value, err = (float(ref), 0.0) if isinstance(ref, (int, float)) else _mean_and_stderr(ref, "mc_stderr_of_mean")
        line = ax.axhline(value, linestyle="--", color=f"C{i + 2}", label=name)
        if err > 0:
            ax.axhspan(value - err, value + err, color=line.get_color(), alpha=0.2)
    ax.set_xscale("log")
    ax.set_xlabel("K (importance samples per datapoint)")
    ax.set_ylabel("nats per datapoint")
    ax.set_title(title)
    ax.legend()
    return fig


ESTIMATOR_LABELS = {"elbo": "ELBO", "iwae": "L_K (IWAE)", "ais": "AIS", "naive": "naive prior MC",
                    "reverse-ais": "reverse AIS (upper)"}


def estimator_comparison(models: dict, ax=None, title: str = "estimates of log p(x)") -> Figure:
    """For each model (``{model name: {estimator name: Estimate or dict}}``) the estimates side
    by side with their standard errors over datapoints, in nats per datapoint — e.g. ELBO vs
    :math:`\\mathcal{L}_K` vs AIS vs the naive prior estimate. The legend gives each
    estimator's sample count."""
    fig = ax.figure if ax is not None else Figure(figsize=(6, 1.2 + 0.9 * max(len(models), 1)), layout="constrained")
    ax = ax if ax is not None else fig.add_subplot()
    names = []
    for per_model in models.values():
        names += [n for n in per_model if n not in names]
    for j, name in enumerate(names):
        for i, per_model in enumerate(models.values()):
            if name not in per_model:
                continue
            est = per_model[name]
            mean, se = _mean_and_stderr(est)
            n = est["num_samples"] if isinstance(est, dict) else est.num_samples
            count = "chains" if name in ("ais", "reverse-ais") else "K"
            ax.errorbar(mean, i + 0.12 * (j - (len(names) - 1) / 2), xerr=se, fmt="o", capsize=3, color=f"C{j}",
                        label=f"{ESTIMATOR_LABELS.get(name, name)} ({count}={n})" if i == 0 else None)
    ax.set_yticks(range(len(models)), list(models))
    ax.set_xlabel("nats per datapoint (± s.e. over datapoints)")
    ax.set_title(title)
    ax.legend(fontsize="small")
    return fig


def khat_histogram(khat: torch.Tensor, ax=None, title: str = "PSIS $\\hat k$ of q(z|x) as proposal") -> Figure:
    """Histogram of per-datapoint PSIS :math:`\\hat k` with the thresholds 0.5 and 0.7 (Vehtari
    et al.: above 0.7 importance sampling with this proposal is unreliable)."""
    fig = ax.figure if ax is not None else Figure(figsize=(6, 4), layout="constrained")
    ax = ax if ax is not None else fig.add_subplot()
    khat = torch.as_tensor(khat, dtype=torch.float64)
    finite = khat[torch.isfinite(khat)]
    ax.hist(finite.numpy(), bins=30)
    for threshold, style in ((0.5, ":"), (0.7, "--")):
        ax.axvline(threshold, color="k", linestyle=style, label=f"k = {threshold}")
    above = float((khat > 0.7).double().mean()) if khat.numel() else float("nan")
    ax.set_xlabel("$\\hat k$")
    ax.set_ylabel("datapoints")
    dropped = f" ({khat.numel() - finite.numel()} non-finite not shown)" if finite.numel() < khat.numel() else ""
    ax.set_title(f"{title}\n{above:.1%} of {khat.numel()} datapoints above 0.7{dropped}")
    ax.legend()
    return fig


def evaluation_figure(estimates: dict, khat: Optional[torch.Tensor] = None, title: str = "") -> Figure:
    """The figure ``pvae evaluate`` writes: the estimates of log p(x) with their standard
    errors and, when given, the histogram of PSIS :math:`\\hat k`."""
    fig = Figure(figsize=(12 if khat is not None else 6, 4), layout="constrained")
    axes = fig.subplots(1, 2 if khat is not None else 1, squeeze=False)[0]
    estimator_comparison({title or "model": estimates}, ax=axes[0])
    if khat is not None:
        khat_histogram(khat, ax=axes[1])
    return fig
