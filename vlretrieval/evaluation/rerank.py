"""Retrieval with the joint model: score (text, image) pairs with the ITM head.

- joint mode: every pair of the gallery (one joint pass each: accurate, and O(texts x images));
- rerank mode: the towers shortlist K candidates per query, the joint model re-orders them.
Ranks follow `evaluate.py`'s convention (ties count against the model), so all modes report the
same metrics.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from vlretrieval import parallel


def make_pair_scorer(model, params, mesh: Mesh, pair_batch_size: int) -> Callable:
    """`score(token_ids, text_mask, images) -> [pairs]` ITM log-odds, in fixed-size batches."""
    parallel.check_batch_divisible(pair_batch_size, mesh, "config.eval.pair_batch_size")
    params = parallel.replicate(params, mesh)

    @jax.jit
    def log_odds(p, token_ids, text_mask, images):
        logits = model.apply({"params": p}, token_ids, text_mask, images, method=model.joint_forward)[
            "itm_logits"
        ]
        return logits[:, 1] - logits[:, 0]

    sharding = parallel.batch_sharding(mesh)

    def score(token_ids: np.ndarray, text_mask: np.ndarray, images: np.ndarray) -> np.ndarray:
        scores = []
        for start in range(0, len(token_ids), pair_batch_size):
            chunk = [a[start : start + pair_batch_size] for a in (token_ids, text_mask, images)]
            real = len(chunk[0])
            if real < pair_batch_size:  # one compiled shape: pad with copies of the last pair
                chunk = [np.concatenate([c, np.repeat(c[-1:], pair_batch_size - real, axis=0)]) for c in chunk]
            placed = [jax.device_put(c, sharding) for c in chunk]
            scores.append(np.asarray(log_odds(params, *placed))[:real])
        return np.concatenate(scores) if scores else np.zeros((0,), np.float32)

    return score


def score_pairs(
    scorer: Callable, token_ids: np.ndarray, text_mask: np.ndarray, images: np.ndarray,
    text_index: np.ndarray, image_index: np.ndarray,
) -> np.ndarray:
    """Joint scores of the pairs (text_index[p], image_index[p])."""
    return scorer(token_ids[text_index], text_mask[text_index], images[image_index])


def ranks_from_scores(
    scores: np.ndarray, query_owners: np.ndarray, gallery_owners: np.ndarray
) -> np.ndarray:
    """0-based rank of each query's best positive: negatives scoring at least as high."""
    positive = query_owners[:, None] == gallery_owners[None, :]
    best = np.where(positive, scores, -np.inf).max(axis=1, keepdims=True)
    return ((scores >= best) & ~positive).sum(axis=1)


def all_pairs_scores(scorer, token_ids, text_mask, images) -> np.ndarray:
    """[texts, images] joint scores of every pair."""
    text_index, image_index = np.meshgrid(
        np.arange(len(token_ids)), np.arange(len(images)), indexing="ij"
    )
    scores = score_pairs(scorer, token_ids, text_mask, images, text_index.ravel(), image_index.ravel())
    return scores.reshape(len(token_ids), len(images))


def shortlist(tower_scores: np.ndarray, k: int) -> np.ndarray:
    """[queries, k] gallery indices of each query's k best tower scores, best first."""
    k = min(k, tower_scores.shape[1])
    top = jax.lax.top_k(jnp.asarray(tower_scores), k)[1]
    return np.asarray(top)


def reranked_ranks(
    tower_scores: np.ndarray,
    candidates: np.ndarray,
    candidate_joint_scores: np.ndarray,
    query_owners: np.ndarray,
    gallery_owners: np.ndarray,
) -> np.ndarray:
    """Ranks after re-ordering each query's shortlist by joint score.

    A query whose positive is in its shortlist ranks among the shortlist by joint score; one whose
    positive is not keeps its tower rank (which is then >= K, behind the whole shortlist).
    """
    tower_ranks = ranks_from_scores(tower_scores, query_owners, gallery_owners)
    positive = gallery_owners[candidates] == query_owners[:, None]
    has_positive = positive.any(axis=1)
    best = np.where(positive, candidate_joint_scores, -np.inf).max(axis=1, keepdims=True)
    shortlist_ranks = ((candidate_joint_scores >= best) & ~positive).sum(axis=1)
    return np.where(has_positive, shortlist_ranks, tower_ranks)


def joint_ranks(scorer, pairs, owners: np.ndarray, image_owners: np.ndarray):
    """(text -> image ranks, image -> text ranks) from the joint score of every pair."""
    scores = all_pairs_scores(scorer, *pairs)  # [texts, images]
    return ranks_from_scores(scores, owners, image_owners), ranks_from_scores(scores.T, image_owners, owners)


def shortlist_ranks(
    scorer, pairs, tower_scores: np.ndarray, owners: np.ndarray, image_owners: np.ndarray,
    shortlist_size: int, tower_weight: float,
):
    """(text -> image ranks, image -> text ranks): the towers' `shortlist_size` best candidates
    of each query re-ordered by the joint score (+ `tower_weight` x the tower cosine)."""
    image_candidates = shortlist(tower_scores, shortlist_size)  # per text
    text_candidates = shortlist(tower_scores.T, shortlist_size)  # per image
    text_index = np.repeat(np.arange(len(tower_scores)), image_candidates.shape[1])
    image_joint = score_pairs(scorer, *pairs, text_index, image_candidates.ravel()).reshape(
        image_candidates.shape
    )
    image_index = np.repeat(image_owners, text_candidates.shape[1])
    text_joint = score_pairs(scorer, *pairs, text_candidates.ravel(), image_index).reshape(
        text_candidates.shape
    )
    image_joint += tower_weight * np.take_along_axis(tower_scores, image_candidates, 1)
    text_joint += tower_weight * np.take_along_axis(tower_scores.T, text_candidates, 1)
    return (
        reranked_ranks(tower_scores, image_candidates, image_joint, owners, image_owners),
        reranked_ranks(tower_scores.T, text_candidates, text_joint, image_owners, owners),
    )
