"""Fixtures shared by every test: a small deterministic world, the real training entry point, and
the readers of what a run leaves behind.

    tests/unit/         one process, no entry point launched (seconds)
    tests/integration/  the real entry points, as subprocesses (torchrun, world 1 and 2) or in process
    tests/gpu/          marker `gpu`: needs a CUDA device; skipped elsewhere

Every helper a test needs is a fixture here: tests take them as arguments and import nothing from
this file.
"""

from __future__ import annotations

import atexit
import json
import os
import runpy
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest

# One tokenized-data cache per test session (qat.data.cache), never the user's ~/.cache.
if "QAT_DATA_CACHE" not in os.environ:
    os.environ["QAT_DATA_CACHE"] = tempfile.mkdtemp(prefix="qat-data-cache-")
    atexit.register(shutil.rmtree, os.environ["QAT_DATA_CACHE"], True)

# Without a GPU, the Triton kernels of the fake quantizers (qat/fq_triton.py) run on CPU tensors in
# Triton's interpreter, which must be chosen before triton is first imported.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

ROOT = Path(__file__).resolve().parents[1]

# Small enough that a torchrun launch is dominated by start-up (~10 s), big enough to learn.
TEST_WORLD = dict(n_people=40, n_docs=200, vocab_size=512, hidden=128, layers=2)


@pytest.fixture(scope="session")
def test_world_args() -> dict:
    """The tiny world's size (qat.synthetic.build.build_world arguments)."""
    return dict(TEST_WORLD)


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> Path:
    from qat.synthetic.build import build_world

    return build_world(tmp_path_factory.mktemp("world") / "world", **TEST_WORLD)


@pytest.fixture(scope="session")
def tok(world):
    """The tiny world's tokenizer."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(world / "model")


@pytest.fixture(scope="session")
def base_overrides():
    def overrides(world: Path, out: Path) -> list[str]:
        """A tiny fp32 CPU run: QA chat data plus replayed pretraining text, seq 64."""
        sources = (f"[{{path: {world}/data/finetune.jsonl, kind: chat}},"
                   f" {{path: {world}/data/pretrain.jsonl, kind: text, max_samples: 64}}]")
        return [f"output_dir={out}", f"model.path={world}/model", f"data.sources={sources}",
                "data.seq_len=64", "training.dtype=fp32", "fsdp.device=cpu", "training.steps=6",
                "training.batch_size=4", "optimizer.lr=1e-3", "scheduler.warmup_steps=2",
                "logging.progress_bar=false", "logging.wandb.enabled=false"]

    return overrides


@pytest.fixture(scope="session")
def qat_args() -> list[str]:
    """QAT at the tiny world's settings: int2 weights show the effect at this size."""
    return ["qat.enabled=true", "qat.scheme=8da2w", "qat.group_size=32"]


@pytest.fixture(scope="session")
def lora_args() -> list[str]:
    return ["lora.enabled=true", "lora.rank=8", "lora.alpha=16"]


@pytest.fixture(scope="session")
def long_b2_args() -> list[str]:
    """An interrupted world-2 run (SIGUSR1, a Slurm requeue) must match this uninterrupted one bit for bit."""
    return ["training.steps=30", "training.batch_size=2"]


@pytest.fixture(scope="session")
def env():
    def subprocess_env() -> dict:
        e = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONUNBUFFERED="1",
                 HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            e.pop(k, None)
        return e

    return subprocess_env


@pytest.fixture(scope="session")
def free_port():
    def port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    return port


@pytest.fixture(scope="session")
def train_cmd(free_port):
    def cmd(overrides: list[str], nproc: int = 1) -> list[str]:
        """The real entry point: torchrun for nproc > 1, plain python for a world of one."""
        if nproc > 1:
            launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                      "--master_port", str(free_port()), str(ROOT / "recipes" / "train.py")]
        else:
            launch = [sys.executable, str(ROOT / "recipes" / "train.py")]
        return launch + ["--config", str(ROOT / "configs" / "tiny" / "full.yaml"), *overrides]

    return cmd


@pytest.fixture(scope="session")
def run_train(train_cmd, env):
    def run(overrides: list[str], nproc: int = 1, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(train_cmd(overrides, nproc), cwd=ROOT, env=env(), capture_output=True, text=True,
                              timeout=600)
        if check and proc.returncode != 0:
            raise AssertionError(f"train failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
        return proc

    return run


@pytest.fixture(scope="session")
def recipe():
    """recipe("train").main(argv): an entry point run in this process (recipes/ holds scripts)."""
    loaded = {}

    def load(name: str) -> SimpleNamespace:
        if name not in loaded:
            loaded[name] = SimpleNamespace(**runpy.run_path(str(ROOT / "recipes" / f"{name}.py")))
        return loaded[name]

    return load


@pytest.fixture(scope="session")
def read_metrics():
    def read(run_dir: Path) -> list[dict]:
        return [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if l]

    return read


@pytest.fixture(scope="session")
def losses(read_metrics):
    def train_losses(run_dir: Path) -> list[float]:
        return [m["train/loss"] for m in read_metrics(run_dir)]

    return train_losses


@pytest.fixture(scope="session")
def straight_b2_losses(world, tmp_path_factory, run_train, base_overrides, long_b2_args, losses) -> list[float]:
    """The per-step losses of `long_b2_args` run straight through at world 2 (shared: one launch)."""
    run_dir = tmp_path_factory.mktemp("straight-b2")
    run_train(base_overrides(world, run_dir) + long_b2_args, 2)
    return losses(run_dir)


@pytest.fixture(scope="session")
def load_checkpoint_tensors():
    def load(path: Path) -> dict:
        """A DCP checkpoint consolidated into plain tensors (offline, no process group)."""
        import torch
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        out = Path(path).parent / f"{Path(path).name}.pt"
        dcp_to_torch_save(str(path), str(out))
        return torch.load(out, weights_only=False)

    return load


@pytest.fixture(scope="session")
def rel_error():
    def error(got, ref) -> float:
        """||got - ref|| / ||ref|| over all elements (L2), in float64."""
        import torch

        # float64 from the start: a list of Python floats (logged losses) must not pass through fp32
        got, ref = torch.as_tensor(got, dtype=torch.float64), torch.as_tensor(ref, dtype=torch.float64)
        return float((got - ref).norm() / ref.norm().clamp_min(1e-30))

    return error


@pytest.fixture(scope="session")
def rel_close(rel_error):
    def close(a, b, tol: float) -> bool:
        return rel_error(a, b) <= tol

    return close


@pytest.fixture(scope="session")
def convert_cli(env, free_port):
    def convert(args, check=True, nproc=1):
        """The real entry point: plain python, or torchrun (sharded convert) for nproc > 1."""
        launch = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                                                       str(nproc), "--master_port", str(free_port())]
        proc = subprocess.run([*launch, str(ROOT / "recipes/convert.py"), *map(str, args)], cwd=ROOT,
                              env=env(), capture_output=True, text=True, timeout=600)
        if check and proc.returncode != 0:
            raise AssertionError(proc.stderr[-4000:])
        return proc

    return convert


@pytest.fixture
def small_fs(tmp_path):
    """mount(size) -> a fresh tmpfs of `size` (e.g. "10m") under tmp_path: a real filesystem that fills
    up or turns read-only (remount(options)). Needs root, as CI has; unmounted afterwards."""
    import contextlib

    mounted = []

    def mount(size: str, name: str = "fs") -> Path:
        path = tmp_path / name
        path.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.strip()}")
        mounted.append(path)
        return path

    def remount(path: Path, options: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{options}", str(path)], check=True)

    yield SimpleNamespace(mount=mount, remount=remount)
    for path in mounted:
        with contextlib.suppress(Exception):
            subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.fixture(scope="session")
def eager_and_compiled():
    def run(layer, x, gy) -> list[tuple]:
        """(output, input gradient, weight gradient) of `layer` run eager, then compiled (fullgraph)."""
        import torch

        torch._dynamo.reset()
        results = []
        for fn in (layer, torch.compile(layer, fullgraph=True)):
            xi = x.clone().requires_grad_()
            layer.weight.grad = None
            y = fn(xi)
            y.backward(gy)
            results.append((y.detach(), xi.grad, layer.weight.grad.clone()))
        return results

    return run
