"""A decoder-only HF model as one .gguf file llama.cpp loads with no other input, written with the
`gguf` package's GGUFWriter: architecture metadata, the tokenizer, and the tensors under llama.cpp's
names. The scheme's Linears are stored as GGUF blocks (Q4_0, Q8_0) whose codes our quantizer
computes (qat/gguf_quant.py: the same codes the fake-quantized forward multiplies); 1D tensors
(norms, biases) are f32, as llama.cpp's own converter stores them, and the other 2D tensors
(embeddings, output head) are in the dtype asked for (f16 or f32).

Architectures: llama, qwen2, qwen3, gemma3_text (Gemma 3's text model), and the MoE models
mixtral and qwen3_moe (their fused experts as llama.cpp's 3D expert tensors, in the scheme's
blocks like every other Linear), each checked against llama.cpp (docs/gguf.md). Gemma 3 has settings llama.cpp fixes in code rather than reading them
from the file (every 6th layer global, local RoPE base 10000, no softcapping, 1/sqrt(head_dim)
attention scale); a config that differs is refused rather than written into a file that llama.cpp
would run differently. Tokenizers: byte-level BPE (llama.cpp's "gpt2" model) whose pre-tokenizer
is GPT-2's, Llama 3's or Qwen 2's. Anything else is one `error:` line.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from qat.errors import UserError
from qat.gguf_quant import pack_rows

LAYER_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
# Gemma 3 normalizes four times per block: around attention and around the MLP
GEMMA3_LAYER_NAMES = {**LAYER_NAMES, "post_attention_layernorm": "post_attention_norm",
                      "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm"}


@dataclass(frozen=True)
class Arch:
    gguf: str  # llama.cpp's architecture name
    layers: dict  # a block's HF module path -> llama.cpp's tensor name
    # llama.cpp's llama applies RoPE to interleaved pairs, HF's Llama to halves: q and k rows are
    # permuted for it (llama.cpp's converter does the same). Qwen's and Gemma's rope is NeoX, as in HF.
    permute_qk: bool = False
    norm_offset: float = 0.0  # Gemma's RMSNorm scales by (1 + w), llama.cpp's by the stored weight
    rope_scaling: tuple = ()  # the HF rope types llama.cpp's architecture reproduces
    moe: bool = False  # fused experts in every block (mlp.experts) with a softmax top-k router (mlp.gate)


# MoE blocks (transformers 5): the router mlp.gate [E, H]; the experts' fused 3D weights, gate rows
# before up rows in gate_up_proj [E, 2I, H], and down_proj [E, H, I]; llama.cpp keeps one 3D
# tensor per projection
MOE_LAYER_NAMES = {**LAYER_NAMES, "mlp.gate": "ffn_gate_inp"}
EXPERT_NAMES = {"mlp.experts.gate_up_proj": ("ffn_gate_exps", "ffn_up_exps"), "mlp.experts.down_proj": ("ffn_down_exps",)}

ARCHS = {"llama": Arch("llama", LAYER_NAMES, permute_qk=True, rope_scaling=("llama3",)),
         "qwen2": Arch("qwen2", LAYER_NAMES), "qwen3": Arch("qwen3", LAYER_NAMES),
         "gemma3_text": Arch("gemma3", GEMMA3_LAYER_NAMES, norm_offset=1.0, rope_scaling=("linear",)),
         # llama.cpp runs Mixtral as a llama with experts
         "mixtral": Arch("llama", MOE_LAYER_NAMES, permute_qk=True, rope_scaling=("llama3",), moe=True),
         "qwen3_moe": Arch("qwen3moe", MOE_LAYER_NAMES, moe=True)}
TOP_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
# The pre-tokenizer regexes llama.cpp knows by name (tokenizer.ggml.pre).
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")


def gguf_name(hf_name: str, arch: str = "llama") -> Optional[str]:
    """llama.cpp's name of an HF parameter ("model.layers.3.mlp.up_proj.weight" -> "blk.3.ffn_up.weight")."""
    module, _, kind = hf_name.rpartition(".")
    if module in TOP_NAMES:
        return f"{TOP_NAMES[module]}.{kind}"
    parts, names = module.split("."), ARCHS[arch].layers
    if parts[:2] == ["model", "layers"] and ".".join(parts[3:]) in names:
        return f"blk.{parts[2]}.{names['.'.join(parts[3:])]}.{kind}"
    return None


def check_config(cfg) -> str:
    """The HF config's architecture, if llama.cpp runs it as HF does; else UserError."""
    arch = getattr(cfg, "model_type", None)
    if arch not in ARCHS:
        raise UserError(f"GGUF export supports the architectures {', '.join(ARCHS)}; this model is {arch!r} "
                        f"(convert without --gguf, or use llama.cpp's convert_hf_to_gguf.py on hf/)")
    if arch == "gemma3_text":
        check_gemma3(cfg)
    why = None
    if arch == "qwen3_moe" and not cfg.norm_topk_prob:
        why = "llama.cpp's qwen3moe renormalizes the top-k router weights; this config has norm_topk_prob=false"
    elif arch == "qwen3_moe" and (cfg.decoder_sparse_step != 1 or cfg.mlp_only_layers):
        why = "llama.cpp's qwen3moe has experts in every block; this config has dense blocks"
    elif arch == "mixtral" and getattr(cfg, "sliding_window", None):
        why = f"llama.cpp runs Mixtral without a sliding window; this config slides over {cfg.sliding_window}"
    if why:
        raise UserError(f"GGUF export: {why} (convert without --gguf)")
    return arch


def check_gemma3(cfg) -> None:
    """llama.cpp's gemma3 hard-codes what HF's Gemma 3 config leaves open (llama.cpp's
    llama_load_hparams for LLM_ARCH_GEMMA3 and its graph): refuse a config it would run differently."""
    n = cfg.num_hidden_layers
    pattern = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n)]
    local = (getattr(cfg, "rope_parameters", None) or {}).get("sliding_attention", {})
    scale = cfg.hidden_size // cfg.num_attention_heads if n == 62 else cfg.head_dim  # llama.cpp: 62 layers = 27B
    why = None
    if cfg.final_logit_softcapping is not None or cfg.attn_logit_softcapping is not None:
        why = "llama.cpp's gemma3 applies no logit softcapping"
    elif list(cfg.layer_types) != pattern:
        why = "llama.cpp's gemma3 makes every 6th layer global and the others sliding-window"
    elif local.get("rope_theta", 10000.0) != 10000.0 or local.get("rope_type", "default") != "default":
        why = "llama.cpp's gemma3 gives its sliding-window layers plain RoPE with base 10000"
    elif cfg.query_pre_attn_scalar != scale:
        why = (f"llama.cpp's gemma3 scales attention by 1/sqrt({scale}), this config by "
               f"1/sqrt({cfg.query_pre_attn_scalar})")
    elif getattr(cfg, "use_bidirectional_attention", False):
        why = "llama.cpp's gemma3 attends causally"
    if why:
        raise UserError(f"GGUF export: {why}; this Gemma 3 config differs, so llama.cpp would compute another "
                        "model (convert without --gguf)")


def check_source(model_cfg) -> None:
    """Before any weight is read: the run's model architecture and tokenizer can be written."""
    from transformers import AutoConfig

    from qat.model import load_tokenizer

    hf = AutoConfig.from_pretrained(model_cfg.path, revision=model_cfg.revision,
                                    trust_remote_code=model_cfg.trust_remote_code)
    check_config(hf)
    pre_tokenizer_name(load_tokenizer(model_cfg.path, model_cfg.revision, model_cfg.trust_remote_code))


def check_architecture(model: nn.Module) -> str:
    arch = check_config(model.config)
    if not ARCHS[arch].moe and any(p.dim() == 3 for p in model.parameters()):
        raise UserError(f"GGUF export of MoE experts is supported for {', '.join(a for a in ARCHS if ARCHS[a].moe)}, "
                        f"not for this {arch} model; convert without --gguf")
    return arch


def permute_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """HF's rotate-half q/k rows to llama.cpp's interleaved order (rows only: blocks run along columns)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model: nn.Module, tokenizer, path: Path, fmt: Optional[str], quantized: set[str], dtype: str,
               name: str) -> dict:
    """Write `model` to `path`. `quantized`: the Linear names stored in GGUF `fmt` (None: none).
    Returns {tensor name: storage type} for the report."""
    import gguf

    arch = check_architecture(model)
    writer = gguf.GGUFWriter(str(path), ARCHS[arch].gguf)
    add_hparams(writer, model.config, arch, name, fmt, dtype)
    add_tokenizer(writer, tokenizer, model.config.vocab_size)
    types = add_tensors(writer, model, arch, fmt, quantized, dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return types


def _rope(cfg) -> tuple[float, Optional[dict]]:
    """(rope theta, the rope scaling dict or None) of the global-attention layers: transformers 5
    keeps both in rope_parameters, per layer type where the types differ (Gemma 3)."""
    params = dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})
    params = dict(params.get("full_attention", params))
    theta = params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    return float(theta), (params if kind not in (None, "default") else None)


def add_hparams(writer, cfg, arch: str, name: str, fmt: Optional[str], dtype: str) -> None:
    import gguf

    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    writer.add_name(name)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    theta, scaling = _rope(cfg)
    writer.add_rope_freq_base(theta)
    kind = None if scaling is None else scaling.get("rope_type", scaling.get("type"))
    if kind is not None and kind not in ARCHS[arch].rope_scaling:
        raise UserError(f"GGUF export: rope scaling {kind!r} of {arch} is not supported "
                        f"({', '.join(ARCHS[arch].rope_scaling) or 'none'} is)")
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    if arch == "gemma3_text":
        writer.add_sliding_window(cfg.sliding_window)
    writer.add_vocab_size(cfg.vocab_size)
    if ARCHS[arch].moe:
        writer.add_expert_count(getattr(cfg, "num_experts", None) or cfg.num_local_experts)
        writer.add_expert_used_count(cfg.num_experts_per_tok)
        if arch == "qwen3_moe":
            writer.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    ftype = {"q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
             None: gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32}[fmt]
    writer.add_file_type(ftype)


def llama3_rope_factors(cfg, scaling: dict) -> torch.Tensor:
    """The per-frequency factors of Llama 3's rope scaling (llama.cpp's rope_freqs tensor)."""
    theta, _ = _rope(cfg)
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, low, high = scaling.get("factor", 8.0), scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old = scaling.get("original_max_position_embeddings", 8192)
    out = []
    for f in freqs.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


def pre_tokenizer_name(tokenizer) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenization, or UserError."""
    import json

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model, pre = spec.get("model", {}), spec.get("pre_tokenizer") or {}
    if model.get("type") != "BPE":
        raise UserError(f"GGUF export supports byte-level BPE tokenizers; this one is {model.get('type')!r}")
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    pieces = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    regexes = [p.get("pattern", {}).get("Regex") for p in pieces if p.get("type") == "Split"]
    known = {LLAMA3_REGEX: "llama-bpe", QWEN2_REGEX: "qwen2"}
    if len(regexes) == 1 and regexes[0] in known and pieces[-1].get("type") == "ByteLevel":
        return known[regexes[0]]
    raise UserError("GGUF export: this tokenizer's pre-tokenizer is not one llama.cpp knows by name (GPT-2, "
                    "Llama 3 or Qwen 2 byte-level BPE); use llama.cpp's convert_hf_to_gguf.py on hf/")


def add_tokenizer(writer, tokenizer, vocab_size: int) -> None:
    import gguf

    pre = pre_tokenizer_name(tokenizer)
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    with tempfile.TemporaryDirectory() as d:  # SpecialVocab reads merges, special ids, BOS rule, template
        tokenizer.save_pretrained(d)
        gguf.SpecialVocab(d, load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer)


def add_tensors(writer, model: nn.Module, arch: str, fmt: Optional[str], quantized: set[str], dtype: str) -> dict:
    import gguf

    cfg = model.config
    heads = {"q_proj": cfg.num_attention_heads, "k_proj": cfg.num_key_value_heads}
    qtype = {"q4_0": gguf.GGMLQuantizationType.Q4_0, "q8_0": gguf.GGMLQuantizationType.Q8_0}.get(fmt)
    types = {}
    _, scaling = _rope(cfg)
    if scaling is not None and scaling.get("rope_type") == "llama3":
        writer.add_tensor("rope_freqs.weight", llama3_rope_factors(cfg, scaling).numpy())
        types["rope_freqs.weight"] = "f32"
    tied = getattr(cfg, "tie_word_embeddings", False)
    for hf_name, p in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":  # llama.cpp uses token_embd when output is absent
            continue
        if p.dim() == 3:  # fused experts; `quantized` names their module when the scheme covers them
            expert_fmt = fmt if hf_name.rpartition(".")[0] in quantized else None
            types.update(add_experts(writer, hf_name, p.detach().float().cpu(), expert_fmt, qtype, dtype))
            continue
        name = gguf_name(hf_name, arch)
        if name is None:
            if hf_name.endswith("rotary_emb.inv_freq"):
                continue
            raise UserError(f"GGUF export: no llama.cpp name for tensor {hf_name} of this {arch} model")
        w = p.detach().float().cpu()
        proj = hf_name.split(".")[-2]
        if ARCHS[arch].permute_qk and proj in heads:
            w = permute_rows(w, heads[proj])
        if proj.endswith("norm") and ARCHS[arch].norm_offset:
            w = w + ARCHS[arch].norm_offset
        module = hf_name.rpartition(".")[0]
        if module in quantized and hf_name.endswith(".weight"):
            writer.add_tensor(name, pack_rows(fmt, w), raw_dtype=qtype)
            types[name] = fmt
        elif w.dim() == 1 or dtype == "f32":
            writer.add_tensor(name, w.numpy())
            types[name] = "f32"
        else:
            writer.add_tensor(name, w.half().numpy())
            types[name] = "f16"
    return types


def add_experts(writer, hf_name: str, w: torch.Tensor, fmt: Optional[str], qtype, dtype: str) -> dict:
    """One fused expert weight [E, out, in] as llama.cpp's 3D tensor(s): gate_up_proj split into
    ffn_gate_exps and ffn_up_exps (rows, so each expert's blocks along `in` keep their codes)."""
    parts = hf_name.split(".")
    rel = ".".join(parts[3:])
    if parts[:2] != ["model", "layers"] or rel not in EXPERT_NAMES:
        raise UserError(f"GGUF export: no llama.cpp name for expert tensor {hf_name}")
    names = EXPERT_NAMES[rel]
    types = {}
    for short, part in zip(names, w.chunk(len(names), dim=1)):
        name = f"blk.{parts[2]}.{short}.weight"
        if fmt is not None:
            writer.add_tensor(name, np.stack([pack_rows(fmt, e) for e in part]), raw_dtype=qtype)
        else:
            writer.add_tensor(name, part.numpy() if dtype == "f32" else part.half().numpy())
        types[name] = fmt or dtype
    return types
