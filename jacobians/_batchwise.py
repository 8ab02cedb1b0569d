"""Predicates over a whole ``jax.vmap`` batch: a ``lax.cond`` on them stays a cond under ``vmap``.

A rare fallback behind ``lax.cond`` (a Jacobian that is not finite, redone another way) costs nothing
while it is not taken, but under ``jax.vmap`` a predicate computed per example makes the cond a
``select`` that runs both branches on every call. :func:`all_finite` is one test over every example
(``custom_vmap``): the fallback then runs for the whole batch when one example needs it, and not at all
otherwise. Its input is taken out of differentiation (a boolean has no derivative).
"""

import jax
import jax.numpy as jnp
from jax import custom_batching


def _all_finite(x) -> jax.Array:
    return jnp.isfinite(jnp.sum(x * 0))  # 0, or NaN from an infinite or NaN entry: a sum that cannot overflow


_batched = custom_batching.custom_vmap(_all_finite)


@_batched.def_vmap
def _batched_vmap(axis_size, in_batched, x):
    del axis_size, in_batched
    return _all_finite(x), False


def all_finite(x) -> jax.Array:
    """Whether every entry of ``x`` is finite, as one boolean scalar over a whole vmapped batch."""
    return _batched(jax.lax.stop_gradient(x))
