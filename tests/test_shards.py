"""Reading img2dataset's webdataset shards: the shard spec, the samples, bad members, the epoch's shards."""

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from vlretrieval.data import shards
from vlretrieval.data.builders.image_captions import BadRecords
from vlretrieval.errors import UserError


def _jpeg(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


def write_shard(path, samples, truncate_to=None):
    """A shard in img2dataset's layout: KEY.jpg, KEY.txt, KEY.json per sample, in that order.
    `samples`: (key, {extension: bytes}) pairs."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for key, members in samples:
            for extension, data in members.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    data = buffer.getvalue()
    path.write_bytes(data if truncate_to is None else data[:truncate_to])


def good(number, caption="a red square", **metadata):
    key = f"{number:09d}"
    return key, {"jpg": _jpeg(number * 10 % 256), "txt": caption.encode(),
                 "json": json.dumps({"key": key, "caption": caption, **metadata}).encode()}


def test_specs_expand_braces_globs_and_lists_and_refuse_what_matches_nothing(tmp_path):
    for number in range(3):
        write_shard(tmp_path / f"{number:05d}.tar", [good(number)])
        (tmp_path / f"{number:05d}.parquet").write_bytes(b"")  # img2dataset's sidecars
    expected = [str(tmp_path / f"{number:05d}.tar") for number in range(3)]
    assert shards.shard_paths(str(tmp_path / "{00000..00002}.tar")) == expected
    assert shards.shard_paths(str(tmp_path / "*.tar")) == expected
    listing = tmp_path / "shards.txt"
    listing.write_text("\n".join(expected) + "\n")
    assert shards.shard_paths(str(listing)) == expected
    assert shards.expand_braces("a/{8..10}/{0..1}.tar") == ["a/8/0.tar", "a/8/1.tar", "a/9/0.tar",
                                                             "a/9/1.tar", "a/10/0.tar", "a/10/1.tar"]
    with pytest.raises(UserError, match="matches no file"):
        shards.shard_paths(str(tmp_path / "*.tgz"))
    with pytest.raises(UserError, match="1 of the 4 shards .* do not exist"):
        shards.shard_paths(str(tmp_path / "{00000..00003}.tar"))


def test_a_shard_yields_its_samples_in_order_with_captions_from_txt_or_json_fields(tmp_path):
    path = tmp_path / "00000.tar"
    write_shard(path, [good(0, "a red square", caption_de="ein rotes Quadrat"), good(1, "a blue disc")])
    bad = BadRecords("skip")
    samples = list(shards.read_shard(str(path), bad))
    assert [s.key for s in samples] == ["000000000", "000000001"]
    assert samples[0].captions == {"en": "a red square"} and samples[1].metadata["caption"] == "a blue disc"
    assert Image.open(io.BytesIO(samples[1].image)).size == (8, 8)
    multilingual = list(shards.read_shard(str(path), bad, {"en": "caption", "de": "caption_de"}))
    assert multilingual[0].captions == {"en": "a red square", "de": "ein rotes Quadrat"}
    assert multilingual[1].captions == {"en": "a blue disc"}  # no German: that language is absent
    assert not bad.counts
    # A saved position: the first key skipped.
    assert [s.key for s in shards.read_shard(str(path), bad, skip=1)] == ["000000001"]


def test_bad_members_of_each_kind_are_skipped_and_counted(tmp_path):
    path = tmp_path / "00000.tar"
    samples = [
        good(0),
        ("000000001", {"jpg": b"not an image", "txt": b"x"}),
        ("000000002", {"txt": b"a caption without its image"}),
        ("000000003", {"jpg": _jpeg(3), "json": b"{}"}),  # no caption at all
        ("000000004", {"jpg": _jpeg(4), "txt": b"   "}),
        ("000000005", {"jpg": _jpeg(5), "txt": b"ok", "json": b"{not json"}),
        good(6),
    ]
    write_shard(path, samples)
    bad = BadRecords("skip")
    assert [s.key for s in shards.read_shard(str(path), bad)] == ["000000000", "000000006"]
    assert dict(bad.counts) == {"undecodable image": 1, "sample without an image": 1, "missing caption": 1,
                                "empty caption": 1, "unreadable json": 1}
    assert bad.examples["undecodable image"] == [f"{path}:000000001"]
    with pytest.raises(UserError, match="on_bad_record is 'fail'"):
        list(shards.read_shard(str(path), BadRecords("fail")))


def test_a_truncated_shard_ends_there_counted_and_a_file_that_is_no_tar_is_an_error(tmp_path):
    path = tmp_path / "00000.tar"
    write_shard(path, [good(number) for number in range(6)])
    write_shard(path, [good(number) for number in range(6)], truncate_to=path.stat().st_size // 2)
    bad = BadRecords("skip")
    kept = [s.key for s in shards.read_shard(str(path), bad)]
    assert 0 < len(kept) < 6 and kept == [f"{n:09d}" for n in range(len(kept))]
    assert bad.counts["truncated tar"] == 1
    not_tar = tmp_path / "00001.tar"
    not_tar.write_text("key,caption\n" * 100)
    with pytest.raises(UserError, match="is not a tar file"):
        list(shards.read_shard(str(not_tar), BadRecords("skip")))


def test_hosts_read_disjoint_shards_covering_the_epoch_reshuffled_by_seed_and_epoch():
    paths = [f"{number:05d}.tar" for number in range(10)]
    for count in (1, 2, 3):
        dealt = [shards.epoch_shards(paths, 0, 0, index, count) for index in range(count)]
        assert sorted(p for host in dealt for p in host) == paths  # every shard once
    assert shards.epoch_shards(paths, 0, 0, 0, 1) == shards.epoch_shards(paths, 0, 0, 0, 1)
    assert shards.epoch_shards(paths, 0, 1, 0, 1) != shards.epoch_shards(paths, 0, 0, 0, 1)
    assert shards.epoch_shards(paths, 1, 0, 0, 1) != shards.epoch_shards(paths, 0, 0, 0, 1)
    with pytest.raises(UserError, match="10 shards cannot feed 11 hosts"):
        shards.epoch_shards(paths, 0, 0, 0, 11)
