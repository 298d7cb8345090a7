"""The one exception type for bad user input.

Anything raised as `UserError` reaches the user as one line (`error: ...`) and a non-zero exit
from the CLI, without a traceback: the message must name the bad input and what to do about it.
"""


class UserError(Exception):
    """Bad input from the user: a config typo, a missing file, a corrupt dataset."""
