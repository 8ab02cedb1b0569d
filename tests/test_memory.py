"""max_memory=: the chunk size that fits, from XLA's memory analysis of the compiled program."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import randn

import jacobians
from jacobians import _memory


def _pairwise(x):
    """R^n -> R^n with an (n, n) product per pass that XLA cannot fuse away."""
    d = jnp.tanh(x[:, None] - x[None, :])
    return (d @ d).sum(1) * x


def test_parse():
    assert _memory.parse(None, "w") is None
    assert _memory.parse("2GB", "w") == 2 * 10**9
    assert _memory.parse("512 MiB", "w") == 512 * 2**20
    assert _memory.parse(1000, "w") == 1000
    assert _memory.parse("1.5kb", "w") == 1500
    assert _memory.parse("1e9", "w") == _memory.parse(np.int64(10**9), "w") == _memory.parse(1e9, "w") == 10**9
    for bad in ("abc", "-1GB", 0, -5, "2 GBs", float("inf"), float("nan"), 0.5, "0.5B", np.ones(2)):
        with pytest.raises(ValueError, match=r"jacobians.x: max_memory must be a finite number of bytes \(at least 1\)"):
            _memory.parse(bad, "jacobians.x")
    with pytest.raises(TypeError, match="got a bool"):
        _memory.parse(True, "jacobians.x")


def test_the_chunk_size_that_fits(rng):
    x = randn(rng, (32,))
    full, out = _memory.measure(jacobians.jacobian(_pairwise, mode="fwd"), (x,), {})
    budget = full // 3
    jf = jacobians.jacobian(_pairwise, mode="fwd", max_memory=budget)
    np.testing.assert_allclose(jf(x), jax.jacfwd(_pairwise)(x), rtol=1e-10, atol=1e-10)
    plan = jf.plan(x)
    fit = plan.memory
    assert fit.chunk_size is not None and 1 <= fit.chunk_size < 32 and fit.bytes <= budget < full
    assert fit.bytes <= budget - _memory.reserve(budget)  # room left for what no program analysis counts
    assert "chunk_size=" in str(plan) and "by XLA's analysis" in str(plan)
    # The chosen program, measured again, is within the budget; everything at once was not.
    assert _memory.measure(jacobians.jacobian(_pairwise, mode="fwd", chunk_size=fit.chunk_size), (x,), {})[0] <= budget
    roomy = jacobians.jacobian(_pairwise, max_memory="1GB")
    assert roomy.plan(x).memory.chunk_size is None
    np.testing.assert_allclose(roomy(x), jax.jacfwd(_pairwise)(x), rtol=1e-10, atol=1e-10)


def test_largest_array():
    hlo = "%a = f32[19,400,3]{2,1,0} parameter(0)\n%b = (s32[], pred[7]) tuple()\n%c = bf16[2,2] add(%d, %e)"
    assert _memory.largest_array(hlo) == 4 * 19 * 400 * 3
    assert _memory.largest_array("%s = f64[] constant(1)") == 8


def test_over_budget_skips_the_planned_program(rng):
    """A budget the unplanned all-at-once program exceeds never plans (or compiles) the unchunked one.

    Regression: the unchunked program was measured first, and planning it (a structured-sweep cost
    model at n = 7449) held 1.2 GB of host memory under a 4 GB budget it could never meet.
    """
    def energy(x):
        d = jnp.tanh(x[:, None] - x[None, :])
        return jnp.sum(d @ d)

    x = randn(rng, (16,))
    full = _memory.measure(jacobians.hessian(energy, chunk_size=16), (x,), {})[0]
    tight = jacobians.hessian(energy, max_memory=full * 2 // 3).memory(x)
    assert None not in dict(tight.tried) and dict(tight.tried)[16] == full and tight.bytes <= full * 2 // 3
    roomy = jacobians.hessian(energy, max_memory=full * 4).memory(x)
    assert roomy.chunk_size is None and set(dict(roomy.tried)) == {16, None}
    # The margin: the program's largest array, within its bytes.
    assert 0 < roomy.largest < roomy.bytes and "largest array" in str(roomy)


def test_errors(rng):
    x = randn(rng, (32,))
    with pytest.raises(ValueError, match=r"jacobians.jacobian: the result alone takes .* over max_memory=1 kB"):
        jacobians.jacobian(_pairwise, max_memory=1000)(x)
    with pytest.raises(ValueError, match="give chunk_size or max_memory, not both"):
        jacobians.jacobian(_pairwise, chunk_size=4, max_memory="1GB")
    # No chunk size fits: the message gives the room a program may take, the budget less its reserve
    # (what one pass needs may lie between the two).
    one = _memory.measure(jacobians.jacobian(_pairwise, mode="fwd", chunk_size=1), (x,), {})[0]
    budget = one + _memory.reserve(one) // 2
    with pytest.raises(ValueError, match=r"no chunk size fits .* over the .* a program may take \(.* of the budget is "
                                         r"kept for what XLA's analysis does not count\)"):
        jacobians.jacobian(_pairwise, mode="fwd", max_memory=budget)(x)


@pytest.mark.parametrize("make", [jacobians.jacobian_matrix, jacobians.value_and_jacobian])
def test_every_chunked_transformation_takes_a_budget(make, rng):
    x = randn(rng, (32,))
    full = _memory.measure(make(_pairwise, mode="fwd"), (x,), {})[0]
    bounded = make(_pairwise, mode="fwd", max_memory=full // 3)
    out = bounded(x)
    np.testing.assert_allclose(out[1] if make is jacobians.value_and_jacobian else out,
                               jax.jacfwd(_pairwise)(x), rtol=1e-10, atol=1e-10)
    fit = bounded.memory(x)
    assert fit.chunk_size is not None and fit.bytes <= full // 3


def test_laplacian_under_a_budget(rng):
    def energy(x):  # a pairwise energy: its HVPs hold (n, n) products
        d = jnp.tanh(x[:, None] - x[None, :])
        return jnp.sum(d @ d)

    x = randn(rng, (16,))
    want = jnp.trace(jax.hessian(energy)(x))
    full = _memory.measure(jacobians.laplacian(energy, method="hvp"), (x,), {})[0]
    tight = jacobians.laplacian(energy, method="hvp", max_memory=full * 2 // 3)
    np.testing.assert_allclose(tight(x), want, rtol=1e-10)
    assert tight.plan(x).memory.chunk_size is not None and "max_memory" in str(tight.plan(x))


def test_divergence_under_a_budget(rng):
    x = randn(rng, (32,))
    want = jnp.trace(jax.jacfwd(_pairwise)(x))
    full = _memory.measure(jacobians.divergence(_pairwise, chunk_size=32), (x,), {})[0]
    div = jacobians.divergence(_pairwise, max_memory=full // 2)
    np.testing.assert_allclose(div(x), want, rtol=1e-10)
    assert div.memory(x).chunk_size is not None and div.memory(x).bytes <= full // 2


def test_hessian_and_batch_jacobian_under_a_budget(rng):
    def energy(x):
        d = jnp.tanh(x[:, None] - x[None, :])
        return jnp.sum(d @ d)

    x = randn(rng, (16,))
    full = _memory.measure(jacobians.hessian(energy), (x,), {})[0]
    h = jacobians.hessian(energy, max_memory=full * 2 // 3)
    np.testing.assert_allclose(h(x), jax.hessian(energy)(x), rtol=1e-10, atol=1e-10)
    assert h.memory(x).chunk_size is not None and h.memory(x).bytes <= full * 2 // 3
    X = randn(rng, (4, 16))
    bj = jacobians.batch_jacobian(jax.vmap(_pairwise), max_memory="1GB")
    np.testing.assert_allclose(bj(X), jax.vmap(jax.jacfwd(_pairwise))(X), rtol=1e-10, atol=1e-10)
    assert bj.memory(X).chunk_size is None


def test_sparse_engines_under_a_budget(rng):
    def chain(x):  # a banded Hessian; each colour's HVP holds an (n, n) product
        d = jnp.tanh(x[:, None] * x[None, :])
        return jnp.sum(jnp.diag(d @ d)) + jnp.sum(x[1:] * x[:-1])

    x = randn(rng, (16,))
    sh = jacobians.sparse_hessian(chain, output="dense", max_memory="1GB")
    np.testing.assert_allclose(sh(x), jax.hessian(chain)(x), rtol=1e-10, atol=1e-10)
    assert sh.memory(x).chunk_size is None
    sj = jacobians.sparse_jacobian(_pairwise, output="dense", max_memory="1GB")
    np.testing.assert_allclose(sj(x), jax.jacfwd(_pairwise)(x), rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="sparse_jacobian: give chunk_size or max_memory"):
        jacobians.sparse_jacobian(_pairwise, chunk_size=2, max_memory="1GB")
