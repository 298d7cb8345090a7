"""Contrastive losses as pure functions of embeddings: no collectives, no mesh axes.

`parallel.py` wraps these for cross-device use; here every function sees whole arrays.
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


def softmax_contrastive_loss(
    image_embeddings: jax.Array, text_embeddings: jax.Array, logit_scale: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Symmetric InfoNCE (CLIP): row i's positive is column i, in both directions.

    Returns the mean of the image->text and text->image cross-entropies and metrics.
    """
    logits = similarity_logits(image_embeddings, text_embeddings, logit_scale)
    labels = jnp.arange(logits.shape[0])
    image_to_text = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    text_to_image = optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean()
    loss = (image_to_text + text_to_image) / 2
    metrics = {
        "loss": loss,
        "image_to_text_accuracy": (jnp.argmax(logits, axis=1) == labels).mean(),
        "text_to_image_accuracy": (jnp.argmax(logits, axis=0) == labels).mean(),
        "logit_scale": logit_scale,
    }
    return loss, metrics
