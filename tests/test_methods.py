"""The engine seam: a new Jacobian method is one class and one registration (README, "Design")."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import randn

import jacobians
from jacobians import _methods, _planner, _trust
from jacobians._deps import TooDense
from jacobians._methods import Call, Candidate


class Diagonal:
    """The README's example: a Jacobian the pattern proves diagonal, by one JVP of the ones vector."""

    name, margin = "diagonal", 1.0

    def candidates(self, ctx):
        if ctx.detect is None or ctx.n != ctx.m:
            return []
        try:
            det = ctx.detect(ctx.n)  # stops once any value holds more than n entries
        except TooDense:
            return []
        if not np.array_equal(det.pattern.rows, det.pattern.cols):
            return []
        return [Candidate(self, "fwd", 1, ctx.f * 1.1)]

    def evaluate(self, cand, call):
        p = call.problem
        _, d = jax.jvp(lambda x: p.flat(x)[0], (p.x,), (jnp.ones_like(p.x),))
        return jnp.diag(d), None

    def certify(self, cand, traced_flat, values, where, computed=None):
        return _trust.linear(traced_flat, values, lambda p: self.evaluate(cand, Call(p))[0], mode="fwd", where=where,
                             computed=computed)


class Wrong(Diagonal):
    """The same method with a wrong evaluation: its certificate must catch it."""

    name = "wrong"

    def candidates(self, ctx):
        return [Candidate(self, "fwd", 1, 1.0)] if ctx.n == ctx.m else []

    def evaluate(self, cand, call):
        jac, aux = super().evaluate(cand, call)
        return jac * 2.0, aux


def test_a_registered_method_is_planned_evaluated_and_certified(monkeypatch, rng):
    monkeypatch.setattr(_methods, "METHODS", (*_methods.METHODS, Diagonal()))
    f = lambda x: jnp.sin(x) * x  # noqa: E731
    x = randn(rng, (40,))
    plan = jacobians.explain(f, x)
    assert (plan.method, plan.passes) == ("diagonal", 1), str(plan)
    assert plan.certificate.status == "passed" and "diagonal fwd" in str(plan)
    np.testing.assert_allclose(jacobians.jacobian(f)(x), jax.jacfwd(f)(x), rtol=1e-13)
    g = lambda x: jnp.sin(x) * x[::-1]  # noqa: E731 - not diagonal: the method offers nothing
    assert jacobians.explain(g, x).method != "diagonal"


def test_a_wrong_method_never_reaches_the_user(monkeypatch, rng):
    monkeypatch.setattr(_methods, "METHODS", (*_methods.METHODS, Wrong()))
    f = lambda x: jnp.tanh(x) + 1.0  # noqa: E731
    x = randn(rng, (12,))
    with jacobians.strict(False), pytest.warns(jacobians.PlanWarning, match="wrong fwd plan failed its certificate"):
        got = jacobians.jacobian(f)(x)
    np.testing.assert_allclose(got, jax.jacfwd(f)(x), rtol=1e-13)
    with pytest.raises(jacobians.PlanError, match="wrong fwd plan failed its certificate"):
        jacobians.jacobian(f)(x)


class Rounded(Diagonal):
    """The right diagonal, computed as a program that rounds one step differently would (a few ulps off)."""

    name = "rounded"

    def candidates(self, ctx):
        return [Candidate(self, "fwd", 1, 1.0)] if ctx.n == ctx.m else []

    def evaluate(self, cand, call):
        p = call.problem
        x = p.x * (1 + 2 * jnp.finfo(p.x.dtype).eps)
        _, d = jax.jvp(lambda x: p.flat(x)[0], (x,), (jnp.ones_like(x),))
        return jnp.diag(d), None


class HalfWrong(Rounded):
    """Right (to rounding) on the chaotic half of :func:`_half_chaotic`, twice too large on its linear half."""

    name = "halfwrong"

    def evaluate(self, cand, call):
        jac, aux = super().evaluate(cand, call)
        return jac * jnp.where(jnp.arange(jac.shape[0]) >= 6, 2.0, 1.0)[:, None], aux


def _half_chaotic(x):
    return jnp.concatenate([_chaotic(x[:6]), 3.0 * x[6:]])


def _chaotic(x):
    """45 steps of the logistic map at r = 3.9 (Lyapunov exponent ~0.5): rounding grows about 1e9-fold."""
    c = jax.nn.sigmoid(x)
    for _ in range(45):
        c = 3.9 * c * (1 - c)
    return c


@pytest.mark.parametrize("method", [Rounded, Wrong, HalfWrong])
def test_a_chaotic_map_is_judged_within_its_conditioning(monkeypatch, rng, method):
    # A plan that rounds differently from JAX parts from it as far as JAX parts from itself a few ulps away
    # (a scan recurrence near 1e10 parted by 2.6e-7, and strict mode raised): it stands. A wrong plan does not.
    monkeypatch.setattr(_methods, "METHODS", (*_methods.METHODS, method()))
    x = randn(rng, (12,))
    if method is Wrong:
        with pytest.raises(jacobians.PlanError, match="wrong fwd plan failed its certificate"):
            jacobians.jacobian(_chaotic)(x)
        return
    if method is HalfWrong:  # the chaotic half's allowance must not excuse the linear half's error
        with pytest.raises(jacobians.PlanError, match="halfwrong fwd plan failed its certificate"):
            jacobians.jacobian(_half_chaotic)(x)
        return
    plan = jacobians.explain(_chaotic, x)
    assert plan.method == "rounded" and plan.certificate.status == "passed", str(plan)


def test_directions_and_ranking():
    assert _methods.directions({"sin"}) == {"fwd", "rev"}
    assert _methods.directions({"custom_vjp_call"}) == {"rev"}
    assert _methods.directions({"while"}) == {"fwd"}
    assert _methods.directions({"while", "custom_vjp_call"}) == {"fwd", "rev"}  # neither: the call says why
    closed = jax.make_jaxpr(lambda x: jnp.tanh(x @ jnp.ones((6, 3))))(jnp.ones(6))
    plan = _planner.choose(closed, 6, 3, None, None)
    assert (plan.method, plan.mode, plan.passes) == ("dense", "rev", 3)
    assert set(plan.costs) == {"dense fwd", "dense rev"} and plan.costs["dense fwd"] == 2 * plan.costs["dense rev"]


def test_costs_count_what_is_paid(rng):
    # A reshape is a bitcast: free. A compressed plan fills the dense result's m n zeros before it
    # scatters its values (regression: uncounted, it beat the structured sweep of gram 48x48, which
    # writes the result once, at 2.9-3.7x its closed form's time against 1.07x).
    x = jnp.ones(6)
    plain = _methods.pass_cost(jax.make_jaxpr(lambda v: jnp.sin(v))(x))
    assert _methods.pass_cost(jax.make_jaxpr(lambda v: jnp.sin(v).reshape(2, 3).reshape(6))(x)) == plain
    v = randn(rng, (32,))
    plan = jacobians.explain(lambda v: jnp.sin(v) * v, v)
    assert plan.method == "compressed" and plan.costs[f"compressed {plan.mode}"] > 32 * 32, str(plan)
