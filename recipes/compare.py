"""The main job: fine-tune bf16 and QAT arms, convert, evaluate bf16 / PTQ / QAT, report.

    python recipes/compare.py --config configs/llama3_2_1b/compare.yaml [key=value ...]
    python recipes/compare.py --config configs/tiny/compare.yaml          # what `make demo` runs

Stages, each skipped when its output already exists (so a rerun resumes, and unfinished
training continues from its newest checkpoint):
  1. train   each arm with recipes/train.py under torchrun: identical data, steps and seed;
             arms: bf16 + QAT (full), and optionally bf16-LoRA + QAT-LoRA (lora=true)
  2. convert each arm: bf16 arms give hf/ (no quantization) and quantized/ (PTQ, same scheme);
             QAT arms give quantized/ (QAT convert)
  3. eval    lm-eval hellaswag + wikitext on bf16, PTQ and QAT models
  4. report  report.md + results.json + comparison.png in output_dir, and W&B runs in one group
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qat.atomic import write_text_atomic
from qat.config import CompareConfig, load_config
from qat.errors import UserError, exit_on_user_error

ROOT = Path(__file__).resolve().parents[1]


def arms(cfg: CompareConfig) -> dict[str, list[str]]:
    """Arm name -> training overrides. Every arm shares the base config, data, steps and seed."""
    qat = ["qat.enabled=true", f"qat.scheme={cfg.scheme}", f"qat.group_size={_null(cfg.group_size)}"]
    out = {}
    if cfg.full:
        out["bf16"], out["qat"] = ["qat.enabled=false", "lora.enabled=false"], qat + ["lora.enabled=false"]
    if cfg.lora:
        merged = [f"qat.lora_merged={str(cfg.lora_merged).lower()}"]
        out["bf16_lora"], out["qat_lora"] = ["qat.enabled=false", "lora.enabled=true"], qat + ["lora.enabled=true"] + merged
    if not out:
        raise UserError("compare has no arms: set full=true and/or lora=true")
    return out


def _null(v):
    return "null" if v is None else v


def train_arm(cfg: CompareConfig, arm: str, overrides: list[str], out: Path) -> None:
    done = out / arm / ".train-done"
    if done.exists():
        print(f"[compare] train {arm}: done already")
        return
    if cfg.skip_train:
        raise UserError(f"skip_train=true but {out / arm} has no finished training (no .train-done)")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           str(cfg.nproc_per_node), str(ROOT / "recipes/train.py"), "--config", cfg.train_config,
           *cfg.train_overrides, *overrides, f"output_dir={out / arm}", "checkpoint.resume=auto",
           f"logging.wandb.group={cfg.wandb.group or out.name}", f"logging.wandb.name={out.name}-{arm}"]
    print(f"[compare] train {arm}: {' '.join(cmd[3:])}", flush=True)
    from qat.lifeline import stops_with_me

    if subprocess.run(cmd, preexec_fn=stops_with_me()).returncode != 0:  # torchrun must not outlive compare
        raise UserError(f"training arm {arm!r} failed; fix it and rerun compare (it resumes)")
    done.write_text("ok\n")


def kernels_missing(scheme_name: str) -> bool:
    """True when this machine cannot run the scheme's real kernels: compare then evaluates the
    fake-quantized (simulated) PTQ and QAT models and labels them so everywhere."""
    import torch

    from qat.schemes import get_scheme

    try:
        get_scheme(scheme_name).check_hardware(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    except UserError:
        return True
    return False


def convert_arm(cfg: CompareConfig, arm: str, out: Path, simulate: bool) -> Path:
    export = out / arm / "export"
    if (export / "verify.json").exists():
        print(f"[compare] convert {arm}: done already")
        return export
    argv = ["--checkpoint", str(out / arm), "--out", str(export)]
    if arm.startswith("bf16"):
        argv += ["--scheme", cfg.scheme] + (["--per-channel"] if cfg.group_size is None else
                                            ["--group-size", str(cfg.group_size)])
    if simulate:
        argv.append("--simulate")
    print(f"[compare] convert {arm}", flush=True)
    proc = subprocess.run([sys.executable, str(ROOT / "recipes/convert.py"), *argv])
    if proc.returncode != 0:
        raise UserError(f"convert of arm {arm!r} failed (see above)")
    return export


def models_to_eval(cfg: CompareConfig, out: Path, simulate: bool) -> dict[str, dict[str, Path]]:
    """Per comparison (full, lora): {bf16, ptq, qat} -> model folder (hf/ for simulated PTQ/QAT)."""
    quant = "hf" if simulate else "quantized"
    sets = {}
    for kind, suffix in (("full", ""), ("lora", "_lora")):
        if getattr(cfg, kind):
            sets[kind] = {"bf16": out / f"bf16{suffix}" / "export" / "hf",
                          "ptq": out / f"bf16{suffix}" / "export" / quant,
                          "qat": out / f"qat{suffix}" / "export" / quant}
    return sets


def eval_model(cfg: CompareConfig, label: str, folder: Path, out: Path, simulate: bool) -> dict:
    result_file = out / "eval" / f"{label}.json"
    if result_file.exists():
        print(f"[compare] eval {label}: done already")
        return json.loads(result_file.read_text())["results"]
    from eval.harness import evaluate

    import torch

    e = cfg.eval
    device = ("cuda" if torch.cuda.is_available() else "cpu") if e.device == "auto" else e.device
    print(f"[compare] eval {label}: {folder}" + (" (simulated)" if simulate else ""), flush=True)
    target, tokenizer = folder, None
    if simulate:
        from eval.harness import simulated_model

        target, tokenizer = simulated_model(folder, cfg.scheme, cfg.group_size, e.dtype)
    results = evaluate(target, tokenizer, tasks=e.tasks, data_dir=Path(e.data_dir) if e.data_dir else None,
                       limit=int(e.limit) if e.limit and e.limit >= 1 else e.limit, batch_size=e.batch_size,
                       num_fewshot=e.num_fewshot, device=device, dtype=e.dtype)
    result_file.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(result_file, json.dumps({"model": str(folder), "simulated": simulate,
                                               "results": results}, indent=2))
    return results


def header(cfg: CompareConfig, out: Path, kind: str) -> dict:
    from qat.config import load_config as load_train
    from qat.schemes import get_scheme

    train = load_train(cfg.train_config, list(cfg.train_overrides) + [f"output_dir={out}"])
    t = train.training
    return {"title": cfg.title or f"{Path(train.model.path).name}, {kind} fine-tuning",
            "model": train.model.path, "fine-tuning": kind,
            "scheme": get_scheme(cfg.scheme).describe(cfg.group_size) + ", decoder Linears",
            "steps": f"{t.steps} x {t.batch_size * cfg.nproc_per_node * t.gradient_accumulation_steps}"
                     f" sequences of {train.data.seq_len} tokens, lr {train.optimizer.lr}, seed {t.seed}",
            "data": cfg.data_description or ", ".join(s.path for s in train.data.sources),
            "eval": f"lm-eval tasks={cfg.eval.tasks}" + (f", limit={cfg.eval.limit}" if cfg.eval.limit else "")}


def report(cfg: CompareConfig, out: Path, kind: str, results: dict, head: dict, simulated: bool) -> str:
    from eval.report import markdown, plot

    suffix = "" if kind == "full" else "_lora"
    md = markdown(results, head, simulated)
    (out / f"report{suffix}.md").write_text(md)
    (out / f"results{suffix}.json").write_text(json.dumps({"header": head, "simulated": simulated,
                                                           "results": results}, indent=2))
    title = f"{head['title']} - {head['scheme']}" + (" - PTQ/QAT SIMULATED (no real kernels)" if simulated else "")
    plot(results, out / f"comparison{suffix}.png", title, simulated)
    return md


@exit_on_user_error
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="compare YAML (configs/*/compare.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the compare config")
    a = p.parse_args(argv)
    cfg = load_config(a.config, a.overrides, schema=CompareConfig)
    load_config(cfg.train_config, list(cfg.train_overrides) + ["output_dir=x"])  # fail early on typos
    from qat.schemes import get_scheme

    get_scheme(cfg.scheme)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for arm, overrides in arms(cfg).items():
        train_arm(cfg, arm, overrides, out)
    simulate = kernels_missing(cfg.scheme)
    for arm in arms(cfg):
        convert_arm(cfg, arm, out, simulate)
    for kind, models in models_to_eval(cfg, out, simulate).items():
        suffix = "" if kind == "full" else "_lora"
        results = {k: eval_model(cfg, f"{k}{suffix}", f, out, simulate and k != "bf16") for k, f in models.items()}
        head = header(cfg, out, kind)
        if simulate:
            head["simulated"] = (f"PTQ and QAT rows are the fake-quantized forward of {cfg.scheme}: "
                                 f"this machine lacks its real kernels")
        print(report(cfg, out, kind, results, head, simulate))
        from eval.wandb_report import log_comparison

        log_comparison(cfg.wandb, out, kind, results, head, simulate)
    print(f"[compare] report in {out}")


if __name__ == "__main__":
    main()
