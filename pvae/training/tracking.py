"""Experiment tracking through the tools users already run.

``metrics.jsonl`` in the run directory stays the source of truth; a tracker receives the same
records as they are written (the trackers by name: :data:`TRACKERS`):

* ``"tensorboard"`` — :class:`TensorBoardLogger`: event files under ``<run>/tensorboard/`` (every
  numeric field of each epoch's record as a scalar, the config as text, the run's figures as
  images). View with ``tensorboard --logdir runs``.
* ``"mlflow"`` — :class:`MLflowLogger`: an MLflow run in ``$MLFLOW_TRACKING_URI``, by default the
  local file store ``./mlruns`` (no server needed; view with ``mlflow ui``): the config's settings as
  params, the records as metrics by epoch, the run's files as artifacts. A resumed pvae run
  continues the same MLflow run (its id is kept in ``<run>/mlflow_run_id``).

Both packages are optional: ``pip install "pyro-aevb[tracking]"``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Dict, List, Sequence

from pvae.errors import UsageError

__all__ = ["TRACKERS", "make_trackers", "check_trackers", "TensorBoardLogger", "MLflowLogger"]

TRACKERS = ("tensorboard", "mlflow")
#: files of a run directory logged as artifacts / images at the end of training
RUN_FILES = ("config.json", "env.json", "data.json", "metrics.jsonl")


def _numeric(record: dict) -> Dict[str, float]:
    return {k: float(v) for k, v in record.items()
            if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def _flat(config: dict, prefix: str = "") -> Dict[str, str]:
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat(value, name + "."))
        else:
            out[name] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
    return out


class TensorBoardLogger:
    """Writes a run's records to TensorBoard event files under ``<run>/tensorboard/`` (every numeric
    field as a scalar by epoch, the config as text, the run's figures as images)."""

    def __init__(self, run_dir, config: dict):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise UsageError(f"--log tensorboard needs the tensorboard package ({exc}); "
                             'pip install "pyro-aevb[tracking]"') from None
        self.run_dir = Path(run_dir)
        self.writer = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```")

    def log_epoch(self, record: dict) -> None:
        for key, value in _numeric(record).items():
            self.writer.add_scalar(key, value, global_step=int(record["epoch"]))
        self.writer.flush()

    def log_run_files(self, step: int) -> None:
        import numpy as np
        from PIL import Image

        for png in sorted(self.run_dir.glob("*.png")):
            with Image.open(png) as im:
                self.writer.add_image(png.stem, np.asarray(im.convert("RGB")), global_step=step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class MLflowLogger:
    """Logs a run to MLflow (``$MLFLOW_TRACKING_URI``, by default the local file store ``./mlruns``):
    the config as params, the records as metrics by epoch, the run's files as artifacts; a resumed
    run continues its MLflow run."""

    def __init__(self, run_dir, config: dict):
        uri = os.environ.get("MLFLOW_TRACKING_URI") or Path("mlruns").resolve().as_uri()
        if uri.startswith("file:") or "://" not in uri:
            # MLflow keeps its local file store working behind this switch (no server, no database)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        try:
            from mlflow.tracking import MlflowClient
        except ImportError as exc:
            raise UsageError(f"--log mlflow needs the mlflow package ({exc}); "
                             'pip install "pyro-aevb[tracking]"') from None
        self.run_dir = Path(run_dir)
        self.client = MlflowClient(tracking_uri=uri)
        self.uri = uri
        id_file = self.run_dir / "mlflow_run_id"
        if id_file.exists():  # a resumed pvae run continues its MLflow run
            self.run_id = id_file.read_text().strip()
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "pvae")
            experiment = self.client.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
            run = self.client.create_run(experiment_id, run_name=self.run_dir.name,
                                         tags={"pvae.run_dir": str(self.run_dir.resolve())})
            self.run_id = run.info.run_id
            id_file.write_text(self.run_id + "\n")
            for key, value in _flat(config).items():
                self.client.log_param(self.run_id, key, value[:500])

    def log_epoch(self, record: dict) -> None:
        for key, value in _numeric(record).items():
            self.client.log_metric(self.run_id, key, value, step=int(record["epoch"]))

    def log_run_files(self, step: int) -> None:
        for path in sorted(self.run_dir.glob("*.png")) + [self.run_dir / f for f in RUN_FILES]:
            if path.exists():
                self.client.log_artifact(self.run_id, str(path))

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def check_trackers(names: Sequence[str]) -> None:
    """Refuse unknown trackers and trackers whose package is missing (before a run writes anything)."""
    unknown = sorted(set(names) - set(TRACKERS))
    if unknown:
        raise UsageError(f"unknown tracker(s) {unknown}; valid choices: {', '.join(TRACKERS)}")
    import importlib.util

    for name, module in (("tensorboard", "tensorboard"), ("mlflow", "mlflow")):
        if name in names and importlib.util.find_spec(module) is None:
            raise UsageError(f"--log {name} needs the {module} package; pip install \"pyro-aevb[tracking]\"")


def make_trackers(names: Sequence[str], run_dir, config: dict) -> List:
    """The trackers named in ``names`` (any of :data:`TRACKERS`) for the run in ``run_dir``."""
    check_trackers(names)
    classes = {"tensorboard": TensorBoardLogger, "mlflow": MLflowLogger}
    return [classes[name](run_dir, config) for name in dict.fromkeys(names)]
