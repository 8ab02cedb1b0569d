"""Element-wise primitives: the chain rule to second order, one element at a time.

For ``y = f(u_1, ..., u_r)`` element-wise (NumPy broadcasting of scalars and
size-1 axes), with first-derivative columns ``J_i`` and second-order parts
``L_i`` of the operands:

- ``J_y = sum_i f_i J_i``;
- ``L_y = sum_i f_i L_i + sum_{i, k} f_ik <J_i, J_k>`` (``"trace"``: summed over
  columns; ``"diag"``: per column), the Taylor-mode recurrence.

For one operand: ``J' = f'(u) J`` and ``L' = f'(u) L + f''(u) sum_j J_j^2``. The
partials ``f_i``, ``f_ik`` come from nested JVPs of the primitive with tangents
of ones (exact: the derivative of an element-wise map is diagonal), so a
``custom_jvp`` rule (``relu``, ``softplus``) is what gets differentiated, as in
``jax.hessian``. ``mul`` uses its bilinear form (``f_ab = 1``) and linear
primitives (``add``, ``max``, ``select_n``, conversions) skip the second
order. With sparse layouts, operands are first moved to the union of their
layouts.
"""

import jax
import jax.numpy as jnp

from .. import _primitives, _sweeps
from . import _block as bk
from . import _layout

# Constant partials of the linear element-wise primitives (no JVP needed).
SIGNS = _primitives.SIGNS


def _operands(lat, eqn, ins, active):
    """The active operands' blocks broadcast to the output, in the union of their layouts, and that layout."""
    out = eqn.outvars[0].aval
    shape, dtype = tuple(out.shape), out.dtype
    dst = None
    if lat.sparse:
        dst = _layout.union([_layout.broadcast(ins[i].idx, eqn.invars[i].aval.shape, shape) for i in active], lat.n)
    ts = [bk.cast(bk.relayout(lat, ins[i], shape, dst), dtype) for i in active]
    return ts, dst


def _partials(eqn, ins, active, second: bool):
    """``(d, dd)``: ``d[i] = df/du_i`` and ``dd[(i, k)] = d^2 f / du_i du_k`` (``i <= k``), of the output's shape."""
    f, vary = _sweeps.as_function(eqn, ins, active, [0])
    ones = [jnp.ones_like(v) for v in vary]
    zero = [jnp.zeros_like(v) for v in vary]

    def unit(i):
        return [ones[j] if j == i else zero[j] for j in range(len(vary))]

    def along(i):  # u -> df/du_i at u
        return lambda *u: jax.jvp(f, list(u), unit(i))[1][0]

    d, dd = {}, {}
    r = len(vary)
    if not second:
        for i in range(r):
            d[i] = along(i)(*vary)
        return d, dd
    for i in range(r):
        for k in range(i, r):
            di, dik = jax.jvp(along(i), vary, unit(k))
            d.setdefault(i, di)
            dd[(i, k)] = dik
    return d, dd


def elementwise(lat, eqn, ins, second: bool = True):
    """``y = f(u_1, ..., u_r)`` element-wise: the module docstring's recurrence.

    Example (``"trace"``, dense, two inputs): ``y = sin(u)`` with ``u = x0 + 2 x1``
    (``J_u = [1, 2]``, ``L_u = 0``) -> ``J_y = cos(u) [1, 2]``, ``L_y = -sin(u) (1 + 4)``.
    """
    active = [i for i, v in enumerate(ins) if v.active]
    out = eqn.outvars[0].aval
    ts, dst = _operands(lat, eqn, ins, active)
    name = eqn.primitive.name
    if name in SIGNS:
        total = None
        for i, t in zip(active, ts, strict=True):
            total = bk.add(total, t if SIGNS[name][i] == 1 else (-t[0], -t[1]))
        return [(total, dst)]
    d, dd = _partials(eqn, ins, active, second)
    total = None
    for j, t in enumerate(ts):
        total = bk.add(total, bk.scale(d[j].astype(out.dtype), t))
    if second:
        s = None
        for (i, j), c in dd.items():
            p = bk.times(c.astype(out.dtype)[None], bk.products(lat, ts[i][0], ts[j][0]) * (1 if i == j else 2))
            s = p if s is None else s + p
        total = bk.add_second(total, s)
    return [(total, dst)]


def mul(lat, eqn, ins):
    """``y = a * b``: ``J_y = b J_a + a J_b``, ``L_y = b L_a + a L_b + 2 <J_a, J_b>``.

    Example: ``y = x0 * x1`` (``J_a = [1, 0]``, ``J_b = [0, 1]``) -> ``L_y = 0``
    (the trace of ``[[0, 1], [1, 0]]``); ``"diag"``: ``[0, 0]``.
    """
    active = [i for i, v in enumerate(ins) if v.active]
    out = eqn.outvars[0].aval
    ts, dst = _operands(lat, eqn, ins, active)
    shape = tuple(out.shape)

    def other(i):
        p = jnp.asarray(ins[1 - i].primal)
        return jnp.broadcast_to(p, shape).astype(out.dtype)

    total = None
    for i, t in zip(active, ts, strict=True):
        total = bk.add(total, bk.scale(other(i), t))
    if len(active) == 2:
        total = bk.add_second(total, 2 * bk.products(lat, ts[0][0], ts[1][0]))
    return [(total, dst)]


def linear(lat, eqn, ins):
    """Element-wise and linear in the active operands (``add``, ``max``, ``select_n``, ``a / c``): first order only."""
    return elementwise(lat, eqn, ins, second=False)
