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



def hinge_rows(scores: jax.Array, first_positive: jax.Array | int, margin: float, top_k: int = 1) -> jax.Array:
    """Sum over rows of the mean hinge against each row's `top_k` hardest negatives (VSE++'s
    max-violation loss at top_k = 1), for rows whose positive is column `first_positive + row`."""
    rows = jnp.arange(scores.shape[0])
    negative = jnp.arange(scores.shape[1])[None, :] != (first_positive + rows)[:, None]
    positive = jnp.take_along_axis(scores, (first_positive + rows)[:, None], axis=1)
    violation = jnp.where(negative, jnp.maximum(margin + scores - positive, 0.0), 0.0)
    return jax.lax.top_k(violation, top_k)[0].mean(axis=1).sum()


def late_interaction_hinge(words, word_mask, regions, region_mask, margin: float = 0.2,
                           aggregation: str = "max_mean", top_k: int = 1) -> jax.Array:
    """TERAN's training loss on a whole batch: the hardest-negative hinge both ways over the
    late-interaction scores (text i's positive is image i), averaged over the batch."""
    scores = pair_scores(words, word_mask, regions, region_mask, aggregation)
    both = hinge_rows(scores, 0, margin, top_k) + hinge_rows(scores.T, 0, margin, top_k)
    return both / (2 * scores.shape[0])
