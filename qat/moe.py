"""QAT for MoE experts stored as fused 3D parameters, and the router rule.

qat/layout.py finds the experts and routers; this module fake-quantizes the experts.

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

Router. The router (qat/layout.py recognises it: the experts' sibling whose weights have one row per
expert, or one row for a gate such as Qwen2-MoE's `shared_expert_gate`) stays high precision:
it is tiny (E x H), its logits pick the experts, so a quantization error changes which weights a
token uses rather than perturbing an output, and torchao's own recipes leave it out. Shared
experts are ordinary Linears and follow the scheme.

Convert (qat/convert/experts.py) stores the experts in torchao's intx format where a 3D format runs,
else their fake-quantized values (simulated, labelled).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from qat.errors import UserError
from qat.layout import experts_modules, expert_weight_names, is_transposed, reduction_dim


# --- fake quantization ----------------------------------------------------------------------------

class Experts3D:
    """A 2D weight fake quantizer applied to every expert's [out, in] matrix of a 3D weight."""

    def __init__(self, fq2d, transposed: bool):
        self.fq2d, self.transposed = fq2d, transposed

    def __call__(self, w: torch.Tensor, mask: bool = True) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        wq, m = self.fq2d(self._rows(w), mask=mask)
        return self._back(wq, w).contiguous(), (self._back(m, w) if m is not None else None)

    def ste(self, grad: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """The clipped straight-through gradient of the 3D weight (fused on CUDA)."""
        return self._back(self.fq2d.ste(self._rows(grad), self._rows(w), out_dtype=w.dtype), w)

    def _rows(self, t: torch.Tensor) -> torch.Tensor:
        """[E * out, in]: every expert's [out, in] matrix, stacked."""
        t_oi = t.transpose(1, 2) if self.transposed else t
        return t_oi.reshape(-1, t_oi.shape[-1])

    def _back(self, rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        e = like.shape[0]
        t = rows.reshape(e, -1, rows.shape[-1])
        return t.transpose(1, 2) if self.transposed else t

    def __repr__(self) -> str:
        return f"Experts3D({self.fq2d}, transposed={self.transposed})"


class _FakeQuantWeight(torch.autograd.Function):
    """wq = fq(w), gradient g * mask (clipped STE); saves only w and recomputes the mask in backward."""

    @staticmethod
    def forward(ctx, w, fn):
        with torch.no_grad():
            wq, _ = fn(w, mask=False)
        ctx.save_for_backward(w)
        ctx.fn = fn
        return wq

    @staticmethod
    def backward(ctx, g):
        if not ctx.needs_input_grad[0]:
            return None, None
        (w,) = ctx.saved_tensors
        with torch.no_grad():
            return ctx.fn.ste(g, w), None


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
                self.cache[name] = fn(w, mask=False)[0]
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
        dim = mod._parameters[n].shape[reduction_dim(mod)]
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
        fqs = {n: Experts3D(weight_fq, is_transposed(mod)) for n in expert_weight_names(mod)}
        mod.__class__ = _qat_class(type(mod))
        mod.expert_fqs, mod.enabled = fqs, True
        out[name] = mod
    return out


def unwrap(mod: nn.Module) -> None:
    """Back to the model's own experts class (the parameters never moved)."""
    if isinstance(mod, QATExperts):
        mod.__class__ = mod._qat_base
        del mod.expert_fqs, mod.enabled
