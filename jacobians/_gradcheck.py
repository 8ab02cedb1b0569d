"""Finite-difference gradient checking (the remark after (5.53)).

The error is the book's relative metric over all entries of the Jacobian,

    error = sqrt( sum (dh_i - df_i)^2 / sum (dh_i + df_i)^2 ),

with ``dh`` the finite-difference and ``df`` the analytic Jacobian, both in
numerator layout ``out.shape + x.shape``.
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from ._jacobian import jacobian

METHODS = ("central", "forward", "complex")

# Default tolerances. float64: the book's 1e-6. float32 has eps ~ 1.2e-7, so a
# central difference is accurate to about eps^(2/3) ~ 2.4e-5 relative at best
# and a forward difference to eps^(1/2) ~ 3.5e-4; the tolerances leave a
# margin of ~40x above those floors. The complex step has no cancellation and
# is exact to rounding.
_TOL = {
    np.dtype("float64"): {"central": 1e-6, "forward": 1e-6, "complex": 1e-6},
    np.dtype("float32"): {"central": 1e-3, "forward": 1e-2, "complex": 1e-5},
}


def _default_h(dtype: np.dtype, method: str) -> float:
    eps = float(jnp.finfo(dtype).eps)
    if method == "central":
        return eps ** (1 / 3)  # balances truncation O(h^2) against rounding O(eps/h)
    if method == "forward":
        return eps ** (1 / 2)  # balances truncation O(h) against rounding O(eps/h)
    return 1e-20 if dtype == np.dtype("float64") else 1e-10  # no cancellation: tiny is fine


@dataclass(frozen=True)
class GradcheckResult:
    """The outcome of :func:`gradcheck`; truthy when the check passed.

    Attributes:
      error: the book's relative error (``inf`` when the check could not run).
      passed: ``error < tol`` and both Jacobians finite and of the same shape.
      tol: the tolerance used.
      h: the step used.
      method: ``"central"``, ``"forward"`` or ``"complex"``.
      worst_index: index (in ``out.shape + x.shape``) of the largest
        ``|numeric - analytic|``, or ``None``.
      worst_analytic, worst_numeric: the two values at that index.
      problem: why the check failed before comparing values, or ``""``.
    """

    error: float
    passed: bool
    tol: float
    h: float
    method: str
    worst_index: tuple[int, ...] | None = None
    worst_analytic: float = float("nan")
    worst_numeric: float = float("nan")
    problem: str = field(default="")

    def __bool__(self) -> bool:
        return self.passed

    def __repr__(self) -> str:
        verdict = "PASSED" if self.passed else "FAILED"
        lines = [
            f"gradcheck {verdict}: error {self.error:.3e} {'<' if self.passed else '>='} tol {self.tol:.1e} "
            f"(method={self.method!r}, h={self.h:.3g})"
        ]
        if self.problem:
            lines.append(f"  problem: {self.problem}")
        if self.worst_index is not None:
            lines.append(
                f"  worst entry {self.worst_index}: analytic {self.worst_analytic:.10g}, "
                f"numeric {self.worst_numeric:.10g}"
            )
        return "\n".join(lines)


def _finite_differences(fun, x, h, method):
    """The numeric Jacobian, ``out.shape + x.shape``; perturbed points evaluated in batches."""
    n = x.size
    E = jnp.eye(n, dtype=x.dtype).reshape((n,) + x.shape)
    batch = min(n, 1024)  # bounds memory for large inputs
    evaluate = lambda pts: jax.lax.map(fun, pts, batch_size=batch)  # noqa: E731
    if method == "complex":
        pts = jax.lax.complex(jnp.broadcast_to(x, E.shape), h * E)
        d = jnp.imag(evaluate(pts)) / h
    else:
        x0 = x[None]
        xp = x0 + h * E
        # Divide by the step actually taken, (x + h) - x, not by h: removes the
        # representation error of x + h.
        if method == "central":
            xm = x0 - h * E
            step = jnp.sum((xp - xm) * E, axis=tuple(range(1, E.ndim)))
            d = evaluate(xp) - evaluate(xm)
        else:
            step = jnp.sum((xp - x0) * E, axis=tuple(range(1, E.ndim)))
            d = evaluate(xp) - fun(x)[None]
        d = d / step.reshape((n,) + (1,) * (d.ndim - 1))
    # (n,) + out.shape -> out.shape + x.shape
    return jnp.moveaxis(d, 0, -1).reshape(d.shape[1:] + x.shape)


def _nonfinite(a: np.ndarray, name: str) -> str:
    bad = ~np.isfinite(a)
    if not bad.any():
        return ""
    first = tuple(int(i) for i in np.argwhere(bad)[0])
    return f"the {name} Jacobian has {int(bad.sum())} non-finite entries (first at {first}: {a[first]})"


def gradcheck(
    fun: Callable,
    x: jax.Array,
    jac_fun: Callable | None = None,
    *,
    h: float | None = None,
    method: str = "central",
    tol: float | None = None,
) -> GradcheckResult:
    """Check a Jacobian against finite differences with the book's relative error.

    Compares the finite-difference Jacobian of ``fun`` at ``x`` with
    ``jac_fun(x)`` (an analytic Jacobian you wrote, numerator layout
    ``out.shape + x.shape``) or, when ``jac_fun`` is None, with
    ``jacobians.jacobian(fun)(x)``, which validates custom JVP/VJP rules.
    Every entry of ``x`` is perturbed; the perturbed points are evaluated in
    batches (``lax.map`` over vmapped blocks). ``x`` is not modified.

    Args:
      fun: maps an array ``x`` to an array.
      x: real floating-point array of any shape (a scalar too).
      jac_fun: the analytic Jacobian to check, or None.
      h: the step. ``None``: ``eps^(1/3)`` for central, ``eps^(1/2)`` for
        forward differences and 1e-20 (1e-10 in float32) for the complex step.
        ``h=1e-4`` with ``method="central"`` in float64 is the book's procedure.
      method: ``"central"`` (default, error O(h^2)), ``"forward"`` (O(h)), or
        ``"complex"``: ``Im f(x + ih)/h``, exact to rounding for real-analytic
        functions written with complex-safe operations.
      tol: pass threshold for the error. ``None``: 1e-6 in float64 (the book's
        value); in float32 1e-3 (central), 1e-2 (forward), 1e-5 (complex),
        about 40x the accuracy floor of each method in single precision.

    Returns:
      A :class:`GradcheckResult`, truthy when passed, whose repr is a report.
      A wrongly shaped or non-finite Jacobian gives a failed result saying so.

    Raises:
      ValueError: unknown method, non-positive h or tol.
      TypeError: ``x`` is not a real floating-point array.
    """
    where = "jacobians.gradcheck"
    if method not in METHODS:
        raise ValueError(f"{where}: method must be one of {METHODS}, got {method!r}.")
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"{where}: x must be a real floating-point array, got dtype {x.dtype}. Cast it with x.astype(jnp.float64)."
        )
    if h is None:
        h = _default_h(x.dtype, method)
    if tol is None:
        tol = _TOL.get(np.dtype(x.dtype), _TOL[np.dtype("float32")])[method]
    for name, v in (("h", h), ("tol", tol)):
        if not (isinstance(v, int | float) and v > 0):
            raise ValueError(f"{where}: {name} must be a positive number, got {v!r}.")
    h, tol = float(h), float(tol)

    def failed(problem):
        return GradcheckResult(float("inf"), False, tol, h, method, problem=problem)

    out = jax.eval_shape(fun, x)
    if not hasattr(out, "shape"):
        return failed(f"fun must return a single array, got {jax.tree_util.tree_structure(out)}")
    expected = tuple(out.shape) + tuple(x.shape)
    analytic = jac_fun(x) if jac_fun is not None else jacobian(fun)(x)
    analytic = np.asarray(analytic)
    if analytic.shape != expected:
        return failed(
            f"the analytic Jacobian has shape {analytic.shape}, expected out.shape + x.shape = "
            f"{expected} (numerator layout)"
        )
    numeric = np.asarray(jax.jit(_finite_differences, static_argnums=(0, 3))(fun, x, h, method))
    problem = _nonfinite(analytic, "analytic") or _nonfinite(numeric, "finite-difference")
    if problem:
        return failed(problem)

    diff = numeric - analytic
    num, den = float(np.sum(diff**2)), float(np.sum((numeric + analytic) ** 2))
    error = 0.0 if num == 0 else (float(np.sqrt(num / den)) if den > 0 else float("inf"))
    worst = np.unravel_index(int(np.argmax(np.abs(diff))), diff.shape) if diff.size else None
    return GradcheckResult(
        error=error,
        passed=error < tol,
        tol=tol,
        h=h,
        method=method,
        worst_index=None if worst is None else tuple(int(i) for i in worst),
        worst_analytic=float(analytic[worst]) if worst is not None else float("nan"),
        worst_numeric=float(numeric[worst]) if worst is not None else float("nan"),
    )


def assert_gradcheck(fun: Callable, x: jax.Array, jac_fun: Callable | None = None, **kwargs) -> GradcheckResult:
    """Like :func:`gradcheck`, but raise ``AssertionError`` with the report when it fails.

    Returns:
      The passing :class:`GradcheckResult`.
    """
    result = gradcheck(fun, x, jac_fun, **kwargs)
    if not result:
        raise AssertionError(repr(result))
    return result
