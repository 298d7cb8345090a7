"""Exact nearest-neighbour search by blocks on the device: top-k and ranks, never the full matrix.

The gallery is walked in blocks of `gallery_chunk` rows inside one jitted loop; each block's
scores ([query_chunk, gallery_chunk]) are reduced at once (a top-k merged into the running top-k,
or a count), so memory is O(query_chunk x gallery_chunk) whatever the gallery size, and the
gallery is read in place: the last block is a slice that ends at the last row (rows the previous
block already saw are masked), so an unpadded gallery is never copied.

Ties: among equal scores the lower gallery index comes first (as a stable sort), in every block
and in every merge (the running top-k, which holds only lower indices, is merged in first).
Queries are split over the devices of a local mesh (the gallery is replicated on each).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vlretrieval import parallel

SCORE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _score_dtype(name: str):
    if name not in SCORE_DTYPES:
        raise ValueError(f"unknown score dtype {name!r}; choose one of {tuple(SCORE_DTYPES)}")
    return SCORE_DTYPES[name]


def _block_reader(queries: jax.Array, slab: jax.Array, valid: jax.Array, gallery_chunk: int, dtype):
    """`read(b) -> (scores [q, chunk] float32, row in the slab [chunk], row is real [chunk])`."""
    queries = queries.astype(dtype)

    def read(block: jax.Array):
        start = block * gallery_chunk
        rows = lax.dynamic_slice_in_dim(slab, start, gallery_chunk, 0).astype(dtype)
        # float32 accumulation whatever the input dtype: bfloat16 halves the bytes read, not the
        # precision of the sum.
        scores = lax.dot_general(
            queries, rows, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
        )
        row = start + jnp.arange(gallery_chunk, dtype=jnp.int32)
        return scores, row, row < valid

    return read


def _group_size(columns: int, k: int) -> int:
    """Columns per group: about sqrt(columns / k), so that the two selections below (one over the
    columns / group maxima, one over the k x group candidates) are both small; a power of two
    (blocks of 1,024 rows or more are multiples of 128), at most 128."""
    group = 1
    while group < 128 and (2 * group) ** 2 * k <= columns and columns % (2 * group) == 0:
        group *= 2
    return group


def _sort_few(index: jax.Array) -> jax.Array:
    """[rows, k] distinct integers sorted ascending, by ranks: k x k compares that XLA fuses, where
    a sort of k = 10 per row is a slow call on the CPU."""
    k = index.shape[1]
    rank = jnp.sum(index[:, None, :] < index[:, :, None], axis=2)  # how many are smaller
    slot = rank[:, :, None] == jnp.arange(k)[None, None, :]
    return jnp.sum(jnp.where(slot, index[:, :, None], 0), axis=1)


def _block_candidates(scores: jax.Array, k: int):
    """([q, m] scores, [q, m] columns) in column order, m <= columns, that hold the block's top k.

    A full `lax.top_k` over a wide block is a slow row-by-row partial sort on the CPU; this needs
    only a vectorised max over groups of consecutive columns and a top k of those maxima: the k
    best elements lie in the k groups with the highest maxima (equal maxima: lower group first).
    For an element of an unchosen group, each chosen group holds its maximum, which beats it: a
    higher score, or an equal one at a lower column (lower group, and the group's first maximum).
    The chosen groups are put back in column order, so equal scores still go to the lower index."""
    rows, columns = scores.shape
    group = _group_size(columns, k)
    if group < 8:  # a narrow block: its columns are the candidates
        return scores, jnp.broadcast_to(jnp.arange(columns, dtype=jnp.int32), scores.shape)
    grouped = scores.reshape(rows, columns // group, group)
    chosen = _sort_few(lax.top_k(jnp.max(grouped, axis=2), k)[1])  # [rows, k] groups, column order
    candidates = jnp.take_along_axis(grouped, chosen[:, :, None], axis=1).reshape(rows, k * group)
    column = chosen[:, :, None] * group + jnp.arange(group, dtype=jnp.int32)
    return candidates, column.reshape(rows, k * group)


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
        read = _block_reader(queries[chunk], slab, valid, gallery_chunk, _score_dtype(score_dtype))

        def step(block, carry):
            best_scores, best_index = carry
            scores, row, real = read(block)
            scores = jnp.where(real[None, :], scores, -jnp.inf)
            candidates, column = _block_candidates(scores, k)
            # One top k over the running results and the candidates: running results first, so
            # on equal scores top_k keeps the earlier (lower-index) entry.
            merged_scores = jnp.concatenate([best_scores, candidates], axis=1)
            merged_index = jnp.concatenate([best_index, offset + row[column]], axis=1)
            best_scores, chosen = lax.top_k(merged_scores, k)
            return best_scores, jnp.take_along_axis(merged_index, chosen, axis=1)

        best = _loop(slab.shape[0] // gallery_chunk, step, (best_scores[chunk], best_index[chunk]))
        return best_scores.at[chunk].set(best[0]), best_index.at[chunk].set(best[1])

    return _loop(queries.shape[0], chunk_step, (best_scores, best_index))


@functools.partial(jax.jit, static_argnames=("gallery_chunk", "score_dtype"), donate_argnums=(6, 7))
def _ranks_slab(
    queries, query_owners, slab, slab_owners, valid, counting, best, count, *, gallery_chunk: int, score_dtype: str
):
    """One slab of one of two sweeps: the best positive's score (`counting` false), then the
    negatives scoring at least as high. Both sweeps run this one compiled program, so a score is
    bitwise the same as a threshold and when counted (ties must count against the model)."""
    read = _block_reader(queries, slab, valid, gallery_chunk, _score_dtype(score_dtype))

    def step(block, carry):
        best, count = carry
        scores, _, real = read(block)
        owners = lax.dynamic_slice_in_dim(slab_owners, block * gallery_chunk, gallery_chunk, 0)
        same = query_owners[:, None] == owners[None, :]
        block_best = jnp.max(jnp.where(same & real[None, :], scores, -jnp.inf), axis=1)
        beaten = ~same & real[None, :] & (scores >= best[:, None])
        block_count = jnp.sum(beaten, axis=1, dtype=jnp.int32)
        return (
            jnp.where(counting, best, jnp.maximum(best, block_best)),
            jnp.where(counting, count + block_count, count),
        )

    return _loop(slab.shape[0] // gallery_chunk, step, (best, count))


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
    """Exact top-k by inner product: ([queries, k] scores, [queries, k] gallery indices), best
    first, ties to the lower index. `k` is capped at the gallery size. The default chunks were the
    fastest measured on a 2-core CPU (benchmarks/search_speed.py): few, wide gallery blocks, so few
    merges per query, with a score block (64 MB) that keeps a 1M-vector search under 1.5x its
    gallery's memory."""
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


def ranks(
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
) -> np.ndarray:
    """0-based rank of each query's best positive (a gallery item with the query's owner): the
    number of negatives scoring at least as high, so ties count against the model."""
    queries, mesh = np.asarray(queries), parallel.local_mesh() if mesh is None else mesh
    _check(queries, gallery)
    if not len(queries):
        return np.zeros((0,), np.int64)
    _score_dtype(score_dtype)
    slabs = _Slabs(gallery, gallery_chunk, slab_rows, mesh, np.asarray(gallery_owners, np.int32))
    chunks = _query_chunks([queries, np.asarray(query_owners, np.int32)], query_chunk, mesh)
    rows = chunks[0][1][0].shape[0]
    sharding = parallel.batch_sharding(mesh)
    state = [
        (jax.device_put(np.full((rows,), -np.inf, np.float32), sharding),
         jax.device_put(np.zeros((rows,), np.int32), sharding))
        for _ in chunks
    ]
    for counting in (False, True):
        for _, valid, (slab, slab_owners) in slabs:
            state = [
                _ranks_slab(query, owners, slab, slab_owners, valid, counting, *carry,
                            gallery_chunk=slabs.chunk, score_dtype=score_dtype)
                for (_, (query, owners)), carry in zip(chunks, state)
            ]
            jax.block_until_ready(state)
    return np.concatenate([np.asarray(c)[:real] for (real, _), (_, c) in zip(chunks, state)]).astype(np.int64)
