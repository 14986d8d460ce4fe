"""The one module that reads a ``pm.Model``: it compiles every pytensor graph a fit needs, once.

Everything downstream (solvers, fits, draws) works on the frozen :class:`CompiledJoint` and plain numpy arrays.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from numbers import Integral, Real
from typing import Any

import numpy as np
import pymc as pm
import pytensor
import pytensor.tensor as pt
import scipy.sparse as sp
from pymc.pytensorf import compile as compile_graph
from pymc.pytensorf import constant_fold, join_nonshared_inputs
from pytensor.compile.sharedvalue import SharedVariable
from pytensor.graph.basic import Variable, equal_computations
from pytensor.graph.replace import graph_replace, vectorize_graph
from pytensor.graph.traversal import applys_between, graph_inputs
from pytensor.scalar.math import Sigmoid
from pytensor.tensor.blockwise import Blockwise
from pytensor.tensor.elemwise import DimShuffle, Elemwise
from pytensor.tensor.random.basic import BernoulliRV, BinomialRV
from pytensor.tensor.sharedvar import TensorSharedVariable

from pymc_laplace.compile import function_cache
from pymc_laplace.compile.linking import link_inner_functions, python_mode
from pymc_laplace.compile.ops import with_fast_kernels
from pymc_laplace.errors import ModelSpecificationError, StartPointError


@dataclass(frozen=True)
class FlatLayout:
    """How the flat unconstrained vector is cut into the model's value variables.

    Attributes
    ----------
    names : tuple of str
        Value-variable names in order (``"beta"``, ``"sigma_log__"``, ...).
    shapes : tuple of tuple of int
        Shape of each value variable.
    slices : tuple of slice
        Where each value variable sits in the flat vector.
    labels : tuple of str
        One label per element of the flat vector, e.g. ``"beta[x1]"``, using the model's coords where the value
        variable has the shape of its random variable.
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    slices: tuple[slice, ...]
    labels: tuple[str, ...]

    @property
    def size(self) -> int:
        return len(self.labels)

    def split(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Flat vector -> ``{value name: array}``."""
        return {n: x[s].reshape(shp) for n, s, shp in zip(self.names, self.slices, self.shapes, strict=True)}

    def join(self, point: Mapping[str, Any]) -> np.ndarray:
        """``{value name: array}`` -> flat vector."""
        return (
            np.concatenate([np.asarray(point[n], dtype=float).ravel() for n in self.names])
            if self.names
            else (np.zeros(0))
        )

    def indices(self, names: Sequence[str]) -> np.ndarray:
        """Flat indices of the elements of the named value variables."""
        where = dict(zip(self.names, self.slices, strict=True))
        return np.concatenate([np.arange(where[n].start, where[n].stop) for n in names]).astype(int)


@dataclass(frozen=True)
class PosteriorVariable:
    """A variable reported in the posterior group: a free variable (constrained) or a Deterministic."""

    name: str
    dims: tuple[str, ...] | None


@dataclass(frozen=True)
class DataVariable:
    """Observed or constant data, for the ``observed_data`` and ``constant_data`` groups."""

    name: str
    values: np.ndarray
    dims: tuple[str, ...] | None


@dataclass(frozen=True)
class CompiledJoint:
    """The compiled log density of a model and everything needed to report draws from it.

    Attributes
    ----------
    layout : FlatLayout
        The unconstrained parameter vector.
    start : ndarray, shape (n,)
        Start point of the optimiser (unconstrained); the log density is finite there (checked when compiled).
    jacobian : bool
        Whether the log density includes the log-Jacobian of the transforms.
    value_grad_hess : callable
        ``x -> (logp, dlogp (n,), d2logp (n, n))``: exact derivatives of the log density.
    logp_and_outputs : callable
        ``x -> [logp, *values]``: the log density and each posterior variable (constrained values and
        Deterministics), in the order of ``posterior_variables``.
    posterior_variables : tuple of PosteriorVariable
    observed_data, constant_data : tuple of DataVariable
    coords : dict
        The model's coords.
    describe_point : callable
        ``x -> str``: each variable's log density at ``x``, for error messages.
    logp_and_outputs_batched : callable, optional
        ``X (m, n) -> [logp (m,), *values (m, ...)]``: ``logp_and_outputs`` vectorised over a batch of points
        (compiled on first use). Where the model has parameter checks, one failing point makes the whole batch's
        log density ``-inf``: callers evaluate such points again one at a time.
    value_dims : tuple
        The dims of each value variable of ``layout`` (its random variable's, when the transform keeps the shape;
        else None).
    log_likelihood_variables : tuple of PosteriorVariable
        The observed variables, each with its dims, in the order of ``pointwise_log_likelihood``'s outputs.
    pointwise_log_likelihood : callable, optional
        ``X (m, n) -> [log p(y_i | x) (m, *shape of y) for each observed variable]``: the elementwise log likelihood
        of each point (compiled on first use), for the ``log_likelihood`` group.
    """

    layout: FlatLayout
    start: np.ndarray
    jacobian: bool
    value_grad_hess: Callable[[np.ndarray], tuple[float, np.ndarray, np.ndarray]]
    logp_and_outputs: Callable[[np.ndarray], list[np.ndarray]]
    posterior_variables: tuple[PosteriorVariable, ...]
    observed_data: tuple[DataVariable, ...]
    constant_data: tuple[DataVariable, ...]
    coords: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    describe_point: Callable[[np.ndarray], str] = repr
    logp_and_outputs_batched: Callable[[np.ndarray], list[np.ndarray]] | None = None
    log_likelihood_variables: tuple[PosteriorVariable, ...] = ()
    pointwise_log_likelihood: Callable[[np.ndarray], list[np.ndarray]] | None = None
    value_dims: tuple[tuple[str, ...] | None, ...] = ()


def element_labels(
    name: str, shape: tuple[int, ...], dims: Sequence[str] | None, coords: Mapping[str, Sequence[Any]]
) -> list[str]:
    """Labels of the elements of an array variable in C order, e.g. ``beta[x1]`` or ``u[3]``."""
    if len(shape) == 0:
        return [name]
    axes = []
    for axis, length in enumerate(shape):
        dim = dims[axis] if dims is not None and axis < len(dims) else None
        values = coords.get(dim) if dim is not None else None
        if values is not None and len(values) == length:
            axes.append([str(v) for v in values])
        else:
            axes.append([str(i) for i in range(length)])
    return [f"{name}[{', '.join(combo)}]" for combo in itertools.product(*axes)]


def _logit_of_binary_likelihood(rv: pt.TensorVariable) -> pt.TensorVariable | None:
    """The linear predictor of a Bernoulli or Binomial whose probability is ``sigmoid(eta)``, else None."""
    op = rv.owner.op
    if not isinstance(op, (BernoulliRV, BinomialRV)):
        return None
    p = rv.owner.inputs[-1]
    broadcasts = []  # PyMC may wrap sigmoid(eta) in ExpandDims; they commute with the elementwise sigmoid
    while p.owner is not None and isinstance(p.owner.op, DimShuffle):
        broadcasts.append(p.owner.op)
        p = p.owner.inputs[0]
    if p.owner is None or not (isinstance(p.owner.op, Elemwise) and isinstance(p.owner.op.scalar_op, Sigmoid)):
        return None
    eta = p.owner.inputs[0]
    for op in reversed(broadcasts):
        eta = op(eta)
    return eta


def _data_value(var: Any) -> np.ndarray:
    if isinstance(var, TensorSharedVariable):
        return np.asarray(var.get_value())
    if hasattr(var, "data"):
        return np.asarray(var.data)
    return np.asarray(var.eval())


def _binary_loglik_terms(model: pm.Model, rvs: Sequence[pt.TensorVariable]) -> list[pt.TensorVariable]:
    """Log likelihood of logit-link Bernoulli/Binomial terms written as ``y*eta - n*softplus(eta)``.

    PyMC's own graph for these (a switch over ``log(sigmoid)``) has wrong or NaN first and second derivatives once
    ``|eta|`` exceeds about 37; this form has exact derivatives everywhere.
    """
    terms = []
    for rv in rvs:
        eta = _logit_of_binary_likelihood(rv)
        observed = model.rvs_to_values[rv]
        y_values = _data_value(observed)
        if isinstance(rv.owner.op, BernoulliRV):
            n = pt.constant(1.0)
            n_values = np.ones(1)
        else:
            n = rv.owner.inputs[-2]
            folded = constant_fold([n], raise_not_constant=False)[0]
            n_values = np.asarray(folded) if isinstance(folded, np.ndarray | int | float | np.number) else None
        if np.any(y_values < 0) or (n_values is not None and np.any(y_values > n_values)):
            raise ModelSpecificationError(
                f"Observed values of {rv.name!r} lie outside the support of its distribution (0 <= y <= n). "
                "Check the data passed as `observed`."
            )
        eta_v, n_v = model.replace_rvs_by_values([eta, pt.as_tensor(n)])
        y = pt.as_tensor(observed)
        term = y * eta_v - n_v * pt.softplus(eta_v)
        if isinstance(rv.owner.op, BinomialRV):
            term = term + pt.gammaln(n_v + 1) - pt.gammaln(y + 1) - pt.gammaln(n_v - y + 1)
        terms.append(pt.sum(term))
    return terms


def model_log_density(
    model: pm.Model, *, jacobian: bool, rvs: Sequence[pt.TensorVariable] | None = None
) -> pt.TensorVariable:
    """Log density of ``rvs`` (default: every variable and potential) in terms of the model's value variables.

    Logit-link Bernoulli and Binomial likelihoods are written as ``y*eta - n*softplus(eta)``.
    """
    rvs = list(model.basic_RVs) + list(model.potentials) if rvs is None else list(rvs)
    binary = [rv for rv in rvs if rv in model.observed_RVs and _logit_of_binary_likelihood(rv) is not None]
    others = [rv for rv in rvs if rv not in binary]
    if others:
        factors = _log_density_factors(model, jacobian)
        sums = [pt.sum(factors[rv]) for rv in others]
        terms = [pt.add(*sums) if len(sums) > 1 else sums[0]]
    else:
        terms = []
    terms += _binary_loglik_terms(model, binary)
    if not terms:
        return pt.constant(0.0, dtype="float64")
    return pt.add(*terms) if len(terms) > 1 else terms[0]


_LOG_DENSITY_FACTORS: weakref.WeakKeyDictionary[pm.Model, dict[bool, tuple[tuple, dict]]] = weakref.WeakKeyDictionary()


def _log_density_factors(model: pm.Model, jacobian: bool) -> dict[Any, pt.TensorVariable]:
    """Each variable's and potential's log density terms (``model.logp(sum=False)``), by variable.

    pymc's log density of a variable is conditional on the values of all others whichever are asked for, so the terms
    of every variable are derived once per model (the derivation is most of the time a fit of a small model spends
    building graphs) and summed over the subsets each compiled function needs. A model given new variables since is
    derived again.
    """
    variables = tuple(model.basic_RVs) + tuple(model.potentials)
    kept = _LOG_DENSITY_FACTORS.setdefault(model, {}).get(jacobian)
    same = kept is not None and len(kept[0]) == len(variables)
    if same and all(a is b for a, b in zip(kept[0], variables, strict=True)):
        return kept[1]
    factors = dict(zip(variables, model.logp(vars=list(variables), jacobian=jacobian, sum=False), strict=True))
    _LOG_DENSITY_FACTORS[model][jacobian] = (variables, factors)
    return factors


def check_continuous(model: pm.Model) -> None:
    """Raise if any free variable is discrete."""
    discrete = [rv.name for rv in model.free_RVs if rv.dtype.startswith(("int", "uint", "bool"))]
    if discrete:
        raise ModelSpecificationError(
            f"The free variable(s) {discrete} are discrete; a Laplace approximation needs continuous free "
            "variables. Marginalise them out (e.g. pymc_extras.marginalize) or observe them."
        )


def validate_arguments(
    model: pm.Model | None,
    *,
    draws: int | None = None,
    chains: int | None = None,
    ridge: float | None = None,
) -> pm.Model:
    """The model to fit (``model``, else the one on the context stack), checked with the arguments shared by the
    entry functions. Cheap: it runs before anything is compiled, so misuse fails at once.

    Raises
    ------
    ModelSpecificationError
        No model; a model without free variables or with discrete ones; ``draws`` or ``chains`` that is not a
        positive integer; a ``ridge`` that is negative or not finite.
    """
    for argument, count in (("draws", draws), ("chains", chains)):
        if count is not None and not (isinstance(count, Integral) and not isinstance(count, bool) and count >= 1):
            raise ModelSpecificationError(
                f"`{argument}` must be a positive integer, not {count!r} (e.g. draws=1000, chains=4: the result "
                "holds chains x draws independent draws)."
            )
    if ridge is not None and not (
        isinstance(ridge, Real) and not isinstance(ridge, bool) and np.isfinite(ridge) and ridge >= 0
    ):
        raise ModelSpecificationError(
            f"`ridge` must be a finite number >= 0, not {ridge!r}: it is the precision added to the diagonal of the "
            "negative Hessian (ridge=0, the default, adds none). A negative ridge would remove curvature."
        )
    if model is None:
        try:
            model = pm.modelcontext(None)
        except TypeError:
            raise ModelSpecificationError(
                "No model to fit: none was passed and none is on the context stack. Pass it (`model=model`) or "
                "call inside `with model:`."
            ) from None
    if not isinstance(model, pm.Model):
        raise ModelSpecificationError(
            f"`model` must be a pm.Model, not {type(model).__name__}; the other arguments are keyword-only "
            "(e.g. `draws=1000`)."
        )
    if not model.free_RVs:
        raise ModelSpecificationError(
            "The model has no free variables, so there is nothing to fit: every variable is observed or "
            "deterministic. Give it at least one unobserved variable (a parameter with a prior)."
        )
    check_continuous(model)
    return model


def resolve_variables(model: pm.Model, names: Sequence[Any] | None, *, argument: str, if_empty: str = "") -> list[str]:
    """Value-variable names of the free variables named (by name or by variable) in ``names``.

    ``None`` means every free variable. Raises :class:`ModelSpecificationError` for a name that is not a free
    variable (saying whether it is observed or deterministic), a variable named twice, or an empty list
    (``if_empty`` then says what to do instead).
    """
    free = {rv.name: rv for rv in model.free_RVs}
    if names is None:
        return [model.rvs_to_values[rv].name for rv in model.free_RVs]
    if isinstance(names, (str, pt.TensorVariable)):
        names = [names]
    try:
        items = list(names)
    except TypeError:
        raise ModelSpecificationError(
            f"`{argument}` must be a list of variable names or variables, not {type(names).__name__}."
        ) from None
    if not items:
        raise ModelSpecificationError(
            f"`{argument}` is empty: name at least one of the free variables {sorted(free)}. {if_empty}".rstrip()
        )
    value_names = {model.rvs_to_values[rv].name: rv.name for rv in model.free_RVs}
    kinds = {rv.name: "observed" for rv in model.observed_RVs}
    kinds |= {d.name: "a Deterministic" for d in model.deterministics}
    given: dict[str, list[Any]] = {}
    for item in items:
        name = item if isinstance(item, str) else getattr(item, "name", None)
        name = value_names.get(name, name)
        if name not in free:
            kind = f"which is {kinds[name]}, not" if name in kinds else "which is not"
            raise ModelSpecificationError(
                f"`{argument}` names {name!r}, {kind} a free variable of the model. "
                f"The free variables are {sorted(free)}."
            )
        given.setdefault(name, []).append(item if isinstance(item, str) else name)
    repeated = {name: spelled for name, spelled in given.items() if len(spelled) > 1}
    if repeated:
        name, spelled = next(iter(repeated.items()))
        raise ModelSpecificationError(
            f"`{argument}` names {name!r} more than once ({spelled}); name each variable once."
        )
    return [model.rvs_to_values[free[name]].name for name in given]


def _data_variables(model: pm.Model) -> tuple[tuple[DataVariable, ...], tuple[DataVariable, ...]]:
    dims = model.named_vars_to_dims
    observed, observed_ids = [], set()
    for rv in model.observed_RVs:
        value = model.rvs_to_values[rv]
        observed_ids.add(id(value))
        observed.append(DataVariable(rv.name, _data_value(value), _dims(dims.get(rv.name))))
    constant = []
    for var in getattr(model, "data_vars", []):
        if id(var) in observed_ids or var.name is None:
            continue
        constant.append(DataVariable(var.name, _data_value(var), _dims(dims.get(var.name))))
    return tuple(observed), tuple(constant)


def _dims(dims: Sequence[str | None] | None) -> tuple[str, ...] | None:
    if dims is None:
        return None
    return tuple(d for d in dims if d is not None) if all(d is not None for d in dims) else None


_SHAPE_KEEPING_TRANSFORMS = {
    "LogTransform", "IntervalTransform", "Interval", "LogOddsTransform", "LogExpM1", "Ordered", "CircularTransform",
    "ScaleTransform", "LocTransform", "ExpTransform",
}  # fmt: skip


def _transform_keeps_shape(transform: Any) -> bool:
    """Whether a value variable has its random variable's shape (then the variable's dims label it)."""
    if transform is None:
        return True
    if type(transform).__name__ == "ChainedTransform":
        return all(_transform_keeps_shape(t) for t in transform.transform_list)
    return type(transform).__name__ in _SHAPE_KEEPING_TRANSFORMS


def start_point(model: pm.Model, initvals: Mapping[str, Any] | None) -> dict[str, np.ndarray]:
    """The unconstrained start point, with ``initvals`` (constrained values, as in ``pm.sample``) applied.

    pymc's start values (``model.initial_point()``), evaluated by Python code: a small graph, and linking it in C
    would make pytensor read its whole index of C modules before any stored function is loaded (see
    :mod:`pymc_laplace.compile.linking`).
    """
    from pymc.initial_point import convert_str_to_rv_dict, make_initial_point_expression
    from pymc.pytensorf import compile as compile_once
    from pymc.pytensorf import find_rng_nodes, replace_rng_nodes, reseed_rngs

    names = {rv.name for rv in model.free_RVs}
    for name in initvals or {}:
        if name not in names:
            raise ModelSpecificationError(
                f"`initvals` names {name!r}, which is not a free variable of the model. "
                f"The free variables are {sorted(names)}."
            )
    overrides = dict(initvals or {})
    try:
        expressions = make_initial_point_expression(
            free_rvs=model.free_RVs,
            rvs_to_transforms=model.rvs_to_transforms,
            initval_strategies={**model.rvs_to_initial_values, **convert_str_to_rv_dict(model, overrides)},
            return_transformed=True,
        )
        function = link_inner_functions(
            compile_once([], replace_rng_nodes(expressions), mode=python_mode()), python_mode()
        )
    except (TypeError, ValueError) as err:
        raise _initvals_error(model, overrides, err) from None
    reseed_rngs(find_rng_nodes(function.maker.fgraph.outputs), 0)
    values = function()
    return {
        model.rvs_to_values[rv].name: np.asarray(value, dtype=float)
        for rv, value in zip(model.free_RVs, values, strict=True)
    }


def _initvals_error(model: pm.Model, overrides: dict[str, Any], err: Exception) -> ModelSpecificationError:
    """Which entry of ``initvals`` pymc could not use (tried one at a time: this runs only after a failure)."""
    from pymc.initial_point import make_initial_point_fn

    culprit = None
    for name, value in overrides.items():
        try:
            make_initial_point_fn(model=model, overrides={name: value}, return_transformed=True)
        except (TypeError, ValueError):
            culprit = name
            break
    if culprit is None:
        return ModelSpecificationError(f"`initvals` could not be applied: {err}")
    shape = tuple(int(d) for d in model.eval_rv_shapes()[culprit])
    return ModelSpecificationError(
        f"`initvals` gives {culprit!r} the value {overrides[culprit]!r}, which pymc cannot use as its start "
        f"({str(err).splitlines()[0].rstrip('.')}). Give a value of the variable's shape {shape}, on its "
        "constrained scale."
    )


def start_point_error(logp: float, description: str) -> StartPointError:
    """The error for a start point where the log density is not finite, with each variable's log density there."""
    if logp == np.inf:
        cause = "a variable's density is unbounded there (e.g. a Beta or Gamma with shape below 1 at its boundary)"
        advice = "Give `initvals` away from that point."
    else:
        cause = (
            "the point lies outside the support of a variable, a distribution's parameters are invalid there "
            "(e.g. a negative scale), or the data hold values the likelihood cannot produce"
        )
        advice = (
            "Give `initvals` inside the support of every variable, or check the data and the parameters of the "
            "variables whose log density is not finite."
        )
    return StartPointError(
        f"The log density is {logp} at the start point: {cause}. Start point (unconstrained) and each variable's "
        f"log density there:\n{description}\n{advice}"
    )


class _CompileClock:
    """Seconds spent building and compiling graphs in this process (nested spans counted once)."""

    def __init__(self) -> None:
        self.total = 0.0
        self._depth = 0
        self._start = 0.0

    def __enter__(self) -> _CompileClock:
        if self._depth == 0:
            self._start = time.perf_counter()
        self._depth += 1
        return self

    def __exit__(self, *exc: Any) -> None:
        self._depth -= 1
        if self._depth == 0:
            self.total += time.perf_counter() - self._start


COMPILE_CLOCK = _CompileClock()


def compile_seconds() -> float:
    """Seconds this process has spent building and compiling pytensor graphs for fits (for timing reports)."""
    return COMPILE_CLOCK.total


def _timed(function: Callable) -> Callable:
    """Count the time spent in ``function`` on the compile clock."""

    @functools.wraps(function)
    def timed(*args: Any, **kwargs: Any) -> Any:
        with COMPILE_CLOCK:
            return function(*args, **kwargs)

    return timed


def check_start(
    logp_and_outputs: Callable[[np.ndarray], list[np.ndarray]], start: np.ndarray, describe_point: Callable
) -> None:
    """Raise :class:`StartPointError` unless the model can be evaluated at ``start`` with a finite log density."""
    try:
        start_logp = float(logp_and_outputs(start)[0])
    except Exception as err:  # e.g. an Assert in a Deterministic: still a start the model cannot evaluate
        raise StartPointError(
            f"The model cannot be evaluated at the start point ({type(err).__name__}: {str(err).splitlines()[0]}). "
            f"Start point (unconstrained) and each variable's log density there:\n{describe_point(start)}\n"
            "Give `initvals` where every variable and Deterministic can be evaluated."
        ) from err
    if not np.isfinite(start_logp):
        raise start_point_error(start_logp, describe_point(start))


@_timed
def compile_joint(
    model: pm.Model,
    *,
    jacobian: bool = True,
    initvals: Mapping[str, Any] | None = None,
    compile_kwargs: Mapping[str, Any] | None = None,
    derivatives: bool = True,
) -> CompiledJoint:
    """Compile the log density of ``model``, its exact gradient and Hessian, and the map to posterior values.

    Parameters
    ----------
    model : pm.Model
    jacobian : bool
        Include the log-Jacobian of the transforms (density of the unconstrained values) or not.
    initvals : dict, optional
        Start values of free variables on their constrained scale, keyed by variable name.
    compile_kwargs : dict, optional
        Passed to ``pytensor.function`` (e.g. ``{"mode": "FAST_COMPILE"}``).
    derivatives : bool
        Compile the dense gradient and Hessian (``value_grad_hess``); not needed when only draws are mapped.

    Raises
    ------
    ModelSpecificationError
        Discrete free variables, or ``initvals`` that are not values of free variables.
    StartPointError
        The log density is not finite at the start point (checked before the derivatives are compiled).
    """
    check_continuous(model)
    key = _cache_key(model, "joint", jacobian, initvals, compile_kwargs, derivatives)
    cached = _CACHE.get(model, {}).get(key) if key is not None else None
    if cached is not None:
        check_start(cached.logp_and_outputs, cached.start, cached.describe_point)  # the data may have changed
        observed, constant = _data_variables(model)
        return replace(cached, observed_data=observed, constant_data=constant)
    point = start_point(model, initvals)
    value_vars = [model.rvs_to_values[rv] for rv in model.free_RVs]
    coords = {k: tuple(v) if v is not None else () for k, v in model.coords.items()}
    dims = model.named_vars_to_dims

    labels: list[str] = []
    shapes, slices, value_dims = [], [], []
    for rv, value in zip(model.free_RVs, value_vars, strict=True):
        shape = tuple(int(s) for s in np.shape(point[value.name]))
        # dims label a transformed value only when the transform keeps the shape (log, logodds; not simplex)
        rv_dims = dims.get(rv.name) if _transform_keeps_shape(model.rvs_to_transforms.get(rv)) else None
        value_dims.append(_dims(rv_dims))
        labels += element_labels(value.name, shape, rv_dims, coords)
        slices.append(slice(len(labels) - int(np.prod(shape, dtype=int)), len(labels)))
        shapes.append(shape)
    layout = FlatLayout(tuple(v.name for v in value_vars), tuple(shapes), tuple(slices), tuple(labels))

    posterior_rvs = list(model.free_RVs) + list(model.deterministics)
    posterior_variables = tuple(PosteriorVariable(v.name, _dims(dims.get(v.name))) for v in posterior_rvs)
    logp = model_log_density(model, jacobian=jacobian)
    outputs = model.replace_rvs_by_values(posterior_rvs)
    # the elementwise log likelihood of each observed variable (pymc's own graph: values, not derivatives, are used);
    # an observed variable has no transform, so its terms are the same with or without the Jacobians
    observed_rvs = list(model.observed_RVs)
    factors = _log_density_factors(model, jacobian) if observed_rvs else {}
    pointwise = [factors[rv] for rv in observed_rvs]
    log_likelihood_variables = tuple(PosteriorVariable(rv.name, _dims(dims.get(rv.name))) for rv in observed_rvs)
    n_out = 1 + len(outputs)
    [logp_flat, *rest], x = join_nonshared_inputs(point, [logp, *outputs, *pointwise], value_vars)
    x.name = "unconstrained"
    walked_logp = logp_flat  # with the model's data containers, whose values the Hessian pattern is read with
    [logp_flat, *rest], shared, data = _data_as_inputs([logp_flat, *rest])
    outputs_flat, pointwise_flat = rest[: n_out - 1], rest[n_out - 1 :]
    everything = [logp_flat, *outputs_flat, *pointwise_flat]
    kwargs = {"on_unused_input": "ignore", **dict(compile_kwargs or {})}
    reuse_key = ("joint", derivatives, tuple(sorted(kwargs.items())) if key is not None else None)
    functions = _find_reusable(reuse_key, everything, [x, *data])
    if functions is None:
        base = function_cache.graph_digest([x, *data], everything, "joint", sorted(kwargs.items()))
        batch = pt.matrix("unconstrained_batch")
        # pymc's compile turns parameter checks into -inf (a draw outside the support is not an error)
        functions = {
            "logp_and_outputs": _LazyFunction(
                [*data, x], [logp_flat, *outputs_flat], kwargs, _named_digest(base, "logp_and_outputs")
            ),
            "batched": _LazyFunction(
                [*data, batch],
                lambda: vectorize_graph([logp_flat, *outputs_flat], {x: batch}),
                kwargs,
                _named_digest(base, "batched"),
            ),
            "pointwise_log_likelihood": _LazyFunction(
                [*data, x], list(pointwise_flat), kwargs, _named_digest(base, "pointwise_log_likelihood")
            ),
            "pointwise_log_likelihood_batched": _LazyFunction(
                [*data, batch],
                lambda: vectorize_graph(list(pointwise_flat), {x: batch}),
                kwargs,
                _named_digest(base, "pointwise_log_likelihood_batched"),
            ),
        }
        if derivatives:
            # The Hessian is assembled from exact Hessian-vector products (one reverse pass over the gradient per
            # column): a graph about twice the gradient's, which compiles far faster than a vectorised Jacobian.
            direction = pt.vector("direction")

            def value_grad_hvp() -> list[Variable]:
                grad = pt.grad(logp_flat, x)
                return [logp_flat, grad, pt.grad(pt.sum(grad * direction), x)]

            functions["value_grad_hvp"] = _LazyFunction(
                [*data, x, direction], value_grad_hvp, kwargs, _named_digest(base, "value_grad_hvp")
            )
        _store_reusable(reuse_key, everything, [x, *data], functions)
    out_fn = _with_data(functions["logp_and_outputs"], shared)
    if not pointwise_flat:
        pointwise_fn = None
    elif _vectorises_cheaply(list(pointwise_flat)):
        pointwise_fn = _with_data(functions["pointwise_log_likelihood_batched"], shared)
    else:  # batched linear algebra (MvNormal) vectorises poorly: point by point
        single = _with_data(functions["pointwise_log_likelihood"], shared)

        def pointwise_fn(xs: np.ndarray) -> list[np.ndarray]:
            return _stack_rows([single(xv) for xv in xs])

    model_ref = weakref.ref(model)  # the cache entry must not keep its (weakly held) model alive

    def describe_point(xv: np.ndarray) -> str:
        values = layout.split(xv)
        lines = [f"  {name} = {np.array2string(v, precision=4, threshold=8)}" for name, v in values.items()]
        try:
            logps = model_ref().point_logps(values)
            lines += [f"  log density of {name}: {lp}" for name, lp in logps.items()]
        except Exception as err:  # the description is a courtesy; it must not hide the real error
            lines.append(f"  (log densities per variable unavailable: {err})")
        return "\n".join(lines)

    # Check the start before compiling derivatives, and before anything downstream (the Hessian-pattern walk of
    # compile_split) evaluates the graph there without pymc's parameter checks turned into -inf.
    start = layout.join(point)
    check_start(out_fn, start, describe_point)

    if derivatives:
        vg_hvp_fn = _with_data(functions["value_grad_hvp"], shared)
        compression = _HessianCompression(walked_logp, x, start) if start.size >= COMPRESSED_HESSIAN_MIN_SIZE else None

        def vgh_fn(xv: np.ndarray) -> list[np.ndarray]:
            n = xv.size
            if compression is not None and compression.worthwhile():
                # one product per colour of the Hessian's structural pattern (star colouring of a sparse Hessian)
                products = np.empty((compression.n_colors, n))
                for c, direction in enumerate(compression.directions):
                    f, g, products[c] = vg_hvp_fn(xv, direction)
                return [f, g, compression.recover(products)]
            hessian = np.empty((n, n))
            f, g = np.nan, np.zeros(n)
            for i, unit in enumerate(np.eye(n)):
                f, g, hessian[:, i] = vg_hvp_fn(xv, unit)
            if n == 0:
                f, g, _ = vg_hvp_fn(xv, np.zeros(0))
            return [f, g, 0.5 * (hessian + hessian.T)]
    else:

        def vgh_fn(xv: np.ndarray) -> list[np.ndarray]:
            raise RuntimeError("compiled with derivatives=False")

    def value_grad_hess(xv: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
        f, g, h = vgh_fn(xv)
        return float(f), g, h

    observed, constant = _data_variables(model)
    compiled = CompiledJoint(
        layout=layout,
        start=start,
        jacobian=jacobian,
        value_grad_hess=value_grad_hess,
        logp_and_outputs=out_fn,
        posterior_variables=posterior_variables,
        observed_data=observed,
        constant_data=constant,
        coords=coords,
        describe_point=describe_point,
        logp_and_outputs_batched=(
            _batched_unless_cheap(functions["batched"], out_fn, shared)
            if _vectorises_cheaply([logp_flat, *outputs_flat])
            else None
        ),
        log_likelihood_variables=log_likelihood_variables,
        pointwise_log_likelihood=pointwise_fn,
        value_dims=tuple(value_dims),
    )
    if key is not None:
        _CACHE.setdefault(model, {})[key] = compiled
    return compiled


# From this many unconstrained parameters on, fit_laplace's Hessian is assembled from one Hessian-vector product per
# colour of its structural pattern instead of one per column (the pattern walk costs more than it saves below)
COMPRESSED_HESSIAN_MIN_SIZE = 64


class _HessianCompression:
    """The dense Hessian of ``logp`` in ``x`` from compressed products, by the graph's structural pattern.

    The pattern is read once from the graph (:func:`~pymc_laplace.compile.structure.walk_hessian_pattern`) with the
    current values of the data containers it depends on, and read again whenever those values change
    (``pm.set_data``): a pattern that is too small would silently drop entries. Compression is used only when it
    saves at least half of the products.
    """

    def __init__(self, logp: Variable, x: Variable, start: np.ndarray) -> None:
        self._logp, self._x, self._start = logp, x, start
        self._seen: list[tuple[Any, Any]] | None = None

    def _current(self) -> bool:
        return self._seen is not None and all(var.get_value(borrow=True) is value for var, value in self._seen)

    def worthwhile(self) -> bool:
        if not self._current():
            from pymc_laplace.compile.structure import hessian_coloring, recovery_slots, walk_hessian_pattern

            walked = walk_hessian_pattern(self._logp, self._x, {self._x: self._start}, warn=False)
            self._seen = [(var, var.get_value(borrow=True)) for var in walked.data_inputs]
            colors = hessian_coloring(walked.pattern)
            n = self._start.size
            self.n_colors = int(colors.max()) + 1 if colors.size else 0
            self.directions = np.eye(self.n_colors)[colors].T if colors.size else np.zeros((0, n))
            self._slots = recovery_slots(walked.pattern, colors) if 2 * self.n_colors <= n else None
        return self._slots is not None

    def recover(self, products: np.ndarray) -> np.ndarray:
        slots = self._slots
        values = np.asarray(products).ravel()[slots.data - 1]
        hessian = sp.csr_matrix((values, slots.indices, slots.indptr), shape=slots.shape).toarray()
        return 0.5 * (hessian + hessian.T)


@dataclass(frozen=True)
class CompiledSplit:
    """The joint log density ``l(b, theta) = log p(y, b | theta)`` split into outer parameters and random effects.

    Every function takes flat unconstrained vectors ``b`` (random effects) and ``theta`` (the other free
    variables). The Hessian of ``l`` in ``b`` is only ever seen through ``n_colors`` compressed Hessian-vector
    products (DESIGN-NOTES, "Sparse Hessians by compressed Hessian-vector products").

    Attributes
    ----------
    theta_layout, b_layout : FlatLayout
    theta_start, b_start : ndarray
    pattern : scipy.sparse.csr_matrix
        Sparsity pattern (bool, n_b x n_b) of the Hessian of ``l`` in ``b``, found from the graph: where it can be
        nonzero for any ``theta``, given the data.
    pattern_fallbacks : tuple of str
        Ops of the graph without a pattern rule whose safe fallback coupled random effects.
    pattern_data : tuple of (shared variable, ndarray)
        The data containers the pattern was read with, and their values then.
    repattern : callable
        ``() -> pattern`` walked again with the data containers' current values (after ``pm.set_data``).
    colors : ndarray of int, shape (n_b,)
        Colouring of the symmetric ``pattern``: star or column, whichever needs fewer colours.
    joint_value : callable
        ``(b, theta) -> l``.
    joint_grad : callable
        ``(b, theta) -> (l, dl/db)``: no Hessian products (the chord steps of the draws).
    joint_newton : callable
        ``(b, theta) -> (l, dl/db, HV)`` with ``HV[c] = (d2l/db2) @ indicator(colour c)``, shape (K, n_b).
    joint_value_batched, joint_newton_batched : callable
        The same vectorised over a batch: ``(B (m, n_b), Theta (m, n_theta)) -> l (m,)`` and
        ``-> (l (m,), dl/db (m, n_b), HV (m, K, n_b))``, for the inner solves of many ``theta`` draws at once.
        None for graphs with batched linear algebra (``Blockwise``: MvNormal, LKJ), whose vectorised derivatives
        take far longer to compile, and far more memory, than the draws one at a time.
    outer_terms : callable
        ``(b, theta, S) -> (dl/dtheta, dphi/db, dphi/dtheta)`` where ``phi = -sum(S * HV)``; with ``S`` holding
        the entries of ``Q^-1`` on ``Q``'s pattern, compressed like ``HV``.
    mixed_product : callable
        ``(b, theta, w) -> d/dtheta [w . dl/db]``.
    cross_product : callable
        ``(b, theta, v) -> d/db [v . dl/dtheta]``: a row of ``d2l / (dtheta db)`` for a unit ``v``.
    likelihood : callable
        ``(b, theta) -> (log p(y | b, theta), its gradient in theta)``: the observed variables' log density alone,
        for a start of ``theta`` fitted with the random effects held at ``b`` (a GLM fit, as glmmTMB and lme4 start).
    prior : callable
        ``theta -> (log prior of theta with its Jacobian, gradient)``.
    natural : callable
        ``theta -> (values, jacobian)``: the outer variables on their natural (constrained) scale, flattened in
        the order of ``natural_labels``, then the quantities of ``derived_labels``, and the exact Jacobian of that
        map, shape (n_natural + n_derived, n_theta).
    natural_labels : tuple of str
    derived_labels : tuple of str
        Functions of ``theta`` alone reported beside it (:func:`derived_quantities`): standard deviations and
        correlations of LKJ covariance factors, and the model's small Deterministics of ``theta``.
    joint : CompiledJoint
        The whole model compiled as for ``fit_laplace`` (draws, posterior variables, data groups).
    theta_in_joint, b_in_joint : ndarray of int
        Where ``theta`` and ``b`` sit in ``joint.layout``.
    joint_grads, joint_grads_batched : callable
        ``(b, theta) -> (l, dl/db, dl/dtheta)``, and the same over a batch (None as ``joint_value_batched``): the
        gradient of adaptive Gauss-Hermite quadrature needs both gradients at every node.
    data_containers : tuple of shared variables
        Every data container the functions read (observed ``pm.Data`` included): a solution cached for one set of
        their values is not reused for another.
    hessian_constant_in_b : bool
        ``l`` is read from the graph to be a polynomial of degree at most 2 in ``b``
        (:func:`~pymc_laplace.compile.structure.polynomial_degree`): ``Q`` does not depend on ``b``, so one
        factorisation serves every inner Newton step at a ``theta`` (Gaussian data and random effects).
    """

    theta_layout: FlatLayout
    b_layout: FlatLayout
    theta_start: np.ndarray
    b_start: np.ndarray
    pattern: Any
    colors: np.ndarray
    pattern_fallbacks: tuple[str, ...]
    pattern_data: tuple[tuple[Any, np.ndarray], ...]
    repattern: Callable[[], Any]
    joint_value: Callable[[np.ndarray, np.ndarray], float]
    joint_grad: Callable[[np.ndarray, np.ndarray], list[np.ndarray]]
    joint_newton: Callable[[np.ndarray, np.ndarray], list[np.ndarray]]
    joint_value_batched: Callable[[np.ndarray, np.ndarray], np.ndarray] | None
    joint_newton_batched: Callable[[np.ndarray, np.ndarray], list[np.ndarray]] | None
    outer_terms: Callable[[np.ndarray, np.ndarray, np.ndarray], list[np.ndarray]]
    mixed_product: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
    cross_product: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
    likelihood: Callable[[np.ndarray, np.ndarray], list[np.ndarray]]
    prior: Callable[[np.ndarray], list[np.ndarray]]
    natural: Callable[[np.ndarray], list[np.ndarray]]
    natural_labels: tuple[str, ...]
    derived_labels: tuple[str, ...]
    joint: CompiledJoint
    theta_in_joint: np.ndarray
    b_in_joint: np.ndarray
    joint_grads: Callable[[np.ndarray, np.ndarray], list[np.ndarray]] | None = None
    joint_grads_batched: Callable[[np.ndarray, np.ndarray], list[np.ndarray]] | None = None
    data_containers: tuple[Any, ...] = ()
    hessian_constant_in_b: bool = False


@_timed
def compile_split(
    model: pm.Model,
    *,
    random: Sequence[Any],
    initvals: Mapping[str, Any] | None = None,
    compile_kwargs: Mapping[str, Any] | None = None,
) -> CompiledSplit:
    """Compile everything the integrated Laplace approximation needs for ``random`` integrated out.

    ``l(b, theta)`` is the log density of the observed variables, of the random effects (with the log-Jacobian
    of their transforms: the integral is over their unconstrained values) and of the potentials; the prior of
    ``theta`` is compiled separately.
    """
    from pymc_laplace.compile.structure import hessian_coloring, polynomial_degree, walk_hessian_pattern

    if isinstance(random, str):
        random = [random]
    random_values = resolve_variables(model, list(random), argument="random")
    if not random_values:
        raise ModelSpecificationError("`random` names no variable to integrate out.")
    joint = compile_joint(model, jacobian=True, initvals=initvals, compile_kwargs=compile_kwargs, derivatives=False)
    key = _cache_key(model, ("split", tuple(random_values)), True, initvals, compile_kwargs, False)
    cached = _CACHE.get(model, {}).get(key) if key is not None else None
    if cached is not None:
        return replace(cached, joint=joint)
    value_by_name = {model.rvs_to_values[rv].name: rv for rv in model.free_RVs}
    random_rvs = [value_by_name[n] for n in random_values]
    theta_rvs = [rv for rv in model.free_RVs if rv not in random_rvs]
    layout = joint.layout
    point = layout.split(joint.start)
    dims, coords = model.named_vars_to_dims, joint.coords

    def sub_layout(rvs: Sequence[pt.TensorVariable]) -> FlatLayout:
        names = [model.rvs_to_values[rv].name for rv in rvs]
        index = {n: i for i, n in enumerate(layout.names)}
        shapes = tuple(layout.shapes[index[n]] for n in names)
        labels, slices = [], []
        for n in names:
            sl = layout.slices[index[n]]
            slices.append(slice(len(labels), len(labels) + sl.stop - sl.start))
            labels += list(layout.labels[sl])
        return FlatLayout(tuple(names), shapes, tuple(slices), tuple(labels))

    theta_layout, b_layout = sub_layout(theta_rvs), sub_layout(random_rvs)
    theta_values = [model.rvs_to_values[rv] for rv in theta_rvs]
    b_values = [model.rvs_to_values[rv] for rv in random_rvs]

    joint_density = model_log_density(
        model, jacobian=True, rvs=list(model.observed_RVs) + random_rvs + list(model.potentials)
    )
    prior_density = model_log_density(model, jacobian=True, rvs=theta_rvs)
    observed_density = model_log_density(model, jacobian=True, rvs=list(model.observed_RVs))
    natural_values = model.replace_rvs_by_values(theta_rvs)
    rv_shapes = model.eval_rv_shapes()
    natural_labels = tuple(
        label
        for rv in theta_rvs
        for label in element_labels(rv.name, tuple(rv_shapes[rv.name]), dims.get(rv.name), coords)
    )
    derived_values, derived_labels = derived_quantities(model, theta_rvs, b_values, point)
    natural_values = [*natural_values, *derived_values]
    natural_flat = pt.concatenate([pt.flatten(v) for v in natural_values]) if natural_values else pt.zeros(0)
    [l_b, prior_b, natural_b, obs_b], b = join_nonshared_inputs(
        point, [joint_density, prior_density, natural_flat, observed_density], b_values
    )
    if theta_values:
        [joint_lp, prior, natural, loglik], theta = join_nonshared_inputs(
            point, [l_b, prior_b, natural_b, obs_b], theta_values
        )
    else:
        joint_lp, prior, natural, loglik, theta = l_b, prior_b, natural_b, obs_b, pt.vector("theta_empty")
    b.name, theta.name = "b", "theta"

    theta_start = theta_layout.join(point) if theta_values else np.zeros(0)
    walk_point = {b: b_layout.join(point), theta: theta_start}
    walked_joint = joint_lp
    [joint_lp, prior, natural, loglik], shared, data = _data_as_inputs([joint_lp, prior, natural, loglik])
    kwargs = {"on_unused_input": "ignore", **dict(compile_kwargs or {})}
    # an equal graph compiled before (a model built again) with the same data: its pattern, colouring and degree
    reuse_key = ("split", tuple(sorted(kwargs.items())) if key is not None else None)
    equal_graph = _find_reusable(reuse_key, [joint_lp, prior, natural, loglik], [b, theta, *data])
    read = _read_pattern(equal_graph, shared, walk_point)
    walked_here = read is None
    if walked_here:
        walked = walk_hessian_pattern(walked_joint, b, walk_point)
        read = _PatternRead(
            pattern=walked.pattern,
            colors=hessian_coloring(walked.pattern),
            degree=polynomial_degree(walked_joint, b),
            fallback_ops=walked.fallback_ops,
            data_positions=tuple(shared.index(var) for var in walked.data_inputs),
        )
    pattern, colors, degree = read.pattern, read.colors, read.degree
    n_colors = int(colors.max()) + 1 if colors.size else 0
    indicators = np.eye(n_colors)[colors].T if colors.size else np.zeros((0, 0))  # (K, n_b)
    # pytensor's rewrites do not terminate on vectorised graphs of a 0-d random effect (a Blockwise of its reshape):
    # then one product graph per colour, stacked
    stacked_colors = n_colors if any(len(shape) == 0 for shape in b_layout.shapes) else None
    functions = None if equal_graph is None else equal_graph.get(stacked_colors)
    if functions is None:
        functions = _split_functions(joint_lp, prior, natural, loglik, b, theta, data, kwargs, stacked_colors)
        if equal_graph is None:
            equal_graph = {}
            _store_reusable(reuse_key, [joint_lp, prior, natural, loglik], [b, theta, *data], equal_graph)
        equal_graph[stacked_colors] = functions
    if walked_here:
        _keep_pattern(equal_graph, read, shared, walk_point)
    bound = {name: _with_data(function, shared) for name, function in functions.items()}
    batchable = stacked_colors is None and _vectorises_cheaply([joint_lp])

    compiled = CompiledSplit(
        theta_layout=theta_layout,
        b_layout=b_layout,
        theta_start=theta_start,
        b_start=b_layout.join(point),
        pattern=pattern,
        colors=colors,
        pattern_fallbacks=read.fallback_ops,
        pattern_data=tuple((shared[k], shared[k].get_value(borrow=True)) for k in read.data_positions),
        data_containers=tuple(shared),
        repattern=lambda: walk_hessian_pattern(walked_joint, b, walk_point, warn=False).pattern,
        joint_value=bound["joint_value"],
        joint_grad=bound["joint_grad"],
        joint_value_batched=bound["joint_value_batched"] if batchable else None,
        joint_newton_batched=(
            functools.partial(bound["joint_newton_batched"], directions=indicators) if batchable else None
        ),
        joint_newton=functools.partial(bound["joint_newton"], directions=indicators),
        outer_terms=functools.partial(bound["outer_terms"], directions=indicators),
        mixed_product=bound["mixed_product"],
        cross_product=bound["cross_product"],
        likelihood=bound["likelihood"],
        prior=bound["prior"],
        natural=bound["natural"],
        natural_labels=natural_labels,
        derived_labels=derived_labels,
        joint=joint,
        theta_in_joint=layout.indices(list(theta_layout.names)) if theta_values else np.zeros(0, dtype=int),
        b_in_joint=layout.indices(list(b_layout.names)),
        joint_grads=bound["joint_grads"],
        joint_grads_batched=bound["joint_grads_batched"] if batchable else None,
        hessian_constant_in_b=degree is not None and degree <= 2,
    )
    if key is not None:
        _CACHE.setdefault(model, {})[key] = compiled
    return compiled


MAX_DERIVED_ELEMENTS = 100


def _lkj_factor_size(rv: pt.TensorVariable) -> int | None:
    """``n`` of an ``LKJCholeskyCov`` variable (its value is the packed ``n x n`` lower Cholesky factor), else None."""
    op = rv.owner.op if rv.owner is not None else None
    if type(op).__name__ != "_LKJCholeskyCovRV":
        return None
    n = next((x for x in rv.owner.inputs if getattr(x.type, "dtype", "").startswith("int") and x.ndim == 0), None)
    try:
        return int(constant_fold([n])[0]) if n is not None else None
    except Exception:  # an ``n`` that is not a constant: no derived rows, the packed factor is still reported
        return None


def derived_quantities(
    model: pm.Model,
    theta_rvs: Sequence[pt.TensorVariable],
    b_values: Sequence[Variable],
    point: Mapping[str, np.ndarray],
) -> tuple[list[Variable], tuple[str, ...]]:
    """Functions of the outer parameters alone, reported with delta-method standard errors.

    - For each ``LKJCholeskyCov`` among them: the standard deviations ``{name}_stds[i]`` and the correlations
      ``{name}_corr[i, j]`` (``i < j``) of the covariance ``L L^T`` (glmmTMB's ``VarCorr``), whether or not the
      model asked for ``compute_corr``.
    - Every Deterministic of at most ``MAX_DERIVED_ELEMENTS`` elements that depends on no random effect (a
      variance ``sigma**2``, an intraclass correlation, a back-transformed coefficient).

    Returns graphs in the value variables of the model and their element labels (C order).
    """
    values, labels, taken = [], [], set()
    for rv in theta_rvs:
        n = _lkj_factor_size(rv)
        if n is None or n < 1:
            continue
        [packed] = model.replace_rvs_by_values([rv])
        factor = pm.expand_packed_triangular(n, packed, lower=True)
        covariance = factor @ factor.T
        stds = pt.sqrt(pt.diag(covariance))
        rows, columns = np.triu_indices(n, k=1)
        correlations = covariance[rows, columns] / (stds[rows] * stds[columns])
        values += [stds, correlations]
        labels += [f"{rv.name}_stds[{i}]" for i in range(n)]
        labels += [f"{rv.name}_corr[{i}, {j}]" for i, j in zip(rows, columns, strict=True)]
        taken |= {f"{rv.name}_stds", f"{rv.name}_corr"}
    b_set = set(b_values)
    coords, dims = model.coords, model.named_vars_to_dims
    for deterministic in model.deterministics:
        if deterministic.name in taken:
            continue
        [graph] = model.replace_rvs_by_values([deterministic])
        if any(var in b_set for var in graph_inputs([graph])):
            continue
        shape = graph.type.shape
        if any(length is None for length in shape):
            try:
                givens = {var: point[var.name] for var in graph_inputs([graph]) if var.name in point}
                shape = tuple(int(length) for length in graph.shape.eval(givens, on_unused_input="ignore"))
            except Exception:  # a shape that cannot be worked out before the fit: not reported
                continue
        if int(np.prod(shape, dtype=int)) > MAX_DERIVED_ELEMENTS or graph.dtype.startswith(("int", "uint", "bool")):
            continue
        values.append(pt.as_tensor(graph).astype(pytensor.config.floatX))
        labels += element_labels(deterministic.name, tuple(shape), dims.get(deterministic.name), coords)
    return values, tuple(labels)


def _split_functions(
    joint_lp: Variable,
    prior: Variable,
    natural: Variable,
    loglik: Variable,
    b: Variable,
    theta: Variable,
    data: list[Variable],
    kwargs: dict[str, Any],
    stacked_colors: int | None = None,
) -> dict[str, _LazyFunction]:
    """Every function of :class:`CompiledSplit`, compiled on first use; the data are their first inputs.

    ``stacked_colors``: build one product graph per colour (that many), stacked, instead of one vectorised graph.
    The derived graphs (products, third derivatives, batches) are built when the first function is compiled, and
    not at all when every function used is loaded from disk.
    """

    @functools.cache
    def derived() -> dict[str, tuple[list[Variable], Any]]:
        grad_b = pt.grad(joint_lp, b)
        # One Hessian-vector product with the direction as an input, vectorised over a batch of directions: the
        # graph is that of one product whatever the number of colours.
        direction = pt.vector("direction")
        directions = pt.matrix("directions")  # (K, n_b)
        if stacked_colors is None:
            hv = vectorize_graph(pt.grad(pt.sum(grad_b * direction), b), {direction: directions})
        else:
            hv = pt.stack([pt.grad(pt.sum(grad_b * directions[c]), b) for c in range(stacked_colors)])
        compressed_inverse = pt.matrix("compressed_inverse")
        phi = -pt.sum(compressed_inverse * hv)
        grad_theta = pt.grad(joint_lp, theta, disconnected_inputs="ignore")
        dphi_db, dphi_dtheta = pt.grad(phi, [b, theta], disconnected_inputs="ignore")
        w = pt.vector("w")
        mixed = pt.grad(pt.sum(w * grad_b), theta, disconnected_inputs="ignore")
        # rows of d2l/(dtheta db) one at a time, d/db [v . dl/dtheta]: one reverse pass over the gradient in theta
        v = pt.vector("v")
        cross_row = pt.grad(pt.sum(v * grad_theta), b, disconnected_inputs="ignore")
        prior_grad = pt.grad(prior, theta, disconnected_inputs="ignore")
        loglik_grad = pt.grad(loglik, theta, disconnected_inputs="ignore")
        natural_jacobian = pytensor.gradient.jacobian(natural, theta, vectorize=True, disconnected_inputs="ignore")
        b_batch, theta_batch = pt.matrix("b_batch"), pt.matrix("theta_batch")

        def batched(outputs: Any) -> Callable[[], Any]:
            """The graphs vectorised over a batch of ``(b, theta)``, built when first compiled."""
            return lambda: vectorize_graph(outputs, {b: b_batch, theta: theta_batch})

        return {
            "joint_value": ([*data, b, theta], joint_lp),
            "joint_grad": ([*data, b, theta], [joint_lp, grad_b]),
            "joint_grads": ([*data, b, theta], [joint_lp, grad_b, grad_theta]),
            "joint_grads_batched": ([*data, b_batch, theta_batch], batched([joint_lp, grad_b, grad_theta])),
            "joint_newton": ([*data, b, theta, directions], [joint_lp, grad_b, hv]),
            "joint_value_batched": ([*data, b_batch, theta_batch], batched(joint_lp)),
            "joint_newton_batched": ([*data, b_batch, theta_batch, directions], batched([joint_lp, grad_b, hv])),
            "outer_terms": (
                [*data, b, theta, compressed_inverse, directions],
                [grad_theta, dphi_db, dphi_dtheta],
            ),
            "mixed_product": ([*data, b, theta, w], mixed),
            "cross_product": ([*data, b, theta, v], cross_row),
            "likelihood": ([*data, b, theta], [loglik, loglik_grad]),
            "prior": ([*data, theta], [prior, prior_grad]),
            "natural": ([*data, theta], [natural, natural_jacobian]),
        }

    # A function called only a few times a fit is compiled with pytensor's FAST_COMPILE mode (few rewrites):
    # optimising its graph would cost far more than it saves. Data-sized graphs (cross products, likelihood) are
    # not among them: FAST_COMPILE would run their elementwise ops in Python, element by element.
    rarely = kwargs if "mode" in kwargs else {**kwargs, "mode": "FAST_COMPILE"}
    base = function_cache.graph_digest(
        [b, theta, *data], [joint_lp, prior, natural, loglik], "split", stacked_colors, sorted(kwargs.items())
    )
    names = (
        "joint_value", "joint_grad", "joint_grads", "joint_grads_batched", "joint_newton", "joint_value_batched",
        "joint_newton_batched", "outer_terms", "mixed_product", "cross_product", "likelihood", "prior", "natural",
    )  # fmt: skip
    return {
        name: _LazyFunction(
            lambda name=name: derived()[name][0],
            lambda name=name: _built(derived()[name][1]),
            rarely if name == "natural" else kwargs,
            _named_digest(base, name),
        )
        for name in names
    }


def _built(outputs: Any) -> Any:
    """Graphs given as they are, or built by calling them."""
    return outputs() if callable(outputs) else outputs


def _named_digest(base: str | None, name: str) -> str | None:
    """The digest of one function derived from graphs of digest ``base``."""
    return None if base is None else hashlib.sha256(f"{base}:{name}".encode()).hexdigest()


class _LazyFunction:
    """A pytensor function compiled on first call (the third-derivative graphs are costly; a value-only use never
    needs them). ``inputs`` and ``outputs`` may be callables that build the graphs then.

    ``digest``: a digest of the graphs these are derived from (see :mod:`pymc_laplace.compile.function_cache`); the
    compiled function is then loaded from disk when a previous process stored it, without building the graphs at all.
    """

    def __init__(self, inputs: Any, outputs: Any, options: dict[str, Any], digest: str | None = None) -> None:
        self.inputs, self.outputs, self.options, self.digest = inputs, outputs, options, digest
        self.function: Callable | None = None

    def _compile(self) -> Callable:
        inputs = self.inputs() if callable(self.inputs) else self.inputs
        graphs = self.outputs() if callable(self.outputs) else self.outputs
        options = {**self.options, "mode": with_fast_kernels(self.options.get("mode"))}
        return compile_graph(inputs, graphs, **options)

    def __call__(self, *args: Any, **named: Any) -> Any:
        if self.function is None:
            with COMPILE_CLOCK:
                self.function = function_cache.load_or_compile(self.digest, self._compile)
        return self.function(*args, **named)


def _with_data(function: Callable, shared: Sequence[Any]) -> Callable:
    """``function`` called with the current values of the model's data containers first."""
    if not shared:
        return function

    def call(*args: Any, **named: Any) -> Any:
        return function(*[var.get_value(borrow=True) for var in shared], *args, **named)

    return call


def _vectorises_cheaply(outputs: list[Variable]) -> bool:
    """Whether the graphs are free of batched linear algebra (``Blockwise`` ops), which vectorises poorly."""
    return not any(isinstance(node.op, Blockwise) for node in applys_between(graph_inputs(outputs), outputs))


# Below this many seconds for a batch point by point, a batched function not yet compiled is not worth compiling.
CHEAP_LOOP_SECONDS = 1.0


def _batched_unless_cheap(batched: _LazyFunction, single: Callable, shared: Sequence[Any]) -> Callable:
    """``X (m, n) -> [logp (m,), *outputs (m, ...)]``: the batched function, or, while it is not compiled and the
    batch is cheap point by point (timed on its first point), the single-point function in a loop."""
    vectorised = _with_data(batched, shared)

    def call(xs: np.ndarray) -> list[np.ndarray]:
        if batched.function is None and len(xs):
            began = time.perf_counter()
            first = single(xs[0])
            if (time.perf_counter() - began) * len(xs) < CHEAP_LOOP_SECONDS:
                return _stack_rows([first, *(single(x) for x in xs[1:])])
        return vectorised(xs)

    return call


def _stack_rows(rows: Sequence[Sequence[Any]]) -> list[np.ndarray]:
    """The outputs of a function called point by point, each stacked over the points: ``(m, ...)``."""
    return [np.stack([np.asarray(row[k]) for row in rows]) for k in range(len(rows[0]))]


def _data_as_inputs(outputs: list[Variable]) -> tuple[list[Variable], list[Any], list[Variable]]:
    """The graphs with each shared variable (data container, dim length) replaced by an input of its type.

    Compiled functions then take the data as arguments: they can serve any model whose graph is the same up to the
    values of its data containers (a model built again), each called with its own model's current values.
    """
    shared = [var for var in graph_inputs(outputs) if isinstance(var, SharedVariable)]
    if not shared:
        return list(outputs), [], []
    placeholders = [var.type(name=var.name) for var in shared]
    replaced = graph_replace(list(outputs), dict(zip(shared, placeholders, strict=True)), strict=False)
    return list(replaced), shared, placeholders


# Compiled functions of graphs seen in this process, by the graphs themselves: a model built again (same graph,
# same constants, data containers of the same types) reuses them. Compared with pytensor's equal_computations, so
# two graphs share functions only when they compute the same thing from the same inputs. Each entry holds a dict:
# the joint's functions by name; a split model's functions by ``stacked_colors``, and under PATTERN_KEY the
# Hessian patterns read for it, each with the data container values and start point it was read with.
_REUSABLE: list[tuple[Any, list[Variable], list[Variable], dict[Any, Any]]] = []
MAX_REUSABLE = 32


def _find_reusable(key: Any, outputs: list[Variable], inputs: list[Variable]) -> dict[Any, Any] | None:
    if key is None or key[-1] is None:
        return None
    for entry_key, entry_outputs, entry_inputs, functions in _REUSABLE:
        if entry_key != key or len(entry_inputs) != len(inputs) or len(entry_outputs) != len(outputs):
            continue
        if all(a.type == b.type for a, b in zip(inputs, entry_inputs, strict=True)) and equal_computations(
            outputs, entry_outputs, in_xs=inputs, in_ys=entry_inputs
        ):
            return functions
    return None


@dataclass(frozen=True)
class _PatternRead:
    """What the graph walk of a split model found, in terms of its data containers' positions (a model built again
    has other shared variables for equal data)."""

    pattern: sp.csr_matrix
    colors: np.ndarray
    degree: int | None
    fallback_ops: tuple[str, ...]
    data_positions: tuple[int, ...]


PATTERN_KEY = "pattern"


def _read_pattern(
    equal_graph: dict | None, shared: Sequence[Any], walk_point: Mapping[Any, np.ndarray]
) -> _PatternRead | None:
    """The pattern read for an equal graph with equal data container values and start point, or None.

    The pattern depends on the graph, the values of the data containers it reads (which entries are nonzero, the
    index arrays) and nothing else; the start point is compared as well, so that a reused pattern is the one the
    walk would read here, whatever it reads.
    """
    if equal_graph is None:
        return None
    for read, data_values, start in equal_graph.get(PATTERN_KEY, ()):
        same_data = all(
            np.array_equal(np.asarray(var.get_value(borrow=True)), value)
            for var, value in zip(shared, data_values, strict=True)
        )
        same_start = all(np.array_equal(walk_point[var], value) for var, value in zip(walk_point, start, strict=True))
        if same_data and same_start:
            return read
    return None


def _keep_pattern(
    equal_graph: dict, read: _PatternRead, shared: Sequence[Any], walk_point: Mapping[Any, np.ndarray]
) -> None:
    """Keep a pattern just read for later equal graphs (with copies of the data: a container set later must not
    change what it was read with)."""
    kept = equal_graph.setdefault(PATTERN_KEY, [])
    data_values = [np.array(var.get_value(borrow=True), copy=True) for var in shared]
    kept.append((read, data_values, [np.array(value, copy=True) for value in walk_point.values()]))
    del kept[:-MAX_PATTERNS_PER_GRAPH]


# patterns kept per equal graph, for as many sets of data container values
MAX_PATTERNS_PER_GRAPH = 4


def _store_reusable(key: Any, outputs: list[Variable], inputs: list[Variable], functions: dict[Any, Any]) -> None:
    if key is None or key[-1] is None:
        return
    _REUSABLE.append((key, outputs, inputs, functions))
    del _REUSABLE[:-MAX_REUSABLE]


# What has been compiled for a model, reused while the model lives (a fit of the same model in the same process
# does not compile again). Keyed on everything a compiled graph depends on except the values of data containers,
# which the compiled functions read when called (pm.set_data needs no new compilation).
_CACHE: weakref.WeakKeyDictionary[pm.Model, dict[tuple, Any]] = weakref.WeakKeyDictionary()


def clear_compile_cache(*, disk: bool = False) -> None:
    """Forget every compiled model: the next fit of any model compiles again (or loads what is kept on disk).

    Parameters
    ----------
    disk : bool
        Also remove the compiled functions kept on disk for later processes (see ``PYMC_LAPLACE_CACHE_DIR``).
    """
    _CACHE.clear()
    _REUSABLE.clear()
    if disk:
        function_cache.clear_disk_cache()


def _cache_key(
    model: pm.Model,
    kind: Any,
    jacobian: bool,
    initvals: Mapping[str, Any] | None,
    compile_kwargs: Mapping[str, Any] | None,
    derivatives: bool,
) -> tuple | None:
    """The key of a compiled model in the cache, or None when something in it cannot be compared (not cached).

    It holds the identity of every variable of the model (adding one changes it), the transforms, the initial values
    (``initvals`` and the model's own), the lengths of the dims and the shapes of the data containers (they shape
    the unconstrained vector), and the compile options.
    """
    options = tuple(sorted((compile_kwargs or {}).items()))
    if any(not isinstance(v, str | int | float | bool | type(None)) for _, v in options):
        return None
    try:
        initial = tuple(sorted((str(k), _fingerprint(v)) for k, v in (initvals or {}).items()))
        model_initial = tuple((rv.name, _fingerprint(v)) for rv, v in model.rvs_to_initial_values.items())
        dim_lengths = tuple((d, _fingerprint(_data_value(length))) for d, length in model.dim_lengths.items())
    except Exception:  # an initial value that is a symbolic expression: do not cache
        return None
    data_shapes = tuple(
        (var.name, np.shape(var.get_value(borrow=True)))
        for var in getattr(model, "data_vars", [])
        if isinstance(var, TensorSharedVariable)
    )
    variables = tuple((name, id(var)) for name, var in model.named_vars.items())
    values = tuple(id(value) for value in model.rvs_to_values.values())
    transforms = tuple(id(t) for t in model.rvs_to_transforms.values())
    potentials = tuple(id(p) for p in model.potentials)
    return (kind, jacobian, derivatives, options, initial, model_initial, dim_lengths, data_shapes, variables,
            values, transforms, potentials)  # fmt: skip


def _fingerprint(value: Any) -> tuple:
    if value is None or isinstance(value, str):
        return (value,)
    array = np.asarray(value)
    if array.dtype == object:
        raise TypeError("not a numeric value")
    return (array.dtype.str, array.shape, hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest())


def observed_as_data(model: pm.Model) -> tuple[pm.Model, dict[str, TensorSharedVariable]]:
    """A copy of ``model`` whose observed values are data containers, so that compiled functions take them as inputs.

    Returns the copy and, by observed variable name, the shared variable that holds its values (one already in the
    model when the observations were given as ``pm.Data``). The graph is otherwise the model's own, so everything
    compiled for the copy serves any values of the observations: one compilation for many simulated data sets.
    """
    from pymc.model.fgraph import ModelObservedRV, fgraph_from_model, model_from_fgraph

    fgraph, _ = fgraph_from_model(model)
    containers: dict[str, TensorSharedVariable] = {}
    replacements = []
    for node in fgraph.toposort():
        if not isinstance(node.op, ModelObservedRV):
            continue
        name = node.outputs[0].name
        value = node.inputs[1]
        if isinstance(value, SharedVariable):
            containers[name] = value
            continue
        data = np.asarray(_data_value(value))
        shared = pytensor.shared(data.astype(value.type.dtype), name=f"{name}_observed", shape=data.shape)
        replacements.append((value, shared))
        containers[name] = shared
    if replacements:
        fgraph.replace_all(replacements, import_missing=True)
    return model_from_fgraph(fgraph, mutate_fgraph=True), containers


def simulate_observed(
    model: pm.Model, values: Mapping[str, np.ndarray], draws: int, random_seed: Any
) -> dict[str, np.ndarray]:
    """``draws`` data sets from ``model`` with the free variables in ``values`` fixed there (the others, the random
    effects, drawn from their distributions given them): observed name -> (draws, *shape)."""
    from pymc_laplace._compat import get_group

    with pm.do(model, dict(values)):
        simulated = pm.sample_prior_predictive(draws=draws, random_seed=random_seed)
    group = get_group(simulated, "prior_predictive")
    shapes = {rv.name: np.shape(_data_value(model.rvs_to_values[rv])) for rv in model.observed_RVs}
    return {name: np.asarray(group[name].values).reshape(draws, *shape) for name, shape in shapes.items()}


def outer_values(model: pm.Model, theta_layout: FlatLayout, theta: np.ndarray) -> dict[str, np.ndarray]:
    """The free variables of ``theta_layout`` at the unconstrained ``theta``, on their own scale, by RV name."""
    values = {}
    rv_of_value = {value.name: rv for rv, value in model.rvs_to_values.items()}
    for name, value in theta_layout.split(np.asarray(theta, dtype=float)).items():
        rv = rv_of_value[name]
        transform = model.rvs_to_transforms.get(rv)
        if transform is not None:
            value = transform.backward(pt.as_tensor_variable(value), *rv.owner.inputs).eval()
        values[rv.name] = np.asarray(value)
    return values
