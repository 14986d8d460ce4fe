"""The Hessian pattern read from the graph is structural: never too small at any theta, and exactly the coupling of
the groups on the models mixed-model users fit.

Every model in the catalogue is checked against pytensor's dense Hessian of PyMC's own log density at several random
(b, theta), and its Laplace marginal against an independent dense Laplace computation (``dense_oracle``).
"""

from __future__ import annotations

import warnings

import mixed_models  # examples/, put on the path by conftest
import numpy as np
import pymc as pm
import pytensor.tensor as pt
import pytest
import scipy.sparse as sp
from dense_oracle import DenseLaplace
from scipy.sparse.csgraph import connected_components

from pymc_laplace import ModelSpecificationError, marginal


# ------------------------------------------------------------------------------------------ synthetic models
def correlated_pairs(elementwise: bool, n_pairs: int = 30) -> tuple[pm.Model, list[str]]:
    """Pairs of effects correlated through ``M = [[1, 0], [rho, 1]]``; ``rho`` starts at 0."""
    rng = np.random.default_rng(3)
    z_true = rng.normal(size=(n_pairs, 2)) * 0.7
    u_true = z_true @ np.array([[1.0, 0.0], [0.8, 1.0]]).T
    y0, y1 = rng.poisson(np.exp(u_true[:, 0])), rng.poisson(np.exp(u_true[:, 1]))
    with pm.Model() as model:
        rho = pm.Normal("rho", 0.0, 1.0)
        sd = pm.HalfNormal("sd", 1.0)
        z = pm.Normal("z", 0.0, sd, shape=(n_pairs, 2))
        if elementwise:
            u0, u1 = z[:, 0], rho * z[:, 0] + z[:, 1]
        else:
            matrix = pt.stack([pt.stack([pt.constant(1.0), pt.constant(0.0)]), pt.stack([rho, pt.constant(1.0)])])
            u = pt.dot(z, matrix.T)
            u0, u1 = u[:, 0], u[:, 1]
        pm.Poisson("y0", pt.exp(u0), observed=y0)
        pm.Poisson("y1", pt.exp(u1), observed=y1)
    return model, ["z"]


def correlated_pairs_set_subtensor(n_pairs: int = 20) -> tuple[pm.Model, list[str]]:
    """The same coupling with the matrix written into zeros by ``set_subtensor``, and the effects by a scatter."""
    rng = np.random.default_rng(4)
    y = rng.poisson(2.0, size=(n_pairs, 2))
    with pm.Model() as model:
        rho = pm.Normal("rho", 0.0, 1.0)
        sd = pm.HalfNormal("sd", 1.0)
        z = pm.Normal("z", 0.0, sd, shape=(n_pairs, 2))
        matrix = pt.set_subtensor(pt.eye(2)[1, 0], rho)
        flat = pt.inc_subtensor(pt.zeros(2 * n_pairs)[np.arange(2 * n_pairs)[::-1]], pt.dot(z, matrix.T).ravel()[::-1])
        pm.Poisson("y", pt.exp(flat.reshape((n_pairs, 2))), observed=y)
    return model, ["z"]


def random_slopes(n_groups: int = 6) -> tuple[pm.Model, list[str]]:
    """``(1 + x | g)`` with an LKJ prior: MvNormal with ``chol`` (Blockwise SolveTriangular in its log density)."""
    rng = np.random.default_rng(5)
    group = np.repeat(np.arange(n_groups), 5)
    x = rng.normal(size=group.size)
    with pm.Model() as model:
        chol, _, _ = pm.LKJCholeskyCov("chol", n=2, eta=2.0, sd_dist=pm.Exponential.dist(1.0, shape=2))
        ab = pm.MvNormal("ab", 0.0, chol=chol, shape=(n_groups, 2))
        pm.Poisson("y", pt.exp(0.5 + ab[group, 0] + ab[group, 1] * x), observed=rng.poisson(2.0, size=group.size))
    return model, ["ab"]


SYNTHETIC = {
    "dot_with_parameter_matrix": lambda: correlated_pairs(elementwise=False),
    "set_subtensor_and_scatter": correlated_pairs_set_subtensor,
    "mvnormal_lkj_random_slopes": random_slopes,
}
REAL = list(mixed_models.BUILDERS)


@pytest.fixture(scope="module")
def compiled(mixed_marginal):
    """(model, random, marginal, dense oracle) per catalogue entry, compiled once."""
    cache: dict[str, tuple] = {}

    def get(name: str) -> tuple:
        if name not in cache:
            if name in SYNTHETIC:
                model, random = SYNTHETIC[name]()
                with warnings.catch_warnings():
                    warnings.filterwarnings("error", message="Hessian pattern")  # no fallback on these models
                    laplace = marginal(model, random=random)
            else:
                model, random, laplace = mixed_marginal(name)
            cache[name] = (model, random, laplace, DenseLaplace(model, random))
        return cache[name]

    return get


def _random_thetas(laplace, rng: np.random.Generator, count: int = 2) -> list[np.ndarray]:
    start = laplace.compiled.theta_start
    return [start + rng.normal(0.0, 0.4, size=start.size) for _ in range(count)]


@pytest.mark.parametrize("name", [*SYNTHETIC, *REAL])
def test_pattern_covers_the_dense_hessian_at_random_points(compiled, name):
    """Never too small anywhere; and not larger than the union of the dense Hessians' nonzeros."""
    _, _, laplace, oracle = compiled(name)
    pattern = sp.csr_matrix(laplace.compiled.pattern, dtype=bool).toarray()
    rng = np.random.default_rng(11)
    seen = np.zeros_like(pattern)
    for theta in _random_thetas(laplace, rng):
        point = laplace.compiled.theta_layout.split(theta)
        b = rng.normal(0.0, 0.3, size=pattern.shape[0])
        hessian = oracle(b, point)[2]
        assert np.all(np.isfinite(hessian))
        nonzero = hessian != 0
        missed = np.argwhere(nonzero & ~pattern)
        assert missed.size == 0, f"pattern misses entries {missed[:5].tolist()} at theta {theta}"
        seen |= nonzero
    np.testing.assert_array_equal(pattern, seen)


# Gaussian data and random effects: the log density is quadratic in the random effects, so Q does not depend on them
QUADRATIC = {"sleepstudy", "penicillin"}


@pytest.mark.parametrize("name", [*SYNTHETIC, *REAL])
def test_hessian_read_as_constant_in_b_is_constant(compiled, name):
    """Where the graph says the log density is at most quadratic in b, PyMC's own dense Hessian is the same at
    random b far apart; the Gaussian models are recognised as such, the others are not."""
    _, _, laplace, oracle = compiled(name)
    assert laplace.compiled.hessian_constant_in_b == (name in QUADRATIC)
    rng = np.random.default_rng(13)
    theta = _random_thetas(laplace, rng, count=1)[0]
    point = laplace.compiled.theta_layout.split(theta)
    n_b = laplace.compiled.b_layout.size
    first, second = (oracle(rng.normal(0.0, 2.0, size=n_b), point)[2] for _ in range(2))
    if laplace.compiled.hessian_constant_in_b:
        np.testing.assert_allclose(second, first, rtol=1e-10, atol=1e-10 * np.max(np.abs(first)))
    else:
        assert not np.allclose(second, first, rtol=1e-6)


def _degree(build) -> int | None:
    from pymc_laplace.compile.structure import polynomial_degree

    x = pt.vector("x")
    return polynomial_degree(build(x), x)


@pytest.mark.parametrize(
    ("build", "degree"),
    [
        (lambda x: pt.sum(x), 1),
        (lambda x: pt.sum((x[[0, 0, 1]] - 2.0) ** 2 / pt.scalar("s")), 2),
        (lambda x: pt.sum(pt.sqr(pt.dot(pt.matrix("A"), x))), 2),
        (lambda x: pt.sum(x**3 * pt.vector("d")), 3),
        (lambda x: pt.sum(x * x * x[::-1]), 3),
        (lambda x: pt.sum(pt.concatenate([x, 2 * x]) ** 2), 2),
        (lambda x: pt.sum(pt.switch(pt.vector("c") > 0, x, x**2)), 2),
        (lambda x: pt.sum(pt.set_subtensor(pt.zeros(5)[[1, 3]], x[:2]) ** 2), 2),
        (lambda x: pt.sum(pt.exp(x)), None),  # not a polynomial
        (lambda x: pt.sum(x**0.5), None),
        (lambda x: pt.sum(1.0 / x), None),
        (lambda x: pt.sum(x ** pt.scalar("p")), None),  # an exponent that may be anything
        (lambda x: pt.sum(pt.switch(x > 0, x, 2 * x)), None),  # a branch on x itself
        (lambda x: pt.max(x**2), None),
    ],
)
def test_polynomial_degree_of_small_graphs(build, degree):
    assert _degree(build) == degree


@pytest.mark.parametrize("name", [*SYNTHETIC, *REAL])
def test_marginal_matches_the_dense_laplace(compiled, name):
    _, _, laplace, oracle = compiled(name)
    rng = np.random.default_rng(12)
    for theta in _random_thetas(laplace, rng, count=1):
        expected = oracle.log_marginal(laplace.compiled.theta_layout.split(theta))
        assert laplace.value(theta) == pytest.approx(expected, abs=1e-7, rel=1e-9)


def test_parameter_matrix_that_starts_at_zero_couples_the_pairs(compiled):
    """The reproducer: rho starts at 0, so reading values would take Q as diagonal and get the marginal wrong."""
    _, _, laplace, _ = compiled("dot_with_parameter_matrix")
    elementwise = marginal(correlated_pairs(elementwise=True)[0], random=["z"])
    point = {"rho": np.array(0.8), "sd_log__": np.array(np.log(0.7))}
    assert laplace.logp(point) == pytest.approx(elementwise.logp(point), abs=1e-9)
    assert laplace.structure.n_blocks == 30 and laplace.structure.largest_block == 2


@pytest.mark.parametrize("name", ["mvnormal_lkj_random_slopes", "sleepstudy"])
def test_random_slopes_are_independent_two_by_two_blocks(compiled, name):
    _, _, laplace, _ = compiled(name)
    n_groups = laplace.compiled.b_layout.size // 2
    structure = laplace.structure
    assert structure.n_blocks == n_groups and structure.largest_block == 2
    assert int(laplace.compiled.colors.max()) + 1 == 2
    # each block is one group's (intercept, slope): consecutive elements of the (group, 2) array
    for block in structure.groups[0]:
        assert sorted(block.tolist()) == [2 * (block.min() // 2), 2 * (block.min() // 2) + 1]


def test_crossed_effects_form_one_block_and_nested_effects_one_block_per_location(compiled):
    _, _, crossed, _ = compiled("penicillin")
    assert crossed.structure.n_blocks == 1 and crossed.structure.largest_block == 24 + 6
    _, _, nested, _ = compiled("grouseticks")
    n_locations = 63
    assert nested.structure.n_blocks == n_locations


# ------------------------------------------------------------------------------------------ data containers
def _membership_model(membership: np.ndarray) -> pm.Model:
    rng = np.random.default_rng(6)
    with pm.Model() as model:
        design = pm.Data("Z", membership)
        sd = pm.HalfNormal("sd", 1.0)
        u = pm.Normal("u", 0.0, sd, shape=membership.shape[1])
        pm.Poisson("y", pt.exp(0.3 + pt.dot(design, u)), observed=rng.poisson(1.5, size=membership.shape[0]))
    return model


def test_design_matrix_in_a_data_container_and_set_data():
    """The pattern of a data matrix is read from its values; new data that couple more effects are refused."""
    groups = np.arange(24) % 6
    membership = np.eye(6)[groups]
    model = _membership_model(membership)
    laplace = marginal(model, random=["u"])
    assert laplace.structure.largest_block == 1
    point = {"sd_log__": np.array(-0.2)}
    before = laplace.logp(point)
    assert before == pytest.approx(DenseLaplace(model, ["u"]).log_marginal(point), abs=1e-8)

    with model:  # another assignment of the observations to groups: still one group each
        pm.set_data({"Z": np.eye(6)[(groups + 1) % 6]})
    assert laplace.logp(point) == pytest.approx(DenseLaplace(model, ["u"]).log_marginal(point), abs=1e-8)

    with model:  # each observation in two groups: the compiled (diagonal) pattern no longer holds
        pm.set_data({"Z": membership + np.eye(6)[(groups + 1) % 6]})
    with pytest.raises(ModelSpecificationError, match=r"(?s)\['Z'\] changed.*Build the marginal again"):
        laplace.logp(point)


def test_fallback_for_an_op_without_a_rule_is_named():
    """An op with no rule (here a cumulative sum) keeps the safe, coupled pattern and is reported by name."""
    rng = np.random.default_rng(7)
    with pm.Model() as model:
        sd = pm.HalfNormal("sd", 1.0)
        steps = pm.Normal("steps", 0.0, sd, shape=8)
        pm.Poisson("y", pt.exp(pt.cumsum(steps)), observed=rng.poisson(1.0, size=8))
    with pytest.warns(UserWarning, match=r"Hessian pattern: no rule for \[.*Cum"):
        laplace = marginal(model, random=["steps"])
    assert laplace.compiled.pattern_fallbacks and "Cum" in laplace.compiled.pattern_fallbacks[0]
    _, n_components = None, connected_components(laplace.compiled.pattern)[0]
    assert n_components == 1
    point = {"sd_log__": np.array(0.1)}
    assert laplace.logp(point) == pytest.approx(DenseLaplace(model, ["steps"]).log_marginal(point), abs=1e-8)
