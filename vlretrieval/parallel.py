"""Devices, meshes and shardings: the only module that names a mesh axis.

Every step is `jax.jit` over a `Mesh` with `NamedSharding`s: the batch is split over the `data`
axis of all devices of all hosts, parameters are replicated. XLA inserts the collectives that a
loss over the global batch needs, so the step is exact whatever the device count.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def make_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D `data` mesh over the first `num_devices` devices (all devices of all hosts if None)."""
    devices = jax.devices()
    if num_devices is not None:
        if num_devices > len(devices):
            raise ValueError(f"asked for {num_devices} devices but only {len(devices)} exist")
        devices = devices[:num_devices]
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over `data`; other dimensions whole."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def check_batch_divisible(global_batch: int, mesh: Mesh, what: str = "batch size") -> None:
    if global_batch % mesh.size:
        raise ValueError(f"{what} {global_batch} is not divisible by the {mesh.size} devices")


def local_batch_size(global_batch: int) -> int:
    """The part of a global batch that this host feeds."""
    if global_batch % jax.process_count():
        raise ValueError(
            f"global batch {global_batch} is not divisible by {jax.process_count()} hosts"
        )
    return global_batch // jax.process_count()


def global_batch(local_batch: Any, mesh: Mesh) -> Any:
    """Assemble each host's local numpy batch into global arrays sharded over `data`."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch
    )


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Place a pytree (parameters, optimizer state) on every device of the mesh."""
    return jax.device_put(tree, replicated(mesh))
