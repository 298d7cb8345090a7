"""The step-by-step JSON lines a training run writes into its workdir: `metrics.jsonl` (process 0,
each logged step) and, with `train.record_batches`, `batches.process_<i>.jsonl` (every host, each
step's sample keys and a hash of its pixels). Both are trimmed to the checkpoint's step on resume,
so they stay one clean trajectory however often the run was killed."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import jax
import numpy as np

from vlretrieval.files import replaced_atomically


class MetricsWriter:
    """Appends one JSON object per line to `<workdir>/<name>` (`metrics.jsonl`: process 0, one
    per logged step; with `every_process`, each process its own file)."""

    def __init__(self, workdir: str, name: str = "metrics.jsonl", every_process: bool = False):
        self.path = os.path.join(workdir, name)
        self.writes = every_process or jax.process_index() == 0

    def write(self, record: dict[str, Any]) -> None:
        if not self.writes:
            return
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")

    def keep_until(self, step: int) -> None:
        """On resume: drop the records after the checkpoint's step (those steps run again) and a
        last line cut short by a killed process, so the file stays one clean trajectory."""
        if not self.writes or not os.path.exists(self.path):
            return
        kept = []
        with open(self.path) as handle:
            for line in handle:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if record.get("step", 0) <= step:
                    kept.append(json.dumps(record) + "\n")
        with replaced_atomically(self.path) as temporary, open(temporary, "w") as handle:
            handle.writelines(kept)


def batch_record(step: int, batch: dict[str, Any]) -> dict[str, Any]:
    """What `train.record_batches` writes of one host batch: the samples' keys (a split's record
    indices, or webdataset keys) and a hash of the pixels the model saw."""
    keys = batch["sample_keys"] if "sample_keys" in batch else batch["index"]
    return {"step": step, "keys": [str(key) for key in keys.tolist()],
            "images_sha1": hashlib.sha1(np.ascontiguousarray(batch["images"]).tobytes()).hexdigest()}
