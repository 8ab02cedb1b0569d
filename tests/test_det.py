"""Jacobian determinants: the book's example, batches, singular cases (sharding: test_mesh.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import randn

import jacobians
from jacobians import _compat, kernels


def flow3(x):
    return jnp.stack([x[0] + jnp.sin(x[1]), x[1] * jnp.exp(0.1 * x[2]), x[2] + x[0] ** 2])


def test_book_example_5_61():
    f = lambda x: jnp.stack([-2 * x[0] + x[1], x[0] + x[1]])  # noqa: E731
    x = jnp.array([0.4, -1.3])
    np.testing.assert_allclose(jnp.abs(jacobians.det(f)(x)), 3.0, rtol=1e-14)
    sign, logabs = jacobians.slogdet(f)(x)
    assert sign == -1.0
    np.testing.assert_allclose(logabs, np.log(3.0), rtol=1e-14)
    np.testing.assert_allclose(jacobians.log_abs_det(f)(x), np.log(3.0), rtol=1e-14)


# One size per regime of the kernel (1x1; closed form; unrolled LU; LAPACK above 9 in float64); 2x2 goes
# through the pipeline in test_book_example_5_61, and every size through the kernel below.
@pytest.mark.parametrize("n", [1, 3, 5, 16, 40])
def test_batched_matches_numpy_loop(rng, n):
    W = randn(rng, (n, n)) / np.sqrt(n)
    f = lambda x: jnp.tanh(W @ x) + x  # noqa: E731
    xs = randn(rng, (7, n))
    sign, logabs = jacobians.slogdet(f, batched=True)(xs)
    assert sign.shape == logabs.shape == (7,)
    J = np.asarray(jax.jit(jax.vmap(jax.jacfwd(f)))(xs))  # JAX's Jacobians, NumPy's slogdet of each
    for i in range(7):
        s, l = np.linalg.slogdet(J[i])
        assert sign[i] == s
        np.testing.assert_allclose(logabs[i], l, rtol=1e-10, atol=1e-12)
    if n == 3:  # det's finish (sign * exp(logabs)) is the same at every size: one compile of it
        np.testing.assert_allclose(jacobians.det(f, batched=True)(xs), sign * np.exp(logabs), rtol=1e-12)


def test_float32(rng):
    xs = randn(rng, (9, 3), jnp.float32)
    got = jacobians.log_abs_det(flow3, batched=True)(xs)
    assert got.dtype == jnp.float32
    ref = np.linalg.slogdet(np.asarray(jax.jit(jax.vmap(jax.jacfwd(flow3)))(xs.astype(jnp.float64))))[1]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


def test_matrix_valued_map(rng):
    n = 3
    A = randn(rng, (n, n))
    X = randn(rng, (n, 4))
    # X -> AX on R^{n x 4}: the flattened Jacobian is kron(A, I_4), det = det(A)^4.
    np.testing.assert_allclose(jacobians.det(lambda X: A @ X)(X), jnp.linalg.det(A) ** 4, rtol=1e-10)
    np.testing.assert_allclose(
        jacobians.log_abs_det(lambda X: X @ A.T)(randn(rng, (5, n))),
        5 * np.log(abs(np.linalg.det(np.asarray(A)))),
        rtol=1e-10,
    )


# 1x1, a closed form, the unrolled LU (2x2 singular stacks: test_kernel_matches_references).
@pytest.mark.parametrize("n", [1, 3, 6])
def test_singular_gives_minus_inf(n):
    f = lambda x: x * jnp.arange(n, dtype=x.dtype)  # noqa: E731  (first entry has derivative 0)
    sign, logabs = jacobians.slogdet(f)(jnp.ones(n))
    assert sign == 0 and logabs == -np.inf
    if n == 1:  # det's finish of (0, -inf) is the same at every size: one compile of it
        assert jacobians.det(f)(jnp.ones(n)) == 0
    sign, logabs = jacobians.slogdet(lambda x: jnp.full(n, jnp.sum(x)))(jnp.ones(n))
    if n > 1:
        assert sign == 0 and logabs == -np.inf


# ---------------------------------------------------------------- the kernel

slogdet_jit = jax.jit(kernels.slogdet)


def _stack(rng, k, dtype):
    """One small stack of every kind of matrix the kernel must get right (one compile per k and dtype).

    Returns the stack and, per matrix, its kind and the reference (sign, logabsdet).
    """
    f64 = dtype == np.float64
    A = rng.standard_normal((4, k, k))
    Q1, Q2 = np.linalg.qr(rng.standard_normal((2, 2, k, k)))[0]
    ill = Q1 @ (np.logspace(0, -7 if f64 else -3, k)[:, None] * Q2)  # condition number 1e7 (1e3 in float32)
    zero_row, zero_col = rng.standard_normal((2, 2, k, k))
    zero_row[:, rng.integers(k), :] = 0
    zero_col[:, :, rng.integers(k)] = 0
    big = 1e200 if f64 else 1e25
    scaled = np.concatenate([A[:2] * big, A[2:] / big])
    row_scales = np.logspace(-150, 150, k) if f64 else np.logspace(-12, 12, k)
    rows = A[:2] * row_scales[:, None]  # rows of wildly different scales
    nan, tri, col = rng.standard_normal((3, 2, k, k))
    for M in nan:
        M[rng.integers(k), rng.integers(k)] = np.nan
    tri = np.triu(tri)
    for M in tri:
        j = rng.integers(k)
        M[j, j] = rng.choice([np.inf, -np.inf])
    for M in col:
        M[rng.integers(k), 0] = rng.choice([np.inf, -np.inf])
    one_inf = rng.standard_normal((2, k, k))  # an infinite entry past the first column: LU subtracted infinities
    for M in one_inf:
        M[rng.integers(k), k - 1] = rng.choice([np.inf, -np.inf])
    parts = dict(random=A, ill=ill, zero_row=zero_row, zero_col=zero_col, scaled=scaled, rows=rows, one_inf=one_inf)
    if f64:
        parts.update(nan=nan, tri_inf=tri, col0_inf=col)
    kinds = [name for name, M in parts.items() for _ in M]
    mats = np.concatenate(list(parts.values())).astype(dtype)
    # References: jnp.linalg.slogdet on finite matrices; NumPy's LAPACK on non-finite ones (jnp agrees
    # from 3x3 up; at 1x1 and 2x2 its closed form gives a NaN sign, and NaN for inf * 0); and
    # det(c A) = c^k det(A) where det itself under- or overflows (jnp's 2x2 closed form overflows).
    with np.errstate(invalid="ignore", over="ignore", under="ignore", divide="ignore"):
        rs, rl = (np.array(v) for v in jnp.linalg.slogdet(jnp.asarray(mats)))
        ns, nl = np.linalg.slogdet(mats)
        base_s, base_l = np.linalg.slogdet(A)
    for i, kind in enumerate(kinds):
        if kind in ("nan", "tri_inf", "col0_inf"):
            rs[i], rl[i] = ns[i], nl[i]
        if kind == "one_inf":  # det(F + t S) for t -> inf: +inf, the sign of the leading term
            M = mats[i].astype(np.float64)
            rs[i], rl[i] = np.linalg.slogdet(np.where(np.isinf(M), np.sign(M) * 1e30, M))[0], np.inf
    n = len(A)
    rs[kinds.index("scaled") :][:n], rl[kinds.index("scaled") :][:n] = (
        base_s,
        base_l + k * np.log(np.r_[[big] * 2, [1 / big] * 2]),
    )
    rs[kinds.index("rows") :][:2], rl[kinds.index("rows") :][:2] = base_s[:2], base_l[:2] + np.sum(np.log(row_scales))
    return mats, kinds, rs, rl


# Every regime of the kernel, at its boundaries: closed forms (1, 2, 3, 4: each its own code), the
# unrolled LU (5, 8), the looped LU on the CPU up to 9 in float64 and 14 in float32 (9: two groups of
# _GROUP=4 columns and a last group of one; 12: whole groups only), jnp.linalg.slogdet above (16 in
# float64, 25). float32 for each closed form and each LU (at its smallest size: the cheapest compile).
# "lapack": the LAPACK path called directly (the solver's batched LU and one cond for the limit, chunk by
# chunk), at a size a CPU run gives the looped LU.
@pytest.mark.parametrize(("k", "path"), [(1, "auto"), (2, "auto"), (3, "auto"), (4, "auto"), (5, "auto"),
                                         (8, "auto"), (9, "auto"), (12, "auto"), (16, "auto"), (25, "auto"),
                                         (9, "lapack"), (25, "lapack")])
def test_kernel_matches_references(rng, k, path):
    from jacobians.kernels import _det

    run = slogdet_jit if path == "auto" else jax.jit(_det._lapack)
    dtypes = (np.float32,) if k == 12 else (np.float64, np.float32) if k in (1, 2, 3, 4, 5, 9) else (np.float64,)
    for dtype in dtypes:
        mats, kinds, rs, rl = _stack(rng, k, dtype)
        s, l = (np.asarray(v) for v in run(jnp.asarray(mats)))
        assert s.dtype == l.dtype == dtype
        # log|det| is accurate to about eps * k * cond (LAPACK's is too).
        tol = 1e-9 if dtype == np.float64 else 5e-4
        for i, kind in enumerate(kinds):
            atol = tol * k * (1e4 if kind == "ill" and dtype == np.float64 else 1e2 if kind == "ill" else 1)
            if np.isnan(rl[i]):  # a NaN anywhere: NaN, with an unspecified sign (as in NumPy)
                assert np.isnan(l[i]), (kind, i, s[i], l[i])
                continue
            assert s[i] == rs[i], (kind, i, s[i], rs[i], l[i], rl[i])
            if np.isfinite(rl[i]):
                np.testing.assert_allclose(l[i], rl[i], rtol=tol, atol=atol, err_msg=f"{kind} {i}")
            else:
                assert l[i] == rl[i], (kind, i, l[i], rl[i])
        singular = np.isin(kinds, ["zero_row", "zero_col"])
        assert np.all(s[singular] == 0) and np.all(l[singular] == -np.inf)  # exactly singular: sign 0, -inf
        if dtype == np.float64:
            # An infinite pivot gives +inf with the right sign, not NaN from 0 * inf as closed forms do.
            tri = np.asarray(kinds) == "tri_inf"
            assert np.all(l[tri] == np.inf)
            np.testing.assert_array_equal(s[tri], [np.sign(np.prod(np.diag(M))) for M in mats[tri]])
            assert np.all(np.isnan(l[np.asarray(kinds) == "nan"]))


@pytest.mark.parametrize("k", [2, 3, 4, 6])
def test_kernel_accuracy_near_singular(rng, k):
    # Expansions by minors cancel badly near singular matrices (3x3 and 4x4 closed forms were off by
    # 1e-2..10 in log|det| at condition 1e10..1e13, where LAPACK's LU is off by ~1e-4): such results
    # must be redone by the LU.
    for cond in (1e7, 1e10, 1e13):
        Q1, Q2 = np.linalg.qr(rng.standard_normal((2, 64, k, k)))[0]
        A = Q1 @ (np.logspace(0, -np.log10(cond), k)[:, None] * Q2)
        s, l = slogdet_jit(jnp.asarray(A))
        rs, rl = np.linalg.slogdet(A)
        np.testing.assert_array_equal(s, rs)
        np.testing.assert_allclose(l, rl, atol=cond * 1e-16 * 30)  # LAPACK's own error is ~ eps * cond


def test_kernel_mixed_batches_and_shapes(rng):
    for k in (2, 4):
        # A batch with one singular matrix, and one with many (several rounds of the LU redo).
        A = rng.standard_normal((333, k, k))
        A[17, 0] = 0
        A[100:300:2, :, 1] = 0
        s, l = slogdet_jit(jnp.asarray(A))
        rs, rl = np.linalg.slogdet(A)
        np.testing.assert_array_equal(s, rs)
        np.testing.assert_allclose(l, rl, rtol=1e-10)
    # Batch shapes (2x2 matrices: the batch handling is the same for every k, and their compile is cheap).
    for shape in ((), (2, 5), (0,)):
        A = randn(rng, shape + (2, 2))
        s, l = kernels.slogdet(A)
        assert s.shape == l.shape == shape
        if A.size:
            np.testing.assert_allclose(l, np.linalg.slogdet(np.asarray(A))[1], rtol=1e-10)
    s, l = kernels.slogdet(jnp.ones((2, 0, 0)))  # det of a 0x0 matrix is 1
    np.testing.assert_array_equal(s, [1, 1])
    np.testing.assert_array_equal(l, [0, 0])
    M = rng.integers(-3, 4, (2, 5, 2, 2)) + 10 * np.eye(2, dtype=int)  # integers promote (same compile as above)
    np.testing.assert_allclose(kernels.slogdet(M)[1], np.linalg.slogdet(M)[1], rtol=1e-10)
    Z = jnp.asarray(rng.standard_normal((5, 3, 3)) + 1j * rng.standard_normal((5, 3, 3)))  # complex: jnp's
    np.testing.assert_allclose(kernels.slogdet(Z)[1], jnp.linalg.slogdet(Z)[1], rtol=1e-12)


def test_kernel_flags_redone_per_chunk(rng, monkeypatch):
    # Past one chunk of the rare redo (512 matrices; the last chunk overlaps the one before it), flagged
    # results in the first and in the last chunk only are redone, the others kept: 3x3 (closed form and
    # the elementwise LU) and 6x6 (the LU without row exchanges, near-identity matrices, and LAPACK).
    # (Stacks under _FIX_WHOLE bytes are redone in one piece, as every other test's.)
    monkeypatch.setattr(kernels._det, "_FIX_WHOLE", 0)
    for k in (3, 6):
        A = np.eye(k) + 0.1 * rng.standard_normal((4500, k, k))  # diagonally dominant: no exchange needed
        A[5, 1] = 0  # singular (the closed form flags it; the LU finds a zero pivot after an exchange)
        A[4400, 0, k - 1] = np.inf  # an infinite entry in the last chunk only: +inf
        A[4401] = A[4401][::-1]  # partial pivoting exchanges rows
        A[4402] *= 1e200  # out of the fast paths' range
        s, l = jax.jit(kernels.slogdet)(jnp.asarray(A))  # a new jit: the module's may hold a one-piece program
        rs, rl = np.linalg.slogdet(np.where(np.isinf(A), 1e30, A))
        rl[4400], rl[4402] = np.inf, np.linalg.slogdet(A[4402] / 1e200)[1] + k * np.log(1e200)
        np.testing.assert_array_equal(s, rs)
        np.testing.assert_allclose(l, rl, rtol=1e-12, atol=1e-14)
        assert s[5] == 0 and l[5] == -np.inf


def test_kernel_without_exchanges_is_exact(rng):
    # 5x5 (the LU without row exchanges): on diagonally dominant matrices it is the pivoting LU itself, so
    # its results equal the pivoting LU's bit for bit (a pivoting LU on matrices that need exchanges: same
    # program through the LAPACK redo); a zero pivot with nothing below it stays singular.
    A = np.eye(5) * 4 + rng.standard_normal((64, 5, 5))
    A[3] = np.triu(A[3])
    A[3, 4, 4] = 0  # singular, no exchange: sign 0, -inf
    s, l = slogdet_jit(jnp.asarray(A))
    rs, rl = np.linalg.slogdet(A)
    np.testing.assert_array_equal(s, rs)
    np.testing.assert_allclose(l, rl, rtol=1e-14, atol=1e-14)
    assert s[3] == 0 and l[3] == -np.inf
    grad = jax.jit(jax.grad(lambda A: jnp.sum(kernels.slogdet(A)[1])))(jnp.asarray(A[4:]))
    np.testing.assert_allclose(grad, np.swapaxes(np.linalg.inv(A[4:]), -1, -2), rtol=1e-10, atol=1e-12)


def test_batched_dense_plan_in_chunks(rng, monkeypatch):
    # Large batches of dense Jacobians are computed and reduced a chunk of points at a time (the last chunk
    # overlapping): the same values as one stack, and the same gradients as autodiff through JAX's slogdet
    # (second order through the scan: test_kernel_hessian_through_scan).
    from jacobians import _det

    monkeypatch.setattr(_det, "_CHUNK_BATCH", 1024)  # bytes: 8 points of 3x3 float64 Jacobians stay in one stack
    monkeypatch.setattr(_det, "_CHUNK_BYTES", 512)  # chunks of 7 points: 3 chunks for 19 points
    W = randn(rng, (3, 3)) / 2
    f = lambda x: x + jnp.tanh(W @ x)  # noqa: E731
    xs = randn(rng, (19, 3))

    def ref(xs):
        return jax.vmap(lambda x: jnp.linalg.slogdet(jax.jacfwd(f)(x))[1])(xs)

    logdet = jacobians.log_abs_det(f, batched=True)
    np.testing.assert_allclose(logdet(xs), ref(xs), rtol=1e-12)
    # Chunks on the CPU only: off it every trip of the loop is kernel launches (98 trips cost a GPU 24x).
    names, conds, stack = [], [], [jax.make_jaxpr(logdet)(xs).jaxpr]
    while stack:
        for e in stack.pop().eqns:
            names.append(e.primitive.name)
            conds += [["scan" in str(b) for b in e.params["branches"]]] if e.primitive.name == "cond" else []
            stack += [] if e.primitive.name == "cond" else list(_compat.jaxprs_in_params(e.params))
    assert "platform_index" in names and [True, False] in conds  # (the CPU branch, the default)
    # A structured plan forms no dense Jacobians: its batch stays whole (one chunk per point was 1.5-2x slower).
    diagonal = jacobians.log_abs_det(jnp.tanh, batched=True)
    np.testing.assert_allclose(diagonal(xs), jnp.sum(jnp.log1p(-jnp.tanh(xs) ** 2), -1), rtol=1e-10)
    assert "scan" not in str(jax.make_jaxpr(diagonal)(xs))
    g = jax.grad(lambda xs: jnp.sum(logdet(xs) ** 2))(xs)
    np.testing.assert_allclose(g, jax.grad(lambda xs: jnp.sum(ref(xs) ** 2))(xs), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_kernel_half_precision(rng, dtype):
    A = jnp.asarray(rng.standard_normal((7, 3, 3)), dtype)
    s, l = kernels.slogdet(A)  # computed in float32
    assert s.dtype == l.dtype == dtype
    rs, rl = np.linalg.slogdet(np.asarray(A, np.float64))
    np.testing.assert_array_equal(s, rs)
    np.testing.assert_allclose(np.asarray(l, np.float64), rl, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_kernel_half_precision_gradient_above_the_looped_lu(rng, dtype):
    # k = 16 is LAPACK's LU (above _loop_max): its derivative rule runs in float32, LAPACK having no
    # half-precision LU; d log|det A| / dA = A^{-T}.
    A = jnp.eye(16)[None] + 0.25 * randn(rng, (2, 16, 16)) / 4
    g = jax.grad(lambda a: jnp.sum(kernels.slogdet(a)[1].astype(jnp.float32)))(A.astype(dtype))
    assert g.dtype == dtype
    want = np.linalg.inv(np.asarray(A.astype(dtype), np.float64)).transpose(0, 2, 1)
    np.testing.assert_allclose(np.asarray(g, np.float64), want, atol=0.05)


@pytest.mark.parametrize("k", [3, 7])
def test_kernel_under_vmap(rng, k):
    A = randn(rng, (3, 5, k, k)).at[1, 2].set(0.0)  # one singular matrix inside the vmap
    s, l = slogdet_jit(A)
    vs, vl = jax.jit(jax.vmap(jax.vmap(kernels.slogdet)))(A)
    np.testing.assert_array_equal(vs, s)
    np.testing.assert_allclose(vl, l, rtol=1e-13)
    assert s[1, 2] == 0 and l[1, 2] == -np.inf


def test_kernel_hessian_through_scan(rng):
    # jax.hessian through a scan of the kernel (log_abs_det's chunks of a large batch): the vmap of the
    # scan's residuals reaches the kernel's batching rule with an unmapped input (it claimed the outputs
    # mapped: wrong shapes; and recursed).
    A = randn(rng, (3, 7, 3, 3))

    def f(kernel, x):
        return jnp.sum(jax.lax.scan(lambda c, a: (c, kernel(a * x)[1]), None, A)[1])

    h = jax.jit(jax.hessian(lambda x: f(kernels.slogdet, x)))(jnp.ones(()))
    np.testing.assert_allclose(h, jax.hessian(lambda x: f(jnp.linalg.slogdet, x))(jnp.ones(())), rtol=1e-10)


@pytest.mark.parametrize("k", [1, 2, 3, 6])  # cofactors up to 3x3 (1, 2, 3 each their own), a solve above
def test_kernel_gradient_equals_jnp(rng, k):
    A = randn(rng, (4, k, k))

    @jax.jit
    def ours(A):
        grad = jax.grad(lambda A: jnp.sum(kernels.slogdet(A)[1]))
        return (
            grad(A),
            grad(A * 1e200) * 1e200,  # d log|det(cA)| / d(cA) = A^{-T} / c, without overflow
            grad(A * 1e-200) * 1e-200,
            jax.jacfwd(lambda M: kernels.slogdet(M)[1])(A[0]),
            jax.vmap(jax.grad(lambda M: kernels.slogdet(M)[1]))(A),
            jax.grad(lambda A: jnp.sum(kernels.slogdet(A)[0]))(A),
        )

    g, big, small, fwd, vmapped, sign = ours(A)
    ref = jax.grad(lambda A: jnp.sum(jnp.linalg.slogdet(A)[1]))(A)
    for got in (g, big, small, vmapped):
        np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(fwd, ref[0], rtol=1e-10, atol=1e-12)
    assert np.all(sign == 0)  # the sign is piecewise constant


def test_kernel_errors():
    with pytest.raises(ValueError, match=r"jacobians.kernels.slogdet: a must have shape \(..., k, k\), got \(2, 3\)"):
        kernels.slogdet(jnp.ones((2, 3)))
    with pytest.raises(ValueError, match=r"jacobians.kernels.slogdet: a must have shape \(..., k, k\), got \(3,\)"):
        kernels.slogdet(jnp.ones(3))
    with pytest.raises(ValueError, match=r"jacobians.kernels.slogdet: a must have shape \(..., k, k\), got \(\)"):
        kernels.slogdet(1.0)


def test_errors(rng):
    with pytest.raises(ValueError, match=r"input has size 3 \(shape \(3,\)\) and the output size 2 \(shape \(2,\)\)"):
        jacobians.det(lambda x: x[:2])(jnp.ones(3))
    with pytest.raises(ValueError, match=r"batched=True needs x with a leading batch axis, got a scalar"):
        jacobians.slogdet(jnp.sin, batched=True)(1.0)
    with pytest.raises(TypeError, match=r"batched must be True or False, got 'yes'"):
        jacobians.log_abs_det(jnp.sin, batched="yes")
    with pytest.raises(TypeError, match=r"dtype int"):
        jacobians.det(jnp.sin)(jnp.arange(3))



@pytest.mark.parametrize("k", [2, 3, 4])
def test_kernel_repeated_rows_are_exactly_singular(rng, k):
    # A fused multiply-add in a closed form's a*d - b*c left the rounding error of b*c (4.8e-17): a finite
    # log|det| for two equal rows. A structurally singular flow Jacobian's 2x2 blocks met it.
    A = np.array(randn(rng, (5, k, k)))
    A[:, 1] = A[:, 0]
    s, la = kernels.slogdet(jnp.asarray(A))
    np.testing.assert_array_equal(s, 0.0)
    np.testing.assert_array_equal(la, -np.inf)
    f = lambda x: jnp.abs(x) * x[::-1]  # noqa: E731 - rows 0 and 4 repeat where x0, x4 share a sign
    x = jnp.asarray([0.7, -1.2, 0.4, 2.0, 1.5])
    assert tuple(map(float, jacobians.slogdet(f)(x))) == (0.0, -np.inf)


@pytest.mark.parametrize("k", [2, 3, 4, 6, 9])
def test_kernel_proportional_rows_are_exactly_singular(rng, k):
    # A last row c times the first (c = 3, 5, 7: 1 - fl(1/c) c is not 0 in a fused multiply-add) is singular:
    # sign 0 and -inf, as LAPACK's getf2 gives, where a contracted update left a pivot of 1e-16.
    if k > 4 and jax.default_backend() != "cpu":
        # Off the CPU the LU's update compiles to a fused multiply-add (and k > 8 is the solver's LU, which
        # does the same): on an H200 none of these came out exactly singular, from jnp.linalg.slogdet neither.
        pytest.skip("exact zero pivots of an LU are the CPU's (LAPACK getf2's)")
    M = rng.integers(-9, 10, (60, k, k)).astype(np.float64)
    M[:, -1] = np.asarray([3.0, 5.0, 7.0])[np.arange(60) % 3, None] * M[:, 0]
    s, l = (np.asarray(v) for v in slogdet_jit(jnp.asarray(M)))
    ns, nl = np.linalg.slogdet(M)
    exact = np.isneginf(nl)  # NumPy's LAPACK rounds most of them to an exact zero pivot too
    assert exact.sum() >= 40
    # As often as LAPACK (the order of a few roundings differs): before, about 40% of these were finite.
    assert np.mean(np.isneginf(l[exact])) >= 0.9 and np.all(s[np.isneginf(l)] == 0)
    for M in ([[1.0, 1.0], [3.0, 3.0]], [[1.0, -2.0, 3.0], [3.0, -3.0, -2.0], [3.0, -6.0, 9.0]]):
        assert tuple(map(float, slogdet_jit(jnp.asarray(M)))) == (0.0, -np.inf)
    f = lambda x: jnp.stack([x[0] + x[1], 3 * x[0] + 3 * x[1]])  # noqa: E731
    assert jacobians.log_abs_det(f)(jnp.array([0.3, 0.7])) == -np.inf


def test_slogdet_results_are_named_like_jnp(rng):
    # A drop-in for jnp.linalg.slogdet: its fields by name, under jit, vmap and grad too.
    A = jnp.asarray(randn(rng, (4, 3, 3)))
    got, want = kernels.slogdet(A), jnp.linalg.slogdet(A)
    assert got._fields == want._fields == ("sign", "logabsdet")
    np.testing.assert_allclose(got.logabsdet, want.logabsdet, rtol=1e-12)
    np.testing.assert_array_equal(jax.vmap(kernels.slogdet)(A).sign, want.sign)
    g = jax.grad(lambda A: jnp.sum(kernels.slogdet(A).logabsdet))(A)
    np.testing.assert_allclose(g, jnp.swapaxes(jnp.linalg.inv(A), -1, -2), rtol=1e-10)
    W = randn(rng, (3, 3))
    r = jax.jit(jacobians.slogdet(lambda x: W @ x + jnp.sin(x)))(randn(rng, (3,)))
    assert isinstance(r, kernels.SlogdetResult) and r.sign in (-1.0, 1.0)
