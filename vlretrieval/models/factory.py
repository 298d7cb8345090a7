"""Builds a model from the `model` section of an experiment config, and initialises it."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections

from vlretrieval.errors import UserError
from vlretrieval.evaluation.codes import check_code_bits
from vlretrieval.models.embeddings import ImageEmbeddingConfig, TextEmbeddingConfig
from vlretrieval.models.joint import IMAGE_INPUTS, JointConfig
from vlretrieval.models.pooling import IMAGE_POOLINGS, TEXT_POOLINGS
from vlretrieval.models.regions import packed_width
from vlretrieval.models.towers import DecomposedVLTransformer, DualEncoder, TowerHead
from vlretrieval.models.transformer import (
    ATTENTION_IMPLEMENTATIONS,
    COMPUTE_DTYPES,
    TransformerConfig,
)

MODEL_KINDS = ("decomposed", "dual")


def _dataclass_from(cls, section: ml_collections.ConfigDict, where: str):
    try:
        return cls(**section.to_dict())
    except (TypeError, ValueError) as error:
        raise UserError(f"config.{where}: {error}") from None


def _optional_section(cls, config: ml_collections.ConfigDict, name: str):
    """`config.<name>` as `cls`; configs written before the section existed get its defaults."""
    section = config.get(name)
    return cls() if section is None else _dataclass_from(cls, section, f"model.{name}")


# Model-wide numerics and layout, set on every encoder; configs written before they existed get
# TransformerConfig's defaults.
MODEL_WIDE = {key: getattr(TransformerConfig(), key) for key in ("dtype", "attention", "scan_layers")}


def _model_wide(config: ml_collections.ConfigDict) -> dict:
    options = {key: config.get(key, default) for key, default in MODEL_WIDE.items()}
    for key, choices in (("dtype", tuple(COMPUTE_DTYPES)), ("attention", ATTENTION_IMPLEMENTATIONS)):
        if options[key] not in choices:
            raise UserError(f"config.model.{key} is {options[key]!r}; choose one of {choices}")
    if options["attention"] == "cudnn" and jax.default_backend() != "gpu":
        raise UserError(f"config.model.attention=cudnn needs a GPU (this backend is "
                        f"{jax.default_backend()}); use auto or xla")
    if not isinstance(options["scan_layers"], bool):
        raise UserError("config.model.scan_layers must be true or false")
    return options


def _transformer(config: ml_collections.ConfigDict, name: str, wide: dict) -> TransformerConfig:
    section = config[name]
    if any(key in section for key in MODEL_WIDE):
        raise UserError(f"config.model.{name}: {sorted(set(section) & set(MODEL_WIDE))} are set "
                        "for the whole model (config.model.<key>), not per transformer")
    return dataclasses.replace(_dataclass_from(TransformerConfig, section, f"model.{name}"), **wide)


def _image_input(config: ml_collections.ConfigDict, head: TowerHead) -> dict:
    """The model's image input options: patches, or regions with their feature width, count and
    classes (`config.model.regions`); configs written before regions existed read patches."""
    image_input = config.get("image_input", "patches")
    if image_input not in IMAGE_INPUTS:
        raise UserError(f"config.model.image_input is {image_input!r}; choose one of {IMAGE_INPUTS}")
    if image_input == "patches":
        return {"image_input": "patches", "region_feature_dim": 0, "num_regions": 0, "region_classes": 0}
    regions = config.get("regions") or {}
    options = {"image_input": "regions", "region_feature_dim": regions.get("feature_dim", 0),
               "num_regions": regions.get("num_regions", 0), "region_classes": regions.get("classes", 0)}
    for key, name, minimum in (("region_feature_dim", "feature_dim", 1), ("num_regions", "num_regions", 1),
                               ("region_classes", "classes", 0)):
        value = options[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise UserError(f"config.model.regions.{name} is {value!r}; it must be an integer, {minimum} or more")
    if head.image_pooling in ("map", "last_position", "last"):
        raise UserError(f"config.model.head.image_pooling={head.image_pooling} is not defined over "
                        "detector regions (padded, unordered); use cls, mean or max")
    return options


def build_model(config: ml_collections.ConfigDict, vocab_size: int):
    """`config` is the experiment's `model` section; `vocab_size` comes from the tokenizer."""
    wide = _model_wide(config)
    head = _dataclass_from(TowerHead, config.head, "model.head")
    text_embeddings = _optional_section(TextEmbeddingConfig, config, "text_embeddings")
    image_embeddings = _optional_section(ImageEmbeddingConfig, config, "image_embeddings")
    for name, choices in (("text_pooling", TEXT_POOLINGS), ("image_pooling", IMAGE_POOLINGS)):
        if getattr(head, name) not in choices:
            raise UserError(f"config.model.head.{name} must be one of {choices}")
    if head.hash_bits:
        try:
            check_code_bits(head.hash_bits)
        except UserError as error:
            raise UserError(f"config.model.head.hash_bits: {error}") from None
    topics = head.num_topics
    if isinstance(topics, bool) or not isinstance(topics, int) or topics < 0 or topics == 1:
        raise UserError(f"config.model.head.num_topics is {topics!r}; it must be 0 (no topic head) or 2 or more")
    image_input = _image_input(config, head)
    if config.kind == "decomposed":
        transformer = _transformer(config, "transformer", wide)
        # The joint model's image embeddings always have a class token.
        _check_image_head(head, ImageEmbeddingConfig(), transformer.width)
        joint = JointConfig(
            transformer=transformer,
            vocab_size=vocab_size,
            max_text_length=config.max_text_length,
            image_size=config.image_size,
            patch_size=config.patch_size,
            text_layer_norm_eps=text_embeddings.layer_norm_eps,
            type_vocab_size=text_embeddings.type_vocab_size,
            **image_input,
        )
        return DecomposedVLTransformer(joint, head)
    if config.kind == "dual":
        image_transformer = _transformer(config, "image_transformer", wide)
        _check_image_head(head, image_embeddings, image_transformer.width, image_input["image_input"] == "regions")
        return DualEncoder(
            image_transformer=image_transformer,
            text_transformer=_transformer(config, "text_transformer", wide),
            vocab_size=vocab_size,
            max_text_length=config.max_text_length,
            image_size=config.image_size,
            patch_size=config.patch_size,
            head=head,
            text_embeddings=text_embeddings,
            image_embeddings=image_embeddings,
            **{key: value for key, value in image_input.items() if key != "region_classes"},
        )
    raise UserError(f"config.model.kind is {config.kind!r}; choose one of {MODEL_KINDS}")


def _check_image_head(head: TowerHead, embeddings: ImageEmbeddingConfig, width: int,
                      regions: bool = False) -> None:
    # Region inputs always have an image token at position 0.
    if head.image_pooling == "cls" and not embeddings.class_token and not regions:
        raise UserError("config.model.head.image_pooling=cls needs a class token: set "
                        "config.model.image_embeddings.class_token=true or choose another pooling")
    if not head.image_projection and head.embed_dim != width:
        raise UserError(f"config.model.head.image_projection=false makes the pooled image output "
                        f"the embedding: config.model.head.embed_dim ({head.embed_dim}) must equal "
                        f"the image width ({width})")


def image_shape(model) -> tuple[int, ...]:
    """One image's input shape: [size, size, 3] pixels, or [regions, feature_dim + 7] packed regions
    (a teacher-student model's are its student's)."""
    model = getattr(model, "student", model)
    cfg = model.config if isinstance(model, DecomposedVLTransformer) else model
    if cfg.image_input == "regions":
        return (cfg.num_regions, packed_width(cfg.region_feature_dim))
    return (cfg.image_size, cfg.image_size, 3)


def example_inputs(model, batch_size: int = 2) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Dummy (images, token_ids, text_mask) of the shapes the model expects."""
    model = getattr(model, "student", model)
    cfg = model.config if isinstance(model, DecomposedVLTransformer) else model
    images = jnp.zeros((batch_size, *image_shape(model)), jnp.float32)
    token_ids = jnp.zeros((batch_size, cfg.max_text_length), jnp.int32)
    return images, token_ids, jnp.ones_like(token_ids)


def init_params(model, rng: jax.Array):
    """Every parameter of the model (towers and joint heads), initialised from `rng`."""
    inputs = example_inputs(model)
    return jax.jit(lambda key: model.init(key, *inputs, method=model.initialize)["params"])(rng)


def parameter_count(params) -> int:
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))


__all__ = ["build_model", "init_params", "parameter_count", "example_inputs", "image_shape"]
