"""Compressed Jacobian evaluation: one JVP (or VJP) per colour, then decompression.

With columns coloured so that same-coloured columns share no row, ``J @ S``
for the 0/1 seed matrix ``S[j, color[j]] = 1`` holds every nonzero exactly once:
``J[i, j] = (J @ S)[i, color[j]]``. Rows coloured likewise give ``S^T @ J``.
The seeds and the decompression indices are constants; nothing loops in Python.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._basis import Shards, opaque, sharded_vmap


def _seeds(colors: np.ndarray, n_colors: int, dtype) -> jax.Array:
    """The 0/1 seed rows, shape ``(n_colors, len(colors))``: row ``c`` marks colour ``c``."""
    return opaque(jnp.asarray(colors[None, :] == np.arange(n_colors)[:, None], dtype))  # never constant-folded


def compressed_jvps(
    fun: Callable[[jax.Array], tuple[jax.Array, Any]],
    x: jax.Array,
    colors: np.ndarray,
    n_colors: int,
    shards: Shards | None = None,
) -> tuple[jax.Array, Any]:
    """``(J @ S)^T``: one JVP per colour, shape ``(n_colors, m)``, and ``fun``'s aux.

    Args:
      fun: ``(n,) -> ((m,), aux)``.
      x: the point, shape ``(n,)``.
      colors: colour of each column, shape ``(n,)``.
      n_colors: the number of colours (JVPs).
      shards: split the colours across devices.
    """
    seeds = _seeds(colors, n_colors, x.dtype)  # (c, n)
    push = lambda t: jax.jvp(fun, (x,), (t,), has_aux=True)[1:]  # noqa: E731
    return sharded_vmap(push, seeds, shards, out_axes=(0, None))  # (c, m): vmap's layout, no transpose


def compressed_forward(
    fun: Callable[[jax.Array], jax.Array],
    x: jax.Array,
    colors: np.ndarray,
    n_colors: int,
    rows: np.ndarray,
    cols: np.ndarray,
    shards: Shards | None = None,
) -> jax.Array:
    """The nonzeros ``J[rows, cols]`` of a flat ``fun``'s Jacobian, by column colouring.

    Args:
      fun: ``(n,) -> ((m,), aux)``.
      x: the point, shape ``(n,)``.
      colors: colour of each column, shape ``(n,)``.
      n_colors: the number of colours (JVPs).
      rows, cols: the nonzeros to extract.

    Returns:
      ``(values, aux)``: the values, shape ``(len(rows),)``, and ``fun``'s aux.
    """
    compressed, aux = compressed_jvps(fun, x, colors, n_colors, shards)
    # One flat gather with precomputed indices decompresses.
    return compressed.reshape(-1)[colors[cols] * compressed.shape[1] + np.asarray(rows)], aux


def compressed_reverse(
    fun: Callable[[jax.Array], jax.Array],
    x: jax.Array,
    colors: np.ndarray,
    n_colors: int,
    rows: np.ndarray,
    cols: np.ndarray,
    shards: Shards | None = None,
) -> jax.Array:
    """The nonzeros ``J[rows, cols]`` of a flat ``fun``'s Jacobian, by row colouring.

    Args:
      fun: ``(n,) -> ((m,), aux)``.
      x: the point, shape ``(n,)``.
      colors: colour of each row, shape ``(m,)``.
      n_colors: the number of colours (VJPs).
      rows, cols: the nonzeros to extract.

    Returns:
      ``(values, aux)``: the values, shape ``(len(rows),)``, and ``fun``'s aux.
    """
    y, pullback, aux = jax.vjp(fun, x, has_aux=True)
    seeds = _seeds(colors, n_colors, y.dtype)  # (c, m)
    compressed = sharded_vmap(lambda c: pullback(c)[0], seeds, shards)  # (c, n)
    return compressed.reshape(-1)[colors[rows] * x.shape[0] + np.asarray(cols)], aux
