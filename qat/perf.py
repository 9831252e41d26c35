"""Throughput arithmetic: model FLOPs per token, MFU against the device's peak, and memory peaks."""

from __future__ import annotations

from typing import Optional

import torch

from qat.layout import base_model

# Spec-sheet dense bf16 peak FLOP/s by device-name substring: the one table behind every MFU we
# report (training log, bench/bench_train.py). Unknown devices report no MFU.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "B200": 2250e12, "L40S": 362e12}


def peak_rss_mib() -> int:
    """This process's peak resident host memory (Linux reports ru_maxrss in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024


def device_peak_flops(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def flops_per_token(matmul_params: int, layers: int, hidden: int, seq_len: int, lora: bool) -> float:
    """Training FLOPs per token (PaLM appendix B): 2N forward, 2N input-grad, 2N weight-grad
    (skipped for frozen weights under LoRA), plus attention scores 12 * layers * hidden * seq."""
    return (4 if lora else 6) * matmul_params + 12 * layers * hidden * seq_len


def mfu(tokens_per_s: float, flops_per_tok: float, peak_flops_per_device: float, devices: int) -> float:
    """Model FLOPs utilization: achieved model FLOP/s over the peak of all devices of the job."""
    return tokens_per_s * flops_per_tok / (peak_flops_per_device * devices)


def model_flops_per_token(model, n_params: int, seq_len: int, lora: bool) -> float:
    """flops_per_token for a transformers model (or its peft wrapper): its matmul parameters are all
    parameters but the input embedding (a lookup), which counts when tied to lm_head (a matmul)."""
    hf_config = base_model(model).config
    emb = hf_config.vocab_size * hf_config.hidden_size
    matmul = n_params if hf_config.tie_word_embeddings else n_params - emb
    return flops_per_token(matmul, hf_config.num_hidden_layers, hf_config.hidden_size, seq_len, lora)
