"""The error for bad input, and how a command reports it."""

from __future__ import annotations

import sys


class UserError(Exception):
    """Bad input that the user can fix: printed as one line, exit status 2, no traceback."""


def fail(message: str, status: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(status)
