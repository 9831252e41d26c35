"""Model build chain, applied in a fixed order by the training recipe:

    load_model -> apply_lora -> apply_qat -> apply_activation_checkpointing -> apply_compile
               -> apply_fsdp -> (optimizer over trainable params)

Each function takes only the sub-config it needs. The order matters:
- LoRA before QAT, so QAT wraps only the frozen `base_layer` Linears and the adapters stay in
  high precision; convert then merges before it quantizes (torchao cannot add to a quantized weight).
- Activation checkpointing and compile wrap a decoder block *before* fully_shard, so FSDP's
  all-gather hooks sit outside the recomputed / compiled region (as torchtitan does).
- fully_shard on each block first, then the root: the root group holds the embeddings, final
  norm and lm_head, so tied input/output embeddings stay one parameter in one group.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from qat import moe
from qat.config import FakeQuantConfig, FSDPConfig, LoRAConfig, ModelConfig
from qat.coverage import coverage, refuse_uncovered
from qat.errors import UserError, boundary, is_rank0
from qat.fake_quant import QATLinear, use_merged_lora
from qat.layout import base_model, decoder_blocks, experts_modules, router_module_ids
from qat.learned_scales import check_learnable
from qat.schemes import Scheme, embedding_quant

# Config dtype names (training.dtype, convert --dtype) to torch dtypes.
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def load_model(cfg: ModelConfig, seq_len: Optional[int] = None, on_meta: bool = False,
               device: Optional[torch.device] = None) -> nn.Module:
    """An HF causal LM in fp32 master weights, from a local folder or the HF cache.

    on_meta: only the skeleton, without memory (see fill_from_rank0). device: where a
    `model.init=random` model is built and initialized (a 1B model's fp32 init takes seconds on the
    host and none on a GPU); loaded weights are always read on the host."""
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoModelForCausalLM

    if cfg.path.startswith(("/", ".", "~")) and not Path(cfg.path).expanduser().exists():
        raise UserError(f"model.path={cfg.path!r}: no such folder")
    try:
        hf_config = AutoConfig.from_pretrained(cfg.path, revision=cfg.revision,
                                               trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"model.path={cfg.path!r} is not a loadable HF model: {str(e).splitlines()[0]}") from None
    max_pos = getattr(hf_config, "max_position_embeddings", None)
    if seq_len is not None and max_pos is not None and seq_len > max_pos:
        raise UserError(f"data.seq_len={seq_len} exceeds the model's max_position_embeddings={max_pos}")
    kw = dict(dtype=torch.float32, attn_implementation=cfg.attn_implementation,
              trust_remote_code=cfg.trust_remote_code)
    try:
        if on_meta:
            with torch.device("meta"):
                return AutoModelForCausalLM.from_config(hf_config, **kw)
        if cfg.init == "random":
            with torch.device(device or "cpu"):
                return AutoModelForCausalLM.from_config(hf_config, **kw)
        return AutoModelForCausalLM.from_pretrained(cfg.path, revision=cfg.revision, **kw)
    except (SafetensorError, OSError) as e:  # a truncated or corrupt weights file, missing shards
        raise UserError(f"model.path={cfg.path!r}: its weights do not load ({str(e).splitlines()[0][:200]}); "
                        f"copy or download the model again") from None
    except (ValueError, ImportError) as e:
        if cfg.attn_implementation is None or "attn" not in str(e).lower() and "attention" not in str(e).lower():
            raise
        raise UserError(f"model.attn_implementation={cfg.attn_implementation!r} does not work here: "
                        f"{str(e).splitlines()[0][:300]} (null lets transformers pick)") from None


def load_tokenizer(path: str, revision: Optional[str] = None, trust_remote_code: bool = False,
                   key: str = "model.path", need_pad: bool = False):
    """AutoTokenizer.from_pretrained; a missing or corrupt tokenizer.json / tokenizer_config.json
    is one line. need_pad: batches are padded (convert's probe, lm-eval), so a tokenizer without a
    pad token pads with eos, and one without either is refused."""
    import json

    from transformers import AutoTokenizer

    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.json"):
        f = Path(path).expanduser() / name
        try:
            json.loads(f.read_text()) if f.is_file() else None
        except (ValueError, OSError) as e:  # name the file: the library's message does not
            raise UserError(f"{key}={path!r}: {name} is corrupt ({str(e).splitlines()[0][:200]}); copy or "
                            f"download the model's tokenizer files again") from None
    with boundary(f"{key}={path!r}: its tokenizer does not load",
                  "the folder needs the tokenizer files of its model (tokenizer.json or the vocabulary "
                  "files, and tokenizer_config.json); copy or download them again"):
        tokenizer = AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    if need_pad and tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UserError(f"{key}={path!r}: its tokenizer has neither a pad nor an eos token; set pad_token "
                            f"(or eos_token) in its tokenizer_config.json")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> nn.Module:
    """Wrap with peft LoRA; the base model is frozen, only adapters train.

    target_modules=None (the default) targets every nn.Linear inside the decoder blocks, whatever
    the architecture calls them (Phi-3 fuses qkv_proj and gate_up_proj, Starcoder2 has c_fc).
    """
    from peft import LoraConfig, get_peft_model

    if cfg.target_modules is None:
        target, names = block_linear_targets(model)
        if is_rank0():
            print(f"lora: every Linear of the decoder blocks: {', '.join(names)}", flush=True)
    else:
        linear_names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        missing = [t for t in cfg.target_modules if t not in linear_names]
        if missing:
            raise UserError(f"lora.target_modules {missing} match no Linear layer of the model; "
                            f"available: {sorted(linear_names)} (or null for every Linear of the decoder blocks)")
        target = list(cfg.target_modules)
    lcfg = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                      target_modules=target, task_type="CAUSAL_LM")
    with targets_as_given():
        return get_peft_model(model, lcfg)


@contextmanager
def targets_as_given():
    """peft 0.21 rewrites the LoRA targets of every model type whose checkpoints transformers converts
    from its v4 layout (DeepSeek-V2/V3, GLM-4.5-MoE, Qwen2/3-MoE, OLMoE, dots1, ...): targets named
    gate_proj / up_proj / down_proj leave the Linears and become `target_parameters` on the fused 3D
    experts. That is for adapters trained under transformers v4. Here it would take LoRA off the
    shared experts and the dense MLPs, and parametrize the experts, which moves their 3D parameters
    out of the module (expert QAT then finds nothing). Our targets name Linears of the model as it is."""
    import peft.utils.transformers_weight_conversion as conversion

    rewrite = conversion.convert_peft_config_for_transformers
    conversion.convert_peft_config_for_transformers = lambda *args, **kwargs: None
    try:
        yield
    finally:
        conversion.convert_peft_config_for_transformers = rewrite


def block_linear_targets(model: nn.Module) -> tuple[str, list[str]]:
    """(a peft target regex, the Linears' leaf names) for every nn.Linear inside the decoder blocks
    but the MoE routers and gates.

    A regex anchored at the blocks list, not bare leaf names: a leaf name such as q_proj may
    also name a Linear outside the decoder (a vision tower), which must not get an adapter.
    Routers keep their weights (the router rule), and peft's LoRA Linear cannot wrap a router that
    subclasses nn.Linear but returns a tuple (Phi-3.5-MoE): a router whose leaf name a block Linear
    shares is excluded by a lookahead.
    """
    blocks = decoder_blocks(model)
    prefix = next(n for n, m in model.named_modules() if m is blocks)
    router_ids = router_module_ids(model)
    names = sorted({n.rsplit(".", 1)[-1] for n, m in blocks.named_modules()
                    if isinstance(m, nn.Linear) and "." in n and id(m) not in router_ids})
    if not names:
        raise UserError(f"the decoder blocks of {type(model).__name__} hold no nn.Linear for LoRA to target")
    alternatives = "|".join(re.escape(n) for n in names)
    shared = sorted({re.sub(r"^\d+", "", n) for n, m in blocks.named_modules()
                     if id(m) in router_ids and isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in names})
    skip = rf"(?!\d+(?:{'|'.join(re.escape(n) for n in shared)})$)" if shared else ""
    return rf"{re.escape(prefix)}\.{skip}\d+\.(?:.*\.)?(?:{alternatives})", names


def qat_targets(model: nn.Module) -> dict[str, nn.Module]:
    """The Linears that get fake quantization: decoder-block Linears only (never lm_head).

    With LoRA, the frozen `base_layer`s of adapted projections plus untouched block Linears;
    the adapters themselves stay high precision.
    """
    blocks = decoder_blocks(model)
    in_blocks = {id(m) for m in blocks.modules()}
    out = {}
    high_precision = router_module_ids(model)  # the router rule
    for fqn, mod in model.named_modules():
        if type(mod) is not nn.Linear or id(mod) not in in_blocks or id(mod) in high_precision:
            continue
        if re.search(r"\.lora_[AB]\.", fqn + "."):
            continue
        out[fqn] = mod
    return out


def qat_backend(cfg: FakeQuantConfig, scheme: Scheme) -> str:
    """Our fake-quantized Linear by default (every scheme, any hardware); torchao's on request."""
    if cfg.backend == "torchao" and not scheme.torchao_qat:
        raise UserError(f"scheme {scheme.name!r} has no torchao QAT prepare path here; use qat.backend=qatlinear")
    return "qatlinear" if cfg.backend == "auto" else cfg.backend


def apply_qat(model: nn.Module, cfg: FakeQuantConfig, scheme: Scheme) -> dict:
    """Swap targeted Linears and MoE experts (and optionally the input embedding) for fake-quantized
    ones; returns the coverage record (qat/coverage.py): what share of the decoder is covered."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig as AOQATConfig

    targets = qat_targets(model)
    experts = experts_modules(decoder_blocks(model))
    refuse_uncovered(model, {**targets, **experts}, cfg.allow_unquantized)
    scheme.check_shapes(targets, cfg.group_size)
    check_learnable(scheme, cfg.learn_scales)
    for name, mod in experts.items():
        moe.check_expert_groups(name, mod, cfg.group_size if scheme.uses_group_size else None)
    # experts: our fake quantizer whatever the backend (torchao has no MoE QAT)
    moe.wrap_experts(decoder_blocks(model), scheme.fake_quantizers(cfg.group_size)[0])
    if qat_backend(cfg, scheme) == "qatlinear":
        wfq, afq = scheme.fake_quantizers(cfg.group_size)
        for fqn, lin in targets.items():
            parent, _, leaf = fqn.rpartition(".")
            setattr(model.get_submodule(parent), leaf, QATLinear.from_linear(lin, wfq, afq, cfg.learn_scales))
    else:
        ids = {id(m) for m in targets.values()}
        quantize_(model, AOQATConfig(scheme.base_config(cfg.group_size), step="prepare"),
                  filter_fn=lambda m, fqn: id(m) in ids)
    if cfg.lora_merged:
        _merge_lora_forward(model)
    emb = model.get_input_embeddings()
    equant = embedding_quant(cfg.embedding, cfg.embedding_bits, cfg.embedding_group_size, scheme)
    if equant is not None and isinstance(emb, nn.Embedding):  # else another rank's (sharded convert)
        check_untied(model)
        equant.check_shapes("the input embedding", emb)
        quantize_(model, AOQATConfig(equant.config(), step="prepare"), filter_fn=lambda m, fqn: m is emb)
    return coverage(model)


def check_untied(model: nn.Module) -> None:
    """A tied embedding is also lm_head, which stays high precision: it cannot be quantized alone."""
    base = base_model(model)
    out = base.get_output_embeddings()
    if getattr(base.config, "tie_word_embeddings", False) or \
            getattr(out, "weight", None) is base.get_input_embeddings().weight:
        raise UserError("qat.embedding=true needs untied embeddings, but this model ties lm_head to the input "
                        "embedding (tie_word_embeddings), and lm_head stays high precision; set qat.embedding=false")


def _merge_lora_forward(model: nn.Module) -> None:
    from peft.tuners.lora import Linear as LoraLinear

    layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
    if not layers or not all(isinstance(m.base_layer, QATLinear) for m in layers):
        raise UserError("qat.lora_merged=true needs LoRA on intx-scheme Linears with qat.backend=qatlinear")
    for m in layers:
        use_merged_lora(m)


def fake_quantizers(model: nn.Module) -> list[nn.Module]:
    """Everything with an `enabled` switch: torchao's fake quantizers, our QATLinear and QATExperts."""
    from torchao.quantization.qat.fake_quantizer import FakeQuantizerBase

    return [m for m in model.modules() if isinstance(m, (FakeQuantizerBase, QATLinear, moe.QATExperts))]


def our_quantizers(model: nn.Module) -> list:
    """The distinct fake quantizers our QATLinears and QATExperts call (for describe_route)."""
    found = {}
    for m in model.modules():
        if isinstance(m, QATLinear):
            fqs = [m.weight_fq, m.act_fq]
        elif isinstance(m, moe.QATExperts):
            fqs = [getattr(fq, "fq2d", fq) for fq in m.expert_fqs.values()]
        else:
            continue
        found.update((repr(fq), fq) for fq in fqs if fq is not None)
    return list(found.values())


def set_fake_quant(model: nn.Module, enabled: bool) -> None:
    """Toggle fake quantization; the recipe derives `enabled` from the step, so it survives resume."""
    for fq in fake_quantizers(model):
        fq.enabled = enabled


def apply_activation_checkpointing(model: nn.Module, mode: str) -> None:
    if mode == "none":
        return
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    blocks = decoder_blocks(model)
    for i, block in enumerate(blocks):
        blocks[i] = checkpoint_wrapper(block, preserve_rng_state=True)


def apply_compile(model: nn.Module, enabled: bool) -> None:
    """Compile each block separately: repeated blocks share one compiled graph, cold start stays short."""
    if not enabled:
        return
    blocks = decoder_blocks(model)
    for i, block in enumerate(blocks):
        blocks[i] = torch.compile(block, fullgraph=False)


def apply_fsdp(model: nn.Module, mesh, cfg: FSDPConfig, param_dtype: torch.dtype) -> None:
    """FSDP2: shard each decoder block, then the root.

    Master weights stay fp32 (the module's dtype); `param_dtype` is the compute dtype that
    FSDP casts to at all-gather; gradients are reduced in fp32.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    blocks = decoder_blocks(model)
    for i, block in enumerate(blocks):
        # The last block's params are needed again right away by backward: keep them gathered.
        reshard = cfg.reshard_after_forward and i < len(blocks) - 1
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=cfg.reshard_after_forward)


def non_persistent_buffers(model: nn.Module):
    """(module, name, tensor) of every buffer that no state dict holds, e.g. RoPE's inv_freq."""
    for mod in model.modules():
        for name, buf in mod._buffers.items():
            if buf is not None and name in mod._non_persistent_buffers_set:
                yield mod, name, buf


def cast_keep_buffers(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Parameters and persistent buffers to `dtype`; non-persistent buffers (RoPE inv_freq) keep
    theirs. That is the model `from_pretrained(dtype=...)` builds, and the one training runs (FSDP
    casts parameters only): a plain .to(bf16) would round inv_freq and change every logit."""
    keep = list(non_persistent_buffers(model))
    model.to(dtype)
    for mod, name, buf in keep:
        mod._buffers[name] = buf
    return model


def fill_from_rank0(model: nn.Module, full_state: dict, device: torch.device) -> None:
    """After fully_shard: ranks that built `model` on the meta device get rank 0's weights.

    Rank 0 passes its full state dict, taken before sharding; the others pass {}. Each tensor is
    broadcast once and every rank keeps only its shard. Non-persistent buffers (RoPE inv_freq)
    are in no state dict, so they are broadcast as they are.
    """
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if any(p.is_meta for p in model.parameters()):
        model.to_empty(device=device)
    set_model_state_dict(model, full_state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for _, _, buf in non_persistent_buffers(model):
        dist.broadcast(buf, src=0)


def cast_frozen(model: nn.Module, dtype: torch.dtype) -> None:
    """Store frozen (LoRA base) weights in the compute dtype: they need no fp32 master copy.

    Halves the base model's memory for bf16 LoRA. FSDP2 only needs a uniform dtype among the
    *trainable* parameters of a group, so fp32 adapters next to bf16 frozen weights are fine.
    """
    for p in model.parameters():
        if not p.requires_grad and p.is_floating_point():
            p.data = p.data.to(dtype)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(all, trainable) parameter counts, in global (unsharded) numbers."""
    total = sum(p.numel() for p in model.parameters())
    train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, train


def shard_model(model: nn.Module, cfg: FSDPConfig, lora: bool, mesh, device: torch.device,
                compute_dtype: torch.dtype, master_dtype: torch.dtype = torch.float32) -> None:
    """Activation checkpointing, compile and FSDP2, in that order; with fsdp.init_from_rank0, the
    ranks that built the model on meta then receive rank 0's weights. `master_dtype` is the dtype
    the weights are stored (and AdamW's state kept) in; bf16 drops the fp32 master copy."""
    import torch.distributed as dist

    if master_dtype != torch.float32:
        cast_keep_buffers(model, master_dtype)  # RoPE's inv_freq stays fp32, as from_pretrained keeps it
    if lora:
        cast_frozen(model, compute_dtype)
    from_rank0 = cfg.init_from_rank0 and dist.get_world_size() > 1
    full_state = {}
    if from_rank0 and dist.get_rank() == 0:  # canonical FQNs, before the AC/compile wrappers
        from torch.distributed.checkpoint.state_dict import get_model_state_dict
        full_state = get_model_state_dict(model)
    apply_activation_checkpointing(model, cfg.activation_checkpointing)
    apply_compile(model, cfg.compile)
    apply_fsdp(model, mesh, cfg, compute_dtype)
    if from_rank0:
        fill_from_rank0(model, full_state, device)
