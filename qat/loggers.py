"""Rank-0 logging: a metrics JSONL file in the run folder, and W&B.

W&B runs offline unless an API key is configured (WANDB_API_KEY, or a netrc login) or the user
set WANDB_MODE. We set WANDB_MODE=offline in the environment ourselves: `mode="offline"` passed
alone still does a DNS lookup. Upload later with `wandb sync <run dir>/wandb/offline-run-*`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from qat.config import WandbConfig
from qat.iofaults import writing

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
    with writing(run_dir / "wandb", "the W&B run files"):
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
        self._file = None
        if run_dir is not None:
            with writing(run_dir / "metrics.jsonl", "the metrics log"):
                self._file = open(run_dir / "metrics.jsonl", "a")

    @classmethod
    def for_training(cls, run_dir: Path, wandb_cfg: WandbConfig, config: dict, summary: dict) -> "MetricLogger":
        """Rank 0 of a training run: metrics.jsonl in run_dir, and a W&B run named after it."""
        logger = cls(run_dir, init_wandb(wandb_cfg, run_dir, config, job_type="train", name=run_dir.name))
        logger.summary(summary)
        return logger

    def log(self, step: int, metrics: dict) -> None:
        if self._file is not None:
            with writing(self.run_dir / "metrics.jsonl", "the metrics log"):
                self._file.write(json.dumps({"step": step, **metrics}) + "\n")
                self._file.flush()
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def summary(self, values: dict) -> None:
        if self.wandb is not None:
            self.wandb.summary.update(values)

    def close(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError:  # the write that failed already said why; closing must not hide it
                pass
        if self.wandb is not None:
            self.wandb.finish()
