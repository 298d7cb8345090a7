"""The train state and the optimizer: what a checkpoint holds and how it is stepped.

Here rather than in the trainer so that conversion and evaluation, which build or restore a state,
do not import the training loop.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from vlretrieval.models import init_params


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


def weight_decay_mask(params: Any) -> Any:
    """Decay weight matrices only: not norms, biases, embeddings, class tokens or the temperature."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) == "kernel", params
    )


def make_optimizer(config: ml_collections.ConfigDict, num_steps: int):
    """AdamW with linear warm-up, cosine decay and global-norm clipping; returns (tx, schedule)."""
    warmup = min(config.warmup_steps, max(num_steps - 1, 0))
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.learning_rate,
        warmup_steps=warmup,
        decay_steps=max(num_steps, warmup + 1),
        end_value=config.learning_rate * config.end_learning_rate_fraction,
    )
    tx = optax.chain(
        optax.clip_by_global_norm(config.gradient_clip_norm),
        optax.adamw(schedule, b2=config.b2, weight_decay=config.weight_decay, mask=weight_decay_mask),
    )
    return tx, schedule


def create_train_state(model, tx, seed: int) -> TrainState:
    init_rng, dropout_rng = jax.random.split(jax.random.PRNGKey(seed))
    params = init_params(model, init_rng)
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=dropout_rng
    )
