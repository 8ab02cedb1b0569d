"""Star and acyclic colourings of a symmetric pattern, for compressed Hessians.

Both are distance-1 colourings of the adjacency graph (vertex ``i`` ~ ``j`` when
``H[i, j]`` is a nonzero off the diagonal) with an extra rule on every pair of
colours ``{a, b}``: the subgraph of ``a``- and ``b``-coloured vertices must be

* a disjoint union of stars (star colouring: every path on four vertices uses
  three colours). Each nonzero then sits alone in its colour class in some row,
  so it is read directly from ``H @ S``;
* a forest (acyclic colouring). Each nonzero is then found by substitution
  along the two-coloured trees; this needs fewer colours (a tridiagonal
  pattern: 2 rather than 3).

Both are *exact* greedy colourings in largest-degree-first order: a vertex gets
the smallest colour that creates no two-coloured path on four vertices (no
two-coloured cycle) with the vertices coloured so far. What makes that cheap is
incremental bookkeeping, so a vertex's cost is its degree (plus rare updates),
never a walk through a high-degree neighbour's neighbourhood (an arrowhead's hub):

* star: per vertex, bitsets of the colours among its coloured neighbours that
  occur once or more, and twice or more; and per coloured vertex ``w``, the
  colours of neighbours ``x`` having two ``colour(w)``-coloured neighbours.
  Colour ``c`` closes a two-coloured path on four vertices at ``v`` exactly when
  ``c`` is in one of those bitsets for ``v``'s neighbours (see ``_forbidden_star``);
* acyclic: a union-find over (vertex, other colour) pairs, one forest per pair
  of colours; ``c`` closes a cycle exactly when two ``a``-coloured neighbours of
  ``v`` are already joined in the ``{a, c}`` forest.

Bitsets are Python integers, so the number of colours is unbounded.
"""

import numpy as np

from .graph import Structure, structure

METHODS = ("star", "acyclic")


def adjacency(rows: np.ndarray, cols: np.ndarray, n: int) -> Structure:
    """The symmetrised off-diagonal pattern ``{(i, j), (j, i) : i != j}`` of the nonzeros.

    Args:
      rows, cols: nonzeros of an ``(n, n)`` pattern (one or both triangles), shape ``(nnz,)``.
      n: the order.

    Returns:
      The adjacency as a :class:`Structure` (``cols[row_ptr[i]:row_ptr[i + 1]]`` are ``i``'s neighbours).
    """
    rows = np.asarray(rows, np.int64).ravel()
    cols = np.asarray(cols, np.int64).ravel()
    off = rows != cols
    r, c = rows[off], cols[off]
    return structure(np.concatenate([r, c]), np.concatenate([c, r]), n, n)


def _lowest_clear(bits: int) -> int:
    return (~bits & (bits + 1)).bit_length() - 1


def _star(ptr: list[int], nbr: list[int], order: list[int]) -> list[int]:
    n = len(ptr) - 1
    color = [-1] * n
    once = [0] * n  # colours seen among coloured neighbours
    twice = [0] * n  # colours seen at least twice
    hubs = [0] * n  # for coloured w: colours of coloured neighbours x with two colour(w) neighbours
    for v in order:
        lo, hi = ptr[v], ptr[v + 1]
        forbidden = once[v]
        tw = twice[v]
        for k in range(lo, hi):
            w = nbr[k]
            cw = color[w]
            if cw < 0:
                continue
            # v an end: v-w-x-y with colour(x) = c, colour(y) = colour(w).
            forbidden |= hubs[w]
            # v inside: u-v-w-x with colour(u) = colour(w) (v sees colour(w) twice), colour(x) = c.
            if tw >> cw & 1:
                forbidden |= once[w]
        c = _lowest_clear(forbidden)
        color[v] = c
        bit = 1 << c
        hub_v = 0
        for k in range(lo, hi):
            u = nbr[k]
            cu = color[u]
            if not once[u] & bit:
                once[u] |= bit
            elif not twice[u] & bit:
                twice[u] |= bit
                if cu >= 0:  # u now has two c-coloured neighbours: it is a hub for every one of them
                    for k2 in range(ptr[u], ptr[u + 1]):
                        if color[nbr[k2]] == c:
                            hubs[nbr[k2]] |= 1 << cu
            if cu >= 0:
                if twice[u] & bit:
                    hub_v |= 1 << cu
                if tw >> cu & 1:  # v has two colour(u) neighbours: v is a hub for u
                    hubs[u] |= bit
        hubs[v] |= hub_v
    return color


def _acyclic(ptr: list[int], nbr: list[int], order: list[int]) -> list[int]:
    n = len(ptr) - 1
    color = [-1] * n
    once = [0] * n
    parent: list[int] = []  # union-find over (vertex, other colour) nodes
    node: list[dict[int, int]] = [{} for _ in range(n)]

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def node_of(x: int, b: int) -> int:
        k = node[x].get(b)
        if k is None:
            k = node[x][b] = len(parent)
            parent.append(k)
        return k

    for v in order:
        lo, hi = ptr[v], ptr[v + 1]
        forbidden = once[v]
        by_color: dict[int, list[int]] = {}
        for k in range(lo, hi):
            w = nbr[k]
            if color[w] >= 0:
                by_color.setdefault(color[w], []).append(w)
        # Colour c closes a cycle when two same-coloured neighbours share a tree of the {their colour, c} forest.
        for group in by_color.values():
            if len(group) < 2:
                continue
            seen: set[tuple[int, int]] = set()
            for w in group:
                for b, k in node[w].items():
                    key = (b, find(k))
                    if key in seen:
                        forbidden |= 1 << b
                    seen.add(key)
        c = _lowest_clear(forbidden)
        color[v] = c
        for k in range(lo, hi):
            once[nbr[k]] |= 1 << c
        for a, group in by_color.items():
            mine = find(node_of(v, a))
            for w in group:
                other = find(node_of(w, c))
                if other != mine:
                    parent[other] = mine
    return color


def color_symmetric(rows: np.ndarray, cols: np.ndarray, n: int, method: str = "star") -> np.ndarray:
    """Colour the vertices of a symmetric pattern for a compressed Hessian ``H @ S``.

    Args:
      rows, cols: the nonzeros of the ``(n, n)`` pattern, shape ``(nnz,)``; one or both
        triangles, with or without the diagonal (it needs no colour of its own).
      n: the order.
      method: ``"star"`` (decompress by a gather) or ``"acyclic"`` (by substitution,
        often fewer colours).

    Returns:
      ``colors`` of shape ``(n,)``, int64, values ``0 .. n_colors - 1``; isolated
      vertices get colour 0.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    s = adjacency(rows, cols, n)
    degree = s.row_len
    order = np.lexsort((np.arange(n), -degree)).tolist()  # largest degree first, then by index
    run = _star if method == "star" else _acyclic
    return np.asarray(run(s.row_ptr.tolist(), s.cols.tolist(), order), np.int64).reshape(n)
