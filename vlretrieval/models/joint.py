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
from vlretrieval.models.regions import RegionEmbeddings, unpack_regions
from vlretrieval.models.transformer import Encoder, TransformerConfig

TEXT, IMAGE = 0, 1
IMAGE_INPUTS = ("patches", "regions")


@dataclasses.dataclass(frozen=True)
class JointConfig:
    transformer: TransformerConfig
    vocab_size: int
    max_text_length: int = 32
    image_size: int = 64
    patch_size: int = 8
    text_layer_norm_eps: float = 1e-12
    type_vocab_size: int = 2
    # "regions": detector-region features with box geometry instead of pixels (regions.py).
    image_input: str = "patches"
    region_feature_dim: int = 0
    num_regions: int = 0
    # Region classes masked object classification predicts (0: no such head).
    region_classes: int = 0


def image_token_mask(images: jax.Array, image_input: str, length: int) -> jax.Array:
    """[batch, length] 1 for the image sequence's real tokens: every patch (and the class token),
    or the image token and the real regions (padding regions are 0)."""
    if image_input == "regions":
        _, _, mask, _ = unpack_regions(images)
        return jnp.concatenate([jnp.ones((images.shape[0], 1), jnp.int32), mask], axis=1)
    return jnp.ones((images.shape[0], length), jnp.int32)


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
        if cfg.image_input == "regions":
            self.image_embeddings = RegionEmbeddings(
                feature_dim=cfg.region_feature_dim, width=width, dropout=cfg.transformer.dropout,
                layer_norm_eps=cfg.text_layer_norm_eps, compute_dtype=cfg.transformer.compute_dtype,
            )
            # Masked region modelling (UNITER / Unicoder-VL): regress a masked region's feature
            # (MRFR) and, with region classes, classify it (MOC), from its joint output.
            self.region_transform = nn.Dense(width, name="region_transform")
            self.region_norm = nn.LayerNorm(epsilon=cfg.text_layer_norm_eps, name="region_norm")
            self.region_feature_head = nn.Dense(cfg.region_feature_dim, name="region_feature_head")
            if cfg.region_classes:
                self.region_class_head = nn.Dense(cfg.region_classes, name="region_class_head")
        else:
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

    def embed_image(self, images: jax.Array, *, train: bool = False,
                    mask_regions: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """(embeddings [batch, image_length, width], mask [batch, image_length])."""
        if self.config.image_input == "regions":
            x, mask = self.image_embeddings(images, mask_regions=mask_regions, train=train)
        else:
            x = self.image_embeddings(images, train=train)
            mask = jnp.ones(x.shape[:2], jnp.int32)
        return self.modality(x, IMAGE), mask

    def encode_text_sequence(
        self, token_ids: jax.Array, text_mask: jax.Array, *, train: bool = False
    ) -> jax.Array:
        """The joint encoder on text alone: [batch, text_length, width]."""
        return self.encoder(self.embed_text(token_ids, train=train), text_mask, train=train)

    def encode_image_sequence(self, images: jax.Array, *, train: bool = False) -> jax.Array:
        """The joint encoder on the image alone: [batch, 1 + patches (or regions), width]; padding
        regions are masked out of attention (`image_token_mask` says which rows are real)."""
        x, mask = self.embed_image(images, train=train)
        return self.encoder(x, mask, train=train)

    def region_predictions(self, region_sequence: jax.Array) -> dict[str, jax.Array]:
        """Masked region modelling heads on the regions' joint outputs [batch, regions, width]:
        the regressed features, and class logits where the model has region classes."""
        hidden = self.region_norm(jax.nn.gelu(self.region_transform(region_sequence), approximate=False))
        predictions = {"region_features": self.region_feature_head(hidden)}
        if self.config.region_classes:
            predictions["region_class_logits"] = self.region_class_head(hidden)
        return predictions

    def pool(self, sequence: jax.Array) -> jax.Array:
        return jnp.tanh(self.pooler(sequence[:, 0]))

    def mlm_logits(self, text_sequence: jax.Array) -> jax.Array:
        """[batch, text_length, vocab] token scores from the text part of a joint sequence."""
        hidden = jax.nn.gelu(self.mlm_transform(text_sequence), approximate=False)
        return self.mlm_decoder(self.mlm_norm(hidden))

    def __call__(
        self, token_ids: jax.Array, text_mask: jax.Array, images: jax.Array, *, train: bool = False,
        mask_regions: jax.Array | None = None,
    ) -> dict[str, jax.Array]:
        """One joint pass over each (text, image) pair: sequence, pooled output, ITM logits.

        `mlm_logits` are returned too (the text positions' vocabulary scores), and with region
        inputs the masked region modelling predictions at every region; under jit they are
        computed only when used. `mask_regions` [batch, regions]: regions whose features are hidden.
        """
        text = self.embed_text(token_ids, train=train)
        image, image_mask = self.embed_image(images, train=train, mask_regions=mask_regions)
        stream = jnp.concatenate([text, image], axis=1)
        mask = jnp.concatenate([text_mask.astype(jnp.int32), image_mask], axis=1)
        sequence = self.encoder(stream, mask, train=train)
        pooled = self.pool(sequence)
        text_length = token_ids.shape[1]
        outputs = {
            "sequence": sequence,
            "pooled": pooled,
            "itm_logits": self.itm_head(pooled),
            "mlm_logits": self.mlm_logits(sequence[:, :text_length]),
        }
        if self.config.image_input == "regions":  # the regions follow the image token
            outputs.update(self.region_predictions(sequence[:, text_length + 1:]))
        return outputs
