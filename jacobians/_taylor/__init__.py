"""The forward Laplacian: a Taylor-mode sweep carrying value, first derivatives and second-order part.

One forward pass through the jaxpr of a flat map ``x (n,) -> y (m,)`` (a
staged lattice on the shared walker, :mod:`jacobians._walker`) carries for every
intermediate ``v`` its value, its first derivatives ``dv/dx`` and either its
Laplacian ``sum_j d^2 v / d x_j^2`` (``"trace"``) or its Hessian diagonal
(``"diag"``), in one block (see :mod:`._block`). The chain rule to second order
is applied per primitive family, one file each:

- ``_elementwise``: ``J' = f'(u) J``, ``L' = f'(u) L + f''(u) sum_j J_j^2``, and
  the bilinear rule of ``mul``;
- ``_linear``: linear and piecewise-linear primitives (movement, sums,
  ``dot_general`` with a constant operand, ``max``) map every column alike;
- ``_linalg``: ``lu`` (``det``, ``solve``) and ``slogdet`` by products with
  inverses formed once;
- ``_generic``: everything else by nested JVPs per column (correct, slower,
  never a crash), ``custom_vjp`` through its backward rule.

*Sparse* sweeps keep each intermediate's first-derivative columns only over
the inputs it depends on (``_layout``): a per-node network then carries the
node's few columns, not all ``n``. The sets come from the rules themselves,
and from the dependency lattice (:mod:`jacobians._deps`) where a rule computes
densely. Nested jaxprs (``jit``) are walked through; control flow and custom
rules are rules here (never unrolled or joined).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

from .. import _batchwise, _compat, _primitives, _sweeps
from .._deps import DepsLattice, _custom
from .._deps._sets import Deps, empty
from .._walker import RULED, Lattice, Walker, bind, has_custom_vjp
from . import _block as bk
from . import _elementwise, _generic, _layout, _linalg, _linear
from ._block import TV

KINDS = ("trace", "diag")
ZERO = set(_primitives.ZERO)
# Linear or piecewise linear in every operand (their second derivatives vanish, as JAX's do).
LINEAR = set(_primitives.LINEAR | _primitives.PIECEWISE_LINEAR) - ZERO - {"scatter-mul", "scatter_mul"}
# Linear and element-wise: the element-wise rule without its second order (layouts unite, nothing moves).
ELEMENTWISE_LINEAR = {"add", "add_any", "sub", "neg", "convert_element_type", "reduce_precision", "copy",
                      "copy_p", "real", "imag", "complex", "conj", "abs", "max", "min", "clamp", "rem", "select_n"}
COMPLEX_LINEAR = {"add", "add_any", "sub", "neg", "convert_element_type", "copy", "copy_p", "select_n"}
ELEMENTWISE = (set(_primitives.ELEMENTWISE) | set(_primitives.PRODUCTS)) - LINEAR
# Element-wise: chains of them on one base compose lazily (one pass over the base's block for the chain).
COMPOSABLE = (ELEMENTWISE | ELEMENTWISE_LINEAR | {"mul", "div"}) - {"reduce_precision"}
CUSTOM_VJP = ("custom_vjp_call", "custom_vjp_call_jaxpr")
# Rules, not walked into or joined by the walker: control flow and custom rules.
CONTROL = ("cond", "while", "scan", "custom_jvp_call") + CUSTOM_VJP


def _inexact(aval) -> bool:
    return jnp.issubdtype(aval.dtype, jnp.inexact)


def _is_complex(var) -> bool:
    return jnp.issubdtype(var.aval.dtype, jnp.complexfloating)


def _broadcastable(shape, out) -> bool:
    shape, out = tuple(shape), tuple(out)
    return len(shape) == 0 or (len(shape) == len(out) and all(a in (1, b) for a, b in zip(shape, out, strict=True)))


class Taylor(Lattice):
    """The staged lattice of the forward Laplacian (module docstring).

    Args:
      n: the number of inputs.
      kind: ``"trace"`` (Laplacian) or ``"diag"`` (Hessian diagonal).
      sparse: keep per-element layouts (else every block is dense).
      cols: columns of a dense block (``n``; fewer for a chunk of the inputs).
    """

    name = "forward Laplacian"
    staged = True
    fold_max = 4096  # folded values become constants of the compiled program: keep them small

    def __init__(self, n: int, kind: str, sparse: bool, cols: int | None = None):
        self.n = n
        self.kind = kind
        self.sparse = sparse
        self.cols = n if cols is None else cols
        self.diag_cache = {}
        self.rules = {name: (lambda lat, eqn, ins: lat.rule(eqn, ins)) for name in CONTROL}
        self.log = []  # (primitive, family, [(size, K) per result]): what each rule produced
        self._deps = DepsLattice(n)
        self._deps_walker = Walker(self._deps)

    # --- values -------------------------------------------------------------------------------
    def constant(self, value, aval):
        return TV(value)

    def const(self, c, aval):
        return TV(c)

    def value(self, v):
        return v.primal if not v.active and isinstance(v.primal, np.ndarray | np.generic) else None

    def is_inert(self, v) -> bool:
        return not v.active

    def skip(self, eqn, ins):
        return [TV(o) for o in _primals(eqn, ins)]

    def default(self, eqn, ins):
        return self.rule(eqn, ins)

    def post(self, eqn, outs):
        for o, v in zip(outs, eqn.outvars, strict=True):
            if not _inexact(v.aval):
                o.drop()
        return outs

    def check(self, v, aval):
        if not isinstance(v, TV):
            return f"expected a sweep value, got {type(v).__name__}"
        shape = tuple(aval.shape)
        if tuple(np.shape(v.primal)) != shape:
            return f"primal of shape {np.shape(v.primal)}, expected {shape}"
        if v.idx is not None and tuple(v.idx.shape[:-1]) != shape:
            return f"layout of shape {v.idx.shape}, expected {shape} + (K,)"
        if v._t is None:  # inactive, or lazy (checked when formed)
            return None
        k = bk.cols(self, v)
        j, second = v._t
        kl = 1 if self.kind == "trace" else k
        if tuple(j.shape) != (k,) + shape or tuple(second.shape) != (kl,) + shape:
            return f"block of shapes {tuple(j.shape)}, {tuple(second.shape)}, expected {(k,) + shape}, {(kl,) + shape}"
        return None

    # --- rules --------------------------------------------------------------------------------
    def rule(self, eqn, ins):
        outs = _primals(eqn, ins)
        lazy = _compose(self, eqn, ins)
        if lazy is not None:
            self.log.append((eqn.primitive.name, "lazy", []))
            return [TV(outs[0], lazy=lazy)]
        family = _family(self, eqn, ins)
        res = FAMILIES[family](self, eqn, ins)
        self.log.append((eqn.primitive.name, family,
                         [(math.prod(np.shape(o)), self.cols if idx is None else idx.shape[-1])
                          for o, (t, idx) in zip(outs, res, strict=True) if t is not None]))
        return [TV(o, t, idx if t is not None else None) for o, (t, idx) in zip(outs, res, strict=True)]

    def deps_layout(self, eqn, ins) -> list:
        """The dependency lattice's sets of ``eqn``'s results as layouts (``None``: dense)."""
        if any(v.active and v.idx is None for v in ins):
            return [None] * len(eqn.outvars)
        deps = []
        for v, var in zip(ins, eqn.invars, strict=True):
            shape = tuple(var.aval.shape)
            if not v.active:
                deps.append(empty(shape, self.value(v)))
            else:
                indptr, indices = _layout.to_sets(v.idx, self.n)
                deps.append(Deps(shape, indptr, indices))
        with jax.ensure_compile_time_eval():
            outs = self._deps_walker.eqn(eqn, deps)
        return [_layout.from_sets(o.shape, o.indptr, o.indices, self.n) for o in outs]

    def elementwise_custom(self, eqn, ins, active) -> bool:
        """A ``custom_jvp`` rule that is element-wise in its one active operand (``relu``, ``softplus``)."""
        key = id(eqn)
        hit = self.diag_cache.get(key)
        if hit is not None and hit[0] is eqn:
            return hit[1]
        ok = False
        (i,) = active
        shape = tuple(eqn.invars[i].aval.shape)
        if len(eqn.outvars) == 1 and tuple(eqn.outvars[0].aval.shape) == shape:
            try:
                ((rows, cols),) = _custom.local_pattern(self._deps, eqn)
                diff = _custom.diff_operands(eqn)
                start = sum(math.prod(eqn.invars[j].aval.shape) for j in diff[: diff.index(i)])
                size = math.prod(shape)
                mine = (cols >= start) & (cols < start + size)
                r, c = rows[mine], cols[mine] - start
                ok = r.size == np.unique(r).size and bool(np.array_equal(r, c))
            except Exception:  # noqa: BLE001 - an untraceable rule: the generic nested JVPs
                ok = False
        self.diag_cache[key] = (eqn, ok)
        return ok


def _primals(eqn, ins) -> list:
    out = bind(eqn, [v.primal for v in ins])
    return list(out) if eqn.primitive.multiple_results else [out]


def _compose(lat, eqn, ins):
    """``eqn`` as a lazy element-wise function of its operands' common base, if it is one (see :class:`TV`).

    Element-wise primitives (and element-wise custom_jvp rules) whose active
    operands have the result's shape and one common base compose; constants
    and inactive operands are captured. Returns the :class:`_block.Lazy` or ``None``.
    """
    name = eqn.primitive.name
    if len(eqn.outvars) != 1 or not _inexact(eqn.outvars[0].aval) or _is_complex(eqn.outvars[0]):
        return None
    if name not in COMPOSABLE and name != "custom_jvp_call":
        return None
    shape = tuple(eqn.outvars[0].aval.shape)
    active = [i for i, v in enumerate(ins) if v.active]
    if any(tuple(eqn.invars[i].aval.shape) != shape or _is_complex(eqn.invars[i]) for i in active):
        return None
    roots = [bk.root(ins[i]) for i in active]
    base = roots[0][0]
    if any(r[0] is not base for r in roots[1:]):
        return None
    if name == "custom_jvp_call" and not (len(active) == 1 and lat.elementwise_custom(eqn, ins, active)):
        return None
    fns = dict(zip(active, [r[1] for r in roots], strict=True))
    primals = [v.primal for v in ins]

    def fn(u):
        out = bind(eqn, [fns[i](u) if i in fns else p for i, p in enumerate(primals)])
        return out[0] if eqn.primitive.multiple_results else out

    return bk.Lazy(base, fn, lat)


def _custom_name(eqn) -> str | None:
    """The name of the function a ``custom_jvp_call`` wraps (``_slogdet_lu``), from its jaxpr's debug info."""
    call = eqn.params.get("call_jaxpr")
    info = getattr(getattr(call, "jaxpr", call), "debug_info", None)
    return getattr(info, "func_name", None)


def _holds_custom_vjp(eqn) -> bool:
    """A call or loop (scan, cond, pjit, remat) whose body JAX differentiates holds a ``custom_vjp``."""
    if eqn.primitive.name in RULED:
        return False
    return any(has_custom_vjp(sub) for sub in _compat.jaxprs_in_params(eqn.params))


def _family(lat, eqn, ins) -> str:
    """Which rule applies to ``eqn`` given its active operands."""
    name = eqn.primitive.name
    active = [i for i, v in enumerate(ins) if v.active]
    if name in ZERO or not any(_inexact(v.aval) for v in eqn.outvars):
        return "zero"
    out = eqn.outvars[0].aval if len(eqn.outvars) == 1 else None
    pointwise = out is not None and all(_broadcastable(eqn.invars[i].aval.shape, out.shape) for i in active)
    complex_any = any(_is_complex(v) for v in (*eqn.invars, *eqn.outvars))
    if name in CUSTOM_VJP or _holds_custom_vjp(eqn):
        return "custom_vjp"  # its VJPs give the local Jacobian: JAX pushes no JVP (nor a JVP of one) through
    if name in _linalg.RULES:
        return name
    if name == "custom_jvp_call" and _custom_name(eqn) in _linalg.CUSTOM:
        return "custom:" + _custom_name(eqn)
    if name == "custom_jvp_call":
        if len(active) == 1 and not complex_any and lat.elementwise_custom(eqn, ins, active):
            return "elementwise"
        return "generic"
    if name == "select_n":
        if lat.value(ins[0]) is not None and lat.sparse:
            return "linear"  # a known predicate selects: a movement
        return "elementwise_linear" if pointwise else "generic"
    if name in ELEMENTWISE_LINEAR and pointwise:
        # On complex values only the complex-linear ones scale columns by a number.
        return "generic" if complex_any and name not in COMPLEX_LINEAR else "elementwise_linear"
    if name in ("mul", "div") and pointwise:
        if name == "div" and active == [0]:
            return "elementwise_linear"
        return "mul" if name == "mul" else "elementwise"
    if name == "dot_general":
        return "dot" if len(active) == 2 else "linear"
    if name == "conv_general_dilated":
        return "linear" if len(active) == 1 else "generic"
    if name in ("scatter-mul", "scatter_mul"):
        return "linear" if active == [0] else "generic"
    if name in LINEAR:
        return "linear"
    if name in ELEMENTWISE and pointwise:
        if complex_any and name not in _sweeps.HOLOMORPHIC:
            return "generic"  # only real-differentiable there: no complex f', f''
        return "elementwise"
    return "generic"


def _zero(lat, eqn, ins):
    return [(None, None)] * len(eqn.outvars)


def _zero_times_inf(eqn, ins, k, second, pushed):
    """``dot_general``'s second-order part ``pushed`` (``A(L_k, other)``) with ``0 * inf = 0`` term by term.

    The convention of :func:`._block.times`, for a bilinear product: an operand's second-order part
    that is exactly zero (``x`` in ``x @ (W x)``) times the other operand's infinite value is 0, as in
    ``jax.hessian`` (whose Hessian of a quadratic form never meets ``x``'s values), not NaN. Only where
    the other operand is not finite somewhere in the whole (vmapped) batch: a branch that runs then.
    """
    other = jnp.asarray(ins[1 - k].primal)

    def guarded():
        fin = jnp.isfinite(other)

        def push(op, col):  # A(col, op) for every column of a second-order part
            args = list(ins)
            args[1 - k] = TV(op)
            f, vary = _sweeps.as_function(eqn, args, [k], [0])
            return jax.vmap(lambda c: jax.jvp(f, vary, [c.astype(vary[0].dtype)])[1][0])(col)

        safe = push(jnp.where(fin, other, jnp.zeros((), other.dtype)), second)
        hit = push((~fin).astype(other.dtype), (second != 0).astype(second.dtype))
        return jnp.where(hit != 0, pushed, safe.astype(pushed.dtype))

    return jax.lax.cond(_batchwise.all_finite(other), lambda: pushed, guarded)


def _dot_both(lat, eqn, ins):
    """``dot_general`` with both operands active: ``L_y = A(L_a, b) + A(a, L_b) + 2 sum_j A(J_a,j, J_b,j)``.

    The cross term is one ``dot_general`` contracting the columns too (``"trace"``)
    or batching over them (``"diag"``). Dense operands; compressed if sparse.
    """
    a, b = ins
    ta = bk.relayout(lat, a, np.shape(a.primal), None)
    tb = bk.relayout(lat, b, np.shape(b.primal), None)
    (t1,) = _linear.apply(lat, eqn, [a, TV(b.primal)], [0], [ta])
    (t2,) = _linear.apply(lat, eqn, [TV(a.primal), b], [1], [tb])
    t1 = (t1[0], _zero_times_inf(eqn, [a, TV(b.primal)], 0, ta[1], t1[1]))
    t2 = (t2[0], _zero_times_inf(eqn, [TV(a.primal), b], 1, tb[1], t2[1]))
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    na, nb = len(eqn.invars[0].aval.shape), len(eqn.invars[1].aval.shape)
    out = eqn.outvars[0].aval
    ja = jnp.moveaxis(ta[0], 0, -1).astype(out.dtype)
    jb = jnp.moveaxis(tb[0], 0, -1).astype(out.dtype)
    pet = eqn.params.get("preferred_element_type")
    if lat.kind == "trace":
        dims = ((tuple(lc) + (na,), tuple(rc) + (nb,)), (tuple(lb), tuple(rb)))
        cross = jax.lax.dot_general(ja, jb, dims, preferred_element_type=pet)[None]
    else:
        dims = ((tuple(lc), tuple(rc)), (tuple(lb) + (na,), tuple(rb) + (nb,)))
        cross = jnp.moveaxis(jax.lax.dot_general(ja, jb, dims, preferred_element_type=pet), len(lb), 0)
    t = bk.add_second(bk.add(t1, t2), 2 * cross.astype(out.dtype))
    if not lat.sparse:
        return [(t, None)]
    (idx,) = lat.deps_layout(eqn, ins)
    return [(bk.compress(lat, t, out.shape, idx), idx)]


FAMILIES = {
    "zero": _zero,
    "elementwise": _elementwise.elementwise,
    "elementwise_linear": _elementwise.linear,
    "mul": _elementwise.mul,
    "linear": _linear.linear,
    "dot": _dot_both,
    "custom_vjp": _generic.custom_vjp,
    "generic": _generic.generic,
    **_linalg.RULES,
    **{"custom:" + k: v for k, v in _linalg.CUSTOM.items()},
}


class Sweep:
    """The result of one sweep: the output's value, block and layout, the aux values, and the rules' log."""

    def __init__(self, outs, lat: Taylor, y_shape, dtype):
        y = outs[0]
        self.lat = lat
        self.y = jnp.asarray(y.primal)
        self.k = bk.cols(lat, y) if y.active else lat.cols
        self.idx = y.idx
        self.t = y.t if y.active else bk.zeros(lat, lat.cols, y_shape, dtype)
        self.aux = [jnp.asarray(o.primal) for o in outs[1:]]

    def dense(self):
        """``(J, S)``: first derivatives ``(cols, m)`` and second-order part (``(1, m)`` or ``(cols, m)``), dense."""
        lat = self.lat
        t = self.t
        if self.idx is not None:
            pos = _layout.positions(self.idx, None, lat.n)
            t = t if pos is None else bk.gather(lat, t, pos, self.k)
        return t


def sweep(flat, x, kind: str, sparse: bool = False, cols: int | None = None, start=None, shards=None) -> Sweep:
    """One forward-Laplacian sweep of ``flat(x) -> (y, aux)`` (``x`` of shape ``(n,)``, ``y`` of shape ``(m,)``).

    Args:
      flat: the flat map.
      x: the point.
      kind: ``"trace"`` or ``"diag"``.
      sparse: keep per-element layouts.
      cols, start: a dense chunk: input columns ``start .. start + cols`` only (``start`` may be traced).
      shards: split a dense sweep's columns across devices (the seed pinned along its column axis; XLA's
        SPMD partitioner carries the split through every rule). Sparse sweeps are not split.

    Returns:
      A :class:`Sweep`.
    """
    closed, shapes = jax.make_jaxpr(flat, return_shape=True)(x)
    lat = Taylor(x.shape[0], kind, sparse, cols)
    t0, idx0 = bk.seed(lat, x, sparse, start)
    if shards is not None and shards.count > 1 and not sparse:
        t0 = (shards.constrain(t0[0], 0), t0[1] if kind == "trace" else shards.constrain(t0[1], 0))
    outs = Walker(lat).run(closed, [TV(x, t0, idx0)])
    return Sweep(outs, lat, shapes[0].shape, shapes[0].dtype)
