"""The planner: which exact method ``jacobian(f)`` uses by default, chosen from the jaxpr.

Every registered method (:mod:`jacobians._methods`: dense forward and reverse,
compressed forward or reverse, the structured forward and reverse sweeps)
offers its candidates with an estimated cost, in FLOPs: a pass costs about one
evaluation of ``f`` (the FLOPs of ``dot_general`` and convolutions, element
counts elsewhere, read from the jaxpr); a compressed candidate adds the gather
of its ``nnz`` entries; a structured sweep is costed by the same count over
the program it generates (traced, not run). Dense goes first: it bounds what
the analyses may spend, and each stops as soon as it cannot win (the sparsity
detection at the entry count where the gather alone would lose, after a
64-column sample when that already proves it; a sweep once its dense values
outgrow the margin). A method with ``margin < 1`` (the sweeps: their
selections and scatters cost more than their element counts say) must beat
the best other candidate by that factor. ``custom_vjp`` forbids forward mode
and a ``while_loop`` reverse mode (:func:`jacobians._methods.directions`).
Plans are cached per call structure and shapes. A compressed or structured
plan is certified against JAX's own derivative before its result is returned,
and any failure of the analyses or of the certificate gives the dense plan
instead (see :mod:`._trust`).
"""

from dataclasses import dataclass, field

from . import _methods, _trust
from ._methods import Candidate, Context, pass_cost
from ._walker import differentiated


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
      candidate: the chosen :class:`jacobians._methods.Candidate` (its method evaluates it).
      memory: under ``max_memory=``, the chunk size chosen and XLA's estimate of the program's bytes.
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
    candidate: Candidate | None = field(default=None, repr=False, compare=False)
    memory: object = field(default=None, compare=False)  # a jacobians._memory.Fit under max_memory=

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
        if self.memory is not None:
            lines.append(f"  {self.memory}")
        return "\n".join(lines)

    @property
    def key(self) -> str:
        return f"{self.method} {self.mode}"


def rank(ctx: Context, methods=None) -> JacobianPlan:
    """Ask every method for its candidates (in order) and keep the cheapest, margins counted.

    Raises:
      _trust.AnalysisError: an analysis failed (the caller falls back to :func:`dense`).
      ValueError: ``ctx.only`` names a method with no candidate here (it says why).
    """
    found: list[Candidate] = []
    for method in methods or _methods.METHODS:  # read at call time: a registration counts at once
        if ctx.only is not None and method.name not in (ctx.only, "dense"):
            continue
        cands = method.candidates(ctx)
        found += cands
        ctx.best = min([ctx.best] + [c.cost for c in cands])  # after the method: its own candidates compete freely
    pool = [c for c in found if c.method.name == ctx.only] if ctx.only else found
    if not pool:
        raise ValueError(f"no {ctx.only} candidate applies to this function: " + "; ".join(ctx.notes))
    # A candidate with margin mu wins only below mu x the best other: rank by cost / mu.
    win = min(pool, key=lambda c: c.cost / c.method.margin)
    notes = [f"one pass ~ {ctx.f:.3g} FLOPs"] + ctx.notes + [c.note for c in found if c.note]
    if win.method.name == "structured":
        notes.append(f"the structured {win.mode} sweep is cheapest")
    nnz = next((c.nnz for c in found if c.nnz is not None), None)
    costs = {c.key: c.cost for c in found if ctx.only is None or c.method.name == ctx.only}
    return JacobianPlan(win.method.name, win.mode, win.passes, ctx.n, ctx.m, nnz, costs, "; ".join(notes),
                        win.state if win.method.name == "compressed" else None, candidate=win)


def context(closed, n: int, m: int, **kwargs) -> Context:
    """The :class:`Context` of a flat map ``R^n -> R^m`` whose jaxpr is ``closed``."""
    return Context(closed, n, m, pass_cost(closed), _methods.directions(differentiated(closed)), **kwargs)


def choose(closed, n: int, m: int, detect, color, structured=None, only_structured: bool = False,
           sweeps: tuple = ("fwd", "rev")) -> JacobianPlan:
    """Plan for a flat map ``R^n -> R^m`` whose jaxpr is ``closed`` (:func:`rank` over every method).

    Args:
      closed: the flat map's closed jaxpr.
      detect: ``detect(max_nnz, columns=None) -> Detected`` (raises ``TooDense``); ``columns``
        seeds only those inputs; ``None``: no compressed candidate.
      color: ``color(pattern, mode) -> SparsePlan`` for a forced or free direction.
      structured: ``structured(sweep) -> closed jaxpr`` (or a ``_methods.Traced``) of that structured
        sweep's program (``None``: not a candidate).
      only_structured: choose between the two structured sweeps only (a sweep
        that raises is then no candidate, and none is a ``ValueError``).
      sweeps: the order the structured sweeps are traced in (``Context.sweeps``).

    Raises:
      _trust.AnalysisError: an analysis failed (not with ``only_structured``); the
        caller falls back to :func:`dense`.
    """
    ctx = context(closed, n, m, detect=detect, color=color, sweep=structured,
                  only="structured" if only_structured else None, sweeps=sweeps)
    return rank(ctx)


def dense(closed, n: int, m: int, reason: str, certificate=None, mode: str | None = None) -> JacobianPlan:
    """The dense plan, chosen from the shapes and the directions JAX can differentiate in, no cost model.

    The fallback where an analysis or a certificate failed: it reads nothing but
    the primitives' names (:func:`dense_mode`), unless ``mode`` is given.
    """
    mode = mode or dense_mode(closed, n, m)
    passes = n if mode == "fwd" else m
    return JacobianPlan("dense", mode, passes, n, m, None, {}, reason,
                        certificate=certificate if certificate is not None else _trust.NOT_NEEDED,
                        candidate=Candidate(_methods.DENSE, mode, passes, 0.0))


def dense_mode(closed, n: int, m: int) -> str:
    """The dense method's direction: the one JAX can take, else the fewer passes (square: the dense method's tie)."""
    try:
        one = forced(closed) or (_methods.dense.SQUARE_MODE if n == m else None)
    except Exception:  # noqa: BLE001 - the fallback must not fail: the run falls back between directions too
        one = None
    return one or ("fwd" if n < m else "rev")


def forced(closed) -> str | None:
    """The one direction JAX can differentiate ``closed`` in, or ``None`` where both are open."""
    return _methods.single(_methods.directions(differentiated(closed)))
