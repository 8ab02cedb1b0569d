"""Which pairs of inputs interact nonlinearly: the Hessian sparsity lattice.

A :class:`HessianLattice` carries the first-order sets of the dependency
lattice (:class:`Deps`, computed by the same rules) and, on the side, a
global set of input pairs ``(i, j)`` that meet in a nonlinear operation: the
Hessian of the output can be nonzero only at such pairs (every second
derivative of a composition is a sum of terms, each from one operation's own
second derivative, sections 5.7-5.8). Conservative and symmetric by
construction. Per primitive family:

- linear (add, reshapes, slices, sums, products with a constant, ...): no pairs;
- piecewise linear (abs, max, min, sort, floor, ...): no pairs (JAX's second
  derivative is zero almost everywhere, and so is the Hessian it returns);
- bilinear (``mul``, ``dot_general``, convolutions with both operands varying):
  the pairs across the two operands' sets (``x_i * x_j`` -> (i, j), (j, i));
- ``div``: across the operands and within the divisor's sets;
- every other nonlinear op (``sin``, ``exp``, ``x ** 2``, factorisations,
  custom rules, primitives without a rule): all pairs within each element's
  set (``tanh(x1 + x2)`` -> {1, 2} x {1, 2}).
"""

import numpy as np

from . import DepsLattice, _elementwise, _linalg, _movement, _reductions
from ._sets import Deps, TooDense, broadcast_to, union, unique

LINEAR = (
    set(_movement.RULES)
    | {"add", "add_any", "sub", "neg", "convert_element_type", "reduce_precision", "copy", "copy_p", "real",
       "imag", "complex", "conj", "reduce_sum", "cumsum", "select_n", "optimization_barrier", "transpose",
       "stop_gradient"}
)
PIECEWISE_LINEAR = {"abs", "max", "min", "clamp", "rem", "sort", "top_k", "reduce_max", "reduce_min", "cummax",
                    "cummin", "argmax", "argmin", "sign", "floor", "ceil", "round"} | set(_elementwise.ZERO)
BILINEAR = {"mul", "dot_general", "conv_general_dilated"}


class HessianLattice(DepsLattice):
    """First-order sets, plus the input pairs that interact nonlinearly (in ``self.pairs``)."""

    name = "jacobians Hessian sparsity detection"

    def __init__(self, n: int, max_nnz: int | None = None):
        super().__init__(n, max_nnz)
        self._pairs: list[np.ndarray] = []  # int64 keys i * n + j

    def fresh(self, n: int) -> DepsLattice:
        # Custom rules' local first-order patterns need no pairs.
        return DepsLattice(n)

    def pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """The symmetric set of interacting pairs, as sorted ``(rows, cols)``."""
        n = max(self.n, 1)
        keys = unique(np.concatenate(self._pairs + [np.zeros(0, np.int64)]))
        self._pairs = [keys]
        return np.divmod(keys, n)

    # --- pair accumulation -------------------------------------------------------------------
    def _add_within(self, d: Deps) -> None:
        """Every element's set with itself: (i, j) for i, j in S_e."""
        if not d.nnz:
            return
        lens = np.diff(d.indptr)
        sq = lens * lens
        total = int(sq.sum())
        if self.max_nnz is not None and total > 16 * self.max_nnz:
            raise TooDense("hessian pairs")
        base = np.repeat(d.indptr[:-1], sq)
        within = np.arange(total) - np.repeat(np.cumsum(sq) - sq, sq)
        width = np.repeat(lens, sq)
        a = d.indices[base + within // np.maximum(width, 1)]
        b = d.indices[base + within % np.maximum(width, 1)]
        self._pairs.append(unique(a * max(self.n, 1) + b))
        self._compact()

    def _add_across(self, a: Deps, b: Deps) -> None:
        """Same-position sets of two same-shaped values, crossed both ways."""
        if not (a.nnz and b.nnz):
            return
        la, lb = np.diff(a.indptr), np.diff(b.indptr)
        cnt = la * lb
        total = int(cnt.sum())
        rep = np.repeat(np.arange(a.size), cnt)
        k = np.arange(total) - np.repeat(np.cumsum(cnt) - cnt, cnt)
        lbr = np.maximum(lb[rep], 1)
        i = a.indices[a.indptr[rep] + k // lbr]
        j = b.indices[b.indptr[rep] + k % lbr]
        n = max(self.n, 1)
        self._pairs.append(unique(np.concatenate([i * n + j, j * n + i])))
        self._compact()

    def _compact(self) -> None:
        if len(self._pairs) > 64:
            self._pairs = [unique(np.concatenate(self._pairs))]

    def _union_all(self, ins) -> Deps:
        cols = unique(np.concatenate([d.indices for d in ins] + [np.zeros(0, np.int64)]))
        return Deps((1,), np.array([0, cols.size], np.int64), cols)

    # --- the rule table: first order from the parent, then the pairs ------------------------
    def default(self, eqn, ins: list) -> list[Deps]:
        outs = super().default(eqn, ins)
        self.second_order(eqn, ins, outs)
        return outs

    def second_order(self, eqn, ins: list, outs: list) -> None:
        """Record the pairs ``eqn`` makes interact, given its operands' and results' first-order sets."""
        name = eqn.primitive.name
        if name in LINEAR or name in PIECEWISE_LINEAR:
            return
        if name == "integer_pow" and eqn.params["y"] in (0, 1):
            return
        if name == "mul" or name == "div":
            shape = eqn.outvars[0].aval.shape
            a, b = (broadcast_to(d, shape) for d in ins)
            self._add_across(a, b)
            if name == "div":
                self._add_within(b)
            return
        if name in BILINEAR:
            lhs, rhs = ins
            if lhs.nnz and rhs.nnz:  # conservative: across the operands' unions
                self._add_across(self._union_all([lhs]), self._union_all([rhs]))
            return
        if name in _reductions.CUMULATIVE or name in ("reduce_prod",) or name in _linalg.BATCHED_DENSE:
            self._add_within(self._union_all(ins))
            return
        if name in _elementwise.NAMES or name in ("integer_pow", "pow"):
            shape = eqn.outvars[0].aval.shape
            parts = [broadcast_to(d, shape) for d in ins if d.nnz]
            self._add_within(union(parts, shape, self.n))
            return
        # Custom rules, primitives without a rule: all pairs within each result element's set.
        for o in outs:
            self._add_within(o)


def _wrap(rule):
    def rule2(lat, eqn, ins):
        outs = rule(lat, eqn, ins)
        if isinstance(lat, HessianLattice):
            lat.second_order(eqn, ins, outs)
        return outs

    rule2.__doc__ = rule.__doc__
    return rule2


HessianLattice.rules = {name: _wrap(rule) for name, rule in DepsLattice.rules.items()}

