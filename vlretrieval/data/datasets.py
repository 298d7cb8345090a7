"""Opens the dataset and tokenizer an experiment's `data` config names.

`data.dataset_dir` (a prepared tfds directory) wins; otherwise `data.name` picks a builder that
prepares itself into `data.data_dir`: the generated demo set, or a published layout
(`layouts.LAYOUTS`) read from `data.manual_dir`. The tokenizer is `data.tokenizer`, or the one
trained beside the demo data.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any

import ml_collections
import tensorflow_datasets as tfds

from vlretrieval.data.builders import (
    building,
    captions,
    demo_scenes,
    image_captions,
    layouts,
    translation_pairs,
)
from vlretrieval.data.tokenizer import TextTokenizer, load_tokenizer
from vlretrieval.errors import UserError

DATASETS = ("demo_scenes", *layouts.LAYOUTS)


@dataclasses.dataclass
class RetrievalData:
    builder: tfds.core.DatasetBuilder
    tokenizer: TextTokenizer
    directory: str
    # language -> kind -> value -> word forms, for composing negative captions; None if unknown.
    content_words: dict[str, Any] | None = None
    # What preparation skipped (counts and examples), for datasets read from published layouts.
    bad_records: dict[str, Any] | None = None
    _sources: dict[str, Any] | None = None

    def split(self, name: str):
        """A random-access data source over one split's records."""
        if self._sources is None:
            self._sources = self.builder.as_data_source()
        if name not in self._sources:
            raise UserError(
                f"split {name!r} is not in the dataset at {self.directory}; "
                f"it has {sorted(self._sources)}"
            )
        return self._sources[name]


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


def open_dataset(config: ml_collections.ConfigDict, seed: int) -> RetrievalData:
    """The builder and tokenizer of the experiment's `data` section, preparing data if needed."""
    if config.dataset_dir:
        builder = building.load_prepared_dataset(config.dataset_dir)
    elif config.name == "demo_scenes":
        builder = demo_scenes.prepare_demo_data(config.data_dir, _demo_config(config, seed))
    elif config.name in layouts.LAYOUTS:
        if not config.tokenizer:
            raise UserError(
                f"config.data.tokenizer is empty: {config.name} data needs a local tokenizer "
                "(tokenizer.json, a Hugging Face folder or a SentencePiece model)"
            )
        builder = image_captions.prepare(_layout_config(config), config.data_dir)
    else:
        raise UserError(
            f"config.data.name is {config.name!r}; choose one of {DATASETS} "
            "or set config.data.dataset_dir to a prepared tfds dataset"
        )
    directory = demo_scenes.dataset_dir(builder)
    if not config.tokenizer and builder.name != demo_scenes.DemoScenes.name:
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
    content_words = captions.WORD_FORMS if builder.name == demo_scenes.DemoScenes.name else None
    return RetrievalData(
        builder=builder, tokenizer=tokenizer, directory=directory, content_words=content_words,
        bad_records=image_captions.read_bad_records(builder),
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
    return image_captions.builder_config(
        config.name, config.manual_dir, config.images_dir, options, config.on_bad_record
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
    elif data.name == "demo_scenes" and not data.dataset_dir:
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
