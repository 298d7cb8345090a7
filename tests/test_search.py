"""Chunked on-device top-k and ranks against brute-force numpy, ties included."""

import jax
import numpy as np
import pytest

from vlretrieval import parallel
from vlretrieval.evaluation import blocks, search


def reference_top_k(queries, gallery, k):
    scores = queries.astype(np.float64) @ gallery.astype(np.float64).T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # equal scores: lower index first
    return np.take_along_axis(scores, order, axis=1), order


def tied_data(rng, queries, gallery, dim):
    """Small integers: many exact ties, and every dot product exact in float32 and bfloat16."""
    return (rng.integers(-2, 3, (queries, dim)).astype(np.float32),
            rng.integers(-2, 3, (gallery, dim)).astype(np.float32))


@pytest.mark.parametrize(
    "gallery_size,k,query_chunk,gallery_chunk,slab_rows",
    [
        (1001, 7, 16, 100, 300),  # several slabs, a padded last block and slab
        (12000, 10, 64, 6144, 12288),  # the grouped block top-k path (2 blocks of 6,016 = 47 groups)
        (37, 50, 8, 16, 16),  # k above the gallery size: capped
    ],
)
def test_top_k_equals_numpy_with_ties(gallery_size, k, query_chunk, gallery_chunk, slab_rows):
    rng = np.random.default_rng(gallery_size)
    queries, gallery = tied_data(rng, 45, gallery_size, 4)
    scores, index = search.top_k(
        queries, gallery, k, query_chunk=query_chunk, gallery_chunk=gallery_chunk, slab_rows=slab_rows
    )
    want_scores, want_index = reference_top_k(queries, gallery, min(k, gallery_size))
    np.testing.assert_array_equal(index, want_index)
    np.testing.assert_array_equal(scores, want_scores)


def test_top_k_on_random_floats_and_bfloat16_scoring():
    rng = np.random.default_rng(0)
    queries = rng.standard_normal((30, 16)).astype(np.float32)
    gallery = rng.standard_normal((3000, 16)).astype(np.float32)
    scores, index = search.top_k(queries, gallery, 5, gallery_chunk=1024)
    want_scores, want_index = reference_top_k(queries, gallery, 5)
    np.testing.assert_array_equal(index, want_index)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-5)
    # bfloat16 inputs, float32 sums: exact on integers, which bfloat16 holds exactly.
    queries, gallery = tied_data(rng, 20, 3000, 8)
    _, index = search.top_k(queries, gallery, 5, gallery_chunk=1024, score_dtype="bfloat16")
    np.testing.assert_array_equal(index, reference_top_k(queries, gallery, 5)[1])
    with pytest.raises(ValueError, match="score dtype"):
        search.top_k(queries, gallery, 5, score_dtype="float8")


def test_top_k_with_queries_split_over_eight_devices_matches_one():
    rng = np.random.default_rng(1)
    queries, gallery = tied_data(rng, 21, 700, 4)
    eight = search.top_k(queries, gallery, 6, query_chunk=16, gallery_chunk=128,
                         mesh=parallel.make_mesh(8))
    one = search.top_k(queries, gallery, 6, query_chunk=16, gallery_chunk=128,
                       mesh=parallel.make_mesh(1))
    assert len(jax.devices()) == 8
    np.testing.assert_array_equal(eight[1], one[1])
    np.testing.assert_array_equal(eight[1], reference_top_k(queries, gallery, 6)[1])


def test_ranks_equal_brute_force_with_ties_against_the_model():
    rng = np.random.default_rng(2)
    queries, gallery = tied_data(rng, 50, 900, 3)
    query_owners, gallery_owners = rng.integers(0, 40, 50), rng.integers(0, 40, 900)
    got = search.ranks(queries, query_owners, gallery, gallery_owners, ties="pessimistic",
                       query_chunk=16, gallery_chunk=128, slab_rows=256)
    scores = queries @ gallery.T
    positive = query_owners[:, None] == gallery_owners[None, :]
    best = np.where(positive, scores, -np.inf).max(axis=1, keepdims=True)
    np.testing.assert_array_equal(got, ((scores >= best) & ~positive).sum(axis=1))


def test_grouped_block_top_k_with_ties_across_group_boundaries():
    """The block top k by group maxima: equal scores in many groups, runs straddling group edges
    and a k-th score shared by more groups than k: still the numpy (stable) order."""
    assert blocks.group_size(4096, 10) == 16  # 256 groups: the grouped path
    rng = np.random.default_rng(3)
    levels = rng.integers(0, 3, (4096, 1)).astype(np.float32)  # three scores, ~1,365 rows each
    runs = np.zeros((4096, 1), np.float32)
    for edge in (16, 48, 1024, 4080):  # 3s straddling group boundaries, later than many 2s
        runs[edge - 2 : edge + 2] = 1
    gallery = np.concatenate([levels + runs, np.zeros((4096, 1), np.float32)], axis=1)
    queries = np.array([[1, 0], [-1, 0], [0, 1], [2, 5]], np.float32)  # best, worst, all tied, mixed
    for k in (1, 10, 37):
        scores, index = search.top_k(queries, gallery, k, gallery_chunk=4096, slab_rows=4096)
        want_scores, want_index = reference_top_k(queries, gallery, k)
        np.testing.assert_array_equal(index, want_index)
        np.testing.assert_array_equal(scores, want_scores)


@pytest.mark.parametrize(
    "rows,limit,devices,expected",
    [(5000, 512, 1, (10, 500)), (5000, 512, 8, (10, 504)), (3, 512, 8, (1, 8)), (512, 512, 1, (1, 512))],
)
def test_query_chunks_are_even_so_padding_stays_under_a_row_per_device(rows, limit, devices, expected):
    chunks, size = search._even_chunks(rows, limit, devices)
    assert (chunks, size) == expected
    assert chunks * size >= rows and chunks * size - rows < chunks * devices
