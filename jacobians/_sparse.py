"""Sparse Jacobians: detected pattern, colouring, one JVP/VJP per colour.

``sparse_jacobian`` detects the pattern of the flat map ``x (n,) -> y (m,)``
(:func:`jacobians.sparsity`), colours its columns (forward) or rows (reverse)
and evaluates ``c`` JVPs or VJPs instead of ``n`` or ``m``, then decompresses
with one precomputed gather. The pattern, colouring and direction form a
:class:`SparsePlan`, made once per call structure and input shapes, public,
and reusable (``sparsity=plan``, or saved to and loaded from ``.npz``).
"""

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import sparse as jsparse

from . import _args, _compat, _mesh, kernels
from ._sparsity import Detected, SparsityPattern, _abstract, detect_call, detect_hessian
from ._walker import primitives

OUTPUTS = ("bcoo", "dense")
_FORMAT = 1  # version of the .npz plan file


@dataclass(frozen=True, eq=False)
class SparsePlan:
    """How ``sparse_jacobian`` evaluates one Jacobian: pattern, direction and colouring.

    Attributes:
      pattern: the :class:`SparsityPattern` of the flat ``(m, n)`` Jacobian
        (output and input leaves raveled and concatenated in pytree order).
      mode: ``"fwd"`` (columns coloured, one JVP per colour) or ``"rev"`` (rows, VJPs).
      colors: the colour of each column (``"fwd"``, shape ``(n,)``) or row (``"rev"``, ``(m,)``).
      n_colors: the number of JVPs/VJPs (Hessian-vector products) one evaluation costs.
      coloring: ``"column"``/``"row"`` (Jacobians: same-coloured columns/rows share
        no row/column), or, for Hessians, ``"column"``, ``"star"`` (direct
        decompression) or ``"acyclic"`` (decompression by substitution).
    """

    pattern: SparsityPattern
    mode: str
    colors: np.ndarray
    n_colors: int
    coloring: str = "column"

    def save(self, path) -> None:
        """Write the plan to a ``.npz`` file (NumPy arrays only: no pickles)."""
        p = self.pattern
        np.savez(
            path,
            format=np.int64(_FORMAT),
            m=np.int64(math.prod(p.out_shape)),
            n=np.int64(math.prod(p.in_shape)),
            rows=p.rows,
            cols=p.cols,
            mode=np.array(self.mode),
            colors=self.colors,
            n_colors=np.int64(self.n_colors),
            coloring=np.array(self.coloring),
        )

    @classmethod
    def load(cls, path) -> "SparsePlan":
        """Read a plan written by :meth:`save`."""
        with np.load(path, allow_pickle=False) as f:
            if int(f["format"]) != _FORMAT:
                raise ValueError(f"SparsePlan.load: {path} has plan format {int(f['format'])}, expected {_FORMAT}.")
            pattern = SparsityPattern((int(f["m"]),), (int(f["n"]),), f["rows"], f["cols"])
            return cls(pattern, str(f["mode"]), np.asarray(f["colors"], np.int64), int(f["n_colors"]),
                       str(f["coloring"]))

    def __repr__(self) -> str:
        p = self.pattern
        return (
            f"SparsePlan(mode={self.mode!r}, coloring={self.coloring!r}, n_colors={self.n_colors}, "
            f"m={math.prod(p.out_shape)}, "
            f"n={math.prod(p.in_shape)}, nnz={p.nnz})"
        )


def _coerce_pattern(given, det_shape: tuple, where: str) -> SparsityPattern:
    """A user's pattern as a flat ``(m, n)`` SparsityPattern; ``det_shape`` is ``out.shape + in.shape``."""
    out_shape, in_shape = det_shape
    expected = tuple(out_shape) + tuple(in_shape)
    m, n = math.prod(out_shape), math.prod(in_shape)
    if isinstance(given, SparsityPattern):
        pattern = given
    elif isinstance(given, jsparse.BCOO):
        if given.n_batch or given.n_dense:
            raise ValueError(f"{where}: a BCOO sparsity pattern must have no batch or dense dimensions.")
        if tuple(given.shape) != expected:
            raise ValueError(
                f"{where}: the sparsity pattern has shape {tuple(given.shape)} but the Jacobian has "
                f"shape out.shape + in.shape = {expected}."
            )
        idx = np.asarray(given.indices)
        k = len(out_shape)
        rows = np.ravel_multi_index(idx[:, :k].T, out_shape) if k else np.zeros(len(idx), np.int64)
        cols = np.ravel_multi_index(idx[:, k:].T, in_shape) if in_shape else np.zeros(len(idx), np.int64)
        pattern = SparsityPattern(out_shape, in_shape, rows, cols)
    else:
        mask = np.asarray(given)
        if mask.dtype != bool:
            raise TypeError(f"{where}: a dense sparsity pattern must be a boolean array, got {mask.dtype}.")
        if mask.shape != expected and mask.shape != (m, n):
            raise ValueError(
                f"{where}: the sparsity pattern has shape {mask.shape} but the Jacobian has "
                f"shape out.shape + in.shape = {expected}."
            )
        pattern = SparsityPattern.from_dense(mask.reshape(m, n), 1)
    if pattern.shape != expected and pattern.shape != (m, n):
        raise ValueError(
            f"{where}: the sparsity pattern has shape {pattern.shape} but the Jacobian has "
            f"shape out.shape + in.shape = {expected} (or the flat (m, n) = {(m, n)})."
        )
    return SparsityPattern((m,), (n,), pattern.rows, pattern.cols)


def _make_plan(det_pattern: SparsityPattern, mode: str, primitives: set[str]) -> SparsePlan:
    m, n = math.prod(det_pattern.out_shape), math.prod(det_pattern.in_shape)
    rows, cols = det_pattern.rows, det_pattern.cols
    if mode == "auto":
        # JAX cannot push JVPs through custom_vjp, nor pull VJPs through while_loop.
        has_vjp = bool({"custom_vjp_call", "custom_vjp_call_jaxpr"} & primitives)
        has_while = "while" in primitives
        if has_vjp != has_while:
            mode = "rev" if has_vjp else "fwd"
    def fwd():
        colors = kernels.color_columns(rows, cols, n)
        return SparsePlan(det_pattern, "fwd", colors, int(colors.max()) + 1 if n else 0, "column")

    def rev():
        colors = kernels.color_rows(rows, cols, m)
        return SparsePlan(det_pattern, "rev", colors, int(colors.max()) + 1 if m else 0, "row")

    if mode != "auto":
        return fwd() if mode == "fwd" else rev()
    # The longest row bounds the column colours from below, the longest column the row colours.
    # Colour the direction with the lower bound first; the other only if its bound leaves clear room to
    # win (a direction whose every column conflicts can take long to colour and never pays).
    lb_fwd = int(np.bincount(rows).max()) if rows.size else 0
    lb_rev = int(np.bincount(cols).max()) if cols.size else 0
    first, second, lb_second = (fwd, rev, lb_rev) if lb_fwd < lb_rev else (rev, fwd, lb_fwd)
    best = first()
    if lb_second < 0.75 * best.n_colors:  # greedy rarely lands within a quarter of its bound's rival
        other = second()
        if other.n_colors < best.n_colors or (other.n_colors == best.n_colors and other.mode == "fwd"):
            best = other
    return best


def _make_hessian_plan(pattern: SparsityPattern, mode: str, coloring: str) -> SparsePlan:
    n = math.prod(pattern.in_shape)
    rows, cols = pattern.rows, pattern.cols
    options = {"column": lambda: kernels.color_columns(rows, cols, n)}
    symmetric = getattr(kernels, "color_symmetric", None)
    if symmetric is not None:
        options["star"] = lambda: symmetric(rows, cols, n, method="star")
        options["acyclic"] = lambda: symmetric(rows, cols, n, method="acyclic")
    if coloring != "auto" and coloring not in options:
        raise ValueError(f"jacobians.sparse_hessian: coloring {coloring!r} is not available here.")
    best = None
    for name in (coloring,) if coloring != "auto" else tuple(k for k in ("acyclic", "star", "column") if k in options):
        colors = np.asarray(options[name](), np.int64)
        c = int(colors.max()) + 1 if n and rows.size else 0
        if best is None or c < best[1]:
            best = (colors, c, name)
    return SparsePlan(pattern, mode, best[0], best[1], best[2])


class _Engine:
    """Plans per call structure and shapes; the jitted evaluation reads the plan at trace time."""

    def __init__(self, fun, argnums, sparsity, mode, output, has_aux, where, coloring=None, shards=None):
        self.sparsity, self.mode, self.output, self.has_aux = sparsity, mode, output, has_aux
        self.shards = shards
        self.coloring = coloring  # None: a Jacobian; else a Hessian with this colouring choice
        self.plans: dict = {}
        self.t = _args.Transform(fun, argnums, where, self._build)

    def _key(self, spec, avals):
        return spec, tuple((tuple(np.shape(a)), np.dtype(a.dtype)) for a in avals)

    def plan_for(self, spec, avals) -> tuple[SparsePlan, Detected | None, dict]:
        key = self._key(spec, avals)
        hit = self.plans.get(key)
        if hit is not None:
            return hit
        t, given = self.t, self.sparsity
        if isinstance(given, SparsePlan):
            plan, det = given, None
        else:
            det = None
            if isinstance(given, str) and self.coloring is not None:
                det = detect_hessian(t, spec, avals, has_aux=self.has_aux)
                pattern, prims = det.pattern, det.primitives
            elif isinstance(given, str):  # "auto": detect
                det = detect_call(t, spec, avals, has_aux=self.has_aux)
                pattern, prims = det.pattern, det.primitives
            else:
                det = _shapes_only(t, spec, avals, self.has_aux)
                n = math.prod(det.pattern.in_shape)
                if self.coloring is not None:  # a Hessian: in.shape + in.shape
                    single = len(det.in_leaves) == 1
                    shape = (det.in_leaves[0].shape,) * 2 if single else ((n,), (n,))
                else:
                    shape = (det.out_leaves[0].shape, det.in_leaves[0].shape) if det.single else (
                        (math.prod(det.pattern.out_shape),), (n,))
                pattern, prims = _coerce_pattern(given, shape, t.where), det.primitives
            if self.coloring is not None:
                _check_symmetric(pattern, t.where)
                plan = _make_hessian_plan(pattern, self.mode, self.coloring)
            else:
                plan = _make_plan(pattern, self.mode, prims)
        hit = self.plans[key] = (plan, det, {})
        return hit

    def _build(self, spec):
        return jax.jit(lambda *traced: self._compute(spec, traced))

    def _compute(self, spec, traced):
        t = self.t
        avals = [jax.ShapeDtypeStruct(np.shape(a), a.dtype) for a in traced]
        plan, _, _ = self.plan_for(spec, avals)
        p = _args.problem(
            t.fun, spec, traced, where=t.where, has_aux=self.has_aux, int_argnums=t.int_argnums, lazy=True
        )
        pm, pn = math.prod(plan.pattern.out_shape), math.prod(plan.pattern.in_shape)

        def flat(x):  # the plan's shape, checked as soon as the output is known
            y, aux = p.flat(x)
            if (pm, pn) != (p.m, p.n):
                raise ValueError(
                    f"{t.where}: the given plan is for a Jacobian of flat shape {(pm, pn)}, but this call's is "
                    f"{(p.m, p.n)}."
                )
            return y, aux

        if pn != p.n:
            flat(p.x)
        rows, cols = plan.pattern.rows, plan.pattern.cols
        if self.coloring is not None:
            data, aux = _hessian_values(p, plan, t.where, self.shards)
            det = Detected(plan.pattern, p.in_leaves, p.in_leaves, p.in_treedef, p.in_treedef, set())
        else:
            kernel = kernels.compressed_forward if plan.mode == "fwd" else kernels.compressed_reverse
            data, aux = kernel(flat, p.x, plan.colors, max(plan.n_colors, 1), rows, cols, self.shards)
            det = Detected(plan.pattern, p.out_leaves, p.in_leaves, p.out_treedef, p.in_treedef, set())

        def block(b):
            (r0, r1), (c0, c1), out_shape, in_shape = b
            keep = np.flatnonzero((rows >= r0) & (rows < r1) & (cols >= c0) & (cols < c1))
            dtype = _args.promote(p.out_dtype, p.x.dtype)
            vals = data[keep].astype(dtype) if keep.size < data.size else data.astype(dtype)
            sub = SparsityPattern(out_shape, in_shape, rows[keep] - r0, cols[keep] - c0)
            if self.output == "dense":
                size = (math.prod(out_shape), math.prod(in_shape))
                return jnp.zeros(size, dtype).at[sub.rows, sub.cols].set(vals).reshape(sub.shape)
            return jsparse.BCOO((vals, jnp.asarray(sub.indices())), shape=sub.shape, indices_sorted=True,
                                unique_indices=True)

        result = det.tree(block)
        return (result, aux) if self.has_aux else result

    def verify(self, args, kwargs) -> None:
        """Check the plan's pattern on concrete arguments: ``J v`` from the compressed entries against one JVP.

        On a mismatch the dense Jacobian locates the first entry the pattern misses.
        """
        spec, traced = self.t.split(args, kwargs)
        if any(_compat.is_tracer(a) for a in traced):
            return  # values are unknown under a trace: nothing to check
        avals = [jax.ShapeDtypeStruct(np.shape(a), a.dtype) for a in traced]
        plan, _, memo = self.plan_for(spec, avals)
        if memo.get("verified"):
            return
        t = self.t

        @jax.jit
        def both(*traced):
            p = _args.problem(t.fun, spec, traced, where=t.where, has_aux=self.has_aux, int_argnums=t.int_argnums)
            v = jax.random.normal(jax.random.key(0), p.x.shape, p.x.dtype)
            f = lambda x: p.flat(x)[0]  # noqa: E731
            if self.coloring is not None:
                data, _ = _hessian_values(p, plan, t.where)
                ref = jax.jvp(lambda x: jax.grad(lambda z: f(z)[0])(x), (p.x,), (v,))[1]
            else:
                kernel = kernels.compressed_forward if plan.mode == "fwd" else kernels.compressed_reverse
                data, _ = kernel(p.flat, p.x, plan.colors, max(plan.n_colors, 1), plan.pattern.rows, plan.pattern.cols)
                ref = (jax.jvp(f, (p.x,), (v,)) if plan.mode == "fwd" else jax.linearize(f, p.x))[1]
                if plan.mode == "rev":
                    ref = ref(v)
            return data, ref, v

        data, ref, v = (np.asarray(a) for a in both(*traced))
        rows, cols = plan.pattern.rows, plan.pattern.cols
        got = np.zeros(ref.shape, np.result_type(data, v))
        np.add.at(got, rows, data * v[cols])
        tol = 1e-4 if np.finfo(ref.dtype).bits <= 32 else 1e-9
        scale = np.abs(data).max(initial=0) * np.abs(v).sum() + 1
        if np.all(np.abs(got - ref) <= tol * scale):
            memo["verified"] = True
            return
        dense = np.asarray(jax.jit(lambda *tr: _dense_flat(self, spec, tr))(*traced))
        mask = np.zeros(dense.shape, bool)
        mask[rows, cols] = True
        missed = np.argwhere((np.abs(dense) > tol * (np.abs(dense).max() + 1)) & ~mask)
        where = f"entry (row {missed[0][0]}, column {missed[0][1]}) of the flat Jacobian" if missed.size else "an entry"
        raise ValueError(
            f"{t.where}: the sparsity pattern misses {where}, nonzero at this point "
            f"({len(missed)} missed in all). Give a pattern that contains every nonzero, or use sparsity='auto'."
        )

    def plan(self, *args, **kwargs) -> SparsePlan:
        spec, traced = self.t.split(args, kwargs)
        return self.plan_for(spec, [_abstract(a) for a in traced])[0]


def _dense_flat(engine, spec, traced):
    """The dense flat Jacobian (or Hessian) of one call, for locating what a pattern misses."""
    t = engine.t
    p = _args.problem(t.fun, spec, traced, where=t.where, has_aux=engine.has_aux, int_argnums=t.int_argnums)
    if engine.coloring is not None:
        return jax.hessian(lambda x: p.flat(x)[0][0])(p.x)
    return jax.jacfwd(lambda x: p.flat(x)[0])(p.x)


def _check_symmetric(pattern: SparsityPattern, where: str) -> None:
    m, n = math.prod(pattern.out_shape), math.prod(pattern.in_shape)
    if m != n:
        raise ValueError(f"{where}: a Hessian pattern must be square, got flat shape {(m, n)}.")
    key = np.sort(pattern.rows * n + pattern.cols)
    tkey = np.sort(pattern.cols * n + pattern.rows)
    if not np.array_equal(key, tkey):
        raise ValueError(f"{where}: a Hessian pattern must be symmetric; the given one is not.")


def _hessian_values(p, plan: SparsePlan, where: str, shards=None):
    """The pattern's nonzeros of the Hessian: one Hessian-vector product per colour, then decompression."""
    from ._hessian import _auto, _gradient

    def check_scalar():
        if p.m != 1 or any(s.shape != () for s in p.out_leaves):
            raise ValueError(f"{where}: fun must return a scalar (shape ()), got output {p.out_leaves[0].shape}.")

    n, c = p.n, max(plan.n_colors, 1)
    rows, cols = plan.pattern.rows, plan.pattern.cols

    def run(mode):
        grad = _gradient(p, "rev")

        def g(x):
            gr, (_, aux) = grad(x)
            return gr, aux

        if mode == "fwd_rev":
            compressed, aux = kernels.compressed_jvps(g, p.x, plan.colors, c, shards)
        else:  # H is symmetric: S^T H = (H S)^T, pulled back through the gradient
            _, pull, aux = jax.vjp(g, p.x, has_aux=True)
            seeds = jnp.asarray(plan.colors[None, :] == np.arange(c)[:, None], p.x.dtype)
            compressed = kernels.sharded_vmap(lambda s: pull(s)[0], seeds, shards)
        check_scalar()
        return compressed, aux

    mode = plan.mode if plan.mode in ("fwd_rev", "rev_rev") else "auto"
    compressed, aux = _auto(run, where) if mode == "auto" else run(mode)
    if plan.coloring == "column":
        return compressed.reshape(-1)[plan.colors[cols] * n + rows], aux
    decompress = kernels.symmetric_decompression(rows, cols, plan.colors, plan.coloring)
    return decompress(compressed), aux


def _shapes_only(t, spec, avals, has_aux) -> Detected:
    """The output structure and the primitives met (no detection), from one trace."""
    from ._sparsity import trace_flat

    closed, _, p = trace_flat(t, spec, avals, has_aux=has_aux)
    m, n = p.m, p.n
    prims = primitives(closed.jaxpr)
    return Detected(SparsityPattern((m,), (n,), [], []), p.out_leaves, p.in_leaves, p.out_treedef, p.in_treedef,
                    prims)


def sparse_jacobian(
    fun: Callable,
    argnums: int | tuple[int, ...] = 0,
    *,
    sparsity: "str | SparsePlan | SparsityPattern | np.ndarray | jsparse.BCOO" = "auto",
    mode: str = "auto",
    output: str = "bcoo",
    has_aux: bool = False,
    check: bool = False,
    mesh=None,
    mesh_axis=None,
) -> Callable:
    """A Jacobian that pays only for its nonzeros: one JVP or VJP per colour.

    The pattern of the flat map (all differentiated leaves raveled into
    ``x (n,)``, all outputs into ``y (m,)``) is detected from the jaxpr
    (:func:`jacobians.sparsity`) or given; columns (forward) or rows (reverse)
    are coloured so that same-coloured ones share no row (column); the
    Jacobian is then ``c`` JVPs/VJPs and a gather. Planning runs on the host
    once per call structure and input shapes (also inside a ``jax.jit``); the
    evaluation is jit-compiled. Arguments as :func:`jacobians.jacobian`
    (pytrees, ``argnums`` tuples, kwargs, hashable statics, ``has_aux``).

    Args:
      fun: the function; differentiated arguments hold real floating-point arrays.
        The values of other array arguments are unknown to the detection.
      argnums: an int or a tuple of ints.
      sparsity: ``"auto"`` (detect), a :class:`SparsePlan` (no detection, no
        colouring: ``fun`` is traced once), a :class:`SparsityPattern`, a
        boolean array or a ``BCOO`` of shape ``out.shape + in.shape`` (one array
        in and out) or of the flat ``(m, n)``. A given pattern must contain every
        nonzero, or those are lost.
      mode: ``"fwd"`` (column colouring), ``"rev"`` (row colouring) or ``"auto"``
        (fewer colours, forward on ties; reverse when ``fun`` contains a
        ``custom_vjp`` and forward when it contains a ``while_loop``, the only
        directions JAX can differentiate those in).
      output: ``"bcoo"``: each block a ``jax.experimental.sparse.BCOO`` of shape
        ``out.shape + in.shape``; ``"dense"``: dense blocks equal to
        :func:`jacobians.jacobian`'s.
      has_aux: ``fun`` returns ``(output, aux)``; the result is ``(jacobian, aux)``.
      check: on the first call per call structure with concrete arguments, compare
        ``J v`` from the compressed entries with one dense JVP on a random tangent,
        and raise a ``ValueError`` naming the first missed entry when the pattern
        misses a nonzero (use it to validate a hand-written pattern). Skipped under
        a trace (inside ``jit``), where values are unknown.
      mesh, mesh_axis: split the colours across the devices of a mesh (see
        :func:`jacobians.jacobian`).

    Returns:
      A function with ``fun``'s signature returning the Jacobian in the pytree
      structure ``jacobian`` gives. Its ``plan(*args, **kwargs)`` returns the
      :class:`SparsePlan` for those arguments (shapes suffice).

    Raises:
      ValueError: unknown ``mode``/``output``; a given pattern or plan of the wrong shape.
    """
    where = "jacobians.sparse_jacobian"
    _args.check_fun(fun, where)
    mode = _args.check_mode(mode, where)
    _args.check_choice(output, "output", OUTPUTS, where)
    _args.check_bool(has_aux, "has_aux", where)
    if isinstance(sparsity, str) and sparsity != "auto":
        raise ValueError(
            f"{where}: sparsity must be 'auto', a SparsePlan, a SparsityPattern, a boolean array or a BCOO, "
            f"got {sparsity!r}."
        )
    if isinstance(sparsity, SparsePlan) and mode != "auto" and mode != sparsity.mode:
        raise ValueError(f"{where}: mode={mode!r} contradicts the given plan's mode {sparsity.mode!r}.")
    engine = _Engine(fun, argnums, sparsity, mode, output, has_aux, where, shards=_mesh.resolve(mesh, where, mesh_axis))
    return _wrap(engine, _args.check_bool(check, "check", where))


def _wrap(engine: _Engine, check: bool) -> Callable:
    if not check:
        wrapped = _args.wrap(engine.t)
    else:

        @functools.wraps(engine.t.fun)
        def wrapped(*args, **kwargs):
            out = engine.t(*args, **kwargs)
            engine.verify(args, kwargs)
            return out

    wrapped.plan = engine.plan
    return wrapped


HESSIAN_MODES = ("auto", "fwd_rev", "rev_rev")
COLORINGS = ("auto", "star", "acyclic", "column")


def sparse_hessian(
    fun: Callable,
    argnums: int | tuple[int, ...] = 0,
    *,
    sparsity: "str | SparsePlan | SparsityPattern | np.ndarray | jsparse.BCOO" = "auto",
    coloring: str = "auto",
    mode: str = "auto",
    output: str = "bcoo",
    has_aux: bool = False,
    check: bool = False,
    mesh=None,
    mesh_axis=None,
) -> Callable:
    """The Hessian of a scalar ``fun`` that pays only for its nonzeros: one Hessian-vector product per colour.

    The symmetric pattern comes from :func:`jacobians.hessian_sparsity` (or is
    given); the inputs are coloured symmetrically and the Hessian is ``c``
    forward-over-reverse products ``H @ s_k`` and a decompression with
    precomputed indices. Planning runs once per call structure and shapes;
    arguments and results as :func:`jacobians.hessian` (pytrees of blocks, each a
    ``BCOO`` or dense).

    Args:
      fun: returns a scalar.
      argnums: an int or a tuple of ints.
      sparsity: ``"auto"`` (detect), a :class:`SparsePlan`, or a symmetric
        :class:`SparsityPattern` / boolean array / ``BCOO`` of shape
        ``x.shape + x.shape`` (one array) or the flat ``(n, n)``.
      coloring: ``"star"`` (direct decompression), ``"acyclic"`` (fewer colours,
        decompression by substitution), ``"column"`` (a distance-2 colouring:
        direct, more colours) or ``"auto"`` (the one with fewest colours).
      mode: ``"fwd_rev"``, ``"rev_rev"`` (where a ``custom_vjp`` forbids forward
        mode) or ``"auto"``.
      output: ``"bcoo"`` or ``"dense"``.
      has_aux: ``fun`` returns ``(value, aux)``.
      check: validate the pattern on the first concrete call, as for :func:`sparse_jacobian`.
      mesh, mesh_axis: split the colours across the devices of a mesh.

    Returns:
      A function returning the Hessian (``(H, aux)`` with ``has_aux``); its
      ``plan(*args, **kwargs)`` returns the :class:`SparsePlan`.

    Raises:
      ValueError: a non-scalar output; a given pattern that is not square or not
        symmetric; unknown ``coloring``, ``mode`` or ``output``.
    """
    where = "jacobians.sparse_hessian"
    _args.check_fun(fun, where)
    mode = _args.check_mode(mode, where, HESSIAN_MODES)
    coloring = _args.check_choice(coloring, "coloring", COLORINGS, where)
    _args.check_choice(output, "output", OUTPUTS, where)
    _args.check_bool(has_aux, "has_aux", where)
    if isinstance(sparsity, str) and sparsity != "auto":
        raise ValueError(
            f"{where}: sparsity must be 'auto', a SparsePlan, a SparsityPattern, a boolean array or a BCOO, "
            f"got {sparsity!r}."
        )
    engine = _Engine(fun, argnums, sparsity, mode, output, has_aux, where, coloring=coloring,
                     shards=_mesh.resolve(mesh, where, mesh_axis))
    return _wrap(engine, _args.check_bool(check, "check", where))
