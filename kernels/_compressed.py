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

from ._basis import Shards, opaque, sharded_chunks, sharded_vmap
from ._index import take, take_rows


def _seeds(colors: np.ndarray, n_colors: int, dtype, fold: bool = False) -> jax.Array:
    """The 0/1 seed rows, shape ``(n_colors, len(colors))``: row ``c`` marks colour ``c``.

    Behind an optimization barrier unless ``fold``: XLA then cannot fold them with closed-over
    weights at compile time (slow in its evaluator for large products).
    """
    seeds = jnp.asarray(colors[None, :] == np.arange(n_colors)[:, None], dtype)
    return seeds if fold else opaque(seeds)


def seed_map(apply: Callable, seeds: jax.Array, chunk_size: int | None = None, shards: Shards | None = None,
             axis: int = 0) -> tuple[jax.Array, Any]:
    """``vmap(apply)`` over the rows of ``seeds`` (``(c, n)``), at most ``chunk_size`` at a time.

    Args:
      apply: ``(n,) -> ((r,), aux)``; ``aux`` must not depend on the seed.
      seeds: the seed rows, shape ``(c, n)``.
      chunk_size: seeds per step of a ``lax.map`` (per device with ``shards``); ``None``: one ``vmap``.
      shards: split each step's seeds across devices.
      axis: where the seed index goes: 0 gives ``(c, r)``, 1 gives ``(r, c)``.

    Returns:
      The stacked products and ``apply``'s aux.
    """
    c = seeds.shape[0]
    per = shards.count if shards is not None else 1
    if chunk_size is None or chunk_size * per >= c:
        return sharded_vmap(apply, seeds, shards, out_axes=(axis, None))
    if per > 1:  # each device its own rows of the products (sharded_chunks)
        out, aux = sharded_chunks(apply, c, seeds, chunk_size, shards, aux=True)
        return (out if axis == 0 else out.T), aux
    k = chunk_size
    steps = -(-c // k)
    if steps * k > c:  # zero seeds give zero products, dropped below
        seeds = jnp.concatenate([seeds, jnp.zeros((steps * k - c, seeds.shape[1]), seeds.dtype)])
    out, aux = jax.lax.map(lambda s: jax.vmap(apply, out_axes=(axis, None))(s),
                           seeds.reshape(steps, k, seeds.shape[1]))  # (steps, k, r) or (steps, r, k)
    if axis == 0:
        out = out.reshape(steps * k, out.shape[2])[:c]
    else:
        out = jnp.moveaxis(out, 0, 1).reshape(out.shape[1], steps * k)[:, :c]
    return out, jax.tree_util.tree_map(lambda a: a[0], aux)


def compressed_jvps(
    fun: Callable[[jax.Array], tuple[jax.Array, Any]],
    x: jax.Array,
    colors: np.ndarray,
    n_colors: int,
    shards: Shards | None = None,
    chunk_size: int | None = None,
    fold: bool = False,
) -> tuple[jax.Array, Any]:
    """``(J @ S)^T``: one JVP per colour, shape ``(n_colors, m)``, and ``fun``'s aux.

    Args:
      fun: ``(n,) -> ((m,), aux)``.
      x: the point, shape ``(n,)``.
      colors: colour of each column, shape ``(n,)``.
      n_colors: the number of colours (JVPs).
      shards: split the colours across devices.
      chunk_size: at most this many JVPs at a time (see :func:`seed_map`).
      fold: the seeds are plain constants XLA may fold (see :func:`_seeds`).
    """
    seeds = _seeds(colors, n_colors, x.dtype, fold)  # (c, n)
    push = lambda t: jax.jvp(fun, (x,), (t,), has_aux=True)[1:]  # noqa: E731
    return seed_map(push, seeds, chunk_size, shards)  # (c, m): vmap's layout, no transpose


def compressed_vjps(
    fun: Callable[[jax.Array], tuple[jax.Array, Any]],
    x: jax.Array,
    colors: np.ndarray,
    n_colors: int,
    shards: Shards | None = None,
    chunk_size: int | None = None,
    fold: bool = False,
) -> tuple[jax.Array, Any]:
    """``S^T J``: one VJP per colour of the rows, shape ``(n_colors, n)``, and ``fun``'s aux.

    Arguments as :func:`compressed_jvps`, ``colors`` the colour of each row (shape ``(m,)``).
    """
    y, pullback, aux = jax.vjp(fun, x, has_aux=True)
    seeds = _seeds(colors, n_colors, y.dtype, fold)  # (c, m)
    return seed_map(lambda c: (pullback(c)[0], None), seeds, chunk_size, shards)[0], aux  # (c, n)


def compressed_dense(compressed: jax.Array, colors: np.ndarray, mode: str, rows: tuple[int, int],
                     cols: tuple[int, int], mask=None, dtype=None) -> jax.Array:
    """The block ``J[r0:r1, c0:c1]`` of a Jacobian, dense, read off its compressed matrix.

    Every entry of the block is its colour's product (``fwd``: ``compressed[colors[j], i]``,
    ``compressed`` of shape ``(c, m)``; ``rev``: ``compressed[colors[i], j]``, shape ``(c, n)``):
    one gather of whole rows (as many indices as columns or rows, not as entries) and, where
    same-coloured columns (rows) share a row (column) outside the pattern, one select against the
    block's pattern ``mask`` (``(r1 - r0, c1 - c0)`` booleans). The gather-and-scatter of the
    entries that :func:`from_entries` would do writes the same values and compiles slower.
    """
    (r0, r1), (c0, c1) = rows, cols
    if mode == "fwd":
        full = take_rows(compressed[:, r0:r1], colors[c0:c1]).T  # (r, c)
    else:
        full = take_rows(compressed[:, c0:c1], colors[r0:r1])
    dtype = dtype or full.dtype
    if jax.numpy.iscomplexobj(full) and not jax.numpy.issubdtype(dtype, jax.numpy.complexfloating):
        full = jax.numpy.real(full)  # a real output beside complex ones: its imaginary part is exactly zero
    full = full.astype(dtype)
    return full if mask is None else jax.numpy.where(mask, full, jax.numpy.zeros((), full.dtype))


def compressed_forward(
    fun: Callable[[jax.Array], jax.Array],
    x: jax.Array,
    colors: np.ndarray,
    n_colors: int,
    rows: np.ndarray,
    cols: np.ndarray,
    shards: Shards | None = None,
    chunk_size: int | None = None,
    fold: bool = False,
) -> jax.Array:
    """The nonzeros ``J[rows, cols]`` of a flat ``fun``'s Jacobian, by column colouring.

    Args:
      fun: ``(n,) -> ((m,), aux)``.
      x: the point, shape ``(n,)``.
      colors: colour of each column, shape ``(n,)``.
      n_colors: the number of colours (JVPs).
      rows, cols: the nonzeros to extract.
      shards: split the colours across devices.
      chunk_size: at most this many JVPs at a time.
      fold: the seeds are plain constants XLA may fold (see :func:`_seeds`).

    Returns:
      ``(values, aux)``: the values, shape ``(len(rows),)``, and ``fun``'s aux.
    """
    compressed, aux = compressed_jvps(fun, x, colors, n_colors, shards, chunk_size, fold)
    # One flat gather with precomputed indices decompresses.
    return take(compressed.reshape(-1), colors[cols] * compressed.shape[1] + np.asarray(rows)), aux


def compressed_reverse(
    fun: Callable[[jax.Array], jax.Array],
    x: jax.Array,
    colors: np.ndarray,
    n_colors: int,
    rows: np.ndarray,
    cols: np.ndarray,
    shards: Shards | None = None,
    chunk_size: int | None = None,
    fold: bool = False,
) -> jax.Array:
    """The nonzeros ``J[rows, cols]`` of a flat ``fun``'s Jacobian, by row colouring.

    Args:
      fun: ``(n,) -> ((m,), aux)``.
      x: the point, shape ``(n,)``.
      colors: colour of each row, shape ``(m,)``.
      n_colors: the number of colours (VJPs).
      rows, cols: the nonzeros to extract.
      shards: split the colours across devices.
      chunk_size: at most this many VJPs at a time.
      fold: the seeds are plain constants XLA may fold (see :func:`_seeds`).

    Returns:
      ``(values, aux)``: the values, shape ``(len(rows),)``, and ``fun``'s aux.
    """
    compressed, aux = compressed_vjps(fun, x, colors, n_colors, shards, chunk_size, fold)  # (c, n)
    return take(compressed.reshape(-1), colors[rows] * x.shape[0] + np.asarray(cols)), aux
