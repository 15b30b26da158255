"""Converged reproductions of published static-binarized-MNIST numbers (issue 15).

Each configuration in ``experiments/reproduce/*.json`` follows the VampPrior paper's protocol
(Tomczak & Welling 2018): batch 100, Adam lr 5e-4, KL warm-up over 100 epochs (ELBO objectives),
early stopping with patience 50 on the validation ELBO, at most 2000 epochs, latent 40, gated
MLP 300-300, 500 pseudo-inputs for the VampPrior. Each run is ``pvae train`` in its own process,
resumable: a run directory that exists is continued with ``--resume`` (``--max-time`` bounds one
sitting; later sittings, on this or another machine, continue the checkpoint). A finished run
(early-stopped or at 2000 epochs) is evaluated with ``pvae evaluate --num-samples 5000`` (L_5000
and the ELBO, all 10,000 test images), and ``experiments/results/reproduce.json`` collects every
run's state with the published number beside it.

    PVAE_DATA_DIR=../shared/data python experiments/reproduce.py vae-standard-analytic vae-vamp \\
        --max-time 3600 --parallel 2
    python experiments/reproduce.py --summary   # only rebuild the results file

Run directories (checkpoints) live under ``results/reproduce/`` (not committed). A run that
takes longer than one sitting on a machine that keeps no files between sittings (this project's
CPU sessions start from a fresh clone) is *parked*: ``--park`` copies its resumable state
(config, environment, data record, metrics and the sealed checkpoint, each with its SHA-256) to
``experiments/parked/<name>/``, which is committed; the next sitting, on a clone without the run
directory, restores it from there (hashes checked) before it resumes, and ``--summary`` reads a
parked run's progress from it.

    python experiments/reproduce.py iwae-k50-warmup --park   # after stopping its training
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CONFIGS = HERE / "reproduce"
sys.path.insert(0, str(ROOT / "benchmarks"))
from _provenance import provenance  # noqa: E402

sys.path.insert(0, str(ROOT))
from pvae.checkpoint import RunLockedError, load_checkpoint, run_lock  # noqa: E402
from pvae.data.files import file_sha256  # noqa: E402

#: where unfinished runs are parked between sittings (committed; see the module docstring)
PARKED = HERE / "parked"
#: what resuming a run needs (pvae train --resume); the checkpoint holds the history too
PARK_FILES = ("config.json", "env.json", "data.json", "metrics.jsonl", "checkpoint.pt")
PARK_RECORD = "PARKED.json"
#: what a parking record keeps of each sitting (env.json and its earlier_sittings)
SITTING_KEYS = ("started", "git_commit", "device", "cpu_flush_denormal")

#: Published test -log p(x) (nats) on static binarized MNIST, with source and protocol notes.
PUBLISHED = {
    "vae-standard-trace": (88.56, "Tomczak & Welling 2018, Table 2, VAE (L=1) standard prior; their ELBO "
                                  "uses a Monte Carlo KL, as Trace_ELBO does"),
    "vae-standard-analytic": (88.56, "Tomczak & Welling 2018, Table 2, VAE (L=1) standard prior (their "
                                     "objective uses a Monte Carlo KL; this run uses the closed-form KL)"),
    "vae-vamp": (85.57, "Tomczak & Welling 2018, Table 2, VAE (L=1) VampPrior, 500 pseudo-inputs"),
    "iwae-k5": (87.63, "Burda et al. 2016, Appendix D: IWAE k=5, one stochastic layer, fixed binarization "
                       "(their main Table 1 is dynamically binarized MNIST); protocol differs: 784-200-200-50 "
                       "tanh MLP, batch 20, 3,280 epochs with a decaying learning rate, no early stopping "
                       "(ours: gated 300-300, latent 40, Tomczak & Welling's protocol but without a warm-up, as "
                       "Burda et al. train; vae-standard-analytic-nowarmup is the VAE without it, iwae-k5-warmup "
                       "this run with one). Value as quoted by the "
                       "nbip/IWAE reproduction's README, not checked against the paper's PDF here"),
    "iwae-k50": (87.10, "Burda et al. 2016, Appendix D: IWAE k=50, one stochastic layer, fixed binarization; "
                        "protocol differences as for iwae-k5. Value (87.1) as quoted by the "
                        "clementchadebec/benchmark_VAE reproducibility README, not checked against the paper's "
                        "PDF here"),
    "vae-standard-analytic-nowarmup": (None, "Ablation, not a reproduction: vae-standard-analytic without the KL "
                                             "warm-up, the control for the IWAE rows (trained without a warm-up, "
                                             "as Burda et al. train)"),
    "iwae-k5-warmup": (None, "Ablation, not a reproduction: iwae-k5 with the prior term of its weights annealed "
                             "over 100 epochs, log 1/K sum_k p(x|z_k)[p(z_k)/q(z_k|x)]^beta_t (the ELBO's KL "
                             "warm-up at K=1), the warmed-up counterpart of iwae-k5"),
    "iwae-k50-warmup": (None, "Ablation, not a reproduction: iwae-k50 with the prior term of its weights annealed "
                              "over 100 epochs, as iwae-k5-warmup is to iwae-k5"),
    "vae-iaf": (None, "Kingma et al. 2016 report 79.88 for a ResNet VAE with IAF; no one-layer MLP number"),
    "hvae-vamp": (None, "Tomczak & Welling 2018, Table 2, HVAE (L=2) + VampPrior (the issue quotes 83.19): "
                        "two levels of 40 units, q(z1|x, z2) q(z2|x), p(x|z1, z2); published value not yet "
                        "checked against the paper in this project, so none is shown"),
    "hvae-standard": (None, "Tomczak & Welling 2018, Table 2, HVAE (L=2) with the standard prior; published value "
                            "not yet checked against the paper in this project, so none is shown"),
}


def run_dir_of(name: str, root: Path) -> Path:
    return root / name


def train(name: str, root: Path, device: str, max_time: float, checkpoint_every: int, step: str,
          log) -> subprocess.Popen:
    run_dir = run_dir_of(name, root)
    cmd = [sys.executable, "-m", "pvae", "train", "--config", str(CONFIGS / f"{name}.json"),
           "--run-dir", str(run_dir), "--device", device, "--max-time", str(max_time),
           "--checkpoint-every", str(checkpoint_every), "--step", step, "--no-progress"]
    if (run_dir / "config.json").exists():
        cmd.append("--resume")
    return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


def first_started(values: dict) -> Optional[str]:
    """When a run's first sitting started: what identifies a run across resumed sittings (each
    sitting's ``env.json`` has its own ``started`` and keeps the earlier ones)."""
    earlier = (values or {}).get("earlier_sittings") or []
    return (earlier[0] if earlier else values or {}).get("started")


def _last_epoch(run_dir: Path) -> int:
    metrics = run_dir / "metrics.jsonl"
    lines = [line for line in metrics.read_text().splitlines() if line.strip()] if metrics.exists() else []
    return json.loads(lines[-1])["epoch"] if lines else 0


def _recover(name: str, parked: Path) -> None:
    """Finish a parking that was interrupted between its two renames (the earlier copy is back)."""
    old = parked / f".{name}.old"
    if old.exists() and not (parked / name).exists():
        old.rename(parked / name)
    shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(parked / f".{name}.parking", ignore_errors=True)


def park(name: str, root: Path, parked: Path = PARKED) -> dict:
    """Copy run ``name``'s resumable state from ``root`` to ``parked/name`` with a record of each
    file's SHA-256, the epoch, when its first sitting started and the commit of every sitting;
    replaces an earlier parking of the same run. Refused while a process trains the run (its
    lock), when a file is missing or the checkpoint does not load (its seal), and when the
    parked copy there is of another run or further along (delete it by hand to replace it)."""
    run_dir = run_dir_of(name, root)
    if not (run_dir / "checkpoint.pt").is_file():
        raise SystemExit(f"park {name}: {run_dir} holds no checkpoint.pt; nothing to park")
    _recover(name, parked)
    with run_lock(run_dir):  # a run that is training is refused (RunLockedError names its pid)
        missing = [f for f in PARK_FILES if not (run_dir / f).is_file()]
        if missing:
            raise SystemExit(f"park {name}: {run_dir} lacks {', '.join(missing)}")
        checkpoint = load_checkpoint(run_dir / "checkpoint.pt")  # checks its seal
        env = json.loads((run_dir / "env.json").read_text())
        finished = state_of(name, root, parked)["done"]  # (before staging: state_of tidies the parked folder)
        if (parked / name / PARK_RECORD).is_file():
            before = json.loads((parked / name / PARK_RECORD).read_text())
            if before.get("first_started") != first_started(env):
                raise SystemExit(f"park {name}: {parked / name} holds another run (first sitting started "
                                 f"{before.get('first_started')}, this one {first_started(env)}); delete it to replace it")
            if before["epoch"] > int(checkpoint["epoch"]):
                raise SystemExit(f"park {name}: {parked / name} is further along (epoch {before['epoch']}) than "
                                 f"{run_dir} (epoch {checkpoint['epoch']}); nothing parked")
        staging = parked / f".{name}.parking"
        staging.mkdir(parents=True)
        for f in PARK_FILES:
            shutil.copy2(run_dir / f, staging / f)
        record = {
            "run": name, "config": f"experiments/reproduce/{name}.json",
            "epoch": int(checkpoint["epoch"]), "best_epoch": checkpoint["best_epoch"],
            "finished": finished,
            "first_started": first_started(env),
            "sittings": [{k: s.get(k) for k in SITTING_KEYS} for s in [*env.get("earlier_sittings", []), env]],
            "parked": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "sha256": {f: file_sha256(staging / f) for f in PARK_FILES},
            "resume": f"python experiments/reproduce.py {name} --no-evaluate --max-time SECONDS "
                      "(restores this folder into the run directory first)",
        }
    (staging / PARK_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    target = parked / name
    if target.exists():  # (interrupted between the renames: _recover puts the old copy back)
        target.rename(parked / f".{name}.old")
    staging.rename(target)
    shutil.rmtree(parked / f".{name}.old", ignore_errors=True)
    return record


def parked_record(name: str, parked: Path = PARKED, row: Optional[dict] = None) -> Optional[dict]:
    """The parking record of ``name``, or None when there is none or when it is stale: ``row`` (the
    run's entry in the results file) is the same run, evaluated, at least as far along."""
    _recover(name, parked)
    path = parked / name / PARK_RECORD
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if (row and row.get("test_iwae") and first_started(row.get("trained_with")) == record.get("first_started")
            and (row.get("epochs_run") or 0) >= record["epoch"]):
        return None
    return record


def unpark(name: str, root: Path, parked: Path = PARKED, row: Optional[dict] = None) -> Optional[dict]:
    """Restore a parked run into ``root/name`` when that holds no run yet (a fresh clone); the
    files are checked against the parking record's hashes first. Returns the record, or None
    when there is nothing to restore: no parked run, a stale one (see :func:`parked_record`), or a
    run directory here that is the same run and at least as far along. A run directory here
    that is behind the parked copy, or another run, is refused (never overwritten)."""
    record = parked_record(name, parked, row)
    if record is None:
        return None
    source = parked / name
    run_dir = run_dir_of(name, root)
    if (run_dir / "checkpoint.pt").exists():
        env = json.loads((run_dir / "env.json").read_text()) if (run_dir / "env.json").exists() else {}
        here = _last_epoch(run_dir)
        if first_started(env) != record.get("first_started"):
            raise SystemExit(f"unpark {name}: {run_dir} holds another run than {source}; move one of them away")
        if record["epoch"] > here:
            raise SystemExit(f"unpark {name}: {source} (epoch {record['epoch']}) is ahead of {run_dir} (epoch {here}); "
                             f"remove {run_dir} to continue from the parked copy")
        return None
    changed = [f for f in PARK_FILES if not (source / f).is_file() or file_sha256(source / f) != record["sha256"].get(f)]
    if changed:
        raise SystemExit(f"unpark {name}: {', '.join(changed)} in {source} differ from {PARK_RECORD}'s hashes; "
                         "the parked run is damaged and is not restored")
    staging = root / f".{name}.unparking"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for f in PARK_FILES:
        shutil.copy2(source / f, staging / f)
    with run_lock(run_dir):  # a process starting a run there is refused, and refuses us
        left = sorted(p.name for p in run_dir.iterdir() if p.name != ".lock")
        if left:
            raise SystemExit(f"unpark {name}: {run_dir} holds {', '.join(left)} but no checkpoint; move it away "
                             f"to restore {source}")
        for f in sorted(PARK_FILES, key=lambda f: f == "checkpoint.pt"):  # the checkpoint last: it marks a run
            os.replace(staging / f, run_dir / f)
    staging.rmdir()
    return record


def located(name: str, root: Path, parked: Path = PARKED, row: Optional[dict] = None) -> Path:
    """The run's directory under ``root``, or its parked copy when ``root`` has none (and the
    parked copy is not stale against ``row``, the run's entry in the results file)."""
    run_dir = run_dir_of(name, root)
    if (not (run_dir / "metrics.jsonl").exists() and (parked / name / "metrics.jsonl").exists()
            and parked_record(name, parked, row) is not None):
        return parked / name
    return run_dir


def state_of(name: str, root: Path, parked: Path = PARKED, row: Optional[dict] = None) -> dict:
    """The run's progress, read from its metrics log (no checkpoint loading); a run parked and
    not restored here is read from its parked copy (and says so)."""
    run_dir = located(name, root, parked, row)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.exists():
        return {"status": "not started"}
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    training = json.loads((CONFIGS / f"{name}.json").read_text())["training"]
    metric = records[0]["val_metric"]
    best = max(records, key=lambda r: r[metric])
    last = records[-1]
    stopped = last["epoch"] - best["epoch"] >= training["patience"]
    times_by_device = _epoch_times(records)
    done = stopped or last["epoch"] >= training["epochs"]
    where = {}
    if run_dir.parent == parked:  # read from the parked copy: say where it is
        where["parked"] = str(run_dir.relative_to(ROOT) if run_dir.is_relative_to(ROOT) else run_dir)
    elif (record := parked_record(name, parked, row)) is not None:  # trained here, and parked (a later sitting resumes from it)
        where["parked_copy"] = {"epoch": record["epoch"], "parked": record["parked"]}
    return {
        **where,
        "status": "finished (early stopping)" if stopped else "finished (max epochs)" if done else "in progress",
        "epochs_run": last["epoch"],
        "best_epoch": best["epoch"],
        "validation_metric": metric,
        "best_val": best[metric],
        "train_seconds": sum(r["seconds"] for r in records),
        "devices": sorted(times_by_device),
        # per device: epochs and the median seconds of one (a resumed run may change machines)
        "epoch_seconds": {device: {"epochs": len(times), "median": statistics.median(times)}
                          for device, times in times_by_device.items()},
        "done": done,
        # the validation curve, for the paper's figure (the run directories are not committed)
        "val_curve": [round(r[metric], 4) for r in records],
    }


def _epoch_times(records) -> dict:
    times = {}
    for r in records:
        times.setdefault(r.get("device", "unrecorded"), []).append(r["seconds"])
    return times


def evaluate(name: str, root: Path, device: str, num_samples: int, log) -> None:
    cmd = [sys.executable, "-m", "pvae", "evaluate", str(run_dir_of(name, root)), "--num-samples",
           str(num_samples), "--estimators", "elbo,iwae", "--device", device, "--no-progress"]
    subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=True)


def summary(names, root: Path, num_samples: int, device: str = "cpu", previous: dict = None,
            parked: Path = PARKED) -> dict:
    """One entry per run from its directory under ``root``; a run whose directory is not here (a
    fresh checkout: run directories are not committed) keeps its entry from ``previous`` (the
    results file as it was), marked with the commit that wrote that entry."""
    out = {"benchmark": "converged reproductions (issue 15)", "provenance": provenance(torch.device(device)), "runs": {}}
    previous = previous or {}
    for name in names:
        old = previous.get("runs", {}).get(name)
        source = located(name, root, parked, old)  # the run directory here, or the run's (current) parked copy
        here = (source / "metrics.jsonl").exists()
        state = state_of(name, root, parked, old)
        # a rerun of a finished run is in progress here: the finished run stays the row until the
        # rerun finishes (then it replaces it, and is listed as superseded)
        rerun = (here and old and old.get("carried_over_from_commit") and str(old.get("status")).startswith("finished")
                 and not state.get("done"))
        if rerun or (not here and old and old.get("status") != "not started"):
            carried = dict(old)
            if rerun:
                carried["rerun_in_progress"] = {k: v for k, v in state.items() if k != "val_curve"}
            else:
                carried.setdefault("carried_over_from_commit", previous.get("provenance", {}).get("git_commit"))
                # neither here nor parked: nothing to resume
                if carried.get("status") == "in progress":
                    carried["resumable"] = False
                if carried.get("rerun_in_progress"):
                    carried["rerun_in_progress"] = {**carried["rerun_in_progress"], "resumable": False}
            carried["published_nll"], carried["published_note"] = PUBLISHED.get(name, (None, ""))
            out["runs"][name] = carried
            continue
        entry = {"config": f"experiments/reproduce/{name}.json", **state}
        env = source / "env.json"
        if env.exists():  # the machine and versions the run was (last) trained with
            values = json.loads(env.read_text())
            entry["trained_with"] = {k: values.get(k) for k in
                                     ("pvae", "torch", "pyro", "device", "cuda_device", "platform", "started",
                                      "git_commit", "torch_num_threads", "cpu_flush_denormal")}
            entry["trained_with"]["earlier_sittings"] = values.get("earlier_sittings", [])
        checkpoint = source / "checkpoint.pt"
        if entry.get("done") and checkpoint.exists():  # the weights every number below came from
            entry["checkpoint_sha256"] = file_sha256(checkpoint)
        entry["superseded"] = _superseded(old, entry)
        published, note = PUBLISHED.get(name, (None, ""))
        entry["published_nll"] = published
        entry["published_note"] = note
        report = source / f"evaluation-test-K{num_samples}.json"
        if report.exists():
            values = json.loads(report.read_text())
            estimates = values.get("estimates", values)
            if values.get("environment"):  # reports since 2026-11-27 name the device they were computed on
                entry["evaluated_with"] = {k: values["environment"].get(k) for k in
                                           ("pvae", "torch", "device", "cuda_device", "evaluated")}
            for key in ("elbo", "iwae"):
                if key in estimates:
                    entry[f"test_{key}"] = estimates[key]
            latent = values.get("latent") or {}
            if "active_units" in latent:  # Burda et al.'s count, on the test images, from the same report
                entry["test_active_units"] = {k: latent.get(k) for k in
                                              ("active_units", "latent_dim", "activity_threshold", "kl_total")}
            if values.get("psis"):
                entry["test_psis"] = {k: v for k, v in values["psis"].items() if not isinstance(v, list)}
            if "iwae" in estimates and published is not None:
                entry["gap_to_published_nats"] = -estimates["iwae"]["mean"] - published
        out["runs"][name] = entry
    return out


def _superseded(old, entry) -> list:
    """Earlier runs of this name that the run directory here replaced (e.g. runs whose checkpoints
    were never kept), in brief, so that the file still says what they gave and where they came from."""
    if not old:
        return []
    earlier = list(old.get("superseded", []))
    same = first_started(old.get("trained_with")) == first_started(entry.get("trained_with"))  # one run, resumed
    if not same and old.get("status") != "not started":
        brief = {k: old.get(k) for k in ("status", "epochs_run", "best_epoch", "best_val", "devices",
                                          "trained_with", "carried_over_from_commit", "checkpoint_sha256")}
        for key in ("test_elbo", "test_iwae"):
            if isinstance(old.get(key), dict):
                brief[key] = {k: old[key].get(k) for k in ("mean", "stderr", "mc_stderr_of_mean", "num_samples")}
        earlier.append(brief)
    return earlier


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", default=None, help=f"default: all of {sorted(PUBLISHED)}")
    parser.add_argument("--root", type=Path, default=ROOT / "results" / "reproduce")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-time", type=float, default=3600.0, help="seconds per sitting, per run")
    parser.add_argument("--parallel", type=int, default=1, help="runs trained at once")
    parser.add_argument("--checkpoint-every", type=int, default=1)
    parser.add_argument("--step", default="auto")
    parser.add_argument("--num-samples", type=int, default=5000)
    parser.add_argument("--no-evaluate", action="store_true")
    parser.add_argument("--summary", action="store_true", help="only rebuild the results file")
    parser.add_argument("--park", action="store_true",
                        help="copy these runs' resumable state to --parked (committed) and exit; stop their "
                             "training first")
    parser.add_argument("--parked", type=Path, default=PARKED, help="where runs are parked between sittings")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "reproduce.json")
    args = parser.parse_args(argv)
    names = args.names or sorted(PUBLISHED)
    unknown = [n for n in names if not (CONFIGS / f"{n}.json").exists()]
    if unknown:
        parser.error(f"no config for {unknown}; choose from {sorted(PUBLISHED)}")
    args.root.mkdir(parents=True, exist_ok=True)
    previous = json.loads(args.out.read_text()) if args.out.exists() else None
    rows = (previous or {}).get("runs", {})
    if args.park:
        if not args.names:
            parser.error("--park needs the names of the runs to park")
        for name in names:
            try:
                record = park(name, args.root, args.parked)
            except RunLockedError as exc:
                raise SystemExit(f"park {name}: {exc}; stop its training first (the last checkpoint is kept)")
            print(f"parked {name} at epoch {record['epoch']} in {args.parked / name}; commit that folder")
        return
    if not args.summary:
        for name in names:  # a run parked by an earlier sitting on another machine continues from there
            record = unpark(name, args.root, args.parked, rows.get(name))
            if record:
                print(f"{time.strftime('%H:%M:%S')} restored {name} (epoch {record['epoch']}, parked "
                      f"{record['parked']}) from {args.parked / name}", flush=True)
        pending = [n for n in names if not state_of(n, args.root, args.parked, rows.get(n)).get("done")]
        running = []
        while pending or running:
            while pending and len(running) < args.parallel:
                name = pending.pop(0)
                log = open(args.root / f"{name}.log", "a")
                print(f"{time.strftime('%H:%M:%S')} train {name}", flush=True)
                running.append((name, train(name, args.root, args.device, args.max_time,
                                            args.checkpoint_every, args.step, log), log))
            time.sleep(2)
            for item in list(running):
                name, proc, log = item
                if proc.poll() is not None:
                    running.remove(item)
                    log.close()
                    print(f"{time.strftime('%H:%M:%S')} {name} exited {proc.returncode}: "
                          f"{state_of(name, args.root, args.parked, rows.get(name))}", flush=True)
        if not args.no_evaluate:
            for name in names:
                report = run_dir_of(name, args.root) / f"evaluation-test-K{args.num_samples}.json"
                if state_of(name, args.root, args.parked, rows.get(name)).get("done") and not report.exists():
                    with open(args.root / f"{name}.log", "a") as log:
                        evaluate(name, args.root, args.device, args.num_samples, log)
                if report.exists() and (args.parked / name / PARK_RECORD).exists():  # done with: the repository
                    shutil.rmtree(args.parked / name)                                  # need not carry it on
                    print(f"{name} is finished and evaluated here: removed its parked copy {args.parked / name} "
                          "(commit the removal with the results)", flush=True)
    every = sorted(set(PUBLISHED) | set((previous or {}).get("runs", {})))  # the file keeps every run, not only these
    result = summary(every, args.root, args.num_samples, args.device, previous, args.parked)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({n: {k: r.get(k) for k in ("status", "epochs_run", "validation_metric", "best_val")}
                      for n, r in result["runs"].items()}, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
