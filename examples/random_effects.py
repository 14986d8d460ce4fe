"""Random effects integrated out by the Laplace approximation (seeds 000 and 002, and cbpp).

Three fits with ``fit_integrated_laplace``:

* cbpp, the classic binomial GLMM ``incidence/size ~ period + (1 | herd)``, beside glmmTMB's published fit;
* seed 000, a two-site logistic regression with a random intercept per site, beside adaptive Gauss-Hermite
  quadrature and the seed's own printed estimate;
* seed 002, Wood's sea-urchin growth model with two random effects per urchin, maximum likelihood from the
  seed's start, and the seed's simulated growth-trajectory band.

Run as a script (``python examples/random_effects.py --out out``) or through ``examples/run_all.py``.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pymc as pm
import pytensor.tensor as pt
from mixed_models import cbpp
from scipy import optimize, special

from pymc_laplace import HessianNotPositiveDefiniteError, fit_integrated_laplace, get_group, marginal, summary

DATA = Path(__file__).resolve().parent / "data"
REFERENCE = Path(__file__).resolve().parents[1] / "reference" / "mixed_models.json"

# Seed 000's printed estimate of beta (hand-derived Newton with tau = 1)
SEED_000_BETA = np.array(
    [-0.02635409, 0.2838822, -1.98640254, -5.12083263, 1.09260947, -5.25923557, -2.03314193, -1.86771009,
     2.24603706, 3.16022686]
)  # fmt: skip


def cbpp_model() -> pm.Model:
    """``incidence/size ~ period + (1 | herd)``, binomial logit (built in mixed_models.py)."""
    return cbpp()[0]


def two_site_data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    d = pd.read_csv(DATA / "two_site_logistic.csv")
    return d[[f"x{i}" for i in range(1, 11)]].to_numpy(), d["y"].to_numpy(), d["site"].to_numpy() - 1


def two_site_model(tau: float = 1.0) -> pm.Model:
    X, y, site = two_site_data()
    with pm.Model(coords={"site": [1, 2], "coef": [f"x{i}" for i in range(1, 11)]}) as model:
        beta = pm.Normal("beta", 0.0, 10.0, dims="coef")
        mu = pm.Normal("mu", 0.0, tau, dims="site")
        pm.Bernoulli("y", logit_p=pt.dot(X, beta) + mu[site], observed=y)
    return model


def aghq_log_marginal(beta: np.ndarray, n_nodes: int, tau: float = 1.0) -> float:
    """Adaptive Gauss-Hermite quadrature over each site's intercept (numpy; one node is exactly Laplace)."""
    X, y, site = two_site_data()
    nodes, weights = np.polynomial.hermite.hermgauss(n_nodes)
    total = 0.0
    for s in (0, 1):
        eta0, ys = X[site == s] @ beta, y[site == s]
        mode = 0.0
        for _ in range(100):
            p = special.expit(eta0 + mode)
            step = (np.sum(ys - p) - mode / tau**2) / (np.sum(p * (1 - p)) + 1 / tau**2)
            mode += step
            if abs(step) < 1e-13:
                break
        p = special.expit(eta0 + mode)
        scale = 1.0 / np.sqrt(np.sum(p * (1 - p)) + 1 / tau**2)
        points = mode + np.sqrt(2.0) * scale * nodes
        eta = eta0[:, None] + points[None, :]
        log_joint = (
            np.sum(ys[:, None] * eta - np.logaddexp(0.0, eta), axis=0)
            - 0.5 * (points / tau) ** 2 - np.log(tau) - 0.5 * np.log(2 * np.pi)
        )  # fmt: skip
        total += special.logsumexp(log_joint + nodes**2, b=weights) + np.log(np.sqrt(2.0) * scale)
    return total


def urchin_data() -> pd.DataFrame:
    return pd.read_csv(DATA / "urchin.csv")


def urchin_volume(omega, g, p, age):
    """Wood's growth curve: exponential until age a_m = log(p / (g omega)) / g, then linear."""
    am = np.log(p / (g * omega)) / g
    return np.where(age < am, omega * np.exp(g * age), p / g + p * (age - am))


def urchin_model() -> pm.Model:
    d = urchin_data()
    age, vol = d["age"].to_numpy(float), d["vol"].to_numpy(float)
    with pm.Model(coords={"urchin": np.arange(len(d))}) as model:
        log_omega = pm.Normal("log_omega", 0.0, 10.0)
        mu_g = pm.Normal("mu_g", 0.0, 10.0)
        sig_g = pm.HalfNormal("sig_g", 1.0)
        mu_p = pm.Normal("mu_p", 0.0, 10.0)
        sig_p = pm.HalfNormal("sig_p", 1.0)
        sigma = pm.HalfNormal("sigma", 1.0)
        log_g = pm.Normal("log_g", mu_g, sig_g, dims="urchin")
        log_p = pm.Normal("log_p", mu_p, sig_p, dims="urchin")
        g, p, omega = pt.exp(log_g), pt.exp(log_p), pt.exp(log_omega)
        am = pt.log(p / (g * omega)) / g
        volume = pt.switch(age < am, omega * pt.exp(g * age), p / g + p * (age - am))
        pm.Normal("sqrt_vol", pt.sqrt(volume), sigma, observed=np.sqrt(vol), dims="urchin")
    return model


def _table(frame: pd.DataFrame) -> str:
    lines = ["| parameter | scale | estimate | std. error |", "|---|---|---|---|"]
    lines += [f"| {i} | {r.scale} | {r.estimate:.6f} | {r.std_error:.6f} |" for i, r in frame.iterrows()]
    return "\n".join(lines)


def cbpp_section(out_dir: Path) -> str:
    start = time.perf_counter()
    result = fit_integrated_laplace(cbpp_model(), random=["u"], random_seed=1, progressbar=False)
    elapsed = time.perf_counter() - start
    fit = get_group(result, "fit")
    table = summary(result)
    herd_se = fit["random_effects_se"].values
    # glmmTMB's conditional modes and sdreport SEs (reference/r/cbpp.R), beside ours
    reference = json.loads(REFERENCE.read_text())["cbpp"]["glmmTMB"]["ranef"]["herd"]["(Intercept)"]
    herds = np.arange(1, 16)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.errorbar(herds - 0.12, fit["random_effects"].values, yerr=1.96 * herd_se, fmt="o", capsize=3,
                label="pymc_laplace")  # fmt: skip
    ax.errorbar(herds + 0.12, reference["mode"], yerr=1.96 * np.asarray(reference["condsd_sdreport"]), fmt="s",
                capsize=3, mfc="none", label="glmmTMB")  # fmt: skip
    ax.axhline(0, color="grey", lw=0.8)
    ax.set(xlabel="herd", ylabel="random intercept u: conditional mode, 95% interval", xticks=herds,
           title="cbpp herd effects; intervals include the uncertainty of the fixed effects")  # fmt: skip
    low, high = ax.get_ylim()
    ax.set_ylim(low - 0.2 * (high - low), high)  # room for the legend below the intervals
    ax.legend(loc="lower center", ncols=2)
    fig.tight_layout()
    fig.savefig(out_dir / "cbpp_herds.png", dpi=110)
    plt.close(fig)
    return f"""## cbpp: binomial GLMM, herd random intercepts

`fit_integrated_laplace(model, random=["u"])` in {elapsed:.1f} s (compilation included).
Laplace log-likelihood **{float(fit["log_marginal_likelihood"]):.6f}** (glmmTMB -92.026282, glmer -92.026566),
AIC {float(fit["aic"]):.4f}. glmmTMB's estimates: intercept -1.39853247 (SE 0.23247205), period2 -0.99233229
(0.30664249), period3 -1.12867130 (0.32663781), period4 -1.58031369 (0.42743660), herd SD 0.64226167.

{_table(table)}

![herd effects](cbpp_herds.png)
"""


def two_site_section(out_dir: Path) -> str:
    start = time.perf_counter()
    result = fit_integrated_laplace(two_site_model(1.0), random=["mu"], random_seed=2, progressbar=False)
    elapsed = time.perf_counter() - start
    ours = get_group(result, "fit")["mean_vector"].values
    laplace = marginal(two_site_model(1.0), random=["mu"])
    at_ours = laplace.value(ours)
    at_seed = laplace.value(SEED_000_BETA)
    grad_seed = np.max(np.abs(laplace.value_and_grad(SEED_000_BETA)[1]))
    exact = optimize.minimize(lambda b: -aghq_log_marginal(b, 25), ours, method="BFGS", options={"gtol": 1e-8}).x
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            fit_integrated_laplace(two_site_model_free_tau(), random=["mu"], progressbar=False, draws=10, chains=1)
            tau_text = "unexpectedly finite"
        except HessianNotPositiveDefiniteError as err:
            tau_text = str(err).splitlines()[1].strip()
    rows = "\n".join(
        f"| x{i + 1} | {ours[i]:.5f} | {exact[i]:.5f} | {SEED_000_BETA[i]:.5f} |" for i in range(10)
    )
    # differences from the quadrature answer: the estimates themselves lie on top of each other at any scale
    fig, axes = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True)
    index = np.arange(1, 11)
    for ax, values, title in (
        (axes[0], ours - exact, "Laplace (pymc_laplace) - AGHQ with 25 nodes"),
        (axes[1], SEED_000_BETA - exact, "seed's printed beta - AGHQ with 25 nodes"),
    ):
        ax.bar(index, values, color="C0" if ax is axes[0] else "C1")
        ax.axhline(0.0, color="k", lw=0.8)
        ax.set(ylabel="difference", title=title)
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    axes[1].set(xlabel="coefficient x1 ... x10", xticks=index)
    fig.suptitle("Two-site logistic model, tau = 1: estimates minus the quadrature answer (note the two scales)")
    fig.tight_layout()
    fig.savefig(out_dir / "two_site_beta.png", dpi=110)
    plt.close(fig)
    return f"""## Seed 000: two-site logistic regression with a random intercept per site

tau = 1 fixed, as in the seed. Fit in {elapsed:.1f} s. The linear predictor reaches |logit| of about 140 here;
the Bernoulli log density is differentiated as y*eta - softplus(eta), which stays exact there.

| coefficient | Laplace (ours) | AGHQ 25 nodes | seed |
|---|---|---|---|
{rows}

Why the seed's beta differs: the seed maximises the same Laplace marginal with hand-derived first and second
derivatives, but alternates 10 passes of site-intercept updates with Newton steps on beta and stops there; its
derivative code also evaluates some sums with the whole design matrix where one row is meant. At its printed
beta the Laplace log marginal is **{at_seed:.4f}** with max|gradient| {grad_seed:.2f}, against
**{at_ours:.4f}** at ours (gradient zero to 1e-6): the seed stopped short of the optimum. Adaptive quadrature
with 25 nodes per site, computed independently in numpy, agrees with the Laplace estimates to
{np.max(np.abs(ours - exact)):.1e}.

With tau estimated by maximum likelihood, two sites cannot identify it: the fit reports
`{tau_text}` (the marginal likelihood keeps increasing as tau -> 0), rather than returning a meaningless
standard error. Use `method="map"` with a prior on tau.

![beta](two_site_beta.png)
"""


def two_site_model_free_tau() -> pm.Model:
    X, y, site = two_site_data()
    with pm.Model(coords={"site": [1, 2]}) as model:
        beta = pm.Normal("beta", 0.0, 10.0, shape=10)
        tau = pm.HalfNormal("tau", 2.0)
        mu = pm.Normal("mu", 0.0, tau, dims="site")
        pm.Bernoulli("y", logit_p=pt.dot(X, beta) + mu[site], observed=y)
    return model


def urchin_section(out_dir: Path) -> str:
    model = urchin_model()
    laplace = marginal(model, random=["log_g", "log_p"])
    reference = {
        "seed start theta0": ((-4.0, -0.2, np.log(0.1), 0.2, np.log(0.1), np.log(0.5)), 206.1558),
        "seed 002's optimum": ((-4.0676, -0.18946, -1.81267, 0.16382, -1.62341, -1.21295), 196.7140),
        # at full precision, as tmb_urchin.R evaluates it (see below for what 5-digit rounding does)
        "earlier published optimum": ((-3.8209363719659635, -0.24650595062193945, -1.818444737639711,
                                       0.16975727067150495, -1.6277268858566873, -1.1306834470971574), 196.6543),
    }
    rows = []
    for name, (theta, tmb) in reference.items():
        aic = 2 * (-laplace.value(np.array(theta))) + 12
        rows.append(f"| {name} | {aic:.4f} | {tmb:.4f} |")
    rounded = np.round(np.array(reference["earlier published optimum"][0]), 5)
    aic_rounded = 2 * (-laplace.value(rounded)) + 12
    initvals = {"log_omega": -4.0, "mu_g": -0.2, "sig_g": 0.1, "mu_p": 0.2, "sig_p": 0.1, "sigma": 0.5}
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        try:
            result = fit_integrated_laplace(model, random=["log_g", "log_p"], initvals=initvals, random_seed=3,
                                            progressbar=False)  # fmt: skip
            fit = get_group(result, "fit")
            theta_hat = fit["mean_vector"].values
            aic_hat = float(fit["aic"])
            opt = get_group(result, "optimizer_result")
            status = f"{bool(opt['success'])}: {opt['message'].values}"
        except HessianNotPositiveDefiniteError as err:
            theta_hat = np.array(list(err.theta.values()))
            aic_hat = 2 * (-err.objective) + 12
            status = "Hessian of the marginal not positive definite (TMB's pdHess = FALSE): " + str(err).splitlines()[1]
    elapsed = time.perf_counter() - start
    warned = "; ".join(str(w.message)[:160] for w in caught) or "none"

    # The seed's figure: 5,000 simulated urchins at the estimate (random effects from their fitted distribution)
    rng = np.random.default_rng(5000)
    log_omega, mu_g, log_sig_g, mu_p, log_sig_p, _ = theta_hat
    ages = np.linspace(0.0, urchin_data()["age"].max(), 200)
    g = np.exp(rng.normal(mu_g, np.exp(log_sig_g), size=5000))
    p = np.exp(rng.normal(mu_p, np.exp(log_sig_p), size=5000))
    curves = urchin_volume(np.exp(log_omega), g[:, None], p[:, None], ages[None, :])
    lo, mid, hi = np.quantile(curves, [0.025, 0.5, 0.975], axis=0)
    d = urchin_data()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    # the curves are expected volumes: the band is the spread of the growth curves between urchins, without the
    # measurement error of the data, so the points need not fall inside it
    ax.fill_between(ages, lo, hi, alpha=0.25, label="95% of expected growth curves (random effects drawn; no noise)")
    ax.plot(ages, mid, label="median expected curve")
    ax.scatter(d["age"], d["vol"], s=10, color="k", label="data")
    ax.set(xlabel="age", ylabel="volume", title="Urchin growth at the maximum-likelihood estimate")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "urchin_band.png", dpi=110)
    plt.close(fig)
    return f"""## Seed 002: Wood's urchin growth model, two random effects per urchin

The Hessian of the joint density in (log g, log p) is found from the model graph to be 2x2 block-diagonal (two
colours of compressed Hessian-vector products for all 142 urchins). TMB Laplace AIC at the reference thetas:

| theta | ours | TMB |
|---|---|---|
{chr(10).join(rows)}

The growth curve switches branch at an age that depends on the random effects, so the joint density is only
piecewise smooth and the marginal jumps as urchins cross the branch point: rounding the third theta to the 5
digits printed in the reference table gives AIC {aic_rounded:.4f} instead of 196.6543.

Maximum likelihood from the seed's start ({elapsed:.1f} s): **AIC {aic_hat:.4f}** (published 196.7140),
theta = {np.array2string(theta_hat, precision=5)}. Outer convergence: {status}. Warnings: {warned}.
The objective jumps as urchins switch branch, so optimisers stop at different AICs from different starts
(TMB's nlminb reports "false convergence" from this start). Our fit judges convergence on the exact gradient
of the marginal at the final point and reports it in `optimizer_result`; when it is not reached it warns and
records `success = False` rather than claiming convergence.

![urchin band](urchin_band.png)
"""


def main(out_dir: Path) -> str:
    out_dir.mkdir(parents=True, exist_ok=True)
    return "\n".join([cbpp_section(out_dir), two_site_section(out_dir), urchin_section(out_dir)])


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("out"))
    print(main(parser.parse_args().out))
