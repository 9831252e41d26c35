"""The main job: fine-tune bf16 and QAT arms, convert, evaluate bf16 / PTQ / QAT, report.

    python recipes/compare.py --config configs/llama3_2_1b/compare.yaml [key=value ...]
    python recipes/compare.py --config configs/tiny/compare.yaml          # what `make demo` runs

Stages, each skipped when its output already exists (so a rerun resumes, and unfinished
training continues from its newest checkpoint):
  1. train   each arm with recipes/train.py under torchrun: identical data, steps and seed;
             arms: bf16 + QAT (full), and optionally bf16-LoRA + QAT-LoRA (lora=true)
  2. convert each arm: bf16 arms give hf/ (no quantization) and quantized/ (PTQ, same scheme);
             QAT arms give quantized/ (QAT convert). Without the scheme's real kernels here, the
             PTQ and QAT models are evaluated simulated and labelled so everywhere.
  3. eval    lm-eval hellaswag + wikitext on bf16, PTQ and QAT models; with gguf (schemes q4_0,
             q8_0), also llama.cpp's own bits per byte of each arm's .gguf (eval/gguf_eval.py)
             with pte_text, also each quantized model's .pte (convert --formats pte) in ExecuTorch's
             runtime: bits/byte
  Steps 2 and 3 are eval/pipeline.py, shared with the Slurm sweep report.
  4. report  report.md + results.json + comparison.png in output_dir, and W&B runs in one group
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Optional


from qat.convert import PTQRequest
from qat.eval.pipeline import evaluate_pte, evaluate_target, export_run, finished, export_coverage, run_models
from qat.eval.report import ARMS
from qat.atomic import write_text_atomic
from qat.config import CompareConfig, load_config
from qat.errors import UserError, exit_on_user_error

ROOT = Path(__file__).resolve().parents[1]


def arms(cfg: CompareConfig, out: Path) -> dict[str, list[str]]:
    """Arm name -> training overrides, in training order. Every arm shares the base config, data,
    steps and seed. A QAD arm distils the fine-tuned bf16 arm of its kind, so it trains after it;
    the _ls arms also learn their scales (qat.learn_scales)."""
    qat = ["qat.enabled=true", f"qat.scheme={cfg.scheme}", f"qat.group_size={_null(cfg.group_size)}"]
    arms = {}
    for kind, suffix, lora in (("full", "", ["lora.enabled=false"]), ("lora", "_lora", ["lora.enabled=true"])):
        if not getattr(cfg, kind):
            continue
        merged = [f"qat.lora_merged={str(cfg.lora_merged).lower()}"] if kind == "lora" else []
        arms[f"bf16{suffix}"] = ["qat.enabled=false"] + lora
        fine_tuned = fine_tuned_export(out, suffix)
        start = [f"model.path={fine_tuned}"] if cfg.qat_from == "bf16" else []
        # from the bf16 arm, "base" (the model the arm starts from) is that same fine-tuned model
        qad = ["distill.enabled=true", f"distill.teacher={'base' if start else fine_tuned}"]
        for arm, extra, on in (("qat", [], True), ("qad", qad, cfg.qad), ("qat_ls", LS, cfg.learn_scales),
                               ("qad_ls", qad + LS, cfg.qad and cfg.learn_scales)):
            if on:
                arms[f"{arm}{suffix}"] = qat + lora + merged + start + extra + list(cfg.qat_overrides)
    if not arms:
        raise UserError("compare has no arms: set full=true and/or lora=true")
    return arms


LS = ["qat.learn_scales=true"]


def fine_tuned_export(out: Path, suffix: str) -> Path:
    """The fine-tuned bf16 arm's hf/ export (LoRA merged): the QAD teacher, and with qat_from=bf16
    the start of every quantization-aware arm. Absolute, so a run's config.yaml is valid anywhere."""
    return (out / f"bf16{suffix}" / "export" / "hf").resolve()


def _null(v):
    return "null" if v is None else v


def log(msg: str) -> None:
    print(f"[compare] {msg}", flush=True)


def train_arm(cfg: CompareConfig, arm: str, overrides: list[str], out: Path) -> None:
    """torchrun recipes/train.py for one arm, unless it already wrote its completion record."""
    if finished(out / arm):
        log(f"train {arm}: done already")
        return
    if cfg.skip_train:
        raise UserError(f"skip_train=true but {out / arm} has no finished training (no done.json)")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           str(cfg.nproc_per_node), str(ROOT / "recipes/train.py"), "--config", cfg.train_config,
           *cfg.train_overrides, *overrides, f"output_dir={out / arm}", "checkpoint.resume=auto",
           f"logging.wandb.group={cfg.wandb.group or out.name}", f"logging.wandb.name={out.name}-{arm}"]
    log(f"train {arm}: {' '.join(cmd[3:])}")
    from qat.lifeline import stops_with_me

    # torchrun must not outlive compare
    code = subprocess.run(cmd, preexec_fn=stops_with_me()).returncode
    if code == 2:  # a user error: torchrun printed the arm's one error line (qat/torchrun_errors.py)
        log(f"train {arm}: stopped on the error above; fix it and rerun compare (it resumes)")
        sys.exit(2)
    if code != 0 or not finished(out / arm):
        raise UserError(f"training arm {arm!r} failed; fix it and rerun compare (it resumes)")


def evaluate_comparison(cfg: CompareConfig, out: Path, suffix: str) -> tuple[dict, Optional[dict]]:
    """{bf16, ptq, qat[, qad, qat_ls, qad_ls]} -> results for one comparison (full, or LoRA with suffix "_lora"), and the
    scheme record of the simulated rows, if this machine lacks the scheme's real kernels."""
    ptq = PTQRequest(cfg.scheme, cfg.group_size)
    planned = arms(cfg, out)
    formats = ("pte",) if cfg.pte_text else ()
    exports = {}
    for arm in ["bf16", "qat"] + [a for a in ARMS[1:] if f"{a}{suffix}" in planned]:  # QAT runs: model "qat"
        exports[arm] = export_run(out / f"{arm}{suffix}", out / f"{arm}{suffix}" / "export", ptq, log=log,
                                  gguf=cfg.gguf, formats=formats)
    targets = {**run_models(exports["bf16"]), **{arm: run_models(e)["qat"] for arm, e in exports.items() if arm != "bf16"}}
    results = {k: evaluate_target(t, cfg.eval, out / "eval" / f"{k}{suffix}.json", log=log) for k, t in targets.items()}
    if cfg.pte_text:  # ExecuTorch's bits/byte, a column of its own (qat.eval.metrics.PTE_METRIC)
        for k, t in targets.items():
            results[k] = {**results[k], "executorch": evaluate_pte(k, t, Path(cfg.pte_text),
                                                                   out / "eval" / f"{k}{suffix}_pte.json", log=log)}
    simulated = next((t.simulate for t in targets.values() if t.simulated), None)
    if cfg.gguf:
        results["llama_cpp"] = llama_cpp_results(cfg, out, suffix, exports)
    return results, simulated


def llama_cpp_results(cfg: CompareConfig, out: Path, suffix: str, exports: dict[str, Path]) -> dict:
    """{bf16, ptq, qat, ...} -> llama.cpp's bits per byte of the arm's .gguf on cfg.gguf_texts."""
    from qat.eval.gguf_eval import evaluate_gguf, gguf_models, read_texts

    texts = read_texts(Path(cfg.gguf_texts))
    files = {**gguf_models(exports["bf16"]),
             **{arm: gguf_models(e)["qat"] for arm, e in exports.items() if arm != "bf16"}}
    return {arm: evaluate_gguf(f, texts, cfg.gguf_ctx, out / "eval" / f"llama_cpp_{arm}{suffix}.json", log=log)
            for arm, f in files.items()}


def header(cfg: CompareConfig, out: Path, kind: str) -> dict:
    from qat.config import load_config as load_train
    from qat.coverage import header_line
    from qat.schemes import get_scheme

    train = load_train(cfg.train_config, list(cfg.train_overrides) + [f"output_dir={out}"])
    qa = load_train(cfg.train_config, list(cfg.train_overrides) + list(cfg.qat_overrides) + [f"output_dir={out}"])
    t = train.training
    coverage = header_line(out / f"qat{'' if kind == 'full' else '_lora'}" / "export" / "verify.json")
    return {"title": cfg.title or f"{Path(train.model.path).name}, {kind} fine-tuning",
            "model": train.model.path, "fine-tuning": kind,
            "scheme": get_scheme(cfg.scheme).describe(cfg.group_size) + ", decoder blocks",
            **({"coverage": coverage} if coverage else {}),
            "steps": f"{t.steps} x {t.batch_size * cfg.nproc_per_node * t.gradient_accumulation_steps}"
                     f" sequences of {train.data.seq_len} tokens, lr {train.optimizer.lr}, seed {t.seed}",
            "data": cfg.data_description or ", ".join(s.path for s in train.data.sources),
            "eval": f"lm-eval tasks={cfg.eval.tasks}" + (f", limit={cfg.eval.limit}" if cfg.eval.limit else ""),
            "arms": "; ".join(a for a, on in (
                ("PTQ: the bf16 arm quantized after training", True),
                ("quantization-aware arms start from the fine-tuned bf16 arm (its hf/ export) and train "
                 f"{qa.training.steps} more steps", cfg.qat_from == "bf16"),
                (f"quantization-aware arms only: {', '.join(cfg.qat_overrides)}", bool(cfg.qat_overrides)),
                ("QAT: fake quantization, cross-entropy", True),
                ("QAD: fake quantization, KL from the fine-tuned bf16 arm (its hf/ export) at "
                 f"T={qa.distill.temperature:g}" + (f", weight {qa.distill.weight:g} (the rest cross-entropy)"
                                                    if qa.distill.weight < 1 else ""), cfg.qad),
                (f"+LS: scales learned with LSQ (lr x {qa.qat.scale_lr_multiplier})", cfg.learn_scales)) if on)}


def arm_coverage(cfg: CompareConfig, out: Path, suffix: str) -> dict:
    """{arm: qat_coverage} of the quantization-aware arms of one comparison."""
    planned = arms(cfg, out)
    return {a: export_coverage(out / f"{a}{suffix}" / "export") for a in ARMS if f"{a}{suffix}" in planned}


def report(cfg: CompareConfig, out: Path, kind: str, results: dict, head: dict, simulated: bool,
           coverage: Optional[dict] = None, llama_cpp: Optional[dict] = None) -> str:
    from qat.eval.report import markdown, plot

    suffix = "" if kind == "full" else "_lora"
    md = markdown(results, head, simulated)
    if llama_cpp:
        from qat.eval.gguf_eval import markdown as gguf_markdown

        md += gguf_markdown(llama_cpp, cfg.scheme, cfg.gguf, cfg.gguf_texts)
    write_text_atomic(out / f"report{suffix}.md", md)
    record = {"header": head, "simulated": simulated, "results": results, "qat_coverage": coverage,
              **({"llama_cpp": llama_cpp} if llama_cpp else {})}
    write_text_atomic(out / f"results{suffix}.json", json.dumps(record, indent=2))
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
    from qat.schemes import get_scheme

    check_gguf_request(cfg, get_scheme(cfg.scheme))
    if cfg.pte_text:  # before hours of training: the scheme must run in XNNPACK, the text must exist
        from qat.convert.plan import check_formats

        check_formats(("pte",), get_scheme(cfg.scheme), None, "real", group_size=cfg.group_size)
        if not Path(cfg.pte_text).is_file():
            raise UserError(f"pte_text={cfg.pte_text}: no such file (held-out text: JSONL with \"text\" or plain lines)")
    from qat.eval.harness import check_tasks
    from qat.atomic import check_target

    out = Path(cfg.output_dir)
    check_target(out, folder=True, what="output_dir")
    check_tasks(cfg.eval.tasks, Path(cfg.eval.data_dir) if cfg.eval.data_dir else None)  # before hours of training
    for overrides in arms(cfg, out).values():  # every arm's config, before hours of training the first
        load_config(cfg.train_config, list(cfg.train_overrides) + overrides + ["output_dir=x"])
    out.mkdir(parents=True, exist_ok=True)
    for arm, overrides in arms(cfg, out).items():
        suffix = "_lora" if arm.endswith("_lora") else ""
        if any(str(fine_tuned_export(out, suffix)) in o for o in overrides):  # QAD's teacher, qat_from=bf16's start
            export_run(out / f"bf16{suffix}", out / f"bf16{suffix}" / "export", PTQRequest(cfg.scheme, cfg.group_size),
                       log=log, gguf=cfg.gguf)
        train_arm(cfg, arm, overrides, out)
    for kind in ("full", "lora"):
        if not getattr(cfg, kind):
            continue
        results, simulated = evaluate_comparison(cfg, out, "" if kind == "full" else "_lora")
        llama_cpp = results.pop("llama_cpp", None)  # rows of their own: llama.cpp's bits per byte
        head = header(cfg, out, kind)
        coverage = arm_coverage(cfg, out, "" if kind == "full" else "_lora")
        from qat.eval.report import coverage_note

        if coverage_note(coverage):  # qat.allow_unquantized: say which weights stayed high precision
            head["high precision"] = coverage_note(coverage)
        if simulated:
            head["simulated"] = (f"PTQ and QAT rows are the fake-quantized forward of {simulated['scheme']}: "
                                 f"this machine lacks its real kernels")
        print(report(cfg, out, kind, results, head, simulated is not None, coverage, llama_cpp))
        log_comparison(cfg.wandb, out, kind, results, head, simulated is not None, coverage)
    log(f"report in {out}")


def check_gguf_request(cfg: CompareConfig, scheme) -> None:
    """gguf on: a GGUF scheme, llama.cpp's binding and the held-out texts, before hours of training."""
    if not cfg.gguf:
        return
    from qat.convert.gguf_check import has_llama_cpp
    from qat.eval.gguf_eval import read_texts

    if not scheme.gguf_format:
        raise UserError(f"gguf={cfg.gguf} needs a GGUF scheme (q4_0 or q8_0), not {cfg.scheme!r}")
    if not has_llama_cpp():
        raise UserError("gguf is on but llama.cpp's Python binding is not installed: pip install '.[gguf]'")
    read_texts(Path(cfg.gguf_texts))


def log_comparison(cfg, out: Path, kind: str, results: dict, head: dict, simulated: bool,
                   coverage: Optional[dict] = None) -> None:
    """W&B: an eval run per model and a comparison run, in the compare folder's group."""
    from qat.eval.report import labels, models, rows
    from qat.eval.wandb_report import ModelRow, log_models

    names = labels(simulated)
    models = [ModelRow(run_name=f"{out.name}-{kind}-{k}" + ("-simulated" if simulated and k != "bf16" else ""),
                       label=names[k], columns={"kind": kind, "scheme": head.get("scheme", "")},
                       results=results.get(k, {})) for k in models(results)]
    summary = {f"compare/{label}/{metric}": v for label, vals in rows(results, simulated).items()
               for metric, v in vals.items() if v is not None}
    summary.update({f"compare/{names[a]}/qat_coverage": c["share"] for a, c in (coverage or {}).items() if c})
    suffix = "" if kind == "full" else "_lora"
    log_models(cfg, out, out.name, f"{out.name}-{kind}-comparison", models, {"kind": kind, **head},
               image=out / f"comparison{suffix}.png", summary=summary)


if __name__ == "__main__":
    main()
