"""``allow_int=True`` (``jax.jacrev``'s option): integer leaves among the differentiated arguments.

An integer leaf has no tangent space: it is held fixed, and its Jacobian blocks are zeros
of shape ``out.shape + leaf.shape`` (``jax.jacrev(allow_int=True)`` gives them too, in the
leaf's dtype under JAX 0.10; later JAX may give ``float0``: we give the leaf's dtype). The
float leaves go through the same transformation, built once per layout of integer leaves
for a function ``g`` that takes them as one flat tuple per differentiated argument, and the
integer leaves as one more (traced, not differentiated) argument. Calls without integer
leaves take the plain transformation: nothing changes for them.
"""

from collections.abc import Callable, Hashable

import jax
import jax.numpy as jnp
import numpy as np

from . import _args


def _is_int(leaf) -> bool:
    if isinstance(leaf, bool | int | np.integer | np.bool_):
        return True
    dtype = getattr(leaf, "dtype", None)
    return dtype is not None and (jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.bool_))


def _aval(leaf):
    """A leaf's part of the cache key: shape and dtype of an array, else the (hashable) value itself."""
    if hasattr(leaf, "dtype") and hasattr(leaf, "shape"):
        return tuple(leaf.shape), leaf.dtype
    return (type(leaf), leaf) if isinstance(leaf, Hashable) else (type(leaf), id(leaf))


def with_int_leaves(fun: Callable, plain: Callable, build: Callable, argnums, has_aux: bool,
                    jacobian_of: Callable, replace: Callable) -> Callable:
    """The transformation ``plain`` of ``fun``, taking integer leaves in its differentiated arguments.

    Args:
      fun: the user's function.
      plain: the transformation of ``fun`` (calls without integer leaves go there).
      build: ``g, argnums -> `` the same transformation of another function ``g``.
      argnums: the differentiated positions (an int or a tuple).
      has_aux: ``fun`` returns ``(output, aux)``.
      jacobian_of, replace: the Jacobian in a result, and the result with another Jacobian.
    """
    single = isinstance(argnums, int)
    built: dict = {}
    shapes: dict = {}

    def call(*args, **kwargs):
        n = len(args)
        given = (argnums,) if single else tuple(argnums)
        if any(not isinstance(p, int | np.integer) or not -n <= p < n for p in given):
            return plain(*args, **kwargs)  # (its own error names what is wrong)
        positions = tuple(int(p) % n for p in given)
        parts = [jax.tree_util.tree_flatten(args[p]) for p in positions]
        masks = tuple(tuple(_is_int(leaf) for leaf in leaves) for leaves, _ in parts)
        if not any(any(m) for m in masks):
            return plain(*args, **kwargs)
        layout = (n, positions, tuple(treedef for _, treedef in parts), masks)
        transformed = built.get(layout)
        if transformed is None:
            transformed = built[layout] = build(_split_fun(fun, layout), positions[0] if single else positions)
        new, fixed = list(args), []
        for p, (leaves, _), m in zip(positions, parts, masks, strict=True):
            floats = tuple(x for x, i in zip(leaves, m, strict=True) if not i)
            fixed.append(tuple(x for x, i in zip(leaves, m, strict=True) if i))
            new[p] = floats or (0.0,)  # all integer: a placeholder to differentiate (g ignores it; its block dropped)
        fixed = tuple(fixed)
        res = transformed(*new, fixed, **kwargs)
        out_def, out_shapes = _output(fun, args, kwargs, has_aux, shapes)
        jac = jacobian_of(res)
        per_out = out_def.flatten_up_to(jac)
        rows = []
        for sub, o in zip(per_out, out_shapes, strict=True):
            subs = (sub,) if single else sub
            merged = []
            for s, (leaves, treedef), m in zip(subs, parts, masks, strict=True):
                it = iter(s)
                blocks = [_zeros(tuple(o.shape) + np.shape(x), x) if i else next(it) for x, i in zip(leaves, m,
                                                                                                      strict=True)]
                merged.append(treedef.unflatten(blocks))
            rows.append(merged[0] if single else tuple(merged))
        return replace(res, out_def.unflatten(rows))

    # The returned function's methods (.into, .plan, ...) are the plain transformation's: calls without
    # integer leaves.
    for name, attr in vars(plain).items():
        if not name.startswith("__"):
            setattr(call, name, attr)
    call.plain = plain
    return call


def _zeros(shape, leaf):
    """An integer leaf's block: zeros of its dtype, weakly typed for a Python int (as JAX's)."""
    z = jnp.zeros(shape, jnp.result_type(leaf))
    return _args.cast(z, z.dtype, weak=True) if isinstance(leaf, int) or _args.is_weak(leaf) else z


def _split_fun(fun: Callable, layout) -> Callable:
    """``g(*args, fixed)``: ``fun`` with each differentiated argument rebuilt from its float tuple and ``fixed``."""
    _, positions, treedefs, masks = layout

    def g(*a, **kwargs):
        a = list(a)
        fixed = a.pop()
        for p, treedef, m, ints in zip(positions, treedefs, masks, fixed, strict=True):
            f_it, i_it = iter(a[p]), iter(ints)
            a[p] = treedef.unflatten([next(i_it) if i else next(f_it) for i in m])
        return fun(*a, **kwargs)

    return g


def _output(fun, args, kwargs, has_aux, cache: dict):
    """``fun``'s output structure and leaf shapes at these arguments (cached by their shapes and dtypes)."""
    leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
    key = (treedef, tuple(_aval(x) for x in leaves))
    hit = cache.get(key)
    if hit is None:
        out = jax.eval_shape(lambda: fun(*args, **kwargs))  # (closed over: non-array arguments stay as they are)
        out = out[0] if has_aux else out
        out_leaves, out_def = jax.tree_util.tree_flatten(out)
        hit = cache[key] = (out_def, out_leaves)
    return hit
