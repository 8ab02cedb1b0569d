"""Jacobian quantities without the Jacobian: divergence, trace estimators, log-volumes, Gauss-Newton."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import randn, reference
from registry import CASES

import jacobians

SQUARE = ["elementwise", "planar_flow", "coupling_flow", "stencil_2d", "block_diagonal", "scan_static_stencil",
          "custom_vjp", "while_shift", "banded_const_matmul"]


@pytest.mark.parametrize("name", SQUARE)
def test_divergence_equals_trace(name, rng):
    c = CASES[name]
    x = randn(rng, c.shape)
    want = np.trace(np.asarray(reference(c, x)).reshape(x.size, x.size))
    for chunk in (None, 1, 3):
        np.testing.assert_allclose(jacobians.divergence(c.fun, chunk_size=chunk)(x), want, rtol=1e-12, atol=1e-12)


def test_estimators_unbiased_with_honest_errors(rng):
    A = randn(rng, (8, 8))
    f = lambda x: jnp.tanh(A @ x) + 0.5 * x  # noqa: E731
    x = randn(rng, (8,))
    exact = float(jnp.trace(jax.jacfwd(f)(x)))
    for estimator, probes in (("hutchinson", "rademacher"), ("hutchinson", "gaussian"), ("hutch++", "rademacher")):
        est = jax.jit(jax.vmap(lambda k: jacobians.trace_estimate(f, num_probes=9, estimator=estimator,
                                                                  probes=probes)(x, key=k)))
        vals, errs = est(jax.random.split(jax.random.key(3), 400))
        vals, errs = np.asarray(vals), np.asarray(errs)
        # The mean over 400 keys is within 4 standard errors of the exact trace (unbiased) ...
        assert abs(vals.mean() - exact) < 4 * vals.std() / np.sqrt(len(vals)) + 1e-12, estimator
        # ... and each estimate's error bar covers the truth about as often as a normal one would.
        covered = np.mean(np.abs(vals - exact) <= 2 * errs + 1e-12)
        assert covered > 0.8, (estimator, probes, covered)
    a = jacobians.trace_estimate(f, num_probes=5)(x, key=jax.random.key(0))
    b = jacobians.trace_estimate(f, num_probes=5)(x, key=jax.random.key(0))
    assert a == b


def test_log_volume(rng):
    g = lambda x: jnp.concatenate([jnp.sin(x), x[:3] ** 2, jnp.cumsum(x)])  # noqa: E731
    x = randn(rng, (5,))
    J = np.asarray(jax.jacfwd(g)(x))
    np.testing.assert_allclose(jacobians.log_volume(g)(x), 0.5 * np.linalg.slogdet(J.T @ J)[1], rtol=1e-12)
    xs = randn(rng, (4, 5))
    want = [0.5 * np.linalg.slogdet(np.asarray(jax.jacfwd(g)(p)).T @ np.asarray(jax.jacfwd(g)(p)))[1] for p in xs]
    np.testing.assert_allclose(jacobians.log_volume(g, batched=True)(xs), want, rtol=1e-12)
    sq = CASES["planar_flow"]
    np.testing.assert_allclose(jacobians.log_volume(sq.fun)(x[:4]), jacobians.log_abs_det(sq.fun)(x[:4]), rtol=1e-12)
    # Condition number 1e7: J^T J would square it to 1e14; the QR route stays accurate.
    U, _ = np.linalg.qr(np.asarray(randn(rng, (7, 4))))
    V, _ = np.linalg.qr(np.asarray(randn(rng, (4, 4))))
    s = np.array([1.0, 1e-2, 1e-5, 1e-7])
    M = jnp.asarray(U @ np.diag(s) @ V.T)
    got = float(jacobians.log_volume(lambda x: M @ x)(x[:4]))
    assert abs(got - np.sum(np.log(s))) <= 1e-10 * abs(np.sum(np.log(s)))
    assert jacobians.log_volume(lambda x: jnp.stack([x[0], x[0], 2 * x[0]]))(x[:2]) == -np.inf


@pytest.mark.parametrize("name", ["tall_tanh", "stencil_1d", "custom_vjp_linear_rule", "conv_same"])
def test_gauss_newton(name, rng):
    c = CASES[name]
    x = randn(rng, c.shape)
    J = np.asarray(reference(c, x)).reshape(-1, x.size)
    gn = jacobians.gauss_newton(c.fun)(x)
    v = randn(rng, c.shape)
    np.testing.assert_allclose(gn.mv(v).reshape(-1), J.T @ (J @ np.asarray(v).reshape(-1)), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(gn.diagonal().reshape(-1), np.diag(J.T @ J), rtol=1e-12, atol=1e-12)
    if c.fwd:
        np.testing.assert_allclose(gn.materialise(), J.T @ J, rtol=1e-10, atol=1e-12)


def test_gauss_newton_mv_checks_its_vector(rng):
    """``mv(v)`` takes what ``jax.jvp`` takes as a tangent: the inputs' structure and shapes, a real float."""
    p = {"a": randn(rng, (3,)), "b": randn(rng, (1,))}
    gn = jacobians.gauss_newton(lambda p: jnp.concatenate([p["a"] ** 2, 3 * p["b"]]))(p)
    v = {"a": randn(rng, (3,)), "b": randn(rng, (1,))}
    np.testing.assert_allclose(gn.mv(v)["a"], 4 * p["a"] ** 2 * v["a"], rtol=1e-12)
    np.testing.assert_allclose(gn.mv(v)["b"], 9 * v["b"], rtol=1e-12)
    where = r"jacobians.gauss_newton\(...\).mv: "
    with pytest.raises(ValueError, match=where + r"v's leaf 0 must have shape \(3,\)"):
        gn.mv({"a": v["b"], "b": v["a"]})  # the same number of entries, the wrong leaves
    with pytest.raises(ValueError, match=where + "v must have the structure"):
        gn.mv([v["a"], v["b"]])
    with pytest.raises(TypeError, match=where + "v's leaf 0 must be a real floating array"):
        gn.mv({"a": v["a"].astype(jnp.complex128), "b": v["b"]})  # casting would drop any imaginary part
    with pytest.raises(TypeError, match=where + "v's leaf 1 must be a real floating array"):
        gn.mv({"a": v["a"], "b": jnp.ones(1, jnp.int32)})


def test_determinants_take_the_pipeline(rng):
    A = randn(rng, (4, 4))
    x = randn(rng, (4,))

    def f(x, scale=1.0, *, shift):
        return jnp.tanh(A @ x) * scale + x + shift

    want = np.linalg.slogdet(np.asarray(jax.jacfwd(f)(x, 2.0, shift=1.0)))[1]
    np.testing.assert_allclose(jacobians.log_abs_det(f)(x, 2.0, shift=1.0), want, rtol=1e-12)
    fb = lambda X: jnp.tanh(X @ A.T) + X  # noqa: E731
    X = randn(rng, (3, 4))
    np.testing.assert_allclose(jacobians.log_abs_det(fb, batch_first=True)(X),
                               jacobians.log_abs_det(lambda x: fb(x[None])[0], batched=True)(X), rtol=1e-12)
    with pytest.raises(jacobians.CoupledBatchError, match="reduce_sum"):
        jacobians.log_abs_det(lambda X: X - X.mean(0, keepdims=True) + X**2, batch_first=True)(X)


def test_errors(rng):
    x = randn(rng, (4,))
    with pytest.raises(ValueError, match=r"jacobians.divergence: a trace needs .* the input has 4 entries and the output 2"):
        jacobians.divergence(lambda x: x[:2])(x)
    with pytest.raises(ValueError, match=r"jacobians.log_volume: a log-volume needs at least as many outputs .* m = 2, n = 4"):
        jacobians.log_volume(lambda x: x[:2])(x)
    with pytest.raises(ValueError, match=r"jacobians.trace_estimate: num_probes must be a positive int, got 0"):
        jacobians.trace_estimate(jnp.sin, num_probes=0)
    with pytest.raises(TypeError, match=r"jacobians.trace_estimate: the returned function needs a PRNG key"):
        jacobians.trace_estimate(jnp.sin, num_probes=2)(x)
    with pytest.raises(ValueError, match=r"estimator must be one of \('hutchinson', 'hutch\+\+', 'xtrace'\)"):
        jacobians.trace_estimate(jnp.sin, num_probes=2, estimator="exact")
    with pytest.raises(ValueError, match=r"choose batched=True .* or batch_first=True"):
        jacobians.det(jnp.sin, batched=True, batch_first=True)


@pytest.mark.parametrize("mode", ["auto", "fwd", "rev"])
def test_divergence_of_mixed_precision_and_empty_maps(mode):
    # float32 in, float64 out: the seeds take the dtype each direction pushes (JVPs the input's, VJPs the
    # output's); an empty input has divergence 0, with nothing to colour or certify (strict: no warning).
    def f(x):
        y = x.astype(jnp.float64)
        return 2.0 * y * jnp.sin(y[::-1])

    x = jnp.linspace(0.1, 1.0, 4).astype(jnp.float32)
    want = np.trace(np.asarray(jax.jacfwd(f)(x)))
    np.testing.assert_allclose(jacobians.divergence(f, mode=mode)(x), want, rtol=1e-6)
    assert float(jacobians.divergence(jnp.sin, mode=mode)(jnp.zeros((0,)))) == 0.0


def test_log_volume_of_a_singular_square_map_is_minus_inf():
    # Square: the kernel's LU, as log_abs_det (QR's R_ii kept a rounding residue: log 1e-16, not -inf).
    x = jnp.array([0.3, 0.7])
    g = lambda x: jnp.stack([x[0] + x[1], 2 * x[0] + 2 * x[1]])  # noqa: E731
    assert float(jacobians.log_volume(g)(x)) == float(jacobians.log_abs_det(g)(x)) == -np.inf


def test_complex_outputs_of_real_inputs_go_forward():
    # Reverse mode on a complex output of real inputs pulls the real part only: batch_jacobian and
    # divergence go forward (they silently dropped the imaginary part), and a forced mode="rev" says why.
    c = lambda v: v.astype(jnp.complex128)  # noqa: E731
    eix = lambda v: jnp.exp(jax.lax.complex(jnp.zeros_like(v), v))  # noqa: E731
    rc = lambda x: eix(x) * c(x)  # noqa: E731
    X = jnp.array([[0.1, 0.5, 1.0], [0.2, 0.4, 0.8]])
    np.testing.assert_allclose(jacobians.batch_jacobian(rc)(X), jax.vmap(jax.jacfwd(rc))(X), rtol=1e-12)
    np.testing.assert_allclose(jacobians.divergence(rc)(X[0]), np.trace(jax.jacfwd(rc)(X[0])), rtol=1e-12)
    st = lambda u: eix(u) * c(jnp.roll(u, 1)) + c(u**2)  # noqa: E731 - colours shared across inputs
    y = jnp.linspace(0.1, 1.0, 12)
    np.testing.assert_allclose(jacobians.divergence(st)(y), np.trace(jax.jacfwd(st)(y)), rtol=1e-12)
    for fn in (jacobians.batch_jacobian(rc, mode="rev"), jacobians.divergence(rc, mode="rev")):
        with pytest.raises(TypeError, match="mode='rev' needs real outputs"):
            fn(X if fn.transform.where.endswith("batch_jacobian") else X[0])


def test_log_volume_of_a_square_map_is_log_abs_det_in_log_space():
    # A square map's log-volume takes log_abs_det's plan: -inf before (tanh's derivative underflowed).
    x = jnp.full((4,), 10.0, jnp.float32)
    want = 4 * (np.log(4) - 20 - 2 * np.log1p(np.exp(-20)))
    for fn in (jacobians.log_volume, jacobians.log_abs_det):
        assert fn(jnp.tanh).plan(x).method == "block-triangular"
        np.testing.assert_allclose(fn(jnp.tanh)(x), want, rtol=1e-6)
    y = jnp.array([800.0, 1.0, 2.0])  # exp overflows, its log does not
    np.testing.assert_allclose(jacobians.log_volume(jnp.exp)(y), 803.0, rtol=1e-12)
    xs = jnp.linspace(0.5, 2.0, 6).reshape(2, 3)
    got = jacobians.log_volume(lambda X: jnp.tanh(X) * 2.0, batch_first=True)(xs)
    np.testing.assert_allclose(got, jnp.sum(jnp.log(2 / jnp.cosh(xs) ** 2), axis=1), rtol=1e-12)


def test_a_map_singular_everywhere_passes_its_certificate(rng):
    # Row-wise standardisation loses two directions at every x: plan and JAX's dense slogdet are both
    # rounding noise far below Hadamard's bound; the certificate took their difference for a defect.
    f = lambda x: jax.nn.standardize(x.reshape(2, 4), axis=-1).ravel()  # noqa: E731
    x = randn(rng, (8,))
    assert np.linalg.matrix_rank(np.asarray(jax.jacfwd(f)(x))) == 6
    assert float(jacobians.log_abs_det(f)(x)) < -60  # strict mode: a failed certificate would raise
    assert float(jacobians.slogdet(f)(x)[1]) < -60
