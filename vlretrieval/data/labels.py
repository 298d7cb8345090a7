"""Category labels of a dataset's records: what label-based metrics (mAP by category) and
label-supervised objectives (IDCMR) read.

A labelled layout (Wikipedia, Pascal Sentence, CUB, ABO, Fashion200k) stores each record's
category indices in a `labels` feature, and the category names in its metadata. The demo scenes
carry no labels of their own; `config.data.labels` derives them from each scene's description:

  dominant_shape / dominant_colour  one category a scene: the shape (colour) covering the largest
                                    area (sum of its objects' box areas; a tie goes to the one
                                    named first), as in single-label benchmarks (Wikipedia);
  shapes / colours                  every shape (colour) in the scene: multi-label, as NUS-WIDE.

A record's labels are a multi-hot row over the categories: two items are relevant to each other
when they share a category (for single-label data, when their categories are equal).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from vlretrieval.data.builders.scenes import COLOURS, SHAPES, SIZES
from vlretrieval.errors import UserError

DEMO_LABELS = ("dominant_shape", "dominant_colour", "shapes", "colours")
LABEL_SOURCES = ("", *DEMO_LABELS)  # "": the dataset's own labels, if it has any


def demo_categories(label_source: str) -> tuple[str, ...]:
    return tuple(SHAPES if label_source in ("dominant_shape", "shapes") else COLOURS)


def scene_objects(description: str) -> list[tuple[str, str, str]]:
    """(size, colour, shape) of each object of a scene `description` (`scenes.description`)."""
    names = description.split(": ", 1)[-1]
    return [tuple(name.split(" ")) for name in names.split(", ")]


def demo_labels(description: str, label_source: str) -> list[int]:
    """The category indices `label_source` gives the scene described by `description`."""
    categories = demo_categories(label_source)
    attribute = 2 if label_source in ("dominant_shape", "shapes") else 1
    objects = scene_objects(description)
    if label_source in ("shapes", "colours"):
        return sorted({categories.index(obj[attribute]) for obj in objects})
    area: dict[str, int] = {}
    for obj in objects:  # dicts keep insertion order: max() below breaks ties by first mention
        area[obj[attribute]] = area.get(obj[attribute], 0) + (2 * SIZES[obj[0]] + 1) ** 2
    return [categories.index(max(area, key=area.get))]


def multi_hot(labels: Sequence[Sequence[int]], num_categories: int) -> np.ndarray:
    """[records, categories] float32, 1 where the record has the category."""
    rows = np.zeros((len(labels), num_categories), np.float32)
    for row, indices in enumerate(labels):
        rows[row, np.asarray(indices, np.int64)] = 1.0
    return rows


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def split_labels(source: Sequence[dict[str, Any]], label_source: str, num_categories: int,
                 count: int | None = None) -> np.ndarray:
    """The multi-hot labels of the first `count` records (all: None) of a split."""
    count = len(source) if count is None else min(count, len(source))
    if label_source:
        labels = [demo_labels(_text(source[i]["description"]), label_source) for i in range(count)]
    else:
        labels = [np.asarray(source[i]["labels"]).reshape(-1) for i in range(count)]
    return multi_hot(labels, num_categories)


def dataset_categories(builder, label_source: str, directory: str) -> tuple[str, ...] | None:
    """The category names of a prepared dataset under `label_source`, or None if it has none.
    A demo label source on a dataset whose records have no scene description is refused."""
    features = builder.info.features
    if label_source:
        if label_source not in DEMO_LABELS:
            raise UserError(f"config.data.labels is {label_source!r}; choose one of {LABEL_SOURCES}")
        if "description" not in features:
            raise UserError(
                f"config.data.labels={label_source} derives labels from the demo scenes' descriptions, but the "
                f"dataset at {directory} has none: leave config.data.labels empty (its own labels, if any)"
            )
        return demo_categories(label_source)
    if "labels" not in features:
        return None
    categories = builder.info.metadata.get("categories") if builder.info.metadata else None
    if not categories:
        raise UserError(f"the dataset at {directory} has a labels feature but no category names in its metadata")
    return tuple(categories)


def require_labels(categories: tuple[str, ...] | None, directory: str, needed_by: str) -> None:
    """One line naming what needs labels when the dataset has none."""
    if categories is None:
        raise UserError(
            f"{needed_by} needs category labels, but the dataset at {directory} has none: use a labelled dataset "
            f"(wikipedia, pascal_sentence, cub, abo, fashion200k) or, on the demo scenes, set config.data.labels "
            f"to one of {DEMO_LABELS}"
        )
