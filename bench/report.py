"""Rendering of a bench report: the per-case table, the summary, Markdown and the plot.

A report is the JSON that ``python -m bench`` writes: ``{"cases": [{"name", "status",
"results": [row, ...]}, ...], ...}``. Each row has ``impl``, ``kind``, ``status`` and,
when timed, ``median_s``, ``q25_s``, ``q75_s``, ``ratio_to_jacobians`` and ``tie``.
Nothing here imports JAX.
"""

import os
import textwrap

WIDTH = 100  # every line of the text output fits this many columns

LEGEND = (
    "x jac = this row's median time / jacobians' median in the same case: above 1, jacobians is\n"
    "faster; below 1, this row is. '~' marks a tie: the two interquartile ranges overlap.\n"
    "1st call: the first call's time (trace, plan, compile and run; torch and NumPy: the first run)."
)

# Families of implementations, in plotting order, with their colours.
FAMILIES = {
    "jacobians": "tab:green",
    "raw JAX": "tab:blue",
    "torch": "tab:orange",
    "JAX peers": "tab:purple",  # asdex, sparsejac, folx
    "closed form": "tab:olive",
    "NumPy": "tab:gray",
}


def family(impl: str) -> str:
    if impl.startswith("jacobians") or "(jacobians." in impl:  # "vmap(jacobians.jacobian)" is the library too
        return "jacobians"
    if impl.startswith(("jax", "jnp")) or "jax." in impl:  # "trace(jax.jacfwd)" is raw JAX too
        return "raw JAX"
    if impl.startswith("torch"):
        return "torch"
    if impl.startswith(("asdex", "sparsejac", "folx")):
        return "JAX peers"
    if impl.startswith("closed-form"):
        return "closed form"
    return "NumPy"


# --- number formatting ------------------------------------------------------------------


def fmt_time(s) -> str:
    if s is None:
        return "-"
    for unit, f in (("s", 1), ("ms", 1e-3), ("us", 1e-6)):
        if s >= f:
            return f"{s / f:.3g} {unit}"
    return f"{s * 1e9:.3g} ns"


def fmt_ratio(r: float) -> str:
    if r >= 100:
        return f"{r:.0f}"
    if r >= 10:
        return f"{r:.1f}"
    if r >= 0.095:
        return f"{r:.2f}"
    return f"{r:.2g}"


def ratio_cell(row: dict | None, markdown: bool = False) -> str:
    """The ratio of one row, '~'-marked when its IQR overlaps jacobians' (a tie)."""
    if not row or "ratio_to_jacobians" not in row:
        return "-"
    tie = "\\~" if markdown else "~"
    return (tie if row.get("tie") else "") + fmt_ratio(row["ratio_to_jacobians"])


def _clip(s: str, w: int) -> str:
    return s if len(s) <= w else s[: w - 3] + "..."


def _wrap(s: str, indent: str = "    ") -> str:
    return textwrap.fill(s, WIDTH, subsequent_indent=indent, break_on_hyphens=False)


def missing_lines(report: dict) -> list[str]:
    """'Not installed' lines, one per install command: the peers it brings."""
    by_how = {}
    for peer, how in (report.get("missing_peers") or {}).items():
        by_how.setdefault(how, []).append(peer)
    return [f"{', '.join(peers)}: {how}" for how, peers in by_how.items()]


# --- the per-case table (streamed as each case finishes) --------------------------------

COLUMNS = [  # (title, width, align); 2 spaces of indent and 2 between columns: 99 columns
    ("implementation", 34, "<"),
    ("median", 8, ">"),
    ("IQR", 8, ">"),
    ("x jac", 7, ">"),
    ("max|err|", 8, ">"),
    ("1st call", 8, ">"),
    ("XLA MB", 7, ">"),
    ("col", 3, ">"),
]


def _line(cells) -> str:
    out = []
    for (_, w, align), c in zip(COLUMNS, cells, strict=True):
        c = _clip(str(c), w)
        out.append(c.ljust(w) if align == "<" else c.rjust(w))
    return ("  " + "  ".join(out)).rstrip()


def header() -> str:
    return _line([t for t, _, _ in COLUMNS]) + "\n" + _line(["-" * w for _, w, _ in COLUMNS])


def case_title(case: dict) -> str:
    bits = [case["name"]]
    if case.get("reference"):
        bits.append(f"checked against: {case['reference']}")
    if case.get("peak_rss_mb"):
        bits.append(f"peak RSS {case['peak_rss_mb']:.0f} MB")
    planned = next((r for r in case.get("results", ()) if r.get("plan_s") is not None), None)
    if planned:
        bits.append(f"planning {fmt_time(planned['plan_s'])}")
    return _clip(" | ".join(bits), WIDTH)


def case_rows(case: dict) -> str:
    """The rows of one case: one line per implementation, under a title line."""
    lines = [case_title(case)]
    if case["status"] != "ok":
        lines.append(_clip(f"  FAILED: {case.get('error', '')}", WIDTH))
        return "\n".join(lines)
    for r in case["results"]:
        if r["status"] != "ok":
            first = COLUMNS[0][1]
            msg = r["status"].upper() if r["status"] in ("wrong", "failed") else ""
            msg = f"{msg}: {r.get('error', '')}" if msg else r.get("error", r["status"])
            lines.append(_clip(f"  {_clip(r['impl'], first).ljust(first)}  {msg}", WIDTH))
            continue
        lines.append(
            _line(
                [
                    r["impl"],
                    fmt_time(r.get("median_s")),
                    fmt_time(r.get("iqr_s")),
                    ratio_cell(r),
                    f"{r['max_abs_err']:.1e}" if "max_abs_err" in r else "-",
                    fmt_time(r.get("compile_s")),
                    f"{r['xla_bytes'] / 2**20:.2f}" if r.get("xla_bytes") else "-",
                    str(r.get("colors", "-")),
                ]
            )
        )
    return "\n".join(lines)


def preamble(report: dict) -> str:
    """What is run, on what, and which peers are missing: printed once, before the first case."""
    m, v = report.get("machine", {}), report.get("versions", {})
    lines = [
        _clip(
            f"{report.get('command', 'python -m bench')}  ({'quick' if report.get('quick') else 'full'} run, "
            f"{report.get('repeat', '?')} rounds)",
            WIDTH,
        ),
        _clip(
            f"{m.get('cpu', '?')}, {m.get('cores', '?')} cores, JAX {v.get('jax', '?')} on "
            f"{m.get('jax_backend', '?')}, Python {v.get('python', '?')}",
            WIDTH,
        ),
    ]
    missing = missing_lines(report)
    if missing:
        lines.append("Not installed, so their rows are left out:")
        lines += [_wrap("  " + m, "      ") for m in missing]
    if report.get("quick"):
        lines.append("Quick run: small sizes and few rounds; read it as a smoke test, not as timings.")
    lines += [LEGEND, ""]
    return "\n".join(lines)


# --- the summary ----------------------------------------------------------------------------


def _timed(case):
    return [r for r in case["results"] if "ratio_to_jacobians" in r and r.get("kind") != "detect"]


def _best(rows, fam: str):
    rows = [r for r in rows if family(r["impl"]) == fam]
    return min(rows, key=lambda r: r["median_s"]) if rows else None


_SHORT = {
    "vmap(jacfwd)+slogdet": "vmap fwd",
    "vmap(jacrev)+slogdet": "vmap rev",
    "linalg.slogdet (batched)": "batched",
    "vmap(slogdet)": "vmap",
    "linalg.slogdet": "slogdet",
    "sparsejac.jacfwd (pattern by hand)": "sparsejac",
}


def _short(impl: str) -> str:
    """A label for a row inside a ratio cell: 'jacfwd', 'vmap fwd', 'asdex'."""
    for pre in ("jax.", "jax ", "torch.func.", "torch.func ", "torch.", "jnp."):
        if impl.startswith(pre):
            impl = impl[len(pre) :]
            break
    return _SHORT.get(impl, impl)


def _labelled(row, markdown=False) -> str:
    if not row:
        return "-"
    return f"{ratio_cell(row, markdown)} ({_short(row['impl'])})"


def summary_rows(report: dict) -> list[dict]:
    """One dict per case: the figures of the README's tables."""
    out = []
    for c in report["cases"]:
        if c["status"] != "ok":
            out.append({"case": c["name"], "failed": c.get("error", "")})
            continue
        rows = _timed(c)
        base = next((r for r in rows if r.get("base")), None) or next(
            (r for r in rows if family(r["impl"]) == "jacobians"), None
        )
        by = {r["impl"]: r for r in c["results"]}
        chunk = next((r for r in rows if r["impl"].startswith("jacobians[chunk")), None)
        full = by.get("jacobians")
        sparse = by.get("jacobians.sparse_jacobian")
        out.append(
            {
                "case": c["name"],
                "jacobians": base,
                "raw JAX": _best(rows, "raw JAX"),
                "torch": _best(rows, "torch"),
                "peer": _best(rows, "JAX peers"),
                "closed": by.get("closed-form") if "ratio_to_jacobians" in by.get("closed-form", {}) else None,
                "numpy": _best(rows, "NumPy"),
                "sparse": sparse if sparse is not base else None,
                "chunk": chunk,
                "xla": (chunk.get("xla_bytes"), full.get("xla_bytes")) if chunk and full else None,
                "plan": (base or {}).get("plan") or "-",
                "first": _first_call_ratio(base, c["results"]),
                "wrong": [r["impl"] for r in c["results"] if r["status"] in ("wrong", "failed")],
            }
        )
    return out


def _first_call_ratio(base, results) -> str:
    """The library's first call (trace, plan, compile, run) / the fastest raw-JAX first call, as text."""
    raw = [r["compile_s"] for r in results if family(r["impl"]) == "raw JAX" and r.get("compile_s")]
    if not base or not base.get("compile_s") or not raw:
        return "-"
    return f"{base['compile_s'] / min(raw):.2f}"


SUMMARY_COLUMNS = [  # (title, width, align): 99 columns
    ("case", 22, "<"),
    ("jacobians", 9, ">"),
    ("best raw JAX (x)", 16, "<"),
    ("torch", 7, ">"),
    ("best peer (x)", 13, "<"),
    ("closed", 6, ">"),
    ("1st", 5, ">"),
    ("plan", 7, "<"),
]


def check_summary(report: dict) -> str:
    """For --check: how many implementations agree with their reference, and which do not."""
    rows = [(c["name"], r) for c in report["cases"] for r in c["results"] if r["status"] != "skipped"]
    bad = [f"{name}: {r['impl']} ({r['status']})" for name, r in rows if r["status"] != "ok"]
    bad += [f"{c['name']}: FAILED ({c.get('error', '')})" for c in report["cases"] if c["status"] != "ok"]
    head = f"Checked {len(rows)} implementations in {len(report['cases'])} cases against their references: "
    if not bad:
        return head + "all agree."
    return "\n".join([head + f"{len(bad)} do not:"] + [_clip("  " + b, WIDTH) for b in bad])


def summary(report: dict) -> str:
    """The per-case ratios, in the README's form, fitting WIDTH columns."""
    if report.get("check_only"):
        return check_summary(report)

    def line(cells):
        out = []
        for (_, w, a), c in zip(SUMMARY_COLUMNS, cells, strict=True):
            c = _clip(str(c), w)
            out.append(c.ljust(w) if a == "<" else c.rjust(w))
        return "  ".join(out).rstrip()

    lines = [
        "Summary: ratios are time / jacobians' time (above 1: jacobians faster; '~': a tie).",
        line([t for t, _, _ in SUMMARY_COLUMNS]),
        line(["-" * w for _, w, _ in SUMMARY_COLUMNS]),
    ]
    problems = []
    for s in summary_rows(report):
        if "failed" in s:
            lines.append(_clip(f"{s['case']:<22}  FAILED: {s['failed']}", WIDTH))
            continue
        lines.append(
            line(
                [
                    s["case"],
                    fmt_time((s["jacobians"] or {}).get("median_s")),
                    _labelled(s["raw JAX"]),
                    ratio_cell(s["torch"]),
                    _labelled(s["peer"]),
                    ratio_cell(s["closed"]),
                    s["first"],
                    s["plan"],
                ]
            )
        )
        if s["wrong"]:
            problems.append(f"{s['case']}: {', '.join(s['wrong'])}")
    if problems:
        lines.append("")
        lines += [_clip("WRONG OR FAILED (not timed): " + p, WIDTH) for p in problems]
    return "\n".join(lines)


# --- Markdown -------------------------------------------------------------------------------


def _md_table(head, rows) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(str(v).replace("|", "\\|") for v in row) + " |" for row in rows]
    return "\n".join(out)


def markdown(report: dict) -> str:
    """The whole report as Markdown: set-up, summary, then every row."""
    m, v = report.get("machine", {}), report.get("versions", {})
    vers = ", ".join(f"{k} {val}" for k, val in v.items() if val)
    parts = [
        "# Benchmark run",
        "",
        f"Command: `{report.get('command', 'python -m bench')}`"
        + (" (quick: small sizes, few rounds; a smoke test, not timings)" if report.get("quick") else "")
        + (f" (interrupted: {report['interrupted']})" if report.get("interrupted") else ""),
        "",
        f"Machine: {m.get('cpu', '?')}, {m.get('cores', '?')} cores, {m.get('platform', '?')}; "
        f"JAX backend {m.get('jax_backend', '?')}. Versions: {vers}.",
        "",
    ]
    missing = missing_lines(report)
    if missing:
        parts.append("Not installed, so their rows are left out:")
        parts += [""] + [f"- {m}" for m in missing]
    parts += [
        "",
        "Ratios are time relative to `jacobians` in the same case: above 1 means `jacobians` is faster. "
        "`~` marks a tie: the interquartile ranges of the two overlap.",
        "",
        "## Summary",
        "",
    ]
    rows = []
    for s in summary_rows(report):
        if "failed" in s:
            rows.append([s["case"], "FAILED: " + s["failed"]] + ["-"] * 10)
            continue
        xla = s["xla"]
        rows.append(
            [
                s["case"],
                fmt_time((s["jacobians"] or {}).get("median_s")),
                _labelled(s["raw JAX"], True),
                _labelled(s["torch"], True),
                _labelled(s["peer"], True),
                ratio_cell(s["closed"], True),
                ratio_cell(s["numpy"], True),
                ratio_cell(s["sparse"], True) if s["sparse"] else "-",
                ratio_cell(s["chunk"], True),
                f"{xla[0] / 2**20:.2f} / {xla[1] / 2**20:.2f}" if xla and all(xla) else "-",
                s["first"],
                s["plan"],
            ]
        )
    parts.append(
        _md_table(
            [
                "case",
                "jacobians",
                "best raw JAX (x)",
                "best torch (x)",
                "best peer (x)",
                "closed form (x)",
                "NumPy (x)",
                "sparse_jacobian (x)",
                "chunk n/8 (x)",
                "XLA MB, chunk / full",
                "first call (x raw JAX)",
                "plan",
            ],
            rows,
        )
    )
    parts += ["", "## Every implementation", ""]
    rows = []
    for c in report["cases"]:
        if c["status"] != "ok":
            rows.append([c["name"], "-", "FAILED: " + c.get("error", "")] + ["-"] * 8)
            continue
        for r in c["results"]:
            rows.append(
                [
                    c["name"],
                    r["impl"],
                    r["status"] if r["status"] == "ok" else r.get("error", r["status"]),
                    fmt_time(r.get("median_s")),
                    fmt_time(r.get("iqr_s")),
                    ratio_cell(r, True),
                    f"{r['max_abs_err']:.1e}" if "max_abs_err" in r else "-",
                    fmt_time(r.get("compile_s")),
                    str(r.get("colors", "-")),
                    f"{r['xla_bytes'] / 2**20:.2f}" if r.get("xla_bytes") else "-",
                    f"{c['peak_rss_mb']:.0f}" if c.get("peak_rss_mb") else "-",
                ]
            )
    parts.append(
        _md_table(
            ["case", "implementation", "status", "median", "IQR", "x jacobians", "max \\|err\\|", "first call"]
            + ["colours", "XLA MB", "case RSS MB"],
            rows,
        )
    )
    return "\n".join(parts) + "\n"


def text(report: dict) -> str:
    """The whole report as plain text, as ``python -m bench`` streams it."""
    out = [preamble(report), header()]
    out += [case_rows(c) for c in report["cases"]]
    out += ["", summary(report)]
    return "\n".join(out)


# --- the summary figure's data --------------------------------------------------------------

# Families of workloads, in the summary figure's order, with their colours.
WORKLOAD_FAMILIES = {
    "dense": "tab:blue",
    "sparse": "tab:purple",
    "second order": "tab:red",
    "determinants": "tab:brown",
    "traces/operators": "tab:cyan",
}

_WORKLOAD_FAMILY = {
    "stencil1d": "sparse",
    "stencil2d": "sparse",
    "rosenbrock": "sparse",  # sparse Hessians: compared with the sparse peers
    "laplacian_energy": "sparse",
    "arrowhead": "sparse",
    "banded": "sparse",
    "hessian_mlp": "second order",
    "hessian_pairwise": "second order",
    "logdet3": "determinants",
    "logdet": "determinants",
    "slogdet": "determinants",
}


def workload_family(case: dict) -> str:
    """The family of a case in the summary figure, from its workload (or, in older runs, its name)."""
    wl = case.get("workload") or case["name"].rsplit("_", 2)[0]
    if wl in _WORKLOAD_FAMILY:
        return _WORKLOAD_FAMILY[wl]
    # Workloads added later fall in by name.
    if any(k in wl for k in ("divergence", "laplacian", "trace", "diag")):
        return "traces/operators"
    if "det" in wl:
        return "determinants"
    if "hessian" in wl or "hvp" in wl:
        return "second order"
    if "sparse" in wl or "stencil" in wl:
        return "sparse"
    return "dense"


def summary_figure_rows(report: dict) -> list[dict]:
    """One dict per case for the summary figure, grouped by family (figure order), case order within.

    Each has ``case``, ``family`` and either ``note`` (why there is no bar: the case failed, the
    library's row is missing, or nothing else was timed) or the bar's figures, all relative to the
    best alternative's median time (the fastest timed row that is neither the library nor the
    closed form): ``ratio`` (the library's median / the best's, below 1 the library is faster),
    ``lo``/``hi`` (the library's quartiles on that scale), ``best`` (its implementation name), ``tie``
    (their interquartile ranges overlap) and ``floor`` (the closed form's median on that scale, or
    None where the case has no timed closed form).
    """
    out = []
    for c in report["cases"]:
        row = {"case": c["name"], "family": workload_family(c)}
        out.append(row)
        if c["status"] != "ok":
            row["note"] = "failed"
            continue
        rows = _timed(c)
        base = next((r for r in rows if r.get("base")), None)
        others = [r for r in rows if family(r["impl"]) not in ("jacobians", "closed form")]
        if base is None or not others:
            row["note"] = "jacobians not timed" if base is None else "no alternative timed"
            continue
        best = min(others, key=lambda r: r["median_s"])
        mb = best["median_s"]
        closed = next((r for r in rows if family(r["impl"]) == "closed form"), None)
        row.update(
            ratio=base["median_s"] / mb,
            lo=base.get("q25_s", base["median_s"]) / mb,
            hi=base.get("q75_s", base["median_s"]) / mb,
            best=best["impl"],
            tie=bool(best.get("tie")),
            floor=closed["median_s"] / mb if closed else None,
        )
    order = list(WORKLOAD_FAMILIES)
    return sorted(out, key=lambda r: order.index(r["family"]))  # stable: case order within a family


# --- the plot -------------------------------------------------------------------------------


def plot(report: dict, path: str) -> None:
    """Bars of time relative to jacobians per case, growing from 1; IQR whiskers; ties hatched."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

    cases = [(c, _timed(c)) for c in report["cases"] if c["status"] == "ok"]
    cases = [(c, rows) for c, rows in cases if rows]
    if not cases:
        return
    cols = min(3, len(cases))
    nrows = -(-len(cases) // cols)
    most = max(len(rows) for _, rows in cases)
    fig, axes = plt.subplots(
        nrows, cols, figsize=(6.2 * cols, (0.32 * most + 1.3) * nrows + 0.8), squeeze=False, layout="constrained"
    )
    for ax, (c, rows) in zip(axes.flat, cases, strict=False):
        base = next((r for r in rows if r.get("base")), None) or next(
            (r for r in rows if r.get("ratio_to_jacobians") == 1.0), rows[0]
        )
        mb = base["median_s"]
        ratios = [r["ratio_to_jacobians"] for r in rows]
        lo = [r.get("q25_s", r["median_s"]) / mb for r in rows]
        hi = [r.get("q75_s", r["median_s"]) / mb for r in rows]
        y = range(len(rows))
        for i, r in enumerate(rows):  # bars grow from 1: leftwards faster than jacobians, rightwards slower
            tie = bool(r.get("tie"))
            if r is base:
                ax.plot([1.0], [i], "D", color=FAMILIES["jacobians"], markersize=6)
                continue
            ax.barh(
                i,
                ratios[i] - 1.0,
                left=1.0,
                color=FAMILIES[family(r["impl"])],
                alpha=0.45 if tie else 0.9,
                hatch="///" if tie else None,
                edgecolor="black" if tie else "none",
                linewidth=0.4,
            )
        ax.errorbar(
            ratios,
            list(y),
            xerr=[
                [max(0.0, r - a) for r, a in zip(ratios, lo, strict=True)],
                [max(0.0, b - r) for r, b in zip(ratios, hi, strict=True)],
            ],
            fmt="none",
            ecolor="black",
            elinewidth=0.8,
            capsize=2,
        )
        if "q25_s" in base:  # jacobians' own IQR: a bar whose whisker reaches this band is a tie
            ax.axvspan(base["q25_s"] / mb, base["q75_s"] / mb, color="tab:green", alpha=0.15, lw=0)
        ax.axvline(1.0, color="black", lw=0.8)
        span = max(max(hi), max(ratios)) / max(min(min(lo), min(ratios)), 1e-12)
        if span > 8:  # ratios over decades: log scale, plain-number ticks
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0,) if span > 300 else (1.0, 3.0)))
            ax.xaxis.set_minor_locator(NullLocator())
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            right = max(max(hi), max(ratios)) * 6
        else:
            ax.set_xlim(0, max(max(hi), max(ratios), 1.0) * 1.3)
            right = None
        for i, r in enumerate(rows):  # the figure, right of the whisker
            ax.text(max(ratios[i], hi[i]), i, "  " + ratio_cell(r), va="center", ha="left", fontsize=7)
        if right:
            ax.set_xlim(right=right)
        ax.set_yticks(list(y))
        ax.set_yticklabels([textwrap.fill(r["impl"], 24, break_long_words=False) for r in rows], fontsize=7)
        ax.invert_yaxis()
        ax.tick_params(axis="x", labelsize=7)
        ax.set_title(c["name"], fontsize=9)
        ax.set_xlabel("time relative to jacobians (lower is faster)", fontsize=7)
        ax.grid(axis="x", alpha=0.3)
    for ax in list(axes.flat)[len(cases) :]:
        ax.axis("off")
    present = {family(r["impl"]) for _, rows in cases for r in rows}
    handles = [Patch(color=col, label=f) for f, col in FAMILIES.items() if f in present]
    handles += [
        Patch(facecolor="white", edgecolor="black", hatch="///", label="~ tie: IQRs overlap"),
        Patch(color="tab:green", alpha=0.15, label="jacobians' IQR"),
    ]
    quick = " (quick run: a smoke test, not timings)" if report.get("quick") else ""
    title = (
        "Time of each implementation relative to jacobians (the diamond at 1) in the same case: bars to the left are "
        f"faster than jacobians, bars to the right slower{quick}. Whiskers: interquartile range."
    )
    fig.legend(
        handles=handles,
        loc="outside upper center",
        ncol=min(len(handles), 8),
        fontsize=8,
        frameon=False,
        title=title,
        title_fontsize=9,
    )
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_summary(report: dict, path: str) -> bool:
    """One row per case: jacobians' time relative to the best alternative, log axis, by workload family.

    A bar grows from 1 (the best alternative) to the library's median: leftwards the library is
    faster. Whiskers are the library's interquartile range; a hatched bar is a tie (the IQRs
    overlap); a white diamond marks the closed form (the floor). Returns False (and writes nothing)
    when no case has a bar.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

    rows = summary_figure_rows(report)
    if not any("ratio" in r for r in rows):
        return False
    fig, ax = plt.subplots(figsize=(10, 0.24 * len(rows) + 1.9), layout="constrained")
    vals = [v for r in rows if "ratio" in r for v in (r["ratio"], r["lo"], r["hi"], r["floor"]) if v]
    left, right = min(vals + [1.0]) / 1.6, max(vals + [1.0]) * 4.0  # room for the labels on the right
    for i, r in enumerate(rows):
        if "ratio" not in r:
            ax.text(1.0, i, f"  ({r['note']})", va="center", ha="left", fontsize=7, color="gray")
            continue
        colour = WORKLOAD_FAMILIES[r["family"]]
        ax.barh(
            i,
            r["ratio"] - 1.0,
            left=1.0,
            height=0.7,
            color=colour,
            alpha=0.45 if r["tie"] else 0.9,
            hatch="///" if r["tie"] else None,
            edgecolor="black" if r["tie"] else "none",
            linewidth=0.4,
        )
        ax.plot([r["lo"], r["hi"]], [i, i], color="black", lw=0.8)
        if r["floor"]:
            ax.plot([r["floor"]], [i], "D", color="white", markeredgecolor="black", markersize=5, zorder=3)
        label = f"  {'~' if r['tie'] else ''}{fmt_ratio(r['ratio'])}x {_short(r['best'])}"
        ax.text(max(r["ratio"], r["hi"], r["floor"] or 0, 1.0), i, label, va="center", ha="left", fontsize=7)
    ax.set_xscale("log")
    ax.set_xlim(left, right)
    span = right / left
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0,) if span > 3000 else (1.0, 2.0, 5.0)))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.axvline(1.0, color="black", lw=0.8)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([r["case"] for r in rows], fontsize=7)
    for tick, r in zip(ax.get_yticklabels(), rows, strict=True):
        tick.set_color(WORKLOAD_FAMILIES[r["family"]])
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.tick_params(axis="x", labelsize=7)
    ax.grid(axis="x", alpha=0.3)
    ax.set_xlabel(
        "jacobians' median time / the best alternative's (raw JAX, torch.func, JAX peers, NumPy); "
        "left of 1: jacobians is faster",
        fontsize=8,
    )
    present = {r["family"] for r in rows}
    handles = [Patch(color=col, label=f) for f, col in WORKLOAD_FAMILIES.items() if f in present]
    handles += [
        Patch(facecolor="white", edgecolor="black", hatch="///", label="~ tie: IQRs overlap"),
        Line2D([], [], color="black", lw=0.8, label="jacobians' IQR"),
    ]
    if any(r.get("floor") for r in rows):
        handles.insert(-1, Line2D([], [], color="white", marker="D", markeredgecolor="black", ls="none", ms=5,
                                  label="closed form"))
    quick = " (quick run: small sizes, a smoke test)" if report.get("quick") else ""
    fig.legend(
        handles=handles,
        loc="outside upper center",
        ncol=len(handles),
        fontsize=8,
        frameon=False,
        title=f"jacobians against the best alternative, one row per case{quick}; the label names that alternative",
        title_fontsize=9,
    )
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
