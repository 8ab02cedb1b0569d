"""Jacobian determinants (section 5.3, Figure 5.5): the volume change of a map.

For maps whose input and output have the same total size; the Jacobian is
flattened row-major to a square matrix (:func:`jacobians.jacobian_matrix`), so
matrix-valued maps such as ``X -> AX`` work too. The Jacobian is built by
forward mode and its determinant by :func:`kernels.slogdet` (closed forms up to
3x3, an unrolled LU above). With ``batched=True`` and several devices the batch
is sharded across them with ``jax.sharding`` and XLA's SPMD partitioner.
"""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from . import kernels

from ._jacobian import jacobian_matrix


def _sign_logabs(fun: Callable, where: str) -> Callable:
    jac = jacobian_matrix(fun, mode="fwd")

    def one(x, *args):
        J = jac(x, *args)
        if J.shape[0] != J.shape[1]:
            out = jax.eval_shape(fun, x, *args)
            raise ValueError(
                f"{where}: a Jacobian determinant needs fun's input and output to have the same "
                f"total size, but the input has size {J.shape[1]} (shape {tuple(x.shape)}) and "
                f"the output size {J.shape[0]} (shape {tuple(out.shape)})."
            )
        return kernels.slogdet(J)

    return one


def _pad_and_shard(xs: jax.Array) -> tuple[jax.Array, int]:
    """Pad the batch to a multiple of the device count and shard it across devices."""
    devices = jax.devices()
    b = xs.shape[0]
    pad = -b % len(devices)
    if pad:
        # Repeat the last point rather than pad with zeros: no spurious
        # singular Jacobians or NaNs in the padding (it is dropped anyway).
        xs = jnp.concatenate([xs, jnp.repeat(xs[-1:], pad, axis=0)])
    mesh = Mesh(np.asarray(devices), ("batch",))
    return jax.device_put(xs, NamedSharding(mesh, PartitionSpec("batch"))), b


def _build(fun: Callable, batched: bool, where: str, finish: Callable) -> Callable:
    if not callable(fun):
        raise TypeError(f"{where}: fun must be callable, got {type(fun).__name__}.")
    if not isinstance(batched, bool):
        raise TypeError(f"{where}: batched must be True or False, got {batched!r}.")
    one = _sign_logabs(fun, where)
    if batched:

        def batch(xs, *args):
            return finish(*jax.vmap(one, in_axes=(0,) + (None,) * len(args))(xs, *args))

        compute = jax.jit(batch)
    else:
        compute = jax.jit(lambda x, *args: finish(*one(x, *args)))

    @functools.wraps(fun)
    def wrapped(x, *args):
        if not batched:
            return compute(x, *args)
        x = jnp.asarray(x)
        if x.ndim == 0:
            raise ValueError(f"{where}: batched=True needs x with a leading batch axis, got a scalar.")
        if jax.device_count() == 1:  # the common case pays nothing for sharding
            return compute(x, *args)
        xs, b = _pad_and_shard(x)
        return jax.tree_util.tree_map(lambda r: r[:b], compute(xs, *args))

    return wrapped


def slogdet(fun: Callable, *, batched: bool = False) -> Callable:
    """Sign and log of the absolute Jacobian determinant of ``fun``.

    Args:
      fun: ``fun(x, *args)``, differentiated in ``x``; input and output of the
        same total size. Extra arguments (arrays) are passed through.
      batched: ``x`` has a leading batch axis; one value per point. Sharded
        across devices when there are several.

    Returns:
      A function ``(x, *args) -> (sign, logabsdet)``, each a scalar (shape
      ``(batch,)`` when batched). A singular Jacobian gives sign 0 and
      logabsdet ``-inf``; logabsdet stays finite where det would under- or
      overflow.

    Raises:
      ValueError: input and output sizes differ (on the first call).
    """
    return _build(fun, batched, "jacobians.slogdet", lambda sign, logabs: (sign, logabs))


def log_abs_det(fun: Callable, *, batched: bool = False) -> Callable:
    """``log |det(dfun/dx)|``, the change-of-variables term of flows.

    See :func:`slogdet` for the arguments. Returns a function
    ``(x, *args) -> logabsdet`` (shape ``(batch,)`` when batched).
    """
    return _build(fun, batched, "jacobians.log_abs_det", lambda sign, logabs: logabs)


def det(fun: Callable, *, batched: bool = False) -> Callable:
    """``det(dfun/dx)``, the volume scaling of section 5.3 (Figure 5.5).

    See :func:`slogdet` for the arguments. Returns a function ``(x, *args) -> det``
    (shape ``(batch,)`` when batched), computed as ``sign * exp(logabsdet)``.

    Example (5.61)-(5.66)::

      >>> f = lambda x: jnp.array([-2 * x[0] + x[1], x[0] + x[1]])
      >>> jacobians.det(f)(jnp.array([1.0, 2.0]))
      Array(-3., dtype=float32)
    """
    return _build(fun, batched, "jacobians.det", lambda sign, logabs: sign * jnp.exp(logabs))
