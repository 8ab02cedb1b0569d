"""Trust in the jaxpr analyses' rules whose claims depend on dtypes and parameters (issue 21).

Three properties on fresh random points, never zeros:

- Hessian patterns (``hessian_sparsity``) contain every nonzero of ``jax.hessian``
  (soundness), over a table of small functions through every second-order rule
  family with real and complex intermediates; ``sparse_hessian`` equals
  ``jax.hessian``; a few patterns are pinned exactly (precision).
- First-order patterns (``sparsity``) contain every nonzero of ``jax.jacfwd``, and
  the default ``jacobian`` equals it, over rules whose result depends on
  parameters (convolution geometry, dot batch axes, reverse scans, ``top_k``'s axis).
- Log-determinants: ``+inf`` for an infinite Jacobian entry, ``-inf`` for a
  singular one and finite for an underflowing one at every kernel size, and
  ``jax.grad`` through ``log_abs_det`` above the looped LU's sizes.
"""

import functools
import inspect
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import randn
from jax import lax

import jacobians

# convert_element_type from complex to real is one of the rules under test.
pytestmark = pytest.mark.filterwarnings("ignore:Casting complex values to real discards the imaginary part")


def _z(x):  # a complex intermediate from a real input of size 6: x[:3] + i x[3:6]
    return lax.complex(x[:3], x[3:6])


@jax.custom_jvp
def _detached_jvp(x):
    """Primal x0 * x1; the rule keeps only x0's tangent (a 'stop-gradient on one factor' rule)."""
    return x[0] * x[1]


@_detached_jvp.defjvp
def _detached_jvp_rule(primals, tangents):
    (x,), (t,) = primals, tangents
    return _detached_jvp(x), t[0] * x[1]


@jax.custom_vjp
def _detached_vjp(x):
    return x[0] * x[1]


def _detached_vjp_fwd(x):
    return _detached_vjp(x), x[1]


def _detached_vjp_bwd(x1, g):
    return (jnp.zeros(2).at[0].set(g * x1),)


_detached_vjp.defvjp(_detached_vjp_fwd, _detached_vjp_bwd)


@jax.custom_vjp
def _ste_round(x):
    return jnp.round(x)


_ste_round.defvjp(lambda x: (jnp.round(x), None), lambda _, g: (g,))


def _pow_int(x):
    with jax.numpy_dtype_promotion("standard"):  # JAX's own rule for an integer exponent promotes
        return jnp.sum(lax.pow(x, jnp.int32(3)))


def _spd(x):  # a symmetric positive definite 3x3 matrix from x[:6]
    L = jnp.zeros((3, 3)).at[jnp.tril_indices(3)].set(x[:6])
    return L @ L.T + 3 * jnp.eye(3)


def _conv1(lhs, rhs, **kw):
    return lax.conv_general_dilated(lhs, rhs, window_strides=(1,), padding="SAME", **kw)


# name -> (scalar function of x in R^8). Intermediates: real and complex; every second-order rule family.
HESSIAN_CASES = {
    # dtype-dependent claims: abs/sign/max of complex and real values
    "abs_real": lambda x: jnp.sum(jnp.abs(x) * x),
    "abs_complex": lambda x: jnp.sum(jnp.abs(_z(x))),
    "real_imag_conj_sign": lambda x: jnp.sum(jnp.real(_z(x) * jnp.conj(_z(x)[::-1])) + jnp.imag(_z(x) ** 2))
    + jnp.sum(jnp.real(jnp.sign(_z(x))) * x[:3] ** 2),
    "complex_to_real_cast": lambda x: jnp.sum(lax.convert_element_type(jnp.exp(_z(x)), jnp.float64) * x[6]),
    "complex_div": lambda x: jnp.sum(jnp.real(1 / (_z(x) + 3))),
    "max_min_clamp_rem": lambda x: jnp.sum(jnp.maximum(x[:4], x[4:]) ** 2 + jnp.minimum(x[:4], 0.1) * x[4:])
    + jnp.sum(jnp.clip(x, -0.5, 0.5) * x[::-1] + lax.rem(x, 1.7) * x),
    # powers and products
    "integer_pow": lambda x: jnp.sum(x[:4] ** 3 + lax.integer_pow(x[4:], 1) * 2 + lax.integer_pow(x[4:], 0)),
    "pow_float": lambda x: jnp.sum((jnp.abs(x[:4]) + 1) ** 2.5 + (x[4:] ** 2 + 1) ** x[:4]),
    "pow_int_exponent": lambda x: _pow_int(x),
    "mul_dependent": lambda x: jnp.sum(x[:4] * x[4:]) + x[0] * x[0],
    "div_dependent": lambda x: jnp.sum(x[:4] / (2 + x[4:] ** 2)),
    "zero_times_square": lambda x: jnp.sum(0 * x**2) + jnp.sum(x[:2] * x[2:4]),
    "select_n": lambda x: jnp.sum(jnp.where(x[:4] > 0, x[:4] ** 2, x[4:] * x[:4])),
    "stop_gradient": lambda x: jnp.sum(lax.stop_gradient(x) * x**2 + jnp.floor(x) * x),
    # reductions, scans, sorts
    "sort": lambda x: jnp.sum(jnp.sort(x)[:4] * x[4:])
    + jnp.sum(lax.sort((jnp.round(x[:4]), x[4:] ** 2), num_keys=2)[1] * x[:4]),
    "top_k": lambda x: jnp.sum(lax.top_k(x, 3)[0] ** 2),
    "cumulative": lambda x: jnp.sum(jnp.cumsum(x) ** 2 + lax.cummax(x, reverse=True) * x)
    + jnp.sum(lax.cumprod(x[4:], reverse=True)),
    "reduce_prod_max": lambda x: jnp.prod(x[:3]) + jnp.prod(x[3:].reshape(1, 5), axis=1)[0] + jnp.max(x) ** 2
    + jnp.max(x[:4] * x[4:]),
    "argmax_gather": lambda x: x[jnp.argmax(x)] * x[0] + jnp.sum(x[jnp.argsort(x)][:2] ** 2),
    # bilinear
    "dot_both_dependent": lambda x: x[:4] @ x[4:] + jnp.sum(x[:4].reshape(2, 2) @ x[4:].reshape(2, 2)) + x @ x,
    "dot_batched": lambda x: jnp.sum(jnp.einsum("bi,bi->b", x[:4].reshape(2, 2), x[4:].reshape(2, 2)) ** 2),
    "conv_both_dependent": lambda x: jnp.sum(_conv1(x[None, None, :5], x[None, None, 5:])),
    # scatters
    "scatter_set_add": lambda x: jnp.sum(x.at[jnp.array([0, 1])].set(x[2:4] ** 2) * x[::-1])
    + jnp.sum(jnp.sin(x.at[jnp.array([0, 0, 5])].add(x[5:8]))),
    "scatter_mul": lambda x: jnp.sum(x.at[jnp.array([0, 1])].mul(x[2:4], unique_indices=True)),
    "scatter_min_max": lambda x: jnp.sum(x.at[jnp.array([0, 1])].min(x[2:4]) * x + x.at[jnp.array([3])].max(x[7:])),
    "dynamic_update_slice": lambda x: jnp.sum(lax.dynamic_update_slice(x, x[:2] * x[6:], (3,)) * x[::-1]),
    # custom rules
    "custom_jvp_relu_softplus": lambda x: jnp.sum(jax.nn.relu(x) * x[::-1] + jax.nn.softplus(x)),
    "custom_jvp_detached": lambda x: _detached_jvp(x[:2]) + x[2] ** 2,
    "custom_vjp_detached": lambda x: _detached_vjp(x[:2]) + x[2] ** 2,
    "custom_vjp_ste": lambda x: jnp.sum(_ste_round(x * 3) * x[::-1]),
    # control flow and nested jaxprs
    "while": lambda x: lax.fori_loop(0, 3, lambda i, c: c * x[i] + x[i + 4], 1.0),
    "cond": lambda x: lax.cond(x[0] > 0, lambda: x[1] * x[2], lambda: x[3] ** 2) + lax.cond(
        x[0] > 10, lambda: x[4] * x[5], lambda: x[6]
    ),
    "scan": lambda x: lax.scan(lambda c, xi: (jnp.tanh(c + xi), c * xi), 0.5, x[:4])[1].sum(),
    "jit_remat": lambda x: jax.jit(lambda y: jnp.sum(jax.checkpoint(jnp.sin)(y[:4]) * y[4:]))(x),
    # nonlinear element-wise
    "expm1_logistic_erf_inv": lambda x: jnp.sum(jnp.expm1(x[:3]) + jax.nn.sigmoid(x[3:6] * x[6]))
    + jnp.sum(jax.scipy.special.erfinv(jnp.tanh(x[6:]) * 0.9)),
    "atan2_sqrt_complex": lambda x: jnp.sum(jnp.arctan2(x[:4], x[4:])) + jnp.sum(jnp.real(jnp.sqrt(_z(x) + 4))),
    "fft": lambda x: jnp.sum(jnp.abs(jnp.fft.fft(x[:4])) ** 2) + x[5] * x[6],
    # linear algebra
    "cholesky_triangular_solve": lambda x: jnp.sum(
        jax.scipy.linalg.solve_triangular(jnp.linalg.cholesky(_spd(x)), x[5:8], lower=True) ** 2
    ),
}

# Patterns pinned exactly: the precision the rules promise.
EXACT = {
    "abs_complex": [(i, j) for i in range(3) for j in (i, i + 3)] + [(i + 3, j) for i in range(3) for j in (i, i + 3)],
    "scatter_mul": [(0, 2), (2, 0), (1, 3), (3, 1)],
    "zero_times_square": [(0, 2), (2, 0), (1, 3), (3, 1)],
    "custom_jvp_detached": [(0, 1), (1, 0), (2, 2)],
    "custom_vjp_detached": [(0, 1), (1, 0), (2, 2)],
    "dot_batched": [(i, j) for b in (0, 2) for i in (b, b + 1, b + 4, b + 5) for j in (b, b + 1, b + 4, b + 5)],
}


@functools.cache
def _jax_hessians(name):
    f = HESSIAN_CASES[name]
    # Forward mode cannot enter a custom_vjp: reverse over reverse there.
    return jax.jit(jax.vmap(jax.jacrev(jax.grad(f)) if "vjp" in name else jax.hessian(f)))


@pytest.mark.parametrize("name", sorted(HESSIAN_CASES))
def test_hessian_pattern_sound(name, rng):
    f = HESSIAN_CASES[name]
    xs = randn(rng, (3, 8))
    pattern = np.asarray(jacobians.hessian_sparsity(f, xs[0]).to_dense())
    np.testing.assert_array_equal(pattern, pattern.T)
    H = np.asarray(_jax_hessians(name)(xs))
    assert np.all(np.isfinite(H))
    missed = np.argwhere(np.any(H != 0, axis=0) & ~pattern)
    assert not missed.size, f"the Hessian pattern misses nonzeros at {missed.tolist()}"
    if name in EXACT:
        want = np.zeros((8, 8), bool)
        for i, j in EXACT[name]:
            want[i, j] = True
        np.testing.assert_array_equal(pattern, want)
        nz = np.any(H != 0, axis=0)
        np.testing.assert_array_equal(nz | nz.T, want)  # the pin is JAX's own pattern (symmetrized)


@pytest.mark.parametrize(
    "name", ["abs_complex", "scatter_mul", "custom_jvp_detached"]
)
def test_sparse_hessian_equals_jax(name, rng):
    f = HESSIAN_CASES[name]
    x = randn(rng, (8,))
    got = jacobians.sparse_hessian(f, output="dense")(x)
    np.testing.assert_allclose(got, _jax_hessians(name)(x[None])[0], rtol=1e-10, atol=1e-12)


@jax.custom_jvp
def _rolled(x):
    return jnp.sum(x**2)


@_rolled.defjvp
def _rolled_rule(primals, tangents):  # the tangent map t -> 2 roll(x) . t is no function's derivative
    (x,), (t,) = primals, tangents
    return _rolled(x), 2 * jnp.sum(jnp.roll(x, 1) * t)


def test_an_unsymmetric_jax_hessian_is_followed(rng):
    # JAX's Hessian is the Jacobian of the gradient; through such a rule (or one that is not the derivative of
    # its primal) it is not symmetric. A symmetric colouring or a reverse outer pass reads H^T for H: the
    # planner takes a column colouring, forward over reverse, and a caller's choice of either warns or raises.
    f = lambda x: _rolled(x) + jnp.sum(jnp.sin(x) * x[0]) + _detached_jvp(x[1:3])  # noqa: E731
    x = randn(rng, (6,))
    H = np.asarray(jax.hessian(f)(x))
    assert not np.allclose(H, H.T)
    close = functools.partial(np.testing.assert_allclose, rtol=1e-10, atol=1e-12)
    plan = jacobians.sparse_hessian(f).plan(x)
    assert plan.coloring == "column" and plan.mode.startswith("fwd"), plan
    close(jacobians.sparse_hessian(f, output="dense")(x), H)
    close(jax.jit(jacobians.sparse_hessian(f, output="dense", mode="fwd_fwd"))(x), H)
    v = randn(rng, (6,))
    for mode in ("fwd_rev", "rev_rev", "rev_fwd", "fwd_fwd"):
        close(jacobians.hessian(f, mode=mode)(x), H)
    close(jacobians.hvp(f, (x,), (v,)), H @ v)
    for kw in ({"coloring": "star"}, {"coloring": "acyclic"}, {"mode": "rev_rev"}):
        with pytest.raises(jacobians.PlanError, match=f"{list(kw.values())[0]}.*not the derivative of a function"):
            jacobians.sparse_hessian(f, output="dense", **kw)(x)
        with jacobians.strict(False), pytest.warns(jacobians.PlanWarning, match="column colouring, forward outer"):
            close(jacobians.sparse_hessian(f, output="dense", **kw)(x), H)
    with pytest.raises(jacobians.PlanError, match="mode='rev_fwd' cannot give JAX's derivative"):
        jacobians.hvp(f, (x,), (v,), mode="rev_fwd")
    with jacobians.strict(False), pytest.warns(jacobians.PlanWarning, match="forward outer pass"):
        close(jacobians.hvp(f, (x,), (v,), mode="rev_rev"), H @ v)
    # A symmetric Hessian through honest rules (JAX's own softplus, relu) keeps the cheapest colouring.
    g = lambda x: jnp.sum(jax.nn.softplus(x[1:] * x[:-1])) + jnp.sum(jax.nn.relu(x) ** 3)  # noqa: E731
    assert jacobians.sparse_hessian(g, coloring="star", mode="rev_rev").plan(x).coloring == "star"
    close(jacobians.sparse_hessian(g, output="dense", coloring="star", mode="rev_rev")(x), jax.hessian(g)(x))



@jax.custom_vjp
def _reversed_pull(v):
    return v * 1.0


# The backward rule is no transpose of the primal's derivative: jax.jacrev(jax.grad(.)) is not symmetric.
_reversed_pull.defvjp(lambda v: (v * 1.0, v), lambda r, g: (g * r[::-1],))


def test_an_unsymmetric_hessian_through_a_custom_vjp_is_jacrev_of_grad(rng):
    # Only reverse over reverse differentiates a custom_vjp; its products are the Hessian's rows (s^T H). The
    # sparse Hessian reads each entry off its row, the checks compare rows with rows: JAX's jacrev(grad) comes
    # out, not its transpose (which passed the check before), and a symmetric colouring fails its check.
    g = lambda v: jnp.sum(_reversed_pull(v) * jnp.arange(1.0, 6.0)) + jnp.sum(jnp.sin(v) ** 2)  # noqa: E731
    x = randn(rng, (5,))
    H = np.asarray(jax.jacrev(jax.grad(g))(x))
    assert not np.allclose(H, H.T)
    close = functools.partial(np.testing.assert_allclose, rtol=1e-10, atol=1e-12)
    close(jacobians.hessian(g)(x), H)  # a structured reverse sweep, whose check failed before
    close(jax.jit(jacobians.sparse_hessian(g, output="dense", coloring="column"))(x), H)
    with pytest.raises(jacobians.PlanError, match="failed its certificate"):
        jacobians.sparse_hessian(g, output="dense", coloring="acyclic")(x)
    # The default (a star colouring, whose symmetric reading the check refutes): every entry instead.
    with jacobians.strict(False), pytest.warns(jacobians.PlanWarning, match="failed its certificate"):
        close(jacobians.sparse_hessian(g, output="dense")(x), H)


# ------------------------------------------------------------------------------------------ first order


def _conv(lhs, rhs, **kw):
    kw.setdefault("window_strides", (1,) * (lhs.ndim - 2))
    kw.setdefault("padding", "VALID")
    return lax.conv_general_dilated(lhs, rhs, **kw)


# (make_single_device_sharding from JAX 0.12, where SingleDeviceSharding is deprecated)
_ONE_DEVICE = getattr(jax.sharding, "make_single_device_sharding", None) or jax.sharding.SingleDeviceSharding
_ONE_DEVICE = _ONE_DEVICE(jax.devices()[0])
_KERNEL = np.array([1.0, 0.0, -2.0, 0.5, 0.0, 3.0]).reshape(2, 1, 3)  # O=2, I=1, K=3, with zeros

# name -> (function, input shape). Rules whose result depends on parameters or dtypes.
JACOBIAN_CASES = {
    "reduce_precision": (lambda x: lax.reduce_precision(x, exponent_bits=5, mantissa_bits=10) * x[::-1], (6,)),
    # bfloat16's 7 bits: JAX's JVPs in random directions round them, far beyond a float64 check's tolerance
    "reduce_precision_bf16": (lambda x: lax.reduce_precision(x, exponent_bits=8, mantissa_bits=7) * x, (6,)),
    "complex": (lambda x: lax.convert_element_type(jnp.exp(_z(x)) * _z(x)[::-1], jnp.float64) + jnp.abs(_z(x))
                + jnp.real(jnp.sign(_z(x))) + jnp.imag(_z(x) ** 2), (6,)),
    "cumulative_reverse": (
        lambda x: jnp.concatenate([
            lax.cumsum(x, axis=0, reverse=True).ravel(), lax.cumsum(x ** 2, axis=1, reverse=True).ravel(),
        ]),
        (3, 4),
    ),  # fmt: skip
    "reduce_max_argmax": (
        lambda x: jnp.concatenate([jnp.max(x, axis=0), jnp.min(x, axis=1), jnp.prod(x, axis=0),
                                   x[0] * x.ravel()[jnp.argmax(x[1])] + jnp.argmin(x).astype(jnp.float64)]),
        (3, 4),
    ),
    **({"top_k_axis0": (lambda x: lax.top_k(x, 2, axis=0)[0], (4, 3))}
       if "axis" in inspect.signature(lax.top_k).parameters else {}),  # (JAX < 0.9: no axis)
    "sort_num_keys": (lambda x: jnp.stack(lax.sort((jnp.round(x[0]), x[1], x[2] ** 2), num_keys=2)), (3, 5)),
    "optimization_barrier": (lambda x: jnp.concatenate(lax.optimization_barrier((x[:2] * 2, jnp.sin(x[2:])))), (5,)),
    "dot_batch_not_leading": (
        lambda x: lax.dot_general(x[:24].reshape(2, 3, 4), x[24:].reshape(4, 2, 3), (((2,), (0,)), ((1,), (2,))),
                                  preferred_element_type=jnp.float64),
        (48,),
    ),
    "conv_const_kernel_geometry": (
        lambda x: _conv(x.reshape(1, 1, 7), jnp.asarray(_KERNEL[:, :, :3]), window_strides=(2,),
                        padding=((2, 1),), lhs_dilation=(2,), rhs_dilation=(1,)),
        (7,),
    ),
    "conv_rhs_dilation": (
        lambda x: _conv(x.reshape(1, 1, 8), jnp.asarray(_KERNEL), padding=((1, 2),), rhs_dilation=(2,)), (8,)
    ),
    "conv_feature_groups": (
        lambda x: _conv(x[:12].reshape(1, 2, 6), x[12:].reshape(2, 1, 3), feature_group_count=2), (18,)
    ),
    "conv_batch_groups": (
        lambda x: _conv(x[:20].reshape(4, 1, 5), x[20:].reshape(2, 1, 3), batch_group_count=2), (26,)
    ),
    "conv_dimension_numbers": (
        lambda x: _conv(x[:20].reshape(5, 2, 2), x[20:].reshape(3, 2, 2), window_strides=(2,), padding=((1, 1),),
                        dimension_numbers=("WNC", "WIO", "CWN")),
        (32,),
    ),
    "conv_2d_nhwc": (
        lambda x: _conv(x[:32].reshape(1, 4, 4, 2), x[32:].reshape(2, 2, 1, 4), window_strides=(1, 2),
                        padding=((1, 0), (0, 1)), lhs_dilation=(1, 2), rhs_dilation=(2, 1), feature_group_count=2,
                        dimension_numbers=("NHWC", "HWIO", "NHWC")),
        (48,),
    ),
    "linalg_batched": (
        lambda x: jnp.concatenate([jnp.linalg.svd(x, compute_uv=False).ravel(),
                                   jnp.linalg.eigvalsh(x @ jnp.swapaxes(x, 1, 2)).ravel()]),
        (3, 2, 2),
    ),
    "custom_jvp_detached": (lambda x: jnp.stack([_detached_jvp(x[:2]), _detached_jvp(x[1:])]), (3,)),
    "custom_vjp": (lambda x: jnp.stack([_detached_vjp(x[:2]), _ste_round(x[2])]), (3,)),
    "known_zeros": (
        lambda x: jnp.concatenate([x * jnp.asarray([0.0, 1, 0, 2]), x ** jnp.asarray([0.0, 1, 2, 0]),
                                   jnp.where(jnp.asarray([True, False, True, False]), x, x[::-1] * 2)]),
        (4,),
    ),
    "clamp_rem_dependent": (lambda x: jnp.concatenate([lax.clamp(x[:3] - 1, x[3:6], x[6:] + 1), lax.rem(x[3:6], x[6:])]),
                            (9,)),
    "scatter_mul": (lambda x: x[:4].at[jnp.array([0, 2])].mul(x[4:], unique_indices=True), (6,)),
    "placement_identities": (
        lambda x: jnp.concatenate([jax.lax.with_sharding_constraint(jnp.sin(x), _ONE_DEVICE),
                                   jax.device_put(x * 2, _ONE_DEVICE), *jax.device_put((x[:2], jnp.cos(x)))]),
        (4,),
    ),
    # windows (rules added for issue 21: were "everything" with a warning) and FFTs
    "reduce_window_sum_dilated": (
        lambda x: lax.reduce_window(x, 0.0, lax.add, (2, 2), (1, 2), ((1, 0), (0, 1)), base_dilation=(2, 1),
                                    window_dilation=(1, 2)),
        (4, 5),
    ),
    "avg_pool_nhwc": (lambda x: lax.reduce_window(x, 0.0, lax.add, (1, 2, 2, 1), (1, 2, 2, 1), "SAME"), (1, 5, 5, 2)),
    "max_pool_grad_and_jvp": (
        lambda x: jnp.concatenate([
            jax.grad(lambda y: jnp.sum(_max_pool(y) ** 2))(x).ravel(), jax.jvp(_max_pool, (x,), (jnp.sin(x),))[1].ravel()
        ]),
        (4, 5),
    ),  # fmt: skip
    "fft": (lambda x: jnp.concatenate([jnp.abs(jnp.fft.rfft(x)).ravel(), jnp.real(jnp.fft.fft2(x[:2])).ravel(),
                                       jnp.fft.irfft(lax.complex(x[:, :2], x[:, 2:4]), n=3).ravel()]), (3, 5)),
}


@functools.cache
def _jax_jacobians(name):
    f = JACOBIAN_CASES[name][0]
    return jax.jit(jax.vmap(jax.jacrev(f) if "vjp" in name else jax.jacfwd(f)))


@pytest.mark.parametrize("name", sorted(JACOBIAN_CASES))
def test_jacobian_pattern_sound(name, rng):
    f, shape = JACOBIAN_CASES[name]
    xs = randn(rng, (3, *shape))
    J = np.asarray(_jax_jacobians(name)(xs))
    assert np.all(np.isfinite(J))
    pattern = np.asarray(jacobians.sparsity(f, xs[0]).to_dense()).reshape(J.shape[1:])
    missed = np.argwhere(np.any(J != 0, axis=0) & ~pattern)
    assert not missed.size, f"the pattern misses nonzeros at {missed.tolist()}"
    got = np.asarray(jacobians.jacobian(f)(xs[1]))
    want = [J[1]]
    if name.startswith("reduce_precision"):  # its JVP and its VJP round the tangent: jacfwd and jacrev differ
        want.append(np.asarray(jax.jacrev(f)(xs[1])))
    assert any(np.allclose(got, w, rtol=1e-10, atol=1e-12) for w in want), np.abs(got - J[1]).max()


def _max_pool(x):
    return lax.reduce_window(x, -jnp.inf, lax.max, (2, 2), (1, 2), ((1, 0), (0, 1)))


def _variadic_reduce_window(x):
    out = lax.reduce_window((x, x * 2), (0.0, 1.0), lambda a, b: (a[0] + b[0], a[1] * b[1]), (2, 2), (1, 1), "VALID")
    return jnp.concatenate([o.ravel() for o in out])


def _variadic_reduce(x):
    return jnp.concatenate(lax.reduce((x, jnp.sin(x)), (0.0, 1.0), lambda a, b: (a[0] + b[0], a[1] * b[1]), (1,)))


@pytest.mark.parametrize("f", [_variadic_reduce_window, _variadic_reduce], ids=["reduce_window", "reduce"])
def test_generic_reductions_sound(f, rng):
    # The reducer's jaxpr was walked as if it were a call on the whole operands: a crash.
    x = randn(rng, (4, 5))
    jvp = jax.jit(lambda t: jax.jvp(f, (x,), (t,))[1])  # jax.jacfwd (vmap) fails on a variadic reduce_window
    J = np.stack([np.asarray(jvp(t)) for t in np.eye(20).reshape(20, 4, 5)], axis=-1)
    pattern = np.asarray(jacobians.sparsity(f, x).to_dense()).reshape(J.shape)
    assert not np.any((J != 0) & ~pattern)
    assert pattern.sum() < pattern.size  # windows and rows, not everything
    h = jacobians.hessian_sparsity(lambda x: jnp.sum(jnp.sin(f(x))), x)
    assert h.nnz > 0


@pytest.mark.parametrize("name", ["placement_identities", "linalg_batched", "reduce_window_sum_dilated", "avg_pool_nhwc"])
def test_pattern_exact(name, rng):
    # Identities keep each element's own set; batched singular values and eigenvalues read their own matrix
    # only; a window sum reads its window (with dilations and padding).
    f, shape = JACOBIAN_CASES[name]
    x = randn(rng, shape)
    pattern = np.asarray(jacobians.sparsity(f, x).to_dense())
    nz = np.asarray(_jax_jacobians(name)(x[None])[0] != 0)
    np.testing.assert_array_equal(pattern, nz.reshape(pattern.shape))


@pytest.mark.skipif("axis" not in inspect.signature(lax.top_k).parameters, reason="lax.top_k has no axis (JAX < 0.9)")
def test_top_k_axis_pattern_is_per_column(rng):
    # top_k along axis 0 of a (4, 3) matrix: output (k, j) reads column j only.
    pattern = np.asarray(jacobians.sparsity(lambda x: lax.top_k(x, 2, axis=0)[0], randn(rng, (4, 3))).to_dense())
    want = np.zeros((2, 3, 4, 3), bool)
    for j in range(3):
        want[:, j, :, j] = True
    np.testing.assert_array_equal(pattern, want)


# ------------------------------------------------------------------------------------------ determinants


# float32 underflow at every kernel regime: test_det's "scaled" stacks.
@pytest.mark.parametrize("k, dtype", [(3, jnp.float64), (40, jnp.float64)])
def test_log_abs_det_infinite_singular_underflowing(rng, k, dtype):
    # J = s A + c^2 P with P one-hot at (i, j): the entry's tangent (P t) c c is exactly 0 for t_j = 0, so an
    # overflowing c gives one infinite entry and no NaN (a product by an infinite constant would make 0 * inf).
    A = randn(rng, (k, k), dtype)

    def f(x, s, c, P):
        return s * (A @ x) + (P @ x) * c * c

    cells = np.arange(k * k) if k <= 8 else rng.choice(k * k, 64, replace=False)  # every position / a sample
    P = jnp.asarray(np.eye(k * k)[cells].reshape(-1, k, k), dtype)
    fn = jax.jit(jax.vmap(jacobians.slogdet(f), in_axes=(None, None, None, 0)))
    x = randn(rng, (k,), dtype)
    one, zero, big = (jnp.asarray(v, dtype) for v in (1, 0, np.sqrt(np.finfo(dtype).max) * 2))
    J = np.asarray(jax.vmap(jax.jacfwd(f), in_axes=(None, None, None, 0))(x, one, big, P), np.float64)
    assert np.all(np.isinf(J).sum(axis=(1, 2)) == 1) and not np.isnan(J).any()
    sign, logabs = (np.asarray(v, np.float64) for v in fn(x, one, big, P))
    ref_sign = np.linalg.slogdet(np.where(np.isinf(J), np.sign(J) * 1e30, J))[0]  # det(F + t S), t -> inf
    np.testing.assert_array_equal(logabs, np.inf)
    np.testing.assert_array_equal(sign, ref_sign)
    sign, logabs = (np.asarray(v, np.float64) for v in fn(x, zero, zero, P))  # J = 0: singular
    assert np.all(logabs == -np.inf) and np.all(sign == 0)
    tiny = 1e-20 if dtype == jnp.float32 else 1e-200  # det(tiny A) underflows, its log does not
    sign, logabs = (np.asarray(v, np.float64) for v in fn(x, jnp.asarray(tiny, dtype), zero, P))
    ref_sign, ref = np.linalg.slogdet(np.asarray(A, np.float64))
    np.testing.assert_array_equal(sign, ref_sign)
    np.testing.assert_allclose(logabs, ref + k * np.log(tiny), rtol=1e-5 if dtype == jnp.float32 else 1e-12)


def test_grad_log_abs_det_above_the_lu_sizes(rng):
    # n = 40 takes jnp.linalg.slogdet's rule inside the kernel's custom JVP (it returned a SlogdetResult: TypeError).
    n = 40
    W = randn(rng, (n, n)) / np.sqrt(n)

    def f(x):
        return jnp.tanh(W @ x) + 0.5 * x

    x = randn(rng, (n,))
    got = jax.jit(jax.grad(jacobians.log_abs_det(f)))(x)
    want = jax.jit(jax.grad(lambda x: jnp.linalg.slogdet(jax.jacfwd(f)(x))[1]))(x)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_a_hessian_at_rounding_level_passes_its_checks(rng):
    # (x + i x)^2 has real part 0, but JAX's complex products leave ~1e-16 in some Hessian entries where the
    # detected pattern has none: its own products at a point a few ulps away move by as much (a fuzzing find:
    # the sparse Hessian's and the Laplacian colouring's checks failed in strict mode).
    w = randn(rng, (6,))
    g = lambda x: jnp.sum(w * jnp.real(lax.complex(x, x) ** 2)) + jnp.sum(x[1:] * x[:-1] ** 2)  # noqa: E731
    x = randn(rng, (6,))
    H = np.asarray(jax.hessian(g)(x))
    np.testing.assert_allclose(jacobians.sparse_hessian(g, output="dense")(x), H, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(jacobians.laplacian(g, method="hvp")(x), np.trace(H), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(jacobians.hessian_diagonal(g, method="hvp")(x), np.diag(H), rtol=1e-12, atol=1e-12)



_SATURATED = """
import numpy as np, jax, jax.numpy as jnp, jacobians
key = jax.random.PRNGKey(1)
W = jax.random.normal(jax.random.fold_in(key, 19), (10, 6)) * 5.0
x = jax.random.normal(jax.random.fold_in(key, 20), (6,))
g = lambda x: jax.nn.logsumexp(W @ x) - (W @ x)[3]
with jacobians.strict():
    np.testing.assert_allclose(jacobians.hessian(g)(x), jax.hessian(g)(x), rtol=1e-4, atol=1e-5)
    H = np.asarray(jax.hessian(g)(x))
    np.testing.assert_allclose(jacobians.laplacian(g)(x), np.trace(H), rtol=1e-4, atol=1e-5)
print("SATURATED OK")
"""


@pytest.mark.slow
def test_checks_saturated_near_the_inputs_are_judged_at_the_inputs_scale():
    """float32 log-sum-exp whose logits scale by 5, as a user runs it (XLA's default optimisation level, no x64):
    near the call's inputs the softmax saturates and the plan's second derivatives and JAX's are both rounding
    (the structured Hessian 8e-8 against -6e-8, the forward Laplacian 2^-16 against 0). Each plan passes at
    the call's inputs and near them within the tolerance of the values' scale there (both failed, strict:
    raised). In a fresh process: the suite compiles at level 0 and enables x64."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_ENABLE_X64")}
    out = subprocess.run([sys.executable, "-c", _SATURATED], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "SATURATED OK" in out.stdout, out.stdout[-2000:] + out.stderr[-3000:]
