"""Cross-device tower losses equal the single-device full-batch reference: loss and every gradient.

Every loss variant of `objectives` (softmax, sigmoid, each hard-negative term, composed negatives,
their weighted sum) on 1, 2, 4 and 8 fake devices, differentiated with respect to the embeddings,
the composed negatives' embeddings, the logit scale and the bias. `test_sharded_step.py` carries
this through the model to every parameter.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.demo import get_config
from tests.helpers import assert_close_relative
from vlretrieval import losses, parallel
from vlretrieval.objectives import make_objective
from vlretrieval.parallel import ring

GLOBAL_BATCH, DIM = 32, 16
WITH_COMPOSED = {"composed_text_negatives": True, "composed_image_negatives": True}
VARIANTS = {
    "softmax": {},
    "softmax_composed": WITH_COMPOSED,
    "sigmoid": {"contrastive_loss": "sigmoid"},
    "reweighted": {"contrastive": 0.0, "reweighted_contrastive": 1.0, "reweight_beta": 2.0,
                   **WITH_COMPOSED},
    "hinge": {"contrastive": 0.0, "hardest_negative_hinge": 1.0, "hinge_top_k": 3, **WITH_COMPOSED},
    "weighted_sum": {"reweighted_contrastive": 0.5, "hardest_negative_hinge": 0.25, **WITH_COMPOSED},
    "weighted_sum_sigmoid": {"contrastive_loss": "sigmoid", "reweighted_contrastive": 0.5,
                             "hardest_negative_hinge": 0.25},
    # MURAL: translation pairs through the same machinery, LaBSE's margin, a fixed temperature.
    "text_text": {"contrastive": 0.0, "text_text": 1.0, "text_text_margin": 0.2,
                  "text_text_temperature": 0.05},
    "image_text_and_text_text": {"text_text": 0.5, "text_text_margin": 0.1},
}


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _tower_outputs(variant, seed=0):
    rng = np.random.default_rng(seed)
    images = _unit(rng.normal(size=(GLOBAL_BATCH, DIM)))
    outputs = {
        "image_embeddings": images,
        "text_embeddings": _unit(images + 0.7 * rng.normal(size=(GLOBAL_BATCH, DIM))),
        "logit_scale": np.float32(12.0),
        "logit_bias": np.float32(-4.0),
    }
    if VARIANTS[variant].get("composed_text_negatives"):
        outputs["extra_text_negatives"] = _unit(rng.normal(size=(GLOBAL_BATCH, DIM)))
        outputs["extra_image_negatives"] = _unit(images + 0.5 * rng.normal(size=(GLOBAL_BATCH, DIM)))
    if VARIANTS[variant].get("text_text"):
        sources = _unit(rng.normal(size=(GLOBAL_BATCH, DIM)))
        outputs["bitext_source_embeddings"] = sources
        outputs["bitext_target_embeddings"] = _unit(sources + 0.8 * rng.normal(size=(GLOBAL_BATCH, DIM)))
    batch = {"negative_valid": (rng.random(GLOBAL_BATCH) < 0.75).astype(np.int32)}
    return jax.tree.map(jnp.asarray, outputs), jax.tree.map(jnp.asarray, batch)


def _tower_loss(variant, tower_losses):
    config = get_config().objectives
    config.update(VARIANTS[variant])
    objective = make_objective(
        None, config, patch_size=8, mask_id=None, vocab_size=0, tower_losses=tower_losses
    )
    return lambda outputs, batch: objective.tower_loss(outputs, batch)[0]


@pytest.mark.parametrize("devices", [1, 2, 4, 8])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cross_device_tower_loss_equals_the_full_batch(variant, devices):
    outputs, batch = _tower_outputs(variant)
    reference = jax.jit(jax.value_and_grad(_tower_loss(variant, losses)))(outputs, batch)
    mesh = parallel.make_mesh(devices)
    per_example = lambda x: parallel.batch_sharding(mesh) if x.ndim else parallel.replicated(mesh)
    sharded = jax.device_put((outputs, batch), jax.tree.map(per_example, (outputs, batch)))
    got = jax.jit(jax.value_and_grad(_tower_loss(variant, parallel.CrossDeviceLosses(mesh))))(*sharded)
    assert_close_relative(got, reference)
    # The hinge uses cosines; the text-text-only variant its own fixed temperature.
    assert (float(reference[1]["logit_scale"]) != 0.0) == (variant not in ("hinge", "text_text"))
    assert (float(reference[1]["logit_bias"]) != 0.0) == ("sigmoid" in variant)


def test_softmax_accuracy_metrics_match_across_devices():
    outputs, batch = _tower_outputs("softmax_composed")
    args = [outputs[name] for name in ("image_embeddings", "text_embeddings", "logit_scale",
                                       "extra_text_negatives", "extra_image_negatives")]
    _, reference = losses.softmax_contrastive_loss(*args, extra_text_valid=batch["negative_valid"])
    mesh = parallel.make_mesh(8)
    _, got = jax.jit(parallel.CrossDeviceLosses(mesh).softmax_contrastive_loss)(
        *args, extra_text_valid=batch["negative_valid"]
    )
    for name in ("image_to_text_accuracy", "text_to_image_accuracy"):
        assert 0.0 < float(reference[name]) < 1.0
        assert float(got[name]) == pytest.approx(float(reference[name]))


def test_sigmoid_loss_on_a_hand_made_case():
    images = jnp.eye(2, dtype=jnp.float32)
    loss = losses.sigmoid_loss(images, images, jnp.float32(1.0), jnp.float32(0.0))
    expected = -(2 * np.log(1 / (1 + np.exp(-1.0))) + 2 * np.log(1 / (1 + np.exp(0.0)))) / 2
    np.testing.assert_allclose(float(loss), expected, rtol=1e-6)


@pytest.mark.parametrize("diagonal", [True, False])
def test_sigmoid_ring_block_gradients_equal_autodiff(diagonal):
    # The sigmoid ring's block gradient is written by hand (it measured smaller than jax.vjp's).
    rng = np.random.default_rng(3)
    images, texts = jnp.asarray(_unit(rng.normal(size=(6, 4)))), jnp.asarray(_unit(rng.normal(size=(6, 4))))
    scale, bias, coefficient = jnp.float32(7.0), jnp.float32(-2.0), jnp.float32(0.3)
    autodiff = jax.grad(
        lambda i, t, s, b: coefficient * ring.sigmoid_block_loss(i, t, s, b, diagonal),
        argnums=(0, 1, 2, 3),
    )(images, texts, scale, bias)
    derived = ring.sigmoid_block_gradients(images, texts, scale, bias, coefficient, diagonal)
    assert_close_relative(tuple(derived), autodiff)


@pytest.mark.parametrize("home", [True, False])
def test_softmax_ring_block_gradients_equal_autodiff(home):
    # One block holding the whole ring: its gradient against the ring's logsumexp is autodiff's
    # (the scale's share through the similarities is read off the rows, so it is checked here).
    rng = np.random.default_rng(4)
    queries = jnp.asarray(_unit(rng.normal(size=(6, 4))))
    key_sets = tuple(
        (jnp.asarray(_unit(rng.normal(size=(6, 4)))), jnp.asarray(valid, jnp.float32))
        for valid in ([1, 1, 1, 1, 1, 1], [1, 0, 1, 1, 0, 1])
    )
    scale, margin, coefficient = jnp.float32(7.0), jnp.float32(0.2), jnp.float32(0.3)

    def block_loss(queries, key_sets, scale):
        return coefficient * jnp.sum(ring.softmax_block_forward(queries, key_sets, scale, home, margin)[0])

    logsumexp, _ = ring.softmax_block_forward(queries, key_sets, scale, home, margin)
    autodiff = jax.grad(block_loss, argnums=(0, 1, 2))(queries, key_sets, scale)
    derived = ring.softmax_block_gradients(queries, key_sets, scale, logsumexp, coefficient, home, margin)
    assert_close_relative(tuple(derived), autodiff)


def test_text_text_loss_is_symmetric_in_its_two_sides():
    outputs, batch = _tower_outputs("text_text")
    loss = _tower_loss("text_text", losses)
    swapped = dict(outputs, bitext_source_embeddings=outputs["bitext_target_embeddings"],
                   bitext_target_embeddings=outputs["bitext_source_embeddings"])
    assert float(loss(swapped, batch)) == pytest.approx(float(loss(outputs, batch)), rel=1e-6)
