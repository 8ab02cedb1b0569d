"""The values the forward Laplacian carries, and the traced operations on their blocks.

Each intermediate ``v`` of shape ``S`` carries its primal and a *block*
``(j, l)``: ``j`` of shape ``(K,) + S``, the first-derivative columns
(``dv/dx`` over the layout's inputs, see :mod:`._layout`), and ``l``, the
second-order part, whose form depends on what is computed:

- ``"trace"``: shape ``(1,) + S``, the Laplacian so far ``sum_j d^2 v / d x_j^2``;
- ``"diag"``: shape ``(K,) + S``, ``d^2 v / d x_j^2`` per input of the layout.

The two parts stay separate arrays: a linear operation applies to each (two
products for a matrix product), and an element-wise one updates them in place.
Joining them into one array would let one product serve both, but the joins
and slices keep XLA's CPU backend from fusing the chain of products and
element-wise updates into one kernel (measured: several times the compile time,
slower runs).
"""

import jax
import jax.numpy as jnp
import numpy as np

from .. import kernels
from . import _layout


class TV:
    """A value in the sweep: its primal, its block (``None``: constant in ``x``) and its layout.

    A value may also be *lazy*: an element-wise function ``fn`` of another
    value's primal (its ``base``, same shape) whose block is only formed when
    a rule asks for it (:func:`materialize`). A chain ``x -> tanh -> mul ->
    add`` then costs one pass over the base's block, not one per primitive.
    """

    __slots__ = ("primal", "_t", "_idx", "lazy")

    def __init__(self, primal, t=None, idx=None, lazy=None):
        self.primal = primal
        self._t = t
        self._idx = idx
        self.lazy = lazy

    @property
    def active(self) -> bool:
        """Whether the value depends on ``x`` (without forming a lazy block)."""
        return self._t is not None or self.lazy is not None

    @property
    def t(self):
        """The block, formed now if the value is lazy."""
        if self._t is None and self.lazy is not None:
            self._t = materialize(self)
        return self._t

    @property
    def idx(self):
        """The layout (a lazy value has its base's)."""
        return self.lazy.base.idx if self.lazy is not None else self._idx

    @property
    def jac(self):
        """The block, under the name the structured sweeps' selection maps read."""
        return self.t

    def drop(self):
        """Forget the derivatives (an integer result)."""
        self._t, self._idx, self.lazy = None, None, None


class Lazy:
    """``value = fn(base.primal)`` element-wise, ``base`` a value with a block (see :class:`TV`)."""

    __slots__ = ("base", "fn", "lat")

    def __init__(self, base, fn, lat):
        self.base, self.fn, self.lat = base, fn, lat


def root(v):
    """The value whose block a (lazy) value is a function of, and that function."""
    if v.lazy is not None:
        return v.lazy.base, v.lazy.fn
    return v, (lambda u: u)


def derivatives(fn, u):
    """``(fn(u), fn'(u), fn''(u))`` element-wise, by nested JVPs with tangents of ones."""
    ones = jnp.ones_like(u)
    (y, d1), (_, d2) = jax.jvp(lambda z: jax.jvp(fn, (z,), (ones,)), (u,), (ones,))
    return y, d1, d2


def times(c, a):
    """``c * a`` with ``0`` where ``a`` is exactly ``0``: a zero derivative times an infinite partial is 0.

    ``sqrt`` at ``x_0 = 0`` has ``f' = inf``; its element's columns for the other inputs are
    exact zeros, and ``inf * 0 = NaN`` there would spread to every entry of a Laplacian or a
    Hessian diagonal (``jax.hessian``, reverse over forward, gives ``-inf`` at that entry only).
    A NaN partial (an input entry that is NaN) stays in its own element's columns likewise.
    """
    return jnp.where(a == 0, jnp.zeros((), a.dtype), c * a)


def unary(lat, t, d1, d2):
    """The block of ``f(u)`` from ``u``'s block ``t``: ``J' = f' J``, ``L' = f' L + f'' (J, J)``."""
    j, second = cast(t, d1.dtype)
    return times(d1[None], j), times(d1[None], second) + times(d2[None], products(lat, j, j))


def materialize(v):
    """A lazy value's block: one element-wise pass over its base's block."""
    base, fn, lat = v.lazy.base, v.lazy.fn, v.lazy.lat
    _, d1, d2 = derivatives(fn, jnp.asarray(base.primal))
    return unary(lat, base.t, d1, d2)


def cols(lat, v) -> int:
    """``K`` of a value."""
    return lat.cols if v.idx is None else int(v.idx.shape[-1])


def products(lat, ja, jb):
    """``sum_k J_a,k J_b,k`` (``"trace"``, shape ``(1,) + S``) or ``J_a,k J_b,k`` (``"diag"``, ``(K,) + S``)."""
    p = ja * jb
    return jnp.sum(p, axis=0, keepdims=True) if lat.kind == "trace" else p


def add(a, b):
    """The sum of two blocks (``None``: zero)."""
    if a is None:
        return b
    if b is None:
        return a
    return a[0] + b[0], a[1] + b[1]


def scale(c, t):
    """An element-wise factor ``c`` (shape ``S``) times a block (exact zeros stay zero, see :func:`times`)."""
    return times(c[None], t[0]), times(c[None], t[1])


def add_second(t, s):
    """A block plus ``s`` on its second-order part."""
    return t[0], t[1] + s


def apply(f, t):
    """``f`` (a map of one column) applied to every column of both parts."""
    return jax.vmap(f)(t[0]), jax.vmap(f)(t[1])


def broadcast(t, shape, out_shape):
    """NumPy broadcasting of a block's element axes from ``shape`` to ``out_shape``."""
    if tuple(shape) == tuple(out_shape):
        return t
    lead = (1,) * (len(out_shape) - len(shape))

    def one(a):
        return jnp.broadcast_to(a.reshape(a.shape[:1] + lead + tuple(shape)), a.shape[:1] + tuple(out_shape))

    return one(t[0]), one(t[1])


def gather(lat, t, pos: np.ndarray, k_src: int):
    """Move a block's columns: destination column ``s`` of element ``e`` takes source column ``pos[e, s]``.

    ``pos`` (shape ``S + (K',)``, from :func:`._layout.positions`) holds ``k_src``
    where the destination input is not stored in the source (a zero column).
    The second-order part follows its columns (``"diag"``) or is kept (``"trace"``).
    """
    index = jnp.asarray(np.moveaxis(pos, -1, 0).astype(np.int32))
    j = jnp.take_along_axis(t[0], index, axis=0, mode="fill", fill_value=0)
    second = t[1] if lat.kind == "trace" else jnp.take_along_axis(t[1], index, axis=0, mode="fill", fill_value=0)
    return j, second


def relayout(lat, v, shape, dst):
    """``v``'s block (broadcast to ``shape``) in the layout ``dst`` (a superset of ``v``'s; ``None``: dense)."""
    src = v.idx
    t = broadcast(v.t, np.shape(v.primal), shape)
    if src is None:
        if dst is not None:
            raise AssertionError("a dense block cannot move to a sparse layout")
        return t
    src = _layout.broadcast(src, np.shape(v.primal), shape)
    pos = _layout.positions(src, dst, lat.n)
    if pos is None:
        return t
    return gather(lat, t, pos, src.shape[-1])


def compress(lat, t, shape, dst):
    """A dense block (``lat.cols == n`` columns) restricted to the sparse layout ``dst``."""
    if dst is None:
        return t
    pos = np.where(dst < lat.n, dst, lat.n)
    return gather(lat, t, pos, lat.n)


SEED_CONSTANT_MAX = 4096  # seeds up to this many entries are NumPy constants (XLA may fold them)


def seed(lat, x, sparse: bool, start=None):
    """The block of the input vector ``x`` (shape ``(n,)``): the identity, or one column per input (sparse).

    With ``start`` (a traced offset), the dense identity's columns ``start .. start + lat.cols``
    (a chunk; columns past ``n`` are zero). A small seed is a NumPy constant: XLA folds its
    products with a function's closed-over weights at compile time, cheaply, and the first layer
    then costs nothing at run time (per-node MLP: 1.3 ms against 1.5 ms). A larger one is never
    a constant XLA may fold: those products would be evaluated in XLA's interpreter (seconds to
    minutes for a layer of width 512; a broadcast zero is folded too).
    """
    n = x.shape[0]
    dtype = np.dtype(x.dtype)
    k = 1 if sparse else lat.cols
    idx = _layout.seed(n) if sparse else None
    kl = 1 if lat.kind == "trace" else k
    if start is None and k * n <= SEED_CONSTANT_MAX:
        j = np.ones((1, n), dtype) if sparse else np.eye(k, n, dtype=dtype)
        return (j, np.zeros((kl, n), dtype)), idx
    if start is None:
        j = jnp.ones((1, n), x.dtype) if sparse else jnp.eye(k, n, dtype=x.dtype)
    else:
        j = (jnp.arange(n)[None, :] == (start + jnp.arange(k))[:, None]).astype(x.dtype)
    return kernels.opaque((j, jnp.zeros((kl, n), x.dtype))), idx


def zeros(lat, k: int, shape, dtype):
    """An all-zero block (a value that does not depend on ``x`` where one that does is expected)."""
    return jnp.zeros((k,) + tuple(shape), dtype), jnp.zeros((1 if lat.kind == "trace" else k,) + tuple(shape), dtype)


def cast(t, dtype):
    """The block in ``dtype`` (a conversion, or a complex result of real operands)."""
    return tuple(a if a.dtype == dtype else a.astype(dtype) for a in t)


__all__ = ["TV", "Lazy", "add", "add_second", "apply", "broadcast", "cast", "cols", "compress", "derivatives",
           "gather", "materialize", "products", "relayout", "root", "scale", "seed", "times", "unary", "zeros"]
