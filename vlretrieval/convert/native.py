"""Our side of a conversion: write a converted model as a vlretrieval run folder, read one back.

A converted folder is laid out like a training workdir, so `eval --workdir`, `--init_from` and
`convert --to-hf` read it as they read any run:
  checkpoints/0/      orbax: the state (step 0) and the experiment config, as `checkpoint.py` saves
  config.py           the experiment config (`--config` base + the converted model section + the
                      settings the architecture needs, e.g. SigLIP's sigmoid loss)
  model.json          that model section
  conversion.json     source, architecture, parameters converted and parameters initialised
  tokenizer/          the source's tokenizer files, when it has them
A complete model (CLIP, SigLIP, ViLT) is saved as a whole train state; a single tower (BERT,
XLM-R, ViT, SigLIP's vision tower) as its parameters only, for `--init_from`. Everything is
written into a temporary folder that is renamed at the end, so a failure leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

import numpy as np
from flax import traverse_util

from vlretrieval.checkpoint import find_checkpoint, read_saved_params
from vlretrieval.convert import architectures
from vlretrieval.errors import UserError
from vlretrieval.models import layout

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.txt", "vocab.json", "merges.txt", "sentencepiece.bpe.model", "spiece.model",
)
CONVERSION_FILE = "conversion.json"

CONFIG_PY = '''"""Written by `vlretrieval convert` from {source} ({architecture}).

{base} with the converted model (model.json beside this file){tokenizer_note}.
"""

import json
import os

import ml_collections

from vlretrieval.config import load_config_file

HERE = os.path.dirname(os.path.abspath(__file__))
BASE = {base!r}
# What the converted architecture needs of the experiment beyond its model (e.g. SigLIP's loss).
SETTINGS = {settings!r}


def get_config(arg=None):
    """The base config (with ARG in place of the base's own, if given) and this model."""
    config = load_config_file(BASE if arg is None else f"{{BASE.partition(':')[0]}}:{{arg}}")
    with open(os.path.join(HERE, "model.json")) as handle:
        config.model = ml_collections.ConfigDict(json.load(handle))
    config.data.max_text_length = min(config.data.max_text_length, config.model.max_text_length)
    for key, value in SETTINGS.items():
        *parents, name = key.split(".")
        section = config
        for parent in parents:
            section = section[parent]
        section[name] = value
    if os.path.isdir(os.path.join(HERE, "tokenizer")):
        config.data.tokenizer = os.path.join(HERE, "tokenizer")
    return config
'''


def is_complete(converted) -> bool:
    return set(converted.parts) in ({"text", "image", "projections"}, {"joint"})


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """{"a/b/c": x} -> {"a": {"b": {"c": x}}}."""
    return traverse_util.unflatten_dict(flat, sep="/")


def flatten(tree: Any) -> dict[str, Any]:
    """{"a": {"b": {"c": x}}} -> {"a/b/c": x}."""
    return traverse_util.flatten_dict(tree, sep="/")


def write_converted(converted, outdir: str, base_config, base_spec: str, source: str) -> list[str]:
    """Writes `converted` (hf_in.Converted) to `outdir`; returns the parameters initialised
    rather than converted (heads the source does not have)."""
    import ml_collections

    outdir = os.path.abspath(outdir)
    if os.path.exists(outdir):
        raise UserError(f"--to {outdir} already exists; choose a new folder")
    parent = os.path.dirname(outdir)
    os.makedirs(parent, exist_ok=True)
    config = ml_collections.ConfigDict(base_config.to_dict())
    config.model = ml_collections.ConfigDict(converted.model)
    config.data.max_text_length = min(config.data.max_text_length, converted.model["max_text_length"])
    settings = architectures.experiment_settings(converted.architecture, converted.model)
    _apply(config, settings)  # as config.py does, so the checkpoint's config is the same
    tokenizer_files = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(source, n))]
    if tokenizer_files:
        config.data.tokenizer = os.path.join(outdir, "tokenizer")
    temporary = tempfile.mkdtemp(prefix=f".{os.path.basename(outdir)}.", dir=parent)
    try:
        state, initialised = _state(converted, config)
        _save(temporary, state, config)
        for name in tokenizer_files:
            os.makedirs(os.path.join(temporary, "tokenizer"), exist_ok=True)
            shutil.copy2(os.path.join(source, name), os.path.join(temporary, "tokenizer", name))
        with open(os.path.join(temporary, "model.json"), "w") as handle:
            json.dump(converted.model, handle, indent=2)
        with open(os.path.join(temporary, "config.py"), "w") as handle:
            handle.write(CONFIG_PY.format(
                source=os.path.abspath(source), architecture=converted.architecture,
                base=_absolute_spec(base_spec), settings=settings,
                tokenizer_note=" and its tokenizer (tokenizer/)" if tokenizer_files else "",
            ))
        with open(os.path.join(temporary, CONVERSION_FILE), "w") as handle:
            json.dump(dict(
                source=os.path.abspath(source), architecture=converted.architecture,
                parts=list(converted.parts), vocab_size=converted.vocab_size,
                converted=sorted(converted.params), initialised=initialised,
                notes=converted.notes, hf_config=converted.hf_config,
            ), handle, indent=2)
        os.rename(temporary, outdir)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return initialised


def _apply(config, settings: dict) -> None:
    for key, value in settings.items():
        *parents, name = key.split(".")
        section = config
        for parent in parents:
            section = section[parent]
        section[name] = value


def _absolute_spec(spec: str) -> str:
    path, separator, arg = spec.partition(":")
    return os.path.abspath(path) + separator + arg


def _state(converted, config) -> tuple[Any, list[str]]:
    """A whole train state for a complete model, else {"params": the tower's parameters}."""
    if not is_complete(converted):
        return {"params": nest(converted.params)}, []
    import jax

    from vlretrieval.models import build_model
    from vlretrieval.state import create_train_state, make_optimizer

    model = build_model(config.model, converted.vocab_size)
    tx, _ = make_optimizer(config.optimizer, config.train.num_steps)
    # Shapes first: a model that the source covers entirely (CLIP) needs no initialisation run.
    abstract = jax.eval_shape(lambda: create_train_state(model, tx, config.seed))
    initialised = sorted(set(flatten(abstract.params)) - set(converted.params))
    if initialised:
        state = create_train_state(model, tx, config.seed)
        flat = flatten(jax.device_get(state.params))
    else:
        state = abstract.replace(
            step=np.zeros((), np.int32),
            rng=jax.random.split(jax.random.PRNGKey(config.seed))[1],
        )
        flat = {path: np.zeros(leaf.shape, leaf.dtype) for path, leaf in
                flatten(abstract.params).items()}
    for path, array in converted.params.items():
        flat[path] = np.asarray(array, flat[path].dtype)
    params = nest(flat)
    return state.replace(params=params, opt_state=tx.init(params)), initialised


def _save(directory: str, state: Any, config) -> None:
    from vlretrieval.checkpoint import Checkpointer

    checkpointer = Checkpointer(directory)
    checkpointer.save(0, state, config)
    checkpointer.wait()
    checkpointer.close()


def run_folder(path: str) -> str:
    """The run folder (where conversion.json would be) of a checkpoint path."""
    directory, _ = find_checkpoint(path)
    return os.path.dirname(directory) if os.path.basename(directory) == "checkpoints" else directory


def read_checkpoint(path: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(flat parameters, experiment config dict) of any vlretrieval checkpoint."""
    params, config = read_saved_params(path, with_config=True)
    # The converters name one Hugging Face layer per block_i: scanned stacks are unrolled here.
    params = layout.to_layout(params, scanned=False)
    return {k: np.asarray(v) for k, v in flatten(params).items()}, config


def conversion_record(path: str) -> dict[str, Any] | None:
    """conversion.json of the run folder holding `path`, if `vlretrieval convert` wrote it."""
    record = os.path.join(run_folder(path), CONVERSION_FILE)
    if not os.path.isfile(record):
        return None
    with open(record) as handle:
        return json.load(handle)
