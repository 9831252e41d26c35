"""One writer per run folder (qat/runlock.py): a second run is refused, a dead holder's lock is taken."""

from pathlib import Path
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest


from qat import runlock
from qat.errors import UserError

ROOT = Path(__file__).resolve().parents[2]

# A holder in a process of its own: takes the lock, says so, then waits to be killed.
HOLDER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    from qat import runlock
    lock = runlock.acquire({run_dir!r}, use_flock={flock})
    print("held", flush=True)
    time.sleep(600)
""")


def start_holder(run_dir, flock=True, **env_extra):
    p = subprocess.Popen([sys.executable, "-c", HOLDER.format(root=str(ROOT), run_dir=str(run_dir), flock=flock)],
                         stdout=subprocess.PIPE, text=True, env={**os.environ, **env_extra})
    assert p.stdout.readline().strip() == "held"
    return p


def kill(p):
    p.send_signal(signal.SIGKILL)
    p.wait()


@pytest.mark.parametrize("flock", [True, False], ids=["flock", "pid-check"])
def test_second_holder_refused_then_dead_holders_lock_taken_over(tmp_path, flock):
    holder = start_holder(tmp_path, flock=flock, SLURM_JOB_ID="4242", SLURM_ARRAY_JOB_ID="4240",
                          SLURM_ARRAY_TASK_ID="2")
    try:
        rec = json.loads((tmp_path / "run.lock").read_text())
        assert (rec["pid"], rec["host"], rec["released"]) == (holder.pid, socket.gethostname(), False)
        assert rec["slurm"] == {"job": "4242", "array_job": "4240", "array_task": "2"}
        with pytest.raises(UserError) as e:
            runlock.acquire(tmp_path, use_flock=flock)
        assert f"in use by another run: pid {holder.pid} on {socket.gethostname()}, Slurm job 4242, " \
               f"array 4240_2, restart 0" in str(e.value)
    finally:
        kill(holder)
    # SIGKILL runs no cleanup: the record still says held, yet the holder is dead, so the lock is stale
    assert json.loads((tmp_path / "run.lock").read_text())["released"] is False
    with runlock.acquire(tmp_path, use_flock=flock):
        assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()
    assert json.loads((tmp_path / "run.lock").read_text())["released"] is True
    runlock.acquire(tmp_path, use_flock=flock).release()  # a released lock is free


def test_without_flock_a_holder_on_another_host_is_refused_with_the_way_out(tmp_path):
    (tmp_path / "run.lock").write_text(json.dumps({"host": "node-7", "pid": 1, "released": False,
                                                   "started": "2026-11-23T10:00:00Z", "slurm": {}}))
    with pytest.raises(UserError, match=r"pid 1 on node-7, since 2026-11-23T10:00:00Z .*delete .*run\.lock"):
        runlock.acquire(tmp_path, use_flock=False)


def test_requeued_slurm_job_takes_over_its_own_lock(tmp_path, capfd, monkeypatch):
    """Same SLURM_JOB_ID, higher restart count: the earlier incarnation's lock is taken over, even
    while its flock still looks held (a dead node's NFS lease), after requeue_wait_s."""
    holder = start_holder(tmp_path, SLURM_JOB_ID="77", SLURM_RESTART_COUNT="0")
    try:
        monkeypatch.setenv("SLURM_JOB_ID", "77")
        monkeypatch.setenv("SLURM_RESTART_COUNT", "0")  # a second step of the same incarnation: two writers
        with pytest.raises(UserError, match="in use by another run"):
            runlock.acquire(tmp_path, requeue_wait_s=0.2)
        monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
        t0 = time.monotonic()
        lock = runlock.acquire(tmp_path, requeue_wait_s=0.5)
        assert time.monotonic() - t0 >= 0.5
        assert "still locked by an earlier run of this Slurm job" in capfd.readouterr().err
        assert json.loads((tmp_path / "run.lock").read_text())["slurm"] == {"job": "77", "restart": "1"}
        lock.release()
    finally:
        kill(holder)


def test_output_dir_that_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match="is a file, not a folder"):
        runlock.acquire(tmp_path / "f")


def test_second_training_launch_on_one_output_dir_is_refused(world, tmp_path, base_overrides, env, losses, train_cmd):
    """A running training run, then a 2-rank torchrun launch on its folder: every rank of the second
    exits non-zero, with one error line naming the holder, and the first finishes untouched."""
    first = subprocess.Popen(train_cmd(base_overrides(world, tmp_path) + ["training.steps=100000"], nproc=1),
                             cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        metrics = tmp_path / "metrics.jsonl"
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not (metrics.exists() and metrics.read_text()):
            assert first.poll() is None, first.communicate()[1][-3000:]
            time.sleep(0.2)
        holder = json.loads((tmp_path / "run.lock").read_text())["pid"]
        second = subprocess.run(train_cmd(base_overrides(world, tmp_path) + ["checkpoint.resume=auto"], nproc=2),
                                cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
        errors = [l for l in second.stderr.splitlines() if l.startswith("error:")]
        assert second.returncode != 0
        assert len(errors) == 1 and f"in use by another run: pid {holder} on " in errors[0], second.stderr[-3000:]
        assert "Traceback" not in second.stdout + second.stderr  # torchrun ended quietly (qat/errors.py)
        (tmp_path / "STOP").touch()  # the first run checkpoints and exits normally
        out, err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, err[-3000:]
    steps = [json.loads(l)["step"] for l in metrics.read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1)) and len(losses(tmp_path)) == len(steps)
    assert json.loads((tmp_path / "run.lock").read_text())["released"] is True


def test_lock_holder_cleans_what_a_killed_save_left(tmp_path):
    from qat.checkpoint import clean_partial, list_checkpoints

    def ckpt_dir(name, complete=True):
        (tmp_path / name).mkdir()
        if complete:
            (tmp_path / name / "meta.json").write_text("{}")
            (tmp_path / name / ".metadata").write_text("")

    ckpt_dir("step-000004")
    ckpt_dir(".tmp-step-000006", complete=False)  # killed while writing shards
    ckpt_dir(".old-step-000004")  # killed after the re-save landed: step-000004 exists
    ckpt_dir(".old-step-000008")  # killed between the two renames: the only copy of step 8
    done = clean_partial(tmp_path)
    assert done == ["removed .old-step-000004", "restored step-000008 from .old-step-000008",
                    "removed .tmp-step-000006"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000004", "step-000008"]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000004", "step-000008"]


DECIDE = """
import os, sys
sys.path.insert(0, {root!r})
import torch.distributed as dist
from qat.distributed import decide_on_rank0
from qat.errors import UserError
dist.init_process_group("gloo")
print("pid", decide_on_rank0(os.getpid), flush=True)
def refuse():
    raise UserError("rank 0 says no")
try:
    decide_on_rank0(refuse)
except UserError as e:
    print("raised", e, flush=True)
dist.destroy_process_group()
"""


def test_rank0_decides_once_for_every_rank(tmp_path, env, free_port):
    """Two gloo ranks: both get rank 0's value (its pid), and both raise rank 0's UserError."""

    script = tmp_path / "decide.py"
    script.write_text(DECIDE.format(root=str(ROOT)))
    procs = [subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                              env={**env(), "RANK": str(r), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                                   "MASTER_PORT": str(port)})
             for port in [free_port()] for r in range(2)]
    outs = [p.communicate(timeout=120)[0].splitlines() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert outs[0] == outs[1] == [f"pid {procs[0].pid}", "raised rank 0 says no"]


def test_unopenable_lock_file_is_one_line(tmp_path):
    (tmp_path / "run.lock").mkdir()  # as root, the one way to make open() fail (EISDIR)
    with pytest.raises(UserError, match=r"cannot open the run lock .*run\.lock: Is a directory; output_dir must"):
        runlock.acquire(tmp_path)
