"""Primitives linear in their active operands: one map applied to every column of the block.

A linear (or piecewise-linear: ``max``, ``sort``, ``reduce_max``) map ``A``
acts on the first derivatives and on the second-order part alike, with no
second-order term of its own: ``J_y = A J``, ``L_y = A L``. The map is the
primitive's own JVP at the primal, ``vmap``-ed over the block's columns (a
matrix product by a constant becomes one product with ``K + 1`` columns).

With sparse layouts the rule also says where each result's columns come from:

- movement (reshape, transpose, slice, pad, concatenate, gather with known
  indices, ...): the selection map (found on the host, by applying the
  primitive to element labels) copies layouts, so blocks move unchanged;
- reductions along axes (``reduce_sum``, ``cumsum``, ``sort``): the union of
  the layouts along the axes (``[[{0}, {1}], [{2}, {3}]]`` summed over axis 1
  -> ``[{0, 1}, {2, 3}]``); a sum whose union is dense scatters its columns
  instead of widening every element first;
- ``dot_general`` with one active operand: the union along its contracted
  axes, so a layer ``h @ W`` of a per-node network keeps the node's columns;
- anything else: the dependency lattice's sets (``jacobians._deps``) of the
  result, computed densely and then compressed.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

from .. import _sweeps
from . import _block as bk
from . import _layout

REDUCTIONS = ("reduce_sum", "reduce_max", "reduce_min")
ALONG_AXIS = {"cumsum": "axis", "cummax": "axis", "cummin": "axis", "sort": "dimension"}


def apply(lat, eqn, ins, active, ts) -> list:
    """The JVP of ``eqn`` in its ``active`` operands applied to each column of their blocks ``ts``.

    Returns one block per output (``None`` for outputs without derivatives).
    """
    diff = [k for k, v in enumerate(eqn.outvars) if jnp.issubdtype(v.aval.dtype, jnp.inexact)]
    f, vary = _sweeps.as_function(eqn, ins, active, diff)
    ts = [bk.cast(t, v.dtype) for t, v in zip(ts, vary, strict=True)]
    push = jax.vmap(lambda *cs: jax.jvp(f, vary, list(cs))[1])
    js = push(*[t[0] for t in ts])
    ls = push(*[t[1] for t in ts])
    outs = [None] * len(eqn.outvars)
    for k, a, b in zip(diff, js, ls, strict=True):
        outs[k] = (a, b)
    return outs


def _dense(lat, eqn, ins, active) -> list:
    ts = [bk.relayout(lat, ins[i], np.shape(ins[i].primal), None) for i in active]
    return [(t, None) for t in apply(lat, eqn, ins, active, ts)]


def linear(lat, eqn, ins):
    """Linear in the active operands: dispatch on how the layouts move (module docstring)."""
    active = [i for i, v in enumerate(ins) if v.active]
    if not lat.sparse or all(ins[i].idx is None for i in active):
        return _dense(lat, eqn, ins, active)
    name = eqn.primitive.name
    if name in _sweeps.SELECT:
        out = _movement(lat, eqn, ins, active)
        if out is not None:
            return out
    if name in REDUCTIONS:
        return _reduction(lat, eqn, ins)
    if name in ALONG_AXIS:
        return _along_axis(lat, eqn, ins, active)
    if name == "dot_general":
        return _dot(lat, eqn, ins, active[0])
    return opaque(lat, eqn, ins, active)


def opaque(lat, eqn, ins, active):
    """Dense columns, then the result compressed to the dependency lattice's sets."""
    outs = _dense(lat, eqn, ins, active)
    layouts = lat.deps_layout(eqn, ins)
    return [(None, None) if t is None else (bk.compress(lat, t, v.aval.shape, idx), idx)
            for (t, _), idx, v in zip(outs, layouts, eqn.outvars, strict=True)]


def _pad_columns(lat, t, k_old: int, k: int):
    """A block with ``k_old`` first-derivative columns widened to ``k`` (zero columns after them)."""
    if k_old == k:
        return t

    def pad(a):
        return jnp.pad(a, [(0, k - k_old)] + [(0, 0)] * (a.ndim - 1))

    return pad(t[0]), (t[1] if lat.kind == "trace" else pad(t[1]))


def _movement(lat, eqn, ins, active):
    """Copies of elements: blocks move with the primitive, layouts with its selection map.

    Example: ``concatenate`` of layouts ``[[0], [1]]`` and ``[[2, 3]]`` -> ``[[0, n], [1, n], [2, 3]]``
    (the narrower operand padded with the sentinel ``n``).
    """
    found = _sweeps.selection_map(lat, eqn, ins)
    if found is None:
        return None
    pis, data = found
    if any(ins[i].idx is None for i in active):  # one dense operand: all dense
        return _dense(lat, eqn, ins, active)
    k = max(ins[i].idx.shape[-1] for i in active)
    ts, parts = [], []
    for i in data:
        shape = tuple(eqn.invars[i].aval.shape)
        size = math.prod(shape)
        if not ins[i].active:
            parts.append(np.full((size, k), lat.n, np.int64))
            continue
        idx = ins[i].idx
        k_old = idx.shape[-1]
        parts.append(np.pad(idx.reshape(size, k_old), [(0, 0), (0, k - k_old)], constant_values=lat.n))
    for i in active:
        ts.append(_pad_columns(lat, ins[i].t, ins[i].idx.shape[-1], k))
    cat = np.concatenate(parts) if parts else np.zeros((0, k), np.int64)
    blocks = apply(lat, eqn, ins, active, ts)
    res = []
    for t, pi, v in zip(blocks, pis, eqn.outvars, strict=True):
        if t is None:
            res.append((None, None))
            continue
        flat = pi.reshape(-1)
        idx = np.where((flat >= 0)[:, None], cat[np.maximum(flat, 0)], lat.n)
        res.append((t, idx.reshape(tuple(v.aval.shape) + (k,))))
    return res


def _reduction(lat, eqn, ins):
    """``reduce_sum`` / ``reduce_max`` / ``reduce_min`` along ``axes``: the union of the layouts along them."""
    x = ins[0]
    shape = tuple(eqn.invars[0].aval.shape)
    axes = tuple(eqn.params["axes"])
    idx = _layout.reduce(x.idx, axes, lat.n)
    out_shape = tuple(eqn.outvars[0].aval.shape)
    if idx is None and eqn.primitive.name == "reduce_sum":
        return [(_scatter_sum(lat, x, shape, axes, out_shape), None)]
    dst = None if idx is None else _layout.expand(idx, out_shape, axes, shape)
    t = bk.relayout(lat, x, shape, dst)
    (out,) = apply(lat, eqn, ins, [0], [t])
    return [(out, idx)]


def _scatter_sum(lat, x, shape, axes, out_shape):
    """A sum whose result is dense: each stored column added into its input's row (``O(K)`` per element).

    Moving every element to the dense layout first would cost ``O(n)`` per element.
    """
    k = x.idx.shape[-1]
    nd = len(shape)
    keep = [a for a in range(nd) if a not in axes]
    order = keep + list(axes)
    r = math.prod(out_shape)
    g = math.prod(shape) // max(r, 1)
    idx = np.transpose(x.idx, order + [nd]).reshape(r, g * k)
    rows = np.broadcast_to(np.arange(r)[:, None], idx.shape).astype(np.int32)
    cols = np.where(idx < lat.n, idx, lat.n).astype(np.int32)

    def grouped(a):  # (c,) + shape -> (c, r, g)
        return jnp.transpose(a, [0] + [1 + d for d in order]).reshape(a.shape[0], r, g)

    def scatter(a):  # (k,) + shape -> (n,) + out_shape
        v = jnp.transpose(grouped(a), (1, 2, 0)).reshape(r, g * k)
        dense = jnp.zeros((lat.n + 1, r), a.dtype).at[jnp.asarray(cols), jnp.asarray(rows)].add(v)
        return dense[: lat.n].reshape((lat.n,) + tuple(out_shape))

    j, second = x.t
    if lat.kind == "trace":
        return scatter(j), jnp.sum(grouped(second), axis=2).reshape((1,) + tuple(out_shape))
    return scatter(j), scatter(second)


def _along_axis(lat, eqn, ins, active):
    """``cumsum``, ``cummax``, ``cummin``, ``sort``: every element takes the union along the axis."""
    axis = eqn.params[ALONG_AXIS[eqn.primitive.name]]
    shape = tuple(eqn.invars[active[0]].aval.shape)
    axis = axis % len(shape)
    parts = []
    for i in active:
        if ins[i].idx is None:
            return _dense(lat, eqn, ins, active)
        parts.append(_layout.reduce(ins[i].idx, (axis,), lat.n))
    idx = _layout.union(parts, lat.n)
    if idx is None:
        return _dense(lat, eqn, ins, active)
    kept = tuple(s for a, s in enumerate(shape) if a != axis)
    dst = _layout.expand(idx, kept, (axis,), shape)
    ts = [bk.relayout(lat, ins[i], shape, dst) for i in active]
    blocks = apply(lat, eqn, ins, active, ts)
    return [(None, None) if t is None else (t, dst) for t in blocks]


def _dot(lat, eqn, ins, k: int):
    """``dot_general`` with operand ``k`` active: the union of its layout along its contracted axes.

    Example: ``x @ W`` with ``x`` of shape ``(nodes, 4)``, element ``[i, c]`` of layout ``[4 i + c]``
    -> result ``[i, h]`` of layout ``[4 i, 4 i + 1, 4 i + 2, 4 i + 3]``.
    """
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    contract, batch = (list(lc), list(lb)) if k == 0 else (list(rc), list(rb))
    op_shape = tuple(eqn.invars[k].aval.shape)
    x = ins[k]
    u = _layout.reduce(x.idx, contract, lat.n)
    if u is None:
        return _dense(lat, eqn, ins, [k])
    kept = [a for a in range(len(op_shape)) if a not in contract]
    dst = _layout.expand(u, tuple(op_shape[a] for a in kept), contract, op_shape)
    t = bk.relayout(lat, x, op_shape, dst)
    (out,) = apply(lat, eqn, ins, [k], [t])
    # u's axes are the kept axes in order; the result's are batch (in listed order), lhs free, rhs free.
    free = [a for a in kept if a not in batch]
    u = np.transpose(u, [kept.index(a) for a in batch + free] + [len(kept)])
    other = eqn.invars[1 - k].aval.shape
    n_other_free = len(other) - len(lc if k == 1 else rc) - len(batch)
    width_ = u.shape[-1]
    if k == 0:
        u = u.reshape(u.shape[:-1] + (1,) * n_other_free + (width_,))
    else:
        u = u.reshape(u.shape[: len(batch)] + (1,) * n_other_free + u.shape[len(batch):])
    out_shape = tuple(eqn.outvars[0].aval.shape)
    return [(out, np.broadcast_to(u, out_shape + (width_,)))]
