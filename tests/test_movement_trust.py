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

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.extend import core as jcore

from jacobians import _host_eval

# ------------------------------------------------------------------ host evaluation equals XLA


def _host_vs_xla(fun, *args) -> set[str]:
    """Every equation of ``fun``'s jaxpr evaluated on the host equals XLA's value; the primitives evaluated there."""
    closed = jax.make_jaxpr(fun)(*args)
    jaxpr = closed.jaxpr
    outs = [v for e in jaxpr.eqns for v in e.outvars if not isinstance(v, jcore.DropVar)]
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
    assert names <= _host_vs_xla(fun, *args)


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


# ------------------------------------------------------------------ F-order reshapes through every public entry point



def _c12():
    # An iota-made constant reshaped in F order: folded on the host during the analyses.
    return lax.reshape(jnp.arange(12.0).reshape(4, 3) + 1.0, (3, 4), dimensions=(1, 0))


F_ORDER = {
    "ravel_F": (lambda x: jnp.tanh(jnp.ravel(x, order="F")), (3, 4)),
    "folded_constant_F": (lambda x: jnp.ravel(jnp.tanh(x) * _c12()), (3, 4)),
    "square_dims_10": (lambda x: jnp.tanh(lax.reshape(x, (64,), dimensions=(1, 0))), (8, 8)),
    **{
        f"dims_{''.join(map(str, p))}": (
            lambda x, p=p: jnp.tanh(lax.reshape(x, (4, 6), dimensions=p)).ravel() ** 3,
            (2, 3, 4),
        )
        for p in [(1, 2, 0)]
    },
}


def _F(name):
    fun, shape = F_ORDER[name]
    return fun, shape


@pytest.mark.parametrize("name", sorted(F_ORDER))
def test_f_order_jacobian_every_method(name, rng):
    import jacobians

    fun, shape = _F(name)
    x = jnp.asarray(rng.standard_normal(shape))
    want = np.asarray(jax.jacfwd(fun)(x))
    assert np.count_nonzero(want)
    for kw in ({}, dict(method="structured", mode="fwd"), dict(method="structured", mode="rev"),
               dict(method="compressed")):
        np.testing.assert_allclose(jacobians.jacobian(fun, **kw)(x), want, rtol=1e-10, atol=1e-12, err_msg=str(kw))
    np.testing.assert_allclose(jacobians.sparse_jacobian(fun, output="dense")(x), want, rtol=1e-10, atol=1e-12)
    # The detected pattern is exactly the nonzeros (pure movement and element-wise maps).
    pattern = jacobians.sparsity(fun, x).to_dense()
    np.testing.assert_array_equal(np.asarray(pattern), want != 0)
    flat = want.reshape(want.shape[0], -1)
    np.testing.assert_allclose(jacobians.gauss_newton(fun)(x).diagonal(), (flat**2).sum(0).reshape(shape),
                               rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(jacobians.divergence(fun)(x), np.trace(flat), rtol=1e-10, atol=1e-12)


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


def _gather(x, shape, idx, offset_dims, collapsed, start_map, slice_sizes, batching=((), ())):
    dnums = lax.GatherDimensionNumbers(offset_dims=offset_dims, collapsed_slice_dims=collapsed,
                                       start_index_map=start_map, operand_batching_dims=batching[0],
                                       start_indices_batching_dims=batching[1])
    return lax.gather(x.reshape(shape), jnp.asarray(idx), dnums, slice_sizes).ravel()


GATHERS = {
    # A shift with a positive fill next to a layer: the fill is a constant, not a copy of x[fill - 1].
    "fill_shift_mlp": (lambda x: jnp.tanh(_W8 @ jnp.tanh(x.at[jnp.arange(8) + 1].get(mode="fill", fill_value=2.0))),
                       8),
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


def _suite(cases: dict):
    """All ``cases`` as one function of one vector (one compile per method); each case's output rows."""
    names = sorted(cases)
    n = max(cases[k][1] for k in names)
    rows, start = {}, 0
    for k in names:
        size = jax.eval_shape(cases[k][0], jax.ShapeDtypeStruct((cases[k][1],), jnp.float64)).size
        rows[k] = slice(start, start + size)
        start += size

    def fun(x):
        return jnp.concatenate([jnp.ravel(cases[k][0](x[: cases[k][1]])) for k in names])

    return fun, n, rows


def _blame(got, want, rows) -> list[str]:
    bad = ~np.isclose(np.asarray(got), want, rtol=1e-10, atol=1e-12)
    return [k for k, r in rows.items() if bad[r].any()]


@pytest.mark.parametrize("kw", [{}, dict(method="structured", mode="fwd"), dict(method="structured", mode="rev")],
                         ids=["auto", "structured_fwd", "structured_rev"])
def test_gathers_and_scatters(kw, rng):
    import jacobians

    fun, n, rows = _suite(GATHERS)
    x = jnp.asarray(rng.standard_normal(n))
    want = np.asarray(jax.jit(jax.jacfwd(fun))(x))
    assert all(np.count_nonzero(want[r]) for r in rows.values())
    assert not _blame(jacobians.jacobian(fun, **kw)(x), want, rows)


def test_gathers_and_scatters_patterns_are_sound(rng):
    import jacobians

    fun, n, rows = _suite(GATHERS)
    x = jnp.asarray(rng.standard_normal(n))
    want = np.asarray(jax.jit(jax.jacfwd(fun))(x)) != 0
    missed = want & ~np.asarray(jacobians.sparsity(fun, x).to_dense())
    assert not [k for k, r in rows.items() if missed[r].any()]


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
