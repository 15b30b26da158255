"""Run directories: train a :class:`~pvae.config.RunConfig` into a folder, load it back,
evaluate it.

A run directory holds ``config.json`` (enough to rebuild the model), ``env.json`` (versions,
seed, device), ``metrics.jsonl`` (one line per epoch), ``checkpoint.pt`` (model, optimizer
and RNG state; best-validation weights) and PNG figures. Evaluation reports are written as
``evaluation-<split>-K<K>.json``; evaluation never changes the checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import platform
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional, Sequence

import torch

from pvae import distributed
from pvae._rng import seeded
from pvae.inference.annealing import ais
from pvae.checkpoint import load_checkpoint, run_lock, write_json
from pvae.config import RunConfig, build_vae, save_config
from pvae.data import Dataset, load_dataset
from pvae.inference.diagnostics import importance_diagnostics, latent_diagnostics
from pvae.errors import NotARunError, RunExistsError, UsageError
from pvae.inference.estimators import (
    DEFAULT_CHUNK_SIZE,
    BatchCache,
    Estimate,
    auto_chunk_size,
    check_data,
    evaluate_bounds,
    naive_prior_estimate,
    reconstruction_error,
)
from pvae.data.files import file_sha256
from pvae.model import VAE
from pvae.training.tracking import check_trackers, make_trackers
from pvae.training.loop import CHECKPOINT_FILE, History, check_objective, data_parallel_problem, fit

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


def _machine(device: torch.device) -> dict:
    """Versions, machine and device: what :func:`environment` and :func:`evaluation_environment` share."""
    import numpy
    import pyro

    from pvae import __version__

    facts = {
        "pvae": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "numpy": numpy.__version__,
        "device": str(device),
        "torch_num_threads": torch.get_num_threads(),
        "world_size": distributed.world_size(),  # processes working together (torch.distributed)
    }
    if distributed.active():
        facts["distributed_backend"] = torch.distributed.get_backend()
    if device.type == "cuda":
        facts["cuda_device"] = torch.cuda.get_device_name(device)
        facts["cuda_version"] = torch.version.cuda
    return facts


def environment(config: RunConfig, device: torch.device, command: Optional[Sequence[str]] = None) -> dict:
    """Versions and machine facts recorded with a run (``command``: the command line, which the
    CLI passes; pvae reads ``sys.argv`` nowhere else)."""
    return {**_machine(device), "seed": config.training.seed,
            "command": list(command) if command is not None else None,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def evaluation_environment(device: torch.device) -> dict:
    """Versions and machine facts recorded with an evaluation report: the device the bounds were
    computed on matters, since CUDA and the CPU draw other random numbers from the same seed.
    ``evaluated`` is when the evaluation started (a resumed one: when its last sitting started)."""
    return {**_machine(device), "evaluated": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


@dataclass
class Run:
    """A run directory's contents in Python: what :func:`train_run` returns and
    :func:`load_run` reads back (the model on the requested device, in eval mode after loading)."""

    run_dir: Path
    config: RunConfig
    vae: VAE
    history: History


def train_run(
    config: RunConfig,
    run_dir,
    resume: bool = False,
    progress: bool = True,
    dataset: Optional[Dataset] = None,
    command: Optional[Sequence[str]] = None,
    device: Optional[str] = None,
) -> Run:
    """Train ``config`` into ``run_dir`` and write its figures; returns the :class:`Run`.

    Everything that can be checked (data set, names, device, data vs likelihood) is checked
    before anything is written. An existing run directory is only continued with
    ``resume=True`` and the same config (``training`` settings in :data:`RESUMABLE_CHANGES`
    may differ). ``command`` is recorded in ``env.json``. ``device``: this process's device
    instead of the config's (a data-parallel process's own GPU).

    Under :mod:`torch.distributed` (``torchrun ... -m pvae train``) every process calls this:
    all check, rank 0 writes the run's files, and all train (:func:`pvae.fit` shards the data).
    """
    run_dir = Path(run_dir)
    training = config.training
    device = resolve_device(device or training.device)
    data = dataset if dataset is not None else load_dataset(config.dataset)
    with seeded(training.seed):  # initial weights are a function of the config's seed
        vae = build_vae(config, data.data_dim, data.image_shape)
    train_seen = data.split("train")  # as the model sees it (one draw of dynamically binarized data)
    check_data(vae, train_seen, f"{data.name} training data")  # (streamed data: a chunk at a time)
    check_data(vae, data.valid, f"{data.name} validation data")
    objective = config.build_objective()
    check_objective(objective, vae, train_seen, training.batch_size)
    main = distributed.is_main()
    with run_lock(run_dir) if main else contextlib.nullcontext():  # a second run into run_dir is refused
        try:
            _check_resumable(run_dir, config, training, resume)
            check_trackers(training.log)
            problem = data_parallel_problem(objective, training.batch_size, data.train.shape[0])
            if problem is not None:
                raise problem
            error = None
        except UsageError as exc:
            error = exc
        distributed.agree(error)  # every process stops, or none
        if main:
            _write_run_files(run_dir, config, device, command, data, dataset)
        distributed.barrier()
        trackers = make_trackers(training.log, run_dir, config.to_dict()) if main and training.log else []
        try:
            history = _fit_run(vae, data, objective, training, device, run_dir, resume, progress, trackers)
            if main:
                write_figures(vae, data, history, run_dir)
                for tracker in trackers:
                    tracker.log_run_files(len(history.records))
        finally:
            for tracker in trackers:
                tracker.close()
    return Run(run_dir, config, vae, history)


def _fit_run(vae, data, objective, training, device, run_dir, resume, progress, trackers) -> History:
    return fit(
        vae,
        data.train,
        data.valid,
        epochs=training.epochs,
        batch_size=training.batch_size,
        lr=training.lr,
        objective=objective,
        patience=training.patience,
        seed=training.seed,
        device=device,
        run_dir=run_dir,
        resume=resume,
        val_num_samples=training.val_num_samples,
        progress=progress,
        step=training.step,
        max_time=training.max_time,
        checkpoint_every=training.checkpoint_every,
        val_bound=training.val_bound,
        dynamic_binarization=data.dynamic_binarization,
        optimizer=training.optimizer,
        weight_decay=training.weight_decay,
        momentum=training.momentum,
        lr_schedule=training.lr_schedule,
        lr_gamma=training.lr_gamma,
        lr_step=training.lr_step,
        lr_min=training.lr_min,
        clip_grad_norm=training.clip_grad_norm,
        precision=training.precision,
        loggers=trackers,
    )


def _check_resumable(run_dir: Path, config: RunConfig, training, resume: bool) -> None:
    """Refuse to write into a run directory that holds another run (or this one without resume)."""
    config_path = run_dir / CONFIG_FILE
    if config_path.exists():
        if not resume:
            raise RunExistsError(
                f"{run_dir} already holds a run; pass --resume to continue it or choose a "
                "new --run-dir (nothing was overwritten)"
            )
        saved = RunConfig.load(config_path)
        # how long and where the steps run may change; what is trained may not
        same_training = {k: getattr(training, k) for k in RESUMABLE_CHANGES}
        if saved.replace(training=same_training) != config:
            differ = [k for k, v in saved.to_dict().items() if k != "training" and v != config.to_dict()[k]]
            differ += [f"training.{k}" for k, v in dataclasses.asdict(saved.training).items()
                       if k not in RESUMABLE_CHANGES and v != getattr(training, k)]
            raise UsageError(f"cannot resume {run_dir}: its config.json differs from this config in "
                             + ", ".join(differ))


def _write_run_files(run_dir: Path, config: RunConfig, device, command, data: Dataset, dataset) -> None:
    """The run's config, environment and data record (before training)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir)
    write_json(environment(config, device, command), run_dir / ENV_FILE)
    user_file = data.source is not None and "path" in data.source
    record = {"name": data.name, "source": "python" if dataset is not None else
              ("file" if user_file else "registry"), "file": data.source if user_file else None,
              "image_shape": list(data.image_shape) if data.image_shape else None,
              "fingerprint": data.fingerprint()}
    if data.source is not None and not user_file:  # a named benchmark's file and its SHA-256
        record["benchmark"] = data.source
    write_json(record, run_dir / DATA_FILE)


#: training settings a resumed run may change
RESUMABLE_CHANGES = ("epochs", "step", "max_time", "checkpoint_every", "device", "log")


#: validation datapoints drawn in a run's latent scatter and reconstructions
FIGURE_DATAPOINTS = 10000


def write_figures(vae: VAE, data: Dataset, history: History, run_dir) -> None:
    """ELBO curves, reconstructions, samples and a latent scatter of the validation split."""
    from pvae import plots

    run_dir = Path(run_dir)
    figures = {"elbo_curves.png": plots.elbo_curves(history.records)}
    valid = data.valid[:FIGURE_DATAPOINTS].to(vae.device)  # (a streamed split reads only these)
    labels = data.split_labels("valid")
    if data.image_shape is not None:
        figures["reconstructions.png"] = plots.reconstructions(vae, valid, data.image_shape)
        figures["samples.png"] = plots.samples(vae, data.image_shape)
    figures["latent.png"] = plots.latent_scatter(vae.encode(valid), None if labels is None else labels[:FIGURE_DATAPOINTS])
    for name, fig in figures.items():
        fig.savefig(run_dir / name, dpi=100)


def load_run(run_dir, device: str = "cpu", best: bool = True) -> Run:
    """Rebuild a run directory's model (from ``config.json`` and ``checkpoint.pt``) and its
    history. Run directories of pvae 0.1 load too (their flat config is translated).

    :param bool best: load the best-validation weights (else the last epoch's).
    """
    run_dir = Path(run_dir)
    for name in (CONFIG_FILE, CHECKPOINT_FILE):
        if not (run_dir / name).exists():
            raise NotARunError(f"{run_dir} is not a pvae run directory: {name} is missing")
    config = RunConfig.load(run_dir / CONFIG_FILE)
    ckpt = load_checkpoint(run_dir / CHECKPOINT_FILE)
    state = ckpt["best_model"] if best and ckpt.get("best_model") is not None else ckpt["model"]
    record = json.loads((run_dir / DATA_FILE).read_text()) if (run_dir / DATA_FILE).exists() else {}
    image_shape = tuple(record["image_shape"]) if record.get("image_shape") else None
    vae = build_vae(config, ckpt["fit"]["data_dim"], image_shape)
    vae.load_state_dict(state)
    vae.to(resolve_device(device))
    vae.eval()
    history = History(ckpt["history"], ckpt.get("best_epoch"), ckpt.get("stopped_early", False))
    return Run(run_dir, config, vae, history)


def _evaluation_data(run_dir: Path, config: RunConfig, dataset: Optional[Dataset], data_path=None):
    """The data to evaluate on and a note for the report (see :func:`evaluate_run`)."""
    record = json.loads((run_dir / DATA_FILE).read_text()) if (run_dir / DATA_FILE).exists() else None
    if data_path is not None:  # other data, read with the run's own file options where it has them
        if dataset is not None:
            raise UsageError("give either dataset or data_path, not both")
        trained_on = config.dataset
        options = {k: v for k, v in trained_on.kwargs.items() if k != "path"} if trained_on.name == "file" else {}
        dataset = load_dataset({"name": "file", **options, "path": str(data_path)})
    from_registry = dataset is None
    if from_registry:
        trained_file = record["file"] if record is not None and record.get("source") == "file" else None
        if trained_file is not None and not Path(trained_file["path"]).exists():
            raise UsageError(f"{run_dir} was trained on {trained_file['path']}, which no longer exists; restore it, "
                             "or evaluate other data explicitly (pvae evaluate RUN --data OTHER)")
        dataset = load_dataset(config.dataset)
        if trained_file is not None and dataset.source["sha256"] != trained_file["sha256"]:
            raise UsageError(f"{trained_file['path']} changed since {run_dir} was trained on it (SHA-256 "
                             f"{dataset.source['sha256'][:12]} now, {trained_file['sha256'][:12]} then); restore it, "
                             "or evaluate it as other data (pvae evaluate RUN --data PATH)")
    fingerprint = dataset.fingerprint()
    if from_registry and record is not None and fingerprint != record["fingerprint"]:
        if record.get("source") == "python":
            raise UsageError(
                f"{run_dir} was trained on data passed in Python (data set {record['name']!r}) that differ from "
                f"the registry data set {config.dataset.name!r}; pass the same data: evaluate_run(..., dataset=...)"
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
    data_path=None,
    resume: bool = True,
) -> "EvaluationReport":
    """Evaluate a run on a split of its data set; the run's files are only read (the report, and
    while it runs the partial files below, are written beside them).

    The data: ``dataset`` if given (the report records whether it is the data the run was
    trained on), else the registry data set named in the config — which must be the data the
    run saw: a run trained on data passed in Python (``train_run(dataset=...)``) is refused
    without ``dataset``, and registry data or a user's file that changed since training is an
    error. ``data_path``: score another file instead, read with the run's own file options
    (split, image size, binarization); its dimension must be the model's.

    ``estimators`` (any of :data:`ESTIMATORS`): ``"elbo"`` and ``"iwae"`` (the ELBO and the
    importance-weighted bound :math:`\\mathcal{L}_K` from the same K = ``num_samples`` draws
    of the guide), ``"naive"`` (the prior Monte Carlo estimate with K draws), ``"ais"``
    (annealed importance sampling from ``ais_start`` — the prior or the guide — with
    ``num_chains`` chains and ``ais_steps`` HMC steps on the ``ais_schedule`` schedule). For a
    guide with a density, PSIS k-hat of the guide as proposal is computed on the first
    ``psis_datapoints`` datapoints from K draws each (0 turns it off) and summarized in
    ``report.psis``. The reconstruction error at the encoder's code and the latent
    diagnostics (active units, KL per dimension, posterior-collapse message; see
    :func:`pvae.diagnostics.latent_diagnostics`) are always reported. Guide-based bounds are skipped, with the reason in ``report.skipped``, for a
    point-mass guide. Returns an :class:`EvaluationReport`; unless ``write`` is False it is also
    saved in the run directory (:meth:`EvaluationReport.save`).

    With ``write`` and a ``seed`` (one process), each estimator keeps its finished minibatches in
    ``<report stem>.<estimator>.partial.pt`` in the run directory (a
    :class:`~pvae.estimators.BatchCache`, removed when the report is written): an evaluation that
    is killed resumes where it stopped when run again with the same settings, and returns
    exactly what an uninterrupted one would. The file is tied to the settings, the data, the
    checkpoint and config, the device and the pvae and torch versions; one written otherwise is
    replaced, with a warning. With ``chunk_size=None`` a resumed evaluation keeps the chunk size
    the interrupted one drew with. ``resume=False`` deletes this report's partial files first.
    """
    unknown = sorted(set(estimators) - set(ESTIMATORS))
    if unknown:
        raise UsageError(f"unknown estimator(s) {unknown}; valid choices: {', '.join(ESTIMATORS)}")
    keep_partials = write and seed is not None and not distributed.active()
    stem = EvaluationReport.stem_for(split, num_samples)
    partials = sorted(Path(run_dir).glob(f"{stem}.*.partial.pt"))
    if keep_partials and not resume:
        for path in partials:
            path.unlink()
    # what the cached minibatches were computed from (hashed before loading, so that a checkpoint
    # rewritten meanwhile cannot be cached under the new one's hash)
    origin = ({name: file_sha256(Path(run_dir) / name) for name in (CHECKPOINT_FILE, CONFIG_FILE)
               if (Path(run_dir) / name).exists()} if keep_partials else {})
    run = load_run(run_dir, device)
    config, vae = run.config, run.vae
    data, data_note = _evaluation_data(Path(run_dir), config, dataset, data_path)
    if data.data_dim != vae.data_dim:
        raise UsageError(f"data set {data.name!r} has {data.data_dim} values per datapoint but the model of "
                         f"{run_dir} takes {vae.data_dim}; evaluate data of the same kind")
    x = data.split(split).to(vae.device)
    if chunk_size is None and keep_partials and resume:  # the automatic chunk size depends on free memory:
        chunk_size = _chunk_size_of(partials)  # an interrupted evaluation resumes with the one it drew with
    if chunk_size is None:  # resolved here so that the report names the chunk size that ran
        chunk_size = auto_chunk_size(vae, batch_size, num_samples, vae.device)
    estimates = reconstruction_error(vae, x)
    caches = {}

    def cache(name, **settings):
        """The resumable record of one estimator's minibatches (None: not kept)."""
        if not keep_partials:
            return None
        from pvae import __version__

        key = {"estimator": name, "split": split, "num_datapoints": int(x.shape[0]), "num_samples": num_samples,
               "batch_size": batch_size, "chunk_size": chunk_size, "seed": seed, "data": data_note.get("fingerprint"),
               "files": origin, "device": vae.device.type, "dtype": str(x.dtype), "pvae": __version__,
               "torch": str(torch.__version__), **settings}
        path = Path(run_dir) / f"{stem}.{name}.partial.pt"
        caches[name] = BatchCache(path, key)
        if caches[name].set_aside:
            warnings.warn(f"{path.name} was {caches[name].set_aside}: this evaluation starts afresh and replaces it",
                          UserWarning, stacklevel=3)
        if caches[name].resumed and progress:
            print(f"resuming {name}: {caches[name].resumed} minibatch(es) from an interrupted evaluation "
                  f"({path.name})", file=sys.stderr)
        return caches[name]

    report = EvaluationReport(run_dir=str(run_dir), dataset=data.name, model=config.model, split=split,
                              data=data_note, num_datapoints=int(x.shape[0]), seed=seed, batch_size=batch_size,
                              chunk_size=chunk_size, num_samples=num_samples,
                              environment=evaluation_environment(vae.device))
    wanted_bounds = [e for e in ("elbo", "iwae") if e in estimators]
    if wanted_bounds and not vae.guide_net.has_density:
        for name in wanted_bounds:
            report.skipped[name] = "the guide is a point mass without a density"
    elif wanted_bounds:
        bounds = evaluate_bounds(
            vae, x, num_samples, batch_size=batch_size, chunk_size=chunk_size, seed=seed,
            progress=progress, cache=cache("bounds"),
        )
        estimates.update({name: bounds[name] for name in wanted_bounds})
    if "naive" in estimators:
        estimates["naive"] = naive_prior_estimate(
            vae, x, num_samples, batch_size=batch_size, chunk_size=chunk_size, seed=seed, progress=progress,
            cache=cache("naive"),
        )
    if "ais" in estimators and ais_start == "guide" and not vae.guide_net.has_density:
        report.skipped["ais"] = "AIS from the guide needs a guide with a density; use --ais-start prior"
    elif "ais" in estimators and ais_start == "guide" and not vae.guide_net.scores_any_point:
        report.skipped["ais"] = (f"AIS from the guide needs q(z|x) at any z; the {type(vae.guide_net).__name__} "
                                    "scores only its own samples; use --ais-start prior")
    elif "ais" in estimators:
        settings = {"num_leapfrog": 10, "target_accept": 0.65}
        estimates["ais"] = ais(vae, x, num_chains=num_chains, num_steps=ais_steps, betas=ais_schedule,
                               start=ais_start, batch_size=batch_size, seed=seed, progress=progress,
                               cache=cache("ais", num_chains=num_chains, ais_steps=ais_steps, schedule=ais_schedule,
                                           start=ais_start, **settings), **settings)
        report.ais_settings = {"num_chains": num_chains, "num_steps": ais_steps, "schedule": ais_schedule,
                                  "start": ais_start, "leapfrog_steps": settings["num_leapfrog"],
                                  "target_accept": settings["target_accept"]}
    report.estimates = dict(estimates)
    report.data_dim = vae.data_dim
    labels = data.split_labels(split)
    if labels is not None:
        report.by_label = _by_label(estimates, labels.cpu())
    khat = None
    if psis_datapoints and vae.guide_net.has_density and num_samples < PSIS_MIN_SAMPLES:
        report.skipped["psis"] = (f"K={num_samples} is too few draws to fit the Pareto tail "
                                     f"(PSIS k-hat needs K >= {PSIS_MIN_SAMPLES} here)")
    elif psis_datapoints and vae.guide_net.has_density:
        # a seeded random subset: splits such as static MNIST's test set are ordered in blocks
        chosen = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:psis_datapoints]
        chosen = chosen.sort().values
        sub = x[chosen.to(x.device)]
        khat = torch.cat([importance_diagnostics(vae, xb, num_samples, chunk_size, seed=seed + 1000 + i)["khat"]
                          for i, xb in enumerate(sub.split(batch_size))])
        finite = torch.isfinite(khat)
        report.khat = khat.cpu()
        report.psis = {
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
        report.latent = latent_diagnostics(vae, x)
    if write and distributed.is_main():  # (every process of a sharded evaluation holds the same report)
        report.save()
    for finished in caches.values():  # the report holds their results now
        finished.discard()
    return report


def _chunk_size_of(partials) -> Optional[int]:
    """The chunk size an interrupted evaluation drew with (from its partial files), if any."""
    for path in partials:
        try:
            key = torch.load(path, map_location="cpu", weights_only=True).get("key", {})
        except Exception:
            continue
        if isinstance(key.get("chunk_size"), int):
            return key["chunk_size"]
    return None


def _by_label(estimates: Dict[str, Estimate], labels: torch.Tensor) -> dict:
    """Per label: the number of datapoints and each estimate's mean and standard error over them."""
    out = {}
    for label in labels.unique().tolist():
        mask = labels == label
        row = {"num_datapoints": int(mask.sum())}
        for name, est in estimates.items():
            values = est.values.detach().cpu().double()[mask]
            row[name] = {"mean": float(values.mean()),
                         "stderr": float(values.std() / math.sqrt(values.numel())) if values.numel() > 1 else None}
        out[str(label)] = row
    return out


#: version of the evaluation-report JSON schema (1: pvae 0.1, no "version" key)
REPORT_VERSION = 2


@dataclass
class EvaluationReport:
    """What :func:`evaluate_run` measured. Estimates are :class:`~pvae.estimators.Estimate`
    objects (each names its estimator and sample count); :meth:`to_dict` is the JSON schema
    (version :data:`REPORT_VERSION`)::

        {"version": 2, "run_dir", "dataset", "model", "split", "data": {"name", "fingerprint",
         "training_data"}, "num_datapoints", "num_samples", "seed", "batch_size", "chunk_size",
         "estimates": {name: Estimate.to_dict()}, "nll_iwae", "bits_per_dim_iwae",
         "skipped": {name: reason}, "latent": {...}, "psis": {...} | null,
         "ais_settings": {...} | null, "figure": file name | null,
         "by_label": {label: {"num_datapoints", name: {"mean", "stderr"}}} | null (labelled data),
         "environment": {"pvae", "torch", "pyro", "device", "cuda_device" (CUDA), "evaluated", ...}}

    ``environment`` was added within version 2 (pvae 0.2); older version-2 reports lack it."""

    run_dir: str
    dataset: str
    model: str
    split: str
    data: dict
    num_datapoints: int
    seed: int
    batch_size: int
    chunk_size: int
    num_samples: int
    estimates: Dict[str, Estimate] = field(default_factory=dict)
    skipped: Dict[str, str] = field(default_factory=dict)
    latent: dict = field(default_factory=dict)
    by_label: Optional[dict] = None
    psis: Optional[dict] = None
    ais_settings: Optional[dict] = None
    data_dim: Optional[int] = None
    khat: Optional[torch.Tensor] = field(default=None, repr=False)  # per datapoint, for the figure
    figure: Optional[str] = None
    environment: Optional[dict] = None  # versions, machine and device (see evaluation_environment)

    @property
    def nll_iwae(self) -> Optional[float]:
        """-L_K in nats per datapoint (an estimate of -log p(x) from above), if L_K was computed."""
        return -self.estimates["iwae"].mean if "iwae" in self.estimates else None

    @property
    def bits_per_dim_iwae(self) -> Optional[float]:
        if "iwae" not in self.estimates or self.data_dim is None:
            return None
        return self.estimates["iwae"].bits_per_dim(self.data_dim)

    @property
    def stem(self) -> str:
        return self.stem_for(self.split, self.num_samples)

    @staticmethod
    def stem_for(split: str, num_samples: int) -> str:
        return f"evaluation-{split}-K{num_samples}"

    def to_dict(self) -> dict:
        return {
            "version": REPORT_VERSION, "run_dir": self.run_dir, "dataset": self.dataset, "model": self.model,
            "split": self.split, "data": self.data, "num_datapoints": self.num_datapoints,
            "num_samples": self.num_samples, "seed": self.seed, "batch_size": self.batch_size,
            "chunk_size": self.chunk_size, "data_dim": self.data_dim,
            "estimates": {name: est.to_dict() for name, est in self.estimates.items()},
            "nll_iwae": self.nll_iwae, "bits_per_dim_iwae": self.bits_per_dim_iwae,
            "skipped": self.skipped, "latent": self.latent, "psis": self.psis,
            "ais_settings": self.ais_settings, "figure": self.figure, "by_label": self.by_label,
            "environment": self.environment,
        }

    def save(self, run_dir=None) -> Path:
        """Write ``evaluation-<split>-K<K>.json`` and its figure (estimates with standard errors,
        k-hat histogram) into ``run_dir`` (default: the evaluated run's); returns the JSON path."""
        from pvae import plots

        stem = Path(run_dir or self.run_dir) / self.stem
        bounds = {k: v for k, v in self.estimates.items() if k not in ("reconstruction", "squared-error")}
        if bounds or self.khat is not None:
            fig = plots.evaluation_figure(bounds, self.khat, title=f"{self.dataset} {self.split}")
            fig.savefig(stem.with_suffix(".png"), dpi=100)
            self.figure = stem.with_suffix(".png").name
        write_json(self.to_dict(), stem.with_suffix(".json"))
        return stem.with_suffix(".json")

    def summary(self) -> str:
        """The report in a few lines of text (what ``pvae evaluate`` prints)."""
        lines = [f"{self.dataset} {self.split} split, {self.num_datapoints} datapoints, seed {self.seed}"]
        for name, est in self.estimates.items():
            if name in ("reconstruction", "squared-error"):
                unit = "nats" if name == "reconstruction" else "(squared data units)"
                lines.append(f"  {est.estimator} at the code E_q[z|x]: {est.mean:.3f} ± {est.stderr:.3f} {unit}")
                continue
            lines.append(
                f"  {est.estimator:>5} ({'chains' if name == 'ais' else 'K'}={est.num_samples}): {est.mean:.3f} "
                f"± {est.stderr:.3f} nats (± is the std. error over datapoints; "
                f"Monte Carlo part ± {est.mc_stderr_of_mean:.3f})")
        latent = self.latent
        if latent:
            kl = "" if latent.get("kl_total") is None else f", KL(q(z|x)||p(z)) {latent['kl_total']:.2f} nats"
            lines.append(f"  active units: {latent['active_units']} of {latent['latent_dim']}{kl}")
            if latent.get("posterior_collapse"):
                lines.append(f"  warning: {latent['posterior_collapse']}")
        if self.psis:
            p = self.psis
            mean = "n/a" if p["khat_mean"] is None else f"{p['khat_mean']:.2f}"
            above = "n/a" if p["fraction_above_0.7"] is None else f"{p['fraction_above_0.7']:.1%}"
            lines.append(f"  PSIS k-hat of q(z|x) ({p['datapoints']} random datapoints, K={p['num_samples']}): "
                         f"mean {mean}, {above} above 0.7")
        if self.figure:
            lines.append(f"  figure: {Path(self.run_dir) / self.figure}")
        for name, why in self.skipped.items():
            lines.append(f"  {name}: skipped ({why})")
        if self.nll_iwae is not None:
            bpd = "" if self.bits_per_dim_iwae is None else f", {self.bits_per_dim_iwae:.4f} bits/dim"
            lines.append(f"  -log p(x) ≈ {self.nll_iwae:.3f} nats (from L_{self.num_samples}){bpd}")
        return "\n".join(lines)
