"""Submit a sweep: one Slurm array task per overrides line, then a dependent comparison job.

    python slurm/sweep.py --name lr-scheme --config configs/llama3_2_1b/qat.yaml \\
        --grid optimizer.lr=1e-5,2e-5 --grid qat.scheme=8da4w,intx4-weight-only \\
        --sbatch=--partition=gpu --sbatch=--time=12:00:00 --dry-run

    python slurm/sweep.py --name ranks --config configs/qwen3_8b/qat_lora.yaml --list ranks.txt

--grid key=v1,v2,... may repeat (the product is taken); --list FILE has one line of key=value
overrides per run (shell quoting). --set key=value applies to every run. Every line is validated
against the training schema before anything is submitted. The sweep folder
(<out>/<name>/) gets overrides.txt (what array task i reads from line i+1), sweep.json, and one
run folder per task; the whole sweep shares WANDB_RUN_GROUP=<name>. After the array, a job with
--dependency=afterany:<array> converts and evaluates every finished run (slurm/compare.sbatch)
and writes one comparison table. Summarise any time with `python slurm/summarize.py <sweep dir>`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shlex
import subprocess
import sys
from pathlib import Path

from qat.config import load_config
from qat.errors import UserError, exit_on_user_error

REPO = Path(__file__).resolve().parents[1]


def grid_lines(grid: list[str]) -> list[list[str]]:
    axes = []
    for g in grid:
        key, sep, values = g.partition("=")
        if not sep or not key:
            raise UserError(f"--grid {g!r}: expected key=v1,v2,...")
        vals = [v for v in values.split(",") if v != ""]
        if not vals:
            raise UserError(f"--grid {key}: no values")
        axes.append([f"{key}={v}" for v in vals])
    return [list(combo) for combo in itertools.product(*axes)] if axes else []


def list_lines(path: Path) -> list[list[str]]:
    if not path.is_file():
        raise UserError(f"--list {path}: no such file")
    lines = []
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        try:
            tokens = shlex.split(raw)
        except ValueError as e:
            raise UserError(f"{path}:{n}: does not parse ({e})") from None
        bad = [t for t in tokens if "=" not in t or t.startswith("=")]
        if bad:
            raise UserError(f"{path}:{n}: {bad[0]!r} is not key=value")
        lines.append(tokens)
    return lines


def plan(args) -> tuple[Path, list[list[str]]]:
    runs = grid_lines(args.grid) + (list_lines(Path(args.list)) if args.list else [])
    if not runs:
        raise UserError("the sweep is empty: give --grid key=v1,v2 and/or --list FILE")
    sweep_dir = Path(args.out).resolve() / args.name
    planned = []
    for i, overrides in enumerate(runs):
        line = list(args.set) + overrides + [f"output_dir={sweep_dir / f'run-{i:03d}'}"]
        try:
            load_config(args.config, line)
        except UserError as e:
            raise UserError(f"sweep run {i} ({' '.join(overrides)}): {e}") from None
        planned.append(line)
    return sweep_dir, planned


def sbatch(cmd: list[str], dry_run: bool) -> str:
    print("+ " + " ".join(shlex.quote(c) for c in cmd))
    if dry_run:
        return "<dry-run>"
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        msg = "; ".join(l.strip() for l in proc.stderr.strip().splitlines()) or f"exit {proc.returncode}"
        raise UserError(f"sbatch rejected the job: {msg}")
    return proc.stdout.strip().split(";")[0]


def write_sweep(sweep_dir: Path, args, lines: list[list[str]]) -> Path:
    sweep_dir.mkdir(parents=True, exist_ok=True)
    f = sweep_dir / "overrides.txt"
    f.write_text("".join(" ".join(shlex.quote(t) for t in line) + "\n" for line in lines))
    meta = {"name": args.name, "config": str(Path(args.config).resolve()), "grid": args.grid,
            "set": args.set, "runs": [{"index": i, "overrides": line[len(args.set):-1],
                                       "dir": line[-1].split("=", 1)[1]} for i, line in enumerate(lines)]}
    (sweep_dir / "sweep.json").write_text(json.dumps(meta, indent=2))
    return f


def submit(sweep_dir: Path, overrides_file: Path, args, n: int) -> tuple[str, str]:
    env = ",".join([f"ALL,SWEEP_FILE={overrides_file}", f"SWEEP_CONFIG={Path(args.config).resolve()}",
                    f"WANDB_RUN_GROUP={args.name}", f"REPO={REPO}", f"PY={sys.executable}"])
    common = [f"--chdir={REPO}", f"--export={env}", *args.sbatch]
    array = ["sbatch", "--parsable", f"--job-name={args.name}", f"--array=0-{n - 1}",
             f"--output={sweep_dir}/slurm-%A_%a.out", *common, str(REPO / "slurm/train.sbatch")]
    job = sbatch(array, args.dry_run)
    if args.no_compare:
        return job, ""
    cmp = ["sbatch", "--parsable", f"--job-name={args.name}-compare", f"--dependency=afterany:{job}",
           f"--output={sweep_dir}/slurm-compare-%j.out", *common, *args.compare_sbatch,
           str(REPO / "slurm/compare.sbatch"), str(sweep_dir), *args.eval_args]
    return job, sbatch(cmp, args.dry_run)


@exit_on_user_error
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True, help="sweep name: folder, Slurm job name and W&B group")
    p.add_argument("--config", required=True, help="base training YAML")
    p.add_argument("--grid", action="append", default=[], help="key=v1,v2,... (repeatable; product)")
    p.add_argument("--list", help="file with one line of key=value overrides per run")
    p.add_argument("--set", action="append", default=[], help="key=value for every run (repeatable)")
    p.add_argument("--out", default="runs/sweeps", help="parent of the sweep folder")
    p.add_argument("--sbatch", action="append", default=[], help="extra sbatch option for the array, "
                   "e.g. --sbatch=--partition=gpu (repeatable)")
    p.add_argument("--compare-sbatch", action="append", default=[], help="extra sbatch option for the comparison job")
    p.add_argument("--eval-args", nargs=argparse.REMAINDER, default=[],
                   help="everything after this goes to slurm/sweep_report.py (e.g. --tasks local --limit 100)")
    p.add_argument("--no-compare", action="store_true", help="do not submit the dependent comparison job")
    p.add_argument("--dry-run", action="store_true", help="validate and print what would be submitted")
    args = p.parse_args(argv)
    if not Path(args.config).is_file():
        raise UserError(f"--config {args.config}: no such file")
    sweep_dir, lines = plan(args)
    overrides_file = write_sweep(sweep_dir, args, lines) if not args.dry_run else sweep_dir / "overrides.txt"
    if args.dry_run:
        for i, line in enumerate(lines):
            print(f"[{i}] " + " ".join(shlex.quote(t) for t in line))
    job, cmp = submit(sweep_dir, overrides_file, args, len(lines))
    print(f"sweep {args.name}: {len(lines)} runs in {sweep_dir}; array job {job}" + (f", comparison job {cmp}" if cmp else ""))


if __name__ == "__main__":
    main()
