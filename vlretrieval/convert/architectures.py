"""Each supported Hugging Face architecture: its config <-> our model section, and its rules.

Import reads an HF `config.json` into our `model` config section (the options that make our model
compute what the HF one does: post-LN or pre-LN, LayerNorm epsilon, quick-GELU, causal text
attention, end-of-text pooling, poolers, token-type tables), then builds the rule table from that
section. Export builds the same table from a checkpoint's section, so both directions share it.
The towers' pieces are in parts.py; SigLIP, whose heads differ most, in siglip.py.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any

from vlretrieval.convert import siglip
from vlretrieval.convert.parts import check_vision, hf_transformer, image_tower, text_tower, transformer, vit_patches
from vlretrieval.convert.rules import Rule, dense, encoder_blocks, layer_norm
from vlretrieval.errors import UserError

# What each architecture becomes here, and which parts of our model its weights cover.
IMPORTS = {
    "BertModel": ("dual", ("text",)),
    "XLMRobertaModel": ("dual", ("text",)),
    "ViTModel": ("dual", ("image",)),
    "CLIPModel": ("dual", ("text", "image", "projections")),
    "ViltModel": ("decomposed", ("joint",)),
    "SiglipModel": ("dual", ("text", "image", "projections")),
    "SiglipVisionModel": ("dual", ("image",)),
}
EXPORTS = {"bert": "BertModel", "vit": "ViTModel", "clip": "CLIPModel", "siglip": "SiglipModel",
           "siglip_vision": "SiglipVisionModel"}


def model_from_hf(architecture: str, hf: dict, keys: set[str], base: dict, where: str):
    """(our model section, vocab_size) for an HF config; `base` supplies what HF does not say."""
    model = copy.deepcopy(base)
    kind, parts = IMPORTS[architecture]
    model["kind"] = kind
    if architecture in siglip.ARCHITECTURES:
        return siglip.model_from_hf(architecture, hf, model, where)
    head = model["head"]
    if architecture in ("BertModel", "XLMRobertaModel"):
        if hf.get("position_embedding_type", "absolute") != "absolute":
            raise UserError(f"{where}: position_embedding_type {hf['position_embedding_type']!r} "
                            "is not supported (only absolute)")
        model["text_transformer"] = transformer(hf, where, pre_norm=False, final_norm=False)
        model["text_embeddings"] = dict(
            type_vocab_size=hf.get("type_vocab_size", 2), layer_norm=True,
            layer_norm_eps=float(hf["layer_norm_eps"]),
        )
        model["max_text_length"] = hf["max_position_embeddings"] - position_offset(architecture, hf)
        head.update(text_pooling="cls", text_pooler="pooler.dense.weight" in keys)
        return model, hf["vocab_size"]
    if architecture == "ViTModel":
        check_vision(hf, where)
        model["image_transformer"] = transformer(hf, where, pre_norm=True, final_norm=True)
        model["image_embeddings"] = dict(patch_bias=True, layer_norm=False, layer_norm_eps=1e-5,
                                         class_token=True)
        model.update(image_size=hf["image_size"], patch_size=hf["patch_size"])
        head.update(image_pooling="cls", image_pooler="pooler.dense.weight" in keys)
        return model, None
    if architecture == "CLIPModel":
        text, vision = hf["text_config"], hf["vision_config"]
        check_vision(vision, where)
        model["text_transformer"] = transformer(
            text, where, pre_norm=True, final_norm=True, causal=True
        )
        model["text_embeddings"] = dict(type_vocab_size=0, layer_norm=False, layer_norm_eps=1e-5)
        model["image_transformer"] = transformer(vision, where, pre_norm=True, final_norm=True)
        model["image_embeddings"] = dict(
            patch_bias=False, layer_norm=True, layer_norm_eps=float(vision["layer_norm_eps"]),
            class_token=True,
        )
        model.update(max_text_length=text["max_position_embeddings"],
                     image_size=vision["image_size"], patch_size=vision["patch_size"])
        scale = float(hf.get("logit_scale_init_value", math.log(1 / 0.07)))
        head.update(
            embed_dim=hf["projection_dim"], text_pooling="last", image_pooling="cls",
            text_pooler=False, image_pooler=False, initial_temperature=math.exp(-scale),
            max_logit_scale=100.0, clip_logit_scale=True, image_projection=True,
            text_projection_bias=False,
        )
        return model, text["vocab_size"]
    if architecture == "ViltModel":
        check_vision(hf, where)
        if hf.get("modality_type_vocab_size", 2) != 2:
            raise UserError(f"{where}: modality_type_vocab_size must be 2 (text and image)")
        model["transformer"] = transformer(hf, where, pre_norm=True, final_norm=True)
        model["text_embeddings"] = dict(
            type_vocab_size=hf.get("type_vocab_size", 2), layer_norm=True,
            layer_norm_eps=float(hf["layer_norm_eps"]),
        )
        model.update(max_text_length=hf["max_position_embeddings"],
                     image_size=hf["image_size"], patch_size=hf["patch_size"])
        return model, hf["vocab_size"]
    raise AssertionError(architecture)


# Every converted config fine-tunes: pretrained weights want a tenth of the from-scratch demo's
# peak rate (2e-3) and a longer warm-up. At 2e-3 a converted sentence-transformers text tower
# collapsed to chance (loss at ln(batch), gradient norm 0.01); at 2e-4 it learns.
FINE_TUNING = {"optimizer.learning_rate": 2e-4, "optimizer.warmup_steps": 100}


def experiment_settings(architecture: str, model: dict) -> dict:
    """{dotted experiment key: value} that a converted `architecture` needs beyond its model
    section: the fine-tuning defaults, and SigLIP's sigmoid loss; the converted config.py sets
    them, where they can be read and changed."""
    settings = dict(FINE_TUNING)
    if architecture in siglip.ARCHITECTURES:
        settings.update(siglip.experiment_settings(architecture, model))
    return settings


def current_keys(architecture: str, state: dict) -> dict:
    """The state dict under the names the rules use (older transformers named some otherwise)."""
    return siglip.without_legacy_prefix(state) if architecture == siglip.VISION else state


def position_offset(architecture: str, hf: dict) -> int:
    """XLM-R (RoBERTa) numbers positions from padding_idx + 1; the rows before are never used."""
    return hf.get("pad_token_id", 1) + 1 if architecture == "XLMRobertaModel" else 0


def rules_for(architecture: str, model: dict, hf: dict) -> list[Rule]:
    """The rule table of `architecture` for our model section `model`."""
    if architecture in siglip.ARCHITECTURES:
        return siglip.rules_for(architecture, model)
    head = model["head"]
    if architecture in ("BertModel", "XLMRobertaModel"):
        rules = text_tower(model, "", "bert", position_offset(architecture, hf))
        return rules + (dense("text_pooler", "pooler.dense") if head["text_pooler"] else [])
    if architecture == "ViTModel":
        rules = image_tower(model, "", "vit")
        return rules + (dense("image_pooler", "pooler.dense") if head["image_pooler"] else [])
    if architecture == "CLIPModel":
        return (text_tower(model, "text_model.", "clip") + image_tower(model, "vision_model.", "clip")
                + [Rule("text_projection/kernel", "text_projection.weight", "linear"),
                   Rule("image_projection/kernel", "visual_projection.weight", "linear"),
                   Rule("logit_scale/log_scale", "logit_scale")])
    if architecture == "ViltModel":
        t = model["transformer"]
        rules = [Rule("joint/text_embeddings/token/embedding",
                      "embeddings.text_embeddings.word_embeddings.weight"),
                 Rule("joint/text_embeddings/position",
                      "embeddings.text_embeddings.position_embeddings.weight")]
        if model["text_embeddings"]["type_vocab_size"]:
            rules.append(Rule("joint/text_embeddings/token_type/embedding",
                              "embeddings.text_embeddings.token_type_embeddings.weight"))
        rules += layer_norm("joint/text_embeddings/norm", "embeddings.text_embeddings.LayerNorm")
        rules += vit_patches("joint/image_embeddings", "embeddings.")
        rules.append(Rule("joint/modality/embedding", "embeddings.token_type_embeddings.weight"))
        rules += encoder_blocks("joint/encoder", "", t["depth"], t["num_heads"], "vit")
        rules += layer_norm("joint/encoder/final_norm", "layernorm")
        return rules + dense("joint/pooler", "pooler.dense")
    raise AssertionError(architecture)


# What a tower must be for each export target: (model section path, required value, why).
EXPORT_REQUIREMENTS = {
    "bert": [("kind", "dual", "BERT is a dual encoder's text tower"),
             ("text_transformer.pre_norm", False, "BERT is post-LN"),
             ("text_transformer.final_norm", False, "BERT has no final LayerNorm"),
             ("text_transformer.causal", False, "BERT attends both ways"),
             ("text_embeddings.layer_norm", True, "BERT normalises its embeddings")],
    "vit": [("kind", "dual", "ViT is a dual encoder's image tower"),
            ("image_transformer.pre_norm", True, "ViT is pre-LN"),
            ("image_transformer.final_norm", True, "ViT ends with a LayerNorm"),
            ("image_embeddings.patch_bias", True, "ViT's patch projection has a bias"),
            ("image_embeddings.layer_norm", False, "ViT does not normalise its embeddings"),
            ("image_embeddings.class_token", True, "ViT has a class token"),
            ("image_transformer.causal", False, "ViT attends both ways")],
    "clip": [("kind", "dual", "CLIP is a dual encoder"),
             ("text_transformer.pre_norm", True, "CLIP is pre-LN"),
             ("text_transformer.final_norm", True, "CLIP's text tower ends with a LayerNorm"),
             ("text_transformer.causal", True, "CLIP's text attention is causal"),
             ("text_embeddings.type_vocab_size", 0, "CLIP has no token types"),
             ("text_embeddings.layer_norm", False, "CLIP's text embeddings are not normalised"),
             ("image_transformer.pre_norm", True, "CLIP is pre-LN"),
             ("image_transformer.final_norm", True, "CLIP's image tower ends with a LayerNorm"),
             ("image_transformer.causal", False, "CLIP's image attention is not causal"),
             ("image_embeddings.patch_bias", False, "CLIP's patch projection has no bias"),
             ("image_embeddings.layer_norm", True, "CLIP normalises the image embeddings"),
             ("image_embeddings.class_token", True, "CLIP has a class token"),
             ("head.text_pooling", "last", "CLIP pools the end-of-text token"),
             ("head.image_pooling", "cls", "CLIP pools the class token"),
             ("head.text_pooler", False, "CLIP has no pooler"),
             ("head.image_pooler", False, "CLIP has no pooler"),
             ("head.image_projection", True, "CLIP projects the pooled image token"),
             ("head.text_projection_bias", False, "CLIP's projections have no bias")],
    **siglip.REQUIREMENTS,
}


def _lookup(model: dict, path: str) -> Any:
    value = model
    for key in path.split("."):
        value = value[key]
    return value


def check_exportable(arch: str, model: dict, where: str) -> None:
    for path, required, why in EXPORT_REQUIREMENTS[arch]:
        if _lookup(model, path) != required:
            raise UserError(f"{where} cannot be exported as {arch}: model.{path} is "
                            f"{_lookup(model, path)!r}, but {why} ({path} = {required!r})")
    if arch == "clip" and (model["image_embeddings"]["layer_norm_eps"]
                           != model["image_transformer"]["layer_norm_eps"]):
        raise UserError(f"{where} cannot be exported as clip: the image embeddings' LayerNorm "
                        "epsilon differs from the image transformer's (CLIP has one)")


def hf_config_for(arch: str, model: dict, vocab_size: int | None, original: dict | None) -> dict:
    """The config.json of an export; ids the model does not know come from `original` if given."""
    if arch in siglip.REQUIREMENTS:
        return siglip.hf_config_for(arch, model, vocab_size, original)
    if arch == "bert":
        t = model["text_transformer"]
        return dict(
            architectures=["BertModel"], model_type="bert", vocab_size=vocab_size,
            max_position_embeddings=model["max_text_length"],
            type_vocab_size=model["text_embeddings"]["type_vocab_size"],
            hidden_dropout_prob=t["dropout"], attention_probs_dropout_prob=t["attention_dropout"],
            pad_token_id=(original or {}).get("pad_token_id", 0), **hf_transformer(t),
        )
    if arch == "vit":
        t = model["image_transformer"]
        return dict(
            architectures=["ViTModel"], model_type="vit", image_size=model["image_size"],
            patch_size=model["patch_size"], num_channels=3, qkv_bias=True,
            hidden_dropout_prob=t["dropout"], attention_probs_dropout_prob=t["attention_dropout"],
            **hf_transformer(t),
        )
    original_text = (original or {}).get("text_config", {})
    # Without the original config, CLIP's convention: end-of-text is the last id, start the one
    # before. HF pools the first end-of-text token; ours pools the last real token (the same one
    # for tokenizer output).
    ids = {name: original_text.get(name, default) for name, default in
           (("eos_token_id", vocab_size - 1), ("bos_token_id", vocab_size - 2), ("pad_token_id", 1))}
    head = model["head"]
    return dict(
        architectures=["CLIPModel"], model_type="clip", projection_dim=head["embed_dim"],
        logit_scale_init_value=(original or {}).get(
            "logit_scale_init_value", math.log(1 / head["initial_temperature"])
        ),
        text_config=dict(model_type="clip_text_model", vocab_size=vocab_size,
                         max_position_embeddings=model["max_text_length"],
                         **hf_transformer(model["text_transformer"]), **ids),
        vision_config=dict(model_type="clip_vision_model", image_size=model["image_size"],
                           patch_size=model["patch_size"], num_channels=3,
                           **hf_transformer(model["image_transformer"])),
    )


def complete_section(model: dict) -> dict:
    """A `model` config section as a plain dict with every option present (configs written
    before an option existed get its default), so sections compare and export uniformly."""
    from vlretrieval.models.embeddings import ImageEmbeddingConfig, TextEmbeddingConfig
    from vlretrieval.models.factory import MODEL_WIDE
    from vlretrieval.models.towers import TowerHead
    from vlretrieval.models.transformer import TransformerConfig

    model = copy.deepcopy(model)
    # dtype, attention and scan_layers are set once for the model, not per transformer.
    per_transformer = {key: value for key, value in dataclasses.asdict(TransformerConfig()).items()
                       if key not in MODEL_WIDE}
    for name in ("transformer", "image_transformer", "text_transformer"):
        if name in model:
            model[name] = {**per_transformer, **model[name]}
    model = {**MODEL_WIDE, **model}
    model["text_embeddings"] = {**dataclasses.asdict(TextEmbeddingConfig()),
                                **model.get("text_embeddings", {})}
    model["image_embeddings"] = {**dataclasses.asdict(ImageEmbeddingConfig()),
                                 **model.get("image_embeddings", {})}
    model["head"] = {**dataclasses.asdict(TowerHead()), **model.get("head", {})}
    return model
