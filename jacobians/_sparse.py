"""Sparse Jacobians: detected pattern, colouring, one JVP/VJP per colour.

``sparse_jacobian`` detects the pattern (:func:`jacobians.sparsity`) and
colours it once per input shape and dtype, caches both, and compiles the
evaluation: ``c`` JVPs (column colouring) or VJPs (row colouring) instead of
``n`` or ``m``, then a gather with precomputed indices.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import sparse as jsparse
from jax.extend import core as jcore

from . import kernels

from . import _args
from ._sparsity import SparsityPattern, abstract_args, detect

OUTPUTS = ("bcoo", "dense")


@dataclass
class _Plan:
    pattern: SparsityPattern
    mode: str
    colors: np.ndarray
    n_colors: int
    compute: Callable


def _primitives(jaxpr) -> set[str]:
    """Names of all primitives in a jaxpr, nested ones included."""
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        for sub in jcore.jaxprs_in_params(eqn.params):
            names |= _primitives(sub)
    return names


def _coerce_pattern(given, out_shape, in_shape, where: str) -> SparsityPattern:
    expected = tuple(out_shape) + tuple(in_shape)
    if isinstance(given, SparsityPattern):
        pattern = given
    elif isinstance(given, jsparse.BCOO):
        idx = np.asarray(given.indices)
        if given.n_batch or given.n_dense:
            raise ValueError(f"{where}: a BCOO sparsity pattern must have no batch or dense dimensions.")
        if tuple(given.shape) != expected:
            raise ValueError(
                f"{where}: the sparsity pattern has shape {tuple(given.shape)} but the Jacobian has "
                f"shape out.shape + in.shape = {expected}."
            )
        k = len(out_shape)
        rows = np.ravel_multi_index(idx[:, :k].T, out_shape) if k else np.zeros(len(idx), np.int64)
        cols = np.ravel_multi_index(idx[:, k:].T, in_shape) if in_shape else np.zeros(len(idx), np.int64)
        pattern = SparsityPattern(out_shape, in_shape, rows, cols)
    else:
        mask = np.asarray(given)
        if mask.dtype != bool:
            raise TypeError(f"{where}: a dense sparsity pattern must be a boolean array, got {mask.dtype}.")
        if mask.shape != expected:
            raise ValueError(
                f"{where}: the sparsity pattern has shape {mask.shape} but the Jacobian has "
                f"shape out.shape + in.shape = {expected}."
            )
        pattern = SparsityPattern.from_dense(mask, len(out_shape))
    if pattern.shape != expected:
        raise ValueError(
            f"{where}: the sparsity pattern has shape {pattern.shape} but the Jacobian has "
            f"shape out.shape + in.shape = {expected}."
        )
    return pattern


def sparse_jacobian(
    fun: Callable,
    argnums: int = 0,
    *,
    sparsity: str | SparsityPattern | np.ndarray | jsparse.BCOO = "auto",
    mode: str = "auto",
    output: str = "bcoo",
) -> Callable:
    """A Jacobian that pays only for its nonzeros: one JVP or VJP per colour.

    The pattern is detected from the jaxpr (:func:`jacobians.sparsity`) or
    given; columns (forward) or rows (reverse) are greedily coloured so that
    same-coloured ones share no row (column); the Jacobian is then ``c``
    JVPs/VJPs and a gather. Detection and colouring run once per input shapes
    and dtypes and are cached; the evaluation is jit-compiled.

    Args:
      fun: maps arrays to a single array; differentiated in argument
        ``argnums``, a single real floating-point array. Other arguments must
        be arrays (their values are unknown to the detection).
      argnums: a single int.
      sparsity: ``"auto"`` (detect), a :class:`SparsityPattern`, a boolean
        array of shape ``out.shape + in.shape``, or a ``BCOO`` of that shape.
        A given pattern must contain every nonzero, or those are lost.
      mode: ``"fwd"`` (column colouring), ``"rev"`` (row colouring) or
        ``"auto"`` (whichever needs fewer colours, forward on ties; but reverse
        when ``fun`` contains a ``custom_vjp`` and forward when it contains a
        ``while_loop``, the only directions JAX can differentiate those in).
      output: ``"bcoo"`` for a ``jax.experimental.sparse.BCOO`` of shape
        ``out.shape + in.shape``, or ``"dense"`` for a dense array equal to
        :func:`jacobians.jacobian`.

    Returns:
      A function with ``fun``'s signature returning the Jacobian. It has
      attributes ``plan(*args)`` (the cached pattern, mode and colours).

    Raises:
      ValueError: unknown ``mode``/``output``; a given pattern of the wrong shape.
    """
    where = "jacobians.sparse_jacobian"
    if not callable(fun):
        raise TypeError(f"{where}: fun must be callable, got {type(fun).__name__}.")
    mode = _args.check_mode(mode, where)
    if output not in OUTPUTS:
        raise ValueError(f"{where}: output must be one of {OUTPUTS}, got {output!r}.")
    if isinstance(sparsity, str) and sparsity != "auto":
        raise ValueError(
            f"{where}: sparsity must be 'auto', a SparsityPattern, a boolean array or a BCOO, got {sparsity!r}."
        )
    plans: dict = {}

    def plan(*args) -> _Plan:
        leaves, treedef = jax.tree_util.tree_flatten(args)
        key = (treedef, tuple((np.shape(a), getattr(a, "dtype", type(a))) for a in leaves))
        if key in plans:
            return plans[key]
        i, avals = abstract_args(args, argnums, where)
        x = avals[i]
        if isinstance(sparsity, str):
            pattern, prims = detect(fun, avals, i, where)
        else:
            closed = jax.make_jaxpr(fun)(*avals)  # one trace: the output shape and the primitives
            pattern = _coerce_pattern(sparsity, closed.out_avals[0].shape, x.shape, where)
            prims = _primitives(closed.jaxpr)
        m, n = math.prod(pattern.out_shape), math.prod(pattern.in_shape)
        col_colors = kernels.color_columns(pattern.rows, pattern.cols, n) if mode != "rev" else None
        row_colors = kernels.color_rows(pattern.rows, pattern.cols, m) if mode != "fwd" else None
        n_col = int(col_colors.max()) + 1 if col_colors is not None and n else 0
        n_row = int(row_colors.max()) + 1 if row_colors is not None and m else 0
        use_fwd = mode == "fwd" or (mode == "auto" and n_col <= n_row)
        if mode == "auto":
            # JAX cannot push JVPs through custom_vjp, nor pull VJPs through while_loop.
            if "custom_vjp_call" in prims and "while" not in prims:
                use_fwd = False
            elif "while" in prims and "custom_vjp_call" not in prims:
                use_fwd = True
        colors, n_colors = (col_colors, n_col) if use_fwd else (row_colors, n_row)
        rows, cols = pattern.rows, pattern.cols
        indices = jnp.asarray(pattern.indices())
        kernel = kernels.compressed_forward if use_fwd else kernels.compressed_reverse

        def compute(*args):
            def flat(xf):
                a = list(args)
                a[i] = xf.reshape(pattern.in_shape)
                return jnp.ravel(fun(*a))

            x_flat = jnp.ravel(args[i])
            if pattern.nnz:
                data = kernel(flat, x_flat, colors, max(n_colors, 1), rows, cols)
            else:
                data = jnp.zeros(0, jax.eval_shape(flat, x_flat).dtype)
            if output == "dense":
                dense = jnp.zeros((m, n), data.dtype).at[rows, cols].set(data)
                return dense.reshape(pattern.shape)
            return jsparse.BCOO((data, indices), shape=pattern.shape, indices_sorted=True, unique_indices=True)

        p = plans[key] = _Plan(pattern, "fwd" if use_fwd else "rev", colors, n_colors, jax.jit(compute))
        if all(hasattr(a, "shape") and hasattr(a, "dtype") for a in args):
            plans[tuple((a.shape, a.dtype) for a in args)] = p
        return p

    def jac_fun(*args):
        # Fast path: arrays only, keyed by shapes and dtypes, no pytree work.
        try:
            p = plans.get(tuple((a.shape, a.dtype) for a in args))
        except AttributeError:
            p = None
        return (p or plan(*args)).compute(*args)

    jac_fun.plan = plan
    return jac_fun
