"""pvae: auto-encoding variational Bayes as Pyro model/guide pairs.

Compose a model from parts (:mod:`pvae.parts`), train it with a Pyro ELBO or another objective, evaluate it honestly (every number is
derived from the model and guide programs by :func:`pvae.log_weights`)::

    from pvae import VAE, MLP, StandardNormalPrior, BernoulliLikelihood, DiagonalGaussianGuide
    from pvae import fit, load_dataset, evaluate_bounds

    data = load_dataset("digits")
    D, L = data.data_dim, 8
    vae = VAE(StandardNormalPrior(L), MLP(L, D, (256, 256)), BernoulliLikelihood(D),
              DiagonalGaussianGuide(D, L, (256, 256)))
    history = fit(vae, data.train, data.valid, epochs=50)
    bounds = evaluate_bounds(vae, data.test, num_samples=1000)
"""

__version__ = "0.2.0.dev0"

import warnings as _warnings

with _warnings.catch_warnings():
    # Pyro's MCMC logger imports tqdm.auto when pyro is imported, which in a notebook without
    # ipywidgets warns (naming the site-packages path) though nothing of pvae uses that bar: pvae
    # picks its own bars (pvae._progress), so the warning says nothing a pvae user can act on.
    _warnings.filterwarnings("ignore", message="IProgress not found")
    import pyro  # noqa: F401

from pvae import data, families, inference, parts, pretrained, training
from pvae.inference import estimators
from pvae.inference.annealing import BDMCBounds, ais, bdmc
from pvae.config import CONFIG_VERSION, RunConfig, Training, autoencoder_config, build_vae
from pvae.data import DATASETS, Dataset, data_dir, load_dataset
from pvae.inference.diagnostics import (
    active_units,
    importance_diagnostics,
    inference_gaps,
    kl_per_dimension,
    latent_diagnostics,
    psis_khat,
    to_inference_data,
)
from pvae.inference.engine import ModelGuidePair, WeightedSamples, WithCovariates, log_weights
from pvae.errors import DiskFullError, DivergenceError, NotARunError, RunExistsError, UsageError, UsageTypeError
from pvae.inference.estimators import (
    Estimate,
    bounds_by_k,
    elbo,
    evaluate_bounds,
    iwae_bound,
    log_importance_weights,
    naive_prior_estimate,
    reconstruction_error,
)
from pvae.model import DATA_PLATE, LATENT_SITE, OBSERVED_SITE, VAE
from pvae.parts import *  # noqa: F401,F403  (every registered part, its registry, Part and Option)
from pvae.runs import REPORT_VERSION, EvaluationReport, Run, evaluate_run, load_run, train_run
from pvae.inference.annealing import AISSettings
from pvae.inference.evaluation import EvaluationSpec, evaluate
from pvae.inference.paired import PairedDifference, paired_difference
from pvae.training.callbacks import Callback
from pvae.training.loop import History, TrainStep, fit
from pvae.families import build_program

# The public API: what a notebook needs to build, train and evaluate a model. Every other name
# imported above stays importable (``from pvae import Run`` keeps working) and is public in the
# ``__all__`` of the module it lives in (:mod:`pvae.parts.guides`, :mod:`pvae.inference.engine`, ...).
__all__ = [
    # subpackages and modules
    "data", "families", "inference", "parts", "plots", "pretrained", "training",
    # building a model
    "VAE", "build_vae", "build_program", "autoencoder_config", "Part",
    "PRIORS", "GUIDES", "LIKELIHOODS", "NETS", "OBJECTIVES",
    "MLP", "StandardNormalPrior", "DiagonalGaussianGuide", "BernoulliLikelihood",
    # training
    "fit", "Training", "Callback", "make_objective", "History",
    # evaluation
    "evaluate", "EvaluationSpec", "AISSettings", "evaluate_bounds", "bounds_by_k", "elbo", "iwae_bound", "naive_prior_estimate", "reconstruction_error",
    "ais", "bdmc", "paired_difference", "PairedDifference",
    "importance_diagnostics", "to_inference_data", "active_units", "kl_per_dimension",
    # model/guide programs of the user's own
    "ModelGuidePair", "WithCovariates", "log_weights",
    # data
    "load_dataset", "Dataset",
    # run directories
    "RunConfig", "train_run", "load_run", "evaluate_run",
    # errors
    "UsageError",
]


# Old module paths keep working: ``import pvae.engine`` and ``from pvae.train import fit`` give
# the modules that moved into the subpackages (the same module objects, so a monkeypatch of the old
# name reaches the code).
_MOVED = {
    "priors": "pvae.parts.priors", "guides": "pvae.parts.guides", "likelihoods": "pvae.parts.likelihoods",
    "nets": "pvae.parts.nets",
    "engine": "pvae.inference.engine", "estimators": "pvae.inference.estimators",
    "annealing": "pvae.inference.annealing", "diagnostics": "pvae.inference.diagnostics",
    "train": "pvae.training.loop", "objectives": "pvae.training.objectives", "controls": "pvae.training.controls",
    "tracking": "pvae.training.tracking",
    "files": "pvae.data.files", "streaming": "pvae.data.streaming",
}


def _alias_moved_modules():
    import importlib
    import sys

    for old, new in _MOVED.items():
        module = importlib.import_module(new)
        sys.modules[f"{__name__}.{old}"] = module
        globals()[old] = module


_alias_moved_modules()


def __getattr__(name):
    """``pvae.plots`` is imported on first use: matplotlib adds about 0.3 s to ``import pvae``."""
    if name == "plots":
        import importlib

        return importlib.import_module(".plots", __name__)
    raise AttributeError(f"module 'pvae' has no attribute {name!r}")
