"""GPU checks (marker `gpu`) of our fake quantizers' numerics on CUDA, unit-sized: run by
`bench/gpu_check.sh tests` before tests/gpu/test_gpu.py, skipped where CUDA is missing. Each body is a
helper that takes the device, so its comparisons can be exercised CPU against CPU.

- the torch route (`QAT_FQ_KERNELS=torch`, qat/fq_op.py) against torchao's own fake quantizers on
  the same device: bit for bit, fp32 and bf16;
- the torch route on CUDA against the CPU: bf16 bitwise; fp32 scales within one ulp and codes one
  step apart only at rounding ties (tests/gpu/conftest.py says why and what share). The Triton
  kernels CUDA runs by default equal the CPU bitwise in both dtypes: tests/unit/test_fq_triton.py
  and tests/unit/test_fq_triton_blocks.py, which `bench/gpu_check.sh tests` runs on the GPU;
- the straight-through gradients on CUDA match the CPU's, given identical fake-quantized operands.
"""

from __future__ import annotations

import pytest
import torch


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


INTX = [(2, 32), (4, 32), (4, None), (8, 64)]
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])


def torchao_fake_quantizers(name: str, group):
    """torchao's own QAT fake quantizers (weight, activation) for a scheme, as
    QATConfig(base_config, step="prepare") derives them: the reference on the same device."""
    from torchao.quantization.qat.fake_quantize_config import _infer_fake_quantize_configs
    from torchao.quantization.qat.fake_quantizer import FakeQuantizerBase

    from qat.schemes import get_scheme

    act, weight = _infer_fake_quantize_configs(get_scheme(name).base_config(group))
    return FakeQuantizerBase.from_config(weight), (FakeQuantizerBase.from_config(act) if act else None)


@DTYPES
@pytest.mark.parametrize("bits, group", INTX)
def test_intx_weight_fake_quant_on_cuda_equals_torchaos_on_cuda(bits, group, dtype, sample):
    check_intx_same_device(bits, group, dtype, "cuda", sample=sample)


def check_intx_same_device(bits, group, dtype, device, *, sample):
    from qat.fake_quant import IntxWeight
    from qat.fq_op import route

    w = sample((256, 512), 0, 0.05, dtype).to(device)
    with route("torch"):
        ours = IntxWeight(bits, group)(w)[0]
    ref = torchao_fake_quantizers(f"intx{bits}-weight-only", group)[0](w)
    assert ours.dtype == ref.dtype and torch.equal(ours, ref)


@DTYPES
@pytest.mark.parametrize("bits, group", INTX)
def test_intx_weight_fake_quant_on_cuda_vs_cpu_differs_only_at_ties(bits, group, dtype, check_codes_at_ties, grid_codes, sample, within_one_ulp):
    check_intx_across_devices(bits, group, dtype, "cuda", check_codes_at_ties=check_codes_at_ties, grid_codes=grid_codes, sample=sample, within_one_ulp=within_one_ulp)


def check_intx_across_devices(bits, group, dtype, device, *, check_codes_at_ties, grid_codes, sample, within_one_ulp):
    """bf16: bitwise. fp32: scales within one ulp, and a code (with its clip decision) moves only at a
    rounding tie: at most the absmax of a group, whose value / scale is exactly qmax + 1/2
    (tests/gpu/conftest.py). Measured on an H200 at commit 613c35c: fp32 codes moved, bf16 ones did not."""
    from qat.fake_quant import IntxWeight

    from qat.fq_op import route

    fq, gs = IntxWeight(bits, group), group or 512
    w = sample((256, 512), 0, 0.05, dtype)
    with route("torch"):
        (ref, ref_mask), (got, mask) = fq(w), [t.cpu() for t in fq(w.to(device))]
    s_ref, s = fq.init_scale(w), fq.init_scale(w.to(device)).cpu()
    if dtype == torch.bfloat16:
        assert torch.equal(s, s_ref) and torch.equal(got, ref) and torch.equal(mask, ref_mask)
        return
    assert within_one_ulp(s, s_ref)
    ratio = w.double().reshape(256, -1, gs) / s_ref.double().reshape(256, -1, 1)
    ties = check_codes_at_ties(grid_codes(got, s, 256, gs), grid_codes(ref, s_ref, 256, gs), ratio, 1 / gs)
    flips = mask != ref_mask  # at the +(qmax + 1/2) tie the code stays qmax but its clip decision moves
    assert not (flips & ~ties.reshape(mask.shape)).any() and float(flips.double().mean()) <= 1 / gs


@DTYPES
def test_int8_per_token_fake_quant_on_cuda_equals_torchaos_on_cuda(dtype, sample):
    check_int8_same_device(dtype, "cuda", sample=sample)


def check_int8_same_device(dtype, device, *, sample):
    from qat.fake_quant import Int8PerToken

    from qat.fq_op import route

    x = (sample((4, 33, 512), 1, 3.0, dtype) + 0.5).to(device)  # asymmetric: a nonzero zero point
    ref = torchao_fake_quantizers("8da4w", 32)[1](x)
    with route("torch"):
        assert torch.equal(Int8PerToken()(x)[0], ref)


@DTYPES
def test_int8_per_token_fake_quant_on_cuda_vs_cpu_differs_only_at_ties(dtype, check_codes_at_ties, grid_codes, sample, within_one_ulp):
    check_int8_across_devices(dtype, "cuda", check_codes_at_ties=check_codes_at_ties, grid_codes=grid_codes, sample=sample, within_one_ulp=within_one_ulp)


def per_token_qparams(x2: torch.Tensor):
    from torchao.quantization.quant_primitives import MappingType, choose_qparams_affine

    return choose_qparams_affine(x2, MappingType.ASYMMETRIC, (1, x2.shape[-1]), torch.int8, quant_min=-128,
                                 quant_max=127, eps=None, scale_dtype=None, zero_point_dtype=torch.int32)


def check_int8_across_devices(dtype, device, *, check_codes_at_ties, grid_codes, sample, within_one_ulp):
    """bf16: bitwise. fp32: the per-token scale (max - min) / 255 within one ulp, the zero point and
    the codes moved only at rounding ties, which random tokens hardly ever hit (at most 1 in 10^4)."""
    from qat.fake_quant import Int8PerToken

    from qat.fq_op import route

    x = sample((4, 33, 512), 1, 3.0, dtype) + 0.5
    with route("torch"):
        (ref, ref_mask), (got, mask) = Int8PerToken()(x), [t.cpu() for t in Int8PerToken()(x.to(device))]
    s_ref, z_ref = per_token_qparams(x.reshape(-1, 512))
    s, z = [t.cpu() for t in per_token_qparams(x.to(device).reshape(-1, 512))]
    if dtype == torch.bfloat16:
        assert torch.equal(got, ref) and torch.equal(mask, ref_mask)
        return
    assert within_one_ulp(s, s_ref) and bool(((z - z_ref).abs() <= 1).all())
    ratio = x.double().reshape(132, 1, 512) / s_ref.double().reshape(132, 1, 1) + z_ref.double().reshape(132, 1, 1)
    codes = grid_codes(got, s, 132, 512, z.double().reshape(132, 1, 1))
    ties = check_codes_at_ties(codes, grid_codes(ref, s_ref, 132, 512, z_ref.double().reshape(132, 1, 1)), ratio, 1e-4)
    assert not ((mask != ref_mask) & ~ties.reshape(mask.shape)).any()


@DTYPES
@pytest.mark.parametrize("name, rel_step", [("float8", 2.0 ** -3), ("nvfp4", 1.0), ("mxfp4", 1.0)])
def test_float_format_fake_quant_on_cuda_equals_cpu_to_the_format_rounding(name, rel_step, dtype, compare_float_format, fake_quantizers, sample, within_one_ulp):
    """nvfp4 and mxfp4 scales are powers of two or e4m3 values (no division rounds differently),
    bitwise but for rare ties; float8 is checked through its codes and scales below."""
    if name == "float8":
        check_float8_across_devices(dtype, "cuda", sample=sample, within_one_ulp=within_one_ulp)
        return
    fq = fake_quantizers(name)[0]
    for x in (sample((256, 512), 2, 0.05, dtype), sample((3, 40, 512), 3, 2.0, dtype)):
        ref, got = fq(x)[0], fq(x.cuda())[0].cpu()
        assert got.dtype == ref.dtype and got.shape == ref.shape
        share, one_step = compare_float_format(got, ref, rel_step)
        assert share <= 1e-3 and one_step, (share, one_step)


def float8_rows(x2: torch.Tensor):
    """(scale, e4m3 codes) per row, torchao's primitives as Float8Rowwise calls them."""
    from torchao.quantization.quant_primitives import _choose_scale_float8, _quantize_affine_float8

    scale = _choose_scale_float8(x2, (1, x2.shape[-1]), torch.float8_e4m3fn)
    return scale, _quantize_affine_float8(x2, scale, torch.float8_e4m3fn)


def check_float8_across_devices(dtype, device, *, sample, within_one_ulp):
    """Our Float8Rowwise on the device equals torchao's Float8FakeQuantizer there, bitwise. Across
    devices: bf16 bitwise; fp32 scales (absmax / 448) within one ulp, so every dequantized value may
    move by that ulp, and an e4m3 code moves one step only where value / scale sits on an e4m3
    rounding midpoint (random rows: at most 1 in 10^4; the absmax maps to 448, a grid point)."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow
    from torchao.quantization.qat.fake_quantize_config import _infer_fake_quantize_configs
    from torchao.quantization.qat.fake_quantizer import Float8FakeQuantizer

    from qat.fake_quant import Float8Rowwise

    _, wcfg = _infer_fake_quantize_configs(Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
    for x in (sample((256, 512), 2, 0.05, dtype), sample((120, 512), 3, 2.0, dtype)):
        xd = x.to(device)
        assert torch.equal(Float8Rowwise()(xd)[0], Float8FakeQuantizer(wcfg)(xd))
        (s_ref, q_ref), (s, q) = float8_rows(x), [t.cpu() for t in float8_rows(xd)]
        if dtype == torch.bfloat16:
            assert torch.equal(s, s_ref) and torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
            continue
        assert within_one_ulp(s, s_ref)
        a, b = q.double(), q_ref.double()
        moved = a != b
        assert bool(((a - b).abs() <= 2.0 ** -3 * torch.maximum(a.abs(), b.abs()))[moved].all())
        ratio = x.double() / s_ref.double()
        mid = (a + b) / 2
        assert bool(((ratio - mid).abs() <= mid.abs() * 2.0 ** -21)[moved].all())
        assert float(moved.double().mean()) <= 1e-4


def ste_grads(name: str, device: str, dtype=torch.float32, *, PinnedToCPU, fake_quantizers, sample):
    """(dx, dw) of our fake-quantized Linear for fixed CPU-generated data, computed on `device` with
    the fake-quantized operands computed on the CPU (PinnedToCPU): identical operands and masks on
    both devices, so the comparison measures the straight-through backward alone."""
    from qat.fake_quant import fake_quant_linear

    wfq, afq = fake_quantizers(name)
    wfq, afq = PinnedToCPU(wfq), (PinnedToCPU(afq) if afq is not None else None)
    w = sample((96, 256), 4, 0.05, dtype).to(device).requires_grad_()
    x = sample((4, 7, 256), 5, 2.0, dtype).to(device).requires_grad_()
    gy = sample((4, 7, 96), 6, 1.0, dtype).to(device)
    fake_quant_linear(x, w, None, wfq, afq).backward(gy)
    return x.grad.cpu(), w.grad.cpu()


@pytest.mark.parametrize("name", ["8da4w", "8da2w", "intx4-weight-only", "int4-weight-only", "float8", "nvfp4",
                                  "mxfp4"])
def test_straight_through_gradients_on_cuda_match_cpu(name, PinnedToCPU, fake_quantizers, sample):
    (gx_ref, gw_ref), (gx, gw) = ste_grads(name, "cpu", PinnedToCPU=PinnedToCPU, fake_quantizers=fake_quantizers, sample=sample), ste_grads(name, "cuda", PinnedToCPU=PinnedToCPU, fake_quantizers=fake_quantizers, sample=sample)
    # fp32 matmuls (TF32 is off by default) in another reduction order: close, not bitwise
    torch.testing.assert_close(gx, gx_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-4, atol=1e-5)
    # the same clip masks multiply both: the same exact zeros
    assert torch.equal(gw == 0, gw_ref == 0) and torch.equal(gx == 0, gx_ref == 0)
