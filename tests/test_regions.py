"""Detector-region inputs: the packed format, padding invariance, and towers = the joint model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import tiny_model_config
from vlretrieval import losses
from vlretrieval.errors import UserError
from vlretrieval.models import build_model, init_params
from vlretrieval.models.joint import JointVLTransformer
from vlretrieval.models.regions import NO_LABEL, pack_regions, packed_width, unpack_regions
from vlretrieval.models.towers import l2_normalize, pool
from vlretrieval.objectives.terms import choose_regions

VOCAB, FEATURES, REGIONS = 50, 12, 6


def region_model_config(kind="decomposed", pooling="cls", classes=4):
    config = tiny_model_config(kind)
    with config.unlocked():
        config.image_input = "regions"
        config.regions = dict(feature_dim=FEATURES, num_regions=REGIONS, classes=classes)
        config.head.image_pooling = pooling
    return config


def random_regions(rng, counts, num_regions=REGIONS):
    """Packed regions for images with `counts` real regions each, as float32 model input."""
    packed = []
    for count in counts:
        corner = rng.uniform(0, 0.6, size=(count, 2))
        boxes = np.concatenate([corner, corner + rng.uniform(0.1, 0.4, size=(count, 2))], axis=1)
        features = rng.normal(size=(count, FEATURES))
        packed.append(pack_regions(features, boxes, num_regions, rng.integers(0, 4, size=count)))
    return np.stack(packed).astype(np.float32)


def _text(rng, batch, length=12):
    token_ids = np.zeros((batch, length), np.int32)
    for row in range(batch):
        n = rng.integers(3, length - 2)
        token_ids[row, :n] = rng.integers(5, VOCAB, size=n)
    return jnp.asarray(token_ids), jnp.asarray((token_ids > 0).astype(np.int32))


def test_packing_round_trips_features_boxes_flags_and_labels():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(3, FEATURES)).astype(np.float32)
    boxes = np.array([[0.1, 0.2, 0.5, 0.6], [0.0, 0.0, 1.0, 1.0], [0.5, 0.5, 0.75, 1.5]])
    packed = pack_regions(features, boxes, 5, labels=np.array([2, NO_LABEL, 7]))
    assert packed.shape == (5, packed_width(FEATURES)) and packed.dtype == np.float16
    got_features, got_boxes, mask, labels = unpack_regions(packed)
    np.testing.assert_allclose(got_features[:3], features, atol=2e-3)
    assert mask.tolist() == [1, 1, 1, 0, 0] and labels.tolist() == [2, -1, 7, -1, -1]
    # Boxes are clipped into the image, the area is the clipped box's.
    np.testing.assert_allclose(got_boxes[2], [0.5, 0.5, 0.75, 1.0, 0.125], atol=1e-3)
    np.testing.assert_allclose(got_boxes[0, 4], 0.4 * 0.4, atol=1e-3)
    with pytest.raises(ValueError, match="more than the 5"):
        pack_regions(rng.normal(size=(6, FEATURES)), np.zeros((6, 4)), 5)


@pytest.mark.parametrize("kind,pooling", [("decomposed", "cls"), ("dual", "mean")])
def test_padding_regions_never_change_an_output(kind, pooling):
    model = build_model(region_model_config(kind, pooling), VOCAB)
    params = init_params(model, jax.random.PRNGKey(0))
    rng = np.random.default_rng(1)
    images = random_regions(rng, [2, 4, 6])
    token_ids, text_mask = _text(rng, 3)
    # The same regions with the padding rows filled with garbage features and boxes (still
    # flagged invalid): nothing may change.
    garbage = images.copy()
    _, _, mask, _ = unpack_regions(images)
    garbage[mask == 0, : FEATURES + 5] = rng.normal(size=(int((mask == 0).sum()), FEATURES + 5)) * 50
    # And more padding rows than the model was initialised with.
    wider = np.concatenate([garbage, np.zeros_like(garbage[:, :3])], axis=1)
    wider[:, REGIONS:, packed_width(FEATURES) - 1] = NO_LABEL
    forward = jax.jit(lambda x: model.apply({"params": params}, x, token_ids, text_mask, sequences=True))
    apply = lambda x: forward(jnp.asarray(x))
    reference, padded, widened = apply(images), apply(garbage), apply(wider)
    np.testing.assert_allclose(padded["image_embeddings"], reference["image_embeddings"], atol=1e-6)
    np.testing.assert_allclose(widened["image_embeddings"], reference["image_embeddings"], atol=1e-6)
    real = np.asarray(reference["region_mask"]) > 0
    np.testing.assert_allclose(np.asarray(padded["region_embeddings"])[real],
                               np.asarray(reference["region_embeddings"])[real], atol=1e-6)
    assert np.asarray(reference["region_mask"]).sum(axis=1).tolist() == [2, 4, 6]  # not the image token
    if kind == "decomposed":
        joint_pass = jax.jit(lambda x: model.apply({"params": params}, token_ids, text_mask, x,
                                                   method=model.joint_forward))
        joint = lambda x: joint_pass(jnp.asarray(x))
        np.testing.assert_allclose(joint(garbage)["itm_logits"], joint(images)["itm_logits"], atol=1e-5)
        np.testing.assert_allclose(joint(wider)["pooled"], joint(images)["pooled"], atol=1e-6)


def test_region_towers_are_the_joint_region_model_run_on_one_modality():
    model = build_model(region_model_config(), VOCAB)
    params = init_params(model, jax.random.PRNGKey(3))
    rng = np.random.default_rng(2)
    images = jnp.asarray(random_regions(rng, [3, 6, 1, 5]))
    joint = JointVLTransformer(model.config)
    sequence = joint.apply({"params": params["joint"]}, images, method=joint.encode_image_sequence)
    expected = l2_normalize(sequence[:, 0] @ params["image_projection"]["kernel"])
    got = model.apply({"params": params}, images, method=model.encode_image)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    # The joint pass over (text, regions) is one stream: change a real region and the ITM logits move.
    token_ids, text_mask = _text(rng, 4)
    moved = np.asarray(images).copy()
    moved[:, 0, :FEATURES] += 3.0
    joint_pass = jax.jit(lambda x: model.apply({"params": params}, token_ids, text_mask, x,
                                               method=model.joint_forward))
    joint_out = lambda x: joint_pass(jnp.asarray(x))
    assert np.abs(np.asarray(joint_out(moved)["itm_logits"] - joint_out(images)["itm_logits"])).max() > 1e-4
    out = joint_out(images)
    assert out["region_features"].shape == (4, REGIONS, FEATURES)
    assert out["region_class_logits"].shape == (4, REGIONS, 4)
    text_only = model.apply({"params": params}, token_ids, text_mask, method=model.encode_text)
    text_sequence = joint.apply({"params": params["joint"]}, token_ids, text_mask, method=joint.encode_text_sequence)
    np.testing.assert_allclose(
        text_only, l2_normalize(pool(text_sequence, text_mask, "mean") @ params["text_projection"]["kernel"]),
        atol=1e-6)


def test_region_options_are_checked():
    config = region_model_config()
    with config.unlocked():
        config.regions.feature_dim = 0
    with pytest.raises(UserError, match="regions.feature_dim"):
        build_model(config, VOCAB)
    with pytest.raises(UserError, match="image_pooling=map is not defined over detector regions"):
        build_model(region_model_config("dual", "map"), VOCAB)
    config = region_model_config()
    with config.unlocked():
        config.image_input = "boxes"
    with pytest.raises(UserError, match="config.model.image_input is 'boxes'"):
        build_model(config, VOCAB)


def test_masked_region_feature_loss_on_a_hand_made_case():
    predicted = np.zeros((1, 3, 2), np.float32)
    features = np.array([[[1.0, 3.0], [2.0, 2.0], [9.0, 9.0]]], np.float32)
    masked = np.array([[True, True, False]])
    # Mean over dimensions per region: (1 + 9) / 2 = 5 and (4 + 4) / 2 = 4; mean over masked: 4.5.
    assert float(losses.masked_region_feature_loss(predicted, features, masked)) == pytest.approx(4.5)
    assert float(losses.masked_region_feature_loss(predicted, features, ~np.ones((1, 3), bool))) == 0.0


def test_masked_region_class_loss_on_a_hand_made_case():
    logits = np.log(np.array([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [1 / 3, 1 / 3, 1 / 3]]], np.float32))
    labels = np.array([[0, 2, -1]])
    masked = np.array([[True, True, True]])  # the third has no label: it never counts
    value, accuracy = losses.masked_region_class_loss(logits, labels, masked)
    assert float(value) == pytest.approx((-np.log(0.5) - np.log(0.1)) / 2, rel=1e-5)
    assert float(accuracy) == pytest.approx(0.5)


def test_region_masking_chooses_real_regions_only_at_the_set_rate():
    images = jnp.asarray(random_regions(np.random.default_rng(4), [1, 3, 6] * 200))
    chosen = np.asarray(choose_regions(jax.random.PRNGKey(0), images, 0.15))
    _, _, real, _ = unpack_regions(np.asarray(images))
    assert not chosen[real == 0].any()
    assert chosen[real == 1].mean() == pytest.approx(0.15, abs=0.02)


def test_masked_region_modelling_terms_train_the_joint_model():
    """Both terms in the one objective: finite, and a few steps of gradient descent lower them."""
    import ml_collections
    import optax

    from configs.demo import get_config
    from vlretrieval.objectives import make_objective

    model = build_model(region_model_config(), VOCAB)
    params = init_params(model, jax.random.PRNGKey(0))
    objectives = ml_collections.ConfigDict(get_config().objectives.to_dict())
    objectives.contrastive = 0.0
    objectives.masked_region_features = 1.0
    objectives.masked_region_classes = 1.0
    objectives.region_mask_probability = 0.5
    objective = make_objective(model, objectives, patch_size=8, mask_id=None, vocab_size=VOCAB)
    rng = np.random.default_rng(5)
    token_ids, text_mask = _text(rng, 8)
    images = random_regions(rng, [6] * 8)
    # Labels a masked region's visible box decides (its quadrant), as a detector's class is
    # decided by what the box holds: learnable with the features hidden.
    _, boxes, _, _ = unpack_regions(images)
    images[..., -1] = (boxes[..., 0] > 0.3) * 2 + (boxes[..., 1] > 0.3)
    batch = {"images": jnp.asarray(images), "token_ids": token_ids, "text_mask": text_mask}
    tx = optax.adam(3e-3)
    state = tx.init(params)

    @jax.jit
    def step(params, state, key):
        (_, metrics), grads = jax.value_and_grad(objective.loss, has_aux=True)(params, batch, key)
        updates, state = tx.update(grads, state)
        return optax.apply_updates(params, updates), state, metrics

    first = None
    for index in range(40):
        params, state, metrics = step(params, state, jax.random.PRNGKey(index % 4))
        terms = ("masked_region_features_loss", "masked_region_classes_loss")
        first = first or {key: float(metrics[key]) for key in terms}
    assert all(np.isfinite(value) for value in first.values())
    assert float(metrics["masked_region_features_loss"]) < 0.5 * first["masked_region_features_loss"]
    assert float(metrics["masked_region_classes_loss"]) < 0.5 * first["masked_region_classes_loss"]
