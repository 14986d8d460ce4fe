"""Linear algebra on a symmetric matrix known through compressed Hessian-vector products.

The matrix ``Q`` (the negative Hessian of the joint log density in the random effects) has a sparsity pattern
found from the model graph and a column colouring; ``K`` products ``H @ d_c`` give all its entries. When the
pattern splits into small independent blocks (one per group), everything is done block by block with batched
dense factorisations: cost and memory linear in the number of groups. A pattern with a large connected block goes to
``pymc_laplace.inner.sparse`` instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components

from pymc_laplace.compile.structure import recovery_slots, symmetric_pattern
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
    slots : tuple of ndarray
        For each group, (n_blocks, m, m) flat indices into the compressed products ``(K, n)`` where each entry of
        the block is read (``structure.recovery_slots``), -1 off the pattern.
    """

    n: int
    groups: tuple[np.ndarray, ...]
    colors: np.ndarray
    masks: tuple[np.ndarray, ...]
    slots: tuple[np.ndarray, ...]

    @property
    def n_colors(self) -> int:
        return int(self.colors.max()) + 1 if self.n else 0

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
    """Split ``pattern`` into connected components and group them by size.

    Raises
    ------
    ModelSpecificationError
        A block larger than ``MAX_DENSE_BLOCK``, or a colouring that does not determine every entry.
    """
    pattern = symmetric_pattern(pattern)
    n = pattern.shape[0]
    slot_matrix = recovery_slots(pattern, colors)
    if slot_matrix is None:
        raise ModelSpecificationError("The colouring does not determine every entry of the Hessian pattern.")
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
    groups, masks, slots = [], [], []
    for m in np.unique(sizes):
        comps = np.flatnonzero(sizes == m)
        idx = np.stack([members[c] for c in comps]) if comps.size else np.zeros((0, m), dtype=int)
        groups.append(idx)
        rows = np.broadcast_to(idx[:, :, None], (idx.shape[0], m, m))
        cols = np.broadcast_to(idx[:, None, :], (idx.shape[0], m, m))
        slot = np.asarray(slot_matrix[rows.ravel(), cols.ravel()]).reshape(rows.shape).astype(np.int64) - 1
        masks.append(slot >= 0)
        slots.append(slot)
    return BlockStructure(n, tuple(groups), np.asarray(colors, dtype=int), tuple(masks), tuple(slots))


def _block_entries(structure: BlockStructure, compressed: np.ndarray) -> list[np.ndarray]:
    """Dense blocks ``(n_blocks, m, m)`` of a matrix from its compressed products ``(K, n)``."""
    flat = np.asarray(compressed).ravel()
    return [
        np.where(mask, flat[np.maximum(slot, 0)], 0.0)
        for mask, slot in zip(structure.masks, structure.slots, strict=True)
    ]


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
        draws, log_density = self.sample_many(np.asarray(mean)[None, :], np.asarray(z)[None, :])
        return draws[0], float(log_density[0])

    def sample_many(self, means: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Draws ``means[k] + L^-T z[k]`` from ``N(means[k], Q^-1)`` for rows ``z[k]`` of standard normals, shape
        (m, n), and their log densities (m,): :meth:`sample_given` for many draws at once."""
        out = np.empty_like(means, dtype=float)
        for idx, chol in zip(self.structure.groups, self.cholesky, strict=True):
            eye = np.broadcast_to(np.eye(chol.shape[-1]), chol.shape)
            inverse_transposed = np.linalg.solve(np.swapaxes(chol, -1, -2), eye)  # L^-T, block by block
            out[:, idx] = np.einsum("gij,mgj->mgi", inverse_transposed, z[:, idx])
        log_density = 0.5 * self.log_det() - 0.5 * means.shape[1] * np.log(2.0 * np.pi) - 0.5 * np.sum(z * z, axis=1)
        return means + out, log_density

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
        size = structure.n_colors * structure.n
        out = np.zeros(size)
        for mask, slot, inv in zip(structure.masks, structure.slots, self.inverse_blocks(), strict=True):
            # entries read from the same product (Q_ij and Q_ji) add up: phi = sum_ij (Q^-1)_ij Q_ij
            out += np.bincount(slot[mask], weights=inv[mask], minlength=size)
        return out.reshape(structure.n_colors, structure.n)

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


@dataclass(frozen=True)
class BatchedBlockFactor:
    """Cholesky factors of the blocks of many positive definite matrices with one block structure.

    Attributes
    ----------
    structure : BlockStructure
    cholesky : list of ndarray
        Lower factors, one (m_batch, n_blocks, size, size) array per block size.
    """

    structure: BlockStructure
    cholesky: list[np.ndarray]

    def log_det(self) -> np.ndarray:
        """Log-determinant of each matrix, shape (m_batch,)."""
        return sum(2.0 * np.sum(np.log(np.diagonal(c, axis1=-2, axis2=-1)), axis=(-2, -1)) for c in self.cholesky)

    def solve(self, rhs: np.ndarray) -> np.ndarray:
        """``Q_k^-1 rhs_k`` for ``rhs`` of shape (m_batch, n)."""
        out = np.empty_like(rhs, dtype=float)
        for idx, chol in zip(self.structure.groups, self.cholesky, strict=True):
            y = np.linalg.solve(chol, rhs[:, idx][..., None])
            out[:, idx] = np.linalg.solve(np.swapaxes(chol, -1, -2), y)[..., 0]
        return out

    def transposed_inverse_times(self, z: np.ndarray) -> np.ndarray:
        """``L_k^-T z_k`` for ``z`` of shape (m_batch, n): a draw from ``N(0, Q_k^-1)`` for standard normal ``z``."""
        out = np.empty_like(z, dtype=float)
        for idx, chol in zip(self.structure.groups, self.cholesky, strict=True):
            out[:, idx] = np.linalg.solve(np.swapaxes(chol, -1, -2), z[:, idx][..., None])[..., 0]
        return out

    @classmethod
    def identity(cls, structure: BlockStructure, batch: int) -> BatchedBlockFactor:
        """Identity factors, to be filled in."""
        return cls(structure, [np.tile(np.eye(g.shape[1]), (batch, g.shape[0], 1, 1)) for g in structure.groups])

    def take(self, positions: np.ndarray, other: BatchedBlockFactor, from_positions: np.ndarray) -> None:
        """Copy the factors at ``from_positions`` of ``other`` to ``positions``."""
        for mine, theirs in zip(self.cholesky, other.cholesky, strict=True):
            mine[positions] = theirs[from_positions]

    def set(self, k: int, factor: BlockFactor) -> None:
        """Put the factor of one matrix (from an unbatched solve) at batch position ``k``."""
        for batched, single in zip(self.cholesky, factor.cholesky, strict=True):
            batched[k] = single


def factor_blocks_batched(structure: BlockStructure, q_compressed: np.ndarray) -> tuple[BatchedBlockFactor, np.ndarray]:
    """Cholesky of every block of many ``Q`` given as compressed products ``(m_batch, K, n)``.

    Returns the factors and a bool array (m_batch,) of the matrices that are positive definite; the factors of the
    others are identities (placeholders to be replaced).
    """
    flat = np.asarray(q_compressed).reshape(q_compressed.shape[0], -1)
    positive = np.ones(flat.shape[0], dtype=bool)
    blocks = [
        np.where(mask, flat[:, np.maximum(slot, 0)], 0.0)
        for mask, slot in zip(structure.masks, structure.slots, strict=True)
    ]
    for q in blocks:
        try:
            np.linalg.cholesky(q)
        except np.linalg.LinAlgError:
            positive &= np.all(np.linalg.eigvalsh(q)[..., 0] > 0, axis=-1)
    factors = []
    for q in blocks:
        q = np.where(positive[:, None, None, None], q, np.eye(q.shape[-1]))
        try:
            factors.append(np.linalg.cholesky(q))
        except np.linalg.LinAlgError:  # positive eigenvalues that Cholesky cannot resolve: solved one at a time
            positive[:] = False
            factors.append(np.broadcast_to(np.eye(q.shape[-1]), q.shape).copy())
    return BatchedBlockFactor(structure, factors), positive
