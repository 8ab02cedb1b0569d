"""Jacobian layouts: numerator and denominator, tensors and flattened matrices.

Convention used throughout the library: a Jacobian *tensor* in numerator layout
(the book's, (5.58)-(5.59)) has shape ``out_shape + in_shape`` with entries
``J[i..., j...] = d f[i...] / d x[j...]``. The denominator layout is its
transpose, ``in_shape + out_shape``.

Flattening a tensor Jacobian to a matrix (section 5.4, Figure 5.7) flattens the
output axes into rows and the input axes into columns, in one of two orders:

- ``order="C"``: row-major, the last index varies fastest (NumPy's ``reshape``).
- ``order="F"``: column stacking, the first index varies fastest: the book's
  ``vec`` of a matrix stacks its columns, so ``vec(A)[i + m*j] = A[i, j]``.

With ``order="F"`` the chain rule on flattened Jacobians is a matrix product
that agrees with the classic identities of matrix calculus, e.g.
``vec(A X B) = (B^T kron A) vec(X)``.
"""

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from . import _args

__all__ = [
    "commutation_matrix",
    "to_denominator",
    "to_matrix",
    "to_numerator",
    "to_tensor",
    "unvec",
    "vec",
]


def _check_ndim(name: str, k, array, what: str, where: str) -> int:
    if not _is_int(k):
        raise TypeError(f"{where}: {name} must be an int, got {k!r}.")
    if not 0 <= k <= array.ndim:
        raise ValueError(f"{where}: {name}={k} must lie in [0, {array.ndim}] for {what} of shape {tuple(array.shape)}.")
    return int(k)


def _is_int(v) -> bool:
    return isinstance(v, int | np.integer) and not isinstance(v, bool | np.bool_)


def _check_shape(value, name: str, where: str) -> tuple[int, ...]:
    """A shape: an int or a tuple/list of non-negative ints (no floats, bools or strings)."""
    items = (value,) if _is_int(value) else value
    if isinstance(items, np.ndarray) and items.ndim == 1 and np.issubdtype(items.dtype, np.integer):
        items = tuple(items.tolist())
    if not isinstance(items, tuple | list):
        raise TypeError(f"{where}: {name} must be a tuple of non-negative ints, got {value!r}.")
    for i, v in enumerate(items):
        if not _is_int(v):
            raise TypeError(
                f"{where}: {name} must be a tuple of non-negative ints, got {value!r} "
                f"(entry {i} is {v!r}, a {type(v).__name__})."
            )
        if v < 0:
            raise ValueError(f"{where}: {name} must be a tuple of non-negative ints, got {value!r} (entry {i} is {v}).")
    return tuple(int(v) for v in items)


def _rev(k: int, offset: int = 0) -> tuple[int, ...]:
    return tuple(range(offset + k - 1, offset - 1, -1))


def to_matrix(J: jax.Array, out_ndim: int, order: str = "C") -> jax.Array:
    """Flatten a numerator-layout Jacobian ``out_shape + in_shape`` to a matrix.

    Args:
      J: the Jacobian tensor, shape ``out_shape + in_shape``.
      out_ndim: how many leading axes of ``J`` are output axes.
      order: ``"C"`` (row-major) or ``"F"`` (column stacking, the book's vec).

    Returns:
      Shape ``(prod(out_shape), prod(in_shape))``.

    Raises:
      TypeError: ``out_ndim`` is not an int.
      ValueError: ``out_ndim`` outside ``[0, J.ndim]`` or an unknown order.

    Example (Figure 5.7)::

      >>> J = jnp.zeros((4, 2, 3))  # dA/dx for A in R^{4x2}, x in R^3
      >>> to_matrix(J, 2, order="F").shape
      (8, 3)
    """
    where = "jacobians.layout.to_matrix"
    J = _args.as_array(J, "J", where)
    k = _check_ndim("out_ndim", out_ndim, J, "J", where)
    order = _args.check_order(order, where)
    rows, cols = math.prod(J.shape[:k]), math.prod(J.shape[k:])
    if order == "F":
        J = jnp.transpose(J, _rev(k) + _rev(J.ndim - k, k))
    return J.reshape(rows, cols)


def to_tensor(M: jax.Array, out_shape: Sequence[int], in_shape: Sequence[int], order: str = "C") -> jax.Array:
    """Inverse of :func:`to_matrix`: a matrix back to ``out_shape + in_shape``.

    Args:
      M: shape ``(prod(out_shape), prod(in_shape))``.
      out_shape, in_shape: the output and input shapes.
      order: the order ``M`` was flattened with, ``"C"`` or ``"F"``.

    Returns:
      Shape ``out_shape + in_shape``.

    Raises:
      TypeError: a shape is not a tuple of ints.
      ValueError: a shape has a negative entry, or ``M`` is not 2-D or its
        shape does not match the shapes given.
    """
    where = "jacobians.layout.to_tensor"
    M = _args.as_array(M, "M", where)
    order = _args.check_order(order, where)
    out_shape, in_shape = _check_shape(out_shape, "out_shape", where), _check_shape(in_shape, "in_shape", where)
    expected = (math.prod(out_shape), math.prod(in_shape))
    if M.shape != expected:
        raise ValueError(
            f"{where}: M has shape {tuple(M.shape)} but out_shape={out_shape} and "
            f"in_shape={in_shape} need a matrix of shape {expected}."
        )
    if order == "C":
        return M.reshape(out_shape + in_shape)
    k = len(out_shape)
    T = M.reshape(out_shape[::-1] + in_shape[::-1])
    return jnp.transpose(T, _rev(k) + _rev(len(in_shape), k))


def to_denominator(J: jax.Array, out_ndim: int) -> jax.Array:
    """Numerator layout ``out_shape + in_shape`` to denominator layout ``in_shape + out_shape``.

    For a vector function this is the transpose of the book's ``m x n`` Jacobian
    (the remark after (5.59)).

    Args:
      J: shape ``out_shape + in_shape``.
      out_ndim: the number of output axes.

    Returns:
      Shape ``in_shape + out_shape``.

    Raises:
      TypeError: ``out_ndim`` is not an int.
      ValueError: ``out_ndim`` outside ``[0, J.ndim]``.
    """
    J = _args.as_array(J, "J", "jacobians.layout.to_denominator")
    k = _check_ndim("out_ndim", out_ndim, J, "J", "jacobians.layout.to_denominator")
    return jnp.transpose(J, tuple(range(k, J.ndim)) + tuple(range(k)))


def to_numerator(D: jax.Array, in_ndim: int) -> jax.Array:
    """Denominator layout ``in_shape + out_shape`` back to numerator layout.

    Args:
      D: shape ``in_shape + out_shape``.
      in_ndim: the number of input axes (the leading ones of ``D``).

    Returns:
      Shape ``out_shape + in_shape``.

    Raises:
      TypeError: ``in_ndim`` is not an int.
      ValueError: ``in_ndim`` outside ``[0, D.ndim]``.
    """
    D = _args.as_array(D, "D", "jacobians.layout.to_numerator")
    k = _check_ndim("in_ndim", in_ndim, D, "D", "jacobians.layout.to_numerator")
    return jnp.transpose(D, tuple(range(k, D.ndim)) + tuple(range(k)))


def vec(A: jax.Array) -> jax.Array:
    """Stack the columns of ``A`` into one vector (section 5.4): ``vec(A)[i + m*j] = A[i, j]``.

    Args:
      A: an array of any rank; for rank > 2 the first index varies fastest.

    Returns:
      Shape ``(A.size,)``.
    """
    A = _args.as_array(A, "A", "jacobians.layout.vec")
    return jnp.transpose(A).reshape(-1)


def unvec(v: jax.Array, shape: Sequence[int]) -> jax.Array:
    """Inverse of :func:`vec`: refill ``shape`` column by column.

    Args:
      v: shape ``(prod(shape),)``.
      shape: the shape to restore, a tuple of non-negative ints (or an int).

    Returns:
      Shape ``shape``.

    Raises:
      TypeError: ``shape`` is not a tuple of ints.
      ValueError: ``shape`` has a negative entry, or ``v`` is not 1-D or its
        size does not match ``shape``.
    """
    v = _args.as_array(v, "v", "jacobians.layout.unvec")
    shape = _check_shape(shape, "shape", "jacobians.layout.unvec")
    if v.ndim != 1 or v.shape[0] != math.prod(shape):
        raise ValueError(
            f"jacobians.layout.unvec: v must be 1-D of size prod({shape}) = {math.prod(shape)}, "
            f"got shape {tuple(v.shape)}."
        )
    return jnp.transpose(v.reshape(shape[::-1]))


def commutation_matrix(m: int, n: int, dtype=None) -> jax.Array:
    """The ``mn x mn`` permutation ``K`` with ``K @ vec(A) == vec(A.T)`` for ``A`` of shape (m, n).

    Args:
      m, n: the shape of ``A``; positive ints.
      dtype: the dtype of ``K`` (default: JAX's default float dtype).

    Returns:
      Shape ``(m * n, m * n)``.

    Raises:
      TypeError: ``m`` or ``n`` is not an int, or ``dtype`` is not a dtype.
      ValueError: ``m`` or ``n`` is less than 1.
    """
    where = "jacobians.layout.commutation_matrix"
    for name, v in (("m", m), ("n", n)):
        if not _is_int(v):
            raise TypeError(f"{where}: {name} must be a positive int, got {v!r} (a {type(v).__name__}).")
        if v < 1:
            raise ValueError(f"{where}: {name} must be a positive int, got {v!r}.")
    if dtype is not None:
        try:
            dtype = jnp.dtype(dtype)
        except TypeError:
            raise TypeError(f"{where}: dtype must be a NumPy/JAX dtype or None, got {dtype!r}.") from None
    m, n = int(m), int(n)
    i, j = np.meshgrid(np.arange(m), np.arange(n), indexing="ij")
    K = np.zeros((m * n, m * n))
    # A[i, j] sits at i + m*j in vec(A) and at j + n*i in vec(A.T).
    K[(j + n * i).ravel(), (i + m * j).ravel()] = 1
    return jnp.asarray(K, dtype=dtype if dtype is not None else jnp.result_type(float))
