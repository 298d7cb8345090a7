"""Retrieval losses as pure functions of embeddings and logits: no collectives, no mesh axes.

`parallel.py` wraps these for cross-device use; here every function sees whole arrays. Rows are
images, columns texts; row i's positive is column i. Composed hard negatives (one per example,
see `negatives.py`) enter as one extra column per row: `extra_text_negatives[i]` is a negative
for image i, `extra_image_negatives[j]` one for text j.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def similarity_logits(
    image_embeddings: jax.Array, text_embeddings: jax.Array, logit_scale: jax.Array
) -> jax.Array:
    """[images, texts] scaled cosine similarities (the embeddings are already L2-normalised)."""
    return logit_scale * image_embeddings @ text_embeddings.T


# The logit of a composed negative that does not exist (its caption had no content word to swap):
# low enough to weigh nothing in a softmax and never violate a hinge.
ABSENT_NEGATIVE = -1e4


def _with_extra_column(logits, queries, extra, scale, valid=None):
    """Appends each row's own composed negative as one more column (absent where not `valid`)."""
    if extra is None:
        return logits
    column = scale * jnp.sum(queries * extra, axis=-1)
    if valid is not None:
        column = jnp.where(valid.astype(bool), column, ABSENT_NEGATIVE)
    return jnp.concatenate([logits, column[:, None]], axis=1)


def directional_logits(
    image_embeddings: jax.Array,
    text_embeddings: jax.Array,
    logit_scale: jax.Array,
    extra_text_negatives: jax.Array | None = None,
    extra_image_negatives: jax.Array | None = None,
    extra_text_valid: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """(image->text [B, B(+1)], text->image [B, B(+1)]) logits; positives on the diagonal."""
    logits = similarity_logits(image_embeddings, text_embeddings, logit_scale)
    image_to_text = _with_extra_column(
        logits, image_embeddings, extra_text_negatives, logit_scale, extra_text_valid
    )
    text_to_image = _with_extra_column(logits.T, text_embeddings, extra_image_negatives, logit_scale)
    return image_to_text, text_to_image


def _cross_entropy_diagonal(logits: jax.Array) -> jax.Array:
    labels = jnp.arange(logits.shape[0])
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def softmax_contrastive_loss(
    image_embeddings: jax.Array,
    text_embeddings: jax.Array,
    logit_scale: jax.Array,
    extra_text_negatives: jax.Array | None = None,
    extra_image_negatives: jax.Array | None = None,
    extra_text_valid: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Symmetric InfoNCE (CLIP): the mean of image->text and text->image cross-entropies."""
    image_to_text, text_to_image = directional_logits(
        image_embeddings,
        text_embeddings,
        logit_scale,
        extra_text_negatives,
        extra_image_negatives,
        extra_text_valid,
    )
    loss = (_cross_entropy_diagonal(image_to_text) + _cross_entropy_diagonal(text_to_image)) / 2
    labels = jnp.arange(image_to_text.shape[0])
    metrics = {
        "image_to_text_accuracy": (jnp.argmax(image_to_text, axis=1) == labels).mean(),
        "text_to_image_accuracy": (jnp.argmax(text_to_image, axis=1) == labels).mean(),
        "logit_scale": logit_scale,
    }
    return loss, metrics


def _off_diagonal(logits: jax.Array) -> jax.Array:
    """True where a column is a negative for the row (everything but the diagonal)."""
    rows, columns = logits.shape
    return jnp.arange(columns)[None, :] != jnp.arange(rows)[:, None]


def reweighted_contrastive_loss(
    image_embeddings: jax.Array,
    text_embeddings: jax.Array,
    logit_scale: jax.Array,
    beta: float,
    extra_text_negatives: jax.Array | None = None,
    extra_image_negatives: jax.Array | None = None,
    extra_text_valid: jax.Array | None = None,
) -> jax.Array:
    """InfoNCE whose negatives are importance-weighted by exp(beta * similarity) (Robinson et al.).

    Each row's negative weights are normalised to average 1, so beta = 0 is plain InfoNCE and a
    larger beta concentrates the loss on the hardest negatives. The weights are treated as a
    sampling distribution (no gradient flows through them).
    """

    def one_direction(logits):
        negative = _off_diagonal(logits)
        similarity = logits / logit_scale
        log_weights = jax.nn.log_softmax(jnp.where(negative, beta * similarity, -jnp.inf), axis=1)
        log_weights = jax.lax.stop_gradient(log_weights + jnp.log(negative.sum(axis=1, keepdims=True)))
        reweighted = jnp.where(negative, logits + log_weights, logits)
        return _cross_entropy_diagonal(reweighted)

    image_to_text, text_to_image = directional_logits(
        image_embeddings,
        text_embeddings,
        logit_scale,
        extra_text_negatives,
        extra_image_negatives,
        extra_text_valid,
    )
    return (one_direction(image_to_text) + one_direction(text_to_image)) / 2


def hardest_negative_hinge_loss(
    image_embeddings: jax.Array,
    text_embeddings: jax.Array,
    margin: float,
    extra_text_negatives: jax.Array | None = None,
    extra_image_negatives: jax.Array | None = None,
    extra_text_valid: jax.Array | None = None,
) -> jax.Array:
    """VSE++ max-violation triplet loss: a hinge against each row's single hardest negative."""

    def one_direction(similarity):
        positive = jnp.diagonal(similarity)[:, None]
        violation = jnp.where(_off_diagonal(similarity), margin + similarity - positive, 0.0)
        return jnp.maximum(violation, 0.0).max(axis=1).mean()

    image_to_text, text_to_image = directional_logits(
        image_embeddings,
        text_embeddings,
        1.0,
        extra_text_negatives,
        extra_image_negatives,
        extra_text_valid,
    )
    return (one_direction(image_to_text) + one_direction(text_to_image)) / 2


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


def contrastive_rows_loss(
    queries: jax.Array, keys: jax.Array, logit_scale: jax.Array, first_positive: jax.Array | int
) -> jax.Array:
    """Sum over rows of the InfoNCE cross-entropy of `queries` [b, d] against `keys` [B, d].

    Row r's positive is key `first_positive + r`. With b = B and offset 0 this is one direction
    of `softmax_contrastive_loss` (times B); `parallel.py` calls it with a device's local rows
    against the gathered global columns.
    """
    logits = logit_scale * queries @ keys.T
    labels = first_positive + jnp.arange(queries.shape[0])
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).sum()


def sigmoid_block_loss(
    image_embeddings: jax.Array,
    text_embeddings: jax.Array,
    logit_scale: jax.Array,
    logit_bias: jax.Array,
    diagonal_is_positive: bool,
) -> jax.Array:
    """Sum of SigLIP's pairwise losses -log sigmoid(z * (scale * sim + bias)) over a block.

    z = +1 on the diagonal when the block pairs each image with its own text, -1 elsewhere.
    """
    logits = logit_scale * image_embeddings @ text_embeddings.T + logit_bias
    labels = -jnp.ones_like(logits)
    if diagonal_is_positive:
        labels = labels + 2 * jnp.eye(logits.shape[0], logits.shape[1], dtype=logits.dtype)
    return -jnp.sum(jax.nn.log_sigmoid(labels * logits))


def sigmoid_loss(
    image_embeddings: jax.Array, text_embeddings: jax.Array, logit_scale: jax.Array, logit_bias: jax.Array
) -> jax.Array:
    """SigLIP: independent binary decisions for every (image, text) pair, normalised per image."""
    total = sigmoid_block_loss(image_embeddings, text_embeddings, logit_scale, logit_bias, True)
    return total / image_embeddings.shape[0]
