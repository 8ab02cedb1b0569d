"""jacobians: fast Jacobians, tensor layouts and Jacobian determinants for JAX.

The math is chapter 5 of *Mathematics for Machine Learning* (Deisenroth, Faisal
and Ong): Jacobians in numerator layout ``out.shape + in.shape`` (5.58), their
flattenings (section 5.4), the chain rule on tensors and the identities of 5.5.
"""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

from . import contract as contract
from . import identities as identities
from . import layout as layout
from ._jacobian import jacobian as jacobian
from ._jacobian import jacobian_matrix as jacobian_matrix

try:
    __version__ = _version("jacobians")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

__all__ = ["contract", "identities", "jacobian", "jacobian_matrix", "layout"]
