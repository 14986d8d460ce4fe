"""Adaptive Gauss-Hermite quadrature over independent blocks of random effects, against exact integrals.

References: the exact cbpp log likelihood by R's adaptive 1-D integration at glmer's estimates
(reference/r/cbpp_check_ll.R), the exact urchin AIC by 2-D quadrature per urchin (reference/README.md), and the
two-site model's per-site integrals by scipy's adaptive quadrature (here).
"""

from __future__ import annotations

import numpy as np
import pytest
from random_effects import SEED_000_BETA, two_site_data, two_site_model, urchin_model
from scipy import integrate

from pymc_laplace import InnerNewton, ModelSpecificationError, marginal
from pymc_laplace.inner.quadrature import block_quadrature, gauss_hermite_product

# glmer(cbind(incidence, size - incidence) ~ period + (1 | herd), cbpp, binomial, nAGQ = q): fixed effects and SD
CBPP_GLMER = {
    25: ([-1.39922373, -0.99140888, -1.12780959, -1.57948095], 0.64751991, -91.983369),
    1: ([-1.39834286, -0.99192497, -1.12821622, -1.57974541], 0.64206993, -91.983830),
}
# theta (log omega, mu_g, log sig_g, mu_p, log sig_p, log sigma) -> AIC by exact 2-D quadrature per urchin
URCHIN_EXACT_AIC = [
    ((-4.0, -0.2, np.log(0.1), 0.2, np.log(0.1), np.log(0.5)), 206.1808),
    ((-4.0676, -0.18946, -1.81267, 0.16382, -1.62341, -1.21295), 197.7316),
    ((-3.82094, -0.24651, -1.81844, 0.16976, -1.62773, -1.13068), 197.6796),
]


@pytest.fixture(scope="module")
def cbpp_marginal(mixed_marginal):
    return mixed_marginal("cbpp")[2]


def test_product_rule_integrates_gaussian_moments_exactly():
    nodes, log_w = gauss_hermite_product(4, 2)
    w = np.exp(log_w)
    assert nodes.shape == (16, 2)
    assert w.sum() == pytest.approx(np.pi)  # integral of exp(-x^2 - y^2)
    assert np.sum(w * nodes[:, 0] ** 2 * nodes[:, 1] ** 2) == pytest.approx(np.pi / 4)
    assert np.sum(w * nodes[:, 0] ** 6) == pytest.approx(15 * np.pi / 8)


@pytest.mark.parametrize("n_agq", [25, 1])
def test_cbpp_exact_log_likelihood_at_glmer_estimates(cbpp_marginal, n_agq):
    beta, sd, exact = CBPP_GLMER[n_agq]
    theta = np.array([*beta, np.log(sd)])
    result = block_quadrature(cbpp_marginal, theta, 25)
    assert result.log_marginal == pytest.approx(exact, abs=2e-6)
    # one node is Laplace's approximation, which misses by 0.043
    laplace = block_quadrature(cbpp_marginal, theta, 1)
    assert laplace.log_marginal == pytest.approx(cbpp_marginal.value(theta), abs=1e-10)
    assert result.laplace_log_marginal == pytest.approx(laplace.log_marginal, abs=1e-10)
    assert result.difference == pytest.approx(exact - cbpp_marginal.value(theta), abs=2e-6)
    assert result.block_difference.shape == (15,) and np.all(result.block_difference > 0)


@pytest.mark.parametrize(("theta", "aic"), URCHIN_EXACT_AIC)
def test_urchin_two_dimensional_blocks_against_exact_quadrature(theta, aic):
    laplace = marginal(urchin_model(), random=["log_g", "log_p"])
    result = block_quadrature(laplace, np.array(theta), 25)
    assert all(block.size == 2 for block in result.blocks)
    # the growth curve's kink slows Gauss-Hermite's convergence: 25 x 25 nodes agree to 1e-3 of AIC
    assert 2 * -result.log_marginal + 12 == pytest.approx(aic, abs=1e-3)


def two_site_exact(beta: np.ndarray) -> float:
    X, y, site = two_site_data()
    total = 0.0
    for s in (0, 1):
        eta0, ys = X[site == s] @ beta, y[site == s]

        def log_joint(u: float, eta0: np.ndarray = eta0, ys: np.ndarray = ys) -> float:
            eta = eta0 + u
            return float(np.sum(ys * eta - np.logaddexp(0.0, eta)) - 0.5 * u * u - 0.5 * np.log(2 * np.pi))

        total += log_integral(log_joint)
    return total


def log_integral(log_joint) -> float:
    """``log integral exp(log_joint(u)) du`` by scipy's adaptive quadrature, scaled by the peak."""
    from scipy.optimize import minimize_scalar

    peak = -float(minimize_scalar(lambda u: -log_joint(u), bounds=(-30, 30), method="bounded").fun)
    value, _ = integrate.quad(lambda u: np.exp(log_joint(u) - peak), -np.inf, np.inf, epsabs=0, epsrel=1e-13)
    return peak + np.log(value)


def test_two_site_against_adaptive_quadrature():
    laplace = marginal(two_site_model(tau=1.0), random=["mu"])
    for beta in (SEED_000_BETA, 0.5 * SEED_000_BETA):
        exact = two_site_exact(beta)
        result = block_quadrature(laplace, beta, 50)
        assert result.log_marginal == pytest.approx(exact, abs=1e-8)
        assert abs(result.laplace_log_marginal - exact) > 1e-4  # Laplace alone is measurably off here


def test_blocks_coupled_or_too_many_nodes_are_refused(mixed_marginal, cbpp_marginal):
    model, random, crossed = mixed_marginal("penicillin")
    # 24 plates crossed with 6 samples: one connected block of 30 random effects, 3^30 nodes
    with pytest.raises(ModelSpecificationError, match=r"blocks of 30 random effects.*Crossed"):
        block_quadrature(crossed, crossed.compiled.theta_start, 3)
    sparse = marginal(model, random=random, inner=InnerNewton(factorization="superlu"))
    with pytest.raises(ModelSpecificationError, match="independent blocks"):
        block_quadrature(sparse, sparse.compiled.theta_start, 3)
    with pytest.raises(ModelSpecificationError, match="positive integer"):
        block_quadrature(cbpp_marginal, cbpp_marginal.compiled.theta_start, 0)
    urchin = marginal(urchin_model(), random=["log_g", "log_p"])
    with pytest.raises(ModelSpecificationError, match="use fewer nodes"):
        block_quadrature(urchin, urchin.compiled.theta_start, 400)


def cbpp_exact(theta: np.ndarray) -> float:
    """cbpp's log likelihood by scipy's adaptive quadrature over each herd's intercept (binomial coefficients
    included, as PyMC's Binomial has them)."""
    import pandas as pd
    from conftest import data_path
    from scipy import special, stats

    d = pd.read_csv(data_path("cbpp.csv"))
    period = d["period"].astype(int).to_numpy()
    X = np.column_stack([np.ones(len(d)), period == 2, period == 3, period == 4]).astype(float)
    eta0, sd = X @ theta[:4], np.exp(theta[4])
    herd, k, n = d["herd"].astype(int).to_numpy(), d["incidence"].to_numpy(), d["size"].to_numpy()
    total = 0.0
    for h in np.unique(herd):
        rows = herd == h
        log_c = np.sum(
            special.gammaln(n[rows] + 1) - special.gammaln(k[rows] + 1) - special.gammaln(n[rows] - k[rows] + 1)
        )

        def log_joint(u: float, rows: np.ndarray = rows) -> float:
            eta = eta0[rows] + u
            return float(np.sum(k[rows] * eta - n[rows] * np.logaddexp(0.0, eta)) + stats.norm(0, sd).logpdf(u))

        total += log_c + log_integral(log_joint)
    return total


def test_fits_carry_the_error_of_laplace_and_check_laplace_names_the_blocks(mixed_marginal):
    from pymc_laplace import check_laplace, fit_integrated_laplace, get_group

    model, random, laplace = mixed_marginal("cbpp")
    result = fit_integrated_laplace(
        model, random=random, compiled_marginal=laplace, draws=10, chains=1, progressbar=False, random_seed=1
    )
    fit = get_group(result, "fit")
    theta = np.asarray(fit["mean_vector"].values)
    exact_error = cbpp_exact(theta) - float(fit["log_marginal_likelihood"])
    assert exact_error == pytest.approx(0.043, abs=1e-3)  # as at glmer's estimates (reference: 0.0432)
    # the default check (5 nodes) is within 2e-3 of the exact error; check_laplace's 10 nodes within 1e-6
    assert get_group(result, "posterior").attrs["laplace_error_aghq"] == pytest.approx(exact_error, abs=2e-3)
    check = check_laplace(result, model)
    assert check.difference == pytest.approx(exact_error, abs=1e-6)
    assert list(check.blocks.columns) == ["first", "size", "difference"] and len(check.blocks) == 15
    assert check.blocks["difference"].sum() == pytest.approx(check.difference, abs=1e-10)
    assert np.all(np.diff(check.blocks["difference"].abs()) <= 0)  # the worst block first
    assert f"off by {check.difference:+.3g}" in check.advice and check.blocks["first"][0] in check.advice


def test_a_large_error_of_laplace_warns():
    import pymc as pm

    from pymc_laplace import ApproximationWarning, fit_integrated_laplace, get_group

    rng = np.random.default_rng(3)
    groups = np.repeat(np.arange(60), 2)  # two binary answers per group, large between-group spread
    y = rng.binomial(1, special_expit(rng.normal(0.0, 3.0, 60)[groups]))
    with pm.Model() as model:
        a = pm.Normal("a", 0.0, 10.0)
        sigma = pm.HalfNormal("sigma", 5.0)
        u = pm.Normal("u", 0.0, sigma, shape=60)
        pm.Bernoulli("y", logit_p=a + u[groups], observed=y)
    with pytest.warns(ApproximationWarning, match="Laplace's log likelihood at the estimate is off by"):
        result = fit_integrated_laplace(model, random=["u"], draws=10, chains=1, progressbar=False, random_seed=1)
    assert abs(get_group(result, "posterior").attrs["laplace_error_aghq"]) >= 1.0


def special_expit(x):
    return 1.0 / (1.0 + np.exp(-x))


def finite_difference(laplace, theta, n_nodes, h=1e-5):
    steps = np.eye(theta.size) * h
    return np.array(
        [
            (block_quadrature(laplace, theta + e, n_nodes).log_marginal
             - block_quadrature(laplace, theta - e, n_nodes).log_marginal) / (2 * h)
            for e in steps
        ]
    )  # fmt: skip


def test_quadrature_gradient_is_exact(cbpp_marginal):
    import pymc as pm

    from pymc_laplace.inner.quadrature import quadrature_value_and_grad

    theta = np.array([*CBPP_GLMER[25][0], np.log(CBPP_GLMER[25][1])])
    for n_nodes in (5, 25):
        value, grad = quadrature_value_and_grad(cbpp_marginal, theta, n_nodes)
        assert value == pytest.approx(block_quadrature(cbpp_marginal, theta, n_nodes).log_marginal, abs=1e-10)
        np.testing.assert_allclose(grad, finite_difference(cbpp_marginal, theta, n_nodes), atol=1e-6)
    # one node is Laplace's gradient
    np.testing.assert_allclose(
        quadrature_value_and_grad(cbpp_marginal, theta, 1)[1], cbpp_marginal.value_and_grad(theta)[1], atol=1e-8
    )
    # blocks of two (a random intercept and slope per group, Poisson)
    rng = np.random.default_rng(2)
    groups = np.repeat(np.arange(25), 6)
    x = rng.normal(size=groups.size)
    y = rng.poisson(np.exp(0.2 + rng.normal(0, 0.5, 25)[groups] + (0.3 + rng.normal(0, 0.4, 25)[groups]) * x))
    with pm.Model() as model:
        a = pm.Normal("a", 0, 5)
        slope = pm.Normal("slope", 0, 5)
        s_u, s_v = pm.HalfNormal("s_u", 1.0), pm.HalfNormal("s_v", 1.0)
        u, v = pm.Normal("u", 0, s_u, shape=25), pm.Normal("v", 0, s_v, shape=25)
        pm.Poisson("y", pm.math.exp(a + u[groups] + (slope + v[groups]) * x), observed=y)
    laplace = marginal(model, random=["u", "v"])
    theta = np.array([0.2, 0.3, np.log(0.5), np.log(0.4)])
    value, grad = quadrature_value_and_grad(laplace, theta, 7)
    assert all(block.size == 2 for block in block_quadrature(laplace, theta, 1).blocks)
    np.testing.assert_allclose(grad, finite_difference(laplace, theta, 7), atol=1e-6)


def test_cbpp_fit_with_25_nodes_matches_glmer(cbpp_marginal, mixed_marginal):
    from pymc_laplace import fit_integrated_laplace, get_group, summary

    model, random, _ = mixed_marginal("cbpp")
    result = fit_integrated_laplace(
        model, random=random, compiled_marginal=cbpp_marginal, n_agq=25, draws=10, chains=1, progressbar=False,
        random_seed=1,
    )  # fmt: skip
    fit = get_group(result, "fit")
    beta, sd, exact = CBPP_GLMER[25]
    estimate = fit["mean_vector"].values
    np.testing.assert_allclose(estimate[:4], beta, atol=2e-4)
    assert np.exp(estimate[4]) == pytest.approx(sd, abs=2e-4)
    # the maximum of the exact (to 1e-7) likelihood: at least glmer's, by no more than its optimiser leaves
    assert exact - 1e-7 <= float(fit["log_marginal_likelihood"]) <= exact + 1e-4
    # glmer's standard errors (its Hessian of the nAGQ = 25 deviance)
    se = summary(result).loc[lambda t: t["scale"] == "unconstrained", "std_error"].values[:4]
    np.testing.assert_allclose(se, [0.23351138, 0.30676820, 0.32676716, 0.42759571], rtol=2e-3)
    assert get_group(result, "posterior").attrs["n_agq"] == 25


def test_n_agq_is_checked(mixed_marginal):
    from pymc_laplace import fit_integrated_laplace

    model, random, crossed = mixed_marginal("penicillin")
    with pytest.raises(ModelSpecificationError, match="blocks of 30"):
        fit_integrated_laplace(model, random=random, compiled_marginal=crossed, n_agq=3, progressbar=False)
    with pytest.raises(ModelSpecificationError, match="positive integer"):
        fit_integrated_laplace(model, random=random, compiled_marginal=crossed, n_agq=0, progressbar=False)


def test_importance_sampling_against_the_exact_likelihood(cbpp_marginal):
    from pymc_laplace.inner.quadrature import importance_log_marginal

    beta, sd, exact = CBPP_GLMER[25]
    estimate = importance_log_marginal(cbpp_marginal, np.array([*beta, np.log(sd)]), n_draws=20000, random_seed=1)
    assert estimate.pareto_k < 0.7 and estimate.standard_error < 0.005
    assert abs(estimate.log_marginal - exact) < 4 * estimate.standard_error
    assert estimate.difference > 0.03  # Laplace's 0.043 shortfall is seen


def test_importance_sampling_is_exact_where_laplace_is_and_checks_crossed_fits(mixed_marginal):
    from pymc_laplace import check_laplace, fit_integrated_laplace
    from pymc_laplace.inner.quadrature import importance_log_marginal

    model, random, crossed = mixed_marginal("penicillin")  # Gaussian: the ratios p/q are constant
    theta = crossed.compiled.theta_start + 0.1
    for laplace in (crossed, marginal(model, random=random, inner=InnerNewton(factorization="superlu"))):
        estimate = importance_log_marginal(laplace, theta, n_draws=200, random_seed=2)
        assert estimate.log_marginal == pytest.approx(laplace.value(theta), abs=1e-9)
        assert estimate.standard_error < 1e-10
    result = fit_integrated_laplace(
        model, random=random, compiled_marginal=crossed, draws=10, chains=1, progressbar=False, random_seed=1
    )
    check = check_laplace(result, model, n_draws=300, random_seed=3)  # one block of 30: quadrature is out of reach
    assert check.blocks.empty and abs(check.difference) < 1e-9 and "importance sampling" in check.advice


def test_more_misuse_of_the_checks_is_refused(mixed_marginal, cbpp_marginal):
    import pymc as pm

    from pymc_laplace import check_laplace, fit_integrated_laplace, fit_laplace
    from pymc_laplace.inner.quadrature import importance_log_marginal

    model, random, _ = mixed_marginal("cbpp")
    with pytest.raises(ModelSpecificationError, match="`conditional` must be 'auto', 'exact' or 'linear'"):
        fit_integrated_laplace(model, random=random, compiled_marginal=cbpp_marginal, conditional="exactly")
    with pytest.raises(ModelSpecificationError, match="`n_agq` > 1 is for method='ml' or 'map'"):
        fit_integrated_laplace(model, random=random, compiled_marginal=cbpp_marginal, method="grid", n_agq=3)
    with pytest.raises(ModelSpecificationError, match="at least 25"):
        importance_log_marginal(cbpp_marginal, cbpp_marginal.compiled.theta_start, n_draws=10)
    with pm.Model() as other:
        pm.Normal("z", 0.0, 1.0)
    laplace_fit = fit_laplace(other, draws=10, chains=1, progressbar=False)
    with pytest.raises(ModelSpecificationError, match="fit_integrated_laplace result"):
        check_laplace(laplace_fit, other)
