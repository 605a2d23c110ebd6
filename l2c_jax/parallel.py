"""Placement, written once: the device mesh and putting parameter trees on it.

Every loader (`load_model`, `load_vae`), `Model.random`, the samplers, the
trainers and the jobs place weights through `place` (or restore straight into
`abstract_on`'s target), so weights live on the devices exactly once. A tree of
host (NumPy) arrays handed to a jitted function is copied to the device on
every call; at DiT-XL/2 size those copies pile up faster than they are freed.

The mesh has one `data` axis over all devices (of all processes, once
`jax.distributed` is initialised); weights are replicated over it and batches
split along it. Its axis type is given explicitly: `jax.make_mesh` defaults to
`Explicit` axes since jax 0.10, which would change how every jitted function
in this project is typed; `Auto` keeps sharding propagation to XLA.
"""

from __future__ import annotations

import functools
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def make_mesh(devices: Optional[Sequence[Any]] = None) -> Mesh:
    """A 1-D mesh with a `data` axis over `devices` (default: every device of every process)."""
    devices = list(jax.devices() if devices is None else devices)
    return Mesh(np.asarray(devices), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


@functools.lru_cache(maxsize=None)
def _default_mesh(ids: tuple) -> Mesh:
    return make_mesh()


def default_mesh() -> Mesh:
    """The mesh over all devices, built once per set of devices."""
    return _default_mesh(tuple(d.id for d in jax.devices()))


@functools.lru_cache(maxsize=None)
def _local_mesh(ids: tuple) -> Mesh:
    return make_mesh(jax.local_devices())


def local_mesh() -> Mesh:
    """The mesh over this process's own devices: for work that needs no other process (sampling, encoding).

    In a one-process job it is `default_mesh()`.
    """
    return _local_mesh(tuple(d.id for d in jax.local_devices()))


def replicated(mesh: Optional[Mesh] = None) -> NamedSharding:
    """Every device holds the whole array (the default for weights)."""
    return NamedSharding(mesh or default_mesh(), PartitionSpec())


def batch_sharded(mesh: Optional[Mesh] = None) -> NamedSharding:
    """The leading (batch) axis split over the `data` axis."""
    return NamedSharding(mesh or default_mesh(), PartitionSpec(DATA_AXIS))


def is_placed(tree: Any) -> bool:
    """True when every leaf is a device array, or only a shape (nothing to copy per call)."""
    return all(isinstance(a, (jax.Array, jax.ShapeDtypeStruct)) for a in jax.tree.leaves(tree))


def place(tree: Any, mesh: Optional[Mesh] = None, sharding: Optional[NamedSharding] = None) -> Any:
    """Puts a parameter tree on the mesh, replicated unless `sharding` says otherwise.

    Leaves already laid out as asked are returned as they are (no copy). An uncommitted
    array (fresh from jnp on the default device) is committed to the sharding even where
    its layout already matches; that shares its buffer, and a jitted step then sees the
    same shardings at its first call as at every later one, so it compiles once.
    """
    sharding = sharding or replicated(mesh)

    def put(a):
        if isinstance(a, jax.Array) and a.committed and a.sharding.is_equivalent_to(sharding, a.ndim):
            return a
        if not sharding.is_fully_addressable:
            # A mesh over several processes: each holds the same value and fills its own devices' part.
            host = np.asarray(a)
            return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
        return jax.device_put(a, sharding)

    return jax.tree.map(put, tree)


def abstract_on(tree: Any, mesh: Optional[Mesh] = None, sharding: Optional[NamedSharding] = None) -> Any:
    """ShapeDtypeStructs carrying a sharding: an orbax restore target that yields device arrays."""
    sharding = sharding or replicated(mesh)
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)


def shard_batch(x: Any, mesh: Optional[Mesh] = None) -> Any:
    """A batch split over the `data` axis when it divides evenly, else left replicated."""
    mesh = mesh or default_mesh()
    n = mesh.devices.size
    if n == 1:
        return x
    return jax.tree.map(lambda a: jax.device_put(a, batch_sharded(mesh) if a.shape[0] % n == 0
                                                 else replicated(mesh)), x)


def cast_floating(tree: Any, dtype) -> Any:
    """The floating leaves of a pytree in `dtype` (e.g. parameters stored in bfloat16); shapes stay shapes."""
    def cast(a):
        if jnp.issubdtype(a.dtype, jnp.floating):
            return jax.ShapeDtypeStruct(a.shape, dtype) if isinstance(a, jax.ShapeDtypeStruct) else a.astype(dtype)
        return a
    return jax.tree_util.tree_map(cast, tree)
