"""The Triton kernels of the intx and int8 fake quantizers (qat/fq_triton.py, the ops in qat/fq_op.py)
equal the pure-torch reference bit for bit: values, clip masks and straight-through gradients, fp32
and bf16, on random and adversarial data. Without a GPU they run on CPU tensors in Triton's
interpreter (tests/conftest.py sets TRITON_INTERPRET=1); with one, on CUDA against the CPU's
reference. Shapes are small: the interpreter costs a fraction of a second per launch."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("triton")

from qat.fake_quant import Int8PerToken, IntxWeight, QATLinear  # noqa: E402
from qat.fq_op import fused_route, route  # noqa: E402
from qat.schemes import get_scheme  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
WEIGHTS = [(4, 32), (2, 32), (8, 64), (3, None)]  # (bits, group); None: per output channel


def random_weights(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Weight-like values with a few 30x outliers that stretch their groups."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    return torch.where(torch.rand(w.shape, generator=g) < 0.01, w * 30, w)


def adversarial_groups(bits: int, gs: int) -> torch.Tensor:
    """One group per row, each built to break a sloppy kernel: constant, zero, tiny (subnormal) and
    huge groups; exact rounding ties (scale 1/16, values (k + 1/2) / 16, the absmax itself on the
    qmax + 1/2 tie that rounds out of range); a negative absmax; one outlier in noise."""
    g = torch.Generator().manual_seed(3)
    half = (2 ** bits - 1) / 2  # (qmax - qmin) / 2
    rows = [torch.full((gs,), 0.3), torch.full((gs,), -2.5), torch.zeros(gs), torch.full((gs,), 1e-40),
            torch.randn(gs, generator=g) * 1e-38, torch.randn(gs, generator=g) * 1e30]
    k = torch.arange(gs) % (2 ** bits) - 2 ** (bits - 1)  # qmin .. qmax, repeated
    ties = (k + 0.5) / 16
    ties[0] = half / 16  # the absmax: scale = exactly 1/16
    rows += [ties, -ties]
    spike = torch.randn(gs, generator=g) * 0.01
    spike[5] = -3.0
    rows += [spike, torch.randn(gs, generator=g) - 4.0]
    return torch.stack(rows)


def adversarial_tokens(k: int) -> torch.Tensor:
    """Rows of an activation: constant (positive, negative), zero, all positive, all negative,
    exact ties (min -8, max 127/16: scale 1/16, zero point 0, values (j + 1/2) / 16), an outlier."""
    g = torch.Generator().manual_seed(4)
    ties = (torch.arange(k) % 255 - 128 + 0.5) / 16
    ties[0], ties[1] = -8.0, 127 / 16
    spike = torch.randn(k, generator=g)
    spike[3] = 400.0
    rows = [torch.full((k,), 0.7), torch.full((k,), -0.7), torch.zeros(k), torch.rand(k, generator=g) + 1,
            -torch.rand(k, generator=g) - 1, ties, spike, torch.randn(k, generator=g) * 1e-3 + 5]
    return torch.stack(rows)


def fused(fq, x, scale=None, mask=True):
    """The quantizer on the Triton route, on the test device, back on the CPU."""
    with route("triton"):
        args = (x.to(DEV),) if scale is None else (x.to(DEV), scale.to(DEV))
        assert fused_route(fq, args[0])
        out, m = fq(*args, mask=mask)
    return out.cpu(), (m.cpu() if m is not None else None)


def assert_same(got, ref):
    (v, m), (rv, rm) = got, ref
    assert v.dtype == rv.dtype and torch.equal(v, rv)
    assert torch.equal(v.view(torch.int16 if v.dtype == torch.bfloat16 else torch.int32),
                       rv.view(torch.int16 if rv.dtype == torch.bfloat16 else torch.int32))  # signs of zeros too
    assert (m is None) == (rm is None) and (m is None or torch.equal(m, rm))


@DTYPES
@pytest.mark.parametrize("bits, group", WEIGHTS)
def test_weight_kernel_equals_the_reference_bitwise(bits, group, dtype):
    fq = IntxWeight(bits, group)
    gs = group or 96
    adv = adversarial_groups(bits, gs)
    for w in (random_weights(48, 192, bits), adv.reshape(-1, 2 * gs) if group else adv):
        w = w.to(dtype)
        ref = fq.eager(w)
        assert_same(fused(fq, w), ref)
        assert_same(fused(fq, w, mask=False), (ref[0], None))  # the forward: values alone
        assert not ref[1].all()  # some values clip: the masks compared are not trivial


@DTYPES
def test_activation_kernel_equals_the_reference_bitwise(dtype):
    fq = Int8PerToken()
    for x in ((torch.randn(3, 5, 160) * 3 + 0.5), adversarial_tokens(300)):
        x = x.to(dtype)
        ref = fq.eager(x)
        assert_same(fused(fq, x), ref)
        assert_same(fused(fq, x, mask=False), (ref[0], None))


@DTYPES
def test_long_segments_are_read_in_chunks_with_the_same_result(dtype):
    """A token's row (or a per-channel weight row) longer than a block: the min/max and the
    quantization loop over chunks, the last one partial."""
    from qat import fq_triton

    x = adversarial_tokens(100).to(dtype).to(DEV)
    ref = Int8PerToken().eager(x.cpu())
    out, mask = fq_triton.launch(x, 100, -128, 127, True, None, fq_triton.MODE_VALUES_MASK, max_block=32)
    assert_same((out.cpu(), mask.cpu()), ref)


@DTYPES
def test_learned_scale_kernel_equals_the_reference_bitwise(dtype):
    """A learned scale moved off the rule (some weights clip), and one pushed through zero, which
    the forward floors as the reference does."""
    fq = IntxWeight(2, 32)
    w = random_weights(32, 128, 5).to(dtype)
    move = torch.empty(32, 4).uniform_(0.6, 1.4, generator=torch.Generator().manual_seed(6))
    scale = fq.init_scale(w) * move
    scale[0, 0] = -1e-3
    assert_same(fused(fq, w, scale), fq.eager(w, scale))


@DTYPES
@pytest.mark.parametrize("grad_dtype, out_dtype", [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                                   (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)])
def test_straight_through_kernel_is_the_gradient_times_the_reference_mask(dtype, grad_dtype, out_dtype):
    g = torch.Generator().manual_seed(7)
    for fq, x in ((IntxWeight(4, 32), random_weights(32, 128, 8)), (Int8PerToken(), adversarial_tokens(64))):
        x = x.to(dtype)
        grad = (torch.randn(x.shape, generator=g) * 1e-3).to(grad_dtype)
        ref = (grad * fq.eager(x)[1]).to(out_dtype)
        with route("triton"):
            got = fq.ste(grad.to(DEV), x.to(DEV), None, out_dtype).cpu()
        assert got.dtype == out_dtype and torch.equal(got, ref)
        assert torch.equal(torch.signbit(got), torch.signbit(ref))  # g * 0 keeps the sign, as torch's does


def test_the_ops_autograd_is_the_clipped_ste_and_the_lsq_gradient():
    """qat::fused_fq differentiated by autograd: x's gradient is g times the mask; a learned
    scale's is IntxWeight.scale_grad (LSQ)."""
    fq = IntxWeight(2, 32)
    w = random_weights(16, 64, 9)
    scale = fq.init_scale(w) * 0.8
    g = torch.randn(16, 64, generator=torch.Generator().manual_seed(10))
    wr, sr = w.to(DEV).requires_grad_(), scale.to(DEV).requires_grad_()
    with route("triton"):
        out, _ = torch.ops.qat.fused_fq(wr, sr, fq._fq_key, False)
        out.backward(g.to(DEV))
    ref_vals, ref_mask = fq.eager(w, scale)
    assert torch.equal(out.detach().cpu(), ref_vals)
    assert torch.equal(wr.grad.cpu(), g * ref_mask) and not ref_mask.all()
    assert torch.equal(sr.grad.cpu(), fq.scale_grad(w, scale, g))


def test_the_ops_pass_torchs_custom_op_checks():
    """Schema, fake (meta) impls that match the real outputs, autograd registration, and the same
    results through AOTAutograd (what torch.compile traces)."""
    w = random_weights(16, 64, 11).to(torch.bfloat16).to(DEV)
    fq = IntxWeight(2, 32)
    scale = (fq.init_scale(w.cpu()) * 0.9).to(DEV)
    with route("triton"):
        torch.library.opcheck(torch.ops.qat.fused_fq.default, (w.requires_grad_(), scale.requires_grad_(), fq._fq_key, True))
        x = adversarial_tokens(32).to(DEV)
        torch.library.opcheck(torch.ops.qat.fused_ste.default,
                              (torch.randn_like(x), x, None, Int8PerToken()._fq_key, torch.bfloat16))


def assert_trains_the_same_on_both_routes(layer, dtype):
    """A [2, 6, 128] -> 48 step of `layer` on the Triton route (on the test device) equals the torch
    route's bit for bit: output, input gradient, weight gradient."""
    x, gy = (torch.randn(2, 6, 128) * 2).to(dtype), torch.randn(2, 6, 48).to(dtype)
    ref = train_step(layer, x, gy)
    with route("triton"):
        assert fused_route(layer.weight_fq, layer.weight.to(DEV))
        got = train_step(layer.to(DEV), x.to(DEV), gy.to(DEV))
    layer.cpu()
    assert len(got) == len(ref) and all(torch.equal(a.cpu(), b) for a, b in zip(got, ref))


def train_step(layer, x, gy):
    xi = x.clone().requires_grad_()
    layer.zero_grad(set_to_none=True)
    y = layer(xi)
    y.backward(gy)
    grads = [p.grad for p in (layer.weight, layer.weight_scale) if p is not None]
    return [y.detach(), xi.grad] + grads


@DTYPES
@pytest.mark.parametrize("name, group, learn", [("8da4w", 32, False), ("intx4-weight-only", 32, False),
                                                ("8da8w", None, False), ("8da2w", 32, True)])
def test_a_qat_linear_trains_the_same_on_both_routes_bitwise(name, group, learn, dtype):
    """Output, input gradient, weight gradient (and LSQ scale gradient) of a fake-quantized Linear:
    the Triton route (what CUDA runs) equals the torch route (the reference) bit for bit."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 48, bias=False)
    layer = QATLinear.from_linear(lin, *get_scheme(name).fake_quantizers(group), learn_scale=learn).to(dtype)
    if learn:
        with torch.no_grad():
            layer.weight_scale.mul_(torch.empty_like(layer.weight_scale).uniform_(0.7, 1.3))
    x = (torch.randn(2, 6, 128) * 2).to(dtype)
    gy = torch.randn(2, 6, 48).to(dtype)
    ref = train_step(layer, x, gy)
    with route("triton"):
        got = train_step(layer.to(DEV), x.to(DEV), gy.to(DEV))
    layer.cpu()
    assert len(got) == len(ref) and all(torch.equal(a.cpu(), b) for a, b in zip(got, ref))
    assert (ref[2] == 0).any()  # clipped weights: the mask is part of what is compared


def test_frozen_weights_quantized_once_on_the_triton_route_equal_the_reference():
    from qat.fake_quant import quantize_frozen_weights

    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 48).to(torch.bfloat16).requires_grad_(False)
    a, b = (QATLinear.from_linear(copy.deepcopy(lin), *get_scheme("8da4w").fake_quantizers(32)) for _ in range(2))
    quantize_frozen_weights(torch.nn.Sequential(a))
    with route("triton"):
        quantize_frozen_weights(torch.nn.Sequential(b.to(DEV)))
    assert torch.equal(a.weight, b.weight.cpu())


@pytest.mark.parametrize("transposed", [False, True])
def test_moe_expert_weights_on_the_triton_route_equal_the_reference(transposed):
    """The 3D expert weights (qat/moe.py): values and straight-through gradient."""
    from qat.moe import Experts3D

    torch.manual_seed(0)
    w = random_weights(4 * 24, 64, 12).reshape(4, 24, 64).to(torch.bfloat16)
    w = w.transpose(1, 2).contiguous() if transposed else w
    fq = Experts3D(IntxWeight(4, 32), transposed)
    g = torch.randn(w.shape).to(torch.bfloat16)
    ref_vals, ref_mask = fq(w)
    with route("triton"):
        vals, _ = fq(w.to(DEV), mask=False)
        grad = fq.ste(g.to(DEV), w.to(DEV))
    assert torch.equal(vals.cpu(), ref_vals) and torch.equal(grad.cpu(), g * ref_mask)


def test_a_bad_route_is_refused_in_one_line(monkeypatch):
    """QAT_FQ_KERNELS: an unknown name, and the Triton route on CPU tensors outside the
    interpreter, stop with a UserError (one `error:` line at an entry point) naming the fix."""
    from qat import fq_op
    from qat.errors import UserError

    monkeypatch.setitem(fq_op._route, "name", "cuda")
    with pytest.raises(UserError, match="QAT_FQ_KERNELS='cuda' is not one of auto, torch, triton"):
        IntxWeight(4, 32)(torch.randn(8, 64))
    with pytest.raises(ValueError, match="not one of"):
        fq_op.set_route("cuda")
    monkeypatch.setitem(fq_op._route, "name", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(UserError, match="needs TRITON_INTERPRET=1"):
        IntxWeight(4, 32)(torch.randn(8, 64))


# --- float8 e4m3 per row -------------------------------------------------------------------------

def float8_rows(k: int) -> torch.Tensor:
    """Rows that exercise e4m3's rounding: absmax 448 (scale exactly 1), so the values are what the
    cast sees: ties between normal neighbours (1 + 1/16 -> 1, 1 + 3/16 -> 1.25) and between
    subnormal ones (3 * 2**-10 -> 2**-8, 2**-10 -> 0), the normal/subnormal border, negative values
    that round to -0; a 1e4x outlier that pushes the rest of its row below e4m3's normal range;
    all positive, all negative, subnormal fp32 inputs, and a zero row (0 / 0: NaN, as in torchao)."""
    g = torch.Generator().manual_seed(7)
    ties = torch.tensor([448.0, 1 + 1 / 16, 1 + 3 / 16, -(1 + 5 / 16), 3 * 2 ** -10, 2 ** -10, -(2 ** -11),
                         2 ** -6 - 2 ** -11, 2 ** -6 + 2 ** -10, -(2 ** -9) * 2.5, 0.0, -0.0])
    ties = ties.repeat(k // len(ties) + 1)[:k]
    outlier = torch.randn(k, generator=g) * 0.01
    outlier[2] = 100.0
    rows = [ties, -ties, outlier, torch.rand(k, generator=g) + 1, -torch.rand(k, generator=g) * 3,
            torch.randn(k, generator=g) * 1e-39, torch.zeros(k), torch.randn(k, generator=g) * 5]
    return torch.stack(rows)


def assert_same_nan(got, ref):
    """Bitwise (signs of zeros too), NaN where the reference has NaN."""
    v, rv = got[0], ref[0]
    nan = rv.isnan()
    assert torch.equal(v.isnan(), nan) and got[1] is None and ref[1] is None
    assert_same((v.masked_fill(nan, 0), None), (rv.masked_fill(nan, 0), None))


@DTYPES
def test_float8_kernel_equals_the_reference_bitwise(dtype):
    from qat.fake_quant import Float8Rowwise

    fq = Float8Rowwise()
    for x in (float8_rows(96), random_weights(40, 160, 8), torch.randn(3, 7, 96) * 4):
        x = x.to(dtype)
        assert_same_nan(fused(fq, x), fq.eager(x))
        assert_same_nan(fused(fq, x, mask=False), fq.eager(x))


@DTYPES
def test_float8_rows_longer_than_a_block_are_read_in_chunks(dtype):
    from qat import fq_triton
    from qat.fake_quant import Float8Rowwise

    x = float8_rows(100).to(dtype)
    out, mask = fq_triton.launch(x.to(DEV), 100, 0, 0, False, None, fq_triton.MODE_VALUES, max_block=32, float8=True)
    assert mask is None
    assert_same_nan((out.cpu(), None), Float8Rowwise().eager(x))


@DTYPES
def test_a_float8_qat_linear_trains_the_same_on_both_routes_bitwise(dtype):
    """float8 weights and activations: the Triton route's output and gradients equal the torch
    route's (the gradient passes straight through, so the backward is the same matmuls)."""
    torch.manual_seed(0)
    layer = QATLinear.from_linear(torch.nn.Linear(128, 48, bias=False), *get_scheme("float8").fake_quantizers(None))
    assert_trains_the_same_on_both_routes(layer.to(dtype), dtype)
