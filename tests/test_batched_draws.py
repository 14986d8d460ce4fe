"""Inner solves of many theta at once: the same modes and factors as one at a time, and draws whose spread is the
delta-method standard error of the random effects."""

from __future__ import annotations

import time

import numpy as np
import pytest

import pymc_laplace.integrated
from pymc_laplace import fit_integrated_laplace
from pymc_laplace._compat import get_group
from pymc_laplace.inner.marginal import InnerSolveError


@pytest.mark.parametrize("name", ["cbpp", "grouseticks"])
def test_batched_inner_solves_equal_unbatched(mixed_marginal, name):
    _, _, laplace = mixed_marginal(name)
    theta0 = laplace.compiled.theta_start
    rng = np.random.default_rng(5)
    thetas = theta0 + 0.3 * rng.normal(size=(7, theta0.size))
    start = laplace.solve_inner(theta0).b
    modes, factor, failures = laplace.solve_inner_batch(thetas, np.tile(start, (7, 1)))
    assert failures == []
    for k, theta in enumerate(thetas):
        solution = laplace.solve_inner(theta)
        np.testing.assert_allclose(modes[k], solution.b, atol=1e-7)
        assert factor.log_det()[k] == pytest.approx(solution.factor.log_det(), abs=1e-8)
        # a draw L^-T z: its covariance is Q^-1, so z . z = (x^T Q x) for x = L^-T z
        z = rng.standard_normal(solution.b.size)
        x = factor.transposed_inverse_times(np.tile(z, (7, 1)))[k]
        assert x @ _q_times(solution, x) == pytest.approx(z @ z, rel=1e-10)


def _q_times(solution, x):
    """Q x from the factor of the unbatched solve (Q = L L^T)."""
    out = np.empty_like(x)
    for idx, chol in zip(solution.factor.structure.groups, solution.factor.cholesky, strict=True):
        out[idx] = (chol @ (np.swapaxes(chol, -1, -2) @ x[idx][..., None]))[..., 0]
    return out


def test_block_factor_draws_many_at_once(mixed_marginal):
    """The linear draws of a fit come from one factor, many at once: each row is a draw ``mean + L^-T z`` (the same as
    one at a time) with the log density of ``N(mean, Q^-1)``."""
    _, _, laplace = mixed_marginal("grouseticks")
    solution = laplace.solve_inner(laplace.compiled.theta_start)
    n = solution.b.size
    rng = np.random.default_rng(3)
    means, z = rng.normal(size=(5, n)), rng.standard_normal((5, n))
    many, log_density = solution.factor.sample_many(means, z)
    for k in range(5):
        one, one_log_density = solution.factor.sample_given(means[k], z[k])
        np.testing.assert_allclose(many[k], one, rtol=1e-12, atol=1e-12)
        assert log_density[k] == pytest.approx(one_log_density, rel=1e-12)
        x = many[k] - means[k]
        quadratic = x @ _q_times(solution, x)
        assert quadratic == pytest.approx(z[k] @ z[k], rel=1e-10)
        expected = 0.5 * solution.factor.log_det() - 0.5 * n * np.log(2 * np.pi) - 0.5 * quadratic
        assert log_density[k] == pytest.approx(expected, rel=1e-10)


def test_batched_solve_reports_failures_per_theta(mixed_marginal):
    _, _, laplace = mixed_marginal("cbpp")
    theta0 = laplace.compiled.theta_start
    thetas = np.tile(theta0, (3, 1))
    thetas[1, -1] = np.nan  # the scale of the random effects: the joint density cannot be evaluated
    modes, _, failures = laplace.solve_inner_batch(thetas, np.zeros((3, laplace.compiled.b_start.size)))
    assert [k for k, _ in failures] == [1]
    assert isinstance(failures[0][1], InnerSolveError)
    np.testing.assert_allclose(modes[0], laplace.solve_inner(theta0).b, atol=1e-7)


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "one-at-a-time"])
def test_draws_spread_as_the_delta_method(mixed_marginal, monkeypatch, batched):
    """The draws of b (theta drawn, then b given theta) have the standard deviation that the delta method gives
    (diag Q^-1 + J cov J^T, computed without any draw), up to Monte Carlo error and the linearisation; whether the
    inner solves are batched or not."""
    monkeypatch.setattr(pymc_laplace.integrated, "CHEAP_DRAWS_SECONDS", 0.0 if batched else np.inf)
    model, random, laplace = mixed_marginal("cbpp")
    result = fit_integrated_laplace(
        model,
        random=random,
        compiled_marginal=laplace,
        conditional="exact",
        progressbar=False,
        random_seed=4,
        draws=1000,
        chains=4,
    )
    assert get_group(result, "posterior").attrs["conditional"] == "exact"
    fit = get_group(result, "fit")
    draws = np.asarray(get_group(result, "posterior")["u"]).reshape(4000, -1)
    se = fit["random_effects_se"].values
    np.testing.assert_allclose(draws.std(axis=0), se, rtol=0.1)
    assert np.all(np.abs(draws.mean(axis=0) - fit["random_effects"].values) <= 4 * se / np.sqrt(4000) + 0.02)
    log_q = np.asarray(get_group(result, "sample_stats")["log_q"])
    assert np.all(np.isfinite(log_q))


def test_batches_slower_than_single_draws_give_way(mixed_marginal, monkeypatch):
    """Where the first batch of inner solves takes longer per draw than the draws one at a time (large data), the
    rest are drawn one at a time: one batched call, and every draw exact and finite."""
    monkeypatch.setattr(pymc_laplace.integrated, "CHEAP_DRAWS_SECONDS", 0.0)
    model, random, laplace = mixed_marginal("cbpp")
    per_draw = laplace.structure.n_colors * (laplace.compiled.b_start.size + 56)  # 56 observations
    monkeypatch.setattr(pymc_laplace.integrated, "BATCH_ELEMENTS", 50 * per_draw)  # batches of 50 draws
    batched = laplace.solve_inner_batch
    calls = []

    def slow(thetas, starts):
        calls.append(len(thetas))
        time.sleep(2.0)
        return batched(thetas, starts)

    monkeypatch.setattr(laplace, "solve_inner_batch", slow)
    result = fit_integrated_laplace(
        model, random=random, compiled_marginal=laplace, conditional="exact", progressbar=False, random_seed=2,
        draws=400, chains=1,
    )  # fmt: skip
    assert calls == [50]
    draws = np.asarray(get_group(result, "posterior")["u"]).reshape(400, -1)
    assert np.all(np.isfinite(draws)) and np.all(np.isfinite(get_group(result, "sample_stats")["log_q"]))
    # one at a time after the batch: the modes given each theta, so the spread is the delta method's (loosely)
    np.testing.assert_allclose(draws.std(axis=0), get_group(result, "fit")["random_effects_se"].values, rtol=0.25)
