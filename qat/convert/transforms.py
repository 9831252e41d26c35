"""The model transforms of convert: rebuild a trained model, merge, unfake, cast, quantize.

The model is rebuilt exactly as training built it (base -> LoRA -> QAT prepare), the DCP
shards are loaded into it without a process group (DCP reshards to a world of one), and then:
  merge LoRA -> cast to the export dtype -> (QAT) QATConfig(step="convert") | (bf16) PTQ
Merging must come first: converting first and merging afterwards fails in torchao
(NotImplementedError on aten.add_ for quantized tensors).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from qat import checkpoint as ckpt
from qat.config import TrainConfig, config_from_dict
from qat.errors import UserError
from qat.fake_quant import QATLinear
from qat.learned_scales import learned as learned_scale_layers
from qat.learned_scales import use_learned_scales
from qat.model import apply_lora, apply_qat, cast_keep_buffers, load_model, qat_targets
from qat.moe import unwrap
from qat.schemes import EmbeddingQuant, Scheme, embedding_from_record, scheme_from_record


def load_trained(path: Path, device: str = "cpu") -> tuple[nn.Module, TrainConfig, dict, Optional[Scheme]]:
    """The trained model (fp32, un-sharded, fake quantizers in place for QAT runs) on `device`: the
    skeleton is built on the host, moved, and the checkpoint's tensors are read straight into it."""
    meta = ckpt.read_meta(path)
    cfg = config_from_dict(meta["config"])
    model, scheme = rebuild_as_trained(load_model(cfg.model), cfg, meta)
    if device != "cpu":
        model.to(device)
    load_checkpoint_weights(model, cfg, path)
    return model.eval(), cfg, meta, scheme


def rebuild_as_trained(model: nn.Module, cfg: TrainConfig, meta: dict) -> tuple[nn.Module, Optional[Scheme]]:
    """Base model -> LoRA -> QAT prepare with the checkpoint's own QAT record, as training built it."""
    rec = meta.get("qat")
    scheme = scheme_from_record(rec) if rec else None
    if cfg.lora.enabled:
        model = apply_lora(model, cfg.lora)
    if scheme is not None:
        emb = embedding_from_record(rec, scheme)
        cfg.qat.group_size, cfg.qat.embedding = rec["group_size"], emb is not None
        cfg.qat.learn_scales = bool(rec.get("learned_scales"))
        if emb is not None:
            cfg.qat.embedding_bits, cfg.qat.embedding_group_size = emb.bits, emb.group_size
        apply_qat(model, cfg.qat, scheme)
    return model, scheme


def load_checkpoint_weights(model: nn.Module, cfg: TrainConfig, path: Path, tied: Optional[dict] = None) -> None:
    """The checkpoint's tensors for every key `model` has (LoRA runs: the adapters), in place.

    No process group is involved (no_dist): DCP reshards any saved world size to a world of one,
    and a sharded convert's rank reads only the keys of its slice. `tied` maps a tied weight to
    the name it may have been saved under instead.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         set_model_state_dict)

    opts = StateDictOptions(ignore_frozen_params=cfg.lora.enabled, strict=not cfg.lora.enabled)
    wanted = get_model_state_dict(model, options=opts)
    request = wanted
    if tied:
        stored = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
        request = {tied[k] if f"model.{k}" not in stored and k in tied else k: v for k, v in wanted.items()}
    try:
        dcp.load({"model": request}, checkpoint_id=str(path), no_dist=True)
    except BaseException as e:  # DCP raises CheckpointException, a BaseException
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise UserError(f"checkpoint {path} is corrupt or does not match its config: {type(e).__name__}") from None
    set_model_state_dict(model, wanted, options=opts)


def unfake(model: nn.Module) -> nn.Module:
    """A copy with every fake-quantized module swapped back to its plain torch module."""
    from torchao.quantization.qat.embedding import FakeQuantizedEmbedding
    from torchao.quantization.qat.linear import FakeQuantizedLinear

    plain = copy.deepcopy(model)
    for mod in plain.modules():
        unwrap(mod)  # MoE experts: back to the model's own class
    for name, mod in list(plain.named_modules()):
        if isinstance(mod, (FakeQuantizedLinear, QATLinear)):
            _set(plain, name, mod.to_linear())
        elif isinstance(mod, FakeQuantizedEmbedding):
            _set(plain, name, mod.to_embedding())
    return plain


def cast_for_export(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """The export dtype, with RoPE's inv_freq kept as from_pretrained keeps it (cast_keep_buffers)."""
    return cast_keep_buffers(model, dtype)


def _set(root: nn.Module, fqn: str, new: nn.Module) -> None:
    parent, _, leaf = fqn.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def qat_convert(model: nn.Module, scheme: Scheme, group_size: Optional[int],
                embedding: Optional[EmbeddingQuant]) -> nn.Module:
    """QAT run: the checkpoint's own scheme through QATConfig(step="convert"), in place."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig as AOQATConfig
    from torchao.quantization.qat.embedding import FakeQuantizedEmbedding
    from torchao.quantization.qat.linear import FakeQuantizedLinear

    # Our QATLinear: back to nn.Linear, then the base config. That is what QATConfig(step=
    # "convert") does for torchao's modules, with the same numerics (tests assert equality).
    ours = [n for n, m in model.named_modules() if isinstance(m, QATLinear)]
    learned = {n: (m.weight.detach(), m.weight_scale.detach()) for n, m in learned_scale_layers(model).items()}
    for name in ours:
        _set(model, name, model.get_submodule(name).to_linear())
    quantize_(model, scheme.convert_config(group_size), filter_fn=lambda m, fqn: fqn in set(ours))
    use_learned_scales(model, learned)
    quantize_(model, AOQATConfig(scheme.convert_config(group_size), step="convert"),
              filter_fn=lambda m, fqn: isinstance(m, FakeQuantizedLinear))
    if embedding is not None:
        quantize_(model, AOQATConfig(embedding.config(), step="convert"),
                  filter_fn=lambda m, fqn: isinstance(m, FakeQuantizedEmbedding))
    return model


def ptq(model: nn.Module, scheme: Scheme, group_size: Optional[int]) -> nn.Module:
    """bf16 run: the same scheme as post-training quantization of the same Linears, in place."""
    from torchao.quantization import quantize_

    targets = qat_targets(model)
    scheme.check_shapes(targets, group_size)
    quantize_(model, scheme.convert_config(group_size), filter_fn=lambda m, fqn: fqn in targets)
    return model


def quantized_config(model: nn.Module, scheme: Scheme, group_size: Optional[int],
                     embedding: Optional[EmbeddingQuant]):
    """The TorchAoConfig that describes a converted model (TorchAoConfig's default skips lm_head,
    matching our targets)."""
    from transformers import TorchAoConfig

    quant_type = scheme.convert_config(group_size)
    if embedding is not None:
        from torchao.quantization import FqnToConfig

        emb_name = next(n for n, m in model.named_modules() if m is model.get_input_embeddings())
        quant_type = FqnToConfig({"_default": quant_type, emb_name: embedding.config()})
    return TorchAoConfig(quant_type=quant_type, include_input_output_embeddings=embedding is not None)


def save_quantized(model: nn.Module, tokenizer, out: Path, qcfg) -> None:
    """save_pretrained after a bare quantize_ fails in transformers 5 with "Attempted to access the
    data pointer on an invalid python storage"; with the config and HF quantizer attached it saves,
    and the folder round-trips with identical logits."""
    from transformers.quantizers import AutoHfQuantizer

    model.config.quantization_config = qcfg
    model.hf_quantizer = AutoHfQuantizer.from_config(qcfg)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def compare_logits(test: torch.Tensor, ref: torch.Tensor) -> dict:
    """Relative error ||test - ref|| / ||ref|| and the share of positions whose argmax agrees."""
    test, ref = test.double(), ref.double()
    return {"rel_error": float((test - ref).norm() / ref.norm()),
            "max_abs_diff": float((test - ref).abs().max()),
            "top1_agreement": float((test.argmax(-1) == ref.argmax(-1)).double().mean())}
