"""The mixed models people fit every day, as PyMC models, fitted by integrated Laplace beside glmmTMB.

Data: exported from R's lme4 and glmmTMB packages by ``reference/r/export_data.R`` into ``examples/data/``;
glmmTMB's and lme4's fits by ``reference/r/glmmtmb_mixed.R`` into ``reference/mixed_models.json``.

Each builder returns ``(model, random)``: the PyMC model and the names of its random effects. Priors are wide
and play no part in the maximum-likelihood fit (``method="ml"``, as glmmTMB); standard deviations are
``HalfNormal`` so that their unconstrained values are log standard deviations, as in glmmTMB.

Run ``python examples/mixed_models.py`` for the comparison table.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pymc as pm
import pytensor.tensor as pt

DATA = Path(__file__).resolve().parent / "data"
REFERENCE = Path(__file__).resolve().parents[1] / "reference" / "mixed_models.json"


def _levels() -> dict:
    return json.loads((DATA / "factor_levels.json").read_text())["levels"]


def _codes(values: pd.Series, levels: list[str]) -> np.ndarray:
    """0-based codes of a factor column in R's level order."""
    codes = pd.Categorical(values.astype(str), categories=levels).codes
    if np.any(codes < 0):
        raise ValueError(f"values outside the levels {levels}")
    return np.asarray(codes)


def _dummies(codes: np.ndarray, levels: list[str], name: str) -> tuple[np.ndarray, list[str]]:
    """Treatment contrasts (R's default): one column per level after the first."""
    columns = np.stack([(codes == k).astype(float) for k in range(1, len(levels))], axis=1)
    return columns, [f"{name}{level}" for level in levels[1:]]


def sleepstudy() -> tuple[pm.Model, list[str]]:
    """``Reaction ~ Days + (Days | Subject)``: correlated random intercept and slope, Gaussian."""
    d = pd.read_csv(DATA / "sleepstudy.csv")
    levels = _levels()["sleepstudy"]["Subject"]
    subject = _codes(d["Subject"], levels)
    days = d["Days"].to_numpy(float)
    coords = {"Subject": levels, "effect": ["(Intercept)", "Days"], "coef": ["(Intercept)", "Days"]}
    with pm.Model(coords=coords) as model:
        beta = pm.Normal("beta", 0.0, 1000.0, dims="coef")
        chol, _, _ = pm.LKJCholeskyCov(
            "chol", n=2, eta=1.0, sd_dist=pm.HalfNormal.dist(100.0, shape=2), compute_corr=True
        )
        ab = pm.MvNormal("ab", 0.0, chol=chol, dims=("Subject", "effect"))
        sigma = pm.HalfNormal("sigma", 100.0)
        mu = beta[0] + ab[subject, 0] + (beta[1] + ab[subject, 1]) * days
        pm.Normal("Reaction", mu, sigma, observed=d["Reaction"].to_numpy(float))
    return model, ["ab"]


def penicillin() -> tuple[pm.Model, list[str]]:
    """``diameter ~ 1 + (1 | plate) + (1 | sample)``: crossed random intercepts, Gaussian."""
    d = pd.read_csv(DATA / "penicillin.csv")
    levels = _levels()["penicillin"]
    plate, sample = _codes(d["plate"], levels["plate"]), _codes(d["sample"], levels["sample"])
    with pm.Model(coords={"plate": levels["plate"], "sample": levels["sample"]}) as model:
        intercept = pm.Normal("intercept", 0.0, 100.0)
        sd_plate = pm.HalfNormal("sd_plate", 10.0)
        sd_sample = pm.HalfNormal("sd_sample", 10.0)
        sigma = pm.HalfNormal("sigma", 10.0)
        u_plate = pm.Normal("u_plate", 0.0, sd_plate, dims="plate")
        u_sample = pm.Normal("u_sample", 0.0, sd_sample, dims="sample")
        pm.Normal(
            "diameter", intercept + u_plate[plate] + u_sample[sample], sigma, observed=d["diameter"].to_numpy(float)
        )
    return model, ["u_plate", "u_sample"]


def grouseticks() -> tuple[pm.Model, list[str]]:
    """``TICKS ~ YEAR + scale(HEIGHT) + (1 | BROOD) + (1 | INDEX) + (1 | LOCATION)``: nested, Poisson."""
    d = pd.read_csv(DATA / "grouseticks.csv")
    levels = _levels()["grouseticks"]
    year, year_names = _dummies(_codes(d["YEAR"], levels["YEAR"]), levels["YEAR"], "YEAR")
    X = np.column_stack([np.ones(len(d)), year, d["HEIGHT_scaled"].to_numpy(float)])
    names = ["(Intercept)", *year_names, "scale(HEIGHT)"]
    brood, index, location = (_codes(d[c], levels[c]) for c in ("BROOD", "INDEX", "LOCATION"))
    coords = {"coef": names, "BROOD": levels["BROOD"], "INDEX": levels["INDEX"], "LOCATION": levels["LOCATION"]}
    with pm.Model(coords=coords) as model:
        beta = pm.Normal("beta", 0.0, 10.0, dims="coef")
        sd_brood = pm.HalfNormal("sd_brood", 2.0)
        sd_index = pm.HalfNormal("sd_index", 2.0)
        sd_location = pm.HalfNormal("sd_location", 2.0)
        u_brood = pm.Normal("u_brood", 0.0, sd_brood, dims="BROOD")
        u_index = pm.Normal("u_index", 0.0, sd_index, dims="INDEX")
        u_location = pm.Normal("u_location", 0.0, sd_location, dims="LOCATION")
        eta = pt.dot(X, beta) + u_brood[brood] + u_index[index] + u_location[location]
        pm.Poisson("TICKS", pt.exp(eta), observed=d["TICKS"].to_numpy())
    return model, ["u_brood", "u_index", "u_location"]


def _salamanders(zero_inflated: str | None) -> tuple[pm.Model, list[str]]:
    d = pd.read_csv(DATA / "salamanders.csv")
    levels = _levels()["salamanders"]
    spp, spp_names = _dummies(_codes(d["spp"], levels["spp"]), levels["spp"], "spp")
    mined, mined_names = _dummies(_codes(d["mined"], levels["mined"]), levels["mined"], "mined")
    X = np.column_stack([np.ones(len(d)), spp, mined])
    site = _codes(d["site"], levels["site"])
    coords = {"coef": ["(Intercept)", *spp_names, *mined_names], "site": levels["site"]}
    zi_design = {"spp": (spp, spp_names), "mined": (mined, mined_names)}
    if zero_inflated:
        zi_columns, zi_names = zi_design[zero_inflated]
        coords["zi_coef"] = ["(Intercept)", *zi_names]
    count = d["count"].to_numpy()
    with pm.Model(coords=coords) as model:
        beta = pm.Normal("beta", 0.0, 10.0, dims="coef")
        # nbinom2: Var = mu + mu^2 / theta; PyMC's alpha is glmmTMB's theta (its sigma(fit))
        theta = pm.HalfNormal("theta", 10.0)
        sd_site = pm.HalfNormal("sd_site", 2.0)
        u_site = pm.Normal("u_site", 0.0, sd_site, dims="site")
        mu = pt.exp(pt.dot(X, beta) + u_site[site])
        if zero_inflated:
            gamma = pm.Normal("gamma", 0.0, 10.0, dims="zi_coef")
            # glmmTMB: P(structural zero) = logistic(Z gamma); PyMC's psi is the probability of the count part
            psi = pm.math.sigmoid(-pt.dot(np.column_stack([np.ones(len(d)), zi_columns]), gamma))
            pm.ZeroInflatedNegativeBinomial("count", psi=psi, mu=mu, alpha=theta, observed=count)
        else:
            pm.NegativeBinomial("count", mu=mu, alpha=theta, observed=count)
    return model, ["u_site"]


def salamanders() -> tuple[pm.Model, list[str]]:
    """``count ~ spp + mined + (1 | site)``, negative binomial (nbinom2)."""
    return _salamanders(zero_inflated=None)


def salamanders_zi() -> tuple[pm.Model, list[str]]:
    """The same with ``ziformula = ~ spp``: zero inflation depending on species.

    For two species (GP, DM) the zero-inflation probability goes to 0 at the optimum: the likelihood has no
    interior maximum in those directions (glmmTMB: non-positive-definite Hessian).
    """
    return _salamanders(zero_inflated="spp")


def salamanders_zi_mined() -> tuple[pm.Model, list[str]]:
    """The same with ``ziformula = ~ mined``: a zero-inflated model with an interior optimum."""
    return _salamanders(zero_inflated="mined")


def cbpp() -> tuple[pm.Model, list[str]]:
    """``cbind(incidence, size - incidence) ~ period + (1 | herd)``, binomial logit."""
    d = pd.read_csv(DATA / "cbpp.csv")
    herd = d["herd"].astype(int).to_numpy() - 1
    period = d["period"].astype(int).to_numpy()
    X = np.column_stack([np.ones(len(d)), period == 2, period == 3, period == 4]).astype(float)
    coords = {"herd": np.arange(1, 16), "coef": ["(Intercept)", "period2", "period3", "period4"]}
    with pm.Model(coords=coords) as model:
        beta = pm.Normal("beta", 0.0, 10.0, dims="coef")
        sigma = pm.HalfNormal("sigma", 1.0)
        u = pm.Normal("u", 0.0, sigma, dims="herd")
        pm.Binomial("y", n=d["size"].to_numpy(), logit_p=pt.dot(X, beta) + u[herd], observed=d["incidence"].to_numpy())
    return model, ["u"]


BUILDERS: dict[str, Callable[[], tuple[pm.Model, list[str]]]] = {
    "sleepstudy": sleepstudy,
    "penicillin": penicillin,
    "grouseticks": grouseticks,
    "salamanders": salamanders,
    "salamanders_zi": salamanders_zi,
    "salamanders_zi_mined": salamanders_zi_mined,
    "cbpp": cbpp,
}


def main() -> None:
    from pymc_laplace import fit_integrated_laplace, summary

    reference = json.loads(REFERENCE.read_text())
    names = sys.argv[1:] or list(BUILDERS)
    for name in names:
        model, random = BUILDERS[name]()
        start = time.perf_counter()
        result = fit_integrated_laplace(model, random=random, draws=200, chains=2, random_seed=1, progressbar=False)
        elapsed = time.perf_counter() - start
        from pymc_laplace._compat import get_group

        log_lik = float(get_group(result, "fit")["log_marginal_likelihood"])
        ref = reference[name]["glmmTMB"]
        print(f"\n== {name}: logLik ours {log_lik:.6f}, glmmTMB {ref['logLik']:.6f}; whole call {elapsed:.1f} s")
        print(summary(result).to_string())


if __name__ == "__main__":
    main()
