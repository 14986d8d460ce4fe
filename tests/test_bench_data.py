"""The larger real data sets of the mixed-model benchmark (``bench/bench_mixed.py``): the builders, not fits.

verbagg (lme4's VerbAgg) and insteval (lme4's InstEval) are in ``mixed_models.LARGE_BUILDERS``; this checks
cheaply that they build the models of ``reference/mixed_models.json`` (observations, random effects, fixed
effects as R names them) and that the log density is finite, without fitting.
"""

from __future__ import annotations

import json

import mixed_models  # examples/, put on the path by conftest
import numpy as np
import pytest

REFERENCE = json.loads(mixed_models.REFERENCE.read_text())

# name -> (observations, {random effect: levels})
EXPECTED = {
    "verbagg": (7584, {"u_id": 316, "u_item": 24}),
    "insteval": (73421, {"u_s": 2972, "u_d": 1128, "u_dept": 14}),
}


@pytest.fixture(scope="module", params=sorted(EXPECTED))
def built(request):
    name = request.param
    model, random = mixed_models.LARGE_BUILDERS[name]()
    return name, model, random


def test_large_builders_are_apart_from_the_fitted_ones():
    assert set(mixed_models.LARGE_BUILDERS) == set(EXPECTED)
    assert not set(mixed_models.LARGE_BUILDERS) & set(mixed_models.BUILDERS)


def test_observations_and_random_effects(built):
    name, model, random = built
    n_obs, levels = EXPECTED[name]
    assert [rv.name for rv in model.observed_RVs] == [{"verbagg": "r2", "insteval": "y"}[name]]
    observed = model.rvs_to_values[model.observed_RVs[0]].data
    assert observed.shape == (n_obs,)
    assert REFERENCE[name]["glmmTMB"]["nobs"] == n_obs
    assert random == list(levels)
    point = model.initial_point()
    for variable, count in levels.items():
        assert point[variable].shape == (count,)
        assert model.named_vars_to_dims[variable] == (variable.removeprefix("u_"),)
    # glmmTMB's conditional modes come in the same level order as our coords
    for [(group, effect)] in mixed_models.RANEF[name].values():
        assert REFERENCE[name]["glmmTMB"]["ranef"][group][effect]["level"] == list(model.coords[group])
    if name == "verbagg":
        assert set(np.unique(observed)) == {0, 1}
        assert observed.sum() == 3611  # sum(VerbAgg$r2 == "Y") in R
    else:
        assert observed.sum() == 235369  # sum(InstEval$y) in R


def test_log_density_is_finite(built):
    _, model, _ = built
    point = model.initial_point()
    logp = model.compile_logp(mode="FAST_COMPILE")(point)  # the C compile of FAST_RUN takes seconds here
    assert np.isfinite(logp)


def test_estimates_map_to_the_reference_names(built):
    """``ours`` renames every natural-scale parameter to a key of ``reference`` (and covers them all)."""
    name, model, random = built
    natural = {}
    for rv in model.free_RVs:
        if rv.name in random:
            continue
        dims = model.named_vars_to_dims.get(rv.name)
        if dims:
            natural |= {f"{rv.name}[{label}]": 1.0 for label in model.coords[dims[0]]}
        else:
            natural[rv.name] = 1.0
    assert set(mixed_models.ours(name, natural)) == set(mixed_models.reference(name))
    fixed = REFERENCE[name]["glmmTMB"]["fixed"]["cond"]
    assert list(model.coords["coef"]) == list(fixed)
