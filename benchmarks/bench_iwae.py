"""IWAE evaluation time (K=5000 on the static-MNIST test set) and AIS cost per datapoint.

Part 1 — importance-weighted bound. pvae's :func:`pvae.evaluate_bounds` and a hand-written
batched PyTorch evaluation (``benchmarks/handwritten_vae.py``: the same network, the
reparametrized log-weights written out, log-mean-exp per datapoint) compute the ELBO and
L_K with K importance samples for every test image, with the same batch (100 images) and chunk sizes
(``--chunk-size``, default pvae's choice from its memory budget), on 2 CPU threads. The two
sides draw independently (documented seeds), so their per-image values differ by Monte Carlo
error; per-image values go to ``<out>_per_image.csv``, the commit and load average to the JSON. The weights of the hand-written model are copied from
the pvae model, so both evaluate the *same* trained VAE and their estimates must agree within
Monte Carlo error. The test set is processed in alternating blocks (pvae first on even
blocks, hand-written first on odd ones) so that drifting machine load hits both; the reported
ratio is total pvae time / total hand-written time.

Part 2 — AIS. :func:`pvae.ais` on the first ``--ais-images`` test images with the stated
schedule, timed; its cost per datapoint in seconds and in gradient evaluations, and L_K on the
same images for comparison.

The model is the trained seed-0 run of ``experiments/aevb_binarized_mnist.py`` (784-500-500-50,
20 epochs) when ``--run-dir`` exists, else an untrained model of the same shape (timings are
then still meaningful, the estimates are not).

    PVAE_DATA_DIR=../shared/data python benchmarks/bench_iwae.py      # ~25 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _provenance import provenance  # noqa: E402
from handwritten_vae import HandwrittenVAE  # noqa: E402

import pvae  # noqa: E402
from pvae.annealing import ais  # noqa: E402

HERE = Path(__file__).resolve().parent


def copy_weights(vae, hand: HandwrittenVAE) -> None:
    """Load pvae's encoder/decoder weights into the hand-written model (same layout)."""
    src = [m for m in vae.guide_net.modules() if isinstance(m, torch.nn.Linear)]
    dst = [m for m in hand.encoder if isinstance(m, torch.nn.Linear)]
    src_dec = [m for m in vae.decoder.modules() if isinstance(m, torch.nn.Linear)]
    dst_dec = [m for m in hand.decoder if isinstance(m, torch.nn.Linear)]
    if len(src) != len(dst) or len(src_dec) != len(dst_dec):
        raise ValueError("the pvae model is not the standard MLP VAE the baseline implements")
    with torch.no_grad():
        for s, d in zip(src + src_dec, dst + dst_dec):
            d.weight.copy_(s.weight)
            d.bias.copy_(s.bias)


def summary(values: torch.Tensor) -> dict:
    values = values.double()
    return {"mean": float(values.mean()), "stderr": float(values.std() / math.sqrt(values.numel()))}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, default=Path("results/aevb_binarized_mnist/pvae-seed0"))
    parser.add_argument("--K", type=int, default=5000)
    parser.add_argument("--images", type=int, default=10000, help="test images for the IWAE part")
    parser.add_argument("--block", type=int, default=100, help="images per alternating block")
    parser.add_argument("--ais-images", type=int, default=100)
    parser.add_argument("--ais-chains", type=int, default=16)
    parser.add_argument("--ais-steps", type=int, default=100)
    parser.add_argument("--ais-leapfrog", type=int, default=10)
    parser.add_argument("--ais-start", default="guide", choices=["guide", "prior"])
    parser.add_argument("--ais-schedule", default="sigmoid", choices=["sigmoid", "linear"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--chunk-size", type=int, default=None,
                        help="samples per chunk for both sides (default: pvae's choice from the memory budget)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "bench_iwae.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    try:
        test = pvae.load_dataset("binarized-mnist").test
        source = "binarized-mnist test"
    except Exception:  # no data cache: same shape, same sparsity
        test = (torch.rand(10000, 784, generator=torch.Generator().manual_seed(0)) < 0.13).float()
        source = "random binary 10000x784"
    test = test[: args.images]
    if (args.run_dir / "checkpoint.pt").exists():
        run = pvae.load_run(args.run_dir)
        config, vae = run.config, run.vae
        model = f"trained run {args.run_dir} ({len(run.history.records)} epochs)"
    else:
        config = pvae.RunConfig(dataset='binarized-mnist', latent_dim=50, net={'hidden': (500, 500)})
        torch.manual_seed(0)
        vae = pvae.build_vae(config, 784)
        model = "untrained 784-500-500-50 (no run directory found)"
    hand = HandwrittenVAE(784, config.latent_dim, config.net["hidden"])
    copy_weights(vae, hand)
    vae.eval()
    hand.eval()

    if args.chunk_size is None:
        args.chunk_size = pvae.estimators.auto_chunk_size(vae, 100, args.K)
    start_provenance = provenance(torch.device("cpu"))
    seconds = {"pvae": 0.0, "handwritten": 0.0}
    values = {"pvae": {"elbo": [], "iwae": []}, "handwritten": {"elbo": [], "iwae": []}}
    blocks = list(test.split(args.block))
    for i, xb in enumerate(blocks):
        order = ("pvae", "handwritten") if i % 2 == 0 else ("handwritten", "pvae")
        for name in order:
            t0 = time.perf_counter()
            if name == "pvae":
                # independent draws: pvae block i uses seed 2i, the hand-written side 2i + 1
                bounds = pvae.evaluate_bounds(vae, xb, args.K, seed=2 * i, chunk_size=args.chunk_size)
                elbo, iwae = bounds["elbo"].values, bounds["iwae"].values
            else:
                torch.manual_seed(2 * i + 1)
                elbo, iwae = hand.bounds(xb, args.K, chunk_size=args.chunk_size)
            seconds[name] += time.perf_counter() - t0
            values[name]["elbo"].append(elbo)
            values[name]["iwae"].append(iwae)
        if (i + 1) % 10 == 0:
            print(f"block {i + 1}/{len(blocks)}: pvae {seconds['pvae']:.1f}s, "
              f"hand-written {seconds['handwritten']:.1f}s", flush=True)
    iwae_part = {
        "K": args.K,
        "images": int(test.shape[0]),
        "batch_size": 100,
        "chunk_size": args.chunk_size,
        "pvae_seconds": seconds["pvae"],
        "handwritten_seconds": seconds["handwritten"],
        "ratio": seconds["pvae"] / seconds["handwritten"],
    }
    for name in values:
        for est in ("elbo", "iwae"):
            iwae_part[f"{name}_{est}"] = summary(torch.cat(values[name][est]))
    # the two sides draw independently: their per-image difference must look like MC noise
    diff = torch.cat(values["pvae"]["elbo"]).double() - torch.cat(values["handwritten"]["elbo"]).double()
    iwae_part["elbo_difference_per_image"] = {"mean": float(diff.mean()), "std": float(diff.std()),
                                              "max_abs": float(diff.abs().max())}
    per_image = args.out.with_name(args.out.stem + "_per_image.csv")
    per_image.parent.mkdir(parents=True, exist_ok=True)
    with per_image.open("w") as f:
        f.write("image,pvae_elbo,pvae_iwae,handwritten_elbo,handwritten_iwae\n")
        cols = [torch.cat(values[n][e]).double() for n in ("pvae", "handwritten") for e in ("elbo", "iwae")]
        for j in range(cols[0].numel()):
            f.write(f"{j}," + ",".join(f"{c[j].item():.6f}" for c in cols) + "\n")
    iwae_part["per_image_file"] = per_image.name

    x_ais = test[: args.ais_images]
    t0 = time.perf_counter()
    est = ais(vae, x_ais, num_chains=args.ais_chains, num_steps=args.ais_steps, betas=args.ais_schedule,
              start=args.ais_start, num_leapfrog=args.ais_leapfrog)
    ais_seconds = time.perf_counter() - t0
    same = pvae.evaluate_bounds(vae, x_ais, args.K, seed=0)
    gradients = args.ais_chains * (args.ais_steps - 1) * (args.ais_leapfrog + 1)
    ais_part = {
        "images": int(x_ais.shape[0]),
        "schedule": f"{args.ais_schedule}, {args.ais_steps} steps, start {args.ais_start}, "
                    f"{args.ais_chains} chains, HMC {args.ais_leapfrog} leapfrog steps, "
                    "step size adapted toward acceptance 0.65",
        "seconds": ais_seconds,
        "seconds_per_datapoint": ais_seconds / x_ais.shape[0],
        "gradient_evaluations_per_datapoint": gradients,
        "ais": est.to_dict(),
        "accept_rate_mean": float(est.extra["accept_rate"].mean()),
        f"elbo_K{args.K}_same_images": same["elbo"].to_dict(),
        f"iwae_K{args.K}_same_images": same["iwae"].to_dict(),
        "ais_minus_iwae_mean": est.mean - same["iwae"].mean,
        "ais_minus_iwae_stderr": float((est.values - same["iwae"].values).double().std()
                                       / math.sqrt(x_ais.shape[0])),
    }
    result = {
        "benchmark": "IWAE K evaluation and AIS cost, pvae vs hand-written PyTorch",
        "model": model,
        "data": source,
        "threads": args.threads,
        "torch": torch.__version__,
        "machine": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "iwae": iwae_part,
        "ais": ais_part,
        "provenance_start": start_provenance,
        "provenance_end": provenance(torch.device("cpu")),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
