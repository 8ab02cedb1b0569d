"""The workloads: for each, a JAX function, the implementations to time and a closed form.

Each builder takes sizes, a dtype and a NumPy generator and returns a
:class:`Workload`: the input, the reference answer (the correctness check),
and the implementations by name. The reference is the closed form, jitted once
and evaluated at the input (that call is the closed form's compilation), or a
NumPy float64 computation where there is no JAX closed form. Implementation
names:

- ``jacobians``: the library with default options; ``jacobians[chunk=k]``:
  chunked; ``jacobians[fwd]``/``[rev]``: a forced mode;
  ``jacobians.log_abs_det``: the batched determinant;
  ``jacobians.kernels.slogdet``: the determinant kernel alone.
- ``jax.jacfwd`` / ``jax.jacrev`` (and ``jax vmap(...)``, ``jnp.linalg...``):
  ``jax.jit`` of the raw JAX transformations.
- ``torch.func.*`` / ``torch.linalg.*``: PyTorch, when torch is importable.
- ``asdex``, ``sparsejac.*``: the sparse peers, when importable.
- ``numpy-fd``: central finite differences in NumPy (float64), vectorised.
- ``closed-form``: the hand-written Jacobian in JAX (the floor).

A peer that is not installed gets no row at all; the suite says once, at the
top, which peers are missing and how to install them.
"""

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import jax
import jax.experimental.sparse
import jax.numpy as jnp
import numpy as np
from jax import lax

import jacobians
from jacobians import kernels
from jacobians._sparse import coloring as _coloring

try:  # torch is optional: never a dependency
    import torch
    import torch.func as tf
except ImportError:  # pragma: no cover - depends on the machine
    torch = None
try:
    import sparsejac
except ImportError:  # pragma: no cover - optional comparison
    sparsejac = None
try:
    import asdex
except ImportError:  # pragma: no cover - optional comparison
    asdex = None


@dataclass
class Impl:
    fn: Callable
    kind: str = "jax"  # "jax" | "torch" | "numpy"
    compile_s: float | None = None  # compiled while building the workload (the closed form)


@dataclass
class Workload:
    x: object
    reference: object  # a dense np.ndarray, or a SparseRef
    impls: dict[str, Impl] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # name -> why (never "not installed")
    colors: dict[str, int] = field(default_factory=dict)  # sparse engines: JVPs/VJPs used
    detect: dict[str, Callable] = field(default_factory=dict)  # sparse engines: detection + colouring
    reference_note: str = "closed form"
    memory: bool = True  # report XLA's memory analysis (it recompiles a library call; off where compiles are slow)
    explain: Callable | None = None  # a fresh planning run of the library's default (timed as plan_s)


TORCH_NAMES = ("torch.func.jacfwd", "torch.func.jacrev")


def _rand(rng, shape, dtype, scale=1.0):
    return jnp.asarray(rng.standard_normal(shape) * scale, dtype=dtype)


def _closed(closed: Callable, x) -> tuple[np.ndarray, Impl]:
    """Jit the closed form once; its value at ``x`` is the reference, its first call the compile time."""
    fn = jax.jit(closed)
    t0 = time.perf_counter()
    ref = jax.block_until_ready(fn(x))
    t = time.perf_counter() - t0
    return np.asarray(ref, np.float64), Impl(fn, compile_s=t)


def _workload_from_closed(closed: Callable, x) -> Workload:
    ref, impl = _closed(closed, x)
    w = Workload(x, ref)
    w.impls["closed-form"] = impl
    return w


def _central_fd(f_batched: Callable, x: np.ndarray, h: float = 1e-6) -> np.ndarray:
    """Numerator-layout Jacobian ``out.shape + x.shape`` by central differences, float64."""
    x = np.asarray(x, np.float64)
    n = x.size
    E = np.eye(n).reshape((n,) + x.shape) * h
    d = (f_batched(x[None] + E) - f_batched(x[None] - E)) / (2 * h)  # (n,) + out.shape
    return np.moveaxis(d, 0, -1).reshape(d.shape[1:] + x.shape)


# --quick builds the "lite" variant of a workload: no chunked or forced-mode
# variants (each one is another compilation), except where ``modes`` says the
# forced modes are the point of the workload.
LITE = False


def _dense_impls(
    w: Workload, f: Callable, x, chunk: int, torch_f: Callable | None, fd: Callable | None, modes: bool | str = False
):
    w.impls["jacobians"] = Impl(jacobians.jacobian(f))
    if not LITE:
        w.impls[f"jacobians[chunk={chunk}]"] = Impl(jacobians.jacobian(f, chunk_size=chunk))
    if modes == "always" or (modes and not LITE):  # each mode against the raw JAX call of the same mode
        w.impls["jacobians[fwd]"] = Impl(jacobians.jacobian(f, mode="fwd"))
        w.impls["jacobians[rev]"] = Impl(jacobians.jacobian(f, mode="rev"))
        if not LITE:  # both structured sweeps, whichever the planner chose
            for sweep in ("fwd", "rev"):
                w.impls[f"jacobians[structured {sweep}]"] = Impl(jacobians.jacobian(f, method="structured", mode=sweep))
    w.impls["jax.jacfwd"] = Impl(jax.jit(jax.jacfwd(f)))
    w.impls["jax.jacrev"] = Impl(jax.jit(jax.jacrev(f)))
    _torch_impls(w, torch_f)
    if fd is not None:
        w.impls["numpy-fd"] = Impl(lambda x: _central_fd(fd, x), "numpy")


def _torch_impls(w: Workload, torch_f, names=TORCH_NAMES):
    if torch is None or torch_f is None:  # the suite reports missing torch once, at the top
        return
    for n in names:
        w.impls[n] = Impl(torch_f(n), "torch")


def torch_device() -> str:
    """Where torch's rows run: on the GPU when JAX runs on one (a CPU-against-GPU ratio says nothing)."""
    if torch is not None and jax.default_backend() == "gpu" and torch.cuda.is_available():
        return "cuda"
    return "cpu"


def _t(a):
    return torch.from_numpy(np.array(a)).to(torch_device()) if torch is not None else None


def _torch_jac(g):
    """torch.func.jacfwd / jacrev of ``g``, by implementation name."""
    return lambda name: getattr(tf, name.split(".")[-1])(g)


# --- dense Jacobians ----------------------------------------------------------------------


def tall_or_wide(n: int, m: int, dtype, rng) -> Workload:
    """f(x) = tanh(A x), R^n -> R^m."""
    A = _rand(rng, (m, n), dtype, 1 / np.sqrt(n))
    x = _rand(rng, (n,), dtype)
    w = _workload_from_closed(lambda x: (1 - jnp.tanh(A @ x) ** 2)[:, None] * A, x)
    At, A64 = _t(A), np.asarray(A, np.float64)
    # Auto mode pushes min(n, m) basis vectors; the chunk is an eighth of them.
    _dense_impls(
        w,
        lambda x: jnp.tanh(A @ x),
        x,
        max(1, min(n, m) // 8),
        torch and _torch_jac(lambda x: torch.tanh(At @ x)),
        lambda X: np.tanh(X @ A64.T),
        modes="always",
    )
    return w


def mlp(n: int, dtype, rng, h: int | None = None, m: int | None = None) -> Workload:
    """f(x) = tanh(W2 tanh(W1 x + b1) + b2), R^n -> R^h -> R^m (square when h = m = n)."""
    h, m = h or n, m or n
    W1, W2 = _rand(rng, (h, n), dtype, 1 / np.sqrt(n)), _rand(rng, (m, h), dtype, 1 / np.sqrt(h))
    b1, b2 = _rand(rng, (h,), dtype, 0.1), _rand(rng, (m,), dtype, 0.1)
    x = _rand(rng, (n,), dtype)

    def f(x):
        return jnp.tanh(W2 @ jnp.tanh(W1 @ x + b1) + b2)

    def closed(x):
        z = jnp.tanh(W1 @ x + b1)
        y = jnp.tanh(W2 @ z + b2)
        return ((1 - y**2)[:, None] * (W2 * (1 - z**2)[None, :])) @ W1

    w = _workload_from_closed(closed, x)
    T = [_t(a) for a in (W1, W2, b1, b2)]
    N = [np.asarray(a, np.float64) for a in (W1, W2, b1, b2)]
    _dense_impls(
        w,
        f,
        x,
        max(1, min(n, m) // 8),
        torch and _torch_jac(lambda x: torch.tanh(T[1] @ torch.tanh(T[0] @ x + T[2]) + T[3])),
        lambda X: np.tanh(np.tanh(X @ N[0].T + N[2]) @ N[1].T + N[3]),
        modes=True,
    )
    return w


def resmlp(layers: int, width: int, dtype, rng) -> Workload:
    """A residual MLP: h <- h + tanh(W h + b) per layer; J = prod (I + diag(1 - t^2) W)."""
    Ws = [_rand(rng, (width, width), dtype, 1 / np.sqrt(width)) for _ in range(layers)]
    bs = [_rand(rng, (width,), dtype, 0.1) for _ in range(layers)]
    x = _rand(rng, (width,), dtype)

    def f(x):
        for W, b in zip(Ws, bs, strict=True):
            x = x + jnp.tanh(W @ x + b)
        return x

    def closed(x):
        J = jnp.eye(width, dtype=x.dtype)
        for W, b in zip(Ws, bs, strict=True):
            t = jnp.tanh(W @ x + b)
            J = J + ((1 - t**2)[:, None] * W) @ J  # (I + diag(1 - t^2) W) J
            x = x + t
        return J

    w = _workload_from_closed(closed, x)
    Wt, bt = [_t(W) for W in Ws], [_t(b) for b in bs]
    W64, b64 = [np.asarray(W, np.float64) for W in Ws], [np.asarray(b, np.float64) for b in bs]

    def g(x):
        for W, b in zip(Wt, bt, strict=True):
            x = x + torch.tanh(W @ x + b)
        return x

    def fd(X):
        for W, b in zip(W64, b64, strict=True):
            X = X + np.tanh(X @ W.T + b)
        return X

    _dense_impls(w, f, x, max(1, width // 8), torch and _torch_jac(g), fd, modes=True)
    return w


def conv(cin: int, cout: int, hw: int, dtype, rng) -> Workload:
    """y = tanh(conv3x3(x) + b), SAME padding, x of shape (cin, hw, hw) -> (cout, hw, hw).

    Closed form: the constant convolution matrix C (the conv applied to the basis
    vectors, built once), then J = diag(1 - y^2) C.
    """
    K = _rand(rng, (cout, cin, 3, 3), dtype, 1 / np.sqrt(9 * cin))
    b = _rand(rng, (cout,), dtype, 0.1)
    x = _rand(rng, (cin, hw, hw), dtype)
    n, m = cin * hw * hw, cout * hw * hw

    def lin(x):
        return lax.conv_general_dilated(x[None], K, (1, 1), "SAME", dimension_numbers=("NCHW", "OIHW", "NCHW"))[0]

    def f(x):
        return jnp.tanh(lin(x) + b[:, None, None])

    # Column j of C is the conv of basis vector j (exact: each entry is one kernel weight).
    C = jax.jit(jax.vmap(lin))(jnp.eye(n, dtype=dtype).reshape(n, cin, hw, hw)).reshape(n, m).T
    bflat = jnp.repeat(b, hw * hw)

    def closed(x):
        y = jnp.tanh(C @ x.reshape(-1) + bflat)
        return ((1 - y**2)[:, None] * C).reshape((cout, hw, hw, cin, hw, hw))

    w = _workload_from_closed(closed, x)
    K64, b64 = np.asarray(K, np.float64), np.asarray(b, np.float64)

    def np_f(X):  # (N, cin, hw, hw) -> (N, cout, hw, hw), float64, by sliding windows
        P = np.pad(X, ((0, 0), (0, 0), (1, 1), (1, 1)))
        win = np.lib.stride_tricks.sliding_window_view(P, (3, 3), axis=(2, 3))  # (N, cin, hw, hw, 3, 3)
        y = np.tensordot(win, K64, axes=([1, 4, 5], [1, 2, 3]))  # (N, hw, hw, cout)
        return np.tanh(np.moveaxis(y, -1, 1) + b64[:, None, None])

    Kt, bt = _t(K), _t(b)

    def g(x):
        return torch.tanh(torch.nn.functional.conv2d(x[None], Kt, bt, padding=1)[0])

    _dense_impls(w, f, x, max(1, min(n, m) // 8), torch and _torch_jac(g), np_f, modes=True)
    return w


def elementwise(n: int, dtype, rng) -> Workload:
    """f(x) = sin(x) * x: a diagonal Jacobian, stored dense."""
    x = _rand(rng, (n,), dtype)
    f = lambda x: jnp.sin(x) * x  # noqa: E731
    w = _workload_from_closed(lambda x: jnp.diag(jnp.cos(x) * x + jnp.sin(x)), x)
    _dense_impls(w, f, x, max(1, n // 8), torch and _torch_jac(lambda x: torch.sin(x) * x), lambda X: np.sin(X) * X)
    w.impls["jacobians.sparse_jacobian"] = Impl(jacobians.sparse_jacobian(f))
    return w


def gram(m: int, n: int, dtype, rng) -> Workload:
    """K = R^T R for R of shape (m, n): an (n, n, m, n) Jacobian (Example 5.13)."""
    R = _rand(rng, (m, n), dtype)
    f = lambda R: R.T @ R  # noqa: E731
    w = _workload_from_closed(jacobians.identities.gram, R)
    _dense_impls(
        w, f, R, max(1, m * n // 8), torch and _torch_jac(lambda R: R.T @ R), lambda X: np.swapaxes(X, -1, -2) @ X
    )
    w.impls["jacobians.sparse_jacobian"] = Impl(jacobians.sparse_jacobian(f))
    return w


# --- batched log|det J| -------------------------------------------------------------------


def _logdet_impls(w: Workload, f: Callable, torch_g, fd: Callable):
    w.impls["jacobians.log_abs_det"] = Impl(jacobians.log_abs_det(f, batched=True))
    w.impls["jax vmap(jacfwd)+slogdet"] = Impl(jax.jit(jax.vmap(lambda x: jnp.linalg.slogdet(jax.jacfwd(f)(x))[1])))
    w.impls["jax vmap(jacrev)+slogdet"] = Impl(jax.jit(jax.vmap(lambda x: jnp.linalg.slogdet(jax.jacrev(f)(x))[1])))
    if torch is not None and torch_g is not None:
        for name in ("torch.func vmap(jacfwd)+slogdet", "torch.func vmap(jacrev)+slogdet"):
            jac = tf.jacfwd(torch_g) if "jacfwd" in name else tf.jacrev(torch_g)
            w.impls[name] = Impl(lambda xs, jac=jac: torch.linalg.slogdet(torch.vmap(jac)(xs))[1], "torch")

    def fd_logdet(xs):
        xs = np.asarray(xs, np.float64)
        d, h = xs.shape[1], 1e-6
        cols = [(fd(xs + h * e) - fd(xs - h * e)) / (2 * h) for e in np.eye(d)]
        return np.linalg.slogdet(np.stack(cols, axis=-1))[1]

    w.impls["numpy-fd"] = Impl(fd_logdet, "numpy")
    w.memory = False


def logdet3(points: int, dtype, rng) -> Workload:
    """log|det J| of f(x) = [x0 + sin x1, x1 exp(0.1 x2), x2 + x0^2] at many points."""
    xs = _rand(rng, (points, 3), dtype)

    def f(x):
        return jnp.stack([x[0] + jnp.sin(x[1]), x[1] * jnp.exp(0.1 * x[2]), x[2] + x[0] ** 2])

    def closed(xs):  # det J = exp(0.1 x2) (1 + 0.2 x0 x1 cos x1)
        x0, x1, x2 = xs[:, 0], xs[:, 1], xs[:, 2]
        return 0.1 * x2 + jnp.log(jnp.abs(1 + 0.2 * x0 * x1 * jnp.cos(x1)))

    w = _workload_from_closed(closed, xs)

    def g(x):
        return torch.stack([x[0] + torch.sin(x[1]), x[1] * torch.exp(0.1 * x[2]), x[2] + x[0] ** 2])

    def fd(X):
        return np.stack([X[:, 0] + np.sin(X[:, 1]), X[:, 1] * np.exp(0.1 * X[:, 2]), X[:, 2] + X[:, 0] ** 2], -1)

    _logdet_impls(w, f, torch and g, fd)
    return w


def _small_det(J):
    """Determinant of a (..., k, k) stack by its cofactor formula, k <= 3 (the closed form)."""
    k = J.shape[-1]
    if k == 1:
        return J[..., 0, 0]
    if k == 2:
        return J[..., 0, 0] * J[..., 1, 1] - J[..., 0, 1] * J[..., 1, 0]
    a, b, c = J[..., 0, 0], J[..., 0, 1], J[..., 0, 2]
    d, e, f = J[..., 1, 0], J[..., 1, 1], J[..., 1, 2]
    g, h, i = J[..., 2, 0], J[..., 2, 1], J[..., 2, 2]
    return a * (e * i - f * h) - b * (d * i - f * g) + c * (d * h - e * g)


def _flow(k: int, dtype, rng):
    """The invertible residual map f(x) = x + 0.5 tanh(W x + b), ||W||_2 = 0.9, R^k -> R^k."""
    W = rng.standard_normal((k, k))
    W = jnp.asarray(0.9 * W / np.linalg.norm(W, 2), dtype)
    b = _rand(rng, (k,), dtype, 0.1)

    def f(x):
        return x + 0.5 * jnp.tanh(W @ x + b)

    def jac(xs):  # the analytic Jacobians I + 0.5 diag(1 - tanh^2) W, (B, k, k)
        s = 1 - jnp.tanh(xs @ W.T + b) ** 2
        return jnp.eye(k, dtype=xs.dtype) + 0.5 * s[:, :, None] * W[None]

    return f, jac, W, b


def logdet(k: int, points: int, dtype, rng) -> Workload:
    """log|det J| at many points of the k-dimensional flow ``x + 0.5 tanh(W x + b)``.

    Closed form: the analytic Jacobians, then the cofactor determinant (k <= 3)
    or ``jnp.linalg.slogdet`` (k > 3).
    """
    f, jac, W, b = _flow(k, dtype, rng)
    xs = _rand(rng, (points, k), dtype)

    def closed(xs):
        J = jac(xs)
        return jnp.log(jnp.abs(_small_det(J))) if k <= 3 else jnp.linalg.slogdet(J)[1]

    w = _workload_from_closed(closed, xs)
    Wt, bt = _t(W), _t(b)
    W64, b64 = np.asarray(W, np.float64), np.asarray(b, np.float64)
    _logdet_impls(
        w,
        f,
        torch and (lambda x: x + 0.5 * torch.tanh(Wt @ x + bt)),
        lambda X: X + 0.5 * np.tanh(X @ W64.T + b64),
    )
    return w


def slogdet(k: int, points: int, dtype, rng) -> Workload:
    """The determinant kernel alone: (sign, log|det|) of a precomputed (B, k, k) stack of Jacobians.

    Each implementation returns what a slogdet returns, the tuple ``(sign, logabsdet)`` of two ``(B,)``
    arrays (a stack of the two would add a pass over the results to every implementation but the one
    XLA fuses it into). The reference is NumPy's float64 ``slogdet`` of the same stack.
    """
    _, jac, _, _ = _flow(k, dtype, rng)
    J = jax.jit(jac)(_rand(rng, (points, k), dtype))
    ref = tuple(np.linalg.slogdet(np.asarray(J, np.float64)))
    w = Workload(J, ref, reference_note="numpy float64", memory=False)
    w.impls["jacobians.kernels.slogdet"] = Impl(jax.jit(lambda J: tuple(kernels.slogdet(J))))
    w.impls["jax vmap(slogdet)"] = Impl(jax.jit(jax.vmap(lambda a: tuple(jnp.linalg.slogdet(a)))))
    w.impls["jnp.linalg.slogdet (batched)"] = Impl(jax.jit(lambda J: tuple(jnp.linalg.slogdet(J))))
    if k <= 3:

        def closed(J):
            d = _small_det(J)
            return jnp.sign(d), jnp.log(jnp.abs(d))

        w.impls["closed-form"] = Impl(jax.jit(closed))
    if torch is not None:
        w.impls["torch.linalg.slogdet"] = Impl(lambda J: tuple(torch.linalg.slogdet(J)), "torch")
    w.impls["numpy.linalg.slogdet"] = Impl(lambda J: tuple(np.linalg.slogdet(J)), "numpy")
    return w


# --- flow layers: log|det J| from the Jacobian's structure ------------------------------------------


def _flow_impls(w: Workload, f: Callable, batch: int, size: int):
    """The library, ``slogdet(jacfwd)`` (the dense baseline) and, already in ``w``, the hand-written floor."""
    def dense(x):
        return jnp.linalg.slogdet(jax.jacfwd(f)(x).reshape(size, size))[1]

    w.impls["jacobians.log_abs_det"] = Impl(jacobians.log_abs_det(f, batched=bool(batch)))
    w.impls["jax slogdet(jacfwd)"] = Impl(jax.jit(jax.vmap(dense) if batch else dense))
    w.explain = lambda: jacobians.log_abs_det(f, batched=bool(batch)).plan(w.x)
    w.memory = False


def _flow_mlp(sizes, dtype, rng):
    ps = [(_rand(rng, (a, b), dtype, 1 / np.sqrt(a)), _rand(rng, (b,), dtype, 0.1))
          for a, b in zip(sizes[:-1], sizes[1:], strict=True)]

    def net(h):
        for W, b in ps[:-1]:
            h = jnp.tanh(h @ W + b)
        return h @ ps[-1][0] + ps[-1][1]

    return net


def logdet_coupling(n: int, batch: int, dtype, rng, hidden: int = 256) -> Workload:
    """A RealNVP affine coupling layer ``[x1, x2 exp(s(x1)) + t(x1)]`` (``batch`` points, 0: one).

    Hand-written floor: ``sum s(x1)``, as flow libraries write it.
    """
    h = n // 2
    net = _flow_mlp([h, hidden, hidden, 2 * h], dtype, rng)

    def f(x):
        st = net(x[:h])
        return jnp.concatenate([x[:h], x[h:] * jnp.exp(jnp.tanh(st[:h])) + st[h:]])

    def hand(x):
        return jnp.sum(jnp.tanh(net(x[:h])[:h]))

    x = _rand(rng, (batch, n) if batch else (n,), dtype)
    w = _workload_from_closed(jax.vmap(hand) if batch else hand, x)
    _flow_impls(w, f, batch, n)
    return w


def logdet_made(n: int, dtype, rng, hidden: int = 512) -> Workload:
    """A masked autoregressive layer (MADE): ``y_i = x_i exp(s_i(x_<i)) + t_i(x_<i)``; floor ``sum s``."""
    deg = np.arange(hidden) % (n - 1)
    M1 = jnp.asarray(deg[None, :] >= np.arange(n)[:, None], dtype)
    M2 = jnp.asarray(np.arange(n)[None, :] > deg[:, None], dtype)
    W1 = _rand(rng, (n, hidden), dtype, 1 / np.sqrt(n)) * M1
    Ws, Wt = (_rand(rng, (hidden, n), dtype, 0.3 / np.sqrt(hidden)) * M2 for _ in range(2))

    def f(x):
        hid = jnp.tanh(x @ W1)
        return x * jnp.exp(jnp.tanh(hid @ Ws)) + hid @ Wt

    def hand(x):
        return jnp.sum(jnp.tanh(jnp.tanh(x @ W1) @ Ws))

    x = _rand(rng, (n,), dtype)
    w = _workload_from_closed(hand, x)
    _flow_impls(w, f, 0, n)
    return w


def logdet_glow(hw: int, c: int, dtype, rng, hidden: int = 32) -> Workload:
    """A Glow step on ``(hw, hw, c)``: actnorm, an invertible 1x1 convolution, an affine coupling (3x3 convs).

    Floor: ``hw^2 (sum log s + log|det W|) + sum s_coupling``, as Glow writes it.
    """
    logs, bias = _rand(rng, (c,), dtype, 0.1), _rand(rng, (c,), dtype, 0.1)
    Wc = jnp.asarray(np.linalg.qr(rng.standard_normal((c, c)))[0], dtype)
    half = c // 2
    K1 = _rand(rng, (3, 3, half, hidden), dtype, 1 / np.sqrt(9 * half))
    K2 = _rand(rng, (3, 3, hidden, c), dtype, 0.1 / np.sqrt(9 * hidden))
    dn = ("NHWC", "HWIO", "NHWC")
    # Full float32 products: with a GPU's default TF32 the log-determinant of 2048 coordinates (about 75)
    # moves by 0.3 between two exact formulas (JAX's own slogdet(jacfwd) too), past the check's tolerance.
    hi = lax.Precision.HIGHEST

    def net(z1):
        hid = jax.nn.relu(lax.conv_general_dilated(z1[None], K1, (1, 1), "SAME", dimension_numbers=dn, precision=hi))
        return lax.conv_general_dilated(hid, K2, (1, 1), "SAME", dimension_numbers=dn, precision=hi)[0]

    def f(x):
        z = jnp.matmul(x * jnp.exp(logs)[None, None] + bias[None, None], Wc.T, precision=hi)
        st = net(z[..., :half])
        return jnp.concatenate([z[..., :half], z[..., half:] * jnp.exp(jnp.tanh(st[..., :half])) + st[..., half:]], -1)

    logdet_w = jnp.linalg.slogdet(Wc)[1]

    def hand(x):
        z = jnp.matmul(x * jnp.exp(logs)[None, None] + bias[None, None], Wc.T, precision=hi)
        return hw * hw * (jnp.sum(logs) + logdet_w) + jnp.sum(jnp.tanh(net(z[..., :half])[..., :half]))

    x = _rand(rng, (hw, hw, c), dtype)
    w = _workload_from_closed(hand, x)
    _flow_impls(w, f, 0, hw * hw * c)
    return w


def logdet_elementwise(n: int, dtype, rng) -> Workload:
    """An elementwise flow ``tanh(a x) + 0.1 x``; floor ``sum log(a (1 - tanh^2(a x)) + 0.1)``."""
    a = jnp.asarray(np.linspace(0.5, 1.5, n), dtype)

    def f(x):
        return jnp.tanh(a * x) + 0.1 * x

    def hand(x):
        return jnp.sum(jnp.log(a * (1 - jnp.tanh(a * x) ** 2) + 0.1))

    x = _rand(rng, (n,), dtype)
    w = _workload_from_closed(hand, x)
    _flow_impls(w, f, 0, n)
    return w


def logdet_dense(n: int, dtype, rng) -> Workload:
    """A dense map ``tanh(A x) + x``: no structure, the dense path (the floor: the analytic Jacobian's slogdet)."""
    A = _rand(rng, (n, n), dtype, 1 / np.sqrt(n))

    def f(x):
        return jnp.tanh(A @ x) + x

    def hand(x):
        return jnp.linalg.slogdet((1 - jnp.tanh(A @ x) ** 2)[:, None] * A + jnp.eye(n, dtype=x.dtype))[1]

    x = _rand(rng, (n,), dtype)
    w = _workload_from_closed(hand, x)
    _flow_impls(w, f, 0, n)
    return w


# --- sparse Jacobians ---------------------------------------------------------------------


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
    if asdex is not None:
        coloring = asdex.jacobian_coloring(f_flat, x_flat)
        w.impls["asdex"] = Impl(jax.jit(asdex.jacobian_from_coloring(f_flat, coloring)))
        w.colors["asdex"] = int(coloring.num_colors)
        w.detect["asdex"] = lambda: asdex.jacobian_coloring(f_flat, x_flat)
    if dense_ok:
        w.impls["jax.jacfwd"] = Impl(jax.jit(jax.jacfwd(f_flat)))
    else:
        w.skipped["jax.jacfwd"] = f"not run: dense Jacobian too large ({m} x {n})"
    plan = jacobians.sparse_jacobian(f_flat).plan(x_flat)
    w.colors["jacobians.sparse_jacobian"] = plan.n_colors

    def detect_ours():
        p = jacobians.sparsity(f_flat, x_flat)
        return _coloring.color_columns(p.rows, p.cols, n)

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
    w = Workload(u, SparseRef(n - 2, n, keys[order], vals[order]), reference_note="numpy float64")
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
    w = Workload(U, SparseRef(k * k, k * k, keys[order], vals[order]), reference_note="numpy float64")
    at, n_const = jnp.asarray(np.stack([rows, cols], 1)), rows.size - k * k

    def closed(u):  # the hand-written nonzeros in a BCOO
        data = jnp.concatenate([3 * u**2 - 4.0, jnp.ones(n_const, u.dtype)])
        return jax.experimental.sparse.BCOO((data, at), shape=(k * k, k * k))

    w.impls["closed-form"] = Impl(jax.jit(closed))
    _sparse_impls(w, f, U, rows, cols, k * k, k * k, dense_ok=k * k <= 2048)
    return w


# --- second order, batches and traces ----------------------------------------------------------


def _ref64(fn, x):
    """A float64 reference from JAX autodiff (where no closed form is written out); ``x`` may be a pytree."""
    x64 = jax.tree_util.tree_map(lambda a: jnp.asarray(np.asarray(a), jnp.float64), x)  # the suite runs with x64
    return jax.tree_util.tree_map(np.asarray, fn(x64))


def hessian_mlp(n: int, dtype, rng) -> Workload:
    """The Hessian of an MLP loss L(x) = 1/2 ||tanh(W2 tanh(W1 x))||^2, x in R^n."""
    W1 = _rand(rng, (n, n), dtype, 1 / np.sqrt(n))
    W2 = _rand(rng, (n, n), dtype, 1 / np.sqrt(n))

    def loss(x):
        return 0.5 * jnp.sum(jnp.tanh(W2.astype(x.dtype) @ jnp.tanh(W1.astype(x.dtype) @ x)) ** 2)

    x = _rand(rng, (n,), dtype)
    w = Workload(x, _ref64(jax.hessian(loss), x), reference_note="jax.hessian float64")
    _hessian_impls(w, loss, n, lambda v: 0.5 * torch.sum(torch.tanh(_t(W2) @ torch.tanh(_t(W1) @ v)) ** 2))
    return w


def hessian_pairwise(atoms: int, dtype, rng) -> Workload:
    """The Hessian of a smooth pairwise energy E(x) = sum_{i<j} exp(-|x_i - x_j|^2), atoms in 3-D."""
    iu = np.triu_indices(atoms, 1)

    def energy(x):
        X = x.reshape(atoms, 3)
        d2 = jnp.sum((X[:, None, :] - X[None, :, :]) ** 2, axis=-1)
        return jnp.sum(jnp.exp(-d2[iu]))

    x = _rand(rng, (3 * atoms,), dtype, 0.7)

    def torch_energy(v):
        X = v.reshape(atoms, 3)
        d2 = torch.sum((X[:, None, :] - X[None, :, :]) ** 2, dim=-1)
        return torch.sum(torch.exp(-d2[iu]))

    w = Workload(x, _ref64(jax.hessian(energy), x), reference_note="jax.hessian float64")
    _hessian_impls(w, energy, 3 * atoms, torch_energy)
    return w


def _hessian_impls(w: Workload, f: Callable, n: int, torch_f):
    w.impls["jacobians"] = Impl(jacobians.hessian(f))
    w.impls[f"jacobians[chunk={max(1, n // 8)}]"] = Impl(jacobians.hessian(f, chunk_size=max(1, n // 8)))
    w.impls["jax.hessian"] = Impl(jax.jit(jax.hessian(f)))
    if torch is not None:
        w.impls["torch.func.hessian"] = Impl(tf.hessian(torch_f), "torch")


def _sparse_hessian_impls(w: Workload, f: Callable, x, dense_ok: bool):
    # dense_ok: jax.hessian only where its (n, n) result is small (--quick). At n = 10^4 it is a 0.7 s call
    # with a 400 MB result, and the sparse implementations timed after it in the same round ran 2-5x slower.
    w.impls["jacobians.sparse_hessian"] = Impl(jacobians.sparse_hessian(f))
    plan = jacobians.sparse_hessian(f).plan(x)
    w.colors["jacobians.sparse_hessian"] = plan.n_colors

    def detect_ours():
        return jacobians.sparse_hessian(f).plan(x)

    w.detect["jacobians"] = detect_ours
    if asdex is not None:
        coloring = asdex.hessian_coloring(f, x)
        w.impls["asdex"] = Impl(jax.jit(asdex.hessian_from_coloring(f, coloring)))
        w.colors["asdex"] = int(coloring.num_colors)
        w.detect["asdex"] = lambda: asdex.hessian_coloring(f, x)
    if dense_ok:
        w.impls["jax.hessian"] = Impl(jax.jit(jax.hessian(f)))


def _sym_ref(n, rows, cols, vals) -> SparseRef:
    keys = np.asarray(rows) * n + np.asarray(cols)
    order = np.argsort(keys)
    return SparseRef(n, n, keys[order], np.asarray(vals, np.float64)[order])


def rosenbrock(n: int, dtype, rng) -> Workload:
    """The chained Rosenbrock function: a tridiagonal Hessian."""
    x = _rand(rng, (n,), dtype, 0.5)

    def f(x):
        return jnp.sum(100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2)

    xn = np.asarray(x, np.float64)
    d = np.zeros(n)
    d[:-1] += 1200 * xn[:-1] ** 2 - 400 * xn[1:] + 2
    d[1:] += 200
    off = -400 * xn[:-1]
    i = np.arange(n - 1)
    w = Workload(x, _sym_ref(n, np.r_[np.arange(n), i, i + 1], np.r_[np.arange(n), i + 1, i], np.r_[d, off, off]),
                 reference_note="closed form (numpy float64)")
    _sparse_hessian_impls(w, f, x, dense_ok=n <= 2048)
    return w


def arrowhead(n: int, dtype, rng) -> Workload:
    """f(x) = x_0 sum(x) + sum(sin x): a dense first row and column plus the diagonal."""
    x = _rand(rng, (n,), dtype)

    def f(x):
        return x[0] * jnp.sum(x) + jnp.sum(jnp.sin(x))

    xn = np.asarray(x, np.float64)
    d = -np.sin(xn)
    d[0] += 2
    j = np.arange(1, n)
    rows = np.r_[np.arange(n), np.zeros(n - 1, int), j]
    cols = np.r_[np.arange(n), j, np.zeros(n - 1, int)]
    w = Workload(x, _sym_ref(n, rows, cols,
                             np.r_[d, np.ones(n - 1), np.ones(n - 1)]), reference_note="closed form (numpy float64)")
    _sparse_hessian_impls(w, f, x, dense_ok=n <= 2048)
    return w


def banded(n: int, dtype, rng, band: int = 3) -> Workload:
    """f(x) = sum_i sum_{k=1..band} c_k x_i x_{i+k} + sum cos(x): a banded Hessian."""
    c = np.arange(1.0, band + 1)
    x = _rand(rng, (n,), dtype)

    def f(x):
        return sum(c[k - 1] * jnp.sum(x[:-k] * x[k:]) for k in range(1, band + 1)) + jnp.sum(jnp.cos(x))

    xn = np.asarray(x, np.float64)
    rows, cols, vals = [np.arange(n)], [np.arange(n)], [-np.cos(xn)]
    for k in range(1, band + 1):
        i = np.arange(n - k)
        rows += [i, i + k]
        cols += [i + k, i]
        vals += [np.full(n - k, c[k - 1])] * 2
    w = Workload(x, _sym_ref(n, *map(np.concatenate, (rows, cols, vals))), reference_note="closed form (numpy float64)")
    _sparse_hessian_impls(w, f, x, dense_ok=n <= 2048)
    return w


def laplacian_energy(k: int, dtype, rng) -> Workload:
    """E(u) = 1/2 sum over grid edges (u_i - u_j)^2 + 1/4 sum u^4 on a k x k grid: H = L + diag(3 u^2)."""
    x = _rand(rng, (k * k,), dtype)

    def f(u):
        U = u.reshape(k, k)
        return 0.5 * (jnp.sum((U[1:] - U[:-1]) ** 2) + jnp.sum((U[:, 1:] - U[:, :-1]) ** 2)) + 0.25 * jnp.sum(u**4)

    idx = np.arange(k * k).reshape(k, k)
    a = np.r_[idx[1:].ravel(), idx[:, 1:].ravel()]
    b = np.r_[idx[:-1].ravel(), idx[:, :-1].ravel()]
    deg = np.bincount(np.r_[a, b], minlength=k * k).astype(float)
    xn = np.asarray(x, np.float64)
    ref = _sym_ref(k * k, np.r_[np.arange(k * k), a, b], np.r_[np.arange(k * k), b, a],
                   np.r_[deg + 3 * xn**2, -np.ones(a.size), -np.ones(a.size)])
    w = Workload(x, ref, reference_note="closed form (numpy float64)")
    _sparse_hessian_impls(w, f, x, dense_ok=k * k <= 2048)
    return w


def batch_mlp(batch: int, n: int, dtype, rng) -> Workload:
    """Per-example Jacobians of a batch-first MLP f(X) = tanh(tanh(X W1^T) W2^T), X of shape (B, n)."""
    W1 = _rand(rng, (n, n), dtype, 1 / np.sqrt(n))
    W2 = _rand(rng, (n, n), dtype, 1 / np.sqrt(n))
    X = _rand(rng, (batch, n), dtype)

    def f(X):
        return jnp.tanh(jnp.tanh(X @ W1.T) @ W2.T)

    def single(x):
        return jnp.tanh(W2 @ jnp.tanh(W1 @ x))

    W1n, W2n, Xn = (np.asarray(a, np.float64) for a in (W1, W2, X))
    H = np.tanh(Xn @ W1n.T)
    Y = np.tanh(H @ W2n.T)
    ref = (1 - Y**2)[:, :, None] * np.einsum("ij,bj,jk->bik", W2n, 1 - H**2, W1n)
    w = Workload(X, ref)

    def closed(X):  # the chain rule by hand in JAX (the floor): diag(s2) W2 diag(s1) W1 per example
        Hj = jnp.tanh(X @ W1.T)
        Yj = jnp.tanh(Hj @ W2.T)
        return (1 - Yj**2)[:, :, None] * ((W2[None] * (1 - Hj**2)[:, None, :]) @ W1)

    w.impls["closed-form"] = Impl(jax.jit(closed))
    w.impls["jacobians.batch_jacobian"] = Impl(jacobians.batch_jacobian(f))
    w.impls["vmap(jacobians.jacobian)"] = Impl(jax.jit(jax.vmap(jacobians.jacobian(single))))
    w.impls["jax.vmap(jax.jacrev)"] = Impl(jax.jit(jax.vmap(jax.jacrev(single))))
    w.impls["jax.vmap(jax.jacfwd)"] = Impl(jax.jit(jax.vmap(jax.jacfwd(single))))
    if torch is not None:
        tsingle = lambda v: torch.tanh(_t(W2) @ torch.tanh(_t(W1) @ v))  # noqa: E731
        w.impls["torch.func.vmap(jacrev)"] = Impl(tf.vmap(tf.jacrev(tsingle)), "torch")
    return w


def divergence_mlp(n: int, dtype, rng) -> Workload:
    """The exact divergence tr(J) of a square MLP vector field, R^n -> R^n."""
    W1 = _rand(rng, (n, n), dtype, 1 / np.sqrt(n))
    W2 = _rand(rng, (n, n), dtype, 1 / np.sqrt(n))

    def f(x):
        return jnp.tanh(W2 @ jnp.tanh(W1 @ x))

    x = _rand(rng, (n,), dtype)
    W1n, W2n, xn = (np.asarray(a, np.float64) for a in (W1, W2, x))
    h = np.tanh(W1n @ xn)
    y = np.tanh(W2n @ h)
    ref = np.asarray(np.einsum("i,ij,j,ji->", 1 - y**2, W2n, 1 - h**2, W1n))
    w = Workload(x, ref)
    w.impls["jacobians.divergence"] = Impl(jacobians.divergence(f))
    w.impls["trace(jax.jacfwd)"] = Impl(jax.jit(lambda x: jnp.trace(jax.jacfwd(f)(x))))
    w.impls["trace(jax.jacrev)"] = Impl(jax.jit(lambda x: jnp.trace(jax.jacrev(f)(x))))
    return w


def laplacian_closed_mlp(n: int, dtype, rng) -> Workload:
    """The Laplacian of ``sum(tanh(W2 tanh(W1 x)))`` with closed-over ``n x n`` weights: a compile-time case.

    The weights are constants of every compiled program; seeds that XLA could fold with them cost
    seconds to minutes of compile time (issue 27). The report's first-call column is the point here:
    each engine's first call against ``jit(trace(jax.hessian))`` and ``jit(trace(jax.jacfwd(jax.grad)))``.
    """
    W1 = _rand(rng, (n, n), dtype, 1 / np.sqrt(n))
    W2 = _rand(rng, (n, n), dtype, 1 / np.sqrt(n))

    def f(x):
        return jnp.sum(jnp.tanh(W2 @ jnp.tanh(W1 @ x)))

    x = _rand(rng, (n,), dtype)
    w = Workload(x, _ref64(lambda x: jnp.trace(jax.hessian(f)(x)), x), reference_note="trace(jax.hessian) float64")
    w.impls["jacobians.laplacian"] = Impl(jacobians.laplacian(f))
    w.impls["jacobians.laplacian[hvp]"] = Impl(jacobians.laplacian(f, method="hvp"))
    w.impls["jacobians.divergence(jax.grad)"] = Impl(jacobians.divergence(jax.grad(f)))
    w.impls["jax trace(hessian)"] = Impl(jax.jit(lambda x: jnp.trace(jax.hessian(f)(x))))
    w.impls["trace(jax.jacfwd(jax.grad))"] = Impl(jax.jit(lambda x: jnp.trace(jax.jacfwd(jax.grad(f))(x))))
    w.memory = False
    return w


def divergence_stencil(n: int, dtype, rng) -> Workload:
    """The exact divergence of a 1-D reaction-diffusion field (periodic): a tridiagonal Jacobian."""
    x = _rand(rng, (n,), dtype)

    def f(u):
        return jnp.roll(u, 1) - 2 * u + jnp.roll(u, -1) + u**3

    ref = np.asarray(np.sum(-2 + 3 * np.asarray(x, np.float64) ** 2))
    w = Workload(x, ref)
    w.impls["jacobians.divergence"] = Impl(jacobians.divergence(f))
    if n <= 4096:
        w.impls["trace(jax.jacfwd)"] = Impl(jax.jit(lambda x: jnp.trace(jax.jacfwd(f)(x))))
    else:
        w.skipped["trace(jax.jacfwd)"] = f"not run: dense Jacobian too large ({n} x {n})"
    return w


# --- Jacobians with respect to model parameters (pytrees) ------------------------------------------
# NTK, Gauss-Newton, Laplace and Fisher computations differentiate a model's outputs with respect to a
# pytree of weights: many inputs (the parameters), few outputs (the logits). References and results
# are pytrees of numerator-layout blocks, ``out.shape + leaf.shape`` per parameter leaf.


def _param_impls(w: Workload, f: Callable, n: int, torch_f=None, fwd_ok: bool = True):
    """The library (default and forced modes) against jit(jacrev) and jit(jacfwd) on ``f(params)``."""
    w.impls["jacobians"] = Impl(jacobians.jacobian(f))
    w.impls["jacobians[rev]"] = Impl(jacobians.jacobian(f, mode="rev"))
    w.impls["jax.jacrev"] = Impl(jax.jit(jax.jacrev(f)))
    if fwd_ok:
        w.impls["jax.jacfwd"] = Impl(jax.jit(jax.jacfwd(f)))
    else:  # jacfwd pushes the n x n identity: it does not fit
        w.skipped["jax.jacfwd"] = f"not run: {n} JVPs over an {n} x {n} basis"
    if torch is not None and torch_f is not None:
        w.impls["torch.func.jacrev"] = Impl(torch_f, "torch")
    w.explain = lambda: jacobians.explain(f, w.x)


def _torch_param_jac(module, tp: dict, tx, rebuild: Callable) -> Callable:
    """torch.func's parameter Jacobian: ``jacrev`` of ``functional_call(module, params, (x,))``.

    Args:
        module: the torch module; its own parameters are replaced by ``tp`` in the call.
        tp: torch parameter name -> tensor (copies of the JAX parameters).
        tx: the input.
        rebuild: torch's result (a dict by parameter name) -> the JAX pytree's structure.

    Returns:
        A one-argument call (the JAX parameters, ignored: torch keeps its own copy) returning the Jacobian.
    """
    jr = tf.jacrev(lambda tp: tf.functional_call(module, tp, (tx,)))
    return lambda _p: rebuild(jr(tp))


def _nest(flat: dict, names: dict) -> dict:
    """torch's result by parameter name -> the JAX pytree's structure.

    Args:
        flat: ``{"0.weight": t, ...}``, as ``torch.func`` returns for ``named_parameters``.
        names: torch name -> (layer, leaf) of the JAX dict, e.g. ``{"0.weight": ("l0", "w")}``.

    Returns:
        ``{"l0": {"w": t, ...}, ...}``.
    """
    out: dict = {}
    for tname, (layer, leaf) in names.items():
        out.setdefault(layer, {})[leaf] = flat[tname]
    return out


def _torch_mlp(sizes, act) -> tuple:
    """An ``nn.Sequential`` MLP (``act`` between layers) and its torch name -> JAX (layer, leaf) map.

    The module's own weights are never used: ``torch.func.functional_call`` swaps in copies of the
    JAX parameters, as a user differentiating a module's parameters does.
    """
    mods = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        mods += [torch.nn.Linear(a, b)] + ([act()] if i < len(sizes) - 2 else [])
    names = {f"{2 * i}.{t}": (f"l{i}", j) for i in range(len(sizes) - 1) for t, j in (("weight", "w"), ("bias", "b"))}
    return torch.nn.Sequential(*mods), names


def _torch_params(p: dict, names: dict) -> dict:
    """The JAX parameter dict as torch tensors (copies) under the module's parameter names."""
    return {tname: _t(p[layer][leaf]) for tname, (layer, leaf) in names.items()}


def _mlp_params(sizes, dtype, rng) -> dict:
    return {
        f"l{i}": {"w": _rand(rng, (b, a), dtype, 1 / np.sqrt(a)), "b": _rand(rng, (b,), dtype, 0.1)}
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True))
    }


def _mlp_apply(p, x):
    """tanh hidden layers, linear logits: (d,) -> (c,)."""
    layers = len(p)
    for i in range(layers):
        x = p[f"l{i}"]["w"] @ x + p[f"l{i}"]["b"]
        if i < layers - 1:
            x = jnp.tanh(x)
    return x


def param_mlp(d: int, h: int, c: int, dtype, rng) -> Workload:
    """d(logits)/d(params) of an MLP d-h-h-c (784-512-512-10: 670k parameters) at one input."""
    p = _mlp_params((d, h, h, c), dtype, rng)
    x = _rand(rng, (d,), dtype)
    n = sum(a.size for a in jax.tree_util.tree_leaves(p))

    def f(p):
        return _mlp_apply(p, x)

    # The closed form (float64): backpropagated layer sensitivities G_l (c, width) times the layer inputs.
    q = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), p)
    xn = np.asarray(x, np.float64)
    h1 = np.tanh(q["l0"]["w"] @ xn + q["l0"]["b"])
    h2 = np.tanh(q["l1"]["w"] @ h1 + q["l1"]["b"])
    eye = np.eye(c)
    g2 = q["l2"]["w"] * (1 - h2**2)[None]
    g1 = (g2 @ q["l1"]["w"]) * (1 - h1**2)[None]
    ref = {
        "l2": {"w": eye[:, :, None] * h2[None, None], "b": eye},
        "l1": {"w": g2[:, :, None] * h1[None, None], "b": g2},
        "l0": {"w": g1[:, :, None] * xn[None, None], "b": g1},
    }
    w = Workload(p, ref, reference_note="closed form (numpy float64)", memory=False)
    torch_f = None
    if torch is not None:
        net, names = _torch_mlp((d, h, h, c), torch.nn.Tanh)
        torch_f = _torch_param_jac(net, _torch_params(p, names), _t(x), lambda r: _nest(r, names))
    _param_impls(w, f, n, torch_f, fwd_ok=n <= 4096)
    return w


def param_cnn(hw: int, dtype, rng) -> Workload:
    """d(logits)/d(params) of a small CNN: conv 3x3 (1->8), conv 3x3 stride 2 (8->16), dense -> 10."""
    p = {
        "c1": {"w": _rand(rng, (8, 1, 3, 3), dtype, 1 / 3), "b": _rand(rng, (8,), dtype, 0.1)},
        "c2": {"w": _rand(rng, (16, 8, 3, 3), dtype, 1 / np.sqrt(72)), "b": _rand(rng, (16,), dtype, 0.1)},
    }
    flat = 16 * (hw // 2) ** 2
    p["fc"] = {"w": _rand(rng, (10, flat), dtype, 1 / np.sqrt(flat)), "b": _rand(rng, (10,), dtype, 0.1)}
    img = _rand(rng, (1, 1, hw, hw), dtype)
    dn = ("NCHW", "OIHW", "NCHW")

    def net(p, img):
        z = lax.conv_general_dilated(img, p["c1"]["w"], (1, 1), "SAME", dimension_numbers=dn)
        z = jnp.tanh(z + p["c1"]["b"][None, :, None, None])
        z = lax.conv_general_dilated(z, p["c2"]["w"], (2, 2), "SAME", dimension_numbers=dn)
        z = jnp.tanh(z + p["c2"]["b"][None, :, None, None])
        return p["fc"]["w"] @ z.reshape(-1) + p["fc"]["b"]

    n = sum(a.size for a in jax.tree_util.tree_leaves(p))
    ref = _ref64(jax.jacrev(lambda q: net(q, img.astype(jnp.float64))), p)
    w = Workload(p, ref, reference_note="jax.jacrev in float64", memory=False)
    torch_f = None
    if torch is not None:
        names = {f"{layer}.{t}": (layer, j) for layer in p for t, j in (("weight", "w"), ("bias", "b"))}
        torch_f = _torch_param_jac(_torch_cnn(hw), _torch_params(p, names), _t(img), lambda r: _nest(r, names))
    _param_impls(w, lambda q: net(q, img), n, torch_f, fwd_ok=n <= 8192)
    return w


def _torch_cnn(hw: int):
    """param_cnn's network as a torch module (parameters c1, c2, fc), input (1, 1, hw, hw)."""

    class CNN(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = torch.nn.Conv2d(1, 8, 3, padding=1)
            self.c2 = torch.nn.Conv2d(8, 16, 3, stride=2)
            self.fc = torch.nn.Linear(16 * (hw // 2) ** 2, 10)

        def forward(self, img):
            z = torch.tanh(self.c1(img))
            # JAX's "SAME" at stride 2 on an even size pads one row and column after, none before.
            z = torch.tanh(self.c2(torch.nn.functional.pad(z, (0, 1, 0, 1))))
            return self.fc(z.reshape(-1))

    return CNN()


@jax.tree_util.register_pytree_node_class
class _Linear:
    """An Equinox-style layer: a pytree whose leaves are its arrays, called like a function."""

    def __init__(self, weight, bias):
        self.weight, self.bias = weight, bias

    def __call__(self, x):
        return self.weight @ x + self.bias

    def tree_flatten(self):
        return (self.weight, self.bias), None

    @classmethod
    def tree_unflatten(cls, _, leaves):
        return cls(*leaves)


@jax.tree_util.register_pytree_node_class
class _Model:
    """An Equinox-style model: a list of layers and an activation, a pytree of arrays."""

    def __init__(self, layers):
        self.layers = list(layers)

    def __call__(self, x):
        for layer in self.layers[:-1]:
            x = jax.nn.gelu(layer(x))
        return self.layers[-1](x)

    def tree_flatten(self):
        return tuple(self.layers), None

    @classmethod
    def tree_unflatten(cls, _, layers):
        return cls(layers)


def param_module(d: int, h: int, c: int, dtype, rng) -> Workload:
    """d(outputs)/d(model) for an Equinox-style module (a pytree class), GELU MLP d-h-h-c."""
    sizes = (d, h, h, c)
    model = _Model(
        _Linear(_rand(rng, (b, a), dtype, 1 / np.sqrt(a)), _rand(rng, (b,), dtype, 0.1))
        for a, b in zip(sizes[:-1], sizes[1:], strict=True)
    )
    x = _rand(rng, (d,), dtype)
    n = sum(a.size for a in jax.tree_util.tree_leaves(model))
    ref = _ref64(jax.jacrev(lambda m: m(x.astype(jnp.float64))), model)
    w = Workload(model, ref, reference_note="jax.jacrev in float64", memory=False)
    torch_f = None
    if torch is not None:  # the same GELU (tanh approximation, as jax.nn.gelu's default) as an nn.Sequential
        net, names = _torch_mlp(sizes, lambda: torch.nn.GELU(approximate="tanh"))
        p = {f"l{i}": {"w": layer.weight, "b": layer.bias} for i, layer in enumerate(model.layers)}

        def rebuild(r):
            q = _nest(r, names)
            return _Model(_Linear(q[f"l{i}"]["w"], q[f"l{i}"]["b"]) for i in range(len(q)))

        torch_f = _torch_param_jac(net, _torch_params(p, names), _t(x), rebuild)
    _param_impls(w, lambda m: m(x), n, torch_f, fwd_ok=n <= 4096)
    return w


def per_example_grads(batch: int, d: int, h: int, c: int, dtype, rng) -> Workload:
    """Per-example parameter gradients of a softmax cross-entropy loss: vmap over examples, params shared.

    ``batch_jacobian`` is the wrong tool here (it differentiates per-example *inputs*); the library's
    answer is ``jax.vmap(jacobians.jacobian(loss), in_axes=(None, 0, 0))``, i.e. ``jacobian`` composed
    with ``vmap`` like any JAX transformation.
    """
    p = _mlp_params((d, h, c), dtype, rng)
    X = _rand(rng, (batch, d), dtype)
    labels = jnp.asarray(rng.integers(0, c, batch))

    def loss(p, x, y):
        logits = _mlp_apply(p, x)
        return jax.nn.logsumexp(logits) - logits[y]

    q = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), p)
    Xn = np.asarray(X, np.float64)
    hid = np.tanh(Xn @ q["l0"]["w"].T + q["l0"]["b"])  # (B, h)
    logits = hid @ q["l1"]["w"].T + q["l1"]["b"]
    prob = np.exp(logits - logits.max(1, keepdims=True))
    prob /= prob.sum(1, keepdims=True)
    g1 = prob - np.eye(c)[np.asarray(labels)]  # (B, c)
    g0 = (g1 @ q["l1"]["w"]) * (1 - hid**2)  # (B, h)
    ref = {
        "l0": {"w": g0[:, :, None] * Xn[:, None, :], "b": g0},
        "l1": {"w": g1[:, :, None] * hid[:, None, :], "b": g1},
    }
    w = Workload(p, ref, reference_note="closed form (numpy float64)", memory=False)

    def closed(p):  # the same formulas in JAX: the floor (two outer products per example, no autodiff)
        hid = jnp.tanh(X @ p["l0"]["w"].T + p["l0"]["b"])
        z = hid @ p["l1"]["w"].T + p["l1"]["b"]
        g1 = jax.nn.softmax(z) - jax.nn.one_hot(labels, c, dtype=z.dtype)
        g0 = (g1 @ p["l1"]["w"]) * (1 - hid**2)
        return {"l0": {"w": g0[:, :, None] * X[:, None, :], "b": g0},
                "l1": {"w": g1[:, :, None] * hid[:, None, :], "b": g1}}

    w.impls["closed-form"] = Impl(jax.jit(closed))
    w.impls["jacobians.jacobian[vmap]"] = Impl(
        jax.jit(lambda p: jax.vmap(jacobians.jacobian(loss), in_axes=(None, 0, 0))(p, X, labels))
    )
    w.impls["jax.vmap(jax.grad)"] = Impl(
        jax.jit(lambda p: jax.vmap(jax.grad(loss), in_axes=(None, 0, 0))(p, X, labels))
    )
    w.impls["jax.vmap(jax.jacrev)"] = Impl(
        jax.jit(lambda p: jax.vmap(jax.jacrev(loss), in_axes=(None, 0, 0))(p, X, labels))
    )
    if torch is not None:
        net, names = _torch_mlp((d, h, c), torch.nn.Tanh)
        tp, tX, tl = _torch_params(p, names), _t(X), _t(labels)

        def tloss(tp, x, y):  # functional_call + vmap(grad): torch.func's per-sample-gradient recipe
            z = tf.functional_call(net, tp, (x[None],))
            return torch.nn.functional.cross_entropy(z, y[None])  # logsumexp(z) - z[y] (z[y] fails under vmap)

        g = tf.vmap(tf.grad(tloss), in_dims=(None, 0, 0))
        w.impls["torch.func.vmap(grad)"] = Impl(lambda _p: _nest(g(tp, tX, tl), names), "torch")
    return w


# --- Laplacians: forward Laplacian (dense and sparse) against Hessian traces and folx ----------------------

try:  # folx is an optional peer (a forward Laplacian for neural wavefunctions)
    import folx
except ImportError:  # pragma: no cover - optional comparison
    folx = None


def _lap_params(sizes, dtype, rng):
    return [(_rand(rng, (a, b), dtype, 1 / np.sqrt(a)), _rand(rng, (b,), dtype, 0.1))
            for a, b in zip(sizes[:-1], sizes[1:], strict=True)]


def _lap_apply(params, h, act):
    for i, (W, b) in enumerate(params):
        h = h @ W.astype(h.dtype) + b.astype(h.dtype)
        if i < len(params) - 1:
            h = act(h)
    return h


def _laplacian_impls(w: Workload, f: Callable, X, folx_sparsity: float):
    """The library's Laplacian and its peers, each ``jax.jit(jax.vmap(...))`` over the batch ``X``."""
    lap = jacobians.laplacian(f)
    ours = jax.jit(jax.vmap(lambda x: lap(x)))  # a lambda: jit would copy lap.plan, which reads a batch as one input
    ours.plan = lambda X: lap.plan(X[0])  # the plan of one point, for the report's plan column
    w.impls["jacobians.laplacian"] = Impl(ours)
    if folx is not None:
        w.impls["folx.forward_laplacian"] = Impl(jax.jit(jax.vmap(
            lambda x: folx.forward_laplacian(f, sparsity_threshold=folx_sparsity)(x).laplacian)))
    w.impls["jax trace(hessian)"] = Impl(jax.jit(jax.vmap(lambda x: jnp.trace(
        jax.hessian(f)(x).reshape(x.size, x.size)))))
    w.impls["jacobians.divergence(jax.grad)"] = Impl(jax.jit(jax.vmap(jacobians.divergence(jax.grad(f)))))
    w.explain = lambda: jacobians.laplacian(f).plan(X[0])
    w.memory = False


def laplacian_pernode(nodes: int, coords: int, width: int, layers: int, batch: int, dtype, rng) -> Workload:
    """folx's sparse workload: a SiLU MLP applied to each node's coordinates, summed; Laplacians of a batch.

    ``f(x) = sum_i mlp(x_i)`` for ``x`` of shape ``(nodes, coords)``: the Hessian is block diagonal,
    each intermediate depends on one node's ``coords`` inputs.
    """
    params = _lap_params([coords] + [width] * (layers - 1) + [1], dtype, rng)

    def f(x):
        return jnp.sum(_lap_apply(params, x, jax.nn.silu))

    X = _rand(rng, (batch, nodes, coords), dtype)
    ref = _ref64(jax.vmap(lambda x: jnp.trace(jax.hessian(f)(x).reshape(x.size, x.size))), X)
    w = Workload(X, ref, reference_note="trace(jax.hessian) float64")
    _laplacian_impls(w, f, X, 0.6)
    return w


def laplacian_pinn(d: int, points: int, dtype, rng, width: int = 100, layers: int = 4) -> Workload:
    """A physics-informed network's Laplacian: a dense tanh MLP ``R^d -> R`` at ``points`` collocation points."""
    params = _lap_params([d] + [width] * (layers - 1) + [1], dtype, rng)

    def f(x):
        return _lap_apply(params, x, jnp.tanh)[0]

    X = _rand(rng, (points, d), dtype)
    ref = _ref64(jax.vmap(lambda x: jnp.trace(jax.hessian(f)(x))), X)
    w = Workload(X, ref, reference_note="trace(jax.hessian) float64")
    _laplacian_impls(w, f, X, 0.0)
    return w


def laplacian_local_energy(electrons: int, walkers: int, dtype, rng) -> Workload:
    """``(log psi, grad log psi, laplacian log psi)`` of a Slater-Jastrow-like wavefunction at a batch of walkers.

    ``log psi(r) = log |det phi(r)| + sum_{i<j} J(r_ij)`` for ``electrons`` electrons in 3-D: exponential
    orbitals about fixed centres and a Pade-like Jastrow factor. The local energy's ingredients,
    from ``jacobians.value_grad_and_laplacian`` in one pass.
    """
    centres = _rand(rng, (electrons, 3), dtype, 2.0)
    decay = jnp.asarray(rng.uniform(0.5, 1.5, electrons), dtype)
    iu = np.triu_indices(electrons, 1)

    def log_psi(r):  # r: (electrons, 3)
        d = jnp.sqrt(jnp.sum((r[:, None, :] - centres.astype(r.dtype)[None]) ** 2, -1) + 1e-2)
        phi = jnp.exp(-decay.astype(r.dtype)[None, :] * d) * (1 + 0.1 * r[:, :1])
        rij = jnp.sqrt(jnp.sum((r[:, None, :] - r[None, :, :]) ** 2, -1) + 1e-2)[iu]
        return jnp.linalg.slogdet(phi)[1] + jnp.sum(0.5 * rij / (1 + rij))

    def dense(r):
        n = r.size
        return log_psi(r), jax.grad(log_psi)(r), jnp.trace(jax.hessian(log_psi)(r).reshape(n, n))

    # Each electron near its own orbital's centre: a well-conditioned determinant (float32 stays accurate).
    R = jnp.asarray(np.asarray(centres)[None] + 0.3 * rng.standard_normal((walkers, electrons, 3)), dtype)
    w = Workload(R, _ref64(jax.vmap(dense), R), reference_note="jax value, grad, trace(hessian) float64")
    vgl = jacobians.value_grad_and_laplacian(log_psi)
    ours = jax.jit(jax.vmap(lambda r: vgl(r)))
    ours.plan = lambda R: vgl.plan(R[0])
    w.impls["jacobians.value_grad_and_laplacian"] = Impl(ours)
    if folx is not None:
        def folx_vgl(r):
            o = folx.forward_laplacian(log_psi, sparsity_threshold=0)(r)
            return o.x, o.jacobian.dense_array.reshape(r.shape), o.laplacian

        w.impls["folx.forward_laplacian"] = Impl(jax.jit(jax.vmap(folx_vgl)))
    w.impls["jax (f, grad, trace(hessian))"] = Impl(jax.jit(jax.vmap(dense)))
    w.explain = lambda: vgl.plan(R[0])
    w.memory = False
    return w
