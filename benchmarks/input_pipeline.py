"""Input pipeline throughput: examples per second per core for decode + crop/resize + tokenize.

  python benchmarks/input_pipeline.py [--images 256] [--size 224] [--repeats 5]

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
import statistics
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

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
    args = parser.parse_args()
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
        train = pipeline.training_dataset(
            source, tokenizer, local_batch_size=args.batch, languages=("en",), max_text_length=32,
            seed=0, image_size=args.size,
        )
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


if __name__ == "__main__":
    arguments.run(main)
