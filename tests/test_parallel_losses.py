"""Cross-device losses equal the single-device full-batch reference: loss and every gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlretrieval import losses, parallel

GLOBAL_BATCH, DIM = 32, 16


def _embeddings(seed=0):
    rng = np.random.default_rng(seed)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
    images = unit(rng.normal(size=(GLOBAL_BATCH, DIM))).astype(np.float32)
    texts = unit(images + 0.7 * rng.normal(size=(GLOBAL_BATCH, DIM))).astype(np.float32)
    return jnp.asarray(images), jnp.asarray(texts)


def _assert_close(sharded, reference):
    for got, want in zip(jax.tree_util.tree_leaves(sharded), jax.tree_util.tree_leaves(reference)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-7)


def _place(mesh, images, texts):
    sharding = parallel.batch_sharding(mesh)
    return jax.device_put(images, sharding), jax.device_put(texts, sharding)


@pytest.mark.parametrize("devices", [1, 2, 4, 8])
def test_sharded_softmax_matches_full_batch(devices):
    images, texts = _embeddings()
    scale = jnp.float32(12.0)
    reference = jax.value_and_grad(
        lambda i, t, s: losses.softmax_contrastive_loss(i, t, s)[0], argnums=(0, 1, 2)
    )(images, texts, scale)
    mesh = parallel.make_mesh(devices)
    sharded_loss = parallel.sharded_softmax_contrastive_loss(mesh)
    got = jax.jit(jax.value_and_grad(sharded_loss, argnums=(0, 1, 2)))(*_place(mesh, images, texts), scale)
    _assert_close(got, reference)


@pytest.mark.parametrize("devices", [1, 2, 4, 8])
def test_sigmoid_ring_matches_full_batch(devices):
    images, texts = _embeddings(1)
    scale, bias = jnp.float32(10.0), jnp.float32(-5.0)
    reference = jax.value_and_grad(losses.sigmoid_loss, argnums=(0, 1, 2, 3))(images, texts, scale, bias)
    mesh = parallel.make_mesh(devices)
    sharded_loss = parallel.sharded_sigmoid_loss(mesh)
    got = jax.jit(jax.value_and_grad(sharded_loss, argnums=(0, 1, 2, 3)))(
        *_place(mesh, images, texts), scale, bias
    )
    _assert_close(got, reference)


def test_sigmoid_loss_on_a_hand_made_case():
    images = jnp.eye(2, dtype=jnp.float32)
    loss = losses.sigmoid_loss(images, images, jnp.float32(1.0), jnp.float32(0.0))
    expected = -(2 * np.log(1 / (1 + np.exp(-1.0))) + 2 * np.log(1 / (1 + np.exp(0.0)))) / 2
    np.testing.assert_allclose(float(loss), expected, rtol=1e-6)
