"""A corpus of real programs: functions written the way model code is written.

Data, not a test module: :mod:`test_corpus` pushes each :class:`Program` through
every public engine that applies and compares with ``jax.jacfwd``/``jax.jacrev``/
``jax.hessian``. The programs use what model code uses: ``jax.jit`` with
closed-over parameters, nested transforms (``jax.grad`` and ``jax.vmap`` inside,
a Jacobian of a Jacobian), ``jax.checkpoint``, ``lax.map``, ``fori_loop``,
custom rules (a straight-through estimator whose primal is ``round`` and whose
JVP is the identity), modules in the style of Flax (a params dict and an
``apply`` function) and Equinox (a registered pytree dataclass with array
fields and a ``__call__``), a small CNN, attention, layer norm, an RK4 ODE step
and a softmax cross-entropy loss.

What a program is decides which engines apply (:func:`engines`): every program
gets the Jacobian engines and ``gauss_newton``; a scalar output the Hessians;
``square`` (one array in, as many outputs) the divergence and log-determinant;
``batch`` (per-example, batch first) ``batch_jacobian`` and, square per example,
``log_abs_det(batch_first=True)``; ``batch="coupled"`` must raise.
"""

import dataclasses
import functools
import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import jacobians


def _const(key: str, shape, scale=1.0) -> jnp.ndarray:
    """A fixed float64 constant for ``key`` (the same in every process)."""
    return jnp.asarray(scale * np.random.default_rng(zlib.crc32(key.encode())).standard_normal(shape))


@dataclass(eq=False)
class Program:
    """One program: ``fun(*args)``, differentiated in ``argnums``.

    Attributes:
      name: unique name.
      fun: the program.
      make_args: ``rng -> args`` (fresh random inputs; never zeros).
      argnums: the differentiated positions (int or tuple, as ``jax.jacfwd``).
      square: one array argument and as many output entries (divergence, log-determinants).
      batch: ``"independent"`` (per-example, batch axis 0 in and out), ``"coupled"`` or ``None``.
      fwd, rev: JAX can differentiate it forward / in reverse.
      tol: relative tolerance.
    """

    name: str
    fun: Callable
    make_args: Callable
    argnums: int | tuple = 0
    square: bool = False
    batch: str | None = None
    fwd: bool = True
    rev: bool = True
    tol: float = 1e-8


PROGRAMS: dict[str, Program] = {}


def program(make_args, **kw):
    def register(fun):
        name = kw.pop("name", fun.__name__)
        assert name not in PROGRAMS, name
        PROGRAMS[name] = Program(name, fun, make_args, **kw)
        return fun

    return register


def _normal(*shapes):
    return lambda rng: tuple(jnp.asarray(rng.standard_normal(s)) for s in shapes)


# --- MLPs with closed-over parameters ---------------------------------------------------------

W1, B1, W2 = _const("W1", (6, 4), 0.5), _const("B1", (6,), 0.1), _const("W2", (4, 6), 0.5)


@jax.jit
def _residual_block(x):
    return x + jnp.tanh(W2 @ jax.nn.gelu(W1 @ x + B1))


@program(_normal((4,)), square=True)
def jit_closed_over_params(x):
    """A jit-compiled residual block closing over its weights (arrays as jaxpr constants)."""
    return _residual_block(x)


@program(_normal((3, 4)), square=True, batch="independent")
def vmap_inside(X):
    """Per-example residual blocks under ``jax.vmap``, inside the differentiated function."""
    return jax.vmap(_residual_block)(X)


@program(_normal((3, 4)), square=True, batch="independent")
def lax_map_examples(X):
    """The same, one example at a time with ``lax.map`` (a scan over the batch)."""
    return lax.map(_residual_block, X)


@program(_normal((4,)), square=True)
def checkpointed_layers(x):
    """Three residual layers under ``jax.checkpoint`` (rematerialised in reverse mode)."""
    layer = jax.checkpoint(lambda h: h + jnp.tanh(W2 @ jnp.tanh(W1 @ h)) * 0.5)
    for _ in range(3):
        x = layer(x)
    return x


@program(_normal((4,)), square=True)
def scan_over_layers(x):
    """Stacked layers applied by ``lax.scan`` over their weights (as deep models are written)."""
    Ws = _const("Ws", (3, 4, 4), 0.4)
    return lax.scan(lambda h, W: (jnp.tanh(W @ h) + h, None), x, Ws)[0]


@program(lambda rng: (jnp.asarray(rng.standard_normal((3, 4)), jnp.float32),), square=True, batch="independent",
         tol=2e-5)
def float32_mlp(X):
    """Model code runs in float32: a per-example residual MLP with float32 weights."""
    w1, w2 = W1.astype(jnp.float32), W2.astype(jnp.float32)
    return X + jnp.tanh(jax.nn.relu(X @ w1.T + B1.astype(jnp.float32)[None]) @ w2.T)


# --- nested transforms -------------------------------------------------------------------------


def _energy(x):
    return jnp.sum(jnp.cos(x[1:] - x[:-1])) + 0.1 * jnp.sum(x**4)


@program(_normal((5,)), square=True)
def grad_inside(x):
    """A force field: ``jax.grad`` of an energy (its Jacobian is the energy's Hessian)."""
    return -jax.grad(_energy)(x)


@program(_normal((4,)))
def jacobian_of_jacobian(x):
    """``jacobians.jacobian(jacobians.jacobian(f))``: second derivatives of a vector map, flattened."""
    f = lambda v: jnp.stack([jnp.sin(v[0] * v[1]), v[2] ** 3 * v[3], jnp.tanh(v).sum()])  # noqa: E731
    return jacobians.jacobian(jacobians.jacobian(f))(x).ravel()


@program(_normal((4,)))
def jacobian_of_jit_closure(x):
    """``jacobians.jacobian(jax.jit(f))`` where ``f`` closes over an array, itself differentiated again."""
    A = _const("A_jc", (3, 4))
    g = jax.jit(lambda v: jnp.tanh(A @ v))
    return jacobians.jacobian(g)(x).ravel() * x[0]


@program(_normal((3, 2)))
def jacfwd_inside(X):
    """``jax.jacfwd`` and ``jax.vmap`` inside: per-row Jacobians, determinants of 2x2 blocks."""
    return jax.vmap(lambda r: jnp.linalg.det(jax.jacfwd(lambda v: jnp.sin(v) * v[::-1])(r)))(X)


# --- custom rules ------------------------------------------------------------------------------


@jax.custom_jvp
def ste_round(x):
    """Straight-through estimator: primal ``round``, JVP the identity."""
    return jnp.round(x)


ste_round.defjvp(lambda p, t: (ste_round(p[0]), t[0]))


@program(_normal((2, 4)), square=True, batch="independent")
def quantised_mlp(X):
    """Fake-quantised activations (straight-through ``round``) between two layers, per example."""
    h = jnp.tanh(X @ W1.T)
    hq = ste_round(h * 4.0) / 4.0
    return X + hq @ W2.T


@program(_normal((2, 4)), square=True, batch="independent")
def stop_gradient_ste(X):
    """The other straight-through idiom: ``x + stop_gradient(round(x) - x)``."""
    h = X @ W2 @ W1 * 0.3
    return h + lax.stop_gradient(jnp.round(h) - h) + jnp.sin(X)


@jax.custom_vjp
def _reverse_gradient(x):
    return x


_reverse_gradient.defvjp(lambda x: (x, None), lambda _, g: (-0.5 * g,))


@program(_normal((4,)), square=True, fwd=False)
def gradient_reversal_layer(x):
    """A gradient reversal layer (domain adaptation): a ``custom_vjp`` identity whose pullback is ``-g / 2``.

    Reverse mode only; the Jacobian JAX's reverse mode sees is the rule's, not the primal's.
    """
    return x + jnp.tanh(W2 @ _reverse_gradient(jnp.sin(W1 @ x)))


# --- modules ----------------------------------------------------------------------------------


def flax_init(key_name="flax"):
    return {
        "dense1": {"kernel": _const(key_name + "k1", (4, 5), 0.5), "bias": _const(key_name + "b1", (5,), 0.1)},
        "ln": {"scale": 1.0 + _const(key_name + "s", (5,), 0.1), "bias": _const(key_name + "lb", (5,), 0.1)},
        "dense2": {"kernel": _const(key_name + "k2", (5, 3), 0.5), "bias": _const(key_name + "b2", (3,), 0.1)},
    }


def layer_norm(x, scale, bias, eps=1e-5):
    mu = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean((x - mu) ** 2, axis=-1, keepdims=True)
    return (x - mu) * lax.rsqrt(var + eps) * jnp.broadcast_to(scale, x.shape) + jnp.broadcast_to(bias, x.shape)


def flax_apply(params, x):
    """A Flax-style ``apply``: ``x (B, 4) -> (B, 3)``."""
    h = x @ params["dense1"]["kernel"] + params["dense1"]["bias"][None]
    h = layer_norm(jax.nn.relu(h), params["ln"]["scale"], params["ln"]["bias"])
    return h @ params["dense2"]["kernel"] + params["dense2"]["bias"][None]


@program(lambda rng: (flax_init(), jnp.asarray(rng.standard_normal((2, 4)))), argnums=0)
def flax_params(params, x):
    """Jacobian of a Flax-style module's outputs with respect to its params dict."""
    return flax_apply(params, x)


@program(lambda rng: (flax_init(), jnp.asarray(rng.standard_normal((3, 4)))), argnums=1, batch="independent")
def flax_inputs(params, x):
    """The same module with respect to its inputs (batch of 3)."""
    return flax_apply(params, x)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class EqxMLP:
    """An Equinox-style module: a pytree dataclass with array fields and a ``__call__``."""

    w1: jax.Array
    b1: jax.Array
    w2: jax.Array
    alpha: float = dataclasses.field(default=0.5, metadata=dict(static=True))

    def __call__(self, x):
        return x + self.alpha * jnp.tanh(self.w2 @ jax.nn.softplus(self.w1 @ x + self.b1))


def eqx_model():
    return EqxMLP(_const("ew1", (5, 4), 0.5), _const("eb1", (5,), 0.1), _const("ew2", (4, 5), 0.5))


@program(lambda rng: (eqx_model(), jnp.asarray(rng.standard_normal(4))), argnums=0)
def equinox_params(model, x):
    """Jacobian with respect to an Equinox-style module (a pytree of arrays with a static field)."""
    return model(x)


@program(_normal((4,)), square=True)
def equinox_call(x):
    """The module itself as the function (its arrays are closed-over constants)."""
    return eqx_model()(x)


# --- architectures -----------------------------------------------------------------------------


def cnn(params, images):
    """A small CNN: conv 3x3 (NHWC) -> relu -> 2x2 average pool -> dense: ``(B, 6, 6, 1) -> (B, 3)``."""
    h = lax.conv_general_dilated(images, params["conv"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    h = jax.nn.relu(h + params["conv_b"][None, None, None])
    h = lax.reduce_window(h, 0.0, lax.add, (1, 2, 2, 1), (1, 2, 2, 1), "VALID") / 4.0
    return h.reshape(h.shape[0], -1) @ params["dense"]


CNN_PARAMS = {"conv": _const("cnn_k", (3, 3, 1, 2), 0.5), "conv_b": _const("cnn_b", (2,), 0.1),
              "dense": _const("cnn_d", (18, 3), 0.3)}


@program(_normal((2, 6, 6, 1)), batch="independent")
def cnn_inputs(images):
    """Input Jacobian of a small CNN (per example: the batch is independent)."""
    return cnn(CNN_PARAMS, images)


@program(lambda rng: (CNN_PARAMS, jnp.asarray(rng.standard_normal((2, 6, 6, 1)))), argnums=0)
def cnn_params(params, images):
    """Parameter Jacobian of the same CNN."""
    return cnn(params, images)


def attention(X, causal=True):
    """Single-head self-attention over tokens ``X (T, d)`` with a causal mask."""
    Wq, Wk, Wv = (_const(k, (4, 4), 0.5) for k in ("Wq", "Wk", "Wv"))
    q, k, v = X @ Wq, X @ Wk, X @ Wv
    s = q @ k.T / jnp.sqrt(4.0)
    if causal:
        T = X.shape[0]
        s = jnp.where(jnp.tril(jnp.ones((T, T), bool)), s, -jnp.inf)
    return X + jax.nn.softmax(s, axis=-1) @ v


@program(_normal((3, 4)), square=True, batch="coupled")
def causal_attention(X):
    """Self-attention mixes tokens: square (log-determinant, divergence); the token axis is coupled."""
    return attention(X)


@program(_normal((2, 3, 4)), batch="independent")
def batched_attention(X):
    """Attention per sequence under ``jax.vmap``: independent sequences."""
    return jax.vmap(attention)(X)


@program(_normal((3, 5)), batch="independent")
def layernorm(X):
    """Layer norm per example (a dense, singular 5x5 Jacobian per row; independent rows)."""
    return layer_norm(X, 1.0 + _const("ln_s", (5,), 0.1), _const("ln_b", (5,), 0.1))


@program(_normal((3, 4)), square=True, batch="independent")
def prenorm_residual(X):
    """A pre-norm residual MLP block, ``X + tanh(LN(X) W)``: square and (generically) invertible per row."""
    return X + jnp.tanh(layer_norm(X, 1.0, 0.0) @ _const("pn", (4, 4), 0.5))


@program(_normal((4, 3)), batch="coupled")
def batchnorm_training(X):
    """Batch norm in training mode: batch statistics couple the examples."""
    return (X - X.mean(0, keepdims=True)) / jnp.sqrt(X.var(0, keepdims=True) + 1e-5)


@program(_normal((4,)), square=True)
def transformer_block(x):
    """Attention and an MLP with residuals and layer norms on 2 tokens of width 2 (flat input)."""
    X = x.reshape(2, 2)
    W = _const("tb", (2, 2), 0.5)
    h = X + attention(jnp.concatenate([X, X], axis=1), causal=False)[:, :2]
    return (h + jax.nn.gelu(layer_norm(h, 1.0, 0.0) @ W)).ravel()


# --- scientific computing ------------------------------------------------------------------------

A_ODE = _const("ode", (3, 3), 0.5)


def _field(y):
    return jnp.tanh(A_ODE @ y) - 0.1 * y**3


@program(_normal((3,)), square=True)
def rk4_fori_loop(y):
    """Ten RK4 steps of ``y' = tanh(A y) - y^3 / 10`` in a ``fori_loop``."""
    h = 0.1

    def step(_, y):
        k1 = _field(y)
        k2 = _field(y + h / 2 * k1)
        k3 = _field(y + h / 2 * k2)
        k4 = _field(y + h * k3)
        return y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)

    return lax.fori_loop(0, 10, step, y)


@program(lambda rng: (jnp.asarray(rng.standard_normal(3)), 0.05), square=True)
def rk4_step_python_dt(y, dt):
    """One RK4 step with the step size a Python float (a schedule or ODE loop passes a new one each call)."""
    k1 = _field(y)
    k2 = _field(y + dt / 2 * k1)
    k3 = _field(y + dt / 2 * k2)
    k4 = _field(y + dt * k3)
    return y + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)


@program(_normal((6,)), square=True)
def heat_equation_stencil(u):
    """Implicit-explicit heat step on a periodic grid: a sparse stencil (roll) and a cubic reaction."""
    return u + 0.2 * (jnp.roll(u, 1) - 2 * u + jnp.roll(u, -1)) - 0.05 * u**3


@program(_normal((3,)))
def curve_fit_residuals(theta):
    """Least-squares residuals of an exponential decay fit (Gauss-Newton's home ground)."""
    t = jnp.linspace(0.0, 2.0, 7)
    data = 1.3 * jnp.exp(-0.7 * t) + 0.2
    return theta[0] * jnp.exp(-jnp.exp(theta[1]) * t) + theta[2] - data


# --- losses ------------------------------------------------------------------------------------

LABELS = jnp.asarray([2, 0, 1])


@program(_normal((4, 3)))
def softmax_cross_entropy(W):
    """The mean softmax cross-entropy of a linear classifier on 3 examples (a scalar: Hessians)."""
    X = _const("ce_x", (3, 4))
    logits = X @ W
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, LABELS[:, None], axis=1))


@program(lambda rng: (flax_init(), jnp.asarray(rng.standard_normal((2, 4)))), argnums=0)
def flax_loss(params, x):
    """A scalar loss of the Flax-style module's params (pytree Hessians)."""
    return jnp.sum(optax_like_l2(flax_apply(params, x))) + 1e-3 * sum(
        jnp.sum(p**2) for p in jax.tree_util.tree_leaves(params))


def optax_like_l2(y):
    return 0.5 * (y - 0.3) ** 2


@program(_normal((6,)))
def embedding_lookup(table_flat):
    """A token embedding table gathered by integer ids, then pooled (a sparse Jacobian)."""
    table = table_flat.reshape(3, 2)
    ids = jnp.asarray([[0, 2], [2, 2], [1, 0]])
    return jnp.tanh(table[ids].sum(1)).ravel()


@program(_normal((2, 4)), batch="independent")
def dropout_inside_jit(X):
    """Dropout with a fixed key inside ``jax.jit`` (a constant mask)."""
    mask = jax.random.bernoulli(jax.random.key(0), 0.7, X.shape)
    return jax.jit(lambda v: jnp.where(mask, v / 0.7, 0.0) @ W1.T)(X)


# --- what applies ---------------------------------------------------------------------------------

JACOBIAN_ENGINES = ("jacobian", "jacobian_fwd", "jacobian_rev", "structured_fwd", "structured_rev", "compressed",
                    "sparse_jacobian")


def out_shape(p: Program, args):
    return jax.eval_shape(p.fun, *args)


def engines(p: Program, args) -> list[str]:
    """The engines that apply to ``p`` at ``args``."""
    out = list(JACOBIAN_ENGINES) + ["gauss_newton_diagonal", "gauss_newton_materialise"]
    shape = out_shape(p, args)
    if isinstance(shape, jax.ShapeDtypeStruct) and shape.shape == ():
        out += ["hessian", "sparse_hessian"]
    if p.square:
        out += ["divergence", "log_abs_det"]
    if p.batch:
        out += ["batch_jacobian"]
        if p.batch == "independent" and p.square:
            out += ["log_abs_det_batch"]
    return out


# --- running ------------------------------------------------------------------------------------


@functools.cache
def args_of(name: str):
    """Fresh random arguments for a program (one draw per process, seeded by the name)."""
    return PROGRAMS[name].make_args(np.random.default_rng(zlib.crc32(name.encode())))


def diff_args(p: Program, args):
    nums = (p.argnums,) if isinstance(p.argnums, int) else p.argnums
    return [args[i] for i in nums]


@functools.cache
def reference(name: str, kind: str):
    """JAX's derivative of a program at its arguments (``kind``: jac, hessian, flat)."""
    p = PROGRAMS[name]
    args = args_of(name)
    if kind == "jac":
        f = jax.jacfwd(p.fun, p.argnums) if p.fwd else jax.jacrev(p.fun, p.argnums)
        return jax.jit(f)(*args)
    if kind == "hessian":
        f = jax.hessian(p.fun, p.argnums) if p.fwd else jax.jacrev(jax.jacrev(p.fun, p.argnums), p.argnums)
        return jax.jit(f)(*args)
    if kind == "flat":
        return np.asarray(flat_jacobian(p, args))
    raise ValueError(kind)


def flat_jacobian(p: Program, args):
    """``J (m, n)``: all differentiated leaves raveled into ``x``, all outputs into ``y`` (leaf order)."""
    from jax.flatten_util import ravel_pytree

    nums = (p.argnums,) if isinstance(p.argnums, int) else tuple(p.argnums)
    x0, unravel = ravel_pytree([args[i] for i in nums])

    def flat(x):
        a = list(args)
        for i, v in zip(nums, unravel(x), strict=True):
            a[i] = v
        return ravel_pytree(p.fun(*a))[0]

    return jax.jit(jax.jacfwd(flat) if p.fwd else jax.jacrev(flat))(x0)


def _close(got, want, tol, what):
    sg, sw = jax.tree_util.tree_structure(got), jax.tree_util.tree_structure(want)
    if sg != sw:
        return f"{what}: structure {sg} != JAX's {sw}"
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        g, w = np.asarray(g), np.asarray(w)
        if g.shape != w.shape:
            return f"{what}: shape {g.shape} != JAX's {w.shape}"
        err = float(np.max(np.abs(g - w), initial=0.0)) / max(1.0, float(np.max(np.abs(w), initial=0.0)))
        if not err <= tol:
            return f"{what}: wrong by {err:.3g} (relative)"
    return None


def check(name: str, engine: str) -> str | None:
    """``None`` if ``engine`` gives JAX's answer on program ``name``, else what went wrong (crashes included)."""
    p = PROGRAMS[name]
    args = args_of(name)
    try:
        return _check(p, args, engine)
    except jacobians.CoupledBatchError as e:
        if p.batch == "coupled" and engine in ("batch_jacobian", "log_abs_det_batch"):
            return None
        return f"CoupledBatchError on an independent batch: {str(e)[:200]}"
    except Exception as e:  # noqa: BLE001 - a crash is a defect
        return f"crash: {type(e).__name__}: {str(e)[:300]}"


def _check(p, args, engine):
    tol = p.tol
    an = p.argnums
    if engine in JACOBIAN_ENGINES:
        make = {
            "jacobian": lambda: jacobians.jacobian(p.fun, an),
            "jacobian_fwd": lambda: jacobians.jacobian(p.fun, an, mode="fwd"),
            "jacobian_rev": lambda: jacobians.jacobian(p.fun, an, mode="rev"),
            "structured_fwd": lambda: jacobians.jacobian(p.fun, an, method="structured", mode="fwd"),
            "structured_rev": lambda: jacobians.jacobian(p.fun, an, method="structured", mode="rev"),
            "compressed": lambda: jacobians.jacobian(p.fun, an, method="compressed"),
            "sparse_jacobian": lambda: jacobians.sparse_jacobian(p.fun, an, output="dense"),
        }[engine]
        direction = {"jacobian_fwd": "fwd", "structured_fwd": "fwd", "jacobian_rev": "rev",
                     "structured_rev": "rev"}.get(engine)
        try:
            got = make()(*args)
        except Exception as e:
            if direction and not (p.fwd if direction == "fwd" else p.rev):
                return None  # JAX cannot differentiate it that way either: an error is the right answer
            raise e
        return _close(got, reference(p.name, "jac"), tol, engine)
    if engine == "hessian":
        return _close(jacobians.hessian(p.fun, an)(*args), reference(p.name, "hessian"), tol, engine)
    if engine == "sparse_hessian":
        return _close(jacobians.sparse_hessian(p.fun, an, output="dense")(*args), reference(p.name, "hessian"), tol,
                      engine)
    J = reference(p.name, "flat")
    if engine == "gauss_newton_diagonal":
        from jax.flatten_util import ravel_pytree

        got = jacobians.gauss_newton(p.fun, an)(*args).diagonal()
        return _close(ravel_pytree(got)[0], np.sum(J**2, axis=0), tol, engine)
    if engine == "gauss_newton_materialise":
        return _close(jacobians.gauss_newton(p.fun, an)(*args).materialise(), J.T @ J, tol, engine)
    if engine == "divergence":
        return _close(jacobians.divergence(p.fun, an)(*args), np.trace(J), tol, engine)
    if engine == "log_abs_det":
        return _close(jacobians.log_abs_det(p.fun, an)(*args), np.linalg.slogdet(J)[1], tol, engine)
    if engine in ("batch_jacobian", "log_abs_det_batch"):
        x = args[an]
        B = x.shape[0]
        out = out_shape(p, args).shape
        mo, mi = math.prod(out[1:]), math.prod(x.shape[1:])
        blocks = J.reshape(B, mo, B, mi)
        coupled = np.any(blocks * (1 - np.eye(B))[:, None, :, None] != 0)
        if engine == "batch_jacobian":
            got = jacobians.batch_jacobian(p.fun, an)(*args)
        else:
            got = jacobians.log_abs_det(p.fun, an, batch_first=True)(*args)
        if coupled:
            return f"{engine}: returned a result for a coupled batch (examples were proved independent)"
        diag = np.stack([blocks[b, :, b, :] for b in range(B)])
        if engine == "batch_jacobian":
            return _close(got, diag.reshape((B,) + out[1:] + x.shape[1:]), tol, engine)
        return _close(got, np.linalg.slogdet(diag)[1], tol, engine)
    raise ValueError(engine)
