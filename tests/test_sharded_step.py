"""Through the model: the sharded objective's gradient of every parameter equals the reference.

`test_parallel_losses.py` checks every loss variant on 1, 2, 4 and 8 devices with respect to the
embeddings; here the whole objective (encoders, composed negatives, weighted terms) is
differentiated with respect to every parameter, replicated or FSDP-sharded, against the
single-device full-batch reference; and gradient accumulation over micro-batches equals the one
large batch.
"""

import functools

import jax
import numpy as np
import pytest

from configs.demo import get_config
from tests.helpers import assert_close_relative, tiny_model_config
from vlretrieval import losses, parallel
from vlretrieval.accumulate import accumulated_value_and_grad
from vlretrieval.errors import UserError
from vlretrieval.models import build_model, init_params
from vlretrieval.objectives import check_objectives, make_objective, split_loss_rng

VOCAB, BATCH = 40, 16
WITH_COMPOSED = {"composed_text_negatives": True, "composed_image_negatives": True}
VARIANTS = {
    "softmax": {},
    "sigmoid": {"contrastive_loss": "sigmoid"},
    "weighted_sum": {"reweighted_contrastive": 0.5, "reweight_beta": 2.0,
                     "hardest_negative_hinge": 0.25, "hinge_top_k": 2, **WITH_COMPOSED},
    "weighted_sum_sigmoid": {"contrastive_loss": "sigmoid", "reweighted_contrastive": 0.5,
                             "hardest_negative_hinge": 0.25},
}


def _objectives_config(variant):
    config = get_config().objectives
    config.update(VARIANTS[variant])
    return config


@functools.cache
def _model():
    config = tiny_model_config()
    for name in ("transformer", "image_transformer", "text_transformer"):
        config[name].depth = 1  # compile time: one block exercises every parameter kind
    config.head.logit_bias = True  # the sigmoid variants train it; the others leave it unused
    config.head.initial_logit_bias = -2.0
    model = build_model(config, VOCAB)
    return model, init_params(model, jax.random.PRNGKey(0))


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, 12, size=(BATCH, 1))
    negative_lengths = rng.integers(3, 12, size=(BATCH, 1))
    return {
        "images": rng.normal(size=(BATCH, 16, 16, 3)).astype(np.float32),
        "token_ids": rng.integers(5, VOCAB, size=(BATCH, 12)).astype(np.int32),
        "text_mask": (np.arange(12)[None, :] < lengths).astype(np.int32),
        "negative_token_ids": rng.integers(5, VOCAB, size=(BATCH, 12)).astype(np.int32),
        "negative_text_mask": (np.arange(12)[None, :] < negative_lengths).astype(np.int32),
        "negative_valid": (rng.random(BATCH) < 0.75).astype(np.int32),
    }


def _objective(variant, tower_losses=losses):
    model, _ = _model()
    return make_objective(model, _objectives_config(variant), patch_size=8, mask_id=4,
                          vocab_size=VOCAB, tower_losses=tower_losses)


@functools.cache
def _reference(variant):
    """Loss and gradients on one device, the whole batch in one array."""
    _, params = _model()
    (loss, _), grads = jax.jit(jax.value_and_grad(_objective(variant).loss, has_aux=True))(
        params, _batch(), jax.random.PRNGKey(1)
    )
    return loss, grads


def _sharded_value_and_grad(variant, devices, fsdp):
    mesh = parallel.make_mesh(devices)
    _, params = _model()
    shardings = parallel.state_shardings(params, mesh, fsdp)
    objective = _objective(variant, parallel.CrossDeviceLosses(mesh))
    grad_fn = jax.jit(
        jax.value_and_grad(objective.loss, has_aux=True),
        in_shardings=(shardings, parallel.batch_sharding(mesh), None),
        out_shardings=((parallel.replicated(mesh), parallel.replicated(mesh)), shardings),
    )
    placed = jax.device_put(params, shardings)
    (loss, _), grads = grad_fn(placed, parallel.global_batch(_batch(), mesh), jax.random.PRNGKey(1))
    return loss, grads, placed


# Each term alone is checked on 1/2/4/8 devices at the embeddings (test_parallel_losses.py); through
# the model, the weighted sums carry every term.
@pytest.mark.parametrize(
    "variant,devices",
    [("softmax", 8), ("sigmoid", 8), ("weighted_sum", 8), ("weighted_sum_sigmoid", 8),
     ("weighted_sum", 2), ("sigmoid", 4)],
)
def test_sharded_loss_and_gradients_equal_the_full_batch(variant, devices):
    loss, grads, _ = _sharded_value_and_grad(variant, devices, fsdp=False)
    reference_loss, reference_grads = _reference(variant)
    assert_close_relative(loss, reference_loss)
    assert_close_relative(grads, reference_grads)
    # The sigmoid variants train the bias; the softmax ones are blind to it.
    bias_grad = float(reference_grads["logit_bias"])
    assert (bias_grad != 0) == ("sigmoid" in variant)


@pytest.mark.parametrize("variant,devices", [("weighted_sum", 8), ("weighted_sum_sigmoid", 4)])
def test_fsdp_gives_the_same_loss_and_gradients(variant, devices):
    loss, grads, placed = _sharded_value_and_grad(variant, devices, fsdp=True)
    kernel = placed["joint"]["encoder"]["block_0"]["mlp"]["fc1"]["kernel"]
    assert kernel.sharding.spec != jax.sharding.PartitionSpec(), "FSDP left the weights replicated"
    assert kernel.addressable_shards[0].data.size == kernel.size // devices
    reference_loss, reference_grads = _reference(variant)
    assert_close_relative(loss, reference_loss)
    assert_close_relative(grads, reference_grads)


@pytest.mark.parametrize(
    "variant,devices,steps", [("weighted_sum", 1, 4), ("weighted_sum", 8, 2), ("weighted_sum_sigmoid", 4, 2)]
)
def test_accumulated_micro_batches_equal_the_large_batch(variant, devices, steps):
    # Image mixing takes its donor image from the same micro-batch, so it is the one term that
    # differs from the large batch; everything else must match exactly.
    config_variant = dict(VARIANTS[variant], composed_image_negatives=False)
    model, params = _model()
    config = get_config().objectives
    config.update(config_variant)
    mesh = parallel.make_mesh(devices)
    make = functools.partial(make_objective, model, config, patch_size=8, mask_id=4, vocab_size=VOCAB)
    rng = jax.random.PRNGKey(1)
    tower_rng = split_loss_rng(rng)[0]
    (reference_loss, _), reference_grads = jax.jit(jax.value_and_grad(make().loss, has_aux=True))(
        params, _batch(), rng
    )
    objective = make(tower_losses=parallel.CrossDeviceLosses(mesh))
    accumulate = jax.jit(
        lambda p, b: accumulated_value_and_grad(
            objective, p, b, tower_rng, steps,
            split=lambda tree: parallel.split_microbatches(tree, steps, mesh),
            merge=lambda tree: parallel.merge_microbatches(tree, mesh),
        )
    )
    (loss, metrics), grads = accumulate(
        parallel.replicate(params, mesh), parallel.global_batch(_batch(), mesh)
    )
    assert_close_relative(loss, reference_loss)
    assert_close_relative(grads, reference_grads)
    assert float(metrics["loss"]) == pytest.approx(float(reference_loss), rel=1e-5)


def test_micro_batches_keep_every_device_busy_and_merge_back_in_order():
    mesh = parallel.make_mesh(4)
    rows = jax.device_put(np.arange(16), parallel.batch_sharding(mesh))
    split = jax.jit(lambda x: parallel.split_microbatches(x, 2, mesh))(rows)
    # Micro-batch 0 takes the first half of every device's 4 rows.
    np.testing.assert_array_equal(np.asarray(split[0]), [0, 1, 4, 5, 8, 9, 12, 13])
    merged = jax.jit(lambda x: parallel.merge_microbatches(x, mesh))(split)
    np.testing.assert_array_equal(np.asarray(merged), np.arange(16))


def test_impossible_layouts_and_objectives_are_refused_with_one_clear_line():
    mesh = parallel.make_mesh(8)
    with pytest.raises(UserError, match="accumulation_steps 3 does not divide the 4 examples"):
        parallel.check_accumulation(32, mesh, 3)
    model = build_model(tiny_model_config(), VOCAB)  # no logit bias
    config = _objectives_config("sigmoid")
    with pytest.raises(UserError, match="model.head.logit_bias=true"):
        check_objectives(config, model, mask_id=4, has_content_words=True)
    config.contrastive_loss = "sigmoidal"
    with pytest.raises(UserError, match="contrastive_loss is 'sigmoidal'"):
        check_objectives(config, model, mask_id=4, has_content_words=True)
