"""Paired evaluations of the bundled pretrained models on the same test images (issue 26's
evaluation, with :func:`pvae.paired_difference`).

Two questions, one set of evaluations (ELBO and L_K with K = 5000 on a seeded random subset of
the test images, every model evaluated with seeds 1 and 2):

1. **How far does L_K's delta-method Monte Carlo error hold?** For each model, seed 1 against seed 2:
   the paired standard error ``std(a - b)/sqrt(N)`` is an empirical MC error of the difference; the
   reports' own errors combined, ``hypot(mc_1, mc_2)``, are the delta method's for L_K (a plain sample
   standard error for the ELBO, where the ratio should be about 1). Each ratio comes with a 95%
   bootstrap interval over the images (it is a heavy-tailed estimate), and again for the images with
   PSIS k-hat above 0.7 and at most 0.7 (k-hat of the guide on every image of the subset, seed 1's
   evaluation). The per-image differences and k-hat values are in the result file.
2. **How far apart are the models, with an error bar that knows they saw the same images?** Each pair
   of models with seed 1: the paired difference of L_K and its paired standard error, beside the
   unpaired ``hypot(stderr_a, stderr_b)`` one would compute from the two rows of Table 9.

    PVAE_DATA_DIR=../shared/data python experiments/paired_seeds.py                   # 1,000 images
    PVAE_DATA_DIR=../shared/data python experiments/paired_seeds.py --images 200 --num-samples 500

Writes ``experiments/results/paired_seeds.json`` (commit, load average, each model's manifest
SHA-256 and checkpoint, the subset, every estimate, every comparison).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from _provenance import provenance  # noqa: E402

sys.path.insert(0, str(ROOT))
import pvae  # noqa: E402
from pvae import pretrained  # noqa: E402

DEFAULT_MODELS = ("standard-binarized-mnist", "vamp-binarized-mnist", "iaf-binarized-mnist")
SEEDS = (1, 2)


def subset(num_test: int, images: int, seed: int) -> torch.Tensor:
    """A seeded random subset of the test rows, sorted (static MNIST's test set is ordered in blocks)."""
    return torch.randperm(num_test, generator=torch.Generator().manual_seed(seed))[:images].sort().values


def ratio(d: torch.Tensor, mc2: torch.Tensor) -> float:
    """The paired (empirical) Monte Carlo error of the mean difference over the reports' own,
    ``(sd(d)/sqrt(N)) / (sqrt(sum(mc_a^2 + mc_b^2))/N)``."""
    n = d.numel()
    return float((d.std() / math.sqrt(n)) / (mc2.sum().sqrt() / n))


def bootstrap_interval(d: torch.Tensor, mc2: torch.Tensor, resamples: int, seed: int) -> list:
    """A 95% percentile bootstrap interval of :func:`ratio` over the images (resampled with
    replacement, pairs kept together): the ratio is a heavy-tailed estimate, and this says how far."""
    g = torch.Generator().manual_seed(seed)
    n = d.numel()
    draws = sorted(ratio(d[i], mc2[i]) for i in (torch.randint(n, (n,), generator=g) for _ in range(resamples)))
    return [round(draws[int(0.025 * resamples)], 3), round(draws[int(0.975 * resamples) - 1], 3)]


def comparison(result) -> dict:
    out = result.to_dict()
    out.pop("labels")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS),
                        help="bundled pretrained models, comma-separated (default: the three of Table 9)")
    parser.add_argument("--images", type=int, default=1000, help="test images in the subset (default: 1000)")
    parser.add_argument("--subset-seed", type=int, default=0, help="seed of the subset (default: 0)")
    parser.add_argument("--num-samples", type=int, default=5000, help="K of L_K (default: 5000)")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples of each ratio (default: 2000)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "paired_seeds.json")
    args = parser.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    out = {"experiment": "paired evaluations of the pretrained models (pvae.paired_difference)",
           "provenance": provenance(torch.device("cpu")),
           "command": " ".join(["python", "experiments/paired_seeds.py", *(argv if argv is not None else sys.argv[1:])]),
           "settings": {"images": args.images, "subset_seed": args.subset_seed, "num_samples": args.num_samples,
                        "seeds": list(SEEDS), "estimators": ["elbo", "iwae"], "batch_size": args.batch_size,
                        "bootstrap_resamples": args.bootstrap},
           "models": {}, "seeds_compared": {}, "models_compared": {}}
    reports = {}
    x_all = None
    for name in models:
        folder = pretrained.locate(name)
        manifest = (folder / pretrained.MANIFEST_FILE).read_bytes()
        vae = pretrained.load(name)
        if x_all is None:
            x_all = pvae.load_dataset(pretrained.load_run(name).config.dataset).test
            chosen = subset(x_all.shape[0], args.images, args.subset_seed)
            x = x_all[chosen]
            out["settings"]["subset"] = {"rule": f"torch.randperm({x_all.shape[0]}) with seed {args.subset_seed}, "
                                                 f"first {args.images}, sorted", "indices_first": chosen[:10].tolist()}
        record = {"manifest_sha256": hashlib.sha256(manifest).hexdigest(),
                  "checkpoint_sha256": json.loads(manifest)["checkpoint_sha256"], "estimates": {}}
        for seed in SEEDS:
            # PSIS k-hat of the guide on every image of the subset (once): the ratio, split by k-hat
            spec = pvae.EvaluationSpec(estimators=("elbo", "iwae"), num_samples=args.num_samples, seed=seed,
                                       batch_size=args.batch_size, psis_datapoints=args.images if seed == 1 else 0)
            start = time.time()
            report = pvae.evaluate(vae, x, spec)
            reports[name, seed] = report
            record["estimates"][f"seed {seed}"] = {
                key: {k: v for k, v in est.to_dict().items() if k in ("mean", "stderr", "mc_stderr_of_mean",
                                                                       "num_samples", "num_datapoints")}
                for key, est in report.estimates.items() if key in ("elbo", "iwae")}
            record["estimates"][f"seed {seed}"]["seconds"] = round(time.time() - start, 1)
            print(f"{name} seed {seed}: L_{args.num_samples} {report.estimates['iwae'].mean:.3f}", flush=True)
        out["models"][name] = record
        khat = torch.full((x.shape[0],), math.nan, dtype=torch.float64)
        if reports[name, 1].khat is not None:  # (None at K < 100: PSIS skipped, the report says why)
            khat[reports[name, 1].khat_index] = reports[name, 1].khat.double()
        record["psis"] = reports[name, 1].psis or reports[name, 1].skipped.get("psis")
        out["seeds_compared"][name] = {}
        for estimator in ("elbo", "iwae"):
            result = pvae.paired_difference(reports[name, 1], reports[name, 2], estimator)
            a, b = reports[name, 1].estimates[estimator], reports[name, 2].estimates[estimator]
            d = a.values.double() - b.values.double()
            mc2 = a.mc_stderr_per_datapoint.double() ** 2 + b.mc_stderr_per_datapoint.double() ** 2
            entry = {**comparison(result), "ratio_empirical_to_reported": ratio(d, mc2),
                     "ratio_interval_95": bootstrap_interval(d, mc2, args.bootstrap, seed=args.subset_seed)}
            for label, mask in (("khat_above_0.7", khat > 0.7), ("khat_at_most_0.7", khat <= 0.7)):
                n = int(mask.sum())
                entry[label] = {"images": n, "ratio_empirical_to_reported": ratio(d[mask], mc2[mask]) if n > 1 else None,
                                "ratio_interval_95": bootstrap_interval(d[mask], mc2[mask], args.bootstrap,
                                                                        seed=args.subset_seed) if n > 1 else None}
            entry["per_image_difference"] = [round(v, 6) for v in d.tolist()]
            out["seeds_compared"][name][estimator] = entry
            print(result.summary(), f"ratio {entry['ratio_empirical_to_reported']:.2f} "
                  f"(95% {entry['ratio_interval_95']})", flush=True)
        out["models"][name]["khat"] = [None if math.isnan(v) else round(v, 4) for v in khat.tolist()]
    for a, b in itertools.combinations(models, 2):
        result = pvae.paired_difference(reports[b, 1], reports[a, 1], "iwae")
        ea, eb = reports[a, 1].estimates["iwae"], reports[b, 1].estimates["iwae"]
        out["models_compared"][f"{b} - {a}"] = {**comparison(result),
                                                "unpaired_stderr": math.hypot(ea.stderr, eb.stderr)}
        print(f"{b} - {a}:", result.summary(), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    from pvae.cli import configure_cpu

    configure_cpu()  # subnormal floats flushed, as the pvae command does (before the thread pool starts)
    sys.exit(main())
