"""Output files: checked before any work, and written so that no reader, and no crash, ever sees
half of one."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from vlretrieval.errors import UserError


@contextlib.contextmanager
def replaced_atomically(path: str) -> Iterator[str]:
    """Yields a temporary path beside `path` to write; when the block succeeds the file replaces
    `path` in one rename (atomic on POSIX filesystems), when it fails the temporary file is
    removed and `path` is left as it was."""
    temporary = f"{path}.tmp-{os.getpid()}"
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def check_writable(path: str, what: str, *, directory: bool = False) -> None:
    """Fail before any work if `path` (a file, or with `directory` a folder) could not be
    written: a file path that is a folder (or a folder path that is a file), or a nearest existing
    parent that is not a writable folder. Creates nothing."""
    if os.path.exists(path):
        if directory != os.path.isdir(path):
            raise UserError(f"{what} {path!r} is {'a file' if directory else 'a directory'}")
        if not os.access(path if directory else os.path.dirname(os.path.abspath(path)), os.W_OK):
            raise UserError(f"{what} {path!r} cannot be written: permission denied")
        return
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        reason = "is not a directory" if not os.path.isdir(parent) else "is not writable"
        raise UserError(f"{what} {path!r} cannot be written: {parent} {reason}")
