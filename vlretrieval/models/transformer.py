"""Transformer encoder: masked multi-head self-attention, MLP, pre-LN or post-LN blocks.

One implementation serves BERT-style text encoders (post-LN), ViT/CLIP image encoders (pre-LN) and
the joint single-stream model. Submodule names (query/key/value/out, mlp.fc1/fc2) are stable so
that checkpoint conversion can map them one to one.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp


def quick_gelu(x: jax.Array) -> jax.Array:
    """CLIP's sigmoid approximation of GELU; its checkpoints are only correct with this one."""
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # BERT, ViT: the exact erf form
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": quick_gelu,
    "relu": jax.nn.relu,
}


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Shape and numerics of an encoder stack (frozen so linen modules can hold it)."""

    width: int = 128
    depth: int = 4
    num_heads: int = 4
    mlp_dim: int = 512
    dropout: float = 0.0
    attention_dropout: float = 0.0
    pre_norm: bool = True  # ViT/CLIP: pre-LN; BERT: post-LN
    final_norm: bool = True  # a LayerNorm after the last block (pre-LN models need it)
    layer_norm_eps: float = 1e-6
    activation: str = "gelu"
    causal: bool = False  # each token attends to itself and earlier ones only (CLIP's text tower)
    remat: bool = False  # recompute each block in the backward pass to save activation memory

    def __post_init__(self):
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"unknown activation {self.activation!r}; choose one of {sorted(ACTIVATIONS)}"
            )


class MultiHeadSelfAttention(nn.Module):
    """Self-attention where `mask` [batch, length] (1 = real token) hides padding keys."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, *, train: bool) -> jax.Array:
        cfg = self.config
        head_dim = cfg.width // cfg.num_heads
        dense = lambda name: nn.DenseGeneral((cfg.num_heads, head_dim), name=name)
        query, key, value = dense("query")(x), dense("key")(x), dense("value")(x)
        scores = jnp.einsum("bqhd,bkhd->bhqk", query, key) / math.sqrt(head_dim)
        # A large finite negative, not -inf: a fully padded row then yields a uniform softmax
        # instead of NaN, and its output is never read.
        big_negative = jnp.finfo(scores.dtype).min / 2
        allowed = mask[:, None, None, :].astype(bool)
        if cfg.causal:
            length = x.shape[1]
            allowed = allowed & jnp.tril(jnp.ones((length, length), bool))[None, None]
        scores = jnp.where(allowed, scores, big_negative)
        weights = jax.nn.softmax(scores, axis=-1)
        weights = nn.Dropout(cfg.attention_dropout)(weights, deterministic=not train)
        attended = jnp.einsum("bhqk,bkhd->bqhd", weights, value)
        return nn.DenseGeneral(cfg.width, axis=(-2, -1), name="out")(attended)


class Mlp(nn.Module):
    config: TransformerConfig

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        cfg = self.config
        x = nn.Dense(cfg.mlp_dim, name="fc1")(x)
        x = ACTIVATIONS[cfg.activation](x)
        x = nn.Dropout(cfg.dropout)(x, deterministic=not train)
        return nn.Dense(cfg.width, name="fc2")(x)


class EncoderBlock(nn.Module):
    """Attention + MLP with residuals; LayerNorm before (pre-LN) or after (post-LN) each."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, train: bool) -> jax.Array:
        cfg = self.config
        norm = lambda name: nn.LayerNorm(epsilon=cfg.layer_norm_eps, name=name)
        drop = lambda y: nn.Dropout(cfg.dropout)(y, deterministic=not train)
        attention = MultiHeadSelfAttention(cfg, name="attention")
        mlp = Mlp(cfg, name="mlp")
        if cfg.pre_norm:
            x = x + drop(attention(norm("attention_norm")(x), mask, train=train))
            x = x + drop(mlp(norm("mlp_norm")(x), train=train))
        else:
            x = norm("attention_norm")(x + drop(attention(x, mask, train=train)))
            x = norm("mlp_norm")(x + drop(mlp(x, train=train)))
        return x


class Encoder(nn.Module):
    """A stack of `depth` blocks over embedded tokens [batch, length, width]."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, *, train: bool = False) -> jax.Array:
        cfg = self.config
        # `train` is static for remat: it selects dropout, not a traced value.
        block_type = nn.remat(EncoderBlock, static_argnums=(3,)) if cfg.remat else EncoderBlock
        for index in range(cfg.depth):
            x = block_type(cfg, name=f"block_{index}")(x, mask, train)
        if cfg.final_norm:
            x = nn.LayerNorm(epsilon=cfg.layer_norm_eps, name="final_norm")(x)
        return x
