"""Sparsity detection: soundness (never misses a nonzero), tightness on structured cases, robustness.

Every case is checked against the dense Jacobian from ``jax.jacfwd`` at fresh
random points: the detected pattern must contain every nonzero, and on the
cases marked exact it must equal the union of nonzeros over the points.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jacobians
from jacobians import _walker

from helpers import randn


def _check(f, x, rng, exact, points=3):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every primitive here has a rule
        pattern = jacobians.sparsity(f, x)
    mask = pattern.to_dense()
    nz = np.zeros_like(mask)
    for _ in range(points):
        xp = randn(rng, x.shape)
        nz |= np.asarray(jax.jacfwd(f)(xp)) != 0
    missed = np.argwhere(nz & ~mask)
    assert not missed.size, f"the pattern misses nonzeros at {missed[:5].tolist()}"
    if exact:
        np.testing.assert_array_equal(mask, nz)
    dense = jacobians.sparse_jacobian(f, output="dense")(x)
    np.testing.assert_allclose(dense, jax.jacfwd(f)(x), rtol=1e-12, atol=1e-12)
    return pattern


def _conv(x, w, **kw):
    return lax.conv_general_dilated(x, w, **kw)


W3 = np.random.default_rng(0).standard_normal((4, 3, 3, 3))
W_SPARSE = W3 * (np.arange(3)[None, None, :, None] != 1)  # middle kernel row zero

CASES = {
    # name: (f, input shape, exact)
    "stack": (lambda x: jnp.stack([x[:3] * 2, x[3:] ** 2]).T.reshape(-1), (6,), True),
    "unstack_split": (lambda x: jnp.concatenate(jnp.split(x, 3)[::-1]) * jnp.array(np.arange(1.0, 7.0)), (6,), True),
    "tile": (lambda x: jnp.tile(x, 3) * jnp.arange(6.0), (2,), True),
    "sort": (lambda x: jnp.sort(x.reshape(2, 3), axis=1).reshape(-1), (6,), False),
    "top_k": (lambda x: lax.top_k(x.reshape(2, 4), 2)[0].reshape(-1), (8,), False),
    "cholesky": (
        lambda x: jnp.linalg.cholesky(x.reshape(2, 2, 2) @ jnp.swapaxes(x.reshape(2, 2, 2), 1, 2) + 3 * jnp.eye(2)[None]),
        (8,),
        False,  # dense within each matrix, independent across the batch
    ),
    "unstack": (lambda x: jnp.unstack(x.reshape(2, 3))[1] * jnp.unstack(x.reshape(3, 2), axis=1)[0], (6,), True),
    "conv_same": (lambda x: _conv(x.reshape(1, 3, 5, 5), W3, window_strides=(1, 1), padding="SAME").ravel(), (75,), True),
    "conv_sparse_kernel": (
        lambda x: _conv(x.reshape(1, 3, 5, 5), W_SPARSE, window_strides=(1, 1), padding="SAME").ravel(),
        (75,),
        True,
    ),
    "conv_strided_dilated": (
        lambda x: _conv(x.reshape(1, 3, 6, 6), W3, window_strides=(2, 1), padding=((1, 0), (2, 1)),
                        lhs_dilation=(1, 2), rhs_dilation=(2, 1)).ravel(),
        (108,),
        True,
    ),
    "conv_depthwise": (
        lambda x: _conv(x.reshape(2, 4, 5), jnp.asarray(W3[:, :1, :, 0]), window_strides=(1,), padding="VALID",
                        feature_group_count=4).ravel(),
        (40,),
        True,
    ),
    "conv_batch_groups": (
        lambda x: _conv(x.reshape(4, 1, 5), jnp.asarray(W3[:2, :1, :, 0]), window_strides=(1,), padding="VALID",
                        batch_group_count=2).ravel(),
        (20,),
        True,
    ),
    "conv_nhwc": (
        lambda x: _conv(x.reshape(1, 4, 4, 3), jnp.asarray(W3.transpose(2, 3, 1, 0)), window_strides=(1, 1),
                        padding="SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")).ravel(),
        (48,),
        True,
    ),
    "at_set_forgets": (lambda x: x.at[1].set(x[3] ** 2) * 1.5, (4,), True),
    "at_set_slice": (lambda x: x.at[jnp.array([0, 2])].set(jnp.sin(x[4:6])), (6,), True),
    "zero_derivative": (
        lambda x: x[0] * jnp.floor(x[1]) + jnp.sign(x[2]) * jnp.round(x[3]) + jnp.ceil(x) + x ** 0, (4,), True
    ),
    "times_constant_with_zeros": (lambda x: x * jnp.array([1.0, 0.0, 2.0, 0.0]), (4,), True),
    "pad_traced_value": (lambda x: lax.pad(x[:3], x[3], ((1, 2, 1),)), (4,), True),
    "reduce_scalar": (lambda x: jnp.sum(x[0]) * x, (3,), True),
    "prng_key_constant": (lambda x: x + jax.random.normal(jax.random.key(0), x.shape), (4,), True),
    "dropout_mask": (lambda x: jnp.where(jax.random.bernoulli(jax.random.key(1), 0.5, x.shape), x, 0.0) * 2, (6,), False),
    "scan_static_stencil": (
        lambda x: lax.scan(lambda c, _: (c + 0.1 * (jnp.roll(c, 1) - 2 * c + jnp.roll(c, -1)) ** 2, None), x, None,
                           length=2)[0],
        (12,),
        True,
    ),
    "scan_xs_per_step": (lambda x: lax.scan(lambda c, xi: (c * xi, c + xi), 1.0, x)[1], (5,), True),
    "fori_loop": (lambda x: lax.fori_loop(0, 3, lambda i, c: c.at[i].set(c[i + 1] ** 2), x), (5,), True),
    "cond_known_predicate": (lambda x: lax.cond(True, lambda v: v * 2.0, lambda v: v.sum() * v, x), (4,), True),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_detection(name, rng):
    f, shape, exact = CASES[name]
    _check(f, randn(rng, shape), rng, exact)


def test_custom_jvp_rule_denser_than_primal(rng):
    @jax.custom_jvp
    def f(x):
        return x[0] * jnp.ones_like(x)

    f.defjvp(lambda p, t: (f(*p), t[0]))  # the rule's Jacobian is the identity
    x = randn(rng, (3,))
    pattern = jacobians.sparsity(f, x)
    np.testing.assert_array_equal(pattern.to_dense(), np.eye(3, dtype=bool))
    np.testing.assert_allclose(jacobians.sparse_jacobian(f, output="dense")(x), jnp.eye(3))


def test_custom_vjp_rule_denser_than_primal(rng):
    @jax.custom_vjp
    def f(x):
        return x * 0.0 + x[0]

    f.defvjp(lambda x: (f(x), None), lambda _, ct: (jnp.cumsum(ct[::-1])[::-1],))  # upper-triangular ones
    x = randn(rng, (4,))
    # J[i, j] = 1 for j <= i (the transpose of the pullback's upper-triangular map)
    np.testing.assert_array_equal(jacobians.sparsity(f, x).to_dense(), np.tril(np.ones((4, 4), bool)))
    np.testing.assert_allclose(jacobians.sparse_jacobian(f, output="dense")(x), jax.jacrev(f)(x))


def test_relu_custom_jvp_stays_diagonal(rng):
    x = randn(rng, (5,))
    np.testing.assert_array_equal(jacobians.sparsity(jax.nn.relu, x).to_dense(), np.eye(5, dtype=bool))


def test_detection_inside_jit(rng):
    def f(x):
        return jnp.concatenate([x[1:] - x[:-1], jnp.pad(x, 1)[jnp.array([0, 3])]])

    x = randn(rng, (6,))
    expected = jax.jacfwd(f)(x)
    np.testing.assert_allclose(jax.jit(jacobians.sparse_jacobian(f, output="dense"))(x), expected)

    @jax.jit
    def g(x):
        return jnp.asarray(jacobians.sparsity(f, x).nnz) + 0 * x.sum()

    assert int(g(x)) == int(np.count_nonzero(expected))


def test_walker_checks_rule_invariants():
    from jacobians import _deps

    def broken(lat, eqn, ins):
        return [_deps.empty((7,))]

    rules = dict(_deps.DepsLattice.rules)
    lat = _deps.DepsLattice(3)
    lat.rules = {**rules, "sin": broken}
    closed = jax.make_jaxpr(jnp.sin)(jnp.ones(3))
    with pytest.raises(_walker.InternalError, match=r"rule for 'sin' produced a bad value: shape \(7,\)"):
        _walker.Walker(lat).run(closed, [_deps.identity((3,))])


def test_pytree_patterns(rng):
    def f(a, b):
        return {"s": a["u"] * b, "t": jnp.sum(a["v"]) * jnp.ones(2)}

    a = {"u": randn(rng, (3,)), "v": randn(rng, (2,))}
    b = randn(rng, (3,))
    pat = jacobians.sparsity(f, a, b, argnums=(0, 1))
    ref = jax.jacfwd(f, argnums=(0, 1))(a, b)
    for p, r in zip(jax.tree_util.tree_leaves(pat, is_leaf=lambda z: isinstance(z, jacobians.SparsityPattern)),
                    jax.tree_util.tree_leaves(ref)):
        assert p.shape == r.shape
        assert not np.any((np.asarray(r) != 0) & ~p.to_dense())
