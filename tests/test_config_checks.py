"""The config validation table: every rule names a real key, every shipped config passes, and each
rule refuses a bad value with one line naming the key and what is allowed."""

import importlib

import pytest

from configs.demo import get_config
from vlretrieval import config_checks
from vlretrieval.errors import UserError


def test_every_rule_names_a_key_the_demo_config_has():
    # A rule whose key is misspelt would silently check nothing.
    config = get_config()
    missing = [rule.key for rule in config_checks.RULES if not config_checks._lookup(config, rule.key)[0]]
    assert not missing


@pytest.mark.parametrize("module,arg", [("demo", None), ("demo", "tiny"), ("demo_joint", None),
                                        ("demo_decompose", None), ("mural_demo", None)])
def test_the_shipped_configs_pass(module, arg):
    config_checks.check_config(importlib.import_module(f"configs.{module}").get_config(arg))


# A value each rule must refuse, by the type of the demo's value; a few rules need their own.
BAD_BY_TYPE = {int: -1, float: -1.0, str: "no-such-choice", tuple: ()}
BAD_BY_KEY = {"train.best_metric": "R@1", "eval.split": " ", "optimizer.freeze": ("",),
              "optimizer.lr_mults": (("text_.*", -1.0),)}


@pytest.mark.parametrize("rule", config_checks.RULES, ids=[rule.key for rule in config_checks.RULES])
def test_each_rule_refuses_a_bad_value_naming_its_key(rule):
    config = get_config()
    section, _, key = rule.key.rpartition(".")
    node = config[section] if section else config
    node[key] = BAD_BY_KEY.get(rule.key, BAD_BY_TYPE[type(node[key])])
    with pytest.raises(UserError, match=f"config.{rule.key} is "):
        config_checks.check_config(config)


def test_pair_weights_must_match_the_pairs():
    config = get_config()
    config.bitext.language_pairs = ("en-de", "en-fr")
    config.bitext.pair_weights = (1.0,)
    with pytest.raises(UserError, match="2 config.bitext.language_pairs"):
        config_checks.check_config(config)


def test_a_data_key_the_chosen_source_does_not_read_is_refused():
    for key in ("shards", "caption_fields", "eval_dataset_dir"):
        config = get_config()
        config.data[key] = "/somewhere"
        with pytest.raises(UserError, match=f"config.data.{key} is set, but only data.name=webdataset reads it"):
            config_checks.check_config(config)
    config = get_config()
    config.data.name, config.data.shards, config.data.dataset_dir = "webdataset", "/s/*.tar", "/prepared"
    with pytest.raises(UserError, match="give the evaluation dataset as config.data.eval_dataset_dir"):
        config_checks.check_config(config)
    config.data.dataset_dir = ""
    config_checks.check_config(config)
