"""Integration over the outer parameters on a grid or a central composite design (INLA's strategies).

The Laplace marginal posterior ``pi(theta | y) ~ p(theta) L(theta)`` is explored in the standardised coordinates
``z`` of its Gaussian approximation at the mode, ``theta(z) = theta* + V Lambda^1/2 z`` (``V Lambda V^T`` the
inverse of the negative Hessian), as Rue, Martino and Chopin (2009, section 6.5) do:

* ``"grid"``: points ``z`` on a regular lattice of spacing ``step``, filled outwards from the mode through every
  point whose log posterior is within ``drop`` of the mode's; each kept point stands for a cell of volume
  ``step^m``.
* ``"ccd"``: the centre, ``2m`` axial points and the rows of a two-level orthogonal design, all non-central points
  on the sphere of radius ``f0 sqrt(m)``. The non-central points share one weight, chosen so that the design
  returns the exact second moments when the posterior is Gaussian (``E|z|^2 = m``); with the centre's weight 1
  that is ``1 / (n (f0^2 - 1) exp(-m f0^2 / 2))`` for ``n`` non-central points.

The log evidence ``log p(y) = log integral p(theta) L(theta) dtheta`` is the design's sum of ``exp(log posterior)``
times the weights and the volume ``|det V Lambda^1/2|``. Draws of ``theta`` come from the grid's cells (chosen by
weight, uniform within the cell), or, for the CCD, from the design's skewed Gaussian (along each axis ``z_i`` a normal
with a different scale on each side, fitted to the log posterior at the two axial points: INLA's "stdev
corrections") as a proposal, resampled by importance ratios against ``p(theta) L(theta)`` (Pareto-smoothed; k-hat
and the importance ESS in the attrs). The random effects of each draw come from their conditional Gaussian at
that ``theta``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy.special import logsumexp

from pymc_laplace.errors import ModelSpecificationError

# a grid larger than this many points is refused (the CCD is the strategy for many outer parameters)
MAX_GRID_POINTS = 20_000
# INLA's defaults (dz, diff.logdens, f0): grid spacing in standard deviations, log-posterior drop kept, CCD radius
GRID_STEP = 0.75
GRID_DROP = 6.0
CCD_F0 = 1.1


@dataclass(frozen=True)
class ThetaDesign:
    """The outer parameters' Laplace marginal posterior evaluated on a design.

    Attributes
    ----------
    strategy : {"grid", "ccd"}
    mode : ndarray (m,)
        The maximum ``theta*`` of ``p(theta) L(theta)``.
    scale : ndarray (m, m)
        ``V Lambda^1/2``: ``theta = mode + scale @ z``.
    z : ndarray (K, m)
        The design points in standardised coordinates.
    points : ndarray (K, m)
        The same in ``theta``.
    log_posterior : ndarray (K,)
        ``log p(theta) + L(theta)`` at each point (``-inf`` where the inner solve failed).
    log_weights : ndarray (K,)
        The design's integration weights (cell volume for the grid; CCD weights), in ``z``.
    probabilities : ndarray (K,)
        Normalised posterior weight of each point.
    log_evidence : float
        ``log integral p(theta) L(theta) dtheta``.
    side_scales : ndarray (m, 2)
        For the CCD, the scale of ``z_i`` below and above the mode fitted to the axial points (1 for a Gaussian);
        for the grid, ones.
    step : float
        The grid's spacing in ``z`` (NaN for the CCD).
    failed : int
        Points where the inner solve failed (left out).
    """

    strategy: str
    mode: np.ndarray
    scale: np.ndarray
    z: np.ndarray
    points: np.ndarray
    log_posterior: np.ndarray
    log_weights: np.ndarray
    probabilities: np.ndarray
    log_evidence: float
    side_scales: np.ndarray
    step: float
    failed: int

    @property
    def mean(self) -> np.ndarray:
        return self.probabilities @ self.points

    @property
    def covariance(self) -> np.ndarray:
        centred = self.points - self.mean
        return (self.probabilities[:, None] * centred).T @ centred

    def log_density(self, theta: np.ndarray) -> np.ndarray:
        """The log density of :meth:`sample`'s CCD draws (the skewed Gaussian) at the rows of ``theta``."""
        z = np.linalg.solve(self.scale, (np.atleast_2d(theta) - self.mode).T).T
        lower, upper = self.side_scales[:, 0], self.side_scales[:, 1]
        side = np.where(z >= 0, upper, lower)
        per_axis = np.log(2.0 / (lower + upper)) - 0.5 * (z / side) ** 2 - 0.5 * np.log(2.0 * np.pi)
        return per_axis.sum(axis=1) - np.linalg.slogdet(self.scale)[1]

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """``n`` draws of ``theta`` (rows)."""
        m = self.mode.size
        if self.strategy == "grid":
            cells = rng.choice(self.z.shape[0], size=n, p=self.probabilities)
            z = self.z[cells] + self.step * rng.uniform(-0.5, 0.5, size=(n, m))
        else:
            magnitude = np.abs(rng.standard_normal((n, m)))
            above = rng.uniform(size=(n, m)) < self.side_scales[:, 1] / self.side_scales.sum(axis=1)
            z = np.where(above, magnitude * self.side_scales[:, 1], -magnitude * self.side_scales[:, 0])
        return self.mode + z @ self.scale.T


def explore(
    log_posterior: Callable[[np.ndarray], float],
    mode: np.ndarray,
    precision: np.ndarray,
    strategy: Literal["grid", "ccd"],
    *,
    step: float = GRID_STEP,
    drop: float = GRID_DROP,
    f0: float = CCD_F0,
    max_points: int = MAX_GRID_POINTS,
    progress: Callable[[], None] | None = None,
) -> ThetaDesign:
    """Evaluate ``log_posterior`` (``-inf`` allowed) on the design ``strategy`` around ``mode``.

    ``precision`` is the negative Hessian of the log posterior at the mode (positive definite).
    """
    if strategy not in ("grid", "ccd"):
        raise ModelSpecificationError(f"`strategy` must be 'grid' or 'ccd', not {strategy!r}.")
    mode = np.asarray(mode, dtype=float)
    m = mode.size
    eigenvalues, eigenvectors = np.linalg.eigh(0.5 * (precision + precision.T))
    if np.any(eigenvalues <= 0):
        raise ModelSpecificationError(
            "The negative Hessian of the log posterior of theta is not positive definite at its mode: there is no "
            "Gaussian to standardise the design with. Give the outer parameters proper priors."
        )
    scale = eigenvectors / np.sqrt(eigenvalues)[None, :]
    centre = log_posterior(mode)
    if not np.isfinite(centre):
        raise ModelSpecificationError("The log posterior of theta is not finite at its mode.")
    failed = 0

    def evaluate(z: np.ndarray) -> float:
        nonlocal failed
        value = log_posterior(mode + scale @ z)
        if progress is not None:
            progress()
        if not np.isfinite(value):
            failed += 1
            return -np.inf
        return float(value)

    side_scales = np.ones((m, 2))
    if strategy == "grid":
        if not (step > 0 and drop > 0):
            raise ModelSpecificationError("The grid's `step` and `drop` must be positive.")
        # flood fill on the lattice step * Z^m from the mode: a point is kept when its log posterior is within
        # `drop` of the mode's, and the neighbours of kept points are visited (the kept region may bend and skew)
        values_of: dict[tuple[int, ...], float] = {(0,) * m: centre}
        frontier = [(0,) * m]
        while frontier:
            next_frontier = []
            for point in frontier:
                for axis in range(m):
                    for sign in (-1, 1):
                        neighbour = (*point[:axis], point[axis] + sign, *point[axis + 1 :])
                        if neighbour in values_of:
                            continue
                        if len(values_of) >= max_points:
                            raise ModelSpecificationError(
                                f"The grid over {m} outer parameters needs more than {max_points:,} points; use "
                                "strategy 'ccd', a larger `step` or a smaller `drop` in DesignSettings, or "
                                "sample_integrated (NUTS over theta)."
                            )
                        value = evaluate(step * np.asarray(neighbour, dtype=float))
                        values_of[neighbour] = value
                        if centre - value <= drop:
                            next_frontier.append(neighbour)
            frontier = next_frontier
        lattice = np.array(list(values_of), dtype=float).reshape(-1, m)
        values = np.array(list(values_of.values()))
        keep = centre - values <= drop
        z_design, values = step * lattice[keep], values[keep]
        log_weights = np.full(z_design.shape[0], m * np.log(step))
    else:
        if not f0 > 1.0:
            raise ModelSpecificationError("The CCD's `f0` must be above 1 (its points lie outside the unit sphere).")
        radius = f0 * np.sqrt(m)
        axial = np.concatenate([np.eye(m), -np.eye(m)]) * radius
        factorial = _two_level_design(m) * f0
        z_design = np.concatenate([np.zeros((1, m)), axial, factorial])
        values = np.array([centre] + [evaluate(z) for z in z_design[1:]])
        n_outer = z_design.shape[0] - 1
        outer_weight = 1.0 / (n_outer * (f0**2 - 1.0) * np.exp(-m * f0**2 / 2.0))
        # normalised so that the design integrates a standard normal density exactly
        standard = np.exp(-0.5 * radius**2) * outer_weight * n_outer + 1.0
        log_weights = (
            np.log(np.r_[1.0, np.full(n_outer, outer_weight)]) - np.log(standard) + 0.5 * m * np.log(2.0 * np.pi)
        )
        for axis in range(m):
            for side, row in enumerate((1 + m + axis, 1 + axis)):
                fall = centre - values[row]
                side_scales[axis, side] = radius / np.sqrt(2.0 * fall) if np.isfinite(fall) and fall > 0 else 1.0
    finite = np.isfinite(values)
    log_mass = values + log_weights
    log_total = logsumexp(log_mass[finite])
    probabilities = np.where(finite, np.exp(log_mass - log_total), 0.0)
    _, log_det_scale = np.linalg.slogdet(scale)
    return ThetaDesign(
        strategy=strategy,
        mode=mode,
        scale=scale,
        z=z_design,
        points=mode + z_design @ scale.T,
        log_posterior=values,
        log_weights=log_weights,
        probabilities=probabilities,
        log_evidence=float(log_total + log_det_scale),
        side_scales=side_scales,
        step=float(step) if strategy == "grid" else float("nan"),
        failed=failed,
    )


def _two_level_design(m: int) -> np.ndarray:
    """Rows of +-1 with mutually orthogonal columns that each sum to zero: ``m`` columns of a Sylvester Hadamard
    matrix of order ``2^ceil(log2(m + 1))`` without its column of ones (a two-level fractional factorial)."""
    order = 1
    hadamard = np.ones((1, 1))
    while order < m + 1:
        hadamard = np.block([[hadamard, hadamard], [hadamard, -hadamard]])
        order *= 2
    return hadamard[:, 1 : m + 1]


@dataclass(frozen=True)
class DesignSettings:
    """Settings of ``fit_integrated_laplace(method="grid" | "ccd")``.

    Parameters
    ----------
    step : float
        The grid's spacing, in standard deviations of the Gaussian at the mode (INLA's ``dz``).
    drop : float
        The grid keeps points whose log posterior is within ``drop`` of the mode's (INLA's ``diff.logdens``).
    f0 : float
        The CCD's radius factor: its non-central points lie at ``f0 sqrt(m)`` standard deviations.
    max_points : int
        The largest grid accepted.
    """

    step: float = GRID_STEP
    drop: float = GRID_DROP
    f0: float = CCD_F0
    max_points: int = MAX_GRID_POINTS


def fit_by_design(
    laplace: object,
    *,
    strategy: Literal["grid", "ccd"],
    settings: DesignSettings,
    optimizer: object,
    draws: int,
    chains: int,
    rng: np.random.Generator,
    progressbar: bool,
    idata_kwargs: object,
    include_transformed: bool,
    started: float,
    compile_before: float,
) -> object:
    """The body of ``fit_integrated_laplace(method="grid" | "ccd")`` once the marginal is compiled."""
    import time
    import warnings

    from pymc_laplace._progress import progress_bar
    from pymc_laplace.compile.graphs import compile_seconds
    from pymc_laplace.convert import build_result
    from pymc_laplace.errors import ApproximationWarning
    from pymc_laplace.inner.marginal import InnerSolveError
    from pymc_laplace.integrated import OuterOptimizer, random_attrs
    from pymc_laplace.laplace import draw_groups, evaluate_draws, log_likelihood_request
    from pymc_laplace.outer.sampling import LaplaceMarginalOp, conditional_random_effects
    from pymc_laplace.report.diagnostics import KHAT_THRESHOLD, pareto_smooth

    compiled = laplace.compiled
    op = LaplaceMarginalOp(laplace, prior=True)  # log p(theta) + L(theta) and its gradient; -inf where it fails

    def log_posterior(theta: np.ndarray) -> float:
        try:
            return float(laplace.value(theta) + float(compiled.prior(theta)[0]))
        except InnerSolveError:
            return -np.inf

    with progress_bar("Mode of theta", None, enabled=progressbar) as bar:

        def tracked(theta: np.ndarray) -> tuple[float, np.ndarray]:
            value, grad = op.evaluate(theta)
            bar.update(advance=1, status=f"log posterior {value:.6g}")
            return value, grad

        outer = (optimizer or OuterOptimizer()).for_marginal(laplace).maximize(tracked, compiled.theta_start)
    if not outer.success:
        warnings.warn(
            f"The mode of the log posterior of theta was not found ({outer.message}); the design is centred at the "
            "last point.",
            UserWarning,
            stacklevel=3,
        )
    with progress_bar(f"Theta on a {strategy}", None, enabled=progressbar) as bar:
        design = explore(
            log_posterior, outer.theta, -outer.hessian, strategy, step=settings.step, drop=settings.drop,
            f0=settings.f0, max_points=settings.max_points, progress=lambda: bar.update(advance=1),
        )  # fmt: skip
    if design.failed:
        warnings.warn(
            f"The inner solve failed at {design.failed} of the design's points; they were left out (weight 0).",
            UserWarning,
            stacklevel=3,
        )
    fitted, compile_fitted = time.perf_counter(), compile_seconds()
    theta_draws = design.sample(rng, chains * draws)
    unconstrained, log_marginal = conditional_random_effects(laplace, theta_draws, rng, op=op, progressbar=progressbar)
    checked: dict[str, float] = {}
    if strategy == "ccd":
        # the skewed Gaussian is a proposal: the draws are resampled by their importance ratios against the Laplace
        # marginal posterior p(theta) L(theta), known at every draw from its inner solve
        smoothed = pareto_smooth(log_marginal - design.log_density(theta_draws))
        checked = {"pareto_k": float(smoothed.pareto_k), "importance_ess": float(smoothed.ess)}
        if smoothed.pareto_k > KHAT_THRESHOLD:
            warnings.warn(
                f"The CCD's skewed Gaussian is a poor proposal for the posterior of theta (Pareto k-hat "
                f"{smoothed.pareto_k:.2f} > {KHAT_THRESHOLD}): the resampled draws are unreliable. Use "
                "method='grid' or sample_integrated (NUTS over theta).",
                ApproximationWarning,
                stacklevel=3,
            )
        keep = _systematic_resample(np.exp(smoothed.log_weights), rng)
        unconstrained, log_marginal = unconstrained[keep], log_marginal[keep]
    laplace.solve_inner(outer.theta)
    unconstrained = unconstrained.reshape(chains, draws, -1)
    posterior, log_p = evaluate_draws(compiled.joint, unconstrained, progressbar=False)
    groups = draw_groups(
        compiled.joint,
        unconstrained,
        log_likelihood=log_likelihood_request(idata_kwargs),
        include_transformed=include_transformed,
    )
    drawn, compile_drawn = time.perf_counter(), compile_seconds()
    labels = compiled.theta_layout.labels
    design_labels = [str(k) for k in range(design.z.shape[0])]
    attrs = {
        "method": f"integrated_laplace_{strategy}",
        "random": list(compiled.b_layout.names),
        "design_points": int(design.z.shape[0]),
        "failed_design_points": int(design.failed),
        **random_attrs(compiled),
        "compile_seconds": compile_drawn - compile_before,
        "fit_seconds": (fitted - started) - (compile_fitted - compile_before),
        "draws_seconds": (drawn - fitted) - (compile_drawn - compile_fitted),
        **checked,
    }
    return build_result(
        posterior=posterior,
        posterior_variables=compiled.joint.posterior_variables,
        coords=compiled.joint.coords,
        sample_stats={"log_p": log_p, "log_marginal": log_marginal.reshape(chains, draws)},
        fit_vectors={"mean_vector": design.mean, "mode": design.mode},
        fit_matrices={"covariance_matrix": design.covariance},
        fit_scalars={"log_evidence": design.log_evidence, "log_posterior_at_mode": outer.objective},
        labels=labels,
        optimizer=outer.record(),
        observed_data=compiled.joint.observed_data,
        constant_data=compiled.joint.constant_data,
        attrs=attrs,
        **groups,
        extra_fit={
            "design_points": (("design", "rows"), design.points, design_labels),
            "design_probability": (("design",), design.probabilities, design_labels),
            "design_log_posterior": (("design",), design.log_posterior, design_labels),
        },
    )


def _systematic_resample(weights: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """As many indices as weights, drawn in proportion to the weights with one uniform (systematic resampling)."""
    n = weights.size
    cumulative = np.cumsum(weights / weights.sum())
    positions = (rng.uniform() + np.arange(n)) / n
    return np.minimum(np.searchsorted(cumulative, positions), n - 1)
