"""Log-determinants from the Jacobian's block-triangular structure (flows without hand-written log-dets).

For a square flat map ``x (n,) -> y (n,)`` (the jaxpr ``_args.trace_flat``
returns), :func:`plan` reads the structure on the host and :func:`evaluate`
computes ``(sign, log|det J|)`` from it:

1. **Stages.** The map is cut where all the information flows through one
   array of size ``n`` (a *cut*: after a coupling layer, a 1x1 convolution, a
   permutation), except after elementwise operations and reshapes. The chain
   rule makes ``det J`` the product of the stages' determinants, and each
   stage has its own, often much finer, structure (the product of a Glow
   step's Jacobians is dense, its factors are not).
2. **Pattern.** The sparsity lattice (:mod:`._deps`) gives each stage's
   pattern, its dependency sets restarting at each cut; detection stops (the
   map takes the dense path) once a set outgrows the density budget.
3. **Block triangular form** (Dulmage-Mendelsohn, square case): a maximum
   bipartite matching (none perfect: structurally singular, ``-inf`` without
   evaluating anything), then the strongly connected components of the
   matched digraph. ``det J = sgn(tau) * prod_b det J[R_b, C_b]`` over the
   diagonal blocks (rows ``R_b``, columns ``C_b``, both sorted; ``tau`` maps
   the ``r``-th row of each block to the block's ``r``-th column).
4. **Diagonal blocks.** A stage whose blocks are all ``1 x 1`` and whose
   path from each input to its output is elementwise or data movement is
   evaluated by a *log-diagonal sweep* (:mod:`._logdiag`): one pass carrying
   ``log |dy_i/dx_sigma(i)|`` and its sign with log-derivative rules (``tanh``,
   ``logistic``, ``exp``, ...), so saturated float32 flows stay finite. Other
   stages extract exactly their diagonal blocks' entries with a partial
   colouring (one JVP per colour; two for a coupling layer, ``C`` for a 1x1
   convolution over ``C`` channels; VJPs where ``fun`` has a ``custom_vjp``)
   and take the blocks' determinants with :func:`kernels.slogdet`, blocks
   grouped by size. A stage whose one block is everything is dense.

Everything on the host runs once per call structure and shapes; the traced
program is plain JAX, so ``jax.grad``, ``jax.jacfwd`` and ``jax.hessian``
differentiate through it (through the kernels' own rules).
"""

import math
import time
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from . import _compat, _deps, _logdiag, kernels
from ._walker import is_opaque, live_equations

ELEMENTWISE = _logdiag.ELEMENTWISE
NO_CUT = ELEMENTWISE | {"reshape", "squeeze", "copy", "copy_p", "convert_element_type", "reduce_precision"}
# ... except where an element-wise chain ends in a mixing product: cut there, so that the chain's log-diagonal
# sweep takes its determinant in log space (``M @ tanh(z)`` at saturation: finite in float32, where the
# product's JVPs see the tanh's underflowed derivative and give -inf).
MIXING = {"dot_general", "conv_general_dilated"}
DENSITY = 0.6  # a stage whose pattern holds more than this fraction of n * n entries is dense
SETS = 4  # detection stops once one array's dependency sets hold more than SETS * n * n entries
NNZ_CAP = 1 << 23  # and never past this many entries
PAIRS_CAP = 1 << 24  # conflict pairs the partial colouring may build


@dataclass(frozen=True)
class Stage:
    """One factor of the chain: how its log-determinant is computed.

    Attributes:
      method: ``"sweep"`` (log-diagonal sweep), ``"blocks"`` (coloured
        extraction of the diagonal blocks), ``"dense"`` or ``"singular"``.
      mode: ``"fwd"`` (JVPs) or ``"rev"`` (VJPs) for ``"blocks"`` and ``"dense"``.
      passes: JVPs/VJPs (1 for a sweep, 0 for a singular stage).
      blocks: ``{block size: count}``.
      nnz: entries of the stage's pattern (``None``: dense, not detected).
    """

    method: str
    mode: str
    passes: int
    blocks: dict
    nnz: int | None
    start: int = field(repr=False, default=0)  # top-level equations [start, stop)
    stop: int = field(repr=False, default=0)
    inputs: tuple = field(repr=False, default=())  # ((var, offset), ...)
    output: object = field(repr=False, default=None)
    data: object = field(repr=False, default=None, compare=False)  # the method's host tables
    reads_x: tuple = field(repr=False, default=())  # per live equation: does it read the stage's input?


@dataclass(frozen=True)
class LogDetPlan:
    """How ``log_abs_det`` / ``slogdet`` / ``det`` compute one call structure, and why.

    Attributes:
      method: ``"block-triangular"`` (stages with their own structure),
        ``"dense"`` (the Jacobian by ``n`` JVPs or VJPs, then an LU) or
        ``"singular"`` (a structurally singular pattern: ``-inf``, nothing evaluated).
      n: the size of the square map.
      passes: JVPs/VJPs in all (a sweep counts one).
      stages: the :class:`Stage` s (empty for the dense method).
      reason: one line on the choice.
      seconds: host time spent planning (the certificate included).
      certificate: the check of a structure plan against JAX's dense Jacobian
        (``jacobians.Certificate``-like: ``status`` and ``detail``); ``None`` for the dense method.
      sweep: the dense method's Jacobian by one structured sweep (``"fwd"`` or ``"rev"``) where
        the planner's cost model finds it cheaper than ``n`` JVPs (certified as a structure
        plan); ``None``: by JVPs (VJPs).
    """

    method: str
    n: int
    passes: int
    stages: tuple = ()
    reason: str = ""
    mode: str = "fwd"
    seconds: float | None = field(default=None, compare=False)
    closed: object = field(default=None, repr=False, compare=False)
    batch: int | None = None  # batch_first: one value per example
    certificate: object = field(default=None, compare=False)  # the _trust.Certificate of a structure plan
    sweep: str | None = None

    def __str__(self) -> str:
        lines = [f"log-determinant plan: {self.method}, {self.passes} passes (n={self.n}, {len(self.stages)} stages)"]
        for i, s in enumerate(self.stages):
            sizes = ", ".join(f"{c} x {k}x{k}" for k, c in sorted(s.blocks.items()))
            passes = f"{s.passes} {'JVPs' if s.mode == 'fwd' else 'VJPs'}"
            how = {"sweep": "log-diagonal sweep", "blocks": f"{passes} (coloured)", "dense": f"dense, {passes}",
                   "singular": "structurally singular"}[s.method]
            lines.append(f"  stage {i}: {how}; blocks {sizes or '-'}" + (f"; nnz={s.nnz}" if s.nnz is not None else ""))
        if self.reason:
            lines.append(f"  {self.reason}")
        if self.certificate is not None:
            lines.append(f"  certificate: {self.certificate}")
        if self.seconds is not None:
            lines.append(f"  planned in {self.seconds * 1e3:.3g} ms")
        return "\n".join(lines)


def dense_plan(n: int, mode: str, reason: str) -> LogDetPlan:
    """The dense method (today's path): ``n`` JVPs (VJPs), then :func:`kernels.slogdet`."""
    return LogDetPlan("dense", n, n, (), reason, mode)


# ---------------------------------------------------------------- planning


class Coupled(Exception):
    """``batch_first``: the pattern links two examples (or a stage needs the dense method): not per-example."""


def plan(closed, offsets, n: int, forced: str | None, where: str, batch: int | None = None) -> LogDetPlan:
    """Plan the log-determinant of the flat square map ``closed`` (leaves -> ``y (n,)``).

    Args:
      closed: the closed jaxpr of ``trace_flat``; its inputs are the call's traced leaves.
      offsets: per input, the offset of that leaf in the flat ``x`` (``None``: not differentiated).
      n: input and output size.
      forced: ``"rev"`` (a ``custom_vjp``: no JVP), ``"fwd"`` (a ``while_loop``: no VJP) or ``None``.
      where: the public call, for messages.
      batch: ``batch_first``: ``x`` holds this many examples along its leading axis, one
        log-determinant each; the pattern must keep them apart (else :class:`Coupled`).

    Returns:
      The :class:`LogDetPlan`; its ``closed`` is the jaxpr :func:`evaluate` runs.
      Raises on analysis failures (the caller reports them and takes the dense plan).
    """
    t0 = time.perf_counter()
    kinds = {np.dtype(v.aval.dtype) for v in _compat.unclose(closed)[0].outvars}
    kinds |= {np.dtype(v.aval.dtype) for v, off in zip(_compat.unclose(closed)[0].invars, offsets, strict=True)
              if off is not None}
    if not kinds <= {np.dtype(np.float32), np.dtype(np.float64)}:
        return dense_plan(n, forced or "fwd", "complex or half-precision values: the dense path")
    closed = _inline(closed)
    budget = min(max(SETS * n * n, 1 << 16), NNZ_CAP)
    lat = _deps.DepsLattice(n, budget)
    walker = _deps.Walker(lat)
    try:
        with jax.ensure_compile_time_eval(), lat.scope():  # the budget inside each operation too (as Walker.run)
            stages = _stages(closed, offsets, n, walker, forced, batch)
    except _deps.TooDense:
        if batch is not None:
            raise Coupled("dense") from None
        return dense_plan(n, forced or "fwd", "the pattern is dense (detection stopped at the density budget)")
    if batch is not None and any(s.method in ("singular", "dense") for s in stages):
        raise Coupled("a singular or dense stage")
    if any(s.method == "singular" for s in stages):
        stages = tuple(s for s in stages if s.method == "singular")[:1]
        return LogDetPlan("singular", n, 0, stages, "no perfect matching: the Jacobian is singular at every x",
                          seconds=time.perf_counter() - t0, closed=closed)
    if len(stages) == 1 and stages[0].method == "dense":
        return dense_plan(n, stages[0].mode, "one diagonal block: the Jacobian has no triangular structure")
    passes = sum(s.passes for s in stages)
    reason = f"{len(stages)} stage(s): " + ", ".join(s.method for s in stages)
    return LogDetPlan("block-triangular", n, passes, tuple(stages), reason, forced or "fwd",
                      seconds=time.perf_counter() - t0, closed=closed, batch=batch)


def _inline(closed):
    """``closed`` with its calls (``jax.jit`` s, ``closed_call`` s) inlined at every level, re-traced.

    Stages are cut at the top level: a flow whose layers are jitted functions
    would otherwise be one equation. The inputs keep their order.
    """
    jaxpr, consts = _compat.unclose(closed)

    def run(jaxpr, consts, args):
        env = dict(zip(jaxpr.constvars, consts, strict=True))
        env.update(zip(jaxpr.invars, args, strict=True))
        for eqn in jaxpr.eqns:
            vals = [_read(env, v) for v in eqn.invars]
            inner = _compat.called_jaxpr(eqn) if eqn.primitive.name in _logdiag.CALLS else None
            if inner is not None:
                ij, ic = _compat.unclose(inner)
                outs = run(ij, ic, vals[len(vals) - len(ij.invars):])
            else:
                out = _compat.bind(eqn, vals)
                outs = out if eqn.primitive.multiple_results else [out]
            for v, o in zip(eqn.outvars, outs, strict=True):
                if not isinstance(v, _compat.DropVar):
                    env[v] = o
        return [_read(env, v) for v in jaxpr.outvars]

    if not any(e.primitive.name in _logdiag.CALLS for e in jaxpr.eqns):
        return closed
    avals = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in jaxpr.invars]
    return jax.make_jaxpr(lambda *a: run(jaxpr, consts, a))(*avals)


def _stages(closed, offsets, n, walker, forced, batch=None) -> list[Stage]:
    """Walk the top level once: dependency sets (restarting at cuts), cut points, each stage's plan."""
    jaxpr, consts = _compat.unclose(closed)
    lat = walker.lat
    deps: dict = {}
    for v, c in zip(jaxpr.constvars, consts, strict=True):
        deps[v] = lat.const(_compat.host_constant(c), v.aval)
    inputs = []
    for v, off in zip(jaxpr.invars, offsets, strict=True):
        if off is None:
            deps[v] = _deps.empty(v.aval.shape)
        else:
            deps[v] = _deps.identity(v.aval.shape, off)
            inputs.append((v, off))
    live = live_equations(jaxpr)
    eqns = jaxpr.eqns
    last_use: dict = {}
    mixed = set()  # the variables a mixing product reads
    for k, eqn in enumerate(eqns):
        if live[k]:
            for v in eqn.invars:
                if not isinstance(v, _compat.Literal):
                    last_use[v] = k
                    if eqn.primitive.name in MIXING:
                        mixed.add(v)
    outvar = jaxpr.outvars[0]
    xdep = {v for v, _ in inputs}

    def read(v):
        if isinstance(v, _compat.Literal):
            return lat.constant(None if is_opaque(v.aval) else np.asarray(v.val), v.aval)
        return deps[v]

    sweep = _logdiag.Sweep(n, walker)
    sweep.start(inputs)
    examples = None if batch is None else np.arange(n) // max(n // max(batch, 1), 1)  # of each stage input
    stages, start, reads_x = [], 0, []
    for k, eqn in enumerate(eqns):
        if not live[k]:
            continue
        reads_x.append(any(v in xdep for v in eqn.invars if not isinstance(v, _compat.Literal)))
        ins = [read(v) for v in eqn.invars]
        outs = sweep.eqn(eqn, ins)  # the dependency sets (walker), and tags while the sweep holds
        for v, o in zip(eqn.outvars, outs, strict=True):
            if not isinstance(v, _compat.DropVar):
                deps[v] = o
        if reads_x[-1]:  # every dtype: an integer or boolean computed from x must not cross a cut either
            xdep.update(v for v in eqn.outvars if not isinstance(v, _compat.DropVar))
        # A cut: one array of size n carries everything later equations read from x.
        (out, *rest) = eqn.outvars
        if rest or out is outvar or math.prod(out.aval.shape) != n:
            continue
        if eqn.primitive.name in NO_CUT and not (eqn.primitive.name in ELEMENTWISE and out in mixed):
            continue
        if not jnp.issubdtype(out.aval.dtype, jnp.floating):
            continue
        carried = [v for v in xdep if last_use.get(v, -1) > k or v is outvar]
        if carried != [out]:
            continue
        stages.append(_stage(deps[out], n, start, k + 1, inputs, out, sweep, forced, examples, batch, reads_x))
        examples = _examples_out(deps[out], examples)
        start, inputs, reads_x = k + 1, [(out, 0)], []
        deps[out] = _deps.identity(out.aval.shape, 0)
        xdep = {out}
        sweep.start(inputs)
    if examples is not None:  # output example b (its leading index) reads only input example b
        d = read(outvar)
        if np.any(examples[d.indices] != d.rows() // max(n // max(batch, 1), 1)):
            raise Coupled("an output example reads another example's input")
    last = _stage(read(outvar), n, start, len(eqns), inputs, outvar, sweep, forced, examples, batch, reads_x)
    reshapes = all(eqns[k].primitive.name in NO_CUT - ELEMENTWISE for k in range(start, len(eqns)) if live[k])
    if not (stages and last.method == "sweep" and reshapes and np.array_equal(last.data[2], np.arange(n))):
        stages.append(last)  # (a trailing ravel of the last cut, the identity, needs no stage)
    return stages


def _examples_out(d, examples) -> np.ndarray | None:
    """The example of each element of a stage's output: that of the inputs it reads (``None``: not batched)."""
    if examples is None:
        return None
    out = np.full(d.size, -1, np.int64)
    out[d.rows()] = examples[d.indices]
    return out


def _parities(perm, examples, batch) -> np.ndarray:
    """Per example, the sign of ``perm`` (rows -> columns) restricted to its rows and columns, ranked by index."""
    rank = np.empty(perm.size, np.int64)
    order = np.lexsort((np.arange(perm.size), examples))
    bounds = np.r_[0, np.cumsum(np.bincount(examples, minlength=batch))]
    rank[order] = np.arange(perm.size) - np.repeat(bounds[:-1], np.diff(bounds))
    rows_ex = examples[perm]  # rows belong to their columns' example (checked)
    out = np.ones(batch, np.int64)
    for e in range(batch):
        r = np.sort(np.flatnonzero(rows_ex == e))
        out[e] = _parity(rank[perm[r]])
    return out


def _stage(d, n, start, stop, inputs, output, sweep, forced, examples=None, batch=None, reads_x=()) -> Stage:
    """The plan of one stage from its output's dependency sets ``d`` (``n`` sets over ``n`` inputs)."""
    rows, cols = d.rows(), d.indices
    common = dict(start=start, stop=stop, inputs=tuple(inputs), output=output, reads_x=tuple(reads_x))
    if examples is not None:
        own = _examples_out(d, examples)
        if np.any(examples[cols] != own[rows]):
            raise Coupled("an output reads another example's input")
    if rows.size > DENSITY * n * n and n > 1:
        return Stage("dense", forced or "fwd", n, {n: 1}, int(rows.size), **common)
    match = _matching(rows, cols, n)
    if match is None:
        return Stage("singular", "fwd", 0, {}, int(rows.size), **common)
    tags = sweep.finish(output)
    if tags is not None:  # the sweep's own matching (a perfect one: each tag is in its row's set)
        match = tags
    labels, count = _components(rows, cols, match, n)
    sizes = np.bincount(labels, minlength=count)
    blocks = dict(zip(*np.unique(sizes, return_counts=True), strict=True))
    blocks = {int(k): int(v) for k, v in blocks.items()}
    if tags is not None and count == n:
        if examples is not None:  # per example: the segment of each output element, each example's sign
            seg = examples[tags]
            data = (sweep.actions, _parities(tags, examples, batch), tags, seg)
        else:
            data = (sweep.actions, _parity(tags), tags, None)
        return Stage("sweep", "fwd", 1, blocks, int(rows.size), **common, data=data)
    if count == 1:
        return Stage("dense", forced or "fwd", n, blocks, int(rows.size), **common)
    table = _block_tables(rows, cols, match, labels, count, n, forced, examples, batch)
    if table is None:  # too many conflicts to colour: dense is as good
        return Stage("dense", forced or "fwd", n, blocks, int(rows.size), **common)
    return Stage("blocks", table["mode"], table["n_colors"], blocks, int(rows.size), **common, data=table)


def _matching(rows, cols, n) -> np.ndarray | None:
    """For each row its matched column (a maximum bipartite matching), or ``None`` when none is perfect."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import maximum_bipartite_matching

    if n == 0:
        return np.zeros(0, np.int64)
    a = csr_matrix((np.ones(rows.size, np.int8), (rows, cols)), shape=(n, n))
    match = np.asarray(maximum_bipartite_matching(a, perm_type="column"), np.int64)
    return None if np.any(match < 0) else match


def _components(rows, cols, match, n) -> tuple[np.ndarray, int]:
    """Strongly connected components of the matched digraph: row ``i`` -> the row matched to each column it reads."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import connected_components

    if n == 0:
        return np.zeros(0, np.int64), 0
    owner = np.empty(n, np.int64)
    owner[match] = np.arange(n)
    g = csr_matrix((np.ones(rows.size, np.int8), (rows, owner[cols])), shape=(n, n))
    count, labels = connected_components(g, directed=True, connection="strong")
    return np.asarray(labels, np.int64), int(count)


def _parity(perm: np.ndarray) -> int:
    """``+1`` or ``-1``: the sign of the permutation ``i -> perm[i]``."""
    seen = np.zeros(perm.size, bool)
    odd = 0
    for i in range(perm.size):
        if seen[i]:
            continue
        j, length = i, 0
        while not seen[j]:
            seen[j] = True
            j = int(perm[j])
            length += 1
        odd ^= (length - 1) & 1
    return -1 if odd else 1


def _greedy(n_nodes: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """A greedy (largest degree first) colouring of the graph with edges ``a[k] -- b[k]``."""
    keys = _deps.unique(np.concatenate([a * n_nodes + b, b * n_nodes + a]))
    src, dst = np.divmod(keys, max(n_nodes, 1))
    ptr = np.zeros(n_nodes + 1, np.int64)
    np.cumsum(np.bincount(src, minlength=n_nodes), out=ptr[1:])
    degree = np.diff(ptr)
    colors = np.full(n_nodes, -1, np.int64)
    free = np.ones(n_nodes + 1, bool)  # scratch: colours not used by the current node's neighbours
    for v in np.lexsort((np.arange(n_nodes), -degree)).tolist():
        used = colors[dst[ptr[v]:ptr[v + 1]]]
        used = used[used >= 0]
        free[used] = False
        colors[v] = int(np.argmax(free))  # the least free colour (a node has fewer neighbours than colours)
        free[used] = True
    return colors


def _block_tables(rows, cols, match, labels, count, n, forced, examples=None, batch=None) -> dict | None:
    """Colouring and gather tables that extract exactly the diagonal blocks' entries."""
    owner = np.empty(n, np.int64)
    owner[match] = np.arange(n)
    need = labels[rows] == labels[owner[cols]]  # the entry lies in a diagonal block
    nr, nc = rows[need], cols[need]
    options = {}
    for mode in ("fwd", "rev") if forced is None else (forced,):
        # fwd: column j conflicts with every other column of a row that needs (i, j); rev: rows alike.
        key, other = (rows, cols) if mode == "fwd" else (cols, rows)
        nkey, nother = (nr, nc) if mode == "fwd" else (nc, nr)
        order = np.argsort(key, kind="stable")
        ptr = np.zeros(n + 1, np.int64)
        np.cumsum(np.bincount(key, minlength=n), out=ptr[1:])
        lengths = ptr[nkey + 1] - ptr[nkey]
        if int(lengths.sum()) > PAIRS_CAP:
            continue
        src = np.repeat(nother, lengths)
        starts = np.repeat(ptr[nkey] - np.cumsum(np.r_[0, lengths[:-1]]), lengths)
        dst = other[order][np.arange(src.size) + starts]
        keep = src != dst
        colors = _greedy(n, src[keep], dst[keep])
        colors[colors < 0] = 0
        options[mode] = colors
    if not options:
        return None
    mode = min(options, key=lambda m: (int(options[m].max(initial=-1)) + 1, m != "fwd"))
    colors = options[mode]
    n_colors = int(colors.max(initial=-1)) + 1
    # Per block size s: (count_s, s, s) indices into the compressed values (n_colors * n, then a zero).
    flat = colors[nc] * n + nr if mode == "fwd" else colors[nr] * n + nc
    entry = dict(zip((nr * n + nc).tolist(), flat.tolist(), strict=True))
    zero = n_colors * n
    groups = {}
    members = np.argsort(labels, kind="stable")
    bounds = np.r_[0, np.cumsum(np.bincount(labels, minlength=count))]
    by_size: dict = {}
    for b in range(count):
        r = np.sort(members[bounds[b]:bounds[b + 1]])
        by_size.setdefault(r.size, []).append(r)
    tau = np.empty(n, np.int64)
    segs = {}
    for s, blocks in by_size.items():
        R = np.stack(blocks)  # (count_s, s) rows, sorted
        C = np.sort(match[R], axis=1)  # their columns, sorted
        tau[R.ravel()] = C.ravel()
        idx = np.full((R.shape[0], s, s), zero, np.int64)
        keys = (R[:, :, None] * n + C[:, None, :]).ravel()
        idx.reshape(-1)[:] = [entry.get(k, zero) for k in keys.tolist()]
        groups[s] = idx
        segs[s] = None if examples is None else examples[C[:, 0]]
    sign = _parity(tau) if examples is None else _parities(tau, examples, batch)
    return dict(mode=mode, colors=colors, n_colors=n_colors, groups=groups, sign=sign, segs=segs)


# ---------------------------------------------------------------- evaluation


def evaluate(p: LogDetPlan, leaves) -> tuple[jax.Array, jax.Array]:
    """``(sign, log|det J|)`` at the call's traced leaves (those of the jaxpr ``p.closed``)."""
    jaxpr, consts = _compat.unclose(p.closed)
    dtype = jnp.result_type(*[v.aval.dtype for v in jaxpr.outvars])
    if p.method == "singular":
        return jnp.zeros((), dtype), jnp.full((), -jnp.inf, dtype)
    env = dict(zip(jaxpr.constvars, consts, strict=True))
    env.update(zip(jaxpr.invars, leaves, strict=True))
    live = live_equations(jaxpr)
    shape = () if p.batch is None else (p.batch,)
    sign, logabs = jnp.ones(shape, dtype), jnp.zeros(shape, dtype)
    for st in p.stages:
        eqns = [e for k, e in enumerate(jaxpr.eqns[st.start:st.stop], st.start) if live[k]]
        if st.method == "sweep":
            S, L = _logdiag.run(eqns, env, st.inputs, st.output, st.data[0])
            s, la = _combine(S, L, st.data[3], p.batch)
            s = s * jnp.asarray(st.data[1], s.dtype)
        else:
            s, la = _stage_det(st, eqns, env, p.batch)
        sign, logabs = sign * s.astype(dtype), logabs + la.astype(dtype)
    zero = jnp.zeros((), dtype)
    return jnp.where(sign == 0, zero, sign), logabs  # a singular map's sign +0, not the -0 of a product with -1


def _combine(signs, logs, seg, batch) -> tuple[jax.Array, jax.Array]:
    """Products of ``signs`` and sums of ``logs``: in all, or per example (``seg``: each entry's example)."""
    if seg is None:
        return jnp.prod(signs), jnp.sum(logs)
    logabs = jax.ops.segment_sum(logs, seg, batch)
    neg = jax.ops.segment_sum((signs < 0).astype(jnp.int32), seg, batch)
    zero = jax.ops.segment_max((signs == 0).astype(jnp.int32), seg, batch) > 0
    one = jnp.ones((), signs.dtype)
    return jnp.where(zero, jnp.zeros((), signs.dtype), jnp.where(neg % 2 == 1, -one, one)), logabs


def _read(env, v):
    return v.val if isinstance(v, _compat.Literal) else env[v]


def _run(eqns, env) -> None:
    for eqn in eqns:
        out = _compat.bind(eqn, [_read(env, v) for v in eqn.invars])
        outs = out if eqn.primitive.multiple_results else [out]
        for v, o in zip(eqn.outvars, outs, strict=True):
            if not isinstance(v, _compat.DropVar):
                env[v] = o


def _stage_det(st: Stage, eqns, env, batch=None) -> tuple[jax.Array, jax.Array]:
    """A coloured or dense stage: the stage as a flat map of its input, then the blocks' determinants."""
    # Values that do not read the stage's input are computed once, here, for this and later stages.
    _run([e for e, r in zip(eqns, st.reads_x, strict=True) if not r], env)
    eqns = [e for e, r in zip(eqns, st.reads_x, strict=True) if r]
    base = dict(env)
    dtype = np.result_type(*[np.dtype(v.aval.dtype) for v, _ in st.inputs])
    u0 = jnp.concatenate([jnp.ravel(env[v]).astype(dtype) for v, _ in st.inputs])

    def flat(u):
        local = dict(base)
        for v, off in st.inputs:
            size = math.prod(v.aval.shape)
            local[v] = u[off - st.inputs[0][1]:off - st.inputs[0][1] + size].reshape(v.aval.shape).astype(v.aval.dtype)
        _run(eqns, local)
        y = jnp.ravel(local[st.output])
        return y, y

    if st.method == "dense":
        kernel = kernels.forward if st.mode == "fwd" else kernels.reverse
        _, J, y = kernel(flat, u0)
        env[st.output] = y.reshape(st.output.aval.shape)
        return kernels.slogdet(J)
    t = st.data
    if t["mode"] == "fwd":
        compressed, y = kernels.compressed_jvps(flat, u0, t["colors"], t["n_colors"])  # (c, n)
    else:
        y, pull, _ = jax.vjp(flat, u0, has_aux=True)
        seeds = jnp.asarray(t["colors"][None, :] == np.arange(t["n_colors"])[:, None], y.dtype)
        compressed = jax.vmap(lambda c: pull(c)[0])(seeds)  # (c, n)
    env[st.output] = y.reshape(st.output.aval.shape)
    values = jnp.concatenate([compressed.reshape(-1), jnp.zeros((1,), compressed.dtype)])
    shape = () if batch is None else (batch,)
    sign, logabs = jnp.asarray(t["sign"], values.dtype), jnp.zeros(shape, values.dtype)
    for s, idx in t["groups"].items():
        blocks = values[idx]  # (count, s, s)
        if s == 1:
            d = blocks[:, 0, 0]
            bs, bl = jnp.sign(d), jnp.log(jnp.abs(d))
        else:
            bs, bl = kernels.slogdet(blocks)
        gs, gl = _combine(bs, bl, t["segs"][s], batch)
        sign, logabs = sign * gs, logabs + gl
    return sign, logabs
