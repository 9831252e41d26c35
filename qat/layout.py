"""Where things are in a transformers causal LM: its decoder blocks, MoE experts and routers.

A leaf module: it imports nothing of ours but the error type, so every other module can ask it.
Nothing here changes a model.

- Decoder blocks: the ModuleList whose members are the classes in HF's `_no_split_modules`
  (any architecture), also when wrapped by activation checkpointing, torch.compile or FSDP2.
- MoE experts, recognised by their layout, whatever their names:
  - fused: a module holding 3D parameters, one per projection, every expert's matrix stacked on
    dim 0 (transformers 5: `experts.gate_up_proj [E, 2I, H]`, `experts.down_proj [E, H, I]`;
    gpt-oss stores them transposed). The `@use_experts_implementation` decorator declares the
    layout as `is_transposed`; fused experts without it have no known reduction dimension.
  - a list: a ModuleList of like MLP modules made of nn.Linears (the remote-code DeepSeek-V3
    modeling file). Those are plain Linears and need nothing special.
- Routers, recognised by what they do: a sibling of the experts whose weights all have one row per
  expert ([E, H]: an nn.Linear, a module with a bare weight such as DeepSeek-V3's
  `DeepseekV3TopkRouter`, or one wrapping a Linear, such as HunYuan's `gate.wg`), and a gate with a
  single row ([1, H], Qwen2-MoE's `shared_expert_gate`). A score-correction bias is a bias. They stay
  high precision by rule (qat/moe.py says why).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from qat.errors import UserError


def base_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder blocks, found through HF's `_no_split_modules` (any architecture)."""
    base = base_model(model)
    names = set(getattr(base, "_no_split_modules", None) or [])
    for mod in base.modules():
        if not isinstance(mod, nn.ModuleList):
            continue
        # Any block will do: under a sharded convert, blocks other ranks own are pass-through
        # stand-ins. The MRO: fully_shard swaps a block's class for an FSDP subclass of it.
        if names & {c.__name__ for b in mod for c in type(unwrap_block(b)).__mro__}:
            return mod
    raise UserError(f"cannot find the decoder blocks of {type(base).__name__} (no _no_split_modules list)")


def unwrap_block(block: nn.Module) -> nn.Module:
    """The decoder block inside activation-checkpoint or torch.compile wrappers."""
    while True:
        inner = getattr(block, "_checkpoint_wrapped_module", None) or getattr(block, "_orig_mod", None)
        if inner is None:
            return block
        block = inner


def expert_weight_names(mod: nn.Module) -> list[str]:
    """The fused expert weights a module holds directly (3D parameters), in registration order."""
    return [n for n, p in mod.named_parameters(recurse=False) if p.ndim == 3]


def is_experts(mod: nn.Module) -> bool:
    """Fused experts: a module holding 3D parameters (a convolution's 3D kernel is not one)."""
    return not isinstance(mod, nn.modules.conv._ConvNd) and bool(expert_weight_names(mod))


def experts_modules(blocks: nn.Module) -> dict[str, nn.Module]:
    """The experts modules whose layout is declared (transformers' `is_transposed`); one without
    it is left out here, so coverage names it and training refuses it unless qat.allow_unquantized."""
    return {n: m for n, m in blocks.named_modules() if is_experts(m) and hasattr(m, "is_transposed")}


def is_transposed(mod: nn.Module) -> bool:
    """True when expert slices are [in, out] (x @ W[e]), as transformers' decorator declares."""
    return bool(mod.is_transposed)


def reduction_dim(mod: nn.Module) -> int:
    """The dimension of a 3D expert weight that its groups run along (the input features)."""
    return 1 if is_transposed(mod) else 2


def is_expert_list(mod: nn.Module) -> bool:
    """A ModuleList of two or more modules of one class, each made of nn.Linears (MLP experts)."""
    if not isinstance(mod, nn.ModuleList) or len(mod) < 2 or len({type(m) for m in mod}) != 1:
        return False
    return all(any(isinstance(c, nn.Linear) for c in m.modules()) for m in mod)


def expert_count(mod: nn.Module) -> int:
    """E: the experts a fused module stacks on dim 0, or the members of an expert list."""
    if isinstance(mod, nn.ModuleList):
        return len(mod)
    return mod._parameters[expert_weight_names(mod)[0]].shape[0]


def _weights(mod: nn.Module) -> list[torch.Tensor]:
    """The weight matrices of a module's subtree: 2D+ parameters other than biases and LoRA adapters
    (a LoRA-wrapped router is still the router)."""
    return [p for n, p in mod.named_parameters() if p.ndim >= 2 and not n.endswith("bias") and "lora_" not in n]


def _scores(mod: nn.Module, rows: set[int]) -> bool:
    """True when every weight of `mod` has one row per expert (or a single row: a gate)."""
    ws = _weights(mod)
    return bool(ws) and all(w.ndim == 2 and w.shape[0] in rows for w in ws)


def routers(blocks: nn.Module) -> dict[str, nn.Module]:
    """{name: module} of the routers and gates: each sibling of an experts module whose weights all
    have E rows (it scores the E experts) or one row (a gate, Qwen2-MoE's shared_expert_gate)."""
    out = {}
    for name, parent in blocks.named_modules():
        kids = dict(parent.named_children())
        counts = {expert_count(c) for c in kids.values() if is_experts(c) or is_expert_list(c)}
        if not counts:
            continue
        for leaf, child in kids.items():
            if not is_experts(child) and not is_expert_list(child) and _scores(child, counts | {1}):
                out[f"{name}.{leaf}" if name else leaf] = child
    return out


def router_module_ids(model: nn.Module) -> set[int]:
    """id() of every module inside a router: the modules the router rule keeps in high precision."""
    return {id(m) for r in routers(decoder_blocks(model)).values() for m in r.modules()}
