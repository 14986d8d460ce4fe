"""The Gaussian approximation: a mean and an exact precision matrix, checked and factorised once."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import scipy.linalg
from scipy.linalg import lapack

from pymc_laplace.errors import HessianNotPositiveDefiniteError

LOG_2PI = float(np.log(2.0 * np.pi))
# An eigenvalue of the precision this small relative to the largest is numerically zero: a flat direction.
FLAT_DIRECTION_RTOL = 1e-11
# The Cholesky factor only bounds the eigenvalues (its pivots and LAPACK's estimate of the reciprocal condition
# number in the 1-norm, which is within a factor n of the 2-norm one and an estimate): the eigendecomposition that
# decides on FLAT_DIRECTION_RTOL is computed whenever those come within this factor of it.
_EIGH_MARGIN = 1e3


@dataclass(frozen=True)
class Gaussian:
    """A multivariate normal ``N(mean, precision^-1)`` with the Cholesky factor of its precision.

    Attributes
    ----------
    mean : ndarray, shape (n,)
    precision : ndarray, shape (n, n)
    precision_cholesky : ndarray, shape (n, n)
        Lower-triangular ``L`` with ``L L^T = precision``: draws are ``mean + L^-T z`` and the quadratic form of
        the log density is ``||L^T (x - mean)||^2``, so neither needs the covariance.
    log_det_precision : float
    covariance : ndarray, shape (n, n)
        ``precision^-1``, computed from the factor on first use and kept.

    Examples
    --------
    >>> import numpy as np
    >>> g = gaussian_from_precision(np.zeros(2), np.array([[2.0, 0.5], [0.5, 1.0]]), ["a", "b"])
    >>> g.sample(np.random.default_rng(0), (4, 3)).shape
    (4, 3, 2)
    >>> np.allclose(g.covariance, np.linalg.inv([[2.0, 0.5], [0.5, 1.0]]))
    True
    """

    mean: np.ndarray
    precision: np.ndarray
    precision_cholesky: np.ndarray
    log_det_precision: float

    @property
    def dim(self) -> int:
        return self.mean.size

    @cached_property
    def covariance(self) -> np.ndarray:
        """``precision^-1`` from the Cholesky factor (LAPACK ``potri``), symmetric to the last bit."""
        if self.dim == 0:
            return np.zeros((0, 0))
        lower, info = lapack.dpotri(self.precision_cholesky, lower=1)
        if info != 0:  # the factor came from a successful Cholesky: this cannot happen
            raise np.linalg.LinAlgError(f"LAPACK dpotri failed (info={info})")
        lower = np.tril(lower)
        return lower + np.tril(lower, -1).T

    def sample(self, rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
        """Draws of shape ``shape + (n,)``: ``mean + L^-T z`` with ``z`` standard normal."""
        return self.sample_and_logpdf(rng, shape)[0]

    def sample_and_logpdf(self, rng: np.random.Generator, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        """Draws of shape ``shape + (n,)`` and their log density, of shape ``shape``.

        The same draws as :meth:`sample` with the same generator; the log density comes from ``z`` (``L^T (x -
        mean) = z``), which saves :meth:`logpdf`'s product with the factor.
        """
        z = rng.standard_normal((*shape, self.dim))
        log_density = 0.5 * (self.log_det_precision - self.dim * LOG_2PI - np.einsum("...i,...i->...", z, z))
        if z.size == 0:
            return z + self.mean, log_density
        flat = z.reshape(-1, self.dim)
        # L^T X^T = Z^T: one triangular solve for all draws (the transposes are views, no copies)
        offsets = scipy.linalg.solve_triangular(
            self.precision_cholesky, flat.T, lower=True, trans="T", check_finite=False
        )
        return (self.mean + offsets.T).reshape(z.shape), log_density

    def logpdf(self, x: np.ndarray) -> np.ndarray:
        """Log density at ``x`` of shape ``(..., n)``, of shape ``(...)``."""
        x = np.asarray(x, dtype=float)
        r = (x - self.mean).reshape(int(np.prod(x.shape[:-1])), self.dim)
        # r^T P r = ||L^T r||^2, for every draw at once: the rows of r @ L are (L^T r)^T
        whitened = r @ self.precision_cholesky
        quad = np.einsum("ij,ij->i", whitened, whitened).reshape(x.shape[:-1])
        return 0.5 * (self.log_det_precision - self.dim * LOG_2PI - quad)


def gaussian_from_precision(
    mean: np.ndarray, precision: np.ndarray, labels: Sequence[str], *, ridge: float = 0.0, what: str = "log density"
) -> Gaussian:
    """Build the Gaussian with this precision, or raise naming the flat or downward-curving directions.

    Parameters
    ----------
    mean, precision : ndarray
    labels : sequence of str
        One label per coordinate, used in the error message.
    ridge : float
        Added to the diagonal of the precision before anything else (an explicit, recorded choice).
    what : str
        Name of the function whose negative Hessian ``precision`` is, for the error message.
    """
    precision = 0.5 * (precision + precision.T)
    if ridge:
        precision = precision + ridge * np.eye(mean.size)
    chol_prec = check_positive_definite(precision, labels, what=what)
    log_det = 2.0 * float(np.sum(np.log(np.diag(chol_prec))))
    return Gaussian(np.asarray(mean, dtype=float), precision, chol_prec, log_det)


def check_positive_definite(precision: np.ndarray, labels: Sequence[str], *, what: str) -> np.ndarray:
    """The lower Cholesky factor of ``precision``; raise :class:`HessianNotPositiveDefiniteError` naming the
    offending eigen-directions when it is not positive definite or is flat along a direction.

    A direction is flat when its eigenvalue is at most ``FLAT_DIRECTION_RTOL`` times the largest. The
    eigendecomposition is only computed when the Cholesky factorisation fails, or when its pivots or the
    estimated condition number say such an eigenvalue may exist (then it decides).
    """
    if not np.all(np.isfinite(precision)):
        bad = sorted({labels[i] for i in np.argwhere(~np.isfinite(precision)).ravel()})
        raise HessianNotPositiveDefiniteError(
            f"The Hessian of the {what} at the optimum is not finite in the entries of {bad}. "
            "Check those variables' priors and likelihood for overflow, or reparameterise."
        )
    n = precision.shape[0]
    if n == 0:
        return np.zeros((0, 0))
    factor, info = lapack.dpotrf(precision, lower=1, clean=1)
    if info == 0 and not _may_be_flat(precision, factor):
        return factor
    eigenvalues, eigenvectors = np.linalg.eigh(precision)
    threshold = FLAT_DIRECTION_RTOL * max(float(np.max(np.abs(eigenvalues), initial=0.0)), 1e-300)
    offending = np.flatnonzero(eigenvalues <= threshold)
    if offending.size == 0:
        if info == 0:
            return factor
        offending = np.array([int(np.argmin(eigenvalues))])
    directions = [
        f"    eigenvalue {eigenvalues[i]:.3g} along {describe_direction(eigenvectors[:, i], labels)}"
        for i in offending[:5]
    ]
    raise HessianNotPositiveDefiniteError(
        f"The negative Hessian of the {what} at the optimum is not positive definite, so no Gaussian "
        "approximation exists there. Flat or downward-curving direction(s) (unconstrained scale):\n"
        + "\n".join(directions)
        + "\nThe model is not identified along these directions (e.g. two parameters that only enter as a sum) or "
        "the optimum is a saddle. Give those variables proper priors, fix or drop a redundant parameter, or "
        "reparameterise. A ridge (`ridge=...`) adds a stated amount of prior precision on every coordinate, "
        "and is recorded in the result."
    )


def _may_be_flat(precision: np.ndarray, factor: np.ndarray) -> bool:
    """Whether the smallest eigenvalue of ``precision = factor factor^T`` may be within ``FLAT_DIRECTION_RTOL``
    of the largest, judged from the factor alone.

    The smallest squared pivot bounds the smallest eigenvalue from above, and ``1 / cond_1`` (LAPACK ``pocon``,
    O(n^2) from the factor) bounds ``lambda_min / lambda_max`` from below; both are checked with a margin.
    """
    pivots = np.diag(factor) ** 2
    limit = _EIGH_MARGIN * FLAT_DIRECTION_RTOL
    if pivots.min() <= limit * pivots.max():
        return True
    rcond, info = lapack.dpocon(factor, float(np.max(np.sum(np.abs(precision), axis=0))), uplo="L")
    return info != 0 or not rcond > limit


def describe_direction(vector: np.ndarray, labels: Sequence[str], max_terms: int = 6) -> str:
    """``0.707 * a - 0.707 * b``: the largest components of a unit direction, labelled."""
    order = np.argsort(-np.abs(vector))[:max_terms]
    order = [i for i in order if abs(vector[i]) >= 0.05 * abs(vector[order[0]])]
    terms = []
    for k, i in enumerate(order):
        coef = vector[i]
        sign = "-" if coef < 0 else "+"
        terms.append(f"{sign} {abs(coef):.3f} * {labels[i]}" if k else f"{coef:.3f} * {labels[i]}")
    return " ".join(terms)
