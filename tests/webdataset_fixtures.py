"""Shards in img2dataset's exact output layout, written with tarfile: for shard i, `{i:05d}.tar`
holding `KEY.jpg`, `KEY.txt`, `KEY.json` per sample (KEY = shard x 10,000 + sample, 9 digits),
beside `{i:05d}.parquet` (one row per sample: key, caption, status, ...) and `{i:05d}_stats.json`.
"""

import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

SAMPLES_PER_SHARD = 10_000  # img2dataset's default: keys are shard * 10,000 + i


def jpeg(pixels: np.ndarray, quality: int = 95) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(pixels, np.uint8)).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def write_tar(path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, mode="w") as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            archive.addfile(info, io.BytesIO(data))


def sample_members(key: str, image: bytes, caption: str, **metadata) -> list[tuple[str, bytes]]:
    width, height = Image.open(io.BytesIO(image)).size
    record = {"url": f"http://example.com/{key}.jpg", "key": key, "status": "success",
              "error_message": None, "width": width, "height": height, "caption": caption, **metadata}
    return [(f"{key}.jpg", image), (f"{key}.txt", caption.encode()), (f"{key}.json", json.dumps(record).encode())]


def write_shards(directory, samples, per_shard: int) -> list[str]:
    """`samples`: (image bytes, caption, metadata dict) in order; returns the shard paths. Keys as
    img2dataset numbers them."""
    paths = []
    for shard in range(-(-len(samples) // per_shard)):
        chunk = samples[shard * per_shard:(shard + 1) * per_shard]
        members, rows = [], []
        for i, (image, caption, metadata) in enumerate(chunk):
            key = f"{shard * SAMPLES_PER_SHARD + i:09d}"
            members += sample_members(key, image, caption, **metadata)
            rows.append({"key": key, "caption": caption, "status": "success"})
        path = directory / f"{shard:05d}.tar"
        write_tar(path, members)
        pq.write_table(pa.Table.from_pylist(rows), directory / f"{shard:05d}.parquet")
        (directory / f"{shard:05d}_stats.json").write_text(json.dumps(
            {"count": len(chunk), "successes": len(chunk), "failed_to_download": 0, "failed_to_resize": 0}
        ))
        paths.append(str(path))
    return paths


def demo_samples(data, count: int, language: str = "en"):
    """The first `count` demo training scenes as (JPEG, caption, {"caption_<lang>": ...})."""
    source = data.split("train")
    samples = []
    for index in range(count):
        record = source[index]
        captions = {lang: [c.decode() if isinstance(c, bytes) else c for c in cs]
                    for lang, cs in record["captions"].items()}
        extra = {f"caption_{lang}": cs[0] for lang, cs in captions.items() if cs}
        samples.append((jpeg(record["image"]), captions[language][0], extra))
    return samples
