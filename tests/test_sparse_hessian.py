"""Sparse Hessian options (issues 24 and 27): modes and chunks as the dense ``hessian`` has them, SciPy
outputs, the plan's compressed matrix and decompression, and the colouring cost model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse
from helpers import randn
from jax.experimental import sparse as jsparse
from jax.flatten_util import ravel_pytree

import jacobians


def rosenbrock(x):
    return jnp.sum(100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2)


def mixed(p):
    """A pytree input; a sine (the two-program path), an arrowhead row and a band."""
    x, y = p["x"], p["y"]
    return x[0] * jnp.sum(y) + jnp.sum(jnp.sin(x) * x[::-1]) + jnp.sum(y[1:] * y[:-1] ** 2)


def dense_hessian(f, p):
    flat, unravel = ravel_pytree(p)
    return np.asarray(jax.hessian(lambda v: f(unravel(v)))(flat))


def flat_dense(h, p):
    """The flat (n, n) matrix of a pytree-of-blocks Hessian."""
    leaves = jax.tree_util.tree_leaves(p)
    rows = jax.tree_util.tree_leaves(h, is_leaf=lambda a: isinstance(a, jax.Array))
    k = len(leaves)
    blocks = [[np.asarray(rows[i * k + j]).reshape(leaves[i].size, leaves[j].size) for j in range(k)]
              for i in range(k)]
    return np.block(blocks)


@pytest.mark.parametrize("mode, chunk", [("fwd_rev", 2), ("rev_fwd", 3), ("rev_rev", 2), ("fwd_fwd", None)])
def test_modes_and_chunks_equal_jax_hessian(rng, mode, chunk):
    p = {"x": randn(rng, (5,)), "y": randn(rng, (4,))}
    got = jacobians.sparse_hessian(mixed, mode=mode, chunk_size=chunk, output="dense")(p)
    np.testing.assert_allclose(flat_dense(got, p), dense_hessian(mixed, p), rtol=1e-10, atol=1e-12)


def test_scipy_outputs_equal_dense(rng):
    p = {"x": randn(rng, (5,)), "y": randn(rng, (4,))}
    H = dense_hessian(mixed, p)
    for fmt, kind in (("csr", scipy.sparse.csr_matrix), ("csc", scipy.sparse.csc_matrix)):
        m = jacobians.sparse_hessian(mixed, output=fmt)(p)
        assert isinstance(m, kind) and m.format == fmt and m.shape == (9, 9)
        assert m.nnz < 81  # sparse: the pattern, not every entry
        np.testing.assert_allclose(m.toarray(), H, rtol=1e-10, atol=1e-12)

    def g(a, b):  # two inputs, two outputs: the flat (m, n) Jacobian in pytree order
        return {"u": jnp.sin(a[1:]) * b[:-1], "v": a[0] * b}, jnp.sum(a)

    a, b = randn(rng, (4,)), randn(rng, (4,))
    flat, unravel = ravel_pytree((a, b))
    J = jax.jacfwd(lambda v: ravel_pytree(g(*unravel(v))[0])[0])(flat)
    for fmt in ("csr", "csc"):
        for mode in ("fwd", "rev"):
            m, aux = jacobians.sparse_jacobian(g, (0, 1), output=fmt, mode=mode, has_aux=True)(a, b)
            assert m.format == fmt and m.shape == (7, 8)
            np.testing.assert_allclose(m.toarray(), J, rtol=1e-12, atol=1e-14)
            np.testing.assert_allclose(aux, jnp.sum(a))


def test_sparse_jacobian_chunks(rng):
    def g(x):
        return jnp.concatenate([jnp.sin(x[1:]) * x[:-1], x[:3] ** 2])

    x = randn(rng, (7,))
    for mode in ("fwd", "rev"):
        got = jacobians.sparse_jacobian(g, mode=mode, chunk_size=2, output="dense")(x)
        np.testing.assert_allclose(got, jax.jacfwd(g)(x), rtol=1e-12, atol=1e-14)


def test_scipy_output_inside_jit_raises(rng):
    x = randn(rng, (6,))
    with pytest.raises(ValueError, match=r"sparse_hessian: output='csc' returns a SciPy sparse matrix, a host "
                                         r"object, which cannot be built inside jax.jit"):
        jax.jit(jacobians.sparse_hessian(rosenbrock, output="csc"))(x)
    with pytest.raises(ValueError, match=r"sparse_jacobian: output='csr' returns a SciPy sparse matrix"):
        jax.jit(jacobians.sparse_jacobian(jnp.sin, output="csr"))(x)
    # The BCOO output works there (its indices are constants of the caller's trace).
    got = jax.jit(jacobians.sparse_hessian(rosenbrock))(x).todense()
    np.testing.assert_allclose(got, jax.hessian(rosenbrock)(x), rtol=1e-10)


def _check_plan_api(plan, compressed, reference):
    rows, cols = plan.pattern.rows, plan.pattern.cols
    want = reference[rows, cols]
    np.testing.assert_allclose(plan.decompress(compressed), want, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(jax.jit(plan.decompress)(compressed), want, rtol=1e-10, atol=1e-12)
    if plan.coloring == "acyclic":
        with pytest.raises(ValueError, match=r"an acyclic colouring decompresses by substitution"):
            plan.decompression_index()
    else:
        np.testing.assert_allclose(np.asarray(compressed).reshape(-1)[plan.decompression_index()], want, rtol=1e-12)


def test_plan_compressed_matrix_and_decompression(rng):
    x = randn(rng, (12,))
    H = np.asarray(jax.hessian(rosenbrock)(x))
    for coloring in ("star", "acyclic", "column"):
        plan = jacobians.sparse_hessian(rosenbrock, coloring=coloring).plan(x)
        S = plan.seeds()
        assert plan.coloring == coloring and S.shape == (plan.n_colors, 12)
        np.testing.assert_array_equal(S.sum(axis=0), np.ones(12))  # each input in exactly one colour
        _check_plan_api(plan, S @ H, H)  # row k: H @ s_k (H is symmetric)

    def g(x):
        return jnp.concatenate([jnp.sin(x[1:]) * x[:-1], x[:3] ** 2])

    J = np.asarray(jax.jacfwd(g)(x))
    for mode in ("fwd", "rev"):
        plan = jacobians.sparse_jacobian(g, mode=mode).plan(x)
        S = plan.seeds()
        _check_plan_api(plan, S @ J.T if mode == "fwd" else S @ J, J)
    with pytest.raises(ValueError, match=r"SparsePlan.decompress: expected the compressed matrix of shape"):
        plan.decompress(np.zeros((1, 1)))


def expensive_rosenbrock(x):
    """A tridiagonal Hessian with a long elementwise chain: each Hessian-vector product is dear."""
    y = x
    for _ in range(8):
        y = jnp.sin(y) + 0.5 * y
    return rosenbrock(x) + jnp.sum(y)


def test_auto_colouring_counts_decompression(rng):
    x = randn(rng, (40,))
    # Cheap products: the acyclic colouring's 2 colours do not pay for its substitution; star's 3 do.
    plan = jacobians.sparse_hessian(rosenbrock).plan(x)
    assert (plan.coloring, plan.n_colors) == ("star", 3), plan
    acyclic = jacobians.sparse_hessian(rosenbrock, coloring="acyclic").plan(x)
    assert acyclic.n_colors == 2 and acyclic.costs["acyclic"] > plan.costs["star"]
    # Dear products (same pattern): saving one costs more than the substitution.
    plan = jacobians.sparse_hessian(expensive_rosenbrock).plan(x)
    assert (plan.coloring, plan.n_colors) == ("acyclic", 2), plan
    assert plan.costs["acyclic"] < plan.costs["star"]
    got = jacobians.sparse_hessian(expensive_rosenbrock)(x).todense()
    np.testing.assert_allclose(got, jax.hessian(expensive_rosenbrock)(x), rtol=1e-9, atol=1e-12)


def test_option_errors():
    with pytest.raises(ValueError, match=r"sparse_hessian: chunk_size must be >= 1"):
        jacobians.sparse_hessian(rosenbrock, chunk_size=0)
    with pytest.raises(TypeError, match=r"sparse_hessian: chunk_size must be a positive int or None"):
        jacobians.sparse_hessian(rosenbrock, chunk_size=1.5)
    with pytest.raises(ValueError, match=r"sparse_hessian: mode must be one of"):
        jacobians.sparse_hessian(rosenbrock, mode="fwd")
    with pytest.raises(ValueError, match=r"sparse_jacobian: output must be one of"):
        jacobians.sparse_jacobian(jnp.sin, output="coo")
    with pytest.raises(ValueError, match=r"sparse_jacobian: chunk_size must be >= 1"):
        jacobians.sparse_jacobian(jnp.sin, chunk_size=-1)


def test_certificate_programs_stage_constants():
    # Inside jax.ensure_compile_time_eval (a certificate run while a call is traced) JAX evaluates operations on
    # constants eagerly, each compiled on its own; _compat.staged() stages them into the program (one compile).
    from jacobians import _compat

    seen = []

    def body(x, stage):
        if stage:
            with _compat.staged():
                c = jnp.ones(3) * 2.0
        else:
            c = jnp.ones(3) * 2.0
        seen.append(_compat.is_tracer(c))
        return x + c

    with jax.ensure_compile_time_eval():
        for stage in (False, True):
            out = jax.jit(body, static_argnums=1)(jnp.zeros(3), stage)
            np.testing.assert_array_equal(out, 2.0 * np.ones(3))
    assert seen == [False, True]


def test_float32_stays_float32(rng):
    # Regression: the decompression program (funs with a sine run two) did not trace fun, so the blocks took a
    # default float64 dtype; a weakly typed Python float must not promote either.
    x = randn(rng, (6,), jnp.float32)

    def f(x, t):
        return jnp.sum(jnp.sin(x) * t) + jnp.sum(x[1:] * x[:-1])

    ref = jax.hessian(f)(x, 0.5)
    for output in ("dense", "bcoo", "csr"):
        got = jacobians.sparse_hessian(f, output=output)(x, 0.5)
        assert got.dtype == np.float32, output
        dense = got if output == "dense" else got.todense() if output == "bcoo" else got.toarray()
        np.testing.assert_allclose(dense, ref, rtol=1e-5, atol=1e-6)


def grid_energy(u):
    """1/2 sum over the edges of a 6 x 6 grid of (u_i - u_j)^2 + 1/4 sum u^4: H = L + diag(3 u^2)."""
    U = u.reshape(6, 6)
    return 0.5 * (jnp.sum((U[1:] - U[:-1]) ** 2) + jnp.sum((U[:, 1:] - U[:, :-1]) ** 2)) + 0.25 * jnp.sum(u**4)


@pytest.mark.parametrize("fun, n", [(rosenbrock, 40), (grid_energy, 36)])
def test_products_are_computed_apart_from_the_gather(monkeypatch, rng, fun, n):
    # Issue 27: fused into the decompression's gather, XLA's CPU code computed each nonzero's product on
    # its own in a scalar loop (the 2-D Laplacian energy 1.3-1.9x slower than asdex's same program at
    # n = 1e4). The products run in a cond XLA cannot see through (_batchwise.apart): a conditional in the
    # compiled program, still one under jax.vmap, and the values and their derivatives as JAX's. The
    # threshold is lowered to do so at these sizes.
    from jacobians._sparse import engine

    monkeypatch.setattr(engine, "APART_MIN", 1)
    h, reference = jacobians.sparse_hessian(fun), jax.hessian(fun)  # jitted below: op by op it took seconds
    x, xs, w = randn(rng, (n,)), randn(rng, (2, n)), randn(rng, (n, n))
    np.testing.assert_allclose(h(x).todense(), jax.jit(reference)(x), rtol=1e-10, atol=1e-12)
    dense = jacobians.sparse_hessian(fun, output="dense")
    batched = jax.jit(jax.vmap(dense))
    assert "conditional(" in batched.lower(xs).compile().as_text()
    np.testing.assert_allclose(batched(xs), jax.jit(jax.vmap(reference))(xs), rtol=1e-10, atol=1e-12)
    # Third derivatives through the cond: d/dx of sum_ij H_ij(x) w_ij.
    got = jax.grad(lambda x: jnp.sum(dense(x) * w))(x)
    want = jax.jit(jax.grad(lambda x: jnp.sum(reference(x) * w)))(x)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-10)


def test_a_hessian_at_rounding_level_is_certified():
    # sum(Q**2) of an orthogonal Q is identically 3: every Hessian entry is rounding (~1e-17), where the
    # plan's and JAX's HVPs disagree by as much as JAX's two orders of differentiation disagree with each
    # other. The certificate allows that disagreement (strict mode: a false alarm would raise).
    A0 = jnp.array([[4.5, 0.3, -0.2], [0.1, 3.8, 0.4], [-0.3, 0.2, 4.2]])

    def h(x):
        M = A0 + 0.3 * jnp.array([[x[0], x[1], x[2]], [x[3], x[4], x[5]], [x[0] * x[5], x[1], x[3]]])
        return jnp.sum(jnp.linalg.qr(M)[0] ** 2)

    x = jnp.array([0.9, -1.1, 0.7, 1.3, -0.6, 1.2])
    H = np.asarray(jacobians.sparse_hessian(h)(x).todense())
    assert np.abs(H).max() < 1e-14 and np.abs(np.asarray(jax.hessian(h)(x))).max() < 1e-14


@pytest.mark.parametrize("platform", ["cpu", "gpu"])
def test_transcendental_hessian_programs_follow_the_platform(rng, monkeypatch, platform):
    # The products in a program of their own are for XLA's CPU fusion; elsewhere the second dispatch is what
    # a call costs (on an H200 +60 us of 140): one program there, with the same values.
    from jacobians._sparse import engine

    monkeypatch.setattr(engine, "_platform", lambda traced: platform)
    calls = []
    products = engine.Engine.compute_products
    monkeypatch.setattr(engine.Engine, "compute_products", lambda *a: calls.append(1) or products(*a))
    f = lambda x: jnp.sum(jnp.cos(x[1:] * x[:-1])) + x[0] * jnp.sum(jnp.sin(x))  # noqa: E731
    x = randn(rng, (30,))
    H = jacobians.sparse_hessian(f, output="dense")(x)
    np.testing.assert_allclose(H, jax.hessian(f)(x), rtol=1e-12, atol=1e-12)
    assert bool(calls) == (platform == "cpu")


def _dict_out(p):
    return {"loss": jnp.sum(p["a"] ** 2 * p["a"][::-1]) + p["a"][0] * jnp.sum(jnp.sin(p["b"]))}


def _tuple_out(a, b):
    return (jnp.sum(a[1:] * a[:-1] ** 2) * b[0] + jnp.sum(b**3),)


@pytest.mark.parametrize("output, fun, argnums", [("dense", _dict_out, 0), ("bcoo", _tuple_out, (0, 1)),
                                                  ("csr", _dict_out, 0)])
def test_output_container_kept_as_jax_hessian(output, fun, argnums, rng):
    # Bad-input hunt: a scalar returned in a container (a dict, a 1-tuple) lost it; jax.hessian keeps it around
    # the Hessian, with pytree inputs and argnums tuples alike (the SciPy outputs stay one flat matrix).
    x, y = randn(rng, (3,)), randn(rng, (2,))
    args = ({"a": x, "b": y},) if fun is _dict_out else (x, y)
    got = jacobians.sparse_hessian(fun, argnums, output=output)(*args)
    want = jax.jit(jax.hessian(fun, argnums))(*args)
    if output == "csr":  # one flat matrix, as for a bare scalar
        assert isinstance(got, scipy.sparse.csr_matrix)
        np.testing.assert_allclose(got.toarray(), flat_dense(want["loss"], args[0]), rtol=1e-12, atol=1e-12)
        return
    got = jax.jit(lambda h: jax.tree_util.tree_map(lambda b: b.todense() if isinstance(b, jsparse.BCOO) else b, h,
                                                   is_leaf=lambda b: isinstance(b, jsparse.BCOO)))(got)
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_python_float_argument_weakly_typed_and_complex_output_a_type_error(rng):
    # Bad-input hunt: the dense Hessian of a Python float was strongly typed (jax.hessian's is weak); a complex
    # scalar output of real inputs was a PlanError calling it a defect of the library (jax.hessian: a TypeError).
    got, want = jacobians.sparse_hessian(lambda s: s**3, output="dense")(2.0), jax.jit(jax.hessian(lambda s: s**3))(2.0)
    assert got.dtype == want.dtype and got.weak_type and want.weak_type
    np.testing.assert_allclose(got, want)
    x = randn(rng, (3,))
    with pytest.raises(TypeError, match=r"jacobians.sparse_hessian: fun must return a real scalar \(a real "
                                        r"floating-point dtype\), but its output has dtype complex128"):
        jacobians.sparse_hessian(lambda x: jnp.sum(jax.lax.complex(x, x**2)))(x)


def test_a_forced_forward_outer_mode_over_a_custom_vjp_says_so():
    # JAX's JVP of the custom_vjp's linearization raised "Differentiation rule for 'custom_lin' not implemented".
    @jax.custom_vjp
    def g(y):
        return jnp.sin(y) * y

    g.defvjp(lambda y: (g(y), y), lambda y, ct: (ct * (jnp.cos(y) * y + jnp.sin(y)),))
    f = lambda x: jnp.sum(g(x) * x[::-1])  # noqa: E731
    x = jnp.arange(1.0, 7.0)
    with pytest.raises(TypeError, match=r"jacobians.sparse_hessian: can't apply forward-mode autodiff \(jvp\) to a "
                                        r"custom_vjp function"):
        jacobians.sparse_hessian(f, mode="rev_fwd", output="dense")(x)
    H = jacobians.sparse_hessian(f, output="dense")(x)  # the default mode: reverse over reverse there
    np.testing.assert_allclose(H, jax.jacrev(jax.grad(f))(x), rtol=1e-12, atol=1e-12)


_PRODUCTS = {  # a product is linear in each factor: no square unless one input reaches two factors
    "cumprod": (lambda x: jnp.sum(jnp.cumprod(x)), 4, 12),
    "prod": (lambda x: jnp.prod(x), 4, 12),
    "prod_repeated": (lambda x: jnp.prod(jnp.concatenate([x, x[:2]])), 4, 14),
    "cumprod_reverse_rows": (lambda x: jnp.sum(jax.lax.cumprod(x.reshape(2, 3), axis=1, reverse=True)), 6, 12),
    "prod_axis": (lambda x: jnp.sum(jnp.prod(x.reshape(2, 3), axis=0)), 6, 6),
    "prod_of_sines": (lambda x: jnp.prod(jnp.sin(x)), 3, 9),
}


@pytest.mark.parametrize("name", sorted(_PRODUCTS))
def test_products_add_no_squares_they_cannot_make(name, rng):
    """The Hessian pattern of products is sound and exact: the union of nonzeros over random points."""
    f, n, nnz = _PRODUCTS[name]
    pattern = jacobians.hessian_sparsity(f, randn(rng, (n,))).to_dense()
    nz = np.zeros_like(pattern)
    for _ in range(6):
        nz |= np.asarray(jax.hessian(f)(randn(rng, (n,)))) != 0
    assert not (nz & ~pattern).any(), "the pattern misses nonzeros"
    assert pattern.sum() == nnz == nz.sum()
