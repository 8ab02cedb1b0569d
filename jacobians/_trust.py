"""Trust: an analysis never fails the user, and every plan it finds is checked against JAX.

Every engine that lets an analysis of the jaxpr choose how to differentiate
(``jacobian``'s planner, the sparse engines, ``batch_jacobian``'s independence
proof, ``divergence``, ``gauss_newton(...).diagonal()``, ``hessian``'s
structured sweep, the Laplacians' sweeps and colourings) keeps two promises:

- an exception inside an analysis (detection, colouring, the cost model,
  tracing a structured sweep, the certificate) falls back to the dense method
  with one :class:`PlanWarning` per plan naming the analysis, the primitive
  (where known) and the cause;
- a plan found by analysis carries a *certificate*: when the plan is made, the
  plan's Jacobian applied to a few random tangents (cotangents) is compared with
  ``jax.jvp`` (``jax.vjp``) at a random point, a Freivalds-style check that
  costs one evaluation of the plan and a few JVPs, against the ``n`` or ``m``
  passes the plan saves. A plan that fails it falls back to the dense method
  with a :class:`PlanWarning` naming the plan.

In strict mode (:func:`strict`, or the environment variable ``JACOBIANS_STRICT=1``)
both are :class:`PlanError`s instead; the test suite runs strict.

The check runs on the jaxpr the analysis read (no new trace of ``fun``), at a
point near the call's own inputs when they are known (the first call with
concrete arrays), else at a standard normal point; where ``fun`` is not finite
there it retries at the call's inputs, and where ``fun`` cannot run when the
plan is made (it closes over traced values, has side effects or calls back
into Python) the check is skipped and the plan says so.
"""

import concurrent.futures
import contextlib
import contextvars
import functools
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from . import _args, _compat, _hoist
from ._walker import is_opaque, primitives

ENV = "JACOBIANS_STRICT"
CHECKS = 3  # random tangents (cotangents) per certificate
BINARY_CHECKS = 8  # random 0/1 directions in the second check of a map with custom rules
CUSTOM = {"custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr"}
SEED = 0x5EED  # certificates are deterministic: the same plan gets the same check
# A check's program runs once: compile it fast (about half the time of XLA's default optimisation on CPU), and
# on a GPU without autotuning its convolutions and GEMMs, which cost seconds per new shape on first calls
# (DebugOptions fields: harmless on other backends). Where the CPU backend still has its classic (non-MLIR)
# fusion emitters (jaxlib < 0.12), those: a check's program compiles 1.4-2.9x faster (3 JVPs of a 3x16x16
# convolution 51 -> 18 ms, of a Gram matrix 32 -> 10 ms). An option an XLA lacks is dropped (_CheckProgram).
COMPILER_OPTIONS = {"xla_backend_optimization_level": 0, "xla_gpu_autotune_level": 0,
                    "xla_cpu_use_fusion_emitters": False, "xla_llvm_disable_expensive_passes": True}
_UNKNOWN_OPTION = "No such compile option: "
CALLBACKS = {"pure_callback", "io_callback", "debug_callback", "callback"}


class PlanWarning(UserWarning):
    """An analysis failed, or a plan failed its certificate: the dense method was used instead.

    The result is right; only the speed the analysis would have bought is lost.
    Under :func:`jacobians.strict` (or ``JACOBIANS_STRICT=1``) this is a :class:`PlanError`.
    """


class PlanError(RuntimeError):
    """Strict mode: an analysis failed, or a plan failed its certificate (see :class:`PlanWarning`)."""


# --- strict mode ------------------------------------------------------------------------------

_STRICT: contextvars.ContextVar = contextvars.ContextVar("jacobians_strict", default=None)


def is_strict() -> bool:
    """True inside :func:`strict` (unless switched off there), else when ``JACOBIANS_STRICT`` is set (not 0)."""
    forced = _STRICT.get()
    if forced is not None:
        return forced
    return os.environ.get(ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


@contextlib.contextmanager
def strict(enabled: bool = True) -> Iterator[None]:
    """Make failed analyses and failed certificates errors (:class:`PlanError`) instead of warnings.

    A context manager; ``strict(False)`` switches strict mode off inside it, also
    where ``JACOBIANS_STRICT=1``. Plans are made once per call structure and
    shapes and then cached, so the mode in force when a plan is made decides.

    Example::

      >>> with jacobians.strict():  # a PlanError where a PlanWarning would be
      ...     J = jacobians.jacobian(lambda x: jnp.sin(x) * 2.0)(jnp.ones(3))
    """
    token = _STRICT.set(bool(enabled))
    try:
        yield
    finally:
        _STRICT.reset(token)


# --- failures -----------------------------------------------------------------------------------


class AnalysisError(Exception):
    """An analysis raised (internal: becomes a :class:`PlanWarning` or :class:`PlanError`)."""

    def __init__(self, analysis: str, cause: BaseException):
        super().__init__(f"{analysis}: {type(cause).__name__}: {_first_line(cause)}")
        self.analysis, self.cause = analysis, cause


@contextlib.contextmanager
def stage(analysis: str, passing: tuple = ()) -> Iterator[None]:
    """Label an exception raised inside as a failure of ``analysis`` (``passing``: exceptions that are answers)."""
    try:
        yield
    except (AnalysisError, PlanError, *passing):
        raise
    except Exception as e:  # noqa: BLE001 - every failure of an analysis is reported, none is fatal
        raise AnalysisError(analysis, e) from e


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "(no message)"


def primitive_of(exc: BaseException) -> str | None:
    """The primitive whose rule was running when ``exc`` was raised (the innermost walker equation), if any."""
    seen, name = set(), None
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        tb = exc.__traceback__
        while tb is not None:
            eqn = tb.tb_frame.f_locals.get("eqn")
            prim = getattr(eqn, "primitive", None)
            if prim is not None:
                name = getattr(prim, "name", name)
            tb = tb.tb_next
        if name is not None:
            return name
        exc = exc.__cause__ or exc.__context__
    return None


def analysis_failed(where: str, exc: BaseException, analysis: str = "planner") -> str:
    """``exc`` came out of an analysis: warn (:class:`PlanWarning`) or, strict, raise; returns the plan's note."""
    if isinstance(exc, PlanError):
        raise exc
    if isinstance(exc, AnalysisError):
        analysis, exc = exc.analysis, exc.cause
    prim = primitive_of(exc)
    at = f" at primitive '{prim}'" if prim else ""
    if _args.jax_refused(exc):
        # Not the analysis' defect: JAX cannot differentiate fun there. JAX's own methods run and, if they
        # cannot either, raise JAX's own error.
        return f"JAX cannot differentiate fun{at} by the {analysis}'s transformation; the dense method is used"
    return _report(where, f"the {analysis} failed{at} ({type(exc).__name__}: {_first_line(exc)})", exc, bug=True)


def certificate_failed(where: str, plan: str, detail: str, bug: bool = True) -> str:
    """A plan failed its certificate: warn or, strict, raise; returns the plan's note."""
    return _report(where, f"the {plan} plan failed its certificate ({detail})", None, bug=bug)


def compiler_failed(where: str, planned: str, instead: str, exc: BaseException) -> str:
    """XLA failed to compile a plan's program (its own crash): warn or, strict, raise; returns the new plan's note.

    Not the analysis' defect, but a program the plan made that XLA cannot build: another exact method runs.
    """
    what = f"XLA failed to compile the {planned} program ({type(exc).__name__}: {_first_line(exc)[:200]})"
    return _report(where, what, exc, bug=False, instead=instead, stacklevel=5)


def method_cannot_follow(where: str, asked: str, instead: str, why: str) -> str:
    """The caller's choice cannot give JAX's derivative of this ``fun``: warn or, strict, raise.

    ``asked`` names the choice (``"method='forward'"``), ``why`` says why it cannot.
    Not a defect: JAX's own semantics (a custom rule) that the method cannot represent; ``instead`` runs.
    """
    return _report(where, f"{asked} cannot give JAX's derivative here ({why})", None, bug=False, instead=instead)


def _report(where: str, what: str, cause: BaseException | None, bug: bool, instead: str = "dense",
            stacklevel: int = 3) -> str:
    """Raise (strict) or warn once; the note for the plan (by default the dense one) that replaces the failed one."""
    defect = " This is a defect of jacobians' analysis: please report it." if bug else ""
    if is_strict():
        raise PlanError(f"{where}: {what}.{defect} (Strict mode, from {ENV} or jacobians.strict(): an error "
                        f"instead of the {instead} method.)") from cause
    warnings.warn(f"{where}: {what}; the {instead} method is used (right, only slower).{defect}", PlanWarning,
                  stacklevel=stacklevel)
    return f"{what}; the {instead} method is used"


# --- certificates -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Certificate:
    """The outcome of a plan's check against JAX's own derivative.

    Attributes:
      status: ``"passed"``, ``"failed"``, ``"skipped"`` (``fun`` could not run
        when the plan was made; ``detail`` says why) or ``"not needed"`` (the
        dense method: JAX's own JVPs or VJPs).
      detail: what was checked, or why not.
    """

    status: str
    detail: str = ""

    def __str__(self) -> str:
        return self.status + (f" ({self.detail})" if self.detail else "")

    @property
    def failed(self) -> bool:
        return self.status == "failed"


NOT_NEEDED = Certificate("not needed", "the dense method: JAX's own JVPs/VJPs")
NOT_RUN = Certificate("skipped", "no plan was made for this call yet")


def fallback(note: str | None = None) -> Certificate:
    """The certificate of a dense plan that replaced a failed analysis or plan (``note`` says which)."""
    return Certificate("not needed", "the dense method, " + (f"since {note}" if note else "after the failure above"))


# The first call's own arguments, for a certificate made while tracing it.
_CALL: contextvars.ContextVar = contextvars.ContextVar("jacobians_call", default=None)


def wrap(t: "_args.Transform") -> Callable:
    """:func:`_args.wrap`, remembering each call's arguments while it runs (a plan made then can use them).

    A plan made while such a call is traced may defer its certificate (:func:`defer`): the
    check then runs after the call, with the call's own compiled program, and the call's
    result is returned only once every deferred check has passed; a failed one replaces
    its plan and the call runs again with the dense method.
    """

    @functools.wraps(t.fun)
    def transformed(*args, **kwargs):
        if not kwargs and (out := t.fast(args)) is not _args.MISS:
            # A structure that has run (its plans made and checked): nothing to remember, no check to defer.
            return out
        pending: list[Pending] = []
        token = _CALL.set((t, args, kwargs, pending))
        try:
            out = t(*args, **kwargs)
            if pending and not all([p.wait() for p in pending]):
                out = t(*args, **kwargs)  # a plan failed its certificate: its replacement runs
            return out
        finally:
            _CALL.reset(token)

    return _args.returned(transformed, t)


@contextlib.contextmanager
def calling(t: "_args.Transform", args: tuple, kwargs: dict) -> Iterator[None]:
    """The same as :func:`wrap` for one call made another way."""
    token = _CALL.set((t, args, kwargs))
    try:
        yield
    finally:
        _CALL.reset(token)


class _Lowered(BaseException):  # noqa: N818 - control flow, never seen outside this module
    """Unwinds a check being prepared once its first program is lowered (:meth:`Pending.prepare`).

    A ``BaseException``: the ``except Exception`` of the analyses between must not catch it.
    """


@dataclass
class _Ahead:
    """A check's first program, lowered while the call is traced and compiled on a worker thread meanwhile."""

    preparing: bool = True
    key: tuple | None = None
    future: concurrent.futures.Future | None = None


_AHEAD: contextvars.ContextVar = contextvars.ContextVar("jacobians_ahead", default=None)
_WORKER: list = []  # one worker thread, made on first use


def _run(run: Callable, what: str, consts: tuple, T, point: list):
    """``run(consts, T, *point)``, or the same program compiled ahead (see :meth:`Pending.prepare`).

    Preparing, the program is lowered here (tracing stays on this thread, with its JAX
    configuration), handed to the worker to compile and the check unwound: the call's
    own program then compiles on this thread while the check's compiles on the other.
    """
    ahead = _AHEAD.get()
    if ahead is None:
        return run(consts, T, *point)
    key = (what, T.shape, str(T.dtype), tuple((np.shape(a), str(getattr(a, "dtype", type(a).__name__))) for a in point))
    if ahead.preparing:
        if not _WORKER:
            _WORKER.append(concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="jacobians-certificate"))
        ahead.key, ahead.future = key, _WORKER[0].submit(run.lower(consts, T, *point).compile)
        raise _Lowered
    future, ahead.future = ahead.future, None  # the first program only
    if future is None or key != ahead.key:
        return run(consts, T, *point)
    try:
        compiled = future.result()
    except Exception:  # noqa: BLE001 - compiled again below, where a real error is reported
        return run(consts, T, *point)
    return compiled(consts, T, *point)


class Pending:
    """A deferred certificate and what to do with its result (see :func:`defer`)."""

    def __init__(self, check: Callable, settle: Callable):
        self._check, self._settle, self._stands = check, settle, None
        self._ahead, self._early = None, None

    def prepare(self) -> None:
        """Start the check: run it up to its first program, lowered and compiled on a worker thread.

        The call being traced compiles its own program next; the two compilations overlap
        (XLA releases the interpreter while it compiles), so a first call pays about the
        longer of the two instead of their sum. A check that needs no program finishes here.
        """
        ahead = _Ahead()
        token = _AHEAD.set(ahead)
        try:
            self._early = self._check()
        except _Lowered:
            ahead.preparing = False
            self._ahead = ahead
        except Exception:  # noqa: BLE001 - the check runs again in wait(), which reports it
            pass
        finally:
            _AHEAD.reset(token)

    def wait(self) -> bool:
        """Check and settle once (a failure: a warning, or strict a :class:`PlanError`); whether the plan stands."""
        if self._stands is None:
            self._stands = False  # a settle that raises (strict) leaves the plan replaced, not pending
            token = _AHEAD.set(self._ahead)
            try:
                result = self._early if self._early is not None else self._check()
            except Exception as e:  # noqa: BLE001 - reported by settle
                result = e
            finally:
                _AHEAD.reset(token)
            self._stands = bool(self._settle(result))
        return self._stands


def drop_deferred() -> None:
    """Forget the checks the current wrapped call deferred (its plan was replaced before they could run)."""
    call = _CALL.get()
    if call is not None and len(call) >= 4:
        call[3].clear()


def defer(check: Callable[[], "Certificate"], settle: Callable) -> "Pending | None":
    """Run ``check`` once the wrapped call being traced has compiled and run, before it returns.

    Only within a call of a wrapped transformation (see :func:`wrap`), which holds its
    result back until ``settle(result)`` (``result``: the :class:`Certificate`, or the
    exception ``check`` raised) says whether the plan stands; so ``check`` may run the
    call's own compiled program (at another point) instead of compiling one of its own.
    Returns ``None`` (the caller checks at once) elsewhere.
    """
    call = _CALL.get()
    if call is None or len(call) < 4:
        return None
    pending = Pending(check, settle)
    call[3].append(pending)
    if not _hoist.later(pending.prepare):  # else prepared while the call's program compiles
        pending.prepare()
    return pending


def _concrete(a) -> bool:
    return isinstance(a, (*_args.ARRAY_TYPES, int, float, complex)) and not _compat.is_tracer(a)


def concrete(traced: Sequence) -> list | None:
    """``traced`` if every leaf holds a value (no tracer, no shape struct), else ``None``."""
    return list(traced) if all(_concrete(a) for a in traced) else None


def call_values(spec: "_args.CallSpec", *transforms) -> list | None:
    """The concrete traced leaves of the call being traced, when it is a call of one of ``transforms``."""
    call = _CALL.get()
    if call is None or not any(call[0] is t for t in transforms):
        return None
    t, args, kwargs = call[:3]
    try:
        spec2, traced = t.split(args, kwargs)
    except Exception:  # noqa: BLE001 - the values are a courtesy; the call itself reports bad arguments
        return None
    return concrete(traced) if spec2 == spec else None


def check_point(traced: Sequence, spec: "_args.CallSpec", t: "_args.Transform") -> tuple[list | None, bool]:
    """The values a plan made while tracing ``t``'s call is checked at, and whether the check may wait.

    The values: the traced leaves themselves where concrete, else the call's (:func:`call_values`),
    else ``None``. It may wait (:func:`defer`, then reuse the call's own compiled program) where
    the leaves are tracers of a concrete call of ``t``: that call will have compiled and run.
    """
    own = concrete(traced)
    values = own or call_values(spec, t)
    return values, own is None and values is not None


def flat_problem(traced_flat: tuple, leaves: Sequence, consts: tuple = ()) -> "_args.Problem":
    """The :class:`_args.Problem` of a call, evaluated from its jaxpr (``trace_flat``'s result) at ``leaves``.

    ``consts``: values for the jaxpr's large constants (:func:`_hoist.large`: arguments of a
    check's program, not embedded in it), in that order.
    """
    closed, offsets, meta = traced_flat
    order = sorted((off, k) for k, off in enumerate(offsets) if off is not None)
    x, unravel = ravel_pytree([leaves[k] for _, k in order])
    values = _compat.unclose(closed)[1]
    values = _hoist.substitute(values, _hoist.large(values), consts) if consts else values

    def flat(xf):
        ins = list(leaves)
        for (_, k), d in zip(order, unravel(xf), strict=True):
            ins[k] = d
        (y,) = _compat.eval_with_consts(closed, values, *ins)
        return y, None

    return _args.Problem(flat, x, meta.out_leaves, meta.out_treedef, meta.in_leaves, meta.in_treedef, meta.out_dtype)


def unevaluable(closed) -> str | None:
    """Why the jaxpr cannot run when a plan is made (``None``: it can)."""
    if any(_compat.is_tracer(c) for c in closed.consts):
        return ("fun closes over traced values (it is differentiated inside a jax.jit or another "
                "transformation), so it cannot run when the plan is made")
    if closed.effects:
        return "fun has side effects, which must not run when the plan is made"
    calls = sorted(CALLBACKS & primitives(closed))
    if calls:
        return f"fun calls back into Python ({', '.join(calls)}), which must not run when the plan is made"
    return None


def _random(aval, rng: np.random.Generator) -> np.ndarray | None:
    dtype = np.dtype(aval.dtype)
    shape = tuple(aval.shape)
    if np.issubdtype(dtype, np.complexfloating):
        return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dtype)
    if np.issubdtype(dtype, np.floating) or dtype.name == "bfloat16":
        return rng.standard_normal(shape).astype(dtype)
    return np.zeros(shape, dtype)  # integers and booleans: 0 is an index and a count in every domain


def _near(value, rng: np.random.Generator):
    """A random point scaled like ``value``: ``value + s z`` with ``s`` its root mean square."""
    v = np.asarray(value)
    if not (np.issubdtype(v.dtype, np.inexact) or v.dtype.name == "bfloat16"):
        return value
    wide = v.astype(np.complex128 if np.iscomplexobj(v) else np.float64)
    s = float(np.sqrt(np.mean(np.abs(wide) ** 2))) if v.size else 1.0
    if not np.isfinite(s) or s == 0.0:
        s = 1.0
    z = rng.standard_normal(v.shape)
    return (wide + s * z).astype(v.dtype)


def points(closed, offsets: Sequence, values: Sequence | None) -> Iterator[tuple[str, list]]:
    """Points to check at, best first: near the call's inputs and at them when known, else a random point."""
    rng = np.random.default_rng(SEED)
    avals = [v.aval for v in closed.jaxpr.invars]
    if values is not None:
        yield "a random point near the call's inputs", [
            _near(v, rng) if off is not None else v for v, off in zip(values, offsets, strict=True)]
        yield "the call's inputs", list(values)
        return
    if any(is_opaque(a) for a in avals):
        return  # a PRNG key argument has no random value of its own
    yield "a random point", [_random(a, rng) for a in avals]


def shrunk(closed, offsets: Sequence, values: Sequence | None, factor: float) -> list | None:
    """A point ``factor`` times nearer the origin in the differentiated inputs.

    The call's inputs so scaled, else a standard normal point (``None`` where neither exists: a PRNG
    key argument and no call's inputs).
    """
    avals = [v.aval for v in closed.jaxpr.invars]
    if values is None:
        if any(is_opaque(a) for a in avals):
            return None
        values = [_random(a, np.random.default_rng(SEED + 2)) for a in avals]
    out = []
    for v, off in zip(values, offsets, strict=True):
        a = np.asarray(v)
        scaled = off is not None and jnp.issubdtype(a.dtype, jnp.inexact)  # (bfloat16 too)
        out.append((a / np.asarray(factor, a.dtype)).astype(a.dtype) if scaled else v)
    return out


_PAIR_REDUCED = frozenset({"reduce_window_max", "reduce_window_min", "select_and_gather_add"})


def rtol(closed, *dtypes) -> float:
    """A check's relative tolerance: twice the square root of the coarsest epsilon.

    Among ``dtypes`` and every value of the jaxpr: a float32 step inside a
    float64 map rounds as float32, and ``reduce_precision`` rounds to its
    ``mantissa_bits`` (its JVP rounds the tangent too, so JAX's own JVPs in
    random directions differ from a Jacobian built from exact basis seeds by that much). So do
    float64 windowed maxima on GPU, whose JVP JAX computes with 20 mantissa bits.
    """
    found = set(dtypes)
    eps = []
    # On GPU, JAX's JVP of a windowed max/min (select_and_gather_add) packs two 64-bit values into one
    # word, keeping 20 mantissa bits (jax/_src/lax/windowed_reductions.py): float64 rounds like that there.
    halved = jax.default_backend() == "gpu"

    def visit(jaxpr):
        for eqn in jaxpr.eqns:
            found.update(getattr(v.aval, "dtype", None) for v in eqn.outvars)
            name = eqn.primitive.name
            if name == "reduce_precision":
                eps.append(2.0 ** -int(eqn.params.get("mantissa_bits", 52)))
            elif halved and name in _PAIR_REDUCED and any(
                getattr(getattr(v, "aval", None), "dtype", None) == np.float64 for v in eqn.invars
            ):
                eps.append(2.0**-20)
            for sub in _compat.jaxprs_in_params(eqn.params):
                visit(sub)

    visit(closed.jaxpr)
    eps += [float(jax.numpy.finfo(d).eps) for d in found
            if d is not None and not is_opaque_dtype(d) and jax.numpy.issubdtype(d, jax.numpy.inexact)]
    return 2.0 * max(eps, default=float(np.finfo(np.float64).eps)) ** 0.5


def is_opaque_dtype(dtype) -> bool:
    return jax.dtypes.issubdtype(dtype, jax.dtypes.extended)


def compare(got: np.ndarray, ref: np.ndarray, scale: np.ndarray, tol: float, what: str,
            noise: np.ndarray | None = None, each: bool = False) -> str | None:
    """``None`` if ``got`` matches ``ref`` within ``tol`` relative to ``scale + |ref|``, else where it does not.

    ``scale`` bounds the terms summed into ``got`` (``|J| |v|``); a tiny floor
    relative to the largest entry absorbs rounding in entries that should be zero.
    ``noise``: how far JAX's own results for ``ref`` disagree (two orders of differentiation); its
    largest entry, several times over, is allowed everywhere (rounding follows the computation's scale,
    not each entry's: two ways can agree closely on one entry by chance); with ``each``, entry by entry
    (a map's conditioning: an ill-conditioned part must not excuse errors in a well-conditioned one).
    """
    got, ref, scale = (np.asarray(a) for a in (got, ref, scale))
    err = np.abs(got - ref)
    size = np.abs(ref) + scale
    bound = tol * size + tol * 1e-3 * (float(size.max()) if size.size else 0.0)
    if noise is not None:
        allowed = np.abs(noise) if each else (float(np.abs(noise).max()) if np.size(noise) else 0.0)
        bound = bound + _NOISE_FACTOR * allowed
    bad = err > bound
    if not bad.any():
        return None
    k = np.unravel_index(int(np.argmax(np.where(bad, err - bound, -np.inf))), err.shape)
    rel = float(err[k] / max(size[k], np.finfo(np.float64).tiny))
    entry = k[-1]
    return (f"{what} {entry}: the plan gives {complex(got[k]) if np.iscomplexobj(got) else float(got[k]):.6g}, "
            f"JAX {complex(ref[k]) if np.iscomplexobj(ref) else float(ref[k]):.6g} (relative error {rel:.2g}; "
            f"{int(bad.sum())} of {bad.size} entries differ)")


_NOISE_FACTOR = 8.0  # compare's allowance of JAX's disagreement with itself


def at_inputs_scale(traced_flat, values, program, judge: Callable, scale_of: Callable, what: str, directions,
                    computed=None) -> "Certificate | None":
    """A failed check again where the point near the call's inputs may saturate ``fun``: passed, or ``None``.

    At a saturated point (a float32 softmax whose logits scale by 5) a plan's second derivatives and JAX's
    are both rounding, of terms far larger than the results (the forward Laplacian's cancel to 2^-16, JAX's
    to 0). The plan stands if it passes at the call's own inputs and, near them, agrees within the tolerance
    of the scale its values have at those inputs: a wrong rule or layout is wrong by that scale, and at
    degenerate inputs (zeros) the scale, and so the allowance, vanish.

    Args:
      judge: ``judge(outs, T, tol, floor) -> None or what disagrees``; ``floor`` (``None``: none) is added
        to the scale each comparison allows errors relative to.
      scale_of: ``scale_of(outs)``: the floor, from the outputs at the call's inputs.
    """
    if values is None:
        return None
    scales: list = []

    def there(outs, T, tol):
        scales.append(scale_of(outs))
        return judge(outs, T, tol, None)

    if certify(traced_flat, values, program, there, what, directions, computed, at_inputs=True).failed or not scales:
        return None
    near = certify(traced_flat, values, program, lambda outs, T, tol: judge(outs, T, tol, scales[0]),
                   f"{what}, within the tolerance of the values' scale at the call's inputs,", directions, computed)
    return None if near.failed else near


def _second_opinion(traced_flat, values, program, judge, what, directions, computed, other,
                    each: bool = False) -> "Certificate | None":
    """The check again, allowing the disagreement between JAX's result and ``other(p, T)``'s, JAX's by another way.

    ``other`` may give a pair: the first's disagreement is allowed entry by entry, the second's largest everywhere.
    ``None`` where the other way cannot run (a direction JAX cannot differentiate in).
    """

    def both(p, T, leaves):
        outs = tuple(program(p, T, leaves))
        second = other(p, T)
        return (*outs, jnp.stack(second) if isinstance(second, tuple) else second)

    def judged(outs, T, tol):
        if computed is not None:  # [JAX's, the other way's, the plan's (certify appends it)]
            ref, second, got = outs
            pair = [ref, got]
        else:  # [the plan's, JAX's, the other way's]
            got, ref, second = outs
            pair = [got, ref]
        ref, second = np.asarray(ref), np.asarray(second)
        if second.ndim > ref.ndim:  # (entry by entry, everywhere): the latter's largest departure allowed throughout
            apart, everywhere = np.abs(second - ref)
            noise = np.maximum(apart, everywhere.max(initial=0.0))
        else:
            noise = second - ref
        return judge(pair, T, tol, noise=noise, each=each)

    try:
        return certify(traced_flat, values, both, judged, f"{what} (within JAX's own rounding)", directions, computed)
    except (TypeError, ValueError, NotImplementedError):
        return None


def nudged_point(x: jax.Array) -> jax.Array:
    """``x (1 + 4 eps)``: a point a few ulps away, where JAX's own products show the rounding of a computation."""
    return x * (1 + 4 * jnp.finfo(x.dtype).eps) if jnp.issubdtype(x.dtype, jnp.inexact) else x


def all_finite(a) -> bool:
    """Whether every entry of the host array ``a`` is finite: its largest and smallest are.

    NaN propagates through both, infinities are one or the other: two reductions, where
    ``np.isfinite(a).all()`` writes a boolean array first (a 4096 x 4096 float32 Jacobian:
    about 6 ms against 44 ms, on the first call of a structured or compressed plan).
    """
    a = np.asarray(a)
    if a.size == 0 or not np.issubdtype(a.dtype, np.inexact):
        return True
    if np.iscomplexobj(a):
        a = np.stack([a.real, a.imag])
    return bool(np.isfinite(a.max()) and np.isfinite(a.min()))


class _CheckProgram:
    """``jax.jit(staged)`` with the check's :data:`COMPILER_OPTIONS`; one this XLA does not know is dropped.

    The first compilation that names an unknown option fails at once (before compiling) and removes it
    from :data:`COMPILER_OPTIONS` for the process; the call then compiles without it.
    """

    def __init__(self, staged: Callable):
        self._staged, self._jit = staged, None

    def _fn(self):
        if self._jit is None or self._jit[0] != COMPILER_OPTIONS:
            options = dict(COMPILER_OPTIONS)
            self._jit = (options, jax.jit(self._staged, compiler_options=options))
        return self._jit[1]

    def lower(self, *args):
        return self._fn().lower(*args)

    def __call__(self, *args):
        try:
            return self._fn()(*args)
        except Exception as e:  # noqa: BLE001 - only an unknown option is handled here
            text = str(e)
            if _UNKNOWN_OPTION not in text:
                raise
            name = text.split(_UNKNOWN_OPTION, 1)[1].split()[0].strip("'\".,")
            if name not in self._jit[0]:  # (another thread may have dropped it already)
                raise
            COMPILER_OPTIONS.pop(name, None)
            return self(*args)


@contextlib.contextmanager
def own_evaluation() -> Iterator[None]:
    """A check's own evaluation, on points of its choosing, outside the user's debug modes.

    ``jax.debug_nans``, ``jax.debug_infs`` and ``jax.transfer_guard`` watch the user's computations, not these.
    """
    with jax.debug_nans(False), jax.debug_infs(False), jax.transfer_guard("allow"):
        yield


def certify(traced_flat: tuple, values: Sequence | None, program: Callable, judge: Callable, what: str,
            directions: Callable | None = None, computed: Callable | None = None,
            at_inputs: bool = False) -> Certificate:
    """Run a plan's check once, on the host, and judge it.

    Args:
      traced_flat: ``(closed, offsets, problem)`` from ``_args.trace_flat``: the jaxpr the plan was made from.
      values: the call's traced leaves, if known (``None``: a random point only).
      program: ``program(p, T, leaves) -> tuple of arrays``, traced and run once:
        ``p`` the :class:`_args.Problem` of the jaxpr at the point, ``T`` the
        directions, ``leaves`` the point (the call's traced leaves).
      judge: ``judge(outputs, T, tol) -> None`` (agrees within the relative tolerance
        ``tol``) or what disagrees (host NumPy).
      what: the directions, for the report (e.g. ``"JVPs"``, said ``"3 random JVPs"``); where it holds
        ``"{k}"``, said as it is with the number of directions there.
      directions: ``directions(rng, p) -> T`` (default: ``CHECKS`` standard normal
        tangents of ``p.x``'s shape and dtype).
      computed: ``computed(point) -> array``, appended to the program's outputs (values the
        caller computes itself at the point).
      at_inputs: check at the call's inputs (``values``) only, not first near them.

    Returns:
      The :class:`Certificate`.
    """
    closed, offsets, meta = traced_flat
    why = unevaluable(closed)
    if why:
        return Certificate("skipped", why)
    if meta.n == 0 or meta.m == 0:
        return Certificate("passed", "an empty Jacobian")
    directions = directions or (lambda rng, p: rng.standard_normal((CHECKS, p.n)).astype(p.x.dtype))
    def staged(consts, T, *leaves):
        with _compat.staged():  # one program: not an eager compilation per operation on constants
            return program(flat_problem(traced_flat, leaves, consts), T, leaves)

    run = _CheckProgram(staged)
    consts = _hoist.large(_compat.unclose(closed)[1])  # arguments of the check's program, not its constants
    tol = rtol(closed, meta.x.dtype, meta.out_dtype)
    tried = []
    for label, point in (points(closed, offsets, values) if not at_inputs or values is None
                         else [("the call's inputs", list(values))]):
        T = directions(np.random.default_rng(SEED + 1), meta)
        try:
            with jax.ensure_compile_time_eval(), own_evaluation():
                outs = [np.asarray(o) for o in _run(run, what, consts, T, point)]
            if computed is not None:  # the call's own program, as it was compiled (not under the eval context)
                with own_evaluation():
                    outs.append(np.asarray(computed(point)))
        except (jax.errors.UnexpectedTracerError, *_args.TRACER_ERRORS) as e:
            return Certificate("skipped", f"fun cannot run when the plan is made ({type(e).__name__})")
        if not all(map(all_finite, outs)):
            tried.append(label)
            continue
        detail = judge(outs, T, tol)
        if detail is not None and computed is not None and COMPILER_OPTIONS:
            # The plan's values came from the call's program, compiled as JAX compiles by default, JAX's from
            # the check's, compiled for speed: the two may round a cancellation differently (float32
            # 1 - tanh(x)**2 near saturation: 0 against 7e-7 at optimisation level 0). JAX's products again,
            # compiled as the call's program was.
            with jax.ensure_compile_time_eval(), own_evaluation():
                plain = [np.asarray(o) for o in jax.jit(staged)(consts, T, *point)]
            if all(map(all_finite, plain)) and judge(plain + outs[len(plain):], T, tol) is None:
                detail = None
        # what: the directions, counted ("3 random JVPs"), or a description with its own count ("{k}").
        checked = what.format(k=T.shape[0]) if "{k}" in what else f"{T.shape[0]} random {what}"
        if detail is None:
            return Certificate("passed", f"{checked} at {label}")
        return Certificate("failed", f"{detail}, with {checked} at {label}")
    if not tried:
        return Certificate("skipped", "a PRNG key argument has no random value and the call's inputs are unknown")
    return Certificate("skipped", f"fun or its derivative is not finite at {' or at '.join(tried)}")


# --- the checks of linear maps: a Jacobian (Hessian) given by its entries or dense -------------------------


def _segment(dst: np.ndarray, w: np.ndarray, size: int) -> np.ndarray:
    if np.iscomplexobj(w):
        return np.bincount(dst, w.real, size) + 1j * np.bincount(dst, w.imag, size)
    return np.bincount(dst, w, size)


def _apply(rows, cols, data, T, transpose: bool, size: int) -> tuple[np.ndarray, np.ndarray]:
    """``T J^T`` (``J`` from its entries) and its bound ``|T| |J|^T``; with ``transpose`` ``T J`` instead."""
    src, dst = (rows, cols) if transpose else (cols, rows)
    data = data.astype(np.result_type(data, np.float64))
    out = np.stack([_segment(dst, data * t[src], size) for t in T])
    bound = np.stack([np.bincount(dst, np.abs(data) * np.abs(t[src]), size) for t in T])
    return out, bound


def linear(traced_flat: tuple, values, evaluate: Callable, *, mode: str, entries=None, hessian=False,
           where: str = "", reference: Callable | None = None, computed: Callable | None = None) -> Certificate:
    """Certify a plan's Jacobian (or, ``hessian``, a scalar function's Hessian) against JAX.

    Args:
      evaluate: ``evaluate(p)`` -> the plan's values at the point: the entries
        ``J[rows, cols]`` (``entries=(rows, cols)``) or the dense ``(m, n)`` matrix (with
        ``entries`` too: judged on those, every nonzero required to be one of them).
      mode: ``"fwd"`` (compare ``J v`` with ``jax.jvp``) or ``"rev"`` (``u^T J`` with
        ``jax.vjp``); for Hessians ``"fwd"``/``"rev"`` is the outer direction of the
        reference Hessian-vector product (forward over reverse where JAX can).
      reference: ``reference(p, T)`` -> JAX's products with the rows of ``T``, where
        the engine computes them its own way (default: ``jax.jvp``/``jax.vjp``); or
        ``"with"``: ``evaluate(p, T)`` returns both, the plan's values and the products
        (a compressed plan pushes its seeds and ``T`` through one batched JVP: one program,
        compiled faster).
      computed: ``computed(point) -> (m, n)`` host array: the plan's Jacobian at a point, by the
        program the call already compiled (``evaluate`` is then not traced: only JAX's
        products are compiled, a program of a few passes).
    """
    closed, offsets, meta = traced_flat
    side_out = mode == "rev" and not hessian

    def directions(rng, p, binary=False):
        size, dtype = (p.m, p.out_dtype) if side_out else (p.n, p.x.dtype)
        if binary:
            return rng.integers(0, 2, (BINARY_CHECKS, size)).astype(dtype)
        return rng.standard_normal((CHECKS, size)).astype(dtype)

    def hvp(p, T, order, x=None):  # as hessian differentiates: forward over forward where a while_loop bars VJPs
        from . import _hessian  # noqa: PLC0415 - _hessian imports this module

        outer, inner = order.split("_")
        grad = _hessian.gradient(p, inner)
        g = lambda x: grad(x)[0]  # noqa: E731
        x = p.x if x is None else x
        if outer == "fwd":
            return jax.vmap(lambda t: jax.jvp(g, (x,), (t,))[1])(T)
        _, pull = jax.vjp(g, x)
        return jax.vmap(lambda t: pull(t)[0])(T)

    first_order = "rev_rev" if mode == "rev" else "fwd_rev"
    ran = []  # the reference Hessian's order: reverse outer products are rows, t^T H

    def reference_hvp(p, T, order):
        ran.append(order)
        return hvp(p, T, order)

    def products(p, x, T, c=1):  # JAX's own J (c t) / c (JVPs), or (c u)^T J / c (VJPs), at x for each row of T
        f = lambda z: p.flat(z)[0]  # noqa: E731
        if side_out:
            _, pull = jax.vjp(f, x)
            one = lambda u: pull(u)[0]  # noqa: E731
        else:
            one = lambda t: jax.jvp(f, (x,), (t,))[1]  # noqa: E731
        return jax.vmap(one if c == 1 else lambda v: one(c * v) / c)(T)

    def program(p, T, leaves):
        if reference == "with" and computed is None:
            return evaluate(p, T)
        got = None if computed is not None else evaluate(p)
        if reference is not None:
            ref = reference(p, T)
        elif hessian:
            ref = _args.with_fallback(lambda order: reference_hvp(p, T, order), first_order, "rev_rev", "fwd_fwd",
                                      where, closed)
        else:  # where JAX's own products raise, it is JAX that cannot differentiate fun here
            ref = _args.jax_itself(products, p, p.x, T)
        return (ref,) if got is None else (got, ref)

    def judge(outs, T, tol, noise=None, each=False, floor=None):
        got, ref = (outs[1], outs[0]) if computed is not None else outs
        # A Hessian's rows where JAX's products were reverse over reverse: they equal its columns only where it
        # is symmetric, which JAX's jacrev(grad) of a custom_vjp whose rule is not a derivative is not.
        rows_of = side_out or (hessian and bool(ran) and ran[-1].startswith("rev_"))
        if entries is not None:
            rows, cols = (np.asarray(v) for v in entries)
            size = ref.shape[1]
            if got.ndim == 2 and got.shape == (meta.m, meta.n):  # the call's dense result: its entries there
                on = got[rows, cols]
                if np.count_nonzero(got) != np.count_nonzero(on):
                    r, c = np.argwhere(got)[~np.isin(np.flatnonzero(got), rows * meta.n + cols)][0]
                    return f"an entry at ({r}, {c}), {got[r, c]:.6g}, off the plan's pattern"
                got = on
            prod, bound = _apply(rows, cols, got, T, rows_of, size)
        else:
            # In the plan's own precision (at least float32): the products' rounding, ~sqrt(n) eps, is far
            # below the tolerance (sqrt(eps)), and a large dense Jacobian is not copied to float64.
            J = got.astype(np.result_type(got, np.float32), copy=False)
            T = T.astype(np.result_type(T.dtype, J.dtype), copy=False)
            # As (n, k) products transposed: NumPy's (k, n) @ (n, n) with k = 3 took 5-10x longer (47 ms
            # against 5-10 ms at n = 2304, most of a Gram matrix's certificate).
            A = J.T if rows_of else J
            prod, bound = (A @ T.T).T, (np.abs(A) @ np.abs(T).T).T
        bound = bound if floor is None else bound + floor
        return compare(prod, ref, bound, tol, "input entry" if rows_of else "output entry", noise, each)

    what = ("Hessian-vector products" if hessian else "VJPs" if side_out else "JVPs")
    cert = certify(traced_flat, values, program, judge, what, directions, computed)
    if cert.failed and hessian and reference is None:
        # Rounding alone, where the Hessian is at rounding level (identically zero, say): JAX's two orders
        # of differentiation then disagree by as much, entry by entry, and JAX's own products at a point a few
        # ulps away along 3 t (where one order alone is open, the two orders are one) by as much everywhere.
        # The plan stands if it is within that of JAX.
        def other(p, T):
            second = _args.with_fallback(lambda order: hvp(p, T, order), "rev_rev" if first_order == "fwd_rev"
                                         else "fwd_rev", "rev_rev", "fwd_fwd", where, closed)
            x = nudged_point(p.x)
            nudged = _args.with_fallback(lambda order: hvp(p, 3 * T, order, x) / 3, first_order, "rev_rev",
                                         "fwd_fwd", where, closed)
            return second, nudged

        noisy = _second_opinion(traced_flat, values, program, judge, what, directions, computed, other)
        if noisy is not None and not noisy.failed:
            return noisy
        # (Both sides rounding at a saturated point near the call's inputs: a float32 log-sum-exp.)
        calm = at_inputs_scale(traced_flat, values, program, lambda outs, T, tol, floor: judge(
            outs, T, tol, floor=floor), lambda outs: float(np.abs(outs[0] if computed is not None else outs[1]).max(
                initial=0.0)), what, directions, computed)
        if calm is not None:
            return calm
    if cert.failed and not hessian and reference in (None, "with"):
        # Where fun amplifies rounding (a chaotic recurrence: a scan feeding sin values near 1e10), JAX's own
        # products move by as much when the point moves by a few ulps (two programs that round one step
        # differently, the plan's and JAX's, part as far). The plan stands if it is within that of JAX: the
        # map's own conditioning, entry by entry; a wrong pattern or entry is far outside it. And JAX's
        # products with 3 T, over 3, everywhere: where the Jacobian is zero but for rounding (``x * (1 / x)``),
        # ``J v`` is linear in ``v`` only up to that rounding (the plan's 0/1 seeds and the check's Gaussian
        # directions round differently), which is the computation's, not an entry's.
        # (Not with custom rules: one may be nonlinear in its tangent, a clipped gradient, and the 3 T
        # products then part by as much as J itself, an allowance that would excuse any error.)
        linear = not CUSTOM & primitives(closed)

        def nudged(p, T):
            x = nudged_point(p.x)
            return (products(p, x, T), products(p, p.x, T, 3)) if linear else products(p, x, T)

        noisy = _second_opinion(traced_flat, values, program, judge, what, directions, computed, nudged, each=True)
        if noisy is not None and not noisy.failed:
            return noisy
    if cert.failed and CUSTOM & primitives(closed):
        # A custom rule may not be linear in the tangent (a gradient clipped in a custom_vjp): the plan's
        # 0/1 seeds then see another map than Gaussian directions do. Random 0/1 directions see the same
        # (Freivalds' own check: each misses an error with probability at most 1/2).
        binary = certify(traced_flat, values, program, judge, f"0/1 {what} (fun has custom rules)",
                         lambda rng, p: directions(rng, p, binary=True), computed)
        if not binary.failed:
            return binary
    return cert
