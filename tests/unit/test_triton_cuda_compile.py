"""The fake quantizers' Triton kernels compile for NVIDIA GPUs, and the machine code keeps the
arithmetic the bitwise tests assume. Triton compiles ahead of time without a GPU (its wheel
carries the CUDA backend and ptxas), so every kernel variant the launchers can pick is compiled
here to a cubin for sm_90 (H100/H200) and the block kernels for sm_80 (A100) too: a kernel that the
interpreter runs but the compiler rejects fails here, not on the first GPU step.

In the PTX of each variant: every fp32 division is IEEE (`div.rn.f32`; no approximate division or
reciprocal), no fp32 fused multiply-add (the launchers pass enable_fp_fusion=False: a fused
multiply-add skips the rounding the reference makes), and no flush of subnormals in arithmetic.
The one flushing instruction is `cvt.rmi.ftz` (floor, in the GGUF kernels), whose operands are
never negative: flushing a positive subnormal and flooring it both give 0.

The interpreter (tests/conftest.py sets TRITON_INTERPRET=1) replaces triton.jit, so the compile
runs in a subprocess without it: `python tests/unit/test_triton_cuda_compile.py` prints a JSON
line per variant."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]


def ptr(bf16: bool) -> str:
    return "*i16" if bf16 else "*fp32"  # bf16 tensors travel as their int16 bits


def affine_variants():
    """(name, kernel args' types, constexprs) of qat/fq_triton.py's kernel as launch() calls it."""
    for name, qmin, qmax, asym, has_scale, float8 in (("intx4", -8, 7, False, False, False),
                                                      ("intx2-learned", -2, 1, False, True, False),
                                                      ("int8-token", -128, 127, True, False, False),
                                                      ("float8", 0, 0, False, False, True)):
        for bf16 in (True, False):
            modes = [(0, bf16, bf16)] if float8 else [(1, bf16, bf16), (2, True, False), (2, False, True)]
            for mode, g_bf16, out_bf16 in modes:
                out_t = ptr(out_bf16 if mode == 2 else bf16)
                sig = {"x_ptr": ptr(bf16), "s_ptr": ptr(bf16), "g_ptr": ptr(g_bf16), "out_ptr": out_t,
                       "mask_ptr": "*u8" if mode == 1 else out_t, "n_seg": "i32", "seg_len": "i32"}
                const = {"QMIN": qmin, "QMAX": qmax, "ASYM": asym, "BF16": bf16, "HAS_SCALE": has_scale,
                         "MODE": mode, "G_BF16": g_bf16, "OUT_BF16": out_bf16, "SEGS": 128, "BLOCK": 32, "CHUNKS": 1,
                         "FLOAT8": float8}
                yield f"affine/{name}/bf16={bf16}/mode={mode}/g={g_bf16}/out={out_bf16}", sig, const
    # a row longer than a block (a per-channel weight, a token of a wide layer): the chunk loop
    sig = {"x_ptr": "*i16", "s_ptr": "*i16", "g_ptr": "*i16", "out_ptr": "*i16", "mask_ptr": "*u8", "n_seg": "i32",
           "seg_len": "i32"}
    yield "affine/int8-token/chunks", sig, {"QMIN": -128, "QMAX": 127, "ASYM": True, "BF16": True, "HAS_SCALE": False,
                                            "MODE": 1, "G_BF16": True, "OUT_BF16": True, "SEGS": 1, "BLOCK": 4096,
                                            "CHUNKS": 3, "FLOAT8": False}


def block_variants():
    """(name, kernel args' types, constexprs) of qat/fq_triton_blocks.py's kernel."""
    from qat.fq_triton_blocks import FORMATS

    masked = ("int4_plain", "int4_tinygemm", "fp8_int4", "q4_0")
    blocks = {"int4_plain": 128, "int4_tinygemm": 32, "fp8_int4": 128, "q4_0": 32, "q8_0": 32, "mxfp4": 32, "nvfp4": 16}
    for f, fmt in enumerate(FORMATS):
        for bf16 in (True, False):
            modes = [(1, bf16, bf16), (2, True, False)] if fmt in masked else [(0, bf16, bf16)]
            for mode, g_bf16, out_bf16 in modes:
                out_t = ptr(out_bf16 if mode == 2 else bf16)
                sig = {"x_ptr": ptr(bf16), "aux_ptr": "*fp32", "g_ptr": ptr(g_bf16), "out_ptr": out_t,
                       "mask_ptr": "*u8" if mode == 1 else out_t, "n_seg": "i32", "seg_len": "i32",
                       "segs_per_row": "i32"}
                const = {"FMT": f, "BF16": bf16, "MODE": mode, "G_BF16": g_bf16, "OUT_BF16": out_bf16,
                         "SEGS": 4096 // blocks[fmt], "BLOCK": blocks[fmt]}
                yield f"blocks/{fmt}/bf16={bf16}/mode={mode}/g={g_bf16}/out={out_bf16}", sig, const


def sm80_block_variants():
    """The bf16 forward of each block format, for sm_80."""
    return [v for v in block_variants() if "bf16=True/mode=0" in v[0] or "bf16=True/mode=1" in v[0]]


def compile_one(job: tuple) -> str:
    """Compile one (kernel name, variant, arch); a JSON line: name, arch, and the PTX's fp32
    division, fused multiply-add and flushing instructions."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from qat.fq_triton import _fq_kernel
    from qat.fq_triton_blocks import _block_kernel

    kernel, (name, sig, const), arch = job
    fn = {"affine": _fq_kernel, "blocks": _block_kernel}[kernel]
    src = ASTSource(fn=fn, signature={**sig, **{k: "constexpr" for k in const}}, constexprs=const)
    k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": 4, "enable_fp_fusion": False})
    ptx = k.asm["ptx"]
    return json.dumps({"name": name, "arch": arch, "cubin": len(k.asm["cubin"]),
                       "div": sorted(set(re.findall(r"\b(?:div|rcp)\.[a-z0-9.]*f32\b", ptx))),
                       "fma": len(re.findall(r"\bfma\.[a-z0-9.]*f32\b", ptx)),
                       "ftz": sorted(set(re.findall(r"\b[a-z]+(?:\.[a-z0-9]+)*\.ftz(?:\.[a-z0-9]+)*\b", ptx)))})


def compile_all() -> None:
    """Compile every variant, two at a time (the compiler is single-threaded), one JSON line each."""
    from concurrent.futures import ProcessPoolExecutor

    jobs = [("affine", v, 90) for v in affine_variants()] + [("blocks", v, 90) for v in block_variants()]
    jobs += [("blocks", v, 80) for v in sm80_block_variants()]
    with ProcessPoolExecutor(max_workers=min(2, os.cpu_count() or 1)) as pool:
        for line in pool.map(compile_one, jobs):
            print(line, flush=True)


def test_every_kernel_variant_compiles_for_sm90_and_sm80_with_ieee_arithmetic(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(ROOT), TRITON_CACHE_DIR=str(tmp_path))  # compiled here, not found in a cache
    r = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == len(list(affine_variants())) + len(list(block_variants())) + len(sm80_block_variants())
    assert {r["name"].split("/")[1] for r in rows if r["arch"] == 80} == {
        "int4_plain", "int4_tinygemm", "fp8_int4", "q4_0", "q8_0", "mxfp4", "nvfp4"}
    for row in rows:
        assert row["cubin"] > 0, row
        assert set(row["div"]) <= {"div.rn.f32"}, row  # IEEE division only
        assert row["fma"] == 0, row
        assert set(row["ftz"]) <= {"cvt.rmi.ftz.f32.f32"}, row
        if any(f in row["name"] for f in ("q4_0", "q8_0")):
            assert row["ftz"] == ["cvt.rmi.ftz.f32.f32"], row  # the floor: only the GGUF kernels use it
        else:
            assert row["ftz"] == [], row
    # the divisions the bitwise tests rely on are there, as IEEE divisions
    assert all(row["div"] == ["div.rn.f32"] for row in rows if "mode=2" not in row["name"])


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    compile_all()
