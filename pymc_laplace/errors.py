"""Exceptions raised by pymc_laplace.

Every error says what went wrong in terms of the user's model (variable names and coordinates) and what to do
about it. Numerical failures are never repaired silently.
"""

from __future__ import annotations


class LaplaceError(RuntimeError):
    """Base class of the numerical failures of a Laplace fit."""


class ModelSpecificationError(ValueError):
    """The model or the arguments cannot be fitted by this method (raised before any numerical work)."""


class StartPointError(LaplaceError):
    """The log density is not finite at the start point, or it is but its gradient or Hessian overflows there."""


class OptimizationError(LaplaceError):
    """The optimiser did not reach a mode (diverged, stalled, ran out of steps, or the mode does not exist)."""


class HessianNotPositiveDefiniteError(LaplaceError):
    """The negative Hessian at the optimum is not positive definite: the Gaussian approximation does not exist."""


class BoundaryFitWarning(UserWarning):
    """Parameters estimated on the boundary of their space (a variance at zero, a correlation at +-1)."""


class ApproximationWarning(UserWarning):
    """The draws' importance ratios ``p/q`` say the Gaussian approximation is far from the posterior."""


class HessianNotPositiveDefiniteWarning(UserWarning):
    """Estimates returned although the negative Hessian at the optimum is not positive definite (asked for)."""
