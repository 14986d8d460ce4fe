"""Bad input and numerical failure give clear errors that name the variable and say what to do."""

from __future__ import annotations

import numpy as np
import pymc as pm
import pytensor.tensor as pt
import pytest

from pymc_laplace import (
    HessianNotPositiveDefiniteError,
    ModelSpecificationError,
    OptimizationError,
    StartPointError,
    fit_laplace,
)


def test_discrete_free_variable():
    with pm.Model() as model:
        pm.Poisson("k", 3.0)
        pm.Normal("x", 0.0, 1.0)
    with pytest.raises(ModelSpecificationError, match=r"\['k'\] are discrete.*[Mm]arginalise"):
        fit_laplace(model, progressbar=False)


def test_minus_infinity_at_start_names_the_variable():
    with pm.Model() as model:
        x = pm.Normal("x", 0.0, 1.0)
        pm.Potential("must_exceed_five", pt.switch(x > 5.0, 0.0, -np.inf))
    with pytest.raises(StartPointError, match=r"(?s)-inf at the start point.*must_exceed_five.*initvals"):
        fit_laplace(model, progressbar=False)


def test_data_outside_the_support():
    with pm.Model() as model:
        a = pm.Normal("a", 0.0, 1.0)
        pm.Binomial("y", n=3, logit_p=a, observed=[1, 5])
    with pytest.raises(ModelSpecificationError, match=r"'y' lie outside the support"):
        fit_laplace(model, progressbar=False)


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


@pytest.mark.parametrize("bad", ["y", "nope"])
def test_vars_must_be_free_variables(bad):
    with pm.Model() as model:
        mu = pm.Normal("mu", 0.0, 1.0)
        pm.Normal("y", mu, 1.0, observed=[0.1])
    with pytest.raises(ModelSpecificationError, match=rf"`vars` names '{bad}'.*free variables are \['mu'\]"):
        fit_laplace(model, vars=[bad], progressbar=False)


def test_initvals_must_name_free_variables():
    with pm.Model() as model:
        pm.Normal("mu", 0.0, 1.0)
    with pytest.raises(ModelSpecificationError, match=r"`initvals` names 'sigma'"):
        fit_laplace(model, initvals={"sigma": 1.0}, progressbar=False)
