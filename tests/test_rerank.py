"""Joint-model retrieval and re-ranking report the same metrics as the towers, consistently."""

import jax
import numpy as np
import pytest

from tests.helpers import tiny_model_config
from vlretrieval import parallel
from vlretrieval.data.tokenizer import TextTokenizer, train_wordpiece_tokenizer
from vlretrieval.evaluation import rerank
from vlretrieval.evaluation.evaluate import evaluate_split
from vlretrieval.models import build_model, init_params

WORDS = "red green blue circle square triangle small large left right above below".split()


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(0)
    captions = [[" ".join(rng.choice(WORDS, size=5)) for _ in range(2)] for _ in range(12)]
    tokenizer = TextTokenizer(train_wordpiece_tokenizer([c for cs in captions for c in cs], 100))
    model = build_model(tiny_model_config(), tokenizer.vocab_size)
    params = init_params(model, jax.random.PRNGKey(0))
    split = {
        "images": rng.integers(0, 256, size=(12, 16, 16, 3), dtype=np.uint8),
        "captions": {"en": captions},
    }
    return model, params, split, tokenizer


def _evaluate(setup, mode, shortlist=20, tower_weight=0.0):
    model, params, split, tokenizer = setup
    return evaluate_split(
        model, params, split, tokenizer, mesh=parallel.make_mesh(8), batch_size=8,
        max_text_length=12, recall_at=(1, 5, 10), mode=mode, shortlist_size=shortlist,
        pair_batch_size=16, rerank_tower_weight=tower_weight,
    )


def test_rerank_of_the_whole_gallery_equals_joint_mode(setup):
    joint = _evaluate(setup, "joint")
    # A shortlist as long as the gallery: the joint model orders everything.
    whole = _evaluate(setup, "rerank", shortlist=24)
    assert whole["languages"] == joint["languages"]
    assert joint["mode"] == "joint" and whole["shortlist"] == 24


def test_rerank_of_a_shortlist_of_one_equals_towers(setup):
    towers = _evaluate(setup, "towers")
    one = _evaluate(setup, "rerank", shortlist=1)
    # Re-ordering one candidate changes nothing: the same ranks as the towers.
    assert one["languages"] == towers["languages"]


def test_score_fusion_dominated_by_the_towers_equals_towers(setup):
    towers = _evaluate(setup, "towers")
    fused = _evaluate(setup, "rerank", shortlist=24, tower_weight=1e6)
    for language, metrics in towers["languages"].items():
        assert fused["languages"][language]["mean_recall"] == pytest.approx(metrics["mean_recall"])


def test_reranked_ranks_on_a_hand_made_case():
    # One query, gallery of 4 (owner = index); the positive is item 2.
    tower_scores = np.array([[0.9, 0.8, 0.7, 0.1]])
    candidates = np.array([[0, 1, 2]])  # shortlist of 3 by tower score
    joint_scores = np.array([[0.5, -1.0, 2.0]])  # the joint model prefers the positive
    ranks = rerank.reranked_ranks(tower_scores, candidates, joint_scores, np.array([2]), np.arange(4))
    assert ranks.tolist() == [0]
    # Positive outside the shortlist: keeps its tower rank.
    ranks = rerank.reranked_ranks(tower_scores, candidates, joint_scores, np.array([3]), np.arange(4))
    assert ranks.tolist() == [3]
    # Inside it but beaten by one candidate in the joint order.
    joint_scores = np.array([[3.0, -1.0, 2.0]])
    ranks = rerank.reranked_ranks(tower_scores, candidates, joint_scores, np.array([2]), np.arange(4))
    assert ranks.tolist() == [1]


def test_joint_scores_of_all_pairs_use_the_itm_head(setup):
    model, params, split, tokenizer = setup
    scorer = rerank.make_pair_scorer(model, params, parallel.make_mesh(1), 16)
    ids, mask = tokenizer.encode([c for cs in split["captions"]["en"] for c in cs], 12)
    images = split["images"].astype(np.float32) / 127.5 - 1
    scores = rerank.all_pairs_scores(scorer, ids, mask, images)
    assert scores.shape == (24, 12)
    logits = model.apply({"params": params}, ids[3:4], mask[3:4], images[5:6], method=model.joint_forward)["itm_logits"]
    np.testing.assert_allclose(scores[3, 5], float(logits[0, 1] - logits[0, 0]), atol=1e-5)
