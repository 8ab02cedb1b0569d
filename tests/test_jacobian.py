"""The engine: agreement with jax.jacfwd/jacrev, the book's examples, caching, errors."""

import enum
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_tree_allclose, randn, reference
from registry import CASES, names

import jacobians

# name -> (function, input shape), from the shared registry.
FUNCS = {n: (c.fun, c.shape) for n, c in CASES.items()}
DENSE = names("dense")
# Every case with the default mode; the dense, book, flow, control-flow and custom-rule cases in
# every mode JAX can differentiate them in; chunking on the dense ones. (Sparse cases run
# through both directions in test_sparse.py.)
ALL_MODES = set(names(exclude=("sparse",))) | {"custom_vjp", "while_shift", "scan_xs_per_step", "custom_jvp_and_jit"}
AGREE = [(n, "auto", None) for n in sorted(CASES)]
AGREE += [(n, m, None) for n in sorted(ALL_MODES) for m in ("fwd", "rev") if getattr(CASES[n], m)]
# Chunking (dense engine in both directions on every dense case) depends on the input and output shapes
# only: chunks of 1 and 3 on one case of each kind (scalar input; scalar output; matrix input and output;
# matrix output; 3 -> 7, 6 -> 2 and 5 -> 5, uneven chunks of 3). Chunk sizes 1..7 on one case:
# test_chunk_sizes_all_agree.
CHUNKED = ["from_scalar", "to_scalar", "matrix_to_matrix", "matrix_valued", "tall_tanh", "wide_tanh", "elementwise"]
assert set(CHUNKED) <= set(DENSE)
AGREE += [(n, m, k) for n in CHUNKED for m in ("fwd", "rev") for k in (1, 3)]


@pytest.mark.parametrize("name, mode, chunk_size", AGREE)
def test_agrees_with_jax(rng, name, mode, chunk_size):
    c = CASES[name]
    x = randn(rng, c.shape)
    got = jacobians.jacobian(c.fun, mode=mode, chunk_size=chunk_size)(x)
    assert_tree_allclose(got, reference(c, x))


@pytest.mark.parametrize("name", ["elementwise", "tall_tanh", "wide_tanh", "matrix_to_matrix"])
@pytest.mark.parametrize("mode", ["fwd", "rev"])
def test_float32(rng, name, mode):
    f, shape = FUNCS[name]
    x = randn(rng, shape, jnp.float32)
    got = jacobians.jacobian(f, mode=mode, chunk_size=2)(x)
    assert got.dtype == jnp.float32
    ref = jax.jit(jax.jacfwd(lambda x: f(x.astype(jnp.float64))))(x.astype(jnp.float64))  # one compile, not one per op
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


def test_chunk_sizes_all_agree(rng):
    f, shape = FUNCS["matrix_valued"]
    x = randn(rng, shape)
    ref = jax.jacrev(f)(x)
    for mode in ("fwd", "rev"):
        for k in range(1, 8):
            assert_tree_allclose(jacobians.jacobian(f, mode=mode, chunk_size=k)(x), ref)


def test_auto_plans_from_the_jaxpr(rng):
    tall, wide = CASES["tall_tanh"], CASES["wide_tanh"]
    # tanh(A x): 10 -> 40 from the inputs, 6 -> 2 from the outputs (the structured sweep is the closed
    # form diag(1 - t^2) A, no product with the identity: about two passes against ten).
    a = randn(rng, (40, 10))
    assert jacobians.jacobian(lambda x: jnp.tanh(a @ x)).plan(randn(rng, (10,))).key == "structured fwd"
    assert jacobians.jacobian(wide.fun).plan(randn(rng, wide.shape)).mode == "rev"
    assert jacobians.jacobian(tall.fun, method="dense").plan(randn(rng, tall.shape)).key == "dense fwd"
    diag = jacobians.explain(lambda x: jnp.sin(x) * 2.0, randn(rng, (50,)))
    assert (diag.method, diag.passes, diag.nnz) == ("compressed", 1, 50)
    assert "chosen" in str(diag) and "dense fwd" in str(diag)
    band = jacobians.jacobian(CASES["stencil_1d"].fun).plan(randn(rng, (40,)))
    assert band.method == "compressed" and band.passes == 3
    # Deterministic, and the same for shape structs.
    again = jacobians.explain(lambda x: jnp.sin(x) * 2.0, jax.ShapeDtypeStruct((50,), jnp.float64))
    assert again.costs == diag.costs
    # custom_vjp forces reverse, while_loop forward.
    assert jacobians.explain(CASES["custom_vjp"].fun, randn(rng, (6,))).mode == "rev"
    assert jacobians.explain(CASES["while_shift"].fun, randn(rng, (5,))).mode == "fwd"
    # A dense square map goes forward (batched JVPs: no residuals, no gathers transposed into scatters; softmax,
    # sort and a Cholesky factor 1.8x, 2.6x and 1.3x faster than reverse on CPU).
    x = randn(rng, (16,))
    chol = lambda x: jnp.linalg.cholesky(x.reshape(4, 4) @ x.reshape(4, 4).T + jnp.eye(4)).ravel()  # noqa: E731
    for f in (jax.nn.softmax, lambda x: jnp.sort(x) * x[::-1], chol):
        assert jacobians.explain(f, x).key == "dense fwd"
    assert_tree_allclose(jacobians.jacobian(chol)(x), jax.jacrev(chol)(x))


@pytest.mark.parametrize("window", ["dilated", "negative padding"])
def test_untransposable_max_pool_takes_forward_mode(window, rng):
    # JAX cannot transpose the JVP of a max over windows with dilation (NotImplementedError) or a negative
    # padding (a TypeError, raised only when the program is lowered): a wide map, which the cost model would
    # pull by VJPs, and every second-order method over a gradient must go forward.
    c = jnp.asarray(randn(rng, (8,)))
    pad, dil = (((0, 0), (1, 0)), (1, 2)) if window == "dilated" else (((0, 0), (1, -1)), (1, 1))

    def f(x):
        y = (jnp.sin(x) * c).reshape(2, 4)
        return jax.lax.reduce_window(y, -jnp.inf, jax.lax.max, (1, 2), (1, 1), pad, window_dilation=dil).ravel()

    x = randn(rng, (8,))
    with pytest.raises((NotImplementedError, TypeError)):
        jax.jit(jax.jacrev(f))(x)
    assert jacobians.explain(f, x).mode == "fwd"
    want = jax.jacfwd(f)(x)
    for kw in ({}, {"method": "dense"}, {"chunk_size": 3}):
        assert_tree_allclose(jacobians.jacobian(f, **kw)(x), want)
    h = lambda x: jnp.sum(f(x) ** 3)  # noqa: E731
    H = jax.jacfwd(jax.jacfwd(h))(x)
    assert_tree_allclose(jacobians.hessian(h)(x), H)
    assert_tree_allclose(jacobians.sparse_hessian(h, output="dense")(x), H)
    # On a GPU JAX's second-order JVP of a windowed max packs pairs into 20 mantissa bits: 1.6e-6 apart there.
    tol = dict(rtol=1e-10, atol=1e-12) if jax.default_backend() == "cpu" else dict(rtol=1e-5, atol=1e-8)
    assert_tree_allclose(jacobians.hvp(h, (x,), (x,)), H @ x, **tol)
    np.testing.assert_allclose(jacobians.laplacian(h)(x), np.trace(H), **tol)
    for method in ("auto", "hvp", "forward"):
        np.testing.assert_allclose(jacobians.hessian_diagonal(h, method=method)(x), np.diag(H), **tol)
    # Reverse mode forced by the caller: a clear error naming the call, not JAX's error from inside a transpose.
    for jac in (jacobians.jacobian, jacobians.sparse_jacobian):
        with pytest.raises(ValueError, match=rf"{jac.__name__}: mode='rev' pulls VJPs, which JAX cannot"):
            jac(f, mode="rev")(x)


def test_a_barrier_on_data_bars_no_direction(rng):
    # A max-pool JAX cannot transpose, or a custom_vjp, applied to data the Jacobian does not depend on:
    # JAX's jacrev / jacfwd go through, and so does the caller's forced mode (it was refused as if active).
    data = jnp.asarray(randn(rng, (4, 6)))
    pool = lambda y: jax.lax.reduce_window(y, -jnp.inf, jax.lax.max, (2, 2), (1, 1), ((-1, 0), (1, -1)))  # noqa: E731

    @jax.custom_vjp
    def s(y):
        return jnp.sin(y)

    s.defvjp(lambda y: (jnp.sin(y), y), lambda y, g: (jnp.cos(y) * g,))
    w = randn(rng, (3,))
    f = lambda w: jnp.outer(w, pool(data).ravel()) ** 2  # noqa: E731
    g = lambda w: jnp.sin(w) * jnp.sum(s(data))  # noqa: E731
    for jac in (jacobians.jacobian, functools.partial(jacobians.sparse_jacobian, output="dense")):
        assert_tree_allclose(jac(f, mode="rev")(w), jax.jacrev(f)(w))
        assert_tree_allclose(jac(g, mode="fwd")(w), jax.jacfwd(g)(w))
    with pytest.raises(ValueError, match="jacobians.jacobian: mode='fwd' pushes JVPs, which JAX cannot push"):
        jacobians.jacobian(lambda w: s(w) * 2.0, mode="fwd")(w)


@pytest.mark.parametrize("name", ["stencil_2d", "conv_same", "block_diagonal", "custom_vjp", "while_shift", "mlp_two_layer"])
def test_every_planned_method_agrees(name, rng):
    c = CASES[name]
    x = randn(rng, c.shape)
    ref = reference(c, x)
    got = jacobians.jacobian(c.fun)(x)
    assert_tree_allclose(got, ref)
    plan = jacobians.jacobian(c.fun).plan(x)
    if plan.method == "compressed":
        assert_tree_allclose(jacobians.sparse_jacobian(c.fun, output="dense", mode=plan.mode)(x), ref)


def _pytree_fun(params, x):
    h = jnp.tanh(params["W"] @ x + params["b"])
    return {"h": h, "s": jnp.sum(h * x[: h.shape[0]]), "pair": (h**2, x)}


@pytest.mark.parametrize("mode", ["fwd", "rev"])
@pytest.mark.parametrize("argnums", [0, 1, (0, 1), (1, 0)])
def test_pytrees_and_argnums(rng, mode, argnums):
    params = {"W": randn(rng, (2, 3)), "b": randn(rng, (2,))}
    x = randn(rng, (3,))
    got = jacobians.jacobian(_pytree_fun, argnums, mode=mode, chunk_size=2)(params, x)
    assert_tree_allclose(got, jax.jit(jax.jacfwd(_pytree_fun, argnums))(params, x))


def test_has_aux(rng):
    def f(x):
        y = jnp.sin(x) * x[0]
        return y, {"norm": jnp.linalg.norm(y), "tag": jnp.arange(3)}

    x = randn(rng, (4,))
    for mode in ("fwd", "rev"):
        jac, aux = jacobians.jacobian(f, mode=mode, has_aux=True, chunk_size=3)(x)
        ref_jac, ref_aux = jax.jacfwd(f, has_aux=True)(x)
        assert_tree_allclose(jac, ref_jac)
        assert_tree_allclose(aux, ref_aux)


class Act(enum.Enum):
    SIN = "sin"
    TANH = "tanh"


def test_static_non_array_arguments(rng):
    def f(x, kind, act, scale, *, power=2):
        y = getattr(jnp, act.value)(x) * scale
        return y**power if kind == "pow" else y

    x = randn(rng, (3,))
    for kind, act in (("pow", Act.SIN), ("plain", Act.TANH)):
        got = jacobians.jacobian(f)(x, kind, act, 1.5, power=3)
        ref = jax.jacfwd(lambda x: f(x, kind, act, 1.5, power=3))(x)
        assert_tree_allclose(got, ref)


def test_python_float_input():
    got = jacobians.jacobian(lambda t: jnp.stack([jnp.sin(t), t**2]))(0.7)
    np.testing.assert_allclose(got, [np.cos(0.7), 1.4], rtol=1e-6)


def test_holomorphic(rng):
    f = lambda z: z**2 + jnp.sin(z)  # noqa: E731
    z = jax.lax.complex(randn(rng, (3,)), randn(rng, (3,)))
    for mode in ("fwd", "rev"):
        got = jacobians.jacobian(f, mode=mode, holomorphic=True)(z)
        assert_tree_allclose(got, jax.jacfwd(f, holomorphic=True)(z))


def test_holomorphic_auto_takes_reverse_through_a_custom_vjp(rng):
    """A custom_vjp bars forward mode: holomorphic "auto" (chunked too) and gradcheck go reverse, as for real inputs."""
    @jax.custom_vjp
    def g(z):
        return jnp.exp(z)

    g.defvjp(lambda z: (jnp.exp(z), z), lambda z, ct: (ct * jnp.exp(z),))
    z = jax.lax.complex(randn(rng, (3,)), randn(rng, (3,)))
    want = jax.jacrev(g, holomorphic=True)(z)
    for kw in ({}, {"chunk_size": 1}):
        assert_tree_allclose(jacobians.jacobian(g, holomorphic=True, **kw)(z), want)
    assert jacobians.gradcheck(g, z)


def test_complex_output_real_input_uses_forward(rng):
    f = lambda x: jnp.exp(jax.lax.complex(jnp.zeros_like(x), x))  # noqa: E731
    x = randn(rng, (3,))
    assert_tree_allclose(jacobians.jacobian(f)(x), jax.jacfwd(f)(x))


def test_no_retrace_on_second_call(rng):
    traces = []

    def f(x, flag):
        traces.append(1)
        return jnp.sin(x) * 2.0 if flag == "a" else jnp.cos(x)

    jf = jacobians.jacobian(f)
    jf(randn(rng, (4,)), "a")
    n = len(traces)
    jf(randn(rng, (4,)), "a")  # same shapes, dtypes and static value: cached
    assert len(traces) == n
    jf(randn(rng, (5,)), "a")  # a new shape traces again
    assert len(traces) > n


def test_jit_vmap_and_determinism(rng):
    f, _ = FUNCS["tall_tanh"]
    xs = randn(rng, (5, 3))
    jf = jacobians.jacobian(f)
    batched = jax.vmap(jf)(xs)
    assert_tree_allclose(batched, jax.vmap(jax.jacfwd(f))(xs))
    assert_tree_allclose(jax.jit(jf)(xs[0]), jf(xs[0]))
    np.testing.assert_array_equal(jf(xs[1]), jf(xs[1]))


def test_does_not_mutate_numpy_input(rng):
    x = rng.standard_normal(4)
    before = x.copy()
    jacobians.jacobian(lambda x: jnp.sin(x) * x, chunk_size=3)(x)
    np.testing.assert_array_equal(x, before)


# --- The book's worked examples ---------------------------------------------------


def test_book_example_5_63_to_5_66():
    f = lambda x: jnp.stack([-2 * x[0] + x[1], x[0] + x[1]])  # noqa: E731
    J = jacobians.jacobian(f)(jnp.array([0.3, -1.2]))
    np.testing.assert_array_equal(J, [[-2.0, 1.0], [1.0, 1.0]])


def test_book_example_5_9_linear_map(rng):
    A = randn(rng, (4, 3))
    for mode in ("fwd", "rev"):
        J = jacobians.jacobian(lambda x: A @ x, mode=mode)(randn(rng, (3,)))
        np.testing.assert_allclose(J, A, rtol=1e-14)  # (5.68)


def test_book_example_5_10_chain_rule(rng):
    f = lambda x: jnp.exp(x[0] * x[1] ** 2)  # noqa: E731
    g = lambda t: jnp.stack([t * jnp.cos(t), t * jnp.sin(t)])  # noqa: E731
    t = jnp.asarray(rng.uniform(0.2, 1.5))
    x1, x2 = t * jnp.cos(t), t * jnp.sin(t)
    closed = jnp.exp(x1 * x2**2) * (  # (5.74c)
        x2**2 * (jnp.cos(t) - t * jnp.sin(t)) + 2 * x1 * x2 * (jnp.sin(t) + t * jnp.cos(t))
    )
    np.testing.assert_allclose(jacobians.jacobian(lambda t: f(g(t)))(t), closed, rtol=1e-12)
    # (5.74a): the product of the 1x2 and 2x1 Jacobians.
    df_dx = jacobians.jacobian(f)(g(t))
    dx_dt = jacobians.jacobian(g)(t)
    np.testing.assert_allclose(df_dx @ dx_dt, closed, rtol=1e-12)


def test_book_example_5_11_least_squares(rng):
    N, D = 6, 3
    Phi, y, theta = randn(rng, (N, D)), randn(rng, (N,)), randn(rng, (D,))
    L = lambda th: jnp.sum((y - Phi @ th) ** 2)  # noqa: E731
    closed = -2 * (y - Phi @ theta) @ Phi  # (5.83)
    for mode in ("fwd", "rev"):
        np.testing.assert_allclose(jacobians.jacobian(L, mode=mode)(theta), closed, rtol=1e-12)


# --- jacobian_matrix ------------------------------------------------------------------


def test_jacobian_matrix_figure_5_7(rng):
    def A_of_x(x):  # A in R^{4x2}, x in R^3
        return jnp.stack([jnp.sin(x[:2]) * x[2], x[:2] ** 2, jnp.exp(x[1:]), x[::2] * x[1]])

    x = randn(rng, (3,))
    T = jax.jacfwd(A_of_x)(x)  # (4, 2, 3), approach 1
    MC = jacobians.jacobian_matrix(A_of_x)(x)
    MF = jacobians.jacobian_matrix(A_of_x, order="F", mode="rev", chunk_size=5)(x)
    assert MC.shape == MF.shape == (8, 3)
    for i in range(4):
        for j in range(2):
            np.testing.assert_allclose(MC[2 * i + j], T[i, j], rtol=1e-13)
            np.testing.assert_allclose(MF[i + 4 * j], T[i, j], rtol=1e-13)


def test_jacobian_matrix_of_matrix_input(rng):
    A, B = randn(rng, (2, 3)), randn(rng, (4, 5))
    X = randn(rng, (3, 4))
    M = jacobians.jacobian_matrix(lambda X: A @ X @ B, order="F")(X)
    np.testing.assert_allclose(M, jnp.kron(B.T, A), rtol=1e-12)  # vec(AXB) = (B^T kron A) vec(X)


def test_jacobian_matrix_has_aux(rng):
    M, aux = jacobians.jacobian_matrix(lambda x: (jnp.outer(x, x), x.sum()), has_aux=True)(randn(rng, (2,)))
    assert M.shape == (4, 2) and aux.shape == ()


# --- errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(mode="forward"), ValueError, r"mode must be one of \('fwd', 'rev', 'auto'\), got 'forward'"),
        (dict(chunk_size=0), ValueError, r"chunk_size must be >= 1 .* got 0"),
        (dict(chunk_size=-3), ValueError, r"chunk_size must be >= 1 .* got -3"),
        (dict(chunk_size=2.5), TypeError, r"chunk_size must be a positive int or None, got 2.5"),
        (dict(chunk_size=True), TypeError, r"chunk_size must be a positive int or None, got True"),
        (dict(argnums="x"), TypeError, r"argnums must be an int or a tuple of ints, got 'x'"),
        (dict(argnums=()), ValueError, r"argnums must name at least one argument"),
        (dict(argnums=(0, 0)), ValueError, r"argnums must not repeat an argument"),
    ],
)
def test_bad_options_raise_at_construction(kwargs, exc, match):
    traced = []
    with pytest.raises(exc, match=match):
        jacobians.jacobian(lambda x: traced.append(1) or x, **kwargs)
    assert not traced


def test_bad_matrix_options():
    with pytest.raises(ValueError, match=r"order must be 'C' .* or 'F' .*got 'K'"):
        jacobians.jacobian_matrix(jnp.sin, order="K")
    with pytest.raises(ValueError, match=r"argnums must be a single int, got \(0, 1\)"):
        jacobians.jacobian_matrix(jnp.sin, argnums=(0, 1))
    with pytest.raises(ValueError, match=r"single array input and a single array output"):
        jacobians.jacobian_matrix(lambda x: (x, x))(jnp.ones(2))


def test_not_callable():
    with pytest.raises(TypeError, match=r"fun must be callable, got ndarray"):
        jacobians.jacobian(np.ones(3))


def test_bad_inputs(rng):
    jf = jacobians.jacobian(lambda x, y=None: x * 2.0)
    with pytest.raises(TypeError, match=r"real floating-point inputs, but argument 0 has dtype int32"):
        jf(jnp.arange(3, dtype=jnp.int32))
    with pytest.raises(TypeError, match=r"argument 0, a Python int \(3\)"):
        jf(3)
    with pytest.raises(TypeError, match=r"must hold arrays, but a leaf of argument 0 is a str"):
        jf("abc")
    with pytest.raises(TypeError, match=r"complex64.*pass holomorphic=True"):
        jf(jnp.ones(2, jnp.complex64))
    with pytest.raises(TypeError, match=r"holomorphic=True requires complex inputs, but argument 0 has dtype float64"):
        jacobians.jacobian(jnp.sin, holomorphic=True)(jnp.ones(2))
    with pytest.raises(ValueError, match=r"argnums=2 but the function was called with 1 positional"):
        jacobians.jacobian(jnp.sin, argnums=2)(jnp.ones(2))
    with pytest.raises(TypeError, match=r"neither an array nor hashable"):
        jf(jnp.ones(2), {1, 2})
    with pytest.raises(TypeError, match=r"argument 0\['b'\] has dtype int64"):
        jacobians.jacobian(lambda p: p["a"] * 2.0)({"a": jnp.ones(2), "b": jnp.arange(2)})


def test_bad_outputs(rng):
    x = randn(rng, (3,))
    with pytest.raises(TypeError, match=r"fun must return floating-point arrays, but output has dtype int"):
        jacobians.jacobian(lambda x: jnp.argsort(x))(x)
    with pytest.raises(TypeError, match=r"has_aux=True requires fun to return a pair"):
        jacobians.jacobian(lambda x: x * 2.0, has_aux=True)(x)
    with pytest.raises(TypeError, match=r"mode='rev' needs real outputs"):
        jacobians.jacobian(lambda x: jax.lax.complex(x, x), mode="rev")(x)
    with pytest.raises(TypeError, match=r"holomorphic=True requires complex outputs"):
        jacobians.jacobian(lambda z: jnp.abs(z), holomorphic=True)(jax.lax.complex(x, x))


def test_holomorphic_plans_and_budgets():
    # holomorphic=True: plan() and max_memory= take the complex inputs (they traced the function as real),
    # and divergence (no holomorphic option) names what it can do instead.
    f = lambda z: jnp.sin(z) * z[::-1]  # noqa: E731
    z = jnp.array([1.0 + 0.5j, 2.0 - 1.0j, 0.3j])
    want = jax.jacfwd(f, holomorphic=True)(z)
    assert_tree_allclose(jacobians.jacobian(f, holomorphic=True, max_memory="1MB")(z), want)
    plan = jacobians.jacobian(f, holomorphic=True).plan(z)
    assert (plan.method, plan.passes) == ("dense", 3)
    with pytest.raises(TypeError, match="real and imaginary parts as separate real arguments"):
        jacobians.divergence(lambda v: v * v)(z)


def test_compressed_method_plan_shows_its_colours(rng):
    # method="compressed": plan() is the sparse engine's (3 colours of a 3-point stencil), not n passes.
    c = CASES["stencil_1d"]
    x = randn(rng, (30,))
    for mode in ("auto", "fwd", "rev"):
        plan = jacobians.jacobian(c.fun, method="compressed", mode=mode).plan(x)
        assert plan.method == "compressed" and plan.passes == 3 and plan.nnz is not None
        assert plan.certificate is not None and not plan.certificate.failed


def test_a_jvp_that_batches_the_primal_is_still_a_jacobian():
    # A scatter into lax.empty: JAX's JVP rule batches the primal along with the tangents, and jax.jacfwd
    # fails ("got axis spec None but output was batched"); forward mode keeps one copy of the primal instead.
    def f(x):
        out = jax.lax.empty((2,), x.dtype).at[0].set(1.0)
        return out.at[1].set(out[0] * jnp.sin(x[0]) * x[2])

    x = jnp.asarray([0.3, -1.2, 0.7])
    want = jax.jacrev(f)(x)
    for kw in ({}, {"mode": "fwd"}, {"mode": "fwd", "method": "dense"}, {"mode": "fwd", "chunk_size": 2}):
        assert_tree_allclose(jacobians.jacobian(f, **kw)(x), want)
    value, J = jacobians.value_and_jacobian(f, mode="fwd")(x)
    assert_tree_allclose(value, f(x))
    assert_tree_allclose(J, want)
    tree = jacobians.jacobian(lambda d: f(d["x"]), mode="fwd")({"x": x})
    assert_tree_allclose(tree["x"], want)


def test_custom_vmap_and_custom_vjp_take_the_direction_jax_can():
    # A custom_vmap cannot be linearized (no reverse mode); a custom_vjp has no forward mode. The default of
    # every entry point takes the other direction instead of JAX's error.
    @jax.custom_batching.custom_vmap
    def s(x):
        return jnp.sin(x)

    @s.def_vmap
    def _(axis_size, in_batched, xs):
        return jnp.sin(xs), in_batched[0]

    @jax.custom_vjp
    def c(x):
        return jnp.sin(x) * 2.0

    c.defvjp(lambda x: (c(x), jnp.cos(x)), lambda r, g: (2.0 * r * g,))
    x = jnp.asarray([0.1, 0.2, 0.3])
    wide = lambda x: jnp.concatenate([s(x), s(x) ** 2, x])  # noqa: E731 - m > n: reverse mode by cost
    assert_tree_allclose(jacobians.jacobian(wide)(x), jax.jacfwd(wide)(x))
    assert_tree_allclose(jacobians.value_and_jacobian(wide)(x)[1], jax.jacfwd(wide)(x))
    g = lambda x: jnp.sum(s(x) * x)  # noqa: E731
    assert_tree_allclose(jacobians.hessian(g)(x), jax.jacfwd(jax.jacfwd(g))(x))
    narrow = lambda x: c(x) * x[::-1]  # noqa: E731
    value, J = jacobians.value_and_jacobian(narrow)(x)
    assert_tree_allclose(value, narrow(x))
    assert_tree_allclose(J, jax.jacrev(narrow)(x))


def test_value_and_jacobian_value_is_fun_s_own_under_a_custom_vmap(rng):
    # The vmapped JVPs evaluate a custom_vmap by its batching rule (here one that disagrees with fun on
    # purpose); the value returned is fun's own, the Jacobian JAX's (jax.jacfwd takes the rule as well).
    @jax.custom_batching.custom_vmap
    def s(x):
        return jnp.sin(x) * 2.0

    @s.def_vmap
    def _(axis_size, in_batched, xs):
        return jnp.sin(xs) * 2.0 + 1.0, in_batched[0]

    f = lambda x: s(x) * x[::-1]  # noqa: E731
    x = randn(rng, (4,))
    for mode in ("auto", "fwd"):
        value, J = jacobians.value_and_jacobian(f, mode=mode)(x)
        assert_tree_allclose(value, f(x))
        assert_tree_allclose(J, jax.jacfwd(f)(x))


@pytest.mark.parametrize("mode", ["auto", "fwd", "rev"])
def test_value_and_jacobian_holomorphic(rng, mode):
    f = lambda z: jnp.sin(z) * z[::-1] + z**2  # noqa: E731
    z = jax.lax.complex(randn(rng, (3,)), randn(rng, (3,)))
    value, J = jacobians.value_and_jacobian(f, mode=mode, holomorphic=True)(z)
    assert_tree_allclose(value, f(z))
    assert_tree_allclose(J, jax.jacfwd(f, holomorphic=True)(z))
    g = lambda x: jnp.exp(jax.lax.complex(jnp.zeros_like(x), x))  # noqa: E731 - complex outputs of real inputs
    x = randn(rng, (3,))
    if mode == "rev":
        with pytest.raises(TypeError, match="jacobians.value_and_jacobian: mode='rev' needs real outputs"):
            jacobians.value_and_jacobian(g, mode=mode)(x)
    else:
        assert_tree_allclose(jacobians.value_and_jacobian(g, mode=mode)(x)[1], jax.jacfwd(g)(x))
    with pytest.raises(TypeError, match=r"jacobians.value_and_jacobian: fun has complex inputs \(complex128\) and "
                                        r"complex outputs .*pass holomorphic=True"):
        jacobians.value_and_jacobian(f)(z)


@pytest.mark.parametrize("mode", ["auto", "rev"])
def test_value_and_jacobian_real_function_of_complex_inputs(rng, mode):
    f = lambda z: jnp.abs(z) ** 2 + jnp.real(z[::-1])  # noqa: E731
    z = jax.lax.complex(randn(rng, (3,)), randn(rng, (3,)))
    value, J = jacobians.value_and_jacobian(f, mode=mode)(z)
    assert_tree_allclose(value, f(z))
    assert_tree_allclose(J, jax.jacrev(f)(z))
    assert_tree_allclose(J, jacobians.jacobian(f, mode=mode)(z))


@pytest.mark.parametrize("mode", ["auto", "fwd", "rev"])
def test_empty_leaves_beside_others(rng, mode):
    # An empty output (input) leaf cut off a concatenation made XLA's CPU compiler abort the process
    # ("SmallVector unable to grow"): empty leaves are made, not sliced.
    x = randn(rng, (2,))
    f = lambda x: {"e": jnp.zeros((0,), x.dtype) + x.sum() * 0, "a": x**2}  # noqa: E731
    value, J = jacobians.value_and_jacobian(f, mode=mode)(x)
    assert_tree_allclose(value, f(x))
    assert_tree_allclose(J, jax.jacfwd(f)(x))
    g = lambda t: jnp.sum(t[0] ** 3)  # noqa: E731
    v, grad, H = jacobians.value_grad_and_hessian(g)((x, jnp.zeros((0,), x.dtype)))
    assert_tree_allclose(grad, (3 * x**2, jnp.zeros((0,), x.dtype)))
    assert_tree_allclose(H, jax.hessian(g)((x, jnp.zeros((0,), x.dtype))))


@pytest.mark.parametrize("mode", ["auto", "fwd", "rev"])
def test_allow_int_holds_integer_leaves_fixed(rng, mode):
    # jax.jacrev(allow_int=True): integer leaves get zero blocks, the float leaves their Jacobian.
    f = lambda p, c: {"y": p["w"] * p["n"].astype(p["w"].dtype) ** 2 * c, "s": jnp.sum(jnp.sin(p["w"]))}  # noqa: E731
    p = {"w": randn(rng, (3,)), "n": jnp.arange(1, 4)}
    got = jacobians.jacobian(f, allow_int=True, mode=mode)(p, 2.0)
    want = jax.jacrev(f, allow_int=True)(p, 2.0)
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        assert a.shape == b.shape and (a.dtype == b.dtype or b.dtype == jax.dtypes.float0)
        np.testing.assert_allclose(a, np.asarray(b, a.dtype), rtol=1e-12)
    # Several argnums, a Python int (weakly typed zeros, as JAX), an argument that is all integer, has_aux.
    g = lambda x, n, y: (x * n + y**2, n)  # noqa: E731
    x, y = randn(rng, (2,)), randn(rng, (2,))
    (jx, jn, jy), aux = jacobians.jacobian(g, (0, 1, 2), allow_int=True, has_aux=True, mode=mode)(x, 3, y)
    wx, wn, wy = jax.jacrev(lambda *a: g(*a)[0], (0, 1, 2), allow_int=True)(x, 3, y)
    np.testing.assert_allclose(jx, wx, rtol=1e-12)
    np.testing.assert_allclose(jy, wy, rtol=1e-12)
    assert aux == 3 and jn.shape == (2,) and jn.weak_type and not np.any(jn)
    value, jac = jacobians.value_and_jacobian(lambda n, x: n.astype(x.dtype) * x, (0, 1), allow_int=True, mode=mode)(
        jnp.int32(4), x)
    np.testing.assert_allclose(value, 4 * x)
    assert jac[0].dtype == jnp.int32 and jac[0].shape == (2,) and not np.any(jac[0])
    np.testing.assert_allclose(jac[1], 4 * np.eye(2))
    # jit and vmap of the returned function; without allow_int the error says how to allow it.
    fn = jacobians.jacobian(f, allow_int=True, mode=mode)
    np.testing.assert_allclose(jax.jit(fn)(p, 2.0)["s"]["w"], np.cos(p["w"]), rtol=1e-12)
    batch = jax.tree_util.tree_map(lambda a: jnp.stack([a, a]), p)
    assert jax.vmap(fn, (0, None))(batch, 2.0)["y"]["n"].shape == (2, 3, 3)
    with pytest.raises(TypeError, match=r"jacobians.jacobian: .*argument 0\['n'\] has dtype int.*allow_int=True"):
        jacobians.jacobian(f, mode=mode)(p, 2.0)


@pytest.mark.parametrize("empty", [(), {}, [], {"a": ()}], ids=["tuple", "dict", "list", "nested"])
@pytest.mark.parametrize("kw", [{}, {"mode": "fwd"}, {"mode": "rev"}, {"method": "structured"}, {"chunk_size": 2}],
                         ids=["auto", "fwd", "rev", "structured", "chunk2"])
def test_an_empty_output_pytree_has_the_empty_jacobian(empty, kw, rng):
    """``fun`` returning ``()`` (no leaves): the Jacobian is that pytree, as ``jax.jacfwd``'s; aux still comes."""
    x = randn(rng, (3,))
    assert jacobians.jacobian(lambda x: empty, **kw)(x) == jax.jacfwd(lambda x: empty)(x) == empty
    jac, aux = jacobians.jacobian(lambda x: (empty, jnp.sum(x)), has_aux=True, **kw)(x)
    assert jac == empty and float(aux) == pytest.approx(float(jnp.sum(x)))
    assert jacobians.value_and_jacobian(lambda x: empty)(x) == (empty, empty)
