"""Model behaviour users rely on: one set of joint weights behind both towers, padding invariance."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import tiny_model_config
from vlretrieval.models import build_model, init_params
from vlretrieval.models.towers import LogitScale

VOCAB = 50


def _inputs(batch=3, length=12, seed=0):
    rng = np.random.default_rng(seed)
    images = jnp.asarray(rng.normal(size=(batch, 16, 16, 3)), jnp.float32)
    lengths = rng.integers(3, length - 2, size=batch)
    token_ids = np.zeros((batch, length), np.int32)
    for row, n in enumerate(lengths):
        token_ids[row, :n] = rng.integers(5, VOCAB, size=n)
    mask = (token_ids > 0).astype(np.int32)
    return images, jnp.asarray(token_ids), jnp.asarray(mask)


def _model(kind="decomposed", pre_norm=True):
    model = build_model(tiny_model_config(kind, pre_norm), VOCAB)
    return model, init_params(model, jax.random.PRNGKey(0))


def _towers(model, params, images, token_ids, mask):
    out = jax.jit(lambda p: model.apply({"params": p}, images, token_ids, mask))(params)
    return np.asarray(out["image_embeddings"]), np.asarray(out["text_embeddings"])


def test_towers_and_joint_model_share_one_set_of_weights():
    model, params = _model()
    # One copy: the towers own nothing but their projections and the temperature.
    assert set(params) == {"joint", "text_projection", "image_projection", "logit_scale"}
    images, token_ids, mask = _inputs()
    image_before, text_before = _towers(model, params, images, token_ids, mask)
    joint = jax.jit(lambda p: model.apply({"params": p}, token_ids, mask, images, method=model.joint_forward))
    joint_before = joint(params)

    changed = jax.tree_util.tree_map(lambda x: x, params)
    kernel = changed["joint"]["encoder"]["block_0"]["attention"]["value"]["kernel"]
    # A random change: a constant shift would cancel against the zero-mean LayerNorm output.
    noise = jax.random.normal(jax.random.PRNGKey(1), kernel.shape)
    changed["joint"]["encoder"]["block_0"]["attention"]["value"]["kernel"] = kernel + 0.5 * noise
    image_after, text_after = _towers(model, changed, images, token_ids, mask)
    joint_after = joint(changed)

    assert np.abs(image_after - image_before).max() > 1e-3
    assert np.abs(text_after - text_before).max() > 1e-3
    assert np.abs(np.asarray(joint_after["pooled"] - joint_before["pooled"])).max() > 1e-3


@pytest.mark.parametrize("kind", ["decomposed", "dual"])
@pytest.mark.parametrize("pre_norm", [True, False])
def test_text_padding_never_changes_an_output(kind, pre_norm):
    model, params = _model(kind, pre_norm)
    images, token_ids, mask = _inputs(length=8)
    encode = lambda ids, m: np.asarray(
        model.apply({"params": params}, ids, m, method=model.encode_text)
    )
    short = encode(token_ids, mask)
    # The same texts padded to a longer length, with junk token ids behind the mask.
    longer_ids = jnp.concatenate([token_ids, jnp.full((3, 4), 7, jnp.int32)], axis=1)
    longer_mask = jnp.concatenate([mask, jnp.zeros((3, 4), jnp.int32)], axis=1)
    junk = jnp.where(longer_mask == 1, longer_ids, 9)
    np.testing.assert_allclose(encode(junk, longer_mask), short, atol=1e-5)


@pytest.mark.parametrize("kind", ["decomposed", "dual"])
def test_batch_padding_never_changes_other_rows(kind):
    model, params = _model(kind)
    images, token_ids, mask = _inputs(batch=3)
    alone = _towers(model, params, images[:1], token_ids[:1], mask[:1])
    together = _towers(model, params, images, token_ids, mask)
    for single, batched in zip(alone, together):
        np.testing.assert_allclose(batched[:1], single, atol=1e-5)


@pytest.mark.parametrize("kind", ["decomposed", "dual"])
def test_embeddings_are_unit_norm(kind):
    model, params = _model(kind)
    for embeddings in _towers(model, params, *_inputs()):
        np.testing.assert_allclose(np.linalg.norm(embeddings, axis=-1), 1.0, atol=1e-5)


def test_dual_encoder_towers_are_independent():
    model, params = _model("dual")
    images, token_ids, mask = _inputs()
    image_before, text_before = _towers(model, params, images, token_ids, mask)
    changed = jax.tree_util.tree_map(lambda x: x, params)
    kernel = changed["image_encoder"]["encoder"]["block_0"]["mlp"]["fc1"]["kernel"]
    noise = jax.random.normal(jax.random.PRNGKey(1), kernel.shape)
    changed["image_encoder"]["encoder"]["block_0"]["mlp"]["fc1"]["kernel"] = kernel + 0.5 * noise
    image_after, text_after = _towers(model, changed, images, token_ids, mask)
    assert np.abs(image_after - image_before).max() > 1e-3
    np.testing.assert_array_equal(text_after, text_before)


def test_logit_scale_is_log_parametrised_and_clipped():
    module = LogitScale(initial_temperature=0.07, max_scale=100.0)
    params = module.init(jax.random.PRNGKey(0))
    np.testing.assert_allclose(module.apply(params), 1 / 0.07, rtol=1e-5)
    huge = jax.tree_util.tree_map(lambda x: x + 10.0, params)
    np.testing.assert_allclose(module.apply(huge), 100.0, rtol=1e-5)


def test_joint_model_attends_across_modalities():
    """The joint pass is not two separate towers: the text changes the image tokens' states."""
    model, params = _model()
    images, token_ids, mask = _inputs()
    joint = lambda ids: model.apply({"params": params}, ids, mask, images, method=model.joint_forward)
    first, second = joint(token_ids), joint((token_ids * 3 + 1) % VOCAB * mask)
    text_length = token_ids.shape[1]
    image_states = lambda out: np.asarray(out["sequence"][:, text_length:])
    assert np.abs(image_states(first) - image_states(second)).max() > 1e-4
    assert first["itm_logits"].shape == (3, 2)
