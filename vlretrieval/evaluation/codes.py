"""Binary hash codes packed 32 bits to a uint32 word: what a code index stores and what
`search.top_k` / `search.rank_counts` take to rank by Hamming distance (uint32 inputs are codes).

Bit order: bit `i` of a K-bit code is bit `i % 32` (least significant first) of word `i // 32`,
so a code of K bits is `ceil(K / 32)` words. The padding bits of the last word are zero in every
code, queries and gallery alike, so their XOR is zero and they never count in a distance.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from vlretrieval.errors import UserError

WORD_BITS = 32
# Added to the distance of a padding row (`nearest_member_keys`): farther than any real code
# (real keys, distance << log2(group) | member, stay below 2^24, exact as float32), and no
# overflow once shifted by a group of up to 64 rows.
_FAR = 1 << 24


def words_per_item(bits: int) -> int:
    """uint32 words that hold a code of `bits` bits."""
    return -(-bits // WORD_BITS)


def bytes_per_item(bits: int) -> int:
    """Bytes a packed code of `bits` bits takes in an index (whole words: 64 bits are 8 bytes)."""
    if bits < 1:
        raise ValueError(f"a code has 1 bit or more, not {bits}")
    return 4 * words_per_item(bits)


def check_code_bits(bits) -> int:
    """`bits` if it is a code length a hashing head and a code index accept (a positive multiple
    of 8, so that a code is whole bytes), else a one-line `UserError`."""
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or bits < 8 or bits % 8:
        raise UserError(f"code length {bits!r} bits is not a positive multiple of 8: use 16, 32, 64 or 128")
    return int(bits)


def pack_codes(x) -> np.ndarray:
    """[N, K] float embeddings (bit = the coordinate >= 0, as `metrics.binary_codes` gives +1) or
    booleans to [N, ceil(K / 32)] uint32 words (the module's bit order, padding bits zero)."""
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] < 1:
        raise ValueError(f"codes to pack are [items, bits], not {x.shape}")
    bits = x if x.dtype == np.bool_ else x >= 0
    # packbits little-endian: bit i -> byte i // 8, bit i % 8; the bytes, zero-padded to whole
    # words and read as little-endian uint32, put bit i at word i // 32, bit i % 32.
    packed = np.packbits(bits, axis=1, bitorder="little")
    words = words_per_item(x.shape[1])
    padded = np.zeros((len(x), 4 * words), np.uint8)
    padded[:, : packed.shape[1]] = packed
    return padded.view("<u4").astype(np.uint32)


def unpack_codes(words, bits: int) -> np.ndarray:
    """[N, W] uint32 words back to [N, bits] booleans (the inverse of `pack_codes` on booleans)."""
    words = np.asarray(words)
    if words.dtype != np.uint32 or words.ndim != 2 or words.shape[1] != words_per_item(bits):
        raise ValueError(f"{bits}-bit codes are [items, {words_per_item(bits)}] uint32, "
                         f"not {words.shape} {words.dtype}")
    as_bytes = words.astype("<u4").view(np.uint8)
    return np.unpackbits(as_bytes, axis=1, count=bits, bitorder="little").astype(bool)


# On the device (inside `search`'s jitted loops). A gallery of codes is there word-major,
# [words, rows]: each word contiguous over the rows, so that XLA's CPU emitter vectorises the
# XOR and population count over rows (row-major [rows, words] codes ran scalar, ~5x slower).


def hamming_distances(queries: jax.Array, words: jax.Array) -> jax.Array:
    """[q, words] codes x [words, m] word-major codes -> [q, m] uint32 Hamming distances."""
    distance = lax.population_count(queries[:, 0, None] ^ words[None, 0, :])
    for word in range(1, words.shape[0]):
        distance = distance + lax.population_count(queries[:, word, None] ^ words[None, word, :])
    return distance


def hamming_distances_each(queries: jax.Array, words: jax.Array) -> jax.Array:
    """[q, words] x [words, ..., q, m] (each query its own codes) -> [..., q, m] uint32 distances."""
    distance = lax.population_count(queries[:, 0, None] ^ words[0])
    for word in range(1, words.shape[0]):
        distance = distance + lax.population_count(queries[:, word, None] ^ words[word])
    return distance


def nearest_member_keys(queries: jax.Array, words: jax.Array, real: jax.Array) -> jax.Array:
    """[q, words] x [words, group, groups] codes (member m of every group) -> [q, groups] uint32
    keys, smallest first: each group's nearest distance, then the lowest member at it
    (`distance << log2(group) | member`); rows where `real` ([group, groups]) is false count as
    farther than any code. Unrolled over members and words: one vectorised elementwise pass that
    writes only the keys, never a [q, rows] block (an XLA reduce here ran 2-4x slower; a body much
    over ~200 popcounts stops vectorising, hence `search`'s cap on group x words)."""
    group = words.shape[1]
    shift = group.bit_length() - 1
    penalty = jnp.where(real, jnp.uint32(0), jnp.uint32(_FAR))
    best = None
    for member in range(group):
        distance = penalty[None, member, :]
        for word in range(words.shape[0]):
            distance = distance + lax.population_count(queries[:, word, None] ^ words[None, word, member, :])
        key = (distance << shift) | jnp.uint32(member)
        best = key if best is None else jnp.minimum(best, key)
    return best


def model_code_encoders(model, params):
    """(images -> [N, bits] signs, (ids, mask) -> [N, bits] signs, bits, source) of a model's
    towers, jitted with the parameters: its hashing head's bits where it has one
    (`head.hash_bits`, source `hash_head`), else the signs of its float embeddings (`sign`, one bit
    a dimension). `pack_codes` packs either."""
    head_bits = getattr(model.head, "hash_bits", 0)
    if head_bits:
        image, text, source = model.encode_image_codes, model.encode_text_codes, "hash_head"
    else:
        image, text, source = model.encode_image, model.encode_text, "sign"
    bits = head_bits or model.head.embed_dim
    check_code_bits(bits)
    encode_image = jax.jit(lambda p, images: model.apply({"params": p}, images, method=image))
    encode_text = jax.jit(lambda p, ids, mask: model.apply({"params": p}, ids, mask, method=text))
    image_codes = lambda images: encode_image(params, images)
    text_codes = lambda ids, mask: encode_text(params, ids, mask)
    return image_codes, text_codes, bits, source
