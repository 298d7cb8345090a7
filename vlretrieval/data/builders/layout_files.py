"""Checked reading of a benchmark layout's text files: every failure names the file (and line)
and what was expected, as one `UserError`; and `SourceRecord`, what every layout reader yields."""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import re
from collections.abc import Callable, Iterator
from typing import Any

from vlretrieval.errors import UserError

# tfds takes letters, digits and underscores in a split name; the published "val" becomes the
# tfds spelling so every layout's validation split has one name.
SPLIT_NAME = re.compile(r"^[A-Za-z0-9_]+$")
SPLIT_RENAMES = {"val": "validation"}
# ISO 639 codes, optionally with a region or script: "en", "fil", "pt_BR", "zh_Hant".
LANGUAGE_CODE = re.compile(r"^[a-z]{2,3}(_[A-Za-z]{2,4})?$")


@dataclasses.dataclass(frozen=True)
class SourceRecord:
    """One image and its captions. Every record of a layout holds every language of
    `layout_languages`, with an empty list where the image has no caption in it."""

    split: str  # tfds split name: "train", "validation", "test", "restval" or the layout's own
    image_path: str  # absolute; the file may be missing or corrupt (the builder counts that)
    image_id: str  # stable id of the image within the dataset
    captions: dict[str, list[str]]  # language code -> raw captions in file order, empty ones kept
    # Category names (labelled_layouts.py); empty for caption-only layouts. A record of a labelled
    # layout without one is the builder's to count.
    labels: tuple[str, ...] = ()


def require_file(path: str, what: str) -> str:
    if not os.path.isfile(path):
        raise UserError(f"{what} {path} not found")
    return path


def read_lines(path: str) -> list[str]:
    """The lines of a UTF-8 text file (gzipped if its name ends in .gz). Only "\\n" ends a line:
    str.splitlines would also split at Unicode separators a caption may contain."""
    opener: Callable[..., Any] = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8-sig", newline="") as handle:
            text = handle.read()
    except (OSError, EOFError, UnicodeDecodeError) as error:
        raise UserError(f"{path}: cannot be read as UTF-8 text ({error})") from None
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()  # the newline that ends the last line starts no new one
    return [line.removesuffix("\r") for line in lines]


def columns(path: str, count: int, separator: str | None = None) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) for every non-blank line of a table of `count` fields a line, split
    at `separator` (each field stripped) or, if None, at runs of whitespace."""
    for number, line in enumerate(read_lines(path), start=1):
        if not line.strip():
            continue
        values = [value.strip() for value in line.split(separator)] if separator else line.split()
        if len(values) != count:
            spelled = "whitespace" if separator is None else repr(separator)
            raise UserError(
                f"{path}, line {number}: expected {count} fields separated by {spelled}, found {len(values)}"
            )
        yield number, values


def load_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8-sig") as handle:
            return json.load(handle)
    except json.JSONDecodeError as error:
        raise UserError(f"{path}, line {error.lineno}: not valid JSON ({error.msg})") from None
    except UnicodeDecodeError as error:
        raise UserError(f"{path}: cannot be read as UTF-8 text ({error})") from None


def json_lines(path: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line of a JSON-lines file."""
    for number, line in enumerate(read_lines(path), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(f"{path}, line {number}: not valid JSON ({error.msg})") from None
        if not isinstance(value, dict):
            raise UserError(f"{path}, line {number}: expected a JSON object")
        yield number, value


def field(entry: Any, name: str, where: str, kind: type = object) -> Any:
    if not isinstance(entry, dict) or name not in entry:
        raise UserError(f"{where}: no {name!r} field")
    if not isinstance(entry[name], kind):
        raise UserError(f"{where}: {name!r} must be a {kind.__name__}")
    return entry[name]


def strings(value: Any, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(text, str) for text in value):
        raise UserError(f"{where}: expected a list of caption strings")
    return list(value)


def split_name(name: Any, where: str) -> str:
    split = SPLIT_RENAMES.get(name, name)
    if not isinstance(split, str) or not SPLIT_NAME.match(split):
        raise UserError(f"{where}: split {name!r} is not a name tfds takes (letters, digits, _)")
    return split


def check_language(code: Any, where: str) -> str:
    if not isinstance(code, str) or not LANGUAGE_CODE.match(code):
        raise UserError(f"{where}: {code!r} is not a language code like en, fil or pt_BR")
    return code


def image_names(path: str) -> list[str]:
    """File names listed one a line. Multi30K's test_2017_mscoco adds "#<id>" (the COCO caption
    that was translated), which is not part of the file name."""
    names = [line.split("#", 1)[0].strip() for line in read_lines(path)]
    for number, name in enumerate(names, start=1):
        if not name:
            raise UserError(f"{path}, line {number}: an empty image name")
    return names


def aligned_lines(path: str, list_path: str, count: int) -> list[str]:
    """One caption a line, one line for each image of `list_path`."""
    lines = read_lines(path)
    if len(lines) != count:
        raise UserError(
            f"{path} has {len(lines)} lines but {list_path} lists {count} images: "
            "the files must align line by line"
        )
    return lines
