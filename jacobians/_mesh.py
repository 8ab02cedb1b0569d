"""Scale-out: splitting basis vectors, colours or batches across the devices of a ``jax.sharding`` mesh.

The basis axis is the natural parallel axis of a Jacobian: every JVP (VJP,
Hessian-vector product) is independent. With ``mesh=`` the engines stack
their seeds, pad the stack to a multiple of the device count with zero seeds
(shapes stay static: nothing recompiles per call), pin it across the mesh with
``jax.lax.with_sharding_constraint`` and let XLA's SPMD partitioner split the
vmapped passes; results come back sharded along their basis axis. Under
``jax.distributed.initialize`` the mesh may span processes: ``mesh="auto"``
takes every device of every process.
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from . import _compat
from .kernels import Shards


def resolve(mesh, where: str, axis=None) -> Shards | None:
    """``None``, ``"auto"`` or a ``Mesh`` (optionally the axis names to split over) -> :class:`Shards`."""
    if mesh is None:
        if axis is not None:
            raise ValueError(f"{where}: mesh_axis={axis!r} names an axis of a mesh, but no mesh was given.")
        return None
    if isinstance(mesh, str):
        if mesh != "auto":
            raise ValueError(f"{where}: mesh must be None, 'auto' or a jax.sharding.Mesh, got {mesh!r}.")
        mesh = Mesh(np.asarray(jax.devices()), ("devices",))
    if not isinstance(mesh, Mesh):
        raise TypeError(f"{where}: mesh must be None, 'auto' or a jax.sharding.Mesh, got {type(mesh).__name__}.")
    mesh = _compat.auto_axes(mesh)  # jax.make_mesh's Explicit axes: sharding constraints need Auto ones
    names = tuple(mesh.axis_names) if axis is None else ((axis,) if isinstance(axis, str) else axis)
    if (not isinstance(names, tuple | list) or not names or not all(isinstance(a, str) for a in names)
            or len(set(names)) != len(names)):
        raise TypeError(f"{where}: mesh_axis must be an axis name or a non-empty tuple of distinct axis names, got "
                        f"{axis!r}.")
    names = tuple(names)
    missing = [a for a in names if a not in mesh.axis_names]
    if missing:
        raise ValueError(
            f"{where}: the mesh has axes {tuple(mesh.axis_names)}, but mesh_axis names {tuple(missing)}."
        )
    mine = {d.process_index for d in mesh.devices.flat}
    if jax.process_index() not in mine:
        raise ValueError(
            f"{where}: the mesh holds no device of this process (process {jax.process_index()}); build it from "
            "jax.devices() of the running jax.distributed process set."
        )
    count = int(np.prod([mesh.shape[a] for a in names]))

    def constrain(a, axis=0):
        if a.ndim == 0 or a.shape[axis] % count:
            return a  # jax.Array shards split evenly: an uneven axis stays as XLA lays it out
        spec = [None] * a.ndim
        spec[axis] = names if len(names) > 1 else names[0]
        return jax.lax.with_sharding_constraint(a, NamedSharding(mesh, PartitionSpec(*spec)))

    return Shards(count, constrain, mesh)


def onto(leaves: list, mesh: Mesh) -> list:
    """Concrete arrays committed to devices other than ``mesh``'s, replicated onto it (the others as they are)."""
    devices = set(mesh.devices.flat)

    def place(a):
        if isinstance(a, jax.Array) and not _compat.is_tracer(a) and set(a.sharding.device_set) != devices:
            return jax.device_put(a, NamedSharding(mesh, PartitionSpec()))
        return a

    return [place(a) for a in leaves]


def shard_result(tree, shards: Shards | None, axis_of):
    """Pin each leaf of a result along its basis axis ``axis_of(leaf)`` (``None``: leave it)."""
    if shards is None or shards.count <= 1:
        return tree

    def pin(leaf):
        ax = axis_of(leaf)
        return leaf if ax is None or ax >= leaf.ndim else shards.constrain(leaf, ax)

    return jax.tree_util.tree_map(pin, tree)


def pad_batch(x, count: int):
    """``x`` padded along axis 0 to a multiple of ``count`` with copies of its last row.

    Copies, not zeros: a zero example can have a singular Jacobian or give NaN; the
    padding is dropped from the results. Seeds are padded with zero rows instead
    (:func:`jacobians.kernels.sharded_vmap`): a zero seed is a zero pass.
    """
    pad = -x.shape[0] % count
    return jnp.concatenate([x, jnp.repeat(x[-1:], pad, axis=0)]) if pad else x
