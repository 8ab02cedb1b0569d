"""Forward-mode Jacobians: push input basis vectors through JVPs."""

from collections.abc import Callable
from typing import Any

import jax

from ._basis import Shards, basis_map, sharded_vmap


def _has_custom_lin(jaxpr) -> bool:
    """Whether a JVP's jaxpr holds a ``custom_lin``: a ``custom_vjp`` met in forward mode (fails when lowered)."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "custom_lin":
            return True
        for v in eqn.params.values():
            for sub in v if isinstance(v, tuple | list) else (v,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns") and _has_custom_lin(inner):
                    return True
    return False


def primal_once(run: Callable[[tuple], tuple], axis: int) -> tuple:
    """``run(out_axes)`` (a vmapped JVP's ``(y, tangents, aux)``) with the primal and aux unbatched, as ``jax.jacfwd``.

    Where a primitive's JVP rule batches the primal as well (a scatter into ``lax.empty``, on which
    ``jax.jacfwd`` itself fails: "got axis spec None but output was batched"), the primal and aux come
    out batched instead and the first copy is kept: the same values, computed per basis vector.
    """
    try:
        return run((None, axis, None))
    except ValueError as e:
        if "out_axes" not in str(e):
            raise
    y, tangents, aux = run((0, axis, 0))
    first = lambda v: v[0]  # noqa: E731
    return jax.tree_util.tree_map(first, y), tangents, jax.tree_util.tree_map(first, aux)


def forward(
    fun: Callable[[jax.Array], tuple[jax.Array, Any]],
    x: jax.Array,
    chunk_size: int | None = None,
    shards: Shards | None = None,
) -> tuple[jax.Array, jax.Array, Any]:
    """Jacobian of a flat function by forward mode, one JVP per input entry.

    Args:
      fun: maps ``x`` of shape ``(n,)`` to ``(y, aux)`` with ``y`` of shape ``(m,)``.
      x: the point, shape ``(n,)``.
      chunk_size: at most this many JVPs at a time (per device); ``None`` for all at once.
      shards: split the basis vectors across devices (see :class:`Shards`).

    Returns:
      ``(y, jac, aux)`` with ``jac`` of shape ``(m, n)``, ``jac[i, j] = dy_i/dx_j``.
    """
    n = x.shape[0]
    per = shards.count if shards is not None else 1
    if chunk_size is None or (chunk_size * per >= n and chunk_size * per > 1):
        # The same computation as jax.jacfwd: one vmapped JVP whose primal
        # part is computed once, tangents landing on the last axis.
        def push(t):
            return jax.jvp(fun, (x,), (t,), has_aux=True)

        basis = jax.numpy.eye(n, dtype=x.dtype)
        return primal_once(lambda axes: sharded_vmap(push, basis, shards, out_axes=axes), -1)

    # Chunked: linearize once (primal and residuals computed once), then apply
    # the linear map to chunks of basis vectors (chunk_size=1: one by one, no vmap).
    # A JVP traced first: where forward mode is impossible (a custom_vjp) say so now, while the caller can
    # still fall back to reverse mode; JAX itself would only fail when compiling the loop.
    if _has_custom_lin(jax.make_jaxpr(lambda t: jax.jvp(fun, (x,), (t,), has_aux=True)[1])(x).jaxpr):
        raise TypeError("can't apply forward-mode autodiff (jvp) to a custom_vjp function.")
    try:
        y, lin, aux = jax.linearize(fun, x, has_aux=True)
    except Exception:  # noqa: BLE001 - e.g. a custom_vmap, which JAX cannot linearize: a JVP per chunk
        # (the primal recomputed per chunk)
        y, aux = fun(x)

        def lin(t):
            return jax.jvp(lambda v: fun(v)[0], (x,), (t,))[1]

    return y, basis_map(lin, n, x.dtype, chunk_size, axis=1, shards=shards), aux
