"""Learned weight scales (qat.learn_scales): LSQ for the intx schemes.

The per-group (or per-channel) scale of every fake-quantized Linear becomes a parameter,
`QATLinear.weight_scale` [out, groups], next to the weight it scales. Its life:

  start     the dynamic rule (absmax / ((qmax - qmin) / 2), what the scale would be without
            learning), computed from the weight the moment fake quantization starts: at prepare
            time, and again from the trained weight at step qat.fake_quant_after_n_steps when that
            is > 0 (`reinit_at_start`). The rule depends only on the weights, so a resumed run
            redoes it at the same step, bit for bit.
  train     the LSQ gradient (IntxWeight.scale_grad), its own lr (`param_groups`), no weight decay
            (decay would shrink the grid towards zero). In a LoRA run the scales of the frozen
            base layers train; in merged mode (qat.lora_merged) they scale W + s*B@A.
  shard     FSDP2 shards a scale [out, groups] on dim 0 like its weight [out, in], so rank r
            holds the scales of exactly the weight rows it holds: re-initialising is local.
  save      a trainable parameter, so in every checkpoint, LoRA's included; during the delay it
            gets a zero gradient so that the optimizer state is complete (`fill_unused_grads`).
  convert   `use_learned_scales` rebuilds each quantized weight from the hp weight and its
            learned scale, so the converted model still equals the training forward exactly.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from qat.errors import UserError


def check_learnable(scheme, learn: bool) -> None:
    if learn and not scheme.learnable_scales:
        raise UserError(f"qat.learn_scales=true is for the intx schemes (8da{{b}}w, intx{{b}}-weight-only); "
                        f"{scheme.name!r} computes its scales from each tensor: set qat.learn_scales=false")


def learned(model: nn.Module) -> dict[str, nn.Module]:
    """{name: QATLinear} of every layer with a learned scale."""
    from qat.fake_quant import QATLinear

    return {n: m for n, m in model.named_modules() if isinstance(m, QATLinear) and m.weight_scale is not None}


def param_groups(model: nn.Module, lr: float, multiplier: float) -> list[dict]:
    """AdamW groups: every other trainable parameter, then the scales at lr * multiplier without
    weight decay. A scheduler's LambdaLR scales both groups alike."""
    scales = [m.weight_scale for m in learned(model).values()]
    ids = {id(s) for s in scales}
    groups = [{"params": [p for p in model.parameters() if p.requires_grad and id(p) not in ids]}]
    if scales:
        groups.append({"params": scales, "lr": lr * multiplier, "weight_decay": 0.0})
    return groups


def fill_unused_grads(model: nn.Module) -> None:
    """A zero gradient for every scale that got none: during the fake-quant delay the scales take
    no part in the forward. AdamW keeps no state for a parameter without a gradient, and a
    checkpoint saved then lacks the entries that a resumed optimizer expects (DCP initialises the
    state of every parameter on load). With a zero gradient AdamW creates the state and leaves the
    scale as it is (the scales have no weight decay)."""
    for mod in learned(model).values():
        if mod.weight_scale.grad is None:
            mod.weight_scale.grad = torch.zeros_like(mod.weight_scale)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


@torch.no_grad()
def reinit_at_start(model: nn.Module) -> None:
    """Every learned scale := the dynamic rule on the weight it will quantize, now (sharded or not).

    In merged LoRA mode that weight is W + s*B@A; B's rows shard like W's, A is gathered whole
    (it is r x in, small)."""
    lora_of = _merged_lora_layers(model)
    for name, mod in learned(model).items():
        w = _local(mod.weight).float()
        lora = lora_of.get(name)
        if lora is not None:
            for a in lora.active_adapters:
                if a in lora.lora_A:
                    b_, a_ = _local(lora.lora_B[a].weight).float(), _full(lora.lora_A[a].weight).float()
                    w = w + lora.scaling[a] * (b_ @ a_)
        scale = _local(mod.weight_scale)
        if w.shape[0]:  # a rank may hold no rows of a small layer
            scale.copy_(mod.weight_fq.init_scale(w).to(scale.dtype))


def _merged_lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """{name of the QATLinear base layer: its peft layer} for layers trained in merged mode."""
    out = {}
    for name, mod in model.named_modules():
        if hasattr(mod, "_qat_original_forward"):
            out[f"{name}.base_layer"] = mod
    return out


@torch.no_grad()
def use_learned_scales(model: nn.Module, quantized: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """After torchao quantized the Linears: rebuild each one listed in `quantized` ({name: (hp
    weight, learned scale)}) with its learned scale instead of the one torchao chose, keeping
    torchao's tensor type, block and activation quantization."""
    from torchao.quantization import IntxUnpackedToInt8Tensor

    from qat.fake_quant import IntxWeight

    for name, (w, scale) in quantized.items():
        lin = model.get_submodule(name)
        t = lin.weight
        if not isinstance(t, IntxUnpackedToInt8Tensor):
            raise TypeError(f"{name}: expected torchao's IntxUnpackedToInt8Tensor, got {type(t).__name__}")
        s = IntxWeight.effective_scale(scale, w.dtype).reshape(t.scale.shape).to(t.scale.dtype)
        new = IntxUnpackedToInt8Tensor.from_hp(
            w, t.block_size, t.target_dtype, activation_quantization=t.activation_quantization,
            intx_choose_qparams_algorithm=None, custom_scale=s, custom_zero_point=torch.zeros_like(t.zero_point))
        lin.weight = nn.Parameter(new, requires_grad=False)
