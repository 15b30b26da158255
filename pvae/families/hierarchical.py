r"""Hierarchical VAEs: ``L`` stochastic levels :math:`z_L \to \dots \to z_1 \to x`.

Generative model (both variants): :math:`p(z_L)` any registered prior (the VampPrior included,
its pseudo-inputs encoded by the top level's guide), :math:`p(z_l | z_{l+1}) =
\mathcal N(\mu_l(z_{l+1}), \operatorname{diag}\sigma_l^2(z_{l+1}))` and a likelihood whose
decoder reads

* ``variant="tomczak"`` (Tomczak & Welling 2018's HVAE, generalized to ``L`` levels): every
  level, :math:`p(x | z_1, \dots, z_L)`; the guide is :math:`q(z_L|x) \prod_{l<L} q(z_l | x,
  z_{l+1})`, each factor a diagonal Gaussian from an MLP of :math:`x` (and the level above);
* ``variant="ladder"`` (Sønderby et al. 2016's ladder VAE): :math:`p(x | z_1)`; a deterministic
  bottom-up pass :math:`d_l = f_l(d_{l-1})`, :math:`d_0 = x`, gives a Gaussian
  :math:`(\hat\mu_l, \hat\sigma_l)` per level, and the guide is top-down: :math:`q(z_L|x) =
  \mathcal N(\hat\mu_L, \hat\sigma_L^2)`, and below it the precision-weighted combination of the
  bottom-up Gaussian with the model's own :math:`p(z_l | z_{l+1})`:
  :math:`\sigma_q^{-2} = \hat\sigma_l^{-2} + \sigma_l^{-2}`, :math:`\mu_q = \sigma_q^2
  (\hat\mu_l \hat\sigma_l^{-2} + \mu_l \sigma_l^{-2})`.

Sites ``"z1"`` … ``"zL"`` (``"z1"`` next to the data) and ``"x"``, in the plate ``"data"``; the
guide samples from the top down. Every estimator (ELBO, L_K, naive, AIS over all levels) and the
per-level diagnostics (active units, KL per level) read the traces. :data:`VARIANTS` lists the
variants; :func:`level_site` names a level's site.
"""

from __future__ import annotations

from typing import Callable, Literal, Optional, Sequence

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from pvae.errors import UsageError
from pvae.families.base import FamilyModel, cat_broadcast, loc_scale
from pvae.model import DATA_PLATE, OBSERVED_SITE
from pvae.parts.guides import DiagonalGaussianGuide
from pvae.parts.nets import MLP, _elementwise

__all__ = ["HierarchicalVAE", "level_site", "VARIANTS"]

VARIANTS = ("tomczak", "ladder")


def level_site(level: int) -> str:
    """The sample site of level ``level`` (1 is next to the data)."""
    return f"z{level}"


class _LadderTop(nn.Module):
    """The ladder guide's top level :math:`q(z_L|x)` as a pvae guide (``base``, ``data_dim``,
    ``has_density``), so that a VampPrior encodes its pseudo-inputs with it."""

    has_density = True
    scores_any_point = True
    needs_index = False

    def __init__(self, owner: "HierarchicalVAE"):
        super().__init__()
        object.__setattr__(self, "_owner", owner)  # a reference, not a submodule
        self.data_dim = owner.likelihood.data_dim
        self.latent_dim = owner.level_dims[-1]

    def forward(self, x):
        loc, scale = self._owner._bottom_up(x)[-1]
        return dist.Normal(loc, scale).to_event(1)

    def base(self, x):
        return self(x)

    def mean(self, x):
        return self._owner._bottom_up(x)[-1][0]


class HierarchicalVAE(FamilyModel):
    r"""A VAE with ``len(level_dims)`` stochastic levels (see the module docstring).

    :param likelihood: a :class:`~pvae.parts.likelihoods.Likelihood` (its ``data_dim`` is the data's).
    :param level_dims: latent size of each level, bottom (``z1``) first.
    :param make_prior: ``make_prior(latent_dim, guide) -> Prior`` for the top level (e.g.
        ``lambda d, g: PRIORS.build("vamp", latent_dim=d, guide=g)``); default standard normal.
    :param hidden: hidden widths of every network (the decoder's reversed).
    :param str activation: a name in :data:`~pvae.parts.nets.ACTIVATIONS` (``"gated"`` included).
    :param str variant: ``"tomczak"`` or ``"ladder"``.
    """

    def __init__(self, likelihood, level_dims: Sequence[int], make_prior: Optional[Callable] = None,
                 hidden: Sequence[int] = (300, 300), activation: str = "softplus",
                 variant: Literal["tomczak", "ladder"] = "tomczak"):
        super().__init__()
        level_dims = tuple(int(d) for d in level_dims)
        if len(level_dims) < 2 or min(level_dims) < 1:
            raise UsageError(f"a hierarchical VAE needs at least 2 levels of positive size, got {level_dims}")
        if variant not in VARIANTS:
            raise UsageError(f"unknown hierarchy variant {variant!r}; valid choices: {', '.join(VARIANTS)}")
        hidden = tuple(int(h) for h in hidden)
        if not hidden:
            raise UsageError("a hierarchical VAE needs at least one hidden layer (net hidden)")
        self.likelihood = likelihood
        self.level_dims, self.variant = level_dims, variant
        D, L = likelihood.data_dim, len(level_dims)
        # p(z_l | z_{l+1}) for l = 1 .. L-1 (index l-1)
        self.transitions = nn.ModuleList(
            [MLP(level_dims[i + 1], 2 * level_dims[i], hidden, activation) for i in range(L - 1)])
        decoder_in = sum(level_dims) if variant == "tomczak" else level_dims[0]
        self.decoder = MLP(decoder_in, likelihood.param_dim, hidden[::-1], activation)
        if variant == "tomczak":
            self.top_guide = DiagonalGaussianGuide(D, level_dims[-1], hidden, activation)
            self.lower_guides = nn.ModuleList(
                [MLP(D + level_dims[i + 1], 2 * level_dims[i], hidden, activation) for i in range(L - 1)])
            top = self.top_guide
        else:
            width = hidden[-1]
            # between the bottom-up blocks an elementwise activation ("gated" is a layer, not one: softplus then)
            act = "softplus" if activation == "gated" else activation
            self.up = nn.ModuleList([MLP(D if i == 0 else width, width, hidden[:-1], activation) for i in range(L)])
            self.up_act = _elementwise(act)()
            self.heads = nn.ModuleList([nn.Linear(width, 2 * d) for d in level_dims])
            top = _LadderTop(self)
        if make_prior is None:
            from pvae.parts.priors import StandardNormalPrior

            make_prior = lambda d, g: StandardNormalPrior(d)  # noqa: E731
        self.prior = make_prior(level_dims[-1], top)
        object.__setattr__(self, "_top", top)

    @property
    def latent_dim(self) -> int:
        return sum(self.level_dims)

    @property
    def num_levels(self) -> int:
        return len(self.level_dims)

    # ------------------------------------------------------------------ networks
    def transition(self, level: int, above: torch.Tensor) -> dist.Distribution:
        r""":math:`p(z_l | z_{l+1})` for ``level`` l < L."""
        loc, scale = loc_scale(self.transitions[level - 1](above), self.level_dims[level - 1])
        return dist.Normal(loc, scale).to_event(1)

    def _bottom_up(self, x: torch.Tensor):
        """The ladder's bottom-up Gaussians ``[(loc, scale)]`` for levels 1..L."""
        out, h = [], x
        for up, head, d in zip(self.up, self.heads, self.level_dims):
            h = self.up_act(up(h))
            out.append(loc_scale(head(h), d))
        return out

    def _ladder_level(self, level: int, bottom_up, above: torch.Tensor):
        r"""The ladder guide's ``(loc, scale)`` at ``level`` < L: the bottom-up Gaussian and
        :math:`p(z_l|z_{l+1})` combined by precision weighting."""
        p = self.transition(level, above).base_dist
        loc_u, scale_u = bottom_up[level - 1]
        precision_u, precision_p = scale_u.pow(-2), p.scale.pow(-2)
        var = 1.0 / (precision_u + precision_p)
        return var * (loc_u * precision_u + p.loc * precision_p), var.sqrt()

    def _decoder_input(self, levels: dict) -> torch.Tensor:
        if self.variant == "ladder":
            return levels[1]
        return cat_broadcast(*(levels[level] for level in range(1, self.num_levels + 1)))

    # ------------------------------------------------------------------ programs
    def model(self, x: Optional[torch.Tensor], index: Optional[torch.Tensor] = None,
              num_datapoints: Optional[int] = None):
        """``z_L ~ p(z_L)``, ``z_l ~ p(z_l | z_{l+1})``, ``x ~ p(x | ...)`` (observed)."""
        L = self.num_levels
        with pyro.plate(DATA_PLATE, self._size(x, num_datapoints), dim=-1):
            levels = {L: pyro.sample(level_site(L), self.prior())}
            for level in range(L - 1, 0, -1):
                levels[level] = pyro.sample(level_site(level), self.transition(level, levels[level + 1]))
            pyro.sample(OBSERVED_SITE, self.likelihood(self.decoder(self._decoder_input(levels))), obs=x)
        return levels

    def guide(self, x: torch.Tensor, index: Optional[torch.Tensor] = None):
        """From the top down: ``z_L ~ q(z_L|x)``, then each level given ``x`` and the level above."""
        L = self.num_levels
        with pyro.plate(DATA_PLATE, x.shape[0], dim=-1):
            if self.variant == "tomczak":
                z = pyro.sample(level_site(L), self.top_guide(x))
                for level in range(L - 1, 0, -1):
                    loc, scale = loc_scale(self.lower_guides[level - 1](cat_broadcast(x, z)), self.level_dims[level - 1])
                    z = pyro.sample(level_site(level), dist.Normal(loc, scale).to_event(1))
                return
            up = self._bottom_up(x)
            loc, scale = up[-1]
            z = pyro.sample(level_site(L), dist.Normal(loc, scale).to_event(1))
            for level in range(L - 1, 0, -1):
                z = pyro.sample(level_site(level), dist.Normal(*self._ladder_level(level, up, z)).to_event(1))

    # ------------------------------------------------------------------ conveniences
    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The top level's guide mean :math:`E_q[z_L|x]` (for latent maps), ``(B, d_L)``."""
        return self._top.mean(x)

    @torch.no_grad()
    def sample(self, num_samples: int, seed: Optional[int] = None, mean: bool = True) -> torch.Tensor:
        """New datapoints: ancestral draws of every level, then :math:`E[x|\\cdot]` (``mean``) or
        a draw of ``x``; ``(num_samples, data_dim)``."""
        from pvae._rng import seeded

        with seeded(seed, self.device):
            levels = {self.num_levels: self.prior().sample((num_samples,))}
            for level in range(self.num_levels - 1, 0, -1):
                levels[level] = self.transition(level, levels[level + 1]).sample()
            params = self.decoder(self._decoder_input(levels))
            return self.likelihood.mean(params) if mean else self.likelihood(params).sample()

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """:math:`E[x|\\cdot]` at the guide's top-down means (each level at its mean given the means above)."""
        L = self.num_levels
        if self.variant == "tomczak":
            levels = {L: self.top_guide.mean(x)}
            for level in range(L - 1, 0, -1):
                levels[level] = loc_scale(self.lower_guides[level - 1](cat_broadcast(x, levels[level + 1])),
                                          self.level_dims[level - 1])[0]
        else:
            up = self._bottom_up(x)
            levels = {L: up[-1][0]}
            for level in range(L - 1, 0, -1):
                levels[level] = self._ladder_level(level, up, levels[level + 1])[0]
        return self.likelihood.mean(self.decoder(self._decoder_input(levels)))
