"""Opens the dataset and tokenizer an experiment's `data` config names.

`data.name = webdataset` trains from img2dataset's shards (`data.shards`, streamed: `streaming.py`)
and evaluates on the prepared dataset at `data.eval_dataset_dir`. Otherwise `data.dataset_dir` (a
prepared tfds directory) wins, then `data.name` picks a builder that prepares itself into
`data.data_dir`: the generated demo set (as pixels, or as detector regions: `demo_regions`), or a
published layout (`layouts.LAYOUTS`, or the region-feature layouts `regions.LAYOUTS`) read from
`data.manual_dir`. The tokenizer is `data.tokenizer`, or the one trained beside the demo data.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any

import ml_collections
import tensorflow_datasets as tfds

from vlretrieval.data import labels as label_lib
from vlretrieval.data import shard_index, subsets
from vlretrieval.data import shards as shard_files
from vlretrieval.data.builders import (
    building,
    captions,
    demo_regions,
    demo_scenes,
    image_captions,
    layouts,
    regions,
    translation_pairs,
)
from vlretrieval.data.tokenizer import TextTokenizer, load_tokenizer
from vlretrieval.errors import UserError
from vlretrieval.models.regions import EXTRA_COLUMNS

DATASETS = ("demo_scenes", "demo_regions", "webdataset", *layouts.LAYOUTS, *regions.LAYOUTS)
# The demo's builders: their tokenizer is the demo's, and its word forms compose their negatives.
DEMO_BUILDERS = (demo_scenes.DemoScenes.name, demo_regions.DemoRegions.name)


@dataclasses.dataclass
class RetrievalData:
    builder: tfds.core.DatasetBuilder
    tokenizer: TextTokenizer
    directory: str
    # language -> kind -> value -> word forms, for composing negative captions; None if unknown.
    content_words: dict[str, Any] | None = None
    # What preparation skipped (counts and examples), for datasets read from published layouts.
    bad_records: dict[str, Any] | None = None
    # data.name = webdataset: the training shards (the builder is then the evaluation dataset).
    shards: shard_files.ShardSource | None = None
    # Category names when the records have labels (their own, or `data.labels` of the demo), else None.
    categories: tuple[str, ...] | None = None
    label_source: str = ""  # config.data.labels
    # config.data.subset: split -> the positions of its records this run reads (`subsets.py`).
    subset: dict[str, tuple[int, ...]] | None = None
    subset_file: str = ""
    _sources: dict[str, Any] | None = None
    _labels: dict[str, Any] = dataclasses.field(default_factory=dict)

    def training_examples(self) -> int | None:
        """Usable training examples per epoch: the train split's, or the shard index's count
        (None when `prepare-data` has not indexed the shards)."""
        if self.shards is not None:
            return self.shards.index["samples"] if self.shards.index else None
        return len(self.split("train"))

    def split(self, name: str):
        """A random-access data source over one split's records."""
        if self._sources is None:
            self._sources = self.builder.as_data_source()
        if name not in self._sources:
            raise UserError(
                f"split {name!r} is not in the dataset at {self.directory}; "
                f"it has {sorted(self._sources)}"
            )
        return subsets.view(self._sources[name], (self.subset or {}).get(name), name, self.subset_file)

    def labels(self, split: str, needed_by: str) -> Any:
        """[records, categories] multi-hot labels of a split (`labels.py`); refuses, naming
        `needed_by`, when the dataset has no labels."""
        label_lib.require_labels(self.categories, self.directory, needed_by)
        if split not in self._labels:
            self._labels[split] = label_lib.split_labels(self.split(split), self.label_source, len(self.categories))
        return self._labels[split]


def _demo_config(config: ml_collections.ConfigDict, seed: int) -> demo_scenes.DemoScenesConfig:
    sizes = (config.num_train, config.num_validation, config.num_test)
    default = demo_scenes.DEFAULT_CONFIG
    if seed == default.seed and sizes == (default.num_train, default.num_validation, default.num_test):
        return default
    return demo_scenes.DemoScenesConfig(
        name=f"seed{seed}_{'_'.join(map(str, sizes))}",
        seed=seed,
        num_train=sizes[0],
        num_validation=sizes[1],
        num_test=sizes[2],
    )


def _shard_source(config: ml_collections.ConfigDict) -> shard_files.ShardSource:
    """`data.shards`, each checked to be a tar, with the caption languages training reads."""
    fields = shard_files.parse_caption_fields(config.caption_fields)
    paths = shard_files.shard_paths(config.shards)
    shard_files.check_shards(paths)
    shard_languages = list(fields) or [config.caption_language]
    wanted = [language for language in config.languages if language in shard_languages]
    if not wanted:
        where = "config.data.caption_fields" if fields else "KEY.txt (config.data.caption_language)"
        raise UserError(
            f"config.data.languages {tuple(config.languages)} has none of the shards' caption "
            f"languages {shard_languages} (from {where})"
        )
    fields = {language: field for language, field in fields.items() if language in wanted}
    return shard_files.ShardSource(
        tuple(paths), fields, config.caption_language, shard_index.read_index(config.data_dir, paths)
    )


def open_dataset(config: ml_collections.ConfigDict, seed: int, *, training: bool = True) -> RetrievalData:
    """The builder and tokenizer of the experiment's `data` section, preparing data if needed.
    `training=False` (evaluation): webdataset shards are neither needed nor checked."""
    shards = None
    if config.name == "webdataset":
        shards = _shard_source(config) if training else None
        if not config.eval_dataset_dir:
            raise UserError(
                "config.data.eval_dataset_dir is empty: a run trained from webdataset shards evaluates "
                "on a prepared dataset (the directory `vlretrieval prepare-data` printed for it)"
            )
        builder = building.load_prepared_dataset(config.eval_dataset_dir)
    elif config.dataset_dir:
        builder = building.load_prepared_dataset(config.dataset_dir)
    elif config.name == "demo_scenes":
        builder = demo_scenes.prepare_demo_data(config.data_dir, _demo_config(config, seed))
    elif config.name == "demo_regions":
        builder = demo_regions.prepare_demo_regions(
            config.data_dir, _demo_config(config, seed), config.num_regions, config.region_feature_dim
        )
    elif config.name in (*layouts.LAYOUTS, *regions.LAYOUTS):
        if not config.tokenizer:
            raise UserError(
                f"config.data.tokenizer is empty: {config.name} data needs a local tokenizer "
                "(tokenizer.json, a Hugging Face folder or a SentencePiece model)"
            )
        if config.name in regions.LAYOUTS:
            builder = regions.prepare(_region_config(config), config.data_dir)
        else:
            builder = image_captions.prepare(_layout_config(config), config.data_dir)
    else:
        raise UserError(
            f"config.data.name is {config.name!r}; choose one of {DATASETS} "
            "or set config.data.dataset_dir to a prepared tfds dataset"
        )
    directory = demo_scenes.dataset_dir(builder)
    if not config.tokenizer and builder.name not in DEMO_BUILDERS:
        raise UserError(
            f"config.data.tokenizer is empty and the dataset at {directory} has no tokenizer "
            "of its own: set a local tokenizer path"
        )
    tokenizer_path = config.tokenizer or demo_scenes.demo_tokenizer_path(builder)
    tokenizer = load_tokenizer(tokenizer_path)
    caption_languages = set(builder.info.features["captions"].keys())
    missing = [lang for lang in config.languages if lang not in caption_languages]
    if missing:
        raise UserError(
            f"config.data.languages names {missing}, which the dataset at {directory} does not "
            f"have; it has {sorted(caption_languages)}"
        )
    # The demo's word forms compose negatives of the demo's own captions only.
    is_demo = builder.name in DEMO_BUILDERS and shards is None
    return RetrievalData(
        builder=builder, tokenizer=tokenizer, directory=directory,
        content_words=captions.WORD_FORMS if is_demo else None,
        bad_records=None if shards else image_captions.read_bad_records(builder), shards=shards,
        categories=label_lib.dataset_categories(builder, config.labels, directory), label_source=config.labels,
        subset=subsets.read_subset(config.get("subset", ""), streaming=shards is not None),
        subset_file=config.get("subset", ""),
    )


def _layout_config(config: ml_collections.ConfigDict) -> image_captions.ImageCaptionsConfig:
    """The build of `data.name`'s layout from `data.manual_dir`, with the options it takes."""
    options: dict[str, Any] = {}
    if config.name == "karpathy":
        options["restval_to_train"] = config.restval_to_train
        if config.annotation:
            options["annotation"] = config.annotation
    if config.name == "jsonl":
        options["language"] = config.caption_language
    options.update(layouts.parse_layout_options(config.name, config.layout_options))
    return image_captions.builder_config(
        config.name, config.manual_dir, config.images_dir, options, config.on_bad_record
    )


def _region_config(config: ml_collections.ConfigDict) -> regions.RegionCaptionsConfig:
    """The build of `data.name`'s region layout from `data.manual_dir`, packed as the config says."""
    return regions.builder_config(
        config.name, config.manual_dir, config.num_regions, config.region_feature_dim,
        config.captions_per_image, config.caption_language, config.on_bad_record,
    )


def open_translations(
    bitext: ml_collections.ConfigDict, data: ml_collections.ConfigDict, seed: int
) -> tuple[dict[str, Any], list[float]]:
    """The translation pairs `bitext` names: (language pair -> data source, sampling weights).

    `bitext.dataset_dir` (a prepared TranslationPairs dataset) wins, then `bitext.tsv_dir` (built
    once into `data.data_dir`); with neither, the demo's pairs beside the demo data.
    """
    if bitext.dataset_dir:
        builder = building.load_prepared_dataset(bitext.dataset_dir)
    elif bitext.tsv_dir:
        directory = os.path.abspath(bitext.tsv_dir)
        name = "tsv_" + hashlib.sha1(directory.encode()).hexdigest()[:10]
        builder = translation_pairs.prepare(directory, data.data_dir, name)
    elif data.name in ("demo_scenes", "demo_regions") and not data.dataset_dir:
        builder = demo_scenes.prepare_demo_translations(data.data_dir, _demo_config(data, seed))
    else:
        raise UserError(
            "config.objectives.text_text needs translation pairs: set config.bitext.tsv_dir (a "
            "directory of <source>-<target>.tsv files) or config.bitext.dataset_dir"
        )
    available = translation_pairs.pair_sources(builder)
    pairs = list(bitext.language_pairs) or sorted(available)
    unknown = [pair for pair in pairs if pair not in available]
    if unknown:
        raise UserError(
            f"config.bitext.language_pairs names {unknown}, which the translation pairs do not "
            f"have; they have {sorted(available)}"
        )
    weights = list(bitext.pair_weights) or [1.0] * len(pairs)
    if len(weights) != len(pairs) or min(weights) < 0 or sum(weights) <= 0:
        raise UserError(
            f"config.bitext.pair_weights {tuple(bitext.pair_weights)} must be one non-negative "
            f"weight per language pair {tuple(pairs)}, not all zero"
        )
    return {pair: available[pair] for pair in pairs}, [float(w) for w in weights]


def check_image_input(data: RetrievalData, split: str, shape: tuple[int, ...], image_input: str) -> None:
    """The dataset's images fit the model's input (`models.image_shape`): pixels for a patch model,
    packed regions of the model's feature width for a region model (any number of regions: they
    have no position embedding). One line naming both, before any work; a model fed the wrong kind
    would fail deep in jit."""
    source = data.split(split)
    if not len(source):
        return
    value = source[0]["image"]
    is_regions = getattr(value, "ndim", 0) == 2
    if image_input == "regions" and not is_regions:
        raise UserError(
            f"config.model.image_input=regions but the dataset at {data.directory} holds images, not region "
            "features: use a region dataset (data.name demo_regions, precomputed_regions or region_files)"
        )
    if image_input != "regions" and is_regions:
        raise UserError(
            f"the dataset at {data.directory} holds region features [{value.shape[0]}, {value.shape[1]}]: set "
            "config.model.image_input=regions"
        )
    if is_regions and value.shape[1] != shape[1]:
        width, wanted = value.shape[1] - EXTRA_COLUMNS, shape[1] - EXTRA_COLUMNS
        raise UserError(
            f"the dataset at {data.directory} has region features {width} wide (+{EXTRA_COLUMNS} box, flag and "
            f"label columns) but config.model.regions.feature_dim is {wanted}: set it to {width}"
        )
