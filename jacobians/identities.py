"""Closed-form Jacobians of section 5.5, in the library's numerator layout.

Each function returns exactly what :func:`jacobians.jacobian` of the same map
returns (shape ``out_shape + in_shape``, see :mod:`jacobians.layout`), computed
from einsums and outer products: no autodiff. They double as the floor in the
benchmarks. Scalar-valued maps of a vector ``x`` therefore return a vector of
``x``'s shape (the book's ``1 x N`` row vector with the singleton dropped).
"""

import functools

import jax
import jax.numpy as jnp

__all__ = [
    "bilinear",
    "bilinear_inverse",
    "det",
    "gram",
    "inner",
    "inverse",
    "least_squares",
    "linear",
    "linear_wrt_matrix",
    "quadratic",
    "weighted_least_squares",
]


def _arr(x, name: str, ndim: int, where: str) -> jax.Array:
    try:
        x = jnp.asarray(x)
    except (TypeError, ValueError) as e:  # a string, a dict, None: say so, not JAX's conversion error
        raise TypeError(f"jacobians.identities.{where}: {name} must be a {ndim}-D array, got "
                        f"{type(x).__name__}.") from e
    if not (jnp.issubdtype(x.dtype, jnp.number) or x.dtype == jnp.bool_):
        raise TypeError(f"jacobians.identities.{where}: {name} must be a numeric array, got dtype {x.dtype}.")
    if x.ndim != ndim:
        raise ValueError(f"jacobians.identities.{where}: {name} must be {ndim}-D, got shape {tuple(x.shape)}.")
    return x


def _square(X, where: str) -> jax.Array:
    X = _arr(X, "X", 2, where)
    if X.shape[0] != X.shape[1]:
        raise ValueError(f"jacobians.identities.{where}: X must be square, got shape {tuple(X.shape)}.")
    return X


def _inexact_dtype(dtype) -> jnp.dtype:
    """The dtype ``jnp.linalg`` computes in for operands of ``dtype`` (integers and booleans promoted as JAX does)."""
    return _linalg_dtype(jnp.dtype(dtype), bool(jax.config.jax_enable_x64))


@functools.lru_cache(maxsize=64)
def _linalg_dtype(dtype, x64: bool) -> jnp.dtype:
    del x64  # (a key only: the answer changes with jax_enable_x64)
    # Read from jnp.linalg.det itself, once per dtype.
    return jnp.dtype(jax.eval_shape(jnp.linalg.det, jax.ShapeDtypeStruct((1, 1), dtype)).dtype)


def _promoted(*operands) -> jnp.dtype:
    """The dtype ``jacobians.jacobian`` of the map gives: the operands' promoted dtype, integers made inexact."""
    return _inexact_dtype(jnp.result_type(*(v.dtype for v in operands)))


def _match(cond: bool, where: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"jacobians.identities.{where}: {msg}")


def linear(A: jax.Array) -> jax.Array:
    """``d(Ax)/dx = A`` (5.68). Shape ``(M, N)`` for ``A`` of shape ``(M, N)`` (integer ``A`` promoted as JAX does)."""
    A = _arr(A, "A", 2, "linear")
    return A.astype(_promoted(A))


def linear_wrt_matrix(A: jax.Array, x: jax.Array) -> jax.Array:
    """``d(Ax)/dA`` (5.85)-(5.92): ``J[i, k, l] = delta_ik x_l``.

    Args:
      A: shape ``(M, N)`` (only its shape and dtype matter: the map is linear in A).
      x: shape ``(N,)``.

    Returns:
      Shape ``(M, M, N)``.
    """
    A, x = _arr(A, "A", 2, "linear_wrt_matrix"), _arr(x, "x", 1, "linear_wrt_matrix")
    _match(A.shape[1] == x.shape[0], "linear_wrt_matrix", f"A {tuple(A.shape)} and x {tuple(x.shape)} do not chain.")
    dtype = _promoted(A, x)  # the dtype of A @ x (the map's output), as jacobians.jacobian gives it
    eye = jnp.eye(A.shape[0], dtype=dtype)
    return jnp.einsum("ik,l->ikl", eye, x.astype(dtype))


def gram(R: jax.Array) -> jax.Array:
    """``dK/dR`` for ``K = R^T R`` (5.93)-(5.98).

    ``J[p, q, i, j] = delta_jp R_iq + delta_jq R_ip``, which is (5.98) casewise
    (``2 R_iq`` when ``j = p = q``).

    Args:
      R: shape ``(M, N)``.

    Returns:
      Shape ``(N, N, M, N)``.
    """
    R = _arr(R, "R", 2, "gram")
    R = R.astype(_promoted(R))
    eye = jnp.eye(R.shape[1], dtype=R.dtype)
    return jnp.einsum("jp,iq->pqij", eye, R) + jnp.einsum("jq,ip->pqij", eye, R)


def least_squares(Phi: jax.Array, y: jax.Array, theta: jax.Array) -> jax.Array:
    """``d||y - Phi theta||^2/d theta = -2 (y - Phi theta)^T Phi`` (5.83).

    Args:
      Phi: shape ``(N, D)``; y: shape ``(N,)``; theta: shape ``(D,)``.

    Returns:
      Shape ``(D,)``.
    """
    where = "least_squares"
    Phi, y, theta = _arr(Phi, "Phi", 2, where), _arr(y, "y", 1, where), _arr(theta, "theta", 1, where)
    _match(
        Phi.shape == (y.shape[0], theta.shape[0]),
        where,
        f"Phi {tuple(Phi.shape)} must be (len(y), len(theta)) = ({y.shape[0]}, {theta.shape[0]}).",
    )
    dtype = _promoted(Phi, y, theta)
    Phi, y, theta = Phi.astype(dtype), y.astype(dtype), theta.astype(dtype)
    return -2 * (y - Phi @ theta) @ Phi


def det(X: jax.Array) -> jax.Array:
    """The gradient of a determinant, ``d|X|/dX = |X| X^{-T}``: (5.101) with f the identity.

    ``|X| X^{-T}`` is the cofactor matrix ``adj(X)^T``, which is defined for
    every ``X``, singular ones included (there ``jacobians.jacobian(jnp.linalg.det)``
    gives the same). It is computed from the SVD ``X = U S V^H`` as
    ``det(U) det(V^H) conj(U) diag(prod_{j != i} s_j) conj(V^H)``, with the products
    of the other singular values formed without dividing by ``s_i``.

    Args:
      X: shape ``(N, N)``, real or complex. For complex ``X`` the result is the
        complex derivative of the (holomorphic) determinant, as from
        ``jax.jacfwd(jnp.linalg.det, holomorphic=True)``; like every identity
        here it transposes, never conjugates. Integer and boolean ``X`` are
        promoted as ``jnp.linalg.det`` promotes them.

    Returns:
      Shape ``(N, N)``, of the dtype ``jnp.linalg.det(X)`` has.
    """
    X = _square(X, "det")
    dtype = _inexact_dtype(X.dtype)
    n = X.shape[0]
    if n == 0:
        return jnp.zeros((0, 0), dtype)
    # No SVD kernels in half precision: float16 and bfloat16 work in float32 and round once at the end.
    work = jnp.dtype(jnp.float32) if jnp.finfo(dtype).bits < 32 else dtype
    U, s, Vh = jnp.linalg.svd(X.astype(work))
    # prod_{j != i} s_j as (product of those before i) * (product of those after i), of the singular
    # values over the largest (at most 1: nothing overflows); that largest to the power n - 1 multiplies
    # last, where it may overflow: exact zeros stay 0 (inf * 0 would be NaN; jax.grad(det) gives 0 there).
    top = s[0]
    t = s / jnp.where(top == 0, jnp.ones((), s.dtype), top)
    ones = jnp.ones((1,), s.dtype)
    before = jnp.cumprod(jnp.concatenate([ones, t[:-1]]))
    after = jnp.cumprod(jnp.concatenate([ones, t[::-1][:-1]]))[::-1]
    # det(U) det(V^H): +-1 for orthogonal factors, a unit complex number for unitary ones (slogdet's sign).
    phase = jnp.linalg.slogdet(U)[0] * jnp.linalg.slogdet(Vh)[0]
    # X^{-T} = conj(U) S^{-1} conj(V^H) (conj is the identity on real values).
    scaled = (phase * (jnp.conj(U) * (before * after).astype(work)[None, :])) @ jnp.conj(Vh)
    scale = (top ** (n - 1)).astype(work)
    out = jnp.where(scaled == 0, jnp.zeros((), work), scaled * scale)
    return out.astype(dtype)


def inverse(X: jax.Array) -> jax.Array:
    """``d X^{-1}/dX`` (5.102): ``J[i, j, k, l] = -(X^{-1})_ik (X^{-1})_lj``.

    Args:
      X: shape ``(N, N)``, invertible. At a singular ``X`` the derivative does
        not exist and, as with ``jnp.linalg.inv``, the result is not finite
        (``inf``/``nan``, also under ``jit``): check ``jnp.isfinite`` when ``X``
        may be singular. Near-singular ``X`` give large finite values.

    Returns:
      Shape ``(N, N, N, N)``.
    """
    Xi = jnp.linalg.inv(_square(X, "inverse"))
    return -jnp.einsum("ik,lj->ijkl", Xi, Xi)


def bilinear_inverse(a: jax.Array, X: jax.Array, b: jax.Array) -> jax.Array:
    """``d a^T X^{-1} b/dX = -(X^{-1})^T a b^T (X^{-1})^T`` (5.103).

    Args:
      a, b: shape ``(N,)``; X: shape ``(N, N)``, invertible (at a singular
        ``X`` the result is not finite, as for :func:`inverse`). Integer and
        boolean operands are promoted as ``jnp.linalg.inv`` promotes them.

    Returns:
      Shape ``(N, N)``.
    """
    where = "bilinear_inverse"
    X = _square(X, where)
    a, b = _arr(a, "a", 1, where), _arr(b, "b", 1, where)
    shapes = f"a {tuple(a.shape)}, X {tuple(X.shape)}, b {tuple(b.shape)}"
    _match(a.shape == b.shape == X.shape[:1], where, f"{shapes} do not chain.")
    Xi = jnp.linalg.inv(X)
    # Integer and boolean a, b promoted as jnp.linalg.inv promotes X (strict promotion has no int-float path).
    a, b = (v if jnp.issubdtype(v.dtype, jnp.inexact) else v.astype(_inexact_dtype(v.dtype)) for v in (a, b))
    return -jnp.outer(Xi.T @ a, Xi @ b)


def inner(a: jax.Array) -> jax.Array:
    """The gradient of an inner product, ``d x^T a/dx = d a^T x/dx = a^T``: (5.104), (5.105).

    Args:
      a: shape ``(N,)``.

    Returns:
      Shape ``(N,)``.
    """
    a = _arr(a, "a", 1, "inner")
    return a.astype(_promoted(a))


def bilinear(a: jax.Array, b: jax.Array) -> jax.Array:
    """``d a^T X b/dX = a b^T`` (5.106). Shape ``(M, N)`` for a ``(M,)``, b ``(N,)``."""
    a, b = _arr(a, "a", 1, "bilinear"), _arr(b, "b", 1, "bilinear")
    dtype = _promoted(a, b)
    return jnp.outer(a.astype(dtype), b.astype(dtype))


def quadratic(B: jax.Array, x: jax.Array) -> jax.Array:
    """``d x^T B x/dx = x^T (B + B^T)`` (5.107).

    Args:
      B: shape ``(N, N)``; x: shape ``(N,)``.

    Returns:
      Shape ``(N,)``.
    """
    B, x = _square(B, "quadratic"), _arr(x, "x", 1, "quadratic")
    _match(B.shape[0] == x.shape[0], "quadratic", f"B {tuple(B.shape)} and x {tuple(x.shape)} do not chain.")
    dtype = _promoted(B, x)
    B, x = B.astype(dtype), x.astype(dtype)
    return x @ B + B @ x


def weighted_least_squares(x: jax.Array, A: jax.Array, s: jax.Array, W: jax.Array) -> jax.Array:
    """``d/ds (x - As)^T W (x - As) = -2 (x - As)^T W A`` for symmetric W (5.108).

    Computed as ``-(x - As)^T (W + W^T) A``, which is (5.108) when ``W`` is
    symmetric and stays the right derivative when it is not.

    Args:
      x: shape ``(N,)``; A: shape ``(N, S)``; s: shape ``(S,)``; W: shape ``(N, N)``.

    Returns:
      Shape ``(S,)``.
    """
    where = "weighted_least_squares"
    x, A, s = _arr(x, "x", 1, where), _arr(A, "A", 2, where), _arr(s, "s", 1, where)
    W = _square(W, where)
    _match(
        A.shape == (x.shape[0], s.shape[0]) and W.shape[0] == x.shape[0],
        where,
        f"x {tuple(x.shape)}, A {tuple(A.shape)}, s {tuple(s.shape)}, W {tuple(W.shape)} do not chain.",
    )
    dtype = _promoted(x, A, s, W)
    x, A, s, W = (v.astype(dtype) for v in (x, A, s, W))
    r = x - A @ s
    return -(r @ W + W @ r) @ A
