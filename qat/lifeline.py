"""Workers that die with their launcher.

torchrun starts every worker with `start_new_session=True`, so a worker shares neither the
launcher's process group nor its session. When torchrun itself is killed with SIGKILL (the OOM
killer, a lost node agent), nothing signals the workers: they keep training, and a relaunch then
trains a second copy into the same folder.

`exit_with_launcher()` is the first call of every entry point that runs under torchrun
(recipes/train.py, recipes/convert.py). It ties the worker to its parent, the launcher, twice:

- Linux: `prctl(PR_SET_PDEATHSIG, SIGKILL)`. The kernel kills the worker the instant its parent
  exits, however stuck the worker is (a C call holding the GIL, a collective waiting on a peer).
  The signal follows the *thread* that forked the worker; torchrun's agent forks from its main
  thread, which lives exactly as long as torchrun.
- Everywhere (and as the fallback where prctl is unavailable): a daemon thread polls
  `os.getppid()`. An orphan is re-parented to init or a subreaper, so a changed parent pid means
  the launcher is gone; the thread prints one line and calls `os._exit`.

Both exits run no Python cleanup, on purpose. Nothing a worker writes can be left half-done by
that: a checkpoint is written into `.tmp-step-N/` and renamed to `step-N/` only after every rank
finished it (qat/checkpoint.py), so a kill at any instant leaves the previous complete checkpoints
and at most an ignored `.tmp-` folder; the run lock (qat/runlock.py) is an flock, which the
kernel releases with the process.

Only torchrun workers are armed (torchrun sets TORCHELASTIC_RUN_ID): a plain `python` run under
`nohup` must survive the shell that started it.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ


def exit_with_launcher(poll_s: float = 1.0, parent_death_signal: bool = True) -> bool:
    """Arm both mechanisms in a torchrun worker; returns whether anything was armed.

    Call it before the slow imports (torch takes seconds): a launcher that dies before this call
    is noticed only if it died between reading the parent pid and arming the signal.
    `parent_death_signal=False` leaves only the watchdog (what non-Linux hosts get).
    """
    if not under_torchrun():
        return False
    parent = os.getppid()
    if parent_death_signal:
        set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != parent:  # died between getppid and prctl: the signal will never come
        _exit_orphaned(parent)
    threading.Thread(target=_watch, args=(parent, poll_s), name="qat-lifeline", daemon=True).start()
    return True


def set_parent_death_signal(sig: int) -> bool:
    """prctl(PR_SET_PDEATHSIG, sig) on Linux; False where the call is unavailable or refused."""
    prctl = _libc_prctl()
    return prctl is not None and prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0


def _libc_prctl():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def _watch(parent: int, poll_s: float) -> None:
    while os.getppid() == parent:
        threading.Event().wait(poll_s)
    _exit_orphaned(parent)


def _exit_orphaned(parent: int) -> None:
    rank = os.environ.get("RANK", "?")
    print(f"rank {rank}: the launcher (pid {parent}) is gone; exiting so that a relaunch does not "
          f"race this worker", file=sys.stderr, flush=True)
    os._exit(1)


def stops_with_me():
    """A `preexec_fn` for a launcher we start ourselves (compare starts torchrun), or None off
    Linux: the child gets SIGTERM when we die, and torchrun passes it on to its workers, which
    checkpoint and exit. prctl is looked up here, in the parent: between fork and exec the child
    only makes the system call (no dlopen, which could deadlock if another thread held its lock)."""
    prctl = _libc_prctl()
    if prctl is None:
        return None
    return lambda: prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
