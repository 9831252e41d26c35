"""Convert and evaluate every finished run of a sweep, then one table across all of them.

    python slurm/sweep_report.py runs/sweeps/<name> [--tasks local --data-dir assets/world/eval --limit 100]

For a QAT run, its quantized model is evaluated ("qat"). For a bf16 run, its fine-tuned model
("bf16") and its PTQ model ("ptq", --ptq-scheme) are evaluated. Where this machine lacks a
scheme's real kernels (float8 below sm 8.9, nvfp4 and mxfp4 without Blackwell), the export is
simulated and those rows say "(simulated)". This is the same convert -> evaluate pipeline as
recipes/compare.py (eval/pipeline.py). Each model also becomes a W&B run (job_type=eval) in the
sweep's group, and one run (job_type=compare) holds a wandb.Table with a row per model. Work
already done (export/, eval JSON) is skipped, so the job can be rerun.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from qat.convert import PTQRequest
from qat.eval.pipeline import evaluate_target, export_run, finished, run_models
from qat.atomic import write_text_atomic
from qat.config import EvalConfig, WandbConfig
from qat.validation import check_fields
from qat.errors import exit_on_user_error
from summarize import load_sweep, markdown_table, run_rows

REPO = Path(__file__).resolve().parents[1]


def log(msg: str) -> None:
    print(f"[sweep_report] {msg}", flush=True)


def report_runs(sweep: dict, ptq: PTQRequest, eval_cfg: EvalConfig) -> None:
    for run in sweep["runs"]:
        run_dir = Path(run["dir"])
        if not finished(run_dir):
            log(f"{run_dir.name}: training did not finish, skipped")
            continue
        export = export_run(run_dir, run_dir / "export" / "final", ptq, log=log)
        for kind, target in run_models(export).items():
            evaluate_target(target, eval_cfg, run_dir / "eval" / f"{kind}.json", log=log)


def log_wandb(sweep: dict, rows: list[dict]) -> None:
    from qat.eval.wandb_report import ModelRow, log_models

    models = []
    for r in rows:
        name = f"{Path(r['run']).name}-{r['model']}" + ("-simulated" if r["simulated"] else "")
        models.append(ModelRow(run_name=name, label=name, results=r["results"],
                               columns={"run": Path(r["run"]).name, "model": r["model"], **r["params"]}))
    log_models(WandbConfig(), Path(sweep["dir"]), sweep["name"], f"{sweep['name']}-comparison", models,
               {"sweep": sweep["name"]})


@exit_on_user_error
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep_dir", type=Path)
    p.add_argument("--tasks", default="hub", help="hub, local, or a comma list of lm-eval task names")
    p.add_argument("--data-dir", type=Path, help="folder with the local task files (--tasks local)")
    p.add_argument("--limit", type=float, help="examples per task (int) or fraction (<1)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto", help="auto (cuda if available), cuda or cpu")
    p.add_argument("--dtype", default="auto", help="auto, bfloat16, float16 or float32")
    p.add_argument("--ptq-scheme", default="8da4w", help="PTQ scheme for the sweep's bf16 runs")
    p.add_argument("--ptq-group-size", type=int, default=32, help="PTQ group size (0: per channel)")
    args = p.parse_args(argv)
    sweep = load_sweep(args.sweep_dir)
    eval_cfg = EvalConfig(tasks=args.tasks, data_dir=str(args.data_dir) if args.data_dir else None, limit=args.limit,
                          batch_size=args.batch_size, device=args.device, dtype=args.dtype)
    check_fields(eval_cfg, as_flags=True)
    report_runs(sweep, PTQRequest(args.ptq_scheme, args.ptq_group_size or None), eval_cfg)
    rows = run_rows(sweep)
    table = markdown_table(sweep, rows)
    write_text_atomic(args.sweep_dir / "sweep_report.md", table)
    write_text_atomic(args.sweep_dir / "sweep_results.json",
                      json.dumps([{k: v for k, v in r.items() if k != "results"} for r in rows], indent=2))
    print(table)
    log_wandb(sweep, [r for r in rows if r["model"] != "train"])


if __name__ == "__main__":
    main()
