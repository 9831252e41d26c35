"""A decoder-only HF model as one .gguf file llama.cpp loads with no other input, written with the
`gguf` package's GGUFWriter: architecture metadata, the tokenizer, and the tensors under llama.cpp's
names. The scheme's Linears are stored as GGUF blocks (Q4_0, Q8_0) whose codes our quantizer
computes (qat/gguf_quant.py: the same codes the fake-quantized forward multiplies); 1D tensors
(norms, biases) are f32, as llama.cpp's own converter stores them, and the other 2D tensors
(embeddings, output head) are in the dtype asked for (f16 or f32).

Architectures: qat/convert/gguf_archs.py (llama, qwen2, qwen3, gemma2, gemma3_text, starcoder2,
mixtral, qwen3_moe; MoE experts as llama.cpp's 3D expert tensors, in the scheme's
blocks like every other Linear). Tokenizers: byte-level BPE (llama.cpp's "gpt2" model) whose
pre-tokenizer is GPT-2's, Llama 3's or Qwen 2's. Anything else is one `error:` line.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from qat.convert.gguf_archs import ARCHS, EXPERT_NAMES, add_arch_hparams, check_config, gguf_name
from qat.errors import UserError
from qat.gguf_quant import pack_rows

# The pre-tokenizer regexes llama.cpp knows by name (tokenizer.ggml.pre).
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")


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
    if ARCHS[arch].layer_norm:
        writer.add_layer_norm_eps(cfg.norm_epsilon)
    else:
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
    writer.add_vocab_size(cfg.vocab_size)
    add_arch_hparams(writer, cfg, arch)
    ftype = {"q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
             None: gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32}[fmt]
    writer.add_file_type(ftype)


def llama3_rope_factors(cfg, scaling: dict) -> torch.Tensor:
    """The per-frequency factors of Llama 3's rope scaling (llama.cpp's rope_freqs tensor)."""
    theta, _ = _rope(cfg)
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, low = scaling.get("factor", 8.0), scaling.get("low_freq_factor", 1.0)
    high = scaling.get("high_freq_factor", 4.0)
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
