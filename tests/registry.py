"""One registry of test functions, used by every property test (and by ``bench/``).

Each :class:`Case` is a function of one array, the shape of its input and
what is known about it: tags (``"book"``, ``"dense"``, ``"sparse"``,
``"stencil"``, ``"mlp"``, ``"flow"``, ``"control"``, ``"custom"``, ``"matrix"``,
``"square"``, ``"scalar"``), whether the detected sparsity pattern is exact (the
union of nonzeros over random points), and which autodiff directions JAX
supports for it. Register a new case with the :func:`case` decorator; the
property tests pick it up. Constants are cast to the input's dtype so that
float32 runs stay float32.
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


@dataclass(frozen=True)
class Case:
    name: str
    fun: Callable
    shape: tuple[int, ...]
    tags: frozenset = field(default_factory=frozenset)
    exact: bool = True  # detected pattern == union of nonzeros at random points
    fwd: bool = True  # JAX can push JVPs through it
    rev: bool = True  # JAX can pull VJPs through it

    def reference(self, x):
        """The dense Jacobian from JAX, in whichever direction JAX supports."""
        return jax.jacfwd(self.fun)(x) if self.fwd else jax.jacrev(self.fun)(x)


CASES: dict[str, Case] = {}


def case(shape, *tags, exact=True, fwd=True, rev=True, name=None):
    """Register ``fun`` as a test case with input ``shape``."""

    def register(fun):
        key = name or fun.__name__
        assert key not in CASES, key
        CASES[key] = Case(key, fun, tuple(shape), frozenset(tags), exact, fwd, rev)
        return fun

    return register


def names(*tags, exclude=()) -> list[str]:
    """The registered names having all ``tags`` and none of ``exclude``."""
    return sorted(n for n, c in CASES.items() if set(tags) <= c.tags and not (set(exclude) & c.tags))


_R = np.random.default_rng(0)
A43 = _R.standard_normal((4, 3))
A73 = _R.standard_normal((7, 3))
A26 = _R.standard_normal((2, 6))
B22 = _R.standard_normal((2, 2))
W_BLOCKS = _R.standard_normal((4, 3, 3))
A_BANDED = np.diag(_R.standard_normal(6)) + np.diag(_R.standard_normal(5), 1)
A_DENSE = _R.standard_normal((3, 6))
W1, W2 = _R.standard_normal((8, 6)) / 3, _R.standard_normal((5, 8)) / 3
W_CONV = _R.standard_normal((4, 3, 3, 3))


def _c(a, x):
    return jnp.asarray(a, x.dtype)


# --- the book's examples (MML chapter 5) ------------------------------------------------------


@case((2,), "book", "dense", "square")
def book_linear_5_63(x):
    """(5.63)-(5.66): f(x) = [-2 x1 + x2, x1 + x2], Jacobian [[-2, 1], [1, 1]]."""
    return jnp.stack([-2 * x[0] + x[1], x[0] + x[1]])


@case((3,), "book", "dense")
def book_5_58_vector_field(x):
    """A vector field R^3 -> R^2 with a full Jacobian."""
    return jnp.stack([x[0] * x[1] ** 2, jnp.sin(x[2]) * x[0]])


@case((3, 2), "book", "dense", "matrix")
def book_gram_5_93(R):
    """(5.93)-(5.98): K = R^T R."""
    return R.T @ R


@case((3,), "book", "dense", "scalar")
def book_quadratic_5_107(x):
    """(5.107): x^T B x."""
    return x @ _c(A43[:3, :3], x) @ x


# --- dense maps -----------------------------------------------------------------------------


@case((5,), "dense", "square", exact=True)
def elementwise(x):
    return jnp.sin(x) * x + jnp.exp(-x)


@case((3,), "dense")
def matvec(x):
    return _c(A43, x) @ x


@case((3,), "dense", "mlp")
def tall_tanh(x):
    return jnp.tanh(_c(A73, x) @ x)


@case((6,), "dense", "mlp")
def wide_tanh(x):
    return jnp.tanh(_c(A26, x) @ x)


@case((6,), "dense", "mlp")
def mlp_two_layer(x):
    return jnp.tanh(_c(W2, x) @ jnp.tanh(_c(W1, x) @ x))


@case((3, 2), "dense", "matrix")
def matrix_to_matrix(X):
    return jnp.sin(X.T @ X) @ _c(B22, X)


@case((4,), "dense", "scalar")
def to_scalar(x):
    return jnp.sum(x**3)


@case((), "dense")
def from_scalar(t):
    return jnp.stack([jnp.sin(t), jnp.cos(t), t**2])


@case((3,), "dense", "matrix")
def matrix_valued(x):
    return jnp.outer(jnp.exp(x), x[:2])


@case((4,), "flow", "square")
def planar_flow(x):
    u, w = _c(A43[:, 0], x), _c(A43[:, 1], x)
    return x + u * jnp.tanh(w @ x + 0.3)


@case((6,), "flow", "square", "sparse")
def coupling_flow(x):
    a, b = x[:3], x[3:]
    s = jnp.tanh(_c(A43[:3], x) @ a)
    return jnp.concatenate([a, b * jnp.exp(s) + a**2])


# --- sparse maps ----------------------------------------------------------------------------


@case((9,), "sparse", "stencil")
def stencil_1d(u):
    return u[1:-1] ** 2 - u[:-2] * u[2:] + jnp.sin(u[1:-1]) - 2.0 * u[1:-1]


@case((5, 4), "sparse", "stencil", "square")
def stencil_2d(U):  # 5-point Laplacian plus a nonlinearity, zero boundary
    P = jnp.pad(U, 1)
    return P[:-2, 1:-1] + P[2:, 1:-1] + P[1:-1, :-2] + P[1:-1, 2:] - 4.0 * U + U**3


@case((3, 4), "sparse")
def broadcast(X):
    return X * jnp.sum(X, axis=0)[None] + X[0][None]


@case((12,), "sparse", "square")
def block_diagonal(x):
    return jnp.einsum("bij,bj->bi", _c(W_BLOCKS, x), jnp.tanh(x.reshape(4, 3))).ravel()


@case((2, 2, 2), "sparse", "square")
def batched_dot(X):
    return jnp.einsum("bij,bjk->bik", X, X)


@case((6,), "sparse", "square")
def banded_const_matmul(x):
    return jnp.tanh(_c(A_BANDED, x) @ x)


@case((6,), "dense")
def dense_const_matmul(x):
    return _c(A_DENSE, x) @ jnp.sin(x)


@case((3, 4), "sparse", exact=False)  # max: which entry wins depends on the values
def reductions(X):
    return jnp.concatenate([jnp.sum(X**2, axis=1), jnp.max(X, axis=0), jnp.prod(X[:, :2], axis=1)])


@case((6,), "sparse", "square")
def cumsum(x):
    return jnp.cumsum(x[::-1] ** 2)


@case((3, 4), "sparse", "square")
def transpose_reshape(X):
    return jnp.transpose(X.reshape(2, 3, 2), (2, 0, 1))[..., ::-1] * 2.0


@case((6,), "sparse")
def gather_scatter(x):
    return x.at[jnp.array([0, 2, 2])].add(x[jnp.array([5, 4, 1])] ** 2)[jnp.array([0, 2, 3, 3])]


@case((7,), "sparse")
def dynamic_slice(x):
    return lax.dynamic_slice(x, (2,), (3,)) * x[:3]


@case((6,), "sparse", "square")
def dynamic_update_slice(x):
    return lax.dynamic_update_slice(x, x[:2] ** 2, (3,))


@case((5,), "sparse", "square")
def select(x):
    return jnp.where(x > 0, x**2, jnp.cos(x))


@case((6,), "sparse", "square")
def stack(x):
    return jnp.stack([x[:3] * 2, x[3:] ** 2]).T.reshape(-1)


@case((6,), "sparse", "square")
def split_concat(x):
    return jnp.concatenate(jnp.split(x, 3)[::-1]) * _c(np.arange(1.0, 7.0), x)


@case((6,), "sparse")
def unstack(x):
    return jnp.unstack(x.reshape(2, 3))[1] * jnp.unstack(x.reshape(3, 2), axis=1)[0]


@case((2,), "sparse")
def tile(x):
    return jnp.tile(x, 3) * jnp.arange(6.0, dtype=x.dtype)


@case((6,), "sparse", "square", exact=False)  # which entry lands where depends on the values
def sort_rows(x):
    return jnp.sort(x.reshape(2, 3), axis=1).reshape(-1)


@case((8,), "sparse", exact=False)
def top_k(x):
    return lax.top_k(x.reshape(2, 4), 2)[0].reshape(-1)


@case((8,), "sparse", "square", exact=False)  # dense within each matrix, independent across the batch
def cholesky_batch(x):
    X = x.reshape(2, 2, 2)
    return jnp.linalg.cholesky(X @ jnp.swapaxes(X, 1, 2) + 3 * jnp.eye(2, dtype=x.dtype)[None]).ravel()


@case((4,), "square")  # custom_linear_solve: jnp.linalg.solve's primitive (an LU inside, its pivots a gather)
def linear_solve(x):
    M = jnp.outer(x, x) + 3 * jnp.eye(4, dtype=x.dtype) + _c(B22, x)[0, 0] * jnp.diag(x)
    return jnp.linalg.solve(M, jnp.sin(x))


@case((75,), "sparse", "conv")
def conv_same(x):
    return jnp.tanh(lax.conv_general_dilated(x.reshape(1, 3, 5, 5), _c(W_CONV, x), (1, 1), "SAME")).ravel()


@case((75,), "sparse", "conv")
def conv_sparse_kernel(x):
    w = W_CONV * (np.arange(3)[None, None, :, None] != 1)  # middle kernel row zero
    return lax.conv_general_dilated(x.reshape(1, 3, 5, 5), _c(w, x), (1, 1), "SAME").ravel()


@case((108,), "sparse", "conv")
def conv_strided_dilated(x):
    return lax.conv_general_dilated(
        x.reshape(1, 3, 6, 6), _c(W_CONV, x), (2, 1), ((1, 0), (2, 1)), lhs_dilation=(1, 2), rhs_dilation=(2, 1)
    ).ravel()


@case((40,), "sparse", "conv")
def conv_depthwise(x):
    return lax.conv_general_dilated(
        x.reshape(2, 4, 5), _c(W_CONV[:, :1, :, 0], x), (1,), "VALID", feature_group_count=4
    ).ravel()


@case((20,), "sparse", "conv")
def conv_batch_groups(x):
    return lax.conv_general_dilated(
        x.reshape(4, 1, 5), _c(W_CONV[:2, :1, :, 0], x), (1,), "VALID", batch_group_count=2
    ).ravel()


@case((48,), "sparse", "conv")
def conv_nhwc(x):
    return lax.conv_general_dilated(
        x.reshape(1, 4, 4, 3), _c(W_CONV.transpose(2, 3, 1, 0), x), (1, 1), "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    ).ravel()


@case((4,), "sparse", "square")
def at_set_forgets(x):
    return x.at[1].set(x[3] ** 2) * 1.5


@case((6,), "sparse", "square")
def at_set_slice(x):
    return x.at[jnp.array([0, 2])].set(jnp.sin(x[4:6]))


@case((4,), "sparse", "square")
def zero_derivative(x):
    return x[0] * jnp.floor(x[1]) + jnp.sign(x[2]) * jnp.round(x[3]) + jnp.ceil(x) + x**0


@case((4,), "sparse", "square")
def times_constant_with_zeros(x):
    return x * _c([1.0, 0.0, 2.0, 0.0], x)


@case((4,), "sparse")
def pad_traced_value(x):
    return lax.pad(x[:3], x[3], ((1, 2, 1),))


@case((3,), "sparse", "square")
def reduce_scalar(x):
    return jnp.sum(x[0]) * x


@case((4,), "sparse", "square")
def prng_key_constant(x):
    return x + jax.random.normal(jax.random.key(0), x.shape, x.dtype)


@case((6,), "sparse", "square", exact=False)  # where the mask is 0 the column is empty at every point
def dropout_mask(x):
    return jnp.where(jax.random.bernoulli(jax.random.key(1), 0.5, x.shape), x, 0.0) * 2


@case((9,), "sparse", "matrix")
def matrix_input_output(x):
    return jnp.tanh(x.reshape(3, 3)) @ _c(np.eye(3)[:, :2], x)


# --- control flow and custom rules ---------------------------------------------------------


@case((12,), "control", "sparse", "stencil", "square")
def scan_static_stencil(x):
    def step(c, _):
        return c + 0.1 * (jnp.roll(c, 1) - 2 * c + jnp.roll(c, -1)) ** 2, None

    return lax.scan(step, x, None, length=2)[0]


@case((5,), "control", "sparse")
def scan_xs_per_step(x):
    return lax.scan(lambda c, xi: (c * xi, c + xi), jnp.ones((), x.dtype), x)[1]


@case((5,), "control", "sparse", "square")
def fori_set(x):
    return lax.fori_loop(0, 3, lambda i, c: c.at[i].set(c[i + 1] ** 2), x)


@case((5,), "control", "sparse", "square")
def fori(x):
    return lax.fori_loop(0, 3, lambda i, c: c * 0.5 + jnp.sin(c), x)


@case((5,), "control", "sparse", "square", exact=False, rev=False)
def while_shift(x):
    def body(c):
        v, k = c
        return jnp.concatenate([v[:1], v[:-1] + v[1:]]), k + 1

    return lax.while_loop(lambda c: c[1] < 2, body, (x, 0))[0]


@case((5,), "control", "sparse", "square", exact=False)
def cond_traced(x):
    return lax.cond(x[0] > 0, lambda v: v * 2.0, lambda v: jnp.roll(v, 1), x)


@case((4,), "control", "sparse", "square")
def cond_known(x):
    return lax.cond(True, lambda v: v * 2.0, lambda v: v.sum() * v, x)


@jax.custom_jvp
def softplus(x):
    return jnp.log1p(jnp.exp(x))


softplus.defjvp(lambda p, t: (softplus(p[0]), jax.nn.sigmoid(p[0]) * t[0]))


@jax.custom_vjp
def clip_grad_square(x):
    return x**2


clip_grad_square.defvjp(lambda x: (x**2, x), lambda x, g: (jnp.clip(2 * x * g, -1.0, 1.0),))


@case((6,), "custom", "sparse", "square")
def custom_jvp_and_jit(x):
    return jax.jit(lambda v: softplus(v) * v[::-1])(x)


@case((6,), "custom", "sparse", "square", fwd=False)
def custom_vjp(x):
    return clip_grad_square(x)[::-1] + jnp.roll(x, 2)


@case((5,), "custom", "sparse", "square")
def relu(x):
    return jax.nn.relu(x) * 2.0


@jax.custom_jvp
def _first_times_ones(x):
    return x[0] * jnp.ones_like(x)


_first_times_ones.defjvp(lambda p, t: (_first_times_ones(*p), t[0]))  # the rule's Jacobian: identity


@case((3,), "custom", "sparse", "square")
def custom_rule_denser_than_primal(x):
    return _first_times_ones(x)


@jax.custom_vjp
def _scaled_sin(x):
    return jnp.sin(x) * 2.0


_scaled_sin.defvjp(lambda x: (_scaled_sin(x), jnp.cos(x)), lambda c, g: (2.0 * c * g,))


@case((5,), "custom", "sparse", "square", fwd=False)
def custom_vjp_linear_rule(x):
    return _scaled_sin(x)[::-1] * x
