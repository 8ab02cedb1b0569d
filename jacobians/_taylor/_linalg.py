"""Factorisations: ``lu`` and ``slogdet`` to second order, by products with inverses formed once.

``slogdet``, ``det`` and ``solve`` go through ``lu``. Its JVP in JAX solves
triangular systems for every tangent; pushed through the generic rule (nested
JVPs per column) that is four batched triangular solves per column and per
matrix, which LAPACK runs one small system at a time. Here the inverses of the
factors are formed once and every column costs matrix products.

With ``P^T A = L U`` (``L`` unit lower, ``U`` upper) and a direction ``a``:
``X = L^-1 P^T a U^-1``, ``dL = L tril(X, -1)``, ``dU = triu(X) U``; along
``a`` again ``dX = Y = -tril(X, -1) X - X triu(X)``, so
``d2L = dL tril(X, -1) + L tril(Y, -1)`` and ``d2U = triu(Y) U + triu(X) dU``
(the packed factor's tangents are ``dL + dU`` and ``d2L + d2U``). The pivots
and the permutation are integers: no derivative.
"""

import jax
import jax.numpy as jnp
from jax.scipy.linalg import solve_triangular

from . import _block as bk
from . import _layout
from ._generic import generic


def _tril(x):
    return jnp.tril(x, -1)


def _matrix_layout(lat, a, shape):
    """Each matrix's columns: the union of its entries' layouts (per matrix, and spread over its entries).

    Every rule here works column by column on whole matrices, so one layout per matrix serves all
    of its entries. Returns ``(per matrix, per entry)``; ``None``: dense.
    """
    if not lat.sparse or a.idx is None:
        return None, None
    nd = len(shape)
    union = _layout.reduce(a.idx, (nd - 2, nd - 1), lat.n)
    if union is None:
        return None, None
    return union, _layout.expand(union, shape[:-2], (nd - 2, nd - 1), shape)


def lu(lat, eqn, ins):
    """``lu`` of a square (batch of) matrices: the module docstring's recurrence, one product chain per column.

    Example: ``A = [[x0, 1], [1, x1]]`` (no pivoting) gives ``U[1, 1] = x1 - 1 / x0``, whose second
    derivative in ``x0`` is ``-2 / x0^3``: the packed factor's Laplacian holds it at ``[1, 1]``.
    """
    (a,) = ins
    shape = tuple(eqn.invars[0].aval.shape)
    if len(shape) < 2 or shape[-1] != shape[-2] or jnp.issubdtype(eqn.invars[0].aval.dtype, jnp.complexfloating):
        return generic(lat, eqn, ins)
    m = shape[-1]
    A = jnp.asarray(a.primal)
    packed, _, perm = jax.lax.linalg.lu(A)
    eye = jnp.broadcast_to(jnp.eye(m, dtype=A.dtype), shape)
    L = _tril(packed) + eye
    U = jnp.triu(packed)
    Linv = solve_triangular(L, eye, lower=True, unit_diagonal=True)
    Uinv = solve_triangular(U, eye, lower=False)
    rows = perm[..., None]

    def parts(c):
        X = Linv @ jnp.take_along_axis(c, jnp.broadcast_to(rows, c.shape[:-1] + (1,)), axis=-2) @ Uinv
        return X, _tril(X), jnp.triu(X)

    def first(c):
        _, xl, xu = parts(c)
        return L @ xl + xu @ U

    def second(c):
        X, xl, xu = parts(c)
        dL, dU = L @ xl, xu @ U
        Y = -(xl @ X) - X @ xu
        return dL @ xl + L @ _tril(Y) + jnp.triu(Y) @ U + xu @ dU

    union, dst = _matrix_layout(lat, a, shape)
    j, s = bk.cast(bk.relayout(lat, a, shape, dst), A.dtype)
    sq = jax.vmap(second)(j)
    t = (jax.vmap(first)(j), jax.vmap(first)(s) + (jnp.sum(sq, axis=0, keepdims=True) if lat.kind == "trace" else sq))
    return [(t, dst)] + [(None, None)] * (len(eqn.outvars) - 1)


def slogdet(lat, eqn, ins):
    """``jnp.linalg.slogdet``, a ``custom_jvp`` whose rule is ``tr(A^-1 dA)``: its derivative, ``A^-1`` formed once.

    ``J = tr(A^-1 a)`` per column and ``L = tr(A^-1 L_A) - sum_j tr(A^-1 J_j A^-1 J_j)``; the
    sign has no derivative. A call of another signature takes the generic rule.
    """
    (a,) = ins
    shape = tuple(eqn.invars[0].aval.shape)
    outs = eqn.outvars
    if (len(ins) != 1 or len(outs) != 2 or len(shape) < 2 or shape[-1] != shape[-2]
            or jnp.issubdtype(eqn.invars[0].aval.dtype, jnp.complexfloating)):
        return generic(lat, eqn, ins)
    A = jnp.asarray(a.primal)
    inv = jnp.linalg.inv(A)
    dtype = outs[1].aval.dtype

    def first(c):
        return jnp.sum(jnp.swapaxes(inv, -1, -2) * c, axis=(-2, -1))

    def second(c):
        b = inv @ c
        return -jnp.sum(b * jnp.swapaxes(b, -1, -2), axis=(-2, -1))

    union, dst = _matrix_layout(lat, a, shape)
    j, s = bk.cast(bk.relayout(lat, a, shape, dst), A.dtype)
    sq = jax.vmap(second)(j)
    t = (jax.vmap(first)(j), jax.vmap(first)(s) + (jnp.sum(sq, axis=0, keepdims=True) if lat.kind == "trace" else sq))
    return [(None, None), (bk.cast(t, dtype), union)]


RULES = {"lu": lu}
CUSTOM = {"_slogdet_lu": slogdet}  # custom_jvp rules recognised by name (their JVP rule is the formula used)

__all__ = ["CUSTOM", "RULES", "lu", "slogdet"]
