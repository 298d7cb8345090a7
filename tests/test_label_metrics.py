"""Label mAP and mAP@R (`evaluation/label_metrics.py`) equal an implementation written here from
the definition (plain loops, ties ranked by gallery index), single- and multi-label, in all four
directions, with ties and chunking; `bidirectional_metrics` and the report carry them."""

import numpy as np
import pytest

from vlretrieval.errors import UserError
from vlretrieval.evaluation import metrics
from vlretrieval.evaluation.label_metrics import LABEL_DIRECTIONS, label_average_precision, label_metrics
from vlretrieval.evaluation.report import format_table, markdown_table


def reference_average_precision(queries, query_labels, gallery, gallery_labels, exclude_self):
    """(mAP, mAP@R) in percent from the definition: rank the gallery by score, equal scores by lower
    index; relevant when the label sets intersect; the query itself out of its own gallery."""
    averages, at_rs = [], []
    for q, (query, labels) in enumerate(zip(queries, query_labels)):
        candidates = [g for g in range(len(gallery)) if not (exclude_self and g == q)]
        scores = {g: float(np.dot(gallery[g].astype(np.float64), query.astype(np.float64))) for g in candidates}
        ranking = sorted(candidates, key=lambda g: (-scores[g], g))
        relevant = [bool(set(np.flatnonzero(labels)) & set(np.flatnonzero(gallery_labels[g]))) for g in ranking]
        total = sum(relevant)
        if total == 0:
            continue
        hits, precision_sum, precision_sum_at_r = 0, 0.0, 0.0
        for position, is_relevant in enumerate(relevant, start=1):
            if is_relevant:
                hits += 1
                precision_sum += hits / position
                if position <= total:
                    precision_sum_at_r += hits / position
        averages.append(precision_sum / total)
        at_rs.append(precision_sum_at_r / total)
    return 100 * np.mean(averages), 100 * np.mean(at_rs)


def gallery(multi_label: bool, seed: int = 0):
    """Images on a coarse integer grid (many exactly equal scores: ties), 1-3 captions each, and
    multi-hot labels over 4 categories (multi-label: 0-3 a record, some with none)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(-1, 2, size=(23, 3)).astype(np.float32)
    owners = np.repeat(np.arange(23), rng.integers(1, 4, 23))
    texts = (images[owners] + rng.integers(-1, 2, size=(len(owners), 3))).astype(np.float32)
    if multi_label:
        labels = (rng.random((23, 4)) < 0.3).astype(np.float32)
    else:
        labels = np.eye(4, dtype=np.float32)[rng.integers(0, 4, 23)]
    return images, texts, owners, labels


@pytest.mark.parametrize("multi_label", [False, True])
def test_label_metrics_equal_the_definition_in_all_four_directions(multi_label):
    images, texts, owners, labels = gallery(multi_label)
    text_labels = labels[owners]
    got = label_metrics(images, texts, owners, labels, ("label_map", "label_map_at_r"))
    assert list(got) == list(LABEL_DIRECTIONS)
    pairs = {"image_to_text": (images, labels, texts, text_labels, False),
             "text_to_image": (texts, text_labels, images, labels, False),
             "image_to_image": (images, labels, images, labels, True),
             "text_to_text": (texts, text_labels, texts, text_labels, True)}
    for direction, arguments in pairs.items():
        average, at_r = reference_average_precision(*arguments)
        assert got[direction]["label_mAP"] == pytest.approx(average, rel=1e-5), direction
        assert got[direction]["label_mAP@R"] == pytest.approx(at_r, rel=1e-5), direction
        # Chunks of 3 queries give the same figures (ties are ordered by index, not by chunk).
        assert label_average_precision(*arguments[:4], exclude_self=arguments[4], max_scores_per_chunk=3 * 60) == (
            pytest.approx((got[direction]["label_mAP"], got[direction]["label_mAP@R"]), rel=1e-6))
    # Only the asked metric is reported.
    assert label_metrics(images, texts, owners, labels, ("label_map_at_r",))["text_to_text"].keys() == {"label_mAP@R"}


def test_single_label_cross_modal_label_map_is_map_with_the_category_as_the_label():
    images, texts, owners, labels = gallery(multi_label=False, seed=1)
    categories = labels.argmax(axis=1)
    got = label_metrics(images, texts, owners, labels)
    assert (got["text_to_image"]["label_mAP"], got["text_to_image"]["label_mAP@R"]) == pytest.approx(
        metrics.average_precision(texts, categories[owners], images, categories), rel=1e-6)


def test_a_query_alone_in_its_category_is_left_out_and_itself_never_counts():
    # Image 2 is the only one of category 1: no relevant item once it is left out of its own ranking.
    images = np.array([[1, 0], [0.9, 0.1], [0, 1]], np.float32)
    labels = np.array([[1, 0], [1, 0], [0, 1]], np.float32)
    got = label_metrics(images, images, np.arange(3), labels)
    assert got["image_to_image"]["label_mAP"] == pytest.approx(100.0)
    assert got["image_to_text"]["label_mAP"] == pytest.approx(100.0)


def test_bidirectional_metrics_and_the_report_carry_the_label_metrics():
    images, texts, owners, labels = gallery(multi_label=True)
    chosen = ("recall", "mean_recall", "label_map", "label_map_at_r")
    result = metrics.bidirectional_metrics(images, texts, owners, (1, 5), chosen, image_labels=labels)
    expected = label_metrics(images, texts, owners, labels)
    for direction in LABEL_DIRECTIONS:
        for key, value in expected[direction].items():
            assert result[direction][key] == pytest.approx(value)
    assert "R@1" in result["text_to_image"] and "R@1" not in result["text_to_text"]
    per_language = {"en": result}
    results = {"languages": per_language, "average": metrics.average_over_languages(per_language)}
    table = format_table(results, (1, 5))
    assert "I->I label_mAP" in table and "T->T label_mAP@R" in table and "T->I R@1" in table
    assert "I→T label_mAP" in markdown_table(results).splitlines()[0]
    with pytest.raises(UserError, match="category labels"):
        metrics.bidirectional_metrics(images, texts, owners, (1,), ("label_map",))
    assert metrics.check_metrics(("label_map_at_r",)) == ("label_map_at_r",)
