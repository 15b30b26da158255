"""Inference-gap decomposition (Cremer et al., 2018) of a trained binarized-MNIST VAE.

For the first ``--images`` test images of the run in ``--run-dir`` (default: the seed-0 model of
``experiments/aevb_binarized_mnist.py``), :func:`pvae.diagnostics.inference_gaps` refines a
per-datapoint diagonal Gaussian q* from the encoder's output (decoder fixed) and reports

* ELBO[q_phi] (amortized), ELBO[q*] (refined) and log p(x) estimated by L_K under q*,
* the approximation gap log p(x) - ELBO[q*] and the amortization gap ELBO[q*] - ELBO[q_phi].

    PVAE_DATA_DIR=../shared/data python experiments/inference_gaps_mnist.py
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _provenance import provenance  # noqa: E402

import pvae  # noqa: E402
from pvae.checkpoint import write_json  # noqa: E402
from pvae.data.files import file_sha256  # noqa: E402
from pvae.diagnostics import inference_gaps  # noqa: E402

HERE = Path(__file__).resolve().parent


def mean_se(values: torch.Tensor) -> dict:
    values = values.double()
    return {"mean": float(values.mean()), "stderr": float(values.std() / math.sqrt(values.numel()))}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, default=Path("results/aevb_binarized_mnist/pvae-seed0"))
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--K", type=int, default=5000)
    parser.add_argument("--refine-steps", type=int, default=500)
    parser.add_argument("--particles", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--train-missing", default=None, metavar="DATASET",
                        help="if RUN_DIR holds no run, train a small one on DATASET first (smoke runs)")
    parser.add_argument("--summary", type=Path, default=HERE / "results" / "inference_gaps_mnist.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.train_missing and not (args.run_dir / "checkpoint.pt").exists():
        pvae.train_run(pvae.RunConfig(dataset=args.train_missing, latent_dim=2, net={'hidden': (16,)}, training={'epochs': 2}),
                       args.run_dir, progress=False)
    run = pvae.load_run(args.run_dir)
    config, vae = run.config, run.vae
    x = pvae.load_dataset(config.dataset).test[: args.images]
    started = provenance(torch.device("cpu"))
    t0 = time.perf_counter()
    gaps = inference_gaps(vae, x, num_samples=args.K, refine_steps=args.refine_steps, lr=args.lr,
                          num_particles=args.particles)
    seconds = time.perf_counter() - t0
    write_json({
        "experiment": "inference-gap decomposition (Cremer et al., 2018)",
        "provenance": started,
        "run_dir": str(args.run_dir),
        "checkpoint_sha256": file_sha256(args.run_dir / "checkpoint.pt"),
        "images": f"first {x.shape[0]} test images of {config.dataset.name}",
        "settings": gaps["settings"],
        "seconds": seconds,
        "elbo_amortized": gaps["elbo_amortized"].to_dict(),
        "elbo_refined": gaps["elbo_refined"].to_dict(),
        "log_marginal": gaps["log_marginal"].to_dict(),
        "approximation_gap": mean_se(gaps["approximation_gap"]),
        "amortization_gap": mean_se(gaps["amortization_gap"]),
    }, args.summary)
    print(args.summary.read_text())


if __name__ == "__main__":
    from pvae.cli import configure_cpu

    configure_cpu()  # subnormal floats flushed, as the pvae command does (before the thread pool starts)
    sys.exit(main())
