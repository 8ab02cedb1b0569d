"""The values the forward Laplacian carries, and the traced operations on their column blocks.

Each intermediate ``v`` of shape ``S`` carries its primal and one *block*
``t`` of shape ``(W,) + S``: ``K`` first-derivative columns (``dv/dx`` over the
layout's inputs, see :mod:`._layout`) followed by the second-order part, whose
form depends on what is computed:

- ``"trace"``: one column, the Laplacian so far ``sum_j d^2 v / d x_j^2``
  (``W = K + 1``);
- ``"diag"``: ``K`` columns, ``d^2 v / d x_j^2`` per input of the layout
  (``W = 2 K``).

Keeping both parts in one array lets a linear operation (a matrix product, a
reshape, a sum) act on all of them at once: one product with ``K + 1``
columns instead of two.
"""

import jax.numpy as jnp
import numpy as np

from . import _layout


class TV:
    """A value in the sweep: its primal, its block (``None``: constant in ``x``) and its layout."""

    __slots__ = ("primal", "t", "idx")

    def __init__(self, primal, t=None, idx=None):
        self.primal = primal
        self.t = t
        self.idx = idx

    @property
    def jac(self):
        """The block, under the name the structured sweeps' selection maps read."""
        return self.t


def width(lat, k: int) -> int:
    """``W``: the block's columns for ``k`` first-derivative columns."""
    return k + 1 if lat.kind == "trace" else 2 * k


def cols(lat, v) -> int:
    """``K`` of a value."""
    return lat.cols if v.idx is None else int(v.idx.shape[-1])


def first(lat, v, t=None):
    """The first-derivative columns ``(K,) + S`` of a value's block."""
    t = v.t if t is None else t
    return t[: cols(lat, v)]


def products(lat, a, b):
    """``sum_j a_j b_j`` (``"trace"``, shape ``(1,) + S``) or ``a_j b_j`` per column (``"diag"``)."""
    p = a * b
    return jnp.sum(p, axis=0, keepdims=True) if lat.kind == "trace" else p


def place(lat, s, k: int):
    """Second-order contributions ``s`` (from :func:`products`) as a block with ``k`` first-derivative columns."""
    return jnp.pad(s, [(k, 0)] + [(0, 0)] * (s.ndim - 1))


def broadcast(t, shape, out_shape):
    """NumPy broadcasting of a block's element axes from ``shape`` to ``out_shape``."""
    if tuple(shape) == tuple(out_shape):
        return t
    lead = (1,) * (len(out_shape) - len(shape))
    return jnp.broadcast_to(t.reshape(t.shape[:1] + lead + tuple(shape)), t.shape[:1] + tuple(out_shape))


def gather(lat, t, pos: np.ndarray, k_src: int):
    """Move a block's columns: destination column ``s`` of element ``e`` takes source column ``pos[e, s]``.

    ``pos`` (shape ``S + (K',)``, from :func:`._layout.positions`) holds ``k_src``
    where the destination input is not stored in the source (a zero column).
    The second-order part follows its columns (``"diag"``) or is kept (``"trace"``).
    """
    w_src = width(lat, k_src)
    valid = pos < k_src
    j_pos = np.where(valid, pos, w_src)
    if lat.kind == "trace":
        second = np.full(pos.shape[:-1] + (1,), k_src)
    else:
        second = np.where(valid, k_src + pos, w_src)
    full = np.moveaxis(np.concatenate([j_pos, second], axis=-1), -1, 0).astype(np.int32)
    return jnp.take_along_axis(t, jnp.asarray(full), axis=0, mode="fill", fill_value=0)


def relayout(lat, v, shape, dst):
    """``v``'s block (broadcast to ``shape``) in the layout ``dst`` (a superset of ``v``'s; ``None``: dense)."""
    src = v.idx
    t = broadcast(v.t, np.shape(v.primal), shape)
    if src is None:
        if dst is not None:
            raise AssertionError("a dense block cannot move to a sparse layout")
        return t
    src = _layout.broadcast(src, np.shape(v.primal), shape)
    pos = _layout.positions(src, dst, lat.n)
    if pos is None:
        return t
    return gather(lat, t, pos, src.shape[-1])


def compress(lat, t, shape, dst):
    """A dense block (``lat.cols == n`` columns) restricted to the sparse layout ``dst``."""
    if dst is None:
        return t
    pos = np.where(dst < lat.n, dst, lat.n)
    return gather(lat, t, pos, lat.n)


def seed(lat, x, sparse: bool, start=None):
    """The block of the input vector ``x`` (shape ``(n,)``): the identity, or one column per input (sparse).

    With ``start`` (a traced offset), the dense identity's columns ``start .. start + lat.cols``
    (a chunk; columns past ``n`` are zero).
    """
    n = x.shape[0]
    if sparse:
        ones = jnp.ones((1, n), x.dtype)
        return jnp.concatenate([ones, jnp.zeros((width(lat, 1) - 1, n), x.dtype)]), _layout.seed(n)
    k = lat.cols
    if start is None:
        eye = jnp.eye(k, n, dtype=x.dtype)
    else:
        eye = (jnp.arange(n)[None, :] == (start + jnp.arange(k))[:, None]).astype(x.dtype)
    return jnp.concatenate([eye, jnp.zeros((width(lat, k) - k, n), x.dtype)]), None


def zeros(lat, k: int, shape, dtype):
    """An all-zero block (a value that does not depend on ``x`` where one that does is expected)."""
    return jnp.zeros((width(lat, k),) + tuple(shape), dtype)


def cast(t, dtype):
    """The block in ``dtype`` (a conversion, or a complex result of real operands)."""
    return t if t.dtype == dtype else t.astype(dtype)


__all__ = ["TV", "broadcast", "cast", "cols", "compress", "first", "gather", "place", "products", "relayout",
           "seed", "width", "zeros"]
