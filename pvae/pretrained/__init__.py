"""Pretrained models: converged runs of the paper's Table 9, shipped with pvae.

    import pvae
    pvae.pretrained.available()                       # name -> description, training and test numbers
    vae = pvae.pretrained.load("standard-binarized-mnist")  # the model, in eval mode, on the CPU
    run = pvae.pretrained.load_run("standard-binarized-mnist")  # + its config and training history

    $ pvae evaluate pretrained:standard-binarized-mnist --num-samples 5000

A pretrained model is an *exported run* (:func:`export`): a folder with ``config.json``,
``data.json``, ``metrics.jsonl`` (the training history), ``model.safetensors`` (the best-validation
weights: float32 as trained, or float16 where the manifest says so) and ``manifest.json``, which lists every other file with its SHA-256
and records the commit that trained the run, the SHA-256 of the checkpoint the weights were taken
from, and the reference evaluation (``reference-evaluation.json``, the run's ``pvae evaluate`` report).
The file names are ``WEIGHTS_FILE``, ``MANIFEST_FILE`` and ``REFERENCE_FILE`` (with its per-datapoint
values, when the report has them, as ``REFERENCE_VALUES_FILE``).
The weights are safetensors, not a pickle: loading a model file cannot run code, and every file is
checked against the manifest before anything is read from it.

A source is one of

- a bundled name (:func:`available`; the folders are in ``MODELS_DIR``, ``pvae/pretrained/models/``),
- a local folder written by :func:`export`,
- an ``http(s)://`` URL of such a folder (published elsewhere): ``manifest.json`` and the files it
  lists are downloaded into the cache folder and verified there; pass ``sha256=`` (the manifest's
  own SHA-256) to pin what you trust — a manifest with other contents is refused.

The cache folder (downloads, and the writable copies that ``pvae evaluate pretrained:NAME``
writes its report into) is ``cache_dir`` if given, else ``$PVAE_PRETRAINED_DIR``, else
``~/.cache/pvae/pretrained``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import statistics
import tempfile
import urllib.parse
from pathlib import Path
from typing import Callable, Dict, Optional

from pvae.data import _download  # atomic: a temporary file beside the target, renamed when complete
from pvae.data.files import file_sha256
from pvae.checkpoint import write_json
from pvae.errors import UsageError

__all__ = ["available", "load", "load_run", "locate", "writable_copy", "verify", "export", "cache_dir",
           "PretrainedChecksumError", "MODELS_DIR", "MANIFEST_FILE", "WEIGHTS_FILE", "REFERENCE_FILE",
           "REFERENCE_VALUES_FILE"]

#: the bundled models, one folder each
MODELS_DIR = Path(__file__).resolve().parent / "models"
MANIFEST_FILE = "manifest.json"
WEIGHTS_FILE = "model.safetensors"
REFERENCE_FILE = "reference-evaluation.json"
#: the reference evaluation's per-datapoint values (:mod:`pvae.inference.paired`), when it has them
REFERENCE_VALUES_FILE = "reference-evaluation.per-datapoint.csv"
#: the files every exported run holds besides the manifest (the reference evaluation is optional)
REQUIRED_FILES = ("config.json", "data.json", "metrics.jsonl", WEIGHTS_FILE)
CACHE_ENV = "PVAE_PRETRAINED_DIR"
FORMAT = 1
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class PretrainedChecksumError(UsageError):
    """A pretrained model's file is not the one its manifest (or the caller's pin) names."""


def cache_dir(path=None) -> Path:
    """The cache folder: ``path``, else ``$PVAE_PRETRAINED_DIR``, else ``~/.cache/pvae/pretrained``."""
    if path is not None:
        return Path(path)
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path.home() / ".cache" / "pvae" / "pretrained"


def _manifest(folder: Path) -> dict:
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise UsageError(f"{folder} is not an exported pvae model: {MANIFEST_FILE} is missing")
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"{path} is not a pvae manifest (not JSON: {exc})") from exc
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise UsageError(f"{path} is not a pvae manifest: it has no 'files' table")
    if manifest.get("format") != FORMAT:
        raise UsageError(f"{path} has manifest format {manifest.get('format')!r}; this pvae reads format {FORMAT} "
                         "(upgrade pvae)")
    for name in manifest["files"]:
        if not isinstance(name, str) or not _PLAIN_NAME.match(name) or name == MANIFEST_FILE:
            raise UsageError(f"{path} lists the file {name!r}: only plain file names in the model's folder are "
                             "allowed")
    missing = [name for name in REQUIRED_FILES if name not in manifest["files"]]
    if missing:
        raise UsageError(f"{path} does not list {', '.join(missing)}; an exported model needs "
                         f"{', '.join(REQUIRED_FILES)}")
    return manifest


def _check_pin(manifest: Path, sha256: Optional[str], where) -> None:
    """Refuse a manifest whose SHA-256 is not the pinned one (no pin: nothing to check)."""
    if sha256 is None:
        return
    actual = file_sha256(manifest) if manifest.is_file() else None
    if actual != sha256.lower():
        raise PretrainedChecksumError(f"{where} has SHA-256 {actual}, not the pinned {sha256}; it is not the model "
                                      "you asked for")


def verify(folder, sha256: Optional[str] = None) -> dict:
    """Check every file of an exported model against its manifest (and the manifest against
    ``sha256`` when given); returns the manifest. Raises :class:`PretrainedChecksumError` naming
    the file, the expected and the actual SHA-256."""
    folder = Path(folder)
    _check_pin(folder / MANIFEST_FILE, sha256, folder / MANIFEST_FILE)
    manifest = _manifest(folder)
    for name, expected in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            raise UsageError(f"{folder} lacks {name}, which its manifest lists")
        actual = file_sha256(path)
        if actual != expected:
            raise PretrainedChecksumError(f"{path} is corrupt or not the file its manifest names: SHA-256 {actual}, "
                                          f"expected {expected}; delete the folder and load the model again")
    return manifest


def available() -> Dict[str, dict]:
    """The bundled models: name -> its description, the run it reproduces, training (epochs, best
    epoch, the commit that trained it) and the reference test numbers (nats per datapoint)."""
    out = {}
    for folder in sorted(p for p in MODELS_DIR.iterdir() if (p / MANIFEST_FILE).is_file()) if MODELS_DIR.is_dir() else ():
        manifest = json.loads((folder / MANIFEST_FILE).read_text())
        out[folder.name] = {k: manifest.get(k) for k in ("description", "reproduces", "parameters", "training",
                                                          "trained_with", "evaluation")}
    return out


def _is_url(source: str) -> bool:
    return urllib.parse.urlparse(source).scheme in ("http", "https")


def _fetch_url(url: str, root: Path, sha256: Optional[str]) -> Path:
    """Download an exported model's folder into ``root``; a verified copy already there is reused."""
    base = url if url.endswith("/") else url + "/"
    digest = hashlib.sha256(base.encode()).hexdigest()[:12]
    stem = Path(urllib.parse.urlparse(base).path.rstrip("/")).name or "model"

    def download(staging: Path) -> None:
        try:
            _download(urllib.parse.urljoin(base, MANIFEST_FILE), staging / MANIFEST_FILE)
            # the pin first: the file names of a manifest are trusted only once it is the pinned one
            _check_pin(staging / MANIFEST_FILE, sha256, f"the manifest at {base}{MANIFEST_FILE}")
            for name in _manifest(staging)["files"]:
                _download(urllib.parse.urljoin(base, name), staging / name)
        except OSError as exc:  # urllib's URLError and HTTPError are OSErrors
            raise UsageError(f"could not download the model at {base}: {exc}") from exc

    return _verified_folder(root / f"{stem if _PLAIN_NAME.match(stem) else 'model'}-{digest}", sha256, download)


def _verified_folder(target: Path, sha256: Optional[str], fill: Callable[[Path], None]) -> Path:
    """``target`` if it holds a verified model (pinned to ``sha256`` when given), else a fresh one:
    ``fill`` writes the files into a staging folder beside it, which is verified and renamed into
    place (a damaged or other copy at ``target`` is replaced; a failure leaves nothing behind)."""
    if target.is_dir():
        try:
            verify(target, sha256)
            return target
        except UsageError:
            shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        fill(staging)
        verify(staging, sha256)
        _move_into_place(staging, target, sha256)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return target


def _move_into_place(staging: Path, target: Path, sha256: Optional[str]) -> None:
    """Rename a verified folder into place; when another process (a rank of the same torchrun
    job) got there first, keep its copy if it verifies."""
    try:
        os.replace(staging, target)
    except OSError:
        if not target.is_dir():
            raise
        verify(target, sha256)


def locate(source, *, cache=None, sha256: Optional[str] = None) -> Path:
    """The verified folder of ``source`` (a bundled name, a folder, or an http(s) URL, which is
    downloaded into the cache folder first). Nothing is loaded."""
    source = str(source)
    if _is_url(source):
        return _fetch_url(source, cache_dir(cache), sha256)
    if _PLAIN_NAME.match(source) and (MODELS_DIR / source / MANIFEST_FILE).is_file():
        folder = MODELS_DIR / source
    elif Path(source).is_dir():
        folder = Path(source)
    else:
        names = ", ".join(available()) or "none"
        raise UsageError(f"unknown pretrained model {source!r}: not a bundled name ({names}), a folder or an "
                         "http(s) URL")
    verify(folder, sha256)
    return folder


def writable_copy(source, *, cache=None, sha256: Optional[str] = None) -> Path:
    """A folder of ``source`` that evaluation reports can be written into: a bundled model is
    copied into the cache folder (once; the copy is verified on every call), a download is
    already there, a folder of your own is used as it is."""
    folder = locate(source, cache=cache, sha256=sha256)
    if folder.parent != MODELS_DIR:
        return folder

    def copy(staging: Path) -> None:
        for name in (MANIFEST_FILE, *_manifest(folder)["files"]):
            shutil.copyfile(folder / name, staging / name)

    return _verified_folder(cache_dir(cache) / folder.name, file_sha256(folder / MANIFEST_FILE), copy)


def load_run(source, device: str = "cpu", *, cache=None, sha256: Optional[str] = None):
    """The :class:`~pvae.runs.Run` of a pretrained model (model in eval mode on ``device``, its
    config and training history), after every file was verified (:func:`locate`)."""
    from pvae.runs import load_run as load_run_dir

    return load_run_dir(locate(source, cache=cache, sha256=sha256), device)


def load(source, device: str = "cpu", *, cache=None, sha256: Optional[str] = None):
    """The model of a pretrained run (a :class:`~pvae.model.VAE` or a family's model), in eval
    mode on ``device``: ``pvae.pretrained.load("standard-binarized-mnist")``."""
    return load_run(source, device, cache=cache, sha256=sha256).vae


def export(run_dir, out_dir, *, description: str, name: Optional[str] = None, reproduces: Optional[str] = None,
           evaluation=None, extra: Optional[dict] = None, dtype: str = "float32") -> Path:
    """Write ``run_dir``'s best-validation weights and records as an exported model in ``out_dir``
    (created; it must not exist; ``name``: the model's name, default the folder's): the files :data:`REQUIRED_FILES`, optionally the evaluation
    report ``evaluation`` (a path, copied as :data:`REFERENCE_FILE`), and the manifest with their
    SHA-256, the commit that trained the run (from its ``env.json``), the checkpoint's SHA-256 and
    the evaluation's summary; ``extra`` adds entries to the manifest (e.g. a reference estimate
    on a few test images that a quick check can reproduce). ``dtype="float16"`` stores the
    floating-point weights at half precision (half the file; they load back into the model's float32
    parameters): whether the estimates move is the exporter's to measure (see
    ``experiments/export_pretrained.py``); a weight beyond float16's range is refused. The
    evaluation's per-datapoint file (:mod:`pvae.inference.paired`), when it has one, is bundled
    beside it. Returns ``out_dir``."""
    import torch
    from safetensors.torch import save_file

    from pvae.checkpoint import load_checkpoint
    from pvae.training.loop import CHECKPOINT_FILE

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if out_dir.exists():
        raise UsageError(f"{out_dir} exists; export into a new folder")
    stored = {"float32": torch.float32, "float16": torch.float16}.get(dtype)
    if stored is None:
        raise UsageError(f"dtype {dtype!r}: choose float32 or float16")
    ckpt = load_checkpoint(run_dir / CHECKPOINT_FILE)
    state = ckpt["best_model"] if ckpt.get("best_model") is not None else ckpt["model"]
    env = json.loads((run_dir / "env.json").read_text()) if (run_dir / "env.json").exists() else {}
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}-"))
    try:
        weights, underflow = _stored_weights(state, stored)
        save_file(weights, str(staging / WEIGHTS_FILE), metadata={"format": "pvae"})
        for file in ("config.json", "data.json", "metrics.jsonl"):
            shutil.copyfile(run_dir / file, staging / file)
        summary = None
        if evaluation is not None:
            report = json.loads(Path(evaluation).read_text())
            if report.get("per_datapoint"):
                # bundled under its own name (an evaluation of the bundle writes the run's report names
                # into the same folder), checked against the report's hash first
                from pvae.inference.paired import read_per_datapoint

                read_per_datapoint(evaluation)
                shutil.copyfile(Path(evaluation).parent / report["per_datapoint"]["file"], staging / REFERENCE_VALUES_FILE)
                report["per_datapoint"] = {**report["per_datapoint"], "file": REFERENCE_VALUES_FILE}
            write_json(report, staging / REFERENCE_FILE)
            summary = {"split": report.get("split"), "num_datapoints": report.get("num_datapoints"),
                       "num_samples": report.get("num_samples"), "seed": report.get("seed"),
                       "evaluated_with": {k: report.get("environment", {}).get(k)
                                          for k in ("git_commit", "pvae", "torch", "device", "evaluated")},
                       "estimates": {name: {k: v for k, v in est.items() if k != "per_example"}
                                     for name, est in report["estimates"].items()}}
        metric = records[0]["val_metric"]
        manifest = {
            "format": FORMAT, "name": name or out_dir.name, "description": description, "reproduces": reproduces,
            "data_dim": ckpt["fit"]["data_dim"],
            "parameters": int(sum(v.numel() for v in state.values())), "dtype": dtype,
            # float16: weights that were not 0 and round to 0 (below about 6e-8)
            **({"float16_underflow_to_zero": underflow} if dtype == "float16" else {}),
            # (the median epoch, not the sum: a run paused or resumed has long epochs in its record)
            "training": {"epochs_run": records[-1]["epoch"], "best_epoch": ckpt.get("best_epoch"),
                         "stopped_early": bool(ckpt.get("stopped_early", False)), "validation_metric": metric,
                         "best_val": max(r[metric] for r in records),
                         "median_epoch_seconds": statistics.median(r["seconds"] for r in records)},
            "trained_with": {**{k: env.get(k) for k in ("git_commit", "pvae", "torch", "pyro", "device", "cuda_device",
                                                        "torch_num_threads", "platform", "started")},
                             # (each earlier sitting without its command line: it names the trainer's paths)
                             "earlier_sittings": [{k: v for k, v in sitting.items() if k != "command"}
                                                  for sitting in env["earlier_sittings"]]
                             if env.get("earlier_sittings") else None},
            "checkpoint_sha256": file_sha256(run_dir / CHECKPOINT_FILE),
            "evaluation": summary,
            **(extra or {}),
            "files": {name: file_sha256(staging / name) for name in sorted(os.listdir(staging))},
        }
        (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        verify(staging)
        mask = os.umask(0)
        os.umask(mask)
        for path in (staging, *staging.iterdir()):  # (mkdtemp and safetensors make them private)
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)
        os.replace(staging, out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return out_dir


def _stored_weights(state: dict, stored) -> tuple:
    """The state's tensors on the CPU, floating-point ones as ``stored``, and how many nonzero weights
    became 0 (underflow); a weight that is finite but overflows ``stored`` is refused (it would load
    as infinity)."""
    import torch

    out, underflow = {}, 0
    for key, value in state.items():
        value = value.detach().to("cpu")
        if value.is_floating_point():
            cast = value.to(stored)
            if bool((~torch.isfinite(cast) & torch.isfinite(value)).any()):
                raise UsageError(f"weight {key!r} reaches {float(value.abs().max()):.4g}, beyond {stored}'s range: "
                                 "export it as float32")
            underflow += int(((value != 0) & (cast == 0)).sum())
            value = cast
        out[key] = value.contiguous()
    return out, underflow
