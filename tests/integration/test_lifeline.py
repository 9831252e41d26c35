"""Workers die with their launcher (qat/lifeline.py): SIGKILL the launcher, no worker survives."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def proc_state(pid: int):
    """(state letter, parent pid), or None once the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return fields[0], int(fields[1])


def alive(pid: int) -> bool:
    s = proc_state(pid)
    return s is not None and s[0] != "Z"  # a zombie has exited; only its reaper is missing


def children(pid: int) -> list[int]:
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            s = proc_state(int(d.name))
            if s is not None and s[1] == pid:
                found.append(int(d.name))
    return found


def wait_dead(pids: list[int], timeout: float) -> float:
    """Seconds until none of pids is alive (or timeout)."""
    t0 = time.monotonic()
    while any(alive(p) for p in pids) and time.monotonic() - t0 < timeout:
        time.sleep(0.05)
    return time.monotonic() - t0


def kill_all(pids: list[int]) -> None:
    for p in pids:
        if alive(p):
            os.kill(p, signal.SIGKILL)


# A launcher that starts its worker in a session of its own, exactly as torchrun's agent does.
LAUNCHER = textwrap.dedent("""
    import os, subprocess, sys, time
    worker = subprocess.Popen([sys.executable, "-c", sys.argv[1]], start_new_session=True,
                              env=dict(os.environ, TORCHELASTIC_RUN_ID="unit"))
    print(worker.pid, flush=True)
    time.sleep(600)
""")
WORKER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    from qat.lifeline import exit_with_launcher
    assert exit_with_launcher(poll_s={poll}, parent_death_signal={pdeath})
    print("armed", flush=True)
    time.sleep(600)
""")


@pytest.mark.parametrize("pdeath,poll", [(True, 3600.0), (False, 0.2)], ids=["prctl", "watchdog"])
def test_worker_exits_when_its_launcher_is_killed(pdeath, poll):
    """prctl alone (the watchdog polls hourly) and the watchdog alone (no prctl) each suffice."""
    worker_src = WORKER.format(root=str(ROOT), poll=poll, pdeath=pdeath)
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, worker_src], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    worker = int(launcher.stdout.readline())
    try:
        assert launcher.stdout.readline().strip() == "armed"
        assert alive(worker)
        launcher.kill()
        launcher.wait()
        took = wait_dead([worker], timeout=10)
        assert not alive(worker), "the worker outlived its launcher"
        assert took < (1.0 if pdeath else 2.0)
        if not pdeath:  # the watchdog says why it exits; the kernel's SIGKILL cannot
            assert f"the launcher (pid {launcher.pid}) is gone" in launcher.stderr.read()
    finally:
        kill_all([worker])


def test_plain_python_is_not_tied_to_its_parent():
    """Outside torchrun (no TORCHELASTIC_RUN_ID) nothing is armed: `nohup python train.py` lives on."""
    code = f"import sys; sys.path.insert(0, {str(ROOT)!r}); from qat.lifeline import exit_with_launcher; " \
           f"print(exit_with_launcher())"
    e = {k: v for k, v in os.environ.items() if k != "TORCHELASTIC_RUN_ID"}
    out = subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_sigkill_of_torchrun_ends_training_workers_without_partial_checkpoints(world, tmp_path, base_overrides, env, run_train, train_cmd):
    """The real thing: 2-rank torchrun training that saves every step; SIGKILL torchrun mid-run,
    then relaunch on the same folder."""
    overrides = base_overrides(world, tmp_path) + ["training.steps=100000", "checkpoint.every_n_steps=1",
                                                   "checkpoint.keep_last=2", "scheduler.warmup_steps=0"]
    log = open(tmp_path / "torchrun.log", "w")
    torchrun = subprocess.Popen(train_cmd(overrides, nproc=2), cwd=ROOT, env=env(), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    ckpts = tmp_path / "checkpoints"
    workers = []
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and len(list(ckpts.glob("step-*"))) < 2:
            assert torchrun.poll() is None, (tmp_path / "torchrun.log").read_text()[-3000:]
            time.sleep(0.1)
        workers = children(torchrun.pid)
        assert len(workers) == 2 and all(alive(p) for p in workers)
        torchrun.send_signal(signal.SIGKILL)
        torchrun.wait()
        wait_dead(workers, timeout=30)
        assert not [p for p in workers if alive(p)], "workers outlived torchrun by 30 s"
    finally:
        kill_all(workers)
        log.close()
    from qat.checkpoint import is_complete

    steps = sorted(ckpts.glob("step-*"))
    assert steps and all(is_complete(p) for p in steps), [sorted(q.name for q in p.iterdir()) for p in steps]
    # the relaunch: the dead run's lock is free, leftovers go, training continues from its newest step
    newest = int(steps[-1].name.split("-")[1])
    proc = run_train(overrides + ["checkpoint.resume=auto", "training.stop_after_steps=1"], nproc=1)
    assert f"resumed at step {newest}" in proc.stdout
    assert not list(ckpts.glob(".tmp-*")) and (ckpts / f"step-{newest + 1:06d}").is_dir()


def test_a_launcher_started_by_compare_stops_when_compare_dies():
    """compare starts torchrun with preexec_fn=stops_with_me(): SIGKILL compare, torchrun gets SIGTERM."""
    parent = textwrap.dedent(f"""
        import subprocess, sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from qat.lifeline import stops_with_me
        child = subprocess.Popen([sys.executable, "-c", "import signal, sys, time; "
                                  "signal.signal(signal.SIGTERM, lambda *a: sys.exit(0)); print('up', flush=True); "
                                  "time.sleep(600)"], preexec_fn=stops_with_me())
        print(child.pid, flush=True)
        time.sleep(600)
    """)
    p = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True)
    child = int(p.stdout.readline())
    try:
        assert p.stdout.readline().strip() == "up"
        p.kill()
        p.wait()
        assert wait_dead([child], timeout=10) < 2 and not alive(child)
    finally:
        kill_all([child])


def test_an_entry_point_ends_with_a_frozen_heap_and_its_exit_handlers_run(env):
    """qat.errors keeps the collector off the heap at exit (about 1 s saved per process), not
    during main(); handlers registered before it (they run after the freeze) and during main run."""
    child = textwrap.dedent(f"""
        import atexit, gc, sys
        sys.path.insert(0, {str(ROOT)!r})
        atexit.register(lambda: print("first registered, last run: frozen", gc.get_freeze_count() > 0))
        from qat import errors

        @errors.exit_on_user_error
        def main():
            atexit.register(lambda: print("registered by main: ran"))
            assert gc.get_freeze_count() == 0  # not during the run: the tests call main() in-process

        main()
        main()
    """)
    proc = subprocess.run([sys.executable, "-c", child], env=env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["registered by main: ran", "registered by main: ran",
                                        "first registered, last run: frozen True"]
