"""The simulation check of the Laplace approximation (TMB's checkConsistency).

Where Laplace is exact (Gaussian random effects and data) the gradient of the marginal at the estimate averages
zero over data simulated there; with two binary answers per group and a large spread between groups it does not,
and Laplace's estimate of the spread is biased towards zero, as the literature on binary GLMMs reports (Breslow and
Lin 1995; Joe 2008).
"""

from __future__ import annotations

import numpy as np
import pymc as pm
import pytest
from test_sampling import gaussian_model

from pymc_laplace import ModelSpecificationError, fit_integrated_laplace, fit_laplace
from pymc_laplace.compile.graphs import observed_as_data
from pymc_laplace.report.consistency import check_consistency

SIGNIFICANCE_FOR_TEST = 0.01


def test_where_laplace_is_exact_the_gradient_averages_zero():
    model = gaussian_model()
    result = fit_integrated_laplace(model, random=["u"], draws=10, chains=1, progressbar=False, random_seed=1)
    check = check_consistency(result, model, n_simulations=100, random_seed=3, progressbar=False)
    assert check.n_simulations == 100 and check.failed == 0
    assert check.p_value > SIGNIFICANCE_FOR_TEST
    assert np.all(np.abs(check.bias_in_se) < 0.4)
    assert check.advice.startswith("Consistent")
    assert list(check.table().index) == ["mu", "tau_log__", "sigma_log__"]
    # the gradients vary from data set to data set: each simulation was really evaluated on its own data
    assert np.all(np.diag(check.gradient_covariance) > 0.1)


def test_small_binary_groups_show_the_bias_of_laplace():
    rng = np.random.default_rng(3)
    groups = np.repeat(np.arange(60), 2)
    y = rng.binomial(1, 1.0 / (1.0 + np.exp(-rng.normal(0.0, 3.0, 60)[groups])))
    with pm.Model() as model:
        a = pm.Normal("a", 0.0, 10.0)
        sigma = pm.HalfNormal("sigma", 5.0)
        u = pm.Normal("u", 0.0, sigma, shape=60)
        pm.Bernoulli("y", logit_p=a + u[groups], observed=y)
    with pytest.warns(UserWarning):  # the default AGHQ check already warns about this fit
        result = fit_integrated_laplace(model, random=["u"], draws=10, chains=1, progressbar=False, random_seed=1)
    check = check_consistency(result, model, n_simulations=100, random_seed=4, progressbar=False)
    assert check.p_value < 1e-6
    assert check.bias[1] < 0 and check.bias_in_se[1] < -0.3  # the SD of the groups is underestimated
    assert "biases the estimates, most for sigma_log__" in check.advice


def test_observed_values_become_data_containers_of_a_copy():
    model = gaussian_model()
    copy, containers = observed_as_data(model)
    assert set(containers) == {"y"}
    np.testing.assert_array_equal(containers["y"].get_value(), model.rvs_to_values[model["y"]].data)
    assert {rv.name for rv in copy.free_RVs} == {rv.name for rv in model.free_RVs}
    point = model.initial_point()
    assert copy.compile_logp()(point) == pytest.approx(model.compile_logp()(point))


def test_consistency_arguments_are_checked():
    model = gaussian_model()
    result = fit_integrated_laplace(model, random=["u"], draws=10, chains=1, progressbar=False, random_seed=1)
    with pytest.raises(ModelSpecificationError, match="at least 5"):
        check_consistency(result, model, n_simulations=3, progressbar=False)
    with pm.Model() as other:
        pm.Normal("z", 0.0, 1.0)
    laplace_fit = fit_laplace(other, draws=10, chains=1, progressbar=False)
    with pytest.raises(ModelSpecificationError, match="fit_integrated_laplace"):
        check_consistency(laplace_fit, other, progressbar=False)
