"""Sharded evaluation gives the metrics of one device: 8 fake devices, and 2 local processes
(jax.distributed on 127.0.0.1 with gloo), each host embedding its own padded share."""

import json

import jax
import numpy as np
import pytest

from tests.helpers import run_local_hosts
from vlretrieval import parallel
from vlretrieval.evaluation import evaluate, metrics

WORDS = ["red", "green", "blue", "square", "circle", "small", "large", "a", "the", "on"]


def toy_inputs(seed: int = 0):
    """13 'images' (feature vectors), 2-3 captions each, and a fixed nonlinear 'encoder'."""
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(13, 6)).astype(np.float32)
    owners = np.repeat(np.arange(13), rng.integers(2, 4, 13))
    texts = (images[owners] + 0.7 * rng.normal(size=(len(owners), 6))).astype(np.float32)
    weights = rng.normal(size=(6, 5)).astype(np.float32)
    return images, texts, owners, weights


def toy_metrics(mesh, batch_size: int = 6) -> dict:
    images, texts, owners, weights = toy_inputs()
    encode = jax.jit(lambda x: jax.numpy.tanh(x @ weights))
    image_embeddings = evaluate.embed_in_batches(encode, [images], batch_size, mesh)
    text_embeddings = evaluate.embed_in_batches(encode, [texts], batch_size, mesh)
    return {
        "metrics": metrics.bidirectional_metrics(
            image_embeddings, text_embeddings, owners, (1, 5), metrics.METRICS,
            captions=[f"image {owner} caption {n % 3}" for n, owner in enumerate(owners)]),
        "image_embeddings": image_embeddings.tolist(),
    }


def flat(tree: dict, prefix: str = "") -> dict:
    """Nested metric dicts as one flat dict, which pytest.approx compares."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_host_batches_cover_every_item_once_with_equal_steps():
    seen, steps = [], set()
    for host in range(3):
        batches = list(evaluate.host_batches(11, 2, host, 3))
        steps.add(len(batches))
        for indices, valid in batches:
            seen.extend(indices[valid].tolist())
    assert steps == {2} and sorted(seen) == list(range(11))


def test_eight_devices_give_the_metrics_of_one():
    one, eight = toy_metrics(parallel.make_mesh(1)), toy_metrics(parallel.make_mesh(8))
    np.testing.assert_allclose(eight["image_embeddings"], one["image_embeddings"], rtol=1e-6, atol=1e-6)
    assert flat(eight["metrics"]) == pytest.approx(flat(one["metrics"]))
    # And on a real (tiny, random) model through evaluate_split.
    from tests.helpers import tiny_model_config
    from vlretrieval.data.tokenizer import TextTokenizer, train_wordpiece_tokenizer
    from vlretrieval.models import build_model, init_params

    tokenizer = TextTokenizer(train_wordpiece_tokenizer(iter(WORDS * 20), vocab_size=100))
    model = build_model(tiny_model_config(), tokenizer.vocab_size)
    params = init_params(model, jax.random.key(0))
    rng = np.random.default_rng(0)
    split = {
        "images": rng.integers(0, 256, (9, 16, 16, 3)).astype(np.uint8),
        "captions": {"en": [[" ".join(rng.choice(WORDS, 4)) for _ in range(2)] for _ in range(9)]},
    }
    results = [
        evaluate.evaluate_split(model, params, split, tokenizer, mesh=parallel.make_mesh(devices),
                                batch_size=8, max_text_length=8)
        for devices in (1, 8)
    ]
    assert flat(results[1]["languages"]) == pytest.approx(flat(results[0]["languages"]))


_HOST_SCRIPT = r"""
import json, sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
sys.path.insert(0, sys.argv[4])
from tests.test_sharded_eval import toy_metrics
from vlretrieval import parallel
result = toy_metrics(parallel.make_mesh())
result["devices"] = jax.device_count()
json.dump(result, open(sys.argv[3], "w"))
jax.distributed.shutdown()
"""


def test_two_processes_give_the_metrics_of_one_device(tmp_path):
    outputs = [tmp_path / f"host{i}.json" for i in range(2)]
    run_local_hosts(_HOST_SCRIPT, outputs)
    one = toy_metrics(parallel.make_mesh(1))
    for path in outputs:
        got = json.loads(path.read_text())
        assert got["devices"] == 2
        np.testing.assert_allclose(got["image_embeddings"], one["image_embeddings"], rtol=1e-6, atol=1e-6)
        assert flat(got["metrics"]) == pytest.approx(flat(one["metrics"]))
