"""Greedy colouring of Jacobian columns (or rows) for compressed evaluation.

Two columns may share a colour (be pushed through one JVP together) when no
row has a nonzero in both; then each nonzero of ``J @ seed`` comes from exactly
one column. This is a distance-2 colouring of the bipartite row/column graph,
done greedily three ways (DSATUR, smallest-last and largest-first orders),
keeping the one with fewest colours.
"""

import heapq

import numpy as np

_PAIRS_MAX = 1 << 26


def _conflicts(rows: np.ndarray, cols: np.ndarray, n_cols: int) -> tuple[np.ndarray, np.ndarray]:
    """CSR adjacency of the column intersection graph (columns that share a row)."""
    order = np.lexsort((cols, rows))
    r, c = rows[order], cols[order]
    starts = np.searchsorted(r, np.unique(r))
    lens = np.diff(np.append(starts, r.size))
    # All ordered pairs (a, b) of columns within each row.
    pair_row = np.repeat(np.arange(lens.size), lens * lens)
    base = np.repeat(starts, lens * lens)
    within = np.arange(pair_row.size) - np.repeat(np.cumsum(lens * lens) - lens * lens, lens * lens)
    a = c[base + within // np.repeat(lens, lens * lens)]
    b = c[base + within % np.repeat(lens, lens * lens)]
    key = np.unique(a.astype(np.int64) * n_cols + b)
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
    adj_list = [a.tolist() for a in np.split(adj, indptr[1:-1])]
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
    """DSATUR: colour next the vertex seeing the most distinct colours (then highest degree)."""
    n = len(adj_list)
    color = [-1] * n
    seen: list[set[int]] = [set() for _ in range(n)]
    heap = [(0, -len(adj_list[v]), v) for v in range(n)]
    heapq.heapify(heap)
    while heap:
        s, d, v = heapq.heappop(heap)
        if color[v] != -1 or -s != len(seen[v]):
            continue  # coloured already, or a stale entry
        c = 0
        while c in seen[v]:
            c += 1
        color[v] = c
        for u in adj_list[v]:
            if color[u] == -1 and c not in seen[u]:
                seen[u].add(c)
                heapq.heappush(heap, (-len(seen[u]), -len(adj_list[u]), u))
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
