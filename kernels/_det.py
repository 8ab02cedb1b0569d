"""Sign and log-abs-determinant of stacks of small square matrices.

``jnp.linalg.slogdet`` calls a general LU per matrix; for the tiny Jacobians of
2-D/3-D coordinate changes and flows that overhead dominates. Here 1x1, 2x2 and
3x3 use closed forms and sizes up to ``_UNROLL_MAX`` an LU with partial
pivoting unrolled over the columns, vectorised over the batch; larger ones fall
back to ``jnp.linalg.slogdet``. A singular matrix gives sign 0 and
log|det| = -inf, never NaN.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

_UNROLL_MAX = 32


def _closed_form_det(b: list[list[jax.Array]]) -> jax.Array:
    k = len(b)
    if k == 1:
        return b[0][0]
    if k == 2:
        return b[0][0] * b[1][1] - b[0][1] * b[1][0]
    # Cofactor expansion along the first row (the rule of Sarrus).
    c0 = b[1][1] * b[2][2] - b[1][2] * b[2][1]
    c1 = b[1][2] * b[2][0] - b[1][0] * b[2][2]
    c2 = b[1][0] * b[2][1] - b[1][1] * b[2][0]
    return b[0][0] * c0 + b[0][1] * c1 + b[0][2] * c2


def _pow2_scale(r: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A power of two ``2^-p`` with ``r * 2^-p`` in [1, 4), and ``p``; by bit manipulation.

    ``jnp.frexp``/``ldexp`` handle every special case and are several times
    slower on CPU than the rest of a 3x3 determinant; here the exponent field
    is read and written directly. Zero and subnormal ``r`` get the largest
    scale, infinite ``r`` the smallest; both keep the scaled row finite.
    """
    info = jnp.finfo(r.dtype)
    itype = jnp.dtype(f"int{info.bits}")
    bias = info.maxexp - 1
    field = (jax.lax.bitcast_convert_type(r, itype) >> info.nmant) & (2 * bias + 1)
    biased = jnp.clip(2 * bias - field, 1, 2 * bias)  # exponent field of the scale
    scale = jax.lax.bitcast_convert_type(biased.astype(itype) << info.nmant, r.dtype)
    return scale, (biased - bias).astype(r.dtype)


def _small_slogdet(a: jax.Array) -> tuple[jax.Array, jax.Array]:
    # Work entry by entry on arrays of the batch shape: everything below is
    # elementwise, so XLA fuses it into a single pass over the batch (a
    # reduction over the tiny trailing axes fuses poorly and is recomputed).
    k = a.shape[-1]
    rows = [[a[..., i, j] for j in range(k)] for i in range(k)]
    scaled, p_sum = [], 0
    for row in rows:
        # Scale each row by a power of two near its largest entry, so that
        # the determinant neither under- nor overflows:
        # det(A) = 2^-(p_1 + ... + p_k) det(A'), exactly, with one log per matrix.
        r = functools.reduce(jnp.maximum, [jnp.abs(v) for v in row])
        scale, p = _pow2_scale(r)
        scaled.append([v * scale for v in row])
        p_sum = p_sum + p
    d = _closed_form_det(scaled)
    ln2 = np.log(2.0).astype(a.dtype)
    return jnp.sign(d), jnp.log(jnp.abs(d)) - p_sum * ln2


def _lu_slogdet(a: jax.Array) -> tuple[jax.Array, jax.Array]:
    batch = a.shape[:-2]
    sign = jnp.ones(batch, a.dtype)
    logabs = jnp.zeros(batch, a.dtype)
    while a.shape[-1] > 0:
        m = a.shape[-1]
        p = jnp.argmax(jnp.abs(a[..., :, 0]), axis=-1)  # pivot row in the trailing block
        prow = jnp.take_along_axis(a, p[..., None, None], axis=-2)[..., 0, :]
        pivot = prow[..., 0]
        sign = sign * jnp.where(p == 0, 1, -1) * jnp.sign(pivot)
        logabs = logabs + jnp.log(jnp.abs(pivot))
        # Swap row 0 with row p, then eliminate below the pivot.
        rest = a[..., 1:, :]
        rows = jnp.expand_dims(jnp.arange(1, m), tuple(range(p.ndim)))
        moved = (rows == p[..., None])[..., None]
        rest = jnp.where(moved, a[..., :1, :], rest)
        # A zero pivot means the column below the diagonal is all zero: the
        # matrix is singular (already recorded) and the factor is 0.
        factor = rest[..., :, 0] / jnp.where(pivot == 0, 1, pivot)[..., None]
        a = rest[..., :, 1:] - factor[..., :, None] * prow[..., None, 1:]
    return sign, logabs


def slogdet(a: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Sign and natural log of ``|det|`` of a stack of square matrices.

    Args:
      a: shape ``(..., k, k)``.

    Returns:
      ``(sign, logabsdet)``, each of shape ``a.shape[:-2]``; a singular matrix
      has sign 0 and logabsdet ``-inf``.
    """
    k = a.shape[-1]
    if k == 0:
        return jnp.ones(a.shape[:-2], a.dtype), jnp.zeros(a.shape[:-2], a.dtype)
    if jnp.issubdtype(a.dtype, jnp.complexfloating) or k > _UNROLL_MAX:
        return jnp.linalg.slogdet(a)
    if k <= 3:
        return _small_slogdet(a)
    return _lu_slogdet(a)
