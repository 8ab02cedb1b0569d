"""Rules for reductions, cumulative ops and sorts: unions along axes."""

import numpy as np

from .._primitives import CUMULATIVE as CUMULATIVE
from .._primitives import REDUCTIONS as REDUCTIONS
from ._sets import broadcast_to, from_coo, reduce_to, runs, union


def _collapse(d, axes, n_inputs):
    """Union the sets along ``axes`` (removed from the shape)."""
    if not d.shape:
        return d
    keep = [i for i in range(len(d.shape)) if i not in axes]
    shape = tuple(d.shape[i] for i in keep)
    coords = np.indices(d.shape).reshape(len(d.shape), d.size)
    target = np.ravel_multi_index(coords[keep], shape) if keep else np.zeros(d.size, np.int64)
    return reduce_to(d, target, shape, n_inputs)


def reduce(lat, eqn, ins):
    """Union over the reduced ``axes``.

    Example: ``reduce_sum`` over axis 1 of [[{0}, {1}], [{2}, {3}]] -> [{0, 1}, {2, 3}].
    Reads ``axes``. A 0-d operand (``jnp.sum`` of a scalar) is returned as is.
    """
    return [_collapse(ins[0], tuple(eqn.params["axes"]), lat.n)]


def cumulative(lat, eqn, ins):
    """Element ``k`` along ``axis`` takes the union of elements ``0..k`` (``k..L-1`` reversed).

    Example: ``cumsum`` of [{0}, {1}, {2}] -> [{0}, {0, 1}, {0, 1, 2}]. Reads
    ``axis`` and ``reverse``.
    """
    d = ins[0]
    axis, reverse = eqn.params["axis"], eqn.params["reverse"]
    length = d.shape[axis]
    coords = np.indices(d.shape).reshape(len(d.shape), d.size)
    rows, cols = d.rows(), d.indices
    pos = coords[axis][rows]
    count = (pos + 1) if reverse else (length - pos)
    rep, step = runs(count)
    c = coords[:, rows[rep]]
    c[axis] = pos[rep] + (-step if reverse else step)
    return [from_coo(d.shape, np.ravel_multi_index(c, d.shape), cols[rep], lat.n)]


def along_axis(lat, eqn, ins):
    """``sort`` / ``top_k`` / ``approx_top_k``: each output element may come from any element of its line.

    Example: ``sort`` of [{0}, {1}, {2}] -> [{0, 1, 2}] * 3. Reads ``dimension``
    (``sort``; every operand is permuted by the keys), ``axis`` (``top_k``;
    the last axis in JAX versions without the parameter) or ``reduction_dimension``
    (``approx_top_k``).
    """
    p = eqn.params
    axis = p.get("dimension", p.get("axis", p.get("reduction_dimension", -1))) % len(ins[0].shape)
    lines = union([_collapse(d, (axis,), lat.n) for d in ins], tuple(np.delete(ins[0].shape, axis)), lat.n)
    outs = []
    for v in eqn.outvars:
        shape = v.aval.shape
        expanded = lines.with_shape(shape[:axis] + (1,) + shape[axis + 1 :])
        outs.append(broadcast_to(expanded, shape))
    return outs


def reduce_generic(lat, eqn, ins):
    """The generic ``reduce`` (``lax.reduce`` with a computation; operands, then their initial values).

    The computation may combine its operands in any way: every output reads
    all operands along ``dimensions`` and every initial value. Example: two
    operands [{0}, {1}] and [{2}, {3}] reduced over axis 0 -> [{0, 1, 2, 3}]
    for both outputs. Reads ``dimensions``.
    """
    n_out = len(eqn.outvars)
    shape = tuple(eqn.outvars[0].aval.shape)
    axes = tuple(eqn.params["dimensions"])
    parts = [_collapse(d, axes, lat.n).with_shape(shape) for d in ins[:n_out] if d.nnz]
    parts += [broadcast_to(d, shape) for d in ins[n_out:] if d.nnz]
    out = union(parts, shape, lat.n)
    return [out.with_shape(shape) for _ in eqn.outvars]


def fft(lat, eqn, ins):
    """``fft``: each output reads every input of its line (the transformed trailing axes).

    Example: a length-3 ``fft`` of sets [{0}, {1}, {2}] -> [{0, 1, 2}] * 3; a
    batch axis in front keeps its lines apart. Reads ``fft_lengths`` (how many
    trailing axes are transformed; ``rfft`` / ``irfft`` change the last length).
    """
    d = ins[0]
    k = len(eqn.params["fft_lengths"])
    lines = _collapse(d, tuple(range(len(d.shape) - k, len(d.shape))), lat.n)
    shape = tuple(eqn.outvars[0].aval.shape)
    return [broadcast_to(lines.with_shape(lines.shape + (1,) * k), shape)]


RULES = {name: reduce for name in REDUCTIONS}
RULES["reduce"] = reduce_generic
RULES["fft"] = fft
RULES.update({name: cumulative for name in CUMULATIVE})
RULES.update({"sort": along_axis, "top_k": along_axis, "approx_top_k": along_axis})
