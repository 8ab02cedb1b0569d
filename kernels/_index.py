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


def _facts(index) -> tuple[np.ndarray | None, bool, bool]:
    """The host index (or ``None`` for a traced one), whether it is sorted, and whether unique."""
    if not isinstance(index, np.ndarray):
        return None, False, False
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
    host, ordered, unique = _facts(np.asarray(index) if isinstance(index, list | tuple) else index)
    if host is not None and host.size and unique and int(host[-1]) - int(host[0]) == host.size - 1:
        return lax.slice_in_dim(flat, int(host[0]), int(host[0]) + host.size)  # a run: no gather at all
    index = index if host is None else host
    return lax.gather(flat, index[:, None], _GATHER, (1,), indices_are_sorted=ordered, unique_indices=unique,
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
    host, ordered, unique = _facts(np.asarray(index) if isinstance(index, list | tuple) else index)
    if host is not None and host.size == size and unique and (size == 0 or int(host[0]) == 0):
        return values  # every entry written, in order
    zeros = lax.full((size,), 0, dtype)
    index = index if host is None else host
    return lax.scatter(zeros, index[:, None], values, _SCATTER, indices_are_sorted=ordered, unique_indices=True,
                       mode=lax.GatherScatterMode.PROMISE_IN_BOUNDS)
