"""One validation pass over a loaded config, before any dataset is built or file written.

Every size, count, rate and choice that a command would otherwise meet only deep in a run (an
evaluation setting after the whole training run, a zero batch inside grain) is checked here, for
every command, when the config is loaded. Each rule names its key; a failure is one line with
the key, the value and what is allowed. Checks that need more than the config (the model's head,
the dataset's splits, the objectives against the model) stay where that is known, and run before
any work too.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections

from vlretrieval.continual.mitigations import MITIGATIONS
from vlretrieval.data.labels import LABEL_SOURCES
from vlretrieval.errors import UserError
from vlretrieval.evaluation.codes import check_code_bits
from vlretrieval.evaluation.evaluate import MODES
from vlretrieval.evaluation.metrics import TIES, check_metrics
from vlretrieval.evaluation.search import SCORE_DTYPES
from vlretrieval.late_interaction import AGGREGATIONS
from vlretrieval.models.factory import MODEL_KINDS
from vlretrieval.models.joint import IMAGE_INPUTS
from vlretrieval.models.transformer import ATTENTION_IMPLEMENTATIONS, COMPUTE_DTYPES
from vlretrieval.topics import STOP_WORDS


def _is_integer(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def integer(minimum: int) -> Callable[[Any], str | None]:
    def check(value):
        if not _is_integer(value) or value < minimum:
            return f"an integer, {minimum} or more"
        return None

    return check


def number(minimum: float | None = None, maximum: float | None = None, above: float | None = None):
    """A real number within [minimum, maximum], or strictly above `above`."""
    limits = (f"{minimum} or more" if minimum is not None else "", f"at most {maximum}" if maximum is not None else "")
    allowed = "a number" + (f" above {above}" if above is not None else "") + "".join(
        f", {limit}" for limit in limits if limit)

    def within(value) -> bool:
        return ((above is None or value > above) and (minimum is None or value >= minimum)
                and (maximum is None or value <= maximum))

    return lambda value: None if _is_number(value) and within(value) else allowed


def choice(*allowed: str) -> Callable[[Any], str | None]:
    def check(value):
        return None if value in allowed else f"one of {', '.join(allowed)}"

    return check


def integers(minimum: int, non_empty: bool = True) -> Callable[[Any], str | None]:
    def check(value):
        if not isinstance(value, Sequence) or isinstance(value, str) or (non_empty and not value) or not all(
            _is_integer(item) and item >= minimum for item in value
        ):
            return f"a {'non-empty ' if non_empty else ''}list of integers, each {minimum} or more"
        return None

    return check


def crop_scale(value) -> str | None:
    if (not isinstance(value, Sequence) or len(value) != 2 or not all(_is_number(v) for v in value)
            or not 0 < value[0] <= value[1] <= 1):
        return "two area fractions (low, high) with 0 < low <= high <= 1"
    return None


def non_empty_text(value) -> str | None:
    return None if isinstance(value, str) and value.strip() else "a non-empty name"


def _strings(value, non_empty: bool) -> bool:
    """A list (not a str) of non-empty strings, itself non-empty if asked."""
    return (isinstance(value, Sequence) and not isinstance(value, str) and (bool(value) or not non_empty)
            and all(isinstance(item, str) and item for item in value))


def languages(value) -> str | None:
    return None if _strings(value, non_empty=True) else "a non-empty list of language codes"


def patterns(value) -> str | None:
    return None if _strings(value, non_empty=False) else "a list of regular expressions over parameter paths"


def multipliers(value) -> str | None:
    if not isinstance(value, Sequence) or isinstance(value, str) or not all(
        isinstance(item, Sequence) and not isinstance(item, str) and len(item) == 2 and isinstance(item[0], str)
        and _is_number(item[1]) and item[1] >= 0 for item in value
    ):
        return "a list of (regular expression, multiplier >= 0) pairs"
    return None


def hash_bits(value) -> str | None:
    """0 (no hashing head) or a code length `codes.check_code_bits` accepts."""
    if _is_integer(value) and value == 0:
        return None
    try:
        check_code_bits(value)
    except UserError:
        return "0 (no hashing head) or a positive multiple of 8: 16, 32, 64 or 128"
    return None


def num_topics(value) -> str | None:
    """0 (no topic head) or 2 topics or more (one topic is no distribution)."""
    return None if _is_integer(value) and (value == 0 or value >= 2) else "0 (no topic head) or an integer, 2 or more"


@dataclasses.dataclass(frozen=True)
class Rule:
    key: str  # dotted path under config
    check: Callable[[Any], str | None]  # None when the value is allowed, else what is allowed


RULES = (
    Rule("seed", integer(0)),
    Rule("data.languages", languages),
    Rule("data.max_text_length", integer(2)),
    Rule("data.num_train", integer(1)),
    Rule("data.num_validation", integer(1)),
    Rule("data.num_test", integer(1)),
    Rule("data.on_bad_record", choice("skip", "fail")),
    Rule("data.crop_scale", crop_scale),
    Rule("data.shuffle_buffer", integer(1)),
    Rule("data.shard_readers", integer(1)),
    Rule("data.workers", integer(0)),
    Rule("data.num_regions", integer(1)),
    Rule("data.region_feature_dim", integer(1)),
    Rule("data.captions_per_image", integer(1)),
    Rule("data.labels", choice(*LABEL_SOURCES)),
    Rule("model.kind", choice(*MODEL_KINDS)),
    Rule("model.dtype", choice(*COMPUTE_DTYPES)),
    Rule("model.attention", choice(*ATTENTION_IMPLEMENTATIONS)),
    Rule("model.image_size", integer(1)),
    Rule("model.patch_size", integer(1)),
    Rule("model.head.hash_bits", hash_bits),
    Rule("model.head.num_topics", num_topics),
    Rule("train.batch_size", integer(1)),
    Rule("train.num_steps", integer(1)),
    Rule("train.log_every", integer(1)),
    Rule("train.checkpoint_every", integer(1)),
    Rule("train.keep_last", integer(1)),
    Rule("train.keep_best", integer(0)),
    Rule("train.best_metric", choice("mean_recall")),  # what evaluation during training reports
    Rule("train.eval_every", integer(0)),
    Rule("train.num_devices", integer(0)),
    Rule("train.accumulation_steps", integer(1)),
    Rule("train.preemption_check_every", integer(1)),
    Rule("train.peak_tflops", number(minimum=0)),
    Rule("optimizer.learning_rate", number(above=0)),
    Rule("optimizer.warmup_steps", integer(0)),
    Rule("optimizer.end_learning_rate_fraction", number(minimum=0, maximum=1)),
    Rule("optimizer.weight_decay", number(minimum=0)),
    Rule("optimizer.b2", number(above=0, maximum=1)),
    Rule("optimizer.gradient_clip_norm", number(minimum=0)),
    Rule("optimizer.freeze", patterns),
    Rule("optimizer.lr_mults", multipliers),
    Rule("objectives.reweight_beta", number(minimum=0)),
    Rule("objectives.hinge_margin", number(minimum=0)),
    Rule("objectives.itm_sampling_temperature", number(minimum=0)),
    Rule("objectives.text_swap_fraction", number(minimum=0, maximum=1)),
    Rule("objectives.image_mix_fraction", number(minimum=0, maximum=1)),
    Rule("objectives.region_mask_probability", number(above=0, maximum=1)),
    Rule("objectives.late_interaction_aggregation", choice(*AGGREGATIONS)),
    Rule("objectives.distillation_temperature", number(above=0)),
    Rule("objectives.joint_teaching_refinement", number(minimum=0, maximum=1)),
    Rule("model.image_input", choice(*IMAGE_INPUTS)),
    Rule("bitext.batch_size", integer(1)),
    Rule("continual.mitigation", choice(*MITIGATIONS)),
    Rule("continual.distillation_weight", number(above=0)),
    Rule("eval.split", non_empty_text),
    Rule("eval.batch_size", integer(1)),
    Rule("eval.recall_at", integers(1)),
    Rule("eval.ndcg_at", integers(1)),
    Rule("eval.shortlist", integer(1)),
    Rule("eval.pair_batch_size", integer(1)),
    Rule("eval.max_images", integer(0)),
    Rule("eval.step", integer(0)),
    Rule("eval.query_chunk", integer(1)),
    Rule("eval.gallery_chunk", integer(1)),
    Rule("eval.mode", choice(*MODES)),
    Rule("eval.late_interaction_aggregation", choice(*AGGREGATIONS)),
    Rule("eval.score_dtype", choice(*SCORE_DTYPES)),
    Rule("eval.ties", choice(*TIES)),
    Rule("topics.max_iter", integer(1)),
    Rule("topics.min_df", integer(1)),
    Rule("topics.max_df", number(above=0, maximum=1)),
    Rule("topics.max_features", integer(0)),
    Rule("topics.stop_words", choice(*STOP_WORDS)),
    Rule("topics.doc_topic_prior", number(minimum=0)),
    Rule("topics.topic_word_prior", number(minimum=0)),
)


def _lookup(config: ml_collections.ConfigDict, key: str) -> tuple[bool, Any]:
    node = config
    for part in key.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _bitext(config: ml_collections.ConfigDict) -> None:
    found, weights = _lookup(config, "bitext.pair_weights")
    if not found or not weights:
        return
    _, pairs = _lookup(config, "bitext.language_pairs")
    if not all(_is_number(weight) and weight >= 0 for weight in weights) or not any(weights):
        raise UserError(f"config.bitext.pair_weights is {tuple(weights)}: non-negative numbers, not all 0")
    if len(weights) != len(pairs or ()):
        raise UserError(
            f"config.bitext.pair_weights has {len(weights)} weights for {len(pairs or ())} "
            "config.bitext.language_pairs: give one weight per pair"
        )


def _webdataset(config: ml_collections.ConfigDict) -> None:
    """The data keys of one source only: a key the chosen source does not read is refused, not
    silently ignored."""
    found, name = _lookup(config, "data.name")
    if not found:
        return
    if name == "webdataset":
        found, dataset_dir = _lookup(config, "data.dataset_dir")
        if found and dataset_dir:
            raise UserError(
                "config.data.dataset_dir is set, but data.name=webdataset trains from data.shards: "
                "give the evaluation dataset as config.data.eval_dataset_dir"
            )
        return
    for key in ("shards", "caption_fields", "eval_dataset_dir"):
        found, value = _lookup(config, f"data.{key}")
        if found and value:
            raise UserError(f"config.data.{key} is set, but only data.name=webdataset reads it (data.name is {name!r})")


# The region-dataset keys: the demo config's value, and the data.name values that read the key.
REGION_DATASETS = ("demo_regions", "precomputed_regions", "region_files")
REGION_KEYS = {
    "num_regions": (6, REGION_DATASETS),
    "region_feature_dim": (64, REGION_DATASETS),
    "captions_per_image": (5, ("precomputed_regions",)),
}


def _region_keys(config: ml_collections.ConfigDict) -> None:
    """A region key set away from its default for a dataset that does not read it is refused, not
    silently ignored."""
    found, name = _lookup(config, "data.name")
    if not found:
        return
    for key, (default, readers) in REGION_KEYS.items():
        found, value = _lookup(config, f"data.{key}")
        if found and value != default and name not in readers:
            raise UserError(f"config.data.{key} is {value!r}, but only data.name={' | '.join(readers)} reads it "
                            f"(data.name is {name!r}): leave it at {default}")


def _topics(config: ml_collections.ConfigDict) -> None:
    """Topic space needs a topic head; the LDA is fitted on a prepared train split's captions."""
    _, mode = _lookup(config, "eval.mode")
    _, topics = _lookup(config, "model.head.num_topics")
    if mode == "topics" and not topics:
        raise UserError("config.eval.mode=topics ranks by the image tower's predicted topics: set "
                        "config.model.head.num_topics (the run's LDA topics)")
    _, weight = _lookup(config, "objectives.topic_prediction")
    _, name = _lookup(config, "data.name")
    if _is_number(weight) and weight > 0 and name == "webdataset":
        raise UserError("config.objectives.topic_prediction fits its LDA on a prepared train split's captions; "
                        "webdataset shards are streamed: train it on a prepared dataset")


def check_config(config: ml_collections.ConfigDict) -> None:
    """Raises one `UserError` line for the first setting no command could run with."""
    for rule in RULES:
        found, value = _lookup(config, rule.key)
        if not found:
            continue  # a config without that section (e.g. a converted model's) has no such setting
        allowed = rule.check(value)
        if allowed is not None:
            raise UserError(f"config.{rule.key} is {value!r}; it must be {allowed}")
    found, metrics = _lookup(config, "eval.metrics")
    if found:
        check_metrics(metrics)
    _bitext(config)
    _webdataset(config)
    _region_keys(config)
    _topics(config)
