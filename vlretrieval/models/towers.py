"""Retrieval towers: `encode_image` / `encode_text` -> L2-normalised embeddings.

Two models share that interface:
- `DecomposedVLTransformer` (VLDeformer): both towers run the one `JointVLTransformer` on a single
  modality, so there is exactly one copy of the transformer weights (params["joint"]).
- `DualEncoder` (CLIP/MURAL/SigLIP): an independent ViT and text transformer.
Pooling (a token, a mean, SigLIP's attention-pooling head) lives in `pooling.py`.
Both hold a learnable temperature (and, for the sigmoid loss, a learnable logit bias) and optionally
a hashing head (`head.hash_bits`: K-bit codes per tower, docs/hashing.md) and a topic head
(`head.num_topics`: TextTopicNet's LDA topics from the pooled image output, docs/topics.md);
`__call__` returns what the objective terms need.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlretrieval.models.embeddings import (
    ImageEmbeddingConfig,
    PatchEmbeddings,
    TextEmbeddingConfig,
    TextEmbeddings,
)
from vlretrieval.models.joint import JointConfig, JointVLTransformer, image_token_mask
from vlretrieval.models.pooling import AttentionPoolingHead, pool
from vlretrieval.models.regions import RegionEmbeddings
from vlretrieval.models.transformer import Encoder, TransformerConfig


def _sign(x: jax.Array) -> jax.Array:
    return jnp.where(x >= 0, 1.0, -1.0).astype(jnp.float32)


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


class LogitScale(nn.Module):
    """Learnable inverse temperature, stored as a log and clipped to [1, max_scale] (CLIP clips the
    scale at 100), or not clipped at all (SigLIP: its checkpoints hold scales above 100)."""

    initial_temperature: float = 0.07
    max_scale: float = 100.0
    clipped: bool = True

    @nn.compact
    def __call__(self) -> jax.Array:
        log_scale = self.param(
            "log_scale", nn.initializers.constant(math.log(1.0 / self.initial_temperature)), ()
        )
        if not self.clipped:
            return jnp.exp(log_scale)
        return jnp.exp(jnp.clip(log_scale, 0.0, math.log(self.max_scale)))


@dataclasses.dataclass(frozen=True)
class TowerHead:
    """How a tower turns a sequence into an embedding."""

    embed_dim: int = 128
    text_pooling: str = "mean"  # one of pooling.TEXT_POOLINGS
    image_pooling: str = "cls"  # one of pooling.IMAGE_POOLINGS ("map": SigLIP's attention pooling)
    initial_temperature: float = 0.07
    max_logit_scale: float = 100.0
    # False: the learned scale is used unclipped, as SigLIP trains it (max_logit_scale unused).
    clip_logit_scale: bool = True
    # SigLIP's learnable logit bias (the sigmoid loss needs it; softmax is blind to it).
    logit_bias: bool = False
    initial_logit_bias: float = -10.0
    # BERT/ViT poolers: a dense + tanh on the pooled token, before the projection.
    text_pooler: bool = False
    image_pooler: bool = False
    # False: the pooled image output is the embedding, no projection (SigLIP, whose attention
    # pooling head ends the tower; embed_dim must then equal the image width).
    image_projection: bool = True
    # SigLIP's text head is a linear layer with a bias; CLIP's projections have none.
    text_projection_bias: bool = False
    # A hashing head: per tower a linear layer from the embedding to this many bits (0: none);
    # trained through tanh, read by sign (`encode_image_codes`, `encode_text_codes`).
    hash_bits: int = 0
    # A topic head: a linear layer from the pooled image output (before the projection) to this
    # many topic logits (0: none); `encode_image_topics` gives their softmax.
    num_topics: int = 0


class _RetrievalModel(nn.Module):
    """What both tower models share: pool, project and normalise a modality's sequence.

    Subclasses define `text_sequence`, `image_sequence`, `head`, `image_transformer` (the image
    tower's TransformerConfig) and the widths.
    """

    def pool_text(self, sequence: jax.Array, text_mask: jax.Array) -> jax.Array:
        """The text tower's pooled output, before the projection."""
        pooled = pool(sequence, text_mask, self.head.text_pooling)
        return jnp.tanh(self.text_pooler(pooled)) if self.head.text_pooler else pooled

    def pool_image(self, sequence: jax.Array, *, train: bool = False, mask: jax.Array | None = None) -> jax.Array:
        """The image tower's pooled output, before the projection; `mask` (`image_mask`) leaves
        padding regions out (None: every position is real, as for patches)."""
        if mask is None:
            mask = jnp.ones(sequence.shape[:2], jnp.int32)
        if self.head.image_pooling == "map":
            pooled = self.image_pooling_head(sequence, train=train)
        else:
            pooled = pool(sequence, mask, self.head.image_pooling)
        return jnp.tanh(self.image_pooler(pooled)) if self.head.image_pooler else pooled

    def image_mask(self, images: jax.Array, length: int) -> jax.Array:
        """[batch, length]: which positions of the image sequence are real (`image_token_mask`)."""
        return image_token_mask(images, self.image_input, length)

    def _text_outputs(self, token_ids, text_mask, train):
        """(sequence, embedding) of the text tower."""
        sequence = self.text_sequence(token_ids, text_mask, train=train)
        return sequence, l2_normalize(self.text_projection(self.pool_text(sequence, text_mask)))

    def _image_outputs(self, images, train):
        """(sequence, mask of its real positions, pooled output, embedding) of the image tower."""
        sequence = self.image_sequence(images, train=train)
        mask = self.image_mask(images, sequence.shape[1])
        pooled = self.pool_image(sequence, train=train, mask=mask)
        embedding = l2_normalize(self.image_projection(pooled) if self.head.image_projection else pooled)
        return sequence, mask, pooled, embedding

    def encode_text(
        self, token_ids: jax.Array, text_mask: jax.Array, *, train: bool = False
    ) -> jax.Array:
        return self._text_outputs(token_ids, text_mask, train)[1]

    def encode_image(self, images: jax.Array, *, train: bool = False) -> jax.Array:
        return self._image_outputs(images, train)[3]

    def encode_image_topics(self, images: jax.Array, *, train: bool = False) -> jax.Array:
        """[batch, num_topics] float32: the topic head's predicted topic distribution of the images."""
        return jax.nn.softmax(self._topic_logits(self._image_outputs(images, train)[2]), axis=-1)

    def _topic_logits(self, pooled: jax.Array) -> jax.Array:
        return self.image_topics(pooled).astype(jnp.float32)

    def encode_image_codes(self, images: jax.Array, *, train: bool = False) -> jax.Array:
        """[batch, hash_bits] +-1 codes of the images: the sign of the hashing head's output (0 is
        +1, as `codes.pack_codes` reads it)."""
        return _sign(self.image_hash(self.encode_image(images, train=train)))

    def encode_text_codes(self, token_ids: jax.Array, text_mask: jax.Array, *, train: bool = False) -> jax.Array:
        """[batch, hash_bits] +-1 codes of the texts (see `encode_image_codes`)."""
        return _sign(self.text_hash(self.encode_text(token_ids, text_mask, train=train)))

    def _word_states(self, sequence, text_mask):
        return l2_normalize(self.text_projection(sequence)), text_mask.astype(jnp.float32)

    def _region_states(self, sequence, mask):
        if self.has_image_token:  # late interaction pairs words with regions, not the image token
            mask = mask.at[:, 0].set(0)
        projected = self.image_projection(sequence) if self.head.image_projection else sequence
        return l2_normalize(projected), mask.astype(jnp.float32)

    def token_embeddings(
        self, token_ids: jax.Array, text_mask: jax.Array, *, train: bool = False
    ) -> tuple[jax.Array, jax.Array]:
        """TERAN's text side: every token's output through the text projection, L2-normalised,
        [batch, length, embed_dim], with the text mask as floats (padding is not a word)."""
        return self._word_states(self.text_sequence(token_ids, text_mask, train=train), text_mask)

    def region_embeddings(self, images: jax.Array, *, train: bool = False) -> tuple[jax.Array, jax.Array]:
        """TERAN's image side: every region's (or patch's) output through the image projection,
        L2-normalised, [batch, length, embed_dim], with a float mask of the real regions; the image
        or class token at position 0 is left out of the mask."""
        sequence, mask, _, _ = self._image_outputs(images, train)
        return self._region_states(sequence, mask)

    def make_heads(self):
        self.text_projection = nn.Dense(self.head.embed_dim, use_bias=self.head.text_projection_bias)
        if self.head.image_projection:
            self.image_projection = nn.Dense(self.head.embed_dim, use_bias=False)
        if self.head.image_pooling == "map":
            self.image_pooling_head = AttentionPoolingHead(self.image_transformer)
        if self.head.text_pooler:
            self.text_pooler = nn.Dense(self.text_width)
        if self.head.image_pooler:
            self.image_pooler = nn.Dense(self.image_width)
        if self.head.hash_bits:
            self.image_hash = nn.Dense(self.head.hash_bits)
            self.text_hash = nn.Dense(self.head.hash_bits)
        if self.head.num_topics:
            self.image_topics = nn.Dense(self.head.num_topics)
        self.logit_scale = LogitScale(
            self.head.initial_temperature, self.head.max_logit_scale, self.head.clip_logit_scale
        )
        if self.head.logit_bias:
            self.logit_bias = self.param(
                "logit_bias", nn.initializers.constant(self.head.initial_logit_bias), ()
            )

    def __call__(
        self, images: jax.Array, token_ids: jax.Array, text_mask: jax.Array, *, train: bool = False,
        sequences: bool = False,
    ) -> dict[str, jax.Array]:
        """The pooled embeddings and the logit scale (and bias); with `sequences`, also the word and
        region states late interaction scores (`token_embeddings`, `region_embeddings`), from the
        same tower passes."""
        image_sequence, image_mask, image_pooled, image_embeddings = self._image_outputs(images, train)
        text_sequence, text_embeddings = self._text_outputs(token_ids, text_mask, train)
        outputs = {
            "image_embeddings": image_embeddings,
            "text_embeddings": text_embeddings,
            "logit_scale": self.logit_scale(),
        }
        if sequences:
            outputs["word_embeddings"], outputs["word_mask"] = self._word_states(text_sequence, text_mask)
            outputs["region_embeddings"], outputs["region_mask"] = self._region_states(image_sequence, image_mask)
        if self.head.logit_bias:
            outputs["logit_bias"] = self.logit_bias
        if self.head.hash_bits:  # the hashing head's pre-tanh outputs, for the hashing terms
            outputs["image_hash_logits"] = self.image_hash(image_embeddings)
            outputs["text_hash_logits"] = self.text_hash(text_embeddings)
        if self.head.num_topics:  # TextTopicNet's topic logits, for objectives.topic_prediction
            outputs["image_topic_logits"] = self._topic_logits(image_pooled)
        return outputs


class DecomposedVLTransformer(_RetrievalModel):
    """VLDeformer: the joint transformer's own weights, run on one modality at a time."""

    config: JointConfig
    head: TowerHead

    def setup(self):
        self.joint = JointVLTransformer(self.config)
        self.make_heads()

    @property
    def text_width(self) -> int:
        return self.config.transformer.width

    image_width = text_width

    @property
    def image_transformer(self) -> TransformerConfig:
        return self.config.transformer

    @property
    def image_input(self) -> str:
        return self.config.image_input

    has_image_token = True  # the joint model's class token, or its image token before the regions

    def text_sequence(self, token_ids, text_mask, *, train=False):
        return self.joint.encode_text_sequence(token_ids, text_mask, train=train)

    def image_sequence(self, images, *, train=False):
        return self.joint.encode_image_sequence(images, train=train)

    def joint_forward(
        self, token_ids: jax.Array, text_mask: jax.Array, images: jax.Array, *, train: bool = False,
        mask_regions: jax.Array | None = None,
    ) -> dict[str, jax.Array]:
        """The undecomposed joint pass (ITM logits), on the same weights as the towers."""
        return self.joint(token_ids, text_mask, images, train=train, mask_regions=mask_regions)

    def initialize(
        self, images: jax.Array, token_ids: jax.Array, text_mask: jax.Array
    ) -> dict[str, jax.Array]:
        """Touches every parameter (towers and joint heads) so `init` creates them all."""
        self.joint_forward(token_ids, text_mask, images)
        return self(images, token_ids, text_mask)


class ImageTransformer(nn.Module):
    """A ViT (patch embeddings and a pre-LN encoder), or the same encoder over detector regions
    (`region_feature_dim` > 0: `regions.RegionEmbeddings`, padding regions masked out)."""

    transformer: TransformerConfig
    image_size: int
    patch_size: int
    embeddings: ImageEmbeddingConfig = ImageEmbeddingConfig()
    region_feature_dim: int = 0

    @nn.compact
    def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
        options = self.embeddings
        if self.region_feature_dim:
            x, mask = RegionEmbeddings(
                self.region_feature_dim, self.transformer.width, dropout=self.transformer.dropout,
                layer_norm_eps=options.layer_norm_eps, compute_dtype=self.transformer.compute_dtype,
                name="embeddings",
            )(images, train=train)
            return Encoder(self.transformer, name="encoder")(x, mask, train=train)
        x = PatchEmbeddings(
            self.image_size, self.patch_size, self.transformer.width, name="embeddings",
            patch_bias=options.patch_bias, class_token=options.class_token,
            layer_norm=options.layer_norm, layer_norm_eps=options.layer_norm_eps,
            compute_dtype=self.transformer.compute_dtype,
        )(images, train=train)
        mask = jnp.ones(x.shape[:2], jnp.int32)
        return Encoder(self.transformer, name="encoder")(x, mask, train=train)


class TextTransformer(nn.Module):
    """A text encoder: BERT-style embeddings and an encoder."""

    transformer: TransformerConfig
    vocab_size: int
    max_length: int
    embeddings: TextEmbeddingConfig = TextEmbeddingConfig()

    @nn.compact
    def __call__(self, token_ids: jax.Array, text_mask: jax.Array, *, train: bool = False):
        options = self.embeddings
        x = TextEmbeddings(
            self.vocab_size, self.transformer.width, self.max_length, name="embeddings",
            dropout=self.transformer.dropout, type_vocab_size=options.type_vocab_size,
            layer_norm=options.layer_norm, layer_norm_eps=options.layer_norm_eps,
        )(token_ids, train=train)
        return Encoder(self.transformer, name="encoder")(x, text_mask, train=train)


class DualEncoder(_RetrievalModel):
    """Two independent transformers (CLIP/MURAL style) behind the same tower interface."""

    image_transformer: TransformerConfig
    text_transformer: TransformerConfig
    vocab_size: int
    max_text_length: int
    image_size: int
    patch_size: int
    head: TowerHead
    text_embeddings: TextEmbeddingConfig = TextEmbeddingConfig()
    image_embeddings: ImageEmbeddingConfig = ImageEmbeddingConfig()
    # "regions": detector-region features of `region_feature_dim` (`regions.py`) instead of pixels.
    image_input: str = "patches"
    region_feature_dim: int = 0
    num_regions: int = 0

    def setup(self):
        self.image_encoder = ImageTransformer(
            self.image_transformer, self.image_size, self.patch_size, self.image_embeddings,
            region_feature_dim=self.region_feature_dim if self.image_input == "regions" else 0,
        )
        self.text_encoder = TextTransformer(
            self.text_transformer, self.vocab_size, self.max_text_length, self.text_embeddings
        )
        self.make_heads()

    @property
    def text_width(self) -> int:
        return self.text_transformer.width

    @property
    def image_width(self) -> int:
        return self.image_transformer.width

    @property
    def has_image_token(self) -> bool:
        return self.image_input == "regions" or self.image_embeddings.class_token

    def text_sequence(self, token_ids, text_mask, *, train=False):
        return self.text_encoder(token_ids, text_mask, train=train)

    def image_sequence(self, images, *, train=False):
        return self.image_encoder(images, train=train)

    def initialize(
        self, images: jax.Array, token_ids: jax.Array, text_mask: jax.Array
    ) -> dict[str, jax.Array]:
        return self(images, token_ids, text_mask)
