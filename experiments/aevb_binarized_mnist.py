"""AEVB on static binarized MNIST: pvae side by side with a hand-written PyTorch VAE.

Trains the config in ``aevb_binarized_mnist.json`` (784-500-500-50 softplus MLPs, Bernoulli,
Adam 1e-3, batch 100, 20 epochs) with pvae (``pvae.train_run``, the code path of
``pvae train --config``) and the hand-written VAE of ``benchmarks/handwritten_vae.py`` (same
architecture, loss, optimizer, data-order procedure and epochs), for each seed in ``--seeds``.
Every model is evaluated on all 10,000 test images: the test ELBO from ``--K-elbo`` samples per
image, and for the first seed also the importance-weighted bound L_K with ``--K`` samples
(and the ELBO from those same K samples). Runs checkpoint every epoch and resume when the
script is restarted.

    PVAE_DATA_DIR=../shared/data python experiments/aevb_binarized_mnist.py \
        --out-dir results/aevb_binarized_mnist --K 1000 --seeds 0,1,2

Writes ``summary.json`` in the output folder and ``experiments/results/aevb_binarized_mnist.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "benchmarks"))
from _provenance import provenance  # noqa: E402
from handwritten_vae import HandwrittenVAE  # noqa: E402

import pvae  # noqa: E402
from pvae._rng import seeded  # noqa: E402
from pvae.checkpoint import load_checkpoint, save_checkpoint, write_json  # noqa: E402


def train_handwritten(config, data, path: Path):
    """The loop of pvae.fit written out: seeded init, seeded randperm order, Adam, the validation
    ELBO (one sample per image) at the end of each epoch inside the timed span as in pvae.fit, a
    checkpoint each epoch (outside it, as in pvae.fit), resume from it."""
    with seeded(config.training.seed):
        model = HandwrittenVAE(data.data_dim, config.latent_dim, config.net["hidden"])
    opt = torch.optim.Adam(model.parameters(), lr=config.training.lr)
    gen = torch.Generator().manual_seed(config.training.seed)
    start, seconds = 0, 0.0
    rng = None
    if path.exists():
        ckpt = load_checkpoint(path)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        gen.set_state(ckpt["data_order"])
        rng, start, seconds = ckpt["torch"], ckpt["epoch"], ckpt["seconds"]
    x = data.train
    with seeded(config.training.seed):
        if rng is not None:
            torch.set_rng_state(rng)
        for epoch in range(start + 1, config.training.epochs + 1):
            t0 = time.perf_counter()
            total = 0.0
            for idx in torch.randperm(x.shape[0], generator=gen).split(config.training.batch_size):
                loss = model.loss(x[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.item() * idx.numel()
            if data.valid is not None:  # the validation ELBO each epoch, as pvae.fit (and PyTorch's example) do
                with torch.no_grad():
                    model.bounds(data.valid, 1)
            seconds += time.perf_counter() - t0
            print(f"handwritten seed {config.training.seed} epoch {epoch}: train ELBO {-total / x.shape[0]:.2f}", flush=True)
            save_checkpoint(
                {"model": model.state_dict(), "optimizer": opt.state_dict(), "data_order": gen.get_state(),
                 "torch": torch.get_rng_state(), "epoch": epoch, "seconds": seconds},
                path,
            )
    model.eval()
    return model, seconds


def mean_se(values: torch.Tensor) -> dict:
    values = values.double()
    return {"mean": float(values.mean()), "stderr": float(values.std() / values.numel() ** 0.5)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=HERE / "aevb_binarized_mnist.json")
    parser.add_argument("--out-dir", type=Path, default=Path("results/aevb_binarized_mnist"))
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    parser.add_argument("--K", type=int, default=1000, help="importance samples for L_K (first seed)")
    parser.add_argument("--K-elbo", type=int, default=10, help="samples per image for every test ELBO")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--epochs", type=int, help="override the config (smoke runs)")
    parser.add_argument("--test-limit", type=int, help="evaluate on a seeded random subset (smoke runs)")
    parser.add_argument("--train-limit", type=int, help="train on a seeded random subset (smoke runs)")
    parser.add_argument("--summary", type=Path, default=HERE / "results" / "aevb_binarized_mnist.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    config = pvae.RunConfig.load(args.config)
    if args.epochs:
        config = config.replace(training={"epochs": args.epochs})
    data = pvae.load_dataset(config.dataset)
    if args.train_limit:
        idx = torch.randperm(data.train.shape[0], generator=torch.Generator().manual_seed(0))
        data = dataclasses.replace(data, train=data.train[idx[: args.train_limit]])
    args.out_dir.mkdir(parents=True, exist_ok=True)
    test, subset = data.test, "all 10,000 test images"
    if args.test_limit:
        idx = torch.randperm(test.shape[0], generator=torch.Generator().manual_seed(0))[: args.test_limit]
        test, subset = test[idx], f"seeded random subset (seed 0) of {args.test_limit} test images"

    start = provenance(torch.device("cpu"))
    runs = []
    for i, seed in enumerate(seeds):
        cfg = config.replace(training={"seed": seed})
        run_dir = args.out_dir / f"pvae-seed{seed}"
        run = pvae.train_run(cfg, run_dir, resume=(run_dir / "config.json").exists(), progress=False, dataset=data)
        vae, history = run.vae, run.history
        hand, hand_seconds = train_handwritten(cfg, data, args.out_dir / f"handwritten-seed{seed}.pt")
        row = {
            "seed": seed,
            "pvae_train_seconds": sum(r["seconds"] for r in history.records),
            "handwritten_train_seconds": hand_seconds,
            "train_seconds_ratio_pvae_to_handwritten": sum(r["seconds"] for r in history.records) / hand_seconds,
            "pvae_best_epoch": history.best_epoch,
            "pvae_test_elbo": pvae.elbo(vae, test, args.K_elbo, seed=1000 + seed).mean,
        }
        with seeded(1000 + seed):
            row["handwritten_test_elbo"] = float(hand.bounds(test, args.K_elbo)[0].double().mean())
        print(json.dumps(row), flush=True)
        if i == 0:
            t0 = time.perf_counter()
            bounds = pvae.evaluate_bounds(vae, test, args.K, seed=0)
            row["pvae_eval_seconds_K"] = time.perf_counter() - t0
            row["pvae_test_elbo_K"] = bounds["elbo"].to_dict()
            row["pvae_test_iwae_K"] = bounds["iwae"].to_dict()
            t0 = time.perf_counter()
            with seeded(0):
                hand_elbo, hand_iwae = hand.bounds(test, args.K)
            row["handwritten_eval_seconds_K"] = time.perf_counter() - t0
            row["handwritten_test_elbo_K"] = mean_se(hand_elbo)
            row["handwritten_test_iwae_K"] = mean_se(hand_iwae)
            print(json.dumps(row), flush=True)
        runs.append(row)

    def across(key):
        values = [r[key] for r in runs]
        return {"mean": statistics.mean(values), "sd": statistics.stdev(values) if len(values) > 1 else None,
                "values": values}

    first = runs[0]
    summary = {
        "experiment": "AEVB, 784-500-500-50 Bernoulli VAE on static binarized MNIST, pvae vs hand-written PyTorch",
        "config": config.to_dict(),
        "seeds": seeds,
        "test_set": subset,
        "K_elbo": args.K_elbo,
        "K": args.K,
        "units": "nats per image; stderr over images; sd over seeds",
        "threads": args.threads,
        "torch": torch.__version__,
        "provenance": start,
        "load_average_end": list(os.getloadavg()),
        "timing": "seconds of the training epochs, each including the validation ELBO pass (pvae.fit's and the "
                  "hand-written loop's alike), excluding checkpoint writes; one run per seed, one after the other, "
                  "pvae's before the hand-written one",
        "runs": runs,
        "pvae_test_elbo": across("pvae_test_elbo"),
        "handwritten_test_elbo": across("handwritten_test_elbo"),
        "pvae_train_seconds": across("pvae_train_seconds"),
        "handwritten_train_seconds": across("handwritten_train_seconds"),
        "train_seconds_ratio_pvae_to_handwritten": across("train_seconds_ratio_pvae_to_handwritten"),
    }
    summary["elbo_difference_pvae_minus_handwritten"] = (
        summary["pvae_test_elbo"]["mean"] - summary["handwritten_test_elbo"]["mean"]
    )
    summary["first_seed_nll_iwae_below_minus_elbo"] = (
        -first["pvae_test_iwae_K"]["mean"] < -first["pvae_test_elbo_K"]["mean"]
    )
    write_json(summary, args.out_dir / "summary.json")
    write_json(summary, args.summary)
    print(json.dumps({k: summary[k] for k in ("pvae_test_elbo", "handwritten_test_elbo",
                                              "elbo_difference_pvae_minus_handwritten")}, indent=2))


if __name__ == "__main__":
    main()
