"""The Newton solver on problems with known optima and known failures."""

from __future__ import annotations

import numpy as np
import pytest

from pymc_laplace.optimize import NewtonOptimizer, NewtonStatus


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
