"""Build the paper's tables from result files (no number is typed by hand).

    python paper/build.py     # writes paper/generated/tables.md and paper/generated/paper.md
    python paper/build.py --html --pdf   # and paper.html, paper.pdf (pip install -e ".[paper]")

Reads ``experiments/results/*.json`` and ``benchmarks/results/*.json``; a missing result file
gives a table row saying so instead of a number.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from pathlib import Path
from typing import Tuple

ROOT = Path(__file__).resolve().parents[1]


def _load(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


#: a number quoted in the prose: ``{{ EXPR }}`` or ``{{ EXPR | FORMAT }}``, where EXPR is arithmetic
#: (+ - * / parentheses, abs, min, max, median, share_above(list, x)) over values of result files,
#: each written ``stem:path`` —
#: ``stem`` a file of experiments/results or benchmarks/results without ``.json``, ``path`` its keys
#: joined by dots (a key with other characters in double quotes, a list index as a number) — and
#: FORMAT a Python format spec (default ``.2f``): ``{{ -reproduce:runs.vae-vamp.test_iwae.mean | .1f }}``
PLACEHOLDER = re.compile(r"\{\{(.+?)\}\}", re.S)
_REFERENCE = re.compile(r'([A-Za-z_][\w\-]*):((?:[\w\-]+|"[^"]*")(?:\.(?:[\w\-]+|"[^"]*"))*)')
#: what a placeholder may compute with (besides + - * /): a list value (e.g. per-image k-hat) only
#: through share_above or median
_FUNCTIONS = {"abs": abs, "min": min, "max": max,
              "median": lambda *values: statistics.median(values[0] if len(values) == 1 else values),
              "share_above": lambda values, threshold: sum(v > threshold for v in values) / len(values)}
_ARITHMETIC = re.compile(r"^(?:[\d\s.eE+\-*/(),\[\]]|" + "|".join(_FUNCTIONS) + r")*$")


def _value_of(stem: str, path: str, folders) -> float:
    for folder in folders:
        if (folder / f"{stem}.json").exists():
            value = json.loads((folder / f"{stem}.json").read_text())
            break
    else:
        raise KeyError(f"no result file {stem}.json")
    for key in re.findall(r'"([^"]*)"|([\w\-]+)', path):
        key = key[0] or key[1]
        value = value[int(key)] if isinstance(value, list) else value[key]
    numbers = value if isinstance(value, list) else [value]
    if not numbers or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in numbers):
        raise KeyError(f"{stem}:{path} is {str(value)[:80]}, not a number or a list of numbers")
    return [float(v) for v in value] if isinstance(value, list) else float(value)


def fill_numbers(text: str, folders) -> Tuple[str, list]:
    """Replace every placeholder of ``text`` by its value from the result files; returns the text
    and the placeholders that could not be filled (each left in the text, marked)."""
    missing = []

    def fill(match):
        expr, _, spec = match.group(1).partition("|")
        try:
            # (each value in parentheses: a negative one raised to a power is squared, not negated)
            arithmetic = _REFERENCE.sub(lambda m: f"({_value_of(m.group(1), m.group(2), folders)!r})", expr)
            if not _ARITHMETIC.match(arithmetic):
                raise KeyError(f"not arithmetic over result values: {expr.strip()!r}")
            value = eval(arithmetic, {"__builtins__": {}, **_FUNCTIONS})  # noqa: S307
            return format(value, spec.strip() or ".2f")
        except (KeyError, IndexError, ValueError, TypeError, SyntaxError, ZeroDivisionError) as exc:
            missing.append(f"{match.group(0)}: {exc}")
            return f"**[no value: {match.group(1).strip()}]**"

    return PLACEHOLDER.sub(fill, text), missing


def aevb_table(summary) -> str:
    if summary is None:
        return "_AEVB experiment: no result file (run experiments/aevb_binarized_mnist.py)._\n"
    first = summary["runs"][0]
    training = summary["config"].get("training", summary["config"])  # (nested since config version 2)
    lines = [
        f"**Table 1.** {summary['experiment']}; {training['epochs']} epochs, Adam "
        f"{training['lr']}, batch {training['batch_size']}, {summary['threads']} CPU threads; "
        f"{summary['test_set']}. Test ELBO from {summary['K_elbo']} samples per image (nats per image). "
        + (f"Training time: {summary['timing']}; commit {_commit(summary['provenance'])}, 1-minute load average "
           f"{summary['provenance']['load_average_1_5_15'][0]:.2f} at the start and "
           f"{summary['load_average_end'][0]:.2f} at the end (its own two threads)." if summary.get("provenance") else
           "This result file predates the engine, the sync-free step and fused Adam, and records no commit: "
           "its timings describe older code (rerun experiments/aevb_binarized_mnist.py)."),
        "",
        "| seed | pvae test ELBO | hand-written test ELBO | pvae train s | hand-written train s | pvae / hand-written |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in summary["runs"]:
        lines.append(
            f"| {r['seed']} | {r['pvae_test_elbo']:.2f} | {r['handwritten_test_elbo']:.2f} | "
            f"{r['pvae_train_seconds']:.0f} | {r['handwritten_train_seconds']:.0f} | "
            f"{r['pvae_train_seconds'] / r['handwritten_train_seconds']:.3f} |"
        )
    p, h = summary["pvae_test_elbo"], summary["handwritten_test_elbo"]
    sd = lambda s: f" (sd {s['sd']:.2f})" if s.get("sd") is not None else ""  # noqa: E731
    ratios = [r["pvae_train_seconds"] / r["handwritten_train_seconds"] for r in summary["runs"]]
    lines.append(f"| mean | {p['mean']:.2f}{sd(p)} | {h['mean']:.2f}{sd(h)} | | | "
                 f"{statistics.median(ratios):.3f} ({min(ratios):.3f}–{max(ratios):.3f}) |")
    k = summary["K"]
    lines += [
        "",
        f"**Table 2.** Seed {first['seed']}: bounds from the same K = {k} importance samples per image "
        "(mean ± standard error over images, nats).",
        "",
        "| model | ELBO | L_K (IWAE) | −log p(x) estimate |",
        "| --- | --- | --- | --- |",
        f"| pvae | {first['pvae_test_elbo_K']['mean']:.2f} ± {first['pvae_test_elbo_K']['stderr']:.2f} | "
        f"{first['pvae_test_iwae_K']['mean']:.2f} ± {first['pvae_test_iwae_K']['stderr']:.2f} | "
        f"{-first['pvae_test_iwae_K']['mean']:.2f} |",
        f"| hand-written | {first['handwritten_test_elbo_K']['mean']:.2f} ± {first['handwritten_test_elbo_K']['stderr']:.2f} | "
        f"{first['handwritten_test_iwae_K']['mean']:.2f} ± {first['handwritten_test_iwae_K']['stderr']:.2f} | "
        f"{-first['handwritten_test_iwae_K']['mean']:.2f} |",
    ]
    return "\n".join(lines) + "\n"


def grid_table(grid) -> str:
    if grid is None:
        return "_Prior x guide grid: no result file (run experiments/components_grid.py)._\n"
    priors = list(dict.fromkeys(r["prior"] for r in grid["runs"]))
    guides = list(dict.fromkeys(r["guide"] for r in grid["runs"]))
    cell = {(r["prior"], r["guide"]): r for r in grid["runs"]}
    lines = [
        f"**Table 4.** Best validation ELBO (nats per image, ± s.e. over images) after "
        f"{grid['epochs']} epochs on {grid['dataset']}, latent {grid['latent_dim']}, MLP {grid['hidden']}; "
        "each run from `pvae train`.",
        "",
        "| prior \\ guide | " + " | ".join(guides) + " |",
        "| --- |" + " --- |" * len(guides),
    ]
    for p in priors:
        row = [f"{cell[p, g]['best_val_elbo']:.2f} ± {cell[p, g]['best_val_elbo_stderr']:.2f}"
               if (p, g) in cell else "—" for g in guides]
        lines.append(f"| {p} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _spread(summary: dict, fmt: str = "{:.3f}") -> str:
    """A quantity over repeats: its median and range (``median (min–max)``)."""
    return f"{fmt.format(summary['median'])} ({fmt.format(summary['min'])}–{fmt.format(summary['max'])})"


def _loads(bench) -> str:
    loads = [r["repeat"]["load_average_before"][0] for r in bench["repeats"]]
    text = (f"1-minute load average before each repeat {', '.join(f'{x:.2f}' for x in loads)} (after the "
            "first it still counts the previous repeat's own threads)")
    other = [r["repeat"].get("other_cpu_seconds") for r in bench["repeats"]]
    if all(o is not None for o in other):
        text += (f"; CPU time taken by other processes during each repeat "
                 f"{', '.join(f'{o:.0f}' for o in other)} s")
    return text


def bench_table(bench) -> str:
    if bench is None:
        return "_Training-step benchmark: no result file (run benchmarks/repeat_timings.py train-step)._\n"
    if "repeats" not in bench:
        return "_Training-step benchmark: the result file predates repeated timings (rerun " \
               "benchmarks/repeat_timings.py train-step)._\n"
    first, n = bench["repeats"][0], len(bench["repeats"])
    prov = bench["provenance"]
    sides = list(first["median_step_ms"])
    ms = {side: statistics.median(r["median_step_ms"][side] for r in bench["repeats"]) for side in sides}
    ratio = {side: bench["summary"].get(f"pvae/{side}") for side in sides}
    rows = "".join(f"| {name} | {first['sides'].get(name, '')} | {ms[name]:.2f} | "
                   f"{_spread(ratio[name]) if ratio[name] else '1'} |\n" for name in sides)
    return (
        f"**Table 3.** {first['benchmark']}; {first['data']}; device {prov['device']}, "
        f"{first['threads']} threads; each repeat the median over {first['blocks']} blocks of "
        f"{first['steps_per_block']} steps, the sides' order rotating; {n} repeats in fresh processes: ms per step "
        f"is the median over repeats, the ratio its median (range); commit {_commit(prov)}, {_loads(bench)}.\n\n"
        "| side | what | ms per step | pvae / side |\n| --- | --- | --- | --- |\n" + rows
    )


def gpu_table(suite) -> str:
    """Table 3b: the training step, a whole epoch and L_5000 on one GPU (benchmarks/gpu_suite.py)."""
    if suite is None or suite.get("smoke"):
        return "_GPU benchmark: no result file (run benchmarks/gpu_suite.py on a GPU)._\n"
    prov, sections = suite["provenance"], suite["sections"]
    needed = ("train_step_batch100", "train_step_batch1000", "epoch_through_fit_batch100", "iwae_K5000")
    failed = {name: (sections.get(name) or {}).get("error", "missing") for name in needed
              if not sections.get(name) or "error" in sections[name]}
    if failed:  # gpu_suite.py records a failed section as {"error": ...}
        return "_GPU benchmark: sections failed: " + "; ".join(f"{k}: {v}" for k, v in failed.items()) + "._\n"
    small, large = sections["train_step_batch100"], sections["train_step_batch1000"]
    sides = {**small["sides"], "handwritten-cuda-graph": "the hand-written step captured in a CUDA graph"}
    rows = "".join(
        f"| {name} | {sides.get(name, '')} | {ms:.2f} | {small['median_step_ms']['pvae'] / ms:.3f} | "
        f"{large['median_step_ms'][name]:.2f} | {large['median_step_ms']['pvae'] / large['median_step_ms'][name]:.3f} |\n"
        for name, ms in small["median_step_ms"].items())
    epoch, iwae = sections["epoch_through_fit_batch100"], sections["iwae_K5000"]
    return (
        f"**Table 3b.** The step of Table 3 on one GPU ({prov.get('gpu', prov['device'])}, torch {prov['torch']}): "
        f"median over {small['blocks']} blocks of {small['steps_per_block']} steps, the sides' order rotating; "
        f"{small['data']}; commit {_commit(prov)}, load average at start {prov['load_average_1_5_15'][0]:.2f}. "
        f"A whole epoch of 50,000 images (batch 100) through `pvae.fit` took {epoch['pvae']:.2f} s against "
        f"{epoch['handwritten']:.2f} s for the "
        f"hand-written eager loop (ratio {epoch['ratio']:.2f}); L_{iwae['K']} on the {iwae['images']:,} test images "
        f"took {iwae['pvae_seconds']:.2f} s against {iwae['handwritten_seconds']:.2f} s hand-written (ratio "
        f"{iwae['ratio']:.2f}).\n\n"
        "| side | what | ms per step, batch 100 | pvae / side | ms per step, batch 1000 | pvae / side |\n"
        "| --- | --- | --- | --- | --- | --- |\n" + rows
    )


def iwae_bench_table(bench) -> str:
    if bench is None:
        return "_IWAE/AIS benchmark: no result file (run benchmarks/repeat_timings.py iwae)._\n"
    if "repeats" not in bench:
        return "_IWAE/AIS benchmark: the result file predates repeated timings (rerun " \
               "benchmarks/repeat_timings.py iwae)._\n"
    first, n = bench["repeats"][0], len(bench["repeats"])
    i, a = first["iwae"], first["ais"]
    seconds = lambda key: statistics.median(r["iwae"][key + "_seconds"] for r in bench["repeats"])  # noqa: E731
    row = lambda name, key: (f"| {name} | {i[key + '_elbo']['mean']:.2f} ± {i[key + '_elbo']['stderr']:.2f} | "  # noqa: E731
                             f"{i[key + '_iwae']['mean']:.2f} ± {i[key + '_iwae']['stderr']:.2f} | "
                             f"{seconds(key):.0f} |")
    k = i["K"]
    ratio, ais_seconds = bench["summary"]["pvae/handwritten (L_K time)"], bench["summary"]["AIS seconds per image"]
    return "\n".join([
        f"**Table 5.** Importance-weighted bound with K = {k} on {i['images']} {first['data']} images, "
        f"{first['model']}; batch {i['batch_size']} images, chunks of {i['chunk_size']} samples, "
        f"{first['threads']} CPU threads, implementations alternating batch by batch; {n} repeats in fresh "
        f"processes (estimates from the first, seconds the median over repeats, the ratio's median and range); "
        f"commit {_commit(bench['provenance'])}, {_loads(bench)} (nats per image, ± s.e. over images).",
        "",
        f"| implementation | ELBO (mean of K log-weights) | L_{k} | seconds |",
        "| --- | --- | --- | --- |",
        row("pvae `evaluate_bounds`", "pvae"),
        row("hand-written PyTorch", "handwritten"),
        f"| ratio pvae / hand-written | | | {_spread(ratio)} |",
        "",
        f"**Table 6.** AIS on the first {a['images']} test images: {a['schedule']}; "
        f"{a['gradient_evaluations_per_datapoint']} gradient evaluations of log p(x, z) per image, "
        f"{_spread(ais_seconds, '{:.2f}')} s per image over the repeats ({first['threads']} threads).",
        "",
        "| estimator (same images) | mean ± s.e. (nats) | Monte Carlo s.e. of the mean |",
        "| --- | --- | --- |",
        *[f"| {label} | {e['mean']:.2f} ± {e['stderr']:.2f} | {e['mc_stderr_of_mean']:.3f} |"
          for label, e in ((f"ELBO (K={k})", a[f"elbo_K{k}_same_images"]), (f"L_{k}", a[f"iwae_K{k}_same_images"]),
                           (f"AIS ({a['ais']['num_samples']} chains)", a["ais"]))],
        f"| AIS − L_{k} (paired) | {a['ais_minus_iwae_mean']:.2f} ± {a['ais_minus_iwae_stderr']:.2f} | |",
    ]) + "\n"


def objectives_table(summary) -> str:
    if summary is None:
        return "_Objectives experiment: no result file (run experiments/objectives_mnist.py)._\n"
    lines = [
        f"**Table 7.** Training objectives on {summary['dataset']}, the same MLP ({summary['hidden']}, "
        f"latent {summary['latent_dim']}) for {summary['epochs']} epochs each, one seed, each evaluated at "
        "its best validation-ELBO epoch (pvae train's selection rule for every objective); "
        f"{summary['evaluation']}. Nats per image (± s.e. over images). The test columns are at the "
        "evaluated (best) epoch; the training objective is the last epoch's, so where the two epochs differ "
        "(mmd-vae: its validation ELBO was best after epoch 1) the columns describe different parameters.",
        "",
        "| objective | evaluated epoch | training objective (last epoch) | test ELBO | test L_K | active units | test KL |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in summary["runs"]:
        lines.append(
            f"| {r['name']} (`{r['flags'] or 'default'}`) | {r['best_epoch']} of {r['epochs']} | "
            f"{r['final_train_objective']:.2f} | "
            f"{r['test_elbo']:.2f} ± {r['test_elbo_stderr']:.2f} | {r['test_iwae']:.2f} ± {r['test_iwae_stderr']:.2f} "
            f"(K={r['K']}) | {r['active_units']}/{r['latent_dim']} | "
            + (f"{r['test_kl']:.2f}" if r.get("test_kl") is not None else "—") + " |"
        )
    return "\n".join(lines) + "\n"


def gaps_table(gaps) -> str:
    if gaps is None:
        return "_Inference gaps: no result file (run experiments/inference_gaps_mnist.py)._\n"
    st = gaps["settings"]
    fmt = lambda e: f"{e['mean']:.2f} ± {e['stderr']:.2f}"  # noqa: E731
    return "\n".join([
        f"**Table 8.** Inference gaps (Cremer et al., 2018) on the {gaps['images']}, model {gaps['run_dir']}: "
        f"q* refined per image from the encoder's output ({st['refine_steps']} Adam steps, lr {st['lr']}, "
        f"{st['num_particles']} particles, decoder fixed); ELBOs from {st['num_samples']} draws; log p(x) "
        f"estimated by {st['log_marginal']}. The amortization gap leans low (a better-optimized q* would "
        "raise ELBO[q*] and widen it). The approximation gap has no reliable direction: estimating log p(x) "
        "by a stochastic lower bound pushes it down, while an under-optimized q* pushes it up. "
        "Nats per image (± s.e. over images). "
        + (f"Commit {_commit(gaps['provenance'])}; the model's checkpoint SHA-256 {gaps['checkpoint_sha256'][:12]}."
           if gaps.get("provenance") else "This result file records neither its commit nor the checkpoint it "
           "evaluated (it predates both records)."),
        "",
        "| quantity | value |",
        "| --- | --- |",
        f"| ELBO[q_phi] (amortized encoder) | {fmt(gaps['elbo_amortized'])} |",
        f"| ELBO[q*] (refined, same family) | {fmt(gaps['elbo_refined'])} |",
        f"| log p(x) estimate | {fmt(gaps['log_marginal'])} |",
        f"| approximation gap log p(x) − ELBO[q*] | {fmt(gaps['approximation_gap'])} |",
        f"| amortization gap ELBO[q*] − ELBO[q_phi] | {fmt(gaps['amortization_gap'])} |",
    ]) + "\n"


def converged_table(summary) -> str:
    """Table 9: the converged reproductions beside the published numbers."""
    if summary is None:
        return "_Converged reproductions: no result file (run experiments/reproduce.py)._\n"
    prov = summary["provenance"]
    lines = [
        "**Table 9.** Converged reproductions on static binarized MNIST with the protocol of Tomczak & "
        "Welling (2018): gated MLP 300-300, latent 40, Adam 5e-4, batch 100, KL warm-up 100 epochs, early "
        "stopping with patience 50, at most 2000 epochs. Test −log p(x) from L_5000 on all 10,000 test images "
        "(± s.e. over images); test ELBO from the same draws. Summary written at commit "
        f"{_commit(prov)}; the device each run was trained on in the last column (test bounds "
        f"computed on the CPU{_evaluated_elsewhere(summary)}; {_evaluation_records(summary)}). Nats per image.",
        "",
        "| run | status | epochs (best) | test ELBO | test −log p(x) (L_5000) | published | ours − published | trained on "
        "| trained at, checkpoint |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    shipped = _pretrained_names()
    for name, r in summary["runs"].items():
        elbo, iwae = r.get("test_elbo"), r.get("test_iwae")
        published = r.get("published_nll")
        lines.append(
            f"| {name} | {'stopped unfinished' if r.get('resumable') is False else r.get('status', '—')} | "
            + (f"{r['epochs_run']} ({r['best_epoch']})" if r.get("epochs_run") else "—") + " | "
            + (f"{elbo['mean']:.2f} ± {elbo['stderr']:.2f}" if elbo else "not evaluated") + " | "
            + (f"{-iwae['mean']:.2f} ± {iwae['stderr']:.2f}" if iwae else "not evaluated") + " | "
            + (f"{published:.2f}" if published is not None else "— (see note)") + " | "
            + (f"{-iwae['mean'] - published:+.2f}" if iwae and published is not None else "—") + " | "
            + (", ".join(r.get("devices") or []) or "—") + " | " + _trained_at(name, r, shipped) + " |")
    notes = [f"- {name}: {r['published_note']}" for name, r in summary["runs"].items() if r.get("published_note")]
    notes += [f"- {name} supersedes {_superseded_text(old)}" for name, r in summary["runs"].items()
              for old in r.get("superseded") or []]
    notes += [f"- {name}: a rerun with a kept checkpoint is in progress ({r['rerun_in_progress']['epochs_run']} "
              "epochs so far" + ("; parked in the repository between sittings"
                                 if {"parked", "parked_copy"} & set(r["rerun_in_progress"]) else "")
              + "); the row is the earlier run's until it finishes" for name, r in summary["runs"].items()
              if r.get("rerun_in_progress") and r["rerun_in_progress"].get("resumable") is not False]
    notes += [f"- {name}: a rerun stopped unfinished after {r['rerun_in_progress']['epochs_run']} epochs (its run "
              "directory was not kept and it was not parked); the row is the earlier run's"
              for name, r in summary["runs"].items()
              if r.get("rerun_in_progress") and r["rerun_in_progress"].get("resumable") is False]
    return "\n".join(lines + ["", "Protocol differences and published references, and the runs a row replaced:",
                              ""] + notes) + "\n"


def pretrained_check_text(folder: Path) -> str:
    """The shipped models re-evaluated as a user of a fresh clone would
    (``experiments/pretrained_evaluate.py``), beside their Table 9 rows."""
    checks = [_load(path) for path in sorted(folder.glob("pretrained_evaluate-*.json"))]
    checks = [c for c in checks if c and (c["comparison"].get("iwae") or {}).get("comparable")]
    if not checks:
        return ""
    lines = ["", "The shipped models re-evaluated as a user of a fresh clone would (`experiments/pretrained_evaluate.py "
             "NAME`: `pvae evaluate pretrained:NAME --num-samples 5000` with an empty pretrained cache and another "
             "seed than the manifest's, on all 10,000 test images), against the Table 9 row: difference ± its Monte "
             "Carlo standard error, z = difference / that error, for L_5000 and for the ELBO from the same draws "
             "(L_5000's error is the delta method's, which understates it where k̂ > 0.7):", "",
             "| model | Table 9 row | seed | test L_5000 | Table 9 (seed) | difference ± MC s.e. | z | ELBO z | "
             "checkpoint | evaluated at |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for c in checks:
        iwae, elbo, table9 = c["comparison"]["iwae"], c["comparison"].get("elbo") or {}, c.get("table9") or {}
        if not table9.get("found"):
            row = f"{table9.get('run') or '—'} (no Table 9 row!)"
        elif not all((table9.get("same_as_manifest") or {}).values()):
            row = f"{table9['run']} (not the manifest report!)"
        else:
            row = table9["run"]
        how = [] if c.get("cache_was_empty", True) else ["cache not empty"]
        how += [f"resumed, {len(c['sittings'])} sittings"] if c.get("resumed") else []
        if c["seed"] == c.get("reference_seed"):
            how.append("same seed as the manifest!")
        lines.append(f"| `{c['model']}` | {row} | {c['seed']}{' (' + '; '.join(how) + ')' if how else ''} | "
                     f"{iwae['new']:.3f} | {iwae['reference']:.3f} ({c['reference_seed']}) | "
                     f"{iwae['difference']:+.4f} ± {iwae['mc_stderr_of_difference']:.4f} | {iwae['z']:+.2f} | "
                     + (f"{elbo['z']:+.2f}" if elbo.get("comparable") else "—") + " | "
                     f"{c['checkpoint_sha256'][:12]} | {_commit(c['provenance'])} |")
    return "\n".join(lines) + "\n"


def _pretrained_names() -> dict:
    """run of Table 9 -> the name of the pretrained model exported from it (pvae/pretrained/models)."""
    out = {}
    for manifest in sorted((ROOT / "pvae" / "pretrained" / "models").glob("*/manifest.json")):
        values = json.loads(manifest.read_text())
        out[values.get("reproduces")] = (values["name"], values.get("checkpoint_sha256"))
    return out


def _trained_at(name: str, r: dict, shipped: dict) -> str:
    """The commit that trained a row's run and its checkpoint (shipped as a pretrained model?)."""
    trained = r.get("trained_with") or {}
    commit = trained.get("git_commit")
    sittings = [s.get("git_commit") or "unknown" for s in trained.get("earlier_sittings") or []] + [commit or "unknown"]
    if len(sittings) > 1:  # a resumed run: every sitting's commit
        trained_at = f"{len(sittings)} sittings at commits " + ", ".join(_commit({"git_commit": c}) for c in sittings)
    else:
        trained_at = "commit " + (_commit({"git_commit": commit}) if commit else "not recorded")
    if r.get("status") == "in progress" and r.get("resumable") is False:
        return trained_at + "; its run directory was not kept and it was not parked: nothing to resume"
    if r.get("status") == "in progress":
        return trained_at + ("; in progress, parked" if r.get("parked") or r.get("parked_copy") else "; in progress")
    if not r.get("checkpoint_sha256"):
        where = f"carried over from {r['carried_over_from_commit'][:12]}" if r.get("carried_over_from_commit") else ""
        return (trained_at + "; checkpoint not kept" + (f" ({where})" if where else "")
                if r.get("status") != "not started" else "—")
    text = f"{trained_at}, SHA-256 {r['checkpoint_sha256'][:12]}"
    model, sha = shipped.get(name, (None, None))
    if model and sha == r["checkpoint_sha256"]:
        text += f"; pretrained `{model}`"
    return text


def _superseded_text(old: dict) -> str:
    iwae = old.get("test_iwae") or {}
    trained = old.get("trained_with") or {}
    return (f"a run of the same name ({old.get('epochs_run')} epochs, best {old.get('best_epoch')}"
            + (f"; test −log p(x) {-iwae['mean']:.2f} ± {iwae['stderr']:.2f}" if iwae.get("mean") is not None else "")
            + f"; trained on {trained.get('device') or ', '.join(old.get('devices') or []) or 'an unrecorded device'}"
            + (f" at commit {_commit({'git_commit': trained['git_commit']})}" if trained.get("git_commit") else
               ", commit not recorded")
            + "), whose checkpoint was not kept")


def families_table(summary) -> str:
    """Table 11: the model families of issue 25 on binarized digits (short runs, not converged)."""
    if summary is None:
        return "_Model families: no result file (run experiments/families_digits.py)._\n"
    prov, settings = summary["provenance"], summary["settings"]
    lines = [
        f"**Table 11.** Model families on the binarized 8×8 digits ({settings['test_images']} test digits), from "
        f"`experiments/families_digits.py` at commit {_commit(prov)} (load average at the start "
        f"{prov['load_average_1_5_15'][0]:.2f}): the same 256-256 MLPs, {settings['epochs']} epochs at most "
        "(early stopping, patience 50), 8 latent units in total; ELBO, L_K and the naive prior estimate with "
        f"K = {settings['K']} per digit, AIS with {settings['ais_chains']} chains of {settings['ais_steps']} steps "
        "(HMC over every continuous level; a discrete label summed out inside the density). Short runs on a small "
        "data set, not converged numbers. The CVAE's bounds are of log p(x | label), not comparable with the "
        "others'. Nats per digit, ± s.e. over digits.",
        "",
        "| run | epochs (best) | test ELBO | L_K | naive | AIS | active units (per level) | test error of q(y\\|x) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]

    def est(row, name):
        e = row["estimates"].get(name)
        return f"{e['mean']:.2f} ± {e['stderr']:.2f}" if e else "—"

    for name, row in summary["rows"].items():
        latent = row["latent"]
        levels = "; ".join(f"{site} {v['active_units']}/{v['latent_dim']}" for site, v in (latent.get("per_site") or {}).items())
        units = f"{latent['active_units']} of {latent['latent_dim']}" + (f" ({levels})" if levels else "")
        error = row.get("classification")
        label = name + (" (log p(x\\|c))" if row.get("conditional") else "")
        lines.append(f"| {label} | {row['epochs_run']} ({row['best_epoch']}) | "
                     f"{est(row, 'elbo')} | {est(row, 'iwae')} | {est(row, 'naive')} | {est(row, 'ais')} | {units} | "
                     + (f"{error['error']:.1%}" if error else "—") + " |")
    notes = [f"- {name}: no AIS: {row['ais_not_run']}" for name, row in summary["rows"].items() if row.get("ais_not_run")]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def _evaluated_elsewhere(summary) -> str:
    """The runs whose report says its bounds were computed on another device than the CPU."""
    other = {name: r["evaluated_with"]["device"] for name, r in summary["runs"].items()
             if (r.get("evaluated_with") or {}).get("device", "cpu") != "cpu"}
    return "".join(f", {name}'s on {device}" for name, device in other.items())


def _evaluation_records(summary) -> str:
    """Which reports record their device (reports written before pvae recorded it do not)."""
    recorded = [name for name, r in summary["runs"].items() if r.get("evaluated_with")]
    if len(recorded) == len(summary["runs"]):
        return "as every report records"
    if not recorded:
        return "no report records its device"
    return (f"recorded in the reports of {', '.join(recorded)}; the others predate that record (the CPU, by "
            "the notes of the sessions that evaluated them)")


def curves_figure(summary, out_dir: Path):
    """Figure 1: validation ELBO per epoch of each converged run (from the curves in the result file)."""
    if summary is None or not any(r.get("val_curve") for r in summary["runs"].values()):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    tops = []
    for name, r in summary["runs"].items():
        curve = r.get("val_curve")
        if curve and len(curve) > 1:
            metric = r.get("validation_metric", "val_elbo")
            label = name if metric == "val_elbo" else f"{name} (L_K)"
            ax.plot(range(1, len(curve) + 1), curve, label=label, lw=1.2)
            tops.append(max(curve))
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation bound (nats)")
    ax.set_ylim(-120, max(tops) + 2)
    # below the axes: the curves fill the plot's upper right, where a legend inside would hide them
    ax.legend(fontsize=7.5, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.16), frameon=False)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out_dir / "fig1_converged_curves.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _commit(provenance: dict) -> str:
    """The commit a result came from, short, keeping the mark of uncommitted changes to tracked files."""
    commit = provenance.get("git_commit", "unknown")
    return commit.removesuffix("-dirty")[:12] + ("-dirty" if commit.endswith("-dirty") else "")


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=120)
    return path


def same_images(bounds, ais) -> bool:
    """Whether an AIS result is on the bounds result's model and images (so the two can be paired):
    the same images, the same run directory and the same checkpoint (a rerun of a name writes a new
    checkpoint into the same directory; a file that predates checkpoint hashes pairs only with another
    such file)."""
    return (ais is not None and ais.get("subset") == bounds.get("subset") and ais.get("run_dir") == bounds.get("run_dir")
            and ais.get("checkpoint_sha256") == bounds.get("checkpoint_sha256"))


def bounds_figure(bounds, ais, reproduce, out_dir: Path):
    """Figure 2: L_K against K on the random test subset, with AIS on the same images, and the full
    test set's L_5000 and the published value as reference lines."""
    if bounds is None:
        return None
    from pvae.plots import bounds_versus_k

    by_k = {int(k): {"iwae": b, "elbo": bounds["elbo"]} for k, b in bounds["bounds"].items()}
    references = {}
    if same_images(bounds, ais):
        references[f"AIS, same images ({ais['ais']['chains']} chains, {ais['ais']['intermediate_distributions']} "
                    "steps)"] = ais["ais"]["mean"]
    run = (reproduce or {}).get("runs", {}).get(Path(bounds["run_dir"]).name, {})
    if run.get("test_iwae"):
        references["L_5000, all 10,000 test images"] = run["test_iwae"]["mean"]
    if run.get("published_nll") is not None:
        references["published, all test images"] = -run["published_nll"]
    fig = bounds_versus_k(by_k, references, title=f"{Path(bounds['run_dir']).name}: "
                                                  f"{bounds['subset']['images']} random test images",
                          elbo_label=f"ELBO (mean of all {bounds['num_samples']} log-weights)")
    fig.set_size_inches(6.4, 4.2)
    return _save(fig, out_dir / "fig2_bounds_vs_k.png")


def samples_figure(bounds, out_dir: Path):
    """Figure 3: samples from the converged model, and test images above their reconstructions."""
    if bounds is None or "images" not in bounds:
        return None
    import torch
    from matplotlib.figure import Figure

    images = bounds["images"]
    shape = tuple(images["shape"])
    fig = Figure(figsize=(8, 3.9), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[1.8, 1.9])
    panels = ((top, torch.tensor(images["samples"][:48]), 16, "samples E[x|z], z ~ p(z)"),
              (bottom, torch.tensor(images["data"] + images["reconstructions"]), len(images["data"]),
               "test images (top) and reconstructions E[x | z = E_q[z|x]] (bottom)"))
    for sub, pixels, ncols, title in panels:
        pixels = pixels.reshape(-1, *shape)
        axes = sub.subplots(-(-pixels.shape[0] // ncols), ncols, squeeze=False)
        for ax, img in zip(axes.flat, pixels):
            ax.imshow(img.numpy(), cmap="gray", vmin=0, vmax=1)
        for ax in axes.flat:
            ax.set_xticks([])
            ax.set_yticks([])
        sub.suptitle(title, fontsize=9)
    return _save(fig, out_dir / "fig3_samples_reconstructions.png")


def khat_figure(bounds, out_dir: Path):
    """Figure 4: PSIS k-hat per test image of the guide as proposal (from the result file)."""
    if bounds is None or not bounds.get("khat"):
        return None
    from pvae.plots import khat_histogram

    fig = khat_histogram(bounds["khat"], title=f"PSIS $\\hat k$ of q(z|x), K = {bounds['num_samples']}")
    fig.set_size_inches(6.0, 3.6)
    return _save(fig, out_dir / "fig4_khat.png")


def figures_text(bounds, ais, reproduce, out_dir: Path) -> str:
    """The Markdown for Figures 2-4 (empty where their result file is missing)."""
    text = ""
    path = bounds_figure(bounds, ais, reproduce, out_dir)
    if path is not None:
        b = bounds["bounds"]
        k_max = max(b, key=int)
        ais_line = ""
        if same_images(bounds, ais):
            ais_line = (f" AIS from the guide on the same images: {ais['ais']['mean']:.2f} "
                        f"(AIS − L_{ais_k(ais)} paired: {ais['ais_minus_iwae']['mean']:+.2f} ± "
                        f"{ais['ais_minus_iwae']['stderr_over_images']:.2f}, higher on "
                        f"{ais['ais_minus_iwae']['fraction_of_images_where_ais_is_higher']:.0%} of the images).")
        text += (f"\n![**Figure 2.** Bounds against K for {Path(bounds['run_dir']).name} on a seeded random subset of "
                 f"{bounds['subset']['images']} test images: {bounds['how']}; error bars are Monte Carlo standard "
                 f"errors of the mean (the images are the same at every K), from the spread between the groups "
                 f"for K < {k_max} and by the delta method for K = {k_max} (one group), which is unreliable where "
                 f"k̂ > 0.7 (Figure 4). The ELBO is drawn at every K for reference. ELBO {bounds['elbo']['mean']:.2f}, "
                 f"L_{k_max} {b[k_max]['mean']:.2f} (± {b[k_max]['stderr']:.2f} over images).{ais_line} "
                 "The full test set's L_5000 and the published value are over all 10,000 test images, whose mean "
                 "differs from the subset's (the subset's s.e. over images is given above); they are drawn for "
                 f"scale, not as the same quantity. Commit {_commit(bounds['provenance'])}."
                 + (f" Computed on {which}." if (which := _which_model(Path(bounds['run_dir']).name, bounds, reproduce))
                    else "") + f"]({path.name})\n")
    path = samples_figure(bounds, out_dir)
    if path is not None:
        text += (f"\n![**Figure 3.** {Path(bounds['run_dir']).name}: 48 seeded samples (likelihood means) and the "
                 f"reconstructions of {len(bounds['images']['data'])} subset test images spread evenly over the subset.]({path.name})\n")
    path = khat_figure(bounds, out_dir)
    if path is not None:
        khat = bounds["khat"]
        above = sum(k > 0.7 for k in khat) / len(khat)
        text += (f"\n![**Figure 4.** PSIS k̂ (Vehtari et al.) per image of the guide as importance proposal for "
                 f"{Path(bounds['run_dir']).name}, from the {bounds['num_samples']} draws of Figure 2: {above:.1%} of "
                 f"the {len(khat)} images are above 0.7, where importance sampling with this proposal is "
                 f"unreliable.]({path.name})\n")
    return text


def _which_model(name: str, result: dict, reproduce) -> str:
    """Whether a subset result was computed on the checkpoint that Table 9's row of ``name`` comes
    from ("" if so), else what it was computed on."""
    row = ((reproduce or {}).get("runs") or {}).get(name) or {}
    if result.get("checkpoint_sha256") and result["checkpoint_sha256"] == row.get("checkpoint_sha256"):
        return ""
    if result.get("checkpoint_sha256"):
        return "another checkpoint than Table 9's row (an earlier run of this name)"
    return ("an earlier run of this name, superseded in Table 9 (the result file predates the recording of "
            "checkpoint hashes, and that run's checkpoint was not kept)" if row.get("superseded") else
            "the run of Table 9's row by its directory (the result file predates the recording of checkpoint "
            "hashes)")


def subset_table(rows, reproduce=None) -> str:
    """Table 10: each converged model's bounds, AIS and k-hat on the same seeded random test subset
    (from its bounds_subset and ais_subset result files)."""
    rows = [(name, b, a) for name, b, a in rows if b is not None]
    if not rows:
        return ""
    first = rows[0][1]  # (every row: the same images and the same number of draws, or it is left out)
    rows = [r for r in rows if r[1]["subset"] == first["subset"] and r[1]["num_samples"] == first["num_samples"]]
    ks = sorted({int(k) for _, b, _ in rows for k in b["bounds"]} - {1})  # (L_1 is the ELBO column)
    lines = [
        "**Table 10.** Converged models on the same seeded random subset of test images "
        f"({first['subset']['images']} images: {first['subset']['how']}): ELBO and L_K from the same "
        f"{first['num_samples']} guide draws per image (L_1 is the ELBO), AIS on the same images, and the "
        "fraction of images whose PSIS k̂ exceeds 0.7. Means in nats per image (± s.e. over images for the "
        "ELBO and the largest K; the paired AIS − L_K column is ± its own s.e.)."
        + "".join(f" {name}: computed on {which}." for name, which in
                  ((name, _which_model(name, b, reproduce)) for name, b, _ in rows) if which)
        + "".join(f" {name}, AIS file: its commit was {note[0].lower() + note[1:]}" for name, _, a in rows
                  if a and (note := a.get("note") or a.get("provenance", {}).get("note")))
        + "".join(f" {name}: its AIS file (commit {_commit(a['provenance'])}) was computed on "
                  + (f"checkpoint {a['checkpoint_sha256'][:12]}" if a.get("checkpoint_sha256") else
                     "an earlier checkpoint (the file predates checkpoint hashes)")
                  + f", not the one of these bounds, so its AIS columns are left empty (there AIS − L_K = "
                  f"{a['ais_minus_iwae']['mean']:+.2f} ± {a['ais_minus_iwae']['stderr_over_images']:.2f}, AIS higher on "
                  f"{a['ais_minus_iwae']['fraction_of_images_where_ais_is_higher']:.0%} of the images)."
                  for name, b, a in rows if a and not same_images(b, a)),
        "",
        "| run | ELBO | " + " | ".join(f"L_{k}" for k in ks) + " | AIS | AIS − L_K (paired) | AIS higher on | "
        "k̂ > 0.7 | commit |",
        "|---|---|" + "---|" * len(ks) + "---|---|---|---|---|",
    ]
    for name, b, a in rows:
        same = same_images(b, a)
        cells = [f"{b['elbo']['mean']:.2f} ± {b['elbo']['stderr']:.2f}"]
        for k in ks:
            bound = b["bounds"].get(str(k))
            cells.append("—" if bound is None else f"{bound['mean']:.2f}"
                         + (f" ± {bound['stderr']:.2f}" if k == ks[-1] else ""))
        if same:
            diff = a["ais_minus_iwae"]
            cells += [(f"{a['ais']['mean']:.2f} ({a['ais']['chains']} chains, "
                       f"{a['ais']['intermediate_distributions']} steps from the {a['ais'].get('start', 'guide')})"),
                      f"{diff['mean']:+.2f} ± {diff['stderr_over_images']:.2f} (K = {ais_k(a)})",
                      f"{diff['fraction_of_images_where_ais_is_higher']:.0%}"]
        else:
            cells += ["—", "—", "—"]
        khat = [k for k in b.get("khat") or [] if k is not None and math.isfinite(k)]
        cells.append(f"{sum(k > 0.7 for k in khat) / len(khat):.1%}" if khat else "—")
        commits = sorted({_commit(b["provenance"])} | ({_commit(a["provenance"])} if same else set()))
        cells.append(", ".join(commits))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def ais_k(ais) -> str:
    return next(k[len("iwae_L"):] for k in ais if k.startswith("iwae_L"))


#: Typst rules put before pandoc's document: the captions carry their own "Figure N." (so no
#: automatic numbering), the wide tables a smaller font, and no creation date (the same result
#: files build the same bytes)
TYPST_PREAMBLE = "#set figure(numbering: none)\n#show table: set text(size: 8pt)\n#set document(date: none)\n"


def build_pdf(paper_md: Path) -> Path:
    """``paper.md`` -> ``paper.pdf`` beside it: pandoc writes Typst, the ``typst`` package (a
    wheel from the package index, no TeX installation) compiles it with the figures beside it.
    A failed compile keeps the Typst source as ``paper.typ`` and names the line."""
    try:
        import pypandoc
        import typst
    except ImportError as exc:
        raise SystemExit(f"the PDF build needs pandoc and typst: pip install -e \".[paper]\" ({exc})")
    source = TYPST_PREAMBLE + pypandoc.convert_file(str(paper_md), "typst",
                                                    extra_args=["--standalone", "--metadata", "title=pvae"])
    try:
        pdf_bytes = typst.compile(source.encode(), root=str(paper_md.parent), ignore_system_fonts=True)
    except typst.TypstError as exc:
        typ = paper_md.with_suffix(".typ")
        typ.write_text(source)
        raise SystemExit(f"typst could not compile {typ} (kept for inspection):\n{exc.diagnostic}")
    pdf = paper_md.with_suffix(".pdf")
    pdf.write_bytes(pdf_bytes)
    return pdf


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "paper" / "generated" / "tables.md")
    parser.add_argument("--experiments", type=Path, default=ROOT / "experiments" / "results")
    parser.add_argument("--benchmarks", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--html", action="store_true", help="also build paper/generated/paper.html (pandoc)")
    parser.add_argument("--pdf", action="store_true",
                        help="also build paper/generated/paper.pdf (pandoc to Typst, compiled by the typst package)")
    args = parser.parse_args(argv)
    text = "<!-- generated by paper/build.py from result files; do not edit -->\n\n"
    text += aevb_table(_load(args.experiments / "aevb_binarized_mnist.json")) + "\n"
    text += bench_table(_load(args.benchmarks / "bench_train_step.json")) + "\n"
    text += gpu_table(_load(args.benchmarks / "gpu_suite.json")) + "\n"
    text += grid_table(_load(args.experiments / "components_grid.json")) + "\n"
    text += iwae_bench_table(_load(args.benchmarks / "bench_iwae.json")) + "\n"
    text += gaps_table(_load(args.experiments / "inference_gaps_mnist.json")) + "\n"
    text += objectives_table(_load(args.experiments / "objectives_mnist.json")) + "\n"
    reproduce = _load(args.experiments / "reproduce.json")
    text += converged_table(reproduce)
    text += pretrained_check_text(args.experiments)
    text += "\n" + families_table(_load(args.experiments / "families_digits.json"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure = curves_figure(reproduce, args.out.parent)
    if figure is not None:
        text += (f"\n![**Figure 1.** Validation bound per epoch of the runs of Table 9 (fixed seed): the ELBO with one "
                 f"sample per image, or for the IWAE runs (marked L_K) L_K with K = their k, not annealed; early stopping ends each "
                 f"run 50 epochs after its best; runs still in progress end where they are.]({figure.name})\n")
    # Figures 2-4: the best evaluated run whose AIS result pairs with its bounds (same images, same
    # checkpoint), else the best that has its bounds; the captions name it
    ranked = sorted(((r["test_iwae"]["mean"], name) for name, r in (reproduce or {}).get("runs", {}).items()
                     if r.get("test_iwae")), reverse=True)
    candidates = [(name, _load(args.experiments / f"bounds_subset-{name}.json"),
                   _load(args.experiments / f"ais_subset-{name}.json")) for _, name in ranked]
    candidates = [c for c in candidates if c[1] is not None]
    chosen = next((c for c in candidates if same_images(c[1], c[2])), candidates[0] if candidates else None)
    if chosen is not None:
        text += figures_text(chosen[1], chosen[2], reproduce, args.out.parent)
    text += "\n" + subset_table(candidates, reproduce)
    args.out.write_text(text)
    source, missing = fill_numbers((ROOT / "paper" / "paper.md").read_text(), (args.experiments, args.benchmarks))
    for line in missing:
        print(f"paper/build.py: unfilled number {line}", file=sys.stderr)
    (args.out.parent / "paper.md").write_text(source.replace("<!-- include: generated/tables.md -->", text))
    print(text)
    if args.html:  # one command from result files to a readable paper with its figures
        import pypandoc

        html = args.out.parent / "paper.html"
        pypandoc.convert_file(str(args.out.parent / "paper.md"), "html5", outputfile=str(html),
                              extra_args=["--standalone", "--embed-resources", "--mathml",
                                          f"--resource-path={args.out.parent}", "--metadata", "title=pvae"])
        print(f"wrote {html}")
    if args.pdf:
        print(f"wrote {build_pdf(args.out.parent / 'paper.md')}")


if __name__ == "__main__":
    main()
