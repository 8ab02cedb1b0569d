"""``python -m bench.jax787``: the jax#787 pairwise-energy Hessian under ``max_memory`` (not in ``python -m bench``).

jax#787: ``jax.hessian`` of a pairwise energy over 2483 atoms x 3 coordinates
(n = 7449) asks for hundreds of GB for a result of n^2 entries. This runs
``jacobians.hessian(energy, max_memory=...)`` on it, measures the process's
peak RSS (``getrusage``, the whole process: JAX runtime, compilation, the
program) against the budget, XLA's memory analysis of the chosen and the
unchunked programs, checks a few Hessian columns against
``jax.jvp(jax.grad(energy))`` on basis vectors, and writes
``bench/results/jax787-<tag>.json`` and ``.md``.

Run alone (it takes minutes; the peak RSS is the process's own)::

    python -m bench.jax787 --dtype float32 --max-memory 4GB --tag cpu-2core
"""

import argparse
import json
import os
import resource
import sys
import time

import numpy as np


def positions(atoms: int, seed: int = 0) -> np.ndarray:
    """``(atoms, 3)`` points on a jittered cubic lattice of spacing 1.1 (no two closer than about 0.9)."""
    side = int(np.ceil(atoms ** (1 / 3)))
    grid = np.stack(np.meshgrid(*[np.arange(side)] * 3, indexing="ij"), -1).reshape(-1, 3)[:atoms]
    return 1.1 * grid + 0.05 * np.random.default_rng(seed).standard_normal((atoms, 3))


def make_energy(atoms: int):
    """``E(x) = sum_{i<j} 4 (r_ij^-12 - r_ij^-6) + 1 / r_ij``, ``x`` of shape ``(3 atoms,)``: LJ + Coulomb."""
    import jax.numpy as jnp
    from jax import lax

    def energy(x):
        p = x.reshape(atoms, 3)
        d = p[:, None, :] - p[None, :, :]
        # The pairs i < j from iotas, not a closed-over (atoms, atoms) NumPy mask: XLA:CPU embeds such a
        # constant in every compiled program, and each compile then kept ~40-100 MB of host memory.
        upper = lax.broadcasted_iota(jnp.int32, (atoms, atoms), 0) < lax.broadcasted_iota(jnp.int32, (atoms, atoms), 1)
        r2 = jnp.where(upper, jnp.sum(d * d, axis=-1), 1.0)  # 1 off the pairs: no 1/0, a zero gradient there
        inv6 = 1.0 / (r2 * r2 * r2)
        pair = 4.0 * (inv6 * inv6 - inv6) + jnp.sqrt(1.0 / r2)
        return jnp.sum(jnp.where(upper, pair, 0.0))

    return energy


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def _current_rss_mb() -> float:
    with open("/proc/self/status") as fh:
        return next(int(ln.split()[1]) for ln in fh if ln.startswith("VmRSS:")) / 1024


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.jax787", description=__doc__.splitlines()[0])
    ap.add_argument("--atoms", type=int, default=2483)
    ap.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    ap.add_argument("--max-memory", default="4GB")
    ap.add_argument("--columns", type=int, default=4, help="Hessian columns checked against jax.jvp(jax.grad)")
    ap.add_argument("--tag", default=None, help="write bench/results/jax787-<tag>.json/.md (default: no file)")
    args = ap.parse_args(argv)

    import jax

    if args.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    import jacobians
    from jacobians import _memory

    from .suite import _machine, _versions

    rss_start = _current_rss_mb()
    n = 3 * args.atoms
    energy = make_energy(args.atoms)
    x = jnp.asarray(positions(args.atoms).reshape(-1), dtype=args.dtype)
    budget = _memory.parse(args.max_memory, "jax787")
    print(f"jax787: {args.atoms} atoms, n = {n}, {args.atoms * (args.atoms - 1) // 2} pairs, {args.dtype}, "
          f"max_memory={args.max_memory}; RSS at start {rss_start:.0f} MB", flush=True)

    h = jacobians.hessian(energy, max_memory=args.max_memory)
    t0 = time.perf_counter()
    fit = h.memory(x)  # compiles the unchunked program and the chunked candidates; XLA's analysis of each
    t_plan = time.perf_counter() - t0
    print(fit, flush=True)
    rss_after_plan, peak_after_plan = _current_rss_mb(), _rss_mb()
    print(f"planned in {t_plan:.1f} s; RSS {rss_after_plan:.0f} MB, peak so far {peak_after_plan:.0f} MB", flush=True)

    t0 = time.perf_counter()
    H = jax.block_until_ready(h(x))  # compiles the chosen program once more (the call's own jit), then runs it
    t_first = time.perf_counter() - t0
    peak_after_hessian = _rss_mb()
    print(f"Hessian {H.shape} {H.dtype} in {t_first:.1f} s (first call, compile included); "
          f"peak RSS {peak_after_hessian:.0f} MB", flush=True)

    # A few columns against forward-over-reverse on basis vectors (one HVP each).
    hvp = jax.jit(lambda v: jax.jvp(jax.grad(energy), (x,), (v,))[1])
    cols = np.random.default_rng(1).choice(n, size=min(args.columns, n), replace=False)
    errs = []
    for j in cols:
        want = np.asarray(hvp(jnp.zeros(n, x.dtype).at[j].set(1)))
        got = np.asarray(H[:, j])
        errs.append(float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30)))
    tol = 1e-4 if args.dtype == "float32" else 1e-10
    sym = float(np.max(np.abs(np.asarray(H[np.ix_(cols, cols)] - H[np.ix_(cols, cols)].T))))
    ok = max(errs) <= tol and bool(np.all(np.isfinite(np.asarray(H[:, cols]))))
    print(f"columns {cols.tolist()}: max relative error {max(errs):.2e} (tol {tol:g}); "
          f"{'OK' if ok else 'MISMATCH'}", flush=True)

    tried = [{"chunk_size": c, "xla_bytes": b} for c, b in fit.tried]
    report = {
        "what": "jax#787: jacobians.hessian of a pairwise Lennard-Jones + Coulomb energy under max_memory",
        "command": "python -m bench.jax787 " + " ".join(argv if argv is not None else sys.argv[1:]),
        "atoms": args.atoms, "n": n, "pairs": args.atoms * (args.atoms - 1) // 2, "dtype": args.dtype,
        "max_memory": args.max_memory, "budget_bytes": budget,
        "chunk_size": fit.chunk_size, "hvps_per_chunk": fit.chunk_size or n,
        "xla_bytes_chosen": fit.bytes, "xla_bytes_unchunked": dict(fit.tried).get(n),
        "result_bytes": int(H.size * H.dtype.itemsize), "tried": tried,
        "memory": str(fit),
        "plan_seconds": t_plan, "first_call_seconds": t_first,
        "peak_rss_mb": peak_after_hessian, "peak_rss_bytes": int(peak_after_hessian * 2**20),
        "rss_at_start_mb": rss_start, "rss_after_plan_mb": rss_after_plan, "peak_rss_after_plan_mb": peak_after_plan,
        "under_budget": peak_after_hessian * 2**20 < budget,
        "columns_checked": cols.tolist(), "column_rel_errors": errs, "symmetry_abs_error": sym, "ok": ok,
        "load_average": os.getloadavg(), "machine": _machine(), "versions": _versions(),
    }
    print(json.dumps({k: report[k] for k in ("chunk_size", "xla_bytes_chosen", "xla_bytes_unchunked", "peak_rss_mb",
                                               "under_budget", "first_call_seconds", "ok")}), flush=True)
    if args.tag:
        out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"jax787-{args.tag}")
        with open(out + ".json", "w") as fh:
            json.dump(report, fh, indent=1)
        with open(out + ".md", "w") as fh:
            fh.write(_markdown(report))
        print(f"wrote {out}.json, {out}.md", flush=True)
    return 0 if ok and report["under_budget"] else 1


def _label(c, n) -> str:
    return "all, planned" if c is None else f"all {n} at once (unplanned)" if c >= n else str(c)


def _markdown(r: dict) -> str:
    gb = 1e9
    rows = "\n".join(f"| {_label(t['chunk_size'], r['n'])} | {t['xla_bytes'] / gb:.3g} GB |" for t in r["tried"])
    peak, err = r["peak_rss_mb"] * 2**20 / gb, max(r["column_rel_errors"])
    own, ok = (r["peak_rss_mb"] - r["rss_after_plan_mb"]) * 2**20 / gb, "OK" if r["ok"] else "MISMATCH"
    verdict = f"budget {r['budget_bytes'] / gb:.3g} GB: {'under' if r['under_budget'] else 'OVER'}"
    return f"""# jax#787: a pairwise-energy Hessian under `max_memory`

`{r['command']}`

{r['atoms']} atoms x 3 coordinates (n = {r['n']}, {r['pairs']} pairs), Lennard-Jones + Coulomb, {r['dtype']};
`jacobians.hessian(energy, max_memory="{r['max_memory']}")`.

| | |
|---|---|
| result | {r['result_bytes'] / gb:.3g} GB |
| every HVP at once (`jax.hessian`'s program), XLA + largest array | {(r['xla_bytes_unchunked'] or 0) / gb:.4g} GB |
| chunk chosen | {r['chunk_size']} HVPs at a time |
| chosen program, XLA's analysis + largest array | {r['xla_bytes_chosen'] / gb:.3g} GB |
| **measured peak RSS of the process** (getrusage: runtime + compiles + run) | **{peak:.3g} GB** ({verdict}) |
| peak RSS less the RSS before the call (the call's own) | {own:.3g} GB |
| planning (compiles of the candidates) | {r['plan_seconds']:.1f} s |
| first call (compile + {r['n']} HVPs) | {r['first_call_seconds']:.1f} s |
| columns {r['columns_checked']} vs `jax.jvp(jax.grad(E))` | max relative error {err:.2e} ({ok}) |

Programs compiled to choose (XLA's memory analysis: arguments + result + temporaries, + the largest array):

| chunk | bytes |
|---|---|
{rows}

Machine: {r['machine']['cpu']}, {r['machine']['cores']} cores, {r['machine']['jax_backend']};
load average at the end {', '.join(f'{v:.2f}' for v in r['load_average'])} (shared machine);
jax {r['versions']['jax']}, jacobians commit {r['versions']['commit']}.
"""


if __name__ == "__main__":
    sys.exit(main())
