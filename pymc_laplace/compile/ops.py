"""Graph rewrites for the functions this package compiles: faster kernels for ops that pytensor runs in Python.

A Hessian-vector product vectorised over the colours of a crossed design gathers rows of a transposed batch
(strided: :class:`TakeColumns` gathers on the contiguous layout instead) and scatters a (observations x colours)
array into (random effects x colours) by index: ``AdvancedIncSubtensor1`` with a matrix, which pytensor 2.x runs
with ``np.add.at`` (1.7 ms each for VerbAgg's 7,584 x 25, two of them per product). :class:`ScatterAddRows` does
the same sum as a product with the sparse incidence matrix of the index (built once per index). The rewrites are
registered under their own tag and applied only to the functions compiled here (``including(SCATTER_TAG)``); they
change no result beyond the order of floating-point additions.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytensor.tensor as pt
import scipy.sparse as sp
from pytensor.compile import optdb
from pytensor.compile.mode import Mode, get_mode
from pytensor.graph.basic import Apply
from pytensor.graph.op import Op
from pytensor.graph.rewriting.basic import in2out, node_rewriter
from pytensor.tensor.elemwise import DimShuffle

try:  # pytensor 2.x; pytensor 3.x has only the general advanced (inc)subtensor ops, with their own kernels
    from pytensor.tensor.subtensor import AdvancedIncSubtensor1, AdvancedSubtensor1
except ImportError:  # pragma: no cover - exercised on the PyMC 6 line
    AdvancedIncSubtensor1 = AdvancedSubtensor1 = None

SCATTER_TAG = "pymc_laplace_scatter_rows"


class ScatterAddRows(Op):
    """``out = x.copy(); out[idx[i]] += y[i]`` for every ``i``, repeated indices accumulating (``np.add.at``).

    ``x`` has at least two dimensions; ``y`` broadcasts to ``(len(idx), *x.shape[1:])``; ``idx`` is a vector of
    integers, negative ones counted from the end as in NumPy.
    """

    __props__ = ()

    def make_node(self, x: Any, y: Any, idx: Any) -> Apply:
        x, y, idx = pt.as_tensor_variable(x), pt.as_tensor_variable(y), pt.as_tensor_variable(idx)
        return Apply(self, [x, y, idx], [x.type()])

    def perform(self, node: Apply, inputs: list[np.ndarray], outputs: list[list[Any]]) -> None:
        x, y, idx = inputs
        rows = x.shape[0]
        idx = np.asarray(idx, dtype=np.int64)
        if idx.size and (idx.min() < -rows or idx.max() >= rows):
            raise IndexError(f"index out of bounds for a first axis of length {rows}")
        idx = np.where(idx < 0, idx + rows, idx)
        width = int(np.prod(x.shape[1:], dtype=np.int64))
        values = np.broadcast_to(y, (idx.size, *x.shape[1:])).reshape(idx.size, width)
        # the sum as a product with the (rows x len(idx)) incidence matrix of the index, kept for the next call
        incidence = self._incidence(idx, rows)
        out = x.reshape(rows, width) + incidence @ values
        outputs[0][0] = np.asarray(out, dtype=x.dtype).reshape(x.shape)

    def __getstate__(self) -> dict[str, Any]:  # a pickled function does not carry the incidence matrices
        return {k: v for k, v in self.__dict__.items() if k != "_incidence_cache"}

    def _incidence(self, idx: np.ndarray, rows: int) -> sp.csr_matrix:
        key = (rows, idx.size, hash(idx.tobytes()))
        cache = self.__dict__.setdefault("_incidence_cache", {})
        found = cache.get(key)
        if found is not None and np.array_equal(found[0], idx):
            return found[1]
        incidence = sp.csr_matrix((np.ones(idx.size), (idx, np.arange(idx.size))), shape=(rows, idx.size))
        if len(cache) >= 16:
            cache.clear()
        cache[key] = (idx.copy(), incidence)
        return incidence

    def infer_shape(self, *args: Any) -> list[tuple]:  # (fgraph, node, shapes) on pytensor 2.x, (node, shapes) on 3.x
        shapes = args[-1]
        return [shapes[0]]


class TakeColumns(Op):
    """``x[:, idx]`` of a matrix: the gather of a transposed batch done on its contiguous layout."""

    __props__ = ()

    def make_node(self, x: Any, idx: Any) -> Apply:
        x, idx = pt.as_tensor_variable(x), pt.as_tensor_variable(idx)
        out = pt.TensorType(x.dtype, shape=(x.type.shape[0], idx.type.shape[0]))()
        return Apply(self, [x, idx], [out])

    def perform(self, node: Apply, inputs: list[np.ndarray], outputs: list[list[Any]]) -> None:
        x, idx = inputs
        outputs[0][0] = np.take(x, idx, axis=1)

    def infer_shape(self, *args: Any) -> list[tuple]:  # (fgraph, node, shapes) on pytensor 2.x, (node, shapes) on 3.x
        shapes = args[-1]
        return [(shapes[0][0], shapes[1][0])]


if AdvancedIncSubtensor1 is not None:

    @node_rewriter([AdvancedSubtensor1])
    def take_rows_of_a_transpose(fgraph: Any, node: Apply) -> list[Any] | None:
        """``transpose(x)[idx]`` (rows of a transposed matrix, strided) as ``transpose(x[:, idx])`` (contiguous)."""
        source, idx = node.inputs
        owner = source.owner
        if owner is None or not isinstance(owner.op, DimShuffle) or tuple(owner.op.new_order) != (1, 0):
            return None
        return [TakeColumns()(owner.inputs[0], idx).T]

    @node_rewriter([AdvancedIncSubtensor1])
    def scatter_rows_by_product(fgraph: Any, node: Apply) -> list[Any] | None:
        """Replace an increment (not a set) of rows of a matrix (or higher) by :class:`ScatterAddRows`."""
        op = node.op
        x, y, idx = node.inputs
        if op.set_instead_of_inc or x.ndim < 2 or x.dtype not in ("float64", "float32"):
            return None
        return [ScatterAddRows()(x, y, idx)]

    optdb.register(
        "take_rows_of_a_transpose", in2out(take_rows_of_a_transpose, name="take_rows_of_a_transpose"), SCATTER_TAG,
        position=48.4,
    )  # fmt: skip
    optdb.register(
        "scatter_rows_by_product", in2out(scatter_rows_by_product, name="scatter_rows_by_product"), SCATTER_TAG,
        position=48.5,
    )  # fmt: skip


def with_fast_kernels(mode: Any) -> Mode:
    """``mode`` (a name, a Mode or None for pytensor's default) with this module's rewrites included."""
    mode = get_mode(mode)
    return mode.including(SCATTER_TAG) if AdvancedIncSubtensor1 is not None else mode
