"""AEVB on static binarized MNIST: pvae side by side with a hand-written PyTorch VAE.

Trains the config in ``aevb_binarized_mnist.json`` (784-500-500-50 softplus MLPs, Bernoulli,
Adam 1e-3, batch 100, 20 epochs) with pvae (``pvae.train_run``, the code path of
``pvae train --config``) and the hand-written VAE of ``benchmarks/handwritten_vae.py`` with
the same data order procedure, optimizer and epochs, then evaluates both on all 10,000 test
images with K importance samples per image: the ELBO (mean of the K log-weights) and the
importance-weighted bound L_K. Both runs checkpoint every epoch and resume when restarted.

    PVAE_DATA_DIR=../shared/data python experiments/aevb_binarized_mnist.py \
        --out-dir results/aevb_binarized_mnist --K 1000

Writes ``summary.json`` in the output folder and ``experiments/results/aevb_binarized_mnist.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "benchmarks"))
from handwritten_vae import HandwrittenVAE  # noqa: E402

import pvae  # noqa: E402
from pvae.checkpoint import load_checkpoint, save_checkpoint, write_json  # noqa: E402


def train_handwritten(config, data, path: Path, progress=True):
    """Same loop as pvae.fit: seeded randperm order, Adam, checkpoint each epoch, resume."""
    torch.manual_seed(config.seed)
    model = HandwrittenVAE(data.data_dim, config.latent_dim, config.hidden)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    gen = torch.Generator().manual_seed(config.seed)
    start, seconds = 0, 0.0
    if path.exists():
        ckpt = load_checkpoint(path)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        gen.set_state(ckpt["data_order"])
        torch.set_rng_state(ckpt["torch"])
        start, seconds = ckpt["epoch"], ckpt["seconds"]
    x = data.train
    for epoch in range(start + 1, config.epochs + 1):
        t0 = time.perf_counter()
        total = 0.0
        for idx in torch.randperm(x.shape[0], generator=gen).split(config.batch_size):
            loss = model.loss(x[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * idx.numel()
        seconds += time.perf_counter() - t0
        if progress:
            print(f"handwritten epoch {epoch}: train ELBO {-total / x.shape[0]:.2f}", flush=True)
        save_checkpoint(
            {"model": model.state_dict(), "optimizer": opt.state_dict(), "data_order": gen.get_state(),
             "torch": torch.get_rng_state(), "epoch": epoch, "seconds": seconds},
            path,
        )
    return model, seconds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=HERE / "aevb_binarized_mnist.json")
    parser.add_argument("--out-dir", type=Path, default=Path("results/aevb_binarized_mnist"))
    parser.add_argument("--K", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--epochs", type=int, help="override the config (smoke runs)")
    parser.add_argument("--test-limit", type=int, help="evaluate on a seeded random subset (smoke runs)")
    parser.add_argument("--summary", type=Path, default=HERE / "results" / "aevb_binarized_mnist.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = pvae.RunConfig.load(args.config)
    if args.epochs:
        config = config.replace(epochs=args.epochs)
    data = pvae.load_dataset(config.dataset)
    args.out_dir.mkdir(parents=True, exist_ok=True)

    # pvae: the same code path as `pvae train --config ...` (resumes if interrupted)
    run_dir = args.out_dir / "pvae"
    t0 = time.perf_counter()
    resume = (run_dir / "config.json").exists()
    vae, history = pvae.train_run(config, run_dir, resume=resume, dataset=data)
    pvae_seconds = sum(r["seconds"] for r in history.records)
    print(f"pvae trained: {len(history.records)} epochs, {pvae_seconds:.0f} s in epochs "
          f"({time.perf_counter() - t0:.0f} s this call)", flush=True)

    hand, hand_seconds = train_handwritten(config, data, args.out_dir / "handwritten.pt")

    test = data.test
    subset = "all 10,000 test images"
    if args.test_limit:
        idx = torch.randperm(test.shape[0], generator=torch.Generator().manual_seed(0))[: args.test_limit]
        test, subset = test[idx], f"seeded random subset (seed 0) of {args.test_limit} test images"

    t0 = time.perf_counter()
    bounds = pvae.evaluate_bounds(vae, test, args.K, seed=0, progress=True)
    pvae_eval_seconds = time.perf_counter() - t0
    torch.manual_seed(0)
    hand.eval()
    t0 = time.perf_counter()
    hand_elbo, hand_iwae = hand.bounds(test, args.K)
    hand_eval_seconds = time.perf_counter() - t0

    def stats(values):
        return {"mean": float(values.mean()), "stderr": float(values.std() / values.numel() ** 0.5)}

    summary = {
        "experiment": "AEVB, 784-500-500-50 Bernoulli VAE on static binarized MNIST",
        "config": config.to_dict(),
        "test_set": subset,
        "K": args.K,
        "units": "nats per image; stderr over images",
        "pvae": {
            "test_elbo": bounds["elbo"].to_dict(),
            "test_iwae": bounds["iwae"].to_dict(),
            "best_epoch": history.best_epoch,
            "best_val_elbo": history.best_val_elbo,
            "train_seconds": pvae_seconds,
            "eval_seconds": pvae_eval_seconds,
        },
        "handwritten": {
            "test_elbo": stats(hand_elbo),
            "test_iwae": stats(hand_iwae),
            "train_seconds": hand_seconds,
            "eval_seconds": hand_eval_seconds,
        },
        "threads": args.threads,
        "torch": torch.__version__,
    }
    summary["elbo_difference_pvae_minus_handwritten"] = (
        summary["pvae"]["test_elbo"]["mean"] - summary["handwritten"]["test_elbo"]["mean"]
    )
    summary["pvae_nll_iwae_below_minus_elbo"] = (
        -summary["pvae"]["test_iwae"]["mean"] < -summary["pvae"]["test_elbo"]["mean"]
    )
    write_json(summary, args.out_dir / "summary.json")
    write_json(summary, args.summary)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
