"""Shared fixtures: data from ../shared (read-only), models compiled once per session."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

warnings.filterwarnings("ignore", category=FutureWarning)

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PYMC_LAPLACE_SHARED", ROOT.parent / "shared"))


def shared_path(*parts: str) -> Path:
    """A file under ../shared; the tests compare against its independent reference values."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.fail(f"{path} is missing: the tests need the read-only ../shared folder (or PYMC_LAPLACE_SHARED)")
    return path


@pytest.fixture(scope="session")
def bioassay_data() -> dict[str, np.ndarray]:
    data = np.genfromtxt(shared_path("data", "bioassay.csv"), delimiter=",", names=True)
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
