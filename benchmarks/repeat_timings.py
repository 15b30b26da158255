"""Repeat a timing benchmark in fresh processes and report the spread (issue 26 item 3).

One run of a timing benchmark is one draw: a second run of ``bench_iwae.py`` once gave a ratio of
1.096 where the first had given 1.050. This driver runs a benchmark ``--repeats`` times (default
3), each in its own process, one after the other, recording the load average before each, and
writes one result file holding every repeat's full result, and for each ratio its values, median,
minimum and maximum. Run it on an idle machine (nothing else running): the load average before each
repeat is in the file (right after a repeat it still shows that repeat's own two threads, decaying
over about a minute); with ``--max-load`` a repeat first waits up to 5 minutes for the machine to
settle, and the file says whether it did.

    PVAE_DATA_DIR=../shared/data python benchmarks/repeat_timings.py train-step
    PVAE_DATA_DIR=../shared/data python benchmarks/repeat_timings.py iwae -- --images 1000 --ais-images 50

Writes ``benchmarks/results/bench_train_step.json`` / ``bench_iwae.json`` (the paper's Tables 3
and 5 read them) and, for ``iwae``, the first repeat's per-image values beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _provenance import provenance  # noqa: E402


def _train_step_ratios(result: dict) -> dict:
    return dict(result["ratios"])


def _iwae_ratios(result: dict) -> dict:
    return {"pvae/handwritten (L_K time)": result["iwae"]["ratio"],
            "AIS seconds per image": result["ais"]["seconds_per_datapoint"]}


#: name -> (script, the quantities to summarize over repeats, result file)
BENCHMARKS = {
    "train-step": ("bench_train_step.py", _train_step_ratios, "bench_train_step.json"),
    "iwae": ("bench_iwae.py", _iwae_ratios, "bench_iwae.json"),
}


def _settle(max_load: float, wait: float = 300.0) -> bool:
    """Wait (up to ``wait`` s) for the 1-minute load average to drop below ``max_load``."""
    deadline = time.monotonic() + wait
    while os.getloadavg()[0] > max_load:
        if time.monotonic() > deadline:
            return False
        time.sleep(10)
    return True


def _cpu_seconds() -> tuple:
    """(CPU seconds the whole machine has been busy, CPU seconds of this process's finished
    children) — their changes over a repeat give the CPU time that anything else took meanwhile."""
    import resource

    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        fields = [int(v) for v in open("/proc/stat").readline().split()[1:]]
        busy = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
    except (OSError, ValueError, IndexError):
        busy = float("nan")
    return busy, children.ru_utime + children.ru_stime


def summarize(values) -> dict:
    return {"values": values, "median": statistics.median(values), "min": min(values), "max": max(values)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     usage="%(prog)s BENCHMARK [options] [-- the benchmark's own arguments]")
    parser.add_argument("benchmark", choices=sorted(BENCHMARKS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-load", type=float, default=None,
                        help="before each repeat, wait (up to 5 min) for the 1-minute load average to drop below this "
                        "(default: no wait; the load before each repeat is recorded either way)")
    parser.add_argument("--out-dir", type=Path, default=HERE / "results")
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []  # the benchmark's own arguments
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    args.extra = extra
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    script, quantities, out_name = BENCHMARKS[args.benchmark]
    start = provenance(torch.device("cpu"))
    repeats = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(1, args.repeats + 1):
            settled = _settle(args.max_load) if args.max_load is not None else None
            load = list(os.getloadavg())
            out = Path(tmp) / f"repeat{r}.json"
            cmd = [sys.executable, str(HERE / script), *args.extra, "--out", str(out)]
            print(f"{time.strftime('%H:%M:%S')} repeat {r}/{args.repeats} (load {load[0]:.2f}): {' '.join(cmd)}",
                  flush=True)
            busy, own = _cpu_seconds()
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            wall = time.perf_counter() - t0
            busy_after, own_after = _cpu_seconds()
            result = json.loads(out.read_text())
            # the load average lags (right after a repeat it still shows that repeat's threads); the
            # CPU time that other processes took during the repeat says whether the machine was idle
            result["repeat"] = {"index": r, "load_average_before": load, "machine_settled": settled,
                                "wall_seconds": wall,
                                "other_cpu_seconds": (busy_after - busy) - (own_after - own)}
            repeats.append(result)
            per_image = out.with_name(out.stem + "_per_image.csv")
            if r == 1 and per_image.exists():
                shutil.copyfile(per_image, args.out_dir / (Path(out_name).stem + "_per_image.csv"))
    names = quantities(repeats[0])
    summary = {name: summarize([quantities(r)[name] for r in repeats]) for name in names}
    written = {
        "benchmark": repeats[0]["benchmark"],
        "how": f"{args.repeats} repeats of benchmarks/{script} {' '.join(args.extra)}, each in a fresh process, one "
               "after the other; every repeat's full result below; summary: each quantity's median and range over "
               "the repeats",
        "provenance": start,
        "load_average_end": list(os.getloadavg()),
        "summary": summary,
        "repeats": repeats,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / out_name).write_text(json.dumps(written, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
