"""Models written as bambi formulas (``y ~ x + (1 | g)``): the PyMC model to fit and its random effects.

bambi (an optional extra: ``pip install pymc_laplace[bambi]``) builds a ``pm.Model`` from a formula. This module
reads one for :func:`pymc_laplace.fit_integrated_laplace`; nothing in it is imported unless a bambi model is
passed.
"""

from __future__ import annotations

import copy
from typing import Any

import pymc as pm

from pymc_laplace.errors import ModelSpecificationError


def is_bambi_model(model: Any) -> bool:
    """Whether ``model`` is a ``bambi.Model`` (checked without importing bambi when it is not installed)."""
    module = type(model).__module__ or ""
    return module.split(".")[0] == "bambi" and type(model).__name__ == "Model"


def bambi_pymc_model(bambi_model: Any) -> tuple[pm.Model, list[str]]:
    """The PyMC model to fit for a bambi model, and the names of its group-specific (random) effects.

    The user's model is left as it is. A copy is built with the parameterisation glmmTMB and lme4 fit:

    - ``center_predictors=False``: the intercept is that of the predictors as given, which is what bambi reports
      after a fit (it un-centres the intercept of the centred model) and what its ``predict`` reads;
    - ``noncentered=False``: each group-specific term is a free variable ``b ~ Normal(0, sigma)`` named as bambi
      names the term (``"1|herd"``, ``"Days|Subject"``), the conditional modes glmmTMB's ``ranef`` reports, and the
      posterior variable bambi's ``predict`` and plots read.

    Neither changes the likelihood of the parameters, so the maximum-likelihood fit is that of the model as
    written; with ``method="map"`` bambi's priors apply to this parameterisation.

    Returns
    -------
    model : pm.Model
    random : list of str
        Every group-specific term of every distributional component (the mean, and e.g. ``sigma`` when it has a
        formula of its own), in bambi's order.
    """
    # a shallow copy: bambi's build reads the terms and data and writes only the model's own backend attributes
    fitted = copy.copy(bambi_model)
    fitted.center_predictors = False
    fitted.noncentered = False
    fitted.build()
    model = fitted.backend.model
    free = {rv.name for rv in model.free_RVs}
    random = []
    for component in fitted.distributional_components.values():
        for term in component.group_specific_terms.values():
            name = term.alias or term.name
            if name not in free:
                raise ModelSpecificationError(
                    f"The group-specific term {name!r} of the bambi model is not a free variable of the PyMC model "
                    f"bambi built ({sorted(free)}); pass that model and `random` yourself: "
                    "fit_integrated_laplace(bambi_model.backend.model, random=[...])."
                )
            random.append(name)
    if not random:
        raise ModelSpecificationError(
            "The bambi model has no group-specific terms such as (1 | group) to integrate out; use "
            "fit_laplace(bambi_model.backend.model) after bambi_model.build() for a Laplace fit of it."
        )
    return model, random
