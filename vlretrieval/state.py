"""The train state and the optimizer: what a checkpoint holds and how it is stepped.

Here rather than in the trainer so that conversion and evaluation, which build or restore a state,
do not import the training loop.
"""

from __future__ import annotations

import re
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from vlretrieval.errors import UserError
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


def parameter_path(path) -> str:
    """A parameter's name as fine-tuning patterns match it: "text_transformer/block_0/mlp/kernel"."""
    return "/".join(str(getattr(key, "key", getattr(key, "idx", key))) for key in path)


def _matching(params: Any, pattern: str) -> list[str]:
    return [parameter_path(path) for path, _ in jax.tree_util.tree_leaves_with_path(params)
            if re.fullmatch(pattern, parameter_path(path))]


def check_fine_tuning(config: ml_collections.ConfigDict, params: Any) -> None:
    """Every `optimizer.freeze` / `optimizer.lr_mults` pattern names some parameter: a misspelt
    pattern must not silently train what it meant to freeze."""
    patterns = [("optimizer.freeze", pattern) for pattern in config.get("freeze", ())]
    patterns += [("optimizer.lr_mults", pattern) for pattern, _ in config.get("lr_mults", ())]
    for key, pattern in patterns:
        try:
            matched = _matching(params, pattern)
        except re.error as error:
            raise UserError(f"config.{key}: {pattern!r} is not a regular expression ({error})") from None
        if not matched:
            leaves = jax.tree_util.tree_leaves_with_path(params)
            tops = sorted({parameter_path(path).split("/")[0] for path, _ in leaves})
            raise UserError(
                f"config.{key}: {pattern!r} matches no parameter (patterns match whole paths such as "
                f"'text_transformer/.*'; the top-level names are {', '.join(tops)})"
            )


def _multiplier(path: str, lr_mults) -> float:
    """The first matching pattern's learning-rate multiplier (big_vision's lr_mults), else 1."""
    return next((float(mult) for pattern, mult in lr_mults if re.fullmatch(pattern, path)), 1.0)


def _scale_by_multipliers(lr_mults) -> optax.GradientTransformation:
    """Each parameter's update times its multiplier: its learning rate and its weight decay (both
    are in AdamW's update) scale together."""

    def update(updates, state, params=None):
        scaled = jax.tree_util.tree_map_with_path(
            lambda path, update: update * _multiplier(parameter_path(path), lr_mults), updates
        )
        return scaled, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(config: ml_collections.ConfigDict, num_steps: int, frozen: tuple[str, ...] = ()):
    """AdamW with linear warm-up, cosine decay and global-norm clipping; returns (tx, schedule).

    Fine-tuning: parameters whose path matches an `optimizer.freeze` pattern get no update, no
    weight decay and no optimizer state, and their gradients count in no norm (open_clip's
    --lock-image / --lock-text); `optimizer.lr_mults` scales the rest by the first matching
    pattern's multiplier (big_vision's lr_mults). `frozen` adds patterns the run itself freezes
    (a distillation teacher: `distillation.FROZEN`). Without any, the plain chain, whose state
    every earlier checkpoint holds."""
    warmup = min(config.warmup_steps, max(num_steps - 1, 0))
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.learning_rate,
        warmup_steps=warmup,
        decay_steps=max(num_steps, warmup + 1),
        end_value=config.learning_rate * config.end_learning_rate_fraction,
    )
    transforms = [
        optax.clip_by_global_norm(config.gradient_clip_norm),
        optax.adamw(schedule, b2=config.b2, weight_decay=config.weight_decay, mask=weight_decay_mask),
    ]
    lr_mults, freeze = tuple(config.get("lr_mults", ())), tuple(config.get("freeze", ())) + tuple(frozen)
    if lr_mults:
        transforms.append(_scale_by_multipliers(lr_mults))
    tx = optax.chain(*transforms)
    if freeze:
        def labels(params):
            return jax.tree_util.tree_map_with_path(
                lambda path, _: "frozen" if any(re.fullmatch(p, parameter_path(path)) for p in freeze) else "trained",
                params,
            )

        tx = optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()}, labels)
    return tx, schedule


def create_train_state(model, tx, seed: int) -> TrainState:
    init_rng, dropout_rng = jax.random.split(jax.random.PRNGKey(seed))
    params = init_params(model, init_rng)
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=dropout_rng
    )
