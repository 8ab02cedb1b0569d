"""GPU probe (not part of the suite): where a sparse Hessian's time goes, ours against asdex's."""
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench import workloads as W

try:
    import asdex
except ImportError:
    asdex = None


def t(fn, x, n=200):
    jax.block_until_ready(fn(x))
    out = []
    for _ in range(7):
        s = time.perf_counter()
        for _ in range(n):
            r = fn(x)
        jax.block_until_ready(r)
        out.append((time.perf_counter() - s) / n)
    return 1e6 * float(np.median(out))


rng = np.random.default_rng(0)
for name, make in [("rosenbrock", W.rosenbrock), ("arrowhead", W.arrowhead), ("banded", W.banded)]:
    w = make(10000, jnp.float32, rng)
    x = w.x
    f = w.impls["jacobians.sparse_hessian"].fn
    inner = jax.jit(lambda x: f(x))
    row = {"ours": t(f, x), "jit(ours)": t(inner, x)}
    if "asdex" in w.impls:
        row["asdex"] = t(w.impls["asdex"].fn, x)
    row["jit(identity)"] = t(jax.jit(lambda x: x * 2), x)
    print(name, "  ".join(f"{k} {v:.1f} us" for k, v in row.items()), flush=True)
