"""The grid of torchao's GPU int4 (`Int4WeightOnlyConfig`), as each packing convert can pick
computes it, so that the fake quantizer trains exactly the weights the kernels multiply with.

Both kernels take bf16 weights (the export dtype of an int4 model), so the grid is computed from
the weight rounded to bf16, whatever the training dtype. Per group of `group_size` input features:

plain (`Int4Tensor`, mslk's bf16i4bf16 kernel; torchao quantizes with mslk's
    `int4_row_quantize_zp`): in fp32, scale = max(max - min, 1e-6) / 15, zero = min + 8 * scale,
    code = clamp(round((w - min) / scale), 0, 15) - 8; `Int4Tensor.from_hp` then stores scale and
    zero in the weight's dtype (bf16). The codes come from the fp32 scale, the values from the
    bf16 one: torchao's QAT fake quantizer (`Int4WeightFakeQuantizer`) dequantizes with the fp32
    scale and zero, which are not the exported ones.
tile_packed_to_4d (`Int4TilePackedTo4dTensor`, PyTorch's tinygemm `_weight_int4pack_mm`; torchao
    quantizes with `_choose_qparams_affine_tinygemm` and `_quantize_affine_tinygemm`): every step
    in bf16 arithmetic (each op rounds to bf16): scale = max((max - min) / 15, bf16 tiny),
    zero = min + 8 * scale, code = clamp(round((w - (zero - 8 * scale)) / scale), 0, 15) - 8.

Dequantization, both kernels: bf16(code) * scale + zero as one bf16 fused multiply-add (tinygemm:
`__hfma2` in `BLayout_TC_int4::load`), i.e. the exact value rounded once to bf16; `fma_to_bf16`
computes it bit for bit on any device.

All divisions are tensor by tensor (IEEE-rounded on the CPU and on CUDA; CUDA divides by a Python
scalar through its reciprocal, which can move an fp32 scale by one ulp and a code at a tie).
"""

from __future__ import annotations

from typing import Optional

import torch

PACKINGS = ("plain", "tile_packed_to_4d")
QMAX, MID = 15, 8


def _const(like: torch.Tensor, value: float) -> torch.Tensor:
    """A 0-dim tensor on `like`'s device: dividing by it is a true division on CUDA too."""
    return torch.full((), value, dtype=like.dtype, device=like.device)


def plain_grid(wg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(unclamped rounded codes 0-based, scale bf16, zero bf16) of bf16 groups [rows, groups, gs],
    as mslk's `int4_row_quantize_zp` and `Int4Tensor.from_hp` compute them."""
    x = wg.float()
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    scale = (hi - lo).clamp(min=1e-6) / _const(x, QMAX)
    zero = lo + scale * MID
    q = torch.round((x - lo) / scale)
    return q, scale.to(torch.bfloat16), zero.to(torch.bfloat16)


def tinygemm_grid(wg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(unclamped rounded codes 0-based, scale bf16, zero bf16) of bf16 groups [rows, groups, gs],
    as `_choose_qparams_affine_tinygemm` and `_quantize_affine_tinygemm` compute them in bf16."""
    lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
    scale = ((hi - lo) / _const(wg, QMAX)).clamp(min=torch.finfo(torch.bfloat16).smallest_normal)
    zero = lo + scale * MID
    min_val = zero - scale * MID
    q = torch.round((wg - min_val) / scale)
    return q, scale, zero


def fma_to_bf16(c: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """bf16(c * scale + zero) rounded once (a bf16 fused multiply-add), for integer c in -8..7 and
    bf16 scale and zero. c * scale is exact in fp32 (at most 12 significant bits); the fp32 sum
    s = p + zero rounds once, and TwoSum gives its exact error e. Rounding s to bf16 is then the
    correct rounding of p + zero unless s landed exactly on a bf16 midpoint with e != 0 (a double
    rounding): there s moves one fp32 ulp towards the exact value first."""
    p = c.float() * scale.float()
    z = zero.float()
    s = p + z
    t = s - p
    e = (p - (s - t)) + (z - t)  # TwoSum: p + z == s + e exactly
    bits = s.view(torch.int32)
    midpoint = (bits & 0xFFFF) == 0x8000  # the 16 bits bf16 drops are exactly one half
    away = (e > 0) == (s > 0)  # the exact value lies farther from zero than s
    step = torch.where(away, 1, -1).to(torch.int32)
    bits = torch.where(midpoint & (e != 0), bits + step, bits)
    return bits.view(torch.float32).to(torch.bfloat16)


def int4_fake_quant(w: torch.Tensor, group_size: int, packing: str,
                    mask: bool = True) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(the exported bf16 values in w's dtype, mask of the weights round-then-clamp did not clip, or
    None when `mask` is False)."""
    wg = w.to(torch.bfloat16).reshape(w.shape[0], -1, group_size)
    q, scale, zero = (plain_grid if packing == "plain" else tinygemm_grid)(wg)
    inside = ((q >= 0) & (q <= QMAX)).reshape(w.shape) if mask else None
    wq = fma_to_bf16(q.clamp(0, QMAX) - MID, scale, zero)
    return wq.reshape(w.shape).to(w.dtype), inside
