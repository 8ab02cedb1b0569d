"""Value ranges of the integers a function computes from its input: the values a traced index can take.

An integer or boolean array whose value is unknown at trace time may carry
elementwise bounds ``(lo, hi)`` (float64 arrays of its shape, exact for the
integers an index holds); a known value is its own bounds. The rules below
give the bounds of a primitive's integer result from its operands' (a
primitive without a rule: any value). The movement rules read them
(:func:`._movement.index_choices`): ``lax.dynamic_slice(x, (argmax(x[:2]),), (3,))``
starts at 0 or 1, not anywhere, and ``x[argmax(y)]`` of a 4-element ``y``
reads ``x[0..3]`` only. Example: ``argmax`` over 4 elements -> [0, 3];
``+ 1`` -> [1, 4]; ``< 0`` -> known false, so JAX's wrap of negative indices
(``select_n(i < 0, i, i + n)``) keeps [1, 4].

A result that may leave its type's range (an overflow, a conversion to a
narrower or unsigned type) may wrap around: it takes the whole type. A float
made an integer takes the whole type too (then a ``clip`` narrows it). Loop
carries forget their bounds (:meth:`DepsLattice.forget`): a counter's range
is its whole loop's, not its first steps'.
"""

import jax
import numpy as np

Interval = tuple[np.ndarray, np.ndarray]


def interval(d) -> Interval | None:
    """The bounds of an integer :class:`._sets.Deps` (its value, if known), or ``None`` (any value)."""
    if d.const is not None:
        c = np.asarray(d.const)
        if c.dtype.kind in "biu":  # (floats: none, NaN has no place in an interval of integers)
            c = c.astype(np.float64)
            return c, c
        return None
    return d.bounds


def _int_limits(dtype) -> Interval:
    if np.dtype(dtype) == np.bool_:
        return np.zeros(()), np.ones(())
    info = np.iinfo(dtype)
    return np.asarray(float(info.min)), np.asarray(float(info.max))


def _shaped(b: Interval, shape) -> Interval:
    return tuple(np.broadcast_to(np.asarray(x, np.float64), shape).copy() for x in b)


def _argmax(eqn, ins, shape):
    size = eqn.invars[0].aval.shape[eqn.params["axes"][0]]
    return np.zeros(shape), np.full(shape, float(max(size - 1, 0)))


def _arith(eqn, ins, shape):
    name = eqn.primitive.name
    if name == "neg":
        lo, hi = ins[0]
        return -hi, -lo
    (alo, ahi), (blo, bhi) = ins
    if name == "add":
        return alo + blo, ahi + bhi
    if name == "sub":
        return alo - bhi, ahi - blo
    if name == "max":
        return np.maximum(alo, blo), np.maximum(ahi, bhi)
    if name == "min":
        return np.minimum(alo, blo), np.minimum(ahi, bhi)
    corners = np.stack(np.broadcast_arrays(alo * blo, alo * bhi, ahi * blo, ahi * bhi))  # mul
    with np.errstate(invalid="ignore"):  # 0 * inf: the product's bound is 0 there
        corners = np.nan_to_num(corners, nan=0.0, posinf=np.inf, neginf=-np.inf)
    return corners.min(0), corners.max(0)


def _clamp(eqn, ins, shape):
    (llo, lhi), (xlo, xhi), (hlo, hhi) = ins  # min(max(x, l), h): increasing in each
    return np.minimum(np.maximum(xlo, llo), hlo), np.minimum(np.maximum(xhi, lhi), hhi)


def _compare(eqn, ins, shape):
    (alo, ahi), (blo, bhi) = ins
    name = eqn.primitive.name.removesuffix("_to")
    point = (alo == ahi) & (blo == bhi) & (alo == blo)  # both one and the same value
    apart = (ahi < blo) | (alo > bhi)
    sure = {"lt": (ahi < blo, alo >= bhi), "le": (ahi <= blo, alo > bhi), "gt": (alo > bhi, ahi <= blo),
            "ge": (alo >= bhi, ahi < blo), "eq": (point, apart), "ne": (apart, point)}[name]  # (surely true, false)
    true, false = (np.broadcast_to(s, shape) for s in sure)
    return np.where(true, 1.0, 0.0), np.where(false, 0.0, 1.0)


def _logic(eqn, ins, shape):
    if eqn.outvars[0].aval.dtype != np.bool_:
        return None  # bitwise on integers: any value
    name = eqn.primitive.name
    if name == "not":
        lo, hi = ins[0]
        return 1 - hi, 1 - lo
    (alo, ahi), (blo, bhi) = ins
    if name == "and":
        return alo * blo, ahi * bhi
    return np.maximum(alo, blo), np.maximum(ahi, bhi)  # or


def _select(eqn, ins, shape):
    (plo, phi), *cases = ins
    los = np.stack([np.broadcast_to(c[0], shape) for c in cases])
    his = np.stack([np.broadcast_to(c[1], shape) for c in cases])
    k = np.arange(len(cases)).reshape((-1,) + (1,) * len(shape))
    can = (k >= np.broadcast_to(plo, shape)) & (k <= np.broadcast_to(phi, shape))
    return np.where(can, los, np.inf).min(0), np.where(can, his, -np.inf).max(0)


def _convert(eqn, ins, shape):
    lo, hi = ins[0]
    if eqn.outvars[0].aval.dtype == np.bool_:
        zero = (lo == 0) & (hi == 0)
        return np.where((lo > 0) | (hi < 0), 1.0, 0.0), np.where(zero, 0.0, 1.0)
    return np.trunc(lo), np.trunc(hi)  # (truncation is monotone)


def _rem(eqn, ins, shape):
    (alo, ahi), (blo, bhi) = ins
    m = np.maximum(np.abs(blo), np.abs(bhi)) - 1  # |a rem b| < |b|, with a's sign
    lo, hi = np.where(alo >= 0, 0.0, np.maximum(alo, -m)), np.where(ahi <= 0, 0.0, np.minimum(ahi, m))
    zero = (blo <= 0) & (bhi >= 0)  # XLA's a rem 0 is a
    return np.where(zero, np.minimum(lo, alo), lo), np.where(zero, np.maximum(hi, ahi), hi)


def _div(eqn, ins, shape):
    """Integer division, rounding toward zero; a divisor that may be 0 gives any value (XLA's ``a / 0`` is -1)."""
    (alo, ahi), (blo, bhi) = ins
    alo, ahi, blo, bhi = np.broadcast_arrays(alo, ahi, blo, bhi)
    zero = (blo <= 0) & (bhi >= 0)
    b0, b1 = np.where(zero, 1.0, blo), np.where(zero, 1.0, bhi)
    # For a divisor of one sign, a / b is monotone in each operand: its extremes are at the corners.
    corners = np.trunc(np.stack([alo / b0, alo / b1, ahi / b0, ahi / b1]))
    return np.where(zero, -np.inf, corners.min(0)), np.where(zero, np.inf, corners.max(0))


def _bitcast(eqn, ins, shape):
    """The same bits read as another integer type of the same width: values both types hold are kept."""
    src, dst = (np.dtype(v.aval.dtype) for v in (eqn.invars[0], eqn.outvars[0]))
    if src.kind not in "iu" or dst.kind not in "iu" or src.itemsize != dst.itemsize:
        return None
    lo, hi = ins[0]
    both = (lo >= max(float(np.iinfo(src).min), float(np.iinfo(dst).min))) & (
        hi <= min(float(np.iinfo(src).max), float(np.iinfo(dst).max)))
    return np.where(both, lo, -np.inf), np.where(both, hi, np.inf)


def _moved(eqn, ins, shape):
    """Data movement: the bounds move as the data does."""
    p, name = eqn.params, eqn.primitive.name

    def move(*xs):
        x = xs[0]
        if name == "reshape":
            return x.reshape(shape)
        if name == "broadcast_in_dim":
            kept = [1] * len(shape)
            for src, dst in enumerate(p["broadcast_dimensions"]):
                kept[dst] = x.shape[src]
            return np.broadcast_to(x.reshape(kept), shape)
        if name == "squeeze":
            return x.reshape(shape)
        if name == "transpose":
            return np.transpose(x, p["permutation"])
        if name == "rev":
            return np.flip(x, tuple(p["dimensions"]))
        if name == "concatenate":
            return np.concatenate(xs, axis=p["dimension"])
        if name == "stack":
            return np.stack(xs, axis=p["axis"])
        if name == "slice":
            strides = p["strides"] or (1,) * x.ndim
            return x[tuple(slice(a, b, c) for a, b, c in zip(p["start_indices"], p["limit_indices"], strides,
                                                              strict=True))]
        return x  # copy

    return move(*[b[0] for b in ins]), move(*[b[1] for b in ins])

MOVED = ("reshape", "broadcast_in_dim", "squeeze", "transpose", "rev", "concatenate", "stack", "copy", "copy_p",
         "slice")
RULES = {"argmax": _argmax, "argmin": _argmax, "clamp": _clamp, "select_n": _select,
         "convert_element_type": _convert, "rem": _rem, "div": _div, "bitcast_convert_type": _bitcast}
RULES.update({name: _arith for name in ("add", "sub", "mul", "neg", "max", "min")})
RULES.update({name: _compare for name in ("lt", "le", "gt", "ge", "eq", "ne", "lt_to", "le_to", "eq_to")})
RULES.update({name: _logic for name in ("and", "or", "not")})
RULES.update({name: _moved for name in MOVED})


def _integral(aval) -> bool:
    """An integer or boolean array (not a PRNG key or another extended dtype)."""
    dt = getattr(aval, "dtype", None)
    return dt is not None and not jax.dtypes.issubdtype(dt, jax.dtypes.extended) and np.dtype(dt).kind in "biu"


def bounds(eqn, ins: list) -> list[Interval | None]:
    """Per output of ``eqn``: the bounds of its integer or boolean value, from its operands' (``ins``: Deps)."""
    outs = eqn.outvars
    kinds = [_integral(v.aval) for v in outs]
    if not any(kinds):
        return [None] * len(outs)
    name = eqn.primitive.name
    if name == "sort":  # every output: its operand's elements, reordered
        res = []
        for v, d, is_int in zip(outs, ins, kinds, strict=True):
            b = interval(d) if is_int else None
            res.append(None if b is None else _shaped((b[0].min(initial=np.inf), b[1].max(initial=-np.inf)),
                                                      v.aval.shape))
        return res
    rule = RULES.get(name)
    if rule is None or len(outs) != 1:
        return [None] * len(outs)
    shape = tuple(outs[0].aval.shape)
    limits = _int_limits(outs[0].aval.dtype)
    if name in ("argmax", "argmin"):
        ivs = [None] * len(ins)  # (the operand's values do not matter)
    elif name == "convert_element_type" and not _integral(eqn.invars[0].aval):
        # A float made an integer: any value of its type (out of range, what XLA's conversion gives: in it).
        # Bounded nonetheless, so that a clip of it (``jnp.clip`` is a call) is walked and narrows it.
        return [_shaped(limits, shape)]
    else:
        ivs = [interval(d) for d in ins]
        if all(b is None for b in ivs) or not all(_integral(v.aval) for v in eqn.invars):
            return [None]  # nothing known, or a float operand: any value
        ivs = [_int_limits(v.aval.dtype) if b is None else b for b, v in zip(ivs, eqn.invars, strict=True)]
    if name in MOVED:
        ivs = [_shaped(b, v.aval.shape) for b, v in zip(ivs, eqn.invars, strict=True)]
    out = rule(eqn, ivs, shape)
    if out is None:
        return [None]
    lo, hi = _shaped(out, shape)
    if np.any(lo < limits[0]) or np.any(hi > limits[1]):
        return [_shaped(limits, shape)]  # it may wrap around (an overflow, a narrower or unsigned type): any value
    return [(lo, hi)]
