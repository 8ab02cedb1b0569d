"""Every other primitive: the JVP of the JVP, and custom VJP rules through their backward pass.

A primitive ``g`` without a forward-Laplacian rule (control flow, ``cumprod``,
factorisations, a ``custom_jvp`` whose rule is not element-wise, ...) still
has second directional derivatives: for each first-derivative column ``J_j``,
``jvp(u -> jvp(g, u, J_j), u, J_j)`` gives ``Dg J_j`` and ``D^2 g [J_j, J_j]``
together; the second-order part goes through ``Dg`` alone. Correct for every
primitive JAX can push JVPs through (the custom rule is what gets
differentiated, as in ``jax.hessian``), at the price of a nested JVP per column.

JAX pushes no JVP through a ``custom_vjp``: there the local Jacobian comes
from one VJP per output element (the rule's backward pass), and
``J_j^T H_r J_j`` from a JVP of those VJPs (forward over reverse, as
``jax.hessian``; reverse over reverse where the rule's forward pass itself
calls a ``custom_vjp``). Operands are dense in both; with sparse layouts the results
are compressed to the dependency lattice's sets.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

from .. import _sweeps
from . import _block as bk


def _diff_outputs(eqn) -> list[int]:
    return [k for k, v in enumerate(eqn.outvars) if jnp.issubdtype(v.aval.dtype, jnp.inexact)]


def _finish(lat, eqn, ins, firsts: dict, seconds: dict) -> list:
    """Blocks from per-output first-order blocks and second-order terms; compressed if sparse."""
    layouts = lat.deps_layout(eqn, ins) if lat.sparse else [None] * len(eqn.outvars)
    res = []
    for k, v in enumerate(eqn.outvars):
        if k not in firsts:
            res.append((None, None))
            continue
        t = bk.add_second(firsts[k], seconds[k])
        res.append((bk.compress(lat, t, v.aval.shape, layouts[k]), layouts[k]))
    return res


def _second_sum(lat, s):
    return jnp.sum(s, axis=0, keepdims=True) if lat.kind == "trace" else s


def _dense_operands(lat, ins, active, vary):
    return [bk.cast(bk.relayout(lat, ins[i], np.shape(ins[i].primal), None), v.dtype)
            for i, v in zip(active, vary, strict=True)]


def generic(lat, eqn, ins):
    """Any primitive JAX can push JVPs through: nested JVPs per column (module docstring).

    Example: ``y = cumprod(u)`` with ``u = x`` (identity columns) -> ``L_y[i] = sum_j d^2 y_i / dx_j^2 = 0``
    (each ``y_i`` is multilinear), computed column by column.
    """
    active = [i for i, v in enumerate(ins) if v.active]
    diff = _diff_outputs(eqn)
    f, vary = _sweeps.as_function(eqn, ins, active, diff)
    ts = _dense_operands(lat, ins, active, vary)

    def nested(*cols):
        return jax.jvp(lambda *u: jax.jvp(f, list(u), list(cols))[1], vary, list(cols))

    first, second = jax.vmap(nested)(*[t[0] for t in ts])
    rest = jax.vmap(lambda *cs: jax.jvp(f, vary, list(cs))[1])(*[t[1] for t in ts])
    firsts = {d: (a, b) for d, a, b in zip(diff, first, rest, strict=True)}
    seconds = {d: _second_sum(lat, s) for d, s in zip(diff, second, strict=True)}
    return _finish(lat, eqn, ins, firsts, seconds)


def custom_vjp(lat, eqn, ins):
    """A ``custom_vjp`` call: its backward rule gives the local Jacobian and, differentiated, the curvature.

    Example: a ``custom_vjp`` ``sin`` whose backward pass returns ``cos(u) ct`` ->
    ``J_y = cos(u) J_u``, ``L_y = cos(u) L_u - sin(u) |J_u|^2`` (the rule's derivative).
    """
    active = [i for i, v in enumerate(ins) if v.active]
    diff = _diff_outputs(eqn)
    f, vary = _sweeps.as_function(eqn, ins, active, diff)
    ts = _dense_operands(lat, ins, active, vary)
    out_avals = [eqn.outvars[d].aval for d in diff]
    sizes = [math.prod(a.shape) for a in out_avals]
    q = sum(sizes)
    starts = np.concatenate([[0], np.cumsum(sizes)]).astype(int)

    def cotangent(r):  # the r-th output element (over all differentiable outputs) as cotangents
        return [(jnp.arange(s) == r - int(a)).astype(av.dtype).reshape(av.shape)
                for a, s, av in zip(starts[:-1], sizes, out_avals, strict=True)]

    def row(r, u):  # d out_r / d u, one array per active operand
        _, pull = jax.vjp(lambda *w: f(*w), *u)
        return pull(cotangent(r))

    rows = jax.vmap(lambda r: row(r, vary))(jnp.arange(q))  # per operand: (q,) + shape

    def local(part):  # the local Jacobian applied to one part's columns: (c, q)
        return sum(jnp.einsum("qs,cs->cq", g.reshape(q, -1), t[part].reshape(t[part].shape[0], -1))
                   for g, t in zip(rows, ts, strict=True))

    first = (local(0), local(1))

    def curvature(r, cols, mode):  # J_j^T H_r J_j for one output element r and one column j
        if mode == "fwd":  # forward over reverse
            _, hj = jax.jvp(lambda *u: row(r, u), vary, list(cols))
        else:  # reverse over reverse (H_r is symmetric), where the rule's fwd pass forbids JVPs
            hj = jax.vjp(lambda *u: row(r, u), *vary)[1](tuple(cols))
        return sum(jnp.vdot(h, c) for h, c in zip(hj, cols, strict=True))

    def all_columns(mode):
        per_column = lambda *cols: jax.vmap(lambda r: curvature(r, cols, mode))(jnp.arange(q))  # noqa: E731
        return jax.vmap(per_column)(*[t[0] for t in ts])

    try:
        per = all_columns("fwd")
    except TypeError as e:
        if "custom_vjp" not in str(e):
            raise
        per = all_columns("rev")
    second = _second_sum(lat, per.astype(first[0].dtype))  # (1 or k, q)
    firsts, seconds = {}, {}
    for d, a, s, av in zip(diff, starts[:-1], sizes, out_avals, strict=True):
        def cut(m, a=a, s=s, av=av):
            return m[:, a : a + s].reshape((-1,) + tuple(av.shape)).astype(av.dtype)

        firsts[d] = (cut(first[0]), cut(first[1]))
        seconds[d] = cut(second)
    return _finish(lat, eqn, ins, firsts, seconds)
