"""Forward-mode Jacobians: push input basis vectors through JVPs."""

from collections.abc import Callable
from typing import Any

import jax

from ._basis import Shards, basis_map, sharded_vmap


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
    if chunk_size is None or chunk_size * per >= n:
        # The same computation as jax.jacfwd: one vmapped JVP whose primal
        # part is computed once, tangents landing on the last axis.
        def push(t):
            return jax.jvp(fun, (x,), (t,), has_aux=True)

        return sharded_vmap(push, jax.numpy.eye(n, dtype=x.dtype), shards, out_axes=(None, -1, None))

    # Chunked: linearize once (primal and residuals computed once), then apply
    # the linear map to chunks of basis vectors.
    y, lin, aux = jax.linearize(fun, x, has_aux=True)
    return y, basis_map(lin, n, x.dtype, chunk_size, axis=1, shards=shards), aux
