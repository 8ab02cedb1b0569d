"""``python -m bench.probe_mesh_memory``: per-device bytes of chunked and unchunked programs under ``mesh=``.

Not part of the suite: the measurement behind the README's claim that a chunked call under a mesh holds
about ``1/D`` of the stacked results per device (:func:`jacobians.kernels.sharded_chunks`). Runs on 4
forced host CPU devices (set before JAX starts); bytes are XLA's memory analysis of each compiled program
(temporaries + outputs, per device), float64, n = 64.
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

import jacobians  # noqa: E402


def main() -> None:
    jax.config.update("jax_enable_x64", True)
    mesh = Mesh(np.asarray(jax.devices()), ("d",))
    rng = np.random.default_rng(0)
    W = jnp.asarray(rng.standard_normal((64, 64)) / 8)
    x = jnp.asarray(rng.standard_normal(64))
    f = lambda v: jnp.tanh(W @ jnp.tanh(W @ v))  # noqa: E731
    g = lambda v: jnp.sum(f(v) ** 2)  # noqa: E731
    engines = {
        "jacobian rev": lambda **kw: jacobians.jacobian(f, mode="rev", **kw),
        "jacobian fwd": lambda **kw: jacobians.jacobian(f, mode="fwd", **kw),
        "hessian": lambda **kw: jacobians.hessian(g, **kw),
        "hessian_diagonal hvp": lambda **kw: jacobians.hessian_diagonal(g, method="hvp", **kw),
    }
    print(f"jax {jax.__version__}, {jax.device_count()} devices; bytes per device (temporaries + outputs)")
    heads = ("1 device", "chunk 1", "4 devices", "4, chunk 1", "4, chunk 4")
    print(f"{'engine':22s} " + " ".join(f"{h:>11s}" for h in heads))
    for name, make in engines.items():
        row = []
        for kw in ({}, {"chunk_size": 1}, {"mesh": mesh}, {"mesh": mesh, "chunk_size": 1},
                   {"mesh": mesh, "chunk_size": 4}):
            fn = make(**kw)
            jax.block_until_ready(fn(x))  # called as a user calls it first: its own program, its constants hoisted
            m = jax.jit(fn).lower(x).compile().memory_analysis()
            row.append(m.temp_size_in_bytes + m.output_size_in_bytes)
        print(f"{name:22s} " + " ".join(f"{b:>11d}" for b in row))


if __name__ == "__main__":
    main()
