"""The sparsity pattern of a Hessian, read off the pytensor graph, and a column colouring for compressed products.

For every variable ``v`` of the graph we propagate a sparse boolean matrix ``D_v`` (elements of ``v`` x n) saying
which elements of ``wrt`` each element of ``v`` depends on. Structural ops (indexing, reshapes, broadcasting,
concatenation, reductions, products with constant matrices) move or combine rows; every node that is nonlinear
in its ``wrt``-dependent inputs adds ``D_out^T D_out`` to the pattern (a sum over its output elements of the
outer products of their dependencies). By the chain rule a second derivative can only arise at such a node, so
the pattern is never too small. Unknown ops fall back to "depends on everything its inputs depend on" and warn:
the pattern may then be too large, never too small.

The index maps of structural ops are found by running the op's own ``perform`` on arrays of element indices,
so every indexing and reshaping variant pytensor supports is covered by the op's own semantics. This needs the
values of the non-``wrt`` inputs (index arrays, shapes), obtained by evaluating the graph once at a point.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytensor
import scipy.sparse as sp
from pytensor import scalar as ps
from pytensor.graph.basic import Constant, Variable

try:  # pytensor >= 2.3x moved graph walks to pytensor.graph.traversal
    from pytensor.graph.traversal import graph_inputs, io_toposort
except ImportError:  # pragma: no cover
    from pytensor.graph.basic import graph_inputs, io_toposort
from pytensor.tensor.basic import Alloc, Join, MakeVector, Split
from pytensor.tensor.elemwise import CAReduce, DimShuffle, Elemwise
from pytensor.tensor.math import Dot, Sum
from pytensor.tensor.shape import Reshape, SpecifyShape
from pytensor.tensor.subtensor import AdvancedSubtensor, Subtensor

try:  # pytensor 3 folds AdvancedSubtensor1 into AdvancedSubtensor
    from pytensor.tensor.subtensor import AdvancedSubtensor1
except ImportError:  # pragma: no cover
    AdvancedSubtensor1 = AdvancedSubtensor

# Elementwise scalar ops that are linear in each argument separately (products are handled apart).
_LINEAR_SCALAR_OPS = (ps.Add, ps.Sub, ps.Neg, ps.Identity, ps.Cast)
# Ops whose output is a rearrangement (or a subset, or a broadcast) of their first input.
_MAPPING_OPS = (DimShuffle, Subtensor, AdvancedSubtensor1, AdvancedSubtensor, Reshape, SpecifyShape, Alloc)


def _is_identity_like(op: Any) -> bool:
    """Checks and asserts (PyMC's parameter checks) return their first input unchanged."""
    name = type(op).__name__
    return name in (
        "CheckParameterValue", "Assert", "CheckAndRaise", "ViewOp", "OutputGuard", "DeepCopyOp", "ScalarFromTensor",
        "TensorFromScalar",
    )  # fmt: skip


def hessian_pattern(
    cost: Variable,
    wrt: Variable,
    point: Mapping[Variable, np.ndarray] | None = None,
) -> sp.csr_matrix:
    """Sparsity pattern (bool, n x n, symmetric) of the Hessian of the scalar ``cost`` in the vector ``wrt``.

    Parameters
    ----------
    cost : TensorVariable
        A scalar expression.
    wrt : TensorVariable
        A 1-D input of the graph of ``cost``.
    point : dict, optional
        Values of the root inputs of the graph (``wrt`` included), used to evaluate index arrays and shapes once.
        Defaults to zeros of each input's static shape (``wrt``'s static length must be known then).

    Returns
    -------
    scipy.sparse.csr_matrix
        ``True`` wherever the Hessian may be nonzero.
    """
    inputs = [v for v in graph_inputs([cost]) if not isinstance(v, Constant)]
    values = dict(point or {})
    for var in inputs:
        if var not in values and not hasattr(var, "get_value"):
            if any(s is None for s in var.type.shape):
                raise ValueError(f"give a value of {var} in `point`: its shape is not static")
            values[var] = np.zeros(var.type.shape, dtype=var.type.dtype)
    n = int(np.size(values[wrt]))
    nodes = io_toposort(inputs, [cost])
    variables = [out for node in nodes for out in node.outputs]
    evaluate = pytensor.function(
        [v for v in inputs if not hasattr(v, "get_value")], variables, mode="FAST_COMPILE", on_unused_input="ignore"
    )
    computed = evaluate(*[values[v] for v in inputs if not hasattr(v, "get_value")])
    value_of: dict[Variable, np.ndarray] = {v: np.asarray(x) for v, x in zip(variables, computed, strict=True)}
    for v in inputs:
        value_of[v] = np.asarray(values[v]) if not hasattr(v, "get_value") else np.asarray(v.get_value())

    deps: dict[Variable, sp.csr_matrix] = {wrt: sp.identity(n, dtype=bool, format="csr")}
    hessian = sp.csr_matrix((n, n), dtype=bool)
    for node in nodes:
        dependent = [i for i in node.inputs if i in deps]
        if not dependent:
            continue
        outputs, nonlinear = _propagate(node, deps, value_of, n)
        for out, d in zip(node.outputs, outputs, strict=True):
            if d is not None:
                deps[out] = d
        for d in nonlinear:
            hessian = hessian + (d.T @ d).astype(bool)
    hessian = (hessian + hessian.T).astype(bool)
    return sp.csr_matrix(hessian)


def _value(var: Variable, value_of: Mapping[Variable, np.ndarray]) -> np.ndarray:
    if isinstance(var, Constant):
        return np.asarray(var.data)
    return value_of[var]


def _mapping_matrix(index_map: np.ndarray, in_size: int) -> sp.csr_matrix:
    """S (out x in) with S[e, index_map[e]] = 1."""
    index_map = np.asarray(index_map, dtype=np.int64).ravel()
    out_size = index_map.size
    return sp.csr_matrix(
        (np.ones(out_size, dtype=bool), (np.arange(out_size), index_map)), shape=(out_size, in_size)
    )


def _run_on_indices(node: Any, position: int, value_of: Mapping[Variable, np.ndarray]) -> np.ndarray:
    """Run the node's op with input ``position`` replaced by the (float) indices of its elements."""
    return _run_all_on_indices(node, position, value_of)[0]


def _run_all_on_indices(node: Any, position: int, value_of: Mapping[Variable, np.ndarray]) -> list[np.ndarray]:
    """Every output of the node's op, run with input ``position`` replaced by the indices of its elements."""
    args = [_value(i, value_of) for i in node.inputs]
    shape = np.shape(args[position])
    args[position] = np.arange(int(np.prod(shape, dtype=np.int64)), dtype=np.float64).reshape(shape)
    storage = [[None] for _ in node.outputs]
    node.op.perform(node, args, storage)
    return [np.asarray(cell[0]) for cell in storage]


def _union(matrices: list[sp.csr_matrix]) -> sp.csr_matrix:
    total = matrices[0]
    for m in matrices[1:]:
        total = total + m
    return sp.csr_matrix(total.astype(bool))


def _propagate(
    node: Any, deps: Mapping[Variable, sp.csr_matrix], value_of: Mapping[Variable, np.ndarray], n: int
) -> tuple[list[sp.csr_matrix | None], list[sp.csr_matrix]]:
    """Dependencies of the node's outputs, and the dependency matrices whose outer products enter the Hessian."""
    op = node.op
    out_value = value_of.get(node.outputs[0])
    out_size = int(np.size(out_value)) if out_value is not None else None
    dependent = [k for k, i in enumerate(node.inputs) if i in deps]

    if all(not str(getattr(out.type, "dtype", "float")).startswith(("float", "complex")) for out in node.outputs):
        # comparisons, masks and indices: no derivative flows through them
        empty = [sp.csr_matrix((max(int(np.size(value_of.get(out, 0))), 1), n), dtype=bool) for out in node.outputs]
        return empty, []

    if _is_identity_like(op) and 0 in dependent:
        return [deps[node.inputs[0]]] + [None] * (len(node.outputs) - 1), []

    if isinstance(op, Elemwise):
        out_shape = np.shape(out_value)
        mapped = []
        for k in dependent:
            in_shape = np.shape(_value(node.inputs[k], value_of))
            index = np.broadcast_to(np.arange(int(np.prod(in_shape, dtype=np.int64))).reshape(in_shape), out_shape)
            mapped.append(_mapping_matrix(index, int(np.prod(in_shape, dtype=np.int64))) @ deps[node.inputs[k]])
        d_out = _union(mapped)
        scalar_op = op.scalar_op
        if isinstance(scalar_op, _LINEAR_SCALAR_OPS):
            nonlinear = []
        elif isinstance(scalar_op, ps.Switch):
            nonlinear = []  # piecewise: the condition is not differentiated, each branch enters linearly
        elif isinstance(scalar_op, ps.Mul) and len(dependent) == 1:
            nonlinear = []
        elif isinstance(scalar_op, ps.TrueDiv) and dependent == [0]:
            nonlinear = []
        else:
            nonlinear = [d_out]
        return [d_out] * len(node.outputs), nonlinear

    if isinstance(op, _MAPPING_OPS) and dependent == [0]:
        index = _run_on_indices(node, 0, value_of)
        in_size = int(np.size(_value(node.inputs[0], value_of)))
        return [_mapping_matrix(index, in_size) @ deps[node.inputs[0]]], []

    if isinstance(op, Split) and dependent == [0]:  # each output is a slice of the input
        in_size = int(np.size(_value(node.inputs[0], value_of)))
        pieces = _run_all_on_indices(node, 0, value_of)
        return [_mapping_matrix(piece, in_size) @ deps[node.inputs[0]] for piece in pieces], []

    if isinstance(op, CAReduce):
        in_value = _value(node.inputs[0], value_of)
        if in_value.ndim == 0:  # reducing a scalar is the identity
            return [deps[node.inputs[0]]], []
        axes = tuple(range(in_value.ndim)) if op.axis is None else tuple(a % in_value.ndim for a in op.axis)
        keep = [a for a in range(in_value.ndim) if a not in axes]
        coords = np.indices(in_value.shape).reshape(in_value.ndim, -1)
        kept_shape = tuple(in_value.shape[a] for a in keep)
        target = np.ravel_multi_index(coords[keep], kept_shape) if keep else np.zeros(coords.shape[1], dtype=int)
        size_out = int(np.prod(kept_shape, dtype=np.int64))
        reduce = sp.csr_matrix(
            (np.ones(target.size, dtype=bool), (target, np.arange(target.size))), shape=(size_out, target.size)
        )
        d_out = sp.csr_matrix((reduce @ deps[node.inputs[0]]).astype(bool))
        linear = isinstance(op, Sum) or isinstance(op.scalar_op, (ps.Add, ps.ScalarMaximum, ps.ScalarMinimum))
        return [d_out], [] if linear else [d_out]

    if isinstance(op, (Join, MakeVector)):
        start = 1 if _has_axis_input(node) else 0
        mapped = []
        for k in dependent:
            if k < start:
                return _fallback(node, deps, value_of, n)
            index = _run_on_indices_join(node, k, value_of)
            mask = index >= 0
            in_size = int(np.size(_value(node.inputs[k], value_of)))
            rows = np.flatnonzero(mask)
            select = sp.csr_matrix(
                (np.ones(rows.size, dtype=bool), (rows, index[mask].astype(np.int64))), shape=(index.size, in_size)
            )
            mapped.append(select @ deps[node.inputs[k]])
        return [_union(mapped)], []

    if isinstance(op, Dot) or type(op).__name__ in ("Dot22", "Gemv", "Dot22Scalar"):
        if len(dependent) == 1 and len(node.inputs) == 2:
            k = dependent[0]
            other = _value(node.inputs[1 - k], value_of)
            mine = _value(node.inputs[k], value_of)
            pattern = sp.csr_matrix(np.atleast_2d(other != 0))
            if k == 1:  # C @ v or C @ V: out[i, q] <- V[j, q] where C[i, j] != 0
                cols = 1 if mine.ndim == 1 else mine.shape[1]
                if other.ndim == 1:
                    pattern = sp.csr_matrix(np.atleast_2d(other != 0))
                mapping = sp.kron(pattern, sp.identity(cols, dtype=bool), format="csr")
            else:  # v @ C or V @ C: out[p, j] <- V[p, i] where C[i, j] != 0
                rows = 1 if mine.ndim == 1 else mine.shape[0]
                pat = sp.csr_matrix(np.atleast_2d(other != 0).T if other.ndim == 2 else np.atleast_2d(other != 0))
                mapping = sp.kron(sp.identity(rows, dtype=bool), pat, format="csr")
            d_out = sp.csr_matrix((mapping @ deps[node.inputs[k]]).astype(bool))
            if d_out.shape[0] == out_size:
                return [d_out], []
        return _fallback(node, deps, value_of, n)

    return _fallback(node, deps, value_of, n)


def _has_axis_input(node: Any) -> bool:
    """pytensor 2's Join takes the axis as its first input; pytensor 3's holds it as a property."""
    first = node.inputs[0] if node.inputs else None
    return isinstance(node.op, Join) and first is not None and first.type.ndim == 0 and "int" in first.type.dtype


def _run_on_indices_join(node: Any, position: int, value_of: Mapping[Variable, np.ndarray]) -> np.ndarray:
    """For concatenations: index of input ``position``'s element at each output element, -1 elsewhere."""
    args = [_value(i, value_of) for i in node.inputs]
    for k, arg in enumerate(args):
        if k == 0 and _has_axis_input(node):
            continue
        shape = np.shape(arg)
        if k == position:
            args[k] = np.arange(int(np.prod(shape, dtype=np.int64)), dtype=np.float64).reshape(shape)
        else:
            args[k] = np.full(shape, -1.0)
    storage = [[None]]
    node.op.perform(node, args, storage)
    return np.asarray(storage[0][0]).ravel()


def _fallback(
    node: Any, deps: Mapping[Variable, sp.csr_matrix], value_of: Mapping[Variable, np.ndarray], n: int
) -> tuple[list[sp.csr_matrix | None], list[sp.csr_matrix]]:
    """Every output element depends on everything any input depends on; the op is treated as nonlinear."""
    warnings.warn(
        f"Hessian pattern: no rule for {node.op}; assuming each of its outputs depends on every random effect its "
        "inputs depend on (the pattern may be denser than needed)",
        UserWarning,
        stacklevel=3,
    )
    row = _union([sp.csr_matrix(deps[i].sum(axis=0).astype(bool)) for i in node.inputs if i in deps])
    outputs = []
    for out in node.outputs:
        size = int(np.size(value_of[out])) if out in value_of else 1
        outputs.append(sp.csr_matrix(sp.vstack([row] * max(size, 1)).astype(bool)))
    return outputs, [row]


def color_columns(pattern: sp.spmatrix) -> np.ndarray:
    """Greedy colouring of the columns so that no two columns of one colour share a nonzero row.

    Largest-degree first (Coleman and More, 1983). A diagonal pattern gets one colour; a block-diagonal one
    gets as many colours as its largest block, whatever the number of blocks.
    """
    pattern = sp.csr_matrix(pattern, dtype=bool)
    n = pattern.shape[1]
    conflicts = sp.csr_matrix((pattern.T @ pattern).astype(bool))
    degree = np.diff(conflicts.indptr)
    colors = np.full(n, -1, dtype=np.int64)
    for j in np.argsort(-degree, kind="stable"):
        neighbours = conflicts.indices[conflicts.indptr[j] : conflicts.indptr[j + 1]]
        used = set(colors[neighbours][colors[neighbours] >= 0].tolist())
        color = 0
        while color in used:
            color += 1
        colors[j] = color
    return colors


def recover_from_compressed(pattern: sp.spmatrix, colors: np.ndarray, products: np.ndarray) -> sp.csr_matrix:
    """The sparse matrix on ``pattern`` from its compressed products ``products[c] = H @ indicator(colour c)``."""
    coo = sp.coo_matrix(pattern, dtype=bool)
    values = np.asarray(products)[colors[coo.col], coo.row]
    return sp.csr_matrix((values, (coo.row, coo.col)), shape=pattern.shape)


__all__ = ["color_columns", "hessian_pattern", "recover_from_compressed"]
