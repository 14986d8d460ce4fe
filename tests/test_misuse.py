"""Misuse raises our own error at once, naming the argument or variable and saying what to do.

One catalogue of (id, call, error class, message fragment), in the manner of optimistix's ``tests/helpers.py``
problem lists; tests below it check what a fragment cannot (the absence of a wrong diagnosis, no compilation
before an argument error). Every model is tiny, and argument errors are raised before anything is compiled.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pymc as pm
import pytensor.tensor as pt
import pytest

from pymc_laplace import (
    ModelSpecificationError,
    NewtonOptimizer,
    OptimizationError,
    StartPointError,
    fit_integrated_laplace,
    fit_laplace,
    marginal,
)
from pymc_laplace.outer.optimize import NewtonStatus

QUICK = {"draws": 10, "chains": 1, "progressbar": False}


# ---------------------------------------------------------------------------------------------------- models
def normal_mean(**kwargs: Any) -> pm.Model:
    """mu ~ N(0, 10), y ~ N(mu, sigma): a mode exists (sigma HalfNormal, Jacobian included)."""
    with pm.Model() as model:
        mu = pm.Normal("mu", 0.0, 10.0)
        sigma = pm.HalfNormal("sigma", 1.0)
        pm.Normal("y", mu, sigma, observed=[0.3, -0.1, 0.5])
        pm.Deterministic("twice_mu", 2.0 * mu)
    return model


def grouped(y_sigma: float = 1.0) -> pm.Model:
    """Three groups with a random intercept each: ``u`` is what fit_integrated_laplace integrates out."""
    with pm.Model() as model:
        sigma = pm.HalfNormal("sigma", 1.0)
        u = pm.Normal("u", 0.0, sigma, shape=3)
        pm.Normal("y", u[[0, 0, 1, 2]], y_sigma, observed=[1.0, 2.0, 0.0, 4.0])
    return model


def no_free_variables() -> pm.Model:
    with pm.Model() as model:
        pm.Normal("y", 0.0, 1.0, observed=[0.1, 0.2])
    return model


def centred_schools() -> pm.Model:
    """Eight-schools-like, centred: with the Jacobian the joint density grows like tau^-3 as tau -> 0."""
    with pm.Model() as model:
        mu = pm.Normal("mu", 0.0, 5.0)
        tau = pm.HalfNormal("tau", 5.0)
        theta = pm.Normal("theta", mu, tau, shape=4)
        pm.Normal("y", theta, [15.0, 10.0, 16.0, 11.0], observed=[28.0, 8.0, -3.0, 7.0])
    return model


def kinked(power: float) -> pm.Model:
    """Log density ``-x^2/2 - |x|^power``: finite at x = 0, where its derivatives are not (power < 2)."""
    with pm.Model() as model:
        x = pm.Normal("x", 0.0, 1.0)
        pm.Potential("kink", -(pt.abs(x) ** power))
    return model


def overflow_on_the_way() -> pm.Model:
    """Log density finite everywhere, rising from x = 0 to the mode near 1; beyond x = 0.68 or so the derivatives
    of ``1 / (1 + exp(1000 (x - 0.5))^2)`` overflow (inf / inf), its value (0) does not."""
    with pm.Model() as model:
        x = pm.Normal("x", 1.0, 0.1, initval=0.0)
        pm.Potential("edge", -1.0 / (1.0 + pt.exp(1e3 * (x - 0.5)) ** 2))
    return model


def with_discrete() -> pm.Model:
    with pm.Model() as model:
        pm.Poisson("k", 3.0)
        pm.Normal("x", 0.0, 1.0)
    return model


def must_exceed_five() -> pm.Model:
    with pm.Model() as model:
        x = pm.Normal("x", 0.0, 1.0)
        pm.Potential("must_exceed_five", pt.switch(x > 5.0, 0.0, -np.inf))
    return model


def binomial_above_n() -> pm.Model:
    with pm.Model() as model:
        a = pm.Normal("a", 0.0, 1.0)
        pm.Binomial("y", n=3, logit_p=a, observed=[1, 5])
    return model


# ------------------------------------------------------------------------------------------------- catalogue
Case = tuple[str, Callable[[], Any], type[Exception], str]

ARGUMENTS: list[Case] = [
    # where the model comes from
    ("no_model_fit_laplace", lambda: fit_laplace(**QUICK), ModelSpecificationError,
     r"none is on the context stack.*`model=model`.*`with model:`"),
    ("no_model_marginal", lambda: marginal(random=["u"]), ModelSpecificationError,
     r"none is on the context stack.*`model=model`.*`with model:`"),
    ("no_model_fit_integrated", lambda: fit_integrated_laplace(random=["u"], **QUICK), ModelSpecificationError,
     r"none is on the context stack.*`model=model`.*`with model:`"),
    ("model_not_a_model", lambda: fit_laplace(1000), ModelSpecificationError,
     r"`model` must be a pm.Model, not int.*keyword-only"),
    ("no_free_variables_fit_laplace", lambda: fit_laplace(no_free_variables(), **QUICK), ModelSpecificationError,
     r"no free variables.*nothing to fit"),
    ("no_free_variables_marginal", lambda: marginal(no_free_variables(), random=["y"]), ModelSpecificationError,
     r"no free variables.*nothing to fit"),
    ("no_free_variables_fit_integrated", lambda: fit_integrated_laplace(no_free_variables(), random=["y"], **QUICK),
     ModelSpecificationError, r"no free variables.*nothing to fit"),
    ("discrete_free_variable", lambda: fit_laplace(with_discrete(), **QUICK), ModelSpecificationError,
     r"\['k'\] are discrete.*[Mm]arginalise"),
    # vars
    ("vars_empty", lambda: fit_laplace(normal_mean(), vars=[], **QUICK), ModelSpecificationError,
     r"`vars` is empty.*\['mu', 'sigma'\].*Leave `vars` out"),
    ("vars_repeated", lambda: fit_laplace(normal_mean(), vars=["mu", "mu"], **QUICK), ModelSpecificationError,
     r"`vars` names 'mu' more than once.*name each variable once"),
    ("vars_repeated_as_value_variable", lambda: fit_laplace(normal_mean(), vars=["sigma", "sigma_log__"], **QUICK),
     ModelSpecificationError, r"`vars` names 'sigma' more than once \(\['sigma', 'sigma_log__'\]\)"),
    ("vars_observed", lambda: fit_laplace(normal_mean(), vars=["y"], **QUICK), ModelSpecificationError,
     r"`vars` names 'y', which is observed, not a free variable.*\['mu', 'sigma'\]"),
    ("vars_deterministic", lambda: fit_laplace(normal_mean(), vars=["twice_mu"], **QUICK), ModelSpecificationError,
     r"`vars` names 'twice_mu', which is a Deterministic, not a free variable"),
    ("vars_unknown", lambda: fit_laplace(normal_mean(), vars=["nope"], **QUICK), ModelSpecificationError,
     r"`vars` names 'nope', which is not a free variable.*\['mu', 'sigma'\]"),
    ("vars_not_a_list", lambda: fit_laplace(normal_mean(), vars=3, **QUICK), ModelSpecificationError,
     r"`vars` must be a list of variable names or variables, not int"),
    # random
    ("random_empty", lambda: fit_integrated_laplace(grouped(), random=[], **QUICK), ModelSpecificationError,
     r"`random` is empty.*fit_laplace"),
    ("random_repeated_fit_integrated", lambda: fit_integrated_laplace(grouped(), random=["u", "u"], **QUICK),
     ModelSpecificationError, r"`random` names 'u' more than once"),
    ("random_repeated_marginal", lambda: marginal(grouped(), random=["u", "u"]), ModelSpecificationError,
     r"`random` names 'u' more than once"),
    ("random_covers_everything", lambda: fit_integrated_laplace(grouped(), random=["u", "sigma"], **QUICK),
     ModelSpecificationError, r"`random` covers every free variable.*nothing is left to optimise.*fit_laplace"
     r".*leave a parameter .* out of `random`"),
    ("random_observed", lambda: fit_integrated_laplace(grouped(), random=["y"], **QUICK), ModelSpecificationError,
     r"`random` names 'y', which is observed, not a free variable.*\['sigma', 'u'\]"),
    ("random_unknown_marginal", lambda: marginal(grouped(), random=["v"]), ModelSpecificationError,
     r"`random` names 'v', which is not a free variable.*\['sigma', 'u'\]"),
    ("method_unknown", lambda: fit_integrated_laplace(grouped(), random=["u"], method="reml", **QUICK),
     ModelSpecificationError, r"`method` must be 'ml', 'map', 'grid' or 'ccd', not 'reml'"),
    # draws, chains, ridge
    *[
        (f"{entry}_{argument}_{value!r}", call, ModelSpecificationError,
         rf"`{argument}` must be a positive integer, not {value!r}")
        for argument, value in [("draws", 0), ("draws", -5), ("draws", 10.5), ("draws", 10.0), ("chains", 0),
                                ("chains", -1), ("chains", True)]
        for entry, call in [
            ("fit_laplace", lambda a=argument, v=value: fit_laplace(normal_mean(), **{**QUICK, a: v})),
            ("fit_integrated", lambda a=argument, v=value: fit_integrated_laplace(
                grouped(), random=["u"], **{**QUICK, a: v})),
        ]
    ],
    *[
        (f"{entry}_ridge_{value!r}", call, ModelSpecificationError, r"`ridge` must be a finite number >= 0")
        for value in [-1e-3, np.nan, np.inf]
        for entry, call in [
            ("fit_laplace", lambda v=value: fit_laplace(normal_mean(), ridge=v, **QUICK)),
            ("fit_integrated", lambda v=value: fit_integrated_laplace(grouped(), random=["u"], ridge=v, **QUICK)),
        ]
    ],
    # initvals
    ("initvals_unknown", lambda: fit_laplace(normal_mean(), initvals={"tau": 1.0}, **QUICK), ModelSpecificationError,
     r"`initvals` names 'tau'"),
]  # fmt: skip


START: list[Case] = [
    ("initvals_wrong_shape", lambda: marginal(grouped(), random=["u"], initvals={"u": [0.0, 1.0]}),
     ModelSpecificationError, r"`initvals` gives 'u' the value \[0.0, 1.0\].*shape \(3,\)"),
    # a start outside the support: our error, listing each variable's log density there
    ("initvals_outside_support_marginal", lambda: marginal(grouped(), random=["u"], initvals={"sigma": -1.0}),
     StartPointError, r"(?s)nan at the start point.*outside the support.*log density of sigma: nan.*initvals"),
    ("initvals_outside_support_fit_integrated",
     lambda: fit_integrated_laplace(grouped(), random=["u"], initvals={"sigma": -1.0}, **QUICK),
     StartPointError, r"(?s)nan at the start point.*log density of sigma: nan"),
    ("invalid_likelihood_parameter_marginal", lambda: marginal(grouped(y_sigma=-1.0), random=["u"]),
     StartPointError, r"(?s)-inf at the start point.*negative scale.*log density of y: -inf"),
    ("invalid_likelihood_parameter_fit_laplace", lambda: fit_laplace(grouped(y_sigma=-1.0), **QUICK),
     StartPointError, r"(?s)-inf at the start point.*log density of y: -inf"),
    ("potential_minus_infinity_at_start", lambda: fit_laplace(must_exceed_five(), **QUICK), StartPointError,
     r"(?s)-inf at the start point.*must_exceed_five.*initvals"),
    ("data_outside_support", lambda: fit_laplace(binomial_above_n(), **QUICK), ModelSpecificationError,
     r"'y' lie outside the support"),
    # derivatives that overflow at a finite point: said so, not "outside the support" or "improper"
    ("gradient_overflows_at_start", lambda: fit_laplace(kinked(0.5), **QUICK), StartPointError,
     r"(?s)finite \(-0.9189\d*\) at the start point, but its derivatives overflow.*gradient is not finite in "
     r"\['x'\].*inside the support.*x = 0"),
    ("hessian_overflows_at_start", lambda: fit_laplace(kinked(1.5), **QUICK), StartPointError,
     r"derivatives overflow there: the Hessian is not finite in the rows of \['x'\]"),
    ("derivatives_overflow_in_the_search", lambda: fit_laplace(overflow_on_the_way(), **QUICK), OptimizationError,
     r"gradient or Hessian overflows \(is not finite\) although the log density itself is finite"),
    # no joint mode: a funnel, not a lack of steps
    ("funnel", lambda: fit_laplace(centred_schools(), optimizer=NewtonOptimizer(max_steps=40), **QUICK),
     OptimizationError, r"joint mode does not exist.*unbounded above \(a funnel\).*tau_log__.*"
     r"fit_integrated_laplace\(model, random=\['theta'\]\)"),
    ("finite_far_start_is_not_improper",
     lambda: fit_laplace(normal_mean(), initvals={"sigma": 1e25}, optimizer=NewtonOptimizer(max_steps=1), **QUICK),
     OptimizationError, r"stopped after max_steps.*Try more steps"),
]  # fmt: skip


CATALOGUE = ARGUMENTS + START


@pytest.mark.parametrize(("call", "error", "match"), [c[1:] for c in CATALOGUE], ids=[c[0] for c in CATALOGUE])
def test_misuse_raises_our_error(call, error, match):
    with pytest.raises(error, match=match) as info:
        call()
    assert type(info.value).__module__.startswith("pymc_laplace"), type(info.value)


# ------------------------------------------------------------------------------------------ beyond a fragment
@pytest.mark.parametrize(("call", "error", "match"), [c[1:] for c in ARGUMENTS], ids=[c[0] for c in ARGUMENTS])
def test_argument_errors_come_before_any_compilation(call, error, match, monkeypatch):
    """Cheap checks at the top of the entry functions: misuse never waits for (or fails inside) pytensor."""
    import pymc.initial_point

    import pymc_laplace.compile.graphs

    def no_compilation(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("compiled before the arguments were checked")

    monkeypatch.setattr(pymc_laplace.compile.graphs, "compile_graph", no_compilation)
    monkeypatch.setattr(pymc.initial_point, "make_initial_point_fn", no_compilation)
    with pytest.raises(error, match=match):
        call()


def test_funnel_is_not_blamed_on_max_steps():
    with pytest.raises(OptimizationError) as info:
        fit_laplace(centred_schools(), optimizer=NewtonOptimizer(max_steps=40), **QUICK)
    message = str(info.value)
    assert "max_steps=" not in message and "Try more steps" not in message
    assert "improper" not in message


@pytest.mark.parametrize("power", [0.5, 1.5])
def test_overflowing_derivatives_are_not_called_an_invalid_start(power):
    with pytest.raises(StartPointError) as info:
        fit_laplace(kinked(power), **QUICK)
    message = str(info.value)
    assert "improper" not in message and "outside the support" not in message


def test_newton_reports_derivatives_that_overflow_before_the_mode():
    """A wall of non-finite derivatives at x = 0.5 between the start 0 and the maximum 1 of -(x - 1)^2."""

    def walled(x: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
        finite = x[0] < 0.5
        return (
            -((x[0] - 1.0) ** 2),
            np.array([-2.0 * (x[0] - 1.0) if finite else np.nan]),
            np.array([[-2.0 if finite else np.nan]]),
        )

    result = NewtonOptimizer().maximize(walled, np.zeros(1))
    assert result.status is NewtonStatus.DERIVATIVES_NONFINITE and np.isfinite(result.logp)
    start = NewtonOptimizer().maximize(walled, np.ones(1))
    assert start.status is NewtonStatus.DERIVATIVES_NONFINITE and start.n_steps == 0


def test_a_finite_start_is_never_called_improper():
    """A start far out on the unconstrained scale (log sigma = 57.6) is still a finite point, not a runaway."""
    with pytest.raises(OptimizationError) as info:
        fit_laplace(normal_mean(), initvals={"sigma": 1e25}, optimizer=NewtonOptimizer(max_steps=1), **QUICK)
    assert "improper" not in str(info.value)


def test_invalid_start_lists_every_variable_log_density():
    """As pm.Model.check_start_vals: the point, and the log density of each variable there."""
    with pytest.raises(StartPointError) as info:
        marginal(grouped(y_sigma=-1.0), random=["u"])
    message = str(info.value)
    for line in ("sigma_log__ = 0.", "u = [0. 0. 0.]", "log density of sigma: ", "log density of u: ",
                 "log density of y: -inf"):  # fmt: skip
        assert line in message


def test_marginal_with_nothing_left_outside_is_the_evidence():
    """marginal() with every free variable random is legitimate (the Laplace evidence); only the fit refuses."""
    with pm.Model() as model:
        mu = pm.Normal("mu", 0.0, 5.0)
        pm.Normal("y", mu, 1.0, observed=[0.1, 0.5])
    # exact for a Gaussian model: y ~ N(0, 25 * 11^T + I)
    cov = 25.0 * np.ones((2, 2)) + np.eye(2)
    y = np.array([0.1, 0.5])
    exact = -0.5 * (y @ np.linalg.solve(cov, y) + np.linalg.slogdet(cov)[1] + 2 * np.log(2 * np.pi))
    # (pymc's Normal log density differs from the exact one by about 3e-8 here)
    assert marginal(model, random=["mu"]).logp({}) == pytest.approx(exact, rel=1e-7)
    with pytest.raises(ModelSpecificationError, match="covers every free variable"):
        fit_integrated_laplace(model, random=["mu"], **QUICK)
