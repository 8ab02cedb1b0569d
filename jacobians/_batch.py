"""Per-example Jacobians of batch-first functions, with the independence of the examples proved first.

For ``f(X)`` with ``X`` of shape ``(B, n)`` the per-example Jacobians
``(B, m, n)`` are the diagonal blocks of the ``(B, m, B, n)`` Jacobian. When
example ``b``'s output reads only example ``b``'s input, the off-diagonal
blocks vanish and the blocks come from ``n`` JVPs over the whole batch (a
tangent with feature ``j`` set in every example) or ``m`` VJPs of the
batch-summed output: not ``B * n``. That premise is checked, not assumed: the
dependency lattice runs on the jaxpr with every element labelled by its
example, and any element that mixes examples (a batch mean, BatchNorm, a sort
or attention across the batch) is reported with the primitive and the line
that does it. The proof is certified once against JAX (a JVP whose tangent
lives in some examples only must leave the other examples' outputs exactly
zero), and so is a structured sweep the planner picks (its blocks against a
JVP); a proof that crashes falls back to the diagonal blocks of the full
Jacobian, with a :class:`jacobians.PlanWarning` (see :mod:`._trust`).
"""

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from . import _args, _compat, _deps, _memory, _mesh, _planner, _sweeps, _trust, kernels
from ._leaves import Leaves, blocks
from ._walker import Walker, has_custom_vjp


class CoupledBatchError(ValueError):
    """The examples of a batch are not independent: ``batch_jacobian`` would be wrong."""


def _batched_gather(lat, eqn, ins):
    """A gather by traced indices whose operand has batching dimensions: each result element reads its own batch.

    ``jax.vmap`` of ``table[i]`` with per-example ``i`` (an embedding lookup,
    the pivots of a batched LU) gathers with ``operand_batching_dims``: result
    element ``e`` reads only operand elements whose coordinates along those
    dimensions are the indices' own, whatever the index values. So ``e`` takes
    the union of the sets of its batch (not of the whole operand, as for
    other traced indices). The batch of each result element comes from the
    same gather run on the host on the operand's batch numbers, at zero indices.
    Example: sets [[{0}, {1}], [{2}, {3}]] (batch dim 0), one traced index
    per batch -> [{0, 1}, {2, 3}].
    """
    operand, indices = ins
    dn = eqn.params["dimension_numbers"]
    bdims = tuple(getattr(dn, "operand_batching_dims", ()) or ())
    partial = getattr(indices, "partial", None)
    if indices.const is None and partial is not None and operand.nnz:
        out = _partly_known_gather(lat, eqn, operand, *partial)
        if out is not None:
            return out
    if indices.const is not None or not bdims or not operand.nnz:
        return _deps.RULES["gather"](lat, eqn, ins)
    shape = operand.shape
    ids = np.zeros(shape, np.int32)
    count = 1
    for d in reversed(bdims):  # the batch number of each operand element, row-major over the batching dims
        ids += (np.arange(shape[d], dtype=np.int32) * count).reshape([-1 if i == d else 1 for i in range(len(shape))])
        count *= shape[d]
    params = dict(eqn.params, mode=jax.lax.GatherScatterMode.CLIP, fill_value=None)
    at = np.zeros(eqn.invars[1].aval.shape, eqn.invars[1].aval.dtype)  # any in-bounds index: the batch is fixed
    where = np.asarray(eqn.primitive.bind(ids, at, **params))
    groups = _deps.reduce_to(operand, ids, (count,), lat.n)
    return [_deps.gather(groups, where)]


def _partly_known_gather(lat, eqn, operand, values: np.ndarray, known: np.ndarray):
    """A gather whose index components are partly known (``X[jnp.arange(B), labels]``), or ``None``.

    A component known everywhere indexes as given; an unknown one may start its
    slice anywhere along its operand dimension, so the operand's sets are first
    joined along those dimensions, then gathered at index 0 there. Example: sets
    [[{0}, {1}], [{2}, {3}]] gathered at ([0, 1], unknown) -> [{0, 1}, {2, 3}].
    """
    dn = eqn.params["dimension_numbers"]
    k = known.shape[-1]  # JAX's gather: the index vector is the last dimension
    sure = known.reshape(-1, k).all(axis=0)
    if not sure.any():
        return None
    shape = operand.shape
    ids = np.arange(operand.size).reshape(shape)
    for c in np.flatnonzero(~sure):  # each element -> the first element of its line along the unknown dimensions
        d = dn.start_index_map[c]
        ids = np.broadcast_to(np.take(ids, [0], axis=d), shape)
    lines = _deps.gather(_deps.reduce_to(operand, ids.reshape(-1), (operand.size,), lat.n), ids)
    at = np.where(known, values, 0).astype(eqn.invars[1].aval.dtype)
    return _deps.RULES["gather"](lat, eqn, [lines, _deps.empty(at.shape, at)])


def _batched_scatter(lat, eqn, ins):
    """A scatter by traced indices that keeps each update in its batch (vmapped ``x.at[i].add(u)``) or on a line.

    With ``operand_batching_dims`` an update lands in its own batch whatever the
    index values; an index component known everywhere (``x.at[jnp.arange(B),
    labels]``) fixes its operand coordinate. Every other coordinate may be
    anything: each update is unioned into the whole line of elements along the
    dimensions of the unknown components, and the operand's own sets are kept
    (a ``set`` may or may not overwrite them). Updates without sets leave the
    operand's sets where they are. Where none of this applies, the generic
    rule (every update may land anywhere).
    Example: operand [[{0}, {1}], [{2}, {3}]] (batch dim 0), updates [{4}, {5}]
    at traced indices -> [[{0, 4}, {1, 4}], [{2, 5}, {3, 5}]].
    """
    operand, indices, updates = ins[0], ins[1], ins[2]
    dn = eqn.params["dimension_numbers"]
    bdims = tuple(getattr(dn, "operand_batching_dims", ()) or ())
    partial = getattr(indices, "partial", None)
    k = eqn.invars[1].aval.shape[-1] if eqn.invars[1].aval.ndim else 0  # the index vector: the last dimension
    if partial is not None:
        values, known = partial
        sure = known.reshape(-1, k).all(axis=0) if k else np.zeros(0, bool)
    else:
        values, sure = np.zeros(eqn.invars[1].aval.shape, np.int64), np.zeros(k, bool)
    if indices.const is None and not updates.nnz:  # constant updates wherever they land: the operand's own sets
        return [_deps.Deps(operand.shape, operand.indptr, operand.indices)]
    if indices.const is not None or not (bdims or sure.any()):
        return _deps.RULES[eqn.primitive.name](lat, eqn, ins)
    shape = eqn.outvars[0].aval.shape
    size = math.prod(shape)
    ids = np.arange(size).reshape(shape)
    line = ids
    for c in np.flatnonzero(~sure):  # each element -> the first element of its line along the unknown dimensions
        line = np.broadcast_to(np.take(line, [0], axis=dn.scatter_dims_to_operand_dims[c]), shape)
    known_at = np.broadcast_to(sure, values.shape) if k else np.zeros(values.shape, bool)
    at = np.where(known_at, values, 0).astype(eqn.invars[1].aval.dtype)
    params = dict(eqn.params, mode=jax.lax.GatherScatterMode.CLIP)
    dtype = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32

    def scatter_add(u):
        return jax.lax.scatter_add_p.bind(jnp.zeros(shape, dtype), at, u, **params)

    # The transposed scatter-add (a gather) tells each update element where it lands at these indices (1-based).
    (where,) = jax.linear_transpose(scatter_add, jax.ShapeDtypeStruct(updates.shape, dtype))(
        jnp.asarray(1 + ids, dtype))
    target = np.asarray(where).astype(np.int64).reshape(-1) - 1
    target = np.where(target >= 0, line.reshape(-1)[np.maximum(target, 0)], -1)
    moved = _deps.reduce_to(_deps.broadcast_to(updates, updates.shape), target, (size,), lat.n)
    moved = _deps.gather(moved, line)
    return [_deps.union([operand, moved], shape, lat.n)]


class _PreciseLattice(_deps.DepsLattice):
    """The dependency lattice with the finer rules above (batched gathers and scatters).

    Sound for any inputs; custom rules' local patterns (``fresh``) use them too,
    so a ``custom_jvp`` around a batched solve (``slogdet``) stays per-example.
    """

    rules = {**_deps.DepsLattice.rules, "gather": _batched_gather,
             **{name: _batched_scatter for name in ("scatter", "scatter-add", "scatter_add", "scatter-sub",
                                                    "scatter_sub", "scatter-mul", "scatter_mul", "scatter-min",
                                                    "scatter_min", "scatter-max", "scatter_max")
                if name in _deps.DepsLattice.rules}}

    def skip(self, eqn, ins):
        """Index arithmetic on unknown values: keep the known part of a concatenation of indices.

        ``X[jnp.arange(B), labels]`` concatenates a known ``arange`` with traced
        labels; the gather that follows needs the known component (it keeps
        every example to itself), so the result remembers ``partial = (values,
        known)`` (values where known).
        """
        outs = super().skip(eqn, ins)
        name = eqn.primitive.name
        if name == "concatenate" and any(d.const is not None or hasattr(d, "partial") for d in ins):
            vals, known = [], []
            for d, v in zip(ins, eqn.invars, strict=True):
                shape, dtype = v.aval.shape, eqn.outvars[0].aval.dtype
                if d.const is not None:
                    vals.append(np.asarray(d.const).astype(dtype))
                    known.append(np.ones(shape, bool))
                elif hasattr(d, "partial"):
                    vals.append(d.partial[0].astype(dtype))
                    known.append(d.partial[1])
                else:
                    vals.append(np.zeros(shape, dtype))
                    known.append(np.zeros(shape, bool))
            dim = eqn.params["dimension"]
            outs[0].partial = (np.concatenate(vals, axis=dim), np.concatenate(known, axis=dim))
        elif name == "convert_element_type" and hasattr(ins[0], "partial"):
            outs[0].partial = (ins[0].partial[0].astype(eqn.params["new_dtype"]), ins[0].partial[1])
        return outs

    def fresh(self, n: int) -> "_deps.DepsLattice":
        sub = _PreciseLattice(n)
        sub.untraced = self.untraced
        return sub


class _BatchLattice(_PreciseLattice):
    """Dependency sets over example labels; remembers the first equation that mixes examples."""

    name = "jacobians batch independence"

    def __init__(self, n: int):
        super().__init__(n)
        self.culprit = None

    def post(self, eqn, outs):
        outs = super().post(eqn, outs)
        if self.culprit is None and any(o.nnz and np.diff(o.indptr).max() > 1 for o in outs):
            self.culprit = eqn
        return outs


def _where(eqn) -> str:
    where = _compat.source_summary(eqn.source_info)
    return "an unknown location" if where is None else where or "a line inside JAX"


def _move_to_front(x, axis):
    return jnp.moveaxis(x, axis, 0) if axis != 0 else x


def _labels(shape, axis) -> np.ndarray:
    """Each element's index along ``axis`` (its example), raveled."""
    idx = np.arange(shape[axis]).reshape([-1 if i == axis else 1 for i in range(len(shape))])
    return np.broadcast_to(idx, shape).reshape(-1).astype(np.int64)


def _examples(traced_flat, in_axes: int, out_axes: int) -> tuple[np.ndarray, np.ndarray]:
    """The example of each entry of the flat input ``x (n,)`` and the flat output ``y (m,)``."""
    closed, offsets, p = traced_flat
    leaves = sorted((off, v.aval.shape) for v, off in zip(closed.jaxpr.invars, offsets, strict=True) if off is not None)
    ins = [_labels(shape, in_axes) for _, shape in leaves]
    outs = [_labels(o.shape, out_axes % len(o.shape)) for o in p.out_leaves]
    return np.concatenate(ins), np.concatenate(outs)


def _prove(traced_flat, where: str, in_axes, out_axes, batch: int):
    """Raise :class:`CoupledBatchError` unless output example ``b`` reads only input example ``b``."""

    def labels(aval, axis):
        shape = aval.shape
        idx = _labels(shape, axis)
        return _deps.Deps(tuple(shape), np.arange(idx.size + 1, dtype=np.int64), idx)

    closed, offsets, p = traced_flat
    # Seeds: every differentiated leaf is labelled by example along its batch axis.
    seeds = [
        labels(v.aval, in_axes) if off is not None else _deps.empty(v.aval.shape)
        for v, off in zip(closed.jaxpr.invars, offsets, strict=True)
    ]
    lat = _BatchLattice(batch)
    (flat_out,) = Walker(lat).run(closed, seeds)
    # Cut the flat output back into leaves and check each element's labels against its example.
    off = 0
    for leaf in p.out_leaves:
        size = math.prod(leaf.shape)
        ax = out_axes % len(leaf.shape)
        ex = np.broadcast_to(
            np.arange(leaf.shape[ax]).reshape([-1 if i == ax else 1 for i in range(len(leaf.shape))]), leaf.shape
        ).reshape(-1)
        ptr = flat_out.indptr[off : off + size + 1]
        lens = np.diff(ptr)
        owners = np.repeat(ex, lens)
        got = flat_out.indices[ptr[0] : ptr[-1]]
        bad = np.flatnonzero(got != owners)
        if bad.size:
            elem = np.searchsorted(np.cumsum(lens), bad[0], side="right")
            b_out, b_in = int(ex[elem]), int(got[bad[0]])
            if lat.culprit is not None:
                how = f"'{lat.culprit.primitive.name}' at {_where(lat.culprit)} combines several examples"
            else:
                how = "a data movement along the batch axis (a roll, reverse or gather across examples) reorders them"
            raise CoupledBatchError(
                f"{where}: the examples are not independent: output example {b_out} depends on input example "
                f"{b_in}; {how}. {_advice(where)}"
            )
        off += size


def _advice(where: str) -> str:
    """What to do instead of a per-example Jacobian (or log-determinant) of coupled examples."""
    if where == "jacobians.batch_jacobian":
        return ("Per-example Jacobians would silently drop those derivatives. Write the per-example function "
                "and use jax.vmap(jacobians.jacobian(f_single)), or jacobians.jacobian(f) for the full "
                "(B, ..., B, ...) tensor.")
    return (f"Per-example results would silently drop those derivatives. Write the per-example function and "
            f"call {where}(f_single, batched=True), or {where}(f) without batch_first for the whole map's.")


def _certify_independence(traced_flat, values, in_axes: int, out_axes: int, batch: int) -> "_trust.Certificate":
    """Certify the proof: JVPs whose tangents live in some examples only leave the others' outputs exactly zero.

    The tangents live in the first example, the last, and a random half. Where a ``custom_vjp``
    bars JVPs, the same by VJPs: cotangents in some examples leave the others' inputs' exactly zero.
    """
    in_ex, out_ex = _examples(traced_flat, in_axes, out_axes)
    groups = [np.array([0]), np.array([batch - 1])]
    half = np.random.default_rng(_trust.SEED).permutation(batch)[: max(batch // 2, 1)]
    groups.append(np.sort(half))
    reverse = has_custom_vjp(traced_flat[0])
    seeded, read = (out_ex, in_ex) if reverse else (in_ex, out_ex)

    def directions(rng, p):
        z = rng.standard_normal((len(groups), p.m if reverse else p.n))
        return (z * np.stack([np.isin(seeded, g) for g in groups])).astype(p.out_dtype if reverse else p.x.dtype)

    def program(p, T, leaves):
        f = lambda x: p.flat(x)[0]  # noqa: E731
        if reverse:
            pull = jax.vjp(f, p.x)[1]
            return (jax.vmap(lambda u: pull(u)[0])(T),)
        return (jax.vmap(lambda t: jax.jvp(f, (p.x,), (t,))[1])(T),)

    def judge(outs, T, tol):
        (ref,) = outs
        kind, entry = ("a cotangent", "input") if reverse else ("a tangent", "output")
        for g, r in zip(groups, ref, strict=True):
            leak = np.flatnonzero((r != 0) & ~np.isin(read, g))
            if leak.size:
                i = int(leak[0])
                shown = f"example {int(g[0])}" if g.size == 1 else f"{g.size} examples"
                return (f"{kind} in {shown} changed {entry} entry {i} of example {int(read[i])} by {r[i]:.3g} "
                        f"({leak.size} such entries)")
        return None

    how = "VJPs with cotangents" if reverse else "JVPs with tangents"
    return _trust.certify(traced_flat, values, program, judge, f"{how} in some examples only", directions)


def _per_example(blk: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``blk[b] . v[b]`` for each example: ``(B,) + out + in`` with ``(B,) + in`` -> ``(B,) + out``."""
    b, k = v.shape[0], math.prod(v.shape[1:])
    out = blk.shape[1 : blk.ndim - v.ndim + 1]
    return np.einsum("box,bx->bo", blk.reshape(b, -1, k), v.reshape(b, k)).reshape((b,) + out)


def _certify_blocks(t, spec, opts: "_Options", traced_flat, values, mode: str, in_axes: int) -> "_trust.Certificate":
    """The blocks a batch plan gives, applied to random per-example tangents, against one JVP of ``fun``."""
    closed, offsets, meta = traced_flat
    forced = dataclasses.replace(opts, force=mode, shards=None)
    inputs = Leaves(tuple(shape for _, shape in sorted((off, v.aval.shape) for v, off in
                                                       zip(closed.jaxpr.invars, offsets, strict=True)
                                                       if off is not None)))

    def program(p, T, leaves):
        res = _compute(t, spec, forced, *leaves)
        blocks = jax.tree_util.tree_leaves(res[0] if opts.has_aux else res)
        ref = jax.vmap(lambda v: jax.jvp(lambda x: p.flat(x)[0], (p.x,), (v,))[1])(T)
        return (*blocks, ref)

    def judge(outs, T, tol):
        *blocks, ref = outs
        got = np.zeros(ref.shape, np.result_type(ref, np.float64))
        bound = np.zeros(ref.shape)
        for k, t_k in enumerate(T):
            vs = [np.moveaxis(v, in_axes, 0).astype(np.float64) for v in inputs.split(t_k)]
            ys, bs = [], []
            for i, leaf in enumerate(meta.out_leaves):
                row = blocks[i * len(vs) : (i + 1) * len(vs)]
                y = sum(_per_example(np.asarray(blk), v) for blk, v in zip(row, vs, strict=True))
                yb = sum(_per_example(np.abs(np.asarray(blk)), np.abs(v)) for blk, v in zip(row, vs, strict=True))
                ax = opts.out_axes % len(leaf.shape)
                ys.append(np.moveaxis(y, 0, ax).reshape(-1))
                bs.append(np.moveaxis(yb, 0, ax).reshape(-1))
            got[k], bound[k] = np.concatenate(ys), np.concatenate(bs)
        return _trust.compare(got, ref, bound, tol, "output entry")

    return _trust.certify(traced_flat, values, program, judge, f"JVPs through the {mode} blocks")


def _independence(t, spec, opts: "_Options", traced, avals, in_ax: int, batch: int) -> dict:
    """Prove the examples independent and certify the proof (a plan dict; ``"mode": "full"`` if the proof failed).

    Raises:
      CoupledBatchError: the proof, or (not strict) its certificate, finds examples that interact.
    """
    where = t.where
    traced_flat = _args.trace_flat(t, spec, avals, has_aux=opts.has_aux)
    values = _trust.concrete(traced) or _trust.call_values(spec, t)
    try:
        with _trust.stage("batch independence proof", passing=(CoupledBatchError,)):
            _prove(traced_flat, where, in_ax, opts.out_axes, batch)
        with _trust.stage("certificate"):
            cert = _certify_independence(traced_flat, values, in_ax, opts.out_axes, batch)
    except _trust.AnalysisError as e:
        return {"mode": "full", "note": _trust.analysis_failed(where, e)}
    if cert.failed:
        if _trust.is_strict():
            _trust.certificate_failed(where, "batch independence proof's", cert.detail)
        raise CoupledBatchError(
            f"{where}: the examples are not independent: {cert.detail}. (The jaxpr analysis had proved them "
            f"independent, a defect of jacobians: please report it.) {_advice(where)}"
        )
    return {"traced_flat": traced_flat, "values": values, "certificate": cert}


def _choose(t, spec, opts: "_Options", plan, in_ax, default, view: "_Batch") -> str:
    """The cost model's choice between the batch-sum passes and the structured sweeps, certified."""
    where = t.where
    n, dtype = view.per.total, view.dtype
    try:
        closed = jax.make_jaxpr(lambda v: view.shifted(v)[0])(jnp.zeros(n, dtype))

        def structured(sweep):
            if sweep == "fwd":
                return jax.make_jaxpr(lambda v: _sweeps.jacobian(view.shifted, v, "fwd")[1])(jnp.zeros(n, dtype))
            return jax.make_jaxpr(lambda v: _sweeps.jacobian(view.summed, v, "rev")[1])(view.flat())

        choice = _planner.choose(closed, n, view.m, None, None, structured)
        if choice.method != "structured":
            return choice.mode
        mode = f"structured {choice.mode}"
        with _trust.stage("certificate"):
            cert = _certify_blocks(t, spec, opts, plan["traced_flat"], plan["values"], mode, in_ax)
    except Exception as e:  # noqa: BLE001 - reported (strict: raised) by analysis_failed
        plan["note"] = _trust.analysis_failed(where, e, "planner's cost model")
        return default
    if cert.failed:
        plan["note"] = _trust.certificate_failed(where, f"batch {mode}", cert.detail)
        return default
    return mode


@dataclasses.dataclass(frozen=True)
class _Options:
    """``batch_jacobian``'s options, checked once, and its plan cache (per call structure and shapes)."""

    mode: _args.Mode
    has_aux: bool
    chunk_size: int | None
    in_axes: int
    out_axes: int
    shards: object
    force: str | None = None  # a batch mode the certificate evaluates (the plan cache is bypassed)
    plans: dict = dataclasses.field(default_factory=dict, repr=False)


@dataclasses.dataclass(frozen=True)
class _Batch:
    """The batch-first view of one call: leaves with the batch in front, and the batch-sum maps over them.

    ``fronts[k]`` is ``(B,) + per.shapes[k]``; the flat per-example input is
    ``(n,) = per.total``, the flat whole-batch input ``(B n,)`` in ``whole``'s
    layout (leaf after leaf, each row-major with its batch first), the
    per-example output ``(m,)``.
    """

    fronts: tuple
    call: Callable  # leaves with the batch in front -> (output pytree, aux)
    m: int
    out_axes: int
    out_dtype: object

    @property
    def batch(self) -> int:
        return self.fronts[0].shape[0]

    @property
    def per(self) -> Leaves:
        return Leaves(tuple(x.shape[1:] for x in self.fronts))

    @property
    def whole(self) -> Leaves:
        return Leaves.of(self.fronts)

    @property
    def dtype(self):
        return _args.promote(*(x.dtype for x in self.fronts))

    def flat(self):
        """The whole batch as one flat ``(B n,)`` vector."""
        return jnp.concatenate([x.reshape(-1).astype(self.dtype) for x in self.fronts])

    def per_example(self, y):
        """The output pytree as ``(B, m)``."""
        return jnp.concatenate([jnp.moveaxis(o, self.out_axes, 0).reshape(self.batch, -1).astype(self.out_dtype)
                                for o in jax.tree_util.tree_leaves(y)], axis=1)

    def shifted(self, v):
        """``v (n,)`` added to every example: the batch-sum trick, forward (one JVP per feature)."""
        y, aux = self.call([x + d[None].astype(x.dtype) for x, d in zip(self.fronts, self.per.split(v), strict=True)])
        return self.per_example(y).reshape(-1), aux

    def parts(self, xflat):
        """``(output, aux)`` at the whole batch given flat (``(B n,)``)."""
        return self.call([d.astype(x.dtype) for x, d in zip(self.fronts, self.whole.split(xflat), strict=True)])

    def stacked(self, xflat):
        """The whole batch's outputs, flat ``(B m,)``: the map whose full Jacobian holds the blocks."""
        y, aux = self.parts(xflat)
        return self.per_example(y).reshape(-1), aux

    def summed(self, xflat):
        """The outputs summed over the batch: the batch-sum trick, reverse (one VJP per output)."""
        y, aux = self.parts(xflat)
        return self.per_example(y).sum(axis=0), aux

    def columns(self, jac):
        """``(..., B n)`` in ``whole``'s layout -> ``(..., B, n)`` in ``per``'s."""
        lead = jac.shape[:-1]
        return jnp.concatenate([blk.reshape(lead + (self.batch, -1)) for blk in self.whole.split(jac, axis=-1)],
                               axis=-1)

    def run(self, mode: str, chunk_size: int | None):
        """``(B, m, n)`` per-example Jacobians and aux, by one of the batch modes."""
        b, m, n = self.batch, self.m, self.per.total
        if mode.startswith("full"):  # the diagonal blocks of the whole (B m, B n) Jacobian: right for any function
            kernel = kernels.forward if mode.endswith("fwd") else kernels.reverse
            _, jac, aux = kernel(self.stacked, self.flat(), chunk_size)  # (B m, B n)
            diag = jnp.arange(b)
            return self.columns(jac.reshape(b, m, -1))[diag, :, diag, :], aux
        if mode.startswith("structured"):  # the same batch-sum maps, one structured sweep each
            if mode.endswith("fwd"):
                _, jac, aux = _sweeps.jacobian(self.shifted, jnp.zeros(n, self.dtype), "fwd")
                return jac.reshape(b, m, n), aux
            _, jac, aux = _sweeps.jacobian(self.summed, self.flat(), "rev")
            return jnp.transpose(self.columns(jac), (1, 0, 2)), aux
        if mode == "fwd":
            _, jac, aux = kernels.forward(self.shifted, jnp.zeros(n, self.dtype), chunk_size)
            return jac.reshape(b, m, n), aux
        _, jac, aux = kernels.reverse(self.summed, self.flat(), chunk_size)  # (m, B n)
        return jnp.transpose(self.columns(jac), (1, 0, 2)), aux


def _compute(t, spec, opts: _Options, *traced):
    where = t.where
    in_axes, out_axes = opts.in_axes, opts.out_axes
    args, kwargs, diff = spec.rebuild(traced)
    _args.check_diff_dtypes(diff, spec.positions, where, False)
    in_tree = diff[0] if t.int_argnums else diff
    in_leaves, in_treedef = jax.tree_util.tree_flatten(in_tree)
    for x in in_leaves:
        if x.ndim == 0 or not -x.ndim <= in_axes < x.ndim:
            raise ValueError(f"{where}: the batch axis in_axes={in_axes} is not an axis of a differentiated leaf "
                             f"of shape {x.shape}.")
    batches = {x.shape[in_axes] for x in in_leaves}
    if len(batches) != 1:
        raise ValueError(f"{where}: the differentiated leaves disagree on the batch size: {sorted(batches)}.")
    (real_batch,) = batches
    in_ax = in_axes % in_leaves[0].ndim
    fronts = [_move_to_front(x, in_ax) for x in in_leaves]
    shards = opts.shards
    if shards is not None and shards.count > 1:
        # Split the batch across the mesh: pad with copies of the last example, trim afterwards.
        fronts = [shards.constrain(_mesh.pad_batch(x, shards.count)) for x in fronts]

    def call(leaves_front):
        leaves = [jnp.moveaxis(x, 0, in_ax) if in_ax else x for x in leaves_front]
        tree = in_treedef.unflatten(leaves)
        a = list(args)
        for pos, d in zip(spec.positions, (tree,) if t.int_argnums else tree, strict=True):
            a[pos] = d
        res = t.fun(*a, **kwargs)
        return _args.split_aux(res, where) if opts.has_aux else (res, None)

    out, _ = _args.traced_output(call, [x[:real_batch] for x in fronts], where, False)[1]  # non-arrays named
    _args.check_float_outputs(out, where)
    out_leaves, out_treedef = jax.tree_util.tree_flatten(out)
    for o in out_leaves:
        if o.ndim == 0 or not -o.ndim <= out_axes < o.ndim or o.shape[out_axes] != real_batch:
            raise ValueError(
                f"{where}: every output needs the batch axis out_axes={out_axes} of size {real_batch}, got shape "
                f"{o.shape}."
            )
    # Per-example output leaves: the batch axis dropped.
    outs = Leaves(tuple(tuple(int(d) for d in np.delete(o.shape, out_axes % len(o.shape))) for o in out_leaves))
    if real_batch == 0:  # no examples: the empty stack of per-example blocks (nothing to prove or push)
        _, aux = call(fronts)
        rows = [in_treedef.unflatten([jnp.zeros((0,) + oshape + x.shape[1:], _args.promote(o.dtype, x.dtype))
                                      for x in fronts]) for o, oshape in zip(out_leaves, outs.shapes, strict=True)]
        result = out_treedef.unflatten(rows)
        return (result, aux) if opts.has_aux else result
    key = (spec, _args.shapes_key(traced))
    plan = opts.plans.get(key) if opts.force is None else {"mode": opts.force}
    if plan is None:  # once per call structure and shapes, on the host
        avals = [jax.ShapeDtypeStruct(np.shape(a), a.dtype) for a in traced]
        plan = opts.plans[key] = _independence(t, spec, opts, traced, avals, in_ax, real_batch)
    view = _Batch(tuple(fronts), call, outs.total, out_axes, _args.promote(*(o.dtype for o in out_leaves)))

    # Reverse mode on a complex output of real inputs gives the real part only (it is no Jacobian): forward.
    complex_out = any(jnp.issubdtype(o.dtype, jnp.complexfloating) for o in out_leaves)
    if complex_out and opts.mode == "rev":
        raise _args.complex_rev_error(where)
    default = opts.mode if opts.mode != "auto" else ("fwd" if complex_out or view.per.total <= view.m else "rev")
    if "mode" not in plan:  # the proof held: the planner's choice between batch-sum passes and structured sweeps
        plan["mode"] = default
        if (opts.mode == "auto" and opts.chunk_size is None and (shards is None or shards.count <= 1)
                and not complex_out):
            plan["mode"] = _choose(t, spec, opts, plan, in_ax, default, view)
    preferred = plan["mode"]
    if preferred == "full":
        preferred = f"full {default}"

    def run(mode):
        return view.run(mode, opts.chunk_size)

    if opts.mode == "auto" and preferred.startswith("full"):
        jac, aux = _args.with_fallback(run, preferred, "full rev", "full fwd", where)
    elif opts.mode == "auto" and not preferred.startswith("structured"):
        jac, aux = _args.with_fallback(run, preferred, "rev", "fwd", where)
    elif opts.mode == "auto":
        jac, aux = run(preferred)
    else:
        jac, aux = _args.in_mode(where, opts.mode, run, preferred)

    # (B, m, n) -> per (output leaf, input leaf) blocks (B,) + out + in (5.58, per example).
    cut = blocks(jac, outs, view.per)
    rows = [in_treedef.unflatten([blk.astype(_args.promote(o.dtype, x.dtype)) for blk, x in zip(row, fronts,
                                                                                                 strict=True)])
            for row, o in zip(cut, out_leaves, strict=True)]
    result = out_treedef.unflatten(rows)
    if view.batch != real_batch:
        result = jax.tree_util.tree_map(lambda a: a[:real_batch], result)
        if opts.has_aux:  # the passes' aux saw the padding (copies of the last example): the real batch's own
            aux = call([x[:real_batch] for x in fronts])[1]
    result = _mesh.shard_result(result, shards, lambda leaf: 0)
    return (result, aux) if opts.has_aux else result


def batch_jacobian(
    fun: Callable,
    argnums: int | tuple[int, ...] = 0,
    *,
    in_axes: int = 0,
    out_axes: int = 0,
    mode: str = "auto",
    has_aux: bool = False,
    chunk_size: int | None = None,
    mesh=None,
    mesh_axis=None,
    max_memory: int | str | None = None,
) -> Callable:
    """Per-example Jacobians of a batch-first function, after proving the examples independent.

    For ``fun(X)`` with a batch axis ``in_axes`` on every differentiated leaf
    and ``out_axes`` on every output, returns, for each output and input leaf,
    the blocks ``d out[b] / d in[b]`` of shape ``(B,) + out_example.shape +
    in_example.shape`` (numerator layout per example, (5.58)), pytrees as
    :func:`jacobians.jacobian`. Before evaluating (once per call structure) it
    proves from the jaxpr that example ``b``'s output reads only example
    ``b``'s input; otherwise it raises :class:`CoupledBatchError` naming the
    primitive and line that couples them. Evaluation uses ``n`` JVPs or ``m``
    VJPs over the whole batch (per-example sizes), not ``B`` times as many.

    The proof is certified once against JAX (JVPs whose tangents live in some
    examples only must leave the others' outputs exactly zero); a proof that
    crashes gives the diagonal blocks of the whole Jacobian and a
    :class:`jacobians.PlanWarning` (see ``jacobians.strict``).

    Args:
      fun: batch-first function.
      argnums: an int or a tuple of ints.
      in_axes, out_axes: the batch axis of the differentiated leaves and of the outputs (ints).
      mode: ``"fwd"``, ``"rev"`` or ``"auto"`` (fewer passes; falls back where JAX
        cannot differentiate in that direction).
      has_aux: ``fun`` returns ``(output, aux)``.
      chunk_size: at most this many JVPs/VJPs at a time.
      mesh, mesh_axis: split the batch across the devices of a mesh (padded to a
        multiple of the device count; see :func:`jacobians.jacobian`).
      max_memory: a memory budget (bytes, or ``"2GB"``): the chunk size that fits, by XLA's
        memory analysis (as :func:`jacobians.jacobian`); not with ``chunk_size``.

    Returns:
      A function returning the per-example Jacobians (``(jac, aux)`` with ``has_aux``).

    Raises:
      CoupledBatchError: the examples are not independent (a batch mean, BatchNorm in
        training mode, a cumulative sum or sort over the batch, attention across it),
        found by the proof or by its certificate.
      PlanError: in strict mode, the proof crashed or its certificate failed.

    Example::

      >>> X = jnp.arange(6.0).reshape(3, 2)
      >>> jacobians.batch_jacobian(lambda X: X ** 2)(X).shape
      (3, 2, 2)
    """
    return batch_jacobian_for("jacobians.batch_jacobian", fun, argnums, in_axes, out_axes, mode, has_aux,
                              chunk_size, mesh, mesh_axis, max_memory)


def batch_jacobian_for(where: str, fun: Callable, argnums, in_axes, out_axes, mode, has_aux, chunk_size, mesh,
                       mesh_axis, max_memory) -> Callable:
    """:func:`batch_jacobian` (its arguments, none defaulted) built for a caller: its errors name ``where``."""
    for name, ax in (("in_axes", in_axes), ("out_axes", out_axes)):
        if isinstance(ax, bool) or not isinstance(ax, int | np.integer):
            raise TypeError(f"{where}: {name} must be an int, got {ax!r}.")

    def make(c):
        opts = _Options(_args.check_mode(mode, where), _args.check_bool(has_aux, "has_aux", where),
                        _args.check_chunk_size(c, where), int(in_axes), int(out_axes),
                        _mesh.resolve(mesh, where, mesh_axis))
        return _trust.wrap(_args.Transform.jitted(fun, argnums, where, _compute, opts))

    return _memory.transform(make, chunk_size, max_memory, where)
