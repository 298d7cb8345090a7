"""Fine-tuning pretrained towers: frozen parameters stay bit-identical, learning-rate multipliers
scale exactly their parameters' updates, and a pattern that names no parameter is refused."""

import jax
import ml_collections
import numpy as np
import optax
import pytest

from configs.demo import get_config
from tests.helpers import tiny_model_config
from vlretrieval import parallel
from vlretrieval.errors import UserError
from vlretrieval.models import build_model
from vlretrieval.objectives import make_objective
from vlretrieval.state import check_fine_tuning, create_train_state, make_optimizer, parameter_path
from vlretrieval.train import make_train_step


def _optimizer(**fine_tuning) -> ml_collections.ConfigDict:
    optimizer = get_config().optimizer
    optimizer.warmup_steps = 0
    for key, value in fine_tuning.items():
        optimizer[key] = value
    return optimizer


def _flat(params) -> dict[str, np.ndarray]:
    return {parameter_path(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(params)}


def test_frozen_and_zero_rate_parameters_are_bit_identical_after_training_and_the_rest_move():
    model = build_model(tiny_model_config("dual"), 50)
    optimizer = _optimizer(freeze=("image_encoder/.*",), lr_mults=(("text_projection/.*", 0.0),))
    tx, schedule = make_optimizer(optimizer, 10)
    state = create_train_state(model, tx, seed=0)
    before = _flat(state.params)
    objective = make_objective(model, get_config().objectives, patch_size=8, mask_id=4, vocab_size=50,
                               tower_losses=parallel.CrossDeviceLosses(parallel.make_mesh(1)))
    step = jax.jit(make_train_step(objective, tx, schedule))
    rng = np.random.default_rng(0)
    batch = {"images": rng.normal(size=(8, 16, 16, 3)).astype(np.float32),
             "token_ids": rng.integers(5, 50, size=(8, 8)).astype(np.int32), "text_mask": np.ones((8, 8), np.int32)}
    for _ in range(3):
        state, metrics = step(state, batch)
    after = _flat(state.params)
    for name in before:
        if name.startswith(("image_encoder/", "text_projection/")):
            assert np.array_equal(after[name], before[name]), name  # not a bit moved
    moved = [name for name in before
             if name.startswith("text_encoder/") and not np.array_equal(after[name], before[name])]
    assert len(moved) > 10 and not np.array_equal(after["image_projection/kernel"], before["image_projection/kernel"])
    # A frozen parameter has no optimizer state (no Adam moments): the state is smaller.
    plain_tx, _ = make_optimizer(_optimizer(), 10)
    frozen_state_size = sum(x.size for x in jax.tree_util.tree_leaves(state.opt_state))
    plain_state_size = sum(x.size for x in jax.tree_util.tree_leaves(plain_tx.init(state.params)))
    image_encoder_size = sum(v.size for k, v in before.items() if k.startswith("image_encoder/"))
    assert plain_state_size - frozen_state_size == 2 * image_encoder_size


def test_a_learning_rate_multiplier_scales_exactly_its_parameters_updates():
    params = {"text": {"kernel": np.ones((3, 2), np.float32)}, "image": {"kernel": np.full((2, 2), 2.0, np.float32)}}
    grads = jax.tree.map(lambda x: np.linspace(-1, 1, x.size, dtype=np.float32).reshape(x.shape), params)
    plain, _ = make_optimizer(_optimizer(), 10)
    scaled, _ = make_optimizer(_optimizer(lr_mults=(("image/.*", 0.25),)), 10)
    # The first update runs at the schedule's step 0; compare the second.
    states = []
    for tx in (plain, scaled):
        _, state = tx.update(grads, tx.init(params), params)
        states.append(state)
    reference, _ = plain.update(grads, states[0], params)
    updates, _ = scaled.update(grads, states[1], params)
    np.testing.assert_allclose(updates["image"]["kernel"], 0.25 * reference["image"]["kernel"], rtol=1e-6)
    np.testing.assert_array_equal(updates["text"]["kernel"], reference["text"]["kernel"])
    assert np.abs(reference["image"]["kernel"]).min() > 0


def test_a_pattern_that_names_no_parameter_or_is_not_a_regex_is_refused():
    params = create_train_state(build_model(tiny_model_config("dual"), 50), optax.sgd(0.1), 0).params
    with pytest.raises(UserError, match="'txt_encoder/.*' matches no parameter .* image_encoder, image_projection"):
        check_fine_tuning(_optimizer(freeze=("txt_encoder/.*",)), params)
    with pytest.raises(UserError, match="is not a regular expression"):
        check_fine_tuning(_optimizer(lr_mults=(("text_(encoder", 0.1),)), params)
    check_fine_tuning(_optimizer(freeze=("text_encoder/.*",), lr_mults=((".*projection.*", 0.1),)), params)
