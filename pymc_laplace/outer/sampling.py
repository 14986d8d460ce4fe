"""NUTS over the outer parameters with the random effects integrated out by the Laplace approximation.

The Laplace marginal ``L(theta)`` and its exact gradient become one pytensor Op (:class:`LaplaceMarginalOp`), so a
PyMC model over ``theta`` alone (a flat vector of the unconstrained outer parameters, their priors and Jacobians
added by the Op) can be sampled by ``pm.sample``. Each posterior draw of ``theta`` is then completed by a draw of the
random effects from their conditional Gaussian ``N(b^(theta), Q(theta)^-1)`` (Stan's ``laplace_latent_rng``).
"""

from __future__ import annotations

import multiprocessing
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pymc as pm
import pytensor.tensor as pt
from pytensor.gradient import DisconnectedType, grad_not_implemented
from pytensor.graph.basic import Apply
from pytensor.graph.op import Op

from pymc_laplace._compat import get_group
from pymc_laplace._progress import progress_bar
from pymc_laplace.compile.graphs import compile_seconds, resolve_variables, validate_arguments
from pymc_laplace.convert import build_result
from pymc_laplace.errors import ApproximationWarning, ModelSpecificationError
from pymc_laplace.gaussian import LOG_2PI
from pymc_laplace.inner.blocks import BlockStructure
from pymc_laplace.inner.marginal import InnerNewton, InnerSolveError, LaplaceMarginal
from pymc_laplace.inner.quadrature import (
    LAPLACE_ERROR_WARNING,
    check_quadrature,
    default_check,
    quadrature_value_and_grad,
)
from pymc_laplace.integrated import OuterOptimizer, marginal_for, random_attrs
from pymc_laplace.laplace import draw_groups, evaluate_draws, log_likelihood_request

THETA_NAME = "theta_unconstrained"
# random-effect draws solved in one batched call when the structure allows it
RANDOM_EFFECT_BATCH = 500


class LaplaceMarginalOp(Op):
    """``theta -> (log p(y | theta) [+ log p(theta)], gradient)`` for a compiled :class:`LaplaceMarginal`.

    ``theta`` is the flat vector of unconstrained outer parameters in the order of
    ``laplace.compiled.theta_layout``. The first output is the Laplace log marginal likelihood, plus the log prior
    of ``theta`` with the Jacobians of its transforms when ``prior=True``; the second is its exact gradient
    (implicit function theorem), which is also what the Op's gradient returns, so ``pm.sample`` evaluates both in
    one inner solve. The inner solve is warm-started from the last solution (the previous leapfrog step). With
    ``n_agq > 1`` the marginal is adaptive Gauss-Hermite quadrature with ``n_agq`` nodes per dimension over each
    independent block of random effects (:func:`pymc_laplace.inner.quadrature.quadrature_value_and_grad`), also
    with its exact gradient.

    A ``theta`` where the inner solve fails (no conditional mode found, ``Q`` not positive definite) gets log
    density ``-inf``: NUTS rejects the step as a divergence. The failures are counted in ``failures`` (shared with
    the chains' worker processes when they are forked) and the first message kept in ``first_failure``, so that
    :func:`sample_integrated` can report them.

    Examples
    --------
    >>> import numpy as np, pymc as pm, pytensor.tensor as pt
    >>> from pymc_laplace import marginal
    >>> from pymc_laplace.outer.sampling import LaplaceMarginalOp
    >>> with pm.Model() as model:
    ...     sigma = pm.HalfNormal("sigma", 1.0)
    ...     u = pm.Normal("u", 0.0, sigma, shape=3)
    ...     _ = pm.Poisson("y", pm.math.exp(u[[0, 0, 1, 2]]), observed=[1, 2, 0, 4])
    >>> op = LaplaceMarginalOp(marginal(model, random=["u"]), prior=True)
    >>> value, grad = op(pt.as_tensor_variable(np.zeros(1)))
    """

    def __init__(self, laplace: LaplaceMarginal, *, prior: bool = True, n_agq: int = 1) -> None:
        if n_agq > 1:
            check_quadrature(laplace, n_agq)  # raises, with the reason, where the blocks do not allow it
        self.laplace = laplace
        self.prior = prior
        self.n_agq = int(n_agq)
        self.failures = multiprocessing.Value("l", 0)
        self.first_failure: str | None = None

    # an Op holds its own marginal: two Ops are equal only when they are the same object
    def __eq__(self, other: object) -> bool:
        return self is other

    def __hash__(self) -> int:
        return id(self)

    def __str__(self) -> str:
        names = ", ".join(self.laplace.compiled.b_layout.names)
        method = "Laplace" if self.n_agq == 1 else f"AGHQ {self.n_agq}"
        return f"LaplaceMarginal({names} integrated out by {method}{', with prior' if self.prior else ''})"

    def make_node(self, theta: Any) -> Apply:
        theta = pt.as_tensor_variable(theta).astype("float64")
        size = self.laplace.compiled.theta_layout.size
        if theta.type.ndim != 1:
            raise TypeError(f"LaplaceMarginalOp takes the flat vector of the {size} unconstrained outer parameters")
        return Apply(self, [theta], [pt.dscalar(), pt.dvector()])

    def evaluate(self, theta: np.ndarray) -> tuple[float, np.ndarray]:
        """The Op's two outputs at ``theta`` (``-inf`` and zeros where the inner solve fails)."""
        theta = np.asarray(theta, dtype=float)
        try:
            if self.n_agq == 1:
                value, grad = self.laplace.value_and_grad(theta)
            else:
                value, grad = quadrature_value_and_grad(self.laplace, theta, self.n_agq)
            if self.prior:
                log_prior, prior_grad = self.laplace.compiled.prior(theta)
                value, grad = value + float(log_prior), grad + np.asarray(prior_grad, dtype=float)
        except InnerSolveError as err:
            with self.failures.get_lock():
                self.failures.value += 1
            self.first_failure = self.first_failure or str(err)
            return -np.inf, np.zeros(theta.size)
        if not (np.isfinite(value) and np.all(np.isfinite(grad))):
            return -np.inf, np.zeros(theta.size)
        return float(value), grad

    def perform(self, node: Apply, inputs: list[np.ndarray], outputs: list[list[Any]]) -> None:
        value, grad = self.evaluate(inputs[0])
        outputs[0][0] = np.asarray(value, dtype="float64")
        outputs[1][0] = np.asarray(grad, dtype="float64")

    def L_op(self, inputs: list[Any], outputs: list[Any], output_grads: list[Any]) -> list[Any]:
        value_grad, gradient_grad = output_grads
        if not isinstance(gradient_grad.type, DisconnectedType):
            return [grad_not_implemented(self, 0, inputs[0], "the Hessian of the Laplace marginal is not compiled")]
        if isinstance(value_grad.type, DisconnectedType):
            return [pt.zeros_like(inputs[0])]
        return [value_grad * outputs[1]]


def sample_integrated(
    model: pm.Model | None = None,
    *,
    random: Sequence[Any],
    draws: int = 1000,
    tune: int = 1000,
    chains: int = 4,
    cores: int | None = None,
    random_seed: int | None = None,
    progressbar: bool = True,
    initvals: Mapping[str, Any] | None = None,
    start: str = "map",
    n_agq: int = 1,
    inner: InnerNewton | None = None,
    compiled_marginal: LaplaceMarginal | None = None,
    idata_kwargs: Mapping[str, Any] | None = None,
    compile_kwargs: Mapping[str, Any] | None = None,
    **sample_kwargs: Any,
) -> Any:
    """Sample the outer parameters with NUTS on their Laplace marginal posterior, random effects integrated out.

    The posterior of ``theta`` (every free variable not in ``random``) is ``p(theta) L(theta)`` with ``L`` the
    Laplace approximation of ``p(y | theta)``, whose exact gradient NUTS follows. Each posterior draw of ``theta``
    is completed by one draw of the random effects from ``N(b^(theta), Q(theta)^-1)``, so the result has every
    variable of the model, as ``pm.sample`` on the full model has. Where the random effects are Gaussian given
    data and ``theta`` with a Gaussian likelihood, ``L`` is exact and so is this posterior.

    Parameters
    ----------
    model : pm.Model, optional
    random : sequence of str or variables
        The latent variables to integrate out.
    draws, tune, chains, cores, random_seed, progressbar
        As in ``pm.sample``. Chains run in forked worker processes when ``cores > 1`` (where ``fork`` is
        available; one process otherwise).
    initvals : dict, optional
        Start values (constrained scale) of the outer parameters and of the first inner solve.
    start : {"map", "initial"}
        Where the chains start: the maximum of ``p(theta) L(theta)`` found by the outer optimiser (default), or the
        model's initial point. pymc's own jitter is then applied as ``init`` says.
    n_agq : int
        Nodes per dimension of adaptive Gauss-Hermite quadrature over each independent block of random effects
        (``n_agq^d`` nodes per block of ``d``), in place of the Laplace marginal: 1 (default) is Laplace. Where
        :func:`pymc_laplace.check_laplace` finds Laplace off by more than a few tenths, more nodes bring the
        posterior of ``theta`` to that of the full model. Needs a block-diagonal ``Q``. The random effects are
        still drawn from their conditional Gaussian given each ``theta``, and ``log_marginal`` is the quadrature's.
    inner : InnerNewton, optional
    compiled_marginal : LaplaceMarginal, optional
        What :func:`pymc_laplace.marginal` compiled for this model and these random effects, reused.
    idata_kwargs : dict, optional
        ``{"log_likelihood": bool}`` as in :func:`pymc_laplace.fit_laplace`.
    compile_kwargs : dict, optional
    **sample_kwargs
        Passed to ``pm.sample`` (``target_accept``, ``init``, ``step`` settings, ...).

    Returns
    -------
    arviz.InferenceData or xarray.DataTree
        As ``pm.sample`` returns: ``posterior`` with every variable of the model (the random effects drawn given
        each ``theta``), ``sample_stats`` of NUTS (divergences, tree depth, ...) with ``log_marginal`` (``p(theta)
        L(theta)`` of each draw), ``observed_data``, ``constant_data`` and, by default, ``log_likelihood``. The attrs
        record ``inner_failures`` (steps rejected because the inner solve failed), ``max_rhat`` and ``min_ess_bulk``
        over the outer parameters (a warning names those past R-hat 1.01 or 100 effective draws per chain),
        ``laplace_error_aghq`` and ``laplace_error_aghq_map`` (Laplace against 5-node AGHQ at the posterior mean of
        ``theta`` and at the start found by ``start="map"``, where the blocks allow it cheaply; an
        ``ApproximationWarning`` from 1 on, the second before sampling starts), ``n_agq`` and the time spent
        compiling, sampling and drawing the random effects.

    Raises
    ------
    ModelSpecificationError
        As :func:`pymc_laplace.marginal`; also ``random`` covering every free variable, bad ``draws``/``chains``,
        an unknown ``start``, a ``step``/``nuts_sampler`` other than PyMC's own NUTS, or ``n_agq > 1`` where ``Q``
        is not block-diagonal or the blocks would need too many nodes.
    InnerSolveError
        The random effects could not be drawn at an accepted draw of ``theta``.

    Examples
    --------
    >>> import numpy as np, pymc as pm
    >>> from pymc_laplace import sample_integrated
    >>> with pm.Model() as model:
    ...     sigma = pm.HalfNormal("sigma", 1.0)
    ...     u = pm.Normal("u", 0.0, sigma, shape=3)
    ...     _ = pm.Poisson("y", pm.math.exp(u[[0, 0, 1, 2]]), observed=[1, 2, 0, 4])
    >>> idata = sample_integrated(model, random=["u"], draws=100, tune=100, chains=1, progressbar=False)
    """
    if start not in ("map", "initial"):
        raise ModelSpecificationError(f"`start` must be 'map' or 'initial', not {start!r}.")
    for name in ("step", "nuts_sampler", "model"):
        if name in sample_kwargs and not (name == "nuts_sampler" and sample_kwargs[name] == "pymc"):
            raise ModelSpecificationError(
                f"sample_integrated runs PyMC's own NUTS over the Laplace marginal; `{name}` cannot be set "
                "(the marginal is a Python Op that other samplers cannot call)."
            )
    started, compile_before = time.perf_counter(), compile_seconds()
    model = validate_arguments(model, draws=draws, chains=chains, ridge=0.0)
    random_values = resolve_variables(
        model, random, argument="random", if_empty="Name the random effects to integrate out."
    )
    if len(random_values) == len(model.free_RVs):
        raise ModelSpecificationError(
            f"`random` covers every free variable ({sorted(rv.name for rv in model.free_RVs)}): nothing is left for "
            "NUTS to sample once they are integrated out. Leave the hyperparameters out of `random`."
        )
    laplace = marginal_for(model, random, random_values, compiled_marginal, inner, initvals, compile_kwargs)
    compiled = laplace.compiled
    if not isinstance(n_agq, (int, np.integer)) or isinstance(n_agq, bool) or n_agq < 1:
        raise ModelSpecificationError(f"`n_agq` must be a positive integer, not {n_agq!r}.")
    op = LaplaceMarginalOp(laplace, prior=True, n_agq=n_agq)
    theta0 = compiled.theta_start.copy()
    laplace_error_map = float("nan")
    if start == "map":
        outer = OuterOptimizer().for_marginal(laplace).maximize(op.evaluate, theta0)
        if np.isfinite(outer.objective):
            theta0 = outer.theta
            # said before sampling starts: a user can stop a long run that would sample the wrong posterior
            laplace_error_map = _check_laplace_at(laplace, theta0, n_agq, "the maximum of the marginal posterior")
        op.failures.value, op.first_failure = 0, None  # count the failures of sampling only

    with pm.Model() as outer_model:
        theta = pm.Flat(THETA_NAME, shape=compiled.theta_layout.size, initval=theta0)
        value, _ = op(theta)
        pm.Potential("laplace_marginal", value)
    if cores is None:
        cores = min(chains, multiprocessing.cpu_count(), 4)
    if cores > 1 and "fork" in multiprocessing.get_all_start_methods() and sys.platform != "darwin":
        sample_kwargs.setdefault("mp_ctx", "fork")
    elif cores > 1:
        cores = 1  # the compiled marginal is shared with the chains by forking; elsewhere they run in turn
    prepared, compile_prepared = time.perf_counter(), compile_seconds()
    # pm.sample's convergence checks would name the flat vector: they are made below, by parameter label
    nuts = pm.sample(
        draws=draws,
        tune=tune,
        chains=chains,
        cores=cores,
        random_seed=random_seed,
        progressbar=progressbar,
        model=outer_model,
        compute_convergence_checks=False,
        **sample_kwargs,
    )
    sampled, compile_sampled = time.perf_counter(), compile_seconds()
    theta_draws = np.asarray(get_group(nuts, "posterior")[THETA_NAME].values, dtype=float)
    n_chains, n_draws = theta_draws.shape[:2]
    rng = np.random.default_rng(None if random_seed is None else [int(np.ravel(random_seed)[0]), 7])
    unconstrained, log_marginal = conditional_random_effects(
        laplace, theta_draws.reshape(n_chains * n_draws, -1), rng, op=op, progressbar=progressbar
    )
    unconstrained = unconstrained.reshape(n_chains, n_draws, -1)
    posterior, log_p = evaluate_draws(compiled.joint, unconstrained, progressbar=False)
    groups = draw_groups(
        compiled.joint, unconstrained, log_likelihood=log_likelihood_request(idata_kwargs), include_transformed=False
    )
    drawn, compile_drawn = time.perf_counter(), compile_seconds()
    stats = get_group(nuts, "sample_stats")
    sample_stats = {
        name: np.asarray(array.values)
        for name, array in stats.data_vars.items()
        if array.dims == ("chain", "draw") and name != "lp"
    }
    if n_agq > 1:  # NUTS's own log density is the quadrature marginal plus the prior (a flat vector, no Jacobian)
        log_marginal = np.asarray(stats["lp"].values, dtype=float).reshape(-1)
    sample_stats["log_marginal"] = log_marginal.reshape(n_chains, n_draws)
    sample_stats["lp"] = log_p
    convergence = _convergence(theta_draws, compiled.theta_layout.labels)
    theta_mean = theta_draws.reshape(-1, theta_draws.shape[-1]).mean(axis=0)
    laplace_error = _check_laplace_at(laplace, theta_mean, n_agq, "the posterior mean of theta")
    failures = int(op.failures.value)
    if failures:
        detail = f"; the first: {op.first_failure}" if op.first_failure else ""
        warnings.warn(
            f"The inner solve for the random effects failed at {failures} proposed values of theta during sampling; "
            "NUTS rejected those steps as divergences, so the chains avoid that region. If the failures are many "
            f"or the divergences cluster, loosen InnerNewton's settings or reparameterise{detail}",
            UserWarning,
            stacklevel=2,
        )
    attrs = {
        "method": "integrated_laplace_nuts",
        "random": list(compiled.b_layout.names),
        "n_agq": int(n_agq),
        "inner_failures": failures,
        **random_attrs(compiled),
        "compile_seconds": compile_drawn - compile_before,
        "sampling_seconds": (sampled - prepared) - (compile_sampled - compile_prepared),
        "draws_seconds": (drawn - sampled) - (compile_drawn - compile_sampled),
        "start_seconds": (prepared - started) - (compile_prepared - compile_before),
        "tuning_steps": int(tune),
        "laplace_error_aghq": laplace_error,
        "laplace_error_aghq_map": laplace_error_map,
        **convergence,
    }
    theta_cov = np.atleast_2d(np.cov(theta_draws.reshape(-1, theta_draws.shape[-1]), rowvar=False))
    return build_result(
        posterior=posterior,
        posterior_variables=compiled.joint.posterior_variables,
        coords=compiled.joint.coords,
        sample_stats=sample_stats,
        fit_vectors={"mean_vector": theta_mean},
        fit_matrices={"covariance_matrix": theta_cov},
        fit_scalars={},
        labels=compiled.theta_layout.labels,
        optimizer={},
        observed_data=compiled.joint.observed_data,
        constant_data=compiled.joint.constant_data,
        attrs=attrs,
        **groups,
    )


# convergence thresholds of the outer parameters' chains (Vehtari et al. 2021)
RHAT_THRESHOLD = 1.01
MIN_ESS_PER_CHAIN = 100


def _convergence(theta_draws: np.ndarray, labels: Sequence[str]) -> dict[str, float]:
    """Largest rank-normalised split R-hat and smallest bulk ESS over the outer parameters; a warning naming the
    parameters past the thresholds."""
    import arviz as az

    n_chains = theta_draws.shape[0]
    rhat = np.array([float(az.rhat(theta_draws[..., k])) for k in range(theta_draws.shape[-1])])
    ess = np.array([float(az.ess(theta_draws[..., k], method="bulk")) for k in range(theta_draws.shape[-1])])
    bad_rhat = [label for label, r in zip(labels, rhat, strict=True) if n_chains > 1 and r > RHAT_THRESHOLD]
    bad_ess = [label for label, e in zip(labels, ess, strict=True) if e < MIN_ESS_PER_CHAIN * n_chains]
    if bad_rhat or bad_ess:
        warnings.warn(
            f"The chains over the outer parameters have not converged: R-hat above {RHAT_THRESHOLD} for {bad_rhat}, "
            f"bulk ESS below {MIN_ESS_PER_CHAIN} per chain for {bad_ess} (R-hat up to {np.nanmax(rhat):.3g}, ESS "
            f"down to {np.nanmin(ess):.0f}). Run longer chains or more tuning; where the Laplace marginal is not "
            "smooth in theta (a model with branches, as pt.switch on the random effects) NUTS may not mix over it.",
            UserWarning,
            stacklevel=3,
        )
    return {
        "max_rhat": float(np.nanmax(rhat)) if n_chains > 1 else float("nan"),
        "min_ess_bulk": float(np.nanmin(ess)),
    }


def _check_laplace_at(laplace: LaplaceMarginal, theta: np.ndarray, n_agq: int, where: str) -> float:
    """Laplace against a few-node AGHQ at ``theta`` (NaN where that is not cheap, or where the marginal sampled is
    already the quadrature's); a warning from ``LAPLACE_ERROR_WARNING`` on."""
    if n_agq > 1:
        return float("nan")
    try:
        error = default_check(laplace, theta)
    except InnerSolveError:
        return float("nan")
    if abs(error) >= LAPLACE_ERROR_WARNING:
        warnings.warn(
            f"At {where}, Laplace's log likelihood is off by {error:+.3g} against adaptive Gauss-Hermite quadrature "
            "over each block of random effects: the posterior sampled is that of the Laplace approximation, which "
            "can differ from the model's. Sample again with n_agq > 1 (quadrature in place of Laplace; the result "
            "should not move as n_agq grows) or compare with full NUTS (pm.sample) before trusting it.",
            ApproximationWarning,
            stacklevel=3,
        )
    return float(error)


def conditional_random_effects(
    laplace: LaplaceMarginal,
    theta_draws: np.ndarray,
    rng: np.random.Generator,
    *,
    op: LaplaceMarginalOp | None = None,
    progressbar: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """One draw of ``b ~ N(b^(theta), Q(theta)^-1)`` for each row of ``theta_draws`` (Stan's
    ``laplace_latent_rng``).

    Returns the joint unconstrained draws ``(m, n_joint)`` and the log marginal ``L(theta)`` (plus the log prior when
    ``op`` says so) of each. Block-diagonal ``Q`` is solved in batches; otherwise one solve per draw, warm-started
    from the previous draw's mode (consecutive MCMC draws are close).
    """
    compiled = laplace.compiled
    m = theta_draws.shape[0]
    unconstrained = np.empty((m, compiled.joint.layout.size))
    log_marginal = np.empty(m)
    batched = isinstance(laplace.structure, BlockStructure) and compiled.joint_newton_batched is not None and m > 50
    with progress_bar("Random effects given theta", m, enabled=progressbar) as bar:
        if batched:
            base = laplace.solve_inner(theta_draws.mean(axis=0))
            for begin in range(0, m, RANDOM_EFFECT_BATCH):
                rows = np.arange(begin, min(begin + RANDOM_EFFECT_BATCH, m))
                starts = np.broadcast_to(base.b, (rows.size, base.b.size))
                modes, factor, failures = laplace.solve_inner_batch(theta_draws[rows], starts)
                if failures:
                    _, err = failures[0]
                    raise InnerSolveError(f"The random effects could not be drawn at an accepted theta draw: {err}")
                z = rng.standard_normal(modes.shape)
                unconstrained[rows[:, None], compiled.theta_in_joint[None, :]] = theta_draws[rows]
                unconstrained[rows[:, None], compiled.b_in_joint[None, :]] = modes + factor.transposed_inverse_times(z)
                joint = compiled.joint_value_batched(modes, theta_draws[rows])
                log_marginal[rows] = joint + 0.5 * modes.shape[1] * LOG_2PI - 0.5 * factor.log_det()
                bar.update(advance=rows.size)
        else:
            for i in range(m):
                sol = laplace.solve_inner(theta_draws[i])
                b_draw, _ = sol.factor.sample_given(sol.b, rng.standard_normal(sol.b.size))
                unconstrained[i, compiled.theta_in_joint] = theta_draws[i]
                unconstrained[i, compiled.b_in_joint] = b_draw
                log_marginal[i] = sol.log_marginal
                bar.update(advance=1)
    if op is not None and op.prior:
        log_marginal += np.array([float(compiled.prior(theta)[0]) for theta in theta_draws])
    return unconstrained, log_marginal
