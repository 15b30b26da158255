"""What every benchmark result file records: the git commit, the machine and its load."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

from pvae.runs import cpu_flushes_denormals, source_commit

ROOT = Path(__file__).resolve().parents[1]


def git_commit() -> str:
    """HEAD of this repository, with ``-dirty`` when a tracked file other than a result file differs
    from it (a script run after another has rewritten that one's result file runs the same code)."""
    return source_commit(ROOT) or "unknown"


def provenance(device: torch.device) -> dict:
    out = {
        "git_commit": git_commit(),
        "load_average_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_flush_denormal": cpu_flushes_denormals(),  # the pvae command and the experiments flush them
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "device": str(device),
    }
    try:
        import pyro

        out["pyro"] = pyro.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
    return out
