"""NUTS over the outer parameters with the Laplace marginal as a pytensor Op (``sample_integrated``).

References: the analytic marginal of a Gaussian random-intercept model (where the Laplace marginal is exact), the
exact posterior of its hyperparameters by quadrature, and NUTS on the full models (random effects sampled,
nothing integrated out).
"""

from __future__ import annotations

import warnings

import numpy as np
import pymc as pm
import pytensor
import pytensor.tensor as pt
import pytest
from scipy import stats

from pymc_laplace import InnerNewton, InnerSolveError, ModelSpecificationError, get_group, marginal, sample_integrated
from pymc_laplace.outer.sampling import LaplaceMarginalOp

N_GROUPS, PER_GROUP = 8, 5
RNG = np.random.default_rng(20261124)
GROUP = np.repeat(np.arange(N_GROUPS), PER_GROUP)
Y = 1.0 + RNG.normal(0.0, 0.8, N_GROUPS)[GROUP] + RNG.normal(0.0, 1.0, GROUP.size)
Z = (GROUP[:, None] == np.arange(N_GROUPS)[None, :]).astype(float)


def gaussian_model() -> pm.Model:
    with pm.Model() as model:
        mu = pm.Normal("mu", 0.0, 5.0)
        tau = pm.HalfNormal("tau", 2.0)
        sigma = pm.HalfNormal("sigma", 2.0)
        u = pm.Normal("u", 0.0, tau, shape=N_GROUPS)
        pm.Normal("y", mu + u[GROUP], sigma, observed=Y)
    return model


def analytic_log_marginal(mu: float, tau: float, sigma: float) -> float:
    cov = sigma**2 * np.eye(GROUP.size) + tau**2 * Z @ Z.T
    return float(stats.multivariate_normal(np.full(GROUP.size, mu), cov).logpdf(Y))


def moments(result, names):
    post = get_group(result, "posterior")
    return {name: np.asarray(post[name].values) for name in names}


def mc_se(draws: np.ndarray) -> float:
    """Monte Carlo standard error of the mean of (chain, draw) draws, from ArviZ-free batch means."""
    flat = draws.reshape(-1)
    batches = np.array_split(flat, 20)
    return float(np.std([b.mean() for b in batches], ddof=1) / np.sqrt(len(batches)))


@pytest.fixture(scope="module")
def gaussian_marginal():
    model = gaussian_model()
    return model, marginal(model, random=["u"])


def test_op_value_and_gradient_are_the_analytic_marginal(gaussian_marginal):
    _, laplace = gaussian_marginal
    op = LaplaceMarginalOp(laplace, prior=False)
    theta = pt.dvector("theta")
    value, grad = op(theta)
    # the Op's gradient as pytensor differentiates it, beside its second output
    evaluate = pytensor.function([theta], [value, grad, pytensor.grad(value, theta)])
    names = laplace.compiled.theta_layout.names
    assert list(names) == ["mu", "tau_log__", "sigma_log__"]
    for mu, tau, sigma in [(1.0, 0.8, 1.1), (-0.5, 0.2, 2.0), (3.0, 2.5, 0.6)]:
        x = np.array([mu, np.log(tau), np.log(sigma)])
        v, g, pytensor_g = evaluate(x)
        assert v == pytest.approx(analytic_log_marginal(mu, tau, sigma), abs=1e-8)
        h, numeric = 1e-6, []
        for k in range(3):
            up, down = x.copy(), x.copy()
            up[k] += h
            down[k] -= h
            numeric.append(
                (analytic_log_marginal(up[0], *np.exp(up[1:])) - analytic_log_marginal(down[0], *np.exp(down[1:])))
                / (2 * h)
            )
        np.testing.assert_allclose(g, numeric, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(pytensor_g, g)


def test_op_adds_the_prior_with_its_jacobian(gaussian_marginal):
    _, laplace = gaussian_marginal
    op = LaplaceMarginalOp(laplace, prior=True)
    x = np.array([0.7, np.log(0.9), np.log(1.3)])
    value, _ = op.evaluate(x)
    prior = (
        stats.norm(0, 5).logpdf(0.7)
        + stats.halfnorm(scale=2).logpdf(0.9) + np.log(0.9)
        + stats.halfnorm(scale=2).logpdf(1.3) + np.log(1.3)
    )  # fmt: skip
    # PyMC's Normal log density is 3e-8 from scipy's (its constant term), and it enters the prior once
    assert value == pytest.approx(analytic_log_marginal(0.7, 0.9, 1.3) + prior, abs=1e-7)


def test_op_reports_a_failed_inner_solve_as_zero_density():
    model = gaussian_model()
    # no Newton step allowed from a start away from the mode: the inner solve cannot converge
    laplace = marginal(model, random=["u"], inner=InnerNewton(max_steps=0))
    op = LaplaceMarginalOp(laplace)
    value, grad = op.evaluate(np.array([0.0, 0.0, 0.0]))
    assert value == -np.inf and np.all(grad == 0.0)
    assert op.failures.value == 1
    assert "did not converge" in op.first_failure


def three_layer_log_posterior(points: int = 161, widen: float = 0.0):
    """The exact log posterior of (mu, log tau, log sigma) on a grid, with the marginal in closed form: each group's
    covariance is ``sigma^2 I + tau^2 J`` (compound symmetry). Returns the values on the grid's axes, the log
    density (priors and Jacobians included) and the volume of a cell."""
    mu = np.linspace(-6.0 - widen, 8.0 + widen, points)[:, None, None]
    log_tau = np.linspace(np.log(0.02) - widen, np.log(30.0) + widen, points + 40)[None, :, None]
    log_sigma = np.linspace(np.log(0.3) - widen, np.log(3.0) + widen, points + 40)[None, None, :]
    tau2, sigma2 = np.exp(2 * log_tau), np.exp(2 * log_sigma)
    log_density = stats.norm(0, 5).logpdf(mu) + stats.halfnorm(scale=2).logpdf(np.exp(log_tau)) + log_tau
    log_density = log_density + stats.halfnorm(scale=2).logpdf(np.exp(log_sigma)) + log_sigma
    for j in range(N_GROUPS):
        r = Y[GROUP == j][:, None, None, None] - mu
        n = r.shape[0]
        total, square = r.sum(axis=0), (r * r).sum(axis=0)
        log_det = (n - 1) * np.log(sigma2) + np.log(sigma2 + n * tau2)
        quadratic = (square - tau2 / (sigma2 + n * tau2) * total**2) / sigma2
        log_density = log_density - 0.5 * (n * np.log(2 * np.pi) + log_det + quadratic)
    volume = np.diff(mu[:2, 0, 0])[0] * np.diff(log_tau[0, :2, 0])[0] * np.diff(log_sigma[0, 0, :2])[0]
    return {"mu": mu, "tau": np.exp(log_tau), "sigma": np.exp(log_sigma)}, log_density, volume


def exact_posterior_moments(points: int = 161, widen: float = 0.0) -> dict[str, tuple[float, float]]:
    """Posterior mean and SD of mu, tau, sigma by quadrature over :func:`three_layer_log_posterior`."""
    values, log_density, _ = three_layer_log_posterior(points, widen)
    weight = np.exp(log_density - log_density.max())
    weight /= weight.sum()
    result = {}
    for name, value in values.items():
        mean = float(np.sum(weight * value))
        result[name] = (mean, float(np.sqrt(np.sum(weight * (value - mean) ** 2))))
    return result


@pytest.fixture(scope="module")
def gaussian_fits(gaussian_marginal):
    model, laplace = gaussian_marginal
    integrated = sample_integrated(
        model, random=["u"], compiled_marginal=laplace, draws=1000, tune=1000, chains=2, random_seed=3,
        progressbar=False,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = pm.sample(
            draws=1000, tune=1000, chains=2, random_seed=5, progressbar=False, model=gaussian_model(),
            target_accept=0.95,
        )  # fmt: skip
    return integrated, full


def test_grid_reference_is_converged():
    # a wider and finer grid moves no moment by more than 1e-3 of its SD
    coarse, fine = exact_posterior_moments(), exact_posterior_moments(points=241, widen=1.0)
    for name, (mean, sd) in coarse.items():
        assert abs(mean - fine[name][0]) < 1e-3 * sd and abs(sd - fine[name][1]) < 1e-3 * sd, name


def test_nuts_over_the_exact_marginal_matches_the_exact_posterior(gaussian_fits):
    integrated, _ = gaussian_fits
    ours = moments(integrated, ["mu", "tau", "sigma"])
    for name, (mean, sd) in exact_posterior_moments().items():
        assert abs(ours[name].mean() - mean) < 4 * mc_se(ours[name]), name
        assert ours[name].std() == pytest.approx(sd, rel=0.1), name


def test_random_effects_drawn_given_theta_match_full_nuts(gaussian_fits):
    integrated, full = gaussian_fits
    ours, theirs = moments(integrated, ["u"])["u"], moments(full, ["u"])["u"]
    assert ours.shape == (2, 1000, N_GROUPS)
    for j in range(N_GROUPS):
        se = np.hypot(mc_se(ours[..., j]), mc_se(theirs[..., j]))
        assert abs(ours[..., j].mean() - theirs[..., j].mean()) < 4 * se + 0.02, j
        assert ours[..., j].std() == pytest.approx(theirs[..., j].std(), rel=0.15), j


def test_result_is_what_pm_sample_returns(gaussian_fits):
    integrated, full = gaussian_fits
    assert type(integrated) is type(full)
    stats_group = get_group(integrated, "sample_stats")
    for name in ("diverging", "tree_depth", "step_size", "lp", "log_marginal"):
        assert stats_group[name].shape == (2, 1000), name
    assert int(stats_group["diverging"].sum()) == 0
    assert get_group(integrated, "log_likelihood")["y"].shape == (2, 1000, GROUP.size)
    attrs = get_group(integrated, "posterior").attrs
    assert attrs["method"] == "integrated_laplace_nuts" and attrs["inner_failures"] == 0
    assert attrs["max_rhat"] < 1.01 and attrs["min_ess_bulk"] > 400


def test_chains_too_short_to_converge_are_reported(gaussian_marginal):
    model, laplace = gaussian_marginal
    with pytest.warns(UserWarning, match="have not converged.*bulk ESS below 100 per chain for .*tau_log__"):
        result = sample_integrated(
            model, random=["u"], compiled_marginal=laplace, draws=15, tune=15, chains=2, random_seed=8,
            progressbar=False,
        )  # fmt: skip
    assert get_group(result, "posterior").attrs["min_ess_bulk"] < 200


def test_cbpp_beside_full_nuts(mixed_marginal, cbpp_full_nuts):
    model, random, laplace = mixed_marginal("cbpp")
    integrated = sample_integrated(
        model, random=random, compiled_marginal=laplace, draws=1000, tune=1000, chains=2, random_seed=11,
        progressbar=False,
    )  # fmt: skip
    full = cbpp_full_nuts
    ours, theirs = moments(integrated, ["beta", "sigma", "u"]), moments(full, ["beta", "sigma", "u"])
    # Laplace is not exact for binomial data: the posteriors agree to a fraction of a posterior SD
    for name in ours:
        flat_ours = ours[name].reshape(2000, -1)
        flat_theirs = theirs[name].reshape(2000, -1)
        sd = flat_theirs.std(axis=0)
        assert np.all(np.abs(flat_ours.mean(axis=0) - flat_theirs.mean(axis=0)) < 0.25 * sd), name
        np.testing.assert_allclose(flat_ours.std(axis=0), sd, rtol=0.25, err_msg=name)


def test_arguments_are_checked(gaussian_marginal):
    model, laplace = gaussian_marginal
    with pytest.raises(ModelSpecificationError, match="start"):
        sample_integrated(model, random=["u"], compiled_marginal=laplace, start="nowhere")
    with pytest.raises(ModelSpecificationError, match="step"):
        sample_integrated(model, random=["u"], compiled_marginal=laplace, step=pm.Metropolis)
    with pytest.raises(ModelSpecificationError, match="nothing is left"):
        sample_integrated(model, random=["mu", "tau", "sigma", "u"])
    with pytest.raises(ModelSpecificationError, match="integrates out"):
        sample_integrated(model, random=["mu"], compiled_marginal=laplace)


def test_failures_during_sampling_are_reported(gaussian_marginal, monkeypatch):
    model, laplace = gaussian_marginal
    solve = laplace.value_and_grad

    def failing_below(theta):
        # an inner solve that fails wherever tau < 0.6 (a region with posterior mass)
        if theta[1] < np.log(0.6):
            raise InnerSolveError("no conditional mode here (made to fail)")
        return solve(theta)

    monkeypatch.setattr(laplace, "value_and_grad", failing_below)
    with pytest.warns(UserWarning, match="failed at [0-9]+ proposed values.*made to fail"):
        result = sample_integrated(
            model, random=["u"], compiled_marginal=laplace, draws=300, tune=300, chains=1, progressbar=False,
            random_seed=1,
        )  # fmt: skip
    post = get_group(result, "posterior")
    assert post.attrs["inner_failures"] > 0
    assert float(post["tau"].min()) >= 0.6  # the chains never accept a step where the density could not be had
