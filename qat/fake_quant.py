"""Our fake-quantized Linear: torchao's forward numerics, a straight-through backward that
recomputes instead of saving, and an opt-in LoRA mode that fake-quantizes the merged weight.

Forward. The quantize-dequantize uses torchao's own primitives (`choose_qparams_affine`,
`_fake_quantize_affine`) with the parameters its QAT configs derive from the PTQ base config,
so the training forward equals the converted model's output exactly for the intx schemes (the
tests assert it). torchao's GPU int4 trains the exact grid of the packing convert uses
(qat/int4_grid.py). Under torch.compile each quantizer runs as one opaque op (qat/fq_op.py), so a
compiled block quantizes bit for bit as eager mode does.

Backward. torchao's autograd graph saves the fake-quantized weight and activation copies, and
lets gradients flow through the dynamically computed scales. Here the autograd Function saves
only what a plain Linear saves (the input and the weight) and recomputes the quantized copies in
backward: an elementwise pass, cheap next to the matmuls. The gradient is the clipped
straight-through estimator: identity where the value was inside the quantization range, zero
where round-then-clamp clipped it. No gradient passes through a low-precision dtype.

Passes. The forward computes values only, no masks. On CUDA every quantizer here is one Triton
kernel (qat/fq_op.py, qat/fq_triton.py, qat/fq_triton_blocks.py), and the backward multiplies by
the clip mask inside a kernel that recomputes it. An input that several layers read (q/k/v, gate/up) is
quantized once (qat/fq_share.py). bench/count_kernels.py counts the full-size passes of a step.
"""

from __future__ import annotations

import math
import types
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from qat.fq_op import FusedCall, OpaqueFakeQuant, blocks_call, fused_route
from qat.fq_share import shared_values


@dataclass(frozen=True)
class IntxWeight(OpaqueFakeQuant):
    """Symmetric intN weights, per group of `group_size` input features or per output channel.

    The scale is torchao's (absmax / ((qmax - qmin) / 2) per group), computed from the weight at
    every forward; or, with qat.learn_scales, a trained parameter `scale` [out, groups] that
    starts from that same rule (`init_scale`) and learns with the LSQ estimator (`scale_grad`).
    """
    rows_independent = True  # row by row: a row shard quantizes alone (quantize_frozen_weights)
    bits: int
    group_size: Optional[int]

    @property
    def qrange(self) -> tuple[int, int]:
        return -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1

    def block(self, w: torch.Tensor) -> tuple[int, int]:
        return (1, self.group_size or w.shape[-1])

    def init_scale(self, w: torch.Tensor) -> torch.Tensor:
        """[out, groups]: the scale the dynamic rule gives `w` now, in fp32."""
        from torchao.quantization.utils import get_group_qparams_symmetric

        return get_group_qparams_symmetric(w, self.bits, self.block(w)[1], None)[0].float()

    def eager(self, w: torch.Tensor, scale: Optional[torch.Tensor] = None,
              mask: bool = True) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        from torchao.quantization.utils import get_group_qparams_symmetric

        qmin, qmax = self.qrange
        gs = self.block(w)[1]
        if scale is None:
            scale = get_group_qparams_symmetric(w, self.bits, gs, None)[0]
        else:
            scale = self.effective_scale(scale, w.dtype)
        zp = torch.zeros(scale.shape, dtype=torch.int32, device=w.device)
        return _fake_quantize(w, (1, gs), scale, zp, qmin, qmax, mask=mask)

    def fused_args(self, w: torch.Tensor, scale: Optional[torch.Tensor]):
        gs = self.block(w)[1]
        if w.dim() != 2 or gs < 2 or w.shape[-1] % gs:  # torchao's checks raise on the eager path
            return None
        seg_scale = self.effective_scale(scale, w.dtype) if scale is not None else None
        return FusedCall("affine", (gs, *self.qrange, False, seg_scale))

    @staticmethod
    def effective_scale(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """A learned scale as the forward and convert use it: in the weight's dtype, and kept
        positive (the dynamic rule's own floor) should an update push it through zero."""
        return scale.to(dtype).clamp(min=torch.finfo(dtype).smallest_normal)

    def scale_grad(self, w: torch.Tensor, scale: torch.Tensor, g_wq: torch.Tensor) -> torch.Tensor:
        """LSQ (Esser et al., 2020): with v = w / s and q = clamp(round(v)), d(q s)/ds is q - v
        where v was inside the range (round passes the gradient straight through) and the clamp
        bound q where it was clipped; summed over the group and scaled by 1/sqrt(group * qmax)
        so that the scale's step is commensurate with the weights' (the paper's g)."""
        qmin, qmax = self.qrange
        rows, gs = w.shape[0], self.block(w)[1]
        v = w.float().reshape(rows, -1, gs) * (1.0 / self.effective_scale(scale, w.dtype).float().reshape(rows, -1, 1))
        q = torch.round(v)
        inside = (q >= qmin) & (q <= qmax)
        dq_ds = torch.where(inside, q - v, q.clamp(qmin, qmax))
        g = (g_wq.float().reshape(rows, -1, gs) * dq_ds).sum(-1)
        return (g / math.sqrt(gs * qmax)).to(scale.dtype)


@dataclass(frozen=True)
class Int8PerToken(OpaqueFakeQuant):
    """Asymmetric int8 per-token dynamic activations (the "8da" in 8da4w)."""

    def eager(self, x: torch.Tensor, mask: bool = True) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        from torchao.quantization.quant_primitives import MappingType, choose_qparams_affine

        x2 = x.reshape(-1, x.shape[-1])
        scale, zp = choose_qparams_affine(x2, MappingType.ASYMMETRIC, (1, x2.shape[-1]), torch.int8,
                                          quant_min=-128, quant_max=127, eps=None, scale_dtype=None,
                                          zero_point_dtype=torch.int32)
        xq, m = _fake_quantize(x2, (1, x2.shape[-1]), scale, zp, -128, 127, mask=mask)
        return xq.reshape_as(x).to(x.dtype), (m.reshape_as(x) if m is not None else None)

    def fused_args(self, x: torch.Tensor, scale: Optional[torch.Tensor]):
        if x.dim() == 0 or x.shape[-1] == 0:
            return None
        return FusedCall("affine", (x.shape[-1], -128, 127, True, None))


@dataclass(frozen=True)
class Int4Asymmetric(OpaqueFakeQuant):
    """torchao's GPU int4 (`Int4WeightOnlyConfig`): per group of `group_size` input features,
    scale = (max - min) / 15 and a floating-point zero point min + 8 * scale; values are
    round((w - min) / scale) in 0..15, shifted by 8. `packing` is the packing convert uses
    (Int4Scheme.packing): "plain" (mslk) and "tile_packed_to_4d" (tinygemm) round the scale and
    zero point differently, and the values are exactly the bf16 weights that packing's kernel
    multiplies with (qat/int4_grid.py), cast to the weight's dtype."""
    rows_independent = True
    group_size: int
    packing: str = "plain"

    def __post_init__(self):
        from qat.int4_grid import PACKINGS

        if self.packing not in PACKINGS:
            raise ValueError(f"int4 packing {self.packing!r} is not one of {PACKINGS}")
        super().__post_init__()

    def eager(self, w: torch.Tensor, mask: bool = True) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        from qat.int4_grid import int4_fake_quant

        return int4_fake_quant(w, self.group_size, self.packing, mask=mask)

    def fused_args(self, w: torch.Tensor, scale: Optional[torch.Tensor]):
        return blocks_call("int4_plain" if self.packing == "plain" else "int4_tinygemm", w, self.group_size)


@dataclass(frozen=True)
class Int4AfterFloat8(OpaqueFakeQuant):
    """The weights of torchao's `Float8DynamicActivationInt4WeightConfig` (mslk f8i4bf16 kernels):
    first float8 e4m3 per row, then symmetric int4 (-8..7) per group with scale absmax / 8, as
    torchao's `Int4WeightFakeQuantizer` with float8 activations computes it."""
    rows_independent = True
    group_size: int = 128

    def eager(self, w: torch.Tensor, mask: bool = True) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        from torchao.quantization.quant_primitives import (_choose_scale_float8, _dequantize_affine_float8,
                                                           _quantize_affine_float8)

        fp8_scale = _choose_scale_float8(w, (1, w.shape[-1]), torch.float8_e4m3fn, hp_value_lb=1e-12)
        w8 = _dequantize_affine_float8(_quantize_affine_float8(w, fp8_scale, torch.float8_e4m3fn), fp8_scale, w.dtype)
        scale = torch.clamp(w8.view(w.shape[0], -1, self.group_size).abs().amax(-1) / 8, min=1e-6)
        wq, m = _fake_quantize(w8, (1, self.group_size), scale, torch.zeros_like(scale), -8, 7, torch.int8, mask)
        return wq.to(w.dtype), m

    def fused_args(self, w: torch.Tensor, scale: Optional[torch.Tensor]):
        return blocks_call("fp8_int4", w, self.group_size)


@dataclass(frozen=True)
class Float8Rowwise(OpaqueFakeQuant):
    """float8 e4m3 with one scale per row (per output channel for weights, per token for
    activations): torchao's `_choose_scale_float8` / quantize / dequantize. The values never
    clip (the scale maps each row's absmax to the e4m3 maximum), so the mask is None: a pure
    straight-through gradient, computed in the high-precision dtype. torchao's own float8 fake
    quantizer lets autograd cast the incoming gradient to float8, where it underflows."""
    has_mask = False
    rows_independent = True

    def eager(self, x: torch.Tensor, mask: bool = True) -> tuple[torch.Tensor, None]:
        from torchao.quantization.quant_primitives import (_choose_scale_float8, _dequantize_affine_float8,
                                                           _quantize_affine_float8)

        x2 = x.reshape(-1, x.shape[-1])
        scale = _choose_scale_float8(x2, (1, x2.shape[-1]), torch.float8_e4m3fn)
        q = _quantize_affine_float8(x2, scale, torch.float8_e4m3fn)
        return _dequantize_affine_float8(q, scale, x.dtype).reshape_as(x), None

    def fused_args(self, x: torch.Tensor, scale: Optional[torch.Tensor]):
        if x.dim() == 0 or x.shape[-1] == 0:
            return None
        return FusedCall("affine", (x.shape[-1], 0, 0, False, None), {"float8": True})  # a segment per row


@dataclass(frozen=True)
class NVFP4Emulated(OpaqueFakeQuant):
    """NVFP4: E2M1 values, E4M3 scales per 16 elements and a per-tensor fp32 scale, emulated with
    torchao's reference quantize-dequantize (`NVFP4Tensor.to_nvfp4`), which runs on any device.
    Pure STE gradient."""
    has_mask = False
    rows_independent = False  # the per-tensor scale needs the whole weight

    def eager(self, x: torch.Tensor, mask: bool = True) -> tuple[torch.Tensor, None]:
        from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor, per_tensor_amax_to_scale

        x2 = x.reshape(-1, x.shape[-1])
        pts = per_tensor_amax_to_scale(x2.abs().amax().float())
        t = NVFP4Tensor.to_nvfp4(x2, block_size=16, per_tensor_scale=pts)
        return t.dequantize(x.dtype).reshape_as(x), None

    def fused_args(self, x: torch.Tensor, scale: Optional[torch.Tensor]):
        return blocks_call("nvfp4", x, 16)


@dataclass(frozen=True)
class MXFP4Emulated(OpaqueFakeQuant):
    """MXFP4: E2M1 values with E8M0 (power-of-two) scales per 32 elements, emulated with torchao's
    reference `MXTensor.to_mx`, which runs on any device. Pure STE gradient."""
    has_mask = False
    rows_independent = True

    def eager(self, x: torch.Tensor, mask: bool = True) -> tuple[torch.Tensor, None]:
        from torchao.prototype.mx_formats.mx_tensor import MXTensor

        x2 = x.reshape(-1, x.shape[-1])
        t = MXTensor.to_mx(x2, torch.float4_e2m1fn_x2, 32)
        return t.dequantize(x.dtype).reshape_as(x), None

    def fused_args(self, x: torch.Tensor, scale: Optional[torch.Tensor]):
        return blocks_call("mxfp4", x, 32)


def _fake_quantize(x, block, scale, zp, qmin, qmax, quant_dtype=torch.int32,
                   mask: bool = True) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(torchao's fake-quantized values, mask of the elements that round-then-clamp did not clip,
    or None when `mask` is False)."""
    from torchao.quantization.quant_primitives import _fake_quantize_affine

    xq = _fake_quantize_affine(x, block, scale, zp, quant_dtype, qmin, qmax)
    if not mask:
        return xq, None
    rows, gs = x.shape[0], block[1]
    q = torch.round(x.reshape(rows, -1, gs) * (1.0 / scale.reshape(rows, -1, 1))) + zp.reshape(rows, -1, 1)
    mask = ((q >= qmin) & (q <= qmax)).reshape_as(x)
    return xq, mask


class _FakeQuantLinear(torch.autograd.Function):
    """y = fq_act(x) @ fq_w(w; scale).T + b, saving only x, w and the learned scale (a plain Linear
    saves x and w). `scale` is None unless the scales are learned (qat.learn_scales). The forward
    computes values only; the backward recomputes what its gradients need (`_operand`)."""

    @staticmethod
    def forward(ctx, x, w, b, scale, wq_fn, aq_fn):
        with torch.no_grad():
            wq = _call(wq_fn, w, scale, mask=False)[0] if wq_fn is not None else w
            xq = shared_values(aq_fn, x) if aq_fn is not None else x
            y = F.linear(xq, wq.to(xq.dtype), b)
        ctx.save_for_backward(x, w, scale)
        ctx.fns, ctx.has_bias = (wq_fn, aq_fn), b is not None
        return y

    @staticmethod
    def backward(ctx, gy):
        x, w, scale = ctx.saved_tensors
        wq_fn, aq_fn = ctx.fns
        need_gx, need_gw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # The gradient of the fake-quantized weight: the weight's (through the clipped STE) and,
        # in a LoRA run with learned scales, the scale's even though the weight is frozen.
        need_gwq = need_gw or (scale is not None and ctx.needs_input_grad[3])
        wq, w_ste = _operand(wq_fn, w, scale, values=need_gx, ste=need_gw)
        xq, x_ste = _operand(aq_fn, x, None, values=need_gwq, ste=need_gx, share=True)
        gx = gw = gb = gs = None
        if need_gx:
            gx = x_ste(gy @ wq.to(gy.dtype), gy.dtype)
        if need_gwq:
            g_wq = gy.reshape(-1, gy.shape[-1]).t() @ xq.reshape(-1, xq.shape[-1]).to(gy.dtype)
            if need_gw:
                gw = w_ste(g_wq, w.dtype)
            if scale is not None and ctx.needs_input_grad[3]:
                gs = wq_fn.scale_grad(w, scale, g_wq)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = gy.reshape(-1, gy.shape[-1]).sum(0)
        return gx, gw, gb, gs, None, None


def _call(fn, t, scale, mask: bool):
    return fn(t, mask=mask) if scale is None else fn(t, scale, mask=mask)


def _operand(fn, t, scale, values: bool, ste: bool, share: bool = False):
    """(fake-quantized t or None, g -> straight-through gradient in a dtype, or None), each pass
    done once. The torch route computes values and mask together and multiplies by the mask; the
    fused route computes the values alone and recomputes the mask inside the gradient's kernel.
    `fn` None: t is used as it is (no quantizer, or a weight quantize_frozen_weights replaced)."""
    if fn is None:
        return t, (lambda g, dtype: g.to(dtype))
    if ste and not (isinstance(fn, OpaqueFakeQuant) and fused_route(fn, t)):
        vals, m = _call(fn, t, scale, mask=True)
        return vals, (lambda g, dtype: (g * m if m is not None else g).to(dtype))
    vals = None
    if values:
        vals = shared_values(fn, t) if share else _call(fn, t, scale, mask=False)[0]
    return vals, ((lambda g, dtype: fn.ste(g, t, scale, dtype)) if ste else None)


def fake_quant_linear(x, w, b, wq_fn, aq_fn, scale=None):
    return _FakeQuantLinear.apply(x, w, b, scale, wq_fn, aq_fn)


class QATLinear(nn.Linear):
    """nn.Linear with fake-quantized weights (and activations); same parameters and state dict,
    plus `weight_scale` [out, groups] when the scales are learned (qat.learn_scales)."""

    def __init__(self, in_features, out_features, bias, weight_fq, act_fq, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.weight_fq, self.act_fq, self.enabled = weight_fq, act_fq, True
        self.weight_quantized = False  # the frozen weight holds fq(W) (quantize_frozen_weights)
        self.register_parameter("weight_scale", None)

    @classmethod
    def from_linear(cls, lin: nn.Linear, weight_fq, act_fq, learn_scale: bool = False) -> "QATLinear":
        new = cls(lin.in_features, lin.out_features, lin.bias is not None, weight_fq, act_fq, device="meta")
        new.weight = lin.weight  # the same Parameter: optimizer, FSDP and checkpoints see no change
        new.bias = lin.bias
        if learn_scale:  # on meta where the weight is (ranks that rank 0 fills after sharding)
            w = lin.weight.detach()
            scale = weight_fq.init_scale(w) if not w.is_meta else \
                torch.empty(w.shape[0], w.shape[1] // weight_fq.block(w)[1], device="meta")
            new.weight_scale = nn.Parameter(scale)
        return new

    def to_linear(self) -> nn.Linear:
        lin = nn.Linear(self.in_features, self.out_features, self.bias is not None, device="meta")
        lin.weight, lin.bias = self.weight, self.bias
        return lin

    def forward(self, x):
        if self.weight_quantized:
            if not self.enabled:  # the original weight is gone: a teacher=base forward cannot use it
                raise RuntimeError("fake quantization switched off after quantize_frozen_weights replaced the weight")
            return fake_quant_linear(x, self.weight, self.bias, None, self.act_fq)
        if not self.enabled:
            return F.linear(x, self.weight, self.bias)
        return fake_quant_linear(x, self.weight, self.bias, self.weight_fq, self.act_fq, self.weight_scale)

    def extra_repr(self) -> str:
        learned = ", learned scales" if self.weight_scale is not None else ""
        return f"{super().extra_repr()}, weight_fq={self.weight_fq}, act_fq={self.act_fq}{learned}"


def quantize_frozen_weights(model: nn.Module) -> int:
    """Replace every frozen fake-quantized weight by its fake-quantized values, once; returns how
    many. A frozen weight (LoRA's default mode) never changes, so fq(W) is the same at every
    forward and backward, and computing it once removes the weight passes from every step.

    FSDP2 shards a weight [out, in] by rows and these quantizers work row by row (rows_independent),
    so each rank quantizes its own shard and the all-gather brings back exactly fq(W). LoRA
    checkpoints hold no frozen weights (they come from model.path again), so a quantized copy is
    never saved as a weight. Not for weights with learned scales (fq depends on a trained scale)
    or in merged mode (peft's layer quantizes W + s*B@A itself, from base.weight)."""
    merged = {id(m.base_layer) for m in model.modules() if hasattr(m, "_qat_original_forward")}
    n = 0
    for mod in model.modules():
        if (type(mod) is QATLinear and id(mod) not in merged and not mod.weight_quantized
                and mod.weight_scale is None and not mod.weight.requires_grad
                and getattr(mod.weight_fq, "rows_independent", False)):
            with torch.no_grad():
                local = mod.weight.to_local() if hasattr(mod.weight, "to_local") else mod.weight
                if local.numel():  # an uneven FSDP2 split can leave a rank no rows
                    local.copy_(mod.weight_fq(local, mask=False)[0])
            mod.weight_quantized = True
            n += 1
    return n


def merged_lora_forward(self, x, *args, **kwargs):
    """peft lora.Linear.forward replacement: fake-quantize W + s*B@A, what export computes.

    The default LoRA QAT fake-quantizes only the frozen base weight and adds the adapter in high
    precision, but the deployed model quantizes the *merged* weight. Here training sees exactly
    the deployed function; gradients reach A and B through the straight-through estimator.
    """
    base: QATLinear = self.base_layer
    if self.disable_adapters or self.merged or not base.enabled:
        return self._qat_original_forward(x, *args, **kwargs)
    w = base.weight
    for name in self.active_adapters:
        if name in self.lora_A:
            a, b_ = self.lora_A[name].weight, self.lora_B[name].weight
            w = w + self.scaling[name] * (b_ @ a).to(w.dtype)
    return fake_quant_linear(x, w, base.bias, base.weight_fq, base.act_fq, base.weight_scale)


def use_merged_lora(lora_layer: nn.Module) -> None:
    if any(not isinstance(d, nn.Identity) for d in lora_layer.lora_dropout.values()):
        raise ValueError("qat.lora_merged needs lora.dropout=0: dropout applies to the adapter path only")
    lora_layer._qat_original_forward = lora_layer.forward
    lora_layer.forward = types.MethodType(merged_lora_forward, lora_layer)
