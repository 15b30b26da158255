"""The prior x guide grid on static binarized MNIST, each run from the command line.

For every prior in ``--priors`` and guide in ``--guides`` this runs

    pvae train --dataset binarized-mnist --latent-dim 50 --hidden 500,500 --epochs E \\
        --prior P --guide G --run-dir OUT/P-G --resume

(an interrupted grid resumes where it stopped: finished runs are skipped, a half-trained
one continues from its checkpoint) and collects each run's best validation ELBO (nats per
image, one sample per image on all 10,000 validation images) into a JSON summary.

    PVAE_DATA_DIR=../shared/data python experiments/components_grid.py --epochs 5
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--priors", default="standard-normal,mog,vamp,flow")
    parser.add_argument("--guides", default="diagonal,full-rank,iaf,planar")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--dataset", default="binarized-mnist")
    parser.add_argument("--latent-dim", type=int, default=50)
    parser.add_argument("--hidden", default="500,500")
    parser.add_argument("--extra", default="", help="more pvae train flags, space separated")
    parser.add_argument("--out-dir", type=Path, default=Path("results/components_grid"))
    parser.add_argument("--summary", type=Path, default=HERE / "results" / "components_grid.json")
    args = parser.parse_args(argv)
    rows = []
    for prior in args.priors.split(","):
        for guide in args.guides.split(","):
            run_dir = args.out_dir / f"{prior}-{guide}"
            flags = ["train", "--dataset", args.dataset, "--latent-dim", str(args.latent_dim),
                     "--hidden", args.hidden, "--epochs", str(args.epochs), "--prior", prior,
                     "--guide", guide, "--patience", "none", "--run-dir", str(run_dir), "--no-progress",
                     *args.extra.split()]
            if (run_dir / "config.json").exists():
                flags.append("--resume")
            t0 = time.perf_counter()
            code = pvae_main(flags)
            if code != 0:
                raise SystemExit(f"pvae train failed for {prior} x {guide} (exit {code})")
            records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            best = max(records, key=lambda r: r["val_elbo"])
            rows.append({
                "prior": prior, "guide": guide, "epochs": len(records),
                "best_val_elbo": best["val_elbo"], "best_val_elbo_stderr": best["val_elbo_stderr"],
                "best_epoch": best["epoch"], "final_train_objective": records[-1]["train_objective"],
                "train_seconds": sum(r["seconds"] for r in records),
                "this_call_seconds": time.perf_counter() - t0,
            })
            print(json.dumps(rows[-1]), flush=True)
    summary = {
        "experiment": "prior x guide grid, pvae train from the CLI",
        "dataset": args.dataset, "latent_dim": args.latent_dim, "hidden": args.hidden,
        "epochs": args.epochs, "extra_flags": args.extra,
        "metric": "best validation ELBO over epochs, 1 sample per image, all validation images, nats",
        "runs": rows,
    }
    write_json(summary, args.summary)


if __name__ == "__main__":
    sys.exit(main())
