"""Retrieval losses as pure functions of embeddings and logits: no collectives, no mesh axes.

`parallel/cross_device.py` wraps these for cross-device use; here every function sees whole arrays. Rows are
queries (images), columns keys (texts); row r's positive is column `first_positive + r`, which is
how a device scores its local rows against the gathered global columns. Composed hard negatives
(one per example, see `negatives.py`) are extra columns for every row.
"""

from __future__ import annotations

import typing

import jax
import jax.numpy as jnp
import optax

from vlretrieval import late_interaction

# The label-supervised (IDCMR) terms' full-batch losses (label_losses.py) and the teacher and
# hashing terms' (structure_losses.py), part of this module's `TowerLosses`.
from vlretrieval.label_losses import label_inter_modal_loss, label_intra_modal_loss  # noqa: F401
from vlretrieval.structure_losses import hash_similarity_loss, similarity_distillation_loss  # noqa: F401


def similarity_logits(
    image_embeddings: jax.Array, text_embeddings: jax.Array, logit_scale: jax.Array
) -> jax.Array:
    """[images, texts] scaled cosine similarities (the embeddings are already L2-normalised)."""
    return logit_scale * image_embeddings @ text_embeddings.T


# The logit of a composed negative that does not exist (its caption had no content word to swap):
# low enough to weigh nothing in a softmax and never violate a hinge.
ABSENT_NEGATIVE = -1e4


def row_logits(
    queries: jax.Array,
    keys: jax.Array,
    logit_scale: jax.Array | float,
    first_positive: jax.Array | int,
    extra_keys: jax.Array | None = None,
    extra_valid: jax.Array | None = None,
    positive_margin: jax.Array | float = 0.0,
) -> tuple[jax.Array, jax.Array]:
    """Logits of b query rows against B keys (+ B composed negatives), and the negatives' mask.

    Row r's positive is key `first_positive + r`; an additive margin (LaBSE) lowers its logit to
    scale * (similarity - margin). Every composed negative is a column for every row
    (NegCLIP-style); those not `extra_valid` get ABSENT_NEGATIVE and are not negatives.
    Returns ([b, B(+B)] logits, bool [b, B(+B)]: True where the column is a negative of the row).
    """
    columns = jnp.arange(keys.shape[0])[None, :]
    negative = columns != first_positive + jnp.arange(queries.shape[0])[:, None]
    logits = logit_scale * (queries @ keys.T - jnp.where(negative, 0.0, positive_margin))
    if extra_keys is None:
        return logits, negative
    extra = logit_scale * queries @ extra_keys.T
    valid = jnp.ones(extra_keys.shape[0], bool) if extra_valid is None else extra_valid.astype(bool)
    extra = jnp.where(valid[None, :], extra, ABSENT_NEGATIVE)
    extra_negative = jnp.broadcast_to(valid[None, :], extra.shape)
    return jnp.concatenate([logits, extra], axis=1), jnp.concatenate([negative, extra_negative], 1)


def _positive_logits(logits: jax.Array, first_positive: jax.Array | int) -> jax.Array:
    rows = jnp.arange(logits.shape[0])
    return logits[rows, first_positive + rows]


def contrastive_rows_loss(
    queries, keys, logit_scale, first_positive, extra_keys=None, extra_valid=None, positive_margin=0.0
):
    """Sum over the b rows of InfoNCE's cross-entropy against every key (and composed negative)."""
    logits, _ = row_logits(
        queries, keys, logit_scale, first_positive, extra_keys, extra_valid, positive_margin
    )
    return jnp.sum(jax.nn.logsumexp(logits, axis=1) - _positive_logits(logits, first_positive))


def correct_rows(queries, keys, logit_scale, first_positive, extra_keys=None, extra_valid=None):
    """How many rows score their positive strictly above every negative (top-1 accuracy count)."""
    logits, negative = row_logits(queries, keys, logit_scale, first_positive, extra_keys, extra_valid)
    best_negative = jnp.where(negative, logits, -jnp.inf).max(axis=1)
    return jnp.sum(_positive_logits(logits, first_positive) > best_negative)


def reweighted_rows_loss(
    queries, keys, logit_scale, beta, first_positive, extra_keys=None, extra_valid=None
):
    """Sum over rows of InfoNCE with negatives importance-weighted by exp(beta * similarity).

    Robinson et al.'s hard-negative sampling: each row's negative weights are normalised to
    average 1 over its negatives, so beta = 0 is plain InfoNCE and a larger beta concentrates the
    loss on the hardest negatives. The weights are a sampling distribution: no gradient.
    """
    logits, negative = row_logits(queries, keys, logit_scale, first_positive, extra_keys, extra_valid)
    log_weights = jax.nn.log_softmax(jnp.where(negative, beta * logits / logit_scale, -jnp.inf), axis=1)
    log_weights += jnp.log(negative.sum(axis=1, keepdims=True))
    reweighted = jnp.where(negative, logits + jax.lax.stop_gradient(log_weights), logits)
    return jnp.sum(jax.nn.logsumexp(reweighted, axis=1) - _positive_logits(logits, first_positive))


def hinge_rows_loss(
    queries, keys, margin, first_positive, top_k=1, extra_keys=None, extra_valid=None
):
    """Sum over rows of the mean hinge against the row's `top_k` hardest negatives.

    top_k = 1 is VSE++'s max-violation triplet loss: max(0, margin + s(negative) - s(positive)).
    """
    similarity, negative = row_logits(queries, keys, 1.0, first_positive, extra_keys, extra_valid)
    positive = _positive_logits(similarity, first_positive)[:, None]
    violation = jnp.where(negative, jnp.maximum(margin + similarity - positive, 0.0), 0.0)
    hardest, _ = jax.lax.top_k(violation, top_k)
    return jnp.sum(hardest.mean(axis=1))


def _both_directions(rows_loss, images, texts, extra_text_negatives, extra_image_negatives,
                     extra_text_valid, *args, **kwargs):
    """Mean over the batch of image->text and text->image `rows_loss`, averaged."""
    image_to_text = rows_loss(
        images, texts, *args, first_positive=0, extra_keys=extra_text_negatives,
        extra_valid=extra_text_valid, **kwargs,
    )
    text_to_image = rows_loss(
        texts, images, *args, first_positive=0, extra_keys=extra_image_negatives, **kwargs
    )
    return (image_to_text + text_to_image) / (2 * images.shape[0])


@typing.runtime_checkable
class TowerLosses(typing.Protocol):
    """The tower losses an objective term may call, whatever the batch's layout.

    Two implementations: this module (the whole batch in one array; the functions below) and
    `parallel.CrossDeviceLosses` (the batch sharded over devices, negatives from all of them). They
    must give the same values and gradients (tests/test_parallel_losses.py).
    """

    def softmax_contrastive_loss(
        self, image_embeddings, text_embeddings, logit_scale, extra_text_negatives=None,
        extra_image_negatives=None, extra_text_valid=None, positive_margin=0.0,
    ) -> tuple[jax.Array, dict[str, jax.Array]]: ...

    def reweighted_contrastive_loss(
        self, image_embeddings, text_embeddings, logit_scale, beta, extra_text_negatives=None,
        extra_image_negatives=None, extra_text_valid=None,
    ) -> jax.Array: ...

    def hardest_negative_hinge_loss(
        self, image_embeddings, text_embeddings, margin, extra_text_negatives=None,
        extra_image_negatives=None, extra_text_valid=None, top_k=1,
    ) -> jax.Array: ...

    def sigmoid_loss(self, image_embeddings, text_embeddings, logit_scale, logit_bias) -> jax.Array: ...

    def late_interaction_hinge_loss(
        self, words, word_mask, regions, region_mask, margin=0.2, aggregation="max_mean", top_k=1,
    ) -> jax.Array: ...

    def similarity_distillation_loss(
        self, image_embeddings, text_embeddings, teacher_image_embeddings, teacher_text_embeddings,
        temperature, image_text=1.0, image_image=1.0, text_text=1.0,
    ) -> jax.Array: ...

    def hash_similarity_loss(
        self, image_codes, text_codes, target_images, target_texts, peer_image_codes=None,
        peer_text_codes=None, refinement=0.0, image_text=1.0, image_image=1.0, text_text=1.0,
    ) -> jax.Array: ...

    def label_intra_modal_loss(self, image_embeddings, text_embeddings, labels, scale) -> jax.Array: ...

    def label_inter_modal_loss(
        self, image_embeddings, text_embeddings, labels, scale, modality_invariance=1.0,
    ) -> jax.Array: ...


# The full-batch `TowerLosses`: every device's embeddings in one array.


def softmax_contrastive_loss(
    image_embeddings: jax.Array,
    text_embeddings: jax.Array,
    logit_scale: jax.Array,
    extra_text_negatives: jax.Array | None = None,
    extra_image_negatives: jax.Array | None = None,
    extra_text_valid: jax.Array | None = None,
    positive_margin: jax.Array | float = 0.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Symmetric InfoNCE (CLIP): the mean of image->text and text->image cross-entropies.

    The same function serves text-text pairs (MURAL's translation task, with LaBSE's additive
    `positive_margin`): pass the two sides.
    """
    extras = (extra_text_negatives, extra_image_negatives, extra_text_valid)
    loss = _both_directions(contrastive_rows_loss, image_embeddings, text_embeddings, *extras,
                            logit_scale, positive_margin=positive_margin)
    batch = image_embeddings.shape[0]
    metrics = {
        "image_to_text_accuracy": correct_rows(
            image_embeddings, text_embeddings, logit_scale, 0, extra_text_negatives, extra_text_valid
        ) / batch,
        "text_to_image_accuracy": correct_rows(
            text_embeddings, image_embeddings, logit_scale, 0, extra_image_negatives
        ) / batch,
    }
    return loss, metrics


def reweighted_contrastive_loss(
    image_embeddings, text_embeddings, logit_scale, beta: float,
    extra_text_negatives=None, extra_image_negatives=None, extra_text_valid=None,
) -> jax.Array:
    """InfoNCE with hard negatives up-weighted by `beta` (see `reweighted_rows_loss`)."""
    extras = (extra_text_negatives, extra_image_negatives, extra_text_valid)
    return _both_directions(reweighted_rows_loss, image_embeddings, text_embeddings, *extras,
                            logit_scale, beta)


def hardest_negative_hinge_loss(
    image_embeddings, text_embeddings, margin: float,
    extra_text_negatives=None, extra_image_negatives=None, extra_text_valid=None, top_k: int = 1,
) -> jax.Array:
    """VSE++ hinge against each row's `top_k` hardest negatives of the whole batch."""
    extras = (extra_text_negatives, extra_image_negatives, extra_text_valid)
    return _both_directions(hinge_rows_loss, image_embeddings, text_embeddings, *extras,
                            margin, top_k=top_k)


def sigmoid_loss(
    image_embeddings: jax.Array, text_embeddings: jax.Array, logit_scale: jax.Array, logit_bias: jax.Array
) -> jax.Array:
    """SigLIP: independent binary decisions for every (image, text) pair, normalised per image.

    Written as the paper states it (labels +1 on the diagonal, -1 elsewhere): the reference the
    rings' blocked form (`parallel/ring.py`) is tested against."""
    logits = logit_scale * image_embeddings @ text_embeddings.T + logit_bias
    labels = 2.0 * jnp.eye(*logits.shape, dtype=logits.dtype) - 1.0
    return -jnp.sum(jax.nn.log_sigmoid(labels * logits)) / image_embeddings.shape[0]


def matching_loss(itm_logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Image-text matching: 2-way cross-entropy (1 = the pair matches); returns (loss, accuracy)."""
    loss = optax.softmax_cross_entropy_with_integer_labels(itm_logits, labels).mean()
    return loss, (jnp.argmax(itm_logits, axis=-1) == labels).mean()


def masked_language_model_loss(
    mlm_logits: jax.Array, target_ids: jax.Array, masked: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Cross-entropy over the masked positions only; returns (loss, accuracy on them)."""
    weights = masked.astype(jnp.float32)
    count = jnp.maximum(weights.sum(), 1.0)
    per_token = optax.softmax_cross_entropy_with_integer_labels(mlm_logits, target_ids)
    accuracy = ((jnp.argmax(mlm_logits, axis=-1) == target_ids) * weights).sum() / count
    return (per_token * weights).sum() / count, accuracy


def late_interaction_hinge_loss(words, word_mask, regions, region_mask, margin=0.2, aggregation="max_mean",
                                top_k=1) -> jax.Array:
    """TERAN: the hardest-negative hinge over word-region late-interaction scores (both ways)."""
    return late_interaction.late_interaction_hinge(words, word_mask, regions, region_mask, margin,
                                                   aggregation, top_k)


def masked_region_feature_loss(
    predicted: jax.Array, features: jax.Array, masked: jax.Array
) -> jax.Array:
    """MRFR (UNITER): the mean over masked regions of the squared error between the regressed and
    the original feature, averaged over the feature's dimensions; 0 when nothing is masked."""
    weights = masked.astype(jnp.float32)
    squared = jnp.mean(jnp.square(predicted.astype(jnp.float32) - features.astype(jnp.float32)), axis=-1)
    return (squared * weights).sum() / jnp.maximum(weights.sum(), 1.0)


def masked_region_class_loss(
    logits: jax.Array, labels: jax.Array, masked: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """MOC (Unicoder-VL): cross-entropy of the masked regions' class logits against the detector's
    labels, over masked regions that have a label (label >= 0); returns (loss, accuracy)."""
    weights = (masked & (labels >= 0)).astype(jnp.float32)
    count = jnp.maximum(weights.sum(), 1.0)
    safe = jnp.maximum(labels, 0)
    per_region = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), safe)
    accuracy = ((jnp.argmax(logits, axis=-1) == safe) * weights).sum() / count
    return (per_region * weights).sum() / count, accuracy


def topic_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """TextTopicNet: the mean over the batch of the soft cross-entropy -sum_k t_k log softmax(z)_k
    between predicted topic logits z and target distributions t (rows summing to 1), in float32."""
    return jnp.mean(optax.softmax_cross_entropy(logits.astype(jnp.float32), targets.astype(jnp.float32)))
