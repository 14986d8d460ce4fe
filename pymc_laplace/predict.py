"""Predictions for new data from a fit, with standard errors from its joint draws of parameters and random effects."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import pymc as pm
import xarray as xr

from pymc_laplace._compat import get_group
from pymc_laplace.compile.graphs import element_labels
from pymc_laplace.errors import ModelSpecificationError
from pymc_laplace.formulas import is_bambi_model


def predict(
    result: Any,
    *,
    model: pm.Model | Any | None = None,
    var_names: Sequence[str] | str | None = None,
    new_data: Mapping[str, Any] | pd.DataFrame | None = None,
    coords: Mapping[str, Sequence[Any]] | None = None,
    random_effects: bool = True,
    level: float = 0.95,
    random_seed: int | None = None,
    return_draws: bool = False,
) -> pd.DataFrame | dict[str, np.ndarray]:
    """Predict model quantities (a linear predictor, a mean) for new data, with standard errors and intervals.

    The quantity is evaluated at every draw of the fit (``theta`` from its Gaussian, the random effects from
    their conditional Gaussian given it), so its standard error includes the uncertainty of the parameters and of
    the random effects, as glmmTMB's ``predict(se.fit = TRUE)`` does by the delta method. On a linear predictor the
    two agree up to the Monte Carlo error of the draws (about ``1 / sqrt(2 * draws)`` relative).

    Parameters
    ----------
    result : InferenceData or DataTree
        Of ``fit_integrated_laplace`` or ``fit_laplace``.
    model : pm.Model or bambi.Model, optional
        The model that was fitted (from the context when not given). For a PyMC model the data go through
        ``pm.set_data`` (so the predictors must be ``pm.Data`` containers) and are set back afterwards. For a bambi
        model this is bambi's ``model.predict(kind="response_params")``: new group levels are drawn from their
        fitted distribution (glmmTMB's ``allow.new.levels = TRUE``).
    var_names : str or sequence of str, optional
        Deterministics (or other variables computed from the free variables) to predict. For a bambi model, by
        default the parameter of the response bambi reports (``"mu"``, ``"p"``).
    new_data : mapping or pandas.DataFrame, optional
        New values of the data containers (PyMC), or a data frame with the formula's columns (bambi); by default
        the data fitted.
    coords : mapping, optional
        New coordinates for dimensions whose length changes with ``new_data`` (PyMC models).
    random_effects : bool
        Include the random effects (``re.form = NULL``) or set them to zero (``re.form = NA``): the prediction
        for a typical group.
    level : float
        Coverage of the equal-tailed intervals of the draws.
    random_seed : int, optional
    return_draws : bool
        Return the draws themselves, ``{name: array (chain, draw, *shape)}``, instead of the table.

    Returns
    -------
    pandas.DataFrame
        One row per element of each variable (label as in the posterior), columns ``estimate`` (the value at the
        estimated parameters and the modes of the random effects: glmmTMB's ``fit``; NaN for bambi models, whose
        ``predict`` reads draws only), ``mean`` and ``std_error`` (the mean and standard deviation of the draws),
        ``ci_lower``, ``ci_upper`` (their quantiles).
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"`level` must be in (0, 1), not {level!r}.")
    if isinstance(var_names, str):
        var_names = [var_names]
    posterior = get_group(result, "posterior")
    if model is not None and is_bambi_model(model):
        draws = _bambi_draws(result, model, var_names, new_data, random_effects, random_seed)
        modes = {name: np.full(values.shape[2:], np.nan) for name, values in draws.items()}
        dims: dict[str, Sequence[str]] = {}
        all_coords: dict[str, Any] = {}
    else:
        model = pm.modelcontext(model)
        if not var_names:
            raise ModelSpecificationError(
                "`var_names` is missing: name the Deterministics to predict (e.g. the linear predictor or the mean)."
            )
        draws, modes = _pymc_draws(
            result, posterior, model, list(var_names), new_data, coords, random_effects, random_seed
        )
        dims = {name: model.named_vars_to_dims.get(name) or () for name in draws}
        all_coords = {name: list(values) for name, values in model.coords.items() if values is not None}
    if return_draws:
        return draws
    rows = []
    lower_q, upper_q = 0.5 - level / 2.0, 0.5 + level / 2.0
    for name, values in draws.items():
        flat = values.reshape(values.shape[0] * values.shape[1], -1)
        labels = element_labels(name, values.shape[2:], dims.get(name), all_coords)
        lower, upper = np.quantile(flat, [lower_q, upper_q], axis=0)
        estimate = np.ravel(modes[name])
        rows += list(zip(labels, estimate, flat.mean(axis=0), flat.std(axis=0, ddof=1), lower, upper, strict=True))
    columns = ["label", "estimate", "mean", "std_error", "ci_lower", "ci_upper"]
    return pd.DataFrame(rows, columns=columns).set_index("label")


def _pymc_draws(
    result: Any,
    posterior: xr.Dataset,
    model: pm.Model,
    var_names: list[str],
    new_data: Mapping[str, Any] | None,
    coords: Mapping[str, Sequence[Any]] | None,
    random_effects: bool,
    random_seed: int | None,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Draws of ``var_names`` at every posterior draw, and their values at the estimate."""
    unknown = [name for name in var_names if name not in model.named_vars]
    if unknown:
        raise ModelSpecificationError(f"`var_names` names {unknown}, not variables of the model.")
    free = {rv.name for rv in model.free_RVs}
    chosen = [name for name in var_names if name in free]
    if chosen:
        raise ModelSpecificationError(
            f"{chosen} are free variables: their draws are in the posterior already; predict computes quantities "
            "of the data (Deterministics)."
        )
    trace = posterior.drop_vars([name for name in var_names if name in posterior])
    if not random_effects:
        attrs = dict(posterior.attrs)
        if "random" not in attrs:
            raise ModelSpecificationError(
                "random_effects=False sets the integrated random effects to zero: this result is not of "
                "fit_integrated_laplace."
            )
        by_value = {model.rvs_to_values[rv].name: rv for rv in model.free_RVs}
        for value_name in attrs["random"]:
            rv = by_value[value_name]
            if model.rvs_to_transforms.get(rv) is not None:
                raise ModelSpecificationError(
                    f"random_effects=False would set {rv.name!r} to zero, but it has a transform (its zero is not "
                    "'no effect'); predict a Deterministic that leaves it out instead."
                )
            trace[rv.name] = xr.zeros_like(trace[rv.name])
    data_names = list(new_data or {})
    missing = [name for name in data_names if name not in model.named_vars]
    if missing:
        raise ModelSpecificationError(f"`new_data` names {missing}, not data containers of the model.")
    previous = {name: model[name].get_value() for name in data_names}
    changed_dims = set(coords or {})
    previous_coords = {dim: model.coords[dim] for dim in changed_dims if dim in model.coords}
    mode_trace = _mode_trace(result, posterior, model, random_effects)
    traces = {"draws": trace, "mode": mode_trace.drop_vars([n for n in var_names if n in mode_trace])}
    computed = {}
    logger = logging.getLogger("pymc")
    level_before = logger.level
    logger.setLevel(logging.WARNING)  # not pymc's "Sampling: []": nothing random is drawn here
    with model:
        try:
            if new_data:
                pm.set_data(dict(new_data), coords=dict(coords or {}) or None)
            for kind, each in traces.items():
                computed[kind] = pm.sample_posterior_predictive(
                    each,
                    var_names=var_names,
                    predictions=True,
                    progressbar=False,
                    random_seed=random_seed,
                    return_inferencedata=False,
                )
        finally:
            logger.setLevel(level_before)
            if new_data:
                pm.set_data(previous, coords=previous_coords or None)
    draws = {name: np.asarray(computed["draws"][name]) for name in var_names}
    modes = {name: np.asarray(computed["mode"][name])[0, 0] for name in var_names}
    return draws, modes


def _mode_trace(result: Any, posterior: xr.Dataset, model: pm.Model, random_effects: bool) -> xr.Dataset:
    """A one-draw trace at the estimate: ``theta^`` and the modes of the random effects (zero without them)."""
    fit = get_group(result, "fit")
    attrs = dict(posterior.attrs)
    random = list(attrs.get("random", []))
    start = model.initial_point()
    outer = np.asarray(fit["mean_vector"].values, dtype=float)
    inner = np.asarray(fit["random_effects"].values, dtype=float) if random else np.zeros(0)
    point, taken = {}, {"outer": 0, "inner": 0}
    for value_name, value in start.items():
        part, source = ("inner", inner) if value_name in random else ("outer", outer)
        size = int(np.size(value))
        point[value_name] = source[taken[part] : taken[part] + size].reshape(np.shape(value))
        taken[part] += size
    if taken["outer"] != outer.size or taken["inner"] != inner.size:
        raise ModelSpecificationError(
            "The model's free variables do not match the result's parameters: pass the model that was fitted."
        )
    if not random_effects:
        point |= {name: np.zeros_like(point[name]) for name in random}
    constrained = model.compile_fn(
        model.replace_rvs_by_values(model.free_RVs), inputs=model.value_vars, point_fn=True, mode="FAST_COMPILE"
    )(point)
    return xr.Dataset(
        {
            rv.name: (("chain", "draw", *posterior[rv.name].dims[2:]), np.asarray(value)[None, None])
            for rv, value in zip(model.free_RVs, constrained, strict=True)
        },
        coords={name: posterior.coords[name] for name in posterior.coords if name not in ("chain", "draw")},
    ).assign_coords(chain=[0], draw=[0])


def _bambi_draws(
    result: Any,
    bambi_model: Any,
    var_names: Sequence[str] | None,
    new_data: pd.DataFrame | None,
    random_effects: bool,
    random_seed: int | None,
) -> dict[str, np.ndarray]:
    if not bambi_model.built:
        bambi_model.build()
    predicted = bambi_model.predict(
        result,
        kind="response_params",
        data=new_data,
        inplace=False,
        include_group_specific=random_effects,
        sample_new_groups=True,
        random_seed=random_seed,
    )
    posterior = get_group(predicted, "posterior")
    names = list(var_names) if var_names else [bambi_model.family.likelihood.parent]
    unknown = [name for name in names if name not in posterior]
    if unknown:
        raise ModelSpecificationError(f"bambi's prediction has no {unknown}; it has {sorted(posterior.data_vars)}.")
    return {name: np.asarray(posterior[name].values) for name in names}
