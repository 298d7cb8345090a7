"""Category-labelled benchmark layouts: each reader's records (split, captions, labels), their builds
(a `labels` feature indexing the metadata's `categories`), bad records counted, bad files named
by file and line."""

import gzip
import json
import shutil
from pathlib import Path

import pytest

from tests import labelled_fixtures, layout_fixtures
from tests.layout_fixtures import image_colour, make_karpathy
from vlretrieval.data.builders import image_captions
from vlretrieval.data.builders.labelled_layouts import LABELLED_LAYOUTS, WIKIPEDIA_CATEGORIES, abo_split
from vlretrieval.data.builders.layouts import LAYOUTS, layout_categories, layout_splits, read_layout
from vlretrieval.errors import UserError


def read(fixture, **options):
    return list(read_layout(fixture.layout, fixture.source_dir, **{**fixture.options, **options}))


def read_error(fixture, *needles: str, **options) -> None:
    with pytest.raises(UserError) as error:
        read(fixture, **options)
    message = str(error.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message


def prepare(fixture, data_dir):
    config = image_captions.builder_config(fixture.layout, fixture.source_dir, options=fixture.options)
    return image_captions.prepare(config, str(data_dir))


def replace_line(path: Path, number: int, text: str) -> None:
    lines = path.read_text().splitlines()
    lines[number - 1] = text
    path.write_text("".join(line + "\n" for line in lines))


@pytest.mark.parametrize("layout", LABELLED_LAYOUTS)
def test_every_labelled_layout_reads_back_what_its_fixture_wrote(tmp_path, layout):
    fixture = labelled_fixtures.MAKERS[layout](tmp_path)
    records = read(fixture)
    assert records == fixture.records()
    assert layout in LAYOUTS
    assert layout_splits(layout, fixture.source_dir, **fixture.options) == fixture.splits()
    assert layout_categories(layout, fixture.source_dir, **fixture.options) == fixture.categories()
    assert 2 <= len(fixture.categories()) <= 4
    for record, image in zip(records, fixture.images):
        assert Path(record.image_path).is_absolute()
        if image.state == "ok":  # the captions describe the image they are paired with
            assert image_colour(record.image_path) == image.colour
            assert all(image.colour in text for text in record.captions["en"] if text)


@pytest.mark.parametrize("layout", LABELLED_LAYOUTS)
def test_every_labelled_layout_builds_labels_and_categories_and_counts_bad_records(tmp_path, layout):
    fixture = labelled_fixtures.MAKERS[layout](tmp_path / "source")
    builder = prepare(fixture, tmp_path / "data")
    categories = image_captions.categories(builder)
    assert categories == fixture.categories()
    assert builder.info.metadata["categories"] == list(fixture.categories())
    kept = fixture.kept()
    assert {split: info.num_examples for split, info in builder.info.splits.items()} == {
        split: sum(image.split == split for image in kept) for split in fixture.splits()
    }
    for split in fixture.splits():
        source = builder.as_data_source(split=split)
        records = {record["image_id"].decode(): record for record in (source[i] for i in range(len(source)))}
        for image in (image for image in kept if image.split == split):
            record = records[image.image_id]
            assert tuple(categories[index] for index in record["labels"]) == image.labels
            assert [text.decode() for text in record["captions"]["en"]] == [
                text.strip() for text in image.captions["en"] if text.strip()
            ]
    bad = image_captions.read_bad_records(builder)
    assert bad["counts"] == fixture.bad_counts()
    assert {"missing image", "undecodable image"} <= set(bad["counts"])
    assert {"empty caption", "image without captions"} & set(bad["counts"])


def test_a_reopened_build_keeps_its_categories_and_caption_layouts_have_none(tmp_path):
    fixture = labelled_fixtures.make_cub(tmp_path / "cub")
    built = prepare(fixture, tmp_path / "data")
    reopened = image_captions.building.load_prepared_dataset(str(built.data_dir))
    assert image_captions.categories(reopened) == labelled_fixtures.CUB_CLASSES
    karpathy = make_karpathy(tmp_path / "coco")
    config = image_captions.builder_config("karpathy", karpathy.source_dir)
    plain = image_captions.prepare(config, str(tmp_path / "data"))
    assert image_captions.categories(plain) is None
    assert "labels" not in plain.info.features.keys() and "categories" not in plain.info.metadata
    assert set(plain.info.features["captions"].keys()) == {"en"}


def test_write_all_writes_every_labelled_layout(tmp_path):
    fixtures = labelled_fixtures.write_all(tmp_path)
    assert tuple(fixtures) == LABELLED_LAYOUTS
    assert set(LAYOUTS) == set(layout_fixtures.MAKERS) | set(fixtures)  # every layout has a fixture
    for layout, fixture in fixtures.items():
        assert fixture.source_dir == str(tmp_path / layout) and fixture.layout == layout


# --- per-layout protocols and options ------------------------------------------------------------


def test_wikipedia_names_categories_from_the_list_or_the_canonical_ten(tmp_path):
    fixture = labelled_fixtures.make_wikipedia(tmp_path)
    (tmp_path / "categories.list").unlink()
    assert read(fixture) == fixture.records()  # the canonical names are the published list's
    assert WIKIPEDIA_CATEGORIES[6] == "music"
    (tmp_path / "categories.list").write_text("art\nbiology\n")  # the fixture uses category 7
    read_error(fixture, str(tmp_path / "trainset_txt_img_cat.list"), "line 4", "'7'", "1 to 2")


def test_pascal_sentence_takes_the_first_files_of_each_category_for_test_then_validation(tmp_path):
    fixture = labelled_fixtures.make_pascal_sentence(tmp_path)
    records = read(fixture, validation_per_category=1)
    assert [record.split for record in records] == ["test", "validation", "train"] * 3
    assert {record.split for record in read(fixture, test_per_category=None)} == {"test"}  # default 5
    read_error(fixture, "test_per_category", test_per_category=-1)


def test_cub_zero_shot_class_split(tmp_path):
    fixture = labelled_fixtures.make_cub(tmp_path)
    records = read(fixture, class_split=True)
    assert [(record.split, record.labels[0][:3]) for record in records] == [
        ("train", "001"), ("train", "001"), ("train", "002"), ("train", "002"), ("test", "003"), ("test", "003")
    ]  # fmt: skip
    (tmp_path / "trainvalclasses.txt").write_text("001.Black_footed_Albatross\n004.Unknown\n")
    read_error(fixture, str(tmp_path / "trainvalclasses.txt"), "line 2", "004.Unknown", class_split=True)
    (tmp_path / "testclasses.txt").unlink()
    (tmp_path / "trainvalclasses.txt").write_text("001.Black_footed_Albatross\n")
    read_error(fixture, str(tmp_path / "testclasses.txt"), class_split=True)


def test_abo_language_option_and_a_stable_hash_split(tmp_path):
    fixture = labelled_fixtures.make_abo(tmp_path)
    german = read(fixture, language_tag_prefix="de")
    assert [len(record.captions["de"]) for record in german] == [1, 0, 0, 0, 0, 0, 0, 0]
    assert all(set(record.captions) == {"de"} for record in german)
    # Pinned: a change of the hash would move items between train and test.
    assert [abo_split(f"B07{n:07d}", 0.1) for n in range(6)] == ["test"] + ["train"] * 5
    assert sum(abo_split(f"B{n:09d}", 0.1) == "test" for n in range(2000)) in range(160, 241)
    assert {record.split for record in read(fixture, test_fraction=0.0)} == {"train"}
    read_error(fixture, "test_fraction", test_fraction=1.5)


# --- bad files: named with their line ------------------------------------------------------------


@pytest.mark.parametrize(
    ("layout", "remove"),
    [
        ("wikipedia", "testset_txt_img_cat.list"),
        ("pascal_sentence", "sentence"),
        ("cub", "CUB_200_2011/classes.txt"),
        ("cub", "CUB_200_2011/image_class_labels.txt"),
        ("abo", "images/metadata/images.csv.gz"),
        ("fashion200k", "labels"),
    ],
)
def test_a_missing_category_or_list_file_names_it(tmp_path, layout, remove):
    fixture = labelled_fixtures.MAKERS[layout](tmp_path)
    path = tmp_path / remove
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    read_error(fixture, str(path))


def test_misaligned_list_lines_name_the_file_and_line(tmp_path):
    wikipedia = labelled_fixtures.make_wikipedia(tmp_path / "wikipedia")
    path = tmp_path / "wikipedia" / "testset_txt_img_cat.list"
    replace_line(path, 2, "only-a-text-id\t3")
    read_error(wikipedia, str(path), "line 2", "3 fields", "found 2")
    replace_line(path, 2, "t\ti\t11")
    read_error(wikipedia, str(path), "line 2", "'11'", "1 to 10")

    cub = labelled_fixtures.make_cub(tmp_path / "cub")
    labels = tmp_path / "cub" / "CUB_200_2011" / "image_class_labels.txt"
    labels.write_text("".join(line + "\n" for line in labels.read_text().splitlines() if not line.startswith("5 ")))
    images = tmp_path / "cub" / "CUB_200_2011" / "images.txt"
    read_error(cub, f"{images}, line 5", "image id 5", str(labels))
    replace_line(labels, 2, "2 9")
    read_error(cub, f"{labels}, line 2", "class id 9")

    fashion = labelled_fixtures.make_fashion200k(tmp_path / "fashion")
    path = tmp_path / "fashion" / "labels" / "skirt_train_detect_all.txt"
    replace_line(path, 2, "women/skirts/x.jpeg\tnot-a-score\ta skirt")
    read_error(fashion, str(path), "line 2", "not-a-score")
    replace_line(path, 2, "women/skirts/x.jpeg a skirt")
    read_error(fashion, str(path), "line 2", "3 fields")


def test_abo_bad_listing_lines_name_the_file_and_line(tmp_path):
    fixture = labelled_fixtures.make_abo(tmp_path)
    path = tmp_path / "listings" / "metadata" / "listings_1.json.gz"
    lines = gzip.decompress(path.read_bytes()).decode().splitlines()
    listing = json.loads(lines[2])
    listing["main_image_id"] = "nowhere"
    lines[2] = json.dumps(listing)
    path.write_bytes(gzip.compress("\n".join(lines).encode()))
    read_error(fixture, f"{path}, line 3", "'nowhere'", "images.csv.gz")
    lines[2] = "{not json"
    path.write_bytes(gzip.compress("\n".join(lines).encode()))
    read_error(fixture, f"{path}, line 3", "JSON")
