"""Reverse-mode Jacobians: pull output basis vectors through VJPs."""

from collections.abc import Callable
from typing import Any

import jax

from ._basis import Shards, basis_map


def reverse(
    fun: Callable[[jax.Array], tuple[jax.Array, Any]],
    x: jax.Array,
    chunk_size: int | None = None,
    shards: Shards | None = None,
) -> tuple[jax.Array, jax.Array, Any]:
    """Jacobian of a flat function by reverse mode, one VJP per output entry.

    Args:
      fun: maps ``x`` of shape ``(n,)`` to ``(y, aux)`` with ``y`` of shape ``(m,)``.
      x: the point, shape ``(n,)``.
      chunk_size: at most this many VJPs at a time (per device); ``None`` for all at once.
      shards: split the basis vectors across devices (see :class:`Shards`).

    Returns:
      ``(y, jac, aux)`` with ``jac`` of shape ``(m, n)``, ``jac[i, j] = dy_i/dx_j``.
    """
    y, pullback, aux = jax.vjp(fun, x, has_aux=True)
    jac = basis_map(lambda c: pullback(c)[0], y.shape[0], y.dtype, chunk_size, axis=0, shards=shards)
    return y, jac, aux
