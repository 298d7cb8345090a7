"""The bundled demo set: procedurally drawn scenes of shapes with captions in five languages.

A tensorflow-datasets builder (array_record files, read back with `as_data_source`, no TensorFlow)
so the demo runs on exactly the code path of real benchmarks, and a `prepare_demo_data` that
builds it once into a data directory, with translation pairs between English and every other
language (`translation_pairs.py`) and a WordPiece tokenizer trained on the training captions and
those pairs. The low-resource language (Italian) has captions in validation and test only.
Everything is a function of the config's seed: two builds are identical.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from vlretrieval.data import tokenizer as tokenizer_lib
from vlretrieval.data.builders import building, captions, scenes, translation_pairs
from vlretrieval.data.builders.building import load_prepared_dataset  # noqa: F401 (API)

# Re-exported: the demo set's vocabulary, languages and scene identity are part of its API.
from vlretrieval.data.builders.captions import (  # noqa: F401
    CONTENT_WORDS,
    LANGUAGES,
    LOW_RESOURCE_LANGUAGE,
)
from vlretrieval.data.builders.scenes import description  # noqa: F401
from vlretrieval.errors import UserError
from vlretrieval.files import replaced_atomically

SPLITS = ("train", "validation", "test")
# Test images get distinct descriptions, so every test caption has exactly one correct image.
UNIQUE_SPLITS = frozenset({"test"})
TOKENIZER_FILENAME = "tokenizer.json"
TOKENIZER_VOCAB_SIZE = 2000
TRANSLATIONS_FOLDER = "demo_translations"  # <data_dir>/demo_translations/en-<xx>.tsv


@dataclasses.dataclass(eq=False)
class DemoScenesConfig(tfds.core.BuilderConfig):
    """Seed and split sizes of a demo build; the name picks its folder under the data dir."""

    seed: int = 0
    num_train: int = 20_000
    num_validation: int = 1_000
    num_test: int = 1_000

    def split_sizes(self) -> dict[str, int]:
        """Number of images per split name."""
        return {"train": self.num_train, "validation": self.num_validation, "test": self.num_test}


DEFAULT_CONFIG = DemoScenesConfig(name="default", description="seed 0, 20k/1k/1k images")


def split_scenes(seed: int, split: str, count: int) -> Iterator[scenes.Scene]:
    """The scenes of one split, without rendering: what the builder draws, for checks and tests."""
    return scenes.sample_scenes(_split_rngs(seed, split)[0], count, unique=split in UNIQUE_SPLITS)


def split_examples(seed: int, split: str, count: int) -> Iterator[dict[str, Any]]:
    """The examples of one split as feature dicts (image, image_id, description, captions)."""
    # Separate streams: the scenes of a split do not depend on how images or captions are drawn,
    # and the low-resource language's captions have their own, so the others are what they were
    # before it existed.
    scene_rng, pixel_rng, caption_rng, low_resource_rng = _split_rngs(seed, split)
    drawn = scenes.sample_scenes(scene_rng, count, unique=split in UNIQUE_SPLITS)
    captioned = tuple(language for language in LANGUAGES if language != LOW_RESOURCE_LANGUAGE)
    for index, scene in enumerate(drawn):
        example_captions = captions.scene_captions(scene, caption_rng, captioned)
        # No training images are captioned in the low-resource language: only evaluation.
        example_captions[LOW_RESOURCE_LANGUAGE] = (
            [] if split == "train"
            else captions.scene_captions(scene, low_resource_rng, (LOW_RESOURCE_LANGUAGE,))[
                LOW_RESOURCE_LANGUAGE
            ]
        )
        yield {
            "image": scenes.render_scene(scene, pixel_rng),
            "image_id": index,
            "description": scenes.description(scene),
            "captions": example_captions,
        }


def _split_rngs(seed: int, split: str) -> list[np.random.Generator]:
    """Independent (scene, pixel, caption, low-resource caption) generators from (seed, split)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}")
    sequence = np.random.SeedSequence([seed, SPLITS.index(split)])
    return [np.random.default_rng(child) for child in sequence.spawn(4)]


def write_demo_translations(directory: str, seed: int, pairs_per_language: int) -> list[str]:
    """`en-<xx>.tsv` for every other demo language: captions of fresh training-like scenes and
    their translations (the same paraphrase template), one pair per line. Returns the paths."""
    os.makedirs(directory, exist_ok=True)
    paths = []
    for index, target in enumerate(language for language in LANGUAGES if language != "en"):
        rng = np.random.default_rng([seed, len(SPLITS), index])
        path = os.path.join(directory, f"en-{target}.tsv")
        with replaced_atomically(path) as temporary, open(temporary, "w", encoding="utf-8") as handle:
            for scene in scenes.sample_scenes(rng, pairs_per_language):
                source_text, target_text = captions.translation_pair(scene, rng, "en", target)
                handle.write(f"{source_text}\t{target_text}\n")
        paths.append(path)
    return paths


class DemoScenes(building.LocalBuilder):
    """Shapes-and-captions scenes, 64x64 RGB, five captions per image in en/de/fr/es (and it,
    outside the training split)."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {
        "1.0.0": "First release.",
        "1.1.0": "Italian captions for validation and test (the low-resource language).",
    }
    BUILDER_CONFIGS = [DEFAULT_CONFIG]
    DEFAULT_BUILDER_CONFIG_NAME = "default"

    def _info(self) -> tfds.core.DatasetInfo:
        config = self.builder_config
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__.splitlines()[0],
            features=tfds.features.FeaturesDict(
                {
                    # Tensor, not Image: Image features need TensorFlow to encode PNGs.
                    "image": tfds.features.Tensor(
                        shape=(scenes.IMAGE_SIZE, scenes.IMAGE_SIZE, 3),
                        dtype=np.uint8,
                        encoding=tfds.features.Encoding.ZLIB,
                    ),
                    "image_id": tfds.features.Scalar(dtype=np.int64),
                    "description": tfds.features.Text(),
                    "captions": tfds.features.FeaturesDict(
                        {lang: tfds.features.Sequence(tfds.features.Text()) for lang in LANGUAGES}
                    ),
                }
            ),
            # Written to metadata.json, so a later run can tell whether a build matches its config.
            metadata=tfds.core.MetadataDict(_config_metadata(config)),
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator[tuple[int, dict[str, Any]]]]:
        del dl_manager  # nothing to download
        sizes = self.builder_config.split_sizes()
        # tfds cannot write an empty split: a size of 0 leaves the split out.
        return {split: self._generate_examples(split, n) for split, n in sizes.items() if n > 0}

    def _generate_examples(self, split: str, count: int) -> Iterator[tuple[int, dict[str, Any]]]:
        yield from enumerate(split_examples(self.builder_config.seed, split, count))


def _config_metadata(config: DemoScenesConfig) -> dict[str, int]:
    return {"seed": config.seed, **{f"num_{split}": n for split, n in config.split_sizes().items()}}


def dataset_dir(builder: tfds.core.DatasetBuilder) -> str:
    """The prepared dataset's folder (dataset_info.json): <data_dir>/demo_scenes/<name>/1.1.0."""
    return os.fspath(builder.data_dir)


def demo_tokenizer_path(builder: tfds.core.DatasetBuilder) -> str:
    """Where `prepare_demo_data` saves the tokenizer trained on this build's training captions."""
    return os.path.join(dataset_dir(builder), TOKENIZER_FILENAME)


def prepare_demo_data(data_dir: str, config: DemoScenesConfig | None = None) -> DemoScenes:
    """Builds the demo set and its tokenizer into `data_dir` on first use; reuses them after."""
    config = config or DEFAULT_CONFIG
    sizes = config.split_sizes()
    if config.num_train < 1 or min(sizes.values()) < 0:
        raise UserError(
            f"demo data sizes {sizes} are invalid: num_train must be at least 1 (the tokenizer "
            "learns from it) and no split may be negative"
        )
    root = building.ensure_data_dir(data_dir, "the demo data")

    # Several processes of one job (local multi-host runs) may prepare the same directory at once:
    # one builds, the others wait and reuse.
    with building.exclusive_lock(root / ".demo_scenes.lock"):
        with building.quiet_tfds():  # tfds warns about the custom config and the missing folder
            builder = DemoScenes(config=config, data_dir=data_dir, file_format="array_record")
            prepared = builder.is_prepared()
        if not prepared:
            _generate(builder, data_dir)
            with building.quiet_tfds():  # reopen, so the builder reads what was written
                builder = DemoScenes(config=config, data_dir=data_dir, file_format="array_record")
        _check_matches_config(builder, config)
        translations = prepare_demo_translations(data_dir, config)
        if not os.path.isfile(demo_tokenizer_path(builder)):
            _train_demo_tokenizer(builder, translations, data_dir)
    return builder


def prepare_demo_translations(data_dir: str, config: DemoScenesConfig):
    """The demo's translation pairs as a prepared `TranslationPairs` dataset (built on first use)."""
    tsv_dir = os.path.join(data_dir, TRANSLATIONS_FOLDER, config.name)
    name = f"demo_{config.name}"
    with building.quiet_tfds():
        existing = translation_pairs.open_prepared(data_dir, name)
    if existing is not None:
        return existing
    if not os.path.isdir(tsv_dir) or len(os.listdir(tsv_dir)) < len(LANGUAGES) - 1:
        # As many pairs per language as there are training images.
        write_demo_translations(tsv_dir, config.seed, config.num_train)
    with building.quiet_tfds():
        built = translation_pairs.prepare(tsv_dir, data_dir, name)
    building.remove_empty_download_folders(data_dir)
    return built


def _generate(builder: DemoScenes, data_dir: str) -> None:
    sizes = "/".join(str(n) for n in builder.builder_config.split_sizes().values())
    building.run_build(builder, data_dir, f"the demo dataset ({sizes} images)", "100 MB")


def _check_matches_config(builder: DemoScenes, config: DemoScenesConfig) -> None:
    """Refuses to reuse a build made from another seed or size under the same config name."""
    found = dict(builder.info.metadata or {})
    wanted = _config_metadata(config)
    if {key: found.get(key) for key in wanted} != wanted:
        raise UserError(
            f"demo data in {dataset_dir(builder)} was built with {found}, not {wanted}: "
            "give this config another name, or delete that folder to rebuild it"
        )


def _train_demo_tokenizer(builder: DemoScenes, translations, data_dir: str) -> None:
    """Trains one WordPiece tokenizer for every language on the training captions and the
    translation pairs (the only text of the low-resource language), and saves it."""
    source = builder.as_data_source(split="train")
    pair_sources = translation_pairs.pair_sources(translations)

    def texts() -> Iterator[str]:
        for example in building.read_all(source):
            for language_captions in example["captions"].values():
                yield from (text.decode("utf-8") for text in language_captions)
        for pairs in pair_sources.values():
            for example in building.read_all(pairs):
                yield example["source"].decode("utf-8")
                yield example["target"].decode("utf-8")

    tokenizer = tokenizer_lib.train_wordpiece_tokenizer(texts(), vocab_size=TOKENIZER_VOCAB_SIZE)
    try:
        tokenizer_lib.TextTokenizer(tokenizer).save(demo_tokenizer_path(builder))
    except OSError as error:
        raise UserError(
            f"cannot write the demo tokenizer into {data_dir} ({building.one_line(error)}): "
            "pass a writable directory"
        ) from error
