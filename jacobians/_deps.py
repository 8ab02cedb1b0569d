"""Which input entries each entry of each jaxpr variable can depend on.

An abstract interpreter over ``jax.make_jaxpr``: each variable carries, per
element, the set of input indices it may depend on, stored as a CSR boolean
matrix ``(size, n_inputs)``. It is conservative (never drops an entry that can
be nonzero for some input) and exact for the common structured cases. Values
known at trace time (literals, closed-over constants, iotas and what is
computed from them alone) are folded, so that gathers, dynamic slices and
products with constant matrices (stencils written as ``A @ x``) stay sparse.
Integer and boolean values carry no derivative and so no dependencies.
"""

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

_FOLD_MAX = 1 << 20  # fold constants up to this many elements
_JOIN_MAX = 1 << 25  # largest COO join before a product falls back to dense
_LOOP_MAX = 256  # fixed-point iterations for loops before giving up


@dataclass
class Deps:
    """Dependency sets of one array: element ``e`` depends on ``indices[indptr[e]:indptr[e+1]]``."""

    shape: tuple[int, ...]
    indptr: np.ndarray
    indices: np.ndarray
    const: np.ndarray | None = None  # the value, when known at trace time

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nnz(self) -> int:
        return int(self.indices.size)

    def rows(self) -> np.ndarray:
        return np.repeat(np.arange(self.size), np.diff(self.indptr))


def empty(shape, const=None) -> Deps:
    shape = tuple(int(s) for s in shape)
    return Deps(shape, np.zeros(math.prod(shape) + 1, np.int64), np.zeros(0, np.int64), const)


def identity(shape, offset: int) -> Deps:
    shape = tuple(int(s) for s in shape)
    n = math.prod(shape)
    return Deps(shape, np.arange(n + 1, dtype=np.int64), offset + np.arange(n, dtype=np.int64))


def unique(keys: np.ndarray) -> np.ndarray:
    """Sorted unique int64 keys (sort-based: faster here than np.unique's hashing)."""
    keys = np.sort(keys.astype(np.int64, copy=False))
    if keys.size < 2:
        return keys
    keep = np.empty(keys.size, bool)
    keep[0] = True
    np.not_equal(keys[1:], keys[:-1], out=keep[1:])
    return keys[keep]


def from_coo(shape, rows: np.ndarray, cols: np.ndarray, n_inputs: int) -> Deps:
    """Deps from (element, input) pairs, removing duplicates."""
    shape = tuple(int(s) for s in shape)
    size = math.prod(shape)
    key = unique(rows.astype(np.int64) * max(n_inputs, 1) + cols.astype(np.int64))
    r, c = np.divmod(key, max(n_inputs, 1))
    indptr = np.concatenate([[0], np.cumsum(np.bincount(r, minlength=size))]).astype(np.int64)
    return Deps(shape, indptr, c)


def gather(d: Deps, idx: np.ndarray) -> Deps:
    """Element ``j`` of the result takes the set of element ``idx[j]`` of ``d`` (none where -1)."""
    idx = np.asarray(idx, np.int64)
    flat = idx.reshape(-1)
    valid = (flat >= 0) & (flat < d.size)
    safe = np.where(valid, flat, 0)
    starts = d.indptr[safe]
    lens = np.where(valid, d.indptr[safe + 1] - starts, 0)
    total = int(lens.sum())
    indptr = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    offs = np.arange(total) - np.repeat(indptr[:-1], lens)
    return Deps(tuple(idx.shape), indptr, d.indices[np.repeat(starts, lens) + offs])


def reduce_to(d: Deps, target: np.ndarray, shape, n_inputs: int) -> Deps:
    """Union the sets of all elements ``e`` into result element ``target[e]`` (dropped where -1)."""
    rows = d.rows()
    t = np.asarray(target, np.int64).reshape(-1)[rows]
    keep = t >= 0
    return from_coo(shape, t[keep], d.indices[keep], n_inputs)


def union(ds: Sequence[Deps], shape, n_inputs: int) -> Deps:
    """Element-wise union of same-shaped deps."""
    ds = [d for d in ds if d.nnz]
    if not ds:
        return empty(shape)
    if len(ds) == 1:
        return Deps(tuple(shape), ds[0].indptr, ds[0].indices)
    rows = np.concatenate([d.rows() for d in ds])
    cols = np.concatenate([d.indices for d in ds])
    return from_coo(shape, rows, cols, n_inputs)


def everything(ds: Sequence[Deps], shape, n_inputs: int) -> Deps:
    """The conservative answer: every output element depends on every input dependency."""
    cols = unique(np.concatenate([d.indices for d in ds] + [np.zeros(0, np.int64)]))
    size = math.prod(shape)
    indptr = np.arange(size + 1, dtype=np.int64) * cols.size
    return Deps(tuple(int(s) for s in shape), indptr, np.tile(cols, size))


def _broadcast_to(d: Deps, shape) -> Deps:
    if d.shape == tuple(shape):
        return d
    idx = np.broadcast_to(np.arange(d.size).reshape(d.shape), shape)
    return gather(d, idx)


# --- the interpreter ------------------------------------------------------------------------

ELEMENTWISE = {
    "neg",
    "sin",
    "cos",
    "tan",
    "asin",
    "acos",
    "atan",
    "sinh",
    "cosh",
    "tanh",
    "asinh",
    "acosh",
    "atanh",
    "exp",
    "exp2",
    "log",
    "log1p",
    "expm1",
    "sqrt",
    "rsqrt",
    "cbrt",
    "abs",
    "sign",
    "floor",
    "ceil",
    "round",
    "is_finite",
    "logistic",
    "erf",
    "erfc",
    "erf_inv",
    "lgamma",
    "digamma",
    "integer_pow",
    "pow",
    "add",
    "add_any",
    "sub",
    "mul",
    "div",
    "rem",
    "max",
    "min",
    "atan2",
    "nextafter",
    "square",
    "conj",
    "real",
    "imag",
    "complex",
    "select_n",
    "clamp",
    "convert_element_type",
    "reduce_precision",
    "copy",
    "copy_p",
    "polygamma",
    "igamma",
    "igammac",
    "bessel_i0e",
    "bessel_i1e",
    "zeta",
    "regularized_incomplete_beta",
    "tan",
    "optimization_barrier",
    "stop_gradient",
}
MOVES = {
    # primitive: positions of the operands whose data moves (the others are indices/params)
    "reshape": (0,),
    "transpose": (0,),
    "broadcast_in_dim": (0,),
    "squeeze": (0,),
    "expand_dims": (0,),
    "slice": (0,),
    "dynamic_slice": (0,),
    "rev": (0,),
    "gather": (0,),
    "concatenate": None,
    "pad": (0,),
    "dynamic_update_slice": (0, 1),
}
REDUCTIONS = {
    "reduce_sum",
    "reduce_max",
    "reduce_min",
    "reduce_prod",
    "reduce_and",
    "reduce_or",
    "argmax",
    "argmin",
    "reduce_xor",
}
CUMULATIVE = {"cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp"}
SCATTERS = {
    "scatter-add",
    "scatter_add",
    "scatter",
    "scatter-mul",
    "scatter_mul",
    "scatter-min",
    "scatter_min",
    "scatter-max",
    "scatter_max",
}


def _differentiable(aval) -> bool:
    return jnp.issubdtype(aval.dtype, jnp.inexact)


class Interpreter:
    """Propagates :class:`Deps` through a jaxpr; ``unknown`` collects unhandled primitives."""

    def __init__(self, n_inputs: int):
        self.n = n_inputs
        self.unknown: set[str] = set()
        self.seen: set[str] = set()  # every primitive met, nested ones included

    def run(self, jaxpr, consts: Sequence, args: Sequence[Deps]) -> list[Deps]:
        env = {}

        def read(v):
            if isinstance(v, jcore.Literal):
                return empty(np.shape(v.val), np.asarray(v.val))
            return env[v]

        for v, c in zip(jaxpr.constvars, consts, strict=True):
            c = np.asarray(c) if not isinstance(c, jax.core.Tracer) else None
            env[v] = empty(v.aval.shape, c)
        for v, a in zip(jaxpr.invars, args, strict=True):
            env[v] = a
        for eqn in jaxpr.eqns:
            ins = [read(v) for v in eqn.invars]
            outs = self.eqn(eqn, ins)
            for v, o in zip(eqn.outvars, outs, strict=True):
                if not isinstance(v, jcore.DropVar):
                    env[v] = o
        return [read(v) for v in jaxpr.outvars]

    def run_closed(self, closed, args):
        if isinstance(closed, jcore.ClosedJaxpr):
            return self.run(closed.jaxpr, closed.consts, args)
        return self.run(closed, [], args)

    # -- one equation --------------------------------------------------------------------

    def eqn(self, eqn, ins: list[Deps]) -> list[Deps]:
        name = eqn.primitive.name
        self.seen.add(name)
        out_avals = [v.aval for v in eqn.outvars]
        folded = self._fold(eqn, ins, out_avals)
        if folded is not None:
            return folded
        if not any(d.nnz for d in ins) or not any(_differentiable(a) for a in out_avals):
            # Nothing flows in, or nothing that has a derivative flows out.
            return [empty(a.shape) for a in out_avals]
        outs = self._dispatch(name, eqn, ins, out_avals)
        # Integer and boolean results have no derivative.
        return [o if _differentiable(a) else empty(a.shape) for o, a in zip(outs, out_avals, strict=True)]

    def _fold(self, eqn, ins, out_avals):
        # Fold when every input is a known constant (or, with no inputs, an iota).
        if ins:
            if any(d.const is None or d.nnz for d in ins):
                return None
        elif eqn.primitive.name != "iota":
            return None
        if sum(math.prod(a.shape) for a in out_avals) > _FOLD_MAX:
            return None
        try:
            vals = eqn.primitive.bind(*[d.const for d in ins], **eqn.params)
        except Exception:  # noqa: BLE001 - folding is an optimisation only
            return None
        vals = vals if eqn.primitive.multiple_results else [vals]
        return [empty(a.shape, np.asarray(v)) for a, v in zip(out_avals, vals, strict=True)]

    def _dispatch(self, name, eqn, ins, out_avals):
        shape = out_avals[0].shape
        if name in ELEMENTWISE:
            return [self._elementwise(eqn, ins, shape)]
        if name in MOVES:
            return [self._move(eqn, ins, MOVES[name])]
        if name in REDUCTIONS:
            return [self._reduce(ins[0], eqn.params["axes"], shape)]
        if name in CUMULATIVE:
            return [self._cumulative(ins[0], eqn.params["axis"], eqn.params["reverse"])]
        if name == "dot_general":
            return [self._dot_general(ins[0], ins[1], eqn.params["dimension_numbers"], shape)]
        if name in SCATTERS:
            return [self._scatter(eqn, ins, shape)]
        if name == "cond":
            return self._cond(eqn, ins, out_avals)
        if name == "while":
            return self._while(eqn, ins)
        if name == "scan":
            return self._scan(eqn, ins, out_avals)
        for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
            inner = eqn.params.get(key)
            if isinstance(inner, jcore.ClosedJaxpr | jcore.Jaxpr):
                n_in = len(inner.jaxpr.invars if isinstance(inner, jcore.ClosedJaxpr) else inner.invars)
                return self.run_closed(inner, ins[len(ins) - n_in :])
        self.unknown.add(name)
        return [everything(ins, a.shape, self.n) for a in out_avals]

    def _elementwise(self, eqn, ins, shape):
        if eqn.primitive.name == "select_n" and ins[0].const is not None:
            # A known predicate picks, element by element, exactly one case.
            which = np.broadcast_to(ins[0].const, shape).astype(np.int64).reshape(-1)
            cases = [_broadcast_to(d, shape) for d in ins[1:]]
            rows = [d.rows() for d in cases]
            keep = [which[r] == k for k, r in enumerate(rows)]
            return from_coo(
                shape,
                np.concatenate([r[m] for r, m in zip(rows, keep, strict=True)]),
                np.concatenate([d.indices[m] for d, m in zip(cases, keep, strict=True)]),
                self.n,
            )
        if eqn.primitive.name == "select_n":
            ins = ins[1:]  # the predicate carries no derivative
        return union([_broadcast_to(d, shape) for d in ins if d.nnz], shape, self.n)

    def _move(self, eqn, ins, data_pos):
        data_pos = range(len(ins)) if data_pos is None else data_pos
        args, offset, parts = [], 0, []
        is_pad = eqn.primitive.name == "pad"
        if is_pad and ins[1].nnz:  # a differentiable padding value reaches every output
            return everything(ins, eqn.outvars[0].aval.shape, self.n)
        for k, d in enumerate(ins):
            if is_pad and k == 1:
                args.append(np.zeros((), np.int32))  # padding is "no element"
            elif k in data_pos:
                # Number the data elements 1, 2, ...: 0 (padding, fill) means "no element".
                args.append(jnp.asarray(offset + 1 + np.arange(d.size).reshape(d.shape), jnp.int32))
                offset += d.size
                parts.append(d)
            elif d.const is not None:
                args.append(d.const)
            else:  # a traced index: anything may land anywhere
                return everything(ins, eqn.outvars[0].aval.shape, self.n)
        params = dict(eqn.params)
        if "fill_value" in params:
            params["fill_value"] = 0
        ids = np.asarray(eqn.primitive.bind(*args, **params)).astype(np.int64)
        idx = np.where((ids >= 1) & (ids <= offset), ids - 1, -1)
        stacked = _stack(parts)
        return gather(stacked, idx)

    def _reduce(self, d, axes, shape):
        coords = np.indices(d.shape).reshape(len(d.shape), -1)
        keep = [i for i in range(len(d.shape)) if i not in axes]
        target = np.ravel_multi_index(coords[keep], shape) if keep else np.zeros(d.size, np.int64)
        return reduce_to(d, target, shape, self.n)

    def _cumulative(self, d, axis, reverse):
        L = d.shape[axis]
        coords = np.indices(d.shape).reshape(len(d.shape), -1)
        rows = d.rows()
        cols = d.indices
        pos = coords[axis][rows]
        # Element at position k feeds positions k..L-1 (or 0..k when reversed).
        count = (L - pos) if not reverse else (pos + 1)
        rr = np.repeat(rows, count)
        start = np.repeat(np.cumsum(count) - count, count)
        step = np.arange(rr.size) - start
        newpos = np.repeat(pos, count) + (step if not reverse else -step)
        c = coords[:, rr]
        c[axis] = newpos
        return from_coo(d.shape, np.ravel_multi_index(c, d.shape), np.repeat(cols, count), self.n)

    def _dot_general(self, lhs, rhs, dims, shape):
        (lc, rc), (lb, rb) = dims
        lf = [i for i in range(len(lhs.shape)) if i not in lc and i not in lb]
        rf = [i for i in range(len(rhs.shape)) if i not in rc and i not in rb]
        B = math.prod(lhs.shape[i] for i in lb)
        M = math.prod(lhs.shape[i] for i in lf)
        K = math.prod(lhs.shape[i] for i in lc)
        N = math.prod(rhs.shape[i] for i in rf)
        # Element numbers of lhs as (B, M, K) and rhs as (B, K, N).
        lidx = np.transpose(np.arange(lhs.size).reshape(lhs.shape), list(lb) + lf + list(lc)).reshape(B, M, K)
        ridx = np.transpose(np.arange(rhs.size).reshape(rhs.shape), list(rb) + list(rc) + rf).reshape(B, K, N)
        parts = []
        for dep, other, idx, other_idx, is_lhs in ((lhs, rhs, lidx, ridx, True), (rhs, lhs, ridx, lidx, False)):
            if not dep.nnz:
                continue
            parts.append(self._dot_part(dep, other, idx, other_idx, is_lhs, (B, M, K, N), shape))
        return union(parts, shape, self.n)

    def _dot_part(self, dep, other, idx, other_idx, is_lhs, bmkn, shape):
        B, M, K, N = bmkn
        # Position of each element of `dep` as (b, free, k).
        inv = np.empty(dep.size, np.int64)
        inv[idx.reshape(-1)] = np.arange(dep.size)
        if is_lhs:
            b, f, k = np.unravel_index(inv, (B, M, K))
        else:
            b, k, f = np.unravel_index(inv, (B, K, N))
        rows = dep.rows()
        rb, rf, rk = b[rows], f[rows], k[rows]
        if other.const is None or not np.any(other.const == 0):
            # Every k reaches every output in the row: union over k, then broadcast.
            free = M if is_lhs else N
            u = from_coo((B, free), rb * free + rf, dep.indices, self.n)
            grid = np.arange(B * M * N).reshape(B, M, N)
            bb, mm, nn = np.unravel_index(grid, (B, M, N))
            src = bb * free + (mm if is_lhs else nn)
            return gather(u, src.reshape(shape))
        # A constant partner: join on k through its nonzeros.
        vals = np.asarray(other.const).reshape(-1)[other_idx.reshape(-1)].reshape(other_idx.shape)
        if is_lhs:
            ob, ok, on = np.nonzero(vals)  # (B, K, N)
            key = ob * K + ok
        else:
            ob, om, ok = np.nonzero(vals)  # (B, M, K)
            key = ob * K + ok
            on = om
        order = np.argsort(key, kind="stable")
        key, on = key[order], on[order]
        ptr = np.searchsorted(key, np.arange(B * K + 1))
        q = rb * K + rk
        cnt = ptr[q + 1] - ptr[q]
        if int(cnt.sum()) > _JOIN_MAX:
            return everything([dep], shape, self.n)
        rep = np.repeat(np.arange(rows.size), cnt)
        start = np.repeat(ptr[q], cnt) + (np.arange(rep.size) - np.repeat(np.cumsum(cnt) - cnt, cnt))
        partner_free = on[start]
        if is_lhs:
            out = (rb[rep] * M + rf[rep]) * N + partner_free
        else:
            out = (rb[rep] * M + partner_free) * N + rf[rep]
        return from_coo(shape, out, dep.indices[rep], self.n)

    def _scatter(self, eqn, ins, shape):
        operand, indices, updates = ins[0], ins[1], ins[2]
        if indices.const is None:
            return everything(ins, shape, self.n)
        size = math.prod(shape)
        dtype = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
        if size >= (1 << 24) and dtype == jnp.float32:
            return everything(ins, shape, self.n)
        params = {k: v for k, v in eqn.params.items()}
        zeros = jnp.zeros(shape, dtype)
        upd_aval = jax.ShapeDtypeStruct(updates.shape, dtype)

        def scatter_add(u):
            return jax.lax.scatter_add_p.bind(zeros, indices.const, u, **params)

        # The transpose of a scatter-add is the gather with the same indices:
        # it tells each update element which output element it lands in.
        ids = jnp.asarray(1 + np.arange(size).reshape(shape), dtype)
        (where,) = jax.linear_transpose(scatter_add, upd_aval)(ids)
        target = np.asarray(where).astype(np.int64).reshape(-1) - 1
        moved = reduce_to(updates, target, shape, self.n)
        return union([operand, moved], shape, self.n)

    def _cond(self, eqn, ins, out_avals):
        results = [self.run_closed(br, ins[1:]) for br in eqn.params["branches"]]
        per_output = zip(*results, strict=True)
        return [union(list(outs), a.shape, self.n) for outs, a in zip(per_output, out_avals, strict=True)]

    def _while(self, eqn, ins):
        p = eqn.params
        nc, nb = p["cond_nconsts"], p["body_nconsts"]
        consts, carry = ins[nc : nc + nb], ins[nc + nb :]
        carry = [Deps(c.shape, c.indptr, c.indices) for c in carry]  # values change in the loop
        for _ in range(_LOOP_MAX):
            new = self.run_closed(p["body_jaxpr"], consts + carry)
            merged = [union([c, n], c.shape, self.n) for c, n in zip(carry, new, strict=True)]
            if all(m.nnz == c.nnz for m, c in zip(merged, carry, strict=True)):
                return merged
            carry = merged
        return [everything(ins, c.shape, self.n) for c in carry]

    def _scan(self, eqn, ins, out_avals):
        p = eqn.params
        nc, nk = p["num_consts"], p["num_carry"]
        consts, carry, xs = ins[:nc], ins[nc : nc + nk], ins[nc + nk :]
        carry = [Deps(c.shape, c.indptr, c.indices) for c in carry]
        # Conservatively, an iteration's slice of xs depends on every slice.
        x_slices = []
        for x in xs:
            sl = x.shape[1:]
            target = np.arange(x.size) % max(math.prod(sl), 1)
            x_slices.append(reduce_to(x, target, sl, self.n))
        for _ in range(_LOOP_MAX):
            outs = self.run_closed(p["jaxpr"], consts + carry + x_slices)
            merged = [union([c, n], c.shape, self.n) for c, n in zip(carry, outs[:nk], strict=True)]
            if all(m.nnz == c.nnz for m, c in zip(merged, carry, strict=True)):
                break
            carry = merged
        else:
            return [everything(ins, a.shape, self.n) for a in out_avals]
        ys = []
        for y, a in zip(outs[nk:], out_avals[nk:], strict=True):
            idx = np.broadcast_to(np.arange(y.size).reshape(y.shape), a.shape)
            ys.append(gather(y, idx))
        return merged + ys


def _stack(parts: Sequence[Deps]) -> Deps:
    """Concatenate the element lists of several deps (element numbering continues)."""
    if len(parts) == 1:
        return parts[0]
    indptr = [np.zeros(1, np.int64)]
    base = 0
    for d in parts:
        indptr.append(d.indptr[1:] + base)
        base += d.nnz
    size = sum(d.size for d in parts)
    return Deps((size,), np.concatenate(indptr), np.concatenate([d.indices for d in parts]))


def detect(fun, args: Sequence, argnum: int) -> tuple[tuple, tuple, np.ndarray, np.ndarray, set[str]]:
    """Trace ``fun(*args)`` abstractly.

    Returns:
      ``(out_shape, in_shape, rows, cols, primitives)``: the pattern's nonzeros in the
      flattened matrix and the names of all primitives met.
    """
    closed = jax.make_jaxpr(fun)(*args)
    leaves_per_arg = [len(jax.tree_util.tree_leaves(a)) for a in args]
    x_leaf = sum(leaves_per_arg[:argnum])
    in_shape = tuple(args[argnum].shape)
    n = math.prod(in_shape)
    interp = Interpreter(n)
    invals = [
        identity(v.aval.shape, 0) if i == x_leaf else empty(v.aval.shape) for i, v in enumerate(closed.jaxpr.invars)
    ]
    (out,) = interp.run(closed.jaxpr, closed.consts, invals)
    for name in sorted(interp.unknown):
        warnings.warn(
            f"jacobians.sparsity: no sparsity rule for primitive '{name}'; assuming each of its "
            "outputs depends on all of its inputs (the pattern stays correct, maybe denser).",
            stacklevel=3,
        )
    return tuple(out.shape), in_shape, out.rows(), out.indices, interp.seen
