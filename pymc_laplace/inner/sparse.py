"""Sparse Cholesky of ``Q`` when its pattern does not split into small independent blocks.

Random walks, autoregressive and spatial effects, and crossed random effects couple the random effects into one
large connected block. ``Q`` is then assembled as a sparse matrix from its compressed Hessian-vector products and
factorised with a fill-reducing ordering, ``Q[order][:, order] = L L^T``:

- with CHOLMOD (``pip install pymc_laplace[sparse]``, scikit-sparse, needs SuiteSparse) when it is installed;
- otherwise with SciPy's SuperLU in symmetric mode (minimum-degree ordering of ``Q``, diagonal pivots only),
  from whose ``U = D L_u^T`` the Cholesky factor is ``L = U^T D^-1/2``.

The exact gradient of the Laplace marginal needs the entries of ``Q^-1`` on ``Q``'s pattern: they come from
Takahashi's recursion on the pattern of ``L`` (Takahashi, Fagan and Chin, 1973; Erisman and Tinney, 1975),
never from a dense inverse.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

import numpy as np
import scipy.sparse as sp
from scipy.linalg import solve_triangular
from scipy.sparse.linalg import splu

from pymc_laplace.compile.structure import recovery_slots
from pymc_laplace.errors import ModelSpecificationError

SparseBackend = Literal["cholmod", "superlu"]


def cholmod_available() -> bool:
    """Whether scikit-sparse's CHOLMOD can be imported."""
    try:
        import sksparse.cholmod  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class SparsePattern:
    """The pattern of ``Q`` as coordinate lists, with the column colouring of its compressed products.

    Attributes
    ----------
    n : int
    rows, cols : ndarray of int
        Coordinates of the structurally nonzero entries (both triangles).
    colors : ndarray of int, shape (n,)
    backend : {"cholmod", "superlu"}
    slots : ndarray of int
        Flat index into the compressed products ``(K, n)`` where each entry is read (``structure.recovery_slots``).
    csc_indptr, csc_indices, csc_slots, csc_partner_slots, csc_diagonal : ndarray of int
        The same entries in compressed-column order, each with the slot of its transposed entry and the positions of
        the diagonal: ``Q`` is assembled from the products without a format conversion.
    symbolic : dict
        CHOLMOD's symbolic analysis of the pattern, made at the first factorisation and reused by the others (the
        fill-reducing ordering and the elimination tree depend on the pattern only).
    """

    n: int
    rows: np.ndarray
    cols: np.ndarray
    colors: np.ndarray
    backend: SparseBackend
    slots: np.ndarray
    csc_indptr: np.ndarray
    csc_indices: np.ndarray
    csc_slots: np.ndarray
    csc_partner_slots: np.ndarray
    csc_diagonal: np.ndarray
    symbolic: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def n_colors(self) -> int:
        return int(self.colors.max()) + 1 if self.n else 0

    def factor(self, q_compressed: np.ndarray) -> tuple[SparseFactor | None, np.ndarray]:
        """Cholesky of ``Q``; ``(factor or None, index of a random effect where it is not PD)``."""
        return factor_sparse(self, q_compressed)

    def damped(self, q_compressed: np.ndarray, min_eig: float) -> SparseFactor:
        """Cholesky of ``Q`` shifted until it is positive definite."""
        return damped_sparse(self, q_compressed, min_eig)

    def assemble(self, compressed: np.ndarray, shift: float = 0.0) -> sp.csc_matrix:
        """``Q + shift I`` as a sparse matrix from the compressed products ``(K, n)`` of ``Q``."""
        flat = np.asarray(compressed, dtype=float).ravel()
        # exact products are symmetric to rounding; the factorisations assume symmetry
        values = 0.5 * (flat[self.csc_slots] + flat[self.csc_partner_slots])
        if shift:
            values[self.csc_diagonal] += shift
        return sp.csc_matrix((values, self.csc_indices, self.csc_indptr), shape=(self.n, self.n))


def sparse_pattern(pattern: sp.spmatrix, colors: np.ndarray, backend: SparseBackend) -> SparsePattern:
    slot_matrix = recovery_slots(pattern, colors)  # on the symmetric pattern, with the diagonal
    if slot_matrix is None:
        raise ModelSpecificationError("The colouring does not determine every entry of the Hessian pattern.")
    coo = slot_matrix.tocoo()
    n = pattern.shape[0]
    rows, cols, slots = coo.row.astype(np.int64), coo.col.astype(np.int64), coo.data.astype(np.int64) - 1
    by_column = np.lexsort((rows, cols))
    csc_rows, csc_cols, csc_slots = rows[by_column], cols[by_column], slots[by_column]
    keys = csc_cols * n + csc_rows  # increasing
    partner = np.searchsorted(keys, csc_rows * n + csc_cols)
    if np.any(partner >= keys.size) or np.any(keys[np.minimum(partner, keys.size - 1)] != csc_rows * n + csc_cols):
        raise ModelSpecificationError("The Hessian pattern is not symmetric.")
    diagonal = np.flatnonzero(csc_rows == csc_cols)
    if diagonal.size != n:
        raise ModelSpecificationError("The Hessian pattern lacks diagonal entries.")
    return SparsePattern(
        n, rows, cols, np.asarray(colors, dtype=np.int64), backend, slots,
        csc_indptr=np.searchsorted(csc_cols, np.arange(n + 1)), csc_indices=csc_rows, csc_slots=csc_slots,
        csc_partner_slots=csc_slots[partner], csc_diagonal=diagonal,
    )  # fmt: skip


class NotPositiveDefinite(Exception):
    """Raised by a factorisation; ``column`` is an index of ``Q`` (original order) where it broke down."""

    def __init__(self, column: int) -> None:
        super().__init__(column)
        self.column = column


@dataclass(frozen=True)
class SparseFactor:
    """``Q[order][:, order] = lower @ lower.T`` with a solver for ``Q``.

    Attributes
    ----------
    structure : SparsePattern
    order : ndarray of int
        The fill-reducing permutation.
    make_lower : callable
        ``() -> lower``: the lower Cholesky factor (scipy csc, sorted indices, the diagonal first in every column),
        built when first asked for (:attr:`lower`): the selected inverse of a fit needs it, a draw does not.
    solve_original : callable
        ``rhs -> Q^-1 rhs`` in the original order, for ``rhs`` of shape (n,) or (n, k).
    log_pivots : ndarray
        ``log`` of the squared diagonal of ``lower`` (its sum is ``log det Q``).
    transposed_inverse : callable, optional
        ``z -> P^T L^-T z`` straight from the factorisation (a draw from ``N(0, Q^-1)`` for standard normal ``z``);
        by default it goes through :attr:`lower`.
    """

    structure: SparsePattern
    order: np.ndarray
    make_lower: Callable[[], sp.csc_matrix]
    solve_original: Callable[[np.ndarray], np.ndarray]
    log_pivots: np.ndarray
    transposed_inverse: Callable[[np.ndarray], np.ndarray] | None = None

    @cached_property
    def lower(self) -> sp.csc_matrix:
        return self.make_lower()

    def log_det(self) -> float:
        return float(np.sum(self.log_pivots))

    def solve(self, rhs: np.ndarray) -> np.ndarray:
        """``Q^-1 rhs`` for ``rhs`` of shape (n,) or (n, k)."""
        return np.asarray(self.solve_original(np.asarray(rhs, dtype=float)), dtype=float)

    def sample_given(self, mean: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, float]:
        """A draw ``mean + P^T L^-T z`` from ``N(mean, Q^-1)`` for standard normal ``z``, and its log density.

        ``L^-T z = (L L^T)^-1 L z``: one sparse product and one solve, whatever the backend.
        """
        draws, log_density = self.sample_many(np.asarray(mean)[None, :], np.asarray(z)[None, :])
        return draws[0], float(log_density[0])

    def sample_many(self, means: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Draws ``means[k] + P^T L^-T z[k]`` for rows ``z[k]`` of standard normals, shape (m, n), and their log
        densities (m,): :meth:`sample_given` for many draws, with one solve for all of them."""
        columns = np.ascontiguousarray(np.asarray(z, dtype=float).T)  # (n, m): one right-hand side a draw
        if self.transposed_inverse is not None:
            draws = self.transposed_inverse(columns)
        else:
            lz = np.empty_like(columns)
            lz[self.order] = self.lower @ columns  # L z, taken back to the original order
            draws = self.solve(lz)
        draws = np.asarray(draws, dtype=float).reshape(columns.shape)
        log_density = 0.5 * self.log_det() - 0.5 * means.shape[1] * np.log(2.0 * np.pi) - 0.5 * np.sum(z * z, axis=1)
        return means + draws.T, log_density

    @cached_property
    def selected_inverse(self) -> sp.csc_matrix:
        """The entries of ``(L L^T)^-1`` on the pattern of ``L`` (lower triangle, permuted order)."""
        return takahashi_inverse(self.lower)

    def _inverse_original(self) -> sp.csr_matrix:
        lower_inverse = self.selected_inverse
        full = lower_inverse + sp.triu(lower_inverse.T, k=1)
        inverse_order = np.argsort(self.order)
        return sp.csr_matrix(full)[inverse_order][:, inverse_order]

    def compressed_inverse(self) -> np.ndarray:
        """Entries of ``Q^-1`` on ``Q``'s pattern, compressed like the Hessian-vector products: (K, n)."""
        structure = self.structure
        values = np.asarray(self._inverse_original()[structure.rows, structure.cols]).ravel()
        size = structure.n_colors * structure.n
        # entries read from the same product (Q_ij and Q_ji) add up: phi = sum_ij (Q^-1)_ij Q_ij
        return np.bincount(structure.slots, weights=values, minlength=size).reshape(structure.n_colors, structure.n)

    def diagonal_of_inverse(self) -> np.ndarray:
        lower_inverse = self.selected_inverse
        out = np.empty(self.structure.n)
        out[self.order] = lower_inverse.diagonal()
        return out


def takahashi_inverse(lower: sp.csc_matrix) -> sp.csc_matrix:
    """Takahashi's recursion: ``Z = (L L^T)^-1`` on the pattern of the lower Cholesky factor ``L``.

    By supernodes, from the last to the first: a run of columns ``J`` whose rows below the run are one set ``S`` (the
    columns of a dense block of the factor, as crossed effects and fill-in make them). With ``U = L[S, J] L[J, J]^-1``,
    ``Z[S, J] = -Z[S, S] U`` and ``Z[J, J] = L[J, J]^-T L[J, J]^-1 - U^T Z[S, J]`` (one column: ``Z[s, j] =
    -Z[s, s] L[s, j] / L[j, j]``, ``Z[j, j] = 1 / L[j, j]^2 - L[s, j] @ Z[s, j] / L[j, j]``). ``Z[S, S]`` lies inside
    the pattern of ``L`` (the filled graph is chordal), so only those entries are needed. Where each ``Z[S, S]`` sits
    in the factor's entries depends on its pattern alone: it is worked out once per pattern
    (:func:`_takahashi_plan`) and reused by every factor of that pattern.
    """
    lower = sp.csc_matrix(lower)
    lower.sort_indices()
    indptr, indices, data = lower.indptr, lower.indices, lower.data
    n = lower.shape[0]
    if np.any(indices[indptr[:-1]] != np.arange(n)):
        raise ValueError("the factor must hold its diagonal as the first entry of every column")
    plan = _takahashi_plan(indptr, indices)
    if plan is None:  # too large to keep: worked out supernode by supernode as needed
        plan = _LazyPlan(indptr, indices, _supernodes(indptr, indices))
    z = np.zeros_like(data)
    for k in range(len(plan.starts) - 2, -1, -1):
        first, last = int(plan.starts[k]), int(plan.starts[k + 1]) - 1
        positions = plan[k]  # Z[S, S], (m, m); None when S is empty
        if first == last:  # one column: the scalar recursion, cheapest for the many short columns of long chains
            start, stop = indptr[first], indptr[first + 1]
            l_jj = data[start]
            if positions is None:
                z[start] = 1.0 / l_jj**2
                continue
            l_col = data[start + 1 : stop]
            z_col = -(z[positions] @ l_col) / l_jj
            z[start + 1 : stop] = z_col
            z[start] = 1.0 / l_jj**2 - float(l_col @ z_col) / l_jj
            continue
        rows, cols, where = _supernode_entries(indptr, first, last)
        width = last - first + 1
        block = np.zeros((rows.max() + 1, width))
        block[rows, cols] = data[where]  # [L[J, J]; L[S, J]]
        l_jj_inverse = solve_triangular(block[:width], np.eye(width), lower=True)
        u = block[width:] @ l_jj_inverse
        z_sj = -(z[positions] @ u) if positions is not None else np.zeros((0, width))
        z_jj = l_jj_inverse.T @ l_jj_inverse - u.T @ z_sj
        z[where] = np.vstack([z_jj, z_sj])[rows, cols]
    return sp.csc_matrix((z, indices.copy(), indptr.copy()), shape=lower.shape)


def _supernodes(indptr: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """First column of each supernode, and ``n`` last: runs of columns ``j, j + 1, ...`` where column ``j``'s rows
    are ``j``, ``j + 1`` and exactly the rows of column ``j + 1`` below it."""
    n = indptr.size - 1
    counts = np.diff(indptr)
    candidate = np.zeros(n, dtype=bool)
    if n > 1:
        has_second = counts[:-1] > 1
        second = np.where(has_second, indices[np.minimum(indptr[:-2] + 1, indices.size - 1)], -1)
        candidate[:-1] = has_second & (second == np.arange(1, n)) & (counts[:-1] == counts[1:] + 1)
    # the rows below j + 1 must be the same in both columns, entry by entry (same count, so same positions from the end)
    pairs = np.flatnonzero(candidate)
    lengths = counts[pairs] - 2
    if lengths.sum():
        offsets = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        left = indices[np.repeat(indptr[pairs] + 2, lengths) + offsets]
        right = indices[np.repeat(indptr[pairs + 1] + 1, lengths) + offsets]
        differs = np.bincount(np.repeat(np.arange(pairs.size), lengths), weights=left != right, minlength=pairs.size)
        candidate[pairs[differs > 0]] = False
    return np.append(np.flatnonzero(np.concatenate([[True], ~candidate[:-1]])), n)


def _supernode_entries(indptr: np.ndarray, first: int, last: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows and columns in the dense ``[J; S]`` block of the supernode ``first..last``, and the positions of those
    entries in the factor: column ``first + c`` holds rows ``c..`` of the block, one after the other."""
    starts = indptr[first : last + 1]
    lengths = indptr[first + 1 : last + 2] - starts
    cols = np.repeat(np.arange(last - first + 1), lengths)
    within = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return cols + within, cols, np.repeat(starts, lengths) + within


class _Plan:
    """The supernodes of a factor pattern (``starts``) and, for each, the positions of ``Z[S, S]`` (``plan[k]``)."""

    def __init__(self, starts: np.ndarray, positions: list[np.ndarray | None]) -> None:
        self.starts, self.positions = starts, positions

    def __getitem__(self, k: int) -> np.ndarray | None:
        return self.positions[k]


# Plans of the factor patterns met last (a fit factors matrices of one pattern many times), and the largest plan
# kept (positions, 4 or 8 bytes each); a larger one is worked out supernode by supernode on every use.
_PLANS: dict[tuple, _Plan] = {}
MAX_PLANS = 4
MAX_PLAN_ENTRIES = 40_000_000


class _LazyPlan(_Plan):
    def __init__(self, indptr: np.ndarray, indices: np.ndarray, starts: np.ndarray) -> None:
        self.indptr, self.indices, self.starts = indptr, indices, starts
        self.keys = _entry_keys(indptr, indices)

    def __getitem__(self, k: int) -> np.ndarray | None:
        return _below_positions(self.indptr, self.indices, self.keys, int(self.starts[k + 1]) - 1)


def _takahashi_plan(indptr: np.ndarray, indices: np.ndarray) -> _Plan | None:
    """The supernodes of a lower factor's pattern and, for each, the positions in its entries of ``Z[S, S]``
    (symmetric, (m, m)), ``S`` the rows below the supernode; None when the plan is too large to keep."""
    key = (indptr.size, hashlib.sha256(indptr.tobytes()).digest(), hashlib.sha256(indices.tobytes()).digest())
    if key in _PLANS:
        return _PLANS[key]
    starts = _supernodes(indptr, indices)
    below = np.diff(indptr)[starts[1:] - 1] - 1
    if int(np.sum(below.astype(np.int64) ** 2)) > MAX_PLAN_ENTRIES:
        return None
    keys = _entry_keys(indptr, indices)
    plan = _Plan(starts, [_below_positions(indptr, indices, keys, int(j) - 1) for j in starts[1:]])
    _PLANS[key] = plan
    while len(_PLANS) > MAX_PLANS:
        del _PLANS[next(iter(_PLANS))]
    return plan


def _entry_keys(indptr: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """``column * n + row`` of every entry: increasing, as the factor's entries are sorted by column, then row."""
    n = indptr.size - 1
    return np.repeat(np.arange(n, dtype=np.int64), np.diff(indptr)) * n + indices


def _below_positions(indptr: np.ndarray, indices: np.ndarray, keys: np.ndarray, j: int) -> np.ndarray | None:
    """Positions of ``Z[s, s]`` in the factor's entries, ``s`` the rows of column ``j`` below its diagonal; raises
    when one is missing (a pattern not closed under elimination)."""
    rows = indices[indptr[j] + 1 : indptr[j + 1]]
    if rows.size == 0:
        return None
    n = indptr.size - 1
    low, high = np.minimum.outer(rows, rows), np.maximum.outer(rows, rows)
    wanted = low.astype(np.int64) * n + high  # (row high, column low): the lower triangle holds both
    where = np.minimum(np.searchsorted(keys, wanted), keys.size - 1)
    if np.any(keys[where] != wanted):
        raise ValueError("the factor's pattern is not closed under elimination (a symbolic entry is missing)")
    return where.astype(np.int32) if keys.size < 2**31 else where


def factor_sparse_matrix(q: sp.csc_matrix, structure: SparsePattern) -> SparseFactor:
    """Cholesky factorisation of ``q``; raises :class:`NotPositiveDefinite` when it is not positive definite."""
    if structure.backend == "cholmod":
        return _factor_cholmod(q, structure)
    return _factor_superlu(q, structure)


def _factor_cholmod(q: sp.csc_matrix, structure: SparsePattern) -> SparseFactor:
    from sksparse.cholmod import CholmodError, analyze

    try:  # simplicial LDL^T: it completes on indefinite matrices, whose D then has a pivot <= 0
        symbolic = structure.symbolic.get("cholmod")
        if symbolic is None:
            symbolic = structure.symbolic["cholmod"] = analyze(q, ordering_method="amd", mode="simplicial")
        factor = symbolic.cholesky(q)
        pivots = np.asarray(factor.D(), dtype=float)
    except CholmodError as err:
        raise NotPositiveDefinite(0) from err
    order = np.asarray(factor.P(), dtype=np.int64)
    if np.any(~(pivots > 0)):
        raise NotPositiveDefinite(int(order[np.flatnonzero(~(pivots > 0))[0]]))
    root = np.sqrt(pivots)

    def make_lower() -> sp.csc_matrix:
        unit_lower, _ = factor.L_D()
        lower = sp.csc_matrix(unit_lower @ sp.diags(root))
        lower.sort_indices()
        return lower

    def transposed_inverse(z: np.ndarray) -> np.ndarray:
        # L = L1 D^1/2 with L1 unit lower: L^-T z = L1^-T (D^-1/2 z), then back to the original order
        scaled = z / (root if z.ndim == 1 else root[:, None])
        permuted = np.asarray(factor.solve_Lt(scaled, use_LDLt_decomposition=True), dtype=float)
        out = np.empty_like(permuted)
        out[order] = permuted
        return out

    return SparseFactor(structure, order, make_lower, factor.solve_A, np.log(pivots), transposed_inverse)


def _factor_superlu(q: sp.csc_matrix, structure: SparsePattern) -> SparseFactor:
    try:
        lu = splu(q, permc_spec="MMD_AT_PLUS_A", diag_pivot_thresh=0.0, options={"SymmetricMode": True})
    except RuntimeError as err:  # "Factor is exactly singular"
        raise NotPositiveDefinite(0) from err
    if not np.array_equal(lu.perm_r, lu.perm_c):
        raise NotPositiveDefinite(int(np.flatnonzero(lu.perm_r != lu.perm_c)[0]))  # an off-diagonal pivot
    order = np.argsort(lu.perm_c)
    upper = sp.csc_matrix(lu.U)
    pivots = upper.diagonal()
    if np.any(~(pivots > 0)):
        raise NotPositiveDefinite(int(order[np.flatnonzero(~(pivots > 0))[0]]))
    lower = sp.csc_matrix(upper.T @ sp.diags(1.0 / np.sqrt(pivots)))
    lower.sort_indices()
    return SparseFactor(structure, order, lambda: lower, lu.solve, np.log(pivots))


def factor_sparse(structure: SparsePattern, q_compressed: np.ndarray) -> tuple[SparseFactor | None, np.ndarray]:
    """Cholesky of ``Q``; returns ``(factor or None, index of a random effect where it is not PD)``."""
    try:
        return factor_sparse_matrix(structure.assemble(q_compressed), structure), np.zeros(0, dtype=int)
    except NotPositiveDefinite as err:
        return None, np.array([err.column])


def damped_sparse(structure: SparsePattern, q_compressed: np.ndarray, min_eig: float) -> SparseFactor:
    """Cholesky of ``Q + shift I`` for the smallest shift in ``min_eig * 10^k`` (k = 0, 1, ...) that is PD."""
    shift = min_eig
    for _ in range(40):
        try:
            return factor_sparse_matrix(structure.assemble(q_compressed, shift), structure)
        except NotPositiveDefinite:
            shift *= 10.0
    raise NotPositiveDefinite(0)
