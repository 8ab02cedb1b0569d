"""Recover the nonzeros of a symmetric ``H`` from ``B = H @ S``, for star and acyclic colourings.

``S`` is the ``(n, c)`` 0/1 seed matrix of a colouring; the decompression takes
``compressed = B^T``, shape ``(c, n)``, ``compressed[k] = H @ s_k`` (or, with
``layout="nc"``, ``B`` itself, shape ``(n, c)``: the layout a batch-minor ``vmap``
of the products writes, which XLA computes several times faster on CPU for
stencil-like functions). Entry ``compressed[b, x]`` sums ``H[x, y]`` over the
``b``-coloured ``y`` (``H[x, x]`` itself when ``b = colour(x)``, a distance-1
colouring leaving nothing else).

* Star: in a two-coloured star, the hub's every neighbour is alone in its
  colour at the hub's row, so ``H[i, j]`` is ``compressed[colour(j), i]`` or
  ``compressed[colour(i), j]``: one precomputed gather.
* Acyclic: each two-coloured component is a tree. Its "nodes" are the pairs
  (vertex ``x``, other colour ``b``) with value ``compressed[b, x]`` = the sum of
  the tree edges at ``x``. Rooting the tree, the edge from a node to its parent
  is the node's value minus its child edges; unrolled, it is the alternating sum
  of the values over the node's subtree. In depth-first preorder a subtree is a
  contiguous range, so all edges come from one prefix sum: a fixed, small
  number of operations however long the trees (a banded matrix gives paths of
  length ``n``).

The index arrays are built once on the host; calls are traceable and jittable.
"""

import jax
import jax.numpy as jnp
import numpy as np

from ... import kernels
from .symmetric import METHODS, adjacency


def _pair_counts(x: np.ndarray, b: np.ndarray, n_colors: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted keys ``x * n_colors + b`` of the distinct pairs, and how often each occurs."""
    return np.unique(x * n_colors + b, return_counts=True)


def _compact(index: np.ndarray) -> np.ndarray:
    """Indices as int32 when they fit (they nearly always do), else int64."""
    return index.astype(np.int32 if index.size == 0 or index.max() < 2**31 else np.int64)


def _minor(index: np.ndarray, n: int, c: int) -> np.ndarray:
    """Flat indices into a ``(c, n)`` matrix as indices into its ``(n, c)`` transpose; those past it unchanged."""
    index = np.asarray(index, np.int64)
    b, x = np.divmod(index, max(n, 1))
    return np.where(index < n * c, x * c + b, index)


def _lookup(keys: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Positions of ``query`` in the sorted ``keys`` (every query is present)."""
    return np.searchsorted(keys, query)


def _preorder(n_nodes: int, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Depth-first preorder of the forest with edges ``(a[k], b[k])`` (no repeated edges).

    Returns:
      ``(order, parent, depth, size)``: the nodes in preorder, and per node its
      parent (-1 at roots), depth and subtree size.

    Raises:
      ValueError: if the graph has a cycle.
    """
    ends = np.concatenate([a, b])
    by = np.argsort(ends, kind="stable")
    ptr = np.zeros(n_nodes + 1, np.int64)
    np.cumsum(np.bincount(ends, minlength=n_nodes), out=ptr[1:])
    ptr_l, nbr_l = ptr.tolist(), np.concatenate([b, a])[by].tolist()
    parent = [-1] * n_nodes
    depth = [0] * n_nodes
    visited = [False] * n_nodes
    order: list[int] = []
    for root in range(n_nodes):
        if visited[root]:
            continue
        visited[root] = True
        stack = [root]
        while stack:
            x = stack.pop()
            order.append(x)
            for k in range(ptr_l[x], ptr_l[x + 1]):
                y = nbr_l[k]
                if y == parent[x]:
                    continue
                if visited[y]:  # a second way to reach y
                    raise ValueError("not an acyclic colouring: a two-coloured subgraph has a cycle")
                visited[y] = True
                parent[y] = x
                depth[y] = depth[x] + 1
                stack.append(y)
    size = [1] * n_nodes
    for x in reversed(order):  # children come after their parent in preorder
        if parent[x] >= 0:
            size[parent[x]] += size[x]
    return tuple(np.asarray(v, np.int64) for v in (order, parent, depth, size))


def _take(flat: jax.Array, index) -> jax.Array:
    """``flat[index]`` for indices known to lie in range: no clamping, no wrapping of negatives."""
    return kernels.take(flat, index)


@jax.jit
def _gather(flat: jax.Array, index: jax.Array) -> jax.Array:
    return _take(flat, index)


@jax.jit
def _substitute(flat: jax.Array, values: jax.Array, sign: jax.Array, last: jax.Array, index: jax.Array) -> jax.Array:
    """Edge values by alternating subtree sums, then one gather from ``[flat, edges]``."""
    sign = sign.astype(flat.dtype)
    signed = _take(flat, values) * sign
    # A whole tree's alternating sum is zero (the root has no parent edge), so the running
    # sum returns to ~0 after every tree: one plain prefix sum serves all trees.
    prefix = jnp.cumsum(signed)
    edges = (_take(prefix, last) - prefix + signed) * sign
    return _take(jnp.concatenate([flat, edges]), index)


class SymmetricDecompression:
    """Read the nonzeros of a symmetric ``H`` off its compressed form ``(H @ S)^T``.

    Built once on the host from the pattern and a colouring; calling it is a
    traceable, jittable function of the compressed matrix.

    Attributes:
      n: the order of ``H``.
      n_colors: the number of colours ``c`` (rows of the compressed matrix).
      method: ``"star"`` or ``"acyclic"``.
      colors: the colouring, int64 ``(n,)``.
      layout: ``"cn"`` (the compressed matrix is ``(H @ S)^T``, shape ``(c, n)``) or
        ``"nc"`` (``H @ S``, shape ``(n, c)``).
      index: star colourings: the flat indices into ``compressed.reshape(-1)`` that
        read the entries off (one gather); ``None`` for acyclic colourings.
      nodes: acyclic colourings: the number of tree nodes the substitution sums over
        (its prefix sum's length; 0 for star colourings).
    """

    def __init__(self, rows: np.ndarray, cols: np.ndarray, colors: np.ndarray, method: str = "star",
                 layout: str = "cn"):
        """Precompute the gathers (and, for ``"acyclic"``, the substitution trees).

        Args:
          rows, cols: the entries to recover, shape ``(nnz,)``; together (with their
            mirror images) they must cover every nonzero of ``H`` off the diagonal.
          colors: a star (``"star"``) or acyclic (``"acyclic"``) colouring, shape ``(n,)``.
          method: how to decompress.
          layout: ``"cn"`` or ``"nc"``, the compressed matrix's layout (see the class docstring).

        Raises:
          ValueError: if ``colors`` is not a colouring of the required kind.
        """
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if layout not in ("cn", "nc"):
            raise ValueError(f"layout must be 'cn' or 'nc', got {layout!r}")
        self.layout = layout
        colors = np.asarray(colors, np.int64).ravel()
        rows = np.asarray(rows, np.int64).ravel()
        cols = np.asarray(cols, np.int64).ravel()
        n = colors.size
        self.n, self.method, self.colors = n, method, colors
        self.n_colors = int(colors.max()) + 1 if n else 0
        s = adjacency(rows, cols, n)
        x, y = s.rows, s.cols  # every off-diagonal pair, both directions, sorted by x * n + y
        if np.any(colors[x] == colors[y]):
            raise ValueError("not a distance-1 colouring: two neighbours share a colour")
        c = max(self.n_colors, 1)
        edge_keys = x * n + y
        diag = rows == cols
        edge = _lookup(edge_keys, np.where(diag, 0, rows * n + cols)) if edge_keys.size else np.zeros_like(rows)
        if method == "star":
            keys, counts = _pair_counts(x, colors[y], c)
            alone_here = counts[_lookup(keys, x * c + colors[y])] == 1  # y alone in its colour at row x
            alone_there = counts[_lookup(keys, y * c + colors[x])] == 1
            if not np.all(alone_here | alone_there):
                raise ValueError("not a star colouring: a two-coloured path on four vertices")
            # Per directed pair (x, y): read H[x, y] at row x if y is alone there, else at row y.
            at = np.where(alone_here, colors[y] * n + x, colors[x] * n + y)
            index = np.where(diag, colors[rows] * n + rows, at[edge] if at.size else 0)
            self._index = _compact(_minor(index, n, c) if layout == "nc" else index)
            self.index, self.nodes = self._index, 0
            return
        # Acyclic: nodes (x, b), b the colour of a neighbour of x; each edge joins (x, col y) and (y, col x).
        node_keys, _ = _pair_counts(x, colors[y], c)
        node = _lookup(node_keys, x * c + colors[y])  # node at the x end of pair (x, y)
        mirror = _lookup(edge_keys, y * n + x)
        upper = x < y
        order, parent, depth, size = _preorder(node_keys.size, node[upper], node[mirror[upper]])
        pos = np.empty(node_keys.size, np.int64)
        pos[order] = np.arange(order.size)
        # The edge's value sits at whichever end node is the other's child.
        child = np.where(parent[node] == node[mirror], node, node[mirror])
        nx, nb = np.divmod(node_keys[order], c)
        # The compressed entry of each node, in preorder.
        self._values = _compact(nx * c + nb if layout == "nc" else nb * n + nx)
        self._sign = np.where(depth[order] % 2 == 0, 1, -1).astype(np.int8)
        self._last = _compact(np.arange(order.size) + size[order] - 1)  # end of each subtree
        # One gather from [compressed.ravel(), edge values]: diagonal entries from the first part.
        at = n * c + pos[child]
        index = np.where(diag, colors[rows] * n + rows, at[edge] if at.size else 0)
        self._index = _compact(_minor(index, n, c) if layout == "nc" else index)
        self.index, self.nodes = None, int(order.size)

    def seeds(self, dtype=np.float64) -> np.ndarray:
        """The 0/1 seed rows ``S^T``, shape ``(n_colors, n)``: row ``k`` marks colour ``k``.

        Args:
          dtype: the NumPy dtype of the result.
        """
        return (self.colors[None, :] == np.arange(self.n_colors)[:, None]).astype(dtype)

    def __call__(self, compressed: jax.Array) -> jax.Array:
        """The entries ``H[rows[t], cols[t]]``, shape ``(nnz,)``.

        Args:
          compressed: ``(H @ S)^T``, shape ``(n_colors, n)``: ``compressed[k] = H @ s_k``
            (layout ``"nc"``: ``H @ S``, shape ``(n, n_colors)``).

        Returns:
          The values, in the order of the ``rows, cols`` given at construction.
        """
        compressed = jnp.asarray(compressed)
        shape = (self.n_colors, self.n) if self.layout == "cn" else (self.n, self.n_colors)
        if compressed.shape != shape:
            raise ValueError(f"compressed must have shape {shape}, got {compressed.shape}")
        flat = compressed.reshape(-1)
        if self.method == "star":
            return _gather(flat, self._index)
        return _substitute(flat, self._values, self._sign, self._last, self._index)


def symmetric_decompression(
    rows: np.ndarray, cols: np.ndarray, colors: np.ndarray, method: str = "star", layout: str = "cn"
) -> SymmetricDecompression:
    """Build a :class:`SymmetricDecompression` (see there for the arguments)."""
    return SymmetricDecompression(rows, cols, colors, method, layout)
