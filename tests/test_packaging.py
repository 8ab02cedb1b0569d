"""The installed distribution: one top-level name, and kernels never imports the API."""

import ast
import importlib
import importlib.metadata
import pathlib

import pytest

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


# --- the built wheel, installed into a fresh virtualenv ------------------------------------------

# Runs inside the fresh virtualenv, from a folder outside the repository. One call of every public
# name (a name in jacobians.__all__ without an entry here fails the test: add one), then the README's example.
WHEEL_SCRIPT = r'''
import importlib.metadata, importlib.resources, inspect, pathlib, sys, warnings
import jax, jax.numpy as jnp, numpy as np
import jacobians as J

venv, version, readme = sys.argv[1:4]
assert pathlib.Path(J.__file__).resolve().is_relative_to(pathlib.Path(venv).resolve()), J.__file__
assert J.__version__ == version == importlib.metadata.version("jacobians"), (J.__version__, version)
assert J.kernels.__name__ == "jacobians.kernels" and pathlib.Path(J.kernels.__file__).parent.parent == pathlib.Path(J.__file__).parent
assert importlib.resources.files("jacobians").joinpath("py.typed").is_file()

def close(a, b):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-6)
    return True

x = jnp.array([0.3, -0.7, 1.1])
X = jnp.array([[0.5, -1.2], [0.8, 0.1], [-0.3, 1.4]])
f = lambda x: jnp.sin(x) * x[0]          # R^3 -> R^3
g = lambda x: jnp.sum(jnp.sin(x) ** 2)    # R^3 -> R
h = lambda x: jnp.tanh(jnp.array([[1.0, 0.5, 0.0], [0.2, 1.0, 0.3], [0.0, 0.4, 1.0]]) @ x) + x
Jf, H = jax.jacfwd(f)(x), jax.hessian(g)(x)

def coupled():
    try:
        J.batch_jacobian(lambda X: X * X.sum(0))(X)
    except J.CoupledBatchError:
        return True
    return False

CALLS = {
    "jacobian": lambda: close(J.jacobian(f)(x), Jf),
    "jacobian_matrix": lambda: close(J.jacobian_matrix(f)(x), Jf),
    "value_and_jacobian": lambda: close(J.value_and_jacobian(f)(x)[1], Jf),
    "explain": lambda: J.explain(f, x).method in ("dense", "compressed", "structured"),
    "JacobianPlan": lambda: isinstance(J.explain(f, x), J.JacobianPlan),
    "hessian": lambda: close(J.hessian(g)(x), H),
    "hvp": lambda: close(J.hvp(g, (x,), (x,)), H @ x),
    "value_grad_and_hessian": lambda: close(J.value_grad_and_hessian(g)(x)[2], H),
    "laplacian": lambda: close(J.laplacian(g)(x), jnp.trace(H)),
    "value_grad_and_laplacian": lambda: close(J.value_grad_and_laplacian(g)(x)[2], jnp.trace(H)),
    "hessian_diagonal": lambda: close(J.hessian_diagonal(g)(x), jnp.diag(H)),
    "LaplacianPlan": lambda: isinstance(J.laplacian(g).plan(x), J.LaplacianPlan),
    "sparsity": lambda: np.array_equal(J.sparsity(f, x).to_dense(), np.asarray(Jf) != 0),
    "SparsityPattern": lambda: isinstance(J.sparsity(f, x), J.SparsityPattern),
    "hessian_sparsity": lambda: np.array_equal(J.hessian_sparsity(g, x).to_dense(), np.eye(3, dtype=bool)),
    "sparse_jacobian": lambda: close(J.sparse_jacobian(f, output="dense")(x), Jf),
    "SparsePlan": lambda: isinstance(J.sparse_jacobian(f).plan(x), J.SparsePlan),
    "sparse_hessian": lambda: close(J.sparse_hessian(g, output="dense")(x), H),
    "batch_jacobian": lambda: close(J.batch_jacobian(lambda X: X ** 2)(X), jax.vmap(jax.jacfwd(lambda r: r ** 2))(X)),
    "CoupledBatchError": coupled,
    "det": lambda: close(J.det(h)(x), jnp.linalg.det(jax.jacfwd(h)(x))),
    "slogdet": lambda: close(J.slogdet(h)(x)[1], jnp.linalg.slogdet(jax.jacfwd(h)(x))[1]),
    "log_abs_det": lambda: close(J.log_abs_det(h)(x), jnp.linalg.slogdet(jax.jacfwd(h)(x))[1]),
    "log_volume": lambda: close(J.log_volume(h)(x), jnp.linalg.slogdet(jax.jacfwd(h)(x))[1]),
    "divergence": lambda: close(J.divergence(f)(x), jnp.trace(Jf)),
    "trace_estimate": lambda: close(J.trace_estimate(lambda v: 2.0 * v, num_probes=4)(x, key=jax.random.key(0))[0], 6.0),
    "gauss_newton": lambda: close(J.gauss_newton(f)(x).diagonal(), jnp.diag(Jf.T @ Jf)),
    "GaussNewton": lambda: isinstance(J.gauss_newton(f)(x), J.GaussNewton),
    "gradcheck": lambda: J.gradcheck(f, x).passed,
    "GradcheckResult": lambda: isinstance(J.gradcheck(f, x), J.GradcheckResult),
    "assert_gradcheck": lambda: J.assert_gradcheck(f, x).passed,
    "strict": lambda: inspect.isfunction(J.strict) and close(_strict_jacobian(), Jf),
    "PlanError": lambda: issubclass(J.PlanError, Exception),
    "PlanWarning": lambda: issubclass(J.PlanWarning, Warning),
    "contract": lambda: J.contract.chain(jnp.ones((2, 3)), jnp.ones((3, 4)), mid_ndim=1).shape == (2, 4),
    "layout": lambda: J.layout.to_matrix(jnp.zeros((4, 2, 3)), 2, order="F").shape == (8, 3),
    "identities": lambda: close(J.identities.linear(X), X),
    "kernels": lambda: close(J.kernels.forward(lambda v: (jnp.sin(v), None), x)[1], jnp.diag(jnp.cos(x))),
}

def _strict_jacobian():
    with J.strict():
        return J.jacobian(lambda v: jnp.cos(v) * v[1])(x) + Jf - jax.jacfwd(lambda v: jnp.cos(v) * v[1])(x)

missing = sorted(set(J.__all__) - set(CALLS))
assert not missing, f"public names without a call in tests/test_packaging.py WHEEL_SCRIPT: {missing}"
with warnings.catch_warnings():
    warnings.simplefilter("error")  # a fallback warning is a failure here
    failed = [name for name in J.__all__ if CALLS[name]() is not True]
assert not failed, failed

# The README's example, run as a user would (test_docs checks the values it shows).
text = pathlib.Path(readme).read_text()
exec(text.split("## Example", 1)[1].split("```python", 1)[1].split("```", 1)[0], {})
print("wheel ok", J.__version__, len(CALLS), "calls")
'''


def _pyproject_version() -> str:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


@pytest.mark.slow
def test_wheel_installs_and_works(tmp_path):
    """Build the wheel offline, install it alone into a fresh virtualenv, use it from outside the repository."""
    import os
    import shutil
    import site
    import subprocess
    import sys
    import sysconfig
    import zipfile

    # The sources a clean clone has (a build writes build/ and *.egg-info next to them: not in the shared tree).
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")
    for name in ("jacobians", "kernels"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    dist = tmp_path / "dist"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    res = subprocess.run(pip + ["wheel", str(src), "--no-deps", "--no-build-isolation", "--no-index", "-w", str(dist)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    (wheel,) = dist.glob("jacobians-*.whl")

    # Every module of the source tree is in the wheel, kernels/ under jacobians/kernels/.
    names = set(zipfile.ZipFile(wheel).namelist())
    want = {str(p.relative_to(ROOT)) for p in (ROOT / "jacobians").rglob("*.py") if "__pycache__" not in p.parts}
    want |= {"jacobians/" + str(p.relative_to(ROOT)) for p in (ROOT / "kernels").rglob("*.py")
             if "__pycache__" not in p.parts}
    assert want - names == set(), f"modules missing from the wheel: {sorted(want - names)}"
    assert "jacobians/py.typed" in names
    assert {n.split("/")[0] for n in names} == {"jacobians", f"jacobians-{_pyproject_version()}.dist-info"}

    # A fresh virtualenv that sees this environment's packages (jax, numpy) through a .pth file but not
    # its jacobians: the wheel is installed into it, alone, from the file (no network).
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    py = venv / "bin" / "python"
    purelib = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()}
    (pathlib.Path(purelib) / "outer-env.pth").write_text("\n".join(sorted(ours)) + "\n")
    res = subprocess.run(pip + ["--python", str(py), "install", "--no-deps", "--no-index", str(wheel)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]

    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    res = subprocess.run([py, "-c", WHEEL_SCRIPT, str(venv), _pyproject_version(), str(ROOT / "README.md")],
                         cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    assert "wheel ok" in res.stdout
