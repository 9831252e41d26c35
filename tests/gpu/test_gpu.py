"""GPU checks (marker `gpu`) of single layers and blocks, in process: run on the device machine by
`bench/gpu_check.sh tests`, skipped where CUDA is missing, so CI (no GPU) never runs them.
bench/README.md has the procedure.

- float8 gradients survive in bf16;
- a compiled QAT decoder block has no graph breaks, and a compiled fake-quantized Linear equals
  eager bit for bit;
- real kernels: torchao's float8 (sm >= 8.9) equals fake quantization to the format's tolerance;
  the weights torchao's int4 kernels multiply with (tinygemm, and plain where mslk is installed)
  are our int4 fake quantizer's, bit for bit; fp8-int4 matches torchao's own fake quantizer.

tests/gpu/test_gpu_numerics.py compares our fake quantizers' numerics on CUDA with torchao's and the
CPU's; tests/gpu/test_gpu_paths.py covers packed documents, the data loaders, learned scales and MoE
experts against the CPU; tests/gpu/test_gpu_runs.py runs the recipes (train, resume, convert with
real kernels, evaluate) from one set of trained runs.
"""

from __future__ import annotations

import copy

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def capability() -> tuple[int, int]:
    return torch.cuda.get_device_capability() if torch.cuda.is_available() else (0, 0)


def test_float8_gradients_survive_in_bf16_on_cuda(sample):
    """The bar: at most 1% zero weight-gradient entries (torchao's float8 fake quantizer
    flushes 98.8% on an H200). Realistic magnitudes: weights ~0.02, gradients ~1e-6, bf16."""
    from qat.fake_quant import Float8Rowwise, fake_quant_linear

    w = sample((512, 1024), 7, 0.02, torch.bfloat16).cuda().requires_grad_()
    x = sample((8, 128, 1024), 8, 1.0, torch.bfloat16).cuda().requires_grad_()
    gy = sample((8, 128, 512), 9, 1e-6, torch.bfloat16).cuda()
    fake_quant_linear(x, w, None, Float8Rowwise(), Float8Rowwise()).backward(gy)
    assert (w.grad == 0).float().mean().item() <= 0.01
    assert (x.grad == 0).float().mean().item() <= 0.01


# --- torch.compile: a QAT decoder block traces as one graph ------------------------------------

def qat_block(name: str, device: str, dtype=torch.bfloat16, *, fake_quantizers, sample):
    """Decoder block 0 of a small random Llama with every Linear fake-quantized, and its inputs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from qat.fake_quant import QATLinear

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(cfg).to(device=device, dtype=dtype)
    block = model.model.layers[0]
    wfq, afq = fake_quantizers(name)
    for fqn, mod in list(block.named_modules()):
        if type(mod) is torch.nn.Linear:
            parent, _, leaf = fqn.rpartition(".")
            setattr(block.get_submodule(parent), leaf, QATLinear.from_linear(mod, wfq, afq))
    h = sample((2, 64, 256), 10, 1.0, dtype).to(device).requires_grad_()
    pos = torch.arange(64, device=device)[None].expand(2, -1)
    kwargs = dict(attention_mask=None, position_ids=pos, position_embeddings=model.model.rotary_emb(h, pos))
    return block, h, kwargs


@pytest.mark.parametrize("name", ["8da4w", "float8", "nvfp4"])
def test_compiled_qat_decoder_block_has_no_graph_breaks(name, fake_quantizers, sample):
    block, h, kwargs = qat_block(name, "cuda", fake_quantizers=fake_quantizers, sample=sample)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(block)(h, **kwargs)
    assert explained.graph_break_count == 0, [str(r) for r in explained.break_reasons]
    assert explained.graph_count == 1


def test_compiled_qat_block_forward_and_backward_match_eager(fake_quantizers, sample):
    """fullgraph=True through inductor, forward and the recomputing STE backward. The fake
    quantizers run as the opaque op qat::fake_quant (qat/fq_op.py), so every weight's grid and clip
    mask are eager's; the rest of the block (norms, RoPE, attention, SiLU) is fused by inductor,
    which keeps bf16 intermediates in fp32, so activations differ by bf16 roundings."""
    block, h, kwargs = qat_block("8da4w", "cuda", fake_quantizers=fake_quantizers, sample=sample)
    eager_out = block(h, **kwargs)
    eager_out.float().square().mean().backward()
    eager_grads = [p.grad.clone() for p in block.parameters()] + [h.grad.clone()]
    block.zero_grad(set_to_none=True)
    h.grad = None
    torch._dynamo.reset()
    out = torch.compile(block, fullgraph=True)(h, **kwargs)
    out.float().square().mean().backward()
    grads = [p.grad for p in block.parameters()] + [h.grad]
    # forward: measured 2.3e-3 relative on the CPU backend (about one bf16 rounding, 2**-8)
    torch.testing.assert_close(out, eager_out, rtol=2e-2, atol=2e-2)
    # the weight clip masks come from the same weights through the same op: the same exact zeros.
    # No norm bound on the gradients: a bf16 gradient that sums 128 token products carries the
    # fused roundings (measured on the CPU backend: 0.34 relative for post_attention_layernorm,
    # 0.06 for gate/up), which bounds inductor, not our quantizers; tests/unit/test_compile_fq.py and
    # the test below compare a fake-quantized Linear bitwise.
    for (name, p), g, ref in zip(block.named_parameters(), grads, eager_grads):
        assert g.isfinite().all(), name
        if name.endswith("proj.weight"):
            assert torch.equal(g == 0, ref == 0), name


def test_compiled_qat_linear_on_cuda_equals_eager_bitwise(fake_quantizers, sample, eager_and_compiled):
    """A compiled fake-quantized Linear (8da4w and the int4 tinygemm grid) gives eager's output and
    gradients bit for bit on CUDA: the quantizers are the eager ones, the matmuls the same cuBLAS
    calls (tests/unit/test_compile_fq.py on the CPU)."""
    from qat.fake_quant import QATLinear

    for name in ("8da4w", "int4-weight-only"):
        torch.manual_seed(0)
        layer = QATLinear.from_linear(torch.nn.Linear(512, 256, bias=False).to("cuda", torch.bfloat16),
                                      *fake_quantizers(name))
        x = sample((4, 16, 512), 15, 2.0, torch.bfloat16).cuda()
        gy = sample((4, 16, 256), 16, 1.0, torch.bfloat16).cuda()
        (y0, gx0, gw0), (y1, gx1, gw1) = eager_and_compiled(layer, x, gy)
        assert torch.equal(y1, y0) and torch.equal(gx1, gx0) and torch.equal(gw1, gw0), name


# --- real kernels -----------------------------------------------------------------------------


def linear_stack(device="cuda", dtype=torch.bfloat16, k: int = 1024, n: int = 512) -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(k, n, bias=False)).to(device=device, dtype=dtype)


@pytest.mark.skipif(capability() < (8, 9), reason="torchao's float8 kernels need sm >= 8.9")
def test_float8_real_kernels_equal_fake_quant_to_the_format_tolerance(rel_error, sample):
    from torchao.quantization import quantize_

    from qat.fake_quant import Float8Rowwise, QATLinear
    from qat.schemes import get_scheme

    ref = linear_stack()
    x = sample((64, 1024), 11, 1.0, torch.bfloat16).cuda()
    fq = Float8Rowwise()
    with torch.no_grad():
        fake = QATLinear.from_linear(copy.deepcopy(ref[0]), fq, fq)(x)
        real = copy.deepcopy(ref)
        quantize_(real, get_scheme("float8").base_config(None))
        got = real(x)
    assert "Float8" in type(real[0].weight).__name__
    # the same float8 operands; they differ by the bf16 rounding of the dequantized operands
    assert rel_error(got, fake) < 1e-2


def kernel_weights(linear: torch.nn.Module, k: int) -> torch.Tensor:
    """The bf16 weights a converted Linear multiplies with, read back through its own kernel: row i
    of I @ W.T is column i of W.T, one product per output summed with exact zeros, so the kernel's
    fp32 accumulation and bf16 output return each dequantized weight exactly."""
    eye = torch.eye(k, dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        return linear(eye).t().contiguous()


@pytest.mark.skipif(capability() < (8, 0), reason="tinygemm needs sm >= 8.0")
def test_torchao_int4_tinygemm_weights_are_our_fake_quant_bitwise(rel_error, sample):
    """torchao's GPU int4 with PyTorch's tinygemm (`tile_packed_to_4d`, `_weight_int4pack_mm`): the
    weights the kernel multiplies with are exactly what our fake quantizer trains for that packing
    (qat/int4_grid.py; tests/unit/test_int4_grid.py checks the same against torchao's primitives on the
    CPU), and its output is the bf16 matmul of x with them (fp32 accumulation in another order)."""
    from torchao.quantization import Int4WeightOnlyConfig, quantize_

    from qat.fake_quant import Int4Asymmetric

    ref = linear_stack()
    w = ref[0].weight.detach().clone()
    real = copy.deepcopy(ref)
    quantize_(real, Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d"))
    assert "TilePacked" in type(real[0].weight).__name__
    wq, _ = Int4Asymmetric(128, "tile_packed_to_4d")(w)
    assert torch.equal(kernel_weights(real[0], 1024), wq)
    x = sample((64, 1024), 12, 1.0, torch.bfloat16).cuda()
    with torch.no_grad():
        # one bf16 rounding of the output apart (2**-8 relative), summed in another order
        assert rel_error(real(x), torch.nn.functional.linear(x, wq)) < 1e-2


@pytest.mark.skipif(capability() < (9, 0), reason="mslk's bf16i4bf16 kernels need sm >= 9.0")
def test_torchao_int4_plain_weights_are_our_fake_quant_bitwise():
    """The `plain` packing (`Int4Tensor`, mslk's bf16i4bf16_rowwise; needs mslk-cuda): the same."""
    import importlib.util

    if importlib.util.find_spec("mslk") is None:
        pytest.skip("plain int4 needs mslk-cuda: WITH_MSLK=1 bash bench/fetch_wheels.sh (42 MiB, bench/README.md)")
    from torchao.quantization import Int4WeightOnlyConfig, quantize_

    from qat.fake_quant import Int4Asymmetric

    ref = linear_stack()
    w = ref[0].weight.detach().clone()
    real = copy.deepcopy(ref)
    quantize_(real, Int4WeightOnlyConfig(group_size=128))
    assert torch.equal(kernel_weights(real[0], 1024), Int4Asymmetric(128, "plain")(w)[0])


@pytest.mark.skipif(capability() < (9, 0), reason="torchao's fp8-int4 kernels need sm >= 9.0")
def test_torchao_fp8_int4_converts_and_matches_its_fake_quant(rel_error, sample):
    """torchao's `Float8DynamicActivationInt4WeightConfig`, the Hopper serving format. Its `plain`
    packing runs through mslk-cuda, which is carried only with WITH_MSLK=1 (bench/README.md)."""
    import importlib.util

    if importlib.util.find_spec("mslk") is None:
        pytest.skip("fp8-int4 needs mslk-cuda: WITH_MSLK=1 bash bench/fetch_wheels.sh (42 MiB, bench/README.md)")
    from torchao.quantization import Float8DynamicActivationInt4WeightConfig, quantize_
    from torchao.quantization.qat import QATConfig

    base = Float8DynamicActivationInt4WeightConfig(int4_packing_format="plain")
    ref = linear_stack()
    x = sample((64, 1024), 14, 1.0, torch.bfloat16).cuda()
    fake, real = copy.deepcopy(ref), copy.deepcopy(ref)
    quantize_(fake, QATConfig(base, step="prepare"))
    quantize_(real, base)
    with torch.no_grad():
        # int4 alone moves the output by ~7.5%; a different grid would show far above this bound
        assert rel_error(real(x), fake(x)) < 3e-2
