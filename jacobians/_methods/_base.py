"""The engine seam: what a Jacobian method is, what the planner gives it, and what it returns.

A :class:`Method` has a host-side half and a traced half, as lineax's solvers do:

- ``candidates(ctx)`` (host, at trace time, on abstract values): the ways this
  method could compute the Jacobian of the flat map ``R^n -> R^m`` described by
  the :class:`Context`, each a frozen :class:`Candidate` with its estimated
  cost (FLOPs, the planner's one unit) and whatever state its evaluation needs
  (a colouring, for the compressed method). A method may return none (it
  cannot apply, or cannot beat ``ctx.best``), and stops analysing as soon as
  it cannot win;
- ``evaluate(cand, call)`` (traced, inside the call's ``jax.jit``): the
  Jacobian, as the flat ``(m, n)`` matrix or already cut into the blocks
  (:class:`Blocks`);
- ``certify(cand, traced_flat, values, where, computed)`` (host): the candidate checked
  against JAX's own JVPs/VJPs at a random point (:mod:`jacobians._trust`), or
  ``None`` when the method is JAX's own derivative (dense) and needs none.

The planner (:mod:`jacobians._planner`) asks every registered method
(:data:`jacobians._methods.METHODS`) in order, keeps the cheapest candidate
(a method with ``margin < 1`` must beat the others by that factor), and
returns it inside the :class:`JacobianPlan`.
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import jax

from .. import _compat, _walker
from .._cost import pass_cost as pass_cost

Mode = Literal["fwd", "rev"]
MethodName = Literal["auto", "dense", "compressed", "structured"]  # jacobian(method=...)

# JAX cannot push JVPs through a custom_vjp, nor pull VJPs through a while_loop (a dynamic trip count), a
# window-dilated max-pool, a custom_linear_solve without transpose_solve or a custom_vmap (JAX 0.10:
# "Linearization failed to produce known values").
NO_FWD = frozenset({"custom_vjp_call", "custom_vjp_call_jaxpr"})
NO_REV = frozenset({"while"}) | _walker.BARS_REVERSE


def directions(primitives: set[str]) -> frozenset[str]:
    """The directions JAX can differentiate a jaxpr in, from the primitives it differentiates there.

    ``primitives``: :func:`jacobians._walker.differentiated` of the jaxpr (custom rules' bodies left out).

    Both where neither is possible: the call itself then says why (see
    :func:`jacobians._args.with_fallback`).
    """
    fwd, rev = not (NO_FWD & primitives), not (NO_REV & primitives)
    if not fwd and not rev:
        return frozenset({"fwd", "rev"})
    return frozenset(d for d, ok in (("fwd", fwd), ("rev", rev)) if ok)


def single(allowed: frozenset) -> Mode | None:
    """The one direction in ``allowed`` (:func:`directions`), or ``None`` where both are open."""
    return next(iter(allowed)) if len(allowed) == 1 else None


@dataclass(frozen=True)
class Candidate:
    """One way to compute the Jacobian, with its estimated cost.

    Attributes:
      method: the :class:`Method` that made it (and evaluates it).
      mode: ``"fwd"`` (from the inputs) or ``"rev"`` (from the outputs).
      passes: JVPs/VJPs (or sweeps) it pushes.
      cost: the estimate, in FLOPs.
      state: what :meth:`Method.evaluate` needs (a :class:`jacobians.SparsePlan`, ...).
      nnz: entries of the detected pattern, where the method detected one.
      note: one line for :func:`jacobians.explain`.
    """

    method: "Method"
    mode: Mode
    passes: int
    cost: float
    state: Any = field(default=None, repr=False, compare=False)
    nnz: int | None = None
    note: str = ""

    @property
    def key(self) -> str:
        return f"{self.method.name} {self.mode}"


@dataclass
class Context:
    """What the planner knows about one call's flat map ``R^n -> R^m`` (host side).

    Attributes:
      closed: the flat map's closed jaxpr (inputs: the differentiated leaves).
      n, m: input and output sizes.
      f: the cost of one evaluation (:func:`jacobians._planner.pass_cost`).
      allowed: the directions JAX can differentiate in (:func:`directions`).
      detect: ``detect(max_nnz, columns=None) -> Detected`` (raises ``TooDense``), or ``None``.
      color: ``color(detected, mode) -> SparsePlan``, or ``None``.
      sweep: ``sweep(mode)``: a structured sweep's program (traced, not run): its closed jaxpr, or a
        :class:`Traced` ``(jac, aux)`` of the call's leaves that the method then evaluates; or ``None``.
      only: plan with this method alone (the caller fixed ``method=``), else ``None``.
      sweeps: the structured sweeps in the order they are traced (the second stops once it cannot
        beat the first): the one likelier to win first.
      best: the cost of the best candidate so far (a method stops once it cannot beat it).
      notes: what the methods found on the way, for the plan's reason.
    """

    closed: Any
    n: int
    m: int
    f: float
    allowed: frozenset
    detect: Callable | None = None
    color: Callable | None = None
    sweep: Callable | None = None
    only: str | None = None
    sweeps: tuple = ("fwd", "rev")
    best: float = float("inf")
    notes: list = field(default_factory=list)


@dataclass
class Call:
    """What a method's :meth:`Method.evaluate` gets, inside the call's trace.

    Attributes:
      problem: the call's :class:`jacobians._args.Problem`.
      chunk_size: at most this many basis vectors (colours, sweep columns) at a time, or ``None``.
      shards: split the basis vectors across devices (:class:`jacobians.kernels.Shards`), or ``None``.
      compressed: ``compressed() -> (m, n) Jacobian`` by the transformation's sparse engine.
      tree: the result may come back as the blocks (``Problem.tree_dense``: one real dtype, no chunking).
      leaves: the call's traced leaves (what a :class:`Traced` program takes).
    """

    problem: Any
    chunk_size: int | None = None
    shards: Any = None
    compressed: Callable | None = None
    tree: bool = False
    leaves: tuple = ()


@dataclass(frozen=True)
class Traced:
    """A program the planner traced to cost it, kept to be evaluated: tracing it again would cost as much.

    Attributes:
      closed: its closed jaxpr, of the call's traced leaves.
      shapes: its outputs' pytree of shape structs (for the tree to rebuild).
    """

    closed: Any
    shapes: Any

    def __call__(self, leaves):
        outs = _compat.jaxpr_as_fun(self.closed)(*leaves)
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(self.shapes), outs)


class Blocks:
    """A result already cut into the pytree of numerator-layout blocks (``Problem.tree_dense``)."""

    def __init__(self, tree):
        self.tree = tree


class Method(Protocol):
    """A way to compute Jacobians (see the module docstring)."""

    name: str  # "dense", "compressed", "structured": jacobian(method=...) selects it
    margin: float  # a candidate must cost below margin x the best other one (1: a plain minimum)

    def candidates(self, ctx: Context) -> list[Candidate]: ...

    def evaluate(self, cand: Candidate, call: Call) -> tuple[Any, Any]:
        """``(jacobian, aux)``: the ``(m, n)`` matrix or :class:`Blocks`, and ``fun``'s aux."""
        ...

    def certify(self, cand: Candidate, traced_flat: tuple, values, where: str, computed: Callable | None = None):
        """The :class:`jacobians._trust.Certificate`, or ``None`` where the method needs none.

        ``computed(point) -> (m, n)``, where given, is the plan's Jacobian at a point by the program the
        call compiled (:func:`jacobians._trust.linear`): check that instead of compiling the plan again.
        """
        ...
