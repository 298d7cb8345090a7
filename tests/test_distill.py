"""Distillation from a frozen teacher (config.distill): the similarity-structure loss equals a numpy
reference, on 1/2/4/8 devices as on one (loss and gradients), a teacher that cannot serve is one
error line, and a few steps of distillation (with hash codes and joint teaching: the one training
run of this file and test_hashing.py) lower the losses while the teacher stays frozen."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.demo import get_config
from tests.helpers import assert_close_relative
from vlretrieval import distillation, losses, parallel
from vlretrieval.checkpoint import Checkpointer, read_saved_params
from vlretrieval.config import load_config
from vlretrieval.data import datasets
from vlretrieval.errors import UserError
from vlretrieval.evaluation import codes
from vlretrieval.evaluation.checkpoints import evaluate_checkpoint
from vlretrieval.models import build_model
from vlretrieval.models.factory import example_inputs
from vlretrieval.objectives import make_objective
from vlretrieval.state import create_train_state, make_optimizer
from vlretrieval.train import train

GLOBAL_BATCH, DIM, TEACHER_DIM = 32, 16, 24
TEMPERATURE = 0.1


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def embeddings(seed=0):
    rng = np.random.default_rng(seed)
    images = _unit(rng.normal(size=(GLOBAL_BATCH, DIM)))
    teacher_images = _unit(rng.normal(size=(GLOBAL_BATCH, TEACHER_DIM)))
    return {
        "image_embeddings": images,
        "text_embeddings": _unit(images + 0.7 * rng.normal(size=(GLOBAL_BATCH, DIM))),
        "teacher_image_embeddings": teacher_images,
        "teacher_text_embeddings": _unit(teacher_images + 0.5 * rng.normal(size=(GLOBAL_BATCH, TEACHER_DIM))),
        "logit_scale": np.float32(12.0),
    }


def _log_softmax(x):
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def reference_kl(student_rows, student_columns, teacher_rows, teacher_columns, exclude_self):
    """Mean over rows of KL(softmax(teacher / T) || softmax(student / T)), float64."""
    s = np.asarray(student_rows, np.float64) @ np.asarray(student_columns, np.float64).T / TEMPERATURE
    t = np.asarray(teacher_rows, np.float64) @ np.asarray(teacher_columns, np.float64).T / TEMPERATURE
    total = 0.0
    for row in range(len(s)):
        keep = np.arange(s.shape[1]) != row if exclude_self else np.ones(s.shape[1], bool)
        log_p = _log_softmax(t[row : row + 1, keep])[0]
        log_q = _log_softmax(s[row : row + 1, keep])[0]
        total += np.sum(np.exp(log_p) * (log_p - log_q))
    return total / len(s)


def reference_distillation(outputs, image_text, image_image, text_text):
    i, t = outputs["image_embeddings"], outputs["text_embeddings"]
    ti, tt = outputs["teacher_image_embeddings"], outputs["teacher_text_embeddings"]
    return (image_text * (reference_kl(i, t, ti, tt, False) + reference_kl(t, i, tt, ti, False)) / 2
            + image_image * reference_kl(i, i, ti, ti, True) + text_text * reference_kl(t, t, tt, tt, True))


WEIGHTS = {"similarity_image_text": 1.0, "similarity_image_image": 0.5, "similarity_text_text": 0.25}


def test_distillation_loss_equals_the_numpy_reference():
    outputs = embeddings()
    got = losses.similarity_distillation_loss(
        outputs["image_embeddings"], outputs["text_embeddings"], outputs["teacher_image_embeddings"],
        outputs["teacher_text_embeddings"], TEMPERATURE, image_text=1.0, image_image=0.5, text_text=0.25,
    )
    assert float(got) == pytest.approx(reference_distillation(outputs, 1.0, 0.5, 0.25), rel=1e-5)
    # A student whose similarities are the teacher's has nothing to learn.
    same = losses.similarity_distillation_loss(
        outputs["teacher_image_embeddings"], outputs["teacher_text_embeddings"], outputs["teacher_image_embeddings"],
        outputs["teacher_text_embeddings"], TEMPERATURE,
    )
    assert abs(float(same)) < 1e-6


def _tower_loss(tower_losses, **overrides):
    config = get_config().objectives
    config.update({"contrastive": 0.0, "distillation": 1.0, "distillation_temperature": TEMPERATURE, **WEIGHTS,
                   **overrides})
    objective = make_objective(None, config, patch_size=8, mask_id=None, vocab_size=0, tower_losses=tower_losses)
    return lambda outputs: objective.tower_loss(outputs, {})[0]


def test_the_distillation_term_is_the_loss_times_its_weight():
    outputs = jax.tree.map(jnp.asarray, embeddings())
    got = _tower_loss(losses, distillation=2.0)(outputs)
    assert float(got) == pytest.approx(2 * reference_distillation(embeddings(), 1.0, 0.5, 0.25), rel=1e-5)


@pytest.mark.parametrize("devices", [1, 2, 4, 8])
def test_sharded_distillation_equals_one_device(devices):
    outputs = jax.tree.map(jnp.asarray, embeddings(seed=1))
    reference = jax.jit(jax.value_and_grad(_tower_loss(losses, contrastive=0.5)))(outputs)
    mesh = parallel.make_mesh(devices)
    shardings = jax.tree.map(lambda x: parallel.batch_sharding(mesh) if x.ndim else parallel.replicated(mesh),
                             outputs)
    sharded = jax.device_put(outputs, shardings)
    got = jax.jit(jax.value_and_grad(_tower_loss(parallel.CrossDeviceLosses(mesh), contrastive=0.5)))(sharded)
    assert float(got[0]) == pytest.approx(float(reference[0]), rel=1e-5)
    assert_close_relative(got[1], reference[1], rtol=1e-5)
    # The teacher's embeddings are targets: no gradient reaches them.
    assert not np.any(np.asarray(got[1]["teacher_image_embeddings"]))


# --- Teachers read from folders ---


def tiny_config(data_dir, *overrides):
    return load_config("configs/demo.py:tiny", [f"data.data_dir={data_dir}", *overrides])


def save_run(config, workdir, vocab_size):
    """A run folder holding a freshly initialised model of `config` at step 0 (a teacher need not
    be trained for its structure to be learnt)."""
    model = build_model(config.model, vocab_size)
    tx, _ = make_optimizer(config.optimizer, config.train.num_steps)
    checkpointer = Checkpointer(workdir)
    checkpointer.save(0, create_train_state(model, tx, config.seed + 7), config)
    checkpointer.wait()
    checkpointer.close()
    return workdir


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    """(data dir, vocab size, a teacher run folder: a wider decomposed model than the students)."""
    base = tmp_path_factory.mktemp("distill")
    data_dir = str(base / "data")
    config = tiny_config(data_dir, "model.transformer.width=48", "model.head.embed_dim=24")
    vocab = datasets.open_dataset(config.data, seed=config.seed).tokenizer.vocab_size
    return data_dir, vocab, save_run(config, str(base / "teacher"), vocab)


def _metrics(workdir, key):
    with open(os.path.join(workdir, "metrics.jsonl")) as handle:
        return [json.loads(line)[key] for line in handle]


def test_distilling_into_hash_codes_with_a_peer_lowers_the_losses_and_the_teacher_stays_frozen(teacher_run, tmp_path):
    """One short run for every teacher term (the suite's time): a dual-encoder student distilled
    from a wider decomposed teacher, with a hashing head and joint teaching, on two devices (the
    teacher's embeddings and the gathered matrices inside the sharded step)."""
    data_dir, _, teacher = teacher_run
    bits = 16
    config = tiny_config(
        data_dir, "model.kind=dual", f"distill.teacher={teacher}", "distill.joint_teaching=true",
        f"model.head.hash_bits={bits}", "objectives.contrastive=0.0", "objectives.distillation=1.0",
        "objectives.hash_similarity=1.0", "objectives.hash_quantization=0.1", "train.num_steps=6",
        "train.log_every=1", "train.checkpoint_every=3", "train.num_devices=2", "optimizer.learning_rate=0.02",
        "optimizer.warmup_steps=1", "eval.batch_size=64",
    )
    workdir = str(tmp_path / "student")
    model, params, _ = train(config, workdir, progress=False)
    assert "student" not in params and "text_encoder" in params  # the student, as evaluation wants it
    for key in ("distillation_loss", "hash_similarity_loss"):
        values = _metrics(workdir, key)
        assert values[-1] < 0.9 * values[0], (key, values)
    early, _ = read_saved_params(os.path.join(workdir, "checkpoints", "3"))
    late, _ = read_saved_params(os.path.join(workdir, "checkpoints", "6"))
    for name in ("student", "peer"):  # both students learn
        assert not np.allclose(early[name]["image_hash"]["kernel"], late[name]["image_hash"]["kernel"])
    original, _ = read_saved_params(teacher)
    for path, leaf in jax.tree_util.tree_leaves_with_path(original):  # the teacher is its own, frozen
        got = late["teacher"]
        for key in path:
            got = got[key.key]
        np.testing.assert_array_equal(np.asarray(got), np.asarray(leaf))
    # At inference the student writes codes that pack, and eval scores the saved student.
    images, ids, mask = example_inputs(model, batch_size=4)
    for got in (model.apply({"params": params}, images, method=model.encode_image_codes),
                model.apply({"params": params}, ids, mask, method=model.encode_text_codes)):
        assert codes.pack_codes(np.asarray(got)).shape == (4, codes.words_per_item(bits))
    results = evaluate_checkpoint(config, workdir)
    assert results["step"] == 6 and 0 <= results["average"]["mean_recall"] <= 100


def test_a_teacher_that_does_not_exist_is_one_line(teacher_run, tmp_path):
    data_dir, vocab, _ = teacher_run
    config = tiny_config(data_dir, f"distill.teacher={tmp_path / 'nowhere'}", "objectives.distillation=1.0")
    with pytest.raises(UserError, match="does not exist") as error:
        distillation.open_teacher(config, vocab)
    assert "\n" not in str(error.value)


def test_a_teacher_no_term_reads_and_a_term_with_no_teacher_are_refused(teacher_run):
    data_dir, vocab, teacher = teacher_run
    with pytest.raises(UserError, match="no term reads it"):
        distillation.open_teacher(tiny_config(data_dir, f"distill.teacher={teacher}"), vocab)
    with pytest.raises(UserError, match="set config.distill.teacher"):
        from vlretrieval.objectives import check_objectives

        config = tiny_config(data_dir, "objectives.distillation=1.0")
        check_objectives(config.objectives, build_model(config.model, vocab), None, True)


def test_a_text_only_teacher_cannot_teach_images_but_teaches_texts(teacher_run, tmp_path, capsys):
    """A converted sentence-transformers folder (a BERT text tower) as teacher: refused for the
    image matrices with one line (exit 2 from the CLI); for text x text alone its pooled,
    normalised embeddings are the sentence-transformers embeddings."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from tests.test_sentence_transformers import sentence_embeddings, write_sentence_transformer
    from vlretrieval import cli
    from vlretrieval.data.builders import demo_scenes

    data_dir, vocab, _ = teacher_run
    config = tiny_config(data_dir)
    tokenizer = demo_scenes.demo_tokenizer_path(datasets.open_dataset(config.data, seed=0).builder)
    (tmp_path / "st").mkdir()
    torch_model = write_sentence_transformer(tmp_path / "st", tokenizer, pooling="mean", width=32)
    converted = str(tmp_path / "converted")
    assert cli.run(["convert", "--from", "hf", str(tmp_path / "st"), "--to", converted,
                    "--config", "configs/demo.py:tiny"]) == 0
    args = ["train", "--config", "configs/demo.py:tiny", "--workdir", str(tmp_path / "w"), "--data_dir", data_dir,
            "--no_progress", f"--config.distill.teacher={converted}", "--config.objectives.distillation=1.0"]
    capsys.readouterr()  # the conversion's own output
    with pytest.raises(SystemExit) as exit_info:
        cli.main(args)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exit_info.value.code == 2
    assert len(lines) == 1 and "has no image tower" in lines[0], lines
    assert not os.path.exists(tmp_path / "w")

    text_only = tiny_config(data_dir, f"distill.teacher={converted}", "objectives.distillation=1.0",
                            "objectives.similarity_image_text=0.0", "objectives.similarity_image_image=0.0",
                            f"data.tokenizer={converted}/tokenizer")  # the teacher's tokenizer (the demo's)
    teacher = distillation.open_teacher(text_only, vocab)
    assert teacher.towers == ("text",) and teacher.embeddings == "pooled"
    student = build_model(text_only.model, vocab)
    model = distillation.training_model(text_only, student, vocab, teacher)
    params = jax.jit(lambda key: model.init(key, *_inputs(text_only), method=model.initialize)["params"])(
        jax.random.PRNGKey(0))
    params = distillation.with_teacher_params(params, teacher)
    ids = np.zeros((2, text_only.data.max_text_length), np.int32)
    ids[0, :5], ids[1, :4] = [2, 40, 41, 42, 3], [2, 50, 51, 3]
    mask = (ids > 0).astype(np.int32)
    got = model.apply({"params": params}, ids, mask, method=model.teacher_text_embeddings)
    np.testing.assert_allclose(np.asarray(got), sentence_embeddings(torch_model, ids, mask, "mean"), atol=1e-5)


def _inputs(config):
    size, length = config.model.image_size, config.data.max_text_length
    return (jnp.zeros((2, size, size, 3)), jnp.zeros((2, length), jnp.int32), jnp.ones((2, length), jnp.int32))
