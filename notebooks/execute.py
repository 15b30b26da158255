"""Execute notebooks at full size, in place, so that they are committed with their outputs.

    python notebooks/execute.py                      # every notebook
    python notebooks/execute.py notebooks/04_*.ipynb

Each executed notebook records, in its metadata (``pvae``), the SHA-256 of its code cells'
sources, the git commit and the pvae version it ran with. ``tests/test_scripts.py`` fails when a
committed notebook lacks outputs or its code changed since it was executed (stale outputs), and
separately runs every notebook at smoke size (``PVAE_NOTEBOOK_*`` environment variables).
Full size means those variables unset: the sizes written in the notebooks.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMOKE_VARIABLES = ("PVAE_NOTEBOOK_EPOCHS", "PVAE_NOTEBOOK_K", "PVAE_NOTEBOOK_AIS_STEPS", "PVAE_NOTEBOOK_TRAIN_IMAGES")


def source_sha256(nb) -> str:
    """SHA-256 of the code cells' sources, in order (what the outputs were computed from)."""
    h = hashlib.sha256()
    for cell in nb.cells:
        if cell.cell_type == "code":
            h.update(cell.source.encode() + b"\0")
    return h.hexdigest()


def execute(path: Path, timeout: int = 7200) -> float:
    import nbclient
    import nbformat

    import pvae

    nb = nbformat.read(path, as_version=4)
    env_before = {k: os.environ.pop(k) for k in SMOKE_VARIABLES if k in os.environ}
    t0 = time.perf_counter()
    try:
        nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                resources={"metadata": {"path": str(ROOT)}}).execute()
    finally:
        os.environ.update(env_before)
    seconds = time.perf_counter() - t0
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    nb.metadata["pvae"] = {"source_sha256": source_sha256(nb), "git_commit": commit, "pvae": pvae.__version__,
                           "seconds": round(seconds, 1), "executed": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    nbformat.write(nb, path)
    return seconds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", type=Path)
    args = parser.parse_args(argv)
    paths = args.notebooks or sorted((ROOT / "notebooks").glob("*.ipynb"))
    for path in paths:
        seconds = execute(path)
        print(f"{path.name}: executed in {seconds:.0f} s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
