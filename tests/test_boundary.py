"""Boundary and degenerate fits are reported, not crashed; the inner mode does not depend on the warm start.

Exact answers: a Poisson random intercept whose between-group variance is estimated at zero is the Poisson GLM
``y ~ 1``, whose maximum-likelihood intercept is ``log(mean(y))`` with standard error ``1 / sqrt(sum(y))``.
"""

from __future__ import annotations

import numpy as np
import pymc as pm
import pytensor.tensor as pt
import pytest
from dense_oracle import DenseLaplace
from scipy import stats

from pymc_laplace import (
    BoundaryFitWarning,
    HessianNotPositiveDefiniteError,
    HessianNotPositiveDefiniteWarning,
    InnerNewton,
    ModelSpecificationError,
    fit_integrated_laplace,
    marginal,
    summary,
)
from pymc_laplace._compat import get_group


def _poisson_intercepts(seed: int) -> tuple[pm.Model, np.ndarray]:
    rng = np.random.default_rng(seed)
    group = np.repeat(np.arange(8), 6)
    y = rng.poisson(3.0, size=group.size)  # no group effect at all
    with pm.Model() as model:
        b0 = pm.Normal("b0", 0.0, 10.0)
        sigma = pm.HalfNormal("sigma", 1.0)
        u = pm.Normal("u", 0.0, sigma, shape=8)
        pm.Poisson("y", pt.exp(b0 + u[group]), observed=y)
    return model, y


@pytest.fixture(scope="module")
def boundary_fit():
    model, y = _poisson_intercepts(seed=1)
    with pytest.warns(BoundaryFitWarning, match=r"boundary \(singular\) fit: .* along \['-?1\.000 \* sigma_log__'\]"):
        result = fit_integrated_laplace(model, random=["u"], draws=50, chains=2, random_seed=3, progressbar=False)
    return result, y


def test_variance_at_zero_is_the_glm(boundary_fit):
    result, y = boundary_fit
    table = summary(result)
    assert table.loc["b0"].iloc[0]["estimate"] == pytest.approx(np.log(y.mean()), abs=1e-6)
    assert table.loc["b0"].iloc[0]["std_error"] == pytest.approx(1.0 / np.sqrt(y.sum()), rel=1e-4)
    fit = get_group(result, "fit")
    glm_loglik = stats.poisson.logpmf(y, y.mean()).sum()
    assert float(fit["log_marginal_likelihood"]) == pytest.approx(glm_loglik, abs=1e-6)


def test_boundary_parameter_is_named_and_held_fixed(boundary_fit):
    result, _ = boundary_fit
    table = summary(result)
    assert np.isnan(table.loc["sigma_log__"]["std_error"])
    assert np.isnan(table[table["scale"] == "natural"].loc["sigma"]["std_error"])
    assert table.loc["sigma_log__"]["estimate"] < -8
    posterior = get_group(result, "posterior")
    assert [str(d) for d in np.atleast_1d(posterior.attrs["boundary"])] in (
        ["-1.000 * sigma_log__"],
        ["1.000 * sigma_log__"],
    )
    sigma_draws = posterior["sigma"].values
    np.testing.assert_allclose(sigma_draws, sigma_draws.flat[0], rtol=1e-9)  # held: never drawn far out
    assert np.all(np.isfinite(posterior["u"].values)) and np.all(np.isfinite(posterior["b0"].values))


def test_interior_fit_has_no_boundary_warning():
    model, _ = _poisson_intercepts(seed=0)  # a small but positive variance estimate
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", BoundaryFitWarning)
        result = fit_integrated_laplace(model, random=["u"], draws=10, chains=1, random_seed=3, progressbar=False)
    assert np.isfinite(summary(result).loc["sigma_log__", "std_error"])


def test_inner_mode_does_not_depend_on_the_warm_start():
    """Separated groups with a large variance: flat directions where a small gradient is not yet the mode."""
    rng = np.random.default_rng(2)
    group = np.repeat(np.arange(30), 4)
    y = (rng.random(group.size) < 0.5).astype(int)
    y[:20], y[20:32] = 1, 0
    with pm.Model() as model:
        b0 = pm.Normal("b0", 0.0, 10.0)
        sigma = pm.HalfNormal("sigma", 1.0)
        u = pm.Normal("u", 0.0, sigma, shape=30)
        pm.Bernoulli("y", logit_p=b0 + u[group], observed=y)
    target = {"b0": np.array(0.2), "sigma_log__": np.array(np.log(50.0))}
    expected = DenseLaplace(model, ["u"]).log_marginal(target)
    cold = marginal(model, random=["u"])
    warm = marginal(model, random=["u"], inner=InnerNewton(gtol=1e-9, xtol=1e-8))
    warm.logp({"b0": np.array(-1.0), "sigma_log__": np.array(np.log(0.1))})
    warm.logp({"b0": np.array(0.2), "sigma_log__": np.array(np.log(5.0))})
    assert cold.logp(target) == pytest.approx(expected, abs=1e-8)
    assert warm.logp(target) == pytest.approx(expected, abs=1e-8)


def test_non_positive_definite_hessian_returns_estimates_when_asked():
    """y ~ Poisson(exp(a + b + u[g])) identifies only a + b: the default raises, 'warn' returns the estimates with
    NaN SEs for a and b and the exact SE of the scale (that of the identified model, fitted with b left out)."""
    rng = np.random.default_rng(7)
    group = np.repeat(np.arange(10), 8)
    y = rng.poisson(np.exp(0.4 + rng.normal(0.0, 0.5, 10)[group]))

    def build(two_intercepts: bool) -> pm.Model:
        with pm.Model() as model:
            a = pm.Flat("a")
            b = pm.Flat("b") if two_intercepts else 0.0
            tau = pm.HalfNormal("tau", 1.0)
            u = pm.Normal("u", 0.0, tau, shape=10)
            pm.Poisson("y", pm.math.exp(a + b + u[group]), observed=y)
        return model

    model = build(True)
    with pytest.raises(HessianNotPositiveDefiniteError):
        fit_integrated_laplace(model, random=["u"], draws=50, chains=1, progressbar=False, random_seed=1)
    with pytest.warns(HessianNotPositiveDefiniteWarning, match="pdHess"):
        result = fit_integrated_laplace(
            model, random=["u"], draws=50, chains=1, progressbar=False, random_seed=1, non_positive_definite="warn"
        )
    identified = fit_integrated_laplace(build(False), random=["u"], draws=50, chains=1, progressbar=False)
    table, reference = (t[t["scale"] == "unconstrained"] for t in (summary(result), summary(identified)))
    assert np.isnan(table.loc["a", "std_error"]) and np.isnan(table.loc["b", "std_error"])
    assert table.loc["a", "estimate"] + table.loc["b", "estimate"] == pytest.approx(
        reference.loc["a", "estimate"], abs=1e-5
    )
    assert table.loc["tau_log__", "std_error"] == pytest.approx(reference.loc["tau_log__", "std_error"], rel=1e-3)
    posterior = get_group(result, "posterior")
    assert np.ptp(posterior["a"].values + posterior["b"].values) > 0  # the identified sum is drawn
    assert np.ptp(posterior["a"].values - posterior["b"].values) < 1e-8  # the flat difference is not
    assert get_group(result, "posterior").attrs["not_positive_definite"]


def test_unknown_non_positive_definite_option_is_refused():
    with pm.Model() as model:
        tau = pm.HalfNormal("tau", 1.0)
        u = pm.Normal("u", 0.0, tau, shape=3)
        pm.Normal("y", u, 1.0, observed=[0.1, 0.2, 0.3])
    with pytest.raises(ModelSpecificationError, match="non_positive_definite"):
        fit_integrated_laplace(model, random=["u"], non_positive_definite="ignore", progressbar=False)
