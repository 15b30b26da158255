"""Model families: what ``--model`` (the config's ``model`` part) builds.

===============  =====================================================================================
``vae``          :class:`pvae.VAE` from the prior, guide, likelihood and nets parts (the default)
``autoencoder``  the plain deterministic autoencoder (delta guide, reconstruction loss)
``hvae``         :class:`~pvae.families.hierarchical.HierarchicalVAE`: ``levels`` stochastic levels,
                 ``variant`` tomczak (Tomczak & Welling 2018) or ladder (Sønderby et al. 2016); the
                 prior part is the top level's (VampPrior included)
``cvae``         :class:`~pvae.families.conditional.ConditionalVAE` on the data set's labels
                 (one-hot), or on columns of the user's table, as the covariate
``m2``           :class:`~pvae.families.labels.CategoricalVAE` with the label in the decoder
                 (Kingma et al. 2014's M2), ``labelled`` labels known in training, the rest
                 summed out exactly
``mixture``      :class:`~pvae.families.labels.CategoricalVAE` with the label as a mixture
                 component of the prior, enumerated exactly (``relaxed``: Gumbel-softmax training)
===============  =====================================================================================

Each entry is a part like any other: its options are the factory's keyword parameters, in the
config (``{"model": {"name": "hvae", "levels": 2}}``) and as flags (``--model hvae --levels 2``).
The hooks :func:`resolve`, :func:`model_data` and :func:`write_family_figures` are what a run
(:func:`pvae.runs.train_run`, :func:`pvae.runs.evaluate_run`) asks of a family.
"""

from __future__ import annotations

import hashlib
import json
from typing import Literal, Optional

import numpy as np
import torch

from pvae.errors import UsageError
from pvae.registry import Registry

__all__ = ["MODELS", "build_program", "resolve", "model_data", "balanced_labelled_subset", "write_family_figures"]

MODELS: Registry = Registry("model", context=("config", "data_dim", "image_shape"), doc="""\
What is trained (``--model``): ``vae`` and ``autoencoder`` compose the prior, guide, likelihood and
net parts; ``hvae``, ``cvae``, ``m2`` and ``mixture`` are the families of :mod:`pvae.families`,
built from the likelihood, net and (top-level) prior parts.""")


def _mlp_settings(config, family: str):
    if config.net.name != "mlp":
        raise UsageError(f"model {family!r} builds MLPs from the net part's hidden widths and activation; "
                         f"net {config.net.name!r} is not supported for it (use --net mlp)")
    return tuple(config.net["hidden"]), config.net["activation"]


def _diagonal_guide_only(config, family: str, what: str):
    if config.guide.name != "diagonal":
        raise UsageError(f"model {family!r} has its own guide ({what}); leave the guide part at 'diagonal' "
                         f"(got {config.guide.name!r})")


def _likelihood(config, data_dim):
    from pvae.parts.likelihoods import LIKELIHOODS

    return LIKELIHOODS.build(config.likelihood, data_dim=data_dim)


@MODELS.register("vae")
def _vae(config, data_dim: int, image_shape=None):
    """A :class:`pvae.VAE`: the prior, guide, likelihood and nets parts composed."""
    from pvae.config import build_vae

    return build_vae(config, data_dim, image_shape)


@MODELS.register("autoencoder")
def _autoencoder(config, data_dim: int, image_shape=None):
    """The plain deterministic autoencoder (a VAE with the delta guide and the reconstruction loss)."""
    from pvae.config import build_vae

    return build_vae(config, data_dim, image_shape)


@MODELS.register("hvae")
def hierarchical(config, data_dim: int, image_shape=None, levels: int = 2,
                 variant: Literal["tomczak", "ladder"] = "tomczak"):
    """A hierarchical VAE.

    :param int levels: stochastic levels, each of latent_dim units.
    :param str variant: tomczak (q(z_l|x, z_l+1), decoder reads every level) or ladder (top-down
        precision-weighted inference, decoder reads z1).
    """
    from pvae.families.hierarchical import HierarchicalVAE
    from pvae.parts.priors import PRIORS

    hidden, activation = _mlp_settings(config, "hvae")
    _diagonal_guide_only(config, "hvae", f"the {variant} hierarchy's")
    if int(levels) < 2:
        raise UsageError(f"model 'hvae' needs levels >= 2, got {levels} (one level is --model vae)")

    def make_prior(latent_dim, guide):
        return PRIORS.build(config.prior, latent_dim=latent_dim, guide=guide)

    return HierarchicalVAE(_likelihood(config, data_dim), (config.latent_dim,) * int(levels), make_prior,
                           hidden, activation, variant)


@MODELS.register("cvae")
def conditional(config, data_dim: int, image_shape=None, condition: str = "label",
                covariate_dim: int = 0, conditional_prior: bool = True):
    """A conditional VAE p(z|c) p(x|z, c), q(z|x, c).

    :param str condition: the covariate c: label (the data set's labels, one-hot), or columns of
        your own table (names or indices, comma-separated), read beside the data and not modelled.
    :param int covariate_dim: size of c (0: from the data, the number of classes).
    :param bool conditional_prior: learn p(z|c) (else N(0, I)).
    """
    from pvae.families.conditional import ConditionalVAE

    hidden, activation = _mlp_settings(config, "cvae")
    _diagonal_guide_only(config, "cvae", "q(z|x, c)")
    _standard_prior_only(config, "cvae")
    if int(covariate_dim) < 1:
        raise UsageError("model 'cvae' needs covariate_dim (the number of classes); pvae train sets it from the data")
    return ConditionalVAE(_likelihood(config, data_dim), int(covariate_dim), config.latent_dim, hidden, activation,
                          conditional_prior)


def _standard_prior_only(config, family):
    if config.prior.name != "standard-normal":
        raise UsageError(f"model {family!r} has its own prior over z; leave the prior part at 'standard-normal' "
                         f"(got {config.prior.name!r})")


@MODELS.register("m2")
def semi_supervised(config, data_dim: int, image_shape=None, labelled: int = 100, classes: int = 0,
                    classification_weight: Optional[float] = None):
    """Kingma et al. (2014)'s M2: y (observed where labelled, else enumerated), z ~ N(0, I), x ~ p(x|y, z).

    :param int labelled: training datapoints whose label is known, balanced over the classes,
        drawn with the training seed (-1: every label known).
    :param int classes: number of classes (0: from the data).
    :param classification_weight: weight of log q(y|x) per labelled datapoint (none: Kingma et
        al.'s alpha = 0.1 N over the labelled average, i.e. 0.1 N / labelled per datapoint).
    """
    from pvae.families.labels import CategoricalVAE

    hidden, activation = _mlp_settings(config, "m2")
    _diagonal_guide_only(config, "m2", "q(y|x) q(z|x, y)")
    _standard_prior_only(config, "m2")
    if int(classes) < 2:
        raise UsageError("model 'm2' needs classes (the number of labels); pvae train sets it from the data")
    return CategoricalVAE(_likelihood(config, data_dim), int(classes), config.latent_dim, "decoder", hidden,
                          activation, classification_weight or 0.0)


@MODELS.register("mixture")
def mixture(config, data_dim: int, image_shape=None, components: int = 10, relaxed: bool = False,
            temperature: float = 0.67):
    """A mixture VAE: a categorical component y (summed out exactly), z ~ N(mu_y, sigma_y), x ~ p(x|z).

    :param int components: number of mixture components (values of y).
    :param bool relaxed: train with a relaxed (Gumbel-softmax) component; evaluated enumerated.
    :param float temperature: temperature of the relaxed component.
    """
    from pvae.families.labels import CategoricalVAE

    hidden, activation = _mlp_settings(config, "mixture")
    _diagonal_guide_only(config, "mixture", "q(y|x) q(z|x, y)")
    _standard_prior_only(config, "mixture")
    return CategoricalVAE(_likelihood(config, data_dim), int(components), config.latent_dim, "prior", hidden,
                          activation, 0.0, relaxed, temperature)


def build_program(config, data_dim: int, image_shape=None):
    """The model ``config`` describes (its ``model`` part) for data of ``data_dim`` dimensions."""
    return MODELS.build(config.model, config=config, data_dim=data_dim, image_shape=image_shape)


# ---------------------------------------------------------------------------------------- runs
def _num_classes(data, family: str) -> int:
    labels = [data.split_labels(s) for s in ("train", "valid", "test")]
    if any(lab is None for lab in labels):
        raise UsageError(f"model {family!r} needs a labelled data set, but {data.name!r} has no labels"
                         + (" (give --label-column for a table, or class subfolders for images)"
                            if data.source and "path" in data.source else ""))
    return int(max(int(lab.max()) for lab in labels if lab.numel())) + 1


def resolve(config, data):
    """``config`` with the options that depend on the data filled in (classes, covariate size,
    the classification weight) and checked (enough labels per class): what the run records."""
    name, model = config.model.name, config.model
    if name == "cvae" and model["covariate_dim"] == 0:
        if model["condition"] == "label":
            return config.replace(model={"covariate_dim": _num_classes(data, name)})
        if data.covariates is None:
            raise UsageError(f"--condition {model['condition']}: the data set {data.name!r} has no covariate columns")
        return config.replace(model={"covariate_dim": int(data.covariates["train"].shape[-1])})
    if name == "m2":
        classes = model["classes"] or _num_classes(data, name)
        n_train = data.train.shape[0]
        labelled = n_train if model["labelled"] == -1 else model["labelled"]
        if not 0 < labelled <= n_train:
            raise UsageError(f"--labelled {model['labelled']}: the training split has {n_train} datapoints "
                             "(give 1..N, or -1 for every label)")
        if labelled < n_train and labelled % classes:
            raise UsageError(f"--labelled {labelled}: a balanced subset needs a multiple of the {classes} classes")
        weight = model["classification_weight"]
        if weight is None:
            weight = 0.1 * n_train / labelled
        return config.replace(model={"classes": classes, "labelled": labelled, "classification_weight": weight})
    return config


def balanced_labelled_subset(labels: torch.Tensor, count: int, num_classes: int, seed: int) -> torch.Tensor:
    """Positions of ``count`` datapoints, ``count / num_classes`` of each class, drawn with ``seed``
    (NumPy's RandomState, so the draw is the same on every machine): the known labels of M2."""
    if count >= labels.shape[0]:
        return torch.arange(labels.shape[0])
    per_class = count // num_classes
    rng = np.random.RandomState(seed)
    chosen = []
    for k in range(num_classes):
        members = np.flatnonzero(labels.numpy() == k)
        if members.size < per_class:
            raise UsageError(f"class {k} has {members.size} training datapoints, fewer than the {per_class} "
                             "labelled ones asked for")
        chosen.append(rng.choice(members, per_class, replace=False))
    return torch.as_tensor(np.sort(np.concatenate(chosen)))


def labelled_record(config, data) -> Optional[dict]:
    """For M2: which training labels are known (positions and their SHA-256), for data.json."""
    if config.model.name != "m2":
        return None
    chosen = balanced_labelled_subset(data.split_labels("train"), config.model["labelled"],
                                      config.model["classes"], config.training.seed)
    positions = chosen.tolist()
    digest = hashlib.sha256(json.dumps(positions).encode()).hexdigest()
    return {"count": len(positions), "seed": config.training.seed, "balanced": True,
            "positions_sha256": digest, "positions": positions}


def model_data(config, data, split: str, training: bool = False):
    """What the programs read for ``split``: the data tensor, or :class:`~pvae.WithCovariates`
    with the labels the family reads (cvae: the one-hot label ``c`` in every split; m2: the
    known training labels ``y`` and their mask ``observed`` in training only — validation and
    test are scored with the label summed out)."""
    from pvae.inference.engine import WithCovariates

    x = data.split(split)
    name = config.model.name
    if name == "cvae":
        if config.model["condition"] == "label":
            labels = data.split_labels(split)
            c = torch.nn.functional.one_hot(labels.long(), config.model["covariate_dim"]).to(torch.float32)
        else:  # the table's covariate columns
            c = data.split_covariates(split).to(torch.float32)
        if data.dynamic_binarization and split == "train":
            raise UsageError("model 'cvae' trains on fixed data: dynamic binarization is not supported with it yet; "
                             "binarize statically (--binarize static)")
        return WithCovariates(x, c=c)
    if name == "m2" and split == "train" and training:
        if data.dynamic_binarization:
            raise UsageError("model 'm2' trains on fixed data: dynamic binarization is not supported with it yet; "
                             "binarize statically (--binarize static)")
        labels = data.split_labels("train")
        known = balanced_labelled_subset(labels, config.model["labelled"], config.model["classes"],
                                         config.training.seed)
        observed = torch.zeros(labels.shape[0], dtype=torch.bool)
        observed[known] = True
        return WithCovariates(x, y=torch.where(observed, labels, torch.zeros_like(labels)), observed=observed)
    return x


def write_family_figures(program, config, data, run_dir) -> dict:
    """Figures of a family's run (besides the ELBO curves): reconstructions and samples, per class
    for the labelled families, and the latent map of the validation split."""
    from pvae import plots

    figures = {}
    valid = model_data(config, data, "valid")
    labels = data.split_labels("valid")
    name = config.model.name
    shape = data.image_shape
    with torch.no_grad():
        if name == "cvae":
            x, c = valid.x[:1000], valid.covariates["c"][:1000]
            codes = program.encode(x, c)
            if shape is not None:
                figures["reconstructions.png"] = plots.image_grid(
                    torch.cat([x[:10], program.reconstruct(x[:10], c[:10])]), shape, ncols=10,
                    title="data (top) and reconstructions E[x|z, c]")
                classes = config.model["covariate_dim"]
                grid_c = torch.eye(classes).repeat_interleave(10, 0)  # (image data: the labels' one-hot codes)
                figures["samples_per_class.png"] = plots.image_grid(
                    program.sample(grid_c, seed=0), shape, ncols=10, title="samples E[x|z, c], z ~ p(z|c), a row per class")
        else:
            x = valid[:1000]
            codes = program.encode(x)
            if shape is not None:
                figures["reconstructions.png"] = plots.reconstructions(program, x, shape)
                if name in ("m2", "mixture"):
                    rows = [program.sample(10, seed=k, label=k) for k in range(program.num_classes)]
                    figures["samples_per_class.png"] = plots.image_grid(
                        torch.cat(rows), shape, ncols=10, title="samples, a row per value of y")
                else:
                    figures["samples.png"] = plots.samples(program, shape)
        figures["latent.png"] = plots.latent_scatter(codes, None if labels is None else labels[:1000],
                                                     label_names=data.label_names)
    return figures

