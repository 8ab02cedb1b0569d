"""Sparse Jacobians: detected patterns are conservative (exact where they can be), colourings
are valid, compressed evaluation equals the dense Jacobian, detection is cached."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import randn

import jacobians
from jacobians import kernels

_R = np.random.default_rng(1)
W_BLOCKS = jnp.asarray(_R.standard_normal((4, 3, 3)))
A_BANDED = jnp.asarray(np.diag(_R.standard_normal(6)) + np.diag(_R.standard_normal(5), 1))
A_DENSE = jnp.asarray(_R.standard_normal((3, 6)))


def stencil_1d(u):
    return u[1:-1] ** 2 - u[:-2] * u[2:] + jnp.sin(u[1:-1]) - 2.0 * u[1:-1]


def stencil_2d(U):  # 5-point Laplacian plus a nonlinearity, zero boundary
    P = jnp.pad(U, 1)
    lap = P[:-2, 1:-1] + P[2:, 1:-1] + P[1:-1, :-2] + P[1:-1, 2:] - 4.0 * U
    return lap + U**3


def fori(x):
    return jax.lax.fori_loop(0, 3, lambda i, c: c * 0.5 + jnp.sin(c), x)


def while_shift(x):
    def body(c):
        v, k = c
        return jnp.concatenate([v[:1], v[:-1] + v[1:]]), k + 1

    return jax.lax.while_loop(lambda c: c[1] < 2, body, (x, 0))[0]


@jax.custom_jvp
def softplus(x):
    return jnp.log1p(jnp.exp(x))


softplus.defjvp(lambda p, t: (softplus(p[0]), jax.nn.sigmoid(p[0]) * t[0]))


@jax.custom_vjp
def clip_grad_square(x):
    return x**2


clip_grad_square.defvjp(lambda x: (x**2, x), lambda x, g: (jnp.clip(2 * x * g, -1.0, 1.0),))

# name -> (function, input shape, whether the detected pattern is exact)
FUNCS = {
    "elementwise": (lambda x: jnp.sin(x) * x + jnp.exp(-x), (7,), True),
    "broadcast": (lambda X: X * jnp.sum(X, axis=0)[None] + X[0][None], (3, 4), True),
    "stencil_1d": (stencil_1d, (9,), True),
    "stencil_2d": (stencil_2d, (5, 4), True),
    "block_diagonal": (lambda x: jnp.einsum("bij,bj->bi", W_BLOCKS, jnp.tanh(x.reshape(4, 3))).ravel(), (12,), True),
    "batched_dot": (lambda X: jnp.einsum("bij,bjk->bik", X, X), (2, 2, 2), True),
    "banded_const_matmul": (lambda x: jnp.tanh(A_BANDED @ x), (6,), True),
    "dense_const_matmul": (lambda x: A_DENSE @ jnp.sin(x), (6,), True),
    "gram": (lambda R: R.T @ R, (3, 2), True),
    "reductions": (
        lambda X: jnp.concatenate([jnp.sum(X**2, axis=1), jnp.max(X, axis=0), jnp.prod(X[:, :2], axis=1)]),
        (3, 4),
        False,
    ),  # max: value-dependent
    "cumsum": (lambda x: jnp.cumsum(x[::-1] ** 2), (6,), True),
    "transpose_reshape": (lambda X: jnp.transpose(X.reshape(2, 3, 2), (2, 0, 1))[..., ::-1] * 2.0, (3, 4), True),
    "gather_scatter": (
        lambda x: x.at[jnp.array([0, 2, 2])].add(x[jnp.array([5, 4, 1])] ** 2)[jnp.array([0, 2, 3, 3])],
        (6,),
        True,
    ),
    "dynamic_slice": (lambda x: jax.lax.dynamic_slice(x, (2,), (3,)) * x[:3], (7,), True),
    "dynamic_update_slice": (lambda x: jax.lax.dynamic_update_slice(x, x[:2] ** 2, (3,)), (6,), True),
    "select": (lambda x: jnp.where(x > 0, x**2, jnp.cos(x)), (5,), True),
    "cond": (lambda x: jax.lax.cond(x[0] > 0, lambda v: v * 2.0, lambda v: jnp.roll(v, 1), x), (5,), False),
    "fori_loop": (fori, (5,), True),
    "while_loop": (while_shift, (5,), False),
    "custom_jvp_and_jit": (lambda x: jax.jit(lambda v: softplus(v) * v[::-1])(x), (6,), True),
    "custom_vjp": (lambda x: clip_grad_square(x)[::-1] + jnp.roll(x, 2), (6,), True),
    "scatter_set": (lambda x: x.at[jnp.array([1, 4])].set(jnp.sin(x[:2])), (6,), False),  # overwritten: conservative
    "matrix_input_output": (lambda X: jnp.tanh(X) @ jnp.asarray(np.eye(4)[:, :2]), (3, 4), True),
}


def _reference(f, x):
    # JAX pushes no JVP through custom_vjp and pulls no VJP through while_loop.
    return jax.jacrev(f)(x) if f is FUNCS["custom_vjp"][0] else jax.jacfwd(f)(x)


def _dense_nonzeros(f, shape, rng, draws=3):
    nz = 0
    for _ in range(draws):
        nz = nz | (np.asarray(_reference(f, randn(rng, shape))) != 0)
    return nz


@pytest.mark.parametrize("name", FUNCS)
def test_pattern_contains_nonzeros(rng, name):
    f, shape, exact = FUNCS[name]
    pattern = jacobians.sparsity(f, randn(rng, shape))
    nz = _dense_nonzeros(f, shape, rng)
    mask = pattern.to_dense()
    assert mask.shape == nz.shape == pattern.shape
    assert not np.any(nz & ~mask), "the detected pattern misses a nonzero"
    if exact:
        np.testing.assert_array_equal(mask, nz)


@pytest.mark.parametrize("name", FUNCS)
@pytest.mark.parametrize("mode", ["fwd", "rev", "auto"])
def test_sparse_equals_dense(rng, name, mode):
    f, shape, _ = FUNCS[name]
    if (name, mode) in (("while_loop", "rev"), ("custom_vjp", "fwd")):
        pytest.skip("JAX cannot reverse-differentiate a while_loop, nor push JVPs through custom_vjp")
    x = randn(rng, shape)
    ref = _reference(f, x)
    dense = jacobians.sparse_jacobian(f, mode=mode, output="dense")(x)
    np.testing.assert_allclose(dense, ref, rtol=1e-12, atol=1e-12)
    bcoo = jacobians.sparse_jacobian(f, mode=mode)(x)
    assert bcoo.shape == ref.shape
    np.testing.assert_allclose(bcoo.todense(), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", FUNCS)
def test_colourings_are_valid(rng, name):
    f, shape, _ = FUNCS[name]
    p = jacobians.sparsity(f, randn(rng, shape))
    m, n = int(np.prod(p.out_shape)), int(np.prod(p.in_shape))
    M = p.to_dense().reshape(m, n)
    for colors, mat in ((kernels.color_columns(p.rows, p.cols, n), M), (kernels.color_rows(p.rows, p.cols, m), M.T)):
        for c in np.unique(colors):
            # Within a colour, no row (column) has two nonzeros.
            assert np.all(mat[:, colors == c].sum(axis=1) <= 1)


def test_colour_counts_are_small():
    p = jacobians.sparsity(stencil_1d, jnp.ones(50))
    assert kernels.color_columns(p.rows, p.cols, 50).max() + 1 == 3
    p = jacobians.sparsity(stencil_2d, jnp.ones((10, 10)))
    assert kernels.color_columns(p.rows, p.cols, 100).max() + 1 <= 6
    p = jacobians.sparsity(lambda x: jnp.sin(x) * x, jnp.ones(100))
    assert kernels.color_columns(p.rows, p.cols, 100).max() + 1 == 1


def test_auto_mode_picks_fewer_colours(rng):
    # A full last row: columns all conflict (forward needs n colours), rows need 2.
    f = lambda x: jnp.concatenate([x**2, jnp.sum(x)[None]])  # noqa: E731
    x = randn(rng, (8,))
    sj = jacobians.sparse_jacobian(f)
    plan = sj.plan(x)
    assert plan.mode == "rev" and plan.n_colors == 2
    np.testing.assert_allclose(sj(x).todense(), jax.jacfwd(f)(x), rtol=1e-13)


def test_detection_is_cached(rng):
    calls = []

    def f(x):
        calls.append(1)
        return stencil_1d(x)

    sj = jacobians.sparse_jacobian(f)
    sj(randn(rng, (9,)))
    first = len(calls)  # detection and evaluation each trace f once
    assert first == 2
    sj(randn(rng, (9,)))
    assert sj.plan(randn(rng, (9,))) is sj.plan(jax.ShapeDtypeStruct((9,), jnp.float64))
    assert len(calls) == first
    sj(randn(rng, (11,)))
    assert len(calls) == 2 * first


def test_given_patterns(rng):
    x = randn(rng, (9,))
    p = jacobians.sparsity(stencil_1d, x)
    ref = jax.jacfwd(stencil_1d)(x)
    for given in (p, p.to_dense(), p.to_bcoo()):
        got = jacobians.sparse_jacobian(stencil_1d, sparsity=given, output="dense")(x)
        np.testing.assert_allclose(got, ref, rtol=1e-13)


def test_float32(rng):
    x = randn(rng, (6, 5), jnp.float32)
    got = jacobians.sparse_jacobian(stencil_2d)(x)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got.todense(), jax.jacfwd(stencil_2d)(x), rtol=1e-5, atol=1e-6)


def test_other_arguments_pass_through(rng):
    f = lambda x, a: jnp.sin(x) * a  # noqa: E731
    x, a = randn(rng, (5,)), randn(rng, (5,))
    got = jacobians.sparse_jacobian(f, output="dense")(x, a)
    np.testing.assert_allclose(got, jnp.diag(jnp.cos(x) * a), rtol=1e-13)
    got = jacobians.sparse_jacobian(f, argnums=1, output="dense")(x, a)
    np.testing.assert_allclose(got, jnp.diag(jnp.sin(x)), rtol=1e-13)


def test_pattern_object(rng):
    p = jacobians.sparsity(stencil_2d, jax.ShapeDtypeStruct((4, 3), jnp.float64))  # no values needed
    assert p.shape == (4, 3, 4, 3)
    assert p.nnz == int(p.to_dense().sum())
    assert p.density == pytest.approx(p.nnz / 144)
    np.testing.assert_array_equal(np.asarray(p.to_bcoo().todense()), p.to_dense())
    assert "nnz=" in repr(p)
    assert jacobians.SparsityPattern.from_dense(p.to_dense(), 2) == p


def test_plot():
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    ax = jacobians.sparsity(stencil_1d, jnp.ones(9)).plot()
    assert "nnz=" in ax.get_title()


def test_unknown_primitive_warns_and_stays_conservative(rng):
    f = lambda x: jnp.fft.fft(x).real * x  # noqa: E731
    x = randn(rng, (4,))
    with pytest.warns(UserWarning, match=r"no sparsity rule for 'fft'"):
        p = jacobians.sparsity(f, x)
    assert p.to_dense().all()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        np.testing.assert_allclose(jacobians.sparse_jacobian(f, output="dense")(x), jax.jacfwd(f)(x), rtol=1e-13)


def test_errors(rng):
    x = randn(rng, (9,))
    with pytest.raises(
        ValueError, match=r"pattern has shape \(9, 9\) but the Jacobian has shape out.shape \+ in.shape = \(7, 9\)"
    ):
        jacobians.sparse_jacobian(stencil_1d, sparsity=np.ones((9, 9), bool))(x)
    with pytest.raises(ValueError, match=r"pattern has shape \(6, 8\) but the Jacobian"):
        jacobians.sparse_jacobian(stencil_1d, sparsity=jacobians.sparsity(stencil_1d, jnp.ones(8)).to_bcoo())(x)
    with pytest.raises(TypeError, match=r"must be a boolean array, got float64"):
        jacobians.sparse_jacobian(stencil_1d, sparsity=np.ones((7, 9)))(x)
    with pytest.raises(ValueError, match=r"output must be one of \('bcoo', 'dense'\), got 'csr'"):
        jacobians.sparse_jacobian(stencil_1d, output="csr")
    with pytest.raises(ValueError, match=r"mode must be one of"):
        jacobians.sparse_jacobian(stencil_1d, mode="both")
    with pytest.raises(ValueError, match=r"sparsity must be 'auto', a SparsePlan, a SparsityPattern"):
        jacobians.sparse_jacobian(stencil_1d, sparsity="detect")
    with pytest.raises(TypeError, match=r"real floating-point inputs, but argument 0 has dtype int"):
        jacobians.sparse_jacobian(stencil_1d)(jnp.arange(9))
    with pytest.raises(TypeError, match=r"argnums must be an int or a tuple of ints, got 'x'"):
        jacobians.sparsity(stencil_1d, x, argnums="x")
    with pytest.raises(TypeError, match=r"jacobians.sparsity: fun must return arrays"):
        jacobians.sparsity(lambda x: "abc", x)


def test_auto_mode_respects_what_jax_can_differentiate(rng):
    f_vjp, shape, _ = FUNCS["custom_vjp"]
    assert jacobians.sparse_jacobian(f_vjp).plan(randn(rng, shape)).mode == "rev"
    f_while, shape, _ = FUNCS["while_loop"]
    assert jacobians.sparse_jacobian(f_while).plan(randn(rng, shape)).mode == "fwd"
