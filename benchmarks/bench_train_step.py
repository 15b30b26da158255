"""Training-step time: pvae's default step vs hand-written PyTorch steps, in one run.

Sides (all train the 784-500-500-50 softplus MLP VAE with a Bernoulli likelihood, Adam 1e-3,
on the same minibatches of binarized MNIST when available through PVAE_DATA_DIR, else random
binary data of the same shape):

* ``pvae``: what :func:`pvae.fit` runs — :class:`pvae.train.TrainStep` in its default mode
  (eager on a CPU, a CUDA graph on CUDA) with the default objective (``elbo-analytic-kl``: the KL
  in closed form, as the PyTorch example computes it), fused Adam with the on-device non-finite guard;
* ``pvae-trace-elbo``: the same with the ``elbo`` objective (``Trace_ELBO``, the KL sampled, as
  the ``handwritten`` side);
* ``pvae-eager`` / ``pvae-compile`` (``--compile``): the same step in the other modes (CUDA);
* ``pyro-trace-elbo``: Pyro's own ``Trace_ELBO.differentiable_loss`` on ``vae.model``/``vae.guide``
  and ``torch.optim.Adam`` (the Pyro user's route, traced);
* ``handwritten``: the same model and Monte Carlo KL written out in PyTorch
  (``benchmarks/handwritten_vae.py``), default Adam;
* ``pytorch-example``: what a PyTorch user writes (log-variance, closed-form KL, summed BCE);
* on CUDA, ``handwritten-cuda-graph``: the hand-written step captured in a CUDA graph
  (capturable Adam), the hardware's pace.

One step = loss, backward, optimizer step. Sides are timed in blocks, the order rotating from
block to block so that drift in machine load hits all; the result is the median block time per
step and ratios against the hand-written sides. The JSON records the git commit and the load
average (run on an idle machine).

    PVAE_DATA_DIR=../shared/data python benchmarks/bench_train_step.py   # -> benchmarks/results/bench_train_step.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import pyro
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _provenance import provenance  # noqa: E402
from handwritten_vae import HandwrittenVAE, PyTorchExampleVAE  # noqa: E402

import pvae  # noqa: E402
from pvae import RunConfig, build_vae, make_objective  # noqa: E402
from pvae.train import TrainStep, _optimizer  # noqa: E402


def batches(device, batch_size=100, n=5000):
    try:
        data = pvae.load_dataset("binarized-mnist").train[:n]
        source = "binarized-mnist train[:5000]"
    except Exception:  # no data cache: same shape, same sparsity
        data = (torch.rand(n, 784, generator=torch.Generator().manual_seed(0)) < 0.13).float()
        source = "random binary 5000x784"
    return data.to(device).split(batch_size), source


def graphed(step, example):
    """Capture ``step(static_x)`` in a CUDA graph (after warm-up on a side stream)."""
    static_x = example.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            step(static_x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(static_x)

    def replay(x):
        static_x.copy_(x)
        graph.replay()

    return replay


def make_sides(device, compile_step=False):
    config = RunConfig(dataset='binarized-mnist', latent_dim=50, net={'hidden': (500, 500)})
    sides = {}

    default = config.objective.name  # what pvae.fit and pvae train run unless told otherwise
    vae = build_vae(config, 784).to(device)
    step = TrainStep(vae, make_objective(default), _optimizer(vae, 1e-3), "auto")
    sides["pvae"] = (lambda x, s=step: s(x), f"TrainStep mode {step.mode}, objective {default} (the default)")
    v1 = build_vae(config, 784).to(device)
    s1 = TrainStep(v1, make_objective("elbo"), _optimizer(v1, 1e-3), "auto")
    sides["pvae-trace-elbo"] = (lambda x, s=s1: s(x), f"TrainStep mode {s1.mode}, objective elbo (Trace_ELBO: "
                                "the KL sampled, as the hand-written side)")
    if device.type == "cuda":
        v2 = build_vae(config, 784).to(device)
        s2 = TrainStep(v2, make_objective("elbo"), _optimizer(v2, 1e-3), "eager")
        sides["pvae-eager"] = (lambda x, s=s2: s(x), "TrainStep mode eager")
    if compile_step:
        v3 = build_vae(config, 784).to(device)
        s3 = TrainStep(v3, make_objective("elbo"), _optimizer(v3, 1e-3), "compile")
        sides["pvae-compile"] = (lambda x, s=s3: s(x), "TrainStep mode compile")

    v4 = build_vae(config, 784).to(device)
    opt4 = torch.optim.Adam(v4.parameters(), lr=1e-3)
    elbo = pyro.infer.Trace_ELBO(vectorize_particles=True, max_plate_nesting=1)

    def pyro_step(x):
        loss = elbo.differentiable_loss(v4.model, v4.guide, x) / x.shape[0]
        opt4.zero_grad(set_to_none=True)
        loss.backward()
        opt4.step()

    sides["pyro-trace-elbo"] = (pyro_step, "pyro.infer.Trace_ELBO.differentiable_loss + torch Adam")

    for name, cls in (("handwritten", HandwrittenVAE), ("pytorch-example", PyTorchExampleVAE)):
        model = cls().to(device)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)

        def hand_step(x, model=model, opt=opt):
            loss = model.loss(x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        sides[name] = (hand_step, f"benchmarks/handwritten_vae.py {cls.__name__}.loss + torch Adam")
    return sides


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps-per-block", type=int, default=50)
    parser.add_argument("--blocks", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compile", action="store_true", help="also time TrainStep(mode='compile')")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "bench_train_step.json")
    args = parser.parse_args(argv)
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("median_step_ms", "ratios")}, indent=2))


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    data, source = batches(device, args.batch_size)
    sides = make_sides(device, args.compile)
    steps = {name: fn for name, (fn, _) in sides.items()}
    if device.type == "cuda":
        hand = HandwrittenVAE().to(device)
        opt = torch.optim.Adam(hand.parameters(), lr=1e-3, capturable=True)

        def hand_graph_step(x):
            opt.zero_grad(set_to_none=False)
            hand.loss(x).backward()
            opt.step()

        steps["handwritten-cuda-graph"] = graphed(hand_graph_step, data[0])

    def block(step, start):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(args.steps_per_block):
            step(data[(start + i) % len(data)])
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / args.steps_per_block

    before = provenance(device)
    with pyro.validation_enabled(False):  # as fit runs (data are checked once, not every step)
        for name, step in steps.items():  # warm-up (and compilation)
            block(step, 0)
        times = {name: [] for name in steps}
        names = list(steps)
        for b in range(args.blocks):
            rotated = names[b % len(names):] + names[: b % len(names)]
            for name in rotated:
                times[name].append(block(steps[name], b * args.steps_per_block))
    median = {k: statistics.median(v) for k, v in times.items()}
    ratios = {f"pvae/{k}": median["pvae"] / median[k] for k in median if k != "pvae"}
    return {
        "benchmark": f"train step, 784-500-500-50 Bernoulli VAE, batch {args.batch_size}, Adam 1e-3",
        "data": source,
        "threads": args.threads,
        "steps_per_block": args.steps_per_block,
        "blocks": args.blocks,
        "sides": {name: desc for name, (_, desc) in sides.items()},
        "median_step_ms": {k: 1e3 * v for k, v in median.items()},
        "ratios": ratios,
        "block_step_ms": {k: [1e3 * t for t in v] for k, v in times.items()},
        "provenance_start": before,
        "provenance_end": provenance(device),
    }


if __name__ == "__main__":
    main()
