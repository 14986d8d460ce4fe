"""The only module that builds xarray objects: draws and fit summaries -> the object ``pm.sample`` returns."""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pymc as pm
import xarray as xr

from pymc_laplace import _compat
from pymc_laplace.compile.graphs import DataVariable, PosteriorVariable

SAMPLE_DIMS = ("chain", "draw")


def _auto_dims(name: str, ndim: int, dims: Sequence[str] | None) -> list[str]:
    if dims is not None and len(dims) == ndim:
        return list(dims)
    return [f"{name}_dim_{i}" for i in range(ndim)]


def _coords_for(dims: Sequence[str], shape: Sequence[int], coords: Mapping[str, Sequence[Any]]) -> dict:
    out = {}
    for dim, length in zip(dims, shape, strict=True):
        values = coords.get(dim)
        out[dim] = np.asarray(values) if values is not None and len(values) == length else np.arange(length)
    return out


def _dataset(
    arrays: Mapping[str, np.ndarray],
    dims: Mapping[str, Sequence[str] | None],
    coords: Mapping[str, Sequence[Any]],
    leading: Sequence[str] = (),
    attrs: Mapping[str, Any] | None = None,
) -> xr.Dataset:
    data_vars, all_coords = {}, {}
    for name, array in arrays.items():
        array = np.asarray(array)
        var_dims = list(leading) + _auto_dims(name, array.ndim - len(leading), dims.get(name))
        all_coords.update(_coords_for(var_dims, array.shape, {**coords, **{d: None for d in leading}}))
        data_vars[name] = (var_dims, array)
    return xr.Dataset(data_vars, coords=all_coords, attrs=dict(attrs or {}))


def _base_attrs() -> dict[str, Any]:
    import pymc_laplace

    return {
        "created_at": datetime.datetime.now(datetime.UTC).isoformat(),
        "inference_library": "pymc_laplace",
        "inference_library_version": pymc_laplace.__version__,
        "pymc_version": pm.__version__,
    }


def build_result(
    *,
    posterior: Mapping[str, np.ndarray],
    posterior_variables: Sequence[PosteriorVariable],
    coords: Mapping[str, Sequence[Any]],
    sample_stats: Mapping[str, np.ndarray],
    fit_vectors: Mapping[str, np.ndarray],
    fit_matrices: Mapping[str, np.ndarray],
    fit_scalars: Mapping[str, float],
    labels: Sequence[str],
    optimizer: Mapping[str, Any],
    observed_data: Sequence[DataVariable],
    constant_data: Sequence[DataVariable],
    attrs: Mapping[str, Any],
    log_likelihood: Mapping[str, np.ndarray] | None = None,
    log_likelihood_variables: Sequence[PosteriorVariable] = (),
    unconstrained_posterior: Mapping[str, np.ndarray] | None = None,
    unconstrained_dims: Mapping[str, Sequence[str] | None] | None = None,
    extra_fit: Mapping[str, tuple[tuple[str, ...], np.ndarray, Sequence[str]]] | None = None,
) -> Any:
    """Assemble the result groups.

    ``posterior`` values have leading ``(chain, draw)`` axes; ``sample_stats`` arrays are ``(chain, draw)``;
    ``fit_vectors`` are over ``rows`` and ``fit_matrices`` over ``(rows, columns)``, both labelled by ``labels``;
    ``extra_fit`` maps a name to ``(dims, values, labels of the single dim)``. ``log_likelihood`` (the elementwise
    log likelihood of each observed variable, dims from ``log_likelihood_variables``) and
    ``unconstrained_posterior`` (the draws of each value variable, pymc-extras' layout) have leading
    ``(chain, draw)`` axes and make groups of those names when given.
    """
    attrs = {**_base_attrs(), **dict(attrs)}
    posterior_dims = {v.name: v.dims for v in posterior_variables}
    groups: dict[str, xr.Dataset] = {
        "posterior": _dataset(posterior, posterior_dims, coords, SAMPLE_DIMS, attrs),
        "sample_stats": _dataset(sample_stats, {}, coords, SAMPLE_DIMS, attrs),
    }
    labels = list(labels)
    fit = xr.Dataset(
        {
            **{name: (["rows"], np.asarray(v)) for name, v in fit_vectors.items()},
            **{name: (["rows", "columns"], np.asarray(v)) for name, v in fit_matrices.items()},
            **{name: ((), float(v)) for name, v in fit_scalars.items()},
        },
        coords={"rows": labels, "columns": labels},
        attrs=attrs,
    )
    for name, (dims, values, dim_labels) in dict(extra_fit or {}).items():
        fit[name] = xr.DataArray(np.asarray(values), dims=dims, coords={dims[0]: list(dim_labels)})
    groups["fit"] = fit
    groups["optimizer_result"] = xr.Dataset({k: ((), v) for k, v in optimizer.items()}, attrs=attrs)
    for group, variables in (("observed_data", observed_data), ("constant_data", constant_data)):
        if variables:
            groups[group] = _dataset(
                {v.name: v.values for v in variables}, {v.name: v.dims for v in variables}, coords, (), attrs
            )
    if log_likelihood is not None:
        log_likelihood_dims = {v.name: v.dims for v in log_likelihood_variables}
        groups["log_likelihood"] = _dataset(log_likelihood, log_likelihood_dims, coords, SAMPLE_DIMS, attrs)
    if unconstrained_posterior is not None:
        groups["unconstrained_posterior"] = _dataset(
            unconstrained_posterior, dict(unconstrained_dims or {}), coords, SAMPLE_DIMS, attrs
        )
    return _compat.make_result(groups)


def posterior_attrs(result: Any) -> dict[str, Any]:
    """The attrs of the posterior group, where fits record their settings and diagnostics."""
    return dict(_compat.get_group(result, "posterior").attrs)


def resample_posterior(result: Any, flat_indices: np.ndarray, extra_attrs: Mapping[str, Any]) -> Any:
    """A copy of ``result`` whose posterior and sample_stats hold the draws at ``flat_indices``.

    ``flat_indices`` index the draws flattened over ``(chain, draw)``; the result keeps the original
    ``(chain, draw)`` shape.
    """
    posterior = _compat.get_group(result, "posterior")
    n_chain, n_draw = posterior.sizes["chain"], posterior.sizes["draw"]
    chain_idx = xr.DataArray((flat_indices // n_draw).reshape(n_chain, n_draw), dims=SAMPLE_DIMS)
    draw_idx = xr.DataArray((flat_indices % n_draw).reshape(n_chain, n_draw), dims=SAMPLE_DIMS)
    groups = {}
    for name in _compat.group_names(result):
        ds = _compat.get_group(result, name)
        if name in ("posterior", "sample_stats", "log_likelihood") and "chain" in ds.dims:
            original = ds.coords
            ds = ds.isel(chain=chain_idx, draw=draw_idx).assign_coords(
                chain=original["chain"].values, draw=original["draw"].values
            )
        ds = ds.copy()
        ds.attrs = {**ds.attrs, **dict(extra_attrs)}
        groups[name] = ds
    return _compat.make_result(groups)
