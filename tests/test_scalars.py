"""Python numbers as arguments and outputs: traced weakly typed as ``jax.jit`` does, never compiled per value.

A Python ``int``/``float``/``complex`` that is not differentiated is traced as a
weakly typed scalar: a new value neither re-traces ``fun`` nor recompiles, and
``x * t`` keeps ``x``'s float32 (the suite runs with x64 and strict promotion,
so a strongly typed ``t`` would raise). Numbers that ``fun`` needs as Python
values, bools and other hashables are compiled in. A Python number among the
outputs is a constant with a zero Jacobian block.
"""

import enum
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jacobians

# --- counting traces and compilations ------------------------------------------------------------

_EVENTS: list = []
_COUNTED = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/backend_compile_duration")
jax.monitoring.register_event_duration_secs_listener(
    lambda name, *a, **k: _EVENTS.append(name) if name in _COUNTED else None
)


class Counter:
    """Traces of ``fun`` (it calls :meth:`tick`) and JAX traces/compilations inside ``with counter:``."""

    def __init__(self):
        self.calls = 0
        self.jax_events = 0

    def tick(self):
        self.calls += 1

    def __enter__(self):
        self._calls, self._events = self.calls, len(_EVENTS)
        return self

    def __exit__(self, *exc):
        self.new_calls = self.calls - self._calls
        self.new_events = len(_EVENTS) - self._events


# --- functions with analytic derivatives (NumPy references: no JAX compile for them) --------------

X = np.array([0.3, -0.7, 1.1])
XS = np.array([[0.3, -0.7, 1.1], [0.5, 0.2, -0.4], [-1.2, 0.8, 0.6], [0.1, -0.3, 0.9]])
V = np.array([1.0, 2.0, -0.5])
T1, T2 = 0.5, -1.75


def _vec(count, x, t):  # R^3 -> R^3
    count.tick()
    return jnp.sin(x) * t + jnp.cumsum(x) ** 2 * 0.5


def _vec_jac(x, t):
    c = np.cumsum(x)
    return np.diag(t * np.cos(x)) + np.tril(np.repeat(c[:, None], x.size, axis=1))


def _scal(count, x, t):
    count.tick()
    return jnp.sum(jnp.sin(x) * t) + jnp.sum(x**3) * 0.25


def _scal_grad(x, t):
    return t * np.cos(x) + 0.75 * x**2


def _scal_hess(x, t):
    return np.diag(-t * np.sin(x) + 1.5 * x)


def _elem(count, x, t):  # elementwise: per-example and diagonal Jacobians
    count.tick()
    return jnp.tanh(x) * t + x**2


def _elem_diag(x, t):
    return t * (1 - np.tanh(x) ** 2) + 2 * x


def _gn(x, t):
    j = _vec_jac(x, t)
    return j.T @ j


def _case(name):
    """``(call(t), reference(t))`` for a transformation built once, with a fresh trace counter."""
    count = Counter()
    vec, scal, elem = (functools.partial(f, count) for f in (_vec, _scal, _elem))
    x, xs, v = (jnp.asarray(a, jnp.float32) for a in (X, XS, V))
    key = jax.random.key(0)
    sl = np.linalg.slogdet
    cases = {
        "jacobian": (jacobians.jacobian(vec), lambda g, t: g(x, t), lambda t: _vec_jac(X, t)),
        "jacobian_fwd": (jacobians.jacobian(vec, mode="fwd"), lambda g, t: g(x, t), lambda t: _vec_jac(X, t)),
        "jacobian_rev": (jacobians.jacobian(vec, mode="rev"), lambda g, t: g(x, t), lambda t: _vec_jac(X, t)),
        "jacobian_structured": (jacobians.jacobian(vec, method="structured"), lambda g, t: g(x, t),
                                lambda t: _vec_jac(X, t)),
        "jacobian_compressed": (jacobians.jacobian(elem, method="compressed"), lambda g, t: g(x, t),
                                lambda t: np.diag(_elem_diag(X, t))),
        "jacobian_matrix": (jacobians.jacobian_matrix(vec, order="F"), lambda g, t: g(x, t), lambda t: _vec_jac(X, t)),
        "value_and_jacobian": (jacobians.value_and_jacobian(vec), lambda g, t: g(x, t),
                               lambda t: (np.sin(X) * t + np.cumsum(X) ** 2 * 0.5, _vec_jac(X, t))),
        "hessian": (jacobians.hessian(scal), lambda g, t: g(x, t), lambda t: _scal_hess(X, t)),
        "value_grad_and_hessian": (jacobians.value_grad_and_hessian(scal), lambda g, t: g(x, t),
                                   lambda t: (np.sum(np.sin(X) * t) + np.sum(X**3) / 4, _scal_grad(X, t),
                                              _scal_hess(X, t))),
        "hvp": (scal, lambda g, t: jacobians.hvp(g, (x, t), (v,)), lambda t: _scal_hess(X, t) @ V),
        "sparse_jacobian": (jacobians.sparse_jacobian(vec, output="dense"), lambda g, t: g(x, t),
                            lambda t: _vec_jac(X, t)),
        "sparse_jacobian_check": (jacobians.sparse_jacobian(vec, output="dense", check=True), lambda g, t: g(x, t),
                                  lambda t: _vec_jac(X, t)),
        "sparse_hessian": (jacobians.sparse_hessian(scal, output="dense"), lambda g, t: g(x, t),
                           lambda t: _scal_hess(X, t)),
        "batch_jacobian": (jacobians.batch_jacobian(elem), lambda g, t: g(xs, t),
                           lambda t: np.stack([np.diag(d) for d in _elem_diag(XS, t)])),
        "divergence": (jacobians.divergence(vec), lambda g, t: g(x, t), lambda t: np.trace(_vec_jac(X, t))),
        # Diagonal Jacobian: Rademacher probes give the trace exactly (z_i^2 = 1).
        "trace_estimate": (jacobians.trace_estimate(elem, num_probes=3), lambda g, t: g(x, t, key=key)[0],
                           lambda t: np.sum(_elem_diag(X, t))),
        "det": (jacobians.det(vec), lambda g, t: g(x, t), lambda t: np.linalg.det(_vec_jac(X, t))),
        "slogdet": (jacobians.slogdet(vec), lambda g, t: g(x, t), lambda t: tuple(sl(_vec_jac(X, t)))),
        "log_abs_det": (jacobians.log_abs_det(vec), lambda g, t: g(x, t), lambda t: sl(_vec_jac(X, t))[1]),
        "det_batched": (jacobians.det(elem, batched=True), lambda g, t: g(xs, t),
                        lambda t: np.prod(_elem_diag(XS, t), axis=1)),
        "det_batched_coupled": (jacobians.det(vec, batched=True), lambda g, t: g(xs, t),
                                lambda t: np.array([np.linalg.det(_vec_jac(r, t)) for r in XS])),
        "log_abs_det_batch_first": (jacobians.log_abs_det(elem, batch_first=True), lambda g, t: g(xs, t),
                                    lambda t: np.sum(np.log(np.abs(_elem_diag(XS, t))), axis=1)),
        "log_volume": (jacobians.log_volume(vec), lambda g, t: g(x, t), lambda t: sl(_vec_jac(X, t))[1]),
        "gauss_newton_mv": (jacobians.gauss_newton(vec), lambda g, t: g(x, t).mv(v), lambda t: _gn(X, t) @ V),
        "gauss_newton_diagonal": (jacobians.gauss_newton(vec), lambda g, t: g(x, t).diagonal(),
                                  lambda t: np.diag(_gn(X, t))),
        "gauss_newton_materialise": (jacobians.gauss_newton(vec), lambda g, t: g(x, t).materialise(),
                                     lambda t: _gn(X, t)),
    }
    g, call, ref = cases[name]
    return count, (lambda t: call(g, t)), ref


CASES = [
    "jacobian", "jacobian_fwd", "jacobian_rev", "jacobian_structured", "jacobian_compressed", "jacobian_matrix",
    "value_and_jacobian", "hessian", "value_grad_and_hessian", "hvp", "sparse_jacobian", "sparse_jacobian_check",
    "sparse_hessian", "batch_jacobian", "divergence", "trace_estimate", "det", "slogdet", "log_abs_det",
    "det_batched", "det_batched_coupled",  # coupled: fun (cumsum) fails on the whole batch, only per example
    "log_abs_det_batch_first", "log_volume", "gauss_newton_mv", "gauss_newton_diagonal", "gauss_newton_materialise",
]


def _check(got, want):
    got_leaves, want_leaves = jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)
    assert len(got_leaves) == len(want_leaves)
    for g, w in zip(got_leaves, want_leaves, strict=True):
        assert g.dtype == np.float32, "a weakly typed Python float must not promote float32 inputs"
        np.testing.assert_allclose(np.asarray(g, np.float64), w, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("name", CASES)
def test_a_new_float_neither_retraces_nor_recompiles(name):
    count, call, ref = _case(name)
    _check(call(T1), ref(T1))
    assert count.calls > 0
    with count:
        got = call(T2)
    _check(got, ref(T2))
    assert count.new_calls == 0, f"{name}: fun was traced again for a new float"
    assert count.new_events == 0, f"{name}: JAX traced or compiled again for a new float"


def test_float32_stays_float32_and_matches_jacfwd():
    # Strict promotion: a strongly typed float64 t would raise on x * t.
    f = lambda x, t: jnp.sin(x * t) + t  # noqa: E731
    x = jnp.asarray(X, jnp.float32)
    got = jacobians.jacobian(f)(x, 0.25)
    want = jax.jit(jax.jacfwd(f))(x, 0.25)
    assert got.dtype == want.dtype == jnp.float32 and not got.weak_type
    np.testing.assert_allclose(got, want, rtol=1e-6)
    x64 = jnp.asarray(X)
    assert jacobians.jacobian(f)(x64, 0.25).dtype == jnp.float64


def test_without_x64_a_float_is_a_weak_float32():
    count = Counter()

    def f(x, t):
        count.tick()
        return jnp.sin(x) * t

    with jax.enable_x64(False):
        jf = jacobians.jacobian(f)
        x = jnp.asarray(X, jnp.float32)
        jf(x, 0.5)
        with count:
            got = jf(x, 1.25)
        assert got.dtype == jnp.float32 and count.new_calls == 0
        np.testing.assert_allclose(got, np.diag(np.cos(X) * 1.25), rtol=1e-6)


def test_kwargs_nested_ints_and_complex_are_traced():
    count = Counter()

    def f(x, params, *, scale):
        count.tick()
        return jnp.real(x.astype(jnp.complex128) * params["c"]) * params["k"] * scale

    jf = jacobians.jacobian(f)
    x = jnp.asarray(X)
    for k, c, scale in ((2, 1 + 1j, 0.5), (3, 2 - 1j, 1.5)):
        with count:
            got = jf(x, {"k": k, "c": c}, scale=scale)
        np.testing.assert_allclose(got, np.diag(np.full(3, k * c.real * scale)), rtol=1e-12)
    assert count.new_calls == 0


def test_python_type_is_part_of_the_key():
    count = Counter()

    def f(x, n):
        count.tick()
        return x * n

    jf = jacobians.jacobian(f)
    x = jnp.asarray(X)
    jf(x, 2.0)
    with count:
        got = jf(x, 3)  # an int: a weakly typed int32/int64, its own compiled function
    assert count.new_calls > 0
    np.testing.assert_allclose(got, 3 * np.eye(3))
    with count:
        got = jf(x, 4)
    assert count.new_calls == 0
    np.testing.assert_allclose(got, 4 * np.eye(3))


def test_numbers_used_as_python_values_are_compiled_in():
    # A shape, a slice bound and Python control flow need the value: those structures compile it in.
    def head(x, n):
        return jnp.sin(x[:n]) * 2.0

    def branch(x, t):
        return x * t if t > 0 else -(x**2)

    def loop(x, n):
        for _ in range(n):
            x = jnp.sin(x)
        return x

    x = jnp.asarray(X)
    jh, jl = jacobians.jacobian(head), jacobians.jacobian(loop)
    for n in (1, 2):
        np.testing.assert_allclose(jh(x, n), np.diag(2 * np.cos(X))[:n], rtol=1e-12)
        np.testing.assert_allclose(jl(x, n), np.diag(np.cos(X) if n == 1 else np.cos(np.sin(X)) * np.cos(X)),
                                   rtol=1e-12)
        np.testing.assert_array_equal(jacobians.sparsity(head, x, n).to_dense(), np.eye(n, 3, dtype=bool))
    jb = jacobians.jacobian(branch)
    np.testing.assert_allclose(jb(x, 0.5), 0.5 * np.eye(3), rtol=1e-12)
    np.testing.assert_allclose(jb(x, -0.5), np.diag(-2 * X), rtol=1e-12)


def test_number_compiled_in_keeps_warning_when_it_keeps_changing():
    jf = jacobians.jacobian(lambda x, c: x * c if c > 0 else -x)
    x = jnp.asarray(X[:2])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for c in range(1, 11):
            jf(x, float(c))
    msgs = [str(w.message) for w in caught if "recompiling" in str(w.message)]
    assert len(msgs) == 1
    assert "[0][1]" in msgs[0] and "jnp array" in msgs[0] and "if t > 0" in msgs[0]


def test_custom_jvp_rule_that_branches_on_a_number():
    # fun itself traces fine with t traced; only its JVP rule needs t's value: the trial JVP finds it.
    @functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
    def f(x, t):
        return x * t

    @f.defjvp
    def f_jvp(t, primals, tangents):
        (x,), (dx,) = primals, tangents
        return x * t, (dx * t if t > 0 else -dx)

    x = jnp.asarray(X)
    for mode in ("fwd", "rev", "auto"):  # auto: the planner's structured sweep never sees the traced branch
        jf = jacobians.jacobian(f, mode=mode)
        for t in (2.0, -2.0):
            np.testing.assert_allclose(jf(x, t), t * np.eye(3) if t > 0 else -np.eye(3), rtol=1e-12)


def test_custom_vjp_with_a_number_in_nondiff_argnums():
    @functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
    def f(x, t):
        return jnp.sin(x) * t

    f.defvjp(lambda x, t: (f(x, t), x), lambda t, x, g: (g * jnp.cos(x) * t,))
    x = jnp.asarray(X)
    for t in (0.5, 1.5):
        np.testing.assert_allclose(jacobians.jacobian(f)(x, t), np.diag(np.cos(X) * t), rtol=1e-12)


class Act(enum.Enum):
    SIN = "sin"
    TANH = "tanh"


class Power(enum.IntEnum):
    TWO = 2
    THREE = 3


def test_bools_enums_strings_and_none_stay_static():
    count = Counter()

    def f(x, training, act, power, names, nothing):
        count.tick()
        assert isinstance(training, bool) and isinstance(power, Power) and nothing is None
        y = getattr(jnp, act.value)(x) ** int(power)
        return (y * 2.0 if training else y) if names == ("a", "b") else -y

    jf = jacobians.jacobian(f)
    x = jnp.asarray(X)
    for args in ((True, Act.SIN, Power.TWO, ("a", "b"), None), (False, Act.TANH, Power.THREE, ("c",), None)):
        want = jax.jit(jax.jacfwd(f), static_argnums=(1, 2, 3, 4, 5))(x, *args)
        np.testing.assert_allclose(jf(x, *args), want, rtol=1e-12)
        with count:
            np.testing.assert_allclose(jf(x, *args), want, rtol=1e-12)
        assert count.new_calls == 0


def test_differentiated_python_float_is_weakly_typed_as_in_jacfwd():
    f = lambda t: jnp.stack([jnp.sin(t), t**2])  # noqa: E731
    for mode in ("fwd", "rev"):
        got, want = jacobians.jacobian(f, mode=mode)(0.7), jax.jit(jax.jacfwd(f))(0.7)
        assert got.dtype == want.dtype and got.weak_type == want.weak_type
        np.testing.assert_allclose(got, want, rtol=1e-12)
    # Next to a float32 array: t is not promoted (strict promotion would raise), the blocks are float32.
    g = lambda x, t: x * t + jnp.sin(x) * t**2  # noqa: E731
    x = jnp.asarray(X, jnp.float32)
    got = jacobians.jacobian(g, argnums=(0, 1))(x, 0.7)
    want = jax.jit(jax.jacfwd(g, argnums=(0, 1)))(x, 0.7)
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype == jnp.float32
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_inside_jit_and_vmap():
    f = lambda x, t: jnp.sin(x) * t  # noqa: E731
    jf = jacobians.jacobian(f)
    x = jnp.asarray(X)
    np.testing.assert_allclose(jax.jit(lambda x: jf(x, 0.5))(x), np.diag(np.cos(X) * 0.5), rtol=1e-12)
    np.testing.assert_allclose(jax.jit(jf)(x, 0.5), np.diag(np.cos(X) * 0.5), rtol=1e-12)
    xs = jnp.asarray(XS)
    np.testing.assert_allclose(jax.vmap(lambda x: jf(x, 1.5))(xs), [np.diag(np.cos(r) * 1.5) for r in XS],
                               rtol=1e-12)


def test_plan_explain_and_sparsity_take_numbers():
    f = lambda x, t: jnp.sin(x) * t  # noqa: E731
    x = jnp.asarray(X)
    assert jacobians.sparsity(f, x, 0.5).nnz == 3
    assert jacobians.hessian_sparsity(lambda x, t: jnp.sum(x**2) * t, x, 0.5).nnz == 3
    assert jacobians.explain(f, x, 0.5).n == 3
    assert jacobians.sparse_jacobian(f).plan(x, 0.5).n_colors == 1


# --- Python numbers among the outputs: constants with a zero Jacobian (as jax.jacfwd) ----------------

OUTPUTS = {
    "tuple_float": lambda x: (jnp.sin(x), 1.0),
    "dict_int": lambda x: {"a": x**2, "b": 2},
    "only_constant": lambda x: 1.5,
}


@pytest.mark.parametrize(
    "how, dtype", [(h, jnp.float32) for h in ("fwd", "rev", "auto", "structured", "compressed", "sparse")]
    + [("auto", jnp.float64)]
)
@pytest.mark.parametrize("name", sorted(OUTPUTS))
def test_python_number_output_is_a_zero_block(name, how, dtype):
    f = OUTPUTS[name]
    x = jnp.asarray(X, dtype)
    if how == "sparse":
        got = jacobians.sparse_jacobian(f, output="dense")(x)
    elif how in ("structured", "compressed"):
        got = jacobians.jacobian(f, method=how)(x)
    else:
        got = jacobians.jacobian(f, mode=how)(x)
    want = jax.jit(jax.jacfwd(f))(x)  # the values and shapes; jacfwd gives a constant's block its own (weak) dtype
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        assert g.shape == w.shape and g.dtype == dtype  # the block takes the input's dtype (jacrev's)
        np.testing.assert_allclose(g, np.asarray(w, np.float64), rtol=1e-6)
    if name == "tuple_float":
        np.testing.assert_array_equal(got[1], np.zeros(3))
        if how in ("fwd", "rev", "auto"):  # reverse mode too: jax.jacrev gives the same blocks
            for g, w in zip(got, jax.jit(jax.jacrev(f))(x), strict=True):
                np.testing.assert_allclose(g, w, rtol=1e-6)


def test_python_number_outputs_in_second_order_and_value_and_jacobian():
    x = jnp.asarray(X, jnp.float32)
    for f in (lambda x: 1.0, lambda x: 3):
        for got in (jacobians.hessian(f)(x), jacobians.sparse_hessian(f, output="dense")(x)):
            assert got.shape == (3, 3) and got.dtype == jnp.float32
            np.testing.assert_array_equal(got, np.zeros((3, 3)))
    got = jacobians.jacobian_matrix(lambda x: 1.0, order="F")(x)
    assert got.shape == (1, 3) and got.dtype == jnp.float32
    np.testing.assert_array_equal(got, np.zeros((1, 3)))
    value, jac = jacobians.value_and_jacobian(lambda x: (x**2, 1.0))(x)
    np.testing.assert_allclose(value[0], X.astype(np.float32) ** 2, rtol=1e-6)
    assert float(value[1]) == 1.0
    np.testing.assert_array_equal(jac[1], np.zeros(3))


def test_non_numeric_outputs_still_rejected():
    x = jnp.asarray(X)
    with pytest.raises(TypeError, match=r"jacobians.jacobian: fun must return floating-point arrays, but output\[1\] "
                                        r"has dtype bool"):
        jacobians.jacobian(lambda x: (x, True))(x)
    with pytest.raises(TypeError, match=r"output\['n'\] has dtype int64; integer outputs have no derivative"):
        jacobians.jacobian(lambda x: {"n": jnp.argmax(x), "y": x})(x)
    with pytest.raises(TypeError, match="output has dtype bool; boolean outputs have no derivative"):
        jacobians.jacobian(lambda x: True)(x)  # (jax.jacfwd and jax.jacrev raise too)


def test_array_control_flow_error_says_what_to_do():
    def f(x, t):
        return x * t if x.sum() > t else -x  # an array in Python control flow: no fallback can help

    with pytest.raises(TypeError, match=r"jacobians.jacobian: compiles fun \(as jax.jit does\) .* jnp.where or "
                                        r"jax.lax.cond .* functools.partial"):
        jacobians.jacobian(f)(jnp.asarray(X), 0.5)
