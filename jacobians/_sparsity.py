"""Sparsity patterns of Jacobians, detected from the jaxpr.

A :class:`SparsityPattern` is the set of entries of a Jacobian (numerator
layout ``out.shape + in.shape``) that can be nonzero for *some* input: the
global pattern, found by abstract interpretation of ``jax.make_jaxpr(fun)``
without evaluating ``fun`` (see ``_deps.py`` for the rules).
"""

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import sparse as jsparse

from . import _deps


class SparsityPattern:
    """The nonzero structure of a Jacobian of shape ``out_shape + in_shape``.

    Stored as the nonzeros of the flattened ``(prod(out_shape), prod(in_shape))``
    matrix (row-major flattening), sorted by row then column.

    Attributes:
      out_shape, in_shape: the output and input shapes.
      rows, cols: flat indices of the nonzeros, each of shape ``(nnz,)``.
    """

    def __init__(self, out_shape, in_shape, rows, cols):
        self.out_shape = tuple(int(s) for s in out_shape)
        self.in_shape = tuple(int(s) for s in in_shape)
        m, n = math.prod(self.out_shape), math.prod(self.in_shape)
        key = _deps.unique(np.asarray(rows, np.int64) * max(n, 1) + np.asarray(cols, np.int64))
        self.rows, self.cols = np.divmod(key, max(n, 1))
        if key.size and (self.rows[-1] >= m or self.rows[0] < 0 or self.cols.max() >= n):
            raise ValueError(f"SparsityPattern: an index lies outside the shape {self.shape}.")

    @classmethod
    def from_dense(cls, mask, out_ndim: int) -> "SparsityPattern":
        """From a boolean array of shape ``out_shape + in_shape`` (nonzero = may be nonzero)."""
        mask = np.asarray(mask)
        if not 0 <= out_ndim <= mask.ndim:
            raise ValueError(f"SparsityPattern.from_dense: out_ndim={out_ndim} outside [0, {mask.ndim}].")
        out_shape, in_shape = mask.shape[:out_ndim], mask.shape[out_ndim:]
        r, c = np.nonzero(mask.reshape(math.prod(out_shape), math.prod(in_shape)))
        return cls(out_shape, in_shape, r, c)

    @property
    def shape(self) -> tuple[int, ...]:
        """``out_shape + in_shape``."""
        return self.out_shape + self.in_shape

    @property
    def nnz(self) -> int:
        """The number of entries that may be nonzero."""
        return int(self.rows.size)

    @property
    def density(self) -> float:
        """``nnz / (out.size * in.size)``."""
        total = math.prod(self.shape)
        return self.nnz / total if total else 0.0

    def to_dense(self) -> np.ndarray:
        """A boolean array of shape ``out_shape + in_shape``."""
        m, n = math.prod(self.out_shape), math.prod(self.in_shape)
        dense = np.zeros((m, n), bool)
        dense[self.rows, self.cols] = True
        return dense.reshape(self.shape)

    def indices(self) -> np.ndarray:
        """The nonzeros as tensor indices, shape ``(nnz, len(out_shape) + len(in_shape))``."""
        out = np.unravel_index(self.rows, self.out_shape) if self.out_shape else ()
        inn = np.unravel_index(self.cols, self.in_shape) if self.in_shape else ()
        cols = list(out) + list(inn)
        if not cols:
            return np.zeros((self.nnz, 0), np.int32)
        return np.stack(cols, axis=1).astype(np.int32)

    def to_bcoo(self) -> jsparse.BCOO:
        """A ``BCOO`` of shape ``out_shape + in_shape`` with 1 (int8) at each entry.

        (int8 rather than bool: BCOO's ``todense`` sums duplicates, which bool cannot.)
        """
        data = jnp.ones(self.nnz, jnp.int8)
        return jsparse.BCOO((data, jnp.asarray(self.indices())), shape=self.shape)

    def plot(self, ax=None, **kwargs):
        """A spy plot of the flattened ``(out.size, in.size)`` pattern (needs matplotlib).

        Returns:
          The matplotlib axes.
        """
        try:
            import matplotlib.pyplot as plt
        except ImportError as e:  # an optional extra
            raise ImportError("SparsityPattern.plot needs matplotlib: pip install matplotlib") from e
        if ax is None:
            _, ax = plt.subplots()
        m, n = math.prod(self.out_shape), math.prod(self.in_shape)
        kwargs.setdefault("markersize", max(0.5, min(4.0, 300 / max(m, n, 1))))
        ax.plot(self.cols, self.rows, "s", linestyle="none", **kwargs)
        ax.set_xlim(-0.5, n - 0.5)
        ax.set_ylim(m - 0.5, -0.5)
        ax.set_xlabel(f"input index (in.shape={self.in_shape})")
        ax.set_ylabel(f"output index (out.shape={self.out_shape})")
        ax.set_title(f"nnz={self.nnz}, density={self.density:.3g}")
        return ax

    def __eq__(self, other) -> bool:
        return (
            isinstance(other, SparsityPattern)
            and self.shape == other.shape
            and np.array_equal(self.rows, other.rows)
            and np.array_equal(self.cols, other.cols)
        )

    __hash__ = None  # mutable arrays inside

    def __repr__(self) -> str:
        return (
            f"SparsityPattern(out_shape={self.out_shape}, in_shape={self.in_shape}, "
            f"nnz={self.nnz}, density={self.density:.3g})"
        )


def _abstract(a):
    return a if isinstance(a, jax.ShapeDtypeStruct) else jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a))


def abstract_args(args: tuple, argnums, where: str) -> tuple[int, list]:
    """Check ``argnums`` names a single real floating-point array; shape/dtype structs of ``args``."""
    n_args = len(args)
    if isinstance(argnums, bool) or not isinstance(argnums, int | np.integer):
        raise TypeError(f"{where}: argnums must be a single int, got {argnums!r}.")
    if not -n_args <= argnums < n_args:
        raise ValueError(f"{where}: argnums={argnums} but there are {n_args} positional argument(s).")
    i = int(argnums) % n_args
    avals = [jax.tree_util.tree_map(_abstract, a) for a in args]
    x = avals[i]
    if not isinstance(x, jax.ShapeDtypeStruct) or not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"{where}: argument {i} must be a single real floating-point array, got "
            f"{getattr(x, 'dtype', type(x).__name__)}."
        )
    return i, avals


def sparsity(fun: Callable, *args, argnums: int = 0) -> SparsityPattern:
    """The global sparsity pattern of ``d fun(*args) / d args[argnums]``, from the jaxpr.

    Found by abstract interpretation of ``jax.make_jaxpr(fun)(*args)``, with no
    numerical evaluation: ``args`` may be arrays or ``jax.ShapeDtypeStruct``.
    Conservative: it never misses an entry that can be nonzero for some input.
    A primitive without a rule makes its outputs depend on all its inputs,
    with one warning naming it.

    Args:
      fun: maps arrays to a single array.
      *args: its arguments (arrays or shape/dtype structs).
      argnums: which argument (a single floating-point array) to differentiate.

    Returns:
      A :class:`SparsityPattern` of shape ``out.shape + in.shape``.

    Example::

      >>> jacobians.sparsity(lambda x: jnp.sin(x) * x, jnp.ones(3)).nnz
      3
    """
    return detect(fun, args, argnums, "jacobians.sparsity")[0]


def detect(fun: Callable, args: tuple, argnums, where: str) -> tuple[SparsityPattern, set[str]]:
    """:func:`sparsity`, plus the names of the primitives met in the jaxpr."""
    i, avals = abstract_args(args, argnums, where)
    out = jax.eval_shape(fun, *avals)
    if not isinstance(out, jax.ShapeDtypeStruct):
        raise ValueError(f"{where}: fun must return a single array, got {jax.tree_util.tree_structure(out)}.")
    out_shape, in_shape, rows, cols, prims = _deps.detect(fun, avals, i)
    return SparsityPattern(out_shape, in_shape, rows, cols), prims
