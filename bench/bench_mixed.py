"""Integrated Laplace on real mixed-model data sets beside glmmTMB and lme4, measured in the same run.

Run from the project root (the R peers run when ``Rscript`` with glmmTMB and lme4 is present):

    python bench/bench_mixed.py [--datasets cbpp sleepstudy ...] [--timeout 1800] [--no-r] [--no-colors]

Data sets (default all): cbpp, penicillin, grouseticks, salamanders, sleepstudy (``BUILDERS`` of
``examples/mixed_models.py``) and the larger verbagg (340 random effects, 7,584 binary answers) and insteval
(4,114 random effects, 73,421 ratings) (``LARGE_BUILDERS``); the CSVs are in ``examples/data``.

Each measurement runs in a fresh process, killed after ``--timeout`` seconds and then reported as a timeout:

* ours: ``fit_integrated_laplace(model, random=random, progressbar=False, random_seed=1)`` (default draws)
  timed as a whole ("first"), then the same on a freshly built identical model in the same process
  ("second"). Two such processes run per data set, sharing a directory of compiled functions that starts
  empty: the first process compiles everything ("cold"), the second loads what the first kept on disk, as a
  user's next session would; its calls are the ones compared with the goals. Imports and model construction
  are timed apart and excluded. pytensor's own cache of compiled C modules is read whole (every module's key) the
  first time a process compiles or loads a function, at a cost that grows with the number of modules it holds
  (5.0 s for 4,217 keys on the machine of the results in ``bench/results``): by default (``--compiledir fresh``)
  both processes of a data set share a pytensor compile directory that starts empty, as for a user whose
  pytensor cache holds this model's modules only; ``--compiledir default`` uses the machine's own, whatever it
  holds. The number of modules in it is printed. The fit's own
  ``compile_seconds``/``fit_seconds``/``draws_seconds`` attributes are reported when the result has them,
  and the number of colours of the random-effect Hessian (``marginal(...).compiled.colors``), computed after
  the timed calls on a third copy of the model (``--no-colors`` skips it).
* glmmTMB and lme4: ``bench/peers_mixed.R``, one ``Rscript`` process per peer, the same model on the same CSV
  fitted twice (package loading and CSV reading excluded).

Prints a table of times, the ratios ours / glmmTMB and the logLik difference ours - glmmTMB, and writes it
(text and JSON) to ``bench/results/``. Goals: first call <= 2x glmmTMB and second call <= 1x; verbagg and
insteval <= 1x for both.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ["cbpp", "penicillin", "grouseticks", "salamanders", "sleepstudy", "verbagg", "insteval"]
LARGE = {"verbagg", "insteval"}
FIT_ATTRS = ("compile_seconds", "fit_seconds", "draws_seconds")
NO_BLAS = "PyTensor could not link to a BLAS"


def _emit(record: dict) -> None:
    """One JSON line per finished stage, so that a killed worker still reports what it did."""
    print(json.dumps(record), flush=True)


def _fit_attrs(result) -> dict:
    """The timing attributes of a result, from the fit or posterior group (or the result itself)."""
    from pymc_laplace._compat import get_group

    found = {}
    sources = []
    for group in ("fit", "posterior"):
        try:
            sources.append(get_group(result, group).attrs)
        except (KeyError, AttributeError):
            pass
    sources.append(getattr(result, "attrs", {}) or {})
    for attrs in sources:
        for key in FIT_ATTRS:
            if key in attrs and key not in found:
                found[key] = float(attrs[key])
    return found


def worker(name: str, colors: bool) -> None:
    """Fresh-process measurement of our fit; prints JSON lines (the last one holds everything)."""
    t0 = time.perf_counter()
    import numpy as np

    import pymc_laplace
    from pymc_laplace._compat import get_group

    sys.path.insert(0, str(ROOT / "examples"))
    import mixed_models

    builders = {**mixed_models.BUILDERS, **mixed_models.LARGE_BUILDERS}
    record: dict = {"data": name, "import_s": time.perf_counter() - t0}
    _emit(record)

    def build():
        start = time.perf_counter()
        model, random = builders[name]()
        return model, random, time.perf_counter() - start

    for call in ("first", "second"):
        model, random, build_s = build()
        if call == "first":  # from the coords and the data: nothing compiled before the timed call
            record["n_random"] = int(
                sum(np.prod([len(model.coords[d]) for d in model.named_vars_to_dims[r]]) for r in random)
            )
            observed = [model.rvs_to_values[rv] for rv in model.observed_RVs]
            record["n_obs"] = int(sum(np.size(v.data if hasattr(v, "data") else v.get_value()) for v in observed))
        record[f"build_{call}_s"] = build_s
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            start = time.perf_counter()
            _emit(record | {"running": call, "running_since_s": start - t0})
            result = pymc_laplace.fit_integrated_laplace(model, random=random, progressbar=False, random_seed=1)
            record[f"{call}_s"] = time.perf_counter() - start
        record[f"logLik_{call}"] = float(get_group(result, "fit")["log_marginal_likelihood"])
        record[f"attrs_{call}"] = _fit_attrs(result)
        messages = {str(w.message).strip().splitlines()[0] for w in caught}
        if any(m.startswith(NO_BLAS) for m in messages):
            record["no_blas"] = True
        record[f"warnings_{call}"] = sorted(m.split(":")[0][:100] for m in messages if not m.startswith(NO_BLAS))
        if call == "first":
            import pytensor

            record["c_modules"] = sum(1 for entry in Path(pytensor.config.compiledir).glob("tmp*/key.pkl"))
        _emit(record)
    if colors:
        model, random, _ = build()
        start = time.perf_counter()
        _emit(record | {"running": "colours", "running_since_s": start - t0})
        laplace = pymc_laplace.marginal(model, random=random)
        record["n_colors"] = int(laplace.compiled.colors.max()) + 1 if laplace.compiled.colors.size else 0
        record["colors_s"] = time.perf_counter() - start
        _emit(record)


def run_process(cmd: list[str], timeout: float, env: dict | None = None) -> dict:
    """Run ``cmd`` in its own process group; the last JSON line of its output, plus status and wall time.

    On timeout the whole group (the process and what it started, e.g. compilers) is killed and the last line
    it printed before is kept, with ``status = "timeout"``.
    """
    process_start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env, start_new_session=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
        status = "ok" if proc.returncode == 0 else "error"
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        stdout, stderr = proc.communicate()
        status = "timeout"
    record: dict = {}
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{"):
            try:
                record = json.loads(line)
                break
            except json.JSONDecodeError:
                continue
    record["status"] = status
    record["wall_s"] = time.perf_counter() - process_start
    if status == "timeout" and "running" in record:
        # the call that was cut short ran at least this long (the worker's clock starts after the process's)
        record[f"{record['running']}_s_at_least"] = record["wall_s"] - record["running_since_s"]
    if status == "error":
        record["error"] = stderr.strip()[-2000:]
    return record


def run_ours(name: str, timeout: float, colors: bool, cache_dir: Path, compiledir: Path | None) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name]
    if not colors:
        cmd.append("--no-colors")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYMC_LAPLACE_CACHE_DIR": str(cache_dir)}
    if compiledir is not None:
        flags = [f for f in env.get("PYTENSOR_FLAGS", "").split(",") if f and not f.startswith("base_compiledir")]
        env["PYTENSOR_FLAGS"] = ",".join([*flags, f"base_compiledir={compiledir}"])
    return run_process(cmd, timeout, env=env)


def run_peer(name: str, peer: str, timeout: float) -> dict:
    script = ROOT / "bench" / "peers_mixed.R"
    return run_process(["Rscript", str(script), name, peer], timeout,
                       env={**os.environ, "DATA": str(ROOT / "examples" / "data")})  # fmt: skip


def r_available() -> bool:
    if shutil.which("Rscript") is None:
        return False
    probe = subprocess.run(
        ["Rscript", "-e", "suppressPackageStartupMessages({library(glmmTMB); library(lme4); library(jsonlite)})"],
        capture_output=True,
    )
    return probe.returncode == 0


def _seconds(record: dict | None, key: str) -> str:
    """A time, or why there is none ("timeout", "error", "-")."""
    if record is None:
        return "-"
    if key in record:
        return f"{record[key]:.2f}"
    if f"{key}_at_least" in record:
        return f">{record[f'{key}_at_least']:.0f}"
    return record.get("status", "-") if record.get("status") != "ok" else "-"


def _ratio(a: dict | None, b: dict | None, key: str) -> str:
    if a is None or b is None:
        return "-"
    if key in a and key in b and b[key] > 0:
        return f"{a[key] / b[key]:.2f}"
    if f"{key}_at_least" in a and key in b and b[key] > 0:
        return f">{a[f'{key}_at_least'] / b[key]:.0f}"
    return "-"


def _goal(name: str, ours: dict, tmb: dict | None) -> str:
    if tmb is None or "first_s" not in tmb or "second_s" not in tmb:
        return "-"
    first_goal, second_goal = (1.0, 1.0) if name in LARGE else (2.0, 1.0)
    if "first_s" not in ours:
        return "miss"
    ok = ours["first_s"] <= first_goal * tmb["first_s"]
    if "second_s" in ours:
        ok = ok and ours["second_s"] <= second_goal * tmb["second_s"]
    else:
        return "miss"
    return "met" if ok else "miss"


def table(results: dict[str, dict], timeout: float) -> list[str]:
    header = (
        f"{'data':>12} {'N obs':>7} {'n RE':>5} {'cold 1st':>9} {'ours 1st':>9} {'ours 2nd':>9} {'glmmTMB 1st':>11} "
        f"{'glmmTMB 2nd':>11} {'lme4 1st':>9} {'lme4 2nd':>9} {'1st/TMB':>8} {'2nd/TMB':>8} "
        f"{'logLik ours':>15} {'ours-glmmTMB':>13} {'goal':>5}"
    )
    lines = [header]
    for name, r in results.items():
        ours, tmb, lme4, cold = r["ours"], r.get("glmmTMB"), r.get("lme4"), r.get("ours_cold")
        n_obs = ours.get("n_obs", (tmb or {}).get("nobs", "-"))
        n_re = ours.get("n_random", (tmb or {}).get("n_random", "-"))
        log_lik = ours.get("logLik_second", ours.get("logLik_first"))
        diff = "-"
        if log_lik is not None and tmb is not None and "logLik" in tmb:
            diff = f"{log_lik - tmb['logLik']:.2e}"
        lines.append(
            f"{name:>12} {n_obs:>7} {n_re:>5} {_seconds(cold, 'first_s'):>9} {_seconds(ours, 'first_s'):>9} "
            f"{_seconds(ours, 'second_s'):>9} "
            f"{_seconds(tmb, 'first_s'):>11} {_seconds(tmb, 'second_s'):>11} {_seconds(lme4, 'first_s'):>9} "
            f"{_seconds(lme4, 'second_s'):>9} {_ratio(ours, tmb, 'first_s'):>8} {_ratio(ours, tmb, 'second_s'):>8} "
            f"{(f'{log_lik:.6f}' if log_lik is not None else '-'):>15} {diff:>13} {_goal(name, ours, tmb):>5}"
        )
    lines += [
        "Goals: ours first call <= 2x glmmTMB's first, second call <= 1x glmmTMB's second; verbagg and insteval "
        "<= 1x for both calls.",
        "'cold 1st': our first call in a process that found no compiled function on disk; 'ours 1st' and 'ours "
        "2nd': the two calls of the next process, which loads what the first kept.",
        f"Times are wall seconds of the whole fit call (ours: default draws, 4 x 1000); 'timeout' = not done "
        f"within the {timeout:.0f} s given to the process; '>t' is how long the call that was cut short had run, "
        "and a ratio '>k' the lower bound that gives.",
        "",
        "ours apart from the calls (s); compile/fit/draws are the result's own attributes ('-': not recorded):",
        f"{'data':>12} {'import':>7} {'build':>6} {'compile 1st':>11} {'fit 1st':>8} {'draws 1st':>9} "
        f"{'compile 2nd':>11} {'fit 2nd':>8} {'draws 2nd':>9} {'colours':>7} {'C modules':>9} {'lme4 logLik':>15}  "
        "warnings",
    ]
    for name, r in results.items():
        ours, lme4 = r["ours"], r.get("lme4") or {}
        cells = []
        for call in ("first", "second"):
            attrs = ours.get(f"attrs_{call}", {})
            cells += [f"{attrs[k]:.2f}" if k in attrs else "-" for k in FIT_ATTRS]
        build = f"{ours['build_first_s']:.2f}" if "build_first_s" in ours else "-"
        imported = f"{ours['import_s']:.2f}" if "import_s" in ours else "-"
        notes = sorted(set(ours.get("warnings_first", [])) | set(ours.get("warnings_second", [])))
        if ours.get("status") == "timeout":
            notes.append(f"ours timed out in the {ours.get('running', '?')} call")
        if ours.get("status") == "error":
            notes.append("ours failed: " + (ours.get("error") or "?").splitlines()[-1][:100])
        lme4_ll = f"{lme4['logLik']:.6f}" if "logLik" in lme4 else "-"
        lines.append(
            f"{name:>12} {imported:>7} {build:>6} {cells[0]:>11} {cells[1]:>8} {cells[2]:>9} {cells[3]:>11} "
            f"{cells[4]:>8} {cells[5]:>9} {ours.get('n_colors', '-')!s:>7} {ours.get('c_modules', '-')!s:>9} "
            f"{lme4_ll:>15}  {'; '.join(notes)}"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=DATASETS, choices=DATASETS, metavar="NAME")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per process (default 1800)")
    parser.add_argument("--no-r", action="store_true", help="skip the R peers")
    parser.add_argument("--no-colors", action="store_true", help="do not count the colours (saves a compile)")
    parser.add_argument(
        "--compiledir", choices=["fresh", "default"], default="fresh",
        help="pytensor's compile directory: a fresh one per data set (default) or the machine's own",
    )  # fmt: skip
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, colors=not args.no_colors)
        return

    peers = []
    if not args.no_r:
        if r_available():
            peers = ["glmmTMB", "lme4"]
        else:
            print("R with glmmTMB, lme4 and jsonlite not found: peers skipped", flush=True)
    started = datetime.datetime.now()
    results: dict[str, dict] = {}
    for name in args.datasets:
        with (
            tempfile.TemporaryDirectory(prefix="compiled-functions-") as cache_dir,
            tempfile.TemporaryDirectory(prefix="pytensor-") as fresh_compiledir,
        ):
            compiledir = Path(fresh_compiledir) if args.compiledir == "fresh" else None
            cold = run_ours(name, args.timeout, colors=False, cache_dir=Path(cache_dir), compiledir=compiledir)
            print(f"{name}: ours, empty disk cache: {cold['status']} first {_seconds(cold, 'first_s')} "
                  f"second {_seconds(cold, 'second_s')}", flush=True)  # fmt: skip
            warm = run_ours(
                name, args.timeout, colors=not args.no_colors, cache_dir=Path(cache_dir), compiledir=compiledir
            )
        r = results[name] = {"ours": warm, "ours_cold": cold}
        o = r["ours"]
        print(f"{name}: ours {o['status']} first {_seconds(o, 'first_s')} second {_seconds(o, 'second_s')} "
              f"logLik {o.get('logLik_second', o.get('logLik_first', '-'))}", flush=True)  # fmt: skip
        if o["status"] == "error":
            print(o.get("error", ""), flush=True)
        for peer in peers:
            p = r[peer] = run_peer(name, peer, args.timeout)
            print(f"{name}: {peer} {p['status']} first {_seconds(p, 'first_s')} second {_seconds(p, 'second_s')} "
                  f"logLik {p.get('logLik', '-')}", flush=True)  # fmt: skip
            if p["status"] == "error":
                print(p.get("error", ""), flush=True)

    lines = [
        f"bench_mixed {started:%Y-%m-%d %H:%M}; python {sys.version.split()[0]} ({sys.executable}); "
        f"load average {tuple(round(x, 2) for x in os.getloadavg())}; timeout {args.timeout:.0f} s per process; "
        f"pytensor compile directory: {args.compiledir}",
        *table(results, args.timeout),
    ]
    if any(r["ours"].get("no_blas") for r in results.values()):
        lines.append("(pytensor warned that it could not link to a BLAS library in our processes)")
    text = "\n".join(lines)
    print(text)
    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"mixed_{started:%Y%m%d_%H%M}"
    (out_dir / f"{stem}.txt").write_text(text + "\n")
    record = {"started": started.isoformat(), "timeout_s": args.timeout, "python": sys.executable, "results": results}
    (out_dir / f"{stem}.json").write_text(json.dumps(record, indent=1))
    print(f"wrote {out_dir / stem}.txt and .json")


if __name__ == "__main__":
    main()
