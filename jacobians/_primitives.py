"""The primitive catalogue: what every analysis needs to know about a JAX primitive, written once.

The dependency lattice (:mod:`._deps`), the Hessian lattice
(:mod:`._deps._second`), the structured sweeps (:mod:`._sweeps`) and the
Taylor-mode Laplacian (:mod:`._taylor`) read their primitive facts from here,
so one primitive cannot be linear in one analysis and nonlinear in another.
Each analysis then maps families to its own rules.

Families:

- ``HOST_CALLS``: host callbacks, opaque (each output depends on every operand);
- ``ZERO``: a derivative that vanishes wherever it exists (``floor``, comparisons, bit ops);
- ``ELEMENTWISE``: differentiable element-wise primitives (NumPy broadcasting of size-1 axes of their
  numeric operands; ``random_gamma``'s PRNG key, of the output's leading batch shape or ``()``, carries no
  derivative and does not broadcast that way: rules must skip operands that are not numbers);
  ``SIGNS`` the linear ones with their constant partials; ``HOLOMORPHIC`` those whose
  derivative on complex values is multiplication by a complex number;
- ``IDENTITIES``: placement and scheduling (each result is its own operand);
- ``MOVES``: data movement and indexing, each output element a copy of one input
  element or a fill, with the positions of the operands whose data moves (the
  others are indices or shapes); ``SELECTIONS`` adds ``select_n``;
- ``SCATTERS``; ``REDUCTIONS``; ``CUMULATIVE``;
- ``LINEAR`` / ``PIECEWISE_LINEAR``: no second derivative (the Hessian lattice and the
  forward Laplacian skip their second order; ``abs`` only on real operands).
"""

ELEMENTWISE = tuple(
    "neg sin cos tan asin acos atan sinh cosh tanh asinh acosh atanh exp exp2 log log1p expm1 "
    "sqrt rsqrt cbrt abs logistic erf erfc erf_inv lgamma digamma polygamma igamma igammac "
    "igamma_grad_a random_gamma random_gamma_grad bessel_i0e bessel_i1e zeta regularized_incomplete_beta "
    "square add add_any sub div rem max min atan2 conj real imag complex clamp "
    "one_minus_square log2 polynomial "  # JAX >= 0.11: 1 - x^2 (tanh's derivative), log2, Horner (x, *coeffs)
    "convert_element_type reduce_precision copy copy_p".split()
)
ZERO = tuple(
    "floor ceil round sign stop_gradient is_finite nextafter eq ne lt le gt ge and or not xor "
    "eq_to lt_to le_to "  # total-order comparisons (JAX >= 0.10: jax.scipy.linalg.expm's, sorts')
    "population_count clz shift_left shift_right_logical shift_right_arithmetic mulhi "
    "bitcast_convert_type".split()  # JAX's JVP of a bit reinterpretation is zero
)
# Host callbacks: JAX has no derivative for them (a custom_jvp around one gives it its rule), so every
# analysis takes each output to depend on all operands; it is no missing rule, and no warning is given.
HOST_CALLS = ("pure_callback", "io_callback")
# Element-wise products and powers: their rules look at known zero factors and exponents.
PRODUCTS = ("mul", "integer_pow", "pow")
# Linear element-wise primitives and their constant partials, per operand.
SIGNS = {"add": (1, 1), "add_any": (1, 1), "sub": (1, -1), "neg": (-1,), "copy": (1,), "copy_p": (1,),
         "convert_element_type": (1,)}
HOLOMORPHIC = frozenset(
    "neg sin cos tan sinh cosh tanh asin acos atan asinh acosh atanh exp exp2 log log1p expm1 sqrt rsqrt "
    "square one_minus_square log2 polynomial add add_any sub mul div integer_pow pow logistic select_n copy "
    "copy_p".split()
)
IDENTITIES = ("optimization_barrier", "sharding_constraint", "device_put", "mesh_cast", "reshard",
              "name")  # jax.ad_checkpoint.checkpoint_name's tag
# primitive -> positions of the operands whose data moves (None: all of them).
MOVES = {
    "reshape": (0,),
    "transpose": (0,),
    "broadcast_in_dim": (0,),
    "squeeze": (0,),
    "expand_dims": (0,),
    "slice": (0,),
    "rev": (0,),
    "tile": (0,),
    "split": (0,),
    "unstack": (0,),
    "concatenate": None,
    "stack": None,
    "dynamic_slice": (0,),
    "dynamic_update_slice": (0, 1),
    "gather": (0,),
    "pad": (0,),
}
SELECTIONS = frozenset(MOVES) | {"select_n"}  # every output element one input element's (or a constant)
SCATTERS = ("scatter", "scatter-add", "scatter_add", "scatter-mul", "scatter_mul", "scatter-min",
            "scatter_min", "scatter-max", "scatter_max", "scatter-sub", "scatter_sub")
REDUCTIONS = ("reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and", "reduce_or",
              "reduce_xor", "argmax", "argmin")
CUMULATIVE = ("cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp")

LINEAR = frozenset(MOVES) | frozenset(IDENTITIES) | {
    "scatter", "scatter-add", "scatter_add", "scatter-sub", "scatter_sub", "add", "add_any", "sub", "neg",
    "convert_element_type", "reduce_precision", "copy", "copy_p", "real", "imag", "complex", "conj", "reduce_sum",
    "cumsum", "select_n", "optimization_barrier", "transpose", "stop_gradient", "fft", "reduce_window_sum",
}  # fmt: skip
PIECEWISE_LINEAR = frozenset({
    "abs", "max", "min", "clamp", "rem", "sort", "top_k", "approx_top_k", "reduce_max", "reduce_min", "cummax",
    "cummin", "argmax",
    "argmin", "scatter-min", "scatter_min", "scatter-max", "scatter_max", "reduce_window_max", "reduce_window_min",
    "select_and_gather_add", "select_and_scatter_add",  # linear in their first operand, the second only selects
}) | frozenset(ZERO)  # fmt: skip

# Every primitive the catalogue names (the conformance suite covers each: tests/test_conformance.py).
ALL = frozenset(ELEMENTWISE) | frozenset(ZERO) | frozenset(PRODUCTS) | frozenset(SIGNS) | frozenset(IDENTITIES) | (
    frozenset(MOVES) | frozenset(SCATTERS) | frozenset(REDUCTIONS) | frozenset(CUMULATIVE) | LINEAR | PIECEWISE_LINEAR
    | HOLOMORPHIC | frozenset(HOST_CALLS))


def applies_function(eqn) -> bool:
    """A ``scatter`` whose written elements are a function of the operand's (``x.at[i].apply(f)``), not the updates.

    JAX stages ``.apply`` as the ``scatter`` of ``.set`` with an ``update_jaxpr`` of its own: it is neither a
    selection nor linear, whatever its name says.
    """
    if eqn.primitive.name != "scatter":
        return False
    update = eqn.params.get("update_jaxpr")
    if update is None:
        return False
    update = getattr(update, "jaxpr", update)
    # ``.set``'s own update function, where a JAX states one: ``lambda x, y: y``.
    return not (not update.eqns and len(update.invars) == 2 and list(update.outvars) == [update.invars[1]])
