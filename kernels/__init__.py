"""Compiled compute routines behind :mod:`jacobians`.

Everything here works on *flat* problems: a function from a 1-D array of size
``n`` to a 1-D array of size ``m`` and its ``(m, n)`` Jacobian matrix, or on
stacks of small square matrices. Argument checking, pytrees and layouts are the
business of :mod:`jacobians`; this package never imports it.
"""

from ._basis import Shards as Shards
from ._basis import basis_map as basis_map
from ._basis import opaque as opaque
from ._basis import sharded_chunks as sharded_chunks
from ._basis import sharded_vmap as sharded_vmap
from ._compressed import compressed_dense as compressed_dense
from ._compressed import compressed_forward as compressed_forward
from ._compressed import compressed_jvps as compressed_jvps
from ._compressed import compressed_reverse as compressed_reverse
from ._compressed import compressed_vjps as compressed_vjps
from ._compressed import seed_map as seed_map
from ._det import SlogdetResult as SlogdetResult
from ._det import slogdet as slogdet
from ._forward import forward as forward
from ._forward import primal_once as primal_once
from ._index import from_entries as from_entries
from ._index import place as place
from ._index import take as take
from ._index import take_rows as take_rows
from ._reverse import reverse as reverse

__all__ = [
    "Shards",
    "basis_map",
    "compressed_dense",
    "compressed_forward",
    "compressed_jvps",
    "compressed_reverse",
    "compressed_vjps",
    "forward",
    "from_entries",
    "opaque",
    "place",
    "primal_once",
    "reverse",
    "seed_map",
    "sharded_chunks",
    "sharded_vmap",
    "SlogdetResult",
    "slogdet",
    "take",
    "take_rows",
]
