"""Retrieval evaluation: embed a gallery sharded over every device of every host, rank on the
device by blocks (`search.py`), report the metrics chosen in the config (`metrics.py`).

Every query and every gallery item has an *owner* (the image it belongs to); a gallery item is a
positive for a query iff their owners match (see `metrics.py` for the rank convention: ties with
negatives counted by the tie policy `ties`, image -> text hits when any caption is in the top K).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from vlretrieval import parallel
from vlretrieval.data.pipeline import NormalizedImages, padded_host_positions
from vlretrieval.data.tokenizer import TextTokenizer
from vlretrieval.evaluation import codes, late_scores, rerank
from vlretrieval.evaluation.metrics import (  # noqa: F401  (the public names callers import from here)
    DEFAULT_METRICS,
    DEFAULT_TIES,
    DIRECTIONS,
    average_over_languages,
    bidirectional_metrics,
    check_ties,
    metrics_from_ranks,
    recall_metrics,
)
from vlretrieval.files import replaced_atomically


def host_batches(count: int, local_batch_size: int, process_index: int, process_count: int):
    """This host's (indices, valid) batches over `count` items, the same number on every host
    (`pipeline.padded_host_positions`)."""
    indices, valid = padded_host_positions(count, local_batch_size, process_index, process_count)
    for start in range(0, len(indices), local_batch_size):
        yield indices[start : start + local_batch_size], valid[start : start + local_batch_size]


def embed_in_batches(
    embed_fn: Callable[..., jax.Array], arrays: Sequence[np.ndarray], batch_size: int, mesh: Mesh
) -> np.ndarray:
    """`embed_fn` over `arrays` in global batches split over every device of every host.

    Each host feeds its own items (`host_batches`, padded with a `valid` mask so all hosts run the
    same steps); outputs stay on the devices until the end and are gathered once, with their item
    indices, into the full [count, dim] array on every host. `batch_size` is rounded up to a
    multiple of the device count, so any size works on any mesh. `arrays` are whole on every host
    (only the items a host embeds are read).
    """
    batch_size = -(-batch_size // mesh.size) * mesh.size
    local_batch = parallel.local_batch_size(batch_size)
    count = len(arrays[0])
    outputs = []
    for indices, valid in host_batches(count, local_batch, jax.process_index(), jax.process_count()):
        inputs = parallel.global_batch([np.asarray(a[indices]) for a in arrays], mesh)
        placed = parallel.global_batch({"index": indices.astype(np.int32), "valid": valid}, mesh)
        outputs.append({"embedding": embed_fn(*inputs), **placed})
    gathered = multihost_utils.process_allgather(
        jax.tree.map(lambda *xs: jnp.concatenate(xs), *outputs), tiled=True
    )
    valid = np.asarray(gathered["valid"], bool)
    embeddings = np.asarray(gathered["embedding"])
    result = np.zeros((count, *embeddings.shape[1:]), embeddings.dtype)
    result[np.asarray(gathered["index"])[valid]] = embeddings[valid]
    return result


MODES = ("towers", "joint", "rerank", "late_interaction", "late_interaction_rerank", "topics")
LATE_INTERACTION_MODES = ("late_interaction", "late_interaction_rerank")


def subset(split: dict[str, Any], max_images: int) -> dict[str, Any]:
    """The first `max_images` images of a loaded split, their captions and labels (0 = all)."""
    if not max_images or max_images >= len(split["images"]):
        return split
    kept = {
        "images": split["images"][:max_images],
        "captions": {lang: c[:max_images] for lang, c in split["captions"].items()},
    }
    if "labels" in split:
        kept.update(labels=split["labels"][:max_images], categories=split["categories"])
    return kept


def encoders(model, params) -> tuple[Callable, Callable]:
    """(images -> embeddings, (token ids, mask) -> embeddings), jitted with the parameters as
    arguments, not closed-over constants baked into the program."""
    encode_image = jax.jit(lambda p, images: model.apply({"params": p}, images, method=model.encode_image))
    encode_text = jax.jit(lambda p, ids, mask: model.apply({"params": p}, ids, mask, method=model.encode_text))
    return (lambda images: encode_image(params, images)), (lambda ids, mask: encode_text(params, ids, mask))


def topic_image_encoder(model, params) -> Callable:
    """images -> the square root of the topic head's predicted distribution: the inner product of
    two such vectors is the Bhattacharyya coefficient sum_k sqrt(p_k q_k) of their distributions."""
    encode = jax.jit(lambda p, images: jnp.sqrt(model.apply({"params": p}, images, method=model.encode_image_topics)))
    return lambda images: encode(params, images)


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
    metrics: Sequence[str] = DEFAULT_METRICS,
    ties: str = DEFAULT_TIES,
    image_embeddings: np.ndarray | None = None,
    check_queries: Callable[[np.ndarray], None] | None = None,
    search_options: dict[str, Any] | None = None,
    ndcg_at: Sequence[int] = (25,),
    aggregation: str = "max_mean",
    text_codes: Callable | None = None,
    text_topics: Callable[[Sequence[str]], np.ndarray] | None = None,
) -> dict[str, Any]:
    """Per-language and average retrieval metrics on a split loaded by `pipeline.load_split`.

    Images are embedded once; each language's captions are ranked against them by the towers
    (`towers`), by the joint model's score of every pair (`joint`), or by the towers and then the
    joint model on each query's `shortlist_size` best candidates (`rerank`). `joint_params` (by
    default `params`) are the weights that score pairs: e.g. the joint model before decomposition,
    re-ranking the shortlist of the decomposed towers. `rerank_tower_weight` > 0 re-orders by
    joint log-odds + weight x tower cosine (score fusion) instead of the joint score alone.
    `late_interaction` scores every pair by TERAN's word x region late interaction (`aggregation`),
    `late_interaction_rerank` only each query's tower shortlist (`late_scores.py`).
    `metrics` picks the towers-mode metrics (`metrics.METRICS`, and the label metrics of
    `label_metrics.py`, on `split["labels"]`); `ties` is the tie policy of every
    mode's ranks (`metrics.TIES`, recorded in the results); `image_embeddings` (e.g. from a
    saved index) replace embedding the images, and `check_queries` may refuse the text
    embeddings that cannot be compared with them; `search_options` go to `search.ranks`.
    `text_codes` (`codes.model_code_encoders`' text encoder), with `image_embeddings` a code
    index's packed codes: the captions are encoded to codes and ranked by Hamming distance.
    `topics` (TextTopicNet, docs/topics.md) ranks in topic space: the image tower's predicted topic
    distribution against `text_topics(captions)` (the run's LDA, `topics.TopicModel.distributions`)
    by the Bhattacharyya coefficient, with the towers' metrics.
    """
    if mode not in MODES:
        raise ValueError(f"unknown evaluation mode {mode!r}; choose one of {MODES}")
    check_ties(ties)
    params = parallel.replicate(params, mesh)
    encode_image, encode_text = encoders(model, params)
    if mode == "topics":
        if text_topics is None:
            raise ValueError("evaluation mode topics needs text_topics: the run's topic model's distributions")
        encode_image = topic_image_encoder(model, params)
    images = NormalizedImages(split["images"])  # array or this host's share (`pipeline.HostImages`)
    image_owners = np.arange(len(images))
    if image_embeddings is None:
        image_embeddings = embed_in_batches(encode_image, [images], batch_size, mesh)
    elif len(image_embeddings) != len(images):
        raise ValueError(f"{len(image_embeddings)} image embeddings for {len(images)} images")
    scorer = None
    if mode in LATE_INTERACTION_MODES:
        encode_regions, encode_words = late_scores.sequence_encoders(model, params)
        region_states = embed_in_batches(encode_regions, [images], batch_size, mesh)
    elif mode not in ("towers", "topics"):
        scorer = rerank.make_pair_scorer(
            model, params if joint_params is None else joint_params, mesh, pair_batch_size
        )
    per_language = {}
    for language, captions_per_image in split["captions"].items():
        texts = [caption for captions in captions_per_image for caption in captions]
        owners = np.repeat(np.arange(len(captions_per_image)), [len(c) for c in captions_per_image])
        token_ids, text_mask = tokenizer.encode(texts, max_text_length)
        if mode == "topics":
            text_embeddings = np.sqrt(text_topics(texts))
        else:
            text_embeddings = embed_in_batches(text_codes or encode_text, [token_ids, text_mask], batch_size, mesh)
        if text_codes is not None:
            text_embeddings = codes.pack_codes(text_embeddings)
        if check_queries is not None:
            check_queries(text_embeddings)
        if mode in ("towers", "topics"):
            per_language[language] = bidirectional_metrics(
                image_embeddings, text_embeddings, owners, recall_at, metrics, ties, captions=texts,
                ndcg_at=ndcg_at, image_labels=split.get("labels"), **(search_options or {})
            )
            continue
        if mode in LATE_INTERACTION_MODES:
            word_states = embed_in_batches(encode_words, [token_ids, text_mask], batch_size, mesh)
            if mode == "late_interaction":
                ranks, scores = late_scores.late_interaction_ranks(
                    word_states, region_states, owners, image_owners, aggregation)
            else:
                ranks = late_scores.late_interaction_rerank_ranks(
                    word_states, region_states, text_embeddings @ image_embeddings.T, owners, image_owners,
                    shortlist_size, aggregation, pair_batch_size)
            per_language[language] = metrics_from_ranks(*ranks, recall_at, ties)
            if mode == "late_interaction" and "ndcg" in metrics:
                from vlretrieval.evaluation.relevance import ndcg_from_scores

                for direction, values in ndcg_from_scores(scores, texts, owners, ndcg_at).items():
                    per_language[language][direction].update(values)
            continue
        pairs = (token_ids, text_mask, images)
        if mode == "joint":
            ranks = rerank.joint_ranks(scorer, pairs, owners, image_owners)
        else:
            ranks = rerank.shortlist_ranks(
                scorer, pairs, text_embeddings @ image_embeddings.T, owners, image_owners,
                shortlist_size, rerank_tower_weight,
            )
        per_language[language] = metrics_from_ranks(*ranks, recall_at, ties)
    results = {
        "mode": mode,
        "ties": ties,
        "num_images": int(len(image_embeddings)),
        "languages": per_language,
        "average": average_over_languages(per_language),
    }
    if mode in LATE_INTERACTION_MODES:
        results["aggregation"] = aggregation
    if mode in ("rerank", "late_interaction_rerank"):
        results["shortlist"] = int(shortlist_size)
        results["rerank_tower_weight"] = float(rerank_tower_weight)
    return results


def write_results(results: dict[str, Any], workdir: str, name: str = "results.json") -> str:
    path = os.path.join(workdir, name)
    with replaced_atomically(path) as temporary, open(temporary, "w") as handle:
        json.dump(results, handle, indent=2)
    return path
