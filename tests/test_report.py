"""The glmmTMB-style report (coefficients, variance components, fit statistics, random effects, intervals) against
glmmTMB.

References: ``reference/report.json`` (``reference/r/glmmtmb_report.R``: profile intervals solved exactly on TMB's
Laplace objective, delta-method SEs of SDs and correlations from glmmTMB's own parameterisation) and
``reference/mixed_models.json`` (``reference/r/glmmtmb_mixed.R``).
"""

from __future__ import annotations

import json

import mixed_models  # examples/, put on the path by conftest
import numpy as np
import pymc as pm
import pytest

from pymc_laplace import (
    ModelSpecificationError,
    confint,
    fit_integrated_laplace,
    fit_laplace,
    fit_statistics,
    random_effects,
    summary,
)

REPORT = json.loads((mixed_models.REFERENCE.parent / "report.json").read_text())
MIXED = json.loads(mixed_models.REFERENCE.read_text())


@pytest.fixture(scope="module")
def fitted(mixed_marginal):
    cache: dict[str, tuple] = {}

    def get(name: str) -> tuple:
        if name not in cache:
            model, random, laplace = mixed_marginal(name)
            result = fit_integrated_laplace(
                model, random=random, draws=20, chains=1, random_seed=2, progressbar=False, compiled_marginal=laplace
            )
            cache[name] = (model, result)
        return cache[name]

    return get


def test_profile_intervals_match_the_exact_profile_of_tmb(fitted):
    """Every end to 1e-5 of the profile solved in R on TMB's objective (glmmTMB's own confint agrees to 1e-4)."""
    model, result = fitted("cbpp")
    table = confint(result, method="profile", model=model, progressbar=False)
    exact = REPORT["cbpp"]["profile_exact"]
    labels = ["beta[(Intercept)]", "beta[period2]", "beta[period3]", "beta[period4]", "sigma_log__"]
    unconstrained = table[table["scale"] == "unconstrained"]
    assert list(unconstrained.index) == labels
    np.testing.assert_allclose(unconstrained["ci_lower"], exact["lower"], atol=1e-5)
    np.testing.assert_allclose(unconstrained["ci_upper"], exact["upper"], atol=1e-5)
    # the SD's interval is the exp of its log's: a profile interval maps through a monotone transform
    sd = table[table["scale"] == "natural"].loc["sigma"]
    np.testing.assert_allclose([sd["ci_lower"], sd["ci_upper"]], np.exp([exact["lower"][4], exact["upper"][4]]), 1e-5)
    # glmmTMB's spline-interpolated confint(method = "profile") on the same scale, looser
    np.testing.assert_allclose(unconstrained["ci_lower"], REPORT["cbpp"]["profile"]["lower"], atol=2e-4)
    # a few parameters only, by label
    one = confint(result, method="profile", model=model, parm=["sigma"], progressbar=False)
    assert list(one.index) == ["sigma"]
    np.testing.assert_allclose(one.loc["sigma", "ci_upper"], np.exp(exact["upper"][4]), rtol=1e-5)


def test_wald_intervals_match_glmmtmb(fitted):
    _, result = fitted("cbpp")
    table = confint(result, method="wald")
    wald = REPORT["cbpp"]["wald"]
    fixed = table[table["scale"] == "natural"].iloc[:4]
    np.testing.assert_allclose(fixed["ci_lower"], wald["lower"][:4], rtol=1e-4)
    np.testing.assert_allclose(fixed["ci_upper"], wald["upper"][:4], rtol=1e-4)
    # glmmTMB's Wald interval of an SD is the exp of its log-SD's interval
    log_sd = table.loc["sigma_log__"]
    np.testing.assert_allclose(
        np.exp([log_sd["ci_lower"], log_sd["ci_upper"]]), wald["lower"][4:] + wald["upper"][4:], 1e-4
    )
    with pytest.raises(ModelSpecificationError, match="not rows of summary"):
        confint(result, parm=["no such parameter"])
    with pytest.raises(ModelSpecificationError, match="'wald' or 'profile'"):
        confint(result, method="bootstrap")


def test_variance_components_of_an_lkj_factor_match_glmmtmb_delta_method(fitted):
    """SDs and the correlation of ``(Days | Subject)`` with SEs: the delta method is parameterisation-invariant at the
    maximum, so our LKJ Cholesky factor must give what glmmTMB's log-SD and corr_par give."""
    _, result = fitted("sleepstudy")
    table = summary(result)
    derived = table[table["scale"] == "derived"]
    assert list(derived.index) == ["chol_stds[0]", "chol_stds[1]", "chol_corr[0, 1]"]
    expected = REPORT["sleepstudy_varcorr"]
    np.testing.assert_allclose(derived["estimate"], [*expected["sd"], expected["corr"]], rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(derived["std_error"], [*expected["sd_se"], expected["corr_se"]], rtol=2e-3)
    np.testing.assert_allclose(table.loc["sigma", "std_error"], expected["sigma_se"], rtol=2e-3)


def test_fit_statistics_match_glmmtmb(fitted):
    for name, groups in (("cbpp", {"u": 15}), ("sleepstudy", {"ab": 18})):
        _, result = fitted(name)
        stats = fit_statistics(result)
        ref = MIXED[name]["glmmTMB"]
        assert stats["logLik"] == pytest.approx(ref["logLik"], abs=1e-6)
        assert stats["AIC"] == pytest.approx(ref["AIC"], abs=1e-5)
        assert stats["BIC"] == pytest.approx(-2 * ref["logLik"] + np.log(ref["nobs"]) * ref["df"], abs=1e-5)
        assert (stats["df"], stats["nobs"], stats["df_resid"]) == (ref["df"], ref["nobs"], ref["nobs"] - ref["df"])
        assert {k[len("levels[") : -1]: v for k, v in stats.items() if k.startswith("levels[")} == groups


def test_random_effects_table_matches_glmmtmb_ranef(fitted):
    _, result = fitted("sleepstudy")
    table = random_effects(result, level=0.9)
    ranef = MIXED["sleepstudy"]["glmmTMB"]["ranef"]["Subject"]
    intercepts = table[table["level"].str.endswith(", (Intercept)")]
    assert list(intercepts["level"]) == [f"{level}, (Intercept)" for level in ranef["(Intercept)"]["level"]]
    assert set(table["term"]) == {"ab"}
    np.testing.assert_allclose(intercepts["mode"], ranef["(Intercept)"]["mode"], atol=2e-3)
    np.testing.assert_allclose(intercepts["std_error"], ranef["(Intercept)"]["condsd_sdreport"], rtol=2e-3)
    half = 1.6448536269514722 * table["std_error"]
    np.testing.assert_allclose(table["ci_upper"] - table["mode"], half, rtol=1e-12)


def test_derived_rows_are_functions_of_theta_alone():
    """A Deterministic of the parameters is reported with its delta-method SE; one of the random effects is not."""
    rng = np.random.default_rng(3)
    group = np.repeat(np.arange(12), 6)
    y = 1.0 + rng.normal(0.0, 0.8, 12)[group] + rng.normal(0.0, 0.5, group.size)
    with pm.Model():
        mu = pm.Normal("mu", 0.0, 10.0)
        sd = pm.HalfNormal("sd", 2.0)
        sigma = pm.HalfNormal("sigma", 2.0)
        u = pm.Normal("u", 0.0, sd, shape=12)
        pm.Deterministic("icc", sd**2 / (sd**2 + sigma**2))
        pm.Deterministic("group_means", mu + u)
        pm.Normal("y", mu + u[group], sigma, observed=y)
        result = fit_integrated_laplace(random=["u"], draws=20, chains=1, random_seed=1, progressbar=False)
    table = summary(result)
    derived = table[table["scale"] == "derived"]
    assert list(derived.index) == ["icc"]
    sd_hat, sigma_hat = table.loc["sd", "estimate"], table.loc["sigma", "estimate"]
    assert derived.loc["icc", "estimate"] == pytest.approx(sd_hat**2 / (sd_hat**2 + sigma_hat**2), rel=1e-10)
    # delta method by hand from the unconstrained covariance (log sd, log sigma)
    from pymc_laplace import get_group

    fit = get_group(result, "fit")
    rows = [str(r) for r in fit["rows"].values]
    cov = fit["covariance_matrix"].values[
        np.ix_([rows.index("sd_log__"), rows.index("sigma_log__")], [rows.index("sd_log__"), rows.index("sigma_log__")])
    ]
    icc = derived.loc["icc", "estimate"]
    gradient = np.array([2 * icc * (1 - icc), -2 * icc * (1 - icc)])  # d icc / d (log sd, log sigma)
    assert derived.loc["icc", "std_error"] == pytest.approx(np.sqrt(gradient @ cov @ gradient), rel=1e-6)


@pytest.mark.filterwarnings("ignore::pymc_laplace.ApproximationWarning")
def test_report_functions_refuse_a_plain_laplace_fit(bioassay_data):
    with pm.Model():
        alpha = pm.Normal("alpha", 0.0, 10.0)
        beta = pm.Normal("beta", 0.0, 10.0)
        pm.Binomial("y", n=bioassay_data["n"], logit_p=alpha + beta * bioassay_data["x"], observed=bioassay_data["y"])
        result = fit_laplace(draws=30, chains=1, random_seed=1, progressbar=False)
    assert set(confint(result).index) == {"alpha", "beta"}
    for call in (fit_statistics, random_effects, lambda r: confint(r, method="profile")):
        with pytest.raises(ModelSpecificationError, match="fit_integrated_laplace"):
            call(result)
    with pytest.raises(ValueError, match="level"):
        confint(result, level=95)


def test_profile_refuses_a_model_other_than_the_one_fitted(fitted, mixed_marginal):
    _, result = fitted("cbpp")
    other, _, _ = mixed_marginal("penicillin")
    with pytest.raises(ModelSpecificationError, match="not a free variable"):
        confint(result, method="profile", model=other, progressbar=False)


def test_random_is_required_for_a_pymc_model():
    with pm.Model():
        pm.Normal("mu", 0.0, 1.0)
        pm.Normal("y", 0.0, 1.0, observed=[0.1])
        with pytest.raises(ModelSpecificationError, match="`random` is missing"):
            fit_integrated_laplace(progressbar=False)
