"""The primitive conformance catalogue: every primitive ``jax.lax`` defines and ``jax.numpy`` emits, with its parameters.

Data, not a test module: :mod:`test_conformance` runs it. Each :class:`Conf` is a
function ``R^shape -> R^out`` built around one primitive (the ``primitive`` it is
filed under, with the parameters spelled out in ``params``), composed with a
nonlinear map before (``sin``, or a shift into the primitive's domain) and,
for real outputs, ``tanh`` after, so that no Jacobian is trivially structured.
The parameter spaces follow JAX's own ``tests/lax_test.py`` (shapes, dimension
numbers, strides, padding, dilations, index modes, fill values, ``dimensions``,
batch dims, real and complex), bounded to a few cases per parameter.

:func:`run` pushes one case through one analysis of :data:`ANALYSES` and returns
an :class:`Outcome`: ``pass``, ``fail`` (a wrong answer: an unsound pattern, a
Jacobian that differs from JAX's, independence proved for a coupled batch),
``crash`` (an exception from the analysis: a defect too), ``conservative``
(allowed but not tight: ``batch_jacobian`` refusing an independent batch) or
``n/a``. References are JAX's own derivatives, compiled once per case and shared
by the analyses (:class:`Context`).

Family names (``Conf.family``) group cases for sampling; the rule family a
primitive's analysis uses is read from the library (:func:`rule_family`).
"""

import functools
import itertools
import math
import warnings
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.ad_checkpoint import checkpoint_name
from jax.extend import core as jcore

import jacobians
from jacobians import _compat, _host_eval

# --- the catalogue --------------------------------------------------------------------------


@dataclass(eq=False)
class Conf:
    """One conformance case: ``fun(x) = post(core(x))`` for ``x`` of ``shape``.

    Attributes:
      primitive: the primitive under test, as jaxprs name it.
      family: the catalogue's group (for sampling and the table).
      params: the primitive's parameters in this case, as text (unique per primitive).
      core: ``x -> y``; ``y`` real or complex.
      shape: the input shape.
      post: apply ``tanh`` to real outputs.
      fwd, rev: JAX can push JVPs / pull VJPs through it.
      tol: relative tolerance of Jacobian comparisons.
    """

    primitive: str
    family: str
    params: str
    core: Callable
    shape: tuple
    post: bool = True
    fwd: bool = True
    rev: bool = True
    tol: float = 1e-9
    tags: frozenset = field(default_factory=frozenset)

    def __post_init__(self):
        self.shape = tuple(self.shape)
        core, post = self.core, self.post

        def fun(x):
            y = core(x)
            return jnp.tanh(y) if post and not jnp.iscomplexobj(y) else y

        self.fun = fun

    @property
    def name(self) -> str:
        return f"{self.primitive}[{self.params}]"


CASES: dict[str, Conf] = {}
_FAMILIES: list[str] = []


def _family(name: str):
    """Register a generator of :class:`Conf` cases under ``name``."""

    def register(gen: Callable[[], Iterator[Conf]]):
        _FAMILIES.append(name)
        for c in gen():
            c.family = name
            assert c.name not in CASES, c.name
            CASES[c.name] = c
        return gen

    return register


def _const(key: str, shape, scale=1.0) -> np.ndarray:
    """A fixed standard-normal constant for ``key`` (the same in every process)."""
    return scale * np.random.default_rng(zlib.crc32(key.encode())).standard_normal(shape)


def _c(a, x):
    """A constant in ``x``'s dtype (float32 runs stay float32)."""
    return jnp.asarray(a, x.dtype)


def _pos(x):
    """Into (0.5, 2.5): logs, roots, negative powers."""
    return 1.5 + jnp.sin(x)


def _unit(x):
    """Into (-0.8, 0.8): asin, acos, atanh, erf_inv."""
    return 0.8 * jnp.sin(x)


def _ri(w):
    """Real and imaginary parts side by side along the last axis (a real output)."""
    return jnp.concatenate([jnp.real(w), jnp.imag(w)], axis=-1)


def _split2(x, a_shape, b_shape):
    """Two operands cut from one flat input ``x``."""
    na = math.prod(a_shape)
    return x[:na].reshape(a_shape), x[na:].reshape(b_shape)


_SQ = jnp.sin  # the default nonlinear map in front of the primitive


def _horner(y, coeffs):
    """``sum_k coeffs[k] y^k``: ``lax.polynomial`` (a primitive from JAX 0.12 on), else ``jnp.polyval``."""
    if hasattr(lax, "polynomial"):
        return lax.polynomial(y, coeffs)
    return jnp.polyval(jnp.asarray(coeffs[::-1], y.dtype), y)


# --- element-wise -----------------------------------------------------------------------------


_UNARY = [
    ("sin", jnp.sin, _SQ), ("cos", jnp.cos, _SQ), ("tan", jnp.tan, _SQ), ("sinh", jnp.sinh, _SQ),
    ("cosh", jnp.cosh, _SQ), ("tanh", jnp.tanh, _SQ), ("asin", jnp.arcsin, _unit), ("acos", jnp.arccos, _unit),
    ("atan", jnp.arctan, _SQ), ("asinh", jnp.arcsinh, _SQ), ("acosh", jnp.arccosh, lambda x: 2.0 + jnp.sin(x)),
    ("atanh", jnp.arctanh, _unit), ("exp", jnp.exp, _SQ), ("exp2", jnp.exp2, _SQ), ("expm1", jnp.expm1, _SQ),
    ("log", jnp.log, _pos), ("log1p", jnp.log1p, _SQ), ("sqrt", jnp.sqrt, _pos), ("rsqrt", lax.rsqrt, _pos),
    ("cbrt", jnp.cbrt, _pos), ("logistic", lax.logistic, _SQ), ("erf", lax.erf, _SQ), ("erfc", lax.erfc, _SQ),
    ("erf_inv", lax.erf_inv, _unit), ("lgamma", lax.lgamma, _pos), ("digamma", lax.digamma, _pos),
    ("bessel_i0e", lax.bessel_i0e, _SQ), ("bessel_i1e", lax.bessel_i1e, _SQ), ("neg", lax.neg, _SQ),
    ("square", lax.square, _SQ), ("abs", jnp.abs, lambda x: 3 * jnp.sin(x)),
    # Primitives of JAX >= 0.11 / 0.12 (older releases compute the same function from other primitives).
    ("one_minus_square", getattr(lax, "one_minus_square", lambda y: (1 - y) * (1 + y)), _SQ), ("log2", jnp.log2, _pos),
    ("polynomial", lambda y: _horner(y, [0.5, 1.0, -2.0, 0.3]), _SQ),
    ("sign", lambda y: jnp.sign(y) * y, lambda x: 3 * jnp.sin(x)),
    ("floor", lambda y: jnp.floor(y) + y, lambda x: 3 * jnp.sin(x)),
    ("ceil", lambda y: jnp.ceil(y) * y, lambda x: 3 * jnp.sin(x)),
]


_SAME_WIDTH_INT = {2: jnp.int16, 4: jnp.int32, 8: jnp.int64}


@_family("unary")
def _unary():
    for name, op, pre in _UNARY:
        yield Conf(name, "", "real (3,4)", lambda x, op=op, pre=pre: op(pre(x)), (3, 4))
    for k in (-3, -1, 0, 1, 2, 3, 5):
        pre = _pos if k < 0 else _SQ
        yield Conf("integer_pow", "", f"y={k}", lambda x, k=k, pre=pre: lax.integer_pow(pre(x), k), (3, 4))
    for method in (lax.RoundingMethod.AWAY_FROM_ZERO, lax.RoundingMethod.TO_NEAREST_EVEN):
        yield Conf("round", "", f"rounding_method={int(method)}",
                   lambda x, m=method: lax.round(3 * jnp.sin(x), m) * jnp.sin(x), (3, 4))
    for e, m in ((5, 10), (8, 7), (11, 52)):
        yield Conf("reduce_precision", "", f"exponent_bits={e}, mantissa_bits={m}",
                   lambda x, e=e, m=m: lax.reduce_precision(jnp.sin(x), e, m), (3, 4), tol=1e-2 if m < 52 else 1e-9)
    yield Conf("convert_element_type", "", "f64->f32->f64",
               lambda x: jnp.sin(x).astype(jnp.float32).astype(x.dtype), (3, 4), tol=1e-6)
    yield Conf("convert_element_type", "", "f64->int32 (zero derivative) * y",
               lambda x: (3 * jnp.sin(x)).astype(jnp.int32).astype(x.dtype) * jnp.sin(x), (3, 4))
    yield Conf("convert_element_type", "", "f64->c128->real",
               lambda x: jnp.real(jnp.sin(x).astype(jnp.complex128) * (1 + 2j)), (3, 4))
    yield Conf("convert_element_type", "", "f64->bool->f64",
               lambda x: (jnp.sin(x) > 0).astype(x.dtype) * jnp.cos(x), (3, 4))
    yield Conf("bitcast_convert_type", "", "float->int bits (zero derivative) * y",
               lambda x: (lax.bitcast_convert_type(jnp.sin(x), _SAME_WIDTH_INT[x.dtype.itemsize]) % 3).astype(x.dtype)
               * jnp.sin(x), (3, 4))
    yield Conf("bitcast_convert_type", "", "f64->2 x u32 (zero derivative) + y",
               lambda x: jnp.sum(lax.bitcast_convert_type(jnp.sin(x).astype(jnp.float64), jnp.uint32) % 5, -1)
               .astype(x.dtype) + jnp.cos(x), (3, 4))
    yield Conf("stop_gradient", "", "y * stop_gradient(y)", lambda x: lax.stop_gradient(jnp.sin(x)) * jnp.sin(x),
               (3, 4))
    yield Conf("copy", "", "jnp.array(copy=True)", lambda x: jnp.array(jnp.sin(x), copy=True) * x, (3, 4))
    yield Conf("optimization_barrier", "", "pair", lambda x: jnp.add(*lax.optimization_barrier((jnp.sin(x), x))),
               (3, 4))
    yield Conf("is_finite", "", "where(isfinite(1/y))", lambda x: jnp.where(jnp.isfinite(1 / jnp.sin(x)),
                                                                           jnp.sin(x), 0.0), (3, 4))
    yield Conf("polygamma", "", "n=1", lambda x: jax.scipy.special.polygamma(1, _pos(x)), (3, 4))
    yield Conf("igamma", "", "gammainc(a const, x)",
               lambda x: jax.scipy.special.gammainc(_c(2.0, x), _pos(x)), (3, 4))
    yield Conf("igamma", "", "gammainc(a traced, x traced)",
               lambda x: jax.scipy.special.gammainc(_pos(x[:, :2]), _pos(x[:, 2:])), (3, 4), tol=1e-6)
    yield Conf("igammac", "", "gammaincc(a const, x)",
               lambda x: jax.scipy.special.gammaincc(_c(1.5, x), _pos(x)), (3, 4))
    yield Conf("regularized_incomplete_beta", "", "betainc(a, b const, x)",
               lambda x: jax.scipy.special.betainc(_c(2.0, x), _c(3.0, x), 0.5 + 0.4 * jnp.sin(x)), (3, 4),
               tol=1e-6)
    # A draw with respect to its shape parameter (implicit reparameterisation): element-wise in ``a``; the key,
    # one for all (broadcast to the batch under vmap) or one per row, carries no derivative.
    yield Conf("random_gamma", "", "gamma(constant key, a)", lambda x: jax.random.gamma(jax.random.key(5), _pos(x)),
               (3, 4), tol=1e-7)
    yield Conf("random_gamma", "", "gamma(a key per row, a) under vmap", lambda x: jax.vmap(jax.random.gamma)(
        jax.random.split(jax.random.key(6), 3), _pos(x)), (3, 4), tol=1e-7)


_COMPLEX_UNARY = [
    ("sin", jnp.sin), ("cos", jnp.cos), ("tan", jnp.tan), ("sinh", jnp.sinh), ("cosh", jnp.cosh),
    ("tanh", jnp.tanh), ("exp", jnp.exp), ("log", jnp.log), ("sqrt", jnp.sqrt), ("rsqrt", lax.rsqrt),
    ("expm1", jnp.expm1), ("log1p", jnp.log1p), ("asin", jnp.arcsin), ("acos", jnp.arccos), ("atan", jnp.arctan),
    ("asinh", jnp.arcsinh), ("acosh", jnp.arccosh), ("atanh", jnp.arctanh), ("square", lax.square),
    ("neg", lax.neg), ("abs", jnp.abs), ("conj", jnp.conj), ("real", jnp.real), ("imag", jnp.imag),
    ("logistic", lax.logistic), ("sign", lambda z: jnp.sign(z) * z),
]


def _z(x):
    """A complex (3, 2) intermediate from a real (3, 4) input."""
    return lax.complex(jnp.sin(x[:, :2]) + 0.5, jnp.cos(x[:, 2:]))


@_family("complex")
def _complex():
    for name, op in _COMPLEX_UNARY:
        yield Conf(name, "", "complex (3,2) -> re|im", lambda x, op=op: _ri(op(_z(x))), (3, 4))
    for k in (-2, 3):
        yield Conf("integer_pow", "", f"complex y={k}", lambda x, k=k: _ri(lax.integer_pow(_z(x), k)), (3, 4))
    yield Conf("pow", "", "complex ** 2.5", lambda x: _ri(_z(x) ** 2.5), (3, 4))
    yield Conf("pow", "", "complex ** complex", lambda x: _ri(_z(x) ** (_z(x)[::-1] * 0.5)), (3, 4))
    yield Conf("complex", "", "lax.complex(a, b)", lambda x: _ri(lax.complex(jnp.sin(x[:, :2]), x[:, 2:] ** 2) ** 2),
               (3, 4))
    yield Conf("abs", "", "|a + ib| summed", lambda x: jnp.sum(jnp.abs(_z(x)), axis=1, keepdims=True) * x, (3, 4))
    yield Conf("div", "", "complex / complex", lambda x: _ri(_z(x) / (_z(x)[:, ::-1] + 2.0)), (3, 4))
    yield Conf("mul", "", "complex * conj", lambda x: _ri(_z(x) * jnp.conj(_z(x))[::-1]), (3, 4))
    yield Conf("dot_general", "", "complex matmul", lambda x: _ri(_z(x).T @ _z(x)), (3, 4))
    yield Conf("exp", "", "complex output exp(1j x)", lambda x: jnp.exp(lax.complex(jnp.zeros_like(x), x)), (3, 4))
    yield Conf("mul", "", "complex output z * z", lambda x: _z(x) * _z(x)[::-1], (3, 4))
    yield Conf("fft", "", "|fft(x)| axis -1", lambda x: jnp.abs(jnp.fft.fft(x, axis=-1)), (3, 4))
    yield Conf("fft", "", "fft(x) complex output axis 0", lambda x: jnp.fft.fft(x, axis=0), (3, 4))
    k = np.array([[1.0, 0.5, 0.25]], np.complex128)
    yield Conf("fft", "", "irfft(rfft(x) * k)", lambda x: jnp.fft.irfft(jnp.fft.rfft(x) * k, n=4), (3, 4))
    yield Conf("fft", "", "fft2 re|im", lambda x: _ri(jnp.fft.fft2(jnp.sin(x))), (3, 4))


_BINARY = [
    # (name, op, pre for a, pre for b)
    ("add", jnp.add, _SQ, jnp.cos), ("sub", jnp.subtract, _SQ, jnp.cos), ("mul", jnp.multiply, _SQ, jnp.cos),
    ("div", jnp.divide, _SQ, _pos), ("max", jnp.maximum, _SQ, jnp.cos), ("min", jnp.minimum, _SQ, jnp.cos),
    ("pow", lax.pow, _pos, jnp.cos), ("atan2", jnp.arctan2, _SQ, jnp.cos),
    ("rem", lax.rem, lambda x: 3 * jnp.sin(x), _pos),
]


@_family("binary")
def _binary():
    for name, op, pa, pb in _BINARY:
        yield Conf(name, "", "(3,4) op (3,4)", lambda x, op=op, pa=pa, pb=pb: op(pa(x[:, :4]), pb(x[:, 4:])), (3, 8))
        yield Conf(name, "", "(3,4) op (1,4) broadcast",
                   lambda x, op=op, pa=pa, pb=pb: op(pa(x[:, :4]), pb(x[:1, 4:])), (3, 8))
        yield Conf(name, "", "(3,4) op constant (3,4)",
                   lambda x, op=op, pa=pa, pb=pb: op(pa(x), pb(_c(_const("b" + name, (3, 4)), x))), (3, 4))
        yield Conf(name, "", "constant op (3,4)",
                   lambda x, op=op, pa=pa, pb=pb: op(pa(_c(_const("a" + name, (3, 4)), x)), pb(x)), (3, 4))
        yield Conf(name, "", "(3,4) op python scalar 0.7", lambda x, op=op, pa=pa, pb=pb: op(pa(x), 0.7), (3, 4))
        yield Conf(name, "", "same operand twice", lambda x, op=op, pa=pa, pb=pb: op(pa(x), pb(x)), (3, 4))
    yield Conf("max", "", "ties max(y, y)", lambda x: jnp.maximum(jnp.sin(x), jnp.sin(x)), (3, 4))
    yield Conf("clamp", "", "python scalar bounds", lambda x: lax.clamp(-0.5, jnp.sin(x), 0.5), (3, 4))
    yield Conf("clamp", "", "constant array bounds",
               lambda x: lax.clamp(_c(_const("lo", (3, 4), 0.3) - 0.5, x), jnp.sin(x), _c(0.5, x)), (3, 4))
    yield Conf("clamp", "", "traced bounds", lambda x: lax.clamp(jnp.cos(x[:, 4:]) - 0.3, jnp.sin(x[:, :4]),
                                                                  jnp.cos(x[:, 4:]) + 0.3), (3, 8))
    yield Conf("clamp", "", "jnp.clip traced", lambda x: jnp.clip(jnp.sin(x[:, :4]), -0.4, jnp.cos(x[:, 4:])), (3, 8))
    for cmp in ("lt", "le", "gt", "ge"):
        op = getattr(lax, cmp)
        yield Conf("select_n", "", f"where({cmp}(a, b), a * b, sin b)",
                   lambda x, op=op: jnp.where(op(jnp.sin(x[:, :4]), jnp.cos(x[:, 4:])), x[:, :4] * x[:, 4:],
                                              jnp.sin(x[:, 4:])), (3, 8))
    for cmp in ("eq", "ne"):
        op = getattr(lax, cmp)
        yield Conf("select_n", "", f"where({cmp}(round a, round b), a, b)",
                   lambda x, op=op: jnp.where(op(jnp.round(jnp.sin(x[:, :4])), jnp.round(jnp.cos(x[:, 4:]))),
                                              x[:, :4], x[:, 4:] ** 2), (3, 8))
    yield Conf("select_n", "", "3 cases, int32 which",
               lambda x: lax.select_n((x[:, :4] > 0).astype(jnp.int32) + (x[:, 4:] > 0).astype(jnp.int32),
                                      jnp.sin(x[:, :4]), x[:, 4:] ** 2, x[:, :4] * x[:, 4:]), (3, 8))
    yield Conf("select_n", "", "bool which broadcast row", lambda x: lax.select_n(
        jnp.broadcast_to(x[:1, :4] > 0, (3, 4)), jnp.sin(x[:, :4]), jnp.cos(x[:, 4:])), (3, 8))
    yield Conf("select_n", "", "constant which", lambda x: lax.select_n(
        jnp.asarray(_const("w", (3, 4)) > 0), jnp.sin(x[:, :4]), x[:, 4:] ** 3), (3, 8))


@_family("int")
def _int():
    """Integer arithmetic on traced values (from argmax/argsort) used as indices and masks."""

    def arg(x):
        return jnp.argmax(x, axis=1).astype(jnp.int32)  # (3,) in [0, 4)

    ops = {
        "add": lambda i: (i + 3) % 4, "sub": lambda i: (7 - i) % 4, "mul": lambda i: (i * 3) % 4,
        "rem": lambda i: lax.rem(i + 5, jnp.int32(4)), "div": lambda i: (i * 7) // 2 % 4, "neg": lambda i: (-i) % 4,
        "max": lambda i: jnp.maximum(i, 2), "min": lambda i: jnp.minimum(i, 1),
        "and": lambda i: i & 2, "or": lambda i: (i | 1) % 4, "xor": lambda i: i ^ 3, "not": lambda i: (~i) % 4,
        "shift_left": lambda i: (i << 1) % 4, "shift_right_arithmetic": lambda i: (i + 4) >> 1,
        "shift_right_logical": lambda i: lax.shift_right_logical(i + 4, jnp.int32(1)),
        "clz": lambda i: lax.clz(i) % 4, "population_count": lambda i: lax.population_count(i),
        "sign": lambda i: jnp.sign(i) + 1, "abs": lambda i: jnp.abs(i - 2),
        "integer_pow": lambda i: i**2 % 4, "convert_element_type": lambda i: i.astype(jnp.int8).astype(jnp.int32),
        "select_n": lambda i: jnp.where(i > 1, i, 3 - i), "clamp": lambda i: lax.clamp(jnp.int32(1), i, jnp.int32(2)),
    }
    for name, op in ops.items():
        yield Conf(name, "", "int32 index arithmetic",
                   lambda x, op=op: jnp.sin(x)[jnp.arange(3), op(arg(x))] * x[:, 0], (3, 4))
    yield Conf("iota", "", "int iota index", lambda x: jnp.sin(x)[lax.iota(jnp.int32, 3), (lax.iota(jnp.int32, 3) + 1)]
               * x[:, 1], (3, 4))
    yield Conf("argmin", "", "argmin index axis 0", lambda x: jnp.sin(x)[jnp.argmin(x, axis=0), jnp.arange(4)] * x[0],
               (3, 4))


# --- reductions, cumulative, windows ----------------------------------------------------------


@_family("reduction")
def _reduction():
    reds = {"reduce_sum": jnp.sum, "reduce_max": jnp.max, "reduce_min": jnp.min, "reduce_prod": jnp.prod}
    for (name, op), (shape, axes) in itertools.product(
        reds.items(), [((3, 4), (0,)), ((3, 4), (1,)), ((3, 4), (0, 1)), ((2, 3, 4), (0, 2)), ((2, 3, 4), (1,))]
    ):
        yield Conf(name, "", f"{shape} axes={axes}", lambda x, op=op, axes=axes: op(jnp.sin(x), axis=axes) * jnp.sum(
            x**2, axis=axes), shape)
    yield Conf("reduce_max", "", "ties: max over a stacked copy",
               lambda x: jnp.max(jnp.stack([jnp.sin(x), jnp.sin(x)]), axis=0), (3, 4))
    yield Conf("reduce_max", "", "ties: rounded values", lambda x: jnp.max(jnp.round(3 * jnp.sin(x)), axis=1) + x[:, 0],
               (3, 4))
    yield Conf("reduce_and", "", "all(y > -0.5, axis 1)", lambda x: jnp.where(
        jnp.all(jnp.sin(x) > -0.5, axis=1, keepdims=True), x, x**2), (3, 4))
    yield Conf("reduce_or", "", "any(y > 0.9, axis 0)", lambda x: jnp.where(
        jnp.any(jnp.sin(x) > 0.9, axis=0, keepdims=True), x, x**2), (3, 4))
    yield Conf("reduce_xor", "", "xor of int(3y) axis 1", lambda x: x * (lax.reduce(
        (3 * jnp.sin(x)).astype(jnp.int32), 0, lax.bitwise_xor, (1,)) % 2).astype(x.dtype)[:, None], (3, 4))
    for axis in (0, 1):
        yield Conf("argmax", "", f"take_along_axis(argmax axis={axis})", lambda x, a=axis: jnp.take_along_axis(
            jnp.sin(x), jnp.expand_dims(jnp.argmax(x, axis=a), a), axis=a) * jnp.sum(x, axis=a, keepdims=True),
                   (3, 4))
    yield Conf("argmax", "", "argmax as float weight", lambda x: x * jnp.argmax(x, axis=1).astype(x.dtype)[:, None],
               (3, 4))
    yield Conf("reduce_max", "", "logsumexp axis 1", lambda x: jax.nn.logsumexp(x, axis=1), (3, 4))
    yield Conf("reduce_sum", "", "var axis 0", lambda x: jnp.var(jnp.sin(x), axis=0), (3, 4))
    yield Conf("reduce", "", "variadic (sum, product) over axis 1", lambda x: jnp.concatenate(
        lax.reduce((x, jnp.sin(x)), (0.0, 1.0), lambda a, b: (a[0] + b[0], a[1] * b[1]), (1,))), (3, 4))


@_family("cumulative")
def _cumulative():
    ops = {"cumsum": lax.cumsum, "cumprod": lax.cumprod, "cummax": lax.cummax, "cummin": lax.cummin,
           "cumlogsumexp": lax.cumlogsumexp}
    for (name, op), axis, reverse in itertools.product(ops.items(), (0, 1), (False, True)):
        yield Conf(name, "", f"axis={axis}, reverse={reverse}",
                   lambda x, op=op, a=axis, r=reverse: op(jnp.sin(x), axis=a, reverse=r), (3, 4))
    yield Conf("cumsum", "", "(2,3,4) axis=2 jnp.cumsum", lambda x: jnp.cumsum(jnp.sin(x), axis=2), (2, 3, 4))
    yield Conf("cummax", "", "ties", lambda x: lax.cummax(jnp.round(2 * jnp.sin(x)) + 0.1 * x, axis=1), (3, 4))


@_family("window")
def _window():
    for (shape, dims, strides, pad), base, wdil in itertools.product(
        [((4, 5), (2, 2), (1, 1), "VALID"), ((4, 5), (2, 3), (2, 1), "SAME"),
         ((4, 5), (1, 2), (1, 2), ((1, 0), (0, 1))), ((5, 6), (2, 2), (1, 1), ((-1, 0), (1, -1)))],
        [(1, 1), (1, 2)], [(1, 1), (2, 1)],
    ):
        p = f"{shape} window={dims} strides={strides} padding={pad} base_dilation={base} window_dilation={wdil}"
        for name, init, op in (("reduce_window_sum", 0.0, lax.add), ("reduce_window_max", -jnp.inf, lax.max),
                               ("reduce_window_min", jnp.inf, lax.min)):
            # JAX has no VJP of max/min pooling with window dilation or negative padding: forward only.
            negative = not isinstance(pad, str) and any(lo < 0 or hi < 0 for lo, hi in pad)
            rev = name == "reduce_window_sum" or (wdil == (1, 1) and not negative)
            yield Conf(name, "", p, lambda x, i=init, o=op, d=dims, s=strides, pd=pad, b=base, w=wdil: lax.reduce_window(
                jnp.sin(x), i, o, d, s, pd, base_dilation=b, window_dilation=w), shape, rev=rev)
    yield Conf("reduce_window_sum", "", "avg_pool NHWC 2x2", lambda x: lax.reduce_window(
        jnp.sin(x), 0.0, lax.add, (1, 2, 2, 1), (1, 2, 2, 1), "VALID") / 4.0, (2, 4, 4, 1))

    def max_pool(y):
        return lax.reduce_window(y, -jnp.inf, lax.max, (2, 2), (1, 2), ((1, 0), (0, 1)))

    # Max pooling's own JVP and VJP primitives (the operand only selects).
    yield Conf("select_and_gather_add", "", "jvp of max pool (2,2) strides (1,2) padded",
               lambda x: jax.jvp(max_pool, (jnp.sin(x),), (jnp.cos(x),))[1], (4, 5))
    yield Conf("select_and_scatter_add", "", "grad of max pool (2,2) strides (1,2) padded",
               lambda x: jax.grad(lambda y: jnp.sum(max_pool(y) ** 2))(jnp.sin(x)), (4, 5))


# --- movement -----------------------------------------------------------------------------------


@_family("reshape")
def _reshape():
    for shape, new in [((3, 4), (12,)), ((3, 4), (4, 3)), ((3, 4), (2, 6)), ((3, 4), (2, 2, 3)), ((3, 4), (3, 4)),
                       ((2, 3, 4), (6, 4)), ((2, 3, 4), (2, 12))]:
        yield Conf("reshape", "", f"{shape}->{new} order=C", lambda x, n=new: jnp.reshape(jnp.sin(x), n) * 2.0, shape)
        yield Conf("reshape", "", f"{shape}->{new} order=F",
                   lambda x, n=new: jnp.reshape(jnp.sin(x), n, order="F") * 2.0, shape)
    for shape, new, dims in [((3, 4), (12,), (1, 0)), ((3, 4), (3, 4), (1, 0)), ((2, 3, 4), (24,), (2, 0, 1)),
                             ((2, 3, 4), (4, 6), (2, 1, 0)), ((2, 3, 4), (2, 12), (0, 2, 1)),
                             ((2, 3, 4), (3, 8), (1, 2, 0))]:
        yield Conf("reshape", "", f"{shape}->{new} dimensions={dims}",
                   lambda x, n=new, d=dims: lax.reshape(jnp.sin(x), n, dimensions=d), shape)
    yield Conf("reshape", "", "ravel order=F", lambda x: jnp.ravel(jnp.sin(x), order="F")[::-1] * x.ravel(), (3, 4))
    yield Conf("reshape", "", "constant reshaped order=F", lambda x: jnp.sin(x) * jnp.reshape(
        _c(np.arange(12.0), x), (3, 4), order="F"), (3, 4))
    yield Conf("reshape", "", "constant reshaped order=F then gathered", lambda x: jnp.sin(x).ravel()[
        jnp.reshape(jnp.arange(12), (3, 4), order="F").ravel()], (3, 4))


@_family("movement")
def _movement():
    for perm in itertools.permutations(range(3)):
        yield Conf("transpose", "", f"(3,3,2) perm={perm}", lambda x, p=perm: jnp.transpose(jnp.sin(x), p), (3, 3, 2))
    for shape, out, dims in [((3, 4), (3, 2, 4), (0, 2)), ((3, 4), (2, 3, 4), (1, 2)), ((4,), (3, 4), (1,)),
                             ((3,), (3, 4), (0,)), ((), (3, 4), ()), ((3, 1), (3, 4), (0, 1))]:
        yield Conf("broadcast_in_dim", "", f"{shape}->{out} dims={dims}", lambda x, o=out, d=dims: lax.broadcast_in_dim(
            jnp.sin(x), o, d) * _c(_const(f"bid{o}", o), x), shape)
    yield Conf("broadcast_in_dim", "", "row 0 to every row (batch coupling)", lambda x: lax.broadcast_in_dim(
        jnp.sin(x[0]), (3, 4), (1,)) * x, (3, 4))
    for dims in ((1,), (0, 2)):
        yield Conf("expand_dims", "", f"dims={dims}", lambda x, d=dims: lax.expand_dims(jnp.sin(x), d) * 2.0, (3, 4))
    for dims in ((1,), (1, 3)):
        yield Conf("squeeze", "", f"(3,1,4,1) dims={dims}", lambda x, d=dims: lax.squeeze(jnp.sin(x), d) * 2.0,
                   (3, 1, 4, 1))
    for dims in ((0,), (1,), (0, 1)):
        yield Conf("rev", "", f"dims={dims}", lambda x, d=dims: lax.rev(jnp.sin(x), d) * x, (3, 4))
    for dim, parts in [(0, "y, y**2"), (1, "y, y**2"), (1, "y[:, :1], const, y[:, 1:]"), (0, "y only"),
                       (1, "y[:, 2:], y[:, :2], y[:, 1:3]")]:
        def cat(x, dim=dim, parts=parts):
            y = jnp.sin(x)
            ops = {"y, y**2": [y, y**2], "y[:, :1], const, y[:, 1:]": [y[:, :1], _c(_const("cat", (3, 2)), x),
                                                                         y[:, 1:]],
                   "y only": [y], "y[:, 2:], y[:, :2], y[:, 1:3]": [y[:, 2:], y[:, :2], y[:, 1:3]]}[parts]
            return lax.concatenate(ops, dim)

        yield Conf("concatenate", "", f"dimension={dim}: {parts}", cat, (3, 4))
    for axis in (0, 1, 2):
        yield Conf("stack", "", f"axis={axis}", lambda x, a=axis: jnp.stack([jnp.sin(x), x**2], axis=a), (3, 4))
    for axis in (0, 1):
        yield Conf("unstack", "", f"axis={axis}", lambda x, a=axis: jnp.stack(
            jnp.unstack(jnp.sin(x), axis=a)[::-1], axis=a) * x, (3, 4))
    for axis, sizes in [(1, (1, 3)), (0, (2, 1)), (1, (2, 2))]:
        yield Conf("split", "", f"axis={axis} sizes={sizes}", lambda x, a=axis, s=sizes: jnp.concatenate(
            lax.split(jnp.sin(x), s, a)[::-1], axis=a) * x, (3, 4))
    for reps in ((2, 1), (1, 3), (2, 2)):
        yield Conf("tile", "", f"reps={reps}", lambda x, r=reps: jnp.tile(jnp.sin(x), r) * 2.0, (3, 4))
    for dim in (0, 1):
        yield Conf("iota", "", f"broadcasted_iota float dim={dim}", lambda x, d=dim: jnp.sin(x) * lax.broadcasted_iota(
            x.dtype, (3, 4), d), (3, 4))


# Slices and pads from JAX's lax tests: (shape, starts, limits, strides) and (shape, padding_config).
_SLICES = [((3,), (1,), (2,), None), ((7,), (4,), (7,), None), ((5,), (1,), (5,), (2,)), ((8,), (1,), (6,), (2,)),
           ((5, 3), (1, 1), (3, 2), None), ((5, 3), (1, 1), (3, 1), None), ((7, 5, 3), (4, 0, 1), (7, 1, 3), None),
           ((5, 3), (1, 1), (2, 1), (1, 1)), ((5, 3), (1, 1), (5, 3), (2, 1)), ((6, 4), (0, 1), (6, 4), (3, 2))]
_PADS = [((2, 3), [(1, 2, 1), (0, 1, 0)]), ((2,), [(1, 2, 0)]), ((1, 2), [(1, 2, 0), (3, 4, 0)]),
         ((1, 2), [(0, 0, 0), (0, 0, 0)]), ((2,), [(1, 2, 3)]), ((3, 2), [(1, 2, 1), (3, 4, 2)]), ((2,), [(-1, 2, 0)]),
         ((4, 2), [(-1, -2, 0), (1, 2, 0)]), ((4, 2), [(-1, 2, 0), (1, 2, 2)]), ((5,), [(-1, -2, 2)]),
         ((4, 2), [(-1, -2, 1), (1, 2, 2)]), ((2, 3), [(0, 0, 0), (-2, -2, 4)]), ((2, 3), [(0, 0, 0), (-2, -3, 1)])]


@_family("slice_pad")
def _slice_pad():
    for shape, starts, limits, strides in _SLICES:
        yield Conf("slice", "", f"{shape} {starts}:{limits}:{strides}",
                   lambda x, s=starts, e=limits, st=strides: lax.slice(jnp.sin(x), s, e, st) * 2.0, shape)
    yield Conf("slice", "", "negative step y[::-2, 1::2]", lambda x: jnp.sin(x)[::-2, 1::2] * x[:2, :2], (4, 4))
    for (shape, pads), value in itertools.product(_PADS, ("0", "1.5", "traced")):
        def padded(x, pads=pads, value=value):
            v = {"0": _c(0.0, x), "1.5": _c(1.5, x), "traced": jnp.cos(x.ravel()[0])}[value]
            return lax.pad(jnp.sin(x), v, pads)

        yield Conf("pad", "", f"{shape} {pads} value={value}", padded, shape)
    for mode in ("constant", "edge", "reflect", "wrap", "symmetric", "linear_ramp"):
        yield Conf("pad", "", f"jnp.pad mode={mode}", lambda x, m=mode: jnp.pad(jnp.sin(x), ((1, 2), (2, 1)), mode=m),
                   (3, 4))


@_family("dynamic")
def _dynamic():
    for starts in ((1, 0), (2, 3), (-1, 5), (0, -2)):
        yield Conf("dynamic_slice", "", f"(4,5) starts={starts} sizes=(2,3) (clamped)",
                   lambda x, s=starts: lax.dynamic_slice(jnp.sin(x), s, (2, 3)) * 2.0, (4, 5))
    yield Conf("dynamic_slice", "", "traced start from argmax", lambda x: lax.dynamic_slice(
        jnp.sin(x), (jnp.argmax(x[:, 0]), 1), (2, 3)), (4, 5))
    yield Conf("dynamic_slice", "", "dynamic_index_in_dim axis 1 uint8 index", lambda x: lax.dynamic_index_in_dim(
        jnp.sin(x), jnp.uint8(3), axis=1, keepdims=False) * x[:, 0], (4, 5))
    for starts in ((1, 0), (3, 4), (-2, 1)):
        yield Conf("dynamic_update_slice", "", f"(4,5) update (2,3) from x at {starts} (clamped)",
                   lambda x, s=starts: lax.dynamic_update_slice(jnp.sin(x), x[:2, 2:] ** 2, s), (4, 5))
    yield Conf("dynamic_update_slice", "", "constant update", lambda x: lax.dynamic_update_slice(
        jnp.sin(x), _c(_const("dus", (2, 2)), x), (1, 1)), (4, 5))
    yield Conf("dynamic_update_slice", "", "traced start", lambda x: lax.dynamic_update_slice(
        jnp.sin(x), x[:1] ** 2, (jnp.argmax(x[:, 0]), 0)), (4, 5))


_I = np.array  # index arrays (constants in the jaxpr)


def _gather(dnums, slice_sizes, idx, mode=None, fill_value=None):
    return lambda y: lax.gather(y, jnp.asarray(idx), dnums, slice_sizes, mode=mode, fill_value=fill_value)


_GDN = lax.GatherDimensionNumbers


@_family("gather")
def _gather_cases():
    # JAX's lax-test dimension numbers, and variants with a permuted start_index_map.
    table = [
        ("(5,) collapsed", (5,), _I([[0], [2]]), _GDN((), (0,), (0,)), (1,)),
        ("(10,) offset", (10,), _I([[0], [0], [3]]), _GDN((1,), (), (0,)), (2,)),
        ("(10,5) collapsed+offset", (10, 5), _I([[0], [2], [1]]), _GDN((1,), (0,), (0,)), (1, 3)),
        ("(10,5) two starts", (10, 5), _I([[0, 2], [1, 0]]), _GDN((1,), (0,), (0, 1)), (1, 3)),
        ("(4,5) start_index_map permuted", (4, 5), _I([[1, 0], [3, 2], [4, 1]]), _GDN((), (0, 1), (1, 0)), (1, 1)),
        ("(4,5) start_index_map permuted + offsets", (4, 5), _I([[1, 0], [2, 1]]), _GDN((1, 2), (), (1, 0)), (2, 3)),
        ("(2,5) batching dims", (2, 5), _I([[[0], [2]], [[1], [1]]]),
         _GDN((), (1,), (1,), operand_batching_dims=(0,), start_indices_batching_dims=(0,)), (1, 1)),
        ("(2,3,10) batching dims swapped", (2, 3, 10), _I([[[0], [1]], [[2], [3]], [[4], [5]]]),
         _GDN((2,), (), (2,), operand_batching_dims=(0, 1), start_indices_batching_dims=(1, 0)), (1, 1, 3)),
    ]
    for label, shape, idx, dnums, sizes in table:
        for mode in (None, "clip", "fill", "promise_in_bounds"):
            g = _gather(dnums, sizes, idx, mode=mode)
            yield Conf("gather", "", f"{label} mode={mode}", lambda x, g=g: g(jnp.sin(x)) * 2.0, shape)
    # Out-of-bounds starts: clamped, or filled with every kind of fill value.
    for mode, fill in [("clip", None), ("fill", 0.0), ("fill", 2.5), ("fill", -1.0), ("fill", 3.0), ("fill", 7.0)]:
        yield Conf("gather", "", f"(6,) out-of-bounds starts mode={mode} fill_value={fill}", lambda x, m=mode, f=fill:
                   jnp.take(jnp.sin(x), jnp.asarray([0, 7, 5, -9, 2]), mode=m, fill_value=f) * 2.0, (6,))
        yield Conf("gather", "", f"(4,5) slices out of bounds mode={mode} fill_value={fill}",
                   lambda x, m=mode, f=fill: _gather(_GDN((1,), (0,), (0, 1)), (1, 3), _I([[1, 3], [3, 4], [0, 0]]),
                                                     m, f)(jnp.sin(x)), (4, 5))
    yield Conf("gather", "", "x.at[].get(mode=fill, fill_value=2.0) next to an MLP", lambda x: jnp.tanh(
        _c(_const("mlp", (6, 6)), x) @ x) + jnp.sin(x).at[jnp.arange(6) + 2].get(mode="fill", fill_value=2.0), (6,))
    # NumPy-style indexing.
    idx = jnp.asarray([2, 0, 0, 1])
    yield Conf("gather", "", "y[idx] duplicates", lambda x: jnp.sin(x)[idx] * 2.0, (3, 4))
    yield Conf("gather", "", "y[:, idx]", lambda x: jnp.sin(x)[:, idx] * 2.0, (3, 4))
    yield Conf("gather", "", "y[idx0, idx1]", lambda x: jnp.sin(x)[jnp.asarray([2, 0, 1]), jnp.asarray([3, 3, 0])],
               (3, 4))
    yield Conf("gather", "", "y[idx (2,2)]", lambda x: jnp.sin(x)[jnp.asarray([[1, 2], [0, 0]])], (3, 4))
    yield Conf("gather", "", "y[idx, :, idx] non-adjacent advanced", lambda x: jnp.sin(x)[
        jnp.asarray([1, 0]), :, jnp.asarray([3, 1])], (2, 3, 4))
    yield Conf("gather", "", "y[-1], y[[-1, -3]]", lambda x: jnp.sin(x)[-1][None] * jnp.sin(x)[jnp.asarray([-1, -3])], (3, 4))
    for axis in (0, 1):
        yield Conf("gather", "", f"take_along_axis constant axis={axis}", lambda x, a=axis: jnp.take_along_axis(
            jnp.sin(x), jnp.asarray(np.argsort(_const("tal", (3, 4)), axis=a)), axis=a), (3, 4))
        yield Conf("gather", "", f"take_along_axis argsort (traced) axis={axis}", lambda x, a=axis: jnp.take_along_axis(
            jnp.sin(x), jnp.argsort(x, axis=a), axis=a), (3, 4))
    yield Conf("gather", "", "traced index mode=fill fill_value=1.5", lambda x: jnp.take(
        jnp.sin(x), jnp.argmax(x) + 2, mode="fill", fill_value=1.5) * x, (5,))
    yield Conf("gather", "", "vmap(row[i]) constant indices", lambda x: jax.vmap(lambda r, i: r[i])(
        jnp.sin(x), jnp.asarray([[0, 3], [1, 1], [2, 0]])), (3, 4))
    yield Conf("gather", "", "vmap(row[i]) traced indices", lambda x: jax.vmap(lambda r, i: r[i])(
        jnp.sin(x), jnp.argsort(x, axis=1)[:, :2]), (3, 4))


_SDN = lax.ScatterDimensionNumbers


@_family("scatter")
def _scatter():
    methods = {"scatter": "set", "scatter-add": "add", "scatter-mul": "multiply", "scatter-min": "min",
               "scatter-max": "max"}
    # JAX differentiates scatter-mul only with unique_indices=True (so no duplicates there), and its
    # forward rule of scatter-min/max gives NaN for a clipped out-of-bounds index (no reference).
    for (prim, method), (label, idx, mode) in itertools.product(methods.items(), [
        ("unique [0, 2]", [0, 2], None), ("duplicates [1, 1, 3]", [1, 1, 3], None),
        ("out of bounds [0, 7] drop", [0, 7], "drop"), ("out of bounds [0, 7] clip", [0, 7], "clip"),
        ("negative [-1, 2]", [-1, 2], None), ("sorted unique promise_in_bounds [0, 3]", [0, 3], "promise_in_bounds"),
    ]):
        if (prim == "scatter-mul" and "duplicates" in label) or (prim in ("scatter-min", "scatter-max")
                                                                 and mode == "clip"):
            continue

        def upd(x, idx=idx, method=method, mode=mode, prim=prim):
            y, u = jnp.sin(x[:5]), jnp.cos(x[5 : 5 + len(idx)]) + 1.5
            kw = dict(indices_are_sorted=True, unique_indices=True) if mode == "promise_in_bounds" else {}
            kw = dict(unique_indices=True) if prim == "scatter-mul" else kw
            return getattr(y.at[jnp.asarray(idx)], method)(u, mode=mode, **kw)

        yield Conf(prim, "", f"1-D {label}", upd, (5 + len(idx),))
    for prim, method in methods.items():
        mul = prim == "scatter-mul"
        kw = dict(unique_indices=True) if mul else {}
        rows, cols = ([2, 0], [1, 3]) if mul else ([2, 0, 2], [1, 1])
        yield Conf(prim, "", f"rows y.at[{rows}, :]", lambda x, m=method, r=rows, kw=kw: getattr(
            jnp.sin(x[:3]).at[jnp.asarray(r)], m)(jnp.cos(x[3:]) + 1.5, **kw), (3 + len(rows), 4))
        yield Conf(prim, "", "columns y.at[:, idx]", lambda x, m=method, kw=kw: getattr(
            jnp.sin(x[:, :4]).at[:, jnp.asarray([3, 1])], m)(jnp.cos(x[:, 4:]) + 1.5, **kw), (3, 6))
        pts = ([0, 2], [1, 3]) if mul else ([0, 2, 0], [1, 3, 1])
        yield Conf(prim, "", f"points y.at[{pts}] constant updates", lambda x, m=method, p=pts, kw=kw: getattr(
            jnp.sin(x).at[jnp.asarray(p[0]), jnp.asarray(p[1])], m)(_c([0.5, 1.5, 2.5][: len(p[0])], x), **kw),
                   (3, 4))
        yield Conf(prim, "", "traced index from argmax", lambda x, m=method, kw=kw: getattr(
            jnp.sin(x[:4]).at[jnp.argmax(x[4:])], m)(jnp.cos(x[4]) + 1.5, **kw), (6,))
        yield Conf(prim, "", f"vmap per-row scatter at {cols}", lambda x, m=method, c=cols, kw=kw: jax.vmap(
            lambda r, u: getattr(r.at[jnp.asarray(c)], m)(u, **kw))(jnp.sin(x[:, :4]), jnp.cos(x[:, 4:6]) + 1.5),
                   (3, 6))
    # lax.scatter_* with JAX's lax-test dimension numbers, modes clip/fill/None.
    table = [  # (label, operand, indices, updates, dimension numbers); labels of duplicate indices say "dups"
        ("(5,) inserted", (5,), _I([[0], [2]]), (2,), _SDN((), (0,), (0,))),
        ("(10,) window dups", (10,), _I([[0], [0], [0]]), (3, 2), _SDN((1,), (), (0,))),
        ("(10,5) window+inserted", (10, 5), _I([[0], [2], [1]]), (3, 3), _SDN((1,), (0,), (0,))),
        ("(2,5) batching dims dups", (2, 5), _I([[[0], [2]], [[1], [1]]]), (2, 2),
         _SDN((), (1,), (1,), operand_batching_dims=(0,), scatter_indices_batching_dims=(0,))),
        ("(2,3,10) batching dims swapped", (2, 3, 10), _I([[[0], [1]], [[2], [3]], [[4], [5]]]), (3, 2, 3),
         _SDN((2,), (), (2,), operand_batching_dims=(0, 1), scatter_indices_batching_dims=(1, 0))),
        ("(4,5) scatter_dims_to_operand_dims permuted", (4, 5), _I([[1, 0], [4, 3]]), (2,), _SDN((), (0, 1), (1, 0))),
    ]
    ops = {"scatter-add": lax.scatter_add, "scatter-sub": lax.scatter_sub, "scatter-mul": lax.scatter_mul,
           "scatter": lax.scatter, "scatter-max": lax.scatter_max}
    for (label, shape, idx, ushape, dnums), (prim, op), mode in itertools.product(table, ops.items(),
                                                                                  (None, "clip", "fill")):
        if prim == "scatter-mul" and "dups" in label:
            continue

        def sc(x, shape=shape, idx=idx, ushape=ushape, dnums=dnums, op=op, mode=mode):
            y, u = _split2(x, shape, ushape)
            kw = dict(unique_indices=True) if op is lax.scatter_mul else {}
            return op(jnp.sin(y), jnp.asarray(idx), jnp.cos(u) + 1.5, dnums, mode=mode, **kw)

        yield Conf(prim, "", f"lax {label} mode={mode}", sc, (math.prod(shape) + math.prod(ushape),))


@_family("sort")
def _sort():
    for axis in (0, 1):
        yield Conf("sort", "", f"jnp.sort axis={axis}", lambda x, a=axis: jnp.sort(jnp.sin(x), axis=a) * x, (3, 4))
        yield Conf("sort", "", f"descending axis={axis}", lambda x, a=axis: jnp.sort(jnp.sin(x), axis=a,
                                                                                       descending=True), (3, 4))
        yield Conf("sort", "", f"argsort gather axis={axis}", lambda x, a=axis: jnp.take_along_axis(
            jnp.cos(x), jnp.argsort(jnp.sin(x), axis=a), axis=a), (3, 4))
    yield Conf("sort", "", "keys and values num_keys=1", lambda x: lax.sort(
        (jnp.sin(x), x**2), dimension=1, num_keys=1)[1], (3, 4))
    yield Conf("sort", "", "two keys with ties num_keys=2", lambda x: sum(lax.sort(
        (jnp.round(jnp.sin(x)), jnp.cos(x), x**3), dimension=1, num_keys=2)), (3, 4))
    yield Conf("sort", "", "unstable", lambda x: lax.sort(jnp.sin(x), dimension=0, is_stable=False), (3, 4))
    for k, axis in ((1, -1), (2, -1), (4, -1), (2, 0)):
        yield Conf("top_k", "", f"k={k} axis={axis}", lambda x, k=k, a=axis: lax.top_k(jnp.sin(x), k, axis=a)[0] * 2.0,
                   (3, 4))
    yield Conf("top_k", "", "indices used to gather", lambda x: jnp.take_along_axis(
        jnp.cos(x), lax.top_k(jnp.sin(x), 2)[1], axis=1), (3, 4))
    for k, axis, largest in ((2, -1, True), (1, 0, False)):
        yield Conf("approx_top_k", "", f"approx_{'max' if largest else 'min'}_k k={k} reduction_dimension={axis}",
                   lambda x, k=k, a=axis, big=largest: (lax.approx_max_k if big else lax.approx_min_k)(
                       jnp.sin(x), k, reduction_dimension=a)[0] * 2.0, (3, 4))
    yield Conf("sort", "", "median", lambda x: jnp.median(jnp.sin(x), axis=1), (3, 5))
    yield Conf("sort", "", "jnp.partition kth=2", lambda x: jnp.partition(jnp.sin(x), 2, axis=1), (3, 4))


# --- linear algebra ------------------------------------------------------------------------------

_DOT_CONTRACT = [((5,), (5,), [0], [0]), ((5, 7), (5,), [0], [0]), ((7, 5), (5,), [1], [0]),
                 ((3, 5), (2, 5), [1], [1]), ((5, 3), (5, 2), [0], [0]), ((5, 3, 2), (5, 2, 4), [0], [0]),
                 ((5, 3, 2), (5, 2, 4), [0, 2], [0, 1]), ((5, 3, 2), (3, 5, 2, 4), [0, 2], [1, 2]),
                 ((1, 2, 2, 3), (1, 2, 3, 1), [1], [1]), ((3, 2), (2, 4), [1], [0])]
_DOT_BATCH = [((3, 3, 2), (3, 2, 4), (([2], [1]), ([0], [0]))), ((3, 3, 2), (2, 3, 4), (([2], [0]), ([0], [1]))),
              ((3, 4, 2, 4), (3, 4, 3, 2), (([2], [3]), ([0, 1], [0, 1]))),
              ((3, 2, 4), (4, 3, 2), (([0, 1], [1, 2]), ([2], [0])))]


@_family("dot")
def _dot():
    specs = [(a, b, ((lc, rc), ((), ()))) for a, b, lc, rc in _DOT_CONTRACT] + list(_DOT_BATCH)
    for a, b, dn in specs:
        n = math.prod(a) + math.prod(b)
        yield Conf("dot_general", "", f"{a} x {b} dn={dn} both traced", lambda x, a=a, b=b, dn=dn: lax.dot_general(
            *map(jnp.sin, _split2(x, a, b)), dn), (n,))
        yield Conf("dot_general", "", f"{a} x {b} dn={dn} rhs constant", lambda x, b=b, dn=dn: lax.dot_general(
            jnp.sin(x), _c(_const(f"dot{b}", b), x), dn), a)
        yield Conf("dot_general", "", f"{a} x {b} dn={dn} lhs constant", lambda x, a=a, dn=dn: lax.dot_general(
            _c(_const(f"dot{a}", a), x), jnp.sin(x), dn), b)
    yield Conf("dot_general", "", "preferred_element_type=f64 on f32 operands", lambda x: lax.dot_general(
        jnp.sin(x).astype(jnp.float32), jnp.asarray(_const("pet", (4, 2)), jnp.float32), (((1,), (0,)), ((), ())),
        preferred_element_type=jnp.float64), (3, 4), tol=1e-5)
    yield Conf("dot_general", "", "precision=HIGHEST", lambda x: jnp.matmul(
        jnp.sin(x), _c(_const("hp", (4, 2)), x), precision=lax.Precision.HIGHEST), (3, 4))
    for spec in ("ij,jk->ik", "ij,ij->i", "i,j->ij", "ii->", "ij->ji"):
        def ein(x, spec=spec):
            y = jnp.sin(x)
            ops = {"ij,jk->ik": (y, y.T), "ij,ij->i": (y, y[::-1]), "i,j->ij": (y[0], y[1]), "ii->": (y[:, :3],),
                   "ij->ji": (y,)}[spec]
            return jnp.atleast_1d(jnp.einsum(spec, *ops))

        yield Conf("dot_general", "", f"einsum {spec}", ein, (3, 4))
    yield Conf("dot_general", "", "einsum bij,bjk->bik per-example", lambda x: jnp.einsum(
        "bij,bjk->bik", jnp.sin(x), x[:, :, ::-1]), (3, 2, 2))


def _conv_case(lhs, rhs, strides, padding, lhs_dil, rhs_dil, dn, fgc, bgc, which):
    def f(x):
        if which == "lhs":
            a, w = jnp.sin(x), _c(_const(f"w{rhs}", rhs, 0.5), x)
        elif which == "rhs":
            a, w = _c(_const(f"l{lhs}", lhs), x), jnp.sin(x)
        else:
            a, w = map(jnp.sin, _split2(x, lhs, rhs))
        return lax.conv_general_dilated(a, w, strides, padding, lhs_dil, rhs_dil, dn, fgc, bgc)

    shape = {"lhs": lhs, "rhs": rhs, "both": (math.prod(lhs) + math.prod(rhs),)}[which]
    return f, shape


@_family("conv")
def _conv():
    base = dict(strides=(1, 1), padding="VALID", lhs_dil=(1, 1), rhs_dil=(1, 1), dn=("NCHW", "OIHW", "NCHW"), fgc=1,
                bgc=1)
    variants = [
        {}, dict(strides=(2, 1)), dict(padding="SAME"), dict(padding=((1, 2), (2, 0))),
        dict(lhs_dil=(1, 2), padding=((0, 1), (1, 1))), dict(rhs_dil=(2, 1)), dict(fgc=2), dict(bgc=2),
        dict(dn=("NHWC", "HWIO", "NHWC")), dict(dn=("NCHW", "HWIO", "NHWC")),
        dict(strides=(2, 1), padding=((1, 0), (2, 1)), lhs_dil=(1, 2), rhs_dil=(2, 1)),
        dict(fgc=2, padding="SAME", strides=(1, 2)),
    ]
    for v in variants:
        p = {**base, **v}
        g, b = p["fgc"], p["bgc"]
        lhs_nchw, rhs_oihw = (2 * b, 2 * g, 4, 5), (2 * g * b, 2, 2, 3)
        perm_l = {"NCHW": (0, 1, 2, 3), "NHWC": (0, 2, 3, 1)}[p["dn"][0]]
        perm_r = {"OIHW": (0, 1, 2, 3), "HWIO": (2, 3, 1, 0)}[p["dn"][1]]
        lhs, rhs = tuple(lhs_nchw[i] for i in perm_l), tuple(rhs_oihw[i] for i in perm_r)
        label = ", ".join(f"{k}={v}" for k, v in v.items()) or "defaults"
        for which in ("lhs", "rhs", "both"):
            f, shape = _conv_case(lhs, rhs, p["strides"], p["padding"], p["lhs_dil"], p["rhs_dil"], p["dn"], g, b, which)
            yield Conf("conv_general_dilated", "", f"{label}; {which} traced", f, shape)
    f, shape = _conv_case((2, 3, 6), (4, 3, 3), (2,), ((1, 1),), (1,), (2,), ("NCH", "OIH", "NCH"), 1, 1, "lhs")
    yield Conf("conv_general_dilated", "", "1-D strided dilated", f, shape)
    yield Conf("conv_general_dilated", "", "conv_transpose 2-D", lambda x: lax.conv_transpose(
        jnp.sin(x), _c(_const("ct", (3, 3, 2, 2), 0.5), x), (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")),
               (1, 3, 3, 2))


def _eye(y, k=1.0):
    """``k`` times the identity, broadcast to ``y``'s (batch of) square matrices."""
    return jnp.broadcast_to(k * jnp.eye(y.shape[-1], dtype=y.dtype), y.shape)


def _spd(y):
    """A symmetric positive definite matrix (or batch of them) from ``y (..., k, k)``."""
    return y @ jnp.swapaxes(y, -1, -2) + _eye(y, 3.0)


@_family("linalg")
def _linalg():
    yield Conf("cholesky", "", "(3,3)", lambda x: jnp.linalg.cholesky(_spd(x)), (3, 3), tol=1e-8)
    yield Conf("cholesky", "", "batched (2,3,3)", lambda x: jnp.linalg.cholesky(_spd(x)), (2, 3, 3), tol=1e-8)
    for left, lower, trans, unit in itertools.product((True, False), (True, False), (False, True), (False, True)):
        if (left, lower, trans, unit).count(True) % 2:  # a balanced half of the 16 combinations
            continue

        def ts(x, left=left, lower=lower, trans=trans, unit=unit):
            a = jnp.tril(x[:, :3]) if lower else jnp.triu(x[:, :3])
            a = a + 4 * jnp.eye(3, dtype=x.dtype)
            b = jnp.sin(x[:, 3:]) if left else jnp.sin(x[:, 3:]).T
            return lax.linalg.triangular_solve(a, b, left_side=left, lower=lower, transpose_a=trans,
                                               unit_diagonal=unit)

        yield Conf("triangular_solve", "", f"left={left} lower={lower} transpose_a={trans} unit={unit}", ts, (3, 5),
                   tol=1e-8)
    yield Conf("triangular_solve", "", "constant matrix, traced b", lambda x: jax.scipy.linalg.solve_triangular(
        _c(np.triu(_const("tri", (3, 3))) + 4 * np.eye(3), x), jnp.sin(x)), (3, 2))
    yield Conf("lu", "", "lax.linalg.lu factor", lambda x: lax.linalg.lu(x + 4 * jnp.eye(3, dtype=x.dtype))[0],
               (3, 3), tol=1e-8)
    yield Conf("lu", "", "jnp.linalg.solve", lambda x: jnp.linalg.solve(x[:, :3] + 4 * jnp.eye(3, dtype=x.dtype),
                                                                        jnp.sin(x[:, 3:])), (3, 5), tol=1e-8)
    yield Conf("custom_linear_solve", "", "jnp.linalg.solve, vector b",
               lambda x: jnp.linalg.solve(x[:, :3] + 4 * jnp.eye(3, dtype=x.dtype), jnp.sin(x[:, 3])), (3, 4), tol=1e-8)
    yield Conf("custom_linear_solve", "", "batched (2,3,3), constant matrices",
               lambda x: jnp.linalg.solve(_c(_const("solve", (2, 3, 3)) + 4 * np.eye(3), x), x[..., None] ** 2)[..., 0],
               (2, 3), tol=1e-8)
    yield Conf("custom_linear_solve", "", "lax.custom_linear_solve, symmetric, a while_loop solve (cg)",
               lambda x: jax.scipy.sparse.linalg.cg(lambda v: v * (3 + x**2) + 0.1 * (jnp.roll(v, 1) + jnp.roll(v, -1)),
                                                    jnp.sin(x), tol=1e-14, maxiter=50)[0], (5,), tol=1e-6, rev=False)
    yield Conf("lu", "", "inv", lambda x: jnp.linalg.inv(x + 4 * jnp.eye(3, dtype=x.dtype)), (3, 3), tol=1e-8)
    yield Conf("lu", "", "slogdet batched", lambda x: jnp.linalg.slogdet(x + _eye(x, 4.0))[1],
               (2, 3, 3), tol=1e-8)
    yield Conf("lu", "", "det", lambda x: jnp.linalg.det(x)[None], (3, 3), tol=1e-8)
    for shape in ((3, 3), (4, 3)):
        yield Conf("qr", "", f"{shape} R", lambda x: jnp.linalg.qr(x)[1], shape, tol=1e-8)
        yield Conf("qr", "", f"{shape} Q", lambda x: jnp.linalg.qr(x)[0], shape, tol=1e-8)
    yield Conf("eigh", "", "eigenvalues", lambda x: jnp.linalg.eigvalsh(_spd(x)), (3, 3), tol=1e-8)
    yield Conf("eigh", "", "eigenvectors * eigenvalues", lambda x: (lambda w, v: v * w[None])(*jnp.linalg.eigh(_spd(x))),
               (3, 3), tol=1e-7)
    yield Conf("svd", "", "singular values (3,4)", lambda x: jnp.linalg.svd(x, compute_uv=False), (3, 4), tol=1e-8)
    yield Conf("svd", "", "pinv (4,3)", lambda x: jnp.linalg.pinv(x), (4, 3), tol=1e-7)
    yield Conf("eig", "", "eigvals re|im sorted", lambda x: jnp.sort(jnp.real(jnp.linalg.eigvals(_spd(x)))), (3, 3),
               tol=1e-7)
    yield Conf("tridiagonal_solve", "", "traced diagonals and b", lambda x: lax.linalg.tridiagonal_solve(
        jnp.concatenate([jnp.zeros(1, x.dtype), 0.3 * x[0, 1:]]), 3 + jnp.sin(x[1]),
        jnp.concatenate([0.3 * x[2, :-1], jnp.zeros(1, x.dtype)]), x[3:].T), (5, 4), tol=1e-8)
    yield Conf("expm", "", "jax.scipy.linalg.expm", lambda x: jax.scipy.linalg.expm(0.3 * x), (3, 3), tol=1e-8)


# --- control flow, custom rules, calls --------------------------------------------------------------


def _newton_sqrt(v):
    """sqrt by a data-dependent while loop (forward-mode only in JAX)."""

    def body(c):
        g, k = c
        return 0.5 * (g + v / g), k + 1

    return lax.while_loop(lambda c: (jnp.max(jnp.abs(c[0] ** 2 - v)) > 1e-12) & (c[1] < 50), body,
                          (jnp.ones_like(v), 0))[0]


@_family("control")
def _control():
    yield Conf("cond", "", "traced predicate, different structures", lambda x: lax.cond(
        jnp.sum(x) > 0, lambda v: jnp.roll(v, 1, axis=1) * 2.0, lambda v: v * v[:, :1], jnp.sin(x)), (3, 4))
    yield Conf("cond", "", "constant predicate", lambda x: lax.cond(True, lambda v: v[::-1], lambda v: v.sum() * v,
                                                                     jnp.sin(x)), (3, 4))
    yield Conf("cond", "", "switch 3 branches traced index", lambda x: lax.switch(
        jnp.argmax(x[0]) % 3, [lambda v: v**2, lambda v: v[::-1], lambda v: jnp.cumsum(v, axis=0)], jnp.sin(x)),
               (3, 4))
    yield Conf("cond", "", "cond closing over a constant", lambda x: lax.cond(
        x[0, 0] > 0, lambda v: v @ _c(_const("cc", (4, 4)), x), lambda v: v, jnp.sin(x)), (3, 4))
    for reverse, unroll in itertools.product((False, True), (1, 2, True)):
        def sc(x, reverse=reverse, unroll=unroll):
            def step(c, xi):
                c = jnp.tanh(c * xi + jnp.roll(c, 1))
                return c, c * 2.0

            return lax.scan(step, x[0], x[1:], reverse=reverse, unroll=unroll)[1]

        yield Conf("scan", "", f"carry and ys reverse={reverse} unroll={unroll}", sc, (4, 3))
    yield Conf("scan", "", "no xs, length=3, closed-over constant", lambda x: lax.scan(
        lambda c, _: (jnp.sin(_c(_const("sk", (4, 4)), x) @ c), None), x, None, length=3)[0], (4,))
    yield Conf("scan", "", "per-example ys only (lax.map)", lambda x: lax.map(lambda r: jnp.cumsum(jnp.sin(r)), x),
               (3, 4))
    yield Conf("scan", "", "associative_scan add", lambda x: lax.associative_scan(jnp.add, jnp.sin(x), axis=1), (3, 4))
    yield Conf("scan", "", "associative_scan mul reverse", lambda x: lax.associative_scan(
        jnp.multiply, jnp.sin(x), reverse=True, axis=0), (3, 4))
    yield Conf("while", "", "fori_loop static bounds (scan)", lambda x: lax.fori_loop(
        0, 3, lambda i, c: c.at[i].set(jnp.sin(c[i + 1]) * c[0]), x), (5,))
    yield Conf("while", "", "fori_loop traced bound", lambda x: lax.fori_loop(
        0, jnp.argmax(x) % 3 + 1, lambda i, c: jnp.roll(c, 1) * c, jnp.sin(x)), (5,), rev=False)
    yield Conf("while", "", "Newton sqrt data-dependent trip count", lambda x: _newton_sqrt(_pos(x)), (3, 4),
               rev=False, tol=1e-8)
    yield Conf("while", "", "fixed trip count, shift", lambda x: lax.while_loop(
        lambda c: c[1] < 2, lambda c: (jnp.concatenate([c[0][:1], c[0][:-1] * c[0][1:]]), c[1] + 1),
        (jnp.sin(x), 0))[0], (5,), rev=False)


@jax.custom_jvp
def _softplus(x):
    return jnp.log1p(jnp.exp(x))


_softplus.defjvp(lambda p, t: (_softplus(p[0]), jax.nn.sigmoid(p[0]) * t[0]))


@jax.custom_jvp
def _ste_round(x):
    """Straight-through estimator: primal ``round``, JVP the identity."""
    return jnp.round(x)


_ste_round.defjvp(lambda p, t: (_ste_round(p[0]), t[0]))


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _scaled(x, k):
    return jnp.sin(x) * k


_scaled.defjvp(lambda k, p, t: (_scaled(p[0], k), jnp.cos(p[0]) * k * t[0]))


@jax.custom_vjp
def _clip_grad(x):
    return x**2


_clip_grad.defvjp(lambda x: (x**2, x), lambda x, g: (jnp.clip(2 * x * g, -1.0, 1.0),))


@jax.custom_vjp
def _ste_vjp(x):
    return jnp.floor(x)


_ste_vjp.defvjp(lambda x: (jnp.floor(x), None), lambda _, g: (g,))


@jax.custom_jvp
def _host_sin(x):
    """``sin`` computed on the host by ``pure_callback``, its JVP by a second callback."""
    return jax.pure_callback(np.sin, jax.ShapeDtypeStruct(x.shape, x.dtype), x, vmap_method="expand_dims")


_host_sin.defjvp(lambda p, t: (_host_sin(p[0]), jax.pure_callback(
    np.cos, jax.ShapeDtypeStruct(p[0].shape, p[0].dtype), p[0], vmap_method="expand_dims") * t[0]))


@_family("custom")
def _custom():
    yield Conf("custom_jvp_call", "", "softplus rule", lambda x: _softplus(jnp.sin(x)) * x[::-1], (3, 4))
    yield Conf("custom_jvp_call", "", "straight-through round", lambda x: _ste_round(3 * jnp.sin(x)) * x, (3, 4))
    yield Conf("custom_jvp_call", "", "nondiff_argnums", lambda x: _scaled(x, 2.0)[:, ::-1], (3, 4))
    yield Conf("custom_jvp_call", "", "jax.nn.relu, gelu, silu, softmax", lambda x: jax.nn.relu(x) + jax.nn.gelu(x)
               + jax.nn.silu(x) + jax.nn.softmax(x, axis=1), (3, 4))
    yield Conf("custom_vjp_call", "", "clip-grad rule (reverse only)", lambda x: _clip_grad(jnp.sin(x))[::-1] + x,
               (3, 4), fwd=False)
    yield Conf("custom_vjp_call", "", "straight-through floor (reverse only)", lambda x: _ste_vjp(3 * x) * x, (3, 4),
               fwd=False)
    yield Conf("pure_callback", "", "inside custom_jvp", lambda x: _host_sin(x) * x[::-1], (3, 4))


@_family("call")
def _call():
    const = _const("jitc", (4, 4))
    yield Conf("jit", "", "nested jit", lambda x: jax.jit(lambda v: jnp.sin(v) * v[::-1])(x), (3, 4))
    yield Conf("jit", "", "jit closing over an array", lambda x: jax.jit(lambda v: v @ jnp.asarray(const))(jnp.sin(x)),
               (3, 4))
    yield Conf("jit", "", "jit of jit with a static argument", lambda x: jax.jit(
        lambda v, k: jax.jit(lambda w: w * k)(jnp.sin(v)), static_argnums=1)(x, 3), (3, 4))
    for policy in ("none", "nothing_saveable", "dots_saveable"):
        pol = None if policy == "none" else getattr(jax.checkpoint_policies, policy)
        yield Conf("checkpoint", "", f"jax.checkpoint policy={policy}", lambda x, pol=pol: jax.checkpoint(
            lambda v: jnp.sin(v @ jnp.asarray(const)) * v, policy=pol)(x), (3, 4))
    yield Conf("name", "", "checkpoint_name, alone and saved by a remat policy", lambda x: jax.checkpoint(
        lambda v: checkpoint_name(jnp.sin(v), "h") * v[::-1],
        policy=jax.checkpoint_policies.save_only_these_names("h"))(x) + checkpoint_name(x, "g"),
        (3, 4))
    yield Conf("debug_callback", "", "jax.debug.callback (an effect)", lambda x: (
        jax.debug.callback(lambda *_: None, x), jnp.sin(x) * x[::-1])[1], (3, 4))
    yield Conf("sharding_constraint", "", "with_sharding_constraint on a 1-device mesh", lambda x: jnp.sin(
        jax.lax.with_sharding_constraint(x * 2.0, jax.sharding.NamedSharding(
            jax.sharding.Mesh(np.array(jax.devices()[:1]), ("d",)), jax.sharding.PartitionSpec())))[::-1], (3, 4))
    yield Conf("device_put", "", "device_put of two values inside jit", lambda x: jnp.concatenate(jax.device_put(
        (jnp.sin(x), x[::-1] * 2.0), jax.devices()[0])), (3, 4))
    yield Conf("random_bits", "", "dropout with a constant key", lambda x: jnp.where(
        jax.random.bernoulli(jax.random.key(3), 0.5, x.shape), jnp.sin(x), 0.0), (3, 4))


def vmapped(c: Conf, size: int = 2) -> Conf:
    """``c`` under ``jax.vmap`` over a new leading axis: batched primitives, independent examples."""
    return Conf(c.primitive, c.family, f"{c.params} | vmap", jax.vmap(c.core), (size,) + c.shape, c.post, c.fwd, c.rev,
                c.tol, c.tags | {"vmap"})


# --- host evaluation: integer and movement primitives on the host vs XLA --------------------------

_EDGE = {  # edge values per dtype: wrap-around on overflow, signs, zero
    np.int8: [127, -128, -1, 0, 5], np.uint8: [255, 0, 1, 128, 7], np.int16: [32767, -32768, -3, 0, 9],
    np.int32: [2**31 - 1, -(2**31), -7, 0, 3], np.int64: [2**63 - 1, -(2**63), -2, 0, 11],
    np.uint32: [2**32 - 1, 0, 2**31, 1, 6],
}


def _int_ops(a, b):
    return [a + b, a - b, a * b, -a, jnp.maximum(a, b), jnp.minimum(a, b), a < b, a <= b, a > b, a >= b, a == b,
            a != b, a & b, a | b, a ^ b, ~a, lax.select(a > b, a, b), a + 1, a * a]


def _host_cases():
    """``(name, fun, args)``: functions of integer/boolean arrays, each equation checked against XLA."""
    out = []
    for dt, vals in _EDGE.items():
        a = np.array(vals, dt)
        b = np.array(vals[::-1], dt)
        out.append((f"int ops and conversions {np.dtype(dt).name}", lambda a, b: _int_ops(a, b) + [a.astype(t) for t in (
            jnp.int8, jnp.uint8, jnp.int32, jnp.uint32, jnp.int64, jnp.bool_)], (a, b)))
    bools = np.array([True, False, True, True, False])
    out.append(("bool ops", lambda p, q: [p & q, p | q, p ^ q, ~p, p == q, lax.select(p, q, p), p.astype(jnp.int32)],
                (bools, bools[::-1].copy())))
    m = np.arange(24, dtype=np.int32).reshape(2, 3, 4) - 5
    out.append(("movement int32", lambda m: [
        lax.reshape(m, (24,), dimensions=(2, 0, 1)), lax.reshape(m, (4, 6), dimensions=(2, 1, 0)),
        jnp.reshape(m, (6, 4), order="F"), jnp.transpose(m, (1, 2, 0)),
        lax.broadcast_in_dim(m[0], (2, 3, 5, 4), (1, 3)), lax.squeeze(m[:, :1], (1,)), lax.expand_dims(m, (0, 3)),
        lax.slice(m, (0, 1, 0), (2, 3, 4), (1, 1, 3)), lax.rev(m, (0, 2)), lax.concatenate([m, m * 2], 1),
        lax.pad(m, np.int32(-9), ((1, -1, 1), (0, 0, 2), (-2, 1, 0))),
        lax.dynamic_slice(m, (np.int32(1), np.int32(-3), np.int32(7)), (1, 2, 3)),
        lax.dynamic_update_slice(m, m[:1, :1, :2] * 0 + 99, (np.int32(5), np.int32(-1), np.int32(3))),
        *jnp.split(m, [1, 3], axis=2), jnp.tile(m, (1, 2, 1)), jnp.stack([m, m], axis=1), *jnp.unstack(m, axis=1),
        lax.broadcasted_iota(jnp.int32, (3, 4), 1), lax.broadcasted_iota(jnp.float32, (2, 5), 0),
        jnp.array(m, copy=True)], (m,)))
    out.append(("movement bool and uint8", lambda m: [
        lax.reshape(m > 0, (24,), dimensions=(1, 2, 0)), lax.pad(m.astype(jnp.uint8), np.uint8(200), ((0, 1, 1),) * 3),
        lax.rev(m > 3, (1,)), jnp.transpose(m.astype(jnp.uint8), (2, 0, 1))], (m,)))
    f = np.linspace(-2.0, 3.0, 24).reshape(2, 3, 4)
    out.append(("movement float64", lambda m: [
        lax.reshape(m, (24,), dimensions=(2, 0, 1)), jnp.ravel(m, order="F"), lax.pad(m, 1.5, ((1, 2, 1), (-1, 0, 0),
                                                                                              (0, -2, 2))),
        lax.slice(m, (1, 0, 1), (2, 3, 4), (1, 2, 2)), lax.dynamic_slice(m, (np.int32(-4), np.int32(2), np.int32(1)),
                                                                         (2, 2, 2))], (f,)))
    return out


HOST_CASES = {name: (fun, args) for name, fun, args in _host_cases()}


# --- running the analyses ------------------------------------------------------------------------

ANALYSES = ("sparsity", "hessian_sparsity", "sparse_hessian", "batch", "structured_fwd", "structured_rev",
            "compressed", "sparse_jacobian", "default", "host_eval")


@dataclass
class Outcome:
    """The result of one case through one analysis."""

    status: str  # pass | fail | crash | conservative | n/a
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status in ("pass", "conservative", "n/a")


def _seed(name: str) -> int:
    return zlib.crc32(name.encode())


class NoReference(Exception):
    """JAX itself cannot compute the reference derivative (the analysis does not apply)."""


class Context:
    """One case's random points and JAX's reference derivatives (each compiled once)."""

    def __init__(self, case: Conf):
        self.case = case
        rng = np.random.default_rng(_seed(case.name))
        self.x1, self.x2 = (jnp.asarray(rng.standard_normal(case.shape)) for _ in range(2))
        self.c = jnp.asarray(rng.standard_normal(jax.eval_shape(case.core, self.x1).shape))
        self._hess: dict = {}

    @property
    def jac(self):
        """JAX's Jacobian at ``x1`` and ``x2`` (forward mode, reverse where forward is impossible)."""
        self._compute()
        return self._jac

    def scalar(self, kind: str) -> Callable:
        """A scalar version of the case: ``sum(c * core)`` (linear) or ``sum(sin(core))``."""
        core, c = self.case.core, self.c

        def lin(x):
            y = core(x)
            return jnp.sum(c * jnp.real(y)) + (jnp.sum(c * jnp.imag(y)) if jnp.iscomplexobj(y) else 0.0)

        def sin(x):
            y = core(x)
            return jnp.sum(jnp.sin(jnp.real(y))) + (jnp.sum(jnp.cos(jnp.imag(y))) if jnp.iscomplexobj(y) else 0.0)

        return {"lin": lin, "sin": sin}[kind]

    def hess(self, kind: str):
        """JAX's Hessian of ``scalar(kind)`` at ``x1`` and ``x2``; :class:`NoReference` where JAX has none."""
        self._compute()
        if isinstance(self._hess[kind], NoReference):
            raise self._hess[kind]
        if not all(np.isfinite(h).all() for h in self._hess[kind]):
            # A window wholly in the padding gives -inf, and sin(-inf) is NaN: NaN * 0 fills JAX's Hessian.
            raise NoReference(f"JAX's Hessian of {kind}(out) is not finite (an output entry is infinite)")
        return self._hess[kind]

    def _hessian_fn(self, kind: str):
        h = self.scalar(kind)
        if self.case.fwd and self.case.rev:
            return jax.hessian(h)
        if self.case.fwd:
            return jax.jacfwd(jax.jacfwd(h))
        return jax.jacrev(jax.jacrev(h))

    def _compute(self):
        # One compiled program for the Jacobian and both Hessians (compiles dominate the run); each
        # on its own where JAX has no second derivative.
        if self._hess:
            return
        f = self.case.fun
        jac = jax.jacfwd(f) if self.case.fwd else jax.jacrev(f)
        kinds = ("lin", "sin")
        try:
            ref = jax.jit(lambda x: (jac(x), *(self._hessian_fn(k)(x) for k in kinds)))
            outs = [ref(self.x1), ref(self.x2)]
        except Exception:  # noqa: BLE001 - separately, to tell which reference JAX cannot give
            ref = jax.jit(jac)
            outs = [(ref(self.x1),), (ref(self.x2),)]
            for k in kinds:
                try:
                    h = jax.jit(self._hessian_fn(k))
                    self._hess[k] = (np.asarray(h(self.x1)), np.asarray(h(self.x2)))
                except Exception as e:  # noqa: BLE001
                    self._hess[k] = NoReference(f"jax.hessian fails: {type(e).__name__}: {str(e)[:120]}")
        self._jac = tuple(np.asarray(o[0]) for o in outs)
        if len(outs[0]) > 1:
            for i, k in enumerate(kinds, 1):
                self._hess[k] = (np.asarray(outs[0][i]), np.asarray(outs[1][i]))


_CONTEXTS: dict[str, Context] = {}


def context(case: Conf) -> Context:
    if case.name not in _CONTEXTS:
        _CONTEXTS[case.name] = Context(case)
    return _CONTEXTS[case.name]


def _err(got, want) -> float:
    got, want = np.asarray(got), np.asarray(want)
    if got.shape != want.shape:
        return math.inf
    if not want.size:
        return 0.0
    return float(np.max(np.abs(got - want)) / max(1.0, float(np.max(np.abs(want)))))


def _compare(got, want, tol, what="") -> Outcome:
    got, want = np.asarray(got), np.asarray(want)
    if got.shape != want.shape:
        return Outcome("fail", f"{what}shape {got.shape} != JAX's {want.shape}")
    if np.iscomplexobj(want) and not np.iscomplexobj(got) and np.any(np.imag(want) != 0):
        return Outcome("fail", f"{what}real result ({got.dtype}) where JAX's is complex (imaginary part dropped)")
    e = _err(got, want)
    if not e <= tol:  # NaN fails too
        k = np.unravel_index(int(np.nanargmax(np.abs(got - want))), want.shape) if got.size else ()
        return Outcome("fail", f"{what}wrong by {e:.3g} (relative); at {tuple(int(i) for i in k)}: "
                               f"got {got[k]!r}, JAX {want[k]!r}")
    return Outcome("pass", f"{what}error {e:.1e}")


def _contains(mask, nz, what) -> Outcome:
    mask, nz = np.asarray(mask, bool), np.asarray(nz, bool)
    if mask.shape != nz.shape:
        return Outcome("fail", f"{what}: pattern shape {mask.shape} != Jacobian shape {nz.shape}")
    missed = np.argwhere(nz & ~mask)
    if missed.size:
        return Outcome("fail", f"{what}: misses {len(missed)} of {int(nz.sum())} nonzeros, first at "
                               f"{[tuple(int(i) for i in m) for m in missed[:3]]}")
    return Outcome("pass", f"{what}: sound ({int(mask.sum())} entries for {int(nz.sum())} nonzeros)")


def _jacobian_dir_ok(case: Conf, mode: str) -> bool:
    return case.fwd if mode == "fwd" else case.rev


def _check_jacobian(case, ctx, make, needs: str | None = None) -> Outcome:
    want = ctx.jac[0]
    try:
        got = make()(ctx.x1)
    except Exception as e:  # noqa: BLE001 - a crash is a defect, recorded
        if needs is not None and not _jacobian_dir_ok(case, needs):
            return Outcome("n/a", f"JAX cannot differentiate it in mode {needs}: {type(e).__name__}")
        if needs is not None and np.iscomplexobj(want) and isinstance(e, TypeError) and "method='dense'" in str(e):
            return Outcome("n/a", f"documented refusal of complex outputs: {str(e)[:120]}")
        return Outcome("crash", f"{type(e).__name__}: {str(e)[:300]}")
    return _compare(got, want, case.tol)


def _sparsity(case, ctx):
    pat = jacobians.sparsity(case.fun, ctx.x1)
    nz = (ctx.jac[0] != 0) | (ctx.jac[1] != 0)
    return _contains(pat.to_dense(), nz, "jacobians.sparsity")


def _hessian_sparsity(case, ctx):
    if not case.fwd and not case.rev:
        return Outcome("n/a")
    for kind in ("lin", "sin"):
        h1, h2 = ctx.hess(kind)
        pat = jacobians.hessian_sparsity(ctx.scalar(kind), ctx.x1)
        out = _contains(pat.to_dense(), (h1 != 0) | (h2 != 0), f"hessian_sparsity of sum({kind}(out))")
        if not out.ok:
            return out
    return out


def _sparse_hessian(case, ctx):
    for kind in ("lin", "sin"):
        want = ctx.hess(kind)[0]
        got = jacobians.sparse_hessian(ctx.scalar(kind), output="dense")(ctx.x1)
        out = _compare(got, want, case.tol * 10, f"sparse_hessian of sum({kind}(out)): ")
        if not out.ok:
            return out
    return out


def _batch(case, ctx):
    out_shape = jax.eval_shape(case.fun, ctx.x1).shape
    if not case.shape or not out_shape or out_shape[0] != case.shape[0] or case.shape[0] < 2:
        return Outcome("n/a", "no common leading axis")
    B = case.shape[0]
    mi, mo = math.prod(case.shape[1:]), math.prod(out_shape[1:])
    blocks = [J.reshape(B, mo, B, mi) for J in ctx.jac]
    off = [J * (1 - np.eye(B))[:, None, :, None] for J in blocks]
    coupled = any(np.any(o != 0) for o in off)
    try:
        got = jacobians.batch_jacobian(case.fun)(ctx.x1)
    except jacobians.CoupledBatchError as e:
        return Outcome("pass" if coupled else "conservative", f"CoupledBatchError: {str(e)[:160]}")
    if coupled:
        i = np.argwhere(off[0] != 0)
        i = i[0] if i.size else np.argwhere(off[1] != 0)[0]
        return Outcome("fail", f"proved the examples independent, but output example {i[0]} depends on input "
                               f"example {i[2]} (JAX: {blocks[0][tuple(i)]!r})")
    want = np.stack([blocks[0][b, :, b, :] for b in range(B)]).reshape((B,) + out_shape[1:] + case.shape[1:])
    return _compare(got, want, case.tol, "batch_jacobian: ")


def _host_eval_case(case, ctx):
    return check_host_eval(case.fun, (ctx.x1,))


def _interpret(closed, args):
    """Every equation's inputs and outputs at ``args`` (one compiled program): ``[(eqn, ins, outs)]``."""
    jaxpr = closed.jaxpr
    inner = [v for e in jaxpr.eqns for v in e.outvars if not isinstance(v, _compat.DropVar)]
    allout = jcore.ClosedJaxpr(jaxpr.replace(outvars=list(jaxpr.invars) + inner), closed.consts)
    vals = jax.jit(jcore.jaxpr_as_fun(allout))(*args)
    env = dict(zip(list(jaxpr.invars) + inner, vals, strict=True))
    env.update(zip(jaxpr.constvars, closed.consts, strict=True))

    def read(v):
        return np.asarray(v.val) if isinstance(v, jcore.Literal) else np.asarray(env[v])

    out = []
    for e in jaxpr.eqns:
        if any(jax.dtypes.issubdtype(getattr(v.aval, "dtype", None), jax.dtypes.extended) for v in e.invars + e.outvars):
            continue  # PRNG keys
        ins = [read(v) for v in e.invars]
        outs = [None if isinstance(v, _compat.DropVar) else np.asarray(env[v]) for v in e.outvars]
        out.append((e, ins, outs))
        sub = e.params.get("jaxpr")
        if e.primitive.name in ("jit", "pjit", "closed_call") and isinstance(sub, jcore.ClosedJaxpr):
            out.extend(_interpret(sub, ins))
    return out


def check_host_eval(fun, args) -> Outcome:
    """``_host_eval.evaluate`` equals XLA on every equation of ``fun``'s jaxpr at ``args`` where it has a rule.

    Also on integer labels in place of floating-point operands for the movement primitives
    (as the analyses run them).
    """
    closed = jax.make_jaxpr(fun)(*args)
    checked, bad = 0, []
    for e, ins, outs in _interpret(closed, args):
        name = e.primitive.name
        dtypes = [v.aval.dtype for v in e.outvars]
        trials = [(ins, outs)]
        if name in _host_eval.IMPLS and any(np.asarray(a).dtype.kind in "fc" for a in ins):
            labels = [np.arange(a.size, dtype=np.int32).reshape(a.shape) + 1 if a.dtype.kind in "fc" else a
                      for a in ins]
            params = dict(e.params)
            try:
                with jax.ensure_compile_time_eval():
                    ref = e.primitive.bind(*(jnp.asarray(a) for a in labels), **params)
                ref = ref if e.primitive.multiple_results else [ref]
                trials.append((labels, [np.asarray(r) for r in ref]))
                dtypes_l = [np.dtype(np.int32) if d.kind in "fc" else d for d in dtypes]
            except Exception:  # noqa: BLE001 - a primitive that takes no integer operands
                dtypes_l = None
        for k, (a, want) in enumerate(trials):
            dt = dtypes if k == 0 else dtypes_l
            got = _host_eval.evaluate(name, e.params, list(a), dt)
            if got is None:
                continue
            checked += 1
            for g, w in zip(got, want, strict=True):
                if w is None:
                    continue
                if g.shape != w.shape or g.dtype != w.dtype or not np.array_equal(g, w, equal_nan=w.dtype.kind in "fc"):
                    bad.append(f"{name}{'' if k == 0 else ' (integer labels)'} "
                               f"{ {k: v for k, v in e.params.items() if 'jaxpr' not in k} }: "
                               f"host {g.dtype}{list(g.shape)} {g.ravel()[:6]} != XLA {w.dtype}{list(w.shape)} "
                               f"{w.ravel()[:6]}")
    if bad:
        return Outcome("fail", f"{len(bad)} equation(s) differ: " + "; ".join(bad[:3]))
    if not checked:
        return Outcome("n/a", "no equation with a host rule")
    return Outcome("pass", f"{checked} equation(s) equal")


def _sweeps(mode):
    def run(case, ctx):
        return _check_jacobian(case, ctx, lambda: jacobians.jacobian(case.fun, method="structured", mode=mode), mode)

    return run


def _compressed(case, ctx):
    return _check_jacobian(case, ctx, lambda: jacobians.jacobian(case.fun, method="compressed"))


def _sparse_jacobian(case, ctx):
    return _check_jacobian(case, ctx, lambda: jacobians.sparse_jacobian(case.fun, output="dense"))


def _default(case, ctx):
    return _check_jacobian(case, ctx, lambda: jacobians.jacobian(case.fun))


_RUNNERS = {
    "sparsity": _sparsity, "hessian_sparsity": _hessian_sparsity, "sparse_hessian": _sparse_hessian,
    "batch": _batch, "structured_fwd": _sweeps("fwd"), "structured_rev": _sweeps("rev"),
    "compressed": _compressed, "sparse_jacobian": _sparse_jacobian, "default": _default,
    "host_eval": _host_eval_case,
}


def run(case: Conf, analysis: str) -> Outcome:
    """``case`` through ``analysis``; an exception from the library is a ``crash`` outcome, never raised."""
    try:
        ctx = context(case)
    except Exception as e:  # noqa: BLE001 - the case itself is broken: shown, never hidden
        return Outcome("bad case", f"{type(e).__name__}: {str(e)[:300]}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # fallbacks warn; their answers are what is checked
            return _RUNNERS[analysis](case, ctx)
    except NoReference as e:
        return Outcome("n/a", str(e))
    except Exception as e:  # noqa: BLE001 - a crash is a defect, recorded
        return Outcome("crash", f"{type(e).__name__}: {str(e)[:300]}")


def run_host(name: str) -> Outcome:
    """One of :data:`HOST_CASES` through the host evaluator."""
    fun, args = HOST_CASES[name]
    try:
        return check_host_eval(fun, args)
    except Exception as e:  # noqa: BLE001
        return Outcome("crash", f"{type(e).__name__}: {str(e)[:300]}")


# --- the table -----------------------------------------------------------------------------------


def rule_family(primitive: str) -> str:
    """Which rule of the library's dependency analysis handles ``primitive`` (read from its rule tables)."""
    from jacobians._deps import _conv, _custom, _elementwise, _linalg, _movement, _reductions

    for mod in (_elementwise, _movement, _reductions, _linalg, _conv, _custom):
        if primitive in mod.RULES:
            return mod.__name__.rsplit(".", 1)[-1].lstrip("_")
    if primitive in ("cond", "while", "scan"):
        return "walker: control flow"
    if primitive in ("jit", "pjit", "closed_call", "checkpoint", "remat2", "custom_lin"):
        return "walker: nested jaxpr"
    return "fallback (no rule)"


def all_cases(vmap: bool = True) -> list[Conf]:
    """The catalogue, and (``vmap``) every case again under ``jax.vmap``."""
    cases = list(CASES.values())
    if vmap:
        cases += [vmapped(c) for c in CASES.values()]
    return cases


# The sample: every family's first case through the analyses that compile little (patterns, the
# batch proof, the default engine, the host evaluator), each family through one of the engines that
# compile their own program (in turn), and cases chosen for their history through the analyses that
# once failed on them.
_CHEAP = ("sparsity", "hessian_sparsity", "batch")
_ROTATE = ("default", "structured_fwd", "default", "structured_rev", "default", "compressed", "default",
           "sparse_jacobian")
_HOST_FAMILIES = ("reshape", "movement", "slice_pad", "gather", "int")
SAMPLE_EXTRA = {
    "reshape[(3, 4)->(3, 4) dimensions=(1, 0)]": ("sparsity", "batch", "structured_fwd", "default"),
    "gather[(6,) out-of-bounds starts mode=fill fill_value=3.0]": ("structured_fwd", "structured_rev", "default"),
    "gather[(4,5) start_index_map permuted + offsets mode=fill]": ("sparsity", "compressed"),
    "scatter-mul[1-D unique [0, 2]]": ("hessian_sparsity", "sparse_hessian"),
    "cholesky[(3,3)]": ("default",),
    "abs[complex (3,2) -> re|im]": ("hessian_sparsity", "structured_rev"),
    "exp[complex output exp(1j x)]": ("sparse_jacobian",),
}


def sample() -> list[tuple[Conf, str]]:
    """A bounded, deterministic sample of ``(case, analysis)`` pairs (about 2 s of compiles per family)."""
    reps: dict[str, Conf] = {}
    for c in CASES.values():
        reps.setdefault(c.family, c)
    pairs = []
    for i, c in enumerate(reps.values()):
        pairs += [(c, a) for a in _CHEAP] + [(c, _ROTATE[i % len(_ROTATE)])]
        pairs += [(c, "host_eval")] if c.family in _HOST_FAMILIES else []
    for name, analyses in SAMPLE_EXTRA.items():
        pairs += [(CASES[name], a) for a in analyses]
    return pairs


def table(results: dict) -> str:
    """A Markdown coverage table from ``{(case name, analysis): Outcome}``."""
    by_prim: dict[str, dict] = {}
    for (name, analysis), out in results.items():
        prim = name.split("[", 1)[0]
        row = by_prim.setdefault(prim, {"cases": set(), "analyses": {}})
        row["cases"].add(name)
        a = row["analyses"].setdefault(analysis, [0, 0, 0])  # passed, applicable, conservative
        if out.status != "n/a":
            a[1] += 1
            a[0] += out.status in ("pass", "conservative")
            a[2] += out.status == "conservative"
    cols = [a for a in ANALYSES if any(a in r["analyses"] for r in by_prim.values())]
    lines = ["| primitive | rule family | cases (parameter sets) | " + " | ".join(cols) + " |",
             "|---|---|---|" + "---|" * len(cols)]
    for prim in sorted(by_prim):
        row = by_prim[prim]
        cells = []
        for a in cols:
            p, n, cons = row["analyses"].get(a, [0, 0, 0])
            cells.append("-" if not n else f"{p}/{n}" + (f" ({cons} cons.)" if cons else ""))
        lines.append(f"| `{prim}` | {rule_family(prim)} | {len(row['cases'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
