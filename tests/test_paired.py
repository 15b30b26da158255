"""Per-datapoint values of an evaluation and the paired comparison of two evaluations
(:mod:`pvae.inference.paired`, ``pvae compare``)."""

from __future__ import annotations

import json
import math

import pytest
import torch

import pvae
from pvae.cli import main as cli
from pvae.errors import UsageError
from pvae.inference.paired import PER_DATAPOINT_SUFFIX, paired_difference, read_per_datapoint


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A two-epoch run on the digits and two evaluations of its test split with other seeds."""
    run_dir = tmp_path_factory.mktemp("paired") / "run"
    config = pvae.RunConfig(dataset="digits", latent_dim=2, net={"hidden": (16,)}, training={"epochs": 2})
    pvae.train_run(config, run_dir, progress=False)
    reports = []
    for seed in (1, 2):
        report = pvae.evaluate_run(run_dir, num_samples=200, seed=seed, psis_datapoints=20, progress=False)
        path = run_dir / f"{report.stem}.json"
        keep = run_dir / f"seed{seed}.json"  # both reports have the same stem: keep each, with its values
        (run_dir / f"seed{seed}{PER_DATAPOINT_SUFFIX}").write_bytes(
            (run_dir / f"{report.stem}{PER_DATAPOINT_SUFFIX}").read_bytes())
        values = json.loads(path.read_text())
        values["per_datapoint"]["file"] = f"seed{seed}{PER_DATAPOINT_SUFFIX}"
        keep.write_text(json.dumps(values))
        reports.append((report, keep))
    return run_dir, reports


def test_a_saved_report_holds_every_datapoint_exactly_with_its_khat_and_hash(run):
    run_dir, [(report, path), _] = run
    columns = read_per_datapoint(path)
    n = report.num_datapoints
    assert torch.equal(columns["index"], torch.arange(n))
    for name, est in report.estimates.items():
        assert torch.equal(columns[name], est.values.double()), name
        assert torch.equal(columns[f"{name}_mc_stderr_per_datapoint"], est.mc_stderr_per_datapoint.double()), name
        assert float(columns[name].mean()) == json.loads(path.read_text())["estimates"][name]["mean"]
    khat = columns["khat"]
    assert int(torch.isfinite(khat).sum()) == 20 == report.khat.numel()
    # each k-hat on the row it was computed for: recomputed from those rows of the data, with the
    # draws _psis used (one batch, seed + 1000)
    rows = torch.isfinite(khat).nonzero().flatten()
    x = pvae.load_dataset("digits").test[rows]
    again = pvae.importance_diagnostics(pvae.load_run(run_dir).vae, x, report.num_samples, report.chunk_size,
                                        seed=report.seed + 1000)["khat"]
    assert torch.allclose(khat[rows], again.double(), atol=1e-6)


def test_two_seeds_differ_by_monte_carlo_noise_only(run):
    _, [(a, path_a), (b, path_b)] = run
    result = paired_difference(path_a, path_b, "iwae")
    d = a.estimates["iwae"].values.double() - b.estimates["iwae"].values.double()
    assert result.mean_difference == pytest.approx(float(d.mean()), abs=1e-12)
    assert result.stderr == pytest.approx(float(d.std() / math.sqrt(d.numel())), rel=1e-12)
    assert abs(result.z) < 4.5  # E[a - b] = 0: the same model, independent draws
    assert result.mc_stderr_of_difference == pytest.approx(
        math.hypot(a.estimates["iwae"].mc_stderr_of_mean, b.estimates["iwae"].mc_stderr_of_mean))
    assert paired_difference(a, b, "iwae").to_dict() | {"labels": None} == result.to_dict() | {"labels": None}


def test_the_paired_error_of_two_seeds_is_the_spread_of_their_difference_over_replicates():
    """Over R replicate pairs of evaluations (one model, independent seeds), the variance of the mean
    difference and the mean squared paired standard error estimate the same quantity; and for the
    ELBO, whose per-datapoint Monte Carlo error is a plain sample standard deviation, so does the
    reports' combined error. The variance over R pairs has relative s.d. sqrt(2/(R-1)) = 0.10 (R =
    200): the band is 4 of them; an error bar off by sqrt(2) (ratio 2 or 1/2) falls outside."""
    torch.manual_seed(0)
    config = pvae.RunConfig(dataset="digits", latent_dim=2, net={"hidden": (16,)})
    vae = pvae.build_vae(config, 64)
    x = pvae.load_dataset("digits").test[:30]
    replicates = 200
    rows = {"iwae": [], "elbo": []}
    for r in range(replicates):
        specs = [pvae.EvaluationSpec(estimators=("elbo", "iwae"), num_samples=20, seed=2 * r + s, psis_datapoints=0)
                 for s in (1, 2)]
        a, b = (pvae.evaluate(vae, x, spec) for spec in specs)
        for name in rows:
            p = paired_difference(a, b, name)
            rows[name].append((p.mean_difference, p.stderr ** 2, p.mc_stderr_of_difference ** 2))
    band = 4 * math.sqrt(2 / (replicates - 1))
    for name, values in rows.items():
        means, paired_var, delta_var = (torch.tensor(v, dtype=torch.float64) for v in zip(*values))
        ratio = float(means.pow(2).mean() / paired_var.mean())  # E[mean difference] = 0
        assert abs(ratio - 1) < band, (name, ratio)
    _, paired_var, delta_var = (torch.tensor(v, dtype=torch.float64) for v in zip(*rows["elbo"]))
    assert abs(float(paired_var.mean() / delta_var.mean()) - 1) < 0.1


def test_reports_of_other_data_a_missing_estimator_and_a_changed_file_are_refused(run, tmp_path):
    run_dir, [(a, path_a), (b, path_b)] = run
    fewer = pvae.evaluate_run(run_dir, num_samples=5, seed=3, progress=False, write=False)
    other = pvae.evaluate(pvae.load_run(run_dir).vae, pvae.load_dataset("digits").test[:40],
                          pvae.EvaluationSpec(num_samples=5, psis_datapoints=0))
    other.split, other.data = a.split, a.data
    with pytest.raises(UsageError, match="number of datapoints"):
        paired_difference(a, other)
    with pytest.raises(UsageError, match="no 'ais' estimate .*elbo, iwae"):
        paired_difference(path_a, fewer, "ais")
    changed = tmp_path / "a.json"
    values = json.loads(path_a.read_text())
    csv = (run_dir / values["per_datapoint"]["file"]).read_text()
    (tmp_path / values["per_datapoint"]["file"]).write_text(csv.replace("\n1,", "\n1,-1", 1))
    changed.write_text(json.dumps(values))
    with pytest.raises(UsageError, match="SHA-256 differs"):
        paired_difference(changed, path_b)
    values.pop("per_datapoint")
    changed.write_text(json.dumps(values))
    with pytest.raises(UsageError, match="no per-datapoint values"):
        paired_difference(changed, path_b)


def test_pvae_compare_prints_the_paired_difference_and_refuses_other_data(run, capsys, tmp_path):
    _, [(_, path_a), (_, path_b)] = run
    assert cli(["compare", str(path_a), str(path_b), "--estimator", "elbo", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["estimator"] == "elbo" and out["seeds"] == {"a": 1, "b": 2} and math.isfinite(out["z"])
    assert cli(["compare", str(path_a), str(path_b)]) == 0
    assert "paired std. error over datapoints" in capsys.readouterr().out
    values = json.loads(path_b.read_text())
    values["split"] = "valid"
    (tmp_path / "b.json").write_text(json.dumps(values))
    assert cli(["compare", str(path_a), str(tmp_path / "b.json")]) == 2
    assert "split 'test' (a) vs 'valid' (b)" in capsys.readouterr().err
