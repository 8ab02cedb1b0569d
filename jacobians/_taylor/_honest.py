"""Whether a Taylor sweep can give JAX's second derivative through a program's ``custom_jvp`` rules.

JAX differentiates a ``custom_jvp`` twice by differentiating its rule
``(x, t) -> (p(x), d(x) t)`` as an ordinary function: along the inner direction
the call's derivative is the rule's ``d(x)``, along the outer one it is ``p'(x)``,
the derivative of the rule's *primal* output. A Taylor sweep carries one first
derivative per value, so it can follow JAX only where the two agree, ``d = p'``:
the rule is the derivative of its own primal (``relu``, ``softplus``, ``logsumexp``).
A rule that is not (a scaled, clipped or straight-through gradient) makes
``jax.hessian`` mix both, and the sweep would give another number.

:func:`disagreeing_rule` checks every such rule of a program numerically, at
random points (as a certificate does): ``d(x) t`` against ``p'(x) t`` by one
JVP of the rule's JVP, per equation. Rules recognised by name (``_linalg.CUSTOM``)
or defined in JAX's own sources (``jax.nn.relu``) are exact; the checks of the
rest run as one compiled program, once per traced rule.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np

from .. import _compat
from .._deps import _custom
from .._walker import RULED, bind
from . import _custom_name, _linalg

SEED = 0x7A1


def _random(aval, rng):
    # NumPy, not JAX, arrays: inside a trace JAX would stage them as the trace's values.
    dtype = np.dtype(aval.dtype)
    if jnp.issubdtype(dtype, jnp.complexfloating):
        re, im = rng.standard_normal((2, *aval.shape))
        return np.asarray(re + 1j * im, dtype)
    if jnp.issubdtype(dtype, jnp.inexact):
        return np.asarray(rng.standard_normal(aval.shape), dtype)
    return np.zeros(aval.shape, dtype)  # indices, counts: the smallest valid value


def _check(eqn, rng, symmetric: bool):
    """``(check, operands)`` for one ``custom_jvp_call``, or ``None``.

    ``check(*operands) -> ((d(x) t, p'(x) t),)``, and with ``symmetric`` also the pair
    ``(D[d(x) t] s, D[d(x) s] t)``: equal where the rule's tangent map is the derivative of some
    function (its second derivative is a symmetric bilinear form).
    """
    diff = _custom.diff_operands(eqn)
    if not diff:
        return None
    ops = [_random(v.aval, rng) for v in eqn.invars]

    def call(*d):
        args = list(ops)
        for i, v in zip(diff, d, strict=True):
            args[i] = v
        out = bind(eqn, args)
        return tuple(out) if eqn.primitive.multiple_results else (out,)

    def tangent(d0, t, s):  # D[d(x) t] s
        return jax.jvp(lambda *d: jax.jvp(call, d, t)[1], d0, s)[1]

    def check(d0, t, s):
        _, inner = jax.jvp(call, d0, t)  # d(x) t: the rule's tangent
        _, outer = jax.jvp(lambda *d: jax.jvp(call, d, t)[0], d0, t)  # p'(x) t: the rule's primal, differentiated
        return ((inner, outer), (tangent(d0, t, s), tangent(d0, s, t))) if symmetric else ((inner, outer),)

    directions = [tuple(_random(eqn.invars[i].aval, rng) for i in diff) for _ in range(2)]
    return check, (tuple(ops[i] for i in diff), *directions)


def _agrees(inner, outer) -> bool:
    for a, b in zip(inner, outer, strict=True):
        if not jnp.issubdtype(a.dtype, jnp.inexact):
            continue
        tol = 10 * np.sqrt(float(jnp.finfo(a.dtype).eps))  # far above rounding, far below a wrong factor
        a, b = np.asarray(a).astype(np.complex128), np.asarray(b).astype(np.complex128)
        ok = np.isfinite(a) & np.isfinite(b)  # a random point outside the rule's domain says nothing
        a, b = a[ok], b[ok]
        if a.size and np.any(np.abs(a - b) > tol * (np.abs(a) + np.abs(b) + np.mean(np.abs(a) + np.abs(b)))):
            return False
    return True


def _run(checks, operands):
    """The checks as one compiled program on concrete operands, also while a call is being traced."""
    with jax.ensure_compile_time_eval():
        return jax.jit(lambda ops: [c(*o) for c, o in zip(checks, ops, strict=True)])(operands)


def _jax_own(call) -> bool:
    """A rule JAX itself defines (``jax.nn.relu``'s): the derivative of its primal by JAX's design."""
    info = getattr(getattr(call, "jaxpr", call), "debug_info", None)
    src = getattr(info, "func_src_info", None) or ""
    return f" at {_JAX_DIR}" in src


_JAX_DIR = os.path.dirname(jax.__file__) + os.sep


def _eqns(jaxpr):
    """The ``custom_jvp_call`` equations JAX differentiates in a jaxpr: nested ones, not rules' bodies."""
    for eqn in _compat.unclose(jaxpr)[0].eqns:
        if eqn.primitive.name == "custom_jvp_call":
            yield eqn
        elif eqn.primitive.name not in RULED:
            for sub in _compat.jaxprs_in_params(eqn.params):
                yield from _eqns(sub)


def disagreeing_rule(jaxpr, symmetric: bool = False) -> str | None:
    """The name of a ``custom_jvp`` in ``jaxpr`` whose rule is not the derivative of its primal, or ``None``.

    ``symmetric``: also a rule whose tangent map is not a derivative at all (``x -> 2 roll(x)``, say):
    through it JAX's Hessian, the Jacobian of the gradient, is not symmetric.

    Deterministic (a fixed seed); a rule that cannot be evaluated on random operands counts as agreeing
    (the sweep then treats it as before).
    """
    rng = np.random.default_rng(SEED)
    seen, named = set(), []
    for eqn in _eqns(jaxpr):
        name, call = _custom_name(eqn), eqn.params.get("call_jaxpr")
        key = id(getattr(call, "jaxpr", call)), tuple(v.aval for v in eqn.invars)  # one rule traced once: one check
        if name in _linalg.CUSTOM or _jax_own(call) or key in seen:
            continue
        seen.add(key)
        if (check := _check(eqn, rng, symmetric)) is not None:
            named.append((name, check))
    if not named:
        return None
    try:  # one program for all of them: one compilation, not one per rule
        results = _run([c for _, (c, _) in named], [o for _, (_, o) in named])
    except Exception:  # noqa: BLE001 - a rule that needs particular operands (a valid index, a factorisation)
        results = []
        for _, (c, o) in named:
            try:
                results.append(_run([c], [o])[0])
            except Exception:  # noqa: BLE001 - that rule alone is not judged
                results.append(None)
    for (name, _), r in zip(named, results, strict=True):
        if r is not None and not all(_agrees(*pair) for pair in r):
            return name or "custom_jvp"
    return None
