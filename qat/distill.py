"""Quantization-aware distillation (QAD): a KL loss from a high-precision teacher to the QAT student.

    loss = weight * KL(teacher || student) + (1 - weight) * cross-entropy

both summed over supervised tokens (labels != -100) and divided by the global number of such
tokens, like the plain loss, so the result is independent of world size and micro-batching. The
KL runs forward, teacher to student, at temperature T on both sides and is scaled by T^2 so that
its gradient keeps the same size at every temperature (T = 1, the default, is NVIDIA ModelOpt's
QAD setting).

Teachers (`distill.teacher`):
- "base" in a LoRA run: the student network itself with its adapters and fake quantization
  switched off for the teacher's forward. No second copy of the model is held.
- "base" in a full run: a frozen copy of the starting model, sharded with FSDP2 in the compute
  dtype.
- a path to an HF folder (or hub id), e.g. the bf16 arm of a comparison, as a frozen copy.

Memory. The teacher's forward stops at its final hidden states (a hook on the final norm, with
logits_to_keep=1), and teacher logits are computed `distill.chunk_size` positions at a time from
the gathered output weight, in fp32. So next to the student's own logits (which cross-entropy
materialises anyway), only chunk_size x vocab teacher logits exist at once: for a 128K vocabulary
and chunks of 512, 512 x 128256 x 4 bytes = 263 MB, against 4 x 2048 x 128256 x 4 = 4.2 GB for
a whole 4 x 2048 batch. docs/qat.md has the arithmetic.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from qat.chunked_ce import cross_entropy_sum, shifted_labels
from qat.config import DistillConfig, FSDPConfig, ModelConfig
from qat.data.packed import flash_varlen_kwargs
from qat.data.sources import IGNORE
from qat.errors import UserError
from qat.layout import base_model, decoder_blocks
from qat.model import apply_fsdp, cast_keep_buffers, fake_quantizers, load_model


def kd_sum(student_logits: torch.Tensor, teacher_hidden: torch.Tensor, head_weight: torch.Tensor,
           head_bias: Optional[torch.Tensor], labels: torch.Tensor, temperature: float, chunk_size: int,
           softcap: Optional[float] = None) -> torch.Tensor:
    """Sum over supervised positions of T^2 * KL(p_teacher || p_student), teacher logits computed
    `chunk_size` positions at a time. Position t predicts labels[t + 1], as in the CE loss."""
    s = student_logits.flatten(0, 1)  # views: the rows are picked per chunk, nothing is copied whole
    h = teacher_hidden.flatten(0, 1)
    keep = (shifted_labels(labels).flatten() != IGNORE).nonzero().squeeze(1)
    total = student_logits.new_zeros((), dtype=torch.float32)
    for start in range(0, keep.numel(), chunk_size):
        rows = keep[start:start + chunk_size]
        with torch.no_grad():
            t_logits = F.linear(h[rows].to(head_weight.dtype), head_weight, head_bias).float()
            if softcap:  # Gemma-style final logit soft-capping, as the model's own head applies it
                t_logits = softcap * torch.tanh(t_logits / softcap)
            t_logp = F.log_softmax(t_logits / temperature, dim=-1)
        s_logp = F.log_softmax(s[rows].float() / temperature, dim=-1)
        total = total + (t_logp.exp() * (t_logp - s_logp)).sum()
    return total * temperature ** 2


def final_norm(model: nn.Module) -> nn.Module:
    """The norm applied right before lm_head (HF decoder LMs keep it beside the decoder blocks)."""
    base = base_model(model)
    blocks = decoder_blocks(base)
    for mod in base.modules():
        if any(child is blocks for child in mod.children()) and isinstance(getattr(mod, "norm", None), nn.Module):
            return mod.norm
    raise UserError(f"distill: {type(base).__name__} has no final `norm` beside its decoder blocks")


def _full(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A parameter as one whole tensor: FSDP2 keeps it as a DTensor shard outside a forward."""
    if t is None:
        return None
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class Teacher:
    """The teacher's final hidden states and the output layer that turns them into logits."""

    def __init__(self, model: nn.Module, self_teacher: bool):
        self.model, self.self_teacher = model, self_teacher
        base = base_model(model)
        self.config = base.config
        self.head = base.get_output_embeddings()
        self.norm = final_norm(model)

    @contextlib.contextmanager
    def _as_teacher(self):
        """For the student network itself: adapters off and fake quantization off, then restored."""
        if not self.self_teacher:
            yield
            return
        from peft.tuners.tuners_utils import BaseTunerLayer

        # The switches themselves, not peft's disable_adapter(): that also flips requires_grad, and
        # under FSDP2 it would flip it on the gathered copies of a block, not on the shards that the
        # optimizer and the checkpoint see.
        adapters = [m for m in self.model.modules() if isinstance(m, BaseTunerLayer)]
        fqs = fake_quantizers(self.model)
        was = [m._disable_adapters for m in adapters], [fq.enabled for fq in fqs]
        for m in adapters:
            m._disable_adapters = True
        for fq in fqs:
            fq.enabled = False
        try:
            yield
        finally:
            for m, off in zip(adapters, was[0]):
                m._disable_adapters = off
            for fq, on in zip(fqs, was[1]):
                fq.enabled = on

    @torch.no_grad()
    def hidden(self, ids: torch.Tensor, position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The teacher's final hidden states; position_ids keep packed documents apart, as for the student."""
        captured = {}
        handle = self.norm.register_forward_hook(lambda m, a, out: captured.__setitem__("h", out))
        try:
            with self._as_teacher():
                self.model(input_ids=ids, position_ids=position_ids, use_cache=False, logits_to_keep=1,
                           **flash_varlen_kwargs(self.model, position_ids))
        finally:
            handle.remove()
        return captured["h"]

    def head_params(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Collective under FSDP2 (an all-gather of the output weight): every rank calls it."""
        return _full(self.head.weight), _full(getattr(self.head, "bias", None))

    @property
    def softcap(self) -> Optional[float]:
        return getattr(self.config, "final_logit_softcapping", None)


def check_teacher(cfg: DistillConfig, student_config, trust_remote_code: bool) -> None:
    """Before any process group exists: the teacher folder loads and speaks the student's vocabulary."""
    if not cfg.enabled or cfg.teacher == "base":
        return
    from transformers import AutoConfig

    try:
        teacher = AutoConfig.from_pretrained(cfg.teacher, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"distill.teacher={cfg.teacher!r} is not a loadable HF model: {str(e).splitlines()[0]}") from None
    t_vocab, s_vocab = getattr(teacher, "vocab_size", None), student_config.vocab_size
    if t_vocab != s_vocab:
        raise UserError(f"distill.teacher={cfg.teacher!r} has vocab_size={t_vocab}, the student {s_vocab}: "
                        f"distillation compares the two distributions token by token")


def build_teacher(cfg: DistillConfig, student: nn.Module, lora: bool, load_copy) -> Teacher:
    """The teacher for this run. `load_copy(path or None)` builds a frozen, sharded model (None: the
    starting model); it is only called when the student cannot serve as its own teacher."""
    if cfg.teacher == "base" and lora:
        return Teacher(student, self_teacher=True)
    return Teacher(load_copy(None if cfg.teacher == "base" else cfg.teacher), self_teacher=False)


def load_teacher_copy(path: Optional[str], student: ModelConfig, seq_len: int, fsdp: FSDPConfig, mesh,
                      dtype: torch.dtype) -> nn.Module:
    """A frozen teacher sharded like the student, stored in the compute dtype (it needs no fp32
    master weights). path None: the student's starting model."""
    cfg = student if path is None else ModelConfig(path=path, trust_remote_code=student.trust_remote_code,
                                                   attn_implementation=student.attn_implementation)
    teacher = load_model(cfg, seq_len=seq_len).requires_grad_(False).eval()
    cast_keep_buffers(teacher, dtype)
    apply_fsdp(teacher, mesh, fsdp, dtype)
    return teacher


def token_loss_sums(logits: torch.Tensor, labels: torch.Tensor, teacher: Optional[Teacher],
                    teacher_hidden: Optional[torch.Tensor], cfg: DistillConfig):
    """(loss, ce, kd): sums over the supervised tokens of one micro-batch. Without a teacher the
    loss is the cross-entropy; with one, weight * KL + (1 - weight) * CE."""
    # KL only (the default): cross-entropy is for the log, so it keeps no graph for backward
    with torch.set_grad_enabled(teacher is None or cfg.weight < 1):
        ce = cross_entropy_sum(logits, labels)
    if teacher is None:
        return ce, ce, torch.zeros((), device=logits.device)
    weight, bias = teacher.head_params()
    kd = kd_sum(logits, teacher_hidden, weight, bias, labels, cfg.temperature, cfg.chunk_size, teacher.softcap)
    loss = kd if cfg.weight == 1 else cfg.weight * kd + (1 - cfg.weight) * ce
    return loss, ce, kd
