"""Programs built on custom-rule solvers: ``jax.experimental.ode.odeint`` (a custom_vjp around a while_loop
whose pullback runs another odeint), a custom_vjp and a while_loop, through the transformations and their
fallbacks, strict (the suite's default): no analysis may fail, warn or pick a direction JAX cannot take.
(``jnp.linalg.solve``'s custom_linear_solve: the registry's ``linear_solve`` and the conformance cases.)

Sensitivity analysis of ODE solutions is what scientists ask of a Jacobian library; these programs reach
the corners the per-primitive catalogue does not: the rule's own jaxpr holding the same custom call again,
constants that the walker folds to NumPy values but the rule's Python indexes with tracers, and a forward
mode that JAX reports impossible only when the program is lowered.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import randn
from jax.experimental.ode import odeint

import jacobians

TS = np.array([0.0, 0.1])


def tall(x):  # R^2 -> R^6: forward mode would be the cheaper dense direction, and JAX cannot take it
    return odeint(lambda y, t, a: -y * a[0] + a[1], jnp.ones(6, x.dtype) * x[1], jnp.asarray(TS, x.dtype), x)[-1]


def loss(x):
    return jnp.sum(tall(x) ** 2)


_HESSIAN = jax.jit(jax.jacrev(jax.jacrev(loss)))  # forward over reverse is impossible through a custom_vjp


ODE_TOL = dict(rtol=1e-6, atol=1e-8)  # two orders of adjoint solves agree to the solver's tolerance


@pytest.mark.parametrize("name", ["jacobian", "explain"])  # (detection walks the custom rule, no warning)
def test_ode_jacobians(name, rng):
    x = randn(rng, (2,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "no sparsity rule" and no fallback
        if name == "explain":
            plan = jacobians.explain(tall, x)
            assert plan.mode == "rev", plan
            return
        fn = jacobians.jacobian(tall) if name == "jacobian" else jacobians.sparse_jacobian(tall, output="dense")
        np.testing.assert_allclose(fn(x), jax.jacrev(tall)(x), rtol=1e-12, atol=1e-14)


# (sparse_hessian, laplacian and hessian_diagonal share these paths: left out for the suite's time)
@pytest.mark.parametrize("name", ["hessian", "hvp"])
def test_ode_second_order(name, rng):
    x = randn(rng, (2,))
    H = np.asarray(_HESSIAN(x))
    got = {
        "hessian": lambda: jacobians.hessian(loss)(x),
        "hvp": lambda: jacobians.hvp(loss, (x,), (x,)),
    }[name]()
    want = H @ np.asarray(x) if name == "hvp" else H
    np.testing.assert_allclose(got, want, **ODE_TOL)


def test_forced_forward_mode_says_why(rng):
    with pytest.raises(TypeError, match="custom_vjp"):
        jacobians.jacobian(tall, mode="fwd")(randn(rng, (2,)))


@jax.custom_vjp
def _g(x):
    return jnp.sin(x) * x


_g.defvjp(lambda x: (_g(x), x), lambda x, ct: (ct * (jnp.cos(x) * x + jnp.sin(x)),))


def _loop(x):  # a while_loop with a dynamic trip count: no reverse mode
    return jax.lax.while_loop(lambda c: c[0] < 2, lambda c: (c[0] + 1, jnp.cos(c[1]) * c[1]), (0, x))[1]


def test_custom_vjp_and_while_loop_through_every_fallback(rng):
    x, v = randn(rng, (3,)), randn(rng, (3,))
    s = lambda x: jnp.sum(_g(x) ** 2)  # noqa: E731
    H = jax.jacrev(jax.jacrev(s))(x)
    np.testing.assert_allclose(jacobians.hvp(s, (x,), (v,)), H @ v, rtol=1e-10)  # JAX 0.10 fails jvp at lowering
    np.testing.assert_allclose(jacobians.laplacian(s)(x), np.trace(H), rtol=1e-10)
    sq = lambda x: _g(x) * x[::-1]  # noqa: E731
    np.testing.assert_allclose(jacobians.divergence(sq)(x), np.trace(jax.jacrev(sq)(x)), rtol=1e-12)
    X = randn(rng, (4, 3))
    got = jacobians.batch_jacobian(jax.vmap(lambda x: _g(x) * x[::-1]))(X)  # its certificate: VJPs here
    np.testing.assert_allclose(got, jax.vmap(jax.jacrev(lambda x: _g(x) * x[::-1]))(X), rtol=1e-12)
    w = lambda x: jnp.sum(_loop(x) ** 2)  # noqa: E731
    Hw = jax.jacfwd(jax.jacfwd(w))(x)
    value, grad, lap = jacobians.value_grad_and_laplacian(w)(x)  # the gradient forward
    np.testing.assert_allclose(grad, jax.jacfwd(w)(x), rtol=1e-12)
    np.testing.assert_allclose(lap, np.trace(Hw), rtol=1e-10)
    np.testing.assert_allclose(jacobians.sparse_hessian(w, output="dense")(x), Hw, rtol=1e-10)  # its certificate


def _solve_loss(x):
    """A ``lax.custom_linear_solve`` without ``transpose_solve``: JAX has no reverse mode through it."""
    A = jnp.diag(x) + 0.1 * jnp.outer(x, x[::-1]) + 3 * jnp.eye(x.size, dtype=x.dtype)
    y = jax.lax.custom_linear_solve(lambda v: A @ v, jnp.sin(x), lambda mv, r: jnp.linalg.solve(A, r))
    return jnp.sum(y**2) + jnp.sum(x[:2] * y[1:3])


@pytest.mark.parametrize("name", ["hessian", "sparse_hessian", "fwd_fwd", "hessian_diagonal", "laplacian",
                                  "jacobian", "hvp"])
def test_untransposable_linear_solve_takes_forward_mode(name, rng):
    """Every second-order transformation goes forward over forward (its certificate too), strict: no warning."""
    x = jnp.abs(randn(rng, (4,))) + 0.5
    H = np.asarray(jax.jacfwd(jax.jacfwd(_solve_loss))(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = {
            "hessian": lambda: jacobians.hessian(_solve_loss)(x),
            "sparse_hessian": lambda: jacobians.sparse_hessian(_solve_loss, output="dense")(x),
            "fwd_fwd": lambda: jacobians.sparse_hessian(_solve_loss, mode="fwd_fwd", output="dense")(x),
            "hessian_diagonal": lambda: np.diag(jacobians.hessian_diagonal(_solve_loss)(x)),
            "laplacian": lambda: np.eye(4) * jacobians.laplacian(_solve_loss)(x) / 4,
            "jacobian": lambda: jacobians.jacobian(jax.jacfwd(_solve_loss))(x),
            "hvp": lambda: jacobians.hvp(_solve_loss, (x,), (x[::-1],)),
        }[name]()
    want = {"hessian_diagonal": np.diag(np.diag(H)), "laplacian": np.eye(4) * np.trace(H) / 4,
            "hvp": H @ np.asarray(x[::-1])}.get(name, H)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_host_callbacks(rng):
    """A pure_callback is opaque to every analysis, without a warning: under a custom_jvp its rule is
    differentiated; where JAX cannot differentiate it, JAX's own error comes, strict or not (no PlanError)."""
    x = randn(rng, (5,))

    @jax.custom_jvp
    def host_sin(a):
        return jax.pure_callback(np.sin, jax.ShapeDtypeStruct(a.shape, a.dtype), a)

    host_sin.defjvp(lambda p, t: (host_sin(p[0]), jnp.cos(p[0]) * t[0]))

    def f(x):
        shifted = jax.pure_callback(np.cos, jax.ShapeDtypeStruct(x.shape, x.dtype), jax.lax.stop_gradient(x))
        return host_sin(x) * x[::-1] + shifted

    want = jax.jacfwd(f)(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_allclose(jacobians.jacobian(f)(x), want, rtol=1e-12)
        np.testing.assert_allclose(jacobians.sparse_jacobian(f, output="dense")(x), want, rtol=1e-12)
        pattern = np.asarray(jacobians.sparsity(f, x).to_dense())
    np.testing.assert_array_equal(pattern, np.eye(5, dtype=bool) | np.eye(5, dtype=bool)[::-1])

    def g(x):  # a callback with a tangent: JAX cannot differentiate it
        return jax.pure_callback(np.cos, jax.ShapeDtypeStruct(x.shape, x.dtype), x) * x

    for strict in (True, False):
        with jacobians.strict(strict), pytest.raises(ValueError, match="(?i)callbacks do not support JVP"):
            jacobians.jacobian(g)(x)


@pytest.mark.parametrize("name", ["jacobian", "compressed", "sparse_jacobian", "divergence"])
def test_a_rule_jax_has_only_in_part_gives_jax_s_error(name):
    """scatter-mul with repeated indices: JAX has no JVP; its error comes, strict or not, no PlanError."""
    x = jnp.arange(1.0, 7.0)
    f = lambda x: (1.0 + x).at[np.array([0, 2, 2, 5, 0, 1])].mul(x[::-1])  # noqa: E731
    call = {"jacobian": lambda: jacobians.jacobian(f)(x),
            "compressed": lambda: jacobians.jacobian(f, method="compressed")(x),
            "sparse_jacobian": lambda: jacobians.sparse_jacobian(f, output="dense")(x),
            "divergence": lambda: jacobians.divergence(f)(x)}[name]
    for strict in (True, False):
        with jacobians.strict(strict), warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(NotImplementedError, match="only implemented if `unique_indices=True`"):
                call()
