"""Readers of the published benchmark layouts: every record, every caption, aligned with its image;
bad files reported by name and line."""

import dataclasses
import gzip
import json
from pathlib import Path

import pytest

from tests import layout_fixtures
from tests.layout_fixtures import Fixture, image_colour
from vlretrieval.data.builders.layouts import (
    LAYOUTS,
    SourceRecord,
    layout_languages,
    layout_splits,
    read_layout,
)
from vlretrieval.errors import UserError


def read(fixture: Fixture, **options) -> list[SourceRecord]:
    return list(read_layout(fixture.layout, fixture.source_dir, **options))


def expected_records(fixture: Fixture) -> list[SourceRecord]:
    return [
        SourceRecord(image.split, image.image_path, image.image_id, image.captions)
        for image in fixture.images
    ]


def assert_aligned(records: list[SourceRecord]) -> None:
    """Each record's image file is the one its captions describe (they name its colour)."""
    for record in records:
        colour = image_colour(record.image_path)
        texts = [text for texts in record.captions.values() for text in texts]
        assert texts and all(f"a {colour} square" in text for text in texts), record


def assert_user_error(error: pytest.ExceptionInfo, *needles: str) -> None:
    message = str(error.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message


@pytest.mark.parametrize("layout", layout_fixtures.MAKERS)  # labelled layouts: test_labelled_layouts.py
def test_every_layout_reads_back_what_its_fixture_wrote(tmp_path, layout):
    fixture = layout_fixtures.MAKERS[layout](tmp_path)
    records = read(fixture)
    assert records == expected_records(fixture)
    assert_aligned(records)
    assert layout_splits(layout, fixture.source_dir) == fixture.splits()
    assert layout_languages(layout, fixture.source_dir) == fixture.languages()
    for record in records:
        assert Path(record.image_path).is_absolute()
        assert sorted(record.captions) == list(fixture.languages())


def test_karpathy_coco_splits_captions_and_ids(tmp_path):
    fixture = layout_fixtures.make_karpathy(tmp_path, "coco")
    records = read(fixture)
    sizes = {split: sum(r.split == split for r in records) for split in fixture.splits()}
    assert sizes == {"train": 2, "validation": 2, "test": 2, "restval": 2}
    assert [len(r.captions["en"]) for r in records] == [2, 3, 2, 3, 2, 3, 2, 3]
    # COCO images under filepath (train2014/val2014), ids from cocoid
    assert Path(records[0].image_path).parent.name == "train2014"
    assert Path(records[2].image_path).parent.name == "val2014"
    assert records[0].image_id == "391895"
    assert layout_languages("karpathy", fixture.source_dir) == ("en",)


def test_karpathy_restval_folds_into_train_when_asked(tmp_path):
    fixture = layout_fixtures.make_karpathy(tmp_path, "coco")
    records = read(fixture, restval_to_train=True)
    assert [r.split for r in records] == ["train"] * 2 + ["validation"] * 2 + ["test"] * 2 + [
        "train"
    ] * 2
    assert layout_splits("karpathy", fixture.source_dir, restval_to_train=True) == (
        "train", "validation", "test"
    )  # fmt: skip


def test_karpathy_flickr_has_flat_images_and_file_name_ids(tmp_path):
    fixture = layout_fixtures.make_karpathy(tmp_path, "flickr30k")
    records = read(fixture)
    assert records == expected_records(fixture)
    assert records[0].image_id == "1000092795"
    assert Path(records[0].image_path).parent == tmp_path / "images"
    assert fixture.split_sizes() == {"train": 3, "validation": 2, "test": 2}


def test_karpathy_picks_the_annotation_file(tmp_path):
    layout_fixtures.make_karpathy(tmp_path / "both", "coco")
    layout_fixtures.make_karpathy(tmp_path / "both", "flickr8k")
    with pytest.raises(UserError) as error:
        list(read_layout("karpathy", str(tmp_path / "both")))
    assert_user_error(error, "dataset_coco.json", "dataset_flickr8k.json", "annotation=")
    records = list(
        read_layout("karpathy", str(tmp_path / "both"), annotation="dataset_flickr8k.json")
    )
    assert len(records) == 7 and "restval" not in {r.split for r in records}
    (tmp_path / "none").mkdir()
    with pytest.raises(UserError) as error:
        list(read_layout("karpathy", str(tmp_path / "none")))
    assert_user_error(error, "dataset_coco.json", str(tmp_path / "none"))


def test_karpathy_malformed_json_names_file_and_line(tmp_path):
    fixture = layout_fixtures.make_karpathy(tmp_path)
    path = tmp_path / "dataset_coco.json"
    path.write_text('{"images": [\n{"filename": "a.jpg",\n"split" "train"}]}')
    with pytest.raises(UserError) as error:
        read(fixture)
    assert_user_error(error, str(path), "line 3")
    path.write_text(json.dumps({"images": [{"filename": "a.jpg", "split": "train"}]}))
    with pytest.raises(UserError) as error:
        read(fixture)
    assert_user_error(error, str(path), "images[0]", "sentences")


def test_crossmodal3600_languages_and_caption_counts(tmp_path):
    fixture = layout_fixtures.make_crossmodal3600(tmp_path, languages=("ar", "en", "fil", "zh"))
    records = read(fixture)
    assert {r.split for r in records} == {"test"} and len(records) == 4
    assert layout_languages("crossmodal3600", fixture.source_dir) == ("ar", "en", "fil", "zh")
    assert all(len(r.captions["en"]) == 2 and len(r.captions["zh"]) == 1 for r in records)
    assert all(Path(r.image_path).name == f"{r.image_id}.jpg" for r in records)


def test_crossmodal3600_bad_json_line_names_the_line(tmp_path):
    fixture = layout_fixtures.make_crossmodal3600(tmp_path)
    path = tmp_path / "captions.jsonl"
    lines = path.read_text().splitlines()
    lines[2] = lines[2][:-5]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError) as error:
        read(fixture)
    assert_user_error(error, str(path), "line 3")


def test_xtd10_reads_every_folder_and_calls_japanese_ja(tmp_path):
    fixture = layout_fixtures.make_xtd10(tmp_path)
    records = read(fixture)
    assert layout_languages("xtd10", fixture.source_dir) == (
        "de", "en", "es", "fr", "it", "ja", "zh"
    )  # fmt: skip
    assert all(len(texts) == 1 for r in records for texts in r.captions.values())
    assert records[1].captions["ja"] == [layout_fixtures.caption(1, "jp")]
    assert records[0].image_id == "COCO_train2014_000000061844"


def test_xtd10_misaligned_caption_file_names_file_and_counts(tmp_path):
    fixture = layout_fixtures.make_xtd10(tmp_path)
    path = tmp_path / "XTD10" / "test_1kcaptions_it.txt"
    path.write_text("".join(line + "\n" for line in path.read_text().splitlines()[:3]))
    with pytest.raises(UserError) as error:
        read(fixture)
    assert_user_error(error, str(path), "3 lines", "4 images", "test_image_names.txt")


def test_xtd10_missing_image_list_names_the_path(tmp_path):
    fixture = layout_fixtures.make_xtd10(tmp_path)
    (tmp_path / "XTD10" / "test_image_names.txt").unlink()
    with pytest.raises(UserError) as error:
        read(fixture)
    assert_user_error(error, str(tmp_path / "XTD10" / "test_image_names.txt"))


@pytest.mark.parametrize("gzipped", [True, False])
def test_multi30k_splits_languages_and_coco_images(tmp_path, gzipped):
    fixture = layout_fixtures.make_multi30k(tmp_path, gzipped=gzipped)
    records = read(fixture)
    assert records == expected_records(fixture)
    assert_aligned(records)
    assert layout_splits("multi30k", fixture.source_dir) == (
        "train", "validation", "test_2016_flickr", "test_2017_mscoco"
    )  # fmt: skip
    assert layout_languages("multi30k", fixture.source_dir) == ("cs", "de", "en", "fr")
    mscoco = [r for r in records if r.split == "test_2017_mscoco"]
    assert all(r.captions["cs"] == [] and len(r.captions["de"]) == 1 for r in mscoco)
    assert [Path(r.image_path).parent.name for r in mscoco] == ["val2014", "train2014"]
    assert all("#" not in r.image_path and "#" not in r.image_id for r in mscoco)


def test_multi30k_coco_images_dir_option(tmp_path):
    fixture = layout_fixtures.make_multi30k(tmp_path)
    records = read(fixture, coco_images_dir=str(tmp_path / "coco"))
    mscoco = [r for r in records if r.split == "test_2017_mscoco"]
    assert all(r.image_path.startswith(str(tmp_path / "coco" / "")) for r in mscoco)
    flickr = [r for r in records if r.split != "test_2017_mscoco"]
    assert all(Path(r.image_path).parent == tmp_path / "images" for r in flickr)


def test_multi30k_misaligned_gz_names_file_and_counts(tmp_path):
    fixture = layout_fixtures.make_multi30k(tmp_path)
    path = tmp_path / "data" / "task1" / "raw" / "val.de.gz"
    path.write_bytes(gzip.compress(b"only one line\n"))
    with pytest.raises(UserError) as error:
        read(fixture)
    assert_user_error(error, str(path), "1 lines", "2 images", "val.txt")


def test_multi30k_missing_image_lists_names_the_path(tmp_path):
    with pytest.raises(UserError) as error:
        list(read_layout("multi30k", str(tmp_path)))
    assert_user_error(error, str(tmp_path / "data" / "task1" / "image_splits"))


def test_jsonl_merges_single_caption_lines_and_defaults(tmp_path):
    fixture = layout_fixtures.make_jsonl(tmp_path)
    records = read(fixture)
    assert [r.split for r in records] == ["train", "train", "validation", "test"]
    assert records[1].captions == {
        "de": [layout_fixtures.caption(1, "de")],
        "en": [layout_fixtures.caption(1, "en")],
    }
    assert records[3].captions["en"] == [] and records[0].image_id == "photos/a.jpg"


def test_jsonl_language_option_and_bad_lines(tmp_path):
    path = tmp_path / "captions.jsonl"
    path.write_text('{"image": "a.jpg", "caption": "hallo"}\n\n{"image": "b.jpg", "caption": 3}\n')
    with pytest.raises(UserError) as error:
        list(read_layout("jsonl", str(tmp_path), language="de"))
    assert_user_error(error, str(path), "line 3", "caption")
    path.write_text('{"image": "a.jpg", "caption": "hallo"}\n')
    (record,) = read_layout("jsonl", str(tmp_path), language="de")
    assert record.captions == {"de": ["hallo"]} and record.split == "train"
    path.write_text('{"image": "a.jpg", "caption": "x", "split": "my split"}\n')
    with pytest.raises(UserError) as error:
        list(read_layout("jsonl", str(tmp_path)))
    assert_user_error(error, "line 1", "my split")


def test_faults_are_kept_for_the_builder(tmp_path):
    """Corrupt and missing images and empty captions are reported as they are, not judged."""
    fixture = layout_fixtures.make_karpathy(tmp_path, corrupt=0, missing=1, empty_caption=2)
    records = read(fixture)
    assert records == expected_records(fixture)
    assert [image.state for image in fixture.images[:3]] == ["corrupt", "missing", "ok"]
    assert not Path(records[1].image_path).exists()
    assert 0 < Path(records[0].image_path).stat().st_size
    assert records[2].captions["en"][0] == "" and len(records[2].captions["en"]) == 2


@pytest.mark.parametrize("layout", ["crossmodal3600", "jsonl"])
def test_missing_annotation_file_names_the_path(tmp_path, layout):
    with pytest.raises(UserError) as error:
        list(read_layout(layout, str(tmp_path)))
    assert_user_error(error, str(tmp_path / "captions.jsonl"))


def test_unknown_layout_option_or_directory(tmp_path):
    with pytest.raises(UserError) as error:
        read_layout("coco", str(tmp_path))
    assert_user_error(error, "'coco'", *LAYOUTS)
    with pytest.raises(UserError) as error:
        read_layout("xtd10", str(tmp_path), restval_to_train=True)
    assert_user_error(error, "restval_to_train", "xtd10")
    with pytest.raises(UserError) as error:
        read_layout("karpathy", str(tmp_path), restval_to_train="yes")
    assert_user_error(error, "restval_to_train", "bool")
    with pytest.raises(UserError) as error:
        read_layout("jsonl", str(tmp_path / "nowhere"))
    assert_user_error(error, str(tmp_path / "nowhere"))


def test_records_are_frozen(tmp_path):
    (record, *_) = read(layout_fixtures.make_jsonl(tmp_path))
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.split = "test"  # type: ignore[misc]
