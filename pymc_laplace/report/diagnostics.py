"""Is the Gaussian good enough? Pareto-smoothed importance sampling of the posterior against it.

PSIS follows Vehtari, Simpson, Gelman, Yao and Gabry (2024), "Pareto smoothed importance sampling", JMLR 25;
the generalized Pareto fit is the profile-posterior estimate of Zhang and Stephens (2009), Technometrics 51,
with the weakly informative prior on k described in the PSIS paper.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.special import logsumexp

from pymc_laplace import _compat
from pymc_laplace.convert import resample_posterior
from pymc_laplace.errors import ApproximationWarning

KHAT_THRESHOLD = 0.7
# Pareto smoothing fits the largest min(20%, 3 sqrt(S)) weights and needs at least 5 of them.
MIN_DRAWS_FOR_KHAT = 25


def check_approximation(log_p: np.ndarray, log_q: np.ndarray, *, advice: str, stacklevel: int = 3) -> dict[str, float]:
    """Pareto k-hat and importance ESS of the draws' ratios ``p/q``, with an :class:`ApproximationWarning` above 0.7.

    Run on every fit: k-hat above 0.7 means that the Gaussian misses mass the posterior has (Vehtari et al. 2024),
    and means or intervals read from its draws may be off; ``advice`` says what to do for this kind of fit.
    """
    ratios = np.asarray(log_p, dtype=float).ravel() - np.asarray(log_q, dtype=float).ravel()
    if ratios.size < MIN_DRAWS_FOR_KHAT:  # a tail of fewer than 5 weights: k-hat cannot be estimated
        return {"pareto_k": float("nan"), "importance_ess": float("nan")}
    invalid = np.isnan(ratios) | (ratios == np.inf)
    if invalid.any():
        warnings.warn(
            f"Pareto k-hat not computed: {int(invalid.sum())} of {ratios.size} draws have a log density that is "
            "NaN or +inf, so the draws cannot be checked against the posterior. Evaluate the model at those draws "
            "(sample_stats.log_p) to find the variable responsible.",
            ApproximationWarning,
            stacklevel=stacklevel,
        )
        return {"pareto_k": float("nan"), "importance_ess": float("nan")}
    weights = pareto_smooth(ratios)
    if not np.isfinite(weights.pareto_k) or weights.pareto_k > KHAT_THRESHOLD:
        warnings.warn(
            f"Pareto k-hat of the draws' importance ratios p/q is {weights.pareto_k:.2f} > {KHAT_THRESHOLD} "
            f"(importance ESS {weights.ess:.0f} of {ratios.size}): the Gaussian approximation is far from the "
            f"posterior, and means, intervals and loo computed from these draws may be off. {advice}",
            ApproximationWarning,
            stacklevel=stacklevel,
        )
    return {"pareto_k": float(weights.pareto_k), "importance_ess": float(weights.ess)}


@dataclass(frozen=True)
class ParetoSmoothedWeights:
    """Pareto-smoothed importance weights.

    Attributes
    ----------
    log_weights : ndarray, shape (S,)
        Smoothed, normalised log weights (``logsumexp == 0``).
    pareto_k : float
        Estimated shape of the generalized Pareto fitted to the largest weights. Above 0.7 the importance
        sampling estimate is unreliable and the Gaussian approximation is far from the posterior.
    ess : float
        Effective sample size ``1 / sum(w^2)`` of the smoothed weights.
    """

    log_weights: np.ndarray
    pareto_k: float
    ess: float


def fit_generalized_pareto(exceedances: np.ndarray) -> tuple[float, float]:
    """Shape ``k`` and scale ``sigma`` of a generalized Pareto fitted to positive ``exceedances``.

    Zhang & Stephens (2009) profile-posterior estimate, with the PSIS paper's prior pulling ``k`` toward 0.5
    (equivalent to 10 pseudo-observations).
    """
    x = np.sort(np.asarray(exceedances, dtype=float))
    n = x.size
    n_grid = 30 + int(np.sqrt(n))
    theta = 1.0 - np.sqrt(n_grid / (np.arange(1, n_grid + 1) - 0.5))
    theta = theta / (3.0 * x[int(n / 4.0 + 0.5) - 1]) + 1.0 / x[-1]
    k_grid = np.mean(np.log1p(-theta[:, None] * x[None, :]), axis=1)
    profile_loglik = n * (np.log(-theta / k_grid) - k_grid - 1.0)
    weights = np.exp(profile_loglik - logsumexp(profile_loglik))
    theta_hat = float(np.sum(theta * weights))
    k = float(np.mean(np.log1p(-theta_hat * x)))
    sigma = -k / theta_hat
    k = (n * k + 10 * 0.5) / (n + 10)
    return k, sigma


def _gpd_quantile(p: np.ndarray, k: float, sigma: float) -> np.ndarray:
    if abs(k) < 1e-12:
        return -sigma * np.log1p(-p)
    return sigma * np.expm1(-k * np.log1p(-p)) / k


def pareto_smooth(log_ratios: np.ndarray) -> ParetoSmoothedWeights:
    """Pareto-smooth log importance ratios ``log p - log q`` of independent draws."""
    log_ratios = np.asarray(log_ratios, dtype=float).ravel()
    n = log_ratios.size
    finite = np.isfinite(log_ratios)
    if not np.all(finite[log_ratios != -np.inf]):
        raise ValueError("log importance ratios contain NaN or +inf: the log densities of some draws are invalid")
    lw = log_ratios - np.max(log_ratios)
    tail_len = int(np.ceil(min(0.2 * n, 3.0 * np.sqrt(n))))
    order = np.argsort(lw)
    k = np.inf
    if tail_len >= 5:
        tail_idx = order[-tail_len:]
        cutoff = lw[order[-tail_len - 1]]
        exceed = np.exp(lw[tail_idx]) - np.exp(cutoff)
        if np.all(exceed > 0) and cutoff > -np.inf:
            k, sigma = fit_generalized_pareto(exceed)
            if np.isfinite(k):
                probs = (np.arange(1, tail_len + 1) - 0.5) / tail_len
                smoothed = np.log(np.exp(cutoff) + _gpd_quantile(probs, k, sigma))
                lw = lw.copy()
                lw[tail_idx] = np.minimum(smoothed, 0.0)  # tail_idx is ascending, as are the quantiles
        elif np.all(exceed >= 0):
            k = 0.0  # ties in the tail: equal weights, nothing to smooth
    lw = lw - logsumexp(lw)
    ess = float(1.0 / np.sum(np.exp(2.0 * lw)))
    return ParetoSmoothedWeights(lw, float(k), ess)


def importance_resample(result: Any, *, random_seed: int | np.random.Generator | None = None) -> Any:
    """Correct a Gaussian fit toward the posterior by Pareto-smoothed importance resampling.

    Uses the ``log_p`` and ``log_q`` of each draw in ``sample_stats``. The draws are resampled (with
    replacement) in proportion to their smoothed weights; ``pareto_k`` and ``ess`` are stored in the posterior
    attrs of the result. A warning is issued when ``pareto_k > 0.7``: the importance-sampling correction is
    then unreliable and the approximation should not be trusted (use NUTS).

    Parameters
    ----------
    result : InferenceData or DataTree
        The output of ``fit_laplace`` (or any fit with ``log_p`` and ``log_q`` in ``sample_stats``).
    random_seed : int or Generator, optional

    Returns
    -------
    InferenceData or DataTree
        Same type and layout, with the resampled draws.

    Examples
    --------
    >>> import pymc as pm
    >>> from pymc_laplace import fit_laplace, importance_resample
    >>> with pm.Model():
    ...     s = pm.HalfNormal("s", 1)
    ...     _ = pm.Normal("y", 0, s, observed=[0.5, -0.3, 1.2])
    ...     idata = fit_laplace(progressbar=False, random_seed=0)
    >>> corrected = importance_resample(idata, random_seed=0)
    """
    stats = _compat.get_group(result, "sample_stats")
    if "log_p" not in stats or "log_q" not in stats:
        raise ValueError("importance_resample needs `log_p` and `log_q` in the sample_stats group of the result")
    log_p = stats["log_p"].transpose("chain", "draw").values.ravel()
    log_q = stats["log_q"].transpose("chain", "draw").values.ravel()
    weights = pareto_smooth(log_p - log_q)
    if not np.isfinite(weights.pareto_k) or weights.pareto_k > KHAT_THRESHOLD:
        warnings.warn(
            f"Pareto k-hat = {weights.pareto_k:.2f} > {KHAT_THRESHOLD}: the Gaussian approximation is far from the "
            "posterior and importance resampling cannot be trusted to correct it. Reparameterise (e.g. log "
            "scale for positive parameters) or sample with NUTS.",
            ApproximationWarning,
            stacklevel=2,
        )
    rng = np.random.default_rng(random_seed)
    probabilities = np.exp(weights.log_weights)
    indices = rng.choice(log_p.size, size=log_p.size, replace=True, p=probabilities / probabilities.sum())
    attrs = {"pareto_k": weights.pareto_k, "importance_ess": weights.ess, "importance_resampled": 1}
    return resample_posterior(result, indices, attrs)
