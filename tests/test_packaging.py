"""The installed distribution: one top-level name, and kernels never imports the API."""

import ast
import importlib
import importlib.metadata
import pathlib

import jacobians
from jacobians import kernels

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_only_top_level_name_is_jacobians():
    # The installed distribution (a stale egg-info left in the source tree by a build is not it).
    dists = [d for d in importlib.metadata.distributions(name="jacobians")
             if pathlib.Path(str(d.locate_file(""))).resolve() != ROOT]
    assert dists, "jacobians is not installed (pip install -e .)"
    dist = dists[0]
    assert dist.read_text("top_level.txt").split() == ["jacobians"]
    modules = []
    for f in dist.files or ():
        parts = pathlib.PurePosixPath(str(f)).parts
        if parts[0].endswith((".dist-info", ".egg-info")) or parts[0] == "__pycache__":
            continue
        if parts[0].startswith("__editable__"):
            # An editable install: the finder maps import names to source folders.
            if parts[0].endswith("_finder.py"):
                finder = importlib.import_module(parts[0][:-3])
                modules += list(finder.MAPPING) + list(finder.NAMESPACES)
            continue
        if str(f).endswith(".py"):
            modules.append(".".join(parts)[:-3])
    assert modules, "no installed modules found"
    bad = [m for m in modules if m.split(".")[0] != "jacobians"]
    assert not bad, f"modules installed outside the jacobians package: {bad}"


def test_kernels_install_under_jacobians():
    assert kernels.__name__ == "jacobians.kernels"
    assert jacobians.kernels is kernels


def test_kernels_import_nothing_from_the_api():
    for path in sorted((ROOT / "kernels").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                assert node.level <= 1, f"{path.name}: relative import beyond kernels/"
                assert node.level == 1 or not (node.module or "").startswith(("jacobians", "kernels")), path.name
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("jacobians") for a in node.names), path.name
