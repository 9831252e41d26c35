"""One exception type for mistakes a user can fix, reported as a single line by the entry points."""

from __future__ import annotations

import functools
import os
import sys


class UserError(Exception):
    """Bad input: a config key, a file, a scheme. The message names the culprit and the fix."""


def is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def exit_on_user_error(fn):
    """Turn a UserError into one line on stderr (rank 0 only) and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            if is_rank0():
                print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(2)

    return wrapper
