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

from .. import _args, _deps, _leaves
from .._args import trace_flat
from .._deps import _second
from .._walker import differentiated


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
        rows, cols = np.asarray(rows, np.int64).ravel(), np.asarray(cols, np.int64).ravel()
        if rows.shape != cols.shape:
            raise ValueError(f"SparsityPattern: rows and cols differ in length ({rows.size} and {cols.size}).")
        # Checked before combining: a negative column would otherwise wrap into the previous row.
        if rows.size and (rows.min() < 0 or rows.max() >= m or cols.min() < 0 or cols.max() >= n):
            raise ValueError(f"SparsityPattern: an index lies outside the shape {self.shape}.")
        key = _deps.unique(rows * max(n, 1) + cols)
        self.rows, self.cols = np.divmod(key, max(n, 1))

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

    def block(self, row_range: tuple[int, int], col_range: tuple[int, int], out_shape, in_shape) -> "SparsityPattern":
        """The sub-pattern of flat rows ``[r0, r1)`` and columns ``[c0, c1)``, reshaped to ``out_shape + in_shape``."""
        (r0, r1), (c0, c1) = row_range, col_range
        keep = (self.rows >= r0) & (self.rows < r1) & (self.cols >= c0) & (self.cols < c1)
        return SparsityPattern(out_shape, in_shape, self.rows[keep] - r0, self.cols[keep] - c0)

    def __repr__(self) -> str:
        return (
            f"SparsityPattern(out_shape={self.out_shape}, in_shape={self.in_shape}, "
            f"nnz={self.nnz}, density={self.density:.3g})"
        )


def abstract(a):
    if isinstance(a, jax.ShapeDtypeStruct):
        return a
    if isinstance(a, _args.ARRAY_TYPES):
        return jax.ShapeDtypeStruct(np.shape(a), a.dtype)
    return a


class Detected:
    """The flat pattern of one call structure, with what the engines need to cut it into blocks."""

    def __init__(self, pattern: "SparsityPattern", out_leaves, in_leaves, out_treedef, in_treedef, primitives):
        self.pattern = pattern  # flat: out_shape (m,), in_shape (n,)
        self.out_leaves, self.in_leaves = out_leaves, in_leaves
        self.out_treedef, self.in_treedef = out_treedef, in_treedef
        self.primitives = primitives  # those JAX differentiates (the directions it can take)

    @property
    def single(self) -> bool:
        """One array in, one array out: patterns and results keep the tensor shapes."""
        return len(self.out_leaves) == 1 and len(self.in_leaves) == 1

    def blocks(self, pattern: "SparsityPattern | None" = None) -> list[list[tuple]]:
        """Per (output leaf, input leaf): ``((r0, r1), (c0, c1), out_shape, in_shape)``."""
        cols = list(_leaves.Leaves.of(self.in_leaves).spans())
        return [[((r0, r1), (c0, c1), out, x) for c0, c1, x in cols]
                for r0, r1, out in _leaves.Leaves.of(self.out_leaves).spans()]

    def tree(self, leaf_fn) -> object:
        """The pytree (as ``jacobian`` returns) of ``leaf_fn(block)`` over :meth:`blocks`."""
        rows = [self.in_treedef.unflatten([leaf_fn(b) for b in row]) for row in self.blocks()]
        return self.out_treedef.unflatten(rows)


def detect_call(t, spec, avals, *, has_aux=False, max_nnz=None) -> Detected:
    """Detect the flat pattern of ``t.fun`` for one call structure (host-side, on abstract values)."""
    return detect_traced(t, *trace_flat(t, spec, avals, has_aux=has_aux), max_nnz=max_nnz)


def detect_traced(t, closed, offsets, p, *, max_nnz=None, columns=None) -> Detected:
    """:func:`detect_call` on an already traced flat map (``trace_flat``'s results).

    ``columns`` (sorted flat input indices) seeds only those inputs: the pattern
    is then exactly the full pattern's restriction to those columns (the sets
    are unions, so an unseeded input only removes its own column), at a
    fraction of the cost. The planner uses it to prove cheaply that no colouring can win.
    """
    seeds = [_seed(v.aval.shape, off, columns) for v, off in zip(closed.jaxpr.invars, offsets, strict=True)]
    (out,), walker = _deps.detect(closed, seeds, p.n, where=t.where, max_nnz=max_nnz)
    pattern = SparsityPattern((p.m,), (p.n,), out.rows(), out.indices)
    return Detected(pattern, p.out_leaves, p.in_leaves, p.out_treedef, p.in_treedef, differentiated(closed))


def _seed(shape, offset: int | None, columns) -> "_deps.Deps":
    """The seed of one input leaf at flat ``offset``: identity, restricted to ``columns`` when given."""
    if offset is None:
        return _deps.empty(shape)
    if columns is None:
        return _deps.identity(shape, offset)
    size = math.prod(shape)
    local = columns[(columns >= offset) & (columns < offset + size)] - offset
    indptr = np.zeros(size + 1, np.int64)
    indptr[local + 1] = 1
    return _deps.Deps(tuple(int(d) for d in shape), np.cumsum(indptr), local + offset)


def _blocks(detect: Callable, fun, argnums, has_aux, args, kwargs, where: str):
    """The public pattern functions: ``detect`` (first or second order) on the call's abstract values, per block."""
    t = _args.Transform(fun, argnums, where, build=lambda spec: None)
    _args.check_bool(has_aux, "has_aux", where)
    spec, traced = t.split(args, kwargs)
    det = detect(t, spec, [abstract(a) for a in traced], has_aux=has_aux)
    return det.tree(lambda b: det.pattern.block(*b))


def sparsity(fun: Callable, *args, argnums: int | tuple[int, ...] = 0, has_aux: bool = False, **kwargs):
    """The global sparsity pattern of the Jacobian of ``fun`` at ``args``, from the jaxpr.

    Found by abstract interpretation of ``jax.make_jaxpr(fun)(*args)``, with no
    numerical evaluation: array arguments may be ``jax.ShapeDtypeStruct``s.
    Conservative: it never misses an entry that can be nonzero for some input
    (the values of non-differentiated array arguments are unknown to it). A
    primitive without a rule makes its outputs depend on all its inputs, with
    one warning naming it. Runs on the host, also inside a ``jax.jit``.

    Args:
      fun: the function, with ``jacobian``'s conventions (pytrees, kwargs).
      *args, **kwargs: its arguments (arrays, shape/dtype structs, or hashable statics).
      argnums: which positional argument(s) to differentiate.
      has_aux: ``fun`` returns ``(output, aux)``.

    Returns:
      A :class:`SparsityPattern` of shape ``out.shape + in.shape`` for one
      array in and out; otherwise the pytree of patterns ``jacobian`` would
      return blocks for.

    Example::

      >>> jacobians.sparsity(lambda x: jnp.sin(x) * x, jnp.ones(3)).nnz
      3
    """
    return _blocks(detect_call, fun, argnums, has_aux, args, kwargs, "jacobians.sparsity")


def detect_hessian(t, spec, avals, *, has_aux=False, max_nnz=None) -> Detected:
    """The symmetric flat ``(n, n)`` Hessian pattern of a scalar ``t.fun`` (host-side, abstract)."""
    traced_flat = trace_flat(t, spec, avals, has_aux=has_aux)
    check_scalar(t, traced_flat[2])
    return detect_hessian_traced(traced_flat, max_nnz=max_nnz)


def check_scalar(t, p) -> None:
    """``fun`` must return a scalar (``p``: the flat problem ``trace_flat`` returns)."""
    if p.m != 1 or any(s.shape != () for s in p.out_leaves):
        shown = p.out_leaves[0].shape if len(p.out_leaves) == 1 else p.out_treedef
        raise ValueError(
            f"{t.where}: fun must return a scalar (shape ()), but its output is {shown}. For the second "
            "derivatives of a tensor-valued function use jacobians.jacobian(jacobians.jacobian(fun))."
        )


def detect_hessian_traced(traced_flat, *, max_nnz=None) -> Detected:
    """:func:`detect_hessian` on an already traced scalar map (``trace_flat``'s results)."""
    closed, offsets, p = traced_flat
    n = p.n
    seeds = [
        _deps.identity(v.aval.shape, off) if off is not None else _deps.empty(v.aval.shape)
        for v, off in zip(closed.jaxpr.invars, offsets, strict=True)
    ]
    lat = _second.HessianLattice(n, max_nnz)
    walker = _deps.Walker(lat)
    outs = walker.run(closed, seeds)
    rows, cols = lat.pairs(outs)  # only pairs that reach the output count
    pattern = SparsityPattern((n,), (n,), np.concatenate([rows, cols]), np.concatenate([cols, rows]))
    return Detected(pattern, p.in_leaves, p.in_leaves, p.in_treedef, p.in_treedef, differentiated(closed))


def hessian_sparsity(fun: Callable, *args, argnums: int | tuple[int, ...] = 0, has_aux: bool = False, **kwargs):
    """The global sparsity pattern of the Hessian of a scalar ``fun``, from the jaxpr.

    A second-order analysis on the same walker as :func:`sparsity`: it tracks
    which pairs of inputs meet in a nonlinear operation (a product
    ``x_i * x_j``, a nonlinear function of a sum), not just which inputs the
    output reads: the Hessian of ``sum(x ** 2)`` is diagonal, of ``sum(A @ x)``
    zero. Conservative (never misses an entry that can be nonzero) and
    symmetric by construction. Arguments as :func:`sparsity`.

    Returns:
      A :class:`SparsityPattern` of shape ``x.shape + x.shape`` for one array
      argument; otherwise the nested pytree ``jacobians.hessian`` returns.

    Example::

      >>> jacobians.hessian_sparsity(lambda x: jnp.sum(x ** 2), jnp.ones(3)).nnz
      3
    """
    return _blocks(detect_hessian, fun, argnums, has_aux, args, kwargs, "jacobians.hessian_sparsity")
