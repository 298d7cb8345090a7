"""Gradient accumulation that equals the large batch: cached embeddings, recomputed micro-batches.

Summing micro-batch gradients of a contrastive loss is not the large batch's gradient: each
micro-batch would only see its own negatives. Instead (GradCache, Gao et al. 2021):
1. embed every micro-batch without gradients and keep only the embeddings;
2. evaluate the tower loss on the whole batch of cached embeddings and take its gradient with
   respect to the embeddings (cheap: no encoder);
3. re-run each micro-batch's encoders with gradients and pull its slice of the embedding gradient
   back to the parameters (a VJP), summing over micro-batches.
Activation memory is one micro-batch's; the loss, gradients and negatives are the whole batch's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


def _is_per_example(leaf) -> bool:
    """Stacked outputs are [steps, rows, ...] per example, or [steps] for the shared scalars."""
    return jnp.ndim(leaf) >= 2


def accumulated_value_and_grad(
    objective,
    params: Any,
    batch: dict[str, jax.Array],
    rng: jax.Array,
    steps: int,
    split: Callable[[Any], Any],
    merge: Callable[[Any], Any],
):
    """((loss, metrics), gradients) of `objective.tower_loss` over `batch` in `steps` micro-batches.

    `split` turns [B, ...] arrays into [steps, B / steps, ...] and `merge` undoes it (see
    `parallel.split_microbatches`). Micro-batch m's dropout and augmentation draw from
    `fold_in(rng, m)`; the same key in both passes, so the recomputation is the cached pass.
    """
    micro_batches = split(batch)
    rngs = jax.vmap(lambda m: jax.random.fold_in(rng, m))(jnp.arange(steps))

    def embed(arguments):
        micro_batch, micro_rng = arguments
        return objective.tower_outputs(params, micro_batch, micro_rng)

    stacked = jax.lax.map(embed, (micro_batches, rngs))
    # Per-example outputs become whole-batch arrays; the scalars (logit scale and bias, the same
    # in every micro-batch) are taken from the first.
    outputs = jax.tree.map(lambda x: merge(x) if _is_per_example(x) else x[0], stacked)
    (loss, metrics), output_grads = jax.value_and_grad(objective.tower_loss, has_aux=True)(
        outputs, batch
    )
    # Each micro-batch gets its rows of the embedding gradient; the scalars' gradient is pulled
    # back once, through the first micro-batch.
    stacked_grads = jax.tree.map(
        lambda g, x: split(g) if _is_per_example(x) else jnp.zeros_like(x).at[0].set(g),
        output_grads,
        stacked,
    )

    def backpropagate(gradients, arguments):
        micro_batch, micro_rng, micro_output_grads = arguments
        _, pull_back = jax.vjp(lambda p: objective.tower_outputs(p, micro_batch, micro_rng), params)
        return jax.tree.map(jnp.add, gradients, pull_back(micro_output_grads)[0]), None

    gradients, _ = jax.lax.scan(
        backpropagate, jax.tree.map(jnp.zeros_like, params), (micro_batches, rngs, stacked_grads)
    )
    return (loss, dict(metrics, loss=loss)), gradients
