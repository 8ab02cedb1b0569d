"""Trust: failed analyses and wrong plans fall back to the dense method (PlanWarning; PlanError when strict),
plans carry certificates checked once against JAX, and saved plans are validated when loaded."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_tree_allclose, failing_compile, randn

import jacobians
from jacobians import _batch, _deps, _methods, _planner, _sweeps, _trust


def _drop_rule(name):
    """A sparsity rule for ``name`` that forgets every dependency: the detected pattern misses entries."""
    return lambda lat, eqn, ins: [_deps.empty(v.aval.shape) for v in eqn.outvars]


def _crash(*args, **kwargs):
    raise RuntimeError("injected failure")


def _lenient(call):
    """``call()`` outside strict mode, returning its result and the PlanWarnings it gave."""
    with jacobians.strict(False), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = call()
    return out, [str(w.message) for w in caught if issubclass(w.category, jacobians.PlanWarning)]


def _sin_and_reverse(x):
    return jnp.sin(x) * 2.0 + x[::-1]


def test_strict_switch(monkeypatch):
    assert issubclass(jacobians.PlanWarning, UserWarning)
    monkeypatch.delenv("JACOBIANS_STRICT", raising=False)
    assert not _trust.is_strict()
    with jacobians.strict():
        assert _trust.is_strict()
        with jacobians.strict(False):
            assert not _trust.is_strict()
    monkeypatch.setenv("JACOBIANS_STRICT", "1")
    assert _trust.is_strict()
    with jacobians.strict(False):
        assert not _trust.is_strict()
    monkeypatch.setenv("JACOBIANS_STRICT", "0")
    assert not _trust.is_strict()


def test_wrong_pattern_fails_its_certificate(monkeypatch, rng):
    x = randn(rng, (30,))
    want = jax.jacfwd(_sin_and_reverse)(x)
    assert jacobians.explain(_sin_and_reverse, x).method == "compressed"
    monkeypatch.setitem(_deps.DepsLattice.rules, "sin", _drop_rule("sin"))
    jf = jacobians.jacobian(_sin_and_reverse)
    got, caught = _lenient(lambda: jf(x))
    assert_tree_allclose(got, want)
    assert len(caught) == 1 and "compressed" in caught[0] and "failed its certificate" in caught[0]
    plan = jf.plan(x)
    assert plan.method == "dense" and "failed its certificate" in plan.reason
    assert "certificate: not needed (the dense method" in str(plan)
    _, again = _lenient(lambda: jf(x + 1.0))
    assert again == [], "a plan warns once"
    with pytest.raises(jacobians.PlanError, match=r"compressed \w+ plan failed its certificate.*Strict mode"):
        jacobians.jacobian(_sin_and_reverse)(x)
    # The sparse engine: the dense plan (every entry) instead, in both output formats.
    for output in ("dense", "bcoo"):
        sj = jacobians.sparse_jacobian(_sin_and_reverse, output=output)
        got, caught = _lenient(lambda sj=sj: sj(x))
        got = got if output == "dense" else got.todense()
        np.testing.assert_allclose(got, want, rtol=1e-13)
        assert len(caught) == 1 and "detected sparse Jacobian" in caught[0] and "misses entry (row" in caught[0]
        assert sj.plan(x).pattern.nnz == 30 * 30  # the dense plan: every entry
    with pytest.raises(jacobians.PlanError, match="detected sparse Jacobian"):
        jacobians.sparse_jacobian(_sin_and_reverse)(x)


def test_a_stray_entry_off_the_pattern_fails_the_certificate(monkeypatch, rng):
    # The check of a compressed plan reads the call's own dense result on the pattern's entries; a nonzero
    # anywhere else (a decompression writing off the pattern) fails it, and the dense method runs instead.
    from jacobians import _jacobian

    x = randn(rng, (30,))
    assert jacobians.explain(_sin_and_reverse, x).method == "compressed"
    true = _jacobian._flat_jacobian

    def stray(result, p, has_aux):
        J = np.array(true(result, p, has_aux))
        J[0, 1] += 1.0  # row 0 reads x[0] and x[29] only
        return J

    monkeypatch.setattr(_jacobian, "_flat_jacobian", stray)
    with pytest.raises(jacobians.PlanError, match=r"an entry at \(0, 1\), 1, off the plan's pattern"):
        jacobians.jacobian(_sin_and_reverse)(x)


def test_crashing_rule_names_the_primitive(monkeypatch, rng):
    x = randn(rng, (30,))
    monkeypatch.setitem(_deps.DepsLattice.rules, "sin", _crash)
    got, caught = _lenient(lambda: jacobians.jacobian(_sin_and_reverse)(x))
    assert_tree_allclose(got, jax.jacfwd(_sin_and_reverse)(x))
    assert len(caught) == 1
    assert "sparsity detection failed at primitive 'sin' (RuntimeError: injected failure)" in caught[0]
    with pytest.raises(jacobians.PlanError, match=r"sparsity detection failed at primitive 'sin'") as info:
        jacobians.jacobian(_sin_and_reverse)(x)
    assert isinstance(info.value.__cause__, RuntimeError)


@pytest.mark.parametrize("where", ["cost model", "structured sweep"])
def test_planner_failures_fall_back(where, monkeypatch, rng):
    W = randn(rng, (24, 24))
    f = lambda x: jnp.tanh(W @ jnp.tanh(W @ x))  # noqa: E731 - the planner takes a structured sweep here
    x = randn(rng, (24,))
    assert jacobians.explain(f, x).method == "structured"
    if where == "cost model":
        monkeypatch.setattr(_planner, "pass_cost", _crash)
    else:
        monkeypatch.setattr(_sweeps, "jacobian", _crash)
    got, caught = _lenient(lambda: jacobians.jacobian(f)(x))
    assert_tree_allclose(got, jax.jacfwd(f)(x))
    assert len(caught) == 1 and "injected failure" in caught[0]
    assert ("cost model failed" if where == "cost model" else "structured fwd sweep failed") in caught[0]
    with pytest.raises(jacobians.PlanError, match="injected failure"):
        jacobians.jacobian(f)(x)


def _skewed(sweep_fn):
    """A structured sweep that is wrong in one entry."""

    def wrong(flat, x, sweep, *args, **kwargs):
        y, jac, aux = sweep_fn(flat, x, sweep, *args, **kwargs)
        return y, jac.at[0, -1].add(1.0), aux

    return wrong


def test_wrong_structured_sweeps_fail_their_certificates(monkeypatch, rng):
    W = randn(rng, (24, 24)) / 5
    f = lambda x: jnp.tanh(W @ jnp.tanh(W @ x))  # noqa: E731
    loss = lambda x: jnp.sum(f(x) * x)  # noqa: E731
    x = randn(rng, (24,))
    monkeypatch.setattr(_methods.STRUCTURED, "margin", 1e9)  # every planner takes a structured sweep
    monkeypatch.setattr(_sweeps, "jacobian", _skewed(_sweeps.jacobian))
    got, caught = _lenient(lambda: jacobians.jacobian(f)(x))
    assert_tree_allclose(got, jax.jacfwd(f)(x))
    assert len(caught) == 1 and "structured" in caught[0] and "failed its certificate" in caught[0]
    got, caught = _lenient(lambda: jacobians.hessian(loss)(x))
    assert_tree_allclose(got, jax.hessian(loss)(x))
    assert len(caught) == 1 and "Hessian plan failed its certificate" in caught[0]
    X = randn(rng, (3, 24))
    got, caught = _lenient(lambda: jacobians.batch_jacobian(lambda X: f(X.T).T)(X))
    assert_tree_allclose(got, jax.vmap(jax.jacfwd(f))(X))
    assert len(caught) == 1 and "batch structured" in caught[0]
    with pytest.raises(jacobians.PlanError, match="Hessian plan failed its certificate"):
        jacobians.hessian(loss)(x)


def test_batch_proof_is_certified(monkeypatch, rng):
    X = randn(rng, (5, 3))
    coupled = lambda X: X[::-1] * 2.0 + jnp.sin(X)  # noqa: E731
    monkeypatch.setattr(_batch, "_prove", lambda *args, **kwargs: None)  # a proof that proves anything
    with jacobians.strict(False), pytest.raises(jacobians.CoupledBatchError, match=r"a tangent in example 0 changed"
                                                r" output entry \d+ of example 4.*had proved them independent"):
        jacobians.batch_jacobian(coupled)(X)
    with pytest.raises(jacobians.PlanError, match="batch independence proof's plan failed its certificate"):
        jacobians.log_abs_det(coupled, batch_first=True)(X)
    # A proof that crashes: the diagonal blocks of the whole Jacobian, right whatever the function.
    monkeypatch.setattr(_batch, "_prove", _crash)
    g = lambda X: jnp.sin(X) * jnp.sum(X ** 2, axis=1, keepdims=True)  # noqa: E731
    got, caught = _lenient(lambda: jacobians.batch_jacobian(g)(X))
    b = np.arange(5)
    np.testing.assert_allclose(got, jax.jacfwd(g)(X)[b, :, b, :], rtol=1e-12)
    assert len(caught) == 1 and "batch independence proof failed (RuntimeError: injected failure)" in caught[0]


def test_divergence_and_gauss_newton_colourings_are_certified(monkeypatch, rng):
    x = randn(rng, (12,))
    f = lambda x: jnp.sin(x) * jnp.roll(x, 1) + x[::-1] ** 2  # noqa: E731
    J = jax.jacfwd(f)(x)
    mul = _deps.DepsLattice.rules["mul"]
    # A product rule that forgets its second operand's dependencies.
    monkeypatch.setitem(_deps.DepsLattice.rules, "mul",
                        lambda lat, eqn, ins: mul(lat, eqn, [ins[0], _deps.empty(eqn.invars[1].aval.shape)]))
    got, caught = _lenient(lambda: jacobians.divergence(f)(x))
    np.testing.assert_allclose(got, jnp.trace(J), rtol=1e-12)
    assert len(caught) == 1 and "divergence's colouring" in caught[0]
    got, caught = _lenient(lambda: jacobians.gauss_newton(f)(x).diagonal())
    np.testing.assert_allclose(got, jnp.sum(J * J, axis=0), rtol=1e-12)
    assert len(caught) == 1 and "Gauss-Newton diagonal's column colouring" in caught[0]
    with pytest.raises(jacobians.PlanError, match="divergence's colouring"):
        jacobians.divergence(f)(x)


def test_given_patterns_are_certified(rng):
    from registry import stencil_1d

    x = randn(rng, (9,))
    want = jax.jacfwd(stencil_1d)(x)
    pattern = jacobians.sparsity(stencil_1d, x).to_dense()
    pattern[3, 4] = False
    sj = jacobians.sparse_jacobian(stencil_1d, sparsity=pattern, output="dense")
    got, caught = _lenient(lambda: sj(x))
    np.testing.assert_allclose(got, want, rtol=1e-13)
    assert len(caught) == 1 and "given sparse Jacobian" in caught[0]
    assert "misses entry (row 3, column 4) of the flat Jacobian" in caught[0] and "defect" not in caught[0]
    with pytest.raises(jacobians.PlanError, match=r"misses entry \(row 3, column 4\)"):
        jacobians.sparse_jacobian(stencil_1d, sparsity=pattern)(x)
    # Hessians: an HVP finds the missing entry.
    loss = lambda x: jnp.sum(stencil_1d(x) ** 2)  # noqa: E731
    hp = jacobians.hessian_sparsity(loss, x).to_dense()
    hp[2, 4] = hp[4, 2] = False
    got, caught = _lenient(lambda: jacobians.sparse_hessian(loss, sparsity=hp, output="dense")(x))
    np.testing.assert_allclose(got, jax.hessian(loss)(x), rtol=1e-12)
    assert len(caught) == 1 and "given sparse Hessian" in caught[0] and "of the flat Hessian" in caught[0]
    with pytest.raises(ValueError, match=r"pattern misses entry \(row [24], column [24]\) of the flat Hessian"):
        jacobians.sparse_hessian(loss, sparsity=hp, check=True)(x)


def test_explain_shows_the_certificate(rng):
    x = jnp.asarray(rng.uniform(0.5, 2.0, 20))
    f = lambda x: jnp.sqrt(x) * 2.0  # noqa: E731 - not finite at negative points
    plan = jacobians.explain(f, x)
    assert plan.certificate.status == "passed" and "certificate: passed (3 random" in str(plan)
    blind = jacobians.explain(f, jax.ShapeDtypeStruct((20,), jnp.float64))  # no values: a standard normal point
    assert blind.certificate.status == "skipped" and "not finite at a random point" in str(blind)
    noisy = lambda x: jax.debug.callback(lambda *a: None, x) or jnp.sin(x) * 2.0  # noqa: E731
    assert "side effects" in str(jacobians.explain(noisy, x).certificate)
    dense = jacobians.explain(lambda x: jnp.outer(x, x).ravel() * jnp.sum(x), x[:5])
    assert dense.method == "dense" and str(dense.certificate).startswith("not needed")
    sj = jacobians.sparse_jacobian(f)
    sj(x)
    assert sj.plan(x).certificate.status == "passed" and "certificate='passed'" in repr(sj.plan(x))


def test_the_check_runs_once(monkeypatch, rng):
    calls, traces = [], []
    certify = _trust.certify

    def counted(*a, **k):  # a check that is only started (its program lowered ahead) returns nothing
        cert = certify(*a, **k)
        calls.append(1)
        return cert

    monkeypatch.setattr(_trust, "certify", counted)

    def f(x):
        traces.append(1)
        return _sin_and_reverse(x)

    jf = jacobians.jacobian(f)
    x = randn(rng, (30,))
    jf(x)
    first = len(traces)
    for _ in range(3):
        jf(randn(rng, (30,)))
    jf.plan(x)
    jax.jit(jf)(x)
    assert len(calls) == 1 and jf.plan(x).certificate.status == "passed"
    assert len(traces) == first, "no call after the first traces f"


def test_complex_outputs_of_real_inputs(rng):
    x = randn(rng, (6,))
    c = lambda x: x.astype(jnp.complex128)  # noqa: E731 - the suite's dtype promotion is strict
    f = lambda x: jnp.exp(1j * c(x)) * c(x[::-1])  # noqa: E731
    want = jax.jacfwd(f)(x)
    assert jnp.iscomplexobj(want)
    np.testing.assert_allclose(jacobians.sparse_jacobian(f, output="dense")(x), want, rtol=1e-13)
    np.testing.assert_allclose(jacobians.sparse_jacobian(f)(x).todense(), want, rtol=1e-13)
    np.testing.assert_allclose(jacobians.jacobian(f, method="compressed")(x), want, rtol=1e-13)
    g = lambda x: {"c": jnp.exp(1j * c(x[:3])), "r": jnp.sin(x)}  # noqa: E731
    got = jacobians.sparse_jacobian(g, output="dense")(x)
    assert_tree_allclose(got, jax.jacfwd(g)(x))
    with pytest.raises(TypeError, match=r"mode='rev' needs real outputs, but fun returns complex values"):
        jacobians.sparse_jacobian(f, mode="rev")(x)


# --- saved plans -------------------------------------------------------------------------------


def _saved(tmp_path, rng, hessian=False):
    x = randn(rng, (9,))
    f = lambda x: x[1:] * x[:-1] + jnp.sin(x[1:])  # noqa: E731
    if hessian:
        plan = jacobians.sparse_hessian(lambda x: jnp.sum(f(x) ** 2)).plan(x)
    else:
        plan = jacobians.sparse_jacobian(f, mode="fwd").plan(x)
    path = tmp_path / "plan.npz"
    plan.save(path)
    with np.load(path) as data:
        return path, {k: data[k] for k in data.files}


CORRUPTIONS = {
    "missing array": (lambda d: d.pop("colors"), r"\['colors'\] are missing"),
    "format": (lambda d: d.update(format=np.int64(7)), r"expected plan format 1, got 7"),
    "float rows": (lambda d: d.update(rows=d["rows"].astype(np.float64)), r"'rows' must be an integer array"),
    "row out of range": (lambda d: d["rows"].__setitem__(0, 8), r"'rows' must hold row indices in \[0, 8\)"),
    "negative column": (lambda d: d["cols"].__setitem__(0, -1), r"'cols' must hold column indices in \[0, 9\)"),
    "cols length": (lambda d: d.update(cols=d["cols"][:-1]), r"'cols' must be an integer array of shape \(16,\)"),
    "colors length": (lambda d: d.update(colors=d["colors"][:-1]), r"'colors' must be an integer array of shape"),
    "colour out of range": (lambda d: d["colors"].__setitem__(0, 5), r"'colors' must hold colours in \[0, 2\)"),
    "n_colors": (lambda d: d.update(n_colors=np.int64(10**9)), r"'n_colors' must be at most"),
    "m": (lambda d: d.update(m=np.float64(8)), r"'m' must be an integer scalar"),
    "mode": (lambda d: d.update(mode=np.array("sideways")), r"'mode' must be one of"),
    "mode and colouring": (lambda d: d.update(coloring=np.array("row")), r"mode 'fwd' needs coloring 'column'"),
    "colouring": (lambda d: d.update(colors=np.zeros(9, np.int64)), r"two columns of colour 0 share row"),
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_corrupt_plan_files_are_rejected(kind, tmp_path, rng):
    path, data = _saved(tmp_path, rng)
    assert jacobians.SparsePlan.load(path).n_colors == 2
    corrupt, message = CORRUPTIONS[kind]
    corrupt(data)
    np.savez(path, **data)
    with pytest.raises(ValueError, match=r"SparsePlan\.load: .*plan\.npz.*" + message):
        jacobians.SparsePlan.load(path)


def test_corrupt_hessian_plans_and_other_files(tmp_path, rng):
    path, data = _saved(tmp_path, rng, hessian=True)
    good = jacobians.SparsePlan.load(path)
    assert good.coloring in ("star", "acyclic", "column") and good.mode == "auto"
    bad = dict(data, colors=np.zeros_like(data["colors"]), n_colors=np.int64(1))
    np.savez(path, **bad)
    with pytest.raises(ValueError, match=r"SparsePlan\.load: .*expected a \w+ colouring valid for the pattern"):
        jacobians.SparsePlan.load(path)
    keep = np.flatnonzero(data["rows"] != data["cols"])[1:]  # one off-diagonal entry without its mirror
    np.savez(path, **dict(data, rows=data["rows"][keep], cols=data["cols"][keep]))
    with pytest.raises(ValueError, match=r"SparsePlan\.load: .*the Hessian pattern is not symmetric"):
        jacobians.SparsePlan.load(path)
    path.write_bytes(b"not a plan")
    with pytest.raises(ValueError, match=r"SparsePlan\.load: .*plan\.npz is not a plan file"):
        jacobians.SparsePlan.load(path)


def test_a_loaded_plan_for_another_function_is_certified(tmp_path, rng):
    path, _ = _saved(tmp_path, rng)  # the plan of x[1:] * x[:-1] + sin(x[1:]): a valid file
    loaded = jacobians.SparsePlan.load(path)
    x = randn(rng, (9,))
    other = lambda x: x[1:] * x[:-1] + x[:-1] ** 3 * x[-1]  # noqa: E731 - same shapes, another pattern
    got, caught = _lenient(lambda: jacobians.sparse_jacobian(other, sparsity=loaded, output="dense")(x))
    np.testing.assert_allclose(got, jax.jacfwd(other)(x), rtol=1e-12)
    assert len(caught) == 1 and "given sparse Jacobian" in caught[0] and "misses entry" in caught[0]
    with pytest.raises(jacobians.PlanError, match="given sparse Jacobian"):
        jacobians.sparse_jacobian(other, sparsity=loaded)(x)


def test_certificate_tolerance_follows_gpu_windowed_max(monkeypatch):
    # On a GPU JAX computes the JVP of a float64 windowed max with 20 mantissa bits (select_and_gather_add's
    # packed pairs): a check there must allow that rounding, and only where such a primitive runs.
    def pool(x):
        return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (2,), (1,), "VALID") * x[1:]

    x = jnp.linspace(0.0, 1.0, 6)
    closed, plain = jax.make_jaxpr(pool)(x), jax.make_jaxpr(jnp.sin)(x)
    full = 2.0 * float(np.finfo(np.float64).eps) ** 0.5
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    assert _trust.rtol(closed, x.dtype) == pytest.approx(full)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert _trust.rtol(closed, x.dtype) == pytest.approx(2.0 * 2.0**-10)
    assert _trust.rtol(plain, x.dtype) == pytest.approx(full)
    assert _trust.rtol(jax.make_jaxpr(pool)(x.astype(jnp.float32)), jnp.float32) == pytest.approx(
        2.0 * float(np.finfo(np.float32).eps) ** 0.5)


def test_a_planned_program_xla_cannot_compile_gives_the_dense_one(monkeypatch):
    # A compressed plan whose program XLA fails to build (its own crash, e.g. a RET_CHECK) is replaced by
    # the dense program for that call and the next, with a warning (strict: a PlanError).
    def f(x):
        return jnp.sin(x) * 2.0 + jnp.roll(x, 1) ** 2

    x = jnp.linspace(0.1, 1.0, 40)
    failed = failing_compile(monkeypatch)
    g = jacobians.jacobian(f)
    assert g.plan(x).method == "compressed"
    with jacobians.strict(False), pytest.warns(jacobians.PlanWarning, match="XLA failed to compile the compressed"):
        got = g(x)
    assert_tree_allclose(got, jax.jacfwd(f)(x))
    assert g.plan(x).method == "dense"
    assert_tree_allclose(g(x * 2), jax.jacfwd(f)(x * 2))
    failed.clear()  # planned within the call this time, its certificate deferred to the call's end
    with jacobians.strict(False), pytest.warns(jacobians.PlanWarning, match="XLA failed to compile"):
        assert_tree_allclose(jacobians.jacobian(f)(x), jax.jacfwd(f)(x))
    failed.clear()
    with pytest.raises(jacobians.PlanError, match="XLA failed to compile"):
        jacobians.jacobian(f)(x)


def test_a_compiler_option_this_xla_lacks_is_dropped(monkeypatch, rng):
    # The checks' compiler options include ones older XLAs have (the CPU's classic fusion emitters) and newer
    # ones lack ("No such compile option"): the check compiles without them instead of failing the plan.
    options = dict(_trust.COMPILER_OPTIONS, xla_no_such_option_for_jacobians_tests=True)
    monkeypatch.setattr(_trust, "COMPILER_OPTIONS", options)
    f = lambda x: jnp.sin(x) * x  # noqa: E731
    x = randn(rng, (40,))
    plan = jacobians.explain(f, x)
    assert plan.method == "compressed" and plan.certificate.status == "passed"
    assert "xla_no_such_option_for_jacobians_tests" not in _trust.COMPILER_OPTIONS
    np.testing.assert_allclose(jacobians.jacobian(f)(x), jax.jacfwd(f)(x))


@pytest.mark.parametrize("mode", ["fwd", "rev"])
@pytest.mark.parametrize("f", [lambda x: x * (1.0 / x), lambda x: jnp.exp(jnp.log(x)) / x,
                               lambda x: jnp.sin(x) * jnp.cos(x) - 0.5 * jnp.sin(2 * x)],
                         ids=["x_over_x", "exp_log", "double_angle"])
def test_a_jacobian_zero_but_for_rounding_passes_its_certificate(f, mode):
    """Where ``J`` is 0 up to rounding, ``J v`` rounds differently for the plan's seeds and Gaussian directions.

    Strict: a certificate that failed here would raise. The results are JAX's up to that rounding.
    """
    x = jnp.array([0.3, 1.7, 2.9, 5.1, 0.01])
    ref = np.asarray(jax.jacfwd(f)(x))
    for got in (jacobians.sparse_jacobian(f, mode=mode, output="dense")(x), jacobians.jacobian(f, mode=mode)(x)):
        np.testing.assert_allclose(got, ref, atol=1e-13)


def test_jax_failing_to_differentiate_is_jax_error_not_a_plan_error():
    """Where JAX's own derivative raises (a broken rule; ``lax.clamp`` with scalar traced bounds on JAX 0.10),
    the call raises what ``jax.jacfwd`` raises, strict or not: no PlanError blaming the analysis."""

    @jax.custom_jvp
    def g(x):
        return jnp.sin(x)

    @g.defjvp
    def g_jvp(primals, tangents):
        (x,), (dx,) = primals, tangents
        assert x.ndim == 0, "broken rule"
        return g(x), jnp.cos(x) * dx

    x = jnp.array([0.1, 0.5, -0.3])
    with pytest.raises(AssertionError, match="broken rule"):
        jax.jacfwd(g)(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # (the detection's: no rule inside the rule it cannot trace)
        for transform in (jacobians.jacobian, jacobians.sparse_jacobian):
            with pytest.raises(AssertionError, match="broken rule"):
                transform(g)(x)


def test_jax_debug_modes_see_the_users_computations_not_the_checks(rng):
    """Under ``jax.checking_leaks`` no tracer of a plan's trace survives it; under ``jax.debug_nans`` and
    ``jax.transfer_guard`` a check's own points (where ``log`` may be NaN) and transfers raise nothing."""
    x = jnp.linspace(0.5, 3.0, 40)
    f = lambda v: jnp.log(v) * v[::-1]  # noqa: E731 - a random point near x has negative entries
    ref = jax.jacfwd(f)(x)
    with jax.checking_leaks():
        np.testing.assert_allclose(jacobians.jacobian(f)(x), ref, rtol=1e-12)
        np.testing.assert_allclose(jacobians.sparse_jacobian(f, output="dense")(x), ref, rtol=1e-12)
    with jax.debug_nans(True):
        np.testing.assert_allclose(jacobians.jacobian(f)(x), ref, rtol=1e-12)
        h = jacobians.hessian(lambda v: jnp.sum(f(v)))(x)
        np.testing.assert_allclose(h, jax.hessian(lambda v: jnp.sum(f(v)))(x), rtol=1e-12)
    xd = jax.device_put(randn(rng, (40,)))
    with jax.transfer_guard("disallow"):
        J = jacobians.jacobian(lambda v: jnp.sin(v) * v[::-1])(xd)
    np.testing.assert_allclose(J, jax.jacfwd(lambda v: jnp.sin(v) * v[::-1])(xd), rtol=1e-12)


def test_a_check_compiled_another_way_than_the_call_allows_its_rounding(monkeypatch):
    """float32 tanh near saturation: 1 - tanh(x)**2 rounds to 0 or to 7e-7 depending on XLA's optimisation level.

    The call's program is compiled as JAX compiles (here the suite's level 0), the check's reference for speed
    (here level 3, the other way round from a user's process): the check retries JAX's products compiled as
    the call's program was, and the plan passes (it failed its certificate, strict: raised).
    """
    monkeypatch.setitem(_trust.COMPILER_OPTIONS, "xla_backend_optimization_level", 3)
    f = lambda x: jnp.tanh(x * 2.0)  # noqa: E731
    x = jnp.arange(8.0, dtype=jnp.float32)
    J = jacobians.jacobian(f)
    np.testing.assert_allclose(J(x), jax.jit(jax.jacfwd(f))(x), rtol=1e-6, atol=1e-6)
    plan = J.plan(x)
    assert plan.method == "compressed" and plan.certificate.status == "passed", plan
