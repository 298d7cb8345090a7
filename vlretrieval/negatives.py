"""Hard negatives: composed from the positive pair (VLDeformer's bimodal negatives) or mined.

- `swap_content_words` (host side, in the input pipeline): a caption with some of its content
  words (colour, shape, size, relation...) replaced by other words of the same kind, so it no
  longer describes its image.
- `mix_patches` (device side, in the step): an image whose patches are partly replaced by the
  patches of another image of the batch.
- `sample_by_similarity` (device side): for ITM, each row's negative drawn from the batch in
  proportion to its contrastive similarity: hard, not random.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# Words (letters of any script, with inner hyphens or apostrophes) and the text between them.
_WORD = re.compile(r"\w+(?:[-']\w+)*", re.UNICODE)


class ContentWordSwapper:
    """Replaces content words of a caption with other values of the same kind.

    `word_forms[kind][value]` lists the surface forms of one value (e.g. German "rote", "roter",
    ... for red). A replacement is a form of a *different* value of the same kind, picked to share
    the longest ending with the original, so inflected languages stay grammatical
    ("roter" -> "blauer", not "blaue").
    """

    def __init__(self, word_forms: Mapping[str, Mapping[str, Sequence[str]]]):
        self._lookup: dict[str, tuple[str, str]] = {}  # lowercase form -> (kind, value)
        self._forms = {kind: {value: tuple(forms) for value, forms in values.items()}
                       for kind, values in word_forms.items()}
        for kind, values in self._forms.items():
            for value, forms in values.items():
                for form in forms:
                    self._lookup[form.lower()] = (kind, value)

    def content_words(self, caption: str) -> list[tuple[int, int, str, str]]:
        """(start, end, kind, value) of every content word in the caption."""
        found = []
        for match in _WORD.finditer(caption):
            entry = self._lookup.get(match.group().lower())
            if entry is not None:
                found.append((match.start(), match.end(), *entry))
        return found

    def _replacement(self, word: str, kind: str, value: str, rng: np.random.Generator) -> str:
        others = [v for v in self._forms[kind] if v != value]
        new_value = others[rng.integers(len(others))]
        lowered = word.lower()

        def shared_ending(form: str) -> int:
            length = 0
            while length < min(len(form), len(lowered)) and form[-1 - length] == lowered[-1 - length]:
                length += 1
            return length

        forms = self._forms[kind][new_value]
        best = max(forms, key=lambda form: (shared_ending(form.lower()), -abs(len(form) - len(word))))
        return best[0].upper() + best[1:] if word[0].isupper() else best

    def swap(self, caption: str, fraction: float, rng: np.random.Generator) -> tuple[str, int]:
        """The caption with round(fraction x its content words) of them (at least one) replaced.

        Returns (negative caption, number of words replaced); 0 when it has no content word, in
        which case the caption comes back unchanged and must not be used as a negative.
        """
        words = self.content_words(caption)
        if not words:
            return caption, 0
        count = min(len(words), max(1, int(round(fraction * len(words)))))
        chosen = sorted(rng.choice(len(words), size=count, replace=False))
        pieces, position = [], 0
        for index in chosen:
            start, end, kind, value = words[index]
            pieces += [caption[position:start], self._replacement(caption[start:end], kind, value, rng)]
            position = end
        pieces.append(caption[position:])
        return "".join(pieces), count


def patch_mixing_mask(
    rng: jax.Array, batch_size: int, grid: int, fraction: float
) -> jax.Array:
    """[batch, grid, grid] bool: exactly round(fraction x grid^2) patches per example are True."""
    num_patches = grid * grid
    count = int(round(fraction * num_patches))
    scores = jax.random.uniform(rng, (batch_size, num_patches))
    # The `count` smallest scores of each row: a uniformly random subset of that size.
    ranks = jnp.argsort(jnp.argsort(scores, axis=1), axis=1)
    return (ranks < count).reshape(batch_size, grid, grid)


def mix_patches(
    images: jax.Array, rng: jax.Array, patch_size: int, fraction: float
) -> tuple[jax.Array, jax.Array]:
    """Negative images: each image with `fraction` of its patches taken from the next image.

    The donor of image i is image i+1 of the (global) batch, so it is always another image.
    Returns (mixed images, [batch, grid, grid] mask of replaced patches).
    """
    batch, height, width, channels = images.shape
    grid = height // patch_size
    mask = patch_mixing_mask(rng, batch, grid, fraction)
    pixel_mask = jnp.repeat(jnp.repeat(mask, patch_size, axis=1), patch_size, axis=2)[..., None]
    donors = jnp.roll(images, shift=-1, axis=0)
    return jnp.where(pixel_mask, donors, images), mask


def sample_by_similarity(rng: jax.Array, similarity: jax.Array) -> jax.Array:
    """For each row, a column index != the row drawn with probability softmax(similarity row)."""
    negative = jnp.arange(similarity.shape[1])[None, :] != jnp.arange(similarity.shape[0])[:, None]
    return jax.random.categorical(rng, jnp.where(negative, similarity, -jnp.inf), axis=1)


class TextNegativeComposer:
    """Per-language `ContentWordSwapper`s: `(caption, language, rng) -> (negative, valid)`."""

    def __init__(
        self, word_forms_by_language: Mapping[str, Mapping[str, Mapping[str, Sequence[str]]]],
        fraction: float,
    ):
        self.swappers = {lang: ContentWordSwapper(forms) for lang, forms in word_forms_by_language.items()}
        self.fraction = fraction

    def __call__(self, caption: str, language: str, rng: np.random.Generator) -> tuple[str, bool]:
        negative, replaced = self.swappers[language].swap(caption, self.fraction, rng)
        return negative, replaced > 0
