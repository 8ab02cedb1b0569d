"""The corpus of real programs (:mod:`corpus`) through every public engine that applies.

Each program (jit-wrapped closures, nested transforms, ``jax.checkpoint``,
``lax.map``, ``vmap`` inside, straight-through estimators, Flax- and
Equinox-style modules, a CNN, attention, layer norm, an RK4 ODE, a
cross-entropy loss) is compared with ``jax.jacfwd``/``jax.jacrev``/
``jax.hessian`` engine by engine: the Jacobian engines (default, forward,
reverse, structured sweeps, compressed, sparse), the Hessians of scalar
programs, ``gauss_newton``'s diagonal and matrix, and where they apply
``divergence``, ``log_abs_det`` and ``batch_jacobian`` (which must refuse a
coupled batch). The default run samples (:data:`SAMPLE`: every program through one
engine); ``JACOBIANS_CONFORMANCE=full`` runs every applicable engine.
"""

import os
import sys

import jax

if __name__ == "__main__":  # the corpus makes its constants at import: float64 from the start
    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_numpy_rank_promotion", "raise")
    jax.config.update("jax_numpy_dtype_promotion", "strict")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import corpus  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import jacobians  # noqa: E402

FULL = os.environ.get("JACOBIANS_CONFORMANCE", "") == "full"

# Failures whose fixes belong to the engines' owners, keyed by (program, engine): strict, so a fix flips them.
KNOWN: dict[tuple[str, str], str] = {}


# The default run: every program once, through the engine it exercises most (the default ``jacobian``
# unless its kind brings a more specific one), in about 25 s of compiles on one core.
SAMPLE = {
    "jit_closed_over_params": "jacobian", "vmap_inside": "batch_jacobian", "lax_map_examples": "jacobian",
    "checkpointed_layers": "structured_rev", "scan_over_layers": "jacobian", "grad_inside": "jacobian",
    "jacobian_of_jit_closure": "jacobian", "quantised_mlp": "jacobian", "stop_gradient_ste": "structured_fwd",
    "gradient_reversal_layer": "jacobian", "flax_params": "jacobian", "flax_inputs": "batch_jacobian",
    "equinox_params": "jacobian", "equinox_call": "log_abs_det", "cnn_inputs": "jacobian",
    "causal_attention": "batch_jacobian", "batched_attention": "compressed", "layernorm": "batch_jacobian",
    "prenorm_residual": "log_abs_det_batch", "batchnorm_training": "batch_jacobian",
    "transformer_block": "jacobian", "rk4_fori_loop": "jacobian", "rk4_step_python_dt": "jacobian",
    "heat_equation_stencil": "divergence", "curve_fit_residuals": "gauss_newton_diagonal",
    "softmax_cross_entropy": "hessian", "flax_loss": "jacobian", "embedding_lookup": "sparse_jacobian",
    "dropout_inside_jit": "jacobian", "cnn_params": "gauss_newton_materialise", "jacfwd_inside": "jacobian",
    "float32_mlp": "batch_jacobian",
}


def _pairs():
    if not FULL:
        return list(SAMPLE.items())
    return [(n, e) for n, p in corpus.PROGRAMS.items() for e in corpus.engines(p, corpus.args_of(n))]


def _params():
    return [pytest.param(n, e, id=f"{n}-{e}", marks=[pytest.mark.xfail(strict=True, reason=KNOWN[n, e])]
                         if (n, e) in KNOWN else []) for n, e in _pairs()]


@pytest.mark.parametrize("name, engine", _params())
def test_program(name, engine):
    problem = corpus.check(name, engine)
    assert problem is None, f"{name} / {engine}: {problem}"


def test_nested_jacobian_equals_jax(rng):
    """``jacobian(jacobian(f))`` (a nested jaxpr with constants inside) equals ``jax.jacfwd(jax.jacfwd(f))``."""
    A = jnp.asarray(rng.standard_normal((3, 4)))
    f = lambda x: jnp.tanh(A @ x) * x[0]  # noqa: E731
    x = jnp.asarray(rng.standard_normal(4))
    np.testing.assert_allclose(jacobians.jacobian(jacobians.jacobian(f))(x), jax.jacfwd(jax.jacfwd(f))(x),
                               rtol=1e-10, atol=1e-12)


def test_sample_covers_every_program():
    assert set(SAMPLE) == set(corpus.PROGRAMS) - {"jacobian_of_jacobian"}  # that one: test_nested_jacobian_equals_jax
    for n, e in SAMPLE.items():
        assert e in corpus.engines(corpus.PROGRAMS[n], corpus.args_of(n)), (n, e)


def test_every_program_has_its_engines():
    """The classification is what the programs are: scalars get Hessians, squares determinants, batches proofs."""
    kinds = {n: set(corpus.engines(p, corpus.args_of(n))) for n, p in corpus.PROGRAMS.items()}
    assert {"hessian", "sparse_hessian"} <= kinds["softmax_cross_entropy"]
    assert {"divergence", "log_abs_det"} <= kinds["rk4_fori_loop"]
    assert {"batch_jacobian", "log_abs_det_batch"} <= kinds["prenorm_residual"]
    assert "log_abs_det_batch" not in kinds["causal_attention"]
    assert len(corpus.PROGRAMS) >= 25


if __name__ == "__main__":
    import time

    FULL = "--full" in sys.argv  # python tests/test_corpus.py [--full] [NAME_SUBSTRING ...]
    names = [a for a in sys.argv[1:] if not a.startswith("--")]
    pairs = [(n, e) for n, e in _pairs() if not names or any(k in n for k in names)]
    t0, bad = time.time(), 0
    for n, e in pairs:
        problem = corpus.check(n, e)
        if problem is not None:
            bad += 1
            print(f"[{'known' if (n, e) in KNOWN else 'FAIL'}] {n} / {e}: {problem}", flush=True)
    print(f"{len(pairs)} (program, engine) pairs, {bad} failures, {time.time() - t0:.0f} s")
