"""A hand-written PyTorch VAE: the baseline that pvae's speed and accuracy are measured against.

Same architecture and loss as pvae's standard model: a softplus MLP encoder D-H1-H2-2L giving
the mean and ``softplus(.) + 1e-4`` scale of a diagonal Gaussian, a mirrored decoder giving
Bernoulli logits, a standard normal prior, and the single-sample reparametrized ELBO with a
Monte Carlo KL term (what ``pyro.infer.Trace_ELBO`` computes). No Pyro anywhere.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

LOG_2PI = math.log(2 * math.pi)


def _mlp(widths):
    layers = []
    for w_in, w_out in zip(widths[:-2], widths[1:-1]):
        layers += [nn.Linear(w_in, w_out), nn.Softplus()]
    layers.append(nn.Linear(widths[-2], widths[-1]))
    return nn.Sequential(*layers)


class HandwrittenVAE(nn.Module):
    def __init__(self, data_dim=784, latent_dim=50, hidden=(500, 500)):
        super().__init__()
        self.latent_dim = latent_dim
        self.encoder = _mlp((data_dim, *hidden, 2 * latent_dim))
        self.decoder = _mlp((latent_dim, *hidden[::-1], data_dim))

    def encode(self, x):
        loc, pre = self.encoder(x).split(self.latent_dim, -1)
        return loc, F.softplus(pre) + 1e-4

    def log_weights(self, x, num_samples=None, encoded=None):
        """log p(x, z) - log q(z|x) for z ~ q; shape (B,) or (K, B) when num_samples is set.
        ``encoded``: the ``(loc, scale)`` of ``encode(x)``, to encode once for many samples."""
        loc, scale = self.encode(x) if encoded is None else encoded
        shape = loc.shape if num_samples is None else (num_samples, *loc.shape)
        eps = torch.randn(shape, dtype=loc.dtype, device=loc.device)
        z = loc + scale * eps
        log_q = (-0.5 * eps.pow(2) - scale.log() - 0.5 * LOG_2PI).sum(-1)
        log_pz = (-0.5 * z.pow(2) - 0.5 * LOG_2PI).sum(-1)
        logits = self.decoder(z)
        log_px = -F.binary_cross_entropy_with_logits(
            logits, x.expand_as(logits), reduction="none"
        ).sum(-1)
        return log_px + log_pz - log_q

    def loss(self, x):
        """Minus the single-sample ELBO, averaged over the batch (nats per datapoint)."""
        return -self.log_weights(x).mean()

    @torch.no_grad()
    def bounds(self, x, num_samples, batch_size=100, chunk_size=100):
        """Per-datapoint ELBO (mean of the K log-weights) and L_K (log-mean-exp)."""
        elbos, iwaes = [], []
        for xb in x.split(batch_size):
            encoded = self.encode(xb)  # once per batch, as pvae does
            chunks = []
            done = 0
            while done < num_samples:
                k = min(chunk_size, num_samples - done)
                chunks.append(self.log_weights(xb, k, encoded))
                done += k
            lw = torch.cat(chunks).double()
            elbos.append(lw.mean(0))
            iwaes.append(torch.logsumexp(lw, 0) - math.log(num_samples))
        return torch.cat(elbos), torch.cat(iwaes)


class PyTorchExampleVAE(nn.Module):
    """The VAE a PyTorch user writes (after pytorch/examples' ``vae/main.py``): the encoder gives
    ``mu`` and ``logvar``, ``z = mu + exp(logvar / 2) * eps``, the loss is the summed binary
    cross-entropy plus the closed-form KL. Same widths and activation as pvae's model, so the
    comparison prices pvae's choices (Pyro distributions, Monte Carlo KL by default, softplus
    scale), not a different network."""

    def __init__(self, data_dim=784, latent_dim=50, hidden=(500, 500)):
        super().__init__()
        self.latent_dim = latent_dim
        self.encoder = _mlp((data_dim, *hidden, 2 * latent_dim))
        self.decoder = _mlp((latent_dim, *hidden[::-1], data_dim))

    def loss(self, x):
        """Minus the ELBO (closed-form KL), averaged over the batch (nats per datapoint)."""
        mu, logvar = self.encoder(x).split(self.latent_dim, -1)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        bce = F.binary_cross_entropy_with_logits(self.decoder(z), x, reduction="sum")
        kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
        return (bce + kld) / x.shape[0]
