"""Label-supervised similarity losses (the IDCMR terms, `objectives/label_terms.py`): pure
functions of L2-normalised embeddings and multi-hot category labels, no collectives.

Two items are *similar* (S = 1) when they share at least one category, else S = 0. The pairwise
negative log-likelihood of S under p = sigmoid(Γ), Γ = scale x cosine (DSCMR's and DCMH's form;
DSCMR's scale is 1/2): log(1 + e^Γ) - S Γ. The `*_rows` function scores a block of rows against
columns (row r is column `first_row + r`), which is how `parallel/cross_device.py` scores each
device's rows against the gathered global batch; the full-batch functions are part of `losses`'
`TowerLosses`. The formulas and what is the paper's: docs/labels.md.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def shares_a_category(row_labels: jax.Array, column_labels: jax.Array) -> jax.Array:
    """[rows, columns] float32: 1 where the two multi-hot label rows overlap."""
    overlap = row_labels.astype(jnp.float32) @ column_labels.astype(jnp.float32).T
    return (overlap > 0).astype(jnp.float32)


def pairwise_likelihood_rows(
    rows: jax.Array,
    columns: jax.Array,
    row_labels: jax.Array,
    column_labels: jax.Array,
    scale: jax.Array | float,
    first_row: jax.Array | int = 0,
    exclude_self: bool = False,
) -> jax.Array:
    """Sum over the block's pairs of log(1 + e^Γ) - S Γ, Γ = scale x rows . columns. Row r is
    column `first_row + r`; `exclude_self` leaves that pair out (an intra-modal block: an item's
    cosine to itself is 1 whatever the model, a constant without gradient)."""
    logits = scale * (rows.astype(jnp.float32) @ columns.astype(jnp.float32).T)
    similar = shares_a_category(row_labels, column_labels)
    nll = jax.nn.softplus(logits) - similar * logits
    if exclude_self:
        own = jnp.arange(columns.shape[0])[None, :] == first_row + jnp.arange(rows.shape[0])[:, None]
        nll = jnp.where(own, 0.0, nll)
    return jnp.sum(nll)


def modality_gap(image_embeddings: jax.Array, text_embeddings: jax.Array) -> jax.Array:
    """mean_i ||u_i - v_i||^2 over the paired embeddings (= 2 - 2 cos for unit vectors)."""
    difference = image_embeddings.astype(jnp.float32) - text_embeddings.astype(jnp.float32)
    return jnp.mean(jnp.sum(jnp.square(difference), axis=-1))


# The full-batch forms (part of `losses`' `TowerLosses`).


def label_intra_modal_loss(
    image_embeddings: jax.Array, text_embeddings: jax.Array, labels: jax.Array, scale: jax.Array | float
) -> jax.Array:
    """Within each tower: the mean pairwise NLL over the B(B - 1) ordered pairs of distinct items
    of the batch (images with images, texts with texts), summed over the two towers."""
    rows = image_embeddings.shape[0]
    pairs = max(rows * (rows - 1), 1)
    total = sum(pairwise_likelihood_rows(x, x, labels, labels, scale, exclude_self=True)
                for x in (image_embeddings, text_embeddings))
    return total / pairs


def label_inter_modal_loss(
    image_embeddings: jax.Array,
    text_embeddings: jax.Array,
    labels: jax.Array,
    scale: jax.Array | float,
    modality_invariance: jax.Array | float = 1.0,
) -> jax.Array:
    """Across the towers: the mean pairwise NLL over the B x B image-text pairs (image i against
    text j, similar when their examples share a category; the text x image matrix is its
    transpose, the same terms), plus `modality_invariance` x `modality_gap` of the paired rows."""
    rows = image_embeddings.shape[0]
    cross = pairwise_likelihood_rows(image_embeddings, text_embeddings, labels, labels, scale) / (rows * rows)
    return cross + modality_invariance * modality_gap(image_embeddings, text_embeddings)
