"""JointVLTransformer: one single-stream transformer over [text tokens ; image patches].

Early interaction: every text token attends to every patch, which is accurate but means one
forward pass per (image, text) pair. `encode_text_sequence` / `encode_image_sequence` run the very
same weights on one modality alone; `towers.DecomposedVLTransformer` builds retrieval towers on
them (VLDeformer).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlretrieval.models.embeddings import ModalityEmbedding, PatchEmbeddings, TextEmbeddings
from vlretrieval.models.transformer import Encoder, TransformerConfig

TEXT, IMAGE = 0, 1


@dataclasses.dataclass(frozen=True)
class JointConfig:
    transformer: TransformerConfig
    vocab_size: int
    max_text_length: int = 32
    image_size: int = 64
    patch_size: int = 8
    text_layer_norm_eps: float = 1e-12
    type_vocab_size: int = 2


class JointVLTransformer(nn.Module):
    """Single-stream vision-language transformer with a pooler and an image-text matching head."""

    config: JointConfig

    def setup(self):
        cfg = self.config
        width = cfg.transformer.width
        self.text_embeddings = TextEmbeddings(
            vocab_size=cfg.vocab_size,
            width=width,
            max_length=cfg.max_text_length,
            type_vocab_size=cfg.type_vocab_size,
            layer_norm_eps=cfg.text_layer_norm_eps,
            dropout=cfg.transformer.dropout,
        )
        self.image_embeddings = PatchEmbeddings(
            image_size=cfg.image_size,
            patch_size=cfg.patch_size,
            width=width,
            dropout=cfg.transformer.dropout,
            compute_dtype=cfg.transformer.compute_dtype,
        )
        self.modality = ModalityEmbedding(width)
        self.encoder = Encoder(cfg.transformer)
        # BERT/ViLT pooler: a dense + tanh over the first token of the stream.
        self.pooler = nn.Dense(width, name="pooler")
        self.itm_head = nn.Dense(2, name="itm_head")
        # BERT's MLM head: transform, normalise, then scores over the vocabulary.
        self.mlm_transform = nn.Dense(width, name="mlm_transform")
        self.mlm_norm = nn.LayerNorm(epsilon=cfg.text_layer_norm_eps, name="mlm_norm")
        self.mlm_decoder = nn.Dense(cfg.vocab_size, name="mlm_decoder")

    def embed_text(self, token_ids: jax.Array, *, train: bool = False) -> jax.Array:
        return self.modality(self.text_embeddings(token_ids, train=train), TEXT)

    def embed_image(self, images: jax.Array, *, train: bool = False) -> jax.Array:
        return self.modality(self.image_embeddings(images, train=train), IMAGE)

    def encode_text_sequence(
        self, token_ids: jax.Array, text_mask: jax.Array, *, train: bool = False
    ) -> jax.Array:
        """The joint encoder on text alone: [batch, text_length, width]."""
        return self.encoder(self.embed_text(token_ids, train=train), text_mask, train=train)

    def encode_image_sequence(self, images: jax.Array, *, train: bool = False) -> jax.Array:
        """The joint encoder on image patches alone: [batch, 1 + patches, width]."""
        x = self.embed_image(images, train=train)
        mask = jnp.ones(x.shape[:2], jnp.int32)
        return self.encoder(x, mask, train=train)

    def pool(self, sequence: jax.Array) -> jax.Array:
        return jnp.tanh(self.pooler(sequence[:, 0]))

    def mlm_logits(self, text_sequence: jax.Array) -> jax.Array:
        """[batch, text_length, vocab] token scores from the text part of a joint sequence."""
        hidden = jax.nn.gelu(self.mlm_transform(text_sequence), approximate=False)
        return self.mlm_decoder(self.mlm_norm(hidden))

    def __call__(
        self, token_ids: jax.Array, text_mask: jax.Array, images: jax.Array, *, train: bool = False
    ) -> dict[str, jax.Array]:
        """One joint pass over each (text, image) pair: sequence, pooled output, ITM logits.

        `mlm_logits` are returned too (the text positions' vocabulary scores); under jit they are
        computed only when used.
        """
        text = self.embed_text(token_ids, train=train)
        image = self.embed_image(images, train=train)
        stream = jnp.concatenate([text, image], axis=1)
        mask = jnp.concatenate(
            [text_mask.astype(jnp.int32), jnp.ones(image.shape[:2], jnp.int32)], axis=1
        )
        sequence = self.encoder(stream, mask, train=train)
        pooled = self.pool(sequence)
        return {
            "sequence": sequence,
            "pooled": pooled,
            "itm_logits": self.itm_head(pooled),
            "mlm_logits": self.mlm_logits(sequence[:, : token_ids.shape[1]]),
        }
