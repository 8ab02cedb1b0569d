"""batch_jacobian: per-example blocks equal vmap(jacfwd(f_single)); coupled batches raise."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_tree_allclose, randn

import jacobians


def _mlp(W1, W2):
    return lambda X: jnp.tanh(jnp.tanh(X @ W1.T) @ W2.T)


@pytest.mark.parametrize("mode", ["fwd", "rev", "auto"])
@pytest.mark.parametrize("chunk", [None, 2])
def test_matches_vmap_of_single(mode, chunk, rng):
    W1, W2 = randn(rng, (5, 3)), randn(rng, (4, 5))
    f = _mlp(W1, W2)
    X = randn(rng, (6, 3))
    want = jax.jit(jax.vmap(jax.jacfwd(lambda x: f(x[None])[0])))(X)
    assert_tree_allclose(jacobians.batch_jacobian(f, mode=mode, chunk_size=chunk)(X), want)
    x32 = X.astype(jnp.float32)
    f32 = _mlp(W1.astype(jnp.float32), W2.astype(jnp.float32))
    np.testing.assert_allclose(jacobians.batch_jacobian(f32, mode=mode)(x32), want, rtol=1e-4, atol=1e-5)


def test_pytrees_argnums_axes_aux(rng):
    def g(P, X):
        return {"a": jnp.sin(X * P["s"]), "b": (X**2).sum(1)}, jnp.sum(X)

    P, X = {"s": randn(rng, (5, 4))}, randn(rng, (5, 4))
    J, aux = jacobians.batch_jacobian(g, argnums=(0, 1), has_aux=True)(P, X)
    full = jax.jit(jax.jacfwd(lambda P, X: g(P, X)[0], argnums=(0, 1)))(P, X)
    b = np.arange(5)
    assert_tree_allclose(J["a"][1], full["a"][1][b, :, b, :])
    assert_tree_allclose(J["a"][0]["s"], full["a"][0]["s"][b, :, b, :])
    assert_tree_allclose(J["b"][1], full["b"][1][b, b, :])
    np.testing.assert_allclose(aux, jnp.sum(X))
    # batch along axis 1 in and out
    Xt = X.T
    Jt = jacobians.batch_jacobian(lambda Y: jnp.sin(Y) * Y[:1], in_axes=1, out_axes=1)(Xt)
    ref = jax.vmap(jax.jacfwd(lambda y: jnp.sin(y) * y[:1]))(X)
    assert_tree_allclose(Jt, ref)


_SPD = np.eye(12) * 4.0 + np.random.default_rng(1).standard_normal((12, 12)) * 0.3

COUPLED = {
    "batch_mean": (lambda X: X - X.mean(0, keepdims=True), "reduce_sum"),
    "batchnorm": (lambda X: (X - X.mean(0, keepdims=True)) / jnp.sqrt(X.var(0, keepdims=True) + 1e-5), "reduce_sum"),
    "cumsum_over_batch": (lambda X: jnp.cumsum(X, 0), "cumsum"),
    "sort_over_batch": (lambda X: jnp.sort(X, axis=0), "sort"),
    "attention_across_batch": (lambda X: jax.nn.softmax(X @ X.T, axis=1) @ X, "dot_general"),
    "reversed_batch": (lambda X: X[::-1] * 2.0, "data movement along the batch axis"),
    # Gathers by traced indices without batching dimensions, and one solve over the whole batch, still mix.
    "gather_across_batch": (lambda X: X * X[jnp.argmax(X, axis=1)], "gather"),
    "traced_rows_known_cols": (lambda X: X[jnp.argmax(X, axis=1), 0], "gather"),
    "reversed_rows_traced_cols": (lambda X: X[jnp.arange(4)[::-1], jnp.argmax(X, axis=1)], "data movement"),
    "scatter_across_batch": (lambda X: X.at[jnp.argmax(X, axis=1), 0].add(X[:, 1]), "scatter-add"),
    "solve_across_batch": (lambda X: jnp.linalg.solve(jnp.asarray(_SPD), X.reshape(-1)).reshape(X.shape),
                           "custom_linear_solve|triangular_solve|lu"),
}


@pytest.mark.parametrize("name", sorted(COUPLED))
def test_coupled_batches_raise(name, rng):
    f, culprit = COUPLED[name]
    with pytest.raises(jacobians.CoupledBatchError, match=rf"not independent: output example \d+ depends on input example \d+; .*{culprit}.*vmap"):
        jacobians.batch_jacobian(f)(randn(rng, (4, 3)))


def test_errors(rng):
    X = randn(rng, (4, 3))
    with pytest.raises(TypeError, match=r"jacobians.batch_jacobian: in_axes must be an int"):
        jacobians.batch_jacobian(jnp.sin, in_axes=None)
    with pytest.raises(ValueError, match=r"batch axis out_axes=0 of size 4, got shape \(3,\)"):
        jacobians.batch_jacobian(lambda X: X.sum(0))(X)


def test_has_aux_needs_a_pair(rng):
    X = randn(rng, (4, 3))
    with pytest.raises(TypeError, match=r"jacobians.batch_jacobian: has_aux=True requires fun to return a pair "
                                        r"\(output, aux\), got one array float64\[4, 3\] \(no aux\)"):
        jacobians.batch_jacobian(jnp.sin, has_aux=True)(X)
    with pytest.raises(TypeError, match=r"jacobians.batch_jacobian: has_aux=True requires fun to return a pair "
                                        r"\(output, aux\), got a tuple of 3 elements"):
        jacobians.batch_jacobian(lambda X: (X, X, X), has_aux=True)(X)


def test_errors_name_the_caller_that_built_the_batch_jacobian():
    with pytest.raises(ValueError, match=r"^jacobians.log_abs_det: the batch axis in_axes=0 is not an axis of a "
                                        r"differentiated leaf of shape \(\)"):
        jacobians.log_abs_det(jnp.sin, batch_first=True)(jnp.float64(1.0))


def test_log_abs_det_batch_first_errors_name_log_abs_det(rng):
    with pytest.raises(ValueError, match=r"^jacobians.log_abs_det: every output needs the batch axis out_axes=0 "
                                        r"of size 4, got shape \(3,\)"):
        jacobians.log_abs_det(lambda X: X.sum(0), batch_first=True)(randn(rng, (4, 3)))


def test_empty_batch_gives_empty_blocks():
    def f(X, W):
        return jnp.tanh(X @ W), {"n": X.shape[0]}

    W = jnp.ones((3, 2))
    got, aux = jacobians.batch_jacobian(f, has_aux=True)(jnp.zeros((0, 3)), W)
    want = jax.vmap(jax.jacfwd(lambda x: jnp.tanh(x @ W)))(jnp.zeros((0, 3)))
    assert got.shape == want.shape == (0, 2, 3) and got.dtype == want.dtype and aux == {"n": 0}


def test_per_example_gather_scatter_and_solve_proved(rng):
    # Issue 24: an embedding lookup (a vmapped gather by per-example traced indices: operand batching dims), a
    # label pick (a partly known index), per-example scatters by traced indices and a per-example
    # jnp.linalg.solve (batched LU, pivots gathered per example; or one matrix with the examples as columns, and
    # slogdet's custom_jvp around a batched solve) are per-example, not "coupled". One call: one proof, one compile.
    B, V, d = 3, 4, 2
    idx = jnp.asarray(rng.integers(0, V, (B, 2)))
    A0 = np.eye(3) * 3.0 + rng.standard_normal((3, 3))

    def f(X, Z, M, b, idx):
        lookup = jnp.tanh(jax.vmap(lambda e, i: e[i])(X, idx)) * X[:, :2, :]
        nll = -jax.nn.log_softmax(Z)[jnp.arange(B), idx[:, 0]]
        added = jax.vmap(lambda z, j: z.at[j].add(z[0] ** 2))(Z, idx[:, 1])
        moved = jax.vmap(lambda z, j: jax.lax.dynamic_update_slice(z, jnp.sin(z[:2]), (j,)))(Z, idx[:, 0])
        scattered = added * moved + Z.at[jnp.arange(B), idx[:, 1]].set(0.0)
        batched = jnp.linalg.solve(M, b[..., None])[..., 0] ** 2
        shared = jnp.linalg.solve(jnp.asarray(A0), b.T).T  # the examples are the columns of one solve
        return lookup, nll, scattered, batched * shared, jnp.linalg.slogdet(M)[1][:, None] * b

    X, Z, b = randn(rng, (B, V, d)), randn(rng, (B, V)), randn(rng, (B, 3))
    M = randn(rng, (B, 3, 3)) + 3.0 * jnp.eye(3)[None]
    single = lambda *a: jax.tree_util.tree_map(lambda o: o[0], f(*(v[None] for v in a)))  # noqa: E731
    want = jax.jit(jax.vmap(jax.jacfwd(single, argnums=(0, 1, 2, 3))))(X, Z, M, b, idx)
    got = jacobians.batch_jacobian(f, argnums=(0, 1, 2, 3), mode="rev")(X, Z, M, b, idx)
    assert_tree_allclose(got, want, rtol=1e-10, atol=1e-12)
