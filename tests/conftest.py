import os
import zlib

import jax
import numpy as np
import pytest
from hypothesis import settings

# CI runs the same examples every time (a red run must be reproducible);
# local runs explore new ones.
settings.register_profile("ci", derandomize=True, deadline=None)
if os.environ.get("CI"):
    settings.load_profile("ci")

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")


@pytest.fixture
def rng(request):
    """A NumPy generator seeded from the test's name: fresh, varied, reproducible."""
    seed = zlib.crc32(request.node.nodeid.encode())  # stable across processes, unlike hash()
    return np.random.default_rng(seed)
