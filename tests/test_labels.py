"""Category labels of records (vlretrieval/data/labels.py): the demo scenes' derived labels on
hand-made descriptions, and training batches that carry each example's own labels in every
epoch (the batch `index` is the record's position, not grain's repeated index)."""

import numpy as np
import pytest

from tests.test_input_pipeline import WORDS, records
from vlretrieval.data import labels, pipeline
from vlretrieval.data.builders.scenes import SHAPES
from vlretrieval.data.tokenizer import TextTokenizer, train_wordpiece_tokenizer
from vlretrieval.errors import UserError


def test_the_dominant_shape_covers_the_largest_area_and_ties_go_to_the_first_named():
    shape = lambda description: SHAPES[labels.demo_labels(description, "dominant_shape")[0]]  # noqa: E731
    assert shape("small red circle") == "circle"
    # One large square (23^2 pixels of box) outweighs two small circles (2 x 13^2).
    assert shape("left-to-right: small red circle, large blue square, small green circle") == "square"
    # Two small circles (2 x 13^2 = 338) do not outweigh one large square (23^2 = 529).
    assert shape("top-to-bottom: small red circle, small blue circle, large green square") == "square"
    assert shape("left-to-right: large red cross, large blue diamond") == "cross"  # a tie: first named
    colour = labels.demo_labels("left-to-right: small red circle, large blue square", "dominant_colour")
    assert [labels.demo_categories("dominant_colour")[i] for i in colour] == ["blue"]


def test_multi_label_sources_name_every_shape_or_colour_once():
    description = "top-to-bottom: small red circle, large red square, small blue circle"
    assert [SHAPES[i] for i in labels.demo_labels(description, "shapes")] == ["circle", "square"]
    names = list(labels.demo_categories("colours"))
    assert sorted(names[i] for i in labels.demo_labels(description, "colours")) == ["blue", "red"]
    rows = labels.multi_hot([[0, 2], [1]], 3)
    np.testing.assert_array_equal(rows, [[1, 0, 1], [0, 1, 0]])


def test_a_dataset_without_labels_is_refused_naming_who_needs_them():
    with pytest.raises(UserError, match="label_map needs category labels, but the dataset at /d has none"):
        labels.require_labels(None, "/d", "label_map")


def test_training_batches_carry_each_records_labels_in_every_epoch():
    tokenizer = TextTokenizer(train_wordpiece_tokenizer(iter(WORDS * 20), vocab_size=100))
    source = records(10)
    table = np.eye(10, dtype=np.float32)  # record i has category i: a batch row names its record
    batches = pipeline.training_dataset(source, tokenizer, pipeline.BatchOptions(
        local_batch_size=4, languages=("en",), max_text_length=6, seed=0, image_size=24,
    ), record_fields={"labels": table})
    seen = []
    for step in range(7):  # 28 examples: nearly three epochs of 10
        batch = batches[step]
        assert batch["labels"].shape == (4, 10)
        np.testing.assert_array_equal(batch["labels"], table[batch["index"]])
        assert (batch["index"] < 10).all()
        seen.extend(batch["index"].tolist())
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))
