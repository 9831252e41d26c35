"""Faults of real clusters, end to end: an output filesystem that fills up during a checkpoint."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow  # an end-to-end pipeline: `make test-slow` (CI runs it)

CKPT = ["training.steps=6", "checkpoint.every_n_steps=2", "checkpoint.keep_last=3"]


@pytest.fixture(scope="module")
def straight_losses(world, tmp_path_factory, run_train, base_overrides, losses):
    out = tmp_path_factory.mktemp("straight")
    run_train(base_overrides(world, out) + CKPT, 2)
    return losses(out)


def test_disk_full_during_a_checkpoint_is_one_line_and_the_previous_one_resumes_bitwise(
        world, small_fs, run_train, base_overrides, losses, straight_losses):
    # A tiny run's checkpoint (fp32 weights + AdamW state) takes about 6.4 MB: 10 MB holds the
    # step-2 checkpoint and fills up while step 4's is written.
    fs = small_fs.mount("10m")
    out = fs / "run"
    proc = run_train(base_overrides(world, out) + CKPT, 2, check=False)
    lines = (proc.stdout + proc.stderr).splitlines()
    errors = [l for l in lines if l.startswith("error:")]
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(errors) == 1 and "No space left on device (ENOSPC)" in errors[0], errors
    assert errors[0].startswith(f"error: cannot write the checkpoint {out}/checkpoints/.tmp-step-000004"), errors
    assert errors[0].endswith("checkpoint.resume=auto continues from the newest"), errors
    # nothing half-written is left, the complete checkpoint is intact
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002"]
    small_fs.remount(fs, "size=64m")  # space freed: the same command with resume=auto finishes the run
    run_train(base_overrides(world, out) + CKPT + ["checkpoint.resume=auto"], 2)
    assert losses(out) == straight_losses
