"""Newton's method with exact derivatives, as a small immutable solver object.

The solver maximises a log density given a function that returns its value, exact gradient and exact Hessian.
Each step solves ``(-H + mu I) p = g`` by Cholesky: ``mu = 0`` gives the pure Newton step (quadratic convergence
near the mode), and ``mu`` grows (Levenberg-Marquardt damping) only where ``-H`` is not positive definite or the
full step fails to increase the log density. Convergence is judged on the gradient.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import numpy as np
import scipy.linalg
import scipy.sparse
import scipy.sparse.linalg

ValueGradHess = Callable[[np.ndarray], tuple[float, np.ndarray, np.ndarray]]


class NewtonStatus(Enum):
    """How a Newton run ended. ``SUCCESS`` is the only state whose mode may be used."""

    SUCCESS = "converged: the largest absolute gradient component is below gtol"
    SUCCESS_AT_PRECISION = (
        "converged to the limit of floating-point precision: the Newton decrement is negligible although the "
        "gradient is slightly above gtol"
    )
    MAX_STEPS = "stopped after max_steps Newton steps without reaching gtol"
    DIVERGED = "the parameters diverge: the log density keeps increasing as they grow without bound"
    UNBOUNDED = "the log density reached +inf: it is unbounded above"
    NONFINITE = "the log density is not finite at the start point"
    DERIVATIVES_NONFINITE = (
        "the gradient or Hessian is not finite (they overflow) at a point where the log density is finite"
    )
    STALLED = "no step increases the log density, but the gradient is not small"

    @property
    def converged(self) -> bool:
        return self in (NewtonStatus.SUCCESS, NewtonStatus.SUCCESS_AT_PRECISION)


@dataclass(frozen=True)
class OptimizerResult:
    """Outcome of a Newton run.

    Attributes
    ----------
    x : ndarray, shape (n,)
        Final point (the mode when ``status.converged``).
    logp : float
        Log density at ``x``.
    grad : ndarray, shape (n,)
        Gradient at ``x``.
    hessian : ndarray, shape (n, n)
        Hessian of the log density at ``x``.
    status : NewtonStatus
    n_steps : int
        Newton steps taken.
    n_evaluations : int
        Evaluations of value, gradient and Hessian.
    wall_time : float
        Seconds spent.
    """

    x: np.ndarray
    logp: float
    grad: np.ndarray
    hessian: np.ndarray
    status: NewtonStatus
    n_steps: int
    n_evaluations: int
    wall_time: float

    @property
    def grad_norm(self) -> float:
        return float(np.max(np.abs(self.grad))) if self.grad.size else 0.0

    @property
    def success(self) -> bool:
        return self.status.converged

    @property
    def message(self) -> str:
        return self.status.value


@dataclass(frozen=True)
class NewtonOptimizer:
    """Damped Newton maximiser of a log density with exact gradient and Hessian.

    Parameters
    ----------
    gtol : float
        Converged when ``max |d logp / dx| <= gtol`` and the Newton step is below ``xtol``.
    xtol : float
        Converged only when the Newton step ``max |H^-1 g| <= xtol * (1 + max |x|)`` (with ``-H`` positive
        definite): in a flat region (a separated logistic regression with a flat prior, an improper posterior) the
        gradient is tiny while the mode is still far away or does not exist.
    max_steps : int
        Newton steps allowed.
    divergence_bound : float
        Any unconstrained coordinate beyond this magnitude means the search diverges (an improper or unbounded
        posterior): on the log scale of a positive parameter, 1e4 is already absurd.

    Examples
    --------
    >>> import numpy as np
    >>> f = lambda x: (-0.5 * x @ x, -x, -np.eye(x.size))
    >>> NewtonOptimizer().maximize(f, np.ones(3)).x
    array([0., 0., 0.])
    """

    gtol: float = 1e-8
    xtol: float = 1e-6
    max_steps: int = 200
    divergence_bound: float = 1e4

    def maximize(
        self,
        value_grad_hess: ValueGradHess,
        x0: np.ndarray,
        callback: Callable[[int, float, float], None] | None = None,
        value: Callable[[np.ndarray], float] | None = None,
        start_value: tuple[float, np.ndarray, np.ndarray] | None = None,
    ) -> OptimizerResult:
        """Maximise from ``x0``. ``callback(step, logp, grad_norm)`` is called after every accepted step.

        ``value``, the log density alone, screens trial points when it is much cheaper than the Hessian: a trial
        whose log density is clearly below the current one is rejected without its derivatives. The steps taken
        are the same with or without it. ``start_value``: ``value_grad_hess(x0)`` when the caller has it already.
        """
        start = time.perf_counter()
        x = np.array(x0, dtype=float)
        f, g, h = value_grad_hess(x) if start_value is None else start_value
        n_eval, mu = 1, 0.0
        status = NewtonStatus.MAX_STEPS
        step = 0
        overflowed = False  # in the latest step, a trial that raised the log density had overflowing derivatives
        if not np.isfinite(f):
            status = NewtonStatus.NONFINITE
        elif not (np.all(np.isfinite(g)) and np.all(np.isfinite(h))):
            status = NewtonStatus.DERIVATIVES_NONFINITE
        else:
            for step in range(1, self.max_steps + 1):
                if self._converged(x, g, h):
                    status, step = NewtonStatus.SUCCESS, step - 1
                    break
                accepted = overflowed = False
                newton_decrement = None
                g_norm = np.max(np.abs(g), initial=0.0)
                while mu < 1e20:
                    p = _damped_newton_step(-h, g, mu)
                    if p is None:
                        mu = _increase(mu, h)
                        continue
                    decrement = float(g @ p)
                    if mu == 0.0:
                        newton_decrement = decrement
                    x_new = x + p
                    if value is not None and _clearly_lower(value, x_new, f):
                        mu = _increase(mu, h)
                        continue
                    f_new, g_new, h_new = value_grad_hess(x_new)
                    n_eval += 1
                    if f_new == np.inf:
                        status = NewtonStatus.UNBOUNDED
                        x, f = x_new, f_new
                        break
                    # NaN, like -inf, means the step left the region the model can evaluate: damp it
                    derivatives_finite = np.all(np.isfinite(g_new)) and np.all(np.isfinite(h_new))
                    increases = f_new >= f + 1e-4 * decrement
                    overflowed = overflowed or bool(increases and not derivatives_finite)
                    # near the mode f no longer resolves the progress; accept a step that shrinks the gradient
                    polishes = f_new >= f - 1e-14 * max(1.0, abs(f)) and np.max(np.abs(g_new)) < g_norm
                    if derivatives_finite and (increases or polishes):
                        x, f, g, h = x_new, f_new, g_new, h_new
                        accepted = True
                        mu = 0.0 if mu < 1e-6 else mu / 10.0
                        break
                    mu = _increase(mu, h)
                if not accepted:
                    if status is not NewtonStatus.UNBOUNDED:
                        precise = newton_decrement is not None and newton_decrement <= 1e-12 * max(1.0, abs(f))
                        if precise:
                            status = NewtonStatus.SUCCESS_AT_PRECISION
                        elif overflowed:
                            status = NewtonStatus.DERIVATIVES_NONFINITE
                        else:
                            status = NewtonStatus.STALLED
                    break
                if callback is not None:
                    callback(step, f, float(np.max(np.abs(g), initial=0.0)))
                if np.max(np.abs(x), initial=0.0) > self.divergence_bound:
                    status = NewtonStatus.DIVERGED
                    break
            else:
                if self._converged(x, g, h):
                    status = NewtonStatus.SUCCESS
                elif overflowed:  # the steps were cut short by the overflow, not by a lack of them
                    status = NewtonStatus.DERIVATIVES_NONFINITE
        return OptimizerResult(x, f, g, h, status, step, n_eval, time.perf_counter() - start)

    def _converged(self, x: np.ndarray, g: np.ndarray, h: np.ndarray) -> bool:
        """A small gradient, with the remaining Newton step small too.

        Where ``-H`` is not positive definite a stationary point is returned as it is: the Gaussian's own check
        then names the flat or downward-curving directions.
        """
        if np.max(np.abs(g), initial=0.0) > self.gtol:
            return False
        newton_step = _damped_newton_step(-h, g, 0.0)
        if newton_step is None:
            return True
        return float(np.max(np.abs(newton_step), initial=0.0)) <= self.xtol * (
            1.0 + float(np.max(np.abs(x), initial=0.0))
        )


# A trial point whose screened log density is below the current one by more than this (relative) is rejected
# without its derivatives. Far above the 1e-14 of the acceptance test, so that the screen and the full evaluation
# (separately compiled graphs, equal to rounding) cannot disagree on a decision.
_SCREEN_RTOL = 1e-9


def _clearly_lower(value: Callable[[np.ndarray], float], x: np.ndarray, f: float) -> bool:
    """Whether the log density at ``x`` is NaN, -inf or clearly below ``f``: a trial that would be rejected."""
    try:
        f_new = float(value(x))
    except Exception:  # let the full evaluation raise, or not, as it would without the screen
        return False
    return not f_new >= f - _SCREEN_RTOL * max(1.0, abs(f))


def _increase(mu: float, hessian: np.ndarray) -> float:
    scale = float(np.max(np.abs(np.diag(hessian)), initial=0.0)) or 1.0
    return max(10.0 * mu, 1e-8 * scale, 1e-12)


# A negative Hessian of at least this size whose nonzero entries are at most this fraction is factorised as a
# sparse matrix: in a hierarchical model the group effects are coupled only through a few parameters, and a
# Newton step costs milliseconds instead of a dense Cholesky's n^3 / 3 flops (0.1 to 1 s at n = 2,000).
_SPARSE_MIN_SIZE = 300
_SPARSE_MAX_DENSITY = 0.05


def _damped_newton_step(neg_hessian: np.ndarray, grad: np.ndarray, mu: float) -> np.ndarray | None:
    """Solve ``(neg_hessian + mu I) p = grad``; None when the matrix is not positive definite."""
    n = grad.size
    if n >= _SPARSE_MIN_SIZE and np.count_nonzero(neg_hessian) <= _SPARSE_MAX_DENSITY * n * n:
        return _sparse_damped_newton_step(neg_hessian, grad, mu)
    a = neg_hessian + mu * np.eye(n) if mu else neg_hessian
    try:
        factor = scipy.linalg.cho_factor(a, lower=True, check_finite=False)
    except (np.linalg.LinAlgError, ValueError):
        return None
    p = scipy.linalg.cho_solve(factor, grad, check_finite=False)
    return p if np.all(np.isfinite(p)) else None


def _sparse_damped_newton_step(neg_hessian: np.ndarray, grad: np.ndarray, mu: float) -> np.ndarray | None:
    """:func:`_damped_newton_step` by a sparse ``L D L^T``: SuperLU with a symmetric fill-reducing ordering and
    diagonal pivots only, so that the matrix is positive definite exactly when every pivot is positive."""
    a = scipy.sparse.csc_matrix(neg_hessian)
    if mu:
        a = scipy.sparse.csc_matrix(a + mu * scipy.sparse.eye(grad.size, format="csc"))
    try:
        lu = scipy.sparse.linalg.splu(
            a, permc_spec="MMD_AT_PLUS_A", diag_pivot_thresh=0.0, options={"SymmetricMode": True}
        )
    except RuntimeError:  # an exactly zero pivot
        return None
    # an off-diagonal pivot (a zero on the diagonal) or a pivot <= 0: not positive definite
    if not np.array_equal(lu.perm_r, lu.perm_c) or not np.all(lu.U.diagonal() > 0):
        return None
    p = lu.solve(grad)
    return p if np.all(np.isfinite(p)) else None
