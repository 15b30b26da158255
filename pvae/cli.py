"""Command line: ``pvae train`` and ``pvae evaluate``. The only module that reads argv."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import re
import shlex
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Dict, List, Optional

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
from pvae.inference.annealing import AISSettings
from pvae.inference.evaluation import EvaluationSpec
from pvae.registry import Registry


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
_UNPREFIXED_SECTIONS = ("model", "dataset", "net", "objective")
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


def _show(value: Any, switch: bool = False) -> str:
    """A default as a user types it (``switch``: a flag without a value, on or off)."""
    if isinstance(value, bool):
        return ("on" if value else "off") if switch else str(value).lower()
    if value is None or value == "" or value == ():
        return "none"
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value))
    return str(value)


def _defaults(by_part: Dict[str, Any], every_part: bool, switch: bool = False) -> str:
    """``(default: X)`` when every part takes the option with one default, else each default
    with the parts it belongs to: ``(default: 50 for vamp)``, ``(default: 0.99 for exponential;
    0.5 for plateau; 0.1 for step)``."""
    shown: Dict[str, List[str]] = {}
    for part, value in by_part.items():
        shown.setdefault(_show(value, switch), []).append(part)
    if every_part and len(shown) == 1:
        return f"(default: {next(iter(shown))})"
    return "(default: " + "; ".join(f"{value} for {', '.join(parts)}" for value, parts in shown.items()) + ")"


def _help(option, default: str) -> str:
    """An option's help: its ``:param:`` text, its choices, and ``default`` last (``%`` escaped
    for argparse)."""
    choices = f" (one of {', '.join(map(str, option.choices))})" if option.choices else ""
    return f"{option.help}{choices} {default}".strip().replace("%", "%%")


#: the train command's groups of flags: config section -> (title, description)
_GROUPS = {
    "model": ("model", "what is trained (a --config file's values, changed by the flags given)"),
    "dataset": ("dataset", "the data: --dataset NAME (or --data FILE) and the options of the data sets that "
                "take them (each option's default names them)"),
    "net": ("net", "the encoder and decoder networks: --net NAME and its options"),
    "prior": ("prior", "the prior p(z): --prior NAME and its options"),
    "guide": ("guide", "the guide q(z|x): --guide NAME and its options"),
    "likelihood": ("likelihood", "the likelihood p(x|z): --likelihood NAME and its options"),
    "objective": ("objective", "the training objective: --objective NAME and its options"),
    "training": ("training", "how the model is trained (pvae.Training; defaults: Training()'s)"),
    "training.optimizer": ("training: optimizer", "--optimizer NAME and its options"),
    "training.lr_schedule": ("training: learning-rate schedule", "--lr-schedule NAME and its options"),
    "run": ("run directory and progress", None),
}


def _add_option_flags(train, groups=None) -> None:
    """Generate the flags of every part option and training setting from their declarations,
    each in its section's group of ``groups`` (section -> argument group; default: ``train``).
    argparse keeps no default for them (``_config_from_args`` applies the flags given to the
    config): the defaults are in the help."""
    groups = groups or {}
    by_name = {}  # option name -> sections declaring it
    declared = {}  # (section, option) -> (Option, {part name: default})
    for section in PART_REGISTRIES:
        for part, options in section_options(section).items():
            for name, option in options.items():
                by_name.setdefault(name, set()).add(section)
                declared.setdefault((section, name), (option, {}))[1][part] = option.default
    for (section, name), (option, parts) in declared.items():
        group = groups.get(section, train)
        flags = [f"--{section}-{name.replace('_', '-')}"]
        if section in _UNPREFIXED_SECTIONS and by_name[name] == {section} and name not in _PREFIXED_ONLY:
            flags.insert(0, option.flag)
        if (section, name) == ("objective", "num_particles"):
            flags.insert(0, "--particles")  # the vocabulary's short spelling
        every = len(parts) == len(PART_REGISTRIES[section].names())
        if option.type is bool:
            group.add_argument(*flags, dest="options", action=_SetOption, targets=((section, name),), const=True,
                               help=_help(option, _defaults(parts, every, switch=True)))
            group.add_argument(*(f"--no-{f[2:]}" for f in flags), dest="options", action=_SetOption,
                               targets=((section, name),), const=False, help=argparse.SUPPRESS)
        else:
            group.add_argument(*flags, dest="options", action=_SetOption, targets=((section, name),),
                               metavar=name.upper(), help=_help(option, _defaults(parts, every)))
    training, defaults = groups.get("training", train), Training()
    for name, option in Training.options().items():
        training.add_argument(option.flag, dest="options", action=_SetOption, targets=(("training", name),),
                              metavar=name.upper(), help=_help(option, f"(default: {_show(getattr(defaults, name))})"))
    training.add_argument("--compile", dest="options", action=_SetOption, targets=(("training", "step"),),
                          const="compile", help="same as --step compile (default: off)")
    for field, registry in TRAINING_PARTS.items():  # the training section's parts: --optimizer sgd --optimizer-momentum 0.9
        group = groups.get(f"training.{field}", train)
        flag = f"--{field.replace('_', '-')}"
        group.add_argument(flag, dest="options", action=_SetOption, targets=(("training", field),),
                           metavar="NAME", help=f"one of {', '.join(registry.names())} "
                           f"(default: {getattr(defaults, field).name})")
        declared = {}
        for part in registry.names():
            for name, option in registry.options(part).items():
                declared.setdefault(name, (option, {}))[1][part] = option.default
        for name, (option, parts) in declared.items():
            group.add_argument(f"{flag}-{name.replace('_', '-')}", dest="options", action=_SetOption,
                               targets=((f"training.{field}", name),), metavar=name.upper(),
                               help=_help(option, _defaults(parts, len(parts) == len(registry.names()))))
    for old, (new, targets) in _LEGACY_FLAGS.items():
        train.add_argument(old, dest="options", action=_SetOption, targets=targets, deprecated_for=new,
                           help=argparse.SUPPRESS)
    train.set_defaults(options=[])


def _version() -> str:
    import pyro
    import torch

    from pvae import __version__

    return f"pvae {__version__} (torch {torch.__version__}, pyro {pyro.__version__})"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pvae", description="Auto-encoding variational Bayes with Pyro."
    )
    parser.add_argument("--version", action="version", version=_version(),
                        help="print the versions of pvae, torch and pyro and exit")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser(
        "train",
        help="train a VAE and write a run directory",
        description="Train a VAE. Without arguments: the 8x8 digits data set, about a minute on 2 CPU cores. "
        "The flags are grouped by config section; a part's options apply to the parts named in their "
        "default, e.g. --prior-pseudo-inputs (default: 50 for vamp) to --prior vamp.",
    )
    groups = {key: train.add_argument_group(title, description) for key, (title, description) in _GROUPS.items()}
    fields = {f.name: f.default for f in dataclasses.fields(RunConfig)}
    model = groups["model"]
    model.add_argument("--config", type=Path, help="JSON run config; flags override its values (default: none: "
                       "pvae.RunConfig()'s values)")
    model.add_argument("--model", choices=MODELS.names(), metavar="NAME",
                       help=f"one of {', '.join(MODELS.names())}: 'autoencoder' is the plain deterministic autoencoder "
                       "(delta guide, reconstruction loss; it sets the guide, objective and likelihood); hvae, cvae, "
                       f"m2 and mixture are the model families of pvae.families (default: {fields['model'].name})")
    model.add_argument("--loss", choices=sorted(AUTOENCODER_LOSSES),
                       help="autoencoder reconstruction loss: bce (binary cross-entropy) or mse (squared error) "
                       "(default: bce)")
    model.add_argument("--latent-dim", "--code-size", dest="latent_dim", type=int,
                       help=f"size of z (the code layer) (default: {fields['latent_dim']})")
    groups["dataset"].add_argument(
        "--data", type=Path, help="your own data: a .npy, .npz, .pt, .csv or .tsv file or a folder of images (same as "
        "--dataset file --dataset-path PATH; see --split, --image-size) (default: none)")
    for section, registry in PART_REGISTRIES.items():
        if section == "model":  # (--model above)
            continue
        groups[section].add_argument(f"--{section}", metavar="NAME",
                                     help=f"one of {', '.join(registry.names())} (default: {fields[section].name})")
    groups["net"].add_argument("--layers", type=int,
                               help="number of hidden layers (with --units; instead of --hidden) (default: none)")
    groups["net"].add_argument("--units", type=int, help="units per hidden layer (with --layers) (default: none)")
    _add_option_flags(train, groups)
    run = groups["run"]
    run.add_argument("--run-dir", type=Path, help="the run directory (default: runs/<dataset>-<time>)")
    run.add_argument("--resume", action="store_true",
                     help="continue the run in --run-dir, with its config.json (default: off)")
    run.add_argument("--no-progress", action="store_true", help="hide the progress bar (default: shown)")

    ev = sub.add_parser(
        "evaluate",
        help="estimates of log p(x) (ELBO, L_K, AIS, naive) and diagnostics of a trained run",
        description="Report the ELBO, the importance-weighted bound L_K and optionally AIS and the naive "
        "prior estimate (nats per datapoint, with standard errors), active units, KL and PSIS k-hat on a "
        "split; write evaluation-<split>-K<K>.json, .png and .per-datapoint.csv in RUN_DIR (-seed<S> added to the "
        "names for a --seed other than 0). Defaults: pvae.EvaluationSpec()'s "
        "and pvae.AISSettings()'s.",
    )
    spec, ais = EvaluationSpec(), AISSettings()
    ev.add_argument("run_dir", help="a run directory written by pvae train, or pretrained:NAME for a model "
                    "shipped with pvae (pvae.pretrained.available(); also pretrained:FOLDER or pretrained:URL of an "
                    "exported model): the report is written into a verified copy in the cache folder "
                    "($PVAE_PRETRAINED_DIR, default ~/.cache/pvae/pretrained)")
    what = ev.add_argument_group("estimates")
    what.add_argument("--estimators", default=",".join(spec.estimators),
                      help=f"comma-separated, any of elbo,iwae,naive,ais (default: {','.join(spec.estimators)})")
    what.add_argument("--num-samples", dest="num_samples", type=int, default=spec.num_samples,
                      help=f"num_samples: importance samples per datapoint (K of L_K) (default: {spec.num_samples})")
    _alias(ev, "--K", "--num-samples", "num_samples")
    what.add_argument("--psis-datapoints", type=int, default=spec.psis_datapoints,
                      help="datapoints for PSIS k-hat of the guide (a seeded random N of the split; 0: off) "
                      f"(default: {spec.psis_datapoints})")
    annealing = ev.add_argument_group("annealed importance sampling (--estimators ...,ais)")
    annealing.add_argument("--chains", dest="num_chains", type=int, default=ais.num_chains,
                           help=f"num_chains: AIS chains per datapoint (default: {ais.num_chains})")
    _alias(ev, "--ais-chains", "--chains", "num_chains")
    annealing.add_argument("--ais-steps", type=int, default=ais.num_steps,
                           help=f"AIS annealing steps (default: {ais.num_steps})")
    annealing.add_argument("--ais-start", default=ais.start, choices=["prior", "guide"],
                           help=f"AIS initial distribution (default: {ais.start})")
    annealing.add_argument("--ais-schedule", default=ais.betas, choices=["sigmoid", "linear"],
                           help=f"AIS temperature schedule (default: {ais.betas})")
    data = ev.add_argument_group("data")
    data.add_argument("--split", default="test", choices=["train", "valid", "test", "all"],
                      help="the split to evaluate (default: test)")
    data.add_argument("--data", type=Path, help="score other data (a file or image folder, read with the run's own "
                      "file options); its dimension must match the model's (default: none: the run's data)")
    compute = ev.add_argument_group("computation")
    compute.add_argument("--batch-size", type=int, default=spec.batch_size,
                         help=f"datapoints per batch (default: {spec.batch_size})")
    compute.add_argument("--chunk-size", type=int, default=spec.chunk_size,
                         help=f"samples per chunk (default: {_show(spec.chunk_size)}: from a memory budget on the "
                         "device)")
    compute.add_argument("--seed", type=int, default=spec.seed,
                         help=f"minibatch i draws from seed (seed, i) (default: {spec.seed})")
    compute.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    run = ev.add_argument_group("resume and progress")
    run.add_argument("--restart", action="store_true",
                     help="discard the finished minibatches of an interrupted evaluation with these settings "
                     "(default: off: it resumes from them)")
    run.add_argument("--no-progress", action="store_true", help="hide the progress bars (default: shown)")
    cmp = sub.add_parser(
        "compare",
        help="the paired difference of two evaluations of the same datapoints",
        description="Compare two reports written by pvae evaluate on the same data, datapoint by datapoint: the "
        "mean of a - b and its paired standard error std(a - b)/sqrt(N), beside the reports' own Monte Carlo "
        "errors combined. Two models on the same test images: the paired error bar removes what the images "
        "share. One model, two seeds: the paired error is an empirical Monte Carlo error of the difference "
        "(see pvae.paired_difference).",
    )
    cmp.add_argument("report_a", type=Path, help="a report's .json (its .per-datapoint.csv beside it)")
    cmp.add_argument("report_b", type=Path, help="the other report's .json, of the same datapoints")
    cmp.add_argument("--estimator", default="iwae",
                     help="the estimate to compare: elbo, iwae, naive, ais, ... (default: iwae)")
    cmp.add_argument("--json", action="store_true", help="print the result as JSON (default: text)")
    return parser


def _compare(args) -> int:
    from pvae.inference.paired import paired_difference

    result = paired_difference(args.report_a, args.report_b, args.estimator)
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.summary())
    return 0


def _config_from_args(args) -> RunConfig:
    """The run config: ``--config`` (or the defaults) changed by the flags given."""
    saved = args.run_dir / "config.json" if args.run_dir is not None else None
    if args.config:
        base = RunConfig.load(args.config)
    elif args.resume and saved is not None and saved.exists():  # continue the run as it was configured
        base = RunConfig.load(saved)
    else:
        base = RunConfig()
    changes = {k: getattr(args, k) for k in ("latent_dim",) if getattr(args, k) is not None}
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


def _sections_of(exc: BaseException) -> Optional[set]:
    """The config sections whose options an error from building the config or the model is
    about: that of the innermost method on its traceback of a part (a registered class), of a
    part registry, or of ``Training`` / ``RunConfig``; None when it was raised outside them
    (reading data, devices, training itself)."""
    registries = {id(registry): section for section, registry in PART_REGISTRIES.items()}
    registries.update({id(registry): f"training.{field}" for field, registry in TRAINING_PARTS.items()})
    classes = [(registry.get(name), section) for section, registry in PART_REGISTRIES.items()
               for name in registry.names() if isinstance(registry.get(name), type)]
    frames = []
    tb = exc.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):  # innermost first
        owner = frame.f_locals.get("self")
        if owner is None:
            continue
        if isinstance(owner, Registry) and id(owner) in registries:
            return {registries[id(owner)]}
        part = next((section for cls, section in classes if isinstance(owner, cls)), None)
        if part is not None:
            return {part}
        if isinstance(owner, Training):
            return {"training", *(f"training.{field}" for field in TRAINING_PARTS)}
        if isinstance(owner, RunConfig):
            return {"model"}
    return None


def _names_of(section: str, option: str) -> set:
    """The names an error message may call an option by: its own and pvae 0.2's flat training
    keys (``lr_gamma`` for the schedule's ``gamma``)."""
    from pvae.training.controls import LEGACY_TRAINING_KEYS

    names = {option}
    if section.startswith("training."):
        field = section.split(".", 1)[1]
        names |= {key for key, (part, options, _) in LEGACY_TRAINING_KEYS.items()
                  if part == field and option in options}
    return names


def _name_the_flags(exc: UsageError, args) -> None:
    """Say which flag a user typed when an error from building the config or the model names an
    option that a flag set (``--prior-num-components 0: num_components must be a positive
    integer``): the message is changed in place, the exception keeps its type."""
    message = str(exc)
    sections = _sections_of(exc)
    if not sections:
        return
    given = [(section, option, flag, flag if isinstance(value, bool) else f"{flag} {shlex.quote(str(value))}")
             for targets, value, flag in args.options for section, option in targets]  # (.., as typed)
    if args.latent_dim is not None:
        given.append(("model", "latent_dim", "--latent-dim", f"--latent-dim {args.latent_dim}"))
    if args.layers is not None and args.units is not None:
        given.append(("net", "hidden", "--layers", f"--layers {args.layers} --units {args.units}"))
    named, seen = [], set()  # (section, flag, as typed); the options seen
    for section, option, flag, typed in reversed(given):  # the last flag that sets an option is the one applied
        if (section, option) in seen:
            continue
        seen.add((section, option))
        if section not in sections or flag in message:
            continue
        if section == "training" and option in TRAINING_PARTS:  # --optimizer NAME: the part, not an option
            continue
        if any(re.search(rf"(?<![A-Za-z0-9]){re.escape(name)}(?![A-Za-z0-9])", message)
               for name in _names_of(section, option)):
            named.insert(0, (section, flag, typed))
    if any(section == "training" for section, _, _ in named):  # Training's own check of its own setting
        named = [n for n in named if n[0] == "training"]
    if named:
        exc.args = (f"{', '.join(typed for _, _, typed in named)}: {message}", *exc.args[1:])


def _train(args) -> int:
    from pvae.runs import train_run

    try:
        config = _config_from_args(args)
        device = distributed.init_from_env(config.training.device)  # launched by torchrun: join the group
        data_name = Path(config.dataset["path"]).stem if config.dataset.name == "file" else config.dataset.name
        run_dir = args.run_dir or Path("runs") / f"{data_name}-{time.strftime('%Y%m%d-%H%M%S')}"
        run_dir = distributed.broadcast(run_dir)  # rank 0's name (the clocks of the processes may differ)
        run = train_run(config, run_dir, resume=args.resume, progress=not args.no_progress, command=sys.argv,
                        device=device)
    except UsageError as exc:  # an option's check names the option: say which flag set it
        _name_the_flags(exc, args)
        raise
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
        "stop_reason": history.stop_reason,
    }
    print(json.dumps(summary, indent=2))
    print(_finished_line(history, run_dir, run.config.training.epochs), file=sys.stderr)
    return 0


def _finished_line(history, run_dir, epochs: int) -> str:
    """One line for the user at the end of ``pvae train``: the best epoch and its validation
    metric, why training stopped, where the run is and the command to run next."""
    done = len(history.records)
    if history.best_epoch is not None:
        best = f"best {history.val_metric} {history.best_val:.3f} at epoch {history.best_epoch}"
    else:
        best = "no validation metric (no validation data)"
    if history.stop_reason is not None:  # early stopping, the time limit, a callback's reason
        why = f"stopped after epoch {done} of {epochs}: {history.stop_reason}"
    elif history.time_limit_reached:
        why = f"stopped at the time limit after epoch {done} of {epochs}"
    else:
        why = f"trained all {epochs} epoch{'s' if epochs != 1 else ''}"
    where = shlex.quote(str(run_dir))
    then = (f"continue: pvae train --run-dir {where} --resume" if history.time_limit_reached
            else f"next: pvae evaluate {where}")
    return f"pvae train: {best}; {why}; the run is in {where}; {then}"


#: settings of EvaluationSpec and AISSettings -> (the evaluate flag that sets it, its dest)
_EVALUATE_FLAGS = {"num_samples": ("--num-samples", "num_samples"), "batch_size": ("--batch-size", "batch_size"),
                   "chunk_size": ("--chunk-size", "chunk_size"),
                   "psis_datapoints": ("--psis-datapoints", "psis_datapoints"),
                   "estimators": ("--estimators", "estimators"), "num_chains": ("--chains", "num_chains"),
                   "num_steps": ("--ais-steps", "ais_steps")}


#: ``pvae evaluate pretrained:NAME`` evaluates a pretrained model (pvae.pretrained)
PRETRAINED_PREFIX = "pretrained:"


def _evaluate(args) -> int:
    from pvae.runs import evaluate_run

    device = distributed.init_from_env(args.device) or args.device  # launched by torchrun: join the group
    try:
        spec = EvaluationSpec(
            estimators=tuple(e.strip() for e in args.estimators.split(",") if e.strip()),
            num_samples=args.num_samples, batch_size=args.batch_size, chunk_size=args.chunk_size, seed=args.seed,
            psis_datapoints=args.psis_datapoints,
            ais=AISSettings(num_chains=args.num_chains, num_steps=args.ais_steps, start=args.ais_start,
                            betas=args.ais_schedule),
        )
    except UsageError as exc:  # it names the setting: say which flag set it
        field = re.search(r"(?:EvaluationSpec|AISSettings)\.(\w+)", str(exc))
        flag, dest = _EVALUATE_FLAGS.get(field.group(1) if field else "", (None, None))
        if flag is not None:
            exc.args = (f"{flag} {getattr(args, dest)}: {exc}", *exc.args[1:])
        raise
    run_dir = Path(args.run_dir)
    if args.run_dir.startswith(PRETRAINED_PREFIX):
        from pvae import pretrained

        run_dir = pretrained.writable_copy(args.run_dir[len(PRETRAINED_PREFIX):])
    report = evaluate_run(run_dir, spec, split=args.split, device=device, progress=not args.no_progress,
                          data_path=args.data, resume=not args.restart)
    if distributed.is_main():
        print(report.summary())
    return 0


#: set to 1 to keep subnormal floats in ``pvae`` processes (see :func:`configure_cpu`)
KEEP_DENORMALS_ENV = "PVAE_KEEP_DENORMALS"


def configure_cpu(environ=None) -> bool:
    """Flush subnormal floats to zero on the CPU (``torch.set_flush_denormal``) unless
    ``PVAE_KEEP_DENORMALS=1``; returns whether flushing is on. Called first thing by
    :func:`main`, before any parallel operation starts the thread pool: the pool's threads inherit
    the mode from the thread that creates them, and a thread that already exists keeps its own.

    Why: x86 CPUs handle subnormal operands (|x| below about 1.2e-38 in float32) in microcode, many
    times slower than normal ones. Training produces them: the backward pass of a gated MLP (the
    VampPrior protocol's network) writes them once training has moved the weights, and its
    matrix products then run several times slower (``benchmarks/bench_denormal.py`` measures
    it beside hand-written PyTorch steps, and counts which operators write them). Flushing
    changes a value only where it is below 1.2e-38, which none of pvae's estimates can see; a
    run records the mode it trained with in ``env.json`` (``cpu_flush_denormal``)."""
    import os

    import torch

    environ = os.environ if environ is None else environ
    keep = environ.get(KEEP_DENORMALS_ENV, "").strip().lower() in ("1", "true", "yes")
    if keep:
        torch.set_flush_denormal(False)
        return False
    return bool(torch.set_flush_denormal(True))


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line (``pvae train|evaluate|compare ...``) on ``argv`` (default ``sys.argv[1:]``);
    returns the exit status: 0 done, 2 a usage error (one line, nothing left behind), 1 a bug,
    130 interrupted. Subnormal floats are flushed to zero on the CPU while it runs
    (:func:`configure_cpu`). Called in a process that has already computed (a notebook, a test), this
    reaches only the calling thread and pool threads started during the call (``env.json`` then
    records ``cpu_flush_denormal: "mixed"``); the calling thread gets its mode back afterwards."""
    import torch

    from pvae.runs import thread_flushes_denormals

    before = thread_flushes_denormals()  # (not a parallel operation: it would start the pool unflushed)
    configure_cpu()
    try:
        return _main(argv)
    finally:
        torch.set_flush_denormal(before)


def _main(argv: Optional[List[str]] = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    clean = False  # whether every process can be expected at the group's exit barrier
    try:
        code = {"train": _train, "evaluate": _evaluate, "compare": _compare}[args.command](args)
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
        elif args.command == "compare":
            said = "it writes nothing"
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
