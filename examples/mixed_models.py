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


def verbagg() -> tuple[pm.Model, list[str]]:
    """``r2 ~ Anger + Gender + btype + situ + (1 | id) + (1 | item)``, Bernoulli logit (lme4's VerbAgg example).

    7,584 binary answers of 316 people to 24 items: crossed random intercepts, 340 random effects.
    """
    d = pd.read_csv(DATA / "verbagg.csv")
    levels = _levels()["verbagg"]
    gender, gender_names = _dummies(_codes(d["Gender"], levels["Gender"]), levels["Gender"], "Gender")
    btype, btype_names = _dummies(_codes(d["btype"], levels["btype"]), levels["btype"], "btype")
    situ, situ_names = _dummies(_codes(d["situ"], levels["situ"]), levels["situ"], "situ")
    X = np.column_stack([np.ones(len(d)), d["Anger"].to_numpy(float), gender, btype, situ])
    names = ["(Intercept)", "Anger", *gender_names, *btype_names, *situ_names]
    person, item = _codes(d["id"], levels["id"]), _codes(d["item"], levels["item"])
    y = _codes(d["r2"], levels["r2"])  # N = 0, Y = 1
    coords = {"coef": names, "id": levels["id"], "item": levels["item"]}
    with pm.Model(coords=coords) as model:
        beta = pm.Normal("beta", 0.0, 10.0, dims="coef")
        sd_id = pm.HalfNormal("sd_id", 2.0)
        sd_item = pm.HalfNormal("sd_item", 2.0)
        u_id = pm.Normal("u_id", 0.0, sd_id, dims="id")
        u_item = pm.Normal("u_item", 0.0, sd_item, dims="item")
        pm.Bernoulli("r2", logit_p=pt.dot(X, beta) + u_id[person] + u_item[item], observed=y)
    return model, ["u_id", "u_item"]


def insteval() -> tuple[pm.Model, list[str]]:
    """``y ~ service + (1 | s) + (1 | d) + (1 | dept)``, Gaussian (lme4's InstEval).

    73,421 lecture ratings: 2,972 students crossed with 1,128 lecturers, plus 14 departments; 4,114 random
    effects.
    """
    d = pd.read_csv(DATA / "insteval.csv")
    levels = _levels()["insteval"]
    service, service_names = _dummies(_codes(d["service"], levels["service"]), levels["service"], "service")
    X = np.column_stack([np.ones(len(d)), service])
    student, lecturer, dept = (_codes(d[c], levels[c]) for c in ("s", "d", "dept"))
    coords = {"coef": ["(Intercept)", *service_names], "s": levels["s"], "d": levels["d"], "dept": levels["dept"]}
    with pm.Model(coords=coords) as model:
        beta = pm.Normal("beta", 0.0, 100.0, dims="coef")
        sd_s = pm.HalfNormal("sd_s", 10.0)
        sd_d = pm.HalfNormal("sd_d", 10.0)
        sd_dept = pm.HalfNormal("sd_dept", 10.0)
        sigma = pm.HalfNormal("sigma", 10.0)
        u_s = pm.Normal("u_s", 0.0, sd_s, dims="s")
        u_d = pm.Normal("u_d", 0.0, sd_d, dims="d")
        u_dept = pm.Normal("u_dept", 0.0, sd_dept, dims="dept")
        mu = pt.dot(X, beta) + u_s[student] + u_d[lecturer] + u_dept[dept]
        pm.Normal("y", mu, sigma, observed=d["y"].to_numpy(float))
    return model, ["u_s", "u_d", "u_dept"]


BUILDERS: dict[str, Callable[[], tuple[pm.Model, list[str]]]] = {
    "sleepstudy": sleepstudy,
    "penicillin": penicillin,
    "grouseticks": grouseticks,
    "salamanders": salamanders,
    "salamanders_zi": salamanders_zi,
    "salamanders_zi_mined": salamanders_zi_mined,
    "cbpp": cbpp,
}

# larger data sets (thousands of random effects); kept apart from BUILDERS, which the report and tests fit
LARGE_BUILDERS: dict[str, Callable[[], tuple[pm.Model, list[str]]]] = {
    "verbagg": verbagg,
    "insteval": insteval,
}


# ------------------------------------------------------------------------------------------ comparison
# our random-effect variable -> (glmmTMB grouping factor, effect); for sleepstudy column k of "ab"
RANEF = {
    "sleepstudy": {"ab": [("Subject", "(Intercept)"), ("Subject", "Days")]},
    "penicillin": {"u_plate": [("plate", "(Intercept)")], "u_sample": [("sample", "(Intercept)")]},
    "grouseticks": {f"u_{g.lower()}": [(g, "(Intercept)")] for g in ("BROOD", "INDEX", "LOCATION")},
    "salamanders": {"u_site": [("site", "(Intercept)")]},
    "salamanders_zi": {"u_site": [("site", "(Intercept)")]},
    "salamanders_zi_mined": {"u_site": [("site", "(Intercept)")]},
    "cbpp": {"u": [("herd", "(Intercept)")]},
    "verbagg": {"u_id": [("id", "(Intercept)")], "u_item": [("item", "(Intercept)")]},
    "insteval": {f"u_{g}": [(g, "(Intercept)")] for g in ("s", "d", "dept")},
}


def reference(name: str) -> dict[str, float]:
    """glmmTMB's estimates on the natural scale, keyed like :func:`ours`."""
    ref = json.loads(REFERENCE.read_text())[name]["glmmTMB"]
    out = {}
    for part, prefix in (("cond", "beta"), ("zi", "gamma")):
        for label, entry in ref["fixed"].get(part, {}).items():
            out[f"{prefix}[{label}]"] = entry["estimate"]
    for group, entry in ref["varcorr"].items():
        for effect, sd in entry["sd"].items():
            out[f"sd {group} {effect}"] = sd
        for pair, corr in entry.get("correlation", {}).items():
            out[f"corr {group} {pair}"] = corr
    if "sigma" in ref:
        out["sigma"] = ref["sigma"]
    if "nbinom2_theta" in ref:
        out["theta"] = ref["nbinom2_theta"]
    return out


def ours(name: str, natural: dict[str, float]) -> dict[str, float]:
    """Our natural-scale estimates (``summary`` rows of scale "natural") renamed to :func:`reference`'s keys."""
    out = {k: v for k, v in natural.items() if k.startswith(("beta[", "gamma["))}
    if name == "sleepstudy":  # packed Cholesky factor [L00, L10, L11] of the (intercept, slope) covariance
        l00, l10, l11 = (natural[f"chol[{i}]"] for i in range(3))
        sd_slope = float(np.hypot(l10, l11))
        out |= {
            "sd Subject (Intercept)": l00,
            "sd Subject Days": sd_slope,
            "corr Subject (Intercept),Days": l10 / sd_slope,
        }
    if name == "penicillin":
        out |= {"beta[(Intercept)]": natural["intercept"]}
        out |= {"sd plate (Intercept)": natural["sd_plate"], "sd sample (Intercept)": natural["sd_sample"]}
    if name == "grouseticks":
        for group in ("BROOD", "INDEX", "LOCATION"):
            out[f"sd {group} (Intercept)"] = natural[f"sd_{group.lower()}"]
    if name.startswith("salamanders"):
        out |= {"sd site (Intercept)": natural["sd_site"], "theta": natural["theta"]}
    if name == "cbpp":
        out["sd herd (Intercept)"] = natural["sigma"]
    if name == "verbagg":
        out |= {"sd id (Intercept)": natural["sd_id"], "sd item (Intercept)": natural["sd_item"]}
    if name == "insteval":
        for group in ("s", "d", "dept"):
            out[f"sd {group} (Intercept)"] = natural[f"sd_{group}"]
    if name in ("sleepstudy", "penicillin", "insteval"):
        out["sigma"] = natural["sigma"]
    return out


def random_effect_pairs(name: str, labels: list[str], modes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(glmmTMB's conditional modes, ours), matched by variable and level."""
    ranef = json.loads(REFERENCE.read_text())[name]["glmmTMB"]["ranef"]
    theirs, mine = [], []
    for variable, effects in RANEF[name].items():
        for column, (group, effect) in enumerate(effects):
            entry = ranef[group][effect]
            for level, mode in zip(entry["level"], entry["mode"], strict=True):
                label = (
                    f"{variable}[{level}, {['(Intercept)', 'Days'][column]}]"
                    if len(effects) > 1
                    else (f"{variable}[{level}]")
                )
                theirs.append(mode)
                mine.append(modes[labels.index(label)])
    return np.array(theirs), np.array(mine)


def main(out_dir: Path | None = None) -> str:
    """Fit every model, compare with glmmTMB, and return the markdown section (a plot goes to ``out_dir``)."""
    import warnings

    from pymc_laplace import fit_integrated_laplace, get_group, summary

    refs = json.loads(REFERENCE.read_text())
    lines = [
        "## Mixed models beside glmmTMB",
        "",
        "Integrated Laplace (ML) on real data sets from lme4 and glmmTMB; glmmTMB's Laplace fits from "
        "`reference/r/glmmtmb_mixed.R`. Differences are ours minus glmmTMB's, largest over all reported "
        "estimates (fixed effects, SDs, correlation, dispersion); times are our whole call, compilation included.",
        "",
        "| data | logLik ours | logLik glmmTMB | max abs diff | ours (s) | glmmTMB first call (s) | note |",
        "|---|---|---|---|---|---|---|",
    ]
    pairs = {}
    for name, build in BUILDERS.items():
        model, random = build()
        start = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = fit_integrated_laplace(model, random=random, draws=200, chains=2, random_seed=1, progressbar=False)
        elapsed = time.perf_counter() - start
        notes = [str(w.message).split(":")[0] for w in caught if "boundary" in str(w.message)]
        table = summary(result)
        natural = {label: row["estimate"] for label, row in table[table["scale"] == "natural"].iterrows()}
        mine, theirs = ours(name, natural), reference(name)
        compared = [k for k in theirs if not (name == "salamanders_zi" and k.startswith("gamma["))]
        worst = max(abs(mine[k] - theirs[k]) for k in compared)
        fit = get_group(result, "fit")
        log_lik = float(fit["log_marginal_likelihood"])
        ref = refs[name]["glmmTMB"]
        lines.append(
            f"| {name} | {log_lik:.6f} | {ref['logLik']:.6f} | {worst:.1e} | {elapsed:.1f} | "
            f"{ref['time']['first_call_s']:.2f} | {'; '.join(notes)} |"
        )
        labels = [str(x) for x in fit["random_rows"].values]
        pairs[name] = random_effect_pairs(name, labels, fit["random_effects"].values)
    lines += [
        "",
        "salamanders_zi (`ziformula = ~ spp`) has no interior optimum: the zero-inflation probabilities of two "
        "species go to 0 (glmmTMB: non-positive-definite Hessian). We report that direction as a boundary fit; "
        "its zero-inflation coefficients are not compared.",
    ]
    if out_dir is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(2, 4, figsize=(14, 7))
        for ax, (name, (theirs, mine)) in zip(axes.ravel(), pairs.items(), strict=False):
            ax.plot(theirs, mine, ".", alpha=0.6)
            lo, hi = float(min(theirs.min(), mine.min())), float(max(theirs.max(), mine.max()))
            ax.plot([lo, hi], [lo, hi], "k-", lw=0.5)
            ax.set_title(f"{name}: max |diff| {np.max(np.abs(mine - theirs)):.1e}", fontsize=9)
            ax.set_xlabel("glmmTMB conditional mode")
            ax.set_ylabel("ours")
        for ax in axes.ravel()[len(pairs) :]:
            ax.axis("off")
        fig.tight_layout()
        fig.savefig(Path(out_dir) / "mixed_models_random_effects.png", dpi=90)
        plt.close(fig)
        lines += ["", "![random effects, ours against glmmTMB](mixed_models_random_effects.png)"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(main(Path(sys.argv[1]) if len(sys.argv) > 1 else None))
