"""`train.init_from`: start a run from another run, a converted folder, or Hugging Face folders.

`--init_from PATH` (a training run) must match the model exactly, as before. Converted weights
may cover part of the model and several sources may be combined, comma-separated:
  --init_from hf:/models/bert,hf:/models/vit      a BERT text tower + a ViT image tower
  --init_from runs/clip                           a folder written by `vlretrieval convert`
Every converted parameter must exist in the model with the same shape, no parameter may come
from two sources, and the architecture options of the parts a source covers (pre/post-LN,
epsilon, activation, poolers...) must equal the config's: equal shapes with another LayerNorm
placement would load and compute something else. Parameters no source covers (e.g. the
projections of two single towers) keep their fresh initialisation.
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from vlretrieval.checkpoint import load_params
from vlretrieval.convert import architectures, hf_in, native, positions
from vlretrieval.errors import UserError
from vlretrieval.models import layout

log = logging.getLogger(__name__)

_RUN_OPTIONS = ("dropout", "attention_dropout", "remat")  # how to train, not what to compute
PART_KEYS = {
    # Not head.text_pooling: how a sentence vector is pooled is a choice, not a property of the
    # weights (a BERT tower may be fine-tuned with mean pooling, as sentence-transformers does).
    "text": ("text_transformer", "text_embeddings", "head.text_pooler"),
    "image": ("image_transformer", "image_embeddings", "patch_size", "head.image_pooling",
              "head.image_pooler"),
    "projections": ("head.embed_dim", "head.image_projection", "head.text_projection_bias",
                    "head.clip_logit_scale"),
    "joint": ("transformer", "text_embeddings.type_vocab_size",
              "text_embeddings.layer_norm_eps", "patch_size"),
}


def _is_converted(source: str) -> bool:
    if source.startswith("hf:"):
        return True
    try:
        return native.conversion_record(source) is not None
    except UserError:
        return False  # not a checkpoint at all: load_params says so


def initial_params(spec: str, template: Any, model_config) -> Any:
    """The parameters `train.init_from = spec` gives a model whose fresh ones are `template`."""
    sources = [source.strip() for source in spec.split(",") if source.strip()]
    if len(sources) == 1 and not _is_converted(sources[0]):
        return load_params(sources[0], template)
    model = architectures.complete_section(model_config.to_dict())
    # Converted weights are in the unrolled layout (block_i); a scanned model gets them stacked.
    scanned = bool(layout.is_scanned(template))
    values = traverse_util.flatten_dict(layout.to_layout(template, scanned=False), sep="/")
    origin: dict[str, str] = {}
    for source in sources:
        if not _is_converted(source):
            raise UserError(f"--init_from {source}: only converted weights (hf:PATH or a folder "
                            "written by `vlretrieval convert`) can be combined")
        converted = _read(source, model)
        _check_compatible(source, converted, model)
        for path, array in converted.params.items():
            if path not in values:
                raise UserError(f"--init_from {source}: parameter {path} is not in this model")
            if tuple(array.shape) != tuple(values[path].shape):
                raise UserError(f"--init_from {source}: parameter {path} has shape "
                                f"{tuple(array.shape)} there but {tuple(values[path].shape)} "
                                "in this model")
            if path in origin:
                raise UserError(f"--init_from: parameter {path} comes from both {origin[path]} "
                                f"and {source}")
            origin[path] = source
            values[path] = np.asarray(array, values[path].dtype)
    kept = [name for name in values if name not in origin]
    if kept:
        log.info(f"--init_from: {len(kept)} parameters keep their initialisation "
                 f"({', '.join(kept[:4])}{', ...' if len(kept) > 4 else ''})")
    params = layout.to_layout(traverse_util.unflatten_dict(values, sep="/"), scanned=scanned)
    return jax.tree.map(np.asarray, params)


def _read(source: str, model: dict) -> hf_in.Converted:
    """A source's parameters with position tables fitted to this model's sizes."""
    sizes = dict(image_size=model["image_size"], max_text_length=model["max_text_length"])
    if source.startswith("hf:"):
        return hf_in.convert_folder(source[3:], model, **sizes)
    record = native.conversion_record(source)
    params, config = native.read_checkpoint(source)
    converted = hf_in.Converted(
        record["architecture"], tuple(record["parts"]),
        architectures.complete_section(config["model"]), record["vocab_size"],
        # A complete model's checkpoint also holds heads it initialised: only converted ones load.
        {path: params[path] for path in record["converted"]}, record["hf_config"], [],
    )
    return positions.resize(converted, **sizes)


def _value(model: dict, path: str):
    value = model
    for key in path.split("."):
        value = value[key]
    return value


def _check_compatible(source: str, converted: hf_in.Converted, model: dict) -> None:
    if converted.model["kind"] != model["kind"]:
        raise UserError(f"--init_from {source}: a {converted.architecture} initialises a "
                        f"{converted.model['kind']} model (config.model.kind), not "
                        f"{model['kind']}")
    for part in converted.parts:
        for key in PART_KEYS[part]:
            theirs, ours = _value(converted.model, key), _value(model, key)
            if isinstance(theirs, dict):
                pairs = [(f"{key}.{name}", theirs[name], ours.get(name)) for name in theirs
                         if name not in _RUN_OPTIONS]
            else:
                pairs = [(key, theirs, ours)]
            for name, want, have in pairs:
                if want != have:
                    raise UserError(
                        f"--init_from {source}: config.model.{name} is {have!r} but the "
                        f"{converted.architecture} weights need {want!r} "
                        f"(--config.model.{name}={want})"
                    )
