"""The model families of issue 25 side by side on the binarized 8x8 digits, from the command line.

Every family trains the same MLPs (256-256, softplus) for the same epochs with the same seed:

    pvae train --dataset digits --latent-dim L --hidden 256,256 --lr 1e-3 --epochs E --patience 50 \\
        --objective elbo --run-dir OUT/NAME --resume <family flags>

and is evaluated on the 300 test digits with

    pvae evaluate OUT/NAME --num-samples K --estimators elbo,iwae,naive

plus AIS (``--ais-steps``, ``--ais-chains``; HMC over every continuous level) on the same test
digits, except for the rows in ``NO_AIS`` (the CVAE; M2, whose AIS costs ten times the others').
A finished evaluation with the same settings is reused. Latent units are equal in total (8: one level of 8, or two of
4). Rows: ``vae``, ``hvae`` (Tomczak & Welling's two-level HVAE), ``ladder`` (Sønderby et al.'s
ladder VAE), ``hvae-vamp`` (the HVAE with a VampPrior of 50 pseudo-inputs on its top level),
``mixture`` (10 enumerated components), ``mixture-relaxed`` (trained with a Gumbel-softmax
component, evaluated enumerated), ``m2-100`` / ``m2-all`` (Kingma et al.'s M2 with 100 or every
training label) and ``cvae`` (conditioned on the label: its bounds are of log p(x | label), not
comparable with the others'). These are short runs on a small data set, a check that every family
trains and is scored by the same estimators — not converged numbers.

    PVAE_DATA_DIR=../shared/data python experiments/families_digits.py --epochs 300 --K 1000
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "benchmarks"))
from _provenance import provenance  # noqa: E402

from pvae.checkpoint import write_json  # noqa: E402
from pvae.cli import main as pvae_main  # noqa: E402

RUNS = {
    "vae": ["--latent-dim", "8"],
    "hvae": ["--latent-dim", "4", "--model", "hvae", "--levels", "2"],
    "ladder": ["--latent-dim", "4", "--model", "hvae", "--levels", "2", "--variant", "ladder"],
    "hvae-vamp": ["--latent-dim", "4", "--model", "hvae", "--levels", "2", "--prior", "vamp",
                  "--prior-pseudo-inputs", "50"],
    "mixture": ["--latent-dim", "8", "--model", "mixture", "--components", "10"],
    "mixture-relaxed": ["--latent-dim", "8", "--model", "mixture", "--components", "10", "--relaxed"],
    "m2-100": ["--latent-dim", "8", "--model", "m2", "--labelled", "100"],
    "m2-all": ["--latent-dim", "8", "--model", "m2", "--labelled", "-1"],
    "cvae": ["--latent-dim", "8", "--model", "cvae"],
}


#: rows without AIS, and why
NO_AIS = {
    "cvae": "its bounds are of log p(x | label); AIS from p(z | label) was not run",
    "m2-100": "M2's label enters the decoder, so each HMC step of AIS (the label summed out inside the density) "
              "runs the decoder once per class: 10 times the other rows' cost, hours on 2 CPU cores",
    "m2-all": "as m2-100",
}


def _finished(run: Path, epochs: int, patience: int = 50) -> bool:
    metrics = run / "metrics.jsonl"
    if not (run / "checkpoint.pt").exists() or not metrics.exists():
        return False
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    if not records:
        return False
    best = max(records, key=lambda r: r[r["val_metric"]])
    return records[-1]["epoch"] >= epochs or records[-1]["epoch"] - best["epoch"] >= patience


def _training_commits(run: Path) -> list:
    """The code commit of every sitting that trained ``run`` (from its env.json), oldest first."""
    env = json.loads((run / "env.json").read_text())
    return [s.get("git_commit") for s in env.get("earlier_sittings", [])] + [env.get("git_commit")]


def _evaluated(report_file: Path, estimators: str, args) -> bool:
    """Whether ``report_file`` holds an evaluation with these settings."""
    if not report_file.exists():
        return False
    spec = json.loads(report_file.read_text()).get("spec") or {}
    ais = spec.get("ais") or {}
    return (sorted(spec.get("estimators", [])) == sorted(estimators.split(",")) and spec.get("num_samples") == args.K
            and ("ais" not in estimators or (ais.get("num_steps") == args.ais_steps
                                             and ais.get("num_chains") == args.ais_chains)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default=",".join(RUNS), help="comma-separated subset of the rows")
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--K", type=int, default=1000, help="importance samples per test digit")
    parser.add_argument("--ais-steps", type=int, default=500)
    parser.add_argument("--ais-chains", type=int, default=16)
    parser.add_argument("--hidden", default="256,256")
    parser.add_argument("--out-dir", type=Path, default=HERE.parent / "results" / "families_digits")
    parser.add_argument("--summary", type=Path, default=HERE / "results" / "families_digits.json")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = args.runs.split(",")
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        parser.error(f"unknown runs {unknown}; choose from {', '.join(RUNS)}")
    start = provenance(torch.device("cpu"))  # the load at the start, before this script's own work
    rows = {}
    for name in names:
        run = args.out_dir / name
        common = ["--dataset", "digits", "--hidden", args.hidden, "--lr", "1e-3", "--epochs", str(args.epochs),
                  "--patience", "50", "--objective", "elbo", "--seed", "0", "--no-progress"]
        if not _finished(run, args.epochs):  # (a finished run is not resumed: its env.json names the sittings that trained it)
            code = pvae_main(["train", "--run-dir", str(run), *(["--resume"] if (run / "config.json").exists() else []),
                              *common, *RUNS[name]])
            if code != 0:
                raise SystemExit(f"training {name} failed (exit {code})")
        estimators = "elbo,iwae,naive" + ("" if name in NO_AIS else ",ais")
        report_file = run / f"evaluation-test-K{args.K}.json"
        if not _evaluated(report_file, estimators, args):  # (a finished evaluation with these settings is reused)
            code = pvae_main(["evaluate", str(run), "--num-samples", str(args.K), "--estimators", estimators,
                              "--ais-steps", str(args.ais_steps), "--chains", str(args.ais_chains), "--no-progress",
                              "--psis-datapoints", "0"])
            if code != 0:
                raise SystemExit(f"evaluating {name} failed (exit {code})")
        report = json.loads(report_file.read_text())
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
        best = max(metrics, key=lambda r: r[r["val_metric"]])
        rows[name] = {
            "flags": RUNS[name],
            "config": json.loads((run / "config.json").read_text())["model"],
            "epochs_run": metrics[-1]["epoch"], "best_epoch": best["epoch"],
            "best_val_elbo": best[best["val_metric"]],
            "estimates": {k: {"mean": v["mean"], "stderr": v["stderr"], "estimator": v["estimator"],
                              "num_samples": v["num_samples"]} for k, v in report["estimates"].items()},
            "latent": {k: report["latent"].get(k) for k in ("active_units", "latent_dim", "kl_total", "per_site")},
            "trained_with_commits": _training_commits(run),
            "evaluated_with_commit": (report.get("environment") or {}).get("git_commit"),
            "classification": report.get("classification"),
            "conditional": name == "cvae",
            "ais_not_run": NO_AIS.get(name),
        }
        print(f"{name}: " + ", ".join(f"{k} {v['mean']:.2f}" for k, v in rows[name]["estimates"].items()))
    write_json({
        "experiment": "model families on binarized digits (issue 25), short runs, not converged",
        "command": "python experiments/families_digits.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "settings": {"epochs": args.epochs, "K": args.K, "ais_steps": args.ais_steps, "ais_chains": args.ais_chains,
                     "hidden": args.hidden, "test_images": 300},
        "provenance": start,
        "rows": rows,
    }, args.summary)
    print(f"wrote {args.summary}")


if __name__ == "__main__":
    main()
