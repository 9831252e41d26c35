"""Our fake-quantized Linear (qat/fake_quant.py): torchao's forward, a clipped STE backward that
saves nothing a plain Linear does not, and the merged-weight LoRA mode."""

import copy
import json

from pathlib import Path

import pytest

import torch

from qat.fake_quant import QATLinear
from qat.schemes import get_scheme

ROOT = Path(__file__).resolve().parents[2]

CASES = [("8da4w", 32), ("intx4-weight-only", 32), ("8da2w", None), ("intx3-weight-only", 64), ("8da8w", 32),
         ("int4-weight-only", 32), ("fp8-int4", 128)]
# Per case, for the seed-0 Linear(256, 96) of `pair`: how many of its 24576 weights the quantizer
# clips (an integer fixed by the weights and the rounding rule), and the cosine between the STE weight
# gradient and the unquantized layer's (measured in fp32 on CPU; int4-weight-only neither clips nor
# quantizes activations, so its gradient is the plain one up to rounding).
CLIPPED = {"8da4w": 307, "intx4-weight-only": 307, "8da2w": 46, "intx3-weight-only": 153, "8da8w": 290,
           "int4-weight-only": 0, "fp8-int4": 500}
COSINE = {"8da4w": 0.99367070, "intx4-weight-only": 0.99369174, "8da2w": 0.99917299, "intx3-weight-only": 0.99750364,
          "8da8w": 0.99418867, "int4-weight-only": 1.0, "fp8-int4": 0.98930180}


def pair(name, group, bias=False):
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 96, bias=bias)
    s = get_scheme(name)
    ours = QATLinear.from_linear(copy.deepcopy(lin), *s.fake_quantizers(group))
    ref = torch.nn.Sequential(copy.deepcopy(lin))
    quantize_(ref, QATConfig(s.base_config(group), step="prepare"))
    return lin, ours, ref[0]


@pytest.mark.parametrize("name, group", CASES)
def test_forward_equals_torchao_and_gradient_is_the_clipped_ste(name, group):
    lin, ours, ref = pair(name, group, bias=True)
    x = torch.randn(4, 7, 256) * 3
    xo, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    yo, yr = ours(xo), ref(xr)
    if name == "int4-weight-only":
        # torchao's int4 fake quantizer works on the fp32 weight with fp32 scales and zero points;
        # ours trains the grid of the bf16 weight convert exports (tests/unit/test_int4_grid.py). A code
        # moves by one step where w and bf16(w) round apart at a tie; the bf16 scale, zero point and
        # value add at most half a bf16 ulp (2**-8 relative) of the group's absmax each.
        w = lin.weight.detach()
        wg = w.reshape(96, -1, group)
        step = ((wg.amax(-1, keepdim=True) - wg.amin(-1, keepdim=True)) / 15).expand_as(wg).reshape_as(w)
        amax = wg.abs().amax(-1, keepdim=True).expand_as(wg).reshape_as(w)
        diff = (ours.weight_fq(w)[0] - ref.weight_fake_quantizer(w)).abs()
        assert (diff <= step + 3 * 2.0 ** -8 * amax).all()
    else:
        assert torch.equal(yo, yr)
    gy = torch.randn_like(yo)
    yo.backward(gy)
    yr.backward(gy)
    # the STE written out: gradients through the quantized operands, zero where clipped
    wq, wmask = ours.weight_fq(lin.weight.detach())
    xq, xmask = ours.act_fq(x) if ours.act_fq else (x, None)
    xmask = torch.ones_like(x, dtype=torch.bool) if xmask is None else xmask
    gw = (gy.reshape(-1, 96).t() @ xq.reshape(-1, 256)) * wmask
    gx = (gy @ wq) * xmask
    torch.testing.assert_close(ours.weight.grad, gw, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(xo.grad, gx, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.bias.grad, gy.sum((0, 1)))
    # exact zeros are the clipped weights and nothing else
    zero = ours.weight.grad == 0
    assert torch.equal(zero, ~wmask)
    assert int(zero.sum()) == CLIPPED[name]
    # and torchao's (heavier) graph gives the same gradient where its qparams are symmetric (intx);
    # torchao's int4 graph also sends gradient through each group's min and max, ours is pure STE
    if get_scheme(name).exact_convert:
        torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-6)
    # the STE gradient tracks the unquantized layer's gradient (it is not noise)
    xp = x.clone().requires_grad_()
    lin(xp).backward(gy)
    cos = torch.nn.functional.cosine_similarity(ours.weight.grad.flatten(), lin.weight.grad.flatten(), dim=0)
    # 1e-5: a cosine of fp32 sums over 24576 products; another BLAS build may order them differently
    # (relative rounding ~1e-7), while a change of the quantizer moves it by more than 1e-4
    assert float(cos) == pytest.approx(COSINE[name], abs=1e-5)


def saved_bytes(module, x):
    """Bytes that autograd keeps for backward, with storages shared by parameters/inputs named."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = module(x)
    ptrs = {module.weight.data_ptr(), x.data_ptr()}
    extra = sum(t.numel() * t.element_size() for t in saved if t.data_ptr() not in ptrs)
    return y, {t.data_ptr() for t in saved}, extra


@pytest.mark.parametrize("name, group", CASES)
def test_backward_saves_no_fake_quantized_copies(name, group):
    lin, ours, ref = pair(name, group)
    x = torch.randn(8, 256, requires_grad=True)
    _, ptrs, extra = saved_bytes(ours, x)
    assert ptrs <= {ours.weight.data_ptr(), x.data_ptr()} and extra == 0
    _, _, plain_extra = saved_bytes(lin, x)
    _, _, torchao_extra = saved_bytes(ref, x)
    assert plain_extra == 0
    assert torchao_extra >= lin.weight.numel() * 4  # torchao keeps at least a weight-sized copy


def test_disabled_is_a_plain_linear():
    lin, ours, _ = pair("8da4w", 32)
    ours.enabled = False
    x = torch.randn(3, 256)
    assert torch.equal(ours(x), lin(x))


@pytest.mark.parametrize("name", sorted(__import__("qat.schemes", fromlist=["SCHEMES"]).SCHEMES))
def test_a_frozen_weight_quantized_once_gives_the_same_forward_and_input_gradient(name):
    """quantize_frozen_weights: a frozen weight replaced by fq(W) gives the same output and input
    gradient bit for bit, also when each half of the rows (an FSDP2 shard) is quantized on its own;
    a per-tensor format (nvfp4) is left to quantize in every forward."""
    from qat.fake_quant import quantize_frozen_weights

    s = get_scheme(name)
    group = 128 if name == "fp8-int4" else 32
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 96).to(torch.bfloat16).requires_grad_(False)
    layers = [QATLinear.from_linear(copy.deepcopy(lin), *s.fake_quantizers(group)) for _ in range(2)]
    ref, once = layers
    x = (torch.randn(4, 7, 256) * 3).to(torch.bfloat16)
    xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    yr = ref(xr)
    assert quantize_frozen_weights(torch.nn.Sequential(once)) == (0 if name == "nvfp4" else 1)
    if name == "nvfp4":
        assert torch.equal(once.weight, lin.weight)
        return
    assert not torch.equal(once.weight, lin.weight) and once.weight.dtype == torch.bfloat16
    halves = torch.cat([once.weight_fq(lin.weight[:48])[0], once.weight_fq(lin.weight[48:])[0]])
    assert torch.equal(once.weight, halves)  # what two FSDP2 ranks hold after quantizing their shards
    yo = once(xo)
    assert torch.equal(yo, yr)
    gy = torch.randn_like(yr)
    yr.backward(gy)
    yo.backward(gy)
    assert torch.equal(xo.grad, xr.grad)
    assert quantize_frozen_weights(torch.nn.Sequential(once)) == 0  # never twice
    once.enabled = False  # the original weight is gone: refused, not silently wrong
    with pytest.raises(RuntimeError, match="quantize_frozen_weights"):
        once(x)


def test_merged_lora_mode_trains_the_adapters():
    from peft import LoraConfig, get_peft_model
    from qat.config import FakeQuantConfig
    from qat.model import apply_qat

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2)
    m = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]))
    apply_qat(m, FakeQuantConfig(enabled=True, scheme="8da4w", group_size=32, lora_merged=True), get_scheme("8da4w"))
    for p in m.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.02)  # B starts at zero: give A a gradient path
    x = torch.randint(0, 64, (2, 16))
    ref = copy.deepcopy(m)
    loss = m(x, labels=x).loss
    loss.backward()
    grads = {n: p.grad for n, p in m.named_parameters() if p.requires_grad}
    assert sorted(grads) == [f"base_model.model.model.layers.0.{layer}.lora_{ab}.default.weight"
                             for layer in ("mlp.down_proj", "self_attn.q_proj") for ab in "AB"]
    # reference: each merged weight M = W + s*B@A as the base layer's own weight, adapters off; the
    # forward is the same function and the chain rule gives dA = s*B^T dM, dB = s*dM A^T
    merged = {n: mod for n, mod in ref.named_modules() if hasattr(mod, "_qat_original_forward")}
    for mod in merged.values():
        a, b, s = mod.lora_A["default"].weight, mod.lora_B["default"].weight, mod.scaling["default"]
        mod.base_layer.weight = torch.nn.Parameter((mod.base_layer.weight + s * (b @ a)).detach())
    with ref.disable_adapter():
        ref_loss = ref(x, labels=x).loss
    ref_loss.backward()
    assert torch.equal(loss, ref_loss)
    for n, mod in merged.items():
        a, b, s = mod.lora_A["default"].weight.detach(), mod.lora_B["default"].weight.detach(), mod.scaling["default"]
        dm = mod.base_layer.weight.grad
        # the same matmuls autograd runs (measured equal bit for bit); fp32 default tolerance in case
        # the BLAS picks another order for a transposed operand
        torch.testing.assert_close(grads[f"{n}.lora_A.default.weight"], s * b.t() @ dm)
        torch.testing.assert_close(grads[f"{n}.lora_B.default.weight"], s * dm @ a.t())
        assert dm.abs().sum() > 0  # a real gradient reached the merged weight
    # quantizing frozen weights once skips the merged layers' bases (their forward adds s*B@A first)
    from qat.fake_quant import quantize_frozen_weights

    bases = [mod.base_layer for mod in m.modules() if hasattr(mod, "_qat_original_forward")]
    assert len(bases) == 2 and quantize_frozen_weights(m) == 5  # k, v, o, gate, up: no adapter
    assert not any(b.weight_quantized for b in bases)


# --- float formats: float8 rowwise, NVFP4, MXFP4 (emulated on any hardware) -----------------

def reference_float(kind, x):
    """torchao's own quantize-dequantize for the format, as it runs on the CPU."""
    if kind == "float8":
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow
        from torchao.quantization.qat.fake_quantize_config import _infer_fake_quantize_configs
        from torchao.quantization.qat.fake_quantizer import Float8FakeQuantizer

        _, wcfg = _infer_fake_quantize_configs(Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
        return Float8FakeQuantizer(wcfg)(x)
    if kind == "nvfp4":
        from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor, per_tensor_amax_to_scale

        return NVFP4Tensor.to_nvfp4(x, per_tensor_scale=per_tensor_amax_to_scale(x.abs().amax())).dequantize(x.dtype)
    from torchao.prototype.mx_formats.mx_tensor import MXTensor

    return MXTensor.to_mx(x, torch.float4_e2m1fn_x2, 32).dequantize(x.dtype)


def float_fq(kind):
    from qat.fake_quant import Float8Rowwise, MXFP4Emulated, NVFP4Emulated

    return {"float8": Float8Rowwise, "nvfp4": NVFP4Emulated, "mxfp4": MXFP4Emulated}[kind]()


@pytest.mark.parametrize("kind", ["float8", "nvfp4", "mxfp4"])
def test_float_formats_match_torchao_reference_and_keep_the_gradient(kind):
    torch.manual_seed(0)
    w = torch.randn(64, 128) * 0.05
    x = torch.randn(2, 9, 128)
    fq = float_fq(kind)
    assert torch.equal(fq(w)[0], reference_float(kind, w))
    assert torch.equal(fq(x)[0], reference_float(kind, x.reshape(-1, 128)).reshape_as(x))
    lin = QATLinear.from_linear(torch.nn.Linear(128, 64, bias=False), fq, fq)
    lin.weight.data.copy_(w)
    xr = x.clone().requires_grad_()
    y = lin(xr)
    gy = torch.randn_like(y) * 1e-6  # real gradients are this small; float8 would flush them
    y.backward(gy)
    wq, xq = fq(w)[0], fq(x)[0]
    torch.testing.assert_close(lin.weight.grad, gy.reshape(-1, 64).t() @ xq.reshape(-1, 128))
    torch.testing.assert_close(xr.grad, gy @ wq)
    assert int((lin.weight.grad == 0).sum()) == 0  # no gradient of 1e-6 scale is flushed to zero


def test_torchao_float8_fake_quantizer_flushes_small_gradients_and_ours_does_not():
    """The bug our float8 path fixes: torchao's float8 fake quantizer flushes gradients of 1e-6 to
    zero (98.8% of the weight gradient's entries on an H200, 99.2% of these on a CPU)."""
    torch.manual_seed(0)
    x = (torch.randn(16, 128) * 0.05).requires_grad_()
    reference_float("float8", x).backward(torch.randn(16, 128) * 1e-6)
    assert int((x.grad == 0).sum()) == 2032  # of 2048 (99.2%; seed 0 on CPU)
    from qat.fake_quant import Float8Rowwise, fake_quant_linear

    w = (torch.randn(32, 128) * 0.05).requires_grad_()
    fake_quant_linear(x.detach(), w, None, Float8Rowwise(), Float8Rowwise()).backward(torch.randn(16, 32) * 1e-6)
    assert (w.grad == 0).float().mean() == 0


def test_fp4_values_lie_on_the_e2m1_grid_with_round_half_to_even():
    # one MXFP4 block of 32 whose absmax is 6 -> E8M0 scale 1, so values map to E2M1 directly
    vals = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, -6.0])
    expect = torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0, 1.0, 1.5, 2.0, 2.0, 2.0, 3.0, 4.0, 4.0, 4.0, 6.0, -6.0])
    from qat.fake_quant import MXFP4Emulated, NVFP4Emulated

    out = MXFP4Emulated()(torch.cat([vals, vals]).reshape(1, 32))[0].reshape(-1)
    assert torch.equal(out[:16], expect) and torch.equal(out[16:], expect)
    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    torch.manual_seed(1)
    x = torch.randn(4, 64)
    q = NVFP4Emulated()(x)[0].reshape(4, 4, 16)
    # per 16-element block, values divided by the block's step are E2M1 grid points
    for block in q.reshape(-1, 16):
        nz = block[block != 0].abs()
        if len(nz):
            ratio = nz / nz.max() * 6.0
            assert torch.isclose(ratio[:, None], grid[None, :], atol=1e-3).any(1).all()


# --- learned scales (qat.learn_scales): LSQ --------------------------------------------------

def test_learned_scales_start_at_the_rule_and_get_the_lsq_gradient():
    from qat.fake_quant import IntxWeight

    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 64, bias=False)
    fq = IntxWeight(2, 32)
    learned = QATLinear.from_linear(copy.deepcopy(lin), fq, None, learn_scale=True)
    dynamic = QATLinear.from_linear(copy.deepcopy(lin), fq, None)
    x = torch.randn(5, 256)
    assert torch.equal(learned(x), dynamic(x))  # initialised by today's rule: the same forward
    with torch.no_grad():  # move the scales so that some weights clip and some grid points shift
        learned.weight_scale.mul_(torch.empty_like(learned.weight_scale).uniform_(0.6, 1.4))
    gy = torch.randn(5, 64)
    learned(x).backward(gy)
    # reference: the LSQ paper's straight-through round, differentiated by autograd, times g
    w, s = lin.weight.detach().clone().requires_grad_(), learned.weight_scale.detach().clone().requires_grad_()
    se = s.repeat_interleave(32, dim=1)
    v = w * (1.0 / se)
    q = torch.clamp(v + (torch.round(v) - v).detach(), -2, 1)
    (x @ (q * se).t()).backward(gy)
    g = 1 / (32 * 1) ** 0.5
    torch.testing.assert_close(learned.weight_scale.grad, s.grad * g, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(learned.weight.grad, w.grad, rtol=1e-5, atol=1e-6)
    clipped = (torch.round(v) < -2) | (torch.round(v) > 1)
    assert clipped.any() and (learned.weight.grad[clipped] == 0).all()


def test_reinit_sets_every_scale_to_the_rule_on_the_current_weights():
    from qat.fake_quant import IntxWeight
    from qat.learned_scales import param_groups, reinit_at_start

    torch.manual_seed(0)
    fq = IntxWeight(4, 32)
    model = torch.nn.Sequential(QATLinear.from_linear(torch.nn.Linear(64, 32), fq, None, learn_scale=True),
                                torch.nn.Linear(32, 8))
    with torch.no_grad():
        model[0].weight.add_(0.1)  # fine-tuned during the fake-quant delay
    assert not torch.equal(model[0].weight_scale, fq.init_scale(model[0].weight))
    reinit_at_start(model)
    assert torch.equal(model[0].weight_scale, fq.init_scale(model[0].weight))
    groups = param_groups(model, lr=1e-3, multiplier=10)
    assert [len(g["params"]) for g in groups] == [4, 1]  # two weights and biases; the scale apart
    assert groups[1]["params"][0] is model[0].weight_scale
    assert groups[1]["lr"] == pytest.approx(1e-2) and groups[1]["weight_decay"] == 0.0


