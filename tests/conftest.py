import os
import shutil
import tempfile
import zlib

import jax
import numpy as np
import pytest
from hypothesis import settings

# The suite runs strict: an analysis that fails, or a plan that fails its certificate, is a PlanError here
# instead of a PlanWarning and the dense method (JACOBIANS_STRICT=0 turns it off to debug). Set before any
# test imports jacobians; subprocess tests inherit it.
os.environ.setdefault("JACOBIANS_STRICT", "1")

# Test programs are tiny and compiled once: LLVM's cheapest code generation (the same numbers, a few percent
# slower to run) takes about 15% off the suite's time, most of which is XLA compiling. Subprocesses inherit it.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

# CI runs the same examples every time (a red run must be reproducible);
# local runs explore new ones.
settings.register_profile("ci", derandomize=True, deadline=None)
if os.environ.get("CI"):
    settings.load_profile("ci")

# One XLA compilation cache per test process (each xdist worker its own: JAX writes cache files without
# a lock, so a shared folder could be read half-written), removed when the process ends: a program that
# another test or a fresh closure already compiled to the same HLO is loaded instead of compiled again.
# Nothing is kept between runs. Subprocess tests do not use it.
_CACHE_DIR = tempfile.mkdtemp(prefix="jacobians-test-xla-cache-")
jax.config.update("jax_compilation_cache_dir", _CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def pytest_unconfigure(config):
    shutil.rmtree(_CACHE_DIR, ignore_errors=True)


jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")
# float32 tests compare with float64 references: on GPUs XLA's default matmul and convolution precision is
# TF32 (10 mantissa bits), for JAX's own transformations and ours alike, which no float32 tolerance here allows.
if jax.default_backend() != "cpu":
    jax.config.update("jax_default_matmul_precision", "highest")


# Tests that start a fresh Python and JAX in a subprocess run first: the longest single tests, they
# then overlap the rest of the run instead of ending it on one worker.
_FIRST = (
    "tests/test_packaging.py::test_wheel",
    "tests/test_mesh.py::",
    "tests/test_bench.py::test_quick_run",
    "tests/test_docs.py::test_docstring",
)


# The default leg (README's command) has 4 minutes on 2 cores: the longest tests (1.4-6 s each, measured with
# --durations on a 2-core machine; integration tests whose properties smaller tests also check) run in
# the `slow` leg of .ci/run with the multi-process ones. `pytest -m slow` runs them.
_SLOW = frozenset({
    "test_trust.py::test_jax_debug_modes_see_the_users_computations_not_the_checks",
    "test_laplacian.py::test_a_quadratic_form_at_an_infinite_input[sparse]",
    "test_laplacian.py::test_an_infinite_partial_stays_in_its_entry[sparse]",
    "test_laplacian.py::test_families[reductions]",
    "test_laplacian.py::test_families[movement]",
    "test_laplacian.py::test_families[scan_fori]",
    "test_sparse_hessian.py::test_products_add_no_squares_they_cannot_make[cumprod_reverse_rows]",
    "test_sparse_hessian.py::test_products_are_computed_apart_from_the_gather[rosenbrock-40]",
    "test_solvers.py::test_untransposable_linear_solve_takes_forward_mode[hessian_diagonal]",
    "test_detection.py::test_tridiagonal_solve_keeps_columns_apart",
    "test_detection.py::test_cholesky_pattern_is_sound_and_triangular[True]",
    "test_detection.py::test_traced_indices_take_the_union_over_their_values[batched_solve]",
    "test_gradcheck.py::test_complex_x_holomorphic",
    "test_gradcheck.py::test_python_control_flow",
    "test_memory.py::test_over_budget_skips_the_planned_program",
    "test_sparse.py::test_small_products_fold_their_seeds",
    "test_det.py::test_kernel_half_precision_gradient_above_the_looped_lu[float16]",
    "test_det.py::test_kernel_without_exchanges_is_exact",
    "test_siblings.py::test_complex_outputs_of_real_inputs_go_forward",
    "test_flows.py::test_a_program_xla_cannot_compile_falls_back_to_dense",
    "test_jacobian.py::test_a_barrier_on_data_bars_no_direction",
    "test_trace.py::test_xtrace_is_exact_below_half_the_probes[rademacher]",
    "test_trace.py::test_xtrace_with_probes_equal_up_to_sign",
    "test_laplacian.py::test_families[div]",
    "test_laplacian.py::test_families[logsumexp]",
    "test_laplacian.py::test_families[math]",
    "test_laplacian.py::test_sparse_per_node",
    "test_laplacian.py::test_pytree_and_argnums",
    "test_laplacian.py::test_custom_vjp_inside_a_scan[forward]",
    "test_jacobian.py::test_empty_leaves_beside_others[auto]",
    "test_jacobian.py::test_allow_int_holds_integer_leaves_fixed[auto]",
    "test_hessian.py::test_hessian_matches_jax[1-fwd_rev]",
    "test_trust.py::test_a_planned_program_xla_cannot_compile_gives_the_dense_one",
    "test_identities.py::test_gram",
    "test_pipeline.py::test_first_traced_under_jit_then_called_directly[sparse_hessian]",
    "test_detection.py::test_a_dense_rule_counts_as_dense_past_its_cap",
    "test_detection.py::test_scatter_apply_is_a_function_of_the_operand",
    "test_sparse_hessian.py::test_products_are_computed_apart_from_the_gather[grid_energy-36]",
    "test_pipeline.py::test_a_weakly_typed_first_call_leaves_later_calls_their_types[hessian]",
    "test_pipeline.py::test_first_traced_under_jit_then_called_directly[log_abs_det]",
    "test_pipeline.py::test_first_traced_under_jit_then_called_directly[laplacian]",
    "test_pipeline.py::test_first_traced_under_jit_then_called_directly[hessian_diagonal]",
    "test_pipeline.py::test_first_traced_under_jit_then_called_directly[hessian]",
    "test_pipeline.py::test_first_traced_under_jit_then_called_directly[sparse_jacobian]",
    "test_laplacian.py::test_an_infinite_partial_stays_in_its_entry[forward]",
    "test_siblings.py::test_a_map_singular_everywhere_passes_its_certificate",
    "test_det.py::test_kernel_gradient_equals_jnp[3]",
    "test_hessian.py::test_hvp_errors_and_fast_path",
    "test_laplacian.py::test_families[dot_general]",
    "test_flows.py::test_a_wrong_sweep_for_a_dense_map_fails_the_certificate",
    "test_det.py::test_kernel_matches_references[12-auto]",
    "test_flows.py::test_a_dense_map_takes_its_jacobian_by_one_structured_sweep",
    "test_second_trust.py::test_an_unsymmetric_jax_hessian_is_followed",
    "test_laplacian.py::test_a_custom_rule_that_is_not_its_primals_derivative",
    "test_laplacian.py::test_a_quadratic_form_at_an_infinite_input[forward]",
    "test_solvers.py::test_untransposable_linear_solve_takes_forward_mode[fwd_fwd]",
    "test_jacobian.py::test_untransposable_max_pool_takes_forward_mode[negative padding]",
    "test_structured.py::test_layers_with_free_axes_gather_instead_of_multiplying[rev]",
    "test_solvers.py::test_untransposable_linear_solve_takes_forward_mode[sparse_hessian]",
    "test_sparse_hessian.py::test_modes_and_chunks_equal_jax_hessian[fwd_fwd-None]",
    "test_flows.py::test_coupling_scale_in_log_space[div]",
    "test_hessian.py::test_value_grad_hessian_and_hvp",
    "test_sparse_hessian.py::test_transcendental_hessian_programs_follow_the_platform[gpu]",
    "test_sparse.py::test_dense_results_read_off_the_compressed_products[rev]",
    "test_jacobian.py::test_untransposable_max_pool_takes_forward_mode[dilated]",
    "test_hessian.py::test_a_structured_program_xla_cannot_compile_gives_the_hvps",
    "test_pipeline.py::test_sparse_pytree_blocks_are_bcoo",
    "test_pipeline.py::test_check_finds_a_missed_entry[rev]",
    "test_sparse.py::test_float32",
    "test_detection.py::test_detection_inside_jit",
    "test_movement_trust.py::test_gathers_and_scatters_patterns_are_sound",
    "test_sparse.py::test_dense_results_read_off_the_compressed_products[fwd]",
    "test_hessian.py::test_gauss_newton_materialise_custom_vjp",
    "test_laplacian.py::test_complex_output",
    "test_sparse_hessian.py::test_transcendental_hessian_programs_follow_the_platform[cpu]",
    "test_memory.py::test_hessian_and_batch_jacobian_under_a_budget",
    "test_solvers.py::test_untransposable_linear_solve_takes_forward_mode[hessian]",
    "test_sparse_hessian.py::test_modes_and_chunks_equal_jax_hessian[rev_rev-2]",
    "test_detection.py::test_random_gamma_is_elementwise_in_its_shape",
    "test_memory.py::test_divergence_under_a_budget",
    "test_det.py::test_kernel_repeated_rows_are_exactly_singular[4]",
    "test_sparse_hessian.py::test_a_hessian_at_rounding_level_is_certified",
    "test_sparse_hessian.py::test_modes_and_chunks_equal_jax_hessian[rev_fwd-3]",
    "test_laplacian.py::test_custom_vjp_inside_a_scan[auto]",
    "test_det.py::test_slogdet_results_are_named_like_jnp",
    "test_det.py::test_kernel_under_vmap[7]",
    "test_movement_trust.py::test_structured_sweeps_dtype_and_mode_table[indexing_rules_control-rev]",
    "test_movement_trust.py::test_structured_sweeps_dtype_and_mode_table[dtypes_and_piecewise-rev]",
    "test_sparse_hessian.py::test_scipy_output_inside_jit_raises",
    "test_jacobian.py::test_chunk_sizes_all_agree",
    "test_identities.py::test_det_gradient_exact_cases",
    "test_flows.py::test_coupling_scale_in_log_space[mul]",
    "test_det.py::test_kernel_matches_references[4-auto]",
    "test_identities.py::test_quadratic_forms",
    "test_flows.py::test_values_computed_in_one_stage_serve_later_stages",
    "test_sparse_hessian.py::test_scipy_outputs_equal_dense",
    "test_det.py::test_kernel_matches_references[5-auto]",
    "test_movement_trust.py::test_f_order_reshape_per_example_batch",
    "test_layout.py::test_orders_are_numpys_reshapes",
    "test_det.py::test_kernel_flags_redone_per_chunk",
    "test_batch.py::test_per_example_gather_scatter_and_solve_proved",
    "test_coloring.py::test_random_round_trips",
    "test_compat.py::test_jacobian_of_jacobian",
    "test_contract.py::test_chain_equals_jacobian_of_composition",
    "test_contract.py::test_matvec_vecmat_are_jvp_vjp",
    "test_det.py::test_batched_dense_plan_in_chunks",
    "test_det.py::test_batched_matches_numpy_loop[16]",
    "test_det.py::test_kernel_hessian_through_scan",
    "test_det.py::test_kernel_matches_references[16-auto]",
    "test_det.py::test_kernel_matches_references[9-auto]",
    "test_det.py::test_kernel_mixed_batches_and_shapes",
    "test_det.py::test_kernel_under_vmap[3]",
    "test_docs.py::test_docstring_examples_run",
    "test_flows.py::test_batch_first_reads_per_example_structure",
    "test_flows.py::test_certificate_catches_wrong_plans",
    "test_flows.py::test_custom_vjp_takes_the_reverse_route",
    "test_flows.py::test_flow_layers[coupling]",
    "test_flows.py::test_flow_layers[glow]",
    "test_flows.py::test_flow_layers[made]",
    "test_flows.py::test_gradients_through_exactly_zero_factors_are_finite",
    "test_flows.py::test_second_derivatives_every_path",
    "test_gradcheck.py::test_each_dtype_gets_its_own_defaults",
    "test_gradcheck.py::test_float32_defaults",
    "test_gradcheck.py::test_half_precision_has_its_own_defaults[bfloat16]",
    "test_gradcheck.py::test_half_precision_has_its_own_defaults[float16]",
    "test_hessian.py::test_hessian_holomorphic[auto]",
    "test_identities.py::test_det_gradient_at_singular_matrices",
    "test_identities.py::test_inverse_family",
    "test_identities.py::test_linear_maps",
    "test_laplacian.py::test_families[linalg]",
    "test_laplacian.py::test_has_aux_vmap_jit_chunks",
    "test_layout.py::test_commutation_matrix",
    "test_memory.py::test_laplacian_under_a_budget",
    "test_memory.py::test_sparse_engines_under_a_budget",
    "test_memory.py::test_the_chunk_size_that_fits",
    "test_movement_trust.py::test_gathers_and_scatters_structured[fwd]",
    "test_movement_trust.py::test_gathers_and_scatters_structured[rev]",
    "test_movement_trust.py::test_structured_holomorphic",
    "test_movement_trust.py::test_structured_sweeps_dtype_and_mode_table[dtypes_and_piecewise-fwd]",
    "test_movement_trust.py::test_structured_sweeps_dtype_and_mode_table[indexing_rules_control-fwd]",
    "test_movement_trust.py::test_structured_sweeps_dtype_and_mode_table[where_and_orders-fwd]",
    "test_movement_trust.py::test_structured_sweeps_dtype_and_mode_table[where_and_orders-rev]",
    "test_pipeline.py::test_check_finds_a_missed_entry[fwd]",
    "test_pipeline.py::test_into_reuses_the_donated_result",
    "test_pipeline.py::test_new_shapes_of_a_compiled_structure_plan_and_check_again",
    "test_pipeline.py::test_typed_prng_keys_ride_along",
    "test_second_trust.py::test_hessian_pattern_sound[cholesky_triangular_solve]",
    "test_siblings.py::test_determinants_take_the_pipeline",
    "test_siblings.py::test_estimators_unbiased_with_honest_errors",
    "test_siblings.py::test_log_volume",
    "test_solvers.py::test_custom_vjp_and_while_loop_through_every_fallback",
    "test_solvers.py::test_ode_jacobians[jacobian]",
    "test_solvers.py::test_ode_second_order[hessian]",
    "test_solvers.py::test_ode_second_order[hvp]",
    "test_sparse_hessian.py::test_auto_colouring_counts_decompression",
    "test_sparse_hessian.py::test_float32_stays_float32",
    "test_sparse_hessian.py::test_modes_and_chunks_equal_jax_hessian[fwd_rev-2]",
    "test_sparse_hessian.py::test_plan_compressed_matrix_and_decompression",
    "test_structured.py::test_generic_rules_charge_their_passes_before_tracing",
    "test_structured.py::test_hessian_through_a_structured_sweep_of_the_gradient",
    "test_structured.py::test_layers_with_free_axes_gather_instead_of_multiplying[fwd]",
    "test_structured.py::test_pytrees_argnums_aux_and_float32",
    "test_structured.py::test_random_compositions_agree_with_jacfwd",
    "test_trace.py::test_complex_holomorphic_traces",
    "test_trace.py::test_seeds_next_to_closed_over_weights_are_not_constant_folded",
    "test_trace.py::test_xtrace_unbiased_with_honest_errors_and_better_than_hutch_pp",
    "test_trust.py::test_a_loaded_plan_for_another_function_is_certified",
    "test_trust.py::test_complex_outputs_of_real_inputs",
    "test_trust.py::test_given_patterns_are_certified",
    "test_trust.py::test_wrong_pattern_fails_its_certificate",
    "test_trust.py::test_wrong_structured_sweeps_fail_their_certificates",
})


def pytest_collection_modifyitems(config, items):
    def rank(item):
        return next((i for i, prefix in enumerate(_FIRST) if item.nodeid.startswith(prefix)), len(_FIRST))

    for item in items:
        if item.nodeid.removeprefix("tests/") in _SLOW:
            item.add_marker(pytest.mark.slow)
    items.sort(key=rank)  # stable: the rest keep their order


@pytest.fixture
def rng(request):
    """A NumPy generator seeded from the test's name: fresh, varied, reproducible."""
    seed = zlib.crc32(request.node.nodeid.encode())  # stable across processes, unlike hash()
    return np.random.default_rng(seed)
