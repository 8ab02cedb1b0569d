"""Apply a linear map to every standard basis vector, optionally in chunks."""

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp


def opaque(seeds):
    """Seeds (or any constant next to a function's closed-over arrays) that XLA will not constant-fold.

    A function's closed-over weights are constants of the compiled program; a
    constant seed stack (an identity, colour seeds) multiplied by them is then a
    constant expression, and XLA's constant folding evaluates it at compile time
    in its slow interpreter (an ``n = 1024`` MLP: 20+ s, against 0.2 s for the
    same program with the product left to run time). An optimization barrier
    keeps the seeds out of folding; the products run compiled.
    """
    return jax.lax.optimization_barrier(jax.tree_util.tree_map(jnp.asarray, seeds))  # an array or a pytree


class Shards(NamedTuple):
    """How to split a stack of basis vectors (or seeds) across devices.

    ``count`` devices share the stack's leading axis; ``constrain(a, axis=0)``
    pins an array's ``axis`` to them (``jax.lax.with_sharding_constraint``) when
    it divides evenly. ``mesh``: the ``jax.sharding.Mesh`` they belong to, if any.
    """

    count: int
    constrain: Callable[[jax.Array], jax.Array]
    mesh: object = None


def sharded_vmap(apply: Callable, seeds: jax.Array, shards: "Shards | None", out_axes=0):
    """``vmap(apply)(seeds)``, the seeds split across devices (padded with zero rows to a multiple).

    The padding rows are dropped from the results; the shapes are static, so
    nothing recompiles per call.
    """
    if shards is None or shards.count <= 1:
        return jax.vmap(apply, out_axes=out_axes)(seeds)
    k = seeds.shape[0]
    pad = -k % shards.count
    if pad:
        seeds = jnp.concatenate([seeds, jnp.zeros((pad,) + seeds.shape[1:], seeds.dtype)])
    out = jax.vmap(apply, out_axes=out_axes)(shards.constrain(seeds))
    if not pad:
        return out

    def trim(a, ax):
        return a if ax is None else jax.lax.slice_in_dim(a, 0, k, axis=ax % a.ndim)

    if isinstance(out_axes, tuple):
        return tuple(jax.tree_util.tree_map(lambda a, ax=ax: trim(a, ax), o) for o, ax in zip(out, out_axes))
    return jax.tree_util.tree_map(lambda a: trim(a, out_axes), out)


def sharded_chunks(apply: Callable, count: int, rows, chunk_size: int, shards: Shards, aux: bool = False):
    """``vmap(apply)`` over ``count`` seed rows, ``chunk_size`` per device at a time, each device on its own rows.

    Device ``d`` pushes rows ``d * S .. d * S + S - 1`` (``S`` = ``count / D`` rounded up to whole chunks;
    rows past ``count`` are zero seeds, their results dropped) and writes them into its own block of a
    result sharded along its leading axis: a device holds ``1/D`` of the stacked results, not all of them
    (a loop writing chunks of every device into one buffer replicated it on each: more memory than no chunks).

    Args:
      apply: ``(n,) -> (r...)``, or with ``aux`` ``(n,) -> ((r...), aux)`` (``aux`` independent of the seed).
      count: the number of seed rows.
      rows: the seeds, ``(count, n)`` (split across the devices as their rows are), or
        ``rows(g) -> (len(g), n)``: the seed rows at global indices ``g`` (int32, some ``>= count``:
        zero rows there), made where they are pushed (basis vectors: no identity held anywhere).
      chunk_size: seed rows per device per step.
      shards: the devices (more than one).

    Returns:
      The results stacked along axis 0, ``(count, r...)`` (and ``aux``).
    """
    d = shards.count
    chunk = max(1, min(chunk_size, -(-count // d)))
    steps = -(-count // (d * chunk))
    per = steps * chunk  # rows per device
    fn = apply if aux else (lambda s: (apply(s), None))
    if callable(rows):
        offsets = (jnp.arange(d, dtype=jnp.int32) * per)[:, None] + jnp.arange(chunk, dtype=jnp.int32)[None, :]

        def seeds_at(t):  # step t's rows of every device, device-major
            return rows((offsets + t * chunk).reshape(-1))
    else:
        held = jnp.concatenate([rows, jnp.zeros((d * per - count,) + rows.shape[1:], rows.dtype)])
        held = shards.constrain(held.reshape((d, per) + rows.shape[1:]))  # device d holds its own rows

        def seeds_at(t):
            return jax.lax.dynamic_slice_in_dim(held, t * chunk, chunk, axis=1).reshape((d * chunk,) + held.shape[2:])

    def step(t):
        seeds = shards.constrain(seeds_at(t))  # (d * chunk, n)
        out, a = jax.vmap(fn, out_axes=(0, None))(seeds)
        return shards.constrain(out.reshape((d, chunk) + out.shape[1:])), a

    shape, aux_shape = jax.eval_shape(lambda: step(jnp.int32(0)))

    def body(t, carry):
        out, _ = carry
        block, a = step(t)
        return shards.constrain(jax.lax.dynamic_update_slice_in_dim(out, block, t * chunk, axis=1)), a

    out0 = shards.constrain(jnp.zeros((d, per) + shape.shape[2:], shape.dtype))
    aux0 = jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), aux_shape)
    out, a = jax.lax.fori_loop(0, steps, body, (out0, aux0))
    out = out.reshape((d * per,) + out.shape[2:])[:count]
    return (out, a) if aux else out


def _one_hot(g: jax.Array, size: int, dtype) -> jax.Array:
    """Rows ``g`` of the ``size x size`` identity (zero rows where ``g >= size``)."""
    return (g[:, None] == jnp.arange(size, dtype=g.dtype)[None, :]).astype(dtype)


def _stack(apply: Callable, rows: jax.Array, shards: "Shards | None", axis: int) -> jax.Array:
    """``vmap(apply)(rows)``; a single row without ``vmap``.

    ``chunk_size=1`` then needs no batching rule: a ``pure_callback`` without
    ``vmap_method`` or a ``custom_vmap`` whose rule refuses still works, one
    basis vector per step (as torch.func's ``chunk_size=1``).
    """
    if rows.shape[0] == 1 and (shards is None or shards.count <= 1):
        return jnp.expand_dims(apply(rows[0]), axis)
    return sharded_vmap(apply, rows, shards, out_axes=axis)


def basis_map(
    apply: Callable[[jax.Array], jax.Array],
    size: int,
    dtype,
    chunk_size: int | None = None,
    axis: int = 0,
    shards: Shards | None = None,
) -> jax.Array:
    """Stack ``apply(e_i)`` for the standard basis vectors ``e_0, ..., e_{size-1}``.

    Args:
      apply: a linear map from shape ``(size,)`` to a 1-D array of shape ``(r,)``.
      size: the length of the basis vectors.
      dtype: the dtype of the basis vectors.
      chunk_size: push at most this many basis vectors through ``apply`` at a
        time, so that the working memory scales with ``chunk_size`` instead of
        ``size``; ``None`` pushes all of them in one ``vmap``; 1 pushes them
        one by one without ``vmap`` (no batching rule needed).
      axis: where the basis index goes in the result: 0 gives ``(size, r)``,
        1 gives ``(r, size)``.
      shards: split the basis vectors across devices (``chunk_size`` then counts
        vectors per device).

    Returns:
      The stacked results, ``apply(e_i)`` at index ``i`` along ``axis``.
    """
    per = shards.count if shards is not None else 1
    if chunk_size is None or chunk_size * per >= size:
        return _stack(apply, jnp.eye(size, dtype=dtype), shards, axis)
    if per > 1:  # each device its own rows of the result (sharded_chunks)
        out = sharded_chunks(apply, size, lambda g: _one_hot(g, size, dtype), chunk_size, shards)
        return jnp.moveaxis(out, 0, axis)

    k = chunk_size  # (one device here)
    probe = jax.eval_shape(apply, jax.ShapeDtypeStruct((size,), dtype))
    shape = list(probe.shape)
    shape.insert(axis, size)

    def body(i, out):
        # The last chunk is shifted back to end at `size` rather than padded:
        # it recomputes a few columns but every step pushes exactly k vectors,
        # and the result is written in place into the loop-carried buffer.
        start = jnp.minimum(i * k, size - k)
        block = _stack(apply, _one_hot(start + jnp.arange(k), size, dtype), shards, axis)
        return jax.lax.dynamic_update_slice_in_dim(out, block, start, axis)

    out = jnp.zeros(shape, probe.dtype)
    return jax.lax.fori_loop(0, -(-size // k), body, out)
