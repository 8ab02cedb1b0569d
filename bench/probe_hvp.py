"""``python -m bench.probe_hvp``: ``jacobians.hvp`` called directly against ``jax.jit(jax.jvp(jax.grad(f)))``.

Not part of the suite (issue 27's dispatch target: a direct ``hvp`` call within 1.05x of JAX's own
compiled Hessian-vector product). Interleaved rounds, the same inputs, pipelined calls (the caller
does not wait between calls) and blocked calls (``block_until_ready`` after each); min and median of
the rounds' per-call times.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np

import jacobians


def _objectives(rng):
    f32 = jnp.float32
    out = {}
    for n in (256, 1024):
        W1 = jnp.asarray(rng.standard_normal((n, n)) / np.sqrt(n), f32)
        W2 = jnp.asarray(rng.standard_normal((n, n)) / np.sqrt(n), f32)
        out[f"mlp_loss_{n}"] = (lambda x, W1=W1, W2=W2: 0.5 * jnp.sum(jnp.tanh(W2 @ jnp.tanh(W1 @ x)) ** 2),
                                jnp.asarray(rng.standard_normal(n), f32))
    out["rosenbrock_10000"] = (lambda x: jnp.sum(100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2),
                               jnp.asarray(0.5 * rng.standard_normal(10000), f32))
    out["quartic_16"] = (lambda x: jnp.sum(x ** 4), jnp.asarray(rng.standard_normal(16), f32))
    return out


def _per_call(fn, args, calls: int, blocked: bool) -> float:
    t0 = time.perf_counter()
    if blocked:
        for _ in range(calls):
            jax.block_until_ready(fn(*args))
    else:
        for _ in range(calls):
            out = fn(*args)
        jax.block_until_ready(out)
    return (time.perf_counter() - t0) / calls


def main() -> None:
    rng = np.random.default_rng(0)
    print(f"jax {jax.__version__}, backend {jax.default_backend()}")
    print(f"{'objective':18s} {'mode':9s} {'jacobians.hvp':>16s} {'jit(jvp(grad))':>16s} {'ratio (min)':>12s}")
    for name, (f, x) in _objectives(rng).items():
        v = jnp.asarray(rng.standard_normal(x.shape), x.dtype)
        ours = lambda x, v, f=f: jacobians.hvp(f, (x,), (v,))  # noqa: E731 - called as a user calls it
        raw = jax.jit(lambda x, v, f=f: jax.jvp(jax.grad(f), (x,), (v,))[1])
        for g in (ours, raw):
            jax.block_until_ready(g(x, v))
        calls = max(10, int(2e-2 / max(_per_call(raw, (x, v), 5, True), 1e-6)))
        for blocked in (False, True):
            times = {"ours": [], "raw": []}
            for _ in range(15):
                for key, g in (("ours", ours), ("raw", raw)):
                    times[key].append(_per_call(g, (x, v), calls, blocked))
            o, r = (np.asarray(times[k]) for k in ("ours", "raw"))
            how = "blocked" if blocked else "pipelined"
            print(f"{name:18s} {how:9s} {1e6 * o.min():7.1f} / {1e6 * np.median(o):6.1f}"
                  f" {1e6 * r.min():7.1f} / {1e6 * np.median(r):6.1f} {o.min() / r.min():12.3f}", flush=True)


if __name__ == "__main__":
    main()
