"""An independent dense Laplace marginal, for checking the structured engine.

It builds the joint log density with PyMC's own ``model.logp`` (no rewriting of likelihoods), assembles the dense
Hessian column by column from pytensor's exact Hessian-vector products with unit vectors (no pattern, no colouring,
no compressed products), finds the
conditional mode by a plain damped Newton iteration in numpy, and takes the log determinant from a dense Cholesky.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pymc as pm
import pytensor
import pytensor.tensor as pt


class DenseLaplace:
    """``log p(y | theta)`` by the Laplace approximation with dense linear algebra.

    ``b`` is the concatenation of the flattened unconstrained values of ``random``, in that order.
    """

    def __init__(self, model: pm.Model, random: Sequence[str]):
        rvs = [model[name] for name in random]
        self.values = [model.rvs_to_values[rv] for rv in rvs]
        self.others = [model.rvs_to_values[v] for v in model.free_RVs if v not in rvs]
        joint = model.logp(vars=[*model.observed_RVs, *rvs, *model.potentials], jacobian=True)
        grad = pt.concatenate([g.flatten() for g in pt.grad(joint, self.values)])
        direction = pt.vector("direction")
        hvp = pt.concatenate([g.flatten() for g in pt.grad(pt.sum(grad * direction), self.values)])
        inputs = [*self.values, *self.others]
        self.value_grad = pytensor.function(inputs, [joint, grad], on_unused_input="ignore")
        self.hvp = pytensor.function([*inputs, direction], hvp, on_unused_input="ignore")
        start = model.initial_point()
        self.shapes = [start[v.name].shape for v in self.values]

    def _split(self, b: np.ndarray) -> list[np.ndarray]:
        sizes = np.cumsum([int(np.prod(s)) for s in self.shapes])[:-1]
        return [piece.reshape(s) for piece, s in zip(np.split(b, sizes), self.shapes, strict=True)]

    def value(self, b: np.ndarray, theta: Mapping[str, np.ndarray]) -> float:
        args = [*self._split(np.asarray(b, dtype=float)), *[theta[v.name] for v in self.others]]
        return float(self.value_grad(*args)[0])

    def __call__(self, b: np.ndarray, theta: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """``[l, dl/db, d2l/db2]`` at ``(b, theta)``; the Hessian column by column from exact products."""
        args = [*self._split(np.asarray(b, dtype=float)), *[theta[v.name] for v in self.others]]
        value, grad = self.value_grad(*args)
        hessian = np.array([self.hvp(*args, unit) for unit in np.eye(grad.size)]).T
        return [value, grad, 0.5 * (hessian + hessian.T)]

    def mode(self, theta: Mapping[str, np.ndarray]) -> tuple[np.ndarray, float, np.ndarray]:
        b = np.zeros(sum(int(np.prod(s)) for s in self.shapes))
        for _ in range(200):
            f, g, h = self(b, theta)
            if np.max(np.abs(g)) < 1e-10:
                break
            # Newton on the curvature with its eigenvalues floored (ascent even where -h is not PD), backtracking
            eigenvalues, vectors = np.linalg.eigh(-h)
            floored = np.maximum(eigenvalues, 1e-3 * max(float(eigenvalues.max()), 1e-8))
            step = vectors @ ((vectors.T @ g) / floored)
            t = 1.0
            while not self.value(b + t * step, theta) >= f + 1e-4 * t * float(g @ step) and t > 1e-10:
                t *= 0.5
            if t <= 1e-10:  # no further progress is resolvable in the log density
                break
            b = b + t * step
        f, g, h = self(b, theta)
        assert np.max(np.abs(g)) < 1e-6, f"the dense oracle did not converge: max|g| = {np.max(np.abs(g)):.2g}"
        return b, float(f), h

    def log_marginal(self, theta: Mapping[str, np.ndarray]) -> float:
        b, f, h = self.mode(theta)
        chol = np.linalg.cholesky(-h)
        return f + 0.5 * b.size * np.log(2 * np.pi) - float(np.sum(np.log(np.diag(chol))))
