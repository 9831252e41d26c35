"""Convert and evaluate every finished run of a sweep, then one table across all of them.

    python -m slurm.sweep_report runs/sweeps/<name> [--tasks local --data-dir assets/world/eval --limit 100]

For a QAT run, its quantized model is evaluated ("qat"). For a bf16 run, its fine-tuned model
("bf16") and its PTQ model ("ptq", --ptq-scheme) are evaluated. Each model also becomes a W&B
run (job_type=eval) in the sweep's group, and one run (job_type=compare) holds a wandb.Table
with a row per model: run, model kind, the sweep parameters and every metric, plus bar charts.
Work already done (export/, eval JSON) is skipped, so the job can be rerun.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from qat.atomic import write_text_atomic
from qat.errors import UserError, exit_on_user_error
from slurm.summarize import load_sweep, markdown_table, run_rows

REPO = Path(__file__).resolve().parents[1]


def export_run(run_dir: Path, ptq_scheme: str) -> Path:
    export = run_dir / "export" / "final"
    if not (export / "verify.json").exists():
        meta_qat = _trained_qat(run_dir)
        cmd = [sys.executable, str(REPO / "recipes/convert.py"), "--checkpoint", str(run_dir), "--out", str(export)]
        if meta_qat is None:
            cmd += ["--scheme", ptq_scheme]
        if subprocess.run(cmd).returncode != 0:
            raise UserError(f"convert failed for {run_dir}")
    return export


def _trained_qat(run_dir: Path):
    from qat import checkpoint as ckpt

    found = ckpt.list_checkpoints(run_dir / "checkpoints")
    return ckpt.read_meta(found[-1]).get("qat") if found else None


def evaluate_run(run_dir: Path, export: Path, args) -> dict:
    from eval.harness import evaluate

    models = {"qat": export / "quantized"} if _trained_qat(run_dir) else {"bf16": export / "hf", "ptq": export / "quantized"}
    out = {}
    for kind, folder in models.items():
        f = run_dir / "eval" / f"{kind}.json"
        if not f.exists():
            res = evaluate(folder, tasks=args.tasks, data_dir=args.data_dir, limit=args.limit,
                           batch_size=args.batch_size, device=args.device, dtype=args.dtype)
            f.parent.mkdir(exist_ok=True)
            write_text_atomic(f, json.dumps({"model": str(folder), "results": res}, indent=2))
        out[kind] = json.loads(f.read_text())["results"]
    return out


def log_wandb(sweep: dict, rows: list[dict]) -> None:
    from qat.config import WandbConfig
    from qat.metrics import init_wandb

    cfg = WandbConfig(group=sweep["name"])
    sweep_dir = Path(sweep["dir"])
    for r in rows:
        run = init_wandb(cfg, sweep_dir, {"run": r["run"], "model": r["model"], **r["params"]}, job_type="eval",
                         name=f"{Path(r['run']).name}-{r['model']}")
        if run is None:
            return
        run.summary.update({k: v for k, v in r.items() if k.startswith("eval/")})
        run.finish()
    import wandb

    metrics = sorted({k for r in rows for k in r if k.startswith("eval/")})
    params = sorted({k for r in rows for k in r["params"]})
    run = init_wandb(cfg, sweep_dir, {"sweep": sweep["name"]}, job_type="compare", name=f"{sweep['name']}-comparison")
    table = wandb.Table(columns=["run", "model", *params, *metrics],
                        data=[[Path(r["run"]).name, r["model"], *[str(r["params"].get(p)) for p in params],
                               *[r.get(m) for m in metrics]] for r in rows])
    logs = {"comparison/table": table}
    for m in metrics:
        bars = wandb.Table(columns=["model", m], data=[[f"{Path(r['run']).name}-{r['model']}", r.get(m)] for r in rows])
        logs[f"comparison/{m}"] = wandb.plot.bar(bars, "model", m, title=m)
    run.log(logs)
    run.finish()


@exit_on_user_error
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep_dir", type=Path)
    p.add_argument("--tasks", default="hub")
    p.add_argument("--data-dir", type=Path)
    p.add_argument("--limit", type=int)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--ptq-scheme", default="8da4w", help="PTQ scheme for the sweep's bf16 runs")
    args = p.parse_args(argv)
    if args.device == "auto":
        import torch
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    sweep = load_sweep(args.sweep_dir)
    for run in sweep["runs"]:
        run_dir = Path(run["dir"])
        if not (run_dir / ".train-done").exists():
            print(f"[sweep_report] {run_dir.name}: training did not finish, skipped", flush=True)
            continue
        evaluate_run(run_dir, export_run(run_dir, args.ptq_scheme), args)
    rows = run_rows(sweep)
    table = markdown_table(sweep, rows)
    (args.sweep_dir / "sweep_report.md").write_text(table)
    (args.sweep_dir / "sweep_results.json").write_text(json.dumps(rows, indent=2))
    print(table)
    log_wandb(sweep, [r for r in rows if r["model"] != "train"])


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
