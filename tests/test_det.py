"""Jacobian determinants: the book's example, batches, singular cases, sharding."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import randn

import jacobians
from jacobians import kernels


def flow3(x):
    return jnp.stack([x[0] + jnp.sin(x[1]), x[1] * jnp.exp(0.1 * x[2]), x[2] + x[0] ** 2])


def test_book_example_5_61():
    f = lambda x: jnp.stack([-2 * x[0] + x[1], x[0] + x[1]])  # noqa: E731
    x = jnp.array([0.4, -1.3])
    np.testing.assert_allclose(jnp.abs(jacobians.det(f)(x)), 3.0, rtol=1e-14)
    sign, logabs = jacobians.slogdet(f)(x)
    assert sign == -1.0
    np.testing.assert_allclose(logabs, np.log(3.0), rtol=1e-14)
    np.testing.assert_allclose(jacobians.log_abs_det(f)(x), np.log(3.0), rtol=1e-14)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 16, 40])
def test_batched_matches_numpy_loop(rng, n):
    W = randn(rng, (n, n)) / np.sqrt(n)
    f = lambda x: jnp.tanh(W @ x) + x  # noqa: E731
    xs = randn(rng, (7, n))
    sign, logabs = jacobians.slogdet(f, batched=True)(xs)
    assert sign.shape == logabs.shape == (7,)
    for i in range(7):
        s, l = np.linalg.slogdet(np.asarray(jax.jacfwd(f)(xs[i])))
        assert sign[i] == s
        np.testing.assert_allclose(logabs[i], l, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(jacobians.det(f, batched=True)(xs), sign * np.exp(logabs), rtol=1e-12)


def test_float32(rng):
    xs = randn(rng, (9, 3), jnp.float32)
    got = jacobians.log_abs_det(flow3, batched=True)(xs)
    assert got.dtype == jnp.float32
    ref = [np.linalg.slogdet(np.asarray(jax.jacfwd(flow3)(x), np.float64))[1] for x in np.asarray(xs, np.float64)]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


def test_matrix_valued_map(rng):
    n = 3
    A = randn(rng, (n, n))
    X = randn(rng, (n, 4))
    # X -> AX on R^{n x 4}: the flattened Jacobian is kron(A, I_4), det = det(A)^4.
    np.testing.assert_allclose(jacobians.det(lambda X: A @ X)(X), jnp.linalg.det(A) ** 4, rtol=1e-10)
    np.testing.assert_allclose(
        jacobians.log_abs_det(lambda X: X @ A.T)(randn(rng, (5, n))),
        5 * np.log(abs(np.linalg.det(np.asarray(A)))),
        rtol=1e-10,
    )


@pytest.mark.parametrize("n", [1, 2, 3, 6])
def test_singular_gives_minus_inf(n):
    f = lambda x: x * jnp.arange(n, dtype=x.dtype)  # noqa: E731  (first entry has derivative 0)
    sign, logabs = jacobians.slogdet(f)(jnp.ones(n))
    assert sign == 0 and logabs == -np.inf
    assert jacobians.det(f)(jnp.ones(n)) == 0
    sign, logabs = jacobians.slogdet(lambda x: jnp.full(n, jnp.sum(x)))(jnp.ones(n))
    if n > 1:
        assert sign == 0 and logabs == -np.inf


@pytest.mark.parametrize("n", [1, 2, 3, 8])
def test_no_under_or_overflow(n):
    for scale in (1e-200, 1e200):
        sign, logabs = kernels.slogdet(scale * (jnp.eye(n) + 0.1 * jnp.ones((n, n))))
        expected = n * np.log(scale) + np.linalg.slogdet(np.eye(n) + 0.1 * np.ones((n, n)))[1]
        assert sign == 1
        np.testing.assert_allclose(logabs, expected, rtol=1e-12)
    rows = jnp.diag(jnp.array([1e-200, 1e-200, 1.0, 1.0])[:n]) + 0.0
    np.testing.assert_allclose(kernels.slogdet(rows)[1], np.sum(np.log(np.diag(rows))), rtol=1e-12)


def test_slogdet_kernel_matches_lapack(rng):
    for n in (1, 2, 3, 4, 7, 33):
        A = randn(rng, (6, n, n))
        s, l = kernels.slogdet(A)
        s_ref, l_ref = np.linalg.slogdet(np.asarray(A))
        np.testing.assert_array_equal(s, s_ref)
        np.testing.assert_allclose(l, l_ref, rtol=1e-10)


def test_errors(rng):
    with pytest.raises(ValueError, match=r"input has size 3 \(shape \(3,\)\) and the output size 2 \(shape \(2,\)\)"):
        jacobians.det(lambda x: x[:2])(jnp.ones(3))
    with pytest.raises(ValueError, match=r"batched=True needs x with a leading batch axis, got a scalar"):
        jacobians.slogdet(jnp.sin, batched=True)(1.0)
    with pytest.raises(TypeError, match=r"batched must be True or False, got 'yes'"):
        jacobians.log_abs_det(jnp.sin, batched="yes")
    with pytest.raises(TypeError, match=r"dtype int"):
        jacobians.det(jnp.sin)(jnp.arange(3))


def test_sharded_across_four_devices():
    code = textwrap.dedent(
        """
        import jax, jax.numpy as jnp, numpy as np
        jax.config.update("jax_enable_x64", True)
        import jacobians
        assert jax.device_count() == 4, jax.devices()
        f = lambda x: jnp.stack([x[0] + jnp.sin(x[1]), x[1] * jnp.exp(0.1 * x[2]), x[2] + x[0] ** 2])
        xs = jnp.asarray(np.random.default_rng(0).standard_normal((10, 3)))
        sign, logabs = jacobians.slogdet(f, batched=True)(xs)
        assert logabs.shape == (10,)
        ref = [np.linalg.slogdet(np.asarray(jax.jacfwd(f)(x))) for x in xs]
        np.testing.assert_array_equal(sign, [r[0] for r in ref])
        np.testing.assert_allclose(logabs, [r[1] for r in ref], rtol=1e-12)
        print("devices used:", len(jacobians.log_abs_det(f, batched=True)(xs).sharding.device_set))
        """
    )
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "devices used: 4" in out.stdout
