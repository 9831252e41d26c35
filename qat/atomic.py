"""Atomic outputs: a folder or file appears complete under its final name, or not at all."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from qat.errors import UserError
from qat.iofaults import writing


@contextlib.contextmanager
def atomic_dir(out: Path, what: str = "the output"):
    """Yield a temporary sibling folder; on success it replaces `out` (a rename), on error it goes.

    The previous `out`, if any, stays untouched until the new one is complete. A write the
    filesystem refuses, in here or in the caller's block, is one UserError naming `what`.
    """
    out = Path(out)
    check_target(out, folder=True)
    with writing(out, what):
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        with writing(out, what):
            yield tmp
        if out.exists():
            old = out.with_name(f".old-{out.name}-{os.getpid()}")
            os.replace(out, old)
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(old, out)  # the previous output stays what it was
                raise
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # the partial output goes: its space is needed back
        raise


def check_target(path: Path, folder: bool, what: str = "") -> None:
    """Refuse, before any work, an output path that cannot be written: a file where a folder goes
    (or the reverse), an ancestor that is a file, or a read-only parent. `what` names the option."""
    path, name = Path(path), what or str(path)
    if path.exists() and path.is_dir() != folder:
        raise UserError(f"{name}: {path} is {'a file' if folder else 'a folder'}; choose another path")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{name}: {parent} is a file, so {path} cannot be created; choose another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{name}: {parent} is not writable; choose another path")


def write_text_atomic(path: Path, text: str) -> None:
    """Write a sibling temp file, fsync it, rename it over `path`: readers see old or new, never half."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with writing(path, "the file"):
            with open(tmp, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):  # on a read-only mount there is nothing to remove
            tmp.unlink(missing_ok=True)
        raise
