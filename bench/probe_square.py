"""``python -m bench.probe_square``: dense square maps, ``jax.jacfwd`` against ``jax.jacrev`` and the default.

Not part of the suite: the measurement behind the planner's tie on square maps (``n == m``, where the
dense method's two directions cost the same number of passes): forward (``jacobians._methods.dense.SQUARE_MODE``).
Interleaved rounds of the three compiled programs on the same input; the minimum over rounds of the
per-call time, float32.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np

import jacobians


def _maps(rng):
    def r(*shape, scale=1.0):
        return jnp.asarray(rng.standard_normal(shape) * scale, jnp.float32)

    W1, W2, A, w = r(256, 256, scale=1 / 16), r(256, 256, scale=1 / 16), r(300, 300, scale=1 / 17), r(500)
    Wq, Wk, Wv = (r(16, 16, scale=0.25) for _ in range(3))

    def attention(z):
        z = z.reshape(8, 16)
        h = jax.nn.softmax((z @ Wq) @ (z @ Wk).T / 4.0, axis=-1) @ (z @ Wv) + z
        return ((h - h.mean(-1, keepdims=True)) / jnp.sqrt(h.var(-1, keepdims=True) + 1e-5)).ravel()

    def lorenz96(x):
        def f(x):
            return (jnp.roll(x, -1) - jnp.roll(x, 2)) * jnp.roll(x, 1) - x + 8.0

        def step(_, x):
            k1 = f(x)
            k2 = f(x + 0.005 * k1)
            k3 = f(x + 0.005 * k2)
            k4 = f(x + 0.01 * k3)
            return x + 0.01 / 6 * (k1 + 2 * k2 + 2 * k3 + k4)

        return jax.lax.fori_loop(0, 20, step, x)

    def sym(x, k):
        a = x.reshape(k, k)
        return a + a.T

    return {
        "softmax 512": (jax.nn.softmax, r(512)),
        "sort(x) w, 500": (lambda x: jnp.sort(x) * w, r(500)),
        "x[argsort(sin x)] x, 300": (lambda x: x[jnp.argsort(jnp.sin(x))] * x, r(300)),
        "cumsum(sin x) x, 1000": (lambda x: jnp.cumsum(jnp.sin(x)) * x, r(1000)),
        "attention + layer norm, 8x16": (attention, r(128)),
        "Lorenz-96 RK4 x 20, 40": (lorenz96, r(40) + 8.0),
        "logsumexp(x x^T), 200": (lambda x: jax.nn.logsumexp(jnp.outer(x, x), axis=1), r(200)),
        "MLP tanh 256": (lambda x: jnp.tanh(W2 @ jnp.tanh(W1 @ x)), r(256)),
        "sin(A x) x, 300": (lambda x: jnp.sin(A @ x) * x, r(300)),
        "cholesky 16x16": (lambda x: jnp.linalg.cholesky(x.reshape(16, 16) @ x.reshape(16, 16).T
                                                         + jnp.eye(16)).ravel(), r(256)),
        "eigh vectors 12x12": (lambda x: jnp.linalg.eigh(sym(x, 12))[1].ravel(), r(144)),
        "qr R 12x12": (lambda x: jnp.linalg.qr(x.reshape(12, 12))[1].ravel(), r(144)),
        "solve_triangular 16x16": (lambda x: jax.scipy.linalg.solve_triangular(
            jnp.tril(x.reshape(16, 16)) + 4 * jnp.eye(16), x.reshape(16, 16), lower=True).ravel(), r(256)),
        "inv 16x16": (lambda x: jnp.linalg.inv(x.reshape(16, 16) + 4 * jnp.eye(16)).ravel(), r(256)),
    }


def _per_call(fn, x, calls: int) -> float:
    jax.block_until_ready(fn(x))
    t0 = time.perf_counter()
    for _ in range(calls):
        out = fn(x)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / calls


def main() -> None:
    print(f"jax {jax.__version__}, backend {jax.default_backend()}; us per call, min over 7 interleaved rounds")
    print(f"{'map':32s} {'jacfwd':>9s} {'jacrev':>9s} {'rev/fwd':>8s} {'default':>9s} {'/ best':>7s}  plan")
    for name, (f, x) in _maps(np.random.default_rng(0)).items():
        progs = {"fwd": jax.jit(jax.jacfwd(f)), "rev": jax.jit(jax.jacrev(f)), "ours": jacobians.jacobian(f)}
        calls = max(5, int(0.02 / max(_per_call(progs["rev"], x, 3), 1e-6)))
        times = {k: [] for k in progs}
        for _ in range(7):
            for k, g in progs.items():
                times[k].append(_per_call(g, x, calls))
        t = {k: min(v) * 1e6 for k, v in times.items()}
        plan = jacobians.explain(f, x)
        print(f"{name:32s} {t['fwd']:9.1f} {t['rev']:9.1f} {t['rev'] / t['fwd']:8.2f} {t['ours']:9.1f}"
              f" {t['ours'] / min(t['fwd'], t['rev']):7.2f}  {plan.key}", flush=True)


if __name__ == "__main__":
    main()
