"""Contractions: the chain rule on tensors, JVP/VJP from explicit Jacobians, traces."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import randn
from hypothesis import given, settings
from hypothesis import strategies as st

import jacobians
from jacobians import contract

shapes = st.lists(st.integers(1, 3), min_size=0, max_size=3).map(tuple)
SETTINGS = settings(max_examples=10, deadline=None)


def _random_map(rng, in_shape, out_shape):
    """A smooth nonlinear map between tensors of the given shapes."""
    n, m = int(np.prod(in_shape)), int(np.prod(out_shape))
    W = randn(rng, (m, n)) / np.sqrt(max(n, 1))
    b = randn(rng, (m,))
    return lambda x: jnp.tanh(W @ jnp.reshape(x, (n,)) + b).reshape(out_shape) * 2.0


@SETTINGS
@given(in_shape=shapes, mid_shape=shapes, out_shape=shapes, seed=st.integers(0, 2**31))
def test_chain_equals_jacobian_of_composition(in_shape, mid_shape, out_shape, seed):
    rng = np.random.default_rng(seed)
    g, f = _random_map(rng, in_shape, mid_shape), _random_map(rng, mid_shape, out_shape)
    x = randn(rng, in_shape)
    # JAX's three Jacobians in one compiled call (eagerly, every primitive compiles for every new shape).
    outer, inner, want = jax.jit(lambda x: (jax.jacfwd(f)(g(x)), jax.jacfwd(g)(x), jax.jacfwd(lambda x: f(g(x)))(x)))(x)
    got = contract.chain(outer, inner, len(mid_shape))
    assert got.shape == out_shape + in_shape
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


@SETTINGS
@given(in_shape=shapes, out_shape=shapes, seed=st.integers(0, 2**31))
def test_matvec_vecmat_are_jvp_vjp(in_shape, out_shape, seed):
    rng = np.random.default_rng(seed)
    f = _random_map(rng, in_shape, out_shape)
    x, v, u = randn(rng, in_shape), randn(rng, in_shape), randn(rng, out_shape)
    J = jacobians.jacobian(f)(x)
    jvp, vjp = jax.jit(lambda x, v, u: (jax.jvp(f, (x,), (v,))[1], jax.vjp(f, x)[1](u)[0]))(x, v, u)
    np.testing.assert_allclose(contract.matvec(J, v), jvp, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(contract.vecmat(u, J), vjp, rtol=1e-10, atol=1e-12)


def test_trace_remark_after_5_108(rng):
    D, E, F = 3, 4, 2
    T = randn(rng, (D, D, E, F))
    got = contract.trace(T, (0,), (1,))
    assert got.shape == (E, F)
    np.testing.assert_allclose(got, sum(T[d, d] for d in range(D)), rtol=1e-13)
    # Matrix-by-matrix blocks: the trace of the (DE x DE) flattening.
    B = randn(rng, (D, E, D, E))
    np.testing.assert_allclose(contract.trace(B, (0, 1), (2, 3)), jnp.trace(B.reshape(D * E, D * E)), rtol=1e-13)
    # Traces of a 2-D Jacobian and (5.100): d tr(f(X))/dX = tr(df/dX) over the output axes.
    X = randn(rng, (3, 3))
    f = lambda X: jnp.sin(X) @ X  # noqa: E731
    np.testing.assert_allclose(
        contract.trace(jacobians.jacobian(f)(X), 0, 1), jax.grad(lambda X: jnp.trace(f(X)))(X), rtol=1e-12
    )
    # Negative axes and a middle pair.
    C = randn(rng, (2, 3, 4, 3))
    np.testing.assert_allclose(contract.trace(C, -1, 1), jnp.einsum("ajbj->ab", C), rtol=1e-13)


def test_errors():
    with pytest.raises(
        ValueError, match=r"middle shapes differ: outer \(2, 3\) ends in \(3,\) but inner \(4, 5\) starts with \(4,\)"
    ):
        contract.chain(jnp.ones((2, 3)), jnp.ones((4, 5)), 1)
    with pytest.raises(ValueError, match=r"mid_ndim=3 must lie in \[0, 2\]"):
        contract.chain(jnp.ones((2, 3)), jnp.ones((3, 5)), 3)
    with pytest.raises(ValueError, match=r"J of shape \(2, 3\) must end in v's shape \(2,\)"):
        contract.matvec(jnp.ones((2, 3)), jnp.ones(2))
    with pytest.raises(ValueError, match=r"J of shape \(2, 3\) must start with u's shape \(3,\)"):
        contract.vecmat(jnp.ones(3), jnp.ones((2, 3)))
    with pytest.raises(ValueError, match=r"paired axes 0 and 1 of T with shape \(2, 3\) have different sizes 2 and 3"):
        contract.trace(jnp.ones((2, 3)), 0, 1)
    with pytest.raises(ValueError, match=r"must have the same length"):
        contract.trace(jnp.ones((2, 2, 2)), (0, 1), (2,))
    with pytest.raises(ValueError, match=r"must be distinct axes"):
        contract.trace(jnp.ones((2, 2)), 0, 0)
    with pytest.raises(ValueError, match=r"axis 5 in axes2 is out of range for a rank-2 tensor"):
        contract.trace(jnp.ones((2, 2)), 0, 5)


def test_int_and_axes_arguments_are_checked():
    # Issue "Trust and first run": trace(T, 0.0, 1) failed with "'float' object is not iterable".
    T = jnp.ones((2, 2, 3, 3))
    with pytest.raises(
        TypeError, match=r"jacobians.contract.trace: axes1 must be an int or a tuple of ints, got 0.0 \(a float\)"
    ):
        contract.trace(T, 0.0, 1)
    with pytest.raises(
        TypeError, match=r"trace: axes2 must be an int or a tuple of ints, got \(1, 2.0\) \(entry 2.0\)"
    ):
        contract.trace(T, (0, 2), (1, 2.0))
    with pytest.raises(TypeError, match=r"trace: axes1 must be an int or a tuple of ints, got True \(a bool\)"):
        contract.trace(T, True, 1)
    with pytest.raises(TypeError, match=r"trace: axes1 must be an int or a tuple of ints, got '0' \(a str\)"):
        contract.trace(T, "0", 1)
    with pytest.raises(ValueError, match=r"trace: axes1=\(2, -2\) repeats an axis"):
        contract.trace(T, (2, -2), (0, 1))
    with pytest.raises(ValueError, match=r"trace: axis -5 in axes1 is out of range for a rank-4 tensor"):
        contract.trace(T, -5, 1)
    with pytest.raises(TypeError, match=r"jacobians.contract.chain: mid_ndim must be an int, got 1.0 \(a float\)"):
        contract.chain(jnp.ones((2, 3)), jnp.ones((3, 2)), 1.0)
    with pytest.raises(TypeError, match=r"chain: mid_ndim must be an int, got False \(a bool\)"):
        contract.chain(jnp.ones((2, 3)), jnp.ones((3, 2)), False)
    with pytest.raises(ValueError, match=r"chain: mid_ndim=-1 must lie in \[0, 2\]"):
        contract.chain(jnp.ones((2, 3)), jnp.ones((3, 2)), -1)


def test_axes_forms_that_are_accepted(rng):
    T = randn(rng, (3, 2, 3, 2))
    want = jnp.einsum("abab->", T)
    for a1, a2 in (
        ((0, 1), (2, 3)),
        ([0, 1], [2, 3]),
        (np.array([0, 1]), np.array([-2, -1])),
        ((np.int64(0), 1), (2, 3)),
    ):
        np.testing.assert_allclose(contract.trace(T, a1, a2), want, rtol=1e-13)
    np.testing.assert_array_equal(contract.trace(T, (), ()), T)  # nothing to trace
    assert contract.chain(jnp.ones((2, 3)), jnp.ones((3, 2)), np.int64(1)).shape == (2, 2)
