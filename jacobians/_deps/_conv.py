"""The rule for ``conv_general_dilated``: each output depends on its receptive field."""

import math

import numpy as np

from ._sets import compose, everything, union

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


RULES = {"conv_general_dilated": conv}
