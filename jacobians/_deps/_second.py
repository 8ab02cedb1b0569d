"""Which pairs of inputs interact nonlinearly: the Hessian sparsity lattice.

A :class:`HessianLattice` carries the first-order sets of the dependency
lattice (:class:`Deps`, computed by the same rules) and, on the side, the input
pairs ``(i, j)`` that meet in a nonlinear operation. The Hessian of a scalar
``y`` of a composition is a sum of one term per operation ``z = g(u)``:
``sum_e dy/dz_e * J_u^T (d^2 g_e / du^2) J_u`` (sections 5.7-5.8). A term can
be nonzero only at the pairs of ``g``'s own second derivative, mapped through
its operands' sets, and only when ``z`` reaches ``y`` with a possibly nonzero
derivative. So each operation's pairs are recorded on a node of a graph whose
edges say which values reach which; at the end only the pairs of nodes that
reach the output count (``0 * x ** 2`` has no Hessian; nor has a value that only
feeds ``floor``, a comparison, or an integer). Where a known constant masks some
elements (``c * x ** 2`` with zeros in ``c``, a ``dot`` with such a ``c``, a
``where`` with a known predicate), the node behind it passes on only pairs with
an input that its surviving elements still read: ``H[i, j]`` is the derivative
of ``dy/dx_i``, nonzero only through elements whose first-order sets hold
``i`` all the way to the output (and the output's own set bounds them all). Conservative and symmetric by
construction. Per primitive family (the claims that depend on the dtype or the
parameters are checked per equation):

- linear (add, data movement, gathers, scatters that set or add, ``select_n``,
  sums, real and imaginary parts, conversions, ``fft``, ...): no pairs;
- piecewise linear (max, min, clamp, sorts, ``reduce_max``, ``scatter-min``,
  and ``abs`` of *real* values; JAX's second derivative is zero there) and
  primitives with a zero derivative (``floor``, ``sign``, comparisons): no pairs.
  ``abs`` of a complex value, ``|a + ib| = sqrt(a^2 + b^2)``, is not piecewise linear;
- bilinear: ``mul`` (the same-position sets crossed), ``dot_general`` (crossed
  per batch and contracted position: only elements that multiply meet),
  ``conv_general_dilated`` with both operands varying (the unions crossed),
  ``scatter-mul`` (the operand crossed with the updates that land on it);
- ``div``: across the operands and within the divisor's sets;
- ``x ** y`` with ``y`` in {0, 1}: none;
- custom rules: JAX differentiates the rule itself, so the pairs are the
  rule's (see :func:`jacobians._deps._custom.local_pairs`);
- every other nonlinear op (``sin``, ``exp``, ``abs`` of complex,
  ``reduce_prod``, ``cumprod``, factorisations, primitives without a rule):
  all pairs within each element's set (``tanh(x1 + x2)`` -> {1, 2} x {1, 2}).
"""

import hashlib

import jax.numpy as jnp
import numpy as np

from .. import _primitives
from . import DepsLattice, _custom, _elementwise, _linalg, _movement
from ._sets import Deps, TooDense, broadcast_to, concat, cross, empty, gather, identity, mask, reduce_to, union, unique

# No second derivative: the catalogue's linear and piecewise linear primitives (``abs`` only on real operands:
# :meth:`HessianLattice.second_order` checks the dtype first; other lattices reading these sets must too).
LINEAR = set(_primitives.LINEAR)
PIECEWISE_LINEAR = set(_primitives.PIECEWISE_LINEAR)
SCATTER_MUL = ("scatter-mul", "scatter_mul")
MASKS = ("mul", "dot_general", "select_n")  # a known operand may zero some result elements (their sets dropped)
STORE_MAX = 1 << 25  # stored pair keys before the graph is given up (every pair then counts)


def _node(d: Deps) -> int | None:
    return getattr(d, "node", None)


def _copy(d: Deps) -> Deps:
    return Deps(d.shape, d.indptr, d.indices, d.const)


def _is_complex(aval) -> bool:
    return jnp.issubdtype(aval.dtype, jnp.complexfloating)


class HessianLattice(DepsLattice):
    """First-order sets, plus the input pairs that interact nonlinearly (read with :meth:`pairs`).

    A value that may carry second derivatives has a ``node``; nodes hold the
    pairs their equation created and point to the nodes of the operands that
    reach them. Values without a node carry no pairs.
    """

    name = "jacobians Hessian sparsity detection"

    def __init__(self, n: int, max_nnz: int | None = None):
        super().__init__(n, max_nnz)
        self._parents: list[tuple[int, ...]] = []  # node -> the nodes that reach it
        self._chunks: list[tuple[int, int]] = []  # (node, array id)
        self._arrays: list[np.ndarray] = []  # distinct pair-key arrays (loop bodies repeat theirs)
        self._ids: dict[bytes, int] = {}
        self._always: list[np.ndarray] = []  # pairs that count whatever reaches the output
        self._stored = 0
        self._filters: dict[int, np.ndarray] = {}  # node -> the inputs its (masked) elements still read

    def fresh(self, n: int) -> DepsLattice:
        # Custom rules' local patterns are first-order walks.
        sub = DepsLattice(n)
        sub.untraced = self.untraced
        return sub

    # --- the graph ---------------------------------------------------------------------------
    def _new_node(self, parents, keys: np.ndarray | None = None) -> int | None:
        parents = tuple(sorted({p for p in parents if p is not None}))
        has_keys = keys is not None and keys.size > 0
        if not has_keys:
            if not parents:
                return None
            if len(parents) == 1:
                return parents[0]  # the same reach as its only parent
        node = len(self._parents)
        self._parents.append(parents)
        if has_keys:
            digest = hashlib.blake2b(keys.tobytes(), digest_size=16).digest()
            idx = self._ids.get(digest)
            if idx is None:
                idx = self._ids[digest] = len(self._arrays)
                self._arrays.append(keys)
                self._stored += keys.size
            self._chunks.append((node, idx))
            if self._stored > STORE_MAX:  # give up reach for memory: every pair recorded so far counts
                self._always = [unique(np.concatenate(self._always + self._arrays))]
                self._arrays, self._ids, self._chunks, self._stored = [], {}, [], 0
        return node

    def _link(self, out: Deps, srcs, keys: np.ndarray | None = None) -> Deps:
        """Give ``out`` a node reached from ``srcs``'s nodes (and holding ``keys``), if it can carry pairs."""
        if not out.nnz:
            return out
        node = self._new_node([_node(s) for s in srcs if s.nnz], keys)
        if node is None:
            return out
        if any(out is s for s in srcs) or _node(out) is not None:
            out = _copy(out)
        out.node = node
        return out

    def _filtered(self, node: int, outs: list) -> int:
        """A node after ``node`` that passes on only pairs of inputs that ``outs``' elements read."""
        sets = [o.indices for o in outs if o.nnz]
        reads = unique(np.concatenate(sets)) if sets else np.zeros(0, np.int64)
        filtered = len(self._parents)
        self._parents.append((node,))
        self._filters[filtered] = reads
        return filtered

    def _live(self, outs) -> list:
        """Per node: the inputs whose pairs recorded there may reach ``outs`` (``True``: all; ``None``: none).

        Backwards over the graph (parents are older than their children): a node
        passes on to its parents what reaches it, cut down by its own filter.
        """
        live: list = [None] * len(self._parents)
        if outs is None:
            return [True] * len(self._parents)
        def merge(a, b):
            if a is None or a is b or b is True:
                return b
            if a is True or b is None:
                return a
            u = np.union1d(a, b)
            return True if u.size >= self.n else u

        for o in outs:
            m = _node(o)
            if m is not None:  # the output's own first-order set bounds its Hessian's pairs
                reads = unique(o.indices)
                live[m] = merge(live[m], True if reads.size >= self.n else reads)
        for m in range(len(self._parents) - 1, -1, -1):
            here = live[m]
            if here is None:
                continue
            f = self._filters.get(m)
            if f is not None:
                here = live[m] = f if here is True else np.intersect1d(here, f, assume_unique=True)
            for p in self._parents[m]:
                live[p] = merge(live[p], here)
        return live

    def pairs(self, outs=None) -> tuple[np.ndarray, np.ndarray]:
        """The symmetric set of interacting pairs, as sorted ``(rows, cols)``.

        Args:
          outs: the lattice values of the function's outputs; only pairs of
            nodes that reach them count, and of those only pairs of inputs that
            the output and every masking node on the way read. ``None``: every
            pair recorded.
        """
        n = max(self.n, 1)
        live = self._live(outs)
        parts = []
        for node, idx in sorted(set(self._chunks)):
            reads = live[node]
            if reads is None:
                continue
            keys = self._arrays[idx]
            if reads is not True:
                i, j = np.divmod(keys, n)
                # H[i, j] = d(dy/dx_i)/dx_j needs dy/dx_i, so i in the first-order sets; j need not be (a
                # custom rule's derivative may read inputs its own first-order set lacks): one end suffices.
                keys = keys[np.isin(i, reads) | np.isin(j, reads)]
            parts.append(keys)
        keys = unique(np.concatenate(parts + self._always + [np.zeros(0, np.int64)]))
        return np.divmod(keys, n)

    # --- pair sets ---------------------------------------------------------------------------
    def _budget(self, total: int) -> None:
        if self.max_nnz is not None and total > 16 * self.max_nnz:
            raise TooDense("hessian pairs")

    def _within(self, d: Deps) -> np.ndarray:
        """Every element's set with itself: keys of (i, j) for i, j in S_e."""
        lens = np.diff(d.indptr)
        self._budget(int((lens * lens).sum()))
        i, j = cross(d, d)
        return unique(i * max(self.n, 1) + j)

    def _across(self, a: Deps, b: Deps) -> np.ndarray:
        """Same-element sets of two values with as many elements, crossed both ways."""
        self._budget(int((np.diff(a.indptr) * np.diff(b.indptr)).sum()))
        i, j = cross(a, b)
        n = max(self.n, 1)
        return unique(np.concatenate([i * n + j, j * n + i]))

    def _union_all(self, d: Deps) -> Deps:
        cols = unique(d.indices)
        return Deps((1,), np.array([0, cols.size], np.int64), cols)

    # --- the rule table: first order from the parent, then the pairs ------------------------
    def join(self, vals, aval) -> Deps:
        return self._link(super().join(vals, aval), vals)

    def forget(self, v: Deps) -> Deps:
        return self._link(super().forget(v), [v])

    def index(self, v: Deps, i: int, aval) -> Deps:
        return self._link(super().index(v, i, aval), [v])

    def stack(self, vals, aval) -> Deps:
        return self._link(super().stack(vals, aval), vals)

    def collapse(self, v: Deps, aval) -> Deps:
        return self._link(super().collapse(v, aval), [v])

    def spread(self, v: Deps, aval) -> Deps:
        return self._link(super().spread(v, aval), [v])

    def default(self, eqn, ins: list) -> list[Deps]:
        return self.finish(eqn, ins, super().default(eqn, ins))

    def finish(self, eqn, ins: list, outs: list) -> list[Deps]:
        """Record ``eqn``'s pairs on a node that its results point to, reached from the operands that reach them."""
        if not any(o.nnz for o in outs):
            return outs  # constant results: no derivative reaches the output through them
        keys = self.second_order(eqn, ins, outs)
        srcs = [d for k, d in enumerate(ins) if d.nnz and self._reaches(eqn, ins, k)]
        node = self._new_node([_node(d) for d in srcs], keys)
        if node is None:
            return outs
        if eqn.primitive.name in MASKS and any(not d.nnz and d.const is not None and not np.all(d.const)
                                               for d in ins):
            node = self._filtered(node, outs)  # a known zero (or predicate) dropped some elements' sets
        res = []
        for o in outs:
            if o.nnz:
                if any(o is d for d in ins) or _node(o) is not None:
                    o = _copy(o)
                o.node = node
            res.append(o)
        return res

    def _reaches(self, eqn, ins: list, k: int) -> bool:
        """Whether operand ``k`` may reach a result with a nonzero derivative."""
        if eqn.primitive.name == "select_n" and k > 0 and ins[0].const is not None:
            return bool(np.any(np.asarray(ins[0].const) == k - 1))  # a known predicate never picks this case
        return True

    def second_order(self, eqn, ins: list, outs: list) -> np.ndarray | None:
        """The pair keys ``i * n + j`` that ``eqn``'s own second derivative may make nonzero (``None``: none)."""
        name = eqn.primitive.name
        shape = eqn.outvars[0].aval.shape
        if name == "abs":  # |x| is piecewise linear on reals; |a + ib| = sqrt(a^2 + b^2) is not
            return self._within(ins[0]) if _is_complex(eqn.invars[0].aval) else None
        if (name in LINEAR or name in PIECEWISE_LINEAR) and not _primitives.applies_function(eqn):
            return None
        if name == "integer_pow":
            return None if eqn.params["y"] in (0, 1) else self._within(ins[0])
        if name == "pow":
            base, expo = ins
            if not expo.nnz and expo.const is not None and np.all(np.isin(np.asarray(expo.const), (0, 1))):
                return None  # x ** 1, x ** 0
        if name in ("mul", "div"):
            a, b = (broadcast_to(d, shape) for d in ins)
            keys = self._across(a, b) if a.nnz and b.nnz else None
            if name == "div" and b.nnz:
                keys = self._within(b) if keys is None else unique(np.concatenate([keys, self._within(b)]))
            return keys
        if name == "dot_general":
            lhs, rhs = ins
            if not (lhs.nnz and rhs.nnz):
                return None
            # Only elements that share a batch and contracted position multiply.
            lk, rk, g = _linalg.contraction_groups(lhs.shape, rhs.shape, eqn.params["dimension_numbers"])
            return self._across(reduce_to(lhs, lk, (g,), self.n), reduce_to(rhs, rk, (g,), self.n))
        if name == "conv_general_dilated":
            lhs, rhs = ins
            return self._across(self._union_all(lhs), self._union_all(rhs)) if lhs.nnz and rhs.nnz else None
        if name in SCATTER_MUL:
            return self._scatter_mul(eqn, ins)
        if name in _custom.RULES:
            try:
                li, lj = _custom.local_pairs(self, eqn)
            except Exception:  # noqa: BLE001 - an untraceable rule (first order warned): all pairs within
                return self._within_all(outs)
            diff = [ins[i] for i in _custom.diff_operands(eqn)]
            source = concat(diff) if diff else empty((0,))
            return self._across(gather(source, li), gather(source, lj))
        if name in _elementwise.NAMES or name in ("integer_pow", "pow"):
            return self._within(union([broadcast_to(d, shape) for d in ins if d.nnz], shape, self.n))
        if name in ("reduce_prod", "cumprod"):
            return self._product(eqn, ins[0], self._within_all(outs))
        # cumlogsumexp, factorisations, primitives without a rule: a result element is a nonlinear function
        # of the inputs in its set.
        return self._within_all(outs)

    def _product(self, eqn, operand: Deps, keys: np.ndarray) -> np.ndarray:
        """``keys`` of a product (``reduce_prod``, ``cumprod``) without the squares it cannot make.

        A product is linear in each factor: ``d^2 / dx_i^2`` of it is nonzero only where ``x_i``
        reaches two factors of one product (a factor's own curvature is its own equation's).
        Example: ``prod([{0}, {1}])`` -> (0, 1), (1, 0); ``prod([{0}, {0, 1}])`` keeps (0, 0).
        """
        shape, n = operand.shape, max(self.n, 1)
        axes = eqn.params["axes"] if eqn.primitive.name == "reduce_prod" else (eqn.params["axis"],)
        keep = [d for d in range(len(shape)) if d not in axes]
        grid = np.indices(shape).reshape(len(shape), operand.size)  # (a 0-d or empty operand too)
        group = (np.ravel_multi_index(tuple(grid[d] for d in keep), [shape[d] for d in keep]) if keep
                 else np.zeros(grid.shape[1], np.int64))  # the product (a cumprod's whole line) each factor is in
        pairs, counts = np.unique(group[operand.rows()] * n + operand.indices, return_counts=True)
        squared = np.unique(pairs[counts > 1] % n)
        i, j = keys // n, keys % n
        return keys[(i != j) | np.isin(i, squared)]

    def _within_all(self, outs: list) -> np.ndarray:
        return unique(np.concatenate([self._within(o) for o in outs] + [np.zeros(0, np.int64)]))

    def _scatter_mul(self, eqn, ins) -> np.ndarray:
        """``operand.at[i].mul(updates)``: each operand element crossed with the updates landing on it.

        Where several updates land on one element they multiply each other too.
        Example: [{0}, {1}, {2}].at[[0, 0]].mul([{3}, {4}]) -> (0, 3), (0, 4), (3, 4) and their mirrors.
        """
        operand, indices, updates = ins
        rule = _movement.RULES[eqn.primitive.name]
        (landed,) = rule(self.fresh(self.n), eqn, [empty(operand.shape), indices, updates])
        # The same scatter of the update *element numbers* counts the updates landing on each element.
        (numbers,) = rule(self.fresh(updates.size), eqn, [empty(operand.shape), indices, identity(updates.shape)])
        keys = [self._across(operand, landed)] if operand.nnz and landed.nnz else []
        several = np.diff(numbers.indptr) > 1
        if np.any(several):
            keys.append(self._within(mask(landed, several.reshape(landed.shape))))
        return unique(np.concatenate(keys + [np.zeros(0, np.int64)]))


def _wrap(rule):
    def rule2(lat, eqn, ins):
        outs = rule(lat, eqn, ins)
        if isinstance(lat, HessianLattice):
            outs = lat.finish(eqn, ins, outs)
        return outs

    rule2.__doc__ = rule.__doc__
    return rule2


HessianLattice.rules = {name: _wrap(rule) for name, rule in DepsLattice.rules.items()}
