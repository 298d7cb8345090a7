"""Command-line arguments that fail like every other bad input: one `error:` line, exit 2.

argparse's own failure is a usage block and a prefixed message; `OneLineParser` says the same in
one line (with where to look). The CLI and the benchmark scripts use it, and `run` gives a
script's `main` the CLI's handling of `UserError`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from vlretrieval.errors import UserError


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):
        sys.stderr.write(f"error: {self.prog}: {message} (see {self.prog} --help)\n")
        sys.exit(2)


def positive_int(text: str) -> int:
    """An argparse type: an integer, 1 or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be 1 or more")
    return value


def run(main: Callable[[], None]) -> None:
    """Runs a script's `main`, a `UserError` ending it with its one line and exit 2."""
    try:
        main()
    except UserError as error:
        sys.stderr.write(f"error: {error}\n")
        sys.exit(2)
