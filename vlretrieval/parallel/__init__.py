"""Devices, meshes and shardings: the only package that names a mesh axis.

`mesh.py`: the mesh, batch and parameter shardings, micro-batch layout. `ring.py`: the softmax and
sigmoid losses as rings of `ppermute`s with their block math. `cross_device.py`: the tower losses
over a sharded batch (the rings, and gathered columns for the hard-negative terms).
`hosts.py`: multi-host start-up and cross-host collectives.
"""

from vlretrieval.parallel.cross_device import CrossDeviceLosses
from vlretrieval.parallel.mesh import (
    DATA_AXIS,
    batch_sharding,
    check_accumulation,
    check_batch_divisible,
    global_batch,
    local_batch_size,
    local_mesh,
    make_mesh,
    merge_microbatches,
    replicate,
    replicated,
    split_microbatches,
    state_shardings,
)

__all__ = [
    "CrossDeviceLosses",
    "DATA_AXIS",
    "make_mesh",
    "local_mesh",
    "batch_sharding",
    "replicated",
    "check_batch_divisible",
    "local_batch_size",
    "global_batch",
    "replicate",
    "state_shardings",
    "check_accumulation",
    "split_microbatches",
    "merge_microbatches",
]
