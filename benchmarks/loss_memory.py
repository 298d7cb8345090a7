"""Per-device temporary memory of loss + gradient for the cross-device losses, from XLA.

  python benchmarks/loss_memory.py [--global_batch 4096 16384] [--dim 512]

Fakes 8 CPU devices, compiles value_and_grad of each loss of `parallel.CrossDeviceLosses` on 1, 2,
4 and 8 of them, and reads `temp_size_in_bytes` from the compiled program's memory analysis (the
SPMD program is per device; nothing is allocated). Prints one JSON object per (loss, batch,
devices) and a Markdown table with the ratio to the 1-device figure.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import json  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vlretrieval import (
    arguments,  # noqa: E402
    parallel,  # noqa: E402
)


def temporary_bytes(loss_fn, mesh, global_batch: int, dim: int, scalars: int) -> int:
    sharding = parallel.batch_sharding(mesh)
    replicated = parallel.replicated(mesh)
    embeddings = jax.ShapeDtypeStruct((global_batch, dim), jnp.float32, sharding=sharding)
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=replicated)
    inputs = (embeddings, embeddings) + (scalar,) * scalars
    grad_fn = jax.jit(jax.value_and_grad(loss_fn, argnums=tuple(range(len(inputs)))))
    compiled = grad_fn.lower(*inputs).compile()
    return int(compiled.memory_analysis().temp_size_in_bytes)


def late_interaction_bytes(mesh, global_batch: int, words: int, regions: int, dim: int) -> int:
    """The same for TERAN's hinge over late-interaction scores: [B, words, dim] token states and
    [B, regions, dim] region states with their masks, O(b x B x words x regions) per device."""
    sharding = parallel.batch_sharding(mesh)
    shape = lambda *dims: jax.ShapeDtypeStruct(dims, jnp.float32, sharding=sharding)
    inputs = (shape(global_batch, words, dim), shape(global_batch, words),
              shape(global_batch, regions, dim), shape(global_batch, regions))
    loss = parallel.CrossDeviceLosses(mesh).late_interaction_hinge_loss
    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 2))).lower(*inputs).compile()
    return int(compiled.memory_analysis().temp_size_in_bytes)


def main() -> None:
    parser = arguments.OneLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("--global_batch", type=arguments.positive_int, nargs="*", default=[4096])
    parser.add_argument("--dim", type=arguments.positive_int, default=512)
    parser.add_argument("--late_interaction_batch", type=arguments.positive_int, nargs="*", default=[],
                        help="also TERAN's late-interaction hinge at these global batches (32 words, 37 "
                             "regions, 128-d states)")
    args = parser.parse_args()
    variants = {
        "softmax": (lambda losses: lambda i, t, s: losses.softmax_contrastive_loss(i, t, s)[0], 1),
        "sigmoid": (lambda losses: losses.sigmoid_loss, 2),
        # Hard-negative terms gather the global columns (O(b x B)); no target, shown for scale.
        "reweighted_gathered": (
            lambda losses: lambda i, t, s: losses.reweighted_contrastive_loss(i, t, s, 1.0), 1),
        "hinge_gathered": (
            lambda losses: lambda i, t, s: losses.hardest_negative_hinge_loss(i, t, s), 1),
    }
    rows = []
    for global_batch in args.global_batch:
        for name, (make_loss, scalars) in variants.items():
            if global_batch != args.global_batch[0] and name not in ("softmax", "sigmoid"):
                continue  # the gathered terms at the first batch size only: they are O(b x B)
            for devices in (1, 2, 4, 8):
                mesh = parallel.make_mesh(devices)
                loss = make_loss(parallel.CrossDeviceLosses(mesh))
                size = temporary_bytes(loss, mesh, global_batch, args.dim, scalars)
                rows.append({"loss": name, "devices": devices, "global_batch": global_batch,
                             "dim": args.dim, "temp_bytes_per_device": size})
                print(json.dumps(rows[-1]), flush=True)
    for global_batch in args.late_interaction_batch:
        for devices in (1, 2, 4, 8):
            size = late_interaction_bytes(parallel.make_mesh(devices), global_batch, 32, 37, 128)
            rows.append({"loss": "late_interaction_hinge", "devices": devices, "global_batch": global_batch,
                         "dim": 128, "words": 32, "regions": 37, "temp_bytes_per_device": size})
            print(json.dumps(rows[-1]), flush=True)
    print("\n| loss | global batch | devices | temp MiB per device | vs 1 device |")
    print("|---|---|---|---|---|")
    for row in rows:
        one = next(r for r in rows if r["loss"] == row["loss"] and r["devices"] == 1
                   and r["global_batch"] == row["global_batch"])
        print(f"| {row['loss']} | {row['global_batch']} | {row['devices']} | "
              f"{row['temp_bytes_per_device'] / 2**20:.1f} | "
              f"{row['temp_bytes_per_device'] / one['temp_bytes_per_device']:.4f} |")


if __name__ == "__main__":
    arguments.run(main)
