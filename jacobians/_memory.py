"""Memory budgets: ``max_memory=`` picks the chunk size that fits, from XLA's own memory analysis.

Every transformation with a ``chunk_size`` option trades memory for passes:
pushing ``c`` basis vectors at a time holds ``c`` tangents (or cotangents) of
every intermediate. Under ``max_memory=B`` the first call of each call
structure compiles the program that makes every pass at once without planning
(``chunk_size`` = the number of passes) and, if it fits in ``B``, the planned
unchunked one; otherwise two chunked ones, fits ``bytes(c) = a + b c`` through
them, and takes the largest ``c`` whose compiled program is within ``B``
(shrinking while it is not), less a reserve (:func:`reserve`: 1/16 of ``B``, at
most 256 MiB) for the runtime's and the compiler's host memory, which no
program analysis counts. The choice is cached per call structure and shapes;
the result alone over ``B`` is an error.

A program's bytes are XLA's memory analysis of it (arguments + outputs +
temporaries) plus its largest array (at most its temporaries): on the CPU
backend a run's measured peak exceeds the analysis by up to about one such
array (a pairwise-energy Hessian: +0.2-0.9 of its largest array, measured as
the peak RSS of the run). Planning the unchunked program is skipped when the
unplanned one is already over ``B``: the planner's own tracing at a size that
cannot fit costs time and host memory (a structured-sweep cost model at
n = 7449 held 1.2 GB).
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
    size = None
    if isinstance(max_memory, int | float | np.integer | np.floating) and np.ndim(max_memory) == 0:
        size = float(max_memory)
    elif isinstance(max_memory, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", max_memory)
        if m and m.group(2).upper() in _UNITS:
            size = float(m.group(1)) * _UNITS[m.group(2).upper()]
    # At least one whole byte, and finite (a budget of inf is no budget: pass None).
    if size is None or not np.isfinite(size) or size < 1:
        raise ValueError(f"{where}: max_memory must be a finite number of bytes (at least 1) or a string such as "
                         f"'2GB', '512MiB', '1e9', got {max_memory!r}; None for no budget.")
    return int(size)


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
      bytes: arguments + outputs + temporaries of the compiled program, by XLA's memory analysis,
        plus ``largest``.
      budget: the ``max_memory`` in bytes.
      tried: ``(chunk_size, bytes)`` of every program compiled to decide (a chunk size equal to
        the number of passes: every pass at once, unplanned; ``None``: the planned program).
      largest: the program's largest array (at most its temporaries): the margin for a run's
        peak over the analysis.
    """

    chunk_size: int | None
    bytes: int
    budget: int
    tried: tuple = ()
    largest: int = 0

    def __str__(self) -> str:
        how = "everything at once" if self.chunk_size is None else f"chunk_size={self.chunk_size}"
        return (f"memory: {how}, {_human(self.bytes)} by XLA's analysis (with its largest array, "
                f"{_human(self.largest)}; max_memory {_human(self.budget)})")


_ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
             "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b(" + "|".join(_ITEMSIZE) + r")\[([0-9,]*)\]")


def largest_array(hlo: str) -> int:
    """The bytes of the largest array type written in an HLO module's text (0 for scalars only)."""
    best = 0
    for dtype, dims in _ARRAY.findall(hlo):
        best = max(best, _ITEMSIZE[dtype] * math.prod(int(d) for d in dims.split(",") if d))
    return best


def analyse(fn: Callable, args: tuple, kwargs: dict) -> tuple[int, int, int]:
    """``(total, output, largest)`` bytes of the program a transformed ``fn`` compiles for this call.

    ``total`` is XLA's memory analysis (arguments + outputs + temporaries, less
    donated aliases) plus ``largest``, the program's largest array capped by its
    temporaries: a run on the CPU backend peaks above the analysis by up to
    about one such array. ``fn`` is a function this library returned (it has
    ``.transform``): the program is the one its call would compile, lowered for
    the call's traced leaves (statics stay compiled in); shapes suffice.
    """
    t = fn.transform
    jitted, traced, spec = t.compiled(args, kwargs)
    jitted = t.cache.get(spec, jitted)  # the jax.jit itself, not a first-call wrapper around it
    if not hasattr(jitted, "lower"):  # an engine that runs several programs: their sum, as one
        jitted = jax.jit(jitted)
    compiled = jitted.lower(*traced).compile()
    stats = compiled.memory_analysis()
    if stats is None:  # pragma: no cover - a backend without the analysis
        raise NotImplementedError("this backend gives no memory analysis of compiled programs")
    out, temp = stats.output_size_in_bytes, stats.temp_size_in_bytes
    largest = min(largest_array(compiled.as_text()), temp)
    total = stats.argument_size_in_bytes + out + temp - stats.alias_size_in_bytes + largest
    return int(total), int(out), int(largest)


def measure(fn: Callable, args: tuple, kwargs: dict) -> tuple[int, int]:
    """``(total, output)`` bytes of the program a transformed ``fn`` compiles for this call (see :func:`analyse`)."""
    return analyse(fn, args, kwargs)[:2]


RESERVE = 1 / 16  # of the budget, at most RESERVE_MAX: left to what XLA's analysis of the program does not count
RESERVE_MAX = 256 << 20


def reserve(budget: int) -> int:
    """The part of ``budget`` a program is not planned into: the runtime's and the compiler's host memory.

    The jax#787 Hessian under 4 GB, planned without it: a program of 3.95 GB by the analysis peaked at
    3.77 GB in its call, and the process at 4.07 GB (0.19 GB of interpreter and JAX before it, 0.11 GB kept
    from the planning's compiles); with it, 3.71 GB planned and 3.87 GB for the process
    (``bench/results/jax787-cpu-2core.md``).
    """
    return min(int(budget * RESERVE), RESERVE_MAX)


def fit(make: Callable[[int | None], Callable], total: int, budget: int, args: tuple, kwargs: dict,
        where: str) -> Fit:
    """The largest chunk size (``None``: all ``total`` passes at once, planned) whose program fits in ``budget`` bytes.

    Fits within ``budget`` less :func:`reserve`.

    Args:
      make: ``make(chunk_size) -> function`` with the call's signature (the transformation at that chunk size;
        ``chunk_size >= total``: every pass at once without planning).
      total: the number of passes unchunked (basis vectors, colours, HVPs).

    Raises:
      ValueError: even the result (with the arguments) is over the budget, or no chunk size fits.
    """
    tried: dict = {}  # chunk size -> (bytes, largest) of its compiled program

    def size(c):
        if c not in tried:
            tried[c] = analyse(make(c), args, kwargs)[::2]
        return tried[c][0]

    def done(c):
        return Fit(c, tried[c][0], budget, tuple((k, v[0]) for k, v in tried.items()), tried[c][1])

    total = max(int(total), 1)
    room = budget - reserve(budget)
    full, out, largest = analyse(make(total), args, kwargs)  # every pass at once, no planner: cheap to build
    tried[total] = (full, largest)
    if full <= room:
        # It fits: the planned program (a structured sweep, a colouring) if that fits too.
        return done(None) if size(None) <= room else done(total)
    if out >= budget:
        raise ValueError(f"{where}: the result alone takes {_human(out)}, over max_memory={_human(budget)}; "
                         "raise max_memory, or ask for less (a sparse result, J v products, a diagonal).")
    if total == 1:
        raise ValueError(_no_fit(where, budget, room, full, out))
    # bytes(c) = base + per c through two chunked programs, then the largest c within the budget.
    c1 = max(1, total // 16)
    c2 = max(c1 + 1, total // 4)
    b1 = size(c1)
    b2 = size(c2) if c2 < total else full
    per = max((b2 - b1) / (c2 - c1), 0.0)
    c = int((room - (b1 - per * c1)) / per) if per > 0 else total - 1
    c = min(max(c, 1), total - 1)
    for _ in range(12):
        if size(c) <= room:
            return done(c)
        if c == 1:
            break
        c = max(1, min(c - 1, int(c * room / size(c))))  # bytes roughly proportional to c: shrink by the excess
    raise ValueError(_no_fit(where, budget, room, min(v[0] for v in tried.values()), out))


def _no_fit(where: str, budget: int, room: int, least: int, out: int) -> str:
    return (f"{where}: no chunk size fits in max_memory={_human(budget)}: one pass at a time needs {_human(least)} "
            f"(the result {_human(out)}), over the {_human(room)} a program may take ({_human(budget - room)} of the "
            "budget is kept for what XLA's analysis does not count); raise max_memory.")


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

    def into(out, *args, **kwargs):  # the chosen function's donated-buffer call (see _args.returned)
        return get(choice(args, kwargs).chunk_size).into(out, *args, **kwargs)

    run.memory = lambda *args, **kwargs: choice(args, kwargs)
    run.make = get
    run.into = into
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

    into = run.into
    run = functools.wraps(first)(run)  # (copies first's attributes: those that must be run's are set again below)
    run.transform = first.transform
    if hasattr(first, "into"):
        run.into = into
    else:
        del run.into
    if hasattr(first, "plan"):
        run.plan = plan
    return run


def _inputs(t, *args, **kwargs) -> int:
    """The differentiated arguments' total size (the basis vectors of a forward pass)."""
    spec, traced = t.split(args, kwargs)
    return max(1, sum(math.prod(np.shape(x)) for x, d in zip(traced, spec.diff_mask(), strict=True) if d))
