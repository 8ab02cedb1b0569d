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

from . import _args, _batchwise, _blocktri, _mesh, _methods, _planner, _sweeps, _trust, kernels


@dataclasses.dataclass(frozen=True)
class _Options:
    """The determinants' options, checked once at build time, and their plan cache.

    Attributes:
      batched: ``fun`` takes one point; ``x`` has a leading batch axis.
      batch_first: ``fun`` takes a batch whose examples are independent.
      kind: ``"slogdet"`` (square) or ``"log_volume"`` (rectangular, QR).
      output: the public function (``"slogdet"``, ``"log_abs_det"``, ``"det"``, ``"log_volume"``).
      finish: ``(sign, logabsdet) -> result`` of the public function.
      shards: the resolved mesh split of the batch, or ``None``.
      batch_jac: ``batch_first``: the ``batch_jacobian`` that proves and computes per-example Jacobians.
      plans: the cached :class:`_blocktri.LogDetPlan` per call structure.
    """

    batched: bool
    batch_first: bool
    kind: str
    output: str
    finish: Callable
    shards: object = None
    batch_jac: Callable | None = None
    plans: dict = dataclasses.field(default_factory=dict, repr=False)


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


def _dense_jacobian(p: _args.Problem, plan: _blocktri.LogDetPlan):
    """A dense plan's ``(n, n)`` Jacobian: its structured sweep's, or JAX's JVPs (VJPs)."""
    if plan.sweep is None:
        return _flat_jacobian(p, plan.mode)
    J = _sweeps.jacobian(*p.sweep_input(), plan.sweep)[1]
    # The sweep's products run in another order than JAX's JVPs: where an intermediate overflows (c * c
    # in (P x) c c) it meets a zero tangent as inf * 0 = NaN, where JAX's JVPs keep one infinite entry.
    # A Jacobian that is not finite is redone by the JVPs (a branch that runs only then).
    return jax.lax.cond(_batchwise.all_finite(J), lambda: J, lambda: _flat_jacobian(p, plan.mode))


def _evaluate(p: _args.Problem, plan: _blocktri.LogDetPlan, leaves, reduce: Callable = kernels.slogdet) -> tuple:
    """``(sign, logabsdet)`` of one point by ``plan``; a dense plan's Jacobian by ``reduce`` (a log-volume's QR)."""
    if plan.method != "dense":
        return _blocktri.evaluate(plan, leaves)
    return tuple(reduce(_dense_jacobian(p, plan)))


def _swept(t, spec, avals, closed, p: _args.Problem, plan: _blocktri.LogDetPlan) -> _blocktri.LogDetPlan:
    """``plan`` (dense) with a structured sweep for its Jacobian where the cost model finds one cheaper.

    One sweep through ``fun``'s jaxpr instead of ``n`` JVPs (a map ``tanh(A x) + x``: its
    Jacobian as ``diag(1 - tanh^2) A + I`` in matrix products), chosen as
    :func:`jacobians.jacobian`'s planner chooses, and certified as the structure plans are
    (hence only up to ``CERTIFY_MAX`` inputs), from ``SWEEP_MIN`` inputs: below, a ``jax.vmap``
    of the call (the plan cannot tell) ran the sweep 1.9x slower than the JVPs (n = 4, 1e5 points)
    and a single point gains nothing a call's overhead would show. A failure of the cost model
    is reported as the planner's are (a PlanWarning; strict: a PlanError) and the JVPs stay.
    """
    if p.n > CERTIFY_MAX or p.n < SWEEP_MIN:
        return plan

    try:
        with _trust.stage("planner's cost model"):
            choice = _planner.choose(closed, p.n, p.m, None, None, _methods.sweep_programs(t, spec, avals))
    except Exception as e:  # noqa: BLE001 - reported (strict: raised); the JVPs stay
        _trust.analysis_failed(t.where, e, "planner's cost model")
        return plan
    if choice.method != "structured":
        return plan
    return dataclasses.replace(plan, passes=1, sweep=choice.mode, reason=f"{plan.reason}; the Jacobian by one "
                               f"structured {choice.mode} sweep (cost {choice.costs[choice.key]:.3g}, "
                               f"{p.n} JVPs {choice.costs.get('dense fwd', float('nan')):.3g})")


def _plan(t, spec, leaves, opts, batch: int | None = None) -> _blocktri.LogDetPlan:
    """The cached plan for one point's leaves (shapes suffice): block-triangular, singular or dense.

    A square map's plan serves its log-volume too: ``1/2 log det(J^T J) = log |det J|`` (in log space
    where the structure allows: a saturated ``tanh`` keeps a finite log-volume).

    Made on the host at trace time. An analysis that raises falls back to the
    dense plan with a PlanWarning (strict mode: a PlanError), see :mod:`._trust`.
    """
    avals = [jax.ShapeDtypeStruct(np.shape(a), a.dtype) for a in leaves]
    key = (spec, batch, _args.shapes_key(avals))
    plan = opts.plans.get(key)
    if plan is not None:
        return plan
    t0 = time.perf_counter()
    closed, offsets, p = _args.trace_flat(t, spec, avals)
    forced = _planner.forced(closed)
    per_example = batch is None or (len(p.out_leaves) == 1 and len(p.in_leaves) == 1 and batch > 0
                                    and np.shape(p.out_leaves[0])[:1] == (batch,))
    if p.n != p.m or p.n == 0 or not per_example:
        plan = _blocktri.dense_plan(p.n, forced or "fwd", "a log-volume (rectangular): QR of the dense Jacobian"
                                    if p.n != p.m else "no structure to read")
    else:
        try:
            with _trust.stage("log-determinant analysis", passing=(_blocktri.Coupled,)):
                plan = _blocktri.plan(closed, offsets, p.n, forced, t.where, batch)
        except _blocktri.Coupled as e:  # batch_first: batch_jacobian's proof and per-example Jacobians decide
            plan = _blocktri.dense_plan(p.n, forced or "fwd", f"batch_first: not per-example in structure ({e})")
        except Exception as e:  # noqa: BLE001 - reported (strict: raised) by analysis_failed
            plan = _blocktri.dense_plan(p.n, forced or "fwd", _trust.analysis_failed(t.where, e, "log-determinant "
                                                                                      "analysis"))
    # Unbatched only: over a batch of small maps the vmapped JVPs are the faster program (k = 4, 1e5 points:
    # 0.8 ms against the reverse sweep's 1.3 ms), though one point's sweep costs fewer FLOPs.
    if plan.method == "dense" and p.n == p.m and batch is None and not opts.batched and not forced:
        plan = _swept(t, spec, avals, closed, p, plan)
    if plan.method != "dense" or plan.sweep is not None:
        values = _point_values(t, spec, leaves, avals, opts, batch)
        deferrable = _trust.concrete(leaves) is None  # the call being traced runs: its program can be reused
        plan = _certify(t, spec, opts, key if deferrable else None, plan, (closed, offsets, p), values)
    plan = opts.plans[key] = dataclasses.replace(plan, seconds=time.perf_counter() - t0)
    return plan


def _point_values(t, spec, leaves, avals, opts, batch) -> list | None:
    """The values of the call being planned, for its certificate (one point's when batched), if known."""
    values = _trust.concrete(leaves) or _trust.call_values(spec, t)
    if values is not None and opts.batched and batch is None:  # fun takes one point: the first example's
        values = [np.asarray(v)[0] if np.ndim(v) == len(a.shape) + 1 and np.shape(v)[0] else v for v, a in
                  zip(values, avals, strict=True)]
    if values is None or any(np.shape(v) != tuple(a.shape) for v, a in zip(values, avals, strict=True)):
        return None
    return values


def _certify(t, spec, opts, key, plan: _blocktri.LogDetPlan, traced_flat: tuple, values) -> _blocktri.LogDetPlan:
    """Check a structure plan against JAX: at once, or after the call being traced has run.

    The check compares the plan's result at a random point (near the call's inputs when
    known) with NumPy's ``slogdet`` of JAX's dense Jacobian there (per example for
    ``batch_first``, whose off-diagonal blocks must also be exactly zero). Where a
    concrete call is being traced, the check runs after it with the call's own compiled
    program (its result at the check's point) and holds the call's result back until it
    passes; a failed check replaces the plan by the dense one and the call runs again.
    Up to ``CERTIFY_MAX`` inputs: the check costs ``n`` JVPs once per plan.

    Returns:
      The plan with its certificate; the dense plan where the check failed at once
      (a PlanWarning; strict mode: a PlanError).
    """
    after = values is not None and key is not None

    def check():
        with _trust.stage("certificate"):
            return _certificate(t, spec, opts, plan, traced_flat, values, after)

    if after:
        pending = _trust.defer(check, lambda result: _settle(t, opts, key, spec, result))
        if pending is not None:
            return plan
    try:
        result = check()
    except Exception as e:  # noqa: BLE001 - reported by _judged
        result = e
    return _judged(plan, result, t.where)


def _judged(plan: _blocktri.LogDetPlan, result, where: str) -> _blocktri.LogDetPlan:
    """``plan`` with its certificate, or the dense plan where the check failed or raised (warn; strict: raise)."""
    if isinstance(result, BaseException):
        return _blocktri.dense_plan(plan.n, plan.mode, _trust.analysis_failed(where, result, "log-determinant "
                                                                                            "analysis"))
    if result.failed:
        what = plan.method if plan.sweep is None else f"{plan.method} (structured {plan.sweep} sweep)"
        return _blocktri.dense_plan(plan.n, plan.mode, _trust.certificate_failed(
            where, f"log-determinant {what}", result.detail))
    return dataclasses.replace(plan, certificate=result)


def _settle(t, opts, key, spec, result) -> bool:
    """A deferred check's result: keep the plan (``True``), or replace it and forget the compiled call."""
    plan = opts.plans[key]
    if not isinstance(result, BaseException) and not result.failed:
        opts.plans[key] = dataclasses.replace(plan, certificate=result)
        return True
    # Replaced before the failure is reported: strict mode raises, and the next call must not reuse the plan.
    opts.plans[key] = _blocktri.dense_plan(plan.n, plan.mode, "the plan failed its check")
    t.forget(spec)
    opts.plans[key] = dataclasses.replace(_judged(plan, result, t.where), seconds=plan.seconds)
    return False


CERTIFY_MAX = 4096  # inputs up to which a log-determinant plan is checked against JAX's dense Jacobian
SWEEP_MIN = 128  # inputs from which a dense plan may take its Jacobian by a structured sweep (_swept)


def _encode(sign, logabs, known) -> np.ndarray:
    """``(examples, 4)``: sign, log|det| (``-inf`` as 0), whether it is ``-inf``, whether the sign is known."""
    sign, logabs = (np.atleast_1d(np.asarray(v, np.float64)) for v in (sign, logabs))
    sign = np.broadcast_to(sign, logabs.shape)
    neg = np.isneginf(logabs)
    return np.stack([sign, np.where(neg, 0.0, logabs), neg, np.full(logabs.shape, float(known))], -1)


def _certificate(t, spec, opts, plan, traced_flat, values, after: bool) -> _trust.Certificate:
    n, batch = plan.n, plan.batch
    if n > CERTIFY_MAX:
        return _trust.Certificate("skipped", f"n = {n} > {CERTIFY_MAX}: JAX's dense Jacobian would cost {n} JVPs")
    examples = batch or 1
    d = n // examples

    def program(p, T, leaves):
        del T  # no directions: the whole dense Jacobian is the reference
        J = _flat_jacobian(p, plan.mode)
        if after:
            return (J,)
        sign, logabs = _evaluate(p, plan, leaves)  # no call to reuse: the plan's own program
        return J, jnp.asarray(sign), jnp.where(jnp.isneginf(logabs), 0, logabs), jnp.isneginf(logabs)

    def computed(point):  # the call's own compiled program at the check's point
        mask = spec.diff_mask()
        batched = opts.batched and not opts.batch_first
        out = t.cache[spec](*[np.asarray(v)[None] if batched and m else v for v, m in zip(point, mask, strict=True)])
        if opts.output == "slogdet":
            return _encode(*out, True)
        if opts.output == "det":
            v = np.asarray(out, np.float64)
            with np.errstate(divide="ignore"):
                return _encode(np.sign(v), np.log(np.abs(v)), True)
        return _encode(0.0, out, False)

    def judge(outs, T, tol):
        J = np.asarray(outs[0], np.float64).reshape(examples, d, examples, d)
        if after:
            got = outs[1]
        else:
            got = _encode(outs[1], np.where(outs[3], -np.inf, outs[2]), True)
        sign, logabs, sing, known = (got[:, i] for i in range(4))
        own = np.eye(examples, dtype=bool)[:, None, :, None]
        coupled = np.abs(np.where(own, 0.0, J)).max(initial=0.0)
        if coupled > 0:
            return f"an entry of {coupled:.3g} links two examples the plan keeps apart"
        blocks = np.stack([J[e, :, e, :] for e in range(examples)])
        ref_sign, ref_logabs = np.linalg.slogdet(blocks)
        with np.errstate(divide="ignore"):
            rows = np.log(np.linalg.norm(blocks, axis=-1)).sum(-1)  # Hadamard's bound on log|det|
        eps = float(np.finfo(outs[0].dtype).eps)
        near = np.log(64 * d * eps)  # this far below Hadamard's bound: singular within rounding
        for e in range(examples):
            at = f" (example {e})" if batch else ""
            ref_sing = np.isneginf(ref_logabs[e]) or np.isneginf(rows[e])
            if ref_sing and not sing[e]:  # a row rounded to zero (a saturated tanh) cannot refute a finite log
                return f"{_INCONCLUSIVE}JAX's dense Jacobian is singular where the plan gives {logabs[e]:.6g}{at}"
            # Singular within rounding on both sides (a map singular everywhere, jax.nn.standardize's rows):
            # both logs are rounding noise far below Hadamard's bound, their signs too.
            if (sing[e] or logabs[e] - rows[e] < near) and (ref_sing or ref_logabs[e] - rows[e] < near):
                continue
            if sing[e] or ref_sing:
                return f"log|det| {'-inf' if sing[e] else f'{logabs[e]:.6g}'}, JAX's {ref_logabs[e]:.6g}{at}"
            if known[e] and sign[e] != ref_sign[e]:
                return (f"sign {sign[e]:g} and log|det| {logabs[e]:.6g}, JAX's {ref_sign[e]:g} and "
                        f"{ref_logabs[e]:.6g}{at}")
            if abs(logabs[e] - ref_logabs[e]) > tol * (abs(ref_logabs[e]) + np.sqrt(d)):
                return f"log|det| {logabs[e]:.6g}, JAX's {ref_logabs[e]:.6g}{at}"
        return None

    def directions(rng, p):
        return np.zeros((1, 1), p.x.dtype)

    what = "point: the result against NumPy's slogdet of JAX's dense Jacobian"
    # A standard normal point first (a point scaled like the call's inputs may saturate the map, where
    # JAX's own Jacobian rounds to zero and the plan's log-space answer is the better one), then near
    # the call's inputs (maps defined only there).
    cert = _trust.certify(traced_flat, None, program, judge, what, directions, computed if after else None)
    if values is not None and (cert.status == "skipped" or _INCONCLUSIVE in cert.detail):
        cert = _trust.certify(traced_flat, values, program, judge, what, directions, computed if after else None)
    # Only a log|det| that disagrees in value (or a reference too rounded to judge): rounding cannot make a sign
    # differ or an entry link two examples, and those failures stand.
    retry = _INCONCLUSIVE in cert.detail or (cert.failed and cert.detail.startswith("log|det|"))
    for factor in SHRINK if retry else ():
        # Where the map saturates (tanh(20 x)), JAX's own Jacobian rounds (1 - tanh^2 cancels to a few ulps, or
        # to 0) and the plan's log-space rules do not: a right plan agrees with it nearer the origin, where
        # nothing saturates; a wrong structure (a missed coupling, a wrong block or sign) disagrees there too.
        calmer = _trust.shrunk(traced_flat[0], traced_flat[1], values, factor)
        if calmer is None:
            break
        again = _trust.certify(traced_flat, calmer, program, judge, what, directions, computed if after else None)
        if again.status == "passed":
            first = cert.detail.replace(_INCONCLUSIVE, "")
            return _trust.Certificate("passed", f"at points 1/{factor:g} as far from the origin ({again.detail}); "
                                                f"at the first, JAX's own Jacobian disagreed: {first}")
    if _INCONCLUSIVE in cert.detail:
        return _trust.Certificate("skipped", cert.detail.replace(_INCONCLUSIVE, ""))
    return cert


SHRINK = (8.0, 64.0)  # a failed log-determinant check again at points this much nearer the origin


_INCONCLUSIVE = "inconclusive: "


def _log_volume(J):
    """``(1, 1/2 log det(J^T J))`` through ``R`` of ``J = QR``; a square ``J``'s ``log|det J|`` by the kernel.

    Square, the kernel's LU is exact where ``J`` is singular (``-inf``), as :func:`log_abs_det`; a QR's
    ``R_ii`` keeps rounding there (an exactly rank-deficient ``J`` gives ``log 1e-16``, not ``-inf``).
    """
    if J.shape[-2] == J.shape[-1]:
        return jnp.ones((), J.dtype), kernels.slogdet(J)[1]
    R = jnp.linalg.qr(J, mode="r")
    d = jnp.abs(jnp.diagonal(R, axis1=-2, axis2=-1))
    return jnp.ones((), J.dtype), jnp.sum(jnp.log(d), axis=-1)


_CHUNK_BATCH = 16 << 20  # batched dense plans whose Jacobians take more bytes than this go in chunks ...
_CHUNK_BYTES = 1 << 18  # ... of about this many bytes of Jacobians


def _compute(t, spec, opts, *traced):
    where, square = t.where, opts.kind != "log_volume"
    reduce = kernels.slogdet if square else _log_volume
    diff_mask = spec.diff_mask()
    if opts.batch_first:
        args, kwargs, _ = spec.rebuild(traced)
        xs = [x for x, d in zip(traced, diff_mask, strict=True) if d]
        if len(xs) == 1 and np.ndim(xs[0]) and np.shape(xs[0])[0] == 0:  # an empty batch: nothing to prove
            dtype = jnp.result_type(xs[0]) if jnp.issubdtype(jnp.result_type(xs[0]), jnp.inexact) else float
            return opts.finish(jnp.ones((0,), dtype), jnp.zeros((0,), dtype))
        if len(xs) == 1 and np.ndim(xs[0]) and opts.shards is None:  # (a mesh splits batch_jacobian)
            plan = _plan(t, spec, traced, opts, batch=int(np.shape(xs[0])[0]))
            if plan.method != "dense":  # per-example blocks, proved apart by the pattern itself
                return opts.finish(*_blocktri.evaluate(plan, traced))
        leaves = jax.tree_util.tree_leaves(opts.batch_jac(*args, **kwargs))
        xs = [x for x, d in zip(traced, diff_mask, strict=True) if d]
        if len(leaves) != 1 or len(xs) != 1:
            raise ValueError(f"{where}: batch_first=True needs one array input and one array output.")
        (J,), (x,) = leaves, xs
        J = J.reshape(J.shape[0], -1, math.prod(np.shape(x)[1:]))  # (B, m, n) per example
        if square and J.shape[1] != J.shape[2]:
            raise ValueError(f"{where}: a Jacobian determinant needs square per-example Jacobians, got {J.shape[1:]}.")
        return opts.finish(*reduce(J))

    def one(*leaves):
        p = _args.problem(t.fun, spec, leaves, where=where, int_argnums=True)
        _check_sizes(p, where, square)
        return _evaluate(p, _plan(t, spec, leaves, opts), leaves, reduce)

    if not opts.batched:
        return opts.finish(*one(*traced))
    for x, d in zip(traced, diff_mask, strict=True):
        if d and np.ndim(x) == 0:
            raise ValueError(f"{where}: batched=True needs x with a leading batch axis, got a scalar.")
    sizes = sorted({np.shape(x)[0] for x, d in zip(traced, diff_mask, strict=True) if d})
    if len(sizes) > 1:
        raise ValueError(f"{where}: batched=True needs one batch size, the leading axis of every differentiated "
                         f"leaf; got sizes {sizes}.")
    in_axes = tuple(0 if d else None for d in diff_mask)
    dense = []

    def point(*leaves):  # one point's result, or (dense plans) its Jacobian for one kernel call on the stack
        p = _args.problem(t.fun, spec, leaves, where=where, int_argnums=True)
        _check_sizes(p, where, square)
        plan = _plan(t, spec, leaves, opts)
        if plan.method != "dense":
            return _blocktri.evaluate(plan, leaves)
        dense.append(True)
        return (_dense_jacobian(p, plan),)

    def dense_plan(args) -> bool:  # one point's plan (cached: point() finds it), made here from shapes
        avals = [jax.ShapeDtypeStruct(np.shape(x)[1:] if d else np.shape(x), jnp.result_type(x))
                 for x, d in zip(args, diff_mask, strict=True)]
        return _plan(t, spec, avals, opts).method == "dense"

    def stacked(*args):  # (sign, logabsdet) of a batch
        out = jax.vmap(point, in_axes=in_axes)(*args)
        # The kernel traced once, on the (B, n, n) stack: under vmap it would be traced again by its batching rule.
        return reduce(out[0]) if dense else out

    def batch(*args):
        xs = [x for x, d in zip(args, diff_mask, strict=True) if d]
        b, n = np.shape(xs[0])[0], sum(math.prod(np.shape(x)[1:]) for x in xs)
        size = n * n * max(jnp.dtype(jnp.result_type(x)).itemsize for x in xs)  # one point's dense Jacobian
        if b * size <= _CHUNK_BATCH or not dense_plan(args):
            return opts.finish(*stacked(*args))
        # On the CPU a chunk of points at a time: the batch's Jacobians are never all in memory (past glibc's
        # 32 MB threshold the program's buffers are a fresh mapping each call, and filling them faults its
        # pages in). Elsewhere each trip of the loop is kernel launches: 98 trips at k = 8, B = 1e5 took
        # 4.3 ms on an H200 against 0.18 ms for the whole stack at once (bench/results/gpu-h200).
        C = max(1, _CHUNK_BYTES // size)
        count = -(-b // C)

        def chunked(*args):
            def body(_, i):
                start = jnp.minimum(i * C, b - C)  # the last chunk overlaps the one before it
                return None, stacked(*[jax.lax.dynamic_slice_in_dim(x, start, C) if d else x
                                       for x, d in zip(args, diff_mask, strict=True)])

            _, out = jax.lax.scan(body, None, jnp.arange(count))
            tail = b - (count - 1) * C
            return tuple(jnp.concatenate([v[:-1].reshape(-1), v[-1, C - tail:]]) for v in out)

        return opts.finish(*jax.lax.platform_dependent(*args, cpu=chunked, default=lambda *a: tuple(stacked(*a))))

    shards = opts.shards
    if shards is None or shards.count <= 1:
        return batch(*traced)
    # Split the batch across the mesh: pad with copies of the last point, trim afterwards.
    b = next(np.shape(x)[0] for x, d in zip(traced, diff_mask, strict=True) if d)
    padded = [shards.constrain(_mesh.pad_batch(x, shards.count)) if d else x
              for x, d in zip(traced, diff_mask, strict=True)]
    out = batch(*padded)
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
    output = where.rsplit(".", 1)[-1]
    batched = _args.check_bool(batched, "batched", where)
    batch_first = _args.check_bool(batch_first, "batch_first", where)
    if batched and batch_first:
        raise ValueError(f"{where}: choose batched=True (fun takes one point) or batch_first=True (fun takes a "
                         "batch), not both.")
    shards = _mesh.resolve(mesh, where, mesh_axis)
    batch_jac = None
    if batch_first:
        from ._batch import batch_jacobian_for

        batch_jac = batch_jacobian_for(where, fun, argnums, in_axes=0, out_axes=0, mode="auto", has_aux=False,
                                       chunk_size=None, mesh=mesh, mesh_axis=mesh_axis, max_memory=None)
    opts = _Options(batched, batch_first, kind, output, finish, shards, batch_jac)
    # batched=True calls fun per example: a trial trace of fun on the whole batch would not test that call.
    t = _args.Transform.jitted(fun, argnums, where, _compute, opts, probe=not batched)

    def recover(spec, traced, error) -> bool:
        """XLA failed to compile a structure (or swept) plan's program: the dense method by JVPs, once, warning."""
        keys = [k for k, p in opts.plans.items() if k[0] == spec and (p.method == "block-triangular" or p.sweep)]
        if not keys:
            return False
        _trust.drop_deferred()  # its check would run the program that did not compile
        what = "block-triangular" if any(opts.plans[k].method == "block-triangular" for k in keys) else "swept dense"
        note = _trust.compiler_failed(where, f"{what} log-determinant", "dense", error)
        for k in keys:
            opts.plans[k] = _blocktri.dense_plan(opts.plans[k].n, opts.plans[k].mode, note)
        return True

    t.recover = recover
    checked = _trust.wrap(t)  # a plan made by a call is certified after it, with the call's own program

    @functools.wraps(fun)
    def wrapped(*args, **kwargs):
        if not batched or shards is not None or jax.device_count() == 1:  # one device pays nothing for sharding
            return checked(*args, **kwargs)
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
            if b is None:
                return _blocktri.dense_plan(0, "fwd", "batch_first=True: batch_jacobian's per-example Jacobians")
            return _plan(t, spec, traced, opts, batch=b)
        avals = [jax.ShapeDtypeStruct(np.shape(a)[1:] if batched and d else np.shape(a), a.dtype)
                 for a, d in zip(traced, mask, strict=True)]
        return _plan(t, spec, avals, opts)

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
      A function returning ``(sign, logabsdet)`` (a :class:`jacobians.kernels.SlogdetResult`, the named
      tuple of ``jnp.linalg.slogdet``), each a scalar (shape ``(batch,)`` when batched). A singular
      Jacobian gives sign 0 and logabsdet ``-inf``; an infinite entry gives ``+inf`` with the sign of the
      determinant's leading term (``jnp.linalg.slogdet`` often gives NaN there: its elimination subtracts
      infinities); logabsdet stays finite where det would under- or overflow.

    Raises:
      ValueError: input and output sizes differ (on the first call).
    """
    return _build(fun, argnums, batched, batch_first, "jacobians.slogdet", "slogdet", kernels.SlogdetResult, mesh,
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
