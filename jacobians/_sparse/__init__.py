"""The sparse concern: detected patterns, colourings, compressed evaluation.

- :mod:`.pattern`: :class:`SparsityPattern` and detection (``sparsity``,
  ``hessian_sparsity``: the first- and second-order lattices of ``_deps`` on
  the shared walker).
- :mod:`.coloring`: host-side column, row, star and acyclic colourings and
  their decompressions (planning; ``kernels`` runs the compressed products).
- :mod:`.engine`: ``sparse_jacobian`` / ``sparse_hessian`` and the
  :class:`SparsePlan` they make, certify and evaluate.
"""

from . import coloring
from .engine import Engine, SparsePlan, certify_plan, facts, make_plan, sparse_hessian, sparse_jacobian
from .pattern import Detected, SparsityPattern, detect_traced, hessian_sparsity, sparsity

__all__ = ["Detected", "Engine", "SparsePlan", "SparsityPattern", "certify_plan", "coloring", "detect_traced", "facts",
           "hessian_sparsity", "make_plan", "sparse_hessian", "sparse_jacobian", "sparsity"]
