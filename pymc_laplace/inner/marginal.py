"""The Laplace marginal likelihood of the outer parameters, with random effects integrated out.

For each ``theta`` an inner damped Newton finds ``b^ = argmax_b l(b, theta)``; then

    L(theta) = l(b^, theta) + (n_b / 2) log(2 pi) - 1/2 log det Q(b^, theta),   Q = -d2l/db2,

and its exact gradient follows from the implicit function theorem (DESIGN-NOTES, "Exact gradient of L"):

    dL/dtheta = dl/dtheta - 1/2 dphi/dtheta - 1/2 d/dtheta [w . dl/db],   w = Q^-1 dphi/db,

with ``phi = sum over Q's pattern of (Q^-1)_ij Q_ij`` (Q^-1 held fixed). One factorisation, the blocks of
``Q^-1``, one solve and three reverse passes: cost independent of ``dim(theta)`` and linear in the number of
groups when ``Q`` is block-diagonal.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components

from pymc_laplace.compile.graphs import CompiledSplit
from pymc_laplace.errors import LaplaceError, ModelSpecificationError
from pymc_laplace.inner.blocks import (
    BatchedBlockFactor,
    BlockFactor,
    BlockStructure,
    block_structure,
    factor_blocks_batched,
)
from pymc_laplace.inner.sparse import SparseFactor, SparsePattern, cholmod_available, sparse_pattern

LOG_2PI = float(np.log(2.0 * np.pi))

# With factorization="auto", connected blocks of Q up to this size are factorised densely (batched by size);
# a larger connected block sends Q to a sparse Cholesky.
LARGEST_DENSE_BLOCK = 200
# Up to this many random effects, d b^/d theta is assembled column by column from the compiled mixed product.
MIXED_PRODUCT_COLUMNS = 2000
# chord steps (a fixed factor, gradients only) tried before Newton's method in the inner solves of the draws
CHORD_MAX_STEPS = 30


def _full_step_accepted(logp: float, grad: np.ndarray, slope: float, full: tuple[Any, ...]) -> bool:
    """Whether a full Newton step is taken: its log density ``full[0]`` rose enough (Armijo), or its change is within
    rounding of the log density while the gradient ``full[1]`` fell to under half.

    A sum over millions of observations is known to about ``1e-10`` of itself (summation error), so that near the
    mode its change says nothing; the largest gradient component of a block is a short sum, known to full precision.
    """
    value, new_grad = float(full[0]), full[1]
    if not (np.isfinite(value) and np.all(np.isfinite(new_grad))):
        return False
    if value >= logp + 1e-4 * slope:
        return True
    resolution = ROUNDING_OF_SUMS * max(1.0, abs(float(logp)))
    if value >= logp - 1e-2 * resolution:
        return True  # a change below the resolution of the log density
    shrunk = np.max(np.abs(new_grad), initial=0.0) <= 0.5 * np.max(np.abs(grad), initial=0.0)
    return bool(value >= logp - resolution and shrunk)


# The relative error to expect of a log density summed over many observations (see _full_step_accepted).
ROUNDING_OF_SUMS = 1e-10


class InnerSolveError(LaplaceError):
    """The inner Newton solve for the random effects failed at some ``theta``."""


@dataclass(frozen=True)
class InnerNewton:
    """Settings of the inner damped Newton solve.

    Parameters
    ----------
    gtol : float
        Converged when ``max |dl/db| <= gtol`` and the Newton step is below ``xtol``.
    xtol : float
        Converged only when the remaining Newton step ``max |Q^-1 dl/db| <= xtol * (1 + max |b|)``: where the
        curvature is small (a large variance) a small gradient can sit far from the mode, and the log-determinant
        must be taken at the mode, whatever the warm start.
    max_steps : int
    factorization : {"auto", "blocks", "cholmod", "superlu"}
        How ``Q = -d2l/db2`` is factorised. ``"blocks"``: batched dense Cholesky of its independent blocks (one
        per group for random intercepts and slopes); ``"cholmod"``: sparse Cholesky by CHOLMOD (the ``sparse``
        extra, scikit-sparse); ``"superlu"``: sparse Cholesky from SciPy's SuperLU in symmetric mode.
        ``"auto"`` takes blocks when no connected block exceeds 200 random effects, else CHOLMOD when it is
        installed, else SuperLU.
    """

    gtol: float = 1e-9
    xtol: float = 1e-8
    max_steps: int = 100
    factorization: Literal["auto", "blocks", "cholmod", "superlu"] = "auto"


@dataclass(frozen=True)
class InnerSolution:
    """The conditional mode of the random effects at one ``theta``.

    Attributes
    ----------
    theta : ndarray
    b : ndarray
        The mode ``b^(theta)``.
    joint_logp : float
        ``l(b^, theta)``.
    factor : BlockFactor or SparseFactor
        Cholesky factors of ``Q(b^, theta)``.
    n_steps : int
    grad_norm : float
    """

    theta: np.ndarray
    b: np.ndarray
    joint_logp: float
    factor: BlockFactor | SparseFactor
    n_steps: int
    grad_norm: float

    @property
    def log_marginal(self) -> float:
        n = self.b.size
        return self.joint_logp + 0.5 * n * LOG_2PI - 0.5 * self.factor.log_det()


@dataclass
class LaplaceMarginal:
    """The compiled Laplace marginal ``log p(y | theta)`` of a PyMC model and its exact gradient.

    This is TMB's ``obj$fn`` / ``obj$gr`` for a PyMC model. Build it with :func:`pymc_laplace.marginal`.

    Examples
    --------
    >>> import numpy as np, pymc as pm
    >>> from pymc_laplace import marginal
    >>> with pm.Model() as model:
    ...     sigma = pm.HalfNormal("sigma", 1.0)
    ...     u = pm.Normal("u", 0.0, sigma, shape=3)
    ...     _ = pm.Poisson("y", pm.math.exp(u[[0, 0, 1, 2]]), observed=[1, 2, 0, 4])
    >>> m = marginal(model, random=["u"])
    >>> value = m.logp({"sigma_log__": np.array(0.0)})
    """

    compiled: CompiledSplit
    inner: InnerNewton = field(default_factory=InnerNewton)

    def __post_init__(self) -> None:
        self.structure = choose_structure(self.compiled.pattern, self.compiled.colors, self.inner.factorization)
        self._warm_start = self.compiled.b_start.copy()
        self._last: InnerSolution | None = None
        self._data_seen = {id(var): value for var, value in self.compiled.pattern_data}
        self._values_seen = [var.get_value(borrow=True) for var in self.compiled.data_containers]

    def check_data(self) -> None:
        """Check that the Hessian pattern still holds for the current values of the model's data containers.

        The pattern is read from the graph with the data it was compiled with (index arrays, design matrices). After
        ``pm.set_data`` the pattern is walked again; new data whose pattern is covered by the compiled one are
        accepted, anything else raises (the marginal would be silently wrong).
        """
        values = [var.get_value(borrow=True) for var in self.compiled.data_containers]
        if any(new is not old for new, old in zip(values, self._values_seen, strict=True)):
            # other data (observations, covariates): the pattern holds, but a solution for the old values does not
            self._last = None
            self._values_seen = values
        changed = [
            var
            for var, _ in self.compiled.pattern_data
            if var.get_value(borrow=True) is not self._data_seen[id(var)]
            and not np.array_equal(var.get_value(borrow=True), self._data_seen[id(var)])
        ]
        if not changed:
            return
        new = sp.csr_matrix(self.compiled.repattern(), dtype=bool)
        old = sp.csr_matrix(self.compiled.pattern, dtype=bool)
        if new.shape != old.shape or (new > old).nnz:
            raise ModelSpecificationError(
                f"The data in {[var.name for var in changed]} changed after this marginal was compiled, and the new "
                "values couple random effects that the compiled Hessian pattern keeps apart. Build the marginal "
                "again (marginal(model, random=...)) after pm.set_data."
            )
        self._last = None
        for var in changed:
            self._data_seen[id(var)] = var.get_value(borrow=True)

    # -- keyed interface, as model.initial_point() keys the unconstrained values of theta
    def logp(self, point: Mapping[str, Any]) -> float:
        """Laplace log marginal likelihood ``log p(y | theta)`` at the unconstrained ``point``."""
        return self.value(self._theta_from_point(point))

    def dlogp(self, point: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Its exact gradient, keyed like ``point``."""
        _, grad = self.value_and_grad(self._theta_from_point(point))
        return self.compiled.theta_layout.split(grad)

    def _theta_from_point(self, point: Mapping[str, Any]) -> np.ndarray:
        layout = self.compiled.theta_layout
        missing = [n for n in layout.names if n not in point]
        if missing:
            raise KeyError(f"point lacks {missing}; it needs the unconstrained values of {list(layout.names)}")
        return layout.join(point)

    # -- vector interface
    def solve_inner(
        self, theta: np.ndarray, start: np.ndarray | None = None, *, chord: Any | None = None
    ) -> InnerSolution:
        """The conditional mode of the random effects at ``theta``, started from ``start`` (default: the last
        solution).

        ``chord``: a factor of ``Q`` near this ``theta`` (the estimate's, for the draws): gradient-only steps with it
        come first (:meth:`_chord`), and Newton's method then finishes, usually by one evaluation that confirms
        convergence. The mode and the convergence test are those of Newton's method alone.
        """
        theta = np.asarray(theta, dtype=float)
        self.check_data()
        if self._last is not None and np.array_equal(self._last.theta, theta):
            return self._last
        first = self._warm_start if start is None else np.asarray(start, dtype=float)
        if chord is not None:
            first = self._chord(theta, first, chord)
        solution = self._newton(theta, first.copy())
        self._warm_start = solution.b.copy()
        self._last = solution
        return solution

    def value(self, theta: np.ndarray) -> float:
        return self.solve_inner(theta).log_marginal

    def value_and_grad(self, theta: np.ndarray) -> tuple[float, np.ndarray]:
        """``L(theta)`` and its exact gradient (implicit function theorem, third derivatives by reverse passes)."""
        sol = self.solve_inner(theta)
        compiled = self.compiled
        compressed_inverse = sol.factor.compressed_inverse()
        grad_theta, dphi_db, dphi_dtheta = compiled.outer_terms(sol.b, sol.theta, compressed_inverse)
        w = sol.factor.solve(dphi_db)
        mixed = compiled.mixed_product(sol.b, sol.theta, w)
        return sol.log_marginal, np.asarray(grad_theta - 0.5 * dphi_dtheta - 0.5 * mixed, dtype=float)

    def solve_inner_batch(
        self, thetas: np.ndarray, starts: np.ndarray, *, max_batched_steps: int = 8
    ) -> tuple[np.ndarray, BatchedBlockFactor, list[tuple[int, InnerSolveError]]]:
        """Conditional modes of the random effects at many ``theta`` at once (block-diagonal ``Q`` only).

        Damped Newton vectorised across the batch (one call of the compiled batched graphs per step for every
        ``theta`` still iterating), with the convergence test of :meth:`solve_inner`. A ``theta`` whose full Newton
        step is not accepted, whose ``Q`` is not positive definite, or that has not converged after
        ``max_batched_steps`` is finished by the unbatched solve from where it stands.

        Returns
        -------
        modes : ndarray (m, n_b)
        factor : BatchedBlockFactor
            Cholesky factors of ``Q`` at each mode.
        failures : list of (index, InnerSolveError)
            The ``theta`` whose inner solve failed (their rows of ``modes`` are meaningless).
        """
        if not isinstance(self.structure, BlockStructure) or self.compiled.joint_newton_batched is None:
            raise TypeError("solve_inner_batch needs a block-diagonal Q and a graph without batched linear algebra")
        self.check_data()
        compiled, inner = self.compiled, self.inner
        thetas = np.atleast_2d(np.asarray(thetas, dtype=float))
        modes = np.array(starts, dtype=float, copy=True)
        n = thetas.shape[0]
        factor = BatchedBlockFactor.identity(self.structure, n)
        done = np.zeros(n, dtype=bool)
        unbatched: list[int] = []
        active = np.arange(n)
        for _ in range(max_batched_steps):
            if active.size == 0:
                break
            b, theta = modes[active], thetas[active]
            logp, grad, hv = compiled.joint_newton_batched(b, theta)
            finite = np.isfinite(logp) & np.all(np.isfinite(grad), axis=1) & np.all(np.isfinite(hv), axis=(1, 2))
            step_factor, positive = factor_blocks_batched(self.structure, np.where(finite[:, None, None], -hv, 0.0))
            usable = finite & positive
            direction = step_factor.solve(np.where(usable[:, None], grad, 0.0))
            grad_norm = np.max(np.abs(grad), axis=1, initial=0.0)
            step_norm = np.max(np.abs(direction), axis=1, initial=0.0)
            step_tol = inner.xtol * (1.0 + np.max(np.abs(b), axis=1, initial=0.0))
            converged = usable & (grad_norm <= inner.gtol) & (step_norm <= step_tol)
            factor.take(active[converged], step_factor, np.flatnonzero(converged))
            done[active[converged]] = True
            unbatched += active[~usable].tolist()
            moving = usable & ~converged
            if not moving.any():
                active = active[:0]
                break
            trial = b[moving] + direction[moving]
            value = compiled.joint_value_batched(trial, theta[moving])
            slope = np.sum(grad[moving] * direction[moving], axis=1)
            resolution = 1e-12 * np.maximum(1.0, np.abs(logp[moving]))
            accepted = np.isfinite(value) & (
                (value >= logp[moving] + 1e-4 * slope) | (value >= logp[moving] - resolution)
            )
            moving_index = active[moving]
            modes[moving_index[accepted]] = trial[accepted]
            unbatched += moving_index[~accepted].tolist()
            active = moving_index[accepted]
        unbatched += active.tolist()
        failures: list[tuple[int, InnerSolveError]] = []
        for k in sorted(set(unbatched)):
            try:
                solution = self._newton(thetas[k], modes[k].copy())
            except InnerSolveError as err:
                failures.append((k, err))
                continue
            modes[k] = solution.b
            factor.set(k, solution.factor)
        return modes, factor, failures

    def mode_jacobian(self, theta: np.ndarray) -> np.ndarray:
        """``d b^ / d theta = Q^-1 d2l/(db dtheta)``, shape (n_b, n_theta).

        The mixed second derivatives come from the compiled product ``d/dtheta [w . dl/db]`` (already compiled for
        the gradient of the marginal) applied to each unit ``w`` while the random effects are few; beyond
        ``MIXED_PRODUCT_COLUMNS`` from one reverse pass per outer parameter (``n_theta`` calls of a graph compiled
        on first use, which can be slow to compile for multivariate random effects).
        """
        sol = self.solve_inner(theta)
        n_b = sol.b.size
        if n_b <= MIXED_PRODUCT_COLUMNS:
            columns = [self.compiled.mixed_product(sol.b, sol.theta, unit) for unit in np.eye(n_b)]
            cross_t = np.array(columns).reshape(n_b, sol.theta.size)
        else:
            rows = [self.compiled.cross_product(sol.b, sol.theta, unit) for unit in np.eye(sol.theta.size)]
            cross_t = np.array(rows).reshape(sol.theta.size, n_b).T
        return sol.factor.solve(np.ascontiguousarray(cross_t))

    def _newton(self, theta: np.ndarray, b: np.ndarray) -> InnerSolution:
        compiled, inner = self.compiled, self.inner
        labels = compiled.b_layout.labels
        stalled, best_norm, step_norm = 0, np.inf, np.nan
        evaluated = None  # the value and derivatives at b when the line search already has them
        # where Q does not depend on b (read from the graph), the products and the factor of the first step serve all
        constant_q = compiled.hessian_constant_in_b
        factored: tuple[Any, Any, Any] | None = None  # (hv, factor, bad blocks) last factorised
        for step in range(inner.max_steps + 1):
            logp, grad, hv = evaluated if evaluated is not None else compiled.joint_newton(b, theta)
            evaluated = None
            if not (np.isfinite(logp) and np.all(np.isfinite(grad)) and np.all(np.isfinite(hv))):
                bad = np.flatnonzero(~np.isfinite(grad))
                where = f" (first non-finite gradient at {labels[bad[0]]})" if bad.size else ""
                raise InnerSolveError(
                    f"The joint log density of the random effects is not finite{where} at theta = "
                    f"{self._describe(theta)}. The outer parameters are in a region the model cannot evaluate; "
                    "start from better values or bound them."
                )
            q = -hv
            grad_norm = float(np.max(np.abs(grad), initial=0.0))
            if factored is not None and factored[0] is hv:
                _, factor, bad_blocks = factored
            else:
                factor, bad_blocks = self.structure.factor(q)
                factored = (hv, factor, bad_blocks)
            # The log-determinant depends on b to first order, so b^ must be accurate: iterate until both the
            # gradient and the Newton step are small, and accept "floating-point precision" only when full Newton
            # steps stop reducing a small gradient.
            stalled = stalled + 1 if grad_norm >= 0.5 * best_norm else 0
            best_norm = min(best_norm, grad_norm)
            if factor is not None:
                direction = factor.solve(grad)
                step_norm = float(np.max(np.abs(direction), initial=0.0))
                step_tol = inner.xtol * (1.0 + float(np.max(np.abs(b), initial=0.0)))
                small_gradient = grad_norm <= inner.gtol or (stalled >= 3 and grad_norm <= 1e2 * inner.gtol)
                if small_gradient and step_norm <= step_tol:
                    return InnerSolution(theta, b, float(logp), factor, step, grad_norm)
            if step == inner.max_steps:
                break
            if factor is None:
                scale = float(np.max(np.abs(q), initial=1.0))
                factor = self.structure.damped(q, min_eig=1e-6 * scale)
                direction = factor.solve(grad)
            slope = float(grad @ direction)
            t = 1.0
            while t > 1e-12:
                trial = b + t * direction
                if t == 1.0:  # the full step is evaluated with its derivatives: accepted, they serve the next step
                    full = (
                        (*compiled.joint_grad(trial, theta), hv) if constant_q else compiled.joint_newton(trial, theta)
                    )
                    value = full[0]
                    if _full_step_accepted(logp, grad, slope, full):
                        evaluated = full
                        break
                else:
                    value = compiled.joint_value(trial, theta)
                    if np.isfinite(value) and value >= logp + 1e-4 * t * slope:
                        break
                t *= 0.5
            else:
                break
            b = trial
        worst = int(np.argmax(np.abs(grad)))
        raise InnerSolveError(
            f"The inner Newton solve for the random effects did not converge at theta = {self._describe(theta)}: "
            f"after {step} steps max|dl/db| = {grad_norm:.3g} (at {labels[worst]}; gtol {inner.gtol:g}), "
            f"remaining Newton step {step_norm:.3g} (xtol {inner.xtol:g})"
            + (
                f"; the Hessian block of {[labels[i] for i in bad_blocks[:5]]} is not negative definite"
                if bad_blocks.size
                else ""
            )
            + ". The conditional mode may not exist there (e.g. a random effect that the data do not constrain "
            "with a variance that is too large); check the model or start the outer parameters elsewhere."
        )

    def _chord(self, theta: np.ndarray, b: np.ndarray, factor: Any) -> np.ndarray:
        """Chord steps ``b += Q0^-1 dl/db`` with a fixed factor while each at least halves the gradient.

        Each costs one gradient, against the ``n_colors`` Hessian-vector products and the factorisation of a Newton
        step; from the linear prediction of a draw's mode they converge in a few steps. The first step that does not
        halve the gradient is not taken: Newton's method goes on from the last point.
        """
        value, grad = self.compiled.joint_grad(b, theta)
        norm = float(np.max(np.abs(grad), initial=0.0))
        for _ in range(CHORD_MAX_STEPS):
            if not (np.isfinite(value) and np.isfinite(norm)) or norm <= self.inner.gtol:
                break
            trial = b + factor.solve(grad)
            trial_value, trial_grad = self.compiled.joint_grad(trial, theta)
            trial_norm = float(np.max(np.abs(trial_grad), initial=0.0))
            if not (np.isfinite(trial_value) and trial_value >= value and trial_norm <= 0.5 * norm):
                break
            b, value, grad, norm = trial, trial_value, trial_grad, trial_norm
        return b

    def _describe(self, theta: np.ndarray) -> str:
        labels = self.compiled.theta_layout.labels
        return "{" + ", ".join(f"{lab}: {v:.6g}" for lab, v in zip(labels, theta, strict=True)) + "}"


def choose_structure(pattern: sp.spmatrix, colors: np.ndarray, factorization: str) -> BlockStructure | SparsePattern:
    """The structure the factorisations of ``Q`` work with, as ``InnerNewton.factorization`` asks."""
    choices = ("auto", "blocks", "cholmod", "superlu")
    if factorization not in choices:
        raise ModelSpecificationError(f"factorization={factorization!r}; choose one of {choices}.")
    if factorization == "cholmod" and not cholmod_available():
        raise ModelSpecificationError(
            "factorization='cholmod' needs scikit-sparse: `pip install pymc_laplace[sparse]` (on Debian first "
            "`apt-get install libsuitesparse-dev`), or use factorization='superlu'."
        )
    if factorization == "auto":
        _, labels = connected_components(sp.csr_matrix(pattern, dtype=bool), directed=False)
        largest = int(np.bincount(labels).max(initial=0))
        if largest <= LARGEST_DENSE_BLOCK:
            factorization = "blocks"
        else:
            factorization = "cholmod" if cholmod_available() else "superlu"
    if factorization == "blocks":
        return block_structure(pattern, colors)
    return sparse_pattern(pattern, colors, factorization)
