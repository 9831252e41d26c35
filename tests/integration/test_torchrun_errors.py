"""A user error under torchrun: one `error:` line from the launcher, exit status 2, no traceback
(qat/torchrun_errors.py); a bug keeps torchrun's full report."""

import json
import re
import subprocess
import sys
from importlib.metadata import entry_points

from pathlib import Path

import pytest
from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

from qat import torchrun_errors

ROOT = Path(__file__).resolve().parents[2]

MISSPELLED = "optimizer.betas1=0.9"
WANT = "error: unknown config key 'optimizer.betas1'"


def lines(*outputs: str) -> list[str]:
    return [l for out in outputs for l in out.splitlines() if l.strip()]


def test_the_entry_point_is_installed():
    """torchrun loads the group `torchrun.handlers` from the installed metadata: `pip install -e .`
    writes it (into site-packages and into qat_recipes.egg-info here, which a launcher started in
    this folder sees first); an install older than the entry point lacks it."""
    found = {e.name: e.value for e in entry_points(group="torchrun.handlers")}
    assert found.get("qat-errors") == "qat.torchrun_errors:torchrun_handler", (
        f"torchrun.handlers holds {found}: run `pip install -e .` again so that torchrun loads qat's error reporting")


def failure(tmp_path, local_rank: int, exitcode: int, content=None) -> ProcessFailure:
    """torch's own ProcessFailure, reading a real error file as the agent does."""
    path = tmp_path / str(local_rank) / "error.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    if content is not None:
        path.write_text(json.dumps(content))
    return ProcessFailure(local_rank=local_rank, pid=1000 + local_rank, exitcode=exitcode, error_file=str(path))


def ours(message: str, rank: int) -> dict:
    return {"message": {"message": f"UserError: {message}", "extraInfo": {"py_callstack": "", "timestamp": "1"}},
            torchrun_errors.MARK: {"message": message, "rank": rank}}


def test_which_failures_are_a_user_error(tmp_path):
    def verdict(*failures):
        record = torchrun_errors.first_user_error(dict(enumerate(failures)))
        return None if record is None else torchrun_errors.error_line(record)

    # the agent SIGTERMed the node-mate; a node-mate SIGTERMed after it wrote its record counts as ours
    assert verdict(failure(tmp_path / "a", 0, 2, ours("bad key", 0)), failure(tmp_path / "a", 1, -15)) == "error: bad key"
    assert verdict(failure(tmp_path / "b", 0, -15, ours("bad key", 4)), failure(tmp_path / "b", 1, 2, ours("bad", 5)),
                   failure(tmp_path / "b", 2, -9)) == "error: bad key (rank 4)"
    # anything else is torchrun's to report: a node-mate's crash or exception, an error file not ours
    assert verdict(failure(tmp_path / "c", 0, 2, ours("bad key", 0)), failure(tmp_path / "c", 1, 1)) is None
    assert verdict(failure(tmp_path / "d", 0, 2, ours("bad key", 0)), failure(tmp_path / "d", 1, -11)) is None
    theirs = {"message": {"message": "ValueError: x", "extraInfo": {"py_callstack": "Traceback", "timestamp": "1"}}}
    assert verdict(failure(tmp_path / "e", 0, 2, theirs), failure(tmp_path / "e", 1, -15)) is None
    assert verdict(failure(tmp_path / "f", 0, -15)) is None


def test_a_worker_hands_its_error_to_torchrun_in_torchruns_format(tmp_path, monkeypatch, capsys):
    """The file torchrun's ProcessFailure parses (its table would show `error: ...`), our record
    with the global rank, nothing printed; local rank 0's file is where the others look for it."""
    attempt = tmp_path / "attempt_0"
    (attempt / "0").mkdir(parents=True)
    (attempt / "0" / "error.json").write_text(json.dumps(ours("bad key", 2)))  # the node's first rank
    (attempt / "1").mkdir()
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(attempt / "1" / "error.json"))
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    torchrun_errors.hand_to_launcher("bad key")
    assert capsys.readouterr() == ("", "")
    parsed = ProcessFailure(local_rank=1, pid=1, exitcode=2, error_file=str(attempt / "1" / "error.json"))
    assert parsed.message["message"] == "UserError: bad key"
    assert parsed.message["extraInfo"]["py_callstack"] == "error: bad key"
    assert parsed.error_file_data[torchrun_errors.MARK] == {"message": "bad key", "rank": 3, "kind": "user"}
    assert sorted(p.name for p in (attempt / "1").iterdir()) == ["error.json"]  # no temporary left
    first = torchrun_errors._first_error_file_of_node
    assert first(str(attempt / "1" / "error.json"), "1") == str(attempt / "0" / "error.json")
    assert first(str(attempt / "0" / "error.json"), "0") is None
    assert first(str(tmp_path / "elsewhere.json"), "1") is None  # a layout we do not know: no wait


def test_a_user_error_under_torchrun_is_one_line_and_status_2(world, tmp_path, base_overrides, run_train):
    proc = run_train(base_overrides(world, tmp_path) + [MISSPELLED], 2, check=False)
    out = lines(proc.stdout, proc.stderr)
    assert proc.returncode == 2 and len(out) == 1 and out[0].startswith(WANT) and "(rank" not in out[0], out
    assert not (tmp_path / "checkpoints").exists()


def test_a_user_error_on_two_nodes_is_one_line_and_status_2_on_both(world, tmp_path, base_overrides, env, free_port, train_cmd):
    """Two launchers on one machine, as on two nodes. c10d ignores --node_rank and gives rank 0 to
    one of them: that one prints the line, the other prints nothing, both exit 2."""
    port = free_port()
    procs = []
    for node in (0, 1):
        cmd = train_cmd(base_overrides(world, tmp_path) + [MISSPELLED], 1)
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
                    "--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}",
                    "--rdzv_id", "two-nodes"]
        procs.append(subprocess.Popen(launcher + cmd[1:], cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=300) for p in procs]
    note = "node_rank is only used for static rdzv_backend"  # torchrun's own notice on node 1
    out = [[l for l in lines(*o) if not l.startswith(note)] for o in outputs]
    assert [p.returncode for p in procs] == [2, 2], outputs
    # torch's C++ store client may warn (`[W ... TCPStore ...]`, with frames) when the launcher that
    # hosts the store exits first; those are torch's lines, not a second error or a traceback
    errors = [[l for l in o if l.startswith("error:")] for o in out]
    assert sorted(map(len, errors)) == [0, 1] and not any("Traceback" in l for o in out for l in o), out
    line = (errors[0] or errors[1])[0]
    assert line.startswith(WANT) and "(rank" not in line, out


def test_a_bug_under_torchrun_keeps_torchruns_report(world, tmp_path, monkeypatch, base_overrides, run_train):
    """A real unhandled exception: an unparsable QAT_PROGRESS_EVERY_S fails rank 0's first
    progress bar (transformers' weight loading) with a ValueError."""
    monkeypatch.setenv("QAT_PROGRESS_EVERY_S", "abc")
    proc = run_train(base_overrides(world, tmp_path), 2, check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "ValueError: could not convert string to float: 'abc'" in proc.stderr
    for part in ("Traceback", "ChildFailedError", "recipes/train.py FAILED"):
        assert part in proc.stderr, part
    # whichever worker the agent sees exit first (rank 1 loses rank 0 a moment later), torchrun's
    # root cause is the bug: rank 0's error file is stamped when it raised, before rank 1's
    root = proc.stderr.split("Root Cause (first observed failure):", 1)[-1]
    assert re.search(r"rank\s+: 0 \(local_rank: 0\)\s+exitcode\s+: 1 ", root), proc.stderr[-3000:]
    assert "ValueError: could not convert string to float" in root, proc.stderr[-3000:]
    assert not [l for l in lines(proc.stdout, proc.stderr) if l.startswith("error:")]
