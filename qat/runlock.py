"""One writer per run folder: a lock that rank 0 of a training run holds for the run's whole life.

Without it, two jobs on one output_dir interleave their checkpoints and metrics, and one prunes the
other's newest checkpoint. `<output_dir>/run.lock` holds a JSON record of its holder: host, pid
(and the process start time, against pid reuse), Slurm job id, array job and task ids, restart
count, start time and command. The file stays after the run, marked released; it is never deleted,
because deleting a file that others may be about to flock lets two of them lock two different files.

When is a lock stale (taken over without a word)?

1. Where the filesystem supports `flock` (local filesystems, NFSv4, Lustre mounted with `flock`,
   GPFS): the lock *is* the flock on run.lock. The kernel, or the NFS lock manager, releases it
   when its holder exits in any way, SIGKILL and the OOM killer included. So a lock is stale
   exactly when nobody holds the flock, whatever the record says. (Lustre's `localflock` mount
   option makes flocks node-local: there only runs on one node are kept apart.)
2. Where `flock` is unsupported: the record alone decides. It is stale when it says released, or
   when its host is this host and its pid is not running (or is another process by now). A live
   holder on another host cannot be told from a dead one: the run is refused, and the message says
   to delete run.lock once that job is surely gone. Two jobs that start within the same instant can
   both win in this mode; it is a fallback.
3. A requeued Slurm job takes over its own lock: a record with the same SLURM_JOB_ID and a lower
   SLURM_RESTART_COUNT is an earlier incarnation of this job, which Slurm ended before requeueing.
   If its flock still looks held (an NFS client that died keeps its lease for about 90 s), we wait
   up to `requeue_wait_s` for it, then go on without the flock. Two job steps of one incarnation
   (same job id, same restart count) are two writers and are refused.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Optional

from qat.atomic import write_text_atomic
from qat.errors import UserError

LOCK_NAME = "run.lock"
NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)
SLURM_KEYS = {"job": "SLURM_JOB_ID", "array_job": "SLURM_ARRAY_JOB_ID", "array_task": "SLURM_ARRAY_TASK_ID",
              "restart": "SLURM_RESTART_COUNT"}


def process_start(pid: int) -> Optional[int]:
    """The start time of pid in clock ticks since boot (Linux), to tell a pid from its reuse."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def my_record() -> dict:
    slurm = {k: os.environ[v] for k, v in SLURM_KEYS.items() if v in os.environ}
    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": process_start(os.getpid()),
            "slurm": slurm, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": " ".join(sys.argv)[:500], "released": False}


def describe(rec: dict) -> str:
    """The holder in words, for the one error line."""
    if not rec:
        return "an unknown holder (unreadable record)"
    s = rec.get("slurm") or {}
    job = ""
    if s.get("job"):
        array = f", array {s['array_job']}_{s['array_task']}" if s.get("array_task") else ""
        job = f", Slurm job {s['job']}{array}, restart {s.get('restart', '0')}"
    return f"pid {rec.get('pid')} on {rec.get('host')}{job}, since {rec.get('started')}"


def earlier_incarnation(rec: dict, me: dict) -> bool:
    """The record was written by this Slurm job before a requeue (rule 3)."""
    theirs, mine = rec.get("slurm") or {}, me["slurm"]
    return (bool(mine.get("job")) and theirs.get("job") == mine["job"]
            and int(theirs.get("restart", 0)) < int(mine.get("restart", 0)))


def holder_is_dead(rec: dict) -> bool:
    """Rule 2: only a holder on this host can be checked."""
    if rec.get("released"):
        return True
    if rec.get("host") != socket.gethostname() or not isinstance(rec.get("pid"), int):
        return False
    try:
        os.kill(rec["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, owned by someone else
        return False
    return rec.get("pid_start") is not None and process_start(rec["pid"]) != rec["pid_start"]


class RunLock:
    """The held lock. `release()` (or leaving the `with` block) marks the record released."""

    def __init__(self, path: Path, fd: Optional[int], record: dict):
        self.path, self.fd, self.record = path, fd, record

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()

    def release(self) -> None:
        if self.record is None:
            return
        self._write({**self.record, "released": True, "ended": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        if self.fd is not None:
            os.close(self.fd)  # drops the flock
        self.record, self.fd = None, None

    def _write(self, record: dict) -> None:
        text = json.dumps(record, indent=1) + "\n"
        if self.fd is None:
            write_text_atomic(self.path, text)
            return
        # in place: the flock belongs to this inode, so the file must never be replaced
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, text.encode(), 0)
        os.fsync(self.fd)


def read_record(path: Path) -> dict:
    try:
        rec = json.loads(Path(path).read_text())
        return rec if isinstance(rec, dict) else {}
    except (OSError, ValueError):
        return {}


def acquire(run_dir: Path, requeue_wait_s: float = 120.0, use_flock: bool = True) -> RunLock:
    """Take the run lock of run_dir or raise UserError naming its holder (see the module rules)."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"output_dir {run_dir} is a file, not a folder; choose another output_dir")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create output_dir {run_dir}: {e.strerror}") from None
    path = run_dir / LOCK_NAME
    me = my_record()
    fd = _flock(path, me, requeue_wait_s) if use_flock else None
    if fd is None:  # rule 2
        rec = read_record(path) if path.exists() else {"released": True}
        if not (holder_is_dead(rec) or earlier_incarnation(rec, me)):
            raise UserError(f"{run_dir} is in use by another run: {describe(rec)} (lock {path}); wait for it to "
                            f"end or choose another output_dir. This filesystem has no flock, so a holder on "
                            f"another host cannot be checked: if that job is gone, delete {path}")
    lock = RunLock(path, fd, me)
    lock._write(me)
    return lock


def _flock(path: Path, me: dict, requeue_wait_s: float) -> Optional[int]:
    """A file descriptor of path that holds its flock, or None where flock is unsupported (rule 2)."""
    import fcntl

    deadline = None
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"cannot open the run lock {path}: {e.strerror}; output_dir must be writable") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            rec = read_record(path)
            if not earlier_incarnation(rec, me):
                os.close(fd)
                raise UserError(f"{path.parent} is in use by another run: {describe(rec)} (lock {path}); wait "
                                f"for it to end, or choose another output_dir") from None
            deadline = deadline or time.monotonic() + requeue_wait_s
            if time.monotonic() >= deadline:
                return _take_over(fd, path, rec)
            os.close(fd)
            time.sleep(min(1.0, requeue_wait_s))
            continue
        except OSError as e:
            os.close(fd)
            if e.errno in NO_FLOCK:
                return None
            raise
        if _same_file(fd, path):
            return fd
        os.close(fd)  # the file was replaced between open and flock: lock the new one


def _take_over(fd: int, path: Path, rec: dict) -> int:
    """Rule 3 after the wait: go on, and let a thread take the flock the moment it is freed."""
    import fcntl
    import threading

    print(f"warning: {path} is still locked by an earlier run of this Slurm job ({describe(rec)}); taking it over",
          file=sys.stderr, flush=True)
    threading.Thread(target=fcntl.flock, args=(fd, fcntl.LOCK_EX), name="qat-runlock", daemon=True).start()
    return fd


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    fst = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino)
