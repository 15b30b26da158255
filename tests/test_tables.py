"""Tables in different units (issue 27): standardized columns under a Gaussian likelihood, the
statistics recorded and reused, both units reported, a warning when a table is left raw; whole-file
evaluation of other data that never overwrites the run's own report."""

import json
import math
import warnings

import numpy as np
import pytest
import torch

import pvae
from pvae.cli import main

FAST = ["--latent-dim", "2", "--hidden", "16", "--no-progress", "--epochs", "2"]


def _wine(path, n=178, seed=0):
    """A wine-like table: columns in very different units and a text-free integer label column."""
    rng = np.random.default_rng(seed)
    columns = np.c_[rng.normal(13, 0.8, n), rng.normal(750, 300, n), rng.normal(0.3, 0.1, n)]
    np.savetxt(path, np.c_[columns, rng.integers(0, 3, n)], delimiter=",", header="alcohol,proline,acid,kind",
               comments="")
    return columns


def test_a_gaussian_run_on_a_table_standardizes_with_the_training_split(tmp_path):
    columns = _wine(tmp_path / "wine.csv")
    config = pvae.RunConfig(dataset={"name": "file", "path": str(tmp_path / "wine.csv"), "label_column": "kind"},
                            likelihood="gaussian", latent_dim=2, net={"hidden": (16,)})
    assert config.dataset["standardize"] == "on"  # auto, decided and recorded by the config
    data = pvae.load_dataset(config.dataset)
    stats = data.source["standardization"]
    torch.testing.assert_close(data.train.double().mean(0), torch.zeros(3, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(data.train.double().std(0, unbiased=False), torch.ones(3, dtype=torch.float64),
                               atol=1e-6, rtol=0)
    raw = pvae.load_dataset({"name": "file", "path": str(tmp_path / "wine.csv"), "label_column": "kind"})
    assert "standardization" not in raw.source  # loaded on its own: as it is
    torch.testing.assert_close(torch.tensor(stats["mean"], dtype=torch.float64), raw.train.double().mean(0))
    assert stats["log_abs_det_jacobian"] == pytest.approx(-sum(math.log(s) for s in stats["scale"]))
    # the same statistics for every split (the valid split's mean is not zero)
    torch.testing.assert_close(data.valid.double(), (raw.valid.double() - torch.tensor(stats["mean"], dtype=torch.float64))
                               / torch.tensor(stats["scale"], dtype=torch.float64), atol=1e-5, rtol=1e-5)
    assert abs(float(np.log(columns.std(0)).sum()) + stats["log_abs_det_jacobian"]) < 0.5  # about the columns' scales
    bernoulli = pvae.RunConfig(dataset={"name": "file", "path": str(tmp_path / "wine.csv")}, likelihood="bernoulli")
    assert bernoulli.dataset["standardize"] == "off"
    old = pvae.RunConfig.from_dict({"version": 2, "dataset": {"name": "file", "path": str(tmp_path / "wine.csv")},
                                    "likelihood": "gaussian"})
    assert old.dataset["standardize"] == "off"  # a pvae 0.2 run read its table as it was


def test_a_raw_table_under_a_gaussian_likelihood_warns(tmp_path):
    _wine(tmp_path / "wine.csv")
    config = pvae.RunConfig(dataset={"name": "file", "path": str(tmp_path / "wine.csv"), "label_column": "kind",
                                     "standardize": "off"},
                            likelihood="gaussian", latent_dim=2, net={"hidden": (16,)}, training={"epochs": 1})
    with pytest.warns(UserWarning, match="spreads from .* standardize"):
        pvae.train_run(config, tmp_path / "run", progress=False)
    on = config.replace(dataset={"standardize": "on"})
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*spreads from", category=UserWarning)
        pvae.train_run(on, tmp_path / "run-on", progress=False)


def test_evaluating_another_file_scores_all_of_it_in_the_runs_units_and_keeps_the_runs_report(tmp_path, capsys):
    _wine(tmp_path / "wine.csv")
    _wine(tmp_path / "other.csv", n=40, seed=1)
    run = tmp_path / "run"
    assert main(["train", "--data", str(tmp_path / "wine.csv"), "--label-column", "kind", "--likelihood", "gaussian",
                 "--run-dir", str(run), *FAST]) == 0
    assert main(["evaluate", str(run), "--num-samples", "5", "--psis-datapoints", "0", "--no-progress"]) == 0
    own = (run / "evaluation-test-K5.json").read_text()
    capsys.readouterr()
    assert main(["evaluate", str(run), "--data", str(tmp_path / "other.csv"), "--split", "all", "--num-samples", "5",
                 "--psis-datapoints", "0", "--no-progress"]) == 0
    assert (run / "evaluation-test-K5.json").read_text() == own  # the run's own report is untouched
    report = json.loads((run / "evaluation-other_csv-all-K5.json").read_text())
    assert report["num_datapoints"] == 40 and report["split"] == "all" and report["scored"] == "other_csv"
    recorded = json.loads((run / "data.json").read_text())["file"]["standardization"]
    units = report["data"]["units"]
    assert units["log_abs_det_jacobian"] == pytest.approx(recorded["log_abs_det_jacobian"])  # the run's, not other.csv's
    assert units["in_file_units"]["iwae"] == pytest.approx(report["estimates"]["iwae"]["mean"]
                                                           + recorded["log_abs_det_jacobian"])


def test_the_whole_data_set_is_one_split():
    data = pvae.load_dataset("digits")
    whole = data.split("all")
    assert whole.shape[0] == sum(data.split(s).shape[0] for s in ("train", "valid", "test"))
    assert torch.equal(whole[-data.test.shape[0]:], data.test)
    assert data.split_labels("all").shape[0] == whole.shape[0]
    with pytest.raises(pvae.UsageError, match="unknown split 'every'.*all"):
        data.split("every")


def test_the_readmes_own_data_lines_run_on_files_of_the_kinds_they_describe(tmp_path, monkeypatch, capsys):
    """README's "Your own data" command lines, run as written (with flags for a 1-epoch run added)
    in a folder holding what they describe: grey uint8 images in a .npy, a numeric table with a
    text label column, a folder of PNGs in class subfolders, and another .npy to score."""
    import re
    import shlex
    from pathlib import Path

    from PIL import Image

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text[text.index("## Your own data"):]
    section = section[: section.index("\n## ", 10)]
    (block,) = re.findall(r"```bash\n(.*?)```", section, re.S)
    lines = [line.split("  #")[0].strip() for line in block.splitlines() if line.startswith("pvae ")]
    assert len(lines) == 5
    rng = np.random.RandomState(0)
    grey = (rng.rand(60, 8, 8) * 255).astype(np.uint8)  # grey levels, not 0/255
    np.save(tmp_path / "images.npy", grey)
    np.save(tmp_path / "more_images.npy", (rng.rand(25, 8, 8) * 255).astype(np.uint8))
    columns = _wine(tmp_path / "raw.csv", n=60)
    rows = [",".join(f"{v:.4f}" for v in row) + f",{'red' if i % 3 else 'white'}" for i, row in enumerate(columns)]
    (tmp_path / "table.csv").write_text("alcohol,proline,acid,kind\n" + "\n".join(rows) + "\n")
    for i in range(20):
        sub = tmp_path / "pngs" / ("cats" if i % 2 else "dogs")
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(grey[i]).save(sub / f"{i:02d}.png")
    monkeypatch.chdir(tmp_path)
    fast = {"train": ["--epochs", "1", "--latent-dim", "2", "--no-progress"],
            "evaluate": ["--num-samples", "3", "--psis-datapoints", "0", "--no-progress"]}
    for line in lines:
        argv = shlex.split(line)[1:]
        extra = fast[argv[0]] + (["--hidden", "16"] if argv[0] == "train" and "conv" not in argv else [])
        assert main(argv + extra) == 0, (line, capsys.readouterr().err[-2000:])
    report = json.loads((tmp_path / "runs" / "images" / "evaluation-more_images_npy-all-K3.json").read_text())
    assert report["num_datapoints"] == 25
    assert (tmp_path / "runs" / "images" / "evaluation-test-K3.json").exists()


def test_label_names_are_kept_in_the_data_the_run_the_figure_and_the_reports(tmp_path):
    """A CSV's text labels and image class folders keep their names: Dataset.label_names,
    data.json, the report's per-label rows and the latent figure's legend (categories, not a colour
    bar)."""
    from PIL import Image

    columns = _wine(tmp_path / "raw.csv", n=60)
    kinds = ["red", "white", "rosé"]
    rows = [",".join(f"{v:.4f}" for v in row) + f",{kinds[i % 3]}" for i, row in enumerate(columns)]
    (tmp_path / "table.csv").write_text("alcohol,proline,acid,kind\n" + "\n".join(rows) + "\n")
    data = pvae.load_dataset({"name": "file", "path": str(tmp_path / "table.csv"), "label_column": "kind"})
    assert data.label_names == ("red", "rosé", "white")
    assert {data.label_name(v) for v in data.labels["train"].tolist()} <= set(kinds)
    numbered = tmp_path / "numbered.csv"
    numbered.write_text("a,b,kind\n" + "\n".join(f"{i}.0,{i % 5}.5,{[2, 10, 1][i % 3]}" for i in range(30)) + "\n")
    assert pvae.load_dataset({"name": "file", "path": str(numbered), "label_column": "kind"}).label_names == (
        "1", "2", "10")  # integers in their numeric order
    for i in range(12):
        sub = tmp_path / "pngs" / ("cats" if i % 2 else "dogs")
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray((np.random.RandomState(i).rand(8, 8) > 0.5).astype(np.uint8) * 255).save(sub / f"{i}.png")
    assert pvae.load_dataset({"name": "file", "path": str(tmp_path / "pngs")}).label_names == ("cats", "dogs")

    run = tmp_path / "run"
    assert main(["train", "--data", str(tmp_path / "table.csv"), "--label-column", "kind", "--likelihood", "gaussian",
                 "--run-dir", str(run), *FAST]) == 0
    assert json.loads((run / "data.json").read_text())["label_names"] == ["red", "rosé", "white"]
    assert main(["evaluate", str(run), "--split", "all", "--num-samples", "3", "--psis-datapoints", "0",
                 "--no-progress"]) == 0
    report = json.loads((run / "evaluation-all-K3.json").read_text())
    assert set(report["by_label"]) == set(kinds) and sum(r["num_datapoints"] for r in report["by_label"].values()) == 60
    figure = pvae.plots.latent_scatter(torch.randn(60, 2), data.split_labels("all"), label_names=data.label_names)
    legend = figure.axes[0].get_legend()
    assert legend is not None and [t.get_text() for t in legend.get_texts()] == ["red", "rosé", "white"]
    assert len(figure.axes) == 1  # no colour bar
