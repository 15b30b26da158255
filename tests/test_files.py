"""Your own data: every format loads with the right shape, values, labels and split; the run
records the source and is evaluated on exactly that data; bad data are refused, naming the
rows or files at fault, before anything is written."""

import json

import numpy as np
import pytest
import torch

import pvae
from pvae.cli import main
from pvae.files import DataFileError, file_sha256, load_file, write_examples

SMALL = ["--latent-dim", "2", "--hidden", "16", "--epochs", "1", "--no-progress"]


@pytest.fixture
def examples(tmp_path):
    paths = write_examples(tmp_path / "data")
    return dict(zip(("npy", "csv", "pngs"), paths))


def test_an_npy_of_8_bit_images_is_scaled_shaped_and_split_by_seed(examples):
    data = load_file(examples["npy"])
    raw = np.load(examples["npy"])
    assert data.image_shape == (8, 8) and data.data_dim == 64 and data.binary
    assert [t.shape[0] for t in (data.train, data.valid, data.test)] == [48, 6, 6]
    all_rows = torch.cat([data.train, data.valid, data.test])
    assert sorted(map(tuple, all_rows.tolist())) == sorted(map(tuple, (raw.reshape(60, 64) / 255.0).tolist()))
    again, other = load_file(examples["npy"]), load_file(examples["npy"], split_seed=1)
    assert torch.equal(again.test, data.test) and not torch.equal(other.test, data.test)
    assert data.source["sha256"] == file_sha256(examples["npy"]) and data.source["split_seed"] == 0


def test_npz_pt_csv_tsv_and_image_folders(tmp_path, examples):
    rng = np.random.RandomState(0)
    splits = {s: rng.rand(n, 5).astype(np.float32) for s, n in (("train", 7), ("valid", 3), ("test", 2))}
    np.savez(tmp_path / "splits.npz", **splits, train_labels=np.arange(7))
    data = load_file(tmp_path / "splits.npz")
    assert torch.equal(data.valid, torch.from_numpy(splits["valid"])) and data.source["split"] == "from the file"
    assert data.labels["train"].tolist() == list(range(7)) and data.image_shape is None
    torch.save({"train": torch.ones(4, 3), "valid": torch.zeros(2, 3), "test": torch.ones(2, 3)}, tmp_path / "d.pt")
    assert load_file(tmp_path / "d.pt").test.shape == (2, 3)
    torch.save(torch.rand(20, 3, 6, 5), tmp_path / "chw.pt")  # (N, C, H, W)
    assert load_file(tmp_path / "chw.pt").image_shape == (3, 6, 5)
    hwc = np.random.RandomState(1).rand(20, 6, 5, 3).astype(np.float32)  # (N, H, W, C): channels moved first
    np.save(tmp_path / "hwc.npy", hwc)
    loaded = load_file(tmp_path / "hwc.npy", split=(0.5, 0.25, 0.25))
    assert loaded.image_shape == (3, 6, 5)
    row = torch.cat([loaded.train, loaded.valid, loaded.test])[0]
    assert any(torch.allclose(row, torch.from_numpy(np.moveaxis(h, -1, 0).reshape(-1))) for h in hwc)
    table = load_file(examples["csv"], label_column="kind")
    assert table.data_dim == 3 and set(torch.cat(list(table.labels.values())).tolist()) == {0, 1}
    (tmp_path / "t.tsv").write_text("1\t2\n3\t4\n5\t6\n7\t8\n9\t10\n11\t12\n13\t14\n15\t16\n17\t18\n19\t20\n")
    assert load_file(tmp_path / "t.tsv").data_dim == 2
    pngs = load_file(examples["pngs"])
    assert pngs.image_shape == (8, 8) and pngs.labels is not None and pngs.binary
    resized = load_file(examples["pngs"], image_size=(4, 6))
    assert resized.image_shape == (4, 6) and resized.data_dim == 24
    from PIL import Image

    colour = tmp_path / "colour"
    colour.mkdir()
    for i in range(10):
        Image.fromarray((rng.rand(5, 7, 3) * 255).astype(np.uint8)).save(colour / f"{i}.png")
    rgb = load_file(colour)
    assert rgb.image_shape == (3, 5, 7) and 0 <= float(rgb.train.min()) and float(rgb.train.max()) <= 1


@pytest.mark.parametrize("make, match", [
    (lambda p: np.save(p / "x.npy", np.array([[0.0, 1.0], [np.nan, 0.0], [1.0, 1.0]] * 4)),
     r"NaN or infinite values in 4 row\(s\) \(row index 1, 4, 7, 10, counting from 0\)"),
    (lambda p: (p / "x.csv").write_text("a,b\n1,2\n3\n"), "line 3 has 1 columns, expected 2"),
    (lambda p: (p / "x.csv").write_text("1,2\n3,oops\n"), "line 2, column 2 holds the non-numeric value 'oops'"),
    (lambda p: np.save(p / "x.npy", np.zeros((2, 3))), "leave the valid, test split empty"),
    (lambda p: np.savez(p / "x.npz", train=np.zeros((3, 2)), test=np.zeros((3, 2))), r"not \['valid'\]"),
    (lambda p: (p / "x.txt").write_text("1 2"), "unknown data format '.txt'"),
    (lambda p: ((p / "imgs").mkdir(), (p / "imgs" / "a.png").write_bytes(b"not a png")), "a.png is not a readable image"),
])
def test_bad_files_are_refused_with_the_problem_named(tmp_path, make, match):
    make(tmp_path)
    target = next(p for p in tmp_path.iterdir())
    with pytest.raises(DataFileError, match=match):
        load_file(target)


@pytest.mark.parametrize("text, match", [
    # an empty cell is a missing value, named as such, with its line and column
    ("alcohol,ash,kind\n1,2,a\n3,,b\n", r"line 3, column 'ash' is empty \(a missing value\)"),
    # lines as an editor counts them: blank lines and the header included
    ("alcohol,ash,kind\n1,2,a\n\n\n3,x,b\n", r"line 5, column 'ash' holds the non-numeric value 'x'"),
    # "nan" parses as a float: still a missing value, on its line (not a row index of the array)
    ("alcohol,ash,kind\n1,2,a\n3,4,b\n5,nan,c\n", r"line 4, column 'ash' holds 'nan' \(not a finite number\)"),
    # a text column that is not the label column: the hint names the flag
    ("a,colour\n1,red\n", r"line 2, column 'colour' holds the non-numeric value 'red'.*--label-column colour"),
    # a row with no label
    ("alcohol,ash,kind\n1,2,a\n3,4, \n", r"line 3, label column 'kind' is empty"),
    # no header: columns by number, counted from 1
    ("1,2,3\n4,,6\n", r"line 2, column 2 is empty"),
    # a quoted cell over two lines: the next row's line is still right
    ('a,b,kind\n1,2,"two\nlines"\n3,?,c\n', r"line 4, column 'b' holds the non-numeric value '\?'"),
    ("a,b\n", r"holds a header \(a, b\) but no rows"),
])
def test_csv_errors_name_the_line_and_the_column(tmp_path, text, match):
    (tmp_path / "x.csv").write_text(text)
    with pytest.raises(DataFileError, match=match):
        load_file(tmp_path / "x.csv", label_column="kind" if "kind" in text else None)


def test_negative_values_under_bernoulli_suggest_a_likelihood_for_reals_not_binarizing(tmp_path, capsys):
    rng = np.random.RandomState(0)
    np.savetxt(tmp_path / "reals.csv", rng.randn(40, 3), delimiter=",", header="a,b,c", comments="")
    run = tmp_path / "run"
    assert main(["train", "--data", str(tmp_path / "reals.csv"), "--run-dir", str(run), *SMALL]) == 2
    err = capsys.readouterr().err
    assert "not probabilities or grey levels" in err and "--likelihood gaussian" in err
    assert "--binarize" not in err
    assert not run.exists()


def test_images_of_different_sizes_need_image_size(tmp_path):
    from PIL import Image

    (tmp_path / "imgs").mkdir()
    Image.new("L", (4, 4)).save(tmp_path / "imgs" / "a.png")
    Image.new("L", (5, 4)).save(tmp_path / "imgs" / "b.png")
    with pytest.raises(DataFileError, match="b.png is 5x4 but a.png is 4x4; give --image-size"):
        load_file(tmp_path / "imgs")


def test_the_three_readme_cases_train_and_evaluate_from_the_command_line(examples, tmp_path, capsys):
    cases = {
        "npy": ["--data", str(examples["npy"])],
        "csv": ["--data", str(examples["csv"]), "--label-column", "kind", "--likelihood", "gaussian"],
        "pngs": ["--data", str(examples["pngs"]), "--net", "conv", "--channels", "4,8", "--image-size", "8,8"],
    }
    for name, flags in cases.items():
        run = tmp_path / name
        argv = ["train", "--run-dir", str(run), *flags, *SMALL]
        if name == "pngs":
            argv.remove("--hidden"), argv.remove("16")
        assert main(argv) == 0, capsys.readouterr().err
        record = json.loads((run / "data.json").read_text())
        assert record["source"] == "file" and record["file"]["sha256"] == file_sha256(examples[name])
        assert main(["evaluate", str(run), "--num-samples", "4", "--no-progress"]) == 0
        report = json.loads((run / "evaluation-test-K4.json").read_text())
        assert report["data"]["training_data"] is True
    # a 1-D code (and the CSV's labels) in the latent figure
    assert main(["train", "--run-dir", str(tmp_path / "one"), *cases["csv"], "--latent-dim", "1", "--epochs", "1",
                 "--no-progress"]) == 0


def test_evaluation_uses_exactly_the_training_file_or_other_data_on_request(examples, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", str(examples["npy"]), "--run-dir", str(run), *SMALL]) == 0
    other = tmp_path / "other.npy"
    np.save(other, (np.random.RandomState(3).rand(30, 8, 8) < 0.5).astype(np.uint8) * 255)
    assert main(["evaluate", str(run), "--data", str(other), "--num-samples", "3", "--no-progress"]) == 0
    report = json.loads((run / "evaluation-other_npy-test-K3.json").read_text())  # named after what it scored
    assert report["data"]["training_data"] is False and report["dataset"] == "other.npy"
    np.save(tmp_path / "wide.npy", np.zeros((30, 9, 9), dtype=np.uint8))
    assert main(["evaluate", str(run), "--data", str(tmp_path / "wide.npy"), "--no-progress"]) == 2
    assert "has 81 values per datapoint but the model" in capsys.readouterr().err
    arr = np.load(examples["npy"])
    arr[0, 0, 0] = 255 - arr[0, 0, 0]
    np.save(examples["npy"], arr)  # the training file changes
    assert main(["evaluate", str(run), "--num-samples", "3", "--no-progress"]) == 2
    assert "changed since" in capsys.readouterr().err


def test_grey_data_under_a_bernoulli_likelihood_name_the_fixes_and_write_nothing(tmp_path, capsys):
    np.save(tmp_path / "grey.npy", (np.random.RandomState(0).rand(40, 4, 4) * 255).astype(np.uint8))
    run = tmp_path / "run"
    assert main(["train", "--data", str(tmp_path / "grey.npy"), "--run-dir", str(run), *SMALL]) == 2
    err = capsys.readouterr().err
    assert "grey levels in [0, 1]" in err and "--binarize" in err and "continuous-bernoulli" in err
    assert not run.exists()
    assert main(["train", "--data", str(tmp_path / "grey.npy"), "--binarize", "threshold", "--run-dir", str(run), *SMALL]) == 0
    assert json.loads((run / "config.json").read_text())["dataset"]["binarize"] == "threshold"
    # a dynamic binarization of the grey levels (scaled to [0, 1]) trains too, and is recorded
    run2 = tmp_path / "run2"
    assert main(["train", "--data", str(tmp_path / "grey.npy"), "--binarize", "dynamic", "--run-dir", str(run2),
                 *SMALL]) == 0
    assert json.loads((run2 / "data.json").read_text())["file"]["binarize"] == "dynamic"
    assert main(["evaluate", str(run2), "--num-samples", "3", "--no-progress"]) == 0


def test_a_file_config_round_trips_and_loads_through_load_dataset(examples):
    config = pvae.RunConfig(dataset={"name": "file", "path": str(examples["npy"]), "split": "0.6,0.2,0.2"})
    assert config.dataset["split"] == (0.6, 0.2, 0.2)
    assert pvae.RunConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    data = pvae.load_dataset(config.dataset)
    assert [t.shape[0] for t in (data.train, data.valid, data.test)] == [36, 12, 12]
    with pytest.raises(pvae.UsageError, match="needs a path"):
        pvae.load_dataset("file")


def test_labels_must_match_their_split(tmp_path):
    np.savez(tmp_path / "x.npz", train=np.zeros((4, 2)), valid=np.zeros((2, 2)), test=np.zeros((2, 2)),
             train_labels=np.arange(3))
    with pytest.raises(DataFileError, match="3 train labels for 4 train datapoints"):
        load_file(tmp_path / "x.npz")


def test_resume_without_config_continues_the_saved_run(examples, tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--data", str(examples["npy"]), "--objective", "elbo", "--run-dir", str(run), *SMALL]) == 0
    assert main(["train", "--run-dir", str(run), "--resume", "--epochs", "2", "--no-progress"]) == 0
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2


def test_a_config_of_the_0_2_dev_file_loader_with_a_binarize_flag_still_loads(tmp_path):
    """Runs saved while the file option binarize was a flag (true/false) load, resume and evaluate."""
    config = {"version": 2, "dataset": {"name": "file", "path": str(tmp_path / "x.npy"), "binarize": False}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert pvae.RunConfig.load(tmp_path / "config.json").dataset["binarize"] == "none"
    config["dataset"]["binarize"] = True
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert pvae.RunConfig.load(tmp_path / "config.json").dataset["binarize"] == "threshold"
