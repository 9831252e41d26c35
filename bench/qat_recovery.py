"""How much of PTQ's loss each quantization-aware arm recovers, over seeds and fine-tuning modes.

Runs recipes/compare.py on the tiny world (after `make demo`, which pretrains runs/demo/base) once
per (mode, seed), with every arm: QAT, QAD, QAT with learned scales (QAT+LS) and QAD+LS, then
writes a markdown table of the recovered share of bits/byte and acc_norm (mean ± sd over seeds)
and each arm's median step time relative to plain QAT.

    python bench/qat_recovery.py --seeds 0 1 2 --modes full lora merged --out runs/recovery
    python bench/qat_recovery.py --qat-from bf16 --out runs/recovery-from-bf16 --bf16-from runs/recovery
    python bench/qat_recovery.py --qat-from bf16 --modes merged --out runs/recovery-r64 \
        --bf16-from runs/recovery --qat-train lora.rank=64 lora.alpha=128
    python bench/qat_recovery.py --modes full --arms qat --out runs/recovery-gguf --compare scheme=q4_0 \
        group_size=null gguf=f32 gguf_texts=assets/world/data/heldout_text.jsonl
    python bench/qat_recovery.py --modes full --arms qat --out runs/recovery-pte --compare scheme=8da4w \
        group_size=null pte_text=assets/world/data/heldout_text.jsonl

With `--compare`'s gguf or pte_text, the table adds the share recovered in the runtime's own
bits/byte: llama.cpp's on the .gguf files, ExecuTorch's on the .pte programs.

Modes: full (full fine-tuning), lora (LoRA, default QAT: fake-quantize W, adapter in high
precision), merged (LoRA with qat.lora_merged=true). The merged mode shares the LoRA mode's bf16
arm (same seed, same training): whichever runs second copies it rather than training it again,
as it copies the bf16 arms of the sweeps named by --bf16-from. Each compare resumes what it
finished, so an interrupted sweep continues where it stopped. A seed-0 full run already in
runs/demo/compare (the demo's, same config) is reused when --reuse-demo is given.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from qat.eval.metrics import METRICS, PTE_METRIC, Metric
from qat.eval.report import LABELS, recovered

ARMS = ["qat", "qad", "qat_ls", "qad_ls"]
SHOWN = [m for m in METRICS if m.name in ("bits_per_byte", "acc_norm")]
# Runtime bits/byte: compare's llama_cpp rows (gguf=...) and ExecuTorch column (pte_text=...)
LLAMA_CPP = Metric("llama_cpp", "bits_per_byte", "llama.cpp bits/byte", False)
RUNTIMES = [LLAMA_CPP, PTE_METRIC]
MODES = {"full": ["full=true", "lora=false"],
         "lora": ["full=false", "lora=true", "lora_merged=false"],
         "merged": ["full=false", "lora=true", "lora_merged=true"]}
# LoRA at the full run's lr 1e-3 learns too slowly in 150 steps; 2e-3 as in docs/results.md
LORA_TRAIN = ["optimizer.lr=2e-3"]


def run_compare(out: Path, mode: str, seed: int, qat_from: str, extra: list[str], qat_extra: list[str],
                arms: list[str], compare: list[str]) -> None:
    train = [f"training.seed={seed}"] + (LORA_TRAIN if mode != "full" else []) + extra
    qad = any(a.startswith("qad") for a in arms)
    ls = any(a.endswith("_ls") for a in arms)
    cmd = [sys.executable, str(ROOT / "recipes/compare.py"), "--config", str(ROOT / "configs/tiny/compare.yaml"),
           f"output_dir={out}", f"qad={str(qad).lower()}", f"learn_scales={str(ls).lower()}", f"qat_from={qat_from}",
           "wandb.enabled=false", *MODES[mode], f"train_overrides={yaml_list(train)}",
           f"qat_overrides={yaml_list(qat_extra)}", *compare]
    print(f"[recovery] {mode} seed {seed}: {' '.join(cmd[2:])}", flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def yaml_list(items: list[str]) -> str:
    """A YAML flow list of quoted strings, so that an override may hold commas and brackets
    (data.sources=[{...}, {...}])."""
    return "[" + ", ".join("'" + i.replace("'", "''") + "'" for i in items) + "]"


def reuse_bf16(root: Path, mode: str, seed: int, elsewhere: list[Path]) -> None:
    """The bf16 arm depends on neither the QAT options nor lora_merged: lora and merged modes train
    the same bf16 LoRA arm, and another sweep (--bf16-from) trained the same bf16 arms. Copy a
    finished one rather than train it again."""
    arm = "bf16" if mode == "full" else "bf16_lora"
    dst = root / f"{mode}-s{seed}" / arm
    others = [root / f"{m}-s{seed}" for m in ("lora", "merged") if mode != "full" and m != mode]
    for d in others + [r / f"{m}-s{seed}" for r in elsewhere
                       for m in ([mode] if mode == "full" else ["lora", "merged"])]:
        src = d / arm
        if (src / "done.json").exists() and not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(src.resolve(), dst, symlinks=True)


def finished(out: Path, mode: str) -> bool:
    return (out / ("results.json" if mode == "full" else "results_lora.json")).exists()


def results_of(out: Path, mode: str) -> dict:
    """{model: {task: {metric: value}}}, llama.cpp's rows folded in as the task "llama_cpp"."""
    name = "results.json" if mode == "full" else "results_lora.json"
    record = json.loads((out / name).read_text())
    results = record["results"]
    for arm, row in record.get("llama_cpp", {}).items():
        results.setdefault(arm, {})[LLAMA_CPP.task] = row
    return results


def shown(results: dict) -> list[Metric]:
    """The columns: lm-eval's on the converted models, then each runtime's where it was measured."""
    return SHOWN + [m for m in RUNTIMES if m.task in results.get("ptq", {})]


def median_step_time(run: Path) -> float:
    times = [json.loads(l)["perf/step_time_s"] for l in (run / "metrics.jsonl").read_text().splitlines() if l]
    return statistics.median(times)


def shares(results: dict) -> dict:
    """{arm: {metric label: recovered share or None}} for one compare."""
    out = {}
    for arm in ARMS:
        if arm not in results:
            continue
        out[arm] = {}
        for m in shown(results):
            b, p, q = (results[k][m.task][m.name] for k in ("bf16", "ptq", arm))
            out[arm][m.label] = recovered(b, p, q, m.higher_is_better)
    return out


def fmt(vals: list) -> str:
    """mean ± sd over seeds, and the worst seed."""
    vals = [v for v in vals if v is not None]
    if not vals:
        return "n/a"
    if len(vals) == 1:
        return f"{100 * vals[0]:.0f}%"
    return f"{100 * statistics.mean(vals):.0f}% ± {100 * statistics.stdev(vals):.0f} (min {100 * min(vals):.0f}%)"


def table(root: Path, modes: list[str], seeds: list[int]) -> str:
    lines = []
    for mode in modes:
        # the seeds whose comparison finished (a sweep cut short reports what it has, and says so)
        per_seed = [(seed, root / f"{mode}-s{seed}") for seed in seeds if finished(root / f"{mode}-s{seed}", mode)]
        if not per_seed:
            continue
        results = {seed: results_of(out, mode) for seed, out in per_seed}
        metrics = shown(results[per_seed[0][0]])
        if not lines:
            lines = ["| mode | seeds | arm | " + " | ".join(f"recovered {m.label}" for m in metrics)
                     + " | step time / QAT |", "|---|---|---|" + "---|" * len(metrics) + "---|"]
        got = {seed: shares(r) for seed, r in results.items()}
        done = ", ".join(str(s) for s, _ in per_seed)
        suffix = "" if mode == "full" else "_lora"
        for arm in [a for a in ARMS if a in results[per_seed[0][0]]]:
            cells = [fmt([got[s].get(arm, {}).get(m.label) for s in got]) for m in metrics]
            ratios = [median_step_time(out / f"{arm}{suffix}") / median_step_time(out / f"qat{suffix}")
                      for _, out in per_seed]
            lines.append(f"| {mode} | {done} | {LABELS[arm]} | " + " | ".join(cells)
                         + f" | {statistics.mean(ratios):.2f} |")
    return "\n".join(lines) + "\n"


def values(root: Path, modes: list[str], seeds: list[int]) -> str:
    """Per seed: each model's metric values, the numbers behind the shares."""
    lines = []
    for mode in modes:
        for seed in seeds:
            out = root / f"{mode}-s{seed}"
            if not finished(out, mode):
                continue
            results = results_of(out, mode)
            metrics = shown(results)
            if not lines:
                lines = ["| mode | seed | model | " + " | ".join(m.label for m in metrics) + " |",
                         "|---|---|---|" + "---|" * len(metrics)]
            for k in ["bf16", "ptq"] + [a for a in ARMS if a in results]:
                cells = [results[k].get(m.task, {}).get(m.name) for m in metrics]
                lines.append(f"| {mode} | {seed} | {LABELS[k]} | "
                             + " | ".join("" if c is None else f"{c:.4f}" for c in cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--out", type=Path, default=Path("runs/recovery"))
    p.add_argument("--reuse-demo", action="store_true", help="take full seed 0 from runs/demo/compare")
    p.add_argument("--report-only", action="store_true", help="only aggregate what exists")
    p.add_argument("--qat-from", choices=("base", "bf16"), default="base",
                   help="compare's qat_from: the quantization-aware arms start from the base model or the "
                        "fine-tuned bf16 arm")
    p.add_argument("--bf16-from", type=Path, nargs="*", default=[],
                   help="other sweeps' folders (same seeds and config): copy their finished bf16 arms")
    p.add_argument("--train", nargs="*", default=[], metavar="KEY=VALUE",
                   help="more training overrides for every arm, e.g. lora.rank=64 lora.alpha=128 (then do "
                        "not reuse bf16 arms trained without them)")
    p.add_argument("--arms", nargs="+", default=ARMS, choices=ARMS,
                   help="the quantization-aware arms to train (qad* turn on compare's qad, *_ls its learn_scales)")
    p.add_argument("--compare", nargs="*", default=[], metavar="KEY=VALUE",
                   help="more compare overrides, e.g. scheme=q4_0 group_size=null gguf=f32 gguf_texts=...")
    p.add_argument("--qat-train", nargs="*", default=[], metavar="KEY=VALUE",
                   help="compare's qat_overrides: overrides for the quantization-aware arms only, e.g. "
                        "lora.rank=64 lora.alpha=128 (the bf16 arms stay as they are, so --bf16-from can reuse them)")
    a = p.parse_args(argv)
    root = a.out.resolve()
    if not a.report_only:
        for seed in a.seeds:
            for mode in a.modes:
                out = root / f"{mode}-s{seed}"
                if a.reuse_demo and mode == "full" and seed == 0 and not out.exists():
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.symlink_to((ROOT / "runs/demo/compare").resolve())
                reuse_bf16(root, mode, seed, [d.resolve() for d in a.bf16_from])
                run_compare(out, mode, seed, a.qat_from, a.train, a.qat_train, a.arms, a.compare)
    md = table(root, a.modes, a.seeds) + "\n" + values(root, a.modes, a.seeds)
    (root / "recovery.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
