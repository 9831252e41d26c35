"""AdamW over trainable parameters and a warmup + cosine/linear/constant LR schedule."""

from __future__ import annotations

import math

import torch

from qat.config import OptimizerConfig, SchedulerConfig


def build_optimizer(params: list, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """`params`: parameters, or param groups (dicts) whose own lr / weight_decay override cfg's.

    On CUDA the fused kernel (one launch for every parameter's update, as torchtitan and the
    plain loop use); elsewhere foreach, the reference the CPU tests pin down bitwise."""
    tensors = [p for g in params for p in g["params"]] if params and isinstance(params[0], dict) else list(params)
    fused = bool(tensors) and tensors[0].device.type == "cuda"
    return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                             weight_decay=cfg.weight_decay, foreach=not fused, fused=fused)


def lr_factor(step: int, total: int, cfg: SchedulerConfig) -> float:
    """Multiplier of the base lr at `step` (0-based): linear warmup, then decay to min_lr_ratio."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.decay == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.decay == "cosine" else 1 - progress
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape


def build_scheduler(optimizer, cfg: SchedulerConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, cfg))


def clip_grad_norm(params: list, max_norm) -> torch.Tensor:
    """The global gradient norm (over all ranks' shards), clipped to max_norm unless it is None.
    A tensor on the device: reading it waits for the device, so the loop reads it only to log."""
    if max_norm is None:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    else:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm
