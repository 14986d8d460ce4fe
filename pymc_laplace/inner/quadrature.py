"""Adaptive Gauss-Hermite quadrature (AGHQ) over independent blocks of random effects, and the error of Laplace.

Where ``Q`` is block-diagonal the joint log density is a sum of one term per block (its mixed second derivatives
vanish everywhere), so ``p(y | theta)`` is a product of one integral per block of ``d`` random effects. Each is
taken on the product Gauss-Hermite rule of ``k`` nodes per dimension, centred at the conditional mode and scaled by
the Cholesky factor ``L`` of the block of ``Q`` (Liu and Pierce 1994; lme4's ``nAGQ`` for one scalar effect):

    log I_j = -log det L_j + (d / 2) log 2 + log sum_k W_k exp(|z_k|^2 + l(b^ + sqrt(2) L_j^-T z_k on block j) - l(b^))

plus ``l(b^)`` once. One node (``k = 1``) is exactly Laplace's approximation. A block's term is the change of the
whole joint log density when that block alone moves to a node, so only the joint density's compiled value is
needed: ``n_blocks * k^d`` evaluations, batched.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.special import logsumexp

from pymc_laplace.errors import ModelSpecificationError
from pymc_laplace.inner.blocks import BlockStructure
from pymc_laplace.inner.marginal import LOG_2PI, LaplaceMarginal

# product rules with more nodes than this per block are refused (k^d grows fast with the block size d)
MAX_NODES_PER_BLOCK = 100_000
# values of the joint density's input evaluated per batched call (rows x random effects)
BATCH_ELEMENTS = 4_000_000


@dataclass(frozen=True)
class BlockQuadrature:
    """The marginal likelihood at one ``theta`` by AGHQ, beside Laplace's, block by block.

    Attributes
    ----------
    theta : ndarray
    n_nodes : int
        Nodes per dimension of each block.
    log_marginal : float
        ``log p(y | theta)`` by AGHQ.
    laplace_log_marginal : float
        The same by Laplace's approximation (AGHQ with one node).
    blocks : list of ndarray
        The indices (into the random effects) of each block, largest blocks last as the structure groups them.
    block_difference : ndarray
        ``log I_j`` by AGHQ minus by Laplace, per block in the order of ``blocks``: where Laplace is off.
    """

    theta: np.ndarray
    n_nodes: int
    log_marginal: float
    laplace_log_marginal: float
    blocks: list[np.ndarray]
    block_difference: np.ndarray

    @property
    def difference(self) -> float:
        """AGHQ minus Laplace: the error of the Laplace log marginal likelihood, as far as AGHQ resolves it."""
        return self.log_marginal - self.laplace_log_marginal


def gauss_hermite_product(n_nodes: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes ``(n_nodes^dim, dim)`` and log weights of the product Gauss-Hermite rule for weight ``exp(-|z|^2)``."""
    x, w = np.polynomial.hermite.hermgauss(n_nodes)
    nodes = np.array(list(itertools.product(x, repeat=dim)), dtype=float).reshape(-1, dim)
    log_w = np.array([np.sum(np.log(c)) for c in itertools.product(w, repeat=dim)], dtype=float)
    return nodes, log_w


def check_quadrature(laplace: LaplaceMarginal, n_nodes: int) -> BlockStructure:
    """The marginal's block structure, after checking that quadrature with ``n_nodes`` per dimension is possible."""
    if not isinstance(n_nodes, (int, np.integer)) or n_nodes < 1:
        raise ModelSpecificationError(f"`n_nodes` must be a positive integer, not {n_nodes!r}.")
    structure = laplace.structure
    if not isinstance(structure, BlockStructure):
        raise ModelSpecificationError(
            "Adaptive Gauss-Hermite quadrature needs independent blocks of random effects (a block-diagonal Hessian); "
            "here crossed or nested effects couple them into one sparse system. Use importance sampling, or "
            "sample_integrated / full NUTS to check the Laplace approximation."
        )
    largest = structure.largest_block
    if n_nodes**largest > MAX_NODES_PER_BLOCK:
        raise ModelSpecificationError(
            f"{n_nodes} nodes per dimension over blocks of {largest} random effects is {n_nodes**largest:,} nodes per "
            f"block, more than {MAX_NODES_PER_BLOCK:,}; use fewer nodes. (Crossed or nested effects join their "
            "groups into one block: quadrature over it is out of reach, and importance sampling or "
            "sample_integrated / full NUTS are the checks of Laplace there.)"
        )
    return structure


def block_quadrature(
    laplace: LaplaceMarginal, theta: np.ndarray, n_nodes: int, *, batched: bool = True
) -> BlockQuadrature:
    """AGHQ with ``n_nodes`` per dimension over each independent block of random effects at ``theta``.

    Parameters
    ----------
    laplace : LaplaceMarginal
        From :func:`pymc_laplace.marginal`; its ``Q`` must be block-diagonal (random effects independent between
        groups, as random intercepts and slopes are).
    theta : ndarray
        Unconstrained outer parameters, in the order of ``laplace.compiled.theta_layout``.
    n_nodes : int
        Nodes per dimension (lme4's ``nAGQ``); 1 is Laplace.
    batched : bool
        Evaluate the joint density at many nodes per call (compiles the batched graph on first use); False evaluates
        node by node (for a few hundred nodes, where compiling would cost more).

    Raises
    ------
    ModelSpecificationError
        ``Q`` is not block-diagonal (crossed or nested effects couple the blocks), ``n_nodes`` is not a positive
        integer, or a block would need more than ``MAX_NODES_PER_BLOCK`` nodes.
    """
    structure = check_quadrature(laplace, n_nodes)
    theta = np.asarray(theta, dtype=float)
    compiled = laplace.compiled
    sol = laplace.solve_inner(theta)
    base = sol.joint_logp
    blocks: list[np.ndarray] = []
    aghq_terms: list[np.ndarray] = []
    laplace_terms: list[np.ndarray] = []
    for idx, chol in zip(structure.groups, sol.factor.cholesky, strict=True):
        n_blocks, dim = idx.shape
        if n_blocks == 0:
            continue
        nodes, log_w = gauss_hermite_product(n_nodes, dim)
        # block j at node k: b^ + sqrt(2) L_j^-T z_k
        offsets = (
            np.sqrt(2.0)
            * np.linalg.solve(
                np.swapaxes(chol, -1, -2)[:, None],
                np.broadcast_to(nodes[None, :, :, None], (n_blocks, *nodes.shape, 1)),
            )[..., 0]
        )  # (n_blocks, n_nodes^d, d)
        changes = _block_changes(compiled, sol.b, theta, idx, offsets, batched) - base  # (n_blocks, n_nodes^d)
        log_det_l = np.sum(np.log(np.diagonal(chol, axis1=-2, axis2=-1)), axis=-1)
        log_integral = logsumexp(log_w[None, :] + np.sum(nodes**2, axis=1)[None, :] + changes, axis=1)
        aghq_terms.append(-log_det_l + 0.5 * dim * np.log(2.0) + log_integral)
        laplace_terms.append(-log_det_l + 0.5 * dim * LOG_2PI)
        blocks.extend(idx)
    aghq = np.concatenate(aghq_terms) if aghq_terms else np.zeros(0)
    laplace_blocks = np.concatenate(laplace_terms) if laplace_terms else np.zeros(0)
    if not np.all(np.isfinite(aghq)):
        worst = [compiled.b_layout.labels[i] for i in blocks[int(np.flatnonzero(~np.isfinite(aghq))[0])]]
        raise ModelSpecificationError(
            f"The joint log density is not finite at some quadrature node of the block {worst} at theta: the "
            "conditional distribution of those random effects reaches outside the model's support; use fewer nodes."
        )
    return BlockQuadrature(
        theta=theta,
        n_nodes=int(n_nodes),
        log_marginal=float(base + np.sum(aghq)),
        laplace_log_marginal=float(base + np.sum(laplace_blocks)),
        blocks=blocks,
        block_difference=aghq - laplace_blocks,
    )


def quadrature_value_and_grad(laplace: LaplaceMarginal, theta: np.ndarray, n_nodes: int) -> tuple[float, np.ndarray]:
    """The AGHQ log marginal likelihood of :func:`block_quadrature` and its exact gradient in ``theta``.

    The nodes move with ``theta`` through the mode ``b^(theta)`` and the Cholesky factors ``L_j`` of the blocks of
    ``Q(b^(theta), theta)``. With ``p_jk`` the normalised weight of node ``k`` of block ``j``, ``x_jk`` the random
    effects with block ``j`` at that node and ``g_jk`` the gradient of ``l`` in block ``j`` there:

        dF/dtheta = dl/dtheta(b^) + sum_jk p_jk [dl/dtheta(x_jk) - dl/dtheta(b^)]
                    + (sum_jk p_jk g_jk) . db^/dtheta - <dQ/dtheta, C>,

    with ``C_j = Q_j^-1 / 2 + L_j^-T sym(Phi(H_j L_j^-T)) L_j^-1``, ``H_j = sqrt(2) sum_k p_jk z_k g_jk^T`` and
    ``Phi`` the lower triangle with the diagonal halved (the derivative of a Cholesky factor). ``db^/dtheta`` and the
    total derivative of ``<Q, C>`` (``Q`` depends on ``theta`` also through ``b^``) come from the same compiled
    products as the Laplace gradient (implicit function theorem, third derivatives by reverse passes). One node is
    exactly the Laplace gradient.
    """
    structure = check_quadrature(laplace, n_nodes)
    theta = np.asarray(theta, dtype=float)
    compiled = laplace.compiled
    sol = laplace.solve_inner(theta)
    mode = sol.b
    _, _, grad_theta_mode = _grads_at(compiled, mode[None, :], theta)
    grad_theta_mode = grad_theta_mode[0]
    value, grad = sol.joint_logp, grad_theta_mode.copy()
    v = np.zeros(mode.size)
    weights = np.zeros(structure.n_colors * structure.n)
    for idx, chol, mask, slot in zip(
        structure.groups, sol.factor.cholesky, structure.masks, structure.slots, strict=True
    ):
        n_blocks, dim = idx.shape
        if n_blocks == 0:
            continue
        nodes, log_w = gauss_hermite_product(n_nodes, dim)
        inverse_t = np.linalg.solve(np.swapaxes(chol, -1, -2), np.broadcast_to(np.eye(dim), chol.shape))  # L^-T
        offsets = np.sqrt(2.0) * np.einsum("bij,kj->bki", inverse_t, nodes)
        node_values, node_grad_b, node_grad_theta = _block_gradients(compiled, mode, theta, idx, offsets)
        logits = log_w[None, :] + np.sum(nodes**2, axis=1)[None, :] + (node_values - sol.joint_logp)
        log_integral = logsumexp(logits, axis=1)
        p = np.exp(logits - log_integral[:, None])
        log_det_l = np.sum(np.log(np.diagonal(chol, axis1=-2, axis2=-1)), axis=-1)
        value += float(np.sum(-log_det_l + 0.5 * dim * np.log(2.0) + log_integral))
        grad += np.einsum("bk,bkt->t", p, node_grad_theta) - n_blocks * grad_theta_mode
        v[idx] += np.einsum("bk,bki->bi", p, node_grad_b)
        h = np.sqrt(2.0) * np.einsum("bk,ki,bkj->bij", p, nodes, node_grad_b)
        lower = np.tril(h @ inverse_t)
        lower[..., np.arange(dim), np.arange(dim)] *= 0.5
        sym = 0.5 * (lower + np.swapaxes(lower, -1, -2))
        c = 0.5 * inverse_t @ np.swapaxes(inverse_t, -1, -2) + inverse_t @ sym @ np.swapaxes(inverse_t, -1, -2)
        weights += np.bincount(slot[mask], weights=c[mask], minlength=weights.size)
    _, dphi_db, dphi_dtheta = compiled.outer_terms(mode, theta, weights.reshape(structure.n_colors, structure.n))
    w = sol.factor.solve(v - dphi_db)
    grad = grad + compiled.mixed_product(mode, theta, w) - dphi_dtheta
    return float(value), np.asarray(grad, dtype=float)


def _grads_at(compiled: Any, points: np.ndarray, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``l``, ``dl/db`` and ``dl/dtheta`` at each row of ``points`` (batched where the graph allows)."""
    if compiled.joint_grads_batched is not None:
        value, grad_b, grad_theta = compiled.joint_grads_batched(
            points, np.broadcast_to(theta, (len(points), theta.size))
        )
        return np.asarray(value), np.asarray(grad_b), np.asarray(grad_theta).reshape(len(points), theta.size)
    rows = [compiled.joint_grads(point, theta) for point in points]
    return (
        np.array([float(r[0]) for r in rows]),
        np.array([r[1] for r in rows]).reshape(len(points), -1),
        np.array([r[2] for r in rows]).reshape(len(points), theta.size),
    )


def _block_gradients(
    compiled: Any, mode: np.ndarray, theta: np.ndarray, idx: np.ndarray, offsets: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """At block ``j`` alone moved to ``mode + offsets[j, k]``: ``l`` (n_blocks, K), ``dl/db`` on block ``j``
    (n_blocks, K, d) and ``dl/dtheta`` (n_blocks, K, n_theta)."""
    n_blocks, n_points, dim = offsets.shape
    total = n_blocks * n_points
    block_of_row = np.repeat(np.arange(n_blocks), n_points)
    flat_offsets = offsets.reshape(total, dim)
    values, grad_b, grad_theta = np.empty(total), np.empty((total, dim)), np.empty((total, theta.size))
    rows_per_call = max(1, BATCH_ELEMENTS // max(mode.size, 1))
    for begin in range(0, total, rows_per_call):
        rows = np.arange(begin, min(begin + rows_per_call, total))
        points = np.broadcast_to(mode, (rows.size, mode.size)).copy()
        cols = idx[block_of_row[rows]]
        points[np.arange(rows.size)[:, None], cols] += flat_offsets[rows]
        value, gb, gt = _grads_at(compiled, points, theta)
        values[rows], grad_b[rows], grad_theta[rows] = value, gb[np.arange(rows.size)[:, None], cols], gt
    return (
        values.reshape(n_blocks, n_points),
        grad_b.reshape(n_blocks, n_points, dim),
        grad_theta.reshape(n_blocks, n_points, theta.size),
    )


def _block_changes(
    compiled: Any, mode: np.ndarray, theta: np.ndarray, idx: np.ndarray, offsets: np.ndarray, batched: bool
) -> np.ndarray:
    """The joint log density with block ``j`` alone moved to ``mode + offsets[j, k]``, shape (n_blocks, n_nodes)."""
    n_blocks, n_points, _ = offsets.shape
    total = n_blocks * n_points
    values = np.empty(total)
    block_of_row = np.repeat(np.arange(n_blocks), n_points)
    flat_offsets = offsets.reshape(total, -1)
    rows_per_call = max(1, BATCH_ELEMENTS // max(mode.size, 1))
    batched_value = compiled.joint_value_batched if batched else None
    for begin in range(0, total, rows_per_call):
        rows = np.arange(begin, min(begin + rows_per_call, total))
        points = np.broadcast_to(mode, (rows.size, mode.size)).copy()
        cols = idx[block_of_row[rows]]  # (rows, d)
        points[np.arange(rows.size)[:, None], cols] += flat_offsets[rows]
        if batched_value is not None:
            values[rows] = batched_value(points, np.broadcast_to(theta, (rows.size, theta.size)))
        else:
            values[rows] = [compiled.joint_value(point, theta) for point in points]
    return values.reshape(n_blocks, n_points)


# the check that fit_integrated_laplace runs by default: this many nodes per dimension, when the quadrature needs at
# most DEFAULT_CHECK_ROWS evaluations of the joint density
DEFAULT_CHECK_NODES = 5
DEFAULT_CHECK_ROWS = 5_000  # the urchin model's 142 blocks of 2 at 5 x 5 nodes: 3,550, 0.2 s
# log-likelihood errors below this are reported as negligible; from LAPLACE_ERROR_WARNING on (an AIC error of 2)
# fit_integrated_laplace warns
NEGLIGIBLE_ERROR = 0.01
LAPLACE_ERROR_WARNING = 1.0


@dataclass(frozen=True)
class LaplaceCheck:
    """How far Laplace's log marginal likelihood is from adaptive Gauss-Hermite quadrature, at the estimate.

    Attributes
    ----------
    n_nodes : int
    difference : float
        AGHQ minus Laplace, in log-likelihood units (cbpp: 0.043).
    blocks : pandas.DataFrame
        One row per block of random effects (``first`` random effect of the block, ``size``, ``difference``), the
        worst first.
    advice : str
    """

    n_nodes: int
    difference: float
    blocks: Any
    advice: str

    def __str__(self) -> str:
        return f"{self.advice}\n{self.blocks.head(5).to_string()}"


def check_laplace(
    result: Any, model: Any = None, *, n_nodes: int = 10, n_draws: int = 4000, random_seed: int | None = None
) -> LaplaceCheck:
    """Check the Laplace approximation of a ``fit_integrated_laplace`` result block by block.

    The Laplace log marginal likelihood at the estimate is compared with adaptive Gauss-Hermite quadrature with
    ``n_nodes`` per dimension over each independent block of random effects (:func:`block_quadrature`). The
    difference is the error of Laplace's log likelihood (and so of its AIC, divided by -2); blocks with large
    differences are those where the conditional posterior of the random effects is far from Gaussian (small groups,
    binary data).

    Parameters
    ----------
    result : arviz.InferenceData or xarray.DataTree
        From :func:`pymc_laplace.fit_integrated_laplace`.
    model : pm.Model, optional
        The model that was fitted (from the context when not given); its marginal is compiled once and reused.
    n_nodes : int
    n_draws, random_seed
        Where the random effects are coupled into one sparse system or a block too large for ``n_nodes`` per
        dimension (crossed effects), quadrature is out of reach and the check is importance sampling with the
        Laplace Gaussian as proposal (:func:`importance_log_marginal`) with ``n_draws`` draws; ``blocks`` is then
        empty.

    Returns
    -------
    LaplaceCheck
    """
    import pymc as pm

    from pymc_laplace._compat import get_group
    from pymc_laplace.integrated import marginal

    attrs = dict(get_group(result, "posterior").attrs)
    if not str(attrs.get("method", "")).startswith("integrated_laplace"):
        raise ModelSpecificationError("check_laplace reads a fit_integrated_laplace result.")
    model = pm.modelcontext(model)
    laplace = marginal(model, random=list(attrs["random"]))
    theta = np.asarray(get_group(result, "fit")["mean_vector"].values, dtype=float)
    if list(laplace.compiled.theta_layout.labels) != [str(v) for v in get_group(result, "fit")["rows"].values]:
        raise ModelSpecificationError(
            "The model's outer parameters are not those of the result: pass the model that was fitted."
        )
    structure = laplace.structure
    if not isinstance(structure, BlockStructure) or n_nodes**structure.largest_block > MAX_NODES_PER_BLOCK:
        # coupled blocks (crossed effects, random walks): importance sampling is the check
        estimate = importance_log_marginal(laplace, theta, n_draws=n_draws, random_seed=random_seed)
        return _check_from_importance(estimate)
    quadrature = block_quadrature(laplace, theta, n_nodes)
    return _check_from(laplace, quadrature)


def _check_from(laplace: LaplaceMarginal, quadrature: BlockQuadrature) -> LaplaceCheck:
    import pandas as pd

    labels = laplace.compiled.b_layout.labels
    table = pd.DataFrame(
        {
            "first": [labels[int(block[0])] for block in quadrature.blocks],
            "size": [int(block.size) for block in quadrature.blocks],
            "difference": quadrature.block_difference,
        }
    )
    table = table.reindex(table["difference"].abs().sort_values(ascending=False).index).reset_index(drop=True)
    difference = quadrature.difference
    if abs(difference) < NEGLIGIBLE_ERROR:
        advice = (
            f"Laplace's log likelihood is within {abs(difference):.2g} of AGHQ with {quadrature.n_nodes} nodes: the "
            "approximation of the random effects is adequate here."
        )
    else:
        worst = ", ".join(table["first"].head(3))
        advice = (
            f"Laplace's log likelihood is off by {difference:+.3g} against AGHQ with {quadrature.n_nodes} nodes "
            f"(AIC by {-2 * difference:+.3g}); the worst blocks start at {worst}. The conditional posterior of the "
            "random effects is not Gaussian there (small groups, binary data), and Laplace's estimates of the "
            "variances tend to be biased towards zero; compare with sample_integrated (NUTS over theta, with "
            "priors) or full NUTS before trusting them."
        )
    return LaplaceCheck(n_nodes=quadrature.n_nodes, difference=float(difference), blocks=table, advice=advice)


def default_check(laplace: LaplaceMarginal, theta: np.ndarray) -> float:
    """AGHQ minus Laplace at ``theta`` with ``DEFAULT_CHECK_NODES`` nodes when that is cheap, else NaN."""
    structure = laplace.structure
    if not isinstance(structure, BlockStructure) or structure.n_blocks == 0:
        return float("nan")
    rows = sum(g.shape[0] * DEFAULT_CHECK_NODES ** g.shape[1] for g in structure.groups)
    if rows > DEFAULT_CHECK_ROWS or DEFAULT_CHECK_NODES**structure.largest_block > MAX_NODES_PER_BLOCK:
        return float("nan")
    try:
        return block_quadrature(laplace, theta, DEFAULT_CHECK_NODES, batched=False).difference
    except ModelSpecificationError:
        return float("nan")


@dataclass(frozen=True)
class ImportanceEstimate:
    """``log p(y | theta)`` by importance sampling with the Laplace Gaussian of the random effects as proposal.

    Attributes
    ----------
    log_marginal : float
        ``log mean_s p(y, b_s | theta) / q(b_s)``, ``b_s ~ q = N(b^, Q^-1)``.
    laplace_log_marginal : float
    standard_error : float
        Monte Carlo standard error of ``log_marginal`` (delta method on the mean of the ratios).
    pareto_k : float
        Pareto k-hat of the ratios: above 0.7 the estimate is not to be trusted (the Gaussian misses the tails).
    ess : float
        Effective sample size of the normalised ratios.
    n_draws : int
    """

    log_marginal: float
    laplace_log_marginal: float
    standard_error: float
    pareto_k: float
    ess: float
    n_draws: int

    @property
    def difference(self) -> float:
        return self.log_marginal - self.laplace_log_marginal


def importance_log_marginal(
    laplace: LaplaceMarginal, theta: np.ndarray, *, n_draws: int = 4000, random_seed: int | None = None
) -> ImportanceEstimate:
    """The marginal likelihood at ``theta`` by importance sampling, for any structure of the random effects.

    The proposal is Laplace's own Gaussian ``N(b^(theta), Q^-1)`` (drawn through the sparse or block Cholesky
    factor); the ratios ``p(y, b | theta) / q(b)`` are constant where Laplace is exact (then the estimate equals
    it to rounding), and their Pareto k-hat says whether the estimate can be trusted.
    """
    from pymc_laplace.report.diagnostics import pareto_smooth

    if not (isinstance(n_draws, (int, np.integer)) and n_draws >= 25):
        raise ModelSpecificationError(f"`n_draws` must be an integer of at least 25, not {n_draws!r}.")
    theta = np.asarray(theta, dtype=float)
    compiled = laplace.compiled
    sol = laplace.solve_inner(theta)
    rng = np.random.default_rng(random_seed)
    draws, log_q = np.empty((n_draws, sol.b.size)), np.empty(n_draws)
    for s in range(n_draws):
        draws[s], log_q[s] = sol.factor.sample_given(sol.b, rng.standard_normal(sol.b.size))
    if compiled.joint_value_batched is not None:
        rows = max(1, BATCH_ELEMENTS // max(sol.b.size, 1))
        log_p = np.concatenate(
            [
                compiled.joint_value_batched(
                    draws[i : i + rows], np.broadcast_to(theta, (len(draws[i : i + rows]), theta.size))
                )
                for i in range(0, n_draws, rows)
            ]
        )
    else:
        log_p = np.array([compiled.joint_value(b, theta) for b in draws])
    log_ratio = np.where(np.isfinite(log_p), log_p - log_q, -np.inf)
    top = float(np.max(log_ratio))
    ratio = np.exp(log_ratio - top)
    mean = float(np.mean(ratio))
    smoothed = pareto_smooth(log_ratio)
    return ImportanceEstimate(
        log_marginal=top + float(np.log(mean)),
        laplace_log_marginal=sol.log_marginal,
        standard_error=float(np.std(ratio, ddof=1) / np.sqrt(n_draws) / mean),
        pareto_k=float(smoothed.pareto_k),
        ess=float(smoothed.ess),
        n_draws=int(n_draws),
    )


def _check_from_importance(estimate: ImportanceEstimate) -> LaplaceCheck:
    import pandas as pd

    difference = estimate.difference
    reliable = estimate.pareto_k <= 0.7
    if not reliable:
        advice = (
            f"Importance sampling with Laplace's Gaussian as proposal is unreliable here (Pareto k-hat "
            f"{estimate.pareto_k:.2f} > 0.7): the conditional posterior of the random effects has heavier tails than "
            "the Gaussian, so Laplace itself is suspect. Compare with sample_integrated or full NUTS, or run "
            "check_consistency."
        )
    elif abs(difference) < max(NEGLIGIBLE_ERROR, 3 * estimate.standard_error):
        advice = (
            f"Laplace's log likelihood is within {abs(difference):.2g} (Monte Carlo SE {estimate.standard_error:.2g}) "
            f"of importance sampling with {estimate.n_draws} draws: the approximation of the random effects is "
            "adequate here."
        )
    else:
        advice = (
            f"Laplace's log likelihood is off by {difference:+.3g} (Monte Carlo SE {estimate.standard_error:.2g}) "
            f"against importance sampling with {estimate.n_draws} draws (AIC by {-2 * difference:+.3g}). The "
            "random effects are coupled (crossed effects), so quadrature cannot name blocks; compare with "
            "sample_integrated or full NUTS, or run check_consistency, before trusting the variances."
        )
    empty = pd.DataFrame(
        {"first": pd.Series(dtype=str), "size": pd.Series(dtype=int), "difference": pd.Series(dtype=float)}
    )
    return LaplaceCheck(n_nodes=0, difference=float(difference), blocks=empty, advice=advice)
