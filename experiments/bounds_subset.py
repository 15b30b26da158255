"""The bounds against K, PSIS k-hat, samples and reconstructions of a converged run (issue 15).

On the same seeded random test subset as ``experiments/ais_subset.py`` (same ``--seed``, same
images), draws ``--num-samples`` importance samples from the guide per image once and computes
from them:

* L_K for every K in ``--ks`` that divides ``--num-samples``: the draws are cut into
  ``num_samples / K`` disjoint groups of K, L_K is computed per group and averaged, which is an
  unbiased estimate of E[L_K] (Burda et al.'s bound at K) with a Monte Carlo standard error from
  the spread between groups; for K = ``--num-samples`` (one group) the delta-method error
  sqrt(1/ESS - 1/K) is used, as in :func:`pvae.evaluate_bounds`;
* the ELBO (the mean of the log-weights);
* PSIS k-hat (Vehtari et al.) and the importance-sampling ESS per image;

and, from the same model, 64 seeded samples E[x|z], z ~ p(z), and the reconstructions
E[x | z = E_q[z|x]] of 10 subset images spread evenly over it. Writes
``experiments/results/bounds_subset-<run name>.json`` (git commit and load average at the start),
checkpointing after every minibatch of images: a killed run resumes where it stopped.

    python experiments/bounds_subset.py results/reproduce/vae-standard-analytic --images 1000 \\
        --num-samples 5000
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "benchmarks"))
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
from _provenance import provenance  # noqa: E402
from ais_subset import resume_state, save_state, seeded_test_subset, subset_parser, train_if_missing  # noqa: E402

import pvae  # noqa: E402
from pvae._rng import seeded  # noqa: E402
from pvae.diagnostics import psis_khat  # noqa: E402
from pvae.estimators import importance_ess, log_importance_weights  # noqa: E402


def grouped_bounds(log_weights: torch.Tensor, ks) -> dict:
    """Per image (columns of the ``(S, B)`` float64 ``log_weights``), for each K dividing S: the
    mean of L_K over the S/K disjoint groups and its Monte Carlo variance; plus the ELBO."""
    s = log_weights.shape[0]
    out = {}
    for k in ks:
        groups = s // k
        l_k = torch.logsumexp(log_weights.reshape(groups, k, -1), 1) - torch.log(torch.tensor(float(k), dtype=log_weights.dtype))
        if groups > 1:
            mc_var = l_k.var(0) / groups
        else:  # delta method, as pvae.evaluate_bounds does for L_K
            mc_var = (1.0 / importance_ess(log_weights) - 1.0 / k).clamp_min(0)
        out[k] = {"values": l_k.mean(0), "mc_var": mc_var}
    out["elbo"] = {"values": log_weights.mean(0), "mc_var": log_weights.var(0) / s}
    return out


def _summary(values: torch.Tensor, mc_var: torch.Tensor) -> dict:
    n = values.numel()
    return {"mean": float(values.mean()), "stderr": float(values.std() / n ** 0.5),
            "mc_stderr_of_mean": float(mc_var.sum().sqrt() / n)}


def main(argv=None):
    parser = subset_parser(__doc__.splitlines()[0])
    parser.add_argument("--ks", default="1,5,50,500,5000", help="comma-separated; each must divide --num-samples")
    parser.add_argument("--chunk-size", type=int, default=1000)
    args = parser.parse_args(argv)
    ks = sorted({int(k) for k in args.ks.split(",")})
    bad = [k for k in ks if k < 1 or args.num_samples % k]
    if bad:
        parser.error(f"--ks {bad}: each K must be a positive divisor of --num-samples {args.num_samples}")
    train_if_missing(args)
    out = args.out or HERE / "results" / f"bounds_subset-{args.run_dir.name}.json"
    partial = out.with_suffix(".partial.pt")
    started = provenance(torch.device("cpu"))  # the commit that computes (a resumed run keeps its first)
    run, x, subset, note, data = seeded_test_subset(args.run_dir, args.images, args.seed, parser)
    vae = run.vae
    done = resume_state(partial, args, {"batches": [], "seconds": 0.0, "provenance": started})
    start = len(done["batches"]) * args.batch_size
    for i in range(start, x.shape[0], args.batch_size):
        t0 = time.perf_counter()
        xb = x[i: i + args.batch_size]
        with torch.no_grad(), seeded(args.seed + i, xb.device):
            lw = torch.cat(list(log_importance_weights(vae, xb, args.num_samples, args.chunk_size))).double()
        bounds = grouped_bounds(lw, ks)
        done["batches"].append({"bounds": bounds, "khat": psis_khat(lw), "ess": importance_ess(lw)})
        done["seconds"] += time.perf_counter() - t0
        save_state(done, partial)
        print(f"{i + xb.shape[0]}/{x.shape[0]} images, L_{ks[-1]} "
              f"{torch.cat([b['bounds'][ks[-1]]['values'] for b in done['batches']]).mean():.3f}", flush=True)

    def cat(key, field):
        return torch.cat([b["bounds"][key][field] for b in done["batches"]])

    result = {
        "experiment": "bounds against K, PSIS k-hat, samples and reconstructions on a random test subset (issue 15)",
        "provenance": done.get("provenance", started),
        "run_dir": str(args.run_dir), "checkpoint_sha256": done["settings"]["checkpoint_sha256"], "data": note, "subset": subset,
        "num_samples": args.num_samples,
        "how": f"{args.num_samples} draws from the guide per image (seed {args.seed} + position of the minibatch); "
               "L_K averaged over the num_samples/K disjoint groups of K draws",
        "bounds": {str(k): {"K": k, **_summary(cat(k, "values"), cat(k, "mc_var"))} for k in ks},
        "elbo": _summary(cat("elbo", "values"), cat("elbo", "mc_var")),
        "khat": [round(float(v), 4) for v in torch.cat([b["khat"] for b in done["batches"]])],
        "ess": [round(float(v), 2) for v in torch.cat([b["ess"] for b in done["batches"]])],
        "seconds": done["seconds"],
        "load_average_end": list(os.getloadavg()),
    }
    shape = data.image_shape or (1, x.shape[-1])
    samples = vae.sample(64, seed=args.seed)
    spread = torch.linspace(0, x.shape[0] - 1, min(10, x.shape[0])).long()  # the test split is ordered by digit
    recon = vae.reconstruct(x[spread])
    result["images"] = {"shape": list(shape), "what": "likelihood means in [0, 1], rounded to 3 decimals",
                        "samples": samples.round(decimals=3).tolist(), "data": x[spread].tolist(),
                        "data_positions_in_subset": spread.tolist(),
                        "reconstructions": recon.round(decimals=3).tolist()}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result) + "\n")
    partial.unlink()
    print(json.dumps({k: v for k, v in result.items() if k not in ("khat", "ess", "images")}, indent=1))


if __name__ == "__main__":
    from pvae.cli import configure_cpu

    configure_cpu()  # subnormal floats flushed, as the pvae command does (before the thread pool starts)
    main()
