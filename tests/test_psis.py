"""Pareto-smoothed importance sampling against an independent implementation and known tails."""

from __future__ import annotations

import warnings

import numpy as np
import pymc as pm
import pytest
from scipy import stats

from pymc_laplace import fit_laplace, importance_resample, pareto_smooth
from pymc_laplace._compat import RETURNS_DATATREE, get_group


@pytest.mark.parametrize("true_k", [0.2, 0.5, 0.9])
def test_khat_recovers_the_true_tail_shape(true_k):
    """Importance ratios drawn from a generalized Pareto with shape k: k-hat estimates k."""
    rng = np.random.default_rng(int(true_k * 10))
    log_ratios = np.log(stats.genpareto(c=true_k).rvs(size=4000, random_state=rng))
    ours = pareto_smooth(log_ratios)
    assert ours.pareto_k == pytest.approx(true_k, abs=0.15)
    assert np.exp(ours.log_weights).sum() == pytest.approx(1.0, rel=1e-12)


@pytest.mark.skipif(RETURNS_DATATREE, reason="arviz 1.x has no drop-in psislw with the same conventions")
@pytest.mark.parametrize("true_k", [0.2, 0.5, 0.9])
def test_psis_matches_arviz(true_k):
    """ArviZ 0.x's PSIS is an independent implementation of the same published algorithm."""
    import arviz as az

    rng = np.random.default_rng(int(true_k * 10))
    log_ratios = np.log(stats.genpareto(c=true_k).rvs(size=4000, random_state=rng))
    ours = pareto_smooth(log_ratios)
    lw_ref, k_ref = az.psislw(log_ratios, reff=1.0)
    assert ours.pareto_k == pytest.approx(float(k_ref), abs=1e-6)
    np.testing.assert_allclose(ours.log_weights, lw_ref - np.logaddexp.reduce(lw_ref), atol=1e-8)


@pytest.fixture(scope="module")
def bioassay_fit(bioassay_data):
    with pm.Model() as model:
        alpha = pm.Flat("alpha")
        beta = pm.Flat("beta")
        pm.Binomial("y", n=bioassay_data["n"], logit_p=alpha + beta * bioassay_data["x"], observed=bioassay_data["y"])
    return fit_laplace(model, draws=2000, chains=4, random_seed=11, progressbar=False)


def _grid_quantile_of_beta(bioassay_data, q: float) -> float:
    """Exact quantile of beta under the flat-prior posterior, by a fine grid (independent of PyMC)."""
    a = np.linspace(-5, 10, 601)
    b = np.linspace(-10, 60, 1401)
    A, B = np.meshgrid(a, b, indexing="ij")
    eta = A[..., None] + B[..., None] * bioassay_data["x"]
    logp = np.sum(bioassay_data["y"] * eta - bioassay_data["n"] * np.logaddexp(0, eta), axis=-1)
    marginal = np.exp(logp - logp.max()).sum(axis=0)
    cdf = np.cumsum(marginal) / marginal.sum()
    return float(np.interp(q, cdf, b))


def test_importance_resampling_moves_the_upper_tail_toward_the_exact_posterior(bioassay_fit, bioassay_data):
    exact = _grid_quantile_of_beta(bioassay_data, 0.975)
    before = float(np.quantile(get_group(bioassay_fit, "posterior")["beta"].values, 0.975))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        corrected = importance_resample(bioassay_fit, random_seed=3)
    after = float(np.quantile(get_group(corrected, "posterior")["beta"].values, 0.975))
    assert before < exact  # the Gaussian under-covers the upper tail (BDA3 section 4.1)
    assert abs(after - exact) < 0.5 * abs(before - exact)
    attrs = get_group(corrected, "posterior").attrs
    assert 0 < attrs["importance_ess"] <= 8000 and np.isfinite(attrs["pareto_k"])
    assert type(corrected) is type(bioassay_fit)
    assert get_group(corrected, "posterior")["beta"].shape == (4, 2000)


def test_warning_when_khat_is_large():
    """A Cauchy posterior is far from any Gaussian: k-hat exceeds 0.7 and the user is warned."""
    with pm.Model() as model:
        pm.Cauchy("x", 0.0, 1.0)
    result = fit_laplace(model, draws=1000, chains=4, random_seed=0, progressbar=False)
    with pytest.warns(UserWarning, match=r"Pareto k-hat = .* > 0\.7"):
        corrected = importance_resample(result, random_seed=0)
    assert get_group(corrected, "posterior").attrs["pareto_k"] > 0.7
