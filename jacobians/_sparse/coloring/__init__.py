"""Colour Jacobian columns (or rows) so that one JVP (VJP) serves each colour.

Two columns may share a colour when no row has a nonzero in both; then each
nonzero of ``J @ seed`` comes from exactly one column. This is a partial
distance-2 colouring of the bipartite row/column graph. It is computed on the
compressed row and column structure (never a list of conflicting pairs):

1. the longest row is a lower bound (its columns all conflict); rows of one
   entry (nothing conflicts) or a row holding every nonempty column settle it
   at once;
2. greedy in largest-first order (:mod:`.greedy`), ``O(nnz)``;
3. if that misses the bound and the pattern's rows and columns are short,
   DSATUR (:mod:`.dsatur`), kept only when it uses fewer colours.
"""

import numpy as np

from .dsatur import dsatur_affordable, dsatur_columns
from .graph import Structure, bucket, structure
from .greedy import greedy_columns

# Row masks hold n_rows x n_colors bits; past this many 32-bit words, give each column its own colour.
_MASK_WORDS_MAX = 1 << 26


def _conflict_degree(s: Structure) -> np.ndarray:
    """Per column, ``sum over its rows of (row length - 1)``: an upper bound on its conflicts."""
    return np.bincount(s.cols, weights=s.row_len[s.rows] - 1, minlength=s.n_cols).astype(np.int64)


def _color(s: Structure) -> np.ndarray:
    """Colour the columns of ``s``: bound, greedy, then DSATUR if worth it (see the module docstring)."""
    nonempty = s.col_len > 0
    if not s.rows.size:
        return np.zeros(s.n_cols, np.int64)
    bound = int(s.row_len.max())
    if bound == 1:  # no row holds two columns: nothing conflicts, one colour (a diagonal)
        return np.zeros(s.n_cols, np.int64)
    if bound == int(nonempty.sum()):  # one row holds every nonempty column: all conflict
        colors = np.zeros(s.n_cols, np.int64)
        colors[nonempty] = np.arange(bound)
        return colors
    degree = _conflict_degree(s)
    order = np.lexsort((np.arange(s.n_cols), -degree))  # largest first, then by index
    n_words = bucket(-(-(bound + 1) // 32))  # powers of two: fewer compilations
    while True:
        if s.n_rows * n_words > _MASK_WORDS_MAX:
            # Too many colours to track per row: every column its own colour is always valid.
            colors = np.zeros(s.n_cols, np.int64)
            colors[nonempty] = np.arange(int(nonempty.sum()))
            return colors
        colors = greedy_columns(s, order, n_words)
        if colors is not None:
            break
        n_words *= 4
    n_colors = int(colors.max()) + 1
    if n_colors > bound and dsatur_affordable(s):
        better = dsatur_columns(s, degree, n_colors)
        if better is not None:
            colors = better
    return colors


def color_columns(rows: np.ndarray, cols: np.ndarray, n_cols: int) -> np.ndarray:
    """Colour the columns of a sparsity pattern so that same-coloured columns share no row.

    Args:
      rows, cols: the nonzeros of an ``(m, n_cols)`` pattern, shape ``(nnz,)``; repeats allowed.
      n_cols: the number of columns.

    Returns:
      ``colors`` of shape ``(n_cols,)``, int64, values ``0 .. n_colors - 1``;
      columns with no nonzero get colour 0.
    """
    rows = np.asarray(rows, np.int64)
    n_rows = int(rows.max()) + 1 if rows.size else 0
    return _color(structure(rows, cols, n_rows, n_cols))


def color_rows(rows: np.ndarray, cols: np.ndarray, n_rows: int) -> np.ndarray:
    """Colour rows so that same-coloured rows share no column (for reverse mode).

    Args:
      rows, cols: the nonzeros of an ``(n_rows, n)`` pattern, shape ``(nnz,)``.
      n_rows: the number of rows.

    Returns:
      ``colors`` of shape ``(n_rows,)``, int64, values ``0 .. n_colors - 1``;
      rows with no nonzero get colour 0.
    """
    return color_columns(cols, rows, n_rows)


from .decompression import SymmetricDecompression as SymmetricDecompression  # noqa: E402
from .decompression import symmetric_decompression as symmetric_decompression  # noqa: E402
from .symmetric import color_symmetric as color_symmetric  # noqa: E402
