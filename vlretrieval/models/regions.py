"""Detector-region image inputs (Unicoder-VL, VinVL, UNITER, TERAN): region features plus box
geometry, in place of pixels.

A record's (and a batch's) `image` is then one float array per image, [regions, feature_dim + 7]:
`feature_dim` columns of the region's feature vector (a bottom-up-attention vector, 2,048-d in the
released COCO/Flickr30K features), five of its box (x1, y1, x2, y2 as fractions of the image's
width and height, and the box's area fraction), one flag (1 = a real region, 0 = padding) and its
class label (-1 when the detector gave none; what masked object classification predicts). Packing
the mask and labels into the one array keeps every batch path (sharding, the train step, the
evaluation galleries) unchanged: they move "images" whatever those are. Images with fewer regions
are padded; padding never changes an output (the attention and pooling masks drop it).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlretrieval.models.transformer import layer_norm

BOX_COLUMNS = 5  # x1, y1, x2, y2, area
EXTRA_COLUMNS = BOX_COLUMNS + 2  # + the valid flag and the label
NO_LABEL = -1
# Records store float16: half the disk of float32, and labels (integers) stay exact up to 2,048.
STORAGE_DTYPE = np.float16
MAX_LABEL = 2048


def packed_width(feature_dim: int) -> int:
    return feature_dim + EXTRA_COLUMNS


def pack_regions(features: np.ndarray, boxes: np.ndarray, num_regions: int, labels: np.ndarray | None = None,
                 dtype=STORAGE_DTYPE) -> np.ndarray:
    """[num_regions, feature_dim + 7]: `features` [r, feature_dim] with `boxes` [r, 4] (x1, y1, x2,
    y2 as fractions of the image size, clipped to [0, 1]) and optional integer `labels` [r], padded
    with zero rows flagged invalid. Raises ValueError for more than `num_regions` regions, boxes
    that are not 4 numbers per region, or labels out of range."""
    features = np.asarray(features, np.float32)
    boxes = np.clip(np.asarray(boxes, np.float32), 0.0, 1.0)
    if features.ndim != 2:
        raise ValueError(f"region features must be [regions, feature_dim], got shape {features.shape}")
    count, feature_dim = features.shape
    if count > num_regions:
        raise ValueError(f"{count} regions, more than the {num_regions} the model takes")
    if boxes.shape != (count, 4):
        raise ValueError(f"boxes must be [{count}, 4] (x1, y1, x2, y2), got shape {boxes.shape}")
    if labels is None:
        labels = np.full(count, NO_LABEL)
    labels = np.asarray(labels)
    if labels.shape != (count,) or (labels.size and (labels.min() < NO_LABEL or labels.max() >= MAX_LABEL)):
        raise ValueError(f"region labels must be {count} integers in [-1, {MAX_LABEL})")
    packed = np.zeros((num_regions, packed_width(feature_dim)), np.float32)
    packed[:count, :feature_dim] = features
    packed[:count, feature_dim:feature_dim + 4] = boxes
    area = np.maximum(boxes[:, 2] - boxes[:, 0], 0) * np.maximum(boxes[:, 3] - boxes[:, 1], 0)
    packed[:count, feature_dim + 4] = area
    packed[:count, feature_dim + 5] = 1.0
    packed[:, feature_dim + 6] = NO_LABEL
    packed[:count, feature_dim + 6] = labels
    return packed.astype(dtype)


def unpack_regions(packed):
    """(features [..., r, F], boxes [..., r, 5], mask [..., r] int32, labels [..., r] int32) of packed
    regions (numpy or jax arrays)."""
    xp = jnp if isinstance(packed, jax.Array) else np
    feature_dim = packed.shape[-1] - EXTRA_COLUMNS
    features = packed[..., :feature_dim]
    boxes = packed[..., feature_dim:feature_dim + BOX_COLUMNS]
    mask = (packed[..., feature_dim + 5] > 0.5).astype(xp.int32)
    labels = xp.round(packed[..., feature_dim + 6]).astype(xp.int32)
    return features, boxes, mask, labels


def is_packed_regions(value) -> bool:
    """A record's image that is packed regions (a 2-d float array), not pixels."""
    array = np.asarray(value) if not isinstance(value, (bytes, bytearray)) else None
    return array is not None and array.ndim == 2 and np.issubdtype(array.dtype, np.floating)


class RegionEmbeddings(nn.Module):
    """Region features projected to the model width, plus an embedding of the box (UNITER's form:
    LayerNorm(W_f f) + LayerNorm(W_b box), then a LayerNorm of the sum), behind a learned image
    token at position 0 (the class token `cls` pooling reads). Returns (embeddings
    [batch, 1 + regions, width], mask [batch, 1 + regions]); the image token is always valid.

    `mask_regions` (optional, [batch, regions] bool): regions whose features are zeroed before
    the projection, as masked region modelling hides them (their boxes stay visible)."""

    feature_dim: int
    width: int
    dropout: float = 0.0
    layer_norm_eps: float = 1e-12
    compute_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, packed: jax.Array, *, mask_regions: jax.Array | None = None,
                 train: bool = False) -> tuple[jax.Array, jax.Array]:
        if packed.ndim != 3 or packed.shape[-1] != packed_width(self.feature_dim):
            raise ValueError(
                f"region inputs are [batch, regions, feature_dim + {EXTRA_COLUMNS}] = [.., .., "
                f"{packed_width(self.feature_dim)}] for feature_dim {self.feature_dim}, got shape {packed.shape}"
            )
        features, boxes, mask, _ = unpack_regions(packed.astype(jnp.float32))
        if mask_regions is not None:
            features = jnp.where(mask_regions[..., None], 0.0, features)
        projected = nn.Dense(self.width, dtype=self.compute_dtype, name="feature_projection")(features)
        geometry = nn.Dense(self.width, name="box_projection")(boxes)
        x = (layer_norm(self.layer_norm_eps, "feature_norm")(projected.astype(jnp.float32))
             + layer_norm(self.layer_norm_eps, "box_norm")(geometry))
        x = layer_norm(self.layer_norm_eps, "norm")(x)
        batch = x.shape[0]
        token = self.param("image_token", nn.initializers.normal(stddev=0.02), (1, 1, self.width))
        x = jnp.concatenate([jnp.broadcast_to(token, (batch, 1, self.width)), x], axis=1)
        mask = jnp.concatenate([jnp.ones((batch, 1), jnp.int32), mask], axis=1)
        # Padding rows carry zeros; keep them exact zeros so no NaN/inf can come from them.
        x = jnp.where(mask[..., None] > 0, x, 0.0)
        return nn.Dropout(self.dropout)(x, deterministic=not train), mask
