"""``python -m bench.probe_det_compile``: where the log-determinant kernel's compile time goes (issue 25's first calls).

Not part of the suite. For stacks of ``k x k`` matrices (``k <= 4``: the closed forms) it compiles,
each three times (minimum kept): ``jnp.linalg.slogdet`` (raw JAX), the kernel's fast path alone (the
closed form, its sign and log: what a well-conditioned stack runs), the fast path with one of the rare
branches behind a ``cond`` (a trivial one; the pivoting LU that redoes flagged results; LAPACK's LU;
the limit for infinite entries) and the whole kernel (``jacobians.kernels.slogdet``). Printed only.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np

from kernels import _det


def _variants():
    def closed(a):
        d = _det._closed(a)
        return d, jnp.sign(d), jnp.log(jnp.abs(d))

    def behind_cond(branch):
        def run(a):
            d, s, la = closed(a)
            return jax.lax.cond(jnp.isnan(jnp.sum(d)), lambda s, la: branch(a, s, la), lambda s, la: (s, la), s, la)
        return run

    return {
        "raw": lambda a: tuple(jnp.linalg.slogdet(a)),
        "fast path": lambda a: closed(a)[1:],
        "+ trivial cond": behind_cond(lambda a, s, la: (2 * s, 2 * la)),
        "+ pivoting LU": behind_cond(lambda a, s, la: _det._lu_elementwise(a)),
        "+ LAPACK LU": behind_cond(lambda a, s, la: tuple(jnp.linalg.slogdet(a))),
        "+ limit": behind_cond(_det._limit_where),
        "kernel": _det._stack,
    }


def main() -> None:
    rng = np.random.default_rng(0)
    print(f"jax {jax.__version__}, backend {jax.default_backend()}; compile ms (min of 3), B = 1e5, float32")
    variants = _variants()
    print(f"{'k':>2} " + " ".join(f"{name:>15s}" for name in variants))
    for k in (2, 3, 4):
        a = jnp.asarray(rng.standard_normal((100_000, k, k)), jnp.float32)
        best = {}
        for _ in range(3):
            for name, fn in variants.items():
                lowered = jax.jit(lambda a, fn=fn: fn(a)).lower(a)
                t0 = time.perf_counter()
                lowered.compile()
                best[name] = min(best.get(name, np.inf), time.perf_counter() - t0)
        print(f"{k:>2} " + " ".join(f"{1e3 * best[name]:15.0f}" for name in variants), flush=True)


if __name__ == "__main__":
    main()
