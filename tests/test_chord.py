"""The chord steps of the draws' inner solves change where the solve ends (nothing) and how it gets there (fewer
Hessian products), on crossed Poisson effects and on binomial random intercepts. (For a Gaussian model Newton's
method needs one step from any start: the chord steps have nothing to save there.)"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from pymc_laplace import fit_integrated_laplace, get_group


@pytest.mark.parametrize("name", ["grouseticks", "cbpp"])
def test_chord_steps_end_at_newtons_mode(mixed_marginal, name):
    model, random, laplace = mixed_marginal(name)
    result = fit_integrated_laplace(
        model, random=random, draws=10, chains=1, random_seed=1, progressbar=False, compiled_marginal=laplace
    )
    theta_hat = get_group(result, "fit")["mean_vector"].values
    at_estimate = laplace.solve_inner(theta_hat)
    jacobian = laplace.mode_jacobian(theta_hat)
    calls = {"newton": 0}
    newton = laplace.compiled.joint_newton

    def counted(*args, **kwargs):
        calls["newton"] += 1
        return newton(*args, **kwargs)

    original = laplace.compiled
    laplace.compiled = dataclasses.replace(original, joint_newton=counted)
    try:
        rng = np.random.default_rng(0)
        covariance = get_group(result, "fit")["covariance_matrix"].values
        with_chord, without = 0, 0
        for theta in rng.multivariate_normal(theta_hat, covariance, size=5):
            start = at_estimate.b + jacobian @ (theta - theta_hat)
            calls["newton"] = 0
            plain = laplace._newton(theta, start.copy())
            without += calls["newton"]
            calls["newton"] = 0
            laplace._last = None
            chorded = laplace.solve_inner(theta, start=start, chord=at_estimate.factor)
            with_chord += calls["newton"]
            np.testing.assert_allclose(chorded.b, plain.b, rtol=1e-7, atol=1e-8)
            assert chorded.log_marginal == pytest.approx(plain.log_marginal, abs=1e-8)
        assert with_chord < without
    finally:
        laplace.compiled = original
        laplace._last = None
        laplace.solve_inner(theta_hat)


def test_full_newton_step_is_judged_by_its_gradient_where_the_sum_is_rounded():
    """A full Newton step is taken when the log density rose (Armijo), when its change is below the density's
    rounding, or, for a change within the rounding of a sum over millions of rows (1e-10 of it), when the largest
    gradient component fell to under half; never with a non-finite gradient or a drop beyond that rounding."""
    from pymc_laplace.inner.marginal import ROUNDING_OF_SUMS, _full_step_accepted

    logp, grad, slope = -7.0e6, np.array([1e-5, -3e-6]), 1e-10
    resolution = ROUNDING_OF_SUMS * 7.0e6  # 7e-4
    small, same = np.array([1e-7, 1e-8]), np.array([1e-5, 1e-7])
    assert _full_step_accepted(logp, grad, slope, (logp + 1e-3, same, None))  # rose
    assert _full_step_accepted(logp, grad, slope, (logp - 1e-3 * resolution, same, None))  # below rounding
    assert _full_step_accepted(logp, grad, slope, (logp - 0.5 * resolution, small, None))  # gradient fell
    assert not _full_step_accepted(logp, grad, slope, (logp - 0.5 * resolution, same, None))  # it did not
    assert not _full_step_accepted(logp, grad, slope, (logp - 2.0 * resolution, small, None))  # a real drop
    assert not _full_step_accepted(logp, grad, slope, (logp + 1.0, np.array([np.nan, 0.0]), None))
