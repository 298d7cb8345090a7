"""TERAN's word-region late interaction: an image-sentence score from every word x region cosine.

TERAN keeps the towers separate but does not pool them: the pair score aggregates the cosine
matrix S [words, regions] of one sentence's token states against one image's region states.
- `max_mean` (TERAN's MrSw): each word takes its best region, averaged over the real words;
- `max_sum`: the same, summed over words (longer sentences score higher: TERAN's ablation);
- `symmetric`: the mean of `max_mean` and its mirror (each region's best word, averaged over real
  regions).
Padding words and padding regions never count: a padded position is excluded from every max and
mean. The math is on arrays (no devices named); `pair_scores` gives the [texts, images] matrix a
batch's hinge loss and evaluation need, in one einsum.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

AGGREGATIONS = ("max_mean", "max_sum", "symmetric")


def _normalise(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def _masked_max(similarity: jax.Array, mask: jax.Array, axis: int) -> jax.Array:
    """Max over `axis` where `mask` (broadcast) is set; 0 where nothing is (an all-padding side)."""
    lowest = jnp.finfo(similarity.dtype).min
    best = jnp.where(mask, similarity, lowest).max(axis=axis)
    return jnp.where(mask.any(axis=axis), best, 0.0)


def _masked_mean(values: jax.Array, mask: jax.Array, axis: int = -1) -> jax.Array:
    weights = mask.astype(values.dtype)
    return (values * weights).sum(axis=axis) / jnp.maximum(weights.sum(axis=axis), 1.0)


def pair_scores(words: jax.Array, word_mask: jax.Array, regions: jax.Array, region_mask: jax.Array,
                aggregation: str = "max_mean") -> jax.Array:
    """[texts, images] late-interaction scores of token states `words` [texts, W, d] (real where
    `word_mask` [texts, W]) against region states `regions` [images, R, d] (`region_mask`
    [images, R]); both are L2-normalised here, so S holds cosines."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; choose one of {AGGREGATIONS}")
    words, regions = _normalise(words), _normalise(regions)
    similarity = jnp.einsum("twd,ird->tiwr", words, regions)  # [texts, images, W, R]
    word_real = word_mask.astype(bool)[:, None, :, None]
    region_real = region_mask.astype(bool)[None, :, None, :]
    best_region = _masked_max(similarity, region_real, axis=3)  # [texts, images, W]
    text_side_mask = jnp.broadcast_to(word_mask.astype(bool)[:, None, :], best_region.shape)
    if aggregation == "max_sum":
        return (best_region * text_side_mask).sum(axis=-1)
    text_side = _masked_mean(best_region, text_side_mask)
    if aggregation == "max_mean":
        return text_side
    best_word = _masked_max(similarity, word_real, axis=2)  # [texts, images, R]
    region_side_mask = jnp.broadcast_to(region_mask.astype(bool)[None, :, :], best_word.shape)
    return 0.5 * (text_side + _masked_mean(best_word, region_side_mask))

