"""Naming a lost peer (qat/peers.py) from real sockets of this process, and what a restart resumes
(qat/checkpoint.py). The real gloo errors are in tests/integration/test_lost_nodes.py."""

from __future__ import annotations

import json
import socket
import sys

import pytest

from qat import checkpoint as ckpt
from qat import peers, torchrun_errors
from qat.errors import UserError


def swapped(port: int) -> int:
    """The port as gloo prints it on a little-endian host (the raw sin_port field)."""
    return int.from_bytes(port.to_bytes(2, "big"), sys.byteorder)


@pytest.fixture
def connection():
    """A listening socket and a connection to it, both of this process."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    client = socket.create_connection(server.getsockname())
    accepted, _ = server.accept()
    yield server.getsockname()[1], client.getsockname()[1]
    for s in (accepted, client, server):
        s.close()


def test_this_process_endpoints_are_its_listening_and_connected_sockets(connection):
    listen_port, client_port = connection
    found = peers.local_endpoints()
    assert {("127.0.0.1", listen_port), ("127.0.0.1", client_port)} <= found


def test_a_gloo_reset_names_the_rank_that_owns_the_address(connection):
    listen_port, client_port = connection
    table = [{"rank": 0, "node": 0, "host": "a", "pid": 10, "endpoints": [("10.0.0.1", 5000)]},
             {"rank": 1, "node": 1, "host": "b", "pid": 11, "endpoints": sorted(peers.local_endpoints())},
             {"rank": 2, "node": 1, "host": "b", "pid": 12, "endpoints": [("127.0.0.1", 1)]}]
    for port in (listen_port, client_port):
        error = RuntimeError(f"[/x/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:{swapped(port)}: "
                             f"Connection reset by peer. This is typically caused by a remote worker hanging")
        assert peers.lost_peer(error, 0, table) == "rank 1 (node 1, host b, pid 11): Connection reset by peer"
    # an address no rank owns: its IP names the node when only one node has it
    error = RuntimeError("[/x/gloo/transport/tcp/pair.cc:553] Connection closed by peer [10.0.0.1]:4242")
    assert peers.lost_peer(error, 2, table) == "node 0 (host a, ranks 0) at 10.0.0.1: Connection closed by peer"
    # a timeout names no peer; a mapped IPv6 address reads as IPv4
    error = RuntimeError("[/x/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 2000ms for recv operation")
    assert peers.lost_peer(error, 0, table).startswith("a collective got no answer in time (Timed out waiting)")
    assert peers._normal_ip("::ffff:127.0.0.1") == "127.0.0.1"


def test_other_errors_are_not_a_lost_peer():
    assert peers.lost_peer(RuntimeError("CUDA out of memory"), 0, []) is None
    assert peers.lost_peer(ConnectionError("Connection refused"), 0, []) is None  # not from a collective
    assert peers.lost_peer(ValueError("gloo: Connection refused"), 0, []) is None
    assert peers.lost_peer(RuntimeError("gloo: Connection refused"), 0, []) == "a peer: Connection refused"


def test_the_launcher_prefers_a_user_error_then_the_lowest_rank(tmp_path):
    files = []
    for rank, kind in ((3, "lost"), (1, "lost"), (2, "user")):
        path = tmp_path / f"{rank}.json"
        path.write_text(json.dumps({torchrun_errors.MARK: {"message": f"m{rank}", "rank": rank, "kind": kind}}))
        files.append(path)
    assert torchrun_errors.records_in_error_files(files)["rank"] == 2
    assert torchrun_errors.records_in_error_files(files[:2])["rank"] == 1
    assert torchrun_errors.records_in_error_files([tmp_path / "missing.json"]) is None


def test_a_restart_resumes_the_newest_checkpoint_whatever_resume_says(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (2, 4):
        (ckpt.step_dir(root, step)).mkdir(parents=True)
        (ckpt.step_dir(root, step) / ckpt.META).write_text("{}")
        (ckpt.step_dir(root, step) / ".metadata").write_text("")
    with pytest.raises(UserError):
        ckpt.resolve_resume(None, root)  # a fresh start refuses a folder with checkpoints
    assert ckpt.resolve_resume(None, root, restarted=True) == ckpt.step_dir(root, 4)
    assert ckpt.resolve_resume(str(ckpt.step_dir(root, 2)), root, restarted=True) == ckpt.step_dir(root, 4)
    # nothing saved yet by this run: the configured start again
    assert ckpt.resolve_resume(None, tmp_path / "empty", restarted=True) is None
