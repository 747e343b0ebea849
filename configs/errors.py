"""The one exception type that entry points turn into a clean message and a non-zero exit.

Raise `UserError` (or a subclass) for anything the user can fix: a missing dataset directory, an
unknown name, a wrong image shape, a robot that stopped answering. The message must name the problem
and the fix. Bugs stay ordinary exceptions with tracebacks.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

EXIT_USER_ERROR = 2


class UserError(Exception):
    """An error caused by input or environment that the user can fix."""


def first_line(err: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (at most `limit` characters), or its type's name if empty:
    the detail a UserError quotes from the library error underneath it."""
    lines = str(err).strip().splitlines()
    return lines[0][:limit] if lines else type(err).__name__


@contextlib.contextmanager
def exit_on_user_error() -> Iterator[None]:
    """Turn a `UserError` into its message on stderr and exit status 2 (no traceback)."""
    try:
        yield
    except UserError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_USER_ERROR) from None
