"""Evaluate a bundled pretrained model the way a user of a fresh clone would, and compare with its
Table 9 row (issue 26: "a fresh clone evaluates a pretrained model and matches its Table 9 row").

Runs the command line a user types, ``pvae evaluate pretrained:NAME --num-samples 5000 --seed S``
(as ``python -m pvae`` from the repository root), in a subprocess whose pretrained cache folder
(``$PVAE_PRETRAINED_DIR``) holds no copy of the model on a first run, so the model is verified and
copied from the package as on a first use. The seed (default 1) must not be the seed of the report
in the model's manifest (0): the new estimates are then independent draws (each minibatch is seeded
by a hash of the seed and its index), and each differs from the manifest's by Monte Carlo error
alone. The comparison per estimator is the
difference of the means over the same test images, its Monte Carlo standard error
(sqrt(mc_1^2 + mc_2^2) from the two reports' ``mc_stderr_of_mean``) and z = difference / that
standard error; |z| < 3 is "within Monte Carlo error" (L_5000's Monte Carlo error is the delta
method's, which understates it where PSIS k-hat > 0.7, so a larger |z| there is a flag, not yet a
discrepancy; tests/test_pretrained.py allows 4.5 for that reason). The Table 9 row of
``experiments/results/reproduce.json`` is checked to be the manifest's report.

Writes ``experiments/results/pretrained_evaluate-<NAME>.json`` with the git commit, the load
average, the model's manifest SHA-256 and checkpoint SHA-256, the command, its wall time and the
report's estimates (without per-image values), and, where the bundled reference report has its
per-datapoint values, the same comparison image by image (``paired``: the paired standard error of
the difference, an empirical Monte Carlo error with no delta method). A killed run resumes: rerun the same command (the
evaluation keeps its finished minibatches in the cache folder); the record then lists every
sitting (its commit and start) and says that it resumed, since the cache was no longer empty.

    python experiments/pretrained_evaluate.py vamp-binarized-mnist --num-samples 5000
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))
from _provenance import provenance  # noqa: E402

from pvae import pretrained  # noqa: E402
from pvae.checkpoint import atomic_write  # noqa: E402
from pvae.files import file_sha256  # noqa: E402
from pvae.inference.evaluation import EvaluationReport  # noqa: E402
from pvae.runs import _partial_files  # noqa: E402

COMPARED = ("elbo", "iwae")  # the estimators of a Table 9 row
WITHIN = 3.0  # |z| below this: the two estimates differ by Monte Carlo error


def compare(new: dict, reference: dict) -> dict:
    """Per estimator in both: the two means, their difference (new - reference), its Monte Carlo
    standard error and z. Both must average the same number of images with the same sample count:
    otherwise the difference is not Monte Carlo error, and the entry says so instead."""
    out = {}
    for name in COMPARED:
        if name not in new or name not in reference:
            continue
        a, b = new[name], reference[name]
        differ = [f"{field} {a[field]} here, {b[field]} in the reference" for field in ("num_datapoints", "num_samples")
                  if a[field] != b[field]]
        if differ:
            out[name] = {"new": a["mean"], "reference": b["mean"], "comparable": False, "why": "; ".join(differ)}
            continue
        diff = a["mean"] - b["mean"]
        mc = math.hypot(a["mc_stderr_of_mean"], b["mc_stderr_of_mean"])
        z = diff / mc if mc > 0 else (0.0 if diff == 0 else math.inf)
        out[name] = {"new": a["mean"], "reference": b["mean"], "difference": diff, "mc_stderr_of_difference": mc,
                     "z": z, "comparable": True, "within_mc_error": abs(z) < WITHIN,
                     "stderr_over_images": a["stderr"], "num_datapoints": a["num_datapoints"],
                     "num_samples": a["num_samples"]}
    return out


def paired_with_reference(report_path: Path, reference_path: Path):
    """Image by image (:func:`pvae.paired_difference`), per estimator: new - reference with the paired
    standard error, an empirical Monte Carlo error with no delta method; None when either report has
    no per-datapoint values (the models bundled before them)."""
    from pvae.inference.paired import paired_difference

    reports = [json.loads(Path(p).read_text()) for p in (report_path, reference_path)]
    if not all(r.get("per_datapoint") for r in reports):
        return None
    out = {}
    for name in COMPARED:
        if all(name in r["estimates"] for r in reports):
            result = paired_difference(report_path, reference_path, name).to_dict()
            result.pop("labels")
            result["within_mc_error"] = result["z"] is None or abs(result["z"]) < WITHIN  # (None: the same draws)
            out[name] = result
    return out


def table9_row(manifest: dict, results: Path) -> dict:
    """The row of ``reproduce.json`` this model reproduces, checked against the manifest's report
    (a model whose manifest is not its Table 9 row would compare against the wrong number)."""
    if not results.exists() or not manifest.get("reproduces"):
        return {"run": manifest.get("reproduces"), "found": False}
    runs = json.loads(results.read_text()).get("runs", {})
    row = runs.get(manifest["reproduces"])
    if row is None:
        return {"run": manifest["reproduces"], "found": False}
    same = {"checkpoint_sha256": row.get("checkpoint_sha256") == manifest["checkpoint_sha256"]}
    for name in COMPARED:
        reported = manifest["evaluation"]["estimates"].get(name, {}).get("mean")
        table = (row.get(f"test_{name}") or {}).get("mean")
        same[name] = table is not None and reported is not None and table == reported
    return {"run": manifest["reproduces"], "found": True, "same_as_manifest": same,
            "table9_test": {name: row[f"test_{name}"] for name in COMPARED if row.get(f"test_{name}")}}


def check_report(report: dict, *, seed: int, num_samples: int, psis_datapoints: int, commit: str) -> None:
    """Refuse a report that is not the one this script asked for (a report of other settings or
    other code must not be compared as if it were)."""
    asked = {"seed": seed, "num_samples": num_samples, "split": "test",
             "psis datapoints": psis_datapoints, "git commit": commit}
    got = {"seed": report.get("seed"), "num_samples": report.get("num_samples"), "split": report.get("split"),
           "psis datapoints": (report.get("spec") or {}).get("psis_datapoints"),
           "git commit": (report.get("environment") or {}).get("git_commit")}
    wrong = [f"{key} {got[key]!r}, not {value!r}" for key, value in asked.items() if got[key] != value]
    if wrong:
        raise SystemExit("the evaluation report is not the one asked for: " + "; ".join(wrong))


def sittings_file(cache: Path, name: str) -> Path:
    """Where the sittings of an evaluation in progress are kept: beside the model's cache copy
    (which the first sitting's evaluation creates)."""
    return cache / f"{name}.pretrained_evaluate-sittings.json"


def record_sitting(cache: Path, name: str, stem: str, sitting: dict) -> list:
    """The sittings of this evaluation, this one included: a fresh evaluation (no partial file of
    ``stem`` in the cache copy) starts the list afresh; a resumed one appends to it (an earlier
    sitting that left partial files but no record is listed as not recorded)."""
    path = sittings_file(cache, name)
    resuming = bool(_partial_files(cache / name, stem, keep=True, resume=True))  # (the evaluation's own names)
    sittings = (json.loads(path.read_text()) if resuming and path.exists() else []) + [sitting]
    if resuming and len(sittings) == 1:
        sittings.insert(0, {"git_commit": "not recorded", "started": "not recorded"})
    atomic_write(path, lambda fh: fh.write(json.dumps(sittings).encode()))
    return sittings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name", help="a bundled model (pvae.pretrained.available())")
    parser.add_argument("--num-samples", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=1, help="not the manifest's seed: independent draws")
    parser.add_argument("--psis-datapoints", type=int, default=500)
    parser.add_argument("--cache", type=Path, default=ROOT / "results" / "pretrained-evaluate",
                        help="the pretrained cache folder of the evaluation (kept: a killed run resumes)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.name not in pretrained.available():
        parser.error(f"unknown model {args.name!r}; bundled: {', '.join(pretrained.available())}")
    args.cache = args.cache.resolve()  # (the evaluation runs in the repository root, this script anywhere)
    out = args.out or HERE / "results" / f"pretrained_evaluate-{args.name}.json"
    record = {"provenance": provenance(torch.device("cpu"))}  # the code that runs, read before it runs
    folder = pretrained.locate(args.name)
    manifest = pretrained.verify(folder)
    reference = manifest.get("evaluation")
    if not reference:
        parser.error(f"{args.name}'s manifest has no evaluation report to compare with")
    if args.seed == reference.get("seed"):
        parser.error(f"--seed {args.seed} is the seed of the manifest's report: its draws would be the same, "
                     "not an independent check; use another")
    command = ["pvae", "evaluate", f"pretrained:{args.name}", "--num-samples", str(args.num_samples),
               "--seed", str(args.seed), "--psis-datapoints", str(args.psis_datapoints), "--no-progress"]
    copy = args.cache / args.name
    cache_was_empty = not copy.exists()
    stem = EvaluationReport.stem_for("test", args.num_samples, seed=args.seed)
    sittings = record_sitting(args.cache, args.name, stem, {"git_commit": record["provenance"]["git_commit"],
                                           "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    env = {**os.environ, "PVAE_PRETRAINED_DIR": str(args.cache)}
    start = time.perf_counter()
    try:
        subprocess.run([sys.executable, "-m", *command], env=env, check=True, cwd=ROOT)
    except subprocess.CalledProcessError as exc:
        sys.exit(f"{' '.join(command)} failed (exit status {exc.returncode}; its message is above); "
                 "the same command resumes it")
    seconds = time.perf_counter() - start
    if not copy.is_dir():
        sys.exit(f"the evaluation wrote no copy of the model into {copy}")
    report = json.loads((copy / f"{stem}.json").read_text())
    check_report(report, seed=args.seed, num_samples=args.num_samples, psis_datapoints=args.psis_datapoints,
                 commit=record["provenance"]["git_commit"])
    sittings_file(args.cache, args.name).unlink(missing_ok=True)  # finished: a rerun starts afresh
    estimates = {name: {k: v for k, v in est.items() if k != "per_example"}
                 for name, est in report["estimates"].items()}
    record.update({
        "what": "pvae evaluate pretrained:NAME in a fresh pretrained cache, against the model's manifest report "
                "(its Table 9 row)",
        "sittings": sittings, "resumed": len(sittings) > 1,
        "model": args.name, "manifest_sha256": file_sha256(folder / pretrained.MANIFEST_FILE),
        "checkpoint_sha256": manifest["checkpoint_sha256"], "weights_sha256": manifest["files"]["model.safetensors"],
        "command": " ".join(command), "seed": args.seed, "reference_seed": reference.get("seed"),
        "cache_was_empty": cache_was_empty, "seconds_last_sitting": seconds,
        "load_average_at_end_1_5_15": list(os.getloadavg()),
        "evaluated_with": {k: report.get("environment", {}).get(k) for k in ("git_commit", "pvae", "torch", "device")},
        "estimates": estimates,
        "reference": {"seed": reference.get("seed"), "evaluated_with": reference.get("evaluated_with")},
        "comparison": compare(estimates, reference["estimates"]),
        # the same comparison image by image, where the bundled reference has per-datapoint values
        "paired": paired_with_reference(copy / f"{stem}.json", copy / pretrained.REFERENCE_FILE),
        "table9": table9_row(manifest, HERE / "results" / "reproduce.json"),
        "within": f"|z| < {WITHIN}",
    })
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda fh: fh.write((json.dumps(record, indent=2) + "\n").encode()))
    for name, c in record["comparison"].items():
        if not c["comparable"]:
            print(f"{args.name} {name}: {c['new']:.3f}, not comparable with the manifest's ({c['why']})")
            continue
        print(f"{args.name} {name} (K={c['num_samples']}, {c['num_datapoints']} images): {c['new']:.3f} (seed "
              f"{args.seed}) vs {c['reference']:.3f} (manifest), difference {c['difference']:+.4f} "
              f"+- {c['mc_stderr_of_difference']:.4f} MC, z {c['z']:+.2f}")
    for name, c in (record["paired"] or {}).items():
        print(f"{args.name} {name}, image by image: difference {c['mean_difference']:+.4f} +- {c['stderr']:.4f} "
              f"(paired), z {c['z']:+.2f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    from pvae.cli import configure_cpu

    configure_cpu()  # subnormal floats flushed, as the pvae command does (before the thread pool starts)
    main()
