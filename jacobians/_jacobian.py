"""The Jacobian engine: mode choice, pytree bookkeeping and one compiled call.

Layout convention (the book's numerator layout, (5.58)-(5.59)): the Jacobian of
an output leaf of shape ``out.shape`` with respect to an input leaf of shape
``in.shape`` has shape ``out.shape + in.shape`` and entries
``J[i..., j...] = d out[i...] / d in[j...]``.
"""

import dataclasses
import math
import time
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from . import _allow_int, _args, _deps, _leaves, _memory, _mesh, _methods, _planner, _sparse, _trust, layout
from ._walker import differentiated


@dataclasses.dataclass(frozen=True)
class _Options:
    """A ``jacobian``'s options, checked once when it is built, and its caches (filled per call structure)."""

    method: _methods.MethodName
    mode: _args.Mode
    chunk_size: int | None
    has_aux: bool
    holomorphic: bool
    order: str | None  # jacobian_matrix's flattening, None for jacobian
    shards: object  # kernels.Shards or None
    engine: object = dataclasses.field(repr=False)  # the sparse engine (the compressed method)
    plans: dict = dataclasses.field(default_factory=dict, repr=False)  # (spec, shapes) -> JacobianPlan
    pending: dict = dataclasses.field(default_factory=dict, repr=False)  # certificates running (_trust.defer)


def _choose_mode(mode: str, n: int, m: int, complex_out: bool, holomorphic: bool, where: str) -> str:
    if complex_out and not holomorphic:
        # Reverse mode on a non-holomorphic complex output is not a Jacobian.
        if mode == "rev":
            raise _args.complex_rev_error(where, or_holomorphic=True)
        return "fwd"
    if mode == "auto":
        # Forward costs one JVP per input entry, reverse one VJP per output entry.
        return "fwd" if n <= m else "rev"
    return mode


def _compute(t: _args.Transform, spec: _args.CallSpec, opts: _Options, *traced):
    where = t.where
    # Real-valued functions of complex inputs: reverse mode, with jax.jacrev's convention.
    complex_ok = not opts.holomorphic and opts.mode != "fwd" and opts.order is None
    p = _args.problem(
        t.fun, spec, traced, where=where, has_aux=opts.has_aux, holomorphic=opts.holomorphic,
        int_argnums=t.int_argnums, allow_complex=complex_ok,
    )
    if not p.out_leaves:  # fun returned an empty pytree (``()``): its Jacobian is that pytree, as jax.jacfwd's
        empty, aux = p.empty_result()
        return (empty, aux) if opts.has_aux else empty
    complex_in = jnp.issubdtype(p.x.dtype, jnp.complexfloating) and not opts.holomorphic
    order = opts.order
    if order is not None and (len(p.out_leaves) != 1 or len(p.in_leaves) != 1):
        raise ValueError(
            f"{where}: needs a single array input and a single array output, got "
            f"{len(p.in_leaves)} input leaves and output structure {p.out_treedef}; use "
            "jacobians.jacobian for pytrees."
        )
    complex_out = jnp.issubdtype(p.out_dtype, jnp.complexfloating)
    # Unchunked dense Jacobians on one device run jax.jacfwd/jacrev's own program on the pytrees.
    call = _methods.Call(p, opts.chunk_size, opts.shards, lambda: _compressed(opts, spec, traced),
                         tree=order is None and opts.chunk_size is None and opts.shards is None
                         and not complex_in, leaves=traced)
    method, mode = opts.method, None
    if method == "compressed":
        if complex_in:
            raise TypeError(
                f"{where}: method='compressed' takes real inputs, but fun's input has dtype {p.x.dtype}; for a "
                "real-valued function of complex inputs use method='dense' or 'auto' (reverse mode, "
                "jax.jacrev's convention)."
            )
        jac, aux = _methods.COMPRESSED.evaluate(None, call)
    elif _planned(opts, complex_in or complex_out):
        cand = _plan(t, spec, traced, opts).candidate
        jac, aux = cand.method.evaluate(cand, call)
        mode = cand.mode
    elif method == "structured":
        if complex_in or (complex_out and not opts.holomorphic):
            raise TypeError(f"{where}: method='structured' needs real (or holomorphic) functions; use method='dense'.")
        mode = _choose_mode(opts.mode, p.n, p.m, complex_out, opts.holomorphic, where)
        cand = _methods.Candidate(_methods.STRUCTURED, mode, 1, 0.0)
        evaluate = _methods.STRUCTURED.evaluate
        jac, aux = evaluate(cand, call) if opts.mode == "auto" else _args.in_mode(where, mode, evaluate, cand, call)
    else:
        if complex_in:
            if complex_out:
                raise _args.complex_to_complex_error(where, p)
            mode = "rev"
        else:
            mode = _choose_mode(opts.mode, p.n, p.m, complex_out, opts.holomorphic, where)
        if opts.mode == "auto" and not complex_in and (opts.holomorphic or not complex_out):
            # (Holomorphic too: JAX takes either direction there, and a custom_vjp bars forward mode.)
            jac, aux = _methods.DENSE.evaluate_either(mode, call, where)
        else:
            # The caller's direction, where JAX cannot differentiate fun in it: say so before JAX's inner error
            # (some come only when the program is lowered, from the transpose of a max-pool's JVP).
            if (opts.mode == mode and p.jaxpr is not None and mode not in _methods.directions(differentiated(p.jaxpr))
                    and not _args.differentiable(p, mode)):
                raise _args.forced_mode_error(where, mode)
            jac, aux = _methods.DENSE.evaluate(_methods.Candidate(_methods.DENSE, mode, 0, 0.0), call)
    if isinstance(jac, _methods.Blocks):
        result = jac.tree
    elif order is not None:
        (out,), (xin,) = p.out_leaves, p.in_leaves
        result = jac.astype(_args.block_dtype(out, xin))
        if order == "F":
            result = layout.to_matrix(result.reshape(out.shape + xin.shape), len(out.shape), order="F")
    else:
        result = p.blocks(jac)
        # Sharded along the basis axis: the first input axis (forward) or output axis (reverse) of each block.
        ndims = [len(o.shape) for o in p.out_leaves]
        basis_axis = ndims[0] if (mode == "fwd" and len(set(ndims)) == 1) else (0 if mode == "rev" else None)
        result = _mesh.shard_result(result, opts.shards, lambda leaf: basis_axis)
    return (result, aux) if opts.has_aux else result


def _compressed(opts, spec, traced):
    """The sparse engine's result for this call (its plan made by the planner, or its own detection)."""
    out = opts.engine.compute(spec, traced)
    res, aux = out if opts.has_aux else (out, None)
    return _methods.Blocks(res), aux


def _planned(opts, complex_any: bool) -> bool:
    """The planner chooses for ``mode="auto"`` on real tensor-valued results without chunking."""
    return (opts.mode == "auto" and opts.method in ("auto", "structured") and opts.order is None
            and opts.chunk_size is None and not complex_any)


def _plan(t, spec, traced, opts) -> _planner.JacobianPlan:
    """The cached plan for this call structure and these shapes (made on the host at trace time)."""
    avals = [jax.ShapeDtypeStruct(np.shape(a), a.dtype) for a in traced]
    key = (spec, _args.shapes_key(avals))
    if key in opts.pending:  # made by a call that did not finish (or asked for by explain): settle it first
        opts.pending[key].wait()
    plan = opts.plans.get(key)
    if plan is None:
        t0 = time.perf_counter()
        plan, check, after = _make_plan(t, spec, traced, avals, opts)
        if check is not None:
            # A check after the call runs the call's own compiled program at the check's points (no
            # compilation of the plan's program for the check alone), settled before the call returns;
            # at once, compiling it, where no concrete wrapped call waits for it (explain, an outer jit).
            pending = _trust.defer(check, lambda result: _settle(t, opts, key, result)) if after else None
            if pending is None:
                plan = _judged(t, plan, _run(check))
            else:
                opts.pending[key] = pending
        plan = dataclasses.replace(plan, seconds=time.perf_counter() - t0)
        opts.plans[key] = plan
        engine = opts.engine
        if plan.method == "compressed":  # the sparse engine evaluates it with no new detection
            k = engine.key(spec, avals)
            engine.plans[k] = (plan.sparse_plan, None, engine.plans.get(k, (None, None, {}))[2])
    return plan


def _run(check):
    try:
        return check()
    except Exception as e:  # noqa: BLE001 - reported by _judged
        return e


def _judged(t, plan: _planner.JacobianPlan, result) -> _planner.JacobianPlan:
    """The plan with its certificate, or the dense plan where the check failed (a PlanWarning, strict a PlanError).

    ``result``: the :class:`_trust.Certificate`, or the exception the check raised.
    """
    if _passed(result):
        if plan.method == "compressed":
            plan = dataclasses.replace(plan, sparse_plan=dataclasses.replace(plan.sparse_plan, certificate=result))
        return dataclasses.replace(plan, certificate=result)
    if isinstance(result, BaseException):
        note = _trust.analysis_failed(t.where, result)
    else:
        note = _trust.certificate_failed(t.where, plan.key, result.detail)
    return _dense_instead(plan, note)


def _passed(result) -> bool:
    return not isinstance(result, BaseException) and not result.failed


def _dense_instead(plan: _planner.JacobianPlan, note: str) -> _planner.JacobianPlan:
    dense = _planner.dense(None, plan.n, plan.m, note, _trust.fallback(), mode=plan.fallback_mode)
    return dataclasses.replace(dense, seconds=plan.seconds)


def _settle(t, opts, key, result) -> bool:
    """A deferred check's result: keep the plan (``True``), or replace it and forget the compiled call."""
    opts.pending.pop(key, None)
    plan = opts.plans[key]
    if _passed(result):
        opts.plans[key] = _judged(t, plan, result)
        return True
    # Replaced before the failure is reported: strict mode raises, and the next call must not reuse the plan.
    opts.plans[key] = _dense_instead(plan, "the plan failed its check")
    opts.engine.plans.clear()
    t.forget(key[0])
    opts.plans[key] = _judged(t, plan, result)
    return False


def _make_plan(t, spec, traced, avals, opts) -> tuple[_planner.JacobianPlan, Callable | None, bool]:
    """Choose; any failure gives the dense plan (a PlanWarning, or strict a PlanError).

    Returns the plan, for a compressed or structured plan its check (``check() -> Certificate``),
    and whether that check is to run after the call (it evaluates the plan with the call's program).
    """
    engine = opts.engine
    traced_flat = _args.trace_flat(engine.t, spec, avals, has_aux=opts.has_aux)
    closed, offsets, p = traced_flat

    def detect(budget, columns=None):
        with warnings.catch_warnings(), _trust.stage("sparsity detection", passing=(_deps.TooDense,)):
            warnings.simplefilter("ignore")  # a primitive without a rule only makes the plan dense
            return _sparse.detect_traced(engine.t, closed, offsets, p, max_nnz=budget, columns=columns)

    def color(det, mode):  # colouring costs O(nnz): affordable whenever detection stayed in budget
        with _trust.stage("colouring"):
            return _sparse.make_plan(det.pattern, mode, det.primitives)

    # The sweep's program (jac, aux) of the call's traced leaves: costed, then evaluated.
    structured = _methods.sweep_programs(t, spec, avals, has_aux=opts.has_aux, int_argnums=t.int_argnums)
    only = opts.method == "structured"
    use = only or opts.shards is None  # on a mesh, the basis vectors are what is split
    try:
        plan = _planner.choose(closed, p.n, p.m, detect, color, structured if use else None, only_structured=only)
    except Exception as e:
        if only and not isinstance(e, _trust.AnalysisError):
            raise  # the caller asked for a structured sweep: say why none applies
        note = _trust.analysis_failed(t.where, e, "planner's cost model")
        return _planner.dense(closed, p.n, p.m, note, _trust.fallback()), None, False
    if plan.method == "dense":
        return dataclasses.replace(plan, certificate=_trust.NOT_NEEDED), None, False
    values, after = _trust.check_point(traced, spec, t)
    cand = plan.candidate

    def computed(point):
        return _flat_jacobian(t.cache[spec](*point), p, opts.has_aux)

    def check():
        with _trust.stage("certificate"):
            return cand.method.certify(cand, traced_flat, values, t.where, computed if after else None)

    if plan.method == "compressed":  # what the sparse engine's evaluation needs of the jaxpr (its seeds' folding)
        engine.plans[engine.key(spec, avals)] = (plan.sparse_plan, None, _sparse.facts(closed))
    return dataclasses.replace(plan, fallback_mode=_planner.dense_mode(closed, p.n, p.m)), check, after


def _flat_jacobian(result, p, has_aux: bool) -> np.ndarray:
    """The ``(m, n)`` matrix of a call's result (the pytree of blocks), on the host."""
    return _leaves.join(jax.tree_util.tree_leaves(result[0] if has_aux else result),
                        _leaves.Leaves.of(p.out_leaves), _leaves.Leaves.of(p.in_leaves))


def _build(fun, argnums, mode, has_aux, holomorphic, chunk_size, order, where, mesh=None, mesh_axis=None,
           method="auto"):
    method = _args.check_choice(method, "method", _methods.NAMES, where)
    mode = _args.check_mode(mode, where)
    has_aux = _args.check_bool(has_aux, "has_aux", where)
    if method == "compressed" and holomorphic:
        raise ValueError(f"{where}: method='compressed' takes real inputs; for holomorphic=True use method='auto', "
                         "'dense' or 'structured'.")
    shards = _mesh.resolve(mesh, where, mesh_axis)
    if method == "structured" and shards is not None:
        raise ValueError(f"{where}: method='structured' takes no mesh (it pushes no basis vectors to split).")
    # The compressed method runs through the sparse engine (dense output, same blocks).
    engine = _sparse.Engine(fun, argnums, mode if method == "compressed" else "auto", "auto", "dense", has_aux, where,
                             shards=shards)
    opts = _Options(method, mode, _args.check_chunk_size(chunk_size, where), has_aux,
                    _args.check_bool(holomorphic, "holomorphic", where), order, shards, engine)
    t = _args.Transform.jitted(fun, argnums, where, _compute, opts)
    opts.engine.callers = (t,)  # a plan made while t's call is traced may check at that call's inputs

    def recover(spec, traced, error) -> bool:
        """XLA failed to compile a planned (not dense) program: the dense one, once, with a warning."""
        key = (spec, _args.shapes_key([jax.ShapeDtypeStruct(np.shape(a), a.dtype) for a in traced]))
        plan = opts.plans.get(key)
        if plan is None or plan.method == "dense":
            return False
        opts.pending.pop(key, None)
        _trust.drop_deferred()  # its check would run the program that did not compile
        opts.engine.plans.clear()
        opts.plans[key] = _dense_instead(plan, _trust.compiler_failed(where, plan.key, "dense", error))
        return True

    t.recover = recover
    wrapped = _trust.wrap(t)

    def plan(*args, **kwargs) -> _planner.JacobianPlan:
        """The plan ``mode="auto"`` makes for these arguments (shapes suffice); see :func:`jacobians.explain`."""
        spec, traced = t.split(args, kwargs)
        if opts.method == "compressed":  # the sparse engine's plan: its colours are the passes
            sp = opts.engine.plan(*args, **kwargs)
            n_m = math.prod(sp.pattern.in_shape), math.prod(sp.pattern.out_shape)
            return _planner.JacobianPlan("compressed", sp.mode, sp.n_colors, *n_m, nnz=int(sp.pattern.nnz),
                                         reason="method fixed by the caller", sparse_plan=sp,
                                         certificate=sp.certificate)
        if not _planned(opts, opts.holomorphic):  # complex: dense, unplanned
            n_m = _sizes(t, spec, traced, opts)
            mode = opts.mode if opts.mode != "auto" else ("fwd" if n_m[0] <= n_m[1] else "rev")
            method = "dense" if opts.method == "auto" else opts.method
            passes = 1 if method == "structured" else (n_m[0] if mode == "fwd" else n_m[1])
            return _planner.JacobianPlan(method, mode, passes, *n_m,
                                         reason="method or mode fixed by the caller, chunked, or complex: no planning")
        return _plan(t, spec, traced, opts)

    wrapped.plan = plan
    return wrapped


def _sizes(t, spec, traced, opts) -> tuple[int, int]:
    avals = [jax.ShapeDtypeStruct(np.shape(a), a.dtype) for a in traced]
    _, _, p = _args.trace_flat(t, spec, avals, has_aux=opts.has_aux, holomorphic=opts.holomorphic)
    return p.n, p.m


def explain(fun: Callable, *args, argnums=0, has_aux: bool = False, **kwargs) -> _planner.JacobianPlan:
    """The method ``jacobians.jacobian(fun)`` (``mode="auto"``) uses at these arguments, and why.

    Returns the :class:`JacobianPlan`: the candidates (dense forward, dense
    reverse, compressed forward or reverse) with their estimated costs, and the
    choice; ``print`` it for a table. Arguments may be ``jax.ShapeDtypeStruct``s.

    Example::

      >>> print(jacobians.explain(lambda x: jnp.sin(x) * 2.0, jnp.ones(100)).method)
      compressed
    """
    return jacobian(fun, argnums, has_aux=has_aux).plan(*args, **kwargs)


def jacobian(
    fun: Callable,
    argnums: int | tuple[int, ...] = 0,
    *,
    mode: str = "auto",
    method: str = "auto",
    has_aux: bool = False,
    holomorphic: bool = False,
    chunk_size: int | None = None,
    mesh=None,
    mesh_axis=None,
    max_memory: int | str | None = None,
    allow_int: bool = False,
) -> Callable:
    """The Jacobian of ``fun``, compiled, in the book's numerator layout (5.58).

    Same results and pytree structure as ``jax.jacfwd``/``jax.jacrev``: for an
    output leaf of shape ``out.shape`` and an input leaf of shape ``in.shape``
    the block has shape ``out.shape + in.shape``. One difference, on purpose:
    with mixed precisions each block has dtype ``promote(out.dtype, in.dtype)``
    whatever the mode (``jax.jacfwd`` gives the output's dtype and ``jax.jacrev``
    the input's, so their answers differ from each other). Derivatives of
    Python scalars are weakly typed, as JAX's. A real-valued function of complex
    inputs is differentiated in reverse mode with ``jax.jacrev``'s convention. The returned function is
    jit-compiled and cached: a second call with the same shapes and dtypes does
    not re-trace ``fun``.

    Args:
      fun: the function to differentiate. Its differentiated arguments must be
        (pytrees of) real floating-point arrays, complex with ``holomorphic``.
        Other arguments may be arrays or hashable values: Python ints, floats
        and complex numbers are traced (weakly typed, as ``jax.jit`` does) unless
        ``fun`` needs them as Python values; bools, strings and enums are
        compiled in as constants.
      argnums: an int or tuple of ints: which positional arguments to
        differentiate. A tuple gives a tuple of Jacobians per output leaf.
      mode: the direction: ``"fwd"`` (from the inputs), ``"rev"`` (from the
        outputs) or ``"auto"``. With ``method="auto"``, a fixed direction means
        the dense method (one JVP per input entry, or one VJP per output entry:
        the same program as ``jax.jacfwd``/``jax.jacrev``), and ``"auto"`` lets
        the planner choose method and direction from the jaxpr's cost (see
        :func:`jacobians.explain`).
      method: ``"auto"`` (the planner), ``"dense"`` (basis vectors; ``mode="auto"``
        picks forward when the input size is <= the output size), ``"structured"``
        (one sweep carrying identity, diagonal, selection and dense Jacobians,
        see the README; ``chunk_size`` bounds its columns or rows per step; no
        ``mesh``) or ``"compressed"``
        (the sparse engine's colouring, dense output).
      has_aux: ``fun`` returns ``(output, aux)``; the result is ``(jac, aux)``.
      holomorphic: ``fun`` is holomorphic in complex inputs.
      chunk_size: push at most this many basis vectors at a time, bounding
        peak memory; ``None`` pushes all at once. Any value >= 1 works.
      mesh: ``None`` (one device), a ``jax.sharding.Mesh`` or ``"auto"`` (every
        device of every process): the basis vectors (or colours) are split across
        the mesh's devices and the result comes back sharded along its basis
        axis; ``chunk_size`` then counts vectors per device.
      mesh_axis: the mesh axis name(s) to split over (default: all of them).
      max_memory: a memory budget in bytes, or a string such as ``"2GB"``: the first
        call of each call structure picks the largest ``chunk_size`` whose compiled
        program fits, by XLA's memory analysis (see :mod:`jacobians._memory`; the
        plan's ``memory`` says what was chosen); an error where even the result does
        not fit. Not with ``chunk_size``.
      allow_int: as ``jax.jacrev``'s: integer (and bool) leaves of the differentiated
        arguments are held fixed, their blocks zeros of the leaf's dtype and shape
        ``out.shape + leaf.shape`` (else they are a ``TypeError``).

    Returns:
      A function with ``fun``'s signature returning the Jacobian pytree
      (``(jacobian, aux)`` with ``has_aux``).

    Raises:
      ValueError: unknown ``mode``, ``chunk_size`` < 1, bad ``argnums``
        (raised at once, before any tracing).
      TypeError: integer or non-array inputs to differentiate, integer outputs.

    Example (the book's (5.63)-(5.66))::

      >>> f = lambda x: jnp.array([-2 * x[0] + x[1], x[0] + x[1]])
      >>> jacobians.jacobian(f)(jnp.array([1.0, 2.0]))
      Array([[-2.,  1.],
             [ 1.,  1.]], dtype=float32)
    """
    where = "jacobians.jacobian"

    def make(c):
        return _build(fun, argnums, mode, has_aux, holomorphic, c, None, where, mesh, mesh_axis, method)

    result = _memory.transform(make, chunk_size, max_memory, where, lambda *a, **k: make(1).plan(*a, **k).passes)
    if not _args.check_bool(allow_int, "allow_int", where):
        return result

    def build(g, positions):
        return jacobian(g, positions, mode=mode, method=method, has_aux=has_aux, holomorphic=holomorphic,
                        chunk_size=chunk_size, mesh=mesh, mesh_axis=mesh_axis, max_memory=max_memory)

    return _allow_int.with_int_leaves(fun, result, build, argnums, has_aux, lambda r: r[0] if has_aux else r,
                                      lambda r, j: (j, r[1]) if has_aux else j)


def jacobian_matrix(
    fun: Callable,
    argnums: int = 0,
    *,
    mode: str = "auto",
    order: str = "C",
    has_aux: bool = False,
    chunk_size: int | None = None,
    max_memory: int | str | None = None,
) -> Callable:
    """The Jacobian of an array-to-array ``fun`` as a 2-D ``(out.size, in.size)`` matrix.

    The book's approach 2 of Figure 5.7: flatten output and input, then take the
    Jacobian of vectors. ``order="C"`` flattens row-major; ``order="F"`` stacks
    columns (the book's ``vec``, section 5.4), so for ``A(x)`` of shape (4, 2)
    and ``x`` in R^3 row ``i + 4 * j`` holds ``dA[i, j]/dx``. See
    :func:`jacobians.layout.to_matrix` for the convention.

    Args:
      fun: maps a single array (argument ``argnums``) to a single array.
      argnums: an int: which positional argument to differentiate.
      mode, has_aux, chunk_size, max_memory: as for :func:`jacobian`.
      order: ``"C"`` (row-major) or ``"F"`` (column stacking, vec).

    Returns:
      A function returning the matrix of shape ``(prod(out.shape), prod(in.shape))``
      (``(matrix, aux)`` with ``has_aux``).

    Raises:
      ValueError: unknown ``order`` or ``mode``, tuple ``argnums``, or pytree
        inputs or outputs.
    """
    where = "jacobians.jacobian_matrix"
    order = _args.check_order(order, where)
    if isinstance(argnums, tuple | list):
        raise ValueError(f"{where}: argnums must be a single int, got {argnums!r}.")

    def make(c):
        return _build(fun, argnums, mode, has_aux, False, c, order, where)

    return _memory.transform(make, chunk_size, max_memory, where, lambda *a, **k: make(1).plan(*a, **k).passes)
