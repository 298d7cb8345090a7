"""TextTopicNet (docs/topics.md): the LDA targets, the topic head, the soft cross-entropy term, topic
pre-training with topic-space retrieval, and the pre-trained tower as another run's initialisation."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import tiny_model_config
from vlretrieval import topics
from vlretrieval.config import load_config
from vlretrieval.config_checks import check_config
from vlretrieval.errors import UserError
from vlretrieval.models import build_model, init_params
from vlretrieval.objectives import check_objectives, make_objective

TOPICS = 6
# Texts about two kinds of things (fruit, machines), in English and German: an LDA separates them.
WORDS = (["apple", "pear", "plum", "cherry", "apfel", "birne"], ["engine", "wheel", "piston", "motor", "rad", "kolben"])


def _texts(count=120, seed=0):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS[i % 2], size=8)) + " " + " ".join(rng.choice(WORDS[(i + 1) % 2], size=2))
            for i in range(count)]


def _config(*overrides):
    return load_config("configs/demo.py:tiny", [f"model.head.num_topics={TOPICS}", "topics.min_df=1",
                                                 "topics.max_df=1.0", *overrides])


def test_lda_targets_are_distributions_deterministic_for_a_seed_and_saved_whole(tmp_path):
    texts = _texts()
    options = topics.settings(_config())
    first, again = topics.fit(texts, options), topics.fit(texts, options)
    targets = first.distributions(texts)
    assert targets.shape == (len(texts), TOPICS) and targets.dtype == np.float32
    assert np.all(targets >= 0)
    np.testing.assert_allclose(targets.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(targets, again.distributions(texts))  # the same seed, the same targets
    other_seed = topics.fit(texts, topics.settings(_config("seed=1")))
    assert not np.allclose(other_seed.distributions(texts), targets)
    # The two kinds of text get different dominant topics.
    dominant = targets.argmax(axis=1)
    assert set(dominant[0::2]).isdisjoint(set(dominant[1::2]))
    # Saved without pickle and read back: the same distributions, for new texts too.
    topics.save(first, str(tmp_path))
    assert sorted(os.listdir(tmp_path / "topics")) == ["lda.safetensors", "topics.json"]
    loaded = topics.load(str(tmp_path))
    new_texts = ["apple pear engine", "kolben rad motor", "nothing known here"]
    np.testing.assert_array_equal(loaded.distributions(texts), targets)
    np.testing.assert_array_equal(loaded.distributions(new_texts), first.distributions(new_texts))
    with open(tmp_path / "topics" / "topics.json") as handle:
        assert len(json.load(handle)["top_words"]) == TOPICS


def test_a_run_reuses_its_topic_model_and_refuses_one_fitted_otherwise(tmp_path):
    texts, workdir = _texts(), str(tmp_path)
    fitted = topics.run_topic_model(_config(), texts, workdir)
    reused = topics.run_topic_model(_config(), texts, workdir)
    np.testing.assert_array_equal(reused.distributions(texts), fitted.distributions(texts))
    with pytest.raises(UserError, match=r"fitted with other settings \(max_iter\)"):
        topics.run_topic_model(_config("topics.max_iter=3"), texts, workdir)
    with pytest.raises(UserError, match="fitted on other training texts"):
        topics.run_topic_model(_config(), texts[:-1], workdir)
    with pytest.raises(UserError, match="has 6 topics but config.model.head.num_topics is 4"):
        topics.load_for_head(workdir, 4)
    with pytest.raises(UserError, match="no topic model in"):
        topics.load(str(tmp_path / "elsewhere"))


@pytest.mark.parametrize("kind", ["decomposed", "dual"])
def test_the_topic_head_reads_the_pooled_image_output(kind):
    # Shapes only (no compile); the values are the pre-training run's below.
    config = tiny_model_config(kind)
    config.head.num_topics = TOPICS
    model = build_model(config, vocab_size=50)
    params = jax.eval_shape(lambda: init_params(model, jax.random.PRNGKey(0)))
    width = config.transformer.width if kind == "decomposed" else config.image_transformer.width
    assert params["image_topics"]["kernel"].shape == (width, TOPICS)  # on the pooled output, not the embedding
    images, ids = jnp.zeros((3, 16, 16, 3)), jnp.ones((3, 12), jnp.int32)
    outputs = jax.eval_shape(lambda p: model.apply({"params": p}, images, ids, ids), params)
    predicted = jax.eval_shape(lambda p: model.apply({"params": p}, images, method=model.encode_image_topics), params)
    assert outputs["image_topic_logits"].shape == predicted.shape == (3, TOPICS)
    assert predicted.dtype == jnp.float32
    plain = jax.eval_shape(lambda: init_params(build_model(tiny_model_config(kind), 50), jax.random.PRNGKey(0)))
    assert "image_topics" not in plain  # off by default: existing checkpoints keep their parameters


def test_the_topic_term_is_the_soft_cross_entropy_of_a_numpy_reference():
    config = _config("objectives.contrastive=0", "objectives.topic_prediction=2.0").objectives
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(8, TOPICS)).astype(np.float32) * 3
    targets = rng.dirichlet(np.full(TOPICS, 0.3), size=8).astype(np.float32)
    targets[0] = np.eye(TOPICS)[2]  # zeros in a target: 0 log 0 = 0
    objective = make_objective(None, config, patch_size=8, mask_id=None, vocab_size=0)
    outputs = {"image_topic_logits": jnp.asarray(logits), "logit_scale": jnp.float32(10.0)}
    total, metrics = objective.tower_loss(outputs, {"topic_targets": jnp.asarray(targets)})
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    reference = -np.mean(np.sum(targets * log_probs, axis=1))
    entropy = -np.mean(np.sum(np.where(targets > 0, targets * np.log(np.maximum(targets, 1e-30)), 0.0), axis=1))
    assert float(metrics["topic_prediction_loss"]) == pytest.approx(reference, rel=1e-5)
    assert float(metrics["topic_prediction_kl"]) == pytest.approx(reference - entropy, rel=1e-4)
    assert float(total) == pytest.approx(2.0 * reference, rel=1e-5)


def test_the_topic_term_and_topic_space_need_a_topic_head():
    config = load_config("configs/demo.py:tiny", ["objectives.contrastive=0", "objectives.topic_prediction=1"])
    with pytest.raises(UserError, match="trains a topic head: set config.model.head.num_topics") as error:
        check_objectives(config.objectives, build_model(config.model, 50), None, True)
    assert "\n" not in str(error.value)
    with pytest.raises(UserError, match="config.eval.mode=topics ranks by the image tower's predicted topics"):
        check_config(load_config("configs/demo.py:tiny", ["eval.mode=topics"]))
    with pytest.raises(UserError, match="config.model.head.num_topics is 1; it must be 0"):
        check_config(load_config("configs/demo.py:tiny", ["model.head.num_topics=1"]))


@pytest.fixture(scope="module")
def topic_run(tmp_path_factory):
    """A tiny topic pre-training run (no contrastive term), evaluated in topic space: (config, workdir, results)."""
    from vlretrieval.train import train_and_evaluate

    data_dir, workdir = (str(tmp_path_factory.mktemp(name)) for name in ("topic_data", "topic_run"))
    config = load_config("configs/demo.py:tiny", [
        f"data.data_dir={data_dir}", "data.languages=('en',)", "data.labels=dominant_shape",
        "data.num_train=256", "data.num_test=64", f"model.head.num_topics={TOPICS}",
        "objectives.contrastive=0", "objectives.topic_prediction=1", "train.num_steps=40",
        "train.log_every=5", "train.checkpoint_every=40", "train.num_devices=1",
        "optimizer.learning_rate=0.003", "optimizer.warmup_steps=4", "eval.mode=topics",
        "eval.metrics=('recall','mean_recall','label_map')", "eval.report=false", "eval.batch_size=64",
    ])
    return config, workdir, train_and_evaluate(config, workdir, progress=False)


def test_topic_pretraining_lowers_the_topic_loss_and_retrieves_above_chance_in_topic_space(topic_run):
    _, workdir, results = topic_run
    with open(os.path.join(workdir, "metrics.jsonl")) as handle:
        losses = [json.loads(line)["topic_prediction_loss"] for line in handle]
    assert losses[-1] < losses[0] - 0.1, losses
    assert os.path.isfile(os.path.join(workdir, "results_topics.json"))  # towers' results.json untouched
    average = results["average"]
    assert results["mode"] == "topics"
    assert average["text_to_image"]["R@10"] > 1.5 * 100 * 10 / 64, average  # chance: 10 of 64 images
    assert average["text_to_image"]["label_mAP"] > 0, average


def test_the_pretrained_tower_initialises_a_contrastive_run(topic_run, tmp_path):
    from flax import traverse_util

    from vlretrieval.checkpoint import read_saved_params
    from vlretrieval.train import _checked_run, _initialised_from

    config, workdir, _ = topic_run
    overrides = [f"{key}={value}" for key, value in (
        ("data.data_dir", config.data.data_dir), ("data.languages", "('en',)"), ("data.num_train", 256),
        ("data.num_test", 64), ("model.head.num_topics", TOPICS), ("train.init_from", workdir))]
    contrastive = load_config("configs/demo.py:tiny", overrides)  # topic_prediction off, contrastive on
    state = _initialised_from(contrastive, str(tmp_path / "run"), _checked_run(contrastive, str(tmp_path / "run")))
    saved, _ = read_saved_params(workdir)
    got, want = (traverse_util.flatten_dict(tree, sep="/") for tree in (state.params, saved))
    assert got.keys() == want.keys()
    for name in want:  # every parameter is the pre-trained one (the topic head too, unused from now on)
        np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(want[name]), err_msg=name)
    # Without the head the checkpoint's extra parameters are refused, naming one.
    from vlretrieval.convert.initialise import initial_params

    headless = load_config("configs/demo.py:tiny", overrides[:-2])
    vocab_size = state.params["joint"]["text_embeddings"]["token"]["embedding"].shape[0]
    template = jax.eval_shape(lambda: init_params(build_model(headless.model, vocab_size), jax.random.PRNGKey(0)))
    with pytest.raises(UserError, match="checkpoint parameter image_topics/bias is not in this model"):
        initial_params(workdir, template, headless.model)
