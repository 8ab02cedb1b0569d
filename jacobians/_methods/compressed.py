"""Compressed forward or reverse: one JVP/VJP per colour of the detected pattern, then a gather (Curtis-Powell-Reid)."""

import numpy as np

from .. import _deps, _sparse, _trust
from ._base import Call, Candidate, Context, single

PASS_OVERHEAD = 0.25  # a compressed pass also builds its seed and gathers: count it a bit dearer
DENSITY_BUDGET = 0.25  # stop detecting once nnz > this fraction of m * n (dense enough)
NNZ_CAP = 1 << 22  # and never hold more than this many entries while planning
SAMPLE = 64  # columns seeded by the detection pre-pass that can rule colourings out
SAMPLE_FROM = 4096  # inputs from which that pre-pass pays for itself
OWN_PROGRAM_MAX = 1 << 22  # entries of the dense result up to which the check reads the call's own result
# (above, rerunning it writes and copies m n entries: a 4096 x 4096 diagonal's first call 25 ms slower)


class Compressed:
    """Detection, colouring and one pass per colour; costed as passes, the gather of ``nnz`` entries and the zeros.

    The zeros: the dense result's ``m n`` entries, filled before the values are scattered into
    them (no other method writes the result twice).
    """

    name = "compressed"
    margin = 1.0

    def candidates(self, ctx: Context) -> list[Candidate]:
        n, m, f = ctx.n, ctx.m, ctx.f
        if ctx.detect is None or n * m == 0 or min(n, m) <= 2:
            return []
        best = ctx.best if ctx.best < float("inf") else min(n, m) * f
        # A colouring also pays one gather per entry: past this many entries it cannot win.
        budget = min(int(DENSITY_BUDGET * n * m), NNZ_CAP, max(int(best - (1 + PASS_OVERHEAD) * f), 0))
        forced = single(ctx.allowed)
        try:
            if n >= SAMPLE_FROM and _sample_rules_out(ctx.detect, budget, n, f, ctx.allowed, best):
                ctx.notes.append(f"no colouring can win (the pattern's restriction to {SAMPLE} columns "
                                 "already needs as many passes as dense)")
                return []
            plan = ctx.color(ctx.detect(budget), forced or "auto")
        except _deps.TooDense:
            ctx.notes.append("the pattern is dense (detection stopped at the density budget)")
            return []
        nnz = plan.pattern.nnz
        cost = plan.n_colors * f * (1 + PASS_OVERHEAD) + nnz + n * m  # + the dense result's zeros, scattered into
        verdict = f"{plan.n_colors} colours" if cost < best else (
            f"{plan.n_colors} colours do not pay for the decompression")
        return [Candidate(self, plan.mode, plan.n_colors, cost, plan, nnz, verdict)]

    def evaluate(self, cand: Candidate, call: Call):
        return call.compressed()

    def certify(self, cand, traced_flat, values, where, computed=None):
        meta = traced_flat[2]
        if computed is not None and meta.m * meta.n <= OWN_PROGRAM_MAX:
            # By the call's own program at the check's point (run once more: it is compiled), so that only
            # JAX's few JVPs (VJPs) compile for the check, alongside the call's program: a compiled program
            # of the plan's own for the check cost the 3x16x16 -> 8x16x16 convolution's first call 40-50 ms
            # of its 170 (2 cores).
            # Judged on the pattern's entries (the dense result's products with the check's directions cost
            # two (m, n) matrix products on the host: 80 ms of a 4096-input elementwise map's first call),
            # after checking that every nonzero of the result lies on the pattern.
            pattern = cand.state.pattern
            return _trust.linear(traced_flat, values, None, mode=cand.mode, where=where, computed=computed,
                                 entries=(pattern.rows, pattern.cols))
        # Else the seeds and the check's directions go through one batched JVP: the dense result's m n
        # entries are not written (and copied to the host) once more.
        return _sparse.certify_plan(cand.state, traced_flat, values, where)


def _sample_rules_out(detect, budget: int, n: int, f: float, allowed, best: float) -> bool:
    """Whether the pattern restricted to ``SAMPLE`` columns proves that no colouring beats ``best``.

    A sub-pattern bounds every colouring from below: the column colours by its
    longest row, the row colours by its longest column, the gather by its
    entries. Detection on a sample costs a fraction of full detection, which on
    a dense map (a parameter Jacobian with few outputs) is most of the planning.
    """
    cols = np.unique(np.linspace(0, n - 1, SAMPLE).round().astype(np.int64))
    pattern = detect(budget, cols).pattern
    rows, cs = pattern.rows, pattern.cols
    if rows.size == 0:
        return False
    bounds = []
    if "fwd" in allowed:
        bounds.append(int(np.bincount(rows).max()))
    if "rev" in allowed:
        bounds.append(int(np.bincount(cs).max()))
    return min(bounds) * f * (1 + PASS_OVERHEAD) + rows.size >= best


COMPRESSED = Compressed()
