"""Readers of the two detector-region layouts, for the `regions.py` builder.

  precomputed_regions  SCAN / VSE++ / TERAN's precomputed release: `{split}_ims.npy` [N, R, F]
                       (memory-mapped: COCO's is 33 GB) and `{split}_caps.txt`, the captions in
                       image order, `captions_per_image` lines per image. Optional
                       `{split}_boxes.npy` [N, R, 4] (x1, y1, x2, y2) in pixels with
                       `{split}_sizes.npy` [N, 2] (width, height), or already normalised (every
                       value <= 1) without sizes. Splits train, dev (-> "validation"), test,
                       testall. Image ids are row numbers.
  region_files         `captions.jsonl` lines {"image": "<id>", "split": "train", "captions":
                       [...] or {"en": [...], "de": [...]}} and one file per image:
                       `features/<id>.npz` (`features` [r, F] (TERAN's `feat` too), optional
                       `boxes` [r, 4], `image_size` [2] = (width, height) meaning the boxes are in
                       pixels, `labels` [r] integer classes) or `features/<id>.npy` (features only).

Without boxes every region gets the whole-image box (0, 0, 1, 1): the model then sees no
geometry. `check_layout` reads every header before anything is built and refuses (one
`UserError` line naming the file and the numbers) a feature width other than the config's, a
caption count that does not match the features, or boxes / sizes shaped unlike the features. A
bad image (missing or unreadable file, non-finite values, ...) is `BadRecord`, the builder's to
count.
"""

from __future__ import annotations

import dataclasses
import os
import zipfile
import zlib
from collections.abc import Callable, Iterator

import numpy as np

from vlretrieval.data.builders import layout_files
from vlretrieval.errors import UserError, first_line

LAYOUTS = ("precomputed_regions", "region_files")
# SCAN's split names, in its order; "dev" is the validation split.
SCAN_SPLITS = {"train": "train", "dev": "validation", "test": "test", "testall": "testall"}
# Normalised boxes may exceed 1 by rounding; beyond this they are pixels.
_NORMALISED_TOLERANCE = 1e-3
_FEATURE_NAMES = ("features", "feat")  # npz member names, ours then TERAN's
_READ_ERRORS = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error)


class BadRecord(Exception):
    """One image's features cannot be used; the message is the problem, as counted."""


@dataclasses.dataclass(frozen=True)
class Regions:
    features: np.ndarray  # [r, F]
    boxes: np.ndarray | None  # [r, 4] x1, y1, x2, y2 as fractions of the image; None: whole image
    labels: np.ndarray | None  # [r] integers, or None


@dataclasses.dataclass(frozen=True)
class RegionRecord:
    image_id: str
    where: str  # the file (and row) the features come from: what a bad-record count names
    captions: dict[str, list[str]]  # language -> raw captions, empty ones kept
    load: Callable[[], Regions]  # reads the features; raises BadRecord


def layout_splits(layout: str, source_dir: str, language: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(tfds split names, sorted languages) of a layout, from its caption files only."""
    if layout == "precomputed_regions":
        language = layout_files.check_language(language, "config.data.caption_language")
        return tuple(split for split, _ in _scan_files(source_dir)), (language,)
    by_split = _region_captions(source_dir, language)
    languages = {code for images in by_split.values() for captions in images.values() for code in captions}
    return tuple(by_split), tuple(sorted(languages))


def check_layout(layout: str, source_dir: str, feature_dim: int, captions_per_image: int, language: str) -> None:
    """Refuses a build whose files disagree with each other or the config, reading headers only."""
    if layout == "precomputed_regions":
        for _, paths in _scan_files(source_dir):
            _check_scan_split(paths, feature_dim, captions_per_image)
        return
    for images in _region_captions(source_dir, language).values():
        for image_id in images:
            path = _feature_file(source_dir, image_id)
            if os.path.isfile(path):
                _check_region_file(path, feature_dim)


def read_split(layout: str, source_dir: str, split: str, captions_per_image: int, language: str,
               languages: tuple[str, ...]) -> Iterator[RegionRecord]:
    """The records of one split in file order, every language of `languages` in each."""
    if layout == "precomputed_regions":
        yield from _scan_records(dict(_scan_files(source_dir))[split], captions_per_image, language)
        return
    for image_id, captions in _region_captions(source_dir, language)[split].items():
        path = _feature_file(source_dir, image_id)
        by_language = {code: captions.get(code, []) for code in languages}
        yield RegionRecord(image_id, path, by_language, lambda path=path: _load_region_file(path))


def normalised_boxes(boxes: np.ndarray, size: np.ndarray | None) -> np.ndarray:
    """Boxes as fractions of the image: divided by (width, height) when the size is given."""
    boxes = np.asarray(boxes, np.float32)
    if not np.isfinite(boxes).all():
        raise BadRecord("non-finite boxes")
    if size is None:
        if boxes.size and boxes.max() > 1 + _NORMALISED_TOLERANCE:
            raise BadRecord("boxes in pixels without the image size")
        return boxes
    size = np.asarray(size, np.float32)
    if not (np.isfinite(size).all() and (size > 0).all()):
        raise BadRecord("image size not two positive numbers")
    return boxes / np.tile(size, 2)


# --- precomputed_regions -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _ScanSplit:
    features: str
    captions: str
    boxes: str | None
    sizes: str | None


def _scan_files(source_dir: str) -> list[tuple[str, _ScanSplit]]:
    """(tfds split, its files) for every `{split}_ims.npy`, SCAN's splits first."""
    names = sorted(name[: -len("_ims.npy")] for name in os.listdir(source_dir) if name.endswith("_ims.npy"))
    if not names:
        raise UserError(f"{source_dir} holds no {{split}}_ims.npy: point config.data.manual_dir at the "
                        "folder of train_ims.npy, train_caps.txt, ...")
    names.sort(key=lambda name: (list(SCAN_SPLITS).index(name) if name in SCAN_SPLITS else len(SCAN_SPLITS)))
    found = []
    for name in names:
        def path(suffix: str, name: str = name) -> str:
            return os.path.join(source_dir, f"{name}_{suffix}")

        captions = layout_files.require_file(path("caps.txt"), "captions file")
        boxes = path("boxes.npy") if os.path.isfile(path("boxes.npy")) else None
        sizes = path("sizes.npy") if boxes and os.path.isfile(path("sizes.npy")) else None
        split = layout_files.split_name(SCAN_SPLITS.get(name, name), path("ims.npy"))
        if split in dict(found):
            raise UserError(f"{source_dir}: {name}_ims.npy and another file are both the {split!r} split: keep one")
        found.append((split, _ScanSplit(path("ims.npy"), captions, boxes, sizes)))
    return found


def _open_npy(path: str) -> np.ndarray:
    """A memory map of a whole-split array: unreadable is a refusal, not one bad image."""
    try:
        return np.load(path, mmap_mode="r")
    except _READ_ERRORS as error:
        raise UserError(f"{path}: cannot be read as a numpy array ({first_line(error)})") from None


def _check_scan_split(paths: _ScanSplit, feature_dim: int, captions_per_image: int) -> None:
    features = _open_npy(paths.features)
    if features.ndim != 3:
        raise UserError(f"{paths.features}: shape {features.shape}; expected [images, regions, {feature_dim}]")
    count, regions, width = features.shape
    if width != feature_dim:
        raise UserError(f"{paths.features}: region features are {width} wide but config.data.region_feature_dim "
                        f"is {feature_dim}: set it to {width}")
    lines = len(layout_files.read_lines(paths.captions))
    if lines != count * captions_per_image:
        raise UserError(f"{paths.captions} has {lines} lines but {paths.features} holds {count} images: expected "
                        f"{count} x {captions_per_image} = {count * captions_per_image} "
                        f"(config.data.captions_per_image is {captions_per_image})")
    if paths.boxes is None:
        return
    boxes = _open_npy(paths.boxes)
    if boxes.shape != (count, regions, 4):
        raise UserError(f"{paths.boxes}: shape {boxes.shape}, but {paths.features} is {features.shape}: "
                        f"boxes must be [{count}, {regions}, 4]")
    if paths.sizes is not None:
        sizes = _open_npy(paths.sizes)
        if sizes.shape != (count, 2):
            raise UserError(f"{paths.sizes}: shape {sizes.shape}; expected [{count}, 2] (each image's width, "
                            f"height) for the {count} images of {paths.features}")
    elif boxes.size and (largest := float(np.nanmax(boxes))) > 1 + _NORMALISED_TOLERANCE:
        sizes_path = paths.features[: -len("ims.npy")] + "sizes.npy"
        raise UserError(f"{paths.boxes}: values up to {largest:g} are pixels, and there is no {sizes_path}: "
                        f"add it ([{count}, 2]: each image's width, height) or normalise the boxes to [0, 1]")


def _scan_records(paths: _ScanSplit, captions_per_image: int, language: str) -> Iterator[RegionRecord]:
    features = np.load(paths.features, mmap_mode="r")
    boxes = np.load(paths.boxes, mmap_mode="r") if paths.boxes else None
    sizes = np.load(paths.sizes) if paths.sizes else None
    lines = layout_files.read_lines(paths.captions)

    def load(row: int) -> Regions:
        found = None if boxes is None else normalised_boxes(boxes[row], None if sizes is None else sizes[row])
        return Regions(np.asarray(features[row], np.float32), found, None)

    for row in range(features.shape[0]):
        captions = lines[row * captions_per_image: (row + 1) * captions_per_image]
        yield RegionRecord(str(row), f"{paths.features}[{row}]", {language: captions}, lambda row=row: load(row))


# --- region_files --------------------------------------------------------------------------------


def _feature_file(source_dir: str, image_id: str) -> str:
    """features/<id>.npz, else features/<id>.npy; the .npz path when neither exists."""
    stem = os.path.join(source_dir, "features", image_id)
    return f"{stem}.npy" if not os.path.isfile(f"{stem}.npz") and os.path.isfile(f"{stem}.npy") else f"{stem}.npz"


def _region_captions(source_dir: str, language: str) -> dict[str, dict[str, dict[str, list[str]]]]:
    """split -> image id -> language -> captions, from captions.jsonl; lines naming one image in
    one split are merged."""
    layout_files.check_language(language, "config.data.caption_language")
    path = layout_files.require_file(os.path.join(source_dir, "captions.jsonl"), "captions file")
    by_split: dict[str, dict[str, dict[str, list[str]]]] = {}
    for number, line in layout_files.json_lines(path):
        where = f"{path}, line {number}"
        image_id = layout_files.field(line, "image", where, str)
        if not image_id or os.path.isabs(image_id) or ".." in image_id.split("/"):
            raise UserError(f"{where}: image {image_id!r} is not an id under features/")
        split = layout_files.split_name(line.get("split", "train"), where)
        value = layout_files.field(line, "captions", where)
        if isinstance(value, list):
            value = {language: value}
        if not isinstance(value, dict):
            raise UserError(f"{where}: 'captions' must be a list of captions or {{language: [captions]}}")
        captions = by_split.setdefault(split, {}).setdefault(image_id, {})
        for code, texts in value.items():
            code = layout_files.check_language(code, where)
            captions.setdefault(code, []).extend(layout_files.strings(texts, f"{where}, captions[{code!r}]"))
    return by_split


def _header_shape(handle) -> tuple[int, ...] | None:
    """The shape in an .npy header, or None for a header this reader does not know."""
    version = np.lib.format.read_magic(handle)
    reader = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(version)
    return None if reader is None else reader(handle)[0]


def _file_shapes(path: str) -> dict[str, tuple[int, ...] | None]:
    """Array name -> shape of a feature file, from headers only."""
    if path.endswith(".npy"):
        with open(path, "rb") as handle:
            return {"features": _header_shape(handle)}
    shapes = {}
    with zipfile.ZipFile(path) as archive:
        for member in archive.namelist():
            if member.endswith(".npy"):
                with archive.open(member) as handle:
                    shapes[member[: -len(".npy")]] = _header_shape(handle)
    return shapes


def _check_region_file(path: str, feature_dim: int) -> None:
    try:
        shapes = _file_shapes(path)
    except _READ_ERRORS:
        return  # unreadable: one bad record, counted when the build reaches it
    name = next((name for name in _FEATURE_NAMES if name in shapes), None)
    features = shapes.get(name)
    if features is None:
        return
    if len(features) != 2:
        raise UserError(f"{path}: {name} has shape {features}; expected [regions, {feature_dim}]")
    count, width = features
    if width != feature_dim:
        raise UserError(f"{path}: region features are {width} wide but config.data.region_feature_dim is "
                        f"{feature_dim}: set it to {width} (every file must have the same width)")
    expected = {"boxes": (count, 4), "image_size": (2,), "labels": (count,)}
    for array, shape in expected.items():
        if shapes.get(array) not in (None, shape):
            raise UserError(f"{path}: {array} has shape {shapes[array]}, but {name} is {features}: expected "
                            f"{list(shape)}")


def _load_region_file(path: str) -> Regions:
    if not os.path.isfile(path):
        raise BadRecord("missing feature file")
    try:
        if path.endswith(".npy"):
            return Regions(_features(np.load(path)), None, None)
        with np.load(path) as archive:
            name = next((name for name in _FEATURE_NAMES if name in archive), None)
            if name is None:
                raise BadRecord(f"no {' or '.join(_FEATURE_NAMES)} array")
            arrays = {key: archive[key] for key in ("boxes", "image_size", "labels") if key in archive}
            features = _features(archive[name])
    except _READ_ERRORS:
        raise BadRecord("unreadable feature file") from None
    count = len(features)
    expected = {"boxes": (count, 4), "image_size": (2,), "labels": (count,)}
    if any(array.shape != expected[name] for name, array in arrays.items()):  # headers the check could not read
        raise BadRecord("arrays shaped unlike the features")
    boxes = arrays.get("boxes")
    if boxes is not None:
        boxes = normalised_boxes(boxes, arrays.get("image_size"))
    labels = arrays.get("labels")
    if labels is not None and not np.issubdtype(labels.dtype, np.integer):
        raise BadRecord("region labels are not integers")
    return Regions(features, boxes, labels)


def _features(array: np.ndarray) -> np.ndarray:
    if not np.issubdtype(array.dtype, np.number) or array.ndim != 2:
        raise BadRecord("unreadable feature file")
    return array.astype(np.float32)
