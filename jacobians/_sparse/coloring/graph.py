"""Compressed row and column structure of a 0/1 pattern, shared by the colouring loops.

The colourings never list conflicting column pairs; they walk these two
compressed views instead (a column's rows, then those rows' columns), as
ColPack and SparseMatrixColorings do. Helpers for the compiled loops live here
too: shape buckets (so that a handful of compilations serve every size) and
placement on the host CPU (the loops are sequential; they belong on the CPU
even when an accelerator is the default device).
"""

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import jax
import numpy as np


@dataclass(frozen=True)
class Structure:
    """A deduplicated ``(n_rows, n_cols)`` pattern in both compressed orientations.

    Attributes:
      n_rows, n_cols: the shape.
      rows, cols: the nonzeros sorted by row, then column, shape ``(nnz,)``, int64.
      row_ptr: ``cols[row_ptr[i]:row_ptr[i + 1]]`` are row ``i``'s columns, shape ``(n_rows + 1,)``.
      col_ptr, col_rows: ``col_rows[col_ptr[j]:col_ptr[j + 1]]`` are column ``j``'s rows (ascending).
    """

    n_rows: int
    n_cols: int
    rows: np.ndarray
    cols: np.ndarray
    row_ptr: np.ndarray
    col_ptr: np.ndarray
    col_rows: np.ndarray

    @property
    def row_len(self) -> np.ndarray:
        """Nonzeros per row, shape ``(n_rows,)``."""
        return np.diff(self.row_ptr)

    @property
    def col_len(self) -> np.ndarray:
        """Nonzeros per column, shape ``(n_cols,)``."""
        return np.diff(self.col_ptr)


def structure(rows: np.ndarray, cols: np.ndarray, n_rows: int, n_cols: int) -> Structure:
    """Deduplicate the nonzeros ``(rows, cols)`` and build both compressed views.

    Args:
      rows, cols: nonzero coordinates, shape ``(nnz,)``, any integer dtype; repeats allowed.
      n_rows, n_cols: the shape; every coordinate must lie inside it.

    Returns:
      The :class:`Structure`.
    """
    rows = np.asarray(rows, np.int64).ravel()
    cols = np.asarray(cols, np.int64).ravel()
    if rows.shape != cols.shape:
        raise ValueError(f"rows and cols differ in length: {rows.shape} vs {cols.shape}")
    if rows.size and (rows.min() < 0 or cols.min() < 0 or rows.max() >= n_rows or cols.max() >= n_cols):
        raise ValueError(f"a nonzero lies outside the {n_rows} x {n_cols} pattern")
    keys = rows * n_cols + cols  # row-major order
    if keys.size > 1 and not np.all(keys[1:] > keys[:-1]):
        keys = np.sort(keys)  # (np.unique hashes first: several times slower on big patterns)
        keys = keys[np.concatenate([[True], keys[1:] != keys[:-1]])]
    rows, cols = np.divmod(keys, n_cols) if n_cols else (keys, keys)
    row_ptr = np.zeros(n_rows + 1, np.int64)
    np.cumsum(np.bincount(rows, minlength=n_rows), out=row_ptr[1:])
    by_col = np.argsort(cols, kind="stable")  # rows stay ascending within a column
    col_ptr = np.zeros(n_cols + 1, np.int64)
    np.cumsum(np.bincount(cols, minlength=n_cols), out=col_ptr[1:])
    return Structure(n_rows, n_cols, rows, cols, row_ptr, col_ptr, rows[by_col])


def padded(ptr: np.ndarray, idx: np.ndarray, keep: np.ndarray, width: int, n_out: int, fill: int) -> np.ndarray:
    """Rows ``idx[ptr[k]:ptr[k + 1]]`` for the selected ``k`` as a ``(n_out, width)`` int32 table.

    Args:
      ptr: compressed offsets, shape ``(n + 1,)``.
      idx: the entries, shape ``(ptr[-1],)``.
      keep: which of the ``n`` lists to copy (the others stay ``fill``), bool ``(n,)``;
        every kept list must have at most ``width`` entries.
      width: columns of the table.
      n_out: rows of the table, at least ``n``.
      fill: the padding value.

    Returns:
      The table, list ``k`` in row ``k``.
    """
    out = np.full((n_out, width), fill, np.int32)
    lens = np.where(keep, np.diff(ptr), 0)
    for p in range(min(width, int(lens.max(initial=0)))):  # one pass per table column: O(n * width)
        (k,) = np.nonzero(lens > p)
        out[k, p] = idx[ptr[k] + p]
    return out


def bucket(x: int, lo: int = 1) -> int:
    """The smallest power of two that is at least ``max(x, lo)``: sizes that share one compilation."""
    return 1 << (max(int(x), lo, 1) - 1).bit_length()


@cache
def host_cpu() -> jax.Device:
    """The CPU device that runs the colouring loops.

    This process's own: under jax.distributed ``jax.devices()[0]`` may belong to another process.
    """
    return jax.local_devices(backend="cpu")[0]


def start_on_host(loop: Callable, *arrays: np.ndarray, **static) -> tuple[jax.Array, ...]:
    """Start a jitted loop now, on the CPU; its outputs arrive asynchronously.

    The colourings are planned while the user's function is being traced (a
    ``jax.jit`` around ``sparse_jacobian``): evaluate eagerly regardless.

    Args:
      loop: the jitted function.
      *arrays: its array arguments, committed to the CPU device first.
      **static: its static keyword arguments.
    """
    cpu = host_cpu()
    with jax.ensure_compile_time_eval():
        return loop(*(jax.device_put(a, cpu) for a in arrays), **static)


def run_on_host(loop: Callable, *arrays: np.ndarray, **static) -> tuple[np.ndarray, ...]:
    """:func:`start_on_host`, then wait for the outputs, as NumPy arrays."""
    return tuple(np.asarray(o) for o in start_on_host(loop, *arrays, **static))
