"""Integrated Laplace on the synthetic logistic random-intercept GLMM: pymc_laplace vs TMB, glmmTMB and glmer.

Run from the project root (R peers are run when ``Rscript`` and the packages TMB, glmmTMB and lme4 are present):

    python bench/bench_glmm.py [--groups 100 1000 10000 100000] [--repeats 3] [--no-r]

For each number of groups G, in a fresh process each time, it times our fit (outer optimisation of the Laplace
marginal with exact gradients) and our standard errors (Hessian of the marginal by differences of the exact
gradient, random-effect SEs by the generalized delta method) separately, after compilation, and records the
peak resident memory. The peers are the reference scripts in ``../shared/reference/r`` run in the same session:
the TMB hand template ``glmm_ri.cpp`` (MakeADFun + nlminb, and sdreport), glmmTMB and glmer. G = 100,000 is
generated here with the recipe of ``gen_glmm.R`` (numpy's generator, so not the same draws); no peer runs it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PYMC_LAPLACE_SHARED", ROOT.parent / "shared"))


def load_data(n_groups: int):
    """The shared CSV for G <= 10,000; generated data (gen_glmm.R's recipe, m = 10) beyond."""
    import numpy as np
    import pandas as pd

    path = SHARED / "data" / f"glmm_G{n_groups}.csv"
    if path.exists():
        d = pd.read_csv(path)
        X = d[[f"x{i}" for i in range(1, 6)]].to_numpy()
        return X, d["y"].to_numpy(), d["group"].to_numpy() - 1
    rng = np.random.default_rng(1)
    m = 10
    n = n_groups * m
    X = rng.normal(size=(n, 5))
    b = rng.normal(0.0, 0.8, size=n_groups)
    group = np.repeat(np.arange(n_groups), m)
    eta = -0.5 + X @ np.array([1.0, -1.0, 0.5, 0.25, 0.0]) + b[group]
    y = rng.binomial(1, 1.0 / (1.0 + np.exp(-eta)))
    return X, y, group


def worker(n_groups: int) -> dict:
    """One fresh-process measurement of pymc_laplace (prints a JSON line)."""
    import resource

    import numpy as np
    import pymc as pm
    import pytensor.tensor as pt

    from pymc_laplace import marginal
    from pymc_laplace.integrated import OuterOptimizer

    X, y, group = load_data(n_groups)
    design = np.column_stack([np.ones(len(y)), X])
    t0 = time.perf_counter()
    with pm.Model(coords={"group": np.arange(n_groups)}) as model:
        beta = pm.Normal("beta", 0.0, 10.0, shape=6)
        sigma = pm.HalfNormal("sigma", 1.0)
        u = pm.Normal("u", 0.0, sigma, dims="group")
        pm.Bernoulli("y", logit_p=pt.dot(design, beta) + u[group], observed=y)
    laplace = marginal(model, random=["u"])
    # compile every function now (they compile on first use), so that fit and SE times exclude compilation
    laplace.value_and_grad(laplace.compiled.theta_start)
    laplace.mode_jacobian(laplace.compiled.theta_start)
    laplace._warm_start = laplace.compiled.b_start.copy()
    laplace._last = None
    t1 = time.perf_counter()
    optimizer = OuterOptimizer()
    outer = optimizer.maximize(laplace.value_and_grad, laplace.compiled.theta_start)
    t2 = time.perf_counter()
    covariance = np.linalg.inv(-outer.hessian)
    jac = laplace.mode_jacobian(outer.theta)
    solution = laplace.solve_inner(outer.theta)
    b_se = np.sqrt(solution.factor.diagonal_of_inverse() + np.einsum("ij,jk,ik->i", jac, covariance, jac))
    t3 = time.perf_counter()
    return {
        "G": n_groups,
        "compile": t1 - t0,
        "fit": outer.wall_time,
        "fit_with_hessian": t2 - t1,
        "se": t3 - t2,
        "log_lik": outer.objective,
        "theta": outer.theta.tolist(),
        "se_log_sigma": float(np.sqrt(covariance[-1, -1])),
        "b_se_mean": float(b_se.mean()),
        "evaluations": outer.n_evaluations,
        "success": outer.success,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
    }


def run_ours(n_groups: int, repeats: int) -> dict:
    runs = []
    for _ in range(repeats):
        out = subprocess.run(
            [sys.executable, __file__, "--worker", str(n_groups)], capture_output=True, text=True, cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
        if out.returncode != 0:
            raise RuntimeError(f"worker G={n_groups} failed:\n{out.stderr[-3000:]}")
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    summary = {k: statistics.median(r[k] for r in runs) for k in ("compile", "fit", "fit_with_hessian", "se")}
    summary.update({k: runs[-1][k] for k in ("log_lik", "theta", "se_log_sigma", "success", "evaluations")})
    summary["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
    return summary


def r_available() -> bool:
    if shutil.which("Rscript") is None:
        return False
    probe = subprocess.run(
        ["Rscript", "-e", "suppressPackageStartupMessages({library(TMB); library(glmmTMB); library(lme4)})"],
        capture_output=True,
    )
    return probe.returncode == 0


def run_tmb(scratch: Path, repeats: int) -> dict[int, dict]:
    """tmb_glmm.R: MakeADFun+nlminb and sdreport medians for G = 100, 1000, 10000 (peak memory of R)."""
    for name in ("tmb_glmm.R", "glmm_ri.cpp"):
        shutil.copy(SHARED / "reference" / "r" / name, scratch / name)
    out = _run_r(["Rscript", "tmb_glmm.R", "TMBad", str(repeats)], scratch)
    results: dict[int, dict] = {}
    for block in re.split(r"==== TMB hand template, ", out.stdout)[1:]:
        n_groups = int(re.match(r"G=(\d+)", block).group(1))
        fit = float(re.search(r"MakeADFun\+nlminb\s+median: ([\d.]+)", block).group(1))
        sd = float(re.search(r"sdreport\s+median: ([\d.]+)", block).group(1))
        loglik = float(re.search(r"logLik = (-?[\d.]+)", block).group(1))
        results[n_groups] = {"fit": fit, "se": sd, "log_lik": loglik, "peak_rss_mb": out.peak_rss_mb}
    return results


def run_glmm_peers(scratch: Path, n_groups: int, repeats: int) -> dict[str, dict]:
    shutil.copy(SHARED / "reference" / "r" / "fit_glmm.R", scratch / "fit_glmm.R")
    reps = "1" if n_groups >= 10000 else str(repeats)
    out = _run_r(["Rscript", "fit_glmm.R", str(n_groups), reps, reps], scratch)
    results = {}
    for name, key in (("glmer", "glmer Laplace"), ("glmmTMB", "glmmTMB")):
        block = out.stdout.split(key, 1)[1]
        time_s = float(re.search(r"wall time median of \d+ = ([\d.]+)", block).group(1))
        loglik = float(re.search(r"logLik = (-?[\d.]+)", block).group(1))
        results[name] = {"fit_and_se": time_s, "log_lik": loglik}
    return results


class _ROutput:
    def __init__(self, stdout: str, peak_rss_mb: float) -> None:
        self.stdout, self.peak_rss_mb = stdout, peak_rss_mb


def _run_r(cmd: list[str], scratch: Path) -> _ROutput:
    env = {**os.environ, "DATA": str(SHARED / "data")}
    timed = ["/usr/bin/time", "-v", *cmd] if Path("/usr/bin/time").exists() else cmd
    proc = subprocess.run(timed, capture_output=True, text=True, cwd=scratch, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    return _ROutput(proc.stdout, int(match.group(1)) / 1024.0 if match else float("nan"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--groups", type=int, nargs="+", default=[100, 1000, 10000, 100000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-r", action="store_true", help="skip the R peers")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        print(json.dumps(worker(args.worker)))
        return

    lines = [f"bench_glmm {datetime.datetime.now():%Y-%m-%d %H:%M}; load average {os.getloadavg()}"]
    ours = {}
    for n_groups in args.groups:
        ours[n_groups] = run_ours(n_groups, args.repeats)
        o = ours[n_groups]
        print(f"ours G={n_groups}: compile {o['compile']:.2f}s fit {o['fit']:.3f}s se {o['se']:.3f}s "
              f"logLik {o['log_lik']:.6f} peak {o['peak_rss_mb']:.0f} MB", flush=True)  # fmt: skip
    tmb, others = {}, {}
    if not args.no_r and r_available():
        with tempfile.TemporaryDirectory() as tmp:
            scratch = Path(tmp)
            tmb = run_tmb(scratch, args.repeats)
            for n_groups in [g for g in args.groups if g <= 10000]:
                others[n_groups] = run_glmm_peers(scratch, n_groups, args.repeats)
    elif not args.no_r:
        lines.append("R with TMB, glmmTMB and lme4 not found: peers skipped (apt-get install r-cran-tmb ...)")

    header = f"{'G':>7} {'ours fit':>9} {'ours se':>8} {'ours sum':>9} {'TMB fit':>8} {'TMB se':>7} {'TMB sum':>8} " \
             f"{'ratio':>6} {'glmmTMB':>8} {'glmer':>7} {'ours MB':>8} {'TMB MB':>7}  logLik ours / TMB"  # fmt: skip
    lines += ["Goal: ours fit + SEs faster than TMB's hand template at G = 10,000; time linear in G.", header]
    for n_groups in args.groups:
        o = ours[n_groups]
        ours_total = o["fit_with_hessian"] + o["se"]
        t = tmb.get(n_groups)
        p = others.get(n_groups, {})
        fmt = lambda v, w=8, d=3: f"{v:>{w}.{d}f}" if v is not None else f"{'-':>{w}}"  # noqa: E731
        tmb_total = t["fit"] + t["se"] if t else None
        lines.append(
            f"{n_groups:>7} {o['fit_with_hessian']:>9.3f} {o['se']:>8.3f} {ours_total:>9.3f} "
            f"{fmt(t['fit'] if t else None)} {fmt(t['se'] if t else None, 7)} {fmt(tmb_total)} "
            f"{fmt(ours_total / tmb_total if t else None, 6, 2)} "
            f"{fmt(p['glmmTMB']['fit_and_se'] if p else None)} {fmt(p['glmer']['fit_and_se'] if p else None, 7)} "
            f"{o['peak_rss_mb']:>8.0f} {fmt(t['peak_rss_mb'] if t else None, 7, 0)}  "
            f"{o['log_lik']:.6f} / {t['log_lik'] if t else '-'}"
        )
    sizes = sorted(args.groups)
    if len(sizes) >= 2:
        a, b = sizes[0], sizes[-1]
        growth = (ours[b]["fit_with_hessian"] + ours[b]["se"]) / (ours[a]["fit_with_hessian"] + ours[a]["se"])
        lines.append(f"ours: time grows {growth:.1f}x for {b / a:.0f}x the groups ({a} -> {b})")
    lines.append("(ours fit = outer optimisation incl. the final Hessian of the marginal; se = covariance and "
                 "random-effect SEs; compile time excluded and listed per run above)")  # fmt: skip
    text = "\n".join(lines)
    print(text)
    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"glmm_{datetime.date.today():%Y%m%d}.txt").write_text(text + "\n")


if __name__ == "__main__":
    main()
