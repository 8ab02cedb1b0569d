"""Laplacians and Hessian diagonals, exactly, without forming the Hessian.

For ``f: R^n -> R`` the Laplacian is ``tr(H) = sum_i d^2 f / d x_i^2`` and the
Hessian diagonal ``diag(H)`` (section 5.8). For tensor or pytree arguments
``x`` is their row-major raveling (as :func:`jacobians.hessian` flattens
them); an array-valued ``f`` gets one Laplacian per output entry (shape
``out.shape``) and one Hessian diagonal per output entry (numerator layout,
``out.shape + in.shape``).

Methods (``method=``):

- ``"forward"``: the forward Laplacian (:mod:`._taylor`): one pass carrying
  each intermediate's value, its ``n`` first derivatives and its Laplacian
  (or Hessian diagonal): the Taylor-mode chain rule, about ``n + 1`` columns
  through every linear operation.
- ``"sparse"``: the same pass with each intermediate's first derivatives kept
  only over the inputs it depends on: a network applied per node (or any
  local operator) costs what its structure costs.
- ``"hvp"``: one second directional derivative (``s^T H s``, a JVP of a JVP)
  per colour of a distance-1 colouring of the Hessian pattern
  (:func:`jacobians.hessian_sparsity`; inputs in one colour share no Hessian
  entry, so ``s^T H s`` is the sum of their diagonal entries); for the
  Hessian diagonal one HVP per colour (forward over reverse). A dense
  Hessian needs ``n``.
- ``"auto"``: the cheapest by the planner's cost model
  (:func:`jacobians._planner.pass_cost` of each sweep's program, traced not
  run; the HVP method at ``HVP_PASSES`` evaluations of ``fun`` per colour,
  bounded by the Hessian pattern's largest degree plus one); ``f.plan(*args)``
  shows the candidates and the choice.
"""

import dataclasses
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from . import _args, _compat, _deps, _memory, _mesh, _planner, _taylor, _trust, kernels
from ._deps import _second as _deps_second
from ._divergence import _diagonal_colors
from ._taylor import _honest
from ._walker import has_custom_vjp

METHODS = ("auto", "forward", "sparse", "hvp")
GREEDY_MAX = 4096  # Hessian graphs up to this many inputs are coloured in NumPy
PAIR_BUDGET = 1 << 15  # Hessian-pattern entries held while colouring for the HVP method (then: dense)
HVP_PASSES = 3  # a second directional derivative costs about three evaluations (value, first and second order)
SPARSE_CLEAR = 0.3  # the sparse sweep's mean columns below this fraction of n: no need to trace the dense one
SPARSE_MARGIN = 0.8  # the sparse sweep's gathers cost more than their element counts: it must win by this much
EXACT_MAX = 1024  # inputs up to which a forward plan's check compares every derivative with JAX's (one pass each)


@dataclass(frozen=True)
class _Options:
    """A Laplacian transformation's options, checked once when it is built, and its plan cache."""

    shards: object
    method: str
    has_aux: bool
    chunk_size: int | None
    kind: str  # "trace" (the Laplacian) or "diag" (the Hessian diagonal)
    with_grad: bool
    scalar: bool
    where: str
    plans: dict = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class LaplacianPlan:
    """What a Laplacian (or Hessian-diagonal) function does for one call structure, and why.

    Attributes:
      method: ``"forward"``, ``"sparse"`` or ``"hvp"``.
      n, m: total input and output sizes.
      passes: sweeps (``"forward"``: 1, or the number of chunks) or second directional derivatives (``"hvp"``).
      columns: first-derivative columns per intermediate entry in the sparse sweep, averaged
        over the entries (``n`` for a dense sweep; ``None`` if not traced).
      max_columns: the most columns any intermediate holds in that sweep.
      n_colors: colours of the Hessian's diagonal colouring (``None``: not made; the cost model uses greedy's
        bound, the largest degree plus one).
      costs: candidates and their estimated costs (arbitrary units: FLOPs of the traced programs).
      reason: one line on the choice.
      certificate: the plan's check against JAX's own second derivatives (:func:`_certify`).
    """

    method: str
    n: int
    m: int
    passes: int
    columns: float | None = None
    max_columns: int | None = None
    n_colors: int | None = None
    costs: dict = field(default_factory=dict)
    reason: str = ""
    colors: np.ndarray | None = field(default=None, repr=False, compare=False)
    memory: object = field(default=None, compare=False)  # a jacobians._memory.Fit under max_memory=
    certificate: object = field(default=None, compare=False)  # a jacobians._trust.Certificate

    def __str__(self) -> str:
        head = f"laplacian plan: {self.method}, {self.passes} pass(es) (n={self.n}, m={self.m}"
        if self.columns is not None:
            head += f", {self.columns:.3g} columns per entry (max {self.max_columns})"
        if self.n_colors is not None:
            head += f", {self.n_colors} colours"
        lines = [head + ")"]
        for name, cost in sorted(self.costs.items(), key=lambda kv: kv[1]):
            lines.append(f"  {name:<10} {cost:12.4g}{'  <- chosen' if name == self.method else ''}")
        if self.reason:
            lines.append(f"  {self.reason}")
        if self.certificate is not None:
            lines.append(f"  certificate: {self.certificate}")
        if self.memory is not None:
            lines.append(f"  {self.memory}")
        return "\n".join(lines)


# --- the methods: each returns (y (m,), J (n, m) or None, second) ------------------------------------
# second: the Laplacian (m,) for kind "trace", the Hessian diagonal (n, m) for kind "diag".


def _sweep_stats(sw: "_taylor.Sweep") -> tuple[float, int]:
    entries = [(size, k) for _, _, res in sw.lat.log for size, k in res]
    total = sum(s for s, _ in entries)
    if not total:
        return float(sw.lat.n), sw.lat.n
    return sum(s * k for s, k in entries) / total, max(k for _, k in entries)


def _forward(p, kind: str, sparse: bool, chunk, stats: dict | None = None, shards=None):
    n = p.n
    per = shards.count if shards is not None and not sparse else 1
    if chunk is not None:
        chunk *= per  # chunk_size counts columns per device, as in the other engines
    if chunk is None or chunk >= n or sparse:
        # On a mesh, zero columns fill the seed to a multiple of the devices (an uneven axis is not split).
        cols = None if n % per == 0 else -(-n // per) * per
        sw = _taylor.sweep(p.flat, p.x, kind, sparse, cols=cols, start=None, shards=shards)
        if stats is not None:
            stats["columns"], stats["max_columns"] = _sweep_stats(sw)
        J, S = sw.dense()
        return sw.y, J[:n], (S[0] if kind == "trace" else S[:n]), sw.aux
    chunks = -(-n // chunk)

    def one(c):
        sw = _taylor.sweep(p.flat, p.x, kind, False, cols=chunk, start=c * chunk, shards=shards)
        J, S = sw.dense()
        return J, S

    J, S = jax.lax.map(one, jnp.arange(chunks))  # (chunks, chunk, m), (chunks, 1 or chunk, m)
    m = J.shape[-1]
    J = J.reshape(chunks * chunk, m)[:n]
    S = jnp.sum(S[:, 0], axis=0) if kind == "trace" else S.reshape(chunks * chunk, m)[:n]
    y, aux = p.flat(p.x)
    return y, J, S, jax.tree_util.tree_leaves(aux)


def _seeds(colors: np.ndarray, n: int, dtype):
    n_colors = int(colors.max()) + 1 if n else 0
    return kernels.opaque(jnp.asarray(colors[None, :] == np.arange(n_colors)[:, None], dtype))  # (c, n), not folded


def _map(fn, seeds, chunk, shards=None):
    """``vmap(fn)(seeds)``: at most ``chunk`` seeds at once (per device), split across ``shards``' devices."""
    k = seeds.shape[0]
    per = shards.count if shards is not None else 1
    if chunk is None or chunk * per >= k:
        return kernels.sharded_vmap(fn, seeds, shards)
    if shards is None:
        return jax.lax.map(fn, seeds, batch_size=chunk)
    return kernels.sharded_chunks(fn, k, seeds, chunk, shards)


def _hvp(p, kind: str, colors: np.ndarray, chunk, where: str, shards=None):
    f = lambda x: p.flat(x)[0]  # noqa: E731
    x = p.x
    scalar = p.m == 1 and not jnp.issubdtype(p.out_dtype, jnp.complexfloating)  # reverse mode needs real outputs

    def directional(s):  # s^T H s per output: the JVP of a JVP
        return jax.jvp(lambda z: jax.jvp(f, (z,), (s,))[1], (x,), (s,))[1]

    def run(mode):
        if kind == "trace":
            if mode == "rev":  # a custom_vjp: s^T (H s), H s by reverse over reverse
                grad = jax.grad(lambda z: f(z)[0])
                second = lambda s: jnp.vdot(s, jax.vjp(grad, x)[1](s)[0])[None]  # noqa: E731
            else:
                second = directional
            return jnp.sum(_map(second, _seeds(colors, p.n, x.dtype), chunk, shards), axis=0)  # (m,)
        if mode == "fwd_fwd" or not scalar:  # one input per pass: d^2 f / dx_j^2 for every output at once
            return _map(directional, kernels.opaque(jnp.eye(p.n, dtype=x.dtype)), chunk, shards)  # (n, m)
        grad = jax.grad(lambda z: f(z)[0])
        if mode == "fwd":
            hv = lambda s: jax.jvp(grad, (x,), (s,))[1]  # noqa: E731
        else:
            hv = lambda s: jax.vjp(grad, x)[1](s)[0]  # noqa: E731
        prods = _map(hv, _seeds(colors, p.n, x.dtype), chunk, shards)  # (c, n): entry j of colour colors[j] is H[j, j]
        return prods[jnp.asarray(colors), jnp.arange(p.n)][:, None]

    def checked(mode):  # JAX says "custom_lin" when a JVP of a JVP meets a custom_vjp: say it as jvp does
        return _args.jvp_said(where, run, mode)

    # Reverse over reverse where a custom_vjp forbids JVPs; forward over forward where a while_loop forbids VJPs.
    if scalar:
        second = _args.with_fallback(checked, "fwd", "rev", "fwd_fwd", where, p.jaxpr)
    else:
        try:
            second = checked("fwd")
        except TypeError as e:
            if "custom_vjp" not in str(e):
                raise
            raise TypeError(
                f"{where}: method='hvp' on an array-valued function needs forward mode, which a custom_vjp "
                "forbids; use method='forward' or 'sparse' (they differentiate the custom_vjp's backward rule)."
            ) from e
    y, aux = p.flat(x)
    return y, None, second, jax.tree_util.tree_leaves(aux)


# --- planning ----------------------------------------------------------------------------------------


def _hessian_pattern(p, kind: str):
    """The off-diagonal pairs ``(rows, cols)`` of the (union over outputs of the) Hessian pattern; ``None``: dense.

    Per-entry diagonals of an array-valued function need one input per pass: also ``None``.
    """
    n = p.n
    if kind == "diag" and p.m != 1:
        return None
    try:
        closed = jax.make_jaxpr(lambda x: p.flat(x)[0])(p.x)
        # A budget that stops early on dense Hessians (a pair list of n^2 per layer costs seconds to sort).
        lat = _deps_second.HessianLattice(n, max(PAIR_BUDGET, 16 * n + 1024))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a primitive without a rule only makes the pattern denser
            _deps.Walker(lat).run(closed, [_deps.identity((n,))])
        rows, cols = lat.pairs()
    except _deps.TooDense:
        return None
    off = rows != cols
    return rows[off], cols[off]


def _color_bound(pattern, n: int) -> int:
    """Greedy colouring's bound, the largest degree plus one (the colouring itself is made only if chosen)."""
    if pattern is None:
        return n
    degree = np.bincount(pattern[0], minlength=n)
    return int(min(n, degree.max(initial=0) + 1)) if n else 0


def _hessian_colors(pattern, n: int) -> np.ndarray:
    """A distance-1 colouring of the Hessian graph (inputs of one colour share no Hessian entry).

    Small graphs are coloured greedily in NumPy, largest degree first: the colouring kernel
    compiles a JAX program per size, seconds that a small problem's plan should not pay.
    """
    if pattern is None:
        return np.arange(n)
    rows, cols = pattern
    if n > GREEDY_MAX:
        return _diagonal_colors(np.concatenate([rows, cols]), np.concatenate([cols, rows]), n)
    a = np.concatenate([rows, cols])
    b = np.concatenate([cols, rows])
    order = np.argsort(a, kind="stable")
    a, b = a[order], b[order]
    start = np.searchsorted(a, np.arange(n + 1))
    colors = np.full(n, -1, np.int64)
    for v in np.argsort(-(start[1:] - start[:-1]), kind="stable"):
        taken = colors[b[start[v] : start[v + 1]]]
        free = np.ones(taken.size + 1, bool)
        free[taken[(taken >= 0) & (taken <= taken.size)]] = False
        colors[v] = int(np.argmax(free))
    return colors


def _program(p, method: str, opts: "_Options", colors, meta: dict):
    """The traced (not run) program of one method: a closed jaxpr ``x -> (y, J, second, *aux)``."""

    def run(x):
        q = _args.Problem(p.flat, x, p.out_leaves, p.out_treedef, p.in_leaves, p.in_treedef, p.out_dtype,
                          jaxpr=p.jaxpr)
        stats = {}
        if method == "hvp":
            y, J, S, aux = _hvp(q, opts.kind, colors, opts.chunk_size, opts.where, opts.shards)
        else:
            y, J, S, aux = _forward(q, opts.kind, method == "sparse", opts.chunk_size, stats, opts.shards)
        meta.update(stats)
        meta["n_aux"] = len(aux)
        if not opts.with_grad:
            J = jnp.zeros((), y.dtype)  # a placeholder: outputs stay positional
        elif J is None:  # the gradient by one reverse pass (forward for complex values, as jax.grad has none)
            scalar = lambda z: p.flat(z)[0][0]  # noqa: E731
            complex_out = jnp.issubdtype(p.out_dtype, jnp.complexfloating)
            grad = lambda d: (jax.jacrev if d == "rev" else jax.jacfwd)(scalar)(x)  # noqa: E731
            # Forward where a while_loop bars the reverse pass, reverse where a custom_vjp bars JVPs.
            either = lambda: _args.with_fallback(grad, "rev", "rev", "fwd", opts.where, p.jaxpr)  # noqa: E731
            J = (grad("fwd") if complex_out else either())[:, None]
        return y, J, S, *aux

    return jax.make_jaxpr(run)(p.x)


def _choose(p, opts: "_Options") -> tuple[LaplacianPlan, dict]:
    """The plan for one call structure, and the programs traced while making it (reusable in this trace).

    ``"auto"`` traces the sparse sweep (its layouts are the analysis), the dense sweep only where the
    sparse one is not clearly cheaper, and costs the HVP method from the function's own program
    (``HVP_PASSES`` evaluations per colour) only where it could win.
    """
    n, m = p.n, p.m
    method, chunk = opts.method, opts.chunk_size
    programs, costs, notes, stats = {}, {}, [], {}
    colors = pattern = None

    def trace(name):
        meta = {}
        programs[name] = (_program(p, name, opts, None, meta), meta)
        costs[name] = _planner.pass_cost(programs[name][0])
        return meta

    closed = jax.make_jaxpr(lambda x: p.flat(x)[0])(p.x) if method != "hvp" else None
    rule = _honest.disagreeing_rule(closed) if closed is not None else None
    if rule is not None:
        why = (f"the custom_jvp rule of '{rule}' is not the derivative of its primal, and JAX differentiates "
               "both: a Taylor sweep carries one of them")
        if method == "auto":
            notes.append(why + "; the HVPs follow JAX")
        else:
            notes.append(_trust.method_cannot_follow(opts.where, f"method={method!r}", "hvp", why))
        method = "hvp"
    if method == "sparse" or (method == "auto" and chunk is None):
        stats = trace("sparse")
        if method == "auto" and stats["columns"] <= SPARSE_CLEAR * n:
            notes.append(f"the dense sweep not traced ({stats['columns']:.3g} columns per entry of {n})")
        elif method == "auto":
            trace("forward")
    if method == "forward" or (method == "auto" and chunk is not None):
        trace("forward")
    if method == "hvp":
        pattern = _hessian_pattern(p, opts.kind)
    elif method == "auto":
        one = HVP_PASSES * _planner.pass_cost(closed)
        if has_custom_vjp(closed) and (m != 1 or jnp.issubdtype(p.out_dtype, jnp.complexfloating)):
            notes.append("hvp not possible (a custom_vjp forbids the JVPs of JVPs an array output needs)")
        elif min(costs.values()) > 2 * one:  # else not even two colours could win
            pattern = _hessian_pattern(p, opts.kind)
            costs["hvp"] = _color_bound(pattern, n) * one
    if method == "auto":
        best = min(costs, key=costs.get)
        if best == "sparse" and "forward" in costs and costs["sparse"] > SPARSE_MARGIN * costs["forward"]:
            best = "forward"
            notes.append("the sparse sweep does not save enough to pay for its gathers")
        reason = f"the {best} program is cheapest"
    else:
        best = method
        reason = "method fixed by the caller" if rule is None else "a custom_jvp rule decides"
    if best == "hvp":
        colors = _hessian_colors(pattern, n)
    n_colors = None if colors is None else (int(colors.max()) + 1 if n else 0)
    passes = n_colors if best == "hvp" else (-(-n // chunk) if chunk and best == "forward" else 1)
    plan = LaplacianPlan(best, n, m, passes, stats.get("columns"), stats.get("max_columns"), n_colors, costs,
                         "; ".join([reason] + notes), colors)
    return plan, {k: v for k, v in programs.items() if k == best}


# --- the certificate ---------------------------------------------------------------------------------


def _certified(t, spec, traced, opts: "_Options", plan: LaplacianPlan) -> LaplacianPlan:
    """The plan with its certificate, or one HVP per input (JAX's own, exact) where the check disagrees.

    A PlanWarning then (strict: a PlanError), as every engine whose analysis chose the method.
    """
    n = plan.n
    if plan.method == "hvp" and (plan.colors is None or len(np.unique(plan.colors)) == n):
        return dataclasses.replace(plan, certificate=_trust.Certificate(
            "not needed", "JAX's own second derivatives, one input per pass"))
    avals = [jax.ShapeDtypeStruct(np.shape(a), a.dtype) for a in traced]
    try:
        with _trust.stage("certificate"):
            traced_flat = _args.trace_flat(t, spec, avals, has_aux=opts.has_aux)
            values = _trust.concrete(traced) or _trust.call_values(spec, t)
            cert = _certify(traced_flat, values, plan, opts.kind, opts.where)
    except _trust.AnalysisError as e:
        if not _args.jax_refused(e.cause):
            note = _trust.analysis_failed(opts.where, e)
            return _one_per_input(plan, note, _trust.fallback(note))
        cert = _trust.Certificate("skipped", "JAX cannot take the check's second derivatives of fun here")
    if not cert.failed:
        return dataclasses.replace(plan, certificate=cert)
    what = plan.method
    if plan.method == "hvp":
        what += f" ({plan.n_colors} colour{'s' * (plan.n_colors != 1)})"
    note = _trust.certificate_failed(opts.where, what, cert.detail)
    return _one_per_input(plan, note, cert)


def _one_per_input(plan: LaplacianPlan, note: str, cert) -> LaplacianPlan:
    """The HVP method with every input its own pass: JAX's second derivatives, no analysis."""
    return dataclasses.replace(plan, method="hvp", colors=np.arange(plan.n), n_colors=plan.n, passes=plan.n,
                               columns=None, max_columns=None, reason=note, certificate=cert)


def _certify(traced_flat, values, plan: LaplacianPlan, kind: str, where: str) -> "_trust.Certificate":
    """Check what the plan's analysis decided against JAX at a point near the call's inputs.

    - ``"forward"``, ``"sparse"``: the plan's sweep at the point (its Taylor rules, and the sparse sweep's
      layouts: each intermediate's first derivatives over the inputs it depends on only), its first
      derivatives and its Laplacian (Hessian diagonal) against JAX's JVPs of JVPs along each input
      (``n <= EXACT_MAX``); for more inputs its first derivatives along random directions ``t_k`` against
      JAX's JVPs, and its rules by a dense sweep of ``z -> fun(x + T^T z)`` (second-order part
      ``t_k^T H t_k``) against JAX's JVPs of JVPs along ``t_k``.
    - ``"hvp"``'s colouring: :func:`_certify_colors`.

    Where the check fails, once more allowing JAX's own rounding (its products at a point a few ulps
    away, along ``3 t``): a function that amplifies rounding moves JAX's result by as much.
    """
    closed = traced_flat[0]
    if plan.method == "hvp":
        return _certify_colors(traced_flat, values, plan.colors, where, closed)
    sparse = plan.method == "sparse"
    exact = traced_flat[2].n <= EXACT_MAX

    def reference(p, x, T):  # JAX's (J t_k, t_k^T H t_k) for each row t_k of T and each output
        f = lambda z: p.flat(z)[0]  # noqa: E731

        def run(mode):
            if mode == "fwd":
                inner = lambda t: lambda z: jax.jvp(f, (z,), (t,))[1]  # noqa: E731
                return jax.vmap(lambda t: jax.jvp(inner(t), (x,), (t,)))(T)
            # A custom_vjp bars JVPs: J by VJPs, t^T H_i t by reverse over reverse, per output entry i.
            y, pull = jax.vjp(f, x)
            E = jnp.eye(y.shape[0], dtype=y.dtype)
            J = jax.vmap(lambda e: pull(e)[0])(E)  # (m, n)

            def quad(t, e):
                g = lambda z: jax.vjp(f, z)[1](e)[0]  # noqa: E731
                return jnp.vdot(t, jax.vjp(g, x)[1](t)[0])

            return T @ J.T, jax.vmap(lambda t: jax.vmap(lambda e: quad(t, e))(E))(T)

        first, second = _args.jax_itself(_args.with_fallback, run, "fwd", "rev", "fwd", where, closed)
        return first, (jnp.sum(second, axis=0) if kind == "trace" else second)

    def program(p, T, leaves, nudged=False):
        x = p.x
        T = jnp.asarray(T, x.dtype)  # exact: the identity
        _, J, S, _ = _forward(p, kind, sparse, None)  # the plan's sweep: J (n, m), S (m,) or (n, m)
        if exact:
            got = (J, S)
        else:
            # The rules, by a dense sweep in the directions' coordinates (k columns), as the plan's applies them.
            sw = _taylor.sweep(lambda z: p.flat(x + z @ T), jnp.zeros(T.shape[0], x.dtype), kind)
            Jk, Sk = sw.dense()
            got = (T @ J, Jk, Sk[0] if kind == "trace" else Sk)
        first, second = reference(p, x, T)
        ref = (first, second) if exact else (first, first, second)
        if not nudged:
            return got + ref
        first, second = reference(p, _trust.nudged_point(x), 3 * T)  # JAX's own rounding
        other = (first / 3, second / 9)
        return got + ref + (other if exact else (other[0], other[0], other[1]))

    names = (("first derivatives", "second derivatives") if exact else
             ("first derivatives along random directions", "first derivatives of the rules along random directions",
              "second derivatives along random directions"))

    def judge(outs, T, tol, floor=None):  # floor: one per quantity (at_inputs_scale)
        k = len(names)
        got, ref, other = outs[:k], outs[k: 2 * k], outs[2 * k:] or [None] * k
        for i, (name, g, r, o) in enumerate(zip(names, got, ref, other, strict=True)):
            scale = np.abs(g) if floor is None else np.abs(g) + floor[i]
            detail = _trust.compare(g, r, scale, tol, "output entry", noise=None if o is None else o - r)
            if detail is not None:
                return f"{name}: {detail}"
        return None

    what = "JVPs of JVPs along each of the {k} inputs" if exact else "directions (JVPs of JVPs)"
    directions = (lambda rng, p: np.eye(p.n, dtype=p.x.dtype)) if exact else None
    cert = _certify_within_rounding(traced_flat, values, program, judge, what, directions)
    if not cert.failed:
        return cert
    # (A saturated point near the call's inputs: a float32 log-sum-exp, whose sweep's |W|^2-size terms cancel.)
    k = len(names)
    calm = _trust.at_inputs_scale(traced_flat, values, program, judge, lambda outs: [
        float(np.abs(r).max(initial=0.0)) for r in outs[k: 2 * k]], what, directions)
    return cert if calm is None else calm


def _certify_colors(traced_flat, values, colors: np.ndarray, where: str, closed) -> "_trust.Certificate":
    """The HVP method's colouring, on a random combination of the outputs (its Hessian holds every output's entries).

    ``H (w * s_c)`` read at colour ``c``'s inputs must be ``w`` times ``H s_c`` there (an entry shared by two
    inputs of one colour breaks it for almost every ``w``). Where a while_loop (or a transpose JAX cannot do)
    bars the gradient, by quadratic forms only: ``sum_c (w s_c)^T H (w s_c)`` must be ``sum_i w_i^2 H_ii``, the
    diagonal one JVP of a JVP per input.
    """
    c = int(colors.max()) + 1
    seeds = colors[None, :] == np.arange(c)[:, None]
    j = np.arange(colors.size)

    def program(p, T, leaves, nudged=False):
        x = p.x
        rho = np.random.default_rng(_trust.SEED + 3).standard_normal((2, p.m))
        w = jnp.asarray(T[0], x.dtype)

        def phi(z):
            y = p.flat(z)[0]
            return jnp.sum(rho[0] * jnp.real(y)) + (jnp.sum(rho[1] * jnp.imag(y)) if jnp.iscomplexobj(y) else 0.0)

        s = kernels.opaque(jnp.asarray(seeds, x.dtype))
        S = jnp.concatenate([s, s * w[None]])  # the plain seeds, then the weighted ones
        eye = kernels.opaque(jnp.eye(p.n, dtype=x.dtype))

        def run(mode, at=x, scale=1):  # (weighted, expected)
            if mode == "fwd_fwd":
                def quad(v):
                    return jax.jvp(lambda z: jax.jvp(phi, (z,), (scale * v,))[1], (at,), (scale * v,))[1] / scale**2

                return jnp.sum(jax.vmap(quad)(S[c:]))[None], jnp.sum(w**2 * jax.vmap(quad)(eye))[None]
            g = jax.grad(phi)
            if mode == "fwd":  # forward over reverse
                prod = jax.vmap(lambda v: jax.jvp(g, (at,), (scale * v,))[1] / scale)(S)
            else:  # reverse over reverse (a custom_vjp bars JVPs)
                _, pull = jax.vjp(g, at)
                prod = jax.vmap(lambda v: pull(scale * v)[0] / scale)(S)
            return prod[c:][colors, j], w * prod[:c][colors, j]

        def either(at=x, scale=1):
            return _args.jax_itself(_args.with_fallback, lambda mode: run(mode, at, scale), "fwd", "rev", "fwd_fwd",
                                    where, closed)

        if not nudged:
            return either()
        # JAX's own rounding: the same products at a point a few ulps away, along 3 s.
        return either() + either(_trust.nudged_point(x), 3)

    def judge(outs, T, tol):
        weighted, expected = outs[:2]
        noise = None
        if len(outs) > 2:  # the two sides' rounding, everywhere
            noise = np.abs(outs[2] - weighted) + np.abs(outs[3] - expected)
        return _trust.compare(weighted, expected, np.abs(weighted), tol, "diagonal entry", noise=noise)

    return _certify_within_rounding(traced_flat, values, program, judge, "HVPs with weighted colour seeds",
                                    lambda rng, p: rng.standard_normal((1, p.n)).astype(p.x.dtype))


def _certify_within_rounding(traced_flat, values, program, judge, what: str, directions) -> "_trust.Certificate":
    """:func:`_trust.certify`, and where it fails once more allowing JAX's own rounding.

    ``program(..., nudged=True)`` adds JAX's products at a point a few ulps away, whose difference from those
    at the point ``judge`` allows (a computation's rounding).
    """
    cert = _trust.certify(traced_flat, values, program, judge, what, directions)
    if cert.failed:
        again = _trust.certify(traced_flat, values, lambda p, T, leaves: program(p, T, leaves, nudged=True), judge,
                               what + ", within JAX's own rounding", directions)
        if not again.failed:
            return again
    return cert


# --- the transformation ------------------------------------------------------------------------------


def _check_scalar(p, where: str) -> None:
    if p.m != 1 or any(s.shape != () for s in p.out_leaves):
        shown = p.out_leaves[0].shape if len(p.out_leaves) == 1 else p.out_treedef
        raise ValueError(
            f"{where}: fun must return a scalar (shape ()) to have a gradient, but its output is {shown}. "
            "jacobians.laplacian and jacobians.hessian_diagonal take array-valued functions."
        )


def _key(spec, traced):
    return (spec, _args.shapes_key(traced))


def _plan_in_trace(t, spec, traced, opts, p):
    key = _key(spec, traced)
    plan = opts.plans.get(key)
    programs = {}
    if plan is None:
        plan, programs = _choose(p, opts)
        checked = _certified(t, spec, traced, opts, plan)
        if checked.method != plan.method:
            programs = {}
        plan = opts.plans[key] = checked
    return plan, programs


def _compute(t, spec, opts, *traced):
    where = t.where
    p = _args.problem(t.fun, spec, traced, where=where, has_aux=opts.has_aux, int_argnums=t.int_argnums)
    if opts.scalar:
        _check_scalar(p, where)
    plan, programs = _plan_in_trace(t, spec, traced, opts, p)
    if plan.method in programs:
        closed, meta = programs[plan.method]
    else:
        meta = {}
        closed = _program(p, plan.method, opts, plan.colors, meta)
    outs = _compat.jaxpr_as_fun(closed)(p.x)
    y, J, S = outs[0], outs[1], outs[2]
    aux_leaves = outs[3:]
    n_aux = meta.get("n_aux", len(aux_leaves))
    aux = None
    if opts.has_aux:
        aux_tree = jax.tree_util.tree_structure(jax.eval_shape(lambda z: p.flat(z)[1], p.x))
        aux = jax.tree_util.tree_unflatten(aux_tree, aux_leaves[:n_aux])
    result = _assemble(p, opts, y, J, S)
    return (result, aux) if opts.has_aux else result


def _assemble(p, opts, y, J, S):
    if opts.kind == "diag":
        return p.blocks(S.T)
    lap = p.out_tree(S)
    if not opts.with_grad:
        return lap
    return p.out_tree(y), p.in_tree(J[:, 0]), lap


def _build(fun, argnums, method, has_aux, chunk_size, kind, with_grad, where, mesh=None, mesh_axis=None):
    opts = _Options(
        shards=_mesh.resolve(mesh, where, mesh_axis),
        method=_args.check_choice(method, "method", METHODS, where),
        has_aux=_args.check_bool(has_aux, "has_aux", where),
        chunk_size=_args.check_chunk_size(chunk_size, where),
        kind=kind,
        with_grad=with_grad,
        scalar=with_grad,
        where=where,
    )
    if opts.method == "sparse" and opts.chunk_size is not None:
        raise ValueError(
            f"{where}: chunk_size bounds the columns of method='forward' and the HVPs of method='hvp'; the sparse "
            "sweep holds only each intermediate's own columns. Drop chunk_size or choose another method."
        )
    t = _args.Transform.jitted(fun, argnums, where, _compute, opts)

    recovered: set = set()  # the keys whose plan is already the replacement: no second switch

    def recover(spec, traced, error) -> bool:
        """XLA failed to compile the planned program: the next exact method, once, with a warning."""
        key = _key(spec, traced)
        plan = opts.plans.get(key)
        if plan is None or key in recovered:
            return False
        recovered.add(key)
        n = plan.n
        other = "forward" if plan.method == "hvp" else "hvp"
        colors = np.arange(n) if other == "hvp" else None  # one HVP per input: no pattern needed, exact
        note = _trust.compiler_failed(where, plan.method, other, error)
        opts.plans[key] = dataclasses.replace(plan, method=other, colors=colors, n_colors=None if colors is None
                                              else n, passes=1 if colors is None else n, reason=note)
        return True

    t.recover = recover
    wrapped = _trust.wrap(t)  # a plan made by a call is checked near that call's inputs

    def plan(*args, **kwargs) -> LaplacianPlan:
        """The plan for these arguments (shapes suffice: ``jax.ShapeDtypeStruct``s work): candidates, costs, choice."""
        spec, traced = t.split(args, kwargs)
        avals = [jax.ShapeDtypeStruct(np.shape(a), a.dtype) for a in traced]
        key = _key(spec, avals)
        if key not in opts.plans:

            def g(*tr):
                p = _args.problem(t.fun, spec, tr, where=where, has_aux=opts.has_aux, int_argnums=t.int_argnums)
                if opts.scalar:
                    _check_scalar(p, where)
                _plan_in_trace(t, spec, tr, opts, p)
                return 0

            jax.make_jaxpr(g)(*avals)
        return opts.plans[key]

    wrapped.plan = plan
    return wrapped


def laplacian(
    fun: Callable,
    argnums: int | tuple[int, ...] = 0,
    *,
    method: str = "auto",
    has_aux: bool = False,
    chunk_size: int | None = None,
    mesh=None,
    mesh_axis=None,
    max_memory: int | str | None = None,
) -> Callable:
    """The Laplacian ``sum_i d^2 fun / d x_i^2`` (the trace of the Hessian, (5.147)), without the Hessian.

    For a scalar ``fun`` a scalar; for an array-valued ``fun`` the Laplacian of
    each output entry. ``x`` is every differentiated argument's leaves, raveled
    (the module docstring). Compiled and cached per call structure; ``vmap``
    and ``jit`` of the returned function work.

    Args:
      fun: a real function of real floating-point arrays (pytrees allowed).
      argnums: an int or a tuple of ints: the arguments to differentiate.
      method: ``"auto"`` (the cost model's choice), ``"forward"`` (the forward
        Laplacian), ``"sparse"`` (its sparse form) or ``"hvp"`` (one second
        directional derivative per colour of the Hessian's diagonal colouring).
      has_aux: ``fun`` returns ``(output, aux)``; the result is ``(laplacian, aux)``.
      chunk_size: ``"forward"``: at most this many input columns per sweep
        (a loop over chunks); ``"hvp"``: at most this many at once.
      mesh, mesh_axis: split the passes across a ``jax.sharding.Mesh``'s devices
        (``"auto"``: every device): the HVPs of ``"hvp"``, the first-derivative
        columns of the dense ``"forward"`` sweep (XLA's SPMD partitioner splits
        each linear map by columns; per device when chunked). The sparse sweep
        runs whole on each device. See :func:`jacobians.jacobian`.
      max_memory: a memory budget (bytes, or ``"2GB"``): the chunk size that fits, by XLA's
        memory analysis (as :func:`jacobians.jacobian`); not with ``chunk_size``.

    Returns:
      A function with ``fun``'s signature returning the Laplacian with the
      structure of ``fun``'s output (one entry per output entry); it has a
      ``plan(*args)`` method (a :class:`LaplacianPlan`).

    Raises:
      ValueError: unknown ``method``; ``chunk_size`` with ``method="sparse"``.
      TypeError: integer or complex inputs, integer outputs.

    Example::

      >>> jacobians.laplacian(lambda x: jnp.sum(x ** 3))(jnp.array([1.0, 2.0]))
      Array(18., dtype=float32)
    """
    where = "jacobians.laplacian"
    return _memory.transform(lambda c: _build(fun, argnums, method, has_aux, c, "trace", False, where, mesh, mesh_axis),
                             chunk_size, max_memory, where)


def value_grad_and_laplacian(
    fun: Callable,
    argnums: int | tuple[int, ...] = 0,
    *,
    method: str = "auto",
    has_aux: bool = False,
    chunk_size: int | None = None,
    mesh=None,
    mesh_axis=None,
    max_memory: int | str | None = None,
) -> Callable:
    """``(f(x), grad f(x), laplacian f(x))`` of a scalar ``fun`` in one pass (a local energy's ingredients).

    The forward methods read the gradient off the sweep's first derivatives;
    ``"hvp"`` adds one reverse pass. Arguments as :func:`laplacian`.

    Returns:
      A function giving ``(value, grad, laplacian)`` (``((value, grad, laplacian), aux)``
      with ``has_aux``); ``grad`` has the structure of the differentiated arguments.

    Raises:
      ValueError: ``fun`` does not return a scalar.

    Example::

      >>> v, g, lap = jacobians.value_grad_and_laplacian(lambda x: jnp.sum(x ** 3))(jnp.array([1.0, 2.0]))
      >>> g, lap
      (Array([ 3., 12.], dtype=float32), Array(18., dtype=float32))
    """
    where = "jacobians.value_grad_and_laplacian"
    return _memory.transform(lambda c: _build(fun, argnums, method, has_aux, c, "trace", True, where, mesh, mesh_axis),
                             chunk_size, max_memory, where)


def hessian_diagonal(
    fun: Callable,
    argnums: int | tuple[int, ...] = 0,
    *,
    method: str = "auto",
    has_aux: bool = False,
    chunk_size: int | None = None,
    mesh=None,
    mesh_axis=None,
    max_memory: int | str | None = None,
) -> Callable:
    """The diagonal ``d^2 fun / d x_i^2`` of the Hessian, without the Hessian.

    The forward methods carry per input the second derivative instead of their
    sum; ``"hvp"`` reads the diagonal off one HVP per colour. Arguments as
    :func:`laplacian`.

    Returns:
      A function returning, for a scalar ``fun``, the diagonal with the
      structure and shapes of the differentiated arguments; for an
      array-valued ``fun``, per output leaf and input leaf a block of shape
      ``out.shape + in.shape`` (entry ``[i..., j...] = d^2 out[i...] / d in[j...]^2``).

    Example::

      >>> jacobians.hessian_diagonal(lambda x: x[0] ** 2 * x[1] ** 3)(jnp.array([1.0, 2.0]))
      Array([16., 12.], dtype=float32)
    """
    where = "jacobians.hessian_diagonal"
    return _memory.transform(lambda c: _build(fun, argnums, method, has_aux, c, "diag", False, where, mesh, mesh_axis),
                             chunk_size, max_memory, where)
