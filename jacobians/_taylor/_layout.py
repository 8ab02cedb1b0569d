"""Column layouts of the sparse forward Laplacian, on the host (NumPy, no tracing).

A value of shape ``S`` whose first derivatives are kept sparse carries a
*layout*: an int array ``idx`` of shape ``S + (K,)``, row ``idx[e]`` listing the
inputs that element ``e`` may depend on, sorted, padded at the end with the
sentinel ``n`` (the number of inputs). Column ``k`` of the element's stored
Jacobian holds ``d value[e] / d x[idx[e, k]]``. ``None`` is the dense layout:
column ``j`` is input ``j`` for every element.

Every function here is vectorised over elements: unions of layouts
(``[{0}, {1}] + [{1}, {2}] -> [{0, 1}, {1, 2}]``), unions along reduced axes
and the gather positions that move stored columns from one layout to another.
"""

import math

import numpy as np

DENSE_FRACTION = 0.5  # a layout wider than this fraction of the inputs is kept dense


def width(idx: np.ndarray | None, n: int) -> int:
    """``K``: the stored first-derivative columns per element."""
    return n if idx is None else int(idx.shape[-1])


def seed(n: int) -> np.ndarray:
    """The layout of the input vector ``x`` itself: element ``i`` depends on input ``i``."""
    return np.arange(n, dtype=np.int64)[:, None]


def broadcast(idx: np.ndarray | None, shape, out_shape) -> np.ndarray | None:
    """NumPy broadcasting of a layout from ``shape`` to ``out_shape`` (size-1 axes and scalars)."""
    if idx is None or tuple(shape) == tuple(out_shape):
        return idx
    k = idx.shape[-1]
    lead = (1,) * (len(out_shape) - len(shape))
    return np.broadcast_to(idx.reshape(lead + tuple(shape) + (k,)), tuple(out_shape) + (k,))


def _compact(rows: np.ndarray, n: int) -> np.ndarray | None:
    """Sorted unique entries of each row, padded with ``n``; ``None`` when too wide to pay."""
    if rows.shape[-1] == 0:
        return np.full(rows.shape[:-1] + (1,), n, np.int64)
    r = np.sort(rows, axis=-1)
    dup = np.zeros(r.shape, bool)
    dup[..., 1:] = r[..., 1:] == r[..., :-1]
    r = np.where(dup, n, r)
    r = np.sort(r, axis=-1)
    k = int(np.max(np.sum(r < n, axis=-1), initial=0))
    if k > DENSE_FRACTION * n:
        return None
    return np.ascontiguousarray(r[..., : max(k, 1)])


def union(idxs: list, n: int) -> np.ndarray | None:
    """Element-wise union of same-shaped layouts (``None`` if any is dense or the union is too wide).

    Example: ``[[0], [1]]`` and ``[[1], [2]]`` (n=3) -> ``[[0, 1], [1, 2]]``.
    """
    if any(i is None for i in idxs):
        return None
    first = idxs[0]
    if all(i is first or (i.shape == first.shape and np.array_equal(i, first)) for i in idxs[1:]):
        return first
    return _compact(np.concatenate(idxs, axis=-1), n)


def reduce(idx: np.ndarray | None, axes, n: int) -> np.ndarray | None:
    """The union of a layout along ``axes`` (removed): the layout of a sum over them.

    Example: ``[[[0], [1]], [[2], [3]]]`` reduced over axis 1 -> ``[[0, 1], [2, 3]]``.
    """
    if idx is None:
        return None
    nd = idx.ndim - 1
    axes = tuple(sorted(a % max(nd, 1) for a in axes))
    keep = [a for a in range(nd) if a not in axes]
    moved = np.transpose(idx, keep + list(axes) + [nd])
    kept_shape = tuple(idx.shape[a] for a in keep)
    rows = moved.reshape(kept_shape + (-1,))
    if all(idx.shape[a] == 1 for a in axes):
        return np.ascontiguousarray(rows)
    if any(idx.shape[a] == 0 for a in axes):  # a sum over nothing holds no columns
        return np.zeros(kept_shape + (0,), idx.dtype)
    # Common case first: every reduced element holds the same columns (a hidden layer's units).
    first = moved[(slice(None),) * len(keep) + (0,) * len(axes)]
    if np.array_equal(moved, np.broadcast_to(first.reshape(kept_shape + (1,) * len(axes) + first.shape[-1:]),
                                             moved.shape)):
        return np.ascontiguousarray(first)
    return _compact(rows, n)


def expand(idx: np.ndarray, kept_shape, axes, full_shape) -> np.ndarray:
    """:func:`reduce`'s result broadcast back over the reduced ``axes`` of ``full_shape``."""
    nd = len(full_shape)
    shape = [1 if a in axes else full_shape[a] for a in range(nd)]
    return np.broadcast_to(idx.reshape(tuple(shape) + idx.shape[-1:]), tuple(full_shape) + idx.shape[-1:])


def positions(src: np.ndarray, dst: np.ndarray | None, n: int) -> np.ndarray | None:
    """For each element and destination column, the source column holding the same input (``K_src``: none).

    ``dst`` must contain ``src`` element-wise (a superset, as unions are). ``None``
    when the layouts are equal (nothing to move). Shapes: ``src`` ``S + (K,)``,
    ``dst`` ``S + (K',)`` (or ``None``: dense, ``K' = n``); result ``S + (K',)``.
    """
    shape = src.shape[:-1]
    k_src = src.shape[-1]
    if dst is not None and dst.shape == src.shape and np.array_equal(dst, src):
        return None
    size = math.prod(shape)
    if dst is None:
        dst_rows = np.broadcast_to(np.arange(n, dtype=np.int64), (size, n))
    else:
        dst_rows = dst.reshape(size, dst.shape[-1])
    if size == 0 or k_src == 0:  # no elements, or no source columns: every destination column is empty
        return np.full(shape + (dst_rows.shape[1],), k_src, np.int64)
    src_rows = src.reshape(size, k_src)
    base = np.arange(size, dtype=np.int64)[:, None] * (n + 1)
    keys = (src_rows + base).reshape(-1)  # sorted: rows are sorted and bases increase
    want = (dst_rows + base).reshape(-1)
    at = np.minimum(np.searchsorted(keys, want), keys.size - 1)
    found = (keys[at] == want) & (dst_rows.reshape(-1) < n)
    slot = at - np.repeat(np.arange(size) * k_src, dst_rows.shape[1])
    pos = np.where(found, slot, k_src).reshape(shape + (dst_rows.shape[1],))
    return pos


def to_sets(idx: np.ndarray, n: int):
    """The layout as CSR sets ``(indptr, indices)`` (the dependency lattice's form)."""
    rows = idx.reshape(-1, idx.shape[-1])
    valid = rows < n
    indptr = np.zeros(rows.shape[0] + 1, np.int64)
    np.cumsum(valid.sum(axis=1), out=indptr[1:])
    return indptr, rows[valid].astype(np.int64)


def from_sets(shape, indptr: np.ndarray, indices: np.ndarray, n: int) -> np.ndarray | None:
    """CSR sets (sorted per element) as a padded layout of shape ``shape + (K,)`` (``None``: too wide)."""
    size = math.prod(shape)
    counts = np.diff(indptr)
    k = int(counts.max(initial=0))
    if k > DENSE_FRACTION * n:
        return None
    k = max(k, 1)
    out = np.full((size, k), n, np.int64)
    rows = np.repeat(np.arange(size), counts)
    cols = np.arange(indices.size) - np.repeat(indptr[:-1], counts)
    out[rows, cols] = indices
    return out.reshape(tuple(shape) + (k,))
