"""Structured sweeps: one sweep carrying identity, diagonal, selection and dense Jacobians (:mod:`._sweeps`)."""

from collections.abc import Callable

import jax

from .. import _args, _sweeps, _trust
from ._base import Call, Candidate, Context, Traced, pass_cost

MARGIN = 0.8  # a sweep's selections and scatters cost more than their element counts say: a near tie is not worth them


class Structured:
    """Both sweeps, costed by the program each generates (traced, not run) under the best candidate's budget."""

    name = "structured"
    margin = MARGIN

    def candidates(self, ctx: Context) -> list[Candidate]:
        if ctx.sweep is None:
            return []
        only = ctx.only == self.name
        # A sweep's program holds the primal pass and writes the dense (m, n) Jacobian: below the margin
        # times the best candidate, or it is not traced at all (a compressed diagonal, a few colours).
        if not only and ctx.f + ctx.m * ctx.n >= self.margin * ctx.best:
            ctx.notes.append("no structured sweep can win (the primal pass and the dense result alone cost more)")
            return []
        # A sweep is traced only while it can still win: its dense values may not outgrow the margin
        # times the best other candidate (every materialised entry costs at least one element operation).
        limit = None if only or ctx.best == float("inf") else self.margin * ctx.best
        out = []
        for sweep in ctx.sweeps:
            if sweep not in ctx.allowed:
                continue
            if not only:  # on the default path a sweep that cannot trace is a defect: reported
                try:
                    with _sweeps.budget(limit), _trust.stage(f"structured {sweep} sweep",
                                                                 (_sweeps.OverBudget,)):
                        out.append(self._candidate(ctx, sweep))
                    # The other sweep must beat this one (no margin between siblings): it stops as soon as it cannot.
                    limit = out[-1].cost if limit is None else min(limit, out[-1].cost)
                except _sweeps.OverBudget:
                    ctx.notes.append(f"structured {sweep} stopped: over the best other candidate's cost")
                continue
            try:
                out.append(self._candidate(ctx, sweep))
            except Exception as e:  # noqa: BLE001 - the caller asked for a sweep: say why none applies
                ctx.notes.append(f"structured {sweep} not possible ({type(e).__name__}: {str(e).strip()[:200]})")
        if only and not out:
            raise ValueError("no structured sweep applies to this function: " + "; ".join(ctx.notes))
        return out

    def _candidate(self, ctx: Context, sweep: str) -> Candidate:
        program = ctx.sweep(sweep)  # a closed jaxpr, or a Traced program of the call's leaves (kept to evaluate)
        if isinstance(program, Traced):
            return Candidate(self, sweep, 1, pass_cost(program.closed), state=program)
        return Candidate(self, sweep, 1, pass_cost(program))

    def evaluate(self, cand: Candidate, call: Call):
        if isinstance(cand.state, Traced) and call.chunk_size is None and call.leaves:
            return cand.state(call.leaves)  # the planner's trace of this sweep: not swept again
        _, jac, aux = _sweeps.jacobian(*call.problem.sweep_input(), cand.mode, chunk_size=call.chunk_size)
        return jac, aux

    def certify(self, cand, traced_flat, values, where, computed=None):
        return _trust.linear(traced_flat, values, lambda p: _sweeps.jacobian(p.flat, p.x, cand.mode)[1],
                             mode=cand.mode, where=where, computed=computed)


STRUCTURED = Structured()


def sweep_programs(t, spec, avals, *, has_aux: bool = False, int_argnums: bool = True) -> Callable[[str], Traced]:
    """``sweep -> Traced``: a structured sweep's program ``(jac, aux)`` of a call's traced leaves.

    Traced on their shapes (``avals``), for the planner to cost and (:meth:`Structured.evaluate`)
    to evaluate without sweeping again; ``t`` is the call's ``_args.Transform``.
    """
    def trace(sweep: str) -> Traced:
        def g(*tr):
            q = _args.problem(t.fun, spec, tr, where=t.where, has_aux=has_aux, int_argnums=int_argnums, lazy=True)
            return _sweeps.jacobian(*q.sweep_input(), sweep)[1:]

        return Traced(*jax.make_jaxpr(g, return_shape=True)(*avals))

    return trace
