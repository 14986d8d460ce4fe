"""fit_laplace against independent answers: BDA3's bioassay, conjugate Gaussians, hand-derived modes."""

from __future__ import annotations

import numpy as np
import pymc as pm
import pytensor.tensor as pt
import pytest
from scipy import stats

from pymc_laplace import fit_laplace
from pymc_laplace._compat import get_group


def _fit_group(result):
    return get_group(result, "fit")


def test_bioassay_flat_prior_matches_reference(bioassay_data):
    """Reference: reference/README.md, "Bioassay": mode (0.8466, 7.7488), sd (1.019, 4.872), corr 0.714
    (BDA3 section 4.1; an exact computation on the flat-prior posterior, independent of this package)."""
    with pm.Model() as model:
        alpha = pm.Flat("alpha")
        beta = pm.Flat("beta")
        pm.Binomial("y", n=bioassay_data["n"], logit_p=alpha + beta * bioassay_data["x"], observed=bioassay_data["y"])
    fit = _fit_group(fit_laplace(model, draws=200, chains=2, random_seed=0, progressbar=False))
    mean = fit["mean_vector"].values
    cov = fit["covariance_matrix"].values
    sd = np.sqrt(np.diag(cov))
    np.testing.assert_allclose(mean, [0.8466, 7.7488], rtol=1e-3)
    np.testing.assert_allclose(sd, [1.019, 4.872], rtol=1e-3)
    assert cov[0, 1] / (sd[0] * sd[1]) == pytest.approx(0.714, rel=1e-3)
    assert list(fit["rows"].values) == ["alpha", "beta"]


@pytest.fixture(scope="module")
def conjugate_regression():
    """y ~ N(X beta, sigma^2 I) with known sigma and beta ~ N(m0, diag(s0^2)): the posterior is Gaussian."""
    rng = np.random.default_rng(42)
    n_obs, k = 30, 3
    X = rng.normal(size=(n_obs, k))
    sigma, m0, s0 = 0.7, np.array([0.5, -1.0, 2.0]), np.array([1.5, 2.0, 0.5])
    y = X @ np.array([1.0, -0.5, 0.3]) + sigma * rng.normal(size=n_obs)
    precision = X.T @ X / sigma**2 + np.diag(1 / s0**2)
    cov = np.linalg.inv(precision)
    mean = cov @ (X.T @ y / sigma**2 + m0 / s0**2)
    # the evidence is the Gaussian marginal density of y
    evidence = stats.multivariate_normal(X @ m0, sigma**2 * np.eye(n_obs) + X @ np.diag(s0**2) @ X.T).logpdf(y)
    with pm.Model(coords={"coef": ["a", "b", "c"]}) as model:
        beta = pm.Normal("beta", m0, s0, dims="coef")
        pm.Normal("y", pt.dot(X, beta), sigma, observed=y)
    return model, mean, cov, evidence


def test_conjugate_gaussian_is_exact(conjugate_regression):
    """Laplace is exact for a Gaussian posterior: mean, covariance and evidence agree with the analytic answer."""
    model, mean, cov, evidence = conjugate_regression
    result = fit_laplace(model, draws=500, chains=2, random_seed=1, progressbar=False)
    fit = _fit_group(result)
    np.testing.assert_allclose(fit["mean_vector"].values, mean, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(fit["covariance_matrix"].values, cov, rtol=1e-8, atol=1e-12)
    assert float(fit["log_marginal_likelihood"]) == pytest.approx(evidence, rel=1e-10)
    assert list(fit["rows"].values) == ["beta[a]", "beta[b]", "beta[c]"]
    # log_q is the density the draws came from; for an exact Gaussian log_p - log_q is the constant log evidence
    stats_group = get_group(result, "sample_stats")
    diff = (stats_group["log_p"] - stats_group["log_q"]).values
    np.testing.assert_allclose(diff, evidence, rtol=1e-8)


def test_vars_gives_the_conditional_gaussian():
    """With ``vars`` the other variables stay at the mode; the Gaussian is the exact conditional of ``vars``."""
    with pm.Model() as two:
        a = pm.Normal("a", 0.0, 1.0)
        b = pm.Normal("b", 0.0, 1.0)
        pm.Normal("y", a + 2 * b, 0.5, observed=[1.0, 1.2])
    result = fit_laplace(two, vars=["a"], draws=100, chains=1, random_seed=0, progressbar=False)
    fit = _fit_group(result)
    precision = np.array([[1 + 2 / 0.25, 2 * 2 / 0.25], [2 * 2 / 0.25, 1 + 2 * 4 / 0.25]])
    np.testing.assert_allclose(fit["covariance_matrix"].values, [[1 / precision[0, 0]]], rtol=1e-10)
    assert list(fit["rows"].values) == ["a"]
    posterior = get_group(result, "posterior")
    joint_mean = np.linalg.solve(precision, np.array([2.2 / 0.25, 2 * 2.2 / 0.25]))
    np.testing.assert_allclose(posterior["b"].values, joint_mean[1], rtol=1e-10)


@pytest.mark.parametrize(
    ("make", "jacobian", "expected"),
    [
        # Gamma(a=3, b=2): density of s has mode (a-1)/b; density of log s, s^a e^(-b s), has mode a/b
        (lambda: pm.Gamma("v", alpha=3.0, beta=2.0), False, np.log(1.0)),
        (lambda: pm.Gamma("v", alpha=3.0, beta=2.0), True, np.log(1.5)),
        # Beta(2, 5): density of p has mode 1/5; density of logit p, p^2 (1-p)^5, has mode 2/7
        (lambda: pm.Beta("v", alpha=2.0, beta=5.0), False, np.log(0.2 / 0.8)),
        (lambda: pm.Beta("v", alpha=2.0, beta=5.0), True, np.log((2 / 7) / (5 / 7))),
        # HalfNormal(2): the density of s has its mode at the boundary (improper for a Laplace fit), the
        # density of log s, s exp(-s^2/8), has mode s = 2 and second derivative -2 in log s
        (lambda: pm.HalfNormal("v", sigma=2.0), True, np.log(2.0)),
    ],
)
def test_constrained_modes_match_hand_derivations(make, jacobian, expected):
    with pm.Model() as model:
        make()
    fit = _fit_group(fit_laplace(model, jacobian=jacobian, draws=10, chains=1, progressbar=False))
    assert float(fit["mean_vector"].values[0]) == pytest.approx(expected, abs=1e-8)


def test_lognormal_scale_curvature_is_exact():
    """HalfNormal(2) with jacobian=True: log density of x = log s is x - e^(2x)/8, second derivative -e^(2x)/2 = -2."""
    with pm.Model() as model:
        pm.HalfNormal("s", sigma=2.0)
    fit = _fit_group(fit_laplace(model, draws=10, chains=1, progressbar=False))
    assert float(fit["covariance_matrix"].values[0, 0]) == pytest.approx(0.5, rel=1e-10)


def test_dirichlet_mode_without_jacobian():
    """Dirichlet(a) density has its mode at (a - 1) / (sum(a) - K) whatever the transform."""
    a = np.array([2.0, 3.0, 5.0])
    with pm.Model() as model:
        p = pm.Dirichlet("p", a=a)
    result = fit_laplace(model, jacobian=False, draws=200, chains=2, random_seed=3, progressbar=False)
    mode = _fit_group(result)["mean_vector"].values
    p_mode = model.rvs_to_transforms[p].backward(pt.as_tensor(mode)).eval()
    np.testing.assert_allclose(p_mode, (a - 1) / (a.sum() - a.size), rtol=1e-8)
    draws = get_group(result, "posterior")["p"].values
    assert draws.shape == (2, 200, 3)
    np.testing.assert_allclose(draws.sum(axis=-1), 1.0, rtol=1e-12)


def test_matrix_variable_and_lkj_cholesky():
    """A covariance model with LKJCholeskyCov: draws are valid correlation matrices, the mode is finite."""
    rng = np.random.default_rng(7)
    true_cov = np.array([[1.0, 0.6], [0.6, 2.0]])
    data = rng.multivariate_normal([0.0, 0.0], true_cov, size=200)
    with pm.Model(coords={"axis": ["u", "v"]}) as model:
        chol, _, _ = pm.LKJCholeskyCov("chol", n=2, eta=2.0, sd_dist=pm.Exponential.dist(1.0), compute_corr=True)
        mu = pm.Normal("mu", 0.0, 5.0, dims="axis")
        pm.MvNormal("obs", mu=mu, chol=chol, observed=data)
    result = fit_laplace(model, draws=300, chains=2, random_seed=5, progressbar=False)
    posterior = get_group(result, "posterior")
    corr_draws = posterior["chol_corr"].values
    np.testing.assert_allclose(corr_draws[..., 0, 0], 1.0, rtol=1e-10)
    assert np.all(np.abs(corr_draws[..., 0, 1]) < 1)
    sample_corr = np.corrcoef(data.T)[0, 1]
    assert float(np.median(corr_draws[..., 0, 1])) == pytest.approx(sample_corr, abs=0.03)
    assert posterior["mu"].dims == ("chain", "draw", "axis")
