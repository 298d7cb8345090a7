"""Saved embedding indexes: a gallery's embeddings, item ids and provenance in one safetensors file.

Tensors: `embeddings` [items, dim] float32, or for a code index (`vlretrieval index --codes`)
`codes` [items, ceil(bits / 32)] uint32 packed binary codes (`codes.py`: 8 bytes an item at 64
bits, against 4 x dim for floats); item ids as UTF-8 bytes with offsets. Metadata: the checkpoint
step, a hash of the model config, the modality, the dimension and whether the vectors are
L2-normalised, or the code length and where the codes came from (`sign`: the signs of the
embeddings; `hash_head`: a trained hashing head). Any query encoder whose output has the same
dimension and normalisation (for codes: the same length and source) may query the index (e.g. a
newer text tower against images indexed earlier); others are refused.
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


CODE_SOURCES = ("sign", "hash_head")


@dataclasses.dataclass
class Index:
    embeddings: np.ndarray  # float32 [items, dim], or uint32 [items, words] packed codes
    item_ids: list[str]
    step: int
    config_hash: str
    modality: str
    normalized: bool
    code_bits: int = 0  # 0: float embeddings
    code_source: str = ""

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    @property
    def is_codes(self) -> bool:
        return self.code_bits > 0

    @property
    def bytes_per_item(self) -> int:
        return int(self.embeddings.shape[1] * self.embeddings.itemsize)


def config_hash(model_config: ml_collections.ConfigDict) -> str:
    """A short hash of the model section: equal hashes mean the same architecture."""
    text = json.dumps(model_config.to_dict(), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def is_normalized(embeddings: np.ndarray, tolerance: float = 1e-3) -> bool:
    norms = np.linalg.norm(np.asarray(embeddings, np.float64), axis=1)
    return bool(len(norms)) and bool(np.all(np.abs(norms - 1.0) < tolerance))


def write_index(
    path: str, embeddings: np.ndarray, item_ids: Sequence[str], *, step: int, config_hash: str,
    modality: str = "image", code_bits: int = 0, code_source: str = "",
) -> None:
    """Write atomically (a temporary file renamed), so a failed write leaves any old index whole.
    With `code_bits`, `embeddings` are packed codes (uint32 words, `codes.pack_codes`)."""
    is_codes = code_bits > 0
    embeddings = np.ascontiguousarray(embeddings, np.uint32 if is_codes else np.float32)
    if embeddings.ndim != 2 or len(item_ids) != len(embeddings):
        raise ValueError(f"{len(item_ids)} item ids for embeddings of shape {embeddings.shape}")
    if is_codes and code_source not in CODE_SOURCES:
        raise ValueError(f"code_source must be one of {CODE_SOURCES}, not {code_source!r}")
    encoded = [str(item).encode("utf-8") for item in item_ids]
    offsets = np.cumsum([0] + [len(e) for e in encoded]).astype(np.int64)
    tensors = {
        "codes" if is_codes else "embeddings": embeddings,
        "item_id_bytes": np.frombuffer(b"".join(encoded), np.uint8).copy(),
        "item_id_offsets": offsets,
    }
    metadata = {
        "format": FORMAT, "version": VERSION, "step": str(step), "config_hash": config_hash,
        "modality": modality, "dim": str(embeddings.shape[1]),
        "normalized": "false" if is_codes else str(is_normalized(embeddings)).lower(),
    }
    if is_codes:
        metadata.update(code_bits=str(code_bits), code_source=code_source)
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
    if metadata.get("format") != FORMAT or not {"embeddings", "codes"} & set(tensors):
        raise UserError(f"--index {path}: not a vlretrieval index (no '{FORMAT}' metadata); "
                        f"write one with `vlretrieval index`")
    data, offsets = tensors["item_id_bytes"].tobytes(), tensors["item_id_offsets"]
    ids = [data[offsets[i] : offsets[i + 1]].decode("utf-8") for i in range(len(offsets) - 1)]
    vectors = tensors["codes"] if "codes" in tensors else tensors["embeddings"]
    return Index(vectors, ids, int(metadata["step"]), metadata["config_hash"], metadata["modality"],
                 metadata["normalized"] == "true", int(metadata.get("code_bits", 0)),
                 metadata.get("code_source", ""))


def check_code_queries(index: Index, path: str, query_bits: int, query_source: str) -> None:
    """Refuse, in one line, a code index that this model's query codes cannot be compared with,
    and a float index queried for codes (or the reverse)."""
    if not index.is_codes:
        if query_bits:
            raise UserError(f"--index {path}: it holds float embeddings; binary codes cannot query it "
                            "(re-index with `vlretrieval index --codes`, or query with embeddings)")
        return
    if not query_bits:
        raise UserError(f"--index {path}: it holds {index.code_bits}-bit binary codes; float embeddings "
                        "cannot query it: search it with codes (`search --codes`, `eval --codes`)")
    if (index.code_bits, index.code_source) != (query_bits, query_source):
        where = lambda source: "a hashing head" if source == "hash_head" else "the embeddings' signs"
        raise UserError(
            f"--index {path}: it holds {index.code_bits}-bit codes from {where(index.code_source)} but this "
            f"model's text codes are {query_bits} bits from {where(query_source)}; re-index the gallery "
            "with this model (`vlretrieval index --codes`)"
        )


def check_compatible(index: Index, path: str, query_dim: int, query_normalized: bool) -> None:
    """Refuse, in one line, an index the query encoder's vectors cannot be compared with."""
    if index.is_codes:
        raise UserError(f"--index {path}: it holds {index.code_bits}-bit binary codes; float embeddings "
                        "cannot query it: search it with codes (`search --codes`, `eval --codes`)")
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
        kind = f"{index.code_bits}-bit codes of" if index.is_codes else ""
        raise UserError(
            f"--index {path}: it holds {len(index.embeddings)} {kind} {index.modality} embeddings but the "
            f"evaluation split has {count} images; index the same split (and config.eval.max_images)"
        )
    return index.embeddings


def query_checker(index: Index, path: str):
    """`check(query_embeddings)`: refuses queries that cannot be compared with the index."""
    return lambda queries: check_compatible(index, path, queries.shape[1], is_normalized(queries))
