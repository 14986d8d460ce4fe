"""fit_laplace's Hessian from compressed products (one per colour of its structural pattern) against pytensor's dense
Hessian of PyMC's own log density, including after ``pm.set_data`` couples other parameters."""

from __future__ import annotations

import numpy as np
import pymc as pm
import pytensor
from pytensor.gradient import hessian

from pymc_laplace.compile.graphs import COMPRESSED_HESSIAN_MIN_SIZE, compile_joint

N = 90
RNG = np.random.default_rng(5)


def pairs(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, N, 120), rng.integers(0, N, 120)


def build() -> pm.Model:
    first, second = pairs(1)
    with pm.Model() as model:
        i = pm.Data("i", first)
        j = pm.Data("j", second)
        mu = pm.Normal("mu", 0.0, 1.0)
        sigma = pm.HalfNormal("sigma", 1.0)
        z = pm.Normal("z", 0.0, 1.0, shape=N)
        pm.Normal("y", mu + z[i] * z[j], sigma, observed=RNG.normal(size=120))
    return model


def dense_reference(model: pm.Model, x: np.ndarray) -> np.ndarray:
    values = [model.rvs_to_values[rv] for rv in model.free_RVs]
    flat = pytensor.tensor.vector("flat")
    sizes = [int(np.prod(model.initial_point()[v.name].shape, dtype=int)) for v in values]
    pieces, start = {}, 0
    for value, size in zip(values, sizes, strict=True):
        pieces[value] = flat[start : start + size].reshape(value.type.shape if value.type.ndim else ())
        start += size
    logp = pytensor.graph.replace.graph_replace(model.logp(), pieces, strict=False)
    return pytensor.function([flat], hessian(logp, flat))(x)


def test_compressed_hessian_equals_the_dense_hessian_before_and_after_set_data(monkeypatch):
    import pymc_laplace.compile.graphs as compile_module

    recovered = []
    recover = compile_module._HessianCompression.recover

    def counted(self, products):
        recovered.append(products.shape[0])  # the number of Hessian-vector products taken
        return recover(self, products)

    monkeypatch.setattr(compile_module._HessianCompression, "recover", counted)
    model = build()
    compiled = compile_joint(model)
    n = compiled.layout.size
    assert n >= COMPRESSED_HESSIAN_MIN_SIZE
    x = RNG.normal(size=n)
    _, _, h = compiled.value_grad_hess(x)
    np.testing.assert_allclose(h, dense_reference(model, x), rtol=1e-10, atol=1e-10)
    assert len(recovered) == 1 and recovered[0] <= n // 2
    first, second = pairs(2)  # other pairs of z are multiplied: entries that were structurally zero are not now
    with model:
        pm.set_data({"i": first, "j": second})
    _, _, h = compiled.value_grad_hess(x)
    reference = dense_reference(model, x)
    assert np.any((h != 0) & (reference != 0))
    np.testing.assert_allclose(h, reference, rtol=1e-10, atol=1e-10)
    assert len(recovered) == 2
