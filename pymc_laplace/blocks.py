"""Linear algebra on a symmetric matrix known through compressed Hessian-vector products.

The matrix ``Q`` (the negative Hessian of the joint log density in the random effects) has a sparsity pattern
found from the model graph and a column colouring; ``K`` products ``H @ d_c`` give all its entries. When the
pattern splits into small independent blocks (one per group), everything is done block by block with batched
dense factorisations: cost and memory linear in the number of groups. A pattern with a large connected block goes to
``pymc_laplace.sparse`` instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components

from pymc_laplace.errors import ModelSpecificationError

# Above this many random effects in one connected block, dense algebra is refused (it would be quadratic).
MAX_DENSE_BLOCK = 3000


@dataclass(frozen=True)
class BlockStructure:
    """The pattern of ``Q`` cut into independent blocks, grouped by block size.

    Attributes
    ----------
    n : int
        Size of ``Q``.
    groups : tuple of ndarray
        For each block size ``m``, an int array (n_blocks, m) of the indices of each block.
    colors : ndarray of int, shape (n,)
    masks : tuple of ndarray
        For each group, the bool (m, m) pattern within a block (shared by blocks of that group only when equal;
        stored per block as (n_blocks, m, m)).
    """

    n: int
    groups: tuple[np.ndarray, ...]
    colors: np.ndarray
    masks: tuple[np.ndarray, ...]

    def factor(self, q_compressed: np.ndarray) -> tuple[BlockFactor | None, np.ndarray]:
        """Cholesky of every block of ``Q``; ``(factor or None, indices of blocks that are not PD)``."""
        return factor_blocks(self, q_compressed)

    def damped(self, q_compressed: np.ndarray, min_eig: float) -> BlockFactor:
        """Cholesky of every block of ``Q``, shifted where needed to a smallest eigenvalue of ``min_eig``."""
        return damped_blocks(self, q_compressed, min_eig)

    @property
    def largest_block(self) -> int:
        return max((g.shape[1] for g in self.groups), default=0)

    @property
    def n_blocks(self) -> int:
        return sum(g.shape[0] for g in self.groups)


def block_structure(pattern: sp.spmatrix, colors: np.ndarray) -> BlockStructure:
    """Split ``pattern`` into connected components and group them by size."""
    pattern = sp.csr_matrix(pattern, dtype=bool)
    n = pattern.shape[0]
    n_comp, labels = connected_components(pattern, directed=False)
    order = np.argsort(labels, kind="stable")
    sizes = np.bincount(labels, minlength=n_comp)
    if sizes.max(initial=0) > MAX_DENSE_BLOCK:
        raise ModelSpecificationError(
            f"The Hessian of the random effects has a connected block of {sizes.max()} elements; dense blocks "
            f"are limited to {MAX_DENSE_BLOCK}. Use InnerNewton(factorization='auto') (sparse Cholesky)."
        )
    starts = np.concatenate([[0], np.cumsum(sizes)])
    members = [order[starts[c] : starts[c + 1]] for c in range(n_comp)]
    groups, masks = [], []
    dense = pattern.toarray() if n <= 2000 else None
    for m in np.unique(sizes):
        comps = np.flatnonzero(sizes == m)
        idx = np.stack([members[c] for c in comps]) if comps.size else np.zeros((0, m), dtype=int)
        groups.append(idx)
        rows = np.broadcast_to(idx[:, :, None], (idx.shape[0], m, m))
        cols = np.broadcast_to(idx[:, None, :], (idx.shape[0], m, m))
        if dense is not None:
            masks.append(dense[rows, cols])
        else:
            masks.append(np.asarray(pattern[rows.ravel(), cols.ravel()]).reshape(rows.shape).astype(bool))
    return BlockStructure(n, tuple(groups), np.asarray(colors, dtype=int), tuple(masks))


def _block_entries(structure: BlockStructure, compressed: np.ndarray) -> list[np.ndarray]:
    """Dense blocks ``(n_blocks, m, m)`` of a matrix from its compressed products ``(K, n)``."""
    blocks = []
    for idx, mask in zip(structure.groups, structure.masks, strict=True):
        rows = idx[:, :, None]
        col_colors = structure.colors[idx][:, None, :]
        values = compressed[np.broadcast_to(col_colors, mask.shape), np.broadcast_to(rows, mask.shape)]
        blocks.append(np.where(mask, values, 0.0))
    return blocks


@dataclass(frozen=True)
class BlockFactor:
    """Cholesky factors of the blocks of a positive definite ``Q``.

    Attributes
    ----------
    structure : BlockStructure
    cholesky : list of ndarray
        Lower factors, one (n_blocks, m, m) array per block size.
    """

    structure: BlockStructure
    cholesky: list[np.ndarray]

    def log_det(self) -> float:
        return float(sum(2.0 * np.sum(np.log(np.diagonal(c, axis1=-2, axis2=-1))) for c in self.cholesky))

    def solve(self, rhs: np.ndarray) -> np.ndarray:
        """``Q^-1 rhs`` for ``rhs`` of shape (n,) or (n, k)."""
        out = np.empty_like(rhs, dtype=float)
        for idx, chol in zip(self.structure.groups, self.cholesky, strict=True):
            r = rhs[idx]  # (n_blocks, m) or (n_blocks, m, k)
            vec = r.ndim == 2
            if vec:
                r = r[..., None]
            y = np.linalg.solve(chol, r)
            x = np.linalg.solve(np.swapaxes(chol, -1, -2), y)
            out[idx] = x[..., 0] if vec else x
        return out

    def sample_given(self, mean: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, float]:
        """A draw ``mean + L^-T z`` from ``N(mean, Q^-1)`` for standard normal ``z``, and its log density."""
        out = np.empty_like(mean, dtype=float)
        for idx, chol in zip(self.structure.groups, self.cholesky, strict=True):
            out[idx] = np.linalg.solve(np.swapaxes(chol, -1, -2), z[idx][..., None])[..., 0]
        log_density = 0.5 * self.log_det() - 0.5 * mean.size * np.log(2.0 * np.pi) - 0.5 * float(z @ z)
        return mean + out, log_density

    def inverse_blocks(self) -> list[np.ndarray]:
        """The blocks of ``Q^-1`` (the selected inverse of a block-diagonal matrix is its blockwise inverse)."""
        inverses = []
        for chol in self.cholesky:
            eye = np.broadcast_to(np.eye(chol.shape[-1]), chol.shape)
            linv = np.linalg.solve(chol, eye)
            inverses.append(np.swapaxes(linv, -1, -2) @ linv)
        return inverses

    def compressed_inverse(self) -> np.ndarray:
        """Entries of ``Q^-1`` on ``Q``'s pattern, compressed like the Hessian-vector products: (K, n)."""
        structure = self.structure
        n_colors = int(structure.colors.max()) + 1 if structure.n else 0
        out = np.zeros((n_colors, structure.n))
        for idx, mask, inv in zip(structure.groups, structure.masks, self.inverse_blocks(), strict=True):
            rows = np.broadcast_to(idx[:, :, None], mask.shape)
            col_colors = np.broadcast_to(structure.colors[idx][:, None, :], mask.shape)
            out[col_colors[mask], rows[mask]] = inv[mask]
        return out

    def diagonal_of_inverse(self) -> np.ndarray:
        out = np.empty(self.structure.n)
        for idx, inv in zip(self.structure.groups, self.inverse_blocks(), strict=True):
            out[idx] = np.diagonal(inv, axis1=-2, axis2=-1)
        return out


def factor_blocks(structure: BlockStructure, q_compressed: np.ndarray) -> tuple[BlockFactor | None, np.ndarray]:
    """Cholesky of every block of ``Q``; returns ``(factor or None, indices of blocks that are not PD)``.

    ``q_compressed`` holds the compressed products of ``Q`` itself (the negative Hessian).
    """
    factors, bad = [], []
    for idx, q in zip(structure.groups, _block_entries(structure, q_compressed), strict=True):
        try:
            factors.append(np.linalg.cholesky(q))
        except np.linalg.LinAlgError:
            eig_min = np.linalg.eigvalsh(q)[:, 0]
            bad.append(idx[eig_min <= 0].ravel())
            factors.append(None)
    if bad:
        return None, np.concatenate(bad)
    return BlockFactor(structure, factors), np.zeros(0, dtype=int)


def damped_blocks(structure: BlockStructure, q_compressed: np.ndarray, min_eig: float) -> BlockFactor:
    """Cholesky of every block of ``Q`` shifted, where needed, so that its smallest eigenvalue is ``min_eig``."""
    factors = []
    for q in _block_entries(structure, q_compressed):
        eig_min = np.linalg.eigvalsh(q)[:, 0]
        shift = np.maximum(min_eig - eig_min, 0.0)
        factors.append(np.linalg.cholesky(q + shift[:, None, None] * np.eye(q.shape[-1])))
    return BlockFactor(structure, factors)


def dense_blocks(structure: BlockStructure, q_compressed: np.ndarray) -> list[np.ndarray]:
    """The dense blocks of ``Q`` (for reports and tests)."""
    return _block_entries(structure, q_compressed)
