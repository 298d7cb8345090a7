"""Configs: command-line overrides typed like the field they replace; typos are errors."""

import pytest

from vlretrieval.config import load_config
from vlretrieval.errors import UserError

DEMO = "configs/demo.py"


def test_overrides_are_parsed_to_the_field_type():
    config = load_config(
        DEMO, ["train.batch_size=64", "optimizer.learning_rate=1e-3", "data.languages=('en',)",
               "model.transformer.pre_norm=false", "model.kind=dual"]
    )
    assert config.train.batch_size == 64
    assert config.optimizer.learning_rate == 1e-3
    assert config.data.languages == ("en",)
    assert config.model.transformer.pre_norm is False
    assert config.model.kind == "dual"


def test_unknown_key_is_rejected_with_a_suggestion():
    with pytest.raises(
        UserError, match=r"unknown config key config\.train\.batch_sise; did you mean config\.train\.batch_size"
    ):
        load_config(DEMO, ["train.batch_sise=64"])
    with pytest.raises(UserError, match="unknown config key config.trian"):
        load_config(DEMO, ["trian.batch_size=64"])


def test_wrongly_typed_value_is_rejected():
    with pytest.raises(UserError, match="config.train.batch_size expects a int"):
        load_config(DEMO, ["train.batch_size=big"])


def test_missing_config_file():
    with pytest.raises(UserError, match="does-not-exist.py"):
        load_config("configs/does-not-exist.py")


def test_tied_field_follows_its_reference():
    config = load_config(DEMO, ["data.max_text_length=16"])
    assert config.model.max_text_length == 16


def test_locked_config_rejects_new_attributes():
    config = load_config(DEMO)
    with pytest.raises(AttributeError):
        config.train.batch_sise = 3
