"""Every fact about JAX's internals that jacobians relies on, one small function each.

JAX's jaxpr classes, the parameters of its control-flow primitives and a few
private helpers change between releases. Nothing else in the package imports
``jax.extend``, ``jax._src`` or ``jax.core``, or reads a control-flow
primitive's parameters by name: it asks this module. Each function here is
tested on the running JAX (``tests/test_compat.py``), so a new JAX release
that moves a fact breaks one test that names it.

What moved between the supported releases (see the README, "Supported versions"):

- JAX 0.8 and 0.9 have no ``jax.extend.core.DropVar`` nor ``jaxprs_in_params``.
- JAX 0.11 merged ``ClosedJaxpr`` into ``Jaxpr``: a jaxpr carries its constants
  (``jaxpr.consts``), ``jaxpr.jaxpr`` is the jaxpr itself, and ``ClosedJaxpr``
  is another name for ``Jaxpr``.
- JAX 0.11 replaced ``scan``'s ``num_consts`` / ``num_carry`` by ``ft_in``, a
  flat tree of three groups (constants, carry, scanned inputs).
- ``get_bind_params`` returns ``(subfuns, params)`` on some releases, the
  parameters alone on others.
- JAX 0.8 holds a jaxpr's NumPy constants in a ``TypedNdArray`` that is not an
  ``np.ndarray`` (it is one from 0.9).
"""

import contextlib
import functools
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np
from jax.extend import core as _jex

# --- jaxpr classes ------------------------------------------------------------------------------
ClosedJaxpr = _jex.ClosedJaxpr  # the same class as Jaxpr from JAX 0.11
Jaxpr = _jex.Jaxpr
Literal = _jex.Literal
Var = _jex.Var
try:
    DropVar = _jex.DropVar
except AttributeError:  # JAX < 0.10
    from jax._src.core import DropVar as DropVar

JAXPR_TYPES = (ClosedJaxpr, Jaxpr)

try:  # the concrete jax.Array type, checked by identity on the fast path (cheaper than isinstance)
    from jax._src.array import ArrayImpl as ARRAY_IMPL
except ImportError:  # pragma: no cover - a JAX without it: every call takes the general path
    ARRAY_IMPL = None

try:  # JAX has no public way to make a weakly typed array from a traced one
    from jax._src.lax.lax import _convert_element_type as _convert_element_type
except ImportError:  # pragma: no cover
    _convert_element_type = None


def auto_axes(mesh):
    """``mesh`` with every axis of type ``Auto`` (the same devices and names).

    ``jax.lax.with_sharding_constraint`` accepts only ``Auto`` axes, and ``jax.make_mesh``
    gives ``Explicit`` ones on newer JAX; a JAX without axis types has only the one kind.
    """
    kinds = getattr(jax.sharding, "AxisType", None)
    types = getattr(mesh, "axis_types", None)
    if kinds is None or types is None or all(t == kinds.Auto for t in types):
        return mesh
    return jax.sharding.Mesh(mesh.devices, mesh.axis_names, axis_types=(kinds.Auto,) * len(mesh.axis_names))


def staged():
    """A context that stages constant expressions into the program being traced.

    Inside ``jax.ensure_compile_time_eval`` (a certificate run while a call is
    traced) JAX otherwise evaluates every operation on constants eagerly, each
    compiled on its own: a sparse Hessian's seeds and their products cost dozens
    of tiny compilations (0.3-1.5 s) instead of a part of one program.
    """
    try:
        from jax._src.config import eager_constant_folding
    except ImportError:  # pragma: no cover - a JAX without the flag folds nothing eagerly
        return contextlib.nullcontext()
    return eager_constant_folding(False)


def aval_key(x) -> tuple:
    """``(shape, dtype, weak_type)`` of an array, tracer or Python number, as ``jax.jit`` keys its traces."""
    aval = jax.typeof(x) if hasattr(jax, "typeof") else jax.core.get_aval(x)  # typeof: JAX >= 0.6
    return tuple(aval.shape), str(aval.dtype), bool(getattr(aval, "weak_type", False))


def jit_disabled() -> bool:
    """True inside ``jax.disable_jit()`` (compiled programs run op by op)."""
    return bool(jax.config.jax_disable_jit)


def is_tracer(x) -> bool:
    """True when ``x`` is a JAX tracer (its value is unknown at trace time)."""
    return isinstance(x, jax.core.Tracer)


def host_constant(c):
    """A jaxpr constant as a NumPy array where JAX holds it on the host; anything else unchanged.

    JAX stages NumPy constants (index arrays, masks) in wrappers of its own:
    ``TypedNdArray`` is an ``np.ndarray`` from JAX 0.9, but not on 0.8, and 0.7
    has ``LiteralArray``; lattices recognise known values as ``np.ndarray``.
    Tracers and ``jax.Array`` s (device arrays, PRNG keys) are returned as they are.
    """
    if isinstance(c, np.ndarray | np.generic | jax.Array):
        return c
    try:
        return np.asarray(c)
    except Exception:  # noqa: BLE001 - not array-like: the lattice decides
        return c


def unclose(jaxpr) -> tuple[Any, list]:
    """``(jaxpr, consts)`` of a closed or open jaxpr: the equations' container and its constants' values.

    An open jaxpr of JAX < 0.11 has no constant values (``[]``); from JAX 0.11
    every jaxpr carries them.
    """
    if isinstance(jaxpr, ClosedJaxpr):
        return jaxpr.jaxpr, list(jaxpr.consts)
    return jaxpr, list(getattr(jaxpr, "consts", ()))


def jaxpr_as_fun(closed):
    """A Python function that evaluates a closed jaxpr: ``f(*args) -> list of outputs``."""
    return _jex.jaxpr_as_fun(closed)


def eval_with_consts(closed, consts: Sequence, *args) -> list:
    """Evaluate a closed jaxpr with other values (tracers, say) in place of its constants."""
    from jax._src.core import eval_jaxpr  # noqa: PLC0415 - not public on every supported release

    return eval_jaxpr(unclose(closed)[0], list(consts), *args)


def jaxprs_in_params(params: dict) -> Iterator:
    """The jaxprs nested in an equation's parameters (a jit's body, cond's branches, ...), open.

    Yields the equations' containers (``Jaxpr``; from JAX 0.11 these carry
    their constants too, see :func:`unclose`). A parameter that holds a tuple
    of jaxprs (``cond``'s ``branches``) yields each. Rules passed as Python
    callables (``custom_jvp_call``'s ``jvp_jaxpr_fun``) are not jaxprs and are
    not yielded.
    """
    for value in params.values():
        for v in value if isinstance(value, tuple | list) else (value,):
            if isinstance(v, JAXPR_TYPES):
                yield unclose(v)[0]


def called_jaxpr(eqn):
    """The jaxpr a call-like equation runs (``jit``, ``closed_call``, ``remat``, custom rules' primal), or ``None``.

    Its trailing ``len(invars)`` operands are the jaxpr's inputs (custom rules
    may put other operands first).
    """
    if eqn.primitive.name in _NOT_CALLS:
        return None
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        inner = eqn.params.get(key)
        if isinstance(inner, JAXPR_TYPES):
            return inner
    return None


# Primitives whose ``jaxpr`` parameter is not run on their operands: the generic reduce's and
# reduce_window's reducer combines two elements at a time.
_NOT_CALLS = frozenset({"reduce", "reduce_window"})


@functools.cache
def jit_primitive() -> str:
    """The name of the primitive ``jax.jit`` stages out (``"jit"``; ``"pjit"`` before JAX 0.7)."""
    closed = jax.make_jaxpr(jax.jit(lambda x: x))(np.float32(0))
    return unclose(closed)[0].eqns[0].primitive.name


def cond_branches(eqn) -> Sequence:
    """``cond``'s branch jaxprs; the operand 0 picks one, the others are the branches' inputs."""
    return eqn.params["branches"]


def while_counts(eqn) -> tuple[int, int]:
    """``(cond_nconsts, body_nconsts)`` of a ``while``: its operands are cond consts, body consts, carry."""
    p = eqn.params
    n_carry = len(eqn.outvars)
    nb = p.get("body_nconsts", len(unclose(p["body_jaxpr"])[0].invars) - n_carry)
    nc = p.get("cond_nconsts", len(eqn.invars) - nb - n_carry)
    return nc, nb


def while_jaxprs(eqn) -> tuple[Any, Any]:
    """``(cond_jaxpr, body_jaxpr)`` of a ``while``."""
    return eqn.params["cond_jaxpr"], eqn.params["body_jaxpr"]


def scan_counts(eqn) -> tuple[int, int] | None:
    """``(num_consts, num_carry)`` of a ``scan``; its operands are consts, carry, then the scanned xs.

    JAX < 0.11 names both counts; from 0.11 ``ft_in`` is a flat tree of three
    groups (consts, carry, xs) whose leaf counts are the operand counts.
    ``None`` when this JAX spells them in a way we cannot read (the caller is
    then conservative).
    """
    p = eqn.params
    n = len(eqn.invars)
    if "num_consts" in p and "num_carry" in p:
        counts = int(p["num_consts"]), int(p["num_carry"])
    elif "ft_in" in p:
        try:
            groups = p["ft_in"].unpack()
            counts = len(groups[0]), len(groups[1])
            if len(groups) != 3 or sum(len(g) for g in groups) != n:
                return None
        except (AttributeError, TypeError):
            return None
    else:
        return None
    return counts if sum(counts) <= n else None


def scan_body(eqn):
    """``scan``'s body jaxpr: ``(consts, carry, x) -> (carry, y)``."""
    return eqn.params["jaxpr"]


def bind(eqn, args: Sequence) -> Any:
    """Apply ``eqn``'s primitive with its parameters to other arguments (as ``jax.core.eval_jaxpr`` does).

    Returns:
      the primitive's result: a list when ``eqn.primitive.multiple_results``, else one value.
    """
    params = eqn.primitive.get_bind_params(eqn.params)
    subfuns = ()
    if isinstance(params, tuple):  # some releases: (subfuns, params)
        subfuns, params = params
    return eqn.primitive.bind(*subfuns, *args, **params)


def convert_weak(x, dtype):
    """``x`` converted to ``dtype`` (a NumPy dtype) and weakly typed, as JAX's derivatives of Python scalars are.

    Where this JAX offers no way, ``x`` in ``dtype`` (strongly typed).
    """
    if _convert_element_type is None:  # pragma: no cover
        return x.astype(dtype)
    return _convert_element_type(x, dtype, weak_type=True)


def source_summary(source_info) -> str | None:
    """``file:line (function)`` of the user's code that staged an equation (``eqn.source_info``).

    Returns:
      the summary; ``""`` when the equation comes from inside JAX, ``None`` when
      this JAX cannot say.
    """
    try:
        from jax._src import source_info_util

        return source_info_util.summarize(source_info) or ""
    except Exception:  # noqa: BLE001 - a location is a courtesy
        return None

