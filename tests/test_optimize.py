"""The Newton solver on problems with known optima and known failures."""

from __future__ import annotations

import numpy as np
import pytest

from pymc_laplace.outer import optimize
from pymc_laplace.outer.optimize import NewtonOptimizer, NewtonStatus


def rosenbrock(x: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Negative Rosenbrock function: maximum 0 at (1, 1), indefinite Hessian away from it."""
    a, b = x
    f = -((1 - a) ** 2 + 100 * (b - a**2) ** 2)
    g = -np.array([-2 * (1 - a) - 400 * a * (b - a**2), 200 * (b - a**2)])
    h = -np.array([[2 - 400 * (b - a**2) + 800 * a**2, -400 * a], [-400 * a, 200.0]])
    return f, g, h


def test_rosenbrock_from_a_hard_start():
    result = NewtonOptimizer().maximize(rosenbrock, np.array([-1.2, 1.0]))
    assert result.status is NewtonStatus.SUCCESS
    np.testing.assert_allclose(result.x, [1.0, 1.0], atol=1e-10)
    assert result.grad_norm <= 1e-8


def test_quadratic_in_one_step():
    center = np.array([1.0, -2.0, 3.0])

    def quadratic(x):
        r = x - center
        return -0.5 * r @ r, -r, -np.eye(3)

    result = NewtonOptimizer().maximize(quadratic, np.zeros(3))
    assert result.success and result.n_steps == 1
    np.testing.assert_allclose(result.x, center)


def test_max_steps_is_reported():
    result = NewtonOptimizer(max_steps=2).maximize(rosenbrock, np.array([-1.2, 1.0]))
    assert result.status is NewtonStatus.MAX_STEPS and not result.success


def test_unbounded_direction_diverges():
    def linear(x):
        return float(x[0]), np.array([1.0]), np.zeros((1, 1))

    result = NewtonOptimizer().maximize(linear, np.zeros(1))
    assert result.status is NewtonStatus.DIVERGED


def test_nonfinite_start():
    result = NewtonOptimizer().maximize(lambda x: (np.nan, x, np.eye(1)), np.zeros(1))
    assert result.status is NewtonStatus.NONFINITE


@pytest.mark.parametrize("gtol", [1e-4, 1e-10])
def test_gtol_is_respected(gtol):
    result = NewtonOptimizer(gtol=gtol).maximize(rosenbrock, np.array([0.0, 0.0]))
    assert result.success and result.grad_norm <= max(gtol, 1e-12)


def arrowhead(n: int, last: float) -> np.ndarray:
    """A sparse symmetric matrix: a diagonal and a last row and column; positive definite iff ``last`` exceeds
    ``sum(c_i^2 / d_i)`` (= 0.5 here), with one negative eigenvalue below that."""
    matrix = np.diag(np.linspace(1.0, 2.0, n))
    coupling = np.sqrt(0.5 / (n - 1) * np.diag(matrix)[:-1])
    matrix[-1, :-1] = matrix[:-1, -1] = coupling
    matrix[-1, -1] = last
    return matrix


@pytest.mark.parametrize("mu", [0.0, 0.3])
def test_sparse_newton_step_is_the_dense_one(mu):
    """A large, sparse negative Hessian is factorised as a sparse matrix, to the same step and the same verdict on
    positive definiteness as the dense Cholesky."""
    n = 2 * optimize._SPARSE_MIN_SIZE
    grad = np.random.default_rng(0).normal(size=n)
    positive_definite = arrowhead(n, 0.6)
    step = optimize._damped_newton_step(positive_definite, grad, mu)
    np.testing.assert_allclose(step, np.linalg.solve(positive_definite + mu * np.eye(n), grad), rtol=1e-10)
    indefinite = arrowhead(n, 0.2 - mu)
    assert np.linalg.eigvalsh(indefinite + mu * np.eye(n)).min() < 0
    assert optimize._damped_newton_step(indefinite, grad, mu) is None
    singular = np.diag(np.r_[np.ones(n - 1), 0.0])  # a zero pivot
    assert optimize._damped_newton_step(singular, grad, 0.0) is None


def test_sparse_and_dense_newton_find_the_same_mode(monkeypatch):
    """``-sum(cosh(x - c)) - x^T A x / 2`` with a sparse ``A``: the same mode by sparse and by dense steps."""
    n = 2 * optimize._SPARSE_MIN_SIZE
    center = np.random.default_rng(1).normal(size=n)
    a = arrowhead(n, 0.6)

    def objective(x):
        return (
            -np.sum(np.cosh(x - center)) - 0.5 * x @ a @ x,
            -np.sinh(x - center) - a @ x,
            -np.diag(np.cosh(x - center)) - a,
        )

    sparse = NewtonOptimizer().maximize(objective, np.zeros(n))
    monkeypatch.setattr(optimize, "_SPARSE_MIN_SIZE", n + 1)
    dense = NewtonOptimizer().maximize(objective, np.zeros(n))
    assert sparse.success and dense.success and sparse.n_steps == dense.n_steps
    np.testing.assert_allclose(sparse.x, dense.x, rtol=1e-12, atol=1e-12)
