"""The kernels that replace ops pytensor runs in Python, against NumPy's own definitions (``np.add.at``, fancy
indexing), and their rewrites inside a compiled crossed-effects Hessian-vector product."""

from __future__ import annotations

import numpy as np
import pytensor
import pytensor.tensor as pt
import pytest
from pytensor.graph.replace import vectorize_graph

from pymc_laplace.compile import ops
from pymc_laplace.compile.ops import ScatterAddRows, TakeColumns, with_fast_kernels


@pytest.mark.filterwarnings("ignore:Numba will use object mode")
@pytest.mark.parametrize("y_shape", [(50, 3), (1, 3), (50, 1), (3, 50)])
def test_scatter_add_rows_is_np_add_at(y_shape):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(7, 3))
    idx = rng.integers(-7, 7, size=50)  # repeated and negative indices
    y_value = rng.normal(size=y_shape)
    y_used = y_value.T if y_shape == (3, 50) else y_value  # a transposed (F-contiguous) batch
    expected = x.copy()
    np.add.at(expected, idx, np.broadcast_to(y_used, (50, 3)))
    xs, ys, ids = pt.matrix("x"), pt.matrix("y"), pt.lvector("idx")
    f = pytensor.function([xs, ys, ids], ScatterAddRows()(xs, ys, ids))
    np.testing.assert_allclose(f(x, y_used, idx), expected, rtol=1e-13, atol=1e-13)
    np.testing.assert_array_equal(x, x.copy())  # x untouched
    with pytest.raises(IndexError):
        f(x, y_used, np.array([0, 7] * 25))


@pytest.mark.filterwarnings("ignore:Numba will use object mode")
def test_scatter_add_rows_many_columns_and_three_dimensions():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(5, 20, 4))  # width 80: the flattened-index path
    idx = rng.integers(0, 5, size=30)
    y = rng.normal(size=(30, 20, 4))
    expected = x.copy()
    np.add.at(expected, idx, y)
    xs, ys, ids = pt.tensor3("x"), pt.tensor3("y"), pt.lvector("idx")
    f = pytensor.function([xs, ys, ids], ScatterAddRows()(xs, ys, ids))
    np.testing.assert_allclose(f(x, y, idx), expected, rtol=1e-13, atol=1e-13)


@pytest.mark.filterwarnings("ignore:Numba will use object mode")
def test_take_columns_is_fancy_indexing():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(4, 9))
    idx = np.array([0, 8, -1, 3, 3])
    xs, ids = pt.matrix("x"), pt.lvector("idx")
    np.testing.assert_array_equal(pytensor.function([xs, ids], TakeColumns()(xs, ids))(x, idx), x[:, idx])


@pytest.mark.skipif(ops.AdvancedIncSubtensor1 is None, reason="pytensor 3.x: no AdvancedIncSubtensor1 to rewrite")
def test_the_rewrites_apply_to_a_vectorised_crossed_product_and_change_nothing():
    """The Hessian-vector product of a crossed-effects log density, vectorised over directions (the compressed
    products of the integrated Laplace): compiled with the fast kernels it uses them, and equals pytensor's own."""
    rng = np.random.default_rng(3)
    person, item = rng.integers(0, 30, 400), rng.integers(0, 8, 400)
    y = rng.integers(0, 2, 400).astype(float)
    b = pt.vector("b")
    eta = b[:30][person] + b[30:][item]
    logp = pt.sum(y * eta - pt.softplus(eta)) - 0.5 * pt.sum(b**2)
    grad = pt.grad(logp, b)
    direction, directions = pt.vector("direction"), pt.matrix("directions")
    hv = vectorize_graph(pt.grad(pt.sum(grad * direction), b), {direction: directions})
    fast = pytensor.function([b, directions], hv, mode=with_fast_kernels(None))
    plain = pytensor.function([b, directions], hv)
    ops = {type(node.op).__name__ for node in fast.maker.fgraph.toposort()}
    assert {"ScatterAddRows", "TakeColumns"} <= ops
    point, dirs = rng.normal(size=38), rng.normal(size=(5, 38))
    np.testing.assert_allclose(fast(point, dirs), plain(point, dirs), rtol=1e-12, atol=1e-12)
