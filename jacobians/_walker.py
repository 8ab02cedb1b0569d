"""One abstract interpreter for every jaxpr analysis.

The walker knows nothing about what it carries. A :class:`Lattice` supplies the
abstract values (one per jaxpr variable), how to make them from constants, how
to join them, and a rule table: one small function per primitive family,
dispatched by ``eqn.primitive.name``. The walker supplies everything else, once:

- the environment, literals and closed-over constants;
- constant folding: an equation whose inputs are all known at trace time is
  evaluated on the host (iotas, index arithmetic, constant matrices), so rules
  see concrete indices and constant operands;
- nested jaxprs (``jit``, ``closed_call``, ``remat``, ``custom_jvp_call``,
  ``custom_vjp_call``, ...), recursed into unless the lattice has a rule;
- ``cond`` (the branch a known index picks, else the join of all branches),
  ``scan`` with a static length (unrolled exactly up to a budget, then a fixed
  point) and ``while`` (a fixed point);
- an invariant check after every rule (:meth:`Lattice.check`), raising
  :class:`InternalError` naming the primitive: a wrong element count would
  silently shift the rows of a pattern.

Everything runs on the host under ``jax.ensure_compile_time_eval``, so an
analysis works whatever JAX trace is active (inside a user's ``jit``). A
*staged* lattice (``Lattice.staged``, the structured sweeps) carries traced
values instead: then only folding runs on the host, closed-over tracers reach
the lattice through :meth:`Lattice.const`, and equations that carry nothing
still go to :meth:`Lattice.skip` (which computes their values).
"""

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from . import _compat, _host_eval
from ._compat import bind as bind
from ._primitives import HOST_CALLS

FOLD_MAX = 1 << 20  # fold equations whose outputs have at most this many elements
UNROLL_MAX = 1 << 12  # scan steps walked one by one before falling back to a fixed point
LOOP_MAX = 256  # fixed-point iterations before a loop's carry is declared unknown

Rule = Callable[["Lattice", Any, list], list]


class InternalError(RuntimeError):
    """A rule broke an invariant of its lattice (a bug in jacobians: please report it)."""


def is_opaque(aval) -> bool:
    """PRNG keys and other extended dtypes: values that are not numbers."""
    return jax.dtypes.issubdtype(getattr(aval, "dtype", None), jax.dtypes.extended)


class Lattice:
    """What an analysis carries through a jaxpr. Subclasses fill in the methods.

    Attributes:
      name: shown in error messages and warnings.
      rules: primitive name -> ``rule(lattice, eqn, ins) -> outs``; ``ins`` are
        the lattice values of ``eqn.invars``, ``outs`` one per ``eqn.outvars``.
    """

    name = "lattice"
    rules: dict[str, Rule] = {}
    # A staged lattice carries traced JAX values (an evaluator such as the
    # structured sweeps): only constant folding runs on the host, and its
    # results stay small (they become constants of the compiled program).
    staged = False
    fold_max = FOLD_MAX

    # --- values -----------------------------------------------------------------------
    def constant(self, value: np.ndarray | None, aval) -> Any:
        """A value known at trace time (``None``: known to carry nothing, value unknown)."""
        raise NotImplementedError

    def const(self, c, aval) -> Any:
        """A closed-over constant of the jaxpr (a tracer when the jaxpr was traced inside a ``jit``)."""
        known = not (_compat.is_tracer(c) or is_opaque(aval))
        return self.constant(np.asarray(c) if known else None, aval)

    def skip(self, eqn, ins: list) -> list:
        """The outputs of an equation whose inputs all carry nothing."""
        return [self.constant(None, v.aval) for v in eqn.outvars]

    def value(self, v) -> np.ndarray | None:
        """The folded constant a lattice value holds, if any."""
        raise NotImplementedError

    def is_inert(self, v) -> bool:
        """True when ``v`` carries nothing (no dependency, no structure) to propagate."""
        raise NotImplementedError

    def forget(self, v) -> Any:
        """``v`` without its folded value (a loop carry changes from step to step)."""
        raise NotImplementedError

    def join(self, vals: Sequence, aval) -> Any:
        """The least upper bound of same-shaped values."""
        raise NotImplementedError

    def same(self, a, b) -> bool:
        """``a == b``, folded values included (loops stop when a step changes nothing)."""
        raise NotImplementedError

    # --- the leading axis (scan's xs and ys) ------------------------------------------------
    def index(self, v, i: int, aval) -> Any:
        """Slice ``i`` along the leading axis (``aval`` is the slice's)."""
        raise NotImplementedError

    def stack(self, vals: Sequence, aval) -> Any:
        """Stack slices along a new leading axis (``aval`` is the result's)."""
        raise NotImplementedError

    def collapse(self, v, aval) -> Any:
        """The join of all slices along the leading axis (``aval`` is one slice's)."""
        raise NotImplementedError

    def spread(self, v, aval) -> Any:
        """``v`` repeated along a new leading axis (``aval`` is the result's)."""
        raise NotImplementedError

    # --- rules ----------------------------------------------------------------------------
    def default(self, eqn, ins: list) -> list:
        """The conservative answer for a primitive without a rule."""
        raise NotImplementedError

    def post(self, eqn, outs: list) -> list:
        """A last look at every equation's outputs (e.g. integers carry no derivative)."""
        return outs

    def check(self, v, aval) -> str | None:
        """``None`` if ``v`` is a well-formed value for ``aval``, else what is wrong."""
        return None

    def scope(self) -> contextlib.AbstractContextManager:
        """Entered around each walk (e.g. a budget that the lattice's operations see)."""
        return contextlib.nullcontext()


def _fold(lat: Lattice, eqn, ins: list) -> list | None:
    """Evaluate ``eqn`` on the host when all its inputs are known constants."""
    if eqn.effects or any(is_opaque(v.aval) for v in eqn.outvars):
        return None  # keys are not numbers; effects must not run twice
    values = [lat.value(d) for d in ins]
    if any(x is None for x in values) or (not ins and eqn.primitive.name != "iota"):
        return None
    if sum(math.prod(v.aval.shape) for v in eqn.outvars) > lat.fold_max:
        return None
    dtypes = [v.aval.dtype for v in eqn.outvars]
    out = _host_eval.evaluate(eqn.primitive.name, eqn.params, values, dtypes)
    if out is None:
        try:
            with jax.ensure_compile_time_eval():
                out = bind(eqn, values)
            out = out if eqn.primitive.multiple_results else [out]
            # Some releases stage custom_vjp_call into an enclosing jit trace even here: a tracer, not a value.
            out = [np.asarray(o) for o in out]
        except Exception:  # noqa: BLE001 - folding is an optimisation only
            return None
    return [lat.constant(np.asarray(o), v.aval) for o, v in zip(out, eqn.outvars, strict=True)]


class Walker:
    """Walks (closed) jaxprs for one lattice, recording the primitives it meets."""

    def __init__(self, lattice: Lattice):
        self.lat = lattice
        self.seen: set[str] = set()  # every primitive met, nested ones included
        self.unknown: set[str] = set()  # primitives that fell back to ``Lattice.default``

    def run(self, closed, args: Sequence) -> list:
        """The lattice values of ``closed``'s outputs given those of its inputs."""
        with self.lat.scope():
            if self.lat.staged:
                return self._run(closed, args)
            with jax.ensure_compile_time_eval():
                return self._run(closed, args)

    def _run(self, closed, args: Sequence) -> list:
        jaxpr, consts = _compat.unclose(closed)
        lat = self.lat
        env: dict = {}

        def read(v):
            if isinstance(v, _compat.Literal):
                return lat.constant(None if is_opaque(v.aval) else np.asarray(v.val), v.aval)
            return env[v]

        for v, c in zip(jaxpr.constvars, consts, strict=True):
            env[v] = lat.const(_compat.host_constant(c), v.aval)
        for v, a in zip(jaxpr.invars, args, strict=True):
            env[v] = a
        live = live_equations(jaxpr)
        for eqn, alive in zip(jaxpr.eqns, live, strict=True):
            if not alive:  # dead code (the flat view's unused ravel of x): its primitives still count as met
                self.seen.add(eqn.primitive.name)
                for sub in _compat.jaxprs_in_params(eqn.params):
                    self.seen |= primitives(sub)
                continue
            outs = self.eqn(eqn, [read(v) for v in eqn.invars])
            for v, o in zip(eqn.outvars, outs, strict=True):
                if not isinstance(v, _compat.DropVar):
                    env[v] = o
        return [read(v) for v in jaxpr.outvars]

    def eqn(self, eqn, ins: list) -> list:
        """Apply one equation: fold, skip, control flow, nested jaxpr or the lattice's rule."""
        name = eqn.primitive.name
        self.seen.add(name)
        lat = self.lat
        folded = _fold(lat, eqn, ins)
        if folded is not None:
            return folded
        if all(lat.is_inert(d) for d in ins):
            return lat.skip(eqn, ins)
        rule = lat.rules.get(name)
        if rule is not None:
            outs = rule(lat, eqn, ins)
        elif name == "cond":
            outs = self._cond(eqn, ins)
        elif name == "while":
            outs = self._while(eqn, ins)
        elif name == "scan":
            outs = self._scan(eqn, ins)
        elif (inner := _compat.called_jaxpr(eqn)) is not None:
            n_in = len(_compat.unclose(inner)[0].invars)
            outs = self._run(inner, ins[len(ins) - n_in :])
        else:
            if name not in HOST_CALLS:
                self.unknown.add(name)
            outs = lat.default(eqn, ins)
        outs = lat.post(eqn, outs)
        if len(outs) != len(eqn.outvars):
            raise InternalError(
                f"{lat.name}: the rule for '{name}' returned {len(outs)} values for {len(eqn.outvars)} outputs."
            )
        for o, v in zip(outs, eqn.outvars, strict=True):
            problem = lat.check(o, v.aval)
            if problem:
                raise InternalError(f"{lat.name}: the rule for '{name}' produced a bad value: {problem}.")
        return outs

    # --- control flow -----------------------------------------------------------------------
    def _cond(self, eqn, ins):
        branches = _compat.cond_branches(eqn)
        index = self.lat.value(ins[0])
        if index is not None:  # a known predicate runs one branch
            k = int(np.clip(int(index), 0, len(branches) - 1))
            return self._run(branches[k], ins[1:])
        results = [self._run(br, ins[1:]) for br in branches]
        return [self.lat.join(list(outs), v.aval) for outs, v in zip(zip(*results, strict=True), eqn.outvars)]

    def _fixed_point(self, step, carry: list, avals) -> list | None:
        """Join ``step(carry)`` into ``carry`` until nothing changes (``None``: no convergence)."""
        lat = self.lat
        carry = [lat.forget(c) for c in carry]
        for _ in range(LOOP_MAX):
            new = step(carry)
            merged = [lat.join([c, n], a) for c, n, a in zip(carry, new, avals, strict=True)]
            if all(lat.same(m, c) for m, c in zip(merged, carry, strict=True)):
                return merged
            carry = merged
        return None

    def _while(self, eqn, ins):
        nc, nb = _compat.while_counts(eqn)
        _, body = _compat.while_jaxprs(eqn)
        consts, carry = ins[nc : nc + nb], ins[nc + nb :]
        avals = [v.aval for v in eqn.outvars]
        out = self._fixed_point(lambda c: self._run(body, consts + c), carry, avals)
        if out is None:
            self.unknown.add("while (no fixed point)")
            return self.lat.default(eqn, ins)
        return out

    def _scan(self, eqn, ins):
        p = eqn.params
        lat = self.lat
        length, body = p["length"], _compat.scan_body(eqn)
        counts = _compat.scan_counts(eqn)
        if counts is None:  # a JAX whose scan parameters we cannot read: the conservative answer, with the warning
            self.unknown.add("scan (parameters of this JAX version)")
            return lat.default(eqn, ins)
        nc, nk = counts
        body_jaxpr = _compat.unclose(body)[0]
        consts, carry, xs = ins[:nc], ins[nc : nc + nk], ins[nc + nk :]
        x_avals = [v.aval for v in body_jaxpr.invars[nc + nk :]]
        y_avals = [v.aval for v in body_jaxpr.outvars[nk:]]
        out_avals = [v.aval for v in eqn.outvars]
        if length == 0:  # no step runs: the carry comes out as it went in, and the ys are empty
            return carry + [lat.constant(None, a) for a in out_avals[nk:]]
        if length <= UNROLL_MAX:
            # Exact: step i sees slice i of xs, and ys stack the steps' outputs.
            order = range(length - 1, -1, -1) if p["reverse"] else range(length)
            ys_steps: dict[int, list] = {}
            # Slices that carry nothing and hold no known values all look alike.
            x_inert = all(lat.is_inert(x) and lat.value(x) is None for x in xs)
            for i in order:
                sl = [lat.index(x, i, a) for x, a in zip(xs, x_avals, strict=True)]
                outs = self._run(body, consts + carry + sl)
                new_carry = outs[:nk]
                ys_steps[i] = outs[nk:]
                if x_inert and all(lat.same(a, b) for a, b in zip(new_carry, carry, strict=True)):
                    # Nothing changes any more: the remaining steps repeat this one.
                    for j in order:
                        ys_steps.setdefault(j, outs[nk:])
                    carry = new_carry
                    break
                carry = new_carry
            ys = [
                lat.stack([ys_steps[i][k] for i in range(length)], a)
                for k, a in enumerate(out_avals[nk:])
            ]
            return carry + ys
        # Long scans: every step may see every slice; the carry is a fixed point.
        sl = [lat.collapse(x, a) for x, a in zip(xs, x_avals, strict=True)]
        final = self._fixed_point(lambda c: self._run(body, consts + c + sl)[:nk], carry, out_avals[:nk])
        if final is None:
            self.unknown.add("scan (no fixed point)")
            return lat.default(eqn, ins)
        outs = self._run(body, consts + final + sl)
        ys = [lat.spread(y, a) for y, a, ya in zip(outs[nk:], out_avals[nk:], y_avals, strict=True)]
        return final + ys


def live_equations(jaxpr) -> list[bool]:
    """Per equation, whether an output of the jaxpr (or an effect) needs it; a backward pass over the equations."""
    needed = {v for v in jaxpr.outvars if not isinstance(v, _compat.Literal)}
    live = [False] * len(jaxpr.eqns)
    for k in range(len(jaxpr.eqns) - 1, -1, -1):
        eqn = jaxpr.eqns[k]
        if eqn.effects or any(v in needed for v in eqn.outvars if not isinstance(v, _compat.DropVar)):
            live[k] = True
            needed.update(v for v in eqn.invars if not isinstance(v, _compat.Literal))
    return live


def primitives(jaxpr) -> set[str]:
    """Names of all primitives in a (closed) jaxpr, nested ones included (no walk, no lattice)."""
    jaxpr = _compat.unclose(jaxpr)[0]
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        for sub in _compat.jaxprs_in_params(eqn.params):
            names |= primitives(sub)
    return names


# Calls whose bodies JAX never differentiates: it differentiates their rules (the JVP rule, fwd/bwd) instead.
RULED = frozenset({"custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr"})


# A pseudo-name in :func:`differentiated`: a windowed max or min with window dilation or a negative padding,
# or its JVP (select_and_gather_add, in a linearized program), which JAX cannot transpose ("VJP not
# implemented ... with window dilation"; "slice start_indices must have every element be nonnegative" for
# a negative padding, JAX 0.10).
DILATED_WINDOW = "reduce_window_max/min with window_dilation or negative padding"
# Another: a custom_linear_solve without a transpose_solve ("transpose_solve required for backwards mode").
UNTRANSPOSABLE_SOLVE = "custom_linear_solve without transpose_solve"
# The primitives and pseudo-names that bar reverse mode whatever the trip counts (a while_loop may not).
BARS_REVERSE = frozenset({DILATED_WINDOW, UNTRANSPOSABLE_SOLVE, "custom_vmap_call"})


def differentiated(jaxpr) -> set[str]:
    """Names of the primitives JAX differentiates in a (closed) jaxpr: nested ones, not custom rules' bodies.

    What decides the directions JAX can take (``jacobians._methods.directions``): a
    ``while_loop`` inside a ``custom_vjp`` (``odeint``'s solver) does not block reverse mode.
    Parameters that bar a direction add a pseudo-name (:data:`DILATED_WINDOW`, :data:`UNTRANSPOSABLE_SOLVE`).
    """
    jaxpr = _compat.unclose(jaxpr)[0]
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        if eqn.primitive.name in ("reduce_window_max", "reduce_window_min", "select_and_gather_add") and (
            any(d != 1 for d in eqn.params.get("window_dilation", ()))
            or any(lo < 0 or hi < 0 for lo, hi in eqn.params.get("padding", ()))
        ):
            names.add(DILATED_WINDOW)
        if eqn.primitive.name == "custom_linear_solve" and getattr(
            eqn.params.get("jaxprs"), "transpose_solve", True
        ) is None:
            names.add(UNTRANSPOSABLE_SOLVE)
        if eqn.primitive.name not in RULED:
            for sub in _compat.jaxprs_in_params(eqn.params):
                names |= differentiated(sub)
    return names


def has_custom_vjp(jaxpr) -> bool:
    """True when JAX cannot push JVPs through the jaxpr (it differentiates a ``custom_vjp``)."""
    return bool({"custom_vjp_call", "custom_vjp_call_jaxpr"} & differentiated(jaxpr))
