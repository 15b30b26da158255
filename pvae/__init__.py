"""pvae: auto-encoding variational Bayes as Pyro model/guide pairs.

Compose a model from parts, train it with a Pyro ELBO, evaluate it honestly (every number is
derived from the model and guide programs by :func:`pvae.engine.log_weights`)::

    from pvae import VAE, MLP, StandardNormalPrior, BernoulliLikelihood, DiagonalGaussianGuide
    from pvae import fit, load_dataset, evaluate_bounds

    data = load_dataset("digits")
    D, L = data.data_dim, 8
    vae = VAE(StandardNormalPrior(L), MLP(L, D, (256, 256)), BernoulliLikelihood(D),
              DiagonalGaussianGuide(D, L, (256, 256)))
    history = fit(vae, data.train, data.valid, epochs=50)
    bounds = evaluate_bounds(vae, data.test, num_samples=1000)
"""

__version__ = "0.1.0"

from .config import RunConfig, autoencoder_config, build_vae
from .data import DATASETS, Dataset, data_dir, load_dataset
from .diagnostics import (
    active_units,
    importance_diagnostics,
    inference_gaps,
    kl_per_dimension,
    latent_diagnostics,
    psis_khat,
    to_inference_data,
)
from .engine import ModelGuidePair, WeightedSamples, log_weights
from .errors import DivergenceError, NotARunError, RunExistsError, UsageError, UsageTypeError
from .estimators import (
    Estimate,
    elbo,
    evaluate_bounds,
    iwae_bound,
    log_importance_weights,
    naive_prior_estimate,
    reconstruction_error,
)
from .guides import GUIDES, DiagonalGaussianGuide, Guide, NonAmortizedGuide
from .likelihoods import (
    LIKELIHOODS,
    BernoulliLikelihood,
    GaussianLikelihood,
    Likelihood,
)
from .model import DATA_PLATE, LATENT_SITE, OBSERVED_SITE, VAE
from .nets import ACTIVATIONS, MLP
from .objectives import (
    OBJECTIVES,
    ElboObjective,
    FreeBitsObjective,
    InfoVAEObjective,
    IWAEObjective,
    KLSchedule,
    Objective,
    make_objective,
)
from .priors import PRIORS, Prior, StandardNormalPrior
from .runs import evaluate_run, load_run, train_run
from .train import History, TrainStep, fit

__all__ = [
    "ACTIVATIONS", "BernoulliLikelihood", "DATASETS", "DATA_PLATE", "Dataset",
    "DiagonalGaussianGuide", "Estimate", "NonAmortizedGuide", "GUIDES", "GaussianLikelihood", "Guide", "History",
    "LATENT_SITE", "LIKELIHOODS", "Likelihood", "MLP", "OBJECTIVES", "OBSERVED_SITE",
    "Objective", "ElboObjective", "FreeBitsObjective", "IWAEObjective", "InfoVAEObjective", "KLSchedule", "PRIORS", "Prior", "RunConfig", "StandardNormalPrior", "VAE", "build_vae",
    "data_dir", "elbo", "evaluate_bounds", "evaluate_run", "fit", "iwae_bound",
    "load_dataset", "load_run", "log_importance_weights", "make_objective", "naive_prior_estimate",
    "train_run", "autoencoder_config", "reconstruction_error", "active_units",
    "importance_diagnostics", "kl_per_dimension", "psis_khat", "to_inference_data", "inference_gaps",
    "latent_diagnostics", "ModelGuidePair", "WeightedSamples", "log_weights", "TrainStep",
    "UsageError", "UsageTypeError", "DivergenceError", "RunExistsError", "NotARunError",
]
