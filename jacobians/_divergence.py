"""Traces of Jacobians without the Jacobian: exact divergences and stochastic trace estimators.

The divergence of a vector field ``f: R^n -> R^n`` is ``tr(J) = sum_j J[j, j]``
(continuous normalizing flows, score matching). Exact: JVPs in chunks, each
keeping only its diagonal entries (the peak memory of one chunk, never the
``n x n`` Jacobian); when the sparsity analysis shows a sparse pattern, inputs
that share no row or column of the symmetrised pattern share one JVP (a
distance-1 colouring, for the diagonal only; certified once against JAX: each
colour's JVP with random weights on its seed must scale every diagonal entry
it reads by that entry's own weight, as no other input of the colour may reach
it). Estimated: Hutchinson's
``E[z^T J z] = tr(J)`` for probes with ``E[z z^T] = I``, and Hutch++, which
takes the trace of a low-rank sketch exactly and estimates only the rest.
"""

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from . import _args, _deps, _memory, _sparse, _trust, kernels
from ._args import trace_flat
from ._walker import has_custom_vjp

ESTIMATORS = ("hutchinson", "hutch++", "xtrace")
SVD_MAX = 64  # XTrace sketches up to this many probes handle any rank by SVDs (beyond: R must be invertible)
PROBES = ("rademacher", "gaussian")
CHUNK_ENTRIES = 1 << 22  # default chunk: at most this many Jacobian entries held at once


@dataclasses.dataclass(frozen=True)
class _Options:
    """``divergence``'s options, checked once, and its plan cache."""

    mode: _args.Mode
    chunk_size: int | None
    plans: dict = dataclasses.field(default_factory=dict, repr=False)


@dataclasses.dataclass(frozen=True)
class _EstimateOptions:
    """``trace_estimate``'s options, checked once."""

    num_probes: int
    estimator: str
    probes: str
    holomorphic: bool


def _square(p: _args.Problem, where: str) -> None:
    if p.m != p.n:
        raise ValueError(
            f"{where}: a trace needs fun's input and output to have the same total size, but the input has "
            f"{p.n} entries and the output {p.m}."
        )


def _diagonal_colors(rows: np.ndarray, cols: np.ndarray, n: int) -> np.ndarray:
    """A distance-1 colouring of the graph with an edge j-k wherever J[j, k] or J[k, j] may be nonzero.

    A column colouring of the edge-incidence matrix (one row per edge, nonzeros at
    its two ends) is exactly that.
    """
    off = rows != cols
    a, b = rows[off], cols[off]
    edge = np.arange(a.size)
    return _sparse.coloring.color_columns(np.concatenate([edge, edge]), np.concatenate([a, b]), n)


def _complex_of_real(p: _args.Problem) -> bool:
    """Complex outputs of real inputs: their VJPs pull the real part only, no trace of ``J``."""
    return bool(jnp.issubdtype(p.out_dtype, jnp.complexfloating) and not jnp.issubdtype(p.x.dtype, jnp.complexfloating))


def _products(p: _args.Problem, seeds, mode: str, where: str):
    """``J s`` (forward) or ``s^T J`` (reverse) for each row ``s`` of ``seeds``; ``"auto"``: forward where JAX can."""

    def cast(s, dtype):  # 0/1 (or real weighted) seeds: their real part where the direction takes real values
        if jnp.iscomplexobj(s) and not jnp.issubdtype(dtype, jnp.complexfloating):
            s = jnp.real(s)
        return s.astype(dtype)

    def run(direction):  # the seeds in the dtype each direction takes: the input's, the output's
        if direction == "fwd":
            return jax.vmap(lambda s: jax.jvp(lambda x: p.flat(x)[0], (p.x,), (s,))[1])(cast(seeds, p.x.dtype))
        _, pull = jax.vjp(lambda x: p.flat(x)[0], p.x)
        return jax.vmap(lambda s: pull(s)[0])(cast(seeds, p.out_dtype))

    if _complex_of_real(p):  # reverse mode pulls the real part only (a forced mode="rev" raised in _compute)
        return run("fwd")
    return (_args.with_fallback(run, "fwd", "rev", "fwd", where, p.jaxpr) if mode == "auto"
            else _args.in_mode(where, mode, run, mode))


def _plan(t, spec, traced, n: int, mode: str) -> np.ndarray:
    """The colours of the inputs: a certified distance-1 colouring of the symmetrised pattern, or each its own."""
    where = t.where
    if n == 0:
        return np.arange(0)  # an empty trace: nothing to colour or certify
    avals = [jax.ShapeDtypeStruct(np.shape(a), a.dtype) for a in traced]
    traced_flat = trace_flat(t, spec, avals)
    try:  # a sparse pattern lets inputs share a JVP; stop early if the pattern is dense
        with _trust.stage("sparsity detection", passing=(_deps.TooDense,)):
            det = _sparse.detect_traced(t, *traced_flat, max_nnz=16 * n + 1024)
        with _trust.stage("colouring"):
            colors = _diagonal_colors(det.pattern.rows, det.pattern.cols, n)
        if n and int(colors.max()) + 1 == n:
            return colors  # every input its own JVP: nothing shared, nothing to certify
        with _trust.stage("certificate"):
            cert = _certify(traced_flat, _trust.concrete(traced) or _trust.call_values(spec, t), colors, mode, where)
    except _deps.TooDense:
        return np.arange(n)
    except _trust.AnalysisError as e:
        _trust.analysis_failed(where, e)
        return np.arange(n)
    if cert.failed:
        _trust.certificate_failed(where, f"divergence's colouring ({int(colors.max()) + 1} colours)", cert.detail)
        return np.arange(n)
    return colors


def _certify(traced_flat, values, colors: np.ndarray, mode: str, where: str) -> "_trust.Certificate":
    """Each colour's product read at its diagonal entries, with seed weights ``v``, must be ``v_j`` times unweighted.

    Row ``j`` of ``J (s_c * v)`` is ``v_j J[j, j]`` plus the other inputs of colour ``c`` that reach output
    ``j`` (none if the colouring is right) with their own weights: one random ``v``, ``2c`` products.
    """
    c = int(colors.max()) + 1
    seeds = (colors[None, :] == np.arange(c)[:, None])
    j = np.arange(colors.size)

    def program(p, T, leaves):
        s = kernels.opaque(jnp.asarray(seeds, p.x.dtype))
        return (_products(p, jnp.concatenate([s, s * T[:1]]), mode, where),)

    def judge(outs, T, tol):
        (prod,) = outs
        plain, weighted = prod[:c][colors, j], prod[c:][colors, j]
        expected = T[0] * plain
        return _trust.compare(weighted, expected, np.abs(weighted), tol, "diagonal entry")

    return _trust.certify(traced_flat, values, program, judge, "JVPs with weighted colour seeds",
                          lambda rng, p: rng.standard_normal((1, p.n)).astype(p.x.dtype))


def _compute(t, spec, opts, *traced):
    where = t.where
    p = _args.problem(t.fun, spec, traced, where=where, int_argnums=t.int_argnums)
    _square(p, where)
    if opts.mode == "rev" and _complex_of_real(p):  # reverse mode would keep the real part only
        raise _args.complex_rev_error(where)
    n = p.n
    key = (spec, tuple((np.shape(a), np.dtype(a.dtype)) for a in traced))
    colors = opts.plans.get(key)
    if colors is None:
        colors = opts.plans[key] = _plan(t, spec, traced, n, opts.mode)
    n_colors = int(colors.max()) + 1 if n else 0
    chunk = opts.chunk_size or max(1, CHUNK_ENTRIES // max(n, 1))
    chunk = min(chunk, max(n_colors, 1))
    seeds_all = np.asarray(colors[None, :] == np.arange(n_colors)[:, None], bool)  # (c, n)
    # Each diagonal entry j is read from the product with its colour's seed.
    picks = colors  # product row colors[j], entry j

    def products(seeds):  # (k, n) seeds -> (k, n) products J s (fwd) or s^T J (rev)
        return _products(p, seeds, opts.mode, where)

    dtype = _args.promote(p.out_dtype, p.x.dtype)
    if chunk >= n_colors:
        prod = products(kernels.opaque(jnp.asarray(seeds_all, dtype)))  # not folded with closed-over weights
        return jnp.sum(prod[picks, jnp.arange(n)]).astype(dtype)
    n_chunks = -(-n_colors // chunk)
    pad = n_chunks * chunk - n_colors
    seeds_pad = np.concatenate([seeds_all, np.zeros((pad, n), bool)])
    seeds_pad = kernels.opaque(jnp.asarray(seeds_pad.reshape(n_chunks, chunk, n), dtype))
    # Per chunk: the entries j whose colour lies in the chunk, read from the chunk's products.
    owner = picks // chunk
    local = picks % chunk

    def body(i, acc):
        prod = products(seeds_pad[i])  # (chunk, n)
        vals = prod[jnp.asarray(local), jnp.arange(n)]
        return acc + jnp.sum(jnp.where(jnp.asarray(owner) == i, vals, 0))

    return jax.lax.fori_loop(0, n_chunks, body, jnp.zeros((), dtype))


def divergence(
    fun: Callable, argnums: int | tuple[int, ...] = 0, *, mode: str = "auto", chunk_size: int | None = None,
    max_memory: int | str | None = None,
) -> Callable:
    """The divergence ``tr(d fun / d x)`` of a square map, exactly, without the ``n x n`` Jacobian.

    The sum of the diagonal of the Jacobian (numerator layout, flattened
    row-major for tensor or pytree arguments). Chunks of JVPs keep only their
    diagonal entries; a sparse pattern (detected once per call structure) lets
    inputs share JVPs.

    Args:
      fun: a map whose output has as many entries as the differentiated arguments.
      argnums: an int or a tuple of ints.
      mode: ``"fwd"`` (JVPs), ``"rev"`` (VJPs) or ``"auto"`` (forward, reverse
        where a ``custom_vjp`` forbids it).
      chunk_size: at most this many JVPs at once (default: about 4M Jacobian
        entries' worth).
      max_memory: a memory budget (bytes, or ``"2GB"``): the chunk size that fits, by XLA's
        memory analysis (as :func:`jacobians.jacobian`); not with ``chunk_size``.

    Returns:
      A function returning the scalar divergence.

    Raises:
      ValueError: input and output sizes differ.

    Example::

      >>> jacobians.divergence(lambda x: x ** 2)(jnp.array([1.0, 2.0, 3.0]))
      Array(12., dtype=float32)
    """
    where = "jacobians.divergence"

    def make(c):
        opts = _Options(_args.check_mode(mode, where), _args.check_chunk_size(c, where))
        return _trust.wrap(_args.Transform.jitted(fun, argnums, where, _compute, opts))

    return _memory.transform(make, chunk_size, max_memory, where)


def _probes(key, shape, kind, dtype):
    """Real probes (Rademacher or Gaussian, ``E[z z^T] = I``) in ``dtype`` (complex: real parts only)."""
    real = jnp.finfo(dtype).dtype
    z = jax.random.rademacher(key, shape, real) if kind == "rademacher" else jax.random.normal(key, shape, real)
    return z.astype(dtype)


def _check_complex(diff: tuple, positions: tuple, where: str, holomorphic: bool) -> None:
    """Complex differentiated leaves need ``holomorphic=True``: only a complex-linear ``J`` has a complex trace."""
    if holomorphic:
        return
    for i, arg in zip(positions, diff, strict=True):
        for path, leaf in jax.tree_util.tree_flatten_with_path(arg)[0]:
            if not jnp.issubdtype(leaf.dtype, jnp.complexfloating):
                continue
            raise TypeError(
                f"{where}: argument {i}{jax.tree_util.keystr(path)} has dtype {leaf.dtype}. A trace of a function "
                "of complex inputs is the trace of its complex Jacobian, which exists for a holomorphic function: "
                "pass holomorphic=True (a non-holomorphic map of complex inputs has no complex Jacobian; "
                "differentiate its real and imaginary parts as real inputs instead)."
            )


def _estimate(t, spec, opts, key, *traced):
    where = t.where
    _, _, diff = spec.rebuild(traced)
    _check_complex(diff, spec.positions, where, opts.holomorphic)
    p = _args.problem(t.fun, spec, traced, where=where, int_argnums=t.int_argnums, holomorphic=opts.holomorphic)
    _square(p, where)
    n, k = p.n, opts.num_probes
    dtype = _args.promote(p.out_dtype, p.x.dtype)
    if n == 0:  # the empty trace is 0, exactly, whatever the estimator
        return jnp.zeros((), dtype), jnp.zeros((), jnp.finfo(dtype).dtype)
    f = lambda x: p.flat(x)[0].astype(dtype)  # noqa: E731
    # tr(J) = tr(J^T): estimate with J (JVPs) or, where a custom_vjp forbids forward mode, J^T (VJPs).
    if has_custom_vjp(jax.make_jaxpr(f)(p.x)):
        _, pull = jax.vjp(f, p.x)
        apply = jax.vmap(lambda v: pull(v)[0].astype(dtype))
    elif jnp.issubdtype(dtype, jnp.complexfloating) and not jnp.issubdtype(p.x.dtype, jnp.complexfloating):
        # Real inputs, complex outputs: J is real-linear, J v = J Re(v) + i J Im(v) for the complex sketches.
        def jv(v):
            return jax.jvp(f, (p.x,), (v,))[1]

        apply = jax.vmap(lambda v: jv(jnp.real(v).astype(p.x.dtype)) + 1j * jv(jnp.imag(v).astype(p.x.dtype)))
    else:
        apply = jax.vmap(lambda v: jax.jvp(f, (p.x,), (v.astype(p.x.dtype),))[1])
    if opts.estimator == "hutchinson":
        Z = _probes(key, (k, n), opts.probes, dtype)
        samples = jnp.einsum("kn,kn->k", Z, apply(Z))
        return jnp.mean(samples), _stderr(samples)
    if opts.estimator == "xtrace":
        return _xtrace(apply, key, n, k // 2, opts.probes, dtype)
    # Hutch++: a third of the probes sketch the range, a third take the sketch's trace exactly,
    # a third estimate the trace of what the sketch leaves out.
    s = max(1, k // 3)
    r = max(1, k - 2 * s)
    k1, k2 = jax.random.split(key)
    S = _probes(k1, (s, n), opts.probes, dtype)
    Q, _ = jnp.linalg.qr(apply(S).T)  # (n, s)
    exact = jnp.trace(Q.conj().T @ apply(Q.T).T)
    G = _probes(k2, (r, n), opts.probes, dtype)
    Gp = G - (G @ Q.conj()) @ Q.T  # project out the sketch: rows (I - Q Q^H) g
    samples = jnp.einsum("kn,kn->k", Gp.conj(), apply(Gp))
    return exact + jnp.mean(samples), _stderr(samples)


def _xtrace(apply, key, n: int, m: int, kind: str, dtype):
    """XTrace (Epperly, Tropp and Webber): ``2 m`` products, every probe used both to sketch and to estimate.

    With probes ``w_1..w_m`` and ``Y = J W``, estimate ``i`` takes the trace of ``J``
    on the range of the other ``m - 1`` sketch columns exactly, and Hutchinson with
    probe ``w_i`` on the rest: ``t_i = tr(P_i J) + v_i^H J v_i``, ``v_i = (I - P_i) w_i``,
    ``P_i`` the orthogonal projector onto ``range(Y_{-i})``. Each ``t_i`` is
    unbiased (``P_i`` is independent of ``w_i``); their mean is the estimate and
    ``std / sqrt(m)`` its standard error. Exact when ``rank(J) < m`` (for ``m > n``:
    ``n`` JVPs of the identity, error zero). The ``m``
    leave-one-out projectors come from one QR ``Y = Q R``: ``range(Y_{-i})`` is
    ``Q`` times the complement of the unit vector ``s_i`` orthogonal to every
    column of ``R`` but the ``i``-th (``s_i`` is row ``i`` of ``R^{-1}``,
    conjugated), so ``J P_i`` needs only ``J Q`` (``m`` more products).
    """
    if m > n:  # the other probes' sketch spans everything: every estimate is the exact trace, from n JVPs
        exact = jnp.trace(apply(jnp.eye(n, dtype=dtype)))
        return exact, jnp.zeros((), jnp.finfo(dtype).dtype)
    Om = _probes(key, (m, n), kind, dtype)  # (m, n): the probes as rows
    Y = apply(Om)  # rows J w_i
    Q, R = jnp.linalg.qr(Y.T)  # (n, m), (m, m)
    Z = apply(Q.T).T  # (n, m): J Q
    H = Q.conj().T @ Z  # Q^H J Q
    W = Om @ Q.conj()  # (m, m): row i is Q^H w_i

    def estimates(U, trace_PJ):  # rows u_i = Q^H P_i w_i (P_i w_i in Q's coordinates), and tr(P_i J)
        def one(u, om, y, t):
            v = om - Q @ u  # (I - P_i) w_i
            return t + jnp.vdot(v, y - Z @ u)  # tr(P_i J) + v^H J v
        return jax.vmap(one)(U, Om, Y, trace_PJ)

    def downdated(R):  # R invertible: P_i = I - s_i s_i^H, s_i the unit row i of R^{-1} (conjugated); O(m^2) each
        S = jax.scipy.linalg.solve_triangular(R, jnp.eye(m, dtype=R.dtype), lower=False).conj()
        S = S / jnp.linalg.norm(S, axis=1, keepdims=True).astype(S.dtype)
        u = W - S * jnp.sum(S.conj() * W, axis=1, keepdims=True)  # rows (I - s s^H) Q^H w_i
        return estimates(u, jnp.trace(H) - jnp.einsum("ij,jk,ik->i", S.conj(), H, S))

    def projected(R):  # any rank: P_i by an SVD of R without its i-th column; O(m^3) each
        M = _projected(R)
        return estimates(jnp.einsum("ijk,ik->ij", M, W), jnp.einsum("ijk,kj->i", M, H))

    if m <= SVD_MAX:
        samples = jax.lax.cond(_full_rank(R), downdated, projected, R)
    else:  # (m SVDs of m x m cost more than the products: exactly equal probes at this many are vanishingly rare)
        samples = downdated(R)
    # Two probes equal up to sign (Rademacher, small n) give equal estimates: their spread says nothing.
    G = jnp.abs(Om @ Om.conj().T) ** 2  # Cauchy-Schwarz with equality (exact in Rademacher's integers)
    d = jnp.diagonal(G) ** 0.5
    twins = jnp.any((G >= d[:, None] * d[None, :]) & ~jnp.eye(m, dtype=bool))
    estimate, stderr = jnp.mean(samples), _stderr(samples)
    # The leave-one-out spread can miss the error altogether (Rademacher probes of a diagonal J: equal
    # estimates, all off by a lot). Hutchinson's estimate from the same probes (w_i^H J w_i, no product
    # more) is unbiased too: a gap between the two beyond its own standard errors is error XTrace did not see.
    hutch = jnp.sum(Om.conj() * Y, axis=1)
    stderr = jnp.maximum(stderr, jnp.abs(estimate - jnp.mean(hutch)) - 2 * _stderr(hutch))
    return estimate, jnp.where(twins, jnp.inf, stderr)


def _full_rank(R) -> jax.Array:
    """Whether the triangular ``R`` of the sketch is numerically of full rank (its diagonal against its scale)."""
    d = jnp.abs(jnp.diagonal(R))
    return jnp.min(d) > R.shape[0] * jnp.finfo(R.dtype).eps * jnp.max(d)


def _projected(R):
    """The projector onto the span of ``R``'s columns but the ``i``-th, per ``i``, by SVDs: any rank.

    Where a probe's sketch column lies in the span of the others (Rademacher probes equal up to sign at
    small ``n``, or ``rank(J)`` below the probes), removing it removes nothing: ``P_i`` is the whole range.
    """
    m = R.shape[0]

    def one(i):
        U, sv, _ = jnp.linalg.svd(jnp.where((jnp.arange(m) == i)[None, :], jnp.zeros((), R.dtype), R))
        keep = (sv > m * jnp.finfo(R.dtype).eps * jnp.max(jnp.abs(R))).astype(U.dtype)
        return (U * keep[None, :]) @ U.conj().T

    return jax.vmap(one)(jnp.arange(m))


def _stderr(samples):
    k = samples.shape[0]
    real = jnp.finfo(samples.dtype).dtype
    if k < 2:
        return jnp.asarray(jnp.inf, real)
    return (jnp.std(samples, ddof=1) / math.sqrt(k)).astype(real)


def trace_estimate(
    fun: Callable,
    argnums: int | tuple[int, ...] = 0,
    *,
    num_probes: int,
    estimator: str = "hutchinson",
    probes: str = "rademacher",
    holomorphic: bool = False,
) -> Callable:
    """An unbiased estimate of ``tr(d fun / d x)`` and its standard error, from ``num_probes`` JVPs.

    Hutchinson: ``mean_i z_i^T J z_i`` over probes with ``E[z z^T] = I``
    (Rademacher or Gaussian), standard error ``std / sqrt(num_probes)``.
    Hutch++ spends a third of the probes on a sketch ``Q`` of ``J``'s range, a
    third on ``tr(Q^T J Q)`` exactly, and the rest on Hutchinson for the
    remainder: far lower variance when ``J`` has a few large eigenvalues.
    XTrace (Epperly, Tropp and Webber, exchangeable) uses every probe both to
    sketch and to estimate: ``num_probes // 2`` probes sketch ``Y = J W``, as many
    JVPs give ``J Q`` for ``Y = Q R``, and each probe's estimate takes the trace on
    the other probes' sketch exactly and Hutchinson on the rest; the standard
    error is that of the ``num_probes // 2`` estimates (``inf`` where two probes are
    equal up to sign, which Rademacher probes are with probability ``2^(1 - n)`` a pair:
    their estimates are then equal and say nothing of the spread), and at least the gap
    to the same probes' Hutchinson estimate beyond twice its own standard error (Rademacher
    probes of a diagonal ``J`` give equal estimates, all off by O(1)). Exact (up to
    rounding) when ``rank(J) < num_probes // 2``, a sketch of any rank handled (its
    leave-one-out projectors by SVDs where ``R`` is singular); lower variance than
    Hutch++ for the same JVPs.
    The probes' JVPs are batched in one call (two for Hutch++ and XTrace); the
    result is deterministic for a key.

    Args:
      fun: a square map.
      argnums: an int or a tuple of ints.
      num_probes: the number of JVPs (>= 1; >= 3 for ``"hutch++"``, >= 4 for
        ``"xtrace"``, which uses an even number: ``2 * (num_probes // 2)``).
      estimator: ``"hutchinson"``, ``"hutch++"`` or ``"xtrace"``.
      probes: ``"rademacher"`` or ``"gaussian"`` (real probes, also for complex ``J``).
      holomorphic: ``fun`` is holomorphic in complex inputs: estimate the trace of
        its complex Jacobian (complex estimate, real standard error).

    Returns:
      A function ``(*args, key, **kwargs) -> (estimate, standard_error)``; ``key``
      (a ``jax.random`` key) is keyword-only and required.

    Example::

      >>> est, err = jacobians.trace_estimate(lambda x: 2 * x, num_probes=4)(jnp.ones(3), key=jax.random.key(0))
      >>> float(est)
      6.0
    """
    where = "jacobians.trace_estimate"
    if isinstance(num_probes, bool) or not isinstance(num_probes, int | np.integer) or num_probes < 1:
        raise ValueError(f"{where}: num_probes must be a positive int, got {num_probes!r}.")
    estimator = _args.check_choice(estimator, "estimator", ESTIMATORS, where)
    probes = _args.check_choice(probes, "probes", PROBES, where)
    if estimator == "hutch++" and num_probes < 3:
        raise ValueError(f"{where}: estimator='hutch++' needs num_probes >= 3, got {num_probes}.")
    if estimator == "xtrace" and num_probes < 4:
        raise ValueError(
            f"{where}: estimator='xtrace' needs num_probes >= 4 (two probes sketch and two estimate), got {num_probes}."
        )
    holomorphic = _args.check_bool(holomorphic, "holomorphic", where)
    opts = _EstimateOptions(int(num_probes), estimator, probes, holomorphic)
    t = _args.Transform.jitted(fun, argnums, where, _estimate, opts)

    @functools.wraps(fun)
    def estimate(*args, key=None, **kwargs):
        if key is None:
            raise TypeError(f"{where}: the returned function needs a PRNG key: call it as f(x, key=jax.random.key(0)).")
        fn, traced, _ = t.compiled(args, kwargs)
        try:
            return fn(key, *traced)
        except _args.TRACER_ERRORS as e:
            raise _args.TracedControlFlowError(where, e) from e
        except Exception as e:
            problem = _key_problem(key)
            if problem is None:
                raise
            raw = jax.eval_shape(jax.random.PRNGKey, 0)  # the default implementation's raw key: uint32[2]
            raise TypeError(
                f"{where}: key must be one PRNG key, a typed key from jax.random.key(seed) or a raw "
                f"{raw.dtype}{list(raw.shape)} key from jax.random.PRNGKey(seed), got {problem}."
            ) from e

    return estimate


def _key_problem(key) -> str | None:
    """What is wrong with ``key`` as one ``jax.random`` key (what it is), or ``None`` where JAX takes it.

    Asked only after a call failed: a valid key costs nothing.
    """
    dtype, shape = getattr(key, "dtype", None), getattr(key, "shape", None)
    if dtype is None or shape is None:
        shown = repr(key)
        return f"{type(key).__name__} ({shown})" if len(shown) <= 40 else type(key).__name__
    described = f"an array {dtype}{list(shape)}"
    try:
        jax.eval_shape(lambda k: jax.random.normal(k, ()), key)
    except Exception as e:  # noqa: BLE001 - JAX refused it as a key: say what came
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if (jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key) and shape) or "single key" in first:
            return f"{described}, a batch of keys (pass one key, or jax.vmap over the keys)"
        return f"{described} (JAX said: {first.split(' for impl=')[0]})"
    return None
