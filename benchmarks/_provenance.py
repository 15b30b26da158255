"""What every benchmark result file records: the git commit, the machine and its load."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


#: folders of result files: the scripts write them, so a change there is not a change of the code
from pvae.runs import RESULT_FOLDERS  # noqa: E402


def git_commit() -> str:
    """HEAD, with ``-dirty`` when a tracked file other than a result file differs from it (a script
    run after another has rewritten that one's result file runs the same code)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                 capture_output=True, text=True, check=True).stdout.splitlines()
        dirty = [line for line in changed if not line[3:].startswith(RESULT_FOLDERS)]
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def provenance(device: torch.device) -> dict:
    out = {
        "git_commit": git_commit(),
        "load_average_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
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
