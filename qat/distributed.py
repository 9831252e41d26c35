"""Process group, device and mesh setup for torchrun launches (and plain `python` as world 1).

Timeouts: a collective whose peers do not arrive fails after the process group's timeout. That
is what stops the survivors of a node that vanished without closing its sockets, and of any lost
peer on NCCL, which does not notice a dead peer by itself. Two values (`distributed` section of
the config): `setup_timeout_s` while waits legitimately take long (rank 0 loading the weights the
others receive, a data cache being built on one node, the first steps with a cold torch.compile,
a checkpoint save), and `timeout_s` for the steady steps in between (`steady_timeouts()`).
"""

from __future__ import annotations

import datetime
import os
from typing import Optional

import torch
import torch.distributed as dist

from qat.errors import UserError


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UserError("fsdp.device=cuda but no CUDA device is visible")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


SETUP_TIMEOUT_S = 3600  # the `distributed` config's defaults (qat/config.py), for entry points without it
TIMEOUT_S = 300


def init_distributed(device: torch.device, setup_timeout_s: float = SETUP_TIMEOUT_S):
    """Init the default process group (NCCL on CUDA, gloo on CPU) and a 1-D data-parallel mesh,
    with the set-up timeout; then every rank's network endpoints are gathered (qat/peers.py).

    Without torchrun's variables this is a world of one, so every run takes the same code path
    (FSDP2 and DCP included). The mesh is always explicit: FSDP2 and DCP never fall back to a default one.
    """
    from torch.distributed.device_mesh import init_device_mesh

    from qat import peers

    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=setup_timeout_s)
        if "RANK" in os.environ:  # torchrun (or srun with the same variables)
            store = _generation_store(timeout)
            if store is None:
                dist.init_process_group(backend, timeout=timeout)
            else:
                dist.init_process_group(backend, store=store, rank=int(os.environ["RANK"]),
                                        world_size=int(os.environ["WORLD_SIZE"]), timeout=timeout)
        else:  # a world of one, without touching the caller's environment
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}",
                                    rank=0, world_size=1, timeout=timeout)
    global _CONTROL
    # collective: every rank creates it at the same point, right after the default group
    _CONTROL = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=setup_timeout_s)) \
        if dist.get_backend() != "gloo" else dist.group.WORLD
    mesh = init_device_mesh(device.type, (dist.get_world_size(),), mesh_dim_names=("dp",))
    if dist.get_world_size() > 1:
        peers.gather(_CONTROL)  # after every group exists: their sockets are the endpoints
    return mesh


_CONTROL = None
_GENERATION = 0  # rank 0: which generation of workers of this torchrun job this is (1: the first)


def _generation_store(timeout: datetime.timedelta):
    """Under torchrun's shared store (the agent hosts it, TORCHELASTIC_USE_AGENT_STORE), a client
    whose keys carry this worker generation's rendezvous round, or None (torch's env:// then).

    The agent's store outlives a generation of workers: after a restart (`--max-restarts`) the
    keys the previous process group wrote are still there, and the new ranks would read the dead
    ranks' addresses (gloo's connectFullMesh times out; NCCL's unique id is stale).
    TORCHELASTIC_RESTART_COUNT cannot tell generations apart: each agent counts its own restarts,
    and an agent whose workers stopped for another node's restart does not count it. The
    rendezvous round is the same on every node (qat/torchrun_errors.py exports it)."""
    from qat.torchrun_errors import ROUND_ENV

    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or ROUND_ENV not in os.environ:
        return None
    global _GENERATION
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                          world_size=int(os.environ["WORLD_SIZE"]), is_master=False, timeout=timeout)
    if os.environ["RANK"] == "0":  # outside the prefix: counts the generations of this job
        _GENERATION = store.add("qat/worker_generations", 1)
    return dist.PrefixStore(f"qat/round-{os.environ[ROUND_ENV]}/", store)


def restarted() -> bool:
    """Rank 0: whether an earlier generation of this job's workers ran (torchrun restarted them).
    Its training continues from the newest checkpoint rather than starting fresh."""
    return _GENERATION > 1 or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0


def set_timeout(seconds: float) -> None:
    """Every group's collective timeout from now on (the default group and the control group).
    `_set_pg_timeout` is torch's own (private) switch; where it is missing the set-up timeout stays."""
    from torch.distributed import distributed_c10d

    setter = getattr(distributed_c10d, "_set_pg_timeout", None)
    if setter is None or not dist.is_initialized() or dist.get_world_size() == 1:
        return
    for group in {dist.group.WORLD, _CONTROL} - {None}:
        setter(datetime.timedelta(seconds=seconds), group)


def control_group():
    """A gloo (CPU) group for small agreements between ranks, such as a stop request, that must not
    wait for the device: on NCCL, reading a reduced value would wait for every queued kernel."""
    return _CONTROL


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def decide_on_rank0(fn, *args):
    """Call fn on rank 0 alone and return its result on every rank.

    For decisions that must be taken once (the run lock, the checkpoint to resume): if every rank
    looked for itself, two ranks could see a folder at different instants and decide differently.
    A UserError raised by fn is raised on every rank, so rank 0 prints one line and all exit 2.
    """
    box = [None]
    if dist.get_rank() == 0:
        try:
            box = [("ok", fn(*args))]
        except UserError as e:
            box = [("error", str(e))]
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise UserError(value)
    return value


def raise_together(error, device: torch.device) -> None:
    """Raise on every rank if any rank holds a UserError: the lowest such rank's line, the same on
    all, so that no rank waits in a collective for one that has stopped. Collective (one all-reduce)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        if error is not None:
            raise error
        return
    (failed,) = all_reduce_sum([float(error is not None)], device)
    if failed:
        lines = [None] * dist.get_world_size()
        dist.all_gather_object(lines, None if error is None else str(error))
        raise UserError(next(line for line in lines if line is not None))


def shared_run_id() -> Optional[str]:
    """A fresh id, the same on every rank (drawn by rank 0); None without a process group."""
    import uuid

    return decide_on_rank0(lambda: uuid.uuid4().hex) if dist.is_available() and dist.is_initialized() else None


class Timeouts:
    """The collective timeout in force: `setup_s` for set-up, a step that compiles or switches fake
    quantization on, and a checkpoint save; `steady_s` for a steady step (docs/hardening.md says why)."""

    def __init__(self, setup_s: float, steady_s: float):
        self.setup_s, self.steady_s, self.now = setup_s, steady_s, setup_s  # init_distributed set setup_s

    def use(self, long: bool) -> None:
        want = self.setup_s if long else self.steady_s
        if want != self.now:
            set_timeout(want)
            self.now = want
