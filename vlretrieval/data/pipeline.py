"""grain input pipelines over tfds data sources: sample a caption, decode and crop the image,
tokenize, normalise, batch.

Training batches are a random-access `grain.MapDataset`: batch `step` is a pure function of
(seed, step, host), and every host reads a disjoint shard. The iterator's state (`TrainingBatches`)
is saved with each checkpoint, so a resumed run continues with exactly the examples it had not yet
seen. Evaluation batches are padded, with a mask, so every host runs the same number of steps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from vlretrieval.data import images as image_ops
from vlretrieval.data.images import normalize_images
from vlretrieval.data.tokenizer import TextTokenizer


def _pick_caption(languages: Sequence[str], text_negatives=None):
    """A random_map function: one image with one caption drawn from any of its languages that
    has captions for it (the demo's low-resource language has none in training).

    With `text_negatives` (a `negatives.TextNegativeComposer`), also the caption with some of its
    content words swapped: a hard negative text composed for this example.
    """

    def pick(record: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        captioned = [language for language in languages if len(record["captions"][language])]
        if not captioned:
            raise ValueError(f"an example has no caption in any of {list(languages)}")
        language = captioned[rng.integers(len(captioned))]
        captions = record["captions"][language]
        caption = captions[rng.integers(len(captions))]
        if isinstance(caption, bytes):
            caption = caption.decode("utf-8")
        example = {"image": record["image"], "caption": caption, "index": record["index"]}
        if text_negatives is not None:
            example["negative_caption"], example["negative_valid"] = text_negatives(
                caption, language, rng
            )
        return example

    return pick


def _tokenize_batch(tokenizer: TextTokenizer, max_length: int, record_fields: dict[str, np.ndarray] | None = None):
    def tokenize(batch: dict[str, Any]) -> dict[str, np.ndarray]:
        token_ids, text_mask = tokenizer.encode(list(batch["caption"]), max_length)
        index = np.asarray(batch["index"], np.int32)
        tokenized = {
            "images": normalize_images(batch["image"]),
            "index": index,
            "token_ids": token_ids,
            "text_mask": text_mask,
        }
        # Per-record arrays (category labels, topic targets): row `index` of each table.
        tokenized.update({name: table[index] for name, table in (record_fields or {}).items()})
        if "negative_caption" in batch:
            negative_ids, negative_mask = tokenizer.encode(list(batch["negative_caption"]), max_length)
            tokenized.update(
                negative_token_ids=negative_ids,
                negative_text_mask=negative_mask,
                negative_valid=np.asarray(batch["negative_valid"], np.int32),
            )
        return tokenized

    return tokenize


@dataclasses.dataclass(frozen=True)
class BatchOptions:
    """What makes one host's training batch, whichever pipeline reads the data (a prepared split's
    `training_dataset`, or webdataset shards' `streaming.StreamBatches`)."""

    local_batch_size: int
    languages: tuple[str, ...]  # a caption is drawn among those of these an example has
    max_text_length: int
    seed: int
    image_size: int
    crop_scale: tuple[float, float] = (0.5, 1.0)
    process_index: int = 0
    process_count: int = 1


def training_dataset(
    source: Sequence[dict[str, Any]], tokenizer: TextTokenizer, options: BatchOptions, text_negatives=None,
    record_fields: dict[str, np.ndarray] | None = None,
) -> grain.MapDataset:
    """An endless, per-epoch reshuffled MapDataset of this host's batches; index = step.

    One global order of examples, whatever the number of hosts: the split shuffled by the seed
    (again every epoch), global batch `step` its next `process_count x local_batch_size`
    examples, and this host's batch the `process_index`-th slice of it. So every host reads
    disjoint examples, the hosts together read each example once per epoch, and a run on 2 hosts
    sees the same global batches (and crops) as on 1. Batches hold `index`, each example's
    position in the split (not used by the model; it shows which records a host read), and row
    `index` of each of `record_fields` (name -> [len(source), ...] array, e.g. category labels)."""
    seed = options.seed
    return _host_batches(
        indexed(source)
        .shuffle(seed=seed)
        .repeat(None)  # repeat after shuffle: grain reshuffles every epoch
        .random_map(_pick_caption(tuple(options.languages), text_negatives), seed=seed + 1)
        .random_map(_training_image(options.image_size, options.crop_scale), seed=seed + 3),
        options.local_batch_size, options.process_index, options.process_count,
    ).map(_tokenize_batch(tokenizer, options.max_text_length, record_fields))


def indexed(source: Sequence[dict[str, Any]]) -> grain.MapDataset:
    """The records of `source`, each with its `index` (position) in it. Downstream of `repeat`,
    grain hands this map the index of the repeated dataset (epoch x length + position): it is
    taken modulo the length, so every epoch's record has its own position."""
    length = len(source)
    return grain.MapDataset.source(source).map_with_index(
        lambda index, record: {**record, "index": index % length}
    )


def _host_batches(examples: grain.MapDataset, local_batch_size: int, process_index: int,
                  process_count: int) -> grain.MapDataset:
    """Host `process_index`'s slice of each global batch of `examples`. grain is lazy: only the
    examples of this host's slices are ever read and transformed."""
    return examples.batch(local_batch_size, drop_remainder=True)[process_index::process_count]


def _training_image(image_size: int, crop_scale: Sequence[float]):
    def prepare(example: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        image = image_ops.model_image(example["image"], image_size, rng, crop_scale)
        return {**example, "image": image}

    return prepare


def steps_per_epoch(source_length: int, global_batch_size: int) -> int:
    """Global batches in one pass over the split (the same on every host)."""
    return max(1, source_length // global_batch_size)


class TranslationMixture:
    """Random access to sentence pairs drawn from several language pairs in set proportions.

    Item i is a pure function of (seed, i): a language pair drawn with `weights`, then one of its
    pairs uniformly, so batch `step` is the same however often the run resumed.
    """

    def __init__(self, sources: dict[str, Sequence[dict[str, Any]]], weights: Sequence[float], seed: int):
        self.pairs = list(sources)
        self.sources = [sources[pair] for pair in self.pairs]
        total = float(sum(weights))
        self.weights = np.asarray(weights, np.float64) / total
        self.seed = seed

    def __len__(self) -> int:
        return 2**62  # endless: the training loop decides how many steps

    def __getitem__(self, index: int) -> dict[str, Any]:
        rng = np.random.default_rng([self.seed, index])
        pair = int(rng.choice(len(self.pairs), p=self.weights))
        source = self.sources[pair]
        record = source[int(rng.integers(len(source)))]
        decode = lambda text: text.decode("utf-8") if isinstance(text, bytes) else text
        return {"source": decode(record["source"]), "target": decode(record["target"]), "pair": pair}


def _tokenize_translations(tokenizer: TextTokenizer, max_length: int):
    def tokenize(batch: dict[str, Any]) -> dict[str, np.ndarray]:
        source_ids, source_mask = tokenizer.encode(list(batch["source"]), max_length)
        target_ids, target_mask = tokenizer.encode(list(batch["target"]), max_length)
        return {
            "bitext_source_ids": source_ids,
            "bitext_source_mask": source_mask,
            "bitext_target_ids": target_ids,
            "bitext_target_mask": target_mask,
            "bitext_pair": np.asarray(batch["pair"], np.int32),
        }

    return tokenize


def translation_dataset(
    mixture: TranslationMixture,
    tokenizer: TextTokenizer,
    *,
    local_batch_size: int,
    max_text_length: int,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.MapDataset:
    """This host's batches of tokenized sentence pairs; index = step. Like `training_dataset`,
    one global order of items, each host its slice of every global batch."""
    return _host_batches(
        grain.MapDataset.source(mixture), local_batch_size, process_index, process_count
    ).map(_tokenize_translations(tokenizer, max_text_length))


def iterate(dataset: grain.MapDataset, threads: int = 2) -> grain.DatasetIterator:
    """Batches 0, 1, ..., prepared in background threads; `get_state()` / `set_state()` save and
    restore the position (what a checkpoint holds)."""
    options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=4)
    return iter(dataset.to_iter_dataset(options))


HOST_ONLY = ("sample_keys",)  # batch fields that stay on the host (strings): not for the devices


def device_fields(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The fields of a host batch that go to the devices."""
    return {name: value for name, value in batch.items() if name not in HOST_ONLY}


class TrainingBatches:
    """This host's training batches from several aligned pipelines (image–text pairs, and with
    the text–text task translation pairs), merged into one dict per step, with one saveable state.
    Each pipeline is a random-access `grain.MapDataset` (iterated here) or an iterator with
    `get_state`/`set_state` of its own (`streaming.StreamBatches`).
    """

    def __init__(self, datasets: dict[str, Any], threads: int = 2):
        self.iterators = {
            name: iterate(dataset, threads) if isinstance(dataset, grain.MapDataset) else dataset
            for name, dataset in datasets.items()
        }

    def close(self) -> None:
        for iterator in self.iterators.values():
            if hasattr(iterator, "close"):
                iterator.close()

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch: dict[str, np.ndarray] = {}
        for iterator in self.iterators.values():
            batch.update(next(iterator))
        return batch

    def get_state(self) -> dict[str, Any]:
        return {name: iterator.get_state() for name, iterator in self.iterators.items()}

    def set_state(self, state: dict[str, Any]) -> None:
        if set(state) != set(self.iterators):
            raise ValueError(
                f"the saved data state has pipelines {sorted(state)}, this run {sorted(self.iterators)}"
            )
        for name, iterator in self.iterators.items():
            iterator.set_state(state[name])


def padded_host_positions(
    count: int, local_batch_size: int, process_index: int, process_count: int
) -> tuple[np.ndarray, np.ndarray]:
    """(indices, valid) of this host's evaluation items: every `process_count`-th of `count`
    from `process_index` (disjoint, covering all), padded with item 0 marked invalid to the same
    whole number of batches on every host (that of the longest shard)."""
    host_indices = np.arange(process_index, count, process_count)
    longest_shard = -(-count // process_count)
    total = max(1, -(-longest_shard // local_batch_size)) * local_batch_size
    indices = np.zeros(total, np.int64)
    indices[: len(host_indices)] = host_indices
    return indices, np.arange(total) < len(host_indices)


def evaluation_dataset(
    source: Sequence[dict[str, Any]],
    *,
    image_size: int,
    local_batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.MapDataset:
    """This host's evaluation images in batches: `images` (normalised), `index` (position in the
    split) and `valid`. Every host gets the same number of batches: the shortest shards are padded
    with copies of a real record marked `valid = False`, which must never count."""
    indices, valid = padded_host_positions(
        len(source), local_batch_size, process_index, process_count
    )

    def prepare(position: int) -> dict[str, Any]:
        index = int(indices[position])  # padding: a real record, masked out by `valid`
        return {
            "image": image_ops.model_image(source[index]["image"], image_size),
            "index": index,
            "valid": bool(valid[position]),
        }

    return (
        grain.MapDataset.range(len(indices))
        .map(prepare)
        .batch(local_batch_size)
        .map(lambda batch: {
            "images": normalize_images(batch["image"]),
            "index": np.asarray(batch["index"], np.int32),
            "valid": np.asarray(batch["valid"], bool),
        })
    )


class HostImages:
    """A split's uint8 images as one host embeds them: only its share (every `process_count`-th
    from `process_index`, `padded_host_positions`'s) decoded and held, indexed by split position
    like the whole array. Other hosts' positions (the padding of `padded_host_positions`) read as
    zeros: they are masked out."""

    def __init__(self, count: int, images: np.ndarray, process_index: int, process_count: int):
        self.count, self.images = count, images
        self.process_index, self.process_count = process_index, process_count
        self.shape = (count, *images.shape[1:])

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, indices) -> np.ndarray:
        indices = np.asarray(indices)
        offset = indices - self.process_index
        owned = (offset >= 0) & (offset % self.process_count == 0) & (indices < self.count)
        result = np.zeros((len(indices), *self.images.shape[1:]), self.images.dtype)
        result[owned] = self.images[offset[owned] // self.process_count]
        return result


class NormalizedImages:
    """uint8 images (an array or `HostImages`) read as the model's float input, batch by batch:
    a gallery is never held in float32 whole."""

    def __init__(self, images):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, indices) -> np.ndarray:
        return normalize_images(self.images[np.asarray(indices)])


def load_split(
    source: Sequence[dict[str, Any]], languages: Sequence[str], image_size: int, *, max_images: int = 0,
    process_index: int = 0, process_count: int = 1,
) -> dict[str, Any]:
    """An (evaluation) split in memory: its first `max_images` records (0: all); uint8 images
    (encoded ones decoded with the eval transform) and, per language, the captions. With
    `process_count` > 1 only this host's share of the images is decoded and held (`HostImages`):
    what `evaluate.embed_in_batches` reads on this host. Every host keeps every caption (text is
    small next to pixels)."""
    count = min(len(source), max_images) if max_images else len(source)
    records = [source[index] for index in range(count)]
    decode = lambda record: image_ops.model_image(record["image"], image_size)
    if process_count == 1:
        images = np.stack([decode(record) for record in records])
    else:
        share = [decode(record) for record in records[process_index::process_count]]
        if not share:  # more hosts than images: an empty share of the images' shape and type
            one = decode(records[0]) if records else np.zeros((image_size, image_size, 3), np.uint8)
            share = np.zeros((0, *one.shape), one.dtype)
        images = HostImages(count, np.stack(share) if len(share) else share, process_index, process_count)
    captions = {}
    for language in languages:
        captions[language] = [
            [c.decode("utf-8") if isinstance(c, bytes) else c for c in record["captions"][language]]
            for record in records
        ]
    return {"images": images, "captions": captions}
