import os
from pathlib import Path

# One intra-op thread, here and in the processes the tests start (scripts, notebooks' kernels, the
# CLI): the suite's models are tiny, so a second thread buys nothing on an idle machine (measured on
# the 2-core machine: the same wall time, +-10%), while on shared, loaded cores the threads' barrier
# waits make the same tests 5-40x slower (an AIS gradient evaluation: 15 ms with 2 threads under
# load, 0.5 ms with 1; the 29 prior/guide combinations at load 3.6: 100 s with 2, 3.4 s with 1).
# PVAE_TEST_THREADS sets another number for this process and, unless OMP_NUM_THREADS is set, for
# the processes it starts. The numbers the tests check do not depend on it.
TEST_THREADS = int(os.environ.get("PVAE_TEST_THREADS", "1"))
os.environ.setdefault("OMP_NUM_THREADS", str(TEST_THREADS))

import pyro  # noqa: E402  (after the thread setting, which the OpenMP runtime reads when it loads)
import pytest  # noqa: E402
import torch  # noqa: E402

import pvae.config

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# Data-dependent tests read the pre-downloaded files through the loader's cache setting,
# exactly as a user's cache: PVAE_DATA_DIR if set, else ../shared/data next to the repo.
if "PVAE_DATA_DIR" not in os.environ and SHARED_DATA.is_dir():
    os.environ["PVAE_DATA_DIR"] = str(SHARED_DATA)
if os.environ.get("PVAE_DATA_DIR"):
    # absolute, so that scripts run from other folders (subprocess smoke tests) see the same cache
    os.environ["PVAE_DATA_DIR"] = str(Path(os.environ["PVAE_DATA_DIR"]).expanduser().resolve())


def _mnist_available() -> bool:
    folder = Path(os.environ.get("PVAE_DATA_DIR", "~/.cache/pvae")).expanduser() / "binarized_mnist"
    return all(
        (folder / f"binarized_mnist_{s}.amat").exists() or (folder / f"binarized_mnist_{s}.amat.gz").exists()
        for s in ("train", "valid", "test")
    )


MNIST_AVAILABLE = _mnist_available()
requires_mnist = pytest.mark.skipif(
    not MNIST_AVAILABLE, reason="binarized MNIST is not in the data cache (set PVAE_DATA_DIR)"
)
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True, scope="session")
def _test_threads():
    """TEST_THREADS intra-op threads for the whole session (whatever torch was imported with)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(TEST_THREADS)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _fresh_state():
    """Fixed seed, empty Pyro parameter store and Pyro validation for every test."""
    torch.manual_seed(0)
    pyro.clear_param_store()
    pyro.enable_validation(True)
    yield
    pyro.clear_param_store()


@pytest.fixture(scope="session")
def digits():
    import pvae

    return pvae.load_dataset("digits")


def part(section, name, **options):
    """A part section for a config: ``name`` with those of ``options`` the part declares (so a
    test can give one set of small sizes to every prior, guide, ...)."""
    declared = pvae.config.PART_REGISTRIES[section].options(name)
    return {"name": name, **{k: v for k, v in options.items() if k in declared}}


def t_tolerance(stderr, df: int, failure_rate: float = 1e-6):
    """Tolerance for the mean of ``df + 1`` independent group means whose standard error
    ``stderr`` (a number or a tensor) is estimated from those groups: the two-sided Student's t
    quantile with ``df`` degrees of freedom times ``stderr``, so a correct estimator fails with
    probability about ``failure_rate`` also when there are only a few hundred groups (where
    :func:`pvae.testing.mc_tolerance`'s normal quantile would fail more often than that).

    Vectorised Monte Carlo tests score ``m`` copies of the data in one batch: one call is then the
    mean of ``m`` independent replicates, and ``G`` calls give ``G`` such group means."""
    from scipy.stats import t

    return float(t.isf(failure_rate / 2, df)) * stderr
