"""chunk_size=1 pushes one basis vector per step without vmap: functions without a batching rule work (issue 24)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import randn
from jax.custom_batching import custom_vmap

import jacobians


def _host_sin(v):  # a pure_callback without vmap_method: no batching rule
    return jax.pure_callback(lambda a: np.sin(a), jax.ShapeDtypeStruct(v.shape, v.dtype), v)


def _host_cos_times(v, t):
    return jax.pure_callback(lambda a, b: np.cos(a) * b, jax.ShapeDtypeStruct(v.shape, v.dtype), v, t)


@jax.custom_jvp
def callback_jvp(v):  # forward mode only: the tangent comes from the host
    return _host_sin(v)


@callback_jvp.defjvp
def _callback_jvp_rule(primals, tangents):
    return callback_jvp(primals[0]), _host_cos_times(primals[0], tangents[0])


@jax.custom_vjp
def callback_vjp(v):  # reverse mode only: the cotangent comes from the host
    return _host_sin(v)


callback_vjp.defvjp(lambda v: (callback_vjp(v), v), lambda v, g: (_host_cos_times(v, g),))


@custom_vmap
def refusing_vmap(v):  # a custom_vmap whose rule refuses (and which JAX cannot linearize)
    return jnp.sin(v)


@refusing_vmap.def_vmap
def _refuse(axis_size, in_batched, v):
    raise NotImplementedError("refusing_vmap has no batching rule")


@custom_vmap
def custom_batched(v):
    return jnp.sin(v)


@custom_batched.def_vmap
def _batched_rule(axis_size, in_batched, v):
    return jnp.sin(v), in_batched[0]


CASES = {  # name: (function, the modes JAX can differentiate it in, chunk sizes)
    "callback_jvp": (callback_jvp, ("fwd", "auto"), (1,)),
    "callback_vjp": (callback_vjp, ("rev", "auto"), (1,)),
    "refusing_vmap": (refusing_vmap, ("fwd", "auto"), (1,)),
    "custom_vmap_chunked": (custom_batched, ("fwd",), (1, 2)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_chunk_size_one_without_vmap(name, rng):
    f, modes, chunks = CASES[name]
    x = randn(rng, (3,))
    want = jnp.diag(jnp.cos(x))
    for mode in modes:
        for chunk in chunks:
            got = jacobians.jacobian(lambda v: f(v) * v[0], mode=mode, chunk_size=chunk)(x)
            np.testing.assert_allclose(got, want * x[0] + jnp.zeros((3, 3)).at[:, 0].set(jnp.sin(x)), rtol=1e-12)
    if name == "callback_jvp":  # the dense forward pass needs the batching rule (as jax.jacfwd does)
        with pytest.raises(NotImplementedError, match="vmap is only supported for the pure_callback primitive"):
            jacobians.jacobian(f, mode="fwd")(x)
