"""The package list for setuptools; every other piece of metadata lives in pyproject.toml.

Packages are discovered, not listed by hand, so a new subpackage cannot be left
out of the wheel: everything under ``jacobians/``, and ``kernels/`` (kept at the
repository root) with its subpackages installed as ``jacobians.kernels``, so that
``jacobians`` is the only top-level name we install.
"""

import pathlib

from setuptools import find_packages, setup

ROOT = pathlib.Path(__file__).resolve().parent

packages = find_packages(where=str(ROOT), include=["jacobians", "jacobians.*"])
packages += ["jacobians.kernels"] + [f"jacobians.kernels.{p}" for p in find_packages(where=str(ROOT / "kernels"))]
setup(packages=packages, package_dir={"jacobians.kernels": "kernels"})
