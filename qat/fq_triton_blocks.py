"""Triton kernels of the block formats: torchao's GPU int4 (both packings), float8-then-int4,
GGUF Q4_0 / Q8_0, MXFP4 and NVFP4. Each block (a group of 16 to 1024 consecutive elements
that share a scale) fits in one tile row, so a program loads its blocks once and computes the
block's scale, the fake-quantized values and, when asked, the clip mask in registers; the
straight-through mode multiplies a gradient by the mask it recomputes in the same pass.

The arithmetic is each format's reference, operation by operation, so the kernel equals the
pure-torch quantizer (qat/int4_grid.py, qat/gguf_quant.py, torchao's float8 and MX/NVFP4
code) bit for bit; the conventions (bf16 rounding with integer arithmetic, IEEE division,
round-half-even, no fused multiply-adds) are those of qat/fq_triton.py, whose helpers this
module uses. Where a block needs a statistic of more than itself, one torch reduction computes
it first (`_aux`): NVFP4's per-tensor amax, float8-then-int4's per-row float8 scale.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from qat.fq_triton import (_bf16_round, _bits, _dt, _e4m3_round, _is_bf16, _layout, _load, _round_half_even, _store,
                           interpreter_quiet, outputs)

FORMATS = ("int4_plain", "int4_tinygemm", "fp8_int4", "q4_0", "q8_0", "mxfp4", "nvfp4")
(INT4_PLAIN, INT4_TINYGEMM, FP8_INT4, Q4_0, Q8_0, MXFP4, NVFP4) = range(len(FORMATS))


@triton.jit
def _amax(a, ok):
    """max |x| of each row of the tile (a = |x|), NaN where the row holds one (as torch.amax)."""
    m = tl.max(tl.where(ok, a, 0.0), axis=1)
    nan = tl.max(tl.where(ok & (a != a), 1, 0), axis=1)
    return tl.where(nan > 0, float("nan"), m)


@triton.jit
def _fp16_round(v):
    """fp32 -> the nearest fp16 value (ties to even; subnormals, overflow to inf), still in fp32."""
    bits = v.to(tl.uint32, bitcast=True)
    normal = ((bits + 0xFFF + ((bits >> 13) & 1)) & 0xFFFFE000).to(tl.float32, bitcast=True)
    normal = tl.where(tl.abs(normal) > 65504.0, v * float("inf"), normal)
    sub = _round_half_even(v * 16777216.0) * 5.9604644775390625e-08  # multiples of 2**-24
    r = tl.where(tl.abs(v) < 6.103515625e-05, sub, normal)
    r = tl.where(r == 0.0, v * 0.0, r)
    return tl.where(v != v, v, r)


@triton.jit
def _fma_bf16(c, scale, zero):
    """bf16(c * scale + zero) rounded once, as a bf16 fused multiply-add (qat/int4_grid.py's
    fma_to_bf16): the exact product, an fp32 sum, TwoSum's error, one step off a double rounding."""
    p = c * scale
    s = p + zero
    t = s - p
    e = (p - (s - t)) + (zero - t)
    bits = s.to(tl.int32, bitcast=True)
    midpoint = (bits & 0xFFFF) == 0x8000
    step = tl.where((e > 0) == (s > 0), 1, -1)
    bits = tl.where(midpoint & (e != 0), bits + step, bits)
    return _bf16_round(bits.to(tl.float32, bitcast=True))


@triton.jit
def _e2m1_code(v):
    """torchao's f32_to_f4_unpacked, integer step by integer step: the 4-bit E2M1 code of v
    (round to nearest even, saturating at 6; the sign in bit 3)."""
    ub = v.to(tl.uint32, bitcast=True)
    a = (ub & 0x7FFFFFFF).to(tl.float32, bitcast=True)
    saturate = a >= 6.0
    denormal = (a < 1.0) & (~saturate)
    normal = ~(saturate | denormal)
    dcode = ((a + 4194304.0).to(tl.int32, bitcast=True) - (149 << 23)) & 0xFF
    nb = a.to(tl.int32, bitcast=True)
    ncode = ((nb + (-126 << 23) + 2097151 + ((nb >> 22) & 1)) >> 22) & 0xFF
    code = tl.where(denormal, dcode, tl.where(normal, ncode, 7))
    return code | ((ub >> 28) & 8).to(tl.int32)


@triton.jit
def _e2m1_value(code):
    """The fp32 value of a 4-bit E2M1 code (-0.0 for code 8)."""
    e = (code >> 1) & 3
    m = (code & 1).to(tl.float32)
    mag = tl.where(e == 0, m * 0.5, (1.0 + m * 0.5) * tl.where(e == 1, 1.0, tl.where(e == 2, 2.0, 4.0)))
    sign = (code & 8).to(tl.uint32) << 28  # bit 31: -0.0 for code 8 (Triton's -x is 0 - x, which gives +0)
    return (mag.to(tl.uint32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def _int4(w, ok, PLAIN: tl.constexpr):
    """(codes 0-based before the clamp, bf16 values) of torchao's GPU int4 on bf16 values `w`."""
    lo = tl.min(tl.where(ok, w, float("inf")), axis=1)[:, None]
    hi = tl.max(tl.where(ok, w, float("-inf")), axis=1)[:, None]
    if PLAIN:  # fp32 qparams (mslk's int4_row_quantize_zp), stored bf16
        scale = tl.math.div_rn(tl.maximum(hi - lo, 1e-6), tl.full(lo.shape, 15.0, tl.float32))
        zero = lo + scale * 8.0
        q = _round_half_even(tl.math.div_rn(w - lo, tl.broadcast_to(scale, w.shape)))
        scale, zero = _bf16_round(scale), _bf16_round(zero)
    else:  # tinygemm: every op in bf16
        scale = tl.maximum(_bf16_round(tl.math.div_rn(_bf16_round(hi - lo), tl.full(lo.shape, 15.0, tl.float32))),
                           1.1754943508222875e-38)
        zero = _bf16_round(lo + _bf16_round(scale * 8.0))
        min_val = _bf16_round(zero - _bf16_round(scale * 8.0))
        q = _round_half_even(_bf16_round(tl.math.div_rn(_bf16_round(w - min_val), tl.broadcast_to(scale, w.shape))))
    qc = tl.minimum(tl.maximum(q, 0.0), 15.0) - 8.0
    return q, _fma_bf16(qc, tl.broadcast_to(scale, w.shape), tl.broadcast_to(zero, w.shape))


@triton.jit
def _fp8_int4(x, ok, row_scale, BF16: tl.constexpr):
    """(int4 codes before the clamp, values) of float8 e4m3 per row (`row_scale`, fp32) followed
    by symmetric int4 of the block, scale max(absmax / 8, 1e-6) in x's dtype (torchao's
    Float8DynamicActivationInt4Weight QAT weights)."""
    v = tl.math.div_rn(x, tl.broadcast_to(row_scale, x.shape))
    w8 = _dt(_e4m3_round(tl.where(v != v, v, tl.minimum(tl.maximum(v, -448.0), 448.0))) * row_scale, BF16)
    amax = _amax(tl.abs(w8), ok)[:, None]
    scale = _dt(tl.maximum(_dt(tl.math.div_rn(amax, tl.full(amax.shape, 8.0, tl.float32)), BF16), 1e-6), BF16)
    inv = _dt(tl.math.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale), BF16)
    q = _dt(_round_half_even(_dt(w8 * inv, BF16)) + 0.0, BF16)
    return q, _dt(tl.minimum(tl.maximum(q, -8.0), 7.0) * scale, BF16)


@triton.jit
def _gguf(x, ok, cols, Q4: tl.constexpr, BF16: tl.constexpr):
    """(Q4_0 codes before the clamp or Q8_0 codes, values in x's dtype) of blocks of 32 (the
    gguf package's numpy reference, qat/gguf_quant.py)."""
    a = tl.abs(x)
    amax = tl.max(tl.where(ok, a, 0.0), axis=1)
    if Q4:  # d = the signed value of the first largest magnitude / -8
        first = tl.min(tl.where(ok & (a == amax[:, None]), cols[None, :], 1 << 30), axis=1)
        m = tl.max(tl.where(cols[None, :] == first[:, None], x, float("-inf")), axis=1)  # keeps a -0.0
        d = tl.math.div_rn(m, tl.full(m.shape, -8.0, tl.float32))[:, None]
    else:
        d = tl.math.div_rn(amax, tl.full(amax.shape, 127.0, tl.float32))[:, None]
    inv = tl.where(d == 0.0, 0.0, tl.math.div_rn(tl.full(d.shape, 1.0, tl.float32), tl.where(d == 0.0, 1.0, d)))
    d16 = _fp16_round(d)
    v = x * inv
    if Q4:
        q = tl.floor(v + 8.5)  # trunc: v + 8.5 is positive
        return q, _dt((tl.minimum(tl.maximum(q, 0.0), 15.0) - 8.0) * d16, BF16)
    else:
        av = tl.abs(v)
        fl = tl.floor(av)
        r = fl + tl.floor(2.0 * (av - fl))  # roundf: halves away from zero
        q = tl.where(v < 0.0, -r, r) + 0.0
        return q, _dt(q * d16, BF16)


@triton.jit
def _mxfp4(x, ok, BF16: tl.constexpr):
    """Values of MXFP4 (torchao's to_mx, FLOOR scales, then to_dtype): E8M0 scale from the block's
    absmax exponent minus 2, E2M1 codes of x / scale. Quantizing floors the scale at 2**-126;
    dequantizing uses 2**(e - 127) itself (2**-127 for e = 0), as torchao does."""
    amax = _amax(tl.abs(x), ok)[:, None]
    e = ((amax.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127 - 2
    e = tl.minimum(tl.maximum(e, -127), 128) + 127
    e = tl.where(amax != amax, 255, e)
    q_scale = tl.maximum((e << 23).to(tl.float32, bitcast=True), 1.1754943508222875e-38)
    code = _e2m1_code(tl.math.div_rn(x, tl.broadcast_to(q_scale, x.shape)))
    bits = tl.where(e == 0, 0x400000, e << 23)  # 2**-127 is subnormal: its bits are not e << 23
    s = bits.to(tl.float32, bitcast=True)
    s = tl.where(e == 255, float("nan"), s)
    return _dt(_e2m1_value(code) * s, BF16)


@triton.jit
def _nvfp4(x, ok, pts):
    """fp32 values of NVFP4 with a per-tensor scale `pts` (torchao's nvfp4_quantize and
    dequantize): E4M3 block scales of absmax / 6 / pts, E2M1 codes, value = code * (pts * s8)."""
    amax = _amax(tl.abs(x), ok)[:, None]
    sb = tl.math.div_rn(tl.math.div_rn(amax, tl.full(amax.shape, 6.0, tl.float32)), tl.broadcast_to(pts, amax.shape))
    s8 = _e4m3_round(tl.where(sb != sb, sb, tl.minimum(tl.maximum(sb, 0.015625), 448.0)))
    recip = tl.math.div_rn(tl.math.div_rn(tl.full(amax.shape, 1.0, tl.float32), tl.broadcast_to(pts, amax.shape)), s8)
    v = x * recip
    code = _e2m1_code(tl.where(v != v, v, tl.minimum(tl.maximum(v, -6.0), 6.0)))
    return _e2m1_value(code) * (pts * s8)


@triton.jit
def _block_kernel(x_ptr, aux_ptr, g_ptr, out_ptr, mask_ptr, n_seg, seg_len, segs_per_row,
                  FMT: tl.constexpr, BF16: tl.constexpr, MODE: tl.constexpr, G_BF16: tl.constexpr,
                  OUT_BF16: tl.constexpr, SEGS: tl.constexpr, BLOCK: tl.constexpr):
    """SEGS blocks per program, each loaded once: its scale, then the values (and mask), or the
    gradient times the recomputed mask (MODE_STE)."""
    seg = tl.program_id(0) * SEGS + tl.arange(0, SEGS)
    cols = tl.arange(0, BLOCK)
    ok = (seg < n_seg)[:, None] & (cols < seg_len)[None, :]
    offs = seg.to(tl.int64)[:, None] * seg_len + cols[None, :]
    x = _load(x_ptr, offs, ok, BF16)
    inside = ok  # FMT (the index in FORMATS) picks the format at compile time
    if FMT == 0 or FMT == 1:  # int4_plain, int4_tinygemm: on the bf16 weight
        q, vals = _int4(_bf16_round(x), ok, FMT == 0)
        inside = (q >= 0.0) & (q <= 15.0)
    elif FMT == 2:  # fp8_int4: the row's float8 scale from _aux
        row_scale = tl.load(aux_ptr + seg // segs_per_row, mask=seg < n_seg, other=1.0)[:, None]
        q, vals = _fp8_int4(x, ok, row_scale, BF16)
        inside = (q >= -8.0) & (q <= 7.0)
    elif FMT == 3:  # q4_0
        q, vals = _gguf(x, ok, cols, True, BF16)
        inside = q <= 15.0
    elif FMT == 4:  # q8_0, which never clips
        q, vals = _gguf(x, ok, cols, False, BF16)
    elif FMT == 5:  # mxfp4
        vals = _mxfp4(x, ok, BF16)
    else:  # nvfp4: the per-tensor scale from _aux
        vals = _dt(_nvfp4(x, ok, tl.load(aux_ptr)), BF16)
    if MODE == 2:  # MODE_STE
        g = _load(g_ptr, offs, ok, G_BF16)
        _store(out_ptr, offs, _dt(tl.where(inside, g, g * 0.0), OUT_BF16), ok, OUT_BF16)
    else:
        _store(out_ptr, offs, vals, ok, BF16)
        if MODE == 1:
            tl.store(mask_ptr + offs, inside.to(tl.uint8), mask=ok)


def _aux(fmt: int, x: torch.Tensor) -> Optional[torch.Tensor]:
    """What a block needs from beyond itself, by one torch reduction over x (|x|'s max, NaN
    propagating, in x's dtype as torch.abs().amax() computes it). The divisor is a 0-dim tensor:
    CUDA divides by a Python scalar through its reciprocal, which can move the result by an ulp
    from the CPU's IEEE quotient (the reference's); tensor by tensor it divides exactly."""
    inf = float("inf")
    if fmt == NVFP4:  # torchao's per_tensor_amax_to_scale: fp32 amax / (448 * 6)
        amax = torch.linalg.vector_norm(x, inf).float()
        return (amax / torch.full((), 448.0 * 6.0, device=x.device)).reshape(1)
    if fmt == FP8_INT4:  # torchao's _choose_scale_float8 per row, hp_value_lb=1e-12: in x's dtype, then fp32
        amax = torch.linalg.vector_norm(x.reshape(-1, x.shape[-1]), inf, dim=-1).clamp(min=1e-12)
        return (amax / torch.full((), 448.0, dtype=amax.dtype, device=x.device)).float()
    return None


def launch(x: torch.Tensor, fmt: str, seg_len: int, mode: int, grad: Optional[torch.Tensor] = None,
           out_dtype: Optional[torch.dtype] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Fake-quantize contiguous `x` (fp32 or bf16, last dimension a multiple of `seg_len`) in
    blocks of `seg_len` with format `fmt` (one of FORMATS); returns what fq_triton.launch returns
    for the same `mode`."""
    f = FORMATS.index(fmt)
    out, mask = outputs(x, mode, grad, out_dtype)
    n_seg = x.numel() // seg_len
    if n_seg == 0:
        return out, mask
    aux = _aux(f, x)
    segs, block, _ = _layout(n_seg, seg_len, triton.next_power_of_2(seg_len))  # a block fits in a tile row
    with interpreter_quiet():
        _block_kernel[(triton.cdiv(n_seg, segs),)](
            _bits(x), aux if aux is not None else x, _bits(grad if grad is not None else x), _bits(out),
            mask.view(torch.uint8) if mask is not None else out, n_seg, seg_len, x.shape[-1] // seg_len,
            FMT=f, BF16=_is_bf16(x), MODE=mode, G_BF16=_is_bf16(grad), OUT_BF16=_is_bf16(out), SEGS=segs, BLOCK=block,
            num_warps=4, enable_fp_fusion=False)
    return out, mask
