"""Integrated Laplace on the synthetic logistic random-intercept GLMM: pymc_laplace vs TMB, glmmTMB and glmer.

Run from the project root (R peers are run when ``Rscript`` and the packages TMB, glmmTMB and lme4 are present):

    python bench/bench_glmm.py [--groups 100 1000 10000 100000 1000000] [--repeats 3] [--no-r]
                               [--draws-up-to 10000] [--timeout 1200] [--max-memory-gb 12]

For each number of groups G, in a fresh process each time (``--worker``), it measures:

1. our fit (outer optimisation of the Laplace marginal with exact gradients) and our standard errors (Hessian of
   the marginal by differences of the exact gradient, random-effect SEs by the generalized delta method)
   separately, after compilation, with the peak resident memory (``ru_maxrss``) then;
2. for G <= ``--draws-up-to``, the whole user-facing call ``fit_integrated_laplace(model, random=["u"])`` with
   the default draws (4 chains x 1000) on a freshly built identical model (it compiles again: a new model is not
   the cached one), then a second call on that same model (cached: nothing compiled). Each reports its wall time
   and its attrs ``compile_seconds``, ``fit_seconds`` and ``draws_seconds``. Beyond, the draws alone would be
   4000 x G doubles (32 GB at G = 1e6), so the measurement is skipped with a note.

The peers are the reference scripts in ``../shared/reference/r`` run in the same session: the TMB hand template
``glmm_ri.cpp`` (MakeADFun + nlminb, and sdreport), glmmTMB and glmer, for G <= 10,000 (the shared CSVs). Larger
G are generated here with the recipe of ``gen_glmm.R`` (numpy's generator, so not the same draws; m = 10
observations per group: 10 million rows at G = 1e6); no peer runs them.

A worker that fails, runs out of memory (``--max-memory-gb`` caps its address space so that it fails with a
MemoryError rather than waking the kernel's OOM killer on a shared machine) or exceeds ``--timeout`` is reported
in the tables with the tail of its stderr; the rest of the benchmark goes on. The whole-process peak memory of
every worker (data, compilation and all) is read from ``wait4``, so it is known for a killed worker too.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PYMC_LAPLACE_SHARED", ROOT.parent / "shared"))

BETA_TRUE = (-0.5, 1.0, -1.0, 0.5, 0.25, 0.0)  # intercept, x1..x5 (gen_glmm.R)
SD_TRUE = 0.8
DEFAULT_CHAINS, DEFAULT_DRAWS = 4, 1000  # fit_integrated_laplace's defaults, as a user calls it
GENERATE_CHUNK = 1_000_000  # rows of the design generated at a time (no full-size temporary of x1..x5)

# the goals this benchmark reports against
GOAL_TMB_G, GOAL_TMB_RATIO = 10_000, 0.1  # fit + SEs <= 0.1x TMB's hand template (MakeADFun+nlminb+sdreport)
GOAL_DRAWS_G, GOAL_DRAWS_RATIO = 10_000, 1.0  # draws_seconds <= 1x fit_seconds of the user-facing call
GOAL_SCALE_G, GOAL_SCALE_SECONDS, GOAL_SCALE_MB = 1_000_000, 600.0, 8 * 1024.0  # compile + fit + SEs, peak RSS


def load_data(n_groups: int) -> tuple[Any, Any, Any]:
    """``design`` (N x 6, intercept first, float64, C order), ``y`` and 0-based ``group``.

    The shared CSV for G <= 10,000; beyond, data generated with gen_glmm.R's recipe (m = 10), writing the draws of
    x1..x5 straight into the design matrix so that it is the only copy of the covariates (480 MB at G = 1e6).
    """
    import numpy as np

    path = SHARED / "data" / f"glmm_G{n_groups}.csv"
    if path.exists():
        import pandas as pd

        d = pd.read_csv(path)
        design = np.empty((len(d), 6))
        design[:, 0] = 1.0
        design[:, 1:] = d[[f"x{i}" for i in range(1, 6)]].to_numpy(dtype=float)
        return design, d["y"].to_numpy(), d["group"].to_numpy() - 1
    rng = np.random.default_rng(1)
    m = 10
    n = n_groups * m
    design = np.empty((n, 6))
    design[:, 0] = 1.0
    # the same stream as rng.normal(size=(n, 5)) drawn at once (row-major), chunk by chunk
    for begin in range(0, n, GENERATE_CHUNK):
        end = min(begin + GENERATE_CHUNK, n)
        design[begin:end, 1:] = rng.standard_normal((end - begin, 5))
    b = rng.normal(0.0, SD_TRUE, size=n_groups)
    group = np.repeat(np.arange(n_groups), m)
    p = design @ np.array(BETA_TRUE)
    p += b[group]
    np.negative(p, out=p)
    np.exp(p, out=p)
    p += 1.0
    np.reciprocal(p, out=p)
    y = rng.binomial(1, p)
    return design, y, group


def build_model(design: Any, y: Any, group: Any, n_groups: int) -> Any:
    """The random-intercept logistic model; the data arrays enter the graph as they are (no copies)."""
    import numpy as np
    import pymc as pm
    import pytensor.tensor as pt

    with pm.Model(coords={"group": np.arange(n_groups)}) as model:
        beta = pm.Normal("beta", 0.0, 10.0, shape=6)
        sigma = pm.HalfNormal("sigma", 1.0)
        u = pm.Normal("u", 0.0, sigma, dims="group")
        pm.Bernoulli("y", logit_p=pt.dot(design, beta) + u[group], observed=y)
    return model


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _progress(n_groups: int, started: float, what: str) -> None:
    """A line on stderr per phase: the parent prints the tail of stderr when a worker fails or times out."""
    print(
        f"[worker G={n_groups} {time.perf_counter() - started:7.1f}s peak {_peak_rss_mb():6.0f} MB] {what}",
        file=sys.stderr,
        flush=True,
    )


def _emit(record: dict) -> None:
    """One JSON line on stdout per finished phase (the parent keeps the phases done before a failure)."""
    print(json.dumps(record), flush=True)


def worker(n_groups: int, draws_up_to: int) -> None:
    """One fresh-process measurement of pymc_laplace: prints a JSON line after each phase."""
    import gc

    import numpy as np

    import pymc_laplace
    from pymc_laplace import marginal
    from pymc_laplace._compat import get_group
    from pymc_laplace.integrated import OuterOptimizer

    started = time.perf_counter()
    load = os.getloadavg()
    design, y, group = load_data(n_groups)
    data_seconds = time.perf_counter() - started
    _progress(n_groups, started, f"data: {len(y)} rows, design {design.nbytes / 2**20:.0f} MB")
    record: dict[str, Any] = {"G": n_groups, "n_obs": len(y), "load_average": load, "data_seconds": data_seconds}
    _emit(record)

    # 1. fit and SEs, each timed after compilation
    t0 = time.perf_counter()
    model = build_model(design, y, group, n_groups)
    laplace = marginal(model, random=["u"])
    # compile every function now (they compile on first use), so that fit and SE times exclude compilation
    laplace.value_and_grad(laplace.compiled.theta_start)
    laplace.mode_jacobian(laplace.compiled.theta_start)
    laplace._warm_start = laplace.compiled.b_start.copy()
    laplace._last = None
    t1 = time.perf_counter()
    _progress(n_groups, started, f"compiled in {t1 - t0:.1f}s")
    optimizer = OuterOptimizer()
    outer = optimizer.maximize(laplace.value_and_grad, laplace.compiled.theta_start)
    t2 = time.perf_counter()
    _progress(n_groups, started, f"fitted in {t2 - t1:.1f}s ({outer.n_evaluations} evaluations)")
    covariance = np.linalg.inv(-outer.hessian)
    jac = laplace.mode_jacobian(outer.theta)
    solution = laplace.solve_inner(outer.theta)
    b_se = np.sqrt(solution.factor.diagonal_of_inverse() + np.einsum("ij,jk,ik->i", jac, covariance, jac))
    t3 = time.perf_counter()
    _progress(n_groups, started, f"SEs in {t3 - t2:.1f}s")
    record |= {
        "compile": t1 - t0,
        "fit": outer.wall_time,
        "fit_with_hessian": t2 - t1,
        "se": t3 - t2,
        "log_lik": outer.objective,
        "theta": outer.theta.tolist(),
        "se_log_sigma": float(np.sqrt(covariance[-1, -1])),
        "b_se_mean": float(b_se.mean()),
        "evaluations": outer.n_evaluations,
        "success": bool(outer.success),
        "peak_rss_mb": _peak_rss_mb(),
    }
    _emit(record)

    # 2. the user-facing call with the default draws: on a new identical model (compiles again), then once more
    if n_groups > draws_up_to:
        gb = DEFAULT_CHAINS * DEFAULT_DRAWS * n_groups * 8 / 1e9
        record["draws_skipped"] = (
            f"G > --draws-up-to {draws_up_to}: {DEFAULT_CHAINS * DEFAULT_DRAWS} draws of "
            f"{n_groups} random effects are {gb:.1f} GB of output"
        )
        _emit(record)
        return
    del laplace, solution, jac, model
    gc.collect()

    def user_call(model: Any, conditional: str | None = None) -> dict[str, float]:
        """The whole call, with the default ``conditional`` (auto) unless one is given."""
        chosen = {} if conditional is None else {"conditional": conditional}
        begin = time.perf_counter()
        result = pymc_laplace.fit_integrated_laplace(model, random=["u"], progressbar=False, random_seed=1, **chosen)
        wall = time.perf_counter() - begin
        fit = get_group(result, "fit")
        out = {
            "wall": wall,
            **{k: float(fit.attrs.get(k, float("nan"))) for k in ("compile_seconds", "fit_seconds", "draws_seconds")},
        }
        out["log_lik"] = float(fit["log_marginal_likelihood"].values)
        out["exact_draws"] = float(get_group(result, "posterior").attrs.get("conditional") == "exact")
        return out

    fresh_model = build_model(design, y, group, n_groups)
    record["call_fresh"] = user_call(fresh_model)
    _progress(n_groups, started, f"user-facing call on a new model in {record['call_fresh']['wall']:.1f}s")
    record["call_again"] = user_call(fresh_model)
    _progress(n_groups, started, f"user-facing call again in {record['call_again']['wall']:.1f}s")
    record["call_linear"] = user_call(fresh_model, conditional="linear")
    _progress(n_groups, started, f"user-facing call with conditional='linear' in {record['call_linear']['wall']:.1f}s")
    record["peak_rss_calls_mb"] = _peak_rss_mb()
    _emit(record)


def run_worker(n_groups: int, args: argparse.Namespace) -> dict:
    """One worker in a fresh process, with a timeout; its failure is returned in the record, never raised."""
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        str(n_groups),
        "--draws-up-to",
        str(args.draws_up_to),
        "--max-memory-gb",
        str(args.max_memory_gb),
    ]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        timed_out = False
        while True:  # wait4 rather than wait: it also gives the peak RSS of this child alone, killed or not
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - started > args.timeout:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                timed_out = True
                break
            time.sleep(0.25)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - started
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    record: dict[str, Any] = {}
    for line in stdout.splitlines():
        if line.startswith("{"):
            record = json.loads(line)  # each phase's line holds everything measured so far
    record.update({"G": n_groups, "worker_wall": wall, "worker_peak_rss_mb": usage.ru_maxrss / 1024.0})
    if timed_out:
        record["failure"] = f"timed out after {args.timeout:.0f}s (--timeout)"
    elif proc.returncode < 0:
        oom = " (out of memory?)" if proc.returncode == -9 else ""
        record["failure"] = f"killed by signal {-proc.returncode}{oom}"
    elif proc.returncode > 0:
        last = [ln for ln in stderr.strip().splitlines() if ln.strip()]
        record["failure"] = f"exit code {proc.returncode}: {last[-1][:200] if last else 'no stderr'}"
    if "failure" in record:
        record["stderr_tail"] = stderr[-3000:]
    return record


def run_ours(n_groups: int, args: argparse.Namespace) -> dict:
    """Medians over ``--repeats`` workers; a failed worker ends the repeats for this G."""
    runs = []
    for _ in range(args.repeats):
        record = run_worker(n_groups, args)
        runs.append(record)
        if "failure" in record:
            print(
                f"ours G={n_groups} FAILED: {record['failure']}; peak {record['worker_peak_rss_mb']:.0f} MB "
                f"after {record['worker_wall']:.0f}s. stderr tail:\n{record['stderr_tail']}",
                flush=True,
            )
            break
    done = [r for r in runs if "fit_with_hessian" in r] or runs[-1:]
    summary: dict[str, Any] = dict(runs[-1])
    for key in ("data_seconds", "compile", "fit", "fit_with_hessian", "se", "worker_wall"):
        if all(key in r for r in done):
            summary[key] = statistics.median(r[key] for r in done)
    for call in ("call_fresh", "call_again", "call_linear"):
        calls = [r[call] for r in done if call in r]
        if calls:
            summary[call] = {k: statistics.median(c[k] for c in calls) for k in calls[0]}
    for key in ("peak_rss_mb", "peak_rss_calls_mb", "worker_peak_rss_mb"):
        values = [r[key] for r in runs if key in r]
        if values:
            summary[key] = max(values)
    summary["failure"] = next((r["failure"] for r in runs if "failure" in r), None)
    summary["runs"] = len(runs)
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


def _fmt(value: float | None, width: int = 8, digits: int = 3) -> str:
    return f"{value:>{width}.{digits}f}" if value is not None else f"{'-':>{width}}"


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _goal(label: str, measured: str | None, met: bool | None) -> str:
    verdict = "not measured" if met is None else ("met" if met else "NOT met")
    return f"Goal: {label}: {measured + ' -> ' if measured else ''}{verdict}"


def report(ours: dict[int, dict], tmb: dict[int, dict], others: dict[int, dict], args: argparse.Namespace) -> list[str]:
    lines: list[str] = []
    sizes = list(args.groups)
    has_fit = {g: "fit_with_hessian" in ours[g] for g in sizes}
    total = {g: ours[g]["fit_with_hessian"] + ours[g]["se"] for g in sizes if has_fit[g]}
    tmb_total = {g: t["fit"] + t["se"] for g, t in tmb.items()}

    # goals first, each with what this run measured
    r = _ratio(total.get(GOAL_TMB_G), tmb_total.get(GOAL_TMB_G))
    lines.append(
        _goal(
            f"G = {GOAL_TMB_G:,} fit + SEs <= {GOAL_TMB_RATIO:g}x TMB's hand template (MakeADFun+nlminb+sdreport)",
            f"{r:.2f}x" if r is not None else None,
            None if r is None else r <= GOAL_TMB_RATIO,
        )
    )
    for call in ("call_fresh", "call_again", "call_linear"):
        c = ours.get(GOAL_DRAWS_G, {}).get(call)
        r = _ratio(c["draws_seconds"], c["fit_seconds"]) if c else None
        what = {"call_fresh": "new model", "call_again": "same model again", "call_linear": "conditional='linear'"}[
            call
        ]
        lines.append(
            _goal(
                f"G = {GOAL_DRAWS_G:,} draws_seconds <= {GOAL_DRAWS_RATIO:g}x fit_seconds (default draws, {what})",
                f"{r:.2f}x" if r is not None else None,
                None if r is None else r <= GOAL_DRAWS_RATIO,
            )
        )
    o = ours.get(GOAL_SCALE_G)
    if o is not None and has_fit[GOAL_SCALE_G]:
        seconds = o["compile"] + total[GOAL_SCALE_G]
        peak = o["worker_peak_rss_mb"]
        scale = (
            f"compile + fit + SEs {seconds:.0f}s, peak {peak:.0f} MB",
            seconds <= GOAL_SCALE_SECONDS and peak <= GOAL_SCALE_MB,
        )
    elif o is not None:
        scale = (f"{o['failure']} (peak {o['worker_peak_rss_mb']:.0f} MB after {o['worker_wall']:.0f}s)", False)
    else:
        scale = (None, None)
    lines.append(
        _goal(
            f"G = {GOAL_SCALE_G:,} ({GOAL_SCALE_G * 10:,} rows) compile + fit + SEs within "
            f"{GOAL_SCALE_SECONDS / 60:.0f} minutes and {GOAL_SCALE_MB / 1024:.0f} GB",
            *scale,
        )
    )

    # 1. fit + SEs beside the peers (the columns of earlier versions of this benchmark)
    lines += [
        "",
        "fit + SEs, compiled beforehand (seconds; ratio = ours sum / TMB sum)",
        f"{'G':>7} {'ours fit':>9} {'ours se':>8} {'ours sum':>9} {'TMB fit':>8} {'TMB se':>7} {'TMB sum':>8} "
        f"{'ratio':>6} {'glmmTMB':>8} {'glmer':>7} {'ours MB':>8} {'TMB MB':>7}  logLik ours / TMB",
    ]
    for g in sizes:
        o, t, p = ours[g], tmb.get(g), others.get(g, {})
        if not has_fit[g]:
            lines.append(f"{g:>7} FAILED: {o['failure']}; peak {o['worker_peak_rss_mb']:.0f} MB")
            continue
        lines.append(
            f"{g:>7} {o['fit_with_hessian']:>9.3f} {o['se']:>8.3f} {total[g]:>9.3f} "
            f"{_fmt(t['fit'] if t else None)} {_fmt(t['se'] if t else None, 7)} {_fmt(tmb_total.get(g))} "
            f"{_fmt(_ratio(total[g], tmb_total.get(g)), 6, 2)} "
            f"{_fmt(p['glmmTMB']['fit_and_se'] if p else None)} {_fmt(p['glmer']['fit_and_se'] if p else None, 7)} "
            f"{o['peak_rss_mb']:>8.0f} {_fmt(t['peak_rss_mb'] if t else None, 7, 0)}  "
            f"{o['log_lik']:.6f} / {t['log_lik'] if t else '-'}"
        )
    fitted = [g for g in sorted(sizes) if has_fit[g]]
    if len(fitted) >= 2:
        a, b = fitted[0], fitted[-1]
        lines.append(f"ours: time grows {total[b] / total[a]:.1f}x for {b / a:.0f}x the groups ({a} -> {b})")
    lines.append(
        "(ours fit = outer optimisation incl. the final Hessian of the marginal; se = covariance and "
        "random-effect SEs; compile time excluded; ours MB = peak RSS of the worker after fit + SEs)"
    )

    # 2. scale: the whole worker, compile included, and its peak memory
    lines += [
        "",
        "scale: each worker in a fresh process (seconds; peak RSS from wait4 for the whole worker)",
        f"{'G':>7} {'rows':>10} {'data':>7} {'compile':>8} {'fit+se':>8} {'c+f+se':>8} {'worker':>8} "
        f"{'evals':>5} {'peak MB':>8}  load avg at start / status",
    ]
    for g in sizes:
        o = ours[g]
        status = o["failure"] or "ok"
        load = "/".join(f"{v:.1f}" for v in o.get("load_average", ()))
        if has_fit[g]:
            lines.append(
                f"{g:>7} {o['n_obs']:>10} {o['data_seconds']:>7.1f} {o['compile']:>8.1f} {total[g]:>8.1f} "
                f"{o['compile'] + total[g]:>8.1f} {o['worker_wall']:>8.1f} {o['evaluations']:>5} "
                f"{o['worker_peak_rss_mb']:>8.0f}  {load} / {status}"
            )
        else:
            known = "n_obs" in o
            rows = f"{o['n_obs']:>10}" if known else f"{'-':>10}"
            data = f"{o['data_seconds']:>7.1f}" if known else f"{'-':>7}"
            lines.append(
                f"{g:>7} {rows} {data} {'-':>8} {'-':>8} {'-':>8} {o['worker_wall']:>8.1f} "
                f"{'-':>5} {o['worker_peak_rss_mb']:>8.0f}  {load or '-'} / {status}"
            )

    # 3. the user-facing call with the default draws
    lines += [
        "",
        f"fit_integrated_laplace(model, random=['u']) with the default draws ({DEFAULT_CHAINS} chains x "
        f"{DEFAULT_DRAWS}), seconds: on a new model (compiles), then again on the same model (cached)",
        f"{'G':>7} | {'new: wall':>9} {'compile':>8} {'fit':>7} {'draws':>7} {'d/f':>5} | "
        f"{'again: wall':>11} {'compile':>8} {'fit':>7} {'draws':>7} {'d/f':>5} | {'peak MB':>8}",
    ]
    for g in sizes:
        o = ours[g]
        fresh, again = o.get("call_fresh"), o.get("call_again")
        if fresh is None or again is None:
            note = o.get("draws_skipped") or (f"not measured: {o['failure']}" if o["failure"] else "not measured")
            lines.append(f"{g:>7} | skipped: {note}")
            continue
        cells = []
        for c, width in ((fresh, 9), (again, 11)):
            ratio = _fmt(_ratio(c["draws_seconds"], c["fit_seconds"]), 5, 2)
            cells.append(
                f"{c['wall']:>{width}.2f} {c['compile_seconds']:>8.2f} {c['fit_seconds']:>7.2f} "
                f"{c['draws_seconds']:>7.2f} {ratio}"
            )
        lines.append(f"{g:>7} | {cells[0]} | {cells[1]} | {o.get('peak_rss_calls_mb', float('nan')):>8.0f}")
    lines.append(
        "(compile/fit/draws = the result's attrs compile_seconds, fit_seconds, draws_seconds; d/f = "
        "draws_seconds / fit_seconds; peak MB = peak RSS of the worker after both calls)"
    )
    for g in sizes:
        drawn = [ours[g].get(call, {}).get("exact_draws") for call in ("call_fresh", "call_again")]
        if drawn[0] is not None:
            kinds = ["exact" if d else "linear" for d in drawn]
            lines.append(f"{g:>7}: conditional='auto' drew the random effects {kinds[0]} (new), {kinds[1]} (again)")
    for g in sizes:
        c = ours[g].get("call_linear")
        if c is not None:
            lines.append(
                f"{g:>7}: with conditional='linear' (the joint Gaussian, no inner solve per draw): wall "
                f"{c['wall']:.2f} s, fit {c['fit_seconds']:.2f} s, draws {c['draws_seconds']:.2f} s, d/f "
                f"{_fmt(_ratio(c['draws_seconds'], c['fit_seconds']), 5, 2)}"
            )

    # 4. ratios against TMB measured in this run
    lines += [
        "",
        "ratios to TMB's hand template in this run (TMB sum = MakeADFun+nlminb + sdreport; < 1 is faster)",
        f"{'G':>7} {'fit/TMB fit':>11} {'se/TMB se':>9} {'sum/TMB':>8} {'new call':>8} {'again':>7} "
        f"{'again fit':>9} {'glmmTMB':>8} {'glmer':>7}",
    ]
    for g in sizes:
        t, o, p = tmb.get(g), ours[g], others.get(g, {})
        if t is None:
            lines.append(f"{g:>7} (no TMB run at this G)")
            continue
        if not has_fit[g]:
            lines.append(f"{g:>7} FAILED: {o['failure']}")
            continue
        fresh, again = o.get("call_fresh"), o.get("call_again")
        lines.append(
            f"{g:>7} {_fmt(_ratio(o['fit_with_hessian'], t['fit']), 11, 3)} {_fmt(_ratio(o['se'], t['se']), 9, 3)} "
            f"{_fmt(_ratio(total[g], tmb_total[g]), 8, 3)} "
            f"{_fmt(_ratio(fresh['wall'], tmb_total[g]) if fresh else None, 8, 2)} "
            f"{_fmt(_ratio(again['wall'], tmb_total[g]) if again else None, 7, 2)} "
            f"{_fmt(_ratio(again['fit_seconds'], tmb_total[g]) if again else None, 9, 3)} "
            f"{_fmt(_ratio(p['glmmTMB']['fit_and_se'], tmb_total[g]) if p else None, 8, 2)} "
            f"{_fmt(_ratio(p['glmer']['fit_and_se'], tmb_total[g]) if p else None, 7, 2)}"
        )
    lines.append(
        "(new call / again = wall time of the user-facing call with 4000 draws; again fit = its "
        "fit_seconds; glmmTMB and glmer = their fit with SEs)"
    )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--groups", type=int, nargs="+", default=[100, 1000, 10000, 100000, 1000000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-r", action="store_true", help="skip the R peers")
    parser.add_argument(
        "--draws-up-to",
        type=int,
        default=10000,
        metavar="G",
        help="measure the user-facing call with the default 4000 draws only for G <= this",
    )
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds allowed per worker process")
    parser.add_argument(
        "--max-memory-gb", type=float, default=12.0, help="address-space limit of each worker (0: none)"
    )
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        if args.max_memory_gb > 0:
            limit = int(args.max_memory_gb * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        worker(args.worker, args.draws_up_to)
        return

    header = [
        f"bench_glmm {datetime.datetime.now():%Y-%m-%d %H:%M}; {os.cpu_count()} CPUs; load average "
        f"{tuple(round(v, 2) for v in os.getloadavg())} at start"
    ]
    print(header[0], flush=True)
    ours = {}
    for n_groups in args.groups:
        ours[n_groups] = o = run_ours(n_groups, args)
        if "fit_with_hessian" in o:
            print(
                f"ours G={n_groups}: data {o['data_seconds']:.1f}s compile {o['compile']:.2f}s fit "
                f"{o['fit']:.3f}s se {o['se']:.3f}s logLik {o['log_lik']:.6f} peak {o['worker_peak_rss_mb']:.0f} MB"
                f" worker {o['worker_wall']:.0f}s",
                flush=True,
            )
    tmb, others = {}, {}
    if not args.no_r and r_available():
        with tempfile.TemporaryDirectory() as tmp:
            scratch = Path(tmp)
            tmb = run_tmb(scratch, args.repeats)
            for n_groups in [g for g in args.groups if g <= 10000]:
                others[n_groups] = run_glmm_peers(scratch, n_groups, args.repeats)
    elif not args.no_r:
        header.append("R with TMB, glmmTMB and lme4 not found: peers skipped (apt-get install r-cran-tmb ...)")
    header.append(f"load average {tuple(round(v, 2) for v in os.getloadavg())} at end")
    text = "\n".join(header + report(ours, tmb, others, args))
    print(text)
    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"glmm_{datetime.datetime.now():%Y%m%d_%H%M}"
    stem.with_suffix(".txt").write_text(text + "\n")
    raw = {"args": vars(args), "ours": ours, "tmb": tmb, "peers": others}
    stem.with_suffix(".json").write_text(json.dumps(raw, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
