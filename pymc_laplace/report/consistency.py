"""A simulation check of the Laplace approximation (TMB's ``checkConsistency``).

At the true parameters the score of an exact likelihood averages zero over data simulated from the model. Data sets
are simulated from the fitted model at its estimate ``theta^`` (the random effects drawn afresh from their
distribution for each), and the gradient of the Laplace marginal at ``theta^`` is taken for each. A mean gradient
``g`` that is not zero within its Monte Carlo error says that the approximation, not chance, moves the estimates;
to first order it moves them by ``I^-1 g`` with ``I`` the covariance of the gradients (the Fisher information of
one data set). Kristensen et al. (2016), TMB's ``checkConsistency``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.stats

from pymc_laplace.errors import ModelSpecificationError

# p-values below this are reported as a bias of the approximation
SIGNIFICANCE = 0.01


@dataclass(frozen=True)
class ConsistencyCheck:
    """What :func:`check_consistency` found.

    Attributes
    ----------
    labels : list of str
        The outer parameters (unconstrained, as fitted).
    n_simulations : int
        Data sets whose marginal could be evaluated.
    failed : int
        Data sets where the inner solve failed (left out).
    mean_gradient : ndarray
        Mean gradient of the Laplace marginal at the estimate over the simulated data sets.
    gradient_covariance : ndarray
        Covariance of those gradients (the Fisher information of one data set).
    statistic, p_value : float
        ``n g' I^-1 g`` and its chi-square tail probability (``len(labels)`` degrees of freedom).
    bias : ndarray
        ``I^-1 g``: the first-order shift of the estimates that the approximation causes.
    bias_in_se : ndarray
        ``bias`` in units of the standard errors ``sqrt(diag(I^-1))`` of one data set.
    advice : str
    """

    labels: list[str]
    n_simulations: int
    failed: int
    mean_gradient: np.ndarray
    gradient_covariance: np.ndarray
    statistic: float
    p_value: float
    bias: np.ndarray
    bias_in_se: np.ndarray
    advice: str

    def table(self) -> Any:
        """A pandas DataFrame: mean gradient, bias and bias in standard errors, per parameter."""
        import pandas as pd

        return pd.DataFrame(
            {"mean_gradient": self.mean_gradient, "bias": self.bias, "bias_in_se": self.bias_in_se},
            index=pd.Index(self.labels, name="parameter"),
        )

    def __str__(self) -> str:
        return f"{self.advice}\n{self.table().to_string()}"


def check_consistency(
    result: Any,
    model: Any = None,
    *,
    n_simulations: int = 100,
    random_seed: int | None = None,
    progressbar: bool = True,
) -> ConsistencyCheck:
    """Simulate data sets from a fitted model and test that the Laplace marginal's gradient averages zero.

    Parameters
    ----------
    result : arviz.InferenceData or xarray.DataTree
        From :func:`pymc_laplace.fit_integrated_laplace` (``method="ml"`` or ``"map"``).
    model : pm.Model, optional
        The model that was fitted (from the context when not given).
    n_simulations : int
        Data sets to simulate (TMB's default is 100).
    random_seed : int, optional
    progressbar : bool

    Returns
    -------
    ConsistencyCheck

    Raises
    ------
    ModelSpecificationError
        Not an integrated fit, another model, ``n_simulations`` below the number of parameters plus 2, or too many
        data sets whose inner solve failed.
    """
    import pymc as pm

    from pymc_laplace._compat import get_group
    from pymc_laplace._progress import progress_bar
    from pymc_laplace.compile.graphs import observed_as_data, outer_values, simulate_observed
    from pymc_laplace.inner.marginal import InnerSolveError
    from pymc_laplace.integrated import marginal

    attrs = dict(get_group(result, "posterior").attrs)
    method = str(attrs.get("method", ""))
    if method not in ("integrated_laplace_ml", "integrated_laplace_map"):
        raise ModelSpecificationError(
            "check_consistency reads a fit_integrated_laplace result fitted by method='ml' or 'map'."
        )
    model = pm.modelcontext(model)
    random = list(attrs["random"])
    fit = get_group(result, "fit")
    labels = [str(v) for v in fit["rows"].values]
    theta = np.asarray(fit["mean_vector"].values, dtype=float)
    if not (isinstance(n_simulations, int) and n_simulations >= theta.size + 2):
        raise ModelSpecificationError(
            f"`n_simulations` must be an integer of at least {theta.size + 2} (the parameters plus 2), not "
            f"{n_simulations!r}."
        )
    copy, containers = observed_as_data(model)
    laplace = marginal(copy, random=random)
    copy_labels = list(laplace.compiled.theta_layout.labels)  # the copy may order the free variables otherwise
    if sorted(copy_labels) != sorted(labels):
        raise ModelSpecificationError(
            "The model's outer parameters are not those of the result: pass the model that was fitted."
        )
    order = np.array([labels.index(label) for label in copy_labels])
    theta_copy = theta[order]
    simulated = simulate_observed(
        model, outer_values(copy, laplace.compiled.theta_layout, theta_copy), n_simulations, random_seed
    )
    originals = {name: var.get_value() for name, var in containers.items()}
    gradients, failed = [], 0
    try:
        with progress_bar("Simulated data sets", n_simulations, enabled=progressbar) as bar:
            for s in range(n_simulations):
                for name, var in containers.items():
                    var.set_value(simulated[name][s].astype(var.dtype))
                try:
                    _, grad_copy = laplace.value_and_grad(theta_copy)
                    grad = np.empty_like(grad_copy)
                    grad[order] = grad_copy
                    gradients.append(grad)
                except InnerSolveError:
                    failed += 1
                bar.update(advance=1)
    finally:
        for name, var in containers.items():
            var.set_value(originals[name])
    if len(gradients) < theta.size + 2:
        raise ModelSpecificationError(
            f"The inner solve failed for {failed} of {n_simulations} simulated data sets: too few are left to test."
        )
    g = np.array(gradients)
    mean = g.mean(axis=0)
    information = np.atleast_2d(np.cov(g, rowvar=False))
    solved = np.linalg.solve(information, mean)
    statistic = float(len(g) * mean @ solved)
    p_value = float(scipy.stats.chi2.sf(statistic, df=theta.size))
    bias_in_se = solved / np.sqrt(np.diag(np.linalg.inv(information)))
    if p_value < SIGNIFICANCE:
        worst = labels[int(np.argmax(np.abs(bias_in_se)))]
        advice = (
            f"The Laplace marginal's gradient does not average zero over {len(g)} data sets simulated at the estimate "
            f"(p = {p_value:.2g}): the approximation biases the estimates, most for {worst} (by "
            f"{np.max(np.abs(bias_in_se)):.2g} standard errors of one data set). Fit with more quadrature nodes "
            "(n_agq, where the random effects form independent blocks), or use sample_integrated or full NUTS."
        )
    else:
        advice = (
            f"Consistent: the Laplace marginal's gradient averages zero over {len(g)} data sets simulated at the "
            f"estimate within Monte Carlo error (p = {p_value:.2g}); a bias of the approximation, if any, is below "
            "what this many simulations can see."
        )
    return ConsistencyCheck(
        labels=labels,
        n_simulations=len(g),
        failed=failed,
        mean_gradient=mean,
        gradient_covariance=information,
        statistic=statistic,
        p_value=p_value,
        bias=solved,
        bias_in_se=bias_in_se,
        advice=advice,
    )
