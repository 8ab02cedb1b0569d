"""Rules for ``custom_jvp_call`` and ``custom_vjp_call``: the pattern of the rule JAX differentiates.

JAX never differentiates the primal of a custom rule, so neither do we: the
rule's own JVP (or VJP) is traced with abstract primals, and its local pattern
(which output tangents read which input tangents) is found by walking that
jaxpr with a fresh dependency lattice. The local pattern is then composed
with the operands' sets. A rule denser than its primal (say, an identity
tangent for a primal that reads only ``x[0]``) is therefore covered. If the
rule cannot be traced, everything reaches everything (with the usual warning).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

from .._walker import Walker, bind
from ._sets import compose, concat, empty, everything, identity

_CACHE_MAX = 512


def _diff(aval) -> bool:
    return jnp.issubdtype(aval.dtype, jnp.inexact)


def _local(lat, eqn):
    """``(rows, cols)`` per output: output ``k``'s element ``rows`` reads input element ``cols``.

    Input elements are numbered across the differentiable operands in order.
    Cached per equation (a loop body is walked many times).
    """
    key = id(eqn)
    hit = lat.cache.get(key)
    if hit is not None and hit[0] is eqn:
        return hit[1]
    in_avals = [v.aval for v in eqn.invars]
    out_avals = [v.aval for v in eqn.outvars]
    diff = [i for i, a in enumerate(in_avals) if _diff(a)]
    def f(args, dargs):
        a = list(args)
        for i, d in zip(diff, dargs, strict=True):
            a[i] = d
        return bind(eqn, a)

    args = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in in_avals]
    dargs = [args[i] for i in diff]
    sizes = [math.prod(in_avals[i].shape) for i in diff]
    n_local = sum(sizes)
    sub = lat.fresh(n_local)
    if eqn.primitive.name == "custom_jvp_call":
        closed = jax.make_jaxpr(lambda a, d, t: jax.jvp(lambda *x: f(a, x), tuple(d), tuple(t))[1])(
            args, dargs, dargs
        )
        seeds, off = [], 0
        for s, i in zip(sizes, diff, strict=True):
            seeds.append(identity(in_avals[i].shape, off))
            off += s
        blank = [empty(a.shape) for a in args] + [empty(a.shape) for a in dargs]
        outs = Walker(sub).run(closed, blank + seeds)
        result = [(o.rows(), o.indices) for o in outs]
    else:  # custom_vjp_call: walk the pullback; cotangents are numbered by output element
        douts = [i for i, a in enumerate(out_avals) if _diff(a)]

        def pull(a, d, ct):
            out, vjp = jax.vjp(lambda *x: f(a, x), *d)
            cts = list(jax.tree_util.tree_map(jnp.zeros_like, out))
            for i, c in zip(douts, ct, strict=True):
                cts[i] = c
            return vjp(cts)

        cts = [jax.ShapeDtypeStruct(out_avals[i].shape, out_avals[i].dtype) for i in douts]
        closed = jax.make_jaxpr(pull)(args, dargs, cts)
        out_sizes = [math.prod(a.shape) for a in out_avals]
        starts = np.concatenate([[0], np.cumsum(out_sizes)])
        sub = lat.fresh(int(starts[-1]))
        seeds = [identity(out_avals[i].shape, int(starts[i])) for i in douts]
        blank = [empty(a.shape) for a in args] + [empty(a.shape) for a in dargs]
        ins_ct = Walker(sub).run(closed, blank + seeds)
        # Transpose: input element j (local) reaches output element r (global over outputs).
        flat = concat(ins_ct) if ins_ct else empty((0,))
        j = flat.rows()
        r = flat.indices
        result = []
        for k in range(len(out_avals)):
            sel = (r >= starts[k]) & (r < starts[k + 1])
            result.append((r[sel] - starts[k], j[sel]))
    if len(lat.cache) > _CACHE_MAX:
        lat.cache.clear()
    lat.cache[key] = (eqn, result)
    return result


def custom(lat, eqn, ins):
    """The derivative JAX takes is the custom rule's: compose its local pattern with the operands' sets.

    Example: a ``custom_jvp`` primal ``x -> x[0] * ones(2)`` whose rule
    returns the tangent unchanged, on sets [{0}, {1}] -> [{0}, {1}] (the
    primal alone would say [{0}, {0}]). Reads ``call_jaxpr`` and the rule
    functions (``jvp_jaxpr_fun``, or ``fwd_jaxpr_thunk`` and ``bwd``) by binding.
    """
    try:
        local = _local(lat, eqn)
    except Exception:  # noqa: BLE001 - an untraceable rule: be conservative, and say so
        lat.untraced.add(eqn.primitive.name)
        return [everything(ins, v.aval.shape) for v in eqn.outvars]
    diff = [d for d, v in zip(ins, eqn.invars, strict=True) if _diff(v.aval)]
    source = concat(diff) if diff else empty((0,))
    return [compose(v.aval.shape, r, c, source, lat.n) for (r, c), v in zip(local, eqn.outvars, strict=True)]


RULES = {"custom_jvp_call": custom, "custom_vjp_call": custom, "custom_vjp_call_jaxpr": custom}
