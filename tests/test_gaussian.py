"""The Gaussian approximation against SciPy's multivariate normal and exact moments; its flat-direction check.

The flat-direction error raised through ``fit_laplace`` (an exactly singular Hessian) is tested in test_errors.py;
here the check is fed precisions whose Cholesky factorisation succeeds although a direction is flat, which the
check must still find by the eigendecomposition.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from scipy import stats

from pymc_laplace import HessianNotPositiveDefiniteError
from pymc_laplace.gaussian import FLAT_DIRECTION_RTOL, gaussian_from_precision

LABELS = ["a", "b", "c", "d", "e"]


def direction_pattern(first: str, second: str, *, same_sign: bool) -> str:
    """A regex for ``0.707 * first +- 0.707 * second`` in either order and either overall sign."""
    pairs = [(first, second), (second, first)]
    signs = [("", "+"), ("-", "-")] if same_sign else [("", "-"), ("-", "+")]
    return "|".join(rf"along {lead}0\.707 \* {x} \{sign} 0\.707 \* {y}\n" for x, y in pairs for lead, sign in signs)


def random_spd(rng: np.random.Generator, n: int) -> np.ndarray:
    """A random symmetric positive definite matrix with eigenvalues spread over two orders of magnitude."""
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return (q * np.geomspace(0.1, 10.0, n)) @ q.T


def with_spectrum(direction: np.ndarray, small: float, rng: np.random.Generator) -> np.ndarray:
    """A 5 x 5 precision with eigenvalue ``small`` along the unit ``direction`` and 1..4 along the others."""
    direction = direction / np.linalg.norm(direction)
    basis, _ = np.linalg.qr(np.column_stack([direction, rng.standard_normal((5, 4))]))
    basis[:, 0] = direction  # qr may flip the sign of the first column
    return (basis * np.array([small, 1.0, 2.0, 3.0, 4.0])) @ basis.T


@pytest.mark.parametrize("dim", [1, 5, 50])
@pytest.mark.parametrize("batch", [(), (7,), (3, 4)])
def test_logpdf_matches_scipy(dim, batch):
    rng = np.random.default_rng(dim)
    precision = random_spd(rng, dim)
    mean = rng.normal(size=dim)
    gaussian = gaussian_from_precision(mean, precision, [f"x[{i}]" for i in range(dim)])
    x = mean + rng.normal(size=(*batch, dim)) * 2.0
    expected = stats.multivariate_normal(mean, np.linalg.inv(precision)).logpdf(x)
    ours = gaussian.logpdf(x)
    assert ours.shape == batch
    np.testing.assert_allclose(ours, expected, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(gaussian.covariance, np.linalg.inv(precision), rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(gaussian.covariance, gaussian.covariance.T)
    assert gaussian.log_det_precision == pytest.approx(np.linalg.slogdet(precision)[1], rel=1e-12, abs=1e-12)


def test_draws_have_the_exact_mean_and_covariance():
    """Monte Carlo: 40,000 draws, tolerances of several standard errors."""
    rng = np.random.default_rng(1)
    precision = random_spd(rng, 5)
    mean = rng.normal(size=5)
    gaussian = gaussian_from_precision(mean, precision, LABELS)
    draws = gaussian.sample(np.random.default_rng(2), (8, 5000))
    assert draws.shape == (8, 5000, 5)
    flat = draws.reshape(-1, 5)
    covariance = np.linalg.inv(precision)
    standard_error = np.sqrt(np.diag(covariance) / flat.shape[0])
    np.testing.assert_array_less(np.abs(flat.mean(axis=0) - mean), 5.0 * standard_error)
    scale = np.sqrt(np.outer(np.diag(covariance), np.diag(covariance)))
    np.testing.assert_array_less(np.abs(np.cov(flat, rowvar=False) - covariance) / scale, 0.05)
    # the same seed gives the same draws
    np.testing.assert_array_equal(draws, gaussian.sample(np.random.default_rng(2), (8, 5000)))


@pytest.mark.parametrize("hidden_from_pivots", [False, True], ids=["pivots", "condition"])
def test_flat_direction_behind_a_successful_cholesky_is_named(hidden_from_pivots):
    """An eigenvalue 1e-13 of the largest: Cholesky succeeds, yet the direction is flat and must be named, also
    when the factor's pivots do not show it (a direction whose last coordinate is small); then only the
    condition number does."""
    direction = np.array([1.0, -1.0, 0.0, 0.0, 1e-3 if hidden_from_pivots else 0.0])
    precision = with_spectrum(direction, 4e-13, np.random.default_rng(3))
    pivots = np.diag(np.linalg.cholesky(precision)) ** 2  # the factorisation alone would accept it
    assert (pivots.min() / pivots.max() > 1e4 * FLAT_DIRECTION_RTOL) == hidden_from_pivots
    with pytest.raises(HessianNotPositiveDefiniteError, match=direction_pattern("a", "b", same_sign=False)):
        gaussian_from_precision(np.zeros(5), precision, LABELS)


@pytest.mark.parametrize("ratio", [0.1, 10.0])
def test_flat_direction_tolerance(ratio):
    """An eigenvalue just above ``FLAT_DIRECTION_RTOL`` times the largest is curvature, just below it is flat."""
    precision = with_spectrum(
        np.array([1.0, -1.0, 0.0, 0.0, 0.0]), 4.0 * FLAT_DIRECTION_RTOL * ratio, np.random.default_rng(4)
    )
    if ratio < 1:
        with pytest.raises(HessianNotPositiveDefiniteError, match=r"eigenvalue 4e-12 ") as raised:
            gaussian_from_precision(np.zeros(5), precision, LABELS)
        assert re.search(direction_pattern("a", "b", same_sign=False), str(raised.value))
    else:
        gaussian = gaussian_from_precision(np.zeros(5), precision, LABELS)
        np.testing.assert_allclose(gaussian.precision_cholesky @ gaussian.precision_cholesky.T, precision, atol=1e-14)


def test_downward_curvature_is_named():
    """A saddle: Cholesky fails and the negative eigenvalue's direction is named."""
    precision = with_spectrum(np.array([0.0, 0.0, 1.0, 1.0, 0.0]), -0.5, np.random.default_rng(5))
    with pytest.raises(HessianNotPositiveDefiniteError, match=r"eigenvalue -0\.5 ") as raised:
        gaussian_from_precision(np.zeros(5), precision, LABELS)
    assert re.search(direction_pattern("c", "d", same_sign=True), str(raised.value))
