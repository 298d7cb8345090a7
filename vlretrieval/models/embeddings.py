"""Token embeddings: text (token + position + token type), image patches (ViT), modality type."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlretrieval.models.transformer import layer_norm

# BERT and ViT both initialise embeddings with a small normal; it keeps early logits tame.
embedding_init = nn.initializers.normal(stddev=0.02)


@dataclasses.dataclass(frozen=True)
class TextEmbeddingConfig:
    """Options of a text tower's embeddings (the defaults are BERT's)."""

    type_vocab_size: int = 2  # 0: no token-type table (CLIP)
    layer_norm: bool = True  # BERT normalises the embeddings; CLIP does not
    layer_norm_eps: float = 1e-12


@dataclasses.dataclass(frozen=True)
class ImageEmbeddingConfig:
    """Options of an image tower's patch embeddings (the defaults are ViT's)."""

    patch_bias: bool = True  # CLIP's patch projection has no bias
    layer_norm: bool = False  # CLIP normalises the embeddings before the encoder ("pre-LN")
    layer_norm_eps: float = 1e-5
    class_token: bool = True  # SigLIP has none: its attention-pooling head reads the patches


class TextEmbeddings(nn.Module):
    """BERT-style: token + learned position + token-type embeddings, then LayerNorm and dropout."""

    vocab_size: int
    width: int
    max_length: int
    type_vocab_size: int = 2
    layer_norm: bool = True  # BERT normalises here; CLIP's text tower does not
    layer_norm_eps: float = 1e-12
    dropout: float = 0.0

    @nn.compact
    def __call__(
        self, token_ids: jax.Array, token_type_ids: jax.Array | None = None, *, train: bool = False
    ) -> jax.Array:
        length = token_ids.shape[1]
        if length > self.max_length:
            raise ValueError(f"text length {length} exceeds max_length {self.max_length}")
        x = nn.Embed(self.vocab_size, self.width, embedding_init=embedding_init, name="token")(
            token_ids
        )
        positions = self.param("position", embedding_init, (self.max_length, self.width))
        x = x + positions[None, :length]
        if self.type_vocab_size:
            if token_type_ids is None:
                token_type_ids = jnp.zeros_like(token_ids)
            x = x + nn.Embed(
                self.type_vocab_size, self.width, embedding_init=embedding_init, name="token_type"
            )(token_type_ids)
        if self.layer_norm:
            x = layer_norm(self.layer_norm_eps, "norm")(x)
        return nn.Dropout(self.dropout)(x, deterministic=not train)


class PatchEmbeddings(nn.Module):
    """ViT-style: non-overlapping patches projected linearly, a class token, position embeddings.

    Images are [batch, height, width, channels] floats, already normalised.
    """

    image_size: int
    patch_size: int
    width: int
    class_token: bool = True
    dropout: float = 0.0
    patch_bias: bool = True
    layer_norm: bool = False
    layer_norm_eps: float = 1e-5
    compute_dtype: jnp.dtype = jnp.float32  # of the patch projection (a matmul)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @nn.compact
    def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
        batch, height, width, _ = images.shape
        if height != self.image_size or width != self.image_size:
            raise ValueError(
                f"images are {height}x{width} but the model expects "
                f"{self.image_size}x{self.image_size}"
            )
        p = self.patch_size
        x = nn.Conv(
            self.width, (p, p), strides=(p, p), padding="VALID", use_bias=self.patch_bias,
            dtype=self.compute_dtype, name="projection",
        )(images)
        x = x.reshape(batch, -1, self.width).astype(jnp.float32)
        if self.class_token:
            cls = self.param("class_token", embedding_init, (1, 1, self.width))
            x = jnp.concatenate([jnp.broadcast_to(cls, (batch, 1, self.width)), x], axis=1)
        positions = self.param("position", embedding_init, (x.shape[1], self.width))
        x = x + positions[None]
        if self.layer_norm:
            x = layer_norm(self.layer_norm_eps, "norm")(x)
        return nn.Dropout(self.dropout)(x, deterministic=not train)


class ModalityEmbedding(nn.Module):
    """Adds a learned vector per modality (0 = text, 1 = image) so one stream can tell them apart."""

    width: int
    num_modalities: int = 2

    @nn.compact
    def __call__(self, x: jax.Array, modality: int) -> jax.Array:
        table = self.param("embedding", embedding_init, (self.num_modalities, self.width))
        return x + table[modality][None, None, :]
