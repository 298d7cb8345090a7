"""What the architectures are built of: an HF encoder config as our transformer section, and the
rule tables of the text and image towers in each family's naming (BERT, ViT, CLIP, SigLIP)."""

from __future__ import annotations

from vlretrieval.convert.rules import Rule, encoder_blocks, layer_norm
from vlretrieval.errors import UserError

# HF `hidden_act` <-> our activation names.
ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
               "quick_gelu": "quick_gelu", "relu": "relu"}
HF_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_new", "quick_gelu": "quick_gelu", "relu": "relu"}


def activation(hf_config: dict, where: str) -> str:
    name = hf_config.get("hidden_act", "gelu")
    if name not in ACTIVATIONS:
        raise UserError(f"{where}: hidden_act {name!r} is not supported; "
                        f"supported: {', '.join(sorted(ACTIVATIONS))}")
    return ACTIVATIONS[name]


def transformer(hf: dict, where: str, *, pre_norm: bool, final_norm: bool, causal: bool = False):
    """Our transformer section for an HF encoder config."""
    return dict(
        width=hf["hidden_size"], depth=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"], mlp_dim=hf["intermediate_size"],
        dropout=float(hf.get("hidden_dropout_prob", hf.get("dropout", 0.0)) or 0.0),
        attention_dropout=float(
            hf.get("attention_probs_dropout_prob", hf.get("attention_dropout", 0.0)) or 0.0
        ),
        pre_norm=pre_norm, final_norm=final_norm, layer_norm_eps=float(hf["layer_norm_eps"]),
        activation=activation(hf, where), causal=causal, remat="none",
    )


def hf_transformer(t: dict) -> dict:
    """The HF encoder config keys of our transformer section `t`."""
    return dict(hidden_size=t["width"], num_hidden_layers=t["depth"],
                num_attention_heads=t["num_heads"], intermediate_size=t["mlp_dim"],
                hidden_act=HF_ACTIVATIONS[t["activation"]], layer_norm_eps=t["layer_norm_eps"])


def check_vision(hf: dict, where: str) -> None:
    if hf.get("num_channels", 3) != 3:
        raise UserError(f"{where}: num_channels {hf['num_channels']} is not supported (only 3)")
    if not hf.get("qkv_bias", True):
        raise UserError(f"{where}: qkv_bias false is not supported")


def text_tower(model: dict, hf_prefix: str, style: str, offset: int = 0) -> list[Rule]:
    """Embeddings, blocks and final LayerNorm of the text tower; CLIP and SigLIP share "clip"."""
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


def image_tower(model: dict, hf_prefix: str, style: str) -> list[Rule]:
    """Patch embeddings, blocks and final LayerNorm of the image tower (no pooling head)."""
    t = model["image_transformer"]
    e = "image_encoder/embeddings"
    blocks_style = "vit" if style == "vit" else "clip"
    if style == "clip":
        rules = [Rule(f"{e}/projection/kernel", f"{hf_prefix}embeddings.patch_embedding.weight", "conv"),
                 Rule(f"{e}/class_token", f"{hf_prefix}embeddings.class_embedding", "vector_as_token"),
                 Rule(f"{e}/position", f"{hf_prefix}embeddings.position_embedding.weight")]
        rules += layer_norm(f"{e}/norm", f"{hf_prefix}pre_layrnorm")
        final = f"{hf_prefix}post_layernorm"
    elif style == "siglip":  # CLIP's names, a patch bias, no class token, no LayerNorm before
        rules = [Rule(f"{e}/projection/kernel", f"{hf_prefix}embeddings.patch_embedding.weight", "conv"),
                 Rule(f"{e}/projection/bias", f"{hf_prefix}embeddings.patch_embedding.bias"),
                 Rule(f"{e}/position", f"{hf_prefix}embeddings.position_embedding.weight")]
        final = f"{hf_prefix}post_layernorm"
    else:
        rules = vit_patches(e, f"{hf_prefix}embeddings.")
        final = f"{hf_prefix}layernorm"
    rules += encoder_blocks("image_encoder/encoder", hf_prefix, t["depth"], t["num_heads"], blocks_style)
    rules += layer_norm("image_encoder/encoder/final_norm", final)
    return rules


def vit_patches(ours: str, hf: str) -> list[Rule]:
    return [Rule(f"{ours}/projection/kernel", f"{hf}patch_embeddings.projection.weight", "conv"),
            Rule(f"{ours}/projection/bias", f"{hf}patch_embeddings.projection.bias"),
            Rule(f"{ours}/class_token", f"{hf}cls_token"),
            Rule(f"{ours}/position", f"{hf}position_embeddings", "batch1")]
