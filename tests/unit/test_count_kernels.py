"""The full-size passes of one fake-quantized training step on the route CUDA runs
(bench/count_kernels.py): at most 12 per QATLinear, forward and backward, for every family with a
Triton kernel: 8da4w, intx weight-only, float8, int4, float8-then-int4, NVFP4, MXFP4, GGUF Q4_0 and
Q8_0. A count is deterministic, so the exact numbers are asserted too: a change that adds a pass
shows here (update docs/benchmarks.md with the new table)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]

SCHEMES = ("8da4w", "intx4-weight-only", "float8", "int4-weight-only", "fp8-int4", "nvfp4", "mxfp4", "q4_0", "q8_0")
# (scheme, case): (passes of the whole step, passes inside the QATLinears)
EXPECTED = {
    ("8da4w", "linear"): (9, 9), ("8da4w", "lora"): (16, 6), ("8da4w", "lora-once"): (14, 4),
    ("8da4w", "qkv"): (25, 23),
    ("intx4-weight-only", "linear"): (6, 6), ("intx4-weight-only", "lora"): (14, 4),
    ("intx4-weight-only", "lora-once"): (12, 2), ("intx4-weight-only", "qkv"): (20, 18),
    ("float8", "linear"): (7, 7), ("float8", "lora"): (15, 5), ("float8", "lora-once"): (13, 3),
    ("float8", "qkv"): (19, 17),
    ("int4-weight-only", "linear"): (6, 6), ("int4-weight-only", "lora"): (14, 4),
    ("int4-weight-only", "lora-once"): (12, 2), ("int4-weight-only", "qkv"): (20, 18),
    ("fp8-int4", "linear"): (8, 8), ("fp8-int4", "lora"): (15, 5),
    ("fp8-int4", "lora-once"): (13, 3), ("fp8-int4", "qkv"): (22, 20),
    ("nvfp4", "linear"): (7, 7), ("nvfp4", "lora"): (15, 5),
    ("nvfp4", "lora-once"): (15, 5), ("nvfp4", "qkv"): (19, 17),
    ("mxfp4", "linear"): (7, 7), ("mxfp4", "lora"): (15, 5),
    ("mxfp4", "lora-once"): (13, 3), ("mxfp4", "qkv"): (19, 17),
    ("q4_0", "linear"): (8, 8), ("q4_0", "lora"): (15, 5),
    ("q4_0", "lora-once"): (13, 3), ("q4_0", "qkv"): (22, 20),
    ("q8_0", "linear"): (7, 7), ("q8_0", "lora"): (15, 5),
    ("q8_0", "lora-once"): (13, 3), ("q8_0", "qkv"): (19, 17),
}


def test_a_training_step_makes_at_most_12_full_size_passes_per_qat_linear(tmp_path, env):
    out = tmp_path / "counts.json"
    subprocess.run([sys.executable, str(ROOT / "bench/count_kernels.py"), "--schemes", ",".join(SCHEMES),
                    "--json", str(out)], cwd=ROOT, env=env(), check=True, capture_output=True, timeout=600)
    rows = json.loads(out.read_text())["rows"]
    got = {(r["scheme"], r["case"]): (r["passes"], r["in_qatlinear"]) for r in rows}
    assert got == EXPECTED
    for r in rows:
        # the adapters' own passes (lora) are not the QATLinear's; everything else in the step is
        own = r["in_qatlinear"] if r["case"].startswith("lora") else r["passes"]
        assert own / r["layers"] <= 12, r
    linear = next(r for r in rows if r["case"] == "linear")
    assert linear["ops"].count("qat.fused_fq") == 4  # 8da4w on the Triton route: weight and input, twice


def test_the_bandwidth_bench_runs_every_scheme_and_its_routes_agree(tmp_path, env):
    """bench/fq_bandwidth.py (run on the GPU by bench/gpu_check.sh) at tiny shapes in Triton's
    interpreter: every scheme's weight and activation passes, both tile sizes, each Triton output
    bitwise equal to the torch route's (the bench exits non-zero otherwise)."""
    subprocess.run([sys.executable, str(ROOT / "bench/fq_bandwidth.py"), "--smoke", "--elems", "4096,2048",
                    "--out", str(tmp_path)], cwd=ROOT, env=env(), check=True, capture_output=True, timeout=600)
    rows = json.loads((tmp_path / "fq_bandwidth.json").read_text())["rows"]
    assert {r["scheme"] for r in rows} == set(SCHEMES) and all(r["equal"] for r in rows)
    masked = {(r["scheme"], r["tensor"]) for r in rows if r["pass"] == "ste"}
    assert ("8da4w", "activation") in masked and ("int4-weight-only", "weight") in masked
    assert ("nvfp4", "weight") not in masked  # a pure straight-through format has no backward kernel
    assert {r["elems"] for r in rows} == {4096, 2048}
