"""Summarise a sweep from its run folders alone (no W&B account needed).

    python slurm/summarize.py runs/sweeps/<name> [--sort eval/wikitext/bits_per_byte]

One row per model of each run: the run's sweep parameters, its training status and final loss,
and every evaluation metric found in <run>/eval/*.json (written by slurm/sweep_report.py); a model
evaluated simulated (no real kernels for its scheme) says so. Rows are sorted by --sort
(ascending; metrics where higher is better, eval.metrics, sort descending).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from qat.eval.metrics import flat, higher_is_better
from qat import checkpoint as ckpt
from qat.errors import UserError, exit_on_user_error


def load_sweep(sweep_dir: Path) -> dict:
    f = Path(sweep_dir) / "sweep.json"
    if not f.is_file():
        raise UserError(f"{sweep_dir} is not a sweep folder (no sweep.json)")
    sweep = json.loads(f.read_text())
    sweep["dir"] = str(Path(sweep_dir).resolve())
    return sweep


def status(run_dir: Path) -> str:
    if ckpt.read_done(run_dir) is not None:  # the recipe's own completion record
        return "done"
    if (run_dir / ".exit-status").exists():
        return f"failed ({(run_dir / '.exit-status').read_text().strip()})"
    return "running" if (run_dir / "metrics.jsonl").exists() else "pending"


def train_summary(run_dir: Path) -> dict:
    f = run_dir / "metrics.jsonl"
    if not f.exists():
        return {}
    lines = [json.loads(l) for l in f.read_text().splitlines() if l]
    return {"steps": lines[-1]["step"], "train/final_loss": lines[-1]["train/loss"]} if lines else {}


def run_rows(sweep: dict) -> list[dict]:
    rows = []
    for run in sweep["runs"]:
        run_dir = Path(run["dir"])
        params = dict(o.split("=", 1) for o in run["overrides"])
        base = {"run": str(run_dir), "params": params, "status": status(run_dir), **train_summary(run_dir)}
        evals = sorted((run_dir / "eval").glob("*.json")) if (run_dir / "eval").is_dir() else []
        if not evals:
            rows.append({**base, "model": "train"})
        for f in evals:
            record = json.loads(f.read_text())
            rows.append({**base, "model": f.stem, "simulated": bool(record.get("simulated")),
                         "results": record["results"], **flat(record["results"])})
    return rows


def sort_rows(rows: list[dict], key: str) -> list[dict]:
    desc = higher_is_better(key)
    present = [r for r in rows if r.get(key) is not None]
    missing = [r for r in rows if r.get(key) is None]
    return sorted(present, key=lambda r: r[key], reverse=desc) + missing


def markdown_table(sweep: dict, rows: list[dict], sort: str | None = None) -> str:
    params = sorted({k for r in rows for k in r["params"]})
    metrics = sorted({k for r in rows for k in r if k.startswith("eval/")})
    cols = ["run", "model", *params, "status", "steps", "train/final_loss", *metrics]
    if sort is None:  # held-out bits/byte once evaluated, else the training loss
        sort = "eval/wikitext/bits_per_byte" if any("eval/wikitext/bits_per_byte" in r for r in rows) else "train/final_loss"
    key = sort
    lines = [f"# sweep {sweep['name']} (sorted by {key})", "", "| " + " | ".join(cols) + " |",
             "|" + "---|" * len(cols)]
    for r in sort_rows(rows, key):
        model = r["model"] + (" (simulated)" if r.get("simulated") else "")
        vals = [Path(r["run"]).name, model, *[r["params"].get(p, "") for p in params], r["status"],
                r.get("steps", ""), r.get("train/final_loss"), *[r.get(m) for m in metrics]]
        lines.append("| " + " | ".join(f"{v:.4f}" if isinstance(v, float) else str("" if v is None else v)
                                       for v in vals) + " |")
    return "\n".join(lines) + "\n"


@exit_on_user_error
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep_dir", type=Path)
    p.add_argument("--sort", help="column to sort by (default: eval/wikitext/bits_per_byte, else train/final_loss)")
    a = p.parse_args(argv)
    sweep = load_sweep(a.sweep_dir)
    print(markdown_table(sweep, run_rows(sweep), a.sort))


if __name__ == "__main__":
    main()
