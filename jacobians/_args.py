"""The one argument pipeline every transformation uses.

A transformation (``jacobian``, ``sparse_jacobian``, ``hessian``, the
determinants, ...) is a :class:`Transform`: it checks ``fun`` and ``argnums``
when it is built, and on each call splits ``fun(*args, **kwargs)`` into

- the *traced* leaves: the differentiated ones, every other array, and the
  Python numbers (``int``, ``float``, ``complex``), traced as weakly typed
  scalars as ``jax.jit`` traces them: a new value of ``t`` in ``f(x, t)``
  neither re-traces nor recompiles, and ``x * t`` keeps ``x``'s dtype;
- a hashable :class:`CallSpec`: the pytree structure, which positional
  arguments are differentiated, the Python type of each traced number, and the
  *static* leaves (strings, enums, ``None``, bools, any other hashable
  non-array), compiled in as constants and keyed exactly by type and value
  (``1``, ``1.0`` and ``True`` differ, so do ``0.0`` and ``-0.0``; NaN equals
  NaN).

Bools stay static (unlike ``jax.jit``): a bool argument is almost always a flag
that ``fun`` branches on in Python (``if training:``), and it has no derivative.
A number that ``fun`` needs as a Python value (``if t > 0``, ``range(n)``, a
shape, an axis) cannot be traced: the first call of each call structure tries
an abstract evaluation (``jax.eval_shape``) with the numbers traced, and where
it fails, or the traced call itself fails the first time, that structure's
numbers are compiled in as static values instead (as before; a changing value
then recompiles, and a transformation that keeps recompiling warns).

One compiled function is cached per ``CallSpec`` (a bounded LRU); it receives
the traced leaves, rebuilds the call and runs the engine. :class:`Problem`
then gives every engine the same flat view of the call: the differentiated
arguments raveled to one vector ``x`` of size ``n``, the outputs raveled to one
vector of size ``m``, and the way back to pytrees of numerator-layout blocks.
Options are checked in Python before anything is traced, so a typo fails at
once and says what was expected.
"""

import collections
import functools
import math
import re
import struct
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from . import _compat, _hoist, _leaves, _mesh, kernels
from ._walker import BARS_REVERSE, differentiated

# The options every transformation shares, written once (typing.Literal for readers and checkers).
Mode = Literal["fwd", "rev", "auto"]
MODES: tuple[str, ...] = get_args(Mode)
HessianMode = Literal["fwd_rev", "rev_rev", "rev_fwd", "fwd_fwd", "auto"]  # outer_inner: forward over reverse, ...
HESSIAN_MODES: tuple[str, ...] = get_args(HessianMode)
Order = Literal["C", "F"]
ORDERS: tuple[str, ...] = get_args(Order)
CACHE_MAX = 64  # compiled functions kept per transformation
RECOMPILE_WARN = 8  # distinct static values of one call structure before we warn

ARRAY_TYPES = (jax.Array, np.ndarray, np.generic)
_ARRAY_IMPL = _compat.ARRAY_IMPL  # the concrete jax.Array type, checked by identity (None: general path)
TRACED_TYPES = ARRAY_TYPES + (jax.ShapeDtypeStruct,)  # leaves passed to the compiled function
FAST_TYPES = (_ARRAY_IMPL, float, complex)  # argument types of the split-free call (ints: range-checked)
TRACER_ERRORS = (
    jax.errors.ConcretizationTypeError,
    jax.errors.TracerBoolConversionError,
    jax.errors.TracerIntegerConversionError,
    jax.errors.TracerArrayConversionError,
)
# Python numbers traced as weakly typed scalars (exact types: bool, IntEnum and other subclasses stay static).
NUMBER_TYPES = (int, float, complex)
_NUMPY_TYPE = {int: np.int64, float: np.float64, complex: np.complex128}


def number_dtype(kind: type) -> np.dtype:
    """The dtype JAX gives a Python ``int``/``float``/``complex`` (64 or 32 bits, by ``jax_enable_x64``)."""
    return jax.dtypes.canonicalize_dtype(_NUMPY_TYPE[kind])


def _number_array(value: Any) -> np.ndarray:
    """A Python number as a NumPy scalar array of the dtype JAX gives it."""
    kind = complex if isinstance(value, complex) else float if isinstance(value, float) else int
    return np.asarray(value, number_dtype(kind))


def _traceable_number(leaf: Any) -> bool:
    """A Python number JAX can trace: exact type ``int``/``float``/``complex``, an int within the int dtype."""
    kind = type(leaf)
    if kind is int:
        info = np.iinfo(number_dtype(int))
        return info.min <= leaf <= info.max
    return kind is float or kind is complex


# --- option checks ----------------------------------------------------------------------------


def check_choice(value: Any, name: str, choices: Sequence[str], where: str) -> str:
    """``value`` must be one of ``choices`` (strings)."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{where}: {name} must be one of {tuple(choices)}, got {value!r}.")
    return value


def check_mode(mode: Any, where: str, modes: Sequence[str] = MODES) -> str:
    return check_choice(mode, "mode", modes, where)


def check_order(order: Any, where: str) -> str:
    if order not in ORDERS:
        raise ValueError(
            f"{where}: order must be 'C' (row-major) or 'F' (column-stacking, the book's vec), got {order!r}."
        )
    return order


def check_chunk_size(chunk_size: Any, where: str) -> int | None:
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int | np.integer):
        raise TypeError(f"{where}: chunk_size must be a positive int or None, got {chunk_size!r}.")
    if chunk_size < 1:
        raise ValueError(f"{where}: chunk_size must be >= 1 (or None for no chunking), got {chunk_size}.")
    return int(chunk_size)


def check_bool(value: Any, name: str, where: str) -> bool:
    if not isinstance(value, bool | np.bool_):
        raise TypeError(f"{where}: {name} must be True or False, got {value!r}.")
    return bool(value)


def check_argnums(argnums: Any, where: str) -> tuple[int, ...]:
    """Normalise ``argnums`` to a non-empty tuple of distinct ints."""
    items = argnums if isinstance(argnums, Sequence) and not isinstance(argnums, str) else (argnums,)
    for a in items:
        if isinstance(a, bool) or not isinstance(a, int | np.integer):
            raise TypeError(f"{where}: argnums must be an int or a tuple of ints, got {argnums!r}.")
    items = tuple(int(a) for a in items)
    if not items:
        raise ValueError(f"{where}: argnums must name at least one argument, got {argnums!r}.")
    if len(set(items)) != len(items):
        raise ValueError(f"{where}: argnums must not repeat an argument, got {argnums!r}.")
    return items


def check_fun(fun: Any, where: str) -> Callable:
    if not callable(fun):
        raise TypeError(f"{where}: fun must be callable, got {type(fun).__name__}.")
    return fun


_ALLOW_INT = ("jacobians.jacobian", "jacobians.value_and_jacobian")  # the transformations taking allow_int


def _diff_leaf(leaf: Any, where: str, label: str):
    """Accept an array or a Python float/complex as a leaf to differentiate."""
    if isinstance(leaf, ARRAY_TYPES) or isinstance(leaf, jax.ShapeDtypeStruct):
        return leaf
    if isinstance(leaf, bool | int):
        raise TypeError(
            f"{where}: cannot differentiate with respect to {label}, a Python int ({leaf!r}); "
            "pass a float (e.g. 1.0) or a floating-point array"
            + (", or allow_int=True to hold it fixed." if where in _ALLOW_INT else ".")
        )
    if isinstance(leaf, float | complex):
        return _number_array(leaf)  # weakly typed again inside the trace (CallSpec.weak)
    raise TypeError(
        f"{where}: differentiated arguments must hold arrays, but {label} is a "
        f"{type(leaf).__name__} ({leaf!r}). Move non-array values to an argument that is not in argnums."
    )


# What a complex input can do with each transformation (the options it has); others take real inputs only.
_HOLOMORPHIC_HINT = " For a holomorphic function pass holomorphic=True."
_COMPLEX_HINTS = {
    **dict.fromkeys(("jacobians.jacobian", "jacobians.value_and_jacobian"),
                    _HOLOMORPHIC_HINT[:-1] + "; for a real-valued function of complex inputs use reverse "
                    "mode (mode='rev' or 'auto', jax.jacrev's convention)."),
    **dict.fromkeys(("jacobians.hessian", "jacobians.value_grad_and_hessian", "jacobians.trace_estimate"),
                    _HOLOMORPHIC_HINT),
}


def check_diff_dtypes(diff: tuple, positions: tuple[int, ...], where: str, holomorphic: bool, allow_complex=False):
    """Check the dtypes of the differentiated arguments (at trace time)."""
    for i, arg in zip(positions, diff, strict=True):
        for path, x in jax.tree_util.tree_flatten_with_path(arg)[0]:
            label = f"argument {i}{jax.tree_util.keystr(path)}"
            if holomorphic:
                if not jnp.issubdtype(x.dtype, jnp.complexfloating):
                    raise TypeError(
                        f"{where}: holomorphic=True requires complex inputs, but {label} has "
                        f"dtype {x.dtype}. Cast it to a complex dtype or drop holomorphic=True."
                    )
            elif not jnp.issubdtype(x.dtype, jnp.floating) and not (
                allow_complex and jnp.issubdtype(x.dtype, jnp.complexfloating)
            ):
                hint = (
                    _COMPLEX_HINTS.get(where, " Pass its real and imaginary parts as separate real arguments.")
                    if jnp.issubdtype(x.dtype, jnp.complexfloating)
                    else " Cast it with x.astype(jnp.float32) (or float64)" + (
                        ", or pass allow_int=True to hold it fixed (zero blocks, as jax.jacrev)."
                        if where in _ALLOW_INT else ".")
                )
                raise TypeError(
                    f"{where}: can only differentiate with respect to real floating-point "
                    f"inputs, but {label} has dtype {x.dtype}.{hint}"
                )


def static_key(value: Any) -> Any:
    """A hashable key equal only for values that behave the same when compiled in.

    ``1``, ``1.0`` and ``True`` differ (the type is part of the key); floats
    are keyed by their bits, so ``0.0`` and ``-0.0`` differ and NaN equals NaN.
    """
    if isinstance(value, float):
        return (float, struct.pack("<d", value) if value == value else b"nan")
    if isinstance(value, complex):
        return (complex, static_key(value.real), static_key(value.imag))
    return (type(value), value)


# --- the call split ---------------------------------------------------------------------------


@dataclass(frozen=True)
class CallSpec:
    """The static part of a call ``fun(*args, **kwargs)``: the key of the compilation cache."""

    treedef: Any
    n_args: int
    positions: tuple[int, ...]  # differentiated positional args, in argnums order
    arg_slices: tuple[tuple[int, int], ...]  # leaf range of each positional arg
    static_keys: tuple[tuple[int, Any], ...]  # (leaf index, static_key(value))
    static: tuple[tuple[int, Any], ...] = field(compare=False, hash=False)  # (leaf index, value)
    numbers: tuple[tuple[int, type], ...] = ()  # (leaf index, int/float/complex) of the traced Python numbers
    weak: tuple[int, ...] = ()  # other weakly typed traced leaves: differentiated Python floats, weak arrays

    def diff_mask(self) -> list[bool]:
        """For each traced leaf (in call order): is it a leaf of a differentiated argument?"""
        static = {i for i, _ in self.static}
        diff = {i for p in self.positions for i in range(*self.arg_slices[p])}
        return [i in diff for i in range(self.treedef.num_leaves) if i not in static]

    def rebuild(self, traced: Sequence) -> tuple[list, dict, tuple]:
        """``(args, kwargs, diff_args)`` from the traced leaves in call order."""
        it = iter(traced)
        static = dict(self.static)
        leaves = [static[i] if i in static else next(it) for i in range(self.treedef.num_leaves)]
        # Weakly typed inside every trace, also where an engine traced a plain aval (jax.ShapeDtypeStruct
        # drops weak_type): x * t keeps x's dtype, under strict promotion too.
        for i, _ in self.numbers:
            leaves[i] = _weakly_typed(leaves[i])
        for i in self.weak:
            leaves[i] = _weakly_typed(leaves[i])
        args, kwargs = self.treedef.unflatten(leaves)
        return list(args), kwargs, tuple(args[i] for i in self.positions)


def _weakly_typed(x: Any) -> Any:
    """A traced Python number as ``jax.jit`` sees it: weakly typed (``x * t`` keeps ``x``'s dtype)."""
    if type(x) in NUMBER_TYPES or is_weak(x):
        return x
    return cast(x, x.dtype, weak=True)


class _Splitter:
    """Split calls into traced leaves and a :class:`CallSpec`, caching the layout per structure."""

    def __init__(self, argnums: tuple[int, ...], where: str, fun: Callable | None = None):
        self.argnums = argnums
        self.where = where
        self.fun = fun  # for the trial trace that decides whether Python numbers can be traced
        self._layouts: dict = {}
        self._static_numbers: dict = {}  # (treedef, ((leaf index, type), ...)) -> compile the numbers in?

    def _layout(self, args: tuple, treedef) -> tuple:
        n = len(args)
        positions = []
        for a in self.argnums:
            if not -n <= a < n:
                shown = self.argnums if len(self.argnums) > 1 else self.argnums[0]
                raise ValueError(
                    f"{self.where}: argnums={shown} but the function was called with {n} positional argument(s)."
                )
            positions.append(a % n)
        if len(set(positions)) != len(positions):
            raise ValueError(f"{self.where}: argnums {self.argnums} name the same argument twice.")
        slices, start = [], 0
        for a in args:
            k = jax.tree_util.tree_structure(a).num_leaves
            slices.append((start, start + k))
            start += k
        diff_idx = {}
        for p in positions:
            lo, hi = slices[p]
            diff_idx.update({i: p for i in range(lo, hi)})
        layout = (tuple(positions), tuple(slices), diff_idx)
        self._layouts[treedef] = layout
        return layout

    def __call__(self, args: tuple, kwargs: dict, *, raw: bool = False) -> tuple[CallSpec, list]:
        """``(spec, traced)`` for the call ``fun(*args, **kwargs)``.

        Traced Python numbers come back as NumPy scalar arrays of JAX's dtype
        for them (engines read their ``shape`` and ``dtype``; concrete also
        under a trace, where ``jnp.asarray`` would give a tracer), or as
        themselves with ``raw=True`` (for the compiled function: ``jax.jit``
        takes a Python number faster than an array). Either way they are
        weakly typed inside the trace (:meth:`CallSpec.rebuild`).
        """
        leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
        layout = self._layouts.get(treedef)
        if layout is None:
            layout = self._layout(args, treedef)
        positions, slices, diff_idx = layout
        traced, static, numbers, number_pos, weak = [], [], [], [], []
        for i, leaf in enumerate(leaves):
            if i in diff_idx:
                if not isinstance(leaf, ARRAY_TYPES):
                    if isinstance(leaf, float | complex) or is_weak(leaf):
                        weak.append(i)
                    leaf = _diff_leaf(leaf, self.where, f"a leaf of argument {diff_idx[i]}")
                elif is_weak(leaf):
                    weak.append(i)
                traced.append(leaf)
            elif isinstance(leaf, TRACED_TYPES):
                if is_weak(leaf):
                    weak.append(i)
                traced.append(leaf)
            elif type(leaf) in NUMBER_TYPES and _traceable_number(leaf):
                numbers.append((i, type(leaf)))
                number_pos.append(len(traced))
                traced.append(leaf)
            else:
                try:
                    hash(leaf)
                except TypeError:
                    raise TypeError(
                        f"{self.where}: a non-differentiated argument holds a {type(leaf).__name__}, which is "
                        "neither an array nor hashable; pass arrays or hashable values."
                    ) from None
                static.append((i, leaf))
        if numbers:
            numbers = tuple(numbers)
            key = (treedef, numbers)
            as_static = self._static_numbers.get(key)
            if as_static is None:
                as_static = self._static_numbers[key] = self._needs_values(
                    leaves, treedef, positions, diff_idx, numbers
                )
            if as_static:  # compiled in, keyed by type and value, as any static leaf
                drop = set(number_pos)
                traced = [x for k, x in enumerate(traced) if k not in drop]
                static = sorted(static + [(i, leaves[i]) for i, _ in numbers])  # leaf indices are distinct
                numbers = ()
            elif not raw:
                for k in number_pos:
                    traced[k] = _number_array(traced[k])
        keys = tuple((i, static_key(v)) for i, v in static)
        spec = CallSpec(treedef, len(args), positions, slices, keys, tuple(static), tuple(numbers), tuple(weak))
        return spec, traced

    def _needs_values(self, leaves: list, treedef, positions: tuple, diff_idx: dict, numbers: tuple) -> bool:
        """Does ``fun`` need the values of these Python numbers (Python control flow, shapes, axes)?

        One abstract evaluation of a JVP of ``fun`` with the numbers traced, once
        per call structure (the JVP also runs ``custom_jvp`` rules, which may
        branch on a number): if Python needed a traced value, they are compiled
        in. Where the JVP cannot be taken (a ``custom_vjp``, non-array outputs)
        a plain evaluation decides. If ``fun`` fails anyway, the call reports the
        error as before, with the numbers static.
        """
        if self.fun is None:
            return False
        idx = {i for i, _ in numbers}
        dyn = [i for i, leaf in enumerate(leaves) if i in idx or i in diff_idx or isinstance(leaf, TRACED_TYPES)]

        def call(values, jvp):
            full = list(leaves)
            for i, v in zip(dyn, values, strict=True):
                full[i] = v
            args, kwargs = treedef.unflatten(full)
            if not jvp:
                self.fun(*args, **kwargs)
                return

            def at(*diff):
                a = list(args)
                for p, d in zip(positions, diff, strict=True):
                    a[p] = d
                return self.fun(*a, **kwargs)

            primals = tuple(args[p] for p in positions)
            jax.jvp(at, primals, primals)

        values = [leaves[i] for i in dyn]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the real trace warns, if need be
            try:
                jax.eval_shape(functools.partial(call, jvp=True), values)
                return False
            except TRACER_ERRORS:
                return True
            except Exception:  # noqa: BLE001 - no JVP here: a plain evaluation decides
                pass
            try:
                jax.eval_shape(functools.partial(call, jvp=False), values)
            except Exception:  # noqa: BLE001 - any failure: fall back to what always worked
                return True
        return False

    def make_static(self, spec: CallSpec) -> bool:
        """Compile this structure's numbers in from now on (the traced call failed); False if they already are."""
        key = (spec.treedef, spec.numbers)
        if not spec.numbers or self._static_numbers.get(key):
            return False
        self._static_numbers[key] = True
        return True


MISS = object()  # Transform.fast: no fast path for this call


class Transform:
    """A built transformation: the argument pipeline around an engine.

    ``build(spec)`` returns the function to run for one call structure (usually
    a ``jax.jit`` of the engine with ``spec`` bound); it receives the traced
    leaves in call order. Built functions are cached (LRU, ``CACHE_MAX``).
    """

    def __init__(
        self, fun: Callable, argnums: Any, where: str, build: Callable[[CallSpec], Callable], probe: bool = True
    ):
        # probe=False where the engine does not call fun(*args, **kwargs) as given (it maps fun over a batch
        # axis): the trial trace of the split would not test the call that runs.
        self.fun = check_fun(fun, where)
        self.argnums = check_argnums(argnums, where)
        self.int_argnums = not isinstance(argnums, tuple | list)
        self.where = where
        self.split = _Splitter(self.argnums, where, self.fun if probe else None)
        self.build = build
        self.cache: collections.OrderedDict[CallSpec, Callable] = collections.OrderedDict()
        self._variants: dict = collections.defaultdict(set)  # treedef -> static keys seen
        self._warned = False
        self._fast: dict[tuple, Callable] = {}  # by argument types: calls of jax arrays and floats, no split
        self._tree_fast: dict = {}  # by pytree structure: pytrees of strongly typed jax arrays, no split
        self._confirmed: set = set()  # specs whose traced Python numbers have compiled and run once
        # recover(spec, traced, error) -> True where the engine replaced the plan of a call whose program XLA
        # failed to compile (its own crash, e.g. a RET_CHECK): the call then runs once more, with that plan.
        self.recover: Callable | None = None
        self._donating: dict = {}  # spec -> (the built function taking a donated result first, its result's avals)
        self.shards = None  # a kernels.Shards under mesh=: inputs committed elsewhere are placed on its mesh

    @classmethod
    def jitted(cls, fun: Callable, argnums: Any, where: str, compute: Callable, opts: Any, **kwargs) -> "Transform":
        """The usual transformation: one ``jax.jit`` of ``compute(t, spec, opts, *traced)`` per call structure.

        jit's C++ fast path then dispatches repeat calls without hashing any Python state.
        """
        t = cls(fun, argnums, where, lambda spec: _hoist.Hoisted(functools.partial(compute, t, spec, opts)),
                **kwargs)
        t.shards = getattr(opts, "shards", None)
        return t

    def compiled(self, args: tuple, kwargs: dict) -> tuple[Callable, list, CallSpec]:
        """The built function for this call, its traced leaves and the call's spec.

        The function is called as ``fn(*extra, *traced)`` (``extra``: leading
        arguments of the engine's own, possibly none).
        """
        spec, traced = self.split(args, kwargs, raw=True)
        fn = self.cache.get(spec)
        if fn is None:
            fn = self._new(spec)
        fn = program(fn)
        if spec.numbers and spec not in self._confirmed:
            fn = functools.partial(self._first_with_numbers, fn, spec, len(traced), args, kwargs)
        return fn, traced, spec

    def forget(self, spec: CallSpec) -> None:
        """Drop the built function of ``spec`` (its plan changed: the next call builds and traces anew)."""
        self.cache.pop(spec, None)
        self._donating.pop(spec, None)
        self._fast.clear()
        self._tree_fast.clear()

    def _new(self, spec: CallSpec) -> Callable:
        variants = self._variants[spec.treedef]
        variants.add(spec.static_keys)
        if len(variants) > RECOMPILE_WARN and not self._warned:
            self._warned = True
            changing = sorted({i for keys in variants for i, k in keys if (i, k) not in spec.static_keys})
            paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(
                spec.treedef.unflatten(range(spec.treedef.num_leaves)))[0]]
            named = ", ".join(f"(args, kwargs){paths[i]}" for i in changing) or "a static argument"
            warnings.warn(
                f"{self.where}: recompiling for the {len(variants)}th value of {named}; non-array arguments "
                "other than Python numbers, and numbers that fun uses as Python values (`if t > 0`, a shape, "
                "range(n)), are compiled in as constants. Pass a value that changes between calls as a jnp array "
                "(and write the branch with jnp.where or jax.lax.cond).",
                stacklevel=4,
            )
        fn = self.build(spec)
        self.cache[spec] = fn
        if len(self.cache) > CACHE_MAX:
            self._donating.pop(self.cache.popitem(last=False)[0], None)
            self._fast.clear()  # they may hold the evicted function
            self._tree_fast.clear()
        return fn

    def fast(self, args: tuple):
        """The result of a positional call that needs no split, or :data:`MISS`.

        The common call (positional jax arrays and Python floats) skips the split: its spec depends
        only on the argument types (traced numbers once their structure has run: see
        ``_first_with_numbers``); so do pytrees of strongly typed jax arrays (parameters), whose
        spec depends only on the structure. New shapes of a known structure retrace in ``jax.jit``.
        One method, no tuple of results: a call's overhead over ``jax.jit``'s is what runs here.
        """
        fn = self._fast.get(tuple(map(type, args))) if self._fast else None
        if fn is not None:
            for a in args:  # a weakly typed array has the type of a strong one, but another spec
                if a.__class__ is _ARRAY_IMPL and a.weak_type:
                    fn = None
                    break
        if fn is None:
            if not self._tree_fast:
                return MISS
            args, treedef = jax.tree_util.tree_flatten(args)
            fn = self._tree_fast.get(treedef)
            if fn is None or not all(type(v) is _ARRAY_IMPL and not v.weak_type for v in args):
                return MISS
        try:
            return fn(*args)
        except TRACER_ERRORS as e:
            raise TracedControlFlowError(self.where, e) from e
        except ValueError as e:
            if self._elsewhere(e):
                return MISS  # the call below places the inputs on the mesh
            raise

    def _elsewhere(self, error: ValueError) -> bool:
        """JAX refused inputs committed to devices other than the mesh's (under ``mesh=``)."""
        return getattr(self.shards, "mesh", None) is not None and _INCOMPATIBLE_DEVICES in str(error)

    def __call__(self, *args, **kwargs):
        if not kwargs and (out := self.fast(args)) is not MISS:
            return out
        fn, traced, spec = self.compiled(args, kwargs)
        try:
            try:
                out = self.run(fn, traced)
            except ValueError as e:
                if not self._elsewhere(e):
                    raise
                # An input pinned to one device (or sharded over other devices) under mesh=: placed on the
                # mesh, replicated, as the call's own program then splits it; jax.jit alone refuses it.
                traced = _mesh.onto(traced, self.shards.mesh)
                out = self.run(fn, traced)
        except jax.errors.JaxRuntimeError as e:
            if self.recover is None or not _compiler_failure(e) or not self.recover(spec, traced, e):
                raise
            self.forget(spec)
            fn, traced, spec = self.compiled(args, kwargs)
            out = self.run(fn, traced)
        # The structure's program as it stands after this call (never this call's own first-call wrapper).
        fn = program(self.cache.get(spec))
        if fn is not None and not kwargs and not spec.static and (not spec.numbers or spec in self._confirmed):
            leaves, treedef = jax.tree_util.tree_flatten(args)
            if len(traced) == len(args) and all(
                a is b and type(a) in FAST_TYPES and not (type(a) is _ARRAY_IMPL and a.weak_type)
                for a, b in zip(args, traced, strict=True)
            ):
                # Strongly typed arrays only: the spec of a weakly typed one (jnp.asarray(0.5)) makes every
                # later array of the same type weak (a float64 input computed in float32).
                self._fast[tuple(map(type, args))] = fn
            elif not spec.numbers and len(traced) == len(leaves) and all(
                a is b and type(a) is _ARRAY_IMPL and not a.weak_type
                for a, b in zip(leaves, traced, strict=True)
            ):
                self._tree_fast[treedef] = fn
        return out

    def run(self, fn, traced):
        """``fn(*traced)``, a tracer error explained (:class:`TracedControlFlowError`)."""
        try:
            return fn(*traced)
        except TRACER_ERRORS as e:
            raise TracedControlFlowError(self.where, e) from e

    def into(self, out, args: tuple, kwargs: dict, first: Callable):
        """The call's result, computed into ``out``'s buffers: ``out`` (a previous result) is donated.

        XLA writes the result where ``out`` was (no second buffer of the result's size is
        alive at once); ``out`` is deleted. A structure that has not compiled and run once
        (its plan made and checked) runs as ``first(*args, **kwargs)`` instead (``out`` unread).
        """
        spec, traced = self.split(args, kwargs, raw=True)
        fn = self.cache.get(spec)
        if fn is None or (spec.numbers and spec not in self._confirmed):
            return first(*args, **kwargs)
        entry = self._donating.get(spec)
        if entry is None:
            if isinstance(fn, _hoist.Hoisted) and fn.call is not None:  # its closed-over arrays stay arguments
                donating = fn.donating()
            else:
                donating = jax.jit(lambda _, *tr: fn(*tr), donate_argnums=0, keep_unused=True)
            entry = self._donating[spec] = (donating, jax.eval_shape(program(fn), *traced))
        donating, want = entry
        got_leaves, got_tree = jax.tree_util.tree_flatten(out)
        want_leaves, want_tree = jax.tree_util.tree_flatten(want)
        if got_tree != want_tree or any(
            not isinstance(g, ARRAY_TYPES) or g.shape != w.shape or g.dtype != w.dtype
            for g, w in zip(got_leaves, want_leaves, strict=True)
        ):
            shown = jax.tree_util.tree_map(lambda a: f"{getattr(a, 'dtype', type(a).__name__)}{list(np.shape(a))}", out)
            expect = jax.tree_util.tree_map(lambda a: f"{a.dtype}{list(a.shape)}", want)
            raise ValueError(f"{self.where}: out must be a result of this call (arrays of the same structure, "
                             f"shapes and dtypes), expected {expect}, got {shown}.")
        shared = _shared_buffer(got_leaves, traced)
        if shared is not None:
            raise ValueError(f"{self.where}: .into(out, ...) writes into out's buffers, but out's leaf {shared} is "
                             "also an argument of the call: XLA cannot read an array it overwrites. Pass a previous "
                             "result as out, or call f(*args) for a fresh result.")
        try:
            return donating(out, *traced)
        except Exception as e:
            deleted = [(path, g) for path, g in jax.tree_util.tree_flatten_with_path(out)[0]
                       if isinstance(g, jax.Array) and g.is_deleted()]
            if not deleted:
                raise
            path, g = deleted[0]
            raise ValueError(
                f"{self.where}: .into(out, ...) writes into out's buffers, but out{jax.tree_util.keystr(path)} "
                f"({g.dtype}{list(g.shape)}) has been deleted (donated to an earlier .into call or "
                "jax.jit(donate_argnums=...), or .delete()d). Pass the result of the last call, "
                "out = f.into(out, *args), or call f(*args) for a fresh result."
            ) from e

    def _first_with_numbers(self, fn, spec, n_traced, args, kwargs, *call_args):
        """The first call of a structure with traced Python numbers: if it fails, compile them in and retry.

        The trial trace in the split catches a number used as a Python value in
        ``fun`` itself; this catches one that only differentiating ``fun`` needs
        (a ``custom_jvp`` rule that branches on a ``nondiff_argnums`` number) or
        that a batched engine's own call of ``fun`` needs.
        """
        try:
            out = fn(*call_args)
        except Exception:
            if not self.split.make_static(spec):
                raise
            # The same error again if the numbers were not the cause (the engine's leading arguments kept).
            fn, traced, _ = self.compiled(args, kwargs)
            return fn(*call_args[: len(call_args) - n_traced], *traced)
        if len(self._confirmed) >= 4 * CACHE_MAX:
            self._confirmed.clear()
        self._confirmed.add(spec)
        return out


def program(fn):
    """What to call for a built function: a traced :class:`_hoist.Hoisted` program's own ``call``."""
    call = getattr(fn, "call", None)
    return fn if call is None else call


def wrap(t: Transform) -> Callable:
    """The user-facing function of a transformation: ``fun``'s name and docstring, ``t``'s behaviour."""

    @functools.wraps(t.fun)
    def transformed(*args, **kwargs):
        return t(*args, **kwargs)

    return returned(transformed, t)


def returned(transformed: Callable, t: Transform) -> Callable:
    """``transformed`` (the function a transformation returns) with ``.transform`` and ``.into``."""

    def into(out, *args, **kwargs):
        """The result of ``(*args, **kwargs)`` written into ``out``'s buffers (donated: do not use ``out`` again).

        ``out`` is a previous result of the same call structure (same pytree, shapes and
        dtypes: a ``ValueError`` otherwise). The first call of a structure runs as usual.
        """
        return t.into(out, args, kwargs, transformed)

    transformed.transform = t
    transformed.into = into
    return transformed


def _compiler_failure(e: Exception) -> bool:
    """XLA's own failure to compile a program (an internal check), not an error of the values it ran on."""
    msg = str(e)
    return msg.startswith("INTERNAL") or "RET_CHECK" in msg or "Failed to translate module" in msg


class TracedControlFlowError(TypeError):
    """``fun`` used a traced value where Python needs a concrete one (``if``, ``int()``, NumPy)."""

    def __init__(self, where: str, cause: Exception):
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        super().__init__(
            f"{where}: compiles fun (as jax.jit does) and fun used the value of a traced array in Python control "
            "flow or a NumPy call (`if x > 0`, `int(x)`, `np.asarray(x)`, a BCOO.fromdense without nse), which "
            "cannot be compiled. Write the "
            "branch with jnp.where or jax.lax.cond (loops: jax.lax.fori_loop / while_loop), or pass the value "
            "as a Python number or other non-array argument, or bind it with functools.partial (fun may branch "
            f"on those: they are compiled in). JAX said: {first}"
        )


# --- directions JAX cannot differentiate in ----------------------------------------------------

def complex_rev_error(where: str, or_holomorphic: bool = False, dtype=None, note: str = "") -> TypeError:
    """The error of a forced ``mode="rev"`` on complex outputs: their VJPs pull the real part only (no Jacobian)."""
    return TypeError(f"{where}: mode='rev' needs real outputs{' (or holomorphic=True)' if or_holomorphic else ''}, "
                     f"but fun returns complex values{f' ({dtype})' if dtype is not None else ''}; use mode='fwd' "
                     f"or 'auto'{note}.")


def complex_to_complex_error(where: str, p) -> TypeError:
    """The error of a complex-to-complex ``fun`` without ``holomorphic=True`` (it has no complex Jacobian)."""
    return TypeError(f"{where}: fun has complex inputs ({p.x.dtype}) and complex outputs ({p.out_dtype}); pass "
                     "holomorphic=True for a holomorphic function (a non-holomorphic complex map has no complex "
                     "Jacobian).")


_NO_FWD = "custom_vjp"  # JAX: "can't apply forward-mode autodiff (jvp) to a custom_vjp function."
_NO_REV = "Reverse-mode differentiation does not work for lax.while_loop"
_NO_LINEARIZE = "Linearization failed to produce known values"  # a custom_vmap: no reverse mode either
_NO_TRANSPOSE_SOLVE = "transpose_solve required"  # a custom_linear_solve without transpose_solve
# NotImplementedError of a transposition: "VJP not implemented for select_and_gather (MaxPool) with window
# dilation", "Transpose rule (for reverse-mode differentiation) for 'p' not implemented".
_NO_TRANSPOSE = ("VJP not implemented", "Transpose rule")
# What JAX says where it cannot differentiate fun in some direction (its own limits, not an analysis' defect).
_JAX_REFUSALS = ("can't apply forward-mode autodiff", _NO_REV, _NO_LINEARIZE, _NO_TRANSPOSE_SOLVE,
                 *_NO_TRANSPOSE, "callbacks do not support JVP", "Differentiation rule for")


def jvp_said(where: str, run: Callable, *args):
    """``run(*args)``; JAX's "custom_lin" (a JVP of a JVP meeting a ``custom_vjp``) said as ``jax.jvp`` says it."""
    try:
        return run(*args)
    except NotImplementedError as e:
        if "custom_lin" not in str(e):
            raise
        raise TypeError(f"{where}: can't apply forward-mode autodiff (jvp) to a custom_vjp function.") from e


class JaxFailed(RuntimeError):
    """JAX's own derivative of ``fun`` (a check's reference products) raised: JAX's defect or refusal, not ours."""


def jax_itself(run: Callable, *args):
    """``run(*args)``, JAX's own derivative of ``fun``: what it raises is JAX's (a :class:`JaxFailed`).

    Errors of tracers (fun run where it cannot be) pass through as they are.
    """
    try:
        return run(*args)
    except (jax.errors.UnexpectedTracerError, *TRACER_ERRORS):
        raise
    except Exception as e:
        if jax_refused(e):
            raise
        text = str(e).strip()
        raise JaxFailed(f"JAX's own derivative of fun raised {type(e).__name__}: "
                        f"{text.splitlines()[0] if text else '(no message)'}") from e


def jax_refused(exc: BaseException) -> bool:
    """True when ``exc`` (or what caused it) is JAX refusing (or failing) to differentiate a primitive of fun."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, JaxFailed):
            return True
        msg = str(exc)
        if any(k in msg for k in _JAX_REFUSALS):
            return True
        # A rule JAX has only in part ("scatter_mul gradients are only implemented if `unique_indices=True`").
        if isinstance(exc, NotImplementedError) and any(k in msg.lower() for k in ("gradient", "differentiat",
                                                                                  "jvp", "transpose")):
            return True
        exc = exc.__cause__ or getattr(exc, "cause", None)
    return False


class DirectionError(ValueError, TypeError):
    """A direction JAX cannot differentiate ``fun`` in.

    A ``ValueError`` of the argument, and the ``TypeError`` JAX itself raises there
    (``jax.jacfwd`` of a ``custom_vjp``), so either ``except`` catches it.
    """


def forced_mode_error(where: str, mode: str, direction: str | None = None) -> DirectionError:
    """The caller's ``mode`` takes a direction (``"fwd"``/``"rev"``; default: ``mode``) JAX cannot differentiate in."""
    direction = direction or mode
    why = ("pulls VJPs, which JAX cannot pull through fun (a while_loop with a dynamic trip count, or a "
           "primitive it cannot transpose; the call is compiled, so a trip count from the input is dynamic, as "
           "in jax.jit(jax.jacrev(fun)))" if direction == "rev" else
           "pushes JVPs, which JAX cannot push through fun's custom_vjp")
    use = f"mode={'fwd' if mode == 'rev' else 'rev'!r} or 'auto'" if mode in ("fwd", "rev") else "mode='auto'"
    return DirectionError(f"{where}: mode={mode!r} {why}; use {use}.")


def in_mode(where: str, mode: str, run: Callable, *args):
    """``run(*args)`` in the caller's forced ``mode``: JAX refusing its direction said by :func:`forced_mode_error`."""
    try:
        return run(*args)
    except (TypeError, ValueError, NotImplementedError) as e:
        msg = str(e)
        if any(k in msg for k in (_NO_REV, _NO_LINEARIZE, _NO_TRANSPOSE_SOLVE, *_NO_TRANSPOSE)):
            raise forced_mode_error(where, mode, "rev") from e
        if (_NO_FWD in msg and "forward-mode" in msg) or "custom_lin" in msg:
            raise forced_mode_error(where, mode, "fwd") from e
        raise


def differentiable(p: "Problem", mode: str) -> bool:
    """Whether JAX can differentiate ``p``'s function in ``mode`` where it depends on the input.

    Asked only where :func:`jacobians._walker.differentiated` of the whole program bars ``mode``: a
    barring operation on values that do not depend on the input (a max-pool of the data in a
    Jacobian with respect to the weights) bars nothing. The linearized program holds exactly
    the operations JAX differentiates, and JAX's transpose of it refuses what it cannot pull through
    (two more traces, no compilation; the traced values are dropped).
    """
    fun = lambda x: p.flat(x)[0]  # noqa: E731
    try:
        if mode == "fwd":  # a JVP as jacfwd pushes it: an active custom_vjp stays a custom_lin, an error once lowered
            return "custom_lin" not in differentiated(jax.make_jaxpr(lambda x: jax.jvp(fun, (x,), (x,)))(p.x))
        _, lin = jax.linearize(fun, p.x)
        if BARS_REVERSE & differentiated(jax.make_jaxpr(lin)(p.x)):  # refused only when lowered
            return False
        y, pull = jax.vjp(fun, p.x)
        jax.make_jaxpr(pull)(y)  # the transpose, where JAX refuses a while_loop that carries the input
    except (TypeError, ValueError, NotImplementedError):
        return False
    return True


def with_fallback(run: Callable, preferred: str, no_fwd: str, no_rev: str, where: str, jaxpr=None):
    """``run(preferred)``, or the other direction where JAX cannot differentiate in this one.

    Where JAX cannot push JVPs (a ``custom_vjp``) run ``no_fwd``, where it cannot
    pull VJPs (a ``while_loop`` with a dynamic trip count, a primitive it cannot transpose)
    run ``no_rev``. Both failing is explained. With the function's ``jaxpr`` the direction is
    read from it first: some JAX releases report a JVP of a ``custom_vjp`` only when the
    program is lowered, after the trace.
    """
    if jaxpr is not None:
        names = differentiated(jaxpr)
        if {"custom_vjp_call", "custom_vjp_call_jaxpr"} & names:
            preferred = no_fwd
        elif BARS_REVERSE & names:
            preferred = no_rev
    try:
        return run(preferred)
    except (TypeError, ValueError, NotImplementedError) as e:
        msg = str(e)
        if isinstance(e, NotImplementedError) and not any(k in msg for k in _NO_TRANSPOSE):
            raise
        if any(k in msg for k in (_NO_REV, _NO_LINEARIZE, _NO_TRANSPOSE_SOLVE)) or isinstance(e, NotImplementedError):
            alt = no_rev
        elif _NO_FWD in msg and "forward-mode" in msg:
            alt = no_fwd
        elif no_rev != preferred:
            # An error JAX gives no name to (a transpose rule that fails on some parameters: a max-pool with
            # a negative padding, JAX 0.10): forward mode decides; where it fails too, the first error stands.
            try:
                return run(no_rev)
            except (TypeError, ValueError, NotImplementedError):
                pass
            raise
        else:
            raise
        if alt == preferred:
            raise
        first = e
    try:
        return run(alt)
    except (TypeError, ValueError, NotImplementedError) as e:
        raise TypeError(
            f"{where}: no mode can differentiate fun: it contains a custom_vjp (no forward mode) and a "
            "while_loop with a dynamic trip count or a primitive JAX cannot transpose (no reverse mode). "
            f"JAX said: {str(first).splitlines()[0]}"
        ) from e


# --- the flat view of a call ------------------------------------------------------------------


def shapes_key(values: Sequence) -> tuple:
    """``(shape, dtype)`` of each value, for the plan caches (typed PRNG keys' extended dtypes included)."""
    return tuple((tuple(np.shape(a)), a.dtype if jax.dtypes.issubdtype(a.dtype, jax.dtypes.extended)
                  else np.dtype(a.dtype)) for a in values)


def promote(*dtypes):
    """The dtype of a block holding d(out)/d(in), under JAX's standard rules even under strict promotion."""
    with jax.numpy_dtype_promotion("standard"):
        return jnp.result_type(*dtypes)


def is_weak(x) -> bool:
    return bool(getattr(getattr(x, "aval", x), "weak_type", False))


def _promotable(s, weak: bool = True) -> Any:
    """What a leaf contributes to a promotion: its dtype, or its Python type if weakly typed (and ``weak``).

    So a weakly typed value takes the dtype of what it meets, as in JAX: a
    Python ``1.0`` returned next to float32 ``x`` gives a float32 zero block.
    A weakly typed int (a Python ``int`` output) counts as a float: its
    derivative is floating-point (zero).
    """
    if not is_weak(s):
        return s.dtype
    if jnp.issubdtype(s.dtype, jnp.integer):
        return float
    if not weak:
        return s.dtype
    return complex if jnp.issubdtype(s.dtype, jnp.complexfloating) else float


def block_dtype(out, x) -> np.dtype:
    """The dtype of the block d(out)/d(x) for an output leaf and an input leaf (arrays or shape structs).

    ``promote(out.dtype, x.dtype)``, with weakly typed leaves by their kind: a
    Python ``1.0`` among the outputs next to a float32 ``x`` gives a float32
    (zero) block, a float32 output of a Python float ``t`` a float32 block.
    """
    return promote(_promotable(out), _promotable(x))


def _output_struct(s) -> jax.ShapeDtypeStruct:
    """An output leaf's shape and dtype; a Python number as JAX sees it (weakly typed)."""
    if type(s) in NUMBER_TYPES:
        return jax.ShapeDtypeStruct((), number_dtype(type(s)), weak_type=True)
    if getattr(s, "dtype", None) is None:
        return s  # not an array: check_float_outputs says so
    return jax.ShapeDtypeStruct(np.shape(s), s.dtype, weak_type=is_weak(s))


_INCOMPATIBLE_DEVICES = "Received incompatible devices for jitted computation"


def cast(x: jax.Array, dtype, weak: bool = False) -> jax.Array:
    """``x`` in ``dtype``; weakly typed (as JAX's own derivatives of Python scalars are) when ``weak``."""
    if x.dtype == dtype and is_weak(x) == weak:
        return x
    if weak:
        return _compat.convert_weak(x, dtype)
    return x.astype(dtype)


@dataclass
class Problem:
    """One call, seen flat: ``flat(x) -> (y, aux)`` with ``x`` of shape ``(n,)`` and ``y`` of shape ``(m,)``.

    Built inside the engine's trace by :func:`problem`.
    """

    flat: Callable
    x: jax.Array
    out_leaves: list  # ShapeDtypeStructs of the output leaves
    out_treedef: Any
    in_leaves: list  # the differentiated leaves
    in_treedef: Any  # of the differentiated argument (int argnums) or the tuple of them
    out_dtype: Any
    call: Callable | None = None  # diff_args -> fun's result (aux included): the pytree view
    diff: tuple = ()  # the differentiated arguments, pytrees
    has_aux: bool = False
    where: str = ""
    flat_out: Callable | None = None  # diff_args -> (y, aux): flat outputs of the pytree inputs (no ravel of x)
    jaxpr: Any = None  # of call (diff_args -> result), from the trace that found the output shapes (not lazy)

    def tree_dense(self, mode: str) -> tuple[Any, Any] | None:
        """``(blocks, aux)`` by ``jax.jacfwd``/``jax.jacrev``'s own program on the pytrees, or ``None``.

        The flat view costs two copies of the Jacobian for pytree inputs or outputs (the
        concatenation of per-leaf cotangents or tangents, then the cut into blocks); pushing
        basis pytrees through the pytree function costs neither. Used where the flat view
        adds nothing: one real dtype for inputs and outputs alike, no weak types (``None`` otherwise).
        """
        outs = self.out_leaves
        if self.call is None or not outs or any(is_weak(s) for s in outs) or any(is_weak(v) for v in self.in_leaves):
            return None
        dt_in, dt_out = {np.dtype(v.dtype) for v in self.in_leaves}, {np.dtype(s.dtype) for s in outs}
        if dt_in != dt_out or dt_out != {np.dtype(self.out_dtype)}:
            return None  # (mixed precisions: jacfwd's blocks take the output's dtype, jacrev's the input's)
        if not all(jnp.issubdtype(d, jnp.floating) for d in dt_in | dt_out):
            return None

        def fn(d):
            res = self.call(d)
            return split_aux(res, self.where) if self.has_aux else (res, None)

        in_flat = jax.tree_util.tree_leaves(self.diff)
        out_def, out_lay, in_lay = self.out_treedef, _leaves.Leaves.of(outs), _leaves.Leaves.of(in_flat)
        if mode == "rev":
            _, pullback, aux = jax.vjp(fn, self.diff, has_aux=True)
            (cts,) = jax.vmap(pullback)(out_def.unflatten(out_lay.basis(self.out_dtype)))
            per_in = jax.tree_util.tree_leaves(cts)  # (m,) + in.shape, one per input leaf
            cut = [out_lay.split(c, axis=0) for c in per_in]  # per input leaf: out.shape + in.shape per output leaf
            rows = [self.in_treedef.unflatten([c[k] for c in cut]) for k in range(len(outs))]
            return out_def.unflatten(rows), aux
        tangent_tree = jax.tree_util.tree_structure(self.diff).unflatten(in_lay.basis(in_flat[0].dtype))

        def push(t):
            return jax.jvp(fn, (self.diff,), (t,), has_aux=True)

        _, jac, aux = kernels.primal_once(lambda axes: jax.vmap(push, out_axes=axes)(tangent_tree), -1)
        rows = [self.in_treedef.unflatten(in_lay.split(y, axis=-1)) for y in jax.tree_util.tree_leaves(jac)]
        return out_def.unflatten(rows), aux

    def sweep_input(self) -> tuple[Callable, Any]:
        """``(fn, x)`` for :func:`jacobians._sweeps.jacobian`: the leaves, or the flat view.

        The leaves themselves where they share ``x``'s dtype and none is weakly typed (no ravel
        into ``x`` and no cut back), else ``(flat, x)``.
        """
        leaves = jax.tree_util.tree_leaves(self.diff)
        if (self.flat_out is None or not leaves or any(is_weak(v) for v in leaves)
                or {np.dtype(v.dtype) for v in leaves} != {np.dtype(self.x.dtype)}):
            return self.flat, self.x
        treedef = jax.tree_util.tree_structure(self.diff)
        return (lambda *ls: self.flat_out(treedef.unflatten(ls))), leaves

    def detached(self) -> "Problem":
        """The shapes, dtypes and trees only: no function of the trace it was built in, no tracer of it."""
        return Problem(None, _output_struct(self.x), self.out_leaves, self.out_treedef,
                       [_output_struct(v) for v in self.in_leaves], self.in_treedef, self.out_dtype,
                       has_aux=self.has_aux, where=self.where)

    def empty_result(self) -> tuple[Any, Any]:
        """For an output pytree without leaves (``()``): that pytree, and the call's aux (``None`` without)."""
        aux = split_aux(self.call(self.diff), self.where)[1] if self.has_aux else None
        return self.out_treedef.unflatten([]), aux

    def in_tree(self, flat: jax.Array) -> Any:
        """A flat ``(n,)`` vector (a gradient, a Hessian diagonal) as the differentiated arguments' pytree.

        Leaf ``x`` in ``promote(out_dtype, x.dtype)``.
        """
        parts = _leaves.Leaves.of(self.in_leaves).split(flat, axis=0)
        return self.in_treedef.unflatten([a.astype(promote(self.out_dtype, x.dtype))
                                          for a, x in zip(parts, self.in_leaves, strict=True)])

    def out_tree(self, flat: jax.Array) -> Any:
        """A flat ``(m,)`` vector as the outputs' pytree, each leaf in its own dtype."""
        parts = _leaves.Leaves.of(self.out_leaves).split(flat, axis=0)
        return self.out_treedef.unflatten([a.astype(o.dtype) for a, o in zip(parts, self.out_leaves, strict=True)])

    def hessian_blocks(self, H: jax.Array) -> Any:
        """The flat ``(n, n)`` Hessian cut into ``x_i.shape + x_j.shape`` blocks (as ``jax.hessian``)."""
        lay = _leaves.Leaves.of(self.in_leaves)
        rows = [
            self.in_treedef.unflatten([b.astype(promote(self.out_dtype, xi.dtype, xj.dtype))
                                       for b, xj in zip(row, self.in_leaves, strict=True)])
            for row, xi in zip(_leaves.blocks(H, lay, lay), self.in_leaves, strict=True)
        ]
        return self.in_treedef.unflatten(rows)

    @property
    def n(self) -> int:
        return self.x.size

    @property
    def m(self) -> int:
        return sum(math.prod(s.shape) for s in self.out_leaves)

    def blocks(self, jac: jax.Array, dtype_of=None) -> Any:
        """Cut the flat ``(m, n)`` Jacobian into the pytree of ``out.shape + in.shape`` blocks."""
        dtype_of = dtype_of or block_dtype
        cut = _leaves.blocks(jac, _leaves.Leaves.of(self.out_leaves), _leaves.Leaves.of(self.in_leaves))
        rows = [
            self.in_treedef.unflatten([cast(b, dtype_of(out, x), weak=is_weak(out) and is_weak(x))
                                       for b, x in zip(row, self.in_leaves, strict=True)])
            for row, out in zip(cut, self.out_leaves, strict=True)
        ]
        return self.out_treedef.unflatten(rows)


def problem(
    fun: Callable,
    spec: CallSpec,
    traced: Sequence,
    *,
    where: str,
    has_aux: bool = False,
    holomorphic: bool = False,
    int_argnums: bool = True,
    allow_complex: bool = False,
    lazy: bool = False,
) -> Problem:
    """The flat view of ``fun(*args, **kwargs)`` for an engine (call inside its trace).

    With ``lazy=True`` the output structure is not found by a separate
    ``jax.eval_shape``: it is recorded when the engine first traces ``flat``
    (one trace of ``fun`` in all, for engines whose plan does not need ``m``).
    """
    args, kwargs, diff = spec.rebuild(traced)
    check_diff_dtypes(diff, spec.positions, where, holomorphic, allow_complex)

    def call(diff_args):
        a = list(args)
        for p, d in zip(spec.positions, diff_args, strict=True):
            a[p] = d
        return fun(*a, **kwargs)

    in_tree = diff[0] if int_argnums else diff
    in_leaves, in_treedef = jax.tree_util.tree_flatten(in_tree)
    weak = [is_weak(leaf) for leaf in jax.tree_util.tree_leaves(diff)]
    # One dtype for x by the leaves' dtypes (float32 and float64 -> float64, a Python float's weak type
    # ignored: it is not rounded to float32), also under strict promotion.
    strong = jax.tree_util.tree_map(lambda leaf: cast(leaf, leaf.dtype), diff) if any(weak) else diff
    with jax.numpy_dtype_promotion("standard"):
        x, unravel = ravel_pytree(strong)
    if any(weak):  # weakly typed leaves come back weakly typed (x * t keeps x's dtype)
        unravel = _weak_unravel(unravel, weak)
    prob = Problem(None, x, [], None, in_leaves, in_treedef, None, call, diff, has_aux, where)

    def record(shapes):
        shapes = jax.tree_util.tree_map(_output_struct if lazy else lambda s: s, shapes)
        check_float_outputs(shapes, where, holomorphic, empty=True)
        leaves, prob.out_treedef = jax.tree_util.tree_flatten(shapes)
        prob.out_leaves = [_output_struct(s) for s in leaves]
        # With no weakly typed input, a weakly typed output is a constant (a Python number): it takes the
        # dtype of the others (or of x). Otherwise its dtype counts: its derivative may be nonzero.
        constant = not any(is_weak(leaf) for leaf in in_leaves)
        extra = [x.dtype] if (constant and all(is_weak(s) for s in leaves)) or not leaves else []
        prob.out_dtype = promote(*(_promotable(s, constant) for s in leaves), *extra)

    if not lazy:
        prob.jaxpr, shapes = traced_output(call, diff, where, has_aux)
        record(shapes)

    def flat_out(diff_args):
        res = call(diff_args)
        out, aux = split_aux(res, where) if has_aux else (res, None)
        if has_aux:
            _check_aux(aux, where)
        if prob.out_treedef is None:
            record(out)
        ys = [jnp.ravel(y).astype(prob.out_dtype) for y in jax.tree_util.tree_leaves(out)]
        if not ys:  # an empty pytree: m = 0
            return jnp.zeros((0,), prob.out_dtype), aux
        return (ys[0] if len(ys) == 1 else jnp.concatenate(ys)), aux

    prob.flat = lambda x_flat: flat_out(unravel(x_flat))
    prob.flat_out = flat_out
    return prob


def trace_flat(t: "Transform", spec: CallSpec, avals: list, *, has_aux=False, holomorphic=False):
    """``jax.make_jaxpr`` of the call's flat map ``x (n,) -> y (m,)`` with the traced leaves as inputs.

    Returns ``(closed, seeds_positions, meta)``: the closed jaxpr, for each of
    its inputs the offset of that leaf in ``x`` (``None`` for non-differentiated
    leaves), and the :class:`Problem` metadata.
    """
    meta = {}

    def g(*traced):
        p = problem(t.fun, spec, traced, where=t.where, has_aux=has_aux, holomorphic=holomorphic,
                    int_argnums=t.int_argnums, lazy=True)
        # The leaves are the jaxpr's inputs (each seeded at its offset): no ravel of x and split back,
        # which costs the analyses two movements of all n entries.
        y = p.flat_out(p.diff)[0]
        meta["problem"] = p.detached()  # no tracer of this trace may outlive it (jax.checking_leaks)
        return y

    try:
        closed = jax.make_jaxpr(g)(*avals)
    except TRACER_ERRORS as e:
        raise TracedControlFlowError(t.where, e) from e
    static = {i for i, _ in spec.static}
    traced_index = [i for i in range(spec.treedef.num_leaves) if i not in static]
    where_in = {full: k for k, full in enumerate(traced_index)}
    offsets: list = [None] * len(avals)
    off = 0
    for pos in spec.positions:
        lo, hi = spec.arg_slices[pos]
        for full in range(lo, hi):
            k = where_in[full]
            offsets[k] = off
            off += math.prod(np.shape(avals[k]))
    return closed, offsets, meta["problem"]


def _weak_unravel(unravel: Callable, weak: list[bool]) -> Callable:
    """``unravel`` that gives weakly typed leaves back weakly typed (a differentiated Python float stays weak)."""

    def unravel_weak(flat):
        leaves, treedef = jax.tree_util.tree_flatten(unravel(flat))
        return treedef.unflatten([cast(v, v.dtype, weak=True) if w else v for v, w in zip(leaves, weak, strict=True)])

    return unravel_weak


def split_aux(res: Any, where: str) -> tuple:
    if not (isinstance(res, tuple | list) and len(res) == 2):
        raise TypeError(
            f"{where}: has_aux=True requires fun to return a pair (output, aux), got {_describe_result(res)}."
        )
    return res[0], res[1]


def _describe_result(res: Any) -> str:
    """What fun returned, for a message: ``a tuple of 3 elements``, ``one array float32[3, 2]``, ..."""
    if isinstance(res, tuple | list):
        return f"a {type(res).__name__} of {len(res)} element{'' if len(res) == 1 else 's'}"
    if getattr(res, "dtype", None) is not None and getattr(res, "shape", None) is not None:
        return f"one array {res.dtype}{list(res.shape)} (no aux)"
    return f"a {type(res).__name__} ({jax.tree_util.tree_structure(res)})"


def _check_aux(aux: Any, where: str) -> None:
    """Aux leaves are values a compiled program can return: arrays, tracers, numbers."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(aux)[0]:
        if not (_compat.is_tracer(leaf) or isinstance(leaf, (*ARRAY_TYPES, int, float, complex))):
            raise TypeError(
                f"{where}: fun must return arrays (a pytree of arrays), its aux too (has_aux=True: the result is "
                f"compiled); got {type(leaf)} at output component [1]{jax.tree_util.keystr(path)}."
            )


def output_shapes(call: Callable, diff: tuple, where: str, has_aux: bool) -> Any:
    """``jax.eval_shape`` of the call (no evaluation), the aux part removed."""
    return traced_output(call, diff, where, has_aux)[1]


def traced_output(call: Callable, diff: tuple, where: str, has_aux: bool) -> tuple[Any, Any]:
    """``(closed jaxpr, output shapes)`` of the call (one trace, no evaluation), the aux part removed."""
    try:
        closed, shapes = jax.make_jaxpr(call, return_shape=True)(diff)
    except TRACER_ERRORS as e:
        raise TracedControlFlowError(where, e) from e
    except TypeError as e:
        if "is not a valid JAX type" not in str(e):
            raise
        # JAX's message names its own trace's location; keep what it found and where in the result.
        found = re.search(r"a value of type (.+?) at (output component [^\s,]+|the output)", str(e))
        got = f"; got {found.group(1)} at {found.group(2)}" if found else ""
        what = ("fun must return arrays (a pytree of arrays), its aux too (has_aux=True: the result is compiled)"
                if has_aux else "fun must return arrays (a pytree of arrays)")
        raise TypeError(f"{where}: {what}{got}.") from e
    # The shapes as the jaxpr has them: weak types included (JAX < 0.10 dropped them from return_shape).
    leaves, treedef = jax.tree_util.tree_flatten(shapes)
    avals = [v.aval for v in _compat.unclose(closed)[0].outvars]
    if len(avals) == len(leaves):
        shapes = treedef.unflatten([_output_struct(a) for a in avals])
    return closed, (split_aux(shapes, where)[0] if has_aux else shapes)


def _shared_buffer(outs: list, traced) -> int | None:
    """The index of the first leaf of ``outs`` that is also one of ``traced`` (the same buffer), else ``None``."""

    def pointer(a):
        try:
            return a.unsafe_buffer_pointer()
        except Exception:  # noqa: BLE001 - sharded, deleted or not on a device: compared by identity only
            return None

    ids = {id(a) for a in traced}
    ptrs = {pointer(a) for a in traced if isinstance(a, jax.Array)} - {None}
    for k, g in enumerate(outs):
        if id(g) in ids or (isinstance(g, jax.Array) and pointer(g) in ptrs):
            return k
    return None


def as_array(value, name: str, where: str) -> jax.Array:
    """``jnp.asarray(value)``; an object that is no array (``None``, a dict, a string) named in a ``TypeError``."""
    try:
        return jnp.asarray(value)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{where}: {name} must be an array, got {type(value).__name__}.") from e


def check_float_outputs(shapes: Any, where: str, holomorphic: bool = False, empty: bool = False) -> None:
    """Every output leaf must be a floating-point (or, holomorphic, complex) array.

    A Python number among the outputs (a weakly typed leaf) is a constant with a
    zero Jacobian, as in ``jax.jacfwd``; a Python ``int`` too. ``empty``: a pytree
    without leaves (``()``) is allowed (its Jacobian is that empty pytree, as ``jax.jacfwd``'s).
    """
    leaves_with_path = jax.tree_util.tree_flatten_with_path(shapes)[0]
    if not leaves_with_path and not empty:
        raise ValueError(f"{where}: fun returned no arrays to differentiate.")
    for path, leaf in leaves_with_path:
        label = f"output{jax.tree_util.keystr(path)}"
        dtype = getattr(leaf, "dtype", None)
        if dtype is None:
            raise TypeError(f"{where}: fun must return arrays, but {label} is a {type(leaf).__name__}.")
        if holomorphic and not jnp.issubdtype(dtype, jnp.complexfloating):
            raise TypeError(f"{where}: holomorphic=True requires complex outputs, but {label} has dtype {dtype}.")
        if not jnp.issubdtype(dtype, jnp.inexact) and not (is_weak(leaf) and jnp.issubdtype(dtype, jnp.integer)):
            raise TypeError(
                f"{where}: fun must return floating-point arrays, but {label} has dtype "
                f"{dtype}; {'boolean' if dtype == np.bool_ else 'integer'} outputs have no derivative. Leave it out "
                "of the output (or, where the call takes has_aux=True, return it as aux) if it is not to be "
                "differentiated."
            )
