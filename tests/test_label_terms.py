"""The IDCMR label terms: the losses equal a numpy reference written from the formulas, the same
over 1/2/4/8 fake devices as on one (loss and gradients, labels gathered), and data without labels
(or a label metric asked of it) is refused with one line before any work, through the CLI."""

import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.demo import get_config
from tests.helpers import ROOT, assert_close_relative
from vlretrieval import losses, parallel
from vlretrieval.errors import UserError
from vlretrieval.objectives import make_objective
from vlretrieval.objectives.label_terms import check_label_data

GLOBAL_BATCH, DIM, CATEGORIES = 32, 16, 5
SCALE, INVARIANCE = 3.0, 0.7


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def inputs(seed=0):
    rng = np.random.default_rng(seed)
    images = _unit(rng.normal(size=(GLOBAL_BATCH, DIM)))
    outputs = {"image_embeddings": images,
               "text_embeddings": _unit(images + 0.7 * rng.normal(size=(GLOBAL_BATCH, DIM))),
               "logit_scale": np.float32(12.0)}
    labels = (rng.random((GLOBAL_BATCH, CATEGORIES)) < 0.3).astype(np.float32)  # multi-label, some rows empty
    return outputs, {"labels": labels}


def reference_nll(rows, columns, row_labels, column_labels, exclude_self):
    """Mean over the (distinct, if `exclude_self`) pairs of log(1 + e^G) - S G, G = SCALE x cosine."""
    total, count = 0.0, 0
    for i in range(len(rows)):
        for j in range(len(columns)):
            if exclude_self and i == j:
                continue
            logit = SCALE * float(np.dot(rows[i].astype(np.float64), columns[j].astype(np.float64)))
            similar = float(np.any((row_labels[i] > 0) & (column_labels[j] > 0)))
            total += np.log1p(np.exp(logit)) - similar * logit
            count += 1
    return total / count


def reference_losses(outputs, labels):
    u, v = outputs["image_embeddings"], outputs["text_embeddings"]
    intra = reference_nll(u, u, labels, labels, True) + reference_nll(v, v, labels, labels, True)
    gap = np.mean(np.sum((u.astype(np.float64) - v) ** 2, axis=1))
    inter = reference_nll(u, v, labels, labels, False) + INVARIANCE * gap
    return intra, inter


def test_the_label_losses_equal_the_numpy_reference():
    outputs, batch = inputs()
    intra, inter = reference_losses(outputs, batch["labels"])
    u, v, labels = outputs["image_embeddings"], outputs["text_embeddings"], batch["labels"]
    assert float(losses.label_intra_modal_loss(u, v, labels, SCALE)) == pytest.approx(intra, rel=1e-5)
    assert float(losses.label_inter_modal_loss(u, v, labels, SCALE, INVARIANCE)) == pytest.approx(inter, rel=1e-5)


def _tower_loss(tower_losses, **weights):
    config = get_config().objectives
    config.update({"contrastive": 0.0, "label_similarity_scale": SCALE, "modality_invariance": INVARIANCE,
                   **weights})
    objective = make_objective(None, config, patch_size=8, mask_id=None, vocab_size=0, tower_losses=tower_losses)
    return lambda outputs, batch: objective.tower_loss(outputs, batch)


def test_the_terms_are_the_losses_times_their_weights():
    outputs, batch = inputs(seed=2)
    intra, inter = reference_losses(outputs, batch["labels"])
    total, logged = _tower_loss(losses, label_intra_modal=2.0, label_inter_modal=0.5)(
        jax.tree.map(jnp.asarray, outputs), jax.tree.map(jnp.asarray, batch))
    assert float(total) == pytest.approx(2.0 * intra + 0.5 * inter, rel=1e-5)
    assert float(logged["label_intra_modal_loss"]) == pytest.approx(intra, rel=1e-5)
    assert float(logged["label_inter_modal_loss"]) == pytest.approx(inter, rel=1e-5)


@pytest.mark.parametrize("devices", [1, 2, 4, 8])
def test_sharded_label_terms_equal_one_device(devices):
    outputs, batch = jax.tree.map(jnp.asarray, inputs(seed=1))
    weights = dict(contrastive=0.5, label_intra_modal=1.0, label_inter_modal=0.5)
    loss = lambda tower_losses: (lambda o, b: _tower_loss(tower_losses, **weights)(o, b)[0])
    reference = jax.jit(jax.value_and_grad(loss(losses)))(outputs, batch)
    mesh = parallel.make_mesh(devices)
    per_example = lambda x: parallel.batch_sharding(mesh) if x.ndim else parallel.replicated(mesh)
    sharded = jax.device_put((outputs, batch), jax.tree.map(per_example, (outputs, batch)))
    got = jax.jit(jax.value_and_grad(loss(parallel.CrossDeviceLosses(mesh))))(*sharded)
    assert float(got[0]) == pytest.approx(float(reference[0]), rel=1e-5)
    assert_close_relative(got[1], reference[1], rtol=1e-5)
    assert np.any(np.asarray(reference[1]["image_embeddings"]))


def test_label_terms_refuse_data_without_labels_and_shards_and_bad_settings():
    on = get_config().objectives
    on.label_inter_modal = 1.0

    def refuse(*_):
        raise UserError("needs category labels")

    check_label_data(get_config().objectives, types.SimpleNamespace(shards=None, labels=refuse))  # off: no check
    with pytest.raises(UserError, match="needs category labels"):
        check_label_data(on, types.SimpleNamespace(shards=None, labels=refuse))
    with pytest.raises(UserError, match="webdataset shards carry none"):
        check_label_data(on, types.SimpleNamespace(shards=object(), labels=lambda *_: None))
    from vlretrieval.objectives import check_objectives

    on.label_similarity_scale = 0.0
    with pytest.raises(UserError, match="label_similarity_scale must be above 0"):
        check_objectives(on, model=None, mask_id=None, has_content_words=True)


def _cli(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    return subprocess.Popen([sys.executable, "-m", "vlretrieval.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)


def test_label_metrics_and_terms_on_unlabelled_data_are_one_error_line(tmp_path):
    data = str(tmp_path / "data")
    common = ("--config", "configs/demo.py:tiny", "--data_dir", data, "--no_progress")
    # eval refuses before reading any checkpoint (the workdir has none), train before any work.
    prepare = subprocess.run([sys.executable, "-m", "vlretrieval.cli", "prepare-data", *common[:4]],
                             capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert prepare.returncode == 0, prepare.stderr
    runs = {
        "config.eval.metrics=label_map": _cli("eval", *common, "--workdir", str(tmp_path / "empty"),
                                              "--config.eval.metrics=('recall','label_map')"),
        "config.objectives.label_intra_modal": _cli("train", *common, "--workdir", str(tmp_path / "run"),
                                                    "--config.objectives.label_intra_modal=1.0"),
    }
    for needed_by, process in runs.items():
        _, stderr = process.communicate(timeout=120)
        lines = stderr.strip().splitlines()
        assert process.returncode == 2, (needed_by, stderr[-2000:])
        assert len(lines) == 1 and lines[0].startswith("error: ") and "needs category labels" in lines[0], lines
        assert needed_by in lines[0], lines[0]
    assert not os.path.exists(tmp_path / "run")
