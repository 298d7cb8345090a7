"""Training objectives composed from config: one loss function for every kind of run.

Terms (each with its weight in `config.objectives`; 0 switches it off):
- `contrastive`: symmetric InfoNCE on the towers' embeddings (`contrastive_loss=softmax`), or
  SigLIP's pairwise sigmoid loss with the model's learnable bias (`contrastive_loss=sigmoid`);
- `reweighted_contrastive`: InfoNCE with hard negatives up-weighted by `reweight_beta`;
- `hardest_negative_hinge`: VSE++ hinge against the `hinge_top_k` hardest negatives, `hinge_margin`;
- `image_text_matching`: the joint model's ITM head on positives and on negatives drawn from the
  batch in proportion to their contrastive similarity (ALBEF/VinVL-style hard negatives);
- `masked_language_model`: BERT-style MLM on the text, with the image as context;
- `text_text`: MURAL's translation task: symmetric InfoNCE between the text tower's embeddings of
  sentence pairs (`batch["bitext_*"]`), at `text_text_temperature` (0 = the learned one), with
  LaBSE's additive `text_text_margin`.
Composed bimodal negatives (`composed_text_negatives`, `composed_image_negatives`) are extra
columns of every softmax/hinge tower term.

The tower terms take `tower_losses`: the `losses` module (the whole batch in one array) or a
`parallel.CrossDeviceLosses` (the batch sharded over devices, negatives gathered from all of them);
both have the same functions and give the same numbers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from vlretrieval import losses, negatives
from vlretrieval.errors import UserError

TOWER_TERMS = ("contrastive", "reweighted_contrastive", "hardest_negative_hinge", "text_text")
IMAGE_TEXT_TERMS = ("contrastive", "reweighted_contrastive", "hardest_negative_hinge")
CONTRASTIVE_LOSSES = ("softmax", "sigmoid")
JOINT_TERMS = ("image_text_matching", "masked_language_model")


def mask_tokens(
    rng: jax.Array,
    token_ids: jax.Array,
    text_mask: jax.Array,
    *,
    mask_id: int,
    vocab_size: int,
    probability: float,
    first_ordinary_id: int = 5,
) -> tuple[jax.Array, jax.Array]:
    """BERT masking: of the chosen tokens 80% become [MASK], 10% a random token, 10% stay.

    Never chooses padding, the first token ([CLS]) or the last real one ([SEP]).
    Returns (masked ids, bool [batch, length] of chosen positions).
    """
    choose_rng, action_rng, token_rng = jax.random.split(rng, 3)
    positions = jnp.arange(token_ids.shape[1])[None, :]
    lengths = text_mask.sum(axis=1, keepdims=True)
    maskable = (text_mask == 1) & (positions > 0) & (positions < lengths - 1)
    chosen = maskable & (jax.random.uniform(choose_rng, token_ids.shape) < probability)
    action = jax.random.uniform(action_rng, token_ids.shape)
    random_tokens = jax.random.randint(token_rng, token_ids.shape, first_ordinary_id, vocab_size)
    masked = jnp.where(action < 0.8, mask_id, jnp.where(action < 0.9, random_tokens, token_ids))
    return jnp.where(chosen, masked, token_ids).astype(token_ids.dtype), chosen


def check_objectives(
    config: ml_collections.ConfigDict, model, mask_id: int | None, has_content_words: bool
) -> None:
    """Fail early on combinations that cannot run (a joint term on a model with no joint pass)."""
    weights = {term: config[term] for term in TOWER_TERMS + JOINT_TERMS}
    if not any(weight > 0 for weight in weights.values()):
        raise UserError("every config.objectives weight is 0: nothing to train")
    if config.contrastive_loss not in CONTRASTIVE_LOSSES:
        raise UserError(
            f"config.objectives.contrastive_loss is {config.contrastive_loss!r}; choose one of "
            f"{CONTRASTIVE_LOSSES}"
        )
    if config.contrastive > 0 and config.contrastive_loss == "sigmoid":
        if not model.head.logit_bias:
            raise UserError(
                "config.objectives.contrastive_loss=sigmoid needs a learnable logit bias: set "
                "config.model.head.logit_bias=true"
            )
        if config.composed_text_negatives or config.composed_image_negatives:
            raise UserError(
                "composed negatives are extra softmax columns; with contrastive_loss=sigmoid use "
                "them with the reweighted_contrastive or hardest_negative_hinge terms only"
            )
    if config.text_text < 0 or config.text_text_temperature < 0 or config.text_text_margin < 0:
        raise UserError("config.objectives.text_text, its temperature and margin must not be negative")
    if config.hinge_top_k < 1:
        raise UserError(f"config.objectives.hinge_top_k must be at least 1, not {config.hinge_top_k}")
    if any(config[term] > 0 for term in JOINT_TERMS) and not hasattr(model, "joint_forward"):
        raise UserError(
            "config.objectives.image_text_matching / masked_language_model need the joint model "
            "(config.model.kind=decomposed)"
        )
    if config.masked_language_model > 0 and mask_id is None:
        raise UserError("config.objectives.masked_language_model needs a tokenizer with a mask token")
    if config.composed_text_negatives and not has_content_words:
        raise UserError(
            "config.objectives.composed_text_negatives needs the dataset's content-word lists "
            "(the demo set has them); switch it off for this dataset"
        )


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


def split_loss_rng(rng: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(tower, ITM, MLM) keys of one step: `Objective.loss` and gradient accumulation must agree."""
    tower_rng, itm_rng, mlm_rng = jax.random.split(rng, 3)
    return tower_rng, itm_rng, mlm_rng


def _applier(model, params, dropout_rng):
    def apply(*args, method):
        return model.apply(
            {"params": params}, *args, train=True, rngs={"dropout": dropout_rng}, method=method
        )

    return apply


def make_objective(
    model,
    config: ml_collections.ConfigDict,
    *,
    patch_size: int,
    mask_id: int | None,
    vocab_size: int,
    tower_losses=losses,
) -> Objective:
    """The objectives in `config` for `model`; `tower_losses` decides how the batch is laid out."""
    use_tower_terms = any(config[term] > 0 for term in TOWER_TERMS)
    use_image_text_terms = any(config[term] > 0 for term in IMAGE_TEXT_TERMS)

    def tower_outputs(params, batch, rng):
        dropout_rng, mix_rng = jax.random.split(rng)
        apply = _applier(model, params, dropout_rng)
        outputs = dict(
            apply(batch["images"], batch["token_ids"], batch["text_mask"], method=model.__call__)
        )
        if use_image_text_terms and config.composed_image_negatives:
            # Patches from the next image of the same (micro-)batch replace a fraction of each
            # image's patches: an image that matches its caption only in part.
            mixed, _ = negatives.mix_patches(batch["images"], mix_rng, patch_size, config.image_mix_fraction)
            outputs["extra_image_negatives"] = apply(mixed, method=model.encode_image)
        if use_image_text_terms and config.composed_text_negatives:
            outputs["extra_text_negatives"] = apply(
                batch["negative_token_ids"], batch["negative_text_mask"], method=model.encode_text
            )
        if config.text_text > 0:  # the same text tower encodes both sides of a translation pair
            for side in ("source", "target"):
                outputs[f"bitext_{side}_embeddings"] = apply(
                    batch[f"bitext_{side}_ids"], batch[f"bitext_{side}_mask"],
                    method=model.encode_text,
                )
        return outputs

    def tower_loss(outputs, batch):
        embeddings = (outputs["image_embeddings"], outputs["text_embeddings"])
        logit_scale = outputs["logit_scale"]
        extras = {
            name: outputs[name]
            for name in ("extra_text_negatives", "extra_image_negatives")
            if name in outputs
        }
        if "extra_text_negatives" in extras:
            extras["extra_text_valid"] = batch["negative_valid"]
        metrics: dict[str, Any] = {"logit_scale": logit_scale}
        if "logit_bias" in outputs:
            metrics["logit_bias"] = outputs["logit_bias"]
        total = 0.0
        if config.text_text > 0:
            scale = logit_scale if config.text_text_temperature == 0 else 1.0 / config.text_text_temperature
            term, accuracies = tower_losses.softmax_contrastive_loss(
                outputs["bitext_source_embeddings"], outputs["bitext_target_embeddings"], scale,
                positive_margin=config.text_text_margin,
            )
            metrics.update(
                text_text_loss=term,
                source_to_target_accuracy=accuracies["image_to_text_accuracy"],
                target_to_source_accuracy=accuracies["text_to_image_accuracy"],
            )
            total += config.text_text * term
        if not use_image_text_terms:
            return total, metrics
        if config.contrastive > 0:
            if config.contrastive_loss == "sigmoid":
                term = tower_losses.sigmoid_loss(*embeddings, logit_scale, outputs["logit_bias"])
            else:
                term, accuracies = tower_losses.softmax_contrastive_loss(
                    *embeddings, logit_scale, **extras
                )
                metrics.update(accuracies)
            metrics["contrastive_loss"] = term
            total += config.contrastive * term
        if config.reweighted_contrastive > 0:
            term = tower_losses.reweighted_contrastive_loss(
                *embeddings, logit_scale, config.reweight_beta, **extras
            )
            metrics["reweighted_contrastive_loss"] = term
            total += config.reweighted_contrastive * term
        if config.hardest_negative_hinge > 0:
            term = tower_losses.hardest_negative_hinge_loss(
                *embeddings, config.hinge_margin, top_k=config.hinge_top_k, **extras
            )
            metrics["hardest_negative_hinge_loss"] = term
            total += config.hardest_negative_hinge * term
        return total, metrics

    def loss(params, batch: dict[str, jax.Array], rng: jax.Array):
        tower_rng, itm_rng, mlm_rng = split_loss_rng(rng)
        outputs = tower_outputs(params, batch, tower_rng)
        total, metrics = tower_loss(outputs, batch) if use_tower_terms else (0.0, {})
        metrics["logit_scale"] = outputs["logit_scale"]
        apply = _applier(model, params, jax.random.fold_in(tower_rng, 1))
        images, token_ids, text_mask = batch["images"], batch["token_ids"], batch["text_mask"]

        if config.image_text_matching > 0:
            # Negatives drawn in proportion to softmax(similarity / T): the pairs the towers
            # confuse. T = 0 uses the towers' own learned temperature (ALBEF), which from scratch
            # gives only near-duplicates, too hard for an ITM head that has learned nothing yet.
            logit_scale = outputs["logit_scale"]
            scale = (
                logit_scale
                if config.itm_sampling_temperature == 0
                else 1.0 / config.itm_sampling_temperature
            )
            similarity = jax.lax.stop_gradient(
                losses.similarity_logits(outputs["image_embeddings"], outputs["text_embeddings"], scale)
            )
            text_rng, image_rng = jax.random.split(itm_rng)
            negative_text = negatives.sample_by_similarity(text_rng, similarity)  # per image
            negative_image = negatives.sample_by_similarity(image_rng, similarity.T)  # per text
            pair_ids = jnp.concatenate([token_ids, token_ids[negative_text], token_ids])
            pair_mask = jnp.concatenate([text_mask, text_mask[negative_text], text_mask])
            pair_images = jnp.concatenate([images, images, images[negative_image]])
            batch_size = images.shape[0]
            labels = jnp.concatenate(
                [jnp.ones(batch_size, jnp.int32), jnp.zeros(2 * batch_size, jnp.int32)]
            )
            joint = apply(pair_ids, pair_mask, pair_images, method=model.joint_forward)
            term, accuracy = losses.matching_loss(joint["itm_logits"], labels)
            metrics.update(image_text_matching_loss=term, image_text_matching_accuracy=accuracy)
            total += config.image_text_matching * term

        if config.masked_language_model > 0:
            masked_ids, chosen = mask_tokens(
                mlm_rng, token_ids, text_mask, mask_id=mask_id, vocab_size=vocab_size,
                probability=config.mlm_probability,
            )
            joint = apply(masked_ids, text_mask, images, method=model.joint_forward)
            term, accuracy = losses.masked_language_model_loss(joint["mlm_logits"], token_ids, chosen)
            metrics.update(masked_language_model_loss=term, masked_language_model_accuracy=accuracy)
            total += config.masked_language_model * term

        metrics["loss"] = total
        return total, metrics

    uses_joint_terms = any(config[term] > 0 for term in JOINT_TERMS)
    return Objective(tower_outputs, tower_loss, loss, uses_joint_terms)
