"""Bayesian fits beside full-model NUTS, and adaptive quadrature beside lme4's, measured in the same run.

    python bench/bench_bayes.py [--models three_layer cbpp urchin] [--no-r] [--no-aghq]

Each (model, method) runs in a fresh Python process and reports the whole call, compilation included (imports
excluded):

* ``nuts_full``: ``pm.sample`` on the full model (random effects sampled), 2 chains x 1,000 draws after 1,000 tuning
  steps, chains in 2 processes;
* ``nuts_theta``: ``sample_integrated`` (NUTS over the outer parameters on their Laplace marginal posterior), the
  same settings;
* ``grid`` / ``ccd``: ``fit_integrated_laplace(method="grid" | "ccd")`` with 2 x 1,000 draws.

For the NUTS runs the bulk ESS of every outer parameter is computed by ArviZ; ESS per second uses the smallest.
The posterior mean and SD of each outer parameter are printed side by side, with the warnings each run raised (on
the urchin model Laplace is far off where its priors put the posterior, and the runs say so).
Then AGHQ with 25 nodes on cbpp: one evaluation of our ``block_quadrature`` (warm) against one evaluation of lme4's
``glmer(nAGQ = 25, devFunOnly = TRUE)`` deviance function, and a whole ``glmer(nAGQ = 25)`` fit for scale.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "tests"))
OUTER = {
    "three_layer": ["mu", "tau", "sigma"],
    "cbpp": ["beta", "sigma"],
    "urchin": ["log_omega", "mu_g", "sig_g", "mu_p", "sig_p", "sigma"],
}
# methods per model besides the two NUTS runs
INTEGRATION = {"three_layer": "grid", "cbpp": "ccd", "urchin": "ccd"}


def build(name: str):
    if name == "three_layer":
        from test_sampling import gaussian_model

        return gaussian_model(), ["u"]
    if name == "urchin":
        from random_effects import urchin_model

        return urchin_model(), ["log_g", "log_p"]
    import mixed_models

    return mixed_models.BUILDERS[name]()


def worker(name: str, method: str) -> dict:
    warnings.simplefilter("ignore")
    import arviz as az
    import numpy as np
    import pymc as pm

    import pymc_laplace
    from pymc_laplace import get_group

    model, random = build(name)
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        if method == "nuts_full":
            result = pm.sample(draws=1000, tune=1000, chains=2, cores=2, random_seed=1, progressbar=False,
                               model=model, target_accept=0.9, compute_convergence_checks=False)  # fmt: skip
        elif method == "nuts_theta":
            result = pymc_laplace.sample_integrated(model, random=random, draws=1000, tune=1000, chains=2, cores=2,
                                                    random_seed=1, progressbar=False, target_accept=0.9)  # fmt: skip
        else:
            result = pymc_laplace.fit_integrated_laplace(model, random=random, method=method, draws=1000, chains=2,
                                                         random_seed=1, progressbar=False)  # fmt: skip
    elapsed = time.perf_counter() - start
    posterior = get_group(result, "posterior")
    out = {"seconds": elapsed, "means": {}, "sds": {}}
    out["warnings"] = sorted({f"{w.category.__name__}: {str(w.message)[:110]}" for w in said
                              if w.category.__name__ in ("ApproximationWarning", "UserWarning")})  # fmt: skip
    for var in OUTER[name]:
        values = np.asarray(posterior[var].values).reshape(2, 1000, -1)
        out["means"][var] = [float(v) for v in values.mean(axis=(0, 1))]
        out["sds"][var] = [float(v) for v in values.std(axis=(0, 1))]
        if method.startswith("nuts"):
            ess = [float(az.ess(values[..., k], method="bulk")) for k in range(values.shape[-1])]
            out.setdefault("ess", []).extend(ess)
            out.setdefault("rhat", []).extend(float(az.rhat(values[..., k])) for k in range(values.shape[-1]))
    if "ess" in out:
        out["min_ess"] = min(out["ess"])
        out["ess_per_second"] = out["min_ess"] / elapsed
        out["max_rhat"] = max(out["rhat"])
    return out


def run(args: list[str], timeout: float = 1800) -> dict | None:
    try:
        proc = subprocess.run(
            [sys.executable, __file__, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT
        )
    except subprocess.TimeoutExpired:
        print(f"{' '.join(args)}: not done in {timeout:.0f} s", file=sys.stderr)
        return {"timeout": timeout}
    for line in proc.stdout.splitlines()[::-1]:
        if line.startswith("{"):
            return json.loads(line)
    print(proc.stderr[-2000:], file=sys.stderr)
    return None


def aghq_ours() -> dict:
    warnings.simplefilter("ignore")
    import mixed_models
    import numpy as np

    from pymc_laplace import marginal
    from pymc_laplace.inner.quadrature import block_quadrature

    model, random = mixed_models.cbpp()
    start = time.perf_counter()
    laplace = marginal(model, random=random)
    theta = np.array([-1.39922373, -0.99140888, -1.12780959, -1.57948095, np.log(0.64751991)])
    first = block_quadrature(laplace, theta, 25)
    first_seconds = time.perf_counter() - start
    times = []
    for _ in range(20):
        t = time.perf_counter()
        value = block_quadrature(laplace, theta + 1e-3 * np.random.default_rng(len(times)).normal(size=5), 25)
        times.append(time.perf_counter() - t)
    return {
        "first": first_seconds,
        "eval": float(np.median(times)),
        "loglik": first.log_marginal,
        "unused": value.n_nodes,
    }


R_AGHQ = r"""
suppressPackageStartupMessages(library(lme4))
d <- read.csv(file.path("examples", "data", "cbpp.csv")); d$herd <- factor(d$herd); d$period <- factor(d$period)
f <- cbind(incidence, size - incidence) ~ period + (1 | herd)
t0 <- Sys.time(); fit <- glmer(f, d, binomial, nAGQ = 25); whole <- as.numeric(Sys.time() - t0, units = "secs")
dev <- glmer(f, d, binomial, nAGQ = 25, devFunOnly = TRUE)
p <- c(0.64751991, -1.39922373, -0.99140888, -1.12780959, -1.57948095)
times <- sapply(1:20, function(i) {
  t <- Sys.time(); dev(p + 1e-3 * rnorm(5)); as.numeric(Sys.time() - t, units = "secs")
})
cat(sprintf('{"whole": %.6f, "eval": %.6f}\n', whole, median(times)))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(OUTER))
    parser.add_argument("--no-aghq", action="store_true", help="skip the AGHQ comparison with glmer")
    parser.add_argument("--no-r", action="store_true")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--aghq-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker)))
        return
    if args.aghq_worker:
        print(json.dumps(aghq_ours()))
        return
    lines = [f"bench_bayes {datetime.datetime.now():%Y-%m-%d %H:%M}, load average {os.getloadavg()}", ""]
    lines += ["| model | method | whole call s | min bulk ESS | max R-hat | ESS/s | ESS/s vs full NUTS "
              "| time vs full NUTS |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    results = {}
    for name in args.models:
        for method in ("nuts_full", "nuts_theta", INTEGRATION[name]):
            results[(name, method)] = r = run(["--worker", name, method])
            print(name, method, r, flush=True)
        full = results[(name, "nuts_full")]
        full = full if full and "timeout" not in full else None
        for method in ("nuts_full", "nuts_theta", "grid", "ccd"):
            r = results.get((name, method))
            if not r:
                continue
            if "timeout" in r:
                lines.append(f"| {name} | {method} | > {r['timeout']:.0f} (cut short) | - | - | - | - | - |")
                continue
            eps = r.get("ess_per_second")
            ratio = f"{eps / full['ess_per_second']:.2f}" if eps and full and full.get("ess_per_second") else "-"
            time_ratio = f"{r['seconds'] / full['seconds']:.2f}" if full else "-"
            lines.append(
                f"| {name} | {method} | {r['seconds']:.1f} | {r.get('min_ess', float('nan')):.0f} | "
                f"{r.get('max_rhat', float('nan')):.3f} | {eps if eps else float('nan'):.1f} | {ratio} | {time_ratio} |"
            )
    lines += ["", "Posterior mean (SD) of the outer parameters, first component of a vector:", "",
              "| model | parameter | nuts_full | nuts_theta | grid / ccd |", "|---|---|---|---|---|"]  # fmt: skip
    for name in args.models:
        for var in OUTER[name]:
            cells = []
            for method in ("nuts_full", "nuts_theta", INTEGRATION[name]):
                r = results.get((name, method))
                cells.append(f"{r['means'][var][0]:.3f} ({r['sds'][var][0]:.3f})" if r and "means" in r else "-")
            lines.append(f"| {name} | {var} | " + " | ".join(cells) + " |")
    lines += ["", "Warnings raised by each run:", ""]
    for (name, method), r in results.items():
        for text in (r or {}).get("warnings", []):
            lines.append(f"- {name} {method}: {text}")
    text = "\n".join(lines)
    if args.no_aghq:
        print(text)
        return _save(text)
    ours = run(["--aghq-worker"])
    lines += ["", "| cbpp, 25 nodes | ours | glmer |", "|---|---|---|"]
    peer = None
    if not args.no_r and shutil.which("Rscript"):
        proc = subprocess.run(["Rscript", "-e", R_AGHQ], capture_output=True, text=True, cwd=ROOT)
        peer = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else None
    if ours:
        lines.append(
            f"| one evaluation of the log likelihood (warm) | {ours['eval'] * 1e3:.2f} ms | "
            + (f"{peer['eval'] * 1e3:.2f} ms (ratio {ours['eval'] / peer['eval']:.2f}) |" if peer else "- |")
        )
        lines.append(
            f"| first evaluation incl. compiling / whole glmer fit | {ours['first']:.2f} s | "
            + (f"{peer['whole']:.2f} s |" if peer else "- |")
        )
        lines.append(f"| log likelihood at glmer's nAGQ=25 estimates | {ours['loglik']:.6f} | -91.983369 (exact) |")
    text = "\n".join(lines)
    print(text)
    _save(text)


def _save(text: str) -> None:
    out = ROOT / "bench" / "results" / f"bayes_{datetime.datetime.now():%Y%m%d_%H%M}.txt"
    out.parent.mkdir(exist_ok=True)
    out.write_text(text + "\n")


if __name__ == "__main__":
    main()
