"""Published benchmark layouts prepared into tfds datasets: sizes, captions, alignment, bad records,
and `vlretrieval eval` on a Karpathy-layout dataset with a demo checkpoint."""

import glob
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from tests.layout_fixtures import MAKERS, PALETTE, make_karpathy
from tests.test_cli import assert_one_line_error, run_cli
from vlretrieval.data import images
from vlretrieval.data.builders import image_captions
from vlretrieval.errors import UserError


def prepare(fixture, data_dir, **options):
    policy = options.pop("on_bad_record", "skip")
    config = image_captions.builder_config(
        fixture.layout, fixture.source_dir, fixture.images_dir, options, policy
    )
    return image_captions.prepare(config, str(data_dir))


def colour_of(encoded: bytes) -> str:
    with Image.open(io.BytesIO(encoded)) as image:
        mean = np.asarray(image.convert("RGB"), np.float64).reshape(-1, 3).mean(axis=0)
    return PALETTE[int(np.argmin([np.linalg.norm(mean - np.array(rgb)) for _, rgb in PALETTE]))][0]


def read_split(builder, split):
    source = builder.as_data_source(split=split)
    return {record["image_id"].decode(): record for record in (source[i] for i in range(len(source)))}


@pytest.mark.parametrize("layout", sorted(MAKERS))
def test_each_layout_prepares_with_its_splits_captions_and_aligned_images(layout, tmp_path):
    fixture = MAKERS[layout](tmp_path / "source")
    builder = prepare(fixture, tmp_path / "data")
    assert {name: info.num_examples for name, info in builder.info.splits.items()} == (
        fixture.split_sizes()
    )
    assert tuple(builder.info.features["captions"].keys()) == fixture.languages()
    for split in fixture.splits():
        records = read_split(builder, split)
        for expected in (image for image in fixture.images if image.split == split):
            record = records[expected.image_id]
            for language, texts in expected.captions.items():
                assert [t.decode() for t in record["captions"][language]] == texts
            # The stored bytes are the image the captions describe.
            assert colour_of(record["image"]) == expected.colour
            assert all(expected.colour in text for texts in expected.captions.values() for text in texts)
    assert image_captions.read_bad_records(builder) == {"counts": {}, "examples": {}}


def test_karpathy_restval_folds_into_train_by_option(tmp_path):
    fixture = make_karpathy(tmp_path / "source")
    sizes = fixture.split_sizes()
    folded = prepare(fixture, tmp_path / "data", restval_to_train=True)
    assert folded.info.splits["train"].num_examples == sizes["train"] + sizes["restval"]
    assert "restval" not in folded.info.splits
    kept = prepare(fixture, tmp_path / "data", restval_to_train=False)
    assert kept.info.splits["restval"].num_examples == sizes["restval"]
    # Each option is its own build: the first is untouched by the second.
    assert folded.data_dir != kept.data_dir and os.path.isdir(folded.data_dir)


def test_bad_records_are_skipped_counted_and_reported(tmp_path, capsys):
    # Image 1 is a truncated JPEG, image 3 is missing, image 2's first caption is empty
    # (it has a second one, so the image stays).
    fixture = make_karpathy(tmp_path / "source", corrupt=1, missing=3, empty_caption=2)
    builder = prepare(fixture, tmp_path / "data", restval_to_train=False)
    printed = capsys.readouterr().out
    bad = image_captions.read_bad_records(builder)
    assert bad["counts"] == {"undecodable image": 1, "missing image": 1, "empty caption": 1}
    assert bad["examples"]["undecodable image"] == [fixture.images[1].image_path]
    assert bad["examples"]["missing image"] == [fixture.images[3].image_path]
    assert "1 x undecodable image" in printed and "1 x missing image" in printed
    assert "1 x empty caption" in printed
    sizes = fixture.split_sizes()
    assert builder.info.splits["train"].num_examples == sizes["train"] - 1  # image 1
    assert builder.info.splits["validation"].num_examples == sizes["validation"] - 1  # image 3
    kept = read_split(builder, "validation")[fixture.images[2].image_id]
    assert [t.decode() for t in kept["captions"]["en"]] == fixture.images[2].captions["en"][1:]


def test_the_fail_policy_names_the_file_and_leaves_no_dataset(tmp_path):
    fixture = make_karpathy(tmp_path / "source", corrupt=4)
    with pytest.raises(UserError, match="on_bad_record"):
        prepare(fixture, tmp_path / "data", on_bad_record="fail")
    result = run_cli(
        "prepare-data", "--config", "configs/demo.py", "--data_dir", str(tmp_path / "data"),
        "--config.data.name=karpathy", f"--config.data.manual_dir={fixture.source_dir}",
        "--config.data.on_bad_record=fail", "--config.data.tokenizer=unused",
    )
    assert result.returncode != 0
    assert_one_line_error(result, fixture.images[4].image_path, "undecodable image")
    assert not glob.glob(str(tmp_path / "data" / "image_captions" / "*" / "*"))  # nothing left


def test_a_split_with_no_usable_record_names_the_counts_and_the_images_folder(tmp_path):
    # The usual cause: config.data.images_dir points at the wrong folder, so every image is missing.
    fixture = make_karpathy(tmp_path / "source")
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    result = run_cli(
        "prepare-data", "--config", "configs/demo.py", "--data_dir", str(tmp_path / "data"),
        "--config.data.name=karpathy", f"--config.data.manual_dir={fixture.source_dir}",
        f"--config.data.images_dir={empty}", "--config.data.tokenizer=unused",
    )
    assert_one_line_error(result, "none of its", "records is usable", "x missing image", str(empty),
                          "config.data.images_dir")
    assert "No examples were yielded" not in result.stderr
    assert not glob.glob(str(tmp_path / "data" / "image_captions" / "*" / "*"))  # nothing left


def test_bad_layout_options_are_one_line_errors(tmp_path):
    fixture = make_karpathy(tmp_path / "source")
    with pytest.raises(UserError, match="choose one of"):
        image_captions.builder_config("coco", fixture.source_dir)
    with pytest.raises(UserError, match="manual_dir"):
        image_captions.builder_config("karpathy", str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="on_bad_record"):
        image_captions.builder_config("karpathy", fixture.source_dir, on_bad_record="ignore")


def test_eval_runs_on_a_karpathy_dataset_with_a_demo_checkpoint(tmp_path):
    workdir, data_dir = tmp_path / "run", tmp_path / "data"
    trained = run_cli("train", "--config", "configs/demo.py:tiny", "--workdir", str(workdir),
                      "--data_dir", str(data_dir), "--config.train.num_steps=2", "--no_progress")
    assert trained.returncode == 0, trained.stderr
    tokenizer = glob.glob(str(data_dir / "demo_scenes" / "*" / "*" / "tokenizer.json"))[0]
    fixture = make_karpathy(tmp_path / "coco")
    result = run_cli(
        "eval", "--config", "configs/demo.py:tiny", "--workdir", str(workdir),
        "--data_dir", str(tmp_path / "benchmarks"), "--config.data.name=karpathy",
        f"--config.data.manual_dir={fixture.source_dir}", f"--config.data.tokenizer={tokenizer}",
        "--config.data.languages=('en',)", "--config.eval.split=test",
    )
    assert result.returncode == 0, result.stderr
    assert "R@1" in result.stdout
    results = json.loads((workdir / "results.json").read_text())
    assert results["split"] == "test"
    assert set(results["languages"]) == {"en"}
    # Two test images with 2 and 3 captions: R@10 finds everything.
    assert results["languages"]["en"]["text_to_image"]["R@10"] == pytest.approx(100.0)


def test_training_images_from_encoded_bytes_match_the_model_size(tmp_path):
    fixture = make_karpathy(tmp_path / "source")
    builder = prepare(fixture, tmp_path / "data")
    record = builder.as_data_source(split="train")[0]
    crop = images.model_image(record["image"], 24, np.random.default_rng(0))
    centre = images.model_image(record["image"], 24)
    assert crop.shape == centre.shape == (24, 24, 3) and crop.dtype == np.uint8


def test_training_reads_a_published_layout_and_reports_bad_records_each_epoch(tmp_path):
    data_dir = tmp_path / "data"
    demo = run_cli("prepare-data", "--config", "configs/demo.py:tiny", "--data_dir", str(data_dir))
    assert demo.returncode == 0, demo.stderr
    tokenizer = glob.glob(str(data_dir / "demo_scenes" / "*" / "*" / "tokenizer.json"))[0]
    fixture = make_karpathy(tmp_path / "coco", corrupt=0)
    result = run_cli(
        "train", "--config", "configs/demo.py:tiny", "--workdir", str(tmp_path / "run"),
        "--data_dir", str(data_dir), "--config.data.name=karpathy", "--no_progress",
        f"--config.data.manual_dir={fixture.source_dir}", f"--config.data.tokenizer={tokenizer}",
        "--config.data.languages=('en',)", "--config.eval.split=test",
        "--config.train.batch_size=8", "--config.train.num_steps=2",
    )
    assert result.returncode == 0, result.stderr
    assert "skipped 1 x undecodable image" in result.stdout  # at the end of preparation
    # Three training images left (train + restval, less the corrupt one) in batches of 8: an
    # epoch per step, each reporting what preparation skipped.
    assert result.stdout.count("done: preparation skipped 1 x undecodable image") == 2
