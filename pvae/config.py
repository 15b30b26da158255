"""Frozen run configurations and the model builder.

A :class:`RunConfig` holds everything needed to rebuild a model and repeat its training; it
is saved as ``config.json`` in each run directory. :meth:`RunConfig.from_dict` rejects
unknown keys and unknown component names with the list of valid choices.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

from .data import DATASETS
from .guides import GUIDES
from .likelihoods import LIKELIHOODS
from .model import VAE
from .nets import ACTIVATIONS, MLP
from .objectives import OBJECTIVES
from .priors import PRIORS


@dataclass(frozen=True)
class RunConfig:
    """One training run.

    Model: ``latent_dim``, ``hidden`` (encoder widths; the decoder mirrors them),
    ``activation``, ``prior``, ``guide``, ``likelihood``, ``likelihood_scale`` and
    ``learn_scale`` (Gaussian likelihood). Training: ``dataset``, ``objective``,
    ``num_particles``, ``epochs``, ``batch_size``, ``lr``, ``patience``, ``seed``, ``device``,
    ``val_num_samples``.
    """

    dataset: str = "digits"
    latent_dim: int = 8
    hidden: Tuple[int, ...] = (256, 256)
    activation: str = "softplus"
    prior: str = "standard-normal"
    guide: str = "diagonal"
    likelihood: str = "bernoulli"
    likelihood_scale: float = 1.0
    learn_scale: bool = False
    objective: str = "elbo"
    num_particles: int = 1
    epochs: int = 600
    batch_size: int = 100
    lr: float = 1e-3
    patience: Optional[int] = 30
    seed: int = 0
    device: str = "cpu"
    val_num_samples: int = 1

    def __post_init__(self):
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        for registry, value in (
            (DATASETS, self.dataset),
            (PRIORS, self.prior),
            (GUIDES, self.guide),
            (LIKELIHOODS, self.likelihood),
            (ACTIVATIONS, self.activation),
            (OBJECTIVES, self.objective),
        ):
            registry.get(value)  # raises with the valid choices
        for name in ("latent_dim", "num_particles", "epochs", "batch_size", "val_num_samples"):
            value = getattr(self, name)
            if isinstance(value, bool) or int(value) != value or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if any(h < 1 for h in self.hidden):
            raise ValueError(f"hidden widths must be positive, got {self.hidden}")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"patience must be a positive integer or null, got {self.patience!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}")

    @classmethod
    def field_names(cls) -> list:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: dict) -> "RunConfig":
        """Build from a dict, rejecting unknown keys (listing the valid ones)."""
        unknown = sorted(set(values) - set(cls.field_names()))
        if unknown:
            raise ValueError(
                f"unknown config key(s) {unknown}; valid keys: {', '.join(cls.field_names())}"
            )
        return cls(**values)

    @classmethod
    def load(cls, path) -> "RunConfig":
        with open(path) as fh:
            return cls.from_dict(json.load(fh))

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["hidden"] = list(self.hidden)
        return out

    def replace(self, **changes) -> "RunConfig":
        return self.from_dict({**self.to_dict(), **changes})


def build_vae(config: RunConfig, data_dim: int) -> VAE:
    """Compose the VAE described by ``config`` for data of ``data_dim`` dimensions.

    The decoder is an MLP mirroring the encoder's widths (``hidden`` reversed).
    """
    prior = PRIORS.get(config.prior)(config.latent_dim)
    likelihood = LIKELIHOODS.get(config.likelihood).from_config(data_dim, config)
    decoder = MLP(config.latent_dim, likelihood.param_dim, config.hidden[::-1], config.activation)
    guide = GUIDES.get(config.guide)(data_dim, config.latent_dim, config.hidden, config.activation)
    return VAE(prior, decoder, likelihood, guide)


def save_config(config: RunConfig, run_dir) -> None:
    from .checkpoint import write_json

    write_json(config.to_dict(), Path(run_dir) / "config.json")
