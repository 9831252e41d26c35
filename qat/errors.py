"""One exception type for mistakes a user can fix, reported as a single line by the entry points.

Under torchrun, one line needs more than printing it. torchrun treats any worker that exits
non-zero as a failure: it SIGTERMs the other workers (rank 0 may die before it prints), then
raises `ChildFailedError` from its `main()`, and Python prints that exception's traceback plus a
failure table after our line. No exit code avoids this (torch/distributed/launcher/api.py raises
for every failed worker group; `@record` in the launcher re-raises it), and an error file
(TORCHELASTIC_ERROR_FILE) only adds our message to that table. So for a *user* error, and only
for one, the workers end their launcher themselves (`_end_launcher`): rank 0 prints the line and
SIGKILLs its torchrun (the only signal torchrun cannot turn into a traceback: it handles TERM,
INT, HUP and QUIT); the other ranks wait for that instead of exiting first, and a rank whose
error rank 0 did not share prints it and ends its own launcher. The launcher's exit status is
then 128+9 (a signal), the workers die by the parent-death signal (qat/lifeline.py), and nothing
is lost: a user error is raised before anything is written. A bug (any other exception) keeps torchrun's full report.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import gc
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
    """Turn a UserError into one line on stderr and exit status 2 (under torchrun: see above)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            if LAUNCHER_PID is None:
                if is_rank0():
                    print(f"error: {e}", file=sys.stderr, flush=True)
            else:
                _end_launcher(f"error: {e}")
            sys.exit(2)

    return wrapper


# At interpreter exit, keep the cyclic garbage collector off the objects alive by then. Python's
# shutdown runs full collections over every object that torch, transformers and datasets created:
# 1.1-1.4 s per process on a 2-core CPU machine, 0.3 s with this, paid by every rank of every
# launch of every entry point (they all import this module). Nothing is lost: the process is
# ending, the OS reclaims its memory, and atexit handlers registered after this one (wandb,
# temporary folders) run before it. Not a freeze now: the tests call main() in-process, where it
# would keep cyclic garbage alive for the rest of the session.
atexit.register(gc.freeze)

# Set by qat.lifeline.exit_with_launcher: the torchrun agent that started this worker.
LAUNCHER_PID: int | None = None


def _end_launcher(line: str, grace_s: float = 5.0, per_local_rank_s: float = 0.5, wait_s: float = 30.0) -> None:
    """In a torchrun worker: print `line` once and stop torchrun without its ChildFailedError
    traceback (see above).

    Rank 0 prints and kills its launcher at once. Any other rank first gives rank 0 `grace_s`
    to do that (node-mates then die by the parent-death signal and print nothing): the usual
    case, since every rank validates the same input. A rank still alive after the grace raised an
    error rank 0 did not (a file missing on one node, or rank 0 still busy loading weights), so
    it prints the line itself and kills its own launcher. Local ranks wait a little longer each,
    so that on a node where every rank raised, one prints and the others die first.
    """
    launcher = LAUNCHER_PID
    if os.getppid() != launcher:  # the launcher is gone already
        return
    if not is_rank0():
        if _outlived(launcher, grace_s + per_local_rank_s * int(os.environ.get("LOCAL_RANK", "0"))):
            return
        line = f"{line} (rank {os.environ.get('RANK')})"
    print(line, file=sys.stderr, flush=True)
    os.kill(launcher, signal.SIGKILL)
    _outlived(launcher, wait_s)


def _outlived(launcher: int, seconds: float) -> bool:
    """Wait up to `seconds` for the launcher to die; True if it did (this process was re-parented)."""
    deadline = time.monotonic() + seconds
    while os.getppid() == launcher and time.monotonic() < deadline:
        time.sleep(0.05)
    return os.getppid() != launcher
