"""The one exception type for bad user input.

Anything raised as `UserError` reaches the user as one line (`error: ...`) and a non-zero exit
from the CLI, without a traceback: the message must name the bad input and what to do about it.
"""


class UserError(Exception):
    """Bad input from the user: a config typo, a missing file, a corrupt dataset."""


def first_line(error: BaseException, default: str | None = None) -> str:
    """The first line of an exception's message (libraries' messages run to pages), or `default`
    (the exception's type name if not given) when it has none: what a one-line error quotes."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else (default or type(error).__name__)
