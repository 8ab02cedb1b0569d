"""Contractions of tensor Jacobians: the chain rule, Jacobian-vector products, traces.

With flattened Jacobians the chain rule (5.48) is a matrix product; with tensor
Jacobians (numerator layout, ``out_shape + in_shape``, see
:mod:`jacobians.layout`) one must say which axes to sum (section 5.4). These
helpers say it once, check the shapes, and call ``jnp.tensordot``/``jnp.einsum``.
"""

from collections.abc import Sequence
from string import ascii_letters

import jax
import jax.numpy as jnp
import numpy as np

from . import _args

__all__ = ["chain", "matvec", "trace", "vecmat"]


def _is_int(value) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)


def _int(value, name: str, where: str) -> int:
    if not _is_int(value):
        raise TypeError(f"{where}: {name} must be an int, got {value!r} (a {type(value).__name__}).")
    return int(value)


def chain(outer: jax.Array, inner: jax.Array, mid_ndim: int) -> jax.Array:
    """The chain rule (5.48) on tensor Jacobians: ``d(f o g)/dx = df/dg . dg/dx``.

    Args:
      outer: ``df/dg``, shape ``out_shape + mid_shape``.
      inner: ``dg/dx``, shape ``mid_shape + in_shape``.
      mid_ndim: the number of axes of ``mid_shape`` (summed out).

    Returns:
      ``d(f o g)/dx``, shape ``out_shape + in_shape``.

    Raises:
      TypeError: ``mid_ndim`` is not an int.
      ValueError: ``mid_ndim`` negative or larger than either rank, or the trailing
        ``mid_ndim`` axes of ``outer`` differ from the leading ones of ``inner``.

    Example::

      >>> chain(jnp.ones((2, 3, 4)), jnp.ones((3, 4, 5)), mid_ndim=2).shape
      (2, 5)
    """
    where = "jacobians.contract.chain"
    outer, inner = _args.as_array(outer, "outer", where), _args.as_array(inner, "inner", where)
    k = _int(mid_ndim, "mid_ndim", where)
    if not 0 <= k <= min(outer.ndim, inner.ndim):
        raise ValueError(
            f"{where}: mid_ndim={k} must lie in [0, {min(outer.ndim, inner.ndim)}] for outer of "
            f"shape {tuple(outer.shape)} and inner of shape {tuple(inner.shape)}."
        )
    mid_outer, mid_inner = outer.shape[outer.ndim - k :], inner.shape[:k]
    if mid_outer != mid_inner:
        raise ValueError(
            f"{where}: the middle shapes differ: outer {tuple(outer.shape)} ends in {mid_outer} "
            f"but inner {tuple(inner.shape)} starts with {mid_inner} (mid_ndim={k})."
        )
    return jnp.tensordot(outer, inner, axes=k)


def matvec(J: jax.Array, v: jax.Array) -> jax.Array:
    """Apply a Jacobian to a tangent: ``J v``, a JVP from an explicit Jacobian.

    Args:
      J: shape ``out_shape + in_shape``.
      v: shape ``in_shape`` (J's trailing ``v.ndim`` axes).

    Returns:
      Shape ``out_shape``.

    Raises:
      ValueError: ``J``'s trailing axes do not match ``v.shape``.
    """
    where = "jacobians.contract.matvec"
    J, v = _args.as_array(J, "J", where), _args.as_array(v, "v", where)
    if v.ndim > J.ndim or J.shape[J.ndim - v.ndim :] != v.shape:
        raise ValueError(
            f"jacobians.contract.matvec: J of shape {tuple(J.shape)} must end in v's shape {tuple(v.shape)}."
        )
    return jnp.tensordot(J, v, axes=v.ndim)


def vecmat(u: jax.Array, J: jax.Array) -> jax.Array:
    """Apply a cotangent to a Jacobian: ``u^T J``, a VJP from an explicit Jacobian.

    Args:
      u: shape ``out_shape`` (J's leading ``u.ndim`` axes).
      J: shape ``out_shape + in_shape``.

    Returns:
      Shape ``in_shape``.

    Raises:
      ValueError: ``J``'s leading axes do not match ``u.shape``.
    """
    where = "jacobians.contract.vecmat"
    u, J = _args.as_array(u, "u", where), _args.as_array(J, "J", where)
    if u.ndim > J.ndim or J.shape[: u.ndim] != u.shape:
        raise ValueError(
            f"jacobians.contract.vecmat: J of shape {tuple(J.shape)} must start with u's shape {tuple(u.shape)}."
        )
    return jnp.tensordot(u, J, axes=u.ndim)


def _axes(axes, ndim: int, name: str, where: str) -> tuple[int, ...]:
    """An axis or a tuple/list of axes, each an int in ``[-ndim, ndim)``, normalised to ``[0, ndim)``."""
    items = (axes,) if _is_int(axes) else axes
    if isinstance(items, np.ndarray) and items.ndim == 1 and np.issubdtype(items.dtype, np.integer):
        items = tuple(items.tolist())
    if not isinstance(items, tuple | list):
        raise TypeError(f"{where}: {name} must be an int or a tuple of ints, got {axes!r} (a {type(axes).__name__}).")
    out = []
    for a in items:
        if not _is_int(a):
            raise TypeError(f"{where}: {name} must be an int or a tuple of ints, got {axes!r} (entry {a!r}).")
        if not -ndim <= a < ndim:
            raise ValueError(f"{where}: axis {a} in {name} is out of range for a rank-{ndim} tensor.")
        out.append(int(a) % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"{where}: {name}={axes!r} repeats an axis.")
    return tuple(out)


def trace(T: jax.Array, axes1: int | Sequence[int], axes2: int | Sequence[int]) -> jax.Array:
    """Tensor trace (the remark after (5.108)): sum over paired groups of axes.

    ``axes1[k]`` is paired with ``axes2[k]`` (equal lengths required); the
    result keeps the remaining axes in order. A ``D x D x E x F`` tensor traced
    over ``(0,)``, ``(1,)`` is ``E x F``; traced over ``(0, 1)``, ``(2, 3)`` a
    ``D x E x D x E`` tensor gives a scalar, the trace of its ``DE x DE``
    flattening (matrix-by-matrix blocks).

    Args:
      T: any tensor.
      axes1, axes2: equally long, disjoint groups of axes with equal sizes.

    Returns:
      ``T`` with ``axes1`` and ``axes2`` summed out along their diagonal.

    Raises:
      TypeError: an axis is not an int.
      ValueError: an axis out of range, groups of unequal length, repeated or
        overlapping axes, or paired axes of different sizes.
    """
    where = "jacobians.contract.trace"
    T = _args.as_array(T, "T", where)
    a1, a2 = _axes(axes1, T.ndim, "axes1", where), _axes(axes2, T.ndim, "axes2", where)
    if len(a1) != len(a2):
        raise ValueError(f"{where}: axes1 {a1} and axes2 {a2} must have the same length.")
    if len(set(a1 + a2)) != 2 * len(a1):
        raise ValueError(f"{where}: axes1 {a1} and axes2 {a2} must be distinct axes.")
    for i, j in zip(a1, a2, strict=True):
        if T.shape[i] != T.shape[j]:
            raise ValueError(
                f"{where}: paired axes {i} and {j} of T with shape {tuple(T.shape)} have "
                f"different sizes {T.shape[i]} and {T.shape[j]}."
            )
    letters = list(ascii_letters[: T.ndim])
    for i, j in zip(a1, a2, strict=True):
        letters[j] = letters[i]
    out = "".join(c for n, c in enumerate(letters) if n not in a1 + a2)
    return jnp.einsum(f"{''.join(letters)}->{out}", T)
