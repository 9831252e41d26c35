"""A user error under torchrun: one `error:` line, printed by the launcher, and exit status 2.

torchrun treats a worker that exits non-zero as a failure: it SIGTERMs the worker's node-mates,
raises `ChildFailedError` from its `main()`, and Python prints that exception's traceback and a
failure table; its agent also logs the failure (`failed (exitcode: 2)`, `Sending process N
closing signal SIGTERM`, `no error file defined for parent`). For a bug that report is what one
wants; for a misspelled config key it buries the one line that matters. Two halves, one file
format between them:

- Worker (`hand_to_launcher`, called by `qat.errors.exit_on_user_error`): writes the message into
  its TORCHELASTIC_ERROR_FILE, the JSON file torchrun reads into the worker's `ProcessFailure`
  (`{"message": {"message", "extraInfo": {"py_callstack", "timestamp"}}}`), plus a record of our
  own under `MARK`; prints nothing; the caller exits 2.
- Launcher (`torchrun_handler`): torchrun imports `torch.distributed.elastic.rendezvous`, whose
  `_register_out_of_tree_handlers()` loads every entry point of group `torchrun.handlers` (ours
  is declared in pyproject.toml) in the launcher process, before any worker starts. Ours installs
  a `sys.excepthook` and a logging filter. When every failure in a `ChildFailedError` is one of
  our user errors, or a node-mate that the agent stopped with SIGTERM (SIGKILL after its
  timeout), the filter has kept the agent's records of that failure out of the log, and the hook
  prints one line and exits 2. Anything else (a worker that raised another exception, crashed, or
  was killed by someone else) keeps torchrun's full report. torch calls the entry point and
  registers what it returns as a rendezvous backend under the entry point's name, so it returns
  a handler creator, one that refuses: `--rdzv_backend qat-errors` says to use c10d.

Which line: every rank validates the same input, so usually every rank raises the same error.

- On a node, the line is the lowest rank's message, tagged ` (rank N)` unless N is 0. A rank
  other than its node's first waits for that rank's error file (at most `GRACE_S`) before it
  exits, since the agent stops the others the moment one exits: without the wait, which rank's
  message is shown would be a race.
- With several nodes, the launchers compare notes through the rendezvous store: a node whose
  message is the one the node holding rank 0 reports prints nothing, so one line appears in all;
  a different message (a file missing on one node) is printed by its own node. No launcher exits
  before every launcher has read the notes (at most `LAUNCHERS_S`), because the store lives in one of
  them and the others' rendezvous shutdown uses it too.

The launcher also tells its workers that it reports (`REPORTS_ENV`, inherited by every worker): a
worker whose launcher lacks the entry point (a checkout used without `pip install -e .`) prints
its line itself on rank 0, and torchrun's report follows.

A lost peer (qat/peers.py) takes the same path with a record of kind `LOST`: each surviving
launcher prints its node's line and exits `LOST_EXIT` (75), without comparing notes (a barrier
would wait for the launcher that is gone). When the lost launcher hosted the rendezvous store,
the survivor's agent fails on the store instead of reporting its workers (RendezvousConnectionError);
the hook then reads the workers' error files itself.

Restarts (`--max-restarts N`): torchrun's agent keeps one store for all generations of workers,
so keys that one generation's process group wrote (gloo's and NCCL's addresses) are still there
when the next generation connects, which then dials dead addresses and times out
(`connectFullMesh`). The launcher therefore exports each rendezvous round to its workers
(`ROUND_ENV`): the same number on every node, new for every generation, and the workers prefix
their store with it (qat/distributed.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
import traceback

MARK = "qat_user_error"  # our record in a worker's error file, and our keys in the rendezvous store
REPORTS_ENV = "QAT_TORCHRUN_REPORTS_USER_ERRORS"  # set by the launcher plugin, inherited by workers
ROUND_ENV = "QAT_RDZV_ROUND"  # the rendezvous round of this worker generation, exported by the launcher
USER, LOST = "user", "lost"  # the kinds of record: bad input, a lost peer
EXIT_STATUS = {USER: 2, LOST: 75}  # qat.errors.USER_EXIT, LOST_EXIT
GRACE_S = 10.0  # how long a node's ranks wait for its first rank's error file
# How long launchers wait for each other in the store. A launcher that gives up exits, and if it
# hosts the store the others' next read fails with C++ socket warnings: generous, since a loaded
# node can be seconds late; only a user error on several nodes ever waits here.
LAUNCHERS_S = 60.0
COLLATERAL_EXIT_CODES = (-15, -9)  # node-mates the agent stopped: SIGTERM, SIGKILL after its timeout
# The loggers of torchrun's agent that report a worker failure (see `_QuietUserErrors`).
AGENT_LOGGERS = ("torch.distributed.elastic.multiprocessing.api",
                 "torch.distributed.elastic.multiprocessing.errors.error_handler")


# -- worker side ---------------------------------------------------------------------------------

def launcher_reports() -> bool:
    """True in a torchrun worker whose launcher prints user errors (our entry point is loaded)."""
    return bool(os.environ.get("TORCHELASTIC_ERROR_FILE")) and os.environ.get(REPORTS_ENV) == "1"


def restarts_left() -> bool:
    """Whether this worker's agent restarts the workers when they fail (`--max-restarts`)."""
    count, most = (int(os.environ.get(k, "0") or 0) for k in ("TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS"))
    return count < most


def hand_to_launcher(message: str, grace_s: float = GRACE_S, kind: str = USER) -> None:
    """Record an error for the launcher to print (see the module docstring); prints nothing."""
    path = os.environ["TORCHELASTIC_ERROR_FILE"]
    try:
        _write_error_file(path, message, int(os.environ.get("RANK", "0")), kind)
    except OSError:  # torchrun's folder is gone: say it ourselves, torchrun's report follows
        print(f"error: {message}", file=sys.stderr, flush=True)
        return
    first = _first_error_file_of_node(path, os.environ.get("LOCAL_RANK", "0"))
    deadline = time.monotonic() + grace_s
    while first is not None and not os.path.exists(first) and time.monotonic() < deadline:
        time.sleep(0.05)


def record_bug(e: BaseException) -> None:
    """A bug in a torchrun worker: its traceback into the error file, stamped now, as torch's
    `@record` does. torchrun names the failure with the earliest stamp as the root cause; a worker
    without an error file is stamped when the agent notices its exit, often after a peer that lost
    this worker wrote its own file, which would make "lost rank N" the root cause of a bug."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    data = {"message": {"message": f"{type(e).__name__}: {e}",
                        "extraInfo": {"py_callstack": traceback.format_exc(), "timestamp": str(int(time.time()))}}}
    with contextlib.suppress(OSError):  # torchrun's folder is gone: its report follows all the same
        _write_json_atomic(path, data)


def _write_json_atomic(path: str, data: dict) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def _write_error_file(path: str, message: str, rank: int, kind: str = USER) -> None:
    """The error file in torchrun's format (its failure table shows `error: ...` as the traceback),
    written whole or not at all: the agent parses it the moment this process exits."""
    title = "UserError" if kind == USER else "PeerLost"
    data = {"message": {"message": f"{title}: {message}",
                        "extraInfo": {"py_callstack": f"error: {message}", "timestamp": str(int(time.time()))}},
            MARK: {"message": message, "rank": rank, "kind": kind}}
    _write_json_atomic(path, data)


def _first_error_file_of_node(path: str, local_rank: str) -> str | None:
    """Local rank 0's error file, or None for local rank 0 itself or an unknown layout. torchrun's
    agent gives each worker `<attempt dir>/<local rank>/error.json`."""
    folder, name = os.path.split(path)
    parent, last = os.path.split(folder)
    if local_rank == "0" or last != local_rank:
        return None
    return os.path.join(parent, "0", name)


# -- launcher side -------------------------------------------------------------------------------

def first_user_error(failures: dict) -> dict | None:
    """The record to report among these `ProcessFailure`s, or None if they are not ours to report:
    some failure is neither our record nor a node-mate the agent stopped. A user error comes
    before a lost peer (a rank that stops on bad input is "lost" to the others), then the lowest
    rank."""
    records = []
    for failure in (failures or {}).values():
        data = failure.error_file_data.get(MARK) if isinstance(failure.error_file_data, dict) else None
        if isinstance(data, dict):
            records.append(data)
        elif failure.exitcode not in COLLATERAL_EXIT_CODES:
            return None
    return min(records, key=_precedence) if records else None


def _precedence(record: dict) -> tuple:
    return record.get("kind", USER) != USER, record["rank"]


def records_in_error_files(paths) -> dict | None:
    """The record to report among the error files the workers left (those that exist)."""
    records = []
    for path in paths:
        try:
            with open(path) as f:
                data = json.load(f).get(MARK)
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(data, dict):
            records.append(data)
    return min(records, key=_precedence) if records else None


def error_line(record: dict) -> str:
    return f"error: {record['message']}" + ("" if record["rank"] == 0 else f" (rank {record['rank']})")


def torchrun_handler():
    """The `torchrun.handlers` entry point (pyproject.toml). torch loads it in every torchrun
    launcher, calls it, and registers what it returns as the rendezvous backend `qat-errors`. It
    exists for its side effect: the excepthook and log filter of the module docstring. torch needs
    a handler creator back; ours refuses to create one, so only an explicit
    `--rdzv_backend qat-errors` ever reaches it, and that gets one line saying what to use."""
    _install()
    _export_rounds()
    return no_rendezvous


def no_rendezvous(params):
    raise ValueError(f"--rdzv_backend {params.backend}: not a rendezvous backend (it is qat's error reporting "
                     f"for torchrun launchers); use --rdzv_backend c10d")


_installed = False


def _install() -> None:
    global _installed
    if _installed:
        return
    _installed = True
    os.environ[REPORTS_ENV] = "1"  # the workers inherit the launcher's environment
    previous = sys.excepthook

    def excepthook(kind, value, tb):
        try:
            record = _record_for(value, tb)
        except Exception:  # never lose torchrun's report to a fault of ours
            record = None
        if record is None:
            return previous(kind, value, tb)
        lost = record.get("kind") == LOST
        if lost or not _shown_by_rank0_node(_worker_group(tb), record["message"]):
            print(error_line(record), file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_STATUS[LOST if lost else USER])  # torchrun's cleanup ran in launch_agent's `finally`

    sys.excepthook = excepthook
    for name in AGENT_LOGGERS:
        logging.getLogger(name).addFilter(_QuietUserErrors())


def _record_for(value, tb) -> dict | None:
    """Our record behind the launcher's exception: the workers' failures of a ChildFailedError, or
    for another error of the agent (its rendezvous store is gone with the node that hosted it) a
    lost-peer record the workers left in their error files before the agent stopped them."""
    failures = _failures_of(value)
    if failures is not None:
        return first_user_error(failures)
    agent = _agent(tb)
    context = getattr(agent, "_pcontext", None)
    record = records_in_error_files((getattr(context, "error_files", None) or {}).values())
    return record if record is not None and record.get("kind") == LOST else None


def _export_rounds() -> None:
    """Wrap the c10d (dynamic) rendezvous so that each round's number reaches the workers started
    after it, through the launcher's environment, which torchrun copies into every worker. The
    module is imported by now (the registry that loads this entry point imports it)."""
    module = sys.modules.get("torch.distributed.elastic.rendezvous.dynamic_rendezvous")
    handler = getattr(module, "DynamicRendezvousHandler", None)
    if handler is None or getattr(handler.next_rendezvous, "_qat_rounds", False):
        return
    original = handler.next_rendezvous

    def next_rendezvous(self):
        info = original(self)
        try:
            os.environ[ROUND_ENV] = str(self._state_holder.state.round)
        except AttributeError:  # another torch: the workers keep torch's own store keys
            os.environ.pop(ROUND_ENV, None)
        return info

    next_rendezvous._qat_rounds = True
    handler.next_rendezvous = next_rendezvous


def _shown_by_rank0_node(group, message: str, grace_s: float = LAUNCHERS_S) -> bool:
    """With several nodes: post this node's message in the rendezvous store of the agent's worker
    `group`, and wait until every launcher has; True if the node holding rank 0 (group rank 0)
    posted the same one. Then wait until every launcher has read the notes: one of us hosts the
    store, and the others' rendezvous shutdown (done before they post) and reads must not find it
    gone. One node, or any failure or timeout: False, and this node prints its line."""
    if group is None or group.group_world_size <= 1:
        return False
    store, node, nodes = group.store, group.group_rank, group.group_world_size
    deadline = time.monotonic() + grace_s
    try:
        store.set(f"{MARK}/message/{node}", message)
        everyone = _barrier(store, "posted", nodes, deadline)
        first = f"{MARK}/message/0"
        said = store.get(first).decode() if node != 0 and store.check([first]) else None
    except Exception:  # DistStoreError (a timeout), DistNetworkError (the store is gone), ...
        return False
    if everyone:
        # The answer is read; this barrier only keeps the store's host alive until every launcher
        # has read too. The last to arrive may be the host, which exits at once: a launcher still
        # polling then finds the store gone, which changes nothing it has read.
        with contextlib.suppress(Exception):
            _barrier(store, "read", nodes, deadline)
    return said == message


def _barrier(store, name: str, nodes: int, deadline: float) -> bool:
    """True once `nodes` launchers called this, False at the deadline. Polled with `check`: a
    blocking `wait` that times out logs C++ socket warnings."""
    done = f"{MARK}/{name}/all"
    if store.add(f"{MARK}/{name}", 1) == nodes:
        store.set(done, "1")
        return True
    while not store.check([done]):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _worker_group(tb):
    """The agent's WorkerGroup (its rendezvous store, group rank and size)."""
    agent = _agent(tb)
    try:
        return agent.get_worker_group() if agent is not None else None
    except Exception:  # then this node prints its own line
        return None


def _agent(tb):
    """torchrun's agent: a local `agent` of `launch_agent`, a frame the exception went through."""
    agent_api = sys.modules.get("torch.distributed.elastic.agent.server.api")
    try:
        while agent_api is not None and tb is not None:
            for value in list(tb.tb_frame.f_locals.values()):
                if isinstance(value, agent_api.SimpleElasticAgent):
                    return value
            tb = tb.tb_next
    except Exception:
        pass
    return None


class _QuietUserErrors(logging.Filter):
    """Drops a record of torchrun's agent logged while it handles a failure that is a user error.

    Those records name no failure (`Sending process 123 closing signal SIGTERM` is logged before
    the failure is), so the filter looks up the call stack for what the agent is handling: the
    `_failures` of the worker context (while it stops the node-mates and logs `failed`) or a
    `ChildFailedError` (torchrun's `@record` logging that its launcher has no error file). Where
    it finds none, for instance when torchrun itself got SIGTERM, the record stays."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            return first_user_error(_failures_in_stack()) is None
        except Exception:  # a filter that raises would break the agent's logging call
            return True


def _failures_in_stack() -> dict | None:
    frame = sys._getframe(2)
    while frame is not None:
        scope = frame.f_locals
        held = getattr(scope.get("self"), "_failures", None)
        if isinstance(held, dict) and held:
            return held
        for value in scope.values():
            failures = _failures_of(value)
            if failures:
                return failures
        frame = frame.f_back
    return None


def _failures_of(value) -> dict | None:
    errors = sys.modules.get("torch.distributed.elastic.multiprocessing.errors")
    if errors is not None and isinstance(value, errors.ChildFailedError):
        return value.failures
    return None
