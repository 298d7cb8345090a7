"""Category-level retrieval metrics: mAP and mAP@R where a gallery item is relevant to a query when
the two share at least one category label (multi-hot overlap; for single-label data, equal labels).

Four directions: image -> text and text -> image (cross-modal), image -> image and text -> text
(intra-modal, the query itself left out of the gallery). A caption inherits its image's labels.
Each query's whole score row is sorted on the device, by chunks of queries; equal scores rank the
lower gallery index first (a stable sort), so results do not depend on the device or chunk size.

AP of a query = (1/R) sum over its relevant items of the precision at that item's position, R its
number of relevant gallery items; mAP@R (Musgrave et al. 2020) sums the precision only at the
relevant items within the first R positions, over R. Queries with no relevant item are left out;
both in percent. Metric names (config `eval.metrics`): `label_map`, `label_map_at_r`; results keys
`label_mAP`, `label_mAP@R` in each direction's entry.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

LABEL_METRICS = ("label_map", "label_map_at_r")
LABEL_DIRECTIONS = ("image_to_text", "text_to_image", "image_to_image", "text_to_text")
RESULT_KEYS = {"label_map": "label_mAP", "label_map_at_r": "label_mAP@R"}


def ranked_precision(scores: jax.Array, relevant: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(AP, AP@R, R) of each row of [queries, gallery] `scores` given which gallery items are
    `relevant` to it: the row sorted by score, equal scores ranking the lower gallery index first;
    AP@R sums precision over the first R positions only, R the row's number of relevant items.
    Shared by the instance-level mAP of `metrics.py` and the label mAP here."""
    order = jnp.argsort(-scores, axis=1, stable=True)
    relevant = jnp.take_along_axis(relevant, order, axis=1)
    hits = jnp.cumsum(relevant, axis=1)
    position = jnp.arange(1, scores.shape[1] + 1)
    precision_at_hits = jnp.where(relevant, hits / position, 0.0)
    total = hits[:, -1]
    denominator = jnp.maximum(total, 1)
    average = precision_at_hits.sum(axis=1) / denominator
    at_r = jnp.where(position[None, :] <= total[:, None], precision_at_hits, 0.0).sum(axis=1) / denominator
    return average, at_r, total


@jax.jit
def _label_precision_chunk(queries, query_labels, query_index, gallery, gallery_labels):
    """(AP, AP@R, R) of each query row; `query_index` is the query's own gallery index (-1: none)."""
    columns = jnp.arange(gallery.shape[0])
    own = query_index[:, None] == columns[None, :]
    scores = jnp.where(own, -jnp.inf, queries @ gallery.T)  # the query itself ranks last, irrelevant
    relevant = ((query_labels @ gallery_labels.T) > 0) & ~own
    return ranked_precision(scores, relevant)


def mean_precision_in_chunks(
    chunk_precision, query_arrays: Sequence[np.ndarray], gallery_arrays: Sequence[Any], gallery_size: int,
    max_scores_per_chunk: int = 1 << 24,
) -> tuple[float, float]:
    """(mAP, mAP@R) in percent over the queries with at least one relevant gallery item, from a
    jitted `chunk_precision(*query_rows, *gallery_arrays) -> (AP, AP@R, R)` run on chunks of the
    `query_arrays` (aligned per query). Each chunk sorts whole score rows on the device: memory
    O(chunk x gallery), the chunk holding about `max_scores_per_chunk` scores; the last chunk is
    padded with its last row so that one shape is compiled."""
    count = len(query_arrays[0])
    chunk = max(1, min(count, max_scores_per_chunk // max(gallery_size, 1)))
    averages, at_rs, totals = [], [], []
    for start in range(0, count, chunk):
        rows = [np.asarray(array[start : start + chunk]) for array in query_arrays]
        real = len(rows[0])
        if real < chunk:
            rows = [np.concatenate([r, np.repeat(r[-1:], chunk - real, axis=0)]) for r in rows]
        average, at_r, total = (np.asarray(x)[:real] for x in chunk_precision(*rows, *gallery_arrays))
        averages.append(average), at_rs.append(at_r), totals.append(total)
    has_relevant = np.concatenate(totals) > 0
    if not has_relevant.any():
        return 0.0, 0.0
    return (
        float(np.concatenate(averages)[has_relevant].mean() * 100.0),
        float(np.concatenate(at_rs)[has_relevant].mean() * 100.0),
    )


def label_average_precision(
    queries: np.ndarray,
    query_labels: np.ndarray,
    gallery: np.ndarray,
    gallery_labels: np.ndarray,
    exclude_self: bool = False,
    max_scores_per_chunk: int = 1 << 24,
) -> tuple[float, float]:
    """(mAP, mAP@R) in percent over the queries with at least one relevant gallery item, relevance
    a shared category of the multi-hot `*_labels` rows. `exclude_self`: the queries are the gallery
    (query q is gallery item q) and each is left out of its own ranking. Memory O(chunk x gallery),
    the chunk holding about `max_scores_per_chunk` scores."""
    indices = np.arange(len(queries), dtype=np.int32) if exclude_self else np.full(len(queries), -1, np.int32)
    return mean_precision_in_chunks(
        _label_precision_chunk,
        [np.asarray(queries, np.float32), np.asarray(query_labels, np.float32), indices],
        [jnp.asarray(gallery, jnp.float32), jnp.asarray(gallery_labels, jnp.float32)], len(gallery),
        max_scores_per_chunk)


def label_metrics(
    image_embeddings: np.ndarray,
    text_embeddings: np.ndarray,
    text_owners: np.ndarray,
    image_labels: np.ndarray,
    metrics: Sequence[str] = LABEL_METRICS,
    max_scores_per_chunk: int = 1 << 24,
) -> dict[str, dict[str, Any]]:
    """{direction: {"label_mAP": ..., "label_mAP@R": ...}} for the four `LABEL_DIRECTIONS`, the
    metrics among `metrics` that are `LABEL_METRICS`. `image_labels` is [images, categories]
    multi-hot; caption j has the labels of its image `text_owners[j]`."""
    wanted = [name for name in LABEL_METRICS if name in metrics]
    if not wanted:
        return {}
    image_labels = np.asarray(image_labels, np.float32)
    if len(image_labels) != len(image_embeddings):
        raise ValueError(f"{len(image_labels)} label rows for {len(image_embeddings)} images")
    text_labels = image_labels[np.asarray(text_owners)]
    images, texts = (image_embeddings, image_labels), (text_embeddings, text_labels)
    pairs = {"image_to_text": (images, texts), "text_to_image": (texts, images),
             "image_to_image": (images, images), "text_to_text": (texts, texts)}
    results = {}
    for direction in LABEL_DIRECTIONS:
        (queries, query_labels), (gallery, gallery_labels) = pairs[direction]
        intra_modal = direction in ("image_to_image", "text_to_text")
        values = dict(zip(LABEL_METRICS, label_average_precision(
            queries, query_labels, gallery, gallery_labels, exclude_self=intra_modal,
            max_scores_per_chunk=max_scores_per_chunk)))
        results[direction] = {RESULT_KEYS[name]: values[name] for name in wanted}
    return results
