"""Readers for the published on-disk layouts of image-caption retrieval benchmarks.

Each layout becomes one stream of `SourceRecord`s (split, image path, image id, captions by
language) for the image-caption builder. Point `source_dir` at the directory the benchmark
unpacks to; `images_dir` defaults to `<source_dir>/images` (to `source_dir` for "jsonl"):

  karpathy        dataset_coco.json, dataset_flickr30k.json or dataset_flickr8k.json (Karpathy's
                  splits); COCO images in images/train2014/ and images/val2014/, Flickr flat.
  crossmodal3600  captions.jsonl (Crossmodal-3600); images/<image/key>.jpg.
  xtd10           a checkout of adobe-research/Cross-lingual-Test-Dataset-XTD10:
                  XTD10/test_image_names.txt and test_1kcaptions_<lang>.txt in XTD10/, MIC/, STAIR/;
                  the MSCOCO 2014 images it names, flat in images/.
  multi30k        a checkout of multi30k/dataset: data/task1/image_splits/<split>.txt and
                  data/task1/raw/<split>.<lang>[.gz]; Flickr30K images flat in images/.
  jsonl           your own captions.jsonl; images relative to source_dir.

The category-labelled layouts (wikipedia, pascal_sentence, cub, abo, fashion200k) are read by
`labelled_layouts.py`, each with its own default `images_dir`; their records carry `labels`.
Readers check the text files only: a missing or corrupt image is the builder's to count.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from vlretrieval.data.builders import labelled_layouts, layout_files
from vlretrieval.data.builders.layout_files import SourceRecord
from vlretrieval.errors import UserError

LAYOUTS = ("karpathy", "crossmodal3600", "xtd10", "multi30k", "jsonl", *labelled_layouts.LABELLED_LAYOUTS)

# Options each layout takes, with the type a value must have (None is always allowed).
_OPTIONS: dict[str, dict[str, type]] = {
    "karpathy": {"annotation": str, "restval_to_train": bool},
    "crossmodal3600": {},
    "xtd10": {},
    "multi30k": {"coco_images_dir": str},
    "jsonl": {"language": str},
    **labelled_layouts.OPTIONS,
}
# Where images are when images_dir is not given, relative to source_dir.
_IMAGES_DIRS = {"jsonl": "", **labelled_layouts.IMAGES_DIRS}

def parse_layout_options(layout: str, text: str) -> dict[str, Any]:
    """`config.data.layout_options` ("test_per_category=10,class_split=true") as typed options of
    `layout`; an unknown name or a value of the wrong type is one line."""
    options: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, equals, value = item.partition("=")
        allowed = _OPTIONS.get(layout, {})
        if not equals or name not in allowed:
            known = ", ".join(allowed) or "none"
            raise UserError(f"config.data.layout_options: {item!r} is not NAME=VALUE with a NAME of layout "
                            f"{layout!r} (its options: {known})")
        kind = allowed[name]
        try:
            if kind is bool:
                if value.lower() not in ("true", "false"):
                    raise ValueError(value)
                options[name] = value.lower() == "true"
            else:
                options[name] = kind(value)
        except ValueError:
            raise UserError(f"config.data.layout_options: {name} of layout {layout!r} must be a {kind.__name__}, "
                            f"not {value!r}") from None
    return options


def layout_languages(layout: str, source_dir: str, **options: Any) -> tuple[str, ...]:
    """Sorted language codes the layout's files hold (reads them through)."""
    return _scan(layout, source_dir, options)[1]


def layout_splits(layout: str, source_dir: str, **options: Any) -> tuple[str, ...]:
    """Split names the records will have, in the order they first appear (reads the files through)."""
    return _scan(layout, source_dir, options)[0]


def read_layout(
    layout: str, source_dir: str, images_dir: str | None = None, **options: Any
) -> Iterator[SourceRecord]:
    """Every record of every split, in file order. A bad layout, option or directory raises
    here; a missing or malformed annotation file raises while iterating, naming file and line."""
    if layout not in LAYOUTS:
        raise UserError(f"unknown dataset layout {layout!r}: choose one of {', '.join(LAYOUTS)}")
    _check_options(layout, options)
    if not os.path.isdir(source_dir):
        raise UserError(f"source directory {source_dir} does not exist")
    if images_dir is None:
        images_dir = os.path.join(source_dir, _IMAGES_DIRS.get(layout, "images"))
    return _READERS[layout](os.path.abspath(source_dir), os.path.abspath(images_dir), **options)


def _check_options(layout: str, options: dict[str, Any]) -> None:
    allowed = _OPTIONS[layout]
    for name, value in options.items():
        if name not in allowed:
            known = ", ".join(allowed) or "none"
            raise UserError(f"layout {layout!r} has no option {name!r} (its options: {known})")
        if value is not None and not isinstance(value, kind := allowed[name]):
            raise UserError(f"option {name} of layout {layout!r} must be a {kind.__name__}")


def layout_categories(layout: str, source_dir: str, **options: Any) -> tuple[str, ...]:
    """Sorted category names the records carry (reads the files through); () if unlabelled."""
    return _scan(layout, source_dir, options)[2]


def _scan(layout: str, source_dir: str, options: dict[str, Any]) -> tuple[tuple[str, ...], ...]:
    splits: dict[str, None] = {}  # an ordered set
    languages: set[str] = set()
    categories: set[str] = set()
    for record in read_layout(layout, source_dir, **options):
        splits.setdefault(record.split)
        languages.update(record.captions)
        categories.update(record.labels)
    return tuple(splits), tuple(sorted(languages)), tuple(sorted(categories))


# --- karpathy ------------------------------------------------------------------------------------


def _karpathy_annotation(source_dir: str, annotation: str | None) -> str:
    """The annotation file picked by name, else the one dataset_*.json in source_dir."""
    if annotation is not None:
        return layout_files.require_file(os.path.join(source_dir, annotation), "Karpathy annotation file")
    found = sorted(str(path) for path in Path(source_dir).glob("dataset_*.json"))
    if not found:
        raise UserError(
            f"{source_dir} holds no Karpathy annotation file: expected dataset_coco.json, "
            "dataset_flickr30k.json or dataset_flickr8k.json"
        )
    if len(found) > 1:
        names = ", ".join(Path(path).name for path in found)
        raise UserError(f"{source_dir} holds {names}: pick one with the option annotation=<name>")
    return found[0]


def _read_karpathy(
    source_dir: str, images_dir: str, annotation: str | None = None, restval_to_train: bool = False
) -> Iterator[SourceRecord]:
    """Karpathy's splits: {"images": [{"filename", "split", "sentences": [{"raw", ...}], ...}]}.
    COCO entries add "filepath" (train2014/val2014) and "cocoid". "restval" (COCO's 30k images
    outside the 5k val/test) is its own split unless `restval_to_train` folds it into train."""
    path = _karpathy_annotation(source_dir, annotation)
    images = layout_files.field(layout_files.load_json(path), "images", path, list)
    for index, entry in enumerate(images):
        where = f"{path}, images[{index}]"
        filename = layout_files.field(entry, "filename", where, str)
        split = layout_files.field(entry, "split", where, str)
        if split == "restval" and restval_to_train:
            split = "train"
        sentences = layout_files.field(entry, "sentences", where, list)
        captions = [layout_files.field(sentence, "raw", f"{where}.sentences", str) for sentence in sentences]
        # COCO's own id is stable across releases; Flickr has none, but its file names are ids.
        image_id = str(entry["cocoid"]) if "cocoid" in entry else Path(filename).stem
        relative = os.path.join(entry.get("filepath") or "", filename)
        yield SourceRecord(
            layout_files.split_name(split, where),
            os.path.join(images_dir, relative),
            image_id,
            {"en": captions},
        )


# --- crossmodal3600 ------------------------------------------------------------------------------


def _read_crossmodal3600(source_dir: str, images_dir: str) -> Iterator[SourceRecord]:
    """captions.jsonl: one image a line, {"image/key": ..., "image/locale": ..., "<lang>":
    {"caption": [...], "caption/tokenized": [...], ...}, ...}; one split, "test"."""
    path = layout_files.require_file(os.path.join(source_dir, "captions.jsonl"), "Crossmodal-3600 captions")
    rows = []
    for number, line in layout_files.json_lines(path):
        where = f"{path}, line {number}"
        key = layout_files.field(line, "image/key", where, str)
        # Every object-valued field is a language; the others ("image/key", "image/locale")
        # describe the image. Raw captions only: the tokenized ones are derived from them.
        captions = {
            layout_files.check_language(language, where): layout_files.strings(
                layout_files.field(value, "caption", f"{where}, {language!r}"), f"{where}, {language!r}"
            )
            for language, value in line.items()
            if isinstance(value, dict)
        }
        rows.append((key, captions))
    languages = sorted({language for _, captions in rows for language in captions})
    for key, captions in rows:
        image_path = os.path.join(images_dir, f"{key}.jpg")
        yield SourceRecord(
            "test", image_path, key, {lang: captions.get(lang, []) for lang in languages}
        )


# --- xtd10 ---------------------------------------------------------------------------------------

# Where the repository keeps caption files, in order of precedence when a language is in two
# (MIC/ repeats English): XTD10/ holds the XTD languages, MIC/ de, fr, en, STAIR/ Japanese.
_XTD10_FOLDERS = ("", "XTD10", "MIC", "STAIR")
_XTD10_CAPTIONS = re.compile(r"^test_1kcaptions_([A-Za-z_]+)\.txt$")
# STAIR's file says "jp"; ISO 639-1 (and Crossmodal-3600) say "ja", so both name one language.
_XTD10_LANGUAGES = {"jp": "ja"}


def _xtd10_files(source_dir: str) -> tuple[str, dict[str, str]]:
    """(image list, {language: caption file})."""
    lists = [os.path.join(source_dir, folder, "test_image_names.txt") for folder in ("XTD10", "")]
    names = next((path for path in lists if os.path.isfile(path)), None)
    if names is None:
        raise UserError(f"XTD10 image list {lists[0]} not found")
    files: dict[str, str] = {}
    for folder in _XTD10_FOLDERS:
        directory = os.path.join(source_dir, folder)
        for name in sorted(os.listdir(directory)) if os.path.isdir(directory) else ():
            if match := _XTD10_CAPTIONS.match(name):
                language = _XTD10_LANGUAGES.get(match[1], match[1])
                files.setdefault(language, os.path.join(directory, name))
    if not files:
        raise UserError(f"no XTD10 caption files test_1kcaptions_<lang>.txt under {source_dir}")
    return names, files


def _read_xtd10(source_dir: str, images_dir: str) -> Iterator[SourceRecord]:
    """One caption per image and language, aligned by line with test_image_names.txt; "test"."""
    list_path, files = _xtd10_files(source_dir)
    names = layout_files.image_names(list_path)
    captions = {
        layout_files.check_language(language, path): layout_files.aligned_lines(path, list_path, len(names))
        for language, path in sorted(files.items())
    }
    for index, name in enumerate(names):
        yield SourceRecord(
            "test",
            os.path.join(images_dir, name),
            Path(name).stem,
            {language: [lines[index]] for language, lines in captions.items()},
        )


# --- multi30k ------------------------------------------------------------------------------------

_MULTI30K_SPLITS = (
    "train", "val", "test_2016_flickr", "test_2017_flickr", "test_2017_mscoco", "test_2018_flickr"
)  # fmt: skip
# "train.de.gz", "val.en"; not the BPE or tokenized variants ("train.32k.en", "*.lc.norm.tok.*").
_MULTI30K_RAW = re.compile(r"^(?P<split>\w+)\.(?P<language>[a-z]{2,3})(\.gz)?$")
_COCO_2014_FILE = re.compile(r"^COCO_(train|val)2014_")


def _multi30k_task1(source_dir: str) -> str:
    """data/task1 of a repository checkout, or source_dir if it is that folder itself."""
    for task1 in (os.path.join(source_dir, "data", "task1"), source_dir):
        if os.path.isdir(os.path.join(task1, "image_splits")):
            return task1
    raise UserError(f"Multi30K image lists {source_dir}/data/task1/image_splits not found")


def _multi30k_files(task1: str) -> dict[str, tuple[str, dict[str, str]]]:
    """split -> (image list, {language: caption file}) for each split with a caption file,
    in the published order."""
    raw_dir = os.path.join(task1, "raw")
    raw: dict[str, dict[str, str]] = {}
    for name in sorted(os.listdir(raw_dir)) if os.path.isdir(raw_dir) else ():
        if match := _MULTI30K_RAW.match(name):
            # sorted() puts "val.en" before "val.en.gz": a decompressed copy wins.
            raw.setdefault(match["split"], {}).setdefault(
                match["language"], os.path.join(raw_dir, name)
            )
    lists = {path.stem: str(path) for path in Path(task1, "image_splits").glob("*.txt")}
    known = {split: rank for rank, split in enumerate(_MULTI30K_SPLITS)}
    order = sorted(lists, key=lambda split: (known.get(split, len(known)), split))
    files = {split: (lists[split], raw[split]) for split in order if split in raw}
    if not files:
        raise UserError(
            f"{raw_dir} holds no caption files <split>.<lang>[.gz] for {task1}/image_splits"
        )
    return files


def _multi30k_image(name: str, images_dir: str, coco_images_dir: str) -> str:
    # test_2017_mscoco names MSCOCO 2014 images, which COCO keeps in train2014/ and val2014/.
    if match := _COCO_2014_FILE.match(name):
        return os.path.join(coco_images_dir, f"{match[1]}2014", name)
    return os.path.join(images_dir, name)


def _read_multi30k(
    source_dir: str, images_dir: str, coco_images_dir: str | None = None
) -> Iterator[SourceRecord]:
    """Task 1: one caption per image and language, aligned by line with the split's image list.
    A language a split lacks (Czech in test_2017_*) gives that split's records an empty list.
    test_2017_mscoco's images are read from <coco_images_dir>/train2014|val2014/ (default
    images_dir, the folder a Karpathy COCO layout uses)."""
    files = _multi30k_files(_multi30k_task1(source_dir))
    languages = sorted({language for _, raw in files.values() for language in raw})
    coco_images_dir = os.path.abspath(coco_images_dir) if coco_images_dir else images_dir
    for split, (list_path, raw) in files.items():
        names = layout_files.image_names(list_path)
        captions = {lang: layout_files.aligned_lines(path, list_path, len(names)) for lang, path in raw.items()}
        for index, name in enumerate(names):
            image_path = _multi30k_image(name, images_dir, coco_images_dir)
            by_language = {
                lang: [captions[lang][index]] if lang in raw else [] for lang in languages
            }
            yield SourceRecord(
                layout_files.split_name(split, list_path), image_path, Path(name).stem, by_language
            )


# --- jsonl ---------------------------------------------------------------------------------------


def _jsonl_captions(line: dict[str, Any], language: str, where: str) -> dict[str, list[str]]:
    if "captions" in line:
        by_language = layout_files.field(line, "captions", where, dict)
        return {
            layout_files.check_language(code, where): layout_files.strings(texts, f"{where}, captions[{code!r}]")
            for code, texts in by_language.items()
        }
    if "caption" in line:
        code = layout_files.check_language(line.get("language", language), where)
        return {code: [layout_files.field(line, "caption", where, str)]}
    raise UserError(f"{where}: no 'captions' ({{language: [captions]}}) or 'caption' field")


def _read_jsonl(source_dir: str, images_dir: str, language: str = "en") -> Iterator[SourceRecord]:
    """captions.jsonl, one object a line: {"image": "<path under images_dir>", "captions":
    {"en": [...], ...}, "split": "train"} or {"image": ..., "caption": "...", "language": "de"}.
    split defaults to "train", language to the option `language`. Lines naming the same image in
    the same split make one record, so a gallery holds each image once."""
    layout_files.check_language(language, "option language")
    path = layout_files.require_file(os.path.join(source_dir, "captions.jsonl"), "captions file")
    merged: dict[tuple[str, str], dict[str, list[str]]] = {}
    for number, line in layout_files.json_lines(path):
        where = f"{path}, line {number}"
        image = Path(os.path.normpath(layout_files.field(line, "image", where, str))).as_posix()
        split = layout_files.split_name(line.get("split", "train"), where)
        captions = merged.setdefault((split, image), {})
        for code, texts in _jsonl_captions(line, language, where).items():
            captions.setdefault(code, []).extend(texts)
    languages = sorted({code for captions in merged.values() for code in captions})
    for (split, image), captions in merged.items():
        by_language = {code: captions.get(code, []) for code in languages}
        yield SourceRecord(
            split, os.path.abspath(os.path.join(images_dir, image)), image, by_language
        )


_READERS: dict[str, Callable[..., Iterator[SourceRecord]]] = {
    "karpathy": _read_karpathy,
    "crossmodal3600": _read_crossmodal3600,
    "xtd10": _read_xtd10,
    "multi30k": _read_multi30k,
    "jsonl": _read_jsonl,
    **labelled_layouts.READERS,
}
