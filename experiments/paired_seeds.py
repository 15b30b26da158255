"""Paired evaluations of the bundled pretrained models on the same test images (issue 26's
evaluation, with :func:`pvae.paired_difference`).

Two questions, one set of evaluations (ELBO and L_K with K = 5000 on a seeded random subset of
the test images, every model evaluated with seeds 1 and 2):

1. **How far does L_K's delta-method Monte Carlo error hold?** For each model, seed 1 against seed 2:
   the paired standard error ``std(a - b)/sqrt(N)`` is an empirical MC error of the difference; the
   reports' own errors combined, ``hypot(mc_1, mc_2)``, are the delta method's. Their ratio is about 1
   for the ELBO (a plain sample mean); the paper's §5 reads a ratio of about 2.6 for L_5000 from three
   full-test-set reruns, and this measures it directly, image by image.
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
    parser.add_argument("--out", type=Path, default=HERE / "results" / "paired_seeds.json")
    args = parser.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    out = {"experiment": "paired evaluations of the pretrained models (pvae.paired_difference)",
           "provenance": provenance(torch.device("cpu")),
           "command": " ".join(["python", "experiments/paired_seeds.py", *(argv if argv is not None else sys.argv[1:])]),
           "settings": {"images": args.images, "subset_seed": args.subset_seed, "num_samples": args.num_samples,
                        "seeds": list(SEEDS), "estimators": ["elbo", "iwae"], "batch_size": args.batch_size},
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
            spec = pvae.EvaluationSpec(estimators=("elbo", "iwae"), num_samples=args.num_samples, seed=seed,
                                       batch_size=args.batch_size, psis_datapoints=0)
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
        out["seeds_compared"][name] = {}
        for estimator in ("elbo", "iwae"):
            result = pvae.paired_difference(reports[name, 1], reports[name, 2], estimator)
            out["seeds_compared"][name][estimator] = {
                **comparison(result),
                "ratio_paired_to_delta": result.stderr / result.mc_stderr_delta if result.mc_stderr_delta else None}
            print(result.summary(), flush=True)
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
    sys.exit(main())
