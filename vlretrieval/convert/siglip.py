"""SigLIP and SigLIP 2 at a fixed resolution (both `SiglipModel`), and `SiglipVisionModel`.

What SigLIP computes, in our options: pre-LN towers (gelu_tanh). The text tower has no token
types, no embedding LayerNorm and no causal mask; its final-LayerNorm'd sequence is pooled at its
last position (not at the end-of-text token: texts are padded to the full length) and projected by
a linear layer with a bias (`text_model.head`). The image tower has a patch bias and no class
token; its `post_layernorm`'d patches are pooled by the attention-pooling head (`vision_model.head`),
whose output is the embedding (no projection). Logits are exp(logit_scale) * cosine + logit_bias,
the scale unclipped, trained with the sigmoid loss. NaFlex (`Siglip2Model`) is not covered.
"""

from __future__ import annotations

from vlretrieval.convert.parts import HF_ACTIVATIONS, check_vision, hf_transformer, image_tower, text_tower, transformer
from vlretrieval.convert.rules import Rule, dense, layer_norm
from vlretrieval.errors import UserError

MODEL, VISION = "SiglipModel", "SiglipVisionModel"
ARCHITECTURES = (MODEL, VISION)
# transformers 4 saved a SiglipVisionModel under vision_model.; transformers 5 saves (and reads)
# it without, as written here.
LEGACY_VISION_PREFIX = "vision_model."

# configuration_siglip's defaults: Hub config.json files give only what differs from them.
TEXT_DEFAULTS = dict(vocab_size=32000, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                     num_attention_heads=12, max_position_embeddings=64, hidden_act="gelu_pytorch_tanh",
                     layer_norm_eps=1e-6, attention_dropout=0.0)
VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       num_channels=3, image_size=224, patch_size=16, hidden_act="gelu_pytorch_tanh",
                       layer_norm_eps=1e-6, attention_dropout=0.0, vision_use_head=True)


def _vision_section(model: dict, hf_vision: dict, where: str) -> None:
    vision = {**VISION_DEFAULTS, **hf_vision}
    check_vision(vision, where)
    if not vision["vision_use_head"]:
        raise UserError(f"{where}: vision_use_head false (no attention-pooling head) is not supported")
    for name in ("image_size", "patch_size"):
        if not isinstance(vision[name], int):
            raise UserError(f"{where}: {name} {vision[name]!r} is not supported (one integer: square)")
    model["image_transformer"] = transformer(vision, where, pre_norm=True, final_norm=True)
    model["image_embeddings"] = dict(patch_bias=True, layer_norm=False, class_token=False,
                                     layer_norm_eps=float(vision["layer_norm_eps"]))
    model.update(image_size=vision["image_size"], patch_size=vision["patch_size"])
    model["head"].update(image_pooling="map", image_pooler=False)


def model_from_hf(architecture: str, hf: dict, model: dict, where: str) -> tuple[dict, int | None]:
    """Fills `model` (a copy of the base section) from an HF config; (model, vocab_size)."""
    if architecture == VISION:
        _vision_section(model, hf, where)
        return model, None
    text = {**TEXT_DEFAULTS, **hf.get("text_config", {})}
    vision = {**VISION_DEFAULTS, **hf.get("vision_config", {})}
    _vision_section(model, vision, where)
    model["text_transformer"] = transformer(text, where, pre_norm=True, final_norm=True)
    model["text_embeddings"] = dict(type_vocab_size=0, layer_norm=False,
                                    layer_norm_eps=float(text["layer_norm_eps"]))
    model["max_text_length"] = text["max_position_embeddings"]
    projection = text.get("projection_size") or text["hidden_size"]
    if projection != vision["hidden_size"]:
        raise UserError(f"{where}: the text head's projection_size {projection} differs from the "
                        f"vision hidden_size {vision['hidden_size']}: not a SigLIP dual encoder")
    model["head"].update(
        embed_dim=vision["hidden_size"], text_pooling="last_position", text_pooler=False,
        image_projection=False, text_projection_bias=True, logit_bias=True, clip_logit_scale=False,
        # SigLIP's initialisation (t' = log 10, b = -10), for parameters trained from scratch.
        initial_temperature=0.1, initial_logit_bias=-10.0,
    )
    return model, text["vocab_size"]


def experiment_settings(architecture: str, model: dict) -> dict:
    """Experiment keys a converted SigLIP needs: its sigmoid loss, and texts padded to the length
    its last-position pooling was trained at."""
    if architecture != MODEL:
        return {}
    return {"objectives.contrastive_loss": "sigmoid", "data.max_text_length": model["max_text_length"]}


def without_legacy_prefix(state: dict) -> dict:
    """A SiglipVisionModel state dict under transformers 5's names."""
    if state and all(name.startswith(LEGACY_VISION_PREFIX) for name in state):
        return {name[len(LEGACY_VISION_PREFIX):]: value for name, value in state.items()}
    return state


def _vision_rules(model: dict, prefix: str) -> list[Rule]:
    ours, head = "image_pooling_head", f"{prefix}head."
    return image_tower(model, prefix, "siglip") + [
        Rule(f"{ours}/probe", f"{head}probe"),
        Rule(f"{ours}/attention/in_projection/kernel", f"{head}attention.in_proj_weight", "linear"),
        Rule(f"{ours}/attention/in_projection/bias", f"{head}attention.in_proj_bias"),
        *dense(f"{ours}/attention/out", f"{head}attention.out_proj"),
        *layer_norm(f"{ours}/norm", f"{head}layernorm"),
        *dense(f"{ours}/mlp/fc1", f"{head}mlp.fc1"),
        *dense(f"{ours}/mlp/fc2", f"{head}mlp.fc2"),
    ]


def rules_for(architecture: str, model: dict) -> list[Rule]:
    if architecture == VISION:
        return _vision_rules(model, "")
    return (text_tower(model, "text_model.", "clip") + dense("text_projection", "text_model.head")
            + _vision_rules(model, "vision_model.")
            + [Rule("logit_scale/log_scale", "logit_scale", "scalar_as_vector"),
               Rule("logit_bias", "logit_bias", "scalar_as_vector")])


# What a tower must be to export as each: (model section path, required value, why).
VISION_REQUIREMENTS = [
    ("kind", "dual", "SigLIP is a dual encoder"),
    ("image_transformer.pre_norm", True, "SigLIP is pre-LN"),
    ("image_transformer.final_norm", True, "SigLIP's image tower ends with a LayerNorm"),
    ("image_transformer.causal", False, "SigLIP's image attention is not causal"),
    ("image_embeddings.patch_bias", True, "SigLIP's patch projection has a bias"),
    ("image_embeddings.layer_norm", False, "SigLIP does not normalise the image embeddings"),
    ("image_embeddings.class_token", False, "SigLIP has no class token"),
    ("head.image_pooling", "map", "SigLIP pools images with its attention-pooling head"),
    ("head.image_pooler", False, "SigLIP has no pooler"),
]
REQUIREMENTS = {
    "siglip_vision": VISION_REQUIREMENTS,
    "siglip": VISION_REQUIREMENTS + [
        ("text_transformer.pre_norm", True, "SigLIP is pre-LN"),
        ("text_transformer.final_norm", True, "SigLIP's text tower ends with a LayerNorm"),
        ("text_transformer.causal", False, "SigLIP's text attention is not causal"),
        ("text_embeddings.type_vocab_size", 0, "SigLIP has no token types"),
        ("text_embeddings.layer_norm", False, "SigLIP's text embeddings are not normalised"),
        ("head.text_pooling", "last_position", "SigLIP pools the last text position"),
        ("head.text_pooler", False, "SigLIP has no pooler"),
        ("head.image_projection", False, "SigLIP's image embedding is its pooling head's output"),
        ("head.text_projection_bias", True, "SigLIP's text head has a bias"),
        ("head.logit_bias", True, "SigLIP has a logit bias"),
        ("head.clip_logit_scale", False, "SigLIP does not clip its logit scale"),
    ],
}


def _hf_transformer(t: dict) -> dict:
    # The same tanh approximation as gelu_new; SigLIP's configs name PyTorch's implementation.
    act = "gelu_pytorch_tanh" if t["activation"] == "gelu_tanh" else HF_ACTIVATIONS[t["activation"]]
    return dict(hf_transformer(t), hidden_act=act, attention_dropout=t["attention_dropout"])


def _hf_vision(model: dict) -> dict:
    return dict(model_type="siglip_vision_model", image_size=model["image_size"],
                patch_size=model["patch_size"], num_channels=3, vision_use_head=True,
                **_hf_transformer(model["image_transformer"]))


def hf_config_for(arch: str, model: dict, vocab_size: int | None, original: dict | None) -> dict:
    """The config.json of an export; token ids the model does not know come from `original`."""
    if arch == "siglip_vision":
        return dict(architectures=[VISION], **_hf_vision(model))
    # SigLIP never reads these ids (it pools by position); kept from the source when there is one.
    ids = {name: value for name, value in (original or {}).get("text_config", {}).items()
           if name in ("pad_token_id", "bos_token_id", "eos_token_id")}
    text = dict(model_type="siglip_text_model", vocab_size=vocab_size,
                max_position_embeddings=model["max_text_length"], projection_size=model["head"]["embed_dim"],
                **_hf_transformer(model["text_transformer"]), **ids)
    return dict(architectures=[MODEL], model_type="siglip", text_config=text, vision_config=_hf_vision(model))

