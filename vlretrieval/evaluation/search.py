"""Exact nearest-neighbour search by blocks on the device: top-k and ranks, never the full matrix.

The gallery is walked in blocks of `gallery_chunk` rows inside one jitted loop; each block's
scores ([query_chunk, gallery_chunk]) are reduced at once (a top-k merged into the running top-k,
or a count), so memory is O(query_chunk x gallery_chunk) whatever the gallery size, and the
gallery is read in place: the last block is a slice that ends at the last row (rows the previous
block already saw are masked), so an unpadded gallery is never copied.

Ties: among equal scores the lower gallery index comes first (as a stable sort), in every block
and in every merge (the running top-k, which holds only lower indices, is merged in first).
`rank_counts` keeps each query's ties apart (`TiedRanks`); `ranks` then applies a tie policy (`TIES`).
Queries are split over the devices of a local mesh (the gallery is replicated on each).

The block score is the inner product of float embeddings, or, where both sides are packed binary
codes (uint32 words, `codes.pack_codes`), minus their Hamming distance (XOR and population count,
as float32: exact), so every search, count and tie rule above holds for codes unchanged.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vlretrieval import parallel
from vlretrieval.errors import UserError
from vlretrieval.evaluation import blocks, codes

SCORE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# How a rank counts the negatives tied with a query's best positive (`TiedRanks.ranks`).
TIES = ("pessimistic", "optimistic", "expected", "index")


class TiedRanks(NamedTuple):
    """Each query's rank with its ties kept apart, so that any tie policy applies after the search:
    the negatives scoring above its best positive (`above`), the negatives tied with it (`tied`),
    the positives tied at it (`tied_positives`: at least 1 where the query has a positive) and the
    tied negatives at a lower gallery index than the lowest-index tied positive (`tied_before`).

    0-based rank by policy (`TIES`): `pessimistic` above + tied (every tie against the model),
    `optimistic` above, `index` above + tied_before (gallery order: a stable sort, CLIP_benchmark's
    top-k), `expected` the mean over uniformly random orders of the tied items, above + tied / (p + 1)
    with p tied positives (its R@K: `metrics.hit_rate`)."""

    above: np.ndarray
    tied: np.ndarray
    tied_positives: np.ndarray
    tied_before: np.ndarray

    @classmethod
    def exact(cls, ranks) -> TiedRanks:
        """Ranks without ties: every policy gives `ranks`."""
        ranks = np.asarray(ranks, np.int64)
        zeros = np.zeros_like(ranks)
        return cls(ranks, zeros, zeros + 1, zeros)

    def ranks(self, ties: str = "index") -> np.ndarray:
        """0-based ranks under the policy `ties` (float for `expected`, else integers)."""
        _check_ties(ties)
        if ties == "pessimistic":
            return self.above + self.tied
        if ties == "optimistic":
            return self.above
        if ties == "index":
            return self.above + self.tied_before
        return self.above + self.tied / (self.tied_positives + 1)


def _check_ties(ties: str) -> None:
    if ties not in TIES:
        raise ValueError(f"unknown tie policy {ties!r}; choose one of {TIES}")


def _score_dtype(name: str):
    if name not in SCORE_DTYPES:
        raise ValueError(f"unknown score dtype {name!r}; choose one of {tuple(SCORE_DTYPES)}")
    return SCORE_DTYPES[name]


def _block_reader(queries: jax.Array, slab: jax.Array, valid: jax.Array, gallery_chunk: int, dtype):
    """`read(b) -> (scores [q, chunk] float32, row in the slab [chunk], row is real [chunk])`.
    The score is the inner product, or for packed codes (uint32, a [words, rows] slab) minus the
    Hamming distance."""
    is_codes = slab.dtype == jnp.uint32
    queries = queries if is_codes else queries.astype(dtype)

    def read(block: jax.Array):
        start = block * gallery_chunk
        rows = lax.dynamic_slice_in_dim(slab, start, gallery_chunk, 1 if is_codes else 0)
        row = start + jnp.arange(gallery_chunk, dtype=jnp.int32)
        if is_codes:  # exact as float32: distances are below 2^24
            return -codes.hamming_distances(queries, rows).astype(jnp.float32), row, row < valid
        # float32 accumulation whatever the input dtype: bfloat16 halves the bytes read, not the
        # precision of the sum.
        scores = lax.dot_general(
            queries, rows.astype(dtype), (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
        )
        return scores, row, row < valid

    return read


def _candidate_reader(queries: jax.Array, slab: jax.Array, valid: jax.Array, gallery_chunk: int, dtype, k: int):
    """`read(b) -> ([q, m] scores, [q, m] rows in the slab)`, in row order, that hold block b's top k
    (rows past `valid` score -inf). Codes in wide blocks take `blocks.code_candidates`, which never holds
    a block of scores; the rest score the block (`_block_reader`) and pick from it."""
    if slab.dtype == jnp.uint32 and (group := blocks.code_group_size(gallery_chunk, k, slab.shape[0])) >= 8:
        def read_codes(block: jax.Array):
            start = block * gallery_chunk
            words = lax.dynamic_slice_in_dim(slab, start, gallery_chunk, 1)
            real = start + jnp.arange(gallery_chunk, dtype=jnp.int32) < valid
            scores, column = blocks.code_candidates(queries, words, real, k, group)
            return scores, start + column

        return read_codes
    read = _block_reader(queries, slab, valid, gallery_chunk, dtype)

    def read_scores(block: jax.Array):
        scores, row, real = read(block)
        scores, column = blocks.block_candidates(jnp.where(real[None, :], scores, -jnp.inf), k)
        return scores, row[column]

    return read_scores


def _slab_rows(slab: jax.Array) -> int:
    return slab.shape[1] if slab.dtype == jnp.uint32 else slab.shape[0]  # codes: [words, rows]


def _loop(blocks: int, step, initial):
    return step(0, initial) if blocks == 1 else lax.fori_loop(0, blocks, step, initial)


@functools.partial(jax.jit, static_argnames=("gallery_chunk", "score_dtype"), donate_argnums=(4, 5))
def _top_k_slab(queries, slab, valid, offset, best_scores, best_index, *, gallery_chunk: int, score_dtype: str):
    """Merge one slab's top-k into the running ([chunks, q, k] scores, [chunks, q, k] indices) of
    every query chunk ([chunks, q, dim]). All chunks in one call: a call per chunk measured ~25% slower
    on the CPU (probably a fresh block of scores allocated and zeroed per call)."""
    k = best_scores.shape[2]

    def chunk_step(chunk, carry):
        best_scores, best_index = carry
        read = _candidate_reader(queries[chunk], slab, valid, gallery_chunk, _score_dtype(score_dtype), k)

        def step(block, carry):
            best_scores, best_index = carry
            candidates, row = read(block)
            # One top k over the running results and the candidates: running results first, so
            # on equal scores top_k keeps the earlier (lower-index) entry.
            merged_scores = jnp.concatenate([best_scores, candidates], axis=1)
            merged_index = jnp.concatenate([best_index, offset + row], axis=1)
            best_scores, chosen = lax.top_k(merged_scores, k)
            return best_scores, jnp.take_along_axis(merged_index, chosen, axis=1)

        best = _loop(_slab_rows(slab) // gallery_chunk, step, (best_scores[chunk], best_index[chunk]))
        return best_scores.at[chunk].set(best[0]), best_index.at[chunk].set(best[1])

    return _loop(queries.shape[0], chunk_step, (best_scores, best_index))


# The block reductions below are variadic `lax.reduce`s: XLA's CPU backend splits a plain sum or
# argmax into a tree of materialised partial reductions, one per quantity, while a variadic reduce
# is one fused pass over the block (measured on a 1,024 x 16,384 block: one count by `jnp.sum`
# 41 ms, the four counts of `_count_ties` in one variadic reduce 12 ms).


def _max_lowest_index(a, b):
    """Combines (score, gallery index) pairs: the higher score, the lower index on equal scores."""
    index = jnp.where(a[0] > b[0], a[1], jnp.where(b[0] > a[0], b[1], jnp.minimum(a[1], b[1])))
    return jnp.maximum(a[0], b[0]), index


def _best_positive(scores, positive, row, best, first):
    """The running best positive score and the lowest gallery index that holds it (`first`):
    blocks come in gallery order, so an equal best in a later block keeps the earlier index."""
    masked = jnp.where(positive, scores, -jnp.inf)
    rows = jnp.broadcast_to(row[None, :], masked.shape)
    initial = (jnp.float32(-jnp.inf), jnp.int32(np.iinfo(np.int32).max))
    block_best, block_first = lax.reduce((masked, rows), initial, _max_lowest_index, (1,))
    better = block_best > best
    return jnp.where(better, block_best, best), jnp.where(better, block_first, first)


def _count_ties(scores, positive, negative, row, best, first, counts: TiedRanks) -> TiedRanks:
    """`counts` plus one block's negatives above `best` (the best positive's score), negatives
    and positives tied with it, and tied negatives at a lower gallery index than `first`."""
    at_best = scores == best[:, None]
    tied_negative = negative & at_best
    masks = TiedRanks(negative & (scores > best[:, None]), tied_negative, positive & at_best,
                      tied_negative & (row[None, :] < first[:, None]))
    block = lax.reduce(tuple(m.astype(jnp.int32) for m in masks), (jnp.int32(0),) * len(masks),
                       lambda a, b: tuple(x + y for x, y in zip(a, b)), (1,))
    return TiedRanks(*(total + part for total, part in zip(counts, block)))


@functools.partial(jax.jit, static_argnames=("gallery_chunk", "score_dtype"), donate_argnums=(7, 8, 9))
def _ranks_slab(
    queries, query_owners, slab, slab_owners, valid, offset, counting, best, first, counts, *,
    gallery_chunk: int, score_dtype: str,
):
    """One slab of one of two sweeps: the best positive's score and its lowest gallery index
    (`counting` false), then the items above and tied with it (`counting` true). Both sweeps run
    this one compiled program, the scores computed outside the `lax.cond` that picks the sweep's
    work, so a score is bitwise the same as a threshold and when compared with it: a tie in one
    sweep is a tie in the other, and the best positive is a tied positive. (A `jnp.where` over
    both sweeps' results, as before ties were counted apart, did every sweep's work twice.)"""
    read = _block_reader(queries, slab, valid, gallery_chunk, _score_dtype(score_dtype))

    def masks(owners, real):  # (positive, negative): in each branch, fused into its reductions
        same = query_owners[:, None] == owners[None, :]
        return same & real[None, :], ~same & real[None, :]

    def find(scores, row, owners, real, best, first, counts):
        return *_best_positive(scores, masks(owners, real)[0], row, best, first), counts

    def count(scores, row, owners, real, best, first, counts):
        return best, first, _count_ties(scores, *masks(owners, real), row, best, first, counts)

    def step(block, carry):
        scores, row, real = read(block)
        owners = lax.dynamic_slice_in_dim(slab_owners, block * gallery_chunk, gallery_chunk, 0)
        return lax.cond(counting, count, find, scores, offset + row, owners, real, *carry)

    return _loop(_slab_rows(slab) // gallery_chunk, step, (best, first, counts))


class _Slabs:
    """The gallery streamed to the devices `slab_rows` rows at a time (padded to one shape), so
    neither host nor device ever holds a second copy of a large gallery."""

    def __init__(self, gallery, gallery_chunk: int, slab_rows: int, mesh: Mesh, extra=None):
        self.gallery, self.extra = gallery, extra
        # Slabs and blocks of even sizes (blocks a multiple of 128 when large), so that padding,
        # which is scored like real rows, stays a fraction of a block: 100,000 rows in blocks of
        # at most 16,384 are 7 blocks of 14,336, not 7 of 16,384 (15% more work).
        per_slab = _even_chunks(gallery.shape[0], max(slab_rows, gallery_chunk), 1)[1]
        blocks, self.chunk = _even_chunks(per_slab, gallery_chunk, 1)
        if self.chunk >= 1024:
            self.chunk = -(-self.chunk // 128) * 128
        self.rows = blocks * self.chunk
        self.sharding = parallel.replicated(mesh)

    def __iter__(self):
        for offset in range(0, self.gallery.shape[0], self.rows):
            parts = [self.gallery] + ([] if self.extra is None else [self.extra])
            parts = [np.asarray(p[offset : offset + self.rows]) for p in parts]
            valid = len(parts[0])
            if valid < self.rows:
                parts = [np.concatenate([p, np.zeros((self.rows - valid, *p.shape[1:]), p.dtype)]) for p in parts]
            if parts[0].dtype == np.uint32:  # codes word-major on the device (`codes`: it vectorises)
                parts[0] = np.ascontiguousarray(parts[0].T)
            yield offset, np.int32(valid), [jax.device_put(p, self.sharding) for p in parts]


def _even_chunks(rows: int, limit: int, multiple: int) -> tuple[int, int]:
    """(chunks, rows per chunk): as few chunks as a `limit` allows, of even size rounded up to a
    `multiple` (the devices), so that padding, which is scored like real rows, stays under
    `multiple` rows a chunk: 5,000 queries in chunks of at most 512 are 10 of 500, not 10 of 512."""
    rows = max(rows, 1)
    chunks = -(-rows // max(1, min(limit, rows)))
    return chunks, -(-rows // (chunks * multiple)) * multiple


def _query_chunks(arrays: list[np.ndarray], query_chunk: int, mesh: Mesh) -> list[tuple[int, list]]:
    """(real rows, device arrays) per chunk: padded to one shape, rows split over the devices."""
    count = len(arrays[0])
    query_chunk = _even_chunks(count, query_chunk, mesh.size)[1]
    sharding = parallel.batch_sharding(mesh)
    chunks = []
    for start in range(0, count, query_chunk):
        parts = [np.asarray(a[start : start + query_chunk]) for a in arrays]
        real = len(parts[0])
        if real < query_chunk:  # one compiled shape: pad with copies of the last query
            parts = [np.concatenate([p, np.repeat(p[-1:], query_chunk - real, axis=0)]) for p in parts]
        chunks.append((real, [jax.device_put(p, sharding) for p in parts]))
    return chunks


def _check(queries, gallery) -> None:
    if queries.ndim != 2 or gallery.ndim != 2 or queries.shape[1] != gallery.shape[1]:
        raise ValueError(f"queries {queries.shape} and gallery {gallery.shape} must be [n, dim] alike")
    if (queries.dtype == np.uint32) != (gallery.dtype == np.uint32):
        kinds = ["packed codes (uint32)" if side.dtype == np.uint32 else f"{side.dtype} embeddings"
                 for side in (queries, gallery)]
        raise UserError(f"the queries are {kinds[0]} but the gallery is {kinds[1]}: search codes against codes "
                        "(codes.pack_codes) or embeddings against embeddings")


def top_k(
    queries: np.ndarray,
    gallery: np.ndarray,
    k: int,
    *,
    query_chunk: int = 512,
    gallery_chunk: int = 32768,
    slab_rows: int = 131072,
    score_dtype: str = "float32",
    mesh: Mesh | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product (or, for uint32 codes, by Hamming distance: the scores are
    minus the distances): ([queries, k] scores, [queries, k] gallery indices), best first, ties to
    the lower index. `k` is capped at the gallery size. The default chunks were the fastest measured
    on a 2-core CPU (benchmarks/search_speed.py): few, wide gallery blocks, so few merges per query,
    with a score block (64 MB) that keeps a 1M-vector search under 1.5x its gallery's memory.
    Codes are searched in groups of rows, never a block of scores (`blocks.code_candidates`), and
    `score_dtype` does not apply to them (their scores are exact integers)."""
    queries, mesh = np.asarray(queries), parallel.local_mesh() if mesh is None else mesh
    _check(queries, gallery)
    k = min(k, gallery.shape[0])
    if not len(queries) or not k:
        return np.zeros((len(queries), k), np.float32), np.zeros((len(queries), k), np.int32)
    _score_dtype(score_dtype)
    slabs = _Slabs(gallery, gallery_chunk, slab_rows, mesh)
    # [chunks, size, dim]: padded with copies of the last query, rows split over devices.
    count, size = _even_chunks(len(queries), query_chunk, mesh.size)
    padded = np.concatenate([queries, np.repeat(queries[-1:], count * size - len(queries), axis=0)])
    sharding = NamedSharding(mesh, PartitionSpec(None, parallel.DATA_AXIS))
    stacked = jax.device_put(padded.reshape(count, size, -1), sharding)
    best = (jax.device_put(np.full((count, size, k), -np.inf, np.float32), sharding),
            jax.device_put(np.full((count, size, k), -1, np.int32), sharding))
    for offset, valid, (slab,) in slabs:
        best = _top_k_slab(stacked, slab, valid, np.int32(offset), *best,
                           gallery_chunk=slabs.chunk, score_dtype=score_dtype)
        jax.block_until_ready(best)  # frees this slab before the next is copied: one at a time
    scores, index = (np.asarray(b).reshape(count * size, k)[: len(queries)] for b in best)
    return scores, index


def rank_counts(
    queries: np.ndarray,
    query_owners: np.ndarray,
    gallery: np.ndarray,
    gallery_owners: np.ndarray,
    *,
    query_chunk: int = 1024,
    gallery_chunk: int = 16384,
    slab_rows: int = 131072,
    score_dtype: str = "float32",
    mesh: Mesh | None = None,
) -> TiedRanks:
    """Each query's best positive (a gallery item with the query's owner) against the negatives,
    ties kept apart (`TiedRanks`): two sweeps over the gallery, its best score, then the counts."""
    queries, mesh = np.asarray(queries), parallel.local_mesh() if mesh is None else mesh
    _check(queries, gallery)
    if not len(queries):
        return TiedRanks.exact(np.zeros((0,), np.int64))
    _score_dtype(score_dtype)
    slabs = _Slabs(gallery, gallery_chunk, slab_rows, mesh, np.asarray(gallery_owners, np.int32))
    chunks = _query_chunks([queries, np.asarray(query_owners, np.int32)], query_chunk, mesh)
    rows = chunks[0][1][0].shape[0]
    sharding = parallel.batch_sharding(mesh)
    put = functools.partial(jax.device_put, device=sharding)
    state = [  # (best positive score, its lowest gallery index, counts) per query chunk
        (put(np.full((rows,), -np.inf, np.float32)), put(np.full((rows,), np.iinfo(np.int32).max, np.int32)),
         TiedRanks(*(put(np.zeros((rows,), np.int32)) for _ in TiedRanks._fields)))
        for _ in chunks
    ]
    for counting in (False, True):
        for offset, valid, (slab, slab_owners) in slabs:
            state = [
                _ranks_slab(query, owners, slab, slab_owners, valid, np.int32(offset), counting, *carry,
                            gallery_chunk=slabs.chunk, score_dtype=score_dtype)
                for (_, (query, owners)), carry in zip(chunks, state)
            ]
            jax.block_until_ready(state)
    parts = [[np.asarray(field)[:real] for field in counts] for (real, _), (_, _, counts) in zip(chunks, state)]
    return TiedRanks(*(np.concatenate(field).astype(np.int64) for field in zip(*parts)))


def ranks(queries, query_owners, gallery, gallery_owners, *, ties: str = "index", **options) -> np.ndarray:
    """0-based rank of each query's best positive under the tie policy `ties` (`TiedRanks.ranks`;
    `pessimistic`: the negatives scoring at least as high). `options` go to `rank_counts`."""
    _check_ties(ties)
    return rank_counts(queries, query_owners, gallery, gallery_owners, **options).ranks(ties)
