"""Graphs evaluated once, linked without C code, inner functions included.

pytensor finds the C module of each node in an index of its compile directory, which it builds whole the first time
a process links C code: every module's key is read, about 2 ms a module (seconds on a well-used machine). A process
that loads stored functions reads only the keys they recorded (:mod:`pymc_laplace.compile.function_cache`), which
works only if nothing else links C code first. Graphs this package evaluates once (pymc's start values, the walk
that reads the Hessian pattern) did: pytensor's FAST_COMPILE mode still links C code, and the inner function of an
``OpFromGraph`` node (``pt.diag`` makes one; pymc's random variables are such nodes) is compiled with pytensor's
default mode the first time the node runs. The stored functions' own inner functions are compiled when they are
stored (``function_cache``).
"""

from __future__ import annotations

from typing import Any

import pytensor
from pytensor.compile.builders import OpFromGraph
from pytensor.compile.mode import Mode
from pytensor.link.vm import VMLinker


def python_mode() -> Mode:
    """pytensor's FAST_COMPILE rewrites, every node run by its Python implementation: for a graph evaluated once.

    Unlike a temporary ``cxx=""``, this changes nothing global (pytensor decides once per process, on first import,
    whether its C virtual machine is available). Pass the compiled function to :func:`link_inner_functions` with
    this mode.
    """
    return Mode(linker=VMLinker(use_cloop=False, c_thunks=False), optimizer="fast_compile")


def link_inner_functions(function: Any, mode: Mode | None = None) -> Any:
    """``function`` with the inner function of each ``OpFromGraph`` node it holds, nested ones too, compiled now.

    pytensor compiles them the first time such a node runs (rewrites can make them, as ``pt.diag`` and ``Einsum``
    do, and pymc's random variables are such nodes). With ``mode`` None each is compiled as pytensor would (done
    before a function is stored, its C modules are recorded and the inner functions stored with it); with a mode,
    in that mode (:func:`python_mode` for a graph evaluated once). An op that already has its inner function keeps
    it.
    """
    fgraph = getattr(getattr(function, "maker", None), "fgraph", None)
    pending = list(fgraph.apply_nodes) if fgraph is not None else []
    seen: set[int] = set()
    while pending:
        op = pending.pop().op
        if not isinstance(op, OpFromGraph) or id(op) in seen:
            continue
        seen.add(id(op))
        if mode is not None and getattr(op, "_fn", None) is None:
            options = {key: value for key, value in getattr(op, "kwargs", {}).items() if key != "mode"}
            op._fn = pytensor.function(op.inner_inputs, op.inner_outputs, mode=mode, **options)
            op._fn.trust_input = True  # as pytensor sets it
        pending.extend(op.fn.maker.fgraph.apply_nodes)
    return function
