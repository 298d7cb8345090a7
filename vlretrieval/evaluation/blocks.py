"""Candidate selection inside one gallery block of `search.py`: the few columns of a block of
scores that can hold its top k (`block_candidates`), and the same for packed binary codes without
ever writing a block of scores (`code_candidates`). Both keep ties to the lower gallery index.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from vlretrieval.evaluation import codes


def group_size(columns: int, k: int) -> int:
    """Columns per group: about sqrt(columns / k), so that the two selections below (one over the
    columns / group maxima, one over the k x group candidates) are both small; a power of two
    (blocks of 1,024 rows or more are multiples of 128), at most 128."""
    group = 1
    while group < 128 and (2 * group) ** 2 * k <= columns and columns % (2 * group) == 0:
        group *= 2
    return group


def sort_few(index: jax.Array) -> jax.Array:
    """[rows, k] distinct integers sorted ascending, by ranks: k x k compares that XLA fuses, where
    a sort of k = 10 per row is a slow call on the CPU."""
    k = index.shape[1]
    rank = jnp.sum(index[:, None, :] < index[:, :, None], axis=2)  # how many are smaller
    slot = rank[:, :, None] == jnp.arange(k)[None, None, :]
    return jnp.sum(jnp.where(slot, index[:, :, None], 0), axis=1)


def block_candidates(scores: jax.Array, k: int):
    """([q, m] scores, [q, m] columns) in column order, m <= columns, that hold the block's top k.

    A full `lax.top_k` over a wide block is a slow row-by-row partial sort on the CPU; this needs
    only a vectorised max over groups of consecutive columns and a top k of those maxima: the k
    best elements lie in the k groups with the highest maxima (equal maxima: lower group first).
    For an element of an unchosen group, each chosen group holds its maximum, which beats it: a
    higher score, or an equal one at a lower column (lower group, and the group's first maximum).
    The chosen groups are put back in column order, so equal scores still go to the lower index."""
    rows, columns = scores.shape
    group = group_size(columns, k)
    if group < 8:  # a narrow block: its columns are the candidates
        return scores, jnp.broadcast_to(jnp.arange(columns, dtype=jnp.int32), scores.shape)
    grouped = scores.reshape(rows, columns // group, group)
    chosen = sort_few(lax.top_k(jnp.max(grouped, axis=2), k)[1])  # [rows, k] groups, column order
    candidates = jnp.take_along_axis(grouped, chosen[:, :, None], axis=1).reshape(rows, k * group)
    column = chosen[:, :, None] * group + jnp.arange(group, dtype=jnp.int32)
    return candidates, column.reshape(rows, k * group)


def code_group_size(columns: int, k: int, words: int) -> int:
    """`group_size` for codes, halved until a group's pass stays one vectorised loop on the CPU
    (group x (words + 1) <= 192, at most 64: measured, 64-bit codes in groups of 64 run 0.16 ns
    a distance, in groups of 128 1.3 ns)."""
    group = group_size(columns, k)
    while group > 1 and (group > 64 or group * (words + 1) > 192):
        group //= 2
    return group


def code_candidates(queries: jax.Array, words: jax.Array, real: jax.Array, k: int, group: int):
    """`block_candidates` for codes ([words, rows] in the block), without a block of scores: a
    Hamming distance is a few integer ops, cheaper to compute twice than to write out and read
    back. Group g holds the rows m x groups + g (member m < group): strided, so that a member's
    codes are contiguous over the groups and one pass (`codes.nearest_member_keys`) finds each
    group's key: its best distance, then the member of its first row at it. The k groups with the
    lowest keys (equal keys: lower g) are chosen, and their rows' distances computed again.
    For an element of an unchosen group, the first best row of each chosen group beats it: a lower
    distance, or an equal one at a lower row (a lower member, or the same member of a lower group).
    Candidates come member-major, chosen groups ascending: row order, for the merge's ties."""
    groups = words.shape[1] // group
    strided = words.reshape(words.shape[0], group, groups)
    real = real.reshape(group, groups)
    keys = codes.nearest_member_keys(queries, strided, real)  # [q, groups]
    # As float32: exact for real rows' keys (below 2^24), and lax.top_k on int32 ran 40x slower.
    chosen = sort_few(lax.top_k(-keys.astype(jnp.float32), k)[1])  # [q, k] groups, ascending
    distance = codes.hamming_distances_each(queries, jnp.take(strided, chosen, axis=2))  # [group, q, k]
    scores = jnp.where(real[:, chosen], -distance.astype(jnp.float32), -jnp.inf)
    row = jnp.arange(group, dtype=jnp.int32)[:, None, None] * groups + chosen[None]
    scores, row = (jnp.swapaxes(x, 0, 1).reshape(len(queries), group * k) for x in (scores, row))
    return scores, row
