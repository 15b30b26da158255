"""Run directories: train a :class:`~pvae.config.RunConfig` into a folder, load it back,
evaluate it.

A run directory holds ``config.json`` (enough to rebuild the model), ``env.json`` (versions,
seed, device), ``metrics.jsonl`` (one line per epoch), ``checkpoint.pt`` (model, optimizer
and RNG state; best-validation weights) and PNG figures. Evaluation reports are written as
``evaluation-<split>-K<K>.json``; evaluation never changes the checkpoint.
"""

from __future__ import annotations

import json
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Optional, Sequence, Tuple

import torch

from ._rng import seeded
from .ais import ais
from .checkpoint import load_checkpoint, run_lock, write_json
from .config import RunConfig, build_vae, save_config
from .data import Dataset, load_dataset
from .diagnostics import importance_diagnostics, latent_diagnostics
from .errors import NotARunError, RunExistsError, UsageError
from .estimators import (
    DEFAULT_CHUNK_SIZE,
    auto_chunk_size,
    evaluate_bounds,
    naive_prior_estimate,
    reconstruction_error,
)
from .model import VAE
from .train import CHECKPOINT_FILE, History, check_objective, fit

CONFIG_FILE = "config.json"
ENV_FILE = "env.json"
#: which data a run was trained on: the registry name or "passed in Python", and a fingerprint
DATA_FILE = "data.json"
FIGURES = ("elbo_curves.png", "reconstructions.png", "samples.png", "latent.png")


def resolve_device(name: str) -> torch.device:
    """Turn a device name into a :class:`torch.device`, failing clearly if it is absent."""
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise UsageError(f"unknown device {name!r}; use 'cpu', 'cuda' or 'cuda:N'") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(
            f"device {name!r} was requested but CUDA is not available on this machine "
            "(torch.cuda.is_available() is False); use --device cpu"
        )
    return device


def environment(config: RunConfig, device: torch.device) -> dict:
    """Versions and machine facts recorded with a run."""
    import numpy
    import pyro

    from . import __version__

    env = {
        "pvae": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "numpy": numpy.__version__,
        "seed": config.seed,
        "device": str(device),
        "torch_num_threads": torch.get_num_threads(),
        "argv": sys.argv,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if device.type == "cuda":
        env["cuda_device"] = torch.cuda.get_device_name(device)
        env["cuda_version"] = torch.version.cuda
    return env


def train_run(
    config: RunConfig,
    run_dir,
    resume: bool = False,
    progress: bool = True,
    dataset: Optional[Dataset] = None,
) -> Tuple[VAE, History]:
    """Train ``config`` into ``run_dir`` and write its figures.

    Everything that can be checked (data set, names, device, data vs likelihood) is checked
    before anything is written. An existing run directory is only continued with
    ``resume=True`` and the same config.
    """
    run_dir = Path(run_dir)
    device = resolve_device(config.device)
    data = dataset if dataset is not None else load_dataset(config.dataset)
    with seeded(config.seed):  # initial weights are a function of the config's seed
        vae = build_vae(config, data.data_dim)
    vae.check_data(data.train, f"{config.dataset} training data")
    vae.check_data(data.valid, f"{config.dataset} validation data")
    objective = config.build_objective()
    check_objective(objective, vae, data.train, config.batch_size)
    with run_lock(run_dir):  # a second process training into run_dir is refused
        config_path = run_dir / CONFIG_FILE
        if config_path.exists():
            if not resume:
                raise RunExistsError(
                    f"{run_dir} already holds a run; pass --resume to continue it or choose a "
                    "new --run-dir (nothing was overwritten)"
                )
            saved = RunConfig.load(config_path)
            # how long and where the steps run may change; what is trained may not
            if saved.replace(**{k: getattr(config, k) for k in RESUMABLE_CHANGES}) != config:
                raise UsageError(
                    f"cannot resume {run_dir}: its config.json differs from this config in "
                    + ", ".join(
                        k for k in config.field_names()
                        if k not in RESUMABLE_CHANGES and getattr(saved, k) != getattr(config, k)
                    )
                )
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir)
        write_json(environment(config, device), run_dir / ENV_FILE)
        write_json({"name": data.name, "source": "registry" if dataset is None else "python",
                    "fingerprint": data.fingerprint()}, run_dir / DATA_FILE)
        history = fit(
            vae,
            data.train,
            data.valid,
            epochs=config.epochs,
            batch_size=config.batch_size,
            lr=config.lr,
            objective=objective,
            patience=config.patience,
            seed=config.seed,
            device=device,
            run_dir=run_dir,
            resume=resume,
            val_num_samples=config.val_num_samples,
            progress=progress,
            step=config.step,
            max_time=config.max_time,
            checkpoint_every=config.checkpoint_every,
        )
        write_figures(vae, data, history, run_dir)
    return vae, history


#: config fields a resumed run may change
RESUMABLE_CHANGES = ("epochs", "step", "max_time", "checkpoint_every", "device")


def write_figures(vae: VAE, data: Dataset, history: History, run_dir) -> None:
    """ELBO curves, reconstructions, samples and a latent scatter of the validation split."""
    from . import plots

    run_dir = Path(run_dir)
    figures = {"elbo_curves.png": plots.elbo_curves(history.records)}
    valid = data.valid.to(vae.device)
    if data.image_shape is not None:
        figures["reconstructions.png"] = plots.reconstructions(vae, valid, data.image_shape)
        figures["samples.png"] = plots.samples(vae, data.image_shape)
    figures["latent.png"] = plots.latent_scatter(vae.encode(valid), data.split_labels("valid"))
    for name, fig in figures.items():
        fig.savefig(run_dir / name, dpi=100)


def load_run(run_dir, device: str = "cpu", best: bool = True) -> Tuple[RunConfig, VAE]:
    """Rebuild the model of a run directory from ``config.json`` and ``checkpoint.pt``.

    :param bool best: load the best-validation weights (else the last epoch's).
    """
    run_dir = Path(run_dir)
    for name in (CONFIG_FILE, CHECKPOINT_FILE):
        if not (run_dir / name).exists():
            raise NotARunError(f"{run_dir} is not a pvae run directory: {name} is missing")
    config = RunConfig.load(run_dir / CONFIG_FILE)
    ckpt = load_checkpoint(run_dir / CHECKPOINT_FILE)
    state = ckpt["best_model"] if best and ckpt.get("best_model") is not None else ckpt["model"]
    vae = build_vae(config, ckpt["fit"]["data_dim"])
    vae.load_state_dict(state)
    vae.to(resolve_device(device))
    vae.eval()
    return config, vae


def _evaluation_data(run_dir: Path, config: RunConfig, dataset: Optional[Dataset]):
    """The data to evaluate on and a note for the report (see :func:`evaluate_run`)."""
    record = json.loads((run_dir / DATA_FILE).read_text()) if (run_dir / DATA_FILE).exists() else None
    from_registry = dataset is None
    if from_registry:
        dataset = load_dataset(config.dataset)
    fingerprint = dataset.fingerprint()
    if from_registry and record is not None and fingerprint != record["fingerprint"]:
        if record.get("source") == "python":
            raise UsageError(
                f"{run_dir} was trained on data passed in Python (data set {record['name']!r}) that differ from "
                f"the registry data set {config.dataset!r}; pass the same data: evaluate_run(..., dataset=...)"
            )
        raise UsageError(
            f"the registry data set {dataset.name!r} differs from the data {run_dir} was trained on "
            f"(fingerprint {fingerprint[:12]} vs {record['fingerprint'][:12]}); the cache holds other files"
        )
    same = None if record is None else fingerprint == record["fingerprint"]
    return dataset, {"name": dataset.name, "fingerprint": fingerprint, "training_data": same}


ESTIMATORS = ("elbo", "iwae", "naive", "ais")
#: fewest draws per datapoint for which evaluate_run fits PSIS k-hat (the Pareto tail then has
#: min(K/5, 3 sqrt(K)) >= 20 draws)
PSIS_MIN_SAMPLES = 100


def evaluate_run(
    run_dir,
    split: str = "test",
    num_samples: int = 1000,
    batch_size: int = 100,
    chunk_size: Optional[int] = DEFAULT_CHUNK_SIZE,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
    write: bool = True,
    estimators: Sequence[str] = ("elbo", "iwae"),
    num_chains: int = 16,
    ais_steps: int = 100,
    ais_start: str = "prior",
    ais_schedule: str = "sigmoid",
    psis_datapoints: int = 500,
    dataset: Optional[Dataset] = None,
) -> dict:
    """Evaluate a run on a split of its data set; the run's files are only read.

    The data: ``dataset`` if given (the report records whether it is the data the run was
    trained on), else the registry data set named in the config — which must be the data the
    run saw: a run trained on data passed in Python (``train_run(dataset=...)``) is refused
    without ``dataset``, and registry data that changed since training is an error.

    ``estimators`` (any of :data:`ESTIMATORS`): ``"elbo"`` and ``"iwae"`` (the ELBO and the
    importance-weighted bound :math:`\\mathcal{L}_K` from the same K = ``num_samples`` draws
    of the guide), ``"naive"`` (the prior Monte Carlo estimate with K draws), ``"ais"``
    (annealed importance sampling from ``ais_start`` — the prior or the guide — with
    ``num_chains`` chains and ``ais_steps`` HMC steps on the ``ais_schedule`` schedule). For a
    guide with a density, PSIS k-hat of the guide as proposal is computed on the first
    ``psis_datapoints`` datapoints from K draws each (0 turns it off) and summarized in
    ``report["psis"]``. The reconstruction error at the encoder's code and the latent
    diagnostics (active units, KL per dimension, posterior-collapse message; see
    :func:`pvae.diagnostics.latent_diagnostics`) are always reported. Guide-based bounds are skipped, with the reason in ``report["skipped"]``, for a
    point-mass guide. Writes ``evaluation-<split>-K<K>.json`` and the figure
    ``evaluation-<split>-K<K>.png`` (estimates with standard errors, k-hat histogram) unless
    ``write`` is False.
    """
    unknown = sorted(set(estimators) - set(ESTIMATORS))
    if unknown:
        raise UsageError(f"unknown estimator(s) {unknown}; valid choices: {', '.join(ESTIMATORS)}")
    config, vae = load_run(run_dir, device)
    data, data_note = _evaluation_data(Path(run_dir), config, dataset)
    x = data.split(split).to(vae.device)
    if chunk_size is None:  # resolved here so that the report names the chunk size that ran
        chunk_size = auto_chunk_size(vae, batch_size, num_samples, vae.device)
    estimates = reconstruction_error(vae, x)
    report = {
        "run_dir": str(run_dir),
        "dataset": config.dataset,
        "model": config.model,
        "split": split,
        "data": data_note,
        "num_datapoints": int(x.shape[0]),
        "seed": seed,
        "batch_size": batch_size,
        "chunk_size": chunk_size,
        "skipped": {},
    }
    wanted_bounds = [e for e in ("elbo", "iwae") if e in estimators]
    if wanted_bounds and not vae.guide_net.has_density:
        for name in wanted_bounds:
            report["skipped"][name] = "the guide is a point mass without a density"
    elif wanted_bounds:
        bounds = evaluate_bounds(
            vae, x, num_samples, batch_size=batch_size, chunk_size=chunk_size, seed=seed,
            progress=progress,
        )
        estimates.update({name: bounds[name] for name in wanted_bounds})
        if "iwae" in bounds and "iwae" in wanted_bounds:
            report["nll_iwae"] = -bounds["iwae"].mean
            report["bits_per_dim_iwae"] = bounds["iwae"].bits_per_dim(vae.data_dim)
    if "naive" in estimators:
        estimates["naive"] = naive_prior_estimate(
            vae, x, num_samples, batch_size=batch_size, chunk_size=chunk_size, seed=seed, progress=progress
        )
    if "ais" in estimators and ais_start == "guide" and not vae.guide_net.has_density:
        report["skipped"]["ais"] = "AIS from the guide needs a guide with a density; use --ais-start prior"
    elif "ais" in estimators and ais_start == "guide" and not vae.guide_net.scores_any_point:
        report["skipped"]["ais"] = (f"AIS from the guide needs q(z|x) at any z; the {type(vae.guide_net).__name__} "
                                    "scores only its own samples; use --ais-start prior")
    elif "ais" in estimators:
        settings = {"num_leapfrog": 10, "target_accept": 0.65}
        estimates["ais"] = ais(vae, x, num_chains=num_chains, num_steps=ais_steps, betas=ais_schedule,
                               start=ais_start, batch_size=batch_size, seed=seed, progress=progress, **settings)
        report["ais_settings"] = {"num_chains": num_chains, "num_steps": ais_steps, "schedule": ais_schedule,
                                  "start": ais_start, "leapfrog_steps": settings["num_leapfrog"],
                                  "target_accept": settings["target_accept"]}
    report["estimates"] = {name: est.to_dict() for name, est in estimates.items()}
    khat = None
    if psis_datapoints and vae.guide_net.has_density and num_samples < PSIS_MIN_SAMPLES:
        report["skipped"]["psis"] = (f"K={num_samples} is too few draws to fit the Pareto tail "
                                     f"(PSIS k-hat needs K >= {PSIS_MIN_SAMPLES} here)")
    elif psis_datapoints and vae.guide_net.has_density:
        # a seeded random subset: splits such as static MNIST's test set are ordered in blocks
        chosen = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:psis_datapoints]
        chosen = chosen.sort().values
        sub = x[chosen.to(x.device)]
        khat = torch.cat([importance_diagnostics(vae, xb, num_samples, chunk_size, seed=seed + 1000 + i)["khat"]
                          for i, xb in enumerate(sub.split(batch_size))])
        finite = torch.isfinite(khat)
        report["psis"] = {
            "datapoints": int(sub.shape[0]), "num_samples": int(num_samples),
            "subset": f"random, torch.randperm with seed {seed}", "indices_first": chosen[:10].tolist(),
            # a non-finite k-hat (a failed tail fit) is counted and excluded from every summary
            "nonfinite_khat": int((~finite).sum()),
            "khat_mean": float(khat[finite].mean()) if finite.any() else None,
            "khat_max": float(khat[finite].max()) if finite.any() else None,
            "fraction_above_0.5": float((khat[finite] > 0.5).double().mean()) if finite.any() else None,
            "fraction_above_0.7": float((khat[finite] > 0.7).double().mean()) if finite.any() else None,
        }
    with warnings.catch_warnings():  # the collapse message goes into the report (and the CLI prints it)
        warnings.filterwarnings("ignore", message="posterior collapse", category=UserWarning)
        report["latent"] = latent_diagnostics(vae, x)
    if write:
        from . import plots

        stem = Path(run_dir) / f"evaluation-{split}-K{num_samples}"
        bounds = {k: v for k, v in estimates.items() if k not in ("reconstruction", "squared-error")}
        if bounds or khat is not None:
            fig = plots.evaluation_figure(bounds, khat, title=f"{config.dataset} {split}")
            fig.savefig(stem.with_suffix(".png"), dpi=100)
            report["figure"] = stem.with_suffix(".png").name
        write_json(report, stem.with_suffix(".json"))
    return report
