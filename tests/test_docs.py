"""Docstring examples run and print what they say (in JAX's default float32, as a user sees them)."""

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
    sys.exit(1 if failed or tried < 8 else 0)
    """
)


def test_docstring_examples_run():
    res = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]


def test_every_public_name_is_documented():
    for name in jacobians.__all__:
        obj = getattr(jacobians, name)
        assert obj.__doc__ and len(obj.__doc__.strip()) > 20, name
