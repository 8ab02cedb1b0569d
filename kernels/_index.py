"""Reads and writes of a flat array at indices known on the host (a decompression's gather, a result's scatter).

``x.at[i].get()`` and ``.at[i].set()`` cannot know that host indices are in range, sorted
or unique: they wrap negatives (a compare and select per index) and XLA compiles a
general scatter, which costs a compressed Jacobian's first call more than its passes
(a 4096-entry diagonal into a 4096 x 4096 result: 32 ms to compile, 21 ms without).
"""

import numpy as np
from jax import lax

_GATHER = lax.GatherDimensionNumbers(offset_dims=(), collapsed_slice_dims=(0,), start_index_map=(0,))
_SCATTER = lax.ScatterDimensionNumbers(update_window_dims=(), inserted_window_dims=(0,),
                                       scatter_dims_to_operand_dims=(0,))


def _facts(index) -> tuple[object, bool, bool]:
    """The index to use (a compact host array, or the traced one), whether it is known sorted, and unique."""
    if isinstance(index, list | tuple):
        index = np.asarray(index)
    if not isinstance(index, np.ndarray):
        return index, False, False
    if index.ndim != 1 or (index.size and index.dtype.kind not in "iu"):
        raise TypeError(f"kernels: expected a 1-D integer index, got {index.dtype}{list(index.shape)}")
    if not index.size or (index.dtype != np.int32 and int(index.max()) < 2**31):
        index = index.astype(np.int32)  # a smaller constant, and no int64 where x64 is off
    d = np.diff(index)
    return index, bool(np.all(d >= 0)), bool(np.all(d > 0))


def take(flat, index):
    """``flat[index]`` of a 1-D array, for indices in ``[0, flat.size)`` (not checked).

    Args:
      flat: shape ``(size,)``.
      index: integer indices, shape ``(k,)``: a NumPy array or list (its order seen on the
        host: a contiguous run is a slice) or a jax array.

    Returns:
      Shape ``(k,)``.
    """
    index, ordered, unique = _facts(index)
    if not index.shape[0] or not flat.shape[0]:  # nothing to take (JAX < 0.10 refuses a gather from an empty array)
        return lax.full(index.shape, 0, flat.dtype)
    if unique and index.size and int(index[-1]) - int(index[0]) == index.size - 1:
        return lax.slice_in_dim(flat, int(index[0]), int(index[0]) + index.size)  # a run: no gather at all
    return lax.gather(flat, index[:, None], _GATHER, (1,), indices_are_sorted=ordered, unique_indices=unique,
                      mode=lax.GatherScatterMode.PROMISE_IN_BOUNDS)


def take_rows(a, index):
    """``a[index]`` along the first axis of a 2-D array, for host indices in range (not checked).

    Args:
      a: shape ``(r, k)``.
      index: integer indices into ``[0, r)``, shape ``(s,)``, a NumPy array.

    Returns:
      Shape ``(s, k)``.
    """
    index, ordered, unique = _facts(index)
    dims = lax.GatherDimensionNumbers(offset_dims=(1,), collapsed_slice_dims=(0,), start_index_map=(0,))
    return lax.gather(a, index[:, None], dims, (1, a.shape[1]), indices_are_sorted=ordered, unique_indices=unique,
                      mode=lax.GatherScatterMode.PROMISE_IN_BOUNDS)


def place(size: int, index, values, dtype=None):
    """A 1-D array of ``size`` zeros with ``values`` written at ``index`` (distinct indices in range).

    Args:
      size: the result's length.
      index: shape ``(k,)``, distinct indices in ``[0, size)`` (a NumPy array or traced).
      values: shape ``(k,)``.
      dtype: the result's dtype (default ``values``').
    """
    dtype = dtype or values.dtype
    values = values.astype(dtype)
    index, ordered, unique = _facts(index)
    if unique and index.size == size and (size == 0 or int(index[0]) == 0):
        return values  # every entry written, in order
    zeros = lax.full((size,), 0, dtype)
    if not index.shape[0]:  # nothing written (XLA's CPU backend of JAX 0.8 crashed compiling an empty scatter)
        return zeros
    return lax.scatter(zeros, index[:, None], values, _SCATTER, indices_are_sorted=ordered, unique_indices=True,
                       mode=lax.GatherScatterMode.PROMISE_IN_BOUNDS)


def from_entries(shape: tuple[int, int], rows: np.ndarray, cols: np.ndarray, values, dtype=None):
    """The ``(m, n)`` matrix with ``values`` at the host entries ``(rows, cols)`` (distinct, in range), zero elsewhere.

    Where every row holds at most one entry (a diagonal, a permutation, an elementwise
    map's Jacobian) the matrix is one select against a column iota, the single fused pass
    that ``jax.jacfwd``'s program is, not a fill of zeros and a scatter (which compile as
    two loops); otherwise a scatter at flat indices (:func:`place`).
    """
    m, n = shape
    dtype = dtype or values.dtype
    rows, cols = np.asarray(rows, np.int64), np.asarray(cols, np.int64)
    if rows.size and np.unique(rows).size == rows.size:
        col = np.full(m, -1, np.int64)
        col[rows] = cols
        per_row = place(m, rows, values, dtype)  # the values in row order (no scatter where every row has one)
        hit = lax.broadcasted_iota(np.int32, (m, n), 1) == col.astype(np.int32)[:, None]
        return lax.select(hit, lax.broadcast_in_dim(per_row, (m, n), (0,)), lax.full((m, n), 0, dtype))
    if m * n >= 2**31:  # flat indices would need int64
        return lax.full((m, n), 0, dtype).at[rows, cols].set(values.astype(dtype))
    return place(m * n, rows * n + cols, values, dtype).reshape(m, n)
