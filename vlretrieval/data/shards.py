"""Web-scale image-text shards as img2dataset writes them: webdataset tars, read as they stream.

A shard is a `.tar` of samples, each a run of consecutive members sharing one key:
`KEY.jpg` (or .jpeg/.png/.webp) with `KEY.txt` (the caption) and `KEY.json` (metadata, and for
multilingual sets such as WIT the captions per language). img2dataset's `.parquet` and
`_stats.json` beside each shard are not read. This module is the reading half of `data.name =
webdataset` (issue 20): which shards a spec names, the samples of one shard with bad members
skipped and counted, and which shards a host reads in an epoch. The streaming grain pipeline, its
shuffle buffer and its saved position build on it.

- `shard_paths(spec)`: a brace pattern (`/data/cc3m/{00000..00331}.tar`), a glob, or a text file
  listing shard paths (one per line); local paths, or any `etils.epath` path (`gs://...`) whose
  filesystem package is installed. Nothing matching is one clear error.
- `read_shard(path, ...)`: the shard's samples in tar order. An undecodable image, a sample without
  an image, a missing or empty caption, and a truncated tar are counted (`BadRecords`, named at most
  five times per problem) and skipped, unless `on_bad_record="fail"`. A file that is not a tar at
  all is an error: a wrong pattern, not a damaged shard.
- `epoch_shards(paths, seed, epoch, process_index, process_count)`: this host's shards of an epoch:
  one seeded permutation per epoch, dealt round the hosts, so hosts read disjoint shards that
  together cover every shard once per epoch.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import glob
import json
import os
import re
import tarfile
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from etils import epath
from PIL import UnidentifiedImageError

from vlretrieval.data.builders.image_captions import BadRecords, check_image
from vlretrieval.errors import UserError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
_BRACES = re.compile(r"\{(\d+)\.\.(\d+)\}")


@dataclasses.dataclass(frozen=True)
class Sample:
    key: str  # the member names' shared stem: img2dataset's zero-padded sample number
    image: bytes  # the encoded image as stored (decoded later, in the pipeline's workers)
    captions: dict[str, str]  # language -> caption
    metadata: dict[str, Any]  # KEY.json, or {}
    shard: str  # where it came from, for messages and provenance
    position: int = 0  # the key's place in the shard (0-based, counting unusable keys too)


@dataclasses.dataclass(frozen=True)
class ShardSource:
    """The training shards of `data.name = webdataset` and how their captions are read."""

    paths: tuple[str, ...]
    caption_fields: dict[str, str]  # language -> KEY.json field; empty: KEY.txt
    txt_language: str  # the language of KEY.txt captions
    index: dict[str, Any] | None = None  # `prepare-data`'s index of the shards, if built


def parse_caption_fields(text: str) -> dict[str, str]:
    """`"en=caption,de=caption_de"` -> {"en": "caption", "de": "caption_de"} (empty: {})."""
    fields = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        language, equals, field = (part.strip() for part in item.partition("="))
        if not equals or not language or not field:
            raise UserError(
                f"config.data.caption_fields {text!r}: {item!r} is not LANGUAGE=FIELD "
                '(e.g. "en=caption,de=caption_de")'
            )
        fields[language] = field
    return fields


def expand_braces(pattern: str) -> list[str]:
    """Every path of a brace pattern, `{00000..00012}` ranges keeping their zero padding; several
    ranges expand as a product, left to right. A pattern without braces is itself."""
    match = _BRACES.search(pattern)
    if match is None:
        return [pattern]
    first, last = match.group(1), match.group(2)
    if int(last) < int(first):
        raise UserError(f"shard pattern {pattern!r}: the range {{{first}..{last}}} runs backwards")
    width = len(first) if first.startswith("0") else 0
    head, tail = pattern[: match.start()], pattern[match.end():]
    return [
        path
        for number in range(int(first), int(last) + 1)
        for path in expand_braces(f"{head}{number:0{width}d}{tail}")
    ]


def _exists(path: str) -> bool:
    return os.path.exists(path) if "://" not in path else epath.Path(path).exists()


def shard_paths(spec: str) -> list[str]:
    """The shard files `spec` names (see the module docstring), in order, each checked to exist."""
    if not spec or not spec.strip():
        raise UserError("config.data.shards is empty: give a brace pattern, a glob or a file listing shards")
    if spec.endswith((".txt", ".list")) and _exists(spec):
        lines = epath.Path(spec).read_text().splitlines()
        paths = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
        where = f"the shard list {spec}"
    elif _BRACES.search(spec):
        paths, where = expand_braces(spec), f"the shard pattern {spec!r}"
    elif "://" in spec:
        parent, name = spec.rsplit("/", 1)
        paths, where = sorted(str(p) for p in epath.Path(parent).glob(name)), f"the shard glob {spec!r}"
    else:
        paths, where = sorted(glob.glob(spec)), f"the shard glob {spec!r}"
    if not paths:
        raise UserError(f"config.data.shards: {where} matches no file")
    missing = [path for path in paths if not _exists(path)]
    if missing:
        raise UserError(
            f"config.data.shards: {len(missing)} of the {len(paths)} shards of {where} do not exist "
            f"(the first: {missing[0]})"
        )
    return paths


def _captions(members: Mapping[str, bytes], caption_fields: Mapping[str, str], metadata: dict,
              txt_language: str) -> dict[str, str]:
    """Language -> caption: from JSON fields when `caption_fields` names them, else KEY.txt (in
    `txt_language`)."""
    if caption_fields:
        return {
            language: str(metadata.get(field) or "").strip() for language, field in caption_fields.items()
        }
    return {txt_language: members["txt"].decode("utf-8", errors="replace").strip()} if "txt" in members else {}


def _sample(key: str, members: dict[str, bytes], shard: str, caption_fields, txt_language: str,
            bad: BadRecords, position: int):
    """The sample of one key's members, or None (counted in `bad`) if it cannot be used."""
    where = f"{shard}:{key}"
    image_extension = next((ext for ext in IMAGE_EXTENSIONS if ext in members), None)
    if image_extension is None:
        bad.found("sample without an image", where)
        return None
    try:
        check_image(members[image_extension])
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError):
        bad.found("undecodable image", where)
        return None
    metadata = {}
    if "json" in members:
        try:
            metadata = json.loads(members["json"])
        except (json.JSONDecodeError, UnicodeDecodeError):
            bad.found("unreadable json", where)
            return None
    captions = _captions(members, caption_fields, metadata, txt_language)
    if not captions:
        bad.found("missing caption", where)
        return None
    if not any(captions.values()):
        bad.found("empty caption", where)
        return None
    usable = {language: caption for language, caption in captions.items() if caption}
    return Sample(key, members[image_extension], usable, metadata, shard, position)


def _split_name(name: str) -> tuple[str, str]:
    """("000000012", "jpg") of "000000012.jpg" (webdataset: the key is all up to the first dot of
    the file name, the rest its extension)."""
    directory, _, base = name.rpartition("/")
    stem, _, extension = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), extension.lower()


def _open(path: str):
    try:
        return epath.Path(path).open("rb")
    except OSError as error:
        raise UserError(f"shard {path} cannot be opened: {error.strerror or error}") from None


def _tar_stream(handle, path: str) -> tarfile.TarFile:
    try:
        return tarfile.open(fileobj=handle, mode="r|*")
    except tarfile.ReadError:
        raise UserError(f"shard {path} is not a tar file: is config.data.shards the right pattern?") from None


def check_shards(paths: Sequence[str], threads: int = 16) -> None:
    """Each shard opens and starts like a tar (its first header is read, nothing more): a wrong
    pattern or a stray file fails before any work, not hours into a run. In parallel, for
    remote storage."""

    def check(path: str) -> None:
        with _open(path) as handle:
            _tar_stream(handle, path)

    with concurrent.futures.ThreadPoolExecutor(min(threads, max(1, len(paths)))) as pool:
        list(pool.map(check, paths))


def read_shard(
    path: str,
    bad: BadRecords,
    caption_fields: Mapping[str, str] | None = None,
    skip: int = 0,
    txt_language: str = "en",
) -> Iterator[Sample]:
    """The usable samples of one shard in tar order (skipping the first `skip` keys, usable or not:
    a saved position). Captions come from the JSON fields `caption_fields` names (language ->
    field), else from KEY.txt, taken to be in `txt_language`. Bad members are counted in `bad`; a
    truncated tar ends the shard there, counted once."""
    caption_fields = dict(caption_fields or {})
    with _open(path) as handle:
        archive = _tar_stream(handle, path)
        key, members, position = None, {}, -1  # position: the index of `key` in the shard
        try:
            for member in archive:
                if not member.isfile():
                    continue
                member_key, extension = _split_name(member.name)
                if member_key != key:
                    sample = None
                    if position >= skip:
                        sample = _sample(key, members, path, caption_fields, txt_language, bad, position)
                    if sample:
                        yield sample
                    key, members, position = member_key, {}, position + 1
                if position >= skip:  # the members of skipped keys are passed over, not read
                    members[extension] = archive.extractfile(member).read()
        except (tarfile.ReadError, EOFError, OSError):
            bad.found("truncated tar", path)
            return  # the key being read when the shard ended is incomplete: not used
        if key is not None and position >= skip and (
            sample := _sample(key, members, path, caption_fields, txt_language, bad, position)
        ):
            yield sample


def epoch_shards(paths: list[str], seed: int, epoch: int, process_index: int, process_count: int) -> list[str]:
    """This host's shards in epoch `epoch`: the epoch's seeded permutation of every shard, dealt
    round the hosts (shard i of the permutation to host i mod process_count)."""
    if process_count > len(paths):
        raise UserError(
            f"{len(paths)} shards cannot feed {process_count} hosts: every host needs at least one "
            "shard per epoch (use more, smaller shards)"
        )
    order = np.random.default_rng([seed, epoch]).permutation(len(paths))
    return [paths[i] for i in order[process_index::process_count]]
