"""GGUF Q4_0 and Q8_0 numerics in torch: the codes llama.cpp stores and the values it multiplies.

Both formats cut a row into blocks of 32 values along the input dimension and store one fp16
scale `d` per block. The rules are those of the `gguf` package's numpy reference quantizers
(`gguf.quants`, which writes the codes llama.cpp's own converter stores), reproduced operation for
operation so that our codes equal theirs bit for bit (tests/unit/test_gguf_quant.py):

    Q4_0  m = the block's signed value of largest |x| (the first one on a tie of magnitudes)
          d = m / -8 (fp32); id = 1 / d (0 when d == 0)
          code = min(15, trunc(x * id + 8.5))  (fp32 product, then fp32 sum: 0..15)
          value = (code - 8) * float32(fp16(d))
    Q8_0  d = max|x| / 127 (fp32); id = 1 / d (0 when d == 0)
          code = roundf(x * id) (fp32 product, halves away from zero), -127..127
          value = code * float32(fp16(d))

Q4_0 puts m at code 0 (value -8 d = m), so the other sign reaches +7.5 d and above before the
clamp at 15 (value +7 d): those weights are the ones Q4_0 clips, and the clipped straight-through
gradient stops there. Q8_0 never clips.

The values are computed in fp32 (what gguf's dequantize returns); a fake quantizer returns them
in the weight's dtype, so a bf16 run multiplies bf16 roundings of them.
"""

from __future__ import annotations

from typing import Optional

from dataclasses import dataclass

import numpy as np
import torch

from qat.fq_op import OpaqueFakeQuant, blocks_call

BLOCK = 32
FORMATS = ("q4_0", "q8_0")


def _blocks(x: torch.Tensor) -> torch.Tensor:
    if x.shape[-1] % BLOCK:
        raise ValueError(f"GGUF blocks of {BLOCK} need the last dimension divisible by {BLOCK}, not {x.shape[-1]}")
    return x.float().reshape(-1, BLOCK)


def _inverse(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1.0 / torch.where(d == 0, torch.ones_like(d), d))


def q4_0_codes(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes uint8 [n, 32] in 0..15, d fp16 [n, 1], inside [n, 32]: code before the clamp <= 15)."""
    b = _blocks(x)
    imax = b.abs().argmax(dim=-1, keepdim=True)  # first index of the largest magnitude, as numpy
    d = torch.gather(b, -1, imax) / -8
    q = torch.trunc(b * _inverse(d) + 8.5)  # two fp32 roundings, as the numpy reference
    return q.clamp(0, 15).to(torch.uint8), d.half(), q <= 15


def q8_0_codes(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes int8 [n, 32], d fp16 [n, 1])."""
    b = _blocks(x)
    d = b.abs().amax(dim=-1, keepdim=True) / 127
    v = b * _inverse(d)
    a = v.abs()
    floored = torch.floor(a)
    q = torch.sign(v) * (floored + torch.floor(2 * (a - floored)))  # roundf: halves away from zero
    return q.to(torch.int8), d.half()


def dequantize(fmt: str, codes: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """fp32 [n, 32] values of the blocks."""
    q = codes.float() - 8 if fmt == "q4_0" else codes.float()
    return q * d.float()


def fake_quantize(fmt: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(values in x's dtype and shape, mask of the values the format did not clip)."""
    if fmt == "q4_0":
        codes, d, inside = q4_0_codes(x)
    else:
        codes, d = q8_0_codes(x)
        inside = torch.ones(codes.shape, dtype=torch.bool, device=x.device)
    return dequantize(fmt, codes, d).reshape(x.shape).to(x.dtype), inside.reshape(x.shape)


def pack_rows(fmt: str, w: torch.Tensor) -> np.ndarray:
    """The GGUF bytes of a weight [rows, in] (uint8 [rows, in / 32 * block bytes]): per block the
    fp16 d, then the codes (Q4_0: byte j holds code j in its low and code j + 16 in its high nibble)."""
    rows = w.shape[0]
    if fmt == "q4_0":
        codes, d, _ = q4_0_codes(w)
        qs = codes[:, :16] | (codes[:, 16:] << 4)
    else:
        codes, d = q8_0_codes(w)
        qs = codes.view(torch.uint8)
    blocks = torch.cat([d.view(torch.uint8), qs], dim=-1)
    return blocks.reshape(rows, -1).cpu().numpy()


def unpack_rows(fmt: str, data: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, d) of packed GGUF bytes: the inverse of pack_rows, for checks."""
    width = 2 + (16 if fmt == "q4_0" else BLOCK)
    blocks = torch.from_numpy(np.ascontiguousarray(data).reshape(-1, width))
    d = blocks[:, :2].contiguous().view(torch.float16)
    qs = blocks[:, 2:]
    if fmt == "q4_0":
        return torch.cat([qs & 0xF, qs >> 4], dim=-1), d
    return qs.contiguous().view(torch.int8), d


@dataclass(frozen=True)
class GGUFWeight(OpaqueFakeQuant):
    """Weights in GGUF `fmt` (q4_0 or q8_0), blocks of 32 along the input dimension; any leading
    shape (an MoE expert stack [E, out, in] too), since every block is independent."""
    rows_independent = True
    fmt: str

    def __post_init__(self):
        if self.fmt not in FORMATS:
            raise ValueError(f"GGUF format {self.fmt!r} is not one of {FORMATS}")
        super().__post_init__()

    @property
    def has_mask(self) -> bool:
        return self.fmt == "q4_0"  # Q8_0 never clips: a pure straight-through gradient

    def eager(self, w: torch.Tensor, mask: bool = True) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        wq, inside = fake_quantize(self.fmt, w)
        return wq, (inside if mask and self.has_mask else None)

    def fused_args(self, w: torch.Tensor, scale: Optional[torch.Tensor]):
        return blocks_call(self.fmt, w, BLOCK)


@dataclass(frozen=True)
class GGUFActivationQ8(OpaqueFakeQuant):
    """Activations as llama.cpp's CPU backend feeds a Q4_0 or Q8_0 matmul: each token's row
    quantized to Q8_0 blocks of 32 (its reference rounding; see docs/gguf.md for the SIMD paths).
    Q8_0 never clips: a pure straight-through gradient."""
    has_mask = False
    rows_independent = True

    def eager(self, x: torch.Tensor, mask: bool = True) -> tuple[torch.Tensor, None]:
        return fake_quantize("q8_0", x)[0], None

    def fused_args(self, x: torch.Tensor, scale: Optional[torch.Tensor]):
        return blocks_call("q8_0", x, BLOCK)
