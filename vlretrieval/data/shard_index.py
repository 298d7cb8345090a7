"""`prepare-data` for webdataset shards: read every shard once, count what it holds, write an index.

The index (`<data_dir>/webdataset/<fingerprint>/index.json`, keyed by the shard list, since the
shards' own folder may be read-only or remote) records per shard its usable samples and bad
members, and over all shards the captions per language. Training reads it for the epoch's length
(its "epoch done" lines); without one, training still runs, with no epoch lines. Nothing about the
shards is rewritten.
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import os
from typing import Any

from tqdm import tqdm

from vlretrieval.data import shards as shard_files
from vlretrieval.data.builders.image_captions import BadRecords, summary
from vlretrieval.data.streaming import fingerprint
from vlretrieval.files import replaced_atomically


def index_path(data_dir: str, paths) -> str:
    return os.path.join(data_dir, "webdataset", fingerprint(paths), "index.json")


def read_index(data_dir: str, paths) -> dict[str, Any] | None:
    """The index `prepare-data` wrote for exactly these shards, or None."""
    path = index_path(data_dir, paths)
    if not os.path.exists(path):
        return None
    with open(path) as handle:
        return json.load(handle)


def _count(path: str, source: shard_files.ShardSource, on_bad_record: str) -> dict[str, Any]:
    bad = BadRecords(on_bad_record)
    samples, languages = 0, collections.Counter()
    for sample in shard_files.read_shard(path, bad, source.caption_fields, txt_language=source.txt_language):
        samples += 1
        languages.update(sample.captions.keys())
    return {"path": path, "samples": samples, "languages": dict(languages), "bad_records": bad.to_json()}


def build_index(source: shard_files.ShardSource, data_dir: str, on_bad_record: str = "skip",
                threads: int = 8, progress: bool = True) -> dict[str, Any]:
    """Read every shard of `source` (in `threads` at once, with a progress bar), write the index
    and return it."""
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        futures = [pool.submit(_count, path, source, on_bad_record) for path in source.paths]
        bar = tqdm(total=len(futures), unit="shard", desc="checking shards", disable=not progress)
        for _ in concurrent.futures.as_completed(futures):
            bar.update(1)
        bar.close()
        per_shard = [future.result() for future in futures]
    languages, bad_counts, bad_examples = collections.Counter(), collections.Counter(), {}
    for shard in per_shard:
        languages.update(shard["languages"])
        bad_counts.update(shard["bad_records"]["counts"])
        for problem, examples in shard["bad_records"]["examples"].items():
            bad_examples.setdefault(problem, []).extend(examples)
    index = {
        "fingerprint": fingerprint(source.paths),
        "samples": sum(shard["samples"] for shard in per_shard),
        "languages": dict(languages),
        "bad_records": {"counts": dict(bad_counts), "examples": {k: v[:5] for k, v in bad_examples.items()}},
        "shards": [{"path": s["path"], "samples": s["samples"]} for s in per_shard],
    }
    path = index_path(data_dir, source.paths)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with replaced_atomically(path) as temporary, open(temporary, "w") as handle:
        json.dump(index, handle, indent=1)
    return index


def describe(index: dict[str, Any]) -> str:
    """One line: samples, shards, languages, bad members."""
    languages = ", ".join(f"{language} {count}" for language, count in sorted(index["languages"].items()))
    return (f"{index['samples']} usable samples in {len(index['shards'])} shards (captions: {languages}); "
            f"{summary(index['bad_records'])}")
