"""Gradient checking with the book's relative-error metric."""

import dataclasses
import functools
import warnings

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


@functools.cache
def _jacrev(fun):
    """JAX's Jacobian of fun, compiled once for the three methods."""
    return jax.jit(jax.jacrev(fun))


@pytest.mark.parametrize("method", ["central", "forward", "complex"])
@pytest.mark.parametrize("fun, shape", [(f_vec, (3,)), (f_mat, (2, 3)), (lambda t: jnp.sin(t) * t**2, ())])
def test_passes_right_jacobian(rng, method, fun, shape):
    x = randn(rng, shape)
    res = jacobians.gradcheck(fun, x, _jacrev(fun), method=method)
    assert res.passed and bool(res) and res.status == "passed", repr(res)
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
    assert not res and res.status == "failed" and res.error > 1e-3, repr(res)
    assert "FAILED" in repr(res) and "worst entry" in repr(res)
    with pytest.raises(
        AssertionError, match=r"gradcheck FAILED: relative error \S+ >= tol 1e-06 \(central differences"
    ):
        jacobians.assert_gradcheck(f, x, wrong)
    assert jacobians.assert_gradcheck(f, x, right).passed


@pytest.mark.parametrize("exact", [False, True])
def test_metric_by_hand(rng, exact):
    # The book's procedure: a given h is taken as given (x_j +- h), also where |x_j| > 1 (issue 24: the step
    # was scaled by max(1, |x_j|), and this check at x = 2 failed).
    x = jnp.concatenate([jnp.array([2.0]), randn(rng, (1,))])
    f = lambda x: jnp.stack([x[0] * x[1], x[0] ** 3])  # noqa: E731
    J = jax.jacfwd(f)(x)
    off = J if exact else J + 0.01 * randn(rng, J.shape)
    h = 1e-4
    res = jacobians.gradcheck(f, x, lambda x: off, h=h)
    assert "step 1e-04)" in repr(res) and not res.scaled
    xn = np.asarray(x)
    dh = np.empty((2, 2))
    for j in range(2):
        e = np.zeros(2)
        e[j] = h
        dh[:, j] = (np.asarray(f(xn + e)) - np.asarray(f(xn - e))) / ((xn + e)[j] - (xn - e)[j])
    df = np.asarray(off)
    expected = np.sqrt(np.sum((dh - df) ** 2) / np.sum((dh + df) ** 2))
    np.testing.assert_allclose(res.error, expected, rtol=1e-3 if exact else 1e-6)
    if exact:  # central differences of x0^3 with h = 1e-4: error h^2 x0 / (6 x0^2) relative, well below 1e-6
        assert res.passed and res.error < 1e-7, repr(res)
        return
    k = np.unravel_index(np.argmax(np.abs(dh - df)), dh.shape)
    assert res.worst_index == tuple(int(i) for i in k)
    np.testing.assert_allclose(res.worst_analytic, df[k])
    np.testing.assert_allclose(res.worst_numeric, dh[k], rtol=1e-7, atol=1e-12)


def test_empty_x_passes():
    # Issue 24: an empty x raised IndexError; its Jacobian is empty, and a wrong shape still fails.
    for x, jit in ((jnp.zeros((0,)), True), (jnp.zeros((0, 3)), False)):
        res = jacobians.gradcheck(jnp.sin, x, jit=jit)
        assert res.passed and res.error == 0.0, repr(res)
    res = jacobians.gradcheck(jnp.sin, jnp.zeros((0,)), lambda x: jnp.zeros((1, 1)))
    assert res.status == "failed" and "the analytic Jacobian has shape (1, 1), expected" in res.problem


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


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_half_precision_has_its_own_defaults(rng, dtype):
    # Issue "Trust and first run" (a): float16/bfloat16 used float32's tolerance and failed.
    # One vector shape for the vector maps: the checks' small eager steps compile once per shape and dtype.
    for fun, shape in ((jnp.sin, (3,)), (f_vec, (3,)), (jnp.exp, (2, 2))):
        x = randn(rng, shape, dtype)
        J = jacobians.jacobian(fun)(x)  # gradcheck's default analytic Jacobian: compiled once, not per method
        for method, jac_fun in (("central", None), ("forward", lambda x, J=J: J)):
            res = jacobians.gradcheck(fun, x, jac_fun, method=method)
            assert res.passed, repr(res)
            assert res.tol >= 5e-2 and res.h >= 2.0**-5
    x = randn(rng, (3,), dtype)
    right = jax.jacfwd(jnp.sin)(x)
    assert not jacobians.gradcheck(jnp.sin, x, lambda x: 1.5 * right)  # gross errors are still caught
    x = randn(rng, (3,), dtype)
    swapped = jax.jit(jax.jacfwd(f_vec))(x)[:, ::-1]
    assert not jacobians.gradcheck(f_vec, x, lambda x: swapped)
    with pytest.raises(
        ValueError, match=r"method='complex' \(the complex step\) needs real float32 or float64 x, got dtype"
    ):
        jacobians.gradcheck(jnp.sin, x, method="complex")


def test_each_dtype_gets_its_own_defaults():
    seen = set()
    for dtype in (jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64):
        res = jacobians.gradcheck(jnp.sin, jnp.ones(2, dtype))
        assert res.passed, repr(res)
        seen.add((res.h, res.tol))
    assert len(seen) == 4
    # Complex x (a holomorphic fun) uses its real part's defaults.
    r64 = jacobians.gradcheck(jnp.sin, jnp.ones(2, jnp.complex64))
    r32 = jacobians.gradcheck(jnp.sin, jnp.ones(2, jnp.float32))
    assert (r64.h, r64.tol) == (r32.h, r32.tol)


def test_complex_x_holomorphic(rng):
    z = jnp.asarray(rng.standard_normal(3) + 1j * rng.standard_normal(3))
    f = lambda z: jnp.stack([z[0] * z[1], jnp.exp(z[2]) + z[0] ** 2])  # noqa: E731
    res = jacobians.gradcheck(f, z)
    assert res.passed and res.error < 1e-8, repr(res)
    assert not jacobians.gradcheck(f, z, lambda z: jnp.conj(jax.jacfwd(f, holomorphic=True)(z)))
    # Not holomorphic (|z|^2 as a complex array): the quotients along the imaginary axis give it away.
    res = jacobians.gradcheck(lambda z: jnp.conj(z) * z, z)
    assert not res.passed and res.status == "failed" and len(res.worst_index) == 2, repr(res)


def test_inside_a_transformation_is_refused():
    with pytest.raises(TypeError, match=r"jacobians.gradcheck: x is a traced value .* outside any transformation"):
        jax.jit(lambda a: jacobians.gradcheck(jnp.sin, a))(jnp.ones(3))


@pytest.mark.parametrize(
    "dtype, x0", [(jnp.float32, 1e5), (jnp.float32, 1e3), (jnp.float64, 1e12), (jnp.float16, 100.0)]
)
def test_step_scales_with_x(dtype, x0):
    # Issue (b): an absolute step vanishes next to a large |x| (x + h == x, then 0/0).
    x = jnp.asarray([x0, -x0, 0.5], dtype)
    res = jacobians.gradcheck(lambda x: x**2, x)
    assert res.passed, repr(res)
    # A wrong derivative at a large x is still caught.
    assert not jacobians.gradcheck(lambda x: x**2, x, lambda x: jnp.diag(3 * x))


def test_default_step_and_tolerance():
    x64, x32 = jnp.ones(2), jnp.ones(2, jnp.float32)
    f = lambda x: x**2  # noqa: E731
    r = jacobians.gradcheck(f, x64)
    np.testing.assert_allclose(r.h, np.finfo(np.float64).eps ** (1 / 3))
    assert r.tol == 1e-6
    r = jacobians.gradcheck(f, x32, method="forward")
    np.testing.assert_allclose(r.h, np.finfo(np.float32).eps ** 0.5, rtol=1e-6)


def test_inconclusive_when_finite_differences_are_not_finite(rng):
    # Issue (c): fun undefined at x - h says nothing about the Jacobian; not "FAILED".
    x = jnp.array([0.0, 2.0])
    res = jacobians.gradcheck(jnp.sqrt, x, lambda x: jnp.diag(0.5 / jnp.sqrt(jnp.maximum(x, 1e-300))))
    assert res.status == "inconclusive" and not res and not res.passed, repr(res)
    assert repr(res).startswith("gradcheck INCONCLUSIVE: the finite-difference Jacobian has 1 non-finite entry")
    assert "cannot be checked at this x" in repr(res)
    with pytest.raises(AssertionError, match=r"gradcheck INCONCLUSIVE"):
        jacobians.assert_gradcheck(jnp.sqrt, x)
    # Overflow in fun at x + h as well.
    big = jnp.asarray([np.finfo(np.float32).max], jnp.float32)
    assert jacobians.gradcheck(lambda x: x * 2, big).status == "inconclusive"
    # A step too small to move x, and a non-finite x.
    res = jacobians.gradcheck(jnp.sin, jnp.array([1.0, 2.0]), h=1e-30)
    assert res.status == "inconclusive" and "the step vanishes at x[0] = 1.0 (x + h == x in float64)" in res.problem
    assert jacobians.gradcheck(jnp.sin, jnp.array([1.0, jnp.inf])).status == "inconclusive"


def test_repr_is_honest():
    # The README example: the book's (5.63)-(5.66) in float32.
    f = lambda x: jnp.stack([-2 * x[0] + x[1], x[0] + x[1]])  # noqa: E731
    res = jacobians.gradcheck(f, jnp.array([1.0, 2.0], jnp.float32))
    text = repr(res)
    assert res.passed and text.startswith("gradcheck PASSED: relative error ")
    assert f"relative error {res.error:.1e}".replace(".0e", "e") in text or res.error == 0
    assert "< tol 1e-03 (central differences, step 4.9e-03 * max(1, |x_j|))" in text
    assert "worst entry" not in text  # only failures list the worst entry
    exact = jacobians.gradcheck(lambda x: 2 * x, jnp.ones(2))  # exact: doubling and the steps round exactly
    assert repr(exact).startswith("gradcheck PASSED: relative error 0 < tol 1e-06")
    complex_step = jacobians.gradcheck(jnp.sin, jnp.ones(2), method="complex")
    assert "(complex step, h=1e-20)" in repr(complex_step)


def test_python_control_flow(rng):
    # Issue (d): value-dependent Python control flow cannot be compiled.
    f = lambda x: x if x.sum() > 0 else -x  # noqa: E731
    x = jnp.abs(randn(rng, (3,))) + 0.1
    msg = (
        r"jacobians.gradcheck: fun \(or its Jacobian\) needs concrete values, e.g. Python control flow such as "
        r"`if x.sum\(\) > 0` on traced values, which cannot be compiled \(TracerBoolConversionError\). Write it "
        r"with jnp.where or jax.lax.cond, or pass jit=False"
    )
    with pytest.raises(TypeError, match=msg):
        jacobians.gradcheck(f, x)
    with pytest.raises(TypeError, match=msg):  # also when the Jacobian is given
        jacobians.gradcheck(f, x, lambda x: jnp.eye(3))
    with pytest.raises(TypeError, match=r"needs concrete values.*\(ConcretizationTypeError\)"):
        jacobians.gradcheck(lambda x: x * int(x[0]), x)
    for sign in (1.0, -1.0):
        res = jacobians.gradcheck(f, sign * x, jit=False)
        assert res.passed and res.error < 1e-9, repr(res)
        right = lambda x, s=sign: s * jnp.eye(3)  # noqa: E731
        assert jacobians.gradcheck(f, sign * x, right, jit=False).passed
        assert not jacobians.gradcheck(f, sign * x, lambda x, s=sign: -s * jnp.eye(3), jit=False)
    for method in ("forward", "complex"):
        assert jacobians.gradcheck(f, x, jit=False, method=method).passed


def test_does_not_mutate_input(rng):
    x = rng.standard_normal((2, 3))
    before = x.copy()
    jacobians.gradcheck(f_mat, x)
    jacobians.gradcheck(f_mat, x, jit=False)
    np.testing.assert_array_equal(x, before)


def test_bad_jacobians_fail_clearly(rng):
    x = randn(rng, (3,))
    res = jacobians.gradcheck(f_vec, x, lambda x: jnp.ones((3, 4)))
    assert not res and "has shape (3, 4), expected out.shape + x.shape = (4, 3)" in res.problem
    assert res.status == "failed" and repr(res).startswith("gradcheck FAILED: the analytic Jacobian has shape")
    res = jacobians.gradcheck(f_vec, x, lambda x: jnp.full((4, 3), jnp.nan))
    assert not res and res.status == "failed" and "analytic Jacobian has 12 non-finite entries" in res.problem
    res = jacobians.gradcheck(lambda x: (x, x), x)
    assert res.status == "failed" and "fun must return a single array" in res.problem


def test_jac_fun_returning_no_array_is_named(rng):
    res = jacobians.gradcheck(lambda x: x**2, randn(rng, (3,)), lambda x: "abc")
    assert res.status == "failed" and "jac_fun must return an array of numbers, got str ('abc')" in res.problem


def test_rounding_level_jacobians_pass_and_small_errors_still_fail(rng):
    """A Jacobian zero but for rounding (0/0 in the relative metric) passes within the quotients' rounding."""
    x = randn(rng, (3,))
    res = jacobians.gradcheck(lambda x: jnp.sin(x) ** 2 + jnp.cos(x) ** 2, x)
    assert res and res.within_rounding and "within the finite differences' rounding" in repr(res)
    assert res.error > res.tol  # the book's metric itself is reported as it is
    # An entry wrong by 1e-3 relative, or a Jacobian entry set near zero, is far outside rounding.
    wrong = jacobians.gradcheck(jnp.sin, x, lambda x: jnp.diag(jnp.cos(x) * 1.001))
    assert not wrong and not wrong.within_rounding
    wrong = jacobians.gradcheck(jnp.sin, x, lambda x: jnp.diag(jnp.cos(x)).at[0, 0].set(1e-9))
    assert not wrong and not wrong.within_rounding


def test_fun_computing_in_float32_gets_float32_defaults(rng):
    """A float32 fun of a float64 x: the step and tolerance of float32, whose rounding sets what differences see."""
    x = randn(rng, (3,))
    res = jacobians.gradcheck(lambda x: jnp.sin(x.astype(jnp.float32)), x)
    assert res and res.tol == 1e-3 and res.h == pytest.approx(np.finfo(np.float32).eps ** (1 / 3))
    assert not jacobians.gradcheck(lambda x: jnp.sin(x.astype(jnp.float32)), x,
                                   lambda x: jnp.diag(jnp.cos(x) * 1.1).astype(jnp.float32))


def test_result_state_is_consistent():
    with pytest.raises(
        ValueError, match=r"GradcheckResult: status must be one of \('passed', 'failed', 'inconclusive'\), got 'ok'"
    ):
        jacobians.GradcheckResult(0.0, True, 1e-6, 1e-5, "central", status="ok")
    with pytest.raises(ValueError, match=r"GradcheckResult: passed=True contradicts status='inconclusive'"):
        jacobians.GradcheckResult(0.0, True, 1e-6, 1e-5, "central", status="inconclusive")
    assert jacobians.GradcheckResult(1.0, False, 1e-6, 1e-5, "central").status == "failed"


def test_errors():
    with pytest.raises(ValueError, match=r"method must be one of \('central', 'forward', 'complex'\), got 'backward'"):
        jacobians.gradcheck(jnp.sin, jnp.ones(2), method="backward")
    with pytest.raises(
        TypeError, match=r"x must be a floating-point array \(real, or complex for a holomorphic fun\), got dtype int"
    ):
        jacobians.gradcheck(jnp.sin, jnp.arange(2))
    with pytest.raises(ValueError, match=r"h must be a positive finite real number \(a scalar\), got -0.1"):
        jacobians.gradcheck(jnp.sin, jnp.ones(2), h=-0.1)
    with pytest.raises(ValueError, match=r"tol must be a positive finite real number \(a scalar\), got 0"):
        jacobians.gradcheck(jnp.sin, jnp.ones(2), tol=0)
    with pytest.raises(ValueError, match=r"h must be a positive finite real number \(a scalar\), got True"):
        jacobians.gradcheck(jnp.sin, jnp.ones(2), h=True)
    with pytest.raises(TypeError, match=r"jacobians.gradcheck: jit must be True or False, got 'no'"):
        jacobians.gradcheck(jnp.sin, jnp.ones(2), jit="no")
    with pytest.raises(
        ValueError, match=r"method='complex' \(the complex step\) needs real float32 or float64 x, got dtype complex128"
    ):
        jacobians.gradcheck(jnp.sin, jnp.ones(2, jnp.complex128), method="complex")


def test_bad_fun_and_x_name_gradcheck():
    @dataclasses.dataclass
    class Params:
        w: jax.Array

    with pytest.raises(TypeError, match=r"jacobians.gradcheck: x must be a floating-point array, got dict "
                                        r"\(\{'w': .*ravel_pytree"):
        jacobians.gradcheck(lambda p: jnp.sin(p["w"]), {"w": jnp.ones(2)})
    with pytest.raises(TypeError, match=r"jacobians.gradcheck: x must be a floating-point array, got Params\b.*"
                                        r"ravel_pytree"):
        jacobians.gradcheck(lambda p: jnp.sin(p.w), Params(jnp.ones(2)))
    with pytest.raises(TypeError, match=r"jacobians.gradcheck: fun must be callable, got int \(3\)"):
        jacobians.gradcheck(3, jnp.ones(2))
    with pytest.raises(TypeError, match=r"jacobians.gradcheck: jac_fun must be callable or None, got ndarray"):
        jacobians.gradcheck(jnp.sin, jnp.ones(2), np.eye(2))


def test_huge_entries_and_numpy_steps():
    # Entries past 1e154: the metric's sums of squares are of values scaled by the largest entry (they
    # overflowed to a NaN error); NumPy and 0-d JAX numbers are numbers for h and tol.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = jacobians.gradcheck(jnp.exp, jnp.array([700.0]))
    assert np.isfinite(res.error) and res.error < 1e-5
    for h in (np.float32(1e-4), jnp.asarray(1e-4), np.float64(1e-4)):
        assert jacobians.gradcheck(jnp.sin, jnp.array([0.3]), h=h, tol=np.float64(1e-6)).passed
