"""The benchmark scripts the device call runs (bench/gpu_check.sh) work end to end on the CPU, with
the flags that call passes, so a rename in the recipe cannot cost the GPU its measurements:
bench_train.py (a real launch of recipes/train.py per mode, with a training override) and
profile_step.py (our recipe's loop body under torch.profiler). Tiny shape, a few steps."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run(args: list[str], env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def test_bench_train_times_each_mode_with_an_override(world, tmp_path, env):
    """As `ours ours_1b_concat ...` calls it: modes, steps, warmup and a --train override."""
    run(["bench/bench_train.py", "--shape", "tiny", "--batch", "2", "--seq", "64",
         "--modes", "full-bf16,lora-qat-8da4w", "--steps", "2", "--warmup", "1", "--train", "data.packing=concat",
         "--world", str(world), "--out", str(tmp_path)], env())
    (result,) = tmp_path.glob("*.json")
    rows = json.loads(result.read_text())
    assert [r["mode"] for r in rows] == ["full-bf16", "lora-qat-8da4w"]
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["step_s"] > 0 and r["launch_to_exit_s"] > 0 and r["loss"] > 0, r
        assert r["train"] == ["data.packing=concat"], r


def test_profile_step_profiles_our_step(world, tmp_path, env):
    """As the `profile` step calls it, minus the anchor arm (which needs CUDA): one profiled step of
    ours in bf16 and in QAT; on the CPU the kernel rows are empty and the step's wall time is set."""
    run(["bench/profile_step.py", "--arms", "ours-full-bf16,ours-full-qat-8da4w", "--shape", "tiny", "--batch", "2",
         "--seq", "64", "--warmup", "1", "--world", str(world), "--out", str(tmp_path)], env())
    for arm in ("ours-full-bf16", "ours-full-qat-8da4w"):
        res = json.loads((tmp_path / f"profile_{arm}.json").read_text())
        assert res["arm"] == arm and res["step_s"] > 0 and res["kernels"] == 0 and res["top"] == []
