"""W&B side of evaluations: one eval run per model, and one comparison run with a table and charts.

compare and the sweep report both log through `log_models`: every run shares one group (the
compare folder's or the sweep's name unless set), so a dashboard filtered on the group shows the
models side by side. Summary keys are eval/<task>/<metric> everywhere (eval.metrics).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from qat.eval.metrics import METRICS, flat
from qat.config import WandbConfig
from qat.loggers import init_wandb


@dataclass
class ModelRow:
    """One evaluated model: its W&B run name, its label in the table, the columns that say what it
    is (kind, scheme, sweep parameters), and its lm-eval results."""

    run_name: str
    label: str
    columns: dict = field(default_factory=dict)
    results: dict = field(default_factory=dict)


def summary_keys(results: dict) -> dict:
    return {f"eval/{task}/{m}": v for task, row in results.items() for m, v in row.items()}


def log_models(cfg: WandbConfig, out: Path, group: str, name: str, rows: list[ModelRow], config: dict,
               image: Optional[Path] = None, summary: Optional[dict] = None) -> None:
    """An eval run per row, then the comparison run `name`: wandb.Table, a bar chart per metric,
    the plot image if any, and `summary` (e.g. the recovered shares) as summary values."""
    if not cfg.enabled:
        return
    cfg = dataclasses.replace(cfg, group=cfg.group or group)
    for r in rows:
        run = init_wandb(cfg, out, {**config, **r.columns, "model": r.label}, job_type="eval", name=r.run_name)
        if run is None:  # WANDB_MODE=disabled
            return
        run.summary.update(summary_keys(r.results))
        run.finish()
    import wandb

    run = init_wandb(cfg, out, config, job_type="compare", name=name)
    extra = sorted({k for r in rows for k in r.columns})
    table = wandb.Table(columns=["model", *extra, *(m.label for m in METRICS)],
                        data=[[r.label, *(str(r.columns.get(k, "")) for k in extra),
                               *(flat(r.results).get(m.key) for m in METRICS)] for r in rows])
    logs = {"comparison/table": table}
    for m in METRICS:
        bars = wandb.Table(columns=["model", m.label], data=[[r.label, flat(r.results).get(m.key)] for r in rows])
        logs[f"comparison/{m.task}/{m.name}"] = wandb.plot.bar(bars, "model", m.label, title=m.label)
    if image is not None and image.exists():
        logs["comparison/plot"] = wandb.Image(str(image))
    run.log(logs)
    run.summary.update(summary or {})
    run.finish()
