"""Apply a linear map to every standard basis vector, optionally in chunks."""

from collections.abc import Callable

import jax
import jax.numpy as jnp


def _one_hot_rows(start: jax.Array | int, count: int, size: int, dtype) -> jax.Array:
    """Rows ``start, ..., start + count - 1`` of the ``size x size`` identity."""
    rows = start + jnp.arange(count)
    return (rows[:, None] == jnp.arange(size)[None, :]).astype(dtype)


def basis_map(
    apply: Callable[[jax.Array], jax.Array],
    size: int,
    dtype,
    chunk_size: int | None = None,
    axis: int = 0,
) -> jax.Array:
    """Stack ``apply(e_i)`` for the standard basis vectors ``e_0, ..., e_{size-1}``.

    Args:
      apply: a linear map from shape ``(size,)`` to a 1-D array of shape ``(r,)``.
      size: the length of the basis vectors.
      dtype: the dtype of the basis vectors.
      chunk_size: push at most this many basis vectors through ``apply`` at a
        time, so that the working memory scales with ``chunk_size`` instead of
        ``size``; ``None`` pushes all of them in one ``vmap``.
      axis: where the basis index goes in the result: 0 gives ``(size, r)``,
        1 gives ``(r, size)``.

    Returns:
      The stacked results, ``apply(e_i)`` at index ``i`` along ``axis``.
    """
    if chunk_size is None or chunk_size >= size:
        return jax.vmap(apply, out_axes=axis)(jnp.eye(size, dtype=dtype))

    k = chunk_size
    probe = jax.eval_shape(apply, jax.ShapeDtypeStruct((size,), dtype))
    shape = list(probe.shape)
    shape.insert(axis, size)

    def body(i, out):
        # The last chunk is shifted back to end at `size` rather than padded:
        # it recomputes a few columns but every step pushes exactly k vectors,
        # and the result is written in place into the loop-carried buffer.
        start = jnp.minimum(i * k, size - k)
        block = jax.vmap(apply, out_axes=axis)(_one_hot_rows(start, k, size, dtype))
        return jax.lax.dynamic_update_slice_in_dim(out, block, start, axis)

    out = jnp.zeros(shape, probe.dtype)
    return jax.lax.fori_loop(0, -(-size // k), body, out)
