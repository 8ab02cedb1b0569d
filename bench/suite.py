"""``python -m bench``: jacobians against raw JAX, torch.func, sparse peers, finite differences and closed forms.

Method (after JAX's ``benchmarks/`` and lineax): every implementation is checked
against the closed form before it is timed (a wrong one is reported, never
timed); compilation and warm-up happen outside the timed loop, whose every call
ends in ``block_until_ready``; a first call is a new function's (JAX and this
library are warmed up on an unrelated function first, so that the process's own
start-up is charged to no implementation); implementations are interleaved over rounds so
that machine noise hits them alike; the median and interquartile range over
rounds are reported, and ratios to ``jacobians`` come from the same run. A ratio
whose IQR overlaps jacobians' is marked '~', a tie. Each case runs in its own
subprocess (``--isolate``, the default for full runs) so its peak RSS is its
own; XLA's compiled memory analysis gives a per-implementation figure for the
JAX ones (full runs only).

Each case's rows are printed as soon as it finishes; a summary follows. The JSON
(every figure), a Markdown summary, the per-case panels (``.png``) and the summary
figure (``-summary.png``: every case on one row against its best alternative) are
saved under ``bench/results/`` as ``latest.*`` (``latest-quick.*`` with ``--quick``)
unless ``--no-save``; the figures need matplotlib (the ``bench`` extra) and are
skipped with a message without it. SIGTERM (``timeout``) stops the run and saves
the cases that finished.
"""

import argparse
import gc
import importlib.util
import json
import os
import platform
import resource
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field

import numpy as np

from . import report as rep

# PyTorch's OpenMP workers busy-wait after each op by default, stealing the
# cores from whatever is timed next; make them sleep instead (set before torch
# is imported).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# Optional peers: import name -> how to install it.
PEERS = {
    "torch": "pip install torch --index-url https://download.pytorch.org/whl/cpu (a CPU build; "
    "plain `pip install torch` also pulls the CUDA packages)",
    "asdex": "pip install -e '.[bench,peers]'",
    "sparsejac": "pip install -e '.[bench,peers]'",
    "folx": "pip install -e '.[bench,peers]'",
}


@dataclass(frozen=True)
class Case:
    workload: str
    params: dict
    quick_params: dict | None  # None: not part of --quick
    dtype: str = "float32"
    peers: tuple = field(default=("torch",))

    def sizes(self, quick: bool) -> dict:
        return self.quick_params if quick else self.params

    def name(self, quick: bool) -> str:
        p = self.sizes(quick)
        if p is None:
            return ""
        dt = {"float32": "f32", "float64": "f64"}[self.dtype]
        pts = lambda: f"{p['points']:.0e}".replace("+0", "")  # noqa: E731
        shape = {
            "tall": lambda: f"{p['n']}x{p['m']}",
            "wide": lambda: f"{p['n']}x{p['m']}",
            "mlp": lambda: f"{p['n']}" if not p.get("m") else f"{p['n']}x{p['h']}x{p['m']}",
            "resmlp": lambda: f"{p['layers']}x{p['width']}",
            "conv": lambda: f"{p['cin']}x{p['hw']}x{p['hw']}to{p['cout']}",
            "elementwise": lambda: f"{p['n']}",
            "gram": lambda: f"{p['m']}x{p['n']}",
            "logdet3": pts,
            "logdet": lambda: f"k{p['k']}_{pts()}",
            "slogdet": lambda: f"k{p['k']}_{pts()}",
            "stencil1d": lambda: f"{p['n']}",
            "stencil2d": lambda: f"{p['k']}x{p['k']}",
        }.get(self.workload, lambda: "x".join(str(v) for v in p.values()))()
        return f"{self.workload}_{shape}_{dt}"


SPARSE_PEERS = ("asdex", "sparsejac")


def _logdet_cases() -> list[Case]:
    # --quick keeps a few: the library's unrolled kernel compiles slowly for k >= 8 (seconds at k = 16, 32).
    quick = {("logdet", 2, "float32"), ("logdet", 4, "float64")}
    quick |= {("slogdet", 3, "float32"), ("slogdet", 4, "float64")}
    cases = []
    for wl in ("logdet", "slogdet"):
        for k in (2, 3, 4, 8, 16, 32):
            for dt in ("float32", "float64"):
                points = 100_000 if k <= 8 else 10_000
                q = dict(k=k, points=1_000) if (wl, k, dt) in quick else None
                cases.append(Case(wl, dict(k=k, points=points), q, dt))
    return cases


# The case table. Names carry shape and dtype; --quick swaps in small sizes (and leaves some out).
CASES = [
    Case("tall", dict(n=16, m=4096), dict(n=8, m=256)),
    Case("wide", dict(n=4096, m=16), dict(n=256, m=8)),
    Case("mlp", dict(n=256), dict(n=32)),
    Case("mlp", dict(n=256), None, "float64"),
    Case("mlp", dict(n=1024), None),
    Case("mlp", dict(n=1024), None, "float64"),
    Case("mlp", dict(n=1024, h=1024, m=16), dict(n=64, h=64, m=4)),
    Case("resmlp", dict(layers=4, width=512), dict(layers=4, width=32)),
    Case("conv", dict(cin=3, cout=8, hw=16), dict(cin=2, cout=4, hw=8)),
    Case("elementwise", dict(n=4096), dict(n=256)),
    Case("gram", dict(m=48, n=48), dict(m=6, n=6)),
    Case("logdet3", dict(points=100_000), dict(points=1_000)),
    *_logdet_cases(),
    # Flow layers: log|det J| from the Jacobian's structure, against slogdet(jacfwd) and the hand-written floor.
    Case("logdet_coupling", dict(n=256, batch=0), dict(n=16, batch=0), peers=()),
    Case("logdet_coupling", dict(n=1024, batch=0), None, peers=()),
    Case("logdet_coupling", dict(n=256, batch=64), dict(n=16, batch=4), peers=()),
    Case("logdet_coupling", dict(n=1024, batch=16), None, peers=()),
    Case("logdet_made", dict(n=256), dict(n=16), peers=()),
    Case("logdet_glow", dict(hw=16, c=8), dict(hw=4, c=4), peers=()),
    Case("logdet_elementwise", dict(n=1024), dict(n=64), peers=()),
    Case("logdet_dense", dict(n=256), dict(n=16), peers=()),
    Case("stencil1d", dict(n=10_000), dict(n=200), peers=SPARSE_PEERS),
    Case("stencil2d", dict(k=100), dict(k=10), peers=SPARSE_PEERS),
    # Second order (dense and sparse Hessians), per-example Jacobians, exact divergences.
    Case("hessian_mlp", dict(n=256), dict(n=32)),
    Case("hessian_mlp", dict(n=1024), None),
    Case("hessian_pairwise", dict(atoms=64), dict(atoms=8)),
    Case("hessian_pairwise", dict(atoms=256), None),
    Case("rosenbrock", dict(n=10_000), dict(n=200), peers=SPARSE_PEERS),
    Case("laplacian_energy", dict(k=100), dict(k=10), peers=SPARSE_PEERS),
    Case("arrowhead", dict(n=10_000), dict(n=200), peers=SPARSE_PEERS),
    Case("banded", dict(n=10_000), dict(n=200), peers=SPARSE_PEERS),
    Case("batch_mlp", dict(batch=256, n=64), dict(batch=16, n=8)),
    Case("divergence_mlp", dict(n=1024), dict(n=32), peers=()),  # closed-over weights: first call vs jit(trace(jacfwd))
    Case("laplacian_closed_mlp", dict(n=1024), None, peers=()),  # the same for the Laplacians (first-call column)
    Case("divergence_stencil", dict(n=10_000), dict(n=200), peers=()),
    # Jacobians with respect to model parameters (pytrees of weights), and per-example gradients.
    Case("param_mlp", dict(d=784, h=512, c=10), dict(d=32, h=16, c=4)),
    Case("param_cnn", dict(hw=16), dict(hw=8)),
    Case("param_module", dict(d=64, h=256, c=10), dict(d=8, h=16, c=3)),
    Case("per_example_grads", dict(batch=64, d=784, h=256, c=10), dict(batch=8, d=16, h=8, c=3)),
    # Laplacians: the forward Laplacian (dense and sparse) against trace(jax.hessian), divergence(grad) and folx.
    Case("laplacian_pernode", dict(nodes=20, coords=4, width=100, layers=4, batch=20),
         dict(nodes=5, coords=3, width=16, layers=3, batch=4), peers=("folx",)),
    Case("laplacian_pinn", dict(d=2, points=1024), None, peers=("folx",)),
    Case("laplacian_pinn", dict(d=16, points=1024), dict(d=4, points=64), peers=("folx",)),
    Case("laplacian_pinn", dict(d=100, points=1024), None, peers=("folx",)),
    Case("laplacian_local_energy", dict(electrons=8, walkers=256), dict(electrons=4, walkers=8), peers=("folx",)),
]

TOL = {"float32": 2e-3, "float64": 1e-6}  # max |error| relative to max(1, max |reference|)


def selected_cases(only, quick: bool) -> list[Case]:
    wanted = set(only or [])
    out = []
    for c in CASES:
        if c.sizes(quick) is None and not (wanted and c.name(False) in wanted):
            continue  # not part of --quick, unless asked for by its full name
        if not wanted or {c.workload, c.name(quick), c.name(not quick)} & wanted:
            out.append(c)
    return out


def missing_peers(cases) -> dict:
    """The optional peers the selected cases would compare against that are not importable."""
    wanted = {p for c in cases for p in c.peers}
    return {p: how for p, how in PEERS.items() if p in wanted and importlib.util.find_spec(p) is None}


def _build(case: Case, quick: bool):
    import jax

    jax.config.update("jax_enable_x64", True)  # float64 cases; float32 ones stay float32
    import jax.numpy as jnp

    from . import workloads

    workloads.LITE = quick
    rng = np.random.default_rng(0)
    dtype = jnp.dtype(case.dtype)
    p = case.sizes(quick) or case.params
    builders = {
        "tall": lambda: workloads.tall_or_wide(p["n"], p["m"], dtype, rng),
        "wide": lambda: workloads.tall_or_wide(p["n"], p["m"], dtype, rng),
        "mlp": lambda: workloads.mlp(p["n"], dtype, rng, p.get("h"), p.get("m")),
        "resmlp": lambda: workloads.resmlp(p["layers"], p["width"], dtype, rng),
        "conv": lambda: workloads.conv(p["cin"], p["cout"], p["hw"], dtype, rng),
        "elementwise": lambda: workloads.elementwise(p["n"], dtype, rng),
        "gram": lambda: workloads.gram(p["m"], p["n"], dtype, rng),
        "logdet3": lambda: workloads.logdet3(p["points"], dtype, rng),
        "logdet": lambda: workloads.logdet(p["k"], p["points"], dtype, rng),
        "slogdet": lambda: workloads.slogdet(p["k"], p["points"], dtype, rng),
        "stencil1d": lambda: workloads.stencil1d(p["n"], dtype, rng),
        "stencil2d": lambda: workloads.stencil2d(p["k"], dtype, rng),
    }
    if case.workload not in builders:  # the newer workloads take their sizes as keywords
        return getattr(workloads, case.workload)(**p, dtype=dtype, rng=rng)
    return builders[case.workload]()


def _runner(impl, x):
    """A zero-argument call that finishes its work, and a conversion of its result for checking."""
    import jax

    if impl.kind == "torch":
        import torch

        from .workloads import torch_device

        # Parameter workloads: torch holds its own copy of the parameters and ignores the pytree.
        dev = torch_device()
        xt = torch.from_numpy(np.array(x)).to(dev) if isinstance(x, np.ndarray | jax.Array) else None

        def to_np(r):
            return jax.tree_util.tree_map(lambda t: t.detach().cpu().numpy(), r, is_leaf=torch.is_tensor)

        if dev == "cuda":  # CUDA calls return before the kernels finish: wait, as block_until_ready does for JAX

            def call():
                r = impl.fn(xt)
                torch.cuda.synchronize()
                return r

            return call, to_np
        return (lambda: impl.fn(xt)), to_np
    if impl.kind == "numpy":
        xn = np.asarray(x)
        return (lambda: impl.fn(xn)), (lambda r: jax.tree_util.tree_map(np.asarray, r))
    return (lambda: jax.block_until_ready(impl.fn(x))), (lambda r: r)


def _error(out, reference) -> tuple[float, str | None]:
    """Max abs difference to the reference, or a reason the shapes cannot match."""
    from .workloads import SparseRef, coo_max_abs_diff, to_coo

    if isinstance(reference, SparseRef):
        keys, vals = to_coo(out, reference.m, reference.n)
        return coo_max_abs_diff(reference, keys, vals), None
    if not isinstance(reference, np.ndarray):  # pytrees (parameter Jacobians): leaf by leaf, same structure
        import jax

        ref_leaves, ref_def = jax.tree_util.tree_flatten(reference)
        out_leaves, out_def = jax.tree_util.tree_flatten(out)
        if out_def != ref_def:
            return float("inf"), f"structure {out_def} vs {ref_def}"
        errs = [_error(o, np.asarray(r)) for o, r in zip(out_leaves, ref_leaves, strict=True)]
        why = next((w for _, w in errs if w), None)
        return max((e for e, _ in errs), default=0.0), why
    if hasattr(out, "todense"):  # a sparse result against a dense reference
        out = out.todense()
    out = np.asarray(out, np.float64)
    if out.shape != reference.shape:
        return float("inf"), f"shape {out.shape} vs {reference.shape}"
    return float(np.max(np.abs(out - reference))) if out.size else 0.0, None


def _xla_bytes(impl, x):
    """XLA's temp + output allocation; reuses the executable of a jitted function (no second compile)."""
    try:
        import jax

        fn = impl.fn if hasattr(impl.fn, "lower") else jax.jit(impl.fn)
        m = fn.lower(x).compile().memory_analysis()
        return int(m.temp_size_in_bytes + m.output_size_in_bytes)
    except Exception:  # noqa: BLE001 - memory analysis is best-effort per backend
        return None


def _plan(fn, x) -> str | None:
    """What the library chose (mode, colours, ...), if the function exposes a ``plan(x)``."""
    get = getattr(fn, "plan", None)
    if not callable(get):
        return None
    try:
        p = get(x)
    except Exception:  # noqa: BLE001 - a plan is a nicety
        return None
    bits = [str(getattr(p, a)) for a in ("method", "mode") if getattr(p, a, None) is not None]
    if getattr(p, "n_colors", None) is not None:
        bits.append(f"{p.n_colors}c")
    if getattr(p, "chunk_size", None):
        bits.append(f"chunk {p.chunk_size}")
    if getattr(p, "sweep", None):  # a log-determinant's dense Jacobian by one structured sweep
        bits.append(f"by {p.sweep} sweep")
    return " ".join(bits) or type(p).__name__


def _is_tie(row: dict, base: dict) -> bool:
    return row["q25_s"] <= base["q75_s"] and base["q25_s"] <= row["q75_s"]


def _rounds(timed: dict, rows: dict, repeat: int, quick: bool) -> None:
    """Time the implementations round by round, appending to each row's ``samples_s``.

    Rounds interleave the implementations, rotating the order so that no implementation
    always runs right after the same neighbour. Each kind (jax, torch, numpy) is timed in
    its own phase: BLAS and OpenMP worker threads keep spinning after a call and would slow
    whatever runs next. Slow implementations get fewer rounds.
    """
    for kind in ("jax", "torch", "numpy"):
        order = [(n, c) for n, c in timed.items() if rows[n]["kind"] == kind]
        if not order:
            continue
        time.sleep(0.05 if quick else 0.2)  # let the previous phase's workers go idle
        deadline = time.perf_counter() + (20 if not quick else 2)
        for r in range(repeat):
            for impl_name, call in order[r % len(order) :] + order[: r % len(order)]:
                row = rows[impl_name]
                if r >= 3 and row["inner"] == 1 and time.perf_counter() > deadline:
                    continue
                t0 = time.perf_counter()
                for _ in range(row["inner"]):
                    call()
                row["samples_s"].append((time.perf_counter() - t0) / row["inner"])


def _warm_up(dtype: str) -> None:
    """Compile and run a tiny unrelated function through JAX's and jacobians' transformations.

    A first call is the cost of a *new function*: the once-per-process start-up of JAX's
    tracing and XLA's code generation (and of this library) must not fall on whichever
    implementation happens to be timed first in a fresh process.
    """
    import jax
    import jax.numpy as jnp

    import jacobians

    v = jnp.linspace(0.1, 1.0, 5, dtype=dtype)
    f = lambda v: jnp.tanh(v) * v[::-1] + jnp.sin(v[0])  # noqa: E731
    g = lambda v: jnp.sum(jnp.tanh(v) ** 2)  # noqa: E731
    for fn in (jax.jit(jax.jacfwd(f)), jax.jit(jax.jacrev(f)), jax.jit(jax.hessian(g)), jacobians.jacobian(f),
               jacobians.hessian(g)):
        jax.block_until_ready(fn(v))
    # Each of the default's plans once (compressed, structured, a deferred certificate on its worker
    # thread): their first use in a process loads code (SciPy's graphs, the colourings) a new function
    # does not pay again.
    w = jnp.linspace(0.1, 1.0, 16, dtype=dtype)
    M = jnp.linspace(-1.0, 1.0, 16 * 16, dtype=dtype).reshape(16, 16)
    for fn in (jacobians.jacobian(lambda w: jnp.cos(w) * w),
               jacobians.jacobian(lambda w: jnp.tanh(M @ jnp.tanh(M @ w))),
               jacobians.hessian(lambda w: jnp.sum(jnp.cos(w[1:] - w[:-1]) ** 2))):
        jax.block_until_ready(fn(w))


def run_case(case: Case, quick: bool, repeat: int, timing: bool = True) -> dict:
    """Check, compile, then time every implementation of one case."""
    import jax

    name = case.name(quick) or case.name(False)
    w = _build(case, quick)
    ref_vals = w.reference.vals if hasattr(w.reference, "vals") else w.reference
    leaves = [np.asarray(v) for v in jax.tree_util.tree_leaves(ref_vals)]
    scale = max([1.0] + [float(np.max(np.abs(v))) for v in leaves if v.size])
    rows, timed = {}, {}
    _warm_up(case.dtype)
    for impl_name, impl in w.impls.items():
        row = rows[impl_name] = {"impl": impl_name, "kind": impl.kind}
        try:
            call, to_np = _runner(impl, w.x)
            t0 = time.perf_counter()
            out = to_np(call())
            row["compile_s"] = time.perf_counter() - t0 + (impl.compile_s or 0.0)
            err, why = _error(out, w.reference)
            row["max_abs_err"] = err
            if why or not err <= TOL[case.dtype] * scale:
                row["status"] = "wrong"
                row["error"] = why or f"max abs err {err:.3g} > {TOL[case.dtype] * scale:.2g}"
                continue
            row["status"] = "ok"
            if impl_name in w.colors:
                row["colors"] = w.colors[impl_name]
            if not timing:
                continue
            t0 = time.perf_counter()
            call()
            once = time.perf_counter() - t0
            row["inner"] = max(1, int(0.005 / max(once, 1e-7)))  # each sample >= ~5 ms
            row["samples_s"] = []
            if impl.kind == "jax" and w.memory and not quick:
                row["xla_bytes"] = _xla_bytes(impl, w.x)
            timed[impl_name] = call
        except Exception as e:  # noqa: BLE001 - a failing implementation is a result
            row["status"] = "failed"
            row["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
    # Python's garbage collector runs between samples, not inside them: its pauses (0.2-0.4 s
    # with the plans and jaxprs a case holds) landed on whichever call was being timed.
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        _rounds(timed, rows, repeat, quick)
    finally:
        gc.enable()
        gc.unfreeze()
    for row in rows.values():
        s = row.pop("samples_s", None)
        if s:
            q25, q75 = np.percentile(s, [25, 75])
            row.update(median_s=float(np.median(s)), q25_s=float(q25), q75_s=float(q75), iqr_s=float(q75 - q25))
            row["rounds"] = len(s)
    base_name = next((n for n, r in rows.items() if n.startswith("jacobians") and "median_s" in r), None)
    if base_name is None:  # untimed (--check) or the library failed: still name what a ratio would be against
        base_name = next((n for n in rows if n.startswith("jacobians")), None)
    if base_name:
        base = rows[base_name]
        base["base"] = True
        plan = _plan(w.impls[base_name].fn, w.x)
        if plan:
            base["plan"] = plan
        if w.explain is not None:  # planning alone, from scratch (a new jacobian object: no cached plan)
            t0 = time.perf_counter()
            w.explain()
            base["plan_s"] = time.perf_counter() - t0
        for row in rows.values():
            if "median_s" in row and "median_s" in base:
                row["ratio_to_jacobians"] = row["median_s"] / base["median_s"]
                if row is not base:
                    row["tie"] = _is_tie(row, base)
    for impl_name, why in w.skipped.items():
        rows[impl_name] = {"impl": impl_name, "kind": "skipped", "status": "skipped", "error": why}
    if timing:
        _time_detection(w, rows, quick)
    order = list(rep.FAMILIES)
    results = sorted(rows.values(), key=lambda r: (r["kind"] == "detect", order.index(rep.family(r["impl"]))))
    return {
        "name": name,
        "workload": case.workload,
        "dtype": case.dtype,
        "params": case.sizes(quick) or case.params,
        "reference": w.reference_note,
        "status": "ok",
        "results": results,
    }


def _time_detection(w, rows: dict, quick: bool) -> None:
    """Sparse engines: detection + colouring, timed on their own (Python, no compile)."""
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
        q25, q75 = np.percentile(samples, [25, 75])
        detect[impl_name] = {
            "impl": f"detect+colour: {impl_name}",
            "kind": "detect",
            "status": "ok",
            "compile_s": first,
            "median_s": float(np.median(samples)),
            "q25_s": float(q25),
            "q75_s": float(q75),
            "iqr_s": float(q75 - q25),
            "rounds": len(samples),
        }
    base = detect.get("jacobians")
    for impl_name, row in detect.items():
        if base:
            row["ratio_to_jacobians"] = row["median_s"] / base["median_s"]
            if impl_name != "jacobians":
                row["tie"] = _is_tie(row, base)
        rows[row["impl"]] = row


def _versions() -> dict:
    import importlib.metadata as md

    v = {"python": platform.python_version()}
    for pkg in ("jax", "jaxlib", "numpy", "jacobians", "torch", "asdex", "sparsejac", "folx", "matplotlib"):
        try:
            v[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            v[pkg] = None
    v["commit"] = _commit()
    return v


def _commit() -> str | None:
    """The checkout's commit, '+dirty' with uncommitted changes (what was measured); None outside git."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "-uno"], cwd=root, capture_output=True, text=True)
    except OSError:
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


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


def _failed(case: Case, quick: bool, error: str, **extra) -> dict:
    return {
        "name": case.name(quick) or case.name(False),
        "workload": case.workload,
        "dtype": case.dtype,
        "status": "failed",
        "error": error,
        "results": [],
        **extra,
    }


def _run_isolated(case: Case, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "case.json")
        cmd = [sys.executable, "-m", "bench", "--_worker", case.name(args.quick) or case.name(False)]
        cmd += ["--_out", out, "--repeat", str(args.repeat)]
        cmd += (["--quick"] if args.quick else []) + (["--check"] if args.check else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not os.path.exists(out):
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            return _failed(case, args.quick, f"exit {proc.returncode}: " + " | ".join(tail))
        with open(out) as fh:
            return json.load(fh)


def _run_here(case: Case, args) -> dict:
    try:
        return run_case(case, args.quick, args.repeat, timing=not args.check)
    except Exception as e:  # noqa: BLE001
        msg = f"{type(e).__name__}: {e}".splitlines()[0]
        return _failed(case, args.quick, msg, trace=traceback.format_exc()[-2000:])


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _show_path(p: str) -> str:
    rel = os.path.relpath(p)
    return rel if not rel.startswith("..") else p


NO_MATPLOTLIB = "No figures: matplotlib is not installed (pip install -e '.[bench]')."


def summary_plot_path(path: str) -> str:
    """Where the summary figure goes next to the per-case panels: ``x.png`` -> ``x-summary.png``."""
    root, ext = os.path.splitext(path)
    return f"{root}-summary{ext or '.png'}"


def plots(report: dict, path: str) -> list[str]:
    """The per-case panels at ``path`` and the summary figure next to it; [] without matplotlib."""
    if importlib.util.find_spec("matplotlib") is None:
        return []
    rep.plot(report, path)
    written = [path] if os.path.exists(path) else []
    if rep.plot_summary(report, summary_plot_path(path)):
        written.append(summary_plot_path(path))
    return written


def save(report: dict, out_dir: str, stem: str) -> list[str]:
    """Write ``stem.json``, ``stem.md`` and (with matplotlib) ``stem.png``, ``stem-summary.png`` under ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, f"{stem}.{ext}") for ext in ("json", "md")]
    with open(paths[0], "w") as fh:
        json.dump(report, fh, indent=1)
    with open(paths[1], "w") as fh:
        fh.write(rep.markdown(report))
    return paths + plots(report, os.path.join(out_dir, f"{stem}.png"))


def main(argv=None) -> int:
    names = sorted({c.workload for c in CASES} | {c.name(q) for c in CASES for q in (False, True)} - {""})
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, a subset of cases; under a minute on 2 cores")
    workload_names = ", ".join(sorted({c.workload for c in CASES}))
    ap.add_argument(
        "--only",
        action="append",
        metavar="NAME",
        help=f"run only these workloads ({workload_names}) or cases; repeatable",
    )
    ap.add_argument(
        "--repeat", type=int, default=None, help="timing rounds per implementation (default 15; 5 with --quick)"
    )
    ap.add_argument(
        "--check", action="store_true", help="only check every implementation against its reference; no timing"
    )
    ap.add_argument(
        "--out",
        metavar="DIR",
        default=RESULTS_DIR,
        help="where to save latest.{json,md,png} (latest-quick.* with --quick); default: bench/results",
    )
    ap.add_argument(
        "--name",
        metavar="STEM",
        help="file name stem of the saved results (default latest, or latest-quick with --quick)",
    )
    ap.add_argument("--no-save", action="store_true", help="write nothing unless --json/--plot say where")
    ap.add_argument("--json", metavar="PATH", help="also write machine, versions, command and all figures as JSON")
    ap.add_argument(
        "--plot",
        metavar="PATH",
        help="also write the per-case PNG of times relative to jacobians, and the summary figure at PATH-summary.png",
    )
    ap.add_argument(
        "--markdown", action="store_true", help="print the report as Markdown on stdout (progress goes to stderr)"
    )
    ap.add_argument("--from-json", metavar="PATH", help="re-render the table (and --plot) of a saved run")
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
        args.repeat = 5 if args.quick else 15
    if args.repeat < 1:
        ap.error(f"--repeat must be >= 1, got {args.repeat}")
    for n in args.only or []:
        if n not in names:
            ap.error(f"unknown case or workload {n!r}; choose from: {', '.join(names)}")

    if args._worker:
        case = next(c for c in CASES if args._worker in (c.name(args.quick), c.name(False)))
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
    out = sys.stderr if args.markdown else sys.stdout  # with --markdown, stdout is only the Markdown

    def say(s=""):
        print(s, file=out, flush=True)

    if args.from_json:
        with open(args.from_json) as fh:
            report = json.load(fh)
        print(rep.markdown(report) if args.markdown else rep.text(report), flush=True)
        if args.plot:
            plots(report, args.plot)
        return 0

    t_start = time.perf_counter()
    isolate = (not args.quick) if args.isolate is None else args.isolate
    selected = selected_cases(args.only, args.quick)
    report = {
        "command": "python -m bench " + " ".join(sys.argv[1:] if argv is None else argv),
        "quick": args.quick,
        "check_only": args.check,
        "isolated": isolate,
        "repeat": args.repeat,
        "machine": _machine(),
        "versions": _versions(),
        "missing_peers": missing_peers(selected),
        "cases": [],
    }
    say(rep.preamble(report))
    say(rep.header())
    tty = sys.stderr.isatty()
    # `timeout` (bench/gpu.sh under a time limit) sends SIGTERM: stop there, and save the cases that finished.
    old_term = signal.signal(signal.SIGTERM, _interrupt)
    try:
        for i, case in enumerate(selected, 1):
            if tty:
                sys.stderr.write(f"\r\033[K  running {case.name(args.quick) or case.name(False)} ({i}/{len(selected)})")
                sys.stderr.flush()
            result = _run_isolated(case, args) if isolate else _run_here(case, args)
            report["cases"].append(result)
            if tty:
                sys.stderr.write("\r\033[K")
            say(rep.case_rows(result))
    except KeyboardInterrupt:
        report["interrupted"] = f"stopped after {len(report['cases'])} of {len(selected)} cases"
        say(f"\nInterrupted: {report['interrupted']}; saving those.")
    finally:
        signal.signal(signal.SIGTERM, old_term)
    report["wall_s"] = time.perf_counter() - t_start
    say()
    say(rep.summary(report))
    say()
    say(f"{len(report['cases'])} cases in {report['wall_s']:.0f} s (JAX start-up included).")
    written = []
    if not args.no_save and not args.check:
        written += save(report, args.out, args.name or ("latest-quick" if args.quick else "latest"))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=1)
        written.append(args.json)
    if args.plot:
        written += plots(report, args.plot)
    if (args.plot or not (args.no_save or args.check)) and importlib.util.find_spec("matplotlib") is None:
        say(NO_MATPLOTLIB)
    for p in written:  # one per line: a path is the one thing that may pass 100 columns
        say(f"Saved: {_show_path(p)}")
    if args.markdown:
        print(rep.markdown(report), flush=True)
    return 0
