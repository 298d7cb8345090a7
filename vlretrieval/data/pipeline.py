"""grain input pipelines over tfds data sources: sample a caption, tokenize, normalise, batch.

Training batches are a random-access `grain.MapDataset`: batch `step` is a pure function of
(seed, step, host), so a resumed run continues with exactly the examples it had not yet seen by
starting at its step, and every host reads a disjoint shard.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import grain
import numpy as np

from vlretrieval.data.tokenizer import TextTokenizer


def normalize_images(images: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1], the range the patch embedding is initialised for."""
    return images.astype(np.float32) / 127.5 - 1.0


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
        example = {"image": record["image"], "caption": caption}
        if text_negatives is not None:
            example["negative_caption"], example["negative_valid"] = text_negatives(
                caption, language, rng
            )
        return example

    return pick


def _tokenize_batch(tokenizer: TextTokenizer, max_length: int):
    def tokenize(batch: dict[str, Any]) -> dict[str, np.ndarray]:
        token_ids, text_mask = tokenizer.encode(list(batch["caption"]), max_length)
        tokenized = {
            "images": normalize_images(batch["image"]),
            "token_ids": token_ids,
            "text_mask": text_mask,
        }
        if "negative_caption" in batch:
            negative_ids, negative_mask = tokenizer.encode(list(batch["negative_caption"]), max_length)
            tokenized.update(
                negative_token_ids=negative_ids,
                negative_text_mask=negative_mask,
                negative_valid=np.asarray(batch["negative_valid"], np.int32),
            )
        return tokenized

    return tokenize


def training_dataset(
    source: Sequence[dict[str, Any]],
    tokenizer: TextTokenizer,
    *,
    local_batch_size: int,
    languages: Sequence[str],
    max_text_length: int,
    seed: int,
    text_negatives=None,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.MapDataset:
    """An endless, per-epoch reshuffled MapDataset of this host's batches; index = step."""
    dataset = grain.MapDataset.source(source)
    dataset = dataset[process_index::process_count]  # each host reads a disjoint shard
    return (
        dataset.shuffle(seed=seed)
        .repeat(None)  # repeat after shuffle: grain reshuffles every epoch
        .random_map(_pick_caption(tuple(languages), text_negatives), seed=seed + 1)
        .batch(local_batch_size, drop_remainder=True)
        .map(_tokenize_batch(tokenizer, max_text_length))
    )


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
    """This host's batches of tokenized sentence pairs; index = step, hosts draw disjoint items."""
    return (
        grain.MapDataset.source(mixture)[process_index::process_count]
        .batch(local_batch_size, drop_remainder=True)
        .map(_tokenize_translations(tokenizer, max_text_length))
    )


def iterate_from(dataset: grain.MapDataset, start_step: int, threads: int = 2) -> Iterator[dict]:
    """Batches `start_step, start_step + 1, ...`, prepared in background threads."""
    options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=4)
    return iter(dataset[start_step:].to_iter_dataset(options))


def load_split(source: Sequence[dict[str, Any]], languages: Sequence[str]) -> dict[str, Any]:
    """A whole (evaluation) split in memory: uint8 images and, per language, its captions."""
    records = [source[index] for index in range(len(source))]
    images = np.stack([record["image"] for record in records])
    captions = {}
    for language in languages:
        captions[language] = [
            [c.decode("utf-8") if isinstance(c, bytes) else c for c in record["captions"][language]]
            for record in records
        ]
    return {"images": images, "captions": captions}
