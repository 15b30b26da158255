"""The public API (issue 24): a curated ``pvae.__all__``, an ``__all__`` in every module, a docstring
for every public name, every name and module path of before the curation still importable, no
import cycles, notebooks that import public names only; and the errors that loading a damaged
checkpoint or data file raises (the readers catch those errors only, not every exception)."""

import ast
import dataclasses
import importlib
import inspect
import json
import os
import pkgutil
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import pvae
from pvae.checkpoint import CorruptCheckpointError, load_checkpoint, save_checkpoint
from pvae.data.files import DataFileError, load_file

ROOT = Path(__file__).resolve().parents[1]

#: ``sorted(pvae.__all__)`` before the curation (pvae 0.2.0.dev0, 95 names): ``from pvae import X``
#: keeps working for each of them.
NAMES_BEFORE_CURATION = [
    "ACTIVATIONS", "BDMCBounds", "BernoulliLikelihood", "CONFIG_VERSION", "ContinuousBernoulliLikelihood",
    "ConvDecoder", "ConvEncoder", "ConvNets", "DATASETS", "DATA_PLATE", "Dataset", "DeltaGuide",
    "DiagonalGaussianGuide", "DiscretizedLogistic", "DiscretizedLogisticLikelihood", "DiskFullError",
    "DivergenceError", "ElboObjective", "Estimate", "EvaluationReport", "FlowGuide", "FlowPrior",
    "FreeBitsObjective", "FullRankGaussianGuide", "GUIDES", "GatedLinear", "GaussianLikelihood", "Guide",
    "History", "IAFGuide", "IWAEObjective", "InfoVAEObjective", "KLSchedule", "LATENT_SITE", "LIKELIHOODS",
    "LearnedDiagonalPrior", "Likelihood", "MLP", "MLPNets", "MixtureOfGaussiansPrior", "ModelGuidePair", "NETS",
    "NonAmortizedGuide", "NotARunError", "OBJECTIVES", "OBSERVED_SITE", "Objective", "Option", "PRIORS", "Part",
    "PlanarGuide", "PoissonLikelihood", "Prior", "REPORT_VERSION", "Run", "RunConfig", "RunExistsError",
    "StandardNormalPrior", "SylvesterGuide", "TrainStep", "Training", "UsageError", "UsageTypeError", "VAE",
    "VampPrior", "WeightedSamples", "WithCovariates", "active_units", "ais", "autoencoder_config", "bdmc",
    "build_vae", "data_dir", "elbo", "estimators", "evaluate_bounds", "evaluate_run", "fit",
    "importance_diagnostics", "inference_gaps", "iwae_bound", "kl_per_dimension", "latent_diagnostics",
    "load_dataset", "load_run", "log_importance_weights", "log_weights", "make_objective", "naive_prior_estimate",
    "parts", "plots", "psis_khat", "reconstruction_error", "to_inference_data", "train_run",
]

#: module paths of before the move into subpackages -> the modules they now are
OLD_PATHS = {
    "pvae.priors": "pvae.parts.priors", "pvae.guides": "pvae.parts.guides",
    "pvae.likelihoods": "pvae.parts.likelihoods", "pvae.nets": "pvae.parts.nets",
    "pvae.engine": "pvae.inference.engine", "pvae.estimators": "pvae.inference.estimators",
    "pvae.annealing": "pvae.inference.annealing", "pvae.diagnostics": "pvae.inference.diagnostics",
    "pvae.train": "pvae.training.loop", "pvae.objectives": "pvae.training.objectives",
    "pvae.controls": "pvae.training.controls", "pvae.tracking": "pvae.training.tracking",
    "pvae.files": "pvae.data.files", "pvae.streaming": "pvae.data.streaming",
}

# Modules without an ``__all__`` yet. Private ones need none; the others are owned by other
# changes: take a module out of this set when it gets its ``__all__`` (the names dropped from
# ``pvae.__all__`` that live there are then checked to be in it).
WITHOUT_ALL = {
    "pvae._rng", "pvae.__main__",  # private
    "pvae.inference", "pvae.training",  # subpackages that import nothing
}

# Where the names dropped from pvae.__all__ that are neither classes nor functions (which say where
# they live in ``__module__``) live.
HOME_OF_CONSTANT = {
    "ACTIVATIONS": "pvae.parts.nets", "DATASETS": "pvae.data", "DATA_PLATE": "pvae.model",
    "LATENT_SITE": "pvae.model", "OBSERVED_SITE": "pvae.model", "CONFIG_VERSION": "pvae.config",
    "REPORT_VERSION": "pvae.runs", "estimators": "pvae.inference.estimators",
}


def module_names():
    return ["pvae"] + sorted(m.name for m in pkgutil.walk_packages(pvae.__path__, "pvae."))


def own_doc(obj):
    """The docstring ``obj`` itself carries: not one inherited from a base class, nor the signature
    that :mod:`dataclasses` writes for a class without one."""
    if inspect.ismodule(obj) or inspect.isroutine(obj):
        return obj.__doc__
    if inspect.isclass(obj):
        doc = vars(obj).get("__doc__")
        if doc and dataclasses.is_dataclass(obj) and doc.startswith(obj.__name__ + "("):
            return None
        return doc
    return vars(obj).get("__doc__") if hasattr(obj, "__dict__") else None  # e.g. a Registry given one


# ----------------------------------------------------------------------------------- pvae.__all__
def test_the_public_api_is_a_curated_list_of_names_that_resolve():
    names = [n for n in pvae.__all__ if not inspect.ismodule(getattr(pvae, n))]  # besides the subpackages
    assert 30 <= len(names) <= 50, len(names)
    assert len(set(pvae.__all__)) == len(pvae.__all__), "a name listed twice"
    assert not [n for n in pvae.__all__ if n.startswith("_")]
    for name in pvae.__all__:
        assert getattr(pvae, name) is not None, name
    namespace = {}
    exec("from pvae import *", namespace)
    assert set(namespace) - {"__builtins__"} == set(pvae.__all__)


def test_the_public_api_has_what_a_notebook_needs():
    needed = {
        "VAE", "build_vae", "RunConfig", "fit", "Training", "make_objective", "History", "evaluate_bounds",
        "bounds_by_k", "elbo", "iwae_bound", "naive_prior_estimate", "ais", "bdmc", "importance_diagnostics",
        "to_inference_data", "active_units", "kl_per_dimension", "ModelGuidePair", "WithCovariates", "log_weights",
        "load_dataset", "Dataset", "train_run", "load_run", "evaluate_run", "UsageError",
        "parts", "inference", "training", "data", "plots",
    }
    assert needed <= set(pvae.__all__), sorted(needed - set(pvae.__all__))
    for name in ("inference", "training", "data", "parts", "plots"):
        assert inspect.ismodule(getattr(pvae, name)) and getattr(pvae, name).__name__ == f"pvae.{name}"


@pytest.mark.parametrize("name", module_names())
def test_every_public_name_has_a_docstring(name):
    """Classes and functions their own docstring (``inspect.getdoc`` would inherit a base class's);
    other objects (constants, registries) their own or a mention in their module's docstring."""
    module = importlib.import_module(name)
    if not hasattr(module, "__all__"):
        assert name in WITHOUT_ALL, f"{name} has no __all__"
        return
    assert module.__doc__ and module.__doc__.strip(), f"{name} has no docstring"
    assert len(set(module.__all__)) == len(module.__all__), f"{name}.__all__ lists a name twice"
    for public in module.__all__:
        obj = getattr(module, public)
        doc = own_doc(obj)
        if doc and doc.strip():
            assert inspect.getdoc(obj), f"{name}.{public}"
            continue
        assert not (inspect.isclass(obj) or inspect.isroutine(obj) or inspect.ismodule(obj)), (
            f"{name}.{public} has no docstring of its own")
        assert re.search(rf"\b{re.escape(public)}\b", module.__doc__), (
            f"{name}.{public} has no docstring, and {name}'s docstring does not mention it")


def test_free_bits_objective_has_a_real_docstring():
    doc = own_doc(pvae.FreeBitsObjective)
    assert doc and doc.startswith("The ELBO with free bits") and "λ" in doc


def test_every_name_importable_before_the_curation_still_is():
    missing = [n for n in NAMES_BEFORE_CURATION if not hasattr(pvae, n)]
    assert not missing
    namespace = {}
    exec(f"from pvae import {', '.join(NAMES_BEFORE_CURATION)}", namespace)


def test_names_dropped_from_the_top_level_are_public_where_they_live():
    dropped = sorted(set(NAMES_BEFORE_CURATION) - set(pvae.__all__))
    assert dropped
    for name in dropped:
        obj = getattr(pvae, name)
        if inspect.isclass(obj) or inspect.isroutine(obj):
            home = obj.__module__
        else:
            assert name in HOME_OF_CONSTANT, f"say where pvae.{name} lives in HOME_OF_CONSTANT"
            home = HOME_OF_CONSTANT[name]
        if inspect.ismodule(obj):
            assert obj is importlib.import_module(home), name
            continue
        module = importlib.import_module(home)
        assert getattr(module, name) is obj, f"pvae.{name} is not {home}.{name}"
        if hasattr(module, "__all__"):
            assert name in module.__all__, f"pvae.{name} is not in {home}.__all__"
        else:
            assert home in WITHOUT_ALL, f"{home} has no __all__"


def test_every_part_family_lists_its_parts():
    """:mod:`pvae.parts` is every part and registry in one namespace (as before the curation)."""
    import pvae.parts

    for name in ("parts.priors", "parts.guides", "parts.likelihoods", "parts.nets"):
        module = importlib.import_module(f"pvae.{name}")
        assert set(module.__all__) - {"IndependentBernoulli", "DiagonalGaussianMixture"} <= set(pvae.parts.__all__)


# ----------------------------------------------------------------------------------- module paths
@pytest.mark.parametrize("old", sorted(OLD_PATHS))
def test_old_module_paths_are_the_moved_modules(old):
    module = importlib.import_module(OLD_PATHS[old])
    assert importlib.import_module(old) is module
    assert sys.modules[old] is module
    assert getattr(pvae, old.split(".")[1]) is module
    assert old.split(".")[1] in pvae._MOVED


_IMPORT_EACH = r"""
import importlib, os, sys, traceback
import numpy, torch, pyro, pyro.distributions, pyro.infer  # third-party, loaded once, before the fork
assert not [m for m in sys.modules if m == "pvae" or m.startswith("pvae.")]
failed = []
for name in sys.argv[1:]:
    pid = os.fork()
    if pid == 0:  # no pvae module imported yet: this one is imported first
        try:
            importlib.import_module(name)
            code = 0
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(code)
    if os.waitpid(pid, 0)[1] != 0:
        failed.append(name)
print("failed:", " ".join(failed))
sys.exit(1 if failed else 0)
"""


def test_every_module_imports_first_in_a_fresh_interpreter():
    """No import cycles: each module (and each old path) imports in an interpreter that has
    imported no pvae module yet. (Forked from one fresh interpreter that loaded torch and Pyro, so
    that each import does not pay for them again; one interpreter per module without fork.)"""
    names = [m for m in module_names() if m != "pvae.__main__"] + sorted(OLD_PATHS)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    if hasattr(os, "fork"):
        proc = subprocess.run([sys.executable, "-c", _IMPORT_EACH, *names], capture_output=True, text=True,
                              timeout=600, cwd=ROOT, env=env)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    else:
        for name in names:
            proc = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, text=True,
                                  timeout=300, cwd=ROOT, env=env)
            assert proc.returncode == 0, f"import {name}: {proc.stderr[-3000:]}"


# ----------------------------------------------------------------------------------- notebooks
def _notebook_code(path) -> str:
    """The code cells of a notebook as one program (IPython's ``%`` and ``!`` lines left out)."""
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    lines = [line for cell in cells if cell["cell_type"] == "code" for line in "".join(cell["source"]).splitlines()]
    return "\n".join("pass" if line.lstrip().startswith(("%", "!")) else line for line in lines)


def _public(module, name):
    return name in getattr(module, "__all__", ())


def pvae_names_used(code: str):
    """``(where, module, name)`` for every pvae name the code imports or reads as an attribute of
    a pvae module (``pvae.X``, ``plots.X`` after ``from pvae import plots``)."""
    tree = ast.parse(code)
    modules = {}  # local name -> pvae module
    used = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "pvae":
                    if alias.asname:
                        modules[alias.asname] = importlib.import_module(alias.name)
                    else:
                        modules["pvae"] = pvae
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "pvae":
            module = importlib.import_module(node.module)
            for alias in node.names:
                used.append((f"from {node.module} import {alias.name}", module, alias.name))
                obj = getattr(module, alias.name, None)
                if inspect.ismodule(obj):
                    modules[alias.asname or alias.name] = obj
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules:
            module = modules[node.value.id]
            used.append((f"{node.value.id}.{node.attr}", module, node.attr))
    return used


def test_notebooks_use_public_names_only():
    notebooks = sorted((ROOT / "notebooks").glob("*.ipynb"))
    assert notebooks
    seen = 0
    for path in notebooks:
        for where, module, name in pvae_names_used(_notebook_code(path)):
            seen += 1
            assert _public(module, name), f"{path.name}: {where} is not in {module.__name__}.__all__"
    assert seen > 50  # the parser found the notebooks' uses


def test_the_notebook_check_finds_a_name_that_is_not_public():
    used = pvae_names_used("import pvae\nfrom pvae import plots\nfrom pvae.train import _optimizer\n"
                           "pvae.fit\npvae.psis_khat\nplots.elbo_curves\n")
    assert sorted(where for where, module, name in used if not _public(module, name)) == [
        "from pvae.train import _optimizer", "pvae.psis_khat"]
    assert len(used) == 5


# ----------------------------------------------------------------------------------- damaged files
def _damaged(data: bytes, rng: random.Random) -> bytes:
    """``data`` truncated, with bits flipped, bytes overwritten, inserted or deleted."""
    d = bytearray(data)
    how = rng.choice(["truncate", "flip", "overwrite", "insert", "delete"])
    i = rng.randrange(len(d))
    if how == "truncate":
        del d[i:]
    elif how == "flip":
        d[i] ^= 1 << rng.randrange(8)
    elif how == "overwrite":
        for _ in range(rng.randrange(1, 20)):
            d[rng.randrange(len(d))] = rng.randrange(256)
    elif how == "insert":
        d[i:i] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40)))
    else:
        del d[i:i + rng.randrange(1, 60)]
    return bytes(d)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_damaged_checkpoint_is_refused_as_corrupt_and_an_unreadable_one_as_what_it_is(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint({"model": {"w": torch.arange(100.0), "b": torch.ones(3, 4)}, "epoch": 3, "rng": [1, 2.5, "x"]},
                    path)
    good = path.read_bytes()
    legacy = tmp_path / "legacy.pt"  # pickled without the zip container: the unpickler sees the damage
    torch.save({"w": torch.ones(5), "epoch": 1}, legacy, _use_new_zipfile_serialization=False)
    rng = random.Random(0)
    damaged = tmp_path / "damaged.pt"
    for source in [good] * 300 + [legacy.read_bytes()] * 300 + [b"", b"garbage", b"PK\x03\x04"]:
        damaged.write_bytes(_damaged(source, rng) if len(source) > 20 else source)
        try:
            load_checkpoint(damaged)  # (a byte the file does not depend on)
        except CorruptCheckpointError:
            pass
    with pytest.raises(IsADirectoryError):  # not damage: the file system's error, as raised
        load_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_damaged_evaluation_cache_is_set_aside(tmp_path):
    from pvae.inference.estimators import BatchCache

    path, key = tmp_path / "test.partial.pt", {"estimator": "iwae", "num_samples": 10, "seed": 0}
    cache = BatchCache(path, key)
    for i in range(3):
        cache.put(i, {"log_mean_w": torch.full((4,), float(i))})
    good = path.read_bytes()
    assert BatchCache(path, key).resumed == 3
    rng = random.Random(2)
    for _ in range(300):
        path.write_bytes(_damaged(good, rng))
        cache = BatchCache(path, key)  # (a byte the file does not depend on: resumed)
        assert cache.set_aside or cache.resumed == 3
    path.unlink()
    path.mkdir()  # not even a file: set aside too (the evaluation starts afresh)
    assert BatchCache(path, key).set_aside.startswith("unreadable (IsADirectoryError")


def _data_files(folder: Path):
    from PIL import Image

    rng = np.random.RandomState(0)
    images = (rng.rand(30, 6, 6) * 255).astype(np.uint8)
    np.save(folder / "x.npy", images)
    np.savez(folder / "x.npz", train=rng.rand(20, 4), valid=rng.rand(5, 4), test=rng.rand(5, 4))
    torch.save({"train": torch.rand(20, 4), "valid": torch.rand(5, 4), "test": torch.rand(5, 4)}, folder / "x.pt")
    (folder / "x.csv").write_text("a,b,c\n" + "".join(f"{i},{i / 3:.3f},{i % 2}\n" for i in range(30)))
    pngs = []
    for fmt in ("png", "jpeg", "bmp", "gif"):  # (the PNG first)
        path = folder / f"image.{fmt}"
        Image.fromarray(images[0]).save(path)
        pngs.append(path)
    return [folder / n for n in ("x.npy", "x.npz", "x.pt", "x.csv")], pngs


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def _broken_pngs(png: bytes) -> dict:
    """A PNG damaged so that Pillow raises each kind of error it raises for damaged images."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    assert png[12:16] == b"IHDR" and png[37:41] == b"IDAT"
    n = struct.unpack(">I", png[33:37])[0]
    idat = png[41:41 + n]
    return {
        "foreign": b"not an image at all",  # UnidentifiedImageError (an OSError)
        "truncated": png[:len(png) * 2 // 3],  # OSError
        "short-header": png[:8] + struct.pack(">I", 5) + png[12:],  # ValueError: Truncated IHDR chunk
        "broken-chunk": (png[:33] + chunk(b"IDAT", idat[:10]) + struct.pack(">I", n - 10) + b"\x00\x01\x02\x03"
                         + idat[10:] + bytes(4) + png[45 + n:]),  # SyntaxError: broken PNG file
    }


def test_a_damaged_data_file_is_refused_naming_it(tmp_path):
    files, images = _data_files(tmp_path)
    rng = random.Random(1)
    trials = tmp_path / "trials"
    trials.mkdir()
    for source in files:
        good = source.read_bytes()
        for i in range(60):
            damaged = trials / f"{i}{source.suffix}"
            damaged.write_bytes(_damaged(good, rng))
            try:
                load_file(str(damaged), split=(0.6, 0.2, 0.2))
            except DataFileError:
                pass
    for name, data in _broken_pngs(images[0].read_bytes()).items():  # what each kind of damage raises in Pillow
        for stream in ("auto", "never", "always"):
            folder = tmp_path / f"{name}-{stream}"
            folder.mkdir()
            for j, source in enumerate(images):
                (folder / f"{j}{source.suffix}").write_bytes(source.read_bytes())
            (folder / "0.png").write_bytes(data)  # the first file: the one that stream="auto" probes
            with pytest.raises(DataFileError, match=r"0\.png is not a readable image"):
                load_file(str(folder), split=(0.5, 0.25, 0.25), image_size=(6, 6), stream=stream)
    for stream in ("never", "always"):
        for i in range(60):
            folder = tmp_path / f"images-{stream}-{i}"
            folder.mkdir()
            for j, source in enumerate(images):  # one damaged image among intact ones of every format
                good = source.read_bytes()
                (folder / f"{j}{source.suffix}").write_bytes(_damaged(good, rng) if j == i % len(images) else good)
            try:
                load_file(str(folder), split=(0.5, 0.25, 0.25), image_size=(6, 6), stream=stream)
            except DataFileError:
                pass
