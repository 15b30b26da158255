r"""A categorical latent ``y`` next to a continuous ``z``: labels are latent variables too.

One program, two places for the label (composition, not a class per paper):

* ``label_in="decoder"`` — Kingma et al. (2014)'s **M2**: :math:`p(y) = \mathrm{Cat}(1/C)`,
  :math:`p(z) = \mathcal N(0, I)`, :math:`p(x | y, z)`;
* ``label_in="prior"`` — a **mixture VAE** (a Gaussian-mixture prior with the component as a
  discrete site): :math:`p(y) = \mathrm{Cat}(1/C)`, :math:`p(z|y) = \mathcal N(\mu_y,
  \operatorname{diag}\sigma_y^2)` (learned), :math:`p(x | z)`.

The guide is :math:`q(y|x)\,q(z|x, y)` (a classifier and a Gaussian encoder of ``x`` and the
one-hot ``y``). The label is summed out exactly: the guide marks ``y`` for parallel enumeration
(what :class:`pyro.infer.TraceEnum_ELBO` does with :func:`pyro.infer.config_enumerate`), and
pvae's engine sums it out inside every per-datapoint weight, so the ELBO, L_K, AIS and the
naive estimate all score :math:`\log p(x) = \log \sum_y p(x, y)`.

**Semi-supervised** (pass ``pvae.WithCovariates(x, y=labels, observed=mask)``): the model reads
``pyro.sample("y", ..., obs=y, obs_mask=observed)`` (Pyro's idiom: sites ``"y_observed"`` and
``"y_unobserved"``), so a labelled datapoint scores :math:`\log p(x, y)` and an unlabelled one
:math:`\log p(x)`, and in training (``module.training``) a labelled datapoint adds Kingma et al.'s
classification term :math:`\alpha \log q(y|x)` (a ``pyro.factor`` site ``"classification"``) with
:math:`\alpha` = ``classification_weight``. Evaluation data without labels never carry it.

**Relaxed** (``relaxed=True``, Jang et al. 2017; Maddison et al. 2017): in training mode the
guide draws a reparametrized relaxed one-hot :math:`\tilde y \sim \mathrm{Concrete}(\pi(x),
\tau)` and the model scores it under :math:`\mathrm{Concrete}(1/C, \tau)` (Pyro's
:class:`~pyro.distributions.RelaxedOneHotCategorical`, whose density is the Concrete density);
the label enters as the soft one-hot vector. In evaluation mode (``module.eval()``) the same
networks are scored as the discrete model, with ``y`` enumerated exactly: every log p(x) of a
relaxed model is that of the discrete model it approximates.

:data:`LABEL_SITE` is the label's site name (``"y"``); :data:`PLACES` the places it may enter.
"""

from __future__ import annotations

from typing import Literal, Optional, Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import nn

from pvae.errors import UsageError
from pvae.families.base import MIN_SCALE, FamilyModel, cat_broadcast, diagonal_normal, one_hot
from pvae.model import DATA_PLATE, OBSERVED_SITE
from pvae.parts.nets import MLP

__all__ = ["CategoricalVAE", "LABEL_SITE", "PLACES"]

LABEL_SITE = "y"
PLACES = ("decoder", "prior")


class CategoricalVAE(FamilyModel):
    r"""A VAE with a categorical latent ``y`` of ``num_classes`` values and a Gaussian ``z``
    (see the module docstring).

    :param likelihood: the :class:`~pvae.parts.likelihoods.Likelihood` of x.
    :param int num_classes: values of ``y`` (C).
    :param int latent_dim: size of ``z``.
    :param str label_in: ``"decoder"`` (M2) or ``"prior"`` (mixture VAE).
    :param hidden: hidden widths of the classifier, the encoder and (reversed) the decoder.
    :param str activation: a name in :data:`~pvae.parts.nets.ACTIVATIONS`.
    :param float classification_weight: :math:`\alpha`, the weight of :math:`\log q(y|x)` per
        labelled training datapoint (0: off).
    :param bool relaxed: train with a relaxed (Gumbel-softmax / Concrete) label.
    :param float temperature: :math:`\tau` of the relaxed label.
    """

    covariates = ("y", "observed")

    @property
    def predicts_labels(self) -> bool:
        """Whether ``y`` is meant as the data's label (M2), so that :meth:`classify` has a test
        error; a mixture's components are unnamed clusters."""
        return self.label_in == "decoder"

    def __init__(self, likelihood, num_classes: int, latent_dim: int,
                 label_in: Literal["decoder", "prior"] = "decoder", hidden: Sequence[int] = (500,),
                 activation: str = "softplus", classification_weight: float = 0.0, relaxed: bool = False,
                 temperature: float = 0.67):
        super().__init__()
        if int(num_classes) < 2:
            raise UsageError(f"a categorical latent needs at least 2 classes, got {num_classes}")
        if label_in not in PLACES:
            raise UsageError(f"unknown label place {label_in!r}; valid choices: {', '.join(PLACES)}")
        if not classification_weight >= 0:
            raise UsageError(f"classification_weight must be >= 0, got {classification_weight}")
        if relaxed and not temperature > 0:
            raise UsageError(f"the relaxed label's temperature must be positive, got {temperature}")
        self.likelihood = likelihood
        self.num_classes, self.latent_dim = int(num_classes), int(latent_dim)
        self.label_in = label_in
        self.classification_weight = float(classification_weight)
        self.relaxed, self.temperature = bool(relaxed), float(temperature)
        D, C, L = likelihood.data_dim, self.num_classes, self.latent_dim
        hidden = tuple(int(h) for h in hidden)
        self.classifier = MLP(D, C, hidden, activation)
        self.encoder = MLP(D + C, 2 * L, hidden, activation)
        self.decoder = MLP(L + C if label_in == "decoder" else L, likelihood.param_dim, hidden[::-1], activation)
        if label_in == "prior":  # component means spread out, unit scales
            self.component_loc = nn.Parameter(torch.randn(C, L))
            self.component_pre_scale = nn.Parameter(torch.full((C, L), 0.5413))  # softplus^-1(1)
        self.register_buffer("label_logits", torch.zeros(C))

    # ------------------------------------------------------------------ pieces
    def label_prior(self) -> dist.Distribution:
        """:math:`p(y)`, uniform over the classes."""
        return dist.Categorical(logits=self.label_logits)

    def label_posterior(self, x: torch.Tensor) -> dist.Categorical:
        """:math:`q(y|x)`, the guide's classifier."""
        return dist.Categorical(logits=self.classifier(x))

    @torch.no_grad()
    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """The most probable label under :math:`q(y|x)`, ``(B,)``."""
        return self.classifier(x).argmax(-1)

    def _code(self, y: torch.Tensor, dtype) -> torch.Tensor:
        """A label (integer, or already a relaxed one-hot vector) as the vector the networks read."""
        return y if y.is_floating_point() else one_hot(y, self.num_classes, dtype)

    def z_prior(self, code: torch.Tensor) -> dist.Distribution:
        r""":math:`p(z)` (M2) or :math:`p(z|y)` (mixture) for the label vector ``code``."""
        if self.label_in == "decoder":
            zeros = torch.zeros(self.latent_dim, dtype=code.dtype, device=code.device)
            return dist.Normal(zeros, 1.0).to_event(1)
        loc = code @ self.component_loc
        scale = code @ (torch.nn.functional.softplus(self.component_pre_scale) + MIN_SCALE)
        return dist.Normal(loc, scale).to_event(1)

    def _decoder_input(self, z, code):
        return cat_broadcast(z, code) if self.label_in == "decoder" else z

    def _relaxing(self) -> bool:
        return self.relaxed and self.training

    def check_covariates(self, covariates, what):
        if ("y" in covariates) != ("observed" in covariates):
            raise UsageError(f"labels come with their mask: pass y= and observed= together with the {what}")
        if "y" in covariates:
            y, observed = covariates["y"], covariates["observed"]
            if observed.dtype != torch.bool:
                raise UsageError(f"covariate 'observed' must be a boolean mask, got {observed.dtype}")
            known = y[observed]
            if known.numel() and (int(known.min()) < 0 or int(known.max()) >= self.num_classes):
                raise UsageError(f"the {what}'s labels must lie in 0..{self.num_classes - 1}, got "
                                 f"{int(known.min())}..{int(known.max())}")
            if self.relaxed and self.training and bool(observed.any()):
                raise UsageError("a relaxed label cannot be observed (a one-hot vector has no Concrete density); "
                                 "train the semi-supervised model with the enumerated label (relaxed off)")

    # ------------------------------------------------------------------ programs
    def model(self, x: Optional[torch.Tensor], index: Optional[torch.Tensor] = None, y=None, observed=None,
              num_datapoints: Optional[int] = None):
        """``y ~ p(y)`` (observed where ``observed``), ``z ~ p(z | y)``, ``x ~ p(x | y, z)``."""
        dtype = x.dtype if x is not None else self.label_logits.dtype
        with pyro.plate(DATA_PLATE, self._size(x, num_datapoints), dim=-1):
            if self._relaxing():
                prior = dist.RelaxedOneHotCategorical(torch.tensor(self.temperature, dtype=dtype,
                                                                   device=self.label_logits.device),
                                                      logits=self.label_logits)
                label = pyro.sample(LABEL_SITE, prior)
            elif observed is None:
                label = pyro.sample(LABEL_SITE, self.label_prior())
            else:
                label = pyro.sample(LABEL_SITE, self.label_prior(), obs=y, obs_mask=observed)
            code = self._code(label, dtype)
            z = pyro.sample("z", self.z_prior(code))
            pyro.sample(OBSERVED_SITE, self.likelihood(self.decoder(self._decoder_input(z, code))), obs=x)
            if observed is not None and self.training and self.classification_weight > 0:
                with poutine.mask(mask=observed):
                    log_q = self.label_posterior(x).log_prob(y.long().clamp(0, self.num_classes - 1))
                    pyro.factor("classification", self.classification_weight * log_q)

    def guide(self, x: torch.Tensor, index: Optional[torch.Tensor] = None, y=None, observed=None):
        """``y ~ q(y|x)`` (enumerated; relaxed in training with ``relaxed``), ``z ~ q(z|x, y)``."""
        with pyro.plate(DATA_PLATE, x.shape[0], dim=-1):
            logits = self.classifier(x)
            if self._relaxing():
                temperature = torch.tensor(self.temperature, dtype=x.dtype, device=x.device)
                label = pyro.sample(LABEL_SITE, dist.RelaxedOneHotCategorical(temperature, logits=logits))
            elif observed is None:
                label = pyro.sample(LABEL_SITE, dist.Categorical(logits=logits), infer={"enumerate": "parallel"})
            else:
                with poutine.mask(mask=~observed):
                    free = pyro.sample(f"{LABEL_SITE}_unobserved", dist.Categorical(logits=logits),
                                       infer={"enumerate": "parallel"})
                label = torch.where(observed, y.long(), free)
            code = self._code(label, x.dtype)
            pyro.sample("z", diagonal_normal(self.encoder(cat_broadcast(x, code)), self.latent_dim))

    # ------------------------------------------------------------------ conveniences
    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        r""":math:`E_q[z|x] = \sum_y q(y|x) E_q[z|x, y]`, ``(B, latent_dim)``."""
        probs = torch.softmax(self.classifier(x), -1)  # (B, C)
        codes = torch.eye(self.num_classes, dtype=x.dtype, device=x.device)[:, None, :]  # (C, 1, C)
        means = self.encoder(cat_broadcast(x, codes))[..., : self.latent_dim]  # (C, B, L)
        return (probs.T[..., None] * means).sum(0)

    @torch.no_grad()
    def sample(self, num_samples: int, seed: Optional[int] = None, mean: bool = True,
               label: Optional[int] = None) -> torch.Tensor:
        """New datapoints, of class ``label`` if given (else ``y ~ p(y)``): ``(num_samples, data_dim)``."""
        from pvae._rng import seeded

        with seeded(seed, self.device):
            if label is None:
                y = self.label_prior().sample((num_samples,))
            else:
                if not 0 <= int(label) < self.num_classes:
                    raise UsageError(f"label must be in 0..{self.num_classes - 1}, got {label}")
                y = torch.full((num_samples,), int(label), dtype=torch.long, device=self.device)
            code = self._code(y, self.label_logits.dtype)
            z = self.z_prior(code).sample() if self.label_in == "prior" else \
                self.z_prior(code).expand((num_samples,)).sample()
            params = self.decoder(self._decoder_input(z, code))
            return self.likelihood.mean(params) if mean else self.likelihood(params).sample()

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """:math:`E[x | \\hat y, \\hat z]` at the most probable label and its code mean."""
        code = one_hot(self.classify(x), self.num_classes, x.dtype)
        z = self.encoder(cat_broadcast(x, code))[..., : self.latent_dim]
        return self.likelihood.mean(self.decoder(self._decoder_input(z, code)))
