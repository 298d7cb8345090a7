"""Saved indexes: round trip, refusal of incompatible encoders, index -> search and eval --index."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs.demo import get_config
from tests.helpers import tiny_model_config
from vlretrieval.data.tokenizer import TextTokenizer, train_wordpiece_tokenizer
from vlretrieval.errors import UserError
from vlretrieval.evaluation import checkpoints, index, index_commands
from vlretrieval.models import build_model, init_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ["red", "green", "blue", "square", "circle", "small", "large", "a", "the", "on"]


def unit(rows, dim, seed=0):
    vectors = np.random.default_rng(seed).normal(size=(rows, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_round_trip_keeps_embeddings_ids_and_provenance(tmp_path):
    path = str(tmp_path / "gallery.safetensors")
    embeddings = unit(5, 8)
    ids = ["img0", "ünïcode", "", "a/b", "4"]
    index.write_index(path, embeddings, ids, step=42, config_hash="abc123")
    saved = index.read_index(path)
    np.testing.assert_array_equal(saved.embeddings, embeddings)
    assert saved.item_ids == ids and saved.step == 42 and saved.config_hash == "abc123"
    assert saved.normalized and saved.dim == 8 and saved.modality == "image"
    assert os.listdir(tmp_path) == ["gallery.safetensors"]  # no temporary file left beside it


def test_incompatible_encoders_and_files_are_refused_in_one_line(tmp_path):
    path = str(tmp_path / "gallery.safetensors")
    index.write_index(path, unit(3, 8), ["a", "b", "c"], step=1, config_hash="h")
    saved = index.read_index(path)
    with pytest.raises(UserError, match="dimension 8 but this query encoder gives 16"):
        index.query_checker(saved, path)(unit(2, 16))
    with pytest.raises(UserError, match="L2-normalised but this query encoder's are not normalised"):
        index.query_checker(saved, path)(3 * unit(2, 8))
    index.query_checker(saved, path)(unit(2, 8))  # compatible: no error
    with pytest.raises(UserError, match="no such file"):
        index.read_index(str(tmp_path / "missing.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="not a readable safetensors file"):
        index.read_index(str(tmp_path / "junk.safetensors"))


class FakeData:
    """What `datasets.open_dataset` returns, for a tiny in-memory split (without category labels)."""

    categories = None

    def __init__(self, tokenizer, images, captions):
        self.tokenizer = tokenizer
        self.records = [
            {"image": image, "image_id": f"photo{i}".encode(), "captions": {"en": [c.encode() for c in caps]}}
            for i, (image, caps) in enumerate(zip(images, captions))
        ]

    def split(self, name):
        return self.records


def tiny_checkpoint(monkeypatch, count: int, seed: int, step: int):
    """(config, model, params, data, images, captions): a random tiny model over `count` random
    images with 2 captions each, standing in for a trained checkpoint (`restore_for_evaluation`)."""
    tokenizer = TextTokenizer(train_wordpiece_tokenizer(iter(WORDS * 20), vocab_size=100))
    config = get_config()
    config.model = tiny_model_config()
    config.data.languages = ("en",)
    config.data.max_text_length = 8
    config.eval.batch_size = 8
    config.train.num_devices = 1  # sharding is tested in test_sharded_eval.py; here: the files
    model = build_model(config.model, tokenizer.vocab_size)
    params = init_params(model, jax.random.key(seed))
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (count, 16, 16, 3)).astype(np.uint8)
    captions = [[" ".join(rng.choice(WORDS, 4)) for _ in range(2)] for _ in range(count)]
    data = FakeData(tokenizer, images, captions)
    monkeypatch.setattr(index_commands, "restore_for_evaluation", lambda config, workdir: (model, params, data, step))
    return config, model, params, data, images, captions


def test_index_then_search_and_eval_with_the_index(tmp_path, monkeypatch):
    config, model, params, data, images, captions = tiny_checkpoint(monkeypatch, 6, seed=0, step=7)
    config.eval.metrics = ("recall", "map")

    path = str(tmp_path / "gallery.safetensors")
    summary = index_commands.build_index(config, str(tmp_path), path)
    assert summary["items"] == 6 and summary["step"] == 7 and summary["normalized"]
    saved = index.read_index(path)
    assert saved.item_ids == [f"photo{i}" for i in range(6)]
    assert saved.config_hash == index.config_hash(config.model)

    found = index_commands.search_index(config, str(tmp_path), path, [captions[3][0], "red square"], k=3)
    assert [len(f["results"]) for f in found] == [3, 3]
    scores = [r["score"] for r in found[0]["results"]]
    assert scores == sorted(scores, reverse=True)

    # eval with the index gives the metrics of eval embedding the images itself.
    (tmp_path / "direct").mkdir()
    config.eval.report = False
    direct = checkpoints.evaluate_checkpoint(config, str(tmp_path / "direct"), model, params, data)
    config.eval.report = True
    config.eval.index = path
    indexed = checkpoints.evaluate_checkpoint(config, str(tmp_path), model, params, data)
    assert indexed["languages"] == direct["languages"] and indexed["index"]["step"] == 7
    assert os.path.exists(tmp_path / "results.md") and os.path.exists(tmp_path / "results_recall_at_k.png")

    # An index of another dimension is refused.
    index.write_index(path, unit(6, 4), [str(i) for i in range(6)], step=1, config_hash="other")
    with pytest.raises(UserError, match="dimension 4"):
        checkpoints.evaluate_checkpoint(config, str(tmp_path), model, params, data)


def test_cli_search_with_a_missing_index_is_one_error_line(tmp_path):
    missing = tmp_path / "none.safetensors"
    result = subprocess.run(
        [sys.executable, "-m", "vlretrieval.cli", "search", "--config", "configs/demo.py:tiny",
         "--workdir", str(tmp_path / "w"), "--index", str(missing), "--query", "a red square"],
        capture_output=True, text=True, cwd=ROOT, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(missing) in lines[0]


def test_a_code_index_is_searched_and_evaluated_by_hamming_distance(tmp_path, monkeypatch):
    """`index --codes` stores the embeddings' signs packed (embed_dim / 8 bytes an item); search
    and eval rank by Hamming distance, and eval's recall equals the float evaluation's sign-code
    (`hamming`) section; float and code indexes refuse the other kind of query in one line."""
    from vlretrieval.evaluation import codes

    config, model, params, data, images, captions = tiny_checkpoint(monkeypatch, 12, seed=1, step=3)
    tokenizer = data.tokenizer
    config.eval.report = False

    path = str(tmp_path / "codes.safetensors")
    summary = index_commands.build_index(config, str(tmp_path), path, binary=True)
    assert summary["code_bits"] == 16 and summary["bytes_per_item"] == 4 and summary["code_source"] == "sign"
    saved = index.read_index(path)
    assert saved.is_codes and saved.embeddings.dtype == np.uint32 and saved.embeddings.shape == (12, 1)
    image_embeddings = np.asarray(model.apply({"params": params}, images.astype(np.float32) / 127.5 - 1,
                                              method=model.encode_image))
    np.testing.assert_array_equal(saved.embeddings, codes.pack_codes(image_embeddings))

    found = index_commands.search_index(config, str(tmp_path), path, [captions[5][0]], k=12)
    ids, mask = tokenizer.encode([captions[5][0]], 8)
    query = np.asarray(model.apply({"params": params}, ids, mask, method=model.encode_text)) >= 0
    distances = ((image_embeddings >= 0) != query).sum(axis=1)
    expected = sorted(range(12), key=lambda i: (distances[i], i))  # ties to the lower index
    assert [r["id"] for r in found[0]["results"]] == [f"photo{i}" for i in expected]
    assert [r["score"] for r in found[0]["results"]] == [-float(distances[i]) for i in expected]

    config.eval.metrics = ("recall", "hamming")
    direct = checkpoints.evaluate_checkpoint(config, str(tmp_path), model, params, data)
    config.eval.index = path
    indexed = checkpoints.evaluate_checkpoint(config, str(tmp_path), model, params, data)
    for direction in ("text_to_image", "image_to_text"):
        for k in (1, 5, 10):
            assert indexed["average"][direction][f"R@{k}"] == direct["average"]["hamming"][direction][f"R@{k}"]

    with pytest.raises(UserError, match="16-bit binary codes; float embeddings cannot query it"):
        index.query_checker(saved, path)(unit(2, 16))
    with pytest.raises(UserError, match="16-bit codes from the embeddings' signs but this model's text codes are "
                                        "64 bits from a hashing head"):
        index.check_code_queries(saved, path, 64, "hash_head")
    float_path = str(tmp_path / "floats.safetensors")
    index.write_index(float_path, unit(3, 16), ["a", "b", "c"], step=1, config_hash="h")
    with pytest.raises(UserError, match="holds float embeddings; binary codes cannot query it"):
        index.check_code_queries(index.read_index(float_path), float_path, 16, "sign")
