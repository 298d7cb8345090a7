"""Similarity-structure losses: a student matching a frozen teacher's similarity matrices
(distillation), and binary codes matching similarities (hashing, JOG's joint teaching).

Pure functions of embeddings and codes, no collectives, as `losses.py`: the `*_rows` functions
score a block of rows against columns (row r is column `first_row + r`), which is how
`parallel/cross_device.py` scores each device's rows against the gathered global batch; the
full-batch functions are part of `losses`' `TowerLosses`. The formulas: docs/hashing.md.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# The logit of a row's own column in an intra-modal matrix: excluded from both softmaxes.
_EXCLUDED = -1e9


def similarity_kl_rows(
    student_rows: jax.Array,
    student_columns: jax.Array,
    teacher_rows: jax.Array,
    teacher_columns: jax.Array,
    temperature: jax.Array | float,
    first_row: jax.Array | int = 0,
    exclude_self: bool = False,
) -> jax.Array:
    """Sum over the rows of KL(teacher row || student row), each row a softmax over the columns of
    its cosine similarities / `temperature` (the same temperature for both). Row r is item
    `first_row + r` of the columns; `exclude_self` leaves that column out of both softmaxes (an
    intra-modal matrix, where an item's similarity to itself says nothing). The teacher's rows
    are targets: no gradient flows into them."""
    student_logits = student_rows @ student_columns.T / temperature
    teacher_logits = jax.lax.stop_gradient(teacher_rows @ teacher_columns.T / temperature)
    own = jnp.zeros(student_logits.shape, bool)
    if exclude_self:
        columns = jnp.arange(student_columns.shape[0])[None, :]
        own = columns == first_row + jnp.arange(student_rows.shape[0])[:, None]
        student_logits = jnp.where(own, _EXCLUDED, student_logits)
        teacher_logits = jnp.where(own, _EXCLUDED, teacher_logits)
    teacher_log_p = jax.nn.log_softmax(teacher_logits, axis=1)
    student_log_p = jax.nn.log_softmax(student_logits, axis=1)
    kl = jnp.where(own, 0.0, jnp.exp(teacher_log_p) * (teacher_log_p - student_log_p))
    return jnp.sum(kl)


def refined_similarity(
    teacher: jax.Array, student: jax.Array, peer: jax.Array, refinement: jax.Array | float
) -> jax.Array:
    """Joint teaching's target (our agreement-weighted variant, docs/hashing.md): where the two
    students' code similarities agree (agreement g = 1 - |S_student - S_peer| / 2, in [0, 1]),
    the teacher's similarity moves towards their mean by `refinement` x g:
    S* = (1 - a g) S_teacher + a g (S_student + S_peer) / 2. Elementwise; all in [-1, 1]."""
    agreement = 1.0 - jnp.abs(student - peer) / 2.0
    weight = refinement * agreement
    return (1.0 - weight) * teacher + weight * (student + peer) / 2.0


def hash_similarity_rows(
    code_rows: jax.Array,
    code_columns: jax.Array,
    target_rows: jax.Array,
    target_columns: jax.Array,
    peer_rows: jax.Array | None = None,
    peer_columns: jax.Array | None = None,
    refinement: jax.Array | float = 0.0,
) -> jax.Array:
    """Sum over a block of pairs of the squared error between the relaxed codes' similarity
    b_i . b_j / K (codes in [-1, 1]^K) and the target cosine similarity t_i . t_j (L2-normalised
    targets, no gradient). With a peer student's codes, both students' errors against the
    `refined_similarity` target (the students' similarities enter it without gradient)."""
    bits = code_rows.shape[-1]
    target = jax.lax.stop_gradient(target_rows @ target_columns.T)
    student = code_rows @ code_columns.T / bits
    if peer_rows is None:
        return jnp.sum(jnp.square(student - target))
    peer = peer_rows @ peer_columns.T / bits
    refined = jax.lax.stop_gradient(refined_similarity(target, student, peer, refinement))
    return jnp.sum(jnp.square(student - refined)) + jnp.sum(jnp.square(peer - refined))


def quantization_loss(*hash_logits: jax.Array) -> jax.Array:
    """Mean over the given arrays (towers, students) of mean_{items, bits} (1 - |tanh(h)|)^2:
    0 when every relaxed bit is at +-1, the codes' signs then lose nothing."""
    return sum(jnp.mean(jnp.square(1.0 - jnp.abs(jnp.tanh(h)))) for h in hash_logits) / len(hash_logits)


# The full-batch forms (part of `losses`' `TowerLosses`).


def similarity_distillation_loss(
    image_embeddings: jax.Array,
    text_embeddings: jax.Array,
    teacher_image_embeddings: jax.Array | None,
    teacher_text_embeddings: jax.Array | None,
    temperature: jax.Array | float,
    image_text: float = 1.0,
    image_image: float = 1.0,
    text_text: float = 1.0,
) -> jax.Array:
    """Similarity-structure distillation over the batch (B items; see `similarity_kl_rows`):
    image_text x (KL_i->t + KL_t->i) / 2 + image_image x KL_i->i + text_text x KL_t->t, each KL
    the mean over the B rows; the intra-modal rows leave the item itself out. A matrix whose
    weight is 0 is not computed (its teacher embeddings may be None)."""
    rows = image_embeddings.shape[0]
    total = 0.0
    if image_text:
        both = (similarity_kl_rows(image_embeddings, text_embeddings, teacher_image_embeddings, teacher_text_embeddings,
                                   temperature)
                + similarity_kl_rows(text_embeddings, image_embeddings, teacher_text_embeddings,
                                     teacher_image_embeddings, temperature))
        total += image_text * both / (2 * rows)
    if image_image:
        total += image_image * similarity_kl_rows(image_embeddings, image_embeddings, teacher_image_embeddings,
                                                  teacher_image_embeddings, temperature, exclude_self=True) / rows
    if text_text:
        total += text_text * similarity_kl_rows(text_embeddings, text_embeddings, teacher_text_embeddings,
                                                teacher_text_embeddings, temperature, exclude_self=True) / rows
    return jnp.asarray(total, jnp.float32)


def hash_similarity_loss(
    image_codes: jax.Array,
    text_codes: jax.Array,
    target_images: jax.Array | None,
    target_texts: jax.Array | None,
    peer_image_codes: jax.Array | None = None,
    peer_text_codes: jax.Array | None = None,
    refinement: jax.Array | float = 0.0,
    image_text: float = 1.0,
    image_image: float = 1.0,
    text_text: float = 1.0,
) -> jax.Array:
    """Similarity-preserving hashing over the batch (see `hash_similarity_rows`): image_text x E_it
    + image_image x E_ii + text_text x E_tt, each E the mean over the B x B pairs of the squared
    error (summed over the two students with joint teaching). E_ti is E_it transposed, so the
    cross-modal matrix counts once."""
    pairs = image_codes.shape[0] ** 2
    total = 0.0
    for weight, rows, columns, target_rows, target_columns, peer_rows, peer_columns in (
        (image_text, image_codes, text_codes, target_images, target_texts, peer_image_codes, peer_text_codes),
        (image_image, image_codes, image_codes, target_images, target_images, peer_image_codes, peer_image_codes),
        (text_text, text_codes, text_codes, target_texts, target_texts, peer_text_codes, peer_text_codes),
    ):
        if weight:
            total += weight * hash_similarity_rows(
                rows, columns, target_rows, target_columns, peer_rows, peer_columns, refinement
            ) / pairs
    return jnp.asarray(total, jnp.float32)
