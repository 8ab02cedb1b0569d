"""Structured accumulation: Jacobians of layer chains at the closed-form floor.

``jax.jacfwd`` pushes the identity through the first layer as a dense product
(``W1 @ I``) and every elementwise derivative as a dense product; ``jacrev``
does the mirror image. For ``tanh(W2 tanh(W1 x))`` the closed form (the
chain rule (5.56) with the book's elementwise Jacobians) is
``diag(s2) W2 diag(s1) W1``: one matrix product. The two sweeps here reach it
by carrying each intermediate's Jacobian (forward) or the output's adjoint
(reverse) as a structure of :mod:`.structure`: zero, a scaled selection
(identity, diagonal, permutation, broadcast, slice, gather with constant
indices), or dense. A rule table on the shared walker maps each primitive to a
family of local derivatives, used by both sweeps:

- ``zero``: floor, sign, comparisons (derivative zero);
- ``linear``: add, sub, neg, copies, dtype conversions (partials +-1);
- ``elementwise``: partials from one JVP with a tangent of ones per operand
  (exact because the Jacobian is diagonal); ``custom_jvp`` functions whose
  rule is elementwise (relu, softplus) too, so the rule, not the primal, is
  differentiated;
- ``select``: movement primitives; the selection map is found on the host by
  applying the primitive to integer labels, so one rule covers reshape,
  transpose, broadcast, slice, pad, concatenate, gather, ... Selections
  compose for free; a reverse broadcast (a sum of columns) densifies;
- ``reduce_sum``: in reverse a broadcast of the adjoint, a selection;
- ``dot_general``: with an operand fully contracted, its local Jacobian is
  the other operand itself (transposed), so a selection becomes a column
  (row) scaling of it, not a product with the identity;
- anything else, control flow included: densify and apply the primitive's own
  JVP (``vmap`` over the Jacobian's columns) or VJP (over its rows), so every
  jaxpr works, ``custom_jvp``/``custom_vjp`` rules honoured.

The forward sweep is a staged lattice on the walker (values carry traced
primals and structures). The reverse sweep walks once forward recording the
equations that touch the input (a tape; nested jaxprs are inlined by the
walker), then accumulates adjoints over the tape backwards.
"""

import contextlib
import contextvars
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .. import _compat, _host_eval, _leaves, _primitives
from .._cost import eqn_cost
from .._deps import DepsLattice
from .._deps._custom import local_pattern
from .._walker import Lattice, Walker, bind, is_opaque
from . import structure as st

LABEL_MAX = (1 << 31) - 2  # integer labels of a selection map fit int32

ZERO = set(_primitives.ZERO)
LINEAR = _primitives.SIGNS
ELEMENTWISE = (set(_primitives.ELEMENTWISE) - set(LINEAR) - {"real", "imag", "complex", "conj"}
               ) | set(_primitives.PRODUCTS) | {"select_n"}
HOLOMORPHIC = _primitives.HOLOMORPHIC  # on complex values, multiplication by a complex number (abs, max: generic)
SELECT = _primitives.SELECTIONS


class SV:
    """A value in a sweep: its primal and (forward) its structured Jacobian, or (tape) whether it is active."""

    __slots__ = ("primal", "jac")

    def __init__(self, primal, jac=None):
        self.primal = primal
        self.jac = jac


def _inexact(aval) -> bool:
    return jnp.issubdtype(aval.dtype, jnp.inexact)


def _primals(eqn, ins) -> list:
    out = bind(eqn, [v.primal for v in ins])
    return list(out) if eqn.primitive.multiple_results else [out]


def _family(lat, eqn, ins) -> str:
    """Which local derivative applies to ``eqn`` given which operands are active."""
    name = eqn.primitive.name
    active = [i for i, v in enumerate(ins) if v.jac is not None]
    out = eqn.outvars[0].aval if len(eqn.outvars) == 1 else None
    if name in ZERO or not any(_inexact(v.aval) for v in eqn.outvars):
        return "zero"  # zero derivative, or integer results (argmax, iota arithmetic)
    if name == "select_n":
        # A known predicate: a selection. A traced one picks tangents (never multiplies them by 0,
        # which would turn an unselected branch's inf or NaN into NaN, as jax.jacfwd does not).
        return "select" if lat.value(ins[0]) is not None else "where"
    same_shape = out is not None and all(eqn.invars[i].aval.shape == out.shape for i in active)
    # Element-wise primitives broadcast size-1 axes (and scalars) of their operands.
    broadcasts = out is not None and all(_broadcastable(eqn.invars[i].aval.shape, out.shape) for i in active)
    pointwise = name in LINEAR or name in ELEMENTWISE or name == "custom_jvp_call"
    if pointwise and any(_is_complex(v) for v in (*eqn.invars, *eqn.outvars)):
        real_to_complex = name == "convert_element_type" and _is_complex(eqn.outvars[0])
        if name not in HOLOMORPHIC and not real_to_complex:
            return "generic"
    if name in LINEAR and broadcasts:
        return "linear"
    if name in ELEMENTWISE and broadcasts:
        return "elementwise"
    if name == "custom_jvp_call" and same_shape and len(active) == 1 and _diagonal_rule(lat, eqn):
        return "elementwise"
    if name in SELECT:
        return "select"
    if name == "reduce_sum":
        return "reduce_sum"
    if name == "dot_general":
        return "dot"
    return "generic"


def _is_complex(var) -> bool:
    return jnp.issubdtype(var.aval.dtype, jnp.complexfloating)


def _broadcastable(shape, out) -> bool:
    return len(shape) == 0 or (len(shape) == len(out) and all(a in (1, b) for a, b in zip(shape, out, strict=True)))


def _diagonal_rule(lat, eqn) -> bool:
    """The custom rule's Jacobian is diagonal (relu, softplus): each output reads only its own input."""
    hit = lat.diag_cache.get(id(eqn))
    if hit is not None and hit[0] is eqn:
        return hit[1]
    ok = False
    diff = [v for v in eqn.invars if _inexact(v.aval)]
    if len(diff) == 1 and len(eqn.outvars) == 1:
        try:
            (rows, cols), = local_pattern(DepsLattice(diff[0].aval.size), eqn)
            ok = rows.size == np.unique(rows).size and bool(np.array_equal(rows, cols))
        except Exception:  # noqa: BLE001 - an untraceable rule: use the generic JVP
            ok = False
    lat.diag_cache[id(eqn)] = (eqn, ok)
    return ok


def as_function(eqn, ins, active: list, outputs: list):
    """``eqn`` as a function of its ``active`` operands (the others fixed) returning ``outputs``; and their values."""
    # Folded operands are NumPy values; JAX passes arrays, and custom rules' Python may index them with
    # tracers (odeint's backward pass: ts[i]), which NumPy cannot.
    primals = [jnp.asarray(v.primal) if isinstance(v.primal, np.ndarray | np.generic) else v.primal for v in ins]

    def f(*vals):
        a = list(primals)
        for i, v in zip(active, vals, strict=True):
            a[i] = v
        out = bind(eqn, a)
        out = list(out) if eqn.primitive.multiple_results else [out]
        return [out[k] for k in outputs]

    return f, [jnp.asarray(primals[i]) for i in active]


def _partials(eqn, ins, active) -> list:
    """The diagonal partial derivative of an elementwise ``eqn`` in each active operand (one JVP of ones each)."""
    f, vary = as_function(eqn, ins, active, [0])
    return [jax.jvp(f, vary, [jnp.ones_like(v) if i == k else jnp.zeros_like(v) for i, v in zip(active, vary)])[1][0]
            for k in active]


def selection_map(lat, eqn, ins) -> tuple[list, list] | None:
    """Per output, ``pi`` with ``y[i] = cat(data operands)[pi[i]]`` (``-1``: a constant); the data operand positions."""
    data = [
        i for i, v in enumerate(eqn.invars) if _inexact(v.aval) and not (eqn.primitive.name == "select_n" and i == 0)
    ]
    sizes = [math.prod(eqn.invars[i].aval.shape) for i in data]
    if sum(sizes) > LABEL_MAX:
        return None
    args, off = [], 0
    for i, v in enumerate(ins):
        if i in data:
            shape = eqn.invars[i].aval.shape
            size = math.prod(shape)
            label = (
                np.arange(off + 1, off + size + 1, dtype=np.int32) if v.jac is not None else np.zeros(size, np.int32)
            )
            args.append(label.reshape(shape))
            off += size
        else:
            value = lat.value(v)
            if value is None:
                return None
            args.append(value)
    # A gather's fill is a constant (label 0), whatever its value: a fill of k would read as element k - 1.
    params = dict(eqn.params, fill_value=0) if "fill_value" in eqn.params else eqn.params
    # NumPy first (no XLA compilation per movement primitive), else the primitive itself.
    outs = _host_eval.evaluate(eqn.primitive.name, params, args, [np.dtype(np.int32)] * len(eqn.outvars))
    if outs is None:
        try:
            with jax.ensure_compile_time_eval():
                out = bind(eqn.replace(params=params), args)
        except Exception:  # noqa: BLE001 - a primitive that will not take integer labels: generic rule
            return None
        outs = out if eqn.primitive.multiple_results else [out]
    pis = []
    for o in outs:
        pi = np.array(o, dtype=np.int64)
        pi -= 1  # in place: a 0-d array stays an array
        pi[(pi < 0) | (pi >= off)] = -1
        pis.append(pi)
    return pis, data


def _dot_matrix(eqn, k: int, ins) -> jax.Array | None:
    """For ``y = dot_general`` with operand ``k`` fully contracted: ``dy/d(operand k)`` as ``(y.size, size_k)``."""
    axes = _dot_axes(eqn, k)
    if axes is None or axes[2]:  # batch axes, or operand k keeps free axes
        return None
    af, ac, _, bc = axes
    b_nd = len(eqn.invars[k].aval.shape)
    out = eqn.outvars[0].aval
    mat = jnp.transpose(jnp.asarray(ins[1 - k].primal), af + [ac[bc.index(d)] for d in range(b_nd)])
    return mat.reshape(math.prod(out.shape), math.prod(eqn.invars[k].aval.shape)).astype(out.dtype)


def _dot_axes(eqn, k: int):
    """Operand ``k`` (``b``) and the other (``a``) of a ``dot_general`` without batch axes, by axis role.

    Split into free and contracted axes (contracted axes paired in order): ``(af, ac, bf, bc)``, or ``None``.
    """
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    if lb or rb:
        return None
    bc, ac = (list(lc), list(rc)) if k == 0 else (list(rc), list(lc))
    a_nd, b_nd = len(eqn.invars[1 - k].aval.shape), len(eqn.invars[k].aval.shape)
    return [d for d in range(a_nd) if d not in ac], ac, [d for d in range(b_nd) if d not in bc], bc


class OverBudget(Exception):  # noqa: N818 - a signal to the planner, not an error
    """The sweep would materialise more entries than the planner's budget: it cannot win."""


# Entries of dense Jacobians (or adjoints) a sweep may still materialise while the planner traces it
# for its cost model; ``None``: unbounded (a sweep the caller asked for, or the one that runs).
_BUDGET: contextvars.ContextVar = contextvars.ContextVar("jacobians_structured_budget", default=None)


@contextlib.contextmanager
def budget(entries: float | None):
    """Trace sweeps that raise :class:`OverBudget` once their dense values exceed ``entries`` in all.

    Every entry of a dense intermediate Jacobian is at least one element operation of the
    generated program (the planner's unit), so a sweep over budget cannot beat the candidate
    that set it; stopping early keeps planning cheap (a 670k-parameter MLP's forward sweep
    would otherwise build index tables of 512 x 670k entries on the host just to be costed).
    """
    token = _BUDGET.set(None if entries is None else [float(entries)])
    try:
        yield
    finally:
        _BUDGET.reset(token)


def _charge(entries: float, spend: bool = True) -> None:
    """Count ``entries`` against the budget (``spend=False``: only check that they would fit)."""
    left = _BUDGET.get()
    if left is None:
        return
    if entries > left[0]:
        raise OverBudget(f"a structured sweep would materialise over {left[0]:.3g} more entries")
    if spend:
        left[0] -= entries


def _charge_dense(values) -> None:
    for a in values:
        if st.kind(a) == "dense" and hasattr(a, "size"):
            _charge(a.size)


def _row_inverse(idx: np.ndarray, other: int) -> np.ndarray | None:
    """``inv[r, c] = j`` where ``idx[r, j] == c`` (``-1``: none); ``None`` if a row repeats a ``c``."""
    r, j = np.nonzero(idx >= 0)
    c = idx[r, j]
    keys = r * other + c
    if np.unique(keys).size != keys.size:
        return None
    inv = np.full((idx.shape[0], other), -1, np.int64)
    inv[r, c] = j
    return inv


def _take_lines(mat: jax.Array, inv: np.ndarray, axis: int) -> jax.Array:
    """``mat``'s lines along ``axis`` at ``inv`` (a 1-D host array; ``-1``: a zero line)."""
    if inv.size == mat.shape[axis] and np.array_equal(inv, np.arange(inv.size)):
        return mat
    has = inv >= 0
    out = jnp.take(mat, jnp.asarray(np.where(has, inv, 0)), axis=axis)
    if has.all():
        return out
    mask = jnp.asarray(has).astype(mat.dtype)
    return out * (mask[None, :] if axis == 1 else mask[:, None])


def _per_line(inv: np.ndarray, has: np.ndarray) -> np.ndarray | None:
    """``g`` with ``inv[r, c] == g[c]`` wherever ``has[r, c]`` (``-1`` where no row has ``c``), else ``None``.

    Then ``take(A, inv)`` masked by ``has`` is ``take(A, g)`` broadcast over the rows times
    ``has``: one gather of a line per ``c`` instead of one per ``(r, c)`` (``R^T R``'s Jacobian
    is ``R``'s lines placed by a 0/1 pattern, as its closed form writes it).
    """
    g = inv.max(axis=0)
    return g if np.array_equal(np.where(has, inv, g[None, :]), np.broadcast_to(g, inv.shape)) else None


def _fw_dot_free(lat, eqn, k: int, ins):
    """Forward, operand ``k`` a selection with free axes: ``J[a, fb, c] = A[a, inv[fb, c]] scale[fb, inv[fb, c]]``.

    The product of a dense layer with per-example selections (``I (x) A``) needs no
    product: ``A``'s columns, gathered once per distinct row of the selection and scaled.
    """
    axes = _dot_axes(eqn, k)
    if axes is None:
        return None
    af, ac, bf, bc = axes
    j = ins[k].jac
    b_shape, a_shape = eqn.invars[k].aval.shape, eqn.invars[1 - k].aval.shape
    FB, K = math.prod(b_shape[d] for d in bf), math.prod(b_shape[d] for d in bc)
    FA = math.prod(a_shape[d] for d in af)
    _charge(FB * lat.n + FA * FB * lat.n, spend=False)  # the host table and the dense term
    inv = _row_inverse(np.transpose(j.idx, bf + bc).reshape(FB, K), lat.n)
    if inv is None:
        return None
    out = eqn.outvars[0].aval
    A = jnp.transpose(jnp.asarray(ins[1 - k].primal), af + ac).reshape(FA, K).astype(out.dtype)
    has = inv >= 0
    if (inv == inv[0]).all():  # the same selection for every free position: one gather, broadcast
        term = jnp.broadcast_to(_take_lines(A, inv[0], axis=1)[:, None, :], (FA, FB, lat.n))
    elif (line := _per_line(inv, has)) is not None:  # one line per input entry, placed by the 0/1 pattern
        term = _take_lines(A, line, axis=1)[:, None, :] * jnp.asarray(has).astype(out.dtype)[None]
    else:
        term = jnp.take(A, jnp.asarray(np.where(has, inv, 0).reshape(-1)), axis=1).reshape(FA, FB, lat.n)
        term = term * jnp.asarray(has).astype(out.dtype)[None]
    if j.scale is not None:
        scale = jnp.transpose(j.scale, bf + bc).reshape(FB, K).astype(out.dtype)
        term = term * jnp.take_along_axis(scale, jnp.asarray(np.where(has, inv, 0)), axis=1)[None]
    if k == 0:  # the result's axes: lhs free, then rhs free
        term = jnp.transpose(term, (1, 0, 2))
    return term.reshape(out.shape + (lat.n,))


def _rv_dot_free(lat, eqn, k: int, ins, g: st.Sel):
    """Reverse, operand ``k`` with free axes: ``G[r, fb, j] = A[inv[fb, r], j] scale_y[fb, inv[fb, r]]``."""
    axes = _dot_axes(eqn, k)
    if axes is None:
        return None
    af, ac, bf, bc = axes
    b_shape, a_shape = eqn.invars[k].aval.shape, eqn.invars[1 - k].aval.shape
    FB, K = math.prod(b_shape[d] for d in bf), math.prod(b_shape[d] for d in bc)
    FA = math.prod(a_shape[d] for d in af)
    # The output's selection, rows = free positions of b: (FB, FA).
    idx = g.idx.reshape((FA, FB) if k == 1 else (FB, FA))
    idx = idx.T if k == 1 else idx
    _charge(FB * lat.n + lat.n * FB * K, spend=False)  # the host table and the dense adjoint
    inv = _row_inverse(idx, lat.n)
    if inv is None:
        return None
    dtype = eqn.invars[k].aval.dtype
    A = jnp.transpose(jnp.asarray(ins[1 - k].primal), af + ac).reshape(FA, K).astype(dtype)
    has = inv >= 0
    if (inv == inv[0]).all():
        res = jnp.broadcast_to(_take_lines(A, inv[0], axis=0)[:, None, :], (lat.n, FB, K))
    elif (line := _per_line(inv, has)) is not None:
        res = _take_lines(A, line, axis=0)[:, None, :] * jnp.asarray(has.T).astype(dtype)[:, :, None]
    else:
        res = jnp.take(A, jnp.asarray(np.where(has, inv, 0).T.reshape(-1)), axis=0).reshape(lat.n, FB, K)
        res = res * jnp.asarray(has.T).astype(dtype)[:, :, None]
    if g.scale is not None:
        sc = g.scale.reshape((FA, FB) if k == 1 else (FB, FA))
        sc = (sc.T if k == 1 else sc).astype(dtype)  # (FB, FA)
        res = res * jnp.take_along_axis(sc, jnp.asarray(np.where(has, inv, 0)), axis=1).T[:, :, None]
    # (other, free..., contracted...) back to b's axis order.
    full = (lat.n,) + tuple(b_shape[d] for d in bf) + tuple(b_shape[d] for d in bc)
    order = bf + bc
    back = [0] + [1 + order.index(d) for d in range(len(b_shape))]
    return jnp.transpose(res.reshape(full), back)


# ------------------------------------------------------------------ forward sweep


class _Forward(Lattice):
    """Each value carries its primal and its structured Jacobian ``d value / d x`` (shape ``S + (n,)`` when dense)."""

    name = "structured forward sweep"
    staged = True
    fold_max = 4096  # folded values become constants of the compiled program: keep them small

    def __init__(self, n: int):
        self.n = n
        self.diag_cache = {}
        self.rules = {}
        self.log = []  # (primitive, family, structure kinds of the results): what each rule produced

    def constant(self, value, aval):
        return SV(value)

    def const(self, c, aval):
        # Closed-over integer and boolean arrays (gather indices, masks) are read on the host, so
        # selection maps and folding see them; floating constants stay arrays of the program.
        small = math.prod(aval.shape) <= self.fold_max
        if small and not _compat.is_tracer(c) and not is_opaque(aval) and not _inexact(aval):
            return SV(np.asarray(c))
        return SV(c)

    def value(self, v):
        return v.primal if v.jac is None and isinstance(v.primal, np.ndarray | np.generic) else None

    def is_inert(self, v) -> bool:
        return v.jac is None

    def skip(self, eqn, ins):
        return [SV(o) for o in _primals(eqn, ins)]

    def default(self, eqn, ins):
        return self.rule(eqn, ins)

    def post(self, eqn, outs):
        for o, v in zip(outs, eqn.outvars, strict=True):
            if not _inexact(v.aval):
                o.jac = None
        _charge_dense(o.jac for o in outs)
        return outs

    def check(self, v, aval):
        if not isinstance(v, SV):
            return f"expected a sweep value, got {type(v).__name__}"
        if tuple(np.shape(v.primal)) != tuple(aval.shape):
            return f"primal of shape {np.shape(v.primal)}, expected {tuple(aval.shape)}"
        j = v.jac
        if isinstance(j, st.Sel) and j.idx.shape != tuple(aval.shape):
            return f"selection of shape {j.idx.shape}, expected {tuple(aval.shape)}"
        if j is not None and not isinstance(j, st.Sel) and tuple(j.shape) != tuple(aval.shape) + (self.n,):
            return f"Jacobian of shape {j.shape}, expected {tuple(aval.shape) + (self.n,)}"
        return None

    def rule(self, eqn, ins):
        outs = _primals(eqn, ins)
        family = _family(self, eqn, ins)
        jacs = _FORWARD[family](self, eqn, ins)
        self.log.append((eqn.primitive.name, family, [st.kind(j) for j in jacs]))
        return [SV(o, j) for o, j in zip(outs, jacs, strict=True)]


def _fw_zero(lat, eqn, ins):
    return [None] * len(eqn.outvars)


def _fw_linear(lat, eqn, ins):
    out = eqn.outvars[0].aval
    signs = LINEAR[eqn.primitive.name]
    total = None
    for v, s, var in zip(ins, signs, eqn.invars, strict=False):
        if v.jac is not None:
            j = st.broadcast(st.cast(st.scale(v.jac, s, True, out.dtype), out.dtype), var.aval.shape, out.shape)
            total = st.add(total, j, out.shape, lat.n, True, out.dtype)
    return [total]


def _fw_elementwise(lat, eqn, ins):
    out = eqn.outvars[0].aval
    active = [i for i, v in enumerate(ins) if v.jac is not None]
    total = None
    for i, d in zip(active, _partials(eqn, ins, active), strict=True):
        j = st.broadcast(st.cast(ins[i].jac, out.dtype), eqn.invars[i].aval.shape, out.shape)
        total = st.add(total, st.scale(j, d, True, out.dtype), out.shape, lat.n, True, out.dtype)
    return [total]


def _fw_select(lat, eqn, ins):
    if any(not isinstance(v.jac, st.Sel | None) for v in ins):
        return _fw_generic(lat, eqn, ins)
    found = selection_map(lat, eqn, ins)
    if found is None:
        return _fw_generic(lat, eqn, ins)
    pis, data = found
    parts = [(ins[i].jac, math.prod(eqn.invars[i].aval.shape)) for i in data]
    return [st.select_forward(parts, pi, v.aval.dtype) for pi, v in zip(pis, eqn.outvars, strict=True)]


def _which(eqn, ins) -> jax.Array:
    """The traced predicate of a ``select_n``, broadcast to the output's shape (as ``int32``)."""
    return jnp.broadcast_to(jnp.asarray(ins[0].primal).astype(jnp.int32), eqn.outvars[0].aval.shape)


def _fw_where(lat, eqn, ins):
    """``select_n(p, *cases)`` with ``p`` traced: row ``i`` of the Jacobian is row ``i`` of case ``p[i]``'s.

    Selections whose used lines agree stay one selection with selected scales; else dense.
    """
    out = eqn.outvars[0].aval
    which, jacs = _which(eqn, ins), [v.jac for v in ins[1:]]
    if all(isinstance(j, st.Sel | None) for j in jacs):
        used = [j.idx for j in jacs if j is not None]
        idx = np.max(np.stack(used), axis=0)
        if all(((u == idx) | (u < 0)).all() for u in used):
            if (idx < 0).all():
                return [None]
            scales = [jnp.zeros(out.shape, out.dtype) if j is None else
                      jnp.where(jnp.asarray(j.idx >= 0), st._scales(j, out.shape, out.dtype), 0) for j in jacs]
            return [st.Sel(idx, lax.select_n(which, *scales))]
    dense = [st.densify(j, out.shape, lat.n, True, out.dtype) for j in jacs]
    full = jnp.broadcast_to(which[..., None], out.shape + (lat.n,))
    return [lax.select_n(full, *dense)]


def _fw_dot(lat, eqn, ins):
    out = eqn.outvars[0].aval
    total = None
    for k in (0, 1):
        j = ins[k].jac
        if j is None:
            continue
        mat = _dot_matrix(eqn, k, ins) if isinstance(j, st.Sel) else None
        term = _fw_dot_free(lat, eqn, k, ins) if isinstance(j, st.Sel) and mat is None else None
        if term is not None:
            pass
        elif mat is None:  # dense: one product with the Jacobian's columns batched (the JVP, vmapped)
            one = [SV(v.primal, v.jac if i == k else None) for i, v in enumerate(ins)]
            term = _fw_generic(lat, eqn, one)[0]
        else:
            # y = M b: J_y = M J_b, and J_b = diag(scale) P selects (scaled) columns of M.
            if j.scale is not None:
                mat = mat * j.scale.reshape(-1).astype(mat.dtype)[None, :]
            term = st.collect(mat, j.idx.reshape(-1), lat.n, axis=1).reshape(out.shape + (lat.n,))
        total = st.add(total, term, out.shape, lat.n, True, out.dtype)
    return [total]


def _fw_generic(lat, eqn, ins):
    """The primitive's own JVP over the densified Jacobian's columns (``jax.jacfwd`` for this equation)."""
    active = [i for i, v in enumerate(ins) if v.jac is not None]
    diff_out = [k for k, v in enumerate(eqn.outvars) if _inexact(v.aval)]
    _charge(lat.n * eqn_cost(eqn), spend=False)  # one JVP of the equation per column: stop before tracing them
    f, vary = as_function(eqn, ins, active, diff_out)
    dense = [st.densify(ins[i].jac, eqn.invars[i].aval.shape, lat.n, True, vary[j].dtype) for j, i in enumerate(active)]
    tangents = jax.vmap(lambda *ts: jax.jvp(f, vary, list(ts))[1], in_axes=-1, out_axes=-1)(*dense)
    jacs = [None] * len(eqn.outvars)
    for k, t in zip(diff_out, tangents, strict=True):
        jacs[k] = t
    return jacs


_FORWARD = {"zero": _fw_zero, "linear": _fw_linear, "elementwise": _fw_elementwise, "select": _fw_select,
            "where": _fw_where, "reduce_sum": _fw_generic, "dot": _fw_dot, "generic": _fw_generic}
# Control flow and custom rules are rules (not recursed into or joined by the walker): the generic JVP.
_CONTROL = ("cond", "while", "scan", "custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr")


# ------------------------------------------------------------------ reverse sweep


class _Tape(_Forward):
    """The forward half of the reverse sweep: primals, and a tape of the equations that touch ``x``."""

    name = "structured reverse sweep (tape)"

    def __init__(self, m: int):
        super().__init__(m)
        self.tape = []

    def check(self, v, aval):
        if not isinstance(v, SV):
            return f"expected a sweep value, got {type(v).__name__}"
        if tuple(np.shape(v.primal)) != tuple(aval.shape):
            return f"primal of shape {np.shape(v.primal)}, expected {tuple(aval.shape)}"
        return None

    def rule(self, eqn, ins):
        outs = [SV(o, True) for o in _primals(eqn, ins)]
        self.tape.append((eqn, ins, outs))
        return outs


def _rv_zero(lat, eqn, ins, gs):
    return [None] * len(ins)


def _rv_linear(lat, eqn, ins, gs):
    (g,) = gs
    signs = LINEAR[eqn.primitive.name]
    res = []
    out = eqn.outvars[0].aval
    for v, s, var in zip(ins, signs, eqn.invars, strict=False):
        a = None
        if v.jac is not None:
            a = st.unbroadcast(st.scale(g, s, False, out.dtype), out.shape, var.aval.shape, lat.n)
            a = st.cast(a, var.aval.dtype)
        res.append(a)
    return res + [None] * (len(ins) - len(res))


def _rv_elementwise(lat, eqn, ins, gs):
    (g,) = gs
    active = [i for i, v in enumerate(ins) if v.jac is not None]
    res = [None] * len(ins)
    out = eqn.outvars[0].aval
    for i, d in zip(active, _partials(eqn, ins, active), strict=True):
        var = eqn.invars[i].aval
        res[i] = st.cast(st.unbroadcast(st.scale(g, d, False, d.dtype), out.shape, var.shape, lat.n), var.dtype)
    return res


def _rv_select(lat, eqn, ins, gs):
    found = selection_map(lat, eqn, ins) if all(isinstance(g, st.Sel | None) for g in gs) else None
    if found is None:
        return _rv_generic(lat, eqn, ins, gs)
    pis, data = found
    # Several outputs (split): one selection over all of them, end to end.
    g = st.join_outputs(gs, [v.aval for v in eqn.outvars])
    pi = np.concatenate([p.reshape(-1) for p in pis])
    res, off = [None] * len(ins), 0
    for i in data:
        shape = eqn.invars[i].aval.shape
        size = math.prod(shape)
        if ins[i].jac is not None:
            a = st.select_reverse(g, pi, off, size, shape)
            if a is None:
                return _rv_generic(lat, eqn, ins, gs)
            res[i] = None if isinstance(a, str) else st.cast(a, eqn.invars[i].aval.dtype)
        off += size
    return res


def _rv_where(lat, eqn, ins, gs):
    """``select_n`` with a traced predicate: case ``k``'s adjoint is the output's where ``p == k``, else 0."""
    (g,) = gs
    out = eqn.outvars[0].aval
    which = _which(eqn, ins)
    res = [None]
    for k, v in enumerate(ins[1:]):
        if v.jac is None:
            res.append(None)
        elif isinstance(g, st.Sel):
            zero = jnp.zeros(out.shape, out.dtype)
            res.append(st.Sel(g.idx, jnp.where(which == k, st._scales(g, out.shape, out.dtype), zero)))
        else:
            res.append(jnp.where(which[None] == k, g, jnp.zeros((), g.dtype)))
    return res


def _rv_reduce_sum(lat, eqn, ins, gs):
    (g,) = gs
    if not isinstance(g, st.Sel):
        return _rv_generic(lat, eqn, ins, gs)
    # Every input element feeds exactly one output element: the adjoint is a selection of the output's.
    shape, axes = eqn.invars[0].aval.shape, eqn.params["axes"]
    kept = [d for d in range(len(shape)) if d not in axes]
    pos = np.arange(math.prod(eqn.outvars[0].aval.shape)).reshape([shape[d] for d in kept])
    sigma = np.broadcast_to(np.expand_dims(pos, tuple(axes)), shape).reshape(-1)
    idx = g.idx.reshape(-1)[sigma].reshape(shape)
    scale = None if g.scale is None else jnp.take(g.scale.reshape(-1), jnp.asarray(sigma)).reshape(shape)
    return [st.Sel(idx, scale)]


def _rv_dot(lat, eqn, ins, gs):
    (g,) = gs
    if not isinstance(g, st.Sel):
        return _rv_generic(lat, eqn, ins, gs)
    mats = {k: _dot_matrix(eqn, k, ins) for k in (0, 1) if ins[k].jac is not None}
    res = [None, None]
    for k, mat in mats.items():
        if mat is None:  # operand k keeps free axes: I (x) A, row by row
            res[k] = _rv_dot_free(lat, eqn, k, ins, g)
            if res[k] is None:
                return _rv_generic(lat, eqn, ins, gs)
            continue
        # G_b = G_y M, and G_y = P diag(scale) selects (scaled) rows of M.
        if g.scale is not None:
            mat = mat * g.scale.reshape(-1).astype(mat.dtype)[:, None]
        shape = eqn.invars[k].aval.shape
        a = st.collect(mat, g.idx.reshape(-1), lat.n, axis=0).reshape((lat.n,) + shape)
        res[k] = a.astype(eqn.invars[k].aval.dtype)
    return res


def _rv_generic(lat, eqn, ins, gs):
    """The primitive's own VJP over the densified adjoint's rows (``jax.jacrev`` for this equation)."""
    active = [i for i, v in enumerate(ins) if v.jac is not None]
    # Only the outputs with an adjoint: a zero cotangent for the others (eigh's eigenvectors beside its
    # eigenvalues) meets their rule's 1 / (l_i - l_j) at repeated eigenvalues as 0 * inf = NaN, where
    # JAX's own VJP leaves them out.
    diff_out = [k for k, v in enumerate(eqn.outvars) if _inexact(v.aval) and gs[k] is not None]
    if not active or not diff_out:
        return [None] * len(ins)
    _charge(lat.n * eqn_cost(eqn), spend=False)  # one VJP of the equation per row: stop before tracing them
    f, vary = as_function(eqn, ins, active, diff_out)
    _, pull = jax.vjp(f, *vary)
    cts = [st.densify(gs[k], eqn.outvars[k].aval.shape, lat.n, False, eqn.outvars[k].aval.dtype) for k in diff_out]
    grads = jax.vmap(lambda *c: pull(list(c)))(*cts)
    res = [None] * len(ins)
    for i, gr in zip(active, grads, strict=True):
        res[i] = gr
    return res


_REVERSE = {"zero": _rv_zero, "linear": _rv_linear, "elementwise": _rv_elementwise, "select": _rv_select,
            "where": _rv_where, "reduce_sum": _rv_reduce_sum, "dot": _rv_dot, "generic": _rv_generic}


# ------------------------------------------------------------------ entry point


def _install(lat):
    lat.rules = {name: (lambda lat_, eqn, ins: lat_.rule(eqn, ins)) for name in _CONTROL}


def jacobian(flat, x, sweep: str, log: list | None = None, chunk_size: int | None = None):
    """The Jacobian of a flat map by one structured sweep.

    Args:
      flat: ``flat(x) -> (y, aux)``, ``x`` of shape ``(n,)``, ``y`` of shape ``(m,)``;
        or, with ``x`` a list of arrays (the leaves of the input), ``flat(*x) -> (y, aux)``:
        the columns are then the leaves' entries one leaf after another, each seeded
        where it lives (no ravel of the leaves into one vector and no cut back).
      x: the point: an ``(n,)`` array, or a list of arrays of one dtype.
      sweep: ``"fwd"`` (Jacobians from the input) or ``"rev"`` (adjoints from the output).
      log: if given, extended with ``(primitive, family, kinds)`` per rule applied
        (kinds: ``"zero"``, ``"selection"`` or ``"dense"`` per result), in sweep order.
      chunk_size: at most this many columns (forward) or rows (reverse) at a
        time, in a loop; ``None``: all at once.

    Returns:
      ``(y, jac, aux)`` with ``jac`` of shape ``(m, n)``, as :func:`jacobians.kernels.forward`.
    """
    xs = list(x) if isinstance(x, list | tuple) else [x]
    closed, shapes = jax.make_jaxpr(flat, return_shape=True)(*xs)
    aux_tree = jax.tree_util.tree_structure(shapes[1])
    n, m = sum(v.size for v in xs), shapes[0].shape[0]
    dtype = shapes[0].dtype
    total = n if sweep == "fwd" else m
    if chunk_size is None or chunk_size >= total:
        outs, jac = _sweep(closed, xs, sweep, n, m, total, None, log)
        aux = jax.tree_util.tree_unflatten(aux_tree, [jnp.asarray(o.primal) for o in outs[1:]])
        return jnp.asarray(outs[0].primal), jac.astype(dtype), aux
    # Chunk c seeds the selection idx = j mod k scaled by the mask of [c k, c k + k): the idx
    # stay static (one trace in a loop) and each chunk yields k columns (rows) of the result.
    k = chunk_size
    chunks = -(-total // k)
    labels = np.arange(total)

    def body(c, out):
        lo = c * k
        mask = ((labels >= lo) & (labels < lo + k)).astype(xs[0].dtype if sweep == "fwd" else dtype)
        _, part = _sweep(closed, xs, sweep, n, m, k, st.Sel(labels % k, mask), None)
        return jax.lax.dynamic_update_slice_in_dim(out, part.astype(dtype), lo, axis=1 if sweep == "fwd" else 0)

    shape = (m, chunks * k) if sweep == "fwd" else (chunks * k, n)
    jac = jax.lax.fori_loop(0, chunks, body, jnp.zeros(shape, dtype))
    jac = jac[:, :n] if sweep == "fwd" else jac[:m]
    y, aux = flat(*xs)
    return y, jac, aux


def _sweep(closed, xs: list, sweep, n, m, other, seed, log):
    """One sweep with ``seed`` (``None``: the identity) on the input (forward) or output (reverse) side.

    The input side is the leaves ``xs`` one after another (columns ``[o_k, o_k + size_k)`` for leaf ``k``).
    Returns the walker's outputs and the ``(m, other)`` (forward) or ``(other, n)`` (reverse) result.
    """
    if sweep == "fwd":
        lat = _Forward(other)
        _install(lat)
        seed = seed or st.identity((n,))
        lay = _leaves.Leaves.of(xs)  # each leaf's lines of the flat seed
        scales = [None] * len(xs) if seed.scale is None else lay.split(seed.scale.reshape(-1))
        seeds = [st.Sel(i, c) for i, c in zip(lay.split(seed.idx.reshape(-1)), scales, strict=True)]
        outs = Walker(lat).run(closed, [SV(v, sd) for v, sd in zip(xs, seeds, strict=True)])
        jac = st.densify(outs[0].jac, (m,), other, True, outs[0].primal.dtype)
    else:
        lat = _Tape(other)
        _install(lat)
        x_svs = [SV(v, True) for v in xs]
        outs = Walker(lat).run(closed, x_svs)
        adjs = _backward(lat, outs[0], x_svs, seed or st.identity((m,)))
        parts = [st.densify(a, v.shape, other, False, v.dtype).reshape(other, v.size) for a, v in zip(adjs, xs)]
        jac = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)
    if log is not None:
        log.extend(lat.log)
    return outs, jac


def _backward(lat: _Tape, y: SV, xs: list, seed: st.Sel) -> list:
    """Accumulate adjoints ``dy/dv`` over the tape, from ``y`` (``seed``: the identity, or a chunk) back to ``xs``."""
    if y.jac is None:
        return [None] * len(xs)
    m = lat.n
    adj = {id(y): seed}
    for eqn, ins, outs in reversed(lat.tape):
        gs = [adj.pop(id(o), None) for o in outs]
        if all(g is None for g in gs):
            continue
        family = _family(lat, eqn, ins)
        if len(gs) > 1 and family not in ("select", "zero"):
            family = "generic"
        res = _REVERSE[family](lat, eqn, ins, gs)
        _charge_dense(res)
        lat.log.append((eqn.primitive.name, family, [st.kind(a) for a, v in zip(res, ins) if v.jac is not None]))
        for v, var, a in zip(ins, eqn.invars, res, strict=True):
            if a is not None and v.jac is not None:
                adj[id(v)] = st.add(adj.get(id(v)), a, var.aval.shape, m, False, var.aval.dtype)
    return [adj.get(id(x)) for x in xs]
