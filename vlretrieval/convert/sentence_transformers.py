"""sentence-transformers folders: a Hugging Face text model plus the modules that say how its token
states become one sentence vector.

`modules.json` lists the pipeline: a `Transformer` (the HF model, usually at the folder's root), a
`Pooling` whose `config.json` picks the pooling (`pooling_mode_mean_tokens`, `_cls_token`,
`_max_tokens`), and optionally `Normalize`. The pooling becomes the converted tower's
`model.head.text_pooling` (a choice, not a property of the weights: any pooling may be set on BERT
or XLM-R weights afterwards); our towers always L2-normalise their embeddings, so `Normalize` only
changes what a sentence-transformers user compares (cosine either way). Other modules (`Dense`,
`CNN`, ...) and pooling that concatenates several modes are refused rather than dropped.
"""

from __future__ import annotations

import dataclasses
import json
import os

from vlretrieval.errors import UserError

MODULES_FILE = "modules.json"
_POOLING_MODES = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean", "pooling_mode_max_tokens": "max"}
_UNSUPPORTED_MODES = ("pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens",
                      "pooling_mode_lasttoken")


@dataclasses.dataclass(frozen=True)
class SentenceTransformerLayout:
    transformer_dir: str  # the folder holding the HF model's config.json and weights
    pooling: str  # cls | mean | max
    normalize: bool


def _read_json(path: str):
    try:
        with open(path) as handle:
            return json.load(handle)
    except (OSError, json.JSONDecodeError) as error:
        raise UserError(f"{path} is not readable JSON: {error}") from None


def read_layout(folder: str) -> SentenceTransformerLayout | None:
    """The sentence-transformers layout of `folder`, or None when it is a plain HF folder."""
    path = os.path.join(folder, MODULES_FILE)
    if not os.path.isfile(path):
        return None
    modules = _read_json(path)
    if not isinstance(modules, list):
        raise UserError(f"{path} must list the modules")
    by_kind: dict[str, str] = {}
    for module in modules:
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]
        if kind not in ("Transformer", "Pooling", "Normalize"):
            raise UserError(f"{path}: module {module.get('type')!r} is not supported (only Transformer, "
                            "Pooling and Normalize)")
        by_kind[kind] = os.path.join(folder, module.get("path", ""))
    if "Transformer" not in by_kind or "Pooling" not in by_kind:
        raise UserError(f"{path} needs a Transformer and a Pooling module")
    pooling_config = _read_json(os.path.join(by_kind["Pooling"], "config.json"))
    chosen = [ours for key, ours in _POOLING_MODES.items() if pooling_config.get(key)]
    unsupported = [key for key in _UNSUPPORTED_MODES if pooling_config.get(key)]
    if unsupported or len(chosen) != 1:
        raise UserError(f"{by_kind['Pooling']}/config.json: pooling {unsupported or chosen or 'none'} is not "
                        "supported; exactly one of cls, mean or max")
    return SentenceTransformerLayout(by_kind["Transformer"], chosen[0], "Normalize" in by_kind)
