"""Second order: Hessians, Hessian-vector products, and values computed in the same pass.

The Hessian of a scalar ``f`` is the Jacobian of its gradient (section 5.8):
``H[i..., j...] = d^2 f / d x_i d x_j``, of shape ``x.shape + x.shape`` (for
pytrees and ``argnums`` tuples, block ``H[i][j]`` has shape
``x_i.shape + x_j.shape``, as ``jax.hessian`` gives). Modes name the outer
and the inner differentiation: ``"fwd_rev"`` is forward over reverse
(``jax.hessian``'s), ``"rev_rev"``, ``"rev_fwd"`` and ``"fwd_fwd"`` the others.
``"auto"`` takes the structured forward or reverse sweep through the gradient
where the planner's cost model says it is cheaper (see ``_sweeps``), else
forward over reverse, and falls back to ``"rev_rev"`` where a ``custom_vjp``
forbids forward mode and to ``"fwd_fwd"`` where a ``while_loop`` forbids
reverse mode. A structured sweep is chosen once per call structure and shapes
and certified against Hessian-vector products first (see :mod:`._trust`).
"""

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from . import _allow_int, _args, _compat, _hoist, _memory, _mesh, _methods, _planner, _sweeps, _trust, _walker, kernels
from ._leaves import Leaves, join

HESSIAN_MODES = _args.HESSIAN_MODES


def _check_scalar(shapes, where: str, holomorphic: bool = False, bare: bool = False) -> None:
    """``fun``'s output must be one real (holomorphic: complex) scalar.

    ``bare``: the scalar itself, not held in a container (a dict, a 1-tuple): what ``jax.grad`` takes,
    for :func:`hvp` (``jax.hessian``, and so :func:`hessian`, keeps such a container around its result).
    """
    _args.check_float_outputs(shapes, where, holomorphic)
    leaves, treedef = jax.tree_util.tree_flatten(shapes)
    if len(leaves) != 1 or leaves[0].shape != ():
        shown = leaves[0].shape if len(leaves) == 1 else treedef
        raise ValueError(
            f"{where}: fun must return a scalar (shape ()), but its output is {shown}. For the second "
            "derivatives of a tensor-valued function use jacobians.jacobian(jacobians.jacobian(fun))."
        )
    if not holomorphic:
        check_real_output(leaves[0].dtype, where, holomorphic_option=not bare)  # (hvp, the bare one, has none)
    if bare and not jax.tree_util.treedef_is_leaf(treedef):
        raise TypeError(
            f"{where}: fun must return its scalar itself, but returns it in a container, {treedef} (as "
            "jax.jvp(jax.grad(fun)), which refuses it too); return the scalar (e.g. fun(x)['loss']), or use "
            "jacobians.hessian, which keeps the container around the Hessian as jax.hessian does."
        )


def check_real_output(dtype, where: str, holomorphic_option: bool = False) -> None:
    """A Hessian (not holomorphic) needs a real scalar: ``jax.hessian`` refuses complex outputs (as ``jax.grad``).

    ``holomorphic_option``: the call takes ``holomorphic=True``, which the message then names.
    """
    if jnp.issubdtype(dtype, jnp.complexfloating):
        hint = (", or, for a holomorphic fun of complex inputs, pass holomorphic=True" if holomorphic_option
                else "")
        raise TypeError(
            f"{where}: fun must return a real scalar (a real floating-point dtype), but its output has dtype "
            f"{np.dtype(dtype)} (jax.hessian refuses complex outputs too). Differentiate jnp.real(fun) and "
            f"jnp.imag(fun) separately{hint}."
        )


@dataclasses.dataclass(frozen=True)
class _Options:
    """A ``hessian``'s options, checked once when it is built, and its plan cache."""

    shards: object
    mode: _args.HessianMode
    has_aux: bool
    holomorphic: bool
    chunk_size: int | None
    with_value: bool
    plans: dict = dataclasses.field(default_factory=dict, repr=False)
    pending: dict = dataclasses.field(default_factory=dict, repr=False)  # certificates running (_trust.defer)


@dataclasses.dataclass(frozen=True)
class _JacobianOptions:
    """``value_and_jacobian``'s options, checked once."""

    mode: _args.Mode
    has_aux: bool
    chunk_size: int | None
    holomorphic: bool = False


def gradient(p: _args.Problem, inner: str, holomorphic: bool = False) -> Callable:
    """``x -> (grad f(x), (f(x), aux))`` with the inner mode, for a flat scalar problem.

    ``holomorphic``: ``x`` and ``f`` complex, the gradient ``df/dz`` (JAX's ``holomorphic=True``); the forward
    inner mode pushes complex basis vectors, which gives ``df/dz`` for a holomorphic ``f`` as it stands.
    """

    def scalar(x):
        y, aux = p.flat(x)
        return y[0], aux

    if inner == "rev":

        def grad(x):
            (value, aux), g = jax.value_and_grad(scalar, has_aux=True, holomorphic=holomorphic)(x)
            return g, (value, aux)

    else:

        def grad(x):
            basis = jnp.eye(x.shape[0], dtype=x.dtype)
            value, g, aux = kernels.primal_once(lambda axes: jax.vmap(
                lambda t: jax.jvp(scalar, (x,), (t,), has_aux=True), out_axes=axes)(basis), 0)
            return g, (value, aux)

    return grad


def order_for(names: set[str]) -> str:
    """The one second-order mode JAX can take through a jaxpr differentiating ``names``, else ``"auto"``.

    ``"fwd_fwd"`` where it cannot pull VJPs (:data:`jacobians._methods.NO_REV`), ``"rev_rev"``
    where it cannot push JVPs (a ``custom_vjp``). A plan that records it needs no jaxpr when
    it is evaluated (some refusals surface only when the program is lowered).
    """
    only = _methods.single(_methods.directions(names))
    return {"fwd": "fwd_fwd", "rev": "rev_rev"}.get(only, "auto")


def either_second(run: Callable, where: str, jaxpr=None):
    """Forward over reverse, unless JAX cannot differentiate in that order.

    Reverse over reverse where a custom_vjp forbids forward mode, forward over
    forward where a while_loop forbids reverse mode.
    """
    return _args.with_fallback(run, "fwd_rev", "rev_rev", "fwd_fwd", where, jaxpr)


def _second(p: _args.Problem, mode: str, chunk_size, where: str, shards=None, choose=None, holomorphic=False):
    """``(H (n, n), g (n,), value, aux)`` by the given mode.

    ``choose(decide) -> sweep or None``: the cached, certified choice of a
    structured sweep for ``mode="auto"`` (``decide()`` runs the cost model).
    ``holomorphic``: complex ``x``, the complex Hessian ``d^2 f / dz^2`` (both
    differentiations holomorphic, as ``jax.hessian(..., holomorphic=True)``).
    """

    def run(m):
        outer, inner = m.split("_")
        kernel = kernels.forward if outer == "fwd" else kernels.reverse
        g, H, (value, aux) = kernel(gradient(p, inner, holomorphic), p.x, chunk_size, shards)
        return H, g, value, aux

    if mode == "auto" and chunk_size is None and shards is None and not jnp.iscomplexobj(p.x):
        # The Jacobian of the gradient may be cheaper by a structured sweep (one sweep through
        # the gradient's jaxpr instead of n JVPs): the planner's cost model decides.
        grad = gradient(p, "rev")
        traced: dict = {}  # the sweeps the cost model traced here: the chosen one is evaluated, not swept again

        def sweep_program(sweep):
            traced[sweep] = _methods.Traced(*jax.make_jaxpr(lambda x: _sweeps.jacobian(grad, x, sweep),
                                                            return_shape=True)(p.x))
            return traced[sweep]

        def decide() -> str | None:
            try:
                closed = jax.make_jaxpr(lambda x: grad(x)[0])(p.x)
            except Exception:  # noqa: BLE001 - no reverse-mode gradient (while_loop): the fallbacks below
                return None
            # The reverse sweep over the gradient first: it won on every loss measured (MLPs, Rosenbrock,
            # log-sum-exp, quadratic forms), so the forward sweep is traced only while it can still beat it.
            plan = _planner.choose(closed, p.n, p.n, None, None, sweep_program, sweeps=("rev", "fwd"))
            return plan.mode if plan.method == "structured" else None

        sweep = choose(decide) if choose is not None else decide()
        if sweep is not None:
            if sweep in traced:  # (its consts may be this trace's values: used here only)
                g, H, (value, aux) = traced[sweep]((p.x,))
            else:
                g, H, (value, aux) = _sweeps.jacobian(grad, p.x, sweep)
            return H, g, value, aux
    return either_second(run, where, p.jaxpr) if mode == "auto" else _args.in_mode(where, mode, run, mode)


def _problem(t, spec, traced, has_aux, holomorphic=False):
    return _args.problem(
        t.fun, spec, traced, where=t.where, has_aux=has_aux, int_argnums=t.int_argnums, holomorphic=holomorphic,
    )


def _choose(t, spec, opts, traced, decide) -> str | None:
    """The structured sweep for these shapes, or ``None``: decided once, certified against HVPs at a random point.

    As :func:`jacobians.jacobian`'s plans: where the call being traced is concrete, the check runs
    after it with the call's own compiled Hessian (only JAX's reference HVPs are compiled for it,
    ahead, while the call compiles), and a failure replaces the sweep and runs the call again.
    """
    key = (spec, _args.shapes_key(traced))
    if key in opts.pending:  # made by a call that did not finish: settle it first
        opts.pending[key].wait()
    if key in opts.plans:
        return opts.plans[key]
    where = t.where
    sweep = None
    try:
        sweep = decide()
        if sweep is not None:
            avals = [jax.ShapeDtypeStruct(np.shape(a), a.dtype) for a in traced]
            traced_flat = _args.trace_flat(t, spec, avals, has_aux=opts.has_aux)
            values, after = _trust.check_point(traced, spec, t)

            def computed(point):  # the call's own Hessian at the point, flat (n, n)
                res = t.cache[spec](*point)
                res = res[0] if opts.has_aux else res
                lay = Leaves.of(traced_flat[2].in_leaves)
                return join(jax.tree_util.tree_leaves(res[2] if opts.with_value else res), lay, lay)

            def check():
                with _trust.stage("certificate"):
                    return _trust.linear(
                        traced_flat, values, lambda q: _sweeps.jacobian(gradient(q, "rev"), q.x, sweep)[1],
                        mode="fwd", hessian=True, where=where, computed=computed if after else None)

            pending = _trust.defer(check, lambda result: _settle(t, opts, key, sweep, result)) if after else None
            if pending is not None:
                opts.pending[key] = pending
            else:
                cert = check()
                if cert.failed:
                    _trust.certificate_failed(where, f"structured {sweep} Hessian", cert.detail)
                    sweep = None
    except Exception as e:  # noqa: BLE001 - reported (strict: raised) by analysis_failed
        _trust.analysis_failed(where, e, "planner's cost model")
        sweep = None
    opts.plans[key] = sweep
    return sweep


def _settle(t, opts, key, sweep: str, result) -> bool:
    """A deferred check's result: keep the sweep (``True``), or replace it by HVPs and forget the compiled call."""
    opts.pending.pop(key, None)
    if not isinstance(result, BaseException) and not result.failed:
        return True
    # Replaced before the failure is reported: strict mode raises, and the next call must not reuse the sweep.
    opts.plans[key] = None
    t.forget(key[0])
    if isinstance(result, BaseException):
        _trust.analysis_failed(t.where, result)
    else:
        _trust.certificate_failed(t.where, f"structured {sweep} Hessian", result.detail)
    return False


def _compute_hessian(t, spec, opts, *traced):
    holomorphic = opts.holomorphic
    p = _problem(t, spec, traced, opts.has_aux, holomorphic)
    _check_scalar(p.out_treedef.unflatten(p.out_leaves), t.where, holomorphic)
    H, g, value, aux = _second(p, opts.mode, opts.chunk_size, t.where, opts.shards,
                               lambda decide: _choose(t, spec, opts, traced, decide), holomorphic)
    # fun's output container (a dict or 1-tuple holding the scalar) around each result, as jax.hessian
    # (jacfwd(jacrev(fun))) keeps it; around the gradient too, as jax.jacrev(fun): one convention for all three.
    def held(tree):
        return p.out_treedef.unflatten([tree])

    H = held(_weak_as_inputs(p, p.hessian_blocks(H)))
    if opts.with_value:
        out0 = p.out_leaves[0]
        value = _args.cast(value.reshape(()), out0.dtype, weak=_args.is_weak(out0))
        out = held(value), held(_weak_as_inputs(p, p.in_tree(g))), H
    else:
        out = H
    return (out, aux) if opts.has_aux else out


def _weak_as_inputs(p: _args.Problem, tree):
    """Results for weakly typed inputs (Python floats) weakly typed, as JAX's derivatives are.

    ``tree``: a gradient (leaf ``i`` for input leaf ``i``) or Hessian blocks (row ``H[i]`` for input leaf
    ``i``): ``jax.hessian``'s block ``H[i][j]`` is a derivative of the gradient's leaf ``i``, weak where ``x_i`` is.
    """
    weak = [_args.is_weak(v) for v in p.in_leaves]
    if not any(weak):
        return tree
    parts = p.in_treedef.flatten_up_to(tree)
    return p.in_treedef.unflatten([jax.tree_util.tree_map(lambda b: _args.cast(b, b.dtype, weak=True), part) if w
                                   else part for part, w in zip(parts, weak, strict=True)])


def _build_hessian(fun, argnums, mode, has_aux, chunk_size, with_value, where, mesh=None, mesh_axis=None,
                   holomorphic=False):
    opts = _Options(
        shards=_mesh.resolve(mesh, where, mesh_axis),
        mode=_args.check_mode(mode, where, HESSIAN_MODES),
        has_aux=_args.check_bool(has_aux, "has_aux", where),
        holomorphic=_args.check_bool(holomorphic, "holomorphic", where),
        chunk_size=_args.check_chunk_size(chunk_size, where),
        with_value=with_value,
    )
    t = _args.Transform.jitted(fun, argnums, where, _compute_hessian, opts)

    def recover(spec, traced, error) -> bool:
        """XLA failed to compile a structured sweep's program: the HVPs (JAX's own), once, with a warning."""
        key = (spec, _args.shapes_key(traced))
        sweep = opts.plans.get(key)
        if sweep is None:
            return False
        opts.pending.pop(key, None)
        _trust.drop_deferred()  # its check would run the program that did not compile
        opts.plans[key] = None
        _trust.compiler_failed(where, f"structured {sweep} Hessian", "HVP", error)
        return True

    t.recover = recover
    return _trust.wrap(t)


def hessian(
    fun: Callable,
    argnums: int | tuple[int, ...] = 0,
    *,
    mode: str = "auto",
    has_aux: bool = False,
    holomorphic: bool = False,
    chunk_size: int | None = None,
    mesh=None,
    mesh_axis=None,
    max_memory: int | str | None = None,
) -> Callable:
    """The Hessian of a scalar ``fun``: the Jacobian of its gradient (section 5.8, (5.147)).

    Same results and structure as ``jax.hessian``: for input leaves ``x_i``,
    ``x_j`` block ``H[i][j]`` has shape ``x_i.shape + x_j.shape``. Compiled and
    cached per call structure, like :func:`jacobians.jacobian`.

    Args:
      fun: returns a scalar (shape ``()``), differentiated in ``argnums``.
      argnums: an int or a tuple of ints.
      mode: ``"fwd_rev"``, ``"rev_rev"``, ``"rev_fwd"``, ``"fwd_fwd"`` (outer over
        inner) or ``"auto"`` (forward over reverse; ``"rev_rev"`` where a
        ``custom_vjp`` forbids forward mode, ``"fwd_fwd"`` where a ``while_loop``
        forbids reverse mode).
      has_aux: ``fun`` returns ``(value, aux)``; the result is ``(H, aux)``.
      holomorphic: ``fun`` is holomorphic in complex inputs (complex scalar
        output): the complex Hessian ``d^2 fun / dz^2``, as
        ``jax.hessian(fun, holomorphic=True)`` (every mode; ``"auto"`` is
        forward over reverse).
      chunk_size: at most this many Hessian-vector products at a time (bounds memory).
      mesh, mesh_axis: split the Hessian-vector products across a mesh's devices
        (see :func:`jacobians.jacobian`).
      max_memory: a memory budget (bytes, or ``"4GB"``): the most Hessian-vector products at
        a time whose compiled program fits, by XLA's memory analysis (as
        :func:`jacobians.jacobian`); not with ``chunk_size``.

    Returns:
      A function returning the Hessian pytree; where ``fun`` returns its scalar in a
      container (a dict, a 1-tuple, a NamedTuple), the Hessian in that container, as
      ``jax.hessian`` gives it. Blocks for a Python float argument are weakly typed, as JAX's.

    Raises:
      ValueError: a non-scalar output (use ``jacobian(jacobian(fun))``), unknown mode.
      TypeError: integer inputs, complex inputs without ``holomorphic`` (real
        inputs with it); a complex output without ``holomorphic`` (as ``jax.hessian``);
        a function no mode can differentiate twice.

    Example::

      >>> jacobians.hessian(lambda x: x[0] ** 2 * x[1])(jnp.array([1.0, 2.0]))
      Array([[4., 2.],
             [2., 0.]], dtype=float32)
    """
    where = "jacobians.hessian"
    return _memory.transform(
        lambda c: _build_hessian(fun, argnums, mode, has_aux, c, False, where, mesh, mesh_axis, holomorphic),
        chunk_size, max_memory, where)


def value_grad_and_hessian(
    fun: Callable,
    argnums: int | tuple[int, ...] = 0,
    *,
    mode: str = "auto",
    has_aux: bool = False,
    holomorphic: bool = False,
    chunk_size: int | None = None,
    max_memory: int | str | None = None,
) -> Callable:
    """``(f(x), grad f(x), H(x))`` from one pass (the value and gradient ride along the Hessian's).

    Arguments as :func:`hessian`. Returns a function giving ``(value, grad, H)``
    (``((value, grad, H), aux)`` with ``has_aux``); ``grad`` has the structure of
    the differentiated arguments, ``H`` that of :func:`hessian`. Where ``fun`` returns
    its scalar in a container (a dict, a 1-tuple), each of the three is in it:
    ``(fun(x), jax.jacrev(fun)(x), jax.hessian(fun)(x))``.
    """
    where = "jacobians.value_grad_and_hessian"
    return _memory.transform(
        lambda c: _build_hessian(fun, argnums, mode, has_aux, c, True, where, holomorphic=holomorphic),
        chunk_size, max_memory, where)


def _check_tangents(tangents: tuple, p: _args.Problem, int_argnums: bool, where: str) -> None:
    """Tangents as ``jax.jvp`` takes them: the differentiated arguments' structure, shapes and dtypes.

    A Python float (weakly typed) stands for any real floating dtype, as in JAX; anything else must
    match exactly (a complex tangent of a real argument would lose its imaginary part).
    """
    tree = tangents[0] if int_argnums else tuple(tangents)
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    if treedef != p.in_treedef:
        raise TypeError(
            f"{where}: tangents must have the structure of the differentiated arguments, {p.in_treedef}; got "
            f"{treedef} (as for jax.jvp)."
        )
    for i, (tl, xl) in enumerate(zip(leaves, p.in_leaves, strict=True)):
        if tuple(np.shape(tl)) != tuple(np.shape(xl)):
            raise ValueError(
                f"{where}: tangent leaf {i} has shape {tuple(np.shape(tl))}, its argument {tuple(np.shape(xl))} "
                "(as for jax.jvp)."
            )
        td, xd = jnp.result_type(tl), jnp.result_type(xl)
        weak_real = _args.is_weak(tl) and jnp.issubdtype(td, jnp.floating) and jnp.issubdtype(xd, jnp.inexact)
        if td != xd and not weak_real:
            raise TypeError(
                f"{where}: tangent leaf {i} has dtype {td}, its argument {xd}: they must be equal (as for jax.jvp)."
            )


def asymmetric_rule(jaxpr) -> str | None:
    """Why JAX's Hessian of ``jaxpr`` is not symmetric (the ``custom_jvp`` rule that makes it so), else ``None``.

    JAX's Hessian is the Jacobian of the gradient; a rule whose tangent map is not the derivative of
    any function (:func:`jacobians._taylor._honest.disagreeing_rule`) makes it unsymmetric, and a
    method that reads ``H^T`` for ``H`` (a reverse outer pass, a symmetric colouring) gives another matrix.
    """
    if jaxpr is None or "custom_jvp_call" not in _walker.primitives(_compat.unclose(jaxpr)[0]):
        return None
    from ._taylor import _honest  # noqa: PLC0415 - the Taylor package imports the engines' modules

    rule = _honest.disagreeing_rule(jaxpr, symmetric=True)
    if rule is None:
        return None
    return f"the custom_jvp rule of '{rule}' is not the derivative of a function: JAX's Hessian is not symmetric"


def forward_outer(where: str, mode: str, jaxpr) -> str:
    """``mode``, or forward over ``mode``'s inner pass where a reverse outer pass would give ``H^T v``.

    The caller's reverse outer ``mode`` then warns or, strict, raises
    (:func:`jacobians._trust.method_cannot_follow`).
    """
    if mode == "auto" or mode.startswith("fwd") or (why := asymmetric_rule(jaxpr)) is None:
        return mode
    _trust.method_cannot_follow(where, f"mode={mode!r}", "forward outer pass", why)
    return "fwd_" + mode.split("_")[1]


def _compute_hvp(t, spec, mode, tangents, *traced):
    p = _problem(t, spec, traced, False)
    _check_scalar(p.out_treedef.unflatten(p.out_leaves), t.where, bare=True)
    _check_tangents(tangents, p, t.int_argnums, t.where)
    mode = forward_outer(t.where, mode, p.jaxpr)
    v, _ = ravel_pytree(tangents)
    v = v.astype(p.x.dtype)  # (only weakly typed Python floats differ: as jax.jvp, they take the primal's dtype)

    def run(m):
        outer, inner = m.split("_")
        grad = gradient(p, inner)
        if outer == "fwd":
            return jax.jvp(lambda x: grad(x)[0], (p.x,), (v,))[1]
        # H is symmetric: H v is the VJP of the gradient with v.
        return jax.vjp(lambda x: grad(x)[0], p.x)[1](v)[0]

    hv = either_second(run, t.where, p.jaxpr) if mode == "auto" else _args.in_mode(t.where, mode, run, mode)
    return _weak_as_inputs(p, p.in_tree(hv))  # as jax.jvp(jax.grad(fun)): weak for a Python float argument


def hvp(fun: Callable, primals: tuple, tangents: tuple, *, argnums: int | tuple[int, ...] = 0, mode: str = "auto"):
    """The Hessian-vector product ``H(x) v`` of a scalar ``fun``, without forming ``H``.

    Called like ``jax.jvp(fun, primals, tangents)``: ``primals`` is the tuple of
    ``fun``'s positional arguments and ``tangents`` a tuple with one entry per
    differentiated argument (``argnums``), each of its argument's structure.
    Compiled and cached per call structure.

    Args:
      fun: returns a scalar.
      primals: a tuple of ``fun``'s positional arguments.
      tangents: a tuple matching the differentiated arguments.
      argnums: an int or a tuple of ints.
      mode: as for :func:`hessian`.

    Returns:
      ``H v``: for an int ``argnums`` the structure of that argument, else a tuple.

    Raises:
      TypeError: ``fun`` returns its scalar in a container (a dict, a 1-tuple) or a
        complex scalar, as ``jax.jvp(jax.grad(fun))`` refuses them.

    Example::

      >>> jacobians.hvp(lambda x: jnp.sum(x ** 3), (jnp.array([1.0, 2.0]),), (jnp.array([1.0, 0.0]),))
      Array([6., 0.], dtype=float32)
    """
    # The common call (tuples of jax arrays and floats, as before) skips the argument pipeline: the compiled
    # function by the argument types, as Transform's own fast path (jax.jit's dispatch, within ~1 us).
    fast_key = None
    if type(primals) is tuple and type(tangents) is tuple:
        try:
            fast_key = (fun, argnums, mode, len(tangents), *map(type, primals))
            fast = _HVP_FAST.get(fast_key)
        except TypeError:  # unhashable (a list of argnums): the general path
            fast_key = fast = None
        if fast is not None:
            try:
                return fast(*tangents, *primals)
            except _args.TRACER_ERRORS as e:
                raise _args.TracedControlFlowError("jacobians.hvp", e) from e
    where = "jacobians.hvp"
    mode = _args.check_mode(mode, where, HESSIAN_MODES)
    if not isinstance(primals, tuple | list) or not isinstance(tangents, tuple | list):
        raise TypeError(
            f"{where}: primals and tangents must be tuples (as for jax.jvp), got {type(primals).__name__} and "
            f"{type(tangents).__name__}."
        )
    key = (fun, _args.check_argnums(argnums, where), isinstance(argnums, tuple | list), mode)
    t = _HVP_CACHE.get(key)
    if t is None:
        if len(_HVP_CACHE) >= _args.CACHE_MAX:
            _HVP_CACHE.pop(next(iter(_HVP_CACHE)))
        t = _HVP_CACHE[key] = _args.Transform(
            # Tangents first, one argument each (no tuple for jax.jit to flatten), then the traced leaves.
            fun, argnums, where,
            lambda spec: _hoist.Hoisted(lambda *a: _compute_hvp(t, spec, mode, a[: len(spec.positions)],
                                                                *a[len(spec.positions):]))
        )
    fn, traced, spec = t.compiled(tuple(primals), {})
    if len(tangents) != len(spec.positions):
        # A non-scalar fun is the first thing to say (as hessian says it), before the tangents' count.
        args, kwargs, _ = spec.rebuild(traced)
        _check_scalar(_args.output_shapes(lambda d: fun(*args, **kwargs), (), where, False), where, bare=True)
        raise ValueError(
            f"{where}: tangents must have one entry per differentiated argument ({len(spec.positions)}), got "
            f"{len(tangents)}."
        )
    tg = tuple(tangents)
    try:
        out = fn(*tg, *traced)
    except _args.TRACER_ERRORS as e:
        raise _args.TracedControlFlowError(where, e) from e
    if (
        fast_key is not None
        and not spec.static
        and not spec.numbers
        and len(traced) == len(primals)
        and all(a is b and type(a) in _args.FAST_TYPES for a, b in zip(primals, traced, strict=True))
    ):
        if len(_HVP_FAST) >= 4 * _args.CACHE_MAX:
            _HVP_FAST.pop(next(iter(_HVP_FAST)))
        _HVP_FAST[fast_key] = _args.program(fn)  # the compiled program itself once it has run
    return out


_HVP_CACHE: dict = {}
_HVP_FAST: dict = {}  # (fun, argnums, mode, argument types) -> the compiled function, for calls that need no split


def _compute_value_and_jacobian(t, spec, opts, *traced):
    # Real-valued functions of complex inputs: reverse mode, with jax.jacrev's convention (as jacobians.jacobian).
    p = _args.problem(t.fun, spec, traced, where=t.where, has_aux=opts.has_aux, int_argnums=t.int_argnums,
                      holomorphic=opts.holomorphic, allow_complex=not opts.holomorphic and opts.mode != "fwd")
    if not p.out_leaves:  # an empty pytree (``()``): so are its value and its Jacobian
        empty, aux = p.empty_result()
        return ((empty, aux) if opts.has_aux else empty), empty
    complex_in = jnp.issubdtype(p.x.dtype, jnp.complexfloating) and not opts.holomorphic
    complex_out = jnp.issubdtype(p.out_dtype, jnp.complexfloating)
    mode = opts.mode

    def run(mode):
        return (kernels.forward if mode == "fwd" else kernels.reverse)(p.flat, p.x, opts.chunk_size)

    if complex_in:
        if complex_out:
            raise _args.complex_to_complex_error(t.where, p)
        y, jac, aux = run("rev")
    elif complex_out and not opts.holomorphic:  # a non-holomorphic complex output: its JVPs (VJPs pull real parts)
        if mode == "rev":
            raise _args.complex_rev_error(t.where, or_holomorphic=True)
        y, jac, aux = run("fwd")
    elif mode == "auto":  # the other direction where JAX cannot take this one (a custom_vjp, a while_loop)
        y, jac, aux = _args.with_fallback(run, "fwd" if p.n <= p.m else "rev", "rev", "fwd", t.where, p.jaxpr)
    else:
        y, jac, aux = run(mode)
    if "custom_vmap_call" in _args.differentiated(p.jaxpr):
        # The vmapped JVPs evaluate a custom_vmap by its batching rule, primal included: the value is
        # fun's own, evaluated once more (a rule that agrees with fun costs one call, XLA may share it).
        y, aux = p.flat(p.x)
    value = p.out_tree(y)
    if opts.has_aux:
        return (value, aux), p.blocks(jac)
    return value, p.blocks(jac)


def value_and_jacobian(
    fun: Callable,
    argnums: int | tuple[int, ...] = 0,
    *,
    mode: str = "auto",
    has_aux: bool = False,
    holomorphic: bool = False,
    chunk_size: int | None = None,
    allow_int: bool = False,
    max_memory: int | str | None = None,
) -> Callable:
    """``(fun(x), J(x))`` from one pass: the value is the primal of the JVPs/VJPs.

    Arguments as :func:`jacobians.jacobian` (``mode`` ``"fwd"``, ``"rev"`` or
    ``"auto"``; ``holomorphic=True``: complex inputs and outputs, ``d fun / dz``;
    ``allow_int``: integer leaves held fixed, zero blocks, as ``jax.jacrev``). Returns a
    function giving ``(value, jacobian)``, or, as ``jax.value_and_grad`` does with
    ``has_aux``, ``((value, aux), jacobian)``.
    """
    where = "jacobians.value_and_jacobian"

    def make(c):
        opts = _JacobianOptions(
            mode=_args.check_mode(mode, where),
            has_aux=_args.check_bool(has_aux, "has_aux", where),
            chunk_size=_args.check_chunk_size(c, where),
            holomorphic=_args.check_bool(holomorphic, "holomorphic", where),
        )
        return _args.wrap(_args.Transform.jitted(fun, argnums, where, _compute_value_and_jacobian, opts))

    result = _memory.transform(make, chunk_size, max_memory, where)
    if not _args.check_bool(allow_int, "allow_int", where):
        return result

    def build(g, positions):
        return value_and_jacobian(g, positions, mode=mode, has_aux=has_aux, holomorphic=holomorphic,
                                  chunk_size=chunk_size, max_memory=max_memory)

    return _allow_int.with_int_leaves(fun, result, build, argnums, has_aux, lambda r: r[1], lambda r, j: (r[0], j))
