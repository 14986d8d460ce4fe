"""``fit_laplace``: the mode of a PyMC model, the exact Hessian there, and Gaussian draws beside NUTS."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pymc as pm

from pymc_laplace._progress import progress_bar
from pymc_laplace.compile.graphs import (
    CompiledJoint,
    compile_joint,
    resolve_variables,
    start_point_error,
    validate_arguments,
)
from pymc_laplace.convert import build_result
from pymc_laplace.errors import OptimizationError, StartPointError
from pymc_laplace.gaussian import LOG_2PI, gaussian_from_precision
from pymc_laplace.outer.optimize import NewtonOptimizer, NewtonStatus, OptimizerResult
from pymc_laplace.report.diagnostics import check_approximation


def fit_laplace(
    model: pm.Model | None = None,
    *,
    draws: int = 1000,
    chains: int = 4,
    vars: Sequence[Any] | None = None,
    jacobian: bool = True,
    random_seed: int | np.random.Generator | None = None,
    progressbar: bool = True,
    initvals: Mapping[str, Any] | None = None,
    optimizer: NewtonOptimizer | None = None,
    ridge: float = 0.0,
    idata_kwargs: Mapping[str, Any] | None = None,
    compile_kwargs: Mapping[str, Any] | None = None,
    include_transformed: bool = False,
    covariance: bool = True,
) -> Any:
    """Fit a PyMC model by the Laplace approximation at its mode, with exact derivatives.

    The mode of the log density is found in the unconstrained space by Newton's method on the exact gradient
    and Hessian (compiled by pytensor). The covariance is the inverse of the exact negative Hessian at the mode.
    Draws from that Gaussian are mapped back to the constrained space with every Deterministic, so the result
    has the structure of ``pm.sample``'s and can be compared with NUTS in any ArviZ call.

    Parameters
    ----------
    model : pm.Model, optional
        The model; the one on the context stack when omitted.
    draws, chains : int
        The posterior group gets ``chains x draws`` independent Gaussian draws (chains only mirror
        ``pm.sample``'s layout; they are not Markov chains).
    vars : sequence of str or variables, optional
        Free variables to approximate. Default all. The others are held at the joint mode and the Gaussian is
        the conditional one of ``vars`` given them (so ``log_p`` and ``log_q`` stay comparable).
    jacobian : bool
        True (default, as Stan's ``laplace``): the mode and Hessian of the log density of the unconstrained
        values, log-Jacobian of the transforms included. False: of the density of the constrained values.
    random_seed : int or Generator, optional
    progressbar : bool
    initvals : dict, optional
        Start values on the constrained scale, by variable name (as in ``pm.sample``).
    optimizer : NewtonOptimizer, optional
        The solver and its tolerances; default ``NewtonOptimizer()`` (gradient tolerance 1e-8).
    ridge : float
        Added to the diagonal of the negative Hessian before inverting it. Zero by default: a Hessian that is
        not positive definite raises :class:`~pymc_laplace.errors.HessianNotPositiveDefiniteError`. A ridge is
        recorded in the result's posterior attrs.
    idata_kwargs : dict, optional
        ``{"log_likelihood": True | False}``: the ``log_likelihood`` group (elementwise log likelihood of each
        observed variable at each draw, for ``az.loo``). By default it is added when it holds at most 25 million
        values (draws x observations); ask for it with True beyond that, or leave it out with False.
    compile_kwargs : dict, optional
        Passed to ``pytensor.function``.
    include_transformed : bool
        Add the ``unconstrained_posterior`` group: the draws of each value variable (e.g. ``sigma_log__``) on the
        unconstrained scale where the Gaussian lives, as pymc-extras' ``fit_laplace`` does.
    covariance : bool
        False: the mode alone (pymc-extras' ``find_MAP(compute_hessian=False)``): no covariance, no draws, no
        diagnostics; the posterior group holds the mode as its single draw (one chain) and the fit group its
        unconstrained ``mean_vector``. Newton's method still uses the Hessian to find the mode.

    Returns
    -------
    arviz.InferenceData or xarray.DataTree
        The type ``pm.sample`` returns with the installed PyMC. Groups: ``posterior``; ``sample_stats``
        (``log_p``: model log density of each draw, in the space and Jacobian convention of the mode;
        ``log_q``: Gaussian log density); ``fit`` (``mean_vector``, ``covariance_matrix`` over labelled
        ``rows``/``columns``, ``log_marginal_likelihood``); ``optimizer_result``; ``observed_data``;
        ``constant_data``; ``log_likelihood`` (see ``idata_kwargs``); ``unconstrained_posterior`` when asked. The
        attrs hold ``pareto_k`` and ``importance_ess`` of the draws' importance ratios ``p/q``: above 0.7 an
        :class:`~pymc_laplace.errors.ApproximationWarning` says the Gaussian is not to be trusted.

    Raises
    ------
    ModelSpecificationError
        No model, no or discrete free variables, ``vars``/``initvals`` naming something that is not a free
        variable (or a variable twice), ``draws``/``chains`` not positive integers, a negative or non-finite
        ``ridge``. Raised before anything is compiled.
    StartPointError
        The log density is not finite at the start point (the message lists each variable's log density there),
        or it is finite but its derivatives overflow there.
    OptimizationError
        The optimiser diverged (improper posterior), found the density unbounded (a funnel: no joint mode),
        stalled, or ran out of steps.
    HessianNotPositiveDefiniteError
        The negative Hessian at the mode is not positive definite (a flat or non-identified direction).

    Examples
    --------
    >>> import pymc as pm
    >>> from pymc_laplace import fit_laplace
    >>> with pm.Model() as model:
    ...     mu = pm.Normal("mu", 0, 10)
    ...     pm.Normal("y", mu, 1, observed=[0.3, -0.1, 0.5])
    ...     idata = fit_laplace(progressbar=False, random_seed=1)
    >>> round(float(idata["fit"]["mean_vector"][0]), 4)
    0.2331
    """
    model = validate_arguments(model, draws=draws, chains=chains, ridge=ridge)
    selected_names = resolve_variables(
        model, vars, argument="vars", if_empty="Leave `vars` out (None) to approximate every free variable."
    )
    compiled = compile_joint(model, jacobian=jacobian, initvals=initvals, compile_kwargs=compile_kwargs)
    rng = np.random.default_rng(random_seed)
    optimizer = optimizer or NewtonOptimizer()
    log_likelihood = log_likelihood_request(idata_kwargs)

    mode = find_mode(compiled, optimizer, progressbar=progressbar)
    layout = compiled.layout
    if not covariance:
        return _mode_only(compiled, mode, jacobian=jacobian, include_transformed=include_transformed)
    precision = -mode.hessian
    full = gaussian_from_precision(mode.x, precision, layout.labels, ridge=ridge, what="model log density")
    log_evidence = mode.logp + 0.5 * layout.size * LOG_2PI - 0.5 * full.log_det_precision

    # in the layout's order whatever the order of `vars`: the Gaussian's mean, its labels and the draws agree
    selected = np.sort(layout.indices(selected_names))
    if selected.size == layout.size:
        gaussian = full
        unconstrained, log_q = gaussian.sample_and_logpdf(rng, (chains, draws))
    else:
        sub_labels = [layout.labels[i] for i in selected]
        gaussian = gaussian_from_precision(
            mode.x[selected], precision[np.ix_(selected, selected)], sub_labels, ridge=ridge, what="model log density"
        )
        sub_draws, log_q = gaussian.sample_and_logpdf(rng, (chains, draws))
        unconstrained = np.broadcast_to(mode.x, (chains, draws, layout.size)).copy()
        unconstrained[..., selected] = sub_draws
    posterior, log_p = evaluate_draws(compiled, unconstrained, progressbar=progressbar)
    checked = check_approximation(log_p, log_q, advice=LAPLACE_ADVICE)

    attrs = {
        "method": "laplace",
        "jacobian": int(jacobian),
        "ridge": float(ridge),
        "approximated_variables": [name for name in layout.names if name in selected_names],
        **checked,
    }
    return build_result(
        posterior=posterior,
        posterior_variables=compiled.posterior_variables,
        coords=compiled.coords,
        sample_stats={"log_p": log_p, "log_q": log_q},
        fit_vectors={"mean_vector": gaussian.mean},
        fit_matrices={"covariance_matrix": gaussian.covariance},
        fit_scalars={"log_marginal_likelihood": log_evidence},
        labels=[layout.labels[i] for i in selected],
        optimizer=optimizer_stats(mode),
        observed_data=compiled.observed_data,
        constant_data=compiled.constant_data,
        attrs=attrs,
        **draw_groups(compiled, unconstrained, log_likelihood=log_likelihood, include_transformed=include_transformed),
    )


LAPLACE_ADVICE = (
    "importance_resample(result) corrects the draws only when k-hat <= 0.7; otherwise reparameterise (log or logit "
    "scales, non-centred group effects), integrate group effects out with fit_integrated_laplace, or sample with "
    "NUTS."
)

# By default the log_likelihood group is added up to this many values (draws x observations, 8 bytes each).
LOG_LIKELIHOOD_AUTO_VALUES = 25_000_000


def log_likelihood_request(idata_kwargs: Mapping[str, Any] | None) -> bool | None:
    """``idata_kwargs["log_likelihood"]``: True or False as asked, None (decide by size) when not given."""
    value = dict(idata_kwargs or {}).get("log_likelihood")
    return None if value is None else bool(value)


def draw_groups(
    compiled: CompiledJoint, unconstrained: np.ndarray, *, log_likelihood: bool | None, include_transformed: bool
) -> dict[str, Any]:
    """The ``log_likelihood`` and ``unconstrained_posterior`` groups' arrays for the draws ``(chain, draw, n)``, as
    keyword arguments of :func:`build_result`."""
    lead = unconstrained.shape[:-1]
    flat = unconstrained.reshape(-1, unconstrained.shape[-1])
    groups: dict[str, Any] = {}
    if log_likelihood is None:
        n_values = flat.shape[0] * sum(int(np.size(v.values)) for v in compiled.observed_data)
        log_likelihood = n_values <= LOG_LIKELIHOOD_AUTO_VALUES
    if log_likelihood and compiled.pointwise_log_likelihood is not None:
        pieces = [compiled.pointwise_log_likelihood(flat[i : i + DRAWS_PER_BATCH])
                  for i in range(0, flat.shape[0], DRAWS_PER_BATCH)]  # fmt: skip
        groups["log_likelihood"] = {}
        for k, variable in enumerate(compiled.log_likelihood_variables):
            values = np.concatenate([np.asarray(piece[k]) for piece in pieces])
            groups["log_likelihood"][variable.name] = values.reshape(lead + values.shape[1:])
        groups["log_likelihood_variables"] = compiled.log_likelihood_variables
    if include_transformed:
        layout = compiled.layout
        groups["unconstrained_posterior"] = {
            name: flat[:, where].reshape(lead + shape)
            for name, where, shape in zip(layout.names, layout.slices, layout.shapes, strict=True)
        }
        groups["unconstrained_dims"] = dict(zip(layout.names, compiled.value_dims, strict=True))
    return groups


def _mode_only(compiled: CompiledJoint, mode: OptimizerResult, *, jacobian: bool, include_transformed: bool) -> Any:
    """The result of ``fit_laplace(covariance=False)``: the mode as a single draw."""
    unconstrained = mode.x[None, None, :]
    posterior, log_p = evaluate_draws(compiled, unconstrained, progressbar=False)
    return build_result(
        posterior=posterior,
        posterior_variables=compiled.posterior_variables,
        coords=compiled.coords,
        sample_stats={"log_p": log_p},
        fit_vectors={"mean_vector": mode.x},
        fit_matrices={},
        fit_scalars={},
        labels=list(compiled.layout.labels),
        optimizer=optimizer_stats(mode),
        observed_data=compiled.observed_data,
        constant_data=compiled.constant_data,
        attrs={"method": "mode", "jacobian": int(jacobian)},
        **draw_groups(compiled, unconstrained, log_likelihood=False, include_transformed=include_transformed),
    )


def optimizer_stats(result: OptimizerResult) -> dict[str, Any]:
    """The ``optimizer_result`` group's entries."""
    return {
        "iterations": result.n_steps,
        "evaluations": result.n_evaluations,
        "grad_norm": result.grad_norm,
        "logp": result.logp,
        "success": result.success,
        "message": result.message,
        "wall_time": result.wall_time,
    }


def find_mode(compiled: CompiledJoint, optimizer: NewtonOptimizer, *, progressbar: bool) -> OptimizerResult:
    """Maximise the compiled log density from its start point; raise with a useful message unless converged."""
    start = compiled.start
    f0, g0, h0 = compiled.value_grad_hess(start)
    if not np.isfinite(f0):
        raise start_point_error(f0, compiled.describe_point(start))
    if not (np.all(np.isfinite(g0)) and np.all(np.isfinite(h0))):
        raise StartPointError(_overflow_message(compiled, start, f0, g0, h0, where="the start point"))
    with progress_bar("Newton", None, enabled=progressbar) as bar:

        def report(step: int, logp: float, grad_norm: float) -> None:
            bar.update(advance=1, status=f"logp {logp:.6g}  max|grad| {grad_norm:.2e}")

        # a rejected trial point needs only the log density: one forward pass instead of the n products of the
        # Hessian
        result = optimizer.maximize(
            compiled.value_grad_hess,
            start,
            callback=report,
            value=lambda x: compiled.logp_and_outputs(x)[0],
            start_value=(f0, g0, h0),
        )
    if result.success:
        return result
    raise OptimizationError(_failure_message(result, compiled, f0, h0, optimizer))


def _overflow_message(
    compiled: CompiledJoint, x: np.ndarray, logp: float, grad: np.ndarray, hessian: np.ndarray, *, where: str
) -> str:
    """The log density is finite at ``x`` but its gradient or Hessian is not: say so, and where."""
    labels = compiled.layout.labels
    bad_grad = [labels[i] for i in np.flatnonzero(~np.isfinite(grad))]
    bad_hess = [labels[i] for i in np.flatnonzero(~np.all(np.isfinite(hessian), axis=0))]
    parts = ([f"the gradient is not finite in {bad_grad}"] if bad_grad else []) + (
        [f"the Hessian is not finite in the rows of {bad_hess}"] if bad_hess else []
    )
    return (
        f"The log density is finite ({logp:.6g}) at {where}, but its derivatives overflow there: "
        + " and ".join(parts)
        + ". The point is inside the support, but the derivatives are singular or overflow there (e.g. a square "
        "root or a power below 2 of a value at 0, or the exp of a large value). Newton's method needs them: start "
        "elsewhere with `initvals`, or reparameterise these variables so that their derivatives stay finite. The "
        "point (unconstrained) and each variable's log density there:\n" + compiled.describe_point(x)
    )


def _failure_message(
    result: OptimizerResult,
    compiled: CompiledJoint,
    start_logp: float,
    start_hessian: np.ndarray,
    optimizer: NewtonOptimizer,
) -> str:
    labels = compiled.layout.labels

    def top(values: np.ndarray, k: int = 4) -> str:
        finite = np.where(np.isfinite(values), np.abs(values), np.inf)
        order = np.argsort(-finite)[:k]
        return ", ".join(f"{labels[i]} = {values[i]:.4g}" for i in order)

    head = f"The mode was not found: {result.message} (after {result.n_steps} steps)."
    funnel = _funnel_message(result, compiled, start_logp, start_hessian)
    # on the unconstrained scale a move of 50 (a factor exp(50)) is no plausible change of anything
    ran_away = np.abs(result.x - compiled.start) > 50.0
    improper = result.status in (NewtonStatus.DIVERGED, NewtonStatus.UNBOUNDED) or bool(np.any(ran_away))
    # A density of constrained values that runs away is first of all a case for jacobian=True; with the Jacobian
    # (or when the search crawls rather than runs) exploding curvature is the more specific diagnosis.
    if funnel is not None and (compiled.jacobian or not improper):
        return f"{head} {funnel}"
    if improper:
        return (
            f"{head} The largest unconstrained values are {top(result.x)}; log density {result.logp:.6g}. "
            "The posterior looks improper or unbounded along these variables: give them proper priors, or use "
            "jacobian=True for scale parameters (a density of a constrained value can be unbounded at the boundary)."
        )
    if result.status is NewtonStatus.DERIVATIVES_NONFINITE:
        return (
            f"{head} The log density still increases along the Newton direction, but at the points tried its "
            "gradient or Hessian overflows (is not finite) although the log density itself is finite there. "
            f"The search stopped near {top(result.x)}. Reparameterise the variables involved so that their "
            "derivatives stay finite, or give `initvals` nearer the mode."
        )
    return (
        f"{head} The largest gradient components are {top(result.grad)}. Try more steps "
        f"(NewtonOptimizer(max_steps={2 * optimizer.max_steps})), a looser gtol (now {optimizer.gtol:g}), better "
        "`initvals`, or check the model for a non-smooth log density."
    )


# The curvature along a coordinate that grew this much while the search raised the log density: the density
# is heading for a singularity, not a mode.
_CURVATURE_BLOWUP = 1e8


def _funnel_message(
    result: OptimizerResult, compiled: CompiledJoint, start_logp: float, start_hessian: np.ndarray
) -> str | None:
    """A funnel: the search raises the log density while the curvature along some variables grows without bound.

    In a centred hierarchical model ``theta ~ Normal(mu, tau)`` the joint density (Jacobian included) grows like
    ``-(n_groups - 1) log tau`` as ``tau -> 0`` with every ``theta`` at ``mu``, and the curvature along ``theta``
    grows like ``1 / tau^2``: the joint mode does not exist and Newton's steps shrink to nothing on the way.
    """
    if not (np.isfinite(result.logp) and result.logp > start_logp):
        return None
    layout = compiled.layout
    curvature = np.abs(np.diag(result.hessian))
    before = np.maximum(np.abs(np.diag(start_hessian)), 1.0)
    exploded = np.isfinite(curvature) & (curvature > _CURVATURE_BLOWUP * before)
    if not exploded.any():
        return None
    moved = np.where(exploded, 0.0, np.abs(result.x - compiled.start))
    runaway = int(np.argmax(moved))
    owner = np.empty(layout.size, dtype=int)
    for k, where in enumerate(layout.slices):
        owner[where] = k
    rv_names = [v.name for v in compiled.posterior_variables[: len(layout.names)]]
    steep = [k for k in dict.fromkeys(owner[exploded]) if k != owner[runaway]]
    if not steep:
        return None
    groups = [k for k in steep if int(np.prod(layout.shapes[k], dtype=int)) > 1] or steep
    random = [rv_names[k] for k in groups]
    growth = float(np.max(curvature[exploded] / before[exploded]))
    return (
        f"The joint mode does not exist: the log density is unbounded above (a funnel). The search raised it "
        f"from {start_logp:.6g} to {result.logp:.6g} by moving {layout.labels[runaway]} from "
        f"{compiled.start[runaway]:.4g} to {result.x[runaway]:.4g}, while the curvature along "
        f"{[rv_names[k] for k in steep]} grew by a factor of {growth:.1e}. In a hierarchical model the joint "
        "density grows without bound as a group scale shrinks to 0 with the group effects at their mean, so "
        "more Newton steps cannot help. Integrate the group effects out instead: "
        f"fit_integrated_laplace(model, random={random}) (method='map' keeps the prior of the scale, whose "
        "maximum-likelihood estimate may be 0), or write them non-centred (theta = mu + tau * z with "
        "z ~ Normal(0, 1))."
    )


# Draws evaluated per call of a batched function: bounds the memory of its intermediate arrays (a draw of a model
# with 20,000 observations has arrays of 20,000 values). Larger batches were no faster on 2,000 parameters and
# 20,000 observations, and slower with 1,000 (their arrays leave the cache); 4,000 bioassay draws take 1 ms.
DRAWS_PER_BATCH = 250


def evaluate_draws(
    compiled: CompiledJoint, unconstrained: np.ndarray, *, progressbar: bool
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Constrained values, Deterministics and log density of each unconstrained draw ``(chain, draw, n)``.

    With ``compiled.logp_and_outputs_batched`` (``(M, n) -> [logp (M,), *outputs (M, ...)]``) the draws are
    evaluated ``DRAWS_PER_BATCH`` at a time; without it, one at a time. A draw whose log density is not finite in a
    batch is evaluated again on its own, so that a parameter check of the batched graph (one condition over the
    whole batch) cannot spread one draw's ``-inf`` to the others; a batch that raises is evaluated draw by draw,
    so an error names the same draw as without batching.
    """
    lead = unconstrained.shape[:-1]
    flat = unconstrained.reshape(-1, unconstrained.shape[-1])
    n_draws = flat.shape[0]
    names = [v.name for v in compiled.posterior_variables]
    batched = getattr(compiled, "logp_and_outputs_batched", None)
    log_p = np.empty(n_draws)
    values: dict[str, np.ndarray] = {}

    def store(rows: int | slice, lp: Any, outputs: Sequence[Any], *, batch: bool) -> None:
        log_p[rows] = lp
        for name, out in zip(names, outputs, strict=True):
            if name not in values:
                values[name] = np.empty((n_draws, *np.shape(out)[1 if batch else 0 :]))
            values[name][rows] = out

    def one_at_a_time(rows: Sequence[int]) -> None:
        for i in rows:
            lp, *outputs = compiled.logp_and_outputs(flat[i])
            store(int(i), lp, outputs, batch=False)

    step = DRAWS_PER_BATCH if batched is not None else 1000
    with progress_bar("Draws", n_draws, enabled=progressbar and n_draws >= 20_000) as bar:
        for begin in range(0, n_draws, step):
            rows = range(begin, min(begin + step, n_draws))
            try:
                results = batched(flat[begin : rows.stop]) if batched is not None else None
            except Exception:  # evaluated again one at a time: the same error as without batching, or none
                results = None
            if results is None:
                one_at_a_time(rows)
            else:
                lp, *outputs = results
                store(slice(begin, rows.stop), lp, outputs, batch=True)
                one_at_a_time(begin + np.flatnonzero(~np.isfinite(log_p[begin : rows.stop])))
            bar.update(advance=len(rows))
    return {n: v.reshape(lead + v.shape[1:]) for n, v in values.items()}, log_p.reshape(lead)
