"""``python -m bench.probe_dense_result``: a compressed plan's dense result, scattered or read off the products.

Not part of the suite: the measurement behind ``jacobians._sparse.engine.SCATTER_DENSITY`` (a block with at
most 1/16 of its entries in the pattern is written as zeros and a scatter of its entries; a denser one is read
whole off the compressed products by a gather of rows and a select). Each map's default ``jacobian`` (a
compressed forward plan) against ``jax.jit(jax.jacfwd)``, both ways of writing the result; float32, us per call,
minimum over 5 interleaved rounds.
"""

import jax
import jax.numpy as jnp
import numpy as np

import jacobians
from jacobians._sparse import engine

from .probe_square import _per_call


def _maps(rng):
    def blocks(b, n=1024):
        W = jnp.asarray(rng.standard_normal((n // b, b, b)) / np.sqrt(b), jnp.float32)
        return lambda x: jnp.tanh(jnp.einsum("kij,kj->ki", W, x.reshape(n // b, b))).ravel()

    def allen_cahn(u):
        u = u.reshape(32, 32)
        lap = jnp.roll(u, 1, 0) + jnp.roll(u, -1, 0) + jnp.roll(u, 1, 1) + jnp.roll(u, -1, 1) - 4 * u
        return (lap + u - u**3).ravel()

    K = jnp.asarray(rng.standard_normal((4, 2, 3, 3)) / 3, jnp.float32)
    return {
        "Allen-Cahn 2-D stencil 32x32": (allen_cahn, 1024),
        "ring stencil 2048": (lambda x: jnp.roll(x, 1) + jnp.roll(x, -1) - 2 * x + jnp.sin(x), 2048),
        "8x8 blocks, 1024": (blocks(8), 1024),
        "32x32 blocks, 1024": (blocks(32), 1024),
        "128x128 blocks, 1024": (blocks(128), 1024),
        "conv 2 -> 4 channels 24x24": (lambda x: jnp.tanh(jax.lax.conv_general_dilated(
            x.reshape(1, 2, 24, 24), K, (1, 1), "SAME")).ravel(), 1152),
    }


def main() -> None:
    rng = np.random.default_rng(0)
    decide = engine._dense_block
    print(f"jax {jax.__version__}, backend {jax.default_backend()}; us per call")
    print(f"{'map':30s} {'density':>8s} {'jacfwd':>9s} {'read off':>9s} {'scatter':>9s}  default")
    for name, (f, n) in _maps(rng).items():
        x = jnp.asarray(rng.standard_normal(n), jnp.float32)
        plan = jacobians.explain(f, x)
        progs = {"fwd": jax.jit(jax.jacfwd(f))}
        try:  # each way forced for a transformation of its own (the decision is cached on its plan per block)
            engine._dense_block = lambda plan, rows, cols, sub: _read_off(plan, rows, cols, sub, decide)
            progs["read off"] = jacobians.jacobian(f)
            jax.block_until_ready(progs["read off"](x))
            engine._dense_block = lambda plan, rows, cols, sub: ("entries", None)
            progs["scatter"] = jacobians.jacobian(f)
            jax.block_until_ready(progs["scatter"](x))
        finally:
            engine._dense_block = decide
        times = {k: [] for k in progs}
        for _ in range(5):
            for k, g in progs.items():
                times[k].append(_per_call(g, x, 50))
        t = {k: min(v) * 1e6 for k, v in times.items()}
        default = "scatter" if plan.nnz * engine.SCATTER_DENSITY <= plan.n * plan.m else "read off"
        print(f"{name:30s} {plan.nnz / (plan.n * plan.m):8.3f} {t['fwd']:9.1f} {t['read off']:9.1f}"
              f" {t['scatter']:9.1f}  {default}", flush=True)


def _read_off(plan, rows, cols, sub, decide):
    """The decision as it was before the density bound: scatter only blocks with one entry per row."""
    saved = engine.SCATTER_DENSITY
    engine.SCATTER_DENSITY = 1e18  # no block counts as sparse
    try:
        return decide(plan, rows, cols, sub)
    finally:
        engine.SCATTER_DENSITY = saved


if __name__ == "__main__":
    main()
