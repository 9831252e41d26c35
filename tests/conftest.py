"""Shared fixtures: a small deterministic world, and a runner for the real training entry point."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

# One tokenized-data cache per test session (qat.data.cache), never the user's ~/.cache.
if "QAT_DATA_CACHE" not in os.environ:
    os.environ["QAT_DATA_CACHE"] = tempfile.mkdtemp(prefix="qat-data-cache-")
    atexit.register(shutil.rmtree, os.environ["QAT_DATA_CACHE"], True)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Small enough that a torchrun launch is dominated by start-up (~10 s), big enough to learn.
TEST_WORLD = dict(n_people=40, n_docs=200, vocab_size=512, hidden=128, layers=2)


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> Path:
    from qat.synthetic.build import build_world

    return build_world(tmp_path_factory.mktemp("world") / "world", **TEST_WORLD)


def base_overrides(world: Path, out: Path) -> list[str]:
    """A tiny fp32 CPU run: QA chat data plus replayed pretraining text, seq 64."""
    sources = (f"[{{path: {world}/data/finetune.jsonl, kind: chat}},"
               f" {{path: {world}/data/pretrain.jsonl, kind: text, max_samples: 64}}]")
    return [f"output_dir={out}", f"model.path={world}/model", f"data.sources={sources}",
            "data.seq_len=64", "training.dtype=fp32", "fsdp.device=cpu", "training.steps=6",
            "training.batch_size=4", "optimizer.lr=1e-3", "scheduler.warmup_steps=2",
            "logging.progress_bar=false", "logging.wandb.enabled=false"]


# An interrupted world-2 run (SIGUSR1, a Slurm requeue) must match this uninterrupted one bit for bit.
LONG_B2 = ["training.steps=30", "training.batch_size=2"]


@pytest.fixture(scope="session")
def straight_b2_losses(world, tmp_path_factory) -> list[float]:
    """The per-step losses of `LONG_B2` run straight through at world 2 (shared: one launch)."""
    run_dir = tmp_path_factory.mktemp("straight-b2")
    run_train(base_overrides(world, run_dir) + LONG_B2, 2)
    return losses(run_dir)


def env() -> dict:
    e = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONUNBUFFERED="1",
             HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    return e


def train_cmd(overrides: list[str], nproc: int = 1) -> list[str]:
    """The real entry point: torchrun for nproc > 1, plain python for a world of one."""
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(_free_port()), str(ROOT / "recipes" / "train.py")]
    else:
        cmd = [sys.executable, str(ROOT / "recipes" / "train.py")]
    return cmd + ["--config", str(ROOT / "configs" / "tiny" / "full.yaml"), *overrides]


def run_train(overrides: list[str], nproc: int = 1, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(train_cmd(overrides, nproc), cwd=ROOT, env=env(), capture_output=True, text=True,
                          timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"train failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if l]


def losses(run_dir: Path) -> list[float]:
    return [m["train/loss"] for m in read_metrics(run_dir)]


def load_checkpoint_tensors(path: Path) -> dict:
    """A DCP checkpoint consolidated into plain tensors (offline, no process group)."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = Path(path).parent / f"{Path(path).name}.pt"
    dcp_to_torch_save(str(path), str(out))
    return torch.load(out, weights_only=False)
