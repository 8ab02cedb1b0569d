"""The primitive conformance suite: every catalogued primitive case through every analysis.

The catalogue is :mod:`conformance` (shapes, dimension numbers, strides, padding,
dilations, index modes, fill values, batch dims, real and complex, as JAX's own
lax tests). Each case goes through: the first-order pattern (a superset of the
nonzeros of ``jax.jacfwd`` at two random points), the Hessian pattern of two
scalarisations (a superset of ``jax.hessian``'s nonzeros) and ``sparse_hessian``,
the batch-independence proof (never for a coupled batch; right when given),
the structured sweeps forward and reverse, the compressed and sparse engines and
the default ``jacobian`` (equal to JAX's), and the host evaluator of movement and
integer primitives (equal to XLA on every equation it claims).

The default run is a bounded, deterministic sample (one case per family, all
analyses, plus the host-evaluation cases). ``JACOBIANS_CONFORMANCE=full`` runs
everything (every case, and every case under ``jax.vmap``); so does::

    python -m tests.test_conformance --full [--write tests/conformance_table.md] [-k SUBSTRING]

which prints the coverage table (primitive, rule family, parameter sets, analyses
passed) and every failure.
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # also when run as `python -m tests.test_conformance`

import conformance  # noqa: E402
import pytest  # noqa: E402

FULL = os.environ.get("JACOBIANS_CONFORMANCE", "") == "full"
OK = ("pass", "conservative", "n/a")

# Failures found by this suite whose fixes belong to the rules' owners: each flips (and the strict
# xfail fails) when fixed. Keyed by (case name, analysis).
KNOWN: dict[tuple[str, str], str] = {}


def _pairs():
    if FULL:
        return [(c, a) for c in conformance.all_cases() for a in conformance.ANALYSES]
    return conformance.sample()


def _params():
    out = []
    for c, a in _pairs():
        marks = [pytest.mark.xfail(strict=True, reason=KNOWN[c.name, a])] if (c.name, a) in KNOWN else []
        out.append(pytest.param(c, a, id=f"{c.name}-{a}", marks=marks))
    return out


@pytest.mark.parametrize("case, analysis", _params())
def test_conformance(case, analysis):
    out = conformance.run(case, analysis)
    assert out.ok, f"{case.name} / {analysis}: {out.status}: {out.detail}"


@pytest.mark.parametrize("name", sorted(conformance.HOST_CASES))
def test_host_eval_integers_and_movement(name):
    """Integer arithmetic (wrap-around at the edges of each dtype), conversions and movement on the host = XLA."""
    out = conformance.run_host(name)
    assert out.status == "pass", f"{name}: {out.status}: {out.detail}"


def test_sample_covers_every_family():
    """The default sample has a case of every family, and the cases cover the rule tables and the primitive catalogue."""
    fams = {c.family for c, _ in conformance.sample()}
    assert fams == {c.family for c in conformance.CASES.values()}
    from jacobians._deps import RULES

    covered = {c.primitive for c in conformance.CASES.values()}
    # Rules whose primitives jax.numpy and jax.lax emit only in forms without derivatives (or not at all
    # on CPU): they are exercised by the host-evaluation cases or not differentiable in JAX.
    untested = {"add_any", "and", "or", "xor", "not", "eq", "ne", "lt", "le", "gt", "ge", "copy_p", "zeta",
                "eq_to", "lt_to", "le_to", "mulhi",  # boolean and integer results; not in jax.lax's namespace
                "random_gamma_grad", "igamma_grad_a", "nextafter", "geqp3", "geqrf", "householder_product",
                "hessenberg", "schur", "tridiagonal", "custom_vjp_call_jaxpr", "scatter_add", "scatter_sub",
                "scatter_mul", "scatter_min", "scatter_max", "unstack",
                "reduce_window",  # the generic one: JAX cannot jacfwd/jacrev it (test_second_trust walks JVPs)
                "mesh_cast", "reshard",  # explicit-axis sharding: identities, not emitted on one device
                "pure_callback", "io_callback"}  # JAX cannot differentiate them (tests/test_detection.py)
    missing = set(RULES) - covered - untested
    assert not missing, f"primitives with a rule but no conformance case: {sorted(missing)}"
    from jacobians._primitives import ALL

    missing = set(ALL) - covered - untested
    assert not missing, f"primitives in the catalogue but no conformance case: {sorted(missing)}"


def main(argv=None) -> int:
    import argparse

    import jax

    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_numpy_rank_promotion", "raise")
    jax.config.update("jax_numpy_dtype_promotion", "strict")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="every case (and under vmap), not the sample")
    ap.add_argument("--no-vmap", action="store_true", help="with --full: leave out the cases under jax.vmap")
    ap.add_argument("-k", default="", help="only cases whose name contains this")
    ap.add_argument("--analysis", action="append", help="only these analyses (repeatable)")
    ap.add_argument("--write", help="also write the table (Markdown) to this file")
    ap.add_argument("--log", help="append each result to this JSON-lines file and skip the pairs it already holds "
                                  "(a long run resumes where it stopped; the table covers the whole log)")
    ap.add_argument("--recheck", help="run again only the pairs that failed in this JSON-lines log")
    args = ap.parse_args(argv)
    analyses = args.analysis or conformance.ANALYSES
    if args.full:
        pairs = [(c, a) for c in conformance.all_cases(vmap=not args.no_vmap) for a in analyses]
    else:
        pairs = [(c, a) for c, a in conformance.sample() if a in analyses]
    pairs = [(c, a) for c, a in pairs if args.k in c.name]
    if args.recheck:
        with open(args.recheck) as fh:
            bad = {(r["case"], r["analysis"]) for r in map(json.loads, fh) if r["status"] not in OK}
        everything = {c.name: c for c in conformance.all_cases()}
        pairs = [(everything[n], a) for n, a in sorted(bad) if n in everything and a in analyses]
    cases = list(dict.fromkeys(c for c, _ in pairs))
    results, failures, t0 = {}, [], time.time()
    if args.log and os.path.exists(args.log):
        with open(args.log) as fh:
            for line in fh:
                r = json.loads(line)
                results[r["case"], r["analysis"]] = conformance.Outcome(r["status"], r["detail"])
    for i, c in enumerate(cases):
        for a in (a for d, a in pairs if d is c):
            if (c.name, a) in results:
                out = results[c.name, a]
            else:
                out = conformance.run(c, a)
                results[c.name, a] = out
                if args.log:
                    with open(args.log, "a") as fh:
                        fh.write(json.dumps(dict(case=c.name, analysis=a, status=out.status, detail=out.detail)) + "\n")
            if not out.ok:
                known = KNOWN.get((c.name, a))
                failures.append(f"[{out.status}{' known: ' + known if known else ''}] {c.name} / {a}: {out.detail}")
                print(failures[-1], flush=True)
        conformance._CONTEXTS.pop(c.name, None)  # its compiled references are not needed again
        if i % 50 == 49:
            print(f"... {i + 1}/{len(cases)} cases, {time.time() - t0:.0f} s", flush=True)
    for name in conformance.HOST_CASES:
        if args.k in name:
            out = conformance.run_host(name)
            results[f"host_eval[{name}]", "host_eval"] = out
            if out.status != "pass":
                failures.append(f"[{out.status}] host case {name}: {out.detail}")
                print(failures[-1], flush=True)
    tab = conformance.table(results)
    n_fail = len(failures)
    summary = (f"{len(cases)} cases, {len(pairs)} (case, analysis) pairs + host cases: {len(results)} results, {n_fail} "
               f"failures ({sum(1 for f in failures if 'known:' in f)} known), {time.time() - t0:.0f} s")
    print(tab)
    print(summary)
    if args.write:
        with open(args.write, "w") as fh:
            fh.write("# Primitive conformance: coverage\n\nGenerated by `python -m tests.test_conformance "
                     f"{'--full ' if args.full else ''}--write {args.write}` (see `tests/conformance.py`). Each cell: "
                     "cases passed / cases where the analysis applies; 'cons.' counts batch-independence refusals "
                     "of independent batches (allowed, not tight).\n\n" + tab + "\n\n" + summary + "\n")
            if failures:
                fh.write("\nFailures:\n\n" + "\n".join(f"- {f}" for f in failures) + "\n")
    return 1 if any("known:" not in f for f in failures) else 0


if __name__ == "__main__":
    sys.exit(main())
