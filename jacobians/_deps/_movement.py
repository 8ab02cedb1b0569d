"""Rules for data movement and indexing: each output element is a copy of one input element (or fill).

One trick serves every such primitive: run it on the host on arrays of
element *numbers* (1, 2, ... for the data operands; 0 means padding or fill)
with the index operands at their known values; each output number says whose
set the output element takes. Traced indices make everything reach everything.
Scatters also merge: each update element lands on the output element the
transposed scatter (a gather) says, and is unioned there.
"""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.lax import GatherScatterMode

from .. import _host_eval
from .._primitives import MOVES as MOVES
from .._primitives import SCATTERS as SCATTERS
from .._primitives import applies_function
from ._sets import broadcast_to, concat, empty, everything, gather, mask, reduce_to, union

# Traced indices: the union over every value they can take (clamped to the operand), up to this many
# combinations (and this many output elements over all of them); past it, anything may land anywhere.
CHOICES_MAX = 256
CHOICES_WORK_MAX = 1 << 20


def move(lat, eqn, ins):
    """Outputs take the sets of the input elements they copy.

    Example: ``rev`` of sets [{0}, {1}, {2}] -> [{2}, {1}, {0}]; ``pad`` of
    [{0}, {1}] with one low zero -> [{}, {0}, {1}]; a ``pad`` value with
    dependencies reaches exactly the padded positions. Reads each primitive's
    own parameters by binding it (``fill_value`` of ``gather`` set to 0; a
    ``promise_in_bounds`` gather read as clamping). Traced start indices (a
    ``dynamic_slice`` at ``argmax(x)``, the pivots of a batched LU) take the
    union over the values they can take: ``x[s : s + 2]`` of [{0}, {1}, {2}]
    with ``s`` traced -> [{0, 1}, {1, 2}].
    """
    data = MOVES[eqn.primitive.name]
    data = range(len(ins)) if data is None else data
    if not any(d.nnz for d in ins):  # (reached for an index's bounds only: nothing moves)
        return [empty(v.aval.shape) for v in eqn.outvars]
    traced = [k for k, d in enumerate(ins) if k not in data and d.const is None
              and not (eqn.primitive.name == "pad" and k == 1)]
    if not traced:
        return _move(lat, eqn, ins, data, {})
    choices = index_choices(eqn, ins, traced)
    if choices is None:  # anything may land anywhere
        return [everything(ins, v.aval.shape) for v in eqn.outvars]
    each = [_move(lat, eqn, ins, data, known) for known in choices]
    return [union(list(outs), v.aval.shape, lat.n) for outs, v in zip(zip(*each, strict=True), eqn.outvars)]


def index_choices(eqn, ins, traced: list) -> list[dict] | None:
    """Every value the traced index operands (positions ``traced``) can take, as ``{position: array}`` each.

    Start indices are clamped so that the window fits the operand (``dynamic_slice``,
    ``dynamic_update_slice``; a gather or scatter out of bounds clamps or fills): the
    values are ``0 .. operand - window`` per indexed dimension (within the index's
    bounds, :mod:`._bounds`), and a gather's or scatter's index array runs each
    element through its own values together (not every combination of two
    elements' values: enough for where each reads or lands, not for what no
    element overwrites). ``None``: too many combinations, or an unknown primitive.
    """
    name, p = eqn.primitive.name, eqn.params
    shape = eqn.invars[0].aval.shape
    if name in ("dynamic_slice", "dynamic_update_slice"):
        first = 1 if name == "dynamic_slice" else 2
        window = p["slice_sizes"] if name == "dynamic_slice" else eqn.invars[1].aval.shape
        dims = {k: k - first for k in traced}
        if any(d < 0 for d in dims.values()):
            return None
        ranges = []
        for k, d in dims.items():  # clamped starts: within the bounds of the start's value where it has them
            top = shape[d] - window[d]
            b = ins[k].bounds
            lo, hi = (0, top) if b is None else (int(np.clip(b[0], 0, top)), int(np.clip(b[1], 0, top)))
            ranges.append(range(lo, hi + 1))

        def build(values):
            return {k: np.asarray(v, eqn.invars[k].aval.dtype) for k, v in zip(dims, values, strict=True)}
    elif name in ("gather", *SCATTERS) and traced == [1]:
        dn = p["dimension_numbers"]
        if name == "gather":
            indexed, window = dn.start_index_map, p["slice_sizes"]
        else:  # the window an update writes: 1 on inserted (and batching) dimensions, else the update's
            indexed = dn.scatter_dims_to_operand_dims
            sizes = iter(eqn.invars[2].aval.shape[d] for d in dn.update_window_dims)
            skip = set(dn.inserted_window_dims) | set(getattr(dn, "operand_batching_dims", ()))
            window = [1 if d in skip else next(sizes) for d in range(len(shape))]
        index = eqn.invars[1].aval
        if not index.shape or index.shape[-1] != len(indexed):
            return None
        # Each index element's values: its bounds where it has them (clamped to the window's starts: the
        # gather clamps or fills past them), else every start. Offsets from each element's lowest value,
        # the same for all elements of a component: each element runs through its own values.
        top = np.asarray([shape[d] - window[d] for d in indexed], np.float64)
        b = ins[1].bounds
        lo, hi = (np.zeros(index.shape), np.broadcast_to(top, index.shape)) if b is None else b
        lo, hi = np.clip(lo, -1, top), np.clip(hi, -1, top)  # (-1: out of bounds, below: a fill)
        widths = (hi - lo).reshape(-1, len(indexed)).max(axis=0, initial=0).astype(np.int64) + 1
        ranges = [range(int(w)) for w in widths]

        def build(offsets):
            return {1: np.minimum(lo + np.asarray(offsets, np.float64), hi).astype(index.dtype)}
    else:
        return None
    count = math.prod(len(r) for r in ranges)
    out = sum(math.prod(v.aval.shape) for v in eqn.outvars)
    if count > CHOICES_MAX or count * out > CHOICES_WORK_MAX:
        return None
    return [build(values) for values in itertools.product(*ranges)]


def _move(lat, eqn, ins, data, known: dict):
    """:func:`move` with the index operands at their known values (``known`` overrides traced ones)."""
    name = eqn.primitive.name
    args, parts, offset = [], [], 0
    for k, d in enumerate(ins):
        if name == "pad" and k == 1:
            args.append(np.zeros((), np.int32))  # padding is "no element" (0)
        elif k in data:
            # Number the data elements 1, 2, ...; 0 means padding or fill.
            args.append(offset + 1 + np.arange(d.size, dtype=np.int32).reshape(d.shape))
            offset += d.size
            parts.append(d)
        else:
            args.append(known[k] if k in known else d.const)
    params = dict(eqn.params)
    if "fill_value" in params:
        params["fill_value"] = 0
    if params.get("mode") == GatherScatterMode.PROMISE_IN_BOUNDS:
        # Out of bounds, the forward gather clamps (XLA) and JAX's transpose drops: the clamped
        # reads contain both.
        params["mode"] = GatherScatterMode.CLIP
    outs = _host_eval.evaluate(name, params, args, [None] * len(eqn.outvars))
    if outs is None:  # gathers and the rest: XLA runs the primitive on the numbers
        outs = eqn.primitive.bind(*args, **params)
        outs = outs if eqn.primitive.multiple_results else [outs]
    source = concat(parts)
    results = []
    for ids in outs:
        ids = np.asarray(ids).astype(np.int64)
        res = gather(source, np.where((ids >= 1) & (ids <= offset), ids - 1, -1))
        if name == "pad" and ins[1].nnz:
            res = union([res, mask(broadcast_to(ins[1], ids.shape), ids == 0)], ids.shape, lat.n)
        results.append(res)
    return results


def scatter(lat, eqn, ins):
    """``scatter*(operand, indices, updates)``.

    Each update element is unioned into the output element it lands on; a
    plain ``scatter`` (``x.at[i].set(v)``) also forgets the overwritten
    operand entries (not ``x.at[i].apply(f)``'s, a function of them). Example:
    ``[{0}, {1}, {2}].at[1].set({5})`` -> [{0}, {5}, {2}]; with ``.add`` ->
    [{0}, {1, 5}, {2}]. Reads ``dimension_numbers``, ``mode`` and the other
    scatter parameters through the transposed scatter-add; out-of-bounds
    updates of a ``promise_in_bounds`` scatter are read both as dropped and
    as clamped. Traced indices: the union over the values they can take
    (:func:`index_choices`), every operand entry kept unless one index does the writing.
    """
    shape = eqn.outvars[0].aval.shape
    if not (ins[0].nnz or ins[2].nnz):  # (reached for an index's bounds only: nothing moves)
        return [empty(shape)]
    if ins[1].const is not None:
        return [_scatter(lat, eqn, ins, ins[1].const)]
    choices = index_choices(eqn, ins, [1])
    if choices is None:
        return [everything(ins, shape)]
    # With several index elements no entry is known to be overwritten: the choices run each element through
    # its values, not every combination of them, and one never tried may miss an entry every tried one writes.
    one = math.prod(eqn.invars[1].aval.shape[:-1]) == 1
    return [union([_scatter(lat, eqn, ins, known[1], clear=one) for known in choices], shape, lat.n)]


def _scatter(lat, eqn, ins, index, clear: bool = True):
    """:func:`scatter` with the indices ``index`` (a host array); ``clear``: a ``.set`` forgets what it overwrites."""
    operand, updates = ins[0], ins[2]
    shape = eqn.outvars[0].aval.shape
    size = math.prod(shape)
    dtype = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
    if dtype == jnp.float32 and size >= (1 << 24):
        return everything(ins, shape)
    zeros = jnp.zeros(shape, dtype)
    ids = jnp.asarray(1 + np.arange(size).reshape(shape), dtype)

    def targets(params):
        def scatter_add(u):
            return jax.lax.scatter_add_p.bind(zeros, index, u, **params)

        # The transpose of a scatter-add is the gather with the same indices: it
        # tells each update element which output element (1-based, 0: dropped) it lands on.
        (where,) = jax.linear_transpose(scatter_add, jax.ShapeDtypeStruct(updates.shape, dtype))(ids)
        return np.asarray(where).astype(np.int64).reshape(-1) - 1

    mode = eqn.params.get("mode")
    moving = broadcast_to(updates, updates.shape)
    if mode == GatherScatterMode.PROMISE_IN_BOUNDS:
        # A broken promise is implementation-defined: XLA's scatter drops an out-of-bounds update
        # (its transposed gather would clamp it); take both, and overwrite only what both write.
        target = targets(dict(eqn.params, mode=GatherScatterMode.FILL_OR_DROP))
        clamped = targets(dict(eqn.params, mode=GatherScatterMode.CLIP))
        moved = union([reduce_to(moving, target, shape, lat.n), reduce_to(moving, clamped, shape, lat.n)],
                      shape, lat.n)
    else:
        target = targets(eqn.params)
        moved = reduce_to(moving, target, shape, lat.n)
    if clear and eqn.primitive.name == "scatter" and operand.nnz and not applies_function(eqn):
        written = np.zeros(size, bool)
        written[target[target >= 0]] = True
        operand = mask(operand, ~written)
    return union([operand, moved], shape, lat.n)


RULES = {name: move for name in MOVES}
RULES.update({name: scatter for name in SCATTERS})
