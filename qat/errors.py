"""One exception type for mistakes a user can fix, reported as a single line by the entry points.

`exit_on_user_error` turns a `UserError` into one `error: ...` line on stderr and exit status 2.
Without torchrun, rank 0 prints it. Under torchrun a worker prints nothing: it hands the message
to its launcher through torchrun's error file, and the launcher prints the one line and exits 2
instead of torchrun's `ChildFailedError` traceback (qat/torchrun_errors.py, loaded into every
torchrun launcher by our `torchrun.handlers` entry point). A user error is raised before anything
is written, so nothing is lost. A bug (any other exception) keeps torchrun's full report, its
traceback in the worker's error file so that torchrun names it, not a peer that lost it, the root
cause.

A lost peer (`PeerLost`: another rank's process or node is gone) takes the same way out with exit
status `LOST_EXIT` (75, EX_TEMPFAIL of sysexits.h: a temporary failure, rerunning can succeed),
kept apart from 2 (bad input, to be fixed before a rerun) and 1 (a bug, or torchrun's own report).
Its message names the lost rank and says how to resume (qat/peers.py, recipes/train.py).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import gc
import os
import sys

from qat import torchrun_errors


class UserError(Exception):
    """Bad input: a config key, a file, a scheme. The message names the culprit and the fix."""


class PeerLost(Exception):
    """Another rank is gone mid-run. The message names it and the resume; nothing is damaged:
    checkpoints are complete or ignored (qat/checkpoint.py)."""


USER_EXIT = 2
LOST_EXIT = 75  # sysexits.h EX_TEMPFAIL


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
    """Turn a UserError into one line on stderr and exit status 2, a PeerLost into one line and
    exit status 75 (under torchrun: see above)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            if torchrun_errors.launcher_reports():
                torchrun_errors.hand_to_launcher(str(e))
            elif is_rank0():
                print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(USER_EXIT)
        except PeerLost as e:
            exit_peer_lost(str(e))
        except Exception as e:
            torchrun_errors.record_bug(e)
            raise

    return wrapper


def exit_peer_lost(message: str) -> None:
    """Hand the message to the launcher (or print it: every survivor does, since rank 0 may be
    the one lost), then exit at once: no Python teardown, whose collectives (a process group's
    destruction on NCCL) could wait for the lost peer."""
    if torchrun_errors.launcher_reports():
        torchrun_errors.hand_to_launcher(message, kind=torchrun_errors.LOST)
        if torchrun_errors.restarts_left() and os.environ.get("LOCAL_RANK", "0") == "0":
            # torchrun restarts the workers and prints nothing: say why, once per node
            print(f"rank {os.environ.get('RANK', '?')}: {message}", file=sys.stderr, flush=True)
    else:
        print(f"error: {message}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(LOST_EXIT)


# At interpreter exit, keep the cyclic garbage collector off the objects alive by then. Python's
# shutdown runs full collections over every object that torch, transformers and datasets created:
# 1.1-1.4 s per process on a 2-core CPU machine, 0.3 s with this, paid by every rank of every
# launch of every entry point (they all import this module). Nothing is lost: the process is
# ending, the OS reclaims its memory, and atexit handlers registered after this one (wandb,
# temporary folders) run before it. Not a freeze now: the tests call main() in-process, where it
# would keep cyclic garbage alive for the rest of the session.
atexit.register(gc.freeze)
