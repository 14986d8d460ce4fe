"""Compiled pytensor functions kept on disk, so that a second process fits a model without compiling it again.

pytensor keeps the C code of each op on disk, but every process still builds the derivative graphs and runs the
graph rewrites, which is most of the time a first fit takes. Here a compiled function is pickled once, under a
digest of the graphs it was built from, and a later process with the same graphs loads it (unpickling links the
cached C modules; nothing is rewritten).

The digest is structural: every op (by its pickled state), every constant (by its bytes), every input (by its
type and position) and the wiring between them, plus the versions of everything that turns those graphs into
compiled code (this package's graph building, pytensor, numpy, Python, pytensor's configuration). Two graphs
with the same digest compute the same thing; a graph that cannot be digested (an op that does not pickle, an
input that is neither listed nor constant) is compiled as usual and not stored.

The directory is ``$PYMC_LAPLACE_CACHE_DIR``, by default ``pymc_laplace/`` inside pytensor's ``compiledir``;
setting ``PYMC_LAPLACE_CACHE_DIR`` to an empty string turns the disk cache off. It keeps at most ``MAX_FILES``
functions and ``MAX_TOTAL_BYTES`` of them, the least recently used going first; a function whose constants take more
than ``MAX_STORED_CONSTANT_BYTES`` (large data given as numpy arrays rather than ``pm.Data``) is not kept.

Linking a loaded function finds each of its C modules in pytensor's index of the ``compiledir``, which pytensor
builds whole the first time a process needs it: every module's ``key.pkl`` is unpickled and hashed, about 2 ms a
module (2.5 s for 1,300 modules), whatever the function needs. So a stored function also records the directories
of the C modules it links, and a process whose index is not built yet reads just those (pytensor's own reading, with
the other directories marked as read for the time of it). Any later lookup that misses reads the rest of the index,
as pytensor would, before it compiles anything: a module is never compiled twice, only found later. At exit the
directories never read stay unread, so pytensor's clean-up of modules unused for weeks is left to processes that
read the whole index (any process that compiles).
"""

from __future__ import annotations

import atexit
import copyreg
import functools
import hashlib
import io
import os
import pickle
import platform
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytensor
from pytensor.graph.basic import Constant, Variable
from pytensor.graph.op import Op
from pytensor.graph.traversal import io_toposort

from pymc_laplace.compile.linking import link_inner_functions

# At most this many compiled functions, and this many bytes of them, are kept; the least recently used go first.
MAX_FILES = 512
MAX_TOTAL_BYTES = 2 * 2**30
# A function whose constants take more than this is not kept: its file would hold them all (data given to a model
# as numpy arrays rather than pm.Data are constants), and a model with 10 million rows wrote 10 GB of files.
MAX_STORED_CONSTANT_BYTES = 64 * 2**20
SUFFIX = ".pytensor-function.pkl"


def cache_directory() -> Path | None:
    """Where compiled functions are kept, or None when the disk cache is turned off."""
    configured = os.environ.get("PYMC_LAPLACE_CACHE_DIR")
    if configured is not None:
        return Path(configured).expanduser() if configured.strip() else None
    return Path(pytensor.config.compiledir) / "pymc_laplace"


def _is_local_function(value: Any) -> bool:
    return callable(value) and "<locals>" in getattr(value, "__qualname__", "")


def _without_local_functions(state: dict[str, Any]) -> dict[str, Any] | None:
    """``state`` without the caches of closures that pytensor objects keep (None when there are none).

    pytensor caches closures on its objects: gradient builders of an ``OpFromGraph`` (``_lop_op_cache``,
    ``_rop_op_cache``), the vectorised perform of a ``Blockwise`` node (``node.tag.gufunc``). They do not pickle, and
    are rebuilt when needed (the perform when the function is linked again on loading).
    """
    kept, changed = {}, False
    for key, value in state.items():
        if _is_local_function(value):
            changed = True
            if key.endswith("_cache"):
                kept[key] = None
        elif isinstance(value, dict) and value and all(_is_local_function(v) for v in value.values()):
            kept[key], changed = {}, True
        else:
            kept[key] = value
    return kept if changed else None


class _Pickler(pickle.Pickler):
    """A pickler that leaves out the closures pytensor objects cache (see :func:`_without_local_functions`)."""

    def reducer_override(self, obj: Any) -> Any:
        cls = type(obj)
        if (
            not cls.__module__.startswith("pytensor")
            or isinstance(obj, type)
            or cls.__reduce_ex__ is not object.__reduce_ex__
            or cls.__reduce__ is not object.__reduce__
            or not hasattr(obj, "__dict__")
            or "__reduce_ex__" in vars(obj)  # pickled its own way (frozen graph outputs in pytensor 3)
            or "__reduce__" in vars(obj)
        ):
            return NotImplemented
        state = obj.__getstate__() if hasattr(obj, "__getstate__") else obj.__dict__
        if not isinstance(state, dict):
            return NotImplemented
        kept = _without_local_functions(state)
        if "Scratchpad" in cls.__name__ and "trace" in state:
            # the stack where each variable was created (for error messages): 95% of a pickled function's size
            kept = {key: value for key, value in (state if kept is None else kept).items() if key != "trace"}
        # created first and given its state after, as pickle does by default: references back to it resolve
        return NotImplemented if kept is None else (copyreg.__newobj__, (cls,), kept)


def _op_with_props(cls: type, props: tuple) -> None:  # pragma: no cover - named in digests, never called
    """What an op with ``__props__`` is digested as: its class and the values of its props."""


# the qualified name of the __eq__ pytensor generates for a class that declares __props__ and no __eq__
PROPS_EQUALITY = "MetaType.__new__.<locals>.__eq__"


def _equal_by_props(cls: type) -> bool:
    """Whether ops of ``cls`` are equal exactly when their ``__props__`` are: pytensor then generated ``__eq__``."""
    props = getattr(cls, "__props__", None)
    return isinstance(props, tuple) and getattr(cls.__eq__, "__qualname__", "") == PROPS_EQUALITY


class _DigestPickler(_Pickler):
    """Ops that pytensor compares by their ``__props__`` alone pickled as their class and props: the caches such
    an op keeps besides (inner functions and gradient builders, set when a function using it is compiled) are not
    part of what it computes, and must not make a graph's digest depend on what was compiled before it. Other ops
    are pickled whole."""

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, Op) and _equal_by_props(type(obj)):
            return (_op_with_props, (type(obj), tuple(getattr(obj, name) for name in type(obj).__props__)))
        return super().reducer_override(obj)


def _digest_dumps(obj: Any) -> bytes:
    buffer = io.BytesIO()
    _DigestPickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return buffer.getvalue()


@functools.cache
def _environment() -> bytes:
    """Everything besides the graphs that decides what compiling them gives."""
    import pymc_laplace.compile.graphs as graph_building
    import pymc_laplace.compile.linking as linking
    import pymc_laplace.compile.ops as rewrites

    config = pytensor.config
    parts = [
        # how derived graphs are built, rewritten and linked
        *(hashlib.sha256(Path(m.__file__).read_bytes()).hexdigest() for m in (graph_building, linking, rewrites)),
        hashlib.sha256(Path(__file__).read_bytes()).hexdigest(),
        pytensor.__version__,
        np.__version__,
        sys.version,
        platform.machine(),
        *(str(getattr(config, name, "")) for name in ("floatX", "mode", "linker", "optimizer", "cxx", "gcc__cxxflags")),
    ]
    return "\n".join(parts).encode()


def graph_digest(inputs: Sequence[Variable], outputs: Sequence[Variable], *extra: Any) -> str | None:
    """A digest of the graphs from ``inputs`` to ``outputs`` (and of ``extra``, plain values), or None.

    None when the graphs have an input that is neither in ``inputs`` nor a constant, or an op or constant that does
    not pickle: such graphs are not kept on disk.
    """
    digest = hashlib.sha256(_environment())
    try:
        digest.update(_digest_dumps(extra))
        index: dict[Variable, int] = {}
        for position, var in enumerate(inputs):
            index[var] = position
            digest.update(f"input {position}: {var.type}\n".encode())
        for node in io_toposort(list(inputs), list(outputs)):
            for var in node.inputs:
                if var in index:
                    continue
                if not isinstance(var, Constant):
                    return None
                index[var] = len(index)
                digest.update(f"constant {index[var]}: {var.type}\n".encode())
                data = var.data
                if isinstance(data, np.ndarray | np.generic):
                    array = np.ascontiguousarray(data)
                    digest.update(f"{array.dtype.str} {array.shape}\n".encode())
                    digest.update(memoryview(array).cast("B") if array.size else b"")
                else:
                    digest.update(_digest_dumps(data))
            digest.update(_digest_dumps(node.op))
            digest.update(repr([index[var] for var in node.inputs]).encode())
            for var in node.outputs:
                index[var] = len(index)
                digest.update(f" -> {index[var]}: {var.type}\n".encode())
        for var in outputs:
            if var not in index:  # an output that is an input or a constant
                if not isinstance(var, Constant):
                    return None
                index[var] = len(index)
                digest.update(_digest_dumps(var.data))
            digest.update(f"output {index[var]}\n".encode())
    except Exception:  # an op or a constant that does not pickle: not kept on disk
        return None
    return digest.hexdigest()


def load_or_compile(digest: str | None, compile_function: Callable[[], Any]) -> Any:
    """The function stored under ``digest``, or ``compile_function()``, stored there for the next process."""
    directory = cache_directory()
    if digest is None or directory is None:
        return compile_function()
    path = directory / f"{digest}{SUFFIX}"
    if path.exists():
        try:
            with open(path, "rb") as handle:
                read_module_index(pickle.load(handle))  # the C modules it links, then the function
                function = pickle.load(handle)
            os.utime(path)  # recently used
            return function
        except Exception:  # written by an interrupted process or for other libraries: compile again
            path.unlink(missing_ok=True)
    function, module_directories = _compiled_recording_modules(compile_function)
    _store(directory, path, function, module_directories)
    return function


def _compiled_recording_modules(compile_function: Callable[[], Any]) -> tuple[Any, list[str]]:
    """``compile_function()`` and the directories (in pytensor's ``compiledir``) of the C modules it linked."""
    try:
        from pytensor.link.c.cmodule import ModuleCache
    except ImportError:  # pragma: no cover - a pytensor without C modules
        return compile_function(), []
    directories: set[str] = set()
    with _RECORDING:  # one recording at a time, each putting back the method it found (nested ones included)
        found = getattr(ModuleCache, "module_from_key", None)
        if found is None:  # pragma: no cover - another module cache: nothing recorded, the index is read whole
            return compile_function(), []

        def recording(cache: Any, key: Any, lnk: Any) -> Any:
            module = found(cache, key, lnk)
            directories.add(Path(module.__file__).parent.name)
            return module

        ModuleCache.module_from_key = recording
        try:
            function = compile_function()
            link_inner_functions(function)  # inner functions recorded and stored with it
        finally:
            ModuleCache.module_from_key = found
    return function, sorted(directories)


_RECORDING = threading.RLock()


# pytensor's module cache when this module created it with part of its index read
_PARTIAL_INDEX: dict[str, Any] = {"cache": None}


def read_module_index(module_directories: Sequence[str]) -> None:
    """Have pytensor's index of compiled C modules hold those in ``module_directories`` (names in its ``compiledir``).

    Nothing is done when the process has the whole index already (pytensor built it) or when the list is empty.
    Otherwise the module cache is created without reading its index and pytensor's own ``refresh`` reads the listed
    directories alone, the others being marked as read while it runs; they are unmarked after, so that a lookup that
    misses reads them (pytensor does so before compiling a module).
    """
    if not module_directories:
        return
    try:
        from pytensor.link.c import cmodule
        from pytensor.link.c.basic import get_module_cache
    except ImportError:  # pragma: no cover - a pytensor without C modules
        return
    cache = getattr(cmodule, "_module_cache", None)
    if cache is None:
        cache = get_module_cache(init_args={"do_refresh": False})
        _PARTIAL_INDEX["cache"] = cache
        atexit.register(_leave_unread_at_exit)  # after pytensor's own exit hook (registered above): runs first
    elif cache is not _PARTIAL_INDEX["cache"]:
        return  # built whole by pytensor
    root = Path(cache.dirname)
    wanted = {str(root / name / "key.pkl") for name in module_directories}
    try:
        present = {str(root / name / "key.pkl") for name in os.listdir(root)}
    except OSError:
        return
    skipped = (present - wanted) - cache.loaded_key_pkl
    cache.loaded_key_pkl |= skipped
    try:
        cache.refresh(cleanup=False)
    finally:
        cache.loaded_key_pkl -= skipped


def _leave_unread_at_exit() -> None:
    """Keep pytensor's exit clean-up (a refresh) from reading the index this process never needed."""
    cache = _PARTIAL_INDEX["cache"]
    if cache is None:
        return
    root = Path(cache.dirname)
    try:
        present = {str(root / name / "key.pkl") for name in os.listdir(root)}
    except OSError:
        return
    cache.loaded_key_pkl |= present


def _store(directory: Path, path: Path, function: Any, module_directories: Sequence[str] = ()) -> None:
    if _constant_bytes(function) > MAX_STORED_CONSTANT_BYTES:
        return
    try:
        directory.mkdir(parents=True, exist_ok=True)
        # written under another name and renamed: a concurrent reader sees the whole file or none; pickled straight
        # into the file, so that storing never holds a second copy of the function in memory
        with tempfile.NamedTemporaryFile(dir=directory, suffix=".partial", delete=False) as handle:
            try:
                pickle.dump(list(module_directories), handle, protocol=pickle.HIGHEST_PROTOCOL)
                _Pickler(handle, protocol=pickle.HIGHEST_PROTOCOL).dump(function)
            except Exception:  # a function that does not pickle (some backends' compiled code) is simply not kept
                handle.close()
                os.unlink(handle.name)
                return
        os.replace(handle.name, path)
        _evict(directory)
    except OSError as err:  # a read-only or full disk costs the next process time, not this one its fit
        warnings.warn(f"compiled function not kept on disk ({err}); set PYMC_LAPLACE_CACHE_DIR", stacklevel=3)


def _constant_bytes(function: Any) -> int:
    """Bytes of the array constants of a compiled function's graph."""
    fgraph = getattr(getattr(function, "maker", None), "fgraph", None)
    if fgraph is None:
        return 0
    return sum(
        int(var.data.nbytes)
        for var in fgraph.variables
        if isinstance(var, Constant) and isinstance(var.data, np.ndarray)
    )


def _evict(directory: Path) -> None:
    """Remove the least recently used files beyond ``MAX_FILES`` or ``MAX_TOTAL_BYTES`` (the newest always stays)."""
    files = []
    for path in directory.glob(f"*{SUFFIX}"):
        try:
            status = path.stat()
        except OSError:
            continue
        files.append((status.st_mtime, status.st_size, path))
    files.sort(key=lambda entry: entry[0], reverse=True)
    total = 0
    for rank, (_, size, path) in enumerate(files):
        total += size
        if rank > 0 and (rank >= MAX_FILES or total > MAX_TOTAL_BYTES):
            path.unlink(missing_ok=True)


def clear_disk_cache() -> int:
    """Remove every compiled function kept on disk; returns how many were removed."""
    directory = cache_directory()
    if directory is None or not directory.exists():
        return 0
    removed = 0
    for path in directory.glob(f"*{SUFFIX}"):
        path.unlink(missing_ok=True)
        removed += 1
    return removed
