"""Rank-0 logging: a tqdm bar, a metrics JSONL file in the run folder, and W&B.

W&B runs offline unless an API key is configured (WANDB_API_KEY, or a netrc login) or the user
set WANDB_MODE. We set WANDB_MODE=offline in the environment ourselves: `mode="offline"` passed
alone still does a DNS lookup. Upload later with `wandb sync <run dir>/wandb/offline-run-*`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch

from qat.config import WandbConfig

# Spec-sheet dense bf16 peak FLOP/s by device-name substring: the one table behind every MFU we
# report (training log, bench/bench_train.py). Unknown devices report no MFU.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "B200": 2250e12, "L40S": 362e12}


def peak_rss_mib() -> int:
    """This process's peak resident host memory (Linux reports ru_maxrss in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024


def device_peak_flops(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def flops_per_token(matmul_params: int, layers: int, hidden: int, seq_len: int, lora: bool) -> float:
    """Training FLOPs per token (PaLM appendix B): 2N forward, 2N input-grad, 2N weight-grad
    (skipped for frozen weights under LoRA), plus attention scores 12 * layers * hidden * seq."""
    return (4 if lora else 6) * matmul_params + 12 * layers * hidden * seq_len


def mfu(tokens_per_s: float, flops_per_tok: float, peak_flops_per_device: float, devices: int) -> float:
    """Model FLOPs utilization: achieved model FLOP/s over the peak of all devices of the job."""
    return tokens_per_s * flops_per_tok / (peak_flops_per_device * devices)


def wandb_mode() -> str:
    """Offline by default: online only when the user configured a key or asked explicitly."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    has_key = bool(os.environ.get("WANDB_API_KEY")) or _netrc_has_wandb()
    return "online" if has_key else "offline"


def _netrc_has_wandb() -> bool:
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


def init_wandb(cfg: WandbConfig, run_dir: Path, config: dict, job_type: str, name: Optional[str] = None):
    """A W&B run or None. `WANDB_*` variables (project, entity, group, name) override the config."""
    if not cfg.enabled or os.environ.get("WANDB_MODE") == "disabled":
        return None
    import wandb

    os.environ["WANDB_MODE"] = wandb_mode()
    os.environ.setdefault("WANDB_SILENT", "true")
    return wandb.init(
        project=os.environ.get("WANDB_PROJECT", cfg.project),
        entity=os.environ.get("WANDB_ENTITY", cfg.entity),
        group=os.environ.get("WANDB_RUN_GROUP", cfg.group),
        name=os.environ.get("WANDB_NAME", cfg.name or name),
        tags=list(cfg.tags), job_type=job_type, dir=str(run_dir), config=config,
        resume="allow", id=_run_id(run_dir, f"{job_type}_{name or 'run'}"))


def _run_id(run_dir: Path, key: str) -> str:
    """A stable id per run folder and key, so a resumed or requeued job continues the same W&B run."""
    path = run_dir / f".wandb_id_{key}"
    if path.exists():
        return path.read_text().strip()
    import secrets
    import string

    rid = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    path.write_text(rid)
    return rid


class MetricLogger:
    """Writes each metrics dict to JSONL and W&B; only rank 0 constructs one with a run folder."""

    def __init__(self, run_dir: Optional[Path], wandb_run=None):
        self.run_dir, self.wandb = run_dir, wandb_run
        self._file = open(run_dir / "metrics.jsonl", "a") if run_dir is not None else None

    def log(self, step: int, metrics: dict) -> None:
        if self._file is not None:
            self._file.write(json.dumps({"step": step, **metrics}) + "\n")
            self._file.flush()
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def summary(self, values: dict) -> None:
        if self.wandb is not None:
            self.wandb.summary.update(values)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self.wandb is not None:
            self.wandb.finish()
