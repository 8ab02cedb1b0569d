"""DSATUR partial distance-2 colouring of columns: on the host, or block by block as a compiled loop.

DSATUR colours next the column that sees the most distinct colours among the
columns sharing a row with it (ties: larger conflict degree, then lower index).
Where greedy orders stall (a 2-D 5-point stencil: 7 colours in natural or
largest-first order), it finds the optimum (5).

Columns are taken in index blocks of at most ``BLOCK`` columns. Columns of
earlier blocks are final: they enter as colours already seen (from per-row
colour masks, as in the greedy pass). Within a block the loop keeps

* a key per column, ``saturation << SHIFT | priority`` (-1 once coloured), and the
  maximum key of every group of ``GROUP`` columns, so the next column is two
  small argmaxes away;
* each column's seen-colour bitmask;
* each column's conflict list inside the block (columns sharing a row),
  built on the host from the compressed row/column views, deduplicated.

Patterns of modest size (one block, a few hundred thousand conflicts) are
coloured on the host instead, in Python with a heap of ``(saturation,
priority)`` keys: the same choices, so the same colours, without the
compilation of the loop (0.5-1 s the first time a process meets its sizes,
where the host takes 1.5-40 ms).

All of a step's state lives in one int32 vector that the body reads first and
then writes with a single scatter: XLA updates it in place, and since a block's
vector stays small the CPU backend runs each step as a handful of small
kernels (a big operand would make it split every gather into thread-pool tasks).
"""

import heapq
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .graph import Structure, bucket, padded, start_on_host
from .greedy import first_free

SHIFT = 14
BLOCK = 1 << SHIFT  # priorities within a block stay below 1 << SHIFT
GROUP = 128
MAX_WIDTH = 256  # longest padded conflict walk (column length x row length) worth compiling
HOST_MAX = 1 << 19  # host work (3 x columns + conflicts, about 0.4 us each) up to which the host colours


@partial(jax.jit, static_argnames="n_words")
def _dsatur_loop(conflicts: jax.Array, state: jax.Array, count: jax.Array, limit: jax.Array, n_words: int):
    """Colour one block; ``state`` holds keys | group maxima | seen masks | colours | max colour + 1."""
    b, _ = conflicts.shape
    w_n = n_words
    n_groups = b // GROUP
    o_gmax, o_seen = b, b + n_groups
    o_col = o_seen + b * w_n
    o_max = o_col + b
    drop = state.shape[0]  # out of range: the scatter ignores it
    inc = jnp.int32(1 << SHIFT)

    def body(t, s):
        g = jnp.argmax(lax.dynamic_slice(s, (o_gmax,), (n_groups,))).astype(jnp.int32)
        block = lax.dynamic_slice(s, (g * GROUP,), (GROUP,))
        vl = jnp.argmax(block).astype(jnp.int32)
        v = g * GROUP + vl
        seen_v = lax.bitcast_convert_type(lax.dynamic_slice(s, (o_seen + v * w_n,), (w_n,)), jnp.uint32)
        w, low, c, full = first_free(seen_v)
        low = lax.bitcast_convert_type(low, jnp.int32)
        u = conflicts[v]
        inside = u < b
        u = jnp.where(inside, u, 0)
        key_u = s[u]
        seen_u = s[o_seen + u * w_n + w]
        new = inside & (key_u >= 0) & ((seen_u & low) == 0)  # uncoloured, and c is a new colour for it
        key_new = key_u + inc
        g_u = u // GROUP
        same = (g_u[:, None] == g_u[None, :]) & new[None, :]
        g_best = jnp.max(jnp.where(same, key_new[None, :], -1), axis=1)
        # v's own group: drop v, raise its saturated members, take the new maximum.
        bumped = jnp.where(new & (g_u == g), u - g * GROUP, GROUP)
        g_max = jnp.max(block.at[bumped].add(inc, mode="drop").at[vl].set(-1))
        g_new = jnp.where(g_u == g, g_max, jnp.maximum(s[o_gmax + g_u], g_best))
        top = jnp.where(full, limit, jnp.maximum(s[o_max], c + 1))
        idx = jnp.concatenate(
            [
                jnp.where(new, u, drop),
                jnp.where(new, o_seen + u * w_n + w, drop),
                jnp.where(new, o_gmax + g_u, drop),
                jnp.stack([v, o_gmax + g, o_col + v, jnp.int32(o_max)]),
            ]
        )
        val = jnp.concatenate([key_new, seen_u | low, g_new, jnp.stack([jnp.int32(-1), g_max, c, top])])
        return s.at[idx].set(val, mode="drop")

    # A counted loop: a data-dependent early exit makes every step several times slower. Past the
    # limit the colours are garbage, and the caller drops them.
    s = lax.fori_loop(0, count, body, state)
    return s[o_col:o_max], s[o_max]


def dsatur_affordable(s: Structure) -> bool:
    """Whether the padded conflict walk (longest column x longest row) is narrow enough to compile."""
    return s.rows.size > 0 and int(s.col_len.max()) * int(s.row_len.max()) <= MAX_WIDTH


def _block_conflicts(col_tab: np.ndarray, row_tab: np.ndarray, b0: int, b1: int, b: int) -> np.ndarray:
    """Each column's distinct conflicts inside the block ``[b0, b1)``, local ids, padded with ``b``.

    Returns:
      ``(b, width)`` int32, ``width`` a power of two at least 8.
    """
    nb = b1 - b0
    walk = row_tab[col_tab[b0:b1]].reshape(nb, -1).astype(np.int64)  # a column's rows' columns
    inside = (walk >= b0) & (walk < b1) & (walk != np.arange(b0, b1)[:, None])
    walk = np.sort(np.where(inside, walk - b0, b), axis=1)
    walk[:, 1:][walk[:, 1:] == walk[:, :-1]] = b
    walk.sort(axis=1)
    width = bucket(int((walk < b).sum(axis=1).max(initial=0)), lo=8)
    out = np.full((b, width), b, np.int32)
    k = min(width, walk.shape[1])
    out[:nb, :k] = walk[:, :k]
    return out


def _ranks(degree: np.ndarray) -> np.ndarray:
    """Each column's priority among ``degree``'s (larger first, then lower index): ``n - 1`` for the first."""
    n = degree.shape[0]
    rank = np.empty(n, np.int64)
    rank[np.lexsort((np.arange(n), -degree))] = np.arange(n - 1, -1, -1)
    return rank


def host_dsatur(conflicts: list, rank: list, limit: int) -> list | None:
    """DSATUR on the host over one block: the loop's choices (max ``(saturation, rank)``), the loop's colours.

    Args:
      conflicts: per column, its distinct conflicting columns.
      rank: per column, its distinct priority (:func:`_ranks`).
      limit: give up (``None``) as soon as a column would need colour ``limit - 1`` or more: the colouring
        must use fewer than ``limit`` colours (as the compiled loop's).

    A heap of ``(-saturation, -rank, column)`` with stale entries skipped on the way out; each
    column's seen colours are one Python integer (bit ``c``: colour ``c``).
    """
    n = len(rank)
    sat, seen, colors = [0] * n, [0] * n, [-1] * n
    heap = [(0, -r, v) for v, r in enumerate(rank)]
    heapq.heapify(heap)
    for _ in range(n):
        while True:
            key, _, v = heapq.heappop(heap)
            if colors[v] < 0 and -key == sat[v]:
                break
        low = ~seen[v] & (seen[v] + 1)  # the lowest colour v has not seen
        c = low.bit_length() - 1
        if c + 1 >= limit:
            return None
        colors[v] = c
        for u in conflicts[v]:
            if colors[u] < 0 and not seen[u] & low:
                seen[u] |= low
                sat[u] += 1
                heapq.heappush(heap, (-sat[u], -rank[u], u))
    return colors


def dsatur_columns(s: Structure, degree: np.ndarray, limit: int) -> np.ndarray | None:
    """DSATUR colouring of the columns of ``s`` with fewer than ``limit`` colours, if it finds one.

    Args:
      s: the pattern; :func:`dsatur_affordable` must hold.
      degree: tie-break priority per column (larger first), shape ``(n_cols,)``.
      limit: give up as soon as a column would need colour ``limit`` or more.

    Returns:
      Colours, int64 ``(n_cols,)`` with values below ``limit``, or None.
    """
    n, m = s.n_cols, s.n_rows
    n_words = bucket(-(-limit // 32))
    col_w, row_w = int(s.col_len.max()), int(s.row_len.max())
    # Padded views; row m and column n are the "nothing here" sentinels.
    col_tab = padded(s.col_ptr, s.col_rows, np.ones(n, bool), col_w, n, m)
    row_tab = padded(s.row_ptr, s.cols, np.ones(m, bool), row_w, m + 1, n)
    if n <= BLOCK:
        table = _block_conflicts(col_tab, row_tab, 0, n, n)
        real = table < n
        if 3 * n + int(real.sum()) <= HOST_MAX:
            # Each row's conflicts come first, the padding (n) after: cut the flat list at the row counts.
            flat = table[real].tolist()
            ends = np.cumsum(real.sum(axis=1)).tolist()
            found = host_dsatur([flat[a:b] for a, b in zip([0, *ends[:-1]], ends, strict=True)],
                                _ranks(degree).tolist(), limit)
            return None if found is None else np.asarray(found, np.int64)
    row_masks = np.zeros((m + 1, n_words), np.uint32)
    colors = np.zeros(n, np.int64)
    b = min(BLOCK, bucket(n, lo=1024))
    n_groups = b // GROUP
    starts = list(range(0, n, b))
    conflicts = _block_conflicts(col_tab, row_tab, 0, min(n, b), b)
    for i, b0 in enumerate(starts):
        b1 = min(n, b0 + b)
        nb = b1 - b0
        rows_b = col_tab[b0:b1]  # (nb, col_w)
        seen = np.bitwise_or.reduce(row_masks[rows_b], axis=1)  # colours of earlier blocks, (nb, n_words)
        sat = np.bitwise_count(seen).sum(axis=1, dtype=np.int64)
        keys = np.full(b, -1, np.int64)
        keys[:nb] = (sat << SHIFT) | _ranks(degree[b0:b1])
        seen_pad = np.zeros((b, n_words), np.uint32)
        seen_pad[:nb] = seen
        group_max = keys.reshape(n_groups, GROUP).max(axis=1)
        tail = np.zeros(b + 1, np.int32)  # colours, then the running colour count
        state = np.concatenate([keys, group_max, seen_pad.ravel().view(np.int32), tail]).astype(np.int32)
        out, top = start_on_host(_dsatur_loop, conflicts, state, np.int32(nb), np.int32(limit), n_words=n_words)
        if i + 1 < len(starts):  # the next block's conflicts do not depend on colours: build them meanwhile
            conflicts = _block_conflicts(col_tab, row_tab, b1, min(n, b1 + b), b)
        if int(top) >= limit:
            return None
        block_colors = np.asarray(out)[:nb].astype(np.int64)
        colors[b0:b1] = block_colors
        # Record the block's colours in its rows' masks, for the blocks after it.
        c = np.broadcast_to(block_colors[:, None], rows_b.shape)
        real = rows_b < m
        np.bitwise_or.at(row_masks, (rows_b[real], c[real] // 32), (np.uint32(1) << (c[real] % 32)).astype(np.uint32))
    return colors
