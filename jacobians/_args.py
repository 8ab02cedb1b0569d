"""Option checking and the split of a call into traced and static parts.

Options are checked in Python when a transformation is built, before anything
is traced, so that a typo fails at once and says what was expected.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

MODES = ("fwd", "rev", "auto")
ORDERS = ("C", "F")


def check_mode(mode: Any, where: str) -> str:
    if mode not in MODES:
        raise ValueError(f"{where}: mode must be one of {MODES}, got {mode!r}.")
    return mode


def check_order(order: Any, where: str) -> str:
    if order not in ORDERS:
        raise ValueError(
            f"{where}: order must be 'C' (row-major) or 'F' (column-stacking, the book's vec), got {order!r}."
        )
    return order


def check_chunk_size(chunk_size: Any, where: str) -> int | None:
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int | np.integer):
        raise TypeError(f"{where}: chunk_size must be a positive int or None, got {chunk_size!r}.")
    if chunk_size < 1:
        raise ValueError(f"{where}: chunk_size must be >= 1 (or None for no chunking), got {chunk_size}.")
    return int(chunk_size)


def check_argnums(argnums: Any, where: str) -> tuple[int, ...]:
    """Normalise ``argnums`` to a non-empty tuple of distinct ints."""
    items = argnums if isinstance(argnums, Sequence) and not isinstance(argnums, str) else (argnums,)
    for a in items:
        if isinstance(a, bool) or not isinstance(a, int | np.integer):
            raise TypeError(f"{where}: argnums must be an int or a tuple of ints, got {argnums!r}.")
    items = tuple(int(a) for a in items)
    if not items:
        raise ValueError(f"{where}: argnums must name at least one argument, got {argnums!r}.")
    if len(set(items)) != len(items):
        raise ValueError(f"{where}: argnums must not repeat an argument, got {argnums!r}.")
    return items


ARRAY_TYPES = (jax.Array, np.ndarray, np.generic)


def check_diff_leaf(leaf: Any, where: str, label: str) -> jax.Array:
    """Accept an array or a Python float/complex as a leaf to differentiate."""
    if isinstance(leaf, ARRAY_TYPES):
        return leaf
    if isinstance(leaf, bool | int):
        raise TypeError(
            f"{where}: cannot differentiate with respect to {label}, a Python int ({leaf!r}); "
            "pass a float (e.g. 1.0) or a floating-point array."
        )
    if isinstance(leaf, float | complex):
        return jnp.asarray(leaf)
    raise TypeError(
        f"{where}: differentiated arguments must hold arrays, but {label} is a "
        f"{type(leaf).__name__} ({leaf!r}). Move non-array values to an argument "
        "that is not in argnums."
    )


def check_diff_dtypes(diff: tuple, positions: tuple[int, ...], where: str, holomorphic: bool):
    """Check the dtypes of the differentiated arguments (at trace time)."""
    for i, arg in zip(positions, diff, strict=True):
        for path, x in jax.tree_util.tree_flatten_with_path(arg)[0]:
            label = f"argument {i}{jax.tree_util.keystr(path)}"
            if holomorphic:
                if not jnp.issubdtype(x.dtype, jnp.complexfloating):
                    raise TypeError(
                        f"{where}: holomorphic=True requires complex inputs, but {label} has "
                        f"dtype {x.dtype}. Cast it to a complex dtype or drop holomorphic=True."
                    )
            elif not jnp.issubdtype(x.dtype, jnp.floating):
                hint = (
                    " For holomorphic functions pass holomorphic=True."
                    if jnp.issubdtype(x.dtype, jnp.complexfloating)
                    else " Cast it with x.astype(jnp.float32) (or float64)."
                )
                raise TypeError(
                    f"{where}: can only differentiate with respect to real floating-point "
                    f"inputs, but {label} has dtype {x.dtype}.{hint}"
                )


@dataclass(frozen=True)
class CallSpec:
    """The static part of a call ``fun(*args, **kwargs)``.

    The call's leaves (``tree_flatten((args, kwargs))``) split into the
    differentiated ones, other arrays (both traced) and static values (any
    other hashable leaf: a string flag, an enum, a Python number), which are
    compiled in as constants.
    """

    treedef: Any
    n_args: int
    positions: tuple[int, ...]  # differentiated positional args, in argnums order
    arg_slices: tuple[tuple[int, int], ...]  # leaf range of each positional arg
    static: tuple[tuple[int, Any], ...]  # (leaf index, value)

    def rebuild(self, traced: list) -> tuple[list, dict, tuple]:
        """``(args, kwargs, diff_args)`` from the traced leaves in call order."""
        it = iter(traced)
        static = dict(self.static)
        n = self.treedef.num_leaves
        leaves = [static[i] if i in static else next(it) for i in range(n)]
        args, kwargs = self.treedef.unflatten(leaves)
        return list(args), kwargs, tuple(args[i] for i in self.positions)


class CallSplitter:
    """Split calls into traced leaves and a hashable :class:`CallSpec`, caching per structure."""

    def __init__(self, argnums: tuple[int, ...], where: str):
        self.argnums = argnums
        self.where = where
        self._layouts: dict = {}

    def _layout(self, args: tuple, treedef) -> tuple:
        n = len(args)
        positions = []
        for a in self.argnums:
            if not -n <= a < n:
                shown = self.argnums if len(self.argnums) > 1 else self.argnums[0]
                raise ValueError(
                    f"{self.where}: argnums={shown} but the function was called with {n} positional argument(s)."
                )
            positions.append(a % n)
        if len(set(positions)) != len(positions):
            raise ValueError(f"{self.where}: argnums {self.argnums} name the same argument twice.")
        slices, start = [], 0
        for a in args:
            k = jax.tree_util.tree_structure(a).num_leaves
            slices.append((start, start + k))
            start += k
        diff_idx = {}
        for p in positions:
            lo, hi = slices[p]
            if lo == hi:
                raise ValueError(f"{self.where}: argument {p} has no array leaves to differentiate.")
            diff_idx.update({i: p for i in range(lo, hi)})
        layout = (tuple(positions), tuple(slices), diff_idx)
        self._layouts[treedef] = layout
        return layout

    def __call__(self, args: tuple, kwargs: dict) -> tuple[CallSpec, list]:
        leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
        layout = self._layouts.get(treedef)
        if layout is None:
            layout = self._layout(args, treedef)
        positions, slices, diff_idx = layout
        traced, static = [], []
        for i, leaf in enumerate(leaves):
            if i in diff_idx:
                if not isinstance(leaf, ARRAY_TYPES):
                    leaf = check_diff_leaf(leaf, self.where, f"a leaf of argument {diff_idx[i]}")
                traced.append(leaf)
            elif isinstance(leaf, ARRAY_TYPES):
                traced.append(leaf)
            else:
                try:
                    hash(leaf)
                except TypeError:
                    raise TypeError(
                        f"{self.where}: a non-differentiated argument holds a "
                        f"{type(leaf).__name__}, which is neither an array nor hashable; "
                        "pass arrays or hashable values."
                    ) from None
                static.append((i, leaf))
        return CallSpec(treedef, len(args), positions, slices, tuple(static)), traced
