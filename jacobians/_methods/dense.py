"""Dense forward and reverse: one JVP per input entry, or one VJP per output entry (``jax.jacfwd``/``jacrev``)."""

from .. import _args, kernels
from ._base import Blocks, Call, Candidate, Context


class Dense:
    """The basis-vector method: exact, never wrong, ``min(n, m)`` passes at best."""

    name = "dense"
    margin = 1.0

    def candidates(self, ctx: Context) -> list[Candidate]:
        out = []
        if "fwd" in ctx.allowed:
            out.append(Candidate(self, "fwd", ctx.n, ctx.n * ctx.f))
        if "rev" in ctx.allowed:
            # Ties go to reverse: on square maps its batched products run faster on CPU.
            out.append(Candidate(self, "rev", ctx.m, ctx.m * ctx.f * (0.999 if ctx.n == ctx.m else 1.0)))
        return out

    def evaluate(self, cand: Candidate, call: Call):
        p = call.problem
        if call.tree and (done := p.tree_dense(cand.mode)) is not None:
            return Blocks(done[0]), done[1]
        kernel = kernels.forward if cand.mode == "fwd" else kernels.reverse
        _, jac, aux = kernel(p.flat, p.x, call.chunk_size, call.shards)
        return jac, aux

    def evaluate_either(self, mode: str, call: Call, where: str):
        """``evaluate`` in ``mode``, or in the other direction where JAX cannot differentiate in this one."""
        return _args.with_fallback(lambda d: self.evaluate(Candidate(self, d, 0, 0.0), call), mode, "rev", "fwd",
                                   where, call.problem.jaxpr)

    def certify(self, cand, traced_flat, values, where, computed=None):
        return None  # JAX's own JVPs/VJPs


DENSE = Dense()
