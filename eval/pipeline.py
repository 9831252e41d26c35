"""Convert -> evaluate for trained runs: the one pipeline behind recipes/compare.py and
slurm/sweep_report.py.

    if finished(run_dir):
        export = export_run(run_dir, run_dir / "export" / "final", PTQRequest("8da4w", 32))
        for kind, target in run_models(export).items():       # {bf16, ptq} or {qat}
            results = evaluate_target(target, eval_cfg, run_dir / "eval" / f"{kind}.json")

Each step is skipped when its output exists, so a rerun resumes. The convert plan decides PTQ or
QAT convert, and real or simulated; this module only reads what convert recorded (verify.json)
and evaluates the models it names (qat/convert/simulated.py loads a simulated one).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from qat import checkpoint as ckpt
from qat.atomic import write_text_atomic
from qat.config import EvalConfig
from qat.convert import PTQRequest, make_plan, run_convert
from qat.convert.plan import find_checkpoint
from qat.convert.simulated import load_simulated
from qat.distributed import pick_device
from qat.model import load_tokenizer


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


def export_run(run_dir: Path, export_dir: Path, ptq: PTQRequest, log=print, gguf: Optional[str] = None,
               formats: tuple[str, ...] = ()) -> Path:
    """Convert the run's newest checkpoint into export_dir, once (`gguf`: also gguf/, convert --gguf;
    `formats`: also model.pte)."""
    if (export_dir / "verify.json").exists():
        log(f"convert {run_dir.name}: done already")
        return export_dir
    # a .pte is lowered from the fp32 model (XNNPACK's int4 kernels take fp32 activations)
    plan = make_plan(find_checkpoint(run_dir), out=export_dir, ptq=ptq, simulate=not formats, formats=formats,
                     dtype="fp32" if "pte" in formats else "auto", gguf=gguf)
    log(f"convert {run_dir.name}: {'QAT convert' if plan.trained else 'PTQ'} {plan.scheme.describe(plan.group_size)}"
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


def heldout_texts(path: Path) -> list[str]:
    """A JSONL file's "text" rows, or a plain text file's non-empty lines."""
    lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    return [json.loads(line)["text"] for line in lines] if Path(path).suffix == ".jsonl" else lines


def evaluate_pte(kind: str, target: EvalTarget, text: Path, result_file: Path, log=print) -> dict:
    """{"bits_per_byte", "tokens", "bytes"} of `text`: from model.pte's window method in ExecuTorch's
    runtime for a quantized target; for bf16, the hf/ model in PyTorch over the .pte's windows."""
    if result_file.exists():
        return json.loads(result_file.read_text())
    import torch
    from transformers import AutoModelForCausalLM

    from qat.convert.pte import PteRunner, bits_per_byte

    export_dir = target.folder.parent
    runner = PteRunner(export_dir / "model.pte")
    tokenizer = load_tokenizer(str(export_dir / "hf"), key="--model", need_pad=True)
    logits = runner.window_logits
    if kind == "bf16":
        model = AutoModelForCausalLM.from_pretrained(export_dir / "hf", dtype=torch.float32).eval()

        def logits(ids):
            with torch.no_grad():
                return model(input_ids=ids, use_cache=False).logits
    log(f"eval {result_file.stem}: bits/byte of {text}" + (" in ExecuTorch" if kind != "bf16" else " (PyTorch)"))
    out = {**bits_per_byte(logits, tokenizer, heldout_texts(text), runner.window),
           "runtime": "pytorch" if kind == "bf16" else "executorch"}
    result_file.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(result_file, json.dumps(out, indent=2))
    return out


def export_coverage(export_dir: Path) -> Optional[dict]:
    """The share of decoder weights a QAT run fake-quantized, as convert recorded it (None for bf16)."""
    return json.loads((export_dir / "verify.json").read_text()).get("qat_coverage")


def evaluate_target(target: EvalTarget, cfg: EvalConfig, result_file: Path, log=print) -> dict:
    """lm-eval results of one model, computed once and kept in result_file."""
    if result_file.exists():
        log(f"eval {result_file.stem}: done already")
        return json.loads(result_file.read_text())["results"]
    from qat.eval.harness import evaluate  # lm-eval: imported only where something is evaluated

    log(f"eval {result_file.stem}: {target.folder}" + (" (simulated)" if target.simulated else ""))
    model, tokenizer = target.folder, None
    if target.simulated:
        model = load_simulated(target.folder, target.simulate["scheme"], target.simulate["group_size"], cfg.dtype)
        tokenizer = load_tokenizer(str(target.folder), key="--model", need_pad=True)
    limit = int(cfg.limit) if cfg.limit and cfg.limit >= 1 else cfg.limit
    results = evaluate(model, tokenizer, tasks=cfg.tasks, data_dir=Path(cfg.data_dir) if cfg.data_dir else None,
                       limit=limit, batch_size=cfg.batch_size, num_fewshot=cfg.num_fewshot,
                       device=str(pick_device(cfg.device)), dtype=cfg.dtype)
    result_file.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(result_file, json.dumps({"model": str(target.folder), "simulated": target.simulated,
                                               "scheme": target.simulate, "results": results}, indent=2))
    return results
