"""Benchmark our training recipe: tokens/s, MFU and peak memory per mode, random-init weights.

    python bench/bench_train.py --shape llama3.2-1b --batch 4 --seq 2048 [--compile] --out $OUT

By default the four modes full/LoRA x bf16/QAT; --modes also takes compare's other quantization-
aware arms (learned scales, QAD, merged LoRA), to time each against plain QAT. On a CPU, time them
as compare runs them (2 ranks, one thread each): with 1 rank x 2 threads, intra-op threading made
the learned-scale arms 1.5x slower on the 2-core machine, which says nothing about the method.

    OMP_NUM_THREADS=1 python bench/bench_train.py --shape tiny --nproc 2 --batch 16 --seq 128 \
        --modes full-qat-8da4w,full-qat-ls-8da4w,full-qad-8da4w,full-qad-ls-8da4w --out /tmp/bt

Each mode is a real launch of recipes/train.py (FSDP2, our data path, our loss; plain python for
one rank, torchrun for --nproc ranks), with `model.init=random` from a config-only HF folder, built
directly on the GPU, so no weights are downloaded, and no checkpoint is written
(`checkpoint.save_final=false`). Each result records its `launch_to_exit_s`. Tokens come from the tiny world's corpus (values do not change throughput). Step time
is the median over the steps after `--warmup`. FLOPs are 6N per token for full fine-tuning and 4N
for LoRA, plus 2N for a QAD mode's teacher forward (dense matmuls only), and MFU divides by the
device's spec-sheet dense bf16 peak from qat.perf.PEAK_BF16_FLOPS, the same table the training
log uses. (The off-the-shelf anchor script divides by a measured 790 TFLOP/s on the H200 instead,
so compare tokens/s with it, or scale its MFU by 790/989.)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

import torch

from qat.distributed import pick_device
from qat.perf import device_peak_flops
SHAPES = {
    "llama3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                        num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True),
    "llama3.1-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
    "tiny": dict(vocab_size=1024, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
}
QAT = ["qat.enabled=true", "qat.scheme=8da4w", "qat.group_size=32"]
LORA = ["lora.enabled=true", "lora.rank=16", "lora.alpha=32"]
# QAD's teacher is the starting model: a frozen copy in a full run, the same network with adapters
# and fake quantization off in a LoRA run (no copy)
QAD = ["distill.enabled=true", "distill.teacher=base"]
LS = ["qat.learn_scales=true"]
MERGED = ["qat.lora_merged=true"]
MODES = {
    "full-bf16": [],
    "full-qat-8da4w": QAT,
    "lora-bf16": LORA,
    "lora-qat-8da4w": LORA + QAT,
    # the quantization-aware arms of compare, for their step time relative to plain QAT
    "full-qat-ls-8da4w": QAT + LS,
    "full-qad-8da4w": QAT + QAD,
    "full-qad-ls-8da4w": QAT + QAD + LS,
    "lora-merged-qat-8da4w": LORA + QAT + MERGED,
    "lora-merged-qat-ls-8da4w": LORA + QAT + MERGED + LS,
    "lora-merged-qad-8da4w": LORA + QAT + MERGED + QAD,
    "lora-merged-qad-ls-8da4w": LORA + QAT + MERGED + QAD + LS,
}
DEFAULT_MODES = ["full-bf16", "full-qat-8da4w", "lora-bf16", "lora-qat-8da4w"]


def model_folder(shape: str, world: Path, out: Path) -> Path:
    from transformers import AutoTokenizer, LlamaConfig

    folder = out / f"model-{shape}"
    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=8192, rope_theta=500000.0)
    cfg.save_pretrained(folder)
    AutoTokenizer.from_pretrained(world / "tokenizer").save_pretrained(folder)
    return folder


def dense_params(shape: str) -> int:
    s = SHAPES[shape]
    h, i, L, v = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"], s["vocab_size"]
    kv = h // s["num_attention_heads"] * s["num_key_value_heads"]
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * i
    return L * per_layer + h * v  # + lm_head; the embedding lookup is not a matmul


def run_mode(mode, folder, world, a, device) -> dict:
    run_dir = Path(a.out) / f"run-{a.shape}-{mode}-{'compiled' if a.compile else 'eager'}{a.tag}"
    overrides = [
        f"output_dir={run_dir}", f"model.path={folder}", "model.init=random",
        f"data.sources=[{{path: {world}/data/pretrain.jsonl, kind: text}}]", f"data.seq_len={a.seq}",
        f"training.steps={a.warmup + a.steps}", f"training.batch_size={a.batch}",
        f"training.dtype={'bf16' if device == 'cuda' else 'fp32'}", f"fsdp.device={device}",
        f"fsdp.compile={str(a.compile).lower()}", f"fsdp.activation_checkpointing={a.ac}",
        # no checkpoint at all: a 1B full run's final one is ~15 GB of weights and Adam state
        "checkpoint.every_n_steps=0", "checkpoint.save_final=false",
        "logging.progress_bar=false", "logging.wandb.enabled=false",
        *MODES[mode], *a.train,
    ]
    # one rank: plain python, a world of one (no launcher to start); more: torchrun
    launch = [sys.executable] if a.nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                                                     str(a.nproc), "--standalone"]
    cmd = [*launch, str(ROOT / "recipes/train.py"), "--config", str(ROOT / "configs/tiny/full.yaml"), *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, WANDB_MODE="disabled"))
    if proc.returncode != 0:
        return {"shape": a.shape, "mode": mode, "error": proc.stderr.strip().splitlines()[-1][:500]}
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()][a.warmup:]
    shutil.rmtree(run_dir, ignore_errors=True)
    step = statistics.median(r["perf/step_time_s"] for r in rows)
    tokens = a.batch * a.seq * a.nproc  # per step, all ranks
    # 6N per token to train, 4N with LoRA (no weight gradients), + 2N for QAD's teacher forward
    per_token = (4 if mode.startswith("lora") else 6) + (2 if "-qad" in mode else 0)
    flops = per_token * dense_params(a.shape) * tokens
    peak = device_peak_flops(torch.device(device))
    return {"shape": a.shape, "mode": mode, "compiled": a.compile, "nproc": a.nproc, "batch": a.batch, "seq": a.seq,
            "step_s": round(step, 4), "tokens_per_s": round(tokens / step),
            "mfu": round(flops / step / (peak * a.nproc), 3) if peak else None,
            "peak_mem_gib": round(max(r.get("mem/peak_gib", 0.0) for r in rows), 2),
            # host time waiting for the step's batches: ~0 when the prefetcher hides the loading
            "data_s": round(statistics.median(r.get("perf/data_s", 0.0) for r in rows), 5),
            "loss": round(rows[-1]["train/loss"], 3), "train": a.train}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="llama3.2-1b", choices=list(SHAPES))
    p.add_argument("--modes", default=",".join(DEFAULT_MODES), help=f"comma list of {', '.join(MODES)}")
    p.add_argument("--batch", type=int, default=4, help="sequences per rank")
    p.add_argument("--nproc", type=int, default=1,
                   help="ranks (one GPU each; on a CPU, set OMP_NUM_THREADS so ranks x threads = cores)")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=8, help="measured steps")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="fsdp.compile=true (per-block torch.compile)")
    p.add_argument("--ac", default="none", choices=["none", "full"], help="activation checkpointing")
    p.add_argument("--train", nargs="*", default=[], metavar="KEY=VALUE",
                   help="more training overrides for every mode, e.g. qat.quantize_frozen_once=false")
    p.add_argument("--tag", default="", help="appended to the result file's name (runs with --train)")
    p.add_argument("--world", default=str(ROOT / "assets/world"), help="tiny world (built if missing)")
    p.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    a = p.parse_args(argv)
    device = pick_device("auto").type
    Path(a.out).mkdir(parents=True, exist_ok=True)
    world = Path(a.world)
    if not (world / "world.json").exists():
        from qat.synthetic.build import build_world
        build_world(world)
    folder = model_folder(a.shape, world, Path(a.out))
    results = []
    for mode in a.modes.split(","):
        t0 = time.perf_counter()
        res = run_mode(mode, folder, world, a, device)
        res["launch_to_exit_s"] = round(time.perf_counter() - t0, 1)
        print(json.dumps(res), flush=True)
        results.append(res)
        # after every mode: a run cut by a deadline keeps the modes that finished
        name = f"ours_{a.shape}_{'compiled' if a.compile else 'eager'}{a.tag}.json"
        (Path(a.out) / name).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
