"""Tiny folders in the published layouts of the category-labelled benchmarks, with real JPEGs.

Each `make_*` writes one layout under `root` and returns a `LabelledFixture`: the records a reader
should yield, in order, and what the builder should keep and count. Every fixture holds 2-3
categories, one missing image, one corrupt (truncated) image and one empty text, so bad-record
counting is exercised on every layout; ABO also has a listing without a product type. Images and
captions come from `layout_fixtures`: each image is one palette colour its captions name.
`write_all(root)` writes all five, each under root/<layout>.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import gzip
import io
import json
import os
from pathlib import Path

from tests.layout_fixtures import PALETTE, caption, write_jpeg
from vlretrieval.data.builders.labelled_layouts import WIKIPEDIA_CATEGORIES, abo_split
from vlretrieval.data.builders.layouts import SourceRecord


@dataclasses.dataclass
class LabelledImage:
    """One record as a reader should report it."""

    split: str
    image_id: str
    image_path: str  # absolute
    colour: str  # the palette colour of its pixels, named in its non-empty captions
    captions: dict[str, list[str]]
    labels: tuple[str, ...]
    state: str = "ok"  # "ok", "corrupt" (truncated JPEG) or "missing" (no file)


@dataclasses.dataclass
class LabelledFixture:
    layout: str
    source_dir: str
    images_dir: str  # the layout's default images_dir
    images: list[LabelledImage]
    options: dict = dataclasses.field(default_factory=dict)  # what the fixture is built with

    def records(self) -> list[SourceRecord]:
        return [
            SourceRecord(image.split, image.image_path, image.image_id, image.captions, image.labels)
            for image in self.images
        ]

    def splits(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(image.split for image in self.images))

    def categories(self) -> tuple[str, ...]:
        return tuple(sorted({label for image in self.images for label in image.labels}))

    def kept(self) -> list[LabelledImage]:
        """The images the builder writes: labelled, readable, with a non-empty caption."""
        return [image for image in self.images if _problems(image)[1]]

    def bad_counts(self) -> dict[str, int]:
        """What the builder should count as skipped, by problem."""
        counts: collections.Counter[str] = collections.Counter()
        for image in self.images:
            counts.update(_problems(image)[0])
        return dict(counts)


def _problems(image: LabelledImage) -> tuple[list[str], bool]:
    """(problems the builder counts for `image`, whether it keeps it), in the builder's order."""
    if not image.labels:
        return ["record without a category label"], False
    if image.state != "ok":
        return [{"missing": "missing image", "corrupt": "undecodable image"}[image.state]], False
    texts = [text for texts in image.captions.values() for text in texts]
    problems = ["empty caption"] * sum(not text.strip() for text in texts)
    kept = any(text.strip() for text in texts)
    return problems + ([] if kept else ["image without captions"]), kept


class _Plan:
    """The images of a fixture as they are written; image number i is palette colour i."""

    def __init__(self, missing: int, corrupt: int):
        self.faults = {missing: "missing", corrupt: "corrupt"}
        self.images: list[LabelledImage] = []

    def add(self, split: str, image_id: str, path: Path, captions: dict, labels: tuple[str, ...]) -> int:
        index = len(self.images)
        state = self.faults.get(index, "ok")
        write_jpeg(path, index, state)
        colour = PALETTE[index % len(PALETTE)][0]
        self.images.append(LabelledImage(split, image_id, os.path.abspath(path), colour, captions, labels, state))
        return index

    def fixture(self, layout: str, root: Path, images_dir: Path, **options) -> LabelledFixture:
        return LabelledFixture(layout, str(root), str(images_dir), self.images, options)


def _write(path: Path, text: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, str):
        text = text.encode("utf-8")
    path.write_bytes(gzip.compress(text, mtime=0) if path.suffix == ".gz" else text)


def _lines(lines: list[str]) -> str:
    return "".join(line + "\n" for line in lines)


# --- wikipedia -----------------------------------------------------------------------------------


def make_wikipedia(root: str | Path) -> LabelledFixture:
    """trainset/testset_txt_img_cat.list, categories.list (the canonical ten), texts/<id>.xml and
    images/<category>/<id>.jpg: 4 train and 3 test records in art, biology and music. Image 1 is
    missing, 2 corrupt, 4's text empty; 3's XML holds a bare "&" (not well-formed)."""
    root, plan = Path(root), _Plan(missing=1, corrupt=2)
    numbers = {"art": 1, "biology": 2, "music": 7}
    rows = [("train", "art"), ("train", "art"), ("train", "biology"), ("train", "music"),
            ("test", "biology"), ("test", "music"), ("test", "art")]  # fmt: skip
    lists: dict[str, list[str]] = {"train": [], "test": []}
    for index, (split, category) in enumerate(rows):
        text_id, image_id = f"{0xAED6BC1E + index:08x}-{index}.{index + 1}", f"{0xF86F4C3D + 7 * index:08x}"
        article = "" if index == 4 else f"{caption(index, 'en')}\n  about   {category} {'& more' * (index == 3)}"
        body = article if index == 3 else article.replace("&", "&amp;")  # 3 keeps its bare "&"
        _write(
            root / "texts" / f"{text_id}.xml",
            f'<?xml version="1.0" encoding="UTF-8"?>\n<document>\n<title>Title {index}</title>\n'
            f"<text>{body}</text>\n</document>\n",
        )
        expected = " ".join(article.split())
        plan.add(split, image_id, root / "images" / category / f"{image_id}.jpg", {"en": [expected]}, (category,))
        lists[split].append(f"{text_id}\t{image_id}\t{numbers[category]}")
    _write(root / "trainset_txt_img_cat.list", _lines(lists["train"]))
    _write(root / "testset_txt_img_cat.list", _lines(lists["test"]))
    _write(root / "categories.list", _lines(list(WIKIPEDIA_CATEGORIES)))
    return plan.fixture("wikipedia", root, root / "images")


# --- pascal_sentence -----------------------------------------------------------------------------

PASCAL_CATEGORIES = ("aeroplane", "bird", "cat")


def make_pascal_sentence(root: str | Path) -> LabelledFixture:
    """sentence/<category>/<name>.txt (5 sentences) and image/<category>/<name>.jpg, 3 images in
    each of 3 categories, built with test_per_category=1: each category's first image is test.
    Image 1 is missing, 4 corrupt, 7's third sentence empty (7 is kept with the other four)."""
    root, plan = Path(root), _Plan(missing=1, corrupt=4)
    for category in PASCAL_CATEGORIES:
        for position in range(3):
            index = len(plan.images)
            name = f"2008_{1000 + 37 * index:06d}"
            sentences = [caption(index, "en", number) for number in range(5)]
            if index == 7:
                sentences[2] = ""
            _write(root / "sentence" / category / f"{name}.txt", _lines([f" {text} " for text in sentences]))
            plan.add(
                "test" if position == 0 else "train", f"{category}/{name}",
                root / "image" / category / f"{name}.jpg", {"en": sentences}, (category,),
            )  # fmt: skip
    return plan.fixture("pascal_sentence", root, root / "image", test_per_category=1)


# --- cub -----------------------------------------------------------------------------------------

CUB_CLASSES = ("001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross")


def make_cub(root: str | Path) -> LabelledFixture:
    """CUB_200_2011/{images,image_class_labels,classes,train_test_split}.txt and images/, Reed et
    al.'s text_c10/ (3 sentences here) and trainvalclasses.txt (001, 002) / testclasses.txt (003).
    Two images a class, the official split alternating train/test. Image id 2 is missing, 3
    corrupt, 4's text file empty. (Records as the official split gives them.)"""
    root, plan = Path(root), _Plan(missing=1, corrupt=2)
    cub = root / "CUB_200_2011"
    images, labels, splits = [], [], []
    for index in range(6):
        image_id, class_number = str(index + 1), index // 2 + 1
        folder = CUB_CLASSES[class_number - 1]
        relative = f"{folder}/{folder.split('.')[1]}_{index:04d}_{796 + index}.jpg"
        texts = [] if index == 3 else [caption(index, "en", number) for number in range(3)]
        _write(root / "text_c10" / Path(relative).with_suffix(".txt"), _lines(texts))
        split = "train" if index % 2 == 0 else "test"
        plan.add(split, image_id, cub / "images" / relative, {"en": texts}, (folder,))
        images.append(f"{image_id} {relative}")
        labels.append(f"{image_id} {class_number}")
        splits.append(f"{image_id} {int(split == 'train')}")
    _write(cub / "images.txt", _lines(images))
    _write(cub / "image_class_labels.txt", _lines(labels))
    _write(cub / "train_test_split.txt", _lines(splits))
    _write(cub / "classes.txt", _lines([f"{number} {name}" for number, name in enumerate(CUB_CLASSES, 1)]))
    _write(root / "trainvalclasses.txt", _lines(list(CUB_CLASSES[:2])))
    _write(root / "testclasses.txt", _lines(list(CUB_CLASSES[2:])))
    return plan.fixture("cub", root, cub / "images")


# --- abo -----------------------------------------------------------------------------------------

ABO_TEST_FRACTION = 0.5


def _abo_item_id(split: str, taken: set[str]) -> str:
    """The first free item id that `abo_split` puts in `split`: a fixture split that holds what
    its records need, whatever the hash."""
    number = 0
    while (item_id := f"B07{number:07d}") in taken or abo_split(item_id, ABO_TEST_FRACTION) != split:
        number += 1
    taken.add(item_id)
    return item_id


def make_abo(root: str | Path) -> LabelledFixture:
    """listings/metadata/listings_{0,1}.json.gz and images/metadata/images.csv.gz, images under
    images/small/, built with test_fraction=0.5. Product types SHOES and CHAIR. Image 2 is missing,
    3 corrupt, listing 4 has no product type, 5 only a French name (no English caption); one more
    listing has no main image (left out by the reader)."""
    root, plan = Path(root), _Plan(missing=2, corrupt=3)
    plans = [  # (split, product type or None, {language_tag: name count})
        ("train", "SHOES", {"en_US": 1, "de_DE": 1}), ("test", "CHAIR", {"en_GB": 1, "en_US": 1}),
        ("train", "SHOES", {"en_US": 1}), ("test", "CHAIR", {"en_IN": 1}), ("train", None, {"en_US": 1}),
        ("test", "SHOES", {"fr_FR": 1}), ("train", "SHOES", {"en_AU": 1}), ("test", "CHAIR", {"en": 1}),
    ]  # fmt: skip
    taken: set[str] = set()
    listings: list[list[str]] = [[], []]
    image_rows = []
    for index, (split, product_type, tags) in enumerate(plans):
        item_id, image_id = _abo_item_id(split, taken), f"{0x61A1B2C3 + index:08x}"
        names = [{"language_tag": tag, "value": f"{caption(index, 'en', n)} ({tag})"} for n, tag in enumerate(tags)]
        path = f"{image_id[:2]}/{image_id}.jpg"
        listing: dict = {"item_id": item_id, "item_name": names, "main_image_id": image_id,
                         "bullet_point": [{"language_tag": "en_US", "value": "a bullet"}], "other_image_id": []}
        if product_type:
            listing["product_type"] = [{"value": product_type}]
        english = [name["value"] for name in names if name["language_tag"].startswith("en")]
        plan.add(split, item_id, root / "images" / "small" / path, {"en": english},
                 (product_type,) if product_type else ())  # fmt: skip
        listings[index % 2].append(json.dumps(listing))
        image_rows.append([image_id, "32", "40", path])
    no_image = {"item_id": "B000000000", "item_name": [{"language_tag": "en_US", "value": "a lost item"}],
                "product_type": [{"value": "SHOES"}]}  # fmt: skip
    listings[1].insert(1, json.dumps(no_image))
    for number, lines in enumerate(listings):
        _write(root / "listings" / "metadata" / f"listings_{number}.json.gz", _lines(lines))
    table = io.StringIO()
    csv.writer(table, lineterminator="\n").writerows([["image_id", "height", "width", "path"], *image_rows])
    _write(root / "images" / "metadata" / "images.csv.gz", table.getvalue())
    # The reader reads listings_0 then listings_1: the records come in that order.
    plan.images = plan.images[0::2] + plan.images[1::2]
    return plan.fixture("abo", root, root / "images" / "small", test_fraction=ABO_TEST_FRACTION)


# --- fashion200k ---------------------------------------------------------------------------------

FASHION200K_FILES = (("dress", "train", 2), ("dress", "test", 1), ("skirt", "train", 2), ("top", "test", 2))
FASHION200K_FOLDERS = {"dress": "dresses", "skirt": "skirts", "top": "tops"}


def make_fashion200k(root: str | Path) -> LabelledFixture:
    """labels/<category>_<split>_detect_all.txt (`<path>\\t<score>\\t<description>`) for dress,
    skirt and top; images under women/<category>/... relative to root. Image 1 is missing, 3
    corrupt, 5's description empty."""
    root, plan = Path(root), _Plan(missing=1, corrupt=3)
    for category, split, count in FASHION200K_FILES:
        lines = []
        for _ in range(count):
            index = len(plan.images)
            relative = f"women/{FASHION200K_FOLDERS[category]}/casual/{51727804 + index}/{51727804 + index}_0.jpeg"
            description = "" if index == 5 else caption(index, "en")
            plan.add(split, relative, root / relative, {"en": [description]}, (category,))
            lines.append(f"{relative}\t{0.5 + index / 100:.3f}\t{description}")
        _write(root / "labels" / f"{category}_{split}_detect_all.txt", _lines(lines))
    # The reader takes the label files in sorted name order: dress_test before dress_train.
    order = sorted(range(len(plan.images)), key=lambda i: (plan.images[i].labels, plan.images[i].split))
    plan.images = [plan.images[i] for i in order]
    return plan.fixture("fashion200k", root, root)


MAKERS = {
    "wikipedia": make_wikipedia,
    "pascal_sentence": make_pascal_sentence,
    "cub": make_cub,
    "abo": make_abo,
    "fashion200k": make_fashion200k,
}


def write_all(root: str | Path) -> dict[str, LabelledFixture]:
    """Every labelled layout's fixture, each in root/<layout>: {layout: fixture}. Build each with
    its `options` (e.g. `image_captions.builder_config(f.layout, f.source_dir, options=f.options)`)."""
    return {layout: make(Path(root) / layout) for layout, make in MAKERS.items()}
