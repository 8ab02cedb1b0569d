"""The Gauss-Newton matrix ``J^T J`` as an operator: products, its exact diagonal, and the matrix.

For least squares ``1/2 ||f(x)||^2`` the Gauss-Newton (and Levenberg-Marquardt)
step needs ``J^T J v`` and often ``diag(J^T J)`` (the squared column norms of
``J``, a Jacobi preconditioner), without forming ``J``. ``mv`` linearises
``f`` and transposes the linearisation: one JVP and one VJP. Where ``f`` has a
``custom_vjp`` (no forward mode), ``J v`` comes from transposing the pullback.
``diagonal()`` is exact: with ``J``'s columns coloured so that same-coloured
columns share no row, the compressed product ``J S`` holds every entry of
every column exactly once, so the squared column norms are sums of squares
of compressed entries: one JVP per colour. The colouring is certified once
against JAX's own JVPs before it is used; where the analysis or the check
fails, every column gets its own JVP (see :mod:`._trust`).
"""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from . import _args, _deps, _hoist, _sparse, _trust, kernels
from ._args import trace_flat
from ._walker import has_custom_vjp


def _linear_maps(p: _args.Problem, mode: str):
    """``(J v, J^T u)`` as functions of flat vectors, linearised once.

    ``"fwd"``: ``jax.linearize`` and its transpose. ``"rev"`` (a ``custom_vjp`` has
    no forward mode): the pullback, and ``J v`` by transposing the pullback.
    """
    f = lambda x: p.flat(x)[0]  # noqa: E731
    if mode == "fwd":
        _, jvp = jax.linearize(f, p.x)
        vjp = jax.linear_transpose(jvp, p.x)
        return jvp, lambda u: vjp(u)[0]
    y, pull = jax.vjp(f, p.x)
    jvp_t = jax.linear_transpose(lambda u: pull(u)[0], jax.ShapeDtypeStruct(y.shape, y.dtype))
    return (lambda v: jvp_t(v)[0]), (lambda u: pull(u)[0])


def _either(p: _args.Problem, run):
    """Forward linearisation, or the pullback where a custom_vjp forbids forward mode.

    (``jax.linearize`` of a ``custom_vjp`` fails only when compiled, too late to
    fall back; so look at the jaxpr first.)
    """
    closed = jax.make_jaxpr(lambda x: p.flat(x)[0])(p.x)
    return run("rev" if has_custom_vjp(closed) else "fwd")


def _mv(t, spec, v, *traced):
    p = _args.problem(t.fun, spec, traced, where=t.where, int_argnums=t.int_argnums)
    _check_vector(p, v, f"{t.where}(...).mv")
    vf = ravel_pytree(v)[0].astype(p.x.dtype)

    def run(mode):
        jv, jtu = _linear_maps(p, mode)
        return jtu(jv(vf))

    return _unflat(p, _either(p, run))


def _check_vector(p: _args.Problem, v, where: str) -> None:
    """``v`` must have the differentiated inputs' structure and shapes, in a floating dtype (as ``jax.jvp``'s tangents).

    A float of another precision is cast to the inputs' dtype; a complex ``v`` for real
    inputs, an integer or a boolean one is refused (casting would drop its imaginary part).
    """
    leaves, treedef = jax.tree_util.tree_flatten(v)
    if treedef != p.in_treedef:
        raise ValueError(f"{where}: v must have the structure of the differentiated inputs, {p.in_treedef}; "
                         f"got {treedef}.")
    for i, (leaf, x) in enumerate(zip(leaves, p.in_leaves, strict=True)):
        shape, dtype = np.shape(leaf), jnp.result_type(leaf)
        if shape != tuple(x.shape):
            raise ValueError(f"{where}: v's leaf {i} must have shape {tuple(x.shape)} (its input's), got {shape}.")
        complex_ok = jnp.issubdtype(x.dtype, jnp.complexfloating)
        if not jnp.issubdtype(dtype, jnp.inexact) or (jnp.issubdtype(dtype, jnp.complexfloating) and not complex_ok):
            raise TypeError(f"{where}: v's leaf {i} must be a {'complex' if complex_ok else 'real'} floating array "
                            f"(its input's dtype is {x.dtype}), got {dtype}.")


def _unflat(p: _args.Problem, flat):
    leaves, i = [], 0
    for x in p.in_leaves:
        leaves.append(flat[i : i + x.size].reshape(x.shape).astype(x.dtype))
        i += x.size
    return p.in_treedef.unflatten(leaves)


def _entries(p: _args.Problem, rows, cols, colors):
    """``J[rows, cols]`` from one product ``J s`` per colour (``(c, m)`` compressed), and the compressed matrix."""
    c = int(colors.max()) + 1 if p.n else 0
    seeds = jnp.asarray(colors[None, :] == np.arange(c)[:, None], p.x.dtype)
    compressed = _either(p, lambda mode: jax.vmap(_linear_maps(p, mode)[0])(seeds))  # (c, m)
    return compressed.reshape(-1)[colors[cols] * p.m + rows]


def _plan(t, spec, traced, n: int):
    """``(rows, cols, colors)`` of a certified column colouring of ``J``, or ``None`` (dense: a JVP per column)."""
    where = t.where
    avals = [jax.ShapeDtypeStruct(np.shape(a), a.dtype) for a in traced]
    traced_flat = trace_flat(t, spec, avals)
    try:
        with _trust.stage("sparsity detection", passing=(_deps.TooDense,)):
            pat = _sparse.detect_traced(t, *traced_flat, max_nnz=16 * n + 1024).pattern
        with _trust.stage("colouring"):
            plan = (pat.rows, pat.cols, _sparse.coloring.color_columns(pat.rows, pat.cols, n))
        with _trust.stage("certificate"):
            cert = _trust.linear(
                traced_flat, _trust.concrete(traced) or _trust.call_values(spec, t),
                lambda p: _entries(p, *plan), mode="fwd", entries=plan[:2], where=where,
                reference=lambda p, T: _either(p, lambda mode: jax.vmap(_linear_maps(p, mode)[0])(T)))
    except _deps.TooDense:
        return None
    except _trust.AnalysisError as e:
        _trust.analysis_failed(where, e)
        return None
    if cert.failed:
        _trust.certificate_failed(where, f"Gauss-Newton diagonal's column colouring ({int(plan[2].max()) + 1} "
                                         "colours)", cert.detail)
        return None
    return plan


def _diagonal(t, spec, plans, *traced):
    p = _args.problem(t.fun, spec, traced, where=t.where, int_argnums=t.int_argnums)
    n = p.n
    key = (spec, tuple((np.shape(a), np.dtype(a.dtype)) for a in traced))
    if key not in plans:
        plans[key] = _plan(t, spec, traced, n)
    plan = plans[key]
    if plan is None:  # dense: every column by its own JVP, column j of J in row j
        seeds = jnp.eye(n, dtype=p.x.dtype)
        compressed = _either(p, lambda mode: jax.vmap(_linear_maps(p, mode)[0])(seeds))  # (n, m)
        return _unflat(p, jnp.sum(compressed * compressed, axis=1))
    rows, cols, colors = plan
    vals = _entries(p, rows, cols, colors)  # J[rows, cols]
    return _unflat(p, jax.ops.segment_sum(vals * vals, jnp.asarray(cols), num_segments=n))


def _materialise(t, spec, *traced):
    p = _args.problem(t.fun, spec, traced, where=t.where, int_argnums=t.int_argnums)
    # Forward mode where it is the cheaper, unless a custom_vjp forbids it (then the pullbacks, as mv does).
    fwd = _either(p, lambda mode: mode == "fwd" and p.n <= p.m)
    _, J, _ = kernels.forward(p.flat, p.x) if fwd else kernels.reverse(p.flat, p.x)
    return J.T @ J


class GaussNewton:
    """``J^T J`` at one point, as an operator (``J`` in the book's numerator layout, flattened).

    Methods:
      mv(v): ``J^T (J v)``, ``v`` with the structure of the differentiated arguments.
      diagonal(): ``diag(J^T J)`` (the squared column norms of ``J``), same structure.
      materialise(): the dense ``(n, n)`` matrix ``J^T J`` (inputs raveled).
    """

    def __init__(self, gn, args, kwargs):
        self._gn, self._args, self._kwargs = gn, args, kwargs

    def _call(self, name, *extra):
        fn, traced, _ = self._gn.compiled(name, self._args, self._kwargs)
        with _trust.calling(self._gn.t[name], self._args, self._kwargs):  # a plan made now checks at these inputs
            return fn(*extra, *traced)

    def mv(self, v):
        """``J^T (J v)``: one JVP and one VJP."""
        return self._call("mv", v)

    def diagonal(self):
        """``diag(J^T J)``, exactly: one JVP per colour of ``J``'s column colouring (``n`` if dense)."""
        return self._call("diagonal")

    def materialise(self):
        """The dense ``(n, n)`` matrix ``J^T J``."""
        return self._call("materialise")


class _GN:
    def __init__(self, fun, argnums, where):
        plans: dict = {}
        builds = {"mv": lambda spec: (_mv, self.t["mv"], spec),
                  "diagonal": lambda spec: (_diagonal, self.t["diagonal"], spec, plans),
                  "materialise": lambda spec: (_materialise, self.t["materialise"], spec)}
        self.t = {name: _args.Transform(fun, argnums, where,
                                        lambda spec, b=b: _hoist.Hoisted(functools.partial(*b(spec))))
                  for name, b in builds.items()}

    def compiled(self, name, args, kwargs):
        return self.t[name].compiled(args, kwargs)


def gauss_newton(fun: Callable, argnums: int | tuple[int, ...] = 0) -> Callable:
    """The Gauss-Newton operator ``J^T J`` of ``fun`` (for ``1/2 ||fun(x)||^2``), without forming ``J``.

    Args:
      fun: the residual function (any output pytree; flattened).
      argnums: an int or a tuple of ints.

    Returns:
      A function of ``fun``'s arguments returning a :class:`GaussNewton` operator
      with ``mv(v)``, ``diagonal()`` and ``materialise()``, each compiled and cached.

    Example::

      >>> gn = jacobians.gauss_newton(lambda x: jnp.stack([x[0] * x[1], x[1]]))(jnp.array([1.0, 2.0]))
      >>> gn.diagonal()
      Array([4., 2.], dtype=float32)
    """
    where = "jacobians.gauss_newton"
    gn = _GN(fun, argnums, where)

    @functools.wraps(fun)
    def at(*args, **kwargs):
        gn.compiled("mv", args, kwargs)  # checks the arguments now, not at the first product
        return GaussNewton(gn, args, kwargs)

    return at
