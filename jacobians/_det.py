"""Jacobian determinants (section 5.3, Figure 5.5) and log-volumes: the volume change of a map.

For maps whose input and output have the same total size, the Jacobian is
flattened row-major to a square matrix (all differentiated leaves raveled into
``x``, all outputs into ``y``), so matrix-valued maps such as ``X -> AX`` work
too; its determinant comes from :func:`kernels.slogdet` (closed forms for
small sizes, an unrolled LU above). For rectangular maps ``R^n -> R^m``,
``m >= n``, the log-volume ``1/2 log det(J^T J)`` is the sum of ``log |R_ii|``
of a QR factorisation of ``J`` (forming ``J^T J`` would square the condition
number). Three ways to batch: ``batched=True`` (``x`` has a leading batch axis
and ``fun`` is written for one point; with several devices the batch is
padded to a multiple of the device count and sharded with ``jax.sharding``),
``batch_first=True`` (``fun`` is written on batches; the examples' independence
is proved first, as :func:`jacobians.batch_jacobian` does), or neither.
"""

import dataclasses
import functools
import math
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from . import _args, _blocktri, _mesh, _planner, _trust, kernels


def _check_sizes(p: _args.Problem, where: str, square: bool) -> None:
    if square and p.m != p.n:
        out = [tuple(o.shape) for o in p.out_leaves]
        ins = [tuple(x.shape) for x in p.in_leaves]
        raise ValueError(
            f"{where}: a Jacobian determinant needs fun's input and output to have the same total size, but the "
            f"input has size {p.n} (shape {ins[0] if len(ins) == 1 else ins}) and the output size {p.m} "
            f"(shape {out[0] if len(out) == 1 else out})."
        )
    if not square and p.m < p.n:
        raise ValueError(
            f"{where}: a log-volume needs at least as many outputs as inputs (m >= n), got m = {p.m}, n = {p.n}; "
            "J^T J is singular otherwise."
        )


def _flat_jacobian(p: _args.Problem, mode: str):
    """The dense ``(m, n)`` Jacobian: JVPs, or VJPs where ``fun`` has a ``custom_vjp`` (no JVP)."""
    _, J, _ = (kernels.forward if mode == "fwd" else kernels.reverse)(p.flat, p.x)
    return J


def _plan(t, spec, leaves, opts, square: bool, batch: int | None = None) -> _blocktri.LogDetPlan:
    """The cached plan for one point's leaves (shapes suffice): block-triangular, singular or dense.

    Made on the host at trace time. An analysis that raises falls back to the
    dense plan with a PlanWarning (strict mode: a PlanError), see :mod:`._trust`.
    """
    avals = [jax.ShapeDtypeStruct(np.shape(a), a.dtype) for a in leaves]
    key = (spec, square, batch, tuple((a.shape, np.dtype(a.dtype)) for a in avals))
    plan = opts["plans"].get(key)
    if plan is not None:
        return plan
    t0 = time.perf_counter()
    closed, offsets, p = _args.trace_flat(t, spec, avals)
    forced = _planner.forced(closed)
    per_example = batch is None or (len(p.out_leaves) == 1 and len(p.in_leaves) == 1 and batch > 0
                                    and np.shape(p.out_leaves[0])[:1] == (batch,))
    if not square or p.n != p.m or p.n == 0 or not per_example:
        plan = _blocktri.dense_plan(p.n, forced or "fwd", "a log-volume (rectangular): QR of the dense Jacobian"
                                    if not square else "no structure to read")
    else:
        try:
            with _trust.stage("log-determinant analysis", passing=(_blocktri.Coupled,)):
                plan = _blocktri.plan(closed, offsets, p.n, forced, t.where, batch)
        except _blocktri.Coupled as e:  # batch_first: batch_jacobian's proof and per-example Jacobians decide
            plan = _blocktri.dense_plan(p.n, forced or "fwd", f"batch_first: not per-example in structure ({e})")
        except Exception as e:  # noqa: BLE001 - reported (strict: raised) by analysis_failed
            plan = _blocktri.dense_plan(p.n, forced or "fwd", _trust.analysis_failed(t.where, e, "log-determinant "
                                                                                      "analysis"))
    plan = opts["plans"][key] = dataclasses.replace(plan, seconds=time.perf_counter() - t0)
    return plan


def _log_volume(J):
    """``(1, 1/2 log det(J^T J))`` through ``R`` of ``J = QR``."""
    R = jnp.linalg.qr(J, mode="r")
    d = jnp.abs(jnp.diagonal(R, axis1=-2, axis2=-1))
    return jnp.ones((), J.dtype), jnp.sum(jnp.log(d), axis=-1)


def _compute(t, spec, opts, *traced):
    where, square = t.where, opts["kind"] != "log_volume"
    reduce = kernels.slogdet if square else _log_volume
    diff_mask = spec.diff_mask()
    if opts["batch_first"]:
        args, kwargs, _ = spec.rebuild(traced)
        xs = [x for x, d in zip(traced, diff_mask, strict=True) if d]
        if len(xs) == 1 and np.ndim(xs[0]) and np.shape(xs[0])[0] == 0:  # an empty batch: nothing to prove
            dtype = jnp.result_type(xs[0]) if jnp.issubdtype(jnp.result_type(xs[0]), jnp.inexact) else float
            return opts["finish"](jnp.ones((0,), dtype), jnp.zeros((0,), dtype))
        if square and len(xs) == 1 and np.ndim(xs[0]) and opts["shards"] is None:  # (a mesh splits batch_jacobian)
            plan = _plan(t, spec, traced, opts, square, batch=int(np.shape(xs[0])[0]))
            if plan.method != "dense":  # per-example blocks, proved apart by the pattern itself
                return opts["finish"](*_blocktri.evaluate(plan, traced))
        leaves = jax.tree_util.tree_leaves(opts["batch_jac"](*args, **kwargs))
        xs = [x for x, d in zip(traced, diff_mask, strict=True) if d]
        if len(leaves) != 1 or len(xs) != 1:
            raise ValueError(f"{where}: batch_first=True needs one array input and one array output.")
        (J,), (x,) = leaves, xs
        J = J.reshape(J.shape[0], -1, math.prod(np.shape(x)[1:]))  # (B, m, n) per example
        if square and J.shape[1] != J.shape[2]:
            raise ValueError(f"{where}: a Jacobian determinant needs square per-example Jacobians, got {J.shape[1:]}.")
        return opts["finish"](*reduce(J))

    def one(*leaves):
        p = _args.problem(t.fun, spec, leaves, where=where, int_argnums=True)
        _check_sizes(p, where, square)
        plan = _plan(t, spec, leaves, opts, square)
        if plan.method != "dense":
            return _blocktri.evaluate(plan, leaves)
        return reduce(_flat_jacobian(p, plan.mode))

    if not opts["batched"]:
        return opts["finish"](*one(*traced))
    for x, d in zip(traced, diff_mask, strict=True):
        if d and np.ndim(x) == 0:
            raise ValueError(f"{where}: batched=True needs x with a leading batch axis, got a scalar.")
    in_axes = tuple(0 if d else None for d in diff_mask)
    shards = opts["shards"]
    if shards is None or shards.count <= 1:
        return opts["finish"](*jax.vmap(one, in_axes=in_axes)(*traced))
    # Split the batch across the mesh: pad with copies of the last point, trim afterwards.
    b = next(np.shape(x)[0] for x, d in zip(traced, diff_mask, strict=True) if d)
    padded = [shards.constrain(_mesh.pad_batch(x, shards.count)) if d else x
              for x, d in zip(traced, diff_mask, strict=True)]
    out = opts["finish"](*jax.vmap(one, in_axes=in_axes)(*padded))
    return _mesh.shard_result(jax.tree_util.tree_map(lambda r: r[:b], out), shards, lambda leaf: 0)


def _pad_and_shard(traced: list, diff_mask: list) -> tuple[list, int]:
    """Pad the batch to a multiple of the device count and shard it across devices."""
    devices = jax.devices()
    b = next(np.shape(x)[0] for x, d in zip(traced, diff_mask, strict=True) if d)
    mesh = Mesh(np.asarray(devices), ("batch",))
    out = []
    for x, d in zip(traced, diff_mask, strict=True):
        if d:
            x = _mesh.pad_batch(jnp.asarray(x), len(devices))
            x = jax.device_put(x, NamedSharding(mesh, PartitionSpec("batch")))
        out.append(x)
    return out, b


def _build(fun, argnums, batched, batch_first, where, kind, finish, mesh=None, mesh_axis=None):
    batched = _args.check_bool(batched, "batched", where)
    batch_first = _args.check_bool(batch_first, "batch_first", where)
    if batched and batch_first:
        raise ValueError(f"{where}: choose batched=True (fun takes one point) or batch_first=True (fun takes a "
                         "batch), not both.")
    shards = _mesh.resolve(mesh, where, mesh_axis)
    opts = dict(batched=batched, batch_first=batch_first, kind=kind, finish=finish, shards=shards, plans={})
    if batch_first:
        from ._batch import batch_jacobian

        opts["batch_jac"] = batch_jacobian(fun, argnums, mesh=mesh, mesh_axis=mesh_axis)
    # batched=True calls fun per example: a trial trace of fun on the whole batch would not test that call.
    t = _args.Transform.jitted(fun, argnums, where, _compute, opts, probe=not batched)

    @functools.wraps(fun)
    def wrapped(*args, **kwargs):
        if not batched or shards is not None or jax.device_count() == 1:  # one device pays nothing for sharding
            return t(*args, **kwargs)
        fn, traced, spec = t.compiled(args, kwargs)
        mask = spec.diff_mask()
        for x, d in zip(traced, mask, strict=True):
            if d and np.ndim(x) == 0:
                raise ValueError(f"{where}: batched=True needs x with a leading batch axis, got a scalar.")
        sharded, b = _pad_and_shard(traced, mask)
        return jax.tree_util.tree_map(lambda r: r[:b], fn(*sharded))

    def plan(*args, **kwargs) -> _blocktri.LogDetPlan:
        """How these arguments' log-determinant is computed (shapes suffice; per point when batched)."""
        spec, traced = t.split(args, kwargs)
        mask = spec.diff_mask()
        if batch_first:
            xs = [x for x, d in zip(traced, mask, strict=True) if d]
            b = int(np.shape(xs[0])[0]) if len(xs) == 1 and np.ndim(xs[0]) else None
            if b is None or kind == "log_volume":
                return _blocktri.dense_plan(0, "fwd", "batch_first=True: batch_jacobian's per-example Jacobians")
            return _plan(t, spec, traced, opts, True, batch=b)
        avals = [jax.ShapeDtypeStruct(np.shape(a)[1:] if batched and d else np.shape(a), a.dtype)
                 for a, d in zip(traced, mask, strict=True)]
        return _plan(t, spec, avals, opts, kind != "log_volume")

    wrapped.transform = t
    wrapped.plan = plan
    return wrapped


_ARGS_DOC = """
    Args:
      fun: differentiated in ``argnums`` (default the first argument); input and
        output of the same total size (``log_volume``: output size >= input size).
        Other arguments (arrays, pytrees, kwargs, hashable statics) pass through.
      argnums: an int or a tuple of ints.
      batched: ``x`` has a leading batch axis and ``fun`` takes one point; one value
        per point. Sharded across devices when there are several.
      batch_first: ``fun`` takes a batch (leading axis) and its examples are
        independent (proved from the jaxpr; :class:`jacobians.CoupledBatchError`
        otherwise); one value per example.
      mesh, mesh_axis: split the batch across the devices of a ``jax.sharding.Mesh``
        (or ``"auto"``); by default a batch is split across all local devices when
        there are several.
"""


def slogdet(
    fun: Callable, argnums=0, *, batched: bool = False, batch_first: bool = False, mesh=None, mesh_axis=None
) -> Callable:
    """Sign and log of the absolute Jacobian determinant of ``fun``.

    {args}

    Returns:
      A function returning ``(sign, logabsdet)``, each a scalar (shape ``(batch,)``
      when batched). A singular Jacobian gives sign 0 and logabsdet ``-inf``; an
      infinite entry gives ``+inf`` with the sign of the determinant's leading term
      (``jnp.linalg.slogdet`` often gives NaN there: its elimination subtracts
      infinities); logabsdet stays finite where det would under- or overflow.

    Raises:
      ValueError: input and output sizes differ (on the first call).
    """
    return _build(fun, argnums, batched, batch_first, "jacobians.slogdet", "slogdet", lambda s, la: (s, la), mesh,
                  mesh_axis)


def log_abs_det(
    fun: Callable, argnums=0, *, batched: bool = False, batch_first: bool = False, mesh=None, mesh_axis=None
) -> Callable:
    """``log |det(dfun/dx)|``, the change-of-variables term of flows.

    See :func:`slogdet` for the arguments. Returns a function giving
    ``logabsdet`` (shape ``(batch,)`` when batched).
    """
    return _build(fun, argnums, batched, batch_first, "jacobians.log_abs_det", "slogdet", lambda s, la: la, mesh,
                  mesh_axis)


def det(
    fun: Callable, argnums=0, *, batched: bool = False, batch_first: bool = False, mesh=None, mesh_axis=None
) -> Callable:
    """``det(dfun/dx)``, the volume scaling of section 5.3 (Figure 5.5).

    See :func:`slogdet` for the arguments. Returns a function giving ``det``
    (shape ``(batch,)`` when batched), computed as ``sign * exp(logabsdet)``.

    Example (5.61)-(5.66)::

      >>> f = lambda x: jnp.array([-2 * x[0] + x[1], x[0] + x[1]])
      >>> jacobians.det(f)(jnp.array([1.0, 2.0]))
      Array(-3., dtype=float32)
    """
    return _build(fun, argnums, batched, batch_first, "jacobians.det", "slogdet", lambda s, la: s * jnp.exp(la), mesh,
                  mesh_axis)


def log_volume(
    fun: Callable, argnums=0, *, batched: bool = False, batch_first: bool = False, mesh=None, mesh_axis=None
) -> Callable:
    """``1/2 log det(J^T J)``: the log-volume change of a map ``R^n -> R^m``, ``m >= n`` (injective flows).

    Computed from a QR factorisation of ``J`` (the sum of ``log |R_ii|``), stable
    where forming ``J^T J`` squares the condition number; equals
    :func:`log_abs_det` for square maps; ``-inf`` where ``J`` has an exactly zero
    direction. See :func:`slogdet` for the arguments.

    Raises:
      ValueError: fewer outputs than inputs.

    Example::

      >>> v = jacobians.log_volume(lambda x: jnp.concatenate([x, x]))(jnp.ones(2))  # J = [I; I]: det(J^T J) = 4
      >>> round(float(v), 5)  # log 2
      0.69315
    """
    return _build(fun, argnums, batched, batch_first, "jacobians.log_volume", "log_volume", lambda s, la: la, mesh,
                  mesh_axis)


slogdet.__doc__ = slogdet.__doc__.format(args=_ARGS_DOC)
