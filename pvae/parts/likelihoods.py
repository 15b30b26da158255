"""Likelihoods p(x|z).

A likelihood maps the decoder's output ``params`` of shape ``(..., param_dim)`` to a
normalised :mod:`pyro.distributions` distribution over the data dimensions, with
``event_shape == (data_dim,)``. It also checks that data lie in its support
(:meth:`Likelihood.check_data`), so that e.g. grey levels under a Bernoulli likelihood are a
clear error instead of a silently wrong log-density.
"""

from __future__ import annotations

import math
from typing import Literal, Optional

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions.utils import broadcast_all

from pvae.errors import UsageError
from pvae.registry import Registry

__all__ = [
    "LIKELIHOODS", "Likelihood", "BernoulliLikelihood", "GaussianLikelihood",
    "ContinuousBernoulliLikelihood", "PoissonLikelihood", "DiscretizedLogisticLikelihood",
    "DiscretizedLogistic", "IndependentBernoulli",
]

LIKELIHOODS: Registry = Registry("likelihood", context=("data_dim",), doc="""
Likelihoods p(x|z) by name (``"bernoulli"``, ``"gaussian"``, ``"continuous-bernoulli"``,
``"poisson"``, ``"discretized-logistic"``); ``LIKELIHOODS.options(name)`` lists one's options, and
a config's ``likelihood`` section names one (:func:`pvae.build_vae` builds it).""")


class Likelihood(nn.Module):
    """Base class. Subclasses set :attr:`params_per_dim` and implement ``forward``/``mean``."""

    #: decoder outputs per data dimension
    params_per_dim: int = 1

    def __init__(self, data_dim: int):
        super().__init__()
        self.data_dim = int(data_dim)


    @property
    def param_dim(self) -> int:
        """Number of decoder outputs this likelihood consumes."""
        return self.params_per_dim * self.data_dim

    def check_data(self, x: torch.Tensor) -> None:
        """Raise :class:`ValueError` if ``x`` is outside the support. Default: any real."""

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        """E[x | z] for decoder output ``params``; shape ``(..., data_dim)``."""
        raise NotImplementedError


class IndependentBernoulli(dist.Independent):
    """``Bernoulli(logits).to_event(1)`` whose ``log_prob`` negates after summing over the
    event dimension (torch's Bernoulli negates the full ``(..., D)`` tensor first: one extra
    pass over the largest tensor of a VAE's evaluation, about 6% of an IWAE evaluation on a
    CPU). Same values, same gradients (tested against Pyro's ``Bernoulli``)."""

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        logits, value = broadcast_all(self.base_dist.logits, value)
        return -F.binary_cross_entropy_with_logits(logits, value, reduction="none").sum(-1)


@LIKELIHOODS.register("bernoulli")
class BernoulliLikelihood(Likelihood):
    r"""Independent Bernoulli pixels with logits from the decoder:
    :math:`\log p(x|z) = \sum_d x_d \ell_d - \operatorname{softplus}(\ell_d)` (nats).

    Data must be binary (0 or 1); grey levels are rejected with a message naming the fix.
    """

    def forward(self, params: torch.Tensor) -> dist.Distribution:
        return IndependentBernoulli(dist.Bernoulli(logits=params), 1)

    def check_data(self, x: torch.Tensor) -> None:
        if not bool(((x == 0) | (x == 1)).all()):
            bad = x[(x != 0) & (x != 1)].flatten()[:3].tolist()
            low, high = float(x.min()), float(x.max())
            if low < 0 or high > 1:  # not grey levels: binarizing would be the wrong fix
                raise UsageError(
                    "the Bernoulli likelihood needs binary data (every value 0 or 1), but the data range over "
                    f"[{low:g}, {high:g}] (e.g. {bad}): they are not probabilities or grey levels, so choose a "
                    "likelihood for real values: 'gaussian' (--likelihood gaussian; tables are standardized "
                    "by default), or 'poisson' for counts"
                )
            raise UsageError(
                "the Bernoulli likelihood needs binary data (every value 0 or 1), but the data "
                f"contain grey levels in [0, 1] (e.g. {bad}); binarize them (--binarize threshold, static or "
                "dynamic), or choose a likelihood for them: 'continuous-bernoulli' or 'discretized-logistic' "
                "(8-bit grey levels)"
            )

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(params)


@LIKELIHOODS.register("gaussian")
class GaussianLikelihood(Likelihood):
    r"""Independent Gaussian dimensions :math:`x_d \sim \mathcal{N}(\mu_d(z), \sigma_d^2)` with
    the mean from the decoder.

    :param int data_dim: number of data dimensions.
    :param float scale: the standard deviation sigma (its initial value when learned).
    :param str scale_mode: fixed (sigma as given), global (one learned sigma) or per-dim (a
        learned sigma per data dimension, e.g. per pixel); learned scales are parametrised by
        their logs.
    """

    SCALE_MODES = ("fixed", "global", "per-dim")

    def __init__(self, data_dim: int, scale: float = 1.0,
                 scale_mode: Literal["fixed", "global", "per-dim"] = "fixed"):
        super().__init__(data_dim)
        if not scale > 0 or not math.isfinite(scale):
            raise UsageError(f"Gaussian likelihood scale must be positive and finite, got {scale}")
        mode = scale_mode
        if mode not in self.SCALE_MODES:
            raise UsageError(f"unknown scale_mode {mode!r}; valid choices: {', '.join(self.SCALE_MODES)}")
        self.scale_mode = mode
        log_scale = torch.full((self.data_dim,) if mode == "per-dim" else (), math.log(scale))
        if mode == "fixed":
            self.register_buffer("log_scale", log_scale)
        else:
            self.log_scale = nn.Parameter(log_scale)

    @property
    def learn_scale(self) -> bool:
        return self.scale_mode != "fixed"


    @property
    def scale(self) -> torch.Tensor:
        return self.log_scale.exp()

    def forward(self, params: torch.Tensor) -> dist.Distribution:
        return dist.Normal(params, self.scale.expand_as(params)).to_event(1)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        return params


def _check_unit_interval(x: torch.Tensor, name: str) -> None:
    if not bool(((x >= 0) & (x <= 1)).all()):
        raise UsageError(
            f"the {name} likelihood needs data in [0, 1], but the data range over "
            f"[{float(x.min())}, {float(x.max())}]; rescale the data or choose 'gaussian'"
        )


@LIKELIHOODS.register("continuous-bernoulli")
class ContinuousBernoulliLikelihood(Likelihood):
    r"""Continuous Bernoulli (Loaiza-Ganem & Cunningham, 2019) for grey levels in [0, 1]:
    :math:`p(x|\lambda) = C(\lambda)\,\lambda^x (1-\lambda)^{1-x}`, with the normalizing
    constant :math:`C(\lambda)` included, so unlike the Bernoulli log-likelihood applied to
    grey levels it is a proper density. Logits from the decoder."""

    def forward(self, params: torch.Tensor) -> dist.Distribution:
        return dist.ContinuousBernoulli(logits=params).to_event(1)

    def check_data(self, x: torch.Tensor) -> None:
        _check_unit_interval(x, "continuous Bernoulli")

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        return dist.ContinuousBernoulli(logits=params).mean


@LIKELIHOODS.register("poisson")
class PoissonLikelihood(Likelihood):
    r"""Independent Poisson counts with log-rates from the decoder:
    :math:`\log p(x|z) = \sum_d x_d \eta_d - e^{\eta_d} - \log x_d!` (nats). For count data
    and 8-bit pixel values stored as integers 0…255. Data must be non-negative integers."""

    def forward(self, params: torch.Tensor) -> dist.Distribution:
        return dist.Poisson(params.clamp(max=20.0).exp()).to_event(1)

    def check_data(self, x: torch.Tensor) -> None:
        if not bool(((x >= 0) & (x == x.round())).all()):
            raise UsageError(
                "the Poisson likelihood needs counts (non-negative integers), but the data "
                "contain negative or fractional values; use 'gaussian' or "
                "'continuous-bernoulli' for real values"
            )

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        return params.clamp(max=20.0).exp()


class DiscretizedLogistic(dist.TorchDistribution):
    r"""A logistic distribution discretized to ``levels`` equally spaced values in [0, 1] (8-bit
    pixel values ``k / 255``), as in PixelCNN++ and IAF (Kingma et al. 2016): the mass of the bin
    :math:`[x - h, x + h]` with :math:`h = 1 / (2(\text{levels} - 1))`, the edge bins taking the
    tails. Its log-probabilities are log-masses, so ``-log p / (D log 2)`` is bits/dim."""

    arg_constraints = {"loc": dist.constraints.real, "log_scale": dist.constraints.real}
    support = dist.constraints.unit_interval
    has_rsample = False

    def __init__(self, loc, log_scale, levels: int = 256, validate_args=None):
        self.loc, self.log_scale = broadcast_all(loc, log_scale)
        self.levels = int(levels)
        super().__init__(self.loc.shape, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(DiscretizedLogistic, _instance)
        batch_shape = torch.Size(batch_shape)
        new.loc, new.log_scale = self.loc.expand(batch_shape), self.log_scale.expand(batch_shape)
        new.levels = self.levels
        super(DiscretizedLogistic, new).__init__(batch_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    @property
    def mean(self):
        return self.loc.clamp(0.0, 1.0)

    def log_prob(self, value):
        if self._validate_args:
            self._validate_sample(value)
        half = 0.5 / (self.levels - 1)
        centered = value - self.loc
        inv_scale = torch.exp(-self.log_scale)
        plus, minus = inv_scale * (centered + half), inv_scale * (centered - half)
        log_cdf_plus = plus - F.softplus(plus)  # log sigmoid(plus): the lowest bin's mass
        log_sf_minus = -F.softplus(minus)  # log(1 - sigmoid(minus)): the highest bin's mass
        # an inner bin: sigmoid(a) - sigmoid(b) = sigmoid(a) sigmoid(-b) (1 - exp(b - a)), exact in
        # the log domain however sharp the logistic (no density-times-width fallback needed)
        inner = log_cdf_plus + log_sf_minus + torch.log(-torch.expm1(minus - plus))
        return torch.where(value < half, log_cdf_plus, torch.where(value > 1 - half, log_sf_minus, inner))

    def sample(self, sample_shape=torch.Size()):
        shape = self._extended_shape(sample_shape)
        with torch.no_grad():
            u = torch.rand(shape, dtype=self.loc.dtype, device=self.loc.device).clamp(1e-6, 1 - 1e-6)
            y = self.loc.expand(shape) + self.log_scale.exp().expand(shape) * (torch.log(u) - torch.log1p(-u))
            return torch.round(y.clamp(0.0, 1.0) * (self.levels - 1)) / (self.levels - 1)


@LIKELIHOODS.register("discretized-logistic")
class DiscretizedLogisticLikelihood(Likelihood):
    r"""For 8-bit images scaled to [0, 1] (CIFAR-10, Frey Faces): per pixel a logistic with location
    and log-scale from the decoder, discretized to the ``2**bits`` levels (:class:`DiscretizedLogistic`).
    Its log-likelihood is a log-probability of the 8-bit image, so the negative bound over
    ``D log 2`` is the bits/dim of the literature. Log-scales are clamped to [-7, 5].

    :param int data_dim: number of data dimensions.
    :param int bits: bits per value (data are multiples of 1 / (2**bits - 1) in [0, 1]).
    """

    params_per_dim = 2

    def __init__(self, data_dim: int, bits: int = 8):
        super().__init__(data_dim)
        if isinstance(bits, bool) or int(bits) != bits or not 1 <= bits <= 16:
            raise UsageError(f"bits must be an integer from 1 to 16, got {bits!r}")
        self.levels = 2 ** int(bits)

    def forward(self, params: torch.Tensor) -> dist.Distribution:
        # log-scales in [-7, 5]: beyond 5 (a scale of ~150 on [0, 1]) the bins' masses underflow
        loc, log_scale = params[..., : self.data_dim], params[..., self.data_dim:].clamp(-7.0, 5.0)
        return dist.Independent(DiscretizedLogistic(loc, log_scale, self.levels), 1)

    def check_data(self, x: torch.Tensor) -> None:
        _check_unit_interval(x, "discretized logistic")
        grid = x * (self.levels - 1)
        if not bool(((grid - grid.round()).abs() < 1e-3).all()):
            bad = x[(grid - grid.round()).abs() >= 1e-3].flatten()[:3].tolist()
            raise UsageError(
                f"the discretized logistic likelihood needs values on the grid k / {self.levels - 1} "
                f"(8-bit images divided by 255), but the data contain others (e.g. {bad}); quantize the data "
                "or choose 'gaussian' or 'continuous-bernoulli' for continuous values")

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        return params[..., : self.data_dim].clamp(0.0, 1.0)
