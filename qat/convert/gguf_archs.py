"""What llama.cpp needs to know per architecture: its architecture name, its tensor names, the
layout changes (Llama's q/k row order, Gemma's norm offset), the metadata beyond the common keys,
and the settings it fixes in code rather than reading from the file.

Supported (HF model_type -> llama.cpp): llama, qwen2, qwen3, gemma2, gemma3_text -> gemma3,
starcoder2, mixtral -> llama (with experts), qwen3_moe -> qwen3moe. Not phi3: llama.cpp's phi3
reads its end-of-turn token by name from the vocabulary, and Phi-3's own tokenizer is
SentencePiece, which the writer does not take. Each is checked against
transformers in llama.cpp itself (tests/integration/test_gguf.py). Where llama.cpp hard-codes a
setting that an HF config may change (Gemma 3's layer pattern and local RoPE base, the top-k
renormalization of Qwen3-MoE's router, ...), a config that differs is refused in one line, rather
than written into a file that llama.cpp would run as another model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from qat.errors import UserError

LAYER_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
# Gemma 2 and 3 normalize four times per block: around attention and around the MLP
GEMMA_LAYER_NAMES = {**LAYER_NAMES, "post_attention_layernorm": "post_attention_norm",
                     "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm"}
# StarCoder2: LayerNorms with biases and a plain GELU MLP
STARCODER2_LAYER_NAMES = {**LAYER_NAMES, "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
# MoE blocks (transformers 5): the router mlp.gate [E, H]; the experts' fused 3D weights, gate rows
# before up rows in gate_up_proj [E, 2I, H], and down_proj [E, H, I]; llama.cpp keeps one 3D
# tensor per projection
MOE_LAYER_NAMES = {**LAYER_NAMES, "mlp.gate": "ffn_gate_inp"}
EXPERT_NAMES = {"mlp.experts.gate_up_proj": ("ffn_gate_exps", "ffn_up_exps"),
                "mlp.experts.down_proj": ("ffn_down_exps",)}
TOP_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


@dataclass(frozen=True)
class Arch:
    gguf: str  # llama.cpp's architecture name
    layers: dict = field(default_factory=lambda: LAYER_NAMES)  # a block's HF module path -> llama.cpp's name
    # llama.cpp's llama applies RoPE to interleaved pairs, HF's Llama to halves: q and k rows are
    # permuted for it (llama.cpp's converter does the same). The others' RoPE is NeoX, as in HF.
    permute_qk: bool = False
    norm_offset: float = 0.0  # Gemma's RMSNorm scales by (1 + w), llama.cpp's by the stored weight
    rope_scaling: tuple = ()  # the HF rope types llama.cpp's architecture reproduces
    moe: bool = False  # fused experts in every block (mlp.experts) with a softmax top-k router (mlp.gate)
    layer_norm: bool = False  # LayerNorm (eps key layer_norm_epsilon) rather than RMSNorm


ARCHS = {"llama": Arch("llama", permute_qk=True, rope_scaling=("llama3",)),
         "qwen2": Arch("qwen2"), "qwen3": Arch("qwen3"),
         "gemma2": Arch("gemma2", GEMMA_LAYER_NAMES, norm_offset=1.0),
         "gemma3_text": Arch("gemma3", GEMMA_LAYER_NAMES, norm_offset=1.0, rope_scaling=("linear",)),
         "starcoder2": Arch("starcoder2", STARCODER2_LAYER_NAMES, layer_norm=True),
         # llama.cpp runs Mixtral as a llama with experts
         "mixtral": Arch("llama", MOE_LAYER_NAMES, permute_qk=True, rope_scaling=("llama3",), moe=True),
         "qwen3_moe": Arch("qwen3moe", MOE_LAYER_NAMES, moe=True)}


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
    why = {"gemma2": gemma_differs, "gemma3_text": gemma_differs}.get(arch, other_differs)(cfg, arch)
    if why:
        raise UserError(f"GGUF export: {why}; llama.cpp would compute another model (convert without --gguf)")
    return arch


def gemma_differs(cfg, arch: str) -> Optional[str]:
    """What llama.cpp's gemma2 / gemma3 hard-code (their llama_load_hparams and graphs) and this
    config changes, or None."""
    n = cfg.num_hidden_layers
    every, name = (2, "gemma2") if arch == "gemma2" else (6, "gemma3")
    pattern = ["full_attention" if (i + 1) % every == 0 else "sliding_attention" for i in range(n)]
    big = {"gemma2": 46, "gemma3": 62}[name]  # the 27B models: llama.cpp knows them by their layer count
    scale = cfg.hidden_size // cfg.num_attention_heads if n == big else cfg.head_dim
    if name == "gemma3" and (cfg.final_logit_softcapping is not None or cfg.attn_logit_softcapping is not None):
        return "llama.cpp's gemma3 applies no logit softcapping"
    if name == "gemma2" and (cfg.final_logit_softcapping is None or cfg.attn_logit_softcapping is None):
        return "llama.cpp's gemma2 always softcaps the attention and final logits; this config leaves one out"
    if list(cfg.layer_types) != pattern:
        nth = "2nd" if every == 2 else "6th"
        return f"llama.cpp's {name} makes every {nth} layer global and the others sliding-window"
    if name == "gemma3":
        local = (getattr(cfg, "rope_parameters", None) or {}).get("sliding_attention", {})
        if local.get("rope_theta", 10000.0) != 10000.0 or local.get("rope_type", "default") != "default":
            return "llama.cpp's gemma3 gives its sliding-window layers plain RoPE with base 10000"
    if cfg.query_pre_attn_scalar != scale:
        return (f"llama.cpp's {name} scales attention by 1/sqrt({scale}), this config by "
                f"1/sqrt({cfg.query_pre_attn_scalar})")
    if getattr(cfg, "use_bidirectional_attention", False):
        return f"llama.cpp's {name} attends causally"
    return None


def other_differs(cfg, arch: str) -> Optional[str]:
    window = getattr(cfg, "sliding_window", None)
    if arch == "qwen3_moe" and not cfg.norm_topk_prob:
        return "llama.cpp's qwen3moe renormalizes the top-k router weights; this config has norm_topk_prob=false"
    if arch == "qwen3_moe" and (cfg.decoder_sparse_step != 1 or cfg.mlp_only_layers):
        return "llama.cpp's qwen3moe has experts in every block; this config has dense blocks"
    if arch in ("mixtral", "starcoder2") and window and window < cfg.max_position_embeddings:
        return f"llama.cpp runs {arch} without a sliding window; this config slides over {window}"
    return None


def add_arch_hparams(writer, cfg, arch: str) -> None:
    """The metadata beyond the keys every architecture has (gguf_writer.add_hparams)."""
    if arch in ("gemma2", "gemma3_text"):
        writer.add_sliding_window(cfg.sliding_window)
    if arch == "gemma2":
        writer.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
        writer.add_final_logit_softcapping(cfg.final_logit_softcapping)
    if ARCHS[arch].moe:
        writer.add_expert_count(getattr(cfg, "num_experts", None) or cfg.num_local_experts)
        writer.add_expert_used_count(cfg.num_experts_per_tok)
        if arch == "qwen3_moe":
            writer.add_expert_feed_forward_length(cfg.moe_intermediate_size)
