"""The tables a glmmTMB or lme4 user reads: coefficients, fit statistics, random effects, confidence intervals.

Everything here reads a result (``InferenceData`` or ``DataTree``) and returns pandas objects; only
:func:`confint` with ``method="profile"`` needs the model again, to evaluate the Laplace marginal away from the
estimate.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
import pymc as pm
import scipy.optimize
import scipy.stats

from pymc_laplace._compat import get_group
from pymc_laplace._progress import progress_bar
from pymc_laplace.errors import ModelSpecificationError
from pymc_laplace.inner.marginal import InnerSolveError

PROFILE_MAX_DOUBLINGS = 8
PROFILE_XTOL = 1e-7
PROFILE_GTOL = 1e-7


def _check_level(level: float) -> float:
    if not (isinstance(level, (int, float)) and 0.0 < level < 1.0):
        raise ValueError(f"`level` must be in (0, 1), not {level!r}.")
    return float(level)


def _attrs(result: Any) -> dict[str, Any]:
    return dict(get_group(result, "posterior").attrs)


def _is_integrated(result: Any) -> bool:
    return str(_attrs(result).get("method", "")).startswith("integrated_laplace")


def summary(result: Any, *, level: float = 0.95) -> pd.DataFrame:
    """Estimates, standard errors, z and p values and Wald intervals (glmmTMB's and lme4's coefficient table).

    Rows of three scales:

    - ``"unconstrained"``: the parameters as optimised (the log of a scale, the log-odds of a probability,
      the packed log-Cholesky factor of an LKJ covariance), with the standard errors of the inverse negative
      Hessian.
    - ``"natural"``: the same parameters on their own (constrained) scale.
    - ``"derived"``: functions of the parameters the model implies (results of ``fit_integrated_laplace``): the
      standard deviations ``{name}_stds[i]`` and correlations ``{name}_corr[i, j]`` of every ``LKJCholeskyCov``,
      and the model's small Deterministics that depend on no random effect.

    Natural and derived standard errors use the delta method with the exact Jacobian (TMB's ``ADREPORT``); at
    the maximum they do not depend on how the model is parameterised.

    Parameters
    ----------
    result : InferenceData or DataTree
        Of ``fit_integrated_laplace`` or ``fit_laplace`` (the latter has only the unconstrained scale).
    level : float
        Coverage of the Wald intervals ``estimate -+ z_(1+level)/2 * std_error``, on the scale of each row.

    Returns
    -------
    pandas.DataFrame
        Indexed by label, with columns ``estimate``, ``std_error``, ``z_value`` (estimate / std_error), ``p_value``
        (two-sided, standard normal, as glmmTMB's ``Pr(>|z|)``), ``ci_lower``, ``ci_upper`` and ``scale``. NaN where
        a standard error is not defined (a boundary fit).
    """
    level = _check_level(level)
    fit = get_group(result, "fit")
    rows = [
        (str(label), float(est), float(np.sqrt(var)), "unconstrained")
        for label, est, var in zip(
            fit["rows"].values, fit["mean_vector"].values, np.diag(fit["covariance_matrix"].values), strict=True
        )
    ]
    for scale in ("natural", "derived"):
        if f"{scale}_estimate" in fit:
            rows += [
                (str(label), float(est), float(se), scale)
                for label, est, se in zip(
                    fit[f"{scale}_rows"].values,
                    fit[f"{scale}_estimate"].values,
                    fit[f"{scale}_std_error"].values,
                    strict=True,
                )
            ]
    frame = pd.DataFrame(rows, columns=["label", "estimate", "std_error", "scale"]).set_index("label")
    with np.errstate(divide="ignore", invalid="ignore"):
        z = frame["estimate"] / frame["std_error"]
    half_width = scipy.stats.norm.ppf(0.5 + level / 2.0) * frame["std_error"]
    frame.insert(2, "z_value", z)
    frame.insert(3, "p_value", 2.0 * scipy.stats.norm.sf(np.abs(z)))
    frame.insert(4, "ci_lower", frame["estimate"] - half_width)
    frame.insert(5, "ci_upper", frame["estimate"] + half_width)
    return frame


def fit_statistics(result: Any) -> pd.Series:
    """Log likelihood, AIC, BIC, degrees of freedom and the numbers of observations and of random-effect levels.

    The quantities glmmTMB's and lme4's ``summary`` print above the coefficient table (and broom's ``glance``).

    Parameters
    ----------
    result : InferenceData or DataTree
        Of ``fit_integrated_laplace``.

    Returns
    -------
    pandas.Series
        ``logLik`` (the maximised Laplace marginal log likelihood, or the log of the penalised objective's
        likelihood part for ``method="map"``), ``AIC``, ``BIC``, ``df`` (number of outer parameters), ``nobs``
        (observed values), ``df_resid`` (``nobs - df``), and ``levels[<name>]``: the number of levels (the length
        of the first axis) of each random effect integrated out.
    """
    if not _is_integrated(result):
        raise ModelSpecificationError(
            "fit_statistics reads the Laplace marginal likelihood of a fit_integrated_laplace result; this result "
            f"has method {_attrs(result).get('method')!r}."
        )
    fit, attrs = get_group(result, "fit"), _attrs(result)
    df, nobs = int(fit["df"].values), int(fit["nobs"].values)
    values: dict[str, float] = {
        "logLik": float(fit["log_marginal_likelihood"].values),
        "AIC": float(fit["aic"].values),
        "BIC": float(fit["bic"].values),
        "df": df,
        "nobs": nobs,
        "df_resid": nobs - df,
    }
    for name, levels in zip(attrs["random"], attrs["random_levels"], strict=True):
        values[f"levels[{name}]"] = int(levels)
    return pd.Series(values, name="fit_statistics", dtype=object)


def random_effects(result: Any, *, level: float = 0.95) -> pd.DataFrame:
    """The conditional modes of the random effects by variable and level, with standard errors and intervals.

    glmmTMB's ``ranef(fit, condVar = TRUE)`` in long form: the mode of each random effect at the estimated
    parameters, and its standard error including the uncertainty of those parameters (TMB's ``sdreport``).

    Parameters
    ----------
    result : InferenceData or DataTree
        Of ``fit_integrated_laplace``.
    level : float
        Coverage of the Wald intervals ``mode -+ z_(1+level)/2 * std_error``.

    Returns
    -------
    pandas.DataFrame
        Columns ``term`` (the variable integrated out, as named by its value variable), ``level`` (the element:
        its coordinate values, e.g. ``"308, (Intercept)"``), ``mode``, ``std_error``, ``ci_lower``, ``ci_upper``.
    """
    level = _check_level(level)
    if not _is_integrated(result):
        raise ModelSpecificationError("random_effects reads a fit_integrated_laplace result.")
    fit, attrs = get_group(result, "fit"), _attrs(result)
    labels = [str(label) for label in fit["random_rows"].values]
    terms, levels, start = [], [], 0
    for name, size in zip(attrs["random"], attrs["random_sizes"], strict=True):
        for label in labels[start : start + size]:
            terms.append(name)
            levels.append(label[len(name) + 1 : -1] if label.startswith(f"{name}[") else "")
        start += size
    mode, se = fit["random_effects"].values, fit["random_effects_se"].values
    half_width = scipy.stats.norm.ppf(0.5 + level / 2.0) * se
    return pd.DataFrame(
        {
            "term": terms,
            "level": levels,
            "mode": mode,
            "std_error": se,
            "ci_lower": mode - half_width,
            "ci_upper": mode + half_width,
        }
    )


def confint(
    result: Any,
    *,
    method: Literal["wald", "profile"] = "wald",
    level: float = 0.95,
    parm: Sequence[str] | None = None,
    model: pm.Model | None = None,
    progressbar: bool = True,
) -> pd.DataFrame:
    """Confidence intervals of the outer parameters: Wald, or profile likelihood on the exact Laplace marginal.

    ``method="profile"`` (glmmTMB's ``confint(method = "profile")``, TMB's ``tmbprofile``): for each parameter
    ``theta_j`` the Laplace marginal is maximised over the other parameters at fixed values of ``theta_j``; the
    interval holds the values where twice the drop from the maximum stays below ``chi2_1(level)``. Each end is
    solved to ``1e-7`` by Brent's method on the profile, each profile point by BFGS on the exact gradient. A
    parameter whose profile does not drop far enough within ``2**8`` Wald half-widths has an infinite end (a
    variance that may be zero: the lower end of its log is ``-inf`` and of the standard deviation ``0``).

    Parameters
    ----------
    result : InferenceData or DataTree
        Of ``fit_integrated_laplace`` (``method="profile"``); ``method="wald"`` also takes ``fit_laplace``'s.
    method : {"wald", "profile"}
    level : float
    parm : sequence of str, optional
        Labels (as in :func:`summary`) of the rows wanted; by default all. Profiling costs one optimisation per
        point, so name the few parameters wanted when there are many.
    model : pm.Model, optional
        The model that was fitted (from the context when not given): ``method="profile"`` evaluates its
        marginal again (compiled once, and reused from the fit when it is still in memory).
    progressbar : bool

    Returns
    -------
    pandas.DataFrame
        Indexed by label: ``estimate``, ``ci_lower``, ``ci_upper``, ``scale``. With ``method="profile"`` the rows
        are the unconstrained parameters, and the natural-scale rows that are monotone functions of one of them
        (their ends map through); derived quantities (SDs and correlations of LKJ factors) have Wald intervals
        only, from :func:`summary`.
    """
    level = _check_level(level)
    if method not in ("wald", "profile"):
        raise ModelSpecificationError(f"`method` must be 'wald' or 'profile', not {method!r}.")
    table = summary(result, level=level)
    if parm is not None:
        unknown = [p for p in parm if p not in table.index]
        if unknown:
            raise ModelSpecificationError(f"`parm` names {unknown}, not rows of summary(result): {list(table.index)}.")
    if method == "wald":
        frame = table[["estimate", "ci_lower", "ci_upper", "scale"]]
        return frame.loc[list(parm)] if parm is not None else frame
    if not _is_integrated(result):
        raise ModelSpecificationError(
            "Profile intervals are computed on the Laplace marginal of a fit_integrated_laplace result; use "
            "method='wald' for this result."
        )
    from pymc_laplace.integrated import marginal

    model = pm.modelcontext(model)
    attrs, fit = _attrs(result), get_group(result, "fit")
    laplace = marginal(model, random=list(attrs["random"]))
    compiled = laplace.compiled
    theta_labels = [str(label) for label in fit["rows"].values]
    if list(compiled.theta_layout.labels) != theta_labels:
        raise ModelSpecificationError(
            f"The model's outer parameters {list(compiled.theta_layout.labels)} are not those of the result "
            f"{theta_labels}: pass the model that was fitted."
        )
    penalised = attrs["method"].endswith("_map")

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        value, grad = laplace.value_and_grad(theta)
        if penalised:
            prior, prior_grad = compiled.prior(theta)
            value, grad = value + float(prior), grad + prior_grad
        return float(value), np.asarray(grad, dtype=float)

    theta_hat = np.asarray(fit["mean_vector"].values, dtype=float)
    covariance = np.asarray(fit["covariance_matrix"].values, dtype=float)
    natural_labels = [str(label) for label in fit["natural_rows"].values] if "natural_rows" in fit else []
    natural_values, natural_jacobian = compiled.natural(theta_hat)
    natural_jacobian = np.atleast_2d(natural_jacobian)[: len(natural_labels)]
    # a natural row that moves with one parameter alone (an elementwise transform) gets that parameter's ends
    natural_of = {}
    for k, label in enumerate(natural_labels):
        moving = np.flatnonzero(natural_jacobian[k] != 0)
        if moving.size == 1:
            natural_of.setdefault(int(moving[0]), []).append((k, label))
    wanted = [
        j
        for j, label in enumerate(theta_labels)
        if parm is None or label in parm or any(lab in parm for _, lab in natural_of.get(j, []))
    ]
    if parm is not None:
        profiled = {theta_labels[j] for j in wanted} | {lab for j in wanted for _, lab in natural_of.get(j, [])}
        missing = [p for p in parm if p not in profiled]
        if missing:
            raise ModelSpecificationError(
                f"No profile interval for {missing}: profiles are of the unconstrained parameters and of natural "
                "rows that depend on one of them; use method='wald' for derived quantities."
            )
    value_hat = objective(theta_hat.copy())[0]
    threshold = scipy.stats.chi2.ppf(level, df=1)
    rows = []
    with progress_bar("Profile likelihood", 2 * len(wanted), enabled=progressbar) as bar:
        for j in wanted:
            ends = []
            for side in (-1.0, 1.0):
                end, theta_end = _profile_end(objective, theta_hat, covariance, value_hat, j, side, threshold)
                ends.append((end, theta_end))
                bar.update(advance=1, status=theta_labels[j])
            (lower, _), (upper, _) = ends
            rows.append((theta_labels[j], theta_hat[j], lower, upper, "unconstrained"))
            for k, label in natural_of.get(j, []):
                mapped = [_natural_at(compiled.natural, t, k, theta_hat, j, e) for e, t in ends]
                rows.append((label, float(np.atleast_1d(natural_values)[k]), min(mapped), max(mapped), "natural"))
    frame = pd.DataFrame(rows, columns=["label", "estimate", "ci_lower", "ci_upper", "scale"]).set_index("label")
    if parm is not None:
        frame = frame.loc[[p for p in parm if p in frame.index]]
    return frame


def _natural_at(
    natural: Callable[[np.ndarray], Any], theta: np.ndarray | None, k: int, theta_hat: np.ndarray, j: int, end: float
) -> float:
    """Natural row ``k`` where parameter ``j`` is at ``end`` (its limit when the end is infinite)."""
    if theta is None:
        if np.isnan(end):
            return float("nan")
        probe = theta_hat.copy()
        probe[j] = np.sign(end) * 700.0  # far enough for exp and the logistic to reach their limits
        return float(np.atleast_1d(natural(probe)[0])[k])
    return float(np.atleast_1d(natural(theta)[0])[k])


def _profile_end(
    objective: Callable[[np.ndarray], tuple[float, np.ndarray]],
    theta_hat: np.ndarray,
    covariance: np.ndarray,
    value_hat: float,
    j: int,
    side: float,
    threshold: float,
) -> tuple[float, np.ndarray | None]:
    """One end of the profile interval of ``theta_j``: where ``2 (value_hat - profile(t)) = threshold``."""
    others = np.delete(np.arange(theta_hat.size), j)
    se = float(np.sqrt(covariance[j, j])) if np.isfinite(covariance[j, j]) and covariance[j, j] > 0 else 1.0
    # the others' conditional mean given theta_j (a linear start for each profile point) and their curvature
    if others.size and np.all(np.isfinite(covariance)):
        slope = covariance[others, j] / covariance[j, j]
        conditional = covariance[np.ix_(others, others)] - np.outer(slope, covariance[j, others])
        conditional = 0.5 * (conditional + conditional.T)
        if np.linalg.eigvalsh(conditional)[0] <= 0.0:
            conditional = np.eye(others.size)
    else:
        slope, conditional = np.zeros(others.size), np.eye(others.size)
    warm = {"rest": theta_hat[others].copy(), "at": theta_hat[j]}
    reached: dict[float, np.ndarray] = {}

    def profile(t: float) -> float:
        """Twice the drop of the profile at ``theta_j = t``, minus the threshold."""
        full = theta_hat.copy()
        full[j] = t
        if others.size:
            start = warm["rest"] + slope * (t - warm["at"])

            def negated(rest: np.ndarray) -> tuple[float, np.ndarray]:
                point = full.copy()  # a new array each call: the marginal remembers the last point it solved at
                point[others] = rest
                value, grad = objective(point)
                return -value, -grad[others]

            found = scipy.optimize.minimize(
                negated, start, jac=True, method="BFGS",
                options={"gtol": PROFILE_GTOL, "hess_inv0": conditional, "maxiter": 1000},
            )  # fmt: skip
            full[others] = found.x
            warm["rest"], warm["at"] = found.x, t
            value = -float(found.fun)
        else:
            value = objective(full.copy())[0]
        reached[t] = full.copy()
        return 2.0 * (value_hat - value) - threshold

    half_width = se * np.sqrt(threshold)
    inside = theta_hat[j]
    outside = None
    for doubling in range(PROFILE_MAX_DOUBLINGS + 1):
        t = theta_hat[j] + side * half_width * 2.0**doubling
        try:
            excess = profile(t)
        except InnerSolveError as err:
            warnings.warn(
                f"The profile of parameter {j} could not be evaluated at {t:.6g} ({err}); that end is NaN.",
                UserWarning,
                stacklevel=3,
            )
            return float("nan"), None
        if excess > 0:
            outside = t
            break
        inside = t
    if outside is None:
        warnings.warn(
            f"The profile of parameter {j} does not drop to the interval's level within "
            f"{2.0**PROFILE_MAX_DOUBLINGS:g} Wald half-widths on the {'lower' if side < 0 else 'upper'} side: that "
            "end is reported as infinite.",
            UserWarning,
            stacklevel=3,
        )
        return side * np.inf, None
    end = scipy.optimize.brentq(profile, min(inside, outside), max(inside, outside), xtol=PROFILE_XTOL * max(1.0, se))
    profile(end)
    return float(end), reached[end]
