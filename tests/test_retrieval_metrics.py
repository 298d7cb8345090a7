"""Every selectable metric on hand-made cases, and R@K against an independent implementation."""

import numpy as np
import pytest

from vlretrieval.errors import UserError
from vlretrieval.evaluation import metrics
from vlretrieval.evaluation.report import format_table


def unit(vectors):
    vectors = np.asarray(vectors, np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


IMAGES = unit(np.eye(3))
TEXT_OWNERS = np.array([0, 0, 1, 1, 2, 2])
# Image 0's *first* caption points at image 1; its second is right. Everything else is right.
TEXTS = unit([[0.1, 1, 0], [1, 0, 0], [0, 1, 0], [0, 1, 0.1], [0, 0, 1], [0.1, 0, 1]])


def test_default_selection_keeps_the_classic_output():
    result = metrics.bidirectional_metrics(IMAGES, TEXTS, TEXT_OWNERS, (1, 2))
    assert set(result) == {"text_to_image", "image_to_text", "mean_recall"}
    assert set(result["text_to_image"]) == {"R@1", "R@2", "median_rank", "mean_rank"}
    # Caption 0 ranks its image second; the other five first.
    assert result["text_to_image"]["R@1"] == pytest.approx(500 / 6)
    assert result["text_to_image"]["mean_rank"] == pytest.approx(7 / 6)
    assert result["text_to_image"]["median_rank"] == 1.0
    assert result["image_to_text"]["R@1"] == 100.0  # any caption hits
    assert result["mean_recall"] == pytest.approx((500 / 6 + 100 + 100 + 100) / 4)


def test_paired_recall_uses_only_each_images_first_caption():
    result = metrics.bidirectional_metrics(IMAGES, TEXTS, TEXT_OWNERS, (1, 2), ("paired_recall",))
    paired = result["paired"]
    # Pairs (image i, caption 2i): caption 0 is nearer image 1, so 1 of 3 texts misses (1 of 6
    # with all captions); each image still scores its own pair caption highest.
    assert paired["text_to_image"]["R@1"] == pytest.approx(200 / 3)
    assert paired["image_to_text"]["R@1"] == 100.0
    assert paired["text_to_image"]["R@2"] == 100.0
    assert "R@1" not in result["text_to_image"]  # recall was not selected


def test_average_precision_and_map_at_r_by_hand():
    # One query; the gallery ranked by score 5 > 4 > 3 > 2 > 1 with relevance 1, 0, 1, 0, 0.
    gallery = np.array([[5.0], [4.0], [3.0], [2.0], [1.0]], np.float32)
    labels = np.array([7, 0, 7, 0, 0])
    average, at_r = metrics.average_precision(np.ones((1, 1), np.float32), np.array([7]), gallery, labels)
    assert average == pytest.approx(100 * (1 / 1 + 2 / 3) / 2)
    assert at_r == pytest.approx(100 * (1 / 1 + 0) / 2)  # R = 2: only the first two positions
    # A query without positives does not count; a perfect one scores 100.
    average, at_r = metrics.average_precision(
        np.ones((2, 1), np.float32), np.array([7, 3]), gallery, np.array([7, 7, 0, 0, 0])
    )
    assert average == at_r == 100.0


def test_map_both_ways_with_the_owner_as_label():
    result = metrics.bidirectional_metrics(IMAGES, TEXTS, TEXT_OWNERS, (1,), ("map", "map_at_r"))
    # Text -> image: one positive each, AP = 1 / rank: caption 0 has 1/2, the others 1.
    assert result["text_to_image"]["mAP"] == pytest.approx(100 * (0.5 + 5) / 6)
    assert result["text_to_image"]["mAP@R"] == pytest.approx(100 * 5 / 6)
    # Image -> text (own captions 2i, 2i + 1):
    # image 0: scores [.0995, 1, 0, 0, 0, .0995] -> captions 1, 0 (tie with 5: lower index) -> AP 1;
    # image 1: scores [.995, 0, 1, .995, 0, 0] -> captions 2, 0, 3 -> AP (1 + 2/3) / 2, AP@R 1/2;
    # image 2: captions 4, 5 first -> AP 1.
    assert result["image_to_text"]["mAP"] == pytest.approx(100 * (1 + (1 + 2 / 3) / 2 + 1) / 3, rel=1e-5)
    assert result["image_to_text"]["mAP@R"] == pytest.approx(100 * (1 + 0.5 + 1) / 3, rel=1e-5)


def test_hamming_retrieval_ranks_by_sign_agreement_not_cosine():
    images = np.array([[1.0, 1.0, 1.0, 1.0], [1.0, -1.0, 1.0, -1.0]], np.float32)
    # Caption 0 (image 0's) agrees in sign with image 0 everywhere but is closer in cosine to
    # image 1; caption 1 (image 1's) is image 1 itself.
    texts = np.array([[0.05, -0.0, 0.05, 0.0], [1.0, -1.0, 1.0, -1.0]], np.float32)
    texts[0] = [0.9, 0.01, 0.9, 0.01]
    owners = np.array([0, 1])
    np.testing.assert_array_equal(metrics.binary_codes(texts[:1]), [[1, 1, 1, 1]])
    result = metrics.bidirectional_metrics(images, texts, owners, (1,), ("recall", "hamming"))
    assert result["hamming"]["text_to_image"]["R@1"] == 100.0
    assert result["hamming"]["image_to_text"]["mAP"] == 100.0
    # Ties in Hamming distance count against the model: all-positive codes everywhere -> 0.
    same = np.ones((2, 4), np.float32)
    tied = metrics.bidirectional_metrics(same, same, owners, (1,), ("hamming",), ties="pessimistic")
    assert tied["hamming"]["text_to_image"]["R@1"] == 0.0


def test_unknown_metric_is_refused():
    with pytest.raises(UserError, match="unknown metric 'ndgc'"):
        metrics.bidirectional_metrics(IMAGES, TEXTS, TEXT_OWNERS, (1,), ("recall", "ndgc"))


def independent_recall_at_k(queries, query_owners, gallery, gallery_owners, k):
    """R@K from the definition: a hit when any of the K best-scoring gallery items (full sort)
    belongs to the query's owner."""
    hits = 0
    for query, owner in zip(queries, query_owners):
        best = np.argsort(-(gallery @ query))[:k]
        hits += bool(np.any(gallery_owners[best] == owner))
    return 100.0 * hits / len(queries)


def test_recall_matches_an_independent_implementation():
    rng = np.random.default_rng(0)
    images = unit(rng.normal(size=(60, 12)))
    owners = np.repeat(np.arange(60), rng.integers(1, 6, 60))  # 1 to 5 captions per image
    texts = unit(images[owners] + 0.9 * rng.normal(size=(len(owners), 12)))
    recall_at = (1, 5, 10)
    captions = [f"image {owner} caption {n}" for n, owner in enumerate(owners)]  # for ndcg's relevance
    result = metrics.bidirectional_metrics(images, texts, owners, recall_at, metrics.METRICS, captions=captions)
    for k in recall_at:
        assert result["text_to_image"][f"R@{k}"] == pytest.approx(
            independent_recall_at_k(texts, owners, images, np.arange(60), k))
        assert result["image_to_text"][f"R@{k}"] == pytest.approx(
            independent_recall_at_k(images, np.arange(60), texts, owners, k))
    # Every selected metric is there, and the table shows R@K, mAP and mAP@R.
    assert {"paired", "hamming", "mean_recall"} <= set(result) and "NDCG@25" in result["text_to_image"]
    per_language = {"en": result, "de": result}
    table = format_table({"languages": per_language,
                          "average": metrics.average_over_languages(per_language)}, recall_at)
    assert "T->I mAP@R" in table and "I->T R@10" in table
