"""Exact derivatives of logit-link Bernoulli and Binomial likelihoods where PyMC's own graph fails (|eta| > 37)."""

from __future__ import annotations

import numpy as np
import pymc as pm
import pytest
from scipy.special import expit, gammaln

from pymc_laplace.compile.graphs import compile_joint


@pytest.mark.parametrize("family", ["bernoulli", "binomial"])
def test_derivatives_are_exact_at_extreme_logits(family):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(40, 2)) * 30.0  # with beta = (2.5, -2) the linear predictor reaches |eta| > 140
    n = np.full(40, 1 if family == "bernoulli" else 4)
    y = rng.binomial(n, 0.5)
    with pm.Model() as model:
        beta = pm.Normal("beta", 0.0, 10.0, shape=2)
        if family == "bernoulli":
            pm.Bernoulli("y", logit_p=X @ beta, observed=y)
        else:
            pm.Binomial("y", n=n, logit_p=X @ beta, observed=y)
    compiled = compile_joint(model)
    b = np.array([2.5, -2.0])
    eta = X @ b
    assert np.abs(eta).max() > 140
    logp, grad, hess = compiled.value_grad_hess(b)
    prob = expit(eta)
    log_binom = gammaln(n + 1) - gammaln(y + 1) - gammaln(n - y + 1)
    expected_logp = (
        np.sum(y * eta - n * np.logaddexp(0.0, eta) + log_binom)
        - 0.5 * np.sum(b**2) / 100.0
        - 2 * (np.log(10.0) + 0.5 * np.log(2 * np.pi))
    )
    expected_grad = X.T @ (y - n * prob) - b / 100.0
    expected_hess = -(X.T * (n * prob * (1 - prob))) @ X - np.eye(2) / 100.0
    assert np.isfinite(logp) and np.all(np.isfinite(grad)) and np.all(np.isfinite(hess))
    assert logp == pytest.approx(expected_logp, rel=1e-9)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-10, atol=1e-9)
    np.testing.assert_allclose(hess, expected_hess, rtol=1e-10, atol=1e-12)


def test_other_links_are_left_to_pymc():
    """A probit-link Bernoulli is not rewritten (its derivatives come from PyMC's graph, and are correct here)."""
    with pm.Model() as model:
        a = pm.Normal("a", 0.0, 1.0)
        pm.Bernoulli("y", p=pm.math.invprobit(a), observed=[1, 0, 1])
    logp, grad, _ = compile_joint(model).value_grad_hess(np.array([0.0]))
    assert logp == pytest.approx(3 * np.log(0.5) - 0.5 * np.log(2 * np.pi), rel=1e-12)
    # d/da log Phi(a) = phi/Phi = 2 phi(0) at 0, d/da log(1 - Phi(a)) = -2 phi(0): net 2 phi(0)
    assert grad[0] == pytest.approx(2 / np.sqrt(2 * np.pi), rel=1e-7)  # PyMC evaluates Phi to ~1e-8
