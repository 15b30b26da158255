"""AIS against L_K on a seeded random subset of the test set of a converged run (issue 15).

For a trained run: draws a seeded random subset of test images (a prefix of static MNIST's test
set is not a sample: DESIGN.md §5), and on the same images computes L_K (importance sampling from
the guide), the ELBO, and annealed importance sampling from the guide (HMC transitions on the
geometric path). AIS is a stochastic lower bound whose gap shrinks with the number of
intermediate distributions, so AIS above L_K says the guide's proposal leaves nats on the table.
Writes ``experiments/results/ais_subset-<run name>.json`` with the git commit and load average,
and checkpoints after every minibatch of images (a killed run resumes where it stopped).

    python experiments/ais_subset.py results/reproduce/vae-standard-analytic --images 1000 \
        --chains 16 --steps 500 --num-samples 5000
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "benchmarks"))
sys.path.insert(0, str(HERE.parent))
from _provenance import provenance  # noqa: E402

import pvae  # noqa: E402
from pvae.checkpoint import atomic_write  # noqa: E402
from pvae.files import file_sha256  # noqa: E402
from pvae.runs import _evaluation_data  # noqa: E402


def resume_state(partial: Path, args, fresh: dict) -> dict:
    """The state saved by an interrupted run of this script with the same arguments and checkpoint,
    else ``fresh`` (a partial file from other settings is refused: mixing them would be silent)."""
    settings = {k: str(v) for k, v in sorted(vars(args).items())}
    weights = Path(args.run_dir) / "checkpoint.pt"  # (an exported model, pvae.pretrained: its weights file)
    settings["checkpoint_sha256"] = file_sha256(weights if weights.exists() else Path(args.run_dir) / "model.safetensors")
    if not partial.exists():
        return {**fresh, "settings": settings}
    done = torch.load(partial, weights_only=False)
    if done.get("settings") != settings:
        sys.exit(f"{partial} was written with other settings or another checkpoint ({done.get('settings')}); "
                 "delete it or rerun with those settings")
    return done


def save_state(done: dict, partial: Path) -> None:
    atomic_write(partial, lambda fh: torch.save(done, fh))  # a kill while saving leaves the previous one


def seeded_test_subset(run_dir: Path, images: int, seed: int, parser=None):
    """The run, its test images ``torch.randperm(n_test, seed)[:images]`` (sorted), a record of the
    choice (the same images for every script given the same seed: AIS, the bounds against K), the
    data note and the data set."""
    run = pvae.load_run(run_dir)
    data, note = _evaluation_data(run_dir, run.config, None)
    test = data.split("test")
    if images > test.shape[0]:
        message = f"--images {images}: the test split has {test.shape[0]}"
        parser.error(message) if parser else sys.exit(message)
    chosen = torch.randperm(test.shape[0], generator=torch.Generator().manual_seed(seed))[:images].sort().values
    subset = {"images": images, "how": f"torch.randperm({test.shape[0]}) with seed {seed}, first {images}, sorted",
              "first_indices": chosen[:10].tolist()}
    return run, test[chosen], subset, note, data


def subset_parser(description: str) -> argparse.ArgumentParser:
    """The arguments every script on the seeded test subset takes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--num-samples", type=int, default=5000)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--train-missing", default=None, metavar="DATASET",
                        help="if RUN_DIR holds no run, train a small one on DATASET first (smoke runs)")
    return parser


def train_if_missing(args) -> None:
    if args.train_missing and not (args.run_dir / "checkpoint.pt").exists():
        pvae.train_run(pvae.RunConfig(dataset=args.train_missing, latent_dim=2, net={"hidden": (16,)},
                                      training={"epochs": 2}), args.run_dir, progress=False)


def main(argv=None):
    parser = subset_parser(__doc__.splitlines()[0])
    parser.add_argument("--chains", type=int, default=16)
    parser.add_argument("--steps", type=int, default=500)
    args = parser.parse_args(argv)
    train_if_missing(args)
    out = args.out or HERE / "results" / f"ais_subset-{args.run_dir.name}.json"
    partial = out.with_suffix(".partial.pt")
    started = provenance(torch.device("cpu"))  # the commit that computes (a resumed run keeps its first)
    run, x, subset, note, _ = seeded_test_subset(args.run_dir, args.images, args.seed, parser)
    done = resume_state(partial, args, {"ais": [], "accept": [], "iwae": [], "elbo": [], "seconds": 0.0,
                                        "provenance": started})
    start = len(done["ais"]) * args.batch_size
    for i in range(start, x.shape[0], args.batch_size):
        t0 = time.perf_counter()
        xb = x[i: i + args.batch_size]
        ais = pvae.ais(run.vae, xb, num_chains=args.chains, num_steps=args.steps, start="guide",
                       batch_size=args.batch_size, seed=args.seed + i)
        bounds = pvae.evaluate_bounds(run.vae, xb, args.num_samples, batch_size=args.batch_size, seed=args.seed + i)
        done["ais"].append(ais.values)
        done["accept"].append(ais.extra["accept_rate"])
        done["iwae"].append(bounds["iwae"].values)
        done["elbo"].append(bounds["elbo"].values)
        done["seconds"] += time.perf_counter() - t0
        save_state(done, partial)
        print(f"{i + xb.shape[0]}/{x.shape[0]} images, AIS {torch.cat(done['ais']).mean():.3f}, "
              f"L_K {torch.cat(done['iwae']).mean():.3f}", flush=True)
    values = {k: torch.cat(done[k]).double() for k in ("ais", "iwae", "elbo")}
    n = values["ais"].numel()

    def summary(v):
        return {"mean": float(v.mean()), "stderr_over_images": float(v.std() / n ** 0.5)}

    gap = values["ais"] - values["iwae"]
    result = {
        "experiment": "AIS vs L_K on a random test subset (issue 15)",
        "provenance": done.get("provenance", started),
        "run_dir": str(args.run_dir), "checkpoint_sha256": done["settings"]["checkpoint_sha256"], "data": note,
        "subset": subset,
        "ais": {**summary(values["ais"]), "chains": args.chains, "intermediate_distributions": args.steps,
                "start": "guide", "mean_accept_rate": float(torch.cat(done["accept"]).mean())},
        f"iwae_L{args.num_samples}": summary(values["iwae"]),
        "elbo": summary(values["elbo"]),
        "ais_minus_iwae": {**summary(gap), "fraction_of_images_where_ais_is_higher": float((gap > 0).double().mean())},
        "seconds": done["seconds"],
        "load_average_end": list(os.getloadavg()),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    partial.unlink()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    from pvae.cli import configure_cpu

    configure_cpu()  # subnormal floats flushed, as the pvae command does (before the thread pool starts)
    main()
