"""Greedy partial distance-2 colouring of columns in a given order: on the host, or as a compiled loop.

Each row keeps a bitmask of the colours already used by its columns. The
colours forbidden for column ``j`` are then the OR of its rows' masks, so a
column costs ``O(len(j) * words)``, never a walk over its rows' columns: the
greedy pass is ``O(nnz)`` however full the rows. Colouring ``j`` with ``c``
sets bit ``c`` in its rows' masks (bit ``c`` is clear there by construction,
so a scatter-add sets it).

Patterns of modest size are coloured on the host with Python integers as the
masks (unbounded: no mask width to guess and retry), about 0.3 us a column
plus 0.1 us an entry. Larger ones run on the CPU as one counted
``lax.fori_loop`` over columns, about 0.2 us a column, whose compilation
(0.15-0.6 s the first time a process meets its sizes) only pays off there.
Its body is branch-free and reads the masks before writing them once (XLA
then updates them in place). Long columns would force a wide padded table on
every step; the few longer than the table width are coloured first on the host.
"""

import operator
from functools import partial, reduce

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .graph import Structure, bucket, padded, run_on_host


def first_free(words: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """The smallest colour whose bit is clear in a bitmask.

    Args:
      words: the mask, uint32 ``(W,)``; colour ``c`` is bit ``c % 32`` of word ``c // 32``.

    Returns:
      ``(word, bit, color, full)``: the word index (int32), the colour's bit as a
      uint32 mask, the colour (int32), and whether every bit was set (then the
      others are meaningless).
    """
    inv = ~words
    free = inv != 0
    idx = jnp.arange(words.shape[0], dtype=jnp.int32)
    w = jnp.min(jnp.where(free, idx, words.shape[0] - 1))
    x = inv[w]
    low = x & (~x + np.uint32(1))  # lowest set bit
    color = w * 32 + (31 - lax.clz(low)).astype(jnp.int32)
    return w, low, color, ~jnp.any(free)


def _first_free_scalars(words: list[jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """:func:`first_free` of a mask given as uint32 scalars; a full mask gives colour ``32 * len(words)``."""
    w, inv = jnp.int32(len(words) - 1), ~words[-1]
    for k in range(len(words) - 2, -1, -1):
        free = ~words[k] != 0
        w, inv = jnp.where(free, jnp.int32(k), w), jnp.where(free, ~words[k], inv)
    low = inv & (~inv + np.uint32(1))
    full = inv == 0
    color = jnp.where(full, 32 * len(words), w * 32 + (31 - lax.clz(low)).astype(jnp.int32))
    return w, low, color, full


def _or(x: jax.Array) -> jax.Array:
    return lax.reduce(x, np.uint32(0), lax.bitwise_or, (0,))


@partial(jax.jit, static_argnames="n_words")
def _greedy_loop(order: jax.Array, col_rows: jax.Array, masks: jax.Array, count: jax.Array, n_words: int):
    """Colour ``order[:count]`` greedily.

    ``col_rows`` is padded with an out-of-range row; ``masks`` is flat, word ``w``
    of row ``r`` at ``r * n_words + w`` (XLA's CPU gathers from 2-D arrays with a
    minor dimension above 1 are far slower).
    """
    n = col_rows.shape[0]
    size = masks.shape[0]

    def body(t, state):
        masks, colors = state
        j = order[t]
        base = col_rows[j] * n_words  # out of range for padding rows
        base = jnp.where(base < size, base, size)
        # Word by word, kept scalar (no stacking into a vector): XLA's CPU backend splits fusions with
        # vector results that read a big operand into thread-pool tasks, costing microseconds per step.
        words = [_or(masks.at[base + w].get(mode="fill", fill_value=0)) for w in range(n_words)]
        w, low, c, _ = _first_free_scalars(words)
        masks = masks.at[base + w].add(low, mode="drop")
        return masks, colors.at[j].set(c)

    # A counted loop, and overflow reported through the colours (32 * n_words): an early exit,
    # or a carried flag, makes every step several times slower.
    return (lax.fori_loop(0, count, body, (masks, jnp.zeros(n, jnp.int32)))[1],)


# Up to this much work (columns + entries / 4) the greedy pass runs on the host in Python integers (about
# 0.3 us a column, 0.1 us an entry: under 0.2 s): compiling the loop costs 0.15-0.6 s the first time a process
# meets its sizes, a plan's whole budget (a 10^4-column banded pattern: 4 ms on the host, 0.36-0.58 s compiled).
HOST_MAX = 1 << 19


def host_greedy(s: Structure, seq: np.ndarray) -> np.ndarray:
    """Colour the columns ``seq`` of ``s`` greedily in that order, on the host; the others get 0.

    Each row's mask is a Python integer (bit ``c``: colour ``c`` is taken there), so no
    colour count overflows it: the first free colour of a column is the lowest clear bit
    of its rows' OR, ``~used & (used + 1)``.
    """
    masks = [0] * s.n_rows
    get = masks.__getitem__
    ptr, col_rows = s.col_ptr.tolist(), s.col_rows.tolist()
    colors = [0] * s.n_cols
    for j in seq.tolist():
        rows = col_rows[ptr[j] : ptr[j + 1]]
        if not rows:
            continue
        used = reduce(operator.or_, map(get, rows))
        low = ~used & (used + 1)
        for r in rows:
            masks[r] |= low
        colors[j] = low.bit_length() - 1
    return np.asarray(colors, np.int64)


def _host_column(masks: np.ndarray, rows: np.ndarray) -> int | None:
    """Colour one column on the host: OR its rows' masks, take the first free bit, record it."""
    inv = ~np.bitwise_or.reduce(masks[rows], axis=0)
    free = np.flatnonzero(inv)
    if not free.size:
        return None
    w = int(free[0])
    x = int(inv[w])
    bit = (x & -x).bit_length() - 1
    masks[rows, w] |= np.uint32(1 << bit)
    return 32 * w + bit


def greedy_columns(s: Structure, order: np.ndarray, n_words: int) -> np.ndarray | None:
    """Greedy distance-2 colouring of the columns of ``s``, visiting them in ``order``.

    Args:
      s: the pattern.
      order: a permutation of ``range(s.n_cols)``.
      n_words: 32-colour words per row mask.

    Returns:
      Colours, int64 ``(n_cols,)`` (empty columns get 0), or None when some column
      found all ``32 * n_words`` colours taken (retry with more words; only the compiled
      loop's masks have a width, :func:`host_greedy`'s never fill).
    """
    n, m = s.n_cols, s.n_rows
    lens = s.col_len
    nonempty = lens > 0
    mean = s.rows.size / max(int(nonempty.sum()), 1)
    width = min(bucket(lens.max(initial=1)), bucket(2 * mean, lo=4))
    long = lens > width
    order = np.asarray(order, np.int64)
    # Long columns first (a greedy order that puts them early anyway, largest first, loses nothing), on the
    # host; all of them there (in Python integers) unless the pattern is large.
    light = order[nonempty[order] & ~long[order]]
    if light.size + s.rows.size // 4 <= HOST_MAX:
        return host_greedy(s, np.concatenate([order[long[order]], light]))
    m_pad = bucket(m, lo=1024)
    masks = np.zeros((m_pad, n_words), np.uint32)
    colors = np.zeros(n, np.int64)
    for j in order[long[order]]:
        c = _host_column(masks, s.col_rows[s.col_ptr[j] : s.col_ptr[j + 1]])
        if c is None:
            return None
        colors[j] = c
    if light.size:
        n_pad = bucket(n, lo=1024)
        table = padded(s.col_ptr, s.col_rows, nonempty & ~long, width, n_pad, m_pad)
        seq = np.zeros(bucket(light.size, lo=1024), np.int32)
        seq[: light.size] = light
        (out,) = run_on_host(_greedy_loop, seq, table, masks.ravel(), np.int32(light.size), n_words=n_words)
        colors[light] = out[light]
        if colors[light].max() >= 32 * n_words:
            return None
    return colors
