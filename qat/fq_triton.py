"""Triton kernels of the affine integer fake quantizers and of float8 e4m3 per row: one pass over
the tensor computes each segment's quantization parameters, the fake-quantized values and, when
asked, the clip mask; a second kernel mode multiplies a gradient by the mask it recomputes (the
clipped straight-through estimator), so no mask is ever stored. (float8 never clips: its gradient
passes straight through, no kernel.)

A segment is `seg_len` consecutive elements that share one scale: a group of an intx weight
(symmetric, zero point 0) or a token's row of an int8 per-token activation (asymmetric, integer
zero point). The arithmetic is torchao's, step by step, as the CPU computes it, so the kernel
equals the pure-torch reference (qat/fake_quant.py) bit for bit:

- every torch op on a bf16 tensor computes in fp32 and rounds to bf16 once: here `_dt` rounds an
  fp32 result to the nearest bf16 (ties to even) with integer arithmetic, and bf16 tensors are
  read and written as their int16 bits, not with casts, because Triton's interpreter truncates
  fp32 -> bf16 casts where the GPU rounds, and mishandles subnormals;
- the CPU divides a tensor by a Python scalar (absmax / 7.5, range / 255) and computes 1 / scale
  with IEEE division: `tl.math.div_rn` (plain `/` is an approximate instruction on the GPU; CUDA's
  own torch ops multiply by the scalar's reciprocal instead, which moves an fp32 scale by an ulp);
- torch.round rounds half to even: `_round_half_even` adds and subtracts 1.5 * 2**23;
- the launcher disables fused multiply-adds (`enable_fp_fusion=False`), which would skip a rounding.

Under TRITON_INTERPRET=1 the same kernels run on CPU tensors (numpy, IEEE fp32), which is how the
tests compare them with the reference on a machine without a GPU.
"""

from __future__ import annotations

import contextlib
import os
from typing import Optional

import numpy as np
import torch
import triton
import triton.language as tl

MODE_VALUES, MODE_VALUES_MASK, MODE_STE = 0, 1, 2
# torch.finfo(fp32 and bf16).smallest_normal, torchao's scale floor; constexpr: a compiled kernel reads
# no other globals (the interpreter does, so only tests/unit/test_triton_cuda_compile.py would notice)
_EPS = tl.constexpr(2.0 ** -126)
_ELEMS = 4096  # elements a program holds at once (segments x block)


@triton.jit
def _bf16_round(v):
    """fp32 -> the nearest bf16 value (ties to even), still in fp32; NaN stays NaN."""
    bits = v.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return tl.where(v != v, v, bits.to(tl.float32, bitcast=True))


@triton.jit
def _load(ptr, offs, ok, BF16: tl.constexpr):
    """fp32 values of an fp32 tensor, or of a bf16 one passed as its int16 bits (widened exactly:
    the interpreter's bf16 -> fp32 cast mishandles subnormals)."""
    if BF16:
        bits = tl.load(ptr + offs, mask=ok, other=0).to(tl.int32) & 0xFFFF
        return (bits << 16).to(tl.float32, bitcast=True)
    else:
        return tl.load(ptr + offs, mask=ok, other=0.0).to(tl.float32)


@triton.jit
def _store(ptr, offs, v, ok, BF16: tl.constexpr):
    """Store fp32 `v` into an fp32 tensor, or into a bf16 one (int16 bits) when v holds bf16 values."""
    if BF16:
        tl.store(ptr + offs, (v.to(tl.int32, bitcast=True) >> 16).to(tl.int16), mask=ok)
    else:
        tl.store(ptr + offs, v, mask=ok)


@triton.jit
def _dt(v, BF16: tl.constexpr):
    """A result of a torch op on tensors of the input dtype (fp32 or bf16), from its fp32 value."""
    if BF16:
        return _bf16_round(v)
    else:
        return v


@triton.jit
def _round_half_even(v):
    """torch.round: to the nearest integer, ties to even. |v| >= 2**22 is returned as is: far outside
    every grid, it clips the same way rounded or not. A zero may lose its sign (-0.3 gives +0, torch
    -0): every caller adds a zero point next, and -0 + 0 is +0 in IEEE arithmetic."""
    r = (v + 12582912.0) - 12582912.0
    return tl.where(tl.abs(v) < 4194304.0, r, v)


@triton.jit
def _e4m3_round(v):
    """fp32 -> the nearest float8 e4m3fn value (ties to even), still in fp32, for |v| <= 448 (the
    caller clamps). Normal range (|v| >= 2**-6): 3 mantissa bits kept from fp32's 23 with integer
    rounding; below it, multiples of 2**-9 (e4m3's subnormal step). A zero keeps v's sign and NaN
    stays NaN, as the cast does."""
    bits = v.to(tl.uint32, bitcast=True)
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & 0xFFF00000).to(tl.float32, bitcast=True)
    sub = _round_half_even(v * 512.0) * 0.001953125
    r = tl.where(tl.abs(v) < 0.015625, sub, normal)
    r = tl.where(r == 0.0, v * 0.0, r)
    return tl.where(v != v, v, r)


@triton.jit
def _qparams(lo, hi, QMIN: tl.constexpr, QMAX: tl.constexpr, ASYM: tl.constexpr, BF16: tl.constexpr):
    """torchao's choose_qparams_affine from a segment's min and max: (scale, zero point as float)."""
    lo = tl.minimum(lo, 0.0)
    hi = tl.maximum(hi, 0.0)
    if ASYM:
        scale = _dt(tl.math.div_rn(_dt(hi - lo, BF16), tl.full(lo.shape, QMAX - QMIN, tl.float32)), BF16)
        scale = tl.maximum(scale, _EPS)
        zp = _dt(QMIN - _round_half_even(_dt(tl.math.div_rn(lo, scale), BF16)), BF16)
        zp = tl.minimum(tl.maximum(zp, QMIN), QMAX)
    else:
        half = tl.full(lo.shape, (QMAX - QMIN) / 2, tl.float32)
        scale = tl.maximum(_dt(tl.math.div_rn(tl.maximum(-lo, hi), half), BF16), _EPS)
        zp = tl.zeros(lo.shape, tl.float32)
    return scale, zp


@triton.jit
def _fq_kernel(x_ptr, s_ptr, g_ptr, out_ptr, mask_ptr, n_seg, seg_len,
               QMIN: tl.constexpr, QMAX: tl.constexpr, ASYM: tl.constexpr, BF16: tl.constexpr,
               HAS_SCALE: tl.constexpr, MODE: tl.constexpr, G_BF16: tl.constexpr, OUT_BF16: tl.constexpr,
               SEGS: tl.constexpr, BLOCK: tl.constexpr, CHUNKS: tl.constexpr, FLOAT8: tl.constexpr):
    """SEGS segments per program, each read in CHUNKS blocks of BLOCK elements: first their min and
    max (unless the scale is given), then the quantization of every element. FLOAT8: e4m3 with a
    scale of absmax / 448 per segment instead of an integer grid (MODE_VALUES only: no clipping)."""
    seg = tl.program_id(0) * SEGS + tl.arange(0, SEGS)
    seg_ok = seg < n_seg
    base = seg.to(tl.int64) * seg_len
    cols = tl.arange(0, BLOCK)
    if HAS_SCALE:
        scale = tl.where(seg_ok, _load(s_ptr, seg, seg_ok, BF16), 1.0)  # padding lanes: a harmless 1
        zp = tl.zeros(scale.shape, tl.float32)
    else:
        lo = tl.full((SEGS,), float("inf"), tl.float32)
        hi = tl.full((SEGS,), float("-inf"), tl.float32)
        for c in range(CHUNKS):
            k = c * BLOCK + cols
            ok = seg_ok[:, None] & (k < seg_len)[None, :]
            v = _load(x_ptr, base[:, None] + k[None, :], ok, BF16)
            lo = tl.minimum(lo, tl.min(tl.where(ok, v, float("inf")), axis=1))
            hi = tl.maximum(hi, tl.max(tl.where(ok, v, float("-inf")), axis=1))
        if FLOAT8:  # torchao's _choose_scale_float8: absmax (x's dtype) / 448, in x's dtype, then fp32
            scale = _dt(tl.math.div_rn(tl.maximum(-lo, hi), tl.full(lo.shape, 448.0, tl.float32)), BF16)
            zp = tl.zeros(scale.shape, tl.float32)
        else:
            scale, zp = _qparams(lo, hi, QMIN, QMAX, ASYM, BF16)
    if FLOAT8:  # _quantize_affine_float8 then _dequantize_affine_float8: fp32 division, clamp, cast
        for c in range(CHUNKS):
            k = c * BLOCK + cols
            ok = seg_ok[:, None] & (k < seg_len)[None, :]
            offs = base[:, None] + k[None, :]
            v = tl.math.div_rn(_load(x_ptr, offs, ok, BF16), tl.broadcast_to(scale[:, None], (SEGS, BLOCK)))
            q = _e4m3_round(tl.where(v != v, v, tl.minimum(tl.maximum(v, -448.0), 448.0)))
            _store(out_ptr, offs, _dt(q * scale[:, None], BF16), ok, BF16)
    else:
        inv = _dt(tl.math.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale), BF16)
        for c in range(CHUNKS):
            k = c * BLOCK + cols
            ok = seg_ok[:, None] & (k < seg_len)[None, :]
            offs = base[:, None] + k[None, :]
            x = _load(x_ptr, offs, ok, BF16)
            q = _dt(_round_half_even(_dt(x * inv[:, None], BF16)) + zp[:, None], BF16)
            inside = (q >= QMIN) & (q <= QMAX)
            if MODE == 2:  # the clipped straight-through gradient: g where inside, g * 0 where clipped
                g = _load(g_ptr, offs, ok, G_BF16)
                _store(out_ptr, offs, _dt(tl.where(inside, g, g * 0.0), OUT_BF16), ok, OUT_BF16)
            else:
                qc = tl.minimum(tl.maximum(q, QMIN), QMAX)
                _store(out_ptr, offs, _dt(_dt(qc - zp[:, None], BF16) * scale[:, None], BF16), ok, BF16)
                if MODE == 1:
                    tl.store(mask_ptr + offs, inside.to(tl.uint8), mask=ok)


def _layout(n_seg: int, seg_len: int, max_block: int) -> tuple[int, int, int]:
    """(segments per program, block, chunks): about _ELEMS elements in flight per program on a GPU;
    the interpreter, whose cost is per program and per op rather than per element, takes 16x more."""
    elems = _ELEMS * (16 if os.environ.get("TRITON_INTERPRET") == "1" else 1)
    block = min(triton.next_power_of_2(seg_len), max_block)
    segs = max(1, min(elems // block, triton.next_power_of_2(n_seg)))
    return segs, block, triton.cdiv(seg_len, block)


def launch(x: torch.Tensor, seg_len: int, qmin: int, qmax: int, asym: bool, scale: Optional[torch.Tensor],
           mode: int, grad: Optional[torch.Tensor] = None, out_dtype: Optional[torch.dtype] = None,
           max_block: int = _ELEMS, float8: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Run the kernel over contiguous `x` ([..., seg_len * k], fp32 or bf16) in segments of `seg_len`.

    MODE_VALUES / MODE_VALUES_MASK: (fake-quantized x in x's dtype, uint8 mask viewed as bool or
    None). MODE_STE: (grad * mask in `out_dtype`, None). `scale`: one per segment, already in x's
    dtype and floored (a learned scale), or None for the dynamic rule. `max_block`: the longest
    chunk of a segment read at once (the tests shorten it to exercise the chunk loop). `float8`:
    float8 e4m3 per segment (qmin, qmax, asym and scale unused; MODE_VALUES only)."""
    if float8 and (mode != MODE_VALUES or scale is not None):
        raise ValueError("the float8 kernel computes values only, from its own scales")
    n_seg = x.numel() // seg_len
    out, mask = outputs(x, mode, grad, out_dtype)
    if n_seg == 0:
        return out, mask
    segs, block, chunks = _layout(n_seg, seg_len, max_block)
    grid = (triton.cdiv(n_seg, segs),)
    with interpreter_quiet():
        _fq_kernel[grid](_bits(x), _bits(scale if scale is not None else x), _bits(grad if grad is not None else x),
                         _bits(out), mask.view(torch.uint8) if mask is not None else out, n_seg, seg_len,
                         QMIN=qmin, QMAX=qmax, ASYM=asym, BF16=_is_bf16(x), HAS_SCALE=scale is not None, MODE=mode,
                         G_BF16=_is_bf16(grad), OUT_BF16=_is_bf16(out), SEGS=segs, BLOCK=block, CHUNKS=chunks,
                         FLOAT8=float8, num_warps=4, enable_fp_fusion=False)
    return out, mask


def outputs(x: torch.Tensor, mode: int, grad: Optional[torch.Tensor],
            out_dtype: Optional[torch.dtype]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """A kernel's (output, mask or None) for `mode`: the values in x's dtype, or the gradient in
    `out_dtype` (grad's by default); a bool mask (written as uint8) in MODE_VALUES_MASK."""
    if mode == MODE_STE:
        out = torch.empty(x.shape, dtype=out_dtype or grad.dtype, device=x.device)
    else:
        out = torch.empty_like(x)
    return out, (torch.empty(x.shape, dtype=torch.bool, device=x.device) if mode == MODE_VALUES_MASK else None)


def interpreter_quiet():
    """Silence numpy's floating-point warnings while Triton's interpreter runs a kernel: every lane
    computes both sides of a select (inf * 0, 0 / 0 where a scale is zero) and the select then
    drops the value numpy warned about. On a GPU there is nothing to silence."""
    return np.errstate(all="ignore") if os.environ.get("TRITON_INTERPRET") == "1" else contextlib.nullcontext()


def _is_bf16(t: Optional[torch.Tensor]) -> bool:
    return t is not None and t.dtype == torch.bfloat16


def _bits(t: torch.Tensor) -> torch.Tensor:
    """bf16 tensors travel as their int16 bits (see `_load`)."""
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t
