"""Tiny benchmark directories in the exact published layouts, with real JPEG files.

Every image is a 40x32 JPEG of one palette colour (with a faint gradient), and every caption
names that colour and the image's index, so a test can check that a record's image is the one its
captions describe (`image_colour`). Each `make_*` function writes one layout under `root` and
returns a `Fixture`: what a reader should yield, image by image, in order.

Faults for builder tests, by index into `Fixture.images`: `corrupt` writes a truncated JPEG,
`missing` writes no image file, `empty_caption` makes that image's first caption "".
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

PALETTE = (
    ("red", (220, 20, 20)), ("green", (20, 170, 40)), ("blue", (30, 40, 220)),
    ("yellow", (240, 220, 20)), ("magenta", (220, 30, 200)), ("cyan", (20, 210, 220)),
    ("orange", (250, 140, 10)), ("purple", (110, 20, 150)), ("white", (245, 245, 245)),
    ("black", (10, 10, 10)), ("grey", (128, 128, 128)), ("brown", (120, 70, 20)),
)  # fmt: skip
IMAGE_SIZE = (40, 32)  # width, height


@dataclasses.dataclass
class FixtureImage:
    """One image as a reader should report it."""

    split: str  # the tfds split name a reader gives it (restval not folded)
    image_id: str
    image_path: str  # absolute
    colour: str  # the palette colour of its pixels, named in its captions
    captions: dict[str, list[str]]  # every language of the fixture, [] where it has none
    state: str = "ok"  # "ok", "corrupt" (truncated JPEG) or "missing" (no file)


@dataclasses.dataclass
class Fixture:
    layout: str
    source_dir: str
    images_dir: str
    images: list[FixtureImage]

    def splits(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(image.split for image in self.images))

    def split_sizes(self) -> dict[str, int]:
        return {
            split: sum(image.split == split for image in self.images) for split in self.splits()
        }

    def languages(self) -> tuple[str, ...]:
        return tuple(sorted({language for image in self.images for language in image.captions}))


def write_jpeg(path: str | Path, colour_index: int, state: str = "ok") -> None:
    """A 40x32 JPEG of palette colour `colour_index`; truncated if state is "corrupt", not
    written if "missing"."""
    if state == "missing":
        return
    width, height = IMAGE_SIZE
    base = np.array(PALETTE[colour_index % len(PALETTE)][1], dtype=np.int16)
    ramp = np.linspace(-8, 8, width, dtype=np.int16)[None, :, None]  # a gradient, mean unchanged
    pixels = np.clip(base[None, None, :] + ramp, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(np.repeat(pixels, height, axis=0)).save(buffer, format="JPEG", quality=95)
    data = buffer.getvalue()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(data[: len(data) // 2] if state == "corrupt" else data)


def image_colour(path: str | Path) -> str:
    """The palette colour nearest to an image's mean pixel."""
    with Image.open(path) as image:
        mean = np.asarray(image.convert("RGB"), dtype=np.float64).reshape(-1, 3).mean(axis=0)
    distances = [np.linalg.norm(mean - np.array(rgb)) for _, rgb in PALETTE]
    return PALETTE[int(np.argmin(distances))][0]


def caption(index: int, language: str, number: int = 0) -> str:
    """Caption `number` of image `index` in `language`: names the image's colour and index."""
    return f"[{language}] image {index} #{number}: a {PALETTE[index % len(PALETTE)][0]} square"


class _Plan:
    """Collects the images of a fixture as they are written, applying the requested faults."""

    def __init__(self, corrupt: int | None, missing: int | None, empty_caption: int | None):
        self.faults = {"corrupt": corrupt, "missing": missing, "empty": empty_caption}
        self.images: list[FixtureImage] = []

    def add(
        self, split: str, image_id: str, path: Path, captions: dict[str, list[str]]
    ) -> dict[str, list[str]]:
        """Writes image number len(images) to `path`; returns its captions as the files should
        hold them (the first one emptied if asked)."""
        index = len(self.images)
        state = next((name for name in ("corrupt", "missing") if self.faults[name] == index), "ok")
        write_jpeg(path, index, state)
        captions = {language: list(texts) for language, texts in captions.items()}
        if self.faults["empty"] == index:
            first = next(language for language, texts in captions.items() if texts)
            captions[first][0] = ""
        colour = PALETTE[index % len(PALETTE)][0]
        self.images.append(
            FixtureImage(split, image_id, os.path.abspath(path), colour, captions, state)
        )
        return captions

    def fixture(self, layout: str, source_dir: Path, images_dir: Path) -> Fixture:
        languages = sorted({language for image in self.images for language in image.captions})
        for image in self.images:
            image.captions = {language: image.captions.get(language, []) for language in languages}
        return Fixture(layout, str(source_dir), str(images_dir), self.images)


def make_karpathy(
    root: str | Path,
    dataset: str = "coco",
    corrupt: int | None = None,
    missing: int | None = None,
    empty_caption: int | None = None,
) -> Fixture:
    """<root>/dataset_<dataset>.json in Karpathy's format; images in <root>/images/ (COCO's in
    train2014/ and val2014/). COCO has a restval split, Flickr does not; 2 or 3 captions each."""
    root = Path(root)
    plan = _Plan(corrupt, missing, empty_caption)
    splits = ["train", "train", "val", "val", "test", "test"]
    splits += ["restval", "restval"] if dataset == "coco" else ["train"]
    entries, sentence_id = [], 0
    for index, split in enumerate(splits):
        texts = [caption(index, "en", number) for number in range(2 + index % 2)]
        entry: dict = {"split": split, "imgid": index}
        if dataset == "coco":
            cocoid = 391895 + 17 * index
            folder = "train2014" if split == "train" else "val2014"
            entry.update(
                filepath=folder, filename=f"COCO_{folder}_{cocoid:012d}.jpg", cocoid=cocoid
            )
            image_id, relative = str(cocoid), f"{folder}/{entry['filename']}"
        else:
            entry["filename"] = f"{1000092795 + index}.jpg"
            image_id, relative = str(1000092795 + index), entry["filename"]
        tfds_split = {"val": "validation"}.get(split, split)
        texts = plan.add(tfds_split, image_id, root / "images" / relative, {"en": texts})["en"]
        entry["sentids"] = list(range(sentence_id, sentence_id + len(texts)))
        entry["sentences"] = [
            {"tokens": text.lower().split(), "raw": text, "imgid": index, "sentid": sentence_id + n}
            for n, text in enumerate(texts)
        ]
        sentence_id += len(texts)
        entries.append(entry)
    (root / f"dataset_{dataset}.json").write_text(
        json.dumps({"images": entries, "dataset": dataset})
    )
    return plan.fixture("karpathy", root, root / "images")


def make_crossmodal3600(
    root: str | Path,
    languages: tuple[str, ...] = ("de", "en", "fil"),
    corrupt: int | None = None,
    missing: int | None = None,
    empty_caption: int | None = None,
) -> Fixture:
    """<root>/captions.jsonl as Crossmodal-3600 publishes it; images at <root>/images/<key>.jpg.
    English has 2 captions an image, the other languages 1."""
    root = Path(root)
    plan = _Plan(corrupt, missing, empty_caption)
    lines = []
    for index in range(4):
        key = f"{0x000411001FF7DD4F + index:016x}"
        captions = {
            lang: [caption(index, lang, n) for n in range(2 if lang == "en" else 1)]
            for lang in languages
        }
        captions = plan.add("test", key, root / "images" / f"{key}.jpg", captions)
        line: dict = {"image/key": key, "image/locale": languages[index % len(languages)]}
        for lang, texts in captions.items():
            line[lang] = {
                "caption": texts,
                "caption/tokenized": texts,
                "caption/tokenized/lowercase": [text.lower() for text in texts],
            }
        lines.append(json.dumps(line, ensure_ascii=False))
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return plan.fixture("crossmodal3600", root, root / "images")


# Where the XTD10 repository keeps each language's test_1kcaptions_<code>.txt.
XTD10_FILES = {"XTD10": ("en", "es", "it", "zh"), "MIC": ("de", "en", "fr"), "STAIR": ("jp",)}


def make_xtd10(
    root: str | Path,
    corrupt: int | None = None,
    missing: int | None = None,
    empty_caption: int | None = None,
) -> Fixture:
    """A checkout of Cross-lingual-Test-Dataset-XTD10 at <root> (XTD10/, MIC/, STAIR/) with 4
    images; the COCO images flat in <root>/images/. STAIR's "jp" is read as "ja"."""
    root = Path(root)
    plan = _Plan(corrupt, missing, empty_caption)
    names = [f"COCO_train2014_{61844 + 5 * index:012d}.jpg" for index in range(4)]
    by_code: dict[str, list[str]] = {}
    for index, name in enumerate(names):
        codes = sorted({code for codes in XTD10_FILES.values() for code in codes})
        captions = {code: [caption(index, code)] for code in codes}
        captions = plan.add("test", Path(name).stem, root / "images" / name, captions)
        for code, texts in captions.items():
            by_code.setdefault(code, []).append(texts[0])
    for folder, codes in XTD10_FILES.items():
        for code in codes:
            _write_lines(root / folder / f"test_1kcaptions_{code}.txt", by_code[code])
    _write_lines(root / "XTD10" / "test_image_names.txt", names)
    for image in plan.images:
        image.captions["ja"] = image.captions.pop("jp")
    return plan.fixture("xtd10", root, root / "images")


def make_multi30k(
    root: str | Path,
    gzipped: bool = True,
    corrupt: int | None = None,
    missing: int | None = None,
    empty_caption: int | None = None,
) -> Fixture:
    """A checkout of multi30k/dataset at <root>: data/task1/image_splits/<split>.txt and
    data/task1/raw/<split>.<lang>[.gz]. Flickr images flat in <root>/images/, test_2017_mscoco's
    in <root>/images/train2014|val2014/. Czech only for train, val and test_2016_flickr."""
    root, task1 = Path(root), Path(root) / "data" / "task1"
    plan = _Plan(corrupt, missing, empty_caption)
    splits = {"train": 3, "val": 2, "test_2016_flickr": 2, "test_2017_mscoco": 2}
    for split, count in splits.items():
        with_czech = split in ("train", "val", "test_2016_flickr")
        languages = ("cs", "de", "en", "fr") if with_czech else ("de", "en", "fr")
        lines: list[str] = []
        by_language: dict[str, list[str]] = {language: [] for language in languages}
        for _ in range(count):
            index = len(plan.images)
            if split == "test_2017_mscoco":
                folder = ("train2014", "val2014")[index % 2]
                name = f"COCO_{folder}_{117071 + index:012d}.jpg"
                path, line = root / "images" / folder / name, f"{name}#{367178 + index}"
            else:
                name = f"{1018148011 + index}.jpg"
                path, line = root / "images" / name, name
            captions = {language: [caption(index, language)] for language in languages}
            captions = plan.add(
                "validation" if split == "val" else split, Path(name).stem, path, captions
            )
            lines.append(line)
            for language in languages:
                by_language[language].append(captions[language][0])
        _write_lines(task1 / "image_splits" / f"{split}.txt", lines)
        for language, texts in by_language.items():
            _write_lines(task1 / "raw" / f"{split}.{language}{'.gz' if gzipped else ''}", texts)
    return plan.fixture("multi30k", root, root / "images")


def make_jsonl(
    root: str | Path,
    corrupt: int | None = None,
    missing: int | None = None,
    empty_caption: int | None = None,
) -> Fixture:
    """<root>/captions.jsonl in the user format, every variant: a "captions" object, single
    "caption" lines (with and without "language") that merge into one image, a default split."""
    root = Path(root)
    plan = _Plan(corrupt, missing, empty_caption)
    plan_lines = [  # (split field or None, image, captions); None means the default "train"
        (None, "photos/a.jpg", {"en": 2, "de": 1}),
        ("train", "photos/b.jpg", {"de": 1, "en": 1}),
        ("val", "photos/c.jpg", {"en": 1}),
        ("test", "d.jpg", {"de": 2}),
    ]
    lines = []
    for index, (split, image, counts) in enumerate(plan_lines):
        captions = {
            language: [caption(index, language, n) for n in range(count)]
            for language, count in counts.items()
        }
        expected_split = {None: "train", "val": "validation"}.get(split, split)
        captions = plan.add(expected_split, image, root / image, captions)
        extra = {} if split is None else {"split": split}
        if index == 1:  # one line per caption, the English one relying on the default language
            lines.append({"image": image, "caption": captions["de"][0], "language": "de", **extra})
            lines.append({"image": image, "caption": captions["en"][0], **extra})
        else:
            lines.append({"image": image, "captions": captions, **extra})
    _write_lines(root / "captions.jsonl", [json.dumps(line, ensure_ascii=False) for line in lines])
    return plan.fixture("jsonl", root, root)


MAKERS = {
    "karpathy": make_karpathy,
    "crossmodal3600": make_crossmodal3600,
    "xtd10": make_xtd10,
    "multi30k": make_multi30k,
    "jsonl": make_jsonl,
}


def _write_lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(line + "\n" for line in lines).encode("utf-8")
    if path.suffix == ".gz":
        data = gzip.compress(data, mtime=0)
    path.write_bytes(data)
