"""The int4 fake quantizer trains the grid convert exports, bit for bit, for both packings of
torchao's `Int4WeightOnlyConfig` (qat/int4_grid.py).

The packed tensors cannot be built on the CPU (`Int4TilePackedTo4dTensor.from_hp` checks the CUDA
capability and packs with `_convert_weight_to_int4pack`; `Int4Tensor.from_hp` needs mslk-cuda), so
the references are the quantization functions those constructors call, run on the CPU:
- tile_packed_to_4d: torchao's `_choose_qparams_affine_tinygemm` (scale and zero point, bf16) and
  `_quantize_affine_tinygemm` (codes), with `scale_dtype=zero_point_dtype=bf16` as `from_hp` passes;
- plain: mslk's `int4_row_quantize_zp` (transcribed below where mslk is not installed), then the
  scale and zero point in the weight's dtype, as `Int4Tensor.from_hp` stores them.
The values are the kernels' dequantization, bf16(code) * scale + zero as one bf16 fused multiply-add
(tinygemm's `__hfma2`), computed here exactly in fp64 and rounded once. tests/gpu/test_gpu.py reads the
real tinygemm weights back on CUDA and compares them with the fake quantizer bitwise.
"""

from __future__ import annotations

import math
import struct
from fractions import Fraction

import pytest
import torch

from qat.fake_quant import Int4Asymmetric
from qat.int4_grid import fma_to_bf16

GS = 32
BF16 = torch.bfloat16


def random_weights(seed: int = 0) -> torch.Tensor:
    """Weight-like bf16 values with a few 20x outliers that stretch their groups."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(96, 256, generator=g) * 0.05
    return torch.where(torch.rand(w.shape, generator=g) < 0.003, w * 20, w).to(BF16)


def adversarial_weights() -> torch.Tensor:
    """One group per row, each built to break a sloppy grid: constant and all-zero groups (zero
    range), exact rounding ties ((w - min) / scale = k + 1/2 with scale 1/16 in fp32 and bf16),
    a single huge outlier, and groups far from zero with a tiny spread, where the bf16 zero point's
    rounding exceeds the scale (tinygemm then clips, which the mask must show)."""
    g = torch.Generator().manual_seed(1)
    rows = [torch.full((GS,), 0.3), torch.zeros(GS), torch.full((GS,), -2.5)]
    ties = torch.cat([torch.tensor([0.0, 0.9375]), (torch.arange(15.0) + 0.5) / 16, torch.arange(15.0) / 16])
    rows += [ties, -ties, ties + 1.0]
    spike = torch.randn(GS, generator=g) * 0.01
    spike[5] = 3.0
    rows.append(spike)
    for offset in (1.0, 3.0, 100.0, -7.0, 1e-3):
        for spread in (1e-4, 1e-3, 1e-2, 3e-2):
            rows.append(offset + spread * torch.randn(GS, generator=g))
    return torch.stack(rows).to(BF16)


def bf16_nearest(t: Fraction) -> float:
    """The bf16 nearest to the rational t, ties to the even significand (exact comparisons)."""
    near = struct.unpack("<I", struct.pack("<f", float(t)))[0] & 0xFFFF0000  # a bf16 at or next to t
    cands = [struct.unpack("<f", struct.pack("<I", b & 0xFFFFFFFF))[0] for b in (near - 0x10000, near, near + 0x10000)]
    cands = [v for v in cands if math.isfinite(v)]
    return min(cands, key=lambda v: (abs(Fraction(v) - t), struct.unpack("<I", struct.pack("<f", v))[0] >> 16 & 1))


def one_rounding_to_bf16(c: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Reference for the kernels' fused multiply-add: the exact rational c * scale + zero rounded
    once to the nearest bf16 (Python fractions; no floating-point step can round twice)."""
    c, scale, zero = torch.broadcast_tensors(c.double(), scale.double(), zero.double())
    memo: dict[tuple, float] = {}
    out = []
    for key in zip(c.reshape(-1).tolist(), scale.reshape(-1).tolist(), zero.reshape(-1).tolist()):
        if key not in memo:
            memo[key] = bf16_nearest(Fraction(key[0]) * Fraction(key[1]) + Fraction(key[2]))
        out.append(memo[key])
    return torch.tensor(out, dtype=torch.float32).reshape(c.shape).to(BF16)


def test_one_rounding_reference_and_fma_to_bf16_agree_where_fp32_double_rounds():
    """3 * 1.0078125 = 3.0234375 is a bf16 midpoint; adding -2**-30 puts the exact value just below
    it. fp32 cannot hold the sum (it rounds back onto the midpoint), and rounding that to bf16 picks
    the even neighbour 3.03125; the kernel's single rounding gives 3.015625."""
    c, s, z = torch.tensor([3.0, -3.0]), torch.tensor([1.0078125, 1.0078125], dtype=BF16), \
        torch.tensor([-(2.0 ** -30), 2.0 ** -30], dtype=BF16)
    expect = torch.tensor([3.015625, -3.015625], dtype=BF16)
    assert torch.equal(one_rounding_to_bf16(c, s, z), expect)
    assert torch.equal(fma_to_bf16(c, s, z), expect)
    naive = (c * s.float() + z.float()).to(BF16)  # two roundings
    assert torch.equal(naive, torch.tensor([3.03125, -3.03125], dtype=BF16))


def test_fma_to_bf16_is_one_rounding_on_random_and_tiny_zero_points():
    g = torch.Generator().manual_seed(2)
    n = 30_000
    c = torch.randint(-8, 8, (n,), generator=g).float()
    s = (torch.rand(n, generator=g) * 0.02 + 1e-4).to(BF16)
    # zero points of every size relative to c * scale, down to 2**-30 of it: the double-rounding cases
    sign = torch.randint(0, 2, (n,), generator=g).float() * 2 - 1
    size = (1 + torch.rand(n, generator=g)) * 0.02 * 2.0 ** -torch.randint(0, 30, (n,), generator=g).float()
    z = (sign * size).to(BF16)
    ref = one_rounding_to_bf16(c, s, z)
    assert torch.equal(fma_to_bf16(c, s, z), ref)
    naive = (c * s.float() + z.float()).to(BF16)
    assert (naive != ref).sum() > 0  # the case exists in this sample: the fix is needed


def tinygemm_reference(w: torch.Tensor):
    """(scale, zero, codes 0..15, mask) from torchao's tinygemm primitives, as
    `Int4TilePackedTo4dTensor.from_hp` calls them; the mask from the same quantize step with a range
    wide enough never to clamp (its midpoint (qmax + qmin + 1) / 2 kept at 8)."""
    from torchao.quantization.quant_primitives import (MappingType, _choose_qparams_affine_tinygemm,
                                                       _quantize_affine_tinygemm,
                                                       _quantize_affine_tinygemm_no_dtype_cast)

    scale, zero = _choose_qparams_affine_tinygemm(w, MappingType.ASYMMETRIC, (1, GS), torch.int32, 0, 15,
                                                  scale_dtype=BF16, zero_point_dtype=BF16)
    codes = _quantize_affine_tinygemm(w, [1, GS], scale, zero, torch.int32, 0, 15)
    wide = _quantize_affine_tinygemm_no_dtype_cast(w, (1, GS), scale, zero, -1000, 1015)
    return scale, zero, codes, (wide >= 0) & (wide <= 15)


def mslk_int4_row_quantize_zp(x: torch.Tensor, group_size: int):
    """mslk.quantize.shuffle.int4_row_quantize_zp, which `Int4Tensor.from_hp` calls: the installed
    one where mslk is present, else its arithmetic transcribed (fp32 qparams, codes -8..7)."""
    try:
        from mslk.quantize.shuffle import int4_row_quantize_zp
        return int4_row_quantize_zp(x, group_size)
    except ImportError:
        pass
    chunks = torch.split(x.to(torch.float), group_size, dim=-1)
    lo = [c.amin(dim=1, keepdim=True) for c in chunks]
    scales = [(c.amax(dim=1, keepdim=True) - m).clamp(min=1e-6) / 15 for c, m in zip(chunks, lo)]
    zeros = [m + s * 8 for m, s in zip(lo, scales)]
    out = [c.sub(m).div(s).round().clamp_(0, 15) for c, m, s in zip(chunks, lo, scales)]
    out = torch.cat([(o - 8).to(torch.int8) for o in out], dim=-1)
    return out, torch.cat(scales, dim=-1).t().contiguous(), torch.cat(zeros, dim=-1).t().contiguous()


def groups(t: torch.Tensor) -> torch.Tensor:
    """[rows, in] -> [rows, groups, 1]: one value per group, as the dequantization broadcasts it."""
    return t.reshape(t.shape[0], -1, 1)


@pytest.mark.parametrize("make", [random_weights, adversarial_weights], ids=["random", "adversarial"])
def test_tinygemm_fake_quant_is_the_exported_grid(make):
    w = make()
    scale, zero, codes, mask = tinygemm_reference(w)
    wq, got_mask = Int4Asymmetric(GS, "tile_packed_to_4d")(w)
    c = (codes - 8).float().reshape(w.shape[0], -1, GS)
    ref = one_rounding_to_bf16(c, groups(scale), groups(zero)).reshape(w.shape)
    assert wq.dtype == BF16 and torch.equal(wq, ref)
    assert torch.equal(got_mask, mask)
    if make is adversarial_weights:
        assert (~mask).sum() >= 1  # an offset group clips under tinygemm's bf16 zero point
    # torchao's own fp32 dequantization, rounded to bf16, agrees here (no double rounding in this data)
    from torchao.quantization.quant_primitives import _dequantize_affine_tinygemm

    dq = _dequantize_affine_tinygemm(codes, (1, GS), scale, zero, torch.int32, 0, 15, output_dtype=torch.float32)
    assert torch.equal(dq.to(BF16), wq)


@pytest.mark.parametrize("make", [random_weights, adversarial_weights], ids=["random", "adversarial"])
def test_plain_fake_quant_is_the_exported_grid(make):
    w = make()
    out, scale, zero = mslk_int4_row_quantize_zp(w, GS)
    scale, zero = scale.t().to(w.dtype), zero.t().to(w.dtype)  # Int4Tensor.from_hp: stored in w's dtype
    wq, mask = Int4Asymmetric(GS, "plain")(w)
    ref = one_rounding_to_bf16(out.float().reshape(w.shape[0], -1, GS), groups(scale), groups(zero)).reshape(w.shape)
    assert wq.dtype == BF16 and torch.equal(wq, ref)
    assert mask.all()  # the fp32 scale spans min..max: nothing clips


def test_the_packings_train_different_grids_and_torchaos_fake_quantizer_trains_neither():
    """Why the packing matters: on the same weights the two exported grids differ, and torchao's QAT
    fake quantizer (fp32 scale and zero point at dequantization) matches neither bitwise."""
    from torchao.quantization.qat.fake_quantize_config import Int4WeightFakeQuantizeConfig
    from torchao.quantization.qat.fake_quantizer import Int4WeightFakeQuantizer

    w = random_weights(3)
    plain, tiny = Int4Asymmetric(GS, "plain")(w)[0], Int4Asymmetric(GS, "tile_packed_to_4d")(w)[0]
    torchao = Int4WeightFakeQuantizer(Int4WeightFakeQuantizeConfig(group_size=GS, activation_dtype=BF16))(w)
    assert (plain != tiny).float().mean() > 0.01
    assert (torchao != plain).any() and (torchao != tiny).any()


def test_an_fp32_weight_trains_the_grid_of_its_bf16_export():
    """Both int4 kernels take bf16 weights: an fp32 run trains the grid of the weight convert casts."""
    w = random_weights(4).float() + torch.randn(96, 256, generator=torch.Generator().manual_seed(5)) * 1e-4
    for packing in ("plain", "tile_packed_to_4d"):
        fq = Int4Asymmetric(GS, packing)
        wq, mask = fq(w)
        ref, ref_mask = fq(w.to(BF16))
        assert wq.dtype == torch.float32 and torch.equal(wq, ref.float()) and torch.equal(mask, ref_mask)


def test_the_scheme_trains_records_and_converts_one_packing(monkeypatch):
    import qat.schemes as schemes

    scheme = schemes.get_scheme("int4-weight-only")
    for has_mslk, packing in ((True, "plain"), (False, "tile_packed_to_4d")):
        monkeypatch.setattr(schemes, "_has_mslk", lambda: has_mslk)
        assert scheme.fake_quantizers(64)[0] == Int4Asymmetric(64, packing)
        assert str(scheme.convert_config(64).int4_packing_format).lower().endswith(packing)
        rec = scheme.record(64, None)
        assert rec["int4_packing"] == packing and scheme.convert_mismatch(rec) is None
    other = {**rec, "int4_packing": "plain"}  # trained where mslk was installed, converted where not
    assert "trained the grid of int4 packing 'plain'" in scheme.convert_mismatch(other)
    unrecorded = {k: v for k, v in rec.items() if k != "int4_packing"}  # a checkpoint from before
    assert not schemes.same_record(rec, other) and schemes.same_record(rec, unrecorded)
    assert scheme.convert_mismatch(unrecorded) is None
    assert "int4_packing" not in schemes.get_scheme("fp8-int4").record(128, None)
