"""Matplotlib figures for notebooks and run directories.

Functions return :class:`matplotlib.figure.Figure` objects built without pyplot, so they work
with any backend (or none) and never open windows; save with ``fig.savefig(path)`` or show in
Jupyter with ``display(fig)``.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
from matplotlib.figure import Figure


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
        label = {"val_elbo": "validation ELBO", "val_reconstruction": "validation log p(x|code)"}.get(metric, metric)
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


def latent_scatter(
    z: torch.Tensor, labels: Optional[torch.Tensor] = None, title: str = "latent means E_q[z|x]"
) -> Figure:
    """Scatter of 2-D latent codes, coloured by label; higher-dimensional codes are projected
    on their first two principal components (the axis labels say which)."""
    z = z.detach().cpu().double()
    if z.shape[-1] == 2:
        xy, axis = z, ("z1", "z2")
    else:
        centred = z - z.mean(0)
        _, _, v = torch.linalg.svd(centred, full_matrices=False)
        xy, axis = centred @ v[:2].T, ("PC 1 of z", "PC 2 of z")
    fig = Figure(figsize=(5, 4.5), layout="constrained")
    ax = fig.add_subplot()
    kwargs = {"s": 6, "alpha": 0.7}
    if labels is not None:
        sc = ax.scatter(xy[:, 0], xy[:, 1], c=labels.cpu().numpy(), cmap="tab10", **kwargs)
        fig.colorbar(sc, ax=ax, label="label")
    else:
        ax.scatter(xy[:, 0], xy[:, 1], **kwargs)
    ax.set_xlabel(axis[0])
    ax.set_ylabel(axis[1])
    ax.set_title(title)
    return fig
