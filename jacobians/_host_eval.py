"""NumPy evaluation of common primitives on the host, for constant folding and index bookkeeping.

Binding a primitive eagerly compiles a small XLA program the first time each
shape is seen (tens of milliseconds); analyses fold index arithmetic and move
element numbers through reshapes and slices all the time, so the common,
shape-only primitives are evaluated here with NumPy instead. ``evaluate``
returns ``None`` for anything it does not know; the caller then binds the
primitive.
"""

from collections.abc import Callable

import numpy as np


def _reshape(x, *dynamic, new_sizes, dimensions=None, **_):
    # XLA reads the operand in the axis order ``dimensions`` (``order="F"`` reshapes,
    # ``lax.reshape(..., dimensions=...)``): a transpose first, then a row-major reshape.
    if dynamic or any(d is None for d in new_sizes):
        raise ValueError("dynamic shapes")
    if dimensions is not None:
        x = np.transpose(x, tuple(dimensions))
    return np.reshape(x, tuple(new_sizes))


def _broadcast_in_dim(x, shape, broadcast_dimensions, **_):
    expanded = [1] * len(shape)
    for src, dst in enumerate(broadcast_dimensions):
        expanded[dst] = x.shape[src]
    return np.broadcast_to(x.reshape(expanded), shape)


def _slice(x, start_indices, limit_indices, strides=None, **_):
    strides = strides or (1,) * x.ndim
    return x[tuple(slice(s, e, st) for s, e, st in zip(start_indices, limit_indices, strides, strict=True))]


def _pad(x, padval, padding_config, **_):
    # Interior padding first, then (possibly negative) edge padding.
    for axis, (lo, hi, interior) in enumerate(padding_config):
        if interior:
            n = x.shape[axis]
            shape = list(x.shape)
            shape[axis] = n + (n - 1) * interior if n else 0
            out = np.full(shape, padval, x.dtype)
            idx = [slice(None)] * x.ndim
            idx[axis] = slice(None, None, interior + 1)
            out[tuple(idx)] = x
            x = out
        if lo < 0:
            x = np.take(x, np.arange(-lo, x.shape[axis]), axis=axis)
            lo = 0
        if hi < 0:
            x = np.take(x, np.arange(0, x.shape[axis] + hi), axis=axis)
            hi = 0
        if lo or hi:
            widths = [(0, 0)] * x.ndim
            widths[axis] = (lo, hi)
            x = np.pad(x, widths, constant_values=padval)
    return x


def _dynamic_slice(x, *starts, slice_sizes, **_):
    starts = [int(np.clip(int(s), 0, d - k)) for s, d, k in zip(starts, x.shape, slice_sizes, strict=True)]
    return x[tuple(slice(s, s + k) for s, k in zip(starts, slice_sizes, strict=True))]


def _dynamic_update_slice(x, upd, *starts, **_):
    starts = [int(np.clip(int(s), 0, d - k)) for s, d, k in zip(starts, x.shape, upd.shape, strict=True)]
    out = np.array(x, copy=True)
    out[tuple(slice(s, s + k) for s, k in zip(starts, upd.shape, strict=True))] = upd
    return out


def _split(x, sizes, axis, **_):
    return np.split(x, np.cumsum(sizes)[:-1], axis=axis)


def _iota(dtype, shape, dimension, **_):
    # Integer counts converted once (as XLA's iota of a float type rounds them), not a float arange.
    line = np.arange(shape[dimension], dtype=np.int64).astype(dtype)
    return np.broadcast_to(line.reshape([-1 if i == dimension else 1 for i in range(len(shape))]), shape)


def _tile(x, reps, **_):
    if len(reps) != x.ndim:  # np.tile would prepend axes; the primitive never does
        raise ValueError("reps and rank differ")
    return np.tile(x, tuple(reps))


def _unstack(x, axis, **_):
    return [np.take(x, i, axis=axis) for i in range(x.shape[axis])]


def _convert(x, new_dtype, **_):
    return np.asarray(x).astype(new_dtype)


def _select_n(which, *cases):
    return np.choose(np.asarray(which).astype(np.int64), np.broadcast_arrays(*cases))


# Shape-only and integer-exact primitives; float arithmetic is left to XLA (its rounding rules).
IMPLS: dict[str, Callable] = {
    "reshape": _reshape,
    "transpose": lambda x, permutation, **_: np.transpose(x, permutation),
    "broadcast_in_dim": lambda x, *_, **p: _broadcast_in_dim(x, **p),
    "squeeze": lambda x, dimensions, **_: np.squeeze(x, tuple(dimensions)),
    "expand_dims": lambda x, dimensions, **_: np.expand_dims(x, tuple(dimensions)),
    "slice": _slice,
    "rev": lambda x, dimensions, **_: np.flip(x, tuple(dimensions)),
    "concatenate": lambda *xs, dimension, **_: np.concatenate(xs, axis=dimension),
    "pad": _pad,
    "dynamic_slice": _dynamic_slice,
    "dynamic_update_slice": _dynamic_update_slice,
    "split": _split,
    "tile": _tile,
    "stack": lambda *xs, axis, **_: np.stack(xs, axis=axis),
    "unstack": _unstack,
    "iota": lambda dtype, shape, dimension, **p: _iota(dtype, shape, dimension),
    "copy": lambda x, **_: np.array(x, copy=True),
    "copy_p": lambda x, **_: np.array(x, copy=True),
}
# Integer and boolean arithmetic that NumPy computes as XLA does: two's-complement wrap-around on
# overflow (ufuncs on arrays of one dtype; scalars are made arrays first). ``and``, ``or``, ``not``
# and ``xor`` are bitwise in JAX (logical only on booleans, where bitwise is the same). Division,
# remainder and shifts are left to XLA (division by zero, shift counts past the width).
INT_OPS = {
    "add": np.add,
    "sub": np.subtract,
    "mul": np.multiply,
    "neg": np.negative,
    "max": np.maximum,
    "min": np.minimum,
    "lt": np.less,
    "le": np.less_equal,
    "gt": np.greater,
    "ge": np.greater_equal,
    "eq": np.equal,
    "ne": np.not_equal,
    "and": np.bitwise_and,
    "or": np.bitwise_or,
    "xor": np.bitwise_xor,
    "not": np.invert,
}


# Float arithmetic NumPy rounds as XLA does: one correctly rounded IEEE operation in float32 or
# float64. XLA's CPU runtime flushes subnormals to zero, so a fold that meets one (or a NaN or
# infinity, whose signs and payloads are not worth matching) is left to XLA.
FLOAT_OPS = {"add": np.add, "sub": np.subtract, "mul": np.multiply, "neg": np.negative}


def _float_fold(op, args, out_dtypes) -> np.ndarray | None:
    args = [np.asarray(a) for a in args]
    dtypes = {a.dtype for a in args} | {np.dtype(d) for d in out_dtypes}
    if len(dtypes) != 1 or args[0].dtype not in (np.float32, np.float64):
        return None  # one dtype in and out: the operation rounds once, in it
    with np.errstate(all="ignore"):
        out = np.asarray(op(*args))
    tiny = np.finfo(out.dtype).tiny
    for a in (*args, out):
        mag = np.abs(a)
        if not np.all(np.isfinite(a)) or np.any((mag > 0) & (mag < tiny)):
            return None
    return out


def _integers(args) -> bool:
    """All ``args`` integer or boolean arrays of one dtype (as every lax primitive's operands are)."""
    dtypes = {np.asarray(a).dtype for a in args}
    return len(dtypes) == 1 and next(iter(dtypes)).kind in "iub"


def evaluate(name: str, params: dict, args: list, out_dtypes: list) -> list | None:
    """``name``'s outputs on NumPy ``args``, or ``None`` where this module has no exact rule."""
    try:
        if name in IMPLS:
            out = IMPLS[name](*args, **params)
        elif name in INT_OPS and _integers(args):
            with np.errstate(all="ignore"):
                out = INT_OPS[name](*(np.asarray(a) for a in args))
        elif name in FLOAT_OPS and (out := _float_fold(FLOAT_OPS[name], args, out_dtypes)) is not None:
            pass
        elif name == "select_n" and _integers(args[1:]):
            out = _select_n(*args)
        elif name == "convert_element_type" and np.asarray(args[0]).dtype.kind in "iub" and np.dtype(
            params["new_dtype"]
        ).kind in "iub":
            out = _convert(args[0], params["new_dtype"])
        else:
            return None
    except Exception:  # noqa: BLE001 - anything unusual goes to XLA
        return None
    outs = list(out) if isinstance(out, list | tuple) else [out]
    if len(outs) != len(out_dtypes):
        return None
    return [np.asarray(o).astype(d, copy=False) if d is not None else np.asarray(o) for o, d in zip(outs, out_dtypes)]
