"""Compiled functions kept on disk: a later process (here: a cleared in-memory cache) loads them instead of compiling,
keyed on the graphs themselves, so a different graph is never served a function compiled for another."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pymc as pm
import pytensor
import pytensor.tensor as pt
import pytest
import scipy.optimize
import scipy.stats

from pymc_laplace import clear_compile_cache, fit_integrated_laplace
from pymc_laplace._compat import get_group
from pymc_laplace.compile import function_cache
from pymc_laplace.compile.function_cache import SUFFIX, graph_digest, load_or_compile


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    directory = tmp_path / "functions"
    monkeypatch.setenv("PYMC_LAPLACE_CACHE_DIR", str(directory))
    clear_compile_cache()
    yield directory
    clear_compile_cache()


def small_graph(constant: np.ndarray, op=pt.exp):
    x = pt.vector("x")
    shared = pytensor.shared(np.ones(3), name="s")
    return x, shared, op(x * constant) + pt.log1p(pt.sum(x))


def test_graph_digest_is_structural():
    x1, _, out1 = small_graph(np.arange(3.0))
    x2, _, out2 = small_graph(np.arange(3.0))
    assert graph_digest([x1], [out1]) == graph_digest([x2], [out2])  # built twice: same digest
    x3, _, out3 = small_graph(np.arange(3.0) + 1e-12)
    assert graph_digest([x3], [out3]) != graph_digest([x1], [out1])  # another constant
    x4, _, out4 = small_graph(np.arange(3.0), op=pt.sin)
    assert graph_digest([x4], [out4]) != graph_digest([x1], [out1])  # another op
    assert graph_digest([x1], [out1], "a") != graph_digest([x1], [out1], "b")  # other options
    y = pt.vector("y")
    assert graph_digest([x1, y], [out1]) != graph_digest([y, x1], [out1])  # inputs in another order
    x5, shared, _ = small_graph(np.arange(3.0))
    assert graph_digest([x5], [x5 * shared]) is None  # an input that is neither listed nor constant


def test_digest_ignores_what_an_op_caches_when_a_function_using_it_is_compiled():
    """Compiling a function sets caches on the ops of its graph (inner functions, vectorised performs); another graph
    sharing those ops must keep its digest, or a process that compiled the first would not find what one that
    loaded it stored. Ops that pytensor compares by their props are digested by them."""
    x = pt.tensor3("x")
    chol = pt.linalg.cholesky(x)
    op = chol.owner.op
    before = graph_digest([x], [chol])
    op.cached_by_compilation = {"perform": object()}
    assert graph_digest([x], [chol]) == before
    assert graph_digest([x], [pt.linalg.cholesky(x, lower=False)]) != before  # other props: another op


def test_digest_is_the_same_in_another_process():
    """Ops are digested by their pickled state: nothing in it may depend on the process (string hashing, ids)."""
    script = textwrap.dedent(
        """
        import numpy as np, pymc as pm
        from pymc.pytensorf import join_nonshared_inputs
        from pymc_laplace.compile.function_cache import graph_digest
        with pm.Model() as model:
            sd = pm.HalfNormal("sd", 2.0)
            u = pm.Normal("u", 0.0, sd, shape=4)
            pm.Poisson("y", pm.math.exp(u[np.array([0, 1, 2, 3, 3])]), observed=[1, 0, 2, 5, 4])
        point = model.initial_point()
        [logp], x = join_nonshared_inputs(point, [model.logp()], model.value_vars)
        print(graph_digest([x], [logp], "options"))
        """
    )
    digests = set()
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
        assert run.returncode == 0, run.stderr[-2000:]
        digests.add(run.stdout.strip().splitlines()[-1])
    assert len(digests) == 1 and len(next(iter(digests))) == 64


def grouped_model(y: np.ndarray, group: np.ndarray) -> pm.Model:
    with pm.Model() as model:
        mu = pm.Normal("mu", 0.0, 10.0)
        sd = pm.HalfNormal("sd", 5.0)
        u = pm.Normal("u", 0.0, sd, shape=int(group.max()) + 1)
        pm.Poisson("y", pm.math.exp(mu + u[group]), observed=y)
    return model


def fit(model: pm.Model):
    return fit_integrated_laplace(model, random=["u"], progressbar=False, random_seed=5, draws=30, chains=2)


def test_a_new_process_loads_what_an_earlier_one_compiled(cache_dir, compile_count):
    group = np.repeat(np.arange(6), 4)
    y = np.random.default_rng(2).poisson(np.exp(0.5 + np.repeat(np.random.default_rng(3).normal(size=6), 4)))
    first = fit(grouped_model(y, group))
    compiled = len(compile_count)
    kept = sorted(cache_dir.glob(f"*{SUFFIX}"))
    assert compiled > 0 and len(kept) == compiled

    clear_compile_cache()  # what a new process starts with: nothing in memory
    again = fit(grouped_model(y, group))
    assert len(compile_count) == compiled  # everything loaded from disk
    for name in ("mean_vector", "random_effects", "log_marginal_likelihood"):
        np.testing.assert_array_equal(get_group(again, "fit")[name], get_group(first, "fit")[name])
    np.testing.assert_array_equal(get_group(again, "posterior")["u"], get_group(first, "posterior")["u"])

    # other data passed as constants: another graph, compiled for itself
    clear_compile_cache()
    other = fit(grouped_model(y + 1, group))
    assert len(compile_count) > compiled
    assert get_group(other, "fit")["log_marginal_likelihood"] != get_group(first, "fit")["log_marginal_likelihood"]


def correlated_slopes_model() -> pm.Model:
    """Random intercepts and slopes with an LKJ prior (as sleepstudy): graphs with batched linear algebra."""
    rng = np.random.default_rng(4)
    group, x = np.repeat(np.arange(6), 5), np.tile(np.arange(5.0), 6)
    y = 1.0 + 0.5 * x + rng.normal(size=6)[group] + 0.3 * rng.normal(size=6)[group] * x + rng.normal(size=30)
    with pm.Model() as model:
        beta = pm.Normal("beta", 0.0, 10.0, shape=2)
        chol, _, _ = pm.LKJCholeskyCov("chol", n=2, eta=1.0, sd_dist=pm.HalfNormal.dist(2.0, shape=2))
        ab = pm.MvNormal("ab", 0.0, chol=chol, shape=(6, 2))
        sigma = pm.HalfNormal("sigma", 2.0)
        pm.Normal("y", beta[0] + ab[group, 0] + (beta[1] + ab[group, 1]) * x, sigma, observed=y)
    return model


def test_a_new_process_loads_every_function_of_a_model_with_batched_linear_algebra(cache_dir, compile_count):
    """Every graph a fit builds is the same whether the functions built before it were compiled or loaded: a fit
    that loads the first of them does not compile the others again (graphs shared between the functions once made
    a second process compile most of them again)."""
    fit_integrated_laplace(correlated_slopes_model(), random=["ab"], progressbar=False, random_seed=1, draws=20)
    compiled = len(compile_count)
    assert compiled > 0
    clear_compile_cache()
    fit_integrated_laplace(correlated_slopes_model(), random=["ab"], progressbar=False, random_seed=1, draws=20)
    assert len(compile_count) == compiled


def stored_function(constant: np.ndarray):
    """A function of a graph holding ``constant``, through the disk cache; with its digest."""
    x = pt.vector("x")
    out = pt.sum(pt.exp(x) * constant)
    digest = graph_digest([x], [out], "test")
    return load_or_compile(digest, lambda: pytensor.function([x], out)), digest


def test_a_function_with_large_constants_is_not_stored(cache_dir, monkeypatch):
    """Data given as numpy arrays are constants of the graphs: a function holding more than the limit is not written
    (its file would hold them all), and the function is still the right one."""
    monkeypatch.setattr(function_cache, "MAX_STORED_CONSTANT_BYTES", 8 * 100)
    small, small_digest = stored_function(np.arange(100.0))  # 800 bytes: at the limit, kept
    large, large_digest = stored_function(np.arange(101.0))
    assert (cache_dir / f"{small_digest}{SUFFIX}").exists()
    assert not (cache_dir / f"{large_digest}{SUFFIX}").exists()
    assert large(np.zeros(101)) == pytest.approx(np.sum(np.arange(101.0)))
    assert small(np.zeros(100)) == pytest.approx(np.sum(np.arange(100.0)))


def test_the_stored_functions_are_kept_within_a_total_size(cache_dir, monkeypatch):
    """Beyond ``MAX_TOTAL_BYTES`` the least recently used files go; the one just written always stays."""
    digests = []
    for k in range(5):
        digests.append(stored_function(np.full(3, float(k)))[1])
        os.utime(cache_dir / f"{digests[-1]}{SUFFIX}", (1e9 + k, 1e9 + k))  # distinct ages, oldest first
    sizes = [(cache_dir / f"{d}{SUFFIX}").stat().st_size for d in digests]
    monkeypatch.setattr(function_cache, "MAX_TOTAL_BYTES", sizes[-1] + sizes[-2])  # room for the two newest
    digests.append(stored_function(np.full(3, 5.0))[1])  # stored (the newest), then the directory is trimmed
    kept = {path.name for path in cache_dir.glob(f"*{SUFFIX}")}
    newest = (cache_dir / f"{digests[-1]}{SUFFIX}").stat().st_size
    # the newest stays; then, newest first, the files while the running total fits
    expected, total = {digests[-1]}, newest
    for digest, size in zip(reversed(digests[:-1]), reversed(sizes), strict=True):
        total += size
        if total > sizes[-1] + sizes[-2]:
            break
        expected.add(digest)
    assert kept == {f"{d}{SUFFIX}" for d in expected}
    assert len(kept) < len(digests)  # something was removed
    monkeypatch.setattr(function_cache, "MAX_TOTAL_BYTES", 1)
    digests.append(stored_function(np.full(3, 6.0))[1])
    assert {path.name for path in cache_dir.glob(f"*{SUFFIX}")} == {f"{digests[-1]}{SUFFIX}"}


class _Unpicklable:
    def __reduce__(self):
        raise TypeError("this object does not pickle")


def test_a_function_that_does_not_pickle_is_returned_and_leaves_no_file(cache_dir):
    """Pickling fails part-way into the file: the partial file is removed, and the compiled object is used as is."""
    made = [_Unpicklable()]
    assert load_or_compile("0" * 64, lambda: made) is made
    assert cache_dir.is_dir() and list(cache_dir.iterdir()) == []


def test_an_unreadable_file_is_compiled_again(cache_dir, compile_count):
    group = np.repeat(np.arange(4), 3)
    y = np.repeat([0, 2, 4, 9], 3) + np.tile([0, 1, 0], 4)
    first = fit(grouped_model(y, group))
    compiled = len(compile_count)
    for path in cache_dir.glob(f"*{SUFFIX}"):
        path.write_bytes(b"not a pickle")
    clear_compile_cache()
    again = fit(grouped_model(y, group))
    assert len(compile_count) == 2 * compiled
    np.testing.assert_array_equal(get_group(again, "fit")["mean_vector"], get_group(first, "fit")["mean_vector"])
    clear_compile_cache()
    fit(grouped_model(y, group))  # rewritten whole: loaded this time
    assert len(compile_count) == 2 * compiled


def test_an_empty_cache_dir_turns_the_disk_cache_off(tmp_path, monkeypatch, compile_count):
    monkeypatch.setenv("PYMC_LAPLACE_CACHE_DIR", "")
    clear_compile_cache()
    group = np.repeat(np.arange(4), 3)
    fit(grouped_model(np.repeat([1, 3, 0, 7], 3), group))
    compiled = len(compile_count)
    clear_compile_cache()
    fit(grouped_model(np.repeat([1, 3, 0, 7], 3), group))
    assert len(compile_count) == 2 * compiled
    clear_compile_cache()


def test_a_directory_that_cannot_be_written_warns_and_the_fit_goes_on(tmp_path, monkeypatch, compile_count):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("PYMC_LAPLACE_CACHE_DIR", str(blocker / "functions"))
    clear_compile_cache()
    group = np.repeat(np.arange(4), 3)
    y = np.repeat([1, 3, 0, 7], 3)
    with pytest.warns(UserWarning, match="not kept on disk"):
        result = fit(grouped_model(y, group))
    # the value is the Laplace marginal: recomputed here group by group with scipy at the reported estimates
    fit_group = get_group(result, "fit")
    natural = dict(zip(fit_group["natural_rows"].values, fit_group["natural_estimate"].values, strict=True))
    mu, sd = natural["mu"], natural["sd"]
    expected = 0.0
    for g in range(4):
        counts = y[group == g]

        def log_joint(u, counts=counts):
            return float(np.sum(scipy.stats.poisson(np.exp(mu + u)).logpmf(counts)) + scipy.stats.norm(0, sd).logpdf(u))

        u_hat = scipy.optimize.minimize_scalar(
            lambda u, f=log_joint: -f(u), bounds=(-20, 20), method="bounded", options={"xatol": 1e-10}
        ).x
        curvature = counts.size * np.exp(mu + u_hat) + 1.0 / sd**2
        expected += log_joint(u_hat) + 0.5 * np.log(2 * np.pi) - 0.5 * np.log(curvature)
    assert float(fit_group["log_marginal_likelihood"]) == pytest.approx(expected, abs=1e-6)
    clear_compile_cache()


PARTIAL_INDEX_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import numpy as np, pymc as pm, pytensor, pytensor.tensor as pt
    from pathlib import Path
    from pytensor.compile.mode import get_default_mode
    from pytensor.link.c import cmodule
    from pymc_laplace import fit_integrated_laplace, fit_laplace
    from pymc_laplace.compile.graphs import compile_seconds
    from pymc_laplace._compat import get_group

    if "Numba" in type(get_default_mode().linker).__name__:  # pytensor 3's default backend: no C modules
        print(json.dumps(None))
        sys.exit(0)
    if sys.argv[1] == "binomial":
        with pm.Model() as model:
            a = pm.Normal("a", 0.0, 3.0)
            b = pm.Normal("b", 0.0, 3.0)
            pm.Binomial("y", n=5, logit_p=a + b * np.array([-0.86, -0.30, -0.05, 0.73]), observed=[0, 1, 3, 4])
        result = fit_laplace(model=model, progressbar=False, random_seed=1, draws=20, chains=1)
    else:  # pymc's start value and rewritten Hessian graphs of this model hold inner functions (pt.diag)
        sys.path.insert(0, sys.argv[2])
        from test_disk_cache import correlated_slopes_model

        model = correlated_slopes_model()
        result = fit_integrated_laplace(model, random=["ab"], progressbar=False, random_seed=1, draws=20, chains=1)
    mean = get_group(result, "fit")["mean_vector"].values.tolist()
    cache = cmodule._module_cache
    root = Path(cache.dirname)
    read = sorted(Path(p).parent.name for p in cache.loaded_key_pkl)
    present_before = sorted(p.name for p in root.iterdir() if (p / "key.pkl").exists())

    # a graph this process has not linked before, whose C module an earlier process compiled
    x = pt.vector("x")
    pytensor.function([x], pt.exp(x) * 3.25 + pt.log1p(x * x))(np.ones(2))
    present_after = sorted(p.name for p in root.iterdir() if (p / "key.pkl").exists())
    read_after = len(cache.loaded_key_pkl)
    print(json.dumps({"mean": mean, "read": read, "present_before": present_before, "present_after": present_after,
                      "read_after": read_after, "compile_seconds": compile_seconds()}))
    """
)


@pytest.mark.parametrize("model", ["binomial", "lkj"])
def test_a_loading_process_reads_only_the_module_index_it_needs(tmp_path, model):
    """pytensor reads the index of every C module in its compiledir (2 ms a module) the first time a process links a
    function; a process that loads stored functions reads the entries of their modules alone, and a later lookup
    that misses still finds a module an earlier process compiled (it reads the rest of the index first). With an LKJ
    prior too, whose start value and Hessian graphs hold functions pytensor compiles only when they first run."""
    env = {**os.environ, "PYMC_LAPLACE_CACHE_DIR": str(tmp_path / "functions")}

    def run() -> dict:
        done = subprocess.run(
            [sys.executable, "-c", PARTIAL_INDEX_SCRIPT, model, str(Path(__file__).parent)],
            capture_output=True,
            text=True,
            env=env,
            timeout=900,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    first = run()  # compiles (the whole index is read by pytensor) and stores what it linked
    if first is None:
        pytest.skip("this pytensor links the functions without C modules: there is no module index to read")
    second = run()  # loads
    assert second["mean"] == first["mean"]
    # the modules read are a part of the index, and they are those the stored functions recorded
    assert 0 < len(second["read"]) <= len(second["present_before"])
    recorded = set()
    for path in (tmp_path / "functions").glob(f"*{SUFFIX}"):
        with open(path, "rb") as handle:
            recorded.update(pickle.load(handle))
    assert set(second["read"]) == recorded
    # the miss read the rest of the index and found the module the first process compiled: nothing new on disk
    assert second["present_after"] == second["present_before"]
    assert second["read_after"] >= len(second["present_after"])


def test_start_values_are_pymcs_and_link_no_c_module(monkeypatch):
    """pymc's start values, random ones included, evaluated without linking C code: linking any would make pytensor
    read its whole module index before a process can load stored functions with the part of it they need."""
    import pytensor.link.c.basic

    from pymc_laplace.compile.graphs import start_point

    with pm.Model() as model:
        pm.Normal("x", 0.0, 1.0, shape=3, initval="prior")
        pm.HalfNormal("s", 1.0, initval="prior")
        pm.LKJCholeskyCov("c", n=3, eta=2.0, sd_dist=pm.Exponential.dist(1.0, shape=3), initval="prior")
        pm.LKJCholeskyCov("d", n=2, eta=1.0, sd_dist=pm.HalfNormal.dist(2.0, shape=2))
    expected = model.initial_point(0)

    def refuse(*args, **kwargs):
        raise AssertionError("pytensor's module cache was asked for")

    # pytensor 3 links its functions with numba (its scans still link C code): the module index does not matter there
    if "Numba" not in type(pytensor.compile.mode.get_default_mode().linker).__name__:
        monkeypatch.setattr(pytensor.link.c.basic, "get_module_cache", refuse)
    values = start_point(model, None)
    assert values.keys() == expected.keys()
    for name, value in expected.items():
        np.testing.assert_allclose(values[name], value, rtol=1e-12, atol=0)
