"""Models written as bambi formulas, fitted with their group-specific terms integrated out, against glmmTMB.

bambi's group-specific terms are uncorrelated, so ``(Days | Subject)`` is glmmTMB's ``diag(Days | Subject)``.
Reference: ``reference/report.json`` (``reference/r/glmmtmb_report.R``, glmmTMB 1.1.5). bambi is an optional extra
(``pip install pymc_laplace[bambi]``): without it these tests are skipped.
"""

from __future__ import annotations

import json

import mixed_models  # examples/, put on the path by conftest
import numpy as np
import pandas as pd
import pytest
from conftest import data_path

bmb = pytest.importorskip("bambi")

from pymc_laplace import ModelSpecificationError, fit_integrated_laplace, fit_statistics, summary  # noqa: E402
from pymc_laplace.formulas import bambi_pymc_model  # noqa: E402
from pymc_laplace.predict import predict  # noqa: E402

REPORT = json.loads((mixed_models.REFERENCE.parent / "report.json").read_text())

SPECS = {
    "cbpp": ("p(incidence, size) ~ period + (1|herd)", "binomial", "cbpp.csv", ["herd", "period"]),
    "sleepstudy": ("Reaction ~ Days + (Days | Subject)", "gaussian", "sleepstudy.csv", ["Subject"]),
    "penicillin": ("diameter ~ 1 + (1|plate) + (1|sample)", "gaussian", "penicillin.csv", ["plate", "sample"]),
    "grouseticks": (
        "TICKS ~ YEAR + HEIGHT_scaled + (1|BROOD) + (1|INDEX) + (1|LOCATION)",
        "poisson",
        "grouseticks.csv",
        ["YEAR", "BROOD", "INDEX", "LOCATION"],
    ),
}
# bambi's names of glmmTMB's fixed effects and SDs
FIXED = {
    "cbpp": ["Intercept", "period[2]", "period[3]", "period[4]"],
    "sleepstudy": ["Intercept", "Days"],
    "penicillin": ["Intercept"],
    "grouseticks": ["Intercept", "YEAR[96]", "YEAR[97]", "HEIGHT_scaled"],
}
SDS = {
    "cbpp": {"1|herd_sigma": ("herd", "(Intercept)")},
    "sleepstudy": {"1|Subject_sigma": ("Subject", "(Intercept)"), "Days|Subject_sigma": ("Subject", "Days")},
    "penicillin": {"1|plate_sigma": ("plate", "(Intercept)"), "1|sample_sigma": ("sample", "(Intercept)")},
    "grouseticks": {f"1|{group}_sigma": (group, "(Intercept)") for group in ("BROOD", "INDEX", "LOCATION")},
}


def bambi_model(name: str):
    formula, family, file, factors = SPECS[name]
    data = pd.read_csv(data_path(file), dtype={column: str for column in factors})
    return bmb.Model(formula, data, family=family)


pytestmark = pytest.mark.filterwarnings("ignore::pymc_laplace.ApproximationWarning")  # k-hat of 40 draws


@pytest.fixture(scope="module")
def fitted():
    cache: dict[str, tuple] = {}

    def get(name: str) -> tuple:
        if name not in cache:
            model = bambi_model(name)
            draws = 1000 if name == "cbpp" else 20
            result = fit_integrated_laplace(model, draws=draws, chains=2, random_seed=3, progressbar=False)
            cache[name] = (model, result)
        return cache[name]

    return get


@pytest.mark.parametrize("name", list(SPECS))
def test_bambi_formulas_match_glmmtmb(fitted, name):
    _, result = fitted(name)
    ref = REPORT["bambi"][name]
    table = summary(result)
    natural = table[table["scale"] == "natural"]
    np.testing.assert_allclose(natural.loc[FIXED[name], "estimate"], ref["fixed"]["estimate"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(natural.loc[FIXED[name], "std_error"], ref["fixed"]["se"], rtol=2e-3)
    for label, (group, effect) in SDS[name].items():
        assert natural.loc[label, "estimate"] == pytest.approx(ref["sd"][group][effect], rel=2e-4)
    if "sigma" in ref:
        assert natural.loc["sigma", "estimate"] == pytest.approx(ref["sigma"], rel=1e-4)
    stats = fit_statistics(result)
    assert stats["logLik"] == pytest.approx(ref["logLik"], abs=1e-6)
    assert (stats["df"], stats["nobs"]) == (ref["df"], ref["nobs"])


def test_bambi_names_the_random_effects_by_its_terms(fitted):
    model, result = fitted("sleepstudy")
    assert result.posterior.attrs["random"] == ["1|Subject", "Days|Subject"]
    assert result.posterior["1|Subject"].dims[2:] == ("Subject__factor_dim",)
    # the user's model is left as written: centred predictors and non-centred terms when bambi builds it
    assert model.center_predictors and model.noncentered
    fitted_model, random = bambi_pymc_model(model)
    assert random == ["1|Subject", "Days|Subject"]
    assert {"1|Subject", "Days|Subject"} <= {rv.name for rv in fitted_model.free_RVs}


def test_bambi_predict_reads_the_result(fitted):
    """bambi's own predict on our result: link-scale SEs as glmmTMB's predict(se.fit = TRUE), a new herd included."""
    model, result = fitted("cbpp")
    ref = REPORT["cbpp"]["predict"]
    new = pd.DataFrame({"period": ref["period"], "herd": ref["herd"], "incidence": 0, "size": 1})
    for random_effects, mean_key, se_key in (
        (True, "link_with_random", "se_with_random"),
        (False, "link_fixed_only", "se_fixed_only"),
    ):
        draws = predict(result, model=model, new_data=new, random_effects=random_effects, random_seed=1,
                        return_draws=True)  # fmt: skip
        p = draws["p"].reshape(-1, len(new))
        link = np.log(p) - np.log1p(-p)
        # 2,000 draws: the SD of the draws is within ~1.6% of the delta method's (Monte Carlo) plus skewness
        np.testing.assert_allclose(link.std(axis=0, ddof=1), ref[se_key], rtol=0.06)
        # the mean of the draws is not the plug-in value glmmTMB reports: within 0.15 of its SE here
        shift = (link.mean(axis=0) - np.asarray(ref[mean_key])) / np.asarray(ref[se_key])
        assert np.all(np.abs(shift) < 0.15), shift
    table = predict(result, model=model, new_data=new, random_seed=1)
    assert list(table.columns) == ["estimate", "mean", "std_error", "ci_lower", "ci_upper"]
    assert table["estimate"].isna().all()  # bambi's predict reads draws only


def test_a_bambi_model_without_group_terms_is_refused():
    data = pd.read_csv(data_path("sleepstudy.csv"))
    with pytest.raises(ModelSpecificationError, match="no group-specific terms"):
        fit_integrated_laplace(bmb.Model("Reaction ~ Days", data), progressbar=False)


def test_bambis_interpret_plots_read_the_result(fitted, tmp_path):
    """bambi.interpret (conditional predictions, the table behind plot_predictions) on our result."""
    import matplotlib

    matplotlib.use("Agg")
    model, result = fitted("cbpp")
    predictions = bmb.interpret.predictions(model, result, conditional="period")
    frame = predictions if isinstance(predictions, pd.DataFrame) else predictions.summary
    frame = frame if isinstance(frame, pd.DataFrame) else pd.DataFrame(frame)
    assert len(frame) == 4
    plotted = bmb.interpret.plot_predictions(model, result, conditional="period")
    assert plotted is not None
