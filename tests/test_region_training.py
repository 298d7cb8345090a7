"""The demo trains from detector-region features: the joint model (with masked region modelling)
and its towers, and TERAN's late interaction, each to recall far above chance."""

import json
import os

import pytest

from vlretrieval.config import load_config
from vlretrieval.evaluation.checkpoints import evaluate_checkpoint
from vlretrieval.train import train

TEST_IMAGES = 100  # chance R@1 text -> image is 1%


def short_run(variant: str, data_dir: str, steps: int, *extra: str):
    return load_config(f"configs/demo_regions.py:{variant}_tiny", [
        f"data.data_dir={data_dir}", "data.num_train=2048", f"data.num_test={TEST_IMAGES}",
        f"train.num_steps={steps}", "train.batch_size=64", "optimizer.warmup_steps=20",
        f"train.checkpoint_every={steps}", f"train.log_every={steps}", "data.languages=('en',)",
        "eval.batch_size=100", "eval.report=false", "train.num_devices=1", *extra,
    ])


def evaluated(config, workdir, trained, mode: str):
    model, params, data = trained
    with config.unlocked():
        config.eval.mode = mode
        config.eval.shortlist = 10
    return evaluate_checkpoint(config, workdir, model, params, data, step=config.train.num_steps)["average"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("region_data"))


def test_the_joint_region_model_pretrained_with_masked_region_modelling_retrieves_far_above_chance(
        data_dir, tmp_path):
    # InfoNCE and masked region modelling (ITM and MLM are tested with patches: tests/test_decomposition.py).
    config = short_run("joint", data_dir, 100, "objectives.image_text_matching=0.0",
                       "objectives.masked_language_model=0.0", "train.log_every=10")
    trained = train(config, str(tmp_path), progress=False)
    with open(os.path.join(tmp_path, "metrics.jsonl")) as handle:
        logged = [json.loads(line) for line in handle if '"masked_region_classes_accuracy"' in line]
    for term in ("masked_region_features_loss", "masked_region_classes_loss", "contrastive_loss"):
        assert logged[-1][term] == logged[-1][term], term  # finite
    # 5 shapes: chance is 0.2. Each logged accuracy is one batch's masked regions (about 30), so
    # the last three logs together.
    recent = [entry["masked_region_classes_accuracy"] for entry in logged[-3:]]
    print("masked object classification accuracy, last three logs:", recent)
    assert sum(recent) / len(recent) > 0.4, recent
    towers = evaluated(config, str(tmp_path), trained, "towers")
    print("joint region model, towers:", towers)
    assert towers["text_to_image"]["R@1"] > 20 and towers["image_to_text"]["R@1"] > 20, towers


def test_teran_late_interaction_trains_and_retrieves_far_above_chance(data_dir, tmp_path):
    config = short_run("teran", data_dir, 100)
    trained = train(config, str(tmp_path), progress=False)
    late = evaluated(config, str(tmp_path), trained, "late_interaction")
    print("TERAN, late interaction:", late)
    assert late["text_to_image"]["R@1"] > 20 and late["image_to_text"]["R@1"] > 20, late
    assert 0 < late["text_to_image"]["NDCG@25"] <= 100
    reranked = evaluated(config, str(tmp_path), trained, "late_interaction_rerank")
    assert reranked["text_to_image"]["R@1"] > 8, reranked
