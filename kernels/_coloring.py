"""Greedy colouring of Jacobian columns (or rows) for compressed evaluation.

Two columns may share a colour (be pushed through one JVP together) when no
row has a nonzero in both; then each nonzero of ``J @ seed`` comes from exactly
one column. This is a distance-2 colouring of the bipartite row/column graph,
done greedily three ways (DSATUR, smallest-last and largest-first orders),
keeping the one with fewest colours.
"""

import numpy as np

_PAIRS_MAX = 1 << 26


def _conflicts(rows: np.ndarray, cols: np.ndarray, n_cols: int) -> tuple[np.ndarray, np.ndarray]:
    """CSR adjacency of the column intersection graph (columns that share a row)."""
    order = np.lexsort((cols, rows))
    r, c = rows[order], cols[order]
    starts = np.flatnonzero(np.concatenate([[True], r[1:] != r[:-1]]))
    lens = np.diff(np.append(starts, r.size))
    # All ordered pairs (a, b) of columns within each row: lens^2 per row.
    sq = lens * lens
    base = np.repeat(starts, sq)
    within = np.arange(int(sq.sum())) - np.repeat(np.cumsum(sq) - sq, sq)
    width = np.repeat(lens, sq)
    a = c[base + within // width]
    b = c[base + within % width]
    key = np.sort(a.astype(np.int64) * n_cols + b)
    if key.size:
        key = key[np.concatenate([[True], key[1:] != key[:-1]])]
    a, b = np.divmod(key, n_cols)
    keep = a != b
    a, b = a[keep], b[keep]
    indptr = np.concatenate([[0], np.cumsum(np.bincount(a, minlength=n_cols))])
    return indptr, b


def color_columns(rows: np.ndarray, cols: np.ndarray, n_cols: int) -> np.ndarray:
    """Colour the columns of a sparsity pattern so that same-coloured columns share no row.

    Args:
      rows, cols: the nonzeros of an ``(m, n_cols)`` pattern.
      n_cols: the number of columns.

    Returns:
      ``colors`` of shape ``(n_cols,)``, values ``0 .. n_colors - 1``; columns
      with no nonzero get colour 0.
    """
    rows = np.asarray(rows, np.int64)
    cols = np.asarray(cols, np.int64)
    if rows.size == 0:
        return np.zeros(n_cols, np.int64)
    row_len = np.bincount(rows)
    if int(np.sum(row_len.astype(np.int64) ** 2)) > _PAIRS_MAX:
        # Rows so full that the conflict graph would not fit: nearly every
        # column conflicts anyway, so give each its own colour (always valid).
        return np.arange(n_cols, dtype=np.int64)
    indptr, adj = _conflicts(rows, cols, n_cols)
    flat, ptr = adj.tolist(), indptr.tolist()
    adj_list = [flat[ptr[j] : ptr[j + 1]] for j in range(n_cols)]
    # Greedy in three classic orders; keep the colouring with fewest colours.
    # The columns of one row all conflict, so the longest row is a lower bound:
    # stop as soon as it is reached.
    bound = int(row_len.max())
    best = _dsatur(adj_list)
    for order in (_smallest_last, lambda a: np.argsort(-np.diff(indptr), kind="stable").tolist()):
        if int(best.max()) + 1 <= bound:
            break
        other = _greedy(adj_list, order(adj_list))
        if other.max() < best.max():
            best = other
    return best


def _greedy(adj_list: list[list[int]], order: list[int]) -> np.ndarray:
    color = [-1] * len(adj_list)
    for j in order:
        used = {color[k] for k in adj_list[j]}
        c = 0
        while c in used:
            c += 1
        color[j] = c
    return np.asarray(color, np.int64)


def _dsatur(adj_list: list[list[int]]) -> np.ndarray:
    """DSATUR: colour next the vertex seeing the most distinct colours (ties: higher degree).

    Colours seen by each vertex are a Python int bitmask; vertices wait in one
    stack per saturation level (stale entries are skipped when popped).
    """
    n = len(adj_list)
    color = [-1] * n
    seen = [0] * n
    sat = [0] * n
    degree = np.fromiter((len(a) for a in adj_list), np.int64, n)
    by_degree = np.lexsort((-np.arange(n), degree)).tolist()  # largest degree last
    buckets: list[list[int]] = [by_degree]
    top = 0
    for _ in range(n):
        while True:
            while not buckets[top]:
                top -= 1
            v = buckets[top].pop()
            if color[v] == -1 and sat[v] == top:
                break
        m = seen[v]
        c = (~m & (m + 1)).bit_length() - 1  # the smallest colour not seen
        color[v] = c
        bit = 1 << c
        for u in adj_list[v]:
            if color[u] == -1 and not seen[u] & bit:
                seen[u] |= bit
                s = sat[u] = sat[u] + 1
                if s == len(buckets):
                    buckets.append([])
                buckets[s].append(u)
                if s > top:
                    top = s
    return np.asarray(color, np.int64)


def _smallest_last(adj_list: list[list[int]]) -> list[int]:
    """Smallest-last order: repeatedly remove a vertex of least remaining degree, then reverse."""
    n = len(adj_list)
    degree = [len(a) for a in adj_list]
    buckets: list[set[int]] = [set() for _ in range(max(degree, default=0) + 1)]
    for v, d in enumerate(degree):
        buckets[d].add(v)
    removed = [False] * n
    order = []
    low = 0
    for _ in range(n):
        low = max(low - 1, 0)
        while not buckets[low]:
            low += 1
        v = buckets[low].pop()
        removed[v] = True
        order.append(v)
        for u in adj_list[v]:
            if not removed[u]:
                buckets[degree[u]].discard(u)
                degree[u] -= 1
                buckets[degree[u]].add(u)
    return order[::-1]


def color_rows(rows: np.ndarray, cols: np.ndarray, n_rows: int) -> np.ndarray:
    """Colour rows so that same-coloured rows share no column (for reverse mode)."""
    return color_columns(cols, rows, n_rows)
