"""Second order: hessian, hvp, value_* and sparse Hessians agree with jax.hessian."""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_tree_allclose, failing_compile, randn

import jacobians

MODES = ("fwd_rev", "rev_rev", "rev_fwd", "fwd_fwd", "auto")


def rosenbrock(x):
    return jnp.sum(100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2)


def _loss(p, x):
    return jnp.sum(jnp.tanh(p["W"] @ x + p["b"]) ** 2) + jnp.sum(x**3)


@functools.cache
def jax_hessian(f, argnums=0):
    """``jax.hessian`` under one ``jax.jit`` (eagerly every primitive compiles on its own), kept per function."""
    return jax.jit(jax.hessian(f, argnums))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("argnums", [0, 1, (0, 1)])
def test_hessian_matches_jax(mode, argnums, rng):
    p = {"W": randn(rng, (2, 3)), "b": randn(rng, (2,))}
    x = randn(rng, (3,))
    assert_tree_allclose(jacobians.hessian(_loss, argnums, mode=mode)(p, x), jax_hessian(_loss, argnums)(p, x))


@pytest.mark.parametrize("chunk", [1, 2, 5])
def test_hessian_chunks_and_float32(chunk, rng):
    x = randn(rng, (5,))
    assert_tree_allclose(jacobians.hessian(rosenbrock, chunk_size=chunk)(x), jax_hessian(rosenbrock)(x))
    x32 = x.astype(jnp.float32)
    np.testing.assert_allclose(jacobians.hessian(rosenbrock)(x32), jax_hessian(rosenbrock)(x32), rtol=2e-5, atol=1e-3)


def test_value_grad_hessian_and_hvp(rng):
    x = randn(rng, (6,))
    v, g, H = jacobians.value_grad_and_hessian(rosenbrock)(x)
    assert_tree_allclose((v, g, H), (rosenbrock(x), jax.grad(rosenbrock)(x), jax_hessian(rosenbrock)(x)))
    t = randn(rng, (6,))
    for mode in MODES:
        np.testing.assert_allclose(jacobians.hvp(rosenbrock, (x,), (t,), mode=mode), H @ t, rtol=1e-10)
    val, J = jacobians.value_and_jacobian(jnp.sin)(x)
    assert_tree_allclose((val, J), (jnp.sin(x), jnp.diag(jnp.cos(x))))
    (val, aux), J = jacobians.value_and_jacobian(lambda x: (jnp.sin(x), 3), has_aux=True)(x)
    assert aux == 3


def test_hessian_custom_vjp_and_while(rng):
    @jax.custom_vjp
    def f(x):
        return jnp.sum(jnp.sin(x))

    f.defvjp(lambda x: (f(x), x), lambda x, ct: (ct * jnp.cos(x),))
    x = randn(rng, (3,))
    np.testing.assert_allclose(jacobians.hessian(f)(x), jnp.diag(-jnp.sin(x)), rtol=1e-12)

    def g(x):
        return jax.lax.while_loop(lambda c: c[1] < 3, lambda c: (c[0] * c[0][0], c[1] + 1), (x, 0))[0].sum()

    np.testing.assert_allclose(jacobians.hessian(g)(x), jax.jacfwd(jax.jacfwd(g))(x), rtol=1e-10)


def test_hessian_errors(rng):
    x = randn(rng, (3,))
    with pytest.raises(ValueError, match=r"jacobians.hessian: fun must return a scalar \(shape \(\)\), but its output is \(3,\).*jacobian\(jacobians.jacobian"):
        jacobians.hessian(jnp.sin)(x)
    with pytest.raises(ValueError, match=r"jacobians.hessian: mode must be one of \('fwd_rev'"):
        jacobians.hessian(jnp.sum, mode="fwd")
    with pytest.raises(TypeError, match=r"jacobians.hessian: .*argument 0 has dtype int"):
        jacobians.hessian(jnp.sum)(jnp.arange(3))
    with pytest.raises(ValueError, match=r"jacobians.sparse_hessian: coloring must be one of"):
        jacobians.sparse_hessian(jnp.sum, coloring="greedy")
    with pytest.raises(ValueError, match=r"jacobians.sparse_hessian: a Hessian pattern must be symmetric"):
        jacobians.sparse_hessian(jnp.sum, sparsity=np.triu(np.ones((3, 3), bool)))(x)
    with pytest.raises(ValueError, match=r"jacobians.sparse_hessian: the sparsity pattern has shape \(3, 4\) but the Hessian has shape out.shape \+ in.shape = \(3, 3\)"):
        jacobians.sparse_hessian(jnp.sum, sparsity=np.ones((3, 4), bool))(x)


A = np.random.default_rng(0).standard_normal((4, 6))
C = np.array([0.0, 1.0, 0.0, 2.0, 0.0, 0.0])
M = np.array([True, False, False, False, False, True])
HESS_CASES = {
    # name: (f, n, exact)
    "diagonal": (lambda x: jnp.sum(x**2) + jnp.sum(jnp.exp(x)), 6, True),
    "zero": (lambda x: jnp.sum(jnp.asarray(A) @ x), 6, True),
    "banded": (rosenbrock, 8, True),
    "arrowhead": (lambda x: x[0] * jnp.sum(x) + jnp.sum(jnp.sin(x)), 6, True),
    "block": (lambda x: jnp.sum(jnp.tanh(x[:3].sum()) + jnp.cos(x[3:].sum())), 6, True),
    "mlp": (lambda x: jnp.sum(jnp.tanh(jnp.asarray(A) @ x)), 6, True),
    "division": (lambda x: jnp.sum(x[:3] / x[3:]), 6, True),
    "scan": (lambda x: jax.lax.scan(lambda c, xi: (c * xi, None), 1.0, x[:3])[0] + x[4] ** 2, 6, True),
    "relu": (lambda x: jnp.sum(jax.nn.relu(x) * x[::-1]), 6, False),
    # Issue 24: products by known zeros drop their pairs element by element, also where a linear term makes the
    # output read every input (a mask by a constant, a dot with it, a where with a known predicate).
    "masked": (lambda x: jnp.sum(jnp.asarray(C) * x**2) + jnp.dot(jnp.asarray(C[::-1]), jnp.sin(x))
               + jnp.sum(jnp.where(jnp.asarray(M), x * x[::-1], 0.0)) + jnp.sum(x), 6, True),
}


@pytest.mark.parametrize("name", sorted(HESS_CASES))
def test_hessian_sparsity_sound_and_sparse_hessian(name, rng):
    f, n, exact = HESS_CASES[name]
    x = randn(rng, (n,))
    pattern = jacobians.hessian_sparsity(f, x).to_dense()
    np.testing.assert_array_equal(pattern, pattern.T)
    nz = np.zeros((n, n), bool)
    for _ in range(3):
        nz |= np.asarray(jax_hessian(f)(randn(rng, (n,)))) != 0
    assert not (nz & ~pattern).any(), "the Hessian pattern misses a nonzero"
    if exact:
        np.testing.assert_array_equal(pattern, nz)
    for coloring in ("auto", "column"):
        got = jacobians.sparse_hessian(f, coloring=coloring, output="dense")(x)
        np.testing.assert_allclose(got, jax_hessian(f)(x), rtol=1e-10, atol=1e-12)


def test_sparse_hessian_plan_round_trip(tmp_path, rng):
    x = randn(rng, (10,))
    sh = jacobians.sparse_hessian(rosenbrock)
    plan = sh.plan(x)
    assert plan.n_colors <= 3
    plan.save(tmp_path / "h.npz")
    loaded = jacobians.SparsePlan.load(tmp_path / "h.npz")
    got = jacobians.sparse_hessian(rosenbrock, sparsity=loaded)(x)
    np.testing.assert_allclose(got.todense(), jax_hessian(rosenbrock)(x), rtol=1e-10)


def test_gauss_newton_materialise_custom_vjp(rng):
    # Issue 24: materialise() took forward mode, which a custom_vjp forbids; it takes the pullbacks there (as mv does).
    @jax.custom_vjp
    def f(x):
        return jnp.sin(x) * x[0]

    f.defvjp(lambda x: (f(x), x), lambda x, ct: (ct * jnp.cos(x) * x[0] + jnp.zeros_like(x).at[0].set(ct @ jnp.sin(x)),))
    x = randn(rng, (3,))
    J = jax.jacrev(f)(x)
    gn = jacobians.gauss_newton(lambda x: jnp.concatenate([f(x), x[1:] ** 2]))(x)
    Jf = jnp.concatenate([J, jax.jacfwd(lambda x: x[1:] ** 2)(x)])
    np.testing.assert_allclose(gn.materialise(), Jf.T @ Jf, rtol=1e-12)
    np.testing.assert_allclose(gn.mv(x), Jf.T @ (Jf @ x), rtol=1e-12)


@pytest.mark.parametrize("mode", ["auto", "rev_fwd"])  # forward over reverse and reverse over forward: every kernel
def test_hessian_holomorphic(mode, rng):
    # Issue 24: hessian(..., holomorphic=True), as jax.hessian has it: pytrees and argnums.
    z = jnp.asarray(rng.standard_normal(3) + 1j * rng.standard_normal(3))
    w = jnp.asarray(rng.standard_normal(2) + 1j * rng.standard_normal(2))

    def f(z, w):
        return jnp.sum(jnp.sin(z) * z[0] ** 2) + z[1] * jnp.exp(z[2]) * jnp.sum(w**3)

    got = jacobians.hessian(f, argnums=(0, 1), mode=mode, holomorphic=True)(z, w)
    want = jax.jit(jax.hessian(f, argnums=(0, 1), holomorphic=True))(z, w)
    assert_tree_allclose(got, want)
    assert got[0][1].dtype == jnp.complex128 and got[0][1].shape == (3, 2)
    if mode == "auto":
        v, g, H = jacobians.value_grad_and_hessian(f, argnums=(0, 1), holomorphic=True)(z, w)
        assert_tree_allclose((v, g, H), (f(z, w), jax.grad(f, argnums=(0, 1), holomorphic=True)(z, w), want))
        with pytest.raises(TypeError, match=r"jacobians.hessian: holomorphic=True requires complex inputs, but "
                                            r"argument 0 has dtype float64"):
            jacobians.hessian(f, holomorphic=True)(z.real, w)
        with pytest.raises(TypeError, match=r"jacobians.hessian: can only differentiate with respect to real "
                                            r"floating-point inputs, but argument 0 has dtype complex128. For a "
                                            r"holomorphic function pass holomorphic=True"):
            jacobians.hessian(f)(z, w)


def test_hvp_errors_and_fast_path(rng):
    # Issue 24: hvp of a non-scalar fun raises hessian's error, also where the tangents' count is wrong too.
    x, v = randn(rng, (3,)), randn(rng, (3,))
    scalar = r"fun must return a scalar \(shape \(\)\), but its output is \(3,\). For the second derivatives of a " \
             r"tensor-valued function use jacobians.jacobian\(jacobians.jacobian\(fun\)\)"
    for mode in ("auto", "rev_rev"):
        with pytest.raises(ValueError, match="jacobians.hvp: " + scalar):
            jacobians.hvp(jnp.sin, (x,), (v,), mode=mode)
    with pytest.raises(ValueError, match="jacobians.hvp: " + scalar):
        jacobians.hvp(lambda x, y: jnp.sin(x * y), (x, x), (v,), argnums=(0, 1))
    with pytest.raises(ValueError, match="jacobians.hessian: " + scalar):
        jacobians.hessian(jnp.sin)(x)
    with pytest.raises(ValueError, match=r"jacobians.hvp: tangents must have one entry per differentiated argument "
                                         r"\(2\), got 1"):
        jacobians.hvp(lambda x, y: jnp.sum(x * y), (x, x), (v,), argnums=(0, 1))
    # Issue 27: repeated calls take a fast path (no argument pipeline); it still retraces per shape and dtype,
    # and checks the tangents in the trace.
    f = lambda x: jnp.sum(jnp.sin(x) * x[0])  # noqa: E731
    for xs, vs in ((x, v), (x, v), (x[:2], v[:2]), (x.astype(jnp.float32), v.astype(jnp.float32))):
        got = jacobians.hvp(f, (xs,), (vs,))
        assert got.dtype == xs.dtype
        np.testing.assert_allclose(got, jax.jvp(jax.grad(f), (xs,), (vs,))[1], rtol=1e-5 if xs.dtype == jnp.float32 else 1e-12)
    from jacobians import _hessian

    assert any(k[0] is f for k in _hessian._HVP_FAST), "the repeated call did not take the fast path"
    with pytest.raises(ValueError, match=r"jacobians.hvp: tangent leaf 0 has shape \(2,\), its argument \(3,\)"):
        jacobians.hvp(f, (x,), (v[:2],))
    # Tangents as jax.jvp takes them: a complex tangent of a real argument gave H Re(v) (its imaginary part
    # dropped), and a reshaped or restructured tangent was read in the argument's order.
    with pytest.raises(TypeError, match=r"jacobians.hvp: tangent leaf 0 has dtype complex128, its argument float64"):
        jacobians.hvp(f, (x,), (v.astype(jnp.complex128),))
    with pytest.raises(TypeError, match=r"jacobians.hvp: tangent leaf 0 has dtype float32, its argument float64"):
        jacobians.hvp(f, (x,), (v.astype(jnp.float32),))
    with pytest.raises(ValueError, match=r"shape \(3, 1\), its argument \(3,\)"):
        jacobians.hvp(f, (x,), (v[:, None],))
    g = lambda d: jnp.sum(jnp.sin(d["a"]) * d["b"] ** 2)  # noqa: E731
    with pytest.raises(TypeError, match=r"tangents must have the structure of the differentiated arguments"):
        jacobians.hvp(g, ({"a": x, "b": x},), ({"a": v, "c": v},))
    np.testing.assert_allclose(jacobians.hvp(lambda s: jnp.sin(s) * s, (jnp.asarray(0.3),), (2.0,)),
                               jax.jvp(jax.grad(lambda s: jnp.sin(s) * s), (jnp.asarray(0.3),), (2.0,))[1])


def test_a_structured_program_xla_cannot_compile_gives_the_hvps(monkeypatch):
    # As jacobian's plans (test_trust): a structured Hessian sweep whose program XLA fails to build gives
    # way to JAX's HVPs, once, with a warning.
    # 128 wide: a structured sweep on every supported JAX (64 wide sat at the margin: JAX 0.8's jaxpr
    # costed the sweep a hair above 0.8 of the HVPs).
    W = jnp.asarray(np.random.default_rng(3).standard_normal((128, 128))) / 11.0

    def loss(x):
        return jnp.sum(jnp.tanh(W @ jnp.tanh(W @ x)) ** 2)

    x = jnp.linspace(-1.0, 1.0, 128)
    failed = failing_compile(monkeypatch)
    with jacobians.strict(False), pytest.warns(jacobians.PlanWarning, match="XLA failed to compile the structured"):
        got = jacobians.hessian(loss)(x)
    assert failed == [True]
    np.testing.assert_allclose(got, jax.hessian(loss)(x), rtol=1e-10)


class _Loss(NamedTuple):
    loss: jax.Array


CONTAINERS = {"dict": lambda s: {"loss": s}, "tuple": lambda s: (s,), "list": lambda s: [s], "namedtuple": _Loss}


@pytest.mark.parametrize("container", CONTAINERS)
def test_hessian_keeps_the_output_container(container, rng):
    # Bad-input hunt: a scalar returned in a container (a dict, a 1-tuple) lost it; jax.hessian keeps it
    # around the Hessian, with pytree inputs and argnums tuples alike.
    wrap = CONTAINERS[container]
    x, y = randn(rng, (2,)), randn(rng, (3,))
    f = lambda d: wrap(jnp.sum(d["a"] ** 3) * jnp.sum(jnp.sin(d["b"])))  # noqa: E731
    g = lambda a, b: wrap(jnp.sum(a**2) * b[0] + jnp.sum(jnp.cos(b)))  # noqa: E731
    p = {"a": x, "b": y}
    assert_tree_allclose(jacobians.hessian(f)(p), jax.jit(jax.hessian(f))(p))
    assert_tree_allclose(jacobians.hessian(g, (0, 1))(x, y), jax.jit(jax.hessian(g, (0, 1)))(x, y))


def test_value_grad_hessian_and_hvp_of_an_output_container(rng):
    # value_grad_and_hessian keeps the container around all three, as (fun(x), jax.jacrev(fun)(x),
    # jax.hessian(fun)(x)); hvp refuses it, as jax.jvp(jax.grad(fun)) does, in a message naming the call.
    x = randn(rng, (3,))
    f = lambda x: {"loss": jnp.sum(x**3)}  # noqa: E731
    want = jax.jit(lambda x: (f(x), jax.jacrev(f)(x), jax.hessian(f)(x)))(x)
    assert_tree_allclose(jacobians.value_grad_and_hessian(f)(x), want)
    h = lambda x: ({"loss": jnp.sum(jnp.sin(x))}, x[0])  # noqa: E731
    assert_tree_allclose(jacobians.hessian(h, has_aux=True)(x), jax.jit(jax.hessian(h, has_aux=True))(x))
    with pytest.raises(TypeError, match="Gradient only defined for scalar-output functions"):
        jax.jvp(jax.grad(f), (x,), (x,))
    for call in (lambda: jacobians.hvp(f, (x,), (x,)), lambda: jacobians.hvp(f, (x,), (x, x))):
        with pytest.raises(TypeError, match=r"jacobians.hvp: fun must return its scalar itself, but returns it in a "
                                            r"container, PyTreeDef\(\{'loss': \*\}\) \(as jax.jvp\(jax.grad\(fun\)\)"):
            call()


@pytest.mark.parametrize("x64", [True, False])
def test_second_derivatives_of_a_python_float_are_weakly_typed(x64):
    # Bad-input hunt: the Hessian and HVP of a Python float argument came back strongly typed; JAX's are weak
    # (float64 under x64, float32 without), the gradient and value of value_grad_and_hessian too.
    with jax.enable_x64(x64):
        f = lambda s: s**3  # noqa: E731
        dtype = jnp.float64 if x64 else jnp.float32

        def check(got, want):
            assert_tree_allclose(got, want)
            for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
                assert a.dtype == b.dtype == dtype and a.weak_type == b.weak_type, (a, b)

        H = jax.jit(jax.hessian(f))(2.0)  # (jit keeps weak types; eager jax.hessian compiles each primitive)
        check(jacobians.hessian(f)(2.0), H)
        check(jacobians.hvp(f, (2.0,), (1.5,)), jax.jit(lambda s, t: jax.jvp(jax.grad(f), (s,), (t,))[1])(2.0, 1.5))
        check(jacobians.value_grad_and_hessian(f)(2.0), (*jax.jit(jax.value_and_grad(f))(2.0), H))
        # Mixed: a block is weak where its row's argument is (the gradient's leaf it differentiates).
        g = lambda s, y: s**2 * jnp.sum(y**2)  # noqa: E731
        y = jnp.ones(2, dtype)
        check(jacobians.hessian(g, (0, 1))(2.0, y), jax.jit(jax.hessian(g, (0, 1)))(2.0, y))


def test_complex_output_of_real_inputs_is_a_clear_type_error(rng):
    # Bad-input hunt: jax.hessian refuses a complex scalar of real inputs; ours gave JAX's raw grad message
    # (sparse_hessian a PlanError calling it a defect). One TypeError naming the call, what it needs, the dtype.
    x = randn(rng, (3,))
    f = lambda x: jnp.sum(jax.lax.complex(x, x**2))  # noqa: E731
    with pytest.raises(TypeError, match="jacrev requires real-valued outputs"):
        jax.hessian(f)(x)
    need = r"fun must return a real scalar \(a real floating-point dtype\), but its output has dtype complex128"
    with pytest.raises(TypeError, match=rf"jacobians.hessian: {need}.*pass holomorphic=True"):
        jacobians.hessian(f)(x)
    with pytest.raises(TypeError, match=rf"jacobians.value_grad_and_hessian: {need}"):
        jacobians.value_grad_and_hessian(f)(x)
    with pytest.raises(TypeError, match=rf"jacobians.hvp: {need}"):
        jacobians.hvp(f, (x,), (x,))
    with pytest.raises(TypeError, match=rf"jacobians.sparse_hessian: {need}"):
        jacobians.sparse_hessian(f)(x)
