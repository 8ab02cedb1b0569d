"""A transformation's compiled program, with the large arrays that ``fun`` closes over passed in as arguments.

``jax.jit`` embeds every array a traced function closes over in the program as an
HLO constant. XLA's CPU compiler pays for each byte of them (about 25 ms per 4 MB
matrix) and constant-folds what is computed from them alone (a weight matrix's
transpose, evaluated by XLA's interpreter). The weights of a network a user
differentiates are such arrays: they are hoisted here instead, so the program
compiles as if they were arguments, and runs the same.

Only ``jax.Array`` constants of at least ``HOIST_BYTES`` are hoisted (the user's
arrays); NumPy constants (the engines' seeds and index arrays, which XLA should
see and fold) stay in the program. As with ``jax.jit``, the program keeps the
values it was traced with: the hoisted arrays are copied once, so a caller who
later donates or deletes a closed-over array does not pull it from under us.

A first call's program is compiled on a worker thread, so that work its trace
deferred (a plan's certificate lowering its own program: :func:`later`) runs on
the caller's thread meanwhile.
"""

import concurrent.futures
import contextvars
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from . import _compat

HOIST_BYTES = 1 << 16

# Work to start once the program being traced by a first call is lowered and compiling (see :func:`later`).
_LATER: contextvars.ContextVar = contextvars.ContextVar("jacobians_after_lowering", default=None)
_COMPILER: list = []  # one worker thread compiling first calls' programs, made on first use


def later(start: Callable[[], None]) -> bool:
    """Run ``start`` once the program being traced has been lowered and is compiling, if a first call traces it.

    Returns ``False`` (the caller runs ``start`` now) outside such a trace. A certificate
    deferred while a call is traced lowers its own program then: on the caller's thread,
    while the call's program compiles on a worker thread (XLA releases the interpreter).
    """
    waiting = _LATER.get()
    if waiting is None:
        return False
    waiting.append(start)
    return True


def compile_ahead(lowered) -> concurrent.futures.Future:
    """Compile ``lowered`` on the worker thread (XLA releases the interpreter meanwhile).

    The call that runs the program afterwards finds it in JAX's compilation cache.
    """
    if not _COMPILER:
        _COMPILER.append(concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="jacobians-compile"))
    return _COMPILER[0].submit(lowered.compile)


def _avals(args) -> tuple:
    return tuple(_compat.aval_key(a) for a in args)


def large(values) -> tuple:
    """The constants among ``values`` to pass as arguments: concrete ``jax.Array`` s of ``HOIST_BYTES`` or more."""
    return tuple(c for c in values if isinstance(c, jax.Array) and not _compat.is_tracer(c)
                 and not c.is_deleted() and c.nbytes >= HOIST_BYTES)


def substitute(values, hoisted: tuple, given) -> list:
    """``values`` with each of the ``hoisted`` arrays (found by identity) replaced by its ``given`` counterpart."""
    where = {id(c): k for k, c in enumerate(hoisted)}
    return [given[where[id(c)]] if id(c) in where else c for c in values]


def _copy(a: jax.Array) -> jax.Array:
    """A copy of ``a`` in its own buffers, placed (sharded) as ``a`` is."""
    try:
        return jax.device_put(a, a.sharding, may_alias=False)
    except TypeError:  # pragma: no cover - a JAX without may_alias
        return jnp.array(a, copy=True)


class Hoisted:
    """``jax.jit(fun)``, called as ``fun(*args)`` with positional array (or number) arguments.

    The first call traces ``fun`` once (``jax.jit(fun).trace``) to find its large
    constants; the program compiled then (and for any later shapes) takes copies
    of them as leading arguments, or is that jit itself where there are none.
    ``call`` is then the program (``jax.jit``'s fast path, the constants bound),
    for callers to keep instead of this object.
    """

    def __init__(self, fun):
        self.fun = fun
        self._plain = jax.jit(fun)  # the program when there is nothing to hoist (its first trace is kept)
        self._found: tuple = ()  # the closed-over arrays, as the traces hold them (kept: ids stay theirs)
        self._consts: tuple = ()  # their copies, passed to the program
        self._traced: dict = {}  # avals -> (closed jaxpr, out tree) traced by the first call, used once
        self._jit = jax.jit(self._body)
        self.call = None  # once traced: the program, to call instead of this object

    def _body(self, consts, *args):
        hit = self._traced.pop(_avals(args), None)
        if hit is None:  # new shapes: trace fun again (its constants are the same arrays, found by identity)
            closed, shape = jax.make_jaxpr(self.fun, return_shape=True)(*args)
            hit = closed, jax.tree_util.tree_structure(shape)
        closed, tree = hit
        values = substitute(_compat.unclose(closed)[1], self._found, consts)
        return jax.tree_util.tree_unflatten(tree, _compat.eval_with_consts(closed, values, *args))

    def _trace(self, args) -> None:
        """The first trace, by ``jax.jit(fun)`` itself.

        Nothing to hoist: that jit is the program (its trace is reused: one trace in all). Else its
        jaxpr is kept for the hoisting program's own trace, which evaluates it.
        """
        traced = self._plain.trace(*args)
        closed = traced.jaxpr
        self._found = large(_compat.unclose(closed)[1])
        if not self._found:
            self.call = self._plain
            return
        # Copied eagerly even under a caller's trace (a first call inside jax.jit): there device_put is
        # staged, and its tracers, kept for the later direct calls, escaped (UnexpectedTracerError).
        with jax.ensure_compile_time_eval():
            self._consts = tuple(_copy(c) for c in self._found)
        self._traced[_avals(args)] = closed, jax.tree_util.tree_structure(traced.out_info)
        self.call = functools.partial(self._jit, self._consts)

    def __call__(self, *args):
        if _compat.jit_disabled():  # as jax.jit under jax.disable_jit(): run fun as it is
            return self.fun(*args)
        if self.call is None:
            if any(map(_compat.is_tracer, args)):  # inside a caller's trace: nothing compiles here
                self._trace(args)
            else:
                return self._first(args)
        return self.call(*args)

    def _first(self, args):
        """A first concrete call: trace; lower; compile on a worker thread while deferred work starts here."""
        waiting: list = []
        token = _LATER.set(waiting)
        try:
            self._trace(args)
        finally:
            _LATER.reset(token)
        future = None
        try:
            future = compile_ahead(self.lower(*args))
        except Exception:  # noqa: BLE001 - the call below lowers and compiles again, and reports
            pass
        finally:
            for start in waiting:
                start()
        if future is not None:
            try:
                future.result()
            except Exception:  # noqa: BLE001 - as above
                pass
        return self.call(*args)

    def lower(self, *args):
        """The program's ``jax.stages.Lowered`` for these arguments (shapes suffice)."""
        if self.call is None:
            self._trace(args)
        return self._jit.lower(self._consts, *args) if self._consts else self._plain.lower(*args)

    def donating(self):
        """``(out, *args) -> result``: the program writing its result into ``out``'s buffers (donated)."""
        if self.call is None:
            raise RuntimeError("Hoisted.donating: the program has not been traced yet")
        # The programs inside are the ones already traced (their traces are reused, not fun's redone).
        if not self._consts:
            return jax.jit(lambda _, *args: self._plain(*args), donate_argnums=0, keep_unused=True)
        program = jax.jit(lambda _, consts, *args: self._jit(consts, *args), donate_argnums=0, keep_unused=True)
        return lambda out, *args: program(out, self._consts, *args)
