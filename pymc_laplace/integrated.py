"""Integrated (nested) Laplace: random effects integrated out by an inner Newton solve."""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pymc as pm
import scipy.linalg
import scipy.optimize

from pymc_laplace._progress import progress_bar
from pymc_laplace.compile.graphs import (
    compile_seconds,
    compile_split,
    resolve_variables,
    start_point,
    validate_arguments,
)
from pymc_laplace.convert import build_result
from pymc_laplace.errors import (
    ApproximationWarning,
    BoundaryFitWarning,
    HessianNotPositiveDefiniteError,
    HessianNotPositiveDefiniteWarning,
    ModelSpecificationError,
)
from pymc_laplace.formulas import bambi_pymc_model, is_bambi_model
from pymc_laplace.gaussian import FLAT_DIRECTION_RTOL, LOG_2PI, describe_direction, gaussian_from_precision
from pymc_laplace.inner.blocks import BlockStructure
from pymc_laplace.inner.marginal import InnerNewton, InnerSolveError, LaplaceMarginal
from pymc_laplace.inner.quadrature import (
    LAPLACE_ERROR_WARNING,
    check_quadrature,
    default_check,
    quadrature_value_and_grad,
)
from pymc_laplace.laplace import draw_groups, evaluate_draws, log_likelihood_request
from pymc_laplace.outer.inla import DesignSettings, fit_by_design
from pymc_laplace.report.diagnostics import check_approximation

_NO_RANDOM = "Name the random effects to integrate out; fit_laplace fits a model with nothing integrated out."


def marginal(
    model: pm.Model | None = None,
    *,
    random: Sequence[Any],
    inner: InnerNewton | None = None,
    initvals: Mapping[str, Any] | None = None,
    compile_kwargs: Mapping[str, Any] | None = None,
) -> LaplaceMarginal:
    """The compiled Laplace marginal likelihood of a PyMC model with ``random`` integrated out.

    The PyMC counterpart of TMB's ``MakeADFun(..., random=...)``: ``logp(point)`` is the Laplace approximation
    of ``log p(y | theta)`` (no prior on ``theta``) and ``dlogp(point)`` its exact gradient, where ``point``
    holds the unconstrained values of every free variable not in ``random``, keyed as ``model.initial_point()``
    keys them.

    Parameters
    ----------
    model : pm.Model, optional
    random : sequence of str or variables
        The latent variables to integrate out (e.g. ``["u"]`` or ``["log_g", "log_p"]``).
    inner : InnerNewton, optional
        Settings of the inner Newton solve.
    initvals : dict, optional
        Start values (constrained scale) used as the first warm start of the random effects.
    compile_kwargs : dict, optional
        Passed to the pytensor compiler.

    Returns
    -------
    LaplaceMarginal

    Raises
    ------
    ModelSpecificationError
        No model, no or discrete free variables, ``random`` empty or naming something that is not a free
        variable (or a variable twice); raised before anything is compiled.
    StartPointError
        The log density is not finite at the start point: it is the first warm start of the random effects and
        the point where the structure of their Hessian is read.
    """
    model = validate_arguments(model)
    resolve_variables(model, random, argument="random", if_empty=_NO_RANDOM)
    compiled = compile_split(model, random=random, initvals=initvals, compile_kwargs=compile_kwargs)
    return LaplaceMarginal(compiled, inner or InnerNewton())


@dataclass(frozen=True)
class OuterResult:
    """Outcome of the outer maximisation of the (penalised) Laplace marginal.

    Attributes
    ----------
    theta : ndarray
    objective : float
    grad : ndarray
    hessian : ndarray
        Hessian of the objective at ``theta`` (central differences of the exact gradient, symmetrised).
    success : bool
    message : str
    n_iterations, n_evaluations : int
    wall_time : float
    """

    theta: np.ndarray
    objective: float
    grad: np.ndarray
    hessian: np.ndarray
    success: bool
    message: str
    n_iterations: int
    n_evaluations: int
    wall_time: float

    def record(self) -> dict[str, Any]:
        """What the ``optimizer_result`` group records of this optimisation."""
        return {
            "iterations": self.n_iterations,
            "evaluations": self.n_evaluations,
            "grad_norm": self.grad_norm,
            "objective": self.objective,
            "success": self.success,
            "message": self.message,
            "wall_time": self.wall_time,
        }

    @property
    def grad_norm(self) -> float:
        return float(np.max(np.abs(self.grad), initial=0.0))


# OuterOptimizer(hessian_refresh="auto") where the random effects are coupled (one sparse system, or a dense block of
# more than AUTO_COUPLED_BLOCK: crossed or nested groups): the Hessian differenced afresh every AUTO_HESSIAN_REFRESH
# trust-region iterations, SR1 updates in between
AUTO_HESSIAN_REFRESH = 10
AUTO_COUPLED_BLOCK = 8


@dataclass(frozen=True)
class OuterOptimizer:
    """Trust-region Newton on the exact gradient of the marginal and its differenced Hessian, then Newton polish.

    The Hessian of the objective is the central difference of its exact gradient (as TMB's ``sdreport``); with
    it, a trust-region Newton method (as nlminb's PORT routines) moves through the regions of negative curvature
    that a start far from the optimum meets, where quasi-Newton methods stop at a saddle or a boundary maximum.

    Parameters
    ----------
    start : {"likelihood", "initial"}
        ``"likelihood"`` (default, as glmmTMB and lme4 start): first fit the observed variables' log likelihood with
        the random effects held at their initial values (a GLM fit; parameters that do not enter it, such as the
        scales of the random effects, stay at their initial values), and start from there. ``"initial"``: start
        from the model's initial point. Start values given as ``initvals`` are always used as given.
    method : {"trust-newton", "bfgs"}
        ``"trust-newton"``: SciPy's ``trust-exact`` with the differenced Hessian (``1 + 2 dim(theta)`` gradient
        evaluations an iteration); ``"bfgs"``: quasi-Newton on the gradient alone, cheaper per iteration for a
        long ``theta``. Either way the result is polished by Newton steps.
    gtol : float
        Converged when ``max |d objective / d theta| <= gtol`` after polishing.
    max_iterations : int
        Iterations allowed.
    hessian_step : float
        Relative step of the central differences of the exact gradient that give the Hessian (as TMB does).
    polish_steps : int
        Newton steps with that Hessian after the main method.
    hessian_refresh : int or "auto"
        With ``"trust-newton"``, difference the Hessian afresh every this many iterations and carry it in between
        by symmetric rank-one (SR1) updates from the gradients evaluated anyway, which keep negative curvature.
        1: every iteration. Larger values save gradient evaluations (VerbAgg: 145 with 1, 67 with 10; grouseticks
        203 and 58; same optimum to 1e-11), but on a rough objective SR1 may take another path than 1 does (the
        urchin model's, whose marginal jumps where random effects cross a branch point, ends at AIC 196.97 with
        10 against 196.58 with 1). ``"auto"`` (default): ``AUTO_HESSIAN_REFRESH`` where crossed or nested effects
        couple the groups (one sparse system, or a block of ``Q`` of more than ``AUTO_COUPLED_BLOCK`` random
        effects), else 1 (independent groups, as the urchin model's); a bare
        :meth:`maximize` call, which does not know the marginal, takes 1. The Hessian reported and the polishing
        steps' Hessian are always differenced afresh.
    """

    start: Literal["likelihood", "initial"] = "likelihood"
    method: Literal["trust-newton", "bfgs"] = "trust-newton"
    gtol: float = 1e-6
    max_iterations: int = 500
    hessian_step: float = 1e-4
    polish_steps: int = 5
    hessian_refresh: int | Literal["auto"] = "auto"

    def for_marginal(self, laplace: LaplaceMarginal) -> OuterOptimizer:
        """These settings with ``hessian_refresh="auto"`` resolved for ``laplace``'s structure."""
        if self.hessian_refresh != "auto":
            return self
        structure = laplace.structure
        coupled = not isinstance(structure, BlockStructure) or structure.largest_block > AUTO_COUPLED_BLOCK
        return dataclasses.replace(self, hessian_refresh=AUTO_HESSIAN_REFRESH if coupled else 1)

    def maximize(
        self, value_and_grad: Callable[[np.ndarray], tuple[float, np.ndarray]], theta0: np.ndarray
    ) -> OuterResult:
        if self.method not in ("trust-newton", "bfgs"):
            raise ModelSpecificationError(f"OuterOptimizer(method={self.method!r}): use 'trust-newton' or 'bfgs'.")
        if self.hessian_refresh == "auto":
            return dataclasses.replace(self, hessian_refresh=1).maximize(value_and_grad, theta0)
        if not isinstance(self.hessian_refresh, (int, np.integer)) or self.hessian_refresh < 1:
            raise ModelSpecificationError(
                f"OuterOptimizer(hessian_refresh={self.hessian_refresh!r}): use 1 or more, or 'auto'."
            )
        start = time.perf_counter()
        evaluations = 0

        # with hessian_refresh > 1, value and gradient at the last few points: SciPy's trust-exact asks for the
        # Hessian at a point before its value, and both are then served by one evaluation
        recent: dict[bytes, tuple[float, np.ndarray]] = {}
        last: list[tuple[np.ndarray, np.ndarray]] = []  # the last point evaluated and its gradient
        carried: dict[str, Any] = {}  # the Hessian of the negated objective last returned, where, and its age

        def negated(theta: np.ndarray) -> tuple[float, np.ndarray]:
            nonlocal evaluations
            key = np.asarray(theta, dtype=float).tobytes()
            if self.hessian_refresh > 1 and key in recent:
                value, grad = recent[key]
                return -value, -grad
            evaluations += 1
            try:
                value, grad = value_and_grad(theta)
            except InnerSolveError:
                return np.inf, np.zeros_like(theta)
            if not (np.isfinite(value) and np.all(np.isfinite(grad))):
                return np.inf, np.zeros_like(theta)
            last[:] = [(np.array(theta), grad)]
            if self.hessian_refresh > 1:
                recent[key] = (value, grad)
            while len(recent) > 8:
                del recent[next(iter(recent))]
            return -value, -grad

        def negated_hessian(theta: np.ndarray) -> np.ndarray:
            # forward differences from the gradient when it is known at theta (dim(theta) evaluations instead of
            # twice that), else central; the Hessian reported at the end is always central
            nonlocal evaluations
            if self.hessian_refresh > 1:
                negated(theta)  # the gradient at theta, kept for the value SciPy asks for next
            known = last[0][1] if last and np.array_equal(last[0][0], theta) else None
            if known is not None and carried and carried["age"] + 1 < self.hessian_refresh:
                updated = _sr1_update(carried["hessian"], theta - carried["theta"], carried["grad"] - known)
                carried.update(theta=np.array(theta), grad=known, hessian=updated, age=carried["age"] + 1)
                return updated
            evaluations += theta.size * (1 if known is not None else 2)
            try:
                hessian = -self.hessian(value_and_grad, theta, grad=known)
            except InnerSolveError:
                hessian = np.full((theta.size, theta.size), np.nan)
            # at the edge of what can be evaluated the step is proposed on a unit model and the trust region shrinks
            # on the objective's values alone (the Hessian reported at the end is computed afresh)
            hessian = hessian if np.all(np.isfinite(hessian)) else np.eye(theta.size)
            carried.clear()
            if known is not None:
                carried.update(theta=np.array(theta), grad=known, hessian=hessian, age=0)
            return hessian

        theta0 = np.asarray(theta0, dtype=float)
        if self.method == "trust-newton":
            bfgs = scipy.optimize.minimize(
                negated, theta0, jac=True, hess=negated_hessian, method="trust-exact",
                options={"gtol": self.gtol, "maxiter": self.max_iterations},
            )  # fmt: skip
            if not np.isfinite(bfgs.fun):  # nothing evaluable was found: fall back to the gradient alone
                bfgs = scipy.optimize.minimize(
                    negated,
                    theta0,
                    jac=True,
                    method="BFGS",
                    options={"gtol": self.gtol, "maxiter": self.max_iterations},
                )
        else:
            bfgs = scipy.optimize.minimize(
                negated, theta0, jac=True, method="BFGS", options={"gtol": self.gtol, "maxiter": self.max_iterations}
            )
        theta = bfgs.x
        value, grad = value_and_grad(theta)
        hessian = self.hessian(value_and_grad, theta)
        evaluations += 1 + 2 * theta.size
        message = str(bfgs.message)
        polished = False
        for _ in range(self.polish_steps):
            if np.max(np.abs(grad), initial=0.0) <= self.gtol * 1e-2:
                break
            try:
                step = np.linalg.solve(-hessian, grad)
            except np.linalg.LinAlgError:
                break
            if not np.all(np.isfinite(step)):
                break
            try:
                new_value, new_grad = value_and_grad(theta + step)
            except InnerSolveError:
                break
            evaluations += 1
            if not (np.isfinite(new_value) and new_value >= value - 1e-10 * max(1.0, abs(value))):
                break
            theta, value, grad, polished = theta + step, new_value, new_grad, True
        if polished:  # the Hessian reported is the one at the final point
            hessian = self.hessian(value_and_grad, theta)
            evaluations += 2 * theta.size
        success = bool(np.max(np.abs(grad), initial=0.0) <= self.gtol)
        if success:
            message = f"converged: max|gradient| {np.max(np.abs(grad), initial=0.0):.2e} <= gtol {self.gtol:g}"
        else:
            message = (
                f"not converged: max|gradient| {np.max(np.abs(grad), initial=0.0):.2e} > gtol {self.gtol:g} "
                f"after BFGS ({message}) and Newton polishing; the objective may not be smooth here"
            )
        return OuterResult(
            theta, float(value), grad, hessian, success, message, int(bfgs.nit), evaluations,
            time.perf_counter() - start,
        )  # fmt: skip

    def hessian(
        self,
        value_and_grad: Callable[[np.ndarray], tuple[float, np.ndarray]],
        theta: np.ndarray,
        *,
        grad: np.ndarray | None = None,
    ) -> np.ndarray:
        """Central differences of the exact gradient, step ``hessian_step * max(1, |theta_i|)``, symmetrised.

        With ``grad`` (the gradient at ``theta``), forward differences from it: half the evaluations, error of first
        order in the step; used while iterating, never for the Hessian that gives the standard errors.
        """
        n = theta.size
        out = np.empty((n, n))
        for i in range(n):
            h = self.hessian_step * max(1.0, abs(theta[i]))
            for _ in range(3):  # a step into a region the inner solve cannot handle is retried shorter
                up, down = theta.copy(), theta.copy()
                up[i] += h
                down[i] -= h
                try:
                    if grad is None:
                        out[:, i] = (value_and_grad(up)[1] - value_and_grad(down)[1]) / (2.0 * h)
                    else:
                        out[:, i] = (value_and_grad(up)[1] - grad) / h
                    break
                except InnerSolveError as err:
                    failure, h = err, h / 10.0
            else:
                raise InnerSolveError(
                    f"The curvature of the objective at the estimate could not be differenced along parameter {i}: "
                    f"the inner solve fails within {10 * h:.2g} of the estimate ({failure}). The estimate is at the "
                    "edge of the region where the model can be evaluated; check the parameter's bounds or the model."
                ) from failure
        return 0.5 * (out + out.T)


def _sr1_update(hessian: np.ndarray, step: np.ndarray, change: np.ndarray) -> np.ndarray:
    """The symmetric rank-one update of ``hessian`` by a step and its change of gradient (skipped when the
    denominator is too small for the update to be trusted, as Nocedal and Wright's 6.26)."""
    residual = change - hessian @ step
    denominator = float(residual @ step)
    if abs(denominator) <= 1e-8 * np.linalg.norm(step) * np.linalg.norm(residual) or denominator == 0.0:
        return hessian
    return hessian + np.outer(residual, residual) / denominator


# A direction is on the boundary when moving this far along it (unconstrained scale) ...
BOUNDARY_PROBE = 10.0
# ... changes the objective by less than this (log-likelihood units); only directions whose curvature is below
# BOUNDARY_CANDIDATE_RTOL times the largest are probed.
BOUNDARY_TOLERANCE = 1e-3
BOUNDARY_CANDIDATE_RTOL = 1e-4
# Theta draws whose inner solve fails are drawn again at most this many times in a row.
MAX_REDRAWS = 10
# The inner solves of the draws are batched so that a batch's compressed products and data-sized intermediates hold
# about this many numbers.
BATCH_ELEMENTS = 4_000_000
# Linear draws are made this many numbers (draws x random effects) at a time.
LINEAR_DRAW_ELEMENTS = 4_000_000
# Draws that one at a time would take less than this many seconds are not batched. The batched graphs are compiled
# once per model and then loaded from the disk cache; where a batch turns out slower per draw than a draw on its
# own (large data: the batch's data-sized intermediates), the rest are drawn one at a time.
CHEAP_DRAWS_SECONDS = 0.25

# conditional="auto" draws from the joint Gaussian (linear) when exact draws, estimated from the first few, would
# take more than AUTO_EXACT_FIT_RATIO times the fit or AUTO_EXACT_MAX_SECONDS, and more than AUTO_EXACT_MIN_SECONDS
AUTO_EXACT_FIT_RATIO = 1.0
AUTO_EXACT_MIN_SECONDS = 1.0
AUTO_EXACT_MAX_SECONDS = 120.0
# exact draws timed for that choice (they are kept when the draws stay exact)
AUTO_TIMED_DRAWS = 4


def boundary_directions(
    value: Callable[[np.ndarray], float], theta: np.ndarray, objective: float, neg_hessian: np.ndarray
) -> np.ndarray:
    """Unit directions along which the estimate sits on the boundary of the parameter space (a "singular fit").

    A log standard deviation drifting to -inf (a variance at zero), the log of a Cholesky diagonal doing so (a
    correlation at +-1), or a zero-inflation probability going to 0 or 1 ends the optimisation far out on the
    unconstrained scale, where the objective is flat: its gradient and its curvature vanish together. Such a
    direction is a direction of negligible curvature (an eigenvector of the negative Hessian) along which moving
    ``BOUNDARY_PROBE`` further leaves the objective unchanged to ``BOUNDARY_TOLERANCE``. A weakly identified but
    interior parameter is not one (moving it that far changes the fit), nor is a ridge through the interior along
    which the objective is constant both ways (parameters that only enter as a sum): that is reported as a flat
    direction of the Hessian.

    Returns
    -------
    ndarray, shape (k, n)
        Orthonormal rows.
    """
    if theta.size == 0 or not np.all(np.isfinite(neg_hessian)):
        return np.zeros((0, theta.size))
    eigenvalues, vectors = np.linalg.eigh(0.5 * (neg_hessian + neg_hessian.T))
    scale = max(float(np.max(np.abs(eigenvalues))), np.finfo(float).tiny)
    found = []

    def flat_at(point: np.ndarray) -> bool:
        try:
            probed = value(point)
        except InnerSolveError:
            return False
        return bool(np.isfinite(probed) and probed >= objective - BOUNDARY_TOLERANCE)

    for k in np.flatnonzero(np.abs(eigenvalues) <= BOUNDARY_CANDIDATE_RTOL * scale):
        direction = vectors[:, k] if vectors[:, k] @ theta >= 0 else -vectors[:, k]  # pointing outward
        outward = flat_at(theta + BOUNDARY_PROBE * direction)
        inward = flat_at(theta - BOUNDARY_PROBE * direction)
        if outward and inward:
            # flat both ways: a ridge through the interior (parameters that only enter as a sum: not identified, not
            # a boundary), unless the estimate has run far out along it, deep into a saturated region (a
            # probability pinned at 0 or 1 by another coefficient that ran away)
            if float(direction @ theta) > BOUNDARY_PROBE:
                found.append(direction)
        elif outward or inward:
            found.append(direction if outward else -direction)
    return np.array(found).reshape(-1, theta.size)


def likelihood_start(
    likelihood: Callable[[np.ndarray, np.ndarray], list[np.ndarray]], b: np.ndarray, theta0: np.ndarray
) -> np.ndarray:
    """``theta`` maximising ``log p(y | b, theta)`` with the random effects held at ``b`` (a GLM fit), from ``theta0``.

    Parameters that do not enter the likelihood given ``b`` have no gradient and stay at ``theta0``. If this fit
    fails or does not improve on ``theta0``, ``theta0`` is returned: it is only a start.
    """

    def negated(theta: np.ndarray) -> tuple[float, np.ndarray]:
        value, grad = likelihood(b, theta)
        if not (np.isfinite(value) and np.all(np.isfinite(grad))):
            return np.inf, np.zeros_like(theta)
        return -float(value), -np.asarray(grad, dtype=float)

    if theta0.size == 0:
        return theta0
    at_start = negated(theta0)[0]
    fitted = scipy.optimize.minimize(negated, theta0, jac=True, method="L-BFGS-B", options={"maxiter": 200})
    return fitted.x if np.isfinite(fitted.fun) and fitted.fun <= at_start else theta0


def marginal_for(
    model: pm.Model,
    random: Sequence[Any],
    random_values: list[str],
    compiled_marginal: LaplaceMarginal | None,
    inner: InnerNewton | None,
    initvals: Mapping[str, Any] | None,
    compile_kwargs: Mapping[str, Any] | None,
) -> LaplaceMarginal:
    """The marginal an entry function works with: ``compiled_marginal`` when given (checked to integrate out
    ``random``; ``initvals``, when given, replace its start point), else compiled (or found compiled) for
    ``model``."""
    if compiled_marginal is None:
        return marginal(model, random=random, inner=inner, initvals=initvals, compile_kwargs=compile_kwargs)
    if list(compiled_marginal.compiled.b_layout.names) != random_values:
        raise ModelSpecificationError(
            f"`compiled_marginal` integrates out {list(compiled_marginal.compiled.b_layout.names)}, not `random` = "
            f"{random_values}; build it with marginal(model, random=...) for the same random effects."
        )
    if not initvals:
        return compiled_marginal
    # the same compiled functions from another start: the outer start and the first inner solve's
    point = start_point(model, initvals)
    compiled = compiled_marginal.compiled
    started = dataclasses.replace(
        compiled, theta_start=compiled.theta_layout.join(point), b_start=compiled.b_layout.join(point)
    )
    return dataclasses.replace(compiled_marginal, compiled=started)


def random_attrs(compiled: Any) -> dict[str, list[int]]:
    """Levels of each random effect in ``random`` (the length of its first axis: glmmTMB's "groups: ...") and its
    number of elements, as every integrated result records them."""
    return {
        "random_levels": [int(shape[0]) if len(shape) else 1 for shape in compiled.b_layout.shapes],
        "random_sizes": [int(np.prod(shape, dtype=int)) for shape in compiled.b_layout.shapes],
    }


def fit_integrated_laplace(
    model: pm.Model | Any | None = None,
    *,
    random: Sequence[Any] | None = None,
    method: Literal["ml", "map", "grid", "ccd"] = "ml",
    draws: int = 1000,
    chains: int = 4,
    random_seed: int | np.random.Generator | None = None,
    progressbar: bool = True,
    initvals: Mapping[str, Any] | None = None,
    optimizer: OuterOptimizer | None = None,
    inner: InnerNewton | None = None,
    ridge: float = 0.0,
    idata_kwargs: Mapping[str, Any] | None = None,
    compile_kwargs: Mapping[str, Any] | None = None,
    compiled_marginal: LaplaceMarginal | None = None,
    include_transformed: bool = False,
    non_positive_definite: Literal["raise", "warn"] = "raise",
    design: DesignSettings | None = None,
    n_agq: int = 1,
    conditional: Literal["auto", "exact", "linear"] = "auto",
) -> Any:
    """Fit a PyMC model with ``random`` integrated out by the Laplace approximation (TMB-style).

    The random effects ``b`` are integrated out by an inner Newton solve at each value of the other free
    variables ``theta``; the Laplace marginal likelihood of ``theta`` is maximised with its exact gradient
    (implicit function theorem). ``method="ml"`` ignores the priors of ``theta`` (as TMB and glmmTMB);
    ``method="map"`` adds them with their Jacobians. ``method="grid"`` and ``method="ccd"`` are Bayesian over
    ``theta`` as INLA is: the Laplace marginal posterior ``p(theta) L(theta)`` is evaluated on a grid or a central
    composite design in the standardised coordinates of its Gaussian at the mode (:mod:`pymc_laplace.outer.inla`), and
    the draws of ``theta`` follow it rather than a Gaussian.

    Parameters
    ----------
    model : pm.Model or bambi.Model, optional
        A bambi model (``bmb.Model("y ~ x + (1 | g)", data)``) is fitted as glmmTMB fits its formula: with the
        predictors uncentred and each group-specific term a free variable named as bambi names it (``"1|g"``),
        integrated out by default (:func:`pymc_laplace.formulas.bambi_pymc_model`); the result is what bambi's
        ``predict`` and plots read.
    random : sequence of str or variables
        The latent variables to integrate out; for a bambi model, by default its group-specific terms.
    method : {"ml", "map", "grid", "ccd"}
        ``"grid"``/``"ccd"``: the ``fit`` group then holds the posterior ``mean_vector``, ``covariance_matrix`` and
        ``mode`` of theta, ``log_evidence`` (``log p(y)``, priors included), and ``design_points``,
        ``design_probability`` and ``design_log_posterior`` over ``design``; there is no ``random_effects`` table.
    draws, chains : int
        Posterior draws: ``theta ~ N(theta^, cov)`` and, for each, ``b | theta ~ N(b^(theta), Q^-1)``.
    random_seed, progressbar, initvals, idata_kwargs, compile_kwargs
        As in :func:`pymc_laplace.fit_laplace`.
    optimizer : OuterOptimizer, optional
    inner : InnerNewton, optional
    ridge : float
        Added to the negative Hessian of the objective before inverting it (recorded in the attrs).
    compiled_marginal : LaplaceMarginal, optional
        What :func:`marginal` compiled for this model and these random effects, reused as it is (its own
        ``inner`` settings and start point; ``inner``, ``initvals`` and ``compile_kwargs`` are then not used).
    include_transformed : bool
        Add the ``unconstrained_posterior`` group (the draws of each value variable), as :func:`fit_laplace`.
    design : DesignSettings, optional
        Settings of the grid or the CCD (spacing, log-density drop kept, radius factor).
    conditional : {"auto", "exact", "linear"}
        How the random effects of each draw of ``theta`` are drawn. ``"exact"``: from ``N(b^(theta), Q(theta)^-1)``,
        one inner solve per draw. ``"linear"``: from ``N(b^ + (d b^/d theta) (theta - theta^), Q(theta^)^-1)``, the
        joint Gaussian of TMB's ``sdreport`` (no inner solve: for many groups, where the solves cost far more than
        the fit). Either is a Gaussian proposal whose density is recorded, so k-hat and ``importance_resample``
        judge and correct it alike. ``"auto"`` (default): exact, unless the exact draws, timed on the first 4,
        would take longer than the fit or 2 minutes, and more than 1 second (``AUTO_EXACT_*``); then linear.
        ``attrs["conditional"]`` says which was used.
    n_agq : int
        Nodes per dimension of adaptive Gauss-Hermite quadrature over each independent block of random effects
        (lme4's ``nAGQ``, here for blocks of any size: ``n_agq^d`` nodes per block of ``d``). 1 is Laplace; more
        nodes maximise the quadrature marginal likelihood with its exact gradient
        (:func:`pymc_laplace.inner.quadrature.quadrature_value_and_grad`). Needs a block-diagonal ``Q``.
    non_positive_definite : {"raise", "warn"}
        What to do when the negative Hessian of the marginal is not positive definite at the estimate (glmmTMB's
        ``pdHess = FALSE``): raise :class:`HessianNotPositiveDefiniteError` (default), or return the estimates with a
        :class:`~pymc_laplace.errors.HessianNotPositiveDefiniteWarning` naming the directions, NaN standard errors
        for the parameters along them and draws that do not move along them.

    Returns
    -------
    arviz.InferenceData or xarray.DataTree
        As ``pm.sample`` returns. The ``fit`` group holds ``mean_vector`` and ``covariance_matrix`` of theta
        (``rows``/``columns``), ``random_effects`` and ``random_effects_se`` (conditional modes of ``b`` and
        their standard errors including theta's uncertainty, over ``random_rows``), ``log_marginal_likelihood``,
        ``aic``, ``bic``; ``optimizer_result`` records the outer and inner solves. The ``log_likelihood`` group
        as in :func:`fit_laplace`. The attrs hold ``pareto_k`` and ``importance_ess`` of the joint draws'
        importance ratios ``p/q`` (``p`` the model's joint density, priors included): above 0.7 an
        :class:`~pymc_laplace.errors.ApproximationWarning` says the Gaussian is not to be trusted.

    Raises
    ------
    ModelSpecificationError
        As :func:`marginal`, and also ``random`` covering every free variable (nothing left to optimise),
        ``draws``/``chains`` not positive integers, a negative or non-finite ``ridge``, an unknown ``method``.
    StartPointError, InnerSolveError, HessianNotPositiveDefiniteError
    """
    if method not in ("ml", "map", "grid", "ccd"):
        raise ModelSpecificationError(f"`method` must be 'ml', 'map', 'grid' or 'ccd', not {method!r}.")
    if non_positive_definite not in ("raise", "warn"):
        raise ModelSpecificationError(
            f"`non_positive_definite` must be 'raise' or 'warn', not {non_positive_definite!r}."
        )
    started, compile_before = time.perf_counter(), compile_seconds()
    if is_bambi_model(model):
        model, bambi_random = bambi_pymc_model(model)
        random = bambi_random if random is None else random
    if random is None:
        raise ModelSpecificationError(f"`random` is missing. {_NO_RANDOM}")
    model = validate_arguments(model, draws=draws, chains=chains, ridge=ridge)
    random_values = resolve_variables(model, random, argument="random", if_empty=_NO_RANDOM)
    if len(random_values) == len(model.free_RVs):
        raise ModelSpecificationError(
            f"`random` covers every free variable ({sorted(rv.name for rv in model.free_RVs)}), so nothing is "
            "left to optimise once they are integrated out. Use fit_laplace(model) for a Laplace fit of all of "
            "them, or leave a parameter (e.g. a scale or a mean) out of `random`."
        )
    laplace = marginal_for(model, random, random_values, compiled_marginal, inner, initvals, compile_kwargs)
    compiled = laplace.compiled
    optimizer = (optimizer or OuterOptimizer()).for_marginal(laplace)
    rng = np.random.default_rng(random_seed)
    if conditional not in ("auto", "exact", "linear"):
        raise ModelSpecificationError(f"`conditional` must be 'auto', 'exact' or 'linear', not {conditional!r}.")
    if not isinstance(n_agq, (int, np.integer)) or isinstance(n_agq, bool) or n_agq < 1:
        raise ModelSpecificationError(f"`n_agq` must be a positive integer, not {n_agq!r}.")
    if n_agq > 1:
        if method in ("grid", "ccd"):
            raise ModelSpecificationError("`n_agq` > 1 is for method='ml' or 'map'.")
        check_quadrature(laplace, n_agq)  # raises, with the reason, where the blocks do not allow it
    if method in ("grid", "ccd"):
        return fit_by_design(
            laplace, strategy=method, settings=design or DesignSettings(), optimizer=optimizer, draws=draws,
            chains=chains, rng=rng, progressbar=progressbar, idata_kwargs=idata_kwargs,
            include_transformed=include_transformed, started=started, compile_before=compile_before,
        )  # fmt: skip

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        if n_agq > 1:
            value, grad = quadrature_value_and_grad(laplace, theta, n_agq)
        else:
            value, grad = laplace.value_and_grad(theta)
        if method == "map":
            prior, prior_grad = compiled.prior(theta)
            value, grad = value + float(prior), grad + prior_grad
        return value, grad

    with progress_bar("Outer optimisation", None, enabled=progressbar) as bar:

        def tracked(theta: np.ndarray) -> tuple[float, np.ndarray]:
            value, grad = objective(theta)
            bar.update(advance=1, status=f"objective {value:.6g}")
            return value, grad

        theta0 = compiled.theta_start
        if optimizer.start == "likelihood" and not initvals:
            theta0 = likelihood_start(compiled.likelihood, compiled.b_start, theta0)
        outer = optimizer.maximize(tracked, theta0)
    theta_labels = compiled.theta_layout.labels
    boundary = boundary_directions(lambda theta: objective(theta)[0], outer.theta, outer.objective, -outer.hessian)
    described = [describe_direction(direction, theta_labels) for direction in boundary]
    if boundary.size:
        warnings.warn(
            f"boundary (singular) fit: the estimate is on the boundary of the parameter space along {described} "
            f"(moving further that way changes the log marginal likelihood by less than {BOUNDARY_TOLERANCE:g}): a "
            "variance of the random effects at zero, a correlation at +-1, or a probability at 0 or 1. The "
            "estimates are returned and held there: the standard errors of the parameters involved are not "
            "defined (NaN) and the draws do not move along these directions. Consider simplifying the model.",
            BoundaryFitWarning,
            stacklevel=2,
        )
    elif not outer.success:
        warnings.warn(
            f"The outer optimisation did not converge: {outer.message}. Estimates and standard errors are "
            "reported at the last point; do not trust them without checking (e.g. restart from other values).",
            UserWarning,
            stacklevel=2,
        )
    # the Gaussian of theta lives on the complement of the boundary directions (all of theta in the usual case)
    n_theta = outer.theta.size
    on_boundary = boundary.size > 0
    not_positive: list[str] = []
    if boundary.size:
        complement = scipy.linalg.null_space(boundary)
        reduced_labels = [describe_direction(column, theta_labels) for column in complement.T]
    else:
        complement, reduced_labels = np.eye(n_theta), list(theta_labels)
    try:
        gaussian = gaussian_from_precision(
            np.zeros(complement.shape[1]),
            complement.T @ -outer.hessian @ complement,
            reduced_labels,
            ridge=ridge,
            what="Laplace marginal likelihood",
        )
    except HessianNotPositiveDefiniteError as err:
        err.theta = dict(zip(theta_labels, outer.theta, strict=True))
        err.objective = outer.objective
        if non_positive_definite == "raise":
            raise
        # glmmTMB's pdHess = FALSE: the estimates are returned, the Gaussian lives where the curvature is positive
        precision = complement.T @ -outer.hessian @ complement
        eigenvalues, eigenvectors = np.linalg.eigh(0.5 * (precision + precision.T))
        flat = eigenvalues <= FLAT_DIRECTION_RTOL * max(float(np.max(np.abs(eigenvalues), initial=0.0)), 1e-300)
        flat_directions = (complement @ eigenvectors[:, flat]).T
        not_positive = [describe_direction(direction, theta_labels) for direction in flat_directions]
        warnings.warn(
            f"The negative Hessian of the Laplace marginal likelihood is not positive definite at the estimate "
            f"(glmmTMB's pdHess = FALSE): flat or downward-curving along {not_positive}. The estimates are returned "
            "as asked (non_positive_definite='warn'); the standard errors of the parameters along these directions "
            "are NaN and the draws do not move along them. The model is not identified there or the estimate is a "
            "saddle: simplify the model or give those parameters priors (method='map').",
            HessianNotPositiveDefiniteWarning,
            stacklevel=2,
        )
        boundary = np.vstack([boundary.reshape(-1, n_theta), flat_directions])
        complement = complement @ eigenvectors[:, ~flat]
        reduced_labels = [describe_direction(column, theta_labels) for column in complement.T]
        gaussian = gaussian_from_precision(
            np.zeros(complement.shape[1]), np.diag(eigenvalues[~flat]), reduced_labels, ridge=ridge,
            what="Laplace marginal likelihood",
        )  # fmt: skip
    covariance = complement @ gaussian.covariance @ complement.T
    undefined = np.flatnonzero(np.any(np.abs(boundary) > 1e-6, axis=0)) if boundary.size else np.zeros(0, int)
    reported_covariance = covariance.copy()
    reported_covariance[undefined, :] = np.nan
    reported_covariance[:, undefined] = np.nan
    solution = laplace.solve_inner(outer.theta)
    log_lik = laplace.value(outer.theta) if n_agq == 1 else quadrature_value_and_grad(laplace, outer.theta, n_agq)[0]
    jac = laplace.mode_jacobian(outer.theta)
    b_var = solution.factor.diagonal_of_inverse() + np.einsum("ij,jk,ik->i", jac, covariance, jac)
    n_params = outer.theta.size
    # Laplace against adaptive Gauss-Hermite quadrature at the estimate, where that takes a few hundred evaluations

    laplace_error = default_check(laplace, outer.theta) if not boundary.size and n_agq == 1 else float("nan")
    if abs(laplace_error) >= LAPLACE_ERROR_WARNING:
        warnings.warn(
            f"Laplace's log likelihood at the estimate is off by {laplace_error:+.3g} against adaptive Gauss-Hermite "
            "quadrature over each block of random effects: check_laplace(result, model) names the blocks, and "
            "sample_integrated (NUTS over theta) or full NUTS are the comparisons to make before trusting the "
            "estimates of the variances.",
            ApproximationWarning,
            stacklevel=2,
        )
    n_obs = sum(int(np.size(v.values)) for v in compiled.joint.observed_data)

    # joint draws: theta from its Gaussian, b from its conditional Gaussian given each theta
    fitted, compile_fitted = time.perf_counter(), compile_seconds()
    reduced_draws = gaussian.sample(rng, (chains * draws,))
    theta_draws = outer.theta + reduced_draws @ complement.T
    layout = compiled.joint.layout
    unconstrained = np.empty((theta_draws.shape[0], layout.size))
    log_q = np.empty(theta_draws.shape[0])
    failed: list[str] = []

    def draw_one(i: int, first_failure: InnerSolveError | None = None) -> None:
        """The random effects of draw ``i`` by an unbatched solve; a theta whose solve fails is drawn again."""
        if first_failure is not None:
            failed.append(str(first_failure))
            reduced_draws[i] = gaussian.sample(rng, (1,))[0]
            theta_draws[i] = outer.theta + complement @ reduced_draws[i]
        for attempt in range(int(first_failure is not None), MAX_REDRAWS + 1):
            try:
                # started from the linear prediction of the mode: most draws then need one or two Newton steps
                sol = laplace.solve_inner(
                    theta_draws[i], start=solution.b + jac @ (theta_draws[i] - outer.theta), chord=chord
                )
                break
            except InnerSolveError as err:
                if attempt == MAX_REDRAWS:
                    raise InnerSolveError(
                        f"{MAX_REDRAWS + 1} successive theta draws could not be evaluated: {err}"
                    ) from err
                failed.append(str(err))
                reduced_draws[i] = gaussian.sample(rng, (1,))[0]
                theta_draws[i] = outer.theta + complement @ reduced_draws[i]
        z = rng.standard_normal(sol.b.size)
        b_draw, log_q_b = sol.factor.sample_given(sol.b, z)
        unconstrained[i, compiled.theta_in_joint] = theta_draws[i]
        unconstrained[i, compiled.b_in_joint] = b_draw
        log_q[i] = log_q_b

    # chord steps where a Newton step is dear: a sparse factorisation and many Hessian products (crossed effects,
    # random walks); independent blocks factorise for less than compiling the gradient the chord steps need
    chord = None if isinstance(laplace.structure, BlockStructure) else solution.factor
    n_draws, n_b = theta_draws.shape[0], solution.b.size
    batchable = compiled.joint_newton_batched is not None and isinstance(laplace.structure, BlockStructure)
    if batchable:
        n_obs_total = sum(int(np.size(v.values)) for v in compiled.joint.observed_data)
        per_draw = max(1, laplace.structure.n_colors) * (n_b + n_obs_total)
        batch = int(np.clip(BATCH_ELEMENTS // per_draw, 1, n_draws))

    def draw_batch(rows: np.ndarray) -> float:
        """The random effects of draws ``rows`` by one batched inner solve (all theta at once, one compiled call per
        Newton step, started from the linear prediction of each mode); its seconds, without compiling."""
        began, compile_began = time.perf_counter(), compile_seconds()
        starts = solution.b + (theta_draws[rows] - outer.theta) @ jac.T
        modes, factor, failures = laplace.solve_inner_batch(theta_draws[rows], starts)
        z = rng.standard_normal(modes.shape)
        unconstrained[rows[:, None], compiled.theta_in_joint[None, :]] = theta_draws[rows]
        unconstrained[rows[:, None], compiled.b_in_joint[None, :]] = modes + factor.transposed_inverse_times(z)
        log_q[rows] = 0.5 * factor.log_det() - 0.5 * n_b * LOG_2PI - 0.5 * np.sum(z * z, axis=1)
        for k, err in failures:
            draw_one(int(rows[k]), err)
        return (time.perf_counter() - began) - (compile_seconds() - compile_began)

    # the first exact draws, timed without what they compiled (the chord steps' gradient), so that the choices below,
    # and with them the draws, are the same whether the functions were compiled or loaded; more than one, as the
    # first can be far cheaper than the rest (G = 10,000: under 5 ms, then 19 ms each). No batch is timed for the
    # choice: loading the batched graphs would cost a first call more (1-2 s on the example data sets) than batching
    # saves where the draws then go linear
    one_draw, drawn_exactly = np.inf, 0
    if conditional != "linear":
        drawn_exactly = min(AUTO_TIMED_DRAWS, n_draws)
        began, compile_began = time.perf_counter(), compile_seconds()
        for i in range(drawn_exactly):
            draw_one(i)
        one_draw = ((time.perf_counter() - began) - (compile_seconds() - compile_began)) / drawn_exactly
    if conditional == "auto":
        fit_time = (fitted - started) - (compile_fitted - compile_before)
        budget = max(min(AUTO_EXACT_FIT_RATIO * fit_time, AUTO_EXACT_MAX_SECONDS), AUTO_EXACT_MIN_SECONDS)
        dear = one_draw * n_draws > budget
        conditional = "linear" if dear else "exact"
        failed.clear()  # a failure of the timed exact draws does not concern linear draws (they redrew a valid theta)
    if conditional == "linear":
        # the joint Gaussian: the linear prediction of each mode and the estimate's precision, no inner solve
        unconstrained[:, compiled.theta_in_joint] = theta_draws
        rows_per_chunk = max(1, LINEAR_DRAW_ELEMENTS // max(n_b, 1))
        for begin in range(0, n_draws, rows_per_chunk):
            rows = slice(begin, min(begin + rows_per_chunk, n_draws))
            means = solution.b + (theta_draws[rows] - outer.theta) @ jac.T
            z = rng.standard_normal(means.shape)  # the same numbers as one draw at a time, in order
            b_draws, log_q[rows] = solution.factor.sample_many(means, z)
            unconstrained[rows, compiled.b_in_joint] = b_draws
    else:
        with progress_bar("Random effects given theta", n_draws, enabled=progressbar) as bar:
            bar.update(advance=drawn_exactly)
            # batched unless the draws one at a time are cheap (see CHEAP_DRAWS_SECONDS)
            if batchable and one_draw * n_draws > CHEAP_DRAWS_SECONDS:
                while drawn_exactly < n_draws:
                    rows = np.arange(drawn_exactly, min(drawn_exactly + batch, n_draws))
                    spent = draw_batch(rows)
                    bar.update(advance=rows.size)
                    drawn_exactly = int(rows[-1]) + 1
                    if spent > one_draw * rows.size:
                        break  # slower than one at a time (large data: the batch's data-sized intermediates)
            for i in range(drawn_exactly, n_draws):
                draw_one(i)
                bar.update(advance=1)
    if failed:
        warnings.warn(
            f"{len(failed)} of {theta_draws.shape[0]} theta draws could not be evaluated (the inner solve failed "
            f"there) and were drawn again, which truncates the Gaussian of theta; the first failure: {failed[0]}",
            UserWarning,
            stacklevel=2,
        )
    log_q += gaussian.logpdf(reduced_draws)
    laplace.solve_inner(outer.theta)  # leave the warm start at the estimate
    unconstrained = unconstrained.reshape(chains, draws, -1)
    posterior, log_p = evaluate_draws(compiled.joint, unconstrained, progressbar=False)
    if boundary.size:  # q lives on fewer dimensions than p: their ratio is no importance weight
        checked = {"pareto_k": float("nan"), "importance_ess": float("nan")}
    else:
        checked = check_approximation(log_p, log_q, advice=INTEGRATED_ADVICE)
    groups = draw_groups(
        compiled.joint,
        unconstrained,
        log_likelihood=log_likelihood_request(idata_kwargs),
        include_transformed=include_transformed,
    )
    drawn, compile_drawn = time.perf_counter(), compile_seconds()

    natural_values, natural_jac = compiled.natural(outer.theta)
    natural_jac = np.atleast_2d(natural_jac)
    natural_se = np.sqrt(np.einsum("ij,jk,ik->i", natural_jac, covariance, natural_jac))
    natural_se[np.any(natural_jac[:, undefined] != 0, axis=1)] = np.nan
    natural_values = np.atleast_1d(natural_values)
    n_natural = len(compiled.natural_labels)
    attrs = {
        "method": f"integrated_laplace_{method}",
        "random": list(compiled.b_layout.names),
        "ridge": float(ridge),
        "outer_success": int(outer.success or on_boundary),
        "boundary": described,
        "not_positive_definite": not_positive,
        "failed_theta_draws": len(failed),
        "n_agq": int(n_agq),
        "conditional": conditional,
        # AGHQ minus Laplace log likelihood at the estimate (NaN where not checked: crossed effects, many blocks)
        "laplace_error_aghq": laplace_error,
        **random_attrs(compiled),
        **checked,
        # wall-clock seconds of this call: compiling (graphs built and compiled, none when reused), fitting (outer
        # optimisation, standard errors) and drawing, each without the compiling done within it
        "compile_seconds": compile_drawn - compile_before,
        "fit_seconds": (fitted - started) - (compile_fitted - compile_before),
        "draws_seconds": (drawn - fitted) - (compile_drawn - compile_fitted),
    }
    result = build_result(
        posterior=posterior,
        posterior_variables=compiled.joint.posterior_variables,
        coords=compiled.joint.coords,
        sample_stats={"log_p": log_p, "log_q": log_q.reshape(chains, draws)},
        fit_vectors={"mean_vector": outer.theta},
        fit_matrices={"covariance_matrix": reported_covariance},
        fit_scalars={
            "log_marginal_likelihood": log_lik,
            "objective": outer.objective,
            "aic": 2.0 * n_params - 2.0 * log_lik,
            "bic": np.log(max(n_obs, 1)) * n_params - 2.0 * log_lik,
            "df": n_params,
            "nobs": n_obs,
        },
        labels=theta_labels,
        optimizer={
            **outer.record(),
            "inner_steps_at_estimate": solution.n_steps,
            "inner_grad_norm_at_estimate": solution.grad_norm,
        },
        observed_data=compiled.joint.observed_data,
        constant_data=compiled.joint.constant_data,
        attrs=attrs,
        **groups,
        extra_fit={
            "random_effects": (("random_rows",), solution.b, compiled.b_layout.labels),
            "random_effects_se": (("random_rows",), np.sqrt(b_var), compiled.b_layout.labels),
            "natural_estimate": (("natural_rows",), natural_values[:n_natural], compiled.natural_labels),
            "natural_std_error": (("natural_rows",), natural_se[:n_natural], compiled.natural_labels),
            "derived_estimate": (("derived_rows",), natural_values[n_natural:], compiled.derived_labels),
            "derived_std_error": (("derived_rows",), natural_se[n_natural:], compiled.derived_labels),
        },
    )
    return result


INTEGRATED_ADVICE = (
    "Laplace's approximation of the random effects given theta, or the Gaussian of theta, is poor here (small "
    "groups, binary data, a variance near 0): importance_resample(result) corrects the draws only when k-hat <= 0.7; "
    "otherwise give the variances priors (method='map'), or sample with NUTS."
)
