"""The log-diagonal sweep: ``log |dy_i / dx_sigma(i)|`` in one pass, for triangular stages (see :mod:`._blocktri`).

On the host, each element of each array on the path gets a *tag*: the input
index whose derivative it carries (``-1``: none). Inputs are tagged with their
own index; elementwise operations give an element the tag of its operands, data
movement (slices, concatenation, reshapes, gathers with known indices) moves
tags with the data, and every other operation (products, convolutions,
reductions) gives untagged results. An element may read an operand element of
another tag only when the dependency lattice proves that operand element
independent of its own tag (its derivative there is zero): a coupling layer's
``x2 * exp(s(x1)) + t(x1)``, a masked autoregressive layer's
``x_i * exp(s_i(x_<i))``. When the stage's output carries a permutation of the
inputs as tags, the traced pass computes, by the chain rule restricted to the
tagged paths, ``log |dy_i/dx_tag(i)|`` and its sign, with log-derivative rules
(``log tanh'(a) = 2 (log 2 - |a| - softplus(-2|a|))`` and the like) so that
derivatives that underflow in floating point keep finite logarithms.
Anything else fails the sweep (:class:`NoSweep`), and the stage is coloured.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

from . import _compat, _primitives
from ._walker import is_opaque, live_equations

ELEMENTWISE = (frozenset(_primitives.ELEMENTWISE) | frozenset(_primitives.ZERO) | frozenset(_primitives.PRODUCTS)
               | {"select_n"})
# Data movement (the catalogue's): the operands that carry data (None: all); the others must be known. Tags
# move through pad's padding value too (as "no tag").
MOVES = dict(_primitives.MOVES, pad=None)
CALLS = {"jit", "pjit", "closed_call", "core_call", "remat", "checkpoint"}
LOG2 = math.log(2.0)


class NoSweep(Exception):
    """The stage is not a sweep's (its reason in the message)."""


def _bind(eqn, args):
    out = _compat.bind(eqn, args)
    return out if eqn.primitive.multiple_results else [out]


def _elementwise_call(jaxpr) -> bool:
    """Whether every equation of ``jaxpr`` (through nested calls) is elementwise."""
    for eqn in _compat.unclose(jaxpr)[0].eqns:
        name = eqn.primitive.name
        if name in ELEMENTWISE:
            continue
        inner = _compat.called_jaxpr(eqn)
        if inner is None or not _elementwise_call(inner):
            return False
    return True


def _move_host(eqn, args) -> np.ndarray | None:
    """The common data movements in NumPy (no compilation), or ``None``."""
    name, p, shape = eqn.primitive.name, eqn.params, tuple(eqn.outvars[0].aval.shape)
    t = args[0]
    if name in ("reshape", "squeeze") and p.get("dimensions") is None:
        return np.reshape(t, shape)
    if name == "transpose":
        return np.transpose(t, p["permutation"])
    if name == "rev":
        return np.flip(t, axis=tuple(p["dimensions"]))
    if name == "slice":
        strides = p["strides"] or (1,) * t.ndim
        return t[tuple(slice(a, b, c) for a, b, c in zip(p["start_indices"], p["limit_indices"], strides, strict=True))]
    if name == "concatenate":
        return np.concatenate(args, axis=p["dimension"])
    if name == "broadcast_in_dim":
        expanded = [1] * len(shape)
        for d, size in zip(p["broadcast_dimensions"], t.shape, strict=True):
            expanded[d] = size
        return np.broadcast_to(np.reshape(t, expanded), shape)
    return None


class Sweep:
    """The host side: dependency sets through the walker, tags and the actions :func:`run` replays."""

    def __init__(self, n: int, walker):
        self.n, self.walker = n, walker
        self.start([])

    def start(self, inputs) -> None:
        """A new stage whose inputs ``(var, offset)`` carry their own flat indices as tags."""
        self.tags = {v: (off + np.arange(math.prod(v.aval.shape))).reshape(v.aval.shape) for v, off in inputs}
        self.actions: list = []
        self.ok = True
        self.reason = ""

    def finish(self, output) -> np.ndarray | None:
        """The output's tags when the sweep held and they are a permutation of ``0..n-1``, else ``None``."""
        if not self.ok:
            return None
        tags = self.tags.get(output)
        if tags is None:
            self.reason = "the output is not tagged"
            return None
        tags = np.ravel(tags)
        if tags.size != self.n or not np.array_equal(np.sort(tags), np.arange(self.n)):
            self.reason = "the output's tags are not a permutation"
            return None
        return tags.astype(np.int64)

    def eqn(self, eqn, ins) -> list:
        """The dependency sets of ``eqn``'s outputs (recording the sweep's action while it holds)."""
        if self.ok:
            mark = len(self.actions)
            try:
                return self._eqn(eqn, ins, self.tags, self.actions)
            except NoSweep as e:
                del self.actions[mark:]
                self.ok, self.reason = False, str(e)
        return self.walker.eqn(eqn, ins)

    # --- one equation --------------------------------------------------------------------------
    def _eqn(self, eqn, ins, tags, actions) -> list:
        tagged = [None if isinstance(v, _compat.Literal) else tags.get(v) for v in eqn.invars]
        name = eqn.primitive.name
        if all(t is None for t in tagged):
            actions.append(("bind",))
            return self.walker.eqn(eqn, ins)
        inner = _compat.called_jaxpr(eqn) if name in CALLS else None
        if inner is not None:
            return self._call(eqn, inner, ins, tagged, tags, actions)
        outs = self.walker.eqn(eqn, ins)
        (out, *rest) = eqn.outvars
        if rest or not jnp.issubdtype(out.aval.dtype, jnp.inexact):
            actions.append(("bind",))
            return outs
        if jnp.issubdtype(out.aval.dtype, jnp.complexfloating) or any(
            t is not None and jnp.issubdtype(v.aval.dtype, jnp.complexfloating)
            for v, t in zip(eqn.invars, tagged, strict=True)
        ):  # the log-derivative rules are real ones: abs(z), real(z * z) carry no real "sign" to chain
            raise NoSweep(f"'{name}' on complex values")
        if name in ELEMENTWISE or (name == "custom_jvp_call" and _elementwise_call(_compat.called_jaxpr(eqn))):
            if any(np.broadcast_shapes(v.aval.shape, out.aval.shape) != out.aval.shape
                   for v in eqn.invars if not is_opaque(v.aval)):  # (a PRNG key carries no data: random_gamma)
                raise NoSweep(f"'{name}' broadcasts its output")
            out_tag, masks = self._combine(ins, tagged, out.aval.shape, skip=1 if name == "select_n" else 0)
            tags[out] = out_tag
            actions.append(("select" if name == "select_n" else "elementwise", masks))
            return outs
        if name in MOVES:
            data = MOVES[name] if MOVES[name] is not None else tuple(range(len(eqn.invars)))
            args = []
            for k, (v, d) in enumerate(zip(eqn.invars, ins, strict=True)):
                if k in data:
                    t = tagged[k]
                    args.append(np.zeros(v.aval.shape, np.int32) if t is None else (t + 1).astype(np.int32))
                elif d.const is not None:
                    args.append(d.const)
                else:
                    raise NoSweep(f"'{name}' with indices known only at run time")
            try:
                moved = _move_host(eqn, args)
                if moved is None:  # no NumPy form here: the primitive itself, on the host (compiles once per shape)
                    moved = np.asarray(_bind(eqn, args)[0])
                moved = moved.astype(np.int64) - 1
            except Exception as e:  # noqa: BLE001 - a movement the tags cannot follow: colour the stage
                raise NoSweep(f"'{name}' cannot move tags ({type(e).__name__})") from e
            if moved.shape != tuple(out.aval.shape):
                raise NoSweep(f"'{name}' moved tags to shape {moved.shape}")
            tags[out] = moved
            actions.append(("move", data))
            return outs
        actions.append(("bind",))  # a mixing operation: untagged (its consumers check their independence)
        return outs

    def _call(self, eqn, inner, ins, tagged, tags, actions) -> list:
        jaxpr, consts = _compat.unclose(inner)
        lat = self.walker.lat
        n_in = len(jaxpr.invars)
        ins, tagged = ins[len(ins) - n_in:], tagged[len(tagged) - n_in:]
        env: dict = {}
        for v, c in zip(jaxpr.constvars, consts, strict=True):
            env[v] = lat.const(_compat.host_constant(c), v.aval)
        inner_tags = {}
        for v, d, t in zip(jaxpr.invars, ins, tagged, strict=True):
            env[v] = d
            if t is not None:
                inner_tags[v] = t
        sub: list = []
        for e, alive in zip(jaxpr.eqns, live_equations(jaxpr), strict=True):
            if not alive:
                continue
            e_ins = [lat.constant(None if is_opaque(v.aval) else np.asarray(v.val), v.aval)
                     if isinstance(v, _compat.Literal) else env[v] for v in e.invars]
            outs = self._eqn(e, e_ins, inner_tags, sub)
            for v, o in zip(e.outvars, outs, strict=True):
                if not isinstance(v, _compat.DropVar):
                    env[v] = o
        res = []
        for v_out, v_in in zip(eqn.outvars, jaxpr.outvars, strict=True):
            if isinstance(v_in, _compat.Literal):
                res.append(lat.constant(np.asarray(v_in.val), v_in.aval))
                continue
            res.append(env[v_in])
            if v_in in inner_tags:
                tags[v_out] = inner_tags[v_in]
        res = self.walker.lat.post(eqn, res)
        actions.append(("call", sub))
        return res

    def _combine(self, ins, tagged, shape, skip: int):
        """The output's tags and, per operand, where it carries them; checks the other operands' independence."""
        cands = [np.broadcast_to(t, shape) for t in tagged[skip:] if t is not None]
        out_tag = np.max(np.stack(cands), axis=0) if cands else np.full(shape, -1, np.int64)
        masks = []
        size = math.prod(shape)
        flat_out = out_tag.reshape(-1)
        for k, (d, t) in enumerate(zip(ins, tagged, strict=True)):
            if k < skip:
                masks.append(None)
                continue
            own = np.broadcast_to(t, shape).reshape(-1) if t is not None else np.full(size, -1, np.int64)
            mask = (own == flat_out) & (flat_out >= 0)
            check = np.flatnonzero(~mask & (flat_out >= 0))
            if check.size and d.nnz:
                # The operand element read by each output element (broadcasting), and its dependency set.
                elem = np.broadcast_to(np.arange(d.size).reshape(d.shape), shape).reshape(-1)[check]
                keys = d.rows() * self.n + d.indices
                q = elem * self.n + flat_out[check]
                pos = np.minimum(np.searchsorted(keys, q), max(keys.size - 1, 0))
                if keys.size and np.any(keys[pos] == q):
                    raise NoSweep("an operand depends on the tagged input along an untagged path")
            masks.append(mask.reshape(shape) if mask.any() else None)
        return out_tag, masks


# ---------------------------------------------------------------- the traced pass


def run(eqns, env: dict, inputs, output, actions) -> tuple[jax.Array, jax.Array]:
    """Replay the sweep: values into ``env``; the output's diagonal as ``(sign, log|d|)``, each flat ``(n,)``."""
    state = {}
    for v, _ in inputs:
        x = env[v]
        state[v] = (jnp.zeros(x.shape, x.dtype), jnp.ones(x.shape, x.dtype))
    _replay(eqns, env, state, actions)
    L, S = state[output]
    # A derivative that is exactly 0 (tanh at inf, exp at -inf) has sign 0, as slogdet's convention has it.
    S = jnp.where(L == -jnp.inf, jnp.zeros((), S.dtype), S)
    return jnp.ravel(S), jnp.ravel(L)


def _read(env, v):
    return v.val if isinstance(v, _compat.Literal) else env[v]


def _replay(eqns, env, state, actions) -> None:
    for eqn, act in zip(eqns, actions, strict=True):
        vals = [_read(env, v) for v in eqn.invars]
        kind = act[0]
        if kind == "call":
            inner = _compat.called_jaxpr(eqn)
            jaxpr, consts = _compat.unclose(inner)
            n_in = len(jaxpr.invars)
            sub_env = dict(zip(jaxpr.constvars, consts, strict=True))
            sub_state = {}
            for v_in, v in zip(jaxpr.invars, eqn.invars[len(eqn.invars) - n_in:], strict=True):
                sub_env[v_in] = _read(env, v)
                if not isinstance(v, _compat.Literal) and v in state:
                    sub_state[v_in] = state[v]
            live = [e for e, alive in zip(jaxpr.eqns, live_equations(jaxpr), strict=True) if alive]
            _replay(live, sub_env, sub_state, act[1])
            for v_out, v_in in zip(eqn.outvars, jaxpr.outvars, strict=True):
                env[v_out] = _read(sub_env, v_in)
                if not isinstance(v_in, _compat.Literal) and v_in in sub_state:
                    state[v_out] = sub_state[v_in]
            continue
        outs = _bind(eqn, vals)
        for v, o in zip(eqn.outvars, outs, strict=True):
            if not isinstance(v, _compat.DropVar):
                env[v] = o
        if eqn.primitive.name == "exp" and not jnp.iscomplexobj(vals[0]):
            # log|exp(u)| = u, kept for a product's partial: exp(s) itself underflows to 0 in a flow's scale.
            env[("log", eqn.outvars[0])] = vals[0]
        if kind == "bind":
            continue
        out = outs[0]
        ninf = jnp.full(out.shape, -jnp.inf, out.dtype)
        if kind == "move":
            data = act[1]
            Ls, Ss = [], []
            for k, (v, x) in enumerate(zip(eqn.invars, vals, strict=True)):
                if k in data:
                    have = not isinstance(v, _compat.Literal) and v in state
                    L, S = state[v] if have else (jnp.full(np.shape(x), -jnp.inf, out.dtype),
                                                   jnp.zeros(np.shape(x), out.dtype))
                    Ls.append(L.astype(out.dtype))
                    Ss.append(S.astype(out.dtype))
                else:
                    Ls.append(x)
                    Ss.append(x)
            state[eqn.outvars[0]] = (_bind(eqn, Ls)[0], _bind(eqn, Ss)[0])
            continue
        masks = act[1]
        if kind == "select":
            Ls, Ss = [vals[0]], [vals[0]]
            for k in range(1, len(vals)):
                L, S = _masked(state, eqn.invars[k], masks[k], out)
                Ls.append(L)
                Ss.append(S)
            state[eqn.outvars[0]] = (_bind(eqn, Ls)[0], _bind(eqn, Ss)[0])
            continue
        terms = []
        for k, mask in enumerate(masks):
            if mask is None:
                continue
            L, S = state[eqn.invars[k]]
            others = [env.get(("log", v)) if not isinstance(v, _compat.Literal) else None for v in eqn.invars]
            pl, ps = _log_partial(eqn, k, vals, out, others)
            terms.append((jnp.where(mask, pl + L.astype(out.dtype), ninf),
                          jnp.where(mask, ps * S.astype(out.dtype), jnp.zeros((), out.dtype))))
        if not terms:
            state[eqn.outvars[0]] = (ninf, jnp.zeros(out.shape, out.dtype))
        elif len(terms) == 1:
            state[eqn.outvars[0]] = terms[0]
        else:
            state[eqn.outvars[0]] = _log_sum(terms)


def _masked(state, v, mask, out):
    if mask is None or isinstance(v, _compat.Literal) or v not in state:
        return jnp.full(out.shape, -jnp.inf, out.dtype), jnp.zeros(out.shape, out.dtype)
    L, S = state[v]
    return (jnp.where(mask, jnp.broadcast_to(L, out.shape), -jnp.inf).astype(out.dtype),
            jnp.where(mask, jnp.broadcast_to(S, out.shape), 0).astype(out.dtype))


def _log_sum(terms):
    """``log |sum_k s_k exp(l_k)|`` and its sign, without overflow (a signed log-sum-exp)."""
    m = terms[0][0]
    for L, _ in terms[1:]:
        m = jnp.maximum(m, L)
    safe = jnp.where(jnp.isfinite(m), m, jnp.zeros((), m.dtype))
    total = sum(S * jnp.exp(L - safe) for L, S in terms)
    return safe + _log_abs(total), jnp.sign(total)


def _log_abs(v):
    """``log |v|``, ``-inf`` at 0 with a zero derivative there (not ``(1 / 0) * 0``, a NaN in every gradient).

    A factor that is exactly 0 at this point (``round(x)`` at 0.37: a singular block, or a product's
    zero term) has derivative 0 there too (JAX's own); its logarithm's NaN gradient had spread to all.
    """
    a = jnp.abs(v)
    zero = a == 0
    return jnp.where(zero, -jnp.inf, jnp.log(jnp.where(zero, jnp.ones((), a.dtype), a)))


def _sign(v):
    """``sign(v)`` with signed zeros kept (``-1`` at ``-0.``): the sign of ``1 / v``, whose log is ``-log|v|``.

    ``log``'s derivative at ``+0.`` is ``+inf`` and at ``-0.`` is ``-inf`` (JAX's ``1 / x``); ``sign(0) = 0``
    there would give ``det = 0 * inf``, a NaN.
    """
    return jnp.where(v == 0, jnp.copysign(jnp.ones((), v.dtype), v), jnp.sign(v))


def _function_name(eqn) -> str | None:
    """The name of the Python function a ``custom_jvp_call`` wraps (``logaddexp`` for softplus), if recorded."""
    inner = _compat.unclose(eqn.params.get("call_jaxpr"))[0] if eqn.params.get("call_jaxpr") is not None else None
    src = getattr(getattr(inner, "debug_info", None), "func_src_info", None) or ""
    return src.split(" ")[0] or None


def _softplus(a):
    return jnp.logaddexp(a, jnp.zeros((), a.dtype))


def _log_partial(eqn, k, vals, out, logs=None):
    """``(log |d out / d operand_k|, sign)`` elementwise, by log-derivative rules where the primitive has one.

    ``logs``: per operand, ``log |value|`` where it is known exactly (an ``exp``'s argument), else ``None``.
    """
    name = eqn.primitive.name
    logs = logs or [None] * len(vals)
    a = jnp.asarray(vals[k])
    one = jnp.ones(out.shape, out.dtype)
    zero = jnp.zeros(out.shape, out.dtype)

    def log_abs(v):
        return _log_abs(jnp.asarray(v, out.dtype))

    if name in ("add", "add_any", "convert_element_type", "copy", "copy_p", "reduce_precision"):
        return zero, one
    if name == "sub":
        return zero, one if k == 0 else -one
    if name == "neg":
        return zero, -one
    if name == "mul":
        if logs[1 - k] is not None:  # a positive factor exp(u): log |partial| = u, finite where exp(u) underflows
            return zero + jnp.asarray(logs[1 - k], out.dtype), one
        b = jnp.asarray(vals[1 - k], out.dtype)
        return zero + log_abs(b), one * jnp.sign(b)
    if name == "div":
        num, den = (jnp.asarray(v, out.dtype) for v in vals)
        if k == 0 and logs[1] is not None:
            return zero - jnp.asarray(logs[1], out.dtype), one
        if k == 0:
            return zero - log_abs(den), one * _sign(den)
        return zero + log_abs(num) - 2 * log_abs(den), -one * jnp.sign(num)
    if name in ("exp", "expm1"):
        return zero + a, one
    if name == "log":
        return zero - log_abs(a), one * _sign(jnp.asarray(a, out.dtype))
    if name == "log1p":
        return zero - jnp.where(a > -1, jnp.log1p(a), log_abs(1 + a)), one * _sign(jnp.asarray(1 + a, out.dtype))
    if name == "tanh":
        b = jnp.abs(a)
        return zero + 2 * (LOG2 - b - _softplus(-2 * b)), one
    if name == "logistic":
        return zero - _softplus(-a) - _softplus(a), one
    if name == "sqrt":  # 1 / (2 sqrt(a)): -inf at -0. (sqrt(-0.) = -0.)
        return zero - LOG2 - 0.5 * jnp.log(a), one * _sign(jnp.asarray(a, out.dtype))
    if name == "integer_pow" and eqn.params["y"] not in (0, 1):
        y = eqn.params["y"]  # y a^(y - 1): the sign of a^(y - 1) is its parity's, 0 at a = 0 when y > 1
        base = _sign(jnp.asarray(a, out.dtype)) if (y - 1) % 2 else jnp.ones((), out.dtype)
        s = base * (1 if y > 0 else -1)
        if y > 1:
            s = jnp.where(a == 0, jnp.zeros((), out.dtype), s)
        return zero + math.log(abs(y)) + (y - 1) * log_abs(a), one * s
    if name == "custom_jvp_call" and _function_name(eqn) == "logaddexp" and len(vals) == 2:
        # softplus, log_sigmoid: d out / d a = exp(a - out) = 1 / (1 + exp(b - a)), in logs -softplus(b - a):
        # exact where the partial underflows, and 0 (not inf - inf) at a = +inf.
        b = jnp.asarray(vals[1 - k], out.dtype)
        return jnp.broadcast_to(-_softplus(b - jnp.asarray(a, out.dtype)), out.shape), one
    # Any other elementwise primitive (and elementwise custom_jvp functions, by their rule): the partial itself.
    args = list(vals)

    def f(x):
        args[k] = x
        return _bind(eqn, args)[0]

    d = jax.jvp(f, (a,), (jnp.ones_like(a),))[1]
    d = jnp.broadcast_to(jnp.asarray(d, out.dtype), out.shape)
    return log_abs(d), jnp.sign(d)
