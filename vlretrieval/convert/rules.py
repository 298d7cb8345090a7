"""One parameter of ours <-> one Hugging Face tensor: the name pair and how the array is laid out.

Every rule is exactly invertible (a transpose or a reshape), so a table of rules converts in both
directions and a round trip returns the original arrays bit for bit. PyTorch `Linear` stores
[out, in] where flax `Dense` stores [in, out]; attention projections are [in, heads, head_dim]
here; convolutions are [kh, kw, in, out] here and [out, in, kh, kw] in PyTorch.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Rule:
    ours: str  # "/"-joined path in our parameter tree
    hf: str  # the key in the Hugging Face state dict
    kind: str = "same"  # a key of LAYOUTS
    offset: int = 0  # rows of an HF table that come before ours (XLM-R's position ids start at 2)
    heads: int = 0  # attention heads, for the layouts that split or merge them


def _linear_to_ours(w, heads):
    return w.T


def _query_to_ours(w, heads):  # [heads * head_dim, in] -> [in, heads, head_dim]
    return w.T.reshape(w.shape[1], heads, w.shape[0] // heads)


def _query_bias_to_ours(b, heads):
    return b.reshape(heads, b.shape[0] // heads)


def _out_to_ours(w, heads):  # [width, heads * head_dim] -> [heads, head_dim, width]
    return w.T.reshape(heads, w.shape[1] // heads, w.shape[0])


def _query_to_hf(k, heads):
    return k.reshape(k.shape[0], -1).T


def _out_to_hf(k, heads):
    return k.reshape(-1, k.shape[-1]).T


# kind: (HF -> ours, ours -> HF, the HF shape of one of our shapes)
LAYOUTS = {
    "same": (lambda x, h: x, lambda x, h: x, lambda s: s),
    "linear": (_linear_to_ours, lambda k, h: k.T, lambda s: s[::-1]),
    "query": (_query_to_ours, _query_to_hf, lambda s: (s[1] * s[2], s[0])),
    "query_bias": (_query_bias_to_ours, lambda b, h: b.reshape(-1), lambda s: (s[0] * s[1],)),
    "out": (_out_to_ours, _out_to_hf, lambda s: (s[2], s[0] * s[1])),
    "conv": (
        lambda w, h: w.transpose(2, 3, 1, 0),
        lambda k, h: k.transpose(3, 2, 0, 1),
        lambda s: (s[3], s[2], s[0], s[1]),
    ),
    "batch1": (lambda x, h: x[0], lambda x, h: x[None], lambda s: (1, *s)),  # [1, n, w] <-> [n, w]
    "vector_as_token": (  # CLIP's class embedding [w] <-> our class token [1, 1, w]
        lambda x, h: x.reshape(1, 1, -1), lambda x, h: x.reshape(-1), lambda s: (s[-1],),
    ),
    "scalar_as_vector": (  # SigLIP's logit scale and bias [1] <-> our scalars []
        lambda x, h: x.reshape(()), lambda x, h: x.reshape(1), lambda s: (1,),
    ),
}


def hf_shape(rule: Rule, our_shape: tuple[int, ...]) -> tuple[int, ...]:
    shape = tuple(LAYOUTS[rule.kind][2](tuple(our_shape)))
    return (shape[0] + rule.offset, *shape[1:]) if rule.offset else shape


def to_ours(rule: Rule, array: np.ndarray) -> np.ndarray:
    if rule.offset:
        array = array[rule.offset :]
    return np.array(LAYOUTS[rule.kind][0](array, rule.heads), order="C")  # keeps 0-d arrays 0-d


def to_hf(rule: Rule, array: np.ndarray) -> np.ndarray:
    if rule.offset:
        raise ValueError(f"{rule.hf}: rows before position {rule.offset} are not kept")
    return np.array(LAYOUTS[rule.kind][1](np.asarray(array), rule.heads), order="C")


def dense(ours: str, hf: str, kind: str = "linear", heads: int = 0) -> list[Rule]:
    bias_kind = "query_bias" if kind == "query" else "same"
    return [
        Rule(f"{ours}/kernel", f"{hf}.weight", kind, heads=heads),
        Rule(f"{ours}/bias", f"{hf}.bias", bias_kind, heads=heads),
    ]


def layer_norm(ours: str, hf: str) -> list[Rule]:
    return [Rule(f"{ours}/scale", f"{hf}.weight"), Rule(f"{ours}/bias", f"{hf}.bias")]


# Where each piece of an encoder block lives in each family of HF models.
ENCODER_STYLES = {
    "bert": dict(
        layer="encoder.layer.{i}.", query="attention.self.query", key="attention.self.key",
        value="attention.self.value", out="attention.output.dense",
        attention_norm="attention.output.LayerNorm", fc1="intermediate.dense", fc2="output.dense",
        mlp_norm="output.LayerNorm",
    ),
    "vit": dict(
        layer="encoder.layer.{i}.", query="attention.attention.query",
        key="attention.attention.key", value="attention.attention.value",
        out="attention.output.dense", attention_norm="layernorm_before", fc1="intermediate.dense",
        fc2="output.dense", mlp_norm="layernorm_after",
    ),
    "clip": dict(
        layer="encoder.layers.{i}.", query="self_attn.q_proj", key="self_attn.k_proj",
        value="self_attn.v_proj", out="self_attn.out_proj", attention_norm="layer_norm1",
        fc1="mlp.fc1", fc2="mlp.fc2", mlp_norm="layer_norm2",
    ),
}


def encoder_blocks(ours: str, hf: str, depth: int, heads: int, style: str) -> list[Rule]:
    """Rules for `depth` blocks of our `Encoder` at `ours` and an HF encoder under `hf`."""
    names = ENCODER_STYLES[style]
    rules = []
    for index in range(depth):
        block, layer = f"{ours}/block_{index}", hf + names["layer"].format(i=index)
        for part in ("query", "key", "value"):
            rules += dense(f"{block}/attention/{part}", layer + names[part], "query", heads)
        rules += [
            Rule(f"{block}/attention/out/kernel", layer + names["out"] + ".weight", "out", heads=heads),
            Rule(f"{block}/attention/out/bias", layer + names["out"] + ".bias"),
        ]
        rules += layer_norm(f"{block}/attention_norm", layer + names["attention_norm"])
        rules += dense(f"{block}/mlp/fc1", layer + names["fc1"])
        rules += dense(f"{block}/mlp/fc2", layer + names["fc2"])
        rules += layer_norm(f"{block}/mlp_norm", layer + names["mlp_norm"])
    return rules
