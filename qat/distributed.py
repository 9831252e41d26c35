"""Process group, device and mesh setup for torchrun launches (and plain `python` as world 1)."""

from __future__ import annotations

import datetime
import os

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
    (FSDP2 and DCP included). The mesh is always explicit (DESIGN.md: never rely on a default).
    """
    from torch.distributed.device_mesh import init_device_mesh

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=30))
    return init_device_mesh(device.type, (dist.get_world_size(),), mesh_dim_names=("dp",))


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
