"""A write the filesystem refuses is one line naming the path and the errno, and what was written
before stays as it was. Real filesystems: a tmpfs that fills up, one remounted read-only."""

from __future__ import annotations

import pytest

from qat.atomic import atomic_dir, write_text_atomic
from qat.errors import UserError


def test_full_disk_keeps_the_previous_file_and_folder(small_fs):
    fs = small_fs.mount("64k")
    write_text_atomic(fs / "report.json", "old")
    with pytest.raises(UserError) as e:
        write_text_atomic(fs / "report.json", "x" * 200_000)
    assert str(e.value) == (f"cannot write the file {fs}/report.json: No space left on device (ENOSPC); "
                            f"free space on that filesystem (or point the output elsewhere), then rerun")
    assert (fs / "report.json").read_text() == "old" and sorted(p.name for p in fs.iterdir()) == ["report.json"]
    with atomic_dir(fs / "export") as tmp:
        (tmp / "a").write_text("first")
    with pytest.raises(UserError, match=rf"^cannot write the export {fs}/export: No space left on device \(ENOSPC\)"):
        with atomic_dir(fs / "export", "the export") as tmp:
            (tmp / "big").write_bytes(b"x" * 200_000)
    # the partial folder is gone (its space is needed back), the complete one untouched
    assert sorted(p.name for p in fs.iterdir()) == ["export", "report.json"]
    assert (fs / "export" / "a").read_text() == "first"


def test_read_only_mount_is_one_line(small_fs):
    fs = small_fs.mount("64k")
    write_text_atomic(fs / "config.yaml", "a: 1\n")
    small_fs.remount(fs, "ro")
    with pytest.raises(UserError) as e:
        write_text_atomic(fs / "config.yaml", "a: 2\n")
    assert str(e.value).endswith("Read-only file system (EROFS); the filesystem is mounted read-only: write to "
                                 "another folder")
    assert (fs / "config.yaml").read_text() == "a: 1\n"


def test_other_os_errors_keep_their_traceback(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError):  # a path we built wrong is a bug, not a full disk
        write_text_atomic(tmp_path / "file" / "x.json", "{}")


def test_a_writer_that_loses_the_errno_is_diagnosed_from_the_filesystem(small_fs):
    """torch.save reports a full disk as a RuntimeError of its zip writer; the filesystem says why."""
    import torch

    from qat.iofaults import writing

    fs = small_fs.mount("256k")
    with pytest.raises(UserError, match=rf"^cannot write the checkpoint {fs}/w.pt: No space left on device \(ENOSPC\)"):
        with writing(fs / "w.pt", "the checkpoint"):
            torch.save(torch.zeros(200_000), fs / "w.pt")
    roomy = small_fs.mount("256k", "roomy")
    with pytest.raises(RuntimeError, match="not a write"):  # with space left, a RuntimeError is not a disk fault
        with writing(roomy / "x.pt", "the checkpoint"):
            raise RuntimeError("not a write")
