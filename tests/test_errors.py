"""Numerical failures give clear errors that name the variable and say what to do.

Misuse (bad arguments, a bad start point, a model without a mode) is catalogued in test_misuse.py.
"""

from __future__ import annotations

import numpy as np
import pymc as pm
import pytest

from pymc_laplace import (
    HessianNotPositiveDefiniteError,
    OptimizationError,
    fit_laplace,
)


def test_flat_direction_is_named():
    """y ~ N(a + b, 1) with flat a and b: only a + b is identified; the error names the direction a - b."""
    with pm.Model() as model:
        a = pm.Flat("a")
        b = pm.Flat("b")
        pm.Normal("y", a + b, 1.0, observed=[1.0, 2.0, 0.5])
    with pytest.raises(HessianNotPositiveDefiniteError, match=r"0\.707 \* a \+ 0\.707 \* b|0\.707 \* b \+ 0\.707 \* a"):
        fit_laplace(model, progressbar=False)
    # the explicit ridge makes it fit and is recorded
    result = fit_laplace(model, ridge=1e-3, draws=10, chains=1, progressbar=False)
    from pymc_laplace._compat import get_group

    assert get_group(result, "posterior").attrs["ridge"] == pytest.approx(1e-3)


def test_unbounded_posterior():
    """One observation, flat mean, HalfFlat scale, density of the constrained scale: unbounded as sigma -> 0."""
    with pm.Model() as model:
        mu = pm.Flat("mu")
        sigma = pm.HalfFlat("sigma")
        pm.Normal("y", mu, sigma, observed=[1.0])
    with pytest.raises(OptimizationError, match=r"(?s)sigma_log__.*improper or unbounded"):
        fit_laplace(model, jacobian=False, progressbar=False)


def test_separated_logistic_regression_with_flat_priors_has_no_mode():
    """Complete separation: the likelihood rises toward 1 as the slope grows without bound, so a tiny gradient is
    no mode; the search must not be called converged (the Newton step, not only the gradient, must be small)."""
    with pm.Model() as model:
        a = pm.Flat("a")
        b = pm.Flat("b")
        pm.Bernoulli("y", logit_p=a + b * np.array([-1.0, -0.5, -0.2, 0.3, 0.6, 1.0]), observed=[0, 0, 0, 1, 1, 1])
    # either the search runs away (no mode) or the curvature underflows on the way (a flat direction): both name b
    with pytest.raises(
        (OptimizationError, HessianNotPositiveDefiniteError), match=r"(?s)(?=.*\bb\b)(?=.*(improper or unbounded|Flat))"
    ):
        fit_laplace(model, progressbar=False)
