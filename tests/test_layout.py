"""Layouts: round-trips, vec and the commutation matrix, Figure 5.7, errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import randn
from hypothesis import given, settings
from hypothesis import strategies as st

from jacobians import layout

shapes = st.lists(st.integers(1, 4), min_size=0, max_size=3).map(tuple)
SETTINGS = settings(max_examples=15, deadline=None)  # each example is a new shape: every op compiles again


@SETTINGS
@given(out_shape=shapes, in_shape=shapes, order=st.sampled_from(["C", "F"]), seed=st.integers(0, 2**31))
def test_matrix_round_trip(out_shape, in_shape, order, seed):
    J = randn(np.random.default_rng(seed), out_shape + in_shape)
    M = layout.to_matrix(J, len(out_shape), order)
    assert M.shape == (math.prod(out_shape), math.prod(in_shape))
    np.testing.assert_array_equal(layout.to_tensor(M, out_shape, in_shape, order), J)


@SETTINGS
@given(out_shape=shapes, in_shape=shapes, seed=st.integers(0, 2**31))
def test_orders_are_numpys_reshapes(out_shape, in_shape, seed):
    J = np.random.default_rng(seed).standard_normal(out_shape + in_shape)
    k = len(out_shape)
    mo, ni = math.prod(out_shape), math.prod(in_shape)
    np.testing.assert_array_equal(layout.to_matrix(J, k, "C"), J.reshape(mo, ni))
    # F: rows are the vec (column-major) index of the output entry, columns of the input.
    F = np.empty((mo, ni))
    for idx in np.ndindex(*out_shape, *in_shape):
        r = np.ravel_multi_index(idx[:k], out_shape, order="F") if k else 0
        c = np.ravel_multi_index(idx[k:], in_shape, order="F") if in_shape else 0
        F[r, c] = J[idx]
    np.testing.assert_array_equal(layout.to_matrix(J, k, "F"), F)


@SETTINGS
@given(out_shape=shapes, in_shape=shapes, seed=st.integers(0, 2**31))
def test_denominator_round_trip(out_shape, in_shape, seed):
    J = randn(np.random.default_rng(seed), out_shape + in_shape)
    D = layout.to_denominator(J, len(out_shape))
    assert D.shape == in_shape + out_shape
    np.testing.assert_array_equal(layout.to_numerator(D, len(in_shape)), J)
    if len(out_shape) == len(in_shape) == 1:
        np.testing.assert_array_equal(D, J.T)  # the remark after (5.59)


@SETTINGS
@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=3).map(tuple), seed=st.integers(0, 2**31))
def test_vec_round_trip(shape, seed):
    A = randn(np.random.default_rng(seed), shape)
    v = layout.vec(A)
    np.testing.assert_array_equal(v, np.asarray(A).ravel(order="F"))
    np.testing.assert_array_equal(layout.unvec(v, shape), A)


@SETTINGS
@given(m=st.integers(1, 6), n=st.integers(1, 6), seed=st.integers(0, 2**31))
def test_commutation_matrix(m, n, seed):
    A = randn(np.random.default_rng(seed), (m, n))
    K = layout.commutation_matrix(m, n)
    np.testing.assert_array_equal(K @ layout.vec(A), layout.vec(A.T))
    np.testing.assert_array_equal(K.T @ K, np.eye(m * n))  # a permutation
    np.testing.assert_array_equal(layout.commutation_matrix(n, m), K.T)


def test_vec_of_product_is_kronecker(rng):
    # With column stacking, the flattened Jacobian of X -> AXB is B^T kron A.
    A, B, X = randn(rng, (2, 3)), randn(rng, (4, 5)), randn(rng, (3, 4))
    J = jax.jacfwd(lambda X: A @ X @ B)(X)
    np.testing.assert_allclose(layout.to_matrix(J, 2, "F"), jnp.kron(B.T, A), rtol=1e-12)
    np.testing.assert_allclose(layout.to_matrix(J, 2, "F") @ layout.vec(X), layout.vec(A @ X @ B), rtol=1e-12)


def test_figure_5_7_both_flattenings(rng):
    x = randn(rng, (3,))
    A_of_x = lambda x: jnp.outer(jnp.stack([x[0], x[1] ** 2, jnp.sin(x[2]), x[0] * x[1]]), x[:2])  # noqa: E731
    T = jax.jacfwd(A_of_x)(x)  # approach 1: a (4, 2, 3) tensor
    assert T.shape == (4, 2, 3)
    # Approach 2: flatten A to R^8, take the 8x3 Jacobian, reshape back.
    for order in ("C", "F"):
        flat = lambda x, order=order: jnp.ravel(A_of_x(x), order=order)  # noqa: E731
        M = jax.jacfwd(flat)(x)
        np.testing.assert_allclose(layout.to_matrix(T, 2, order), M, rtol=1e-14)
        np.testing.assert_allclose(layout.to_tensor(M, (4, 2), (3,), order), T, rtol=1e-14)
    MF = layout.to_matrix(T, 2, "F")
    for i in range(4):
        for j in range(2):
            np.testing.assert_array_equal(MF[i + 4 * j], T[i, j])


def test_errors():
    J = jnp.ones((2, 3, 4))
    with pytest.raises(ValueError, match=r"out_ndim=4 must lie in \[0, 3\] for J of shape \(2, 3, 4\)"):
        layout.to_matrix(J, 4)
    with pytest.raises(ValueError, match=r"out_ndim=-1 must lie in \[0, 3\]"):
        layout.to_denominator(J, -1)
    with pytest.raises(ValueError, match=r"in_ndim=5 must lie in \[0, 3\] for D of shape"):
        layout.to_numerator(J, 5)
    with pytest.raises(TypeError, match=r"out_ndim must be an int, got 1.5"):
        layout.to_matrix(J, 1.5)
    with pytest.raises(ValueError, match=r"order must be 'C' .* got 'A'"):
        layout.to_matrix(J, 1, order="A")
    with pytest.raises(
        ValueError,
        match=r"M has shape \(6, 4\) but out_shape=\(2, 2\) and in_shape=\(4,\) need a matrix of shape \(4, 4\)",
    ):
        layout.to_tensor(jnp.ones((6, 4)), (2, 2), (4,))
    with pytest.raises(ValueError, match=r"v must be 1-D of size prod\(\(2, 3\)\) = 6, got shape \(5,\)"):
        layout.unvec(jnp.ones(5), (2, 3))
    with pytest.raises(ValueError, match=r"m must be a positive int, got 0"):
        layout.commutation_matrix(0, 2)


def test_shape_and_int_arguments_are_checked():
    # Issue "Trust and first run": unvec(v, (2.5, 2)) truncated the shape; to_tensor(M, (-2, -3), (4,)) failed inside JAX.
    with pytest.raises(
        TypeError,
        match=r"jacobians.layout.unvec: shape must be a tuple of non-negative ints, got \(2.5, 2\) \(entry 0 is 2.5, a float\)",
    ):
        layout.unvec(jnp.ones(5), (2.5, 2))
    with pytest.raises(
        ValueError,
        match=r"jacobians.layout.to_tensor: out_shape must be a tuple of non-negative ints, got \(-2, -3\) \(entry 0 is -2\)",
    ):
        layout.to_tensor(jnp.ones((6, 4)), (-2, -3), (4,))
    with pytest.raises(
        TypeError,
        match=r"to_tensor: in_shape must be a tuple of non-negative ints, got \(4.0,\) \(entry 0 is 4.0, a float\)",
    ):
        layout.to_tensor(jnp.ones((6, 4)), (2, 3), (4.0,))
    with pytest.raises(
        TypeError,
        match=r"unvec: shape must be a tuple of non-negative ints, got \(True, 6\) \(entry 0 is True, a bool\)",
    ):
        layout.unvec(jnp.ones(6), (True, 6))
    with pytest.raises(TypeError, match=r"unvec: shape must be a tuple of non-negative ints, got '23'"):
        layout.unvec(jnp.ones(6), "23")
    with pytest.raises(TypeError, match=r"unvec: shape must be a tuple of non-negative ints, got None"):
        layout.unvec(jnp.ones(6), None)
    with pytest.raises(TypeError, match=r"to_denominator: out_ndim must be an int, got True"):
        layout.to_denominator(jnp.ones((2, 3)), True)
    with pytest.raises(TypeError, match=r"to_numerator: in_ndim must be an int, got 1.0"):
        layout.to_numerator(jnp.ones((2, 3)), 1.0)
    with pytest.raises(TypeError, match=r"commutation_matrix: n must be a positive int, got 2.0 \(a float\)"):
        layout.commutation_matrix(3, 2.0)
    with pytest.raises(ValueError, match=r"commutation_matrix: n must be a positive int, got -1"):
        layout.commutation_matrix(3, -1)
    with pytest.raises(TypeError, match=r"commutation_matrix: dtype must be a NumPy/JAX dtype or None, got 'blah'"):
        layout.commutation_matrix(2, 3, dtype="blah")


def test_shape_forms_that_are_accepted(rng):
    A = randn(rng, (2, 3))
    v = layout.vec(A)
    for shape in ((2, 3), [2, 3], np.array([2, 3]), (np.int32(2), np.int64(3))):
        np.testing.assert_array_equal(layout.unvec(v, shape), A)
    np.testing.assert_array_equal(layout.unvec(v, 6), v)  # an int is a 1-D shape, as in NumPy
    np.testing.assert_array_equal(layout.to_tensor(jnp.ones((0, 3)), (0, 5), (3,)), jnp.ones((0, 5, 3)))
    assert layout.to_matrix(randn(rng, (2, 3)), np.int64(1)).shape == (2, 3)
    assert layout.commutation_matrix(np.int64(2), 3, dtype=jnp.float32).dtype == jnp.float32
