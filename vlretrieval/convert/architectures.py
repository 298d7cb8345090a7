"""Each supported Hugging Face architecture: its config <-> our model section, and its rules.

Import reads an HF `config.json` into our `model` config section (the options that make our model
compute what the HF one does: post-LN or pre-LN, LayerNorm epsilon, quick-GELU, causal text
attention, end-of-text pooling, poolers, token-type tables), then builds the rule table from that
section. Export builds the same table from a checkpoint's section, so both directions share it.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any

from vlretrieval.convert.rules import Rule, dense, encoder_blocks, layer_norm
from vlretrieval.errors import UserError

# HF `hidden_act` <-> our activation names.
ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
               "quick_gelu": "quick_gelu", "relu": "relu"}
HF_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_new", "quick_gelu": "quick_gelu", "relu": "relu"}

# What each architecture becomes here, and which parts of our model its weights cover.
IMPORTS = {
    "BertModel": ("dual", ("text",)),
    "XLMRobertaModel": ("dual", ("text",)),
    "ViTModel": ("dual", ("image",)),
    "CLIPModel": ("dual", ("text", "image", "projections")),
    "ViltModel": ("decomposed", ("joint",)),
}
EXPORTS = {"bert": "BertModel", "vit": "ViTModel", "clip": "CLIPModel"}


def _activation(hf_config: dict, where: str) -> str:
    name = hf_config.get("hidden_act", "gelu")
    if name not in ACTIVATIONS:
        raise UserError(f"{where}: hidden_act {name!r} is not supported; "
                        f"supported: {', '.join(sorted(ACTIVATIONS))}")
    return ACTIVATIONS[name]


def _transformer(hf: dict, where: str, *, pre_norm: bool, final_norm: bool, causal: bool = False):
    return dict(
        width=hf["hidden_size"], depth=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"], mlp_dim=hf["intermediate_size"],
        dropout=float(hf.get("hidden_dropout_prob", hf.get("dropout", 0.0)) or 0.0),
        attention_dropout=float(
            hf.get("attention_probs_dropout_prob", hf.get("attention_dropout", 0.0)) or 0.0
        ),
        pre_norm=pre_norm, final_norm=final_norm, layer_norm_eps=float(hf["layer_norm_eps"]),
        activation=_activation(hf, where), causal=causal, remat="none",
    )


def model_from_hf(architecture: str, hf: dict, keys: set[str], base: dict, where: str):
    """(our model section, vocab_size) for an HF config; `base` supplies what HF does not say."""
    model = copy.deepcopy(base)
    kind, parts = IMPORTS[architecture]
    model["kind"] = kind
    head = model["head"]
    if architecture in ("BertModel", "XLMRobertaModel"):
        if hf.get("position_embedding_type", "absolute") != "absolute":
            raise UserError(f"{where}: position_embedding_type {hf['position_embedding_type']!r} "
                            "is not supported (only absolute)")
        model["text_transformer"] = _transformer(hf, where, pre_norm=False, final_norm=False)
        model["text_embeddings"] = dict(
            type_vocab_size=hf.get("type_vocab_size", 2), layer_norm=True,
            layer_norm_eps=float(hf["layer_norm_eps"]),
        )
        model["max_text_length"] = hf["max_position_embeddings"] - position_offset(architecture, hf)
        head.update(text_pooling="cls", text_pooler="pooler.dense.weight" in keys)
        return model, hf["vocab_size"]
    if architecture == "ViTModel":
        _check_vision(hf, where)
        model["image_transformer"] = _transformer(hf, where, pre_norm=True, final_norm=True)
        model["image_embeddings"] = dict(patch_bias=True, layer_norm=False, layer_norm_eps=1e-5)
        model.update(image_size=hf["image_size"], patch_size=hf["patch_size"])
        head.update(image_pooling="cls", image_pooler="pooler.dense.weight" in keys)
        return model, None
    if architecture == "CLIPModel":
        text, vision = hf["text_config"], hf["vision_config"]
        _check_vision(vision, where)
        model["text_transformer"] = _transformer(
            text, where, pre_norm=True, final_norm=True, causal=True
        )
        model["text_embeddings"] = dict(type_vocab_size=0, layer_norm=False, layer_norm_eps=1e-5)
        model["image_transformer"] = _transformer(vision, where, pre_norm=True, final_norm=True)
        model["image_embeddings"] = dict(
            patch_bias=False, layer_norm=True, layer_norm_eps=float(vision["layer_norm_eps"])
        )
        model.update(max_text_length=text["max_position_embeddings"],
                     image_size=vision["image_size"], patch_size=vision["patch_size"])
        scale = float(hf.get("logit_scale_init_value", math.log(1 / 0.07)))
        head.update(
            embed_dim=hf["projection_dim"], text_pooling="last", image_pooling="cls",
            text_pooler=False, image_pooler=False, initial_temperature=math.exp(-scale),
            max_logit_scale=100.0,
        )
        return model, text["vocab_size"]
    if architecture == "ViltModel":
        _check_vision(hf, where)
        if hf.get("modality_type_vocab_size", 2) != 2:
            raise UserError(f"{where}: modality_type_vocab_size must be 2 (text and image)")
        model["transformer"] = _transformer(hf, where, pre_norm=True, final_norm=True)
        model["text_embeddings"] = dict(
            type_vocab_size=hf.get("type_vocab_size", 2), layer_norm=True,
            layer_norm_eps=float(hf["layer_norm_eps"]),
        )
        model.update(max_text_length=hf["max_position_embeddings"],
                     image_size=hf["image_size"], patch_size=hf["patch_size"])
        return model, hf["vocab_size"]
    raise AssertionError(architecture)


def _check_vision(hf: dict, where: str) -> None:
    if hf.get("num_channels", 3) != 3:
        raise UserError(f"{where}: num_channels {hf['num_channels']} is not supported (only 3)")
    if not hf.get("qkv_bias", True):
        raise UserError(f"{where}: qkv_bias false is not supported")


def position_offset(architecture: str, hf: dict) -> int:
    """XLM-R (RoBERTa) numbers positions from padding_idx + 1; the rows before are never used."""
    return hf.get("pad_token_id", 1) + 1 if architecture == "XLMRobertaModel" else 0


def _text_tower(model: dict, hf_prefix: str, style: str, offset: int = 0) -> list[Rule]:
    t, emb = model["text_transformer"], model["text_embeddings"]
    if style == "clip":
        rules = [Rule("text_encoder/embeddings/token/embedding",
                      f"{hf_prefix}embeddings.token_embedding.weight"),
                 Rule("text_encoder/embeddings/position",
                      f"{hf_prefix}embeddings.position_embedding.weight")]
    else:
        rules = [Rule("text_encoder/embeddings/token/embedding",
                      f"{hf_prefix}embeddings.word_embeddings.weight"),
                 Rule("text_encoder/embeddings/position",
                      f"{hf_prefix}embeddings.position_embeddings.weight", offset=offset)]
    if emb["type_vocab_size"]:
        rules.append(Rule("text_encoder/embeddings/token_type/embedding",
                          f"{hf_prefix}embeddings.token_type_embeddings.weight"))
    if emb["layer_norm"]:
        rules += layer_norm("text_encoder/embeddings/norm", f"{hf_prefix}embeddings.LayerNorm")
    rules += encoder_blocks("text_encoder/encoder", hf_prefix, t["depth"], t["num_heads"], style)
    if t["final_norm"]:
        rules += layer_norm("text_encoder/encoder/final_norm", f"{hf_prefix}final_layer_norm")
    return rules


def _image_tower(model: dict, hf_prefix: str, style: str) -> list[Rule]:
    t = model["image_transformer"]
    e = "image_encoder/embeddings"
    if style == "clip":
        rules = [Rule(f"{e}/projection/kernel", f"{hf_prefix}embeddings.patch_embedding.weight", "conv"),
                 Rule(f"{e}/class_token", f"{hf_prefix}embeddings.class_embedding", "vector_as_token"),
                 Rule(f"{e}/position", f"{hf_prefix}embeddings.position_embedding.weight")]
        rules += layer_norm(f"{e}/norm", f"{hf_prefix}pre_layrnorm")
        final = f"{hf_prefix}post_layernorm"
    else:
        rules = _vit_patches(e, f"{hf_prefix}embeddings.")
        final = f"{hf_prefix}layernorm"
    rules += encoder_blocks("image_encoder/encoder", hf_prefix, t["depth"], t["num_heads"], style)
    rules += layer_norm("image_encoder/encoder/final_norm", final)
    return rules


def _vit_patches(ours: str, hf: str) -> list[Rule]:
    return [Rule(f"{ours}/projection/kernel", f"{hf}patch_embeddings.projection.weight", "conv"),
            Rule(f"{ours}/projection/bias", f"{hf}patch_embeddings.projection.bias"),
            Rule(f"{ours}/class_token", f"{hf}cls_token"),
            Rule(f"{ours}/position", f"{hf}position_embeddings", "batch1")]


def rules_for(architecture: str, model: dict, hf: dict) -> list[Rule]:
    """The rule table of `architecture` for our model section `model`."""
    head = model["head"]
    if architecture in ("BertModel", "XLMRobertaModel"):
        rules = _text_tower(model, "", "bert", position_offset(architecture, hf))
        return rules + (dense("text_pooler", "pooler.dense") if head["text_pooler"] else [])
    if architecture == "ViTModel":
        rules = _image_tower(model, "", "vit")
        return rules + (dense("image_pooler", "pooler.dense") if head["image_pooler"] else [])
    if architecture == "CLIPModel":
        return (_text_tower(model, "text_model.", "clip") + _image_tower(model, "vision_model.", "clip")
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
        rules += _vit_patches("joint/image_embeddings", "embeddings.")
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
             ("head.text_pooling", "last", "CLIP pools the end-of-text token"),
             ("head.image_pooling", "cls", "CLIP pools the class token"),
             ("head.text_pooler", False, "CLIP has no pooler"),
             ("head.image_pooler", False, "CLIP has no pooler")],
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


def _hf_transformer(t: dict) -> dict:
    return dict(hidden_size=t["width"], num_hidden_layers=t["depth"],
                num_attention_heads=t["num_heads"], intermediate_size=t["mlp_dim"],
                hidden_act=HF_ACTIVATIONS[t["activation"]], layer_norm_eps=t["layer_norm_eps"])


def hf_config_for(arch: str, model: dict, vocab_size: int | None, original: dict | None) -> dict:
    """The config.json of an export; ids the model does not know come from `original` if given."""
    if arch == "bert":
        t = model["text_transformer"]
        return dict(
            architectures=["BertModel"], model_type="bert", vocab_size=vocab_size,
            max_position_embeddings=model["max_text_length"],
            type_vocab_size=model["text_embeddings"]["type_vocab_size"],
            hidden_dropout_prob=t["dropout"], attention_probs_dropout_prob=t["attention_dropout"],
            pad_token_id=(original or {}).get("pad_token_id", 0), **_hf_transformer(t),
        )
    if arch == "vit":
        t = model["image_transformer"]
        return dict(
            architectures=["ViTModel"], model_type="vit", image_size=model["image_size"],
            patch_size=model["patch_size"], num_channels=3, qkv_bias=True,
            hidden_dropout_prob=t["dropout"], attention_probs_dropout_prob=t["attention_dropout"],
            **_hf_transformer(t),
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
                         **_hf_transformer(model["text_transformer"]), **ids),
        vision_config=dict(model_type="clip_vision_model", image_size=model["image_size"],
                           patch_size=model["patch_size"], num_channels=3,
                           **_hf_transformer(model["image_transformer"])),
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
