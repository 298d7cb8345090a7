"""Training batches streamed from webdataset shards (`data.name = webdataset`), resumable exactly.

The stream of one host, as grain datasets (`shards.py` reads the tars):

1. Its shards: epoch e's seeded permutation of every shard, dealt round the hosts
   (`shards.epoch_shards`); epoch e+1 follows with a new permutation. Hosts read disjoint shards.
2. `data.shard_readers` shards read at once, each in its own thread, their samples interleaved
   round-robin (grain's `InterleaveIterDataset`; a reader that finishes a shard takes the next).
3. A window shuffle of `data.shuffle_buffer` samples (grain's `WindowShuffleIterDataset`): each
   window of consecutive samples is permuted by a seed of (run seed, host, window number). Its
   refill rule is what makes resume exact without saving the buffer: the saved position is the
   readers' position at the window's start plus the place within it; a resumed run re-reads that
   window and gets the same permutation.
4. Batches of the host's slice of the global batch, decoded, randomly cropped and tokenized in a
   pool of `data.workers` threads (PIL and the tokenizer release the GIL), one batch ahead.

Every random choice of a sample (its caption's language, its crop) is drawn from a generator of
(seed, epoch, shard number, position in the shard), never from a running counter, so it is the
same however the run was interrupted. A reader's position is the number of keys of its shard
consumed, usable or not (`shards.read_shard(skip=)`); the state also records the host count, the
shard list's fingerprint, the readers and the buffer, and a run resumed with any of them changed
is refused: its position would name other samples.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

from vlretrieval.data import images as image_ops
from vlretrieval.data import shards as shard_files
from vlretrieval.data.builders.image_captions import BadRecords, summary
from vlretrieval.data.images import normalize_images
from vlretrieval.data.pipeline import BatchOptions
from vlretrieval.data.tokenizer import TextTokenizer
from vlretrieval.errors import UserError

log = logging.getLogger(__name__)

# An endless stream is this many epochs long (grain's interleave needs a length; none is reached).
ENDLESS = 1_000_000


def fingerprint(paths: Sequence[str]) -> str:
    """A short hash of the shard list: a resumed run must read the same shards."""
    return hashlib.sha1("\n".join(paths).encode()).hexdigest()[:16]


class BadTally:
    """Bad members of every shard read so far on this host (readers run in threads)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.counts: dict[str, int] = {}
        self.examples: dict[str, list[str]] = {}

    def add(self, bad: BadRecords) -> None:
        with self.lock:
            for problem, count in bad.counts.items():
                self.counts[problem] = self.counts.get(problem, 0) + count
                self.examples[problem] = (self.examples.get(problem, []) + bad.examples[problem])[:5]

    def to_json(self) -> dict[str, Any]:
        with self.lock:
            return {"counts": dict(self.counts), "examples": {k: list(v) for k, v in self.examples.items()}}


class HostShards(Sequence):
    """Position p of this host's endless shard sequence -> (epoch, shard number, path)."""

    def __init__(self, paths: Sequence[str], seed: int, process_index: int, process_count: int,
                 epochs: int | None):
        self.paths, self.seed = list(paths), seed
        self.process_index, self.process_count = process_index, process_count
        shard_files.epoch_shards(self.paths, seed, 0, process_index, process_count)  # enough shards?
        self.per_epoch = len(range(process_index, len(self.paths), process_count))
        self.epochs = ENDLESS if epochs is None else epochs
        self._cached: tuple[int, list[int]] | None = None

    def __len__(self) -> int:
        return self.per_epoch * self.epochs

    def _order(self, epoch: int) -> list[int]:
        cached = self._cached
        if cached is None or cached[0] != epoch:
            permutation = np.random.default_rng([self.seed, epoch]).permutation(len(self.paths))
            cached = (epoch, [int(i) for i in permutation[self.process_index::self.process_count]])
            self._cached = cached
        return cached[1]

    def __getitem__(self, position: int) -> tuple[int, int, str]:
        epoch, offset = divmod(int(position), self.per_epoch)
        number = self._order(epoch)[offset]
        return epoch, number, self.paths[number]


class _ShardIterator(grain.DatasetIterator):
    """One shard's usable samples as (epoch, shard number, Sample); state: keys consumed."""

    def __init__(self, item: tuple[int, int, str], read_options: dict, on_bad_record: str, tally: BadTally):
        super().__init__()
        self.epoch, self.number, self.path = item
        self.read_options, self.on_bad_record, self.tally = read_options, on_bad_record, tally
        self.keys_seen = 0
        self.samples = None
        self.bad = BadRecords(on_bad_record)

    def __next__(self):
        if self.samples is None:
            self.samples = shard_files.read_shard(self.path, self.bad, skip=self.keys_seen, **self.read_options)
        try:
            sample = next(self.samples)
        except StopIteration:
            self._report()
            raise
        self.keys_seen = sample.position + 1
        return self.epoch, self.number, sample

    def _report(self) -> None:
        """The shard's bad members, once: one log line per shard that had any."""
        if self.bad.counts:
            self.tally.add(self.bad)
            log.warning(f"shard {self.path}: {summary(self.bad.to_json())}")
            self.bad = BadRecords(self.on_bad_record)

    def get_state(self) -> dict[str, Any]:
        return {"keys_seen": self.keys_seen}

    def set_state(self, state: dict[str, Any]) -> None:
        self.keys_seen, self.samples = int(state["keys_seen"]), None


class _ShardSamples(grain.IterDataset):
    def __init__(self, item, read_options, on_bad_record, tally):
        super().__init__()
        self.item, self.read_options, self.on_bad_record, self.tally = item, read_options, on_bad_record, tally

    def __iter__(self):
        return _ShardIterator(self.item, self.read_options, self.on_bad_record, self.tally)


def sample_stream(
    paths: Sequence[str],
    *,
    seed: int,
    readers: int,
    caption_fields: Mapping[str, str] | None = None,
    txt_language: str = "en",
    on_bad_record: str = "skip",
    process_index: int = 0,
    process_count: int = 1,
    epochs: int | None = None,
    tally: BadTally | None = None,
) -> grain.IterDataset:
    """This host's samples, (epoch, shard number, Sample), `readers` shards interleaved; endless
    unless `epochs` is given. Captions as `shards.read_shard` reads them."""
    host_shards = HostShards(paths, seed, process_index, process_count, epochs)
    tally = tally or BadTally()
    read_options = {"caption_fields": dict(caption_fields or {}), "txt_language": txt_language}
    datasets = grain.MapDataset.source(host_shards).map(
        lambda item: _ShardSamples(item, read_options, on_bad_record, tally)
    )
    return grain.experimental.InterleaveIterDataset(datasets, cycle_length=readers)


def sample_rng(seed: int, epoch: int, shard_number: int, position: int) -> np.random.Generator:
    """The generator of one sample's random choices: the same whenever and wherever it is read."""
    return np.random.default_rng([seed, epoch, shard_number, position])


class _PrepareBatch:
    """Raw samples -> the model's batch: caption picked, image decoded and cropped (in threads),
    text tokenized, pixels normalised."""

    def __init__(self, tokenizer: TextTokenizer, options: BatchOptions, workers: int):
        self.tokenizer, self.options = tokenizer, options
        self.pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="vlretrieval-decode")

    def example(self, item) -> tuple[np.ndarray, str]:
        epoch, number, sample = item
        options = self.options
        rng = sample_rng(options.seed, epoch, number, sample.position)
        # Never empty: the reader keeps only samples with a caption in a language training uses.
        languages = [language for language in options.languages if language in sample.captions]
        caption = sample.captions[languages[int(rng.integers(len(languages)))]]
        # Normalised here, in the pool: on the whole batch it was a serial step that left the
        # decode threads idle.
        image = image_ops.train_image(sample.image, options.image_size, rng, options.crop_scale)
        return normalize_images(image), caption

    def __call__(self, items: list) -> dict[str, np.ndarray]:
        prepared = list(self.pool.map(self.example, items))
        token_ids, text_mask = self.tokenizer.encode([caption for _, caption in prepared], self.options.max_text_length)
        return {
            "images": np.stack([image for image, _ in prepared]),
            "token_ids": token_ids,
            "text_mask": text_mask,
            "sample_keys": np.asarray([sample.key for _, _, sample in items]),
        }


def default_workers() -> int:
    """One decode thread per core this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


class StreamBatches:
    """This host's endless training batches from shards, with a saveable position (the
    `TrainingBatches` iterator interface: next, get_state, set_state)."""

    def __init__(
        self,
        source: shard_files.ShardSource,
        tokenizer: TextTokenizer,
        options: BatchOptions,
        *,
        shuffle_buffer: int = 1000,
        readers: int = 4,
        workers: int = 0,
        on_bad_record: str = "skip",
    ):
        process_index, process_count, seed = options.process_index, options.process_count, options.seed
        self.tally = BadTally()
        # What the saved position means: the sample sequence. (The batch size may change on
        # resume: the position counts samples, not batches.)
        self.identity = {
            "process_count": process_count, "shards": fingerprint(source.paths), "readers": readers,
            "shuffle_buffer": shuffle_buffer,
        }
        samples = sample_stream(
            source.paths, seed=seed, readers=readers, caption_fields=source.caption_fields,
            txt_language=source.txt_language, on_bad_record=on_bad_record, process_index=process_index,
            process_count=process_count, tally=self.tally,
        )
        # Each host its own window permutations (its windows hold other samples anyway).
        window_seed = int(np.random.SeedSequence([seed, process_index]).generate_state(1)[0])
        shuffled = grain.experimental.WindowShuffleIterDataset(samples, window_size=shuffle_buffer, seed=window_seed)
        self.prepare = prepare = _PrepareBatch(tokenizer, options, workers or default_workers())
        # Two stages, each a batch ahead in its own thread: taking the next batch's samples from the
        # readers and the shuffle overlaps decoding this one's images.
        samples_of_batches = grain.experimental.ThreadPrefetchIterDataset(
            shuffled.batch(options.local_batch_size, drop_remainder=True, batch_fn=list), prefetch_buffer_size=2
        )
        self.iterator = iter(
            grain.experimental.ThreadPrefetchIterDataset(samples_of_batches.map(prepare), prefetch_buffer_size=2)
        )

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self.iterator)

    def close(self) -> None:
        """Stops the reader and decode threads (before interpreter exit, not in its teardown)."""
        self.iterator.close()
        self.prepare.pool.shutdown(wait=False, cancel_futures=True)

    def get_state(self) -> dict[str, Any]:
        return {**self.identity, "stream": self.iterator.get_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        changed = [
            f"{name} {state.get(name)} -> {value}" for name, value in self.identity.items() if state.get(name) != value
        ]
        if changed:
            raise UserError(
                "the checkpoint's webdataset position cannot be resumed by this run: "
                + "; ".join(changed) + " (the position names samples of that layout; resume with the "
                "same hosts, shards, data.shard_readers and data.shuffle_buffer, or train into a new "
                "workdir with train.init_from)"
            )
        self.iterator.set_state(state["stream"])
