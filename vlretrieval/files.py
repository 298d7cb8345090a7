"""Writing a file so that no reader, and no crash, ever sees half of it."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


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
