"""Decomposition: towers started from a joint checkpoint are that joint transformer, run alone."""

import jax
import numpy as np
import pytest

from tests.test_cli import assert_one_line_error, run_cli
from vlretrieval.checkpoint import load_params
from vlretrieval.config import load_config
from vlretrieval.errors import UserError
from vlretrieval.models import build_model, init_params
from vlretrieval.models.joint import JointVLTransformer
from vlretrieval.models.towers import l2_normalize, pool
from vlretrieval.train import train


@pytest.fixture(scope="module")
def joint_run(tmp_path_factory):
    """A tiny joint pre-training run (ITC + ITM + MLM), finished, and its config."""
    data_dir = str(tmp_path_factory.mktemp("data"))
    workdir = str(tmp_path_factory.mktemp("joint"))
    # One device: what is tested is the weights (sharding: test_sharded_step.py).
    config = load_config("configs/demo_joint.py:tiny", [f"data.data_dir={data_dir}", "train.num_devices=1"])
    _, params, data = train(config, workdir, progress=False)
    return workdir, config, params, data


def test_joint_pretraining_trains_every_objective(joint_run):
    import json
    import os

    workdir = joint_run[0]
    with open(os.path.join(workdir, "metrics.jsonl")) as handle:
        last = [json.loads(line) for line in handle][-1]
    for term in ("contrastive_loss", "image_text_matching_loss", "masked_language_model_loss"):
        assert np.isfinite(last[term]), term


def test_towers_from_a_joint_checkpoint_equal_the_joint_transformer_on_one_modality(joint_run, tmp_path):
    workdir, _, joint_params, data = joint_run
    config = load_config("configs/demo_decompose.py:tiny", [f"data.data_dir={data.directory}"])
    model = build_model(config.model, data.tokenizer.vocab_size)
    params = load_params(workdir, init_params(model, jax.random.PRNGKey(7)))
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(joint_params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    rng = np.random.default_rng(0)
    images = rng.normal(size=(4, 64, 64, 3)).astype(np.float32)
    token_ids, text_mask = data.tokenizer.encode(["a small red circle", "ein großes blaues Quadrat"] * 2, 32)
    joint = JointVLTransformer(model.config)  # the joint model alone, on the checkpoint's weights
    joint_params_only = {"params": params["joint"]}
    text_sequence = joint.apply(joint_params_only, token_ids, text_mask, method=joint.encode_text_sequence)
    image_sequence = joint.apply(joint_params_only, images, method=joint.encode_image_sequence)
    expected_text = l2_normalize(pool(text_sequence, text_mask, "mean") @ params["text_projection"]["kernel"])
    expected_image = l2_normalize(image_sequence[:, 0] @ params["image_projection"]["kernel"])
    towers = model.apply({"params": params}, images, token_ids, text_mask)
    np.testing.assert_allclose(np.asarray(towers["text_embeddings"]), np.asarray(expected_text), atol=1e-5)
    np.testing.assert_allclose(np.asarray(towers["image_embeddings"]), np.asarray(expected_image), atol=1e-5)


def test_decomposition_trains_from_the_joint_checkpoint_with_composed_negatives(joint_run, tmp_path):
    workdir, _, _, data = joint_run
    config = load_config(
        "configs/demo_decompose.py:tiny",
        [f"data.data_dir={data.directory.split('/demo_scenes/')[0]}", f"train.init_from={workdir}",
         "objectives.hardest_negative_hinge=0.5", "objectives.reweighted_contrastive=0.5"],
    )
    assert config.objectives.composed_text_negatives and config.objectives.composed_image_negatives
    _, params, _ = train(config, str(tmp_path / "decomposed"), progress=False)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(params))


def test_init_from_another_architecture_names_the_parameter_and_shapes(joint_run, tmp_path):
    workdir, _, _, data = joint_run
    model = build_model(
        load_config("configs/demo.py:tiny", ["model.transformer.width=48", "model.transformer.num_heads=4"]).model,
        data.tokenizer.vocab_size,
    )
    shapes = r"parameter \S+ has shape \(\d+(, \d+)*\) in the checkpoint but \(\d+(, \d+)*\) in this model"
    with pytest.raises(UserError, match=shapes):
        load_params(workdir, init_params(model, jax.random.PRNGKey(0)))
    result = run_cli(
        "train", "--config", "configs/demo.py:tiny", "--workdir", str(tmp_path / "w"),
        "--data_dir", data.directory.split("/demo_scenes/")[0], "--init_from", workdir,
        "--config.model.transformer.width=48", "--no_progress",
    )
    assert_one_line_error(result, "image_projection/kernel", "(32, 32) in the checkpoint but (48, 32)")
    assert not (tmp_path / "w").exists()  # refused before anything was written
