"""W&B side of the comparison: one eval run per model, and one run with the table and charts.

All runs share one group (the compare output folder's name unless set), so a dashboard filtered
on the group shows the arms side by side. Summary keys are eval/<task>/<metric> everywhere.
"""

from __future__ import annotations

from pathlib import Path

from eval.report import METRICS, MODELS, labels, rows, value
from qat.config import WandbConfig
from qat.metrics import init_wandb


def summary_keys(results: dict) -> dict:
    return {f"eval/{task}/{m}": v for task, row in results.items() for m, v in row.items()}


def log_comparison(cfg: WandbConfig, out: Path, kind: str, results: dict, header: dict,
                   simulated: bool = False) -> None:
    if not cfg.enabled:
        return
    import dataclasses

    group = cfg.group or out.name
    cfg = dataclasses.replace(cfg, group=group)
    names = labels(simulated)
    for model in MODELS:
        sim = "-simulated" if simulated and model != "bf16" else ""
        run = init_wandb(cfg, out, {"model": names[model], "kind": kind, **header}, job_type="eval",
                         name=f"{out.name}-{kind}-{model}{sim}")
        if run is None:
            return
        run.summary.update(summary_keys(results.get(model, {})))
        run.finish()
    run = init_wandb(cfg, out, {"kind": kind, **header}, job_type="compare", name=f"{out.name}-{kind}-comparison")
    import wandb

    columns = ["model", "scheme"] + [m.label for m in METRICS]
    table = wandb.Table(columns=columns,
                        data=[[names[k], header.get("scheme", "")] + [value(results, k, m) for m in METRICS]
                              for k in MODELS])
    logs = {"comparison/table": table}
    for m in METRICS:
        bars = wandb.Table(columns=["model", m.label],
                           data=[[k, value(results, k, m)] for k in MODELS])
        logs[f"comparison/{m.task}/{m.name}"] = wandb.plot.bar(bars, "model", m.label, title=m.label)
    suffix = "" if kind == "full" else "_lora"
    png = out / f"comparison{suffix}.png"
    if png.exists():
        logs["comparison/plot"] = wandb.Image(str(png))
    run.log(logs)
    for label, vals in rows(results, simulated).items():
        for metric, v in vals.items():
            if v is not None:
                run.summary[f"compare/{label}/{metric}"] = v
    run.finish()
