"""Rules for ``dot_general`` and the linear-algebra primitives."""

import math

import numpy as np

from .._walker import Walker
from ._sets import building, compose, everything, from_coo, gather, reduce_to, runs, union

JOIN_MAX = 1 << 25  # largest join through a constant operand before a product counts as dense
SPARSE_JOIN = 1 << 20  # joins larger than this go through one sparse matrix product (when it has fewer links)

# Matrix factorisations and solves: dense within one matrix, independent across batch dimensions.
BATCHED_DENSE = ("lu", "qr", "householder_product", "geqrf", "geqp3",
                 "eigh", "eig", "svd", "schur", "hessenberg", "tridiagonal")


def dot_general(lat, eqn, ins):
    """``dot_general``: output (b, m, n) depends on row (b, m, :) of lhs and column (b, :, n) of rhs.

    A constant operand keeps its zeros: with ``A`` known, ``A @ x`` has row
    ``i`` depend on exactly the ``x[k]`` with ``A[i, k] != 0`` (stencils
    written as matrix products stay sparse). Example: ``[[1, 0], [1, 1]] @``
    sets [{0}, {1}] -> [{0}, {0, 1}]. Reads ``dimension_numbers``.
    """
    lhs, rhs = ins
    shape = eqn.outvars[0].aval.shape
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    lf = [i for i in range(len(lhs.shape)) if i not in lc and i not in lb]
    rf = [i for i in range(len(rhs.shape)) if i not in rc and i not in rb]
    b = math.prod(lhs.shape[i] for i in lb)
    m = math.prod(lhs.shape[i] for i in lf)
    k = math.prod(lhs.shape[i] for i in lc)
    n = math.prod(rhs.shape[i] for i in rf)
    # Each operand's axes grouped as lhs (b, m, k) and rhs (b, k, n).
    lgroups, rgroups = (tuple(lb), tuple(lf), tuple(lc)), (tuple(rb), tuple(rc), tuple(rf))
    parts = []
    for dep, other, groups, other_groups, is_lhs in ((lhs, rhs, lgroups, rgroups, True),
                                                     (rhs, lhs, rgroups, lgroups, False)):
        if dep.nnz:
            parts.append(_dot_part(lat, dep, other, groups, other_groups, is_lhs, (b, m, k, n), shape))
    return [union(parts, shape, lat.n)]


def _grouped(elems: np.ndarray, shape: tuple, groups: tuple) -> list[np.ndarray]:
    """The flat index of each element within each group of axes (row-major over the group's axes, as listed).

    Only the elements asked for are visited: a product whose operand has few
    sets (detection on a sample of columns) costs what those sets cost.
    """
    coords = np.unravel_index(elems, shape) if shape else ()  # a scalar operand has no axes to group
    out = []
    for axes in groups:
        if not axes:
            out.append(np.zeros(elems.shape, np.int64))
        else:
            out.append(np.ravel_multi_index(tuple(coords[a] for a in axes), tuple(shape[a] for a in axes)))
    return out


def contraction_groups(lhs_shape, rhs_shape, dimension_numbers) -> tuple[np.ndarray, np.ndarray, int]:
    """The (batch, contracted) position ``b * K + k`` of every lhs and rhs element of a ``dot_general``.

    Two elements are multiplied together only if they share it (the second-order
    lattice crosses the operands' sets group by group). Example: ``x @ y`` with
    ``x`` (2, 3) and ``y`` (3,) -> lhs groups [0, 1, 2, 0, 1, 2], rhs [0, 1, 2].

    Returns:
      ``(lhs_keys, rhs_keys, groups)``: keys of shapes ``(lhs.size,)`` and ``(rhs.size,)``, in ``[0, groups)``.
    """
    (lc, rc), (lb, rb) = dimension_numbers
    coords_l = np.indices(lhs_shape).reshape(len(lhs_shape), math.prod(lhs_shape))
    coords_r = np.indices(rhs_shape).reshape(len(rhs_shape), math.prod(rhs_shape))
    sizes = [lhs_shape[i] for i in lb] + [lhs_shape[i] for i in lc]
    if not sizes:
        return np.zeros(coords_l.shape[1], np.int64), np.zeros(coords_r.shape[1], np.int64), 1
    lk = np.ravel_multi_index(tuple(coords_l[list(lb) + list(lc)]), sizes)
    rk = np.ravel_multi_index(tuple(coords_r[list(rb) + list(rc)]), sizes)
    return lk.astype(np.int64), rk.astype(np.int64), math.prod(sizes)


def _dot_part(lat, dep, other, groups, other_groups, is_lhs, bmkn, shape):
    b_, m_, k_, n_ = bmkn
    rows = dep.rows()
    # Position of each set of `dep` as (b, free, k).
    if is_lhs:
        rb, rf, rk = _grouped(rows, dep.shape, groups)
    else:
        rb, rk, rf = _grouped(rows, dep.shape, groups)
    if other.const is None or other.nnz or np.all(other.const != 0):
        # Every k reaches every output of its row: union over k, then broadcast.
        free = m_ if is_lhs else n_
        u = from_coo((b_, free), rb * free + rf, dep.indices, lat.n)
        bb, mm, nn = np.unravel_index(np.arange(b_ * m_ * n_), (b_, m_, n_))
        target = bb * free + (mm if is_lhs else nn)
        budget = getattr(lat, "max_nnz", None)
        if budget is not None and int(np.diff(u.indptr)[target].sum()) > budget:
            from . import TooDense  # noqa: PLC0415 - the package imports this module

            raise TooDense("dot_general")  # before building a set the planner would throw away
        return gather(u, target.reshape(shape))
    # A constant partner: join on k through its nonzeros.
    other_shape = (b_, k_, n_) if is_lhs else (b_, m_, k_)
    vals = np.transpose(np.asarray(other.const), [a for g in other_groups for a in g]).reshape(other_shape)
    if is_lhs:
        ob, ok, on = np.nonzero(vals)  # (b, k, n)
    else:
        ob, on, ok = np.nonzero(vals)  # (b, m, k)
    key = ob * k_ + ok
    order = np.argsort(key, kind="stable")
    key, on = key[order], on[order]
    ptr = np.searchsorted(key, np.arange(b_ * k_ + 1))
    q = rb * k_ + rk
    cnt = ptr[q + 1] - ptr[q]
    join = int(cnt.sum())
    if join > JOIN_MAX:
        return everything([dep], shape)
    if join > SPARSE_JOIN and (m_ if is_lhs else n_) * key.size < join:
        return _dot_sparse(lat, dep, groups, *np.divmod(key, k_), on, is_lhs, bmkn, shape)  # (sorted by key)
    rep, k = runs(cnt)
    start = ptr[q][rep] + k
    partner = on[start]
    out = (rb[rep] * m_ + rf[rep]) * n_ + partner if is_lhs else (rb[rep] * m_ + partner) * n_ + rf[rep]
    return from_coo(shape, out, dep.indices[rep], lat.n)


def _dot_sparse(lat, dep, groups, ob, ok, on, is_lhs, bmkn, shape):
    """The join through a constant partner as one sparse product (SciPy): ``sets(out) = E @ sets(dep)``.

    ``E`` links each output element to the operand elements its nonzero partner entries
    multiply: ``m * nnz(partner)`` links where the element-by-element join builds one pair
    per (stored index, partner entry) and deduplicates them by sorting (a masked layer of a
    MADE with 512 hidden units: 16M pairs, about 0.8 s; the product takes a fraction).
    """
    b_, m_, k_, n_ = bmkn
    free = m_ if is_lhs else n_
    # The flat index in dep's own shape of each (b, free, k) element (is_lhs) or (b, k, free) element.
    axes = [a for g in groups for a in g]
    order = np.arange(dep.size).reshape(dep.shape).transpose(axes).reshape((b_, m_, k_) if is_lhs else (b_, k_, n_))
    f = np.arange(free)
    src = order[ob[:, None], f[None, :], ok[:, None]] if is_lhs else order[ob[:, None], ok[:, None], f[None, :]]
    dst = ((ob[:, None] * m_ + f[None, :]) * n_ + on[:, None] if is_lhs
           else (ob[:, None] * m_ + on[:, None]) * n_ + f[None, :])
    return compose(shape, dst.ravel(), src.ravel(), dep, lat.n)


def batched_dense(lat, eqn, ins):
    """Factorisations and solves: every output of matrix ``b`` depends on all of matrix ``b``'s inputs.

    The batch dimensions are those of the first operand's matrices (of its
    vectors for ``tridiagonal_solve``) and must lead every operand and result
    (singular values, eigenvalues and pivots included); otherwise everything
    reaches everything. Example: ``cholesky``
    of a (2, 3, 3) stack: each output of matrix 0 depends on all nine inputs
    of matrix 0 and on none of matrix 1. Reads no parameters.
    """
    # The first operand is the (batch of) matrices; tridiagonal_solve's first operand is a diagonal.
    first = eqn.invars[0].aval.shape
    batch = tuple(first[: max(len(first) - (1 if eqn.primitive.name == "tridiagonal_solve" else 2), 0)])
    nb = len(batch)
    parts = []
    for d in ins:
        if not d.nnz:
            continue
        if tuple(d.shape[:nb]) != batch:
            return [everything(ins, v.aval.shape) for v in eqn.outvars]
        per = math.prod(d.shape[nb:])
        parts.append(from_coo(batch, d.rows() // max(per, 1), d.indices, lat.n))
    sets = union(parts, batch, lat.n)
    outs = []
    for v in eqn.outvars:
        shape = v.aval.shape
        if tuple(shape[:nb]) != batch:
            return [everything(ins, u.aval.shape) for u in eqn.outvars]
        per = math.prod(shape[nb:])
        outs.append(gather(sets, (np.arange(math.prod(shape)) // max(per, 1)).reshape(shape)))
    return outs


TRIANGLE_LINKS_MAX = 1 << 24  # (row, matrix entry) links a triangular solve may list; past: each row reads a's batch


def triangular_solve(lat, eqn, ins):
    """``triangular_solve(a, b)``: ``x`` with ``op(a) x = b`` (``left_side``) or ``x op(a) = b``, by substitution.

    With ``E`` the triangular matrix the substitution runs on (``op(a)``, or its transpose
    for a right-side solve) and ``reach(i)`` the indices ``j <= i`` (``E`` lower) or
    ``j >= i`` (upper): entry ``i`` of a solution (a column of ``x``, left side; a row,
    right side) reads the entries ``reach(i)`` of its own right-hand side, and the rows
    ``p`` in ``reach(i)`` of ``E``'s triangle (``q`` in ``reach(p)``, the diagonal
    unless ``unit_diagonal``), as JAX differentiates it: its JVP masks ``a``'s tangent
    to the triangle the primitive reads. Batch dimensions stay apart. Example: lower,
    left, ``b`` (3, 1): ``x[1]`` reads ``b[0], b[1]`` and ``a[0, 0], a[1, 0], a[1, 1]``.
    Reads ``left_side``, ``lower``, ``transpose_a`` and ``unit_diagonal``.
    """
    a, b = ins
    p = eqn.params
    shape = eqn.outvars[0].aval.shape
    m = eqn.invars[0].aval.shape[-1]
    r, c = shape[-2:]
    size = math.prod(shape)
    if size == 0 or m == 0:
        return [union([], shape, lat.n)]
    nbatch = size // (r * c)
    left = bool(p["left_side"])
    lower = bool(p["lower"]) != bool(p["transpose_a"]) if left else bool(p["lower"]) == bool(p["transpose_a"])
    # (i, j) with j in reach(i), and the flat index in x (and b) of solve entry i on line l of batch t.
    i_of, j_of = np.tril_indices(m) if lower else np.triu_indices(m)
    lines = c if left else r

    def flat(t, i, line):
        return (t * r + i) * c + line if left else (t * r + line) * c + i

    parts = []
    if b.nnz:
        t, line = np.divmod(np.arange(nbatch * lines), lines)
        dst = flat(t[:, None], i_of[None, :], line[:, None]).ravel()
        src = flat(t[:, None], j_of[None, :], line[:, None]).ravel()
        building(dst.size, "triangular_solve")
        parts.append(compose(shape, dst, src, b, lat.n))
    if a.nnz:
        # E's triangle as a's flat entries, by row p (q in reach(p)); solve entry i reads rows reach(i).
        keep = i_of != j_of if p["unit_diagonal"] else np.ones(i_of.size, bool)
        ep, eq = i_of[keep], j_of[keep]
        entry = ep * m + eq if left != bool(p["transpose_a"]) else eq * m + ep
        per_row = np.bincount(ep, minlength=m)
        # Rows reach(i) are a prefix (lower: rows 0..i) or a suffix (upper: rows i..m-1) of the triangle's rows.
        ends = np.cumsum(per_row)
        starts = np.zeros(m, np.int64) if lower else ends - per_row
        counts = (ends if lower else np.full(m, ends[-1])) - starts
        links = nbatch * int(counts.sum())
        if links > TRIANGLE_LINKS_MAX:  # each row reads its batch's whole matrix (sound; the rows still apart)
            rows = reduce_to(a, np.arange(a.size) // (m * m), (nbatch,), lat.n)
            key = np.repeat(np.arange(nbatch), m)
        else:
            building(links, "triangular_solve")
            order = np.argsort(ep, kind="stable")  # the triangle's entries grouped by row p, ascending
            entry = entry[order]
            own, k = runs(counts)
            pos = starts[own] + k
            t = np.repeat(np.arange(nbatch), own.size)
            dst = t * m + np.tile(own, nbatch)
            src = t * (m * m) + np.tile(entry[pos], nbatch)
            rows = compose((nbatch * m,), dst, src, a, lat.n)
            key = np.arange(nbatch * m)
        flat_i = np.arange(size)
        t, rest = np.divmod(flat_i, r * c)
        i = rest // c if left else rest % c
        parts.append(gather(rows, key[t * m + i].reshape(shape)))
    return [union(parts, shape, lat.n)]


def cholesky(lat, eqn, ins):
    """``cholesky``: ``L[i, j]`` (``j <= i``) reads the rectangle ``a[p, q]``, ``p <= i``, ``q <= j``.

    JAX's JVP is ``L phi(L^-1 da L^-T)`` (``phi``: the lower triangle, half its diagonal):
    entry ``(i, j)`` reads no tangent entry outside that rectangle (checked on JAX 0.8,
    0.10 and 0.12; some versions read fewer). ``jnp.linalg.cholesky`` symmetrises its
    input first, so there each entry reads the transposed rectangle too. The strict upper
    triangle of the primitive's result is not part of ``L`` (LAPACK leaves the input there;
    JAX's JVP gives zero): each such entry reads its own input entry, sound for both. Batch
    dimensions stay apart. Example: ``L[2, 1]`` of a 3x3 ``a`` reads ``a[:3, :2]``. Reads
    no parameters.
    """
    (a,) = ins
    shape = eqn.outvars[0].aval.shape
    size = math.prod(shape)
    if not a.nnz or size == 0:
        return [union([], shape, lat.n)]
    m = shape[-1]
    nbatch = size // (m * m)
    i_of, j_of = np.tril_indices(m)
    pair, k = runs((i_of + 1) * (j_of + 1))  # row p = k // (j + 1), column q = k % (j + 1)
    building(nbatch * pair.size, "cholesky")
    up_i, up_j = np.triu_indices(m, 1)
    dst = np.concatenate([i_of[pair] * m + j_of[pair], up_i * m + up_j])
    src = np.concatenate([(k // (j_of[pair] + 1)) * m + k % (j_of[pair] + 1), up_i * m + up_j])
    t = np.repeat(np.arange(nbatch) * (m * m), dst.size)
    return [compose(shape, t + np.tile(dst, nbatch), t + np.tile(src, nbatch), a, lat.n)]


def tridiagonal_solve(lat, eqn, ins):
    """``tridiagonal_solve(dl, d, du, b)``: column ``c`` of ``x`` reads all of column ``c`` of ``b`` and the diagonals.

    Each right-hand side column is solved on its own (a ``vmap`` over examples that
    share the matrix makes them columns); within a column the inverse of a tridiagonal
    matrix is dense. Batch dimensions stay apart. Example: ``b`` (3, 2) with constant
    diagonals: ``x[:, 0]`` reads ``b[:, 0]`` only. Reads no parameters.
    """
    *diagonals, b = ins
    shape = eqn.outvars[0].aval.shape
    size = math.prod(shape)
    if size == 0:
        return [union([], shape, lat.n)]
    m, c = shape[-2:]
    nbatch = size // (m * c)
    t, rest = np.divmod(np.arange(size), m * c)
    parts = []
    if b.nnz:  # one set per (batch, column), gathered back along the column
        line = t * c + rest % c
        parts.append(gather(reduce_to(b, line, (nbatch * c,), lat.n), line.reshape(shape)))
    for v in diagonals:
        if v.nnz:
            per = reduce_to(v, np.arange(v.size) // max(v.size // nbatch, 1), (nbatch,), lat.n)
            parts.append(gather(per, t.reshape(shape)))
    return [union(parts, shape, lat.n)]


def linear_solve(lat, eqn, ins):
    """``custom_linear_solve`` (``jnp.linalg.solve``, ``jax.scipy.linalg.solve``): as JAX differentiates it.

    Its JVP is ``dx = solve(db - dA x)`` with ``x = solve(b)``: the solve's own
    jaxpr on the right-hand side, and the matvec's on ``x`` for the matrix's
    tangents. So the result reads what ``solve`` reads of ``b`` and of its
    constants, joined with what the same solve reads of ``b`` joined with
    ``matvec(x)``. A batched solve (a stack of matrices and right-hand sides)
    keeps every example to itself.
    """
    lengths, jaxprs = eqn.params["const_lengths"], eqn.params["jaxprs"]
    parts, k = {}, 0
    for name in ("matvec", "vecmat", "solve", "transpose_solve"):
        parts[name] = ins[k : k + getattr(lengths, name)]
        k += getattr(lengths, name)
    b = ins[k:]
    walker = Walker(lat)
    x = walker.run(jaxprs.solve, [*parts["solve"], *b])
    r = walker.run(jaxprs.matvec, [*parts["matvec"], *x[: len(b)]])
    rhs = [lat.join([bi, ri], v.aval) for bi, ri, v in zip(b, r, eqn.invars[k:], strict=True)]
    dx = walker.run(jaxprs.solve, [*parts["solve"], *rhs])
    return [lat.join([a, c], v.aval) for a, c, v in zip(x, dx, eqn.outvars, strict=True)]


RULES = {"dot_general": dot_general, "custom_linear_solve": linear_solve, "triangular_solve": triangular_solve,
         "cholesky": cholesky, "tridiagonal_solve": tridiagonal_solve}
RULES.update({name: batched_dense for name in BATCHED_DENSE})
