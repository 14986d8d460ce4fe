"""Laplace and integrated-Laplace fits of PyMC models, returned as the object ``pm.sample`` returns.

A fit goes model -> compile -> inner solve -> marginal -> outer -> draws -> convert -> report, and the package is
laid out that way: :mod:`~pymc_laplace.compile` (the only code that reads a ``pm.Model``), :mod:`~pymc_laplace.inner`
(the random effects integrated out: inner Newton, Laplace marginal, quadrature), :mod:`~pymc_laplace.outer`
(optimised, integrated on a design, or sampled by NUTS), ``gaussian`` (draws), ``convert`` (xarray) and
:mod:`~pymc_laplace.report` (tables and checks). The entry functions below are the public API.
"""

from pymc_laplace._compat import get_group
from pymc_laplace.compile.graphs import clear_compile_cache
from pymc_laplace.errors import (
    ApproximationWarning,
    BoundaryFitWarning,
    HessianNotPositiveDefiniteError,
    HessianNotPositiveDefiniteWarning,
    LaplaceError,
    ModelSpecificationError,
    OptimizationError,
    StartPointError,
)
from pymc_laplace.inner.marginal import InnerNewton, InnerSolveError, LaplaceMarginal
from pymc_laplace.inner.quadrature import check_laplace
from pymc_laplace.integrated import OuterOptimizer, fit_integrated_laplace, marginal
from pymc_laplace.laplace import fit_laplace
from pymc_laplace.outer.optimize import NewtonOptimizer
from pymc_laplace.outer.sampling import sample_integrated
from pymc_laplace.predict import predict
from pymc_laplace.report.consistency import check_consistency
from pymc_laplace.report.diagnostics import importance_resample, pareto_smooth
from pymc_laplace.report.tables import confint, fit_statistics, random_effects, summary

__version__ = "0.1.0"

__all__ = [
    "ApproximationWarning",
    "BoundaryFitWarning",
    "HessianNotPositiveDefiniteError",
    "HessianNotPositiveDefiniteWarning",
    "InnerNewton",
    "InnerSolveError",
    "LaplaceError",
    "LaplaceMarginal",
    "ModelSpecificationError",
    "NewtonOptimizer",
    "OptimizationError",
    "OuterOptimizer",
    "StartPointError",
    "check_consistency",
    "check_laplace",
    "clear_compile_cache",
    "confint",
    "fit_integrated_laplace",
    "fit_laplace",
    "fit_statistics",
    "get_group",
    "importance_resample",
    "marginal",
    "pareto_smooth",
    "predict",
    "random_effects",
    "sample_integrated",
    "summary",
]
