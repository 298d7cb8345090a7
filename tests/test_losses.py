"""Loss math against hand computations: extra composed-negative columns, reweighting, VSE++."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlretrieval import losses


def _unit(x):
    x = np.asarray(x, np.float32)
    return jnp.asarray(x / np.linalg.norm(x, axis=-1, keepdims=True))


RNG = np.random.default_rng(0)
IMAGES, TEXTS = _unit(RNG.normal(size=(5, 8))), _unit(RNG.normal(size=(5, 8)))
NEG_TEXTS, NEG_IMAGES = _unit(RNG.normal(size=(5, 8))), _unit(RNG.normal(size=(5, 8)))
SCALE = 10.0


def _reference_infonce(logits):
    logits = np.asarray(logits, np.float64)
    log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return -np.mean(np.diagonal(log_probs[:, : logits.shape[0]]))


def test_every_composed_negative_is_a_column_for_every_row():
    valid = jnp.array([1, 0, 1, 1, 0])
    loss, _ = losses.softmax_contrastive_loss(
        IMAGES, TEXTS, SCALE, extra_text_negatives=NEG_TEXTS, extra_image_negatives=NEG_IMAGES,
        extra_text_valid=valid,
    )
    sim = np.asarray(IMAGES @ TEXTS.T) * SCALE
    # Absent composed texts (valid 0) are no column at all.
    i2t = np.concatenate([sim, SCALE * np.asarray(IMAGES @ NEG_TEXTS.T)[:, [0, 2, 3]]], axis=1)
    t2i = np.concatenate([sim.T, SCALE * np.asarray(TEXTS @ NEG_IMAGES.T)], axis=1)
    expected = (_reference_infonce(i2t) + _reference_infonce(t2i)) / 2
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


def test_hinge_top_k_averages_the_k_largest_violations():
    margin = 0.2
    loss = losses.hardest_negative_hinge_loss(IMAGES, TEXTS, margin, top_k=2)
    sim = np.asarray(IMAGES @ TEXTS.T, np.float64)
    off = ~np.eye(5, dtype=bool)

    def direction(s):
        violations = np.where(off, np.maximum(margin + s - np.diagonal(s)[:, None], 0), 0)
        return np.sort(violations, axis=1)[:, -2:].mean(axis=1).mean()

    np.testing.assert_allclose(float(loss), (direction(sim) + direction(sim.T)) / 2, rtol=1e-5)


def test_absent_composed_negatives_change_nothing():
    plain, _ = losses.softmax_contrastive_loss(IMAGES, TEXTS, SCALE)
    absent, _ = losses.softmax_contrastive_loss(
        IMAGES, TEXTS, SCALE, extra_text_negatives=NEG_TEXTS, extra_text_valid=jnp.zeros(5)
    )
    np.testing.assert_allclose(float(absent), float(plain), rtol=1e-6)


def test_reweighted_with_beta_zero_is_infonce_and_beta_up_weights_hard_negatives():
    plain, _ = losses.softmax_contrastive_loss(IMAGES, TEXTS, SCALE)
    beta_zero = losses.reweighted_contrastive_loss(IMAGES, TEXTS, SCALE, beta=0.0)
    np.testing.assert_allclose(float(beta_zero), float(plain), rtol=1e-5)
    # Positive scores high; every negative is harder under a larger beta, so the loss grows.
    values = [float(losses.reweighted_contrastive_loss(IMAGES, TEXTS, SCALE, beta=b)) for b in (0, 2, 8)]
    assert values[0] < values[1] < values[2]
    # Gradients flow through the similarities, not the (stop-gradient) weights: finite.
    grad = jax.grad(lambda t: losses.reweighted_contrastive_loss(IMAGES, t, SCALE, beta=4.0))(TEXTS)
    assert np.isfinite(np.asarray(grad)).all()


def test_hardest_negative_hinge_matches_vse_plus_plus():
    margin = 0.2
    loss = losses.hardest_negative_hinge_loss(IMAGES, TEXTS, margin)
    sim = np.asarray(IMAGES @ TEXTS.T, np.float64)
    positive = np.diagonal(sim)
    off = ~np.eye(5, dtype=bool)
    i2t = np.max(np.where(off, np.maximum(margin + sim - positive[:, None], 0), 0), axis=1).mean()
    t2i = np.max(np.where(off, np.maximum(margin + sim - positive[None, :], 0), 0), axis=0).mean()
    np.testing.assert_allclose(float(loss), (i2t + t2i) / 2, rtol=1e-5)


def test_matching_and_mlm_losses():
    logits = jnp.array([[0.0, 5.0], [5.0, 0.0], [0.0, 5.0]])
    loss, accuracy = losses.matching_loss(logits, jnp.array([1, 0, 0]))
    assert float(accuracy) == pytest.approx(2 / 3)
    mlm_logits = jnp.zeros((1, 3, 4)).at[0, 1, 2].set(10.0)
    loss, accuracy = losses.masked_language_model_loss(
        mlm_logits, jnp.array([[1, 2, 3]]), jnp.array([[False, True, False]])
    )
    assert float(accuracy) == 1.0 and float(loss) < 1e-3
