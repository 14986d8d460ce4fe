"""The Gaussian approximation: a mean and an exact precision matrix, checked and factorised once."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.linalg

from pymc_laplace.errors import HessianNotPositiveDefiniteError

LOG_2PI = float(np.log(2.0 * np.pi))
# An eigenvalue of the precision this small relative to the largest is numerically zero: a flat direction.
FLAT_DIRECTION_RTOL = 1e-11


@dataclass(frozen=True)
class Gaussian:
    """A multivariate normal ``N(mean, precision^-1)`` with its factors.

    Attributes
    ----------
    mean : ndarray, shape (n,)
    precision : ndarray, shape (n, n)
    covariance : ndarray, shape (n, n)
    covariance_cholesky : ndarray, shape (n, n)
        Lower-triangular ``L`` with ``L L^T = covariance``.
    log_det_precision : float
    """

    mean: np.ndarray
    precision: np.ndarray
    covariance: np.ndarray
    covariance_cholesky: np.ndarray
    log_det_precision: float

    @property
    def dim(self) -> int:
        return self.mean.size

    def sample(self, rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
        """Draws of shape ``shape + (n,)``."""
        z = rng.standard_normal((*shape, self.dim))
        return self.mean + z @ self.covariance_cholesky.T

    def logpdf(self, x: np.ndarray) -> np.ndarray:
        """Log density at ``x`` of shape ``(..., n)``."""
        r = x - self.mean
        quad = np.einsum("...i,ij,...j->...", r, self.precision, r)
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
    check_positive_definite(precision, labels, what=what)
    chol_prec = scipy.linalg.cholesky(precision, lower=True)
    log_det = 2.0 * float(np.sum(np.log(np.diag(chol_prec))))
    # covariance factor: (L_p^-T)(L_p^-1) = covariance; L_c = L_p^-T is upper, so use a Cholesky of the inverse
    inv_chol = scipy.linalg.solve_triangular(chol_prec, np.eye(mean.size), lower=True)
    covariance = inv_chol.T @ inv_chol
    covariance = 0.5 * (covariance + covariance.T)
    covariance_cholesky = scipy.linalg.cholesky(covariance, lower=True)
    return Gaussian(np.asarray(mean, dtype=float), precision, covariance, covariance_cholesky, log_det)


def check_positive_definite(precision: np.ndarray, labels: Sequence[str], *, what: str) -> None:
    """Raise :class:`HessianNotPositiveDefiniteError` naming the offending eigen-directions."""
    if not np.all(np.isfinite(precision)):
        bad = sorted({labels[i] for i in np.argwhere(~np.isfinite(precision)).ravel()})
        raise HessianNotPositiveDefiniteError(
            f"The Hessian of the {what} at the optimum is not finite in the entries of {bad}. "
            "Check those variables' priors and likelihood for overflow, or reparameterise."
        )
    eigenvalues, eigenvectors = np.linalg.eigh(precision)
    threshold = FLAT_DIRECTION_RTOL * max(float(np.max(np.abs(eigenvalues), initial=0.0)), 1e-300)
    offending = np.flatnonzero(eigenvalues <= threshold)
    if offending.size == 0:
        try:
            np.linalg.cholesky(precision)
            return
        except np.linalg.LinAlgError:
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
