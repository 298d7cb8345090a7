"""Detector-region datasets (SCAN / VSE++ / TERAN's precomputed features, or one feature file per
image) as one tensorflow-datasets builder.

`region_layouts.py` reads the two layouts; this builder checks each image and writes array_record
files whose `image` is the packed regions of `models/regions.py` (float16 [num_regions,
feature_dim + 7]: features, normalised box and area, valid flag, label), so the input pipeline
and the model take them where they take pixels. Images without boxes get the whole-image box
(0, 0, 1, 1) for every region. An image with more than `num_regions` regions keeps the first
(detectors sort them by confidence), counted as a note in the build summary; fewer are padded.

Bad records are skipped and counted as for the image-caption layouts (`bad_records.json`, or
`on_bad_record="fail"`): a missing or unreadable feature file, non-finite values, zero regions, an
empty caption. Files that disagree with the config or each other (a feature width other than
`region_feature_dim`, a caption count unlike the features', boxes shaped unlike them) are refused
before anything is written.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from vlretrieval.data.builders import building, region_layouts
from vlretrieval.data.builders.image_captions import BAD_RECORD_POLICIES, BadRecords, bad_records_path, summary
from vlretrieval.errors import UserError
from vlretrieval.models.regions import STORAGE_DTYPE, pack_regions, packed_width

log = logging.getLogger(__name__)

LAYOUTS = region_layouts.LAYOUTS
_FLOAT16_MAX = float(np.finfo(np.float16).max)


@dataclasses.dataclass(eq=False)
class RegionCaptionsConfig(tfds.core.BuilderConfig):
    """Which directory, in which layout, packed how, a build reads."""

    layout: str = "precomputed_regions"
    source_dir: str = ""
    num_regions: int = 36
    feature_dim: int = 2048
    captions_per_image: int = 5  # precomputed_regions: caption lines per image
    language: str = "en"  # the language of captions given without one
    languages: tuple[str, ...] = ()
    splits: tuple[str, ...] = ()
    on_bad_record: str = "skip"


def region_features(feature_dim: int, num_regions: int) -> tfds.features.Tensor:
    """The `image` feature of a region dataset: packed regions, float16, stored as raw bytes (a
    float list would take twice the disk)."""
    return tfds.features.Tensor(shape=(num_regions, packed_width(feature_dim)), dtype=STORAGE_DTYPE,
                                encoding=tfds.features.Encoding.BYTES)


def whole_image_boxes(count: int) -> np.ndarray:
    return np.tile(np.array([[0.0, 0.0, 1.0, 1.0]], np.float32), (count, 1))


class RegionCaptions(building.LocalBuilder):
    """One image per example: its packed regions, id and captions in every language."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}

    def _info(self) -> tfds.core.DatasetInfo:
        config = self.builder_config
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__.splitlines()[0],
            features=tfds.features.FeaturesDict({
                "image": region_features(config.feature_dim, config.num_regions),
                "image_id": tfds.features.Text(),
                "captions": tfds.features.FeaturesDict(
                    {lang: tfds.features.Sequence(tfds.features.Text()) for lang in config.languages}
                ),
            }),
            metadata=tfds.core.MetadataDict(
                layout=config.layout, source_dir=config.source_dir, num_regions=config.num_regions,
                feature_dim=config.feature_dim, captions_per_image=config.captions_per_image,
                language=config.language, on_bad_record=config.on_bad_record,
            ),
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator[tuple[str, dict[str, Any]]]]:
        del dl_manager  # local files only
        self.bad_records = BadRecords(self.builder_config.on_bad_record)
        self.notes: collections.Counter[str] = collections.Counter()
        return {split: self._generate_examples(split) for split in self.builder_config.splits}

    def _generate_examples(self, split: str) -> Iterator[tuple[str, dict[str, Any]]]:
        config = self.builder_config
        records = region_layouts.read_split(config.layout, config.source_dir, split, config.captions_per_image,
                                            config.language, config.languages)
        usable = total = 0
        for position, record in enumerate(records):
            total += 1
            example = self._checked(record)
            if example is not None:
                usable += 1
                yield f"{position:09d}:{record.image_id}", example
        if not usable:  # tfds would stop with "No examples were yielded", naming no cause
            raise UserError(
                f"{config.layout} split {split!r} in {config.source_dir}: none of its {total} images is usable "
                f"({summary(self.bad_records.to_json())[len('skipped '):]})"
            )

    def _checked(self, record: region_layouts.RegionRecord) -> dict[str, Any] | None:
        """The example for `record`, or None (counted) if its regions or every caption are bad."""
        captions: dict[str, list[str]] = {}
        for language, texts in record.captions.items():
            captions[language] = []
            for text in texts:
                if text.strip():
                    captions[language].append(text.strip())
                else:
                    self.bad_records.found("empty caption", f"{record.image_id} ({language}) in {record.where}")
        if not any(captions.values()):
            self.bad_records.found("image without captions", record.where)
            return None
        try:
            packed = self._packed(record.load())
        except region_layouts.BadRecord as bad:
            self.bad_records.found(str(bad), record.where)
            return None
        return {"image": packed, "image_id": record.image_id, "captions": captions}

    def _packed(self, regions: region_layouts.Regions) -> np.ndarray:
        """The packed regions, or BadRecord; more than num_regions keep the first, noted."""
        features, boxes, labels = regions.features, regions.boxes, regions.labels
        if not len(features):
            raise region_layouts.BadRecord("zero regions")
        if not np.isfinite(features).all():
            raise region_layouts.BadRecord("non-finite feature values")
        if np.abs(features).max() > _FLOAT16_MAX:
            raise region_layouts.BadRecord("feature values beyond float16's range")
        keep = self.builder_config.num_regions
        if len(features) > keep:
            self.notes[f"more than {keep} regions (kept the first {keep})"] += 1
        features = features[:keep]
        boxes = whole_image_boxes(len(features)) if boxes is None else boxes[:keep]
        try:
            return pack_regions(features, boxes, keep, None if labels is None else labels[:keep])
        except ValueError:
            raise region_layouts.BadRecord("region labels out of range") from None


def builder_config(layout: str, source_dir: str, num_regions: int, feature_dim: int, captions_per_image: int = 5,
                   language: str = "en", on_bad_record: str = "skip") -> RegionCaptionsConfig:
    """The config of a build, named by a hash of everything that changes the data (so two source
    folders, or one packed two ways, never share a folder). Reads the caption files only."""
    if layout not in LAYOUTS:
        raise UserError(f"unknown region layout {layout!r}; choose one of {LAYOUTS}")
    if on_bad_record not in BAD_RECORD_POLICIES:
        raise UserError(f"config.data.on_bad_record is {on_bad_record!r}; choose one of {BAD_RECORD_POLICIES}")
    if not source_dir or not os.path.isdir(source_dir):
        raise UserError(f"config.data.manual_dir {source_dir!r} is not a directory: point it at the {layout} files")
    source_dir = os.path.abspath(source_dir)
    if layout != "precomputed_regions":
        captions_per_image = 0  # not read: it must not change the build's name
    splits, languages = region_layouts.layout_splits(layout, source_dir, language)
    identity = json.dumps([layout, source_dir, num_regions, feature_dim, captions_per_image, language, on_bad_record])
    return RegionCaptionsConfig(
        name=f"{layout}_{hashlib.sha1(identity.encode()).hexdigest()[:12]}",
        description=f"{layout} layout read from {source_dir}, {num_regions} regions of {feature_dim} features",
        layout=layout, source_dir=source_dir, num_regions=num_regions, feature_dim=feature_dim,
        captions_per_image=captions_per_image, language=language, languages=languages, splits=splits,
        on_bad_record=on_bad_record,
    )


def _builder(config: RegionCaptionsConfig, data_dir: str) -> tuple[RegionCaptions, bool]:
    """The builder and whether its dataset is prepared (tfds warns about a missing one)."""
    with building.quiet_tfds():
        builder = RegionCaptions(config=config, data_dir=data_dir, file_format="array_record")
        return builder, builder.is_prepared()


def notes_summary(bad_records: dict[str, Any] | None) -> str:
    """"; note: 3 x more than 36 regions (kept the first 36)", or "" without notes."""
    notes = (bad_records or {}).get("notes") or {}
    return "".join(f"; note: {count} x {note}" for note, count in sorted(notes.items()))


def prepare(config: RegionCaptionsConfig, data_dir: str) -> RegionCaptions:
    """Builds (once) the dataset `config` describes into `data_dir`, printing what it skipped.
    Every file's header is checked first: a refusal leaves nothing written."""
    what = f"the {config.layout} dataset"
    if not _builder(config, data_dir)[1]:
        region_layouts.check_layout(config.layout, config.source_dir, config.feature_dim, config.captions_per_image,
                                    config.language)
    root = building.ensure_data_dir(data_dir, what)
    with building.exclusive_lock(root / f".{config.name}.lock"):
        builder, prepared = _builder(config, data_dir)
        if not prepared:
            building.run_build(builder, data_dir, what, "the features' size")
            bad_records = {**builder.bad_records.to_json(), "notes": dict(builder.notes)}
            builder, _ = _builder(config, data_dir)  # reopen, so the builder reads what was written
            with open(bad_records_path(builder), "w") as handle:
                json.dump(bad_records, handle, indent=1)
            sizes = ", ".join(f"{name} {info.num_examples}" for name, info in sorted(builder.info.splits.items()))
            log.info(f"{config.layout}: {sizes} images; {summary(bad_records)}{notes_summary(bad_records)}")
    return builder
