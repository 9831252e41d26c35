"""MoE experts in real quantized form, for convert and PTQ.

The intx schemes quantize each 3D expert weight into torchao's `IntxUnpackedToInt8Tensor` (block
[1, 1, group]), and the transformers eager expert forward runs it: it selects one expert
(`aten.select`, registered here) and calls F.linear, which the tensor implements. The converted
forward equals the fake-quantized one exactly. The `quantized/` folder stores these tensors as
they are (int8 qdata + scales, flattened by transformers' torchao quantizer, whose loader rebuilds
them) with `experts_implementation: "eager"` in config.json, since the default grouped_mm forward
transposes the weight, which the tensor does not implement. A process that runs the reloaded
model needs `register_expert_ops()` (evaluate does it). Transposed layouts (gpt-oss computes
x @ W[e], a matmul the tensor does not implement) and the other schemes have no 3D format that
runs: convert says so, and their experts are simulated (the fake-quantized values), labelled in
verify.json.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from qat.layout import decoder_blocks, expert_weight_names, experts_modules, is_transposed
from qat.moe import Experts3D, unwrap
from qat.schemes import Scheme


def register_expert_ops() -> None:
    """`aten.select` on a 3D IntxUnpackedToInt8Tensor (one expert): the 2D tensor F.linear runs.
    torchao 0.18 implements slice and linear but not select. Idempotent; any process that runs
    quantized experts (convert, and evaluate on a `quantized/` folder) calls it first."""
    from torch.utils._python_dispatch import return_and_correct_aliasing
    from torchao.quantization import IntxUnpackedToInt8Tensor

    aten = torch.ops.aten
    if aten.select.int in IntxUnpackedToInt8Tensor._ATEN_OP_TABLE.get(IntxUnpackedToInt8Tensor, {}):
        return

    @IntxUnpackedToInt8Tensor.implements(aten.select.int)
    def _select(func, types, args, kwargs):
        self, dim, index = args
        if dim != 0 or self.block_size[0] != 1:
            raise NotImplementedError(f"select on dim {dim} of an IntxUnpackedToInt8Tensor with block {self.block_size}")
        new = IntxUnpackedToInt8Tensor(self.qdata[index], self.scale[index], self.zero_point[index], self.target_dtype,
                                       tuple(self.block_size[1:]), self.dtype, self.activation_quantization)
        return return_and_correct_aliasing(func, args, kwargs, new)


def intx_expert_tensor(w: torch.Tensor, bits: int, group_size: Optional[int]):
    """torchao's intx weight-only format of one 3D expert weight [E, out, in]."""
    from torchao.quantization import IntxUnpackedToInt8Tensor
    from torchao.quantization.quant_primitives import MappingType

    register_expert_ops()
    block = [1, 1, group_size or w.shape[-1]]
    return IntxUnpackedToInt8Tensor.from_hp(w, block, getattr(torch, f"int{bits}"), mapping_type=MappingType.SYMMETRIC)


def _real_tensor(mod: nn.Module, w: torch.Tensor, scheme: Scheme, group_size: Optional[int]):
    """(quantized tensor, None), or (None, why not) where no 3D format runs this expert weight."""
    if is_transposed(mod):
        return None, f"the {type(mod).__name__} forward computes x @ W[e], which torchao's 3D tensor does not run"
    if scheme.expert_weight_bits is None:
        return None, f"scheme {scheme.name!r} has no 3D torchao format here"
    # weight-only also for 8da schemes: expert inputs stay high precision (qat/moe.py says why)
    return intx_expert_tensor(w, scheme.expert_weight_bits, group_size), None


def quantize_experts(model: nn.Module, scheme: Scheme, group_size: Optional[int]) -> Optional[dict]:
    """Convert and PTQ: every expert weight in real quantized form where the forward runs it, else
    its fake-quantized values (simulated). Returns the record for verify.json, None without experts."""
    mods = experts_modules(decoder_blocks(model))
    if not mods:
        return None
    wfq = scheme.fake_quantizers(group_size)[0]
    real = simulated = 0
    reason = None
    for mod in mods.values():
        unwrap(mod)
        for n in expert_weight_names(mod):
            w = mod._parameters[n].detach()
            q, why = _real_tensor(mod, w, scheme, group_size)
            if q is None:
                reason = reason or why
                q, simulated = Experts3D(wfq, is_transposed(mod))(w)[0], simulated + 1
            else:
                real += 1
            mod._parameters[n] = nn.Parameter(q, requires_grad=False)
    if real:  # select + F.linear: what the quantized tensor runs (grouped_mm transposes, bmm indexes)
        model.set_experts_implementation("eager")
        # config.json: from_pretrained reads `experts_implementation` (the internal field is not saved)
        model.config.experts_implementation = "eager"
    rec = {"tensors": real + simulated, "real_quantized": real, "simulated": simulated,
           "format": "IntxUnpackedToInt8Tensor [1, 1, group], weight-only" if real else None,
           "stored": ("as torchao tensors (int8 qdata + scales), which from_pretrained reloads; config.json sets "
                      "experts_implementation eager" if real else "fake-quantized values in the export dtype")}
    if simulated:
        rec["why_simulated"] = reason
        print(f"convert: {simulated} expert weight tensors are simulated (fake-quantized values): {reason}", flush=True)
    return rec
