"""Retrieval metrics on hand-made cases, several captions per image."""

import numpy as np
import pytest

from vlretrieval.evaluation.evaluate import average_over_languages, bidirectional_metrics
from vlretrieval.evaluation.report import format_table
from vlretrieval.evaluation.search import ranks as retrieval_ranks


def _unit(vectors):
    vectors = np.asarray(vectors, np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


# Three images along the axes; two captions each (owner = image index).
IMAGES = _unit(np.eye(3))
TEXT_OWNERS = np.array([0, 0, 1, 1, 2, 2])


def test_perfect_embeddings_give_full_recall():
    texts = _unit(np.eye(3)[TEXT_OWNERS] + 0.01 * np.arange(6)[:, None])
    metrics = bidirectional_metrics(IMAGES, texts, TEXT_OWNERS, (1, 5, 10))
    assert metrics["text_to_image"]["R@1"] == 100.0
    assert metrics["image_to_text"]["R@1"] == 100.0
    assert metrics["mean_recall"] == 100.0
    assert metrics["text_to_image"]["median_rank"] == 1.0


def test_image_to_text_hits_when_any_caption_is_in_top_k():
    # Image 0's first caption points at image 1; its second caption is right.
    texts = _unit([[0.1, 1, 0], [1, 0, 0], [0, 1, 0], [0, 1, 0.1], [0, 0, 1], [0.1, 0, 1]])
    ranks = retrieval_ranks(IMAGES, np.arange(3), texts, TEXT_OWNERS)
    # Image 0's best caption (index 1) scores 1.0 and beats every other caption: rank 0.
    assert ranks.tolist() == [0, 0, 0]
    text_ranks = retrieval_ranks(texts, TEXT_OWNERS, IMAGES, np.arange(3))
    # Caption 0 is closest to image 1, so its own image is second.
    assert text_ranks.tolist() == [1, 0, 0, 0, 0, 0]
    metrics = bidirectional_metrics(IMAGES, texts, TEXT_OWNERS, (1, 2))
    assert metrics["text_to_image"]["R@1"] == pytest.approx(500 / 6)
    assert metrics["text_to_image"]["R@2"] == 100.0
    assert metrics["image_to_text"]["R@1"] == 100.0


def test_image_to_text_rank_counts_only_other_images_captions():
    # All of image 2's captions are far; two captions of image 0 and 1 each score higher.
    texts = _unit([[1, 0, 0.5], [1, 0, 0.6], [0, 1, 0.5], [0, 1, 0.6], [1, 1, 0.2], [1, 1, 0.1]])
    ranks = retrieval_ranks(IMAGES, np.arange(3), texts, TEXT_OWNERS)
    # Image 2 ([0, 0, 1]): own captions score ~0.14; the four others score ~0.45-0.51.
    assert ranks[2] == 4
    metrics = bidirectional_metrics(IMAGES, texts, TEXT_OWNERS, (1, 5))
    assert metrics["image_to_text"]["R@1"] == pytest.approx(200 / 3)
    assert metrics["image_to_text"]["R@5"] == 100.0


def test_ties_count_against_the_model():
    """A collapsed model (every embedding equal) must score chance or worse, never 100%."""
    same = _unit(np.ones((3, 3)))
    texts = _unit(np.ones((6, 3)))
    metrics = bidirectional_metrics(same, texts, TEXT_OWNERS, (1,), ties="pessimistic")
    assert metrics["text_to_image"]["R@1"] == 0.0
    assert metrics["image_to_text"]["R@1"] == 0.0


def test_query_chunking_matches_one_chunk():
    rng = np.random.default_rng(0)
    images = _unit(rng.normal(size=(40, 8)))
    owners = np.repeat(np.arange(40), 5)
    texts = _unit(images[owners] + 0.8 * rng.normal(size=(200, 8)))
    whole = retrieval_ranks(texts, owners, images, np.arange(40), query_chunk=1024)
    chunked = retrieval_ranks(texts, owners, images, np.arange(40), query_chunk=64)
    np.testing.assert_array_equal(whole, chunked)
    # Against a brute-force reference: rank = negatives scoring >= the own image.
    scores = texts @ images.T
    reference = [(np.delete(s, o) >= s[o]).sum() for s, o in zip(scores, owners)]
    np.testing.assert_array_equal(whole, reference)


def test_average_over_languages_and_table():
    texts = _unit(np.eye(3)[TEXT_OWNERS])
    perfect = bidirectional_metrics(IMAGES, texts, TEXT_OWNERS)
    collapsed = bidirectional_metrics(IMAGES, _unit(np.ones((6, 3))), TEXT_OWNERS)
    results = {"languages": {"en": perfect, "de": collapsed}}
    results["average"] = average_over_languages(results["languages"])
    assert results["average"]["text_to_image"]["R@1"] == pytest.approx(
        (perfect["text_to_image"]["R@1"] + collapsed["text_to_image"]["R@1"]) / 2
    )
    table = format_table(results)
    assert "average" in table and "en" in table and "T->I R@1" in table
