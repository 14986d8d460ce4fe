"""Shared fixtures: data shipped with the repository, models compiled once per session."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

warnings.filterwarnings("ignore", category=FutureWarning)


@pytest.fixture(scope="session", autouse=True)
def fresh_function_cache(tmp_path_factory):
    """Compiled functions kept on disk go to a directory of this session: what earlier runs kept is not loaded, so
    each test compiles what it counts on compiling."""
    import os

    directory = tmp_path_factory.mktemp("compiled-functions")
    previous = os.environ.get("PYMC_LAPLACE_CACHE_DIR")
    os.environ["PYMC_LAPLACE_CACHE_DIR"] = str(directory)
    yield directory
    if previous is None:
        os.environ.pop("PYMC_LAPLACE_CACHE_DIR", None)
    else:
        os.environ["PYMC_LAPLACE_CACHE_DIR"] = previous


ROOT = Path(__file__).resolve().parents[1]
# the data the tests read ship with the repository: examples/data (also used by the examples) and tests/data
DATA_DIRS = (ROOT / "examples" / "data", ROOT / "tests" / "data")


def data_path(name: str) -> Path:
    """A data file shipped with the repository (its provenance: examples/data/README.md, tests/data/README.md)."""
    for folder in DATA_DIRS:
        if (folder / name).exists():
            return folder / name
    pytest.fail(f"{name} is missing from {[str(d) for d in DATA_DIRS]}")


@pytest.fixture
def compile_count(monkeypatch):
    """Number of pytensor functions compiled since the fixture was made (loads from disk are not counted)."""
    import pymc_laplace.compile.graphs

    calls = []
    original = pymc_laplace.compile.graphs.compile_graph

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(pymc_laplace.compile.graphs, "compile_graph", counted)
    return calls


@pytest.fixture(scope="session")
def bioassay_data() -> dict[str, np.ndarray]:
    data = np.genfromtxt(data_path("bioassay.csv"), delimiter=",", names=True)
    return {"x": data["x"], "n": data["n"].astype(int), "y": data["y"].astype(int)}


sys.path.insert(0, str(ROOT / "examples"))


@pytest.fixture(scope="session")
def mixed_marginal():
    """``name -> (model, random, compiled marginal)`` for the real mixed models, each compiled once a session."""
    import mixed_models

    from pymc_laplace import marginal

    cache: dict[str, tuple] = {}

    def get(name: str) -> tuple:
        if name not in cache:
            model, random = mixed_models.BUILDERS[name]()
            with warnings.catch_warnings():
                warnings.filterwarnings("error", message="Hessian pattern")  # no op falls back on these models
                cache[name] = (model, random, marginal(model, random=random))
        return cache[name]

    return get


@pytest.fixture(scope="session")
def cbpp_full_nuts(mixed_marginal):
    """NUTS on the full cbpp model (random effects sampled): the reference of the Bayesian integrated fits."""
    import pymc as pm

    model, _, _ = mixed_marginal("cbpp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pm.sample(
            draws=1000, tune=1000, chains=2, random_seed=12, progressbar=False, model=model, target_accept=0.95
        )
