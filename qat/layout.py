"""Where things are in a transformers causal LM: its decoder blocks, MoE experts and routers.

A leaf module: it imports nothing of ours but the error type, so every other module can ask it.
Nothing here changes a model.

- Decoder blocks: the ModuleList whose members are the classes in HF's `_no_split_modules`
  (any architecture), also when wrapped by activation checkpointing, torch.compile or FSDP2.
- MoE experts: transformers 5 keeps every expert of a block in one 3D parameter per projection
  (`experts.gate_up_proj [E, 2I, H]`, `experts.down_proj [E, H, I]`; gpt-oss stores them
  transposed, as the `@use_experts_implementation` decorator records in `is_transposed`).
- Routers: the module next to the experts that scores them (`gate`, `router`, Qwen2-MoE's
  `shared_expert_gate`). It stays high precision by rule (qat/moe.py says why).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from qat.errors import UserError

ROUTER_NAMES = ("gate", "router", "shared_expert_gate")


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
    return bool(expert_weight_names(mod))


def is_expert_bias(mod: nn.Module, p: torch.Tensor) -> bool:
    """gpt-oss's [E, out] expert biases: 2D, but biases (high precision, as a Linear's bias)."""
    return p.ndim == 2 and is_experts(mod)


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


def router_module_ids(model: nn.Module) -> set[int]:
    """id() of every module inside a router: the modules the router rule keeps in high precision."""
    return {id(m) for r in routers(decoder_blocks(model)).values() for m in r.modules()}
