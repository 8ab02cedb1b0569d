"""Structured Jacobians: what the structured sweeps carry instead of dense matrices.

A value ``v`` of shape ``S`` (size ``s``) carries, in the forward sweep, its
Jacobian with respect to the flat input ``x`` (an ``s x n`` matrix; dense
arrays have shape ``S + (n,)``, as ``jax.jacfwd`` lays them out), and in the
reverse sweep the Jacobian of the flat output ``y`` with respect to it (an
``m x s`` matrix; dense arrays have shape ``(m,) + S``, as ``jax.jacrev``).
Either is one of:

- ``None``: zero (``v`` does not depend on ``x``, or ``y`` not on ``v``);
- :class:`Sel`: a scaled selection. Every element of ``v`` owns one line of
  the matrix (its row forward, its column in reverse) with at most one
  nonzero, ``scale[j]`` at position ``idx[j]`` (``idx[j] == -1``: the line is
  zero). The identity, diagonals (the book's elementwise Jacobians, (5.58)),
  permutations, broadcasts, slices, pads and gathers with constant indices
  are all selections; ``scale=None`` means ones. ``idx`` lives on the host,
  so composing selections costs nothing at run time;
- a dense ``jax.Array``.

The operations here never materialise a selection unless they must
(:func:`densify`), so the identity seed of a forward sweep never meets a
matrix product: ``W @ I`` is just ``W``.
"""

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np


@dataclass(frozen=True)
class Sel:
    """A scaled selection (see the module docstring).

    Attributes:
      idx: host integer array of the value's shape; entries in ``[0, other)``
        or ``-1`` (a zero line).
      scale: array of the value's shape, or ``None`` for ones.
    """

    idx: np.ndarray
    scale: jax.Array | None = None

    def is_identity(self, other: int) -> bool:
        """``idx`` is ``0, 1, ..., other - 1`` (row-major): the matrix is square and diagonal."""
        return self.idx.size == other and bool(np.array_equal(self.idx.reshape(-1), np.arange(other)))


def identity(shape, other: int | None = None) -> Sel:
    """The identity selection for a value of ``shape`` (``other`` defaults to its size)."""
    size = int(np.prod(shape, dtype=np.int64))
    return Sel(np.arange(size, dtype=np.int64).reshape(shape))


def kind(a) -> str:
    """``"zero"``, ``"selection"`` or ``"dense"``."""
    return "zero" if a is None else ("selection" if isinstance(a, Sel) else "dense")


def _scales(a: Sel, shape, dtype) -> jax.Array:
    return jnp.ones(shape, dtype) if a.scale is None else a.scale.astype(dtype)


def densify(a, shape, other: int, fwd: bool, dtype) -> jax.Array:
    """The dense array of ``a`` for a value of ``shape``.

    Forward: ``shape + (other,)``; reverse: ``(other,) + shape``.
    """
    full = tuple(shape) + (other,) if fwd else (other,) + tuple(shape)
    if a is None:
        return jnp.zeros(full, dtype)
    if not isinstance(a, Sel):
        return a.astype(dtype)
    s = int(np.prod(shape, dtype=np.int64))
    if a.is_identity(other):
        eye = jnp.eye(other, dtype=dtype)
        mat = eye if a.scale is None else eye * a.scale.reshape(-1).astype(dtype)[:, None]
        return mat.reshape(full) if fwd else mat.T.reshape(full)
    idx = a.idx.reshape(-1)
    safe = np.where(idx < 0, other, idx)  # dropped by the scatter below
    vals = _scales(a, shape, dtype).reshape(-1)
    rows = np.arange(s)
    if fwd:
        return jnp.zeros((s, other), dtype).at[rows, safe].add(vals, mode="drop").reshape(full)
    return jnp.zeros((other, s), dtype).at[safe, rows].add(vals, mode="drop").reshape(full)


def add(a, b, shape, other: int, fwd: bool, dtype):
    """``a + b`` for two structures of the same value; selections stay selections where their ``idx`` agree."""
    if a is None:
        return b
    if b is None:
        return a
    if isinstance(a, Sel) and isinstance(b, Sel):
        if np.array_equal(a.idx, b.idx):
            if a.scale is None and b.scale is None:
                return Sel(a.idx, jnp.full(shape, 2, dtype))
            return Sel(a.idx, _scales(a, shape, dtype) + _scales(b, shape, dtype))
        used_a, used_b = a.idx >= 0, b.idx >= 0
        if not (used_a & used_b).any():  # disjoint lines (x[:k] and x[k:] used apart): still one selection
            idx = np.where(used_a, a.idx, b.idx)
            if a.scale is None and b.scale is None:
                return Sel(idx)
            return Sel(idx, jnp.where(used_a, _scales(a, shape, dtype), _scales(b, shape, dtype)))
        return densify(a, shape, other, fwd, dtype) + densify(b, shape, other, fwd, dtype)
    if isinstance(b, Sel):
        a, b = b, a
    if isinstance(a, Sel):  # scatter the selection into the dense one
        s = int(np.prod(shape, dtype=np.int64))
        idx = a.idx.reshape(-1)
        safe = np.where(idx < 0, other, idx)
        vals = _scales(a, shape, b.dtype).reshape(-1)
        rows = np.arange(s)
        if fwd:
            flat = b.reshape(s, other).at[rows, safe].add(vals, mode="drop")
        else:
            flat = b.reshape(other, s).at[safe, rows].add(vals, mode="drop")
        return flat.reshape(b.shape)
    return a + b


def scale(a, d, fwd: bool, dtype):
    """``diag(d) J`` forward or ``G diag(d)`` in reverse: ``d`` has the value's shape, or is a Python number."""
    if a is None:
        return None
    number = isinstance(d, int | float)
    if number and d == 1:
        return a
    if isinstance(a, Sel):
        if a.scale is not None:
            return Sel(a.idx, a.scale * d)
        return Sel(a.idx, jnp.full(a.idx.shape, d, dtype) if number else d)
    if number:
        return a * d
    return a * d[..., None] if fwd else a * d[None]


def _to(x: jax.Array, dtype) -> jax.Array:
    # Complex to real keeps the real part (the adjoint of a real-to-complex embedding), explicitly.
    if jnp.iscomplexobj(x) and not jnp.issubdtype(dtype, jnp.complexfloating):
        x = jnp.real(x)
    return x.astype(dtype)


def cast(a, dtype):
    """``a`` in another (floating) dtype."""
    if a is None:
        return None
    if isinstance(a, Sel):
        return a if a.scale is None else Sel(a.idx, _to(a.scale, dtype))
    return _to(a, dtype)


def select_forward(parts, pi: np.ndarray, dtype):
    """Forward through a selection ``y[i] = cat(parts)[pi[i]]`` (``pi[i] == -1``: a constant).

    ``parts`` are the data operands' structures (all ``None`` or :class:`Sel`).
    """
    idx_cat = np.concatenate([p.idx.reshape(-1) if p is not None else np.full(size, -1) for p, size in parts])
    ok = pi >= 0
    safe = np.where(ok, pi, 0)
    idx = np.where(ok, idx_cat[safe], -1)
    if (idx < 0).all():
        return None
    if all(p is None or p.scale is None for p, _ in parts):
        return Sel(idx)
    vals = jnp.concatenate([
        (jnp.ones(size, dtype) if p.scale is None else p.scale.reshape(-1).astype(dtype))
        if p is not None else jnp.zeros(size, dtype)
        for p, size in parts
    ])
    return Sel(idx, jnp.take(vals, jnp.asarray(safe.reshape(-1))).reshape(pi.shape))


def select_reverse(g: Sel, pi: np.ndarray, offset: int, size: int, shape):
    """Reverse through the same selection: the adjoint of data operand ``[offset, offset + size)``.

    ``None`` when two used entries of ``y`` read the same operand element (a
    broadcast): the adjoint is then a sum of columns, not a selection.
    """
    flat_pi = pi.reshape(-1)
    used = (flat_pi >= offset) & (flat_pi < offset + size) & (g.idx.reshape(-1) >= 0)
    src = np.nonzero(used)[0]
    dst = flat_pi[src] - offset
    if np.bincount(dst, minlength=size).max(initial=0) > 1:
        return None
    if src.size == 0:
        return "zero"
    inv = np.full(size, -1, np.int64)
    inv[dst] = src
    has = inv >= 0
    idx = np.where(has, g.idx.reshape(-1)[np.where(has, inv, 0)], -1).reshape(shape)
    if g.scale is None:
        return Sel(idx)
    vals = jnp.take(g.scale.reshape(-1), jnp.asarray(np.where(has, inv, 0)))
    return Sel(idx, vals.reshape(shape))


def join_outputs(gs, avals) -> Sel:
    """Adjoint selections of several outputs (``None``: zero) as one over their concatenated elements."""
    idx = np.concatenate([g.idx.reshape(-1) if g is not None else np.full(math.prod(a.shape), -1)
                          for g, a in zip(gs, avals, strict=True)])
    if all(g is None or g.scale is None for g in gs):
        return Sel(idx)
    dtype = avals[0].dtype
    scale = jnp.concatenate([
        (jnp.ones(math.prod(a.shape), dtype) if g.scale is None else g.scale.reshape(-1).astype(dtype))
        if g is not None else jnp.zeros(math.prod(a.shape), dtype)
        for g, a in zip(gs, avals, strict=True)
    ])
    return Sel(idx, scale)


def collect(mat: jax.Array, idx: np.ndarray, other: int, axis: int) -> jax.Array:
    """Sum the lines of ``mat`` along ``axis`` into ``other`` lines: line ``j`` goes to ``idx[j]`` (``-1``: dropped).

    The identity is ``mat`` itself, and a chunk's seed (``idx = j mod other``)
    a slice-and-add of the chunk-sized blocks; anything else a scatter.
    """
    s = idx.size
    if s == other and np.array_equal(idx, np.arange(s)):
        return mat
    if -(-s // other) <= 64 and np.array_equal(idx, np.arange(s) % other):
        # Blocks of `other` lines; the masked seed left one of them nonzero, the sum keeps it.
        out = None
        for start in range(0, s, other):
            block = jax.lax.slice_in_dim(mat, start, min(start + other, s), axis=axis)
            if block.shape[axis] < other:
                pad = [(0, 0), (0, 0)]
                pad[axis] = (0, other - block.shape[axis])
                block = jnp.pad(block, pad)
            out = block if out is None else out + block
        return out
    safe = np.where(idx < 0, other, idx)
    if axis == 0:
        return jnp.zeros((other, mat.shape[1]), mat.dtype).at[safe].add(mat, mode="drop")
    return jnp.zeros((other, mat.shape[0]), mat.dtype).at[safe].add(mat.T, mode="drop").T


def broadcast(a, shape, out):
    """Forward: the Jacobian of ``v`` broadcast from ``shape`` to ``out`` (size-1 axes or a scalar)."""
    if a is None or tuple(shape) == tuple(out):
        return a
    if isinstance(a, Sel):
        idx = np.broadcast_to(a.idx, out)
        return Sel(idx, None if a.scale is None else jnp.broadcast_to(a.scale, out))
    return jnp.broadcast_to(a.reshape((1,) * (len(out) - len(shape)) + a.shape), tuple(out) + a.shape[-1:])


def unbroadcast(g, out, shape, other: int):
    """Reverse: the adjoint of ``v`` from that of its broadcast to ``out`` (a sum over the broadcast axes)."""
    if g is None or tuple(shape) == tuple(out):
        return g
    size = math.prod(shape)
    if isinstance(g, Sel):
        pi = np.broadcast_to(np.arange(size).reshape(shape), out)
        a = select_reverse(g, pi, 0, size, tuple(shape))
        if isinstance(a, Sel):
            return a
        if isinstance(a, str):
            return None
        g = densify(g, out, other, False, g.scale.dtype if g.scale is not None else jnp.float32)
    padded = (1,) * (len(out) - len(shape)) + tuple(shape)
    axes = tuple(1 + d for d, (a, b) in enumerate(zip(padded, out, strict=True)) if a == 1 and b != 1)
    return jnp.sum(g, axis=axes, keepdims=True).reshape((other,) + tuple(shape))
