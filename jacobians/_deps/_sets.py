"""Dependency sets: for each element of an array, the input indices it may depend on.

A :class:`Deps` stores the sets of all elements as one CSR boolean matrix of
shape ``(size, n_inputs)`` (element ``e`` depends on
``indices[indptr[e]:indptr[e + 1]]``, sorted), plus the array's value when it is
known at trace time (folded constants: literals, iotas, index arithmetic).
Every operation here is vectorised NumPy: no Python loop over elements.
"""

import contextlib
import contextvars
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np


class TooDense(Exception):
    """Raised when a dependency set grows past the analysis's budget (the pattern is dense)."""


# The entries one operation may build, while an analysis with a budget runs (see ``limited``): a
# rule's intermediate (a broadcast of large sets, say) must stop before it is allocated, not after.
_LIMIT: contextvars.ContextVar = contextvars.ContextVar("jacobians_deps_limit", default=None)
LIMIT_FACTOR = 4  # an intermediate may hold this many times the budget (a rule reduces it afterwards)


@contextlib.contextmanager
def limited(max_nnz: int | None) -> Iterator[None]:
    """Within: an operation that would build more than ``LIMIT_FACTOR * max_nnz`` entries raises :class:`TooDense`."""
    token = _LIMIT.set(None if max_nnz is None else LIMIT_FACTOR * max(int(max_nnz), 1))
    try:
        yield
    finally:
        _LIMIT.reset(token)


def current_limit() -> int | None:
    """The entries one operation may build under the innermost :func:`limited` (``None``: no limit)."""
    return _LIMIT.get()


def building(total: int, what: str) -> None:
    limit = _LIMIT.get()
    if limit is not None and total > limit:
        raise TooDense(what)


@dataclass
class Deps:
    """Dependency sets of one array (see the module docstring)."""

    shape: tuple[int, ...]
    indptr: np.ndarray
    indices: np.ndarray
    const: np.ndarray | None = None  # the value, when known at trace time
    bounds: tuple | None = None  # an unknown integer value's elementwise (lo, hi) (see ._bounds)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nnz(self) -> int:
        return int(self.indices.size)

    def rows(self) -> np.ndarray:
        """The element of each stored index, shape ``(nnz,)``."""
        return np.repeat(np.arange(self.size), np.diff(self.indptr))

    def with_shape(self, shape) -> "Deps":
        """The same sets (same element order) under another shape of equal size; no value."""
        return Deps(tuple(int(s) for s in shape), self.indptr, self.indices)


def empty(shape, const=None) -> Deps:
    shape = tuple(int(s) for s in shape)
    return Deps(shape, np.zeros(math.prod(shape) + 1, np.int64), np.zeros(0, np.int64), const)


def identity(shape, offset: int = 0) -> Deps:
    """Element ``e`` depends on input ``offset + e``: the seed of an analysis."""
    shape = tuple(int(s) for s in shape)
    n = math.prod(shape)
    return Deps(shape, np.arange(n + 1, dtype=np.int64), offset + np.arange(n, dtype=np.int64))


def unique(keys: np.ndarray) -> np.ndarray:
    """Sorted unique int64 keys (sort-based: faster here than np.unique's hashing)."""
    keys = np.sort(keys.astype(np.int64, copy=False))
    if keys.size < 2:
        return keys
    keep = np.empty(keys.size, bool)
    keep[0] = True
    np.not_equal(keys[1:], keys[:-1], out=keep[1:])
    return keys[keep]


def runs(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(owner, k)`` for ``k`` in ``range(counts[owner])``, owner by owner.

    Example: counts [2, 1] -> owners [0, 0, 1], k [0, 1, 0].
    """
    owner = np.repeat(np.arange(counts.size), counts)
    return owner, np.arange(owner.size) - np.repeat(np.cumsum(counts) - counts, counts)


def from_coo(shape, rows: np.ndarray, cols: np.ndarray, n_inputs: int) -> Deps:
    """Deps from (element, input) pairs, removing duplicates."""
    shape = tuple(int(s) for s in shape)
    size = math.prod(shape)
    width = max(n_inputs, 1)
    key = unique(np.asarray(rows, np.int64) * width + np.asarray(cols, np.int64))
    r, c = np.divmod(key, width)
    indptr = np.zeros(size + 1, np.int64)
    np.cumsum(np.bincount(r, minlength=size), out=indptr[1:])
    return Deps(shape, indptr, c)


def gather(d: Deps, idx: np.ndarray) -> Deps:
    """Element ``j`` of the result takes the set of element ``idx[j]`` of ``d`` (none where -1).

    Example: sets [{0}, {1}, {2}] gathered at [2, -1, 0] -> [{2}, {}, {0}].
    """
    idx = np.asarray(idx, np.int64)
    flat = idx.reshape(-1)
    valid = (flat >= 0) & (flat < d.size)
    safe = np.where(valid, flat, 0)
    starts = d.indptr[safe]
    lens = np.where(valid, d.indptr[safe + 1] - starts, 0)
    indptr = np.zeros(flat.size + 1, np.int64)
    np.cumsum(lens, out=indptr[1:])
    total = int(indptr[-1])
    building(total, "gather")
    offs = np.arange(total) - np.repeat(indptr[:-1], lens)
    return Deps(tuple(idx.shape), indptr, d.indices[np.repeat(starts, lens) + offs])


def reduce_to(d: Deps, target: np.ndarray, shape, n_inputs: int) -> Deps:
    """Union the sets of all elements ``e`` into result element ``target[e]`` (dropped where -1).

    Example: sets [{0}, {1}, {2}] with target [0, 0, 1] -> [{0, 1}, {2}].
    """
    rows = d.rows()
    t = np.asarray(target, np.int64).reshape(-1)[rows]
    keep = t >= 0
    return from_coo(shape, t[keep], d.indices[keep], n_inputs)


def mask(d: Deps, keep: np.ndarray) -> Deps:
    """Drop the sets of the elements where ``keep`` (same shape as ``d``) is False."""
    keep = np.asarray(keep, bool).reshape(-1)
    lens = np.where(keep, np.diff(d.indptr), 0)
    indptr = np.zeros(d.size + 1, np.int64)
    np.cumsum(lens, out=indptr[1:])
    return Deps(d.shape, indptr, d.indices[np.repeat(keep, np.diff(d.indptr))])


def union(ds: Sequence[Deps], shape, n_inputs: int) -> Deps:
    """Element-wise union of same-shaped deps."""
    ds = [d for d in ds if d.nnz]
    if not ds:
        return empty(shape)
    if len(ds) == 1:
        return ds[0].with_shape(shape)
    rows = np.concatenate([d.rows() for d in ds])
    cols = np.concatenate([d.indices for d in ds])
    return from_coo(shape, rows, cols, n_inputs)


def everything(ds: Sequence[Deps], shape) -> Deps:
    """The conservative answer: every element depends on every dependency of every input."""
    cols = unique(np.concatenate([d.indices for d in ds] + [np.zeros(0, np.int64)]))
    size = math.prod(shape)
    building(size * cols.size, "everything")
    indptr = np.arange(size + 1, dtype=np.int64) * cols.size
    return Deps(tuple(int(s) for s in shape), indptr, np.tile(cols, size))


def broadcast_to(d: Deps, shape) -> Deps:
    """Numpy broadcasting of the sets (a size-1 axis repeats its set)."""
    shape = tuple(shape)
    if d.shape == shape:
        return d
    idx = np.broadcast_to(np.arange(d.size).reshape(d.shape), shape)
    return gather(d, idx)


def concat(parts: Sequence[Deps]) -> Deps:
    """The element lists of several deps, one after another (a 1-D result)."""
    if len(parts) == 1:
        return parts[0].with_shape((parts[0].size,))
    indptr = [np.zeros(1, np.int64)]
    base = 0
    for d in parts:
        indptr.append(d.indptr[1:] + base)
        base += d.nnz
    size = sum(d.size for d in parts)
    return Deps((size,), np.concatenate(indptr), np.concatenate([d.indices for d in parts]))


def cross(a: Deps, b: Deps) -> tuple[np.ndarray, np.ndarray]:
    """Every ``(i, j)`` with ``i`` in ``a``'s set and ``j`` in ``b``'s set of the same element.

    ``a`` and ``b`` have the same number of elements. Example: sets
    [{0}, {1, 2}] and [{3}, {4}] -> (i, j) = ([0, 1, 2], [3, 4, 4]).
    """
    la, lb = np.diff(a.indptr), np.diff(b.indptr)
    cnt = la * lb
    live = np.flatnonzero(cnt)
    # Elements grouped by their two set sizes (usually a few groups): each group is one
    # broadcast of (elements, |a|, 1) against (elements, 1, |b|), no per-pair division.
    key = la[live] * (int(lb.max(initial=0)) + 1) + lb[live]
    groups = np.unique(key)
    if groups.size > 64:  # many sizes: one pass with a division per pair
        total = int(cnt.sum())
        width = np.repeat(np.maximum(lb, 1), cnt)
        q, r = np.divmod(np.arange(total) - np.repeat(np.cumsum(cnt) - cnt, cnt), width)
        return a.indices[np.repeat(a.indptr[:-1], cnt) + q], b.indices[np.repeat(b.indptr[:-1], cnt) + r]
    out_i, out_j = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for g in groups:
        sel = live[key == g]
        p, q = int(la[sel[0]]), int(lb[sel[0]])
        ia = a.indices[a.indptr[sel][:, None] + np.arange(p)]  # (elements, p)
        jb = b.indices[b.indptr[sel][:, None] + np.arange(q)]  # (elements, q)
        out_i.append(np.broadcast_to(ia[:, :, None], (sel.size, p, q)).reshape(-1))
        out_j.append(np.broadcast_to(jb[:, None, :], (sel.size, p, q)).reshape(-1))
    return np.concatenate(out_i), np.concatenate(out_j)


SPARSE_PAIRS = 1 << 20  # (output, input index) pairs above which compose is one sparse product (SciPy)


def compose(shape, rows: np.ndarray, cols: np.ndarray, d: Deps, n_inputs: int) -> Deps:
    """Sets of a linear map's outputs: element ``rows[t]`` reads element ``cols[t]`` of ``d``.

    The sparse product of a structural pattern with ``d``'s sets. Example: a
    map with (rows, cols) = ([0, 0, 1], [0, 2, 1]) applied to sets
    [{5}, {6}, {7}] -> [{5, 7}, {6}]. Up to ``SPARSE_PAIRS`` (output, input index)
    pairs they are listed and deduplicated by sorting; past that (a Glow step's 3x3
    convolutions over 16x16x8 list about 10^7: seconds) SciPy multiplies the 0/1
    read pattern by ``d``'s sets, which gives the same sets.
    """
    rows = np.asarray(rows, np.int64)
    cols = np.asarray(cols, np.int64)
    starts = d.indptr[cols]
    lens = d.indptr[cols + 1] - starts
    total = int(lens.sum())
    if total > SPARSE_PAIRS:  # SciPy's product builds no more than its result (checked by the walk)
        return _sparse_product(shape, rows, cols, d, n_inputs)
    ptr = np.cumsum(lens) - lens
    offs = np.arange(total) - np.repeat(ptr, lens)
    return from_coo(shape, np.repeat(rows, lens), d.indices[np.repeat(starts, lens) + offs], n_inputs)


def _sparse_product(shape, rows: np.ndarray, cols: np.ndarray, d: Deps, n_inputs: int) -> Deps:
    """:func:`compose` as one SciPy product of the read pattern with ``d``'s sets."""
    from scipy.sparse import csr_matrix  # noqa: PLC0415 - only large maps need it

    reads = csr_matrix((np.ones(rows.size, np.float32), (rows, cols)), shape=(math.prod(shape), d.size))
    sets = csr_matrix((np.ones(d.nnz, np.float32), d.indices, d.indptr), shape=(d.size, max(n_inputs, 1)))
    out = reads @ sets  # a sum of ones: nonzero exactly where some read element's set holds the input
    out.sort_indices()
    return Deps(tuple(int(s) for s in shape), out.indptr.astype(np.int64), out.indices.astype(np.int64))
