"""Per-datapoint values of an evaluation, and the paired comparison of two evaluations of the
same datapoints.

:meth:`~pvae.inference.evaluation.EvaluationReport.save` writes, beside ``<stem>.json``, the file
``<stem>.per-datapoint.csv`` (suffix ``PER_DATAPOINT_SUFFIX``): one row per evaluated datapoint (``index``: its row in the evaluated
split, counting from 0), a column per estimate (nats) and its per-datapoint Monte Carlo standard
error (``<name>_mc_stderr_per_datapoint``), and ``khat`` (PSIS k-hat of the guide, on the PSIS subset only; empty
elsewhere). The report names the file and its SHA-256 (``per_datapoint``).

:func:`paired_difference` compares two reports of the same datapoints image by image:
``d_i = a_i - b_i``, the mean of ``d`` and its standard error ``std(d) / sqrt(N)``.

- *Two models on the same test images* (is the VampPrior better than the standard prior?): the
  paired error bar is the one to use. Each model's own ``stderr`` over datapoints (about 0.2 nats on
  MNIST's test set) is dominated by how hard the images are, which both models share; the paired one
  removes it.
- *One model, two seeds*: ``E[d_i] = 0`` and ``std(d) / sqrt(N)`` is an *empirical* Monte Carlo
  standard error of the difference, with no delta method. Set beside ``mc_stderr_of_difference`` (the
  reports' own Monte Carlo errors combined, ``hypot(mc_a, mc_b)``) it shows how far the delta
  method's error of ``L_K`` can be trusted: where PSIS k-hat exceeds 0.7 it understates.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional, Union

import torch

from pvae.errors import UsageError

__all__ = ["paired_difference", "PairedDifference", "read_per_datapoint", "per_datapoint_table",
           "PER_DATAPOINT_SUFFIX"]

#: suffix of the per-datapoint file beside a report's ``<stem>.json``
PER_DATAPOINT_SUFFIX = ".per-datapoint.csv"


def per_datapoint_table(report) -> str:
    """The per-datapoint CSV text of ``report`` (an
    :class:`~pvae.inference.evaluation.EvaluationReport` with its estimates in memory)."""
    estimates = {name: est for name, est in report.estimates.items() if getattr(est, "values", None) is not None}
    n = report.num_datapoints or (next(iter(estimates.values())).num_datapoints if estimates else 0)
    for name, est in estimates.items():
        if est.num_datapoints != n:
            raise ValueError(f"estimate {name!r} has {est.num_datapoints} values for {n} datapoints")
    khat = [""] * n
    if report.khat is not None and report.khat_index is not None:
        for i, k in zip(report.khat_index.tolist(), report.khat.tolist()):
            khat[i] = repr(float(k))
    columns = ["index"]
    series = []
    for name, est in estimates.items():
        columns += [name, f"{name}_mc_stderr_per_datapoint"]
        series += [est.values.detach().cpu().double().tolist(),
                   est.mc_stderr_per_datapoint.detach().cpu().double().tolist()]
    columns.append("khat")
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    for i in range(n):  # repr: the shortest text that reads back as the same double
        writer.writerow([i, *(repr(float(s[i])) for s in series), khat[i]])
    return out.getvalue()


def read_per_datapoint(report_path) -> Dict[str, torch.Tensor]:
    """The per-datapoint columns of the report at ``report_path`` (its ``.json``), checked against
    the SHA-256 the report records: ``{"index": int64, name: float64, ..., "khat": float64 (NaN
    where not computed)}``."""
    import json

    from pvae.data.files import file_sha256

    report_path = Path(report_path)
    values = json.loads(report_path.read_text())
    record = values.get("per_datapoint")
    if not record:
        raise UsageError(f"{report_path} has no per-datapoint values (a report written before pvae 0.2's "
                         "per-datapoint files, or not by EvaluationReport.save): evaluate again to pair it")
    path = report_path.parent / record["file"]
    if not path.exists():
        raise UsageError(f"{path} is missing: {report_path.name} names it as its per-datapoint values")
    if file_sha256(path) != record["sha256"]:
        raise UsageError(f"{path} is not the file {report_path.name} was written with (SHA-256 differs); "
                         "evaluate again")
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    header, body = rows[0], rows[1:]
    columns = {}
    for j, name in enumerate(header):
        if name == "index":
            columns[name] = torch.tensor([int(r[j]) for r in body], dtype=torch.int64)
        else:
            columns[name] = torch.tensor([float(r[j]) if r[j] != "" else math.nan for r in body],
                                         dtype=torch.float64)
    return columns


@dataclass
class PairedDifference:
    """``a - b`` for one estimator, datapoint by datapoint (nats per datapoint).

    :ivar float mean_difference: mean of ``d_i = a_i - b_i``.
    :ivar float stderr: ``std(d) / sqrt(N)``: the paired standard error over datapoints (for two seeds
        of one model, an empirical Monte Carlo standard error of the difference).
    :ivar float mc_stderr_of_difference: ``hypot`` of the two reports' ``mc_stderr_of_mean``: the Monte
        Carlo error of the difference that the reports' own errors give (for ``L_K`` a delta-method
        error; for the ELBO a plain sample standard error).
    :ivar float z: ``mean_difference / stderr``.
    """

    estimator: str
    num_datapoints: int
    num_samples: Dict[str, int]
    seeds: Dict[str, Optional[int]]
    mean_a: float
    mean_b: float
    mean_difference: float
    stderr: float
    mc_stderr_of_difference: Optional[float]
    fraction_a_higher: float
    labels: Dict[str, str] = field(default_factory=dict)
    note: Optional[str] = None

    @property
    def z(self) -> Optional[float]:
        """``mean_difference / stderr``; None when every difference is 0 (the same draws)."""
        return self.mean_difference / self.stderr if self.stderr > 0 else None

    def to_dict(self) -> dict:
        return {"estimator": self.estimator, "num_datapoints": self.num_datapoints, "num_samples": self.num_samples,
                "seeds": self.seeds, "labels": self.labels, "mean_a": self.mean_a, "mean_b": self.mean_b,
                "mean_difference": self.mean_difference, "stderr": self.stderr,
                "mc_stderr_of_difference": self.mc_stderr_of_difference, "z": self.z,
                "fraction_a_higher": self.fraction_a_higher, "note": self.note}

    def summary(self) -> str:
        a, b = self.labels.get("a", "a"), self.labels.get("b", "b")
        def side(key, label, mean):
            return f"{key} = {label} (K={self.num_samples[key]}, seed {self.seeds[key]}: {mean:.3f})"

        lines = [f"{self.estimator} on the same {self.num_datapoints} datapoints: {side('a', a, self.mean_a)}, "
                 f"{side('b', b, self.mean_b)}",
                 f"  a - b = {self.mean_difference:+.4f} ± {self.stderr:.4f} nats (± paired std. error over "
                 f"datapoints), z = {'n/a' if self.z is None else format(self.z, '+.2f')}; "
                 f"a higher on {self.fraction_a_higher:.1%}"]
        if self.mc_stderr_of_difference is not None:
            lines.append(f"  the reports' Monte Carlo errors combined: ± {self.mc_stderr_of_difference:.4f} "
                         f"(paired / combined = {self.stderr / self.mc_stderr_of_difference:.2f}: for one model and two seeds, "
                         "how far the reports' own Monte Carlo errors hold)"
                         if self.mc_stderr_of_difference > 0 else "  the reports' Monte Carlo errors combined: 0")
        if self.note:
            lines.append(f"  note: {self.note}")
        return "\n".join(lines)


Report = Union[str, Path, "object"]


def _values_of(report, side: str):
    """(the report as a dict, a label) of a report path or an in-memory report."""
    import json

    if isinstance(report, (str, Path)):
        path = Path(report)
        if not path.exists():
            raise UsageError(f"report {side} ({path}) does not exist")
        try:
            values = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UsageError(f"report {side} ({path}) is not a report's JSON ({exc}); pass evaluation-....json, "
                             "not its .per-datapoint.csv") from None
        if not isinstance(values, dict) or "estimates" not in values:
            raise UsageError(f"report {side} ({path}) is JSON but not an evaluation report (no 'estimates')")
        return values, str(path)
    return report.to_dict(), report.run_dir or f"report {side}"


def _columns_of(report) -> Dict[str, torch.Tensor]:
    """The per-datapoint columns of a report path (from its file) or an in-memory report."""
    if isinstance(report, (str, Path)):
        return read_per_datapoint(report)
    columns = {"index": torch.arange(report.num_datapoints)}
    for name, est in report.estimates.items():
        columns[name] = est.values.detach().cpu().double()
        columns[f"{name}_mc_stderr_per_datapoint"] = est.mc_stderr_per_datapoint.detach().cpu().double()
    return columns


def paired_difference(a: Report, b: Report, estimator: str = "iwae") -> PairedDifference:
    """Compare two evaluations of the same datapoints, datapoint by datapoint (see the module's
    description): ``a`` and ``b`` are reports' ``.json`` paths (their per-datapoint files beside
    them) or :class:`~pvae.inference.evaluation.EvaluationReport` objects. Refused, naming the
    difference: other data (fingerprint, split or number of datapoints), an estimator missing from
    either, non-finite values."""
    (rep_a, label_a), (rep_b, label_b) = _values_of(a, "a"), _values_of(b, "b")
    for key, what in (("split", "split"), ("num_datapoints", "number of datapoints"), ("scored", "scored data")):
        if rep_a.get(key) != rep_b.get(key):
            raise UsageError(f"the reports evaluate other data: {what} {rep_a.get(key)!r} (a) vs {rep_b.get(key)!r} (b)")
    fa, fb = (rep_a.get("data") or {}).get("fingerprint"), (rep_b.get("data") or {}).get("fingerprint")
    if fa and fb and fa != fb:
        raise UsageError(f"the reports evaluate other data: data fingerprint {fa[:12]} (a) vs {fb[:12]} (b)")
    ha, hb = rep_a.get("evaluated_sha256"), rep_b.get("evaluated_sha256")
    if ha and hb and ha != hb:
        raise UsageError(f"the reports evaluate other datapoints, or the same in another order (SHA-256 of the "
                         f"evaluated values {ha[:12]} (a) vs {hb[:12]} (b))")
    cols_a, cols_b = _columns_of(a), _columns_of(b)
    for cols, side in ((cols_a, "a"), (cols_b, "b")):
        if estimator not in cols:
            have = ", ".join(k for k in cols if k not in ("index", "khat") and not k.endswith("_mc_stderr_per_datapoint"))
            raise UsageError(f"report {side} has no {estimator!r} estimate (it has: {have or 'none'})")
    if not torch.equal(cols_a["index"], cols_b["index"]):
        raise UsageError("the reports' per-datapoint rows are not the same datapoints (their index columns differ)")
    va, vb = cols_a[estimator], cols_b[estimator]
    bad = ~(torch.isfinite(va) & torch.isfinite(vb))
    if bad.any():
        where = bad.nonzero().flatten()[:5].tolist()
        raise UsageError(f"{int(bad.sum())} datapoint(s) have a non-finite {estimator} (row index {where}, "
                         "counting from 0): a paired mean is undefined")
    d = va - vb
    n = int(d.numel())
    if n < 2:
        raise UsageError(f"pairing needs at least 2 datapoints, not {n}")
    est_a, est_b = rep_a["estimates"][estimator], rep_b["estimates"][estimator]
    mc = (math.hypot(est_a["mc_stderr_of_mean"], est_b["mc_stderr_of_mean"])
          if est_a.get("mc_stderr_of_mean") is not None and est_b.get("mc_stderr_of_mean") is not None else None)
    note = None
    if bool((d == 0).all()):
        note = "every datapoint has the same value in both reports: the same model and the same draws (seed)"
    return PairedDifference(
        estimator=estimator, num_datapoints=n,
        num_samples={"a": est_a.get("num_samples"), "b": est_b.get("num_samples")},
        seeds={"a": rep_a.get("seed"), "b": rep_b.get("seed")},
        mean_a=float(va.mean()), mean_b=float(vb.mean()), mean_difference=float(d.mean()),
        stderr=float(d.std(unbiased=True) / math.sqrt(n)), mc_stderr_of_difference=mc,
        fraction_a_higher=float((d > 0).double().mean()), labels={"a": label_a, "b": label_b}, note=note)
