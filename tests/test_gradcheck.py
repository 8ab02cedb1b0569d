"""Gradient checking with the book's relative-error metric."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import randn

import jacobians


def f_vec(x):
    return jnp.stack([x[0] + jnp.sin(x[1]), x[1] * jnp.exp(0.1 * x[2]), x[2] + x[0] ** 2, x[0] * x[1] * x[2]])


def f_mat(X):  # (2, 3) -> (3, 3)
    return jnp.tanh(X.T @ X) + X[0][:, None] * jnp.cos(X[1])[None, :]


@pytest.mark.parametrize("method", ["central", "forward", "complex"])
@pytest.mark.parametrize("fun, shape", [(f_vec, (3,)), (f_mat, (2, 3)), (lambda t: jnp.sin(t) * t**2, ())])
def test_passes_right_jacobian(rng, method, fun, shape):
    x = randn(rng, shape)
    res = jacobians.gradcheck(fun, x, lambda x: jax.jacrev(fun)(x), method=method)
    assert res.passed and bool(res), repr(res)
    assert res.error < 1e-6
    assert res.method == method
    assert jacobians.gradcheck(fun, x, method=method)  # against jacobians.jacobian


def test_complex_step_is_exact_to_rounding(rng):
    x = randn(rng, (3,))
    assert jacobians.gradcheck(f_vec, x, method="complex").error < 1e-14


def test_fails_wrong_jacobian(rng):
    x = randn(rng, (3, 3))
    f = lambda X: jnp.sin(X) @ X  # noqa: E731
    right = jax.jacfwd(f)
    wrong = lambda X: jnp.transpose(right(X), (2, 3, 0, 1))  # noqa: E731
    res = jacobians.gradcheck(f, x, wrong)
    assert not res and res.error > 1e-3, repr(res)
    assert "FAILED" in repr(res) and "worst entry" in repr(res)
    with pytest.raises(AssertionError, match=r"gradcheck FAILED: error .* >= tol 1.0e-06"):
        jacobians.assert_gradcheck(f, x, wrong)
    assert jacobians.assert_gradcheck(f, x, right).passed


def test_metric_by_hand(rng):
    x = randn(rng, (2,))
    f = lambda x: jnp.stack([x[0] * x[1], x[0] ** 3])  # noqa: E731
    J = jax.jacfwd(f)(x)
    off = J + 0.01 * randn(rng, J.shape)
    h = 1e-4  # the book's procedure
    res = jacobians.gradcheck(f, x, lambda x: off, h=h)
    xn = np.asarray(x)
    dh = np.empty((2, 2))
    for j in range(2):
        e = np.zeros(2)
        e[j] = h
        dh[:, j] = (np.asarray(f(xn + e)) - np.asarray(f(xn - e))) / (2 * h)
    df = np.asarray(off)
    expected = np.sqrt(np.sum((dh - df) ** 2) / np.sum((dh + df) ** 2))
    np.testing.assert_allclose(res.error, expected, rtol=1e-6)
    k = np.unravel_index(np.argmax(np.abs(dh - df)), dh.shape)
    assert res.worst_index == tuple(int(i) for i in k)
    np.testing.assert_allclose(res.worst_analytic, df[k])
    np.testing.assert_allclose(res.worst_numeric, dh[k], rtol=1e-7, atol=1e-12)


def test_custom_jvp_rule_checked():
    @jax.custom_jvp
    def bad_exp(x):
        return jnp.exp(x)

    bad_exp.defjvp(lambda p, t: (jnp.exp(p[0]), 2.0 * jnp.exp(p[0]) * t[0]))  # wrong by 2x
    assert not jacobians.gradcheck(bad_exp, jnp.array([0.3, -0.2]))


def test_float32_defaults(rng):
    x = randn(rng, (3,), jnp.float32)
    for method in ("central", "forward", "complex"):
        res = jacobians.gradcheck(f_vec, x, method=method)
        assert res, repr(res)
        assert res.tol > 1e-6  # looser than float64
    assert not jacobians.gradcheck(f_vec, x, lambda x: 1.01 * jax.jacfwd(f_vec)(x))


def test_default_step_and_tolerance():
    x64, x32 = jnp.ones(2), jnp.ones(2, jnp.float32)
    f = lambda x: x**2  # noqa: E731
    r = jacobians.gradcheck(f, x64)
    np.testing.assert_allclose(r.h, np.finfo(np.float64).eps ** (1 / 3))
    assert r.tol == 1e-6
    r = jacobians.gradcheck(f, x32, method="forward")
    np.testing.assert_allclose(r.h, np.finfo(np.float32).eps ** 0.5, rtol=1e-6)


def test_does_not_mutate_input(rng):
    x = rng.standard_normal((2, 3))
    before = x.copy()
    jacobians.gradcheck(f_mat, x)
    np.testing.assert_array_equal(x, before)


def test_bad_jacobians_fail_clearly(rng):
    x = randn(rng, (3,))
    res = jacobians.gradcheck(f_vec, x, lambda x: jnp.ones((3, 4)))
    assert not res and "has shape (3, 4), expected out.shape + x.shape = (4, 3)" in res.problem
    res = jacobians.gradcheck(f_vec, x, lambda x: jnp.full((4, 3), jnp.nan))
    assert not res and "analytic Jacobian has 12 non-finite entries" in res.problem
    res = jacobians.gradcheck(lambda x: jnp.sqrt(x - 10.0), x, lambda x: jnp.ones((3, 3)))
    assert not res and "finite-difference Jacobian has" in res.problem
    assert "problem:" in repr(res)


def test_errors():
    with pytest.raises(ValueError, match=r"method must be one of \('central', 'forward', 'complex'\), got 'backward'"):
        jacobians.gradcheck(jnp.sin, jnp.ones(2), method="backward")
    with pytest.raises(TypeError, match=r"x must be a real floating-point array, got dtype int"):
        jacobians.gradcheck(jnp.sin, jnp.arange(2))
    with pytest.raises(ValueError, match=r"h must be a positive number, got -0.1"):
        jacobians.gradcheck(jnp.sin, jnp.ones(2), h=-0.1)
    with pytest.raises(ValueError, match=r"tol must be a positive number, got 0"):
        jacobians.gradcheck(jnp.sin, jnp.ones(2), tol=0)
