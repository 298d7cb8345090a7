"""The tie policy (`config.eval.ties`) against independent plain-numpy definitions: every policy on a
gallery with duplicate captions across images and on Hamming scores, the on-device search, the
rerank path and evaluate_split end to end; the expected-rank distribution exactly."""

import math
from fractions import Fraction
from itertools import combinations

import jax.numpy as jnp
import numpy as np
import pytest

from configs.demo import get_config
from vlretrieval import parallel
from vlretrieval.errors import UserError
from vlretrieval.evaluation import metrics, rerank, search
from vlretrieval.evaluation.evaluate import evaluate_split

POLICIES = ("pessimistic", "optimistic", "expected", "index")
RECALL_AT = (1, 2, 5)


# --- The independent reference: one query at a time, from the definitions. ---


def reference_query(keys: np.ndarray, positive: np.ndarray, policy: str, recall_at=RECALL_AT):
    """(0-based rank, {K: hit or hit probability}) of one query: `keys` [items, levels] are
    compared lexicographically, higher first (plain scores: one level)."""
    rows = [tuple(row) for row in keys.tolist()]
    best = max(row for row, p in zip(rows, positive) if p)
    above = sum(row > best for row, p in zip(rows, positive) if not p)
    tied = sum(row == best for row, p in zip(rows, positive) if not p)
    tied_positives = sum(row == best for row, p in zip(rows, positive) if p)
    if policy == "index":
        # CLIP_benchmark: a hit at K iff a positive is in the top K of a stable sort by (-score, index).
        order = np.lexsort([np.arange(len(rows))] + [-keys[:, level] for level in reversed(range(keys.shape[1]))])
        rank = int(np.argmax(positive[order]))
        return rank, {k: float(positive[order[:k]].any()) for k in recall_at}
    if policy == "expected":
        # Every set of positions of the tied positives among the tied slots is equally likely.
        assert math.comb(tied + tied_positives, tied_positives) < 10**5, "too many ties to enumerate"
        firsts = [placement[0] for placement in combinations(range(tied + tied_positives), tied_positives)]
        rank = above + Fraction(sum(firsts), len(firsts))
        return rank, {k: Fraction(sum(above + first < k for first in firsts), len(firsts)) for k in recall_at}
    rank = above + tied if policy == "pessimistic" else above
    return rank, {k: float(rank < k) for k in recall_at}


def reference_metrics(keys: np.ndarray, positive: np.ndarray, policy: str, recall_at=RECALL_AT) -> dict:
    """R@K (percent), median and mean 1-based rank over the queries: keys [queries, items, levels]."""
    per_query = [reference_query(k, p, policy, recall_at) for k, p in zip(keys, positive)]
    ranks = np.array([float(rank) for rank, _ in per_query])
    result = {f"R@{k}": 100.0 * float(np.mean([float(hits[k]) for _, hits in per_query])) for k in recall_at}
    return {**result, "median_rank": float(np.median(ranks) + 1), "mean_rank": float(np.mean(ranks) + 1)}


def reference_counts(scores: np.ndarray, positive: np.ndarray) -> dict:
    """Above, tied, tied positives and tied negatives before the lowest-index tied positive, by loops."""
    counts = {"above": [], "tied": [], "tied_positives": [], "tied_before": []}
    for row, pos in zip(scores, positive):
        best = row[pos].max()
        first = min(i for i in range(len(row)) if pos[i] and row[i] == best)
        counts["above"].append(sum(s > best for s, p in zip(row, pos) if not p))
        counts["tied"].append(sum(s == best for s, p in zip(row, pos) if not p))
        counts["tied_positives"].append(sum(s == best for s, p in zip(row, pos) if p))
        counts["tied_before"].append(sum(row[i] == best and not pos[i] for i in range(first)))
    return counts


# --- Galleries full of ties: small integers, so every score is exact on any device. ---


def duplicate_caption_gallery(seed: int = 0):
    """8 images (two identical), 1-3 captions each; every third caption is one shared template
    (the same caption under different images), the rest coordinates in {-1, 0, 1}."""
    rng = np.random.default_rng(seed)
    images = rng.integers(-1, 2, (8, 3)).astype(np.float32)
    images[5] = images[2]
    owners = np.repeat(np.arange(8), rng.integers(1, 4, 8))
    texts = rng.integers(-1, 2, (len(owners), 3)).astype(np.float32)
    texts[::3] = [1, 1, -1]
    return images, texts, owners


def both_ways_reference(images, texts, owners, policy):
    scores = texts @ images.T  # [texts, images]
    positive = owners[:, None] == np.arange(len(images))[None, :]
    return {
        "text_to_image": reference_metrics(scores[..., None], positive, policy),
        "image_to_text": reference_metrics(scores.T[..., None], positive.T, policy),
    }


def assert_metrics_match(got: dict, want: dict) -> None:
    for direction, values in want.items():
        for name, value in values.items():
            assert got[direction][name] == pytest.approx(value, abs=1e-9), (direction, name)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("seed", [0, 1])
def test_each_policy_matches_the_reference_on_duplicate_captions(policy, seed):
    images, texts, owners = duplicate_caption_gallery(seed)
    got = metrics.bidirectional_metrics(images, texts, owners, RECALL_AT, ("recall", "rank"), ties=policy)
    assert_metrics_match(got, both_ways_reference(images, texts, owners, policy))


@pytest.mark.parametrize("policy", POLICIES)
def test_hamming_metrics_follow_the_policy(policy):
    rng = np.random.default_rng(3)
    images = rng.normal(size=(8, 3)).astype(np.float32)  # 3 bits: 8 codes, Hamming scores tie a lot
    owners = np.repeat(np.arange(8), 2)
    texts = (images[owners] + rng.normal(size=(16, 3))).astype(np.float32)
    got = metrics.bidirectional_metrics(images, texts, owners, RECALL_AT, ("hamming",), ties=policy)["hamming"]
    codes = lambda x: np.where(x >= 0, 1.0, -1.0)  # noqa: E731
    want = both_ways_reference(codes(images), codes(texts), owners, policy)
    for direction in want:
        for k in RECALL_AT:
            assert got[direction][f"R@{k}"] == pytest.approx(want[direction][f"R@{k}"], abs=1e-9)


def test_a_caption_shared_by_every_image():
    """Every image's only caption is the same text: R@1 is structurally 0 when ties count against
    the model, 1 / n in gallery order and in expectation, 100 when they never count."""
    images = np.eye(4, dtype=np.float32)
    texts = np.ones((4, 4), np.float32)
    want = {"pessimistic": 0.0, "index": 25.0, "expected": 25.0, "optimistic": 100.0}
    for policy, r1 in want.items():
        got = metrics.bidirectional_metrics(images, texts, np.arange(4), (1,), ("recall",), ties=policy)
        # Both ways: every caption also scores every image alike.
        assert got["image_to_text"]["R@1"] == got["text_to_image"]["R@1"] == pytest.approx(r1), policy


def test_pessimistic_is_the_old_rank():
    """`pessimistic` is the behaviour before the policy: negatives scoring >= the best positive."""
    images, texts, owners = duplicate_caption_gallery(2)
    scores = texts @ images.T
    positive = owners[:, None] == np.arange(len(images))[None, :]
    best = np.where(positive, scores, -np.inf).max(axis=1, keepdims=True)
    old = ((scores >= best) & ~positive).sum(axis=1)
    np.testing.assert_array_equal(search.ranks(texts, owners, images, np.arange(8), ties="pessimistic"), old)
    np.testing.assert_array_equal(rerank.ranks_from_scores(scores, owners, np.arange(8), ties="pessimistic"), old)
    got = metrics.bidirectional_metrics(images, texts, owners, RECALL_AT, ties="pessimistic")
    for k in RECALL_AT:
        assert got["text_to_image"][f"R@{k}"] == pytest.approx(100 * np.mean(old < k))


# --- The on-device sweep and the dense (rerank) path. ---


@pytest.mark.parametrize("score_dtype", ["float32", "bfloat16"])
def test_device_counts_equal_the_reference_across_slabs_and_blocks(score_dtype):
    rng = np.random.default_rng(4)
    queries = rng.integers(-1, 2, (37, 3)).astype(np.float32)
    gallery = rng.integers(-1, 2, (203, 3)).astype(np.float32)  # 27 distinct vectors: ties everywhere
    query_owners, gallery_owners = rng.integers(0, 30, 37), rng.integers(0, 30, 203)
    query_owners[0] = gallery_owners[-1]  # a positive only in the last, padded slab
    counts = search.rank_counts(queries, query_owners, gallery, gallery_owners, query_chunk=8,
                                gallery_chunk=16, slab_rows=48, score_dtype=score_dtype)
    scores = queries @ gallery.T
    positive = query_owners[:, None] == gallery_owners[None, :]
    has_positive = positive.any(axis=1)
    want = reference_counts(scores[has_positive], positive[has_positive])
    for field, values in want.items():
        np.testing.assert_array_equal(getattr(counts, field)[has_positive], values, err_msg=field)
    dense = rerank.tied_ranks(scores, positive)
    for policy in POLICIES:
        np.testing.assert_array_equal(
            search.ranks(queries, query_owners, gallery, gallery_owners, ties=policy, query_chunk=8,
                         gallery_chunk=16, slab_rows=48, score_dtype=score_dtype),
            dense.ranks(policy), err_msg=policy)
        if policy != "expected":  # too many tied positives here to enumerate; its counts are checked
            want_ranks = [reference_query(s[:, None], p, policy)[0] for s, p in zip(scores, positive) if p.any()]
            np.testing.assert_array_equal(dense.ranks(policy)[has_positive], want_ranks, err_msg=policy)


def test_the_best_positive_is_tied_with_itself_on_float_scores():
    """Both sweeps score bitwise alike: on random floats each query's best positive is found again
    as a tied positive (a drift between the sweeps would leave it above or below itself)."""
    rng = np.random.default_rng(5)
    queries, gallery = rng.normal(size=(50, 16)).astype(np.float32), rng.normal(size=(900, 16)).astype(np.float32)
    query_owners, gallery_owners = rng.integers(0, 100, 50), rng.integers(0, 100, 900)
    query_owners[:] = gallery_owners[rng.integers(0, 900, 50)]
    for score_dtype in ("float32", "bfloat16"):
        counts = search.rank_counts(queries, query_owners, gallery, gallery_owners, query_chunk=16,
                                    gallery_chunk=128, slab_rows=256, score_dtype=score_dtype)
        assert (counts.tied_positives >= 1).all(), score_dtype


@pytest.mark.parametrize("policy", POLICIES)
def test_reranked_ranks_follow_the_policy(policy):
    """The shortlist re-ordered by joint score, then everything else by tower score: the reference
    ranks lexicographic keys (in the shortlist: (1, joint score), elsewhere (0, tower score))."""
    rng = np.random.default_rng(6)
    tower = rng.integers(0, 3, (30, 12)).astype(np.float32)
    query_owners, gallery_owners = rng.integers(0, 6, 30), rng.integers(0, 6, 12)
    query_owners[:] = gallery_owners[rng.integers(0, 12, 30)]
    for k in (1, 4, 12):
        candidates = rerank.shortlist(tower, k)
        joint = rng.integers(0, 3, candidates.shape).astype(np.float32)
        keys = np.stack([np.zeros_like(tower), tower], axis=2)
        for query, row in enumerate(candidates):
            keys[query, row] = np.stack([np.ones(len(row)), joint[query]], axis=1)
        positive = query_owners[:, None] == gallery_owners[None, :]
        tied = rerank.reranked_tied_ranks(tower, candidates, joint, query_owners, gallery_owners)
        np.testing.assert_array_equal(
            rerank.reranked_ranks(tower, candidates, joint, query_owners, gallery_owners, ties=policy),
            tied.ranks(policy))
        want = reference_metrics(keys, positive, policy)
        got = metrics.recall_metrics(tied, RECALL_AT, policy)
        for name, value in want.items():
            assert got[name] == pytest.approx(value, abs=1e-9), (k, name)


# --- The expected rank's distribution, exactly. ---


@pytest.mark.parametrize("above,tied,positives", [(0, 0, 1), (0, 3, 1), (1, 4, 2), (2, 9, 3), (0, 40, 5), (7, 2, 1)])
def test_expected_hit_rate_is_the_exact_distribution(above, tied, positives):
    """P(X = x) = C(t + p - 1 - x, p - 1) / C(t + p, p): its sum, its mean t / (p + 1), and every
    P(rank < K), in exact fractions against `metrics.hit_rate` and the mean rank."""
    total = math.comb(tied + positives, positives)
    pmf = [Fraction(math.comb(tied + positives - 1 - x, positives - 1), total) for x in range(tied + 1)]
    assert sum(pmf) == 1
    assert sum(x * p for x, p in enumerate(pmf)) == Fraction(tied, positives + 1)
    ranks = search.TiedRanks(*(np.array([v]) for v in (above, tied, positives, 0)))
    assert ranks.ranks("expected")[0] == pytest.approx(above + tied / (positives + 1), abs=1e-12)
    for k in range(0, above + tied + 3):
        want = sum(p for x, p in enumerate(pmf) if above + x < k)
        assert metrics.hit_rate(ranks, k, "expected")[0] == pytest.approx(float(want), abs=1e-12), k


# --- The setting: config, refusal, results. ---


def test_unknown_policy_is_refused_in_one_line():
    images, texts, owners = duplicate_caption_gallery()
    with pytest.raises(UserError) as error:
        metrics.bidirectional_metrics(images, texts, owners, (1,), ties="random")
    message = str(error.value)
    assert "\n" not in message and "config.eval.ties" in message and "'random'" in message
    assert all(policy in message for policy in POLICIES)
    with pytest.raises(UserError, match="config.eval.ties"):
        metrics.check_ties("Index")
    assert get_config().eval.ties == metrics.DEFAULT_TIES == "index"


class IntegerModel:
    """A parameter-free stand-in: an image's embedding is its first pixel (+-1 per channel), a
    caption's a fixed integer vector per word, the joint score their inner product; so every score
    is exact and equal captions tie exactly."""

    table = jnp.array([[1, 1, -1], [1, 0, 0], [0, 1, 0], [0, 0, 1], [-1, 1, 1]], jnp.float32)

    def apply(self, variables, *inputs, method):
        return method(*inputs)

    def encode_image(self, images):
        return images[:, 0, 0, :]

    def encode_text(self, ids, mask):
        return self.table[ids[:, 0]]

    def joint_forward(self, ids, mask, images):
        score = jnp.sum(self.encode_text(ids, mask) * self.encode_image(images), axis=1)
        return {"itm_logits": jnp.stack([jnp.zeros_like(score), score], axis=1)}


class WordTokenizer:
    words = ("template", "red", "green", "blue", "other")

    def encode(self, texts, max_length):
        ids = np.array([[self.words.index(t)] * max_length for t in texts], np.int32)
        return ids, np.ones_like(ids)


def test_evaluate_split_uses_and_records_the_policy_in_every_mode():
    pixels = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0]], np.uint8)
    split = {"images": np.broadcast_to(pixels[:, None, None, :], (4, 2, 2, 3)).copy(),
             "captions": {"en": [["template", "red"], ["template"], ["blue", "template"], ["other"]]}}
    owners = np.repeat(np.arange(4), [2, 1, 2, 1])
    texts = np.asarray(IntegerModel.table)[[0, 1, 0, 3, 0, 4]]
    images = pixels.astype(np.float32) / 127.5 - 1
    for policy in POLICIES:
        want = both_ways_reference(images, texts, owners, policy)
        for mode in ("towers", "joint", "rerank"):
            results = evaluate_split(
                IntegerModel(), {"unused": np.zeros(1, np.float32)}, split, WordTokenizer(),
                mesh=parallel.make_mesh(1), batch_size=4, max_text_length=2, recall_at=RECALL_AT, mode=mode,
                shortlist_size=6, pair_batch_size=4, ties=policy)
            assert results["ties"] == policy
            assert_metrics_match(results["languages"]["en"], want)
    with pytest.raises(UserError, match="config.eval.ties"):
        evaluate_split(IntegerModel(), {}, split, WordTokenizer(), mesh=parallel.make_mesh(1), batch_size=4,
                       max_text_length=2, ties="bogus")
