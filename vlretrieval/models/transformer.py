"""Transformer encoder: masked multi-head self-attention, MLP, pre-LN or post-LN blocks.

One implementation serves BERT-style text encoders (post-LN), ViT/CLIP image encoders (pre-LN) and
the joint single-stream model. Submodule names (query/key/value/out, mlp.fc1/fc2) are stable so
that checkpoint conversion can map them one to one.

Numerics: matmuls and activations run in `dtype` (bfloat16 on accelerators); parameters, layer
norms, the softmax and the residual stream stay float32. The stack is either `depth` blocks
(`block_0` ...) or, with `scan_layers`, one `nn.scan` over stacked block parameters (`blocks`,
leading axis = layer), so compile time does not grow with depth; `layout.py` converts between them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

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

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# "xla": jax.nn.dot_product_attention's XLA path (every backend); "cudnn": cuDNN's fused flash
# attention (GPU, bfloat16); "explicit": the einsum and softmax written out (the reference the others
# are tested against, and the only one with attention dropout, which the fused kernels lack);
# "auto": cuDNN where it applies, the explicit form on the CPU (XLA:CPU runs it ~8% faster than the
# library's XLA path: benchmarks/train_throughput.py), else XLA.
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn", "explicit")
# What a block keeps for the backward pass: "none" keeps everything (no remat), "full" only the
# block's input; the rest are jax.checkpoint_policies by name.
REMAT_POLICIES = (
    "none", "full", "nothing_saveable", "everything_saveable", "dots_saveable", "checkpoint_dots",
    "dots_with_no_batch_dims_saveable", "checkpoint_dots_with_no_batch_dims",
)


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
    # Recompute activations in the backward pass (a REMAT_POLICIES name; True/False from configs
    # written before the policies existed mean "full"/"none").
    remat: str | bool = "none"
    # Set model-wide by the factory from config.model (one value for every encoder).
    dtype: str = "float32"
    attention: str = "auto"
    scan_layers: bool = False

    def __post_init__(self):
        if isinstance(self.remat, bool):
            object.__setattr__(self, "remat", "full" if self.remat else "none")
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")
        for name, value, choices in (
            ("activation", self.activation, sorted(ACTIVATIONS)),
            ("remat", self.remat, REMAT_POLICIES),
            ("dtype", self.dtype, sorted(COMPUTE_DTYPES)),
            ("attention", self.attention, ATTENTION_IMPLEMENTATIONS),
        ):
            if value not in choices:
                raise ValueError(f"unknown {name} {value!r}; choose one of {list(choices)}")

    @property
    def compute_dtype(self):
        return COMPUTE_DTYPES[self.dtype]


def _attention_implementation(cfg: TransformerConfig, train: bool) -> str:
    if cfg.attention_dropout > 0 and train:
        return "explicit"
    if cfg.attention == "auto":
        head_dim = cfg.width // cfg.num_heads
        cudnn_applies = (
            jax.default_backend() == "gpu" and cfg.dtype == "bfloat16"
            and head_dim % 8 == 0 and head_dim <= 128
        )
        if cudnn_applies:
            return "cudnn"
        return "explicit" if jax.default_backend() == "cpu" else "xla"
    return cfg.attention


def explicit_attention(query, key, value, allowed, dropout) -> jax.Array:
    """softmax(q k^T / sqrt(d)) v with the logits and softmax in float32, on [batch, length,
    heads, head_dim] inputs. The products run head-major ([batch, heads, length, head_dim], one
    transpose each way), which XLA's CPU backend runs faster than contracting in place."""
    query, key, value = (x.transpose(0, 2, 1, 3) for x in (query, key, value))
    scores = jnp.einsum("bhqd,bhkd->bhqk", query, key, preferred_element_type=jnp.float32)
    scores = scores / math.sqrt(query.shape[-1])
    # A large finite negative, not -inf: a fully padded row then yields a uniform softmax
    # instead of NaN, and its output is never read.
    scores = jnp.where(allowed, scores, jnp.finfo(scores.dtype).min / 2)
    weights = dropout(jax.nn.softmax(scores, axis=-1)).astype(value.dtype)
    return jnp.einsum("bhqk,bhkd->bhqd", weights, value).transpose(0, 2, 1, 3)


def over_tokens(layer: nn.Module, x: jax.Array, feature_dims: int = 1) -> jax.Array:
    """`layer` applied to `x` with its leading (batch, length) axes merged into one. The reshape
    is free, and XLA's CPU backend differentiates a dense layer over [tokens, features] up to 2.8x
    faster than over [batch, length, features] (its weight gradient then contracts one axis, not
    two; benchmarks/train_throughput.py)."""
    lead = x.shape[: x.ndim - feature_dims]
    y = layer(x.reshape((-1, *x.shape[len(lead):])))
    return y.reshape(*lead, *y.shape[1:])


def layer_norm(epsilon: float, name: str) -> nn.Module:
    """A float32 LayerNorm recomputed in the backward pass from its input alone: autodiff would
    otherwise keep three float32 intermediates of the input's size for it."""
    return nn.remat(nn.LayerNorm)(epsilon=epsilon, dtype=jnp.float32, name=name)


class HeadProjection(nn.Module):
    """The kernel [in, heads, head_dim] and bias of one of q/k/v, created as `nn.DenseGeneral`
    would create them (same names, shapes and initialisation), for a fused q/k/v product."""

    num_heads: int
    head_dim: int

    @nn.compact
    def __call__(self, in_features: int) -> tuple[jax.Array, jax.Array]:
        flat = (in_features, self.num_heads * self.head_dim)
        kernel = self.param(
            "kernel",
            lambda rng, shape: nn.initializers.lecun_normal()(rng, flat).reshape(shape),
            (in_features, self.num_heads, self.head_dim),
        )
        bias = self.param("bias", nn.initializers.zeros, (self.num_heads, self.head_dim))
        return kernel, bias


class MultiHeadSelfAttention(nn.Module):
    """Self-attention where `mask` [batch, length] (1 = real token) hides padding keys."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, *, train: bool) -> jax.Array:
        cfg = self.config
        head_dim = cfg.width // cfg.num_heads
        # One [width, 3 x width] product for q, k and v (larger GEMMs run closer to the chip's
        # peak), from the three separately named parameters that checkpoints and converters use.
        weights = [HeadProjection(cfg.num_heads, head_dim, name=name)(x.shape[-1])
                   for name in ("query", "key", "value")]
        kernel = jnp.concatenate([k.reshape(x.shape[-1], -1) for k, _ in weights], axis=1)
        bias = jnp.concatenate([b.reshape(-1) for _, b in weights])
        dtype = cfg.compute_dtype
        fused = over_tokens(lambda t: t @ kernel.astype(dtype) + bias.astype(dtype), x.astype(dtype))
        shape = (*x.shape[:-1], cfg.num_heads, head_dim)
        query, key, value = (part.reshape(shape) for part in jnp.split(fused, 3, axis=-1))
        allowed = mask[:, None, None, :].astype(bool)  # [batch, heads, queries, keys]
        implementation = _attention_implementation(cfg, train)
        if implementation == "explicit":
            if cfg.causal:
                length = x.shape[1]
                allowed = allowed & jnp.tril(jnp.ones((length, length), bool))[None, None]
            dropout = lambda w: nn.Dropout(cfg.attention_dropout)(w, deterministic=not train)
            attended = explicit_attention(query, key, value, allowed, dropout)
        else:
            attend = lambda q, k, v, m: jax.nn.dot_product_attention(
                q, k, v, mask=m, is_causal=cfg.causal, implementation=implementation)
            if implementation == "xla":
                # Keep q, k, v and recompute the softmax in the backward pass, as a fused
                # (flash) kernel does: the [heads, length, length] probabilities and logits were
                # the largest activations of a ViT-B/16.
                attend = jax.checkpoint(attend)
            attended = attend(query, key, value, allowed)
        out = nn.DenseGeneral(cfg.width, axis=(-2, -1), dtype=cfg.compute_dtype, name="out")
        return over_tokens(out, attended, feature_dims=2)


class Mlp(nn.Module):
    config: TransformerConfig

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        cfg = self.config
        x = over_tokens(nn.Dense(cfg.mlp_dim, dtype=cfg.compute_dtype, name="fc1"), x)
        # Recomputed in the backward pass: an elementwise op costs no matmul FLOPs, while the
        # intermediates autodiff keeps for GELU (erf, exp, products) were 4x its input.
        x = jax.checkpoint(ACTIVATIONS[cfg.activation])(x)
        x = nn.Dropout(cfg.dropout)(x, deterministic=not train)
        return over_tokens(nn.Dense(cfg.width, dtype=cfg.compute_dtype, name="fc2"), x)


class EncoderBlock(nn.Module):
    """Attention + MLP with residuals; LayerNorm before (pre-LN) or after (post-LN) each.

    The residual stream stays float32 (each sub-layer's compute-dtype output is added to it), so
    bfloat16 rounding does not accumulate over depth. With `scanned`, returns (x, None) as
    `nn.scan` wants.
    """

    config: TransformerConfig
    train: bool = False
    scanned: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array):
        cfg, train = self.config, self.train
        norm = lambda name: layer_norm(cfg.layer_norm_eps, name)
        drop = lambda y: nn.Dropout(cfg.dropout)(y, deterministic=not train)
        attention = MultiHeadSelfAttention(cfg, name="attention")
        mlp = Mlp(cfg, name="mlp")
        x = x.astype(jnp.float32)
        if cfg.pre_norm:
            x = x + drop(attention(norm("attention_norm")(x), mask, train=train))
            x = x + drop(mlp(norm("mlp_norm")(x), train=train))
        else:
            x = norm("attention_norm")(x + drop(attention(x, mask, train=train)))
            x = norm("mlp_norm")(x + drop(mlp(x, train=train)))
        return (x, None) if self.scanned else x


def remat_policy(name: str):
    """The jax.checkpoint policy of a REMAT_POLICIES name ("full" saves nothing inside a block)."""
    if name in ("full", "nothing_saveable"):
        return None
    return getattr(jax.checkpoint_policies, name)


class Encoder(nn.Module):
    """A stack of `depth` blocks over embedded tokens [batch, length, width]."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, *, train: bool = False) -> jax.Array:
        cfg = self.config
        block_type = EncoderBlock
        if cfg.remat != "none":
            # Inside a scan, CSE cannot merge the recomputation away, so its guard is not needed.
            block_type = nn.remat(
                EncoderBlock, policy=remat_policy(cfg.remat), prevent_cse=not cfg.scan_layers
            )
        if cfg.scan_layers:
            stack = nn.scan(
                block_type,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=nn.broadcast,
                length=cfg.depth,
            )
            x, _ = stack(cfg, train=train, scanned=True, name="blocks")(x, mask)
        else:
            for index in range(cfg.depth):
                x = block_type(cfg, train=train, name=f"block_{index}")(x, mask)
        if cfg.final_norm:
            x = layer_norm(cfg.layer_norm_eps, "final_norm")(x)
        return x
