"""Where convert's model lives: the whole model in one process, or a slice per torchrun rank.

The pipeline (qat/convert/pipeline.py) runs the same steps either way and leaves every forward,
save and cross-rank decision to a `ConvertIO`. `LocalIO` is the one-process implementation;
`qat.convert.sharded.ShardedIO` is the torchrun one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Protocol

import torch
import torch.nn as nn


class ConvertIO(Protocol):
    """What the pipeline asks of the process (or processes) that hold the model."""

    @property
    def has_logits(self) -> bool:
        """True where forward() returns real logits (the one process, or the last rank)."""

    def forward(self, model: nn.Module, x: torch.Tensor) -> Optional[torch.Tensor]:
        """The model's fp32 logits on x, or None where this process does not hold the output."""

    def share(self, obj):
        """The object of the process that has the logits, on every process."""

    def record(self) -> dict:
        """Facts about the conversion itself for verify.json (memory, slices)."""

    def save_hf(self, model: nn.Module, tokenizer, folder: Path, dtype: torch.dtype, base_path: str) -> None: ...

    def save_adapter(self, model: nn.Module, folder: Path) -> None: ...

    def save_quantized(self, model: nn.Module, tokenizer, folder: Path, qcfg, dtype: torch.dtype,
                       base_path: str) -> None: ...

    def reload_matches(self, quant: nn.Module, folder: Path, x: torch.Tensor, expected) -> bool:
        """Whether the folder just written gives exactly `expected` when loaded back."""


class LocalIO:
    """One process holds the whole model, on `device`: HF's own save_pretrained and from_pretrained.
    Logits come back to the host, so every comparison sees the same tensors whatever the device."""

    has_logits = True

    def __init__(self, device: torch.device = torch.device("cpu")):
        self.device = device

    def record(self) -> dict:
        from qat.perf import peak_rss_mib

        return {"memory": {"peak_rss_mib": peak_rss_mib()}}

    def forward(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return model(x.to(self.device)).logits.float().cpu()

    def share(self, obj):
        return obj

    def save_hf(self, model: nn.Module, tokenizer, folder: Path, dtype: torch.dtype, base_path: str) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    def save_adapter(self, model: nn.Module, folder: Path) -> None:
        model.save_pretrained(folder)

    def save_quantized(self, model: nn.Module, tokenizer, folder: Path, qcfg, dtype: torch.dtype,
                       base_path: str) -> None:
        from qat.convert.transforms import save_quantized

        save_quantized(model, tokenizer, folder, qcfg)

    def reload_matches(self, quant: nn.Module, folder: Path, x: torch.Tensor, expected: torch.Tensor) -> bool:
        from transformers import AutoModelForCausalLM

        # packed kernel formats (int4 tinygemm) load where they run: placed by from_pretrained itself
        where = {} if self.device.type == "cpu" else {"device_map": str(self.device)}
        reloaded = AutoModelForCausalLM.from_pretrained(folder, **where)
        with torch.no_grad():
            return bool(torch.equal(self.forward(reloaded, x), expected))
