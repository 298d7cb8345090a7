"""Hugging Face folder -> our parameters: read config.json and the weights, apply the rules.

Weights are read from `model.safetensors` with numpy (no torch, no pickle), or from
`pytorch_model.bin` with `torch.load(weights_only=True)`, which refuses to run pickled code.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np
from flax import traverse_util

from vlretrieval.convert import architectures, positions, sentence_transformers
from vlretrieval.convert.rules import hf_shape, to_ours
from vlretrieval.errors import UserError, first_line
from vlretrieval.models import layout

SAFETENSORS, PYTORCH_BIN = "model.safetensors", "pytorch_model.bin"
# Buffers some checkpoints carry beside the weights: recomputed by the model, never learned.
IGNORED_SUFFIXES = ("position_ids", "token_type_ids")


@dataclasses.dataclass
class Converted:
    """Our parameters (a flat {path: array} over the parts covered) and the model they belong to."""

    architecture: str
    parts: tuple[str, ...]  # "text", "image", "projections" (dual) or "joint" (decomposed)
    model: dict[str, Any]  # our `model` config section
    vocab_size: int | None
    params: dict[str, np.ndarray]
    hf_config: dict[str, Any]
    notes: list[str]


def read_config(folder: str) -> tuple[dict, str]:
    """(config.json, its architecture), refusing an architecture we cannot convert."""
    if not os.path.isdir(folder):
        raise UserError(f"{folder} is not a folder (expected a Hugging Face model folder)")
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise UserError(f"{folder} has no config.json (expected a Hugging Face model folder)")
    try:
        with open(path) as handle:
            config = json.load(handle)
    except (OSError, json.JSONDecodeError) as error:
        raise UserError(f"{path} is not readable JSON: {error}") from None
    names = config.get("architectures") or []
    supported = ", ".join(architectures.IMPORTS)
    if len(names) != 1 or names[0] not in architectures.IMPORTS:
        raise UserError(f"{path}: architecture {', '.join(names) or '(none given)'} is not "
                        f"supported; supported: {supported}")
    return config, names[0]


def read_weights(folder: str) -> dict[str, np.ndarray]:
    """The state dict as float32 numpy arrays, buffers removed."""
    safetensors_path = os.path.join(folder, SAFETENSORS)
    bin_path = os.path.join(folder, PYTORCH_BIN)
    if os.path.isfile(safetensors_path):
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        try:
            state = load_file(safetensors_path)
        except (SafetensorError, OSError, ValueError) as error:
            raise UserError(f"{safetensors_path} is not a readable safetensors file: {error}") from None
    elif os.path.isfile(bin_path):
        state = _read_torch_bin(bin_path)
    else:
        sharded = [n for n in os.listdir(folder) if n.endswith(".index.json")]
        hint = " (sharded checkpoints are not supported)" if sharded else ""
        raise UserError(f"{folder} has no weights file: expected {SAFETENSORS} or "
                        f"{PYTORCH_BIN}{hint}")
    return {
        name: np.asarray(value, np.float32) for name, value in state.items()
        if not name.endswith(IGNORED_SUFFIXES)
    }


def _read_torch_bin(path: str) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise UserError(f"{path} is a PyTorch file and reading it needs torch (pip install torch), "
                        "or save the model as model.safetensors") from None
    try:
        # weights_only: tensors and plain containers only; a pickle that would run code is refused.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError, EOFError...
        raise UserError(f"{path} was refused: not a plain tensor file ({first_line(error)})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} is not a state dict of tensors")
    return {name: value.detach().float().numpy() for name, value in state.items()}


def convert_folder(
    folder: str,
    base_model: dict,
    *,
    image_size: int | None = None,
    max_text_length: int | None = None,
) -> Converted:
    """Reads an HF folder into our parameters; `base_model` fills what the HF model does not
    define (e.g. the other tower). Position tables are resized to `image_size` (interpolated)
    and cut to `max_text_length` when those are given."""
    sentence_layout = sentence_transformers.read_layout(folder)
    model_folder = sentence_layout.transformer_dir if sentence_layout else folder
    hf_config, architecture = read_config(model_folder)
    state = architectures.current_keys(architecture, read_weights(model_folder))
    where = os.path.join(model_folder, "config.json")
    try:
        model, vocab_size = architectures.model_from_hf(
            architecture, hf_config, set(state), base_model, where
        )
    except KeyError as error:
        raise UserError(f"{where} lacks {error.args[0]!r}, which {architecture} needs") from None
    notes = []
    if sentence_layout is not None:  # the folder's declared pooling, not the architecture's default
        if "text" not in architectures.IMPORTS[architecture][1]:
            raise UserError(f"{folder}: a sentence-transformers folder must hold a text model, not {architecture}")
        model["head"]["text_pooling"] = sentence_layout.pooling
        # sentence-transformers pools the token states; BERT's pooler (dense + tanh) is not used.
        model["head"]["text_pooler"] = False
        for name in [name for name in state if name.startswith("pooler.")]:
            del state[name]
        notes.append(f"sentence-transformers pooling: {sentence_layout.pooling}"
                     + (" (then normalised; our embeddings always are)" if sentence_layout.normalize else ""))
    rules = architectures.rules_for(architecture, model, hf_config)
    expected = expected_shapes(model, vocab_size or 1)
    params = {}
    for rule in rules:
        if rule.hf not in state:
            raise UserError(f"{folder}: parameter {rule.hf} is missing from the weights "
                            f"(is this a {architecture} checkpoint?)")
        array = state.pop(rule.hf)
        want = hf_shape(rule, expected[rule.ours])
        if tuple(array.shape) != want:
            raise UserError(f"{folder}: parameter {rule.hf} has shape {tuple(array.shape)} but "
                            f"config.json implies {want}")
        params[rule.ours] = to_ours(rule, array)
    if state:
        extra = sorted(state)
        raise UserError(f"{folder}: parameter {extra[0]} (and {len(extra) - 1} more) is not part "
                        f"of {architecture}; a model with heads is not supported")
    _, parts = architectures.IMPORTS[architecture]
    converted = Converted(architecture, parts, model, vocab_size, params, hf_config, notes)
    return positions.resize(converted, image_size=image_size, max_text_length=max_text_length)


def expected_shapes(model: dict, vocab_size: int) -> dict[str, tuple[int, ...]]:
    """{path: shape} of every parameter of the model the section describes (no arrays made)."""
    import jax
    import ml_collections

    from vlretrieval.models.factory import build_model, example_inputs

    module = build_model(ml_collections.ConfigDict(model), vocab_size)
    inputs = example_inputs(module, batch_size=1)
    shapes = jax.eval_shape(
        lambda: module.init(jax.random.PRNGKey(0), *inputs, method=module.initialize)["params"]
    )
    shapes = layout.to_layout(shapes, scanned=False)  # the converters' layout, whatever the model's
    return {path: tuple(leaf.shape) for path, leaf in traverse_util.flatten_dict(shapes, sep="/").items()}
