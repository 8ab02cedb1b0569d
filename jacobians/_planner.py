"""The planner: which exact method ``jacobian(f)`` uses by default, chosen from the jaxpr.

Candidates: dense forward (``n`` JVPs), dense reverse (``m`` VJPs),
compressed forward or reverse (one JVP/VJP per colour of the detected pattern,
then a gather into the dense result), and the structured forward and reverse
sweeps (:mod:`._structured`). Every pass costs about one evaluation of ``f``;
the cost model counts passes times an estimate of one pass (the FLOPs of
``dot_general`` and convolutions, element counts elsewhere, read from the
jaxpr) plus the decompression (a gather of ``nnz`` entries into the dense
``m x n`` result). A structured sweep is costed by the same count over the
program it generates (traced, not run), and chosen only when it beats the
best other candidate by ``STRUCTURED_MARGIN``: its selections and scatters
cost more than their element counts say, and a near tie is not worth them.
The sparsity analysis stops early once the pattern passes a density budget,
so a dense function costs little to plan. ``custom_vjp`` forces reverse mode
and a ``while_loop`` forward mode. Plans are cached per call structure and
shapes. A compressed or structured plan is certified once against JAX's own
derivative before it is used, and any failure of the analyses or of the
certificate gives the dense plan instead (see :mod:`._trust`).
"""

import math
from dataclasses import dataclass, field

import numpy as np

from . import _compat, _deps, _structured, _trust
from ._walker import primitives

PASS_OVERHEAD = 0.25  # a compressed pass also builds its seed and gathers: count it a bit dearer
DENSITY_BUDGET = 0.25  # stop detecting once nnz > this fraction of m * n (dense enough)
NNZ_CAP = 1 << 22  # and never hold more than this many entries while planning
SAMPLE = 64  # columns seeded by the detection pre-pass that can rule colourings out
SAMPLE_FROM = 4096  # inputs from which that pre-pass pays for itself
STRUCTURED_MARGIN = 0.8  # a structured sweep must cost less than this times the best other candidate


@dataclass(frozen=True)
class JacobianPlan:
    """What ``jacobian`` does for one call structure, and why.

    Attributes:
      method: ``"dense"``, ``"compressed"`` or ``"structured"``.
      mode: ``"fwd"`` or ``"rev"``.
      passes: the number of JVPs/VJPs.
      n, m: total input and output sizes.
      nnz: entries of the detected pattern (``None``: dense or not analysed).
      costs: the candidates and their estimated costs (arbitrary units: FLOPs).
      reason: one line on the choice.
      certificate: the plan's check against JAX's own derivative (a
        :class:`jacobians._trust.Certificate`: passed, skipped and why, or not
        needed for the dense method); ``None`` where no plan was made.
      seconds: wall time spent planning (analyses, cost model, certificate), on the host.
    """

    method: str
    mode: str
    passes: int
    n: int
    m: int
    nnz: int | None = None
    costs: dict = field(default_factory=dict)
    reason: str = ""
    sparse_plan: object = field(default=None, repr=False, compare=False)
    certificate: object = field(default=None, compare=False)
    seconds: float | None = field(default=None, compare=False)
    fallback_mode: str | None = field(default=None, repr=False, compare=False)  # the dense direction if it fails

    def __str__(self) -> str:
        lines = [f"jacobian plan: {self.method} {self.mode}, {self.passes} passes (n={self.n}, m={self.m}"
                 + (f", nnz={self.nnz}" if self.nnz is not None else "") + ")"]
        for name, cost in sorted(self.costs.items(), key=lambda kv: kv[1]):
            lines.append(f"  {name:<16} {cost:12.4g}{'  <- chosen' if name == self.key else ''}")
        if self.reason:
            lines.append(f"  {self.reason}")
        if self.certificate is not None:
            lines.append(f"  certificate: {self.certificate}")
        if self.seconds is not None:
            lines.append(f"  planned in {self.seconds * 1e3:.3g} ms")
        return "\n".join(lines)

    @property
    def key(self) -> str:
        return f"{self.method} {self.mode}"


def pass_cost(closed) -> float:
    """One evaluation's cost from a closed or open jaxpr: FLOPs of products and convolutions, element counts elsewhere.

    Nested jaxprs (a ``jit``, ``cond``'s branches, a loop body) are open and may
    have constants of their own (a closure), which cost nothing here.
    """
    total = 0.0
    for eqn in _compat.unclose(closed)[0].eqns:
        name = eqn.primitive.name
        out = sum(math.prod(v.aval.shape) for v in eqn.outvars)
        if name == "dot_general":
            (lc, _), _ = eqn.params["dimension_numbers"]
            k = math.prod(eqn.invars[0].aval.shape[i] for i in lc)
            total += 2.0 * out * k
        elif name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape
            total += 2.0 * out * math.prod(rhs) / max(rhs[0], 1)
        else:
            total += out + sum(pass_cost(s) for s in _compat.jaxprs_in_params(eqn.params))
    return max(total, 1.0)


def choose(closed, n: int, m: int, detect, color, structured=None, only_structured: bool = False) -> JacobianPlan:
    """Plan for a flat map ``R^n -> R^m`` whose jaxpr is ``closed``.

    Args:
      closed: the flat map's closed jaxpr.
      detect: ``detect(max_nnz, columns=None) -> Detected`` (raises ``TooDense``); ``columns``
        seeds only those inputs (see :func:`_sample_rules_out`); ``None``: no compressed candidate.
      color: ``color(pattern, mode) -> SparsePlan`` for a forced or free direction.
      structured: ``structured(sweep) -> closed jaxpr`` of that structured
        sweep's program (``None``: not a candidate).
      only_structured: choose between the two structured sweeps only (a sweep
        that raises is then no candidate, and none is a ``ValueError``).

    Raises:
      _trust.AnalysisError: an analysis failed (not with ``only_structured``); the
        caller falls back to :func:`dense`.
    """
    plan = _choose_unstructured(closed, n, m, detect, color, only_structured)
    if structured is None:
        return plan
    forced = _forced(closed)
    costs = dict(plan.costs)
    notes = []
    # A sweep is traced only while it can still win: its dense values may not outgrow the margin
    # times the best other candidate (every materialised entry costs at least one element operation).
    limit = STRUCTURED_MARGIN * min(costs.values()) if costs and not only_structured else None
    for sweep in ("fwd", "rev"):
        if forced not in (None, sweep):
            continue
        if not only_structured:  # on the default path a sweep that cannot trace is a defect: reported
            try:
                with _structured.budget(limit), _trust.stage(f"structured {sweep} sweep", (_structured.OverBudget,)):
                    costs[f"structured {sweep}"] = pass_cost(structured(sweep))
            except _structured.OverBudget:
                notes.append(f"structured {sweep} stopped: over the best other candidate's cost")
            continue
        try:
            costs[f"structured {sweep}"] = pass_cost(structured(sweep))
        except Exception as e:  # noqa: BLE001 - the caller asked for a sweep: say why none applies
            notes.append(f"structured {sweep} not possible ({type(e).__name__}: {str(e).strip()[:200]})")
    found = {k: v for k, v in costs.items() if k.startswith("structured")}
    reason = "; ".join([plan.reason] + notes) if notes else plan.reason
    if not found:
        if only_structured:
            raise ValueError("no structured sweep applies to this function: " + "; ".join(notes))
        return JacobianPlan(plan.method, plan.mode, plan.passes, n, m, plan.nnz, costs, reason, plan.sparse_plan)
    key = min(found, key=found.get)
    others = [v for k, v in costs.items() if not k.startswith("structured")]
    if only_structured or not others or found[key] < STRUCTURED_MARGIN * min(others):
        return JacobianPlan("structured", key.split()[1], 1, n, m, plan.nnz, costs,
                            reason + f"; the structured {key.split()[1]} sweep is cheapest")
    return JacobianPlan(plan.method, plan.mode, plan.passes, n, m, plan.nnz, costs, reason, plan.sparse_plan)


def dense(closed, n: int, m: int, reason: str, certificate=None) -> JacobianPlan:
    """The dense plan, chosen from the shapes and the directions JAX can differentiate in, no cost model.

    The fallback where an analysis or a certificate failed: it reads nothing but
    the primitives' names. Square maps go to reverse, as the cost model's ties do.
    """
    try:
        forced = _forced(closed)
    except Exception:  # noqa: BLE001 - the fallback must not fail: the run falls back between directions too
        forced = None
    mode = forced or ("fwd" if n < m else "rev")
    return JacobianPlan("dense", mode, n if mode == "fwd" else m, n, m, None, {}, reason,
                        certificate=certificate if certificate is not None else _trust.NOT_NEEDED)


def _forced(closed) -> str | None:
    """``"rev"`` with a ``custom_vjp`` (no JVP), ``"fwd"`` with a ``while_loop`` (no VJP), else ``None``."""
    prims = primitives(closed)
    no_fwd = bool({"custom_vjp_call", "custom_vjp_call_jaxpr"} & prims)
    no_rev = "while" in prims
    if no_fwd and no_rev:
        return None
    return "rev" if no_fwd else ("fwd" if no_rev else None)


def _sample_rules_out(detect, budget: int, n: int, f: float, forced, best_dense: float) -> bool:
    """Whether the pattern restricted to ``SAMPLE`` columns proves that no colouring beats ``best_dense``.

    A sub-pattern bounds every colouring from below: the column colours by its
    longest row, the row colours by its longest column, the gather by its
    entries. Detection on a sample costs a fraction of full detection, which on
    a dense map (a parameter Jacobian with few outputs) is most of the planning.
    """
    cols = np.unique(np.linspace(0, n - 1, SAMPLE).round().astype(np.int64))
    pattern = detect(budget, cols).pattern
    rows, cs = pattern.rows, pattern.cols
    if rows.size == 0:
        return False
    bounds = []
    if forced != "rev":
        bounds.append(int(np.bincount(rows).max()))
    if forced != "fwd":
        bounds.append(int(np.bincount(cs).max()))
    return min(bounds) * f * (1 + PASS_OVERHEAD) + rows.size >= best_dense


def _choose_unstructured(closed, n: int, m: int, detect, color, skip: bool = False) -> JacobianPlan:
    """The best of the dense and compressed candidates."""
    if skip:
        return JacobianPlan("dense", "fwd" if n <= m else "rev", min(n, m), n, m)
    forced = _forced(closed)
    f = pass_cost(closed)
    costs = {}
    if forced != "rev":
        costs["dense fwd"] = n * f
    if forced != "fwd":
        # Ties go to reverse: on square maps its batched products run faster on CPU.
        costs["dense rev"] = m * f * (0.999 if n == m else 1.0)
    dense_key = min(costs, key=costs.get) if costs else "dense fwd"
    best_dense = costs.get(dense_key, n * f)
    reason = f"one pass ~ {f:.3g} FLOPs"
    # A colouring also pays one gather per entry: past this many entries it cannot win.
    budget = min(int(DENSITY_BUDGET * n * m), NNZ_CAP, max(int(best_dense - (1 + PASS_OVERHEAD) * f), 0))
    plan = None
    if detect is not None and n * m > 0 and min(n, m) > 2:
        try:
            if n >= SAMPLE_FROM and _sample_rules_out(detect, budget, n, f, forced, best_dense):
                reason += (f"; no colouring can win (the pattern's restriction to {SAMPLE} columns "
                           "already needs as many passes as dense)")
            else:
                pattern = detect(budget)
                plan = color(pattern, forced or "auto")
        except _deps.TooDense:
            reason += "; the pattern is dense (detection stopped at the density budget)"
    if plan is not None:
        nnz = plan.pattern.nnz
        cost = plan.n_colors * f * (1 + PASS_OVERHEAD) + nnz
        costs[f"compressed {plan.mode}"] = cost
        if cost < best_dense:
            return JacobianPlan("compressed", plan.mode, plan.n_colors, n, m, nnz, costs,
                                reason + f"; {plan.n_colors} colours", plan)
        return JacobianPlan("dense", dense_key.split()[1], n if "fwd" in dense_key else m, n, m, nnz, costs,
                            reason + f"; {plan.n_colors} colours do not pay for the decompression")
    mode = dense_key.split()[1]
    return JacobianPlan("dense", mode, n if mode == "fwd" else m, n, m, None, costs, reason)

