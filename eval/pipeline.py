"""Convert -> evaluate for trained runs: the one pipeline behind recipes/compare.py and
slurm/sweep_report.py.

    if finished(run_dir):
        export = export_run(run_dir, run_dir / "export" / "final", PTQRequest("8da4w", 32))
        for kind, target in run_models(export).items():       # {bf16, ptq} or {qat}
            results = evaluate_target(target, eval_cfg, run_dir / "eval" / f"{kind}.json")

Each step is skipped when its output exists, so a rerun resumes. Where this machine lacks the
scheme's real kernels, convert writes a simulated export and the evaluation applies the scheme's
fake quantization to hf/; every result of such a model is labelled simulated.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from qat import checkpoint as ckpt
from qat.atomic import write_text_atomic
from qat.config import EvalConfig


@dataclass(frozen=True)
class PTQRequest:
    """The post-training quantization applied to bf16 runs (QAT runs use their own scheme)."""

    scheme: str = "8da4w"
    group_size: Optional[int] = 32  # None: per output channel


@dataclass(frozen=True)
class EvalTarget:
    """A model folder to evaluate, and the scheme record to fake-quantize it with when simulated."""

    folder: Path
    simulate: Optional[dict] = None

    @property
    def simulated(self) -> bool:
        return self.simulate is not None


def finished(run_dir: Path) -> bool:
    """Training wrote its completion record (recipes/train.py, at the last step)."""
    return ckpt.read_done(run_dir) is not None


def export_run(run_dir: Path, export_dir: Path, ptq: PTQRequest, log=print) -> Path:
    """Convert the run's newest checkpoint into export_dir, once."""
    from qat.convert import make_plan, run_convert
    from qat.convert.plan import find_checkpoint

    if (export_dir / "verify.json").exists():
        log(f"convert {run_dir.name}: done already")
        return export_dir
    path = find_checkpoint(run_dir)
    trained = ckpt.read_meta(path).get("qat") is not None
    plan = make_plan(path, out=export_dir, scheme=None if trained else ptq.scheme,
                     group_size=None if trained else ptq.group_size,
                     per_channel=not trained and ptq.group_size is None, simulate=True)
    log(f"convert {run_dir.name}: {'QAT convert' if trained else 'PTQ'} {plan.scheme.describe(plan.group_size)}"
        + (" (simulated: no real kernels here)" if plan.quantize == "simulated" else ""))
    run_convert(plan)
    return export_dir


def run_models(export_dir: Path) -> dict[str, EvalTarget]:
    """What to evaluate from an export: {bf16, ptq} for a bf16 run, {qat} for a QAT run."""
    report = json.loads((export_dir / "verify.json").read_text())
    quant = EvalTarget(export_dir / "quantized")
    if report["mode"] == "simulated":
        quant = EvalTarget(export_dir / "hf", json.loads((export_dir / "simulated.json").read_text()))
    if report["training"] == "qat":
        return {"qat": quant}
    return {"bf16": EvalTarget(export_dir / "hf"), "ptq": quant}


def qat_coverage(export_dir: Path) -> Optional[dict]:
    """The share of decoder weights a QAT run fake-quantized, as convert recorded it (None for bf16)."""
    return json.loads((export_dir / "verify.json").read_text()).get("qat_coverage")


def evaluate_target(target: EvalTarget, cfg: EvalConfig, result_file: Path, log=print) -> dict:
    """lm-eval results of one model, computed once and kept in result_file."""
    if result_file.exists():
        log(f"eval {result_file.stem}: done already")
        return json.loads(result_file.read_text())["results"]
    from eval.harness import evaluate, simulated_model
    from qat.distributed import pick_device

    log(f"eval {result_file.stem}: {target.folder}" + (" (simulated)" if target.simulated else ""))
    model, tokenizer = target.folder, None
    if target.simulated:
        model, tokenizer = simulated_model(target.folder, target.simulate["scheme"], target.simulate["group_size"],
                                           cfg.dtype)
    limit = int(cfg.limit) if cfg.limit and cfg.limit >= 1 else cfg.limit
    results = evaluate(model, tokenizer, tasks=cfg.tasks, data_dir=Path(cfg.data_dir) if cfg.data_dir else None,
                       limit=limit, batch_size=cfg.batch_size, num_fewshot=cfg.num_fewshot,
                       device=str(pick_device(cfg.device)), dtype=cfg.dtype)
    result_file.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(result_file, json.dumps({"model": str(target.folder), "simulated": target.simulated,
                                               "scheme": target.simulate, "results": results}, indent=2))
    return results
