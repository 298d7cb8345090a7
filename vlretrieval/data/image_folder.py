"""Image-classification data for zero-shot evaluation: a folder of class folders, or a tfds
image-classification dataset prepared on this machine, read into uint8 images (the evaluation
transform, `images.eval_image`), an integer label per image and the class names prompts use.

Folder layout: `root/<split>/<class folder>/*.jpg|jpeg|png|webp`. Labels index the class folders
in sorted order, and a folder's underscores read as spaces in prompts (`golden_retriever` ->
"golden retriever"), unless `class_names` says otherwise (a list, a {folder: name} mapping, or a
file of either: `read_class_names`). Undecodable images are skipped and counted
(`image_captions.BadRecords`), never fatal: one broken JPEG must not end a benchmark suite.

Every host reads every file to decide which images count (so labels agree on every host), but with
`process_count` > 1 decodes and holds only its share (`pipeline.HostImages`, as `load_split`).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, UnidentifiedImageError

from vlretrieval.data.builders import building
from vlretrieval.data.builders.image_captions import BadRecords, check_image, summary
from vlretrieval.data.images import eval_image
from vlretrieval.data.pipeline import HostImages
from vlretrieval.errors import UserError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
ClassNames = Sequence[str] | Mapping[str, str] | str | os.PathLike | None
# Images are checked and decoded in chunks by a thread pool: PIL releases the GIL while it
# decodes, and a chunk bounds how many encoded files are held at once.
_CHUNK = 256
_WORKERS = min(16, os.cpu_count() or 1)
_DECODE_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError)


@dataclasses.dataclass
class ClassificationSplit:
    """One split of an image-classification dataset, in memory."""

    images: np.ndarray | HostImages  # uint8 [n, size, size, 3], or this host's share of them
    labels: np.ndarray  # int32 [n]: the class of every image (on every host), an index into class_names
    class_names: list[str]  # the name prompts use for each class, by label
    source: str  # where the split was read from (for messages and results)
    bad_records: dict[str, Any]  # BadRecords.to_json(): the images skipped, counted by problem

    def __len__(self) -> int:
        return len(self.labels)


def prompt_name(folder: str) -> str:
    """The class name a folder (or a tfds ClassLabel name) gives prompts: underscores as spaces."""
    return folder.replace("_", " ")


def read_class_names(path: str | os.PathLike) -> list[str] | dict[str, str]:
    """A class-names file: JSON (a list of names, or a {folder: prompt name} object) or text with
    one name per line (blank lines ignored)."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as error:
        raise UserError(f"cannot read the class-names file {path} ({building.one_line(error)})") from error
    if not os.fspath(path).endswith(".json"):
        return [line.strip() for line in text.splitlines() if line.strip()]
    try:
        names = json.loads(text)
    except json.JSONDecodeError as error:
        raise UserError(f"the class-names file {path} is not valid JSON ({building.one_line(error)})") from error
    is_list = isinstance(names, list) and all(isinstance(name, str) for name in names)
    is_mapping = isinstance(names, dict) and all(isinstance(name, str) for name in names.values())
    if not (is_list or is_mapping):
        raise UserError(f"the class-names file {path} must hold a list of names or a {{folder: name}} object")
    return names


def resolve_class_names(folders: Sequence[str], class_names: ClassNames, where: str) -> tuple[list[str], list[str]]:
    """(folders in label order, their prompt names). None: sorted folders, underscores as spaces.
    A {folder: name} mapping renames folders (labels stay in sorted order); a list names every
    folder and its order is the label order. A folder is named as it is or with underscores as
    spaces. Names that do not match the folders one to one are a UserError: a silent mismatch
    would score the wrong classes."""
    folders = sorted(folders)
    if class_names is None:
        return folders, [prompt_name(folder) for folder in folders]
    if isinstance(class_names, (str, os.PathLike)):
        class_names = read_class_names(class_names)
    folder_of = {**{prompt_name(folder): folder for folder in folders}, **{folder: folder for folder in folders}}
    entries = list(class_names)  # a list's names, or a mapping's keys
    matched = [folder_of.get(entry) for entry in entries]
    _check_one_to_one(folders, matched, [entry for entry, folder in zip(entries, matched) if folder is None], where)
    if isinstance(class_names, Mapping):
        renamed = {folder: class_names[entry] for entry, folder in zip(entries, matched)}
        return folders, [renamed[folder] for folder in folders]
    return matched, [prompt_name(folder) for folder in matched]


def _check_one_to_one(folders: Sequence[str], matched: Sequence[str | None], unmatched: Sequence[str],
                      where: str) -> None:
    named = collections.Counter(folder for folder in matched if folder is not None)
    problems = []
    if unnamed := [folder for folder in folders if folder not in named]:
        problems.append(f"classes without a name: {_few(unnamed)}")
    if unmatched:
        problems.append(f"names without a class: {_few(unmatched)}")
    if repeated := sorted(folder for folder, count in named.items() if count > 1):
        problems.append(f"classes named more than once: {_few(repeated)}")
    if problems:
        raise UserError(f"the class names do not match the classes of {where}: {'; '.join(problems)}")


def _few(names: Sequence[str], shown: int = 5) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(repr(name) for name in names[:shown]) + more


def load_image_folder(
    root: str | os.PathLike,
    split: str,
    image_size: int,
    class_names: ClassNames = None,
    process_index: int = 0,
    process_count: int = 1,
) -> ClassificationSplit:
    """`root/<split>/<class>/*.jpg|jpeg|png|webp` as a `ClassificationSplit` (module docstring)."""
    split_dir = _split_dir(root, split)
    folders = [entry.name for entry in os.scandir(split_dir) if entry.is_dir() and not entry.name.startswith(".")]
    if not folders:
        raise UserError(f"split folder {split_dir} is empty: no class folders ({split_dir}/<class name>/<images>)")
    ordered, names = resolve_class_names(folders, class_names, split_dir)
    items = []
    for label, folder in enumerate(ordered):
        class_dir = os.path.join(split_dir, folder)
        files = _image_files(class_dir)
        if not files:  # still a class: images of other classes may be mistaken for it
            log.warning(f"class folder {class_dir} has no images")
        items += [(path, label, path) for path in files]
    if not items:
        suffixes = "/".join(IMAGE_SUFFIXES)
        raise UserError(f"split folder {split_dir} is empty: its class folders hold no {suffixes} files")
    return _load(items, image_size, names, split_dir, process_index, process_count)


def _split_dir(root, split: str) -> str:
    if not os.path.isdir(root):
        raise UserError(f"image folder root {root} does not exist or is not a directory")
    split_dir = os.path.join(root, split)
    if not os.path.isdir(split_dir):
        found = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
        raise UserError(f"split folder {split_dir} does not exist; {root} has {found or 'no folders'}")
    return split_dir


def _image_files(folder: str) -> list[str]:
    """The image files of a class folder in name order (other files are not images: ignored)."""
    return sorted(
        entry.path for entry in os.scandir(folder)
        if entry.is_file() and entry.name.lower().endswith(IMAGE_SUFFIXES) and not entry.name.startswith(".")
    )


def load_tfds_classification(
    name: str,
    data_dir: str | os.PathLike | None,
    split: str,
    image_size: int,
    class_names: ClassNames = None,
    process_index: int = 0,
    process_count: int = 1,
    *,
    image_key: str = "image",
    label_key: str = "label",
) -> ClassificationSplit:
    """A tfds image-classification dataset already prepared in `data_dir` (`name` as tfds.builder
    takes it: "cifar10", "my_set/config:1.0.0") as a `ClassificationSplit`; its ClassLabel names
    play the folders' part for `class_names`. Nothing is downloaded or prepared here: a dataset
    that is not prepared there is a UserError. Read through `as_data_source` (array_record), so
    no TensorFlow is needed."""
    where = f"tfds dataset {name!r} in {data_dir or 'the default data_dir'}"
    try:
        builder = tfds.builder(name, data_dir=None if data_dir is None else os.fspath(data_dir))
    except Exception as error:  # DatasetNotFoundError, or a registered builder that cannot be built
        raise UserError(f"{where} cannot be opened ({building.one_line(error)}): "
                        "prepare it there first (nothing is downloaded here)") from error
    if not builder.is_prepared():
        target = "" if data_dir is None else f" --data_dir {data_dir}"
        raise UserError(f"{where} is not prepared: prepare it there first, e.g. `tfds build {name}{target} "
                        "--file_format=array_record` (nothing is downloaded here)")
    features = builder.info.features
    label_feature = features[label_key] if label_key in features else None
    if image_key not in features or not isinstance(label_feature, tfds.features.ClassLabel):
        raise UserError(f"{where} is not an image-classification dataset: it needs an {image_key!r} feature "
                        f"and a ClassLabel {label_key!r}; it has {sorted(features.keys())}")
    if split.split("[")[0] not in builder.info.splits:
        raise UserError(f"split {split!r} is not in {where}; it has {sorted(builder.info.splits)}")
    try:
        # Encoded bytes, not tfds's decoded arrays: the evaluation transform decodes at its size.
        source = builder.as_data_source(split=split, decoders={image_key: tfds.decode.SkipDecoding()})
    except (NotImplementedError, ValueError) as error:
        raise UserError(f"{where} cannot be read without TensorFlow ({building.one_line(error)}): "
                        "prepare it with --file_format=array_record") from error
    ordered, names = resolve_class_names(label_feature.names, class_names, where)
    label_of = {tfds_name: label for label, tfds_name in enumerate(ordered)}
    label_of = np.asarray([label_of[tfds_name] for tfds_name in label_feature.names], np.int32)
    records = (
        (f"{name} {split} record {index}", int(label_of[record[label_key]]), record[image_key])
        for index, record in enumerate(building.read_all(source))
    )
    return _load(records, image_size, names, where, process_index, process_count)


def _checked(item: tuple[str, int, bytes | str]) -> tuple[bytes | None, str | None]:
    """(the image's bytes, None) or (None, what is wrong with it). Files are read here, in the
    pool, so that they are read in parallel."""
    _, _, data = item
    try:
        if isinstance(data, str):
            with open(data, "rb") as handle:
                data = handle.read()
    except OSError as error:
        return None, f"unreadable image ({building.one_line(error)})"
    try:
        check_image(data)
    except _DECODE_ERRORS:
        return None, "undecodable image"
    return data, None


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _load(items: Iterable[tuple[str, int, bytes | str]], image_size: int, names: list[str], source: str,
          process_index: int, process_count: int) -> ClassificationSplit:
    """Items (where, label, encoded image or its file's path) checked on every host, the usable
    ones numbered in order, and this host's share of them (every `process_count`-th from
    `process_index`) decoded."""
    bad = BadRecords("skip")
    labels: list[int] = []
    share: list[np.ndarray] = []

    def decode(where_and_data: tuple[str, bytes]) -> np.ndarray:
        where, data = where_and_data
        try:
            return eval_image(data, image_size)
        except _DECODE_ERRORS as error:  # it passed the check: not a skip, which hosts must agree on
            raise UserError(f"{where}: the image passed the decode check but not the evaluation "
                            f"transform ({building.one_line(error)}); remove or re-encode it") from error

    with ThreadPoolExecutor(_WORKERS) as pool:
        for chunk in _chunks(items, _CHUNK):
            mine = []
            for (where, label, _), (data, problem) in zip(chunk, pool.map(_checked, chunk)):
                if problem is not None:
                    bad.found(problem, where)
                    continue
                if len(labels) % process_count == process_index:
                    mine.append((where, data))
                labels.append(label)
            share += pool.map(decode, mine)
    if not labels:
        raise UserError(f"no image of {source} is usable ({summary(bad.to_json())[len('skipped '):]})")
    if bad.counts:
        log.warning(f"{source}: {summary(bad.to_json())}")
    stacked = np.stack(share) if share else np.zeros((0, image_size, image_size, 3), np.uint8)
    images = stacked if process_count == 1 else HostImages(len(labels), stacked, process_index, process_count)
    return ClassificationSplit(images, np.asarray(labels, np.int32), list(names), source, bad.to_json())
