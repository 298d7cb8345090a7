"""`config.data.subset`: train and evaluate on chosen records of a split instead of all of it.

The option names a JSON file `{"train": [positions], "test": [positions]}`; each split it names is
read, by training and evaluation alike, as a view of those records in that order (`SubsetSource`,
returned by `RetrievalData.split`); splits it does not name stay whole. The continual protocol
(`vlretrieval continual`) writes one per task, so each task's folder is an ordinary run that `eval`
reproduces with the same option. Positions elsewhere (a batch's `index`, `train.record_batches`,
evaluation) are positions in the view.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from vlretrieval.errors import UserError
from vlretrieval.files import replaced_atomically


class SubsetSource(Sequence):
    """Random access to `positions` of `source` (a tfds data source): item i is
    `source[positions[i]]`."""

    def __init__(self, source: Sequence, positions: Sequence[int]):
        self.source, self.positions = source, tuple(int(position) for position in positions)

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return self.source[self.positions[index]]

    def __getitems__(self, indices: Sequence[int]) -> list[Any]:
        """Several records in one read where the source can (tfds' array_record sources can)."""
        wanted = [self.positions[index] for index in indices]
        if hasattr(self.source, "__getitems__"):
            return list(self.source.__getitems__(wanted))
        return [self.source[position] for position in wanted]


def read_subset(path: str, *, streaming: bool = False) -> dict[str, tuple[int, ...]] | None:
    """The split -> positions of `config.data.subset` (None when empty), checked in one line.
    `streaming`: the run trains from webdataset shards, which a subset cannot select from."""
    if not path:
        return None
    where = f"config.data.subset {path}"
    try:
        with open(path, encoding="utf-8") as handle:
            subset = json.load(handle)
    except OSError as error:
        raise UserError(f"{where}: {error.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{where} is not JSON ({error})") from None
    if not isinstance(subset, dict) or not subset or not all(
        isinstance(positions, list) and all(isinstance(p, int) and not isinstance(p, bool) and p >= 0
                                            for p in positions)
        for positions in subset.values()
    ):
        raise UserError(f'{where} must be a JSON object of split -> record positions, e.g. {{"train": [0, 5, 9]}}')
    if empty := [split for split, positions in subset.items() if not positions]:
        raise UserError(f"{where} selects no records of split {empty[0]!r}: leave the split out to read it whole")
    if streaming and "train" in subset:
        raise UserError(f"{where} selects training records, but data.name=webdataset streams whole shards")
    return {split: tuple(positions) for split, positions in subset.items()}


def view(source: Sequence, positions: Sequence[int] | None, split: str, path: str) -> Sequence:
    """`source` itself (no subset of this split), or the view of `positions` of it."""
    if positions is None:
        return source
    if max(positions) >= len(source):
        raise UserError(f"config.data.subset {path} selects record {max(positions)} of split {split!r}, "
                        f"which has {len(source)}")
    return SubsetSource(source, positions)


def write_subset(path: str, subset: dict[str, Sequence[int]]) -> None:
    """Write a subset file (atomically) for `config.data.subset`."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with replaced_atomically(path) as temporary, open(temporary, "w", encoding="utf-8") as handle:
        json.dump({split: [int(p) for p in positions] for split, positions in subset.items()}, handle)

