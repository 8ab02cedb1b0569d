"""Which input entries each entry of each jaxpr variable may depend on: the sparsity lattice.

A :class:`DepsLattice` on the shared walker (:mod:`jacobians._walker`): each
variable carries, per element, the set of input indices it may depend on
(:class:`Deps`, a CSR boolean matrix ``(size, n_inputs)``), plus its value
when known at trace time. Conservative (never drops an entry that can be
nonzero for some input) and exact on the common structured cases. Integer,
boolean and key values carry no derivative and so no dependencies.

The rules live in one file per primitive family: ``_elementwise``,
``_movement`` (reshapes, slices, gathers, scatters), ``_reductions``
(reductions, cumulative ops, sorts), ``_linalg`` (``dot_general``,
factorisations), ``_conv`` and ``_custom`` (``custom_jvp`` / ``custom_vjp``).
Control flow and nested jaxprs are the walker's.
"""

import contextlib
import dataclasses
import math
import warnings
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from .._walker import Lattice, Walker
from . import _bounds, _conv, _custom, _elementwise, _linalg, _movement, _reductions
from ._sets import (
    Deps,
    TooDense,
    broadcast_to,
    concat,
    empty,
    everything,
    gather,
    identity,
    limited,
    reduce_to,
    union,
    unique,
)

RULES = {}
for _family in (_elementwise, _movement, _reductions, _linalg, _conv, _custom):
    RULES.update(_family.RULES)


def _with_bounds(rule):
    """``rule``, its integer results given the bounds of their values (:mod:`._bounds`)."""

    def bounded(lat, eqn, ins):
        return lat.with_bounds(eqn, ins, rule(lat, eqn, ins))

    bounded.__doc__ = rule.__doc__
    return bounded


RULES = {name: _with_bounds(rule) if name in _bounds.RULES else rule for name, rule in RULES.items()}


def _same_bounds(a, b) -> bool:
    if a is None or b is None:
        return a is b
    return np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def _equal(a, b) -> bool:
    if a is None or b is None:
        return a is b
    return a.shape == b.shape and a.dtype == b.dtype and bool(np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"))


class DepsLattice(Lattice):
    """Dependency sets over ``n`` inputs; ``max_nnz`` bounds every set's total size (else :class:`TooDense`)."""

    name = "jacobians sparsity detection"
    rules = RULES

    def __init__(self, n: int, max_nnz: int | None = None):
        self.n = int(n)
        self.max_nnz = max_nnz
        self.cache: dict = {}  # per-equation results of expensive rules (custom rules)
        self.untraced: set[str] = set()  # custom rules that could not be traced

    def fresh(self, n: int) -> "DepsLattice":
        """A lattice of the same kind over ``n`` other inputs (custom rules' local patterns)."""
        sub = DepsLattice(n)
        sub.untraced = self.untraced
        return sub

    def constant(self, value, aval) -> Deps:
        return empty(aval.shape, value)

    def value(self, v: Deps):
        return v.const

    def is_inert(self, v: Deps) -> bool:
        return not v.nnz and v.bounds is None  # (bounds reach the index operands they narrow, through calls)

    def forget(self, v: Deps) -> Deps:
        return Deps(v.shape, v.indptr, v.indices)  # (a loop carry's value and bounds: the loop's, unknown)

    def join(self, vals: Sequence[Deps], aval) -> Deps:
        out = union(list(vals), aval.shape, self.n)
        first = vals[0].const
        if first is not None and all(_equal(first, v.const) for v in vals[1:]):
            out.const = first
        else:
            ivs = [_bounds.interval(v) for v in vals]
            if all(b is not None for b in ivs) and aval.shape == tuple(np.shape(ivs[0][0])):
                out.bounds = (np.min([b[0] for b in ivs], axis=0), np.max([b[1] for b in ivs], axis=0))
        return out

    def same(self, a: Deps, b: Deps) -> bool:
        return (
            a.shape == b.shape
            and np.array_equal(a.indptr, b.indptr)
            and np.array_equal(a.indices, b.indices)
            and _equal(a.const, b.const)
            and _same_bounds(a.bounds, b.bounds)
        )

    def index(self, v: Deps, i: int, aval) -> Deps:
        per = math.prod(aval.shape)
        out = gather(v, (i * per + np.arange(per)).reshape(aval.shape))
        out.const = None if v.const is None else np.asarray(v.const)[i]
        return out

    def stack(self, vals: Sequence[Deps], aval) -> Deps:
        out = concat(list(vals)).with_shape(aval.shape)
        if vals and all(v.const is not None for v in vals):
            out.const = np.stack([v.const for v in vals])
        return out

    def collapse(self, v: Deps, aval) -> Deps:
        per = max(math.prod(aval.shape), 1)
        return reduce_to(v, np.arange(v.size) % per, aval.shape, self.n)

    def spread(self, v: Deps, aval) -> Deps:
        return broadcast_to(v.with_shape((1,) + v.shape), aval.shape)

    def default(self, eqn, ins) -> list[Deps]:
        return [everything(ins, v.aval.shape) for v in eqn.outvars]

    def skip(self, eqn, ins: list) -> list[Deps]:
        return self.with_bounds(eqn, ins, super().skip(eqn, ins))  # index arithmetic: its values' bounds

    def post(self, eqn, outs: list[Deps]) -> list[Deps]:
        # Integer, boolean and key results have no derivative (folded values are kept), only bounds.
        res = []
        for o, v in zip(outs, eqn.outvars, strict=True):
            if o.nnz and not jnp.issubdtype(v.aval.dtype, jnp.inexact):
                o, had = empty(v.aval.shape, o.const), o
                o.bounds = had.bounds
            if self.max_nnz is not None and o.nnz > self.max_nnz:
                raise TooDense(eqn.primitive.name)
            res.append(o)
        return res

    def with_bounds(self, eqn, ins: list, outs: list[Deps]) -> list[Deps]:
        """``outs`` with the bounds of their integer values (copies: a rule may return an operand itself)."""
        if not any(o.const is None for o in outs):
            return outs
        return [dataclasses.replace(o, bounds=b) if b is not None and o.const is None else o
                for o, b in zip(outs, _bounds.bounds(eqn, ins), strict=True)]

    def scope(self):
        # An operation's intermediate stops before it is built, not after. A lattice without a budget of
        # its own (a custom rule's local pattern, walked inside a budgeted walk) keeps the outer one.
        return limited(self.max_nnz) if self.max_nnz is not None else contextlib.nullcontext()

    def check(self, v: Deps, aval) -> str | None:
        if not isinstance(v, Deps):
            return f"expected Deps, got {type(v).__name__}"
        if tuple(v.shape) != tuple(aval.shape):
            return f"shape {v.shape}, expected {tuple(aval.shape)}"
        if v.indptr.shape != (v.size + 1,) or v.indptr[0] != 0 or v.indptr[-1] != v.indices.size:
            return f"{v.indptr.size - 1} element sets for {v.size} elements"
        if v.indices.size and (v.indices.min() < 0 or v.indices.max() >= self.n):
            return f"an input index outside [0, {self.n})"
        return None


def detect(closed, seeds: Sequence[Deps], n: int, *, where: str, max_nnz: int | None = None):
    """Walk ``closed`` with the given input sets.

    Args:
      closed: a ``ClosedJaxpr``.
      seeds: one :class:`Deps` per jaxpr input (``identity`` for the inputs to
        differentiate, ``empty`` for the others).
      n: the number of inputs (columns).
      where: the public call, for the warning about primitives without a rule.
      max_nnz: stop with :class:`TooDense` once a value holds more entries.

    Returns:
      ``(outs, walker)``: one :class:`Deps` per jaxpr output, and the walker
      (``walker.seen``: every primitive met).
    """
    lat = DepsLattice(n, max_nnz)
    walker = Walker(lat)
    outs = walker.run(closed, list(seeds))
    missing = sorted(walker.unknown | lat.untraced)
    if missing:
        warnings.warn(
            f"{where}: no sparsity rule for {', '.join(repr(m) for m in missing)}; assuming each output of "
            "those depends on all of their inputs (the pattern stays correct, maybe denser).",
            stacklevel=3,
        )
    return outs, walker


__all__ = ["Deps", "DepsLattice", "TooDense", "Walker", "detect", "empty", "identity", "union", "unique"]
