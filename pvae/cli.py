"""Command line: ``pvae train`` and ``pvae evaluate``. The only module that reads argv."""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path
from typing import List, Optional

from .config import AUTOENCODER_LOSSES, MODELS, NETS, RunConfig, autoencoder_settings
from .data import DATASETS
from .errors import UsageError
from .guides import GUIDES
from .likelihoods import LIKELIHOODS
from .nets import ACTIVATIONS
from .objectives import OBJECTIVES
from .priors import PRIORS


class _DeprecatedAlias(argparse.Action):
    """An old spelling of a flag, kept for one release: it sets the new flag's value and
    prints a deprecation line on stderr."""

    def __init__(self, option_strings, dest, new_flag: str, **kwargs):
        self.new_flag = new_flag
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"pvae: {option_string} is deprecated and will be removed after pvae 0.2; use {self.new_flag}",
              file=sys.stderr)
        setattr(namespace, self.dest, values)


def _alias(parser, old: str, new: str, dest: str, type=int) -> None:
    parser.add_argument(old, dest=dest, type=type, action=_DeprecatedAlias, new_flag=new, help=argparse.SUPPRESS)


# command-line flag -> RunConfig field (flags left unset keep the config's value)
_TRAIN_FLAGS = {
    "dataset": "dataset",
    "model": "model",
    "latent_dim": "latent_dim",
    "hidden": "hidden",
    "activation": "activation",
    "prior": "prior",
    "guide": "guide",
    "likelihood": "likelihood",
    "likelihood_scale": "likelihood_scale",
    "gaussian_scale": "gaussian_scale",
    "net": "net",
    "channels": "channels",
    "flows": "num_flows",
    "mog_components": "mog_components",
    "pseudo_inputs": "vamp_pseudo_inputs",
    "objective": "objective",
    "particles": "num_particles",
    "beta": "beta",
    "kl_warmup": "kl_warmup",
    "kl_schedule": "kl_schedule",
    "dreg": "dreg",
    "info_alpha": "info_alpha",
    "mmd_lambda": "mmd_lambda",
    "free_bits": "free_bits",
    "epochs": "epochs",
    "batch_size": "batch_size",
    "lr": "lr",
    "patience": "patience",
    "seed": "seed",
    "device": "device",
    "val_samples": "val_num_samples",
    "step": "step",
    "max_time": "max_time",
    "checkpoint_every": "checkpoint_every",
}


def _widths(text: str):
    try:
        widths = tuple(int(w) for w in text.split(",") if w.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not widths or min(widths) < 1:
        raise argparse.ArgumentTypeError(f"expected positive widths such as 500,500, got {text!r}")
    return widths


def _patience(text: str):
    return None if text.lower() in ("none", "off", "0") else int(text)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pvae", description="Auto-encoding variational Bayes with Pyro."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser(
        "train",
        help="train a VAE and write a run directory",
        description="Train a VAE. Without arguments: the 8x8 digits data set, about a minute on 2 CPU cores.",
    )
    train.add_argument("--config", type=Path, help="JSON run config; flags override its values")
    train.add_argument("--dataset", help=f"one of {DATASETS.names()}")
    train.add_argument("--model", choices=MODELS,
                       help="'autoencoder': the plain deterministic autoencoder (delta guide, reconstruction loss)")
    train.add_argument("--loss", choices=sorted(AUTOENCODER_LOSSES),
                       help="autoencoder reconstruction loss: bce (binary cross-entropy) or mse (squared error)")
    train.add_argument("--latent-dim", "--code-size", dest="latent_dim", type=int, help="size of z (the code layer)")
    train.add_argument("--hidden", type=_widths, help="encoder widths, e.g. 500,500 (decoder mirrors)")
    train.add_argument("--layers", type=int, help="number of hidden layers (with --units; instead of --hidden)")
    train.add_argument("--units", type=int, help="units per hidden layer (with --layers)")
    train.add_argument("--net", help=f"one of {NETS.names()}")
    train.add_argument("--channels", type=_widths, help="conv channels, e.g. 32,64")
    train.add_argument("--activation", help=f"one of {ACTIVATIONS.names()}")
    train.add_argument("--prior", help=f"one of {PRIORS.names()}")
    train.add_argument("--guide", help=f"one of {GUIDES.names()}")
    train.add_argument("--likelihood", help=f"one of {LIKELIHOODS.names()}")
    train.add_argument("--likelihood-scale", type=float, help="Gaussian likelihood std (initial value if learned)")
    train.add_argument("--gaussian-scale", choices=["fixed", "global", "per-dim"],
                       help="Gaussian likelihood std: fixed, one learned, or learned per dimension")
    train.add_argument("--flows", type=int, help="flow steps for flow guides and the flow prior")
    train.add_argument("--mog-components", type=int, help="components of the 'mog' prior")
    train.add_argument("--pseudo-inputs", type=int, help="pseudo-inputs of the 'vamp' prior")
    train.add_argument("--objective", help=f"one of {OBJECTIVES.names()}")
    train.add_argument("--particles", dest="particles", type=int,
                       help="num_particles: samples per datapoint in the objective (K of --objective iwae)")
    _alias(train, "--K", "--particles", "particles")
    train.add_argument("--beta", type=float, help="weight of the KL term (beta-VAE; 1 = ELBO)")
    train.add_argument("--kl-warmup", type=float, help="KL warm-up length (or cycle length) in epochs; 0 = none")
    train.add_argument("--kl-schedule", choices=["linear", "cyclical"], help="KL weight schedule over --kl-warmup")
    train.add_argument("--dreg", action="store_const", const=True,
                       help="doubly reparametrized guide gradient for --objective iwae")
    train.add_argument("--info-alpha", type=float, help="InfoVAE alpha (KL weight 1 - alpha)")
    train.add_argument("--mmd-lambda", type=float, help="InfoVAE lambda (MMD weight alpha + lambda - 1)")
    train.add_argument("--free-bits", type=float,
                       help="nats per latent dimension below which the KL is not penalized (--objective elbo-analytic-kl)")
    train.add_argument("--epochs", type=int)
    train.add_argument("--batch-size", type=int)
    train.add_argument("--lr", type=float)
    train.add_argument("--patience", type=_patience, help="early-stopping patience in epochs, or 'none'")
    train.add_argument("--seed", type=int)
    train.add_argument("--device", help="cpu, cuda or cuda:N")
    train.add_argument("--val-samples", type=int, help="samples per datapoint for the validation ELBO")
    train.add_argument("--step", choices=["auto", "eager", "compile", "cuda-graph"],
                       help="training step: auto (a CUDA graph on CUDA, eager elsewhere), eager, compile "
                            "(torch.compile), cuda-graph")
    train.add_argument("--compile", dest="step", action="store_const", const="compile",
                       help="same as --step compile")
    train.add_argument("--max-time", type=float,
                       help="stop after the epoch in which this many seconds have passed; continue later with --resume")
    train.add_argument("--checkpoint-every", type=int,
                       help="write the checkpoint every N epochs (default 1; always after the last)")
    train.add_argument("--run-dir", type=Path, help="default: runs/<dataset>-<time>")
    train.add_argument("--resume", action="store_true", help="continue the run in --run-dir")
    train.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    ev = sub.add_parser(
        "evaluate",
        help="estimates of log p(x) (ELBO, L_K, AIS, naive) and diagnostics of a trained run",
        description="Report the ELBO, the importance-weighted bound L_K and optionally AIS and the naive "
        "prior estimate (nats per datapoint, with standard errors), active units, KL and PSIS k-hat on a "
        "split; write evaluation-<split>-K<K>.json and .png in RUN_DIR.",
    )
    ev.add_argument("run_dir", type=Path)
    ev.add_argument("--num-samples", dest="num_samples", type=int, default=1000,
                    help="num_samples: importance samples per datapoint (K of L_K)")
    _alias(ev, "--K", "--num-samples", "num_samples")
    ev.add_argument("--split", default="test", choices=["train", "valid", "test"])
    ev.add_argument("--batch-size", type=int, default=100, help="datapoints per batch")
    ev.add_argument("--chunk-size", type=int, default=None,
                    help="samples per chunk (default: from a memory budget on the device)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--estimators", default="elbo,iwae",
                    help="comma-separated, any of elbo,iwae,naive,ais (default elbo,iwae)")
    ev.add_argument("--chains", dest="num_chains", type=int, default=16, help="num_chains: AIS chains per datapoint")
    _alias(ev, "--ais-chains", "--chains", "num_chains")
    ev.add_argument("--ais-steps", type=int, default=100, help="AIS annealing steps")
    ev.add_argument("--ais-start", default="prior", choices=["prior", "guide"], help="AIS initial distribution")
    ev.add_argument("--ais-schedule", default="sigmoid", choices=["sigmoid", "linear"], help="AIS temperature schedule")
    ev.add_argument("--psis-datapoints", type=int, default=500,
                    help="datapoints for PSIS k-hat of the guide (first N of the split; 0: off)")
    ev.add_argument("--no-progress", action="store_true")
    return parser


def _train(args) -> int:
    from .runs import train_run

    base = RunConfig.load(args.config) if args.config else RunConfig()
    changes = {
        field: getattr(args, flag)
        for flag, field in _TRAIN_FLAGS.items()
        if getattr(args, flag) is not None
    }
    if (args.layers is None) != (args.units is None):
        raise UsageError("--layers and --units go together (or give --hidden)")
    if args.layers is not None:
        if args.hidden is not None:
            raise UsageError("give either --hidden or --layers/--units, not both")
        changes["hidden"] = (args.units,) * args.layers
    if args.model == "autoencoder":
        preset = autoencoder_settings(args.loss or "bce")
        clash = [f"--{k.replace('_', '-')} {changes[k]}" for k in preset
                 if k in changes and changes[k] != preset[k]]
        if clash:
            raise UsageError(
                f"--model autoencoder sets {', '.join(f'{k}={v!r}' for k, v in preset.items())}; "
                f"it conflicts with {', '.join(clash)} (choose the loss with --loss bce|mse)"
            )
        changes.update(preset)
    elif args.loss is not None:
        raise UsageError("--loss sets the autoencoder's reconstruction loss; add --model autoencoder")
    config = base.replace(**changes)
    run_dir = args.run_dir or Path("runs") / f"{config.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
    vae, history = train_run(config, run_dir, resume=args.resume, progress=not args.no_progress)
    summary = {
        "run_dir": str(run_dir),
        "epochs": len(history.records),
        "best_epoch": history.best_epoch,
        "validation_metric": history.val_metric,
        "best_val": history.best_val,
        "stopped_early": history.stopped_early,
        "time_limit_reached": history.time_limit_reached,
    }
    print(json.dumps(summary, indent=2))
    return 0


def _evaluate(args) -> int:
    from .runs import evaluate_run

    report = evaluate_run(
        args.run_dir,
        split=args.split,
        num_samples=args.num_samples,
        batch_size=args.batch_size,
        chunk_size=args.chunk_size,
        seed=args.seed,
        device=args.device,
        progress=not args.no_progress,
        estimators=[e.strip() for e in args.estimators.split(",") if e.strip()],
        num_chains=args.num_chains,
        ais_steps=args.ais_steps,
        ais_start=args.ais_start,
        ais_schedule=args.ais_schedule,
        psis_datapoints=args.psis_datapoints,
    )
    print(f"{report['dataset']} {args.split} split, {report['num_datapoints']} datapoints, seed {args.seed}")
    for name, est in report["estimates"].items():
        if name in ("reconstruction", "squared-error"):
            unit = "nats" if name == "reconstruction" else "(squared data units)"
            print(f"  {est['estimator']} at the code E_q[z|x]: {est['mean']:.3f} ± {est['stderr']:.3f} {unit}")
            continue
        print(
            f"  {est['estimator']:>5} ({'chains' if name == 'ais' else 'K'}={est['num_samples']}): {est['mean']:.3f} "
            f"± {est['stderr']:.3f} nats (± is the std. error over datapoints; "
            f"Monte Carlo part ± {est['mc_stderr_of_mean']:.3f})"
        )
    latent = report["latent"]
    kl = "" if latent["kl_total"] is None else f", KL(q(z|x)||p(z)) {latent['kl_total']:.2f} nats"
    print(f"  active units: {latent['active_units']} of {latent['latent_dim']}{kl}")
    if latent["posterior_collapse"]:
        print(f"  warning: {latent['posterior_collapse']}")
    if "psis" in report:
        p = report["psis"]
        print(f"  PSIS k-hat of q(z|x) (first {p['datapoints']} datapoints, K={p['num_samples']}): mean "
              f"{p['khat_mean']:.2f}, {p['fraction_above_0.7']:.1%} above 0.7")
    if "figure" in report:
        print(f"  figure: {Path(args.run_dir) / report['figure']}")
    for name, why in report["skipped"].items():
        print(f"  {name}: skipped ({why})")
    if "nll_iwae" in report:
        print(f"  -log p(x) ≈ {report['nll_iwae']:.3f} nats (from L_{args.num_samples}), "
              f"{report['bits_per_dim_iwae']:.4f} bits/dim")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            return _train(args)
        return _evaluate(args)
    except UsageError as exc:  # the user can fix it: one line, exit 2
        print(f"pvae {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pvae: interrupted; the last checkpoint is intact (resume with --resume)", file=sys.stderr)
        return 130
    except Exception:  # anything else is a bug: keep the traceback, ask for a report, exit 1
        traceback.print_exc()
        print(f"pvae {args.command}: internal error (a bug in pvae, not in your input): please report it "
              "with the traceback above and the command you ran", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
