"""Data-parallel scaling on this machine: 1 vs N gloo processes under torchrun (issue 14).

Two comparisons, each a real ``pvae train`` run of a 784-500-500-50 model on binarized MNIST:

* **same global batch** (strong scaling): 1 process with batch B vs N processes with global
  batch B. The deterministic autoencoder makes the parameters comparable exactly (largest
  difference recorded); seconds per epoch from ``metrics.jsonl``.
* **same batch per process** (weak scaling): 1 process with batch b vs N processes with global
  batch N*b: datapoints per second.

Every process gets ``torch_threads = cores / N`` threads (``OMP_NUM_THREADS``), so the comparison
uses the same cores. Writes ``benchmarks/results/distributed.json`` with the git commit and the
load average; run on an idle machine.

    python benchmarks/bench_distributed.py [--nproc 2] [--epochs 1] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _provenance import provenance  # noqa: E402

sys.path.insert(0, str(HERE.parent))
from pvae.checkpoint import load_checkpoint  # noqa: E402


def run(nproc: int, batch: int, epochs: int, out: Path, model: str, dataset: str, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    args = ["-m", "pvae", "train", "--dataset", dataset, "--model", model, "--latent-dim", "50", "--hidden", "500,500",
            "--batch-size", str(batch), "--epochs", str(epochs), "--no-progress", "--run-dir", str(out)]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    else:
        cmd = [sys.executable, *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=HERE.parent)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    num_train = load_checkpoint(out / "checkpoint.pt")["fit"]["num_train"]
    return {"processes": nproc, "global_batch": batch, "threads_per_process": threads,
            "epoch_seconds": [r["seconds"] for r in records],
            "datapoints_per_second": [num_train / r["seconds"] for r in records]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch", type=int, default=100, help="batch per process (weak) / global (strong)")
    parser.add_argument("--smoke", action="store_true", help="digits instead of binarized MNIST")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "distributed.json")
    args = parser.parse_args(argv)
    cores = os.cpu_count() or 1
    dataset = "digits" if args.smoke else "binarized-mnist"
    n = args.nproc
    result = {"benchmark": "issue 14: 1 vs N gloo processes", "provenance": provenance(torch.device("cpu")),
              "dataset": dataset, "cores": cores}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        one = run(1, args.batch, args.epochs, tmp / "s1", "autoencoder", dataset, cores)
        many = run(n, args.batch, args.epochs, tmp / "sn", "autoencoder", dataset, max(1, cores // n))
        a, b = load_checkpoint(tmp / "s1" / "checkpoint.pt")["model"], load_checkpoint(tmp / "sn" / "checkpoint.pt")["model"]
        result["same_global_batch"] = {
            "one_process": one, f"{n}_processes": many,
            "max_abs_parameter_difference": max(float((a[k] - b[k]).abs().max()) for k in a),
            "speedup": one["epoch_seconds"][-1] / many["epoch_seconds"][-1],
        }
        weak_one = run(1, args.batch, args.epochs, tmp / "w1", "vae", dataset, cores)
        weak_many = run(n, n * args.batch, args.epochs, tmp / "wn", "vae", dataset, max(1, cores // n))
        result["same_batch_per_process"] = {
            "one_process": weak_one, f"{n}_processes": weak_many,
            "epoch_time_ratio": weak_many["epoch_seconds"][-1] / weak_one["epoch_seconds"][-1],
            "note": "the N-process run takes N-fold fewer (N-fold larger) global steps per epoch",
        }
    result["load_average_after"] = list(os.getloadavg())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k.startswith("same")}, indent=1, default=str)[:3000])


if __name__ == "__main__":
    main()
