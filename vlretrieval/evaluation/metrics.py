"""Retrieval metrics both ways between images and captions, each selectable by name.

Every query and gallery item has an *owner* (the image it belongs to); a gallery item is a
positive for a query iff their owners match. A query's rank is the number of negatives ahead of
its best positive, so text -> image ranks a caption's own image, and image -> text hits at K when
*any* of the image's captions is in the top K (as CLIP_benchmark). Negatives tied with the best
positive count by the tie policy `ties` (config `eval.ties`, one of `TIES`): `index` (the default)
orders ties by gallery index, as CLIP_benchmark's top-k; `pessimistic` counts every tie against the
model (a collapsed model scores ~0); `optimistic` none; `expected` takes the mean over uniformly
random orders of the tied items, its R@K the exact hit probability (`hit_rate`).

Metric names (config `eval.metrics`), every R@K and rank under the tie policy:
- `recall`: R@K (percent) for K in `recall_at`, both ways;
- `rank`: median and mean 1-based rank, both ways;
- `mean_recall`: the mean of every R@K of both directions;
- `paired_recall`: R@K on the 1:1 pairs (each image with its first caption only), both ways;
- `map`, `map_at_r`: mAP and mAP@R (Musgrave et al. 2020) with the owner as the label, both ways
  (any labels through `average_precision`); ties are ordered by gallery index whatever `ties`;
- `hamming`: R@K and mAP on binary codes (the sign of each coordinate) by Hamming distance: integer
  scores, so many ties (R@K under the tie policy, mAP ties by gallery index);
- `label_map`, `label_map_at_r` (`LABEL_METRICS`, they need the images' category labels): mAP and
  mAP@R where relevance is a shared category, image <-> text and image -> image, text -> text
  (`label_metrics.py`; ties by gallery index).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vlretrieval.errors import UserError
from vlretrieval.evaluation import search
from vlretrieval.evaluation.label_metrics import (
    LABEL_METRICS,
    label_metrics,
    mean_precision_in_chunks,
    ranked_precision,
)

DIRECTIONS = ("text_to_image", "image_to_text")
METRICS = ("recall", "rank", "mean_recall", "paired_recall", "map", "map_at_r", "hamming", "ndcg")
# LABEL_METRICS are metric names too; they need the images' category labels (`label_metrics.py`).
DEFAULT_METRICS = ("recall", "rank", "mean_recall")
TIES = search.TIES
DEFAULT_TIES = "index"  # agrees with CLIP_benchmark's top-k


def check_metrics(names: Sequence[str]) -> tuple[str, ...]:
    unknown = [name for name in names if name not in METRICS + LABEL_METRICS]
    if unknown:
        known = METRICS + LABEL_METRICS
        raise UserError(f"unknown metric {unknown[0]!r} in config.eval.metrics; choose from {known}")
    return tuple(names)


def check_ties(name: str) -> str:
    if name not in TIES:
        raise UserError(f"unknown tie policy {name!r} in config.eval.ties; choose from {TIES}")
    return name


def hit_rate(ranks: search.TiedRanks, k: int, ties: str = DEFAULT_TIES) -> np.ndarray:
    """Each query's chance that its rank is < k: 0 or 1, or for `expected` the probability over
    uniformly random orders of its tied items. Its rank is then above + X, X the tied negatives
    ahead of the first of its p tied positives: P(X = x) = C(t + p - 1 - x, p - 1) / C(t + p, p),
    so P(X >= j) (the first j of the t + p tied items all negatives) = prod_{i < j} (t - i) /
    (t + p - i), built one factor per position; a hit iff not X >= k - above, so k factors at most."""
    if ties != "expected":
        return (ranks.ranks(ties) < k).astype(np.float64)
    tied, positives = ranks.tied.astype(np.float64), ranks.tied_positives.astype(np.float64)
    need = k - np.asarray(ranks.above)  # a hit iff X < need
    miss = np.ones(need.shape)  # P(X >= need)
    for i in range(int(need.max(initial=0))):
        factor = np.where(i < tied, (tied - i) / np.maximum(tied + positives - i, 1), 0.0)
        miss *= np.where(i < need, factor, 1.0)
    return np.where(need > 0, 1.0 - miss, 0.0)


def _tied(ranks) -> search.TiedRanks:
    return ranks if isinstance(ranks, search.TiedRanks) else search.TiedRanks.exact(ranks)


def recall_metrics(ranks, recall_at: Sequence[int], ties: str = DEFAULT_TIES) -> dict[str, float]:
    """R@K in percent (the mean hit rate), and the median and mean 1-based rank, under the tie
    policy `ties`; `ranks` are `search.TiedRanks`, or 0-based ranks without ties."""
    ranks = _tied(ranks)
    metrics = {f"R@{k}": float(np.mean(hit_rate(ranks, k, ties)) * 100.0) for k in recall_at}
    policy_ranks = ranks.ranks(ties)
    metrics["median_rank"] = float(np.median(policy_ranks) + 1)
    metrics["mean_rank"] = float(np.mean(policy_ranks) + 1)
    return metrics


def metrics_from_ranks(
    text_to_image_ranks, image_to_text_ranks, recall_at: Sequence[int], ties: str = DEFAULT_TIES
) -> dict[str, Any]:
    """Both directions' recall metrics and their mean recall (the mean of every R@K), from
    `search.TiedRanks` (or 0-based ranks without ties) under the tie policy `ties`."""
    results = {
        "text_to_image": recall_metrics(text_to_image_ranks, recall_at, ties),
        "image_to_text": recall_metrics(image_to_text_ranks, recall_at, ties),
    }
    recalls = [results[d][f"R@{k}"] for d in DIRECTIONS for k in recall_at]
    results["mean_recall"] = float(np.mean(recalls))
    return results


@jax.jit
def _average_precision_chunk(queries, query_labels, gallery, gallery_labels):
    relevant = gallery_labels[None, :] == query_labels[:, None]
    return ranked_precision(queries @ gallery.T, relevant)


def average_precision(
    queries: np.ndarray,
    query_labels: np.ndarray,
    gallery: np.ndarray,
    gallery_labels: np.ndarray,
    max_scores_per_chunk: int = 1 << 24,
) -> tuple[float, float]:
    """(mAP, mAP@R) in percent over the queries that have at least one positive.

    Each query chunk sorts its whole score row on the device: memory O(chunk x gallery), the chunk
    sized so that it holds about `max_scores_per_chunk` scores.
    """
    return mean_precision_in_chunks(
        _average_precision_chunk, [np.asarray(queries, np.float32), np.asarray(query_labels, np.int32)],
        [jnp.asarray(gallery, jnp.float32), jnp.asarray(gallery_labels, jnp.int32)], len(gallery),
        max_scores_per_chunk)


def binary_codes(embeddings: np.ndarray) -> np.ndarray:
    """+-1 codes (a coordinate >= 0 is +1): their inner product is dim - 2 x Hamming distance, so
    ranking by it is ranking by Hamming distance."""
    return np.where(np.asarray(embeddings) >= 0, 1.0, -1.0).astype(np.float32)


def _both_ways(images, texts, text_owners, recall_at, ties, search_options) -> dict[str, Any]:
    image_owners = np.arange(len(images))
    return metrics_from_ranks(
        search.rank_counts(texts, text_owners, images, image_owners, **search_options),
        search.rank_counts(images, image_owners, texts, text_owners, **search_options),
        recall_at,
        ties,
    )


def bidirectional_metrics(
    image_embeddings: np.ndarray,
    text_embeddings: np.ndarray,
    text_owners: np.ndarray,
    recall_at: Sequence[int] = (1, 5, 10),
    metrics: Sequence[str] = DEFAULT_METRICS,
    ties: str = DEFAULT_TIES,
    captions: Sequence[str] | None = None,
    ndcg_at: Sequence[int] = (25,),
    image_labels: np.ndarray | None = None,
    **search_options,
) -> dict[str, Any]:
    """The selected metrics both ways for a gallery of images and captions; `text_owners[j]` is
    caption j's image; R@K and ranks under the tie policy `ties` (`TIES`). "ndcg" needs the
    `captions` themselves (ROUGE-L relevance, `relevance.py`), at each K of `ndcg_at`; the label
    metrics the images' multi-hot `image_labels` (they add the image_to_image and text_to_text entries).
    `search_options` go to `search.rank_counts` (chunk sizes, score dtype, mesh)."""
    metrics, ties = check_metrics(metrics), check_ties(ties)
    text_owners = np.asarray(text_owners)
    image_owners = np.arange(len(image_embeddings))
    full = _both_ways(image_embeddings, text_embeddings, text_owners, recall_at, ties, search_options)
    results: dict[str, Any] = {direction: {} for direction in DIRECTIONS}
    for direction in DIRECTIONS:
        if "recall" in metrics:
            results[direction].update({f"R@{k}": full[direction][f"R@{k}"] for k in recall_at})
        if "rank" in metrics:
            results[direction].update(
                median_rank=full[direction]["median_rank"], mean_rank=full[direction]["mean_rank"]
            )
    if "mean_recall" in metrics:
        results["mean_recall"] = full["mean_recall"]
    if "map" in metrics or "map_at_r" in metrics:
        for direction, (queries, query_labels, gallery, gallery_labels) in zip(DIRECTIONS, (
            (text_embeddings, text_owners, image_embeddings, image_owners),
            (image_embeddings, image_owners, text_embeddings, text_owners),
        )):
            average, at_r = average_precision(queries, query_labels, gallery, gallery_labels)
            if "map" in metrics:
                results[direction]["mAP"] = average
            if "map_at_r" in metrics:
                results[direction]["mAP@R"] = at_r
    if any(name in LABEL_METRICS for name in metrics):
        if image_labels is None:
            raise UserError(f"config.eval.metrics asks for {', '.join(n for n in metrics if n in LABEL_METRICS)}, "
                            "which need the images' category labels, but the evaluated split has none")
        for direction, values in label_metrics(image_embeddings, text_embeddings, text_owners, image_labels,
                                               metrics).items():
            results.setdefault(direction, {}).update(values)
    if "ndcg" in metrics:
        if captions is None:
            raise ValueError("the ndcg metric needs the captions (its relevance is ROUGE-L between them)")
        from vlretrieval.evaluation.relevance import ndcg_both_ways

        for direction, values in ndcg_both_ways(image_embeddings, text_embeddings, captions, text_owners,
                                                 ndcg_at, **search_options).items():
            results[direction].update(values)
    if "paired_recall" in metrics:
        # 1:1 pairs: each captioned image with its first caption; the positive is that one item.
        captioned, first = np.unique(text_owners, return_index=True)
        paired = _both_ways(
            image_embeddings[captioned], text_embeddings[first], np.arange(len(first)), recall_at, ties,
            search_options,
        )
        results["paired"] = _recall_only(paired, recall_at)
    if "hamming" in metrics:
        image_codes, text_codes = binary_codes(image_embeddings), binary_codes(text_embeddings)
        codes = _both_ways(image_codes, text_codes, text_owners, recall_at, ties, search_options)
        hamming = _recall_only(codes, recall_at)
        hamming["text_to_image"]["mAP"] = average_precision(text_codes, text_owners, image_codes, image_owners)[0]
        hamming["image_to_text"]["mAP"] = average_precision(image_codes, image_owners, text_codes, text_owners)[0]
        results["hamming"] = hamming
    return results


def _recall_only(results: dict[str, Any], recall_at: Sequence[int]) -> dict[str, Any]:
    return {
        **{d: {f"R@{k}": results[d][f"R@{k}"] for k in recall_at} for d in DIRECTIONS},
        "mean_recall": results["mean_recall"],
    }


def average_over_languages(per_language: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The mean of every metric (nested dicts of floats alike) over languages."""
    values = list(per_language.values())

    def mean(entries: list) -> Any:
        if isinstance(entries[0], dict):
            return {key: mean([entry[key] for entry in entries]) for key in entries[0]}
        return float(np.mean(entries))

    return mean(values)
