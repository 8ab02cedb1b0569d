"""One leaf layout: where the leaves of a pytree live in the flat vector ``x`` (or ``y``), and the cuts between them.

Every engine works on the flat problem ``R^n -> R^m`` and gives its results
back per leaf: the numerator-layout block ``out.shape + in.shape`` of each
(output leaf, input leaf) pair (5.58), the basis vectors of one leaf, the
leaf's part of a flat gradient. Leaf ``k`` owns the entries
``[starts[k], starts[k + 1])`` of the flat vector, in row-major order.
"""

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import jax.numpy as jnp
import numpy as np


@dataclass(frozen=True)
class Leaves:
    """The shapes of a pytree's leaves, in flattening order, and their offsets in the flat vector.

    Attributes:
      shapes: one shape per leaf.
    """

    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, leaves: Sequence) -> "Leaves":
        """The layout of arrays or shape structs (anything with ``.shape``, or a Python number)."""
        return cls(tuple(tuple(int(d) for d in np.shape(v)) for v in leaves))

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(math.prod(s) for s in self.shapes)

    @property
    def starts(self) -> tuple[int, ...]:
        """``len(shapes) + 1`` offsets: leaf ``k`` is ``[starts[k], starts[k + 1])``."""
        return (0, *np.cumsum(self.sizes, dtype=np.int64).tolist())

    @property
    def total(self) -> int:
        return sum(self.sizes)

    def spans(self) -> Iterator[tuple[int, int, tuple[int, ...]]]:
        """``(start, stop, shape)`` per leaf."""
        starts = self.starts
        for k, shape in enumerate(self.shapes):
            yield starts[k], starts[k + 1], shape

    def split(self, a, axis: int = 0) -> list:
        """Cut ``a`` (NumPy or JAX) along ``axis`` (of length :attr:`total`) into the leaves.

        Axis ``axis`` of each piece becomes the leaf's shape: ``(..., total, ...)`` ->
        ``(..., *shape, ...)``. A single leaf spanning the axis is only reshaped (no copy).
        """
        axis = axis % a.ndim
        pieces = []
        for start, stop, shape in self.spans():
            part = a
            if stop == start and a.shape[axis]:
                # An empty leaf: a new empty array, not a slice (XLA's CPU compiler aborts the process on
                # an empty slice of a concatenation in some fused programs: "SmallVector unable to grow").
                zeros = np.zeros if isinstance(a, np.ndarray) else jnp.zeros
                pieces.append(zeros(a.shape[:axis] + shape + a.shape[axis + 1 :], a.dtype))
                continue
            if stop - start != a.shape[axis]:
                index = [slice(None)] * a.ndim
                index[axis] = slice(start, stop)
                part = a[tuple(index)]
            pieces.append(part.reshape(a.shape[:axis] + shape + a.shape[axis + 1 :]))
        return pieces

    def basis(self, dtype) -> list:
        """The identity's rows cut per leaf: leaf ``k`` gets ``(total,) + shape`` (its basis vectors' parts)."""
        eye = jnp.eye(self.total, dtype=dtype)
        return self.split(eye, axis=1)


def blocks(jac, out: Leaves, inp: Leaves) -> list[list[Any]]:
    """The flat ``(..., m, n)`` Jacobian cut into ``... + out.shape + in.shape`` blocks, per (output leaf, input leaf).

    Leading axes (a batch of per-example Jacobians) stay in front. Inverse: :func:`join`.
    """
    return [inp.split(row, axis=-1) for row in out.split(jac, axis=jac.ndim - 2)]


def join(cut: Sequence, out: Leaves, inp: Leaves):
    """The blocks of :func:`blocks` back as one NumPy ``(m, n)``.

    ``cut``: the blocks flattened row by row, as ``jax.tree_util.tree_leaves`` of a result's pytree gives them.
    """
    if len(cut) == 1:  # one block: a view, not a copy
        return np.asarray(cut[0]).reshape(out.total, inp.total)
    k = len(inp.shapes)
    return np.concatenate([np.concatenate([np.asarray(blk).reshape(size, w) for blk, w in
                                           zip(cut[i * k : (i + 1) * k], inp.sizes, strict=True)], axis=1)
                           for i, size in enumerate(out.sizes)], axis=0)
