"""jacobians: fast Jacobians, tensor layouts and Jacobian determinants for JAX.

The math is chapter 5 of *Mathematics for Machine Learning* (Deisenroth, Faisal
and Ong): Jacobians in numerator layout ``out.shape + in.shape`` (5.58), their
flattenings (section 5.4), the chain rule on tensors and the identities of 5.5.
"""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

from . import contract as contract
from . import identities as identities
from . import kernels as kernels
from . import layout as layout
from ._batch import CoupledBatchError as CoupledBatchError
from ._batch import batch_jacobian as batch_jacobian
from ._det import det as det
from ._det import log_abs_det as log_abs_det
from ._det import log_volume as log_volume
from ._det import slogdet as slogdet
from ._divergence import divergence as divergence
from ._divergence import trace_estimate as trace_estimate
from ._gauss_newton import GaussNewton as GaussNewton
from ._gauss_newton import gauss_newton as gauss_newton
from ._gradcheck import GradcheckResult as GradcheckResult
from ._gradcheck import assert_gradcheck as assert_gradcheck
from ._gradcheck import gradcheck as gradcheck
from ._hessian import hessian as hessian
from ._hessian import hvp as hvp
from ._hessian import value_and_jacobian as value_and_jacobian
from ._hessian import value_grad_and_hessian as value_grad_and_hessian
from ._jacobian import explain as explain
from ._jacobian import jacobian as jacobian
from ._jacobian import jacobian_matrix as jacobian_matrix
from ._laplacian import LaplacianPlan as LaplacianPlan
from ._laplacian import hessian_diagonal as hessian_diagonal
from ._laplacian import laplacian as laplacian
from ._laplacian import value_grad_and_laplacian as value_grad_and_laplacian
from ._planner import JacobianPlan as JacobianPlan
from ._sparse import SparsePlan as SparsePlan
from ._sparse import SparsityPattern as SparsityPattern
from ._sparse import hessian_sparsity as hessian_sparsity
from ._sparse import sparse_hessian as sparse_hessian
from ._sparse import sparse_jacobian as sparse_jacobian
from ._sparse import sparsity as sparsity
from ._trust import PlanError as PlanError
from ._trust import PlanWarning as PlanWarning
from ._trust import strict as strict

try:
    __version__ = _version("jacobians")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

__all__ = [
    "CoupledBatchError",
    "GaussNewton",
    "GradcheckResult",
    "JacobianPlan",
    "LaplacianPlan",
    "PlanError",
    "PlanWarning",
    "SparsePlan",
    "SparsityPattern",
    "assert_gradcheck",
    "batch_jacobian",
    "contract",
    "det",
    "divergence",
    "explain",
    "gauss_newton",
    "gradcheck",
    "hessian",
    "hessian_diagonal",
    "hessian_sparsity",
    "hvp",
    "identities",
    "kernels",
    "jacobian",
    "jacobian_matrix",
    "laplacian",
    "layout",
    "log_abs_det",
    "log_volume",
    "slogdet",
    "sparse_hessian",
    "sparse_jacobian",
    "sparsity",
    "strict",
    "trace_estimate",
    "value_and_jacobian",
    "value_grad_and_hessian",
    "value_grad_and_laplacian",
]
