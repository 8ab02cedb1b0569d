"""The planner's unit of cost: FLOPs of products and convolutions, element counts elsewhere."""

import math

from . import _compat

# Predicates and selects: XLA fuses them into the loop of the arithmetic they guard (a compare and a
# blend per element; a broadcast scalar is a register), so a guarded product
# (``where(a == 0, 0, c * a)``) costs what the product costs.
FREE = frozenset({"reshape", "select_n", "eq", "ne", "lt", "le", "gt", "ge"})


def eqn_cost(eqn) -> float:
    """One equation's cost (its nested jaxprs' included; a reshape is free: XLA makes it a bitcast)."""
    name = eqn.primitive.name
    if name in FREE or (name == "broadcast_in_dim" and math.prod(eqn.invars[0].aval.shape) == 1):
        return 0.0  # (a scalar's broadcast is a constant in the fused loop)
    out = sum(math.prod(v.aval.shape) for v in eqn.outvars)
    if name == "dot_general":
        (lc, _), _ = eqn.params["dimension_numbers"]
        return 2.0 * out * math.prod(eqn.invars[0].aval.shape[i] for i in lc)
    if name == "conv_general_dilated":
        rhs = eqn.invars[1].aval.shape
        return 2.0 * out * math.prod(rhs) / max(rhs[0], 1)
    return out + sum(pass_cost(s) for s in _compat.jaxprs_in_params(eqn.params))


def pass_cost(closed) -> float:
    """One evaluation's cost from a closed or open jaxpr (at least 1).

    Nested jaxprs (a ``jit``, ``cond``'s branches, a loop body) are open and may
    have constants of their own (a closure), which cost nothing here.
    """
    return max(sum(eqn_cost(e) for e in _compat.unclose(closed)[0].eqns), 1.0)
