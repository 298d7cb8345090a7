"""Retrieval with the joint model: score (text, image) pairs with the ITM head.

- joint mode: every pair of the gallery (one joint pass each: accurate, and O(texts x images));
- rerank mode: the towers shortlist K candidates per query, the joint model re-orders them.
Ranks follow `metrics.py`'s convention and its tie policy (`search.TiedRanks`: ties kept apart, a
policy applied after), so all modes report the same metrics.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from vlretrieval import parallel
from vlretrieval.evaluation.search import TiedRanks


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


def tied_ranks(scores, positive, gallery_index=None, negative=None) -> TiedRanks:
    """`TiedRanks` from a dense [queries, items] score matrix: `positive` marks each query's
    positives, `gallery_index` (default: the column) orders ties for `index`, `negative` (default:
    every item not a positive) marks the negatives that count."""
    scores, positive = np.asarray(scores), np.asarray(positive, bool)
    negative = ~positive if negative is None else np.asarray(negative, bool)
    if gallery_index is None:
        gallery_index = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
    gallery_index = np.asarray(gallery_index, np.int64)
    best = np.where(positive, scores, -np.inf).max(axis=1, keepdims=True, initial=-np.inf)
    tied_negative, tied_positive = negative & (scores == best), positive & (scores == best)
    none = np.iinfo(np.int64).max
    first = np.where(tied_positive, gallery_index, none).min(axis=1, keepdims=True, initial=none)
    masks = (negative & (scores > best), tied_negative, tied_positive, tied_negative & (gallery_index < first))
    return TiedRanks(*(np.sum(mask, axis=1, dtype=np.int64) for mask in masks))


def owner_tied_ranks(scores: np.ndarray, query_owners: np.ndarray, gallery_owners: np.ndarray) -> TiedRanks:
    """`tied_ranks` with the positives of each query the gallery items of its owner."""
    return tied_ranks(scores, query_owners[:, None] == gallery_owners[None, :])


def ranks_from_scores(
    scores: np.ndarray, query_owners: np.ndarray, gallery_owners: np.ndarray, ties: str = "index"
) -> np.ndarray:
    """0-based rank of each query's best positive under the tie policy `ties` (`pessimistic`:
    the negatives scoring at least as high)."""
    return owner_tied_ranks(scores, query_owners, gallery_owners).ranks(ties)


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


def reranked_tied_ranks(
    tower_scores: np.ndarray,
    candidates: np.ndarray,
    candidate_joint_scores: np.ndarray,
    query_owners: np.ndarray,
    gallery_owners: np.ndarray,
) -> TiedRanks:
    """`TiedRanks` after re-ordering each query's shortlist (`candidates`, gallery indices) by
    joint score.

    A query whose positive is in its shortlist ranks among the shortlist by joint score (ties by
    the candidates' gallery indices). One whose positive is not ranks behind the whole shortlist,
    then by tower score among the other items: K + its tower rank among those (its tower rank, >= K,
    under `pessimistic` and `index` when the shortlist is the towers' top K, ties to the lower index).
    """
    positive = gallery_owners[candidates] == query_owners[:, None]
    in_shortlist = tied_ranks(candidate_joint_scores, positive, gallery_index=candidates)
    tower_positive = query_owners[:, None] == gallery_owners[None, :]
    outside = np.ones(tower_scores.shape, bool)
    np.put_along_axis(outside, candidates, False, axis=1)
    behind = tied_ranks(tower_scores, tower_positive, negative=outside & ~tower_positive)
    behind = behind._replace(above=behind.above + candidates.shape[1])
    has_positive = positive.any(axis=1)
    return TiedRanks(*(np.where(has_positive, ours, theirs) for ours, theirs in zip(in_shortlist, behind)))


def reranked_ranks(
    tower_scores, candidates, candidate_joint_scores, query_owners, gallery_owners, ties: str = "index"
) -> np.ndarray:
    """0-based ranks after re-ordering each query's shortlist by joint score, under the tie policy
    `ties` (`reranked_tied_ranks`)."""
    tied = reranked_tied_ranks(tower_scores, candidates, candidate_joint_scores, query_owners, gallery_owners)
    return tied.ranks(ties)


def joint_ranks(scorer, pairs, owners: np.ndarray, image_owners: np.ndarray):
    """(text -> image, image -> text) `TiedRanks` from the joint score of every pair."""
    scores = all_pairs_scores(scorer, *pairs)  # [texts, images]
    return owner_tied_ranks(scores, owners, image_owners), owner_tied_ranks(scores.T, image_owners, owners)


def shortlist_ranks(
    scorer, pairs, tower_scores: np.ndarray, owners: np.ndarray, image_owners: np.ndarray,
    shortlist_size: int, tower_weight: float,
):
    """(text -> image, image -> text) `TiedRanks`: the towers' `shortlist_size` best candidates
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
        reranked_tied_ranks(tower_scores, image_candidates, image_joint, owners, image_owners),
        reranked_tied_ranks(tower_scores.T, text_candidates, text_joint, image_owners, owners),
    )
