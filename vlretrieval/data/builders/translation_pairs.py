"""Translation pairs (text-text) from tab-separated files, as a tensorflow-datasets builder.

One file per language pair, named by its language codes: `en-it.tsv` holds English sentences and
their Italian translations, `source<TAB>target` on every line. Every file is read through and
checked before anything is written, so a malformed line is reported by file and line number and
leaves no half-built dataset behind.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import tensorflow_datasets as tfds

from vlretrieval.data.builders import building
from vlretrieval.errors import UserError

# ISO 639 codes, optionally with a region or script: "en", "pt_BR", "zh_Hant".
_LANGUAGE_CODE = re.compile(r"^[a-z]{2,3}(_[A-Za-z]{2,4})?$")


def language_pair(path: str) -> tuple[str, str]:
    """("en", "it") from `.../en-it.tsv`; a clear error for any other file name."""
    stem = Path(path).name.split(".")[0]
    codes = stem.split("-")
    if len(codes) != 2 or not all(_LANGUAGE_CODE.match(code) for code in codes):
        raise UserError(
            f"translation file {path}: name it <source>-<target>.tsv with language codes, "
            "e.g. en-it.tsv"
        )
    return codes[0], codes[1]


def read_pairs(path: str) -> Iterator[tuple[int, str, str]]:
    """(line number, source, target) for every line of a TSV file; a malformed line is an error
    naming the file and the line."""
    with open(path, encoding="utf-8") as handle:
        for number, line in _lines(handle, path):
            line = line.rstrip("\n").rstrip("\r")
            if not line.strip():
                continue  # blank lines (a trailing newline, say) carry nothing
            columns = line.split("\t")
            if len(columns) != 2:
                raise UserError(
                    f"{path}, line {number}: expected 2 tab-separated columns "
                    f"(source<TAB>target), found {len(columns)}"
                )
            source, target = (column.strip() for column in columns)
            if not source or not target:
                raise UserError(f"{path}, line {number}: an empty {'source' if not source else 'target'}")
            yield number, source, target


def _lines(handle, path: str) -> Iterator[tuple[int, str]]:
    """(line number, line) of a text file; bytes that are not UTF-8 are one error naming the file
    (text files decode in chunks, so the line is not known)."""
    try:
        yield from enumerate(handle, start=1)
    except UnicodeDecodeError as error:
        raise UserError(f"{path} is not UTF-8 text ({error.reason}); save it as UTF-8") from None


def translation_files(tsv_dir: str) -> list[tuple[str, str, str]]:
    """(path, source language, target language) of every `*.tsv` in `tsv_dir`, each checked."""
    if not os.path.isdir(tsv_dir):
        raise UserError(f"translation directory {tsv_dir} does not exist")
    paths = sorted(str(path) for path in Path(tsv_dir).glob("*.tsv"))
    if not paths:
        raise UserError(f"translation directory {tsv_dir} holds no <source>-<target>.tsv files")
    files = []
    for path in paths:
        source, target = language_pair(path)
        if sum(1 for _ in read_pairs(path)) == 0:  # reads every line: a bad one raises here
            raise UserError(f"translation file {path} holds no pairs")
        files.append((path, source, target))
    return files


@dataclasses.dataclass(eq=False)
class TranslationPairsConfig(tfds.core.BuilderConfig):
    """Which directory of `<source>-<target>.tsv` files a build reads."""

    tsv_dir: str = ""


class TranslationPairs(building.LocalBuilder):
    """Sentence pairs with their language codes: one split per language pair, named "en-it"."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}

    def _info(self) -> tfds.core.DatasetInfo:
        text = tfds.features.Text()
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__.splitlines()[0],
            features=tfds.features.FeaturesDict(
                {"source": text, "target": text, "source_language": text, "target_language": text}
            ),
        )

    def _split_generators(self, dl_manager: Any):
        del dl_manager  # local files only
        by_pair: dict[str, list] = {}
        for path, source, target in translation_files(self.builder_config.tsv_dir):
            by_pair.setdefault(f"{source}-{target}", []).append((path, source, target))
        return {pair: self._generate_examples(files) for pair, files in by_pair.items()}

    def _generate_examples(self, files):
        for path, source_language, target_language in files:
            for number, source, target in read_pairs(path):
                yield f"{Path(path).name}:{number}", {
                    "source": source,
                    "target": target,
                    "source_language": source_language,
                    "target_language": target_language,
                }


def _builder(data_dir: str, name: str, tsv_dir: str = "") -> TranslationPairs:
    config = TranslationPairsConfig(name=name, description=f"pairs from {tsv_dir}", tsv_dir=tsv_dir)
    return TranslationPairs(config=config, data_dir=data_dir, file_format="array_record")


def pair_sources(builder: TranslationPairs) -> dict[str, Any]:
    """Language pair ("en-it") -> random-access data source over its sentence pairs."""
    return builder.as_data_source()


def open_prepared(data_dir: str, name: str) -> TranslationPairs | None:
    """The build called `name` in `data_dir` if it is complete, else None."""
    builder = _builder(data_dir, name)
    return builder if builder.is_prepared() else None


def prepare(tsv_dir: str, data_dir: str, name: str) -> TranslationPairs:
    """Builds (once) the pairs of `tsv_dir` into `data_dir` under the config name `name`."""
    translation_files(tsv_dir)  # every file checked before anything is written
    builder = _builder(data_dir, name, tsv_dir)
    if not builder.is_prepared():
        builder.download_and_prepare(file_format="array_record")
        builder = _builder(data_dir, name, tsv_dir)
    return builder
