"""Jacobian methods behind one seam (:class:`Method`): the planner ranks their candidates.

Adding a method is one module here (a class with ``candidates``, ``evaluate``
and ``certify``, see :mod:`._base`) and one line in :data:`METHODS`.
"""

from ._base import (
    NO_FWD,
    NO_REV,
    Blocks,
    Call,
    Candidate,
    Context,
    Method,
    MethodName,
    Mode,
    Traced,
    directions,
    pass_cost,
    single,
)
from .compressed import COMPRESSED
from .dense import DENSE
from .structured import STRUCTURED, sweep_programs

# In planning order: dense first (it bounds what the others may spend), then the analyses.
METHODS: tuple[Method, ...] = (DENSE, COMPRESSED, STRUCTURED)
NAMES = ("auto",) + tuple(m.name for m in METHODS)  # the values of MethodName


def by_name(name: str) -> Method:
    return next(m for m in METHODS if m.name == name)


__all__ = ["COMPRESSED", "DENSE", "METHODS", "NAMES", "NO_FWD", "NO_REV", "STRUCTURED", "Blocks", "Call",
           "Candidate", "Context", "Method", "MethodName", "Mode", "Traced", "by_name", "directions", "pass_cost",
           "single", "sweep_programs"]
