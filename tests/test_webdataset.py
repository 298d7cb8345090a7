"""Training from img2dataset's webdataset shards: it learns, hosts read disjoint samples, a run
killed with SIGKILL resumes exactly, bad members are skipped and counted, evaluation galleries are
loaded per host."""

import json
import logging
import os
import random
import signal
import tarfile
import time

import numpy as np
import pytest

from tests.helpers import assert_nested_close, run_local_hosts
from tests.test_multihost import (
    assert_params_equal,
    finish,
    saved_params,
    vlretrieval,
    wait_for_step,
)
from tests.webdataset_fixtures import demo_samples, jpeg, sample_members, write_shards, write_tar
from vlretrieval import cli
from vlretrieval.config import load_config
from vlretrieval.data import datasets, pipeline, shard_index, streaming
from vlretrieval.data.shards import ShardSource
from vlretrieval.errors import UserError
from vlretrieval.train import train_and_evaluate

SHARDS, PER_SHARD, TRAIN, TEST = 8, 256, 2048, 100


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory):
    """8 img2dataset shards of 256 demo scenes (English captions in KEY.txt, every language in
    KEY.json), and the prepared demo set whose test split evaluates them."""
    base = tmp_path_factory.mktemp("webdataset")
    data_dir = str(base / "data")
    demo = load_config("configs/demo.py:tiny", [f"data.data_dir={data_dir}", f"data.num_train={TRAIN}",
                                                f"data.num_test={TEST}"])
    data = datasets.open_dataset(demo.data, seed=0)
    (base / "shards").mkdir()
    paths = write_shards(base / "shards", demo_samples(data, TRAIN), PER_SHARD)
    return {"paths": paths, "pattern": str(base / "shards" / "{00000..00007}.tar"), "data_dir": data_dir,
            "eval_dir": data.directory, "base": base}


def shard_overrides(shard_set) -> list[str]:
    return ["data.name=webdataset", f"data.shards={shard_set['pattern']}", f"data.data_dir={shard_set['data_dir']}",
            f"data.eval_dataset_dir={shard_set['eval_dir']}", "data.languages=('en',)", "data.shuffle_buffer=512"]


def test_training_from_img2dataset_shards_lifts_recall_far_above_chance(shard_set, tmp_path, caplog):
    # prepare-data reads every shard once and writes the index that gives training its epochs.
    assert cli.run(["prepare-data", "--config", "configs/demo.py:tiny", "--no_progress",
                    *(f"--config.{override}" for override in shard_overrides(shard_set))]) == 0
    index = shard_index.read_index(shard_set["data_dir"], shard_set["paths"])
    assert index["samples"] == TRAIN and [s["samples"] for s in index["shards"]] == [PER_SHARD] * SHARDS
    assert index["languages"] == {"en": TRAIN} and index["bad_records"]["counts"] == {}
    config = load_config("configs/demo.py:tiny", [
        *shard_overrides(shard_set), "model.transformer.width=64", "model.transformer.depth=2",
        "model.transformer.num_heads=4", "model.transformer.mlp_dim=128", "model.head.embed_dim=64",
        "train.batch_size=64", "train.num_steps=160", "train.log_every=40", "train.checkpoint_every=160",
        "optimizer.learning_rate=0.003", "optimizer.warmup_steps=20", "eval.batch_size=104", "train.num_devices=1",
    ])
    with caplog.at_level(logging.INFO, logger="vlretrieval"):
        results = train_and_evaluate(config, str(tmp_path), progress=False)
    chance = 100 / TEST
    assert results["average"]["text_to_image"]["R@1"] > 8 * chance, results["average"]
    assert results["average"]["image_to_text"]["R@1"] > 8 * chance, results["average"]
    # 2,048 indexed samples / 64 per step: an epoch every 32 steps.
    assert "epoch 5 done: streaming no bad records" in caplog.text


def _bad_shard(path, start):
    """One shard with a member of each bad kind between good samples."""
    good = lambda n, caption="a red square": sample_members(f"{n:09d}", jpeg(np.full((16, 16, 3), n % 255)), caption)
    members = [*good(start), *good(start + 1, caption="")]  # empty caption
    members += [(f"{start + 2:09d}.jpg", b"\xff\xd8 not a jpeg"), (f"{start + 2:09d}.txt", b"broken image")]
    members += [(f"{start + 3:09d}.jpg", jpeg(np.zeros((16, 16, 3))))]  # no caption at all
    members += [(f"{start + 4:09d}.txt", b"a caption without its image"), *good(start + 5)]
    write_tar(path, members)


def test_bad_members_of_each_kind_are_skipped_counted_and_named_once_per_shard(tmp_path, caplog):
    paths = [str(tmp_path / f"{i:05d}.tar") for i in range(3)]
    _bad_shard(paths[0], 0)
    _bad_shard(paths[1], 10_000)
    whole = tmp_path / "whole.tar"
    image = jpeg(np.ones((16, 16, 3)))
    write_tar(whole, [member for n in range(20_000, 20_004) for member in sample_members(f"{n:09d}", image, "x")])
    with tarfile.open(whole) as archive:  # a truncated tar: cut inside its third sample's image
        cut = next(m for m in archive.getmembers() if m.name == "000020002.jpg").offset_data + 10
    with open(paths[2], "wb") as handle:
        handle.write(whole.read_bytes()[:cut])
    tally = streaming.BadTally()
    stream = streaming.sample_stream(paths, seed=0, readers=2, epochs=1, tally=tally)
    with caplog.at_level(logging.WARNING, logger="vlretrieval"):
        keys = sorted(sample.key for _, _, sample in stream)
    assert keys == ["000000000", "000000005", "000010000", "000010005", "000020000", "000020001"]
    assert tally.counts == {"empty caption": 2, "undecodable image": 2, "missing caption": 2,
                            "sample without an image": 2, "truncated tar": 1}
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 3 and all(any(path in line for line in warnings) for path in paths)
    with pytest.raises(UserError, match="on_bad_record is 'fail'"):
        list(streaming.sample_stream(paths[:1], seed=0, readers=1, epochs=1, on_bad_record="fail"))


def test_the_seed_decides_the_order_and_the_same_seed_repeats_it(shard_set):
    def order(seed):
        stream = streaming.sample_stream(shard_set["paths"], seed=seed, readers=3, epochs=2)
        return [(epoch, sample.key) for epoch, _, sample in stream]

    first, again, other = order(0), order(0), order(1)
    assert first == again and first != other
    assert len(first) == 2 * TRAIN and sorted(first) == sorted(other)
    # Each epoch reads every sample once, its shards in a new order.
    epochs = [[key for epoch, key in first if epoch == e] for e in (0, 1)]
    assert sorted(epochs[0]) == sorted(epochs[1]) and len(set(epochs[0])) == TRAIN and epochs[0] != epochs[1]


_HOST_SCRIPT = r"""
import json, sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
sys.path.insert(0, sys.argv[4])
from vlretrieval.data import shards, streaming
paths = shards.shard_paths(json.loads(open(sys.argv[3] + ".in").read()))
stream = streaming.sample_stream(paths, seed=0, readers=2, epochs=1, process_index=jax.process_index(),
                                 process_count=jax.process_count())
json.dump({"process": jax.process_index(), "keys": [sample.key for _, _, sample in stream]}, open(sys.argv[3], "w"))
jax.distributed.shutdown()
"""


def test_two_local_processes_read_disjoint_samples_that_cover_the_epoch(shard_set, tmp_path):
    outputs = [tmp_path / f"host{i}.json" for i in range(2)]
    for output in outputs:
        (tmp_path / f"{output.name}.in").write_text(json.dumps(shard_set["pattern"]))
    run_local_hosts(_HOST_SCRIPT, outputs)
    read = [json.loads(path.read_text()) for path in outputs]
    assert [r["process"] for r in read] == [0, 1]
    first, second = (r["keys"] for r in read)
    assert len(first) == len(set(first)) == len(second) == len(set(second)) == TRAIN // 2  # 4 shards each
    every = {f"{s * 10_000 + i:09d}" for s in range(SHARDS) for i in range(PER_SHARD)}
    assert not set(first) & set(second) and set(first) | set(second) == every


def _stream_batches(shard_set, tokenizer, local_batch_size=24, process_count=1):
    options = pipeline.BatchOptions(local_batch_size=local_batch_size, languages=("en", "de"), max_text_length=16,
                                    seed=3, image_size=32, process_count=process_count)
    source = ShardSource(tuple(shard_set["paths"]), {"en": "caption", "de": "caption_de"}, "en")
    return streaming.StreamBatches(source, tokenizer, options, shuffle_buffer=100, readers=3, workers=2)


def test_a_saved_position_resumes_to_the_uninterrupted_batches_keys_and_pixels(shard_set):
    demo = load_config("configs/demo.py:tiny", [f"data.data_dir={shard_set['data_dir']}"])
    tokenizer = datasets.open_dataset(demo.data, seed=0).tokenizer
    stop = random.Random().randint(1, 120)  # anywhere: mid-window, mid-shard, past an epoch (85 batches)
    uninterrupted = _stream_batches(shard_set, tokenizer)
    reference = [next(uninterrupted) for _ in range(stop + 12)]
    uninterrupted.close()
    stopped = _stream_batches(shard_set, tokenizer)
    for _ in range(stop):
        next(stopped)
    state = json.loads(json.dumps(stopped.get_state()))  # as a checkpoint stores it
    stopped.close()
    resumed = _stream_batches(shard_set, tokenizer)
    resumed.set_state(state)
    for step in range(stop, stop + 12):
        batch = next(resumed)
        assert batch["sample_keys"].tolist() == reference[step]["sample_keys"].tolist(), f"stopped at {stop}"
        for field in ("images", "token_ids", "text_mask"):
            np.testing.assert_array_equal(batch[field], reference[step][field], err_msg=f"stopped at {stop}")
    resumed.close()
    # The batch size may change on resume: the position counts samples.
    smaller = _stream_batches(shard_set, tokenizer, local_batch_size=12)
    smaller.set_state(state)
    halves = [next(smaller) for _ in range(4)]
    smaller.close()
    assert [key for b in halves for key in b["sample_keys"]] == [
        key for b in reference[stop:stop + 2] for key in b["sample_keys"]]
    np.testing.assert_array_equal(np.concatenate([b["images"] for b in halves[:2]]), reference[stop]["images"])
    # A run with another host count (or readers, buffer, shards) cannot take the position.
    other_hosts = _stream_batches(shard_set, tokenizer, process_count=2, local_batch_size=12)
    with pytest.raises(UserError, match="process_count 1 -> 2"):
        other_hosts.set_state(state)
    other_hosts.close()


SIGKILL_RUN = ("--config.train.num_steps=24", "--config.train.checkpoint_every=4", "--config.train.log_every=1",
               "--config.train.record_batches=true")


def test_a_run_killed_with_sigkill_resumes_to_the_uninterrupted_parameters(shard_set, tmp_path):
    run = ("--config", "configs/demo.py:tiny", "--no_progress", *SIGKILL_RUN,
           *(f"--config.{override}" for override in shard_overrides(shard_set)), "--config.data.shuffle_buffer=100")
    reference_dir = str(tmp_path / "uninterrupted")
    process = vlretrieval("train", *run, "--workdir", reference_dir)
    output = finish(process)
    assert process.returncode == 0, output
    workdir = str(tmp_path / "killed")
    kill_after = random.Random().randint(5, 18)
    process = vlretrieval("train", *run, "--workdir", workdir)
    wait_for_step(process, workdir, kill_after)
    while not _finished_checkpoints(workdir):  # a resume, not a fresh start (saves are asynchronous)
        assert process.poll() is None, finish(process)
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    finish(process)
    assert process.returncode == -signal.SIGKILL, f"the run ended before the kill after step {kill_after}"
    process = vlretrieval("train", *run, "--workdir", workdir)
    output = finish(process)
    assert process.returncode == 0, output
    assert "resuming from the checkpoint at step" in output, (kill_after, output)
    # Every step trained on the uninterrupted run's samples, pixel for pixel (the steps replayed
    # after the checkpoint included), and ended on its parameters.
    batches = [(tmp_path / run / "batches.process_0.jsonl").read_text().splitlines()
               for run in ("uninterrupted", "killed")]
    assert len(batches[0]) == 24 and batches[1] == batches[0], f"killed after step {kill_after}"
    assert_params_equal(saved_params(workdir, 24), saved_params(reference_dir, 24), atol=1e-6)


def _finished_checkpoints(workdir) -> list[str]:
    folder = os.path.join(workdir, "checkpoints")
    return [name for name in os.listdir(folder) if name.isdigit()] if os.path.isdir(folder) else []


def test_every_objective_and_the_mural_mixture_train_from_shards(shard_set, tmp_path):
    # Translation pairs beside the shards' image-text batches: the demo scenes' English and German
    # captions as a TSV file, the layout a user brings.
    (tmp_path / "tsv").mkdir()
    pairs = [json.loads(member[1]) for member in sample_pairs(shard_set["paths"][0])]
    (tmp_path / "tsv" / "en-de.tsv").write_text("".join(f"{p['caption']}\t{p['caption_de']}\n" for p in pairs))
    config = load_config("configs/demo.py:tiny", [
        *shard_overrides(shard_set), "train.num_steps=4", "train.log_every=1", "objectives.contrastive=1.0",
        "objectives.hardest_negative_hinge=0.5", "objectives.image_text_matching=0.5",
        "objectives.masked_language_model=0.5", "objectives.composed_image_negatives=True",
        "objectives.text_text=0.5", "bitext.batch_size=32", f"bitext.tsv_dir={tmp_path / 'tsv'}",
    ])
    train_and_evaluate(config, str(tmp_path / "run"), progress=False)
    with open(tmp_path / "run" / "metrics.jsonl") as handle:
        last = [json.loads(line) for line in handle][-1]
    for term in ("contrastive", "hardest_negative_hinge", "image_text_matching", "masked_language_model", "text_text"):
        assert np.isfinite(last[f"{term}_loss"]), (term, last)


def sample_pairs(path):
    """The (name, bytes) of a shard's KEY.json members."""
    with tarfile.open(path) as archive:
        return [(m.name, archive.extractfile(m).read()) for m in archive if m.name.endswith(".json")]


_EVAL_SCRIPT = r"""
import json, sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
sys.path.insert(0, sys.argv[4])
from tests.test_webdataset import evaluate_gallery
json.dump(evaluate_gallery(jax.process_index(), jax.process_count()), open(sys.argv[3], "w"))
jax.distributed.shutdown()
"""


def evaluate_gallery(process_index: int, process_count: int) -> dict:
    """A random tiny model's metrics on 13 encoded images, the gallery loaded as host
    `process_index` of `process_count` loads it; and how many images this host decoded."""
    import jax

    from tests.helpers import tiny_model_config
    from vlretrieval import parallel
    from vlretrieval.data import images as image_ops
    from vlretrieval.data.tokenizer import TextTokenizer, train_wordpiece_tokenizer
    from vlretrieval.evaluation import evaluate
    from vlretrieval.models import build_model, init_params

    words = "red blue green square circle small large left right".split()
    rng = np.random.default_rng(0)
    source = [{"image": jpeg(rng.integers(0, 256, (24, 20, 3))),
               "captions": {"en": [" ".join(rng.choice(words, 4)) for _ in range(2)]}} for _ in range(13)]
    decoded = []
    original = image_ops.model_image
    image_ops.model_image = lambda *args, **kwargs: decoded.append(1) or original(*args, **kwargs)
    try:
        split = pipeline.load_split(source, ["en"], 16, process_index=process_index, process_count=process_count)
    finally:
        image_ops.model_image = original
    tokenizer = TextTokenizer(train_wordpiece_tokenizer(iter(words * 20), vocab_size=60))
    model = build_model(tiny_model_config(), tokenizer.vocab_size)
    params = init_params(model, jax.random.key(0))
    results = evaluate.evaluate_split(model, params, split, tokenizer, mesh=parallel.make_mesh(),
                                      batch_size=4, max_text_length=8)
    return {"decoded": len(decoded), "languages": results["languages"]}


def test_two_processes_evaluating_decode_only_their_share_and_give_the_one_process_metrics(tmp_path):
    outputs = [tmp_path / f"host{i}.json" for i in range(2)]
    run_local_hosts(_EVAL_SCRIPT, outputs)
    read = [json.loads(path.read_text()) for path in outputs]
    assert [r["decoded"] for r in read] == [7, 6]  # of 13: every other image each
    alone = json.loads(json.dumps(evaluate_gallery(0, 1)))
    assert alone["decoded"] == 13
    for host in read:
        assert_nested_close(host["languages"], alone["languages"])
