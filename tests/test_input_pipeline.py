"""The grain input pipeline on encoded images: crops, per-host shards, saved state, padded eval."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from tests.helpers import run_local_hosts
from vlretrieval.data import images, pipeline
from vlretrieval.data.tokenizer import TextTokenizer, train_wordpiece_tokenizer

WORDS = ["red", "green", "blue", "square", "circle", "small", "large", "a", "the", "on"]


def jpeg(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array.astype(np.uint8)).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def solid(width, height, colour) -> np.ndarray:
    return np.broadcast_to(np.asarray(colour, np.uint8), (height, width, 3)).copy()


@pytest.fixture(scope="module")
def tokenizer():
    return TextTokenizer(train_wordpiece_tokenizer(iter(WORDS * 20), vocab_size=100))


def records(count: int, seed: int = 0):
    """Records as a prepared image-caption dataset returns them: encoded bytes, bytes captions."""
    rng = np.random.default_rng(seed)
    out = []
    for index in range(count):
        width, height = int(rng.integers(40, 90)), int(rng.integers(40, 90))
        caption = " ".join(rng.choice(WORDS, size=int(rng.integers(2, 9))))
        out.append({
            "image": jpeg(rng.integers(0, 256, (height, width, 3))),
            "image_id": f"img{index}".encode(),
            "captions": {"en": [caption.encode()], "de": []},
        })
    return out


def training(source, tokenizer, batch=4, seed=0, process_index=0, process_count=1):
    return pipeline.training_dataset(source, tokenizer, pipeline.BatchOptions(
        local_batch_size=batch, languages=("en", "de"), max_text_length=6, seed=seed, image_size=24,
        process_index=process_index, process_count=process_count,
    ))


def test_random_crop_boxes_stay_inside_and_cover_the_requested_area():
    rng = np.random.default_rng(0)
    for _ in range(200):
        width, height = int(rng.integers(20, 400)), int(rng.integers(20, 400))
        left, top, right, bottom = images.random_crop_box(width, height, rng, scale=(0.3, 0.9))
        assert 0 <= left < right <= width and 0 <= top < bottom <= height
        fraction = (right - left) * (bottom - top) / (width * height)
        square = min(width, height) ** 2 / (width * height)
        # Either a draw that fits (area within the range, up to rounding) or the centre square.
        assert 0.25 <= fraction <= 0.95 or fraction == pytest.approx(square)


def test_eval_transform_resizes_the_shorter_side_and_keeps_the_centre():
    # 300 x 100: left third red, middle third green, right third blue -> the centre is green.
    picture = np.concatenate(
        [solid(100, 100, (255, 0, 0)), solid(100, 100, (0, 255, 0)), solid(100, 100, (0, 0, 255))],
        axis=1,
    )
    out = images.eval_image(jpeg(picture), 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    centre = out[4:-4, 4:-4].reshape(-1, 3).mean(axis=0)
    assert centre[1] > 200 and centre[0] < 40 and centre[2] < 40


def test_decoded_arrays_of_the_model_size_pass_through_and_others_are_refused():
    array = np.arange(24 * 24 * 3, dtype=np.uint8).reshape(24, 24, 3)
    assert images.model_image(array, 24) is array or np.array_equal(images.model_image(array, 24), array)
    with pytest.raises(ValueError, match="image size 32"):
        images.model_image(array, 32)


def test_training_batches_are_decoded_cropped_tokenized_and_deterministic(tokenizer):
    source = records(12)
    first = training(source, tokenizer)[0]
    again = training(source, tokenizer)[0]
    assert first["images"].shape == (4, 24, 24, 3) and first["images"].dtype == np.float32
    assert -1.0 <= first["images"].min() and first["images"].max() <= 1.0
    assert first["token_ids"].shape == (4, 6) and first["text_mask"].shape == (4, 6)
    for key in first:
        np.testing.assert_array_equal(first[key], again[key])
    # Only captioned languages are drawn ("de" is empty here).
    for index, ids, mask in zip(first["index"], first["token_ids"], first["text_mask"]):
        caption = source[index]["captions"]["en"][0].decode()
        expected_ids, expected_mask = tokenizer.encode([caption], 6)
        np.testing.assert_array_equal(ids, expected_ids[0])
        np.testing.assert_array_equal(mask, expected_mask[0])
    other_seed = training(source, tokenizer, seed=1)[0]
    assert not np.array_equal(first["images"], other_seed["images"])


def test_a_restored_pipeline_state_continues_with_the_same_batches(tokenizer):
    source = records(10)
    uninterrupted = pipeline.TrainingBatches({"image_text": training(source, tokenizer, batch=3)})
    expected = [next(uninterrupted) for _ in range(9)]  # three epochs of 3 batches

    stopped = pipeline.TrainingBatches({"image_text": training(source, tokenizer, batch=3)})
    for _ in range(4):
        next(stopped)
    state = json.loads(json.dumps(stopped.get_state()))  # as the checkpoint stores it
    resumed = pipeline.TrainingBatches({"image_text": training(source, tokenizer, batch=3)})
    resumed.set_state(state)
    for want in expected[4:]:
        got = next(resumed)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    with pytest.raises(ValueError, match="text_text"):
        resumed.set_state({"image_text": state["image_text"], "text_text": {"next_index": 0}})


def test_padded_evaluation_batches_give_every_host_the_same_steps_and_mask_the_padding():
    source = records(11)
    seen = []
    lengths = set()
    for host in range(3):
        batches = list(pipeline.evaluation_dataset(
            source, image_size=16, local_batch_size=2, process_index=host, process_count=3
        ))
        lengths.add(len(batches))
        for batch in batches:
            assert batch["images"].shape == (2, 16, 16, 3)
            seen.extend(int(i) for i in batch["index"][batch["valid"]])
    assert lengths == {2}  # ceil(ceil(11 / 3) / 2): the longest shard sets it for all
    assert sorted(seen) == list(range(11))  # padding never counts; every image exactly once


_HOST_SCRIPT = r"""
import json, sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
sys.path.insert(0, sys.argv[4])
from tests.test_input_pipeline import records, training, WORDS
from vlretrieval.data import pipeline
from vlretrieval.data.tokenizer import TextTokenizer, train_wordpiece_tokenizer
tokenizer = TextTokenizer(train_wordpiece_tokenizer(iter(WORDS * 20), vocab_size=100))
source = records(12)
dataset = training(source, tokenizer, batch=2, process_index=jax.process_index(),
                   process_count=jax.process_count())
epoch = pipeline.steps_per_epoch(len(source), 2 * jax.process_count())
batches = [dataset[step] for step in range(epoch)]
json.dump({"process": jax.process_index(), "epoch_steps": epoch,
           "indices": [int(i) for batch in batches for i in batch["index"]],
           "images": [batch["images"].tolist() for batch in batches]}, open(sys.argv[3], "w"))
jax.distributed.shutdown()
"""


def test_two_hosts_read_disjoint_slices_of_the_same_global_batches(tmp_path, tokenizer):
    outputs = [tmp_path / f"host{i}.json" for i in range(2)]
    run_local_hosts(_HOST_SCRIPT, outputs)
    read = [json.loads(path.read_text()) for path in outputs]
    assert [r["process"] for r in read] == [0, 1]
    assert read[0]["epoch_steps"] == read[1]["epoch_steps"] == 3  # hosts agree on an epoch
    first, second = (set(r["indices"]) for r in read)
    assert len(first) == len(second) == 6  # one epoch: 3 steps x 2 examples, no repeats
    assert not first & second and first | second == set(range(12))
    # Together they read exactly the global batches one host reads alone, crops included.
    alone = training(records(12), tokenizer, batch=4)
    for step in range(3):
        together = np.concatenate([np.asarray(r["images"][step]) for r in read])
        np.testing.assert_allclose(together, alone[step]["images"], atol=1e-6)
        assert [*read[0]["indices"][2 * step:2 * step + 2], *read[1]["indices"][2 * step:2 * step + 2]] == (
            alone[step]["index"].tolist()
        )
