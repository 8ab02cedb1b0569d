"""The rule for ``conv_general_dilated``: each output depends on its receptive field."""

import math

import numpy as np

from ._sets import broadcast_to, compose, everything, union

PAIRS_MAX = 1 << 26  # (output, window entry) pairs before a convolution counts as dense


def _window(out_size, k_size, in_size, stride, pad_lo, lhs_dil, rhs_dil):
    """For one spatial axis: the input position under (output o, kernel k), or -1 (padding, holes)."""
    o = np.arange(out_size)[:, None]
    k = np.arange(k_size)[None, :]
    p = o * stride - pad_lo + k * rhs_dil  # position in the dilated, padded input
    ok = (p >= 0) & (p % lhs_dil == 0) & (p // lhs_dil < in_size)
    return np.where(ok, p // lhs_dil, -1)


def conv(lat, eqn, ins):
    """Output (b, o, y...) depends on lhs (b, c, y*s - pad + k*dil ...) for its feature group's c and the kernel.

    Handles strides, padding, lhs (transposed-convolution) and rhs (atrous)
    dilation, ``feature_group_count`` (depthwise) and ``batch_group_count``. A
    constant kernel keeps its zeros. Example: a 1-D 3-tap convolution with
    SAME padding of sets [{0}, {1}, {2}] -> [{0, 1}, {0, 1, 2}, {1, 2}]. Reads
    ``window_strides``, ``padding``, ``lhs_dilation``, ``rhs_dilation``,
    ``dimension_numbers``, ``feature_group_count``, ``batch_group_count``.
    """
    lhs, rhs = ins
    p = eqn.params
    out_shape = eqn.outvars[0].aval.shape
    lspec, rspec, ospec = p["dimension_numbers"]
    # Element numbers in canonical layouts: lhs (B, C, *sp), rhs (O, I, *k), out (B', O, *sp').
    lnum = np.transpose(np.arange(lhs.size).reshape(lhs.shape), lspec)
    rnum = np.transpose(np.arange(rhs.size).reshape(rhs.shape), rspec)
    onum = np.transpose(np.arange(math.prod(out_shape)).reshape(out_shape), ospec)
    batch, cin = lnum.shape[:2]
    cout, cin_g = rnum.shape[:2]
    obatch = onum.shape[0]
    g, bg = p["feature_group_count"], p["batch_group_count"]
    nsp = lnum.ndim - 2
    if onum.size * cin_g * math.prod(rnum.shape[2:]) > PAIRS_MAX:
        return [everything(ins, out_shape)]
    # Index grids over (b', o, *y, i, *k), broadcast against each other.
    ndim = 2 + nsp + 1 + nsp

    def axis(size, pos):
        shape = [1] * ndim
        shape[pos] = size
        return np.arange(size).reshape(shape)

    ob, oo = axis(obatch, 0), axis(cout, 1)
    oy = [axis(onum.shape[2 + s], 2 + s) for s in range(nsp)]
    ii = axis(cin_g, 2 + nsp)
    kk = [axis(rnum.shape[2 + s], 3 + nsp + s) for s in range(nsp)]
    lb = (oo // (cout // bg)) * obatch + ob if bg > 1 else ob
    lc = (oo // (cout // g)) * cin_g + ii
    valid = np.ones((1,) * ndim, bool)
    ly = []
    for s in range(nsp):
        table = _window(onum.shape[2 + s], rnum.shape[2 + s], lnum.shape[2 + s], p["window_strides"][s],
                        p["padding"][s][0], p["lhs_dilation"][s], p["rhs_dilation"][s])
        pos = table[oy[s], kk[s]]
        valid = valid & (pos >= 0)
        ly.append(np.maximum(pos, 0))
    full = np.broadcast_shapes(
        ob.shape, oo.shape, ii.shape, valid.shape, *(y.shape for y in oy), *(k.shape for k in kk)
    )
    valid = np.broadcast_to(valid, full)
    rows = np.broadcast_to(onum[(ob, oo, *oy)], full)[valid]
    lcols = np.broadcast_to(lnum[(lb, lc, *ly)], full)[valid]
    rcols = np.broadcast_to(rnum[(oo, ii, *kk)], full)[valid]
    parts = []
    if lhs.nnz:
        keep = np.ones(rows.size, bool) if rhs.const is None else np.asarray(rhs.const).reshape(-1)[rcols] != 0
        parts.append(compose(out_shape, rows[keep], lcols[keep], lhs, lat.n))
    if rhs.nnz:
        keep = np.ones(rows.size, bool) if lhs.const is None else np.asarray(lhs.const).reshape(-1)[lcols] != 0
        parts.append(compose(out_shape, rows[keep], rcols[keep], rhs, lat.n))
    return [union(parts, out_shape, lat.n)]


def _window_pairs(in_shape, out_shape, p) -> tuple[np.ndarray, np.ndarray] | None:
    """``(rows, cols)``: output element ``rows[t]`` of a windowed reduction reads input element ``cols[t]``.

    Every axis is windowed (``window_dimensions``, ``window_strides``,
    ``padding``, and ``base_dilation`` / ``window_dilation`` where given).
    ``None`` when the pairs would pass :data:`PAIRS_MAX`.
    """
    nd = len(in_shape)
    dims = tuple(p["window_dimensions"])
    if math.prod(out_shape) * math.prod(dims) > PAIRS_MAX:
        return None
    base = p.get("base_dilation") or (1,) * nd
    wdil = p.get("window_dilation") or (1,) * nd
    pos, valid = [], np.ones((1,) * (2 * nd), bool)
    for a in range(nd):
        table = _window(out_shape[a], dims[a], in_shape[a], p["window_strides"][a], p["padding"][a][0], base[a],
                        wdil[a])
        shape = [1] * (2 * nd)
        shape[a], shape[nd + a] = out_shape[a], dims[a]
        table = table.reshape(shape)  # over (o_0, ..., o_nd-1, k_0, ..., k_nd-1)
        valid = valid & (table >= 0)
        pos.append(np.maximum(table, 0))
    full = tuple(out_shape) + dims
    valid = np.broadcast_to(valid, full)
    rows = np.broadcast_to(np.arange(math.prod(out_shape)).reshape(tuple(out_shape) + (1,) * nd), full)[valid]
    cols = np.ravel_multi_index(tuple(np.broadcast_to(q, full)[valid] for q in pos), in_shape) if nd else rows
    return rows, np.asarray(cols, np.int64)


def reduce_window(lat, eqn, ins):
    """``reduce_window_sum`` / ``_max`` / ``_min`` and the generic ``reduce_window``: each output reads its window.

    The generic form (operands, then their initial values) may combine its
    operands in any way: every output reads the windows of all operands and
    every initial value. Example: a width-2, stride-1 ``reduce_window_sum`` of
    sets [{0}, {1}, {2}] -> [{0, 1}, {1, 2}]. Reads ``window_dimensions``,
    ``window_strides``, ``padding``, ``base_dilation``, ``window_dilation``.
    """
    n_out = len(eqn.outvars)
    operands, inits = (ins[:n_out], ins[n_out:]) if eqn.primitive.name == "reduce_window" else (ins[:1], [])
    out_shape = tuple(eqn.outvars[0].aval.shape)
    pairs = _window_pairs(tuple(operands[0].shape), out_shape, eqn.params)
    if pairs is None:
        return [everything(ins, v.aval.shape) for v in eqn.outvars]
    parts = [compose(out_shape, *pairs, d, lat.n) for d in operands if d.nnz]
    parts += [broadcast_to(d, out_shape) for d in inits if d.nnz]
    out = union(parts, out_shape, lat.n)
    return [out.with_shape(out_shape) for _ in eqn.outvars]


def select_and_gather_add(lat, eqn, ins):
    """``select_and_gather_add(tangents, operand)`` (max pooling's JVP): each output reads its window of tangents.

    The operand only selects (a zero derivative). Example: width 2, stride 1,
    tangent sets [{0}, {1}, {2}] -> [{0, 1}, {1, 2}]. Reads the window parameters.
    """
    out_shape = tuple(eqn.outvars[0].aval.shape)
    pairs = _window_pairs(tuple(ins[0].shape), out_shape, eqn.params)
    if pairs is None:
        return [everything(ins[:1], out_shape)]
    return [compose(out_shape, *pairs, ins[0], lat.n)]


def select_and_scatter_add(lat, eqn, ins):
    """``select_and_scatter_add(source, operand)`` (max pooling's VJP): each input position reads the windows over it.

    The transpose of :func:`select_and_gather_add`; the operand only selects.
    Example: width 2, stride 1, source sets [{0}, {1}] onto 3 positions ->
    [{0}, {0, 1}, {1}]. Reads ``window_dimensions``, ``window_strides``, ``padding``.
    """
    out_shape = tuple(eqn.outvars[0].aval.shape)
    pairs = _window_pairs(out_shape, tuple(ins[0].shape), eqn.params)
    if pairs is None:
        return [everything(ins[:1], out_shape)]
    rows, cols = pairs
    return [compose(out_shape, cols, rows, ins[0], lat.n)]


RULES = {"conv_general_dilated": conv, "select_and_gather_add": select_and_gather_add,
         "select_and_scatter_add": select_and_scatter_add}
RULES.update({name: reduce_window for name in ("reduce_window_sum", "reduce_window_max", "reduce_window_min",
                                               "reduce_window")})
