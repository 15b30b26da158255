"""Every GPU measurement and test of issue 10 in one command, one JSON (target: under 8 minutes).

1. Training step, 784-500-500-50 Bernoulli VAE, batch 100 and 1000: pvae's default step (a CUDA
   graph), pvae eager, ``torch.compile``, Pyro's ``Trace_ELBO``, the hand-written eager step, the
   PyTorch-example step and the hand-written CUDA-graph step (``bench_train_step.run``).
2. One full epoch (50,000 images, batch 100, no validation on either side) through
   :func:`pvae.fit` vs the hand-written loop.
3. IWAE K=5000 on the 10,000 test images at default settings (chunk size from the memory
   budget) vs the hand-written batched evaluation with the same chunk; per-image values saved.
4. AIS on 100 test images (16 chains, 100 steps, start q).
5. The CUDA tests (``pytest tests/test_gpu.py tests/test_engine.py``).

On the device (Pyro and ArviZ travel as wheels in .whl, see the device README)::

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:.
    PVAE_DATA_DIR=shared/data python benchmarks/gpu_suite.py --out $OUT/gpu_suite.json

Check it on a CPU first: ``python benchmarks/gpu_suite.py --smoke --device cpu``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_train_step  # noqa: E402
from _provenance import provenance  # noqa: E402
from handwritten_vae import HandwrittenVAE  # noqa: E402

import pvae  # noqa: E402


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def copy_weights(vae, hand):
    src = [m for m in list(vae.guide_net.modules()) + list(vae.decoder.modules()) if isinstance(m, torch.nn.Linear)]
    dst = [m for m in list(hand.encoder) + list(hand.decoder) if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for s, d in zip(src, dst):
            d.weight.copy_(s.weight)
            d.bias.copy_(s.bias)


def epoch_times(device, train, batch_size):
    config = pvae.RunConfig(dataset='binarized-mnist', latent_dim=50, net={'hidden': (500, 500)})
    vae = pvae.build_vae(config, 784).to(device)
    hand = HandwrittenVAE().to(device)
    opt = torch.optim.Adam(hand.parameters(), lr=1e-3)
    out = {}
    for name in ("pvae", "handwritten", "pvae", "handwritten"):  # second round is timed
        _sync(device)
        t0 = time.perf_counter()
        if name == "pvae":
            pvae.fit(vae, train, epochs=1, batch_size=batch_size, progress=False, seed=len(out))
        else:
            order = torch.randperm(train.shape[0], device=device)
            for idx in order.split(batch_size):
                loss = hand.loss(train[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        _sync(device)
        out[name] = time.perf_counter() - t0
    out["ratio"] = out["pvae"] / out["handwritten"]
    return out


def iwae_times(device, test, k):
    config = pvae.RunConfig(dataset='binarized-mnist', latent_dim=50, net={'hidden': (500, 500)})
    torch.manual_seed(0)
    vae = pvae.build_vae(config, 784).to(device).eval()
    hand = HandwrittenVAE().to(device).eval()
    copy_weights(vae, hand)
    chunk = pvae.estimators.auto_chunk_size(vae, 100, k, device)
    _sync(device)
    t0 = time.perf_counter()
    bounds = pvae.evaluate_bounds(vae, test, k, seed=0)
    _sync(device)
    t_pvae = time.perf_counter() - t0
    torch.manual_seed(1)
    t0 = time.perf_counter()
    elbo_h, iwae_h = hand.bounds(test, k, chunk_size=chunk)
    _sync(device)
    t_hand = time.perf_counter() - t0
    return {
        "K": k, "images": int(test.shape[0]), "chunk_size": chunk,
        "pvae_seconds": t_pvae, "handwritten_seconds": t_hand, "ratio": t_pvae / t_hand,
        "pvae_elbo_mean": bounds["elbo"].mean, "pvae_iwae_mean": bounds["iwae"].mean,
        "handwritten_elbo_mean": float(elbo_h.double().mean()), "handwritten_iwae_mean": float(iwae_h.double().mean()),
        "note": "untrained model of the benchmark's shape: timings only; the two sides draw independently",
    }


def streaming_epochs(device, train, batch_size=100, epochs=2):
    """The same run in memory (on the device) and streamed from a memory-mapped .npy through the
    DataLoader (pinned memory, non-blocking copies): seconds per epoch and the largest parameter
    difference (zero on a CPU; a GPU's kernels may differ in the last bits)."""
    import tempfile

    import numpy as np

    from pvae.files import load_file

    with tempfile.TemporaryDirectory() as tmp:
        np.save(f"{tmp}/train.npy", (train.cpu().numpy() * 255).astype(np.uint8).reshape(-1, 28, 28))
        out, states = {}, {}
        for stream in ("never", "always"):
            data = load_file(f"{tmp}/train.npy", stream=stream, split=(0.98, 0.01, 0.01))
            torch.manual_seed(0)
            vae = pvae.build_vae(pvae.RunConfig(latent_dim=50, net={"hidden": (500, 500)}), 784).to(device)
            history = pvae.fit(vae, data.train, None, epochs=epochs, batch_size=batch_size, progress=False,
                               device=device)
            out[f"epoch_seconds_{'streamed' if stream == 'always' else 'in_memory'}"] = [
                r["seconds"] for r in history.records]
            states[stream] = {k: v.detach().cpu() for k, v in vae.state_dict().items()}
        out["max_abs_param_difference"] = max(float((states["never"][k] - states["always"][k]).abs().max())
                                              for k in states["never"])
        out["datapoints"] = int(data.train.shape[0])
        return out


def precision_check(device, train, test, epochs=2):
    """bf16 networks (densities in float32) against float32: seconds per epoch through fit and the
    test bounds of the same trained model under both precisions on the same draws."""
    from pvae.controls import use_precision

    out = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        vae = pvae.build_vae(pvae.RunConfig(latent_dim=50, net={"hidden": (500, 500)}), 784).to(device)
        history = pvae.fit(vae, train, None, epochs=epochs, batch_size=100, progress=False, device=device,
                           precision=precision)
        out[f"epoch_seconds_{precision}"] = [r["seconds"] for r in history.records]
        if precision == "bf16":
            bounds = {}
            for p in ("fp32", "bf16"):
                use_precision(vae, p)
                b = pvae.evaluate_bounds(vae, test[:1000], 100, seed=1)
                bounds[p] = {"iwae": b["iwae"].mean, "iwae_stderr": b["iwae"].stderr, "elbo": b["elbo"].mean}
            out["bounds_of_the_bf16_trained_model"] = bounds
            out["iwae_difference_over_stderr"] = abs(bounds["bf16"]["iwae"] - bounds["fp32"]["iwae"]) / bounds["fp32"]["iwae_stderr"]
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, to check the script on a CPU")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "gpu_suite.json")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    smoke = args.smoke
    result = {"benchmark": "issue 10 GPU suite", "smoke": smoke, "provenance": provenance(device), "sections": {}}
    t_start = time.perf_counter()

    def save():
        result["seconds"] = time.perf_counter() - t_start
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")

    try:
        data = pvae.load_dataset("binarized-mnist")
        train, test = data.train.to(device), data.test.to(device)
    except Exception:
        train = (torch.rand(50000, 784) < 0.13).float().to(device)
        test = (torch.rand(10000, 784) < 0.13).float().to(device)
    if smoke:
        train, test = train[:1000], test[:50]

    for batch in (100, 1000):
        name = f"train_step_batch{batch}"
        try:
            ns = SimpleNamespace(threads=torch.get_num_threads(), steps_per_block=5 if smoke else 50,
                                 blocks=2 if smoke else 8, batch_size=batch, device=str(device),
                                 compile=not smoke)
            result["sections"][name] = bench_train_step.run(ns)
        except Exception as e:  # record and go on: one failure must not lose the other numbers
            result["sections"][name] = {"error": repr(e)}
        save()
    for name, fn in (("epoch_through_fit_batch100", lambda: epoch_times(device, train, 100)),
                     ("iwae_K5000", lambda: iwae_times(device, test, 50 if smoke else 5000)),
                     ("streaming_vs_in_memory", lambda: streaming_epochs(device, train, epochs=1 if smoke else 2)),
                     ("bf16_vs_fp32", lambda: precision_check(device, train, test, epochs=1 if smoke else 2))):
        try:
            result["sections"][name] = fn()
        except Exception as e:
            result["sections"][name] = {"error": repr(e)}
        save()
    try:
        vae = pvae.build_vae(pvae.RunConfig(dataset='binarized-mnist', latent_dim=50, net={'hidden': (500, 500)}), 784).to(device)
        x = test[: 10 if smoke else 100]
        _sync(device)
        t0 = time.perf_counter()
        est = pvae.ais(vae, x, num_chains=16, num_steps=10 if smoke else 100, start="guide")
        _sync(device)
        result["sections"]["ais_100_images"] = {"seconds": time.perf_counter() - t0, "mean": est.mean,
                                                "images": int(x.shape[0])}
    except Exception as e:
        result["sections"]["ais_100_images"] = {"error": repr(e)}
    save()
    if not smoke:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                               "tests/test_gpu.py", "tests/test_engine.py"], cwd=HERE.parent,
                              capture_output=True, text=True)
        result["sections"]["cuda_tests"] = {"returncode": proc.returncode, "tail": proc.stdout[-3000:]}
    save()
    print(json.dumps({k: (v.get("ratios") or v.get("ratio") or v.get("error") or v.get("returncode"))
                      if isinstance(v, dict) else v for k, v in result["sections"].items()}, indent=2, default=str))
    failed = [k for k, v in result["sections"].items() if "error" in v or v.get("returncode", 0) != 0]
    if failed:
        sys.exit(f"sections failed: {', '.join(failed)} (see {args.out})")


if __name__ == "__main__":
    main()
