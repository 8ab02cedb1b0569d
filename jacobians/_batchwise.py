"""Predicates over a whole ``jax.vmap`` batch: a ``lax.cond`` on them stays a cond under ``vmap``.

A rare fallback behind ``lax.cond`` (a Jacobian that is not finite, redone another way) costs nothing
while it is not taken, but under ``jax.vmap`` a predicate computed per example makes the cond a
``select`` that runs both branches on every call. :func:`all_finite` is one test over every example
(``custom_vmap``): the fallback then runs for the whole batch when one example needs it, and not at all
otherwise. Its input is taken out of differentiation (a boolean has no derivative). :func:`apart` puts a
computation in such a cond, always taken, to keep XLA from fusing it into its consumers.
"""

import jax
import jax.numpy as jnp
from jax import custom_batching

from . import _compat


def _over_batch(test):
    """``test`` (an array -> a boolean scalar) as one test over a whole ``jax.vmap`` batch, unbatched."""
    batched = custom_batching.custom_vmap(test)

    @batched.def_vmap
    def _rule(axis_size, in_batched, x):
        del axis_size, in_batched
        return test(x), False

    return lambda x: batched(jax.lax.stop_gradient(x))  # a boolean has no derivative


def _all_finite(x) -> jax.Array:
    return jnp.isfinite(jnp.sum(x * 0))  # 0, or NaN from an infinite or NaN entry: a sum that cannot overflow


def _always(x) -> jax.Array:
    v = jnp.ravel(x)[:1]  # one entry: NaN or not, the test is true, and XLA cannot tell without it
    return jnp.all(jnp.isnan(v) | ~jnp.isnan(v))


_finite_over_batch, _always_over_batch = _over_batch(_all_finite), _over_batch(_always)


def all_finite(x) -> jax.Array:
    """Whether every entry of ``x`` is finite, as one boolean scalar over a whole vmapped batch."""
    return _finite_over_batch(x)


def apart(fn, x):
    """``fn()`` computed where XLA's CPU fusion cannot fuse it into what reads it.

    XLA fuses elementwise producers into a ``gather`` that reads them: the fused loop then computes each
    gathered entry on its own in scalar code (a sparse Hessian's products, recomputed per nonzero: 1.5-2x
    slower on a 2-D Laplacian energy than the products in vectorised loops, then the gather). Fusion does
    not cross a ``lax.cond``'s branches: ``fn`` runs in the taken branch of a cond whose predicate (true,
    from an entry of ``x``) XLA cannot evaluate, unbatched under ``jax.vmap``; the other branch returns
    zeros. Elsewhere than on the CPU (where a cond's predicate is read back by the host) ``fn()`` as it is.
    """
    closed, shapes = jax.make_jaxpr(fn, return_shape=True)()  # traced once, replayed in both places below
    tree = jax.tree.structure(shapes)
    run = lambda: jax.tree.unflatten(tree, _compat.jaxpr_as_fun(closed)())  # noqa: E731

    def cpu(x):
        zeros = lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)  # noqa: E731
        return jax.lax.cond(_always_over_batch(x), run, zeros)

    return jax.lax.platform_dependent(x, cpu=cpu, default=lambda x: run())
