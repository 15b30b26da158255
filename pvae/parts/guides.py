r"""Guides q(z|x).

A guide is an :class:`torch.nn.Module` whose ``forward(x)`` returns a
:mod:`pyro.distributions` distribution over ``z`` with ``batch_shape == x.shape[:-1]`` and
``event_shape == (latent_dim,)``; sampling must be reparametrized (``has_rsample``) so that
Pyro's ELBOs use the pathwise gradient, e.g. :math:`z = \mu + \sigma \odot \epsilon`,
:math:`\epsilon \sim \mathcal{N}(0, I)` (Kingma & Welling, 2013).

Amortized guides read ``x`` through an *encoder* network that outputs
:meth:`Guide.encoder_outputs` numbers per datapoint (an :class:`~pvae.nets.MLP` by default,
or any module such as :class:`~pvae.nets.ConvEncoder`); the guide turns them into the
parameters of its distribution. ``base(x)`` is the Gaussian the guide starts from (the guide
itself for Gaussian guides, the base of the flow for flow guides); the VampPrior mixes it.
"""

from __future__ import annotations

from typing import Optional, Sequence

import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
import torch.nn.functional as F
from torch import nn

from pvae.inference.engine import _check_positive_int
from pvae.errors import UsageError
from pvae.parts.nets import MLP
from pvae.registry import Registry

__all__ = [
    "GUIDES", "Guide", "DiagonalGaussianGuide", "FullRankGaussianGuide", "FlowGuide", "IAFGuide",
    "PlanarGuide", "SylvesterGuide", "DeltaGuide", "NonAmortizedGuide",
]

GUIDES: Registry = Registry("guide", context=("data_dim", "latent_dim", "hidden", "activation", "encoder"), doc="""
Guides q(z|x) by name (``"diagonal"``, ``"full-rank"``, ``"iaf"``, ``"planar"``, ``"sylvester"``,
``"delta"``); ``GUIDES.options(name)`` lists a guide's options, and a config's ``guide`` section
names one (:func:`pvae.build_vae` builds it).""")


class Guide(nn.Module):
    """Base class: ``forward(x) -> Distribution``, ``mean(x)``, ``base(x)``.

    :param int data_dim: size of x.
    :param int latent_dim: size of z.
    :param hidden: hidden widths of the default MLP encoder.
    :param str activation: activation of the default MLP encoder.
    :param encoder: a module mapping ``(..., data_dim)`` to ``(..., encoder_outputs)``, or a
        callable that builds one given that number of outputs; replaces the default MLP
        (e.g. ``lambda n: ConvEncoder(image_shape, n)``).
    """

    #: whether q(z|x) has a density (False for a point mass)
    has_density: bool = True
    #: whether q(z|x) can be evaluated at any z (False: only at the guide's own samples, through
    #: the transforms' caches, as for flows without an analytic inverse); AIS from the guide needs it
    scores_any_point: bool = True
    #: whether the guide is indexed by datapoint (non-amortized) instead of reading x
    needs_index: bool = False

    def __init__(
        self,
        data_dim: int,
        latent_dim: int,
        hidden: Sequence[int] = (500, 500),
        activation: str = "softplus",
        encoder: Optional[nn.Module] = None,
    ):
        super().__init__()
        self.data_dim = int(data_dim)
        self.latent_dim = int(latent_dim)
        n_out = self.encoder_outputs(self.latent_dim)
        if encoder is None:
            encoder = MLP(self.data_dim, n_out, hidden, activation)
        elif not isinstance(encoder, nn.Module):  # a factory: out_features -> module
            encoder = encoder(n_out)
        if getattr(encoder, "out_features", n_out) != n_out:
            raise UsageError(
                f"{type(self).__name__} needs an encoder with {n_out} outputs, "
                f"got {encoder.out_features}"
            )
        self.encoder = encoder

    @classmethod
    def encoder_outputs(cls, latent_dim: int) -> int:
        """How many numbers per datapoint the encoder must produce."""
        return 2 * latent_dim


    def base(self, x: torch.Tensor) -> dist.Distribution:
        """The guide's Gaussian (before any flow), batch ``x.shape[:-1]``."""
        return self(x)

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        """Posterior mean :math:`E_q[z]`, shape ``(..., latent_dim)``."""
        return self(x).mean


def _positive(pre: torch.Tensor, min_scale: float) -> torch.Tensor:
    return F.softplus(pre) + min_scale


@GUIDES.register("diagonal")
class DiagonalGaussianGuide(Guide):
    r"""Amortized diagonal Gaussian :math:`q_\phi(z|x) = \mathcal{N}(\mu_\phi(x),
    \operatorname{diag}\sigma^2_\phi(x))`, the encoder of Kingma & Welling (2013).
    The scale is ``softplus(.) + 1e-4``."""

    min_scale = 1e-4

    def loc_scale(self, x: torch.Tensor):
        loc, pre = self.encoder(x).split(self.latent_dim, dim=-1)
        return loc, _positive(pre, self.min_scale)

    def forward(self, x: torch.Tensor) -> dist.Distribution:
        loc, scale = self.loc_scale(x)
        return dist.Normal(loc, scale).to_event(1)

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        return self.loc_scale(x)[0]


@GUIDES.register("full-rank")
class FullRankGaussianGuide(Guide):
    r"""Amortized Gaussian with a full covariance :math:`\Sigma_\phi(x) = L_\phi L_\phi^\top`:
    the encoder outputs the mean and the lower triangle of the Cholesky factor, whose
    diagonal is made positive by ``softplus(.) + 1e-4`` and whose off-diagonal entries are
    the outputs divided by :math:`\sqrt{L}` (so that at initialisation the rows of
    :math:`L_\phi` have norms of order one whatever the latent size, instead of
    :math:`\sqrt{L}` times the output scale, which starts training with a huge KL)."""

    min_scale = 1e-4

    @classmethod
    def encoder_outputs(cls, latent_dim: int) -> int:
        return latent_dim + latent_dim * (latent_dim + 1) // 2

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        rows, cols = torch.tril_indices(self.latent_dim, self.latent_dim)
        self.register_buffer("_rows", rows, persistent=False)
        self.register_buffer("_cols", cols, persistent=False)

    def forward(self, x: torch.Tensor) -> dist.Distribution:
        h = self.encoder(x)
        loc, tril_values = h[..., : self.latent_dim], h[..., self.latent_dim :]
        lat = self.latent_dim
        tril = h.new_zeros(*h.shape[:-1], lat, lat)
        tril[..., self._rows, self._cols] = tril_values
        diag = _positive(tril.diagonal(dim1=-2, dim2=-1), self.min_scale)
        tril = tril.tril(-1) / lat**0.5 + torch.diag_embed(diag)
        return dist.MultivariateNormal(loc, scale_tril=tril)

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)[..., : self.latent_dim]


class FlowGuide(Guide):
    r"""A diagonal Gaussian :math:`q_0(z_0|x)` followed by ``num_flows`` conditional
    normalizing-flow steps :math:`z_K = f_K \circ \dots \circ f_1(z_0; c(x))` whose parameters
    depend on a context vector :math:`c(x)` from the encoder (amortized flows). Pyro's
    :class:`~pyro.distributions.TransformedDistribution` adds the log-determinants:
    :math:`\log q(z_K|x) = \log q_0(z_0|x) - \sum_k \log|\det \partial f_k/\partial z_{k-1}|`.

    The density is evaluated at the guide's own samples through the transforms' caches (so
    flows without an analytic inverse, such as planar flows, work for ELBO and importance
    sampling).

    :param int num_flows: number of flow steps K.
    :param context_dim: size of the context vector c(x) the encoder adds for the flows
        (default 2 latent_dim).
    """

    min_scale = 1e-4

    def __init__(
        self,
        data_dim: int,
        latent_dim: int,
        hidden: Sequence[int] = (500, 500),
        activation: str = "softplus",
        encoder: Optional[nn.Module] = None,
        num_flows: int = 2,
        context_dim: Optional[int] = None,
    ):
        self.context_dim = int(context_dim or 2 * latent_dim)
        super().__init__(data_dim, latent_dim, hidden, activation, encoder)
        num_flows = _check_positive_int("num_flows", num_flows)
        self.num_flows = int(num_flows)
        self.flows = nn.ModuleList(self.make_flow(step) for step in range(self.num_flows))

    def encoder_outputs(self, latent_dim: int) -> int:  # needs context_dim: an instance method
        return 2 * latent_dim + self.context_dim


    def make_flow(self, step: int) -> nn.Module:
        """The conditional transform of flow step ``step`` (it has ``.condition(context)``)."""
        raise NotImplementedError

    def _split(self, x):
        h = self.encoder(x)
        loc, pre, context = h.split([self.latent_dim, self.latent_dim, self.context_dim], dim=-1)
        return loc, _positive(pre, self.min_scale), context

    def base(self, x: torch.Tensor) -> dist.Distribution:
        loc, scale, _ = self._split(x)
        return dist.Normal(loc, scale).to_event(1)

    def forward(self, x: torch.Tensor) -> dist.Distribution:
        loc, scale, context = self._split(x)
        transforms = [flow.condition(context) for flow in self.flows]
        return dist.TransformedDistribution(dist.Normal(loc, scale).to_event(1), transforms)

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        """The flow applied to the base mean (a point estimate; E_q[z] has no closed form)."""
        loc, _, context = self._split(x)
        z = loc
        for flow in self.flows:
            z = flow.condition(context)(z)
        return z


@GUIDES.register("iaf")
class IAFGuide(FlowGuide):
    """Inverse autoregressive flow guide (Kingma et al., 2016): conditional affine
    autoregressive steps (:func:`pyro.distributions.transforms.conditional_affine_autoregressive`)."""

    def make_flow(self, step):
        width = max(2 * self.latent_dim, 32)
        return T.conditional_affine_autoregressive(
            self.latent_dim, self.context_dim, hidden_dims=[width, width]
        )


@GUIDES.register("planar")
class PlanarGuide(FlowGuide):
    """Planar flow guide (Rezende & Mohamed, 2015): conditional planar steps
    (:func:`pyro.distributions.transforms.conditional_planar`)."""

    scores_any_point = False  # no analytic inverse

    def make_flow(self, step):
        return T.conditional_planar(self.latent_dim, self.context_dim, hidden_dims=[max(2 * self.latent_dim, 32)])


class _TriangularSylvester(torch.distributions.Transform):
    r""":math:`y = x + Q R \tanh(S Q^\top x + b)` with upper-triangular :math:`R, S` whose
    diagonals lie in (-1, 1) (so the map is invertible) and :math:`Q` the identity or the
    reversal permutation (triangular Sylvester flow, van den Berg et al., 2018). Parameters
    carry batch dimensions (one flow per datapoint). The inverse has no closed form: like
    Pyro's Sylvester transform, only cached samples can be scored."""

    domain = torch.distributions.constraints.real_vector
    codomain = torch.distributions.constraints.real_vector
    bijective = True

    def __init__(self, r: torch.Tensor, s: torch.Tensor, b: torch.Tensor, reverse: bool):
        super().__init__(cache_size=1)
        self.r, self.s, self.b, self.reverse = r, s, b, reverse

    def _permute(self, x):
        return x.flip(-1) if self.reverse else x

    def _preactivation(self, x):
        return (self.s @ self._permute(x).unsqueeze(-1)).squeeze(-1) + self.b

    def _call(self, x):
        h = torch.tanh(self._preactivation(x))
        return x + self._permute((self.r @ h.unsqueeze(-1)).squeeze(-1))

    def _inverse(self, y):
        raise NotImplementedError("a Sylvester flow can only score its own (cached) samples")

    def log_abs_det_jacobian(self, x, y):
        dtanh = 1 - torch.tanh(self._preactivation(x)).pow(2)
        diag = self.r.diagonal(dim1=-2, dim2=-1) * self.s.diagonal(dim1=-2, dim2=-1)
        return torch.log1p(dtanh * diag).sum(-1)


class _ConditionalSylvester(nn.Module):
    """Amortized triangular Sylvester step: a linear hypernetwork maps the context to the
    step's R, S (upper triangular, tanh diagonals) and b."""

    def __init__(self, latent_dim: int, context_dim: int, reverse: bool):
        super().__init__()
        self.latent_dim, self.reverse = latent_dim, reverse
        self.hyper = nn.Linear(context_dim, 2 * latent_dim * latent_dim + latent_dim)
        nn.init.uniform_(self.hyper.weight, -0.01, 0.01)
        nn.init.zeros_(self.hyper.bias)
        self.register_buffer("mask", torch.ones(latent_dim, latent_dim).triu(1), persistent=False)

    def condition(self, context: torch.Tensor) -> _TriangularSylvester:
        lat = self.latent_dim
        h = self.hyper(context)
        r, s, b = h.split([lat * lat, lat * lat, lat], dim=-1)
        r = r.unflatten(-1, (lat, lat))
        s = s.unflatten(-1, (lat, lat))
        r = r * self.mask + torch.diag_embed(torch.tanh(r.diagonal(dim1=-2, dim2=-1)))
        s = s * self.mask + torch.diag_embed(torch.tanh(s.diagonal(dim1=-2, dim2=-1)))
        return _TriangularSylvester(r, s, b, self.reverse)


@GUIDES.register("sylvester")
class SylvesterGuide(FlowGuide):
    """Triangular Sylvester flow guide (van den Berg et al., 2018), amortized: each step's
    R, S and b come from the encoder's context; steps alternate the identity and the
    reversal permutation for Q. Log-determinants are exact
    (:math:`\\sum_i \\log|1 + \\tanh'(\\cdot)_i R_{ii} S_{ii}|`)."""

    scores_any_point = False  # only cached samples can be scored

    def make_flow(self, step):
        return _ConditionalSylvester(self.latent_dim, self.context_dim, reverse=step % 2 == 1)


@GUIDES.register("delta")
class DeltaGuide(Guide):
    r"""A point mass :math:`q(z|x) = \delta(z - f_\phi(x))`: the deterministic encoder of a
    plain autoencoder. It has no density, so the ELBO and importance-weighted bounds are
    undefined for it; train it with the ``"reconstruction"`` objective (an autoencoder) or
    with ``"elbo"`` (then :math:`\log p(z)` acts as a regulariser, MAP-style)."""

    has_density = False

    @classmethod
    def encoder_outputs(cls, latent_dim: int) -> int:
        return latent_dim

    def forward(self, x: torch.Tensor) -> dist.Distribution:
        return dist.Delta(self.encoder(x), event_dim=1)

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)


class NonAmortizedGuide(Guide):
    r"""Free variational parameters per datapoint (no encoder):
    :math:`q(z|x_n) = \mathcal{N}(m_n, \operatorname{diag} s_n^2)` for the ``num_datapoints``
    datapoints of one data set, addressed by their ``index`` in it. Classical (non-amortized)
    variational inference; used to measure the amortization gap and to refine a trained
    encoder on held-out data (start from :meth:`from_guide`).

    It is built for one data set, so it is not in the config registry; attach it with
    ``VAE(vae.prior, vae.decoder, vae.likelihood, NonAmortizedGuide(...))`` and pass
    ``index`` to :func:`pvae.fit` through the data order (fit does this) or to the estimators.
    """

    needs_index = True
    min_scale = 1e-4

    def __init__(self, data_dim: int, latent_dim: int, num_datapoints: int):
        nn.Module.__init__(self)
        self.data_dim, self.latent_dim = int(data_dim), int(latent_dim)
        self.num_datapoints = int(num_datapoints)
        self.loc = nn.Parameter(torch.zeros(self.num_datapoints, self.latent_dim))
        # softplus(0.5413) + 1e-4 = 1: start at the standard normal prior
        self.pre_scale = nn.Parameter(torch.full((self.num_datapoints, self.latent_dim), 0.5413))

    @classmethod
    def from_guide(cls, guide: Guide, x: torch.Tensor) -> "NonAmortizedGuide":
        """Initialise from an amortized diagonal Gaussian guide's output on ``x`` (refinement)."""
        new = cls(guide.data_dim, guide.latent_dim, x.shape[0]).to(x.device, x.dtype)
        with torch.no_grad():
            q = guide.base(x)
            base = q.base_dist if isinstance(q, dist.Independent) else q
            new.loc.copy_(base.loc)
            new.pre_scale.copy_(torch.log(torch.expm1(base.scale - cls.min_scale)))
        return new

    def _select(self, x, index):
        if index is None:
            raise UsageError(
                "a non-amortized guide needs the datapoints' indices (index=...) in the data "
                f"set it was built for ({self.num_datapoints} datapoints)"
            )
        if index.shape != x.shape[:1]:
            raise UsageError(f"index has shape {tuple(index.shape)}, expected ({x.shape[0]},)")
        if int(index.max()) >= self.num_datapoints or int(index.min()) < 0:
            raise UsageError(f"index out of range for a guide of {self.num_datapoints} datapoints")
        return self.loc[index], _positive(self.pre_scale[index], self.min_scale)

    def forward(self, x: torch.Tensor, index: Optional[torch.Tensor] = None) -> dist.Distribution:
        loc, scale = self._select(x, index)
        return dist.Normal(loc, scale).to_event(1)

    def base(self, x: torch.Tensor, index: Optional[torch.Tensor] = None) -> dist.Distribution:
        return self(x, index)

    def mean(self, x: torch.Tensor, index: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self._select(x, index)[0]
