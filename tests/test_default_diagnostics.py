"""Diagnostics on by default: k-hat of p/q on every fit, the log_likelihood group for az.loo, and pymc-extras'
unconstrained_posterior group and mode-only call."""

from __future__ import annotations

import warnings

import arviz as az
import numpy as np
import pymc as pm
import pytest
import scipy.stats

from pymc_laplace import ApproximationWarning, fit_integrated_laplace, fit_laplace
from pymc_laplace._compat import get_group, group_names
from pymc_laplace.report.diagnostics import check_approximation

Y = np.array([0.3, -0.1, 0.5, 1.2, 0.8])
Z = np.random.default_rng(0).normal(0.0, 2.0, 400)


@pytest.fixture(scope="module")
def normal_model() -> pm.Model:
    """mu ~ N(0, 10), y ~ N(mu, 1): mu's posterior is Gaussian; log sigma's nearly so with 400 observations."""
    with pm.Model(coords={"obs": np.arange(Y.size)}) as model:
        mu = pm.Normal("mu", 0.0, 10.0)
        sigma = pm.HalfNormal("sigma", 5.0)
        pm.Normal("y", mu, 1.0, observed=Y, dims="obs")
        pm.Normal("z", 0.0, sigma, observed=Z)
    return model


@pytest.fixture(scope="module")
def normal_fit(normal_model):
    with warnings.catch_warnings():
        warnings.simplefilter("error", ApproximationWarning)
        return fit_laplace(normal_model, progressbar=False, random_seed=3, include_transformed=True)


def test_khat_of_every_fit_in_its_attrs(normal_fit):
    attrs = get_group(normal_fit, "posterior").attrs
    # the ratios p/q are nearly constant
    assert attrs["pareto_k"] < 0.5
    assert 3000 < attrs["importance_ess"] <= 4000


def test_log_likelihood_group_is_the_elementwise_density_of_each_draw(normal_fit):
    assert "log_likelihood" in group_names(normal_fit)
    log_lik = get_group(normal_fit, "log_likelihood")
    mu = get_group(normal_fit, "posterior")["mu"].values
    sigma = get_group(normal_fit, "posterior")["sigma"].values
    assert log_lik["y"].dims == ("chain", "draw", "obs")
    np.testing.assert_allclose(log_lik["y"].values, scipy.stats.norm.logpdf(Y, mu[..., None], 1.0), rtol=1e-10)
    np.testing.assert_allclose(log_lik["z"].values, scipy.stats.norm.logpdf(Z, 0.0, sigma[..., None]), rtol=1e-10)
    loo = az.loo(normal_fit, var_name="y")
    elpd = loo.elpd_loo if hasattr(loo, "elpd_loo") else loo.elpd  # arviz 0.x / 1.x
    assert np.isfinite(elpd) and elpd < 0


def test_unconstrained_posterior_is_the_value_variables(normal_fit):
    unconstrained = get_group(normal_fit, "unconstrained_posterior")
    posterior = get_group(normal_fit, "posterior")
    assert set(unconstrained.data_vars) == {"mu", "sigma_log__"}
    np.testing.assert_allclose(np.exp(unconstrained["sigma_log__"].values), posterior["sigma"].values, rtol=1e-12)
    np.testing.assert_array_equal(unconstrained["mu"].values, posterior["mu"].values)


def test_mode_only_is_the_analytic_mode(normal_model):
    result = fit_laplace(normal_model, progressbar=False, covariance=False)
    posterior, fit = get_group(result, "posterior"), get_group(result, "fit")
    assert posterior.sizes["chain"] == 1 and posterior.sizes["draw"] == 1
    assert "covariance_matrix" not in fit and "log_likelihood" not in group_names(result)
    # d/dmu: sum(y - mu) - mu / 100 = 0
    assert float(posterior["mu"].values.ravel()[0]) == pytest.approx(Y.sum() / (Y.size + 0.01), rel=1e-7)  # gtol 1e-8


def test_log_likelihood_left_out_when_asked(normal_model):
    result = fit_laplace(normal_model, progressbar=False, random_seed=1, idata_kwargs={"log_likelihood": False})
    assert "log_likelihood" not in group_names(result)


def test_a_gaussian_far_from_the_posterior_warns():
    with pm.Model() as model:
        pm.StudentT("x", nu=1.0, mu=0.0, sigma=1.0)  # a Cauchy: the Gaussian at its mode misses its tails
    with pytest.warns(ApproximationWarning, match="k-hat"):
        result = fit_laplace(model, progressbar=False, random_seed=1)
    assert get_group(result, "posterior").attrs["pareto_k"] > 0.7


def test_integrated_fit_has_khat_and_log_likelihood():
    rng = np.random.default_rng(4)
    group = np.repeat(np.arange(12), 6)
    y = rng.poisson(np.exp(0.5 + rng.normal(0.0, 0.6, 12)[group]))
    with pm.Model(coords={"g": np.arange(12)}) as model:
        beta = pm.Normal("beta", 0.0, 5.0)
        tau = pm.HalfNormal("tau", 1.0)
        u = pm.Normal("u", 0.0, tau, dims="g")
        pm.Poisson("y", pm.math.exp(beta + u[group]), observed=y)
    result = fit_integrated_laplace(model, random=["u"], progressbar=False, random_seed=2, draws=500, chains=2)
    attrs = get_group(result, "posterior").attrs
    assert 0.0 <= attrs["importance_ess"] <= 1000 and np.isfinite(attrs["pareto_k"])
    log_lik = get_group(result, "log_likelihood")["y"].values
    posterior = get_group(result, "posterior")
    eta = posterior["beta"].values[..., None] + posterior["u"].values[..., group]
    np.testing.assert_allclose(log_lik, scipy.stats.poisson.logpmf(y, np.exp(eta)), rtol=1e-9)


def test_too_few_draws_for_khat_record_nan_without_warning(normal_model):
    with warnings.catch_warnings():
        warnings.simplefilter("error", ApproximationWarning)
        result = fit_laplace(normal_model, progressbar=False, random_seed=1, draws=12, chains=2)
    assert np.isnan(get_group(result, "posterior").attrs["pareto_k"])


def test_invalid_log_densities_are_reported_not_smoothed():
    log_q = np.zeros(100)
    log_p = np.random.default_rng(0).normal(size=100)
    log_p[[3, 7]] = np.nan
    with pytest.warns(ApproximationWarning, match="2 of 100 draws"):
        checked = check_approximation(log_p, log_q, advice="")
    assert np.isnan(checked["pareto_k"]) and np.isnan(checked["importance_ess"])
