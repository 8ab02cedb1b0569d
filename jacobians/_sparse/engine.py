"""Sparse Jacobians: detected pattern, colouring, one JVP/VJP per colour.

``sparse_jacobian`` detects the pattern of the flat map ``x (n,) -> y (m,)``
(:func:`jacobians.sparsity`), colours its columns (forward) or rows (reverse)
and evaluates ``c`` JVPs or VJPs instead of ``n`` or ``m``, then decompresses
with one precomputed gather. The pattern, colouring and direction form a
:class:`SparsePlan`, made once per call structure and input shapes, public,
and reusable (``sparsity=plan``, or saved to and loaded from ``.npz``).
Every plan, detected or given, is certified once against JAX's own
derivative when it is made (:mod:`._trust`); one that fails, or whose
analysis fails, becomes the dense plan (every entry, one JVP or VJP each).

``sparse_hessian`` colours the symmetric pattern of a scalar function's
Hessian (star, acyclic or column, by a cost model that counts the
Hessian-vector products and the decompression) and computes one product per
colour. BCOO results take their index arrays from the host (the compiled
program returns the values only); ``output="csr"``/``"csc"`` builds a SciPy
matrix of the flat result on the host.
"""

import dataclasses
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import sparse as jsparse

from .. import _args, _batchwise, _compat, _hessian, _hoist, _memory, _mesh, _methods, _planner, _trust, kernels
from .._args import trace_flat
from .._walker import differentiated, primitives
from . import coloring as colorings
from .pattern import (
    Detected,
    SparsityPattern,
    abstract,
    check_scalar,
    detect_hessian_traced,
    detect_traced,
)

OUTPUTS = ("bcoo", "dense", "csr", "csc")
_FORMAT = 1  # version of the .npz plan file

# The Hessian colourings' cost model, in the units of ``_planner.pass_cost`` (about one element operation):
# the colourings differ in the number of Hessian-vector products and in what their decompression pays.
HVP_PASSES = 2.0  # one product's tangent pass, in evaluations of fun (the primal and gradient are shared)
GATHER_COST = 2.0  # one entry read off the compressed matrix (a gather)
PREFIX_COST = 40.0  # one node of the acyclic substitution: its gathers, sign flips and share of a prefix sum,
# which XLA runs as a log-depth scan on CPU (~10 ns a node on a 2-core machine, against ~0.3 ns an element op)


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
      certificate: the plan's check against JAX's own derivative when an engine
        made or received it (a :class:`jacobians._trust.Certificate`; ``None``
        for a plan no engine has used). Not saved.
      costs: Hessian plans: the cost model's estimate for each colouring it
        weighed (``{"star": ..., "acyclic": ...}``; Hessian-vector products plus
        decompression, in element operations); ``None`` otherwise. Not saved.

    The compressed matrix, for users who solve with it: row ``k`` is ``J @ s_k``
    (``"fwd"``, shape ``(n_colors, m)``), ``s_k^T J`` (``"rev"``, ``(n_colors, n)``)
    or ``H @ s_k`` (Hessians, ``(n_colors, n)``), with the seeds ``s_k`` the rows of
    :meth:`seeds`; :meth:`decompress` reads the pattern's entries off it and
    :meth:`decompression_index` gives the gather that does so.
    """

    pattern: SparsityPattern
    mode: str
    colors: np.ndarray
    n_colors: int
    coloring: str = "column"
    certificate: object = field(default=None, compare=False)
    costs: dict | None = field(default=None, compare=False)

    @property
    def hessian(self) -> bool:
        """Whether this is a Hessian plan (a symmetric colouring of a scalar function's ``(n, n)`` Hessian)."""
        return self.mode not in JACOBIAN_PLANS

    def seeds(self, dtype=np.float64) -> np.ndarray:
        """The 0/1 seed matrix ``S^T``, shape ``(n_colors, colors.size)``: row ``k`` marks colour ``k``.

        Args:
          dtype: the NumPy dtype of the result.
        """
        return (self.colors[None, :] == np.arange(self.n_colors)[:, None]).astype(dtype)

    def decompression_index(self) -> np.ndarray:
        """Flat indices that read the pattern's entries off the compressed matrix, shape ``(nnz,)``.

        ``compressed.reshape(-1)[index]`` equals ``J[pattern.rows, pattern.cols]``
        for the compressed matrix of the class docstring (shape ``(n_colors, m)``
        or ``(n_colors, n)``). Column, row and star colourings only.

        Raises:
          ValueError: for an acyclic colouring (it decompresses by substitution: use :meth:`decompress`).
        """
        if self.coloring == "acyclic":
            raise ValueError("SparsePlan.decompression_index: an acyclic colouring decompresses by substitution "
                             "along two-coloured trees, not by a gather; use plan.decompress(compressed).")
        return np.asarray(_decompression(self, "cn")[1], np.int64)

    def decompress(self, compressed) -> jax.Array:
        """The pattern's entries ``J[pattern.rows, pattern.cols]`` from the compressed matrix; traceable.

        Args:
          compressed: shape ``(n_colors, m)`` (``"fwd"``) or ``(n_colors, n)`` (``"rev"``
            and Hessians), as in the class docstring.

        Returns:
          The values, shape ``(nnz,)``, in the pattern's (row-major) order.
        """
        compressed = jnp.asarray(compressed)
        size = math.prod(self.pattern.out_shape) if self.mode == "fwd" else math.prod(self.pattern.in_shape)
        if compressed.shape != (self.n_colors, size):
            raise ValueError(f"SparsePlan.decompress: expected the compressed matrix of shape "
                             f"{(self.n_colors, size)}, got {compressed.shape}.")
        kind, how = _decompression(self, "cn")
        return how(compressed) if kind == "substitute" else kernels.take(compressed.reshape(-1), how)

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
        """Read a plan written by :meth:`save`, validated.

        Checks the file's format, that its arrays have the shapes and integer
        dtypes a plan needs, that every index lies in range and that the colouring
        is valid for the pattern (same-coloured columns share no row for a column
        colouring, likewise rows; star and acyclic colourings as their
        decompressions need). An engine certifies a loaded plan against JAX's own
        derivative before using it, as any given pattern.

        Raises:
          ValueError: naming ``SparsePlan.load``, what was expected and what the file holds.
        """
        where = f"SparsePlan.load: {path}"
        try:
            with np.load(path, allow_pickle=False) as f:
                data = {k: f[k] for k in f.files}
        except Exception as e:  # noqa: BLE001 - not a .npz, truncated, pickled: all the same to the caller
            raise ValueError(
                f"{where} is not a plan file (an .npz written by SparsePlan.save): {type(e).__name__}: {e}"
            ) from e
        return _validated(cls, data, where)

    def __repr__(self) -> str:
        p = self.pattern
        cert = f", certificate={self.certificate.status!r}" if self.certificate is not None else ""
        return (
            f"SparsePlan(mode={self.mode!r}, coloring={self.coloring!r}, n_colors={self.n_colors}, "
            f"m={math.prod(p.out_shape)}, "
            f"n={math.prod(p.in_shape)}, nnz={p.nnz}{cert})"
        )


JACOBIAN_PLANS = {"fwd": "column", "rev": "row"}  # mode -> colouring


def _validated(cls, data: dict, where: str) -> SparsePlan:
    """A :class:`SparsePlan` from the arrays of a plan file, each checked (``ValueError`` naming ``where``)."""
    keys = ("format", "m", "n", "rows", "cols", "mode", "colors", "n_colors", "coloring")
    missing = [k for k in keys if k not in data]
    if missing:
        raise ValueError(f"{where}: expected the arrays {keys}, but {missing} are missing (found {sorted(data)}).")

    def scalar_int(k, lo=0):
        a = data[k]
        if a.shape != () or not np.issubdtype(a.dtype, np.integer) or int(a) < lo:
            shown = f" = {a!r}" if a.size == 1 else ""
            raise ValueError(f"{where}: '{k}' must be an integer scalar >= {lo}, got {a.dtype} of shape "
                             f"{a.shape}{shown}.")
        return int(a)

    def string(k, choices):
        a = data[k]
        if a.shape != () or a.dtype.kind != "U" or str(a) not in choices:
            raise ValueError(f"{where}: '{k}' must be one of {choices}, got {a!r}.")
        return str(a)

    def index_array(k, size, bound, what):
        a = data[k]
        if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer) or (size is not None and a.shape != (size,)):
            want = f"shape ({size},)" if size is not None else "one dimension"
            raise ValueError(f"{where}: '{k}' must be an integer array of {want}, got {a.dtype} of shape {a.shape}.")
        if a.size and (a.min() < 0 or a.max() >= bound):
            raise ValueError(f"{where}: '{k}' must hold {what} in [0, {bound}), got values in [{a.min()}, {a.max()}].")
        return a.astype(np.int64)

    fmt = scalar_int("format")
    if fmt != _FORMAT:
        raise ValueError(f"{where}: expected plan format {_FORMAT}, got {fmt}.")
    m, n = scalar_int("m"), scalar_int("n")
    mode = string("mode", tuple(JACOBIAN_PLANS) + HESSIAN_MODES)
    coloring = string("coloring", ("column", "row", "star", "acyclic"))
    hessian = mode not in JACOBIAN_PLANS
    if hessian and (coloring == "row" or m != n):
        raise ValueError(f"{where}: a Hessian plan (mode {mode!r}) needs a square pattern and a column, star or "
                         f"acyclic colouring, got m={m}, n={n}, coloring {coloring!r}.")
    if not hessian and coloring != JACOBIAN_PLANS[mode]:
        raise ValueError(f"{where}: a Jacobian plan with mode {mode!r} needs coloring {JACOBIAN_PLANS[mode]!r}, "
                         f"got {coloring!r}.")
    rows = index_array("rows", None, m, "row indices")
    cols = index_array("cols", rows.size, n, "column indices")
    n_colors = scalar_int("n_colors")
    size = m if coloring == "row" else n
    if n_colors > max(size, 1):
        raise ValueError(f"{where}: 'n_colors' must be at most the number of coloured "
                         f"{'rows' if coloring == 'row' else 'columns'}, {size}, got {n_colors}.")
    colors = index_array("colors", size, max(n_colors, 1), "colours")
    pattern = SparsityPattern((m,), (n,), rows, cols)
    problem = _coloring_problem(pattern, colors, coloring, hessian)
    if problem:
        raise ValueError(f"{where}: expected a {coloring} colouring valid for the pattern, but {problem}.")
    return cls(pattern, mode, colors, n_colors, coloring)


def _coloring_problem(pattern: SparsityPattern, colors: np.ndarray, coloring: str, hessian: bool) -> str | None:
    """What makes ``colors`` unusable for ``pattern`` (``None``: it is valid)."""
    rows, cols = pattern.rows, pattern.cols
    n = max(math.prod(pattern.in_shape), 1)
    if hessian and not np.array_equal(rows * n + cols, np.sort(cols * n + rows)):
        return "the Hessian pattern is not symmetric"
    if coloring in ("star", "acyclic"):
        try:
            colorings.symmetric_decompression(rows, cols, colors, coloring)
        except ValueError as e:
            return str(e)
        return None
    # Column colouring: a (row, colour) pair holds one entry, read off compressed[colour][row]; rows mirrored.
    line, other = (cols, rows) if coloring == "row" else (rows, cols)
    c = int(colors.max(initial=0)) + 1
    uniq, counts = np.unique(line * c + colors[other], return_counts=True)
    if (counts > 1).any():
        k = int(uniq[np.argmax(counts > 1)])
        kind, shared = ("rows", "column") if coloring == "row" else ("columns", "row")
        return (f"two {kind} of colour {k % c} share {shared} {k // c} "
                f"({int((counts > 1).sum())} such conflicts)")
    return None


def _coerce_pattern(given, det_shape: tuple, where: str, hessian: bool = False) -> SparsityPattern:
    """A user's pattern as a flat ``(m, n)`` SparsityPattern; ``det_shape`` is ``out.shape + in.shape``."""
    out_shape, in_shape = det_shape
    expected = tuple(out_shape) + tuple(in_shape)
    whose = "the Hessian" if hessian else "the Jacobian"
    m, n = math.prod(out_shape), math.prod(in_shape)
    if isinstance(given, SparsityPattern):
        pattern = given
    elif isinstance(given, jsparse.BCOO):
        if given.n_batch or given.n_dense:
            raise ValueError(f"{where}: a BCOO sparsity pattern must have no batch or dense dimensions.")
        if tuple(given.shape) != expected:
            raise ValueError(
                f"{where}: the sparsity pattern has shape {tuple(given.shape)} but {whose} has "
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
                f"{where}: the sparsity pattern has shape {mask.shape} but {whose} has "
                f"shape out.shape + in.shape = {expected}."
            )
        pattern = SparsityPattern.from_dense(mask.reshape(m, n), 1)
    if pattern.shape != expected and pattern.shape != (m, n):
        raise ValueError(
            f"{where}: the sparsity pattern has shape {pattern.shape} but {whose} has "
            f"shape out.shape + in.shape = {expected} (or the flat (m, n) = {(m, n)})."
        )
    return SparsityPattern((m,), (n,), pattern.rows, pattern.cols)


def _direction(mode: str, primitives: set[str], complex_out: bool) -> str:
    """``mode``, or where ``"auto"`` a direction JAX must take (``"auto"`` where both are possible)."""
    if mode != "auto":
        return mode
    if complex_out:
        return "fwd"  # reverse mode on a non-holomorphic complex output is not a Jacobian
    return _methods.single(_methods.directions(primitives)) or "auto"  # custom_vjp: no JVPs; while: no VJPs


def make_plan(det_pattern: SparsityPattern, mode: str, primitives: set[str], complex_out: bool = False) -> SparsePlan:
    m, n = math.prod(det_pattern.out_shape), math.prod(det_pattern.in_shape)
    rows, cols = det_pattern.rows, det_pattern.cols
    mode = _direction(mode, primitives, complex_out)

    def fwd():
        colors = colorings.color_columns(rows, cols, n)
        return SparsePlan(det_pattern, "fwd", colors, int(colors.max()) + 1 if n else 0, "column")

    def rev():
        colors = colorings.color_rows(rows, cols, m)
        return SparsePlan(det_pattern, "rev", colors, int(colors.max()) + 1 if m else 0, "row")

    if mode != "auto":
        return fwd() if mode == "fwd" else rev()
    # The longest row bounds the column colours from below, the longest column the row colours.
    # Colour the direction with the lower bound first; the other only if its bound leaves clear room to
    # win (a direction whose every column conflicts can take long to colour and never pays).
    lb_fwd = int(np.bincount(rows).max()) if rows.size else 0
    lb_rev = int(np.bincount(cols).max()) if cols.size else 0
    # Equal bounds: forward first (JVPs keep no primal pass for a pullback, and compile faster).
    first, second, lb_second = (fwd, rev, lb_rev) if lb_fwd <= lb_rev else (rev, fwd, lb_fwd)
    best = first()
    if lb_second < 0.75 * best.n_colors:  # greedy rarely lands within a quarter of its bound's rival
        other = second()
        if other.n_colors < best.n_colors or (other.n_colors == best.n_colors and other.mode == "fwd"):
            best = other
    return best


def _make_hessian_plan(pattern: SparsityPattern, mode: str, coloring: str, work: float = 1.0) -> SparsePlan:
    """Colour a symmetric pattern; ``"auto"`` takes the colouring the cost model says is cheapest.

    A colouring's cost is its Hessian-vector products (``HVP_PASSES`` evaluations
    of ``fun``, which costs ``work``, per colour) plus its decompression: a gather
    per entry, and for an acyclic colouring a prefix sum over its trees' nodes,
    which on CPU costs more than the products it saves unless ``fun`` is expensive.
    A colouring that cannot beat the best so far even at its lower bound on
    colours is not computed.
    """
    n = math.prod(pattern.in_shape)
    rows, cols = pattern.rows, pattern.cols
    nnz = int(rows.size)
    makers = {"column": lambda: colorings.color_columns(rows, cols, n),
              "star": lambda: colorings.color_symmetric(rows, cols, n, method="star"),
              "acyclic": lambda: colorings.color_symmetric(rows, cols, n, method="acyclic")}

    def colour(name):
        colors = np.asarray(makers[name](), np.int64)
        c = int(colors.max()) + 1 if n and nnz else 0
        plan = SparsePlan(pattern, mode, colors, c, name)
        nodes = _decompression(plan, "nc")[1].nodes if name == "acyclic" else 0
        return plan, _hessian_cost(c, nnz, nodes, work)

    if coloring != "auto":
        plan, cost = colour(coloring)
        return dataclasses.replace(plan, costs={coloring: cost})
    off = rows != cols
    touched = int(np.unique(rows[off]).size)  # vertices with a neighbour: each is at least one acyclic node
    # Lower bounds on colours: two wherever two inputs interact; a column colouring needs the longest row.
    floor = 2 if off.any() else 1
    longest = int(np.bincount(rows, minlength=1).max()) if nnz else 0
    bounds = {"star": (floor, 0), "acyclic": (floor, touched), "column": (longest, 0)}
    best, costs = None, {}
    for name in (k for k in ("star", "acyclic", "column") if k in makers):
        lb_colors, lb_nodes = bounds[name]
        if best is not None and _hessian_cost(lb_colors, nnz, lb_nodes, work) >= costs[best.coloring]:
            continue
        plan, costs[name] = colour(name)
        if best is None or costs[name] < costs[best.coloring]:
            best = plan
    return dataclasses.replace(best, costs=costs)


def _differentiable(traced_flat, avals, mode: str) -> bool:
    """:func:`jacobians._args.differentiable` of a traced call, at its leaves' shapes."""
    found = []
    jax.eval_shape(lambda *leaves: found.append(_args.differentiable(_trust.flat_problem(traced_flat, leaves), mode)),
                   *avals)
    return found[0]


class Engine:
    """Plans per call structure and shapes; the jitted evaluation reads the plan at trace time."""

    def __init__(self, fun, argnums, sparsity, mode, output, has_aux, where, coloring=None, shards=None,
                 check=False, chunk_size=None):
        self.sparsity, self.mode, self.output, self.has_aux = sparsity, mode, output, has_aux
        self.shards, self.chunk_size = shards, chunk_size
        self.coloring = coloring  # None: a Jacobian; else a Hessian with this colouring choice
        self.check = check  # a failed certificate raises ValueError instead of falling back
        self.callers: tuple = ()  # transformations whose calls run this engine (their inputs serve the check)
        self.plans: dict = {}
        self.t = _args.Transform(fun, argnums, where, self._build)
        self.t.recover = self._recover
        self.t.shards = shards

    def _recover(self, spec, traced, error) -> bool:
        """XLA failed to compile a sparse plan's program: the dense plan (every entry), once, with a warning."""
        avals = [abstract(a) for a in traced]
        key = self.key(spec, avals)
        hit = self.plans.get(key)
        if hit is None:
            return False
        plan, _, extra = hit
        if plan.pattern.nnz == math.prod(plan.pattern.in_shape) * math.prod(plan.pattern.out_shape):
            return False  # every entry already (the dense plan): nothing else to try
        hessian = self.coloring is not None
        closed, _, p = trace_flat(self.t, spec, avals, has_aux=self.has_aux)
        _trust.drop_deferred()  # a check would run the program that did not compile
        name = f"sparse {'Hessian' if hessian else 'Jacobian'} ({plan.mode}, {plan.n_colors} colours)"
        note = _trust.compiler_failed(self.t.where, name, "dense", error)
        complex_out = not hessian and bool(jnp.issubdtype(p.out_dtype, jnp.complexfloating))
        order = plan.mode if hessian else None
        self.plans[key] = (self._dense(p, primitives(closed.jaxpr), complex_out, _trust.fallback(note), order), None,
                           extra)
        return True

    def key(self, spec, avals):
        return spec, _args.shapes_key(avals)

    def plan_for(self, spec, avals, values=None) -> tuple[SparsePlan, Detected | None, dict]:
        key = self.key(spec, avals)
        hit = self.plans.get(key)
        if hit is not None:
            return hit
        if values is None:
            values = _trust.call_values(spec, self.t, *self.callers)
        extra: dict = {}
        hit = self.plans[key] = (self._make(spec, avals, values, extra), None, extra)
        return hit

    def _make(self, spec, avals, values, extra: dict | None = None) -> SparsePlan:
        """Detect (or take the given pattern or plan), colour and certify; the dense plan where any of it fails.

        ``extra`` receives ``"fold"``: whether XLA may fold the seeds (``fun`` has no dense products).
        """
        t, given, where = self.t, self.sparsity, self.t.where
        hessian = self.coloring is not None
        traced_flat = trace_flat(t, spec, avals, has_aux=self.has_aux)
        closed, _, p = traced_flat
        if hessian:
            check_scalar(t, p)
            # Before the certificate, which would report JAX's error as a PlanError:
            _hessian.check_real_output(p.out_leaves[0].dtype, where)
        complex_out = not hessian and bool(jnp.issubdtype(p.out_dtype, jnp.complexfloating))
        prims = primitives(closed.jaxpr)
        if extra is not None:
            extra.update(facts(closed, prims))
        if isinstance(given, SparsePlan):
            _check_given_plan(given, p, hessian, where)
        if complex_out and "rev" in (self.mode, getattr(given, "mode", None)):
            raise _args.complex_rev_error(where, dtype=p.out_dtype,
                                          note=" (forward mode: one JVP per colour of the columns)")
        coloring, order, followed = self.coloring, self._order(differentiated(closed)), False
        if hessian:
            coloring, order, followed = self._follow_jax(closed, given, coloring, order)
        forced = getattr(given, "mode", None) if isinstance(given, SparsePlan) else self.mode
        if (not hessian and forced in ("fwd", "rev") and forced not in _methods.directions(differentiated(closed))
                and not _differentiable(traced_flat, avals, forced)):
            raise _args.forced_mode_error(where, forced)
        pattern = given.pattern if followed and isinstance(given, SparsePlan) else None  # recoloured
        if not isinstance(given, str | SparsePlan):
            pattern = _coerce_pattern(given, self._given_shape(p), where, hessian)
            if hessian:
                _check_symmetric(pattern, where)
        kind = "given" if not isinstance(given, str) else "detected"
        try:
            if isinstance(given, SparsePlan) and pattern is None:
                plan = given
            else:
                if pattern is None:
                    with _trust.stage("Hessian sparsity detection" if hessian else "sparsity detection"):
                        det = detect_hessian_traced(traced_flat) if hessian else detect_traced(t, *traced_flat)
                    pattern = det.pattern
                with _trust.stage("colouring"):
                    plan = (_make_hessian_plan(pattern, order, coloring, _planner.pass_cost(closed))
                            if hessian else make_plan(pattern, self.mode, differentiated(closed), complex_out))
            if hessian and order != "auto":  # the mode the plan is evaluated by: the caller's, or JAX's only one
                plan = dataclasses.replace(plan, mode=order)
            with _trust.stage("certificate"):
                cert = certify_plan(plan, traced_flat, values, where, hessian)
        except _trust.AnalysisError as e:
            return self._dense(p, prims, complex_out, _trust.fallback(_trust.analysis_failed(where, e)), order)
        if not cert.failed:
            return dataclasses.replace(plan, certificate=cert)
        missed = _locate(traced_flat, values, plan, hessian)
        detail = f"the pattern misses {missed}" if missed else cert.detail
        if self.check:
            raise ValueError(f"{where}: the sparsity plan is wrong: {detail}. Give a pattern that contains every "
                             "nonzero, or use sparsity='auto'.")
        name = f"{kind} sparse {'Hessian' if hessian else 'Jacobian'} ({plan.mode}, {plan.n_colors} colours)"
        note = _trust.certificate_failed(where, name, detail, bug=kind == "detected")
        return self._dense(p, prims, complex_out, _trust.fallback(note), order)

    def _given_shape(self, p) -> tuple:
        """The tensor shape (``out.shape``, ``in.shape``) a given pattern may have; the flat one always works."""
        n = p.n
        if self.coloring is not None:  # a Hessian: in.shape + in.shape
            return (p.in_leaves[0].shape,) * 2 if len(p.in_leaves) == 1 else ((n,), (n,))
        single = len(p.out_leaves) == 1 and len(p.in_leaves) == 1
        return (p.out_leaves[0].shape, p.in_leaves[0].shape) if single else ((p.m,), (n,))

    def _dense(self, p, prims: set, complex_out: bool, cert, order: str | None = None) -> SparsePlan:
        """Every entry, one JVP or VJP per column or row: right whatever the pattern (the fallback).

        ``order``: a Hessian's mode where the plan that failed had settled it.
        """
        n = p.n
        m = n if self.coloring is not None else p.m  # a Hessian is (n, n)
        full = SparsityPattern((m,), (n,), np.repeat(np.arange(m), n), np.tile(np.arange(n), m))
        if self.coloring is not None:
            return SparsePlan(full, order or self._order(prims), np.arange(n), n, "column", certificate=cert)
        mode = _direction(self.mode, prims, complex_out)
        if mode == "auto":
            mode = "fwd" if n <= m else "rev"
        size = n if mode == "fwd" else m
        return SparsePlan(full, mode, np.arange(size), size, JACOBIAN_PLANS[mode], certificate=cert)

    def _follow_jax(self, closed, given, coloring: str, order: str) -> tuple[str, str, bool]:
        """The colouring and mode a Hessian plan may take to give ``jax.hessian``'s matrix, and whether they changed.

        Where JAX's Hessian is not symmetric (:func:`jacobians._hessian.asymmetric_rule`) a symmetric
        colouring reads ``H[j, i]`` for ``H[i, j]`` and a reverse outer pass gives ``H^T v``: only a
        column colouring with a forward outer pass follows JAX. The caller's choice of either warns or,
        strict, raises.
        """
        plan = given if isinstance(given, SparsePlan) else None
        colouring = plan.coloring if plan is not None else coloring
        mode = self.mode if self.mode != "auto" or plan is None else plan.mode
        if colouring == "column" and mode.startswith("fwd") or (why := _hessian.asymmetric_rule(closed)) is None:
            return coloring, order, False
        asked = [f"coloring={colouring!r}"] if colouring in ("star", "acyclic") else []
        asked += [f"mode={mode!r}"] if mode.startswith("rev") else []
        if asked:
            _trust.method_cannot_follow(self.t.where, " and ".join(asked), "column colouring, forward outer pass",
                                        why)
        return "column", order if order.startswith("fwd") else "fwd_rev", True

    def _order(self, names: set[str]) -> str:
        """A Hessian plan's mode: the one given, else the one JAX can take through fun (or ``"auto"``)."""
        return self.mode if self.mode != "auto" else _hessian.order_for(names)

    def _build(self, spec):
        hessian = self.coloring is not None
        if self.output == "dense" and not hessian:
            return _hoist.Hoisted(lambda *traced: self.compute(spec, traced))
        # BCOO and SciPy results: the compiled program returns the values only; the index arrays are
        # host constants attached afterwards (copying them out of the program cost as much as a gather).
        layouts: dict = {}
        split = self.output != "dense"

        def program(products, *traced):
            out = self.compute(spec, traced, split=split, products=products)
            if not split:
                return out
            out, layout = out
            layouts[tuple(map(jax.typeof, traced))] = layout
            return out

        jitted = jax.jit(program)
        # Hessians of funs with transcendental functions in two programs on the CPU: the products
        # (written one column per colour, vectorised), then their decompression. In one program the
        # products run apart from the gather too (_batchwise.apart), but one row per colour, where
        # XLA's CPU code for the stencil-like gradients of sines and cosines is 1.5-2x slower (banded,
        # arrowhead: n = 1e4); polynomial funs are cheaper in one program (one dispatch).
        first = jax.jit(functools.partial(self.compute_products, spec)) if hessian else None
        chosen: list = []  # two programs?, decided at the first call

        def call(*traced):
            if not chosen:
                two = hessian and self._two(spec, traced)
                if not hessian or not any(map(_compat.is_tracer, traced)):
                    chosen.append(two)
                    if two:  # the first concrete call: both programs compile at once
                        return finish(_both_compiled(first, jitted, traced), traced)
            else:
                two = chosen[0]
            return finish(jitted(first(*traced) if two else None, *traced), traced)

        def finish(out, traced):
            if not split:
                return out
            layout = next(iter(layouts.values())) if len(layouts) == 1 else layouts[tuple(map(jax.typeof, traced))]
            return layout(out)

        return call

    def _two(self, spec, traced) -> bool:
        """Whether a Hessian's products run as a program of their own (``fun`` has transcendental functions).

        Only on the CPU, whose fusion the split is for: on an H200 the second dispatch cost 60 us of a
        140 us call (arrowhead and banded, n = 1e4; bench/results/gpu-h200-s7/probe.txt).
        """
        avals = [jax.ShapeDtypeStruct(np.shape(a), jax.typeof(a).dtype) for a in traced]
        _, _, extra = self.plan_for(spec, avals)
        return extra.get("two", False) and _platform(traced) == "cpu"

    def compute_products(self, spec, *traced):
        """A Hessian's compressed products and aux at the traced leaves (the first of two programs)."""
        return self.compute(spec, traced, products=True)

    def compute(self, spec, traced, split: bool = False, products=None):
        """The Jacobian (Hessian) pytree at the traced leaves; ``split``: ``(values, layout)`` instead.

        With ``split`` the result is the traced values (block data, or the flat
        data for SciPy outputs) and ``layout(values)``, a host function that builds
        the result from them and the plan's indices. Hessians: ``products=True``
        returns the compressed Hessian and aux only; ``products=(compressed, aux)``
        starts from them.
        """
        t = self.t
        avals = [jax.ShapeDtypeStruct(np.shape(a), a.dtype) for a in traced]
        plan, _, extra = self.plan_for(spec, avals)
        p = _args.problem(
            t.fun, spec, traced, where=t.where, has_aux=self.has_aux, int_argnums=t.int_argnums, lazy=True
        )
        if isinstance(products, tuple):  # the products come from the first program: record fun's output dtype here
            jax.eval_shape(p.flat, p.x)
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
            data, aux = _hessian_values(p, plan, t.where, self.shards, plan.mode, self.chunk_size,
                                        fold=extra.get("fold", False) and p.n * plan.n_colors <= FOLD_MAX,
                                        products=products, apart=extra.get("fold", False))
            if products is True:
                return data, aux
            det = Detected(plan.pattern, p.in_leaves, p.in_leaves, p.in_treedef, p.in_treedef, set())
        else:
            products = kernels.compressed_jvps if plan.mode == "fwd" else kernels.compressed_vjps
            # (c, m) or (c, n), apart from the decompression (a 2-D stencil's Jacobian: 25% faster)
            compressed, aux = _apart(
                lambda: products(flat, p.x, plan.colors, max(plan.n_colors, 1), self.shards, self.chunk_size,
                                 fold=jacobian_folds(extra, plan)), p.x, plan.colors.size * plan.n_colors,
                extra.get("fold", False))
            index = _decompression(plan, "cn")[1]  # the plan's cached gather: J[rows, cols] off the products
            data = None if self.output == "dense" else kernels.take(compressed.reshape(-1), index)
            det = Detected(plan.pattern, p.out_leaves, p.in_leaves, p.out_treedef, p.in_treedef, set())

        def offsets(leaves):
            starts = np.cumsum([0] + [math.prod(a.shape) for a in leaves])[:-1]
            return {int(o): a for o, a in zip(starts, leaves, strict=True)}

        out_at, in_at = offsets(det.out_leaves), offsets(det.in_leaves)
        if split and self.output in ("csr", "csc"):
            return (data, aux), _scipy_layout(plan, self.output, self.has_aux, t.where)
        host: dict = {}  # id -> the host index array of a block (split: attached outside the program)

        def block(b):
            (r0, r1), (c0, c1), out_shape, in_shape = b
            keep = np.flatnonzero((rows >= r0) & (rows < r1) & (cols >= c0) & (cols < c1))
            # Each block in its own output's and input's dtype, as jacobian's (a Hessian: the function's).
            dtype = (_args.promote(p.out_dtype, in_at[c0].dtype) if self.coloring is not None
                     else _args.block_dtype(out_at[r0], in_at[c0]))  # weak types by kind, as Problem.blocks
            sub = SparsityPattern(out_shape, in_shape, rows[keep] - r0, cols[keep] - c0)
            # A dense block weakly typed as jax.jacfwd's (output and input weak: Python floats) and jax.hessian's
            # (H[i][j] where x_i is).
            weak = self.output == "dense" and _args.is_weak(out_at[r0]) and (
                self.coloring is not None or _args.is_weak(in_at[c0]))
            if self.output == "dense" and self.coloring is None:
                how, mask = _dense_block(plan, (r0, r1), (c0, c1), sub)
                if how != "entries":
                    dense = kernels.compressed_dense(compressed, plan.colors, plan.mode, (r0, r1), (c0, c1), mask,
                                                     dtype).reshape(sub.shape)
                    return _args.cast(dense, dtype, weak=True) if weak else dense
                vals = kernels.take(compressed.reshape(-1), index[keep])
            else:
                vals = data[keep] if keep.size < data.size else data
            if jnp.iscomplexobj(vals) and not jnp.issubdtype(dtype, jnp.complexfloating):
                vals = jnp.real(vals)  # a real output of real inputs: the imaginary part is exactly zero
            vals = vals.astype(dtype)
            if self.output == "dense":
                size = (math.prod(out_shape), math.prod(in_shape))
                dense = kernels.from_entries(size, sub.rows, sub.cols, vals, dtype).reshape(sub.shape)
                return _args.cast(dense, dtype, weak=True) if weak else dense
            if split:  # a BCOO holding the host indices: separated from the traced values below
                idx = sub.indices()
                host[id(idx)] = idx
                info = {"shape": sub.shape, "indices_sorted": True, "unique_indices": True}
                return jsparse.BCOO.tree_unflatten(info, (vals, idx))
            return jsparse.BCOO((vals, jnp.asarray(sub.indices())), shape=sub.shape, indices_sorted=True,
                                unique_indices=True)

        result = det.tree(block)
        if self.coloring is not None:  # fun's output container (a dict or 1-tuple holding the scalar), as jax.hessian
            result = p.out_treedef.unflatten([result])
        result = (result, aux) if self.has_aux else result
        if not split:
            return result
        leaves, treedef = jax.tree_util.tree_flatten(result)
        fixed = {k: v for k, v in enumerate(leaves) if id(v) in host}
        return [v for k, v in enumerate(leaves) if k not in fixed], _BcooLayout(treedef, len(leaves), fixed)

    def plan(self, *args, **kwargs) -> SparsePlan:
        spec, traced = self.t.split(args, kwargs)
        return self.plan_for(spec, [abstract(a) for a in traced], _trust.concrete(traced))[0]


class _BcooLayout:
    """Rebuilds a result pytree from a program's traced values and the blocks' host index arrays."""

    def __init__(self, treedef, size: int, fixed: dict):
        self.treedef, self.size, self.fixed = treedef, size, fixed
        self.device: dict | None = None  # the index arrays on the device, made at the first concrete call
        self.slots = [k for k in range(size) if k not in fixed]

    def __call__(self, values: list):
        if _compat.is_tracer(values[0]) if values else True:  # inside a transformation: constants of its trace
            fixed = {k: jnp.asarray(v) for k, v in self.fixed.items()}
        else:
            if self.device is None:
                self.device = {k: jnp.asarray(v) for k, v in self.fixed.items()}
            fixed = self.device
        leaves = [None] * self.size
        for k, v in fixed.items():
            leaves[k] = v
        for k, v in zip(self.slots, values, strict=True):
            leaves[k] = v
        return self.treedef.unflatten(leaves)


def _scipy_layout(plan: SparsePlan, fmt: str, has_aux: bool, where: str) -> Callable:
    """``(data, aux) -> matrix`` (or ``(matrix, aux)``): a SciPy CSR/CSC matrix of the flat ``(m, n)`` result."""
    rows, cols = plan.pattern.rows, plan.pattern.cols  # sorted by row, then column
    m = math.prod(plan.pattern.out_shape)
    n = math.prod(plan.pattern.in_shape)
    if fmt == "csr":
        order, index, ptr = None, cols, np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=m))])
    else:
        order = np.lexsort((rows, cols))
        index, ptr = rows[order], np.concatenate([[0], np.cumsum(np.bincount(cols, minlength=n))])

    def layout(out):
        data, aux = out
        if _compat.is_tracer(data):
            raise ValueError(
                f"{where}: output={fmt!r} returns a SciPy sparse matrix, a host object, which cannot be built "
                "inside jax.jit, vmap, grad or another transformation. Call the function outside it, or use "
                "output='bcoo' (a jax.experimental.sparse.BCOO) or 'dense' there."
            )
        import scipy.sparse

        values = np.asarray(data)
        values = values if order is None else values[order]
        make = scipy.sparse.csr_matrix if fmt == "csr" else scipy.sparse.csc_matrix
        matrix = make((values, index.copy(), ptr.copy()), shape=(m, n))
        return (matrix, aux) if has_aux else matrix

    return layout


def _check_given_plan(plan: SparsePlan, p, hessian: bool, where: str) -> None:
    """A given plan must fit the engine (Jacobian or Hessian) and the call's flat shape."""
    pm, pn = math.prod(plan.pattern.out_shape), math.prod(plan.pattern.in_shape)
    if (pm, pn) != (p.m, p.n) and not (hessian and (pm, pn) == (p.n, p.n)):
        raise ValueError(
            f"{where}: the given plan is for a Jacobian of flat shape {(pm, pn)}, but this call's is {(p.m, p.n)}."
        )
    if hessian == (plan.mode in JACOBIAN_PLANS):
        kinds = ("Jacobian", "Hessian") if hessian else ("Hessian", "Jacobian")
        raise ValueError(f"{where}: the given plan (mode {plan.mode!r}) is a {kinds[0]} plan; this is a {kinds[1]}.")


def certify_plan(plan: SparsePlan, traced_flat: tuple, values, where: str, hessian: bool = False,
                 mode: str | None = None):
    """Check a plan's entries against JAX at a random point, on a few random vectors.

    ``J v`` against ``jax.jvp`` (forward), ``u^T J`` against ``jax.vjp``
    (reverse), ``H v`` against a Hessian-vector product (the plan's values by
    the Hessian ``mode``, default the plan's).
    """
    rows, cols = plan.pattern.rows, plan.pattern.cols
    if hessian:
        mode = mode or plan.mode

        def evaluate(p):
            with _compat.staged():  # one program, not an eager compilation per constant operation
                return _hessian_values(p, plan, where, mode=mode)[0]

        return _trust.linear(traced_flat, values, evaluate,
                             mode="rev" if mode.startswith("rev") else "fwd", entries=(rows, cols), hessian=True,
                             where=where)
    c = max(plan.n_colors, 1)
    seeds = plan.colors[None, :] == np.arange(c)[:, None]

    def products(p, T):  # the plan's seeds and the check's directions in one batch: (J S, J T) or (S^T J, T^T J)
        f = lambda x: p.flat(x)[0]  # noqa: E731
        if plan.mode == "fwd":
            both = jnp.concatenate([jnp.asarray(seeds, p.x.dtype), T])
            return jax.vmap(lambda t: jax.jvp(f, (p.x,), (t,))[1])(both)  # (c + k, m)
        y, pull = jax.vjp(f, p.x)
        both = jnp.concatenate([jnp.asarray(seeds, y.dtype), T])
        return jax.vmap(lambda u: pull(u)[0])(both)  # (c + k, n)

    def evaluate(p, T):
        out = _args.jax_itself(products, p, T)  # JAX's own JVPs (VJPs): where they raise, JAX cannot differentiate
        return kernels.take(out[:c].reshape(-1), _decompression(plan, "cn")[1]), out[c:]

    return _trust.linear(traced_flat, values, evaluate, mode=plan.mode, entries=(rows, cols), where=where,
                         reference="with")


LOCATE_MAX = 1 << 22  # entries of the dense Jacobian computed to name what a pattern misses


def _locate(traced_flat: tuple, values, plan: SparsePlan, hessian: bool) -> str | None:
    """The first entry outside the plan's pattern that is nonzero at the check's point, and how many there are.

    ``None``: too large to look (more than ``LOCATE_MAX`` entries), or none found.
    """
    closed, offsets, meta = traced_flat
    m, n = (meta.n, meta.n) if hessian else (meta.m, meta.n)
    if m * n > LOCATE_MAX:
        return None
    for label, point in _trust.points(closed, offsets, values):
        try:
            def dense(*leaves):
                p = _trust.flat_problem(traced_flat, leaves)
                f = lambda x: p.flat(x)[0]  # noqa: E731
                return jax.hessian(lambda x: f(x)[0])(p.x) if hessian else jax.jacfwd(f)(p.x)

            with jax.ensure_compile_time_eval():
                J = np.asarray(jax.jit(dense)(*point))
        except Exception:  # noqa: BLE001 - naming the entry is a courtesy; the certificate has spoken
            return None
        if not np.all(np.isfinite(J)):
            continue
        mask = np.zeros((m, n), bool)
        mask[plan.pattern.rows, plan.pattern.cols] = True
        tol = _trust.rtol(closed, J.dtype) * (np.abs(J).max(initial=0) + np.finfo(np.float64).tiny)
        missed = np.argwhere((np.abs(J) > tol) & ~mask)
        if missed.size:
            r, c = missed[0]
            return (f"entry (row {r}, column {c}) of the flat {'Hessian' if hessian else 'Jacobian'}, nonzero at "
                    f"{label} ({len(missed)} missed in all)")
        return None
    return None


MASK_MAX = 1 << 28  # a dense block's pattern mask (bytes) past which its entries are scattered instead
SCATTER_DENSITY = 16  # a dense result's block with at most 1 / this of its entries in the pattern is scattered


def _dense_block(plan: SparsePlan, rows: tuple[int, int], cols: tuple[int, int], sub: SparsityPattern):
    """How a dense result's block is read off a Jacobian's compressed matrix (:func:`kernels.compressed_dense`).

    ``("entries", None)``: gather the entries and write them into zeros (:func:`kernels.from_entries`:
    a select against a column iota where each row holds at most one, a diagonal's case); ``("full",
    None)``: every product of the block is an entry or an exact zero (no two same-coloured columns
    share a row of the block), so the products are the block; ``("mask", mask)``: the products where
    the pattern is, zeros elsewhere. A mask of ``_hoist.HOIST_BYTES`` or more is a device array, which
    the program takes as an argument (embedded as a constant it compiles slower than the scatter).
    Cached on the plan per block.
    """
    cache = plan.__dict__.setdefault("_dense_blocks", {})  # on the (frozen) plan itself, never saved
    key = (rows, cols)
    if key in cache:
        return cache[key]
    (r0, r1), (c0, c1) = rows, cols
    r, c = r1 - r0, c1 - c0
    fwd = plan.mode == "fwd"
    # A sparse block is cheaper written as zeros and its entries (a scatter) than read whole off the products (a
    # gather of every entry and a transpose): a 2-D stencil's 1024 x 1024 Jacobian (0.5% entries) 301 -> 54 us,
    # 8x8 blocks (0.8%) 215 -> 69 us, 32x32 blocks (3%) 237 -> 142 us; 128x128 blocks (12.5%) 463 -> 555 us.
    sparse = sub.rows.size * SCATTER_DENSITY <= r * c
    if sub.rows.size == 0 or sparse or np.unique(sub.rows).size == sub.rows.size or r * c > MASK_MAX:
        cache[key] = "entries", None
        return cache[key]
    # Which (colour, row) products are structurally nonzero (fwd; rev: (colour, column)), over the whole
    # pattern: a colour's product sums every column of that colour, in the block or not.
    prow, pcol = plan.pattern.rows, plan.pattern.cols
    size = math.prod(plan.pattern.out_shape) if fwd else math.prod(plan.pattern.in_shape)
    occupied = np.zeros((max(plan.n_colors, 1), size), bool)
    if fwd:
        occupied[plan.colors[pcol], prow] = True
        reached = occupied[:, r0:r1].sum(1)[plan.colors[c0:c1]].sum()
    else:
        occupied[plan.colors[prow], pcol] = True
        reached = occupied[:, c0:c1].sum(1)[plan.colors[r0:r1]].sum()
    if reached == sub.rows.size:
        cache[key] = "full", None
        return cache[key]
    mask = np.zeros((r, c), bool)
    mask[sub.rows, sub.cols] = True
    if mask.nbytes >= _hoist.HOIST_BYTES:
        with jax.ensure_compile_time_eval():
            mask = jax.device_put(mask)  # a concrete array: hoisted out of the program (see above)
    cache[key] = "mask", mask
    return cache[key]


def _check_symmetric(pattern: SparsityPattern, where: str) -> None:
    m, n = math.prod(pattern.out_shape), math.prod(pattern.in_shape)
    if m != n:
        raise ValueError(f"{where}: a Hessian pattern must be square, got flat shape {(m, n)}.")
    key = np.sort(pattern.rows * n + pattern.cols)
    tkey = np.sort(pattern.cols * n + pattern.rows)
    if not np.array_equal(key, tkey):
        raise ValueError(f"{where}: a Hessian pattern must be symmetric; the given one is not.")


def _compact(index: np.ndarray) -> np.ndarray:
    """Indices as int32 where they fit (smaller constants, cheaper gathers), else int64."""
    index = np.asarray(index, np.int64)
    return index.astype(np.int32) if index.size == 0 or index.max() < 2**31 else index


def _decompression(plan: SparsePlan, layout: str) -> tuple[str, object]:
    """How to read a plan's entries off its compressed matrix, built once per plan and layout.

    ``layout``: ``"cn"``, one row per colour (``(n_colors, size)``), or ``"nc"``, one
    column per colour (``(size, n_colors)``, what the Hessian engine computes).

    Returns:
      ``("gather", index)``: ``compressed.reshape(-1)[index]``; or ``("substitute",
      decompression)``: a :class:`colorings.SymmetricDecompression` to call (acyclic colourings).
    """
    cache = plan.__dict__.setdefault("_decompressions", {})  # on the (frozen) plan itself, never saved
    hit = cache.get(layout)
    if hit is None:
        hit = cache[layout] = _make_decompression(plan, layout)
    return hit


def _make_decompression(plan: SparsePlan, layout: str) -> tuple[str, object]:
    rows, cols = plan.pattern.rows, plan.pattern.cols
    if plan.coloring in ("star", "acyclic"):
        d = colorings.symmetric_decompression(rows, cols, plan.colors, plan.coloring, layout)
        return ("gather", d.index) if plan.coloring == "star" else ("substitute", d)
    c = max(plan.n_colors, 1)
    # Same-coloured lines share no entry: (i, j) is the only entry of its colour on its line.
    line, other = (cols, rows) if plan.coloring == "row" else (rows, cols)
    size = math.prod(plan.pattern.in_shape) if plan.coloring == "row" else math.prod(plan.pattern.out_shape)
    index = line * c + plan.colors[other] if layout == "nc" else plan.colors[other] * size + line
    return "gather", _compact(index)


def _hessian_cost(c: int, nnz: int, nodes: int, work: float) -> float:
    """The cost model's estimate of one sparse Hessian: ``c`` products' tangent passes plus the decompression."""
    return c * HVP_PASSES * work + GATHER_COST * nnz + PREFIX_COST * nodes


FOLD_BLOCKERS = {"dot_general", "conv_general_dilated"}  # products XLA would fold slowly with constant seeds
FOLD_WORK = 1 << 20  # ... unless one pass times the colours stays below this many FLOPs (a small convolution)


def facts(closed, prims: set | None = None) -> dict:
    """What the compiled evaluation needs to know of ``fun``'s jaxpr.

    ``"fold"``: no dense products; ``"two"``: transcendental functions (a Hessian's products
    in their own program); ``"pass"``: one pass's cost (:func:`jacobians._planner.pass_cost`).
    """
    prims = primitives(closed.jaxpr) if prims is None else prims
    return {"fold": not (FOLD_BLOCKERS & prims), "two": bool(TRANSCENDENTAL & prims),
            "pass": _planner.pass_cost(closed)}


def jacobian_folds(extra: dict, plan: "SparsePlan") -> bool:
    """Whether a compressed Jacobian's seeds may be plain constants that XLA folds into what reads them.

    Folded, the products of constant seeds with closed-over weights (a convolution's kernel) are
    computed once at compile time: a small compressed convolution runs 3.5x faster. XLA's
    evaluator is slow, so only where ``fun`` has no dense products, or one pass times the colours
    is small (``FOLD_WORK``); past ``FOLD_MAX`` seed entries never. ``extra``: the plan's facts
    (``"fold"``: no dense products, ``"pass"``: one pass's cost); unknown facts fold nothing.
    """
    if "pass" not in extra or plan.colors.size * plan.n_colors > FOLD_MAX:  # the seeds are (colours, len(colors))
        return False
    return extra["fold"] or extra["pass"] * max(plan.n_colors, 1) <= FOLD_WORK
FOLD_MAX = 1 << 22  # nor fold seeds past this many entries (n times colours): XLA's evaluator is slow
# Elementwise functions XLA's CPU backend computes in vectorised loops, but once per gathered entry in scalar
# code when it fuses them into the decompression's gather: a sparse Hessian of a fun using them runs its
# products and its decompression as two programs (see Engine._build).
TRANSCENDENTAL = {"sin", "cos", "tan", "asin", "acos", "atan", "atan2", "sinh", "cosh", "tanh", "asinh", "acosh",
                  "atanh", "exp", "exp2", "expm1", "log", "log1p", "logistic", "pow", "erf", "erfc", "erf_inv",
                  "lgamma", "digamma", "igamma", "igammac", "bessel_i0e", "bessel_i1e", "cbrt"}


def _seeds_like(colors: np.ndarray, c: int, x: jax.Array, fold: bool = False) -> jax.Array:
    """The 0/1 seeds ``S^T`` (``(c, n)``, ``x``'s dtype).

    ``fold``: plain constants, which XLA may fold into what depends only on them
    (a stencil's constant second derivatives become constants: half the products'
    work on the sparse Hessian benchmarks). Otherwise they are tied to ``x`` by an
    optimisation barrier and traced like it, so that their products with large
    closed-over weights are not folded in XLA's slow evaluator at compile time,
    nor evaluated op by op while a plan is certified (where JAX folds constant
    expressions eagerly).
    """
    seeds = jnp.asarray(colors[None, :] == np.arange(c)[:, None], x.dtype)
    return seeds if fold else jax.lax.optimization_barrier((seeds, x))[0]


def _compressed_hessian(p, plan: SparsePlan, mode: str, chunk_size: int | None, shards,
                        fold: bool = False, layout: str = "nc") -> tuple[jax.Array, object]:
    """``H @ S``: one Hessian-vector product per colour by ``mode``, and ``fun``'s aux.

    ``layout``: ``"nc"``, shape ``(n, c)`` (one column per colour), or ``"cn"``, ``(c, n)``.
    """
    seeds = _seeds_like(plan.colors, max(plan.n_colors, 1), p.x, fold)
    outer, inner = mode.split("_")

    def gradient(x):  # x -> (grad f(x), aux)
        g, (_, aux) = _hessian.gradient(p, inner)(x)
        return g, aux

    if outer == "fwd":  # the directional derivative of the gradient (inner "fwd": n JVPs, for a while_loop)
        apply = lambda s: jax.jvp(gradient, (p.x,), (s,), has_aux=True)[1:]  # noqa: E731
    elif inner == "rev":  # H is symmetric: s^T H = (H s)^T, pulled back through the gradient
        _, pull, aux = jax.vjp(gradient, p.x, has_aux=True)
        apply = lambda s: (pull(s)[0], aux)  # noqa: E731
    else:  # rev_fwd: the gradient of the directional derivative x -> f'(x) s

        def apply(s):
            def slope(z):
                _, t, aux = jax.jvp(lambda w: _scalar(p, w), (z,), (s,), has_aux=True)
                return t, aux

            return jax.grad(slope, has_aux=True)(p.x)

    return kernels.seed_map(apply, seeds, chunk_size, shards, axis=1 if layout == "nc" else 0)


def _scalar(p, x):
    y, aux = p.flat(x)
    return y[0], aux


APART_MIN = 1 << 14  # compressed products of at least this many entries are computed apart from their gather


def _apart(compute: Callable, x: jax.Array, size: int, elementwise: bool):
    """``compute()``, apart from the decompression that reads it (:func:`jacobians._batchwise.apart`).

    Only where all of the products would fuse into the gather (``elementwise``: ``fun`` has no
    dense products; a convolution's or a matrix product's output is materialised anyway, and
    only a cheap elementwise tail would be recomputed per entry), and from ``APART_MIN``
    entries on: below, the fused gather's scalar recomputation costs less than the cond and
    its compilation (the test suite's small sparse Hessians compiled 15% slower apart).
    """
    return _batchwise.apart(compute, x) if elementwise and size >= APART_MIN else compute()


def _hessian_values(p, plan: SparsePlan, where: str, shards=None, mode: str | None = None, chunk_size=None,
                    fold: bool = False, products=None, apart: bool = False):
    """The pattern's nonzeros of the Hessian: one Hessian-vector product per colour, then decompression.

    Args:
      mode: ``"fwd_rev"``, ``"rev_rev"``, ``"rev_fwd"``, ``"fwd_fwd"`` or ``"auto"``
        (forward over reverse, or what JAX can differentiate); ``None``: the plan's.
      fold: let XLA fold the seeds (see ``_seeds_like``).
      apart: ``fun`` has no dense products: large products are computed apart from the gather (:func:`_apart`).
      products: ``True``: return the compressed Hessian ``H @ S`` (``(n, c)``) and aux,
        not the entries; ``(compressed, aux)``: decompress these instead of computing them.
    """
    # Products returned by a program of their own (``products``) are written one column per colour:
    # XLA's CPU code for stencil-like gradients (pads, shifted slices) runs several times faster in that
    # layout. In the one program they are computed apart from the gather (fused into it, each nonzero's
    # product was recomputed on its own in scalar code: the 2-D Laplacian energy 1.3-1.9x slower), one row
    # per colour: no transpose ahead of the gather (Rosenbrock: 10-40% faster than one column per colour).
    layout = "nc" if products is not None else "cn"
    used = []  # the order that ran (auto: JAX's choice)

    def run(m):
        used.append(m)
        compressed, aux = _compressed_hessian(p, plan, m, chunk_size, shards, fold, layout)
        if p.m != 1 or any(s.shape != () for s in p.out_leaves):
            raise ValueError(f"{where}: fun must return a scalar (shape ()), got output {p.out_leaves[0].shape}.")
        return compressed, aux

    mode = mode or plan.mode
    if not isinstance(products, tuple):
        compute = lambda: (_hessian.either_second(run, where, p.jaxpr) if mode == "auto"  # noqa: E731
                           else _args.jvp_said(where, run, mode))
        compressed, aux = compute() if products is True else _apart(compute, p.x, p.n * plan.n_colors, apart)
        # The order that ran, for a decompression in a program of its own (traced after this one).
        plan.__dict__.setdefault("_decompressions", {})[("order", mode)] = used[-1]
        if products is True:
            return compressed, aux
    else:
        compressed, aux = products
    kind, how = _decompression(plan, layout)
    if kind == "substitute":
        return how(compressed), aux
    values = kernels.take(compressed.reshape(-1), how)
    order = plan.__dict__["_decompressions"].get(("order", mode), "")
    if order.startswith("rev_") and plan.coloring == "column":
        # Reverse outer products are rows, s^T H = (H^T s)^T: entry (i, j) was read as H[j, i]. Equal for a
        # Hessian; JAX's jacrev(grad) of a custom_vjp whose rule is not its function's derivative is not
        # symmetric, and its entry (i, j) is read at (j, i) (the pattern is symmetric).
        values = kernels.take(values, _transposed(plan))
    return values, aux


def _transposed(plan: SparsePlan) -> np.ndarray:
    """For each entry ``(i, j)`` of a symmetric pattern, the position of ``(j, i)``."""
    cache = plan.__dict__.setdefault("_decompressions", {})
    if "transposed" not in cache:
        rows, cols = plan.pattern.rows, plan.pattern.cols
        n = max(int(rows.max(initial=0)), int(cols.max(initial=0))) + 1
        key = rows.astype(np.int64) * n + cols
        order = np.argsort(key)
        cache["transposed"] = _compact(order[np.searchsorted(key[order], cols.astype(np.int64) * n + rows)])
    return cache["transposed"]


def sparse_jacobian(
    fun: Callable,
    argnums: int | tuple[int, ...] = 0,
    *,
    sparsity: "str | SparsePlan | SparsityPattern | np.ndarray | jsparse.BCOO" = "auto",
    mode: str = "auto",
    output: str = "bcoo",
    has_aux: bool = False,
    chunk_size: int | None = None,
    check: bool = False,
    mesh=None,
    mesh_axis=None,
    max_memory: int | str | None = None,
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
        colouring), a :class:`SparsityPattern`, a boolean array or a ``BCOO`` of
        shape ``out.shape + in.shape`` (one array in and out) or of the flat
        ``(m, n)``. Every plan, detected or given, is certified once against
        ``jax.jvp``/``jax.vjp`` at a random point; one that misses a nonzero gives a
        :class:`jacobians.PlanWarning` naming the entry and the dense plan instead
        (a :class:`jacobians.PlanError` in strict mode).
      mode: ``"fwd"`` (column colouring), ``"rev"`` (row colouring) or ``"auto"``
        (fewer colours, forward on ties; reverse when ``fun`` contains a
        ``custom_vjp`` and forward when it contains a ``while_loop``, the only
        directions JAX can differentiate those in; forward for complex outputs).
      output: ``"bcoo"``: each block a ``jax.experimental.sparse.BCOO`` of shape
        ``out.shape + in.shape``; ``"dense"``: dense blocks equal to
        :func:`jacobians.jacobian`'s; ``"csr"`` / ``"csc"``: one
        ``scipy.sparse.csr_matrix`` / ``csc_matrix`` of the flat ``(m, n)`` Jacobian
        (outputs and inputs raveled and concatenated in pytree order), a host
        object: not available inside ``jax.jit`` or other transformations.
      has_aux: ``fun`` returns ``(output, aux)``; the result is ``(jacobian, aux)``.
      chunk_size: at most this many JVPs/VJPs at a time (a ``lax.map`` over chunks
        of the colours' seeds; bounds memory), as :func:`jacobians.jacobian`'s.
      max_memory: a memory budget (bytes, or ``"2GB"``): the chunk size that fits, by XLA's
        memory analysis (as :func:`jacobians.jacobian`); not with ``chunk_size``.
      check: a plan that fails its certificate raises a ``ValueError`` naming the
        first missed entry, instead of falling back to the dense plan (use it to
        validate a hand-written pattern).
      mesh, mesh_axis: split the colours across the devices of a mesh (see
        :func:`jacobians.jacobian`).

    Returns:
      A function with ``fun``'s signature returning the Jacobian in the pytree
      structure ``jacobian`` gives. Its ``plan(*args, **kwargs)`` returns the
      :class:`SparsePlan` for those arguments (shapes suffice).

    Raises:
      ValueError: unknown ``mode``/``output``; a given pattern or plan of the wrong shape;
        with ``check=True``, a plan that fails its certificate; ``output="csr"``/``"csc"``
        inside a transformation.
      TypeError: ``mode="rev"`` with complex outputs.
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
    check = _args.check_bool(check, "check", where)

    def make(c):
        return _wrap(Engine(fun, argnums, sparsity, mode, output, has_aux, where,
                             shards=_mesh.resolve(mesh, where, mesh_axis), chunk_size=_args.check_chunk_size(c, where)),
                     check)

    return _memory.transform(make, chunk_size, max_memory, where)


def _wrap(engine: Engine, check: bool) -> Callable:
    engine.check = check
    wrapped = _trust.wrap(engine.t)
    wrapped.plan = engine.plan
    return wrapped


HESSIAN_MODES = _args.HESSIAN_MODES
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
    chunk_size: int | None = None,
    check: bool = False,
    mesh=None,
    mesh_axis=None,
    max_memory: int | str | None = None,
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
      coloring: ``"star"`` (direct decompression: one gather), ``"acyclic"``
        (fewer colours, decompression by substitution: a prefix sum along
        two-coloured trees), ``"column"`` (a distance-2 colouring: direct, more
        colours) or ``"auto"``: the cheapest by a cost model that counts both the
        Hessian-vector products (colours times the cost of one evaluation of
        ``fun``, read from its jaxpr) and the decompression (a gather per entry; a
        prefix sum per tree node, dear on CPU), so acyclic is taken only where the
        products it saves cost more than its substitution (``plan.costs`` shows the
        estimates).
      mode: how each product ``H s`` is computed, as :func:`jacobians.hessian`'s
        modes: ``"fwd_rev"`` (forward over reverse), ``"rev_fwd"`` (reverse over
        forward: the gradient of ``x -> f'(x) s``), ``"rev_rev"`` (where a
        ``custom_vjp`` forbids forward mode), ``"fwd_fwd"`` (where a ``while_loop``
        forbids reverse mode; its gradient costs ``n`` JVPs) or ``"auto"``
        (forward over reverse, else what JAX can differentiate).
      output: ``"bcoo"``, ``"dense"``, or ``"csr"`` / ``"csc"``: one SciPy matrix of
        the flat ``(n, n)`` Hessian (not inside transformations; see
        :func:`sparse_jacobian`).
      has_aux: ``fun`` returns ``(value, aux)``.
      chunk_size: at most this many Hessian-vector products at a time (a
        ``lax.map`` over chunks of the colours' seeds; bounds memory), as
        :func:`jacobians.hessian`'s.
      max_memory: as :func:`sparse_jacobian`'s.
      check: a plan that fails its certificate (Hessian-vector products at a random
        point) raises a ``ValueError``, as for :func:`sparse_jacobian`.
      mesh, mesh_axis: split the colours across the devices of a mesh.

    Returns:
      A function returning the Hessian (``(H, aux)`` with ``has_aux``), in ``fun``'s
      output container where it returns its scalar in one (a dict, a 1-tuple), as
      ``jax.hessian`` (not ``"csr"``/``"csc"``: one flat matrix); its
      ``plan(*args, **kwargs)`` returns the :class:`SparsePlan`.

    Raises:
      ValueError: a non-scalar output; a given pattern that is not square or not
        symmetric; unknown ``coloring``, ``mode`` or ``output``; ``output="csr"``/``"csc"``
        inside a transformation.
      TypeError: ``chunk_size`` not a positive int; a complex output (as ``jax.hessian``).
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
    chunk_size = _args.check_chunk_size(chunk_size, where)
    check = _args.check_bool(check, "check", where)

    def make(c):
        return _wrap(Engine(fun, argnums, sparsity, mode, output, has_aux, where, coloring=coloring,
                             shards=_mesh.resolve(mesh, where, mesh_axis), chunk_size=c), check)

    return _memory.transform(make, chunk_size, max_memory, where)


def _both_compiled(first, second, traced):
    """``second(first(*traced), *traced)``, the second program lowered and compiled while the first compiles.

    XLA compiles without the interpreter: on 2 cores a banded sparse Hessian's first call took the
    sum of two compilations (products, then decompression; with its certificate's, 0.53 s against asdex's
    detection and first call, 0.51 s). The compiled second program is found in JAX's compilation cache by
    the call below it. A failure here leaves the call to compile and report as usual.
    """
    future = None
    try:
        future = _hoist.compile_ahead(second.lower(jax.eval_shape(first, *traced), *traced))
    except Exception:  # noqa: BLE001 - compiled again by the call below, which reports a real error
        pass
    products = first(*traced)
    if future is not None:
        try:
            future.result()
        except Exception:  # noqa: BLE001 - as above
            pass
    return second(products, *traced)


def _platform(traced) -> str:
    """The platform a call runs on: its first array's device's, else JAX's default backend's."""
    for a in traced:
        if isinstance(a, jax.Array) and not _compat.is_tracer(a):
            return next(iter(a.devices())).platform
    return jax.default_backend()
