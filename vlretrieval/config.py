"""Experiment configs: Python files with `get_config(arg)`, plus `--config.a.b=value` overrides.

`--config configs/demo.py:tiny` passes "tiny" to `get_config`. Overrides are parsed to the type of
the field they replace, and a key the config does not have is an error (with a suggestion), never
silently added: a typo must not train the wrong experiment for a week.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import os

import ml_collections

from vlretrieval.errors import UserError


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """Load `path.py` or `path.py:arg` and call its `get_config(arg)`."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise UserError(f"config file {path!r} does not exist")
    module_spec = importlib.util.spec_from_file_location("_vlretrieval_config", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as error:  # a broken config file: name it and the error, one line
        raise UserError(f"config file {path!r} failed to load: {error!r}") from None
    if not hasattr(module, "get_config"):
        raise UserError(f"config file {path!r} has no get_config(arg) function")
    config = module.get_config(arg or None)
    if not isinstance(config, ml_collections.ConfigDict):
        raise UserError(f"get_config in {path!r} must return an ml_collections.ConfigDict")
    return config


def load_sibling_config(config_file: str, name: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """The config of the file `name` beside `config_file` (e.g. an experiment's base,
    configs/demo.py), called with `arg`: what an experiment that modifies another starts from."""
    path = os.path.join(os.path.dirname(os.path.abspath(config_file)), name)
    return load_config_file(f"{path}:{arg}" if arg else path)


def _all_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in config.items():
        keys.append(prefix + key)
        if isinstance(value, ml_collections.ConfigDict):
            keys.extend(_all_keys(value, prefix + key + "."))
    return keys


def _parse_value(text: str, current, key: str):
    """Parse `text` into the type of the field's current value."""
    if isinstance(current, bool):
        lowered = text.lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise UserError(f"config.{key} expects true or false, got {text!r}")
    if isinstance(current, str) or current is None:
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise UserError(f"config.{key} expects a {type(current).__name__}, got {text!r}") from None
    if isinstance(current, float) and isinstance(value, int):
        value = float(value)
    if isinstance(current, (tuple, list)) and isinstance(value, (tuple, list)):
        return type(current)(value)
    if not isinstance(value, type(current)):
        raise UserError(f"config.{key} expects a {type(current).__name__}, got {text!r}")
    return value


def apply_override(config: ml_collections.ConfigDict, key: str, text: str) -> None:
    """Set `config.<key>` from its command-line text; unknown keys are an error."""
    *parents, leaf = key.split(".")
    node = config
    for depth, name in enumerate(parents):
        child = node.get(name) if isinstance(node, ml_collections.ConfigDict) else None
        if not isinstance(child, ml_collections.ConfigDict):
            _unknown(config, ".".join(parents[: depth + 1]))
        node = child
    if leaf not in node:
        _unknown(config, key)
    with node.unlocked():
        node[leaf] = _parse_value(text, node[leaf], key)


def _unknown(config: ml_collections.ConfigDict, key: str):
    close = difflib.get_close_matches(key, _all_keys(config), n=1)
    hint = f"; did you mean config.{close[0]}?" if close else ""
    raise UserError(f"unknown config key config.{key}{hint}")


def load_config(spec: str, overrides: list[str] | tuple[str, ...] = ()) -> ml_collections.ConfigDict:
    """The config of `spec` with `key=value` overrides applied, locked against new keys."""
    config = load_config_file(spec)
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep:
            raise UserError(f"config override {override!r} must look like --config.key=value")
        apply_override(config, key, value)
    config.lock()
    return config


def differences(saved: dict, config: ml_collections.ConfigDict, sections=None, ignore=()) -> list[str]:
    """`key: saved -> current` for every leaf where `config` differs from a saved config dict (as
    a checkpoint stores it, in JSON), sorted; keys only one side has count as differences.
    `sections`: compare only these top-level keys (all when None); `ignore`: leaves not compared."""
    current = json.loads(json.dumps(config.to_dict()))  # tuples as lists, as they were saved
    if sections is not None:
        saved = {key: value for key, value in saved.items() if key in sections}
        current = {key: value for key, value in current.items() if key in sections}

    def leaves(tree, prefix=""):
        if not isinstance(tree, dict):
            return {prefix[:-1]: tree}
        return {
            key: value for name, child in tree.items() for key, value in leaves(child, f"{prefix}{name}.").items()
        }

    before, after = leaves(saved), leaves(current)
    absent = "(absent)"
    return [
        f"{key}: {json.dumps(before.get(key, absent))} -> {json.dumps(after.get(key, absent))}"
        for key in sorted((before.keys() | after.keys()) - set(ignore))
        if before.get(key, absent) != after.get(key, absent)
    ]


# What a checkpoint's parameters mean: the seed also draws the demo data and its tokenizer.
TRAINED_ON = ("seed", "data", "model")
# ...except where the data lives, how training read it, and which languages are reported.
_NOT_MEANING = ("data.data_dir", "data.crop_scale", "data.on_bad_record", "data.languages")


def evaluated_config_note(saved: dict | None, config: ml_collections.ConfigDict, step: int) -> str | None:
    """The line `eval`, `index` and `search` print when the data or model settings differ from
    those the checkpoint at `step` was trained with (another tokenizer or dataset gives recall at
    chance with no error), or None. Evaluation and training settings may differ freely."""
    changed = [] if saved is None else differences(saved, config, TRAINED_ON, ignore=_NOT_MEANING)
    if not changed:
        return None
    return (f"note: the checkpoint at step {step} was trained with other data or model settings: "
            + "; ".join(changed) + " (expected on another dataset; with another tokenizer or model "
            "the scores mean nothing)")
