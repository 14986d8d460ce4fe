"""Draws of fit_laplace: evaluated in batches or one at a time to the same values, in the layout's order."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pymc as pm
import pytest

from pymc_laplace import fit_laplace
from pymc_laplace._compat import get_group
from pymc_laplace.compile.graphs import PosteriorVariable
from pymc_laplace.laplace import DRAWS_PER_BATCH, evaluate_draws


def point_function(x: np.ndarray) -> list[Any]:
    """A log density with a support check (``x[0] < 3``) and two outputs: a vector and a scalar."""
    logp = -0.5 * float(x @ x) if x[0] < 3.0 else -np.inf
    return [logp, np.exp(x), x[0] - x[1]]


def batch_function(xs: np.ndarray) -> list[Any]:
    """As a vectorised graph evaluates the check: one condition over the whole batch."""
    logp = -0.5 * np.einsum("ij,ij->i", xs, xs)
    if np.any(xs[:, 0] >= 3.0):
        logp = np.full(xs.shape[0], -np.inf)
    return [logp, np.exp(xs), xs[:, 0] - xs[:, 1]]


def raising_batch(xs: np.ndarray) -> list[Any]:
    raise RuntimeError("this batch cannot be evaluated")


@dataclass(frozen=True)
class Compiled:
    logp_and_outputs: Any
    logp_and_outputs_batched: Any = None
    posterior_variables: tuple[PosteriorVariable, ...] = (PosteriorVariable("v", None), PosteriorVariable("d", None))


@pytest.fixture(scope="module")
def points() -> np.ndarray:
    """(chain, draw, 2) points, two of them outside the support, more draws than one batch holds."""
    x = np.random.default_rng(0).normal(size=(3, DRAWS_PER_BATCH, 2))
    x[0, 5, 0] = x[2, 7, 0] = 4.0
    return x


@pytest.mark.parametrize("batched", [batch_function, raising_batch], ids=["batched", "raising"])
def test_batches_give_the_values_of_single_draws(points, batched):
    expected, expected_logp = evaluate_draws(Compiled(point_function), points, progressbar=False)
    assert np.isneginf(expected_logp).sum() == 2
    values, logp = evaluate_draws(Compiled(point_function, batched), points, progressbar=False)
    np.testing.assert_allclose(logp, expected_logp, rtol=1e-14)
    assert values.keys() == expected.keys()
    assert values["v"].shape == (3, DRAWS_PER_BATCH, 2) and values["d"].shape == (3, DRAWS_PER_BATCH)
    for name in values:
        np.testing.assert_allclose(values[name], expected[name], rtol=1e-14)


def test_an_error_of_a_draw_is_raised_as_without_batches(points):
    def failing_point(x: np.ndarray) -> list[Any]:
        if x[0] >= 3.0:
            raise ValueError("a Deterministic's assertion fails here")
        return point_function(x)

    with pytest.raises(ValueError, match="assertion fails"):
        evaluate_draws(Compiled(failing_point, raising_batch), points, progressbar=False)


def test_vars_in_any_order_give_the_same_fit(bioassay_data):
    """``vars`` listed against the model's order: the draws of each variable stay under its own name."""
    with pm.Model() as model:
        alpha = pm.Normal("alpha", 0.0, 5.0)
        beta = pm.Normal("beta", 10.0, 10.0)
        pm.Binomial("y", n=bioassay_data["n"], logit_p=alpha + beta * bioassay_data["x"], observed=bioassay_data["y"])
    fits = [
        fit_laplace(model, vars=names, draws=200, chains=2, random_seed=4, progressbar=False)
        for names in (["alpha", "beta"], ["beta", "alpha"])
    ]
    in_order, reversed_order = (get_group(fit, "posterior") for fit in fits)
    for name in ("alpha", "beta"):
        np.testing.assert_array_equal(reversed_order[name].values, in_order[name].values)
    fit_in_order, fit_reversed = (get_group(fit, "fit") for fit in fits)
    assert list(fit_reversed["rows"].values) == ["alpha", "beta"]
    np.testing.assert_array_equal(fit_reversed["mean_vector"].values, fit_in_order["mean_vector"].values)
    assert float(in_order["beta"].mean()) > 3.0 > float(in_order["alpha"].mean())  # beta's mode is near 8


@pytest.mark.parametrize(
    ("requested", "fit_ratio", "max_seconds"), [("linear", 10.0, 120.0), ("auto", 0.0, 120.0), ("auto", 1e9, 0.0)]
)
def test_linear_conditional_draws_are_the_joint_gaussian(
    mixed_marginal, monkeypatch, requested, fit_ratio, max_seconds
):
    """conditional="linear": (theta, b) from the joint Gaussian of TMB's sdreport, with its density as log_q; and
    conditional="auto" the same when exact draws are judged too dear (here any cost at all, against the fit's time
    or against the cap in seconds)."""
    from scipy import stats

    import pymc_laplace.integrated
    from pymc_laplace import fit_integrated_laplace, get_group

    monkeypatch.setattr(pymc_laplace.integrated, "AUTO_EXACT_FIT_RATIO", fit_ratio)
    monkeypatch.setattr(pymc_laplace.integrated, "AUTO_EXACT_MAX_SECONDS", max_seconds)
    monkeypatch.setattr(pymc_laplace.integrated, "AUTO_EXACT_MIN_SECONDS", 0.0)
    model, random, laplace = mixed_marginal("cbpp")
    result = fit_integrated_laplace(
        model, random=random, compiled_marginal=laplace, conditional=requested, random_seed=5, progressbar=False
    )
    fit, post = get_group(result, "fit"), get_group(result, "posterior")
    assert post.attrs["conditional"] == "linear"
    theta_hat, sigma = fit["mean_vector"].values, fit["covariance_matrix"].values
    solution = laplace.solve_inner(theta_hat)
    jac = laplace.mode_jacobian(theta_hat)
    q_inverse = solution.factor.solve(np.eye(solution.b.size))
    covariance = np.block([[sigma, sigma @ jac.T], [jac @ sigma, q_inverse + jac @ sigma @ jac.T]])
    theta_draws = np.column_stack([post["beta"].values.reshape(4000, 4), np.log(post["sigma"].values.reshape(4000))])
    joint = np.column_stack([theta_draws, post["u"].values.reshape(4000, -1)])
    expected = stats.multivariate_normal(np.r_[theta_hat, solution.b], covariance).logpdf(joint)
    # log_q is of the unconstrained draws: the same Gaussian
    log_q = get_group(result, "sample_stats")["log_q"].values.reshape(4000)
    np.testing.assert_allclose(log_q, expected, atol=1e-8)
    spread = post["u"].values.reshape(4000, -1).std(axis=0)
    np.testing.assert_allclose(spread, fit["random_effects_se"].values, rtol=0.06)


def test_auto_conditional_keeps_exact_draws_when_they_are_cheap(mixed_marginal):
    """cbpp's 500 exact draws take well under a second: the default draws them exactly, as "exact" does."""
    from pymc_laplace import fit_integrated_laplace, get_group

    model, random, laplace = mixed_marginal("cbpp")
    auto, exact = (
        fit_integrated_laplace(
            model,
            random=random,
            compiled_marginal=laplace,
            random_seed=6,
            progressbar=False,
            draws=250,
            chains=2,
            **conditional,
        )
        for conditional in ({}, {"conditional": "exact"})
    )
    assert get_group(auto, "posterior").attrs["conditional"] == "exact"
    # the same draws, up to where each inner solve stopped (warm-started from the previous call's solution)
    np.testing.assert_allclose(
        get_group(auto, "posterior")["u"].values, get_group(exact, "posterior")["u"].values, rtol=1e-8, atol=1e-10
    )
