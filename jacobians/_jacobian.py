"""The Jacobian engine: mode choice, pytree bookkeeping and one compiled call.

Layout convention (the book's numerator layout, (5.58)-(5.59)): the Jacobian of
an output leaf of shape ``out.shape`` with respect to an input leaf of shape
``in.shape`` has shape ``out.shape + in.shape`` and entries
``J[i..., j...] = d out[i...] / d in[j...]``.
"""

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from . import kernels

from . import _args, layout


@dataclass(frozen=True)
class _Plan:
    """Everything static about one call; the key of the compilation cache."""

    fun: Callable
    call: _args.CallSpec
    int_argnums: bool
    mode: str
    chunk_size: int | None
    has_aux: bool
    holomorphic: bool
    order: str | None  # None: tensor result; "C"/"F": a 2-D matrix (jacobian_matrix)
    where: str


def _promote(*dtypes):
    # The dtype of a Jacobian block holding d(out)/d(in): promoted under JAX's
    # standard rules even when the user runs with strict promotion.
    with jax.numpy_dtype_promotion("standard"):
        return jnp.result_type(*dtypes)


def _check_outputs(plan: _Plan, out_shapes: Any) -> None:
    leaves_with_path = jax.tree_util.tree_flatten_with_path(out_shapes)[0]
    if not leaves_with_path:
        raise ValueError(f"{plan.where}: fun returned no arrays to differentiate.")
    for path, leaf in leaves_with_path:
        where = f"output{jax.tree_util.keystr(path)}"
        if plan.holomorphic and not jnp.issubdtype(leaf.dtype, jnp.complexfloating):
            raise TypeError(
                f"{plan.where}: holomorphic=True requires complex outputs, but {where} has dtype {leaf.dtype}."
            )
        if not jnp.issubdtype(leaf.dtype, jnp.inexact):
            raise TypeError(
                f"{plan.where}: fun must return floating-point arrays, but {where} has dtype "
                f"{leaf.dtype}; integer outputs have no derivative. Return it as aux "
                "(has_aux=True) if it is not to be differentiated."
            )


def _choose_mode(plan: _Plan, n: int, m: int, complex_out: bool) -> str:
    if complex_out and not plan.holomorphic:
        # Reverse mode on a non-holomorphic complex output is not a Jacobian.
        if plan.mode == "rev":
            raise TypeError(
                f"{plan.where}: mode='rev' needs real outputs (or holomorphic=True), but fun "
                "returns complex values; use mode='fwd' or 'auto'."
            )
        return "fwd"
    if plan.mode == "auto":
        # Forward costs one JVP per input entry, reverse one VJP per output entry.
        return "fwd" if n <= m else "rev"
    return plan.mode


def _split_blocks(jac, out_leaves, in_leaves):
    """Cut the flat ``(m, n)`` Jacobian into ``out.shape + in.shape`` blocks."""
    rows = []
    o = 0
    for out in out_leaves:
        mo = math.prod(out.shape)
        row, i = [], 0
        for x in in_leaves:
            ni = x.size
            block = jac if (mo, ni) == jac.shape else jac[o : o + mo, i : i + ni]
            dtype = _promote(out.dtype, x.dtype)
            row.append(block.reshape(out.shape + x.shape).astype(dtype))
            i += ni
        rows.append(row)
        o += mo
    return rows


def _compute(plan: _Plan, *traced):
    args, kwargs, diff = plan.call.rebuild(list(traced))
    _args.check_diff_dtypes(diff, plan.call.positions, plan.where, plan.holomorphic)

    def call(diff_args):
        a = list(args)
        for p, d in zip(plan.call.positions, diff_args, strict=True):
            a[p] = d
        return plan.fun(*a, **kwargs)

    shapes = jax.eval_shape(call, diff)  # abstract: no evaluation
    if plan.has_aux:
        if not (isinstance(shapes, tuple | list) and len(shapes) == 2):
            raise TypeError(
                f"{plan.where}: has_aux=True requires fun to return a pair (output, aux), "
                f"got {jax.tree_util.tree_structure(shapes)}."
            )
        shapes = shapes[0]
    _check_outputs(plan, shapes)
    out_leaves, out_treedef = jax.tree_util.tree_flatten(shapes)
    in_leaves = jax.tree_util.tree_leaves(diff)
    if plan.order is not None and (len(out_leaves) != 1 or len(in_leaves) != 1):
        raise ValueError(
            f"{plan.where}: needs a single array input and a single array output, got "
            f"{len(in_leaves)} input leaves and output structure {out_treedef}; use "
            "jacobians.jacobian for pytrees."
        )

    x, unravel = ravel_pytree(diff)
    n, m = x.size, sum(math.prod(s.shape) for s in out_leaves)
    out_dtype = _promote(*(s.dtype for s in out_leaves))
    complex_out = jnp.issubdtype(out_dtype, jnp.complexfloating)
    mode = _choose_mode(plan, n, m, complex_out)

    def flat_fun(x_flat):
        res = call(unravel(x_flat))
        out, aux = res if plan.has_aux else (res, None)
        ys = [jnp.ravel(y).astype(out_dtype) for y in jax.tree_util.tree_leaves(out)]
        return (ys[0] if len(ys) == 1 else jnp.concatenate(ys)), aux

    kernel = kernels.forward if mode == "fwd" else kernels.reverse
    _, jac, aux = kernel(flat_fun, x, plan.chunk_size)

    if plan.order is not None:
        (out,), (xin,) = out_leaves, in_leaves
        mat = jac.astype(_promote(out.dtype, xin.dtype))
        if plan.order == "F":
            tensor = mat.reshape(out.shape + xin.shape)
            mat = layout.to_matrix(tensor, len(out.shape), order="F")
        result = mat
    else:
        in_tree = diff[0] if plan.int_argnums else diff
        in_treedef = jax.tree_util.tree_structure(in_tree)
        rows = _split_blocks(jac, out_leaves, in_leaves)
        result = out_treedef.unflatten([in_treedef.unflatten(r) for r in rows])
    return (result, aux) if plan.has_aux else result


def _build(fun, argnums, mode, has_aux, holomorphic, chunk_size, order, where):
    if not callable(fun):
        raise TypeError(f"{where}: fun must be callable, got {type(fun).__name__}.")
    argnums_t = _args.check_argnums(argnums, where)
    mode = _args.check_mode(mode, where)
    chunk_size = _args.check_chunk_size(chunk_size, where)
    int_argnums = not isinstance(argnums, tuple | list)
    split = _args.CallSplitter(argnums_t, where)
    compiled: dict[_args.CallSpec, Callable] = {}

    @functools.wraps(fun)
    def jac_fun(*args, **kwargs):
        call, traced = split(args, kwargs)
        fn = compiled.get(call)
        if fn is None:
            # One jitted function per call structure: jit's C++ fast path then
            # dispatches repeat calls without hashing any Python state.
            plan = _Plan(fun, call, int_argnums, mode, chunk_size, has_aux, holomorphic, order, where)
            fn = compiled[call] = jax.jit(functools.partial(_compute, plan))
        return fn(*traced)

    return jac_fun


def jacobian(
    fun: Callable,
    argnums: int | tuple[int, ...] = 0,
    *,
    mode: str = "auto",
    has_aux: bool = False,
    holomorphic: bool = False,
    chunk_size: int | None = None,
) -> Callable:
    """The Jacobian of ``fun``, compiled, in the book's numerator layout (5.58).

    Same results and pytree structure as ``jax.jacfwd``/``jax.jacrev``: for an
    output leaf of shape ``out.shape`` and an input leaf of shape ``in.shape``
    the block has shape ``out.shape + in.shape``. The returned function is
    jit-compiled and cached: a second call with the same shapes and dtypes does
    not re-trace ``fun``.

    Args:
      fun: the function to differentiate. Its differentiated arguments must be
        (pytrees of) real floating-point arrays, complex with ``holomorphic``.
        Other arguments may be arrays or hashable values (strings, enums,
        Python numbers; these are compiled in as constants).
      argnums: an int or tuple of ints: which positional arguments to
        differentiate. A tuple gives a tuple of Jacobians per output leaf.
      mode: ``"fwd"`` (one JVP per input entry), ``"rev"`` (one VJP per output
        entry) or ``"auto"`` (forward when the total input size is <= the total
        output size, reverse otherwise; decided from shapes, no evaluation).
      has_aux: ``fun`` returns ``(output, aux)``; the result is ``(jac, aux)``.
      holomorphic: ``fun`` is holomorphic in complex inputs.
      chunk_size: push at most this many basis vectors at a time, bounding
        peak memory; ``None`` pushes all at once. Any value >= 1 works.

    Returns:
      A function with ``fun``'s signature returning the Jacobian pytree
      (``(jacobian, aux)`` with ``has_aux``).

    Raises:
      ValueError: unknown ``mode``, ``chunk_size`` < 1, bad ``argnums``
        (raised at once, before any tracing).
      TypeError: integer or non-array inputs to differentiate, integer outputs.

    Example (the book's (5.63)-(5.66))::

      >>> f = lambda x: jnp.array([-2 * x[0] + x[1], x[0] + x[1]])
      >>> jacobians.jacobian(f)(jnp.array([1.0, 2.0]))
      Array([[-2.,  1.],
             [ 1.,  1.]], dtype=float32)
    """
    return _build(fun, argnums, mode, has_aux, holomorphic, chunk_size, None, "jacobians.jacobian")


def jacobian_matrix(
    fun: Callable,
    argnums: int = 0,
    *,
    mode: str = "auto",
    order: str = "C",
    has_aux: bool = False,
    chunk_size: int | None = None,
) -> Callable:
    """The Jacobian of an array-to-array ``fun`` as a 2-D ``(out.size, in.size)`` matrix.

    The book's approach 2 of Figure 5.7: flatten output and input, then take the
    Jacobian of vectors. ``order="C"`` flattens row-major; ``order="F"`` stacks
    columns (the book's ``vec``, section 5.4), so for ``A(x)`` of shape (4, 2)
    and ``x`` in R^3 row ``i + 4 * j`` holds ``dA[i, j]/dx``. See
    :func:`jacobians.layout.to_matrix` for the convention.

    Args:
      fun: maps a single array (argument ``argnums``) to a single array.
      argnums: an int: which positional argument to differentiate.
      mode, has_aux, chunk_size: as for :func:`jacobian`.
      order: ``"C"`` (row-major) or ``"F"`` (column stacking, vec).

    Returns:
      A function returning the matrix of shape ``(prod(out.shape), prod(in.shape))``
      (``(matrix, aux)`` with ``has_aux``).

    Raises:
      ValueError: unknown ``order`` or ``mode``, tuple ``argnums``, or pytree
        inputs or outputs.
    """
    where = "jacobians.jacobian_matrix"
    order = _args.check_order(order, where)
    if isinstance(argnums, tuple | list):
        raise ValueError(f"{where}: argnums must be a single int, got {argnums!r}.")
    return _build(fun, argnums, mode, has_aux, False, chunk_size, order, where)
