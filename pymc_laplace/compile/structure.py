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

The pattern is structural in the other inputs (the outer parameters): where a matrix that multiplies ``wrt``
depends on them, the walk uses where that matrix *can* be nonzero for some value of them (a nonzero mask
propagated from the graph's constants), never its values at the point. Values of data containers (shared
variables: index arrays, design matrices) are read, and the walk lists the containers it read so that a caller
can check that the pattern still holds after ``pm.set_data``.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytensor
import pytensor.tensor as pt
import scipy.sparse as sp
from pytensor import scalar as ps
from pytensor.graph.basic import Constant, Variable

try:  # pytensor >= 2.3x moved graph walks to pytensor.graph.traversal
    from pytensor.graph.traversal import graph_inputs, io_toposort
except ImportError:  # pragma: no cover
    from pytensor.graph.basic import graph_inputs, io_toposort
from pytensor.tensor.basic import Alloc, Join, MakeVector, Split
from pytensor.tensor.blockwise import Blockwise
from pytensor.tensor.elemwise import CAReduce, DimShuffle, Elemwise
from pytensor.tensor.math import Dot, Sum
from pytensor.tensor.shape import Reshape, SpecifyShape
from pytensor.tensor.subtensor import AdvancedIncSubtensor, AdvancedSubtensor, IncSubtensor, Subtensor

try:  # pytensor 3 moved the linear-algebra ops to pytensor.tensor.linalg
    from pytensor.tensor.linalg import SolveBase
except ImportError:  # pragma: no cover
    from pytensor.tensor.slinalg import SolveBase

try:  # pytensor 3 folds AdvancedSubtensor1 and AdvancedIncSubtensor1 into the general ops
    from pytensor.tensor.subtensor import AdvancedIncSubtensor1, AdvancedSubtensor1
except ImportError:  # pragma: no cover
    AdvancedSubtensor1, AdvancedIncSubtensor1 = AdvancedSubtensor, AdvancedIncSubtensor

from pymc_laplace.compile.linking import link_inner_functions, python_mode

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


@dataclass(frozen=True)
class GraphPattern:
    """What the graph walk found.

    Attributes
    ----------
    pattern : scipy.sparse.csr_matrix
        Bool (n x n), symmetric: ``True`` wherever the Hessian can be nonzero.
    fallback_ops : tuple of str
        Ops without a rule whose safe fallback coupled elements that were not coupled before (the pattern may be
        denser than needed because of them).
    data_inputs : tuple of Variable
        The shared variables (data containers) whose values the walk read: the pattern holds for those values.
    """

    pattern: sp.csr_matrix
    fallback_ops: tuple[str, ...]
    data_inputs: tuple[Variable, ...]


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
        Defaults to zeros of each input's static shape (``wrt``'s static length must be known then). The pattern
        does not depend on the values given to the other inputs, only on their shapes.

    Returns
    -------
    scipy.sparse.csr_matrix
        ``True`` wherever the Hessian may be nonzero, for any value of the inputs other than data containers.
    """
    return walk_hessian_pattern(cost, wrt, point).pattern


def walk_hessian_pattern(
    cost: Variable,
    wrt: Variable,
    point: Mapping[Variable, np.ndarray] | None = None,
    *,
    warn: bool = True,
) -> GraphPattern:
    """:func:`hessian_pattern` with the ops that fell back and the data containers that were read."""
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
    # evaluated once, by Python code (see pymc_laplace.compile.linking)
    evaluate = link_inner_functions(
        pytensor.function(
            [v for v in inputs if not hasattr(v, "get_value")], variables, mode=python_mode(), on_unused_input="ignore"
        ),
        python_mode(),
    )
    computed = evaluate(*[values[v] for v in inputs if not hasattr(v, "get_value")])
    value_of: dict[Variable, np.ndarray] = {v: np.asarray(x) for v, x in zip(variables, computed, strict=True)}
    data_inputs = tuple(v for v in inputs if hasattr(v, "get_value"))
    for v in inputs:
        value_of[v] = np.asarray(values[v]) if not hasattr(v, "get_value") else np.asarray(v.get_value())
    # where each variable that does not depend on wrt can be nonzero; parameters can be anything
    nonzero: dict[Variable, np.ndarray] = {
        v: (value_of[v] != 0) if hasattr(v, "get_value") else np.ones(np.shape(value_of[v]), dtype=bool) for v in inputs
    }
    free = {v for v in inputs if not hasattr(v, "get_value")}  # variables that depend on the parameters

    deps: dict[Variable, sp.csr_matrix] = {wrt: sp.identity(n, dtype=bool, format="csr")}
    hessian = sp.csr_matrix((n, n), dtype=bool)
    fallbacks: list[str] = []
    for node in nodes:
        if any(i in free for i in node.inputs):
            free.update(node.outputs)
        dependent = [i for i in node.inputs if i in deps]
        if not dependent:
            for out, mask in zip(node.outputs, _nonzero_masks(node, nonzero, value_of, free), strict=True):
                nonzero[out] = mask
            continue
        outputs, nonlinear, fell_back = _propagate(node, deps, value_of, nonzero, n)
        if fell_back:
            fallbacks.append(str(node.op))
        for out, d in zip(node.outputs, outputs, strict=True):
            if d is not None:
                deps[out] = d
        for d in nonlinear:
            hessian = hessian + (d.T @ d).astype(bool)
    hessian = sp.csr_matrix((hessian + hessian.T).astype(bool))
    if fallbacks and warn:
        warnings.warn(
            f"Hessian pattern: no rule for {sorted(set(fallbacks))}; each output of these ops is taken to depend on "
            "every element its inputs depend on, which coupled random effects that are otherwise independent (the "
            "pattern may be denser, and the inner solve slower, than needed; it is never too sparse)",
            UserWarning,
            stacklevel=3,
        )
    return GraphPattern(hessian, tuple(dict.fromkeys(fallbacks)), data_inputs)


# Elementwise scalar ops whose output is nonzero only where some input is (or, for products, every input is).
_NONZERO_IF_ANY = (ps.Add, ps.Sub, ps.Switch)
_NONZERO_IF_ALL = (ps.Mul,)
_NONZERO_LIKE_FIRST = (ps.Neg, ps.Identity, ps.Cast, ps.Abs, ps.Sqr, ps.Sqrt, ps.TrueDiv, ps.Sign)
# Ops that only move, select, sum or multiply elements: run on 0/1 masks, their output is nonzero at most where
# the result is (no cancellation can occur among non-negative numbers).
_MASK_SAFE_OPS = (
    DimShuffle, Subtensor, AdvancedSubtensor1, AdvancedSubtensor, Reshape, SpecifyShape, Alloc, Join, MakeVector,
    Split, IncSubtensor, AdvancedIncSubtensor1, AdvancedIncSubtensor, Dot,
)  # fmt: skip


def _nonzero_masks(
    node: Any,
    nonzero: Mapping[Variable, np.ndarray],
    value_of: Mapping[Variable, np.ndarray],
    free: set[Variable],
) -> list[np.ndarray]:
    """Where each output of a node that does not depend on ``wrt`` can be nonzero, for any parameter value."""
    outs = node.outputs
    everywhere = [np.ones(np.shape(value_of.get(out, 0.0)), dtype=bool) for out in outs]

    def mask_of(var: Variable) -> np.ndarray:
        if isinstance(var, Constant):
            return np.asarray(var.data) != 0
        return nonzero.get(var, np.ones(np.shape(value_of.get(var, 0.0)), dtype=bool))

    if not any(i in free for i in node.inputs):
        # a function of constants and data only: its values are its structure
        return [
            np.asarray(value_of[out]) != 0 if out in value_of else e for out, e in zip(outs, everywhere, strict=True)
        ]
    op = node.op
    try:
        if isinstance(op, Elemwise):
            masks = [mask_of(i) for i in node.inputs]
            shape = np.shape(value_of[outs[0]])
            scalar = op.scalar_op
            if isinstance(scalar, ps.Switch):
                masks = masks[1:]
            if isinstance(scalar, _NONZERO_IF_ANY):
                out = np.zeros(shape, dtype=bool)
                for m in masks:
                    out = out | np.broadcast_to(m, shape)
                return [out] * len(outs)
            if isinstance(scalar, _NONZERO_IF_ALL):
                out = np.ones(shape, dtype=bool)
                for m in masks:
                    out = out & np.broadcast_to(m, shape)
                return [out] * len(outs)
            if isinstance(scalar, _NONZERO_LIKE_FIRST):
                return [np.broadcast_to(masks[0], shape).copy()] * len(outs)
            return everywhere
        if isinstance(op, _MASK_SAFE_OPS) or (
            isinstance(op, CAReduce) and isinstance(op.scalar_op, (ps.Add, ps.Mul, ps.ScalarMaximum))
        ):
            args = []
            for i in node.inputs:
                value = _value(i, value_of)
                is_float = str(getattr(i.type, "dtype", "")).startswith("float")
                args.append(mask_of(i).astype(value.dtype) if is_float else value)
            storage = [[None] for _ in outs]
            op.perform(node, args, storage)
            return [np.asarray(cell[0]) != 0 for cell in storage]
    except Exception:  # any surprise in running the op on masks: the safe answer
        return everywhere
    return everywhere


def _value(var: Variable, value_of: Mapping[Variable, np.ndarray]) -> np.ndarray:
    if isinstance(var, Constant):
        return np.asarray(var.data)
    return value_of[var]


def _mapping_matrix(index_map: np.ndarray, in_size: int) -> sp.csr_matrix:
    """S (out x in) with S[e, index_map[e]] = 1."""
    index_map = np.asarray(index_map, dtype=np.int64).ravel()
    out_size = index_map.size
    return sp.csr_matrix((np.ones(out_size, dtype=bool), (np.arange(out_size), index_map)), shape=(out_size, in_size))


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
    node: Any,
    deps: Mapping[Variable, sp.csr_matrix],
    value_of: Mapping[Variable, np.ndarray],
    nonzero: Mapping[Variable, np.ndarray],
    n: int,
) -> tuple[list[sp.csr_matrix | None], list[sp.csr_matrix], bool]:
    """Dependencies of the node's outputs, the dependency matrices whose outer products enter the Hessian, and
    whether the op had no rule (the safe fallback was used)."""
    op = node.op
    out_value = value_of.get(node.outputs[0])
    out_size = int(np.size(out_value)) if out_value is not None else None
    dependent = [k for k, i in enumerate(node.inputs) if i in deps]

    if all(not str(getattr(out.type, "dtype", "float")).startswith(("float", "complex")) for out in node.outputs):
        # comparisons, masks and indices: no derivative flows through them
        empty = [sp.csr_matrix((max(int(np.size(value_of.get(out, 0))), 1), n), dtype=bool) for out in node.outputs]
        return empty, [], False

    if _is_identity_like(op) and 0 in dependent:
        return [deps[node.inputs[0]]] + [None] * (len(node.outputs) - 1), [], False

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
        elif isinstance(scalar_op, ps.Second) and dependent == [1]:
            nonlinear = []  # fill: the second input broadcast to the first one's shape
        elif isinstance(scalar_op, ps.Mul) and len(dependent) == 1:
            nonlinear = []
        elif isinstance(scalar_op, ps.TrueDiv) and dependent == [0]:
            nonlinear = []
        else:
            nonlinear = [d_out]
        return [d_out] * len(node.outputs), nonlinear, False

    if isinstance(op, _MAPPING_OPS) and dependent == [0]:
        index = _run_on_indices(node, 0, value_of)
        in_size = int(np.size(_value(node.inputs[0], value_of)))
        return [_mapping_matrix(index, in_size) @ deps[node.inputs[0]]], [], False

    if isinstance(op, Split) and dependent == [0]:  # each output is a slice of the input
        in_size = int(np.size(_value(node.inputs[0], value_of)))
        pieces = _run_all_on_indices(node, 0, value_of)
        return [_mapping_matrix(piece, in_size) @ deps[node.inputs[0]] for piece in pieces], [], False

    if isinstance(op, (IncSubtensor, AdvancedIncSubtensor1, AdvancedIncSubtensor)) and set(dependent) <= {0, 1}:
        try:
            return [_scatter(node, deps, value_of, dependent)], [], False
        except Exception:  # an indexing variant the matching read cannot reproduce: the safe answer
            return _fallback(node, deps, value_of, n)

    if isinstance(op, CAReduce) or (type(op).__name__ == "LogSumExp" and dependent == [0]):
        # CAReduce, and pytensor 3's LogSumExp (a nonlinear reduction over `axis`, as PyMC's mixtures use)
        in_value = _value(node.inputs[0], value_of)
        if in_value.ndim == 0:  # reducing a scalar is the identity
            return [deps[node.inputs[0]]], [] if isinstance(op, CAReduce) else [deps[node.inputs[0]]], False
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
        linear = isinstance(op, Sum) or (
            isinstance(op, CAReduce) and isinstance(op.scalar_op, (ps.Add, ps.ScalarMaximum, ps.ScalarMinimum))
        )
        return [d_out], [] if linear else [d_out], False

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
        return [_union(mapped)], [], False

    if isinstance(op, Dot) or type(op).__name__ in ("Dot22", "Gemv", "Dot22Scalar"):
        if len(dependent) == 1 and len(node.inputs) == 2:
            k = dependent[0]
            # where the other factor can be nonzero for some parameter value, not where it is nonzero now
            other = _structural_nonzero(node.inputs[1 - k], value_of, nonzero)
            mine = _value(node.inputs[k], value_of)
            if k == 1:  # C @ v or C @ V: out[i, q] <- V[j, q] where C[i, j] != 0
                cols = 1 if mine.ndim == 1 else mine.shape[1]
                mapping = sp.kron(sp.csr_matrix(np.atleast_2d(other)), sp.identity(cols, dtype=bool), format="csr")
            else:  # v @ C or V @ C: out[p, j] <- V[p, i] where C[i, j] != 0
                rows = 1 if mine.ndim == 1 else mine.shape[0]
                pat = sp.csr_matrix(np.atleast_2d(other).T if other.ndim == 2 else np.atleast_2d(other))
                mapping = sp.kron(sp.identity(rows, dtype=bool), pat, format="csr")
            d_out = sp.csr_matrix((mapping @ deps[node.inputs[k]]).astype(bool))
            if d_out.shape[0] == out_size:
                return [d_out], [], False
        return _fallback(node, deps, value_of, n)

    core = op.core_op if isinstance(op, Blockwise) else op
    if len(node.outputs) == 1 and (isinstance(op, Blockwise) or isinstance(core, SolveBase)):
        return _batched(node, core, deps, value_of, dependent, n)

    return _fallback(node, deps, value_of, n)


def _structural_nonzero(
    var: Variable, value_of: Mapping[Variable, np.ndarray], nonzero: Mapping[Variable, np.ndarray]
) -> np.ndarray:
    if isinstance(var, Constant):
        return np.asarray(var.data) != 0
    mask = nonzero.get(var)
    return np.ones(np.shape(value_of[var]), dtype=bool) if mask is None else mask


def _core_ndims(node: Any, core: Any) -> tuple[list[int], int]:
    """Number of core (non-batch) dimensions of each input and of the output of a (possibly batched) op."""
    if isinstance(node.op, Blockwise):
        return [len(sig) for sig in node.op.inputs_sig], len(node.op.outputs_sig[0])
    return [i.type.ndim for i in node.inputs], node.outputs[0].type.ndim


def _batched(
    node: Any,
    core: Any,
    deps: Mapping[Variable, sp.csr_matrix],
    value_of: Mapping[Variable, np.ndarray],
    dependent: list[int],
    n: int,
) -> tuple[list[sp.csr_matrix | None], list[sp.csr_matrix], bool]:
    """Ops applied independently along batch dimensions (``Blockwise``, and linear solves).

    Output elements of one batch index depend only on input elements of the same (broadcast) batch index. Within
    a batch, a linear solve ``A^-1 B`` with only ``B`` depending on ``wrt`` couples the elements of each column
    of ``B`` and is linear; any other core op couples everything within the batch and is taken as nonlinear.
    """
    in_core, out_core = _core_ndims(node, core)
    out_shape = np.shape(value_of[node.outputs[0]])
    batch_shape = out_shape[: len(out_shape) - out_core]
    core_out_shape = out_shape[len(batch_shape) :]
    n_batch = int(np.prod(batch_shape, dtype=np.int64))
    out_index = np.arange(int(np.prod(out_shape, dtype=np.int64))).reshape(n_batch, -1)
    solve_of_b = isinstance(core, SolveBase) and dependent == [1]
    mapped = []
    for k in dependent:
        value = _value(node.inputs[k], value_of)
        core_shape = value.shape[value.ndim - in_core[k] :]
        index = np.arange(value.size).reshape(value.shape)
        index = index.reshape((1,) * (len(batch_shape) - (value.ndim - in_core[k])) + value.shape)
        index = np.broadcast_to(index, batch_shape + core_shape).reshape(n_batch, -1)
        if solve_of_b and len(core_shape) == 2 and len(core_out_shape) == 2:
            # column q of the result depends on column q of B only
            m, cols = core_shape
            rows_in = index.reshape(n_batch, m, cols)
            rows_out = out_index.reshape(n_batch, m, cols)
            out_e = np.broadcast_to(rows_out[:, :, None, :], (n_batch, m, m, cols))
            in_e = np.broadcast_to(rows_in[:, None, :, :], (n_batch, m, m, cols))
        else:
            out_e = np.broadcast_to(out_index[:, :, None], (n_batch, out_index.shape[1], index.shape[1]))
            in_e = np.broadcast_to(index[:, None, :], out_e.shape)
        select = sp.csr_matrix(
            (np.ones(out_e.size, dtype=bool), (out_e.ravel(), in_e.ravel())), shape=(out_index.size, value.size)
        )
        mapped.append(select @ deps[node.inputs[k]])
    d_out = sp.csr_matrix(_union(mapped).astype(bool))
    return [d_out], [] if solve_of_b else [d_out], False


def _scatter(
    node: Any,
    deps: Mapping[Variable, sp.csr_matrix],
    value_of: Mapping[Variable, np.ndarray],
    dependent: list[int],
) -> sp.csr_matrix:
    """``set_subtensor`` / ``inc_subtensor``: the written elements come from ``y``, the others from ``x``.

    Which element of ``x`` each element of ``y`` lands on is found by the matching read (``x[idx]``) run on the
    indices of ``x``; an increment keeps ``x``'s dependencies where it writes, a set drops them.
    """
    x_value = _value(node.inputs[0], value_of)
    idx = [_value(i, value_of) for i in node.inputs[2:]]
    op = node.op
    if isinstance(op, IncSubtensor):
        read_op = Subtensor(op.idx_list)
    elif isinstance(op, AdvancedIncSubtensor1) and AdvancedIncSubtensor1 is not AdvancedIncSubtensor:
        read_op = AdvancedSubtensor1()
    else:
        read_op = AdvancedSubtensor(op.idx_list) if getattr(op, "idx_list", None) is not None else AdvancedSubtensor()
    x_index = np.arange(x_value.size, dtype=np.float64).reshape(x_value.shape)
    read_node = read_op.make_node(pt.as_tensor(x_index), *[pt.as_tensor(v) for v in idx])
    storage: list[list[Any]] = [[None]]
    read_op.perform(read_node, [x_index, *idx], storage)
    targets = np.asarray(storage[0][0]).astype(np.int64)
    y_value = _value(node.inputs[1], value_of)
    targets = np.asarray(targets)
    written = np.zeros(x_value.size, dtype=bool)
    written[targets.ravel()] = True
    mapped = []
    if 0 in dependent:
        keep = np.ones(x_value.size, dtype=bool) if not getattr(op, "set_instead_of_inc", False) else ~written
        rows = np.flatnonzero(keep)
        mapped.append(
            sp.csr_matrix((np.ones(rows.size, dtype=bool), (rows, rows)), shape=(x_value.size, x_value.size))
            @ deps[node.inputs[0]]
        )
    if 1 in dependent:
        y_index = np.broadcast_to(np.arange(y_value.size).reshape(y_value.shape), targets.shape)
        mapped.append(
            sp.csr_matrix(
                (np.ones(targets.size, dtype=bool), (targets.ravel(), y_index.ravel())),
                shape=(x_value.size, y_value.size),
            )
            @ deps[node.inputs[1]]
        )
    return _union(mapped)


def _basic_index(idx_list: Any, values: list[np.ndarray]) -> tuple:
    """The numpy index of a basic ``Subtensor``/``IncSubtensor`` from its ``idx_list`` and index inputs."""
    inputs = iter(values)

    def entry(item: Any) -> Any:
        if isinstance(item, slice):
            return slice(*(entry(p) if p is not None else None for p in (item.start, item.stop, item.step)))
        if isinstance(item, int | np.integer) and not isinstance(item, bool):
            return int(item)
        return int(next(inputs))

    return tuple(entry(item) for item in idx_list)


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
) -> tuple[list[sp.csr_matrix | None], list[sp.csr_matrix], bool]:
    """Every output element depends on everything any input depends on; the op is treated as nonlinear.

    The third value says whether this coupled elements that were not coupled before (then the caller reports
    the op by name)."""
    row = _union([sp.csr_matrix(deps[i].sum(axis=0).astype(bool)) for i in node.inputs if i in deps])
    outputs = []
    for out in node.outputs:
        size = int(np.size(value_of[out])) if out in value_of else 1
        outputs.append(sp.csr_matrix(sp.vstack([row] * max(size, 1)).astype(bool)))
    # it only matters when it couples: some input element that did not already depend on all of them
    widest = max(int(np.diff(deps[i].indptr).max(initial=0)) for i in node.inputs if i in deps)
    return outputs, [row], row.nnz > widest


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


def symmetric_pattern(pattern: sp.spmatrix) -> sp.csr_matrix:
    """``pattern``, its transpose and the diagonal: the entries of a symmetric ``Q`` that are read and factorised."""
    pattern = sp.csr_matrix(pattern, dtype=bool)
    full = pattern + pattern.T + sp.eye(pattern.shape[0], dtype=bool, format="csr")
    full = sp.csr_matrix(full, dtype=bool)
    full.sort_indices()
    return full


def star_color(pattern: sp.spmatrix) -> np.ndarray:
    """Greedy star colouring of the adjacency graph of a symmetric pattern (largest degree first).

    A distance-1 colouring in which every path on four vertices uses at least three colours (Gebremedhin, Manne and
    Pothen, 2005): each entry of a symmetric matrix can then be read directly from the compressed products, from
    the column's colour or from the row's. For crossed random effects it needs far fewer colours than a column
    colouring (every level of one factor may share a colour). Whether each entry can be read is checked by
    :func:`recovery_slots`, not assumed.
    """
    full = symmetric_pattern(pattern)
    n = full.shape[0]
    adjacency = sp.csr_matrix(full - sp.eye(n, dtype=bool, format="csr"), dtype=bool)
    adjacency.eliminate_zeros()
    indptr, indices = adjacency.indptr, adjacency.indices
    degree = np.diff(indptr)
    if adjacency.nnz == 0:  # a diagonal pattern: one colour
        return np.zeros(n, dtype=np.int64)
    colors = np.full(n, -1, dtype=np.int64)
    max_colors = int(degree.max(initial=0)) ** 2 + 2 if n else 1
    # counts[x, a]: coloured neighbours of x with colour a (grown as colours are opened)
    counts = np.zeros((n, min(max_colors, 64)), dtype=np.int32)
    for v in np.argsort(-degree, kind="stable"):
        neighbours = indices[indptr[v] : indptr[v + 1]]
        # the neighbours x of each neighbour w, all at once (x != v, x coloured)
        lengths = indptr[neighbours + 1] - indptr[neighbours]
        offsets = np.repeat(indptr[neighbours] - (np.cumsum(lengths) - lengths), lengths)
        second = indices[np.arange(int(lengths.sum())) + offsets]
        via = np.repeat(neighbours, lengths)
        keep = (second != v) & (colors[second] >= 0)
        second, via = second[keep], via[keep]
        via_color = colors[via]
        # w uncoloured: x's colour is forbidden; w coloured: forbidden if x has another neighbour coloured like w
        # (the path v-w-x-y would be two-coloured)
        blocked = (via_color < 0) | (counts[second, np.maximum(via_color, 0)] >= 2)
        forbidden = [colors[neighbours][colors[neighbours] >= 0], colors[second][blocked]]
        used = np.unique(np.concatenate(forbidden))
        free = np.flatnonzero(np.isin(np.arange(used.size + 1), used, invert=True))
        color = int(free[0])
        if color >= counts.shape[1]:
            counts = np.concatenate([counts, np.zeros_like(counts)], axis=1)
        colors[v] = color
        counts[neighbours, color] += 1
    return colors


def recovery_slots(pattern: sp.spmatrix, colors: np.ndarray) -> sp.csr_matrix | None:
    """Where each entry of a symmetric ``Q`` is read in its compressed products ``HV[c] = Q @ indicator(colour c)``.

    Returns an integer matrix on :func:`symmetric_pattern` with ``c * n + r + 1`` at ``(i, j)`` when
    ``Q[i, j] = HV[c, r]`` identically: ``(colour(j), i)`` when ``j`` is the only column of its colour with a
    structural nonzero in row ``i``, else ``(colour(i), j)`` when ``i`` is the only one of its colour in row ``j``.
    None when some entry can be read neither way (the colouring does not determine ``Q``).
    """
    full = symmetric_pattern(pattern)
    n = full.shape[0]
    colors = np.asarray(colors, dtype=np.int64)
    if n == 0:
        return sp.csr_matrix((0, 0), dtype=np.int64)
    n_colors = int(colors.max()) + 1
    indicator = sp.csr_matrix((np.ones(n, dtype=np.int64), (np.arange(n), colors)), shape=(n, n_colors))
    counts = sp.csr_matrix(full.astype(np.int64) @ indicator)  # counts[r, c]: columns of colour c nonzero in row r
    coo = full.tocoo()
    rows, cols = coo.row.astype(np.int64), coo.col.astype(np.int64)
    direct = np.asarray(counts[rows, colors[cols]]).ravel() == 1
    reverse = np.asarray(counts[cols, colors[rows]]).ravel() == 1
    if not np.all(direct | reverse):
        return None
    slots = np.where(direct, colors[cols] * n + rows, colors[rows] * n + cols) + 1
    out = sp.csr_matrix((slots, (rows, cols)), shape=(n, n))
    out.sort_indices()
    return out


def hessian_coloring(pattern: sp.spmatrix) -> np.ndarray:
    """The colouring of a symmetric ``Q``'s pattern with fewer colours of a column colouring and a star colouring.

    Both are checked to determine every entry (:func:`recovery_slots`); the column colouring always does.
    """
    full = symmetric_pattern(pattern)
    columns = color_columns(full)
    star = star_color(full)
    if star.size and star.max() < columns.max() and recovery_slots(full, star) is not None:
        return star
    return columns


def recover_from_compressed(pattern: sp.spmatrix, colors: np.ndarray, products: np.ndarray) -> sp.csr_matrix:
    """The symmetric matrix on ``symmetric_pattern(pattern)`` from its products ``products[c] = H @ indicator(c)``."""
    slots = recovery_slots(pattern, colors)
    if slots is None:
        raise ValueError("this colouring does not determine every entry of the pattern")
    values = np.asarray(products).ravel()[slots.data - 1]
    return sp.csr_matrix((values, slots.indices, slots.indptr), shape=slots.shape)


__all__ = [
    "GraphPattern",
    "color_columns",
    "hessian_coloring",
    "hessian_pattern",
    "recover_from_compressed",
    "recovery_slots",
    "star_color",
    "symmetric_pattern",
    "walk_hessian_pattern",
]


# ---------------------------------------------------------------------------------------------------------- degree
# Elementwise scalar ops and what they do to the polynomial degree of their arguments in ``wrt``
_DEGREE_MAX_OPS = (ps.Add, ps.Sub)
_DEGREE_SAME_OPS = (ps.Neg, ps.Identity)


def polynomial_degree(output: Variable, wrt: Variable) -> int | None:
    """The degree of ``output`` as a polynomial in ``wrt``, read from the graph; ``None`` where it is not one.

    Degrees move through the ops known to keep a polynomial a polynomial: sums and differences (the larger degree),
    products (the sum), division by and powers to constants (a non-negative integer exponent), rearrangements,
    indexing, broadcasting, reductions by summation, matrix products, triangular or general solves with a matrix
    free of ``wrt``, and PyMC's parameter checks (conditions free of ``wrt``). Any other op on a variable that
    depends on ``wrt`` gives ``None``: the answer may be "not known to be a polynomial" for one that is, never a
    degree too low. A degree of at most 2 means the Hessian in ``wrt`` does not depend on ``wrt`` at all, whatever
    the values of the graph's other inputs.
    """
    degree: dict[Variable, int] = {wrt: 1}
    for node in io_toposort(list(graph_inputs([output])), [output]):
        inputs = [degree.get(var, 0) for var in node.inputs]
        if not any(inputs):
            continue
        out = _node_degree(node, inputs)
        if out is None:
            return None
        for var in node.outputs:
            degree[var] = out
    return degree.get(output, 0)


def _node_degree(node: Any, inputs: list[int]) -> int | None:
    """The degree of ``node``'s outputs in ``wrt`` given its inputs' (at least one positive), or None."""
    op = node.op
    first, rest = inputs[0], inputs[1:]
    if _is_identity_like(op) or isinstance(op, (*_MAPPING_OPS, Sum)):
        # the first input moved, checked or summed; indices, shapes and conditions must be free of wrt
        return first if not any(rest) else None
    if type(op).__name__ in ("Shape", "Shape_i"):
        return 0
    if isinstance(op, (Join, MakeVector)):
        return max(inputs) if not (_has_axis_input(node) and inputs[0]) else None
    if isinstance(op, (IncSubtensor, AdvancedIncSubtensor, AdvancedIncSubtensor1)):
        return max(inputs[:2]) if not any(inputs[2:]) else None
    if isinstance(op, Dot):
        return sum(inputs)
    core = op.core_op if isinstance(op, Blockwise) else op
    if isinstance(core, SolveBase) and len(inputs) == 2:
        return inputs[1] if inputs[0] == 0 else None
    if isinstance(op, Elemwise):
        scalar = op.scalar_op
        if isinstance(scalar, _DEGREE_MAX_OPS):
            return max(inputs)
        if isinstance(scalar, _DEGREE_SAME_OPS):
            return first
        if isinstance(scalar, ps.Cast):
            return first if str(node.outputs[0].dtype).startswith("float") else None
        if isinstance(scalar, ps.Mul):
            return sum(inputs)
        if isinstance(scalar, ps.TrueDiv):
            return first if inputs[1] == 0 else None
        if isinstance(scalar, ps.Sqr):
            return 2 * first
        if isinstance(scalar, ps.Pow) and inputs[1] == 0:
            exponent = _constant_value(node.inputs[1])
            if exponent is not None and exponent >= 0 and float(exponent).is_integer():
                return int(exponent) * first
            return None
        if isinstance(scalar, ps.Switch) and inputs[0] == 0:
            return max(inputs[1:])
    return None


def _constant_value(var: Variable) -> float | None:
    """The value of a scalar constant (possibly broadcast), or None."""
    from pytensor.tensor.basic import get_underlying_scalar_constant_value

    try:
        return float(get_underlying_scalar_constant_value(var))
    except Exception:  # NotScalarConstantError, or a constant that is not one number
        return None
