"""Retrieval by TERAN's word-region late interaction (`vlretrieval.late_interaction`).

The towers keep their sequences: every caption's token states and every image's region (or patch)
states are embedded once, sharded like pooled embeddings (`evaluate.embed_in_batches`). Then:
- `late_interaction` mode scores every (caption, image) pair on the device, by blocks of
  `text_chunk` captions (split over this host's devices) x `image_chunk` images: memory
  O(text_chunk x image_chunk x words x regions), the [captions, images] matrix on the host;
- `late_interaction_rerank` mode shortlists each query's K best by the pooled towers and re-orders
  only those by late interaction: O(queries x K) pair scores, for galleries too large for the
  whole matrix.
Ranks and ties follow `rerank.py` (the same `TiedRanks` as every mode).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from vlretrieval import parallel
from vlretrieval.evaluation import rerank
from vlretrieval.late_interaction import pair_scores


def _with_mask(states: jax.Array, mask: jax.Array) -> jax.Array:
    """[N, L, D + 1]: states and their mask as one array (one output for `embed_in_batches`)."""
    return jnp.concatenate([states, mask[..., None].astype(states.dtype)], axis=-1)


def split_mask(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return packed[..., :-1], packed[..., -1]


def sequence_encoders(model, params) -> tuple[Callable, Callable]:
    """(images -> [N, regions, D + 1], (ids, mask) -> [N, words, D + 1]): the towers' normalised
    region / word states with their masks in the last column, jitted with the parameters."""
    regions = jax.jit(lambda p, images: _with_mask(*model.apply({"params": p}, images, method=model.region_embeddings)))
    words = jax.jit(lambda p, ids, mask: _with_mask(*model.apply({"params": p}, ids, mask,
                                                                 method=model.token_embeddings)))
    return (lambda images: regions(params, images)), (lambda ids, mask: words(params, ids, mask))


def _chunk_scorer(aggregation: str, mesh):
    texts_sharded = parallel.batch_sharding(mesh)

    @jax.jit
    def score(words, regions):
        return pair_scores(*split_mask(words), *split_mask(regions), aggregation)

    def run(words: np.ndarray, regions: np.ndarray) -> np.ndarray:
        real = len(words)
        padded = -(-real // mesh.size) * mesh.size  # the text block splits over the devices
        if padded != real:
            words = np.concatenate([words, np.zeros((padded - real, *words.shape[1:]), words.dtype)])
        placed = jax.device_put(words, texts_sharded), jax.device_put(regions, parallel.replicated(mesh))
        return np.asarray(score(*placed))[:real]

    return run


def score_matrix(words: np.ndarray, regions: np.ndarray, aggregation: str = "max_mean", *,
                 text_chunk: int = 256, image_chunk: int = 256, mesh=None) -> np.ndarray:
    """float32 [captions, images] late-interaction scores of word states `words` [captions, W, D+1]
    against region states `regions` [images, R, D+1] (masks in the last column), block by block."""
    mesh = mesh or parallel.local_mesh()
    run = _chunk_scorer(aggregation, mesh)
    scores = np.zeros((len(words), len(regions)), np.float32)
    for start in range(0, len(words), text_chunk):
        for first in range(0, len(regions), image_chunk):
            block = regions[first:first + image_chunk]
            scores[start:start + text_chunk, first:first + len(block)] = run(words[start:start + text_chunk], block)
    return scores


def pair_scorer(aggregation: str = "max_mean", pair_batch_size: int = 1024) -> Callable:
    """`score(words, word_mask, regions) -> [pairs]`: the late-interaction score of each row's
    (caption, image) pair, in fixed-size batches (the shape `rerank.score_pairs` calls with)."""

    @jax.jit
    def score(words, word_mask, regions):
        # One pair per row: the diagonal of a [1, 1] pair_scores, vmapped over the rows.
        one = lambda w, m, r: pair_scores(w[None], m[None], *split_mask(r[None]), aggregation)[0, 0]
        return jax.vmap(one)(words, word_mask, regions)

    def run(words: np.ndarray, word_mask: np.ndarray, regions: np.ndarray) -> np.ndarray:
        results = []
        for start in range(0, len(words), pair_batch_size):
            chunk = [a[start:start + pair_batch_size] for a in (words, word_mask, regions)]
            real = len(chunk[0])
            if real < pair_batch_size:  # one compiled shape
                chunk = [np.concatenate([c, np.repeat(c[-1:], pair_batch_size - real, axis=0)]) for c in chunk]
            results.append(np.asarray(score(*chunk))[:real])
        return np.concatenate(results) if results else np.zeros((0,), np.float32)

    return run


def late_interaction_ranks(words, regions, owners, image_owners, aggregation="max_mean", **chunks):
    """(text -> image, image -> text) `TiedRanks` and the score matrix, from every pair's score."""
    scores = score_matrix(words, regions, aggregation, **chunks)
    return (rerank.owner_tied_ranks(scores, owners, image_owners),
            rerank.owner_tied_ranks(scores.T, image_owners, owners)), scores


def late_interaction_rerank_ranks(words, regions, tower_scores, owners, image_owners, shortlist_size: int,
                                  aggregation="max_mean", pair_batch_size: int = 1024):
    """(text -> image, image -> text) `TiedRanks`: each query's `shortlist_size` best by the pooled
    towers, re-ordered by late interaction (`rerank.shortlist_ranks` with this pair score)."""
    word_states, word_mask = split_mask(words)
    pairs = (word_states, word_mask, regions)
    return rerank.shortlist_ranks(pair_scorer(aggregation, pair_batch_size), pairs, tower_scores, owners,
                                  image_owners, shortlist_size, 0.0)
