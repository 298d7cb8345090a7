"""Training end to end on small demo data: it learns, it is reproducible, it shards, it resumes."""

import json
import os
import shutil

import jax
import numpy as np
import optax
import pytest

from vlretrieval import parallel
from vlretrieval.config import load_config
from vlretrieval.evaluation.checkpoints import evaluate_checkpoint
from vlretrieval.models import build_model
from vlretrieval.objectives import make_objective
from vlretrieval.state import create_train_state
from vlretrieval.train import make_train_step, train, train_and_evaluate


def tiny_config(data_dir, *overrides):
    return load_config("configs/demo.py:tiny", [f"data.data_dir={data_dir}", *overrides])


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data"))


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as handle:
        return [json.loads(line)["loss"] for line in handle]


def test_short_training_lifts_recall_far_above_chance(short_demo_run):
    _, workdir, results = short_demo_run  # tests/conftest.py: 250 steps on 2,048 demo images
    chance = 100 / 100  # R@1 of a random ranking over 100 images
    average = results["average"]
    assert average["text_to_image"]["R@1"] > 8 * chance, results["average"]
    assert average["image_to_text"]["R@1"] > 8 * chance, results["average"]
    losses = _losses(workdir)
    assert losses[-1] < losses[0] - 1.0
    with open(os.path.join(workdir, "results.json")) as handle:
        written = json.load(handle)
    assert set(written["languages"]) == {"en", "de", "fr", "es"}
    assert written["average"]["mean_recall"] == pytest.approx(average["mean_recall"])


@pytest.fixture(scope="module")
def tiny_run(data_dir, tmp_path_factory):
    """One finished tiny run (6 steps, checkpoints at 3 and 6), shared by the tests below."""
    workdir = str(tmp_path_factory.mktemp("tiny_run"))
    results = train_and_evaluate(tiny_config(data_dir), workdir, progress=False)
    return workdir, results


def test_same_seed_gives_the_same_numbers_twice(data_dir, tiny_run, tmp_path):
    first_workdir, first = tiny_run
    second = train_and_evaluate(tiny_config(data_dir), str(tmp_path / "b"), progress=False)
    assert _losses(first_workdir) == _losses(str(tmp_path / "b"))
    assert first["languages"] == second["languages"]
    train(tiny_config(data_dir, "seed=1"), str(tmp_path / "c"), progress=False)
    assert _losses(str(tmp_path / "c")) != _losses(first_workdir)


def test_resuming_with_a_changed_config_names_every_change(data_dir, tiny_run, tmp_path, capsys):
    workdir = str(tmp_path / "resumed")
    shutil.copytree(tiny_run[0], workdir)
    train(tiny_config(data_dir), workdir, progress=False)  # the same config: nothing to say
    assert "the config differs" not in capsys.readouterr().out
    train(tiny_config(data_dir, "train.num_steps=8", "optimizer.learning_rate=0.001"), workdir, progress=False)
    notes = [line for line in capsys.readouterr().out.splitlines() if "the config differs" in line]
    assert notes == [
        "note: the config differs from the one saved at step 6: "
        "optimizer.learning_rate: 0.002 -> 0.001; train.num_steps: 6 -> 8"
    ]


def test_evaluating_with_other_data_or_model_settings_says_which(data_dir, tiny_run, tmp_path, capsys):
    """Another tokenizer or model reads the checkpoint without error and scores at chance: the
    eval names what differs from the run's config. Evaluation settings may differ silently."""
    workdir = str(tmp_path / "evaluated")
    shutil.copytree(tiny_run[0], workdir)
    evaluate_checkpoint(tiny_config(data_dir, "eval.batch_size=16", "train.num_steps=8"), workdir)
    assert "trained with other" not in capsys.readouterr().out
    evaluate_checkpoint(tiny_config(data_dir, "model.head.text_pooling=cls", "model.head.image_pooling=mean"), workdir)
    notes = [line for line in capsys.readouterr().out.splitlines() if "trained with other" in line]
    assert notes == [
        "note: the checkpoint at step 6 was trained with other data or model settings: "
        'model.head.image_pooling: "cls" -> "mean"; model.head.text_pooling: "mean" -> "cls" '
        "(expected on another dataset; with another tokenizer or model the scores mean nothing)"
    ]


def test_train_step_with_every_term_on_8_fsdp_devices_matches_1_device(data_dir):
    """The whole step (joint ITM/MLM terms and the optimizer too) on 8 FSDP devices vs 1."""
    assert jax.device_count() == 8, "conftest.py fakes 8 CPU devices"
    every_term = [
        "objectives.reweighted_contrastive=0.5", "objectives.hardest_negative_hinge=0.5",
        "objectives.image_text_matching=1.0", "objectives.masked_language_model=1.0",
        "objectives.composed_text_negatives=true", "objectives.composed_image_negatives=true",
    ]
    config = tiny_config(data_dir, *every_term)
    model = build_model(config.model, vocab_size=60)
    # Plain SGD: parameters then move by exactly lr x gradient, so they compare the gradients
    # themselves (Adam would magnify float noise in near-zero gradients into sign flips).
    tx, schedule = optax.sgd(0.5), lambda step: 0.5
    rng = np.random.default_rng(0)
    batch = {
        "images": rng.normal(size=(32, 64, 64, 3)).astype(np.float32),
        "token_ids": rng.integers(5, 60, size=(32, 32)).astype(np.int32),
        "text_mask": (np.arange(32)[None, :] < rng.integers(4, 32, size=(32, 1))).astype(np.int32),
        "negative_token_ids": rng.integers(5, 60, size=(32, 32)).astype(np.int32),
        "negative_text_mask": (np.arange(32)[None, :] < rng.integers(4, 32, size=(32, 1))).astype(np.int32),
        "negative_valid": (rng.random(32) < 0.9).astype(np.int32),
    }
    results = []
    for devices in (1, 8):
        mesh = parallel.make_mesh(devices)
        objective = make_objective(
            model, config.objectives, patch_size=config.model.patch_size, mask_id=4, vocab_size=60,
            tower_losses=parallel.CrossDeviceLosses(mesh),
        )
        state = create_train_state(model, tx, seed=0)
        shardings = parallel.state_shardings(state, mesh, fsdp=devices > 1)
        state = jax.device_put(state, shardings)
        step = jax.jit(
            make_train_step(objective, tx, schedule),
            in_shardings=(shardings, parallel.batch_sharding(mesh)),
            out_shardings=(shardings, parallel.replicated(mesh)),
        )
        sharded = parallel.global_batch(batch, mesh)
        assert len(sharded["images"].sharding.device_set) == devices
        for _ in range(2):
            state, metrics = step(state, sharded)
        results.append((state.params, metrics))
    (params_1, metrics_1), (params_8, metrics_8) = results
    np.testing.assert_allclose(metrics_1["loss"], metrics_8["loss"], rtol=1e-5)
    np.testing.assert_allclose(metrics_1["gradient_norm"], metrics_8["gradient_norm"], rtol=1e-4)
    for a, b in zip(jax.tree_util.tree_leaves(params_1), jax.tree_util.tree_leaves(params_8)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_weight_decay_applies_to_weight_matrices_only(data_dir):
    from vlretrieval.models import init_params
    from vlretrieval.state import weight_decay_mask

    model = build_model(tiny_config(data_dir).model, vocab_size=60)
    mask = weight_decay_mask(init_params(model, jax.random.PRNGKey(0)))
    flat = {
        "/".join(str(getattr(k, "key", k)) for k in path): decayed
        for path, decayed in jax.tree_util.tree_leaves_with_path(mask)
    }
    assert flat["joint/encoder/block_0/attention/query/kernel"]
    assert flat["joint/encoder/block_0/mlp/fc1/kernel"]
    for name in ("joint/encoder/block_0/mlp/fc1/bias", "joint/encoder/final_norm/scale",
                 "joint/text_embeddings/token/embedding", "joint/image_embeddings/position",
                 "joint/image_embeddings/class_token", "logit_scale/log_scale"):
        assert not flat[name], name


def test_dual_encoder_trains_with_the_same_trainer(data_dir, tmp_path):
    config = tiny_config(data_dir, "model.kind=dual")
    results = train_and_evaluate(config, str(tmp_path), progress=False)
    assert os.path.isdir(tmp_path / "checkpoints" / "6")
    assert 0.0 <= results["average"]["mean_recall"] <= 100.0
    assert all(np.isfinite(_losses(str(tmp_path))))


def test_a_run_resumes_and_evaluates_in_the_other_stack_layout(data_dir, tmp_path):
    """Trained unrolled for 3 steps, resumed with scan_layers for 3 more: the same parameters as
    6 unrolled steps, and the same evaluation in either layout."""
    from flax import traverse_util

    from tests.helpers import assert_close_relative
    from vlretrieval.checkpoint import load_params
    from vlretrieval.models import layout

    switched, straight = str(tmp_path / "switched"), str(tmp_path / "straight")
    one = "train.num_devices=1"  # layouts, not sharding: one device compiles the three runs faster
    train(tiny_config(data_dir, "train.num_steps=3", one), switched, progress=False)
    _, scanned_params, _ = train(tiny_config(data_dir, "model.scan_layers=true", one), switched,
                                 progress=False)
    assert layout.is_scanned(scanned_params)
    _, params, _ = train(tiny_config(data_dir, one), straight, progress=False)
    # Attention key biases have a zero gradient in exact arithmetic (the softmax ignores them),
    # so Adam turns their rounding noise into lr-sized steps: compared apart, loosely.
    def split(tree):
        flat = traverse_util.flatten_dict(tree, sep="/")
        keys = {k: v for k, v in flat.items() if k.endswith("attention/key/bias")}
        return {k: v for k, v in flat.items() if k not in keys}, keys
    (got, got_keys), (want, want_keys) = (
        split(layout.to_layout(jax.device_get(scanned_params), False)), split(jax.device_get(params)))
    assert_close_relative(got, want)
    for name in want_keys:
        # 6 steps of learning rate <= 2e-3, each an Adam step of about unit size.
        np.testing.assert_allclose(got_keys[name], want_keys[name], atol=2e-2)
    # load_params (--init_from) stacks an unrolled run's parameters for a scanned model.
    stacked = load_params(straight, jax.device_get(scanned_params))
    for a, b in zip(jax.tree.leaves(stacked), jax.tree.leaves(layout.to_layout(jax.device_get(params), True))):
        np.testing.assert_array_equal(a, b)
    unrolled = evaluate_checkpoint(tiny_config(data_dir, one), switched)
    scanned = evaluate_checkpoint(tiny_config(data_dir, "model.scan_layers=true", one), switched)
    assert scanned["average"] == unrolled["average"]
