"""Export the converged reproductions as pvae's bundled pretrained models (issue 26 item 1).

For each finished, evaluated run of ``experiments/reproduce.py`` named below: refuses a run that
was trained from an uncommitted tree in any of its sittings (an ``env.json`` commit, its own or an
earlier sitting's, ends in ``-dirty`` or is missing) or
that has no ``pvae evaluate --num-samples 5000`` report; computes a reference estimate on the
first test images (L_5000, seed 0: what ``tests/test_pretrained.py`` re-estimates with another
seed); and writes ``pvae/pretrained/models/<name>/`` with :func:`pvae.pretrained.export` (weights as
safetensors, the run's config, data record and history, its evaluation report, and a manifest with
every file's SHA-256, the training commit and the checkpoint's SHA-256). An existing export of the
same run is replaced.

    PVAE_DATA_DIR=../shared/data python experiments/export_pretrained.py
    PVAE_DATA_DIR=../shared/data python experiments/export_pretrained.py vamp-binarized-mnist
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

import pvae  # noqa: E402
from pvae import pretrained  # noqa: E402

#: bundled name -> (the run of experiments/reproduce.py, description)
MODELS = {
    "standard-binarized-mnist": (
        "vae-standard-analytic",
        "VAE with a standard normal prior, diagonal Gaussian guide, gated MLP 300-300, 40 latent units, "
        "closed-form KL, Tomczak & Welling's protocol (KL warm-up 100 epochs, early stopping); static "
        "binarized MNIST"),
    "vamp-binarized-mnist": (
        "vae-vamp",
        "VAE with a VampPrior (500 pseudo-inputs), diagonal Gaussian guide, gated MLP 300-300, 40 latent "
        "units, Tomczak & Welling's protocol; static binarized MNIST"),
    "iaf-binarized-mnist": (
        "vae-iaf",
        "VAE with an inverse autoregressive flow guide, standard normal prior, gated MLP 300-300, 40 "
        "latent units, Tomczak & Welling's protocol; static binarized MNIST"),
}
#: bundled models stored at half precision (issue 26: each bundle at most 8 MB; float16 only where the
#: bounds move by less than their Monte Carlo error, which float16_check measures and enforces)
FLOAT16 = set()
#: the reference estimate that a quick check reproduces (tests/test_pretrained.py)
SUBSET = {"estimator": "iwae", "num_datapoints": 100, "num_samples": 5000, "seed": 0}


def _subset_spec(estimators=("iwae",)):
    return pvae.EvaluationSpec(estimators=estimators, num_samples=SUBSET["num_samples"], seed=SUBSET["seed"],
                               psis_datapoints=0)


def reference_subset(run) -> dict:
    x = pvae.load_dataset(run.config.dataset).test[:SUBSET["num_datapoints"]]
    estimate = pvae.evaluate(run.vae, x, _subset_spec()).estimates["iwae"]
    return {**SUBSET, "datapoints": f"the first {SUBSET['num_datapoints']} test images", "mean": estimate.mean,
            "mc_stderr_of_mean": estimate.mc_stderr_of_mean, "stderr": estimate.stderr,
            "computed_with": pvae.runs.source_commit()}


def half_precision(run):
    """``run`` with its model's floating-point weights rounded to float16 and back: what the
    float16 bundle loads."""
    state = {k: v.half().float() if v.is_floating_point() else v for k, v in run.vae.state_dict().items()}
    run.vae.load_state_dict(state)
    return run


def float16_check(run_dir: Path, report: Path) -> dict:
    """The ELBO and L_5000 of the float32 weights and of the same weights rounded to float16, with
    the same draws (seed) on the reference subset. The bundle ships ``report``'s numbers (the whole
    test set, float32): the rounding must move each bound by less than that report's Monte Carlo
    error, with room for the subset's own uncertainty about the shift (``|shift| + 2 s.e.``, the
    s.e. of the mean shift over the subset's images), or the export is refused."""
    run = pvae.load_run(run_dir)
    x = pvae.load_dataset(run.config.dataset).test[:SUBSET["num_datapoints"]]
    full = pvae.evaluate(run.vae, x, _subset_spec(("elbo", "iwae")))
    half = pvae.evaluate(half_precision(run).vae, x, _subset_spec(("elbo", "iwae")))  # (rounds run in place)
    bundled = json.loads(Path(report).read_text())["estimates"]
    out = {"datapoints": f"the first {SUBSET['num_datapoints']} test images", "num_samples": SUBSET["num_samples"],
           "seed": SUBSET["seed"], "computed_with": pvae.runs.source_commit(),
           "rule": "|shift| + 2 s.e. of the shift < the bundled report's mc_stderr_of_mean"}
    for name in ("elbo", "iwae"):
        paired = pvae.paired_difference(half, full, name)
        d = half.estimates[name].values.double() - full.estimates[name].values.double()
        allowed = bundled[name]["mc_stderr_of_mean"]
        out[name] = {"float32": full.estimates[name].mean, "float16": half.estimates[name].mean,
                     "shift": paired.mean_difference, "shift_stderr": paired.stderr,
                     "max_abs_shift_per_image": float(d.abs().max()),
                     "bundled_mc_stderr_of_mean": allowed, "bundled_num_datapoints": bundled[name]["num_datapoints"]}
        if abs(paired.mean_difference) + 2 * paired.stderr >= allowed:
            raise SystemExit(f"{run_dir}: float16 weights move the {name} by {paired.mean_difference:+.5f} ± "
                             f"{paired.stderr:.5f} nats, not clearly less than the Monte Carlo error {allowed:.5f} "
                             f"of the bundled report: keep float32")
    return out


def export_one(name: str, root: Path, num_samples: int, models_dir: Path = pretrained.MODELS_DIR,
               allow_uncommitted: bool = False) -> Path:
    run_name, description = MODELS[name]
    run_dir = root / run_name
    env = json.loads((run_dir / "env.json").read_text())
    # every sitting of a resumed run: one from an uncommitted tree is enough to leave the weights untraceable
    sittings = [*(env.get("earlier_sittings") or []), env]
    for number, sitting in enumerate(sittings, 1):
        commit = sitting.get("git_commit") or ""
        if not allow_uncommitted and not re.fullmatch(r"[0-9a-f]{40}", commit):
            raise SystemExit(f"{run_dir}: sitting {number} of {len(sittings)} was trained from "
                             f"{commit or 'an unrecorded tree'!r}, not a committed one: retrain it from a clean checkout")
    report = run_dir / f"evaluation-test-K{num_samples}.json"
    if not report.exists():
        raise SystemExit(f"{run_dir} has no {report.name}: pvae evaluate {run_dir} --num-samples {num_samples}")
    torch.manual_seed(0)
    half = name in FLOAT16
    extra = {"float16_check": float16_check(run_dir, report)} if half else {}
    run = pvae.load_run(run_dir)
    extra["reference_subset"] = reference_subset(half_precision(run) if half else run)
    target = models_dir / name
    staging = target.with_name(f".{name}-new")
    if staging.exists():
        shutil.rmtree(staging)
    pretrained.export(run_dir, staging, description=description, name=name, reproduces=run_name,
                      evaluation=report, extra=extra, dtype="float16" if half else "float32")
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)
    pretrained.verify(target)
    return target


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", default=None, help=f"default: all of {sorted(MODELS)}")
    parser.add_argument("--root", type=Path, default=ROOT / "results" / "reproduce",
                        help="where experiments/reproduce.py keeps its run directories")
    parser.add_argument("--num-samples", type=int, default=5000)
    parser.add_argument("--models-dir", type=Path, default=pretrained.MODELS_DIR, help="where the exports go")
    parser.add_argument("--smoke", type=Path, help="a smoke run: train one epoch on the digits in this folder, "
                        "evaluate it with --num-samples and export it (any tree) into --models-dir")
    parser.add_argument("--smoke-float16", action="store_true", help="the smoke run's export at float16")
    args = parser.parse_args(argv)
    if args.smoke is not None:
        config = pvae.RunConfig(dataset="digits", latent_dim=2, net={"hidden": (16,)}, training={"epochs": 1})
        pvae.train_run(config, args.smoke / "smoke-run", progress=False)
        pvae.evaluate_run(args.smoke / "smoke-run", num_samples=args.num_samples, progress=False)
        MODELS["smoke-digits"] = ("smoke-run", "one epoch on the digits (a smoke run)")
        if args.smoke_float16:
            FLOAT16.add("smoke-digits")
        SUBSET["num_samples"] = args.num_samples
        args.names, args.root = ["smoke-digits"], args.smoke
    args.models_dir.mkdir(parents=True, exist_ok=True)
    for name in args.names or sorted(MODELS):
        if name not in MODELS:
            parser.error(f"unknown model {name!r}; choose from {sorted(MODELS)}")
        target = export_one(name, args.root, args.num_samples, args.models_dir, allow_uncommitted=args.smoke is not None)
        sizes = {p.name: p.stat().st_size for p in target.iterdir()}
        print(f"{name}: {target} ({sum(sizes.values()) / 2 ** 20:.1f} MB; weights "
              f"{sizes[pretrained.WEIGHTS_FILE] / 2 ** 20:.1f} MB)", flush=True)


if __name__ == "__main__":
    from pvae.cli import configure_cpu

    configure_cpu()  # subnormal floats flushed, as the pvae command does (before the thread pool starts)
    main()
