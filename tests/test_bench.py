"""`python -m bench`: what a newcomer sees and gets on disk, never timings.

One small quick run in a subprocess (streamed table within 100 columns, files
written where it says, every implementation agreeing with its reference); the
rendering (tie marks, summary, Markdown, plot, re-rendering a saved run) on
synthetic reports in-process, without JAX.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # `bench` is not installed: import it from the checkout, however pytest was started

from bench import report as rep  # noqa: E402
from bench import suite  # noqa: E402


def _bench(*args, timeout=240):
    return subprocess.run(
        [sys.executable, "-m", "bench", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def _assert_fits(text):
    wide = [ln for ln in text.splitlines() if len(ln) > rep.WIDTH and not ln.startswith("Saved: ")]
    assert not wide, f"{len(wide)} lines wider than {rep.WIDTH} columns, e.g. {wide[0]!r}"


@pytest.mark.slow
def test_quick_run_streams_checks_and_saves(tmp_path):
    cases = ["tall_8x256_f32", "logdet_k2_1e3_f32"]
    proc = _bench("--quick", "--only", cases[0], "--only", cases[1], "--repeat", "3", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    _assert_fits(out)
    # Each case's rows come before the summary (they are printed as the case finishes).
    summary_at = out.index("Summary:")
    assert all(0 <= out.index(name + " | ") < summary_at for name in cases)
    # Saved where it says.
    paths = [os.path.join(ROOT, ln[len("Saved: ") :]) for ln in out.splitlines() if ln.startswith("Saved: ")]
    names = {os.path.basename(p) for p in paths}
    expected = {"latest-quick.json", "latest-quick.md"}
    if importlib.util.find_spec("matplotlib") is not None:  # the figures need the bench extra
        expected |= {"latest-quick.png", "latest-quick-summary.png"}
    else:
        assert suite.NO_MATPLOTLIB in out
    assert names == expected
    assert all(os.path.dirname(os.path.abspath(p)) == str(tmp_path) for p in paths)
    report = json.loads((tmp_path / "latest-quick.json").read_text())
    assert set(report) >= {"command", "machine", "versions", "cases", "quick", "missing_peers"}
    assert report["quick"] and report["versions"]["jax"] and report["machine"]["cores"]
    assert [c["name"] for c in report["cases"]] == cases
    for case in report["cases"]:
        assert case["status"] == "ok", case
        impls = {r["impl"]: r for r in case["results"]}
        assert "closed-form" in impls and "numpy-fd" in impls
        assert sum(bool(r.get("base")) for r in impls.values()) == 1
        for r in impls.values():  # every implementation agrees with the reference, and is timed
            assert r["status"] == "ok", r
            assert r["max_abs_err"] <= suite.TOL[case["dtype"]], r
            assert r["q25_s"] <= r["median_s"] <= r["q75_s"] and r["ratio_to_jacobians"] > 0
            assert ("~" in rep.ratio_cell(r)) == bool(r.get("tie"))
        if "torch" in report["missing_peers"]:  # said once at the top, no rows
            assert not any(n.startswith("torch") for n in impls)
    if report["missing_peers"]:
        assert out.index("Not installed") < out.index(cases[0] + " | ")
    assert "skipped" not in out
    md = (tmp_path / "latest-quick.md").read_text()
    assert "## Summary" in md and all(name in md for name in cases)
    if "latest-quick.png" in expected:
        assert (tmp_path / "latest-quick.png").read_bytes()[:4] == b"\x89PNG"
        assert (tmp_path / "latest-quick-summary.png").read_bytes()[:4] == b"\x89PNG"


def _synthetic(quick=True):
    """A report as a run would write it, with chosen quartiles: 'jacobians' in [0.9, 1.1] ms."""
    rows = []
    spec = [
        ("jacobians", 0.9e-3, 1.0e-3, 1.1e-3),
        ("jax.jacfwd", 1.05e-3, 1.2e-3, 1.3e-3),  # IQR overlaps jacobians': a tie
        ("jax.jacrev", 2.5e-3, 3.0e-3, 3.5e-3),  # clearly slower
        ("torch.func.jacrev (a long name for a torch function)", 2e-4, 2.5e-4, 3e-4),  # clearly faster
        ("closed-form", 0.5e-3, 0.6e-3, 0.7e-3),
    ]
    base = None
    for impl, q25, med, q75 in spec:
        r = {"impl": impl, "kind": "torch" if impl.startswith("torch") else "jax", "status": "ok"}
        r.update(max_abs_err=1e-7, compile_s=0.2, median_s=med, q25_s=q25, q75_s=q75, iqr_s=q75 - q25, rounds=5)
        base = base or r
        r["ratio_to_jacobians"] = med / base["median_s"]
        if r is base:
            r["base"] = True
        else:
            r["tie"] = suite._is_tie(r, base)
        rows.append(r)
    rows.append({"impl": "numpy-fd", "kind": "numpy", "status": "wrong", "error": "max abs err 0.5 > 0.002"})
    case = {"name": "synthetic_case_with_a_rather_long_name_f32", "status": "ok", "results": rows}
    failed = {"name": "broken_f32", "status": "failed", "error": "exit 1: " + "x" * 300, "results": []}
    return {
        "command": "python -m bench --quick",
        "quick": quick,
        "repeat": 5,
        "machine": {"cpu": "a CPU with a long model name " * 4, "cores": 2, "jax_backend": "cpu"},
        "versions": {"jax": "0.10.2", "python": "3.11"},
        "missing_peers": {p: suite.PEERS[p] for p in ("torch", "asdex", "sparsejac")},
        "cases": [case, failed],
    }


def test_ties_are_marked_not_judged():
    report = _synthetic()
    rows = {r["impl"]: r for r in report["cases"][0]["results"]}
    assert rows["jax.jacfwd"]["tie"] and not rows["jax.jacrev"]["tie"] and not rows["closed-form"]["tie"]
    text = rep.text(report)
    _assert_fits(text)
    lines = {ln.split()[0]: ln for ln in text.splitlines() if ln.startswith("  ") and ln.split()}
    assert "~1.20" in lines["jax.jacfwd"]  # a tie: marked, whatever the median ratio says
    assert " 3.00" in lines["jax.jacrev"] and "~" not in lines["jax.jacrev"]
    assert "WRONG" in lines["numpy-fd"]
    summary = rep.summary(report)
    assert "~1.20 (jacfwd)" in summary  # the best raw JAX ratio keeps its tie mark
    assert "FAILED" in summary and "numpy-fd" in summary  # failures are named, not hidden
    assert text.count("pip install -e '.[bench,peers]'") == 1  # one line for both sparse peers
    assert "\\~1.20 (jacfwd)" in rep.markdown(report)  # escaped in Markdown


def test_from_json_rerenders_and_plots(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path = tmp_path / "run.json"
    path.write_text(json.dumps(_synthetic()))
    png = tmp_path / "run.png"
    assert suite.main(["--from-json", str(path), "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    _assert_fits(out)
    assert "synthetic_case" in out and "Summary:" in out
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert suite.main(["--from-json", str(path), "--markdown"]) == 0
    assert capsys.readouterr().out.startswith("# Benchmark run")


def test_saved_runs_in_the_repository_still_render(capsys):
    saved = os.path.join(ROOT, "bench", "results", "cpu-2core.json")
    if not os.path.exists(saved):
        pytest.skip("no saved run")
    assert suite.main(["--from-json", saved]) == 0
    _assert_fits(capsys.readouterr().out)


def test_case_table():
    names = [c.name(False) for c in suite.CASES]
    assert len(names) == len(set(names))
    quick = suite.selected_cases(None, quick=True)
    assert len({c.name(True) for c in quick}) == len(quick)
    for k in (2, 3, 4, 8, 16, 32):
        for dt in ("f32", "f64"):
            assert any(n.startswith(f"logdet_k{k}_") and n.endswith(dt) for n in names)
            assert any(n.startswith(f"slogdet_k{k}_") and n.endswith(dt) for n in names)
    assert {"conv_3x16x16to8_f32", "mlp_1024x1024x16_f32", "resmlp_4x512_f32"} <= set(names)
    for c in suite.selected_cases(["logdet"], quick=False):
        assert c.params["points"] == (100_000 if c.params["k"] <= 8 else 10_000)


def test_usage_errors():
    proc = _bench("--only", "nosuchcase")
    assert proc.returncode == 2
    assert "unknown case or workload 'nosuchcase'; choose from:" in proc.stderr
    proc = _bench("--repeat", "0")
    assert proc.returncode == 2 and "--repeat must be >= 1, got 0" in proc.stderr


def _row(impl, med, base_med=None, spread=0.05, **extra):
    """A timed row with quartiles med * (1 -+ spread); ratio and tie against ``base_med``."""
    r = {"impl": impl, "kind": "torch" if impl.startswith("torch") else "jax", "status": "ok"}
    r.update(median_s=med, q25_s=med * (1 - spread), q75_s=med * (1 + spread), **extra)
    base_med = base_med or med
    r["ratio_to_jacobians"] = med / base_med
    r["tie"] = med * (1 - spread) <= base_med * (1 + spread) and base_med * (1 - spread) <= med * (1 + spread)
    return r


def _figure_report():
    """Cases chosen so that each decision of the summary figure's data shows: best, tie, floor, family, notes."""

    def case(name, workload, rows, status="ok"):
        return {"name": name, "workload": workload, "status": status, "results": rows}

    b = 1e-3
    return {
        "quick": True,
        "cases": [
            # Sparse, listed first: the figure puts it after the dense cases. The detection row is
            # faster than everything but is not an alternative; the closed form is not either.
            case("stencil1d_200_f32", "stencil1d", [
                _row("jacobians", b, base=True), _row("asdex", 2 * b, b), _row("sparsejac.jacfwd", 3 * b, b),
                _row("closed-form", 0.5 * b, b), _row("detect+colour: jacobians", 1e-6, b, kind="detect"),
            ]),
            # Dense: torch is the fastest alternative (0.4 ms): ratio 2.5, no tie; the closed form is the floor.
            case("mlp_32_f32", "mlp", [
                _row("jacobians", b, base=True), _row("jacobians[rev]", 0.1 * b, b), _row("jax.jacfwd", 4 * b, b),
                _row("torch.func.jacrev", 0.4 * b, b), _row("closed-form", 0.8 * b, b),
                _row("vmap(jacobians.jacobian)", 0.2 * b, b),  # the library composed with vmap: not an alternative
                {"impl": "numpy-fd", "kind": "numpy", "status": "wrong", "error": "max abs err 1"},
            ]),
            # Determinants, by name only (an older run without 'workload'): a tie with jnp, no closed form.
            {"name": "slogdet_k2_1e3_f32", "status": "ok", "results": [
                _row("jacobians.kernels.slogdet", b, base=True), _row("jnp.linalg.slogdet", 1.02 * b, b),
            ]},
            case("divergence_stencil_200_f32", "divergence_stencil", [_row("jacobians.divergence", b, base=True)]),
            case("hessian_mlp_32_f32", "hessian_mlp", [], status="failed"),
        ],
    }


def test_summary_figure_rows_pick_the_best_alternative():
    rows = rep.summary_figure_rows(_figure_report())
    assert [(r["case"], r["family"]) for r in rows] == [
        ("mlp_32_f32", "dense"),
        ("stencil1d_200_f32", "sparse"),
        ("hessian_mlp_32_f32", "second order"),
        ("slogdet_k2_1e3_f32", "determinants"),
        ("divergence_stencil_200_f32", "traces/operators"),
    ]
    mlp, sparse, failed, det, div = rows
    # The fastest alternative, not the library's own forced mode, nor the closed form.
    assert mlp["best"] == "torch.func.jacrev" and mlp["ratio"] == pytest.approx(2.5)
    assert (mlp["lo"], mlp["hi"]) == pytest.approx((0.95 * 2.5, 1.05 * 2.5))
    assert not mlp["tie"] and mlp["floor"] == pytest.approx(2.0)
    # Detection (faster than all) is not an alternative: asdex is; the floor sits left of 1.
    assert sparse["best"] == "asdex" and sparse["ratio"] == pytest.approx(0.5) and sparse["floor"] == pytest.approx(0.25)
    assert det["tie"] and det["best"] == "jnp.linalg.slogdet" and det["floor"] is None
    assert failed["note"] == "failed" and "ratio" not in failed
    fams = {i: rep.family(i) for i in ("trace(jax.jacfwd)", "folx.forward_laplacian", "vmap(jacobians.jacobian)")}
    assert fams == {"trace(jax.jacfwd)": "raw JAX", "folx.forward_laplacian": "JAX peers",
                    "vmap(jacobians.jacobian)": "jacobians"}
    assert div["note"] == "no alternative timed" and "ratio" not in div


def test_summary_figure_is_written_and_skipped_without_matplotlib(tmp_path, monkeypatch):
    report = _figure_report()
    if importlib.util.find_spec("matplotlib") is not None:
        paths = suite.plots(report, str(tmp_path / "run.png"))
        assert paths == [str(tmp_path / "run.png"), str(tmp_path / "run-summary.png")]
        assert (tmp_path / "run-summary.png").read_bytes()[:4] == b"\x89PNG"
        # No case with a bar: no summary figure.
        assert not rep.plot_summary({"cases": report["cases"][3:]}, str(tmp_path / "none.png"))
        assert not (tmp_path / "none.png").exists()
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    written = suite.save(report, str(tmp_path / "nomatplotlib"), "run")
    assert sorted(os.path.basename(p) for p in written) == ["run.json", "run.md"]
    assert sorted(os.listdir(tmp_path / "nomatplotlib")) == ["run.json", "run.md"]
