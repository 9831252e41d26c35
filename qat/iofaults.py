"""A write that the filesystem refuses is the user's to fix, not a bug: one line, not a traceback.

A full disk, an exceeded quota, a read-only or vanished mount: every write the suite makes
(checkpoints, metrics, the data cache, convert's folders, reports) goes through `writing(...)`,
which turns such an OSError into a UserError naming the path, the errno and what to do. Other
OSErrors (a bug of ours, a path we built wrong) keep their traceback.

Every such write is atomic (qat/atomic.py, qat/checkpoint.py), so a refused write leaves what was
there before: the newest complete checkpoint stays the one `checkpoint.resume=auto` takes.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path
from typing import Optional

from qat.errors import UserError

# errno -> what the user can do about it
FIXES = {
    errno.ENOSPC: "free space on that filesystem (or point the output elsewhere), then rerun",
    errno.EDQUOT: "free space within your quota (or point the output elsewhere), then rerun",
    errno.EROFS: "the filesystem is mounted read-only: write to another folder",
    errno.EACCES: "you may not write there: fix its permissions or write to another folder",
    errno.EPERM: "you may not write there: fix its permissions or write to another folder",
    errno.ENOENT: "the folder vanished while it was written (an unmounted or removed filesystem?): "
                  "check the mount, then rerun",
    errno.ESTALE: "the network filesystem went away (stale file handle): check the mount, then rerun",
    errno.ENOTCONN: "the network filesystem is disconnected: check the mount, then rerun",
    errno.EIO: "the storage reported an I/O error: check the disk or mount, then rerun",
    errno.EFBIG: "the file is larger than the filesystem allows: write to another filesystem",
}


def as_user_error(e: BaseException, path, what: str, resume_hint: str = "") -> Optional[UserError]:
    """The UserError for an OSError the filesystem raised (found also inside a wrapping exception,
    e.g. DCP's CheckpointException), or None when `e` is something else."""
    err = find_oserror(e)
    code = err.errno if err is not None else diagnose(Path(path))
    if code not in FIXES:
        return None
    where = (err.filename if err is not None else None) or path
    name = errno.errorcode.get(code, str(code))
    hint = f"; {resume_hint}" if resume_hint else ""
    return UserError(f"cannot write {what} {where}: {os.strerror(code)} ({name}); {FIXES[code]}{hint}")


def diagnose(path: Path) -> Optional[int]:
    """The errno a failed write most likely met, from the filesystem itself, for writers that lose
    it (torch.save's zip writer reports a full disk as `RuntimeError: ... unexpected pos`): EROFS
    for a read-only mount, ENOSPC when the space left is under 1% of the filesystem (at least
    64 KiB, at most 256 MiB), else None (then it was something else, and keeps its traceback)."""
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        st = os.statvfs(probe)
    except OSError:
        return None
    if st.f_flag & os.ST_RDONLY:
        return errno.EROFS
    free, size = st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
    return errno.ENOSPC if free < min(max(size // 100, 64 << 10), 256 << 20) else None


def find_oserror(e: Optional[BaseException], depth: int = 0) -> Optional[OSError]:
    """An OSError with an errno in `e`, its cause or context, or DCP's per-rank failures."""
    if e is None or depth > 5:
        return None
    if isinstance(e, OSError) and e.errno is not None:
        return e
    failures = getattr(e, "failures", None)  # torch.distributed.checkpoint's CheckpointException
    if isinstance(failures, dict):
        for _, failure in sorted(failures.items(), key=lambda kv: kv[0]):
            exc = failure[0] if isinstance(failure, tuple) else failure
            found = find_oserror(exc, depth + 1)
            if found is not None:
                return found
    return find_oserror(e.__cause__, depth + 1) or find_oserror(e.__context__, depth + 1)


@contextlib.contextmanager
def writing(path, what: str, resume_hint: str = ""):
    """Around a write: the filesystem's refusal becomes one UserError line (see the module doc)."""
    try:
        yield
    except UserError:
        raise
    except BaseException as e:  # CheckpointException is a BaseException
        err = as_user_error(e, Path(path), what, resume_hint)
        if err is None:
            raise
        raise err from None
