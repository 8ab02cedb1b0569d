"""Sparsity detection: soundness (never misses a nonzero), tightness on structured cases, robustness.

Every case is checked against the dense Jacobian from ``jax.jacfwd`` at fresh
random points: the detected pattern must contain every nonzero, and on the
cases marked exact it must equal the union of nonzeros over the points.
"""

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import randn, reference
from registry import CASES

import jacobians
from jacobians import _walker


@pytest.mark.parametrize("name", sorted(CASES))
def test_pattern_is_sound_and_tight(name, rng):
    """The detected pattern contains every nonzero at random points, and equals their union where exact."""
    c = CASES[name]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every primitive in the registry has a rule
        pattern = jacobians.sparsity(c.fun, randn(rng, c.shape))
    mask = pattern.to_dense()
    nz = np.zeros_like(mask)
    for _ in range(3):
        nz |= np.asarray(reference(c, randn(rng, c.shape))) != 0
    assert mask.shape == nz.shape == pattern.shape
    missed = np.argwhere(nz & ~mask)
    assert not missed.size, f"the pattern misses nonzeros at {missed[:5].tolist()}"
    if c.exact:
        np.testing.assert_array_equal(mask, nz)


def test_custom_vjp_rule_denser_than_primal(rng):
    @jax.custom_vjp
    def f(x):
        return x * 0.0 + x[0]

    f.defvjp(lambda x: (f(x), None), lambda _, ct: (jnp.cumsum(ct[::-1])[::-1],))  # upper-triangular ones
    x = randn(rng, (4,))
    # J[i, j] = 1 for j <= i (the transpose of the pullback's upper-triangular map)
    np.testing.assert_array_equal(jacobians.sparsity(f, x).to_dense(), np.tril(np.ones((4, 4), bool)))
    np.testing.assert_allclose(jacobians.sparse_jacobian(f, output="dense")(x), jax.jacrev(f)(x))


def test_detection_inside_jit(rng):
    def f(x):
        return jnp.concatenate([x[1:] - x[:-1], jnp.pad(x, 1)[jnp.array([0, 3])]])

    x = randn(rng, (6,))
    expected = jax.jacfwd(f)(x)
    np.testing.assert_allclose(jax.jit(jacobians.sparse_jacobian(f, output="dense"))(x), expected)

    @jax.jit
    def g(x):
        return jnp.asarray(jacobians.sparsity(f, x).nnz) + 0 * x.sum()

    assert int(g(x)) == int(np.count_nonzero(expected))


def test_walker_checks_rule_invariants():
    from jacobians import _deps

    def broken(lat, eqn, ins):
        return [_deps.empty((7,))]

    rules = dict(_deps.DepsLattice.rules)
    lat = _deps.DepsLattice(3)
    lat.rules = {**rules, "sin": broken}
    closed = jax.make_jaxpr(jnp.sin)(jnp.ones(3))
    with pytest.raises(_walker.InternalError, match=r"rule for 'sin' produced a bad value: shape \(7,\)"):
        _walker.Walker(lat).run(closed, [_deps.identity((3,))])


def test_pytree_patterns(rng):
    def f(a, b):
        return {"s": a["u"] * b, "t": jnp.sum(a["v"]) * jnp.ones(2)}

    a = {"u": randn(rng, (3,)), "v": randn(rng, (2,))}
    b = randn(rng, (3,))
    pat = jacobians.sparsity(f, a, b, argnums=(0, 1))
    ref = jax.jacfwd(f, argnums=(0, 1))(a, b)
    for p, r in zip(jax.tree_util.tree_leaves(pat, is_leaf=lambda z: isinstance(z, jacobians.SparsityPattern)),
                    jax.tree_util.tree_leaves(ref)):
        assert p.shape == r.shape
        assert not np.any((np.asarray(r) != 0) & ~p.to_dense())


@pytest.mark.parametrize(
    "f",
    [
        lambda x: jax.lax.pad(x, np.int32(-1), ((2, -1, 1), (-1, 3, 0))),
        lambda x: jax.lax.slice(x, (1, 0), (4, 3), (2, 2)),
        lambda x: jax.lax.dynamic_slice(x, (3, -2), (2, 2)),
        lambda x: jax.lax.dynamic_update_slice(x, x[:2, :2] * 0 + 7, (9, 1)),
        lambda x: jnp.concatenate([jnp.tile(x[:1], (2, 1)), x[::-1], x.T.reshape(4, 3)]),
        lambda x: jnp.split(x, [1, 3], axis=0)[1],
        lambda x: jax.lax.broadcast_in_dim(x[0], (2, 3, 3), (2,)) + jax.lax.iota(jnp.int32, 3)[None, None],
        lambda x: jnp.where(x > 5, x, -x) * 2 - 1,
    ],
)
def test_host_evaluation_matches_xla(f):
    """The NumPy shortcuts used while folding and moving element numbers agree with XLA."""
    from jacobians import _host_eval

    x = np.arange(12, dtype=np.int32).reshape(4, 3)
    closed = jax.make_jaxpr(f)(x)
    env = dict(zip(closed.jaxpr.invars, [x]))
    for eqn in closed.jaxpr.eqns:
        args = [np.asarray(v.val) if hasattr(v, "val") else env[v] for v in eqn.invars]
        want = eqn.primitive.bind(*args, **eqn.params)
        want = want if eqn.primitive.multiple_results else [want]
        got = _host_eval.evaluate(eqn.primitive.name, eqn.params, args, [v.aval.dtype for v in eqn.outvars])
        if got is not None:
            for g, w in zip(got, want):
                np.testing.assert_array_equal(g, np.asarray(w), err_msg=eqn.primitive.name)
        for v, w in zip(eqn.outvars, want):
            env[v] = np.asarray(w)


def test_budget_stops_an_operation_before_it_builds_its_sets():
    """A broadcast of a large set past the budget raises TooDense inside the gather, before allocating it.

    (A third derivative's detection broadcast a 1024-input set over 10^6 elements: 8 GiB.)
    """
    from jacobians import _deps

    def f(x):
        return jnp.broadcast_to(jnp.sum(x), (1000,)) * 2.0

    closed = jax.make_jaxpr(f)(jnp.ones(100))
    with pytest.raises(_deps.TooDense, match="gather"):
        _deps.detect(closed, [_deps.identity((100,))], 100, where="test", max_nnz=1000)
    (out,), _ = _deps.detect(closed, [_deps.identity((100,))], 100, where="test", max_nnz=100_000)
    assert out.nnz == 100_000  # within budget: the full sets


def test_budget_holds_inside_custom_rules_local_walks():
    """A custom_jvp rule's local pattern is walked by a lattice of its own: the outer budget still holds there."""
    from jacobians import _deps

    @jax.custom_jvp
    def spread(x):
        return jnp.broadcast_to(jnp.sum(x), (1000,))

    @spread.defjvp
    def spread_jvp(primals, tangents):
        (x,), (t,) = primals, tangents
        return spread(x), jnp.broadcast_to(jnp.sum(t), (1000,))

    closed = jax.make_jaxpr(lambda x: spread(x) * 2.0)(jnp.ones(100))
    with pytest.raises(_deps.TooDense, match="^(gather|everything)$"):  # inside the rule, before building the sets
        _deps.detect(closed, [_deps.identity((100,))], 100, where="test", max_nnz=1000)
    (out,), _ = _deps.detect(closed, [_deps.identity((100,))], 100, where="test", max_nnz=100_000)
    assert out.nnz == 100_000


def test_a_dense_rule_counts_as_dense_past_its_cap(monkeypatch, rng):
    """A custom rule's local walk over k x k matrix entries held k^4 entries (slogdet's solve; k = 64: 2.4 GB).

    Past the cap the rule counts as dense (every output reads every input): the pattern stays a superset,
    exact here, and a large elementwise rule (relu, softplus: linear in its size) is never cut.
    """
    from jacobians._deps import _custom

    n = 10
    W = randn(rng, (n, n))
    f = lambda z: z * jnp.sin(jnp.linalg.slogdet(W * z[None, :])[1])  # noqa: E731
    x = randn(rng, (n,))
    exact = jacobians.sparsity(f, x).to_dense() != 0
    assert exact.all()  # z_i sin(log|det|) reads every z
    monkeypatch.setattr(_custom, "LOCAL_MAX", 1)
    monkeypatch.setattr(_custom, "LOCAL_PER", 1)  # the slogdet rule's walk (n^4 entries) now outgrows its cap
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a dense rule is a verdict, not an untraceable one: no warning
        capped = jacobians.sparsity(f, x).to_dense() != 0
    np.testing.assert_array_equal(capped, exact)
    np.testing.assert_array_equal(capped.reshape(n, n) | (jax.jacfwd(f)(x) != 0), capped.reshape(n, n))  # sound
    # Under the tiny cap an elementwise custom rule stays diagonal: its walk is linear in its size.
    y = randn(rng, (50,))
    relu = jacobians.sparsity(lambda y: jax.nn.relu(y) + jax.nn.softplus(y), y)
    assert relu.nnz == 50


def test_derivative_programs_of_tanh_are_elementwise(rng):
    # From JAX 0.11 on, tanh's JVP is one_minus_square(tanh x): a primitive of its own, elementwise. Without
    # a rule for it every derivative program of a tanh network was read as dense (and warned).
    x = randn(rng, (7,))
    g = jax.grad(lambda x: jnp.sum(jnp.tanh(x) * x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pattern = jacobians.sparsity(g, x)
        np.testing.assert_allclose(jacobians.divergence(g)(x), np.trace(jax.jacfwd(g)(x)), rtol=1e-12)
    assert pattern.nnz == 7
    np.testing.assert_array_equal(pattern.to_dense().reshape(7, 7) != 0, np.eye(7, dtype=bool))


@pytest.mark.skipif(not hasattr(jax.lax, "polynomial"), reason="lax.polynomial and log2 are JAX >= 0.12 primitives")
def test_polynomial_and_log2_primitives(rng):
    # Horner's polynomial(x, *coeffs) and log2: elementwise (coefficients broadcast like any operand).
    c = jnp.asarray(randn(rng, (7,)))

    def f(x):
        return jax.lax.polynomial(x, [0.5, c, 2.0, -1.0]) + jnp.log2(x * x + 1.0)

    x = randn(rng, (7,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pattern = jacobians.sparsity(f, x)
        np.testing.assert_allclose(jacobians.jacobian(f)(x), jax.jacfwd(f)(x), rtol=1e-12)
        h = lambda x: jnp.sum(f(x) * jnp.roll(x, 1))  # noqa: E731
        np.testing.assert_allclose(jacobians.sparse_hessian(h, output="dense")(x), jax.hessian(h)(x), rtol=1e-10)
        np.testing.assert_allclose(jacobians.laplacian(h)(x), np.trace(jax.hessian(h)(x)), rtol=1e-10)
    assert pattern.nnz == 7


def test_random_gamma_is_elementwise_in_its_shape(rng):
    # jax.random.gamma(key, a): a draw differentiable in a (implicit reparameterisation), element by element;
    # the key (one, or one per row under vmap: a (3,) key array beside a (3, 2) a) carries no derivative. It
    # had no rule: a dense pattern and a warning. (About 3 s: XLA compiles gamma's rejection sampler.)
    key = jax.random.key(int(rng.integers(2**31)))
    keys = jax.random.split(key, 3)
    a = jnp.asarray(rng.uniform(0.5, 3.0, (3, 2)))
    per_row = lambda a: jax.vmap(jax.random.gamma)(keys, a)  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for f in (lambda a: jax.random.gamma(key, a), per_row):
            pattern = jacobians.sparsity(f, a)
            np.testing.assert_array_equal(pattern.to_dense().reshape(6, 6), np.eye(6, dtype=bool))
        np.testing.assert_allclose(jacobians.jacobian(per_row)(a), jax.jacfwd(per_row)(a), rtol=1e-10, atol=1e-12)


def test_scatter_apply_is_a_function_of_the_operand(rng):
    """``x.at[i].apply(f)`` (a ``scatter`` with an update function) keeps the applied entries' dependence.

    JAX cannot differentiate it, so the closed form is the reference: ``diag(cos x_i at i, 1 elsewhere)``;
    its Hessian (of a sum of squares) is diagonal, the applied entries' included.
    """
    idx = jnp.array([0, 2])
    f = lambda x: x.at[idx].apply(jnp.sin)  # noqa: E731
    x = randn(rng, (4,))
    np.testing.assert_array_equal(jacobians.sparsity(f, x).to_dense(), np.eye(4, dtype=bool))
    h = jacobians.hessian_sparsity(lambda x: jnp.sum(f(x) ** 2), x).to_dense()
    np.testing.assert_array_equal(h, np.eye(4, dtype=bool))
    # ``.set`` still forgets what it overwrites
    g = lambda x: x.at[idx].set(2 * x[1:3])  # noqa: E731
    np.testing.assert_array_equal(jacobians.sparsity(g, x).to_dense(), np.asarray(jax.jacfwd(g)(x)) != 0)


def test_scan_of_zero_length(rng):
    """A scan over no steps: the carry passes through, the stacked outputs are empty."""
    f = lambda x: jnp.concatenate([  # noqa: E731
        jax.lax.scan(lambda c, t: (c * t, c * t), x[0], x[:0])[1], x[1:] * jax.lax.scan(
            lambda c, t: (c * t, c), x[0], x[:0])[0]])
    x = randn(rng, (4,))
    ref = np.asarray(jax.jacfwd(f)(x))
    np.testing.assert_array_equal(jacobians.sparsity(f, x).to_dense(), ref != 0)
    np.testing.assert_allclose(jacobians.jacobian(f)(x), ref, rtol=1e-12)


_TRACED_INDEX = {  # fun, n, the pattern's nnz: the union over every value the traced index can take
    "dynamic_slice": (lambda x: jax.lax.dynamic_slice(x, (jnp.argmax(x[:2]),), (3,)), 5, 6),
    "dynamic_update_slice": (lambda x: jax.lax.dynamic_update_slice(x[:5], jnp.sin(x[5:7]),
                                                                    (jnp.argmax(x[:2]),)), 8, 8),
    "gather_2d": (lambda x: x.reshape(4, 3)[jnp.argmax(x[:3]), jnp.argmax(x[3:6])], 12, 9),
    "take_offsets": (lambda x: jnp.take(x, jnp.array([0, 1]) + jnp.argmax(x[:2])), 4, 4),
    "set": (lambda x: x[:3].at[jnp.argmax(x[3:])].set(x[3]), 5, 5),
    "scatter_add": (lambda x: x[:4].at[jnp.stack([jnp.argmax(x[4:6]), jnp.argmax(x[6:8])])].add(x[6:8] ** 2),
                    8, 8),
    "clipped": (lambda x: x[jnp.clip(jnp.floor(x[0] * 3).astype(jnp.int32), 1, 2)] * x[:3], 6, 7),
    "cond_joined": (lambda x: jax.lax.dynamic_slice(x, (jax.lax.cond(x[0] > 0, lambda: jnp.argmax(x[1:3]),
                                                                     lambda: jnp.argmax(x[3:5]) + 1),), (2,)), 8, 6),
    # integer division of an index (jnp's floor division: lax.div, then a correction by the remainder's sign)
    "floor_div": (lambda x: jnp.take(x[4:], jnp.argmax(x[:4]) // 2, mode="clip") * x[4:], 8, 10),
    "div_toward_zero": (lambda x: jnp.take(x[4:], jax.lax.div(jnp.argmax(x[:4]) - 3, 2), mode="clip") * x[4:],
                        8, 7),
    # the pivots of batched LU solves: each system's solution depends on its own matrix and right side only
    "batched_solve": (lambda x: jnp.linalg.solve(x[:48].reshape(3, 4, 4) + 3 * jnp.eye(4)[None],
                                                 x[48:60].reshape(3, 4, 1)).reshape(-1), 60, 240),
}


@pytest.mark.parametrize("name", sorted(_TRACED_INDEX))
def test_traced_indices_take_the_union_over_their_values(name, rng):
    """Indices computed from the input (argmax, a clip, pivots): sound, and exactly the values they can take.

    An index's bounds come from what computes it (``argmax`` over 2: 0 or 1; ``+ [0, 1]``; ``clip``; JAX's wrap
    of negative indices is decided false on them): the pattern equals the union of nonzeros over random points.
    """
    f, n, nnz = _TRACED_INDEX[name]
    pattern = jacobians.sparsity(f, randn(rng, (n,)))
    mask = pattern.to_dense()
    nz = np.zeros_like(mask)
    for _ in range(12):
        nz |= np.asarray(jax.jacfwd(f)(randn(rng, (n,)))) != 0
    assert not (nz & ~mask).any(), "the pattern misses nonzeros"
    assert pattern.nnz == nnz
    x = randn(rng, (n,))
    np.testing.assert_allclose(jacobians.sparse_jacobian(f, output="dense")(x), jax.jacfwd(f)(x), atol=1e-12)


def _argmax4(x, dtype=jnp.int32):
    return jnp.argmax(x[:4]).astype(dtype)  # 0 .. 3


_BOUNDS_EDGES = {  # fun, n: index arithmetic whose bounds must not be too narrow (a review's counterexamples)
    "clamp_traced": (lambda x: jax.lax.dynamic_slice(x, (jax.lax.clamp(jnp.int32(0), jnp.int32(3), _argmax4(x)),),
                                                     (1,)), 8),
    "unsigned_wrap": (lambda x: jax.lax.dynamic_slice(x, (_argmax4(x, jnp.uint32) - jnp.uint32(1),), (1,)), 8),
    "narrowing_wrap": (lambda x: jax.lax.dynamic_slice(
        x, ((jnp.argmax(x[:300]).astype(jnp.int32) + 100).astype(jnp.int8),), (1,)), 400),
    "rem_by_zero": (lambda x: jax.lax.dynamic_slice(x, (jax.lax.rem(jnp.int32(7), _argmax4(x)),), (1,)), 10),
    "div_by_zero": (lambda x: jax.lax.dynamic_slice(x, (jax.lax.div(jnp.int32(7), _argmax4(x)) + 2,), (1,)), 10),
    "bitcast_wrap": (lambda x: jax.lax.dynamic_slice(
        x, (jax.lax.bitcast_convert_type(_argmax4(x) - 1, jnp.uint32) // jnp.uint32(2 ** 28),), (1,)), 20),
    "overflow": (lambda x: jax.lax.dynamic_slice(x, (_argmax4(x) + jnp.int32(2 ** 31 - 1),), (1,)), 8),
    "scatter_set_two_traced": (lambda x: x[4:10].at[jnp.stack([jnp.argmax(x[:2]), jnp.argmax(x[2:4]) + 1])].set(
        x[10:12]), 12),
    "nan_start": (lambda x: jax.lax.dynamic_slice(
        x, (jax.lax.cond(x[0] > 0, lambda: jnp.float64(jnp.nan), lambda: jnp.float64(5.0)).astype(jnp.int32),),
        (2,)), 8),
}


@pytest.mark.parametrize("name", sorted(_BOUNDS_EDGES))
def test_index_bounds_never_too_narrow(name, rng):
    """Wrap-around, a clamp's traced bound, remainders by zero, NaN made an index, two traced scatter indices."""
    f, n = _BOUNDS_EDGES[name]
    mask = jacobians.sparsity(f, randn(rng, (n,))).to_dense()
    for _ in range(12):
        nz = np.asarray(jax.jacfwd(f)(randn(rng, (n,)))) != 0
        assert not (nz & ~mask).any(), f"the pattern misses nonzeros at {np.argwhere(nz & ~mask)[:3].tolist()}"


def _nonzeros(f, x, rng, points=2) -> np.ndarray:
    """The union of ``jax.jacfwd(f)``'s nonzeros over random points near ``x``, as an (m, n) mask."""
    out = None
    for _ in range(points):
        J = np.asarray(jax.jacfwd(f)(x + 0.05 * rng.standard_normal(x.shape)))
        J = J.reshape(-1, x.size) != 0
        out = J if out is None else out | J
    return out


@pytest.mark.parametrize("left", [True, False])
@pytest.mark.parametrize("lower", [True, False])
@pytest.mark.parametrize("transpose_a", [True, False])
@pytest.mark.parametrize("unit_diagonal", [True, False])
def test_triangular_solve_pattern_is_the_substitution(left, lower, transpose_a, unit_diagonal, rng):
    """Each solution entry reads its own right-hand side up to it and the triangle's rows up to it: exact."""
    m, k = 4, 3
    a = rng.standard_normal((2, m, m)) + 3 * np.eye(m)
    b = rng.standard_normal((2, m, k) if left else (2, k, m))

    def f(v):  # a and b both differentiated, batched
        A, B = v[: a.size].reshape(a.shape), v[a.size :].reshape(b.shape)
        return jax.lax.linalg.triangular_solve(A, B, left_side=left, lower=lower, transpose_a=transpose_a,
                                               unit_diagonal=unit_diagonal)

    x = np.concatenate([a.ravel(), b.ravel()])
    mask = jacobians.sparsity(f, x).to_dense().reshape(-1, x.size)
    np.testing.assert_array_equal(mask, _nonzeros(f, x, rng))
    assert mask.sum() < mask.size / 4  # far from the batched dense rule (each entry: its whole matrix and column)


@pytest.mark.parametrize("symmetrize", [True, False])
def test_cholesky_pattern_is_sound_and_triangular(symmetrize, rng):
    """``L[i, j]`` reads the leading rectangles only; the masked upper triangle reads nothing."""
    m = 5
    A = rng.standard_normal((2, m, m))
    A = A @ np.swapaxes(A, -1, -2) + m * np.eye(m)

    def f(a):
        return jnp.sin(jax.lax.linalg.cholesky(a, symmetrize_input=symmetrize))

    mask = jacobians.sparsity(f, A).to_dense().reshape(-1, A.size)
    nz = _nonzeros(f, A, rng)
    assert not (nz & ~mask).any(), "the pattern misses nonzeros"
    rows = mask.reshape(2, m, m, -1)
    assert not rows[:, np.triu_indices(m, 1)[0], np.triu_indices(m, 1)[1]].any()  # tril's zeros
    assert not rows[0, :, :, A[0].size :].any()  # the batch stays apart
    if symmetrize and jax.__version_info__ >= (0, 10):  # older JVP rules read less than the rectangles
        np.testing.assert_array_equal(mask, nz)  # L[i, j] reads exactly rows <= i, columns <= j and the transposes
    assert mask.sum() < 0.5 * 2 * (m * (m + 1) // 2) * m * m  # the old rule: every entry its whole matrix


def test_tridiagonal_solve_keeps_columns_apart(rng):
    """Column ``c`` of the solution reads column ``c`` of ``b`` and the diagonals: a vmap over shared diagonals
    stays per-example (``batch_jacobian``), and the pattern over every operand is exact."""
    m, c = 4, 3
    shapes = [(2, m)] * 3 + [(2, m, c)]
    sizes = [math.prod(s) for s in shapes]

    def f(v):
        dl, d, du, b = (p.reshape(s) for p, s in zip(jnp.split(v, np.cumsum(sizes)[:-1]), shapes, strict=True))
        return jax.lax.linalg.tridiagonal_solve(dl.at[..., 0].set(0.0), d + 4.0, du.at[..., -1].set(0.0), b)

    x = rng.standard_normal(sum(sizes))
    np.testing.assert_array_equal(jacobians.sparsity(f, x).to_dense().reshape(-1, x.size), _nonzeros(f, x, rng))
    dl, d, du = jnp.array([0.0, 1, 1, 1]), jnp.full(m, 4.0), jnp.array([1.0, 1, 1, 0])
    g = lambda b: jax.lax.linalg.tridiagonal_solve(dl, d, du, jnp.sin(b)[:, None])[:, 0]  # noqa: E731
    X = rng.standard_normal((3, m))
    np.testing.assert_allclose(jacobians.batch_jacobian(jax.vmap(g))(X), jax.vmap(jax.jacfwd(g))(X), rtol=1e-12)


def test_products_over_no_axes_and_of_empty_arrays(rng):
    """``reduce_prod`` over no axes of a scalar and products along an empty axis: the second-order analyses run."""
    x = jnp.asarray(rng.standard_normal())
    g = lambda x: jnp.tanh(0.7 * jax.lax.reduce(jnp.sin(x), 1.0, jax.lax.mul, ())) ** 2  # noqa: E731
    assert bool(jacobians.hessian_sparsity(g, x).to_dense())
    np.testing.assert_allclose(jacobians.laplacian(g)(x), jax.hessian(g)(x), rtol=1e-12)
    y = jnp.ones((3, 0, 2))
    for fn in (lambda y: jnp.prod(jnp.sin(y), axis=1), lambda y: jnp.cumprod(jnp.sin(y), axis=1)):
        assert jacobians.hessian_sparsity(lambda y, fn=fn: jnp.sum(fn(y)), y).nnz == 0
        assert jacobians.sparsity(fn, y).nnz == 0
