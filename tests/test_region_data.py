"""Detector-region datasets: SCAN's precomputed layout and per-image feature files prepared into
packed regions (shapes, padding, normalised boxes, labels, captions with their image), bad records
skipped and counted, refusals before anything is written, and the demo region features."""

import json
import os

import numpy as np
import pytest

from configs.demo import get_config
from tests.test_cli import assert_one_line_error, run_cli
from vlretrieval import config_checks
from vlretrieval.data import datasets
from vlretrieval.data.builders import building, captions, demo_regions, demo_scenes, image_captions, regions, scenes
from vlretrieval.errors import UserError
from vlretrieval.models.regions import packed_width, unpack_regions

DIM = 8
SIZE = (200.0, 100.0)  # width, height of every fixture image, for boxes in pixels


def prepare(layout, source, data_dir, num_regions=6, feature_dim=DIM, **options):
    config = regions.builder_config(layout, str(source), num_regions, feature_dim, **options)
    return regions.prepare(config, str(data_dir))


def read_split(builder, split):
    source = builder.as_data_source(split=split)
    return {record["image_id"].decode(): record for record in building.read_all(source)}


def texts(record, language="en"):
    return [text.decode() for text in record["captions"][language]]


def random_boxes(rng, shape, scale=(1.0, 1.0)):
    """[..., 4] boxes with x1 < x2 and y1 < y2, in [0, scale]."""
    corners = np.sort(rng.uniform(0, 1, (*shape, 2, 2)), axis=-2)  # [..., (low, high), (x, y)]
    return (corners.reshape(*shape, 4) * np.tile(scale, 2)).astype(np.float32)


def write_scan(root, sizes=None, regions_per_image=4, boxes=None, captions_per_image=5):
    """SCAN's layout; feature 0 of every region is its image's row, every caption names it.
    Returns split -> (features, expected normalised boxes)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    made = {}
    for split, count in (sizes or {"train": 3, "dev": 2, "test": 2}).items():
        features = rng.standard_normal((count, regions_per_image, DIM)).astype(np.float32)
        features[:, :, 0] = np.arange(count)[:, None]
        np.save(root / f"{split}_ims.npy", features)
        lines = [f"{split} image {row} caption {k}" for row in range(count) for k in range(captions_per_image)]
        (root / f"{split}_caps.txt").write_text("\n".join(lines) + "\n")
        expected = np.tile(np.float32([0, 0, 1, 1]), (count, regions_per_image, 1))
        if boxes == "pixels":
            np.save(root / f"{split}_boxes.npy", random_boxes(rng, (count, regions_per_image), SIZE))
            np.save(root / f"{split}_sizes.npy", np.tile(np.float32(SIZE), (count, 1)))
            expected = np.load(root / f"{split}_boxes.npy") / np.tile(np.float32(SIZE), 2)
        elif boxes == "normalised":
            expected = random_boxes(rng, (count, regions_per_image))
            np.save(root / f"{split}_boxes.npy", expected)
        made[split] = (features, expected)
    return made


@pytest.mark.parametrize("boxes", [None, "pixels", "normalised"])
def test_the_scan_layout_prepares_packed_regions_with_their_captions(boxes, tmp_path):
    made = write_scan(tmp_path / "scan", boxes=boxes)
    builder = prepare("precomputed_regions", tmp_path / "scan", tmp_path / "data")
    assert {name: info.num_examples for name, info in builder.info.splits.items()} == {
        "train": 3, "validation": 2, "test": 2}
    assert tuple(builder.info.features["captions"].keys()) == ("en",)
    for split, tfds_split in (("train", "train"), ("dev", "validation"), ("test", "test")):
        features, expected_boxes = made[split]
        records = read_split(builder, tfds_split)
        assert sorted(records) == [str(row) for row in range(len(features))]
        for image_id, record in records.items():
            row = int(image_id)
            assert record["image"].dtype == np.float16 and record["image"].shape == (6, packed_width(DIM))
            found, found_boxes, mask, labels = unpack_regions(record["image"])
            np.testing.assert_allclose(found[:4], features[row], atol=2e-3, rtol=1e-3)
            assert mask.tolist() == [1, 1, 1, 1, 0, 0] and not found[4:].any() and not found_boxes[4:].any()
            np.testing.assert_allclose(found_boxes[:4, :4], expected_boxes[row], atol=1e-3)
            area = (expected_boxes[row, :, 2] - expected_boxes[row, :, 0]) * (
                expected_boxes[row, :, 3] - expected_boxes[row, :, 1])
            np.testing.assert_allclose(found_boxes[:4, 4], area, atol=2e-3)
            assert (labels == -1).all()
            assert texts(record) == [f"{split} image {row} caption {k}" for k in range(5)]
    assert image_captions.read_bad_records(builder) == {"counts": {}, "examples": {}, "notes": {}}


def test_more_regions_than_the_config_takes_keep_the_first_and_are_noted(tmp_path, capsys):
    made = write_scan(tmp_path / "scan", sizes={"test": 3})
    builder = prepare("precomputed_regions", tmp_path / "scan", tmp_path / "data", num_regions=2)
    for image_id, record in read_split(builder, "test").items():
        found, _, mask, _ = unpack_regions(record["image"])
        np.testing.assert_allclose(found, made["test"][0][int(image_id), :2], atol=2e-3, rtol=1e-3)
        assert mask.tolist() == [1, 1]
    note = "more than 2 regions (kept the first 2)"
    assert image_captions.read_bad_records(builder)["notes"] == {note: 3}
    assert f"note: 3 x {note}" in capsys.readouterr().out


def write_feature_file(root, image_id, features=None, regions_per_image=3, suffix="npz", **arrays):
    path = root / "features" / f"{image_id}.{suffix}"
    path.parent.mkdir(parents=True, exist_ok=True)
    if features is None:
        features = np.random.default_rng(len(image_id)).standard_normal((regions_per_image, DIM)).astype(np.float32)
    if suffix == "npy":
        np.save(path, features)
    else:
        np.savez(path, **{"features": features, **arrays})
    return features


def write_captions(root, lines):
    root.mkdir(parents=True, exist_ok=True)
    (root / "captions.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


def test_the_region_files_layout_reads_npz_and_npy_with_boxes_sizes_and_labels(tmp_path):
    root = tmp_path / "files"
    rng = np.random.default_rng(1)
    pixel_boxes = random_boxes(rng, (3,), SIZE)
    a = write_feature_file(root, "a", boxes=pixel_boxes, image_size=np.float32(SIZE), labels=np.array([0, 5, 2]))
    normalised = random_boxes(rng, (2,))
    b = write_feature_file(root, "b", regions_per_image=2, boxes=normalised)
    c = write_feature_file(root, "c", regions_per_image=4, suffix="npy")
    d = rng.standard_normal((1, DIM)).astype(np.float32)
    (root / "features" / "sub").mkdir()
    np.savez(root / "features" / "sub" / "d.npz", feat=d)  # TERAN's name for the features
    write_captions(root, [
        {"image": "a", "split": "train", "captions": ["a one", "a two"]},
        {"image": "b", "split": "train", "captions": {"en": ["b one"], "de": ["b eins"]}},
        {"image": "c", "split": "test", "captions": {"de": ["c eins"]}},
        {"image": "sub/d", "split": "val", "captions": ["d one"]},
        {"image": "a", "split": "train", "captions": ["a three"]},  # merged with the first line
    ])
    builder = prepare("region_files", root, tmp_path / "data")
    assert {name: info.num_examples for name, info in builder.info.splits.items()} == {
        "train": 2, "test": 1, "validation": 1}
    assert tuple(builder.info.features["captions"].keys()) == ("de", "en")
    train, test = read_split(builder, "train"), read_split(builder, "test")
    features, boxes, mask, labels = unpack_regions(train["a"]["image"])
    np.testing.assert_allclose(features[:3], a, atol=2e-3, rtol=1e-3)
    np.testing.assert_allclose(boxes[:3, :4], pixel_boxes / np.tile(np.float32(SIZE), 2), atol=1e-3)
    assert labels.tolist() == [0, 5, 2, -1, -1, -1] and mask.tolist() == [1, 1, 1, 0, 0, 0]
    assert texts(train["a"]) == ["a one", "a two", "a three"] and texts(train["a"], "de") == []
    features, boxes, mask, labels = unpack_regions(train["b"]["image"])
    np.testing.assert_allclose(features[:2], b, atol=2e-3, rtol=1e-3)
    np.testing.assert_allclose(boxes[:2, :4], normalised, atol=1e-3)
    assert (labels == -1).all() and mask.sum() == 2 and texts(train["b"], "de") == ["b eins"]
    features, boxes, mask, _ = unpack_regions(test["c"]["image"])
    np.testing.assert_allclose(features[:4], c, atol=2e-3, rtol=1e-3)
    assert boxes[:4].tolist() == [[0, 0, 1, 1, 1]] * 4 and mask.sum() == 4 and texts(test["c"]) == []
    features, _, mask, _ = unpack_regions(read_split(builder, "validation")["sub/d"]["image"])
    np.testing.assert_allclose(features[:1], d, atol=2e-3, rtol=1e-3)


def write_bad_region_files(root):
    """One image of each bad kind beside two good ones (one has an empty caption besides a real one)."""
    for image_id in ("good", "empty_caption"):
        write_feature_file(root, image_id)
    write_feature_file(root, "truncated_npy", suffix="npy")
    with open(root / "features" / "truncated_npy.npy", "r+b") as handle:
        handle.truncate(os.path.getsize(handle.name) - 40)
    (root / "features" / "corrupt.npz").write_bytes(b"PK\x03\x04 this is no zip archive")
    write_feature_file(root, "nan", features=np.full((2, DIM), np.nan, np.float32))
    write_feature_file(root, "no_regions", features=np.zeros((0, DIM), np.float32))
    ids = ("good", "empty_caption", "missing", "corrupt", "truncated_npy", "nan", "no_regions")
    write_captions(root, [{"image": image_id, "captions": ["", "fine"] if image_id == "empty_caption" else ["fine"]}
                          for image_id in ids])


def test_every_bad_record_kind_is_skipped_and_counted(tmp_path, capsys):
    root = tmp_path / "files"
    write_bad_region_files(root)
    builder = prepare("region_files", root, tmp_path / "data")
    bad = image_captions.read_bad_records(builder)
    assert bad["counts"] == {"missing feature file": 1, "unreadable feature file": 2, "non-finite feature values": 1,
                             "zero regions": 1, "empty caption": 1}
    features = os.path.join(str(root), "features")
    assert bad["examples"]["missing feature file"] == [os.path.join(features, "missing.npz")]
    assert sorted(bad["examples"]["unreadable feature file"]) == [
        os.path.join(features, "corrupt.npz"), os.path.join(features, "truncated_npy.npy")]
    records = read_split(builder, "train")
    assert sorted(records) == ["empty_caption", "good"] and texts(records["empty_caption"]) == ["fine"]
    assert "1 x zero regions" in capsys.readouterr().out


def test_scan_rows_with_bad_values_or_empty_captions_are_counted(tmp_path):
    write_scan(tmp_path / "scan", sizes={"test": 3})
    features = np.load(tmp_path / "scan" / "test_ims.npy")
    features[1, 2, 3] = np.inf
    np.save(tmp_path / "scan" / "test_ims.npy", features)
    lines = (tmp_path / "scan" / "test_caps.txt").read_text().split("\n")
    lines[10] = " "  # image 2's first caption
    (tmp_path / "scan" / "test_caps.txt").write_text("\n".join(lines))
    builder = prepare("precomputed_regions", tmp_path / "scan", tmp_path / "data")
    bad = image_captions.read_bad_records(builder)
    assert bad["counts"] == {"non-finite feature values": 1, "empty caption": 1}
    assert bad["examples"]["non-finite feature values"] == [f"{tmp_path / 'scan' / 'test_ims.npy'}[1]"]
    records = read_split(builder, "test")
    assert sorted(records) == ["0", "2"] and len(texts(records["2"])) == 4


def test_the_fail_policy_names_the_file_and_leaves_no_dataset(tmp_path):
    root = tmp_path / "files"
    write_bad_region_files(root)
    with pytest.raises(UserError, match="on_bad_record") as error:
        prepare("region_files", root, tmp_path / "data", on_bad_record="fail")
    assert str(root / "features") in str(error.value)
    assert not list((tmp_path / "data").glob("region_captions/*/*/dataset_info.json"))
    assert not list((tmp_path / "data").glob("region_captions/*/incomplete*"))


def _scan_with(root, change):
    write_scan(root, sizes={"train": 3}, boxes="pixels")
    change(root)


REFUSALS = {
    "scan feature width": (lambda root: write_scan(root, sizes={"train": 3}), {"feature_dim": 16},
                           ["train_ims.npy: region features are 8 wide", "region_feature_dim is 16"]),
    "scan caption count": (lambda root: _scan_with(root, lambda r: (r / "train_caps.txt").write_text("x\n" * 14)), {},
                           ["train_caps.txt has 14 lines", "holds 3 images", "3 x 5 = 15"]),
    "scan captions per image": (lambda root: write_scan(root, sizes={"train": 3}), {"captions_per_image": 2},
                                ["train_caps.txt has 15 lines", "3 x 2 = 6", "captions_per_image is 2"]),
    "scan boxes shape": (lambda root: _scan_with(root, lambda r: np.save(r / "train_boxes.npy", np.zeros((3, 3, 4)))),
                         {}, ["train_boxes.npy: shape (3, 3, 4)", "is (3, 4, 8)", "[3, 4, 4]"]),
    "scan sizes shape": (lambda root: _scan_with(root, lambda r: np.save(r / "train_sizes.npy", np.ones((3, 3)))),
                         {}, ["train_sizes.npy: shape (3, 3)", "[3, 2]"]),
    "scan pixels without sizes": (lambda root: _scan_with(root, lambda r: (r / "train_sizes.npy").unlink()), {},
                                  ["train_boxes.npy: values up to", "train_sizes.npy"]),
    "file feature width": (lambda root: (write_captions(root, [{"image": "x", "captions": ["c"]}]),
                                         write_feature_file(root, "x", features=np.zeros((2, 6), np.float32))),
                           {}, ["x.npz: region features are 6 wide", "region_feature_dim is 8"]),
    "file boxes shape": (lambda root: (write_captions(root, [{"image": "x", "captions": ["c"]}]),
                                       write_feature_file(root, "x", boxes=np.zeros((2, 4)))),
                         {}, ["x.npz: boxes has shape (2, 4)", "features is (3, 8)"]),
}


@pytest.mark.parametrize("name", sorted(REFUSALS))
def test_files_that_disagree_are_refused_in_one_line_before_anything_is_written(name, tmp_path):
    write, options, fragments = REFUSALS[name]
    write(tmp_path / "source")
    layout = "precomputed_regions" if name.startswith("scan") else "region_files"
    feature_dim = options.pop("feature_dim", DIM)
    with pytest.raises(UserError) as error:
        prepare(layout, tmp_path / "source", tmp_path / "data", feature_dim=feature_dim, **options)
    message = str(error.value)
    assert "\n" not in message and str(tmp_path / "source") in message
    for fragment in fragments:
        assert fragment in message, message
    assert not (tmp_path / "data").exists()


def test_two_sources_never_share_a_build(tmp_path):
    write_scan(tmp_path / "one", sizes={"test": 2})
    write_scan(tmp_path / "two", sizes={"test": 2})
    first = regions.builder_config("precomputed_regions", str(tmp_path / "one"), 6, DIM)
    assert first.name != regions.builder_config("precomputed_regions", str(tmp_path / "two"), 6, DIM).name
    assert first.name != regions.builder_config("precomputed_regions", str(tmp_path / "one"), 4, DIM).name


# --- demo regions --------------------------------------------------------------------------------

DEMO_SIZES = (64, 8, 16)


def demo_config(data_dir, **data):
    config = get_config("tiny")
    config.data.name, config.data.data_dir = "demo_regions", str(data_dir)
    config.data.num_train, config.data.num_validation, config.data.num_test = DEMO_SIZES
    for key, value in data.items():
        config.data[key] = value
    return config


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The tiny demo's region features, opened as a run opens its data."""
    config = demo_config(tmp_path_factory.mktemp("demo_regions"))
    return config, datasets.open_dataset(config.data, seed=config.seed)


def test_demo_regions_open_like_the_demo_with_its_tokenizer_and_word_forms(demo):
    config, data = demo
    assert data.builder.name == "demo_regions" and data.content_words is captions.WORD_FORMS
    assert set(data.builder.info.features["captions"].keys()) == set(demo_scenes.LANGUAGES)
    scenes_dir = os.path.join(config.data.data_dir, "demo_scenes")
    [tokenizer] = [os.path.join(folder, name) for folder, _, names in os.walk(scenes_dir)
                   for name in names if name == "tokenizer.json"]
    with open(tokenizer, "rb") as original, open(demo_scenes.demo_tokenizer_path(data.builder), "rb") as copy:
        assert original.read() == copy.read()
    assert {name: info.num_examples for name, info in data.builder.info.splits.items()} == dict(
        zip(demo_scenes.SPLITS, DEMO_SIZES))


def test_demo_region_boxes_hold_their_objects_labelled_with_their_shapes(demo):
    config, data = demo
    scenes_builder = demo_scenes.prepare_demo_data(config.data.data_dir, datasets._demo_config(config.data, 0))
    background_first = 0
    for split, count in zip(demo_scenes.SPLITS, DEMO_SIZES):
        drawn = list(demo_scenes.split_scenes(config.seed, split, count))
        originals = {record["image_id"]: record for record in building.read_all(scenes_builder.as_data_source(split))}
        for record in building.read_all(data.split(split)):
            scene, original = drawn[record["image_id"]], originals[record["image_id"]]
            assert record["captions"]["en"] == original["captions"]["en"]
            assert record["description"] == original["description"]
            assert record["image"].shape == (6, packed_width(64))
            _, boxes, mask, labels = unpack_regions(record["image"])
            real = np.flatnonzero(mask)
            assert real.tolist() == list(range(len(real)))  # padding last
            pixels = boxes[real, :4].astype(np.float32) * scenes.IMAGE_SIZE
            objects = [i for i in real if labels[i] >= 0]
            assert 1 <= len(real) - len(objects) <= 2  # background regions
            assert sorted(labels[objects]) == sorted(scenes.SHAPES.index(o.shape) for o in scene.objects)
            for obj in scene.objects:
                radius = scenes.SIZES[obj.size]
                extent = np.array([obj.x - radius, obj.y - radius, obj.x + radius + 1, obj.y + radius + 1])
                holds = [i for i in objects if labels[i] == scenes.SHAPES.index(obj.shape)
                         and (pixels[i, :2] <= extent[:2] + 0.01).all() and (pixels[i, 2:] >= extent[2:] - 0.01).all()
                         and (pixels[i, 2:] - pixels[i, :2] <= 2 * radius + 3.01).all()]
                assert holds, (scene, pixels, labels)
            background_first += labels[0] < 0
    assert 0 < background_first < sum(DEMO_SIZES)  # shuffled: the order gives nothing away


def test_demo_regions_are_deterministic(demo, tmp_path):
    _, data = demo
    again = demo_config(tmp_path / "again")
    rebuilt = datasets.open_dataset(again.data, seed=again.seed)
    for split in demo_scenes.SPLITS:
        first = {r["image_id"]: r["image"] for r in building.read_all(data.split(split))}
        second = {r["image_id"]: r["image"] for r in building.read_all(rebuilt.split(split))}
        assert first.keys() == second.keys()
        assert all(np.array_equal(first[key], second[key]) for key in first)


def test_demo_regions_refuse_too_few_regions_or_features(tmp_path):
    with pytest.raises(UserError, match="config.data.num_regions is 3"):
        demo_regions.prepare_demo_regions(str(tmp_path), num_regions=3)
    with pytest.raises(UserError, match="config.data.region_feature_dim is 8"):
        demo_regions.prepare_demo_regions(str(tmp_path), feature_dim=8)
    assert not os.listdir(tmp_path)


# --- wiring --------------------------------------------------------------------------------------


def test_a_region_layout_opens_with_a_tokenizer_and_reports_its_bad_records(demo, tmp_path):
    _, demo_data = demo
    root = tmp_path / "files"
    write_bad_region_files(root)
    config = demo_config(tmp_path / "data", name="region_files", manual_dir=str(root), region_feature_dim=DIM)
    with pytest.raises(UserError, match="config.data.tokenizer is empty"):
        datasets.open_dataset(config.data, seed=0)
    config.data.tokenizer = demo_scenes.demo_tokenizer_path(demo_data.builder)
    config.data.languages = ("en",)
    data = datasets.open_dataset(config.data, seed=0)
    assert data.builder.name == "region_captions" and data.content_words is None
    assert data.bad_records["counts"]["missing feature file"] == 1 and len(data.split("train")) == 2


def test_prepare_data_builds_the_scan_layout(tmp_path, demo):
    _, demo_data = demo
    write_scan(tmp_path / "scan", sizes={"train": 2, "testall": 2})
    result = run_cli("prepare-data", "--config", "configs/demo.py", "--data_dir", str(tmp_path / "data"),
                     "--config.data.name=precomputed_regions", f"--config.data.manual_dir={tmp_path / 'scan'}",
                     f"--config.data.tokenizer={demo_scenes.demo_tokenizer_path(demo_data.builder)}",
                     f"--config.data.region_feature_dim={DIM}", "--config.data.languages=('en',)", "--no_progress")
    assert result.returncode == 0, result.stderr
    assert "dataset ready in" in result.stdout + result.stderr
    [info] = (tmp_path / "data").glob("region_captions/*/1.0.0/dataset_info.json")
    assert {split["name"] for split in json.loads(info.read_text())["splits"]} == {"train", "testall"}
    result = run_cli("prepare-data", "--config", "configs/demo.py", "--data_dir", str(tmp_path / "data"),
                     "--config.data.name=precomputed_regions", f"--config.data.manual_dir={tmp_path / 'scan'}",
                     "--config.data.tokenizer=unused", "--config.data.languages=('en',)")
    assert_one_line_error(result, "train_ims.npy: region features are 8 wide", "region_feature_dim is 64")


def test_region_keys_are_refused_where_the_dataset_does_not_read_them():
    config = get_config()
    config.data.num_regions = 36
    with pytest.raises(UserError, match="config.data.num_regions is 36, but only data.name=demo_regions"):
        config_checks.check_config(config)
    config = get_config()
    config.data.name, config.data.captions_per_image = "region_files", 1
    with pytest.raises(UserError, match="only data.name=precomputed_regions reads it"):
        config_checks.check_config(config)
    config.data.name = "precomputed_regions"
    config.data.num_regions, config.data.region_feature_dim = 36, 2048
    config_checks.check_config(config)
