"""Every closed form of section 5.5 equals jacobians.jacobian of the same map."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import randn
from hypothesis import given, settings
from hypothesis import strategies as st

import jacobians
from jacobians import identities as I

SETTINGS = settings(max_examples=8, deadline=None)
dims = st.integers(1, 4)


def _well_conditioned(rng, n):
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return jnp.asarray(Q * rng.uniform(0.5, 2.0, n))  # singular values in [0.5, 2]


def close(a, b):
    np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-11)


# The maps' Jacobians, built once with the maps' constants as (undifferentiated) arguments: examples of
# the same shapes reuse one compiled function instead of compiling a fresh closure for every example.
jac_linear = jacobians.jacobian(lambda x, A: A @ x)
jac_linear_wrt_matrix = jacobians.jacobian(lambda A, x: A @ x)
jac_bilinear = jacobians.jacobian(lambda X, a, b: a @ X @ b)
jac_inner_right = jacobians.jacobian(lambda x, b: x @ b)
jac_inner_left = jacobians.jacobian(lambda x, b: b @ x)
jac_gram = jacobians.jacobian(lambda R: R.T @ R)
jac_least_squares = jacobians.jacobian(lambda th, Phi, y: jnp.sum((y - Phi @ th) ** 2))
jac_det = jacobians.jacobian(jnp.linalg.det)
jac_inv = jacobians.jacobian(jnp.linalg.inv)
jac_bilinear_inverse = jacobians.jacobian(lambda X, a, b: a @ jnp.linalg.inv(X) @ b)
jac_quadratic = jacobians.jacobian(lambda x, B: x @ B @ x)
jac_weighted = jacobians.jacobian(lambda s, xx, A, W: (xx - A @ s) @ W @ (xx - A @ s))


@SETTINGS
@given(M=dims, N=dims, seed=st.integers(0, 2**31))
def test_linear_maps(M, N, seed):
    rng = np.random.default_rng(seed)
    A, x = randn(rng, (M, N)), randn(rng, (N,))
    close(I.linear(A), jac_linear(x, A))
    close(I.linear_wrt_matrix(A, x), jac_linear_wrt_matrix(A, x))
    a, b = randn(rng, (M,)), randn(rng, (N,))
    X = randn(rng, (M, N))
    close(I.bilinear(a, b), jac_bilinear(X, a, b))
    close(I.inner(b), jac_inner_right(x, b))
    close(I.inner(b), jac_inner_left(x, b))


@SETTINGS
@given(M=dims, N=dims, seed=st.integers(0, 2**31))
def test_gram(M, N, seed):
    R = randn(np.random.default_rng(seed), (M, N))
    close(I.gram(R), jac_gram(R))


def test_gram_casewise_5_98(rng):
    M, N = 3, 4
    R = randn(rng, (M, N))
    J = I.gram(R)
    assert J.shape == (N, N, M, N)
    for p in range(N):
        for q in range(N):
            for i in range(M):
                for j in range(N):
                    if j == p and p != q:
                        want = R[i, q]
                    elif j == q and p != q:
                        want = R[i, p]
                    elif j == p and p == q:
                        want = 2 * R[i, q]
                    else:
                        want = 0.0
                    assert J[p, q, i, j] == want, (p, q, i, j)


@SETTINGS
@given(N=dims, D=dims, seed=st.integers(0, 2**31))
def test_least_squares(N, D, seed):
    rng = np.random.default_rng(seed)
    Phi, y, th = randn(rng, (N, D)), randn(rng, (N,)), randn(rng, (D,))
    close(I.least_squares(Phi, y, th), jac_least_squares(th, Phi, y))


@SETTINGS
@given(N=dims, seed=st.integers(0, 2**31))
def test_inverse_family(N, seed):
    rng = np.random.default_rng(seed)
    X = _well_conditioned(rng, N)
    a, b = randn(rng, (N,)), randn(rng, (N,))
    close(I.det(X), jac_det(X))
    close(I.inverse(X), jac_inv(X))
    close(I.bilinear_inverse(a, X, b), jac_bilinear_inverse(X, a, b))


@SETTINGS
@given(N=dims, S=dims, seed=st.integers(0, 2**31))
def test_quadratic_forms(N, S, seed):
    rng = np.random.default_rng(seed)
    B, x = randn(rng, (N, N)), randn(rng, (N,))
    close(I.quadratic(B, x), jac_quadratic(x, B))
    A, s, xx = randn(rng, (N, S)), randn(rng, (S,)), randn(rng, (N,))
    W0 = randn(rng, (N, N))
    for W in (W0 + W0.T, W0):  # symmetric as in (5.108), and a general W
        close(I.weighted_least_squares(xx, A, s, W), jac_weighted(s, xx, A, W))
    Ws = W0 + W0.T
    close(I.weighted_least_squares(xx, A, s, Ws), -2 * (xx - A @ s) @ Ws @ A)  # (5.108) verbatim


def _cofactors(X):
    """adj(X)^T entry by entry from the minors: the textbook definition."""
    X = np.asarray(X)
    n = X.shape[0]
    C = np.empty_like(X)
    for i in range(n):
        for j in range(n):
            minor = np.delete(np.delete(X, i, axis=0), j, axis=1)
            C[i, j] = (-1) ** (i + j) * (np.linalg.det(minor) if n > 1 else 1.0)
    return C


@SETTINGS
@given(N=st.integers(1, 5), rank_drop=st.integers(1, 3), seed=st.integers(0, 2**31))
def test_det_gradient_at_singular_matrices(N, rank_drop, seed):
    # Issue "Trust and first run": |X| X^{-T} was NaN at a singular X; the derivative is the cofactor matrix.
    rng = np.random.default_rng(seed)
    r = max(N - rank_drop, 0)
    X = jnp.asarray(rng.standard_normal((N, r)) @ rng.standard_normal((r, N)))  # rank r < N
    got = I.det(X)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, _cofactors(X), rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(got, jac_det(X), rtol=1e-8, atol=1e-10)
    if r <= N - 2:
        np.testing.assert_allclose(got, 0.0, atol=1e-10)  # rank <= N - 2: every cofactor vanishes
    Y = _well_conditioned(rng, N)  # and at invertible X, (5.101) itself
    np.testing.assert_allclose(I.det(Y), jnp.linalg.det(Y) * jnp.linalg.inv(Y).T, rtol=1e-9, atol=1e-11)


def test_det_gradient_exact_cases():
    np.testing.assert_array_equal(I.det(jnp.zeros((3, 3))), np.zeros((3, 3)))
    np.testing.assert_allclose(I.det(jnp.array([[1.0, 2.0], [2.0, 4.0]])), [[4.0, -2.0], [-2.0, 1.0]], atol=1e-14)
    np.testing.assert_allclose(I.det(jnp.array([[0.0, 1.0], [0.0, 0.0]])), [[0.0, 0.0], [-1.0, 0.0]], atol=1e-15)
    np.testing.assert_array_equal(I.det(jnp.zeros((1, 1))), [[1.0]])


def test_inverse_at_singular_is_not_finite():
    # Documented: the derivative of X^{-1} does not exist there; like jnp.linalg.inv, the result is not finite.
    S = jnp.array([[1.0, 2.0], [2.0, 4.0]])
    assert not np.all(np.isfinite(I.inverse(S)))
    assert not np.all(np.isfinite(I.bilinear_inverse(jnp.ones(2), S, jnp.ones(2))))
    assert not np.all(np.isfinite(jax.jit(I.inverse)(S)))  # no error under jit either


def test_errors():
    with pytest.raises(ValueError, match=r"identities.inverse: X must be square, got shape \(2, 3\)"):
        I.inverse(jnp.ones((2, 3)))
    with pytest.raises(ValueError, match=r"identities.linear: A must be 2-D, got shape \(3,\)"):
        I.linear(jnp.ones(3))
    with pytest.raises(ValueError, match=r"A \(2, 3\) and x \(4,\) do not chain"):
        I.linear_wrt_matrix(jnp.ones((2, 3)), jnp.ones(4))
    with pytest.raises(ValueError, match=r"Phi \(3, 2\) must be \(len\(y\), len\(theta\)\) = \(3, 3\)"):
        I.least_squares(jnp.ones((3, 2)), jnp.ones(3), jnp.ones(3))
    with pytest.raises(ValueError, match=r"B \(2, 2\) and x \(3,\) do not chain"):
        I.quadratic(jnp.ones((2, 2)), jnp.ones(3))
    with pytest.raises(ValueError, match=r"do not chain"):
        I.weighted_least_squares(jnp.ones(3), jnp.ones((3, 2)), jnp.ones(2), jnp.ones((2, 2)))
    with pytest.raises(ValueError, match=r"do not chain"):
        I.bilinear_inverse(jnp.ones(2), jnp.eye(3), jnp.ones(3))


def test_det_gradient_where_the_determinant_overflows():
    # |X| X^{-T} of 1e200 I: the diagonal (1e400) overflows to inf, the zeros stay 0, not NaN. (jax.grad(det)
    # agrees on the CPU; on an H200 it gave 0 on the diagonal.)
    got = np.asarray(I.det(jnp.eye(3) * 1e200))
    np.testing.assert_array_equal(got, np.where(np.eye(3) > 0, np.inf, 0.0))
    assert np.isinf(got[0, 0]) and got[0, 1] == 0


def _complex_of_rank(rng, n, r):
    """A complex ``(n, n)`` matrix of rank ``r``: a complex ``(n, r)`` factor times a complex ``(r, n)`` one."""
    a, b, c, d = (rng.standard_normal(s) for s in ((n, r), (n, r), (r, n), (r, n)))
    return jax.lax.complex(jnp.asarray(a @ c - b @ d), jnp.asarray(a @ d + b @ c))


det_jit = jax.jit(I.det)  # one compilation per shape and dtype (eagerly, each of its operations compiles)


def test_det_gradient_of_complex_matrices(rng):
    # For complex X the derivative of the holomorphic det is still adj(X)^T = |X| X^{-T}: conj(U) ... conj(V^H)
    # from the SVD X = U S V^H, and det(U) det(V^H) a unit complex number. It used U ... V^H: a wrong answer.
    for r in (3, 2, 1):  # invertible, and singular of rank N - 1 and N - 2
        X = _complex_of_rank(rng, 3, r)
        got = det_jit(X)
        assert got.dtype == jnp.complex128
        np.testing.assert_allclose(got, _cofactors(X), rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(got, 0.0, atol=1e-11)
    np.testing.assert_allclose(
        det_jit(X := _complex_of_rank(rng, 3, 3)),
        jax.jacfwd(jnp.linalg.det, holomorphic=True)(X),
        rtol=1e-9,
        atol=1e-11,
    )
    got = det_jit(X.astype(jnp.complex64))
    assert got.dtype == jnp.complex64
    np.testing.assert_allclose(got, _cofactors(X), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", ["bool", "int8", "uint8", "int32", "int64", "float16", "bfloat16", "float32"])
def test_det_gradient_promotes_like_jnp_linalg_det(dtype):
    # The result has jnp.linalg.det(X)'s dtype (JAX's promotion of integers and booleans, under x64 too); half
    # precision works in float32 (the SVD has no half kernels: it raised) and rounds once. A 0 x 0 integer X
    # came back as itself, an integer array.
    X = jnp.array([[2, 1, 0], [1, 3, 1], [0, 1, 1]]).astype(dtype)
    want = np.asarray(_cofactors(np.asarray(X, np.float64)))
    got = det_jit(X)
    assert got.dtype == jnp.linalg.det(X).dtype
    tol = 1e-2 if jnp.finfo(got.dtype).bits < 32 else 1e-5
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=tol, atol=tol)
    empty = det_jit(jnp.zeros((0, 0), dtype))  # (jnp.linalg.det itself fails at 0 x 0 in half precision)
    assert empty.dtype == got.dtype and empty.shape == (0, 0)


def test_bilinear_inverse_of_integer_operands():
    # a^T X^{-1} b with integer a, X, b: a and b are promoted as jnp.linalg.inv promotes X (under strict promotion
    # Xi @ a had no int-float path and raised).
    X, a, b = jnp.array([[2, 1], [1, 3]]), jnp.array([1, 2]), jnp.array([3, -1])
    got = I.bilinear_inverse(a, X, b)
    assert got.dtype == jnp.linalg.inv(X).dtype
    Xf = np.asarray(X, np.float64)
    np.testing.assert_allclose(
        got, I.bilinear_inverse(np.asarray(a, np.float64), Xf, np.asarray(b, np.float64)), rtol=1e-6
    )


def test_dtypes_follow_the_maps_jacobian():
    """Each identity has the dtype jacobians.jacobian of its map has: the operands' promotion, integers inexact."""
    A = jnp.ones((2, 3))
    x_int = jnp.arange(3)
    with jax.numpy_dtype_promotion("standard"):  # (the suite promotes strictly: no int-float path there)
        assert I.linear_wrt_matrix(A, x_int).dtype == jacobians.jacobian(lambda A: A @ x_int)(A).dtype == A.dtype
    x32 = jnp.arange(3, dtype=jnp.float32)
    A32 = A.astype(jnp.float32)
    assert I.linear_wrt_matrix(A32, x32).dtype == jacobians.jacobian(lambda A: A @ x32)(A32).dtype == jnp.float32
    a, b, B = jnp.arange(2), jnp.arange(3), jnp.array([[1, 2], [3, 4]])
    for got in (I.bilinear(a, b), I.quadratic(B, a), I.linear(B), I.inner(a)):
        assert jnp.issubdtype(got.dtype, jnp.inexact), got.dtype
    np.testing.assert_array_equal(I.bilinear(a, b), np.outer([0, 1], [0, 1, 2]))
    np.testing.assert_array_equal(I.quadratic(B, a), np.array([0, 1]) @ np.array([[2, 5], [5, 8]]))  # x^T (B + B^T)


@pytest.mark.parametrize("bad", ["abc", {"a": 1}, None])
def test_non_arrays_are_named(bad):
    for fn, name in ((I.det, "det: X"), (I.gram, "gram: R"), (I.inverse, "inverse: X")):
        with pytest.raises(TypeError, match=rf"identities\.{name} must be a 2-D array, got {type(bad).__name__}"):
            fn(bad)
