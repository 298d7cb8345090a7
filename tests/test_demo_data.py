"""The demo data set: reproducible, captions that identify their images, safe to prepare twice."""

import os
import re
from pathlib import Path

import numpy as np
import pytest

from vlretrieval.data.builders import captions, demo_scenes, scenes
from vlretrieval.data.builders.demo_scenes import DemoScenesConfig
from vlretrieval.data.tokenizer import load_tokenizer
from vlretrieval.errors import UserError

SMALL = DemoScenesConfig(name="small", seed=0, num_train=300, num_validation=50, num_test=200)
TINY = DemoScenesConfig(name="tiny", seed=3, num_train=20, num_validation=5, num_test=5)


@pytest.fixture(scope="module")
def small_builder(tmp_path_factory):
    return demo_scenes.prepare_demo_data(str(tmp_path_factory.mktemp("data")), SMALL)


def read_split(builder, split):
    """All examples of a split, ordered by image_id (tfds stores them shuffled)."""
    source = builder.as_data_source(split=split)
    return sorted((source[i] for i in range(len(source))), key=lambda ex: int(ex["image_id"]))


def has_word(text: str, word: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text, flags=re.IGNORECASE) is not None


def assert_one_line_user_error(error: pytest.ExceptionInfo, *needles: str) -> None:
    message = str(error.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message


def test_split_sizes(small_builder):
    splits = small_builder.info.splits
    assert {name: splits[name].num_examples for name in demo_scenes.SPLITS} == {
        "train": 300, "validation": 50, "test": 200,
    }
    for split, size in SMALL.split_sizes().items():
        assert len(small_builder.as_data_source(split=split)) == size


def test_same_seed_same_data_other_seed_different():
    first, again = (list(demo_scenes.split_examples(0, "train", 30)) for _ in range(2))
    other = list(demo_scenes.split_examples(1, "train", 30))
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a["image"], b["image"])
        assert a["captions"] == b["captions"] and a["description"] == b["description"]
    assert not all(np.array_equal(a["image"], c["image"]) for a, c in zip(first, other))
    assert [a["description"] for a in first] != [c["description"] for c in other]


def test_splits_draw_different_scenes():
    descriptions = {
        split: [scenes.description(s) for s in demo_scenes.split_scenes(0, split, 50)]
        for split in demo_scenes.SPLITS
    }
    assert descriptions["train"] != descriptions["validation"] != descriptions["test"]


def test_two_builds_of_one_config_are_identical(small_builder, tmp_path):
    rebuilt = demo_scenes.prepare_demo_data(str(tmp_path), SMALL)
    for a, b in zip(read_split(small_builder, "test"), read_split(rebuilt, "test")):
        np.testing.assert_array_equal(a["image"], b["image"])
        assert a["captions"] == b["captions"] and a["description"] == b["description"]
    with open(demo_scenes.demo_tokenizer_path(small_builder)) as a, \
            open(demo_scenes.demo_tokenizer_path(rebuilt)) as b:
        assert a.read() == b.read()


def test_stored_examples_are_the_generated_ones(small_builder):
    stored = read_split(small_builder, "validation")
    generated = list(demo_scenes.split_examples(SMALL.seed, "validation", SMALL.num_validation))
    assert [int(ex["image_id"]) for ex in stored] == list(range(SMALL.num_validation))
    for ex, gen in zip(stored, generated):
        assert ex["image"].shape == (64, 64, 3) and ex["image"].dtype == np.uint8
        np.testing.assert_array_equal(ex["image"], gen["image"])
        assert ex["description"].decode() == gen["description"]
        assert {k: [c.decode() for c in v] for k, v in ex["captions"].items()} == gen["captions"]


def test_five_distinct_captions_per_language(small_builder):
    for ex in read_split(small_builder, "validation"):
        assert sorted(ex["captions"]) == sorted(captions.LANGUAGES)
        for texts in ex["captions"].values():
            assert len(texts) == 5 and len(set(texts)) == 5


def test_every_caption_names_every_object_and_the_relation():
    drawn = list(demo_scenes.split_scenes(0, "train", 400))
    rng = np.random.default_rng(0)
    horizontal, vertical = {"left", "right"}, {"above", "below", "top", "bottom"}
    assert {len(scene.objects) for scene in drawn} == {1, 2, 3}
    for scene in drawn:
        for language, texts in captions.scene_captions(scene, rng).items():
            forms = captions.WORD_FORMS[language]
            for caption in texts:
                for obj in scene.objects:
                    for kind, value in (("colour", obj.colour), ("shape", obj.shape),
                                        ("size", obj.size)):
                        assert any(has_word(caption, f) for f in forms[kind][value]), (caption, obj)
                if scene.axis is not None:
                    relations = horizontal if scene.axis == "horizontal" else vertical
                    words = [w for key in relations for w in forms["relation"][key]]
                    assert any(has_word(caption, w) for w in words), caption


def test_content_words_cover_every_language_and_kind():
    assert captions.LANGUAGES == ("en", "de", "fr", "es", "it")
    for language in captions.LANGUAGES:
        kinds = captions.CONTENT_WORDS[language]
        assert set(kinds) == {"colour", "shape", "size", "relation"}
        assert len(kinds["colour"]) >= 8 and len(kinds["shape"]) == 5
        assert len(kinds["size"]) >= 2 and len(kinds["relation"]) == 6
        all_forms = [form for forms in kinds.values() for form in forms]
        assert len(all_forms) == len(set(all_forms)), "a word must not belong to two kinds"


def test_objects_are_drawn_in_their_colours_on_a_dark_background(small_builder):
    drawn = list(demo_scenes.split_scenes(SMALL.seed, "validation", SMALL.num_validation))
    for ex, scene in zip(read_split(small_builder, "validation"), drawn):
        image = ex["image"]
        outside = np.ones(image.shape[:2], bool)
        for obj in scene.objects:
            r = scenes.SIZES[obj.size]
            box = (slice(obj.y - r, obj.y + r + 1), slice(obj.x - r, obj.x + r + 1))
            matches = np.all(image[box] == scenes.COLOURS[obj.colour], axis=-1).sum()
            assert matches >= 40, (scene, obj, matches)
            outside[box] = False
        assert image[outside].max() <= 40  # background only: dark, slight noise


def test_sizes_differ_clearly():
    small, large = scenes.SIZES["small"], scenes.SIZES["large"]
    assert large >= 1.5 * small


def test_default_test_split_descriptions_are_unique():
    count = demo_scenes.DEFAULT_CONFIG.num_test
    descriptions = [scenes.description(s) for s in demo_scenes.split_scenes(0, "test", count)]
    assert len(descriptions) == 1000
    assert len(set(descriptions)) >= 0.95 * count


def test_description_identifies_objects_and_order():
    drawn = list(demo_scenes.split_scenes(0, "train", 200))
    for scene in drawn:
        text = scenes.description(scene)
        for obj in scene.objects:
            assert f"{obj.size} {obj.colour} {obj.shape}" in text
        if scene.axis == "horizontal":
            assert text.startswith("left-to-right: ")
            assert [o.x for o in scene.objects] == sorted(o.x for o in scene.objects)


def test_prepare_prints_its_start_and_end_then_reuses(tmp_path, capsys):
    builder = demo_scenes.prepare_demo_data(str(tmp_path), TINY)
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 2 and "Generating" in printed[0] and "done in" in printed[1]
    directory = demo_scenes.dataset_dir(builder)
    assert os.path.isfile(os.path.join(directory, "dataset_info.json"))
    assert os.path.isfile(demo_scenes.demo_tokenizer_path(builder))
    def stamps():
        return {name: os.stat(os.path.join(directory, name)).st_mtime_ns
                for name in os.listdir(directory)}

    before = stamps()

    again = demo_scenes.prepare_demo_data(str(tmp_path), TINY)
    assert capsys.readouterr().out == ""
    assert demo_scenes.dataset_dir(again) == directory
    assert stamps() == before


def test_missing_tokenizer_is_trained_again(tmp_path):
    builder = demo_scenes.prepare_demo_data(str(tmp_path), TINY)
    path = demo_scenes.demo_tokenizer_path(builder)
    with open(path) as file:
        original = file.read()
    os.remove(path)
    demo_scenes.prepare_demo_data(str(tmp_path), TINY)
    with open(path) as file:
        assert file.read() == original


def test_demo_tokenizer_knows_every_content_word(small_builder):
    tokenizer = load_tokenizer(demo_scenes.demo_tokenizer_path(small_builder))
    unknown = tokenizer.tokenizer.token_to_id("[UNK]")
    words = [word for kinds in captions.CONTENT_WORDS.values()
             for forms in kinds.values() for word in forms]
    ids, mask = tokenizer.encode(words, 8)
    assert not (ids == unknown).any()


def test_interrupted_build_is_not_mistaken_for_a_finished_one(tmp_path, monkeypatch):
    real_examples = demo_scenes.split_examples

    def failing_examples(seed, split, count):
        yield from list(real_examples(seed, split, count))[:3]
        raise KeyboardInterrupt  # the user pressing Ctrl-C mid-build

    monkeypatch.setattr(demo_scenes, "split_examples", failing_examples)
    with pytest.raises(KeyboardInterrupt):
        demo_scenes.prepare_demo_data(str(tmp_path), TINY)
    config_dir = tmp_path / "demo_scenes" / "tiny"
    assert not (config_dir / "1.1.0").exists()
    # A build killed outright leaves its temporary folder; the next build must not trip on it.
    (config_dir / "incomplete.ABC123_1.1.0").mkdir(parents=True)
    (config_dir / "incomplete.ABC123_1.1.0" / "junk").write_text("half a file")
    monkeypatch.undo()

    builder = demo_scenes.prepare_demo_data(str(tmp_path), TINY)
    assert len(builder.as_data_source(split="train")) == TINY.num_train
    assert sorted(os.listdir(config_dir)) == ["1.1.0"]


def test_same_name_other_seed_is_refused(tmp_path):
    demo_scenes.prepare_demo_data(str(tmp_path), TINY)
    other = DemoScenesConfig(name="tiny", seed=4, num_train=20, num_validation=5, num_test=5)
    with pytest.raises(UserError) as error:
        demo_scenes.prepare_demo_data(str(tmp_path), other)
    assert_one_line_user_error(error, str(tmp_path), "seed")


def test_data_dir_that_is_a_file(tmp_path):
    a_file = tmp_path / "data"
    a_file.write_text("not a directory")
    with pytest.raises(UserError) as error:
        demo_scenes.prepare_demo_data(str(a_file), TINY)
    assert_one_line_user_error(error, str(a_file))
    with pytest.raises(UserError) as error:
        demo_scenes.prepare_demo_data(str(a_file / "below"), TINY)
    assert_one_line_user_error(error, str(a_file / "below"))
    assert a_file.read_text() == "not a directory"


def test_invalid_sizes_are_refused(tmp_path):
    empty = DemoScenesConfig(name="empty", num_train=0, num_validation=5, num_test=5)
    with pytest.raises(UserError) as error:
        demo_scenes.prepare_demo_data(str(tmp_path), empty)
    assert_one_line_user_error(error, "num_train")


def test_load_prepared_dataset(small_builder):
    loaded = demo_scenes.load_prepared_dataset(demo_scenes.dataset_dir(small_builder))
    assert len(loaded.as_data_source(split="test")) == SMALL.num_test
    assert sorted(loaded.info.features["captions"].keys()) == sorted(captions.LANGUAGES)


def test_load_prepared_dataset_refuses_other_folders(tmp_path, small_builder):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "cat.txt").write_text("meow")
    with pytest.raises(UserError) as error:
        demo_scenes.load_prepared_dataset(str(photos))
    assert_one_line_user_error(error, str(photos), "no dataset_info.json")
    assert sorted(os.listdir(photos)) == ["cat.txt"]

    missing = tmp_path / "nowhere"
    with pytest.raises(UserError) as error:
        demo_scenes.load_prepared_dataset(str(missing))
    assert_one_line_user_error(error, str(missing))
    assert not missing.exists()

    # The data dir instead of the dataset folder: the message points at the right one.
    data_dir = str(Path(demo_scenes.dataset_dir(small_builder)).parents[2])
    with pytest.raises(UserError) as error:
        demo_scenes.load_prepared_dataset(data_dir)
    assert_one_line_user_error(error, data_dir, demo_scenes.dataset_dir(small_builder))
