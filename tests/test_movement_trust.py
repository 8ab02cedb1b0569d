"""Movement primitives and the rules built on them, against XLA and JAX's own derivatives.

Three layers share the host evaluator (:mod:`jacobians._host_eval`) and the
labels trick (a primitive applied to element numbers says which input element
each output copies): constant folding, dependency sets (``sparsity`` and every
engine planned from it) and the structured sweeps. A parameter one of them
drops is a silently wrong Jacobian, so each is checked here:

- the host evaluator equals XLA on every equation of a sampled parameter
  space (reshape ``dimensions``, pads with negative and interior padding,
  clamped dynamic slices, integer wrap-around, bitwise ``and``/``or``/``not``);
- every public entry point on F-order reshapes against ``jax.jacfwd``;
- gathers with fill values, permuted ``start_index_map`` and batching dims,
  scatters in every mode;
- a table of primitives whose structure depends on dtype or mode, through
  both structured sweeps.
"""

import functools
import itertools
import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.extend import core as jcore

from jacobians import _compat, _host_eval

# ------------------------------------------------------------------ host evaluation equals XLA


def _host_vs_xla(fun, *args) -> set[str]:
    """Every equation of ``fun``'s jaxpr evaluated on the host equals XLA's value; the primitives evaluated there."""
    closed = jax.make_jaxpr(fun)(*args)
    jaxpr = closed.jaxpr
    outs = [v for e in jaxpr.eqns for v in e.outvars if not isinstance(v, _compat.DropVar)]
    everything = jaxpr.replace(outvars=outs)
    # XLA's values of every intermediate, in one compiled program.
    values = jax.jit(lambda *a: jax.core.eval_jaxpr(everything, closed.consts, *a))(*args)
    env = dict(zip(jaxpr.constvars, map(np.asarray, closed.consts), strict=True))
    env.update(zip(jaxpr.invars, map(np.asarray, args), strict=True))
    env.update(zip(outs, map(np.asarray, values), strict=True))
    covered = set()
    for eqn in jaxpr.eqns:
        ins = [np.asarray(v.val) if isinstance(v, jcore.Literal) else env[v] for v in eqn.invars]
        host = _host_eval.evaluate(eqn.primitive.name, eqn.params, ins, [v.aval.dtype for v in eqn.outvars])
        if host is None:
            continue
        covered.add(eqn.primitive.name)
        for h, v in zip(host, eqn.outvars, strict=True):
            want = env[v]
            assert h.dtype == want.dtype and h.shape == want.shape, (eqn, h.dtype, h.shape, want.dtype, want.shape)
            np.testing.assert_array_equal(h, want, err_msg=str(eqn))
    return covered


def _ints(rng, shape, dtype):
    info = np.iinfo(dtype)
    return jnp.asarray(rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True))


def _perms3():
    return list(itertools.permutations(range(3)))


HOST_CASES = {
    # reshape reads its operand in the order `dimensions` (order="F")
    "ravel_F": (lambda x: jnp.ravel(x, order="F"), [(3, 4)], {"reshape"}),
    "reshape_F": (lambda x: jnp.reshape(x, (2, 6), order="F"), [(3, 4)], {"reshape"}),
    "reshape_dims_3d": (
        lambda x: [lax.reshape(x, s, dimensions=p) for p in _perms3() for s in ((24,), (4, 6), (2, 2, 6))],
        [(2, 3, 4)],
        {"reshape"},
    ),
    "broadcast_squeeze": (
        lambda x: [lax.broadcast_in_dim(x, (2, 3, 4, 1), (1, 3)), jnp.squeeze(x, 1), jnp.expand_dims(x, (0, 2))],
        [(3, 1)],
        {"broadcast_in_dim", "squeeze"},
    ),
    "slice_strides": (
        lambda x: [lax.slice(x, (0, 1), (5, 6), (2, 3)), x[::-1, 1::2], x[4:1:-2, ::3]],
        [(5, 7)],
        {"slice", "rev"},
    ),
    "pad": (
        lambda x, v: [
            lax.pad(x, v, cfg)
            for cfg in (
                [(1, 2, 0), (-1, 1, 2)],
                [(-2, -1, 1), (0, 0, 0)],
                [(2, -3, 3), (-2, -2, 0)],
                [(0, 0, 1), (3, -4, 1)],
            )
        ],
        [(3, 4), ()],
        {"pad"},
    ),
    "concat_transpose_copy": (
        lambda x, y: [
            jnp.concatenate([x, y, x], axis=1),
            jnp.transpose(x, (1, 0)),
            jnp.copy(y),
            jnp.stack([x, x], 1),
            *jnp.unstack(y, axis=1),
        ],
        [(3, 2), (3, 5)],
        {"concatenate", "transpose", "copy", "stack", "unstack"},
    ),
    "split_tile": (
        lambda x: [*jnp.split(x, [1, 3], axis=1), jnp.tile(x, (2, 1, 3)), jnp.tile(x, (1, 2))],
        [(2, 5)],
        {"split", "tile"},
    ),
}


@pytest.mark.parametrize("name", sorted(HOST_CASES))
def test_host_eval_movement_equals_xla(name, rng):
    fun, shapes, names = HOST_CASES[name]
    args = [jnp.asarray(rng.standard_normal(s)) for s in shapes]
    present = {e.primitive.name for e in jax.make_jaxpr(fun)(*args).jaxpr.eqns}  # (older JAX: no stack, unstack)
    assert names & present and (names & present) <= _host_vs_xla(fun, *args)


def test_host_eval_random_pads_slices_and_broadcasts(rng):
    # A sampled parameter space (as JAX's lax tests sample theirs), all in one compiled program.
    shape = (3, 4)
    pads, slices = [], []
    while len(pads) < 24:
        cfg = [(int(rng.integers(-3, 4)), int(rng.integers(-3, 4)), int(rng.integers(0, 3))) for _ in shape]
        if all(lo + hi + d + max(d - 1, 0) * it >= 0 for (lo, hi, it), d in zip(cfg, shape, strict=True)):
            pads.append(cfg)
    while len(slices) < 24:
        start = [int(rng.integers(0, d)) for d in shape]
        limit = [int(rng.integers(s, d + 1)) for s, d in zip(start, shape, strict=True)]
        slices.append((start, limit, [int(rng.integers(1, 4)) for _ in shape]))

    def f(x, v):
        outs = [lax.pad(x, v, cfg) for cfg in pads]
        outs += [lax.slice(x, *sl) for sl in slices]
        outs += [lax.broadcast_in_dim(x[:1], (2, 3, 4), (0, 2)), lax.broadcast_in_dim(v, (2, 2), ())]
        outs += [lax.squeeze(x[:1, 1:2], (0, 1)), lax.rev(x, ()), lax.rev(x, (0, 1)), lax.transpose(x, (1, 0))]
        return outs

    covered = _host_vs_xla(f, jnp.asarray(rng.standard_normal(shape)), jnp.asarray(rng.standard_normal(())))
    assert {"pad", "slice", "broadcast_in_dim", "squeeze", "rev", "transpose"} <= covered


def test_host_eval_dynamic_slices_clamp_as_xla(rng):
    x, u = jnp.asarray(rng.standard_normal((5, 6))), jnp.asarray(rng.standard_normal((2, 3)))
    covered = set()
    for starts in [(-3, 1), (10, 2), (1, 1), (4, -7), (2**31 - 1, -(2**31))]:
        i, j = (jnp.int32(s) for s in starts)
        covered |= _host_vs_xla(
            lambda x, u, i, j: [lax.dynamic_slice(x, (i, j), (2, 3)), lax.dynamic_update_slice(x, u, (i, j))],
            x, u, i, j,
        )
    assert {"dynamic_slice", "dynamic_update_slice"} <= covered


@pytest.mark.parametrize("dtype", [np.int32, np.float32, np.uint8, np.int8, jnp.bfloat16])
def test_host_eval_iota_equals_xla(dtype):
    # 300 > 256: uint8 wraps, bfloat16 rounds the counts
    shapes = [((300,), 0), ((3, 4, 5), 1), ((3, 4, 5), 2)]
    covered = _host_vs_xla(lambda: [lax.broadcasted_iota(dtype, s, d) for s, d in shapes])
    assert covered == {"iota"}


@pytest.mark.parametrize("dtype", [np.int32, np.uint32, np.int8, np.uint8, np.int64])
def test_host_eval_integer_ops_wrap_and_are_bitwise(dtype, rng):
    # Full-range values: sums and products overflow and must wrap as XLA's do.
    x, y = _ints(rng, (64,), dtype), _ints(rng, (64,), dtype)
    covered = _host_vs_xla(
        lambda x, y: [x + y, x - y, x * y, lax.neg(x), jnp.maximum(x, y), jnp.minimum(x, y), x < y, x <= y,
                      x > y, x >= y, x == y, x != y, x & y, x | y, x ^ y, ~x, lax.select(x < y, x, y),
                      x * dtype(7) + dtype(3)],
        x, y,
    )
    assert {"add", "sub", "mul", "neg", "max", "min", "lt", "and", "or", "xor", "not", "select_n"} <= covered


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_host_eval_float_arithmetic_rounds_as_xla(dtype, rng):
    # Wide exponents: products and sums overflow and underflow; subnormals (which XLA's CPU runtime
    # flushes) and non-finite values must be left to XLA, everything else must be bit-equal.
    info = np.finfo(dtype)
    x = rng.standard_normal(256) * 2.0 ** rng.integers(info.minexp // 2, info.maxexp // 2, 256)
    y = rng.standard_normal(256) * 2.0 ** rng.integers(info.minexp // 2, info.maxexp // 2, 256)
    x[:3] = [info.tiny / 4, np.inf, 0.0]
    x, y = jnp.asarray(x.astype(dtype)), jnp.asarray(y.astype(dtype))
    covered = _host_vs_xla(lambda x, y: [x + y, x - y, x * y, lax.neg(x), x[5:] * y[5:], x[5] * y[6]], x, y)
    assert {"mul"} <= covered  # the scalar product, at least, is exact and folds
    host = _host_eval.evaluate("mul", {}, [np.asarray(x), np.asarray(y)], [np.dtype(dtype)])
    assert host is None  # a subnormal operand


def test_host_eval_booleans_and_conversions(rng):
    a, b = jnp.asarray(rng.random(16) < 0.5), jnp.asarray(rng.random(16) < 0.5)
    big = _ints(rng, (32,), np.int64)
    small = _ints(rng, (32,), np.int32)
    u = _ints(rng, (32,), np.uint32)
    f = jnp.asarray(rng.standard_normal(32) * 3e9)  # past int32's range: left to XLA or equal to it
    covered = _host_vs_xla(
        lambda a, b, big, small, u, f: [
            a & b, a | b, ~a, a ^ b, a == b,
            big.astype(np.int32), big.astype(np.uint8), small.astype(np.int64), small.astype(bool),
            a.astype(np.int32), u.astype(np.int32), small.astype(np.uint32), f.astype(np.int32),
            f.astype(np.int64), f.astype(np.uint32),
        ],
        a, b, big, small, u, f,
    )
    assert {"and", "or", "not", "xor", "convert_element_type"} <= covered


def test_host_eval_scalars_wrap_without_warnings():
    # NumPy scalars warn (and may raise under -W error) on overflow; arrays wrap quietly as XLA does.
    big = np.int32(2**31 - 1)
    with np.errstate(all="raise"):
        (out,) = _host_eval.evaluate("add", {}, [big, np.int32(1)], [np.dtype(np.int32)])
        (prod,) = _host_eval.evaluate("mul", {}, [np.int32(2**30), np.int32(4)], [np.dtype(np.int32)])
    assert out == np.int32(-(2**31)) and prod == 0
    # Operands of two dtypes never come from a jaxpr: not guessed, left to XLA.
    assert _host_eval.evaluate("add", {}, [np.int32(1), np.int64(1)], [np.dtype(np.int32)]) is None


# ------------------------------------------------------------------ several cases, one compile


def _suite(cases: dict):
    """All ``cases`` (name -> ``(fun, n)``) as one map of one vector, each case on its own slice of it.

    One compile per method instead of one per case; the Jacobian is block diagonal
    (square when every case is). Returns the map, its input size and each case's output rows.
    """
    names = sorted(cases)
    rows, cols, start, col = {}, {}, 0, 0
    for k in names:
        fun, n = cases[k]
        size = jax.eval_shape(fun, jax.ShapeDtypeStruct((n,), jnp.float64)).size
        rows[k], cols[k] = slice(start, start + size), slice(col, col + n)
        start, col = start + size, col + n

    def suite(x):
        return jnp.concatenate([jnp.ravel(cases[k][0](x[cols[k]])) for k in names])

    return suite, col, rows


@functools.cache
def _reference(table: str, group: str | None = None):
    """``(suite, x, jax.jacfwd(suite)(x), rows)`` for a table of cases, computed once per test run.

    ``x`` is fresh (normal draws, seeded by the table's name): never zeros, the same in every test
    that shares the reference.
    """
    cases = globals()[table] if group is None else globals()[table][group]
    fun, n, rows = _suite(cases)
    x = jnp.asarray(np.random.default_rng(zlib.crc32(f"{table}/{group}".encode())).standard_normal(n))
    want = np.asarray(jax.jit(jax.jacfwd(fun))(x))
    assert all(np.count_nonzero(want[r]) for r in rows.values()), "a case with a zero Jacobian proves nothing"
    return fun, x, want, rows


def _blame(got, want, rows) -> list[str]:
    """The cases whose rows of ``got`` differ from ``want``."""
    bad = ~np.isclose(np.asarray(got), want, rtol=1e-9, atol=1e-12)
    return [k for k, r in rows.items() if bad[r].any()]



# ------------------------------------------------------------------ F-order reshapes through every public entry point



def _c12():
    # An iota-made constant reshaped in F order: folded on the host during the analyses.
    return lax.reshape(jnp.arange(12.0).reshape(4, 3) + 1.0, (3, 4), dimensions=(1, 0))


def _on(shape, fun):
    """``fun`` of an array of ``shape`` as a case of :func:`_suite` (a function of a flat vector)."""
    return (lambda v: fun(v.reshape(shape)), math.prod(shape))


F_ORDER = {
    "ravel_F": _on((3, 4), lambda x: jnp.tanh(jnp.ravel(x, order="F"))),
    "folded_constant_F": _on((3, 4), lambda x: jnp.ravel(jnp.tanh(x) * _c12())),
    "square_dims_10": _on((8, 8), lambda x: jnp.tanh(lax.reshape(x, (64,), dimensions=(1, 0)))),
    "dims_120": _on((2, 3, 4), lambda x: jnp.tanh(lax.reshape(x, (4, 6), dimensions=(1, 2, 0))).ravel() ** 3),
    "dims_201": _on((2, 3, 4), lambda x: jnp.sin(lax.reshape(x, (24,), dimensions=(2, 0, 1)))),
}


@pytest.mark.parametrize(
    "method", [{}, dict(method="structured", mode="fwd"), dict(method="structured", mode="rev"),
               dict(method="compressed"), "sparse_jacobian"],
    ids=["auto", "structured_fwd", "structured_rev", "compressed", "sparse_jacobian"])
def test_f_order_jacobian_every_method(method):
    import jacobians

    fun, x, want, rows = _reference("F_ORDER")
    if method == "sparse_jacobian":
        got = jacobians.sparse_jacobian(fun, output="dense")(x)
    else:
        got = jacobians.jacobian(fun, **method)(x)
    assert not _blame(got, want, rows)


def test_f_order_pattern_divergence_gauss_newton():
    import jacobians

    fun, x, want, rows = _reference("F_ORDER")
    # The detected pattern is exactly the nonzeros (pure movement and element-wise maps).
    pattern = np.asarray(jacobians.sparsity(fun, x).to_dense())
    assert not [k for k, r in rows.items() if (pattern[r] != (want[r] != 0)).any()]
    np.testing.assert_allclose(jacobians.gauss_newton(fun)(x).diagonal(), (want**2).sum(0), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(jacobians.divergence(fun)(x), np.trace(want), rtol=1e-10, atol=1e-12)


def test_f_order_constant_folded_in_place(rng):
    import jacobians

    # The folded constant is the F-order one, not a row-major reshape of it.
    x = jnp.asarray(rng.standard_normal((3, 4)))
    for mode in ("fwd", "rev"):
        got = jacobians.jacobian(lambda x: jnp.ravel(x * _c12()), method="structured", mode=mode)(x)
        np.testing.assert_allclose(np.diag(np.asarray(got).reshape(12, 12)), np.asarray(_c12()).ravel())


def test_f_order_reshape_couples_a_batch():
    import jacobians

    # ravel(order="F") of a (B, n) batch interleaves the examples: never proved independent.
    def mix(X):
        return jnp.tanh(jnp.reshape(jnp.ravel(X, order="F"), X.shape))

    X = jnp.asarray(np.random.default_rng(0).standard_normal((4, 4)))
    with pytest.raises(jacobians.CoupledBatchError, match="not independent"):
        jacobians.batch_jacobian(mix)(X)
    with pytest.raises(jacobians.CoupledBatchError, match="not independent"):
        jacobians.log_abs_det(mix, batch_first=True)(X)
    # 3-D: every dimensions permutation that does not keep the batch axis first mixes the examples.
    X3 = jnp.asarray(np.random.default_rng(1).standard_normal((4, 2, 3)))
    for p in [(1, 0, 2), (2, 1, 0), (1, 2, 0)]:
        with pytest.raises(jacobians.CoupledBatchError, match="not independent"):
            jacobians.batch_jacobian(lambda X, p=p: jnp.sin(lax.reshape(X, (4, 6), dimensions=p)))(X3)


def test_f_order_reshape_per_example_batch(rng):
    import jacobians

    # vmap of an F-order ravel is reshape(dimensions=(0, 2, 1)): per example, independent.
    def single(x):
        return jnp.tanh(jnp.ravel(x, order="F")) * jnp.ravel(x)

    batched = jax.vmap(single)
    X = jnp.asarray(rng.standard_normal((5, 2, 3)))
    want = jax.vmap(jax.jacfwd(single))(X)
    np.testing.assert_allclose(jacobians.batch_jacobian(batched)(X), want, rtol=1e-10, atol=1e-12)
    _, logdet = jnp.linalg.slogdet(want.reshape(5, 6, 6))
    np.testing.assert_allclose(jacobians.log_abs_det(batched, batch_first=True)(X), logdet, rtol=1e-9)


# ------------------------------------------------------------------ gathers and scatters: fill values, modes, maps

_W8 = np.random.default_rng(8).standard_normal((8, 8))
_SHIFT = jnp.arange(8) + 2  # a closed-over index array (a constant of the jaxpr, not an iota)


def _gather(x, shape, idx, offset_dims, collapsed, start_map, slice_sizes, batching=((), ())):
    dnums = lax.GatherDimensionNumbers(offset_dims=offset_dims, collapsed_slice_dims=collapsed,
                                       start_index_map=start_map, operand_batching_dims=batching[0],
                                       start_indices_batching_dims=batching[1])
    return lax.gather(x.reshape(shape), jnp.asarray(idx), dnums, slice_sizes).ravel()


GATHERS = {
    # A shift with a positive fill next to a layer: the fill is a constant, not a copy of x[fill - 1].
    "fill_shift_mlp": (lambda x: jnp.tanh(_W8 @ jnp.tanh(x.at[jnp.arange(8) + 1].get(mode="fill", fill_value=2.0))),
                       8),
    "fill_closed_over_index": (lambda x: jnp.cos(x.at[_SHIFT].get(mode="fill", fill_value=3.0)) * x, 8),
    "fill_negative_out": (lambda x: jnp.sin(x.at[jnp.arange(8) - 9].get(mode="fill", fill_value=5.0)) * x, 8),
    "fill_default_nan": (lambda x: 2.0 * x.at[jnp.arange(8) * 2].get(mode="fill"), 8),
    "clip": (lambda x: jnp.sin(x.at[jnp.arange(8) * 2 - 3].get(mode="clip")) * x, 8),
    # start_index_map not in operand order (indices in bounds)
    "start_map_10": (lambda x: jnp.sin(_gather(x, (3, 4, 5), [[0, 1], [2, 2]], (1,), (0, 1), (1, 0), (1, 1, 5))), 60),
    "start_map_1": (lambda x: jnp.sin(_gather(x, (3, 4), [[1], [3]], (1,), (1,), (1,), (3, 1))), 12),
    "advanced_index": (lambda x: jnp.sin(x.reshape(4, 5)[jnp.array([3, 1, 0])[:, None], jnp.array([4, 0])]).ravel(),
                       20),
    "batching_dims": (lambda x: jnp.sin(_gather(x, (2, 3), [[1], [0]], (), (1,), (1,), (1, 1), ((0,), (0,)))), 6),
    "vmapped_gather": (lambda x: jnp.sin(jax.vmap(lambda r, i: r[i])(x.reshape(4, 4), jnp.array([[1, 0], [2, 3],
                                                                                              [0, 0], [3, 1]]))),
                       16),
    "vmapped_scatter": (lambda x: jnp.sin(jax.vmap(lambda r, i, u: r.at[i].set(u))(
        x.reshape(4, 4), jnp.array([[1, 0], [2, 3], [0, 2], [3, 1]]), x.reshape(4, 4)[:, ::-2] ** 2)).ravel(), 16),
    "scatter_drop": (lambda x: jnp.sin(x.at[jnp.arange(4) * 3].set(x[:4] ** 2, mode="drop")), 8),
    "scatter_clip": (lambda x: jnp.sin(x.at[jnp.arange(4) * 3].set(x[:4] ** 2, mode="clip")), 8),
    "scatter_promise_oob": (lambda x: jnp.sin(x.at[jnp.array([0, 1, 2, 30])].set(x[:4] ** 2,
                                                                                  mode="promise_in_bounds")), 8),
    "scatter_add_duplicates": (lambda x: jnp.sin(x.at[jnp.array([0, 0, 2, 9])].add(x[4:] ** 2, mode="drop")), 8),
    "scatter_mul_unique": (lambda x: jnp.sin(x.at[jnp.array([0, 1, 2, 3])].mul(x[4:], unique_indices=True)), 8),
    "pad_value_traced": (lambda x: jnp.sin(lax.pad(x[:5], x[7], [(2, -1, 1)])), 8),
    "dynamic_update_clamped": (lambda x: jnp.sin(lax.dynamic_update_slice(x, x[:3] ** 2, (jnp.int32(7),))), 8),
    "dynamic_slice_clamped": (lambda x: jnp.sin(lax.dynamic_slice(x, (jnp.int32(-2),), (3,))) * x[:3], 8),
}


@pytest.mark.parametrize("mode", ["fwd", "rev"])
def test_gathers_and_scatters_structured(mode):
    import jacobians

    fun, x, want, rows = _reference("GATHERS")
    assert not _blame(jacobians.jacobian(fun, method="structured", mode=mode)(x), want, rows)


def test_gathers_and_scatters_patterns_are_sound():
    import jacobians

    fun, x, want, rows = _reference("GATHERS")
    missed = (want != 0) & ~np.asarray(jacobians.sparsity(fun, x).to_dense())
    assert not [k for k, r in rows.items() if missed[r].any()]


def test_closed_over_indices_make_selections(rng):
    from jacobians import _sweeps

    # Closed-over integer arrays are read on the host: the gather is a selection in both sweeps
    # (not the dense generic rule), with its fill a constant.
    def f(x):
        return jnp.tanh(x.at[_SHIFT].get(mode="fill", fill_value=3.0))

    x = jnp.asarray(rng.standard_normal(8))
    want = jax.jacfwd(f)(x)
    for sweep in ("fwd", "rev"):
        log = []
        _, got, _ = _sweeps.jacobian(lambda v: (f(v), None), x, sweep, log)
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)
        assert ("gather", "select", ["selection"]) in log, log


def test_fill_shift_next_to_a_layer_default_jacobian(rng):
    import jacobians

    # The planner takes the structured forward sweep here, where the gather meets the seed selection.
    def fun(x):
        shifted = x.at[jnp.arange(8) + 1].get(mode="fill", fill_value=2.0)
        return jnp.concatenate([jnp.tanh(_W8 @ x), jnp.tanh(shifted)])

    x = jnp.asarray(rng.standard_normal(8))
    np.testing.assert_allclose(jacobians.jacobian(fun)(x), jax.jacfwd(fun)(x), rtol=1e-10, atol=1e-12)


def test_promise_in_bounds_out_of_bounds_gather_pattern_covers_both_readings(rng):
    import jacobians

    # asdex's gather_multi_dim_start_map_mismatch: index 3 on an axis of 3 breaks the promise. XLA's
    # gather clamps (jax.jacfwd reads element [2, 2, :]), its transpose drops (jax.jacrev: zeros);
    # the pattern must hold both.
    def f(x):
        return jnp.sin(_gather(x, (3, 4, 5), [[0, 1], [2, 3]], (1,), (0, 1), (1, 0), (1, 1, 5)))

    x = jnp.asarray(rng.standard_normal(60))
    fwd, rev = (np.asarray(jax.jit(jac(f))(x)) for jac in (jax.jacfwd, jax.jacrev))
    pattern = np.asarray(jacobians.sparsity(f, x).to_dense())
    assert not ((fwd != 0) & ~pattern).any() and not ((rev != 0) & ~pattern).any()


# ------------------------------------------------------------------ structured sweeps: rules that depend on dtype or mode

_C6 = np.random.default_rng(6).standard_normal(6)
_I6 = jnp.array([0, 0, 3])  # duplicates


def _cases(**funs):
    return {k: (f, 6) for k, f in funs.items()}


STRUCTURED = {
    "dtypes_and_piecewise": _cases(
        complex_exp_real=lambda x: jnp.real(jnp.exp(x.astype(complex) * 1j) * x.astype(complex)),
        complex_abs=lambda x: jnp.abs(lax.complex(x, x[::-1] ** 2)),
        fft_abs=lambda x: jnp.abs(jnp.fft.fft(x)),
        complex_imag_conj=lambda x: jnp.imag(jnp.conj(lax.complex(x, x**2)) * (1 + 2j)),
        complex_max=lambda x: jnp.real(jnp.maximum(x, 0.5).astype(complex) * (1 - 1j)) * x,
        int_operand=lambda x: x * jnp.arange(6).astype(x.dtype),
        int_roundtrip=lambda x: x.astype(jnp.int32).astype(x.dtype) + x**2,
        to_f32=lambda x: (x.astype(jnp.float32) ** 2).astype(jnp.float64) + x,
        to_f16=lambda x: jnp.tanh(x.astype(jnp.float16)).astype(jnp.float64),
        to_bf16=lambda x: (x.astype(jnp.bfloat16) * 3).astype(jnp.float64),
        reduce_precision=lambda x: lax.reduce_precision(x, 5, 10) * x,
        copy=lambda x: jnp.copy(x) * x,

        round_floor_sign=lambda x: jnp.round(x * 3) * x + jnp.floor(x) * x**2 + jnp.sign(x) * x,
        rem=lambda x: lax.rem(x, x[::-1] + 3.0) + lax.rem(x * 5, 0.7),
        clamp_traced=lambda x: lax.clamp(x[::-1] - 0.5, x, x[::-1] + 0.5),
        clamp_const=lambda x: jnp.clip(x, -0.3, 0.4) * x,
        max_ties=lambda x: jnp.maximum(x, x) + jnp.minimum(x, x[::-1]),
        pow_both=lambda x: jnp.abs(x) ** x[::-1],
        integer_pow_negative=lambda x: (x + 3.0) ** -2,
        atan2_scalar=lambda x: jnp.arctan2(x, x[0]),
        div_scalar=lambda x: x / (x[1] + 3.0),
        is_finite=lambda x: jnp.where(jnp.isfinite(x), x, 0.0),
    ),
    "where_and_orders": _cases(
        where_traced=lambda x: jnp.where(x > 0, x**2, jnp.sin(x)),
        where_scalar_predicate=lambda x: jnp.where(x.sum() > 0, x**3, x),
        where_three_cases=lambda x: lax.select_n(jnp.clip(jnp.floor(x * 2), 0, 2).astype(jnp.int32), x, x**2,
                                                 jnp.sin(x)),
        where_constant_case=lambda x: jnp.where(x > 0, x**2, 0.0) + jnp.where(x < 0.3, 1.0, jnp.sin(x)),
        where_permuted=lambda x: jnp.where(x > 0, x, x[::-1]),
        where_slices=lambda x: jnp.where(x[:3] > 0, x[:3], x[3:]) * x[3:],
        where_broadcast=lambda x: jnp.where(x > 0, x[0], x),
        where_dense=lambda x: jnp.where(x > 0, jnp.cumsum(x), x**2),
        sort=lambda x: jnp.sort(x) * _C6,
        sort_two_operands=lambda x: lax.sort((x, x**2), num_keys=1)[1],
        sort_two_keys=lambda x: sum(lax.sort((jnp.round(x), x, x**3), num_keys=2)[1:]),
        argsort_take=lambda x: x[jnp.argsort(x)] * _C6,
        cumsum_reverse=lambda x: lax.cumsum(x**2, reverse=True) + lax.cumsum(x),
        cummax_reverse=lambda x: lax.cummax(x, reverse=True) * x,
        cumprod_cumlogsumexp=lambda x: lax.cumprod(x, reverse=True) + lax.cumlogsumexp(x),
        reduce_max=lambda x: jnp.max(x.reshape(2, 3), axis=1).sum() * x,
        argmax=lambda x: x * jnp.argmax(x).astype(x.dtype),
        top_k=lambda x: jnp.concatenate([lax.top_k(x, 3)[0], x]),
    ),
    "indexing_rules_control": _cases(
        dynamic_update_known=lambda x: lax.dynamic_update_slice(x, x[:2] ** 2, (3,)),
        dynamic_update_traced=lambda x: lax.dynamic_update_slice(x, x[:2] ** 2, (jnp.argmax(x),)),
        dynamic_slice_traced=lambda x: jnp.concatenate([lax.dynamic_slice(x, (jnp.argmin(x),), (2,)), x]),
        scatter_add_duplicates=lambda x: x.at[_I6].add(x[3:] ** 2),
        scatter_set_duplicates=lambda x: x.at[_I6].set(x[3:] ** 2),
        scatter_set_unique=lambda x: x.at[jnp.array([0, 1, 3])].set(x[3:] ** 2, unique_indices=True),
        scatter_mul=lambda x: x.at[jnp.array([0, 1, 3])].mul(x[3:], unique_indices=True),
        scatter_max=lambda x: x.at[_I6].max(x[3:] ** 2),
        split=lambda x: jnp.concatenate(jnp.split(x, [2, 3])[::-1]) * x,
        tile_stack=lambda x: jnp.tile(x[:3], 2) + jnp.stack([x[:3], x[3:]]).ravel(),
        unstack=lambda x: jnp.concatenate(jnp.unstack(x.reshape(2, 3), axis=1)[::-1]) * x,

        relu_gelu_softplus=lambda x: jax.nn.relu(x) + jax.nn.gelu(x) + jax.nn.softplus(x),
        logsumexp=lambda x: jax.nn.logsumexp(x) * x,
        sinc=jnp.sinc,
        standardize=jax.nn.standardize,
        fori=lambda x: lax.fori_loop(0, 3, lambda i, v: jnp.sin(v) * x, x),
        scan=lambda x: lax.scan(lambda c, v: (c * v + 1.0, c), 1.0, x)[1],
        cond=lambda x: lax.cond(x[0] > 0, lambda v: v**2, jnp.sin, x),
        batched_outer=lambda x: jnp.einsum("bi,bj->bij", x.reshape(2, 3), x.reshape(2, 3)).ravel(),
        erf_inv=lambda x: lax.erf_inv(jnp.tanh(x) * 0.5),
    ),
}


@pytest.mark.parametrize("mode", ["fwd", "rev"])
@pytest.mark.parametrize("group", sorted(STRUCTURED))
def test_structured_sweeps_dtype_and_mode_table(group, mode):
    import jacobians

    fun, x, want, rows = _reference("STRUCTURED", group)
    assert not _blame(jacobians.jacobian(fun, method="structured", mode=mode)(x), want, rows)


def test_structured_forward_where_picks_tangents(rng):
    import jacobians

    # An unselected branch's infinite or NaN derivative (sqrt of a negative) stays out, as in
    # jax.jacfwd: a traced select_n picks rows, it does not multiply them by 0.
    def f(x):
        return jnp.tanh(jnp.where(x > 0, jnp.sqrt(x), x) * 2.0)

    x = jnp.asarray(rng.standard_normal(8))
    assert (x < 0).any() and (x > 0).any()
    want = jax.jacfwd(f)(x)
    for cs in (None, 3):
        got = jacobians.jacobian(f, method="structured", mode="fwd", chunk_size=cs)(x)
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_structured_holomorphic(rng):
    import jacobians

    W = jnp.asarray(rng.standard_normal((6, 6)) + 1j * rng.standard_normal((6, 6)))

    def f(z):
        shifted = jnp.pad(z, (1, 2))[jnp.arange(6) + 1] * z.at[jnp.arange(6) + 2].get(mode="fill", fill_value=3.0)
        return jnp.concatenate([jnp.where(jnp.real(z) > 0, z**2, jnp.sin(z)), jnp.tanh(W @ z), shifted,
                                jnp.ravel(z.reshape(2, 3), order="F") ** 3])

    z = jnp.asarray(rng.standard_normal(6) + 1j * rng.standard_normal(6))
    want = jax.jacfwd(f, holomorphic=True)(z)
    for mode in ("fwd", "rev"):
        got = jacobians.jacobian(f, method="structured", mode=mode, holomorphic=True)(z)
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12, err_msg=mode)
