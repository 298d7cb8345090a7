"""Image-caption benchmarks in their published layouts, as one tensorflow-datasets builder.

`layouts.py` reads a directory in one of the published layouts (Karpathy JSON, Crossmodal-3600,
XTD10, Multi30K, or a folder of images with a JSON-lines caption file) into uniform records; this
builder checks each record and writes array_record files that hold the image's encoded bytes (the
input pipeline decodes and resizes them), its id and its captions per language.

Bad records do not stop a multi-day run: a missing or undecodable image, or an empty caption, is
skipped and counted (or, with `on_bad_record="fail"`, fails the build naming the file). The counts
are printed when preparation ends, saved beside the data (`bad_records.json`), and printed again
at every training epoch.

The category-labelled layouts (`labelled_layouts.LABELLED_LAYOUTS`) add a `labels` feature: each
record's indices into the sorted category names of the files, which the dataset's metadata holds
as `categories` (read them with `categories(builder)`); a record without a category is skipped and
counted. Caption-only layouts have neither, so their builds are unchanged.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import json
import logging
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, UnidentifiedImageError

from vlretrieval.data.builders import building, labelled_layouts, layouts
from vlretrieval.errors import UserError

log = logging.getLogger(__name__)

BAD_RECORD_POLICIES = ("skip", "fail")
BAD_RECORDS_FILENAME = "bad_records.json"
# Undecodable images are found by decoding at 1/8 scale (JPEG draft mode; asking for 1 x 1 gets
# libjpeg's smallest scale whatever the size): every byte is still entropy-decoded, so a truncated
# or corrupt file fails, at a fraction of a full decode's cost.
_CHECK_SIZE = (1, 1)


@dataclasses.dataclass(eq=False)
class ImageCaptionsConfig(tfds.core.BuilderConfig):
    """Which directory, in which layout, with which options a build reads."""

    layout: str = "jsonl"
    source_dir: str = ""
    images_dir: str = ""
    options: tuple[tuple[str, Any], ...] = ()  # sorted (name, value) pairs for `layouts`
    languages: tuple[str, ...] = ()
    splits: tuple[str, ...] = ()
    on_bad_record: str = "skip"
    categories: tuple[str, ...] = ()  # sorted category names of a labelled layout, else ()

    @property
    def labelled(self) -> bool:
        return self.layout in labelled_layouts.LABELLED_LAYOUTS


class BadRecords:
    """Counts of skipped records by problem, with the first few files named for each."""

    def __init__(self, policy: str):
        self.policy = policy
        self.counts: collections.Counter[str] = collections.Counter()
        self.examples: dict[str, list[str]] = collections.defaultdict(list)

    def found(self, problem: str, where: str) -> None:
        if self.policy == "fail":
            raise UserError(
                f"{where}: {problem} (config.data.on_bad_record is 'fail'; set it to 'skip' to "
                "skip and count such records)"
            )
        self.counts[problem] += 1
        if len(self.examples[problem]) < 5:
            self.examples[problem].append(where)

    def to_json(self) -> dict[str, Any]:
        return {"counts": dict(self.counts), "examples": dict(self.examples)}


def summary(bad_records: dict[str, Any] | None) -> str:
    """One line: "skipped 1 unreadable image (a.jpg), 2 empty captions (...)" or "no bad records"."""
    if not bad_records or not bad_records["counts"]:
        return "no bad records"
    parts = []
    for problem, count in sorted(bad_records["counts"].items()):
        examples = bad_records["examples"].get(problem, [])
        more = ", ..." if count > len(examples) else ""
        parts.append(f"{count} x {problem} ({', '.join(examples)}{more})")
    return "skipped " + "; ".join(parts)


def check_image(data: bytes) -> None:
    """Raises (OSError / PIL errors) unless `data` decodes to a whole image."""
    with Image.open(io.BytesIO(data)) as image:
        image.draft("RGB", _CHECK_SIZE)
        image.load()


class ImageCaptions(building.LocalBuilder):
    """One image per example with its encoded bytes, id and captions in every language."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}

    def _info(self) -> tfds.core.DatasetInfo:
        config = self.builder_config
        features = {
            # Encoded bytes (JPEG, PNG, ...) as stored on disk: an Image feature would need
            # TensorFlow to re-encode, and decoding belongs to the input pipeline.
            "image": tfds.features.Tensor(shape=(), dtype=np.object_),
            "image_id": tfds.features.Text(),
            "captions": tfds.features.FeaturesDict(
                {lang: tfds.features.Sequence(tfds.features.Text())
                 for lang in config.languages}
            ),
        }
        metadata = dict(
            layout=config.layout, source_dir=config.source_dir, images_dir=config.images_dir,
            options=dict(config.options), on_bad_record=config.on_bad_record,
        )
        if config.labelled:
            features["labels"] = tfds.features.Sequence(np.int64)  # indices into `categories`
            metadata["categories"] = list(config.categories)
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__.splitlines()[0],
            features=tfds.features.FeaturesDict(features),
            metadata=tfds.core.MetadataDict(**metadata),
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator[tuple[str, dict[str, Any]]]]:
        del dl_manager  # local files only
        config = self.builder_config
        by_split: dict[str, list[layouts.SourceRecord]] = {split: [] for split in config.splits}
        for record in layouts.read_layout(
            config.layout, config.source_dir, config.images_dir or None, **dict(config.options)
        ):
            by_split.setdefault(record.split, []).append(record)
        self.bad_records = BadRecords(config.on_bad_record)
        self.category_index = {name: index for index, name in enumerate(config.categories)}
        # tfds cannot write an empty split: one that is empty in the files is left out.
        return {
            split: self._generate_examples(split, records) for split, records in by_split.items() if records
        }

    def _generate_examples(self, split: str, records: list[layouts.SourceRecord]):
        usable = 0
        for position, record in enumerate(records):
            example = self._checked(record)
            if example is not None:
                usable += 1
                # The position keeps keys unique even if a layout lists an image twice.
                yield f"{position:09d}:{record.image_id}", example
        if not usable:  # tfds would stop with "No examples were yielded", naming no cause
            config = self.builder_config
            where = config.images_dir or f"{config.source_dir} (config.data.images_dir empty)"
            raise UserError(
                f"{config.layout} split {split!r}: none of its {len(records)} records is usable "
                f"({summary(self.bad_records.to_json())[len('skipped '):]}); images are read from "
                f"{where}: is config.data.images_dir (or manual_dir) the right folder?"
            )

    def _checked(self, record: layouts.SourceRecord) -> dict[str, Any] | None:
        """The example for `record`, or None (counted) if its image, its label or every caption is bad."""
        labelled = self.builder_config.labelled
        if labelled and not record.labels:
            self.bad_records.found("record without a category label", f"{record.image_id} in {record.image_path}")
            return None
        try:
            with open(record.image_path, "rb") as handle:
                data = handle.read()
        except FileNotFoundError:
            self.bad_records.found("missing image", record.image_path)
            return None
        except OSError as error:
            self.bad_records.found(f"unreadable image ({building.one_line(error)})", record.image_path)
            return None
        try:
            check_image(data)
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError):
            self.bad_records.found("undecodable image", record.image_path)
            return None
        captions = {}
        for language in self.builder_config.languages:
            kept = []
            for caption in record.captions.get(language, []):
                if caption.strip():
                    kept.append(caption.strip())
                else:
                    self.bad_records.found(
                        "empty caption", f"{record.image_id} ({language}) in {record.image_path}"
                    )
            captions[language] = kept
        if not any(captions.values()):
            self.bad_records.found("image without captions", record.image_path)
            return None
        example = {"image": data, "image_id": record.image_id, "captions": captions}
        if labelled:
            example["labels"] = np.array([self.category_index[name] for name in record.labels], np.int64)
        return example


def builder_config(
    layout: str,
    source_dir: str,
    images_dir: str = "",
    options: dict[str, Any] | None = None,
    on_bad_record: str = "skip",
) -> ImageCaptionsConfig:
    """The config of a build; its name is a hash of everything that changes the data."""
    if layout not in layouts.LAYOUTS:
        raise UserError(f"unknown dataset layout {layout!r}; choose one of {layouts.LAYOUTS}")
    if on_bad_record not in BAD_RECORD_POLICIES:
        raise UserError(
            f"config.data.on_bad_record is {on_bad_record!r}; choose one of {BAD_RECORD_POLICIES}"
        )
    if not source_dir or not os.path.isdir(source_dir):
        raise UserError(
            f"config.data.manual_dir {source_dir!r} is not a directory: point it at the "
            f"{layout} files as published"
        )
    source_dir = os.path.abspath(source_dir)
    images_dir = os.path.abspath(images_dir) if images_dir else ""
    options = tuple(sorted((options or {}).items()))
    labelled = layout in labelled_layouts.LABELLED_LAYOUTS
    identity = json.dumps([layout, source_dir, images_dir, options, on_bad_record])
    return ImageCaptionsConfig(
        name=f"{layout}_{hashlib.sha1(identity.encode()).hexdigest()[:12]}",
        description=f"{layout} layout read from {source_dir}",
        layout=layout,
        source_dir=source_dir,
        images_dir=images_dir,
        options=options,
        languages=tuple(layouts.layout_languages(layout, source_dir, **dict(options))),
        splits=tuple(layouts.layout_splits(layout, source_dir, **dict(options))),
        on_bad_record=on_bad_record,
        categories=layouts.layout_categories(layout, source_dir, **dict(options)) if labelled else (),
    )


def categories(builder: tfds.core.DatasetBuilder) -> tuple[str, ...] | None:
    """The category names a labelled dataset's `labels` index (its metadata's `categories`), or
    None for data without labels."""
    if "labels" not in builder.info.features.keys():
        return None
    metadata = builder.info.metadata
    names = metadata.get("categories") if metadata is not None else None
    if not isinstance(names, list):
        raise UserError(
            f"the dataset at {os.fspath(builder.data_dir)} has labels but no category names in its "
            "metadata: prepare it again"
        )
    return tuple(names)


def bad_records_path(builder: tfds.core.DatasetBuilder) -> str:
    return os.path.join(os.fspath(builder.data_dir), BAD_RECORDS_FILENAME)


def read_bad_records(builder: tfds.core.DatasetBuilder) -> dict[str, Any] | None:
    """What preparation skipped, or None for a dataset prepared some other way."""
    try:
        with open(bad_records_path(builder)) as handle:
            return json.load(handle)
    except (OSError, json.JSONDecodeError):
        return None


def prepare(config: ImageCaptionsConfig, data_dir: str) -> ImageCaptions:
    """Builds (once) the dataset `config` describes into `data_dir`, printing what it skipped."""
    root = building.ensure_data_dir(data_dir, f"the {config.layout} dataset")
    with building.exclusive_lock(root / f".{config.name}.lock"):
        with building.quiet_tfds():
            builder = ImageCaptions(config=config, data_dir=data_dir, file_format="array_record")
            prepared = builder.is_prepared()
        if not prepared:
            building.run_build(builder, data_dir, f"the {config.layout} dataset", "the images' size")
            bad_records = builder.bad_records.to_json()
            with building.quiet_tfds():  # reopen, so the builder reads what was written
                builder = ImageCaptions(config=config, data_dir=data_dir, file_format="array_record")
            with open(bad_records_path(builder), "w") as handle:
                json.dump(bad_records, handle, indent=1)
            sizes = ", ".join(
                f"{name} {info.num_examples}" for name, info in sorted(builder.info.splits.items())
            )
            log.info(f"{config.layout}: {sizes} images; {summary(bad_records)}")
    return builder
