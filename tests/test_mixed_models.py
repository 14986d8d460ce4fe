"""The mixed models people fit every day, against glmmTMB's Laplace fits of the same data.

Reference: ``reference/mixed_models.json``, made by ``reference/r/glmmtmb_mixed.R`` (glmmTMB 1.1.5, R 4.2.2) from
the CSVs that ``reference/r/export_data.R`` exported from lme4 and glmmTMB. Estimates agree to 1e-4 (relative to
``max(1, |estimate|)``) and our maximised log likelihood is at least glmmTMB's.
"""

from __future__ import annotations

import json

import mixed_models  # examples/, put on the path by conftest
import numpy as np
import pytest

from pymc_laplace import BoundaryFitWarning, OuterOptimizer, fit_integrated_laplace, summary
from pymc_laplace._compat import get_group

REFERENCE = json.loads(mixed_models.REFERENCE.read_text())


_reference, _ours = mixed_models.reference, mixed_models.ours


@pytest.fixture(scope="module")
def fits(mixed_marginal):
    cache: dict[str, object] = {}

    def get(name: str):
        if name not in cache:
            model, random, laplace = mixed_marginal(name)
            cache[name] = fit_integrated_laplace(
                model, random=random, draws=20, chains=1, random_seed=1, progressbar=False, compiled_marginal=laplace
            )
        return cache[name]

    return get


# the zero-inflated model takes 50 s to compile on the PyMC 5 line: in the slow suite CI runs after the main one
CASES = [
    "sleepstudy", "penicillin", "grouseticks", "salamanders",
    pytest.param("salamanders_zi_mined", marks=pytest.mark.slow), "cbpp",
]  # fmt: skip


@pytest.mark.parametrize("name", CASES)
def test_estimates_and_log_likelihood_match_glmmtmb(fits, name):
    result = fits(name)
    table = summary(result)
    natural = {label: row["estimate"] for label, row in table[table["scale"] == "natural"].iterrows()}
    ours, expected = _ours(name, natural), _reference(name)
    assert set(expected) <= set(ours), f"not compared: {set(expected) - set(ours)}"
    for key, value in expected.items():
        assert ours[key] == pytest.approx(value, abs=1e-4 * max(1.0, abs(value))), key
    log_lik = float(get_group(result, "fit")["log_marginal_likelihood"])
    reference = REFERENCE[name]["glmmTMB"]["logLik"]
    assert reference - 1e-6 <= log_lik <= reference + 1e-3


@pytest.mark.parametrize("name", CASES)
def test_fixed_effect_standard_errors_match_glmmtmb(fits, name):
    table = summary(fits(name))
    natural = table[table["scale"] == "natural"]
    for part, prefix in (("cond", "beta"), ("zi", "gamma")):
        for label, entry in REFERENCE[name]["glmmTMB"]["fixed"].get(part, {}).items():
            ours = natural.loc[f"{prefix}[{label}]" if name != "penicillin" else "intercept", "std_error"]
            assert float(ours) == pytest.approx(entry["se"], rel=2e-3), label


@pytest.mark.slow
def test_zero_inflation_without_an_interior_optimum_is_a_boundary_fit(mixed_marginal):
    """``ziformula = ~ spp``: the zero-inflation probabilities of GP and DM go to 0 (glmmTMB: pdHess FALSE, its
    estimates stop at about -18 on the logit scale). We report the flat direction as a boundary fit, hold it there,
    and the rest of the fit is glmmTMB's: the conditional model, the dispersion, the site SD and the log likelihood.
    """
    model, random, laplace = mixed_marginal("salamanders_zi")
    with pytest.warns(BoundaryFitWarning, match=r"boundary \(singular\) fit: .*gamma\["):
        result = fit_integrated_laplace(
            model, random=random, draws=10, chains=1, progressbar=False, compiled_marginal=laplace
        )
    log_lik = float(get_group(result, "fit")["log_marginal_likelihood"])
    # The supremum lies at gamma -> -inf, where the objective approaches its limit as c - a exp(gamma): the gradient
    # along each flat direction equals the gain still to be had. Both fits stop where that gradient is below their
    # tolerance, so each of the two directions (GP, DM) may leave up to gtol of log likelihood behind.
    assert log_lik >= REFERENCE["salamanders_zi"]["glmmTMB"]["logLik"] - 2 * OuterOptimizer().gtol
    table = summary(result)
    natural = {label: row["estimate"] for label, row in table[table["scale"] == "natural"].iterrows()}
    ours, expected = _ours("salamanders_zi", natural), _reference("salamanders_zi")
    for key, value in expected.items():
        if not key.startswith("gamma["):
            assert ours[key] == pytest.approx(value, abs=1e-4 * max(1.0, abs(value))), key
    assert np.isnan(table.loc["gamma[(Intercept)]", "std_error"]).all()


@pytest.mark.parametrize("name", ["sleepstudy", "penicillin", "cbpp"])
def test_random_effect_predictions_match_glmmtmb(fits, name):
    fit = get_group(fits(name), "fit")
    labels = [str(x) for x in fit["random_rows"].values]
    theirs, ours = mixed_models.random_effect_pairs(name, labels, fit["random_effects"].values)
    assert theirs.size == len(labels)
    np.testing.assert_allclose(ours, theirs, atol=2e-3 * max(1.0, float(np.max(np.abs(theirs)))))
