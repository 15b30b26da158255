"""Run directories: train a :class:`~pvae.config.RunConfig` into a folder, load it back,
evaluate it.

A run directory holds ``config.json`` (enough to rebuild the model), ``env.json`` (versions,
seed, device), ``metrics.jsonl`` (one line per epoch), ``checkpoint.pt`` (model, optimizer
and RNG state; best-validation weights) and PNG figures. Evaluation reports are written as
``evaluation-<split>-K<K>.json`` (schema :data:`REPORT_VERSION`, by
:func:`~pvae.inference.evaluation.evaluate` as an :class:`~pvae.inference.evaluation.EvaluationSpec`
says); evaluation never changes the checkpoint.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from pvae import distributed
from pvae._rng import seeded
from pvae.checkpoint import TORCH_LOAD_ERRORS, load_checkpoint, run_lock, write_json
from pvae import families
from pvae.config import RunConfig, save_config
from pvae.families import build_program
from pvae.data import Dataset, load_dataset
from pvae.errors import NotARunError, RunExistsError, UsageError
from pvae.inference.estimators import (
    BatchCache,
    auto_chunk_size,
    check_data,
)
from pvae.data.files import file_sha256
from pvae.inference.evaluation import (  # noqa: F401  (ESTIMATORS, PSIS_MIN_SAMPLES, REPORT_VERSION: pvae.runs names)
    ESTIMATORS,
    PSIS_MIN_SAMPLES,
    REPORT_VERSION,
    EvaluationReport,
    EvaluationSpec,
    evaluate,
)
from pvae.model import VAE
from pvae.pretrained import MANIFEST_FILE, WEIGHTS_FILE
from pvae.training.tracking import check_trackers, make_trackers
from pvae.training.loop import CHECKPOINT_FILE, History, check_objective, data_parallel_problem, fit

__all__ = ["train_run", "load_run", "evaluate_run", "Run", "EvaluationReport", "EvaluationSpec", "REPORT_VERSION",
           "write_figures"]

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


#: folders of the repository's result files (written by its scripts): a change there is not a
#: change of the code, and does not make :func:`source_commit` dirty
RESULT_FOLDERS = ("experiments/results/", "benchmarks/results/", "paper/generated/")


def source_commit(root=None) -> Optional[str]:
    """The git commit of the pvae source tree this process imported (or of the checkout at
    ``root``), with ``-dirty`` when tracked files other than result files (:data:`RESULT_FOLDERS`)
    differ from it; None outside a git checkout (an installed wheel) or without git."""
    import subprocess

    root = Path(root) if root is not None else Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        return None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True, timeout=10).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                 capture_output=True, text=True, check=True, timeout=10).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return None
    dirty = [line for line in changed if not line[3:].startswith(RESULT_FOLDERS)]
    return commit + ("-dirty" if dirty else "")


def thread_flushes_denormals() -> bool:
    """Whether this thread flushes subnormal floats to zero (a one-element product, which starts
    no thread pool)."""
    small = torch.tensor([1e-30], dtype=torch.float32)
    return bool((small * small.new_tensor([1e-10])).item() == 0.0)


def cpu_flushes_denormals():
    """Whether CPU arithmetic flushes subnormal floats (below about 1.2e-38 in float32) to zero:
    True when this thread and the intra-op thread pool do (a product whose exact value is
    subnormal comes out 0 in both), False when neither does, ``"mixed"`` when they differ (the
    mode was changed after the pool's threads started: they keep the mode they started with).
    The ``pvae`` command turns flushing on before its pool starts (:func:`pvae.cli.configure_cpu`),
    since x86 CPUs compute with subnormal numbers many times more slowly and a gated MLP's backward
    pass produces them in training; ``PVAE_KEEP_DENORMALS=1`` keeps them."""
    here = thread_flushes_denormals()
    # large enough for every thread of the pool to take a share (ATen's grain is 32,768 elements)
    pool = bool((torch.full((65536 * max(torch.get_num_threads(), 1),), 1e-30) * 1e-10).sum().item() == 0.0)
    return here if here == pool else "mixed"


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
        "cpu_flush_denormal": cpu_flushes_denormals(),  # pvae.cli sets it: values below 1.2e-38 read as 0
        "world_size": distributed.world_size(),  # processes working together (torch.distributed)
    }
    commit = source_commit()
    if commit is not None:  # the code that ran, when pvae runs from a git checkout
        facts["git_commit"] = commit
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
    config = families.resolve(config, data)  # options that depend on the data (classes, ...), recorded
    with seeded(training.seed):  # initial weights are a function of the config's seed
        vae = build_program(config, data.data_dim, data.image_shape)
    _warn_about_column_scales(config, data)
    if config.model.name in ("vae", "autoencoder"):
        train_x, valid_x = data.train, data.valid
        train_seen = data.split("train")  # as the model sees it (one draw of dynamically binarized data)
    else:  # a family's data carry the covariates its programs read (labels, masks)
        train_x = train_seen = families.model_data(config, data, "train", training=True)
        valid_x = families.model_data(config, data, "valid")
    check_data(vae, train_seen, f"{data.name} training data")  # (streamed data: a chunk at a time)
    check_data(vae, valid_x, f"{data.name} validation data")
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
            history = _fit_run(vae, data, train_x, valid_x, objective, training, device, run_dir, resume, progress,
                               trackers)
            if main:
                write_figures(vae, data, history, run_dir, config)
                for tracker in trackers:
                    tracker.log_run_files(len(history.records))
        finally:
            for tracker in trackers:
                tracker.close()
    return Run(run_dir, config, vae, history)


def _fit_run(vae, data, train_x, valid_x, objective, training, device, run_dir, resume, progress, trackers) -> History:
    return fit(vae, train_x, valid_x, dataclasses.replace(training, device=str(device)), objective=objective,
               run_dir=run_dir, resume=resume, progress=progress, dynamic_binarization=data.dynamic_binarization,
               loggers=trackers)


#: a Gaussian likelihood's one noise scale cannot fit columns whose spreads differ by more than this
SCALE_RATIO_WARNING = 100.0


def _warn_about_column_scales(config: RunConfig, data: Dataset) -> None:
    """Warn when a Gaussian likelihood meets unstandardized table columns in very different units."""
    if config.likelihood.name != "gaussian" or data.streamed or "standardization" in (data.source or {}):
        return
    if data.image_shape is not None:  # pixels share one unit (near-constant border pixels are no sign of trouble)
        return
    spread = data.train.double().std(0, unbiased=False)
    live = spread[spread > 0]
    if live.numel() > 1 and float(live.max() / live.min()) > SCALE_RATIO_WARNING:
        widest, narrowest = int(spread.argmax()), int(torch.where(spread > 0, spread, math.inf).argmin())
        warnings.warn(f"the columns of {data.name} have spreads from {float(live.min()):.3g} (column {narrowest}) "
                      f"to {float(live.max()):.3g} (column {widest}); a Gaussian likelihood's one noise scale cannot "
                      "fit both: standardize them (--standardize on, or Dataset.standardized())", UserWarning,
                      stacklevel=3)


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
            differ += [f"training.{k}" for k, v in saved.training.to_dict().items()
                       if k not in RESUMABLE_CHANGES and v != training.to_dict()[k]]
            raise UsageError(f"cannot resume {run_dir}: its config.json differs from this config in "
                             + ", ".join(differ))


def _write_run_files(run_dir: Path, config: RunConfig, device, command, data: Dataset, dataset) -> None:
    """The run's config, environment and data record (before training)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir)
    env = environment(config, device, command)
    previous = run_dir / ENV_FILE
    if previous.exists():  # a resumed run: each earlier sitting's code, machine and start are kept
        try:
            before = json.loads(previous.read_text())
        except (OSError, ValueError):
            before = {}
        earlier = before.pop("earlier_sittings", [])
        env["earlier_sittings"] = [*earlier, {k: before.get(k) for k in ("started", "git_commit", "device",
                                                                          "cuda_device", "world_size", "command",
                                                                          "cpu_flush_denormal")
                                              if k in before}]
    write_json(env, run_dir / ENV_FILE)
    user_file = data.source is not None and "path" in data.source
    record = {"name": data.name, "source": "python" if dataset is not None else
              ("file" if user_file else "registry"), "file": data.source if user_file else None,
              "image_shape": list(data.image_shape) if data.image_shape else None,
              "fingerprint": data.fingerprint(),
              "label_names": list(data.label_names) if data.label_names is not None else None}
    labelled = families.labelled_record(config, data)
    if labelled is not None:  # M2: which training labels were known
        record["labelled"] = labelled
    if data.source is not None and not user_file:  # a named benchmark's file and its SHA-256
        record["benchmark"] = data.source
    write_json(record, run_dir / DATA_FILE)


#: training settings a resumed run may change
RESUMABLE_CHANGES = ("epochs", "step", "max_time", "checkpoint_every", "device", "log", "nonfinite", "max_skipped_steps",
                     "check_every")


#: validation datapoints drawn in a run's latent scatter and reconstructions
FIGURE_DATAPOINTS = 10000


def write_figures(vae: VAE, data: Dataset, history: History, run_dir, config: Optional[RunConfig] = None) -> None:
    """ELBO curves, reconstructions, samples and a latent scatter of the validation split (a
    family's own: :func:`pvae.families.write_family_figures`)."""
    from pvae import plots

    run_dir = Path(run_dir)
    figures = {"elbo_curves.png": plots.elbo_curves(history.records)}
    if config is not None and config.model.name not in ("vae", "autoencoder"):
        figures.update(families.write_family_figures(vae, config, data, run_dir))
        for name, fig in figures.items():
            fig.savefig(run_dir / name, dpi=100)
        return
    valid = data.valid[:FIGURE_DATAPOINTS].to(vae.device)  # (a streamed split reads only these)
    labels = data.split_labels("valid")
    if data.image_shape is not None:
        figures["reconstructions.png"] = plots.reconstructions(vae, valid, data.image_shape)
        figures["samples.png"] = plots.samples(vae, data.image_shape)
    figures["latent.png"] = plots.latent_scatter(vae.encode(valid), None if labels is None else labels[:FIGURE_DATAPOINTS],
                                                 label_names=data.label_names)
    for name, fig in figures.items():
        fig.savefig(run_dir / name, dpi=100)


def load_run(run_dir, device: str = "cpu", best: bool = True) -> Run:
    """Rebuild a run directory's model (from ``config.json`` and ``checkpoint.pt``) and its
    history. Run directories of pvae 0.1 load too (their flat config is translated), and so do
    exported runs (:func:`pvae.pretrained.export`: ``model.safetensors`` with the best weights in
    place of the checkpoint; check them first with :func:`pvae.pretrained.verify`, as
    :func:`pvae.pretrained.load_run` does).

    :param bool best: load the best-validation weights (else the last epoch's; an exported run
        holds only the best).
    """
    run_dir = Path(run_dir)
    exported = not (run_dir / CHECKPOINT_FILE).exists() and (run_dir / WEIGHTS_FILE).exists()
    for name in (CONFIG_FILE, WEIGHTS_FILE if exported else CHECKPOINT_FILE):
        if not (run_dir / name).exists():
            raise NotARunError(f"{run_dir} is not a pvae run directory: {name} is missing")
    config = RunConfig.load(run_dir / CONFIG_FILE)
    if exported:
        from safetensors.torch import load_file

        manifest = json.loads((run_dir / MANIFEST_FILE).read_text())
        state = load_file(str(run_dir / WEIGHTS_FILE))
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        data_dim, training = manifest["data_dim"], manifest["training"]
        history = History(records, training["best_epoch"], training["stopped_early"])
    else:
        ckpt = load_checkpoint(run_dir / CHECKPOINT_FILE)
        state = ckpt["best_model"] if best and ckpt.get("best_model") is not None else ckpt["model"]
        data_dim = ckpt["fit"]["data_dim"]
        history = History(ckpt["history"], ckpt.get("best_epoch"), ckpt.get("stopped_early", False))
    record = json.loads((run_dir / DATA_FILE).read_text()) if (run_dir / DATA_FILE).exists() else {}
    image_shape = tuple(record["image_shape"]) if record.get("image_shape") else None
    vae = build_program(config, data_dim, image_shape)
    vae.load_state_dict(state)
    vae.to(resolve_device(device))
    vae.eval()
    return Run(run_dir, config, vae, history)


def _evaluation_data(run_dir: Path, config: RunConfig, dataset: Optional[Dataset], data_path=None):
    """The data to evaluate on and a note for the report (see :func:`evaluate_run`)."""
    record = json.loads((run_dir / DATA_FILE).read_text()) if (run_dir / DATA_FILE).exists() else None
    if data_path is not None:  # other data, read with the run's own file options where it has them
        if dataset is not None:
            raise UsageError("give either dataset or data_path, not both")
        trained_on = config.dataset
        options = {k: v for k, v in trained_on.kwargs.items() if k != "path"} if trained_on.name == "file" else {}
        dataset = load_dataset({"name": "file", **options, "path": str(data_path), "standardize": "off"})
        stats = ((record or {}).get("file") or {}).get("standardization")
        if stats is not None:  # the run's own column statistics, not the other file's
            dataset = dataset.standardized(stats)
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


def evaluate_run(run_dir, spec: Optional[EvaluationSpec] = None, *, split: str = "test", device: str = "cpu",
                 progress: bool = True, write: bool = True, dataset: Optional[Dataset] = None, data_path=None,
                 resume: bool = True, **settings) -> EvaluationReport:
    """Evaluate a run on a split of its data with :func:`~pvae.inference.evaluation.evaluate` as
    ``spec`` says (an :class:`~pvae.inference.evaluation.EvaluationSpec`; keywords such as
    ``num_samples=5000`` or ``estimators=("ais",)`` replace its fields, :meth:`EvaluationSpec.of`).
    The run's files are only read; unless ``write`` is False the report is saved beside them
    (:meth:`EvaluationReport.save`).

    The data: ``dataset`` if given (the report records whether it is the data the run was trained
    on), else the registry data set named in the config — which must be the data the run saw: a
    run trained on data passed in Python is refused without ``dataset``, and registry data or a
    user's file that changed since training is an error. ``data_path``: score another file
    instead, read with the run's own file options; its dimension must be the model's.

    With ``write`` and a seed (one process), each estimator keeps its finished minibatches in
    ``<report stem>.<estimator>.partial.pt`` (a :class:`~pvae.inference.estimators.BatchCache`,
    removed when the report is written): a killed evaluation resumes where it stopped when run
    again with the same settings and returns exactly what an uninterrupted one would. The file is
    tied to the settings, the data, the checkpoint and config, the device and the versions; one
    written otherwise is replaced, with a warning. ``resume=False`` deletes this report's partial
    files first."""
    spec = EvaluationSpec.of(spec, **settings)
    keep = write and spec.seed is not None and not distributed.active()
    scored = _scored_name(data_path)
    stem = EvaluationReport.stem_for(split, spec.num_samples, scored, spec.seed)
    partials = _partial_files(Path(run_dir), stem, keep, resume)
    # what cached minibatches were computed from (hashed before loading, so that a checkpoint
    # rewritten meanwhile cannot be cached under the new one's hash)
    origin = ({name: file_sha256(Path(run_dir) / name)
               for name in (CHECKPOINT_FILE, WEIGHTS_FILE, CONFIG_FILE)
               if (Path(run_dir) / name).exists()} if keep else {})
    run = load_run(run_dir, device)
    data, data_note = _evaluation_data(Path(run_dir), run.config, dataset, data_path)
    if data.data_dim != run.vae.data_dim:
        raise UsageError(f"data set {data.name!r} has {data.data_dim} values per datapoint but the model of "
                         f"{run_dir} takes {run.vae.data_dim}; evaluate data of the same kind")
    x = families.model_data(run.config, data, split).to(run.vae.device)
    if spec.chunk_size is None:  # the automatic chunk size depends on free memory: an interrupted
        chunk = (_chunk_size_of(partials) if keep and resume else None)  # evaluation resumes with its own
        spec = dataclasses.replace(spec, chunk_size=chunk or auto_chunk_size(run.vae, spec.batch_size,
                                                                              spec.num_samples, run.vae.device))
    caches = {}
    cache = _cache_maker(Path(run_dir), stem, split, spec, x, data_note, origin, progress, caches) if keep else None
    report = EvaluationReport(run_dir=str(run_dir), dataset=data.name, model=run.config.model.name, split=split,
                              data=data_note, scored=scored, environment=evaluation_environment(run.vae.device))
    evaluate(run.vae, x, spec, labels=data.split_labels(split), label_names=data.label_names, progress=progress,
             report=report, cache=cache)
    _file_units(report, data)
    if write and distributed.is_main():  # (every process of a sharded evaluation holds the same report)
        report.save()
    for finished in caches.values():  # the report holds their results now
        finished.discard()
    return report


def _scored_name(data_path) -> Optional[str]:
    """The name another file goes by in a report's file name (None: the run's data)."""
    if data_path is None:
        return None
    name = Path(data_path).name  # other.csv -> other_csv (a dot would read as the report's suffix)
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name) or "data"


def _file_units(report: EvaluationReport, data: Dataset) -> None:
    """For standardized columns: the estimates also in the file's own units (the map's
    log-determinant is a constant per datapoint)."""
    stats = (data.source or {}).get("standardization")
    if stats is None:
        return
    shift = stats["log_abs_det_jacobian"]
    report.data["units"] = {
        "estimates": "standardized columns", "log_abs_det_jacobian": shift,
        "in_file_units": {name: est.mean + shift for name, est in report.estimates.items()
                          if name in ("elbo", "iwae", "naive", "ais")},
    }


def _partial_files(run_dir: Path, stem: str, keep: bool, resume: bool):
    """This report's partial files (deleted first when not resuming)."""
    partials = sorted(run_dir.glob(f"{stem}.*.partial.pt"))
    if keep and not resume:
        for path in partials:
            path.unlink()
        return []
    return partials


def _cache_maker(run_dir: Path, stem: str, split: str, spec, x, data_note, origin, progress, caches):
    """``cache(name, **settings)``: the resumable record of one estimator's minibatches."""
    from pvae import __version__

    def cache(name, **settings):
        key = {"estimator": name, "split": split, "num_datapoints": int(x.shape[0]),
               "num_samples": spec.num_samples, "batch_size": spec.batch_size, "chunk_size": spec.chunk_size,
               "seed": spec.seed, "data": data_note.get("fingerprint"), "files": origin, "device": x.device.type,
               "dtype": str(x.dtype), "pvae": __version__, "torch": str(torch.__version__), **settings}
        path = run_dir / f"{stem}.{name}.partial.pt"
        caches[name] = BatchCache(path, key)
        if caches[name].set_aside:
            warnings.warn(f"{path.name} was {caches[name].set_aside}: this evaluation starts afresh and replaces it",
                          UserWarning, stacklevel=4)
        if caches[name].resumed and progress:
            print(f"resuming {name}: {caches[name].resumed} minibatch(es) from an interrupted evaluation "
                  f"({path.name})", file=sys.stderr)
        return caches[name]

    return cache


def _chunk_size_of(partials) -> Optional[int]:
    """The chunk size an interrupted evaluation drew with (from its partial files), if any."""
    for path in partials:
        try:
            key = torch.load(path, map_location="cpu", weights_only=True).get("key", {})
        except (OSError, *TORCH_LOAD_ERRORS):  # a damaged or vanished partial file: the cache sets it aside
            continue
        if isinstance(key.get("chunk_size"), int):
            return key["chunk_size"]
    return None
