"""Docstring examples run and print what they say (in JAX's default float32, as a user sees them)."""

import pathlib
import subprocess
import sys
import textwrap

import jacobians

SCRIPT = textwrap.dedent(
    """
    import doctest, importlib, pkgutil, sys
    import jax, jax.numpy as jnp, numpy as np
    import jacobians

    failed = tried = 0
    names = ["jacobians"] + [f"jacobians.{m.name}" for m in pkgutil.walk_packages(jacobians.__path__) if True]
    names += ["jacobians.kernels"] + [f"jacobians.kernels.{m.name}" for m in pkgutil.iter_modules(jacobians.kernels.__path__)]
    for name in names:
        mod = importlib.import_module(name)
        r = doctest.testmod(mod, extraglobs={"jnp": jnp, "jax": jax, "np": np, "jacobians": jacobians},
                            optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
        failed += r.failed
        tried += r.attempted
    print("tried", tried, "failed", failed)

    # The README's example: each line `expr  # shown` shows the value's literal, or its text
    # (with "..." for the parts that vary).
    import ast, pathlib, re
    text = pathlib.Path(README).read_text()
    block = text.split("## Example", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    env, checked = {}, 0
    for line in block.strip().splitlines():
        code, _, shown = line.partition("  # ")
        if not shown:
            exec(code, env)
            continue
        value = eval(code, env)
        head = re.split(r" {2,}", shown.strip())[0]
        try:
            want = ast.literal_eval(head)
        except (ValueError, SyntaxError):
            pattern = ".*".join(re.escape(p) for p in head.split("..."))
            ok = re.fullmatch(pattern + ".*", str(value)) is not None
        else:
            ok = np.allclose(np.asarray(value), np.asarray(want), rtol=1e-6)
        if not ok:
            print("README example:", line, "printed", value)
            failed += 1
        checked += 1
    sys.exit(1 if failed or tried < 8 or checked != 3 else 0)
    """
)
README = str(pathlib.Path(__file__).resolve().parent.parent / "README.md")


def test_docstring_examples_run():
    # Docstrings and the README's example, as a user runs them (float32, JAX's default promotion).
    script = f"README = {README!r}\n" + SCRIPT
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]


def test_every_public_name_is_documented():
    for name in jacobians.__all__:
        obj = getattr(jacobians, name)
        assert obj.__doc__ and len(obj.__doc__.strip()) > 20, name

