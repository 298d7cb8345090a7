"""The objective of a config, built from the table of terms (`terms.TERMS`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import ml_collections

from vlretrieval import losses, negatives
from vlretrieval.objectives.terms import TERMS, Term, TermInputs

JOINT_TERM_NAMES = tuple(term.name for term in TERMS if term.uses == "joint")


@dataclasses.dataclass(frozen=True)
class Objective:
    """The config's objectives, in the pieces that gradient accumulation needs separately.

    - `tower_outputs(params, batch, rng)`: the towers' differentiable outputs for a batch
      (embeddings, composed negatives' embeddings, logit scale and bias);
    - `tower_loss(outputs, batch)`: the weighted tower terms on those outputs -> (loss, metrics);
    - `loss(params, batch, rng)`: the whole objective, joint terms included -> (loss, metrics).
    """

    tower_outputs: Callable
    tower_loss: Callable
    loss: Callable
    uses_joint_terms: bool


def split_loss_rng(rng: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(tower key, {joint term: its key}) of one step: `Objective.loss` and gradient accumulation
    must agree. A new joint term takes the next key, so adding one changes the others' streams."""
    tower_rng, *joint_rngs = jax.random.split(rng, 1 + len(JOINT_TERM_NAMES))
    return tower_rng, dict(zip(JOINT_TERM_NAMES, joint_rngs))


def _applier(model, params, dropout_rng):
    def apply(*args, method, **options):
        return model.apply(
            {"params": params}, *args, train=True, rngs={"dropout": dropout_rng}, method=method, **options
        )

    return apply


def make_objective(
    model,
    config: ml_collections.ConfigDict,
    *,
    patch_size: int,
    mask_id: int | None,
    vocab_size: int,
    tower_losses: losses.TowerLosses = losses,
    terms: tuple[Term, ...] = TERMS,
) -> Objective:
    """The objectives in `config` for `model`; `tower_losses` decides how the batch is laid out,
    `terms` is the table the config's weights are read against."""
    active = [term for term in terms if config[term.name] > 0]
    tower_terms = [term for term in active if term.uses == "towers"]
    joint_terms = [term for term in active if term.uses == "joint"]
    needs = {need for term in active for need in term.needs}

    def tower_outputs(params, batch, rng):
        dropout_rng, mix_rng = jax.random.split(rng)
        apply = _applier(model, params, dropout_rng)
        outputs = dict(apply(batch["images"], batch["token_ids"], batch["text_mask"],
                             sequences="sequences" in needs, method=model.__call__))
        if "composed_negatives" in needs and config.composed_image_negatives:
            # Patches from the next image of the same (micro-)batch replace a fraction of each
            # image's patches: an image that matches its caption only in part.
            mixed, _ = negatives.mix_patches(batch["images"], mix_rng, patch_size, config.image_mix_fraction)
            outputs["extra_image_negatives"] = apply(mixed, method=model.encode_image)
        if "composed_negatives" in needs and config.composed_text_negatives:
            outputs["extra_text_negatives"] = apply(
                batch["negative_token_ids"], batch["negative_text_mask"], method=model.encode_text
            )
        if "bitext" in needs:  # the same text tower encodes both sides of a translation pair
            for side in ("source", "target"):
                outputs[f"bitext_{side}_embeddings"] = apply(
                    batch[f"bitext_{side}_ids"], batch[f"bitext_{side}_mask"],
                    method=model.encode_text,
                )
        return outputs

    def add_terms(terms, inputs_of, total, metrics: dict[str, Any]):
        for term in terms:
            value, extra = term.loss(inputs_of(term))
            metrics.update(extra)
            metrics[f"{term.name}_loss"] = value
            total += config[term.name] * value
        return total, metrics

    def tower_loss(outputs, batch):
        metrics: dict[str, Any] = {"logit_scale": outputs["logit_scale"]}
        if "logit_bias" in outputs:
            metrics["logit_bias"] = outputs["logit_bias"]
        inputs = TermInputs(config, outputs, batch, tower_losses)
        return add_terms(tower_terms, lambda term: inputs, 0.0, metrics)

    def loss(params, batch: dict[str, jax.Array], rng: jax.Array):
        tower_rng, joint_rngs = split_loss_rng(rng)
        outputs = tower_outputs(params, batch, tower_rng)
        total, metrics = tower_loss(outputs, batch) if tower_terms else (0.0, {})
        metrics["logit_scale"] = outputs["logit_scale"]
        apply = _applier(model, params, jax.random.fold_in(tower_rng, 1))

        def joint_inputs(term):
            return TermInputs(config, outputs, batch, tower_losses, model=model, joint=apply,
                              rng=joint_rngs[term.name], mask_id=mask_id, vocab_size=vocab_size)

        total, metrics = add_terms(joint_terms, joint_inputs, total, metrics)
        metrics["loss"] = total
        return total, metrics

    return Objective(tower_outputs, tower_loss, loss, uses_joint_terms=bool(joint_terms))
