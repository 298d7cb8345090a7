"""TERAN's late-interaction score against a loop-by-loop numpy reference, for each aggregation;
padding words and regions never change a score."""

import numpy as np
import pytest

from vlretrieval.late_interaction import AGGREGATIONS, pair_scores


def reference(words, word_mask, regions, region_mask, aggregation):
    scores = np.zeros((len(words), len(regions)))
    for t, (w, wm) in enumerate(zip(words, word_mask)):
        real_words = [x / np.linalg.norm(x) for x, m in zip(w, wm) if m]
        for i, (r, rm) in enumerate(zip(regions, region_mask)):
            real_regions = [x / np.linalg.norm(x) for x, m in zip(r, rm) if m]
            matrix = np.array([[a @ b for b in real_regions] for a in real_words])
            per_word = matrix.max(axis=1)
            if aggregation == "max_sum":
                scores[t, i] = per_word.sum()
            elif aggregation == "max_mean":
                scores[t, i] = per_word.mean()
            else:
                scores[t, i] = 0.5 * (per_word.mean() + matrix.max(axis=0).mean())
    return scores


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_scores_equal_the_reference_and_padding_changes_nothing(aggregation):
    rng = np.random.default_rng(0)
    words = rng.normal(size=(3, 5, 8)).astype(np.float32)
    word_mask = np.array([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]])
    regions = rng.normal(size=(4, 6, 8)).astype(np.float32)
    region_mask = np.array([[1] * 6, [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0]])
    got = np.asarray(pair_scores(words, word_mask, regions, region_mask, aggregation))
    np.testing.assert_allclose(got, reference(words, word_mask, regions, region_mask, aggregation), atol=1e-5)
    # Padding: other values in the padded positions, and more padding, give the same scores.
    noisy_words = np.where(word_mask[..., None] == 1, words, 100 * rng.normal(size=words.shape)).astype(np.float32)
    noisy_regions = np.concatenate([np.where(region_mask[..., None] == 1, regions, 50.0),
                                    rng.normal(size=(4, 3, 8))], axis=1).astype(np.float32)
    wider_mask = np.concatenate([region_mask, np.zeros((4, 3), int)], axis=1)
    np.testing.assert_allclose(np.asarray(pair_scores(noisy_words, word_mask, noisy_regions, wider_mask, aggregation)),
                               got, atol=1e-6)


def test_a_hand_made_pair_scores_as_worked_out():
    # Two words, two regions, orthogonal unit vectors: word 0 matches region 1 exactly, word 1
    # lies halfway between the regions (cosine 1/sqrt(2) with both).
    words = np.array([[[0.0, 1.0], [1.0, 1.0]]], np.float32)
    regions = np.array([[[1.0, 0.0], [0.0, 1.0]]], np.float32)
    masks = np.ones((1, 2)), np.ones((1, 2))
    half = 1 / np.sqrt(2)
    assert float(pair_scores(words, masks[0], regions, masks[1], "max_sum")[0, 0]) == pytest.approx(1 + half)
    assert float(pair_scores(words, masks[0], regions, masks[1], "max_mean")[0, 0]) == pytest.approx((1 + half) / 2)
    # Region 0's best word is word 1 (1/sqrt(2)), region 1's is word 0 (1).
    assert float(pair_scores(words, masks[0], regions, masks[1], "symmetric")[0, 0]) == pytest.approx((1 + half) / 2)
    with pytest.raises(ValueError, match="unknown aggregation"):
        pair_scores(words, masks[0], regions, masks[1], "mean_max")


@pytest.mark.parametrize("aggregation", ["max_mean", "symmetric"])
def test_the_sharded_hinge_and_its_gradients_equal_one_device_on_1_2_4_8_devices(aggregation):
    import jax

    from vlretrieval import parallel
    from vlretrieval.late_interaction import late_interaction_hinge

    rng = np.random.default_rng(1)
    words = rng.normal(size=(16, 6, 8)).astype(np.float32)
    word_mask = (np.arange(6)[None, :] < rng.integers(2, 7, size=(16, 1))).astype(np.int32)
    regions = rng.normal(size=(16, 5, 8)).astype(np.float32)
    region_mask = (np.arange(5)[None, :] < rng.integers(1, 6, size=(16, 1))).astype(np.int32)
    whole = lambda w, r: late_interaction_hinge(w, word_mask, r, region_mask, 0.2, aggregation, top_k=2)
    want_loss, want_grads = jax.value_and_grad(whole, argnums=(0, 1))(words, regions)
    assert float(want_loss) > 0
    for devices in (1, 2, 4, 8):
        mesh = parallel.make_mesh(devices)
        sharded_loss = parallel.CrossDeviceLosses(mesh).late_interaction_hinge_loss
        batch = parallel.global_batch({"w": words, "wm": word_mask, "r": regions, "rm": region_mask}, mesh)
        def loss_of(w, r, wm, rm, loss_fn=sharded_loss):
            return loss_fn(w, wm, r, rm, 0.2, aggregation, top_k=2)

        step = jax.jit(jax.value_and_grad(loss_of, argnums=(0, 1)))
        loss, grads = step(batch["w"], batch["r"], batch["wm"], batch["rm"])
        np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-5, atol=1e-6)
        for got, want in zip(grads, want_grads):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


def _states(rng, count, length, dim=8):
    states = rng.normal(size=(count, length, dim)).astype(np.float32)
    mask = np.zeros((count, length), np.float32)
    for row in range(count):
        mask[row, : rng.integers(1, length + 1)] = 1
    return np.concatenate([states, mask[..., None]], axis=-1)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_evaluation_scores_every_pair_by_blocks_over_the_devices_as_the_reference(aggregation):
    """The gallery scored in blocks (texts split over 8 fake devices, chunks that do not divide
    the counts) equals the loop-by-loop reference."""
    from vlretrieval.evaluation import late_scores

    rng = np.random.default_rng(3)
    words, regions = _states(rng, 13, 5), _states(rng, 7, 4)
    got = late_scores.score_matrix(words, regions, aggregation, text_chunk=6, image_chunk=3)
    want = reference(words[..., :-1], words[..., -1], regions[..., :-1], regions[..., -1], aggregation)
    np.testing.assert_allclose(got, want, atol=1e-5)
    pairs = late_scores.pair_scorer(aggregation, pair_batch_size=4)(
        words[[0, 5, 12], :, :-1], words[[0, 5, 12], :, -1], regions[[6, 0, 3]])
    np.testing.assert_allclose(pairs, want[[0, 5, 12], [6, 0, 3]], atol=1e-5)


def test_late_interaction_rerank_of_the_whole_gallery_equals_full_late_interaction():
    from vlretrieval.evaluation import late_scores

    rng = np.random.default_rng(4)
    words, regions = _states(rng, 12, 5), _states(rng, 6, 4)
    owners, image_owners = np.repeat(np.arange(6), 2), np.arange(6)
    full, _ = late_scores.late_interaction_ranks(words, regions, owners, image_owners)
    tower_scores = rng.normal(size=(12, 6)).astype(np.float32)
    # A shortlist as long as the gallery: the towers' order no longer matters.
    reranked = late_scores.late_interaction_rerank_ranks(words, regions, tower_scores, owners, image_owners, 12)
    for a, b in zip(full, reranked):
        np.testing.assert_array_equal(a.ranks("index"), b.ranks("index"))
