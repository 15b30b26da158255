"""Every notebook, experiment, benchmark and CLI command runs here at smoke size.

The meta-test fails when a new one appears without a smoke entry below.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import MNIST_AVAILABLE

ROOT = Path(__file__).resolve().parents[1]

# A smoke run measures nothing: scripts that set their own thread count (default 2) get one, as the
# rest of the suite does (conftest.py); with two, a loaded machine made bench_hierarchy --quick
# take 28-42 s instead of 4.
ONE_THREAD = ["--threads", "1"]

# script -> smoke-size arguments ({tmp} is a temporary folder)
SCRIPTS = {
    "experiments/aevb_binarized_mnist.py": [
        "--epochs", "1", "--K", "3", "--K-elbo", "2", "--test-limit", "50", "--seeds", "0,1", "--train-limit", "2000",
        "--out-dir", "{tmp}/out", "--summary", "{tmp}/summary.json", *ONE_THREAD,
    ],
    "benchmarks/bench_train_step.py": ["--blocks", "2", "--steps-per-block", "2", "--out", "{tmp}/bench.json", *ONE_THREAD],
    "benchmarks/bench_iwae.py": [
        "--run-dir", "{tmp}/none", "--K", "7", "--images", "30", "--block", "10", "--ais-images", "4",
        "--ais-chains", "2", "--ais-steps", "3", "--ais-leapfrog", "2", "--out", "{tmp}/bench.json", *ONE_THREAD,
    ],
    "experiments/pretrained_evaluate.py": [
        "standard-binarized-mnist", "--num-samples", "3", "--psis-datapoints", "0", "--cache", "{tmp}/cache",
        "--out", "{tmp}/check.json",
    ],
    "experiments/paired_seeds.py": [
        "--models", "standard-binarized-mnist,iaf-binarized-mnist", "--images", "4", "--num-samples", "3",
        "--batch-size", "2", "--out", "{tmp}/paired.json",
    ],
    "experiments/export_pretrained.py": ["--smoke", "{tmp}", "--smoke-float16", "--num-samples", "5", "--models-dir",
                                         "{tmp}/models"],
    "benchmarks/repeat_timings.py": [
        "train-step", "--repeats", "2", "--max-load", "1000", "--out-dir", "{tmp}", "--",
        "--blocks", "2", "--steps-per-block", "2", *ONE_THREAD,
    ],
    "benchmarks/gpu_suite.py": ["--smoke", "--device", "cpu", "--out", "{tmp}/gpu_suite.json"],
    "benchmarks/bench_hierarchy.py": ["--quick", "--out", "{tmp}/bench.json", *ONE_THREAD],
    "benchmarks/bench_denormal.py": ["--repeats", "1", "--warmup-steps", "2", "--steps", "1", "--threads", "1",
                                     "--out", "{tmp}/denormal.json"],
    "paper/build.py": ["--pdf", "--out", "{tmp}/tables.md"],  # the PDF build too (checked below)
    "experiments/inference_gaps_mnist.py": [
        "--run-dir", "{tmp}/run", "--train-missing", "digits", "--images", "3", "--K", "5", "--refine-steps", "2", "--particles", "2",
        "--summary", "{tmp}/summary.json", *ONE_THREAD,
    ],
    "experiments/objectives_mnist.py": [
        "--dataset", "digits", "--latent-dim", "2", "--hidden", "16", "--epochs", "1", "--K", "3",
        "--runs", "elbo,iwae-5-dreg,warmup-5,mmd-vae", "--out-dir", "{tmp}/out", "--summary", "{tmp}/summary.json",
    ],
    "experiments/reproduce.py": [
        "vae-standard-analytic", "--root", "{tmp}/reproduce", "--max-time", "1", "--no-evaluate",
        "--out", "{tmp}/reproduce.json",
    ],
    "experiments/ais_subset.py": [
        "{tmp}/run", "--train-missing", "digits", "--images", "6", "--chains", "2", "--steps", "3",
        "--num-samples", "5", "--batch-size", "4", "--out", "{tmp}/ais.json",
    ],
    "experiments/families_digits.py": [
        "--runs", "hvae,m2-100,mixture-relaxed", "--epochs", "1", "--K", "3", "--ais-steps", "2", "--ais-chains", "2",
        "--hidden", "16", "--out-dir", "{tmp}/out", "--summary", "{tmp}/families.json", *ONE_THREAD,
    ],
    "experiments/bounds_subset.py": [
        "{tmp}/run", "--train-missing", "digits", "--images", "6", "--num-samples", "10", "--ks", "1,5,10",
        "--batch-size", "4", "--out", "{tmp}/bounds.json",
    ],
    "benchmarks/bench_distributed.py": ["--smoke", "--out", "{tmp}/distributed.json"],
    "experiments/components_grid.py": [
        "--dataset", "digits", "--priors", "standard-normal,vamp", "--guides", "diagonal,planar",
        "--epochs", "1", "--latent-dim", "2", "--hidden", "16", "--extra", "--lr 0.002",
        "--out-dir", "{tmp}/grid", "--summary", "{tmp}/grid.json",
    ],
}
NEEDS_MNIST = {"experiments/aevb_binarized_mnist.py", "experiments/pretrained_evaluate.py", "experiments/paired_seeds.py",
               "benchmarks/bench_denormal.py"}
NOTEBOOK_ENV = {"PVAE_NOTEBOOK_EPOCHS": "2", "PVAE_NOTEBOOK_K": "10", "PVAE_NOTEBOOK_AIS_STEPS": "3",
                "PVAE_NOTEBOOK_TRAIN_IMAGES": "1000"}
HELPERS = {"benchmarks/handwritten_vae.py", "benchmarks/_provenance.py"}  # imported by scripts, not run on their own


def discovered_scripts():
    found = set()
    for pattern in ("experiments/*.py", "benchmarks/*.py", "paper/*.py"):
        found |= {str(p.relative_to(ROOT)) for p in ROOT.glob(pattern)}
    return found - HELPERS


def notebooks():
    return sorted(ROOT.glob("notebooks/*.ipynb"))


def test_every_script_has_a_smoke_run():
    assert discovered_scripts() == set(SCRIPTS), "add the new script to SCRIPTS with smoke arguments"


def test_every_cli_command_is_tested():
    from pvae.cli import _parser

    commands = next(a for a in _parser()._actions if a.dest == "command").choices
    cli_tests = (ROOT / "tests" / "test_cli.py").read_text()
    for command in commands:
        assert f'main(["{command}"' in cli_tests, f"pvae {command} has no CLI test"


_SMOKE_RUNS = {}  # script -> (its process, its folder): tests that read a smoke run's results share it


def smoke_run(script, tmp_path_factory):
    """Run ``script`` with its smoke arguments in a fresh folder (the working directory and
    {tmp}), once per session: the smoke test and a test that checks the results share the run."""
    if script not in _SMOKE_RUNS:
        folder = tmp_path_factory.mktemp(Path(script).stem)
        args = [a.format(tmp=folder) for a in SCRIPTS[script]]
        proc = subprocess.run([sys.executable, str(ROOT / script), *args], cwd=folder, capture_output=True,
                              text=True, timeout=600)
        _SMOKE_RUNS[script] = proc, folder
    return _SMOKE_RUNS[script]


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_script_runs_at_smoke_size(script, tmp_path_factory):
    """Each script runs at its smoke size, exits 0 and writes result files (JSON ones parse)."""
    if script in NEEDS_MNIST and not MNIST_AVAILABLE:
        pytest.skip("needs binarized MNIST in the data cache")
    proc, folder = smoke_run(script, tmp_path_factory)
    assert proc.returncode == 0, proc.stderr[-3000:]
    outputs = [p for p in folder.rglob("*") if p.is_file()]
    assert outputs, "the script wrote no result file"
    for path in outputs:
        if path.suffix == ".json":
            json.loads(path.read_text())


@pytest.mark.parametrize("notebook", notebooks(), ids=lambda p: p.name)
def test_committed_notebook_is_executed_and_current(notebook):
    """A reader sees every notebook executed at full size: each code cell ran, and the code has not
    changed since (the SHA-256 of the code cells that notebooks/execute.py recorded)."""
    nbformat = pytest.importorskip("nbformat")
    sys.path.insert(0, str(ROOT / "notebooks"))
    from execute import source_sha256

    nb = nbformat.read(notebook, as_version=4)
    unexecuted = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and c.get("execution_count") is None]
    assert not unexecuted, f"cells {unexecuted} have no outputs: run python notebooks/execute.py {notebook.name}"
    recorded = nb.metadata.get("pvae", {}).get("source_sha256")
    assert recorded == source_sha256(nb), (f"{notebook.name} changed since it was executed (stale outputs): "
                                           f"run python notebooks/execute.py {notebook.name}")
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors


@pytest.mark.parametrize("notebook", notebooks(), ids=lambda p: p.name)
def test_notebook_runs_at_smoke_size(notebook, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    for key, value in NOTEBOOK_ENV.items():
        monkeypatch.setenv(key, value)
    nb = nbformat.read(notebook, as_version=4)
    if not MNIST_AVAILABLE and any('"binarized-mnist"' in c.source for c in nb.cells if c.cell_type == "code"):
        pytest.skip("the notebook reads binarized MNIST, which is not in the data cache")  # as NEEDS_MNIST scripts
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors


def test_grouped_bounds_are_the_bounds_of_disjoint_groups():
    """experiments/bounds_subset.py: L_K from S draws cut into S/K groups is the mean of the groups'
    L_K; K = S is log-mean-exp of all draws, K = 1 the ELBO; the error of a mean over groups is the
    groups' spread / sqrt(groups)."""
    sys.path.insert(0, str(ROOT / "experiments"))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import torch
    from bounds_subset import grouped_bounds

    lw = torch.randn(12, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 5
    out = grouped_bounds(lw, [1, 4, 12])
    torch.testing.assert_close(out[12]["values"], torch.logsumexp(lw, 0) - torch.log(torch.tensor(12.0, dtype=lw.dtype)))
    torch.testing.assert_close(out[1]["values"], lw.mean(0))
    torch.testing.assert_close(out["elbo"]["values"], lw.mean(0))
    groups = torch.stack([torch.logsumexp(lw[i:i + 4], 0) - torch.log(torch.tensor(4.0, dtype=lw.dtype))
                          for i in (0, 4, 8)])
    torch.testing.assert_close(out[4]["values"], groups.mean(0))
    torch.testing.assert_close(out[4]["mc_var"], groups.var(0) / 3)


def _paper_build():
    """paper/build.py as a module (it is a script, not part of the package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("paper_build", ROOT / "paper" / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    return build


def _pretrained_evaluate():
    """experiments/pretrained_evaluate.py as a module (a script, not part of the package)."""
    sys.path.insert(0, str(ROOT / "experiments"))
    import pretrained_evaluate

    return pretrained_evaluate


def test_the_paper_builds_to_a_pdf_with_its_figures(tmp_path_factory):
    """`paper/build.py --pdf`: pandoc writes Typst and the typst package compiles it (both are
    test dependencies, so the PDF build runs in CI). The committed result files give at least
    ten pages and four figures; a missing figure or a Typst syntax pandoc emits that this typst
    does not know fails the compile, which fails here. The same files build the same bytes.
    (The build is the script's smoke run, shared with test_script_runs_at_smoke_size.)"""
    import re

    assert SCRIPTS["paper/build.py"][:1] == ["--pdf"]
    proc, tmp_path = smoke_run("paper/build.py", tmp_path_factory)
    assert proc.returncode == 0, proc.stderr[-2000:]
    pdf = (tmp_path / "paper.pdf").read_bytes()
    assert pdf.startswith(b"%PDF-")
    assert len(re.findall(rb"/Type /Page(?!s)", pdf)) >= 10
    figures = sorted(p.name for p in tmp_path.glob("fig*.png"))
    assert len(figures) == 4, figures
    assert pdf.count(b"/Subtype /Image") >= len(figures)
    assert not (tmp_path / "paper.typ").exists()  # the Typst source is kept only when it fails
    build = _paper_build()
    assert build.build_pdf(tmp_path / "paper.md").read_bytes() == pdf  # no creation date in it


def test_every_number_in_the_papers_prose_is_filled_from_a_committed_result_file(tmp_path_factory):
    """The prose quotes results as placeholders that paper/build.py fills from the result files:
    the committed files fill every one (none left marked), the filled text carries no braces, and
    a placeholder naming a missing key, a missing file or anything but arithmetic is left marked
    and reported, never evaluated."""
    proc, tmp_path = smoke_run("paper/build.py", tmp_path_factory)
    assert "unfilled number" not in proc.stderr, proc.stderr[-2000:]
    paper = (tmp_path / "paper.md").read_text()
    assert "{{" not in paper and "[no value:" not in paper
    build = _paper_build()
    folders = (ROOT / "experiments" / "results", ROOT / "benchmarks" / "results")
    text, missing = build.fill_numbers("{{ -reproduce:runs.vae-vamp.test_iwae.mean | .1f }}", folders)
    assert not missing and float(text) > 80
    for bad in ("{{ reproduce:runs.no-such-run.test_iwae.mean }}", "{{ no_such_file:x }}",
                "{{ __import__('os') }}", "{{ reproduce:provenance.git_commit }}"):
        text, missing = build.fill_numbers(bad, folders)
        assert text.startswith("**[no value:") and len(missing) == 1, (bad, text)


def test_the_converged_table_names_runs_whose_bounds_were_computed_on_a_gpu():
    """Table 9's caption says its test bounds are the CPU's; a report that records another device
    (CUDA draws other numbers from the same seed) must be named there."""
    build = _paper_build()
    estimate = {"mean": -87.0, "stderr": 0.2}
    run = {"status": "finished (early stopping)", "epochs_run": 10, "best_epoch": 5, "test_elbo": estimate,
           "test_iwae": estimate, "published_nll": None, "devices": ["cpu"]}
    summary = {"provenance": {"git_commit": "0" * 40}, "runs": {
        "on-cpu": {**run, "evaluated_with": {"device": "cpu"}},
        "unrecorded": run,
        "on-gpu": {**run, "devices": ["cuda"], "evaluated_with": {"device": "cuda", "cuda_device": "H100"}}}}
    table = build.converged_table(summary)
    assert "(test bounds computed on the CPU, on-gpu's on cuda; recorded in the reports of on-cpu, on-gpu; " in table
    del summary["runs"]["on-gpu"]
    assert "(test bounds computed on the CPU; recorded in the reports of on-cpu; " in build.converged_table(summary)
    del summary["runs"]["unrecorded"]
    assert "(test bounds computed on the CPU; as every report records)" in build.converged_table(summary)


def test_export_refuses_a_run_any_sitting_of_which_was_trained_from_an_uncommitted_tree(tmp_path):
    """A resumed run records each earlier sitting's commit; the weights are traceable only if every
    sitting ran committed code, so one dirty sitting is refused, as is a dirty last one."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("export_pretrained", ROOT / "experiments" / "export_pretrained.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    run_dir = tmp_path / "vae-vamp"
    run_dir.mkdir()
    clean = "a" * 40
    for env, bad in (({"git_commit": clean, "earlier_sittings": [{"git_commit": clean}, {"git_commit": clean + "-dirty"}]},
                      "sitting 2 of 3"),
                     ({"git_commit": clean + "-dirty", "earlier_sittings": [{"git_commit": clean}]}, "sitting 2 of 2"),
                     ({"earlier_sittings": []}, "sitting 1 of 1")):
        (run_dir / "env.json").write_text(json.dumps(env))
        with pytest.raises(SystemExit, match=bad):
            script.export_one("vamp-binarized-mnist", tmp_path, 5000, tmp_path / "models")
    # every sitting committed: it gets past the check (and stops at the missing evaluation report)
    (run_dir / "env.json").write_text(json.dumps({"git_commit": clean, "earlier_sittings": [{"git_commit": clean}]}))
    with pytest.raises(SystemExit, match="evaluation-test-K5000"):
        script.export_one("vamp-binarized-mnist", tmp_path, 5000, tmp_path / "models")
    assert not (tmp_path / "models").exists()


def test_the_converged_table_names_every_sitting_of_a_resumed_run():
    build = _paper_build()
    estimate = {"mean": -85.0, "stderr": 0.2}
    sittings = [{"git_commit": "1" * 40}, {"git_commit": "2" * 40 + "-dirty"}]
    run = {"status": "finished (early stopping)", "epochs_run": 10, "best_epoch": 5, "test_elbo": estimate,
           "test_iwae": estimate, "published_nll": None, "devices": ["cpu"], "checkpoint_sha256": "c" * 64,
           "trained_with": {"git_commit": "3" * 40, "earlier_sittings": sittings}}
    summary = {"provenance": {"git_commit": "0" * 40}, "runs": {"resumed": run}}
    assert "3 sittings at commits 111111111111, 222222222222-dirty, 333333333333, SHA-256 cccccccccccc" in \
        build.converged_table(summary)
    summary["runs"]["resumed"] = {**run, "status": "in progress"}
    assert "3 sittings at commits 111111111111, 222222222222-dirty, 333333333333; in progress" in \
        build.converged_table(summary)


def test_table_10_reports_an_ais_file_on_another_checkpoint_in_its_caption_not_its_columns():
    build = _paper_build()
    subset = {"images": 2, "seed": 0, "how": "two images"}
    bound = {"mean": -85.0, "stderr": 0.5}
    bounds = {"subset": subset, "run_dir": "results/reproduce/vae-vamp", "checkpoint_sha256": "a" * 64,
              "num_samples": 10, "bounds": {"1": bound, "10": bound}, "elbo": bound, "khat": [0.5, 0.8],
              "provenance": {"git_commit": "4" * 40}}
    ais = {"subset": subset, "run_dir": "results/reproduce/vae-vamp", "provenance": {"git_commit": "5" * 40},
           "ais": {"mean": -84.0, "chains": 8, "intermediate_distributions": 200},
           "ais_minus_iwae": {"mean": 0.6, "stderr_over_images": 0.04, "fraction_of_images_where_ais_is_higher": 0.74}}
    table = build.subset_table([("vae-vamp", bounds, ais)], {"runs": {}})
    assert ("vae-vamp: its AIS file (commit 555555555555) was computed on an earlier checkpoint (the file predates "
            "checkpoint hashes)") in table
    assert "AIS − L_K = +0.60 ± 0.04, AIS higher on 74% of the images" in table
    row = next(line for line in table.splitlines() if line.startswith("| vae-vamp"))
    assert "| — | — | — |" in row and "-84.00" not in row
    paired = build.subset_table([("vae-vamp", bounds, {**ais, "checkpoint_sha256": "a" * 64,
                                                         "iwae_L10": bound})], {"runs": {}})
    assert "its AIS file" not in paired and "-84.00" in paired


def test_an_ais_result_on_another_checkpoint_is_not_paired_with_the_bounds_of_a_rerun():
    """A rerun writes a new checkpoint into the same run directory: Table 10 and Figure 2 pair AIS
    with the bounds only when both files name the same checkpoint (or both predate the hashes)."""
    build = _paper_build()
    subset = {"images": 1000, "seed": 0}
    bounds = {"subset": subset, "run_dir": "results/reproduce/vae-vamp", "checkpoint_sha256": "a" * 64}
    assert build.same_images(bounds, dict(bounds))
    assert not build.same_images(bounds, {**bounds, "checkpoint_sha256": "b" * 64})
    assert not build.same_images(bounds, {k: v for k, v in bounds.items() if k != "checkpoint_sha256"})
    assert not build.same_images(bounds, {**bounds, "subset": {**subset, "seed": 1}})
    legacy = {"subset": subset, "run_dir": "results/reproduce/vae-vamp"}
    assert build.same_images(legacy, dict(legacy))


def test_hierarchy_benchmark_sides_agree_at_smoke_size(tmp_path_factory):
    """benchmarks/bench_hierarchy.py --quick: the user's Pyro pair (pvae's trace path) and the
    hand-written PyTorch model give the same loss and gradient (float64) and the same per-image
    ELBO and L_K (float32) on the same noise; the result carries both ratios, the issue's targets
    and the provenance, and a smoke run gives no verdict. (The script's smoke run, shared with
    test_script_runs_at_smoke_size.)"""
    assert SCRIPTS["benchmarks/bench_hierarchy.py"] == ["--quick", "--out", "{tmp}/bench.json", *ONE_THREAD]
    proc, folder = smoke_run("benchmarks/bench_hierarchy.py", tmp_path_factory)
    out = folder / "bench.json"
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    step, bounds = result["checks"]["step"], result["checks"]["bounds"]
    assert step["pass"] and step["grad_max_rel_diff"] <= step["grad_tolerance_rel"]
    assert bounds["pass"] and bounds["L_50_max_abs_diff"] <= bounds["tolerance_nats"]
    assert result["checks_pass"]
    assert result["smoke_run"] and result["verdict"] is None  # toy sizes are not evidence
    assert set(result["median_step_ms"]) == {"pvae-user-pair", "handwritten", "pyro-trace-elbo"}
    assert {"step_pvae/handwritten", "L_50_pvae/handwritten"} <= set(result["ratios"])
    assert len(result["L_50_seconds"]["handwritten"]["values"]) >= 3
    assert result["targets"] == {"step_ratio_max": 1.15, "L_5000_ratio_max": 1.15}
    for key in ("provenance_start", "provenance_end"):
        assert result[key]["git_commit"] and "load_average_1_5_15" in result[key]


def test_a_pretrained_reevaluation_is_paired_image_by_image_with_a_reference_that_has_per_datapoint_values(tmp_path):
    """pretrained_evaluate.py pairs the new report with the bundled reference image by image when both
    carry per-datapoint values (models bundled from now on), and says None for the older bundles."""
    import shutil

    import pvae

    paired_with_reference = _pretrained_evaluate().paired_with_reference
    config = pvae.RunConfig(dataset="digits", latent_dim=2, net={"hidden": (16,)}, training={"epochs": 1})
    run = tmp_path / "run"
    pvae.train_run(config, run, progress=False)
    paths = []
    for seed in (0, 1):
        report = pvae.evaluate_run(run, num_samples=10, seed=seed, psis_datapoints=0, progress=False)
        folder = tmp_path / f"seed{seed}"
        folder.mkdir()
        for suffix in (".json", ".per-datapoint.csv"):
            shutil.copy(run / f"{report.stem}{suffix}", folder / f"{report.stem}{suffix}")
        paths.append(folder / f"{report.stem}.json")
    reference, new = paths  # the bundle's report is seed 0's
    result = paired_with_reference(new, reference)
    assert set(result) == {"elbo", "iwae"}
    for name, entry in result.items():
        assert entry["seeds"] == {"a": 1, "b": 0} and entry["num_datapoints"] == 300
        assert entry["within_mc_error"] == (abs(entry["z"]) < 3)
    old = json.loads(reference.read_text())
    old.pop("per_datapoint")
    reference.write_text(json.dumps(old))
    assert paired_with_reference(new, reference) is None


def test_a_pretrained_reevaluation_is_within_monte_carlo_error_only_when_z_says_so():
    """experiments/pretrained_evaluate.py: the difference of two independent estimates is judged by
    its Monte Carlo standard error sqrt(mc_1^2 + mc_2^2) (not by one report's, not by the spread
    over images), and estimates of other sample counts are not compared at all."""
    compare = _pretrained_evaluate().compare

    def est(mean, mc, k=5000):
        return {"mean": mean, "mc_stderr_of_mean": mc, "stderr": 0.23, "num_datapoints": 10000, "num_samples": k}

    reference = {"iwae": est(-85.200, 0.003)}
    near = compare({"iwae": est(-85.210, 0.004)}, reference)["iwae"]
    assert near["mc_stderr_of_difference"] == pytest.approx(0.005)
    assert near["z"] == pytest.approx(-2.0) and near["within_mc_error"]
    far = compare({"iwae": est(-85.220, 0.004)}, reference)["iwae"]
    assert far["z"] == pytest.approx(-4.0) and not far["within_mc_error"]  # 0.02 < 0.23 over images: still out
    other = compare({"iwae": est(-85.200, 0.004, k=1000)}, reference)["iwae"]
    assert other["comparable"] is False and "num_samples" in other["why"]


def test_the_paper_lists_a_pretrained_reevaluation_and_flags_what_makes_it_no_check(tmp_path):
    build = _paper_build()
    path = tmp_path / "pretrained_evaluate-vamp-binarized-mnist.json"
    check = {"model": "vamp-binarized-mnist", "seed": 1, "reference_seed": 0, "checkpoint_sha256": "b" * 64,
             "provenance": {"git_commit": "6" * 40}, "cache_was_empty": True,
             "comparison": {"iwae": {"comparable": True, "new": -85.2071, "reference": -85.2046, "difference": -0.0025,
                                     "mc_stderr_of_difference": 0.005, "z": -0.5, "within_mc_error": True},
                            "elbo": {"comparable": True, "z": 1.25}},
             "table9": {"run": "vae-vamp", "found": True,
                        "same_as_manifest": {"checkpoint_sha256": True, "elbo": True, "iwae": True}}}

    def row(**changes):
        path.write_text(json.dumps({**check, **changes}))
        return next(line for line in build.pretrained_check_text(tmp_path).splitlines() if line.startswith("| `vamp"))

    assert row() == ("| `vamp-binarized-mnist` | vae-vamp | 1 | -85.207 | -85.205 (0) | -0.0025 ± 0.0050 | -0.50 | "
                     "+1.25 | bbbbbbbbbbbb | 666666666666 |")
    moved = {**check["table9"], "same_as_manifest": {"checkpoint_sha256": True, "elbo": True, "iwae": False}}
    assert "| vae-vamp (not the manifest report!) |" in row(table9=moved)  # Table 9 moved on
    assert "| vae-vamp (no Table 9 row!) |" in row(table9={"run": "vae-vamp", "found": False})
    assert "| — (no Table 9 row!) |" in row(table9={"run": None, "found": False})
    assert "| 1 (cache not empty; resumed, 2 sittings) |" in row(cache_was_empty=False, resumed=True,
                                                                sittings=[{}, {}])
    assert "| 0 (same seed as the manifest!) |" in row(seed=0)
    path.write_text(json.dumps({**check, "comparison": {"iwae": {"comparable": False, "new": -90.0, "reference": -85.2,
                                                                  "why": "num_samples"}}}))
    assert build.pretrained_check_text(tmp_path) == ""  # a smoke-size run is not shown as a check


def test_a_pretrained_reevaluation_is_compared_with_its_table_9_row_only_when_that_row_is_the_manifests(tmp_path):
    table9_row = _pretrained_evaluate().table9_row
    manifest = {"reproduces": "vae-vamp", "checkpoint_sha256": "c" * 64,
                "evaluation": {"estimates": {"elbo": {"mean": -90.355}, "iwae": {"mean": -85.2046}}}}
    runs = {"vae-vamp": {"checkpoint_sha256": "c" * 64, "test_elbo": {"mean": -90.355}, "test_iwae": {"mean": -85.2046}}}
    results = tmp_path / "reproduce.json"
    results.write_text(json.dumps({"runs": runs}))
    same = table9_row(manifest, results)
    assert same["found"] and all(same["same_as_manifest"].values())
    runs["vae-vamp"]["test_iwae"]["mean"] = -85.1  # a rerun replaced the row
    results.write_text(json.dumps({"runs": runs}))
    assert table9_row(manifest, results)["same_as_manifest"] == {"checkpoint_sha256": True, "elbo": True, "iwae": False}
    runs["vae-vamp"]["checkpoint_sha256"] = "d" * 64
    results.write_text(json.dumps({"runs": runs}))
    assert not table9_row(manifest, results)["same_as_manifest"]["checkpoint_sha256"]
    assert not table9_row({**manifest, "reproduces": "vae-other"}, results)["found"]
    assert not table9_row(manifest, tmp_path / "absent.json")["found"]


def test_a_pretrained_reevaluation_refuses_a_report_of_other_settings_or_code():
    check_report = _pretrained_evaluate().check_report
    report = {"seed": 1, "num_samples": 5000, "split": "test", "spec": {"psis_datapoints": 500},
              "environment": {"git_commit": "a" * 40}}
    asked = {"seed": 1, "num_samples": 5000, "psis_datapoints": 500, "commit": "a" * 40}
    check_report(report, **asked)
    for key, value in (("seed", 0), ("num_samples", 1000), ("psis_datapoints", 0), ("commit", "b" * 40)):
        with pytest.raises(SystemExit, match="not the one asked for"):
            check_report(report, **{**asked, key: value})
    with pytest.raises(SystemExit, match="split 'valid'"):
        check_report({**report, "split": "valid"}, **asked)


def test_a_resumed_pretrained_reevaluation_lists_every_sitting_and_a_fresh_one_starts_afresh(tmp_path):
    record_sitting = _pretrained_evaluate().record_sitting
    stem = "evaluation-test-K5000"
    assert record_sitting(tmp_path, "m", stem, {"git_commit": "1"}) == [{"git_commit": "1"}]
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / f"{stem}.iwae.partial.pt").write_bytes(b"")  # the first sitting was killed
    assert record_sitting(tmp_path, "m", stem, {"git_commit": "2"}) == [{"git_commit": "1"}, {"git_commit": "2"}]
    (tmp_path / "m" / f"{stem}.iwae.partial.pt").unlink()  # finished, then evaluated again
    assert record_sitting(tmp_path, "m", stem, {"git_commit": "3"}) == [{"git_commit": "3"}]
    (tmp_path / "m.pretrained_evaluate-sittings.json").unlink()  # partial files from before any record
    (tmp_path / "m" / f"{stem}.elbo.partial.pt").write_bytes(b"")
    assert record_sitting(tmp_path, "m", stem, {"git_commit": "4"})[0]["git_commit"] == "not recorded"


def test_a_pretrained_reevaluation_refuses_the_manifests_seed(monkeypatch, capsys, tmp_path):
    """The manifest's seed would redraw the manifest's samples: z = 0 that checks nothing."""
    main = _pretrained_evaluate().main
    monkeypatch.setattr(sys, "argv", ["pretrained_evaluate.py", "standard-binarized-mnist", "--seed", "0",
                                      "--num-samples", "2", "--psis-datapoints", "0",  # (broken: fails in seconds)
                                      "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "out.json")])
    with pytest.raises(SystemExit):
        main()
    assert "is the seed of the manifest's report" in capsys.readouterr().err
    assert not (tmp_path / "out.json").exists() and not (tmp_path / "cache").exists()


def test_a_negative_result_value_raised_to_a_power_in_the_prose_is_squared_not_negated(tmp_path):
    """{{ f:z ** 2 }} with z = -2 is 4: a value pasted in as -2.0 ** 2 would be -4 (the precedence
    of ** over unary minus), and a root mean square over signed z values came out too small."""
    build = _paper_build()
    (tmp_path / "f.json").write_text(json.dumps({"z": -2.0, "w": 3.0}))
    text, missing = build.fill_numbers("{{ ((f:z ** 2 + f:w ** 2) / 2) ** 0.5 | .3f }} {{ -f:z | .1f }}", [tmp_path])
    assert not missing and text == f"{(13 / 2) ** 0.5:.3f} 2.0"


def test_export_refuses_float16_weights_that_move_the_bounds_beyond_their_monte_carlo_error(tmp_path, monkeypatch):
    """export_pretrained.py stores a model at float16 only where rounding moves the ELBO and L_K by less
    than their Monte Carlo error: rounding that moves them more (here simulated by coarse rounding) is
    refused, and the measured shifts are recorded otherwise."""
    import pvae

    sys.path.insert(0, str(ROOT / "experiments"))
    import export_pretrained

    config = pvae.RunConfig(dataset="digits", latent_dim=2, net={"hidden": (16,)}, training={"epochs": 1})
    pvae.train_run(config, tmp_path / "run", progress=False)
    report = pvae.evaluate_run(tmp_path / "run", num_samples=20, psis_datapoints=0, progress=False)
    report_path = tmp_path / "run" / f"{report.stem}.json"
    monkeypatch.setitem(export_pretrained.SUBSET, "num_samples", 20)
    check = export_pretrained.float16_check(tmp_path / "run", report_path)
    for name in ("elbo", "iwae"):  # judged against the bundled report's error, not the subset's
        assert check[name]["bundled_mc_stderr_of_mean"] == report.estimates[name].mc_stderr_of_mean
        assert abs(check[name]["shift"]) + 2 * check[name]["shift_stderr"] < check[name]["bundled_mc_stderr_of_mean"]
        assert math.isclose(check[name]["float16"], check[name]["float32"] + check[name]["shift"], abs_tol=1e-9)

    def coarse(run):  # one decimal digit instead of float16's three
        run.vae.load_state_dict({k: (v * 10).round() / 10 if v.is_floating_point() else v
                                 for k, v in run.vae.state_dict().items()})
        return run

    monkeypatch.setattr(export_pretrained, "half_precision", coarse)
    with pytest.raises(SystemExit, match="not clearly less than the Monte Carlo error .* of the bundled report"):
        export_pretrained.float16_check(tmp_path / "run", report_path)
    # a report with a smaller Monte Carlo error (more images) than the shift: refused although the
    # subset's own error would have let it pass
    monkeypatch.setattr(export_pretrained, "half_precision", lambda run: run)
    values = json.loads(report_path.read_text())
    for name in ("elbo", "iwae"):
        values["estimates"][name]["mc_stderr_of_mean"] = 0.0
    (tmp_path / "tight.json").write_text(json.dumps(values))
    with pytest.raises(SystemExit, match="keep float32"):
        export_pretrained.float16_check(tmp_path / "run", tmp_path / "tight.json")


def _reproduce_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("reproduce", ROOT / "experiments" / "reproduce.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_a_parked_run_is_restored_checked_and_resumed_on_a_machine_without_its_directory(tmp_path):
    """Runs longer than a sitting on machines that keep no files: --park copies the resumable
    state into the repository, a fresh clone restores it (hashes checked) and resumes it."""
    from pvae.checkpoint import RunLockedError, run_lock
    from pvae.cli import main

    script = _reproduce_script()
    name = "vae-standard-analytic"  # any configured name: state_of reads its patience
    first, parked = tmp_path / "machine-1", tmp_path / "parked"
    argv = ["train", "--dataset", "digits", "--latent-dim", "2", "--hidden", "8", "--no-progress"]
    assert main([*argv, "--epochs", "1", "--run-dir", str(first / name)]) == 0

    with run_lock(first / name):  # a run that is training is not parked
        with pytest.raises(RunLockedError):
            script.park(name, first, parked)
    assert not (parked / name).exists()
    record = script.park(name, first, parked)
    assert record["epoch"] == 1 and len(record["sittings"]) == 1 and record["sittings"][0]["git_commit"]
    for f in script.PARK_FILES:
        assert (parked / name / f).read_bytes() == (first / name / f).read_bytes()
    state = script.state_of(name, tmp_path / "no-runs-here", parked)  # the summary reads the parked copy
    assert state["epochs_run"] == 1 and state["parked"] == str(parked / name)
    assert script.state_of(name, first, parked)["parked_copy"]["epoch"] == 1
    previous = {"provenance": {"git_commit": "a" * 40}, "runs": {name: {"status": "in progress", "epochs_run": 9}}}
    lost = script.summary([name], tmp_path / "no-runs-here", 5, previous=previous, parked=tmp_path / "none")
    assert lost["runs"][name]["resumable"] is False and lost["runs"][name]["epochs_run"] == 9
    finished = {"status": "finished (early stopping)", "epochs_run": 9, "rerun_in_progress": {"epochs_run": 3}}
    lost = script.summary([name], tmp_path / "no-runs-here", 5, previous={"runs": {name: finished}},
                          parked=tmp_path / "none")["runs"][name]
    assert lost["rerun_in_progress"]["resumable"] is False and "resumable" not in lost
    kept = script.summary([name], tmp_path / "no-runs-here", 5, previous=previous, parked=parked)
    assert kept["runs"][name]["epochs_run"] == 1 and "resumable" not in kept["runs"][name]

    row_at_1 = script.summary([name], first, 5, parked=tmp_path / "none")["runs"][name]
    second = tmp_path / "machine-2"
    assert script.unpark(name, second, parked)["epoch"] == 1
    assert script.unpark(name, second, parked) is None  # a run directory there is never overwritten
    assert main([*argv, "--epochs", "2", "--run-dir", str(second / name), "--resume"]) == 0
    env = json.loads((second / name / "env.json").read_text())
    assert len(env["earlier_sittings"]) == 1 and len((second / name / "metrics.jsonl").read_text().splitlines()) == 2
    assert script.park(name, second, parked)["epoch"] == 2  # parking again replaces the earlier one
    assert not list(parked.glob(".*"))  # no staging folders left
    with pytest.raises(SystemExit, match="further along"):  # an older state never replaces a newer one
        script.park(name, first, parked)
    with pytest.raises(SystemExit, match="ahead of"):  # nor resumes silently from an older directory
        script.unpark(name, first, parked)
    other = tmp_path / "machine-4"
    assert main([*argv, "--epochs", "1", "--run-dir", str(other / name)]) == 0
    with pytest.raises(SystemExit, match="another run"):
        script.park(name, other, parked)

    # the results file: a resumed run is one run (not superseded by itself); a finished, evaluated
    # row of the same run makes its parked copy stale (not restored, not read)
    row = script.summary([name], tmp_path / "no-runs-here", 5, parked=parked)["runs"][name]
    assert row["epochs_run"] == 2 and row["parked"]
    again = script.summary([name], second, 5, previous={"runs": {name: row_at_1}}, parked=parked)["runs"][name]
    assert again["epochs_run"] == 2 and again["superseded"] == []
    evaluated = {**row, "epochs_run": 2, "test_iwae": {"mean": -1.0}}
    assert script.unpark(name, tmp_path / "machine-5", parked, evaluated) is None
    assert script.located(name, tmp_path / "machine-5", parked, evaluated) == tmp_path / "machine-5" / name

    # a parking interrupted between its renames is recovered, not lost
    (parked / name).rename(parked / f".{name}.old")
    assert script.parked_record(name, parked)["epoch"] == 2 and not (parked / f".{name}.old").exists()

    damaged = bytearray((parked / name / "checkpoint.pt").read_bytes())
    damaged[-10] ^= 1
    (parked / name / "checkpoint.pt").write_bytes(bytes(damaged))
    with pytest.raises(SystemExit, match="checkpoint.pt"):
        script.unpark(name, tmp_path / "machine-3", parked)
    assert not (tmp_path / "machine-3" / name).exists()
