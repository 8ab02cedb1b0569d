"""Structured accumulation: both sweeps equal jax.jacfwd, and each rule yields the structure it claims."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import randn
from hypothesis import given, settings
from hypothesis import strategies as st
from registry import CASES

import jacobians
from jacobians import _sweeps


def _flat(fun, shape):
    return lambda v: (jnp.ravel(fun(v.reshape(shape))), None)


def _both_sweeps(fun, x, sweeps=("fwd", "rev")):
    """Both sweeps and jax.jacfwd's answer in one compiled function (one compile per case)."""
    flat = _flat(fun, x.shape)

    def run(v):
        got = {s: _sweeps.jacobian(flat, v.ravel(), s)[1] for s in sweeps}
        ref = jax.jacfwd(lambda u: flat(u)[0])(v.ravel()) if "fwd" in sweeps else jax.jacrev(lambda u: flat(u)[0])(
            v.ravel())
        return got, ref

    return jax.jit(run)(x)


@pytest.mark.parametrize("name", sorted(CASES))
def test_registry_both_sweeps_agree_with_jax(rng, name):
    c = CASES[name]
    x = randn(rng, c.shape)
    sweeps = tuple(s for s in ("fwd", "rev") if getattr(c, s))
    got, ref = _both_sweeps(c.fun, x, sweeps)
    scale = 1.0 + float(jnp.max(jnp.abs(ref))) if ref.size else 1.0
    for s in sweeps:
        assert got[s].shape == ref.shape
        np.testing.assert_allclose(got[s], ref, rtol=1e-10, atol=1e-10 * scale, err_msg=f"{name} {s}")


# --- random compositions of primitives ---------------------------------------------------------------------


@jax.custom_jvp
def _cube(x):  # a custom rule that is not the primal's own derivative would be caught: it is 3 x^2
    return x**3


_cube.defjvp(lambda p, t: (p[0] ** 3, 3 * p[0] ** 2 * t[0]))

_R = np.random.default_rng(7)
_W = {(a, b): _R.standard_normal((a, b)) for a in (2, 3, 4, 6) for b in (2, 3, 4, 6)}
UNARY = {
    "sin": jnp.sin, "tanh": jnp.tanh, "exp": lambda v: jnp.exp(0.3 * v), "square": lambda v: v * v,
    "relu": jax.nn.relu, "cube": _cube, "scale": lambda v: -2.5 * v, "softplus": jax.nn.softplus,
    "rev": lambda v: v[::-1], "roll": lambda v: jnp.roll(v, 1, axis=-1), "cumsum": lambda v: jnp.cumsum(v, axis=-1),
    "sum": lambda v: jnp.sum(v, axis=-1, keepdims=True) * jnp.ones_like(v), "max": lambda v: jnp.max(v) * v,
    "gather": lambda v: v[..., np.array([0, 0, 1])[: v.shape[-1]]].sum(-1, keepdims=True) + v,
    "pad_slice": lambda v: jnp.pad(v, [(0, 0)] * (v.ndim - 1) + [(1, 2)])[..., 2:][..., : v.shape[-1]],
    "matvec": lambda v: v @ jnp.asarray(_W[(v.shape[-1], v.shape[-1])]),
    "matvec_t": lambda v: (jnp.asarray(_W[(v.shape[-1], v.shape[-1])]) @ v.T).T if v.ndim == 2 else _W[
        (v.shape[-1], v.shape[-1])] @ v,
    "transpose": lambda v: v.T.reshape(v.shape) if v.ndim == 2 else v,
    "broadcast": lambda v: jnp.broadcast_to(v[..., :1], v.shape) * 1.5,
}
BINARY = {
    "add": lambda a, b: a + b, "mul": lambda a, b: a * b, "sub": lambda a, b: a - b,
    "div": lambda a, b: a / (2.0 + b * b), "dot": lambda a, b: jnp.sum(a * b) * a,
    "outer": lambda a, b: (a.reshape(-1)[:, None] * b.reshape(-1)[None, :]).sum(0).reshape(a.shape),
    "concat": lambda a, b: jnp.concatenate([a, b], axis=-1)[..., 1 : 1 + a.shape[-1]],
    "where": lambda a, b: jnp.where(a > 0, a, b),
    "bcast": lambda a, b: a * b[..., :1] - b[..., -1:],  # size-1 axes broadcast inside mul and sub
}


def _program(ops, shape):
    """A function of one array applying ``ops``: (name, i, j) reads values i (and j) of those computed so far."""

    def fun(x):
        vals = [x]
        for name, i, j in ops:
            a, b = vals[i % len(vals)], vals[j % len(vals)]
            vals.append(UNARY[name](a) if name in UNARY else BINARY[name](a, b))
        return jnp.concatenate([v.ravel() for v in vals[-2:]])

    return fun


@settings(max_examples=15, deadline=None)
@given(
    shape=st.sampled_from([(4,), (3,), (2, 3), (2, 4)]),
    ops=st.lists(
        st.tuples(st.sampled_from(sorted(UNARY) + sorted(BINARY)), st.integers(0, 9), st.integers(0, 9)),
        min_size=1, max_size=6,
    ),
    seed=st.integers(0, 2**16),
)
def test_random_compositions_agree_with_jacfwd(shape, ops, seed):
    fun = _program(ops, shape)
    x = jnp.asarray(np.random.default_rng(seed).standard_normal(shape))
    got, ref = _both_sweeps(fun, x)
    for s in ("fwd", "rev"):
        np.testing.assert_allclose(got[s], ref, rtol=1e-9, atol=1e-9, err_msg=f"{ops} {s}")


# --- the structures the rules claim ------------------------------------------------------------------------


def _mlp(h, n, m, rng):
    W1, W2 = randn(rng, (h, n)) / np.sqrt(n), randn(rng, (m, h)) / np.sqrt(h)
    return lambda x: jnp.tanh(W2 @ jnp.tanh(W1 @ x))


def _log(fun, x, sweep):
    log = []
    jax.make_jaxpr(lambda v: _sweeps.jacobian(_flat(fun, x.shape), v, sweep, log)[1])(x.ravel())
    return log


def _products(fun, x, sweep):
    """The matrix-matrix products (``dot_general`` with a 2-D result) of the sweep's program."""
    closed = jax.make_jaxpr(lambda v: _sweeps.jacobian(_flat(fun, x.shape), v, sweep)[1])(x.ravel())
    return [e for e in closed.jaxpr.eqns if e.primitive.name == "dot_general" and len(e.outvars[0].aval.shape) == 2]


@pytest.mark.parametrize("sweep", ["fwd", "rev"])
def test_mlp_chain_is_the_closed_form(rng, sweep):
    # diag(s2) W2 diag(s1) W1: one matrix product. The identity never meets W1 (forward) and
    # the output's identity never meets W2 (reverse); elementwise layers stay scalings.
    f = _mlp(8, 8, 8, rng)
    x = randn(rng, (8,))
    log = _log(f, x, sweep)
    assert [fam for _, fam, _ in log if fam == "generic"] == []
    assert len(_products(f, x, sweep)) == 1
    kinds = [(p, k) for p, _, k in log]
    if sweep == "fwd":
        # x selects (identity) -> W1 x is W1 itself (dense, no product) -> tanh scales its rows.
        assert kinds[:2] == [("dot_general", ["dense"]), ("tanh", ["dense"])]
    else:
        # From the output: tanh keeps the identity a (diagonal) selection, then W2's rows are scaled.
        assert kinds[:2] == [("tanh", ["selection"]), ("dot_general", ["dense"])]
    np.testing.assert_allclose(jacobians.jacobian(f, method="structured", mode=sweep)(x), jax.jacfwd(f)(x),
                               rtol=1e-12)


@pytest.mark.parametrize("sweep", ["fwd", "rev"])
def test_movement_and_elementwise_stay_selections(rng, sweep):
    # Reverse, slice, reshape, transpose, pad, concatenate, constant gathers and elementwise maps
    # compose as selections: nothing is densified until the result. (y is read twice, at disjoint
    # entries: in reverse its two adjoints merge into one selection.)
    idx = np.array([4, 0, 5])

    def f(x):
        y = jnp.sin(x[::-1]).reshape(2, 3).T.reshape(-1) * 2.0
        z = jnp.concatenate([jnp.pad(y[1:4], (1, 1)), y[idx]])
        return jnp.tanh(z) + 1.0

    x = randn(rng, (6,))
    log = _log(f, x, sweep)
    assert log and all(set(k) == {"selection"} for _, _, k in log), log
    assert not _products(f, x, sweep)
    got, ref = _both_sweeps(f, x)
    np.testing.assert_allclose(got[sweep], ref, rtol=1e-12)
    # Read twice at the same entry, a column of the adjoint has two entries: dense, and still exact.
    g = lambda x: jnp.sin(x)[np.array([0, 1])] * jnp.sin(x)[np.array([1, 1])]  # noqa: E731
    got, ref = _both_sweeps(g, x)
    np.testing.assert_allclose(got[sweep], ref, rtol=1e-12)


def test_reverse_sum_is_a_selection_and_forward_broadcast_too(rng):
    f = lambda x: jnp.sum(jnp.sin(x), axis=1)  # noqa: E731
    x = randn(rng, (3, 4))
    assert [k for p, _, k in _log(f, x, "rev") if p == "reduce_sum"] == [["selection"]]
    g = lambda x: jnp.broadcast_to(x, (3, 4)) * 2.0  # noqa: E731 - a broadcast in forward: rows repeat
    assert all(k == ["selection"] for _, _, k in _log(g, randn(rng, (4,)), "fwd"))


def test_custom_jvp_rules_are_honoured(rng):
    # relu at its kink: JAX's rule gives 0 there; a primal max(x, 0) traced naively may give 0.5.
    x = jnp.array([-1.0, 0.0, 2.0])
    for sweep in ("fwd", "rev"):
        got = jacobians.jacobian(jax.nn.relu, method="structured", mode=sweep)(x)
        np.testing.assert_array_equal(got, jax.jacfwd(jax.nn.relu)(x))
        assert [f for p, f, _ in _log(jax.nn.relu, x, sweep)] == ["elementwise"]
    # A rule that differs from the primal's derivative is the one used.
    np.testing.assert_allclose(jacobians.jacobian(_cube, method="structured")(x), jnp.diag(3 * x**2))


def test_generic_fallback_covers_control_flow(rng):
    # Primitives without a structure rule densify and use their own JVP/VJP.
    def f(x):
        return jax.lax.fori_loop(0, 3, lambda i, c: jnp.sin(c) * 1.1, x) + jnp.sort(x)

    x = randn(rng, (5,))
    got, ref = _both_sweeps(f, x, ("fwd",))
    np.testing.assert_allclose(got["fwd"], ref, rtol=1e-12)
    assert "generic" in [fam for _, fam, _ in _log(f, x, "fwd")]


def test_planner_chooses_structured_for_layer_chains(rng):
    f = _mlp(64, 64, 64, rng)
    x = randn(rng, (64,))
    plan = jacobians.explain(f, x)
    assert plan.method == "structured" and {"structured fwd", "structured rev", "dense fwd"} <= set(plan.costs)
    # atol: a GPU sums in another order (an entry of 2e-5 from cancellation differs by 3e-17 there)
    np.testing.assert_allclose(jacobians.jacobian(f)(x), jax.jacfwd(f)(x), rtol=1e-12, atol=1e-15)
    # Many inputs to few outputs: the reverse dense mode is as cheap; no structured sweep.
    g = _mlp(64, 64, 2, rng)
    assert jacobians.explain(g, x).key == "dense rev"


def test_pytrees_argnums_aux_and_float32(rng):
    W = randn(rng, (3, 4))

    def f(p, b, scale):
        return {"y": jnp.tanh(W @ p["a"] + b) * scale, "z": p["c"] ** 2}, jnp.sum(b)

    p = {"a": randn(rng, (4,)), "c": randn(rng, (2,))}
    b = randn(rng, (3,))
    for sweep in ("fwd", "rev"):
        got, aux = jacobians.jacobian(f, argnums=(0, 1), method="structured", mode=sweep, has_aux=True)(p, b, 2.0)
        ref, raux = jax.jacfwd(f, argnums=(0, 1), has_aux=True)(p, b, 2.0)
        np.testing.assert_allclose(aux, raux)
        for g, r in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(ref), strict=True):
            np.testing.assert_allclose(g, r, rtol=1e-12)
        x32 = randn(rng, (4,), jnp.float32)
        f32 = lambda x: jnp.tanh(W.astype(jnp.float32) @ x)  # noqa: E731
        j32 = jacobians.jacobian(f32, method="structured", mode=sweep)(x32)
        assert j32.dtype == jnp.float32
        np.testing.assert_allclose(j32, jax.jacfwd(f32)(x32), rtol=1e-5, atol=1e-6)


def test_holomorphic_complex(rng):
    A = jnp.asarray(rng.standard_normal((3, 3)) + 1j * rng.standard_normal((3, 3)))
    f = lambda z: jnp.sin(A @ z) * z  # noqa: E731
    z = jnp.asarray(rng.standard_normal(3) + 1j * rng.standard_normal(3))
    ref = jax.jacfwd(f, holomorphic=True)(z)
    for sweep in ("fwd", "rev"):
        got = jacobians.jacobian(f, method="structured", mode=sweep, holomorphic=True)(z)
        np.testing.assert_allclose(got, ref, rtol=1e-12)


def test_method_argument_errors():
    with pytest.raises(ValueError, match="jacobians.jacobian: method must be one of"):
        jacobians.jacobian(jnp.sin, method="fast")
    with pytest.raises(ValueError, match="method='structured' takes no mesh"):
        jacobians.jacobian(jnp.sin, method="structured", mode="fwd", mesh="auto")(jnp.ones(3))
    # An explicit structured plan says so.
    assert jacobians.jacobian(jnp.sin, method="structured", mode="rev").plan(jnp.ones(3)).key == "structured rev"


@pytest.mark.parametrize("sweep", ["fwd", "rev"])
def test_chunked_sweeps(rng, sweep):
    # Chunk c seeds idx = j mod k masked to [c k, c k + k): any k, the last chunk partial.
    W = randn(rng, (7, 5))
    f = lambda x: jnp.tanh(W @ jnp.sin(x)) * jnp.sum(x)  # noqa: E731
    x = randn(rng, (5,))
    ref = jax.jacfwd(f)(x)
    for k in (1, 3):  # one column at a time; chunks of 3 over 5 columns (a partial last chunk)
        got = jacobians.jacobian(f, method="structured", mode=sweep, chunk_size=k)(x)
        np.testing.assert_allclose(got, ref, rtol=1e-12, err_msg=f"chunk_size={k}")


@pytest.mark.parametrize("sweep", ["fwd", "rev"])
def test_layers_with_free_axes_gather_instead_of_multiplying(rng, sweep):
    # X (B, n) @ W^T: the operand keeps a free (batch) axis. Its Jacobian is I (x) W: W's columns
    # (forward) or rows (reverse) gathered per example, no product with the identity.
    W1, W2 = randn(rng, (5, 4)), randn(rng, (3, 5))
    layouts = {
        "batch_first": lambda X: jnp.tanh(jnp.tanh(X @ W1.T) @ W2.T),
        "batch_last": lambda X: jnp.tanh(W2 @ jnp.tanh(W1 @ X.T)),
        "einsum": lambda X: jnp.einsum("bi,ij->jb", X, W1.T) * X[:, :1].T,
        "gram": lambda X: X.T @ X,
    }
    X = randn(rng, (6, 4))
    for name, f in layouts.items():
        got, ref = _both_sweeps(f, X, (sweep,))
        np.testing.assert_allclose(got[sweep], ref, rtol=1e-12, atol=1e-12, err_msg=name)
        assert "generic" not in [fam for _, fam, _ in _log(f, X, sweep)], name
    # Per-example Jacobians (the batch-sum maps of batch_jacobian): the first layer is W1 broadcast
    # over the batch, the only product is the second layer's.
    f = layouts["batch_first"]
    got = jacobians.batch_jacobian(f)(X)
    np.testing.assert_allclose(got, jax.vmap(jax.jacfwd(lambda x: f(x[None])[0]))(X), rtol=1e-12)


@pytest.mark.parametrize("sweep", ["fwd", "rev"])
def test_gram_places_one_line_per_entry(rng, sweep):
    # X^T X: the Jacobian holds X's lines placed by a 0/1 pattern (the closed form). Each input
    # entry gathers one line (n x 4 values), not one per output position (n x 4 x 4).
    X = randn(rng, (6, 4))
    flat = _flat(lambda X: X.T @ X, X.shape)
    got, ref = _both_sweeps(lambda X: X.T @ X, X, (sweep,))
    np.testing.assert_allclose(got[sweep], ref, rtol=1e-12, atol=1e-12)

    def gathered(j):
        for e in j.eqns:
            if e.primitive.name == "gather":
                yield e.outvars[0].aval.size
            for v in e.params.values():
                inner = getattr(v, "jaxpr", None)
                if inner is not None and hasattr(inner, "eqns"):
                    yield from gathered(inner)

    sizes = list(gathered(jax.make_jaxpr(lambda v: _sweeps.jacobian(flat, v, sweep)[1])(X.ravel()).jaxpr))
    assert sizes and max(sizes) <= X.size * X.shape[1], sizes


def _C(z):
    return jnp.asarray(z, jnp.complex128)


@pytest.mark.parametrize("sweep", ["fwd", "rev"])
def test_complex_intermediates_of_real_maps(rng, sweep):
    # abs, real parts and complex-to-real conversions are only real-linear on complex values: a
    # diagonal "partial" from one JVP would be wrong there (it was: 0.5 off on |fft(x)|).
    fs = {
        "abs_fft": lambda x: jnp.abs(jnp.fft.fft(x)),
        "real_imag": lambda x: jnp.real(jnp.exp(_C(1j) * _C(x)) * _C(x)) + jnp.imag(jnp.sin(_C(x) * _C(1 + 2j))),
        "conj": lambda x: jnp.real(jnp.conj(_C(x) * _C(1 + 1j)) * (_C(x) + _C(2j))),
    }
    x = randn(rng, (6,))
    for name, f in fs.items():
        got = jacobians.jacobian(f, method="structured", mode=sweep)(x)
        np.testing.assert_allclose(got, jax.jacfwd(f)(x), rtol=1e-12, atol=1e-12, err_msg=name)


def test_hessian_through_a_structured_sweep_of_the_gradient(rng):
    # hessian(mode="auto") differentiates the gradient's jaxpr by a structured sweep where the cost
    # model prefers it (MLP losses): the same Hessian as jax.hessian.
    W1, W2 = randn(rng, (128, 128)) / 11, randn(rng, (128, 128)) / 11
    loss = lambda x: jnp.sum(jnp.tanh(W2 @ jnp.tanh(W1 @ x)) ** 2)  # noqa: E731
    x = randn(rng, (128,))
    grad = lambda v: (jax.grad(loss)(v), None)  # noqa: E731
    assert "structured" in jacobians._planner.choose(
        jax.make_jaxpr(lambda v: grad(v)[0])(x), 128, 128, None, None,
        lambda s: jax.make_jaxpr(lambda v: _sweeps.jacobian(grad, v, s)[1])(x),
    ).method
    np.testing.assert_allclose(jacobians.hessian(loss)(x), jax.hessian(loss)(x), rtol=1e-11, atol=1e-12)
    value, g, H = jacobians.value_grad_and_hessian(loss)(x)
    np.testing.assert_allclose(g, jax.grad(loss)(x), rtol=1e-12)
    np.testing.assert_allclose(H, jax.hessian(loss)(x), rtol=1e-11, atol=1e-12)


def test_sweeps_stop_once_they_cannot_win(rng):
    # A parameter Jacobian (many inputs, eight outputs): the forward sweep would carry a dense
    # (hidden x n) Jacobian, far more than eight VJPs cost; the planner stops tracing it early.
    W1, W2 = rng.standard_normal((32, 64)), rng.standard_normal((8, 32))
    x = jnp.asarray(rng.standard_normal(64))

    def f(p):
        return p["w2"] @ jnp.tanh(p["w1"] @ x)

    p = {"w1": jnp.asarray(W1), "w2": jnp.asarray(W2)}
    plan = jacobians.explain(f, p)
    assert "structured fwd stopped" in plan.reason and "structured fwd" not in plan.costs
    assert (plan.method, plan.mode) == ("dense", "rev")
    assert plan.seconds > 0 and "planned in" in str(plan)
    got, want = jacobians.jacobian(f)(p), jax.jacrev(f)(p)
    for k in p:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-12, atol=1e-12)
    # Asked for explicitly, the sweep has no budget and still runs.
    got = jacobians.jacobian(f, method="structured", mode="fwd")(p)
    np.testing.assert_allclose(got["w1"], want["w1"], rtol=1e-12, atol=1e-12)
    # A diagonal Jacobian: one compressed pass beats any sweep's primal pass plus its dense (n, n) result,
    # so no sweep is traced at all.
    plan = jacobians.explain(lambda x: jnp.sin(x) * x, x)
    assert plan.method == "compressed" and "no structured sweep can win" in plan.reason
    assert not any(k.startswith("structured") for k in plan.costs)


def test_generic_rules_charge_their_passes_before_tracing(rng):
    """A convolution's reverse sweep pulls one VJP of the convolution per output row: charged before it is traced.

    A compressed plan of 27 colours beats it by far; the sweep used to be traced in full to be costed.
    """
    K = jnp.asarray(rng.standard_normal((8, 3, 3, 3)))
    x = jnp.asarray(rng.standard_normal((3, 16, 16)))

    def f(v):
        return jnp.tanh(jax.lax.conv_general_dilated(v[None], K, (1, 1), "SAME")[0])

    plan = jacobians.explain(f, x)
    assert plan.method == "compressed"
    assert "structured rev stopped" in plan.reason and "structured rev" not in plan.costs
    np.testing.assert_allclose(jacobians.jacobian(f)(x), jax.jacfwd(f)(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", ["fwd", "rev"])
def test_unused_outputs_get_no_cotangent(mode):
    # eigh's and svd's rules divide by l_i - l_j: repeated eigenvalues (singular values) make the eigenvector
    # part infinite, which JAX's own VJP never meets when only the eigenvalues are used. The reverse sweep's
    # generic rule gave every output a zero cotangent (0 * inf: all NaN).
    x = jnp.asarray([0.5, 2.0])
    scale = jnp.asarray([1.0, 1.0, 2.0])
    for f in (lambda x: jnp.linalg.eigvalsh(jnp.diag(scale * x[0] + x[1])),
              lambda x: jnp.linalg.svd(jnp.diag(scale * x[0] + x[1]), full_matrices=False)[1]):
        got = jacobians.jacobian(f, method="structured", mode=mode)(x)
        np.testing.assert_allclose(got, jax.jacrev(f)(x), rtol=1e-12, atol=1e-12)
