"""fit_laplace vs pymc-extras' fit_laplace vs pm.sample (NUTS), measured in the same run.

    python bench/bench_laplace.py [--repeats 3] [--models bioassay hier50 hier2000] [--methods ours extras nuts]

Each (model, method) runs in a fresh Python process: the "fresh" time is model construction + compilation +
fit + draws (imports excluded and reported apart); the same process then builds an identical model and fits
again ("warm": pytensor's compile cache is warm, the model is new). Medians over ``--repeats`` processes.
Goal: ours end to end at most 0.3x pymc-extras and 0.05x NUTS. pymc-extras is the optional ``bench`` extra.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DRAWS, CHAINS = 1000, 4


def build_model(name: str):
    import numpy as np
    import pymc as pm

    if name == "bioassay":
        x = np.array([-0.86, -0.30, -0.05, 0.73])
        with pm.Model() as model:
            alpha = pm.Flat("alpha")
            beta = pm.Flat("beta")
            pm.Binomial("y", n=5, logit_p=alpha + beta * x, observed=[0, 1, 3, 5])
        return model
    if name in ("hier50", "hier2000"):  # group intercepts + mu, slope, tau, sigma = 50 or 2000 free parameters
        # hier2000 is written non-centred: with 10 observations per group the centred joint density's funnel
        # (tau -> 0 with every a at mu) draws Newton's method away from the interior mode. The non-centred joint
        # mode has tau near 8.4 (not the marginal estimate, about 0.7; pymc-extras finds the same mode): the model
        # measures speed at 2,000 parameters, not the quality of a joint Laplace fit
        rng = np.random.default_rng(2024)
        n_groups, per_group = (46, 30) if name == "hier50" else (1996, 10)
        group = np.repeat(np.arange(n_groups), per_group)
        x = rng.normal(size=group.size)
        a_true = rng.normal(1.0, 0.7, size=n_groups)
        y = a_true[group] + 0.5 * x + rng.normal(0.0, 1.0, size=group.size)
        with pm.Model(coords={"group": np.arange(n_groups)}) as model:
            mu = pm.Normal("mu", 0.0, 5.0)
            slope = pm.Normal("slope", 0.0, 5.0)
            tau = pm.HalfNormal("tau", 2.0)
            sigma = pm.HalfNormal("sigma", 2.0)
            if name == "hier50":
                a = pm.Normal("a", mu, tau, dims="group")
            else:
                a = pm.Deterministic("a", mu + tau * pm.Normal("z", 0.0, 1.0, dims="group"), dims="group")
            pm.Normal("y", a[group] + slope * x, sigma, observed=y)
        return model
    raise ValueError(name)


def fit(method: str, model):
    import pymc as pm

    if method == "ours":
        from pymc_laplace import fit_laplace

        return fit_laplace(model, draws=DRAWS, chains=CHAINS, random_seed=1, progressbar=False)
    if method == "extras":
        from pymc_extras import fit_laplace as extras_fit_laplace

        # this pymc-extras has no `chains`: the same number of draws in one block
        return extras_fit_laplace(model=model, draws=DRAWS * CHAINS, random_seed=1, progressbar=False)
    if method == "nuts":
        with model:
            return pm.sample(draws=DRAWS, tune=1000, chains=CHAINS, cores=2, random_seed=1, progressbar=False,
                             compute_convergence_checks=False)  # fmt: skip
    raise ValueError(method)


def location(method: str, result, model_name: str) -> list[float]:
    """Posterior means of the first parameters, to see that a fast method is not a wrong one."""
    import numpy as np

    names = ["alpha", "beta"] if model_name == "bioassay" else ["mu", "slope", "tau", "sigma"]
    posterior = result["posterior"]
    posterior = posterior.to_dataset() if hasattr(posterior, "to_dataset") else posterior
    return [float(np.mean(posterior[n].values)) for n in names]


def worker(model_name: str, method: str) -> dict:
    warnings.simplefilter("ignore")
    t0 = time.perf_counter()
    import pymc  # noqa: F401

    if method == "ours":
        import pymc_laplace  # noqa: F401
    elif method == "extras":
        import pymc_extras  # noqa: F401
    t_import = time.perf_counter() - t0
    times = []
    for _ in range(2):
        start = time.perf_counter()
        result = fit(method, build_model(model_name))
        times.append(time.perf_counter() - start)
    return {"import": t_import, "fresh": times[0], "warm": times[1], "means": location(method, result, model_name)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=["bioassay", "hier50"])
    parser.add_argument("--methods", nargs="+", default=["ours", "extras", "nuts"])
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker)))
        return

    results: dict[tuple[str, str], dict] = {}
    for model_name in args.models:
        for method in args.methods:
            runs = []
            for _ in range(args.repeats):
                proc = subprocess.run(
                    [sys.executable, __file__, "--worker", model_name, method], capture_output=True, text=True,
                    env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT,
                )  # fmt: skip
                if proc.returncode != 0:
                    print(f"{model_name}/{method} failed:\n{proc.stderr[-2000:]}")
                    break
                runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            if runs:
                results[model_name, method] = {
                    key: statistics.median(r[key] for r in runs) for key in ("import", "fresh", "warm")
                } | {"means": runs[-1]["means"]}
                r = results[model_name, method]
                print(f"{model_name:>9} {method:>6}: fresh {r['fresh']:.2f}s warm {r['warm']:.2f}s "
                      f"(import {r['import']:.2f}s) means {[round(m, 3) for m in r['means']]}", flush=True)  # fmt: skip

    lines = [
        f"bench_laplace {datetime.datetime.now():%Y-%m-%d %H:%M}, {args.repeats} fresh processes per cell, "
        f"{CHAINS}x{DRAWS} draws; load average {os.getloadavg()}",
        "Goal: ours <= 0.3x pymc-extras and <= 0.05x NUTS end to end (fresh).",
        f"{'model':>9} {'method':>7} {'fresh s':>8} {'warm s':>7} {'fresh/ours':>10} {'ours/this fresh':>15} "
        f"{'ours/this warm':>14}",
    ]
    for model_name in args.models:
        ours = results.get((model_name, "ours"))
        for method in args.methods:
            r = results.get((model_name, method))
            if r is None:
                continue
            ratio_fresh = f"{ours['fresh'] / r['fresh']:.3f}" if ours else "-"
            ratio_warm = f"{ours['warm'] / r['warm']:.3f}" if ours else "-"
            lines.append(f"{model_name:>9} {method:>7} {r['fresh']:>8.2f} {r['warm']:>7.2f} "
                         f"{r['fresh'] / ours['fresh'] if ours else float('nan'):>10.1f} {ratio_fresh:>15} "
                         f"{ratio_warm:>14}")  # fmt: skip
        if ours and (model_name, "extras") in results:
            diff = max(abs(a - b) for a, b in zip(ours["means"], results[model_name, "extras"]["means"], strict=True))
            lines.append(f"{model_name:>9} accuracy: max |mean(ours) - mean(pymc-extras)| = {diff:.3g}")
    text = "\n".join(lines)
    print(text)
    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"laplace_{datetime.date.today():%Y%m%d}.txt").write_text(text + "\n")


if __name__ == "__main__":
    main()
