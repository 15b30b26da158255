"""Run configurations (nested, one section per part) and the model builder.

A :class:`RunConfig` holds everything needed to rebuild a model and repeat its training; it is
saved as ``config.json`` (format :data:`CONFIG_VERSION`) in each run directory::

    {"version": 2, "dataset": {"name": "binarized-mnist"}, "model": "vae", "latent_dim": 40,
     "net": {"name": "mlp", "hidden": [300, 300], "activation": "gated"},
     "prior": {"name": "vamp", "pseudo_inputs": 500},
     "guide": {"name": "diagonal"},
     "likelihood": {"name": "bernoulli"},
     "objective": {"name": "elbo", "num_particles": 1, "beta": 1.0, "kl_warmup": 100.0, "kl_schedule": "linear"},
     "training": {"epochs": 2000, "batch_size": 100, "lr": 0.0005, ...}}

Each part section holds the part's ``name`` and its options — the keyword parameters of the
part's constructor (:mod:`pvae.options`), with their defaults filled in. An unknown name or an
option the chosen part does not take is an error naming the valid ones. The flat files of
pvae 0.1 (version 1, no ``version`` key) are translated on load (:func:`translate_v1`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Literal, Optional, Sequence, Tuple

from pvae.data import DATASETS, image_shape_of
from pvae.inference.engine import _check_positive_int
from pvae.errors import UsageError
from pvae.parts.guides import GUIDES
from pvae.parts.likelihoods import LIKELIHOODS
from pvae.model import VAE
from pvae.parts.nets import NETS
from pvae.training.objectives import OBJECTIVES
from pvae.options import Option, Part, declared_options
from pvae.parts.priors import PRIORS

__all__ = ["Training", "RunConfig", "build_vae", "autoencoder_config", "section_options", "save_config",
           "CONFIG_VERSION"]

#: version of the config.json schema written by this pvae (1: pvae 0.1's flat file)
CONFIG_VERSION = 2
from pvae.families import MODELS  # noqa: E402  (the model part: vae, autoencoder, hvae, ...)
STEP_MODES = ("auto", "eager", "compile", "cuda-graph")
from pvae.training.controls import TRAINING_PARTS  # noqa: E402,F401  (the training section's parts)

#: config section -> registry of its parts
PART_REGISTRIES = {"model": MODELS, "dataset": DATASETS, "net": NETS, "prior": PRIORS, "guide": GUIDES, "likelihood": LIKELIHOODS,
                   "objective": OBJECTIVES}


@dataclass(frozen=True)
class Training:
    """How a run is trained (the ``training`` section).

    :param int epochs: total number of epochs (a resumed run continues up to this number).
    :param int batch_size: datapoints per minibatch.
    :param float lr: Adam learning rate.
    :param patience: stop after this many epochs without a better validation metric (null, off or 0: never).
    :param int seed: seeds the initial weights, the data order and the sampling.
    :param device: cpu, cuda or cuda:N (null: where the model is; the command line's default is cpu).
    :param int val_num_samples: samples per datapoint for the validation bound.
    :param str val_bound: the validation metric (early stopping, best model): elbo, or iwae (L_K
        with K = val_num_samples, for models trained on L_K).
    :param str step: the training step: auto (a CUDA graph on CUDA, eager elsewhere), eager,
        compile (torch.compile) or cuda-graph.
    :param max_time: seconds for one training call; it stops after the epoch in which they run
        out, and a later --resume continues.
    :param int checkpoint_every: write the checkpoint every this many epochs (and after the last).
    :param optimizer: the optimizer part (:data:`~pvae.training.controls.OPTIMIZERS`: adam, adamw,
        sgd, adamax, with their options, e.g. ``{"name": "sgd", "momentum": 0.9}``).
    :param lr_schedule: the learning-rate schedule part (:data:`~pvae.training.controls.SCHEDULES`:
        constant, step, exponential, cosine, plateau, iwae, with their options, e.g.
        ``{"name": "cosine", "min_lr": 1e-5}``).
    :param clip_grad_norm: clip the gradient's global norm to this value (null: no clipping).
    :param str precision: fp32, or bf16 (the networks under autocast; densities in float32).
    :param log: experiment trackers: tensorboard, mlflow (comma-separated; metrics.jsonl always).
    :param str nonfinite: a step whose loss or gradient is NaN/inf is never applied; raise (stop
        with an error at the next check) or skip (go on, counting skipped steps in the epoch's record).
    :param int max_skipped_steps: with nonfinite skip, stop with an error after this many skipped
        steps in a row.
    :param check_every: check for non-finite steps every this many steps (each check is a host
        synchronisation; null: once per epoch).
    :param bool restore_best: at the end of training, load the parameters of the best validation epoch.
    """

    epochs: int = 600
    batch_size: int = 100
    lr: float = 1e-3
    patience: Optional[int] = 30
    seed: int = 0
    device: Optional[str] = "cpu"
    val_num_samples: int = 1
    val_bound: Literal["elbo", "iwae"] = "elbo"
    step: Literal["auto", "eager", "compile", "cuda-graph"] = "auto"
    max_time: Optional[float] = None
    checkpoint_every: int = 1
    optimizer: Part = Part("adam")
    lr_schedule: Part = Part("constant")
    clip_grad_norm: Optional[float] = None
    precision: Literal["fp32", "bf16"] = "fp32"
    log: Tuple[Literal["tensorboard", "mlflow"], ...] = ()
    nonfinite: Literal["raise", "skip"] = "raise"
    max_skipped_steps: int = 100
    check_every: Optional[int] = None
    restore_best: bool = True

    def __post_init__(self):
        from pvae.training.controls import SCHEDULES

        for name, registry in TRAINING_PARTS.items():
            object.__setattr__(self, name, registry.part(getattr(self, name)))
        if isinstance(self.patience, str) and self.patience.strip().lower() in ("off", "never"):
            object.__setattr__(self, "patience", None)
        for name, option in self.options().items():
            object.__setattr__(self, name, option.coerce(getattr(self, name), "training"))
        if self.patience == 0:  # pvae 0.1's spelling of "never stop early"
            object.__setattr__(self, "patience", None)
        for name in ("epochs", "batch_size", "val_num_samples", "checkpoint_every", "max_skipped_steps"):
            if getattr(self, name) < 1:
                raise UsageError(f"training: {name} must be a positive integer, got {getattr(self, name)!r}")
        if self.patience is not None and self.patience < 1:
            raise UsageError(f"training: patience must be a positive integer or null, got {self.patience!r}")
        if not self.lr > 0:
            raise UsageError(f"training: lr must be positive, got {self.lr!r}")
        if self.max_time is not None and not self.max_time > 0:
            raise UsageError(f"training: max_time must be a positive number of seconds or null, got {self.max_time!r}")
        if self.check_every is not None and self.check_every < 1:
            raise UsageError(f"training: check_every must be a positive integer or null, got {self.check_every!r}")
        if self.clip_grad_norm is not None and not self.clip_grad_norm > 0:
            raise UsageError(f"training: clip_grad_norm must be positive or null, got {self.clip_grad_norm!r}")
        SCHEDULES.build(self.lr_schedule, lr=self.lr, epochs=self.epochs)  # its checks
        options = dict(self.optimizer.kwargs)
        if not 0 <= options.get("momentum", 0.0) < 1 or not options.get("weight_decay", 0.0) >= 0:
            raise UsageError("training: the optimizer's momentum must be in [0, 1) and weight_decay >= 0")

    @classmethod
    def options(cls) -> Dict[str, Option]:
        """The settings that are not parts (each a flag ``--<name>``); the parts are
        :data:`~pvae.training.controls.TRAINING_PARTS`."""

        return {k: v for k, v in declared_options(cls).items() if k not in TRAINING_PARTS}

    @classmethod
    def parse(cls, value) -> "Training":
        """A Training from a mapping (a config's section; pvae 0.2's flat optimizer and schedule
        keys are moved into their parts)."""
        from pvae.training.controls import nest_legacy_training

        if isinstance(value, Training):
            return value
        if not isinstance(value, dict):
            raise UsageError(f"training must be a mapping of training options, got {value!r}")
        value = nest_legacy_training(value)
        valid = [*cls.options(), *TRAINING_PARTS]
        unknown = sorted(set(value) - set(valid))
        if unknown:
            raise UsageError(f"training does not take {', '.join(unknown)}; it takes {', '.join(valid)}")
        return cls(**value)

    def to_dict(self) -> dict:
        """Plain values (the config file's ``training`` section)."""

        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.to_dict() if f.name in TRAINING_PARTS else list(value) if isinstance(value, tuple) else value
        return out

    def replace(self, **changes) -> "Training":
        """A copy with ``changes`` (pvae 0.2's flat keys accepted); a part given as a mapping
        without ``"name"`` (or with the current one) changes options of the current part."""
        from pvae.training.controls import LEGACY_TRAINING_KEYS, nest_legacy_training

        current = self.to_dict()
        if any(k in changes for k in LEGACY_TRAINING_KEYS):  # they refer to the parts chosen now
            for field in TRAINING_PARTS:
                changes.setdefault(field, {"name": current[field]["name"]})
        changes = nest_legacy_training(changes)
        for field in TRAINING_PARTS:
            value = changes.get(field)
            if isinstance(value, Part):
                value = value.to_dict()
            if isinstance(value, dict) and value.get("name", current[field]["name"]) == current[field]["name"]:
                changes[field] = {**current[field], **value}
        return Training.parse({**current, **changes})




def _binarize_compat(value):
    """pvae 0.2.dev's file option ``binarize`` was a flag: configs saved then say true/false."""
    items = dict(value.kwargs, name=value.name) if isinstance(value, Part) else value
    if isinstance(items, dict) and isinstance(items.get("binarize"), bool):
        items = {**items, "binarize": "threshold" if items["binarize"] else "none"}
        return items
    return value


@dataclass(frozen=True)
class RunConfig:
    """One training run: ``model``, ``latent_dim``, one :class:`~pvae.options.Part` per section
    (``dataset`` — a registered name or ``Part("file", path=...)`` —, ``net``, ``prior``,
    ``guide``, ``likelihood``, ``objective``) and the :class:`Training` settings.

    A part may be given as a :class:`~pvae.options.Part`, a name (default options) or a
    mapping; a mapping without ``"name"`` keeps the section's default part::

        RunConfig(latent_dim=40, net={"hidden": (300, 300), "activation": "gated"},
                  prior=Part("vamp", pseudo_inputs=500), training={"epochs": 2000, "lr": 5e-4})

    The stored parts carry every option of the chosen part, defaults filled in.
    """

    dataset: Part = Part("digits")
    model: Part = Part("vae")
    latent_dim: int = 8
    net: Part = Part("mlp")
    prior: Part = Part("standard-normal")
    guide: Part = Part("diagonal")
    likelihood: Part = Part("bernoulli")
    objective: Part = Part("elbo-analytic-kl")
    training: Training = Training()

    def __post_init__(self):
        object.__setattr__(self, "latent_dim", _check_positive_int("latent_dim", self.latent_dim))
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for section, registry in PART_REGISTRIES.items():
            value = getattr(self, section)
            if isinstance(value, dict) and "name" not in value:
                value = {"name": defaults[section].name, **value}
            if section == "dataset":
                value = _binarize_compat(value)
            object.__setattr__(self, section, registry.part(value))
        if self.dataset.name == "file" and self.dataset["standardize"] == "auto":  # decided here, recorded
            table = Path(str(self.dataset["path"])).suffix.lower() in (".csv", ".tsv")
            mode = "on" if table and self.likelihood.name == "gaussian" else "off"
            object.__setattr__(self, "dataset", Part("file", **{**self.dataset.kwargs, "standardize": mode}))
        if self.model.name == "cvae" and self.model["condition"] != "label":  # a table's columns as the covariate
            columns = tuple(c.strip() for c in str(self.model["condition"]).split(",") if c.strip())
            if self.dataset.name != "file":
                raise UsageError(f"--condition {self.model['condition']} names columns of your own table (--data "
                                 "FILE.csv); a registered data set is conditioned on its labels (--condition label)")
            given = tuple(self.dataset["covariate_columns"])
            if given and given != columns:
                raise UsageError(f"--condition {','.join(columns)} and --dataset-covariate-columns {','.join(given)} "
                                 "disagree; give the columns once (--condition)")
            object.__setattr__(self, "dataset", Part("file", **{**self.dataset.kwargs, "covariate_columns": columns}))
        if self.dataset.name == "file" and self.dataset["path"]:  # a run names its file absolutely
            path = str(Path(self.dataset["path"]).expanduser().resolve())
            object.__setattr__(self, "dataset", Part("file", **{**self.dataset.kwargs, "path": path}))
        object.__setattr__(self, "training", Training.parse(self.training))
        self.build_objective()  # validates the values (beta >= 0, ...)
        if self.model.name == "autoencoder" and (self.guide.name, self.objective.name) != ("delta", "reconstruction"):
            raise UsageError(
                "model 'autoencoder' is the deterministic autoencoder: guide 'delta' with objective "
                f"'reconstruction' (got guide {self.guide.name!r}, objective {self.objective.name!r}); "
                "build it with pvae.autoencoder_config(...) or `pvae train --model autoencoder`"
            )
        NETS.build(self.net)  # the net's own checks (activation names, 'gated' only for mlp, ...)
        if self.net.name == "conv":
            if self.dataset.name != "file" and image_shape_of(self.dataset) is None:  # a file's is known once read
                raise UsageError(f"net 'conv' needs image data; data set {self.dataset.name!r} has no image shape")

    def build_objective(self):
        """The :class:`~pvae.objectives.Objective` this config trains with."""
        return OBJECTIVES.build(self.objective)

    @classmethod
    def from_dict(cls, values: dict) -> "RunConfig":
        """Build from a config mapping (a flat pvae 0.1 one is translated, :func:`translate_v1`),
        rejecting unknown keys with the list of valid ones."""
        values = dict(values)
        version = values.pop("version", None)
        if version is None:
            values = translate_v1(values)
        elif version != CONFIG_VERSION:
            raise UsageError(f"config version {version!r} is not known to this pvae (it reads 1 and {CONFIG_VERSION})")
        dataset = values.get("dataset")
        if isinstance(dataset, dict) and dataset.get("name") == "file" and "standardize" not in dataset:
            values["dataset"] = {**dataset, "standardize": "off"}  # (pvae 0.2 read tables as they are)
        keys = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(keys))
        if unknown:
            raise UsageError(f"unknown config key(s) {unknown}; valid keys: {', '.join(keys)}")
        return cls(**values)

    @classmethod
    def load(cls, path) -> "RunConfig":
        """Read a config file; a missing, unreadable or malformed file is a :class:`UsageError`."""
        try:
            with open(path) as fh:
                values = json.load(fh)
        except OSError as exc:
            raise UsageError(f"cannot read the config file {path}: {exc.strerror or exc}") from exc
        except json.JSONDecodeError as exc:
            raise UsageError(f"{path} is not valid JSON ({exc}); fix the file or write it anew") from exc
        if not isinstance(values, dict):
            raise UsageError(f"{path} must hold a JSON object of config keys, got {type(values).__name__}")
        return cls.from_dict(values)

    def to_dict(self) -> dict:
        training = self.training.to_dict()
        return {"version": CONFIG_VERSION, "latent_dim": self.latent_dim,
                **{section: getattr(self, section).to_dict() for section in PART_REGISTRIES},
                "training": training}

    def replace(self, **changes) -> "RunConfig":
        """A copy with ``changes``. A part given as a mapping without ``"name"`` (or with the
        current name) changes options of the current part; a new name starts from that part's
        defaults. ``training`` as a mapping changes only the settings it names."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for key, value in changes.items():
            if key not in out:
                raise UsageError(f"unknown config key {key!r}; valid keys: {', '.join(out)}")
            if key in PART_REGISTRIES and isinstance(value, dict) and value.get("name", out[key].name) == out[key].name:
                value = {**out[key].to_dict(), **value}
            elif key == "training" and isinstance(value, dict):
                value = self.training.replace(**value)
            out[key] = value
        return RunConfig(**out)


def section_options(section: str) -> Dict[str, Dict[str, Option]]:
    """``{part name: {option name: Option}}`` for a part section (``"prior"``, ...)."""
    registry = PART_REGISTRIES[section]
    return {name: registry.options(name) for name in registry.names()}


#: pvae 0.1's flat keys -> (section, option). A part option the chosen part does not take had
#: no effect in 0.1 and is dropped; the rest of the keys are top-level or training settings.
V1_PART_KEYS = {
    "hidden": ("net", "hidden"), "channels": ("net", "channels"), "activation": ("net", "activation"),
    "mog_components": ("prior", "num_components"), "vamp_pseudo_inputs": ("prior", "pseudo_inputs"),
    "num_flows": (("guide", "prior"), "num_flows"),
    "likelihood_scale": ("likelihood", "scale"), "gaussian_scale": ("likelihood", "scale_mode"),
    "num_particles": ("objective", "num_particles"), "beta": ("objective", "beta"),
    "kl_warmup": ("objective", "kl_warmup"), "kl_schedule": ("objective", "kl_schedule"),
    "dreg": ("objective", "dreg"), "info_alpha": ("objective", "info_alpha"),
    "mmd_lambda": ("objective", "mmd_lambda"), "free_bits": ("objective", "free_bits"),
}


#: the part names pvae 0.1 used when a key was missing (frozen: later defaults may differ)
V1_DEFAULT_PARTS = {"model": "vae", "dataset": "digits", "net": "mlp", "prior": "standard-normal", "guide": "diagonal",
                    "likelihood": "bernoulli", "objective": "elbo"}


def translate_v1(flat: dict) -> dict:
    """A pvae 0.1 flat config (``{"prior": "vamp", "vamp_pseudo_inputs": 500, "beta": 1.0, ...}``)
    as a version-2 mapping. ``learn_scale`` (before ``gaussian_scale``) is translated too."""
    flat = dict(flat)
    if "learn_scale" in flat:
        mode = "global" if flat.pop("learn_scale") else "fixed"
        if flat.get("gaussian_scale", mode) != mode:
            raise UsageError("config has both legacy key 'learn_scale' and 'gaussian_scale', and they disagree")
        flat["gaussian_scale"] = mode
    out: Dict[str, Any] = {}
    names = {section: flat.pop(section, V1_DEFAULT_PARTS[section]) for section in PART_REGISTRIES}
    for section, registry in PART_REGISTRIES.items():
        if not isinstance(names[section], str):
            raise UsageError(f"a version-1 config names its {section} with a string, got {names[section]!r}")
        registry.get(names[section])
        out[section] = {"name": names[section]}
    for key, (sections, option) in V1_PART_KEYS.items():
        if key not in flat:
            continue
        value = flat.pop(key)
        for section in (sections,) if isinstance(sections, str) else sections:
            if option in PART_REGISTRIES[section].options(names[section]):
                out[section][option] = value
    training_keys = set(Training.options())
    training = {k: flat.pop(k) for k in list(flat) if k in training_keys}
    out["training"] = training
    out.update(flat)  # top-level keys (and unknown ones, which from_dict reports)
    return out


#: the autoencoder's reconstruction losses: loss name -> likelihood. Squared error is the
#: Gaussian negative log-likelihood with sigma = 1/sqrt(2) (up to a constant).
AUTOENCODER_LOSSES = {
    "bce": Part("bernoulli"),
    "mse": Part("gaussian", scale=1 / math.sqrt(2), scale_mode="fixed"),
}


def autoencoder_settings(loss: str = "bce") -> dict:
    """The config fields that make a run the plain deterministic autoencoder."""
    if loss not in AUTOENCODER_LOSSES:
        raise UsageError(f"unknown autoencoder loss {loss!r}; valid choices: {', '.join(AUTOENCODER_LOSSES)}")
    return {"model": "autoencoder", "guide": Part("delta"), "objective": Part("reconstruction"),
            "likelihood": AUTOENCODER_LOSSES[loss]}


def autoencoder_config(
    code_size: int = 8, layers: int = 2, units: int = 256, loss: str = "bce", **kwargs
) -> RunConfig:
    """The plain autoencoder with its four knobs by name: size of the middle (code) layer,
    number of hidden layers (in the encoder; the decoder mirrors it), units per layer, and the
    reconstruction loss (``"bce"`` binary cross-entropy or ``"mse"`` squared error). Other
    :class:`RunConfig` fields pass through ``kwargs`` (``net`` options merge with the widths)."""
    net = {"hidden": (units,) * layers, **kwargs.pop("net", {})}
    return RunConfig(latent_dim=code_size, net=net, **autoencoder_settings(loss), **kwargs)


def build_vae(config: RunConfig, data_dim: int, image_shape: Optional[Sequence[int]] = None) -> VAE:
    """Compose the VAE described by ``config`` for data of ``data_dim`` dimensions
    (``image_shape`` defaults to the registered data set's, for convolutional nets)."""
    if image_shape is None:
        image_shape = image_shape_of(config.dataset)
    nets = NETS.build(config.net)
    likelihood = LIKELIHOODS.build(config.likelihood, data_dim=data_dim)
    decoder = nets.decoder(config.latent_dim, likelihood, image_shape)
    guide = GUIDES.build(config.guide, data_dim=data_dim, latent_dim=config.latent_dim,
                         encoder=nets.encoder(data_dim, image_shape))
    prior = PRIORS.build(config.prior, latent_dim=config.latent_dim, guide=guide)
    return VAE(prior, decoder, likelihood, guide)


def save_config(config: RunConfig, run_dir) -> None:
    """Write ``config`` as ``run_dir/config.json`` (atomically)."""
    from pvae.checkpoint import write_json

    write_json(config.to_dict(), Path(run_dir) / "config.json")
