"""One tree-aware allclose, a tolerance table keyed by dtype, and compiled reference Jacobians."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

TOL = {
    np.dtype("float32"): dict(rtol=2e-4, atol=2e-5),
    np.dtype("float64"): dict(rtol=1e-10, atol=1e-12),
    np.dtype("complex64"): dict(rtol=2e-4, atol=2e-5),
    np.dtype("complex128"): dict(rtol=1e-10, atol=1e-12),
}


def assert_tree_allclose(actual, expected, **tol):
    """Same structure, shapes and dtypes; every element close (tolerance from the dtype)."""
    sa, se = jax.tree_util.tree_structure(actual), jax.tree_util.tree_structure(expected)
    assert sa == se, f"structure {sa} != {se}"
    for a, e in zip(jax.tree_util.tree_leaves(actual), jax.tree_util.tree_leaves(expected)):
        a, e = np.asarray(a), np.asarray(e)
        assert a.shape == e.shape, f"shape {a.shape} != {e.shape}"
        assert a.dtype == e.dtype, f"dtype {a.dtype} != {e.dtype}"
        np.testing.assert_allclose(a, e, **(tol or TOL.get(a.dtype, dict(rtol=0, atol=0))))


def randn(rng, shape, dtype=jnp.float64):
    """Fresh standard-normal draws (never zeros), as a JAX array."""
    return jnp.asarray(rng.standard_normal(shape), dtype=dtype)


@functools.cache
def _compiled_reference(case):
    return jax.jit(jax.jacfwd(case.fun) if case.fwd else jax.jacrev(case.fun))


def reference(case, x):
    """``case.reference(x)`` (JAX's dense Jacobian) under one ``jax.jit``: one compile per case.

    Run eagerly, jacfwd/jacrev compile every primitive on its own (hundreds of small compiles
    across the registry); the values are JAX's either way.
    """
    return _compiled_reference(case)(x)


def bcoo_to_dense(m):
    """A ``BCOO``'s dense value assembled in NumPy (duplicates summed, as ``todense`` does).

    ``BCOO.todense()`` runs a dozen small eager ops, each compiled anew for every number of stored
    entries; the registry has a different one per case.
    """
    assert m.n_batch == 0 and m.n_dense == 0, (m.n_batch, m.n_dense)
    idx, data = np.asarray(m.indices), np.asarray(m.data)
    keep = np.all(idx < np.asarray(m.shape), axis=1)  # out-of-range indices are padding, dropped by todense
    out = np.zeros(m.shape, data.dtype)
    np.add.at(out, tuple(idx[keep].T), data[keep])
    return out


def failing_compile(monkeypatch) -> list:
    """Make a transformation's next program "fail to compile" as XLA's compiler does (a RET_CHECK).

    The call is traced and planned first (``jax.eval_shape``), then raises. Returns a list that holds
    ``True`` once the failure happened: clear it to arm the next call's failure again.
    """
    from jacobians import _args

    run, failed = _args.Transform.run, []

    def crashing(self, fn, traced):
        if not failed:
            failed.append(True)
            jax.eval_shape(fn, *traced)
            raise jax.errors.JaxRuntimeError("INTERNAL: RET_CHECK failure (fusion_compiler.cc:546) llvm_module")
        return run(self, fn, traced)

    monkeypatch.setattr(_args.Transform, "run", crashing)
    return failed
