"""Composed and sampled hard negatives are really negatives, of the kind the config asks for."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlretrieval.data.builders.captions import WORD_FORMS
from vlretrieval.negatives import (
    ContentWordSwapper,
    TextNegativeComposer,
    mix_patches,
    sample_by_similarity,
)
from vlretrieval.objectives import mask_tokens

CAPTIONS = {
    "en": "A small red circle is to the left of a large blue square.",
    "de": "Ein kleiner roter Kreis ist links von einem großen blauen Quadrat.",
    "fr": "Un petit cercle rouge à gauche d'un grand carré bleu.",
    "es": "Un círculo rojo pequeño a la izquierda de un cuadrado azul grande.",
}


@pytest.mark.parametrize("language", sorted(CAPTIONS))
def test_swapped_words_are_of_the_same_kind_and_differ(language):
    swapper = ContentWordSwapper(WORD_FORMS[language])
    caption = CAPTIONS[language]
    original = swapper.content_words(caption)
    assert len(original) == 7  # 2 sizes, 2 colours, 2 shapes, 1 relation
    rng = np.random.default_rng(0)
    for _ in range(50):
        negative, replaced = swapper.swap(caption, 0.3, rng)
        assert replaced == 2  # round(0.3 x 7)
        assert negative != caption
        swapped = swapper.content_words(negative)
        assert len(swapped) == len(original)
        changed = [(a, b) for a, b in zip(original, swapped) if a[3] != b[3]]
        assert len(changed) == replaced
        for before, after in changed:
            assert before[2] == after[2]  # same kind: colour for colour, shape for shape...
            assert before[3] != after[3]  # a different value


def test_german_replacements_keep_the_inflection():
    swapper = ContentWordSwapper(WORD_FORMS["de"])
    rng = np.random.default_rng(1)
    for _ in range(30):
        negative, _ = swapper.swap("Ein roter Kreis.", 1.0, rng)
        colour = negative.split()[1]
        assert colour.endswith("er"), negative


def test_fraction_one_replaces_every_content_word_and_none_without_content_words():
    swapper = ContentWordSwapper(WORD_FORMS["en"])
    negative, replaced = swapper.swap(CAPTIONS["en"], 1.0, np.random.default_rng(0))
    assert replaced == 7
    assert swapper.content_words(negative) and negative != CAPTIONS["en"]
    assert swapper.swap("Nothing to see here.", 0.5, np.random.default_rng(0)) == ("Nothing to see here.", 0)
    composer = TextNegativeComposer(WORD_FORMS, 0.3)
    assert composer("Nothing to see here.", "en", np.random.default_rng(0))[1] is False


def test_mixed_images_differ_in_the_configured_fraction_of_patches():
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(6, 32, 32, 3)), jnp.float32)
    patch = 8
    mixed, mask = mix_patches(images, jax.random.PRNGKey(3), patch, fraction=0.5)
    assert mask.shape == (6, 4, 4)
    np.testing.assert_array_equal(np.asarray(mask).reshape(6, -1).sum(axis=1), 8)
    to_patches = lambda x: np.asarray(x).reshape(6, 4, patch, 4, patch, 3).transpose(0, 1, 3, 2, 4, 5)
    mixed_patches, own, donor = to_patches(mixed), to_patches(images), to_patches(jnp.roll(images, -1, 0))
    for i in range(6):
        for r in range(4):
            for c in range(4):
                expected = donor[i, r, c] if mask[i, r, c] else own[i, r, c]
                np.testing.assert_array_equal(mixed_patches[i, r, c], expected)
    differing = (np.abs(mixed_patches - own).reshape(6, 16, -1).max(axis=2) > 0).sum(axis=1)
    np.testing.assert_array_equal(differing, 8)


def test_similarity_sampling_never_picks_the_positive_and_follows_the_similarity():
    similarity = jnp.array(
        [[9.0, 3.0, 0.0, 0.0], [0.0, 9.0, 0.0, 3.0], [3.0, 0.0, 9.0, 0.0], [0.0, 0.0, 3.0, 9.0]]
    )
    draws = jax.vmap(lambda key: sample_by_similarity(key, similarity))(
        jax.random.split(jax.random.PRNGKey(0), 4000)
    )
    draws = np.asarray(draws)
    assert not (draws == np.arange(4)).any()
    hard = np.array([1, 3, 0, 2])  # each row's most similar negative
    expected = np.exp(3.0) / (np.exp(3.0) + 2.0)
    np.testing.assert_allclose((draws == hard).mean(axis=0), expected, atol=0.03)


def test_masking_never_touches_special_tokens_or_padding():
    token_ids = jnp.array([[2, 10, 11, 12, 13, 3, 0, 0], [2, 20, 21, 3, 0, 0, 0, 0]] * 200)
    text_mask = (token_ids > 0).astype(jnp.int32)
    masked, chosen = mask_tokens(
        jax.random.PRNGKey(0), token_ids, text_mask, mask_id=4, vocab_size=50, probability=0.5
    )
    chosen = np.asarray(chosen)
    assert not chosen[:, 0].any()  # [CLS]
    assert not chosen[0::2, 5].any() and not chosen[1::2, 3].any()  # [SEP]
    assert not chosen[np.asarray(text_mask) == 0].any()
    np.testing.assert_allclose(chosen[0::2, 1:5].mean(), 0.5, atol=0.05)
    changed = np.asarray(masked) != np.asarray(token_ids)
    assert not changed[~chosen].any()
    np.testing.assert_allclose((np.asarray(masked)[chosen] == 4).mean(), 0.8, atol=0.05)
