"""Differences between the two supported PyMC lines, in one place.

* pymc 5.x / pytensor 2.x / arviz 0.x: ``pm.sample`` returns ``arviz.InferenceData``.
* pymc 6.x / pytensor 3.x / arviz 1.x: ``pm.sample`` returns ``xarray.DataTree``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pymc as pm
import xarray as xr

PYMC_MAJOR = int(pm.__version__.split(".")[0])
RETURNS_DATATREE = PYMC_MAJOR >= 6

if RETURNS_DATATREE:
    InferenceResult = xr.DataTree
else:  # pragma: no cover - exercised on the pymc 5 line
    import arviz as az

    InferenceResult = az.InferenceData


def make_result(groups: Mapping[str, xr.Dataset]) -> Any:
    """Assemble named groups into the object ``pm.sample`` returns on the installed PyMC line."""
    if RETURNS_DATATREE:
        return xr.DataTree.from_dict(dict(groups))
    return az.InferenceData(**dict(groups))


def group_names(result: Any) -> list[str]:
    """Names of the groups of a result."""
    if RETURNS_DATATREE:
        return list(result.children)
    return list(result.groups())


def get_group(result: Any, name: str) -> xr.Dataset:
    """One group of a result (``InferenceData`` on PyMC 5, ``DataTree`` on PyMC 6) as an ``xarray.Dataset``.

    Examples
    --------
    >>> from pymc_laplace import get_group
    >>> # get_group(idata, "fit")["mean_vector"]
    """
    if RETURNS_DATATREE:
        return result[name].to_dataset()
    return result[name]
