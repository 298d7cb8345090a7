"""Input pipeline throughput: per core, and the webdataset stream against the train step.

  python benchmarks/input_pipeline.py [--images 256] [--size 224] [--repeats 5]
  python benchmarks/input_pipeline.py --streaming [--shard_images 1024] [--source_size 256]

`--streaming`: img2dataset-style shards (`--source_size` square photo-like JPEGs, img2dataset's
default resize being 256) streamed by the training pipeline (`data/streaming.py`: readers, window
shuffle, decode + random resized crop + tokenize in one thread per core) at 64 px and 224 px,
beside the array_record pipeline (`pipeline.training_dataset` over an ArrayRecord file of the same
records, grain threads = cores) and beside the demo config's train step (64 px, batch 128) on this
machine; repeats interleave the three, medians reported, with the ratio stream / train step.

Writes `--images` photo-like JPEG files (640 x 480, COCO's typical size, quality 90) to a
temporary folder, then runs the training pipeline (read file, decode, random resized crop to
`--size`, normalise, tokenize a caption, batch) and the evaluation transform (resize + centre
crop) on one thread, so the figure is per core. Prints one JSON line per measurement with the
median over `--repeats` passes, and the speed-up of JPEG draft decoding (decoding at a reduced
scale when the output is smaller than the photo) over a full decode, measured in the same run.
"""

import io
import json
import os
import pathlib
import pickle
import statistics
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from vlretrieval import arguments  # noqa: E402
from vlretrieval.data import images, pipeline  # noqa: E402
from vlretrieval.data.tokenizer import TextTokenizer, train_wordpiece_tokenizer  # noqa: E402

WORDS = "a man woman dog cat riding sitting on the red blue green bike street table with".split()


def photo(rng: np.random.Generator, width: int = 640, height: int = 480) -> bytes:
    """Smooth colour fields plus texture: compresses like a photo (~60-120 KB), unlike noise."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = []
    for _ in range(3):
        fx, fy, phase = rng.uniform(0.002, 0.03, 2).tolist() + [rng.uniform(0, 6.3)]
        channels.append(127 + 100 * np.sin(fx * x + phase) * np.cos(fy * y))
    picture = np.stack(channels, axis=-1) + rng.normal(0, 12, (height, width, 3))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(picture, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


class JpegFiles:
    """A data source over JPEG files on disk, as a prepared dataset returns records."""

    def __init__(self, paths, captions):
        self.paths, self.captions = paths, captions

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        with open(self.paths[index], "rb") as handle:
            data = handle.read()
        return {"image": data, "captions": {"en": [self.captions[index]]}}


def timed_pass(dataset, batches: int) -> float:
    start = time.perf_counter()
    for step in range(batches):
        dataset[step]
    return time.perf_counter() - start


def main() -> None:
    parser = arguments.OneLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=arguments.positive_int, default=256)
    parser.add_argument("--size", type=arguments.positive_int, default=224)
    parser.add_argument("--batch", type=arguments.positive_int, default=32)
    parser.add_argument("--repeats", type=arguments.positive_int, default=5)
    parser.add_argument("--streaming", action="store_true", help="the webdataset stream's figures")
    parser.add_argument("--shard_images", type=arguments.positive_int, default=1024)
    parser.add_argument("--source_size", type=arguments.positive_int, default=256)
    args = parser.parse_args()
    if args.streaming:
        streaming_figures(args.shard_images, args.source_size, args.repeats)
        return
    rng = np.random.default_rng(0)
    tokenizer = TextTokenizer(train_wordpiece_tokenizer(iter(WORDS * 50), vocab_size=200))
    with tempfile.TemporaryDirectory() as folder:
        paths, captions = [], []
        for index in range(args.images):
            path = os.path.join(folder, f"{index:06d}.jpg")
            with open(path, "wb") as handle:
                handle.write(photo(rng))
            paths.append(path)
            captions.append(" ".join(rng.choice(WORDS, 10)).encode())
        source = JpegFiles(paths, captions)
        batches = args.images // args.batch
        examples = batches * args.batch
        train = pipeline.training_dataset(source, tokenizer, pipeline.BatchOptions(
            local_batch_size=args.batch, languages=("en",), max_text_length=32, seed=0, image_size=args.size,
        ))
        evaluation = pipeline.evaluation_dataset(
            source, image_size=args.size, local_batch_size=args.batch
        )
        timed_pass(train, 1)  # warm the file cache and the tokenizer
        results = {}
        for name, dataset in (("train", train), ("eval", evaluation)):
            seconds = [timed_pass(dataset, batches) for _ in range(args.repeats)]
            results[name] = examples / statistics.median(seconds)
            print(json.dumps({
                "pipeline": name, "image_size": args.size, "threads": 1,
                "examples_per_second_per_core": round(results[name], 1),
                "median_of": args.repeats, "images": examples,
            }), flush=True)
        data = [source[index]["image"] for index in range(min(64, args.images))]
        full, draft = [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            for blob in data:
                images.decode(blob)
            full.append(time.perf_counter() - start)
            start = time.perf_counter()
            for blob in data:
                images.decode(blob, draft_size=args.size)
            draft.append(time.perf_counter() - start)
        print(json.dumps({
            "measurement": "jpeg_decode_640x480", "full_decode_per_second": round(
                len(data) / statistics.median(full), 1),
            "draft_decode_per_second": round(len(data) / statistics.median(draft), 1),
            "draft_speedup": round(statistics.median(full) / statistics.median(draft), 2),
        }), flush=True)


STREAM_BATCH = 128  # the demo config's global batch


class PickledRecords:
    """An ArrayRecord file of pickled records as a random-access source, as a prepared split is."""

    def __init__(self, path: str):
        import grain

        self.source = grain.sources.ArrayRecordDataSource([path])

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index):
        return pickle.loads(self.source[index])


def write_sources(folder: str, count: int, source_size: int):
    """`count` photo-like JPEGs with captions, as 4 img2dataset shards and as one ArrayRecord file."""
    from array_record.python.array_record_module import ArrayRecordWriter

    from tests.webdataset_fixtures import write_shards

    rng = np.random.default_rng(0)
    samples = [(photo(rng, source_size, source_size), " ".join(rng.choice(WORDS, 10)), {}) for _ in range(count)]
    os.makedirs(os.path.join(folder, "shards"))
    paths = write_shards(pathlib.Path(folder) / "shards", samples, per_shard=-(-count // 4))
    record_path = os.path.join(folder, "train.array_record")
    writer = ArrayRecordWriter(record_path, "group_size:1")
    for image, caption, _ in samples:
        writer.write(pickle.dumps({"image": image, "captions": {"en": [caption.encode()]}}))
    writer.close()
    return paths, PickledRecords(record_path)


PREFETCHED = 5  # more than either pipeline holds ready (grain's buffer of 4, the stream's 2)


def _examples_per_second(iterator, batches: int) -> float:
    """Steady-state rate: the batches prepared ahead while the others were timed are taken
    first, untimed, so the figure is the rate of production, not of a full buffer."""
    for _ in range(PREFETCHED):
        next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * STREAM_BATCH / (time.perf_counter() - start)


def _train_step_examples_per_second(vocab: int):
    """A timer of the demo config's train step (64 px, batch 128) on this machine."""
    from benchmarks.train_throughput import OurStep
    from configs.demo import get_config

    step = OurStep(get_config().model, STREAM_BATCH, vocab)
    step.compile()
    state = step.make_state()

    def timed(steps: int = 3) -> float:
        nonlocal state
        state, metrics = step.compiled(state, step.batch)
        jax.block_until_ready(metrics)
        start = time.perf_counter()
        for _ in range(steps):
            state, metrics = step.compiled(state, step.batch)
        jax.block_until_ready(metrics)
        return steps * STREAM_BATCH / (time.perf_counter() - start)

    return timed


def streaming_figures(count: int, source_size: int, repeats: int) -> None:
    from vlretrieval.data import streaming
    from vlretrieval.data.shards import ShardSource

    cores = streaming.default_workers()
    tokenizer = TextTokenizer(train_wordpiece_tokenizer(iter(WORDS * 50), vocab_size=200))
    with tempfile.TemporaryDirectory() as folder:
        paths, records = write_sources(folder, count, source_size)
        source = ShardSource(tuple(paths), {}, "en")
        batches = 16
        pipelines = {}
        for size in (64, 224):
            options = pipeline.BatchOptions(local_batch_size=STREAM_BATCH, languages=("en",), max_text_length=32,
                                            seed=0, image_size=size)
            pipelines[("stream", size)] = streaming.StreamBatches(
                source, tokenizer, options, shuffle_buffer=1000, readers=4, workers=cores
            )
            pipelines[("array_record", size)] = pipeline.iterate(
                pipeline.training_dataset(records, tokenizer, options), threads=cores
            )
        for iterator in pipelines.values():
            _examples_per_second(iterator, 1)  # threads started, files cached
        train_step = _train_step_examples_per_second(tokenizer.vocab_size)
        figures = {name: [] for name in [*pipelines, "train_step"]}
        for _ in range(repeats):  # interleaved: every figure sees the same machine load
            for name, iterator in pipelines.items():
                figures[name].append(_examples_per_second(iterator, batches))
            time.sleep(3)  # the pipelines' threads refill their buffers, then idle: the step runs alone
            figures["train_step"].append(train_step())
        for iterator in pipelines.values():
            iterator.close()
    medians = {name: statistics.median(values) for name, values in figures.items()}
    step_rate = medians.pop("train_step")
    print(json.dumps({"measurement": "demo_train_step", "image_size": 64, "batch": STREAM_BATCH,
                      "examples_per_second": round(step_rate, 1), "median_of": repeats}), flush=True)
    for (kind, size), rate in medians.items():
        print(json.dumps({
            "pipeline": kind, "image_size": size, "source_image": f"{source_size}x{source_size} JPEG",
            "threads": cores, "examples_per_second": round(rate, 1),
            "versus_demo_train_step": round(rate / step_rate, 2), "median_of": repeats,
        }), flush=True)


if __name__ == "__main__":
    arguments.run(main)
