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

from .. import _compat
from .._walker import Walker, bind
from ._sets import (
    LIMIT_FACTOR,
    TooDense,
    compose,
    concat,
    cross,
    current_limit,
    empty,
    everything,
    from_coo,
    identity,
    limited,
)

_CACHE_MAX = 512
# Entries one operation of a rule's local walk may build (times _sets.LIMIT_FACTOR): its inputs are the
# rule's own elements, so a dense rule over a k x k matrix (slogdet's: a solve) holds k^4 (k = 64: 2.4 GB
# and 24 s). Past LOCAL_MAX, or LOCAL_PER entries per input and output element where that is more (an
# elementwise rule over a large array is linear in its size: never cut), the rule counts as dense: every
# output reads every input.
LOCAL_MAX = 1 << 20
LOCAL_PER = 16


class DenseRule(Exception):  # noqa: N818 - a verdict, not an error
    """A rule's local walk outgrew its cap (``LOCAL_MAX``): its pattern counts as dense."""


def _diff(aval) -> bool:
    return jnp.issubdtype(aval.dtype, jnp.inexact)


def diff_operands(eqn) -> list[int]:
    """The operands JAX differentiates: the inexact ones, but never a ``custom_vjp``'s leading constants.

    Those are what its rules close over (``odeint``'s tableau); JAX refuses to differentiate them
    (``CustomVJPException``), and tracing the pullback with them differentiated raised it here.
    """
    skip = 0 if eqn.primitive.name == "custom_jvp_call" else int(eqn.params.get("num_consts", 0))
    return [i for i, v in enumerate(eqn.invars) if i >= skip and _diff(v.aval)]


def _cached(lat, key, eqn, make):
    """``make()``, once per equation (a loop body is walked many times)."""
    hit = lat.cache.get(key)
    if hit is not None and hit[0] is eqn:
        return hit[1]
    result = make()
    if len(lat.cache) > _CACHE_MAX:
        lat.cache.clear()
    lat.cache[key] = (eqn, result)
    return result


def _rule_jaxpr(eqn):
    """The jaxpr of the derivative rule JAX uses for ``eqn``, with how to seed it.

    ``custom_jvp_call``: ``(args, primals, tangents) -> output tangents``;
    ``custom_vjp_call``: ``(args, primals, cotangents) -> input cotangents``
    (the pullback). ``args`` are all operands (the differentiable ones are
    replaced by ``primals``), so both rules see every value they may read.

    Returns:
      ``(closed, in_avals, out_avals, diff, douts)``: ``diff`` / ``douts`` the
      positions of the differentiable operands / outputs.
    """
    in_avals = [v.aval for v in eqn.invars]
    out_avals = [v.aval for v in eqn.outvars]
    diff = diff_operands(eqn)
    douts = [i for i, a in enumerate(out_avals) if _diff(a)]

    def f(args, dargs):
        a = list(args)
        for i, d in zip(diff, dargs, strict=True):
            a[i] = d
        return bind(eqn, a)

    args = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in in_avals]
    dargs = [args[i] for i in diff]
    if eqn.primitive.name == "custom_jvp_call":
        closed = jax.make_jaxpr(lambda a, d, t: jax.jvp(lambda *x: f(a, x), tuple(d), tuple(t))[1])(
            args, dargs, dargs
        )
    else:

        def pull(a, d, ct):
            out, vjp = jax.vjp(lambda *x: f(a, x), *d)
            cts = list(jax.tree_util.tree_map(jnp.zeros_like, out))
            for i, c in zip(douts, ct, strict=True):
                cts[i] = c
            return vjp(cts)

        cts = [jax.ShapeDtypeStruct(out_avals[i].shape, out_avals[i].dtype) for i in douts]
        closed = jax.make_jaxpr(pull)(args, dargs, cts)
    return closed, in_avals, out_avals, diff, douts


def _walk(lat, eqn, n_local, primals, third):
    """Walk the rule's jaxpr over ``n_local`` local inputs, seeding the primals and/or the third group."""
    closed, in_avals, out_avals, diff, douts = _cached(lat, ("jaxpr", id(eqn)), eqn, lambda: _rule_jaxpr(eqn))
    blank = [empty(a.shape) for a in in_avals]
    seeds, off = [], 0
    for i in diff:
        seeds.append(identity(in_avals[i].shape, off) if primals else empty(in_avals[i].shape))
        off += math.prod(in_avals[i].shape)
    local = lat.fresh(n_local)
    local.evaluated = True  # the rule's jaxpr is evaluated, not differentiated (see custom)
    cap = max(LOCAL_MAX, LOCAL_PER * (n_local + sum(math.prod(a.shape) for a in out_avals)))
    outer = current_limit()
    if outer is not None and outer <= LIMIT_FACTOR * cap:  # the analysis's own budget is the tighter: it holds
        return Walker(local).run(closed, blank + seeds + third)
    try:
        with limited(cap):
            return Walker(local).run(closed, blank + seeds + third)
    except TooDense as e:
        raise DenseRule(eqn.primitive.name) from e


def _third(eqn, seeded):
    """Seeds of the rule's third argument group: input tangents (jvp) or output cotangents (vjp)."""
    in_avals = [v.aval for v in eqn.invars]
    out_avals = [v.aval for v in eqn.outvars]
    if eqn.primitive.name == "custom_jvp_call":
        seeds, off = [], 0
        for i in diff_operands(eqn):
            seeds.append(identity(in_avals[i].shape, off) if seeded else empty(in_avals[i].shape))
            off += math.prod(in_avals[i].shape)
        return seeds, off
    douts = [i for i, a in enumerate(out_avals) if _diff(a)]
    starts = np.concatenate([[0], np.cumsum([math.prod(a.shape) for a in out_avals])]).astype(np.int64)
    seeds = [identity(out_avals[i].shape, int(starts[i])) if seeded else empty(out_avals[i].shape) for i in douts]
    return seeds, int(starts[-1])


def _n_diff(eqn) -> int:
    return sum(math.prod(eqn.invars[i].aval.shape) for i in diff_operands(eqn))


def local_pattern(lat, eqn):
    """``(rows, cols)`` per output: output ``k``'s element ``rows`` reads input element ``cols``.

    Input elements are numbered across the differentiable operands in order.
    Cached per equation (a loop body is walked many times).
    """

    def make():
        seeds, n_third = _third(eqn, True)
        if eqn.primitive.name == "custom_jvp_call":
            outs = _walk(lat, eqn, n_third, False, seeds)
            return [(o.rows(), o.indices) for o in outs]
        # custom_vjp_call: the pullback; cotangents are numbered by output element (global over outputs).
        ins_ct = _walk(lat, eqn, n_third, False, seeds)
        flat = concat(ins_ct) if ins_ct else empty((0,))
        j, r = flat.rows(), flat.indices  # input element j (local) reaches output element r
        sizes = [math.prod(v.aval.shape) for v in eqn.outvars]
        starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        result = []
        for k in range(len(eqn.outvars)):
            sel = (r >= starts[k]) & (r < starts[k + 1])
            result.append((r[sel] - starts[k], j[sel]))
        return result

    return _cached(lat, id(eqn), eqn, make)


def local_pairs(lat, eqn) -> tuple[np.ndarray, np.ndarray]:
    """Local input pairs ``(i, j)`` whose second derivative JAX may find nonzero: the rule's coefficients.

    JAX differentiates a custom rule twice by differentiating the rule itself:
    the coefficient of input tangent ``i`` in a ``custom_jvp`` (of output
    cotangent in the ``custom_vjp`` pullback's input cotangent ``i``) is a
    function of the primals, and ``(i, j)`` is a pair when it may read primal
    ``j``. Example: a rule ``t -> t * cos(x)`` gives the pairs ``(e, e)``; the
    rule of ``relu`` (a select on ``x > 0``) none. Numbered as :func:`local_pattern`'s inputs.
    """

    def make():
        n = _n_diff(eqn)
        if eqn.primitive.name == "custom_jvp_call":
            tangent = local_pattern(lat, eqn)  # which input tangents each output tangent reads
            blank, _ = _third(eqn, False)
            coef = _walk(lat, eqn, n, True, blank)  # which primals each output tangent reads
            parts = [cross(from_coo(c.shape, r, t, n), c) for (r, t), c in zip(tangent, coef, strict=True)]
        else:
            blank, _ = _third(eqn, False)
            coef = _walk(lat, eqn, n, True, blank)  # which primals each input cotangent reads
            parts = [cross(identity((n,)), concat(coef))] if coef else []
        if not parts:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    return _cached(lat, ("pairs", id(eqn)), eqn, make)


def custom(lat, eqn, ins):
    """The derivative JAX takes is the custom rule's: compose its local pattern with the operands' sets.

    Example: a ``custom_jvp`` primal ``x -> x[0] * ones(2)`` whose rule
    returns the tangent unchanged, on sets [{0}, {1}] -> [{0}, {1}] (the
    primal alone would say [{0}, {0}]). Reads ``call_jaxpr`` and the rule
    functions (``jvp_jaxpr_fun``, or ``fwd_jaxpr_thunk`` and ``bwd``) by binding.
    """
    if getattr(lat, "evaluated", False):
        # Inside a rule's own jaxpr a custom call is evaluated, so its data flow is its primal's. (Its rule's
        # pattern would recurse without end: odeint's pullback runs an odeint, whose pullback runs one...)
        inner = _compat.called_jaxpr(eqn)
        n_in = len(_compat.unclose(inner)[0].invars)
        return Walker(lat).run(inner, ins[len(ins) - n_in :])
    try:
        local = local_pattern(lat, eqn)
    except DenseRule:  # every output reads every input: the pattern of a dense rule, sound for any
        return [everything(ins, v.aval.shape) for v in eqn.outvars]
    except Exception:  # noqa: BLE001 - an untraceable rule: be conservative, and say so
        lat.untraced.add(eqn.primitive.name)
        return [everything(ins, v.aval.shape) for v in eqn.outvars]
    diff = [ins[i] for i in diff_operands(eqn)]
    source = concat(diff) if diff else empty((0,))
    return [compose(v.aval.shape, r, c, source, lat.n) for (r, c), v in zip(local, eqn.outvars, strict=True)]


RULES = {"custom_jvp_call": custom, "custom_vjp_call": custom, "custom_vjp_call_jaxpr": custom}
