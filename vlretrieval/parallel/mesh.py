"""The mesh and its shardings: every step is `jax.jit` over a `Mesh` with `NamedSharding`s; the
batch is split over the `data` axis of all devices of all hosts; parameters are replicated, or
split over the same axis (FSDP); micro-batches keep every device busy.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vlretrieval.errors import UserError

DATA_AXIS = "data"


def make_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D `data` mesh over the first `num_devices` devices (all devices of all hosts if None)."""
    devices = jax.devices()
    if num_devices is not None:
        if num_devices > len(devices):
            raise UserError(
                f"config.train.num_devices is {num_devices} but only {len(devices)} devices exist"
            )
        devices = devices[:num_devices]
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def local_mesh() -> Mesh:
    """A 1-D `data` mesh over this host's devices only, for work that needs no other host
    (searching a gallery every host holds)."""
    return Mesh(np.asarray(jax.local_devices()), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over `data`; other dimensions whole."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def check_batch_divisible(global_batch: int, mesh: Mesh, what: str = "batch size") -> None:
    if global_batch % mesh.size:
        raise UserError(f"{what} {global_batch} is not divisible by the {mesh.size} devices")


def local_batch_size(global_batch: int) -> int:
    """The part of a global batch that this host feeds."""
    if global_batch % jax.process_count():
        raise UserError(
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


def state_shardings(tree: Any, mesh: Mesh, fsdp: bool) -> Any:
    """Where each array of a train state lives: replicated, or (FSDP) split over `data`.

    With `fsdp`, every array of rank >= 2 (weight matrices, embeddings, their optimizer moments)
    is split along its largest dimension that the device count divides; vectors, scalars and
    arrays with no such dimension stay replicated. `jit` then gathers each weight where it is
    used and reduce-scatters its gradient, so per-device parameter memory falls as 1 / devices.
    """
    devices = mesh.shape[DATA_AXIS]

    def sharding(leaf) -> NamedSharding:
        shape = getattr(leaf, "shape", ())
        if fsdp and len(shape) >= 2:
            divisible = [axis for axis in range(len(shape)) if shape[axis] % devices == 0]
            if divisible:
                axis = max(divisible, key=lambda a: shape[a])
                spec = [None] * len(shape)
                spec[axis] = DATA_AXIS
                return NamedSharding(mesh, PartitionSpec(*spec))
        return replicated(mesh)

    return jax.tree.map(sharding, tree)


def check_accumulation(global_batch_size: int, mesh: Mesh, steps: int) -> None:
    """Each device's rows must split evenly into `steps` micro-batches."""
    if steps < 1:
        raise UserError(f"config.train.accumulation_steps must be at least 1, not {steps}")
    per_device = global_batch_size // mesh.size
    if per_device % steps:
        raise UserError(
            f"config.train.accumulation_steps {steps} does not divide the {per_device} examples "
            f"per device (batch {global_batch_size} over {mesh.size} devices)"
        )


def split_microbatches(tree: Any, steps: int, mesh: Mesh) -> Any:
    """[B, ...] arrays sharded over `data` -> [steps, B / steps, ...], micro-batch m taking the
    m-th slice of every device's rows, so each micro-batch is still spread over all devices and
    the split moves no data between them."""
    devices = mesh.shape[DATA_AXIS]
    sharding = NamedSharding(mesh, PartitionSpec(None, DATA_AXIS))

    def split(x):
        rows = x.shape[0] // (devices * steps)
        x = x.reshape(devices, steps, rows, *x.shape[1:]).swapaxes(0, 1)
        return jax.lax.with_sharding_constraint(x.reshape(steps, devices * rows, *x.shape[3:]), sharding)

    return jax.tree.map(split, tree)


def merge_microbatches(tree: Any, mesh: Mesh) -> Any:
    """The inverse of `split_microbatches`: [steps, B / steps, ...] -> [B, ...] in batch order."""
    devices = mesh.shape[DATA_AXIS]

    def merge(x):
        steps, rows = x.shape[0], x.shape[1] // devices
        x = x.reshape(steps, devices, rows, *x.shape[2:]).swapaxes(0, 1)
        return jax.lax.with_sharding_constraint(
            x.reshape(steps * devices * rows, *x.shape[3:]), batch_sharding(mesh)
        )

    return jax.tree.map(merge, tree)
