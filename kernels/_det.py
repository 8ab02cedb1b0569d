"""Sign and log-abs-determinant of stacks of square matrices.

``jnp.linalg.slogdet`` calls LAPACK's LU once per matrix; for the small
Jacobians of coordinate changes and flows that per-call overhead dominates.
Here every matrix of a stack is processed at once, vectorised over the batch:

- ``k <= 4``: closed forms (cofactor and Laplace expansions), a single fused
  elementwise pass. A closed form can under- or overflow where the determinant
  itself does not, or round a singular matrix to a tiny value, so each result
  is checked (cheaply, from the partial products) and flagged as a NaN; the
  chunks of the batch holding a flagged result are redone by the same LU as
  below, elementwise over the batch (one test over the results, and branches
  that compile quickly: the rare path must not cost every first call).
- ``k <= _UNROLL_MAX``: LU without row exchanges, its columns unrolled,
  elementwise over the batch (one fused pass); where partial pivoting would
  exchange rows (or the pivots' product leaves the normal range) the result is
  flagged and the chunks holding one are redone by LAPACK's LU. Jacobians of
  flows and coordinate changes (``I`` plus something small) need no exchange.
- ``k <= _loop_max(dtype)`` (14 in float32, 9 in float64): on the CPU, LU with partial pivoting, its columns in
  ``fori_loop`` s (a bounded trace, so bounded compile time), on cache-sized
  blocks of matrices stored batch-last (the batch is the fastest axis, so each
  operation is a vector instruction over many matrices); elsewhere (GPU, TPU),
  where each loop trip is a kernel launch, the solver's batched LU.
- larger, or complex: ``jnp.linalg.slogdet``, faster there.

The LU is LAPACK's ``getf2`` (first maximal ``|pivot|``, a NaN never chosen
unless it is first; multipliers through the reciprocal pivot), and
``log|det|`` is the sum of ``log|pivot|``, so results follow NumPy's
``slogdet``: a zero pivot gives sign 0 and ``-inf``; an infinite pivot
``+inf``; and nothing under- or overflows that NumPy's does not. Unlike
NumPy's, an infinite *entry* anywhere gives ``+inf`` (with the sign of the
determinant's leading term as the entry grows), not the NaN of an elimination
that subtracts infinities: results that come out NaN or ``+inf`` are redone
(:func:`_limit_parts`, behind one test over the results). A NaN entry gives NaN.
Exact zero pivots for exactly singular input (repeated or proportional rows) are
the CPU's: on a GPU the LU's updates compile to fused multiply-adds (as in the
solver's own LU), and such matrices may come out with a tiny, finite ``|det|``.
"""

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import custom_batching

_CLOSED_MAX = 4  # closed forms up to this size
_UNROLL_MAX = 8  # LU without row exchanges, unrolled, up to this size
_LOOP_MAX = {4: 14, 8: 9}  # per itemsize: LU in loops up to this size, jnp.linalg.slogdet (faster) above
_GROUP = 4  # columns per fixed-size loop in the looped LU


def _loop_max(dtype) -> int:
    """The largest ``k`` for the looped LU: measured crossovers with LAPACK's on a 2-core CPU (B = 1e4)."""
    return _LOOP_MAX[8 if jnp.dtype(dtype).itemsize >= 8 else 4]  # float16/bfloat16 are computed in float32


# ---------------------------------------------------------------- closed forms


def _det2(a, b, c, d):
    return _difference(a * d, b * c)


def _difference(x, y):
    """``x - y``, exactly 0 where the two rounded products are equal.

    XLA may contract ``a * d - b * c`` into a fused multiply-add, which subtracts the rounded ``b * c`` from
    the exact ``a * d``: two equal rows then leave their rounding error (4.8e-17) instead of a singular 0.
    """
    return jnp.where(x == y, jnp.zeros((), x.dtype), x - y)


def _closed(a: jax.Array) -> jax.Array:
    """Closed-form determinants ``(B,)`` of ``a`` of shape ``(B, k, k)``, ``k <= 4``, NaN where to redo.

    The determinant is NaN where it may be less accurate than the LU's, for
    the LU to redo: the flag rides in the one output, so that the whole pass
    is one fused loop writing ``B`` values (XLA computed a separate flag, sign
    and log each in a pass of its own over the input). Two things can go
    wrong in an expansion by minors:

    - cancellation: its rounding error is up to a few ``eps * P``, with ``P``
      the same expansion in absolute values (the permanent of ``|A|``), while
      partial pivoting keeps the LU's error near ``eps * |det|`` times the
      growth; results with ``P > 2^12 |det|`` (``2^10`` in float32; 0.02% and
      0.1% of random Gaussian 3x3 matrices) are redone. A 2x2 determinant, one difference of two
      products, is as accurate as the LU's (and is ``jnp.linalg.slogdet``'s).
    - underflow: rounding an intermediate product to a subnormal or to zero
      loses at most the smallest subnormal times the largest factor ``M`` it
      multiplies later; ``|det| >= 2^(minexp + 22) max(M, 1)`` makes that
      negligible. An overflow shows as an infinite or NaN determinant.

    Exactly singular matrices (``det == 0``) are redone too, so that their
    sign and ``-inf`` follow the LU's zero pivots.
    """
    k = a.shape[-1]
    e = [[a[..., i, j] for j in range(k)] for i in range(k)]
    info = jnp.finfo(a.dtype)
    nan = np.asarray(np.nan, a.dtype)
    if k <= 2:
        d = e[0][0] if k == 1 else _det2(e[0][0], e[0][1], e[1][0], e[1][1])
        # No partial product is multiplied again: only the result's range is tested.
        ad = jnp.abs(d)
        lo, hi = (np.asarray(2.0 ** (s * (info.minexp + 22)), a.dtype) for s in (1, -1))
        return jnp.where((ad >= lo) & (ad <= hi), d, nan)

    def minor(i, j, p, q):  # 2x2 minor of rows i, j and columns p, q, and its absolute version
        x, y = e[i][p] * e[j][q], e[i][q] * e[j][p]
        return _difference(x, y), jnp.abs(x) + jnp.abs(y)

    if k == 3:
        # Cofactor expansion along the first row.
        c = [minor(1, 2, 1, 2), minor(1, 2, 2, 0), minor(1, 2, 0, 1)]
        d = sum(e[0][j] * c[j][0] for j in range(3))
        P = sum(jnp.abs(e[0][j]) * c[j][1] for j in range(3))
        m = functools.reduce(jnp.maximum, [jnp.abs(v) for v in e[0]])
    else:
        # Laplace expansion along the first two rows: each 2x2 minor of rows
        # 0-1 times its complementary minor of rows 2-3, with signs + - + + - +.
        pairs = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
        top = [minor(0, 1, i, j) for i, j in pairs]
        bot = [minor(2, 3, i, j) for i, j in pairs]
        signs = [1, -1, 1, 1, -1, 1]
        d = sum(s * top[i][0] * bot[5 - i][0] for i, s in enumerate(signs))
        P = sum(top[i][1] * bot[5 - i][1] for i in range(6))
        m = functools.reduce(jnp.maximum, [jnp.abs(v[0]) for v in top + bot])
    ad = jnp.abs(d)
    ok = (ad >= np.asarray(2.0 ** (info.minexp + 22), a.dtype) * jnp.maximum(m, 1)) & (ad < jnp.inf)
    ratio = 2.0**12 if info.bits == 64 else 2.0**10  # rounding error below ~3e-12 (f64), ~2e-4 (f32)
    return jnp.where(ok & (P <= ad * np.asarray(ratio, a.dtype)), d, nan)


# ---------------------------------------------------------------- LU, batch-last


def _reciprocal(p: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(s, 1 / (s p))`` with ``s`` a power of two that keeps the reciprocal finite.

    ``x / p`` is computed as ``(s x) * (1 / (s p))`` (XLA rewrites a division
    by a broadcast value into that product anyway); ``s`` is 1 unless ``p`` is
    subnormal, where ``1 / p`` would overflow. A zero pivot divides by 1, so
    that a singular column leaves the rows below unchanged, as in LAPACK.
    """
    info = jnp.finfo(p.dtype)
    s = jnp.where(jnp.abs(p) < info.tiny, np.asarray(2.0 ** (info.nmant + 2), p.dtype), np.asarray(1, p.dtype))
    return s, 1 / jnp.where(p == 0, np.asarray(1, p.dtype), p * s)


def _multiplier(x: jax.Array, p: jax.Array, s: jax.Array, inv: jax.Array) -> jax.Array:
    """``x / p`` (an entry of L) from :func:`_reciprocal`'s ``(s, inv)``; exactly ``+-1`` where ``x == +-p``.

    The reciprocal's product leaves its rounding (``x * (1 / x)`` need not be 1): a repeated row would
    eliminate to a tiny nonzero instead of the exact zero pivot of a singular matrix.
    """
    one = jnp.ones((), x.dtype)
    return jnp.where(x == p, one, jnp.where(x == -p, -one, (x * s) * inv))


def _rounded(q: jax.Array) -> jax.Array:
    """``q`` itself, rounded on its own: a select that XLA's CPU compiler cannot contract ``x - q`` through.

    The LU's update ``x - m y`` is otherwise one fused multiply-add, which keeps the product's rounding
    error: an exactly singular matrix (``[[1, 1], [3, 3]]``: ``1 - fl(1/3) 3``) then leaves a pivot of
    5.6e-17 and a finite ``log|det|``, where LAPACK's ``getf2`` (and NumPy) give exactly 0 and ``-inf``.
    """
    return jnp.where(q == 0, jnp.zeros((), q.dtype), q)


def _keeper(i: jax.Array, dtype):
    """An identity ``v -> v / one`` that XLA computes once instead of fusing it into each consumer.

    A division is an "expensive" op for XLA's fusion, which it does not
    duplicate; fusing the LU's many small steps into each other would
    otherwise multiply the work. ``one`` is 1, computed from a loop index
    ``i`` that XLA does not know (a loop of one trip is inlined and its index
    becomes a constant: callers run at least two).
    """
    one = jnp.where(i < 0, 2, 1).astype(dtype)
    return lambda y: y / one


def _eliminate(A: jax.Array, keep) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One column of LU with partial pivoting on a batch-last block ``(m, m, C)``.

    Args:
      A: the block; column 0 is eliminated.
      keep: an identity that XLA will not fuse into several consumers (see
        :func:`_keeper`), applied to the values used many times.

    Returns:
      ``(pivot, swapped, rest)``: the pivot ``(C,)``, whether a row swap took
      place ``(C,)`` and the updated trailing block ``(m - 1, m - 1, C)``.
    """
    m = A.shape[0]
    v = jnp.abs(A[:, 0])
    best, idx = v[0], jnp.zeros(v.shape[1:], A.dtype)
    for r in range(1, m):
        # The first maximum, and a NaN never wins unless it is first: LAPACK's idamax.
        gt = v[r] > best
        best, idx = jnp.where(gt, v[r], best), jnp.where(gt, np.asarray(r, A.dtype), idx)
    idx = keep(idx)
    P = A[0]
    for r in range(1, m):
        P = jnp.where((idx == r)[None], A[r], P)
    P = keep(P)  # the pivot row
    rows = jnp.arange(1, m, dtype=A.dtype)[:, None, None]
    rest = jnp.where(rows == idx[None, None], A[0][None], A[1:])  # row 0 takes the pivot row's place
    s, r = _reciprocal(P[0])
    mult = _multiplier(rest[:, 0], P[0][None], s[None], r[None])  # the multipliers, column 0 of L
    return P[0], idx != 0, keep(rest[:, 1:] - _rounded(mult[:, None] * P[None, 1:]))


def _from_pivots(neg: jax.Array, zero: jax.Array, logabs: jax.Array) -> tuple[jax.Array, jax.Array]:
    one = jnp.ones((), logabs.dtype)
    sign = jnp.where(zero, jnp.zeros((), logabs.dtype), jnp.where(neg, -one, one))
    return sign, jnp.where(zero, -jnp.inf, logabs)


def _lu_elementwise(a: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The same LU for ``a`` of shape ``(B, k, k)``, ``k <= _CLOSED_MAX``, elementwise over the batch (one fused pass).

    The entries are ``(B,)`` vectors and the pivoting selects between them, so
    the whole elimination is one loop over the batch; ``log|det|`` is the sum
    of ``log|pivot|`` (no product to under- or overflow).
    """
    k = a.shape[-1]
    rows = [[a[:, i, j] for j in range(k)] for i in range(k)]
    neg = jnp.zeros(a.shape[:1], bool)
    pivots = []
    while len(rows) > 1:
        m = len(rows)
        best, idx = jnp.abs(rows[0][0]), jnp.zeros(a.shape[:1], jnp.int32)
        for r in range(1, m):
            gt = jnp.abs(rows[r][0]) > best  # the first maximum; NaN never wins unless first
            best, idx = jnp.where(gt, jnp.abs(rows[r][0]), best), jnp.where(gt, r, idx)
        P = rows[0]
        for r in range(1, m):
            P = [jnp.where(idx == r, x, y) for x, y in zip(rows[r], P, strict=True)]
        others = [[jnp.where(idx == r, x, y) for x, y in zip(rows[0], rows[r], strict=True)] for r in range(1, m)]
        s, inv = _reciprocal(P[0])
        mults = [_multiplier(R[0], P[0], s, inv) for R in others]  # column 0 of L, once per row
        rows = [[x - _rounded(m * y) for x, y in zip(R[1:], P[1:], strict=True)]
                for R, m in zip(others, mults, strict=True)]
        pivots.append(P[0])
        neg = neg ^ (idx != 0)
    pivots.append(rows[0][0])
    neg = functools.reduce(jnp.logical_xor, [p < 0 for p in pivots], neg)
    zero = functools.reduce(jnp.logical_or, [p == 0 for p in pivots])
    return _from_pivots(neg, zero, sum(jnp.log(jnp.abs(p)) for p in pivots))


def _lu_nopivot(a: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(sign, logabsdet)`` of ``a`` (``(B, k, k)``) by the LU without row exchanges, elementwise over the batch.

    Where no step of partial pivoting would exchange rows (every pivot is a
    first maximum of its column: diagonally dominant Jacobians, such as a
    flow's ``I + small``), this is the same elimination as :func:`_eliminate`'s
    and gives the same result, at half its work and without its selects (one
    fused pass, no blocks). Everywhere else ``logabsdet`` is NaN, for the
    pivoting LU to redo: a row exchange, a NaN or infinite pivot, or a partial
    product of the pivots outside the normal range (the log of their product
    is then inexact); an exactly singular matrix with no exchange keeps its
    zero pivot (sign 0, ``-inf``), as in LAPACK.
    """
    k = a.shape[-1]
    rows = [[a[:, i, j] for j in range(k)] for i in range(k)]
    swap = jnp.zeros(a.shape[:1], bool)
    pivots = []
    while len(rows) > 1:
        p = rows[0][0]
        ap = jnp.abs(p)
        swap = functools.reduce(jnp.logical_or, [~(jnp.abs(r[0]) <= ap) for r in rows[1:]], swap)  # NaN: True
        s, inv = _reciprocal(p)
        mults = [_multiplier(R[0], p, s, inv) for R in rows[1:]]  # column 0 of L, once per row
        rows = [[x - _rounded(m * y) for x, y in zip(R[1:], rows[0][1:], strict=True)]
                for R, m in zip(rows[1:], mults, strict=True)]
        pivots.append(p)
    pivots.append(rows[0][0])
    info = jnp.finfo(a.dtype)
    lo, hi = np.asarray(2.0 ** (info.minexp + 22), a.dtype), np.asarray(2.0 ** (info.maxexp - 24), a.dtype)
    prod = jnp.abs(pivots[0])
    safe = (prod >= lo) & (prod <= hi)
    for p in pivots[1:]:
        prod = prod * jnp.abs(p)
        safe = safe & (prod >= lo) & (prod <= hi)
    neg = functools.reduce(jnp.logical_xor, [p < 0 for p in pivots])
    zero = functools.reduce(jnp.logical_or, [p == 0 for p in pivots])
    sign, logabs = _from_pivots(neg, zero, jnp.log(prod))
    return sign, jnp.where(~swap & (safe | zero), logabs, np.asarray(np.nan, a.dtype))


def _lu_looped(A: jax.Array, keep) -> tuple[jax.Array, jax.Array]:
    """The same LU with the columns in ``fori_loop`` s: a trace of bounded size.

    A loop needs a fixed block size: each step eliminates column 0, then drops
    the pivot row and column and appends a row and column of the identity at
    the end, which leaves the determinant unchanged. After ``_GROUP`` steps the
    appended identity is sliced off, so the work still shrinks with the block.
    """
    del keep  # the loop carry materialises the block; each step keeps with its own index
    dtype, C = A.dtype, A.shape[2]
    state = (jnp.zeros((C,), bool), jnp.zeros((C,), bool), jnp.zeros((C,), dtype))  # neg, zero, logabs
    while A.shape[0]:
        m = A.shape[0]
        steps = min(_GROUP, m)
        corner = np.zeros((m, m, 1), dtype)
        corner[-1, -1] = 1

        def step(t, carry, corner=corner):
            A, neg, zero, logabs = carry
            p, swapped, rest = _eliminate(A, _keeper(t, dtype))  # the loop carry materialises A itself
            A = jnp.pad(rest, ((0, 1), (0, 1), (0, 0))) + corner
            return A, neg ^ swapped ^ (p < 0), zero | (p == 0), logabs + jnp.log(jnp.abs(p))

        A, *state = jax.lax.fori_loop(0, steps, step, (A, *state))
        A = A[: m - steps, : m - steps]
    return _from_pivots(*state)


def _blocks(a: jax.Array) -> tuple[jax.Array, jax.Array]:
    """LU ``(sign, logabsdet)`` of ``a`` of shape ``(B, k, k)``, block by block in a loop.

    A block of matrices stays in cache. Each trip works on the block in the
    loop carry and loads the next: as a loop carry XLA materialises it
    batch-last (contiguous along the batch), which the vectorised loops need,
    instead of transposing it inside every operation that reads it.
    """
    B, k, _ = a.shape
    # Blocks of about 128 KiB, a power of two of matrices: measured best on a 2-core CPU.
    budget = 128 * 1024 // (k * k * a.dtype.itemsize)
    C = min(max(64, 1 << (budget.bit_length() - 1)), 512, B)
    n = -(-B // C)
    flat = a.reshape(-1)  # through 1-D, so that the transpose below is a real copy

    def load(i):
        start = jnp.minimum(i * C, B - C)  # the last block overlaps the one before it
        blk = jax.lax.dynamic_slice_in_dim(flat, start * k * k, C * k * k)
        return jnp.transpose(blk.reshape(C, k * k)).reshape(k, k, C)

    def body(blk, i):
        sign, logabs = _lu_looped(blk, _keeper(i, a.dtype))
        # The next block depends on this one's result, so that it can take
        # the carry's buffer in place (else XLA copies the block twice).
        zero = jnp.abs(sign[0]) * 0  # +0.0: x - 0 == x for every x, -0.0 included
        return load(i + 1) - zero, (sign, logabs)

    # At least two trips (a single block is done twice), see _keeper.
    _, (sign, logabs) = jax.lax.scan(body, load(0), jnp.arange(max(n, 2)))
    sign, logabs = sign[:n], logabs[:n]
    if n * C == B:
        return sign.reshape(-1), logabs.reshape(-1)
    tail = B - (n - 1) * C
    return tuple(jnp.concatenate([x[:-1].reshape(-1), x[-1, C - tail :]]) for x in (sign, logabs))


# -------------------------------------------------------- closed forms + LU redo


_FIX_CHUNK = 512  # matrices per chunk of the rare redo: its temporaries stay small, and few chunks hold a flag
_FIX_WHOLE = 4 << 20  # bytes of a stack redone in one piece


def _redo_chunks(a: jax.Array, sign: jax.Array, logabs: jax.Array, fix: Callable) -> tuple[jax.Array, jax.Array]:
    """Redo the flagged (NaN or ``+inf``) results of ``a`` (``(B, k, k)``) by ``fix``, chunk by chunk.

    The rare branch. Chunks of up to ``_FIX_CHUNK`` matrices, ``_FIX_WHOLE`` bytes (the last one overlaps
    the one before it) in a loop, each redone only when it holds a flagged
    result: the cost follows the number of flagged chunks, and the branch's
    temporaries are a chunk's, not the batch's (XLA sizes one allocation per
    call for every buffer of the program, branches included; past glibc's
    32 MB it is a fresh mapping, and writing the batch's buffers into it faulted
    in their pages on every call, 2 ms at B = 1e5, k = 3).

    Args:
      a: the stack.
      sign, logabs: ``(B,)`` results so far; NaN or ``+inf`` in ``logabs`` marks the ones to redo.
      fix: ``(chunk, sign, logabs) -> (sign, logabs)`` on ``C`` matrices.
    """
    B = a.shape[0]
    C = max(1, min(_FIX_CHUNK, _FIX_WHOLE // max(a[0].size * a.dtype.itemsize, 1)))  # large k: fewer per chunk
    if a.size * a.dtype.itemsize <= _FIX_WHOLE or B <= C:
        return fix(a, sign, logabs)  # a small stack in one piece: no loop to compile, small temporaries anyway

    def body(i, carry):
        start = jnp.minimum(i * C, B - C)
        blk = jax.lax.dynamic_slice_in_dim(a, start, C)
        s, la = (jax.lax.dynamic_slice_in_dim(v, start, C) for v in carry)
        # +inf and NaN make the sum NaN or +inf; -inf (singular, exact) alone does not.
        s, la = jax.lax.cond(~(jnp.sum(la) < jnp.inf), fix, lambda blk, s, la: (s, la), blk, s, la)
        return tuple(jax.lax.dynamic_update_slice_in_dim(v, x, start, 0) for v, x in zip(carry, (s, la), strict=True))

    return jax.lax.fori_loop(0, -(-B // C), body, (sign, logabs))


def _limit_where(a: jax.Array, sign: jax.Array, logabs: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(sign, logabs)`` with the NaN and ``+inf`` results replaced by the limit (LAPACK's LU of both stacks)."""
    point, finish = _limit_parts(a)
    # Two LUs: one on the two stacks concatenated compiled 0.13 s slower (k = 256, on the CPU).
    lim_sign, lim_log = finish(*jnp.linalg.slogdet(point(1)), *jnp.linalg.slogdet(point(2)))
    flagged = ~(logabs < jnp.inf)  # NaN or +inf; -inf (singular) is exact
    return jnp.where(flagged, lim_sign, sign), jnp.where(flagged, lim_log, logabs)


def _fix_lu(a: jax.Array, sign: jax.Array, logabs: jax.Array, lu: Callable) -> tuple[jax.Array, jax.Array]:
    """A chunk's NaN and ``+inf`` results redone by the pivoting LU ``lu``, and by the limit where it gives them.

    The limit only when some redone result needs it (matrices merely singular or ill-conditioned, the
    common reason for a redo, pay one LU). Measured on the 3x3 closed forms' branch: this compiles in
    0.53 s where one LU instance for both in a loop took 0.64 (the LU alone: 0.30), and
    runs random batches (a flagged result in most chunks) 1.7x faster.
    """
    redo = ~(logabs < jnp.inf)
    lu_sign, lu_log = lu(a)
    sign, logabs = jnp.where(redo, lu_sign, sign), jnp.where(redo, lu_log, logabs)
    return jax.lax.cond(~(jnp.sum(logabs) < jnp.inf), _limit_where, lambda a, s, la: (s, la), a, sign, logabs)


def _stack(a: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(sign, logabsdet)`` of ``a`` of shape ``(B, k, k)``, real floating, ``k >= 1``.

    Up to ``_CLOSED_MAX``: the closed form in one fused pass and, only when
    some result is flagged, the elementwise LU on the chunks that hold one
    (:func:`_redo_chunks`): a ``cond`` of small branches, cheap to compile.
    Its test is whether the sum of the determinants is NaN (every flag is a
    NaN, which the sum carries; the flagged range keeps the sum finite): one
    reduction, where ``any(isnan(d))`` took three passes. Up to
    ``_UNROLL_MAX``: the LU without row exchanges (:func:`_lu_nopivot`), the
    chunks it flags redone by LAPACK's. Up to ``_loop_max``: the blocked, looped pivoting
    LU on the CPU, the solver's elsewhere; above, the solver's (:func:`_lapack`). Every path's NaN and
    ``+inf`` results are redone by the limit.
    """
    k = a.shape[-1]
    if k > _loop_max(a.dtype):
        return _lapack(a)
    if k > _UNROLL_MAX:
        return jax.lax.platform_dependent(a, cpu=_looped, default=_lapack)
    if k > _CLOSED_MAX:
        # Materialised first: the LU reads each entry once, but a producer's shared terms (a row's tanh)
        # would be recomputed per entry.
        a = jax.lax.optimization_barrier(a)
        return _finite_fix(a, *_lu_nopivot(a))
    d = _closed(a)
    # Sign and log in the determinants' own fused pass (in a branch of the cond they were a pass of their
    # own: 5-10% of a 2x2 stack's time); the flags (NaN) carry through to the branch that redoes them.
    sign, logabs = jnp.sign(d), jnp.log(jnp.abs(d))
    fix = functools.partial(_fix_lu, lu=_lu_elementwise)
    return jax.lax.cond(jnp.isnan(jnp.sum(d)), lambda s, la: _redo_chunks(a, s, la, fix), lambda s, la: (s, la),
                        sign, logabs)


def _looped(a: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The blocked, looped pivoting LU (:func:`_blocks`), its NaN and ``+inf`` results redone by the limit."""
    # Materialised first: fused into the LU's loops, the producer of ``a`` (a Jacobian's tanh, say)
    # would be recomputed per use and per block.
    a = jax.lax.optimization_barrier(a.reshape(-1)).reshape(a.shape)
    return _finite_fix(a, *_blocks(a))


def _lapack(a: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The solver's batched LU (LAPACK's; cuSOLVER's on a GPU), its NaN and ``+inf`` results redone by the limit.

    Off the CPU each trip of :func:`_looped`'s loops is a kernel launch: measured on an H200
    (``bench/results/gpu-h200``), 12.4 ms against 0.17 ms for ``jnp.linalg.slogdet`` at k = 16, B = 1e4.
    One LU and one ``cond`` for the rare limit, chunk by chunk. A ``while_loop`` sharing one LU instance between the
    call and the limit compiled 10% faster on the CPU (k = 256) but ran 1.3-1.5x slower there (k = 24,
    B = 1e4: the loop carried a copy of the stack) and read its predicate on the host per trip on a GPU.
    """
    # Chunk by chunk: the limit's temporaries (two stacks) sized for the whole batch made XLA's one
    # allocation per call large enough to fault its pages in on every call (k = 16, B = 1e4: 1.8x slower).
    # The LU's NaN and +inf are the limit's: no second LU of the chunk first.
    return _finite_fix(a, *jnp.linalg.slogdet(a), fix=_limit_where)


def _batched_impl(a: jax.Array) -> tuple[jax.Array, jax.Array]:
    k = a.shape[-1]
    if a.size == 0:  # an empty batch (also one that vmap makes empty): no blocks to loop over
        return jnp.ones(a.shape[:-2], a.dtype), jnp.zeros(a.shape[:-2], a.dtype)
    sign, logabs = _stack(a.reshape((-1, k, k)))
    return sign.reshape(a.shape[:-2]), logabs.reshape(a.shape[:-2])


_batched = custom_batching.custom_vmap(_batched_impl)


@_batched.def_vmap
def _batched_vmap(axis_size, in_batched, a):
    # Under vmap the mapped axis (at 0) is one more batch axis: keeps the
    # whole-batch test in _stack a test, instead of computing both branches.
    # An input the vmap does not map (a scan's residuals under jax.hessian) gives outputs it does not map,
    # computed by the implementation itself: claiming them mapped gave wrong shapes, and calling _batched
    # on them came back to this rule without end.
    del axis_size
    return (_batched if in_batched[0] else _batched_impl)(a), (in_batched[0], in_batched[0])


_batched_jit = jax.jit(_batched)  # called eagerly, the loops above would run op by op


# ---------------------------------------------------------------- infinite entries


def _limit_parts(a: jax.Array) -> tuple[jax.Array, Callable]:
    """The limit ``(sign, logabsdet)`` of matrices with infinite entries: the stacks to factor, and the finish.

    An LU of a matrix with an infinite entry subtracts infinities (NaN) even
    where its determinant is plainly infinite: ``det`` is a polynomial in the
    infinite entries, here ``det(F + t S)`` with ``F`` the finite entries
    (scaled by a power of two near their largest), ``S`` the signs of the
    infinite ones and ``t -> inf``. Evaluated at two large ``t`` (this runs
    only where an LU gave NaN or ``+inf``): when it grows with ``t`` the
    result is ``+inf`` with the sign of the leading term; when it does not
    the infinite entries meet only zero cofactors (``inf * 0``) and the
    result is NaN. Matrices without infinite entries get the LU of the scaled
    matrix (an elimination that overflowed on the unscaled one); a NaN entry
    gives NaN.

    Returns:
      ``(point, finish)``: ``point(i)`` is the stack ``F + t_i S`` (``i`` 1 or
      2, may be traced) and ``finish(s1, l1, s2, l2)`` gives the ``B`` limits
      from the two stacks' ``(sign, logabsdet)``.
    """
    k = a.shape[-1]
    inf = jnp.isinf(a)
    has_inf = jnp.any(inf, axis=(-2, -1))
    has_nan = jnp.any(jnp.isnan(a), axis=(-2, -1))
    F = jnp.where(inf, jnp.zeros((), a.dtype), a)
    big = jnp.max(jnp.abs(F), axis=(-2, -1))
    # The power of two at or below the largest finite entry: its exponent bits (cheaper to compile than frexp).
    ints = jnp.dtype(f"uint{jnp.finfo(a.dtype).bits}")
    mask = np.asarray(((1 << jnp.finfo(a.dtype).nexp) - 1) << jnp.finfo(a.dtype).nmant, ints)
    p = jax.lax.bitcast_convert_type(jax.lax.bitcast_convert_type(big, ints) & mask, a.dtype)
    p = jnp.where((p > 0) & (p < jnp.inf), p, np.asarray(1, a.dtype))  # zero, subnormal or NaN: unscaled
    F = F * (1 / p)[:, None, None]  # exact (powers of two): |F| < 2
    S = jnp.where(inf, jnp.sign(a), jnp.zeros((), a.dtype))
    step = 20 if jnp.finfo(a.dtype).bits < 64 else 40  # t = 2^step and 2^(2 step)
    t1, t2 = (np.asarray(2.0 ** (step * i), a.dtype) for i in (1, 2))

    def point(i):
        return F + jnp.where(i == 1, t1, t2) * S

    def finish(s1, l1, s2, l2):
        # Degree >= 1 in t: the log grows by step * degree * log 2 in the limit.
        grows = l2 - l1 > np.asarray(0.5 * step * np.log(2), a.dtype)
        nan = jnp.full_like(l1, jnp.nan)
        scaled = l1 + k * jnp.log(p)
        sign = jnp.where(has_nan, nan, jnp.where(has_inf, jnp.where(grows, s2, nan), s1))
        logabs = jnp.where(has_nan, nan, jnp.where(has_inf, jnp.where(grows, jnp.inf, nan), scaled))
        return sign, logabs

    return point, finish


def _finite_fix(a: jax.Array, sign: jax.Array, logabs: jax.Array, fix: Callable | None = None
                ) -> tuple[jax.Array, jax.Array]:
    """Redo the results of ``a`` (``(B, k, k)``) that are NaN or ``+inf``, chunk by chunk (:func:`_redo_chunks`).

    ``fix``: how a chunk is redone; by default LAPACK's LU, then the limit where it gives NaN or
    ``+inf`` too (:func:`_fix_lu`). One test over the results (not the input) when none is: the fast
    paths pay a reduction over ``B`` values.
    """
    fix = fix or functools.partial(_fix_lu, lu=jnp.linalg.slogdet)
    return jax.lax.cond(~(jnp.sum(logabs) < jnp.inf), lambda s, la: _redo_chunks(a, s, la, fix),
                        lambda s, la: (s, la), sign, logabs)


# ---------------------------------------------------------------- gradient


def _inverse_transpose(a: jax.Array) -> jax.Array:
    """``A^{-T}`` for the gradient ``d log|det A| / dA = A^{-T}`` (5.101 divided by det A).

    Up to 3x3 by cofactors, after scaling by a power of two (exact) so that
    neither the cofactors nor the determinant over- or underflow; larger by
    ``jnp.linalg.solve``, as ``jnp.linalg.slogdet``'s own rule.
    """
    k = a.shape[-1]
    if k > 3:
        eye = jnp.broadcast_to(jnp.eye(k, dtype=a.dtype), a.shape)
        return jnp.swapaxes(jnp.linalg.solve(a, eye), -1, -2)
    big = jnp.max(jnp.abs(a), axis=(-2, -1), keepdims=True)
    _, e = jnp.frexp(jnp.where((big > 0) & (big < jnp.inf), big, 1))
    s = jnp.ldexp(jnp.ones((), a.dtype), -e)
    b = a * s
    e_ = [[b[..., i, j] for j in range(k)] for i in range(k)]
    if k == 1:
        cof = [[jnp.ones_like(e_[0][0])]]
    elif k == 2:
        cof = [[e_[1][1], -e_[1][0]], [-e_[0][1], e_[0][0]]]
    else:
        cof = [
            [
                _det2(
                    e_[(i + 1) % 3][(j + 1) % 3],
                    e_[(i + 1) % 3][(j + 2) % 3],
                    e_[(i + 2) % 3][(j + 1) % 3],
                    e_[(i + 2) % 3][(j + 2) % 3],
                )
                for j in range(3)
            ]
            for i in range(3)
        ]
    det = sum(e_[0][j] * cof[0][j] for j in range(k))
    cof = jnp.stack([jnp.stack(row, axis=-1) for row in cof], axis=-2)
    return cof * (s / det[..., None, None])


class SlogdetResult(NamedTuple):
    """``(sign, logabsdet)``, as ``jnp.linalg.slogdet`` returns them: a tuple, its fields named."""

    sign: jax.Array
    logabsdet: jax.Array


@jax.custom_jvp
def slogdet(a: jax.Array) -> "SlogdetResult":
    """Sign and natural log of ``|det|`` of a stack of square matrices.

    Same results as ``jnp.linalg.slogdet`` (NumPy's semantics for singular and
    non-finite input, see the module docstring) and the same gradient,
    ``d logabsdet / dA = A^{-T}``, faster for stacks of small matrices.

    Args:
      a: shape ``(..., k, k)``; real or complex floating point (integers are
        promoted like ``jnp.linalg.slogdet`` does).

    Returns:
      :class:`SlogdetResult` ``(sign, logabsdet)`` (a named tuple, as ``jnp.linalg.slogdet``'s), each of
      shape ``a.shape[:-2]``. A singular matrix has sign 0 and logabsdet ``-inf``; logabsdet stays finite where
      ``det`` itself would under- or overflow.
    """
    a = jnp.asarray(a)
    if not jnp.issubdtype(a.dtype, jnp.inexact):
        a = a.astype(jnp.result_type(float))
    if a.ndim < 2 or a.shape[-2] != a.shape[-1]:
        raise ValueError(f"jacobians.kernels.slogdet: a must have shape (..., k, k), got {tuple(a.shape)}.")
    k, batch = a.shape[-1], a.shape[:-2]
    if k == 0 or a.size == 0:
        return SlogdetResult(jnp.ones(batch, a.dtype), jnp.zeros(batch, a.dtype))
    if jnp.issubdtype(a.dtype, jnp.complexfloating):
        return SlogdetResult(*jnp.linalg.slogdet(a))
    if jnp.finfo(a.dtype).bits < 32:  # float16 and bfloat16: compute in float32
        sign, logabs = _batched_jit(a.astype(jnp.float32))
        return SlogdetResult(sign.astype(a.dtype), logabs.astype(a.dtype))
    return SlogdetResult(*_batched_jit(a))


@slogdet.defjvp
def _slogdet_jvp(primals, tangents):
    (a,), (da,) = primals, tangents
    sign, logabs = slogdet(a)
    a = jnp.asarray(a)
    k = a.shape[-1]
    dtype = a.dtype if jnp.issubdtype(a.dtype, jnp.inexact) else jnp.result_type(float)
    # float16 and bfloat16 in float32 (as the primal; LAPACK has no half-precision LU)
    work = jnp.float32 if jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < 32 else dtype
    if jnp.issubdtype(a.dtype, jnp.complexfloating) or k == 0 or k > _loop_max(dtype):
        # jnp's rule; the primal stays this function's own.
        _, (dsign, dlog) = jax.jvp(jnp.linalg.slogdet, (a.astype(work),), (jnp.asarray(da).astype(work),))
        return SlogdetResult(sign, logabs), SlogdetResult(dsign.astype(sign.dtype), dlog.astype(logabs.dtype))
    dlog = jnp.sum(_inverse_transpose(a.astype(work)) * jnp.asarray(da, work), axis=(-2, -1))
    return SlogdetResult(sign, logabs), SlogdetResult(jnp.zeros_like(sign), dlog.astype(dtype))
