"""Profile one training step on the GPU: the top CUDA kernels by time, and how long the GPU sat idle.

    python bench/profile_step.py --arms ours-full-bf16,ours-full-qat-8da4w,anchor-full-bf16 \
        --shape llama3.2-1b --batch 4 --seq 2048 --anchor .bench/anchor_bench_gpu.py --out $OUT

Arms: `ours-<mode>` for a mode of bench_train.py (full-bf16, full-qat-8da4w, lora-bf16, ...): our
recipe's own setup (TrainRecipe.setup: data, LoRA, QAT, FSDP2, optimizer) with bench_train.py's
overrides, then the body of its training loop step by step (batches, train_step, clip, optimizer
and scheduler steps). `anchor-<mode>`: the off-the-shelf path of anchor_bench_gpu.py (its `build`
and `apply_mode`; fused AdamW), its step body. Random-init weights, the model built on the GPU.

The arms run one after another in one process (one set of imports), each freed before the next.
After `--warmup` steps, one step runs under torch.profiler between two device synchronizations.
Writes profile_<arm>.json per arm: the step's wall time, the time at least one kernel ran (the union of
the kernels' intervals), the idle share 1 - busy / wall, and the top `--top` kernels by total time
with their counts. Kernels on other streams overlap; the union counts such time once.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_train.py, beside this file


def busy_union(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by (start, end) intervals, overlaps counted once."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if e <= end:
            continue
        total += e - max(s, end)
        end = e
    return total


def summarize(trace: dict, wall_s: float, top: int) -> dict:
    """Kernel statistics from a chrome trace (`ts` and `dur` in microseconds)."""
    kernels = [e for e in trace.get("traceEvents", []) if e.get("cat") == "kernel" and "dur" in e]
    by_name = defaultdict(lambda: [0, 0.0])
    for e in kernels:
        by_name[e["name"]][0] += 1
        by_name[e["name"]][1] += e["dur"]
    busy_s = busy_union([(e["ts"], e["ts"] + e["dur"]) for e in kernels]) / 1e6
    rows = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:top]
    kernel_s = sum(d for _, d in by_name.values()) / 1e6
    return {"step_s": round(wall_s, 4), "gpu_busy_s": round(busy_s, 4),
            "idle_share": round(max(0.0, 1 - busy_s / wall_s), 4), "kernels": len(kernels),
            "kernel_time_s": round(kernel_s, 4),
            "top": [{"name": n[:240], "count": c, "total_ms": round(d / 1e3, 3),
                     "share_of_kernel_time": round(d / 1e6 / kernel_s, 4)} for n, (c, d) in rows]}


def profile(step, warmup: int, top: int) -> dict:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    gpu = torch.cuda.is_available()
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    with torch_profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])) as prof:
        t0 = time.perf_counter()
        step()
        sync()
        wall = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as d:
        prof.export_chrome_trace(f"{d}/trace.json")
        trace = json.loads(Path(f"{d}/trace.json").read_text())
    return summarize(trace, wall, top)


def ours_step(mode: str, a):
    """Our recipe, set up as bench_train.py launches it, and one step of its loop."""
    import runpy

    import bench_train
    from qat.config import load_config
    from qat.distributed import init_distributed, pick_device
    from qat.optim import clip_grad_norm

    device = pick_device("auto")  # a CPU runs it too (no kernel rows): the smoke test of this script

    world = Path(a.world)
    if not (world / "world.json").exists():
        from qat.synthetic.build import build_world
        build_world(world)
    tmp = Path(tempfile.mkdtemp(prefix="profile-"))
    folder = bench_train.model_folder(a.shape, world, tmp)
    overrides = [f"output_dir={tmp / 'run'}", f"model.path={folder}", "model.init=random",
                 f"data.sources=[{{path: {world}/data/pretrain.jsonl, kind: text}}]", f"data.seq_len={a.seq}",
                 f"training.steps={a.warmup + 1}", f"training.batch_size={a.batch}",
                 f"training.dtype={'bf16' if device.type == 'cuda' else 'fp32'}", f"fsdp.device={device.type}",
                 f"fsdp.compile={str(a.compile).lower()}", "checkpoint.every_n_steps=0",
                 "checkpoint.save_final=false", "logging.progress_bar=false", "logging.wandb.enabled=false",
                 *bench_train.MODES[mode]]
    cfg = load_config(str(ROOT / "configs/tiny/full.yaml"), overrides)
    mesh = init_distributed(device)
    recipe = runpy.run_path(str(ROOT / "recipes/train.py"))["TrainRecipe"](cfg, device, mesh)
    recipe.setup(None)

    def step():
        fq_on = recipe.fake_quant.before_step(recipe.step)
        recipe.train_step(recipe.loader.next_batches())
        recipe.fake_quant.after_backward(fq_on)
        clip_grad_norm(recipe.params, cfg.training.max_grad_norm)
        recipe.optimizer.step()
        recipe.scheduler.step()
        recipe.optimizer.zero_grad(set_to_none=True)
        recipe.step += 1

    return step, recipe.close


def anchor_step(mode: str, a):
    """The off-the-shelf path, built by the anchor script's own functions, and its step body."""
    spec = importlib.util.spec_from_file_location("anchor_bench_gpu", a.anchor)
    anchor = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(anchor)
    m = anchor.apply_mode(anchor.build(a.shape), mode)
    if a.compile:
        m.compile()
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5, fused=True)
    x = torch.randint(0, anchor.SHAPES[a.shape]["vocab_size"], (a.batch, a.seq), device="cuda")

    def step():
        m(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, lambda: None


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arms", required=True, help="comma list of ours-<mode> or anchor-<mode>, e.g. ours-full-qat-8da4w")
    p.add_argument("--shape", default="llama3.2-1b")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="ours: fsdp.compile=true; the anchor: model.compile()")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--anchor", default=str(ROOT / ".bench/anchor_bench_gpu.py"))
    p.add_argument("--world", default=str(ROOT / "assets/world"))
    p.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    a = p.parse_args(argv)
    arms = a.arms.split(",")
    for arm in arms:
        who, _, mode = arm.partition("-")
        if who not in ("ours", "anchor") or not mode:
            p.error(f"--arms: {arm!r} is not ours-<mode> or anchor-<mode>")
    Path(a.out).mkdir(parents=True, exist_ok=True)
    for arm in arms:
        run_arm(arm, a)
    if torch.distributed.is_initialized():
        from qat.distributed import cleanup
        cleanup()


def run_arm(arm: str, a) -> None:
    who, _, mode = arm.partition("-")
    step, close = (ours_step if who == "ours" else anchor_step)(mode, a)
    res = {"arm": arm, "shape": a.shape, "batch": a.batch, "seq": a.seq, "compiled": a.compile,
           **profile(step, a.warmup, a.top)}
    close()
    del step, close
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    (Path(a.out) / f"profile_{arm}.json").write_text(json.dumps(res, indent=1))
    print(json.dumps({k: v for k, v in res.items() if k != "top"}), flush=True)
    for row in res["top"]:
        print(f"{row['total_ms']:10.3f} ms {row['count']:6d}x  {row['name'][:120]}", flush=True)


if __name__ == "__main__":
    main()
