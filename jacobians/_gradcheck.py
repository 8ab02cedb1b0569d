"""Finite-difference gradient checking (the remark after (5.53)).

The error is the book's relative metric over all entries of the Jacobian,

    error = sqrt( sum |dh_i - df_i|^2 / sum |dh_i + df_i|^2 ),

with ``dh`` the finite-difference and ``df`` the analytic Jacobian, both in
numerator layout ``out.shape + x.shape``. A step ``h`` the caller gives is
taken as given (the book's procedure: ``h = 1e-4`` moves every entry by
``1e-4``); the default step is relative, ``h * max(1, |x_j|)``, so that it does
not vanish next to a large ``|x_j|``. The difference quotient divides by the
step actually taken, ``(x_j + h_j) - x_j`` in ``x``'s dtype.
"""

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from . import _compat
from ._jacobian import jacobian

METHODS = ("central", "forward", "complex")
STATUSES = ("passed", "failed", "inconclusive")

# Default (step, tolerance) per dtype and method. Central differences are
# accurate to about eps^(2/3) at best (truncation O(h^2) against rounding
# O(eps/h), balanced at h = eps^(1/3)), forward differences to eps^(1/2); the
# complex step has no cancellation and is exact to rounding. float64 uses the
# book's 1e-6; float32 leaves ~40x above each floor. The 16-bit types are
# coarse (bfloat16 keeps 8 bits): their checks catch gross errors (a wrong
# factor of 1.5, a transposed Jacobian) but not errors of a few percent, and
# half the balancing step measured best there (functions of |x| ~ 3 curve
# within eps^(1/3) |x|). Complex x uses the defaults of its real part.
_EPS64, _EPS32 = float(np.finfo(np.float64).eps), float(np.finfo(np.float32).eps)
_DEFAULTS = {
    np.dtype("float64"): {
        "central": (_EPS64 ** (1 / 3), 1e-6),
        "forward": (_EPS64**0.5, 1e-6),
        "complex": (1e-20, 1e-6),
    },
    np.dtype("float32"): {
        "central": (_EPS32 ** (1 / 3), 1e-3),
        "forward": (_EPS32**0.5, 1e-2),
        "complex": (1e-10, 1e-5),
    },
    np.dtype("float16"): {"central": (0.05, 5e-2), "forward": (2.0**-5, 1e-1)},  # eps = 2^-10
    np.dtype(jnp.bfloat16): {"central": (0.1, 1e-1), "forward": (2.0**-3.5, 2e-1)},  # eps = 2^-7
}

# Errors JAX raises when traced code needs a concrete value.
TRACER_ERRORS = (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError)


def _real_dtype(dtype) -> np.dtype:
    return np.dtype(jnp.finfo(dtype).dtype)


def _number(v: float) -> str:
    """``3.1e-08``, ``1e-03``, ``0``: two significant digits, without a trailing ``.0``."""
    if v == 0:
        return "0"
    s = f"{v:.1e}"
    return s.replace(".0e", "e")


def _describe(method: str, h: float, scaled: bool) -> str:
    if method == "complex":
        return f"complex step, h={_number(h)}"
    return f"{method} differences, step {_number(h)}" + (" * max(1, |x_j|)" if scaled else "")


@dataclass(frozen=True)
class GradcheckResult:
    """The outcome of :func:`gradcheck`; truthy only when the check passed.

    Attributes:
      error: the book's relative error (``inf`` when no comparison was made).
      passed: ``status == "passed"``: ``error < tol`` (or ``within_rounding``), both Jacobians finite
        and of the same shape.
      tol: the tolerance used.
      h: the step: entry ``j`` of ``x`` moves by ``h`` where the caller
        gave ``h``, by ``h * max(1, |x_j|)`` for the default step (``scaled``);
        the complex step by ``h``.
      method: ``"central"``, ``"forward"`` or ``"complex"``.
      worst_index: index (in ``out.shape + x.shape``) of the largest
        ``|numeric - analytic|``, or ``None``.
      worst_analytic, worst_numeric: the two values at that index.
      problem: what went wrong before values could be compared, or ``""``.
      status: ``"passed"``, ``"failed"`` (the Jacobian disagrees with the
        finite differences, is not finite, or has the wrong shape) or
        ``"inconclusive"`` (the finite differences themselves are not finite or
        the step vanished, so nothing can be said at this ``x``).
      scaled: the step was relative, ``h * max(1, |x_j|)`` (the default step).
      within_rounding: passed with ``error >= tol``: every entry's difference lies within the
        finite differences' own rounding (``8 eps |f(x)| / step``), where the relative metric says
        nothing (both Jacobians zero but for rounding: ``sin(x)**2 + cos(x)**2``).
    """

    error: float
    passed: bool
    tol: float
    h: float
    method: str
    worst_index: tuple[int, ...] | None = None
    worst_analytic: float | complex = float("nan")
    worst_numeric: float | complex = float("nan")
    problem: str = field(default="")
    status: str = field(default="")
    scaled: bool = False
    within_rounding: bool = False

    def __post_init__(self):
        if not self.status:
            object.__setattr__(self, "status", "passed" if self.passed else "failed")
        if self.status not in STATUSES:
            raise ValueError(f"jacobians.GradcheckResult: status must be one of {STATUSES}, got {self.status!r}.")
        if self.passed != (self.status == "passed"):
            raise ValueError(f"jacobians.GradcheckResult: passed={self.passed} contradicts status={self.status!r}.")

    def __bool__(self) -> bool:
        return self.passed

    def __repr__(self) -> str:
        how = _describe(self.method, self.h, self.scaled)
        if self.status == "inconclusive":
            lines = [f"gradcheck INCONCLUSIVE: {self.problem} ({how})"]
        elif self.problem:
            lines = [f"gradcheck FAILED: {self.problem} ({how})"]
        elif self.within_rounding:
            lines = [f"gradcheck PASSED: every difference lies within the finite differences' rounding (relative "
                     f"error {_number(self.error)} of Jacobians at rounding level, tol {_number(self.tol)}) ({how})"]
        else:
            verdict, cmp = ("PASSED", "<") if self.passed else ("FAILED", ">=")
            lines = [f"gradcheck {verdict}: relative error {_number(self.error)} {cmp} tol {_number(self.tol)} ({how})"]
        if self.worst_index is not None and not self.passed:
            lines.append(
                f"  worst entry {self.worst_index}: analytic {self.worst_analytic:.10g}, "
                f"numeric {self.worst_numeric:.10g}"
            )
        return "\n".join(lines)


def _steps(x: jax.Array, h: float, method: str, scaled: bool) -> tuple[jax.Array, jax.Array]:
    """Per-entry perturbations, ``h`` or ``h * max(1, |x_j|)`` (flat, in x's dtype), and the steps actually taken."""
    flat = x.reshape(-1)
    if method == "complex":
        return jnp.full(flat.shape, h, _real_dtype(x.dtype)), jnp.full(flat.shape, h, _real_dtype(x.dtype))
    dx = (h * jnp.maximum(1, jnp.abs(flat)) if scaled else jnp.full(flat.shape, h)).astype(x.dtype)
    lower = flat - dx if method == "central" else flat
    return dx, (flat + dx) - lower


def _finite_differences(fun, x, dx, step, method, jit):
    """The numeric Jacobian, ``out.shape + x.shape``.

    All perturbed points are evaluated first and subtracted afterwards: inside
    one compiled expression XLA may contract ``f(x + h) - f(x - h)`` into a
    fused multiply-add, whose extra precision on one side only is a spurious
    difference (``1e12**2 - 1e12**2 != 0``).
    """
    n = x.size
    flat = x.reshape(-1)
    if method == "complex":
        ctype = jnp.complex64 if flat.dtype == jnp.float32 else jnp.complex128

        def value(i):
            pt = flat.astype(ctype).at[i].add(jax.lax.complex(jnp.zeros_like(dx[i]), dx[i]))
            return jnp.imag(fun(pt.reshape(x.shape))) / dx[i]

        count = n
    else:
        count = 2 * n if method == "central" else n

        def value(i):
            j = i % n
            sign = jnp.where(i < n, 1, -1).astype(dx.dtype)
            return fun(flat.at[j].add(sign * dx[j]).reshape(x.shape))

    if jit:
        # Batches of perturbed points (vmapped), in a loop: bounded memory.
        vals = jax.jit(lambda: jax.lax.map(value, jnp.arange(count), batch_size=min(count, 1024)))()
    else:
        vals = jnp.stack([value(jnp.asarray(i)) for i in range(count)])
    if method == "complex":
        d = vals
    else:
        lower = vals[n:] if method == "central" else (jax.jit(fun) if jit else fun)(x)[None]
        d = (vals[:n] - lower) / step.astype(vals.dtype).reshape((n,) + (1,) * (vals.ndim - 1))
    # (n,) + out.shape -> out.shape + x.shape
    return jnp.moveaxis(d, 0, -1).reshape(d.shape[1:] + x.shape)


ROUNDING_ULPS = 4  # the rounding fun's value may carry at each point, in units of its dtype's epsilon


def _rounding(fun, x, out_dtype, step, method: str, jit: bool) -> np.ndarray:
    """The finite differences' own rounding, ``out.shape + x.shape``: ``2 ROUNDING_ULPS eps |f(x)| / step_j``.

    Each of the quotient's two values of ``fun`` is rounded (to ``ROUNDING_ULPS`` epsilons of its size,
    the size taken at ``x``); the complex step has no difference to round (0).
    """
    if method == "complex":
        return np.zeros(())
    fx = np.abs(np.asarray((jax.jit(fun) if jit else fun)(x))).astype(np.float64)
    eps = float(jnp.finfo(out_dtype).eps)
    per_step = 1.0 / np.abs(np.asarray(step)).astype(np.float64).reshape(x.shape)
    with np.errstate(invalid="ignore", over="ignore"):  # fun not finite at x: no floor (NaN compares false)
        return 2 * ROUNDING_ULPS * eps * np.multiply.outer(fx, per_step)


def _nonfinite(a: np.ndarray, name: str) -> str:
    """``"the <name> Jacobian has 2 non-finite entries (first at (0, 1): nan)"``, or ``""``."""
    bad = ~np.isfinite(a)
    if not bad.any():
        return ""
    first = tuple(int(i) for i in np.argwhere(bad)[0])
    count = int(bad.sum())
    entries = "entry" if count == 1 else "entries"
    return f"the {name} Jacobian has {count} non-finite {entries} (first at {first}: {a[first]})"


def _kind(v) -> str:
    """``int (3)``, ``dict``: a value's type, and its repr where short."""
    shown = repr(v)
    return f"{type(v).__name__} ({shown})" if len(shown) <= 60 else type(v).__name__


def _as_array(x, where: str) -> jax.Array:
    """``x`` as one array (arrays, numbers, nested lists of numbers); a pytree or other object: a clear error."""
    if isinstance(x, jax.Array | np.ndarray | np.generic | int | float | complex):
        return jnp.asarray(x)
    try:
        return jnp.asarray(x)
    except (TypeError, ValueError) as e:
        pytree = isinstance(x, Mapping | list | tuple) or dataclasses.is_dataclass(x) or not (
            jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(x)))
        hint = (" gradcheck checks a function of one array: for a pytree, check the function of its flat vector "
                "(x_flat, unravel = jax.flatten_util.ravel_pytree(x); gradcheck(lambda v: fun(unravel(v)), x_flat))."
                if pytree else "")
        raise TypeError(f"{where}: x must be a floating-point array, got {_kind(x)}.{hint}") from e


def gradcheck(
    fun: Callable,
    x: jax.Array,
    jac_fun: Callable | None = None,
    *,
    h: float | None = None,
    method: str = "central",
    tol: float | None = None,
    jit: bool = True,
) -> GradcheckResult:
    """Check a Jacobian against finite differences with the book's relative error.

    Compares the finite-difference Jacobian of ``fun`` at ``x`` with
    ``jac_fun(x)`` (an analytic Jacobian you wrote, numerator layout
    ``out.shape + x.shape``) or, when ``jac_fun`` is None, with
    ``jacobians.jacobian(fun)(x)``, which validates custom JVP/VJP rules.
    Every entry ``x_j`` is perturbed by the given ``h`` (the book's procedure),
    or by ``h * max(1, |x_j|)`` for the default step, and the quotient divides
    by the step actually taken; ``x`` is not modified. An empty ``x`` passes
    (there is nothing to check).

    Args:
      fun: maps an array ``x`` to an array.
      x: floating-point array of any shape (a scalar too): float16, bfloat16,
        float32, float64, or complex (then ``fun`` must be holomorphic: the
        check compares ``d fun / dz`` with the quotients along the real axis and,
        divided by ``i``, along the imaginary axis, so a non-holomorphic ``fun``
        such as ``conj(z) z`` fails).
      jac_fun: the analytic Jacobian to check, or None.
      h: the step, taken as given (absolute: ``x_j +- h``). ``None``: a
        relative step ``h0 * max(1, |x_j|)`` with ``h0`` per dtype and method,
        about ``eps^(1/3)`` for central and ``eps^(1/2)`` for forward
        differences (0.05 and 0.1 central in float16 and bfloat16), 1e-20
        (1e-10 in float32, absolute) for the complex step. ``h=1e-4`` in
        float64 is the book's procedure.
      method: ``"central"`` (default, error O(h^2)), ``"forward"`` (O(h)), or
        ``"complex"``: ``Im f(x + ih)/h``, exact to rounding for real-analytic
        functions written with complex-safe operations (float32 and float64
        real ``x`` only).
      tol: pass threshold for the error. ``None``: 1e-6 in float64 (the
        book's value); in float32 1e-3 (central), 1e-2 (forward), 1e-5
        (complex); in float16 5e-2 and 1e-1; in bfloat16 1e-1 and 2e-1 (these
        only catch gross errors); complex ``x`` as its real dtype.
      jit: compile ``fun`` (default). ``jit=False`` evaluates it eagerly, one
        call per perturbed point, and takes the analytic Jacobian with
        ``jax.jacfwd`` outside ``jit``: slower, but works for functions with
        Python control flow on values (``if x.sum() > 0``), which cannot be
        compiled.

    Returns:
      A :class:`GradcheckResult`, truthy only when passed, whose repr is a
      report. A Jacobian of the wrong shape, or not finite where the finite
      differences are, fails; finite differences that are not finite (``fun``
      undefined or overflowing at ``x +- h``) or a step that vanishes give
      ``status == "inconclusive"``: the Jacobian could not be checked there.

    Raises:
      ValueError: unknown method, non-positive h or tol, the complex step on
        complex or 16-bit ``x``.
      TypeError: ``fun`` (or a given ``jac_fun``) is not callable, ``x`` is not
        a floating-point array (a dict, dataclass or other pytree either), ``jit`` is not a bool,
        or (with ``jit=True``) ``fun`` needs concrete values: Python control
        flow on traced values cannot be compiled.
    """
    where = "jacobians.gradcheck"
    if _compat.is_tracer(x):
        raise TypeError(f"{where}: x is a traced value (gradcheck called inside jax.jit, vmap or grad); it compares "
                        "numbers on the host, so call it outside any transformation.")
    if not callable(fun):
        raise TypeError(f"{where}: fun must be callable, got {_kind(fun)}.")
    if jac_fun is not None and not callable(jac_fun):
        raise TypeError(f"{where}: jac_fun must be callable or None, got {_kind(jac_fun)}.")
    if method not in METHODS:
        raise ValueError(f"{where}: method must be one of {METHODS}, got {method!r}.")
    if not isinstance(jit, bool):
        raise TypeError(f"{where}: jit must be True or False, got {jit!r}.")
    x = _as_array(x, where)
    if not jnp.issubdtype(x.dtype, jnp.inexact):
        raise TypeError(
            f"{where}: x must be a floating-point array (real, or complex for a holomorphic fun), got dtype "
            f"{x.dtype}. Cast it with x.astype(jnp.float64)."
        )
    real = _real_dtype(x.dtype)
    is_complex = jnp.issubdtype(x.dtype, jnp.complexfloating)
    if method == "complex" and (is_complex or real not in (np.dtype("float32"), np.dtype("float64"))):
        raise ValueError(
            f"{where}: method='complex' (the complex step) needs real float32 or float64 x, got dtype {x.dtype}; "
            "use method='central'."
        )
    given_h, given_tol = h, tol
    for name, v in (("h", h), ("tol", tol)):
        if v is None:
            continue
        # Python, NumPy and 0-d JAX real numbers (np.float32(1e-4), jnp.asarray(1e-4)), not bools or arrays.
        real_scalar = (not isinstance(v, bool | np.bool_) and np.ndim(v) == 0
                       and np.issubdtype(np.asarray(v).dtype, np.number)
                       and not np.issubdtype(np.asarray(v).dtype, np.complexfloating))
        if not real_scalar or not float(v) > 0 or not np.isfinite(float(v)):
            raise ValueError(f"{where}: {name} must be a positive finite real number (a scalar), got {v!r}.")
    scaled = h is None and method != "complex"  # the default step is relative; a given h is taken as given
    default_h, default_tol = _DEFAULTS[real][method]  # x's: refined below once fun's output dtype is known
    h, tol = float(default_h if h is None else h), float(default_tol if tol is None else tol)

    def result(status, problem, error=float("inf"), **worst):
        return GradcheckResult(error, status == "passed", tol, h, method, problem=problem, status=status,
                               scaled=scaled, **worst)

    if not bool(jnp.all(jnp.isfinite(x))):
        return result("inconclusive", "x has non-finite entries")
    try:
        try:
            out = jax.eval_shape(fun, x) if jit else fun(x)
        except TypeError as e:  # (a traced value in Python control flow, a TypeError too, is reported below)
            if "is not a valid JAX type" not in str(e):
                raise
            return result("failed", f"fun must return a single array ({str(e).splitlines()[0]})")
        if not hasattr(out, "shape"):
            return result("failed", f"fun must return a single array, got {_kind(out)}")
        if not jnp.issubdtype(out.dtype, jnp.inexact):  # not differentiable: finite differences would say NaN
            return result("failed", f"fun must return a floating-point array, got dtype {out.dtype}: integer and "
                                    "boolean outputs have no derivative to check")
        # A fun that computes in a lower precision than x's (float32 values of a float64 x) is checked with
        # that precision's step and tolerance: its rounding, not x's, sets what the differences can resolve.
        out_real = _real_dtype(out.dtype)
        coarse = out_real if out_real in _DEFAULTS and jnp.finfo(out_real).eps > jnp.finfo(real).eps else real
        default_h, default_tol = _DEFAULTS[coarse].get(method, _DEFAULTS[real][method])
        h = default_h if given_h is None else h
        tol = default_tol if given_tol is None else tol
        expected = tuple(out.shape) + tuple(x.shape)
        if jac_fun is not None:
            analytic = jac_fun(x)
            try:  # an array, or what NumPy makes one of (nested lists of numbers)
                numeric_dtype = jnp.issubdtype(np.asarray(analytic).dtype, jnp.number)
            except (TypeError, ValueError):
                numeric_dtype = False
            if not numeric_dtype:
                return result("failed", f"jac_fun must return an array of numbers, got {_kind(analytic)}")
        elif jit:
            analytic = jacobian(fun, holomorphic=is_complex)(x)
        else:
            analytic = jax.jacfwd(fun, holomorphic=is_complex)(x)
        analytic = np.asarray(analytic)
        if analytic.shape != expected:
            return result(
                "failed",
                f"the analytic Jacobian has shape {analytic.shape}, expected out.shape + x.shape = {expected} "
                "(numerator layout)",
            )
        if x.size == 0:  # an empty Jacobian: nothing to compare (and no step to take)
            return result("passed", "", 0.0)
        dx, step = _steps(x, h, method, scaled)
        vanished = np.asarray(step) == 0
        if vanished.any():
            j = tuple(int(i) for i in np.unravel_index(int(np.argmax(vanished)), x.shape))
            return result(
                "inconclusive",
                f"the step vanishes at x{list(j) if j else ''} = {np.asarray(x)[j]} (x + h == x in {x.dtype}); "
                "pass a larger h",
            )
        numeric = np.asarray(_finite_differences(fun, x, dx, step, method, jit))
        if is_complex:  # along the imaginary axis too: a holomorphic fun's quotient there is i J
            numeric = np.stack([numeric, np.asarray(_finite_differences(fun, x, 1j * dx, step, method, jit)) / 1j])
            analytic = np.stack([analytic, analytic])
    except TRACER_ERRORS as e:
        if not jit:
            raise
        raise TypeError(
            f"{where}: fun (or its Jacobian) needs concrete values, e.g. Python control flow such as "
            f"`if x.sum() > 0` on traced values, which cannot be compiled ({type(e).__name__}). Write it with "
            "jnp.where or jax.lax.cond, or pass jit=False to check it eagerly (one call per perturbed entry)."
        ) from e
    problem = _nonfinite(numeric, "finite-difference")
    if problem:
        return result(
            "inconclusive",
            f"{problem}: fun is not finite at x +- h, so the Jacobian cannot be checked at this x "
            "(try another x or a smaller h)",
        )
    problem = _nonfinite(analytic, "analytic")
    if problem:
        return result("failed", f"{problem} where the finite differences are finite")
    numeric64 = numeric.astype(np.complex128 if np.iscomplexobj(numeric) else np.float64)
    analytic64 = analytic.astype(np.complex128 if np.iscomplexobj(analytic) else np.float64)
    diff = numeric64 - analytic64
    # The metric's sums of squares, of values scaled by the largest entry: entries past 1e154 would overflow.
    big = max(float(np.max(np.abs(numeric64), initial=0.0)), float(np.max(np.abs(analytic64), initial=0.0)))
    scale = big if np.isfinite(big) and big > 0 else 1.0
    num = float(np.sum(np.abs(diff / scale) ** 2))
    den = float(np.sum(np.abs((numeric64 + analytic64) / scale) ** 2))
    error = 0.0 if num == 0 else (float(np.sqrt(num / den)) if den > 0 else float("inf"))
    worst = {}
    if diff.size:
        k = np.unravel_index(int(np.argmax(np.abs(diff))), diff.shape)
        scalar = complex if np.iscomplexobj(diff) else float
        worst = dict(
            worst_index=tuple(int(i) for i in (k[1:] if is_complex else k)),  # (the two directions: axis 0)
            worst_analytic=scalar(analytic64[k]),
            worst_numeric=scalar(numeric64[k]),
        )
    # Differences within the quotients' own rounding (a Jacobian that is zero but for rounding, where the
    # relative metric is 0/0): the finite differences cannot tell the two Jacobians apart.
    within = False
    if error >= tol:  # (fun evaluated once more, at x, only here)
        floor = _rounding(fun, x, out.dtype, step, method, jit)
        within = bool(np.all(np.abs(diff) <= (np.stack([floor, floor]) if is_complex else floor)))
    return dataclasses.replace(result("passed" if error < tol or within else "failed", "", error, **worst),
                               within_rounding=within)


def assert_gradcheck(fun: Callable, x: jax.Array, jac_fun: Callable | None = None, **kwargs) -> GradcheckResult:
    """Like :func:`gradcheck`, but raise ``AssertionError`` with the report unless it passed.

    An inconclusive check raises too: nothing was verified.

    Returns:
      The passing :class:`GradcheckResult`.
    """
    result = gradcheck(fun, x, jac_fun, **kwargs)
    if not result:
        raise AssertionError(repr(result))
    return result
