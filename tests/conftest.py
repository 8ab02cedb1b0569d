import os
import shutil
import tempfile
import zlib

import jax
import numpy as np
import pytest
from hypothesis import settings

# The suite runs strict: an analysis that fails, or a plan that fails its certificate, is a PlanError here
# instead of a PlanWarning and the dense method (JACOBIANS_STRICT=0 turns it off to debug). Set before any
# test imports jacobians; subprocess tests inherit it.
os.environ.setdefault("JACOBIANS_STRICT", "1")

# Test programs are tiny and compiled once: LLVM's cheapest code generation (the same numbers, a few percent
# slower to run) takes about 15% off the suite's time, most of which is XLA compiling. Subprocesses inherit it.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

# CI runs the same examples every time (a red run must be reproducible);
# local runs explore new ones.
settings.register_profile("ci", derandomize=True, deadline=None)
if os.environ.get("CI"):
    settings.load_profile("ci")

# One XLA compilation cache per test process (each xdist worker its own: JAX writes cache files without
# a lock, so a shared folder could be read half-written), removed when the process ends: a program that
# another test or a fresh closure already compiled to the same HLO is loaded instead of compiled again.
# Nothing is kept between runs. Subprocess tests do not use it.
_CACHE_DIR = tempfile.mkdtemp(prefix="jacobians-test-xla-cache-")
jax.config.update("jax_compilation_cache_dir", _CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def pytest_unconfigure(config):
    shutil.rmtree(_CACHE_DIR, ignore_errors=True)


jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")
# float32 tests compare with float64 references: on GPUs XLA's default matmul and convolution precision is
# TF32 (10 mantissa bits), for JAX's own transformations and ours alike, which no float32 tolerance here allows.
if jax.default_backend() != "cpu":
    jax.config.update("jax_default_matmul_precision", "highest")


# Tests that start a fresh Python and JAX in a subprocess run first: the longest single tests, they
# then overlap the rest of the run instead of ending it on one worker.
_FIRST = (
    "tests/test_packaging.py::test_wheel",
    "tests/test_mesh.py::",
    "tests/test_bench.py::test_quick_run",
    "tests/test_docs.py::test_docstring",
)


def pytest_collection_modifyitems(config, items):
    def rank(item):
        return next((i for i, prefix in enumerate(_FIRST) if item.nodeid.startswith(prefix)), len(_FIRST))

    items.sort(key=rank)  # stable: the rest keep their order


@pytest.fixture
def rng(request):
    """A NumPy generator seeded from the test's name: fresh, varied, reproducible."""
    seed = zlib.crc32(request.node.nodeid.encode())  # stable across processes, unlike hash()
    return np.random.default_rng(seed)
