"""Demo region features: the bundled demo scenes as a detector would hand them over, so the whole
region path (data, model, training, evaluation) runs on a laptop.

Per image: one region per object, its (2r+1)-pixel box (scenes.SIZES, centred on the object)
widened by 0-1 pixel on each side so it always holds the whole shape, labelled with the shape's
index in scenes.SHAPES; plus one or two background regions (random boxes clear of the objects,
label -1). A region's feature is a fixed random projection of its box's pixels (resized to an
8 x 8 grid) beside a colour histogram of the box (4 bins per channel). The regions are shuffled
per image, so their order does not give away the caption's left-to-right or top-to-bottom
relation: only the boxes carry positions. The image ids, captions and tokenizer are the demo
set's own. Everything is a function of the seed: two builds are identical.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from vlretrieval.data.builders import building, demo_scenes, scenes
from vlretrieval.data.builders.regions import region_features
from vlretrieval.errors import UserError
from vlretrieval.files import replaced_atomically
from vlretrieval.models.regions import NO_LABEL, pack_regions

GRID = 8  # box pixels are resized to GRID x GRID x 3 before the projection
HISTOGRAM_BINS = 4  # per colour channel
HISTOGRAM_DIM = 3 * HISTOGRAM_BINS
MIN_FEATURE_DIM = HISTOGRAM_DIM + 4
MIN_REGIONS = 4  # three objects and one background region
BACKGROUND_SIDES = (6, 20)  # side lengths of background boxes in pixels, inclusive
_BACKGROUND_TRIES = 32
_REGION_STREAM = 7  # keeps the region draws apart from the demo set's own streams


@dataclasses.dataclass(eq=False)
class DemoRegionsConfig(tfds.core.BuilderConfig):
    """The demo scenes a build reads, and how many regions of how many features it makes."""

    scenes: Any = None  # demo_scenes.DemoScenesConfig
    num_regions: int = 6
    feature_dim: int = 64


def projection(seed: int, feature_dim: int) -> np.ndarray:
    """The fixed [GRID * GRID * 3, feature_dim - HISTOGRAM_DIM] random projection of box pixels."""
    rng = np.random.default_rng([seed, _REGION_STREAM])
    inputs = GRID * GRID * 3
    return (rng.standard_normal((inputs, feature_dim - HISTOGRAM_DIM)) / np.sqrt(inputs)).astype(np.float32)


def object_boxes(scene: scenes.Scene, rng: np.random.Generator) -> np.ndarray:
    """[objects, 4] pixel boxes (x1, y1, x2, y2; x2 and y2 exclusive) holding each whole shape."""
    boxes = []
    for obj in scene.objects:
        radius = scenes.SIZES[obj.size]
        grow = rng.integers(0, 2, size=4)
        boxes.append([obj.x - radius - grow[0], obj.y - radius - grow[1],
                      obj.x + radius + 1 + grow[2], obj.y + radius + 1 + grow[3]])
    return np.clip(np.array(boxes, np.int64).reshape(-1, 4), 0, scenes.IMAGE_SIZE)


def background_boxes(count: int, taken: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """[count, 4] random pixel boxes, each clear of the `taken` boxes where a try finds one."""
    boxes = []
    for _ in range(count):
        for _ in range(_BACKGROUND_TRIES):
            width, height = rng.integers(BACKGROUND_SIDES[0], BACKGROUND_SIDES[1] + 1, size=2)
            x1 = rng.integers(0, scenes.IMAGE_SIZE - width + 1)
            y1 = rng.integers(0, scenes.IMAGE_SIZE - height + 1)
            box = np.array([x1, y1, x1 + width, y1 + height])
            clear = ((box[2] <= taken[:, 0]) | (box[0] >= taken[:, 2])
                     | (box[3] <= taken[:, 1]) | (box[1] >= taken[:, 3]))
            if clear.all():
                break
        boxes.append(box)
    return np.array(boxes, np.int64).reshape(-1, 4)


def region_feature(pixels: np.ndarray, box: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """[feature_dim]: the projection of the box's pixels on a GRID x GRID grid, then its colour
    histogram (each channel's fractions of pixels in HISTOGRAM_BINS bins)."""
    crop = pixels[box[1]:box[3], box[0]:box[2]]
    grid = np.asarray(Image.fromarray(crop).resize((GRID, GRID), Image.BILINEAR), np.float32)
    projected = (grid.reshape(-1) / 255.0 - 0.5) @ weights
    bins = crop.reshape(-1, 3).astype(np.int64) * HISTOGRAM_BINS // 256 + np.arange(3) * HISTOGRAM_BINS
    histogram = np.bincount(bins.reshape(-1), minlength=HISTOGRAM_DIM) / (crop.shape[0] * crop.shape[1])
    return np.concatenate([projected, histogram.astype(np.float32)])


def scene_regions(scene: scenes.Scene, pixels: np.ndarray, rng: np.random.Generator, weights: np.ndarray,
                  num_regions: int) -> np.ndarray:
    """The packed regions of one rendered scene (objects and background, shuffled)."""
    objects = object_boxes(scene, rng)
    background = background_boxes(min(int(rng.integers(1, 3)), num_regions - len(objects)), objects, rng)
    boxes = np.concatenate([objects, background])
    labels = np.array([scenes.SHAPES.index(obj.shape) for obj in scene.objects] + [NO_LABEL] * len(background))
    order = rng.permutation(len(boxes))
    boxes, labels = boxes[order], labels[order]
    features = np.stack([region_feature(pixels, box, weights) for box in boxes])
    return pack_regions(features, boxes / scenes.IMAGE_SIZE, num_regions, labels)


class DemoRegions(building.LocalBuilder):
    """The demo scenes as packed detector regions, with the demo's ids, descriptions and captions."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}

    def _info(self) -> tfds.core.DatasetInfo:
        config = self.builder_config
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__.splitlines()[0],
            features=tfds.features.FeaturesDict({
                "image": region_features(config.feature_dim, config.num_regions),
                "image_id": tfds.features.Scalar(dtype=np.int64),
                "description": tfds.features.Text(),
                "captions": tfds.features.FeaturesDict(
                    {lang: tfds.features.Sequence(tfds.features.Text()) for lang in demo_scenes.LANGUAGES}
                ),
            }),
            metadata=tfds.core.MetadataDict(_config_metadata(config)),
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator[tuple[int, dict[str, Any]]]]:
        del dl_manager  # made from the demo scenes, nothing to download
        sources = self.scenes_builder.as_data_source()
        sizes = self.builder_config.scenes.split_sizes()
        return {split: self._generate_examples(split, count, sources[split])
                for split, count in sizes.items() if count > 0}

    def _generate_examples(self, split: str, count: int, source) -> Iterator[tuple[int, dict[str, Any]]]:
        config = self.builder_config
        seed = config.scenes.seed
        drawn = list(demo_scenes.split_scenes(seed, split, count))
        weights = projection(seed, config.feature_dim)
        for record in building.read_all(source):
            # The demo set stores its records shuffled: its image_id is the scene's position.
            index = int(record["image_id"])
            scene = drawn[index]
            if record["description"].decode() != scenes.description(scene):
                raise UserError(
                    f"the demo data in {demo_scenes.dataset_dir(self.scenes_builder)} does not match the "
                    f"scenes of seed {seed} ({split} image {index}): delete that folder to rebuild it"
                )
            # Each image's draws depend on (seed, split, image) only, not on the order records come in.
            rng = np.random.default_rng([seed, demo_scenes.SPLITS.index(split), index, _REGION_STREAM])
            yield index, {
                "image": scene_regions(scene, record["image"], rng, weights, config.num_regions),
                "image_id": index,
                "description": scenes.description(scene),
                "captions": {lang: [text.decode() for text in texts] for lang, texts in record["captions"].items()},
            }


def _config_metadata(config: DemoRegionsConfig) -> dict[str, int]:
    sizes = {f"num_{split}": count for split, count in config.scenes.split_sizes().items()}
    return {"seed": config.scenes.seed, **sizes, "num_regions": config.num_regions, "feature_dim": config.feature_dim}


def prepare_demo_regions(data_dir: str, scenes_config: demo_scenes.DemoScenesConfig | None = None,
                         num_regions: int = 6, feature_dim: int = 64) -> DemoRegions:
    """Builds (once) the demo scenes, then their region features, into `data_dir`, with a copy of
    the demo tokenizer in the region dataset's folder (`demo_scenes.demo_tokenizer_path` of it)."""
    if num_regions < MIN_REGIONS:
        raise UserError(f"config.data.num_regions is {num_regions}; demo_regions needs at least {MIN_REGIONS} "
                        "(up to three objects and a background region)")
    if feature_dim < MIN_FEATURE_DIM:
        raise UserError(f"config.data.region_feature_dim is {feature_dim}; demo_regions needs at least "
                        f"{MIN_FEATURE_DIM} (a {HISTOGRAM_DIM}-bin colour histogram and a projection)")
    scenes_config = scenes_config or demo_scenes.DEFAULT_CONFIG
    scenes_builder = demo_scenes.prepare_demo_data(data_dir, scenes_config)
    config = DemoRegionsConfig(
        name=f"{scenes_config.name}_r{num_regions}_f{feature_dim}",
        description=f"demo scenes {scenes_config.name}, {num_regions} regions of {feature_dim} features",
        scenes=scenes_config, num_regions=num_regions, feature_dim=feature_dim,
    )
    root = building.ensure_data_dir(data_dir, "the demo region features")
    with building.exclusive_lock(root / ".demo_regions.lock"):
        with building.quiet_tfds():
            builder = DemoRegions(config=config, data_dir=data_dir, file_format="array_record")
            prepared = builder.is_prepared()
        if not prepared:
            builder.scenes_builder = scenes_builder
            sizes = "/".join(str(n) for n in scenes_config.split_sizes().values())
            building.run_build(builder, data_dir, f"the demo region features ({sizes} images)", "50 MB")
            with building.quiet_tfds():  # reopen, so the builder reads what was written
                builder = DemoRegions(config=config, data_dir=data_dir, file_format="array_record")
        found, wanted = dict(builder.info.metadata or {}), _config_metadata(config)
        if {key: found.get(key) for key in wanted} != wanted:
            raise UserError(f"demo region features in {demo_scenes.dataset_dir(builder)} were built with {found}, "
                            f"not {wanted}: delete that folder to rebuild it")
        tokenizer = demo_scenes.demo_tokenizer_path(builder)
        if not os.path.isfile(tokenizer):
            with replaced_atomically(tokenizer) as temporary:
                shutil.copyfile(demo_scenes.demo_tokenizer_path(scenes_builder), temporary)
    return builder
