"""The result has the structure of pm.sample's for the same model, on the installed PyMC line."""

from __future__ import annotations

import numpy as np
import pymc as pm
import pytest

from pymc_laplace import fit_laplace
from pymc_laplace._compat import RETURNS_DATATREE, get_group, group_names


@pytest.fixture(scope="module")
def structured_model():
    """Vector and scalar variables, a transformed variable, data containers, coords, a Deterministic."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=40)
    group = np.repeat(np.arange(4), 10)
    y = 1.0 + 0.5 * x + rng.normal(size=4)[group] * 0.3 + rng.normal(size=40) * 0.4
    coords = {"group": ["g1", "g2", "g3", "g4"], "obs": np.arange(40)}
    with pm.Model(coords=coords) as model:
        x_data = pm.Data("x", x, dims="obs")
        group_idx = pm.Data("group_idx", group, dims="obs")
        intercept = pm.Normal("intercept", 0.0, 5.0)
        slope = pm.Normal("slope", 0.0, 5.0)
        offset = pm.Normal("offset", 0.0, 1.0, dims="group")
        sigma = pm.HalfNormal("sigma", 1.0)
        mu = pm.Deterministic("mu", intercept + slope * x_data + offset[group_idx], dims="obs")
        pm.Deterministic("group_means", intercept + offset, dims="group")
        pm.Normal("y", mu, sigma, observed=y, dims="obs")
    return model


@pytest.fixture(scope="module")
def laplace_result(structured_model):
    return fit_laplace(
        structured_model, draws=100, chains=2, random_seed=1, progressbar=False, idata_kwargs={"log_likelihood": True}
    )


@pytest.fixture(scope="module")
def nuts_result(structured_model):
    with structured_model:
        return pm.sample(
            draws=30, tune=30, chains=2, cores=1, random_seed=1, progressbar=False, compute_convergence_checks=False
        )


def _layout(ds):
    return {name: (ds[name].dims, ds[name].shape) for name in ds.data_vars}


def test_same_type_as_pm_sample(laplace_result, nuts_result):
    assert type(laplace_result) is type(nuts_result)
    if RETURNS_DATATREE:
        import xarray as xr

        assert isinstance(laplace_result, xr.DataTree)
    else:
        import arviz as az

        assert isinstance(laplace_result, az.InferenceData)


@pytest.mark.parametrize("group", ["posterior", "observed_data", "constant_data"])
def test_groups_match_pm_sample(laplace_result, nuts_result, group):
    ours, theirs = get_group(laplace_result, group), get_group(nuts_result, group)
    ours_layout = _layout(ours)
    theirs_layout = _layout(theirs)
    if group == "posterior":  # same dims; only the number of draws differs
        theirs_layout = {k: (d, (2, 100, *s[2:])) for k, (d, s) in theirs_layout.items()}
    assert ours_layout == theirs_layout
    for dim in ours.dims:
        if dim not in ("chain", "draw"):
            np.testing.assert_array_equal(ours[dim].values, theirs[dim].values)


def test_extra_groups_and_labels(laplace_result):
    names = set(group_names(laplace_result))
    assert {"posterior", "sample_stats", "fit", "optimizer_result", "observed_data", "constant_data"} <= names
    assert "log_likelihood" in names
    stats_group = get_group(laplace_result, "sample_stats")
    assert stats_group["log_p"].dims == ("chain", "draw") and stats_group["log_q"].dims == ("chain", "draw")
    fit = get_group(laplace_result, "fit")
    assert list(fit["rows"].values) == [
        "intercept", "slope", "offset[g1]", "offset[g2]", "offset[g3]", "offset[g4]", "sigma_log__"
    ]  # fmt: skip
    assert fit["covariance_matrix"].dims == ("rows", "columns")
    opt = get_group(laplace_result, "optimizer_result")
    assert bool(opt["success"]) and float(opt["grad_norm"]) <= 1e-8


def test_log_likelihood_matches_pymc(laplace_result, structured_model):
    """The log_likelihood group holds PyMC's pointwise log density at each draw."""
    posterior = get_group(laplace_result, "posterior")
    loglik = get_group(laplace_result, "log_likelihood")["y"]
    point = {
        "intercept": posterior["intercept"].values[0, 0],
        "slope": posterior["slope"].values[0, 0],
        "offset": posterior["offset"].values[0, 0],
        "sigma_log__": np.log(posterior["sigma"].values[0, 0]),
    }
    fn = structured_model.compile_fn(
        structured_model.logp(vars=[structured_model["y"]], sum=False)[0], inputs=structured_model.value_vars
    )
    np.testing.assert_allclose(loglik.values[0, 0], fn(point), rtol=1e-10)


def test_deterministics_are_consistent(laplace_result):
    posterior = get_group(laplace_result, "posterior")
    np.testing.assert_allclose(
        posterior["group_means"].values, posterior["intercept"].values[..., None] + posterior["offset"].values
    )
    assert np.all(posterior["sigma"].values > 0)


def test_posterior_predictive_runs_on_the_result(laplace_result, structured_model):
    with structured_model:
        ppc = pm.sample_posterior_predictive(laplace_result, random_seed=2, progressbar=False)
    y_pred = get_group(ppc, "posterior_predictive")["y"]
    assert y_pred.dims == ("chain", "draw", "obs") and y_pred.shape == (2, 100, 40)
    assert np.isfinite(y_pred.values).all()
