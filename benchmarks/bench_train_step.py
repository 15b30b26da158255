"""Training-step time: pvae's SVI step vs a hand-written PyTorch VAE step, in one run.

Both train the 784-500-500-50 softplus MLP VAE with a Bernoulli likelihood on minibatches of
100 (binarized MNIST when available through PVAE_DATA_DIR, else random binary data of the
same shape), Adam 1e-3, on 2 threads. One step = loss, backward, optimizer step. The two are
timed in alternating blocks (so drift in machine load hits both), after a warm-up, and the
ratio of median block times is written to a JSON file.

    PVAE_DATA_DIR=../shared/data python benchmarks/bench_train_step.py   # writes benchmarks/results/bench_train_step.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from handwritten_vae import HandwrittenVAE  # noqa: E402

import pvae  # noqa: E402
from pvae import RunConfig, build_vae, make_objective  # noqa: E402


def batches(device, batch_size=100, n=5000):
    try:
        data = pvae.load_dataset("binarized-mnist").train[:n]
        source = "binarized-mnist train[:5000]"
    except Exception:  # no data cache: same shape, same sparsity
        data = (torch.rand(n, 784) < 0.13).float()
        source = "random binary 5000x784"
    return data.to(device).split(batch_size), source


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps-per-block", type=int, default=50)
    parser.add_argument("--blocks", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "bench_train_step.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    data, source = batches(device)

    config = RunConfig(dataset="binarized-mnist", latent_dim=50, hidden=(500, 500))
    vae = build_vae(config, 784).to(device)
    objective = make_objective("elbo")
    opt_p = torch.optim.Adam(vae.parameters(), lr=1e-3)
    hand = HandwrittenVAE().to(device)
    opt_h = torch.optim.Adam(hand.parameters(), lr=1e-3)

    def pvae_step(x):
        loss, _ = objective.loss_and_value(vae, x)
        opt_p.zero_grad(set_to_none=True)
        loss.backward()
        opt_p.step()

    def hand_step(x):
        loss = hand.loss(x)
        opt_h.zero_grad(set_to_none=True)
        loss.backward()
        opt_h.step()

    def block(step, start):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(args.steps_per_block):
            step(data[(start + i) % len(data)])
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / args.steps_per_block

    block(pvae_step, 0), block(hand_step, 0)  # warm-up
    times = {"pvae": [], "handwritten": []}
    for b in range(args.blocks):
        order = [("pvae", pvae_step), ("handwritten", hand_step)]
        for name, step in order if b % 2 == 0 else order[::-1]:
            times[name].append(block(step, b * args.steps_per_block))
    median = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "benchmark": "train step, 784-500-500-50 Bernoulli VAE, batch 100, Adam",
        "data": source,
        "device": str(device),
        "threads": args.threads,
        "steps_per_block": args.steps_per_block,
        "blocks": args.blocks,
        "median_step_seconds": median,
        "block_step_seconds": times,
        "ratio_pvae_over_handwritten": median["pvae"] / median["handwritten"],
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": platform.processor(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("median_step_seconds", "ratio_pvae_over_handwritten")}, indent=2))


if __name__ == "__main__":
    main()
