"""Smoke test of `python -m bench --quick`: structure and correctness columns, never timings."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench(*args, timeout=240):
    return subprocess.run(
        [sys.executable, "-m", "bench", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def test_quick_run_json(tmp_path):
    out = tmp_path / "r.json"
    proc = _bench("--quick", "--only", "tall", "--only", "logdet3", "--repeat", "2", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert set(report) >= {"command", "machine", "versions", "cases", "quick"}
    assert report["versions"]["jax"] and report["machine"]["cores"]
    assert [c["workload"] for c in report["cases"]] == ["tall", "logdet3"]
    for case in report["cases"]:
        assert case["status"] == "ok", case
        impls = {r["impl"]: r for r in case["results"]}
        assert "closed-form" in impls and "numpy-fd" in impls
        assert any(name.startswith("jacobians") for name in impls)
        for r in impls.values():
            assert r["status"] in ("ok", "skipped"), r  # nothing wrong, nothing failed
            if r["status"] == "ok":
                assert r["max_abs_err"] < 1e-2
                assert r["median_s"] > 0 and r["ratio_to_jacobians"] > 0
            else:
                assert r["error"].startswith("skipped")
    assert "tall_8x256_f32" in proc.stdout and "x jacobians" in proc.stdout


def test_plot(tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "r.png"
    proc = _bench("--quick", "--only", "gram", "--repeat", "1", "--plot", str(png))
    assert proc.returncode == 0, proc.stderr
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_usage_errors():
    proc = _bench("--only", "nosuchcase")
    assert proc.returncode == 2
    assert "unknown case or workload 'nosuchcase'; choose from:" in proc.stderr
    proc = _bench("--repeat", "0")
    assert proc.returncode == 2 and "--repeat must be >= 1, got 0" in proc.stderr
