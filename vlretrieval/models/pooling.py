"""A tower's sequence -> one vector: a token, a masked mean, or SigLIP's attention-pooling head."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlretrieval.models.transformer import Mlp, TransformerConfig, explicit_attention, layer_norm

# "last": the last real token (CLIP's end-of-text, which its tokenizer puts last); "last_position":
# the sequence's last position whatever the mask (SigLIP, whose texts are padded to full length).
TEXT_POOLINGS = ("cls", "mean", "max", "last", "last_position")
# "map": SigLIP's multihead attention pooling (`AttentionPoolingHead`, its own parameters).
IMAGE_POOLINGS = (*TEXT_POOLINGS, "map")


def pool(sequence: jax.Array, mask: jax.Array, method: str) -> jax.Array:
    """A token (class, last real or last position), or a mean or a max over real tokens only
    (padding never counts) of `sequence` [batch, length, width]."""
    if method == "cls":
        return sequence[:, 0]
    if method == "last":
        last = jnp.maximum(mask.astype(jnp.int32).sum(axis=1) - 1, 0)
        return jnp.take_along_axis(sequence, last[:, None, None], axis=1)[:, 0]
    if method == "last_position":
        return sequence[:, -1]
    if method == "mean":
        weights = mask.astype(sequence.dtype)[..., None]
        return (sequence * weights).sum(axis=1) / jnp.maximum(weights.sum(axis=1), 1.0)
    if method == "max":  # over real tokens only (sentence-transformers' max pooling)
        lowest = jnp.finfo(sequence.dtype).min
        return jnp.where(mask.astype(bool)[..., None], sequence, lowest).max(axis=1)
    raise ValueError(f"unknown pooling {method!r}; choose one of {TEXT_POOLINGS}")


class FusedProjection(nn.Module):
    """A [in, features] kernel and its bias, created as `nn.Dense` would create them, for callers
    that apply slices of it to different inputs."""

    features: int

    @nn.compact
    def __call__(self, in_features: int) -> tuple[jax.Array, jax.Array]:
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (in_features, self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        return kernel, bias


class ProbeAttention(nn.Module):
    """Multi-head attention of a few query tokens over a sequence, as `torch.nn.MultiheadAttention`
    computes it: q, k and v come from one [width, 3 x width] projection (`in_projection`, the
    layout SigLIP checkpoints store), so a converted tensor is one parameter here."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, queries: jax.Array, sequence: jax.Array) -> jax.Array:
        cfg = self.config
        width = sequence.shape[-1]
        dtype = cfg.compute_dtype
        kernel, bias = FusedProjection(3 * width, name="in_projection")(width)
        kernel, bias = kernel.astype(dtype), bias.astype(dtype)
        # The queries need only the q third and the sequence only k and v: no wasted product.
        query = queries.astype(dtype) @ kernel[:, :width] + bias[:width]
        key, value = jnp.split(sequence.astype(dtype) @ kernel[:, width:] + bias[width:], 2, axis=-1)
        heads = lambda x: x.reshape(*x.shape[:-1], cfg.num_heads, width // cfg.num_heads)
        allowed = jnp.ones((1, 1, 1, sequence.shape[1]), bool)  # every token of the sequence
        attended = explicit_attention(heads(query), heads(key), heads(value), allowed, lambda w: w)
        attended = attended.reshape(*queries.shape[:-1], width)
        return nn.Dense(width, dtype=dtype, name="out")(attended).astype(jnp.float32)


class AttentionPoolingHead(nn.Module):
    """SigLIP's multihead attention pooling ("MAP"): a learned probe attends over every token,
    then a LayerNorm'd MLP is added to it (a residual). Sized and activated like the tower it
    pools (`config`); returns [batch, width] in float32."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, sequence: jax.Array, *, train: bool = False) -> jax.Array:
        cfg = self.config
        batch, _, width = sequence.shape
        # big_vision initialises the probe as a weight (xavier), not as a small embedding.
        probe = self.param("probe", nn.initializers.xavier_uniform(), (1, 1, width))
        x = ProbeAttention(cfg, name="attention")(jnp.broadcast_to(probe, (batch, 1, width)), sequence)
        x = x + Mlp(cfg, name="mlp")(layer_norm(cfg.layer_norm_eps, "norm")(x), train=train)
        return x[:, 0].astype(jnp.float32)
