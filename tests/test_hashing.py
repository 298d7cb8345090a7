"""The hashing head (model.head.hash_bits) and its terms: codes that `codes.pack_codes` packs, the
quantisation term and joint teaching's refinement rule on hand-made cases, the similarity term
against a numpy reference and on 1/2/4/8 devices as on one. The short joint-teaching training
run is in test_distill.py (one run for every teacher term)."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.demo import get_config
from tests.helpers import assert_close_relative, tiny_model_config
from vlretrieval import losses, parallel, structure_losses
from vlretrieval.config import load_config
from vlretrieval.config_checks import check_config
from vlretrieval.errors import UserError
from vlretrieval.evaluation import codes
from vlretrieval.models import build_model, init_params
from vlretrieval.objectives import make_objective

BATCH, BITS, DIM = 32, 16, 24


@pytest.mark.parametrize("kind", ["decomposed", "dual"])
def test_the_hashing_head_gives_codes_that_pack(kind):
    config = tiny_model_config(kind)
    config.head.hash_bits = BITS
    model = build_model(config, vocab_size=50)
    params = init_params(model, jax.random.PRNGKey(0))
    assert params["image_hash"]["kernel"].shape == (config.head.embed_dim, BITS)
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.random((3, 16, 16, 3)), jnp.float32)
    ids = jnp.asarray(rng.integers(5, 50, (3, 12)), jnp.int32)
    mask = jnp.ones_like(ids)
    outputs, image_codes, text_codes = jax.jit(lambda p: (
        model.apply({"params": p}, images, ids, mask),
        model.apply({"params": p}, images, method=model.encode_image_codes),
        model.apply({"params": p}, ids, mask, method=model.encode_text_codes)))(params)
    assert outputs["image_hash_logits"].shape == outputs["text_hash_logits"].shape == (3, BITS)
    for got, logits in ((image_codes, outputs["image_hash_logits"]), (text_codes, outputs["text_hash_logits"])):
        assert got.shape == (3, BITS) and set(np.unique(np.asarray(got))) <= {-1.0, 1.0}
        np.testing.assert_array_equal(np.asarray(got) > 0, np.asarray(logits) >= 0)  # the sign of h
        packed = codes.pack_codes(np.asarray(got))
        assert packed.shape == (3, codes.words_per_item(BITS)) and packed.dtype == np.uint32
        np.testing.assert_array_equal(codes.unpack_codes(packed, BITS), np.asarray(got) > 0)
    # Off (the default): no head, no outputs; existing checkpoints keep their parameters.
    plain = build_model(tiny_model_config(kind), vocab_size=50)
    plain_params = jax.eval_shape(lambda: init_params(plain, jax.random.PRNGKey(0)))
    assert "image_hash" not in plain_params and "text_hash" not in plain_params


def test_a_code_length_that_is_not_a_multiple_of_8_is_refused():
    config = tiny_model_config()
    config.head.hash_bits = 12
    with pytest.raises(UserError, match="hash_bits") as error:
        build_model(config, vocab_size=50)
    assert "\n" not in str(error.value)
    with pytest.raises(UserError, match="config.model.head.hash_bits is 12; it must be 0"):
        check_config(load_config("configs/demo.py:tiny", ["model.head.hash_bits=12"]))
    for bits in (0, 16, 32, 64, 128):
        check_config(load_config("configs/demo.py:tiny", [f"model.head.hash_bits={bits}"]))


def test_the_quantization_term_on_hand_made_codes():
    half = np.arctanh(0.5)
    assert float(structure_losses.quantization_loss(jnp.array([[20.0, -20.0]]))) == pytest.approx(0.0, abs=1e-6)
    assert float(structure_losses.quantization_loss(jnp.zeros((2, 8)))) == pytest.approx(1.0)
    assert float(structure_losses.quantization_loss(jnp.array([[half, -half]]))) == pytest.approx(0.25, rel=1e-6)
    # Averaged over the arrays given (towers, students): (0.25 + 1) / 2.
    assert float(structure_losses.quantization_loss(jnp.full((4, 8), half), jnp.zeros((4, 8)))) == pytest.approx(0.625)


def test_the_joint_teaching_refinement_rule_on_a_hand_made_case():
    teacher = jnp.array([0.2, 0.2, 0.2, -0.4])
    student = jnp.array([0.8, 1.0, 0.6, -0.4])
    peer = jnp.array([0.8, -1.0, 0.2, -0.4])
    got = np.asarray(structure_losses.refined_similarity(teacher, student, peer, 0.5))
    # Agreement g = 1 - |student - peer| / 2: 1, 0, 0.8, 1; target (1 - g/2) teacher + g/2 mean.
    want = [0.5 * 0.2 + 0.5 * 0.8,  # the students agree: halfway to them
            0.2,  # they disagree completely: the teacher's similarity stands
            0.6 * 0.2 + 0.4 * 0.4,
            -0.4]  # all agree: unchanged
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(structure_losses.refined_similarity(teacher, student, peer, 0.0)), teacher)


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def outputs_with_codes(seed=0, peer=True):
    rng = np.random.default_rng(seed)
    images = _unit(rng.normal(size=(BATCH, DIM)))
    outputs = {
        "image_embeddings": images,
        "text_embeddings": _unit(images + 0.6 * rng.normal(size=(BATCH, DIM))),
        "teacher_image_embeddings": _unit(rng.normal(size=(BATCH, DIM + 8))),
        "teacher_text_embeddings": _unit(rng.normal(size=(BATCH, DIM + 8))),
        "image_hash_logits": rng.normal(size=(BATCH, BITS)).astype(np.float32),
        "text_hash_logits": rng.normal(size=(BATCH, BITS)).astype(np.float32),
        "logit_scale": np.float32(10.0),
    }
    if peer:
        outputs["peer_image_hash_logits"] = rng.normal(size=(BATCH, BITS)).astype(np.float32)
        outputs["peer_text_hash_logits"] = rng.normal(size=(BATCH, BITS)).astype(np.float32)
    return outputs


def reference_hash_similarity(outputs, weights, refinement, teacher=True):
    """Weighted mean squared error of code similarities against the (refined) targets, float64."""
    f = lambda name: np.asarray(outputs[name], np.float64)  # noqa: E731
    codes_of = {tower: np.tanh(f(f"{tower}_hash_logits")) for tower in ("image", "text")}
    peers = {tower: np.tanh(f(f"peer_{tower}_hash_logits")) for tower in ("image", "text")
             if f"peer_{tower}_hash_logits" in outputs}
    targets = {tower: f(f"teacher_{tower}_embeddings" if teacher else f"{tower}_embeddings")
               for tower in ("image", "text")}
    total = 0.0
    for weight, rows, columns in zip(weights, ("image", "image", "text"), ("text", "image", "text")):
        target = targets[rows] @ targets[columns].T
        student = codes_of[rows] @ codes_of[columns].T / BITS
        if not peers:
            total += weight * np.mean((student - target) ** 2)
            continue
        peer = peers[rows] @ peers[columns].T / BITS
        agreement = 1 - np.abs(student - peer) / 2
        refined = (1 - refinement * agreement) * target + refinement * agreement * (student + peer) / 2
        total += weight * (np.mean((student - refined) ** 2) + np.mean((peer - refined) ** 2))
    return total


WEIGHTS = (1.0, 0.5, 0.25)


def _tower_loss(tower_losses, **overrides):
    config = get_config().objectives
    config.update({"contrastive": 0.0, "hash_similarity": 1.0, "joint_teaching_refinement": 0.4,
                   "similarity_image_text": WEIGHTS[0], "similarity_image_image": WEIGHTS[1],
                   "similarity_text_text": WEIGHTS[2], **overrides})
    objective = make_objective(None, config, patch_size=8, mask_id=None, vocab_size=0, tower_losses=tower_losses)
    return lambda outputs: objective.tower_loss(outputs, {})[0]


@pytest.mark.parametrize("peer", [False, True], ids=["teacher", "joint_teaching"])
def test_the_hash_similarity_term_equals_the_numpy_reference(peer):
    outputs = outputs_with_codes(peer=peer)
    got = _tower_loss(losses)(jax.tree.map(jnp.asarray, outputs))
    assert float(got) == pytest.approx(reference_hash_similarity(outputs, WEIGHTS, 0.4), rel=1e-5)


def test_without_a_teacher_the_codes_keep_the_students_own_similarities():
    outputs = outputs_with_codes(peer=False)
    del outputs["teacher_image_embeddings"], outputs["teacher_text_embeddings"]
    got = _tower_loss(losses)(jax.tree.map(jnp.asarray, outputs))
    assert float(got) == pytest.approx(reference_hash_similarity(outputs, WEIGHTS, 0.4, teacher=False), rel=1e-5)


@pytest.mark.parametrize("peer", [False, True], ids=["teacher", "joint_teaching"])
def test_the_hash_distillation_term_is_the_distillation_kl_on_the_normalised_relaxed_codes(peer):
    from tests.test_distill import TEMPERATURE, reference_distillation

    outputs = outputs_with_codes(peer=peer)
    got = _tower_loss(losses, hash_similarity=0.0, hash_distillation=1.0, distillation_temperature=TEMPERATURE)(
        jax.tree.map(jnp.asarray, outputs))
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    expected = 0.0
    for prefix in ("", "peer_") if peer else ("",):
        as_student = {"image_embeddings": unit(np.tanh(outputs[f"{prefix}image_hash_logits"].astype(np.float64))),
                      "text_embeddings": unit(np.tanh(outputs[f"{prefix}text_hash_logits"].astype(np.float64))),
                      "teacher_image_embeddings": outputs["teacher_image_embeddings"],
                      "teacher_text_embeddings": outputs["teacher_text_embeddings"]}
        expected += reference_distillation(as_student, *WEIGHTS)
    assert float(got) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("devices", [1, 2, 4, 8])
def test_sharded_hashing_terms_equal_one_device(devices):
    outputs = jax.tree.map(jnp.asarray, outputs_with_codes(seed=3))
    terms = {"hash_quantization": 0.1, "distillation": 0.5, "hash_distillation": 0.3}
    reference = jax.jit(jax.value_and_grad(_tower_loss(losses, **terms)))(outputs)
    mesh = parallel.make_mesh(devices)
    shardings = jax.tree.map(lambda x: parallel.batch_sharding(mesh) if x.ndim else parallel.replicated(mesh),
                             outputs)
    got = jax.jit(jax.value_and_grad(_tower_loss(parallel.CrossDeviceLosses(mesh), **terms)))(
        jax.device_put(outputs, shardings))
    assert float(got[0]) == pytest.approx(float(reference[0]), rel=1e-5)
    assert_close_relative(got[1], reference[1], rtol=1e-5)
    assert np.any(np.asarray(got[1]["peer_image_hash_logits"]))  # the peer learns too


def test_a_hashing_term_needs_a_hashing_head():
    from vlretrieval.objectives import check_objectives

    config = load_config("configs/demo.py:tiny", ["objectives.hash_quantization=1.0"])
    with pytest.raises(UserError, match="set config.model.head.hash_bits"):
        check_objectives(config.objectives, build_model(config.model, 50), None, True)
