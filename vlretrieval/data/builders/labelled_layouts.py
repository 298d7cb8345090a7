"""Readers for category-labelled cross-modal benchmarks: each record also carries its categories.

Registered in `layouts.LAYOUTS`; the image-caption builder writes a `labels` feature for these
layouts (`LABELLED_LAYOUTS`). Point `source_dir` at the folder the benchmark unpacks to;
`images_dir` defaults to the folder named in `IMAGES_DIRS`. Split protocols: docs/datasets.md.

  wikipedia        Rasiwasia et al.: trainset_txt_img_cat.list, testset_txt_img_cat.list,
                   [categories.list], texts/<text_id>.xml; images/<category>/<image_id>.jpg.
  pascal_sentence  Rashtchian et al.: sentence/<category>/<name>.txt; image/<category>/<name>.jpg.
  cub              CUB-200-2011 (CUB_200_2011/images.txt, image_class_labels.txt, classes.txt,
                   train_test_split.txt, images/) with Reed et al.'s text_c10/<class>/<name>.txt.
  abo              Amazon Berkeley Objects: listings/metadata/listings_*.json.gz,
                   images/metadata/images.csv.gz; images/small/<path>.
  fashion200k      labels/<category>_<train|test>_detect_all.txt; images relative to source_dir.

Readers check the text files (a missing list file, or a malformed or misaligned line, is a
`UserError` naming file and line); a missing or corrupt image, a missing or empty text, or a
record without a category is the builder's to count.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import html
import io
import os
import re
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Iterator
from pathlib import Path

from vlretrieval.data.builders import layout_files
from vlretrieval.data.builders.layout_files import SourceRecord
from vlretrieval.errors import UserError

LABELLED_LAYOUTS = ("wikipedia", "pascal_sentence", "cub", "abo", "fashion200k")

# Options each layout takes, with the type a value must have (None is always allowed).
OPTIONS: dict[str, dict[str, type]] = {
    "wikipedia": {},
    "pascal_sentence": {"test_per_category": int, "validation_per_category": int},
    "cub": {"class_split": bool},
    "abo": {"language_tag_prefix": str, "test_fraction": float},
    "fashion200k": {},
}
# The default images_dir of each layout, relative to source_dir.
IMAGES_DIRS = {
    "wikipedia": "images",
    "pascal_sentence": "image",
    "cub": os.path.join("CUB_200_2011", "images"),
    "abo": os.path.join("images", "small"),
    "fashion200k": "",
}


def _collapsed(text: str) -> str:
    return " ".join(text.split())


# --- wikipedia -----------------------------------------------------------------------------------

# The published categories.list, in order: category number i (1-based) is line i.
WIKIPEDIA_CATEGORIES = (
    "art", "biology", "geography", "history", "literature", "media", "music", "royalty", "sport", "warfare"
)  # fmt: skip
_WIKIPEDIA_LISTS = (("train", "trainset_txt_img_cat.list"), ("test", "testset_txt_img_cat.list"))
_XML_TEXT = re.compile(r"<text\b[^>]*>(.*?)</text\s*>", re.DOTALL)


def _wikipedia_categories(source_dir: str) -> tuple[str, ...]:
    path = os.path.join(source_dir, "categories.list")
    if not os.path.isfile(path):
        return WIKIPEDIA_CATEGORIES
    names = [line.strip() for line in layout_files.read_lines(path) if line.strip()]
    if not names:
        raise UserError(f"{path} names no category: expected one category name a line")
    return tuple(names)


def _wikipedia_text(path: str) -> str:
    """The article in the document's <text> element, whitespace-collapsed; "" if the file is
    missing or has none (the builder counts an empty text). Some published files hold characters
    XML does not allow unescaped (a bare "&"), so a document ElementTree refuses is read by pattern."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        return ""
    try:
        element = ElementTree.fromstring(data).find(".//text")
        return _collapsed("".join(element.itertext())) if element is not None else ""
    except ElementTree.ParseError:
        match = _XML_TEXT.search(data.decode("utf-8", errors="replace"))
        return _collapsed(html.unescape(re.sub(r"<[^>]+>", " ", match[1]))) if match else ""


def _read_wikipedia(source_dir: str, images_dir: str) -> Iterator[SourceRecord]:
    """One record a list line `<text_id>\\t<image_id>\\t<category number>`: the article as its one
    caption, the category named by categories.list line <number> (else the canonical ten)."""
    categories = _wikipedia_categories(source_dir)
    for split, name in _WIKIPEDIA_LISTS:
        path = layout_files.require_file(os.path.join(source_dir, name), "Wikipedia list file")
        for number, (text_id, image_id, category) in layout_files.columns(path, 3, "\t"):
            if not category.isdigit() or not 1 <= int(category) <= len(categories):
                raise UserError(
                    f"{path}, line {number}: category {category!r} is not a number from 1 to {len(categories)}"
                )
            label = categories[int(category) - 1]
            text = _wikipedia_text(os.path.join(source_dir, "texts", f"{text_id}.xml"))
            yield SourceRecord(
                split, os.path.join(images_dir, label, f"{image_id}.jpg"), image_id, {"en": [text]}, (label,)
            )


# --- pascal_sentence -----------------------------------------------------------------------------


def _read_pascal_sentence(
    source_dir: str, images_dir: str, test_per_category: int | None = 5, validation_per_category: int | None = 0
) -> Iterator[SourceRecord]:
    """sentence/<category>/<name>.txt (one sentence a line) for image/<category>/<name>.jpg. There
    is no official split: in each category, in sorted file-name order, the first
    `test_per_category` images are test, the next `validation_per_category` validation, the rest
    train (the common 800/200 protocol is 40 train / 10 test a category: test_per_category=10)."""
    test = 5 if test_per_category is None else test_per_category
    validation = validation_per_category or 0
    if test < 0 or validation < 0:
        raise UserError("options test_per_category and validation_per_category of pascal_sentence must be >= 0")
    sentences = os.path.join(source_dir, "sentence")
    folders = Path(sentences).iterdir() if os.path.isdir(sentences) else ()
    categories = sorted(path.name for path in folders if path.is_dir())
    if not categories:
        raise UserError(f"Pascal Sentence folder {sentences} not found or holds no <category>/ folders")
    for category in categories:
        files = sorted(path for path in Path(sentences, category).glob("*.txt") if path.is_file())
        for position, path in enumerate(files):
            split = "test" if position < test else "validation" if position < test + validation else "train"
            yield SourceRecord(
                split,
                os.path.join(images_dir, category, f"{path.stem}.jpg"),
                f"{category}/{path.stem}",
                {"en": [line.strip() for line in layout_files.read_lines(str(path))]},
                (category,),
            )


# --- cub -----------------------------------------------------------------------------------------


def _id_table(path: str, what: str) -> dict[str, tuple[int, str]]:
    """`<id> <value>` lines: id -> (line number, value); a repeated id is an error."""
    table: dict[str, tuple[int, str]] = {}
    for number, (key, value) in layout_files.columns(layout_files.require_file(path, what), 2):
        if key in table:
            raise UserError(f"{path}, line {number}: id {key} is listed again (first on line {table[key][0]})")
        table[key] = (number, value)
    return table


def _cub_class_split(source_dir: str, classes: set[str]) -> dict[str, str]:
    """class name -> split from Reed et al.'s trainvalclasses.txt (train) and testclasses.txt (test)."""
    by_class: dict[str, str] = {}
    for split, name in (("train", "trainvalclasses.txt"), ("test", "testclasses.txt")):
        path = layout_files.require_file(os.path.join(source_dir, name), "CUB class-split file")
        for number, (class_name,) in layout_files.columns(path, 1):
            if class_name not in classes:
                raise UserError(f"{path}, line {number}: class {class_name!r} is not in CUB_200_2011/classes.txt")
            if class_name in by_class:
                raise UserError(f"{path}, line {number}: class {class_name!r} is already in a split")
            by_class[class_name] = split
    return by_class


def _read_cub(source_dir: str, images_dir: str, class_split: bool | None = False) -> Iterator[SourceRecord]:
    """Every image of CUB_200_2011/images.txt with its class (the classes.txt name, e.g.
    "001.Black_footed_Albatross") and the 10 captions of text_c10/<class>/<name>.txt. Splits: the
    official train_test_split.txt, or with `class_split` Reed et al.'s zero-shot classes (images
    of trainvalclasses.txt are train, of testclasses.txt test, of neither left out)."""
    root = os.path.join(source_dir, "CUB_200_2011")
    images_path = layout_files.require_file(os.path.join(root, "images.txt"), "CUB image list")
    labels_path = os.path.join(root, "image_class_labels.txt")
    image_labels = _id_table(labels_path, "CUB class labels")
    classes = {key: name for key, (_, name) in _id_table(os.path.join(root, "classes.txt"), "CUB class list").items()}
    split_path = os.path.join(root, "train_test_split.txt")
    by_class = _cub_class_split(source_dir, set(classes.values())) if class_split else None
    official = None if class_split else _id_table(split_path, "CUB train/test split")
    for number, (image_id, relative) in layout_files.columns(images_path, 2):
        where = f"{images_path}, line {number}"
        if image_id not in image_labels:
            raise UserError(f"{where}: image id {image_id} is not in {labels_path}")
        label_line, class_id = image_labels[image_id]
        if class_id not in classes:
            raise UserError(f"{labels_path}, line {label_line}: class id {class_id} is not in {root}/classes.txt")
        label = classes[class_id]
        if by_class is not None:
            if label not in by_class:
                continue
            split = by_class[label]
        else:
            if image_id not in official:
                raise UserError(f"{where}: image id {image_id} is not in {split_path}")
            split_line, is_train = official[image_id]
            if is_train not in ("0", "1"):
                raise UserError(f"{split_path}, line {split_line}: expected 1 (train) or 0 (test), found {is_train!r}")
            split = "train" if is_train == "1" else "test"
        text_path = os.path.join(source_dir, "text_c10", str(Path(relative).with_suffix(".txt")))
        texts = layout_files.read_lines(text_path) if os.path.isfile(text_path) else []
        yield SourceRecord(
            split, os.path.join(images_dir, relative), image_id, {"en": [text.strip() for text in texts]}, (label,)
        )


# --- abo -----------------------------------------------------------------------------------------


def abo_split(item_id: str, test_fraction: float) -> str:
    """"test" for a stable `test_fraction` of item ids (by SHA-1 of the id), else "train"."""
    digest = int.from_bytes(hashlib.sha1(item_id.encode("utf-8")).digest()[:8], "big")
    return "test" if digest < test_fraction * 2**64 else "train"


def _abo_images(path: str) -> dict[str, str]:
    """image_id -> path under images/small/, from images.csv.gz (`image_id,height,width,path`)."""
    try:
        with gzip.open(layout_files.require_file(path, "ABO image metadata"), "rt", encoding="utf-8") as handle:
            text = handle.read()
    except (OSError, EOFError, UnicodeDecodeError) as error:
        raise UserError(f"{path}: cannot be read as gzipped UTF-8 text ({error})") from None
    reader = csv.DictReader(io.StringIO(text))
    if not {"image_id", "path"} <= set(reader.fieldnames or ()):
        raise UserError(f"{path}, line 1: expected a header with image_id and path columns")
    images = {}
    for row in reader:
        if not row.get("image_id") or not row.get("path"):
            raise UserError(f"{path}, line {reader.line_num}: an empty image_id or path")
        images[row["image_id"]] = row["path"]
    return images


def _abo_values(line: dict, name: str, where: str) -> list[dict]:
    values = line.get(name, [])
    if not isinstance(values, list) or not all(isinstance(value, dict) for value in values):
        raise UserError(f"{where}: {name!r} must be a list of objects")
    return values


def _read_abo(
    source_dir: str, images_dir: str, language_tag_prefix: str | None = "en", test_fraction: float | None = 0.1
) -> Iterator[SourceRecord]:
    """One record a listing with a main image: its item names in languages tagged
    `<language_tag_prefix>` or `<language_tag_prefix>_*` (en_US, en_GB, ...) as captions, its
    product types as labels. ABO has no retrieval split: a listing is test when the hash of its
    item_id falls in `test_fraction` (`abo_split`), else train. Listings without a main image are
    left out (there is no image to retrieve)."""
    prefix = language_tag_prefix or "en"
    language = layout_files.check_language(prefix, "option language_tag_prefix of abo")
    fraction = 0.1 if test_fraction is None else test_fraction
    if not 0 <= fraction <= 1:
        raise UserError(f"option test_fraction of abo is {fraction}: expected a fraction from 0 to 1")
    listings = sorted(str(path) for path in Path(source_dir, "listings", "metadata").glob("listings_*.json.gz"))
    if not listings:
        raise UserError(f"ABO listings {source_dir}/listings/metadata/listings_*.json.gz not found")
    images = _abo_images(os.path.join(source_dir, "images", "metadata", "images.csv.gz"))
    for path in listings:
        for number, line in layout_files.json_lines(path):
            where = f"{path}, line {number}"
            item_id = layout_files.field(line, "item_id", where, str)
            if "main_image_id" not in line:
                continue
            image_id = layout_files.field(line, "main_image_id", where, str)
            if image_id not in images:
                raise UserError(f"{where}: main_image_id {image_id!r} is not in images/metadata/images.csv.gz")
            names = [
                layout_files.field(name, "value", f"{where}, item_name", str)
                for name in _abo_values(line, "item_name", where)
                if name.get("language_tag") == prefix or str(name.get("language_tag")).startswith(f"{prefix}_")
            ]
            labels = [
                layout_files.field(kind, "value", f"{where}, product_type", str)
                for kind in _abo_values(line, "product_type", where)
            ]
            yield SourceRecord(
                abo_split(item_id, fraction),
                os.path.join(images_dir, images[image_id]),
                item_id,
                {language: list(dict.fromkeys(names))},
                tuple(dict.fromkeys(label for label in labels if label.strip())),
            )


# --- fashion200k ---------------------------------------------------------------------------------

_FASHION200K_FILE = re.compile(r"^(?P<category>[A-Za-z]+)_(?P<split>train|test)_detect_all\.txt$")


def _read_fashion200k(source_dir: str, images_dir: str) -> Iterator[SourceRecord]:
    """labels/<category>_<train|test>_detect_all.txt, lines `<image path>\\t<detection score>\\t
    <description>`: the description as caption, the category of the file name as label. Lines
    naming one image twice in a split make one record."""
    folder = os.path.join(source_dir, "labels")
    files = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    matches = [match for match in map(_FASHION200K_FILE.match, files) if match]
    if not matches:
        raise UserError(f"{folder} holds no Fashion200k label files <category>_<train|test>_detect_all.txt")
    merged: dict[tuple[str, str], tuple[list[str], dict[str, None]]] = {}
    for match in matches:
        path = os.path.join(folder, match[0])
        for number, (image, score, description) in layout_files.columns(path, 3, "\t"):
            try:
                float(score)
            except ValueError:
                raise UserError(f"{path}, line {number}: detection score {score!r} is not a number") from None
            if not image:
                raise UserError(f"{path}, line {number}: an empty image path")
            captions, labels = merged.setdefault((match["split"], image), ([], {}))
            captions.append(description)
            labels.setdefault(match["category"])
    for (split, image), (captions, labels) in merged.items():
        yield SourceRecord(split, os.path.join(images_dir, image), image, {"en": captions}, tuple(labels))


READERS: dict[str, Callable[..., Iterator[SourceRecord]]] = {
    "wikipedia": _read_wikipedia,
    "pascal_sentence": _read_pascal_sentence,
    "cub": _read_cub,
    "abo": _read_abo,
    "fashion200k": _read_fashion200k,
}
