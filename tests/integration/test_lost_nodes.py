"""A lost node, on two simulated nodes: two torchrun launchers on one machine, 1 worker each, a c10d
rendezvous on loopback. Node A starts first and hosts the rendezvous store; B joins.

- A launcher killed with SIGKILL (its worker dies with it, qat/lifeline.py): the survivor stops at
  once with one `error:` line naming the lost rank and the checkpoint to resume, exit status 75
  (qat/peers.py, qat/torchrun_errors.py); `checkpoint.resume=auto` then ends with the losses of an
  uninterrupted run at the same world size.
- A worker killed under `--max-restarts 1`: torchrun re-forms the job and the new workers continue
  from the newest checkpoint by themselves, with the uninterrupted run's per-step losses.
"""

from __future__ import annotations

import pytest

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

pytestmark = pytest.mark.slow  # an end-to-end pipeline: `make test-slow` (CI runs it)

ROOT = Path(__file__).resolve().parents[2]
CKPT = ["checkpoint.every_n_steps=2"]
KILL_AFTER_STEP = 4  # of 30: step-2 is complete by then, and most of the run is still ahead
LOST_EXIT = 75


def launch_two(cmd: list[str], port: int, env: dict, logs: Path, extra=()) -> list[subprocess.Popen]:
    """Node A, then (once A's rendezvous store listens) node B; output to logs/node-{a,b}.log."""
    procs = []
    for name in ("a", "b"):
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                    "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "lost-node",
                    *extra]
        out = open(logs / f"node-{name}.log", "w")
        procs.append(subprocess.Popen(launcher + cmd[1:], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT))
        out.close()
        if name == "a":
            wait_until(lambda: listening(port) or procs[0].poll() is not None)
    return procs


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def wait_until(condition, poll_s: float = 0.1) -> None:
    while not condition():
        time.sleep(poll_s)


def steps_logged(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def kill_mid_training(procs, run_dir: Path, victim: int, sig_target) -> None:
    """Once KILL_AFTER_STEP steps are logged, SIGKILL `sig_target(procs[victim].pid)`."""
    wait_until(lambda: steps_logged(run_dir) >= KILL_AFTER_STEP or any(p.poll() is not None for p in procs))
    assert all(p.poll() is None for p in procs), "a launcher ended before the kill"
    os.kill(sig_target(procs[victim].pid), signal.SIGKILL)


def worker_of(launcher_pid: int) -> int:
    """The launcher's one worker process (its child)."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == launcher_pid:
                return int(entry)
    raise AssertionError(f"launcher {launcher_pid} has no worker")


def lines(path: Path) -> list[str]:
    return [l for l in path.read_text().splitlines() if l.strip()]


def test_a_killed_launcher_stops_the_survivor_with_one_line_and_resume_auto_matches_a_straight_run(
        world, tmp_path, base_overrides, long_b2_args, env, free_port, train_cmd, straight_b2_losses, losses):
    out = tmp_path / "run"
    cmd = train_cmd(base_overrides(world, out) + long_b2_args + CKPT, 1)
    procs = launch_two(cmd, free_port(), env(), tmp_path)
    wait_until(lambda: steps_logged(out) >= 1 or procs[1].poll() is not None)
    lost_worker = worker_of(procs[1].pid)
    kill_mid_training(procs, out, 1, lambda pid: pid)  # node B's launcher; its worker dies with it
    assert procs[0].wait(timeout=60) == LOST_EXIT, (tmp_path / "node-a.log").read_text()[-3000:]
    said = lines(tmp_path / "node-a.log")
    errors = [l for l in said if l.startswith("error:")]
    assert len(errors) == 1 and not [l for l in said if "Traceback" in l], said[-30:]
    assert f"pid {lost_worker})" in errors[0] and "lost rank " in errors[0] and "(node " in errors[0], errors
    newest = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step-"))[-1]
    assert errors[0].split(" (rank")[0].endswith(
        f"Rerun the same command with checkpoint.resume=auto to continue from {out}/checkpoints/{newest}, "
        f"the newest complete checkpoint"), errors
    # the same two launchers with resume=auto finish the run with the uninterrupted losses
    procs = launch_two(train_cmd(base_overrides(world, out) + long_b2_args + CKPT + ["checkpoint.resume=auto"], 1),
                       free_port(), env(), tmp_path)
    assert [p.wait(timeout=600) for p in procs] == [0, 0], (tmp_path / "node-a.log").read_text()[-3000:]
    assert losses(out) == straight_b2_losses


def test_a_killed_launcher_that_hosted_the_rendezvous_store_is_one_line_on_the_survivor(
        world, tmp_path, base_overrides, long_b2_args, env, free_port, train_cmd):
    """The survivor's agent then fails on the store rather than on its worker; the line is the
    same, read from the worker's error file (torch's C++ store client warns on its own)."""
    out = tmp_path / "run"
    procs = launch_two(train_cmd(base_overrides(world, out) + long_b2_args + CKPT, 1), free_port(), env(), tmp_path)
    kill_mid_training(procs, out, 0, lambda pid: pid)
    assert procs[1].wait(timeout=60) == LOST_EXIT, (tmp_path / "node-b.log").read_text()[-3000:]
    said = lines(tmp_path / "node-b.log")
    errors = [l for l in said if l.startswith("error:")]
    assert len(errors) == 1 and not [l for l in said if "Traceback" in l], said[-30:]
    assert "lost rank " in errors[0] and "checkpoint.resume=auto" in errors[0], errors


def test_a_killed_worker_under_max_restarts_resumes_by_itself_with_the_straight_losses(
        world, tmp_path, base_overrides, long_b2_args, env, free_port, train_cmd, straight_b2_losses, losses,
        read_metrics):
    out = tmp_path / "run"
    procs = launch_two(train_cmd(base_overrides(world, out) + long_b2_args + CKPT, 1), free_port(), env(), tmp_path,
                       extra=("--max-restarts", "1"))
    kill_mid_training(procs, out, 1, worker_of)  # node B's worker; its launcher restarts the job
    assert [p.wait(timeout=600) for p in procs] == [0, 0], (tmp_path / "node-b.log").read_text()[-3000:]
    said = lines(tmp_path / "node-a.log") + lines(tmp_path / "node-b.log")
    assert not [l for l in said if l.startswith("error:") or "Traceback" in l or "connectFullMesh" in l], said
    assert [l for l in said if l.startswith("resumed at step ") and "after a torchrun restart" in l], said
    assert losses(out) == straight_b2_losses
    assert [m["step"] for m in read_metrics(out)] == list(range(1, len(straight_b2_losses) + 1))
