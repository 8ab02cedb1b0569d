"""Rules for element-wise primitives (with NumPy broadcasting of size-1 axes).

An output element depends on the same-position elements of its operands.
Refinements keep patterns tight where the derivative is zero: a known zero
factor (``x * c`` with ``c[i] == 0``), ``x ** 0``, a known ``select_n``
predicate, and primitives whose derivative vanishes everywhere.
"""

import numpy as np

from .._primitives import ELEMENTWISE as NAMES
from .._primitives import IDENTITIES as IDENTITIES
from .._primitives import ZERO as ZERO
from ._sets import Deps, broadcast_to, empty, mask, union


def elementwise(lat, eqn, ins):
    """Union of the operands' sets, broadcast to the output.

    Example: ``add`` with sets [{0}, {1}] and [{2}, {3}] -> [{0, 2}, {1, 3}].
    Reads no parameters.
    """
    shape = eqn.outvars[0].aval.shape
    return [union([broadcast_to(d, shape) for d in ins if d.nnz], shape, lat.n)]


def zero(lat, eqn, ins):
    """No dependencies: ``floor(x)``, ``sign(x)``, comparisons have zero derivative."""
    return [empty(v.aval.shape) for v in eqn.outvars]


def mul(lat, eqn, ins):
    """``a * b``: where one factor is a known zero, the other's set is dropped.

    Example: sets [{0}, {1}] times the constant [2., 0.] -> [{0}, {}].
    """
    shape = eqn.outvars[0].aval.shape
    parts = []
    for d, other in ((ins[0], ins[1]), (ins[1], ins[0])):
        if not d.nnz:
            continue
        d = broadcast_to(d, shape)
        if other.const is not None and not other.nnz:
            d = mask(d, np.broadcast_to(np.asarray(other.const) != 0, shape))
        parts.append(d)
    return [union(parts, shape, lat.n)]


def integer_pow(lat, eqn, ins):
    """``x ** y`` for an integer parameter ``y``: no dependency when ``y == 0``."""
    return zero(lat, eqn, ins) if eqn.params["y"] == 0 else elementwise(lat, eqn, ins)


def pow_(lat, eqn, ins):
    """``x ** y``: the base's set is dropped where a known exponent is 0."""
    base, expo = ins
    shape = eqn.outvars[0].aval.shape
    parts = [broadcast_to(expo, shape)]
    if base.nnz:
        b = broadcast_to(base, shape)
        if expo.const is not None and not expo.nnz:
            b = mask(b, np.broadcast_to(np.asarray(expo.const) != 0, shape))
        parts.append(b)
    return [union(parts, shape, lat.n)]


def identity_each(lat, eqn, ins):
    """``optimization_barrier((a, b, ...))``, ``device_put``, sharding constraints: each result is its own operand.

    Example: sets [{0}] and [{1}, {2}] -> [{0}] and [{1}, {2}]. Reads no parameters.
    """
    return [Deps(d.shape, d.indptr, d.indices, d.const) for d in ins]


def select_n(lat, eqn, ins):
    """``select_n(pred, *cases)``: a known predicate picks one case per element.

    Example: predicate [0, 1] (known) with cases [{0}, {1}] and [{2}, {3}] ->
    [{0}, {3}]. An unknown predicate gives the union of the cases (the
    predicate itself carries no derivative).
    """
    shape = eqn.outvars[0].aval.shape
    pred, cases = ins[0], [broadcast_to(d, shape) for d in ins[1:]]
    if pred.const is None:
        return [union(cases, shape, lat.n)]
    which = np.broadcast_to(np.asarray(pred.const), shape).astype(np.int64)
    return [union([mask(d, which == k) for k, d in enumerate(cases)], shape, lat.n)]




RULES = {name: elementwise for name in NAMES}
RULES.update({name: zero for name in ZERO})
RULES.update({"mul": mul, "integer_pow": integer_pow, "pow": pow_, "select_n": select_n})
RULES.update({name: identity_each for name in IDENTITIES})
