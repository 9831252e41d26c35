"""One exception type for mistakes a user can fix, reported as a single line by the entry points.

Under torchrun, one line needs more than printing it. torchrun treats any worker that exits
non-zero as a failure: it SIGTERMs the other workers (rank 0 may die before it prints), then
raises `ChildFailedError` from its `main()`, and Python prints that exception's traceback plus a
failure table after our line. No exit code avoids this (torch/distributed/launcher/api.py raises
for every failed worker group; `@record` in the launcher re-raises it), and an error file
(TORCHELASTIC_ERROR_FILE) only adds our message to that table. So for a *user* error, and only
for one, the workers end their launcher themselves (`_end_launcher`): rank 0 prints the line, the
first worker of each node SIGKILLs its torchrun (the only signal torchrun cannot turn into a
traceback: it handles TERM, INT, HUP and QUIT), and every worker waits for that instead of
exiting first. The launcher's exit status is then 128+9 (a signal), the workers die by the
parent-death signal (qat/lifeline.py), and nothing is lost: a user error is raised before
anything is written. A bug (any other exception) keeps torchrun's full report.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
import time


class UserError(Exception):
    """Bad input: a config key, a file, a scheme. The message names the culprit and the fix."""


@contextlib.contextmanager
def boundary(what: str, fix: str, errors: tuple = (Exception,)):
    """A library call on the user's files (a tokenizer folder, lm-eval on a model folder): its
    failure means bad input, so it becomes one UserError line: what failed, the library's first
    line, and the fix. Our own UserErrors pass through unchanged."""
    try:
        yield
    except UserError:
        raise
    except errors as e:
        why = f"{type(e).__name__}: {_first_line(e)}"
        if e.__cause__ is not None:  # datasets wraps the parse error in a generic one
            why += f": {type(e.__cause__).__name__}: {_first_line(e.__cause__)}"
        raise UserError(f"{what} ({why}); {fix}") from None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:300]


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
            _end_launcher()
            sys.exit(2)

    return wrapper


# Set by qat.lifeline.exit_with_launcher: the torchrun agent that started this worker.
LAUNCHER_PID: int | None = None


def _end_launcher(wait_s: float = 30.0) -> None:
    """In a torchrun worker: stop torchrun without its ChildFailedError traceback (see above).

    The first worker of a node kills the node's launcher; the others wait for it, since a worker
    that exits first is what makes torchrun report the failure. A worker whose node-mate never
    gets there (an error raised on some ranks only) exits after `wait_s`, and torchrun reports.
    """
    launcher = LAUNCHER_PID
    if launcher is None or os.getppid() != launcher:
        return
    sys.stderr.flush()
    if os.environ.get("LOCAL_RANK", "0") == "0":
        os.kill(launcher, signal.SIGKILL)
    deadline = time.monotonic() + wait_s
    while os.getppid() == launcher and time.monotonic() < deadline:
        time.sleep(0.05)
