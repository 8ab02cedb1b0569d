"""Memory budgets: ``max_memory=`` picks the chunk size that fits, from XLA's own memory analysis.

Every transformation with a ``chunk_size`` option trades memory for passes:
pushing ``c`` basis vectors at a time holds ``c`` tangents (or cotangents) of
every intermediate. Under ``max_memory=B`` the first call of each call
structure compiles the unchunked program and, if XLA's memory analysis of it
(arguments + outputs + temporaries) is over ``B``, two chunked ones, fits
``bytes(c) = a + b c`` through them, and takes the largest ``c`` whose
compiled program is within ``B`` (halving while it is not). The choice is
cached per call structure and shapes; the result alone over ``B`` is an error.
"""

import dataclasses
import functools
import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import jax
import numpy as np

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse(max_memory, where: str) -> int | None:
    """Bytes from ``max_memory``: ``None``, a positive int, or a string such as ``"2GB"``, ``"512 MiB"``."""
    if max_memory is None:
        return None
    if isinstance(max_memory, bool):
        raise TypeError(f"{where}: max_memory must be a number of bytes or a string such as '2GB', got a bool.")
    if isinstance(max_memory, int | float) and max_memory > 0:
        return int(max_memory)
    if isinstance(max_memory, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", max_memory)
        if m and m.group(2).upper() in _UNITS and float(m.group(1)) > 0:
            return int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    raise ValueError(f"{where}: max_memory must be a positive number of bytes or a string such as '2GB', "
                     f"'512MiB', got {max_memory!r}.")


def _human(b: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if b >= size:
            return f"{b / size:.3g} {unit}"
    return f"{int(b)} B"


@dataclass(frozen=True)
class Fit:
    """The chunk size chosen under a budget and XLA's estimate of the program's memory.

    Attributes:
      chunk_size: ``None`` (everything at once fits) or the chunk size.
      bytes: arguments + outputs + temporaries of the compiled program, by XLA's memory analysis.
      budget: the ``max_memory`` in bytes.
      tried: ``(chunk_size, bytes)`` of every program compiled to decide.
    """

    chunk_size: int | None
    bytes: int
    budget: int
    tried: tuple = ()

    def __str__(self) -> str:
        how = "everything at once" if self.chunk_size is None else f"chunk_size={self.chunk_size}"
        return f"memory: {how}, {_human(self.bytes)} by XLA's analysis (max_memory {_human(self.budget)})"


def measure(fn: Callable, args: tuple, kwargs: dict) -> tuple[int, int]:
    """``(total, output)`` bytes of the program a transformed ``fn`` compiles for this call (shapes suffice).

    ``fn`` is a function this library returned (it has ``.transform``): the program is the one
    its call would compile, lowered for the call's traced leaves (statics stay compiled in).
    """
    t = fn.transform
    jitted, traced, spec = t.compiled(args, kwargs)
    jitted = t.cache.get(spec, jitted)  # the jax.jit itself, not a first-call wrapper around it
    if not hasattr(jitted, "lower"):  # an engine that runs several programs: their sum, as one
        jitted = jax.jit(jitted)
    stats = jitted.lower(*traced).compile().memory_analysis()
    if stats is None:  # pragma: no cover - a backend without the analysis
        raise NotImplementedError("this backend gives no memory analysis of compiled programs")
    out = stats.output_size_in_bytes
    total = stats.argument_size_in_bytes + out + stats.temp_size_in_bytes - stats.alias_size_in_bytes
    return int(total), int(out)


def fit(make: Callable[[int | None], Callable], total: int, budget: int, args: tuple, kwargs: dict,
        where: str) -> Fit:
    """The largest chunk size (``None``: all ``total`` passes at once) whose program fits in ``budget`` bytes.

    Args:
      make: ``make(chunk_size) -> function`` with the call's signature (the transformation at that chunk size).
      total: the number of passes unchunked (basis vectors, colours, HVPs).

    Raises:
      ValueError: even the result (with the arguments) is over the budget, or no chunk size fits.
    """
    tried: dict = {}  # chunk size -> bytes of its compiled program

    def size(c):
        if c not in tried:
            tried[c] = measure(make(c), args, kwargs)[0]
        return tried[c]

    full, out = measure(make(None), args, kwargs)
    tried[None] = full
    if full <= budget:
        return Fit(None, full, budget, tuple(tried.items()))
    if out >= budget:
        raise ValueError(f"{where}: the result alone takes {_human(out)}, over max_memory={_human(budget)}; "
                         "raise max_memory, or ask for less (a sparse result, J v products, a diagonal).")
    # bytes(c) = base + per c through two chunked programs, then the largest c within the budget.
    c1 = max(1, total // 16)
    c2 = max(c1 + 1, total // 4) if total > 1 else 1
    b1 = size(c1)
    b2 = size(c2) if c2 < total else b1
    per = max((b2 - b1) / (c2 - c1), 0.0) if c2 != c1 else 0.0
    c = int((budget - (b1 - per * c1)) / per) if per > 0 else total
    c = min(max(c, 1), total - 1 if total > 1 else 1)
    for _ in range(12):
        if size(c) <= budget:
            return Fit(c, tried[c], budget, tuple(tried.items()))
        if c == 1:
            break
        c = max(1, c // 2)
    raise ValueError(f"{where}: no chunk size fits in max_memory={_human(budget)}: one pass at a time needs "
                     f"{_human(min(tried.values()))} (the result {_human(out)}); raise max_memory.")


def bounded(make: Callable[[int | None], Callable], passes: Callable, max_memory, where: str) -> Callable | None:
    """A function that runs ``make(c)`` with the ``c`` that fits ``max_memory`` (``None`` without a budget).

    ``passes(*args, **kwargs) -> int`` is the number of passes unchunked (from the shapes).
    The returned function has ``.memory(*args, **kwargs) -> Fit``.
    """
    budget = parse(max_memory, where)
    if budget is None:
        return None
    built: dict = {}
    fits: dict = {}

    def key(args, kwargs):
        leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
        return treedef, tuple((getattr(v, "shape", None), str(getattr(v, "dtype", type(v)))) for v in leaves)

    def choice(args, kwargs) -> Fit:
        k = key(args, kwargs)
        hit = fits.get(k)
        if hit is None:
            hit = fits[k] = fit(get, passes(*args, **kwargs), budget, args, kwargs, where)
        return hit

    def get(c):
        if c not in built:
            built[c] = make(c)
        return built[c]

    def run(*args, **kwargs):
        return get(choice(args, kwargs).chunk_size)(*args, **kwargs)

    run.memory = lambda *args, **kwargs: choice(args, kwargs)
    run.make = get
    return run


def transform(make: Callable[[int | None], Callable], chunk_size, max_memory, where: str,
              passes: Callable | None = None) -> Callable:
    """``make(chunk_size)``, or under ``max_memory`` the function that picks the chunk size per call structure.

    Args:
      make: ``make(c) -> transformed function`` (this library's, with ``.transform`` and ``.plan``).
      passes: ``passes(*args, **kwargs) -> int``, the passes unchunked (default: the
        differentiated arguments' total size).

    The returned function's ``.memory(...)`` is the :class:`Fit` for a call, and its ``.plan(...)``
    (where the transformation has one) carries it as ``memory``.
    """
    if max_memory is None:
        return make(chunk_size)
    if chunk_size is not None:
        raise ValueError(f"{where}: give chunk_size or max_memory, not both (max_memory picks the chunk size).")
    run = bounded(make, passes or (lambda *a, **k: _inputs(first.transform, *a, **k)), max_memory, where)
    first = run.make(None)  # the unchunked function: the one measured first, whose name and attributes run takes

    def plan(*args, **kwargs):
        fit_ = run.memory(*args, **kwargs)
        p = run.make(fit_.chunk_size).plan(*args, **kwargs)
        return dataclasses.replace(p, memory=fit_) if any(f.name == "memory" for f in dataclasses.fields(p)) else p

    run = functools.wraps(first)(run)
    run.transform = first.transform
    if hasattr(first, "plan"):
        run.plan = plan
    return run


def _inputs(t, *args, **kwargs) -> int:
    """The differentiated arguments' total size (the basis vectors of a forward pass)."""
    spec, traced = t.split(args, kwargs)
    return max(1, sum(math.prod(np.shape(x)) for x, d in zip(traced, spec.diff_mask(), strict=True) if d))
