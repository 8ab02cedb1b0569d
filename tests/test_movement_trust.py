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
