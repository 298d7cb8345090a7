"""NDCG with ROUGE-L relevance (TERAN's protocol) against an independent implementation written
here from the definitions: LCS by memoised recursion, coco-caption's ROUGE-L F-measure, DCG summed
rank by rank."""

import functools
import math

import numpy as np
import pytest

from vlretrieval.evaluation import relevance
from vlretrieval.evaluation.metrics import bidirectional_metrics

CAPTIONS = [  # two captions per image, images 0..3
    "a red square above a blue circle", "the blue circle is below a red square",
    "a small green cross", "one green cross on a dark background",
    "a red circle", "a large red circle to the left of a square",
    "three shapes: a cross, a circle and a square", "a yellow triangle",
]
OWNERS = np.array([0, 0, 1, 1, 2, 2, 3, 3])


def lcs(a, b):
    @functools.cache
    def length(i, j):
        if i == len(a) or j == len(b):
            return 0
        if a[i] == b[j]:
            return 1 + length(i + 1, j + 1)
        return max(length(i + 1, j), length(i, j + 1))

    return length(0, 0)


def rouge_l(candidate, references, beta=1.2):
    candidate = candidate.lower().replace(":", " ").replace(",", " ").split()
    precision = max(lcs(candidate, r.lower().replace(":", " ").replace(",", " ").split()) / len(candidate)
                    for r in references)
    recall = max(lcs(candidate, r.lower().replace(":", " ").replace(",", " ").split())
                 / len(r.lower().replace(":", " ").replace(",", " ").split()) for r in references)
    if precision == 0 or recall == 0:
        return 0.0
    return (1 + beta**2) * precision * recall / (recall + beta**2 * precision)


def ndcg_reference(scores, relevances, k):
    total = 0.0
    for row_scores, row_relevance in zip(scores, relevances):
        order = sorted(range(len(row_scores)), key=lambda j: (-row_scores[j], j))[:k]
        dcg = sum(row_relevance[j] / math.log2(rank + 2) for rank, j in enumerate(order))
        ideal = sorted(row_relevance, reverse=True)[:k]
        idcg = sum(value / math.log2(rank + 2) for rank, value in enumerate(ideal))
        total += dcg / idcg if idcg > 0 else 0.0
    return 100 * total / len(scores)


def test_rouge_l_matrix_is_coco_captions_rouge_l_against_each_images_captions():
    matrix = relevance.rouge_l_matrix(CAPTIONS, OWNERS, 4, block=3)  # blocks smaller than the set
    for c, caption in enumerate(CAPTIONS):
        for image in range(4):
            references = [CAPTIONS[r] for r in np.flatnonzero(OWNERS == image)]
            assert matrix[c, image] == pytest.approx(rouge_l(caption, references), abs=1e-6), (c, image)
    assert np.all(matrix[np.arange(8), OWNERS] == pytest.approx(1.0))  # a caption is its image's own


def test_ndcg_both_ways_equals_the_reference_on_hand_made_embeddings():
    rng = np.random.default_rng(0)
    images = rng.normal(size=(4, 6)).astype(np.float32)
    texts = (images[OWNERS] + rng.normal(scale=1.5, size=(8, 6))).astype(np.float32)
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    texts /= np.linalg.norm(texts, axis=1, keepdims=True)
    results = bidirectional_metrics(images, texts, OWNERS, metrics=("ndcg",), captions=CAPTIONS, ndcg_at=(2, 25))
    graded = [[rouge_l(c, [CAPTIONS[r] for r in np.flatnonzero(OWNERS == j)]) for j in range(4)] for c in CAPTIONS]
    for k in (2, 25):
        want_t2i = ndcg_reference((texts @ images.T).tolist(), graded, k)
        want_i2t = ndcg_reference((images @ texts.T).tolist(), np.asarray(graded).T.tolist(), k)
        assert results["text_to_image"][f"NDCG@{k}"] == pytest.approx(want_t2i, abs=1e-4)
        assert results["image_to_text"][f"NDCG@{k}"] == pytest.approx(want_i2t, abs=1e-4)
    assert 0 < results["text_to_image"]["NDCG@2"] < 100
    with pytest.raises(ValueError, match="needs the captions"):
        bidirectional_metrics(images, texts, OWNERS, metrics=("ndcg",))


def test_a_perfect_ranking_scores_100_and_the_worst_less():
    graded = np.array([[1.0, 0.5, 0.0], [0.2, 1.0, 0.4]], np.float32)
    best = np.argsort(-graded, axis=1)
    assert relevance.ndcg(best, graded, 3) == pytest.approx(100.0)
    assert relevance.ndcg(best[:, ::-1].copy(), graded, 3) < 100.0
    assert relevance.ndcg(best, np.zeros_like(graded), 3) == 0.0
