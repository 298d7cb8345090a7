"""Packed binary codes: packing, and the on-device search by Hamming distance (XOR + population
count) against numpy from the definition (the number of differing bits), ties included."""

import jax
import numpy as np
import pytest

from vlretrieval import parallel
from vlretrieval.errors import UserError
from vlretrieval.evaluation import blocks, codes, search


def tied_bits(rng, rows: int, bits: int, distinct: int = 40) -> np.ndarray:
    """[rows, bits] booleans drawn from `distinct` codes: duplicates everywhere, so equal
    distances (ties) at every rank."""
    pool = rng.random((distinct, bits)) < 0.5
    return pool[rng.integers(0, distinct, rows)]


def reference_distances(query_bits: np.ndarray, gallery_bits: np.ndarray) -> np.ndarray:
    """Hamming distance by its definition: how many bit positions differ."""
    return (query_bits[:, None, :] != gallery_bits[None, :, :]).sum(axis=2)


def reference_top_k(query_bits, gallery_bits, k):
    distance = reference_distances(query_bits, gallery_bits)
    order = np.argsort(distance, axis=1, kind="stable")[:, :k]  # equal distances: lower index first
    return -np.take_along_axis(distance, order, axis=1).astype(np.float32), order


def reference_counts(distance: np.ndarray, positive: np.ndarray) -> dict:
    """`TiedRanks` fields from distances (lower is better), for queries with a positive."""
    best = np.where(positive, distance, np.iinfo(np.int64).max).min(axis=1, keepdims=True)
    at_best = distance == best
    first = np.argmax(positive & at_best, axis=1)[:, None]  # the lowest-index best positive
    before = np.arange(distance.shape[1])[None, :] < first
    return {"above": (~positive & (distance < best)).sum(axis=1),
            "tied": (~positive & at_best).sum(axis=1),
            "tied_positives": (positive & at_best).sum(axis=1),
            "tied_before": (~positive & at_best & before).sum(axis=1)}


@pytest.mark.parametrize("bits", [1, 8, 12, 16, 31, 32, 33, 64, 100, 128])
def test_pack_unpack_round_trip_with_zero_padding(bits):
    rng = np.random.default_rng(bits)
    bools = rng.random((7, bits)) < 0.5
    words = codes.pack_codes(bools)
    assert words.dtype == np.uint32 and words.shape == (7, -(-bits // 32))
    np.testing.assert_array_equal(codes.unpack_codes(words, bits), bools)
    # Bit i is bit i % 32 of word i // 32; the padding bits of the last word are zero.
    for i in range(bits):
        np.testing.assert_array_equal((words[:, i // 32] >> np.uint32(i % 32)) & 1, bools[:, i])
    padding = words.shape[1] * 32 - bits
    if padding:
        assert not (words[:, -1] >> np.uint32(32 - padding)).any()
    # Float embeddings: a coordinate >= 0 is a 1 bit (metrics.binary_codes' +1).
    floats = rng.standard_normal((7, bits)).astype(np.float32)
    floats[0, 0] = 0.0
    np.testing.assert_array_equal(codes.unpack_codes(codes.pack_codes(floats), bits), floats >= 0)


@pytest.mark.parametrize(
    "bits,gallery_size,k,query_chunk,gallery_chunk,slab_rows,group",
    [
        (16, 9_999, 5, 16, 2048, 4096, 16),  # grouped code path: 3 slabs of 2 blocks of 1,792 rows
        (32, 20_011, 10, 64, 16384, 16384, 16),  # 2 slabs of one block (10,112 rows, 10,006 real)
        (64, 20_003, 1, 8, 32768, 32768, 64),  # k = 1: the largest code group (128 before the cap)
        (64, 6_001, 10, 16, 2048, 4096, 8),  # the smallest code group
        (128, 3_001, 7, 32, 256, 512, 1),  # narrow blocks: the whole block scored, then picked from
        (64, 37, 50, 8, 16, 16, 1),  # k above the gallery size: capped
    ],
)
def test_top_k_equals_numpy_with_ties(bits, gallery_size, k, query_chunk, gallery_chunk, slab_rows, group):
    rng = np.random.default_rng(gallery_size)
    query_bits, gallery_bits = rng.random((21, bits)) < 0.5, tied_bits(rng, gallery_size, bits)
    query_bits[:3] = gallery_bits[[0, gallery_size // 2, gallery_size - 1]]  # exact matches, last row too
    queries, gallery = codes.pack_codes(query_bits), codes.pack_codes(gallery_bits)
    chunk = search._Slabs(gallery, gallery_chunk, slab_rows, parallel.local_mesh()).chunk
    assert blocks.code_group_size(chunk, min(k, gallery_size), gallery.shape[1]) == group  # the path named
    scores, index = search.top_k(queries, gallery, k, query_chunk=query_chunk, gallery_chunk=gallery_chunk,
                                 slab_rows=slab_rows)
    want_scores, want_index = reference_top_k(query_bits, gallery_bits, min(k, gallery_size))
    np.testing.assert_array_equal(index, want_index)
    np.testing.assert_array_equal(scores, want_scores)


def test_code_groups_stay_small_enough_to_vectorise():
    assert blocks.code_group_size(32768, 10, 2) == 32  # the default chunk, 64-bit codes
    assert blocks.code_group_size(32768, 10, 4) == 32  # 128-bit: 32 x 5 <= 192
    assert blocks.code_group_size(32768, 10, 8) == 16
    assert blocks.code_group_size(32768, 10, 32) < 8  # 1,024-bit codes: the block path


def test_all_equal_distances_keep_gallery_order():
    """Every gallery code the same: the top k are rows 0..k-1 in order, in every block and merge."""
    gallery = codes.pack_codes(np.ones((5000, 64), bool))
    queries = codes.pack_codes(np.random.default_rng(0).random((9, 64)) < 0.5)
    for k in (1, 10, 33):
        _, index = search.top_k(queries, gallery, k, gallery_chunk=2048, slab_rows=2048)
        np.testing.assert_array_equal(index, np.broadcast_to(np.arange(k), (9, k)))


def test_rank_counts_and_ranks_equal_the_reference():
    rng = np.random.default_rng(7)
    bits = 64
    query_bits, gallery_bits = tied_bits(rng, 37, bits, 12), tied_bits(rng, 1_203, bits, 12)
    query_owners, gallery_owners = rng.integers(0, 30, 37), rng.integers(0, 30, 1_203)
    query_owners[0] = gallery_owners[-1]  # a positive in the last, padded slab
    counts = search.rank_counts(codes.pack_codes(query_bits), query_owners, codes.pack_codes(gallery_bits),
                                gallery_owners, query_chunk=8, gallery_chunk=128, slab_rows=384)
    distance = reference_distances(query_bits, gallery_bits)
    positive = query_owners[:, None] == gallery_owners[None, :]
    has = positive.any(axis=1)
    want = reference_counts(distance[has], positive[has])
    for field, values in want.items():
        np.testing.assert_array_equal(getattr(counts, field)[has], values, err_msg=field)
    assert counts.tied.sum() > 0  # the data holds ties
    np.testing.assert_array_equal(
        search.ranks(codes.pack_codes(query_bits), query_owners, codes.pack_codes(gallery_bits), gallery_owners,
                     ties="pessimistic", gallery_chunk=128)[has], want["above"] + want["tied"])


def test_eight_devices_equal_one():
    rng = np.random.default_rng(8)
    queries = codes.pack_codes(tied_bits(rng, 45, 64))
    gallery = codes.pack_codes(tied_bits(rng, 6_001, 64))
    owners, gallery_owners = rng.integers(0, 50, 45), rng.integers(0, 50, 6_001)
    options = dict(query_chunk=16, gallery_chunk=2048, slab_rows=4096)
    assert len(jax.devices()) == 8
    eight = search.top_k(queries, gallery, 10, mesh=parallel.make_mesh(8), **options)
    one = search.top_k(queries, gallery, 10, mesh=parallel.make_mesh(1), **options)
    np.testing.assert_array_equal(eight[0], one[0])
    np.testing.assert_array_equal(eight[1], one[1])
    eight = search.rank_counts(queries, owners, gallery, gallery_owners, mesh=parallel.make_mesh(8), **options)
    one = search.rank_counts(queries, owners, gallery, gallery_owners, mesh=parallel.make_mesh(1), **options)
    for a, b in zip(eight, one):
        np.testing.assert_array_equal(a, b)


def test_a_million_64_bit_codes_take_8_mb():
    packed = codes.pack_codes(np.zeros((1_000_000, 64), bool))
    assert packed.nbytes == 8_000_000 and codes.bytes_per_item(64) == 8
    assert [codes.bytes_per_item(b) for b in (16, 32, 128)] == [4, 4, 16]


@pytest.mark.parametrize("bits", [12, 0, -8, 7, 8.0, True])
def test_code_length_not_a_multiple_of_8_is_one_line(bits):
    with pytest.raises(UserError, match="multiple of 8") as error:
        codes.check_code_bits(bits)
    assert "\n" not in str(error.value)


def test_code_lengths_that_are_multiples_of_8_pass():
    assert [codes.check_code_bits(b) for b in (8, 16, 32, 64, 128, 24)] == [8, 16, 32, 64, 128, 24]


def test_codes_against_float_embeddings_is_one_line():
    gallery = codes.pack_codes(np.ones((10, 64), bool))
    with pytest.raises(UserError, match="packed codes") as error:
        search.top_k(np.ones((2, 2), np.float32), gallery, 1)
    assert "\n" not in str(error.value)
