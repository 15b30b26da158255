"""Frozen run configurations and the model builder.

A :class:`RunConfig` holds everything needed to rebuild a model and repeat its training; it
is saved as ``config.json`` in each run directory. :meth:`RunConfig.from_dict` rejects
unknown keys and unknown component names with the list of valid choices.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Tuple

from .data import DATASETS, image_shape_of
from .errors import UsageError
from .guides import GUIDES
from .likelihoods import LIKELIHOODS
from .model import VAE
from .nets import ACTIVATIONS, MLP, ConvDecoder, ConvEncoder
from .objectives import OBJECTIVE_OPTIONS, OBJECTIVES, make_objective
from .priors import PRIORS
from .registry import Registry

MODELS = ("vae", "autoencoder")
NETS: Registry = Registry("net")


@NETS.register("mlp")
class _MLPNets:
    """Encoder MLP with the config's widths; the decoder mirrors them."""

    @staticmethod
    def encoder(config, data_dim, image_shape):
        return lambda n_out: MLP(data_dim, n_out, config.hidden, config.activation)

    @staticmethod
    def decoder(config, likelihood, image_shape):
        return MLP(config.latent_dim, likelihood.param_dim, config.hidden[::-1], config.activation)


@NETS.register("conv")
class _ConvNets:
    """Two stride-2 convolutions (``channels``) and a transposed mirror; image shape from the
    data set."""

    @staticmethod
    def encoder(config, data_dim, image_shape):
        return lambda n_out: ConvEncoder(image_shape, n_out, config.channels, config.activation)

    @staticmethod
    def decoder(config, likelihood, image_shape):
        return ConvDecoder(config.latent_dim, image_shape, config.channels[::-1], config.activation,
                           params_per_pixel=likelihood.params_per_dim)


#: config keys of earlier versions -> function giving (current key, value). ``learn_scale``
#: (pvae 0.1's Gaussian likelihood switch) became ``gaussian_scale``.
LEGACY_KEYS = {
    "learn_scale": lambda learned: ("gaussian_scale", "global" if learned else "fixed"),
}


@dataclass(frozen=True)
class RunConfig:
    """One training run.

    Model: ``model`` (``"vae"`` or ``"autoencoder"``, see :func:`autoencoder_config`),
    ``latent_dim`` (code size), ``net`` (``"mlp"`` or ``"conv"``), ``hidden`` (MLP encoder
    widths; the decoder mirrors them), ``channels`` (conv channels), ``activation``,
    ``prior``, ``guide``, ``likelihood``; part options ``likelihood_scale`` and
    ``gaussian_scale`` (``"fixed"``, ``"global"``, ``"per-dim"``), ``num_flows`` (flow guides
    and prior), ``mog_components``, ``vamp_pseudo_inputs``. Training: ``dataset``,
    ``objective``, ``num_particles`` (K for ``"iwae"``), the objective's options ``beta``,
    ``kl_warmup`` (epochs), ``kl_schedule``, ``dreg``, ``info_alpha``, ``mmd_lambda``, ``free_bits`` (see
    :func:`pvae.objectives.make_objective`; an option the objective does not take must keep
    its default), ``epochs``, ``batch_size``, ``lr``, ``patience``,
    ``seed``, ``device``, ``val_num_samples``, ``step`` (the training step's mode, see
    :class:`pvae.train.TrainStep`), ``max_time`` (seconds for one ``pvae train`` call; the run
    resumes with ``--resume``), ``checkpoint_every`` (epochs). ``epochs``, ``step``, ``max_time``,
    ``checkpoint_every`` and ``device`` may change when
    a run is resumed (on another device the random draws differ from an uninterrupted run).
    """

    dataset: str = "digits"
    model: str = "vae"
    latent_dim: int = 8
    net: str = "mlp"
    hidden: Tuple[int, ...] = (256, 256)
    channels: Tuple[int, ...] = (32, 64)
    activation: str = "softplus"
    prior: str = "standard-normal"
    guide: str = "diagonal"
    likelihood: str = "bernoulli"
    likelihood_scale: float = 1.0
    gaussian_scale: str = "fixed"
    num_flows: int = 2
    mog_components: int = 10
    vamp_pseudo_inputs: int = 50
    objective: str = "elbo"
    num_particles: int = 1
    beta: float = 1.0
    kl_warmup: float = 0.0
    kl_schedule: str = "linear"
    dreg: bool = False
    info_alpha: float = 0.0
    mmd_lambda: float = 1000.0
    free_bits: float = 0.0
    epochs: int = 600
    batch_size: int = 100
    lr: float = 1e-3
    patience: Optional[int] = 30
    seed: int = 0
    device: str = "cpu"
    val_num_samples: int = 1
    step: str = "auto"
    max_time: Optional[float] = None
    checkpoint_every: int = 1

    def __post_init__(self):
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        for registry, value in (
            (DATASETS, self.dataset),
            (NETS, self.net),
            (PRIORS, self.prior),
            (GUIDES, self.guide),
            (LIKELIHOODS, self.likelihood),
            (ACTIVATIONS, self.activation),
            (OBJECTIVES, self.objective),
        ):
            registry.get(value)  # raises with the valid choices
        make_objective(self.objective, self.num_particles, **self.objective_options())  # validates
        if self.model not in MODELS:
            raise UsageError(f"unknown model {self.model!r}; valid choices: {', '.join(MODELS)}")
        if self.model == "autoencoder" and (self.guide, self.objective) != ("delta", "reconstruction"):
            raise UsageError(
                "model 'autoencoder' is the deterministic autoencoder: guide 'delta' with objective "
                f"'reconstruction' (got guide {self.guide!r}, objective {self.objective!r}); "
                "build it with pvae.autoencoder_config(...) or `pvae train --model autoencoder`"
            )
        for name in ("latent_dim", "num_particles", "epochs", "batch_size", "val_num_samples",
                     "num_flows", "mog_components", "vamp_pseudo_inputs", "checkpoint_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or int(value) != value or value < 1:
                raise UsageError(f"{name} must be a positive integer, got {value!r}")
        if any(h < 1 for h in self.hidden) or any(c < 1 for c in self.channels) or not self.channels:
            raise UsageError(f"hidden widths and channels must be positive, got {self.hidden}, {self.channels}")
        if self.patience is not None and self.patience < 1:
            raise UsageError(f"patience must be a positive integer or null, got {self.patience!r}")
        if not self.lr > 0:
            raise UsageError(f"lr must be positive, got {self.lr!r}")
        if self.step not in ("auto", "eager", "compile", "cuda-graph"):
            raise UsageError(f"unknown step mode {self.step!r}; valid choices: auto, eager, compile, cuda-graph")
        if self.max_time is not None and not (isinstance(self.max_time, (int, float)) and self.max_time > 0):
            raise UsageError(f"max_time must be a positive number of seconds or null, got {self.max_time!r}")
        if self.net == "conv" and self.activation == "gated":
            raise UsageError("activation 'gated' (a gated dense layer) is for net 'mlp'; pick an elementwise "
                             "activation for net 'conv'")
        if self.net == "conv" and image_shape_of(self.dataset) is None:
            raise UsageError(f"net 'conv' needs image data; data set {self.dataset!r} has no image shape")

    def objective_options(self) -> dict:
        return {name: getattr(self, name) for name in OBJECTIVE_OPTIONS}

    def build_objective(self):
        """The :class:`~pvae.objectives.Objective` this config trains with."""
        return make_objective(self.objective, self.num_particles, **self.objective_options())

    @classmethod
    def field_names(cls) -> list:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: dict) -> "RunConfig":
        """Build from a dict, rejecting unknown keys (listing the valid ones). Keys written by
        earlier pvae versions are translated (:data:`LEGACY_KEYS`)."""
        values = dict(values)
        for old, translate in LEGACY_KEYS.items():
            if old in values:
                new, value = translate(values.pop(old))
                if new in values and values[new] != value:
                    raise UsageError(f"config has both legacy key {old!r} and {new!r}, and they disagree")
                values[new] = value
        unknown = sorted(set(values) - set(cls.field_names()))
        if unknown:
            raise UsageError(
                f"unknown config key(s) {unknown}; valid keys: {', '.join(cls.field_names())}"
            )
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
        out = dataclasses.asdict(self)
        out["hidden"] = list(self.hidden)
        out["channels"] = list(self.channels)
        return out

    def replace(self, **changes) -> "RunConfig":
        return self.from_dict({**self.to_dict(), **changes})


#: the autoencoder's reconstruction losses: loss name -> likelihood settings. Squared error is
#: the Gaussian negative log-likelihood with sigma = 1/sqrt(2) (up to a constant).
AUTOENCODER_LOSSES = {
    "bce": {"likelihood": "bernoulli"},
    "mse": {"likelihood": "gaussian", "likelihood_scale": 1 / math.sqrt(2), "gaussian_scale": "fixed"},
}


def autoencoder_settings(loss: str = "bce") -> dict:
    """The config fields that make a run the plain deterministic autoencoder."""
    if loss not in AUTOENCODER_LOSSES:
        raise UsageError(f"unknown autoencoder loss {loss!r}; valid choices: {', '.join(AUTOENCODER_LOSSES)}")
    return {"model": "autoencoder", "guide": "delta", "objective": "reconstruction", **AUTOENCODER_LOSSES[loss]}


def autoencoder_config(
    code_size: int = 8, layers: int = 2, units: int = 256, loss: str = "bce", **kwargs
) -> RunConfig:
    """The plain autoencoder with its four knobs by name: size of the middle (code) layer,
    number of hidden layers (in the encoder; the decoder mirrors it), units per layer, and the
    reconstruction loss (``"bce"`` binary cross-entropy or ``"mse"`` squared error). Other
    :class:`RunConfig` fields pass through ``kwargs``."""
    return RunConfig(latent_dim=code_size, hidden=(units,) * layers, **autoencoder_settings(loss), **kwargs)


def build_vae(config: RunConfig, data_dim: int, image_shape: Optional[Sequence[int]] = None) -> VAE:
    """Compose the VAE described by ``config`` for data of ``data_dim`` dimensions
    (``image_shape`` defaults to the registered data set's, for convolutional nets)."""
    if image_shape is None:
        image_shape = image_shape_of(config.dataset)
    nets = NETS.get(config.net)
    likelihood = LIKELIHOODS.get(config.likelihood).from_config(data_dim, config)
    decoder = nets.decoder(config, likelihood, image_shape)
    guide = GUIDES.get(config.guide).from_config(data_dim, config, nets.encoder(config, data_dim, image_shape))
    prior = PRIORS.get(config.prior).from_config(config, guide)
    return VAE(prior, decoder, likelihood, guide)


def save_config(config: RunConfig, run_dir) -> None:
    from .checkpoint import write_json

    write_json(config.to_dict(), Path(run_dir) / "config.json")
