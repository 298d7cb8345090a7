"""What every dataset build shares: one builder per directory at a time, quiet tfds, clean
failure (no half-built dataset left looking prepared), and reading prepared folders back."""

from __future__ import annotations

import contextlib
import fcntl
import io
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import tensorflow_datasets as tfds
from etils import epath

from vlretrieval.errors import UserError

log = logging.getLogger(__name__)


class LocalBuilder(tfds.core.GeneratorBasedBuilder):
    """A tfds builder defined in this package rather than in an installed dataset package."""

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        """The defining module's file. tfds's own lookup imports `importlib_resources`, which
        tfds 4.9.10 does not install on Python >= 3.9 (tensorflow/datasets#11212), so building
        would fail without this."""
        return epath.Path(sys.modules[cls.__module__].__file__)


def remove_stale_incomplete(builder: tfds.core.DatasetBuilder) -> None:
    """Removes `incomplete.*` folders of this builder's version: a build killed outright (no
    `finally`) or one that failed leaves them; the caller holds the lock, so none is in use."""
    folder = Path(os.fspath(builder.data_dir)).parent
    for stale in folder.glob(f"incomplete.*_{builder.version}"):
        shutil.rmtree(stale, ignore_errors=True)


def ensure_data_dir(data_dir: str, what: str) -> Path:
    """`data_dir` as a Path, created if missing; a clear error if it is a file or unwritable."""
    root = Path(data_dir)
    if root.exists() and not root.is_dir():
        raise UserError(f"data directory {data_dir} is a file: pass a directory for {what}")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(
            f"cannot create data directory {data_dir} ({one_line(error)}): "
            "pass a writable directory"
        ) from error
    return root


def run_build(builder: tfds.core.DatasetBuilder, data_dir: str, what: str, space: str) -> None:
    """Runs the tfds build with one line of output ("Generating <what> in <dir> ... done").

    tfds writes into an `incomplete.*` sibling folder and renames it when done, so an interrupted
    build never looks prepared (`is_prepared` needs dataset_info.json in the final folder); a
    failed one is removed here, so nothing half-built stays behind.
    """
    if not os.access(data_dir, os.W_OK):
        raise UserError(f"data directory {data_dir} is not writable: pass a writable directory")
    remove_stale_incomplete(builder)
    log.info(f"Generating {what} in {os.fspath(builder.data_dir)} ...")
    start = time.perf_counter()
    try:
        with quiet_tfds():
            builder.download_and_prepare(file_format="array_record")
    except BaseException as error:  # Ctrl-C included: end the line before the traceback
        log.info(f"... {what} failed")
        remove_stale_incomplete(builder)
        if isinstance(error, UserError) or not isinstance(error, OSError):
            raise
        raise UserError(
            f"cannot write {what} into {data_dir} ({one_line(error)}): "
            f"pass a writable directory with {space} free"
        ) from error
    log.info(f"... {what} done in {time.perf_counter() - start:.1f} s")
    remove_empty_download_folders(data_dir)


def remove_empty_download_folders(data_dir: str) -> None:
    """tfds's download manager leaves an empty downloads/extracted behind: nothing was downloaded."""
    for empty in ("downloads/extracted", "downloads"):
        with contextlib.suppress(OSError):  # not empty (other datasets use it) or already gone
            os.rmdir(os.path.join(data_dir, empty))


@contextlib.contextmanager
def quiet_tfds() -> Iterator[None]:
    """Silences tfds's progress bars, prints and info warnings, which would break the one line.

    Everything is restored afterwards: the caller's logging and progress-bar choices stand.
    """
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    bars_were_on = getattr(tfds.core.utils.tqdm_utils, "_active", True)
    absl_logger.setLevel(logging.ERROR)
    tfds.display_progress_bar(False)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        tfds.display_progress_bar(bars_were_on)
        absl_logger.setLevel(level)


def read_all(source, chunk: int = 512) -> Iterator[dict[str, Any]]:
    """Every record of a data source, in order. Batched reads (`__getitems__`, the grain
    data-source protocol) are ~30% faster than one at a time."""
    for start in range(0, len(source), chunk):
        yield from source.__getitems__(range(start, min(start + chunk, len(source))))


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Holds an advisory lock on `path`; without one (read-only directory) runs unlocked."""
    try:
        handle = open(path, "a")
    except OSError:
        # A read-only directory can still hold a finished build; building there fails clearly.
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def load_prepared_dataset(dataset_dir: str) -> tfds.core.DatasetBuilder:
    """Opens a prepared tfds dataset folder (the one holding dataset_info.json), no builder code."""
    path = Path(dataset_dir)
    if not path.exists():
        raise UserError(
            f"dataset directory {dataset_dir} does not exist: "
            "pass the folder that holds dataset_info.json"
        )
    if not (path / "dataset_info.json").is_file():
        hint = ""
        if path.is_dir():  # the data dir itself is a common mistake: point at what is inside
            found = [*sorted(path.glob("*/dataset_info.json")),
                     *sorted(path.glob("*/*/*/dataset_info.json"))]
            if found:
                hint = f" (did you mean {found[0].parent}?)"
        raise UserError(
            f"{dataset_dir} is not a prepared tensorflow-datasets directory (no "
            "dataset_info.json): pass the folder that holds it, "
            f"e.g. <data_dir>/demo_scenes/default/1.1.0{hint}"
        )
    try:
        return tfds.builder_from_directory(dataset_dir)
    except Exception as error:  # tfds raises many types for a damaged folder
        raise UserError(
            f"cannot read the dataset in {dataset_dir} ({one_line(error)}): prepare it again"
        ) from error


def one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
