"""Which rank is gone: a lost peer named from the error a survivor gets, as one message.

When a rank's process dies (its node's launcher was killed, the OOM killer, a crashed node
agent), the kernel closes its sockets, and every rank that talks to it over gloo gets the reset
at once, as a RuntimeError such as

    [.../gloo/transport/tcp/pair.cc:537] Read error [10.0.0.7]:5031: Connection reset by peer

The address is the far end of the survivor's socket to the lost rank: that rank's listening port
or the local port of a connection it opened. gloo prints the port as the raw `sin_port` field,
so on a little-endian host the number shown is the real port with its two bytes swapped.

`gather()` (collective, once at start) records every rank's TCP endpoints (its listening and
connected sockets, read from /proc on Linux), node (torchrun's GROUP_RANK), host and pid, in
every rank's memory: the lookup needs nothing from the lost node, nor the store, which may have
lived on it. `lost_peer(exc)` matches the address of a peer-loss error against the table: the
exact endpoint names the rank; else the address's IP names the node when only one node has it;
else the address itself is all that is known. A collective that timed out (a peer that hangs, or
a node that vanished without closing its sockets) names no peer.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import sys
from typing import Optional

# What a survivor's collective raises when a peer is gone: gloo's socket errors and timeouts,
# NCCL's aborted communicator and watchdog timeout.
PEER_GONE = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "Connection refused",
             "Read error", "Write error", "Timed out waiting", "timed out connecting", "connectFullMesh",
             "NCCL communicator was aborted", "Watchdog caught collective operation timeout",
             "remote process exited")
COMM_MARKS = ("gloo", "NCCL", "ProcessGroup")  # a RuntimeError from a collective names its backend
ADDRESS = re.compile(r"\[([0-9A-Fa-f.:]+)\]:(\d+)")
TCP_STATES = ("01", "0A")  # ESTABLISHED, LISTEN in /proc/net/tcp

_TABLE: list[dict] = []


def gather(group=None) -> list[dict]:
    """Collective (over `group`, a gloo group): every rank's record, kept in every rank."""
    import torch.distributed as dist

    mine = {"rank": dist.get_rank(), "node": int(os.environ.get("GROUP_RANK", "0")), "host": socket.gethostname(),
            "pid": os.getpid(), "endpoints": sorted(local_endpoints())}
    table = [None] * dist.get_world_size(group)
    dist.all_gather_object(table, mine, group=group)
    _TABLE[:] = table
    return table


def table() -> list[dict]:
    return list(_TABLE)


def local_endpoints(pid: str = "self") -> set[tuple[str, int]]:
    """(ip, port) of this process's listening and connected TCP sockets; empty off Linux."""
    try:
        inodes = {os.readlink(f"/proc/{pid}/fd/{fd}")[8:-1] for fd in os.listdir(f"/proc/{pid}/fd")
                  if _is_socket(f"/proc/{pid}/fd/{fd}")}
    except OSError:
        return set()
    found = set()
    for name in ("tcp", "tcp6"):
        try:
            lines = open(f"/proc/{pid}/net/{name}").read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] in TCP_STATES and fields[9] in inodes:
                ip, port = fields[1].split(":")
                found.add((_proc_ip(ip), int(port, 16)))
    return found


def _is_socket(path: str) -> bool:
    try:
        return os.readlink(path).startswith("socket:[")
    except OSError:
        return False


def _proc_ip(hex_ip: str) -> str:
    """/proc/net/tcp's address: 32-bit words in host byte order."""
    raw = bytes.fromhex(hex_ip)
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4)) if sys.byteorder == "little" else raw
    return _normal_ip(str(ipaddress.ip_address(words)))


def _normal_ip(ip: str) -> str:
    """An IPv4-mapped IPv6 address as plain IPv4, so both spellings compare equal."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    mapped = getattr(addr, "ipv4_mapped", None)
    return str(mapped or addr)


def is_peer_loss(exc: BaseException) -> bool:
    """A collective's failure (a RuntimeError, torch's DistError among them, naming its backend)
    that says a peer is gone or silent."""
    import torch.distributed as dist

    for e in _errors(exc):
        text = str(e)
        if isinstance(e, RuntimeError) and any(mark in text for mark in PEER_GONE) and (
                isinstance(e, getattr(dist, "DistError", ())) or any(m in text for m in COMM_MARKS)):
            return True
    return False


def _errors(exc: BaseException):
    """exc, its causes, and the per-rank failures DCP gathers into one CheckpointException."""
    for e in _chain(exc):
        yield e
        for failure in (getattr(e, "failures", None) or {}).values():
            inner = failure[0] if isinstance(failure, tuple) else failure
            if isinstance(inner, BaseException):
                yield inner


def error_text(exc: BaseException) -> str:
    return "\n".join(str(e) for e in _errors(exc))


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def lost_peer(exc: BaseException, my_rank: int, peers: Optional[list[dict]] = None) -> Optional[str]:
    """Who is gone, in words ("rank 1 (node 1, host h, pid 7)"), and the error's own reason; None
    if exc is not a peer loss."""
    if not is_peer_loss(exc):
        return None
    text = error_text(exc)
    reason = next((mark for mark in PEER_GONE if mark in text), "")
    peers = _TABLE if peers is None else peers
    for match in ADDRESS.finditer(text):
        who = name_address(_normal_ip(match.group(1)), int(match.group(2)), my_rank, peers)
        if who:
            return f"{who}: {reason}"
    if "Timed out" in reason or "Watchdog" in reason:
        return f"a collective got no answer in time ({reason}): a peer hangs or its node is gone"
    return f"a peer: {reason}"


def name_address(ip: str, port: int, my_rank: int, peers: list[dict]) -> Optional[str]:
    """The rank (or node) that owns ip:port. The port as gloo prints it is byte-swapped on
    little-endian hosts; both readings are tried, the swapped one first."""
    others = [p for p in peers if p["rank"] != my_rank]
    ports = [_swap16(port), port] if sys.byteorder == "little" else [port, _swap16(port)]
    for candidate in ports:
        owners = [p for p in others if (ip, candidate) in {tuple(e) for e in p["endpoints"]}]
        if len(owners) == 1:
            return describe_rank(owners[0], len({p["node"] for p in peers}))
    nodes = sorted({p["node"] for p in others if any(e[0] == ip for e in p["endpoints"])})
    if len(nodes) == 1:
        ranks = [p["rank"] for p in others if p["node"] == nodes[0]]
        host = next(p["host"] for p in others if p["node"] == nodes[0])
        return f"node {nodes[0]} (host {host}, ranks {_ranks(ranks)}) at {ip}"
    return f"the peer at {ip}" if peers else None


def describe_rank(peer: dict, nodes: int) -> str:
    where = f"node {peer['node']}, " if nodes > 1 else ""
    return f"rank {peer['rank']} ({where}host {peer['host']}, pid {peer['pid']})"


def _ranks(ranks: list[int]) -> str:
    return f"{ranks[0]}-{ranks[-1]}" if len(ranks) > 2 and ranks == list(range(ranks[0], ranks[-1] + 1)) \
        else ", ".join(map(str, ranks))


def _swap16(port: int) -> int:
    return ((port & 0xFF) << 8) | (port >> 8) if 0 <= port < 1 << 16 else port

