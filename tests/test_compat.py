"""jacobians._compat on the running JAX: each fact about JAX's internals, read from a real jaxpr.

Also regressions for the analyses that read those facts: the planner's cost of
nested jaxprs with constants of their own (a closure under ``jit``, a
Jacobian of a Jacobian) and ``scan`` read exactly whatever JAX spells its
parameters.
"""

import ast
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jacobians
from jacobians import _compat, _planner

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _eqns(closed):
    return _compat.unclose(closed)[0].eqns


def _eqn(closed, name):
    (eqn,) = [e for e in _eqns(closed) if e.primitive.name == name]
    return eqn


def _names(jaxpr):
    return {e.primitive.name for e in _compat.unclose(jaxpr)[0].eqns}


def test_nothing_else_touches_jax_internals():
    """Only _compat imports jax.extend / jax._src / jax.core or names the jaxpr classes' module."""
    offenders = []
    for path in sorted([*(ROOT / "jacobians").rglob("*.py"), *(ROOT / "kernels").rglob("*.py")]):
        if path.name == "_compat.py":
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(("jax._src", "jax.extend", "jax.core")):
                offenders.append(f"{path.name}:{node.lineno} from {node.module}")
            elif isinstance(node, ast.Import) and any(a.name.startswith(("jax._src", "jax.extend", "jax.core"))
                                                       for a in node.names):
                offenders.append(f"{path.name}:{node.lineno} import")
            elif isinstance(node, ast.Attribute) and node.attr in ("core", "_src", "extend"):
                if isinstance(node.value, ast.Name) and node.value.id == "jax":
                    offenders.append(f"{path.name}:{node.lineno} jax.{node.attr}")
    assert not offenders, offenders


def test_is_tracer():
    seen = []
    jax.jit(lambda x: seen.append(_compat.is_tracer(x)) or x)(jnp.ones(2))
    assert seen == [True]
    assert not _compat.is_tracer(jnp.ones(2))
    assert not _compat.is_tracer(np.ones(2))
    assert not _compat.is_tracer(1.0)


def test_unclose_closed_and_nested(rng):
    a = jnp.asarray(rng.normal(size=3))
    closed = jax.make_jaxpr(lambda x: jax.jit(lambda y: a * y)(x) + a)(jnp.ones(3))
    jaxpr, consts = _compat.unclose(closed)
    assert len(consts) == len(jaxpr.constvars) and jaxpr.eqns
    inner = _compat.called_jaxpr(_eqn(closed, _compat.jit_primitive()))
    ij, ic = _compat.unclose(inner)
    assert len(ic) == len(ij.constvars)  # open before JAX 0.11 (no constvars), self-contained after
    assert _names(ij) == {"mul"}
    # Every constant is the closed-over array (a value or an operand of the jit, depending on the release).
    for c in consts + ic:
        np.testing.assert_array_equal(np.asarray(c), np.asarray(a))


def _all_eqns(closed):
    out, stack = [], [_compat.unclose(closed)[0]]
    while stack:
        j = stack.pop()
        out += j.eqns
        for e in j.eqns:
            stack.extend(_compat.jaxprs_in_params(e.params))
    return out


def test_host_constant():
    idx = np.array([4, 0, 5])
    closed = jax.make_jaxpr(lambda x: x[idx])(jnp.ones(6))
    consts = [_compat.host_constant(c) for c in _compat.unclose(closed)[1]]
    assert consts and all(type(c) is np.ndarray or isinstance(c, np.ndarray) for c in consts)
    assert any(np.array_equal(c, idx) for c in consts)
    a = jnp.ones(2)
    assert _compat.host_constant(a) is a
    seen = []
    jax.jit(lambda x: seen.append(_compat.host_constant(x) is x) or x)(a)
    assert seen == [True]


def test_literal_var_dropvar():
    closed = jax.make_jaxpr(lambda x: lax.fori_loop(0, 3, lambda i, c: c * x + 1.0, x))(jnp.ones(2))
    invars = [v for e in _all_eqns(closed) for v in e.invars]
    outvars = [v for e in _all_eqns(closed) for v in e.outvars]
    lits = [v for v in invars if isinstance(v, _compat.Literal)]
    assert any(np.asarray(v.val) == 1.0 for v in lits)
    assert all(isinstance(v, _compat.Var) for v in invars if not isinstance(v, _compat.Literal))
    assert outvars and all(isinstance(v, _compat.Var) for v in outvars)
    # Outputs nobody reads: JAX < 0.10 stages them as DropVars in a derivative's jaxpr, later releases as Vars.
    closed = jax.make_jaxpr(jax.grad(lambda x: lax.fori_loop(0, 3, lambda i, c: jnp.sin(c), x).sum()))(jnp.ones(2))
    outvars = [v for e in _all_eqns(closed) for v in e.outvars]
    assert all(isinstance(v, _compat.Var | _compat.DropVar) for v in outvars)
    assert all(isinstance(v, _compat.DropVar) for v in outvars if type(v).__name__ == "DropVar")


def test_jaxprs_in_params():
    f = jax.custom_jvp(jnp.sin)
    f.defjvp(lambda p, t: (jnp.sin(p[0]), jnp.cos(p[0]) * t[0]))

    def g(x):
        y = jax.jit(jnp.tanh)(x)
        y = lax.cond(x[0] > 0, jnp.exp, jnp.log1p, y)
        y = f(y)
        return lax.while_loop(lambda c: c[0] < 5.0, lambda c: c * 2.0, y)

    closed = jax.make_jaxpr(g)(jnp.ones(2))
    found = {e.primitive.name: [_names(s) for s in _compat.jaxprs_in_params(e.params)] for e in _eqns(closed)}
    assert found[_compat.jit_primitive()] == [{"tanh"}]
    assert sorted(map(sorted, found["cond"])) == [["exp"], ["log1p"]]
    assert found["custom_jvp_call"] == [{"sin"}]  # the primal; the rule is a Python callable
    cond, body = found["while"]  # the condition (reads c[0]) and the body
    assert "lt" in cond and body == {"mul"}
    assert all(found[name] == [] for name in found if name not in (_compat.jit_primitive(), "cond", "custom_jvp_call",
                                                                  "while"))
    assert list(_compat.jaxprs_in_params({"x": 1, "y": (2, "a")})) == []


def test_called_jaxpr():
    closed = jax.make_jaxpr(lambda x: jax.checkpoint(jnp.sin)(jax.jit(jnp.cos)(x)))(1.0)
    calls = [e for e in _eqns(closed) if _compat.called_jaxpr(e) is not None]
    assert len(calls) == 2
    assert [_names(_compat.called_jaxpr(e)) for e in calls] == [{"cos"}, {"sin"}]
    for e in calls:
        assert len(_compat.unclose(_compat.called_jaxpr(e))[0].invars) <= len(e.invars)
    assert _compat.called_jaxpr(_eqns(jax.make_jaxpr(jnp.sin)(1.0))[0]) is None


def test_jit_primitive():
    name = _compat.jit_primitive()
    assert name in ("jit", "pjit")
    assert _eqns(jax.make_jaxpr(jax.jit(jnp.sin))(1.0))[0].primitive.name == name


def test_cond_branches():
    closed = jax.make_jaxpr(lambda i, x: lax.switch(i, [jnp.sin, jnp.cos, jnp.tan], x))(1, 1.0)
    eqn = _eqn(closed, "cond")
    assert [_names(b) for b in _compat.cond_branches(eqn)] == [{"sin"}, {"cos"}, {"tan"}]


def test_while_counts():
    def f(a, b, x):
        return lax.while_loop(lambda c: c[0] < a, lambda c: (c[0] + 1.0, c[1] * b[0] + b[1]), (0.0, x))

    closed = jax.make_jaxpr(f)(3.0, jnp.ones(2), 1.0)
    eqn = _eqn(closed, "while")
    nc, nb = _compat.while_counts(eqn)
    assert (nc, nb) == (1, 1)  # cond reads a; body reads b (one operand)
    cond, body = _compat.while_jaxprs(eqn)
    assert len(_compat.unclose(cond)[0].invars) == nc + 2
    assert len(_compat.unclose(body)[0].invars) == nb + 2
    assert nc + nb + len(eqn.outvars) == len(eqn.invars)


def _scan_eqns(closed):
    return [e for e in _all_eqns(closed) if e.primitive.name == "scan"]


def _check_scan_counts(eqn):
    nc, nk = _compat.scan_counts(eqn)
    body = _compat.unclose(_compat.scan_body(eqn))[0]
    n_xs = len(eqn.invars) - nc - nk
    assert n_xs >= 0 and len(body.invars) == len(eqn.invars)
    # The carry goes in and comes out with the same types; xs lose their leading axis; outputs follow suit.
    assert [v.aval for v in body.invars[nc:nc + nk]] == [v.aval for v in body.outvars[:nk]]
    for v, b in zip(eqn.invars[nc + nk:], body.invars[nc + nk:], strict=True):
        assert v.aval.shape[1:] == b.aval.shape and v.aval.shape[0] == eqn.params["length"]
    for v, b in zip(eqn.invars[:nc + nk], body.invars[:nc + nk], strict=True):
        assert v.aval.shape == b.aval.shape
    return nc, nk


def test_scan_counts():
    def f(k, c, xs):
        def step(carry, x):
            (a, b), (x1, x2) = carry, x
            return (a * x1 * k, b + x2), (a + x2, b)

        return lax.scan(step, (c, c), (xs, xs))

    closed = jax.make_jaxpr(f)(jnp.ones(2), jnp.ones(2), jnp.ones((3, 2)))
    (eqn,) = _scan_eqns(closed)
    assert _check_scan_counts(eqn) == (1, 2)
    # fori_loop: a scan with no xs; the counter is carried.
    closed = jax.make_jaxpr(lambda x: lax.fori_loop(0, 3, lambda i, c: c * x, x))(jnp.ones(2))
    (eqn,) = _scan_eqns(closed)
    assert _check_scan_counts(eqn) == (1, 2)


def test_scan_counts_after_differentiation():
    # JAX's own transformations regroup scan's operands (residuals join the constants).
    def f(x):
        return lax.scan(lambda c, xi: (jnp.sin(c * xi), c * xi), x[0], x)[1].sum()

    closed = jax.make_jaxpr(jax.grad(f))(jnp.ones(4))
    eqns = _scan_eqns(closed)
    assert len(eqns) >= 2
    for eqn in eqns:
        _check_scan_counts(eqn)
    assert _compat.scan_counts(type("E", (), {"params": {"length": 2}, "invars": []})()) is None


def test_bind(rng):
    x = jnp.asarray(rng.normal(size=3))
    closed = jax.make_jaxpr(lambda v: jax.jit(lambda w: jnp.sin(w) * 2.0)(jnp.cos(v)))(x)
    cos_eqn, jit_eqn = _eqns(closed)
    np.testing.assert_allclose(_compat.bind(cos_eqn, [x]), np.cos(np.asarray(x)))
    (out,) = _compat.bind(jit_eqn, [x])
    np.testing.assert_allclose(out, np.sin(np.asarray(x)) * 2.0)


def test_convert_weak():
    x = jnp.ones(3, jnp.float32)
    out = jax.eval_shape(lambda v: _compat.convert_weak(v, np.dtype(np.float64)), x)
    assert out.dtype == jnp.float64 and out.weak_type
    assert _compat.convert_weak(x, np.dtype(np.float64)).dtype == jnp.float64


def test_array_impl():
    assert type(jnp.ones(2)) is _compat.ARRAY_IMPL
    assert type(jax.jit(jnp.sin)(jnp.ones(2))) is _compat.ARRAY_IMPL


def test_source_summary():
    def user_line(x):
        return jnp.sin(x)

    eqn = _eqns(jax.make_jaxpr(user_line)(1.0))[0]
    where = _compat.source_summary(eqn.source_info)
    assert "test_compat.py" in where and "user_line" in where
    assert _compat.source_summary(object()) is None


def test_jaxpr_as_fun(rng):
    x = jnp.asarray(rng.normal(size=3))
    a = jnp.asarray(rng.normal(size=3))
    closed = jax.make_jaxpr(lambda v: jnp.sin(v * a))(x)
    (out,) = _compat.jaxpr_as_fun(closed)(x)
    np.testing.assert_allclose(out, np.sin(np.asarray(x) * np.asarray(a)))


def test_eval_with_consts_and_aval_key(rng):
    x = jnp.asarray(rng.normal(size=3))
    a = jnp.asarray(rng.normal(size=3))
    closed = jax.make_jaxpr(lambda v: jnp.sin(v * a))(x)
    (consts_a,) = [c for c in _compat.unclose(closed)[1] if c is a]
    (out,) = _compat.eval_with_consts(closed, [2.0 * consts_a], x)  # another value in place of the constant
    np.testing.assert_allclose(out, np.sin(np.asarray(x) * 2.0 * np.asarray(a)))
    assert _compat.aval_key(x) == ((3,), "float64", False)
    assert _compat.aval_key(1.5) == ((), "float64", True)  # a Python number: weakly typed, as jit traces it
    assert jax.jit(lambda v: _compat.aval_key(v) == ((3,), "float64", False))(x)


# --- regressions ---------------------------------------------------------------------------------


def test_pass_cost_of_open_nested_jaxprs(rng):
    """pass_cost on a jaxpr whose nested jit closes over an array (it asserted on ClosedJaxpr(s, []))."""
    a = jnp.asarray(rng.normal(size=(4, 4)))
    closed = jax.make_jaxpr(lambda x: jax.jit(lambda y: a @ y)(x))(jnp.ones(4))
    inner = _compat.called_jaxpr(_eqn(closed, _compat.jit_primitive()))
    assert _planner.pass_cost(inner) == 2.0 * 4 * 4
    assert _planner.pass_cost(closed) == 4 + 2.0 * 4 * 4  # the jit's output, and its body
    assert _planner.pass_cost(_compat.unclose(inner)[0]) == 2.0 * 4 * 4


@pytest.mark.filterwarnings("error")  # the planner's fallback warning is a failure here
def test_jacobian_of_jit_closing_over_an_array(rng):
    a = jnp.asarray(rng.normal(size=(3, 3)))
    f = jax.jit(lambda x: jnp.sin(a @ x) * x)
    x = jnp.asarray(rng.normal(size=3))
    np.testing.assert_allclose(jacobians.jacobian(f)(x), jax.jacfwd(f)(x), rtol=1e-12, atol=1e-12)


@pytest.mark.filterwarnings("error")
def test_jacobian_of_jacobian(rng):
    a = jnp.asarray(rng.normal(size=(3, 3)))

    def f(x):
        return jnp.sin(a @ x) * x[0]

    x = jnp.asarray(rng.normal(size=3))
    np.testing.assert_allclose(jacobians.jacobian(jacobians.jacobian(f))(x), jax.jacfwd(jax.jacfwd(f))(x),
                               rtol=1e-12, atol=1e-12)
    g = lambda x: jnp.sum(jnp.sin(a @ x) ** 2)  # noqa: E731
    np.testing.assert_allclose(jacobians.jacobian(jacobians.jacobian(g))(x), jax.hessian(g)(x),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.filterwarnings("error")  # on JAX >= 0.11 a misread scan fell back to the dense rule with a warning
def test_scan_is_read_exactly():
    def cumprod(x):
        return lax.scan(lambda c, xi: (c * xi, c * xi), jnp.ones((), x.dtype), x)[1]

    pattern = jacobians.sparsity(cumprod, jnp.ones(5))
    np.testing.assert_array_equal(pattern.to_dense(), np.tril(np.ones((5, 5), bool)))

    def shift(x):  # a fori_loop: each step moves the carry one place
        return lax.fori_loop(0, 2, lambda i, c: jnp.roll(c, 1) * 2.0, x)

    pattern = jacobians.sparsity(shift, jnp.ones(5))
    np.testing.assert_array_equal(pattern.to_dense(), np.roll(np.eye(5, dtype=bool), 2, axis=0))


def test_auto_axes():
    """A mesh's axes as Auto (sharding constraints need them), its devices and names kept; an Auto mesh as is."""
    from jax.sharding import Mesh

    mesh = jax.make_mesh((1,), ("d",))
    auto = _compat.auto_axes(mesh)
    assert auto.axis_names == ("d",) and list(auto.devices.flat) == list(mesh.devices.flat)
    kinds = getattr(jax.sharding, "AxisType", None)
    if kinds is not None:
        assert all(t == kinds.Auto for t in auto.axis_types)
    assert _compat.auto_axes(auto) is auto  # nothing to change: the mesh itself
    plain = Mesh(np.asarray(jax.devices()[:1]), ("d",))
    assert _compat.auto_axes(plain).axis_names == ("d",)
