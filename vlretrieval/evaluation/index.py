"""Saved embedding indexes: a gallery's embeddings, item ids and provenance in one safetensors file.

Tensors: `embeddings` [items, dim] float32, item ids as UTF-8 bytes with offsets. Metadata: the
checkpoint step, a hash of the model config, the modality, the dimension and whether the vectors
are L2-normalised. Any query encoder whose output has the same dimension and normalisation may
query the index (e.g. a newer text tower against images indexed earlier); others are refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence

import ml_collections
import numpy as np
from safetensors.numpy import load_file, save_file

from vlretrieval.errors import UserError, first_line
from vlretrieval.files import replaced_atomically

FORMAT = "vlretrieval-index"
VERSION = "1"


@dataclasses.dataclass
class Index:
    embeddings: np.ndarray
    item_ids: list[str]
    step: int
    config_hash: str
    modality: str
    normalized: bool

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])


def config_hash(model_config: ml_collections.ConfigDict) -> str:
    """A short hash of the model section: equal hashes mean the same architecture."""
    text = json.dumps(model_config.to_dict(), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def is_normalized(embeddings: np.ndarray, tolerance: float = 1e-3) -> bool:
    norms = np.linalg.norm(np.asarray(embeddings, np.float64), axis=1)
    return bool(len(norms)) and bool(np.all(np.abs(norms - 1.0) < tolerance))


def write_index(
    path: str, embeddings: np.ndarray, item_ids: Sequence[str], *, step: int, config_hash: str,
    modality: str = "image",
) -> None:
    """Write atomically (a temporary file renamed), so a failed write leaves any old index whole."""
    embeddings = np.ascontiguousarray(embeddings, np.float32)
    if embeddings.ndim != 2 or len(item_ids) != len(embeddings):
        raise ValueError(f"{len(item_ids)} item ids for embeddings of shape {embeddings.shape}")
    encoded = [str(item).encode("utf-8") for item in item_ids]
    offsets = np.cumsum([0] + [len(e) for e in encoded]).astype(np.int64)
    tensors = {
        "embeddings": embeddings,
        "item_id_bytes": np.frombuffer(b"".join(encoded), np.uint8).copy(),
        "item_id_offsets": offsets,
    }
    metadata = {
        "format": FORMAT, "version": VERSION, "step": str(step), "config_hash": config_hash,
        "modality": modality, "dim": str(embeddings.shape[1]),
        "normalized": str(is_normalized(embeddings)).lower(),
    }
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise UserError(f"cannot write the index {path}: directory {directory} does not exist")
    with replaced_atomically(path) as temporary:
        save_file(tensors, temporary, metadata=metadata)


def read_index(path: str) -> Index:
    if not os.path.isfile(path):
        raise UserError(f"--index {path}: no such file; write one with `vlretrieval index`")
    try:
        from safetensors import safe_open

        with safe_open(path, framework="numpy") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(path)
    except Exception as error:  # safetensors raises several types for a file that is not one
        raise UserError(f"--index {path}: not a readable safetensors file ({first_line(error)})") from None
    if metadata.get("format") != FORMAT or "embeddings" not in tensors:
        raise UserError(f"--index {path}: not a vlretrieval index (no '{FORMAT}' metadata); "
                        f"write one with `vlretrieval index`")
    data, offsets = tensors["item_id_bytes"].tobytes(), tensors["item_id_offsets"]
    ids = [data[offsets[i] : offsets[i + 1]].decode("utf-8") for i in range(len(offsets) - 1)]
    return Index(tensors["embeddings"], ids, int(metadata["step"]), metadata["config_hash"],
                 metadata["modality"], metadata["normalized"] == "true")


def check_compatible(index: Index, path: str, query_dim: int, query_normalized: bool) -> None:
    """Refuse, in one line, an index the query encoder's vectors cannot be compared with."""
    if index.dim != query_dim:
        raise UserError(
            f"--index {path}: its embeddings have dimension {index.dim} but this query encoder "
            f"gives {query_dim}; re-index the gallery with this model (`vlretrieval index`)"
        )
    if index.normalized != query_normalized:
        state = lambda flag: "L2-normalised" if flag else "not normalised"
        raise UserError(
            f"--index {path}: its embeddings are {state(index.normalized)} but this query "
            f"encoder's are {state(query_normalized)}; re-index the gallery with this model"
        )


def gallery_for_split(index: Index, path: str, count: int) -> np.ndarray:
    """The index's embeddings as the gallery of an evaluation split of `count` images."""
    if index.modality != "image" or len(index.embeddings) != count:
        raise UserError(
            f"--index {path}: it holds {len(index.embeddings)} {index.modality} embeddings but the "
            f"evaluation split has {count} images; index the same split (and config.eval.max_images)"
        )
    return index.embeddings


def query_checker(index: Index, path: str):
    """`check(query_embeddings)`: refuses queries that cannot be compared with the index."""
    return lambda queries: check_compatible(index, path, queries.shape[1], is_normalized(queries))
