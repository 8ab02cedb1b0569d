"""``python -m bench``: jacobians against raw JAX, torch.func, finite differences and closed forms.

Method (after JAX's ``benchmarks/`` and lineax): every implementation is checked
against the closed form before it is timed (a wrong one is reported, never
timed); compilation and warm-up happen outside the timed loop, whose every call
ends in ``block_until_ready``; implementations are interleaved over rounds so
that machine noise hits them alike; the median and interquartile range over
rounds are reported, and ratios to ``jacobians`` come from the same run. Each
case runs in its own subprocess (``--isolate``, the default for full runs) so
its peak RSS is its own; XLA's compiled memory analysis gives a per-
implementation figure for the JAX ones.
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass

import numpy as np

# PyTorch's OpenMP workers busy-wait after each op by default, stealing the
# cores from whatever is timed next; make them sleep instead (set before torch
# is imported).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@dataclass(frozen=True)
class Case:
    workload: str
    params: dict
    quick_params: dict
    dtype: str = "float32"

    def sizes(self, quick: bool) -> dict:
        return self.quick_params if quick else self.params

    def name(self, quick: bool) -> str:
        p = self.sizes(quick)
        dt = {"float32": "f32", "float64": "f64"}[self.dtype]
        shape = {
            "tall": lambda: f"{p['n']}x{p['m']}",
            "wide": lambda: f"{p['n']}x{p['m']}",
            "mlp": lambda: f"{p['n']}",
            "elementwise": lambda: f"{p['n']}",
            "gram": lambda: f"{p['m']}x{p['n']}",
            "logdet3": lambda: f"{p['points']:.0e}".replace("+0", ""),
            "logdet16": lambda: f"{p['points']:.0e}".replace("+0", ""),
            "stencil1d": lambda: f"{p['n']}",
            "stencil2d": lambda: f"{p['k']}x{p['k']}",
        }[self.workload]()
        return f"{self.workload}_{shape}_{dt}"


# The case table. Names carry shape and dtype; --quick swaps in small sizes.
CASES = [
    Case("tall", dict(n=16, m=4096), dict(n=8, m=256)),
    Case("wide", dict(n=4096, m=16), dict(n=256, m=8)),
    Case("mlp", dict(n=256), dict(n=32)),
    Case("mlp", dict(n=256), dict(n=32), "float64"),
    Case("mlp", dict(n=1024), dict(n=48)),
    Case("mlp", dict(n=1024), dict(n=48), "float64"),
    Case("elementwise", dict(n=4096), dict(n=256)),
    Case("gram", dict(m=48, n=48), dict(m=6, n=6)),
    Case("logdet3", dict(points=100_000), dict(points=1_000)),
    Case("logdet16", dict(points=10_000), dict(points=200)),
    Case("stencil1d", dict(n=10_000), dict(n=200)),
    Case("stencil2d", dict(k=100), dict(k=10)),
]

TOL = {"float32": 2e-3, "float64": 1e-6}  # max |error| relative to max(1, max |reference|)


def _build(case: Case, quick: bool):
    import jax

    jax.config.update("jax_enable_x64", True)  # float64 cases; float32 ones stay float32
    import jax.numpy as jnp

    from . import workloads

    rng = np.random.default_rng(0)
    dtype = jnp.dtype(case.dtype)
    p = case.sizes(quick)
    builders = {
        "tall": lambda: workloads.tall_or_wide(p["n"], p["m"], dtype, rng),
        "wide": lambda: workloads.tall_or_wide(p["n"], p["m"], dtype, rng),
        "mlp": lambda: workloads.mlp(p["n"], dtype, rng),
        "elementwise": lambda: workloads.elementwise(p["n"], dtype, rng),
        "gram": lambda: workloads.gram(p["m"], p["n"], dtype, rng),
        "logdet3": lambda: workloads.logdet3(p["points"], dtype, rng),
        "logdet16": lambda: workloads.logdet16(p["points"], dtype, rng),
        "stencil1d": lambda: workloads.stencil1d(p["n"], dtype, rng),
        "stencil2d": lambda: workloads.stencil2d(p["k"], dtype, rng),
    }
    return builders[case.workload]()


def _runner(impl, x):
    """A zero-argument call that finishes its work, and a conversion of its result for checking."""
    if impl.kind == "torch":
        import torch

        xt = torch.from_numpy(np.array(x))
        return (lambda: impl.fn(xt)), (lambda r: r.detach().numpy())
    if impl.kind == "numpy":
        xn = np.asarray(x)
        return (lambda: impl.fn(xn)), np.asarray
    import jax

    return (lambda: jax.block_until_ready(impl.fn(x))), (lambda r: r)


def _error(out, reference) -> tuple[float, str | None]:
    """Max abs difference to the reference, or a reason the shapes cannot match."""
    from .workloads import SparseRef, coo_max_abs_diff, to_coo

    if isinstance(reference, SparseRef):
        keys, vals = to_coo(out, reference.m, reference.n)
        return coo_max_abs_diff(reference, keys, vals), None
    if hasattr(out, "todense"):  # a sparse result against a dense reference
        out = out.todense()
    out = np.asarray(out, np.float64)
    if out.shape != reference.shape:
        return float("inf"), f"shape {out.shape} vs {reference.shape}"
    return float(np.max(np.abs(out - reference))) if out.size else 0.0, None


def _xla_bytes(impl, x):
    try:
        import jax

        m = jax.jit(impl.fn).lower(x).compile().memory_analysis()
        return int(m.temp_size_in_bytes + m.output_size_in_bytes)
    except Exception:  # noqa: BLE001 - memory analysis is best-effort per backend
        return None


def run_case(case: Case, quick: bool, repeat: int) -> dict:
    """Check, compile, then time every implementation of one case."""
    name = case.name(quick)
    w = _build(case, quick)
    ref_vals = w.reference.vals if hasattr(w.reference, "vals") else w.reference
    scale = max(1.0, float(np.max(np.abs(ref_vals))))
    rows, timed = {}, {}
    for impl_name, impl in w.impls.items():
        row = rows[impl_name] = {"impl": impl_name, "kind": impl.kind}
        try:
            call, to_np = _runner(impl, w.x)
            t0 = time.perf_counter()
            out = to_np(call())
            row["compile_s"] = time.perf_counter() - t0
            err, why = _error(out, w.reference)
            row["max_abs_err"] = err
            if why or not err <= TOL[case.dtype] * scale:
                row["status"] = "wrong"
                row["error"] = why or f"max abs err {err:.3g}"
                continue
            if impl_name in w.colors:
                row["colors"] = w.colors[impl_name]
            t0 = time.perf_counter()
            call()
            once = time.perf_counter() - t0
            row["inner"] = max(1, int(0.005 / max(once, 1e-7)))  # each sample >= ~5 ms
            row["status"] = "ok"
            row["samples_s"] = []
            if impl.kind == "jax":
                row["xla_bytes"] = _xla_bytes(impl, w.x)
            timed[impl_name] = call
        except Exception as e:  # noqa: BLE001 - a failing implementation is a result
            row["status"] = "failed"
            row["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
    # Interleave implementations round by round, rotating the order so that no
    # implementation always runs right after the same neighbour. Each kind
    # (jax, torch, numpy) is timed in its own phase: BLAS and OpenMP worker
    # threads keep spinning after a call and would slow whatever runs next.
    # Slow implementations get fewer rounds.
    for kind in ("jax", "torch", "numpy"):
        order = [(n, c) for n, c in timed.items() if rows[n]["kind"] == kind]
        if not order:
            continue
        time.sleep(0.2)  # let the previous phase's workers go idle
        deadline = time.perf_counter() + (20 if not quick else 3)
        for r in range(repeat):
            for impl_name, call in order[r % len(order) :] + order[: r % len(order)]:
                row = rows[impl_name]
                if r >= 3 and row["inner"] == 1 and time.perf_counter() > deadline:
                    continue
                t0 = time.perf_counter()
                for _ in range(row["inner"]):
                    call()
                row["samples_s"].append((time.perf_counter() - t0) / row["inner"])
    for row in rows.values():
        s = row.pop("samples_s", None)
        if s:
            row["median_s"] = float(np.median(s))
            row["iqr_s"] = float(np.subtract(*np.percentile(s, [75, 25])))
            row["rounds"] = len(s)
    base = next((r["median_s"] for n, r in rows.items() if n.startswith("jacobians") and "median_s" in r), None)
    for row in rows.values():
        if base and "median_s" in row:
            row["ratio_to_jacobians"] = row["median_s"] / base
    for impl_name, why in w.skipped.items():
        rows[impl_name] = {"impl": impl_name, "status": "skipped", "error": why}
    # Sparse engines: detection + colouring, timed on their own (Python, no compile).
    detect = {}
    for impl_name, fn in w.detect.items():
        t0 = time.perf_counter()
        fn()
        first = time.perf_counter() - t0
        samples = []
        for _ in range(3 if not quick else 1):
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
        detect[impl_name] = {
            "impl": f"detect+colour: {impl_name}",
            "kind": "detect",
            "status": "ok",
            "compile_s": first,
            "median_s": float(np.median(samples)),
            "rounds": len(samples),
        }
    base = detect.get("jacobians", {}).get("median_s")
    for row in detect.values():
        if base:
            row["ratio_to_jacobians"] = row["median_s"] / base
        rows[row["impl"]] = row
    return {
        "name": name,
        "workload": case.workload,
        "dtype": case.dtype,
        "params": case.sizes(quick),
        "status": "ok",
        "results": list(rows.values()),
    }


def _versions() -> dict:
    import importlib.metadata as md

    v = {"python": platform.python_version()}
    for pkg in ("jax", "jaxlib", "numpy", "jacobians", "torch"):
        try:
            v[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            v[pkg] = None
    return v


def _machine() -> dict:
    import jax

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "jax_backend": jax.default_backend(),
        "jax_devices": [str(d) for d in jax.devices()],
    }


def _run_isolated(case: Case, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "case.json")
        cmd = [
            sys.executable,
            "-m",
            "bench",
            "--_worker",
            case.name(args.quick),
            "--_out",
            out,
            "--repeat",
            str(args.repeat),
        ] + (["--quick"] if args.quick else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not os.path.exists(out):
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            return {
                "name": case.name(args.quick),
                "workload": case.workload,
                "dtype": case.dtype,
                "status": "failed",
                "error": f"exit {proc.returncode}: " + " | ".join(tail),
                "results": [],
            }
        with open(out) as fh:
            return json.load(fh)


def _run_here(case: Case, args) -> dict:
    try:
        return run_case(case, args.quick, args.repeat)
    except Exception as e:  # noqa: BLE001
        return {
            "name": case.name(args.quick),
            "workload": case.workload,
            "dtype": case.dtype,
            "status": "failed",
            "error": f"{type(e).__name__}: {e}".splitlines()[0],
            "trace": traceback.format_exc()[-2000:],
            "results": [],
        }


def _fmt_time(s):
    if s is None:
        return "-"
    for unit, f in (("s", 1), ("ms", 1e-3), ("us", 1e-6)):
        if s >= f:
            return f"{s / f:.3g} {unit}"
    return f"{s * 1e9:.3g} ns"


def table(report: dict, markdown: bool = False) -> str:
    head = [
        "case",
        "implementation",
        "status",
        "median",
        "IQR",
        "x jacobians",
        "max |err|",
        "compile",
        "colours",
        "XLA MB",
        "case RSS MB",
    ]
    lines = []
    for c in report["cases"]:
        if c["status"] != "ok":
            lines.append([c["name"], "-", "FAILED", "-", "-", "-", "-", "-", "-", "-", c.get("error", "")])
            continue
        for r in c["results"]:
            lines.append(
                [
                    c["name"],
                    r["impl"],
                    r["status"] if r["status"] == "ok" else r.get("error", r["status"])[:70],
                    _fmt_time(r.get("median_s")),
                    _fmt_time(r.get("iqr_s")),
                    f"{r['ratio_to_jacobians']:.2f}" if "ratio_to_jacobians" in r else "-",
                    f"{r['max_abs_err']:.1e}" if "max_abs_err" in r else "-",
                    _fmt_time(r.get("compile_s")),
                    str(r.get("colors", "-")),
                    f"{r['xla_bytes'] / 2**20:.2f}" if r.get("xla_bytes") else "-",
                    f"{c['peak_rss_mb']:.0f}" if c.get("peak_rss_mb") else "-",
                ]
            )
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join(str(v) for v in row) + " |" for row in lines]
        return "\n".join(out)
    widths = [max(len(str(r[i])) for r in [head] + lines) for i in range(len(head))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    rule = fmt.format(*("-" * w for w in widths))
    return "\n".join([fmt.format(*head), rule] + [fmt.format(*map(str, r)) for r in lines])


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = [c for c in report["cases"] if c["status"] == "ok"]
    cols = 3
    rows = -(-len(cases) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.2 * rows), squeeze=False)
    for ax, c in zip(axes.flat, cases, strict=False):
        res = [r for r in c["results"] if "ratio_to_jacobians" in r]
        names = [r["impl"] for r in res]
        ratios = [r["ratio_to_jacobians"] for r in res]
        colors = [
            "tab:green"
            if n.startswith("jacobians")
            else "tab:blue"
            if n.startswith("jax")
            else "tab:orange"
            if n.startswith("torch")
            else "tab:gray"
            for n in names
        ]
        ax.barh(names, ratios, color=colors)
        ax.set_xscale("log")
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_title(c["name"], fontsize=10)
        ax.tick_params(labelsize=7)
        ax.set_xlabel("time relative to jacobians (log)", fontsize=8)
        ax.invert_yaxis()
    for ax in list(axes.flat)[len(cases) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    names = sorted({c.workload for c in CASES} | {c.name(False) for c in CASES} | {c.name(True) for c in CASES})
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes; the whole suite in well under a minute")
    workload_names = ", ".join(sorted({c.workload for c in CASES}))
    ap.add_argument(
        "--only",
        action="append",
        metavar="NAME",
        help=f"run only these workloads ({workload_names}) or cases; repeatable",
    )
    ap.add_argument(
        "--repeat", type=int, default=None, help="timing rounds per implementation (default 15; 3 with --quick)"
    )
    ap.add_argument("--json", metavar="PATH", help="write machine, versions, command and all figures as JSON")
    ap.add_argument("--plot", metavar="PATH", help="write a PNG of times relative to jacobians (needs matplotlib)")
    ap.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    ap.add_argument("--from-json", metavar="PATH", help="re-render the table (and --plot) of a saved --json run")
    iso = ap.add_mutually_exclusive_group()
    iso.add_argument(
        "--isolate",
        dest="isolate",
        action="store_true",
        default=None,
        help="one subprocess per case (default without --quick): per-case peak RSS",
    )
    iso.add_argument(
        "--no-isolate",
        dest="isolate",
        action="store_false",
        help="run all cases in this process (default with --quick)",
    )
    ap.add_argument("--_worker", help=argparse.SUPPRESS)
    ap.add_argument("--_out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.repeat is None:
        args.repeat = 3 if args.quick else 15
    if args.repeat < 1:
        ap.error(f"--repeat must be >= 1, got {args.repeat}")
    for n in args.only or []:
        if n not in names:
            ap.error(f"unknown case or workload {n!r}; choose from: {', '.join(names)}")

    if args._worker:
        case = next(c for c in CASES if c.name(args.quick) == args._worker)
        result = _run_here(case, args)
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        with open(args._out, "w") as fh:
            json.dump(result, fh)
        return 0

    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            ap.error("--plot needs matplotlib: pip install -e '.[bench]'")
    if args.from_json:
        with open(args.from_json) as fh:
            report = json.load(fh)
        print(table(report, args.markdown))
        if args.plot:
            plot(report, args.plot)
        return 0
    isolate = (not args.quick) if args.isolate is None else args.isolate
    wanted = set(args.only or [])
    selected = [c for c in CASES if not wanted or {c.workload, c.name(args.quick), c.name(not args.quick)} & wanted]
    try:
        from tqdm import tqdm
    except ImportError:  # progress bar is a nicety

        def tqdm(it, **_):
            return it

    report = {
        "command": "python -m bench " + " ".join(sys.argv[1:] if argv is None else argv),
        "quick": args.quick,
        "isolated": isolate,
        "repeat": args.repeat,
        "machine": _machine(),
        "versions": _versions(),
        "cases": [],
    }
    bar = tqdm(selected, desc="bench", unit="case", file=sys.stderr)
    for case in bar:
        if hasattr(bar, "set_postfix_str"):
            bar.set_postfix_str(case.name(args.quick))
        report["cases"].append(_run_isolated(case, args) if isolate else _run_here(case, args))
    print(table(report, args.markdown))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=1)
    if args.plot:
        plot(report, args.plot)
    return 0
