"""Sparse Cholesky of the random-effects Hessian: against dense linear algebra and exact Gaussian marginals.

A Gaussian random walk observed with Gaussian noise couples all its states into one connected block (a
tridiagonal Hessian); the Laplace approximation is exact for it, so the marginal must equal the multivariate
normal density of the data.
"""

from __future__ import annotations

import sys

import numpy as np
import pymc as pm
import pytest
import scipy.sparse as sp
from scipy import optimize, stats

from pymc_laplace import ModelSpecificationError, fit_integrated_laplace, marginal
from pymc_laplace._compat import get_group
from pymc_laplace.compile.structure import color_columns
from pymc_laplace.inner.blocks import MAX_DENSE_BLOCK, block_structure
from pymc_laplace.inner.marginal import InnerNewton
from pymc_laplace.inner.sparse import (
    NotPositiveDefinite,
    SparsePattern,
    cholmod_available,
    factor_sparse,
    sparse_pattern,
    takahashi_inverse,
)

BACKENDS = [
    "superlu",
    pytest.param(
        "cholmod", marks=pytest.mark.skipif(not cholmod_available(), reason="scikit-sparse (CHOLMOD) not installed")
    ),
]


def random_spd(n: int, seed: int) -> sp.csc_matrix:
    """A sparse positive definite matrix with a band and random long-range couplings (fill-in under any order)."""
    a = sp.random(n, n, density=3.0 / n, random_state=seed)
    band = sp.diags([np.full(n - 1, -0.9), np.full(n, 2.0), np.full(n - 1, -0.9)], [-1, 0, 1])
    return sp.csc_matrix(a @ a.T + band)


def compressed(q: sp.csc_matrix) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
    pattern = sp.csr_matrix(q != 0)
    colors = color_columns(pattern)
    indicators = np.zeros((q.shape[0], colors.max() + 1))
    indicators[np.arange(q.shape[0]), colors] = 1.0
    return pattern, colors, np.asarray((q @ indicators).T)


@pytest.mark.parametrize("backend", BACKENDS)
def test_factor_against_dense_linear_algebra(backend):
    q = random_spd(300, seed=1)
    pattern, colors, products = compressed(q)
    factor, bad = factor_sparse(sparse_pattern(pattern, colors, backend), products)
    assert bad.size == 0
    dense = q.toarray()
    inverse = np.linalg.inv(dense)
    assert factor.log_det() == pytest.approx(np.linalg.slogdet(dense)[1], rel=1e-12)
    rhs = np.random.default_rng(0).normal(size=(300, 2))
    np.testing.assert_allclose(factor.solve(rhs), inverse @ rhs, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(factor.diagonal_of_inverse(), np.diag(inverse), rtol=1e-10)
    # the selected inverse, compressed like the Hessian-vector products
    rows, cols = pattern.nonzero()
    expected = np.zeros_like(products)
    expected[colors[cols], rows] = inverse[rows, cols]
    np.testing.assert_allclose(factor.compressed_inverse(), expected, atol=1e-12)
    # a draw is mean + P^T L^-T z: its covariance over z is Q^-1 exactly
    z = np.eye(300)
    draws = np.stack([factor.sample_given(np.zeros(300), z[:, k])[0] for k in range(300)], axis=1)
    np.testing.assert_allclose(draws @ draws.T, inverse, atol=1e-10)
    # many draws at once (the linear draws of a fit): the same draws, and each one's log density N(mean, Q^-1)
    means = np.random.default_rng(1).normal(size=(300, 300))
    many, log_density = factor.sample_many(means, z)
    np.testing.assert_allclose(many - means, draws.T, atol=1e-12)
    exact = stats.multivariate_normal(np.zeros(300), inverse).logpdf(many - means)
    np.testing.assert_allclose(log_density, exact, rtol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_indefinite_matrix_is_reported_not_repaired(backend):
    q = random_spd(200, seed=2).tolil()
    q[57, 57] = -40.0
    pattern, colors, products = compressed(sp.csc_matrix(q))
    factor, bad = factor_sparse(sparse_pattern(pattern, colors, backend), products)
    assert factor is None
    assert bad.size == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_singular_matrix_is_reported(backend):
    q = random_spd(100, seed=4).tolil()
    q[40, :] = 0.0
    q[:, 40] = 0.0
    q = sp.csc_matrix(q)
    pattern, colors, _ = compressed(q + sp.eye(100, format="csc"))  # (40, 40) stays in the pattern, valued 0
    indicators = np.zeros((100, colors.max() + 1))
    indicators[np.arange(100), colors] = 1.0
    factor, bad = factor_sparse(sparse_pattern(pattern, colors, backend), np.asarray((q @ indicators).T))
    assert factor is None
    assert bad.size == 1


def test_takahashi_needs_a_closed_pattern_with_the_diagonal():
    a = np.random.default_rng(5).normal(size=(30, 30))
    dense = np.linalg.cholesky(a @ a.T + 30.0 * np.eye(30))  # no zero below the diagonal
    complete = sp.csc_matrix(dense)
    inverse = takahashi_inverse(complete).toarray()  # a full lower pattern is trivially closed
    np.testing.assert_allclose(np.tril(inverse), np.tril(np.linalg.inv(dense @ dense.T)), atol=1e-10)
    missing_fill = complete.tolil()
    missing_fill[29, 1] = 0.0  # column 0 reaches rows 1 and 29, so (29, 1) is fill that must be present
    missing_fill = sp.csc_matrix(missing_fill)
    missing_fill.eliminate_zeros()
    with pytest.raises(ValueError, match="not closed"):
        takahashi_inverse(missing_fill)
    missing_diagonal = complete.tolil()
    missing_diagonal[3, 3] = 0.0
    missing_diagonal = sp.csc_matrix(missing_diagonal)
    missing_diagonal.eliminate_zeros()
    with pytest.raises(ValueError, match="diagonal"):
        takahashi_inverse(missing_diagonal)


@pytest.mark.parametrize("keep_plan", [True, False])
def test_takahashi_on_a_banded_factor_equals_the_dense_inverse(monkeypatch, keep_plan):
    """A banded factor (closed pattern with zeros outside the band), factored twice with other values: the plan of
    positions worked out for the first pattern serves the second, and the column-by-column path gives the same."""
    import pymc_laplace.inner.sparse

    if not keep_plan:
        monkeypatch.setattr(pymc_laplace.inner.sparse, "MAX_PLAN_ENTRIES", 0)
    rng = np.random.default_rng(8)
    n, band = 60, 4
    for _ in range(2):
        a = rng.normal(size=(n, n)) * (np.abs(np.subtract.outer(np.arange(n), np.arange(n))) <= band)
        q = a @ a.T + 2.0 * band * np.eye(n)  # bandwidth 2 * band: its Cholesky factor keeps that band
        lower = np.linalg.cholesky(q)
        inside = np.tril(np.abs(np.subtract.outer(np.arange(n), np.arange(n))) <= 2 * band)
        rows, cols = np.nonzero(inside)
        factor = sp.csc_matrix((lower[rows, cols], (rows, cols)), shape=(n, n))
        inverse = takahashi_inverse(factor).toarray()
        expected = np.linalg.inv(q)
        np.testing.assert_allclose(inverse[inside], expected[inside], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("keep_plan", [True, False])
def test_takahashi_on_an_arrow_factor_equals_the_dense_inverse(monkeypatch, keep_plan):
    """Dense blocks of 5 (a group's correlated effects) all coupled to 3 shared rows last (the fixed effects): each
    block is a run of 5 columns with the same 3 rows below, taken together (a supernode with rows below it)."""
    import pymc_laplace.inner.sparse

    if not keep_plan:
        monkeypatch.setattr(pymc_laplace.inner.sparse, "MAX_PLAN_ENTRIES", 0)
    rng = np.random.default_rng(13)
    n_blocks, size, shared = 12, 5, 3
    n = n_blocks * size + shared
    block_of = np.append(np.repeat(np.arange(n_blocks), size), np.full(shared, n_blocks))
    inside = (
        (block_of[:, None] == block_of[None, :]) | (block_of[:, None] == n_blocks) | (block_of[None, :] == n_blocks)
    )
    a = rng.normal(size=(n, n)) * inside
    q = a @ a.T * inside + n * np.eye(n)  # the arrow pattern; eliminating the blocks first fills nothing outside it
    lower = np.linalg.cholesky(q)
    rows, cols = np.nonzero(np.tril(inside))
    factor = sp.csc_matrix((lower[rows, cols], (rows, cols)), shape=(n, n))
    widths = np.diff(pymc_laplace.inner.sparse._supernodes(factor.indptr, factor.indices))
    # the last block runs on into the shared rows below it: one run of 8 columns with nothing below
    np.testing.assert_array_equal(widths, [size] * (n_blocks - 1) + [size + shared])
    inverse = takahashi_inverse(factor).toarray()
    np.testing.assert_allclose(inverse[rows, cols], np.linalg.inv(q)[rows, cols], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("keep_plan", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
def test_selected_inverse_of_crossed_effects_equals_the_dense_inverse(monkeypatch, backend, keep_plan):
    """Two crossed grouping factors (as InstEval's students and lecturers): elimination fills the factor into dense
    trailing blocks, whose runs of columns with one pattern are taken together (supernodes), with or without a
    kept plan."""
    import pymc_laplace.inner.sparse

    if not keep_plan:
        monkeypatch.setattr(pymc_laplace.inner.sparse, "MAX_PLAN_ENTRIES", 0)
    rng = np.random.default_rng(12)
    n_a, n_b, n_obs = 120, 40, 900
    design = sp.hstack(
        [
            sp.csr_matrix((np.ones(n_obs), (np.arange(n_obs), rng.integers(0, n_a, n_obs))), shape=(n_obs, n_a)),
            sp.csr_matrix((np.ones(n_obs), (np.arange(n_obs), rng.integers(0, n_b, n_obs))), shape=(n_obs, n_b)),
        ]
    ).tocsr()
    weights = sp.diags(rng.uniform(0.5, 2.0, n_obs))
    q = sp.csc_matrix(design.T @ weights @ design + sp.diags(rng.uniform(0.5, 1.5, n_a + n_b)))
    pattern, colors, products = compressed(q)
    factor, bad = factor_sparse(sparse_pattern(pattern, colors, backend), products)
    assert bad.size == 0
    lower = sp.csc_matrix(factor.lower)
    widths = np.diff(pymc_laplace.inner.sparse._supernodes(lower.indptr, lower.indices))
    assert widths.max() > 10  # the dense trailing block is one wide supernode
    inverse = np.linalg.inv(q.toarray())
    rows, cols = pattern.nonzero()
    expected = np.zeros_like(products)
    expected[colors[cols], rows] = inverse[rows, cols]
    np.testing.assert_allclose(factor.compressed_inverse(), expected, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(factor.diagonal_of_inverse(), np.diag(inverse), rtol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_damped_factor_shifts_by_the_first_power_of_ten_that_is_positive_definite(backend):
    """The Newton fallback on an indefinite Q: the shift is checked against the exact smallest eigenvalue."""
    q = random_spd(200, seed=3).tolil()
    q[57, 57] = -40.0
    q = sp.csc_matrix(q)
    pattern, colors, products = compressed(q)
    structure = sparse_pattern(pattern, colors, backend)
    min_eig = 1e-3
    factor = structure.damped(products, min_eig)
    smallest = np.linalg.eigvalsh(q.toarray())[0]
    shift = min_eig * 10.0 ** np.ceil(np.log10(-smallest / min_eig))  # first shift in min_eig * 10^k above -smallest
    assert factor.log_det() == pytest.approx(np.linalg.slogdet(q.toarray() + shift * np.eye(200))[1], rel=1e-10)
    with pytest.raises(NotPositiveDefinite):  # a non-finite Q cannot be repaired by any shift
        structure.damped(np.full_like(products, np.nan), min_eig)


def test_forced_dense_blocks_refuse_a_large_connected_block():
    n = MAX_DENSE_BLOCK + 1
    tridiagonal = sp.diags([np.ones(n - 1), np.ones(n), np.ones(n - 1)], [-1, 0, 1], dtype=bool)
    with pytest.raises(ModelSpecificationError, match="factorization='auto'"):
        block_structure(tridiagonal, color_columns(tridiagonal))


# ------------------------------------------------------------------------------------------- random walk
N_STEPS = 250


def random_walk_data() -> np.ndarray:
    rng = np.random.default_rng(11)
    return np.cumsum(rng.normal(0.0, 0.3, N_STEPS)) + rng.normal(0.0, 0.5, N_STEPS)


def random_walk_model(y: np.ndarray) -> pm.Model:
    with pm.Model() as model:
        sigma_walk = pm.HalfNormal("sigma_walk", 1.0)
        sigma_obs = pm.HalfNormal("sigma_obs", 1.0)
        x = pm.GaussianRandomWalk("x", sigma=sigma_walk, init_dist=pm.Normal.dist(0.0, 1.0), steps=N_STEPS - 1)
        pm.Normal("y", x, sigma_obs, observed=y)
    return model


def exact_log_marginal(log_sigmas: np.ndarray, y: np.ndarray) -> float:
    """y ~ N(0, S): x_0 ~ N(0, 1), x_t = x_(t-1) + N(0, sigma_walk^2), y_t = x_t + N(0, sigma_obs^2)."""
    sigma_walk, sigma_obs = np.exp(log_sigmas)
    t = np.arange(y.size)
    cov = 1.0 + sigma_walk**2 * np.minimum.outer(t, t) + sigma_obs**2 * np.eye(y.size)
    return float(stats.multivariate_normal(np.zeros(y.size), cov).logpdf(y))


@pytest.fixture(scope="module")
def walk():
    y = random_walk_data()
    return y, random_walk_model(y)


@pytest.mark.parametrize("backend", ["auto", *BACKENDS])
def test_random_walk_marginal_is_the_exact_gaussian_marginal(walk, backend):
    y, model = walk
    laplace = marginal(model, random=["x"], inner=InnerNewton(factorization=backend))
    assert isinstance(laplace.structure, SparsePattern)  # one connected block of 250 > the dense limit
    assert laplace.compiled.colors.max() + 1 == 3  # tridiagonal: three compressed products
    for theta in (np.array([np.log(0.3), np.log(0.5)]), np.array([-2.0, 0.4])):
        value, grad = laplace.value_and_grad(theta)
        assert value == pytest.approx(exact_log_marginal(theta, y), abs=1e-8)
        step = 1e-5
        central = [
            (exact_log_marginal(theta + step * e, y) - exact_log_marginal(theta - step * e, y)) / (2 * step)
            for e in np.eye(2)
        ]
        np.testing.assert_allclose(grad, central, rtol=1e-6, atol=1e-6)


def test_random_walk_ml_fit_matches_exact_maximum_likelihood(walk):
    y, model = walk
    exact = optimize.minimize(lambda t: -exact_log_marginal(t, y), x0=np.array([-1.0, -1.0]), method="BFGS",
                              options={"gtol": 1e-8})  # fmt: skip
    result = fit_integrated_laplace(model, random=["x"], draws=20, chains=1, random_seed=1, progressbar=False)
    fit = get_group(result, "fit")
    np.testing.assert_allclose(fit["mean_vector"].values, exact.x, atol=1e-5)
    assert float(fit["log_marginal_likelihood"]) == pytest.approx(-exact.fun, abs=1e-7)
    # standard errors from the exact marginal's Hessian (central differences of the exact density)
    step = 1e-4

    def f(t: np.ndarray) -> float:
        return exact_log_marginal(t, y)

    x0, eye = exact.x, np.eye(2)
    hess = np.array([
        [(f(x0 + step * (ei + ej)) - f(x0 + step * (ei - ej)) - f(x0 - step * (ei - ej)) + f(x0 - step * (ei + ej)))
         / (4 * step**2) for ej in eye]
        for ei in eye
    ])  # fmt: skip
    np.testing.assert_allclose(fit["covariance_matrix"].values, np.linalg.inv(-hess), rtol=1e-3)
    assert get_group(result, "posterior")["x"].shape == (1, 20, N_STEPS)


def test_poisson_random_walk_sparse_gradient_matches_central_differences():
    rng = np.random.default_rng(5)
    counts = rng.poisson(np.exp(1.0 + np.cumsum(rng.normal(0.0, 0.2, N_STEPS))))
    with pm.Model() as model:
        sigma_walk = pm.HalfNormal("sigma_walk", 1.0)
        level = pm.Normal("level", 0.0, 5.0)
        x = pm.GaussianRandomWalk("x", sigma=sigma_walk, init_dist=pm.Normal.dist(0.0, 1.0), steps=N_STEPS - 1)
        pm.Poisson("counts", pm.math.exp(level + x), observed=counts)
    sparse = marginal(model, random=["x"], inner=InnerNewton(factorization="superlu"))
    dense = marginal(model, random=["x"], inner=InnerNewton(factorization="blocks"))
    theta = np.array([np.log(0.25), 0.8])
    value, grad = sparse.value_and_grad(theta)
    dense_value, dense_grad = dense.value_and_grad(theta)
    assert value == pytest.approx(dense_value, abs=1e-9)
    np.testing.assert_allclose(grad, dense_grad, rtol=1e-8)
    step = 1e-4  # smaller steps resolve the inner solve's tolerance, not the derivative
    central = [(sparse.value(theta + step * e) - sparse.value(theta - step * e)) / (2 * step) for e in np.eye(2)]
    np.testing.assert_allclose(grad, central, rtol=1e-6, atol=1e-7)


def test_factorization_choice_errors(walk, monkeypatch):
    _, model = walk
    with pytest.raises(ModelSpecificationError, match="choose one of"):
        marginal(model, random=["x"], inner=InnerNewton(factorization="dense"))
    monkeypatch.setattr(sys.modules["pymc_laplace.inner.marginal"], "cholmod_available", lambda: False)
    with pytest.raises(ModelSpecificationError, match=r"pymc_laplace\[sparse\]"):
        marginal(model, random=["x"], inner=InnerNewton(factorization="cholmod"))
    assert isinstance(marginal(model, random=["x"]).structure, SparsePattern)  # auto falls back to SuperLU
