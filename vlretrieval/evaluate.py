"""Retrieval evaluation: embed a gallery with jitted batched calls, rank on the device, report recall.

Both directions are one computation. Every query and every gallery item has an *owner* (the image
it belongs to); a gallery item is a positive for a query iff their owners match. A query's rank is
the number of negatives that score at least as high as its best positive, so
- text -> image: a caption's rank is that of its own image;
- image -> text: an image hits at K when *any* of its captions is within the top K (as CLIP_benchmark).
Ties count against the model, so a collapsed model that maps everything to one point scores ~0,
not 100%.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from vlretrieval import parallel, rerank
from vlretrieval.data.pipeline import normalize_images
from vlretrieval.data.tokenizer import TextTokenizer

DIRECTIONS = ("text_to_image", "image_to_text")


def embed_in_batches(
    embed_fn: Callable[..., jax.Array], arrays: Sequence[np.ndarray], batch_size: int, mesh: Mesh
) -> np.ndarray:
    """Apply `embed_fn` to `arrays` in fixed-size batches sharded over the mesh.

    The last batch is padded (one compiled shape for all batches) and the padding rows dropped;
    `batch_size` is rounded up to a multiple of the device count, so any size works on any mesh.
    """
    batch_size = -(-batch_size // mesh.size) * mesh.size
    count = len(arrays[0])
    sharding = parallel.batch_sharding(mesh)
    outputs = []
    for start in range(0, count, batch_size):
        chunk = [np.asarray(a[start : start + batch_size]) for a in arrays]
        real = len(chunk[0])
        if real < batch_size:
            chunk = [np.concatenate([c, np.repeat(c[-1:], batch_size - real, axis=0)]) for c in chunk]
        placed = [jax.device_put(c, sharding) for c in chunk]
        outputs.append(np.asarray(embed_fn(*placed))[:real])
    return np.concatenate(outputs)


@jax.jit
def _ranks_of_chunk(
    queries: jax.Array, query_owners: jax.Array, gallery: jax.Array, gallery_owners: jax.Array
) -> jax.Array:
    scores = queries @ gallery.T  # [queries, gallery]
    positive = query_owners[:, None] == gallery_owners[None, :]
    best_positive = jnp.max(jnp.where(positive, scores, -jnp.inf), axis=1, keepdims=True)
    return jnp.sum((scores >= best_positive) & ~positive, axis=1)


def retrieval_ranks(
    queries: np.ndarray,
    query_owners: np.ndarray,
    gallery: np.ndarray,
    gallery_owners: np.ndarray,
    query_chunk: int = 1024,
) -> np.ndarray:
    """0-based rank of each query's best positive among the gallery, computed on the device.

    Memory is O(query_chunk x gallery); queries are processed in chunks of one padded shape.
    """
    gallery = jnp.asarray(gallery, jnp.float32)
    gallery_owners = jnp.asarray(gallery_owners, jnp.int32)
    ranks = []
    for start in range(0, len(queries), query_chunk):
        chunk = np.asarray(queries[start : start + query_chunk], np.float32)
        owners = np.asarray(query_owners[start : start + query_chunk], np.int32)
        real = len(chunk)
        if real < query_chunk and len(queries) > query_chunk:  # keep one compiled shape
            chunk = np.concatenate([chunk, np.zeros((query_chunk - real, chunk.shape[1]), np.float32)])
            owners = np.concatenate([owners, np.full(query_chunk - real, -1, np.int32)])
        ranks.append(np.asarray(_ranks_of_chunk(chunk, owners, gallery, gallery_owners))[:real])
    return np.concatenate(ranks)


def recall_metrics(ranks: np.ndarray, recall_at: Sequence[int]) -> dict[str, float]:
    """R@K in percent, and the median and mean 1-based rank."""
    metrics = {f"R@{k}": float(np.mean(ranks < k) * 100.0) for k in recall_at}
    metrics["median_rank"] = float(np.median(ranks) + 1)
    metrics["mean_rank"] = float(np.mean(ranks) + 1)
    return metrics


def metrics_from_ranks(
    text_to_image_ranks: np.ndarray, image_to_text_ranks: np.ndarray, recall_at: Sequence[int]
) -> dict[str, Any]:
    """Both directions' recall metrics and their mean recall (the mean of every R@K)."""
    results = {
        "text_to_image": recall_metrics(text_to_image_ranks, recall_at),
        "image_to_text": recall_metrics(image_to_text_ranks, recall_at),
    }
    recalls = [results[d][f"R@{k}"] for d in DIRECTIONS for k in recall_at]
    results["mean_recall"] = float(np.mean(recalls))
    return results


def bidirectional_metrics(
    image_embeddings: np.ndarray,
    text_embeddings: np.ndarray,
    text_owners: np.ndarray,
    recall_at: Sequence[int] = (1, 5, 10),
) -> dict[str, Any]:
    """Metrics both ways for a gallery of images and captions; `text_owners[j]` is j's image."""
    image_owners = np.arange(len(image_embeddings))
    return metrics_from_ranks(
        retrieval_ranks(text_embeddings, text_owners, image_embeddings, image_owners),
        retrieval_ranks(image_embeddings, image_owners, text_embeddings, text_owners),
        recall_at,
    )


def average_over_languages(per_language: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The mean of every metric over languages."""
    languages = list(per_language)
    average: dict[str, Any] = {}
    for direction in DIRECTIONS:
        keys = per_language[languages[0]][direction]
        average[direction] = {
            key: float(np.mean([per_language[lang][direction][key] for lang in languages]))
            for key in keys
        }
    average["mean_recall"] = float(np.mean([per_language[lang]["mean_recall"] for lang in languages]))
    return average


MODES = ("towers", "joint", "rerank")


def subset(split: dict[str, Any], max_images: int) -> dict[str, Any]:
    """The first `max_images` images of a loaded split and their captions (0 = all)."""
    if not max_images or max_images >= len(split["images"]):
        return split
    return {
        "images": split["images"][:max_images],
        "captions": {lang: c[:max_images] for lang, c in split["captions"].items()},
    }


def evaluate_split(
    model,
    params,
    split: dict[str, Any],
    tokenizer: TextTokenizer,
    *,
    mesh: Mesh,
    batch_size: int,
    max_text_length: int,
    recall_at: Sequence[int] = (1, 5, 10),
    mode: str = "towers",
    shortlist_size: int = 20,
    pair_batch_size: int = 256,
    joint_params=None,
    rerank_tower_weight: float = 0.0,
) -> dict[str, Any]:
    """Per-language and average retrieval metrics on a split loaded by `pipeline.load_split`.

    Images are embedded once; each language's captions are ranked against them by the towers
    (`towers`), by the joint model's score of every pair (`joint`), or by the towers and then the
    joint model on each query's `shortlist_size` best candidates (`rerank`). `joint_params` (by
    default `params`) are the weights that score pairs: e.g. the joint model before decomposition,
    re-ranking the shortlist of the decomposed towers. `rerank_tower_weight` > 0 re-orders by
    joint log-odds + weight x tower cosine (score fusion) instead of the joint score alone.
    """
    if mode not in MODES:
        raise ValueError(f"unknown evaluation mode {mode!r}; choose one of {MODES}")
    params = parallel.replicate(params, mesh)
    # Parameters are jit arguments, not closed-over constants baked into the program.
    encode_image = jax.jit(lambda p, images: model.apply({"params": p}, images, method=model.encode_image))
    encode_text = jax.jit(
        lambda p, ids, mask: model.apply({"params": p}, ids, mask, method=model.encode_text)
    )
    images = normalize_images(split["images"])
    image_owners = np.arange(len(images))
    image_embeddings = embed_in_batches(
        lambda batch: encode_image(params, batch), [images], batch_size, mesh
    )
    scorer = None
    if mode != "towers":
        scorer = rerank.make_pair_scorer(
            model, params if joint_params is None else joint_params, mesh, pair_batch_size
        )
    per_language = {}
    for language, captions_per_image in split["captions"].items():
        texts = [caption for captions in captions_per_image for caption in captions]
        owners = np.repeat(np.arange(len(captions_per_image)), [len(c) for c in captions_per_image])
        token_ids, text_mask = tokenizer.encode(texts, max_text_length)
        text_embeddings = embed_in_batches(
            lambda ids, mask: encode_text(params, ids, mask), [token_ids, text_mask], batch_size, mesh
        )
        if mode == "towers":
            per_language[language] = bidirectional_metrics(
                image_embeddings, text_embeddings, owners, recall_at
            )
            continue
        pairs = (token_ids, text_mask, images)
        if mode == "joint":
            scores = rerank.all_pairs_scores(scorer, *pairs)  # [texts, images]
            text_ranks = rerank.ranks_from_scores(scores, owners, image_owners)
            image_ranks = rerank.ranks_from_scores(scores.T, image_owners, owners)
        else:
            tower_scores = text_embeddings @ image_embeddings.T
            image_candidates = rerank.shortlist(tower_scores, shortlist_size)  # per text
            text_candidates = rerank.shortlist(tower_scores.T, shortlist_size)  # per image
            text_index = np.repeat(np.arange(len(texts)), image_candidates.shape[1])
            image_joint = rerank.score_pairs(
                scorer, *pairs, text_index, image_candidates.ravel()
            ).reshape(image_candidates.shape)
            image_index = np.repeat(image_owners, text_candidates.shape[1])
            text_joint = rerank.score_pairs(
                scorer, *pairs, text_candidates.ravel(), image_index
            ).reshape(text_candidates.shape)
            image_joint += rerank_tower_weight * np.take_along_axis(tower_scores, image_candidates, 1)
            text_joint += rerank_tower_weight * np.take_along_axis(tower_scores.T, text_candidates, 1)
            text_ranks = rerank.reranked_ranks(
                tower_scores, image_candidates, image_joint, owners, image_owners
            )
            image_ranks = rerank.reranked_ranks(
                tower_scores.T, text_candidates, text_joint, image_owners, owners
            )
        per_language[language] = metrics_from_ranks(text_ranks, image_ranks, recall_at)
    results = {
        "mode": mode,
        "num_images": int(len(image_embeddings)),
        "languages": per_language,
        "average": average_over_languages(per_language),
    }
    if mode == "rerank":
        results["shortlist"] = int(shortlist_size)
        results["rerank_tower_weight"] = float(rerank_tower_weight)
    return results


def format_table(results: dict[str, Any], recall_at: Sequence[int] = (1, 5, 10)) -> str:
    """A fixed-width table: one row per language plus the average."""
    header = (
        ["language"]
        + [f"T->I R@{k}" for k in recall_at]
        + [f"I->T R@{k}" for k in recall_at]
        + ["mean recall"]
    )
    rows = [header]
    entries = list(results["languages"].items()) + [("average", results["average"])]
    for name, metrics in entries:
        rows.append(
            [name]
            + [f"{metrics['text_to_image'][f'R@{k}']:.1f}" for k in recall_at]
            + [f"{metrics['image_to_text'][f'R@{k}']:.1f}" for k in recall_at]
            + [f"{metrics['mean_recall']:.1f}"]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_results(results: dict[str, Any], workdir: str, name: str = "results.json") -> str:
    path = os.path.join(workdir, name)
    temporary = path + ".tmp"
    with open(temporary, "w") as handle:
        json.dump(results, handle, indent=2)
    os.replace(temporary, path)  # never leave a half-written results file
    return path
