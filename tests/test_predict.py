"""Predictions for new data from a PyMC model with data containers, against glmmTMB's predict(se.fit = TRUE).

Reference: ``reference/report.json`` (``reference/r/glmmtmb_report.R``): link-scale predictions of cbpp for a
known herd in two periods and another herd, with the random effects (``re.form = NULL``) and without
(``re.form = NA``).
"""

from __future__ import annotations

import json

import mixed_models  # examples/, put on the path by conftest
import numpy as np
import pandas as pd
import pymc as pm
import pytest
from conftest import data_path

from pymc_laplace import ModelSpecificationError, fit_integrated_laplace
from pymc_laplace.predict import predict

REPORT = json.loads((mixed_models.REFERENCE.parent / "report.json").read_text())
LEVELS = json.loads(data_path("factor_levels.json").read_text())["levels"]["cbpp"]


def design(periods) -> np.ndarray:
    codes = np.array([LEVELS["period"].index(str(p)) for p in periods])
    return np.column_stack([np.ones(codes.size), np.eye(4)[codes][:, 1:]])


@pytest.fixture(scope="module")
def cbpp_fit():
    data = pd.read_csv(data_path("cbpp.csv"), dtype={"herd": str, "period": str})
    herd = np.array([LEVELS["herd"].index(h) for h in data["herd"]])
    coords = {"herd": LEVELS["herd"], "coef": ["(Intercept)", "period2", "period3", "period4"]}
    with pm.Model(coords=coords) as model:
        herd_index = pm.Data("herd_index", herd)
        x = pm.Data("x", design(data["period"]))
        beta = pm.Normal("beta", 0.0, 10.0, dims="coef")
        sigma = pm.HalfNormal("sigma", 2.0)
        u = pm.Normal("u", 0.0, sigma, dims="herd")
        eta = pm.Deterministic("eta", x @ beta + u[herd_index])
        pm.Binomial("y", n=data["size"].to_numpy(), logit_p=eta, observed=data["incidence"].to_numpy(), shape=eta.shape)
    result = fit_integrated_laplace(model, random=["u"], draws=1000, chains=2, random_seed=5, progressbar=False)
    return model, result


def test_predictions_match_glmmtmb(cbpp_fit):
    model, result = cbpp_fit
    ref = REPORT["cbpp"]["predict"]
    known = [i for i, herd in enumerate(ref["herd"]) if herd in LEVELS["herd"]]  # glmmTMB's new level: bambi's test
    new_data = {
        "x": design([ref["period"][i] for i in known]),
        "herd_index": np.array([LEVELS["herd"].index(ref["herd"][i]) for i in known]),
    }
    x_before = model["x"].get_value().copy()
    for random_effects, fit_key, se_key in ((True, "link_with_random", "se_with_random"),
                                            (False, "link_fixed_only", "se_fixed_only")):  # fmt: skip
        table = predict(result, model=model, var_names="eta", new_data=new_data, random_effects=random_effects)
        assert list(table.index) == ["eta[0]", "eta[1]", "eta[2]"]
        # the value at the estimate is glmmTMB's plug-in prediction
        np.testing.assert_allclose(table["estimate"], np.asarray(ref[fit_key])[known], atol=2e-5)
        # the SD of 2,000 joint draws against the delta method: Monte Carlo error ~1.6%, plus the skewness of b
        np.testing.assert_allclose(table["std_error"], np.asarray(ref[se_key])[known], rtol=0.06)
        assert np.all((table["ci_lower"] < table["estimate"]) & (table["estimate"] < table["ci_upper"]))
    # the model's data are set back
    np.testing.assert_array_equal(model["x"].get_value(), x_before)
    # without new data: the fitted rows
    in_sample = predict(result, model=model, var_names=["eta"])
    assert len(in_sample) == 56


def test_predict_refuses_what_it_cannot_do(cbpp_fit):
    model, result = cbpp_fit
    with pytest.raises(ModelSpecificationError, match="not variables of the model"):
        predict(result, model=model, var_names="mu")
    with pytest.raises(ModelSpecificationError, match="free variables"):
        predict(result, model=model, var_names="beta")
    with pytest.raises(ModelSpecificationError, match="var_names"):
        predict(result, model=model)
    with pytest.raises(ModelSpecificationError, match="not data containers"):
        predict(result, model=model, var_names="eta", new_data={"z": np.ones(3)})
    with pytest.raises(ValueError, match="level"):
        predict(result, model=model, var_names="eta", level=1.5)


def test_random_effects_off_needs_an_integrated_fit_and_untransformed_effects():
    """random_effects=False sets the integrated random effects to zero: refused for a fit_laplace result (nothing was
    integrated out) and for a random effect whose zero is not 'no effect' (a transformed one)."""
    from pymc_laplace import fit_laplace

    x = np.linspace(-1.0, 1.0, 12)
    with pm.Model() as plain:
        x_data = pm.Data("x_data", x)
        slope = pm.Normal("slope", 0.0, 1.0)
        pm.Deterministic("mean", slope * x_data)
        pm.Normal("y", slope * x_data, 1.0, observed=0.5 * x, shape=x_data.shape)
        result = fit_laplace(draws=30, chains=1, random_seed=1, progressbar=False)
    with pytest.raises(ModelSpecificationError, match="not of fit_integrated_laplace"):
        predict(result, model=plain, var_names="mean", random_effects=False)
    group = np.repeat(np.arange(4), 3)
    with pm.Model() as scaled:
        sd = pm.HalfNormal("sd", 1.0)
        scale = pm.LogNormal("scale", 0.0, sd, shape=4)
        pm.Deterministic("rate", scale[group])
        pm.Poisson("count", scale[group], observed=np.array([1, 2, 1, 3, 2, 2, 0, 1, 1, 4, 3, 5]))
        fitted = fit_integrated_laplace(random=["scale"], draws=20, chains=1, random_seed=1, progressbar=False)
    with pytest.raises(ModelSpecificationError, match="has a transform"):
        predict(fitted, model=scaled, var_names="rate", random_effects=False)
