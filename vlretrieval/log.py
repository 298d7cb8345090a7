"""Console messages through `logging`: the "vlretrieval" logger, printed by process 0.

Modules log with `logging.getLogger(__name__)`. One handler on the package's logger (installed on
import, since the CLI and the tests' direct calls both want the lines) prints:
- info lines on stdout as they are;
- warnings and errors on stderr, prefixed `warning:` / `error:`;
- on a multi-host run (`set_process`), only warnings and errors on processes other than 0, each
  prefixed with the host that wrote it.
Lines go through `tqdm.write`, so they do not tear a progress bar. The package's logger does not
propagate: absl's or a user's root handlers would print every line twice. To take the messages
elsewhere, replace `CONSOLE` on `logging.getLogger("vlretrieval")`.
"""

from __future__ import annotations

import logging
import sys

from tqdm import tqdm

PREFIXES = {logging.WARNING: "warning: ", logging.ERROR: "error: ", logging.CRITICAL: "error: "}


class Console(logging.Handler):
    """Writes records as plain lines (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__(level=logging.INFO)
        self.process_index, self.process_count = 0, 1

    def emit(self, record: logging.LogRecord) -> None:
        if self.process_index != 0 and record.levelno < logging.WARNING:
            return
        try:
            line = PREFIXES.get(record.levelno, "") + record.getMessage()
            if self.process_index != 0:
                line = f"[host {self.process_index} of {self.process_count}] {line}"
            stream = sys.stdout if record.levelno < logging.WARNING else sys.stderr
            tqdm.write(line, file=stream)
            stream.flush()
        except Exception:  # logging must never take the run down
            self.handleError(record)


CONSOLE = Console()
_package_logger = logging.getLogger("vlretrieval")
if not any(isinstance(handler, Console) for handler in _package_logger.handlers):
    _package_logger.addHandler(CONSOLE)
_package_logger.setLevel(logging.INFO)
_package_logger.propagate = False


def set_process(index: int, count: int) -> None:
    """After joining a multi-host run: which process this is, so that only process 0 prints info."""
    CONSOLE.process_index, CONSOLE.process_count = index, count
