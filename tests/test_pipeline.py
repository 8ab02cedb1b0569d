"""The one argument pipeline: every transformation accepts and checks arguments the same way."""

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_tree_allclose, randn

import jacobians

# Every transformation built from a function of (x, *rest, **kwargs).
TRANSFORMS = {
    "jacobian": lambda f, **kw: jacobians.jacobian(f, **kw),
    "sparse_jacobian": lambda f, **kw: jacobians.sparse_jacobian(f, output="dense", **kw),
}


def _tree_fun(a, b, scale=1.0, *, flag="on"):
    out = {"p": jnp.sin(a["u"]) * b, "q": a["v"] ** 2 * scale}
    return out if flag == "on" else {"p": out["p"] * 0.0, "q": out["q"]}


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
@pytest.mark.parametrize("argnums", [0, 1, (0, 1), (1, 0)])
def test_pytrees_argnums_kwargs_statics_agree_with_jacfwd(name, argnums, rng):
    a = {"u": randn(rng, (3,)), "v": randn(rng, (2, 2))}
    b = randn(rng, (3,))
    got = TRANSFORMS[name](_tree_fun, argnums=argnums)(a, b, 2.0, flag="on")
    want = jax.jit(lambda a, b: jax.jacfwd(_tree_fun, argnums=argnums)(a, b, 2.0, flag="on"))(a, b)  # one compile
    assert_tree_allclose(got, want)


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_has_aux(name, rng):
    f = lambda x: (jnp.cumsum(x) ** 2, {"n": jnp.sum(x)})  # noqa: E731
    x = randn(rng, (4,))
    jac, aux = TRANSFORMS[name](f, has_aux=True)(x)
    want, want_aux = jax.jacfwd(f, has_aux=True)(x)
    assert_tree_allclose((jac, aux), (want, want_aux))


def test_static_values_keyed_by_type_and_sign(rng):
    calls = []

    def f(x, c):
        # Python branches on c: numbers fun needs as Python values are compiled in, keyed by type and bits.
        calls.append((type(c), c))
        if c == 0:
            return x * math.copysign(5.0, c)
        if isinstance(c, bool):
            return x * 3.0
        return x * (1.0 / c if isinstance(c, float) else 2.0)

    jf = jacobians.jacobian(f)
    x = randn(rng, (2,))
    results = [np.asarray(jf(x, c))[0, 0] for c in (1, 1.0, True, 0.5, -0.0, 0.0)]
    assert results[:4] == [2.0, 1.0, 3.0, 2.0]
    assert results[4] == -5.0 and results[5] == 5.0
    jf(x, float("nan"))
    n = len(calls)
    jf(x, float("nan"))
    assert len(calls) == n, "a NaN static argument must not recompile on every call"


def test_recompiling_for_changing_statics_warns_once(rng):
    # c drives Python control flow, so it is compiled in (a traced number would not recompile at all).
    jf = jacobians.jacobian(lambda x, c: x * c if c > 0 else -x)
    x = randn(rng, (2,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for c in range(1, 14):
            jf(x, float(c))
    msgs = [str(w.message) for w in caught if "recompiling" in str(w.message)]
    assert len(msgs) == 1
    assert "[0][1]" in msgs[0] and "jnp array" in msgs[0]


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_python_control_flow_explained(name, rng):
    def f(x):
        return x if x.sum() > 0 else -x

    with pytest.raises(TypeError, match=rf"jacobians.{name}: compiles fun \(as jax.jit does\) .* jnp.where"):
        TRANSFORMS[name](f)(randn(rng, (3,)))


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_errors_name_the_call(name, rng):
    x = randn(rng, (3,))
    with pytest.raises(TypeError, match=rf"jacobians.{name}: fun must be callable, got int"):
        TRANSFORMS[name](3)
    with pytest.raises(TypeError, match=rf"jacobians.{name}: argnums must be an int or a tuple of ints"):
        TRANSFORMS[name](jnp.sin, argnums=1.5)
    with pytest.raises(ValueError, match=rf"jacobians.{name}: argnums=2 but the function was called with 1"):
        TRANSFORMS[name](jnp.sin, argnums=2)(x)
    with pytest.raises(TypeError, match=rf"jacobians.{name}: has_aux must be True or False"):
        TRANSFORMS[name](jnp.sin, has_aux="yes")
    with pytest.raises(TypeError, match=rf"jacobians.{name}: fun must return arrays"):
        TRANSFORMS[name](lambda x: "abc")(x)
    # (where JAX names it: JAX < 0.10 says "output component call")
    with pytest.raises(TypeError, match=rf"jacobians.{name}: fun must return arrays .*its aux too .*got <class 'str'> "
                                        r"at output component (\[1\]\['b'\]|call)\.\n"):
        TRANSFORMS[name](lambda x: (jnp.sin(x), {"b": "abc"}), has_aux=True)(x)
    with pytest.raises(TypeError, match=rf"jacobians.{name}: .*argument 0 has dtype int"):
        TRANSFORMS[name](jnp.sin)(jnp.arange(3))


def test_no_retrace_on_repeat_calls(rng):
    for name, make in TRANSFORMS.items():
        count = []

        def f(x):
            count.append(1)
            return jnp.sin(x) * x[0]

        jf = make(f)
        x = randn(rng, (4,))
        jf(x)
        n = len(count)
        jf(x + 1.0)
        assert len(count) == n, name


def test_closed_over_arrays_are_arguments_of_the_program(rng):
    """A large array fun closes over is passed to the compiled program, not embedded in it (compile time)."""
    from jacobians import _hoist

    W = randn(rng, (128, 128))  # 128 KiB in float64: past HOIST_BYTES
    count = []

    def f(x):
        count.append(1)
        return jnp.tanh(W @ x)

    jf = jacobians.jacobian(f, mode="fwd")
    x = randn(rng, (128,))
    np.testing.assert_allclose(jf(x), jax.jacfwd(f)(x), rtol=1e-12)
    traces = len(count)
    np.testing.assert_allclose(jf(2.0 * x), jax.jacfwd(f)(2.0 * x), rtol=1e-12)
    assert len(count) == traces + 1  # jax.jacfwd's trace only: ours traced once
    (program,) = jf.transform.cache.values()  # the Hoisted program, called with (a copy of) W first
    lowered = program.lower(x).as_text()
    assert "tensor<128x128xf64>" in lowered.splitlines()[[k for k, line in enumerate(lowered.splitlines())
                                                          if "func.func public @main" in line][0]]
    assert not [line for line in lowered.splitlines() if "constant" in line and "128x128xf64" in line]
    hoisted = _hoist.Hoisted(lambda x: W @ x)
    np.testing.assert_allclose(hoisted(x), W @ x)
    assert len(hoisted._consts) == 1 and hoisted._found[0] is W and hoisted._consts[0] is not W  # a copy


def test_pytree_calls_skip_the_split_and_keep_its_meaning(rng):
    """Parameter pytrees of strong jax arrays take the split-free call; anything else still goes through the split."""
    count = []

    def net(p, x):
        count.append(1)
        return jnp.tanh(p["w"] @ x + p["b"]) * p["s"]

    params = {"w": randn(rng, (3, 4)), "b": randn(rng, (3,)), "s": randn(rng, ())}
    x = randn(rng, (4,))
    jf = jacobians.jacobian(net)
    assert_tree_allclose(jf(params, x), jax.jacrev(net)(params, x))
    n = len(count)
    params2 = jax.tree_util.tree_map(lambda a: a + 1.0, params)
    assert_tree_allclose(jf(params2, x), jax.jacrev(net)(params2, x))
    assert len(count) == n + 1, "a new value of the same structure does not retrace (+1: jax.jacrev's own)"
    # A weakly typed leaf, a Python number and a new structure: the split decides as before.
    weak = dict(params, s=jnp.asarray(2.0))
    assert weak["s"].weak_type
    assert_tree_allclose(jf(weak, x), jax.jacrev(net)(weak, x))
    fresh = jacobians.jacobian(net)(weak, x)  # the split's answer, never through the structure's fast call
    got = jf(weak, x)
    assert jax.tree_util.tree_map(lambda a: (a.dtype, a.weak_type), got) == jax.tree_util.tree_map(
        lambda a: (a.dtype, a.weak_type), fresh)
    assert_tree_allclose(jf(dict(params, s=2.0), x), jax.jacrev(net)(dict(params, s=2.0), x))
    assert_tree_allclose(jf(params, x), jax.jacrev(net)(params, x))


def test_sparse_plan_round_trip(tmp_path, rng):
    def f(x):
        return x[1:] * x[:-1] + jnp.sin(x[1:])

    x = randn(rng, (9,))
    sj = jacobians.sparse_jacobian(f, output="dense")
    plan = sj.plan(x)
    assert plan.mode in ("fwd", "rev") and plan.n_colors == 2
    path = tmp_path / "plan.npz"
    plan.save(path)
    loaded = jacobians.SparsePlan.load(path)
    assert loaded.pattern == plan.pattern and loaded.n_colors == plan.n_colors
    np.testing.assert_array_equal(loaded.colors, plan.colors)

    traces = []

    def g(x):
        traces.append(1)
        return f(x)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = jacobians.sparse_jacobian(g, sparsity=loaded, output="dense")(x)
    # No detection, no colouring: one trace for the plan's certificate (checked against JAX once), one to evaluate.
    assert len(traces) == 2, "a given plan must need no detection"
    np.testing.assert_allclose(got, jax.jacfwd(f)(x), rtol=1e-13)
    with pytest.raises(ValueError, match=r"plan is for a Jacobian of flat shape \(8, 9\), but this call's is \(9, 10\)"):
        jacobians.sparse_jacobian(f, sparsity=loaded)(randn(rng, (10,)))


def test_sparse_pytree_blocks_are_bcoo(rng):
    a, b = randn(rng, (4,)), randn(rng, (4,))
    f = lambda a, b: (a * b, jnp.cumsum(b))  # noqa: E731
    got = jacobians.sparse_jacobian(f, argnums=(0, 1))(a, b)
    want = jax.jacfwd(f, argnums=(0, 1))(a, b)
    for g, w in zip(jax.tree_util.tree_leaves(got, is_leaf=lambda z: hasattr(z, "todense")),
                    jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(g.todense(), w, rtol=1e-13)


def test_weak_types_follow_jax():
    for make in (jacobians.jacobian, jax.jacfwd):
        j = make(lambda x: x * 2.0)(1.0)
        assert j.weak_type and (j * jnp.float32(1)).dtype == jnp.float32
    assert not jacobians.jacobian(lambda x: x * 2.0)(jnp.ones(2)).weak_type
    # The sparse engine's dense result too: weakly typed where jax.jacfwd's is (a Python float in and out).
    f = lambda x: jnp.stack([x, x**2])  # noqa: E731
    got, want = jacobians.sparse_jacobian(f, output="dense")(2.0), jax.jacfwd(f)(2.0)
    assert (got.dtype, got.weak_type) == (want.dtype, want.weak_type) and want.weak_type
    g = lambda x, y: jnp.stack([x * y, x**2])  # noqa: E731
    args = (2.0, jnp.float64(3.0))
    got, want = jacobians.sparse_jacobian(g, (0, 1), output="dense")(*args), jax.jacfwd(g, (0, 1))(*args)
    assert [a.weak_type for a in got] == [a.weak_type for a in want]


def test_real_function_of_complex_inputs_matches_jacrev(rng):
    f = lambda z: jnp.abs(z) ** 2 + jnp.real(z[::-1] * z)  # noqa: E731
    z = jnp.asarray(rng.standard_normal(3) + 1j * rng.standard_normal(3))
    assert_tree_allclose(jacobians.jacobian(f)(z), jax.jacrev(f)(z))
    assert_tree_allclose(jacobians.jacobian(f, mode="rev")(z), jax.jacrev(f)(z))
    with pytest.raises(TypeError, match=r"for a real-valued function of complex inputs use reverse mode"):
        jacobians.jacobian(f, mode="fwd")(z)
    with pytest.raises(TypeError, match=r"complex inputs \(complex128\) and complex outputs \(complex128\); pass holomorphic=True"):
        jacobians.jacobian(lambda z: z * jnp.conj(z))(z)


@pytest.mark.parametrize("mode", ["fwd", "rev"])
def test_check_finds_a_missed_entry(mode, rng):
    from registry import stencil_1d

    x = randn(rng, (9,))
    pattern = jacobians.sparsity(stencil_1d, x).to_dense()
    ok = jacobians.sparse_jacobian(stencil_1d, sparsity=pattern, check=True, mode=mode)(x)
    np.testing.assert_allclose(ok.todense(), jax.jacfwd(stencil_1d)(x), rtol=1e-13)
    pattern[3, 4] = False
    with pytest.raises(ValueError, match=r"pattern misses entry \(row 3, column 4\) of the flat Jacobian"):
        jacobians.sparse_jacobian(stencil_1d, sparsity=pattern, check=True, mode=mode)(x)


def test_into_reuses_the_donated_result(rng):
    """``.into(out, *args)`` writes the next result where a previous one was (donated), and checks ``out``."""
    params = {"w": randn(rng, (4, 3)), "b": randn(rng, (4,))}
    f = lambda p, x: jnp.tanh(p["w"] @ x + p["b"])  # noqa: E731
    jf = jacobians.jacobian(f)
    x1, x2 = randn(rng, (3,)), randn(rng, (3,))
    first = jf.into(None, params, x1)  # the first call of a structure runs as usual (out is not read)
    assert_tree_allclose(first, jax.jacrev(f)(params, x1))
    where = first["w"].unsafe_buffer_pointer()
    second = jf.into(first, params, x2)
    assert_tree_allclose(second, jax.jacrev(f)(params, x2))
    assert first["w"].is_deleted() and second["w"].unsafe_buffer_pointer() == where
    with pytest.raises(ValueError, match=r"jacobians.jacobian: out must be a result of this call .*float64\[4, 4\]"):
        jf.into({"w": jnp.zeros((4, 4, 3)), "b": jnp.zeros((4, 3))}, params, x2)
    with pytest.raises(ValueError, match="jacobians.jacobian: out must be a result"):
        jf.into(second["w"], params, x2)
    for h in (jacobians.hessian(lambda x: jnp.sum(jnp.sin(x) ** 3)),
              jacobians.hessian(lambda x: jnp.sum(jnp.sin(x) ** 3), max_memory="1MB")):  # the chosen chunk's
        H = h(x1)
        np.testing.assert_allclose(h.into(H, x2), jax.hessian(lambda x: jnp.sum(jnp.sin(x) ** 3))(x2), rtol=1e-12)
        assert H.is_deleted()


def test_into_a_deleted_out_says_so(rng):
    jf = jacobians.jacobian(lambda p: jnp.sin(p["w"]))
    p = {"w": randn(rng, (3,))}
    out = jf(p)
    out["w"].delete()
    with pytest.raises(ValueError, match=r"jacobians.jacobian: \.into\(out, \.\.\.\) writes into out's buffers, "
                                         r"but out\['w'\] \(float64\[3, 3\]\) has been deleted \(donated"):
        jf.into(out, p)
    fresh = jf(p)
    jf.into(fresh, p)  # fresh is donated: passing it again is the same mistake
    if fresh["w"].is_deleted():
        with pytest.raises(ValueError, match=r"out\['w'\] \(float64\[3, 3\]\) has been deleted"):
            jf.into(fresh, p)


def test_into_an_out_that_is_also_an_argument_says_so(rng):
    # The donated buffer would be read as the input while it is overwritten: XLA refused with its own
    # INVALID_ARGUMENT ("previously donated") and an error log line.
    hd = jacobians.hessian_diagonal(lambda x: jnp.sum(jnp.sin(x) ** 2))
    x = randn(rng, (3,))
    out = hd(x)
    with pytest.raises(ValueError, match=r"jacobians.hessian_diagonal: \.into\(out, \.\.\.\) writes into out's "
                                         r"buffers, but out's leaf 0 is also an argument of the call"):
        hd.into(out, out)
    assert not out.is_deleted()
    np.testing.assert_allclose(hd.into(out, x), jnp.diag(jax.hessian(lambda x: jnp.sum(jnp.sin(x) ** 2))(x)))


def test_non_arrays_and_integers_are_named_by_the_call(rng):
    x = randn(rng, (3,))
    for jit in (True, False):  # gradcheck reports a bad output as a failed check (as a tuple's), not NaN steps
        res = jacobians.gradcheck(lambda x: jnp.round(x).astype(int), x, jit=jit)
        assert res.status == "failed" and "fun must return a floating-point array, got dtype int" in res.problem
        res = jacobians.gradcheck(lambda x: "a", x, jit=jit)
        assert res.status == "failed" and "fun must return a single array" in res.problem
    with pytest.raises(TypeError, match=r"jacobians.batch_jacobian: fun must return arrays"):
        jacobians.batch_jacobian(lambda X: "s")(randn(rng, (2, 3)))
    for call in (lambda: jacobians.layout.to_matrix(None, 1), lambda: jacobians.layout.vec({"a": 1}),
                 lambda: jacobians.contract.matvec(None, x)):
        with pytest.raises(TypeError, match=r"jacobians\.(layout|contract)\.\w+: \w+ must be an array, got "):
            call()
    with pytest.raises(ValueError, match=r"jacobians.log_abs_det: batched=True needs one batch size.*\[3, 4\]"):
        jacobians.log_abs_det(lambda a, b: a * b, argnums=(0, 1), batched=True)(randn(rng, (3, 2)),
                                                                               randn(rng, (4, 2)))
    with pytest.raises(jacobians.CoupledBatchError, match=r"log_abs_det\(f_single, batched=True\)"):
        jacobians.log_abs_det(lambda X: jnp.tanh(X - X.mean(0, keepdims=True)), batch_first=True)(randn(rng, (3, 2)))
    sign, _ = jacobians.slogdet(lambda x: x * x)(jnp.asarray([0.0, 1.0, -2.0, 0.5]))
    assert sign == 0 and not np.signbit(sign)  # +0, not the -0 of a product with -1


def test_new_shapes_of_a_compiled_structure_plan_and_check_again(rng):
    """The dispatch fast path keys on argument types: a new shape retraces, plans and certifies its own plan."""
    f = lambda x: jnp.sin(x) * x + x[::-1] ** 2  # noqa: E731
    jf = jacobians.jacobian(f)
    for n in (12, 20, 20, 32):
        x = randn(rng, (n,))
        np.testing.assert_allclose(jf(x), jax.jacfwd(f)(x), rtol=1e-12, atol=1e-12)
        plan = jf.plan(x)
        assert plan.method == "compressed" and not plan.certificate.failed, plan


def test_numbers_fast_path_never_replays_the_first_call(rng):
    """A structure with a traced Python number: a later call that fails must fail, not return the first result."""
    f = lambda x, s: jnp.sin(x.reshape(2, -1)).ravel() * s  # noqa: E731
    jf = jacobians.jacobian(f)
    x4 = randn(rng, (4,))
    np.testing.assert_allclose(jf(x4, 2.0), jax.jacfwd(f)(x4, 2.0), rtol=1e-12)
    np.testing.assert_allclose(jf(x4, 2.5), jax.jacfwd(f)(x4, 2.5), rtol=1e-12)
    with pytest.raises(TypeError, match="reshape"):
        jf(randn(rng, (5,)), 3.0)
    np.testing.assert_allclose(jf(x4, 5.0), jax.jacfwd(f)(x4, 5.0), rtol=1e-12)


def test_closed_over_arrays_may_be_donated_after_the_first_call(rng):
    """As jax.jit, the program keeps the values it was traced with: donating the user's array breaks nothing."""
    W = randn(rng, (128, 128))
    x = randn(rng, (128,))
    f = lambda x: jnp.tanh(W @ x)  # noqa: E731
    jf = jacobians.jacobian(f, mode="fwd")
    want = jax.jacfwd(f)(x)
    np.testing.assert_allclose(jf(x), want, rtol=1e-12)
    jax.jit(lambda w: w * 2.0, donate_argnums=0)(W)  # W's buffer is gone (on backends that donate)
    np.testing.assert_allclose(jf(x), want, rtol=1e-12)


_FIRST_UNDER_JIT = ["jacobian", "sparse_jacobian", "hessian", "sparse_hessian", "hvp", "batch_jacobian", "divergence",
                    "laplacian", "hessian_diagonal", "log_abs_det"]


@pytest.mark.parametrize("which", _FIRST_UNDER_JIT)
def test_first_traced_under_jit_then_called_directly(rng, which):
    """A first call inside jax.jit copies the closed-over arrays eagerly: a later direct call found a leaked tracer.

    Every transformation crashed so (UnexpectedTracerError): the copies kept for the direct calls were
    staged ``device_put`` s of the caller's trace.
    """
    W = randn(rng, (128, 128)) / 11  # past HOIST_BYTES: hoisted
    x, v, X = randn(rng, (128,)), randn(rng, (128,)), randn(rng, (3, 128))
    vec = lambda x: jnp.tanh(W @ x) + x  # noqa: E731
    sca = lambda x: jnp.sum(jnp.tanh(W @ x) ** 2)  # noqa: E731
    arg = X if which == "batch_jacobian" else x
    ours, want = {
        "jacobian": lambda: (jacobians.jacobian(vec), jax.jacfwd(vec)(x)),
        "sparse_jacobian": lambda: (jacobians.sparse_jacobian(vec, output="dense"), jax.jacfwd(vec)(x)),
        "hessian": lambda: (jacobians.hessian(sca), jax.hessian(sca)(x)),
        "sparse_hessian": lambda: (jacobians.sparse_hessian(sca, output="dense"), jax.hessian(sca)(x)),
        "hvp": lambda: ((lambda x: jacobians.hvp(sca, (x,), (v,))), jax.jvp(jax.grad(sca), (x,), (v,))[1]),
        "batch_jacobian": lambda: (jacobians.batch_jacobian(lambda X: jnp.tanh(X @ W.T)),
                                   jax.vmap(jax.jacfwd(lambda x: jnp.tanh(W @ x)))(X)),
        "divergence": lambda: (jacobians.divergence(vec), jnp.trace(jax.jacfwd(vec)(x))),
        "laplacian": lambda: (jacobians.laplacian(sca), jnp.trace(jax.hessian(sca)(x))),
        "hessian_diagonal": lambda: (jacobians.hessian_diagonal(sca), jnp.diag(jax.hessian(sca)(x))),
        "log_abs_det": lambda: (jacobians.log_abs_det(vec), jnp.linalg.slogdet(jax.jacfwd(vec)(x))[1]),
    }[which]()
    np.testing.assert_allclose(jax.jit(ours)(arg), want, rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(ours(arg), want, rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(ours(arg), want, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("which", ["jacobian", "hessian", "divergence", "laplacian"])
def test_a_weakly_typed_first_call_leaves_later_calls_their_types(rng, which):
    """The split-free call is keyed by argument types: a weak array's spec served later strong arrays.

    A float32 input then came back float64 (weak), a float64 one float32 where fun has a float32 constant.
    """
    make, reference = {
        "jacobian": (jacobians.jacobian, jax.jacfwd),
        "hessian": (jacobians.hessian, jax.hessian),
        "divergence": (jacobians.divergence, lambda f: lambda x: jnp.trace(jax.jacfwd(f)(x))),
        "laplacian": (jacobians.laplacian, lambda f: lambda x: jnp.trace(jax.hessian(f)(x))),
    }[which]
    vec = which in ("jacobian", "divergence")
    f = (lambda x: jnp.sin(x) * x**2) if vec else (lambda x: jnp.sum(jnp.sin(x) * x**2))
    ours = make(f)
    weak = jax.lax.broadcast(jnp.asarray(0.5), (2,)).at[1].set(-0.3)  # weakly typed float64
    strong = randn(rng, (2,)).astype(np.float32)
    for x in (weak, strong, weak, strong):
        got, want = ours(x), reference(f)(x)
        assert (got.dtype, got.weak_type) == (want.dtype, want.weak_type), (x.weak_type, got.dtype, want.dtype)
        tol = 1e-12 if want.dtype == np.float64 else 1e-5
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


def test_disable_jit_runs_the_planned_method_and_its_check(rng):
    W = randn(rng, (40, 40))
    f = lambda x: jnp.tanh(W @ x) * x[::-1]  # noqa: E731
    x = randn(rng, (40,))
    with jax.disable_jit():  # strict mode (the suite's): a failed or crashed certificate would raise
        got = jacobians.jacobian(f)(x)
    np.testing.assert_allclose(got, jax.jacfwd(f)(x), rtol=1e-12, atol=1e-14)


def test_typed_prng_keys_ride_along(rng):
    # jax.random.key's extended dtype in the plan caches' keys: every transformation crashed on it.
    x, key = randn(rng, (3,)), jax.random.key(int(rng.integers(1 << 30)))

    def f(x, k):
        return x * jax.random.normal(k, (3,), x.dtype) + jnp.sin(x[::-1])

    J = jax.jacfwd(f)(x, key)
    np.testing.assert_allclose(jacobians.jacobian(f)(x, key), J, rtol=1e-12)
    np.testing.assert_allclose(jacobians.sparse_jacobian(f, output="dense")(x, key), J, rtol=1e-12)
    np.testing.assert_allclose(jacobians.log_abs_det(f)(x, key), np.linalg.slogdet(J)[1], rtol=1e-12)

    def g(x, k):
        return jnp.sum(f(x, k) ** 2)

    np.testing.assert_allclose(jacobians.hessian(g)(x, key), jax.hessian(g)(x, key), rtol=1e-10)
    np.testing.assert_allclose(jacobians.laplacian(g)(x, key), jnp.trace(jax.hessian(g)(x, key)), rtol=1e-10)
    xs = jnp.stack([x, x**2])
    np.testing.assert_allclose(jacobians.batch_jacobian(lambda X, k: jax.vmap(lambda v: f(v, k))(X))(xs, key),
                               jax.vmap(lambda v: jax.jacfwd(f)(v, key))(xs), rtol=1e-12)


@pytest.mark.parametrize("mode", ["auto", "fwd", "rev"])
def test_mixed_precision_blocks_promote(mode, rng):
    # The documented rule, whatever the plan: d(out)/d(in) has dtype promote(out.dtype, in.dtype). JAX's own
    # pytree program (taken for one dtype throughout) gave jacfwd's output dtype or jacrev's input dtype.
    x32 = randn(rng, (3,), jnp.float32)
    up = jacobians.jacobian(lambda x: x.astype(jnp.float64) ** 2, mode=mode)(x32)
    down = jacobians.jacobian(lambda x: (x**2).astype(jnp.float32), mode=mode)(x32.astype(jnp.float64))
    assert up.dtype == down.dtype == jnp.float64
    np.testing.assert_allclose(up, np.diag(2 * np.asarray(x32, np.float64)), rtol=1e-12)
    p = {"a": x32[:2], "b": randn(rng, (3,))}
    got = jacobians.jacobian(lambda p: {"u": jnp.sum(p["a"]).astype(jnp.float64) * p["b"], "v": p["a"] ** 2}, mode=mode)(p)
    dtypes = jax.tree_util.tree_map(lambda a: a.dtype, got)
    assert dtypes == {"u": {"a": jnp.float64, "b": jnp.float64}, "v": {"a": jnp.float32, "b": jnp.float64}}


def test_complex_input_errors_offer_only_the_call_s_own_options():
    z = jnp.arange(3.0).astype(jnp.complex128)
    with pytest.raises(TypeError, match=r"jacobians.log_abs_det: .*complex128. Pass its real and imaginary parts"):
        jacobians.log_abs_det(jnp.sin)(z)
    with pytest.raises(TypeError, match=r"jacobians.hessian: .*complex128. For a holomorphic function pass "
                                        r"holomorphic=True.\n"):
        jacobians.hessian(lambda z: jnp.sum(z**2))(z)
    with pytest.raises(ValueError, match=r"jacobians.jacobian: method='compressed' takes real inputs"):
        jacobians.jacobian(jnp.sin, holomorphic=True, method="compressed")
    for mode in ("auto", "rev"):  # a real-valued function of complex inputs: the dense method, not another mode
        with pytest.raises(TypeError, match=r"jacobians.jacobian: method='compressed' takes real inputs.*complex128"
                                            r".*use method='dense' or 'auto'"):
            jacobians.jacobian(lambda z: jnp.abs(z) ** 2, method="compressed", mode=mode)(z + 1j)


def test_a_forced_mode_jax_cannot_take_is_named_by_every_engine(rng):
    """divergence, batch_jacobian, hessian, hvp and a structured jacobian in a mode JAX cannot differentiate fun in: a DirectionError that
    names the call and the mode (as jacobian's), not JAX's bare error; ``"auto"`` takes the other way."""

    @jax.custom_vjp
    def cube(x):
        return x ** 3

    cube.defvjp(lambda x: (x ** 3, x), lambda x, g: (3 * x ** 2 * g,))

    def loop(x):
        return jax.lax.while_loop(lambda c: c[1] < 2, lambda c: (jnp.sin(c[0]) * x, c[1] + 1), (x, 0))[0]

    x = randn(rng, (3,))
    cases = [(lambda: jacobians.divergence(cube, mode="fwd")(x), "divergence: mode='fwd'"),
             (lambda: jacobians.divergence(loop, mode="rev")(x), "divergence: mode='rev'"),
             (lambda: jacobians.batch_jacobian(cube, mode="fwd")(x[:, None]), "batch_jacobian: mode='fwd'"),
             (lambda: jacobians.batch_jacobian(loop, mode="rev")(x[:, None]), "batch_jacobian: mode='rev'"),
             (lambda: jacobians.hessian(lambda z: jnp.sum(loop(z)), mode="rev_rev")(x), "hessian: mode='rev_rev'"),
             (lambda: jacobians.hvp(lambda z: jnp.sum(loop(z)), (x,), (x,), mode="fwd_rev"), "hvp: mode='fwd_rev'"),
             (lambda: jacobians.jacobian(loop, method="structured", mode="rev")(x), "jacobian: mode='rev'")]
    try:
        jax.jacrev(jax.grad(lambda z: jnp.sum(loop(z))))(x)
    except Exception as e:  # noqa: BLE001 - JAX < 0.10 fails inside its transpose, without naming the while_loop
        if "Reverse-mode differentiation does not work for lax.while_loop" not in str(e):
            cases = [c for c in cases if "rev" not in c[1]]
    for run, said in cases:
        with pytest.raises(jacobians._args.DirectionError, match=f"jacobians.{said}"):
            run()
    np.testing.assert_allclose(jacobians.divergence(loop)(x), jnp.trace(jax.jacfwd(loop)(x)), rtol=1e-12)


def test_an_empty_differentiated_argument_has_empty_blocks(rng):
    # As jax.jacfwd and jax.hessian: an argument with no leaves ({}, [], None) gets its own empty structure.
    x = randn(rng, (3,))
    f = lambda d, y: jnp.sin(y) * 2  # noqa: E731
    g = lambda d, y: jnp.sum(jnp.sin(y) ** 2)  # noqa: E731
    for empty in ({}, [], None):
        got = jacobians.jacobian(f, argnums=(0, 1))(empty, x)
        want = jax.jacfwd(f, argnums=(0, 1))(empty, x)
        assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
        assert_tree_allclose(got, want)
    assert_tree_allclose(jacobians.hessian(g, argnums=(0, 1))({}, x), jax.hessian(g, argnums=(0, 1))({}, x))
    _, (_, want) = jax.hessian(g, argnums=(0, 1))({}, x)
    np.testing.assert_allclose(jacobians.laplacian(g, argnums=(0, 1))({}, x), np.trace(want), rtol=1e-12)
