"""Compile once: a second fit of the same model compiles nothing, and pm.set_data refits without compiling."""

from __future__ import annotations

import numpy as np
import pymc as pm
import pytest
import scipy.stats

from pymc_laplace import clear_compile_cache, fit_integrated_laplace, fit_laplace
from pymc_laplace._compat import get_group


def bioassay() -> pm.Model:
    with pm.Model() as model:
        alpha = pm.Flat("alpha")
        beta = pm.Flat("beta")
        pm.Binomial("y", n=5, logit_p=alpha + beta * np.array([-0.86, -0.30, -0.05, 0.73]), observed=[0, 1, 3, 5])
    return model


def test_second_fit_laplace_compiles_nothing(compile_count):
    model = bioassay()
    first = fit_laplace(model, progressbar=False, random_seed=3, draws=50, chains=2)
    compiled_first = len(compile_count)
    second = fit_laplace(model, progressbar=False, random_seed=3, draws=50, chains=2)
    assert compiled_first > 0
    assert len(compile_count) == compiled_first
    np.testing.assert_array_equal(get_group(first, "fit")["mean_vector"], get_group(second, "fit")["mean_vector"])
    # a new variable is a new graph: compiled again
    with model:
        pm.Normal("extra", 0.0, 1.0)
    fit_laplace(model, progressbar=False, random_seed=3, draws=50, chains=2)
    assert len(compile_count) > compiled_first
    # a cleared cache loads what is kept on disk; cleared with the disk, it compiles again
    count = len(compile_count)
    clear_compile_cache()
    fit_laplace(model, progressbar=False, random_seed=3, draws=50, chains=2)
    assert len(compile_count) == count
    clear_compile_cache(disk=True)
    fit_laplace(model, progressbar=False, random_seed=3, draws=50, chains=2)
    assert len(compile_count) > count


def exact_log_marginal(y: np.ndarray, group: np.ndarray, mu: float, sd: float, sigma: float) -> float:
    """log N(y; mu, sigma^2 I + sd^2 Z Z^T): the random intercepts integrated out exactly."""
    z = (group[:, None] == np.arange(group.max() + 1)[None, :]).astype(float)
    covariance = sigma**2 * np.eye(y.size) + sd**2 * z @ z.T
    return float(scipy.stats.multivariate_normal(np.full(y.size, mu), covariance).logpdf(y))


def test_set_data_refits_without_compiling(compile_count):
    rng = np.random.default_rng(11)
    group = np.repeat(np.arange(12), 4)
    with pm.Model() as model:
        y_data = pm.Data("y_data", rng.normal(1.0, 1.5, size=group.size))
        mu = pm.Normal("mu", 0.0, 10.0)
        sd = pm.HalfNormal("sd", 5.0)
        sigma = pm.HalfNormal("sigma", 5.0)
        u = pm.Normal("u", 0.0, sd, shape=12)
        pm.Normal("y", mu + u[group], sigma, observed=y_data)

    def fitted() -> tuple[float, float]:
        result = fit_integrated_laplace(model, random=["u"], progressbar=False, random_seed=1, draws=20, chains=2)
        fit = get_group(result, "fit")
        natural = dict(zip(fit["natural_rows"].values, fit["natural_estimate"].values, strict=True))
        exact = exact_log_marginal(
            np.asarray(model["y_data"].get_value()), group, natural["mu"], natural["sd"], natural["sigma"]
        )
        observed = np.asarray(get_group(result, "observed_data")["y"])
        np.testing.assert_array_equal(observed, model["y_data"].get_value())
        return float(fit["log_marginal_likelihood"]), exact

    first, exact = fitted()
    assert first == pytest.approx(exact, abs=1e-8)  # Gaussian: the Laplace marginal is exact
    compiled = len(compile_count)
    with model:
        pm.set_data({"y_data": rng.normal(-2.0, 0.5, size=group.size) + np.repeat(rng.normal(size=12), 4)})
    second, exact = fitted()
    assert len(compile_count) == compiled
    assert second == pytest.approx(exact, abs=1e-8)
    assert abs(second - first) > 1.0


def random_intercepts(y: np.ndarray, group: np.ndarray, *, as_data: bool) -> pm.Model:
    with pm.Model() as model:
        observed = pm.Data("y_data", y) if as_data else y
        mu = pm.Normal("mu", 0.0, 10.0)
        sd = pm.HalfNormal("sd", 5.0)
        sigma = pm.HalfNormal("sigma", 5.0)
        u = pm.Normal("u", 0.0, sd, shape=int(group.max()) + 1)
        pm.Normal("y", mu + u[group], sigma, observed=observed)
    return model


def test_a_model_built_again_reuses_what_was_compiled(compile_count):
    """Same graph, other values in its data containers: nothing compiled, and the marginal is that of the new data.
    Other constants (data passed as arrays): compiled again."""
    rng = np.random.default_rng(12)
    group = np.repeat(np.arange(9), 5)

    def fitted(model: pm.Model) -> tuple[float, float]:
        result = fit_integrated_laplace(model, random=["u"], progressbar=False, random_seed=1, draws=20, chains=2)
        fit = get_group(result, "fit")
        natural = dict(zip(fit["natural_rows"].values, fit["natural_estimate"].values, strict=True))
        y = np.asarray(get_group(result, "observed_data")["y"])
        return float(fit["log_marginal_likelihood"]), exact_log_marginal(
            y, group, natural["mu"], natural["sd"], natural["sigma"]
        )

    first = random_intercepts(rng.normal(2.0, 1.0, 45) + np.repeat(rng.normal(size=9), 5), group, as_data=True)
    value, exact = fitted(first)
    assert value == pytest.approx(exact, abs=1e-8)
    compiled = len(compile_count)
    again = random_intercepts(rng.normal(-1.0, 2.0, 45) + np.repeat(rng.normal(size=9), 5), group, as_data=True)
    value_again, exact_again = fitted(again)
    assert len(compile_count) == compiled
    assert value_again == pytest.approx(exact_again, abs=1e-8)
    assert abs(value_again - value) > 1.0
    constants = random_intercepts(rng.normal(0.5, 1.0, 45) + np.repeat(rng.normal(size=9), 5), group, as_data=False)
    value_constants, exact_constants = fitted(constants)
    assert len(compile_count) > compiled
    assert value_constants == pytest.approx(exact_constants, abs=1e-8)


def test_a_model_built_again_reads_its_own_pattern_when_its_data_couple_otherwise(monkeypatch):
    """The Hessian pattern read for a graph is reused by a model built again only with equal data container values:
    index data that couple other random effects give another pattern (reusing the first would make it too sparse,
    and the marginal wrong). Equal data: the walk is not run again."""
    import pymc_laplace.compile.structure as structure
    from pymc_laplace import marginal

    walks = []
    walk = structure.walk_hessian_pattern

    def counted(*args, **kwargs):
        walks.append(1)
        return walk(*args, **kwargs)

    monkeypatch.setattr(structure, "walk_hessian_pattern", counted)
    y = np.array([0.3, -1.2, 0.8, 2.0, -0.4, 1.1])

    def model(second_index: np.ndarray) -> pm.Model:
        with pm.Model() as m:
            first = pm.Data("first", np.array([0, 1, 2, 3, 4, 5]))
            second = pm.Data("second", second_index)
            sd = pm.HalfNormal("sd", 1.0)
            u = pm.Normal("u", 0.0, sd, shape=6)
            pm.Normal("y", u[first] + 0.5 * u[second], 1.0, observed=y)
        return m

    clear_compile_cache()
    separate = np.array([0, 1, 2, 3, 4, 5])
    coupled = np.array([1, 0, 3, 2, 5, 4])  # pairs (0, 1), (2, 3), (4, 5)
    diagonal = marginal(model(separate), random=["u"]).compiled
    assert len(walks) == 1 and diagonal.pattern.nnz == 6
    again = marginal(model(separate), random=["u"]).compiled
    assert len(walks) == 1 and again.pattern.nnz == 6  # equal data: the pattern read before
    pairs = marginal(model(coupled), random=["u"]).compiled
    assert len(walks) == 2  # other data: read again
    expected = np.kron(np.eye(3), np.ones((2, 2))).astype(bool)
    np.testing.assert_array_equal(pairs.pattern.toarray(), expected)
    # and the marginal is that of the coupled model: the Gaussian integral in closed form
    laplace = marginal(model(coupled), random=["u"])
    sd = 0.7
    a = np.eye(6) + 0.5 * np.eye(6)[coupled]
    covariance = sd**2 * a @ a.T + np.eye(6)
    exact = scipy.stats.multivariate_normal(np.zeros(6), covariance).logpdf(y)
    assert laplace.value(np.array([np.log(sd)])) == pytest.approx(exact, abs=1e-8)
