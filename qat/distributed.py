"""Process group, device and mesh setup for torchrun launches (and plain `python` as world 1)."""

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


def init_distributed(device: torch.device):
    """Init the default process group (NCCL on CUDA, gloo on CPU) and a 1-D data-parallel mesh.

    Without torchrun's variables this is a world of one, so every run takes the same code path
    (FSDP2 and DCP included). The mesh is always explicit: FSDP2 and DCP never fall back to a default one.
    """
    from torch.distributed.device_mesh import init_device_mesh

    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = datetime.timedelta(minutes=30)
        if "RANK" in os.environ:  # torchrun (or srun with the same variables)
            dist.init_process_group(backend, timeout=timeout)
        else:  # a world of one, without touching the caller's environment
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}",
                                    rank=0, world_size=1, timeout=timeout)
    global _CONTROL
    # collective: every rank creates it at the same point, right after the default group
    _CONTROL = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
    return init_device_mesh(device.type, (dist.get_world_size(),), mesh_dim_names=("dp",))


_CONTROL = None


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
