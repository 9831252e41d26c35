"""Which weights of the decoder blocks QAT fake-quantizes, and which it cannot.

QAT swaps `nn.Linear` modules. Every architecture keeps most of its decoder weights in Linears,
but not all: MoE models (Qwen3-MoE, Mixtral, gpt-oss in transformers 5) store their experts as
fused 3D parameters such as `mlp.experts.gate_up_proj [E, 2I, H]`, and GPT-2-style models use
`Conv1D`. On a tiny Qwen3-MoE only 20% of the decoder's weight parameters are in Linears, and a
run that fake-quantizes just those trains and exports mostly high-precision experts while its
name says "QAT". qat/moe.py fake-quantizes such experts; training names whatever is still left
out and refuses unless `qat.allow_unquantized` is set; the share that is covered is logged and
recorded in the checkpoint and verify.json. The MoE router stays high precision by rule (qat/moe.py
says why): it counts in the denominator and is reported apart, and it never triggers the refusal.

A "decoder weight" is a parameter with two or more dimensions inside the decoder blocks, excluding
biases (norms and most biases are vectors; a parameter named `*bias` is a bias whatever its shape:
gpt-oss's [E, out] expert biases, ERNIE-MoE's [1, E] score-correction bias) and LoRA adapters,
which stay high precision by design.
"""

from __future__ import annotations

import math
import re

import torch.nn as nn

from qat.errors import UserError
from qat.fake_quant import QATLinear
from qat.layout import decoder_blocks, is_experts, router_module_ids
from qat.moe import QATExperts


def decoder_weights(model: nn.Module) -> dict[str, tuple[nn.Module, nn.Parameter]]:
    """{name relative to the blocks list: (owning module, parameter)} of every decoder weight."""
    out = {}
    for mod_name, mod in decoder_blocks(model).named_modules():
        if re.search(r"(^|\.)lora_[AB](\.|$)", mod_name):
            continue
        for pname, p in mod.named_parameters(recurse=False):
            if p.ndim >= 2 and not pname.endswith("bias"):
                out[f"{mod_name}.{pname}"] = (mod, p)
    return out


def pattern(name: str) -> str:
    """`3.mlp.experts.down_proj` -> `*.mlp.experts.down_proj`: one entry for all blocks."""
    return re.sub(r"^\d+\.", "*.", name)


def uncovered(model: nn.Module, targets: dict[str, nn.Module]) -> dict[str, list[int]]:
    """{pattern: shape} of the decoder weights that no fake-quantization target owns (routers aside)."""
    return {pattern(n): list(p.shape) for n, (mod, p) in _left(model, targets).items()}


def _left(model: nn.Module, targets: dict[str, nn.Module]) -> dict[str, tuple[nn.Module, nn.Parameter]]:
    ids = {id(m) for m in targets.values()} | router_module_ids(model)
    return {n: (mod, p) for n, (mod, p) in decoder_weights(model).items() if id(mod) not in ids}


def uncovered_modules(model: nn.Module, targets: dict[str, nn.Module]) -> list[str]:
    """One entry per uncovered module pattern, naming its class and weights, e.g.
    `*.attn.c_attn (Conv1D: weight [64, 192])`; fused experts without a declared layout say so."""
    by_module: dict[str, tuple[nn.Module, dict[str, list[int]]]] = {}
    for name, (mod, p) in _left(model, targets).items():
        owner, _, leaf = pattern(name).rpartition(".")
        by_module.setdefault(owner, (mod, {}))[1][leaf] = list(p.shape)  # once for all blocks
    out = []
    for owner, (mod, weights) in by_module.items():
        what = type(mod).__name__
        if is_experts(mod):
            what += " fused experts without a declared layout"
        out.append(f"{owner} ({what}: {', '.join(f'{k} {v}' for k, v in weights.items())})")
    return out


def refuse_uncovered(model: nn.Module, targets: dict[str, nn.Module], allow: bool) -> None:
    left = uncovered_modules(model, targets)
    if left and not allow:
        ids = {id(m) for m in targets.values()}
        share = coverage(model, lambda m: id(m) in ids)["share"]
        raise UserError(f"QAT would fake-quantize only {percent(share)} of the decoder's weight parameters: no "
                        f"scheme covers {'; '.join(left)}. Set qat.allow_unquantized=true to train with them "
                        f"in high precision")


def percent(share: float) -> str:
    """A share to 0.1%, rounded down so it never overstates: 99.97% covered reads "99.9%", not
    "100.0%", and anything above zero but under 0.1% reads "<0.1%"."""
    tenths = math.floor(share * 1000 + 1e-9)
    return "<0.1%" if share > 0 and tenths == 0 else f"{tenths / 10:.1f}%"


def is_fake_quantized(mod: nn.Module) -> bool:
    from torchao.quantization.qat.linear import FakeQuantizedLinear

    return isinstance(mod, (QATLinear, FakeQuantizedLinear, QATExperts))


def coverage(model: nn.Module, covered=is_fake_quantized) -> dict:
    """The share of the decoder's weight parameters that `covered(module)` says are fake-quantized.

    Parameter counts are global: under FSDP2 a DTensor's numel is that of the whole tensor.
    """
    total = done = n_done = 0
    left, rule, experts = {}, {}, 0
    weights = decoder_weights(model)
    rids = router_module_ids(model)
    for name, (mod, p) in weights.items():
        total += p.numel()
        if covered(mod):
            done, n_done = done + p.numel(), n_done + 1
            experts += isinstance(mod, QATExperts)
        elif id(mod) in rids:
            rule[pattern(name)] = list(p.shape)
        else:
            left[pattern(name)] = list(p.shape)
    out = {"share": done / total if total else 0.0, "weight_tensors": len(weights),
           "fake_quantized_tensors": n_done, "parameters": total, "fake_quantized_parameters": done,
           "unquantized": left}
    if rule or experts:
        out["router_high_precision"] = rule  # the router rule (qat/moe.py)
        out["expert_tensors"] = experts
        out["experts_activations"] = "high precision (expert weights only)"
    return out


def describe(cov: dict) -> str:
    text = (f"QAT fake-quantizes {cov['fake_quantized_tensors']} of {cov['weight_tensors']} weight tensors of "
            f"the decoder blocks, {percent(cov['share'])} of their parameters")
    if cov.get("expert_tensors"):
        text += f"; {cov['expert_tensors']} of them MoE expert weights (weight-only)"
    if cov.get("router_high_precision"):
        text += f"; the router stays high precision by rule: {', '.join(cov['router_high_precision'])}"
    if cov["unquantized"]:
        text += f"; left in high precision (qat.allow_unquantized): {', '.join(cov['unquantized'])}"
    return text


def header_line(verify_json) -> "str | None":
    """The coverage entry of a report header, from a QAT export's verify.json (None if it has none)."""
    import json
    from pathlib import Path

    path = Path(verify_json)
    cov = json.loads(path.read_text()).get("qat_coverage") if path.exists() else None
    if not cov:
        return None
    text = (f"{percent(cov['share'])} of the decoder blocks' weight parameters quantized "
            f"({cov['fake_quantized_tensors']} of {cov['weight_tensors']} tensors)")
    if cov.get("expert_tensors"):
        text += "; MoE experts weight-only"
    if cov.get("router_high_precision"):
        text += "; router high precision"
    return text  # what qat.allow_unquantized left out: the report's "high precision" line, per arm
