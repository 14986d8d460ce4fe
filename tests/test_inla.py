"""Integration over the outer parameters on a grid or a CCD (``fit_integrated_laplace(method="grid" | "ccd")``).

References: exact posteriors by quadrature over the hyperparameters with the marginal in closed form, for a
Gaussian three-layer model (data | group means | hyperparameters) and a latent AR(1) series observed with Gaussian
noise (Kalman filter), where the Laplace marginal is exact; cbpp against full-model NUTS.
"""

from __future__ import annotations

import numpy as np
import pymc as pm
import pytensor.tensor as pt
import pytest
from scipy import stats
from scipy.special import expit, logsumexp
from test_sampling import N_GROUPS, exact_posterior_moments, gaussian_model, three_layer_log_posterior

from pymc_laplace import ApproximationWarning, ModelSpecificationError, fit_integrated_laplace, get_group, marginal
from pymc_laplace.outer.inla import DesignSettings, _two_level_design, explore

FINE = DesignSettings(step=0.75, drop=10.0)


def three_layer_exact_evidence(points: int = 161) -> float:
    _, log_density, volume = three_layer_log_posterior(points)
    return float(logsumexp(log_density) + np.log(volume))


def test_design_moments_of_a_gaussian_are_exact():
    # a Gaussian log posterior: the CCD returns its covariance and evidence exactly; the grid to its resolution
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4, 4))
    precision = a @ a.T + 4 * np.eye(4)
    mode = rng.normal(size=4)
    log_norm = 0.5 * np.linalg.slogdet(precision)[1] - 2 * np.log(2 * np.pi)

    def log_posterior(theta):
        d = theta - mode
        return float(-0.5 * d @ precision @ d + log_norm + 3.0)  # mass exp(3)

    ccd = explore(log_posterior, mode, precision, "ccd")
    np.testing.assert_allclose(ccd.covariance, np.linalg.inv(precision), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(ccd.mean, mode, atol=1e-12)
    assert ccd.log_evidence == pytest.approx(3.0, abs=1e-10)
    np.testing.assert_allclose(ccd.side_scales, 1.0, rtol=1e-10)
    grid = explore(log_posterior, mode, precision, "grid", step=1.0, drop=10.0)
    assert grid.log_evidence == pytest.approx(3.0, abs=1e-3)
    np.testing.assert_allclose(grid.covariance, np.linalg.inv(precision), rtol=1e-2, atol=1e-4)
    design = _two_level_design(5)
    assert design.shape == (8, 5)
    np.testing.assert_array_equal(design.T @ design, 8 * np.eye(5))
    np.testing.assert_array_equal(design.sum(axis=0), 0)


@pytest.fixture(scope="module")
def three_layer():
    model = gaussian_model()
    return model, marginal(model, random=["u"])


def test_grid_on_the_three_layer_normal_model_is_exact(three_layer):
    model, laplace = three_layer
    result = fit_integrated_laplace(
        model, random=["u"], compiled_marginal=laplace, method="grid", design=FINE, progressbar=False, random_seed=2
    )
    fit, post = get_group(result, "fit"), get_group(result, "posterior")
    assert float(fit["log_evidence"]) == pytest.approx(three_layer_exact_evidence(), abs=5e-3)
    for name, (mean, sd) in exact_posterior_moments().items():
        draws = post[name].values
        assert abs(draws.mean() - mean) < 4 * sd / np.sqrt(draws.size) + 0.01 * sd, name
        assert draws.std() == pytest.approx(sd, rel=0.03), name
    assert post.attrs["method"] == "integrated_laplace_grid" and post["u"].shape == (4, 1000, N_GROUPS)
    probabilities = fit["design_probability"].values
    assert probabilities.sum() == pytest.approx(1.0) and fit["design_points"].shape == (probabilities.size, 3)


def test_ccd_on_the_three_layer_normal_model(three_layer):
    model, laplace = three_layer
    result = fit_integrated_laplace(
        model, random=["u"], compiled_marginal=laplace, method="ccd", progressbar=False, random_seed=2
    )
    fit, post = get_group(result, "fit"), get_group(result, "posterior")
    assert post.attrs["design_points"] == 1 + 2 * 3 + 4
    assert post.attrs["pareto_k"] < 0.7  # a good proposal here, so no warning
    # the CCD is a coarse rule (11 points): the evidence within 0.1, the moments within a fifth of an SD
    assert float(fit["log_evidence"]) == pytest.approx(three_layer_exact_evidence(), abs=0.1)
    for name, (mean, sd) in exact_posterior_moments().items():
        assert abs(post[name].values.mean() - mean) < 0.2 * sd, name
        assert post[name].values.std() == pytest.approx(sd, rel=0.2), name


def test_ccd_warns_when_its_gaussian_misses_heavy_tails():
    """A Cauchy prior on the mean and data that say almost nothing: the posterior of mu is about Cauchy(0, 1), whose
    tails no skewed Gaussian reaches. The CCD's draws are then too narrow, and its importance ratios say so."""
    with pm.Model() as model:
        mu = pm.StudentT("mu", nu=1.0, mu=0.0, sigma=1.0)
        b = pm.Normal("b", mu, 1.0, shape=2)
        pm.Normal("y", b, 100.0, observed=np.zeros(2))
    with pytest.warns(ApproximationWarning, match="poor proposal"):
        result = fit_integrated_laplace(
            model, random=["b"], method="ccd", draws=1000, chains=2, progressbar=False, random_seed=0
        )
    post = get_group(result, "posterior")
    assert post.attrs["pareto_k"] > 0.7
    # why it warned: the 90% quantile of Cauchy(0, 1) is tan(0.4 pi) = 3.08; the resampled CCD draws fall short
    assert np.quantile(post["mu"].values, 0.9) < 0.8 * stats.cauchy.ppf(0.9)


# ------------------------------------------------------------------------------------------------ AR(1)
T_STEPS = 40
AR_RNG = np.random.default_rng(11)
_x = np.zeros(T_STEPS)
for _t in range(1, T_STEPS):
    _x[_t] = 0.8 * _x[_t - 1] + AR_RNG.normal(0.0, 0.5)
AR_Y = _x + AR_RNG.normal(0.0, 0.4, T_STEPS)


def ar1_model() -> pm.Model:
    with pm.Model() as model:
        phi = pm.Uniform("phi", -1.0, 1.0)
        s = pm.HalfNormal("s", 1.0)
        sigma = pm.HalfNormal("sigma", 1.0)
        x = pm.Flat("x", shape=T_STEPS)
        stationary = s / pt.sqrt(1.0 - phi**2)
        pm.Potential(
            "ar1",
            pm.logp(pm.Normal.dist(0.0, stationary), x[0]) + pm.logp(pm.Normal.dist(phi * x[:-1], s), x[1:]).sum(),
        )
        pm.Normal("y", x, sigma, observed=AR_Y)
    return model


def kalman_log_likelihood(phi, s, sigma):
    """log p(y | phi, s, sigma) of the AR(1) state observed with noise, vectorised over arrays of parameters."""
    mean = np.zeros(np.broadcast(phi, s, sigma).shape)
    var = s**2 / (1.0 - phi**2) + 0.0 * mean
    total = 0.0
    for t in range(T_STEPS):
        if t > 0:
            mean, var = phi * mean, phi**2 * var + s**2
        innovation_var = var + sigma**2
        total = total + stats.norm.logpdf(AR_Y[t], mean, np.sqrt(innovation_var))
        gain = var / innovation_var
        mean, var = mean + gain * (AR_Y[t] - mean), (1.0 - gain) * var
    return total


def ar1_exact(points: int = 120, widen: float = 0.0) -> tuple[dict[str, tuple[float, float]], float]:
    """Posterior moments of phi, s, sigma and the log evidence, by quadrature over (logit, log s, log sigma).

    The log of the noise SD has a long left tail (the data cannot rule out noise-free observations)."""
    a = np.linspace(-5.0 - widen, 12.0 + widen, points)[:, None, None]
    log_s = np.linspace(np.log(0.01) - widen, np.log(5.0) + widen, points)[None, :, None]
    log_sigma = np.linspace(np.log(1e-5) - widen, np.log(3.0) + widen, points)[None, None, :]
    phi, s, sigma = 2.0 * expit(a) - 1.0, np.exp(log_s), np.exp(log_sigma)
    log_density = (
        np.log(0.5) + np.log(2.0 * expit(a) * expit(-a))  # Uniform(-1, 1) and its logit transform's Jacobian
        + stats.halfnorm.logpdf(s) + log_s + stats.halfnorm.logpdf(sigma) + log_sigma
        + kalman_log_likelihood(phi, s, sigma)
    )  # fmt: skip
    volume = np.diff(a[:2, 0, 0])[0] * np.diff(log_s[0, :2, 0])[0] * np.diff(log_sigma[0, 0, :2])[0]
    weight = np.exp(log_density - log_density.max())
    weight /= weight.sum()
    moments = {}
    for name, value in {"phi": phi, "s": s, "sigma": sigma}.items():
        mean = float(np.sum(weight * value))
        moments[name] = (mean, float(np.sqrt(np.sum(weight * (value - mean) ** 2))))
    return moments, float(logsumexp(log_density) + np.log(volume))


def test_ar1_reference_is_converged():
    coarse, fine = ar1_exact(), ar1_exact(160, widen=1.0)
    assert coarse[1] == pytest.approx(fine[1], abs=1e-3)  # the tests ask 5e-3 of the evidence
    for name in coarse[0]:
        assert coarse[0][name][0] == pytest.approx(fine[0][name][0], abs=1e-3 * coarse[0][name][1])


def test_ar1_laplace_marginal_is_the_kalman_likelihood():
    laplace = marginal(ar1_model(), random=["x"])
    for phi, s, sigma in [(0.8, 0.5, 0.4), (-0.3, 1.2, 0.1), (0.95, 0.2, 0.9)]:
        theta = np.array([np.log((1 + phi) / (1 - phi)), np.log(s), np.log(sigma)])
        assert laplace.value(theta) == pytest.approx(float(kalman_log_likelihood(phi, s, sigma)), abs=1e-8)


def test_grid_on_the_ar1_model_is_exact():
    model = ar1_model()
    result = fit_integrated_laplace(model, random=["x"], method="grid", design=FINE, progressbar=False, random_seed=3)
    moments, evidence = ar1_exact()
    fit, post = get_group(result, "fit"), get_group(result, "posterior")
    assert float(fit["log_evidence"]) == pytest.approx(evidence, abs=5e-3)
    for name, (mean, sd) in moments.items():
        draws = post[name].values
        assert abs(draws.mean() - mean) < 4 * sd / np.sqrt(draws.size) + 0.02 * sd, name
        assert draws.std() == pytest.approx(sd, rel=0.05), name


def test_ccd_on_cbpp_beside_full_nuts(mixed_marginal, cbpp_full_nuts):
    # five outer parameters: the CCD's 19 points (a grid at INLA's spacing would need about 10^5)
    model, random, laplace = mixed_marginal("cbpp")
    result = fit_integrated_laplace(
        model, random=random, compiled_marginal=laplace, method="ccd", progressbar=False, random_seed=4
    )
    ours, theirs = get_group(result, "posterior"), get_group(cbpp_full_nuts, "posterior")
    for name in ("beta", "sigma", "u"):
        a = ours[name].values.reshape(4000, -1)
        b = theirs[name].values.reshape(-1, a.shape[1])
        sd = b.std(axis=0)
        assert np.all(np.abs(a.mean(axis=0) - b.mean(axis=0)) < 0.25 * sd), name
        np.testing.assert_allclose(a.std(axis=0), sd, rtol=0.25, err_msg=name)


def test_design_errors(three_layer):
    model, laplace = three_layer
    with pytest.raises(ModelSpecificationError, match="more than 10 points"):
        fit_integrated_laplace(
            model, random=["u"], compiled_marginal=laplace, method="grid", progressbar=False,
            design=DesignSettings(step=0.1, max_points=10),
        )  # fmt: skip
    with pytest.raises(ModelSpecificationError, match="f0"):
        fit_integrated_laplace(
            model, random=["u"], compiled_marginal=laplace, method="ccd", progressbar=False,
            design=DesignSettings(f0=1.0),
        )  # fmt: skip
    with pytest.raises(ModelSpecificationError, match="'grid' or 'ccd'"):
        fit_integrated_laplace(model, random=["u"], compiled_marginal=laplace, method="quadrature")
