"""Training objectives compared on static binarized MNIST, each run from the command line.

Every objective trains the same architecture for the same number of epochs:

    pvae train --dataset binarized-mnist --latent-dim 50 --hidden 200,200 --epochs E \\
        --patience none --run-dir OUT/NAME --resume <objective flags>

and is then evaluated with

    pvae evaluate OUT/NAME --num-samples K --split test

(the ELBO and L_K from the same K draws per test image, active units, KL). Objectives
(``--runs`` picks a subset): ``elbo``; ``elbo-5`` (the ELBO with 5 particles: IWAE-5's sample
budget without its tighter bound); ``iwae-5`` / ``iwae-50`` (``--objective iwae --particles 5|50``);
``iwae-5-dreg`` (the doubly reparametrized guide gradient); ``beta-4`` (``--beta 4``);
``warmup-5`` (linear KL warm-up over 5 epochs); ``infovae`` (α = 0, λ = 1000) and ``mmd-vae``
(α = 1, λ = 1000). Interrupted runs resume from their checkpoints; finished evaluations are
reused. The summary (one row per objective) goes to ``--summary``.

    PVAE_DATA_DIR=../shared/data python experiments/objectives_mnist.py --epochs 10 --K 1000
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

from pvae.checkpoint import write_json  # noqa: E402
from pvae.cli import main as pvae_main  # noqa: E402

OBJECTIVES = {
    "elbo": [],
    "elbo-5": ["--particles", "5"],
    "iwae-5": ["--objective", "iwae", "--particles", "5"],
    "iwae-50": ["--objective", "iwae", "--particles", "50"],
    "iwae-5-dreg": ["--objective", "iwae", "--particles", "5", "--dreg"],
    "beta-4": ["--beta", "4"],
    "warmup-5": ["--kl-warmup", "5"],
    "infovae": ["--objective", "infovae", "--info-alpha", "0", "--mmd-lambda", "1000"],
    "mmd-vae": ["--objective", "infovae", "--info-alpha", "1", "--mmd-lambda", "1000"],
}


def write_summary(args, rows):
    write_json({
        "experiment": "training objectives, same architecture and epochs, pvae train/evaluate from the CLI",
        "dataset": args.dataset, "latent_dim": args.latent_dim, "hidden": args.hidden, "epochs": args.epochs,
        "evaluation": f"test split, ELBO and L_K from the same K={args.K} draws per image; "
                      "active units: Var_x E_q[z_u|x] > 0.01; test_kl: mean KL(q(z|x)||p(z)) in closed form",
        "runs": rows,
    }, args.summary)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default=",".join(OBJECTIVES), help=f"subset of {', '.join(OBJECTIVES)}")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--K", type=int, default=1000, help="importance samples per test image")
    parser.add_argument("--dataset", default="binarized-mnist")
    parser.add_argument("--latent-dim", type=int, default=50)
    parser.add_argument("--hidden", default="200,200")
    parser.add_argument("--out-dir", type=Path, default=Path("results/objectives_mnist"))
    parser.add_argument("--summary", type=Path, default=HERE / "results" / "objectives_mnist.json")
    args = parser.parse_args(argv)
    names = [n for n in args.runs.split(",") if n]
    unknown = sorted(set(names) - set(OBJECTIVES))
    if unknown:
        raise SystemExit(f"unknown run(s) {unknown}; valid: {', '.join(OBJECTIVES)}")
    rows = []
    for name in names:
        run_dir = args.out_dir / name
        flags = ["train", "--dataset", args.dataset, "--latent-dim", str(args.latent_dim), "--hidden", args.hidden,
                 "--epochs", str(args.epochs), "--patience", "none", "--run-dir", str(run_dir), "--no-progress",
                 *OBJECTIVES[name]]
        if (run_dir / "config.json").exists():
            flags.append("--resume")
        t0 = time.perf_counter()
        if pvae_main(flags) != 0:
            raise SystemExit(f"pvae train failed for {name}")
        train_call = time.perf_counter() - t0
        report_path = run_dir / f"evaluation-test-K{args.K}.json"
        if not report_path.exists():
            if pvae_main(["evaluate", str(run_dir), "--num-samples", str(args.K), "--no-progress"]) != 0:
                raise SystemExit(f"pvae evaluate failed for {name}")
        report = json.loads(report_path.read_text())
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        best = max(records, key=lambda r: r["val_elbo"])
        est = report["estimates"]
        rows.append({
            "name": name, "flags": " ".join(OBJECTIVES[name]), "epochs": len(records),
            "objective": records[-1]["objective"], "num_particles": records[-1]["num_particles"],
            "final_train_objective": records[-1]["train_objective"],
            "best_val_elbo": best["val_elbo"], "best_epoch": best["epoch"],
            "test_elbo": est["elbo"]["mean"], "test_elbo_stderr": est["elbo"]["stderr"],
            "test_iwae": est["iwae"]["mean"], "test_iwae_stderr": est["iwae"]["stderr"],
            "test_iwae_mc_stderr": est["iwae"]["mc_stderr_of_mean"], "K": est["iwae"]["num_samples"],
            "active_units": report["latent"]["active_units"], "latent_dim": report["latent"]["latent_dim"],
            "test_kl": report["latent"]["kl_total"],
            "train_seconds": sum(r["seconds"] for r in records), "this_call_train_seconds": train_call,
        })
        print(json.dumps(rows[-1]), flush=True)
        write_summary(args, rows)  # after every run: an interrupted experiment keeps its rows


if __name__ == "__main__":
    sys.exit(main())
