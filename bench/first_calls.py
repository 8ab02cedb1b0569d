"""First calls, paired: a new function each round, ``jacobians`` against the better raw JAX program.

``python -m bench.first_calls [--rounds R] [--only NAME ...] [--name STEM]``

A first call is what a user pays for a new function: trace, plan (and certify), compile,
run. One first call per process is noisy (the machine, XLA's thread pools), so each round
builds fresh closures (a new constant each round: nothing is cached between rounds) and
times the library's first call and each raw JAX program's first call back to back; the
quoted figure is the median over rounds of the per-round ratio to the better raw program.
Results go to ``bench/results/first-calls-<STEM>.{json,md}`` with the machine and versions.
"""

import argparse
import json
import pathlib
import platform
import sys
import time

import numpy as np


def _workloads(rng):
    import jax
    import jax.numpy as jnp

    f32 = jnp.float32

    def mlp(n):
        W1 = jnp.asarray(rng.standard_normal((n, n)) / np.sqrt(n), f32)
        W2 = jnp.asarray(rng.standard_normal((n, n)) / np.sqrt(n), f32)
        return W1, W2, jnp.asarray(rng.standard_normal(n), f32)

    out = {}
    x = jnp.asarray(rng.standard_normal(4096), f32)
    out["elementwise_4096"] = ("jacobian", x, lambda c: (lambda x: jnp.sin(x) * x + c))
    K = jnp.asarray(rng.standard_normal((8, 3, 3, 3)) / 5, f32)
    x = jnp.asarray(rng.standard_normal((3, 16, 16)), f32)
    out["conv_3x16x16to8"] = ("jacobian", x, lambda c: (
        lambda x: jnp.tanh(jax.lax.conv_general_dilated(x[None], K, (1, 1), "SAME")[0] + c)))
    for n in (256, 1024):
        W1, W2, x = mlp(n)
        out[f"mlp_{n}"] = ("jacobian", x, lambda c, W1=W1, W2=W2: (lambda x: jnp.tanh(W2 @ jnp.tanh(W1 @ x) + c)))
    x = jnp.asarray(rng.standard_normal((48, 48)), f32)
    out["gram_48x48"] = ("jacobian", x, lambda c: (lambda R: R.T @ R + c))
    for n in (256, 1024):
        W1, W2, x = mlp(n)
        out[f"hessian_mlp_{n}"] = ("hessian", x, lambda c, W1=W1, W2=W2: (
            lambda x: 0.5 * jnp.sum(jnp.tanh(W2 @ jnp.tanh(W1 @ x)) ** 2) + c))
    W1, W2, x = mlp(1024)
    out["divergence_mlp_1024"] = ("divergence", x, lambda c: (lambda x: jnp.tanh(W2 @ jnp.tanh(W1 @ x) + c)))
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    p = {"w1": jax.random.normal(k[0], (512, 784)) / 28, "b1": jnp.zeros(512),
         "w2": jax.random.normal(k[1], (512, 512)) / 22, "b2": jnp.zeros(512),
         "w3": jax.random.normal(k[2], (10, 512)) / 22, "b3": jnp.zeros(10)}
    xin = jax.random.normal(k[3], (784,))

    def net(c):
        def f(p):
            h = jnp.tanh(p["w1"] @ xin + p["b1"])
            h = jnp.tanh(p["w2"] @ h + p["b2"])
            return p["w3"] @ h + p["b3"] + c
        return f

    out["param_mlp_784x512x10"] = ("jacobian-rev", p, net)
    return out


def _programs(kind, f):
    """The library's transformation and the raw JAX programs it is compared with."""
    import jax
    import jax.numpy as jnp

    import jacobians

    if kind == "hessian":
        return jacobians.hessian(f), {"jax.hessian": jax.jit(jax.hessian(f))}
    if kind == "divergence":
        return jacobians.divergence(f), {"trace(jacfwd)": jax.jit(lambda x: jnp.trace(jax.jacfwd(f)(x)))}
    raw = {"jacrev": jax.jit(jax.jacrev(f))}
    if kind == "jacobian":
        raw["jacfwd"] = jax.jit(jax.jacfwd(f))
    return jacobians.jacobian(f), raw


def _first(fn, x) -> float:
    import jax

    t0 = time.perf_counter()
    jax.block_until_ready(fn(x))
    return time.perf_counter() - t0


def _planning(lib, x) -> float | None:
    """The seconds the library's first call spent planning (its plan's ``seconds``; None if it has no plan)."""
    try:
        seconds = lib.plan(x).seconds  # the plan the first call made, cached: not planned again
    except (AttributeError, TypeError, ValueError):
        return None
    return None if seconds is None else float(seconds)


def run(rounds: int, only: list[str]) -> dict:
    from .suite import _warm_up

    _warm_up("float32")
    rng = np.random.default_rng(0)
    results = {}
    for name, (kind, x, make) in _workloads(rng).items():
        if only and name not in only:
            continue
        ours, raws, ratios, plans = [], {}, [], []
        for r in range(rounds):
            c = 1e-3 * (r + 1)
            lib, _ = _programs(kind, make(c))  # a fresh closure for each: nothing cached between them
            if r % 2:  # the order alternates: neither side always runs on a machine the other warmed
                ours.append(_first(lib, x))
            raw_now = {k: _first(v, x) for k, v in _programs(kind, make(c + 0.5))[1].items()}
            if not r % 2:
                ours.append(_first(lib, x))
            if (planned := _planning(lib, x)) is not None:
                plans.append(planned / ours[-1])
            for k, v in raw_now.items():
                raws.setdefault(k, []).append(v)
            ratios.append(ours[-1] / min(raw_now.values()))
        row = {"kind": kind, "rounds": rounds, "jacobians_s": float(np.median(ours)),
               "raw_s": {k: float(np.median(v)) for k, v in raws.items()},
               "ratio_median": float(np.median(ratios)), "ratio_min": float(min(ratios)),
               "ratio_max": float(max(ratios)),
               "planning_share": float(np.median(plans)) if plans else None}
        results[name] = row
        print(f"{name:24s} jacobians {1e3 * row['jacobians_s']:7.1f} ms  "
              + "  ".join(f"{k} {1e3 * v:7.1f} ms" for k, v in row["raw_s"].items())
              + f"  ratio {row['ratio_median']:.2f} ({row['ratio_min']:.2f}-{row['ratio_max']:.2f})"
              + (f"  planning {100 * row['planning_share']:.0f}%" if plans else ""), flush=True)
    return results


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.first_calls", description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--only", action="append", default=[])
    ap.add_argument("--name", default=None, help="save bench/results/first-calls-NAME.{json,md}")
    args = ap.parse_args(argv)
    import jax
    import jaxlib

    results = run(args.rounds, args.only)
    if args.name:
        from .suite import _machine  # noqa: PLC0415

        machine = _machine()
        meta = {"command": "python -m bench.first_calls " + " ".join(sys.argv[1:] if argv is None else argv),
                "machine": f"{machine['cpu']}, {machine['cores']} cores, {machine['platform']}",
                "python": platform.python_version(), "jax": jax.__version__,
                "jaxlib": jaxlib.__version__}
        out = pathlib.Path(__file__).parent / "results" / f"first-calls-{args.name}"
        out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
        lines = ["# First calls, paired", "", f"Command: `{meta['command']}`", "",
                 f"Machine: {meta['machine']}; Python {meta['python']}, jax {meta['jax']}, jaxlib {meta['jaxlib']}.",
                 "", "Each round: fresh closures, the library's first call and each raw program's first call; "
                 "the ratio is the library's over the better raw program's, median (min-max) over rounds; "
                 "planning: the share of the library's first call its plan took (the plan's `seconds`: the "
                 "analyses, and the certificate's program lowered), median over rounds.", "",
                 "| workload | jacobians | raw JAX | ratio | planning |", "|---|---|---|---|---|"]
        for name, row in results.items():
            raw = ", ".join(f"{k} {1e3 * v:.1f} ms" for k, v in row["raw_s"].items())
            share = "-" if row["planning_share"] is None else f"{100 * row['planning_share']:.0f}%"
            lines.append(f"| {name} | {1e3 * row['jacobians_s']:.1f} ms | {raw} | {row['ratio_median']:.2f} "
                         f"({row['ratio_min']:.2f}-{row['ratio_max']:.2f}) | {share} |")
        out.with_suffix(".md").write_text("\n".join(lines) + "\n")
        print(f"saved {out}.{{json,md}}")


if __name__ == "__main__":
    main()
