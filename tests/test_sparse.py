"""Sparse Jacobians: detected patterns are conservative (exact where they can be), colourings
are valid, compressed evaluation equals the dense Jacobian, detection is cached."""

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import bcoo_to_dense, failing_compile, randn, reference
from registry import CASES, names, stencil_1d, stencil_2d

import jacobians
from jacobians._sparse import coloring as _coloring

SPARSE = names(exclude=("dense", "book"))


# "auto" on every case; both directions on a representative few (every family once).
BOTH = ("stencil_2d", "block_diagonal", "conv_same", "gather_scatter", "scan_xs_per_step", "custom_jvp_and_jit",
        "cumsum", "pad_traced_value", "at_set_slice", "cholesky_batch", "custom_vjp", "while_shift")
MODES = [(n, "auto") for n in SPARSE] + [
    (n, m) for n in BOTH for m in ("fwd", "rev") if getattr(CASES[n], m)
]


@pytest.mark.parametrize("name, mode", MODES)
def test_sparse_equals_dense(rng, name, mode):
    c = CASES[name]
    f, shape = c.fun, c.shape
    x = randn(rng, shape)
    ref = reference(c, x)
    # The default output (BCOO) on every case and mode, its entries read in NumPy. Both outputs place the
    # same compressed values at the pattern's (row, column) pairs, whichever the direction; output="dense"
    # (a scatter of them) is checked once on each representative case.
    bcoo = jacobians.sparse_jacobian(f, mode=mode)(x)
    assert bcoo.shape == ref.shape
    np.testing.assert_allclose(bcoo_to_dense(bcoo), ref, rtol=1e-12, atol=1e-12)
    if name in BOTH and mode == "auto":
        dense = jacobians.sparse_jacobian(f, mode=mode, output="dense")(x)
        np.testing.assert_allclose(dense, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", SPARSE)
def test_colourings_are_valid(rng, name):
    c = CASES[name]
    p = jacobians.sparsity(c.fun, randn(rng, c.shape))
    m, n = int(np.prod(p.out_shape)), int(np.prod(p.in_shape))
    M = p.to_dense().reshape(m, n)
    for colors, mat in ((_coloring.color_columns(p.rows, p.cols, n), M), (_coloring.color_rows(p.rows, p.cols, m), M.T)):
        for c in np.unique(colors):
            # Within a colour, no row (column) has two nonzeros.
            assert np.all(mat[:, colors == c].sum(axis=1) <= 1)


def test_colour_counts_are_small():
    p = jacobians.sparsity(stencil_1d, jnp.ones(50))
    assert _coloring.color_columns(p.rows, p.cols, 50).max() + 1 == 3
    p = jacobians.sparsity(stencil_2d, jnp.ones((10, 10)))
    assert _coloring.color_columns(p.rows, p.cols, 100).max() + 1 <= 6
    p = jacobians.sparsity(lambda x: jnp.sin(x) * x, jnp.ones(100))
    assert _coloring.color_columns(p.rows, p.cols, 100).max() + 1 == 1


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


def _primitive_without_a_rule():
    """``2 x`` as a primitive of the test's own (linear, batched, lowered): no analysis has a rule for it."""
    from jax.extend import core as jcore
    from jax.interpreters import ad, batching, mlir

    twice = jcore.Primitive("twice_no_rule")
    twice.def_impl(lambda x: 2 * x)
    twice.def_abstract_eval(lambda x: x)
    mlir.register_lowering(twice, mlir.lower_fun(lambda x: 2 * x, multiple_results=False))
    ad.deflinear2(twice, lambda ct, x: [twice.bind(ct)])
    batching.defvectorized(twice)
    return twice


def test_unknown_primitive_warns_and_stays_conservative(rng):
    twice = _primitive_without_a_rule()
    f = lambda x: twice.bind(jnp.sin(x)).sum() * x  # noqa: E731
    x = randn(rng, (4,))
    with pytest.warns(UserWarning, match=r"no sparsity rule for 'twice_no_rule'"):
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
    with pytest.raises(ValueError, match=r"output must be one of \('bcoo', 'dense', 'csr', 'csc'\), got 'coo'"):
        jacobians.sparse_jacobian(stencil_1d, output="coo")
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
    c = CASES["custom_vjp"]
    assert jacobians.sparse_jacobian(c.fun).plan(randn(rng, c.shape)).mode == "rev"
    c = CASES["while_shift"]
    assert jacobians.sparse_jacobian(c.fun).plan(randn(rng, c.shape)).mode == "fwd"
    # A direction forced where JAX cannot go is the caller's error, said at once (not a failed certificate).
    with pytest.raises(ValueError, match="mode='rev' pulls VJPs, which JAX cannot"):
        jacobians.sparse_jacobian(c.fun, mode="rev")(randn(rng, c.shape))
    c = CASES["custom_vjp"]
    with pytest.raises(ValueError, match="mode='fwd' pushes JVPs"):
        jacobians.sparse_jacobian(c.fun, mode="fwd")(randn(rng, c.shape))


def test_small_products_fold_their_seeds(rng):
    # A small convolution with a closed-over kernel: one pass times the colours is far below FOLD_WORK, so
    # the seeds are plain constants and XLA folds them with the kernel (3.5x faster); the values are exact.
    K = jnp.asarray(rng.standard_normal((3, 2, 3, 3)))
    g = lambda x: jnp.tanh(jax.lax.conv_general_dilated(x[None], K, (1, 1), "SAME")[0])  # noqa: E731
    x = jnp.asarray(rng.standard_normal((2, 6, 6)))
    for jf in (jacobians.sparse_jacobian(g, output="dense"), jacobians.jacobian(g, method="compressed")):
        wrapped = jax.jit(jf)
        assert "optimization_barrier" not in wrapped.lower(x).as_text()
        np.testing.assert_allclose(wrapped(x), jax.jacfwd(g)(x), rtol=1e-12, atol=1e-12)


def test_host_index_kernels(rng):
    """kernels.take/place equal NumPy's indexing for runs, sorted, unsorted and traced indices (no scatter kept for a full write)."""
    from jacobians import kernels

    flat = jnp.asarray(rng.standard_normal(50))
    for index in (np.arange(7, 19), np.array([3, 3, 9, 1]), np.sort(rng.choice(50, 12, replace=False)),
                  rng.choice(50, 12, replace=False)):
        np.testing.assert_array_equal(kernels.take(flat, index), np.asarray(flat)[index])
        np.testing.assert_array_equal(jax.jit(kernels.take)(flat, index), np.asarray(flat)[index])
    vals = jnp.asarray(rng.standard_normal(12), jnp.float32)
    for index in (np.sort(rng.choice(50, 12, replace=False)), rng.choice(50, 12, replace=False)):
        want = np.zeros(50, np.float64)
        want[index] = np.asarray(vals)
        got = kernels.place(50, index, vals, jnp.float64)
        assert got.dtype == jnp.float64
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(jax.jit(kernels.place, static_argnums=0)(50, index, vals), want)
    full = kernels.place(12, np.arange(12), vals)
    np.testing.assert_array_equal(full, vals)
    assert "scatter" not in str(jax.make_jaxpr(lambda v: kernels.place(12, np.arange(12), v))(vals))
    assert "gather" not in str(jax.make_jaxpr(lambda f: kernels.take(f, np.arange(7, 19)))(flat))


def test_host_index_kernels_reject_what_they_cannot_read():
    from jacobians import kernels

    flat = jnp.arange(6.0)
    np.testing.assert_array_equal(kernels.take(flat, [4, 1]), [4.0, 1.0])  # a list is a host index
    with pytest.raises(TypeError, match="1-D integer index"):
        kernels.take(flat, np.array([[0, 1]]))
    with pytest.raises(TypeError, match="1-D integer index"):
        kernels.place(6, np.array([True, False]), jnp.ones(2))


def test_dense_from_entries_one_select_or_a_scatter(rng):
    """kernels.from_entries equals NumPy's assignment; a matrix with at most one entry per row is one select."""
    from jacobians import kernels

    m, n = 7, 5
    for rows, cols in (
        (np.arange(5), rng.permutation(5)),  # one entry in each of five rows (two rows empty)
        (np.arange(7), rng.integers(0, 5, 7)),  # one per row, every row
        (np.array([0, 0, 3, 6]), np.array([1, 4, 2, 0])),  # a row with two: the scatter
    ):
        vals = jnp.asarray(rng.standard_normal(rows.size))
        want = np.zeros((m, n))
        want[rows, cols] = np.asarray(vals)
        got = kernels.from_entries((m, n), rows, cols, vals)
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(jax.jit(lambda v, r=rows, c=cols: kernels.from_entries((m, n), r, c, v))(vals),
                                      want)
    program = str(jax.make_jaxpr(lambda v: kernels.from_entries((7, 5), np.arange(7), np.arange(7) % 5, v))(
        jnp.ones(7)))
    assert "scatter" not in program and "select_n" in program


@pytest.mark.parametrize("mode", ["fwd", "rev"])
def test_dense_results_read_off_the_compressed_products(rng, mode, monkeypatch):
    """A dense compressed Jacobian reads each block off the products (one row gather, a select against the
    block's pattern where same-coloured columns share a row, nothing where none do); every block of a
    pytree equals JAX's, and a large mask is an argument of the compiled program, not a constant."""
    from jacobians import _hoist
    from jacobians._sparse import engine

    seen = []
    decide = engine._dense_block
    monkeypatch.setattr(engine, "_dense_block", lambda *a: seen.append(decide(*a)) or seen[-1])
    K = jnp.asarray(rng.standard_normal((4, 2, 3, 3)))

    def f(p):  # two input leaves, two output leaves: four blocks, stencils (masked) and diagonals
        conv = jnp.tanh(jax.lax.conv_general_dilated(p["x"][None], K, (1, 1), "SAME")[0])
        return {"conv": conv * p["s"][:, None, None], "diag": jnp.sin(p["s"]) * p["x"][0, 0, :4]}

    p = {"x": randn(rng, (2, 10, 10)), "s": randn(rng, (4,))}  # the conv block's mask: 400 x 200 bytes
    jf = jacobians.sparse_jacobian(f, mode=mode, output="dense")
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12), jf(p),
                           jax.jacfwd(f)(p))
    masks = [mask for how, mask in seen if how == "mask"]
    assert masks, seen
    assert any(isinstance(m, jax.Array) and m.nbytes >= _hoist.HOIST_BYTES for m in masks)
    # The diagonal-like blocks: at most one entry per row, a select against an iota.
    assert any(how == "entries" for how, _ in seen)
    np.testing.assert_allclose(jax.jit(jf)(p)["conv"]["x"], jax.jacfwd(f)(p)["conv"]["x"], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", ["fwd", "rev"])
def test_dense_results_of_conflict_free_colourings_are_the_products(rng, mode, monkeypatch):
    from jacobians import kernels
    from jacobians._sparse import engine

    seen = []
    decide = engine._dense_block
    monkeypatch.setattr(engine, "_dense_block", lambda *a: seen.append(decide(*a)[0]) or decide(*a))

    # Output "a" depends densely on input "a" only, "b" on "b" elementwise: "b"'s columns reuse "a"'s
    # colours but touch none of "a"'s rows, so block (a, a) is its products; block (b, b) is a diagonal.
    W = jnp.arange(1.0, 10.0).reshape(3, 3)
    f = lambda p: {"a": jnp.tanh(W @ p["a"]), "b": jnp.sin(p["b"])}  # noqa: E731
    x = {"a": randn(rng, (3,)), "b": randn(rng, (5,))}
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12),
                           jacobians.sparse_jacobian(f, mode=mode, output="dense")(x), jax.jacfwd(f)(x))
    assert sorted(set(seen)) == ["entries", "full"], seen
    C = jnp.asarray(rng.standard_normal((3, 12)))
    colors = np.arange(12) % 3
    full = kernels.compressed_dense(C, colors, "fwd", (2, 7), (1, 12))
    np.testing.assert_array_equal(full, np.asarray(C)[colors[1:12]][:, 2:7].T)
    np.testing.assert_array_equal(kernels.compressed_dense(C, colors, "rev", (1, 3), (2, 7)),
                                  np.asarray(C)[colors[1:3]][:, 2:7])


@pytest.mark.parametrize("hessian", [False, True])
def test_a_program_xla_cannot_compile_falls_back_to_every_entry(hessian, monkeypatch):
    # A sparse program XLA's compiler refuses gives way, once, to the dense plan (strict: an error).
    f = lambda x: jnp.sin(x[1:]) * x[:-1] ** 2  # noqa: E731  (banded)
    g = lambda x: jnp.sum(f(x) ** 2)  # noqa: E731
    x = jnp.linspace(0.3, 1.7, 7)
    make, ref = (jacobians.sparse_hessian, jax.hessian(g)) if hessian else (jacobians.sparse_jacobian, jax.jacfwd(f))
    fn = make(g if hessian else f, output="dense")
    failed = failing_compile(monkeypatch)
    with jacobians.strict(False), pytest.warns(jacobians.PlanWarning, match="XLA failed to compile the sparse"):
        got = fn(x)
    np.testing.assert_allclose(got, ref(x), rtol=1e-12, atol=1e-12)
    plan = fn.plan(x)
    assert failed and plan.pattern.nnz == math.prod(plan.pattern.in_shape) * math.prod(plan.pattern.out_shape)
    failed.clear()
    with pytest.raises(jacobians.PlanError, match="XLA failed to compile"):
        make(g if hessian else f, output="dense")(x)
