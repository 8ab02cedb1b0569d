"""The workloads: for each, a JAX function, the implementations to time and a closed form.

Each builder takes sizes, a dtype and a NumPy generator and returns a
:class:`Workload`: the input, the closed-form answer (the correctness check and
the floor), and the implementations by name. Implementation names:

- ``jacobians``: the library with default options; ``jacobians[chunk=k]``:
  chunked; ``jacobians.log_abs_det``: the batched determinant.
- ``jax.jacfwd`` / ``jax.jacrev``: ``jax.jit`` of the raw transformations.
- ``torch.func.*``: PyTorch's functional transforms, when torch is importable.
- ``numpy-fd``: central finite differences in NumPy (float64), vectorised.
- ``closed-form``: the hand-written Jacobian in JAX (the floor).
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import jax
import jax.experimental.sparse
import jax.numpy as jnp
import numpy as np

import jacobians
from jacobians import kernels

try:  # torch is optional: never a dependency
    import torch
    import torch.func as tf
except ImportError:  # pragma: no cover - depends on the machine
    torch = None


@dataclass
class Impl:
    fn: Callable
    kind: str = "jax"  # "jax" | "torch" | "numpy"


@dataclass
class Workload:
    x: object
    reference: object  # a dense np.ndarray, or a SparseRef
    impls: dict[str, Impl] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    colors: dict[str, int] = field(default_factory=dict)  # sparse engines: JVPs/VJPs used
    detect: dict[str, Callable] = field(default_factory=dict)  # sparse engines: detection + colouring


TORCH_NAMES = ("torch.func.jacfwd", "torch.func.jacrev")


def _rand(rng, shape, dtype, scale=1.0):
    return jnp.asarray(rng.standard_normal(shape) * scale, dtype=dtype)


def _central_fd(f_batched: Callable, x: np.ndarray, h: float = 1e-6) -> np.ndarray:
    """Numerator-layout Jacobian ``out.shape + x.shape`` by central differences, float64."""
    x = np.asarray(x, np.float64)
    n = x.size
    E = np.eye(n).reshape((n,) + x.shape) * h
    d = (f_batched(x[None] + E) - f_batched(x[None] - E)) / (2 * h)  # (n,) + out.shape
    return np.moveaxis(d, 0, -1).reshape(d.shape[1:] + x.shape)


def _dense_impls(
    w: Workload, f: Callable, x, chunk: int, torch_f: Callable | None, fd: Callable | None, modes: bool = False
):
    w.impls["jacobians"] = Impl(jacobians.jacobian(f))
    w.impls[f"jacobians[chunk={chunk}]"] = Impl(jacobians.jacobian(f, chunk_size=chunk))
    if modes:  # each mode against the raw JAX call of the same mode
        w.impls["jacobians[fwd]"] = Impl(jacobians.jacobian(f, mode="fwd"))
        w.impls["jacobians[rev]"] = Impl(jacobians.jacobian(f, mode="rev"))
    w.impls["jax.jacfwd"] = Impl(jax.jit(jax.jacfwd(f)))
    w.impls["jax.jacrev"] = Impl(jax.jit(jax.jacrev(f)))
    _torch_impls(w, torch_f, x)
    if fd is not None:
        w.impls["numpy-fd"] = Impl(lambda x: _central_fd(fd, x), "numpy")


def _torch_impls(w: Workload, torch_f, x, names=TORCH_NAMES):
    if torch is None or torch_f is None:
        for n in names:
            w.skipped[n] = "skipped: torch not installed" if torch is None else "skipped: no torch version"
        return
    for n in names:
        w.impls[n] = Impl(torch_f(n), "torch")


def _t(a):
    return torch.from_numpy(np.array(a))


def tall_or_wide(n: int, m: int, dtype, rng) -> Workload:
    """f(x) = tanh(A x), R^n -> R^m."""
    A = _rand(rng, (m, n), dtype, 1 / np.sqrt(n))
    x = _rand(rng, (n,), dtype)
    f = lambda x: jnp.tanh(A @ x)  # noqa: E731
    y = jnp.tanh(A @ x)
    w = Workload(x, np.asarray((1 - y**2)[:, None] * A))
    w.impls["closed-form"] = Impl(jax.jit(lambda x: (1 - jnp.tanh(A @ x) ** 2)[:, None] * A))
    At, A64 = (_t(A) if torch else None), np.asarray(A, np.float64)

    def torch_f(name):
        g = lambda x: torch.tanh(At @ x)  # noqa: E731
        return getattr(tf, name.split(".")[-1])(g)

    # Auto mode pushes min(n, m) basis vectors; the chunk is an eighth of them.
    _dense_impls(w, f, x, max(1, min(n, m) // 8), torch_f, lambda X: np.tanh(X @ A64.T), modes=True)
    return w


def mlp(n: int, dtype, rng) -> Workload:
    """f(x) = tanh(W2 tanh(W1 x + b1) + b2), n = m = h."""
    W1, W2 = _rand(rng, (n, n), dtype, 1 / np.sqrt(n)), _rand(rng, (n, n), dtype, 1 / np.sqrt(n))
    b1, b2 = _rand(rng, (n,), dtype, 0.1), _rand(rng, (n,), dtype, 0.1)
    x = _rand(rng, (n,), dtype)

    def f(x):
        return jnp.tanh(W2 @ jnp.tanh(W1 @ x + b1) + b2)

    def closed(x):
        h = jnp.tanh(W1 @ x + b1)
        y = jnp.tanh(W2 @ h + b2)
        return ((1 - y**2)[:, None] * (W2 * (1 - h**2)[None, :])) @ W1

    w = Workload(x, np.asarray(closed(x)))
    w.impls["closed-form"] = Impl(jax.jit(closed))
    T = [(_t(a) if torch else None) for a in (W1, W2, b1, b2)]
    N = [np.asarray(a, np.float64) for a in (W1, W2, b1, b2)]

    def torch_f(name):
        g = lambda x: torch.tanh(T[1] @ torch.tanh(T[0] @ x + T[2]) + T[3])  # noqa: E731
        return getattr(tf, name.split(".")[-1])(g)

    _dense_impls(
        w, f, x, max(1, n // 8), torch_f, lambda X: np.tanh(np.tanh(X @ N[0].T + N[2]) @ N[1].T + N[3]), modes=True
    )
    return w


def elementwise(n: int, dtype, rng) -> Workload:
    """f(x) = sin(x) * x: a diagonal Jacobian, stored dense."""
    x = _rand(rng, (n,), dtype)
    f = lambda x: jnp.sin(x) * x  # noqa: E731
    closed = lambda x: jnp.diag(jnp.cos(x) * x + jnp.sin(x))  # noqa: E731
    w = Workload(x, np.asarray(closed(x)))
    w.impls["closed-form"] = Impl(jax.jit(closed))

    def torch_f(name):
        return getattr(tf, name.split(".")[-1])(lambda x: torch.sin(x) * x)

    _dense_impls(w, f, x, max(1, n // 8), torch_f, lambda X: np.sin(X) * X)
    w.impls["jacobians.sparse_jacobian"] = Impl(jacobians.sparse_jacobian(f))
    return w


def gram(m: int, n: int, dtype, rng) -> Workload:
    """K = R^T R for R of shape (m, n): an (n, n, m, n) Jacobian (Example 5.13)."""
    R = _rand(rng, (m, n), dtype)
    f = lambda R: R.T @ R  # noqa: E731
    w = Workload(R, np.asarray(jacobians.identities.gram(R)))
    w.impls["closed-form"] = Impl(jax.jit(jacobians.identities.gram))

    def torch_f(name):
        return getattr(tf, name.split(".")[-1])(lambda R: R.T @ R)

    _dense_impls(w, f, R, max(1, m * n // 8), torch_f, lambda X: np.swapaxes(X, -1, -2) @ X)
    w.impls["jacobians.sparse_jacobian"] = Impl(jacobians.sparse_jacobian(f))
    return w


# --- batched log|det J| -------------------------------------------------------------------


def _logdet_impls(w: Workload, f: Callable, xs, closed: Callable, torch_f, fd: Callable):
    w.impls["jacobians.log_abs_det"] = Impl(jacobians.log_abs_det(f, batched=True))
    w.impls["jax vmap(jacfwd)+slogdet"] = Impl(jax.jit(jax.vmap(lambda x: jnp.linalg.slogdet(jax.jacfwd(f)(x))[1])))
    w.impls["jax vmap(jacrev)+slogdet"] = Impl(jax.jit(jax.vmap(lambda x: jnp.linalg.slogdet(jax.jacrev(f)(x))[1])))
    w.impls["closed-form"] = Impl(jax.jit(closed))
    names = ("torch.func vmap(jacfwd)+slogdet", "torch.func vmap(jacrev)+slogdet")
    _torch_impls(w, torch_f, xs, names)

    def fd_logdet(xs):
        xs = np.asarray(xs, np.float64)
        d, h = xs.shape[1], 1e-6
        cols = [(fd(xs + h * e) - fd(xs - h * e)) / (2 * h) for e in np.eye(d)]
        return np.linalg.slogdet(np.stack(cols, axis=-1))[1]

    w.impls["numpy-fd"] = Impl(fd_logdet, "numpy")


def _torch_logdet(g):
    def make(name):
        jac = tf.jacfwd(g) if "jacfwd" in name else tf.jacrev(g)
        return lambda xs: torch.linalg.slogdet(torch.vmap(jac)(xs))[1]

    return make


def logdet3(points: int, dtype, rng) -> Workload:
    """log|det J| of f(x) = [x0 + sin x1, x1 exp(0.1 x2), x2 + x0^2] at many points."""
    xs = _rand(rng, (points, 3), dtype)

    def f(x):
        return jnp.stack([x[0] + jnp.sin(x[1]), x[1] * jnp.exp(0.1 * x[2]), x[2] + x[0] ** 2])

    def closed(xs):  # det J = exp(0.1 x2) (1 + 0.2 x0 x1 cos x1)
        x0, x1, x2 = xs[:, 0], xs[:, 1], xs[:, 2]
        return 0.1 * x2 + jnp.log(jnp.abs(1 + 0.2 * x0 * x1 * jnp.cos(x1)))

    w = Workload(xs, np.asarray(closed(xs)))

    def g(x):
        return torch.stack([x[0] + torch.sin(x[1]), x[1] * torch.exp(0.1 * x[2]), x[2] + x[0] ** 2])

    def fd(X):
        return np.stack([X[:, 0] + np.sin(X[:, 1]), X[:, 1] * np.exp(0.1 * X[:, 2]), X[:, 2] + X[:, 0] ** 2], -1)

    _logdet_impls(w, f, xs, closed, _torch_logdet(g) if torch else None, fd)
    return w


def logdet16(points: int, dtype, rng, d: int = 16) -> Workload:
    """log|det J| of the invertible residual map f(x) = x + 0.5 tanh(W x + b), W of norm < 1."""
    W = rng.standard_normal((d, d))
    W = jnp.asarray(0.9 * W / np.linalg.norm(W, 2), dtype)
    b = _rand(rng, (d,), dtype, 0.1)
    xs = _rand(rng, (points, d), dtype)

    def f(x):
        return x + 0.5 * jnp.tanh(W @ x + b)

    def closed(xs):  # J = I + 0.5 diag(1 - tanh^2) W, then a batched slogdet
        s = 1 - jnp.tanh(xs @ W.T + b) ** 2
        J = jnp.eye(d, dtype=xs.dtype) + 0.5 * s[:, :, None] * W[None]
        return jnp.linalg.slogdet(J)[1]

    w = Workload(xs, np.asarray(closed(xs)))
    Wt, bt = (_t(W), _t(b)) if torch else (None, None)
    W64, b64 = np.asarray(W, np.float64), np.asarray(b, np.float64)
    _logdet_impls(
        w,
        f,
        xs,
        closed,
        _torch_logdet(lambda x: x + 0.5 * torch.tanh(Wt @ x + bt)) if torch else None,
        lambda X: X + 0.5 * np.tanh(X @ W64.T + b64),
    )
    return w


# --- sparse Jacobians ---------------------------------------------------------------------

try:
    import sparsejac
except ImportError:  # pragma: no cover - optional comparison
    sparsejac = None
try:
    import asdex
except ImportError:  # pragma: no cover - optional comparison
    asdex = None


@dataclass
class SparseRef:
    """A Jacobian given by its nonzeros in the flattened (m, n) matrix."""

    m: int
    n: int
    keys: np.ndarray  # row * n + col, sorted
    vals: np.ndarray


def to_coo(result, m: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Flat keys and values of a BCOO or dense Jacobian, duplicates summed, sorted."""
    if hasattr(result, "indices") and hasattr(result, "data"):
        idx = np.asarray(result.indices)
        shape = tuple(result.shape)
        flat = np.ravel_multi_index(idx.T, shape) if idx.size else np.zeros(0, np.int64)
        vals = np.asarray(result.data, np.float64)
    else:
        a = np.asarray(result, np.float64).reshape(-1)
        flat = np.nonzero(a)[0]
        vals = a[flat]
    keys, inv = np.unique(flat, return_inverse=True)
    return keys, np.bincount(inv, weights=vals, minlength=keys.size)


def coo_max_abs_diff(ref: SparseRef, keys, vals) -> float:
    allk = np.union1d(ref.keys, keys)
    a = np.zeros(allk.size)
    b = np.zeros(allk.size)
    a[np.searchsorted(allk, ref.keys)] = ref.vals
    b[np.searchsorted(allk, keys)] = vals
    return float(np.max(np.abs(a - b))) if allk.size else 0.0


def _sparse_impls(w: Workload, f_flat: Callable, x_flat, rows, cols, m: int, n: int, dense_ok: bool):
    """jacobians.sparse_jacobian against sparsejac (pattern by hand), asdex and dense jacfwd."""
    w.impls["jacobians.sparse_jacobian"] = Impl(jacobians.sparse_jacobian(f_flat))
    if sparsejac is not None:
        pattern = jax.experimental.sparse.BCOO(
            (jnp.ones(len(rows), x_flat.dtype), jnp.asarray(np.stack([rows, cols], 1))), shape=(m, n)
        )
        # sparsejac seeds its JVPs in the default float dtype (float64 here, with
        # x64 on): differentiate a float64 view and cast inside.
        sj = jax.jit(sparsejac.jacfwd(lambda v: f_flat(v.astype(x_flat.dtype)), sparsity=pattern))
        w.impls["sparsejac.jacfwd (pattern by hand)"] = Impl(lambda x: sj(x.astype(jnp.float64)))
    else:
        w.skipped["sparsejac.jacfwd (pattern by hand)"] = "skipped: sparsejac not installed"
    if asdex is not None:
        coloring = asdex.jacobian_coloring(f_flat, x_flat)
        w.impls["asdex"] = Impl(jax.jit(asdex.jacobian_from_coloring(f_flat, coloring)))
        w.colors["asdex"] = int(coloring.num_colors)
        w.detect["asdex"] = lambda: asdex.jacobian_coloring(f_flat, x_flat)
    else:
        w.skipped["asdex"] = "skipped: asdex not installed"
    if dense_ok:
        w.impls["jax.jacfwd"] = Impl(jax.jit(jax.jacfwd(f_flat)))
    else:
        w.skipped["jax.jacfwd"] = f"skipped: dense Jacobian too large ({m} x {n})"
    plan = jacobians.sparse_jacobian(f_flat).plan(x_flat)
    w.colors["jacobians.sparse_jacobian"] = plan.n_colors

    def detect_ours():
        p = jacobians.sparsity(f_flat, x_flat)
        return kernels.color_columns(p.rows, p.cols, n)

    w.detect["jacobians"] = detect_ours


def stencil1d(n: int, dtype, rng) -> Workload:
    """Nonlinear 1-D residual r_i = u_i^2 - u_{i-1} u_{i+1} + sin(u_i) - 2 u_i, i = 1..n-2."""
    u = _rand(rng, (n,), dtype)

    def f(u):
        return u[1:-1] ** 2 - u[:-2] * u[2:] + jnp.sin(u[1:-1]) - 2.0 * u[1:-1]

    un = np.asarray(u, np.float64)
    i = np.arange(1, n - 1)
    rows = np.concatenate([i - 1, i - 1, i - 1])
    cols = np.concatenate([i - 1, i, i + 1])
    vals = np.concatenate([-un[i + 1], 2 * un[i] + np.cos(un[i]) - 2, -un[i - 1]])
    keys = rows * n + cols
    order = np.argsort(keys)
    w = Workload(u, SparseRef(n - 2, n, keys[order], vals[order]))
    at = jnp.asarray(np.stack([rows, cols], 1))

    def closed(u):  # the hand-written nonzeros in a BCOO
        data = jnp.concatenate([-u[2:], 2 * u[1:-1] + jnp.cos(u[1:-1]) - 2, -u[:-2]])
        return jax.experimental.sparse.BCOO((data, at), shape=(n - 2, n))

    w.impls["closed-form"] = Impl(jax.jit(closed))
    _sparse_impls(w, f, u, rows, cols, n - 2, n, dense_ok=n <= 2048)
    return w


def stencil2d(k: int, dtype, rng) -> Workload:
    """5-point Laplacian plus a cubic on a k x k grid (zero boundary), flattened to R^{k^2}."""
    U = _rand(rng, (k * k,), dtype)

    def f(u):
        V = u.reshape(k, k)
        P = jnp.pad(V, 1)
        return (P[:-2, 1:-1] + P[2:, 1:-1] + P[1:-1, :-2] + P[1:-1, 2:] - 4.0 * V + V**3).reshape(-1)

    idx = np.arange(k * k).reshape(k, k)
    Un = np.asarray(U, np.float64)
    rows, cols, vals = [idx.ravel()], [idx.ravel()], [3 * Un**2 - 4.0]
    for di, dj in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        src = idx[max(di, 0) : k + min(di, 0), max(dj, 0) : k + min(dj, 0)]
        dst = idx[max(-di, 0) : k + min(-di, 0), max(-dj, 0) : k + min(-dj, 0)]
        rows.append(dst.ravel())
        cols.append(src.ravel())
        vals.append(np.ones(src.size))
    rows, cols, vals = map(np.concatenate, (rows, cols, vals))
    keys = rows * k * k + cols
    order = np.argsort(keys)
    w = Workload(U, SparseRef(k * k, k * k, keys[order], vals[order]))
    at, n_const = jnp.asarray(np.stack([rows, cols], 1)), rows.size - k * k

    def closed(u):  # the hand-written nonzeros in a BCOO
        data = jnp.concatenate([3 * u**2 - 4.0, jnp.ones(n_const, u.dtype)])
        return jax.experimental.sparse.BCOO((data, at), shape=(k * k, k * k))

    w.impls["closed-form"] = Impl(jax.jit(closed))
    _sparse_impls(w, f, U, rows, cols, k * k, k * k, dense_ok=k * k <= 2048)
    return w
