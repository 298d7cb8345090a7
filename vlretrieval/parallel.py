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

from vlretrieval import losses
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


def _shard_map(fn, mesh: Mesh, in_specs, out_specs):
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs)


def sharded_softmax_contrastive_loss(mesh: Mesh):
    """Symmetric InfoNCE over the global batch, each device scoring its local rows.

    Each device gathers every device's embeddings (the columns) and computes the loss of its own
    b rows only: memory O(b x B) per device instead of O(B x B). The gradient of `all_gather` is
    a reduce-scatter, so every device's embeddings receive the gradient from every device's rows.
    Takes (image_embeddings, text_embeddings) sharded over `data` and a replicated scale.
    """

    def local(image_rows, text_rows, logit_scale):
        rows = image_rows.shape[0]
        all_images = jax.lax.all_gather(image_rows, DATA_AXIS, tiled=True)
        all_texts = jax.lax.all_gather(text_rows, DATA_AXIS, tiled=True)
        first = jax.lax.axis_index(DATA_AXIS) * rows
        local_sum = losses.contrastive_rows_loss(image_rows, all_texts, logit_scale, first)
        local_sum += losses.contrastive_rows_loss(text_rows, all_images, logit_scale, first)
        return jax.lax.psum(local_sum, DATA_AXIS) / (2 * all_images.shape[0])

    spec = PartitionSpec(DATA_AXIS)
    return _shard_map(local, mesh, (spec, spec, PartitionSpec()), PartitionSpec())


def sharded_sigmoid_loss(mesh: Mesh):
    """SigLIP over the global batch with texts passed round a ring of `ppermute`s.

    At each of the n ring steps a device scores its b images against the b texts it holds, then
    hands them to its neighbour; each block is rematerialised in the backward pass, so memory is
    O(b x b) per device whatever the device count. Takes embeddings sharded over `data` and a
    replicated scale and bias.
    """
    devices = mesh.shape[DATA_AXIS]
    # Device i sends to i + 1, so at ring step k device i holds the texts of device i - k.
    ring = [(source, (source + 1) % devices) for source in range(devices)]
    block = jax.checkpoint(losses.sigmoid_block_loss, static_argnums=(4,))

    def local(image_rows, text_rows, logit_scale, logit_bias):
        total = block(image_rows, text_rows, logit_scale, logit_bias, True)
        texts = text_rows
        for _ in range(devices - 1):
            texts = jax.lax.ppermute(texts, DATA_AXIS, ring)
            total += block(image_rows, texts, logit_scale, logit_bias, False)
        return jax.lax.psum(total, DATA_AXIS) / (image_rows.shape[0] * devices)

    spec = PartitionSpec(DATA_AXIS)
    return _shard_map(local, mesh, (spec, spec, PartitionSpec(), PartitionSpec()), PartitionSpec())
