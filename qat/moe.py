"""QAT for MoE experts stored as fused 3D parameters, and the router rule.

Transformers 5 keeps every expert of a block in one 3D parameter per projection instead of
nn.Linears: Qwen3-MoE and Mixtral `experts.gate_up_proj [E, 2I, H]`, `experts.down_proj [E, H, I]`
(each expert's slice is a Linear weight [out, in]); gpt-oss stores them transposed,
`gate_up_proj [E, H, 2I]`, `down_proj [E, I, H]` (the forward computes x @ W[e]), plus biases
[E, out]. The `@use_experts_implementation` decorator records the layout as `is_transposed`.

Fake quantization. `QATExperts` is mixed into the experts module's class (as fully_shard does
for a block), so parameters, state-dict keys, FSDP2's dim-0 sharding and checkpoints do not
change. Its forward substitutes the fake-quantized weights for the parameters and then runs the
model's own expert forward, whatever it does inside (a loop over experts, grouped_mm, bmm).
Each scheme's weight fake quantizer runs on every expert's [out, in] matrix, with groups or
channels along the reduction dimension (dim 2, or dim 1 when transposed), through a
straight-through autograd Function that saves only the parameter and recomputes the mask in
backward: the gradient is the clipped STE of our Linears.

Memory. The expert forward saves the fake-quantized weight (or views of it) for its backward,
which would keep one unsharded copy of every block's experts alive from forward to backward
(under FSDP2 that undoes resharding). A saved-tensor hook stores such tensors as a recipe instead
and recomputes the fake-quantized weight once per block in backward. Inside activation
checkpointing (an outer saved-tensor hook) the block is recomputed anyway, so the hook steps aside.

Activations. The experts' inputs are weight-only for every scheme: the down projection's input is
computed inside the expert forward, where no wrapper can reach it, and an 8da scheme's per-token
quantization of the up projection's input alone would not be a format any MoE kernel runs. The
coverage record says so.

Router. The router (`gate`, `router`, and Qwen2-MoE's `shared_expert_gate`) stays high precision:
it is tiny (E x H), its logits pick the experts, so a quantization error changes which weights a
token uses rather than perturbing an output, and torchao's own recipes leave it out. Shared
experts are ordinary Linears and follow the scheme.

Convert. The intx schemes quantize each 3D weight into torchao's `IntxUnpackedToInt8Tensor`
(block [1, 1, group]), and the transformers eager expert forward runs it: it selects one expert
(`aten.select`, registered below) and calls F.linear, which the tensor implements. The converted
forward equals the fake-quantized one exactly. The `quantized/` folder stores these tensors as
they are (int8 qdata + scales, flattened by transformers' torchao quantizer, whose loader rebuilds
them) with `experts_implementation: "eager"` in config.json, since the default grouped_mm forward
transposes the weight, which the tensor does not implement. A process that runs the reloaded
model needs `register_expert_ops()` (our evaluate does it). Transposed layouts (gpt-oss computes
x @ W[e], a matmul the tensor does not implement) and the other schemes have no 3D format that
runs: convert says so and their experts are simulated (the fake-quantized values), labelled in
verify.json.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from qat.errors import UserError

ROUTER_NAMES = ("gate", "router", "shared_expert_gate")


# --- finding experts and routers ----------------------------------------------------------------

def expert_weight_names(mod: nn.Module) -> list[str]:
    """The fused expert weights a module holds directly (3D parameters), in registration order."""
    return [n for n, p in mod.named_parameters(recurse=False) if p.ndim == 3]


def is_experts(mod: nn.Module) -> bool:
    return bool(expert_weight_names(mod))


def is_expert_bias(mod: nn.Module, p: torch.Tensor) -> bool:
    """gpt-oss's [E, out] expert biases: 2D, but biases (high precision, as a Linear's bias)."""
    return p.ndim == 2 and is_experts(mod)


def experts_modules(blocks: nn.Module) -> dict[str, nn.Module]:
    """The experts modules whose layout is declared (transformers' `is_transposed`); one without
    it is left out here, so coverage names it and training refuses it unless qat.allow_unquantized."""
    return {n: m for n, m in blocks.named_modules() if is_experts(m) and hasattr(m, "is_transposed")}


def routers(blocks: nn.Module) -> dict[str, nn.Module]:
    """{name: module} of the routers: a `gate`/`router` child of a module that also has experts."""
    out = {}
    for name, parent in blocks.named_modules():
        if not any(is_experts(c) for c in parent.children()):
            continue
        for leaf in ROUTER_NAMES:
            child = getattr(parent, leaf, None)
            if isinstance(child, nn.Module) and not is_experts(child):
                out[f"{name}.{leaf}" if name else leaf] = child
    return out


def is_transposed(mod: nn.Module, name: str) -> bool:
    """True when expert slices are [in, out] (x @ W[e]), as transformers' decorator declares."""
    return bool(mod.is_transposed)


def reduction_dim(mod: nn.Module, name: str) -> int:
    return 1 if is_transposed(mod, name) else 2


# --- fake quantization ----------------------------------------------------------------------------

class Experts3D:
    """A 2D weight fake quantizer applied to every expert's [out, in] matrix of a 3D weight."""

    def __init__(self, fq2d, transposed: bool):
        self.fq2d, self.transposed = fq2d, transposed

    def __call__(self, w: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        w_oi = w.transpose(1, 2) if self.transposed else w  # [E, out, in]
        e, o, i = w_oi.shape
        wq, mask = self.fq2d(w_oi.reshape(e * o, i))
        wq = wq.reshape(e, o, i)
        mask = mask.reshape(e, o, i) if mask is not None else None
        if self.transposed:
            wq = wq.transpose(1, 2)
            mask = mask.transpose(1, 2) if mask is not None else None
        return wq.contiguous(), mask

    def __repr__(self) -> str:
        return f"Experts3D({self.fq2d}, transposed={self.transposed})"


class _FakeQuantWeight(torch.autograd.Function):
    """wq = fq(w), gradient g * mask (clipped STE); saves only w and recomputes the mask."""

    @staticmethod
    def forward(ctx, w, fn):
        with torch.no_grad():
            wq, _ = fn(w)
        ctx.save_for_backward(w)
        ctx.fn = fn
        return wq

    @staticmethod
    def backward(ctx, g):
        if not ctx.needs_input_grad[0]:
            return None, None
        (w,) = ctx.saved_tensors
        with torch.no_grad():
            _, mask = ctx.fn(w)
        return (g * mask if mask is not None else g).to(w.dtype), None


class _Recompute:
    """Saved-tensor hooks that store views of the fake-quantized weights as (weight, view geometry)
    and recompute them in backward, once per weight (the cache dies with the block's graph)."""

    def __init__(self, sources: dict[str, tuple[torch.Tensor, torch.Tensor, object]]):
        # name -> (parameter, fake-quantized weight, fake quantizer)
        self.by_storage = {wq.untyped_storage().data_ptr(): (name, w, fn) for name, (w, wq, fn) in sources.items()}
        self.cache: dict[str, torch.Tensor] = {}

    def pack(self, t: torch.Tensor):
        if t.layout != torch.strided or t.device.type == "meta":
            return t
        hit = self.by_storage.get(t.untyped_storage().data_ptr())
        if hit is None:
            return t
        return (self, hit, t.size(), t.stride(), t.storage_offset())

    @staticmethod
    def unpack(packed):
        if not isinstance(packed, tuple):
            return packed
        self, (name, w, fn), size, stride, offset = packed
        if name not in self.cache:
            with torch.no_grad():
                self.cache[name] = fn(w)[0]
        return self.cache[name].as_strided(size, stride, offset)


class QATExperts(nn.Module):
    """Mixed into an experts module's class: its forward sees fake-quantized expert weights."""

    _qat_base: type
    expert_fqs: dict
    enabled: bool

    def forward(self, *args, **kwargs):
        if not self.enabled:
            return self._qat_base.forward(self, *args, **kwargs)
        params = {n: self._parameters[n] for n in self.expert_fqs}
        subs = {n: _FakeQuantWeight.apply(p, self.expert_fqs[n]) for n, p in params.items()}
        outer_hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
        try:
            for n, wq in subs.items():
                self._parameters[n] = wq  # a plain tensor, read by the model's own forward
            if outer_hooks is not None or not torch.is_grad_enabled():
                return self._qat_base.forward(self, *args, **kwargs)
            rec = _Recompute({n: (params[n], subs[n], self.expert_fqs[n]) for n in subs})
            with torch.autograd.graph.saved_tensors_hooks(rec.pack, _Recompute.unpack):
                return self._qat_base.forward(self, *args, **kwargs)
        finally:
            for n, p in params.items():
                self._parameters[n] = p

    def extra_repr(self) -> str:
        return ", ".join(f"{n}={fq}" for n, fq in self.expert_fqs.items())


_MIXED: dict[type, type] = {}


def _qat_class(base: type) -> type:
    if base not in _MIXED:
        _MIXED[base] = type(f"QAT{base.__name__}", (QATExperts, base), {"_qat_base": base})
    return _MIXED[base]


def check_expert_groups(name: str, mod: nn.Module, group_size: Optional[int], block: Optional[int] = None) -> None:
    for n in expert_weight_names(mod):
        dim = mod._parameters[n].shape[reduction_dim(mod, n)]
        need = block or group_size
        if need and dim % need:
            what = f"qat.group_size={group_size}" if block is None else f"the scheme's block of {block}"
            raise UserError(f"{what} does not divide the reduction dimension {dim} of expert weight "
                            f"{name}.{n}; pick a divisor of {dim}")


def wrap_experts(blocks: nn.Module, weight_fq) -> dict[str, nn.Module]:
    """Give every experts module of `blocks` fake-quantized weights; returns them by name."""
    out = {}
    for name, mod in experts_modules(blocks).items():
        if isinstance(mod, QATExperts):
            continue
        fqs = {n: Experts3D(weight_fq, is_transposed(mod, n)) for n in expert_weight_names(mod)}
        mod.__class__ = _qat_class(type(mod))
        mod.expert_fqs, mod.enabled = fqs, True
        out[name] = mod
    return out


def unwrap(mod: nn.Module) -> None:
    """Back to the model's own experts class (the parameters never moved)."""
    if isinstance(mod, QATExperts):
        mod.__class__ = mod._qat_base
        del mod.expert_fqs, mod.enabled


# --- convert and PTQ -----------------------------------------------------------------------------

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


def quantize_experts(model: nn.Module, scheme, group_size: Optional[int]) -> Optional[dict]:
    """Convert and PTQ: every expert weight in real quantized form where the forward runs it, else
    its fake-quantized values (simulated). Returns the record for verify.json, None without experts."""
    from qat.model import decoder_blocks

    mods = experts_modules(decoder_blocks(model))
    if not mods:
        return None
    wfq = scheme.fake_quantizers(group_size)[0]
    real = simulated = 0
    reason = None
    for name, mod in mods.items():
        unwrap(mod)
        for n in expert_weight_names(mod):
            w = mod._parameters[n].detach()
            q = None if is_transposed(mod, n) else scheme.expert_tensor(w, group_size)
            if q is None:
                reason = reason or (f"the {type(mod).__name__} forward computes x @ W[e], which torchao's 3D tensor "
                                    f"does not run" if is_transposed(mod, n) else
                                    f"scheme {scheme.name!r} has no 3D torchao format here")
                q, simulated = Experts3D(wfq, is_transposed(mod, n))(w)[0], simulated + 1
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

