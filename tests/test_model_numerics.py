"""Accelerator numerics and layouts: fused attention, scanned stacks and every remat policy compute
today's model (explicit attention, unrolled blocks) to 1e-5 in float32, sharded over 8 fake
devices; bfloat16 compute stays close to float32 while parameters and optimizer state stay float32.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.demo import get_config
from tests.helpers import assert_close_relative, tiny_model_config
from vlretrieval import parallel
from vlretrieval.errors import UserError
from vlretrieval.models import build_model, init_params, layout
from vlretrieval.models.transformer import REMAT_POLICIES
from vlretrieval.objectives import make_objective
from vlretrieval.state import create_train_state, make_optimizer
from vlretrieval.train import make_train_step

VOCAB, BATCH, DEVICES = 40, 16, 8


def _model_config(kind, **model_wide):
    config = tiny_model_config(kind)
    if kind == "dual":
        config.text_transformer.causal = True  # CLIP's text tower: the causal mask as well
        config.head.text_pooling = "last"
    per_transformer = model_wide.pop("per_transformer", {})
    for name in ("transformer", "image_transformer", "text_transformer"):
        config[name].update(per_transformer)
    config.update(model_wide)
    return config


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, 12, size=(BATCH, 1))
    return {
        "images": rng.normal(size=(BATCH, 16, 16, 3)).astype(np.float32),
        "token_ids": rng.integers(5, VOCAB, size=(BATCH, 12)).astype(np.int32),
        "text_mask": (np.arange(12)[None, :] < lengths).astype(np.int32),
    }


def _sharded_loss_and_grads(model, params):
    mesh = parallel.make_mesh(DEVICES)
    objective = make_objective(model, get_config().objectives, patch_size=8, mask_id=4,
                               vocab_size=VOCAB, tower_losses=parallel.CrossDeviceLosses(mesh))
    grad_fn = jax.jit(
        jax.value_and_grad(objective.loss, has_aux=True),
        in_shardings=(parallel.replicated(mesh), parallel.batch_sharding(mesh), None),
    )
    (loss, _), grads = grad_fn(
        parallel.replicate(params, mesh), parallel.global_batch(_batch(), mesh), jax.random.PRNGKey(1)
    )
    return loss, grads


@functools.cache
def _reference(kind):
    """Today's model: the attention written out, blocks unrolled, nothing recomputed."""
    model = build_model(_model_config(kind, attention="explicit"), VOCAB)
    params = init_params(model, jax.random.PRNGKey(0))
    return params, _sharded_loss_and_grads(model, params)


VARIANTS = [
    ("decomposed", {}),
    ("dual", {}),
    ("dual", {"attention": "auto"}),
    ("decomposed", {"scan_layers": True}),
    ("dual", {"scan_layers": True, "per_transformer": {"remat": "full"}}),
    ("decomposed", {"per_transformer": {"remat": "full"}}),
] + [("decomposed", {"scan_layers": True, "per_transformer": {"remat": policy}})
     for policy in REMAT_POLICIES if policy not in ("none", "full")]


@pytest.mark.parametrize("kind,options", VARIANTS, ids=[f"{k}-{o}" for k, o in VARIANTS])
def test_fused_attention_scan_and_remat_give_todays_loss_and_gradients(kind, options):
    params, (reference_loss, reference_grads) = _reference(kind)
    # The library's attention (recomputed in the backward pass) under every layout and policy.
    model = build_model(_model_config(kind, **{"attention": "xla", **options}), VOCAB)
    scanned = options.get("scan_layers", False)
    own_params = init_params(model, jax.random.PRNGKey(0))
    assert layout.is_scanned(own_params) is scanned
    loss, grads = _sharded_loss_and_grads(model, layout.to_layout(params, scanned))
    assert_close_relative(loss, reference_loss)
    assert_close_relative(layout.to_layout(grads, False), reference_grads)


def test_scanned_parameters_stack_the_blocks_and_unstack_back_exactly():
    params, _ = _reference("dual")
    scanned = layout.to_layout(params, scanned=True)
    blocks = scanned["image_encoder"]["encoder"]["blocks"]
    assert blocks["mlp"]["fc1"]["kernel"].shape == (2, 32, 128)
    assert "block_0" not in scanned["image_encoder"]["encoder"]
    back = layout.to_layout(scanned, scanned=False)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)
    # Shapes alone (what a checkpoint's metadata gives) relayout the same way.
    shapes = layout.to_layout(jax.eval_shape(lambda: params), scanned=True)
    assert shapes["image_encoder"]["encoder"]["blocks"]["mlp"]["fc1"]["kernel"].shape == (2, 32, 128)


# bfloat16 keeps 8 bits of mantissa (relative rounding 2^-9 ~ 0.2%); through two blocks and the
# normalisation the unit-norm embeddings move by a few 1e-3. Stated tolerance: 2e-2 absolute per
# coordinate, cosine to the float32 embedding above 0.999.
BF16_ATOL, BF16_MIN_COSINE = 2e-2, 0.999


@pytest.mark.parametrize("kind", ["decomposed", "dual"])
def test_bfloat16_forward_is_close_to_float32_and_returns_float32(kind):
    params, _ = _reference(kind)
    batch = _batch()
    outputs = {}
    for dtype in ("float32", "bfloat16"):
        model = build_model(_model_config(kind, dtype=dtype), VOCAB)
        outputs[dtype] = jax.jit(model.apply)(
            {"params": params}, batch["images"], batch["token_ids"], batch["text_mask"]
        )
        if kind == "decomposed":
            joint = jax.jit(functools.partial(model.apply, method=model.joint_forward))(
                {"params": params}, batch["token_ids"], batch["text_mask"], batch["images"]
            )
            outputs[dtype]["itm_logits"] = joint["itm_logits"]
    for name in ("image_embeddings", "text_embeddings"):
        low, full = outputs["bfloat16"][name], outputs["float32"][name]
        assert low.dtype == jnp.float32  # what an index stores
        np.testing.assert_allclose(low, full, atol=BF16_ATOL)
        assert float(jnp.min(jnp.sum(low * full, axis=-1))) > BF16_MIN_COSINE
    if kind == "decomposed":
        assert outputs["bfloat16"]["itm_logits"].dtype == jnp.float32
        np.testing.assert_allclose(outputs["bfloat16"]["itm_logits"],
                                   outputs["float32"]["itm_logits"], atol=5e-2)


def test_bfloat16_training_keeps_parameters_and_optimizer_state_float32():
    model = build_model(_model_config("dual", dtype="bfloat16"), VOCAB)
    optimizer = get_config().optimizer
    tx, schedule = make_optimizer(optimizer, 10)
    state = create_train_state(model, tx, seed=0)
    objective = make_objective(model, get_config().objectives, patch_size=8, mask_id=4,
                               vocab_size=VOCAB)
    step = jax.jit(make_train_step(objective, tx, schedule))
    for _ in range(2):
        state, metrics = step(state, _batch())
    floats = [leaf for leaf in jax.tree.leaves((state.params, state.opt_state))
              if jnp.issubdtype(leaf.dtype, jnp.floating)]
    assert floats and all(leaf.dtype == jnp.float32 for leaf in floats)
    assert metrics["loss"].dtype == jnp.float32 and np.isfinite(float(metrics["loss"]))
    # The matmuls did run in bfloat16: the compiled step holds bf16 dots.
    text = step.lower(state, _batch()).as_text()
    assert "bf16" in text


@pytest.mark.parametrize("key,value,message", [
    ("dtype", "float16", "config.model.dtype is 'float16'"),
    ("attention", "flash", "config.model.attention is 'flash'"),
])
def test_unknown_dtype_or_attention_is_one_clear_line(key, value, message):
    with pytest.raises(UserError, match=message):
        build_model(_model_config("dual", **{key: value}), VOCAB)


def test_unknown_remat_policy_is_one_clear_line():
    config = _model_config("dual", per_transformer={"remat": "dots_savable"})
    with pytest.raises(UserError, match="config.model.image_transformer: unknown remat 'dots_savable'"):
        build_model(config, VOCAB)
