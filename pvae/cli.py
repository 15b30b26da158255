"""Command line: ``pvae train`` and ``pvae evaluate``. The only module that reads argv."""

from __future__ import annotations

import argparse
import errno
import json
import sys
import time
import traceback
from pathlib import Path
from typing import List, Optional

from pvae.config import (
    AUTOENCODER_LOSSES,
    MODELS,
    PART_REGISTRIES,
    TRAINING_PARTS,
    RunConfig,
    Training,
    autoencoder_settings,
    section_options,
)
from pvae import distributed
from pvae.data import DATASETS
from pvae.errors import UsageError


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


__all__ = ["main"]


class _SetOption(argparse.Action):
    """A generated flag: records ``(section, option, raw value, flag)``; the part's declared
    option parses the value once the part is known (:meth:`pvae.registry.Registry.part`)."""

    def __init__(self, option_strings, dest, targets, deprecated_for=None, const=None, **kwargs):
        self.targets, self.deprecated_for = targets, deprecated_for
        super().__init__(option_strings, dest, const=const, nargs=0 if const is not None else None, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        if self.deprecated_for:
            print(f"pvae: {option_string} is deprecated and will be removed after pvae 0.2; use "
                  f"{self.deprecated_for}", file=sys.stderr)
        value = self.const if self.const is not None else values
        # a new list each time: the parser's default list must not collect the options of every parse
        setattr(namespace, self.dest, [*getattr(namespace, self.dest), (self.targets, value, option_string)])


#: sections whose options also get an unprefixed flag (``--beta``, ``--hidden``) when no other
#: section declares an option of that name
_UNPREFIXED_SECTIONS = ("dataset", "net", "objective")
#: options that keep their prefix even when unique (a bare --path would say nothing)
_PREFIXED_ONLY = ("path",)
#: spellings of pvae 0.1 that now have another name: flag -> (new flag, targets)
_LEGACY_FLAGS = {
    "--flows": ("--guide-num-flows / --prior-num-flows", (("guide", "num_flows"), ("prior", "num_flows"))),
    "--mog-components": ("--prior-num-components", (("prior", "num_components"),)),
    "--pseudo-inputs": ("--prior-pseudo-inputs", (("prior", "pseudo_inputs"),)),
    "--gaussian-scale": ("--likelihood-scale-mode", (("likelihood", "scale_mode"),)),
    "--val-samples": ("--val-num-samples", (("training", "val_num_samples"),)),
    "--K": ("--particles", (("objective", "num_particles"),)),
    "--weight-decay": ("--optimizer-weight-decay", (("training.optimizer", "weight_decay"),)),
    "--momentum": ("--optimizer-momentum", (("training.optimizer", "momentum"),)),
    "--lr-gamma": ("--lr-schedule-gamma", (("training.lr_schedule", "gamma"),)),
    "--lr-step": ("--lr-schedule-step / --lr-schedule-patience",
                  (("training.lr_schedule", "step"), ("training.lr_schedule", "patience"))),
    "--lr-min": ("--lr-schedule-min-lr", (("training.lr_schedule", "min_lr"),)),
}


def _add_option_flags(train) -> None:
    """Generate the flags of every part option and training setting from their declarations."""
    by_name = {}  # option name -> sections declaring it
    declared = {}  # (section, option) -> (Option, [part names])
    for section in PART_REGISTRIES:
        for part, options in section_options(section).items():
            for name, option in options.items():
                by_name.setdefault(name, set()).add(section)
                declared.setdefault((section, name), (option, []))[1].append(part)
    for (section, name), (option, parts) in declared.items():
        flags = [f"--{section}-{name.replace('_', '-')}"]
        if section in _UNPREFIXED_SECTIONS and by_name[name] == {section} and name not in _PREFIXED_ONLY:
            flags.insert(0, option.flag)
        if (section, name) == ("objective", "num_particles"):
            flags.insert(0, "--particles")  # the vocabulary's short spelling
        which = "all" if len(parts) == len(PART_REGISTRIES[section].names()) else ", ".join(parts)
        help_ = f"{section} option ({which}): {option.describe()}"
        if option.type is bool:
            train.add_argument(*flags, dest="options", action=_SetOption, targets=((section, name),), const=True,
                               help=help_)
            train.add_argument(*(f"--no-{f[2:]}" for f in flags), dest="options", action=_SetOption,
                               targets=((section, name),), const=False, help=argparse.SUPPRESS)
        else:
            train.add_argument(*flags, dest="options", action=_SetOption, targets=((section, name),),
                               metavar=name.upper(), help=help_)
    for name, option in Training.options().items():
        train.add_argument(option.flag, dest="options", action=_SetOption, targets=(("training", name),),
                           metavar=name.upper(), help=f"training: {option.describe()}")
    for field, registry in TRAINING_PARTS.items():  # the training section's parts: --optimizer sgd --optimizer-momentum 0.9
        flag = f"--{field.replace('_', '-')}"
        train.add_argument(flag, dest="options", action=_SetOption, targets=(("training", field),),
                           metavar="NAME", help=f"training: one of {registry.names()} (its options: {flag}-...)")
        declared = {}
        for part in registry.names():
            for name, option in registry.options(part).items():
                declared.setdefault(name, (option, []))[1].append(part)
        for name, (option, parts) in declared.items():
            train.add_argument(f"{flag}-{name.replace('_', '-')}", dest="options", action=_SetOption,
                               targets=((f"training.{field}", name),), metavar=name.upper(),
                               help=f"{field} option ({', '.join(parts)}): {option.describe()}")
    train.add_argument("--compile", dest="options", action=_SetOption, targets=(("training", "step"),),
                       const="compile", help="same as --step compile")
    for old, (new, targets) in _LEGACY_FLAGS.items():
        train.add_argument(old, dest="options", action=_SetOption, targets=targets, deprecated_for=new,
                           help=argparse.SUPPRESS)
    train.set_defaults(options=[])


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
    train.add_argument("--data", type=Path, help="your own data: a .npy, .npz, .pt, .csv or .tsv file or a folder "
                       "of images (same as --dataset file --dataset-path PATH; see --split, --image-size)")
    train.add_argument("--model", choices=MODELS,
                       help="'autoencoder': the plain deterministic autoencoder (delta guide, reconstruction loss)")
    train.add_argument("--loss", choices=sorted(AUTOENCODER_LOSSES),
                       help="autoencoder reconstruction loss: bce (binary cross-entropy) or mse (squared error)")
    train.add_argument("--latent-dim", "--code-size", dest="latent_dim", type=int, help="size of z (the code layer)")
    train.add_argument("--layers", type=int, help="number of hidden layers (with --units; instead of --hidden)")
    train.add_argument("--units", type=int, help="units per hidden layer (with --layers)")
    for section, registry in PART_REGISTRIES.items():
        train.add_argument(f"--{section}", help=f"one of {registry.names()} (its options: --{section}-...)")
    _add_option_flags(train)
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
    ev.add_argument("--split", default="test", choices=["train", "valid", "test", "all"])
    ev.add_argument("--data", type=Path, help="score other data (a file or image folder, read with the run's own "
                    "file options); its dimension must match the model's")
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
                    help="datapoints for PSIS k-hat of the guide (a seeded random N of the split; 0: off)")
    ev.add_argument("--restart", action="store_true",
                    help="discard the finished minibatches of an interrupted evaluation with these settings "
                    "(by default it resumes from them)")
    ev.add_argument("--no-progress", action="store_true")
    return parser


def _config_from_args(args) -> RunConfig:
    """The run config: ``--config`` (or the defaults) changed by the flags given."""
    saved = args.run_dir / "config.json" if args.run_dir is not None else None
    if args.config:
        base = RunConfig.load(args.config)
    elif args.resume and saved is not None and saved.exists():  # continue the run as it was configured
        base = RunConfig.load(saved)
    else:
        base = RunConfig()
    changes = {k: getattr(args, k) for k in ("model", "latent_dim") if getattr(args, k) is not None}
    if args.data is not None:
        if args.dataset not in (None, "file"):
            raise UsageError(f"--data reads your own file; it conflicts with --dataset {args.dataset}")
        args.dataset = "file"
        args.options.insert(0, ((("dataset", "path"),), str(args.data.expanduser().resolve()), "--data"))
    names = {s: getattr(args, s) or getattr(base, s).name for s in PART_REGISTRIES}
    if args.model == "autoencoder":
        preset = autoencoder_settings(args.loss or "bce")
        clash = [f"--{k} {getattr(args, k)}" for k in ("guide", "objective", "likelihood")
                 if getattr(args, k) is not None and getattr(args, k) != preset[k].name]
        if clash:
            raise UsageError(
                f"--model autoencoder uses guide 'delta', objective 'reconstruction' and the likelihood of --loss; "
                f"it conflicts with {', '.join(clash)} (choose the loss with --loss bce|mse)"
            )
        for k in ("guide", "objective", "likelihood"):
            names[k] = preset[k].name
            changes[k] = preset[k].to_dict()
    elif args.loss is not None:
        raise UsageError("--loss sets the autoencoder's reconstruction loss; add --model autoencoder")
    sections = {s: {"name": names[s]} for s in PART_REGISTRIES if getattr(args, s) is not None}
    for k in ("guide", "objective", "likelihood"):
        if k in changes:
            sections[k] = changes.pop(k)
    training, training_parts = {}, {}
    for targets, value, flag in args.options:
        if args.model == "autoencoder" and any(s in ("guide", "objective", "likelihood") for s, _ in targets):
            raise UsageError(f"--model autoencoder sets the guide, objective and likelihood (choose the loss with "
                             f"--loss bce|mse); it conflicts with {flag}")
        applied = False
        for section, option in targets:
            if section == "training":
                training[option] = value
                applied = True
            elif section.startswith("training."):
                training_parts.setdefault(section.split(".", 1)[1], []).append((option, value, flag, len(targets)))
                applied = True
            elif len(targets) == 1 or option in PART_REGISTRIES[section].options(names[section]):
                sections.setdefault(section, {"name": names[section]})[option] = value
                applied = True
        if not applied:
            raise UsageError(f"{flag}: neither the {' nor the '.join(f'{s} {names[s]!r}' for s, _ in targets)} "
                             f"takes {targets[0][1]}")
    if (args.layers is None) != (args.units is None):
        raise UsageError("--layers and --units go together (or give --hidden)")
    if args.layers is not None:
        if "hidden" in sections.get("net", {}):
            raise UsageError("give either --hidden or --layers/--units, not both")
        sections.setdefault("net", {"name": names["net"]})["hidden"] = (args.units,) * args.layers
    for field, options in training_parts.items():  # options of the part chosen by the flags or the config
        name = training.get(field) or getattr(base.training, field).name
        declared = TRAINING_PARTS[field].options(name)
        part = {"name": name}
        for option, value, flag, num_targets in options:
            if option in declared:
                part[option] = value
            elif num_targets == 1 or not any(o in declared for o, _, f, _ in options if f == flag):
                raise UsageError(f"{flag}: the {field} {name!r} does not take {option}"
                                 + (f"; it takes {', '.join(declared)}" if declared else "; it takes no options"))
        training[field] = part
    if training:
        changes["training"] = training
    return base.replace(**changes, **sections)


def _train(args) -> int:
    from pvae.runs import train_run

    config = _config_from_args(args)
    device = distributed.init_from_env(config.training.device)  # launched by torchrun: join the group
    data_name = Path(config.dataset["path"]).stem if config.dataset.name == "file" else config.dataset.name
    run_dir = args.run_dir or Path("runs") / f"{data_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = distributed.broadcast(run_dir)  # rank 0's name (the clocks of the processes may differ)
    run = train_run(config, run_dir, resume=args.resume, progress=not args.no_progress, command=sys.argv,
                    device=device)
    if not distributed.is_main():
        return 0
    history = run.history
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
    from pvae.inference.annealing import AISSettings
    from pvae.inference.evaluation import EvaluationSpec
    from pvae.runs import evaluate_run

    device = distributed.init_from_env(args.device) or args.device  # launched by torchrun: join the group
    spec = EvaluationSpec(
        estimators=tuple(e.strip() for e in args.estimators.split(",") if e.strip()),
        num_samples=args.num_samples, batch_size=args.batch_size, chunk_size=args.chunk_size, seed=args.seed,
        psis_datapoints=args.psis_datapoints,
        ais=AISSettings(num_chains=args.num_chains, num_steps=args.ais_steps, start=args.ais_start,
                        betas=args.ais_schedule),
    )
    report = evaluate_run(args.run_dir, spec, split=args.split, device=device, progress=not args.no_progress,
                          data_path=args.data, resume=not args.restart)
    if distributed.is_main():
        print(report.summary())
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line (``pvae train|evaluate ...``) on ``argv`` (default ``sys.argv[1:]``);
    returns the exit status: 0 done, 2 a usage error (one line, nothing left behind), 1 a bug,
    130 interrupted."""
    parser = _parser()
    args = parser.parse_args(argv)
    clean = False  # whether every process can be expected at the group's exit barrier
    try:
        code = _train(args) if args.command == "train" else _evaluate(args)
        clean = True
        return code
    except UsageError as exc:  # the user can fix it: one line, exit 2
        if not distributed.is_main():  # rank 0 says it once
            return 2
        print(f"pvae {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.command == "train":
            said = "the last checkpoint is intact (resume with --resume)"
        elif distributed.active():
            said = "a sharded evaluation keeps no partial results: the same command starts afresh"
        else:
            said = "the finished minibatches are kept: the same command resumes"
        print(f"pvae: interrupted; {said}", file=sys.stderr)
        return 130
    except Exception as exc:  # anything else is a bug: keep the traceback, ask for a report, exit 1
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):  # not a bug: a full disk
            print(f"pvae {args.command}: error: no space left on the device ({exc.filename or exc}); "
                  "free some space and run again", file=sys.stderr)
            return 2
        if isinstance(exc, (PermissionError, FileNotFoundError, IsADirectoryError, NotADirectoryError)):
            # a file the user named or a run directory's file cannot be read or written: not a bug
            print(f"pvae {args.command}: error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "),
                  file=sys.stderr)
            return 2
        traceback.print_exc()  # (every process: a failure may be one process's own)
        print(f"pvae {args.command}: internal error (a bug in pvae, not in your input): please report it "
              "with the traceback above and the command you ran", file=sys.stderr)
        return 1
    finally:
        distributed.shutdown_if_ours(wait=clean)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
