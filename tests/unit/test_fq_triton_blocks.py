"""The Triton kernels of the block formats (qat/fq_triton_blocks.py): torchao's GPU int4 in both
packings, float8-then-int4, GGUF Q4_0 / Q8_0, MXFP4 and NVFP4 equal their pure-torch reference
bit for bit (values with the signs of zeros, clip masks, straight-through gradients), fp32 and
bf16, on random and adversarial blocks; and a QATLinear of each scheme trains the same on both
routes. CPU tensors run in Triton's interpreter (tests/conftest.py); with a GPU, CUDA tensors."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from qat.fake_quant import Int4AfterFloat8, Int4Asymmetric, MXFP4Emulated, NVFP4Emulated, QATLinear  # noqa: E402
from qat.fq_op import route  # noqa: E402
from qat.gguf_quant import GGUFActivationQ8, GGUFWeight  # noqa: E402
from qat.schemes import get_scheme  # noqa: E402
from test_fq_triton import (DEV, DTYPES, assert_same, assert_trains_the_same_on_both_routes, fused,  # noqa: E402
                            random_weights)


def int4_blocks(gs: int) -> torch.Tensor:
    """Constant (positive, negative), zero (+0 and -0), bf16-subnormal and huge groups; exact ties of
    (w - min) / scale (min 0, max 15/16: scale 1/16, values (k + 1/2) / 16); an outlier; all
    negative; and groups far from zero next to their spread, where tinygemm's bf16 zero point
    moves the grid so that a weight rounds to code -1 or 16 and clips (plain's fp32 grid never
    clips)."""
    g = torch.Generator().manual_seed(6)
    offset = torch.randn(64, gs, generator=g) * torch.rand(64, 1, generator=g) * 3 + torch.randn(64, 1, generator=g) * 5
    g = torch.Generator().manual_seed(21)
    ties = (torch.arange(gs) % 15 + 0.5) / 16
    ties[0], ties[1] = 0.0, 15 / 16
    spike = torch.randn(gs, generator=g) * 0.01
    spike[3] = 2.0
    groups = [torch.full((gs,), 0.3), torch.full((gs,), -2.5), torch.zeros(gs), torch.full((gs,), -0.0),
              torch.full((gs,), 1e-40), torch.randn(gs, generator=g) * 1e30, ties, -ties, spike,
              -torch.rand(gs, generator=g) - 1]
    return torch.cat([torch.stack(groups), offset])


def fp8_int4_rows(gs: int) -> torch.Tensor:
    """Rows of two groups: 448 in the first (row float8 scale exactly 1, so the values are what
    e4m3 sees), int4 ties in the second (absmax 8: scale 1, values k + 1/2, e4m3-exact; 7.5
    rounds to 8 and clips); random rows; a zero row (scales at their floors)."""
    g = torch.Generator().manual_seed(22)
    first = torch.randn(gs, generator=g)
    first[0] = 448.0
    ties = torch.arange(gs) % 16 - 8 + 0.5
    ties[0] = 8.0
    rows = [torch.cat([first, ties]), torch.cat([first, -ties]), torch.randn(2 * gs, generator=g) * 0.05,
            torch.zeros(2 * gs)]
    return torch.stack(rows)


def gguf_blocks() -> torch.Tensor:
    """Q4_0 / Q8_0 blocks of 32: +a and -a both largest (either first: the first decides d's
    sign), exact ties of x / d + 8.5 and of Q8_0's halves (away from zero), zero blocks (one starting
    with -0.0, whose sign reaches d and the values' signed zeros), a block
    whose fp16 d is subnormal, one whose fp16 d overflows (values inf / NaN, as the reference)."""
    g = torch.Generator().manual_seed(23)
    pm = torch.randn(32, generator=g)
    pm[4], pm[9] = 3.0, -3.0
    mp = pm.clone()
    mp[4], mp[9] = -3.0, 3.0
    q4_ties = (torch.arange(32) % 16 - 8) * 0.25 + 0.125  # d = 0.25 (m = -2): x / d + 8.5 lands on integers
    q4_ties[0] = -2.0
    q8_ties = (torch.arange(32) - 16 + 0.5)
    q8_ties[0] = 127.0  # d = 1
    signed_zeros = torch.zeros(32)
    signed_zeros[::2] = -0.0  # the first largest magnitude is -0.0: d = -0.0 / -8 = +0.0
    return torch.stack([pm, mp, q4_ties, q8_ties, torch.zeros(32), signed_zeros, torch.randn(32, generator=g) * 1e-6,
                        torch.randn(32, generator=g) * 1e6])


def fp4_blocks(block: int) -> torch.Tensor:
    """MX / NV blocks: E2M1 midpoints (0.25 .. 5) under a block scale of exactly 1 (absmax 6: MX
    exponent 2 - 2 = 0), values past 6 that saturate, negative ones that round to -0, a block
    whose E8M0 exponent clamps at the bottom (absmax 2**-125), fp32 subnormals and a zero block."""
    mids = torch.tensor([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -0.1, -2.5, 5.9, 0.0, -0.0, 1.0, -6.0])
    mids = mids.repeat(block // 16)
    g = torch.Generator().manual_seed(24)
    sat = mids.clone()
    sat[0] = 7.0
    return torch.stack([mids, -mids, sat, mids * 2 ** -127, torch.randn(block, generator=g) * 1e-39,
                        torch.zeros(block), torch.randn(block, generator=g) * 3])


def assert_fused_equals_reference(fq, x):
    """Values, values with the mask, and the straight-through gradient; NaN where the reference
    has NaN (an fp16 d that overflows)."""
    ref_v, ref_m = fq.eager(x)
    nan = ref_v.isnan()
    got_v, got_m = fused(fq, x)
    assert torch.equal(got_v.isnan(), nan)
    assert_same((got_v.masked_fill(nan, 0), got_m), (ref_v.masked_fill(nan, 0), ref_m))
    assert torch.equal(fused(fq, x, mask=False)[0].isnan(), nan)
    if fq.has_mask:
        grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(25)).to(x.dtype)
        with route("triton"):
            got = fq.ste(grad.to(DEV), x.to(DEV), None, torch.float32).cpu()
        assert torch.equal(got, (grad * ref_m).float())
    return ref_m


@DTYPES
@pytest.mark.parametrize("packing", ["plain", "tile_packed_to_4d"])
def test_int4_kernels_equal_the_exported_grid_bitwise(packing, dtype):
    fq = Int4Asymmetric(64, packing)
    for w in (random_weights(24, 256, 1), int4_blocks(64)):
        m = assert_fused_equals_reference(fq, w.to(dtype))
    assert packing == "plain" or not m.all()  # tinygemm's clipped weights: the masks compared are not trivial


@DTYPES
def test_float8_then_int4_kernel_equals_the_reference_bitwise(dtype):
    fq = Int4AfterFloat8(64)
    for w in (random_weights(16, 256, 2), fp8_int4_rows(64)):
        m = assert_fused_equals_reference(fq, w.to(dtype))
    assert not m.all()


@DTYPES
@pytest.mark.parametrize("fmt", ["q4_0", "q8_0"])
def test_gguf_kernels_equal_the_reference_bitwise(fmt, dtype):
    fq = GGUFWeight(fmt)
    for w in (random_weights(16, 128, 3), gguf_blocks(), random_weights(2 * 8, 64, 4).reshape(2, 8, 64)):
        m = assert_fused_equals_reference(fq, w.to(dtype))
        assert (m is None) == (fmt == "q8_0")  # Q8_0 never clips: a pure straight-through gradient
    act = GGUFActivationQ8()
    assert_fused_equals_reference(act, (torch.randn(3, 5, 64) * 4).to(dtype))


@DTYPES
@pytest.mark.parametrize("fq, block", [(MXFP4Emulated(), 32), (NVFP4Emulated(), 16)], ids=["mxfp4", "nvfp4"])
def test_fp4_kernels_equal_the_reference_bitwise(fq, block, dtype):
    for x in (random_weights(16, 128, 5), fp4_blocks(block), torch.randn(2, 3, 64) * 4):
        assert_fused_equals_reference(fq, x.to(dtype))
    if isinstance(fq, NVFP4Emulated):  # an all-zero tensor: per-tensor scale 0, NaN as torchao's
        assert fused(fq, torch.zeros(4, 32, dtype=dtype))[0].isnan().all()


@DTYPES
@pytest.mark.parametrize("name, group", [("int4-weight-only", 64), ("fp8-int4", 64), ("q4_0", None), ("q8_0", None),
                                         ("mxfp4", None), ("nvfp4", None)])
def test_a_block_format_qat_linear_trains_the_same_on_both_routes_bitwise(name, group, dtype):
    """Output, input gradient and weight gradient of a fake-quantized Linear."""
    torch.manual_seed(0)
    wfq, afq = get_scheme(name).fake_quantizers(group)
    layer = QATLinear.from_linear(torch.nn.Linear(128, 48, bias=False), wfq, afq)
    assert_trains_the_same_on_both_routes(layer.to(dtype), dtype)


def test_the_ops_pass_torchs_custom_op_checks_for_block_formats():
    """Schema, fake impls and autograd of qat::fused_fq / qat::fused_ste with a clipping block
    format (int4) and a pure straight-through one (MXFP4, whose op returns an empty mask)."""
    w = random_weights(16, 128, 26).to(torch.bfloat16).to(DEV)
    with route("triton"):
        for fq in (Int4Asymmetric(64, "tile_packed_to_4d"), MXFP4Emulated()):
            torch.library.opcheck(torch.ops.qat.fused_fq.default, (w.clone().requires_grad_(), None, fq._fq_key, True))
        fq = GGUFWeight("q4_0")
        args = (torch.randn_like(w), w, None, fq._fq_key, torch.float32)
        torch.library.opcheck(torch.ops.qat.fused_ste.default, args)
