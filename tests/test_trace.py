"""Trace estimators (XTrace, complex Jacobians) and seeds kept out of XLA's constant folding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import randn

import jacobians


def _low_rank_map(rng, n: int, r: int, dtype=np.float64):
    """``f(x) = U (V sin(x))``: a Jacobian ``U V diag(cos x)`` of rank ``r``, and that Jacobian's trace."""
    U, V = randn(rng, (n, r)), randn(rng, (r, n))
    if np.issubdtype(dtype, np.complexfloating):
        U = jax.lax.complex(U, randn(rng, (n, r)))
    U = jnp.asarray(U, dtype)
    f = lambda x: U @ (V.astype(U.dtype) @ jnp.sin(x))  # noqa: E731
    return f


@pytest.mark.parametrize("probes", ["rademacher", "gaussian"])
def test_xtrace_is_exact_below_half_the_probes(probes, rng):
    # rank(J) = 4 < num_probes // 2 = 5: every leave-one-out sketch spans range(J), nothing is left to sample.
    n = 30
    f = _low_rank_map(rng, n, 4)
    x = randn(rng, (n,))
    exact = float(jnp.trace(jax.jacfwd(f)(x)))
    est, err = jacobians.trace_estimate(f, num_probes=10, estimator="xtrace", probes=probes)(x, key=jax.random.key(1))
    np.testing.assert_allclose(est, exact, rtol=1e-10, atol=1e-10)
    assert err < 1e-9
    # A full-rank J: more probes than twice its size make it exact too (rank n < num_probes // 2).
    A = randn(rng, (6, 6))
    g = lambda x: jnp.tanh(A @ x) + 0.5 * x  # noqa: E731
    y = randn(rng, (6,))
    est, err = jacobians.trace_estimate(g, num_probes=14, estimator="xtrace", probes=probes)(y, key=jax.random.key(2))
    np.testing.assert_allclose(est, jnp.trace(jax.jacfwd(g)(y)), rtol=1e-10)


def test_xtrace_unbiased_with_honest_errors_and_better_than_hutch_pp(rng):
    # A Jacobian M diag(cos x) with M's spectrum decaying geometrically (where sketching pays).
    n = 12
    Q = jnp.linalg.qr(randn(rng, (n, n)))[0]
    M = (Q * jnp.asarray(0.6 ** np.arange(n))[None, :]) @ Q.T
    f = lambda x: M @ jnp.sin(x)  # noqa: E731
    x = randn(rng, (n,))
    exact = float(jnp.trace(jax.jacfwd(f)(x)))
    keys = list(jax.random.split(jax.random.key(5), 200))
    spread = {}
    for estimator in ("xtrace", "hutch++"):
        est = jacobians.trace_estimate(f, num_probes=8, estimator=estimator)  # one compile, 200 calls
        vals, errs = np.asarray([est(x, key=k) for k in keys]).T
        assert np.all(np.isfinite(vals)) and np.all(errs >= 0), estimator
        # Unbiased: the mean over 300 keys lies within 4 standard errors of the exact trace.
        assert abs(vals.mean() - exact) < 4 * vals.std() / np.sqrt(len(vals)), estimator
        spread[estimator] = vals.std()
        if estimator == "xtrace":  # its error bar covers the truth about as often as a normal one would
            assert np.mean(np.abs(vals - exact) <= 2 * errs) > 0.75
    assert spread["xtrace"] < spread["hutch++"], spread  # the same 8 JVPs, every one used twice


@pytest.mark.parametrize("probes", ["rademacher", "gaussian"])
def test_xtrace_error_bar_covers_a_diagonal_jacobian(probes, rng):
    """Rademacher probes of a diagonal J give equal leave-one-out estimates, all off by O(1): the spread
    said 0. The same probes' Hutchinson estimate (exact there) shows the gap, and the error bar covers it."""
    n = 10
    f = lambda z: z ** 3 * jnp.arange(1.0, n + 1)  # noqa: E731
    x = randn(rng, (n,))
    exact = float(jnp.trace(jax.jacfwd(f)(x)))
    est = jacobians.trace_estimate(f, num_probes=4, estimator="xtrace", probes=probes)
    vals, errs = np.asarray(jax.vmap(lambda k: est(x, key=k))(jax.random.split(jax.random.key(1), 400)))
    covered = np.abs(vals - exact) <= 2 * errs + 1e-9 * abs(exact)
    assert covered.mean() > (0.99 if probes == "rademacher" else 0.55)
    assert np.mean(np.abs(vals - exact) > 10 * errs + 1e-9 * abs(exact)) < 0.1


def test_xtrace_with_probes_equal_up_to_sign(rng):
    # At n = 5 two Rademacher probes are equal up to sign one time in 16: the sketch R is singular there (its
    # inverse gave NaN estimates, 36 of 4000 under vmap). Unbiased still, and such an estimate's error is inf.
    A = randn(rng, (5, 5))
    x = randn(rng, (5,))
    est = jacobians.trace_estimate(lambda x: A @ x, num_probes=4, estimator="xtrace")
    keys = jax.random.split(jax.random.key(0), 2000)
    vals, errs = jax.vmap(lambda k: est(x, key=k))(keys)
    assert np.all(np.isfinite(vals))
    twins = np.isinf(errs)
    assert 0.02 < twins.mean() < 0.12 and np.all(errs[~twins] > 0)
    exact = float(jnp.trace(A))
    assert abs(vals.mean() - exact) < 4 * vals.std() / np.sqrt(len(vals))


def test_complex_holomorphic_traces(rng):
    n = 20
    f = _low_rank_map(rng, n, 3, np.complex128)
    z = jax.lax.complex(randn(rng, (n,)), randn(rng, (n,)))
    exact = complex(jnp.trace(jax.jacfwd(f, holomorphic=True)(z)))
    for estimator in ("hutch++", "xtrace"):  # rank 3: both sketches catch all of it
        est, err = jacobians.trace_estimate(f, num_probes=12, estimator=estimator, holomorphic=True)(
            z, key=jax.random.key(0))
        assert est.dtype == jnp.complex128 and err.dtype == jnp.float64
        np.testing.assert_allclose(complex(est), exact, rtol=1e-10)
    # Hutchinson with real probes: unbiased for a complex J (z^T J z), within its error bars over keys.
    est = jacobians.trace_estimate(f, num_probes=4, holomorphic=True)
    vals = np.asarray([est(z, key=k)[0] for k in jax.random.split(jax.random.key(1), 100)])
    assert abs(vals.mean() - exact) < 4 * vals.std() / np.sqrt(len(vals))
    # Real inputs, complex outputs (no holomorphic needed): J is real-linear, every sketch still exact.
    B = jax.lax.complex(randn(rng, (8, 2)), randn(rng, (8, 2))) @ randn(rng, (2, 8)).astype(jnp.complex128)
    h = lambda x: B @ jnp.sin(x).astype(B.dtype)  # noqa: E731
    x = randn(rng, (8,))
    est, _ = jacobians.trace_estimate(h, num_probes=8, estimator="xtrace")(x, key=jax.random.key(3))
    np.testing.assert_allclose(complex(est), complex(jnp.trace(jax.jacfwd(h)(x))), rtol=1e-10)


def test_trace_estimate_errors(rng):
    z = jax.lax.complex(randn(rng, (3,)), randn(rng, (3,)))
    with pytest.raises(TypeError, match=r"jacobians.trace_estimate: argument 0 has dtype complex128\. .*pass "
                                        r"holomorphic=True"):
        jacobians.trace_estimate(jnp.sin, num_probes=4)(z, key=jax.random.key(0))
    with pytest.raises(TypeError, match=r"holomorphic=True requires complex inputs"):
        jacobians.trace_estimate(jnp.sin, num_probes=4, holomorphic=True)(jnp.ones(3), key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"estimator='xtrace' needs num_probes >= 4 .*got 3"):
        jacobians.trace_estimate(jnp.sin, num_probes=3, estimator="xtrace")
    with pytest.raises(ValueError, match=r"estimator must be one of \('hutchinson', 'hutch\+\+', 'xtrace'\)"):
        jacobians.trace_estimate(jnp.sin, num_probes=4, estimator="xtrace++")
    with pytest.raises(TypeError, match=r"holomorphic must be True or False"):
        jacobians.trace_estimate(jnp.sin, num_probes=4, holomorphic=1)


def test_key_must_be_one_prng_key(rng):
    x = randn(rng, (3,))
    est = jacobians.trace_estimate(jnp.sin, num_probes=4)
    # What jax.random takes: a typed key and a raw uint32[2] key (the same bits: the same estimate).
    assert [float(v) for v in est(x, key=jax.random.key(1))] == [float(v) for v in est(x, key=jax.random.PRNGKey(1))]
    with pytest.raises(TypeError, match=r"jacobians.trace_estimate: key must be one PRNG key, a typed key from "
                                        r"jax.random.key\(seed\) or a raw uint32\[2\] key .*got int \(3\)"):
        est(x, key=3)
    with pytest.raises(TypeError, match=r"jacobians.trace_estimate: key must be one PRNG key.* got an array "
                                        r"uint32\[3\] \(JAX said: .*shape"):
        est(x, key=jnp.zeros(3, jnp.uint32))
    with pytest.raises(TypeError, match=r"jacobians.trace_estimate: key must be one PRNG key.* got an array "
                                        r"key<fry>\[2\], a batch of keys"):
        est(x, key=jax.random.split(jax.random.key(0)))


def test_seeds_next_to_closed_over_weights_are_not_constant_folded(rng):
    # Closed-over weights are constants of the compiled program; constant seeds times them would be folded by
    # XLA at compile time (an n = 1024 MLP: 20+ s). Every engine that builds its own seeds hides them behind
    # an optimization barrier; JAX's iota-built identities (jacfwd, the dense engines) are not folded. (The forward
    # Laplacian keeps seeds of up to 4096 entries foldable: cheap to fold, and faster to run.)
    n = 72
    W1, W2 = jnp.asarray(randn(rng, (n, n))), jnp.asarray(randn(rng, (n, n)))
    W3 = jnp.asarray(randn(rng, (2 * n, 2 * n)))
    f = lambda x: jnp.tanh(W2 @ jnp.tanh(W1 @ x))  # noqa: E731
    g = lambda x: jnp.sum(f(x))  # noqa: E731
    x = randn(rng, (n,))
    H = jax.hessian(g)(x)
    engines = {
        "divergence": (jacobians.divergence(f), jnp.trace(jax.jacfwd(f)(x))),
        "laplacian forward": (jacobians.laplacian(g, method="forward"), jnp.trace(H)),
        "hessian_diagonal hvp": (jacobians.hessian_diagonal(g, method="hvp"), jnp.diag(H)),
        # (Products with closed-over weights past FOLD_WORK: a small convolution's seeds do fold.)
        "sparse_jacobian": (jacobians.sparse_jacobian(lambda x: jnp.tanh(W3 @ jnp.tile(x, 2)), output="dense"),
                            jax.jacfwd(lambda x: jnp.tanh(W3 @ jnp.tile(x, 2)))(x)),
    }
    for name, (h, want) in engines.items():
        wrapped = jax.jit(lambda x, h=h: h(x))
        assert "optimization_barrier" in wrapped.lower(x).as_text(), name
        np.testing.assert_allclose(wrapped(x), want, rtol=1e-10, atol=1e-12, err_msg=name)
