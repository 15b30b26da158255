"""CPU training-step time with subnormal floats kept and flushed to zero (``pvae.cli.configure_cpu``).

Subnormal float32 values (|x| < 1.2e-38) are handled in microcode on x86 CPUs, many times slower
than normal ones. Training the VampPrior protocol's gated MLP produces them once the weights have
moved, and its matrix products then slow down; the softplus MLP does not. The ``pvae`` command
flushes them (``torch.set_flush_denormal(True)`` before its thread pool starts); this benchmark
measures what that buys, times hand-written PyTorch IWAE steps the same way, with softplus and
with gated MLPs, to tell whether the slowdown comes from pvae or from the network, and counts
which operators write the subnormals.

Sides (each in its own process, since the mode must be set before the thread pool starts):
* ``pvae``: :class:`pvae.train.TrainStep` (eager, the CPU default) on the IWAE objective with
  K = 50 of ``experiments/reproduce/iwae-k50-warmup.json`` (gated MLP 300-300, 40 latent units,
  Adam 5e-4), KL weight 1;
* ``handwritten``: ``benchmarks/handwritten_vae.py``'s VAE (softplus MLP 300-300, 40 latent units)
  with the IWAE loss ``-mean(logsumexp_k log w_k - log K)`` written out, ``torch.optim.Adam`` 5e-4;
* ``handwritten-gated``: the same with the protocol's gated MLPs (h * sigmoid(gate), written out);
each with subnormals kept and flushed. A process trains ``--warmup-steps`` steps on minibatches of
100 binarized-MNIST training images (the slowdown appears once training has moved the weights:
at initialization there are no subnormals) and then times ``--steps`` steps. Processes run one
at a time, in an order that rotates from repeat to repeat; the result is the median over
``--repeats`` of each side's seconds per step, every repeat's value, and the ratio kept/flushed.
In each process that keeps them, one more step runs under a dispatch mode that counts the
subnormal values each ATen operator writes: where they come from.
The JSON records the git commit and the load average before and after (run on an idle machine).

    PVAE_DATA_DIR=../shared/data python benchmarks/bench_denormal.py   # -> benchmarks/results/bench_denormal.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CONFIG = ROOT / "experiments" / "reproduce" / "iwae-k50-warmup.json"
SIDES = ("pvae", "handwritten", "handwritten-gated")


def _gated_mlp(widths):
    """Tomczak & Welling's gated dense layers, h = (W x + b) * sigmoid(V x + c), written out."""
    import torch
    from torch import nn

    class Gated(nn.Module):
        def __init__(self, w_in, w_out):
            super().__init__()
            self.h, self.gate = nn.Linear(w_in, w_out), nn.Linear(w_in, w_out)

        def forward(self, x):
            return self.h(x) * torch.sigmoid(self.gate(x))

    layers = [Gated(w_in, w_out) for w_in, w_out in zip(widths[:-2], widths[1:-1])]
    return nn.Sequential(*layers, nn.Linear(widths[-2], widths[-1]))


def subnormal_census(step, x) -> dict:
    """Run ``step(x)`` once (forward, backward, optimizer) under a dispatch mode that counts, for
    every ATen operator that writes values (views are skipped), the subnormal float32 values it
    writes (its outputs, and the tensors an in-place operator updates), by phase: where the
    subnormals come from. Operators that copy values (cat, copy) count them again."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    tiny = torch.finfo(torch.float32).tiny

    def count(tensors):
        n = 0
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.numel():
                a = t.detach().abs()
                n += int(((a > 0) & (a < tiny)).sum())
        return n

    counts = {}

    class Census(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__
            if getattr(func, "is_view", False) or name.startswith("empty"):  # aliases; uninitialized memory
                return out
            written = tree_flatten(out)[0] + (tree_flatten(args)[0] if name.endswith("_") else [])
            n = count(written)
            if n:  # the autograd engine runs the backward's operators inside a graph task
                phase = "backward" if torch._C._current_graph_task_id() != -1 else "forward/optimizer"
                counts[f"{phase}: {name}"] = counts.get(f"{phase}: {name}", 0) + n
            return out

    with Census():
        step(x)
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def worker(side: str, keep: bool, warmup_steps: int, steps: int, threads: int) -> dict:
    from pvae.cli import configure_cpu  # first: before anything starts the thread pool

    flushed = configure_cpu({"PVAE_KEEP_DENORMALS": "1" if keep else ""})
    import math

    import torch

    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(ROOT))
    import pvae
    from handwritten_vae import HandwrittenVAE

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    data = pvae.load_dataset("binarized-mnist").train[:100 * (warmup_steps + steps)].split(100)
    config_values = json.loads(CONFIG.read_text())
    num_particles = config_values["objective"]["num_particles"]
    lr = config_values["training"]["lr"]
    if side == "pvae":
        from pvae import RunConfig, build_vae
        from pvae.training.loop import TrainStep, _optimizer
        from pvae.training.objectives import OBJECTIVES

        config = RunConfig(**{k: v for k, v in config_values.items() if k not in ("training", "version")})
        vae = build_vae(config, 784)
        step = TrainStep(vae, OBJECTIVES.build(config.objective), _optimizer(vae, lr), "eager")

        def run(x):
            return step(x, kl_weight=1.0)[0]  # (the objective's value)
        described = (f"pvae TrainStep (eager) on {CONFIG.relative_to(ROOT)}'s objective (iwae, K={num_particles}), "
                     f"{config.net['activation']} MLP {list(config.net['hidden'])}, latent {config.latent_dim}")
    else:
        model = HandwrittenVAE(latent_dim=config_values["latent_dim"],
                               hidden=tuple(config_values["net"]["hidden"]))
        activation = "softplus"
        if side == "handwritten-gated":  # the protocol's architecture, written out
            hidden = tuple(config_values["net"]["hidden"])
            model.encoder = _gated_mlp((784, *hidden, 2 * model.latent_dim))
            model.decoder = _gated_mlp((model.latent_dim, *hidden[::-1], 784))
            activation = "gated"
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)

        def run(x):
            log_w = model.log_weights(x, num_particles)
            loss = -(torch.logsumexp(log_w, 0) - math.log(num_particles)).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            return -loss.detach()  # (the objective's value, as pvae's step returns)
        described = (f"benchmarks/handwritten_vae.py HandwrittenVAE, {activation} MLP "
                     f"{config_values['net']['hidden']}, IWAE loss K={num_particles}, torch Adam")
    for x in data[:warmup_steps]:
        value = run(x)
    float(value)
    started = time.perf_counter()
    for x in data[warmup_steps:]:
        value = run(x)
    float(value)
    seconds = (time.perf_counter() - started) / steps
    # where the subnormals come from (kept: flushed, there are none to count), one step more
    census = subnormal_census(run, data[-1]) if not flushed else None
    return {"side": side, "flushed": flushed, "seconds_per_step": seconds, "described": described,
            "subnormals_written_per_operator": census}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warmup-steps", type=int, default=40)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "bench_denormal.json")
    parser.add_argument("--worker", nargs=2, metavar=("SIDE", "KEEP"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        side, keep = args.worker
        print(json.dumps(worker(side, keep == "keep", args.warmup_steps, args.steps, args.threads)))
        return
    sys.path.insert(0, str(HERE))
    import torch

    from _provenance import provenance

    before = provenance(torch.device("cpu"))
    cells = [(side, keep) for side in SIDES for keep in ("keep", "flush")]
    times = {cell: [] for cell in cells}
    described, census = {}, {}
    for repeat in range(args.repeats):
        for i in range(len(cells)):
            side, keep = cells[(i + repeat) % len(cells)]
            out = subprocess.run([sys.executable, __file__, "--worker", side, keep, "--warmup-steps",
                                  str(args.warmup_steps), "--steps", str(args.steps), "--threads", str(args.threads)],
                                 capture_output=True, text=True, check=True, cwd=ROOT,
                                 env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
            result = json.loads(out.stdout.strip().splitlines()[-1])
            if result["flushed"] != (keep == "flush"):
                raise SystemExit(f"{side} {keep}: the process reports flushed={result['flushed']}")
            times[(side, keep)].append(result["seconds_per_step"])
            described[side] = result["described"]
            if result["subnormals_written_per_operator"] is not None:
                census.setdefault(side, []).append(result["subnormals_written_per_operator"])
            print(f"repeat {repeat}: {side:12s} {keep:5s} {result['seconds_per_step']:.4f} s/step", flush=True)
    sides = {}
    for side in SIDES:
        kept, flushed = (statistics.median(times[(side, k)]) for k in ("keep", "flush"))
        sides[side] = {"described": described[side],
                       "seconds_per_step_kept": {"median": kept, "all": times[(side, "keep")]},
                       "seconds_per_step_flushed": {"median": flushed, "all": times[(side, "flush")]},
                       "kept_over_flushed": kept / flushed,
                       # one step after the timed ones, subnormals kept: the subnormal float32 values
                       # each operator wrote (forward, backward, optimizer), per repeat
                       "subnormals_written_per_operator": census.get(side)}
    result = {"benchmark": "CPU training step, subnormal floats kept vs flushed (pvae.cli.configure_cpu)",
              "provenance": before,
              "load_average_after": list(os.getloadavg()),
              "settings": {"warmup_steps": args.warmup_steps, "timed_steps": args.steps, "repeats": args.repeats,
                           "threads": args.threads, "batch_size": 100, "data": "binarized-mnist train, in order"},
              "sides": sides,
              # against the hand-written step of the same (gated) network
              "pvae_flushed_over_handwritten_gated_flushed": (
                  sides["pvae"]["seconds_per_step_flushed"]["median"]
                  / sides["handwritten-gated"]["seconds_per_step_flushed"]["median"]),
              "pvae_kept_over_handwritten_gated_kept": (
                  sides["pvae"]["seconds_per_step_kept"]["median"]
                  / sides["handwritten-gated"]["seconds_per_step_kept"]["median"])}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({s: round(v["kept_over_flushed"], 2) for s, v in sides.items()}))


if __name__ == "__main__":
    main()
